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
    /// How outbound requests without trace context are tied to inbound ones: off, inflight.
    #[arg(long, env = "TRACECAR_CORRELATION", default_value = "inflight")]
    pub correlation: String,
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
    /// Parent them on the newest inbound request still in flight.
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagator {
    TraceContext,
    Baggage,
    B3,
    B3Multi,
    Jaeger,
}

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

/// TLS material for the export connection (files, re-read when they change).
#[derive(Debug, Clone, Default)]
pub struct ExportTls {
    pub ca_file: Option<String>,
    pub client_cert_file: Option<String>,
    pub client_key_file: Option<String>,
    pub server_name: Option<String>,
}

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

/// A name or address that means this host (loopback or unspecified).
pub fn is_local_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback() || ip.is_unspecified())
}

/// Parses `10s`, `500ms`, `2m` or a bare number of seconds.
pub fn parse_duration(v: &str) -> Option<Duration> {
    let v = v.trim();
    let (num, unit) = match v.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => (&v[..i], &v[i..]),
        None => (v, "s"),
    };
    let n: f64 = num.parse().ok()?;
    if !n.is_finite() || n < 0.0 {
        return None;
    }
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return None,
    };
    // (`from_secs_f64` would panic on a value too large for a Duration.)
    Duration::try_from_secs_f64(secs).ok()
}

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
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
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
            "off" => Correlation::Off,
            "inflight" => Correlation::Inflight,
            v => {
                return Err(err(
                    "TRACECAR_CORRELATION",
                    "correlation",
                    v,
                    "off or inflight",
                ))
            }
        };
        if tracing_subscriber::EnvFilter::try_new(&self.log).is_err() {
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
        let mut propagators = Vec::new();
        for p in self
            .propagators
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            let p = match p {
                "tracecontext" => Propagator::TraceContext,
                "baggage" => Propagator::Baggage,
                "b3" => Propagator::B3,
                "b3multi" => Propagator::B3Multi,
                "jaeger" => Propagator::Jaeger,
                // "none" disables propagation, as the OTel spec says.
                "none" => continue,
                _ => return Err(err(
                    "OTEL_PROPAGATORS",
                    "propagators",
                    &self.propagators,
                    "a comma-separated list of tracecontext, baggage, b3, b3multi, jaeger, none",
                )),
            };
            if !propagators.contains(&p) {
                propagators.push(p);
            }
        }
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
            log: self.log,
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
        OtlpProtocol::HttpProtobuf if append => format!("{}/v1/traces", raw.trim_end_matches('/')),
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
        assert_eq!(c.correlation, Correlation::Inflight);
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
            e.contains("TRACECAR_CORRELATION") && e.contains("sometimes") && e.contains("inflight"),
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
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("x"), None);
        assert_eq!(parse_duration("-1s"), None);
    }
}
