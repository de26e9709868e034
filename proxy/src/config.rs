//! All of the proxy's settings, parsed and validated in one place.
//!
//! Every setting is a CLI flag with an environment-variable fallback (the flag wins). The raw
//! strings from clap are turned into a typed [`Config`] here; nothing deeper reads the
//! environment. A bad value yields a [`ConfigError`] that names the variable, the value and what
//! is accepted.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;

/// A setting that could not be accepted.
#[derive(Debug, thiserror::Error)]
#[error("invalid {var} (--{flag}) value {value:?}: expected {expected}")]
pub struct ConfigError {
    pub var: &'static str,
    pub flag: &'static str,
    pub value: String,
    pub expected: String,
}

/// Flags of `tracecar-proxy run`, each with its environment variable.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Listener for traffic to the app.
    #[arg(long, env = "TRACECAR_INBOUND_LISTEN", default_value = "0.0.0.0:15143")]
    pub inbound_listen: String,
    /// Listener for the app's outgoing traffic.
    #[arg(
        long,
        env = "TRACECAR_OUTBOUND_LISTEN",
        default_value = "127.0.0.1:15140"
    )]
    pub outbound_listen: String,
    /// Listener for /live, /ready and /metrics.
    #[arg(long, env = "TRACECAR_ADMIN_LISTEN", default_value = "0.0.0.0:15190")]
    pub admin_listen: String,
    /// Where inbound traffic goes when it was not redirected by iptables, e.g. 127.0.0.1:8080.
    #[arg(long, env = "TRACECAR_INBOUND_TARGET")]
    pub inbound_target: Option<String>,
    /// How outbound requests without trace context are tied to inbound ones: causal, inflight,
    /// off.
    #[arg(long, env = "TRACECAR_CORRELATION", default_value = "causal")]
    pub correlation: String,
    /// The shared-memory table the preload library writes (`causal`): created at start-up when
    /// its directory exists (the injector mounts one); without it, correlation falls back.
    #[arg(
        long,
        env = "TRACECAR_CAUSAL_TABLE",
        default_value = "/var/run/tracecar/causal"
    )]
    pub causal_table: String,
    /// The preload library in the proxy's image, copied next to the table at start-up so the
    /// app's containers can load it from the shared volume.
    #[arg(
        long,
        env = "TRACECAR_PRELOAD_SOURCE",
        default_value = "/usr/lib/tracecar/libtracecar_preload.so"
    )]
    pub preload_source: String,
    /// Log filter (tracing-subscriber EnvFilter syntax).
    #[arg(long, env = "TRACECAR_LOG", default_value = "info")]
    pub log: String,
    /// How long in-flight requests may take to finish on shutdown (e.g. 10s, 500ms).
    #[arg(long, env = "TRACECAR_DRAIN_TIMEOUT", default_value = "10s")]
    pub drain_timeout: String,
    /// How long a captured connection may stay silent before it is forwarded opaquely.
    #[arg(long, env = "TRACECAR_DETECT_TIMEOUT", default_value = "1s")]
    pub detect_timeout: String,
    /// Data-plane workers, each one thread with its own single-threaded runtime and listeners
    /// (SO_REUSEPORT): a number, or `auto` (the CPUs the proxy may use, at most 2: a sidecar
    /// should stay small; raise it for very busy pods). `TOKIO_WORKER_THREADS` is honoured when
    /// this is `auto`.
    #[arg(long, env = "TRACECAR_WORKER_THREADS", default_value = "auto")]
    pub worker_threads: String,
    /// How long a client may take to send a whole request head, from the connection's start or
    /// from a head's first byte (nginx's `client_header_timeout`).
    #[arg(long, env = "TRACECAR_REQUEST_HEAD_TIMEOUT", default_value = "60s")]
    pub request_head_timeout: String,
    /// How long a client connection may sit idle between requests (nginx's
    /// `keepalive_timeout`).
    #[arg(long, env = "TRACECAR_IDLE_TIMEOUT", default_value = "75s")]
    pub idle_timeout: String,
    /// How long the app may take to start its response once it has the request (nginx's
    /// `proxy_read_timeout`); the client then gets 504. `0` turns it off.
    #[arg(long, env = "TRACECAR_RESPONSE_HEAD_TIMEOUT", default_value = "60s")]
    pub response_head_timeout: String,
    /// How long a body (either way) or a tunnel may go without a byte before the exchange is
    /// ended (Envoy's `stream_idle_timeout`).
    #[arg(long, env = "TRACECAR_STREAM_IDLE_TIMEOUT", default_value = "5m")]
    pub stream_idle_timeout: String,
    /// How long connecting to the app or a peer may take before the client gets 502.
    #[arg(long, env = "TRACECAR_CONNECT_TIMEOUT", default_value = "5s")]
    pub connect_timeout: String,
    /// Client connections open at once on each listener; more are accepted and closed at once
    /// (shed) and counted.
    #[arg(long, env = "TRACECAR_MAX_CONNECTIONS", default_value = "10000")]
    pub max_connections: String,
    /// Serve plain HTTP/1.1 on the lean path (true) or every request with hyper (false; for
    /// comparing the two paths).
    #[arg(long, env = "TRACECAR_HTTP1_LEAN", default_value = "true")]
    pub http1_lean: String,
    /// Also trace the kubelet's probes (requests from `kube-probe/*`); off, they are only proxied.
    #[arg(long, env = "TRACECAR_TRACE_PROBES", default_value = "false")]
    pub trace_probes: String,

    #[arg(long, env = "OTEL_SERVICE_NAME")]
    pub service_name: Option<String>,
    #[arg(long, env = "OTEL_RESOURCE_ATTRIBUTES")]
    pub resource_attributes: Option<String>,
    #[arg(
        long = "traces-exporter",
        env = "OTEL_TRACES_EXPORTER",
        default_value = "otlp"
    )]
    pub traces_exporter: String,
    #[arg(long = "otlp-endpoint", env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    #[arg(
        long = "otlp-traces-endpoint",
        env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    )]
    pub otlp_traces_endpoint: Option<String>,
    #[arg(
        long = "otlp-protocol",
        env = "OTEL_EXPORTER_OTLP_PROTOCOL",
        default_value = "grpc"
    )]
    pub otlp_protocol: String,
    #[arg(long = "otlp-headers", env = "OTEL_EXPORTER_OTLP_HEADERS")]
    pub otlp_headers: Option<String>,
    /// Export timeout in milliseconds.
    #[arg(
        long = "otlp-timeout",
        env = "OTEL_EXPORTER_OTLP_TIMEOUT",
        default_value = "10000"
    )]
    pub otlp_timeout: String,
    #[arg(long = "otlp-certificate", env = "OTEL_EXPORTER_OTLP_CERTIFICATE")]
    pub otlp_certificate: Option<String>,
    #[arg(
        long = "otlp-client-certificate",
        env = "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"
    )]
    pub otlp_client_certificate: Option<String>,
    #[arg(long = "otlp-client-key", env = "OTEL_EXPORTER_OTLP_CLIENT_KEY")]
    pub otlp_client_key: Option<String>,
    /// Overrides the name checked in the collector's certificate.
    #[arg(long, env = "TRACECAR_EXPORT_TLS_SERVER_NAME")]
    pub export_tls_server_name: Option<String>,
    /// Whether unusable export TLS material stops start-up (true) or only disables export.
    #[arg(long, env = "TRACECAR_EXPORT_REQUIRED", default_value = "true")]
    pub export_required: String,
    #[arg(
        long = "sampler",
        env = "OTEL_TRACES_SAMPLER",
        default_value = "parentbased_always_on"
    )]
    pub sampler: String,
    #[arg(long = "sampler-arg", env = "OTEL_TRACES_SAMPLER_ARG")]
    pub sampler_arg: Option<String>,
    #[arg(
        long = "propagators",
        env = "OTEL_PROPAGATORS",
        default_value = "tracecontext,baggage"
    )]
    pub propagators: String,
    #[arg(
        long = "bsp-max-queue-size",
        env = "OTEL_BSP_MAX_QUEUE_SIZE",
        default_value = "2048"
    )]
    pub bsp_max_queue_size: String,
    /// Milliseconds between two exports.
    #[arg(
        long = "bsp-schedule-delay",
        env = "OTEL_BSP_SCHEDULE_DELAY",
        default_value = "5000"
    )]
    pub bsp_schedule_delay: String,
    #[arg(
        long = "bsp-max-export-batch-size",
        env = "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
        default_value = "512"
    )]
    pub bsp_max_export_batch_size: String,
    /// Batches exported at the same time (each over its own connection).
    #[arg(
        long = "bsp-max-concurrent-exports",
        env = "OTEL_BSP_MAX_CONCURRENT_EXPORTS",
        default_value = "2"
    )]
    pub bsp_max_concurrent_exports: String,
    /// Milliseconds one export may take.
    #[arg(
        long = "bsp-export-timeout",
        env = "OTEL_BSP_EXPORT_TIMEOUT",
        default_value = "30000"
    )]
    pub bsp_export_timeout: String,

    #[arg(long, env = "TRACECAR_POD_NAME")]
    pub pod_name: Option<String>,
    #[arg(long, env = "TRACECAR_POD_UID")]
    pub pod_uid: Option<String>,
    #[arg(long, env = "TRACECAR_POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
    #[arg(long, env = "TRACECAR_NODE_NAME")]
    pub node_name: Option<String>,
    #[arg(long, env = "TRACECAR_CONTAINER_NAME")]
    pub container_name: Option<String>,
}

/// How outbound requests that carry no trace context are tied to inbound ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Correlation {
    Off,
    /// Parent them only when the cause is certain: the preload library's table, else the only
    /// inbound request in flight; several in flight: a root span linked to them.
    Causal,
    /// Also guess: the newest inbound request still in flight.
    Inflight,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TracesExporter {
    Otlp,
    Console,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

pub use tracecar_values::Propagator;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampler {
    AlwaysOn,
    AlwaysOff,
    TraceIdRatio(f64),
    ParentBasedAlwaysOn,
    ParentBasedAlwaysOff,
    ParentBasedTraceIdRatio(f64),
}

/// Where and how spans are exported over OTLP.
#[derive(Debug, Clone)]
pub struct OtlpConfig {
    pub protocol: OtlpProtocol,
    /// The full URL spans are sent to (for http/protobuf it ends in `/v1/traces`).
    pub endpoint: String,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    pub tls: ExportTls,
    /// `TRACECAR_EXPORT_REQUIRED`: unusable TLS material stops start-up; when false the proxy
    /// serves traffic and reports the export as failing.
    pub required: bool,
}

pub use crate::trace::tls::ExportTls;

/// Batch export settings (`OTEL_BSP_*`).
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    pub max_queue_size: usize,
    pub schedule_delay: Duration,
    pub max_export_batch_size: usize,
    pub max_concurrent_exports: usize,
    pub export_timeout: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_queue_size: 2048,
            schedule_delay: Duration::from_millis(5000),
            max_export_batch_size: 512,
            max_concurrent_exports: 2,
            export_timeout: Duration::from_millis(30000),
        }
    }
}

/// Timeouts and limits that keep one connection from holding the proxy's resources.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub request_head_timeout: Duration,
    pub idle_timeout: Duration,
    /// `None`: off.
    pub response_head_timeout: Option<Duration>,
    pub stream_idle_timeout: Duration,
    pub connect_timeout: Duration,
    /// Per listener, over all workers.
    pub max_connections: usize,
    pub http1_lean: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            request_head_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(75),
            response_head_timeout: Some(Duration::from_secs(60)),
            stream_idle_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(5),
            max_connections: 10_000,
            http1_lean: true,
        }
    }
}

/// The validated configuration of one proxy.
#[derive(Debug, Clone)]
pub struct Config {
    pub inbound_listen: SocketAddr,
    pub outbound_listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// `host:port` that non-redirected inbound connections are sent to.
    pub inbound_target: Option<String>,
    pub correlation: Correlation,
    /// `TRACECAR_CAUSAL_TABLE`; empty: none.
    pub causal_table: std::path::PathBuf,
    /// `TRACECAR_PRELOAD_SOURCE`; empty: none.
    pub preload_source: std::path::PathBuf,
    pub log: String,
    pub drain_timeout: Duration,
    pub detect_timeout: Duration,
    /// `None`: decided at start-up (`auto`).
    pub worker_threads: Option<usize>,
    pub trace_probes: bool,
    pub limits: Limits,
    pub service_name: String,
    /// Resource attributes, in order: OTEL_RESOURCE_ATTRIBUTES, then the pod metadata.
    pub resource: Vec<(String, String)>,
    pub exporter: TracesExporter,
    pub otlp: OtlpConfig,
    pub sampler: Sampler,
    pub propagators: Vec<Propagator>,
    pub batch: BatchConfig,
}

fn err(
    var: &'static str,
    flag: &'static str,
    value: &str,
    expected: impl Into<String>,
) -> ConfigError {
    ConfigError {
        var,
        flag,
        value: value.to_string(),
        expected: expected.into(),
    }
}

fn addr(var: &'static str, flag: &'static str, v: &str) -> Result<SocketAddr, ConfigError> {
    v.parse()
        .map_err(|_| err(var, flag, v, "an IP address and port, e.g. 0.0.0.0:15143"))
}

fn millis(var: &'static str, flag: &'static str, v: &str) -> Result<Duration, ConfigError> {
    v.trim()
        .parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|_| err(var, flag, v, "a whole number of milliseconds"))
}

fn count(var: &'static str, flag: &'static str, v: &str) -> Result<usize, ConfigError> {
    match v.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(err(var, flag, v, "a whole number greater than 0")),
    }
}

#[cfg(test)]
impl Config {
    /// The configuration these flags give (every other setting its default), for tests.
    pub(crate) fn for_test(flags: &[&str]) -> Config {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        let argv = std::iter::once("tracecar-proxy").chain(flags.iter().copied());
        <Cli as clap::Parser>::parse_from(argv)
            .run
            .into_config()
            .expect("test flags are valid")
    }
}

/// A name or address that means this host (loopback or unspecified).
pub fn is_local_host(host: &str) -> bool {
    // A fully qualified name may end in a dot: `localhost.` is localhost.
    let host = host.strip_suffix('.').unwrap_or(host);
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback() || ip.is_unspecified())
}

/// A `TRACECAR_LOG` filter as `EnvFilter` gets it: each comma-separated directive trimmed,
/// empty ones dropped. tracing-subscriber 0.3 walks a directive's trimmed text but slices the
/// untrimmed one, so a directive with leading blanks is misread, and panics when the offset
/// lands inside a multi-byte character (` é=x`).
pub fn log_filter(v: &str) -> String {
    v.split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect::<Vec<_>>()
        .join(",")
}

pub use tracecar_values::parse_duration;

fn duration(var: &'static str, flag: &'static str, v: &str) -> Result<Duration, ConfigError> {
    parse_duration(v).ok_or_else(|| err(var, flag, v, "a duration such as 10s, 500ms or 2m"))
}

/// Parses `k=v,k2=v2` (W3C baggage-style, values percent-decoded) as the OTel spec defines for
/// `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_EXPORTER_OTLP_HEADERS`.
pub fn parse_key_values(v: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    for item in v.split(',') {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let (k, val) = item.split_once('=')?;
        let k = k.trim();
        if k.is_empty() {
            return None;
        }
        out.push((k.to_string(), percent_decode(val.trim())?));
    }
    Some(out)
}

fn percent_decode(s: &str) -> Option<String> {
    // percent-encoding passes a malformed escape through as text; the format has none, so a
    // value with one is refused whole (`%+1` must not read as 0x01, nor `%zz` as itself).
    let well_formed = s.split('%').skip(1).all(|after| {
        after
            .as_bytes()
            .get(..2)
            .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    });
    if !well_formed {
        return None;
    }
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(std::borrow::Cow::into_owned)
}

fn ratio(var: &'static str, v: Option<&str>) -> Result<f64, ConfigError> {
    match v {
        None => Ok(1.0),
        Some(s) => match s.trim().parse::<f64>() {
            Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
            _ => Err(err(var, "sampler-arg", s, "a ratio between 0 and 1")),
        },
    }
}

impl RunArgs {
    /// The settings from the environment alone, with every default applied (as `run` would see
    /// them without flags); for callers that start a proxy in-process, such as the demo.
    pub fn from_env() -> RunArgs {
        #[derive(clap::Parser)]
        struct Only {
            #[command(flatten)]
            run: RunArgs,
        }
        <Only as clap::Parser>::parse_from(["tracecar-proxy"]).run
    }

    /// Validates every setting into a [`Config`].
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let inbound_listen = addr(
            "TRACECAR_INBOUND_LISTEN",
            "inbound-listen",
            &self.inbound_listen,
        )?;
        let outbound_listen = addr(
            "TRACECAR_OUTBOUND_LISTEN",
            "outbound-listen",
            &self.outbound_listen,
        )?;
        let admin_listen = addr("TRACECAR_ADMIN_LISTEN", "admin-listen", &self.admin_listen)?;
        let inbound_target = match self.inbound_target.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(t) => {
                let invalid =
                    |expected: &str| err("TRACECAR_INBOUND_TARGET", "inbound-target", t, expected);
                let a = t
                    .parse::<http::uri::Authority>()
                    .ok()
                    .filter(|a| a.port_u16().is_some())
                    .ok_or_else(|| invalid("host:port, e.g. 127.0.0.1:8080"))?;
                // The inbound listener itself as target would forward to itself forever.
                let host = a.host().trim_matches(|c| c == '[' || c == ']');
                let is_listener = a.port_u16() == Some(inbound_listen.port())
                    && (is_local_host(host)
                        || host.parse::<std::net::IpAddr>() == Ok(inbound_listen.ip()));
                if is_listener {
                    return Err(invalid("the app's address, not the inbound listener's own"));
                }
                Some(a.to_string())
            }
        };
        let correlation = match self.correlation.trim() {
            "causal" => Correlation::Causal,
            "inflight" => Correlation::Inflight,
            "off" => Correlation::Off,
            v => {
                return Err(err(
                    "TRACECAR_CORRELATION",
                    "correlation",
                    v,
                    "causal, inflight or off",
                ))
            }
        };
        let log = log_filter(&self.log);
        if tracing_subscriber::EnvFilter::try_new(&log).is_err() {
            return Err(err(
                "TRACECAR_LOG",
                "log",
                &self.log,
                "a log level (trace, debug, info, warn, error) or an EnvFilter directive",
            ));
        }
        let drain_timeout = duration(
            "TRACECAR_DRAIN_TIMEOUT",
            "drain-timeout",
            &self.drain_timeout,
        )?;
        let worker_threads = match self.worker_threads.trim() {
            "auto" | "" => None,
            v => Some(
                count("TRACECAR_WORKER_THREADS", "worker-threads", v).map_err(|mut e| {
                    e.expected = "auto or a whole number greater than 0".into();
                    e
                })?,
            ),
        };
        let trace_probes = match self.trace_probes.trim() {
            "true" => true,
            "false" | "" => false,
            v => {
                return Err(err(
                    "TRACECAR_TRACE_PROBES",
                    "trace-probes",
                    v,
                    "true or false",
                ))
            }
        };
        let detect_timeout = duration(
            "TRACECAR_DETECT_TIMEOUT",
            "detect-timeout",
            &self.detect_timeout,
        )?;
        let positive = |var, flag, v: &str| {
            duration(var, flag, v).and_then(|d| {
                if d.is_zero() {
                    Err(err(
                        var,
                        flag,
                        v,
                        "a duration greater than 0, such as 10s or 500ms",
                    ))
                } else {
                    Ok(d)
                }
            })
        };
        let response_head_timeout = duration(
            "TRACECAR_RESPONSE_HEAD_TIMEOUT",
            "response-head-timeout",
            &self.response_head_timeout,
        )?;
        let limits = Limits {
            request_head_timeout: positive(
                "TRACECAR_REQUEST_HEAD_TIMEOUT",
                "request-head-timeout",
                &self.request_head_timeout,
            )?,
            idle_timeout: positive("TRACECAR_IDLE_TIMEOUT", "idle-timeout", &self.idle_timeout)?,
            response_head_timeout: (!response_head_timeout.is_zero())
                .then_some(response_head_timeout),
            stream_idle_timeout: positive(
                "TRACECAR_STREAM_IDLE_TIMEOUT",
                "stream-idle-timeout",
                &self.stream_idle_timeout,
            )?,
            connect_timeout: positive(
                "TRACECAR_CONNECT_TIMEOUT",
                "connect-timeout",
                &self.connect_timeout,
            )?,
            max_connections: count(
                "TRACECAR_MAX_CONNECTIONS",
                "max-connections",
                &self.max_connections,
            )?,
            http1_lean: match self.http1_lean.trim() {
                "true" | "" => true,
                "false" => false,
                v => return Err(err("TRACECAR_HTTP1_LEAN", "http1-lean", v, "true or false")),
            },
        };

        let mut resource = match self.resource_attributes.as_deref() {
            None => Vec::new(),
            Some(v) => parse_key_values(v).ok_or_else(|| {
                err(
                    "OTEL_RESOURCE_ATTRIBUTES",
                    "resource-attributes",
                    v,
                    "comma-separated key=value pairs",
                )
            })?,
        };
        let pod = [
            ("k8s.pod.name", &self.pod_name),
            ("k8s.pod.uid", &self.pod_uid),
            ("k8s.namespace.name", &self.pod_namespace),
            ("k8s.node.name", &self.node_name),
            ("k8s.container.name", &self.container_name),
        ];
        for (key, value) in pod {
            if let Some(v) = value.as_deref().filter(|v| !v.is_empty()) {
                resource.retain(|(k, _)| k != key);
                resource.push((key.to_string(), v.to_string()));
            }
        }
        let service_name = self
            .service_name
            .filter(|s| !s.trim().is_empty())
            .or_else(|| {
                resource
                    .iter()
                    .find(|(k, _)| k == "service.name")
                    .map(|(_, v)| v.clone())
            })
            .unwrap_or_else(|| "unknown_service:tracecar-proxy".to_string());
        resource.retain(|(k, _)| k != "service.name");

        let exporter = match self.traces_exporter.trim() {
            "otlp" => TracesExporter::Otlp,
            "console" => TracesExporter::Console,
            "none" => TracesExporter::None,
            v => {
                return Err(err(
                    "OTEL_TRACES_EXPORTER",
                    "traces-exporter",
                    v,
                    "otlp, console or none",
                ))
            }
        };
        let protocol = match self.otlp_protocol.trim() {
            "grpc" => OtlpProtocol::Grpc,
            "http/protobuf" => OtlpProtocol::HttpProtobuf,
            v => {
                return Err(err(
                    "OTEL_EXPORTER_OTLP_PROTOCOL",
                    "otlp-protocol",
                    v,
                    "grpc or http/protobuf",
                ))
            }
        };
        let endpoint = otlp_endpoint(
            protocol,
            self.otlp_endpoint.as_deref(),
            self.otlp_traces_endpoint.as_deref(),
        )?;
        let headers = match self.otlp_headers.as_deref() {
            None => Vec::new(),
            Some(v) => parse_key_values(v).ok_or_else(|| {
                err(
                    "OTEL_EXPORTER_OTLP_HEADERS",
                    "otlp-headers",
                    v,
                    "comma-separated key=value pairs",
                )
            })?,
        };
        let timeout = millis(
            "OTEL_EXPORTER_OTLP_TIMEOUT",
            "otlp-timeout",
            &self.otlp_timeout,
        )?;
        let tls = ExportTls {
            ca_file: self.otlp_certificate.filter(|s| !s.is_empty()),
            client_cert_file: self.otlp_client_certificate.filter(|s| !s.is_empty()),
            client_key_file: self.otlp_client_key.filter(|s| !s.is_empty()),
            server_name: self.export_tls_server_name.filter(|s| !s.is_empty()),
        };
        if tls.client_cert_file.is_some() != tls.client_key_file.is_some() {
            let (var, flag, value) = match &tls.client_cert_file {
                Some(c) => (
                    "OTEL_EXPORTER_OTLP_CLIENT_KEY",
                    "otlp-client-key",
                    c.clone(),
                ),
                None => (
                    "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
                    "otlp-client-certificate",
                    tls.client_key_file.clone().unwrap_or_default(),
                ),
            };
            return Err(ConfigError {
                var,
                flag,
                value: String::new(),
                expected: format!(
                    "a file path, set together with the other half of the pair ({value})"
                ),
            });
        }

        let required = match self.export_required.trim() {
            "true" => true,
            "false" => false,
            v => {
                return Err(err(
                    "TRACECAR_EXPORT_REQUIRED",
                    "export-required",
                    v,
                    "true or false",
                ))
            }
        };
        let any_tls_file = tls.ca_file.is_some() || tls.client_cert_file.is_some();
        if required && exporter == TracesExporter::Otlp && any_tls_file {
            if let Err(e) = crate::trace::tls::check(&tls) {
                let (var, flag, value, expected) = e.setting();
                return Err(ConfigError {
                    var,
                    flag,
                    value,
                    expected,
                });
            }
        }

        let arg = self.sampler_arg.as_deref();
        let sampler = match self.sampler.trim() {
            "always_on" => Sampler::AlwaysOn,
            "always_off" => Sampler::AlwaysOff,
            "traceidratio" => Sampler::TraceIdRatio(ratio("OTEL_TRACES_SAMPLER_ARG", arg)?),
            "parentbased_always_on" => Sampler::ParentBasedAlwaysOn,
            "parentbased_always_off" => Sampler::ParentBasedAlwaysOff,
            "parentbased_traceidratio" => {
                Sampler::ParentBasedTraceIdRatio(ratio("OTEL_TRACES_SAMPLER_ARG", arg)?)
            }
            v => {
                return Err(err(
                    "OTEL_TRACES_SAMPLER",
                    "sampler",
                    v,
                    "always_on, always_off, traceidratio, parentbased_always_on, \
                     parentbased_always_off or parentbased_traceidratio",
                ))
            }
        };
        let propagators =
            tracecar_values::parse_propagators(&self.propagators).ok_or_else(|| {
                err(
                    "OTEL_PROPAGATORS",
                    "propagators",
                    &self.propagators,
                    "a comma-separated list of tracecontext, baggage, b3, b3multi, jaeger, none",
                )
            })?;
        let batch = BatchConfig {
            max_queue_size: count(
                "OTEL_BSP_MAX_QUEUE_SIZE",
                "bsp-max-queue-size",
                &self.bsp_max_queue_size,
            )?,
            schedule_delay: millis(
                "OTEL_BSP_SCHEDULE_DELAY",
                "bsp-schedule-delay",
                &self.bsp_schedule_delay,
            )?,
            max_export_batch_size: count(
                "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
                "bsp-max-export-batch-size",
                &self.bsp_max_export_batch_size,
            )?,
            max_concurrent_exports: count(
                "OTEL_BSP_MAX_CONCURRENT_EXPORTS",
                "bsp-max-concurrent-exports",
                &self.bsp_max_concurrent_exports,
            )?,
            export_timeout: millis(
                "OTEL_BSP_EXPORT_TIMEOUT",
                "bsp-export-timeout",
                &self.bsp_export_timeout,
            )?,
        };

        Ok(Config {
            inbound_listen,
            outbound_listen,
            admin_listen,
            inbound_target,
            correlation,
            causal_table: self.causal_table.trim().into(),
            preload_source: self.preload_source.trim().into(),
            log,
            drain_timeout,
            detect_timeout,
            worker_threads,
            trace_probes,
            limits,
            service_name,
            resource,
            exporter,
            otlp: OtlpConfig {
                protocol,
                endpoint,
                headers,
                timeout,
                tls,
                required,
            },
            sampler,
            propagators,
            batch,
        })
    }
}

/// The OTLP URL per the exporter spec: the signal-specific variable is used as is, the generic one
/// gets `/v1/traces` appended for http/protobuf.
fn otlp_endpoint(
    protocol: OtlpProtocol,
    generic: Option<&str>,
    traces: Option<&str>,
) -> Result<String, ConfigError> {
    let (var, flag, raw, append) = match (
        traces.filter(|s| !s.is_empty()),
        generic.filter(|s| !s.is_empty()),
    ) {
        (Some(t), _) => (
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "otlp-traces-endpoint",
            t.to_string(),
            false,
        ),
        (None, Some(g)) => (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "otlp-endpoint",
            g.to_string(),
            true,
        ),
        (None, None) => {
            let d = match protocol {
                OtlpProtocol::Grpc => "http://localhost:4317",
                OtlpProtocol::HttpProtobuf => "http://localhost:4318",
            };
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "otlp-endpoint",
                d.to_string(),
                true,
            )
        }
    };
    let uri: http::Uri = raw
        .parse()
        .map_err(|_| err(var, flag, &raw, "an http:// or https:// URL"))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http" | "https"), Some(_)) => {}
        _ => return Err(err(var, flag, &raw, "an http:// or https:// URL")),
    }
    Ok(match protocol {
        OtlpProtocol::HttpProtobuf if append => {
            // The signal path goes at the end of the path: before a query, and a fragment
            // (meaningless in a request) is dropped. (`find` gives a char boundary.)
            let (base, rest) = raw.split_at(raw.find(['?', '#']).unwrap_or(raw.len()));
            let query = rest.split('#').next().unwrap_or_default();
            format!("{}/v1/traces{query}", base.trim_end_matches('/'))
        }
        _ => raw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut v = vec!["t"];
        v.extend_from_slice(args);
        T::try_parse_from(v).expect("clap").run.into_config()
    }

    #[test]
    fn defaults_follow_the_spec() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.inbound_listen.to_string(), "0.0.0.0:15143");
        assert_eq!(c.outbound_listen.to_string(), "127.0.0.1:15140");
        assert_eq!(c.admin_listen.to_string(), "0.0.0.0:15190");
        assert_eq!(c.correlation, Correlation::Causal);
        assert_eq!(
            c.propagators,
            vec![Propagator::TraceContext, Propagator::Baggage]
        );
        assert_eq!(c.sampler, Sampler::ParentBasedAlwaysOn);
        assert_eq!(c.drain_timeout, Duration::from_secs(10));
        assert_eq!(c.otlp.endpoint, "http://localhost:4317");
    }

    #[test]
    fn errors_name_variable_value_and_choices() {
        // An inbound target that is the inbound listener itself would loop forever.
        assert!(parse(&["--inbound-target", "127.0.0.1:15143"]).is_err());
        assert!(parse(&["--inbound-target", "localhost:15143"]).is_err());
        assert!(parse(&["--inbound-target", "127.0.0.1:8080"]).is_ok());
        assert!(parse(&["--worker-threads", "0"]).is_err());
        assert_eq!(
            parse(&["--worker-threads", "3"]).unwrap().worker_threads,
            Some(3)
        );
        assert_eq!(parse(&[]).unwrap().worker_threads, None);
        let e = parse(&["--correlation", "sometimes"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("TRACECAR_CORRELATION")
                && e.contains("sometimes")
                && e.contains("causal, inflight or off"),
            "{e}"
        );
        let e = parse(&["--sampler", "traceidratio", "--sampler-arg", "1.5"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("OTEL_TRACES_SAMPLER_ARG") && e.contains("1.5"),
            "{e}"
        );
        let e = parse(&["--propagators", "tracecontext,xray"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("OTEL_PROPAGATORS"), "{e}");
        assert!(parse(&["--inbound-listen", "nope"]).is_err());
        assert!(parse(&["--otlp-endpoint", "localhost"]).is_err());
        assert!(parse(&["--bsp-max-queue-size", "0"]).is_err());
        assert!(parse(&["--drain-timeout", "soon"]).is_err());
    }

    #[test]
    fn http_endpoint_gets_signal_path() {
        let c = parse(&[
            "--otlp-protocol",
            "http/protobuf",
            "--otlp-endpoint",
            "http://c:4318/",
        ])
        .unwrap();
        assert_eq!(c.otlp.endpoint, "http://c:4318/v1/traces");
        let c = parse(&[
            "--otlp-protocol",
            "http/protobuf",
            "--otlp-traces-endpoint",
            "http://c/x",
        ])
        .unwrap();
        assert_eq!(c.otlp.endpoint, "http://c/x");
        // Found by fuzz_otlp_endpoint: the path was appended after a query or a fragment.
        for (base, want) in [
            ("http://c:4318/?k=v", "http://c:4318/v1/traces?k=v"),
            ("http://c:4318/otlp#x", "http://c:4318/otlp/v1/traces"),
            ("http://c?q#f", "http://c/v1/traces?q"),
        ] {
            let c = parse(&["--otlp-protocol", "http/protobuf", "--otlp-endpoint", base]).unwrap();
            assert_eq!(c.otlp.endpoint, want);
        }
    }

    #[test]
    fn resource_merges_env_and_pod_metadata() {
        let c = parse(&[
            "--resource-attributes",
            "service.name=checkout,k8s.deployment.name=web,team=a%2Cb",
            "--pod-name",
            "web-1",
        ])
        .unwrap();
        assert_eq!(c.service_name, "checkout");
        assert!(c.resource.contains(&("team".into(), "a,b".into())));
        assert!(c
            .resource
            .contains(&("k8s.pod.name".into(), "web-1".into())));
        let c = parse(&[
            "--service-name",
            "svc",
            "--resource-attributes",
            "service.name=x",
        ])
        .unwrap();
        assert_eq!(c.service_name, "svc");
    }

    #[test]
    fn log_filters_with_blanks_are_read_as_written() {
        // Found by fuzz_all_settings_at_once: tracing-subscriber panicked on a directive with a
        // leading blank and a multi-byte character (it slices the untrimmed text).
        for v in [" é=x", "info, \u{e9}\u{e9}[{a=1}]=debug", " \t\u{1F600}"] {
            let _ = parse(&["--log", v]);
        }
        let c = parse(&["--log", " warn , tracecar_proxy=debug,"]).unwrap();
        assert_eq!(c.log, "warn,tracecar_proxy=debug");
    }

    #[test]
    fn percent_escapes_are_two_hex_digits() {
        // Found by fuzz_parse_key_values_arbitrary: `%+1` was decoded as 0x01.
        for bad in ["k=%+1", "k=%-1", "k=%1", "k=%", "k=%zz", "k=%\u{e9}"] {
            assert_eq!(parse_key_values(bad), None, "{bad:?}");
        }
        assert_eq!(
            parse_key_values("k=%41%c3%a9"),
            Some(vec![("k".into(), "A\u{e9}".into())])
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_duration("-1s"), None);
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration(".5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("0.0000000001s"), Some(Duration::ZERO));
        for bad in ["", ".", "1.2.3s", "1e3s", "inf", "NaN", "5 s", "5sm", "5h"] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
        // Too large for a Duration: refused, not a panic.
        assert_eq!(parse_duration("18446744073709551616"), None);
        assert_eq!(parse_duration("307445734561825861m"), None);
        assert_eq!(parse_duration(&"9".repeat(400)), None);
        // Near `Duration::MAX` a timeout added to now would overflow: over 100 years, refused.
        assert_eq!(parse_duration("18446744073709551615.999999999"), None);
        assert!(parse(&["--stream-idle-timeout", "18446744073709551615"]).is_err());
        // Found by fuzz_parse_duration_round_trip: milliseconds went through f64 and came back
        // as 9536927.129000001s.
        assert_eq!(
            parse_duration("9536927129ms"),
            Some(Duration::from_millis(9_536_927_129))
        );
    }

    /// Property tests: every setting fed arbitrary and mutated values.
    mod fuzz {
        use super::*;
        use crate::fuzzing::{self, mutate_str, mutations, text};
        use clap::CommandFactory;
        use proptest::prelude::*;

        type Set = fn(&mut RunArgs, String);

        /// One setting: its variable, how to set it, and values it accepts.
        struct Field {
            var: &'static str,
            set: Set,
            valid: &'static [&'static str],
        }

        macro_rules! field {
            ($var:literal, $f:ident, [$($v:literal),*]) => {
                Field { var: $var, set: |a, v| a.$f = v.into(), valid: &[$($v),*] }
            };
        }

        /// Every setting of `run`; `every_setting_is_fuzzed` keeps the list complete.
        fn fields() -> Vec<Field> {
            vec![
                field!(
                    "TRACECAR_INBOUND_LISTEN",
                    inbound_listen,
                    ["0.0.0.0:15143", "[::]:80"]
                ),
                field!(
                    "TRACECAR_OUTBOUND_LISTEN",
                    outbound_listen,
                    ["127.0.0.1:15140"]
                ),
                field!("TRACECAR_ADMIN_LISTEN", admin_listen, ["[::1]:15190"]),
                field!(
                    "TRACECAR_INBOUND_TARGET",
                    inbound_target,
                    ["127.0.0.1:8080", "app:80"]
                ),
                field!(
                    "TRACECAR_CORRELATION",
                    correlation,
                    ["causal", "inflight", "off"]
                ),
                field!(
                    "TRACECAR_CAUSAL_TABLE",
                    causal_table,
                    ["/var/run/tracecar/causal", ""]
                ),
                field!(
                    "TRACECAR_PRELOAD_SOURCE",
                    preload_source,
                    ["/usr/lib/tracecar/libtracecar_preload.so"]
                ),
                field!("TRACECAR_LOG", log, ["info", "tracecar_proxy=debug,warn"]),
                field!(
                    "TRACECAR_DRAIN_TIMEOUT",
                    drain_timeout,
                    ["10s", "500ms", "2m", "1.5"]
                ),
                field!("TRACECAR_DETECT_TIMEOUT", detect_timeout, ["1s"]),
                field!("TRACECAR_WORKER_THREADS", worker_threads, ["auto", "2"]),
                field!(
                    "TRACECAR_REQUEST_HEAD_TIMEOUT",
                    request_head_timeout,
                    ["60s"]
                ),
                field!("TRACECAR_IDLE_TIMEOUT", idle_timeout, ["75s"]),
                field!(
                    "TRACECAR_RESPONSE_HEAD_TIMEOUT",
                    response_head_timeout,
                    ["0", "60s"]
                ),
                field!("TRACECAR_STREAM_IDLE_TIMEOUT", stream_idle_timeout, ["5m"]),
                field!("TRACECAR_CONNECT_TIMEOUT", connect_timeout, ["250ms"]),
                field!("TRACECAR_MAX_CONNECTIONS", max_connections, ["10000"]),
                field!("TRACECAR_HTTP1_LEAN", http1_lean, ["true", "false"]),
                field!("TRACECAR_TRACE_PROBES", trace_probes, ["true", "false"]),
                field!("OTEL_SERVICE_NAME", service_name, ["checkout"]),
                field!(
                    "OTEL_RESOURCE_ATTRIBUTES",
                    resource_attributes,
                    ["a=b,team=x%2Cy"]
                ),
                field!(
                    "OTEL_TRACES_EXPORTER",
                    traces_exporter,
                    ["otlp", "console", "none"]
                ),
                field!(
                    "OTEL_EXPORTER_OTLP_ENDPOINT",
                    otlp_endpoint,
                    ["https://c:4317"]
                ),
                field!(
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    otlp_traces_endpoint,
                    ["http://c:4318/v1/traces"]
                ),
                field!(
                    "OTEL_EXPORTER_OTLP_PROTOCOL",
                    otlp_protocol,
                    ["grpc", "http/protobuf"]
                ),
                field!(
                    "OTEL_EXPORTER_OTLP_HEADERS",
                    otlp_headers,
                    ["api-key=s%3Dcret"]
                ),
                field!("OTEL_EXPORTER_OTLP_TIMEOUT", otlp_timeout, ["10000"]),
                field!("OTEL_EXPORTER_OTLP_CERTIFICATE", otlp_certificate, [""]),
                field!(
                    "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
                    otlp_client_certificate,
                    [""]
                ),
                field!("OTEL_EXPORTER_OTLP_CLIENT_KEY", otlp_client_key, [""]),
                field!(
                    "TRACECAR_EXPORT_TLS_SERVER_NAME",
                    export_tls_server_name,
                    ["c.svc"]
                ),
                field!(
                    "TRACECAR_EXPORT_REQUIRED",
                    export_required,
                    ["true", "false"]
                ),
                field!(
                    "OTEL_TRACES_SAMPLER",
                    sampler,
                    ["always_on", "parentbased_traceidratio", "always_off"]
                ),
                field!("OTEL_TRACES_SAMPLER_ARG", sampler_arg, ["0.25", "1"]),
                field!(
                    "OTEL_PROPAGATORS",
                    propagators,
                    ["tracecontext,baggage,b3,jaeger", "none"]
                ),
                field!("OTEL_BSP_MAX_QUEUE_SIZE", bsp_max_queue_size, ["2048"]),
                field!("OTEL_BSP_SCHEDULE_DELAY", bsp_schedule_delay, ["5000"]),
                field!(
                    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
                    bsp_max_export_batch_size,
                    ["512"]
                ),
                field!(
                    "OTEL_BSP_MAX_CONCURRENT_EXPORTS",
                    bsp_max_concurrent_exports,
                    ["2"]
                ),
                field!("OTEL_BSP_EXPORT_TIMEOUT", bsp_export_timeout, ["30000"]),
                field!("TRACECAR_POD_NAME", pod_name, ["web-1"]),
                field!("TRACECAR_POD_UID", pod_uid, ["0f0e"]),
                field!("TRACECAR_POD_NAMESPACE", pod_namespace, ["shop"]),
                field!("TRACECAR_NODE_NAME", node_name, ["node-a"]),
                field!("TRACECAR_CONTAINER_NAME", container_name, ["app"]),
            ]
        }

        /// The settings with every default (what `run` sees without flags or variables).
        fn defaults() -> RunArgs {
            T::try_parse_from(["t"]).expect("defaults parse").run
        }

        /// The variables an error about `var`'s value may name: its own, and the other half of
        /// the client certificate/key pair.
        fn may_name(var: &str, named: &str) -> bool {
            const PAIR: [&str; 2] = [
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
                "OTEL_EXPORTER_OTLP_CLIENT_KEY",
            ];
            named == var || (PAIR.contains(&var) && PAIR.contains(&named))
        }

        /// Pieces of valid values that mutations splice in.
        const PIECES: &[&str] = &[
            ",",
            "=",
            "%2C",
            "%",
            "ms",
            "s",
            "m",
            ":",
            "[::1]",
            "http://",
            "https://",
            "/",
            "0",
            "99999999999999999999",
            ".",
            "true",
            "otlp",
            " ",
            "é",
            "\u{0}",
            "?q=1",
            "#f",
        ];

        /// A value for one setting: arbitrary text, or one of its valid values mutated.
        fn value(valid: &'static [&'static str]) -> impl Strategy<Value = String> {
            let mutated = (prop::sample::select(valid), mutations())
                .prop_map(|(v, m)| mutate_str(v, &m, PIECES));
            prop_oneof![
                text(),
                mutated,
                prop::sample::select(valid).prop_map(String::from)
            ]
        }

        #[test]
        fn every_setting_is_fuzzed() {
            let fuzzed: Vec<&str> = fields().iter().map(|f| f.var).collect();
            for arg in T::command().get_arguments() {
                if let Some(env) = arg.get_env() {
                    let env = env.to_str().unwrap_or_default();
                    assert!(fuzzed.contains(&env), "{env} is not in fields()");
                }
            }
        }

        /// Arbitrary values, each named to its setting.
        fn any_settings() -> impl Strategy<Value = Vec<(usize, String)>> {
            let n = fields().len();
            prop::collection::vec((0..n, text()), 1..=n)
        }

        proptest! {
            #![proptest_config(fuzzing::config())]

            /// One setting at a time: never a panic, a valid value is accepted, and an error
            /// names that setting's variable and the value given.
            #[test]
            fn fuzz_each_setting_alone(
                (i, v, valid) in (0..fields().len()).prop_flat_map(|i| {
                    let valid = fields()[i].valid;
                    (Just(i), value(valid), prop::sample::select(valid))
                }),
            ) {
                let field = &fields()[i];
                let mut args = defaults();
                (field.set)(&mut args, valid.to_string());
                if let Err(e) = args.into_config() {
                    prop_assert!(false, "{} refused a valid value: {e}", field.var);
                }
                let mut args = defaults();
                (field.set)(&mut args, v.clone());
                if let Err(e) = args.into_config() {
                    prop_assert!(may_name(field.var, e.var), "{} gave: {e}", field.var);
                    prop_assert!(v.contains(&e.value), "{} gave: {e}", field.var);
                    prop_assert!(e.to_string().contains(e.var));
                }
            }

            /// Every setting at once: never a panic, and an error names a setting that was given.
            #[test]
            fn fuzz_all_settings_at_once(values in any_settings()) {
                let fields = fields();
                let mut args = defaults();
                for (i, v) in &values {
                    (fields[*i].set)(&mut args, v.clone());
                }
                if let Err(e) = args.into_config() {
                    let given: Vec<&str> = values.iter().map(|(i, _)| fields[*i].var).collect();
                    prop_assert!(
                        given.iter().any(|var| may_name(var, e.var)),
                        "{e} names none of {given:?}"
                    );
                }
            }

            #[test]
            fn fuzz_parse_duration_arbitrary(v in value(&["10s", "500ms", "2m", "1.5", "0"])) {
                if let Some(d) = parse_duration(&v) {
                    // Accepted: digits with at most one point, then an accepted unit.
                    let t = v.trim();
                    let num = t.trim_end_matches(['m', 's']);
                    let unit = &t[num.len()..];
                    prop_assert!(["", "s", "ms", "m"].contains(&unit), "{v:?} -> {d:?}");
                    prop_assert!(num.bytes().filter(|&b| b == b'.').count() <= 1, "{v:?}");
                    prop_assert!(num.bytes().any(|b| b.is_ascii_digit()), "{v:?}");
                }
            }

            #[test]
            fn fuzz_parse_duration_round_trip(
                n in prop_oneof![0u64..100_000, 0u64..=(1u64 << 53)],
                unit in prop::sample::select(&["ms", "s", "m", ""][..]),
                pad in prop::sample::select(&["", " ", "\t"][..]),
            ) {
                let want = match unit {
                    "ms" => Some(Duration::from_millis(n)),
                    "m" => n.checked_mul(60).map(Duration::from_secs),
                    _ => Some(Duration::from_secs(n)),
                }
                .filter(|d| *d <= tracecar_values::MAX_DURATION);
                prop_assert_eq!(parse_duration(&format!("{pad}{n}{unit}{pad}")), want);
            }

            #[test]
            fn fuzz_parse_duration_fractions(
                secs in 0u64..1_000_000,
                millis in 0u64..1000,
            ) {
                prop_assert_eq!(
                    parse_duration(&format!("{secs}.{millis:03}s")),
                    Some(Duration::from_millis(secs * 1000 + millis))
                );
            }

            /// `k=v` lists: arbitrary text never panics; what is accepted has no empty key, and
            /// percent escapes are two hex digits.
            #[test]
            fn fuzz_parse_key_values_arbitrary(v in value(&["a=b,c=d%2C", "k=%41"])) {
                if let Some(kvs) = parse_key_values(&v) {
                    prop_assert!(kvs.iter().all(|(k, _)| !k.is_empty()));
                }
                let escapes_ok = v.split('%').skip(1).all(|after| {
                    after.len() >= 2 && after.as_bytes()[..2].iter().all(u8::is_ascii_hexdigit)
                });
                if !escapes_ok {
                    prop_assert_eq!(percent_decode(&v), None, "{:?}", v);
                }
            }

            /// Any keys and values, percent-encoded, read back exactly.
            #[test]
            fn fuzz_parse_key_values_round_trip(
                kvs in prop::collection::vec(("[a-zA-Z0-9._/-]{1,16}", any::<String>()), 0..6),
            ) {
                let encode = |s: &str| -> String {
                    s.bytes()
                        .map(|b| if b.is_ascii_alphanumeric() {
                            (b as char).to_string()
                        } else {
                            format!("%{b:02X}")
                        })
                        .collect()
                };
                let line: Vec<String> =
                    kvs.iter().map(|(k, v)| format!("{k}={}", encode(v))).collect();
                prop_assert_eq!(parse_key_values(&line.join(",")), Some(kvs));
            }

            #[test]
            fn fuzz_ratio(v in value(&["0.25", "1", "0", "1e-3"])) {
                if let Ok(r) = ratio("OTEL_TRACES_SAMPLER_ARG", Some(&v)) {
                    prop_assert!((0.0..=1.0).contains(&r), "{v:?} -> {r}");
                }
            }

            #[test]
            fn fuzz_ratio_round_trip(r in 0.0f64..=1.0) {
                prop_assert_eq!(ratio("OTEL_TRACES_SAMPLER_ARG", Some(&r.to_string())).ok(), Some(r));
                prop_assert!(ratio("OTEL_TRACES_SAMPLER_ARG", Some(&(r + 1.01).to_string())).is_err());
            }

            /// Endpoints: whatever is accepted is an http(s) URL, and the generic variable gets
            /// `/v1/traces` on its path for http/protobuf.
            #[test]
            fn fuzz_otlp_endpoint(
                http in any::<bool>(),
                generic in prop::option::of(value(&["http://c:4318", "https://c:4318/otlp/"])),
                traces in prop::option::of(value(&["http://c:4318/v1/traces"])),
            ) {
                let protocol = if http { OtlpProtocol::HttpProtobuf } else { OtlpProtocol::Grpc };
                match otlp_endpoint(protocol, generic.as_deref(), traces.as_deref()) {
                    Ok(url) => {
                        let uri: http::Uri = url.parse().map_err(|e| {
                            TestCaseError::fail(format!("{url:?} is not a URL: {e}"))
                        })?;
                        prop_assert!(matches!(uri.scheme_str(), Some("http" | "https")));
                        prop_assert!(uri.authority().is_some());
                        let from_traces = traces.as_deref().is_some_and(|t| !t.is_empty());
                        if http && !from_traces {
                            prop_assert!(uri.path().ends_with("/v1/traces"), "{url:?}");
                        }
                        if from_traces {
                            prop_assert_eq!(Some(url), traces);
                        }
                    }
                    Err(e) => {
                        let from_traces = traces.as_deref().is_some_and(|t| !t.is_empty());
                        let want = if from_traces {
                            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
                        } else {
                            "OTEL_EXPORTER_OTLP_ENDPOINT"
                        };
                        prop_assert_eq!(e.var, want);
                    }
                }
            }

            #[test]
            fn fuzz_otlp_endpoint_round_trip(
                https in any::<bool>(),
                host in "[a-z][a-z0-9-]{0,20}(\\.[a-z0-9-]{1,10}){0,3}",
                port in prop::option::of(1u16..),
                path in "(/[a-zA-Z0-9._~-]{1,10}){0,3}/?",
                query in "(\\?[a-z0-9=&/]{0,10})?",
            ) {
                let scheme = if https { "https" } else { "http" };
                let port = port.map(|p| format!(":{p}")).unwrap_or_default();
                let base = format!("{scheme}://{host}{port}{path}{query}");
                let grpc = otlp_endpoint(OtlpProtocol::Grpc, Some(&base), None);
                prop_assert_eq!(grpc.ok(), Some(base.clone()));
                let http = otlp_endpoint(OtlpProtocol::HttpProtobuf, Some(&base), None);
                let want = format!(
                    "{scheme}://{host}{port}{}/v1/traces{query}",
                    path.trim_end_matches('/')
                );
                prop_assert_eq!(http.ok(), Some(want));
                let signal = otlp_endpoint(OtlpProtocol::HttpProtobuf, None, Some(&base));
                prop_assert_eq!(signal.ok(), Some(base));
            }

            /// An accepted inbound target is a `host:port` authority, never the inbound listener.
            #[test]
            fn fuzz_inbound_target(v in value(&["127.0.0.1:8080", "[fd00::1]:80", "app:8080"])) {
                let mut args = defaults();
                args.inbound_target = Some(v.clone());
                match args.into_config() {
                    Ok(c) => {
                        if let Some(t) = c.inbound_target {
                            let a: http::uri::Authority = t.parse().map_err(|e| {
                                TestCaseError::fail(format!("{v:?} gave {t:?}: {e}"))
                            })?;
                            prop_assert!(a.port_u16().is_some(), "{v:?} gave {t:?}");
                            prop_assert!(
                                !(a.port_u16() == Some(15143)
                                    && is_local_host(a.host().trim_matches(['[', ']']))),
                                "{v:?} targets the listener"
                            );
                        } else {
                            prop_assert!(v.trim().is_empty(), "{v:?} was dropped");
                        }
                    }
                    Err(e) => prop_assert_eq!(e.var, "TRACECAR_INBOUND_TARGET"),
                }
            }

            /// Socket addresses of either family are read back as given.
            #[test]
            fn fuzz_listen_addresses_round_trip(a in any::<SocketAddr>()) {
                // (Flow labels have no text form.)
                let a = match a {
                    SocketAddr::V6(mut v6) => {
                        v6.set_flowinfo(0);
                        SocketAddr::V6(v6)
                    }
                    v4 => v4,
                };
                let mut args = defaults();
                args.admin_listen = a.to_string();
                let c = args.into_config();
                prop_assert_eq!(c.ok().map(|c| c.admin_listen), Some(a));
            }
        }
    }
}
