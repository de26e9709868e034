//! The traced HTTP hop shared by both listeners: start a span, pick the destination, forward,
//! end the span with the response.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::Watcher;
use tokio::net::TcpStream;

use crate::forward::{connect_tcp, local_response, ForwardError, ProxyBody, Upstream};
use crate::idle::{IdleIo, InFlight, InFlightGuard};
use crate::metrics::Direction;
use crate::rules::{self, HopMarker, OwnPorts, Refusal};
use crate::trace::span::RequestInfo;
use crate::trace::Telemetry;

/// What one listener shares with its connections.
#[derive(Debug)]
pub struct Shared {
    pub direction: Direction,
    pub telemetry: Arc<Telemetry>,
    pub upstream: Upstream,
    pub limits: crate::config::Limits,
    /// The listener's port, to refuse forward-proxy requests addressed to the proxy itself.
    pub listen_port: u16,
    /// The listener ports a connection from this listener must not reach.
    pub own: OwnPorts,
    /// This proxy's `Via` mark, added to requests sent out and recognised when one comes back.
    pub hop: HopMarker,
    /// Client connections open on this listener, over all workers.
    pub open: Arc<std::sync::atomic::AtomicUsize>,
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
    /// The app's end of an outbound connection, for correlation; `None` inbound.
    pub app_socket: Option<tracecar_causal::Key>,
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

/// Serves the connection with hyper (HTTP/1 and HTTP/2). The connection may sit idle between
/// requests for the idle timeout, and go silent with a request open for the stream idle timeout;
/// an HTTP/1 request head must arrive within the request head timeout.
async fn serve_hyper(conn: Arc<Conn>, stream: Rewind, watcher: Watcher) {
    let direction = conn.shared.direction;
    let metrics = conn.shared.telemetry.metrics.clone();
    let limits = conn.shared.limits;
    let in_flight = InFlight::default();
    let requests = in_flight.clone();
    let svc = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        let guard = requests.enter();
        async move {
            let resp = conn.handle(req).await;
            // Open until the response body has been sent.
            Ok::<_, Infallible>(resp.map(|body| GuardedBody {
                body,
                _guard: guard,
            }))
        }
    });
    let io = IdleIo::new(
        stream,
        limits.idle_timeout,
        limits.stream_idle_timeout,
        in_flight,
    );
    let mut builder = auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .http1()
        .keep_alive(true)
        .half_close(true)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.request_head_timeout)
        // The lean path's head limit: a larger head gets 431 (hyper's minimum is 8 KiB).
        .max_buf_size(crate::h1::MAX_HEAD + 1024);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(None);
    let served = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    if let Err(e) = watcher.watch(served.into_owned()).await {
        // hyper has already answered a request it could not parse with 400.
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(|h| h.is_parse() || h.is_parse_status())
        {
            metrics.direction(direction).malformed.inc();
            tracing::debug!(error = %e, "malformed request");
        } else if e
            .downcast_ref::<hyper::Error>()
            .is_some_and(|h| h.is_timeout())
        {
            metrics
                .direction(direction)
                .timeout(crate::metrics::Timeout::RequestHead);
        } else if crate::errors::error_chain(&*e).contains("idle for too long") {
            metrics
                .direction(direction)
                .timeout(crate::metrics::Timeout::Idle);
        }
    }
}

/// A response body that keeps its request counted as in flight until it has been sent.
struct GuardedBody {
    body: ProxyBody,
    _guard: InFlightGuard,
}

impl http_body::Body for GuardedBody {
    type Data = Bytes;
    type Error = <ProxyBody as http_body::Body>::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
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

/// The answer when a connection was not redirected and `TRACECAR_INBOUND_TARGET` is unset.
pub const NO_TARGET: &str = "not redirected and TRACECAR_INBOUND_TARGET is unset";
pub const NO_TARGET_MESSAGE: &str =
    "tracecar: no destination for the request: not redirected and TRACECAR_INBOUND_TARGET is unset\n";

impl Shared {
    /// Counts a request the proxy answers itself: a loop, or a malformed request.
    pub fn count_refusal(&self, r: Refusal) {
        let metrics = self.telemetry.metrics.direction(self.direction);
        if r.status == StatusCode::LOOP_DETECTED {
            metrics.loops.inc();
        } else {
            metrics.malformed.inc();
        }
    }

    /// Forward-proxy routing, for both HTTP paths: the request's authority (absolute-form URI,
    /// else `Host`) as host and port. No authority or userinfo (400) and the proxy's own
    /// listener by a local name (508) are refused and counted; other spellings of the proxy's
    /// own address are caught once connected ([`OwnPorts`]).
    pub fn route<'a>(&self, authority: Option<&'a str>) -> Result<(&'a str, u16), Refusal> {
        let refuse = |r: Refusal| {
            self.count_refusal(r);
            Err(r)
        };
        if let Some(Err(r)) = authority.map(|a| rules::check_authority(a.as_bytes())) {
            return refuse(r);
        }
        let Some((host, port)) = authority.and_then(crate::trace::span::split_host) else {
            return refuse(rules::NO_AUTHORITY);
        };
        let port = port.unwrap_or(80);
        if port == self.listen_port && crate::config::is_local_host(host) {
            return refuse(rules::LOOP);
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
    async fn handle(&self, mut req: Request<Incoming>) -> Response<ProxyBody> {
        let shared = &self.shared;
        let outbound = shared.direction == Direction::Outbound;
        if req.method() == Method::CONNECT {
            return match &self.target {
                None if outbound => self.tunnel(req).await,
                Some(target) => self.tunnel_through(req, target.clone()).await,
                // Inbound without a destination: answered below (502).
                None => self.forward_or_answer(req).await,
            };
        }
        let refusal = self.check(&req);
        if let Err(r) = refusal {
            shared.count_refusal(r);
            return local_response(r.status, r.message);
        }
        let headers = req.headers_mut();
        if outbound {
            if let Ok(v) = http::HeaderValue::from_str(shared.hop.value()) {
                headers.append(http::header::VIA, v);
            }
        } else if headers.contains_key(http::header::VIA) {
            // Our own mark on a request that came back in through the app is not passed on.
            let kept: Vec<_> = headers
                .get_all(http::header::VIA)
                .iter()
                .filter(|v| v.as_bytes() != shared.hop.value().as_bytes())
                .cloned()
                .collect();
            headers.remove(http::header::VIA);
            for v in kept {
                headers.append(http::header::VIA, v);
            }
        }
        self.forward_or_answer(req).await
    }

    /// The request rules the lean path applies (see [`rules`]), on hyper's parsed head.
    fn check(&self, req: &Request<Incoming>) -> Result<(), Refusal> {
        let headers = req.headers();
        // hyper refuses a head larger than its buffer only when it arrives in pieces.
        let uri = req.uri();
        let head_size = uri.scheme_str().map_or(0, str::len)
            + uri.authority().map_or(0, |a| a.as_str().len())
            + uri.path_and_query().map_or(0, |p| p.as_str().len())
            + headers
                .iter()
                .map(|(n, v)| n.as_str().len() + v.len() + 4)
                .sum::<usize>();
        if head_size > crate::h1::MAX_HEAD {
            return Err(rules::TOO_LARGE);
        }
        for (seen, value) in headers.get_all(http::header::HOST).iter().enumerate() {
            rules::check_host(seen, value.as_bytes())?;
        }
        if let Some(a) = req.uri().authority() {
            rules::check_authority(a.as_str().as_bytes())?;
        }
        let outbound = self.shared.direction == Direction::Outbound;
        let mut vias = headers.get_all(http::header::VIA).iter();
        if outbound && vias.any(|v| self.shared.hop.seen_in(v.as_bytes())) {
            return Err(rules::LOOP);
        }
        let codings = headers.get_all(http::header::TRANSFER_ENCODING);
        if codings.iter().next().is_some() {
            rules::request_codings(codings.iter().map(|v| v.as_bytes()))?;
        }
        Ok(())
    }

    async fn forward_or_answer(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let shared = &self.shared;
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
            app_socket: self.app_socket,
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
                let status = e.status();
                match &e {
                    ForwardError::Loop(_) => shared.count_refusal(rules::LOOP),
                    ForwardError::ClientBody(crate::forward::BodyFailure::Malformed, _) => {
                        shared.count_refusal(rules::BAD_CHUNKED)
                    }
                    ForwardError::ClientBody(crate::forward::BodyFailure::Stalled, _) => shared
                        .telemetry
                        .metrics
                        .direction(shared.direction)
                        .timeout(crate::metrics::Timeout::StreamIdle),
                    ForwardError::ResponseTimeout(_) => shared
                        .telemetry
                        .metrics
                        .direction(shared.direction)
                        .timeout(crate::metrics::Timeout::ResponseHead),
                    _ => {}
                }
                span.set_status(status);
                span.fail(e.error_type(), e.to_string());
                local_response(status, format!("tracecar: {e}\n"))
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
            app_socket: self.app_socket,
        };
        let mut span = shared.telemetry.client_span(info, req.headers_mut());
        let connected = connect_tcp(&target_of(&host, port), shared.limits.connect_timeout)
            .await
            .and_then(|s| {
                if shared.own.check(&s) {
                    shared.count_refusal(rules::LOOP);
                    Err(ForwardError::Loop(target_of(&host, port).to_string()))
                } else {
                    Ok(s)
                }
            });
        let upstream = match connected {
            Ok(s) => s,
            Err(e) => {
                span.set_status(e.status());
                span.fail(e.error_type(), e.to_string());
                return local_response(e.status(), format!("tracecar: {e}\n"));
            }
        };
        span.set_status(StatusCode::OK);
        let idle = shared.limits.stream_idle_timeout;
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let _span = span; // open for the tunnel's lifetime
            if let Ok(upgraded) = on_upgrade.await {
                let mut upstream = upstream;
                let _ = crate::idle::splice(TokioIo::new(upgraded), &mut upstream, idle).await;
            }
        });
        let mut resp = Response::new(http_body_util::Either::Right(http_body_util::Full::new(
            Bytes::new(),
        )));
        *resp.status_mut() = StatusCode::OK;
        resp
    }

    /// `CONNECT` on a connection with a fixed destination (inbound, or a redirected outbound
    /// connection): the destination is itself a proxy, so the request goes to it, and when it
    /// answers 2xx both sides are spliced (its answer and the tunnel reach the client).
    async fn tunnel_through(
        &self,
        mut req: Request<Incoming>,
        target: Arc<str>,
    ) -> Response<ProxyBody> {
        let shared = &self.shared;
        let method = Method::CONNECT;
        let authority = req.uri().authority().cloned();
        let split = authority.as_ref().map(|a| split_authority(a, 443));
        let info = RequestInfo {
            method: &method,
            path: "",
            scheme: "http",
            version: req.version(),
            server_address: split.as_ref().map(|(h, _)| h.as_str()),
            server_port: split.as_ref().map(|(_, p)| *p),
            client_address: self.peer_ip.as_deref(),
            host: None,
            user_agent: None,
            app_socket: self.app_socket,
        };
        let mut span = match shared.direction {
            Direction::Inbound => shared.telemetry.server_span(info, req.headers_mut()),
            Direction::Outbound => shared.telemetry.client_span(info, req.headers_mut()),
        };
        let fail = |mut span: crate::trace::RequestSpan, e: ForwardError| {
            if matches!(e, ForwardError::Loop(_)) {
                shared.count_refusal(rules::LOOP);
            }
            span.set_status(e.status());
            span.fail(e.error_type(), e.to_string());
            local_response(e.status(), format!("tracecar: {e}\n"))
        };
        let stream = match connect_tcp(&target, shared.limits.connect_timeout).await {
            Ok(s) if shared.own.check(&s) => {
                return fail(span, ForwardError::Loop(target.to_string()))
            }
            Ok(s) => s,
            Err(e) => return fail(span, e),
        };
        let upstream_err = |e: &dyn std::error::Error| ForwardError::Upstream {
            target: target.to_string(),
            message: crate::errors::error_chain(e),
        };
        let (mut sender, connection) = match hyper::client::conn::http1::handshake::<
            _,
            http_body_util::Empty<Bytes>,
        >(TokioIo::new(stream))
        .await
        {
            Ok(pair) => pair,
            Err(e) => return fail(span, upstream_err(&e)),
        };
        tokio::spawn(connection.with_upgrades());
        let client_upgrade = hyper::upgrade::on(&mut req);
        let (mut parts, _) = req.into_parts();
        // Connection-level headers go; `Proxy-Authorization` stays: the destination is the
        // proxy the client is talking to.
        for name in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "te",
            "upgrade",
        ] {
            parts.headers.remove(name);
        }
        let out = Request::from_parts(parts, http_body_util::Empty::new());
        let answered = sender.send_request(out);
        let answered = match shared.limits.response_head_timeout {
            Some(limit) => match tokio::time::timeout(limit, answered).await {
                Ok(r) => r,
                Err(_) => return fail(span, ForwardError::ResponseTimeout(target.to_string())),
            },
            None => answered.await,
        };
        let mut resp = match answered {
            Ok(r) => r,
            Err(e) => return fail(span, upstream_err(&e)),
        };
        span.set_status(resp.status());
        if !resp.status().is_success() {
            return resp
                .map(|b| http_body_util::Either::Left(crate::trace::TracedBody::new(b, span)));
        }
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        let idle = shared.limits.stream_idle_timeout;
        tokio::spawn(async move {
            let _span = span; // open for the tunnel's lifetime
            if let (Ok(a), Ok(b)) = (client_upgrade.await, upstream_upgrade.await) {
                let _ = crate::idle::splice(TokioIo::new(a), TokioIo::new(b), idle).await;
            }
        });
        let (parts, _) = resp.into_parts();
        Response::from_parts(
            parts,
            http_body_util::Either::Right(http_body_util::Full::new(Bytes::new())),
        )
    }
}
