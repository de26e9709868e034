//! The traced HTTP hop shared by both listeners: start a span, pick the destination, forward,
//! end the span with the response.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::Watcher;
use tokio::net::TcpStream;

use crate::forward::{connect_tcp, local_response, ForwardError, ProxyBody, Upstream};
use crate::metrics::Direction;
use crate::trace::span::RequestInfo;
use crate::trace::Telemetry;

/// What one listener shares with its connections.
#[derive(Debug)]
pub struct Shared {
    pub direction: Direction,
    pub telemetry: Arc<Telemetry>,
    pub upstream: Upstream,
    pub connect_timeout: Duration,
    pub limits: crate::config::Limits,
    /// The listener's port, to refuse forward-proxy requests addressed to the proxy itself.
    pub listen_port: u16,
}

/// One accepted connection's view: who sent it and where its requests go.
#[derive(Debug)]
pub struct Conn {
    pub shared: Arc<Shared>,
    /// Fixed destination (original destination, or the inbound target); `None` on the outbound
    /// listener means forward-proxy routing by the request itself.
    pub target: Option<Arc<str>>,
    /// The peer's address as text for inbound spans' `client.address`, made once per
    /// connection; `None` on the outbound listener, whose spans do not carry it.
    pub peer_ip: Option<Box<str>>,
}

/// Serves HTTP/1 and HTTP/2 on `stream` until it closes or shutdown asks it to: plain HTTP/1.1
/// on the lean path ([`crate::h1`]), the rest (from the first request that needs it) with hyper.
/// `http2`: detection already saw the HTTP/2 preface, so hyper serves it from the start.
pub async fn serve(
    conn: Conn,
    mut stream: TcpStream,
    http2: bool,
    watcher: Watcher,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let conn = Arc::new(conn);
    if http2 || !conn.shared.limits.http1_lean {
        return serve_hyper(conn, Rewind::new(bytes::BytesMut::new(), stream), watcher).await;
    }
    let read = match crate::h1::serve(&conn, &mut stream, shutdown).await {
        crate::h1::Outcome::Done => return,
        crate::h1::Outcome::Fallback(read) => read,
    };
    serve_hyper(conn, Rewind::new(read, stream), watcher).await
}

/// Serves the connection with hyper (HTTP/1 and HTTP/2).
async fn serve_hyper(conn: Arc<Conn>, stream: Rewind, watcher: Watcher) {
    let direction = conn.shared.direction;
    let metrics = conn.shared.telemetry.metrics.clone();
    let svc = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(conn.handle(req).await) }
    });
    let mut builder = auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder.http1().keep_alive(true).half_close(true);
    let served = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
    if let Err(e) = watcher.watch(served.into_owned()).await {
        // hyper has already answered a request it could not parse with 400.
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(|h| h.is_parse() || h.is_parse_status())
        {
            metrics.direction(direction).malformed.inc();
            tracing::debug!(error = %e, "malformed request");
        }
    }
}

/// A connection with bytes already read from it put back in front.
#[derive(Debug)]
pub struct Rewind {
    read: bytes::BytesMut,
    inner: TcpStream,
}

impl Rewind {
    pub fn new(read: bytes::BytesMut, inner: TcpStream) -> Self {
        Rewind { read, inner }
    }
}

impl tokio::io::AsyncRead for Rewind {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            bytes::Buf::advance(&mut self.read, n);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Rewind {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Why the proxy answers a request itself instead of forwarding it.
#[derive(Debug, Clone, Copy)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: &'static str,
}

/// The answer when a connection was not redirected and `TRACECAR_INBOUND_TARGET` is unset.
pub const NO_TARGET: &str = "not redirected and TRACECAR_INBOUND_TARGET is unset";
pub const NO_TARGET_MESSAGE: &str =
    "tracecar: no destination for the request: not redirected and TRACECAR_INBOUND_TARGET is unset\n";

impl Shared {
    /// Forward-proxy routing, for both HTTP paths: the request's authority (absolute-form URI,
    /// else `Host`) as host and port. No authority (400) and the proxy's own listener (508, which
    /// would loop until file descriptors run out) are refused and counted as malformed.
    pub fn route<'a>(&self, authority: Option<&'a str>) -> Result<(&'a str, u16), Refusal> {
        let refuse = |status, message| {
            self.telemetry.metrics.outbound.malformed.inc();
            Err(Refusal { status, message })
        };
        // Userinfo (`user@host`) names no destination.
        let authority = authority.map(|a| a.rsplit_once('@').map_or(a, |(_, h)| h));
        let Some((host, port)) = authority.and_then(crate::trace::span::split_host) else {
            return refuse(
                StatusCode::BAD_REQUEST,
                "tracecar: request names no destination (absolute URI or Host header)\n",
            );
        };
        let port = port.unwrap_or(80);
        if port == self.listen_port && crate::config::is_local_host(host) {
            return refuse(
                StatusCode::LOOP_DETECTED,
                "tracecar: the request is addressed to the proxy itself\n",
            );
        }
        Ok((host, port))
    }
}

/// `host:port` for a connect, IPv6 literals in brackets.
pub fn target_of(host: &str, port: u16) -> Arc<str> {
    if host.contains(':') {
        format!("[{host}]:{port}").into()
    } else {
        format!("{host}:{port}").into()
    }
}

fn split_authority(a: &http::uri::Authority, default_port: u16) -> (String, u16) {
    let host = a.host().trim_matches(|c| c == '[' || c == ']');
    (host.to_string(), a.port_u16().unwrap_or(default_port))
}

impl Conn {
    async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let shared = &self.shared;
        if req.method() == Method::CONNECT
            && self.target.is_none()
            && shared.direction == Direction::Outbound
        {
            return self.tunnel(req).await;
        }
        // Forward-proxy routing: absolute-form URI, else Host.
        let routed: Option<(String, u16)> = match &self.target {
            Some(_) => None,
            None if shared.direction == Direction::Outbound => {
                let authority = req.uri().authority().map(|a| a.as_str()).or_else(|| {
                    req.headers()
                        .get(http::header::HOST)
                        .and_then(|h| h.to_str().ok())
                });
                match shared.route(authority) {
                    Ok((host, port)) => Some((host.to_owned(), port)),
                    Err(r) => return local_response(r.status, r.message),
                }
            }
            None => None,
        };
        // Split the request so the span can read the URI while it writes the headers.
        let (mut parts, body) = req.into_parts();
        let info = RequestInfo {
            method: &parts.method,
            path: parts.uri.path(),
            scheme: "http",
            version: parts.version,
            server_address: routed.as_ref().map(|(h, _)| h.as_str()),
            server_port: routed.as_ref().map(|(_, p)| *p),
            client_address: self.peer_ip.as_deref(),
            host: None,
            user_agent: None,
        };
        let mut span = match shared.direction {
            Direction::Inbound => shared.telemetry.server_span(info, &mut parts.headers),
            Direction::Outbound => shared.telemetry.client_span(info, &mut parts.headers),
        };
        let req = Request::from_parts(parts, body);
        let target = match (&self.target, &routed) {
            (Some(t), _) => t.clone(),
            (None, Some((h, p))) => target_of(h, *p),
            (None, None) => {
                let e = ForwardError::NoTarget(NO_TARGET);
                span.set_status(StatusCode::BAD_GATEWAY);
                span.fail(e.error_type(), e.to_string());
                return local_response(StatusCode::BAD_GATEWAY, NO_TARGET_MESSAGE);
            }
        };
        match shared.upstream.forward(req, &target, span).await {
            Ok(resp) => resp,
            Err((e, mut span)) => {
                tracing::debug!(error = %e, "upstream failed");
                span.set_status(StatusCode::BAD_GATEWAY);
                span.fail(e.error_type(), e.to_string());
                local_response(StatusCode::BAD_GATEWAY, format!("tracecar: {e}\n"))
            }
        }
    }

    /// `CONNECT host:port`: open the tunnel, answer 200, then splice bytes both ways.
    async fn tunnel(&self, mut req: Request<Incoming>) -> Response<ProxyBody> {
        let shared = &self.shared;
        let Some(authority) = req.uri().authority().cloned() else {
            shared.telemetry.metrics.outbound.malformed.inc();
            return local_response(
                StatusCode::BAD_REQUEST,
                "tracecar: CONNECT needs host:port\n",
            );
        };
        let (host, port) = split_authority(&authority, 443);
        let method = Method::CONNECT;
        let info = RequestInfo {
            method: &method,
            path: "",
            scheme: "http",
            version: req.version(),
            server_address: Some(&host),
            server_port: Some(port),
            client_address: None,
            host: None,
            user_agent: None,
        };
        let mut span = shared.telemetry.client_span(info, req.headers_mut());
        let upstream = match connect_tcp(&target_of(&host, port), shared.connect_timeout).await {
            Ok(s) => s,
            Err(e) => {
                span.set_status(StatusCode::BAD_GATEWAY);
                span.fail(e.error_type(), e.to_string());
                return local_response(StatusCode::BAD_GATEWAY, format!("tracecar: {e}\n"));
            }
        };
        span.set_status(StatusCode::OK);
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let _span = span; // open for the tunnel's lifetime
            if let Ok(upgraded) = on_upgrade.await {
                let mut upstream = upstream;
                let _ =
                    tokio::io::copy_bidirectional(&mut TokioIo::new(upgraded), &mut upstream).await;
            }
        });
        let mut resp = Response::new(http_body_util::Either::Right(http_body_util::Full::new(
            Bytes::new(),
        )));
        *resp.status_mut() = StatusCode::OK;
        resp
    }
}
