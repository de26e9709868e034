//! Sending a request on to its upstream: pooled clients, hop-by-hop header hygiene, protocol
//! upgrades (WebSocket) and CONNECT tunnels.

use crate::errors::error_chain;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::idle::IdleIo;
use crate::rules::OwnPorts;
use crate::trace::{RequestSpan, TracedBody};

/// The body of every response the proxy sends back.
pub type ProxyBody = http_body_util::Either<TracedBody<Incoming>, Full<Bytes>>;

/// Why a request could not be forwarded; the variant is the span's `error.type`.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("connection refused by {0}")]
    Refused(String),
    #[error("timed out connecting to {0}")]
    Timeout(String),
    #[error("cannot reach {target}: {message}")]
    Connect { target: String, message: String },
    #[error("upstream {target} failed: {message}")]
    Upstream { target: String, message: String },
    #[error("no destination for the request: {0}")]
    NoTarget(&'static str),
    #[error("{0} is this proxy's own listener: the request would loop")]
    Loop(String),
    #[error("{0} did not start its response in time")]
    ResponseTimeout(String),
    /// Reading the request body from the client failed.
    #[error("the request body could not be read: {1}")]
    ClientBody(BodyFailure, String),
}

impl ForwardError {
    /// A low-cardinality class for the span's `error.type`.
    pub fn error_type(&self) -> &'static str {
        match self {
            ForwardError::Refused(_) => "connection_refused",
            ForwardError::Timeout(_) => "connect_timeout",
            ForwardError::Connect { .. } => "connect_error",
            ForwardError::Upstream { .. } => "upstream_error",
            ForwardError::NoTarget(_) => "no_destination",
            ForwardError::Loop(_) => "loop_detected",
            ForwardError::ResponseTimeout(_) => "response_timeout",
            ForwardError::ClientBody(BodyFailure::Malformed, _) => "malformed_request",
            ForwardError::ClientBody(BodyFailure::Stalled, _) => "stream_idle_timeout",
            ForwardError::ClientBody(BodyFailure::Gone, _) => "client_error",
        }
    }

    /// The status the client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            ForwardError::Loop(_) => StatusCode::LOOP_DETECTED,
            ForwardError::ResponseTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ForwardError::ClientBody(BodyFailure::Stalled, _) => StatusCode::REQUEST_TIMEOUT,
            ForwardError::ClientBody(..) => StatusCode::BAD_REQUEST,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

/// A request body on its way to the peer that says when it has all gone (or was dropped).
pub struct SentBody {
    body: Incoming,
    sent: Option<tokio::sync::oneshot::Sender<()>>,
}

impl http_body::Body for SentBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None | Some(Err(_)))) {
            if let Some(sent) = self.sent.take() {
                let _ = sent.send(());
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// How reading a client's request body failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFailure {
    /// Malformed framing (400).
    Malformed,
    /// It stopped arriving for the stream idle timeout (408).
    Stalled,
    /// The client went away (400, which it will not read).
    Gone,
}

/// hyper's connector, refusing a connection that reached one of the proxy's own listeners
/// (see [`OwnPorts`]).
#[derive(Debug, Clone)]
pub struct GuardedConnector {
    inner: HttpConnector,
    own: OwnPorts,
    stream_idle: Duration,
}

/// The error [`GuardedConnector`] gives for a connection to the proxy itself.
#[derive(Debug, thiserror::Error)]
#[error("the destination is this proxy's own listener")]
pub struct LoopError;

impl tower::Service<Uri> for GuardedConnector {
    type Response = TokioIo<IdleIo<tokio::net::TcpStream>>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let connecting = self.inner.call(dst);
        let own = self.own;
        let idle = self.stream_idle;
        Box::pin(async move {
            let io = connecting.await?.into_inner();
            if own.check(&io) {
                return Err(LoopError.into());
            }
            // A response body the app stops sending in the middle ends after the stream idle
            // timeout (idle pooled connections are closed long before it).
            Ok(TokioIo::new(IdleIo::fixed(io, idle)))
        })
    }
}

/// Idle pooled app connections older than this are closed rather than reused (both paths).
pub const POOL_IDLE: Duration = Duration::from_secs(90);
/// Idle app connections kept per destination (both paths).
pub const POOL_MAX_PER_TARGET: usize = 256;

/// Pooled keep-alive clients, one per HTTP version the request arrived with.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// Idle app connections of the HTTP/1.1 path ([`crate::h1`]).
    pub idle: std::sync::Arc<crate::h1::IdlePool>,
    http1: Client<GuardedConnector, SentBody>,
    http2: Client<GuardedConnector, SentBody>,
    response_head_timeout: Option<Duration>,
    /// How long an upgraded connection may go silent.
    stream_idle: Duration,
}

impl Upstream {
    /// `own`: the listener ports a connection must not reach (the proxy itself).
    pub fn with_limits(limits: &crate::config::Limits, own: OwnPorts) -> Self {
        let mut inner = HttpConnector::new();
        inner.set_nodelay(true);
        inner.set_connect_timeout(Some(limits.connect_timeout));
        inner.enforce_http(false);
        let connector = GuardedConnector {
            inner,
            own,
            // A little longer than the client side's limit: when a client stalls mid-upload,
            // both sides go silent together, and the client's side must be the one that ends
            // it (408, not 502).
            stream_idle: limits.stream_idle_timeout + Duration::from_secs(1),
        };
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_max_idle_per_host(POOL_MAX_PER_TARGET)
            .build(connector.clone());
        let http2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(connector);
        Upstream {
            idle: Default::default(),
            http1,
            http2,
            response_head_timeout: limits.response_head_timeout,
            stream_idle: limits.stream_idle_timeout,
        }
    }

    /// Sends `req` to `target` (`host:port`) and returns the response with `span` attached to
    /// its body. An upgrade (101) is spliced end to end.
    pub async fn forward(
        &self,
        mut req: Request<Incoming>,
        target: &str,
        mut span: RequestSpan,
    ) -> Result<Response<ProxyBody>, (ForwardError, RequestSpan)> {
        let upgrade = wants_upgrade(&req);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        if let Err(e) = prepare(&mut req, target, upgrade) {
            return Err((e, span));
        }
        let client = match req.version() {
            Version::HTTP_2 => &self.http2,
            _ => &self.http1,
        };
        // The response head timeout runs once the request body has gone out (as on the lean
        // path and in nginx): a slow upload is not a slow app. Only a body that is still to
        // come needs telling when it has gone (an empty one goes out with the head), and only
        // when there is a timeout to start: no channel otherwise.
        let mut sent = None;
        let req = req.map(|body| {
            let tell = (self.response_head_timeout.is_some() && !body.is_end_stream()).then(|| {
                let (tx, rx) = tokio::sync::oneshot::channel();
                sent = Some(rx);
                tx
            });
            SentBody { body, sent: tell }
        });
        let responded = client.request(req);
        let responded = match self.response_head_timeout {
            Some(limit) => {
                let timer = async {
                    if let Some(sent) = sent {
                        let _ = sent.await;
                    }
                    tokio::time::sleep(limit).await;
                };
                tokio::select! {
                    r = responded => r,
                    () = timer => {
                        return Err((ForwardError::ResponseTimeout(target.to_string()), span))
                    }
                }
            }
            None => responded.await,
        };
        let mut resp = match responded {
            Ok(r) => r,
            Err(e) => return Err((classify(target, &e), span)),
        };
        span.set_status(resp.status());
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        remove_hop_by_hop(resp.headers_mut(), switching);
        if switching {
            let stream_idle = self.stream_idle;
            if let Some(client_upgrade) = client_upgrade {
                let upstream_upgrade = hyper::upgrade::on(&mut resp);
                tokio::spawn(async move {
                    // The span lasts as long as the upgraded connection.
                    let _span = span;
                    if let (Ok(a), Ok(b)) = (client_upgrade.await, upstream_upgrade.await) {
                        let _ = crate::idle::splice(TokioIo::new(a), TokioIo::new(b), stream_idle)
                            .await;
                    }
                });
                let (parts, _) = resp.into_parts();
                return Ok(Response::from_parts(
                    parts,
                    http_body_util::Either::Right(Full::new(Bytes::new())),
                ));
            }
        }
        Ok(resp.map(|b| http_body_util::Either::Left(TracedBody::new(b, span))))
    }
}

/// A TCP connection to `target` (`host:port`) within `timeout`, with Nagle off; the failure
/// classified for the span. Every path that connects (both HTTP paths, CONNECT tunnels, spliced
/// connections) goes through here.
pub async fn connect_tcp(
    target: &str,
    timeout: Duration,
) -> Result<tokio::net::TcpStream, ForwardError> {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(target)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) => Err(connect_failure(target, e.kind(), e.to_string())),
        Err(_) => Err(ForwardError::Timeout(target.to_string())),
    }
}

/// A failed connect, by the kind of its I/O error: one classification for both HTTP paths.
fn connect_failure(target: &str, kind: std::io::ErrorKind, message: String) -> ForwardError {
    match kind {
        std::io::ErrorKind::ConnectionRefused => ForwardError::Refused(target.to_string()),
        std::io::ErrorKind::TimedOut => ForwardError::Timeout(target.to_string()),
        _ => ForwardError::Connect {
            target: target.to_string(),
            message,
        },
    }
}

/// A short plain-text response made by the proxy itself (502, 400, ...).
pub fn local_response(status: StatusCode, message: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut resp = Response::new(http_body_util::Either::Right(Full::new(message.into())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp.headers_mut()
        .insert("x-tracecar-error", HeaderValue::from_static("1"));
    resp
}

fn classify(target: &str, e: &hyper_util::client::legacy::Error) -> ForwardError {
    // The request body hyper was sending failed: that is the client's body (malformed chunked
    // framing, or the client went away), not the app.
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        if inner
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_user)
        {
            let mut why = BodyFailure::Gone;
            for e in std::iter::successors(inner.source(), |e| e.source()) {
                let kind = e.downcast_ref::<std::io::Error>().map(std::io::Error::kind);
                if matches!(
                    kind,
                    Some(std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput)
                ) || e
                    .downcast_ref::<hyper::Error>()
                    .is_some_and(hyper::Error::is_parse)
                {
                    why = BodyFailure::Malformed;
                } else if kind == Some(std::io::ErrorKind::TimedOut) {
                    why = BodyFailure::Stalled;
                }
            }
            return ForwardError::ClientBody(why, error_chain(e));
        }
        source = inner.source();
    }
    if !e.is_connect() {
        return ForwardError::Upstream {
            target: target.to_string(),
            message: error_chain(e),
        };
    }
    // The I/O error under hyper's connect error says what happened, as on the lean path.
    let mut source = std::error::Error::source(e);
    let mut kind = std::io::ErrorKind::Other;
    while let Some(inner) = source {
        if inner.is::<LoopError>() {
            return ForwardError::Loop(target.to_string());
        }
        if let Some(io) = inner.downcast_ref::<std::io::Error>() {
            kind = io.kind();
            break;
        }
        source = inner.source();
    }
    connect_failure(target, kind, error_chain(e))
}

/// An upgrade the peer may take (WebSocket and the like). `h2c` is not passed on: the proxy
/// speaks HTTP/1.1 to the peer, and an h2c upgrade could not be followed (Envoy drops it too).
fn wants_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().get(header::UPGRADE).is_some_and(|u| {
            !u.as_bytes()
                .split(|b| *b == b',')
                .all(|p| p.trim_ascii().eq_ignore_ascii_case(b"h2c"))
        })
        && connection_has(req.headers(), "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Points the request at `target` (origin-form path kept) and strips hop-by-hop headers.
fn prepare(req: &mut Request<Incoming>, target: &str, upgrade: bool) -> Result<(), ForwardError> {
    let authority: http::uri::Authority = target
        .parse()
        .map_err(|_| ForwardError::NoTarget("the destination is not a valid authority"))?;
    // HTTP/1 peers need a Host header: an absolute-form target's authority replaces the one
    // the client sent (RFC 9112 §3.2.2), else the client's is kept.
    if req.version() != Version::HTTP_2 {
        if let Some(a) = req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            req.headers_mut().insert(header::HOST, a);
        }
    }
    // Reuse the request's own path and query rather than formatting and re-parsing a URI.
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    *req.uri_mut() = Uri::from_parts(parts)
        .map_err(|_| ForwardError::NoTarget("the destination is not a valid authority"))?;
    remove_hop_by_hop(req.headers_mut(), upgrade);
    Ok(())
}

/// Connection-specific headers that are never forwarded (constants: no parsing per request).
const HOP_BY_HOP: [HeaderName; 4] = [
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

/// RFC 9110 §7.6.1: connection-specific headers don't cross the proxy, except the ones an
/// upgrade needs and `te: trailers` (gRPC).
pub fn remove_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        if !(upgrade && name == header::UPGRADE) {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    // hyper frames the body again: a bare `chunked` goes (it adds its own), but codings before
    // it (`gzip, chunked`) are the message's and must reach the peer, with chunked last, which
    // hyper then keeps as the framing.
    let other_codings = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|c| {
            let c = c.trim_ascii();
            !c.is_empty() && !c.eq_ignore_ascii_case(b"chunked")
        });
    if !other_codings {
        headers.remove(header::TRANSFER_ENCODING);
    }
    let trailers_only = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("trailers"));
    if !trailers_only {
        headers.remove(header::TE);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_but_keeps_te_trailers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h, false);
        assert!(
            !h.contains_key("x-secret")
                && !h.contains_key("keep-alive")
                && !h.contains_key(header::CONNECTION)
        );
        assert_eq!(h[header::TE], "trailers");
        assert_eq!(h["x-keep"], "1");
    }

    #[test]
    fn upgrade_keeps_upgrade_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        remove_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }
}
