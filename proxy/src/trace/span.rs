//! The span of one proxied request, from its headers to the end of its response body.

use std::borrow::Cow;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::SystemTime;

use http::{HeaderMap, Method, Version};
use http_body::{Body, Frame, SizeHint};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanBuilder, SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue, StringValue, Value};
use opentelemetry_http::HeaderExtractor;
use opentelemetry_sdk::trace::Span as SdkSpan;

use crate::metrics::Direction;

use super::correlate::InflightGuard;
use super::Telemetry;

/// What the proxy knows about a request when its span starts.
#[derive(Debug, Clone)]
pub struct RequestInfo<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub scheme: &'static str,
    pub version: Version,
    /// Host (without port) the request was addressed to; `None`: taken from the Host header.
    pub server_address: Option<&'a str>,
    pub server_port: Option<u16>,
    /// The peer that sent the request (inbound only).
    pub client_address: Option<std::sync::Arc<str>>,
    /// The Host header (or :authority); filled from the headers by [`Telemetry::server_span`]
    /// and [`Telemetry::client_span`].
    pub host: Option<&'a str>,
    pub user_agent: Option<&'a str>,
}

/// The propagation headers a span start wants written, kept aside so the request's own header
/// representation (a `HeaderMap`, or raw HTTP/1 bytes) can be rewritten afterwards.
#[derive(Debug, Default)]
pub struct Injected(pub Vec<(Cow<'static, str>, String)>);

/// Header names the propagators write, so the common ones need no allocation.
const KNOWN_KEYS: [&str; 9] = [
    "traceparent",
    "tracestate",
    "baggage",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-sampled",
    "x-b3-parentspanid",
    "uber-trace-id",
];

impl Injector for Injected {
    fn set(&mut self, key: &str, value: String) {
        let key = match KNOWN_KEYS.iter().find(|k| k.eq_ignore_ascii_case(key)) {
            Some(k) => Cow::Borrowed(*k),
            None => Cow::Owned(key.to_ascii_lowercase()),
        };
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.0.push((key, value)),
        }
    }
}

impl Injected {
    /// True when `name` (any case) will be written by the propagators.
    pub fn replaces(&self, name: &str) -> bool {
        self.0.iter().any(|(k, _)| k.eq_ignore_ascii_case(name))
    }

    /// Writes the headers into `headers`, replacing any with the same name.
    pub fn apply(self, headers: &mut HeaderMap) {
        for (k, v) in self.0 {
            if let (Ok(name), Ok(value)) = (
                http::header::HeaderName::from_bytes(k.as_bytes()),
                http::HeaderValue::from_str(&v),
            ) {
                headers.insert(name, value);
            }
        }
    }
}

fn header_str(headers: &HeaderMap, name: http::header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Starts a span over a `HeaderMap`: Host and User-Agent taken from it, context read from it,
/// and the proxy's context written back into it.
fn over_headers(
    info: RequestInfo<'_>,
    headers: &mut HeaderMap,
    start: impl FnOnce(RequestInfo<'_>, &dyn Extractor, &mut dyn Injector) -> RequestSpan,
) -> RequestSpan {
    let mut injected = Injected::default();
    let span = {
        let h = &*headers;
        let info = RequestInfo {
            host: header_str(h, http::header::HOST),
            user_agent: header_str(h, http::header::USER_AGENT),
            ..info
        };
        start(info, &HeaderExtractor(h), &mut injected)
    };
    injected.apply(headers);
    span
}

/// A request's span and timing; ends the span and records metrics when dropped.
#[derive(Debug)]
pub struct RequestSpan {
    span: SdkSpan,
    direction: Direction,
    /// Also the span's start time: one clock read serves both (and one more at the end).
    started: SystemTime,
    status: Option<u16>,
    /// `error.type`, written once when the span ends: a failure's own class wins over the
    /// status code (OTLP attribute keys are unique).
    error_type: Option<Cow<'static, str>>,
    telemetry: std::sync::Arc<Telemetry>,
    _inflight: Option<InflightGuard>,
    /// False for opaque connection spans, which are not HTTP requests.
    count_request: bool,
}

fn static_method(m: &Method) -> Value {
    Value::String(StringValue::from(method_name(m)))
}

fn method_name(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        // Semantic conventions: unknown methods are recorded as _OTHER.
        _ => "_OTHER",
    }
}

fn protocol_version(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_11 => "1.1",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "1.1",
    }
}

/// A Host header's host and port (`[v6]:port` too); `None` when it is not `host[:port]`. A
/// parser of its own because this runs for every request and `http::uri::Authority` does more.
pub(crate) fn split_host(h: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if let Some(rest) = h.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        (v6, after)
    } else {
        match h.split_once(':') {
            Some((host, _)) => (host, &h[host.len()..]),
            None => (h, ""),
        }
    };
    let port = match port {
        "" => None,
        p => Some(p.strip_prefix(':')?.parse::<u16>().ok()?),
    };
    let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '%');
    (!host.is_empty() && host.chars().all(valid)).then_some((host, port))
}

fn attributes(info: &RequestInfo<'_>) -> Vec<KeyValue> {
    let mut attrs = Vec::with_capacity(10);
    attrs.push(KeyValue::new(
        "http.request.method",
        static_method(info.method),
    ));
    attrs.push(KeyValue::new("url.path", info.path.to_owned()));
    attrs.push(KeyValue::new("url.scheme", info.scheme));
    attrs.push(KeyValue::new(
        "network.protocol.version",
        protocol_version(info.version),
    ));
    // Inbound requests name their server in the Host header (or :authority).
    let host_header = info.host.and_then(split_host);
    let (address, port) = match (info.server_address, host_header) {
        (Some(a), _) => (Some(a), info.server_port),
        (None, Some((h, p))) => (Some(h), p.or(info.server_port)),
        (None, None) => (None, info.server_port),
    };
    if let Some(host) = address {
        // Both routers and `split_host` give it without IPv6 brackets.
        attrs.push(KeyValue::new("server.address", host.to_owned()));
    }
    if let Some(port) = port {
        attrs.push(KeyValue::new("server.port", port as i64));
    }
    if let Some(ip) = &info.client_address {
        // Shared with the connection: no copy per request.
        attrs.push(KeyValue::new(
            "client.address",
            Value::String(StringValue::from(ip.clone())),
        ));
    }
    if let Some(ua) = info.user_agent {
        attrs.push(KeyValue::new("user_agent.original", ua.to_owned()));
    }
    attrs
}

impl Telemetry {
    /// Starts the SERVER span of an inbound request: continues the context in its headers and
    /// replaces that context with the proxy's span, so the app sees the proxy as parent.
    pub fn server_span(
        self: &std::sync::Arc<Self>,
        info: RequestInfo<'_>,
        headers: &mut HeaderMap,
    ) -> RequestSpan {
        over_headers(info, headers, |i, e, inj| self.server_span_with(i, e, inj))
    }

    /// [`Telemetry::server_span`] over any header representation: context is read from
    /// `extractor` and the proxy's span written to `injector`.
    pub fn server_span_with(
        self: &std::sync::Arc<Self>,
        info: RequestInfo<'_>,
        extractor: &dyn Extractor,
        injector: &mut dyn Injector,
    ) -> RequestSpan {
        let parent = self.extract(extractor);
        let mut rs = self.start(
            SpanKind::Server,
            info,
            injector,
            &parent,
            Direction::Inbound,
        );
        if let Some(inflight) = &self.inflight {
            rs._inflight = Some(inflight.enter(rs.span_context()));
        }
        rs
    }

    /// Starts the CLIENT span of an outbound request. Without context in its headers, the span
    /// is parented on the newest in-flight inbound request when correlation is on.
    pub fn client_span(
        self: &std::sync::Arc<Self>,
        info: RequestInfo<'_>,
        headers: &mut HeaderMap,
    ) -> RequestSpan {
        over_headers(info, headers, |i, e, inj| self.client_span_with(i, e, inj))
    }

    /// [`Telemetry::client_span`] over any header representation.
    pub fn client_span_with(
        self: &std::sync::Arc<Self>,
        info: RequestInfo<'_>,
        extractor: &dyn Extractor,
        injector: &mut dyn Injector,
    ) -> RequestSpan {
        let mut parent = self.extract(extractor);
        let mut correlated = false;
        if !parent.span().span_context().is_valid() {
            if let Some(sc) = self.inflight.as_ref().and_then(|i| i.newest()) {
                parent = parent.with_remote_span_context(sc);
                correlated = true;
            }
        }
        let mut rs = self.start(
            SpanKind::Client,
            info,
            injector,
            &parent,
            Direction::Outbound,
        );
        if correlated {
            opentelemetry::trace::Span::set_attribute(
                &mut rs.span,
                KeyValue::new("tracecar.correlation", "inflight"),
            );
        }
        rs
    }

    /// Starts the CLIENT span of a captured TLS connection, which the proxy passes through
    /// untouched: it knows only the server name (SNI) and the address.
    pub fn tls_span(
        self: &std::sync::Arc<Self>,
        sni: Option<&str>,
        dst: std::net::SocketAddr,
    ) -> RequestSpan {
        let parent = match self.inflight.as_ref().and_then(|i| i.newest()) {
            Some(sc) => Context::new().with_remote_span_context(sc),
            None => Context::new(),
        };
        let mut attrs = vec![
            KeyValue::new("network.transport", "tcp"),
            KeyValue::new("tls.established", true),
            KeyValue::new("server.port", dst.port() as i64),
            KeyValue::new("network.peer.address", dst.ip().to_string()),
        ];
        let name = match sni {
            Some(s) => {
                attrs.push(KeyValue::new("server.address", s.to_owned()));
                format!("TLS {s}")
            }
            None => {
                attrs.push(KeyValue::new("server.address", dst.ip().to_string()));
                "TLS".to_owned()
            }
        };
        let started = SystemTime::now();
        let span = self.tracer.build_with_context(
            SpanBuilder::from_name(name)
                .with_kind(SpanKind::Client)
                .with_start_time(started)
                .with_attributes(attrs),
            &parent,
        );
        RequestSpan {
            span,
            direction: Direction::Outbound,
            started,
            status: None,
            error_type: None,
            telemetry: self.clone(),
            _inflight: None,
            count_request: false,
        }
    }

    /// The context the request carries, in any configured format. Most requests that start a
    /// trace carry none, and the propagators' extraction is not free, so it is skipped when none
    /// of their headers is present.
    fn extract(&self, extractor: &dyn Extractor) -> Context {
        let Some(p) = &self.propagator else {
            return Context::new();
        };
        let carried =
            self.context_headers
                .iter()
                .any(|h| extractor.get(h).is_some())
                || (self.jaeger_baggage
                    && extractor.keys().iter().any(|k| {
                        k.len() > 8 && k.as_bytes()[..8].eq_ignore_ascii_case(b"uberctx-")
                    }));
        if carried {
            p.extract(extractor)
        } else {
            Context::new()
        }
    }

    fn start(
        self: &std::sync::Arc<Self>,
        kind: SpanKind,
        info: RequestInfo<'_>,
        injector: &mut dyn Injector,
        parent: &Context,
        direction: Direction,
    ) -> RequestSpan {
        let started = SystemTime::now();
        let builder = SpanBuilder::from_name(method_name(info.method))
            .with_kind(kind)
            .with_start_time(started)
            .with_attributes(attributes(&info));
        let span = self.tracer.build_with_context(builder, parent);
        if let Some(w3c) = &self.w3c {
            w3c.inject(
                opentelemetry::trace::Span::span_context(&span),
                parent,
                injector,
            );
        } else if let Some(p) = &self.propagator {
            let cx = parent
                .with_remote_span_context(opentelemetry::trace::Span::span_context(&span).clone());
            p.inject_context(&cx, injector);
        }
        self.metrics.direction(direction).open_requests.inc();
        RequestSpan {
            span,
            direction,
            started,
            status: None,
            error_type: None,
            telemetry: self.clone(),
            _inflight: None,
            count_request: true,
        }
    }
}

impl RequestSpan {
    pub fn span_context(&self) -> opentelemetry::trace::SpanContext {
        opentelemetry::trace::Span::span_context(&self.span).clone()
    }

    /// Records the response status; 5xx (and 4xx on CLIENT spans) mark the span as an error.
    pub fn set_status(&mut self, status: http::StatusCode) {
        use opentelemetry::trace::Span as _;
        let code = status.as_u16();
        self.status = Some(code);
        self.span
            .set_attribute(KeyValue::new("http.response.status_code", code as i64));
        let error = match self.direction {
            Direction::Inbound => code >= 500,
            Direction::Outbound => code >= 400,
        };
        if error {
            self.error_type
                .get_or_insert_with(|| Cow::Owned(code.to_string()));
            self.span.set_status(Status::error(""));
        }
    }

    /// Marks the request as failed without a response from upstream (`error.type`).
    pub fn fail(&mut self, error_type: &'static str, message: String) {
        use opentelemetry::trace::Span as _;
        self.error_type = Some(Cow::Borrowed(error_type));
        self.span.set_status(Status::error(message));
    }

    /// Adds an attribute (e.g. what was learnt after the span started).
    pub fn set_attribute(&mut self, kv: KeyValue) {
        opentelemetry::trace::Span::set_attribute(&mut self.span, kv);
    }
}

impl Drop for RequestSpan {
    fn drop(&mut self) {
        use opentelemetry::trace::Span as _;
        if let Some(t) = self.error_type.take() {
            self.span.set_attribute(KeyValue::new("error.type", t));
        }
        let ended = SystemTime::now();
        self.span.end_with_timestamp(ended);
        let m = self.telemetry.metrics.direction(self.direction);
        if self.count_request {
            m.open_requests.dec();
            m.record(
                self.status,
                ended.duration_since(self.started).unwrap_or_default(),
            );
        }
    }
}

/// A response body that keeps the request's span open until the last byte (or an error).
#[derive(Debug)]
pub struct TracedBody<B> {
    inner: B,
    span: Option<RequestSpan>,
}

impl<B> TracedBody<B> {
    pub fn new(inner: B, span: RequestSpan) -> Self {
        TracedBody {
            inner,
            span: Some(span),
        }
    }
}

impl<B> Body for TracedBody<B>
where
    B: Body + Unpin,
    B::Error: std::fmt::Display,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => {
                this.span.take();
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(mut span) = this.span.take() {
                    span.fail("response_body_error", e.to_string());
                }
            }
            _ => {
                if this.inner.is_end_stream() {
                    this.span.take();
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::split_host;

    #[test]
    fn host_headers_split_like_authorities() {
        assert_eq!(
            split_host("shop.example:8080"),
            Some(("shop.example", Some(8080)))
        );
        assert_eq!(split_host("shop"), Some(("shop", None)));
        assert_eq!(split_host("[fd00::1]:80"), Some(("fd00::1", Some(80))));
        assert_eq!(split_host("[fd00::1]"), Some(("fd00::1", None)));
        for bad in [
            "",
            "a:b",
            "a:99999",
            "[fd00::1",
            "a b",
            "user@host",
            "h:80:90",
            ":80",
        ] {
            assert_eq!(split_host(bad), None, "{bad:?}");
        }
    }
}
