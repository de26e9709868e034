//! tracecar's benchmarks.
//!
//! - `benches/span.rs`: criterion micro-benchmarks of the per-request span work.
//! - `src/bin/bench-app.rs`: a tiny fast upstream app; `src/bin/loadgen.rs`: an open-loop
//!   (constant-rate, coordinated-omission-corrected) and closed-loop HTTP/1 load generator.
//! - `load/run.sh`: the loopback load benchmark (app direct, tracecar, nginx); `load/bundle.sh`
//!   packs its binaries for a machine without registries; `load/cpu-split.sh`: user and system
//!   CPU per request; `load/tracing-cost.sh`: what tracing costs. Results: `docs/benchmarks.md`.

/// A tokio runtime with `threads` workers; one thread gets the current-thread scheduler.
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}
