//! tracecar's benchmarks.
//!
//! - `benches/span.rs`: criterion micro-benchmarks of the per-request span work.
//! - `src/bin/bench-app.rs`: a tiny fast upstream app; `src/bin/loadgen.rs`: an open-loop
//!   (constant-rate, coordinated-omission-corrected) and closed-loop HTTP/1 load generator.
//! - `load/run.sh`: the loopback load benchmark (app direct, tracecar, nginx); `load/bundle.sh`
//!   packs its binaries for a machine without registries. Results: `docs/benchmarks.md`.
