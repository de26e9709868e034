//! tracecar-injector: the mutating admission webhook that adds the tracecar proxy to pods.
//!
//! Read in this order:
//! - [`config`]: flags and environment, validated once into typed [`config::Defaults`].
//! - [`annotations`]: the `tracecar.dev/*` per-pod settings and their parsers.
//! - [`workload`]: which Deployment/StatefulSet/... a pod belongs to; its service name.
//! - [`decide`]: the pure decision `(pod, defaults) -> (patch, warnings, reason)`.
//! - [`patch`]: the JSON Patch that injection adds, and its inverse.
//! - [`server`]: the HTTPS shell around [`decide`]; [`tls`]: reloading certificates;
//!   [`admin`]: `/live`, `/ready`, `/metrics`; [`metrics`]: the counters; [`state`]: what
//!   the server and the admin endpoints share (below both).
//! - [`manual`]: `tracecar-injector inject` over YAML/JSON manifests.

pub mod admin;
pub mod annotations;
pub mod config;
pub mod decide;
pub mod manual;
pub mod metrics;
pub mod patch;
pub mod server;
pub mod state;
pub mod tls;
pub mod workload;

pub use config::Defaults;
pub use decide::{decide, decide_with, Decision, Reason};
