//! The span of one proxied request, from its headers to the end of its response body.

use std::borrow::Cow;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::SystemTime;

use http::{HeaderMap, Method, Version};
use http_body::{Body, Frame, SizeHint};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanKind, TraceContextExt, TraceFlags};
use opentelemetry::Context;
use opentelemetry_http::HeaderExtractor;
use opentelemetry_sdk::trace::{IdGenerator, SamplingDecision, ShouldSample};

use crate::metrics::Direction;

use super::correlate::{Candidates, Correlated, InflightGuard};
use super::encode::SpanWriter;
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
    pub client_address: Option<&'a str>,
    /// The Host header (or :authority); filled from the headers by [`Telemetry::server_span`]
    /// and [`Telemetry::client_span`].
    pub host: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    /// Outbound: the app's connection as the app sees it (its port, and what it connected to),
    /// which names the connection in the preload library's causal table.
    pub app_socket: Option<tracecar_causal::Key>,
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
    /// Keeps a header for the request only when it can be written as one: a token for a name,
    /// no control character but tab in the value. The lean HTTP/1 path writes these bytes
    /// as they are, so a line break from a propagator would start a header of the peer's
    /// choosing; the propagators here never write one (see `propagate`), and this makes sure.
    fn set(&mut self, key: &str, value: String) {
        use crate::rules::{is_field_byte, is_tchar};
        if key.is_empty() || !key.bytes().all(is_tchar) || !value.bytes().all(is_field_byte) {
            return;
        }
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
            // The known names are static and lowercase: no copy of the name; the value's
            // `String` becomes the header value without another copy.
            let name = match k {
                Cow::Borrowed(k) => Ok(http::header::HeaderName::from_static(k)),
                Cow::Owned(k) => http::header::HeaderName::from_bytes(k.as_bytes()),
            };
            let value = http::HeaderValue::from_maybe_shared(bytes::Bytes::from(v));
            if let (Ok(name), Ok(value)) = (name, value) {
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
    context: SpanContext,
    /// The span so far; `None` when it is not recorded (not sampled, or nothing exports).
    writer: Option<SpanWriter>,
    direction: Direction,
    /// Also the span's start time: one clock read serves both (and one more at the end).
    started: SystemTime,
    status: Option<u16>,
    /// `error.type`, written once when the span ends: a failure's own class wins over the
    /// status code (OTLP attribute keys are unique).
    error_type: Option<Cow<'static, str>>,
    /// The span's status is ERROR, with this description.
    error: Option<String>,
    telemetry: std::sync::Arc<Telemetry>,
    _inflight: Option<InflightGuard>,
    /// False for opaque connection spans, which are not HTTP requests.
    count_request: bool,
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

/// How the proxy tied a span to an inbound request (`tracecar.correlation`), and for an
/// ambiguous one the links to the candidates.
/// How a span's parent was found, as the span records it (the parent itself has gone into the
/// span's context). Large on purpose, like `Correlated`: on the stack, no `Box` per span.
#[allow(clippy::large_enum_variant)]
enum Mark {
    None,
    /// `tracecar.correlation` of a span parented by correlation.
    How(&'static str),
    /// No parent: a root linked to the candidates.
    Ambiguous(Candidates),
}

fn mark(w: &mut SpanWriter, found: &Mark) {
    match found {
        Mark::None => {}
        Mark::How(how) => w.str("tracecar.correlation", how),
        Mark::Ambiguous(candidates) => {
            w.str("tracecar.correlation", "ambiguous");
            for sc in candidates.newest() {
                w.link(sc);
            }
        }
    }
}

/// The request's attributes (SPEC: span attributes).
fn attributes(w: &mut SpanWriter, info: &RequestInfo<'_>) {
    w.str("http.request.method", method_name(info.method));
    w.str("url.path", info.path);
    w.str("url.scheme", info.scheme);
    w.str("network.protocol.version", protocol_version(info.version));
    // Inbound requests name their server in the Host header (or :authority).
    let host_header = info.host.and_then(split_host);
    let (address, port) = match (info.server_address, host_header) {
        (Some(a), _) => (Some(a), info.server_port),
        (None, Some((h, p))) => (Some(h), p.or(info.server_port)),
        (None, None) => (None, info.server_port),
    };
    if let Some(host) = address {
        // Both routers and `split_host` give it without IPv6 brackets.
        w.str("server.address", host);
    }
    if let Some(port) = port {
        w.int("server.port", port as i64);
    }
    if let Some(ip) = &info.client_address {
        w.str("client.address", ip);
    }
    if let Some(ua) = info.user_agent {
        w.str("user_agent.original", ua);
    }
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
            &Mark::None,
        );
        if let Some(c) = &self.correlator {
            rs._inflight = Some(c.inflight().enter(rs.context.clone()));
        }
        rs
    }

    /// Starts the CLIENT span of an outbound request. Without context in its headers, the span
    /// is tied to the inbound request that caused it as `TRACECAR_CORRELATION` says
    /// ([`super::correlate`]).
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
        let app_socket = info.app_socket;
        let (parent, correlated) = self.correlate(self.extract(extractor), app_socket);
        self.start(
            SpanKind::Client,
            info,
            injector,
            &parent,
            Direction::Outbound,
            &correlated,
        )
    }

    /// The parent of an outbound span: the context it carries, else what correlation finds.
    /// Requests that carry context, and every request with correlation off, never touch the
    /// in-flight table.
    fn correlate(
        &self,
        carried: Context,
        app_socket: Option<tracecar_causal::Key>,
    ) -> (Context, Mark) {
        if carried.span().span_context().is_valid() {
            return (carried, Mark::None);
        }
        let Some(correlator) = &self.correlator else {
            return (carried, Mark::None);
        };
        match correlator.correlate(app_socket) {
            Correlated::Parent { parent, how } => {
                (carried.with_remote_span_context(parent), Mark::How(how))
            }
            Correlated::Ambiguous(c) => (carried, Mark::Ambiguous(c)),
            Correlated::None => (carried, Mark::None),
        }
    }

    /// Starts the CLIENT span of a captured TLS connection, which the proxy passes through
    /// untouched: it knows only the server name (SNI) and the address.
    pub fn tls_span(
        self: &std::sync::Arc<Self>,
        sni: Option<&str>,
        dst: std::net::SocketAddr,
        app_socket: Option<tracecar_causal::Key>,
    ) -> RequestSpan {
        let (parent, correlated) = self.correlate(Context::new(), app_socket);
        let name: Cow<'static, str> = match sni {
            Some(s) => format!("TLS {s}").into(),
            None => "TLS".into(),
        };
        let mut rs = self.begin(SpanKind::Client, &name, &parent, false, Direction::Outbound);
        if let Some(w) = &mut rs.writer {
            let peer = dst.ip().to_string();
            w.str("network.transport", "tcp");
            w.bool("tls.established", true);
            w.int("server.port", dst.port() as i64);
            w.str("network.peer.address", &peer);
            w.str("server.address", sni.unwrap_or(&peer));
            mark(w, &correlated);
        }
        rs.count_request = false;
        rs
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

    /// An HTTP request's span, its context written to `injector`.
    fn start(
        self: &std::sync::Arc<Self>,
        kind: SpanKind,
        info: RequestInfo<'_>,
        injector: &mut dyn Injector,
        parent: &Context,
        direction: Direction,
        correlated: &Mark,
    ) -> RequestSpan {
        // Kubelet probes would be a trace every few seconds per container; they are still
        // proxied and counted.
        let probe = self.skip_probes
            && kind == SpanKind::Server
            && info
                .user_agent
                .is_some_and(|ua| ua.starts_with("kube-probe/"));
        let mut rs = self.begin(kind, method_name(info.method), parent, probe, direction);
        if let Some(w) = &mut rs.writer {
            attributes(w, &info);
            mark(w, correlated);
        }
        if let Some(w3c) = &self.w3c {
            w3c.inject(&rs.context, parent, injector);
        } else if let Some(p) = &self.propagator {
            let cx = parent.with_remote_span_context(rs.context.clone());
            p.inject_context(&cx, injector);
        }
        self.metrics.direction(direction).open_requests.inc();
        rs
    }

    /// A new span, child of `parent`: ids and the sampling decision as the SDK's tracer makes
    /// them (same samplers, same id generator), recorded only when sampled and exported.
    fn begin(
        self: &std::sync::Arc<Self>,
        kind: SpanKind,
        name: &str,
        parent: &Context,
        unsampled: bool,
        direction: Direction,
    ) -> RequestSpan {
        let started = SystemTime::now();
        let parent_span = parent.span();
        let parent_sc = parent_span.span_context();
        let trace_id = if parent_sc.is_valid() {
            parent_sc.trace_id()
        } else {
            self.ids.new_trace_id()
        };
        let (sampled, trace_state) = if unsampled {
            (false, parent_sc.trace_state().clone())
        } else {
            let r = self
                .sampler
                .should_sample(Some(parent), trace_id, name, &kind, &[], &[]);
            (
                r.decision == SamplingDecision::RecordAndSample,
                r.trace_state,
            )
        };
        // As the SDK's tracer: a sampled span keeps the parent's other flags, an unsampled one
        // gets none (B3's debug or deferred bits would otherwise force or defer sampling
        // downstream of a span that is not recorded).
        let flags = if sampled && parent_sc.is_valid() {
            parent_sc.trace_flags().with_sampled(true)
        } else if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        let context = SpanContext::new(trace_id, self.ids.new_span_id(), flags, false, trace_state);
        let writer = (sampled && self.queue.is_some()).then(|| {
            self.metrics.spans_started.inc();
            SpanWriter::start(&context, parent_sc, kind, name, started)
        });
        RequestSpan {
            context,
            writer,
            direction,
            started,
            status: None,
            error_type: None,
            error: None,
            telemetry: self.clone(),
            _inflight: None,
            count_request: true,
        }
    }
}

impl RequestSpan {
    pub fn span_context(&self) -> &SpanContext {
        &self.context
    }

    /// Records the proxy's local port of the app connection this inbound request went out on,
    /// where the preload library's table names causes (see `correlate`).
    pub fn set_app_port(&self, port: u16) {
        if let Some(guard) = &self._inflight {
            guard.set_app_port(port);
        }
    }

    /// Records the response status; 5xx (and 4xx on CLIENT spans) mark the span as an error.
    pub fn set_status(&mut self, status: http::StatusCode) {
        let code = status.as_u16();
        self.status = Some(code);
        let error = match self.direction {
            Direction::Inbound => code >= 500,
            Direction::Outbound => code >= 400,
        };
        if error {
            self.error_type
                .get_or_insert_with(|| Cow::Owned(code.to_string()));
            self.error.get_or_insert_with(String::new);
        }
    }

    /// Marks the request as failed without a response from upstream (`error.type`).
    pub fn fail(&mut self, error_type: &'static str, message: String) {
        self.error_type = Some(Cow::Borrowed(error_type));
        self.error = Some(message);
    }
}

impl Drop for RequestSpan {
    fn drop(&mut self) {
        let ended = SystemTime::now();
        if let Some(mut w) = self.writer.take() {
            if let Some(code) = self.status {
                w.int("http.response.status_code", code as i64);
            }
            if let Some(t) = &self.error_type {
                w.str("error.type", t);
            }
            let span = w.finish(ended, self.error.as_deref());
            if let Some(q) = &self.telemetry.queue {
                q.push(&span);
            }
        }
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
    use super::*;
    use crate::config::RunArgs;
    use crate::metrics::Metrics;
    use crate::trace::export::SpanRecord;
    use crate::trace::Sink;
    use clap::Parser;
    use opentelemetry::trace::{SpanId, Status};
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::sync::mpsc;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn telemetry(flags: &[&str]) -> (Arc<Telemetry>, mpsc::UnboundedReceiver<SpanRecord>) {
        let argv = ["t", "--bsp-schedule-delay", "10"].iter().chain(flags);
        let cfg = Cli::try_parse_from(argv)
            .expect("flags")
            .run
            .into_config()
            .expect("config");
        let (tx, rx) = mpsc::unbounded_channel();
        let t = Telemetry::new(&cfg, Sink::Channel(tx), Arc::new(Metrics::new())).expect("ok");
        (Arc::new(t), rx)
    }

    fn info() -> RequestInfo<'static> {
        RequestInfo {
            method: &Method::POST,
            path: "/orders",
            scheme: "http",
            version: Version::HTTP_11,
            server_address: None,
            server_port: Some(15143),
            client_address: Some("10.0.0.9"),
            host: None,
            user_agent: None,
            app_socket: None,
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, http::HeaderValue::from_static(v));
        }
        h
    }

    async fn exported(
        t: &Telemetry,
        rx: &mut mpsc::UnboundedReceiver<SpanRecord>,
    ) -> Vec<opentelemetry_sdk::trace::SpanData> {
        assert!(t.flush(Duration::from_secs(5)).await, "flushed");
        let mut out = Vec::new();
        while let Ok((_, span)) = rx.try_recv() {
            out.push(span);
        }
        out
    }

    fn attr(s: &opentelemetry_sdk::trace::SpanData, key: &str) -> Option<String> {
        s.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.to_string())
    }

    #[tokio::test]
    async fn continues_the_callers_trace_and_records_the_request() {
        let (t, mut rx) = telemetry(&[]);
        let mut h = headers(&[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("tracestate", "vendor=x"),
            ("host", "shop:8080"),
            ("user-agent", "curl/8.5"),
        ]);
        let mut span = t.server_span(info(), &mut h);
        let own = span.span_context().span_id();
        span.set_status(http::StatusCode::BAD_GATEWAY);
        drop(span);
        // The app sees the proxy's span as its parent, the caller's trace state kept.
        assert_eq!(
            h["traceparent"],
            format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{own}-01")
        );
        assert_eq!(h["tracestate"], "vendor=x");
        let spans = exported(&t, &mut rx).await;
        assert_eq!(spans.len(), 1);
        let s = &spans[0];
        assert_eq!(
            s.span_context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(s.span_context.span_id(), own);
        assert_eq!(s.parent_span_id, SpanId::from(0x00f067aa0ba902b7));
        assert!(s.parent_span_is_remote);
        assert!(s.span_context.is_sampled());
        assert_eq!(s.span_context.trace_state().header(), "vendor=x");
        assert_eq!(
            (s.span_kind.clone(), s.name.as_ref()),
            (SpanKind::Server, "POST")
        );
        assert!(s.end_time >= s.start_time);
        for (k, v) in [
            ("http.request.method", "POST"),
            ("url.path", "/orders"),
            ("url.scheme", "http"),
            ("network.protocol.version", "1.1"),
            ("server.address", "shop"),
            ("server.port", "8080"),
            ("client.address", "10.0.0.9"),
            ("user_agent.original", "curl/8.5"),
            ("http.response.status_code", "502"),
            ("error.type", "502"),
        ] {
            assert_eq!(attr(s, k).as_deref(), Some(v), "{k}");
        }
        assert_eq!(s.attributes.len(), 10, "each key once");
        assert_eq!(s.status, Status::error(""));
        assert_eq!(t.metrics.spans_started.get(), 1);
    }

    #[tokio::test]
    async fn a_root_span_starts_a_trace_and_a_failure_says_why() {
        let (t, mut rx) = telemetry(&[]);
        let mut h = HeaderMap::new();
        let mut span = t.client_span(info(), &mut h);
        span.fail("connection_refused", "connect: refused".into());
        let ctx = span.span_context().clone();
        drop(span);
        let spans = exported(&t, &mut rx).await;
        assert_eq!(spans.len(), 1);
        let s = &spans[0];
        assert!(ctx.is_valid() && ctx.is_sampled());
        assert_eq!(s.span_context.trace_id(), ctx.trace_id());
        assert_eq!(s.parent_span_id, SpanId::INVALID);
        assert!(!s.parent_span_is_remote);
        assert_eq!(s.span_kind, SpanKind::Client);
        assert_eq!(attr(s, "error.type").as_deref(), Some("connection_refused"));
        assert_eq!(attr(s, "http.response.status_code"), None);
        assert_eq!(s.status, Status::error("connect: refused"));
        assert!(h.get("tracestate").is_none(), "no empty tracestate");
    }

    #[tokio::test]
    async fn unsampled_parents_and_probes_propagate_without_a_span() {
        let (t, mut rx) = telemetry(&[]);
        let mut h = headers(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        )]);
        let span = t.server_span(info(), &mut h);
        let own = span.span_context().span_id();
        drop(span);
        assert_eq!(
            h["traceparent"],
            format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{own}-00")
        );
        let mut probe = headers(&[("user-agent", "kube-probe/1.31")]);
        drop(t.server_span(info(), &mut probe));
        assert!(probe["traceparent"].to_str().unwrap().ends_with("-00"));
        assert!(exported(&t, &mut rx).await.is_empty());
        assert_eq!(t.metrics.spans_started.get(), 0);
        // With probes traced, the probe is a span like any request.
        let (t, mut rx) = telemetry(&["--trace-probes", "true"]);
        drop(t.server_span(info(), &mut headers(&[("user-agent", "kube-probe/1.31")])));
        assert_eq!(exported(&t, &mut rx).await.len(), 1);
    }

    #[tokio::test]
    async fn an_unrecorded_span_passes_on_no_debug_flag() {
        // A B3 debug parent on a probe: the probe gets no span, so downstream must not be told
        // to force sampling (the debug bit) under the proxy's unrecorded span.
        let (t, mut rx) = telemetry(&["--propagators", "b3"]);
        let mut h = headers(&[
            ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-d"),
            ("user-agent", "kube-probe/1.31"),
        ]);
        let span = t.server_span(info(), &mut h);
        let own = span.span_context().span_id();
        drop(span);
        assert_eq!(h["b3"], format!("80f198ee56343ba864fe8b2a57d3eff7-{own}-0"));
        assert!(exported(&t, &mut rx).await.is_empty());
        // A sampled B3 parent on a request is recorded and says so downstream.
        let mut h = headers(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")]);
        let span = t.server_span(info(), &mut h);
        let own = span.span_context().span_id();
        drop(span);
        assert_eq!(h["b3"], format!("80f198ee56343ba864fe8b2a57d3eff7-{own}-1"));
        assert_eq!(exported(&t, &mut rx).await.len(), 1);
    }

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

    #[test]
    fn injected_headers_are_always_writable() {
        let mut inj = Injected::default();
        inj.set("baggage", "k=v;a\r\nx-evil: 1".into());
        inj.set("x bad", "v".into());
        inj.set("", "v".into());
        inj.set("tracestate", "a=\u{0}".into());
        assert!(inj.0.is_empty(), "{:?}", inj.0);
        inj.set("X-B3-Flags", "1\tobs-text é".into());
        assert_eq!(
            inj.0,
            [(Cow::Owned("x-b3-flags".into()), "1\tobs-text é".into())]
        );
    }

    /// Property tests: Host headers and whole requests' context headers, arbitrary and valid.
    mod fuzz {
        use super::*;
        use crate::fuzzing::{self, text};
        use proptest::prelude::*;

        use crate::fuzzing::RawHeaders as Raw;

        /// One telemetry per test thread: every format, nothing exported.
        fn all_formats() -> Arc<Telemetry> {
            thread_local! {
                static T: Arc<Telemetry> = {
                    let argv = [
                        "t",
                        "--traces-exporter",
                        "none",
                        "--propagators",
                        "tracecontext,baggage,b3,b3multi,jaeger",
                    ];
                    let cfg = Cli::try_parse_from(argv).expect("flags").run.into_config();
                    let cfg = cfg.expect("config");
                    let t = Telemetry::new(&cfg, Sink::FromConfig, Arc::new(Metrics::new()));
                    Arc::new(t.expect("telemetry"))
                };
            }
            T.with(Arc::clone)
        }

        /// Header names to fuzz with: every name the propagators write (so a new one is fuzzed
        /// too), and some they read or leave alone.
        fn names() -> Vec<&'static str> {
            let others = ["x-b3-flags", "uberctx-k", "host", "user-agent"];
            KNOWN_KEYS.iter().copied().chain(others).collect()
        }

        fn value() -> impl Strategy<Value = String> {
            let ch = prop_oneof![
                prop::sample::select(
                    &['\t', '-', ',', '=', ';', ':', '%', ' ', '0', 'f', 'D', 'A'][..]
                ),
                proptest::char::range(' ', '~'),
                proptest::char::range('\u{80}', '\u{10ffff}'),
            ];
            prop_oneof![
                prop::collection::vec(ch, 0..64).prop_map(String::from_iter),
                "00-[0-9a-f]{32}-[0-9a-f]{16}-0[0-3]",
                "[a-z]{1,5}=[a-zA-Z0-9%;=]{0,12}(,[a-z]{1,5}=[a-zA-Z0-9%;=]{0,12}){0,3}",
            ]
        }

        proptest! {
            #![proptest_config(fuzzing::config())]

            /// `split_host` never panics, and what it returns is a host from the header.
            #[test]
            fn fuzz_split_host(h in text()) {
                if let Some((host, port)) = split_host(&h) {
                    prop_assert!(!host.is_empty() && h.contains(host), "{h:?}");
                    prop_assert!(host.chars().all(|c| c.is_ascii_alphanumeric() || ".-_:%".contains(c)));
                    if let Some(p) = port {
                        let written = h.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok());
                        prop_assert_eq!(written, Some(p), "{:?}", h);
                    }
                }
            }

            #[test]
            fn fuzz_split_host_round_trip(
                host in "[a-z0-9][a-z0-9.-]{0,30}",
                v6 in any::<std::net::Ipv6Addr>(),
                ipv6 in any::<bool>(),
                port in prop::option::of(any::<u16>()),
            ) {
                let v6 = v6.to_string();
                let (written, want) = if ipv6 {
                    (format!("[{v6}]"), v6.as_str())
                } else {
                    (host.clone(), host.as_str())
                };
                let h = match port {
                    Some(p) => format!("{written}:{p}"),
                    None => written,
                };
                prop_assert_eq!(split_host(&h), Some((want, port)));
            }

            /// Arbitrary context headers through a real span start, both directions: what is
            /// written for the next hop is always a valid header, and a valid traceparent is
            /// continued.
            #[test]
            fn fuzz_span_start_over_arbitrary_headers(
                headers in prop::collection::vec(
                    (prop::sample::select(names()).prop_map(String::from), value()),
                    0..8,
                ),
                inbound in any::<bool>(),
            ) {
                let t = all_formats();
                let raw = Raw(headers);
                let host = raw.get("host");
                let info = RequestInfo { host, user_agent: raw.get("user-agent"), ..info() };
                let mut injected = Injected::default();
                let span = if inbound {
                    t.server_span_with(info, &raw, &mut injected)
                } else {
                    t.client_span_with(info, &raw, &mut injected)
                };
                for (k, v) in &injected.0 {
                    prop_assert!(
                        v.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f)),
                        "{k}: {v:?}"
                    );
                }
                prop_assert!(injected.replaces("traceparent"), "{:?}", injected.0);
                let tp = raw.get("traceparent").unwrap_or_default();
                let parent = SpanContext::new(
                    opentelemetry::trace::TraceId::from_hex(tp.get(3..35).unwrap_or("x"))
                        .unwrap_or(opentelemetry::trace::TraceId::INVALID),
                    SpanId::from_hex(tp.get(36..52).unwrap_or("x")).unwrap_or(SpanId::INVALID),
                    TraceFlags::default(),
                    true,
                    Default::default(),
                );
                let valid_w3c = tp.len() == 55 && tp.starts_with("00-") && parent.is_valid()
                    && tp.bytes().all(|b| b == b'-' || matches!(b, b'0'..=b'9' | b'a'..=b'f'));
                // (The other formats are read after tracecontext and would win.)
                let others = ["b3", "x-b3-traceid", "uber-trace-id"].iter().any(|h| raw.get(h).is_some());
                if valid_w3c && !others {
                    prop_assert_eq!(span.span_context().trace_id(), parent.trace_id());
                }
                // Everything written also goes into a HeaderMap (nothing silently dropped there).
                let n = injected.0.len();
                let mut map = HeaderMap::new();
                injected.apply(&mut map);
                prop_assert_eq!(map.len(), n);
            }
        }
    }

    /// A SERVER span in flight (its span not ended) and its context.
    fn inbound(t: &Arc<Telemetry>) -> (RequestSpan, SpanContext) {
        let span = t.server_span(info(), &mut HeaderMap::new());
        let cx = span.span_context().clone();
        (span, cx)
    }

    fn client(t: &Arc<Telemetry>, h: &mut HeaderMap) -> SpanContext {
        let span = t.client_span(info(), h);
        let cx = span.span_context().clone();
        drop(span);
        cx
    }

    async fn client_spans(
        t: &Telemetry,
        rx: &mut mpsc::UnboundedReceiver<SpanRecord>,
    ) -> Vec<opentelemetry_sdk::trace::SpanData> {
        let mut spans = exported(t, rx).await;
        spans.retain(|s| s.span_kind == SpanKind::Client);
        spans
    }

    #[tokio::test]
    async fn causal_parents_the_sole_inbound_request() {
        let (t, mut rx) = telemetry(&[]);
        let (_server, parent) = inbound(&t);
        let mut h = HeaderMap::new();
        let own = client(&t, &mut h);
        let spans = client_spans(&t, &mut rx).await;
        let s = &spans[0];
        assert_eq!(s.span_context.trace_id(), parent.trace_id());
        assert_eq!(s.parent_span_id, parent.span_id());
        assert_eq!(attr(s, "tracecar.correlation").as_deref(), Some("sole"));
        assert!(s.links.links.is_empty());
        // The peer sees the CLIENT span as its parent, in the inbound request's trace.
        assert_eq!(
            h["traceparent"],
            format!("00-{}-{}-01", parent.trace_id(), own.span_id())
        );
    }

    #[tokio::test]
    async fn causal_makes_a_linked_root_when_several_are_in_flight() {
        let (t, mut rx) = telemetry(&["--correlation", "causal"]);
        let (_a, a) = inbound(&t);
        let (_b, b) = inbound(&t);
        let mut h = HeaderMap::new();
        let own = client(&t, &mut h);
        let spans = client_spans(&t, &mut rx).await;
        let s = &spans[0];
        assert_eq!(s.parent_span_id, SpanId::INVALID, "no parent: a root");
        assert!(!s.parent_span_is_remote);
        assert_ne!(s.span_context.trace_id(), a.trace_id());
        assert_ne!(s.span_context.trace_id(), b.trace_id());
        assert_eq!(
            attr(s, "tracecar.correlation").as_deref(),
            Some("ambiguous")
        );
        let linked: Vec<_> = s.links.iter().map(|l| l.span_context.clone()).collect();
        assert_eq!(linked, vec![b.clone(), a.clone()], "newest first");
        // The context propagated to the peer is the new trace, not a guess.
        assert_eq!(
            h["traceparent"],
            format!("00-{}-{}-01", own.trace_id(), own.span_id())
        );
    }

    #[tokio::test]
    async fn ambiguous_links_are_bounded() {
        let (t, mut rx) = telemetry(&[]);
        let inflight: Vec<_> = (0..20).map(|_| inbound(&t)).collect();
        client(&t, &mut HeaderMap::new());
        let spans = client_spans(&t, &mut rx).await;
        let s = &spans[0];
        assert_eq!(
            attr(s, "tracecar.correlation").as_deref(),
            Some("ambiguous")
        );
        let linked: Vec<_> = s.links.iter().map(|l| l.span_context.span_id()).collect();
        let newest: Vec<_> = inflight
            .iter()
            .rev()
            .take(super::super::correlate::MAX_LINKS)
            .map(|(_, cx)| cx.span_id())
            .collect();
        assert_eq!(linked, newest);
    }

    #[tokio::test]
    async fn nothing_in_flight_or_context_carried_adds_no_attribute() {
        let (t, mut rx) = telemetry(&[]);
        client(&t, &mut HeaderMap::new());
        let (_a, _) = inbound(&t);
        let (_b, _) = inbound(&t);
        // Context from the app wins over correlation, however many are in flight.
        let mut h = headers(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )]);
        client(&t, &mut h);
        let spans = client_spans(&t, &mut rx).await;
        assert_eq!(spans.len(), 2);
        for s in &spans {
            assert_eq!(attr(s, "tracecar.correlation"), None);
            assert!(s.links.links.is_empty());
        }
        assert_eq!(spans[0].parent_span_id, SpanId::INVALID);
        assert_eq!(spans[1].parent_span_id, SpanId::from(0x00f067aa0ba902b7));
    }

    #[tokio::test]
    async fn inflight_guesses_and_off_does_nothing() {
        let (t, mut rx) = telemetry(&["--correlation", "inflight"]);
        let (a_span, a) = inbound(&t);
        client(&t, &mut HeaderMap::new());
        let (_b, b) = inbound(&t);
        client(&t, &mut HeaderMap::new());
        drop(a_span);
        let spans = client_spans(&t, &mut rx).await;
        assert_eq!(spans[0].parent_span_id, a.span_id());
        assert_eq!(
            attr(&spans[0], "tracecar.correlation").as_deref(),
            Some("sole")
        );
        assert_eq!(spans[1].parent_span_id, b.span_id(), "the newest");
        assert_eq!(
            attr(&spans[1], "tracecar.correlation").as_deref(),
            Some("inflight")
        );
        assert!(spans[1].links.links.is_empty());

        let (t, mut rx) = telemetry(&["--correlation", "off"]);
        let (_a, a) = inbound(&t);
        client(&t, &mut HeaderMap::new());
        let spans = client_spans(&t, &mut rx).await;
        assert_eq!(spans[0].parent_span_id, SpanId::INVALID);
        assert_ne!(spans[0].span_context.trace_id(), a.trace_id());
        assert_eq!(attr(&spans[0], "tracecar.correlation"), None);
    }

    #[tokio::test]
    async fn tls_connections_are_correlated_the_same_way() {
        let (t, mut rx) = telemetry(&[]);
        let dst = "10.0.0.7:443".parse().unwrap();
        let (a_span, a) = inbound(&t);
        drop(t.tls_span(Some("api.example"), dst, None));
        let (_b, b) = inbound(&t);
        drop(t.tls_span(Some("api.example"), dst, None));
        drop(a_span);
        let spans = client_spans(&t, &mut rx).await;
        assert_eq!(spans[0].parent_span_id, a.span_id());
        assert_eq!(
            attr(&spans[0], "tracecar.correlation").as_deref(),
            Some("sole")
        );
        assert_eq!(spans[1].parent_span_id, SpanId::INVALID);
        assert_eq!(
            attr(&spans[1], "tracecar.correlation").as_deref(),
            Some("ambiguous")
        );
        let linked: Vec<_> = spans[1]
            .links
            .iter()
            .map(|l| l.span_context.clone())
            .collect();
        assert_eq!(linked, vec![b, a]);
    }
}
