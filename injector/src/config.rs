//! Command line and environment: every setting is a clap flag with an environment fallback
//! (the flag wins), read as text and validated here, in one place, into typed values.
//! Nothing deeper reads the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::annotations::{self as ann, Capture, Protocol, Quantity, SidecarMode};

/// The injector's version, also written to `tracecar.dev/proxy-version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, Parser)]
#[command(
    name = "tracecar-injector",
    version,
    about = "tracecar's sidecar injector"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the mutating admission webhook over HTTPS.
    Serve(ServeArgs),
    /// Inject (or with --uninject remove) the proxy in manifests read from a file or stdin.
    Inject(InjectArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// HTTPS listen address of the webhook.
    #[arg(long, env = "TRACECAR_INJECTOR_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: String,
    /// PEM certificate chain of the serving certificate.
    #[arg(long, env = "TRACECAR_INJECTOR_TLS_CERT")]
    pub tls_cert: PathBuf,
    /// PEM private key of the serving certificate.
    #[arg(long, env = "TRACECAR_INJECTOR_TLS_KEY")]
    pub tls_key: PathBuf,
    /// How often the certificate files are checked for changes (e.g. 2s, 500ms).
    #[arg(
        long,
        env = "TRACECAR_INJECTOR_TLS_RELOAD_INTERVAL",
        default_value = "2s"
    )]
    pub tls_reload_interval: String,
    /// Plain-HTTP listen address for /live, /ready and /metrics.
    #[arg(
        long,
        env = "TRACECAR_INJECTOR_ADMIN_LISTEN",
        default_value = "0.0.0.0:9090"
    )]
    pub admin_listen: String,
    /// Tokio worker threads (default: number of CPUs).
    #[arg(long, env = "TRACECAR_INJECTOR_WORKER_THREADS")]
    pub worker_threads: Option<String>,
    /// How long in-flight requests may take to finish after SIGTERM (e.g. 25s).
    #[arg(
        long,
        env = "TRACECAR_INJECTOR_SHUTDOWN_TIMEOUT",
        default_value = "25s"
    )]
    pub shutdown_timeout: String,
    #[command(flatten)]
    pub defaults: DefaultsArgs,
}

#[derive(Debug, Args)]
pub struct InjectArgs {
    /// File to read (`-` = stdin, the default).
    #[arg(short = 'f', long = "filename", default_value = "-")]
    pub file: String,
    /// Remove what injection added instead of injecting.
    #[arg(long)]
    pub uninject: bool,
    #[command(flatten)]
    pub defaults: DefaultsArgs,
}

/// The injection defaults, as text; see [`DefaultsArgs::validate`].
#[derive(Debug, Args, Clone)]
pub struct DefaultsArgs {
    /// Proxy image.
    #[arg(long, env = "TRACECAR_PROXY_IMAGE", default_value = concat!("ghcr.io/tracecar-dev/tracecar-proxy:", env!("CARGO_PKG_VERSION")))]
    pub proxy_image: String,
    /// Image of the iptables init container.
    #[arg(long, env = "TRACECAR_INIT_IMAGE", default_value = concat!("ghcr.io/tracecar-dev/tracecar-init:", env!("CARGO_PKG_VERSION")))]
    pub init_image: String,
    /// OTLP collector URL (empty: the proxy's default).
    #[arg(long, env = "TRACECAR_COLLECTOR_ENDPOINT", default_value = "")]
    pub collector_endpoint: String,
    /// OTLP protocol: grpc, http/protobuf.
    #[arg(long, env = "TRACECAR_COLLECTOR_PROTOCOL", default_value = "grpc")]
    pub collector_protocol: String,
    /// Secret with ca.crt, tls.crt, tls.key for OTLP mTLS (empty: none).
    #[arg(long, env = "TRACECAR_COLLECTOR_TLS_SECRET", default_value = "")]
    pub collector_tls_secret: String,
    /// Propagators: comma list of tracecontext, baggage, b3, b3multi, jaeger.
    #[arg(
        long,
        env = "TRACECAR_PROPAGATORS",
        default_value = "tracecontext,baggage"
    )]
    pub propagators: String,
    /// Trace sampling ratio, 0 to 1 (parent-based).
    #[arg(long, env = "TRACECAR_SAMPLING_RATIO", default_value = "1")]
    pub sampling_ratio: String,
    /// native (init container with restartPolicy Always) or container (first app container).
    #[arg(long, env = "TRACECAR_SIDECAR_MODE", default_value = "native")]
    pub sidecar_mode: String,
    /// iptables or http-proxy.
    #[arg(long, env = "TRACECAR_CAPTURE", default_value = "iptables")]
    pub capture: String,
    /// Inbound ports not redirected to the proxy (e.g. 22,9000-9100).
    #[arg(long, env = "TRACECAR_SKIP_INBOUND_PORTS", default_value = "")]
    pub skip_inbound_ports: String,
    /// Outbound ports not redirected to the proxy.
    #[arg(long, env = "TRACECAR_SKIP_OUTBOUND_PORTS", default_value = "")]
    pub skip_outbound_ports: String,
    /// Outbound CIDRs not redirected to the proxy.
    #[arg(long, env = "TRACECAR_SKIP_OUTBOUND_CIDRS", default_value = "")]
    pub skip_outbound_cidrs: String,
    /// causal, inflight or off.
    #[arg(long, env = "TRACECAR_CORRELATION", default_value = "causal")]
    pub correlation: String,
    /// The proxy's log level: trace, debug, info, warn, error.
    #[arg(long, env = "TRACECAR_PROXY_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    #[arg(long, env = "TRACECAR_PROXY_CPU_REQUEST", default_value = "10m")]
    pub proxy_cpu_request: String,
    /// Empty: no CPU limit.
    #[arg(long, env = "TRACECAR_PROXY_CPU_LIMIT", default_value = "")]
    pub proxy_cpu_limit: String,
    #[arg(long, env = "TRACECAR_PROXY_MEMORY_REQUEST", default_value = "20Mi")]
    pub proxy_memory_request: String,
    #[arg(long, env = "TRACECAR_PROXY_MEMORY_LIMIT", default_value = "64Mi")]
    pub proxy_memory_limit: String,
    /// Cluster DNS domain, used in NO_PROXY.
    #[arg(long, env = "TRACECAR_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
}

/// The validated injection defaults: input of the pure decision function.
#[derive(Debug, Clone)]
pub struct Defaults {
    pub proxy_image: String,
    pub init_image: String,
    pub collector_endpoint: Option<String>,
    pub collector_protocol: Protocol,
    pub collector_tls_secret: Option<String>,
    pub propagators: String,
    pub sampling_ratio: String,
    pub sidecar_mode: SidecarMode,
    pub capture: Capture,
    pub skip_inbound_ports: String,
    pub skip_outbound_ports: String,
    pub skip_outbound_cidrs: String,
    pub correlation: &'static str,
    pub log_level: &'static str,
    pub cpu_request: Option<Quantity>,
    pub cpu_limit: Option<Quantity>,
    pub memory_request: Option<Quantity>,
    pub memory_limit: Option<Quantity>,
    pub cluster_domain: String,
    /// Inject pods that carry no `tracecar.dev/inject` annotation (true on `/inject`,
    /// false on `/inject/opt-in`).
    pub inject_by_default: bool,
}

impl Default for Defaults {
    /// The defaults documented in docs/injector.md (what the flags default to).
    fn default() -> Self {
        let args = DefaultsArgs::parse_from_defaults();
        match args.validate() {
            Ok(d) => d,
            // The built-in defaults are constants checked by a unit test.
            Err(e) => unreachable!("built-in defaults are valid: {e}"),
        }
    }
}

/// A flag or environment value that is not accepted.
#[derive(Debug, thiserror::Error)]
#[error("invalid value {value:?} for --{flag} (env {env}): expected {accepted}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub env: &'static str,
    pub value: String,
    pub accepted: &'static str,
}

fn check<T>(
    flag: &'static str,
    env: &'static str,
    value: &str,
    parse: impl Fn(&str) -> Result<T, &'static str>,
) -> Result<T, ConfigError> {
    parse(value).map_err(|accepted| ConfigError {
        flag,
        env,
        value: value.to_owned(),
        accepted,
    })
}

impl DefaultsArgs {
    fn parse_from_defaults() -> Self {
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            d: DefaultsArgs,
        }
        // No arguments and no environment lookups beyond clap's: the defaults.
        match Only::try_parse_from(["x"]) {
            Ok(o) => o.d,
            Err(e) => unreachable!("defaults parse: {e}"),
        }
    }

    /// Validates every value; the first invalid one is returned.
    pub fn validate(&self) -> Result<Defaults, ConfigError> {
        let d = Defaults {
            proxy_image: check(
                "proxy-image",
                "TRACECAR_PROXY_IMAGE",
                &self.proxy_image,
                ann::parse_image,
            )?,
            init_image: check(
                "init-image",
                "TRACECAR_INIT_IMAGE",
                &self.init_image,
                ann::parse_image,
            )?,
            collector_endpoint: check(
                "collector-endpoint",
                "TRACECAR_COLLECTOR_ENDPOINT",
                &self.collector_endpoint,
                ann::parse_endpoint,
            )?,
            collector_protocol: check(
                "collector-protocol",
                "TRACECAR_COLLECTOR_PROTOCOL",
                &self.collector_protocol,
                ann::parse_protocol,
            )?,
            collector_tls_secret: check(
                "collector-tls-secret",
                "TRACECAR_COLLECTOR_TLS_SECRET",
                &self.collector_tls_secret,
                ann::parse_secret_name,
            )?,
            propagators: check(
                "propagators",
                "TRACECAR_PROPAGATORS",
                &self.propagators,
                ann::parse_propagators,
            )?,
            sampling_ratio: check(
                "sampling-ratio",
                "TRACECAR_SAMPLING_RATIO",
                &self.sampling_ratio,
                ann::parse_sampling_ratio,
            )?,
            sidecar_mode: check(
                "sidecar-mode",
                "TRACECAR_SIDECAR_MODE",
                &self.sidecar_mode,
                ann::parse_sidecar_mode,
            )?,
            capture: check(
                "capture",
                "TRACECAR_CAPTURE",
                &self.capture,
                ann::parse_capture,
            )?,
            skip_inbound_ports: check(
                "skip-inbound-ports",
                "TRACECAR_SKIP_INBOUND_PORTS",
                &self.skip_inbound_ports,
                ann::parse_ports,
            )?,
            skip_outbound_ports: check(
                "skip-outbound-ports",
                "TRACECAR_SKIP_OUTBOUND_PORTS",
                &self.skip_outbound_ports,
                ann::parse_ports,
            )?,
            skip_outbound_cidrs: check(
                "skip-outbound-cidrs",
                "TRACECAR_SKIP_OUTBOUND_CIDRS",
                &self.skip_outbound_cidrs,
                ann::parse_cidrs,
            )?,
            correlation: check(
                "correlation",
                "TRACECAR_CORRELATION",
                &self.correlation,
                ann::parse_correlation,
            )?,
            log_level: check(
                "log-level",
                "TRACECAR_PROXY_LOG_LEVEL",
                &self.log_level,
                ann::parse_log_level,
            )?,
            cpu_request: check(
                "proxy-cpu-request",
                "TRACECAR_PROXY_CPU_REQUEST",
                &self.proxy_cpu_request,
                ann::parse_quantity,
            )?,
            cpu_limit: check(
                "proxy-cpu-limit",
                "TRACECAR_PROXY_CPU_LIMIT",
                &self.proxy_cpu_limit,
                ann::parse_quantity,
            )?,
            memory_request: check(
                "proxy-memory-request",
                "TRACECAR_PROXY_MEMORY_REQUEST",
                &self.proxy_memory_request,
                ann::parse_quantity,
            )?,
            memory_limit: check(
                "proxy-memory-limit",
                "TRACECAR_PROXY_MEMORY_LIMIT",
                &self.proxy_memory_limit,
                ann::parse_quantity,
            )?,
            cluster_domain: check(
                "cluster-domain",
                "TRACECAR_CLUSTER_DOMAIN",
                &self.cluster_domain,
                ann::parse_domain,
            )?,
            inject_by_default: true,
        };
        for (req, lim, flag, env) in [
            (
                &d.cpu_request,
                &d.cpu_limit,
                "proxy-cpu-limit",
                "TRACECAR_PROXY_CPU_LIMIT",
            ),
            (
                &d.memory_request,
                &d.memory_limit,
                "proxy-memory-limit",
                "TRACECAR_PROXY_MEMORY_LIMIT",
            ),
        ] {
            if let (Some(r), Some(l)) = (req, lim) {
                if r.value > l.value {
                    return Err(ConfigError {
                        flag,
                        env,
                        value: l.text.clone(),
                        accepted: "a limit not below the matching request",
                    });
                }
            }
        }
        Ok(d)
    }
}

/// The validated `serve` settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub tls_reload_interval: Duration,
    pub worker_threads: Option<usize>,
    pub shutdown_timeout: Duration,
    pub defaults: Defaults,
}

impl ServeArgs {
    pub fn validate(&self) -> Result<ServeConfig, ConfigError> {
        const ADDR: &str = "an address host:port (e.g. 0.0.0.0:8443)";
        const DUR: &str = "a duration such as 2s, 500ms or 1m";
        let addr = |s: &str| s.trim().parse::<SocketAddr>().map_err(|_| ADDR);
        let workers = |s: &str| match s.trim().parse::<usize>() {
            Ok(n) if (1..=1024).contains(&n) => Ok(n),
            _ => Err("a number of threads from 1 to 1024"),
        };
        Ok(ServeConfig {
            listen: check("listen", "TRACECAR_INJECTOR_LISTEN", &self.listen, addr)?,
            admin_listen: check(
                "admin-listen",
                "TRACECAR_INJECTOR_ADMIN_LISTEN",
                &self.admin_listen,
                addr,
            )?,
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            tls_reload_interval: check(
                "tls-reload-interval",
                "TRACECAR_INJECTOR_TLS_RELOAD_INTERVAL",
                &self.tls_reload_interval,
                |s| parse_duration(s).filter(|d| !d.is_zero()).ok_or(DUR),
            )?,
            worker_threads: match &self.worker_threads {
                Some(w) => Some(check(
                    "worker-threads",
                    "TRACECAR_INJECTOR_WORKER_THREADS",
                    w,
                    workers,
                )?),
                None => None,
            },
            shutdown_timeout: check(
                "shutdown-timeout",
                "TRACECAR_INJECTOR_SHUTDOWN_TIMEOUT",
                &self.shutdown_timeout,
                |s| parse_duration(s).ok_or(DUR),
            )?,
            defaults: self.defaults.validate()?,
        })
    }
}

/// Durations as the proxy reads them (`10s`, `500ms`, `2m`, `1.5s`, or bare seconds): one
/// parser for both.
pub use tracecar_values::parse_duration;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_defaults_are_valid() {
        let d = DefaultsArgs::parse_from_defaults().validate().unwrap();
        assert_eq!(d.propagators, "tracecontext,baggage");
        assert_eq!(d.correlation, "causal", "the proxy's default policy");
        assert_eq!(d.memory_limit.unwrap().text, "64Mi");
        assert!(d.cpu_limit.is_none());
    }

    #[test]
    fn error_names_flag_env_value_and_accepted() {
        let mut a = DefaultsArgs::parse_from_defaults();
        a.capture = "ebpf".into();
        let e = a.validate().unwrap_err().to_string();
        assert_eq!(
            e,
            "invalid value \"ebpf\" for --capture (env TRACECAR_CAPTURE): expected iptables, http-proxy"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("150ms"), Some(Duration::from_millis(150)));
        assert_eq!(
            parse_duration("2"),
            Some(Duration::from_secs(2)),
            "as the proxy reads it"
        );
        assert_eq!(parse_duration("s"), None);
    }
}
