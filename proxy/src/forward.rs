//! Sending a request on to its upstream: pooled clients, hop-by-hop header hygiene, protocol
//! upgrades (WebSocket) and CONNECT tunnels.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

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
        }
    }
}

/// Pooled keep-alive clients, one per HTTP version the request arrived with.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// Idle app connections of the HTTP/1.1 path ([`crate::h1`]).
    pub idle: std::sync::Arc<crate::h1::IdlePool>,
    http1: Client<HttpConnector, Incoming>,
    http2: Client<HttpConnector, Incoming>,
}

impl Upstream {
    pub fn new(connect_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        connector.enforce_http(false);
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .build(connector.clone());
        let http2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(connector);
        Upstream {
            idle: Default::default(),
            http1,
            http2,
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
        let mut resp = match client.request(req).await {
            Ok(r) => r,
            Err(e) => return Err((classify(target, &e), span)),
        };
        span.set_status(resp.status());
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        remove_hop_by_hop(resp.headers_mut(), switching);
        if switching {
            if let Some(client_upgrade) = client_upgrade {
                let upstream_upgrade = hyper::upgrade::on(&mut resp);
                tokio::spawn(async move {
                    // The span lasts as long as the upgraded connection.
                    let _span = span;
                    if let (Ok(a), Ok(b)) = (client_upgrade.await, upstream_upgrade.await) {
                        let _ = tokio::io::copy_bidirectional(
                            &mut TokioIo::new(a),
                            &mut TokioIo::new(b),
                        )
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
        if let Some(io) = inner.downcast_ref::<std::io::Error>() {
            kind = io.kind();
            break;
        }
        source = inner.source();
    }
    connect_failure(target, kind, error_chain(e))
}

/// An error and its sources, `outer: inner: ...`, for span statuses and log lines.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

fn wants_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
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
    // HTTP/1 peers need a Host header; keep the one the client sent.
    if req.version() != Version::HTTP_2 && !req.headers().contains_key(header::HOST) {
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
const HOP_BY_HOP: [HeaderName; 5] = [
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    header::TRANSFER_ENCODING,
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
