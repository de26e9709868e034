//! The per-pod annotations (`tracecar.dev/*`) and the value parsers shared with the
//! injector's own flags: one parser per setting, so a flag and an annotation accept
//! exactly the same values.
//!
//! [`resolve`] turns the injector's [`Defaults`] plus a pod's annotations into the
//! [`Settings`] used for that pod, and a warning for every invalid annotation value.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::config::Defaults;

/// Prefix of every tracecar annotation.
pub const PREFIX: &str = "tracecar.dev/";
/// `enabled` / `disabled`: per-pod override of the namespace label, either way.
pub const INJECT: &str = "tracecar.dev/inject";
/// Set by the injector on injected pods (`injected`).
pub const STATUS: &str = "tracecar.dev/status";
/// Set by the injector: the version of the injector that injected the pod.
pub const PROXY_VERSION: &str = "tracecar.dev/proxy-version";
/// Set by the injector: a JSON record of what injection added (used by `inject --uninject`).
pub const INJECTION: &str = "tracecar.dev/injection";
/// Value of [`STATUS`] on injected pods.
pub const STATUS_INJECTED: &str = "injected";

pub const SERVICE_NAME: &str = "tracecar.dev/service-name";
pub const SAMPLING_RATIO: &str = "tracecar.dev/sampling-ratio";
pub const PROPAGATORS: &str = "tracecar.dev/propagators";
pub const SKIP_INBOUND_PORTS: &str = "tracecar.dev/skip-inbound-ports";
pub const SKIP_OUTBOUND_PORTS: &str = "tracecar.dev/skip-outbound-ports";
pub const SKIP_OUTBOUND_CIDRS: &str = "tracecar.dev/skip-outbound-cidrs";
pub const CAPTURE: &str = "tracecar.dev/capture";
pub const CORRELATION: &str = "tracecar.dev/correlation";
pub const COLLECTOR_ENDPOINT: &str = "tracecar.dev/collector-endpoint";
pub const PROXY_CPU_REQUEST: &str = "tracecar.dev/proxy-cpu-request";
pub const PROXY_CPU_LIMIT: &str = "tracecar.dev/proxy-cpu-limit";
pub const PROXY_MEMORY_REQUEST: &str = "tracecar.dev/proxy-memory-request";
pub const PROXY_MEMORY_LIMIT: &str = "tracecar.dev/proxy-memory-limit";
pub const LOG_LEVEL: &str = "tracecar.dev/log-level";
pub const PROXY_IMAGE: &str = "tracecar.dev/proxy-image";

/// Every annotation the injector reads or writes; anything else under [`PREFIX`] is a typo.
const KNOWN: &[&str] = &[
    INJECT,
    STATUS,
    PROXY_VERSION,
    INJECTION,
    SERVICE_NAME,
    SAMPLING_RATIO,
    PROPAGATORS,
    SKIP_INBOUND_PORTS,
    SKIP_OUTBOUND_PORTS,
    SKIP_OUTBOUND_CIDRS,
    CAPTURE,
    CORRELATION,
    COLLECTOR_ENDPOINT,
    PROXY_CPU_REQUEST,
    PROXY_CPU_LIMIT,
    PROXY_MEMORY_REQUEST,
    PROXY_MEMORY_LIMIT,
    LOG_LEVEL,
    PROXY_IMAGE,
];

/// How the app's traffic reaches the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capture {
    /// `tracecar-init` installs iptables rules (needs NET_ADMIN in an init container).
    Iptables,
    /// No init container; apps get `HTTP_PROXY`/`NO_PROXY`.
    HttpProxy,
}

/// How the proxy container is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SidecarMode {
    /// Kubernetes native sidecar: init container with `restartPolicy: Always` (>= 1.29).
    Native,
    /// First regular container with a `postStart` hook that waits until it is ready.
    Container,
}

/// OTLP protocol the proxy exports with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http/protobuf",
        }
    }
}

/// A Kubernetes resource quantity, kept as written, with its value for comparisons.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantity {
    pub text: String,
    pub value: f64,
}

/// What a value must look like; used in warnings and start-up errors.
pub mod accepted {
    pub const INJECT: &str = "enabled, disabled";
    pub const SERVICE_NAME: &str = "a non-empty name";
    pub const SAMPLING_RATIO: &str = "a number from 0 to 1";
    pub const PROPAGATORS: &str = tracecar_values::PROPAGATORS;
    pub const PORTS: &str = "a comma-separated list of ports or ranges a-b (1-65535)";
    pub const CIDRS: &str = "a comma-separated list of IPv4/IPv6 CIDRs (e.g. 10.0.0.0/8, fd00::/8)";
    pub const CAPTURE: &str = "iptables, http-proxy";
    pub const SIDECAR_MODE: &str = "native, container";
    pub const CORRELATION: &str = "causal, inflight, off";
    pub const ENDPOINT: &str = "an http:// or https:// URL with a host";
    pub const PROTOCOL: &str = "grpc, http/protobuf";
    pub const QUANTITY: &str = "a Kubernetes quantity (e.g. 10m, 0.5, 64Mi, 1G)";
    pub const LOG_LEVEL: &str = "trace, debug, info, warn, error";
    pub const IMAGE: &str = "an image reference (e.g. ghcr.io/org/image:tag)";
    pub const SECRET: &str = "a Secret name (DNS subdomain) or empty";
    pub const DOMAIN: &str = "a DNS domain (e.g. cluster.local)";
}

/// Parses `enabled`/`disabled`.
pub fn parse_inject(s: &str) -> Result<bool, &'static str> {
    match s.trim() {
        "enabled" => Ok(true),
        "disabled" => Ok(false),
        _ => Err(accepted::INJECT),
    }
}

pub fn parse_service_name(s: &str) -> Result<String, &'static str> {
    let s = s.trim();
    if s.is_empty() || s.chars().any(char::is_control) {
        return Err(accepted::SERVICE_NAME);
    }
    Ok(s.to_owned())
}

/// Parses a ratio in `0..=1`, returned in its canonical text form (`1`, `0.25`).
pub fn parse_sampling_ratio(s: &str) -> Result<String, &'static str> {
    match s.trim().parse::<f64>() {
        Ok(f) if f.is_finite() && (0.0..=1.0).contains(&f) => Ok(format!("{f}")),
        _ => Err(accepted::SAMPLING_RATIO),
    }
}

/// Parses a propagator list into its canonical comma-joined form (trimmed, de-duplicated).
pub fn parse_propagators(s: &str) -> Result<String, &'static str> {
    // The names are the proxy's (tracecar-values); stricter here: no empty entry, no `none`
    // (an annotation that turns propagation off is more likely a mistake than a wish).
    let mut out: Vec<&str> = Vec::new();
    for p in s.split(',').map(str::trim) {
        let name = tracecar_values::Propagator::from_name(p)
            .ok_or(accepted::PROPAGATORS)?
            .name();
        if !out.contains(&name) {
            out.push(name);
        }
    }
    Ok(out.join(","))
}

/// Parses a port list (`80,443,8000-8100`); empty is allowed. Canonical: no spaces.
pub fn parse_ports(s: &str) -> Result<String, &'static str> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(String::new());
    }
    let port = |p: &str| match p.trim().parse::<u16>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(accepted::PORTS),
    };
    let mut out = Vec::new();
    for item in s.split(',') {
        match item.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (port(a)?, port(b)?);
                if a > b {
                    return Err(accepted::PORTS);
                }
                out.push(format!("{a}-{b}"));
            }
            None => out.push(port(item)?.to_string()),
        }
    }
    Ok(out.join(","))
}

/// Parses a CIDR list; empty is allowed; a bare address becomes /32 or /128.
pub fn parse_cidrs(s: &str) -> Result<String, &'static str> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(String::new());
    }
    let mut out = Vec::new();
    for item in s.split(',') {
        let item = item.trim();
        let (addr, prefix) = match item.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (item, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| accepted::CIDRS)?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max && !p.starts_with('+') => n,
                _ => return Err(accepted::CIDRS),
            },
            None => max,
        };
        out.push(format!("{addr}/{prefix}"));
    }
    Ok(out.join(","))
}

pub fn parse_capture(s: &str) -> Result<Capture, &'static str> {
    match s.trim() {
        "iptables" => Ok(Capture::Iptables),
        "http-proxy" => Ok(Capture::HttpProxy),
        _ => Err(accepted::CAPTURE),
    }
}

pub fn parse_sidecar_mode(s: &str) -> Result<SidecarMode, &'static str> {
    match s.trim() {
        "native" => Ok(SidecarMode::Native),
        "container" => Ok(SidecarMode::Container),
        _ => Err(accepted::SIDECAR_MODE),
    }
}

pub fn parse_correlation(s: &str) -> Result<&'static str, &'static str> {
    match s.trim() {
        "causal" => Ok("causal"),
        "inflight" => Ok("inflight"),
        "off" => Ok("off"),
        _ => Err(accepted::CORRELATION),
    }
}

/// Parses an optional collector URL (empty = unset).
pub fn parse_endpoint(s: &str) -> Result<Option<String>, &'static str> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    let uri: http::Uri = s.parse().map_err(|_| accepted::ENDPOINT)?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http") | Some("https"));
    let host_ok = uri.host().is_some_and(|h| !h.is_empty());
    if scheme_ok && host_ok {
        Ok(Some(s.to_owned()))
    } else {
        Err(accepted::ENDPOINT)
    }
}

pub fn parse_protocol(s: &str) -> Result<Protocol, &'static str> {
    match s.trim() {
        "grpc" => Ok(Protocol::Grpc),
        "http/protobuf" => Ok(Protocol::HttpProtobuf),
        _ => Err(accepted::PROTOCOL),
    }
}

/// Parses an optional Kubernetes quantity (empty = unset). Negative values are refused.
pub fn parse_quantity(s: &str) -> Result<Option<Quantity>, &'static str> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    let err = accepted::QUANTITY;
    let body = s.strip_prefix('+').unwrap_or(s);
    let split = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (num, suffix) = body.split_at(split);
    if num.is_empty() || num == "." || num.matches('.').count() > 1 {
        return Err(err);
    }
    let n: f64 = num.parse().map_err(|_| err)?;
    let mult = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        e if e.starts_with(['e', 'E']) => {
            let exp: i32 = e[1..].parse().map_err(|_| err)?;
            if !(-30..=30).contains(&exp) {
                return Err(err);
            }
            10f64.powi(exp)
        }
        _ => return Err(err),
    };
    Ok(Some(Quantity {
        text: s.to_owned(),
        value: n * mult,
    }))
}

pub fn parse_log_level(s: &str) -> Result<&'static str, &'static str> {
    match s.trim() {
        "trace" => Ok("trace"),
        "debug" => Ok("debug"),
        "info" => Ok("info"),
        "warn" => Ok("warn"),
        "error" => Ok("error"),
        _ => Err(accepted::LOG_LEVEL),
    }
}

/// Parses an image reference: `[registry/]path[:tag][@digest]`, conservatively.
pub fn parse_image(s: &str) -> Result<String, &'static str> {
    let s = s.trim();
    let ok_chars = s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._-/:@".contains(c));
    let first_ok = s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if s.is_empty() || s.len() > 512 || !ok_chars || !first_ok || s.ends_with([':', '/', '@']) {
        return Err(accepted::IMAGE);
    }
    Ok(s.to_owned())
}

/// Parses an optional Secret name (empty = none).
pub fn parse_secret_name(s: &str) -> Result<Option<String>, &'static str> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    if is_dns_subdomain(s) {
        Ok(Some(s.to_owned()))
    } else {
        Err(accepted::SECRET)
    }
}

pub fn parse_domain(s: &str) -> Result<String, &'static str> {
    let s = s.trim().trim_end_matches('.');
    if is_dns_subdomain(s) {
        Ok(s.to_owned())
    } else {
        Err(accepted::DOMAIN)
    }
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// An invalid annotation value that fell back to the default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// The annotation key (`tracecar.dev/...`).
    pub annotation: String,
    /// The text returned to the API server (kubectl prints it).
    pub message: String,
}

/// The settings that apply to one pod: the injector's defaults overridden by annotations.
#[derive(Debug, Clone)]
pub struct Settings {
    pub service_name: Option<String>,
    pub sampling_ratio: String,
    pub propagators: String,
    pub skip_inbound_ports: String,
    pub skip_outbound_ports: String,
    pub skip_outbound_cidrs: String,
    pub capture: Capture,
    pub correlation: &'static str,
    pub collector_endpoint: Option<String>,
    pub cpu_request: Option<Quantity>,
    pub cpu_limit: Option<Quantity>,
    pub memory_request: Option<Quantity>,
    pub memory_limit: Option<Quantity>,
    pub log_level: &'static str,
    pub proxy_image: String,
}

/// Overrides the defaults with the pod's annotations; invalid values keep the default and
/// produce a [`Warning`]. Unknown `tracecar.dev/` keys also produce a warning (likely typos).
pub fn resolve(
    defaults: &Defaults,
    annotations: Option<&BTreeMap<String, String>>,
) -> (Settings, Vec<Warning>) {
    let mut s = Settings {
        service_name: None,
        sampling_ratio: defaults.sampling_ratio.clone(),
        propagators: defaults.propagators.clone(),
        skip_inbound_ports: defaults.skip_inbound_ports.clone(),
        skip_outbound_ports: defaults.skip_outbound_ports.clone(),
        skip_outbound_cidrs: defaults.skip_outbound_cidrs.clone(),
        capture: defaults.capture,
        correlation: defaults.correlation,
        collector_endpoint: defaults.collector_endpoint.clone(),
        cpu_request: defaults.cpu_request.clone(),
        cpu_limit: defaults.cpu_limit.clone(),
        memory_request: defaults.memory_request.clone(),
        memory_limit: defaults.memory_limit.clone(),
        log_level: defaults.log_level,
        proxy_image: defaults.proxy_image.clone(),
    };
    let mut warnings = Vec::new();
    let Some(annotations) = annotations else {
        return (s, warnings);
    };

    // Applies one annotation: on success stores the value, on failure records a warning
    // naming the annotation, the value, what is accepted and the default kept.
    fn apply<T>(
        annotations: &BTreeMap<String, String>,
        key: &str,
        parse: impl Fn(&str) -> Result<T, &'static str>,
        slot: &mut T,
        shown_default: String,
        warnings: &mut Vec<Warning>,
    ) {
        if let Some(raw) = annotations.get(key) {
            match parse(raw) {
                Ok(v) => *slot = v,
                Err(accepted) => warnings.push(invalid(key, raw, accepted, &shown_default)),
            }
        }
    }

    let shown = |q: &Option<Quantity>| {
        q.as_ref()
            .map_or_else(|| "unset".to_owned(), |q| q.text.clone())
    };
    let w = &mut warnings;
    apply(
        annotations,
        SERVICE_NAME,
        |v| parse_service_name(v).map(Some),
        &mut s.service_name,
        "the derived name".into(),
        w,
    );
    let d = s.sampling_ratio.clone();
    apply(
        annotations,
        SAMPLING_RATIO,
        parse_sampling_ratio,
        &mut s.sampling_ratio,
        d,
        w,
    );
    let d = s.propagators.clone();
    apply(
        annotations,
        PROPAGATORS,
        parse_propagators,
        &mut s.propagators,
        d,
        w,
    );
    let d = display_list(&s.skip_inbound_ports);
    apply(
        annotations,
        SKIP_INBOUND_PORTS,
        parse_ports,
        &mut s.skip_inbound_ports,
        d,
        w,
    );
    let d = display_list(&s.skip_outbound_ports);
    apply(
        annotations,
        SKIP_OUTBOUND_PORTS,
        parse_ports,
        &mut s.skip_outbound_ports,
        d,
        w,
    );
    let d = display_list(&s.skip_outbound_cidrs);
    apply(
        annotations,
        SKIP_OUTBOUND_CIDRS,
        parse_cidrs,
        &mut s.skip_outbound_cidrs,
        d,
        w,
    );
    let d = match s.capture {
        Capture::Iptables => "iptables",
        Capture::HttpProxy => "http-proxy",
    };
    apply(
        annotations,
        CAPTURE,
        parse_capture,
        &mut s.capture,
        d.into(),
        w,
    );
    let d = s.correlation.to_owned();
    apply(
        annotations,
        CORRELATION,
        parse_correlation,
        &mut s.correlation,
        d,
        w,
    );
    let d = s
        .collector_endpoint
        .clone()
        .unwrap_or_else(|| "the proxy's default".into());
    apply(
        annotations,
        COLLECTOR_ENDPOINT,
        parse_endpoint,
        &mut s.collector_endpoint,
        d,
        w,
    );
    let d = shown(&s.cpu_request);
    apply(
        annotations,
        PROXY_CPU_REQUEST,
        parse_quantity,
        &mut s.cpu_request,
        d,
        w,
    );
    let d = shown(&s.cpu_limit);
    apply(
        annotations,
        PROXY_CPU_LIMIT,
        parse_quantity,
        &mut s.cpu_limit,
        d,
        w,
    );
    let d = shown(&s.memory_request);
    apply(
        annotations,
        PROXY_MEMORY_REQUEST,
        parse_quantity,
        &mut s.memory_request,
        d,
        w,
    );
    let d = shown(&s.memory_limit);
    apply(
        annotations,
        PROXY_MEMORY_LIMIT,
        parse_quantity,
        &mut s.memory_limit,
        d,
        w,
    );
    let d = s.log_level.to_owned();
    apply(
        annotations,
        LOG_LEVEL,
        parse_log_level,
        &mut s.log_level,
        d,
        w,
    );
    let d = s.proxy_image.clone();
    apply(
        annotations,
        PROXY_IMAGE,
        parse_image,
        &mut s.proxy_image,
        d,
        w,
    );

    // A request above its limit would make the API server reject the pod: raise the limit.
    for (req, lim, lim_key) in [
        (&s.cpu_request, &mut s.cpu_limit, PROXY_CPU_LIMIT),
        (&s.memory_request, &mut s.memory_limit, PROXY_MEMORY_LIMIT),
    ] {
        if let (Some(r), Some(l)) = (req, lim.as_ref()) {
            if r.value > l.value {
                warnings.push(Warning {
                    annotation: lim_key.to_owned(),
                    message: format!(
                        "{lim_key}: limit {:?} is below the request {:?}; using {:?} as the limit",
                        l.text, r.text, r.text
                    ),
                });
                *lim = Some(r.clone());
            }
        }
    }

    for key in annotations.keys() {
        if key.starts_with(PREFIX) && !KNOWN.contains(&key.as_str()) {
            warnings.push(Warning {
                annotation: key.clone(),
                message: format!("{key}: unknown tracecar annotation; ignored"),
            });
        }
    }
    (s, warnings)
}

/// The warning for an invalid annotation value.
pub fn invalid(key: &str, value: &str, accepted: &str, default: &str) -> Warning {
    Warning {
        annotation: key.to_owned(),
        message: format!("{key}: invalid value {value:?}: expected {accepted}; using {default}"),
    }
}

fn display_list(s: &str) -> String {
    if s.is_empty() {
        "none".to_owned()
    } else {
        s.to_owned()
    }
}

/// The `'static` spelling of a known annotation key.
pub fn known_key(key: &str) -> Option<&'static str> {
    KNOWN.iter().copied().find(|k| *k == key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports() {
        assert_eq!(
            parse_ports(" 80, 443 ,8000-8100").unwrap(),
            "80,443,8000-8100"
        );
        assert_eq!(parse_ports("").unwrap(), "");
        for bad in ["0", "65536", "10-5", "a", "80,", "1-2-3", "-5"] {
            assert!(parse_ports(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cidrs() {
        assert_eq!(
            parse_cidrs("10.0.0.0/8, fd00::/8,1.2.3.4").unwrap(),
            "10.0.0.0/8,fd00::/8,1.2.3.4/32"
        );
        for bad in [
            "10.0.0.0/33",
            "fd00::/129",
            "foo/8",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/8,",
        ] {
            assert!(parse_cidrs(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn quantities() {
        assert_eq!(
            parse_quantity("64Mi").unwrap().unwrap().value,
            64.0 * 1024.0 * 1024.0
        );
        assert_eq!(parse_quantity("10m").unwrap().unwrap().value, 0.01);
        assert_eq!(parse_quantity("1e3").unwrap().unwrap().value, 1000.0);
        assert!(parse_quantity("").unwrap().is_none());
        for bad in ["-1", "64MB", "abc", "1..2", ".", "Mi", "1e"] {
            assert!(parse_quantity(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn scalars() {
        assert_eq!(parse_sampling_ratio("1.0").unwrap(), "1");
        assert_eq!(parse_sampling_ratio("0.25").unwrap(), "0.25");
        assert!(parse_sampling_ratio("1.5").is_err());
        assert!(parse_sampling_ratio("NaN").is_err());
        assert_eq!(
            parse_propagators("b3, tracecontext,b3").unwrap(),
            "b3,tracecontext"
        );
        assert!(parse_propagators("xray").is_err());
        assert!(parse_propagators("").is_err());
        assert!(parse_endpoint("http://otel:4317").unwrap().is_some());
        assert!(parse_endpoint("otel:4317").is_err());
        assert!(parse_endpoint("ftp://otel").is_err());
        assert!(parse_image("ghcr.io/a/b:1.0").is_ok());
        assert!(parse_image("bad image").is_err());
        assert!(parse_domain("Cluster.Local").is_err());
    }

    #[test]
    fn correlation_policies() {
        for ok in ["causal", "inflight", "off", " causal "] {
            assert_eq!(parse_correlation(ok), Ok(ok.trim()));
        }
        for bad in ["", "always", "Causal", "sole"] {
            assert_eq!(parse_correlation(bad), Err(accepted::CORRELATION), "{bad}");
        }
    }
}
