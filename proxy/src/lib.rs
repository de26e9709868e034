//! tracecar-proxy: a sidecar HTTP proxy that turns an uninstrumented app's traffic into spans.
//!
//! A request's path through the crate:
//! - [`listen`]: accept on the inbound or outbound listener, find the destination
//!   ([`orig_dst`]), [`detect`] the protocol;
//! - [`h1`]: plain HTTP/1.1 requests, parsed in place and forwarded with their bodies verbatim;
//! - [`http`]: everything else HTTP (HTTP/2, upgrades, CONNECT, ...) through hyper; both start
//!   the SERVER/CLIENT span ([`trace`]), propagate context and [`forward`] upstream;
//! - [`trace::export`]: finished spans queue for OTLP export;
//! - [`admin`]: `/live`, `/ready`, `/metrics` ([`metrics`]);
//! - [`config`]: every setting, validated once; [`init`]: iptables set-up; [`demo`]: the demo.

pub mod admin;
pub mod config;
pub mod demo;
pub mod detect;
pub mod errors;
pub mod forward;
pub mod h1;
pub mod http;
pub mod idle;
pub mod init;
pub mod listen;
pub mod metrics;
pub mod orig_dst;
pub mod proxy;
pub mod rules;
pub mod trace;
pub mod wait_ready;

#[cfg(test)]
mod fuzzing;

pub use config::{Config, RunArgs};
pub use proxy::Proxy;
