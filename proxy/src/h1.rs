//! The lean HTTP/1.1 path: most requests a sidecar sees are plain HTTP/1.1 with a
//! `content-length` or chunked body. For those, the proxy parses the head in place (httparse),
//! writes a rewritten head plus the body bytes it already holds to the app in one write, and
//! copies the rest of each body through verbatim, keeping the framing. That spends a fraction of
//! the CPU of decoding into `http::Request` and re-encoding, which is the proxy's main per-request
//! cost after the kernel's.
//!
//! Anything else on the connection (HTTP/1.0, HTTP/2 prior knowledge, upgrades, `Expect`,
//! `CONNECT`, unusual framing, malformed input) hands the connection, with the bytes read so
//! far, to the hyper path in [`crate::http`] for the rest of its life; hyper answers malformed
//! requests with 400 and counts them there.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use http::{Method, StatusCode, Version};
use opentelemetry::propagation::Extractor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

// The app connection pool's limits are the hyper path's: both paths pool alike.
use crate::forward::{ForwardError, POOL_IDLE, POOL_MAX_PER_TARGET};
use crate::http::Conn;
use crate::metrics::{Direction, Timeout};
use crate::rules::{self, Refusal};
use crate::trace::span::{Injected, RequestInfo};
use crate::trace::RequestSpan;

/// Request heads with more headers than this go to hyper (which allows about 100).
const MAX_HEADERS: usize = 64;
/// Response heads are parsed again with room for this many when they have more than
/// [`MAX_HEADERS`] (long `set-cookie` lists); there is no hyper fallback for a response.
const MAX_RESPONSE_HEADERS: usize = 1024;
/// A head larger than this goes to hyper, which refuses it (431).
pub const MAX_HEAD: usize = 64 * 1024;
/// The least free space offered to each read.
const READ_CHUNK: usize = 16 * 1024;
/// What a connection starts with: enough for typical heads (a sidecar holds many idle
/// connections, so buffers grow to [`READ_CHUNK`] only when a body needs it).
const FIRST_BUF: usize = 4 * 1024;
/// How long a closing connection reads and discards what the client still sends.
const LINGER: Duration = Duration::from_secs(2);

/// How [`serve`] left the connection.
pub enum Outcome {
    /// Closed, or finished with shutdown.
    Done,
    /// Not for this path: serve the rest with hyper, starting with these bytes.
    Fallback(BytesMut),
}

/// An idle app connection and when it went idle.
/// An idle app connection, when it went idle, and its local port (kept so that a connection
/// taken again needs no `getsockname`).
type IdleConn = (TcpStream, Instant, u16);

/// Idle keep-alive connections to apps, by `host:port`, shared by one worker's client
/// connections (each worker has its own).
#[derive(Debug, Default)]
pub struct IdlePool {
    idle: Mutex<HashMap<Arc<str>, Vec<IdleConn>>>,
}

impl IdlePool {
    fn take(&self, target: &str) -> Option<(TcpStream, u16)> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(target)?;
        while let Some((stream, since, port)) = list.pop() {
            if since.elapsed() < POOL_IDLE {
                return Some((stream, port));
            }
        }
        None
    }

    fn put(&self, target: Arc<str>, stream: TcpStream, local_port: u16) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(target).or_default();
        // Oldest first (each is pushed when it goes idle): the stale ones are a prefix.
        let stale = list.partition_point(|(_, since, _)| since.elapsed() >= POOL_IDLE);
        list.drain(..stale);
        if list.len() < POOL_MAX_PER_TARGET {
            list.push((stream, Instant::now(), local_port));
        }
    }
}

/// How a message body ends.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Until the sender closes (responses only).
    Close,
}

impl AppConn {
    /// Back to the pool, unless it holds bytes of a response nobody read (then it is closed).
    fn release(self, pool: &IdlePool) {
        if self.buf.is_empty() {
            pool.put(self.target, self.stream, self.local_port);
        }
    }
}

/// The app connection a client connection is using.
struct AppConn {
    target: Arc<str>,
    stream: TcpStream,
    /// This end's port: the causal table names inbound connections by it.
    local_port: u16,
    buf: BytesMut,
    /// Came from the pool or served an earlier request: it may have been closed meanwhile.
    reused: bool,
}

/// What the request head says, copied out of the read buffer.
struct RequestHead {
    head_len: usize,
    framing: Framing,
    client_close: bool,
    head_request: bool,
    /// Safe to send twice (RFC 9110 §9.2.2), so a request lost with a dead app connection can be
    /// retried.
    idempotent: bool,
    target: Arc<str>,
    span: RequestSpan,
}

/// Serves HTTP/1.1 requests on `client` until it closes, shutdown is asked for between requests,
/// or a request needs the hyper path.
pub async fn serve(
    conn: &Conn,
    client: &mut TcpStream,
    mut shutdown: watch::Receiver<bool>,
) -> Outcome {
    let mut inbuf = BytesMut::with_capacity(FIRST_BUF);
    let mut up: Option<AppConn> = None;
    let pool = &conn.shared.upstream.idle;
    let limits = &conn.shared.limits;
    let metrics = conn
        .shared
        .telemetry
        .metrics
        .direction(conn.shared.direction);
    // Per-connection scratch, reused by every request: the rewritten heads and the propagation
    // headers.
    let mut out = Vec::with_capacity(FIRST_BUF / 4);
    let mut injected = Injected::default();
    // The first request's head must come within the head timeout of the connection's start; a
    // later one may be awaited for the idle timeout, then has the head timeout from its first
    // byte (nginx's client_header_timeout and keepalive_timeout).
    let mut first = true;
    let started = Instant::now();
    // One timer per connection for every wait (the head, the idle keep-alive, the app's answer).
    let sleep = std::pin::pin!(tokio::time::sleep(Duration::ZERO));
    let mut timer = Deadline::new(sleep);
    let outcome = loop {
        // 1. A complete request head, routed, its span started and its head rewritten for the app.
        let mut deadline = None;
        let prepared = loop {
            if !inbuf.is_empty() {
                match rewrite_head(conn, &inbuf, &mut out, &mut injected) {
                    Prepared::Partial if inbuf.len() <= MAX_HEAD => {}
                    Prepared::Partial => break Prepared::Fallback,
                    p => break p,
                }
            } else if *shutdown.borrow() {
                break Prepared::Closed;
            }
            let (limit, kind) = match (first, inbuf.is_empty()) {
                (false, true) => (limits.idle_timeout, Timeout::Idle),
                _ => (limits.request_head_timeout, Timeout::RequestHead),
            };
            let until = *deadline.get_or_insert_with(|| {
                tokio::time::Instant::from_std(if first { started } else { Instant::now() }) + limit
            });
            timer.set(until);
            if inbuf.capacity() - inbuf.len() < FIRST_BUF / 4 {
                inbuf.reserve(READ_CHUNK);
            }
            let was_empty = inbuf.is_empty();
            let read = tokio::select! {
                biased;
                r = client.read_buf(&mut inbuf) => r,
                _ = shutdown.changed(), if inbuf.is_empty() => Ok(0),
                () = timer.passed() => {
                    metrics.timeout(kind);
                    break Prepared::TimedOut;
                }
            };
            match read {
                Ok(0) | Err(_) if inbuf.is_empty() => break Prepared::Closed,
                Ok(0) | Err(_) => break Prepared::Fallback,
                // A later request's first byte: its head timeout starts now.
                Ok(_) if was_empty && !first => deadline = None,
                Ok(_) => {}
            }
            first = false;
        };
        first = false;
        let head = match prepared {
            Prepared::Forward(h) => h,
            Prepared::Closed => break Outcome::Done,
            Prepared::TimedOut if inbuf.is_empty() => break Outcome::Done,
            Prepared::TimedOut => {
                let _ = write_local(
                    client,
                    StatusCode::REQUEST_TIMEOUT,
                    "tracecar: the request head did not arrive in time\n",
                    false,
                )
                .await;
                break Outcome::Done;
            }
            Prepared::Fallback | Prepared::Partial => break Outcome::Fallback(inbuf),
            Prepared::Local(status, message, head_request) => {
                let _ = write_local(client, status, message, head_request).await;
                // The request's body, if any, was never read: the connection cannot go on.
                break Outcome::Done;
            }
        };
        inbuf.advance(head.head_len);
        let exchanged = exchange(
            conn, client, &mut inbuf, &mut up, head, &mut out, &mut timer,
        );
        match exchanged.await {
            Ok(true) => continue,
            Ok(false) => break Outcome::Done,
            Err(()) => {
                up = None;
                break Outcome::Done;
            }
        }
    };
    if let Some(u) = up.take() {
        u.release(pool);
    }
    if matches!(outcome, Outcome::Done) {
        let _ = tokio::time::timeout(LINGER, client.shutdown()).await;
        linger(client).await;
    }
    outcome
}

/// After closing our side, reads and discards what the client still sends (the rest of a body
/// nobody will read), for a bounded time: closing a socket with unread input sends a reset, and
/// the reset can destroy the response the client has not read yet.
async fn linger(client: &mut TcpStream) {
    const MAX_DISCARD: usize = 4 << 20;
    let mut scratch = [0u8; 4096];
    let mut discarded = 0;
    let _ = tokio::time::timeout(LINGER, async {
        while discarded < MAX_DISCARD {
            match client.read(&mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(n) => discarded += n,
            }
        }
    })
    .await;
}

// Made once per request and taken apart at once; boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Prepared {
    Forward(RequestHead),
    /// The head is not complete yet.
    Partial,
    /// Not for this path (see the module comment).
    Fallback,
    /// Answered by the proxy itself: the status, a message, and whether it answers a HEAD
    /// (no body then).
    Local(StatusCode, &'static str, bool),
    /// The client closed (or shutdown came) between requests.
    Closed,
    /// No complete head in time (request head or idle timeout).
    TimedOut,
}

/// Headers that describe the connection, not the message (RFC 9110 §7.6.1). `te` is kept when it
/// is exactly `trailers` (gRPC); `transfer-encoding` is kept because the body goes through with
/// its framing unchanged.
fn hop_by_hop(name: &str) -> bool {
    const NAMES: [&str; 6] = [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "upgrade",
    ];
    NAMES.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// A `content-length` value: ASCII digits (optional surrounding whitespace), nothing else.
fn content_length_value(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Splits a request target into (authority of an absolute-form URI, origin-form path+query).
fn split_target(raw: &str) -> (Option<&str>, &str) {
    // `get` rather than slicing: the target comes from the client, and a byte offset inside a
    // multi-byte character would panic.
    let strip = |scheme: &str| {
        raw.get(..scheme.len())
            .filter(|p| p.eq_ignore_ascii_case(scheme))
            .and_then(|_| raw.get(scheme.len()..))
            .filter(|rest| !rest.is_empty())
    };
    let Some(rest) = strip("http://").or_else(|| strip("https://")) else {
        return (None, raw);
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    // `http://host?q` has an empty path: the caller writes the "/" (RFC 9112 §3.2.1).
    (Some(&rest[..end]), &rest[end..])
}

/// True when `h` is the first `content-length` field of `headers`.
fn first_length(headers: &[httparse::Header<'_>], h: &httparse::Header<'_>) -> bool {
    headers
        .iter()
        .find(|x| x.name.eq_ignore_ascii_case("content-length"))
        .is_some_and(|x| std::ptr::eq(x, h))
}

/// The request's headers as the propagators read them.
struct RawHeaders<'a>(&'a [httparse::Header<'a>]);

impl Extractor for RawHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(key))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|h| h.name).collect()
    }
}

/// Parses the head at the start of `buf`; when it is one for this path, starts its span and
/// writes the head for the app into `out` (propagation headers via `injected`).
fn rewrite_head(conn: &Conn, buf: &[u8], out: &mut Vec<u8>, injected: &mut Injected) -> Prepared {
    let shared = &conn.shared;
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= MAX_HEAD => n,
        Ok(httparse::Status::Complete(_)) => {
            // As hyper answers: 414 for a target too long for a URI, 431 for the rest.
            let r = if req.path.map_or(0, str::len) >= usize::from(u16::MAX) - 1 {
                rules::URI_TOO_LONG
            } else {
                rules::TOO_LARGE
            };
            shared.count_refusal(r);
            return Prepared::Local(r.status, r.message, false);
        }
        Ok(httparse::Status::Partial) => return Prepared::Partial,
        Err(_) => return Prepared::Fallback,
    };
    let (Some(method), Some(raw_target), Some(1)) = (req.method, req.path, req.version) else {
        return Prepared::Fallback;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Prepared::Fallback;
    };
    if method == Method::CONNECT {
        return Prepared::Fallback;
    }
    #[cfg(test)]
    if raw_target == tests::PANIC_PATH {
        panic!("forced by a test");
    }
    let head_request = method == Method::HEAD;
    let refuse = |r: Refusal| {
        shared.count_refusal(r);
        Prepared::Local(r.status, r.message, head_request)
    };
    let outbound = shared.direction == Direction::Outbound;
    let mut framing = Framing::None;
    let mut client_close = false;
    let mut hosts = 0;
    let mut host = None;
    let mut user_agent = None;
    let mut listed = false;
    let mut coded = false;
    let mut content_length: Option<u64> = None;
    for h in req.headers.iter() {
        let name = h.name;
        // Only the few headers read here need their value as text; the framing ones must be.
        let text = || std::str::from_utf8(h.value).ok();
        if name.eq_ignore_ascii_case("host") {
            if let Err(r) = rules::check_host(hosts, h.value) {
                return refuse(r);
            }
            hosts += 1;
            // (ASCII, checked above.)
            host = text().map(str::trim);
        } else if name.eq_ignore_ascii_case("user-agent") {
            user_agent = text();
        } else if name.eq_ignore_ascii_case("content-length") {
            // Digits only: `+5` or `5, 5` would let the app frame the body differently.
            let Some(n) = content_length_value(h.value) else {
                return refuse(rules::BAD_LENGTH);
            };
            if content_length.is_some_and(|c| c != n) {
                return refuse(rules::BAD_LENGTH);
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            coded = true;
        } else if name.eq_ignore_ascii_case("connection") {
            let Some(value) = text() else {
                return Prepared::Fallback;
            };
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    client_close = true;
                } else if token.eq_ignore_ascii_case("upgrade") {
                    return Prepared::Fallback;
                } else if !token.eq_ignore_ascii_case("keep-alive") && !token.is_empty() {
                    listed = true;
                }
            }
        } else if name.eq_ignore_ascii_case("upgrade") || name.eq_ignore_ascii_case("expect") {
            return Prepared::Fallback;
        } else if outbound && name.eq_ignore_ascii_case("via") && shared.hop.seen_in(h.value) {
            return refuse(rules::LOOP);
        }
    }
    // RFC 9112 §6.1, §6.3: the codings must end in chunked; next to a length, the coding frames
    // the body, the length is not passed on and the connection closes after the exchange (as
    // hyper does), so no byte of it can be read as another request.
    let drop_length = coded && content_length.is_some();
    if coded {
        let codings = req
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
            .map(|h| h.value);
        if let Err(r) = rules::request_codings(codings) {
            return refuse(r);
        }
        framing = Framing::Chunked;
        client_close |= drop_length;
    } else if let Some(n) = content_length.filter(|n| *n > 0) {
        framing = Framing::Length(n);
    }
    // Headers named in `Connection` are rare; hyper strips them.
    if listed {
        return Prepared::Fallback;
    }
    let (uri_authority, path_and_query) = split_target(raw_target);
    if let Some(Err(r)) = uri_authority.map(|a| rules::check_authority(a.as_bytes())) {
        return refuse(r);
    }
    // Forward-proxy routing: absolute-form URI, else Host.
    let routed: Option<(&str, u16)> = match &conn.target {
        Some(_) => None,
        None if outbound => match shared.route(uri_authority.or(host)) {
            Ok(r) => Some(r),
            Err(r) => return Prepared::Local(r.status, r.message, head_request),
        },
        None => None,
    };
    let info = RequestInfo {
        method: &method,
        path: match path_and_query.split('?').next() {
            Some(p) if !p.is_empty() => p,
            _ => "/",
        },
        scheme: "http",
        version: Version::HTTP_11,
        server_address: routed.map(|(h, _)| h),
        server_port: routed.map(|(_, p)| p),
        client_address: conn.peer_ip.as_deref(),
        host: uri_authority.or(host),
        user_agent,
        app_socket: conn.app_socket,
    };
    injected.0.clear();
    let extractor = RawHeaders(req.headers);
    let mut span = match shared.direction {
        Direction::Inbound => shared
            .telemetry
            .server_span_with(info, &extractor, injected),
        Direction::Outbound => shared
            .telemetry
            .client_span_with(info, &extractor, injected),
    };
    let target = match (&conn.target, routed) {
        (Some(t), _) => t.clone(),
        (None, Some((h, p))) => crate::http::target_of(h, p),
        (None, None) => {
            let e = ForwardError::NoTarget(crate::http::NO_TARGET);
            span.set_status(StatusCode::BAD_GATEWAY);
            span.fail(e.error_type(), e.to_string());
            return Prepared::Local(
                StatusCode::BAD_GATEWAY,
                crate::http::NO_TARGET_MESSAGE,
                head_request,
            );
        }
    };
    // The head for the app: origin-form target, connection headers dropped, propagation
    // headers replaced by the proxy span's.
    out.clear();
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    if !path_and_query.starts_with('/') && path_and_query != "*" {
        out.push(b'/');
    }
    out.extend_from_slice(path_and_query.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    // RFC 9112 §3.2.2: an absolute-form target's authority replaces any Host the client sent.
    if let Some(authority) = uri_authority.or(host.is_none().then_some(&*target)) {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(authority.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for h in req.headers.iter() {
        let name = h.name;
        if hop_by_hop(name)
            || injected.replaces(name)
            || (name.eq_ignore_ascii_case("te") && !h.value.eq_ignore_ascii_case(b"trailers"))
            || (uri_authority.is_some() && name.eq_ignore_ascii_case("host"))
            // One content-length: repeated equal ones are one length (RFC 9110 §8.6).
            || (name.eq_ignore_ascii_case("content-length") && (drop_length || !first_length(req.headers, h)))
            // Our own mark on a request that came back in through the app is not passed on
            // (the app may forward headers, and the request is not a loop).
            || (!outbound
                && name.eq_ignore_ascii_case("via")
                && h.value == shared.hop.value().as_bytes())
        {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    for (k, v) in &injected.0 {
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if outbound {
        out.extend_from_slice(b"via: ");
        out.extend_from_slice(shared.hop.value().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Prepared::Forward(RequestHead {
        head_len,
        framing,
        client_close,
        head_request,
        idempotent: matches!(
            method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        ),
        target,
        span,
    })
}

/// Why an exchange stopped before the response head was in.
enum Failure {
    /// The request body is malformed (chunked framing): the client gets 400.
    Malformed,
    /// Reading from the client failed or it closed mid-body.
    Client,
    /// A body went silent for the stream idle timeout: the client's (`true`: 408) or the app
    /// stopped taking it (504).
    StreamIdle(bool),
    /// The app did not start its response within the response head timeout: 504.
    ResponseTimeout,
    /// The app connection failed.
    App(io::Error),
}

/// Forwards one request and its response. `Ok(true)`: the client connection can carry another
/// request; `Ok(false)`: close it after this one; `Err`: it broke (the app connection too).
async fn exchange(
    conn: &Conn,
    client: &mut TcpStream,
    inbuf: &mut BytesMut,
    up: &mut Option<AppConn>,
    head: RequestHead,
    out: &mut Vec<u8>,
    timer: &mut Deadline<'_>,
) -> Result<bool, ()> {
    let pool = &*conn.shared.upstream.idle;
    // `out` holds the rewritten request head.
    let RequestHead {
        framing,
        client_close,
        head_request,
        idempotent,
        target,
        mut span,
        ..
    } = head;
    let limits = &conn.shared.limits;
    let metrics = conn
        .shared
        .telemetry
        .metrics
        .direction(conn.shared.direction);
    // The body bytes already read go out with the head, in one write.
    let mut body = BodyState::new(framing);
    let Ok(taken) = body.scan(inbuf) else {
        refuse_body(conn, client, span).await;
        return Ok(false);
    };
    out.extend_from_slice(&inbuf[..taken]);
    inbuf.advance(taken);
    let replayable = body.done();
    // 3. An app connection, then the request.
    let mut attempt = 0;
    // The app answered before it had the whole request body (413, 401, ...).
    let mut early = false;
    let resp_head = loop {
        attempt += 1;
        if up.as_ref().is_some_and(|u| *u.target != *target) {
            if let Some(old) = up.take() {
                old.release(pool);
            }
        }
        if up.as_ref().is_some_and(|u| looks_closed(&u.stream)) {
            // The app closed it while it sat idle: never send a request into it.
            *up = None;
        }
        if up.is_none() {
            // A retry goes to a new connection: the pool may hold more of the dead ones.
            match connect(conn, pool, &target, attempt > 1).await {
                Ok(u) => *up = Some(u),
                Err(e) => {
                    fail_local(conn, client, span, e, head_request).await;
                    return Ok(replayable && !client_close);
                }
            }
        }
        let Some(u) = up.as_mut() else { return Err(()) };
        if u.local_port != 0 {
            // Before the request goes out: the app may call out as soon as it reads it.
            span.set_app_port(u.local_port);
        }
        let sent = async {
            write_all_timed(&mut u.stream, out, limits.stream_idle_timeout)
                .await
                .map_err(|e| match e {
                    Some(e) => Failure::App(e),
                    None => Failure::StreamIdle(false),
                })?;
            if !body.done() {
                let idle = limits.stream_idle_timeout;
                early = upload(client, inbuf, u, &mut body, idle, &mut *timer).await?;
            }
            // Once the response head is in, `out` holds the client's version of it.
            let read = read_response_head(
                u,
                client,
                head_request,
                client_close || early,
                out,
                limits.stream_idle_timeout,
            );
            match limits.response_head_timeout {
                Some(limit) => {
                    timer.set(tokio::time::Instant::now() + limit);
                    tokio::select! {
                        biased;
                        r = read => r.map_err(Failure::App),
                        () = timer.passed() => Err(Failure::ResponseTimeout),
                    }
                }
                None => read.await.map_err(Failure::App),
            }
        }
        .await;
        match sent {
            Ok(h) => break h,
            Err(Failure::App(e)) => {
                // The app closed a reused connection just as the request went out (a race the
                // idle check cannot see): send it again on a new one, if it is safe to repeat and
                // nothing of a response came back.
                let retry = u.reused
                    && u.buf.is_empty()
                    && replayable
                    && idempotent
                    && attempt == 1
                    && e.kind() != io::ErrorKind::InvalidData;
                *up = None;
                if retry {
                    continue;
                }
                let e = ForwardError::Upstream {
                    target: target.to_string(),
                    message: e.to_string(),
                };
                fail_local(conn, client, span, e, head_request).await;
                return Ok(body.done() && !client_close);
            }
            Err(Failure::ResponseTimeout) => {
                *up = None;
                metrics.timeout(Timeout::ResponseHead);
                let e = ForwardError::ResponseTimeout(target.to_string());
                fail_local(conn, client, span, e, head_request).await;
                return Ok(body.done() && !client_close && !early);
            }
            Err(Failure::Malformed) => {
                *up = None;
                refuse_body(conn, client, span).await;
                return Ok(false);
            }
            Err(Failure::StreamIdle(by_client)) => {
                *up = None;
                metrics.timeout(Timeout::StreamIdle);
                let (status, message) = if by_client {
                    (
                        StatusCode::REQUEST_TIMEOUT,
                        "tracecar: the request body stopped arriving\n",
                    )
                } else {
                    (
                        StatusCode::GATEWAY_TIMEOUT,
                        "tracecar: the app stopped reading the request body\n",
                    )
                };
                span.set_status(status);
                span.fail("stream_idle_timeout", message.trim_end().into());
                drop(span);
                let _ = write_local(client, status, message, head_request).await;
                return Ok(false);
            }
            Err(Failure::Client) => {
                *up = None;
                span.fail("client_error", "the client went away mid-request".into());
                return Err(());
            }
        }
    };
    let Some(u) = up.as_mut() else { return Err(()) };
    u.reused = true;
    // 4. The response: head rewritten, body copied through with its framing.
    span.set_status(StatusCode::from_u16(resp_head.status).unwrap_or(StatusCode::BAD_GATEWAY));
    let resp_framing = resp_head.framing;
    // After an early answer the rest of the request body was never read: neither connection
    // knows where the next message starts.
    let close_client = resp_head.close_client;
    u.buf.advance(resp_head.head_len);
    let mut rbody = BodyState::new(resp_framing);
    let Ok(taken) = rbody.scan(&u.buf) else {
        span.fail(
            "response_body_error",
            "malformed chunked response body".into(),
        );
        return Err(());
    };
    out.extend_from_slice(&u.buf[..taken]);
    u.buf.advance(taken);
    if write_all_timed(client, out, limits.stream_idle_timeout)
        .await
        .is_err()
    {
        return Err(());
    }
    if !rbody.done() {
        let copied = copy_body(
            &mut u.stream,
            &mut u.buf,
            client,
            &mut rbody,
            limits.stream_idle_timeout,
            timer,
        )
        .await;
        if let Err(e) = copied {
            if e.kind() == io::ErrorKind::TimedOut {
                metrics.timeout(Timeout::StreamIdle);
            }
            if resp_framing != Framing::Close || e.kind() != io::ErrorKind::UnexpectedEof {
                span.fail("response_body_error", e.to_string());
                return Err(());
            }
        }
    }
    drop(span);
    // (`keep_alive` is false for a body that ends at close.)
    if !resp_head.keep_alive || !u.buf.is_empty() || early {
        // The app closes after this response, or sent more than it should have.
        *up = None;
    }
    Ok(!close_client)
}

/// A connection's current deadline over one timer that is moved as rarely as possible: only
/// to an earlier deadline. A later one (the usual case: each wait ends after the one before)
/// is checked when the timer fires, and the timer re-armed then, so a busy keep-alive
/// connection touches the timer wheel about once per timeout period, not once per request.
struct Deadline<'a> {
    sleep: std::pin::Pin<&'a mut tokio::time::Sleep>,
    /// The deadline in force; the timer is set to it or earlier, never later.
    at: tokio::time::Instant,
}

impl<'a> Deadline<'a> {
    fn new(sleep: std::pin::Pin<&'a mut tokio::time::Sleep>) -> Self {
        let at = sleep.deadline();
        Deadline { sleep, at }
    }

    fn set(&mut self, at: tokio::time::Instant) {
        self.at = at;
        if at < self.sleep.deadline() {
            self.sleep.as_mut().reset(at);
        }
    }

    /// Resolves once the deadline in force has passed (cancel-safe).
    async fn passed(&mut self) {
        loop {
            self.sleep.as_mut().await;
            if tokio::time::Instant::now() >= self.at {
                return;
            }
            let at = self.at;
            self.sleep.as_mut().reset(at);
        }
    }
}

/// Writes all of `buf`, waiting at most `limit` for the peer to take more. Most writes fit the
/// socket's buffer at once: those make no timer.
async fn write_all_timed(
    stream: &mut TcpStream,
    buf: &[u8],
    limit: Duration,
) -> Result<(), Option<io::Error>> {
    let mut done = 0;
    while done < buf.len() {
        match stream.try_write(&buf[done..]) {
            Ok(0) => return Err(Some(io::ErrorKind::WriteZero.into())),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return timed(limit, stream.write_all(&buf[done..])).await;
            }
            Err(e) => return Err(Some(e)),
        }
    }
    Ok(())
}

/// `fut` within `limit`: `Err(None)` when it ran out.
async fn timed<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = io::Result<T>>,
) -> Result<T, Option<io::Error>> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(Some),
        Err(_) => Err(None),
    }
}

/// Sends the rest of the request body to the app while watching the app's side: informational
/// (1xx) responses go to the client as they come and the upload goes on (`103 Early Hints`, an
/// unasked `100 Continue`); anything else is an early answer, and the upload stops. Returns
/// whether the app answered early.
async fn upload(
    client: &mut TcpStream,
    inbuf: &mut BytesMut,
    u: &mut AppConn,
    body: &mut BodyState,
    idle: Duration,
    timer: &mut Deadline<'_>,
) -> Result<bool, Failure> {
    let AppConn { stream, buf, .. } = u;
    let (mut from_app, mut to_app) = stream.split();
    // Bytes at the front of `inbuf` that belong to the body and are not sent yet.
    let mut pending = 0;
    loop {
        if pending == 0 {
            if body.done() {
                return Ok(false);
            }
            if !inbuf.is_empty() {
                pending = body.scan(inbuf).map_err(|_| Failure::Malformed)?;
                continue;
            }
            if inbuf.capacity() < READ_CHUNK {
                inbuf.reserve(READ_CHUNK);
            }
        }
        if buf.capacity() - buf.len() < FIRST_BUF / 4 {
            buf.reserve(FIRST_BUF);
        }
        timer.set(tokio::time::Instant::now() + idle);
        // Each of these is cancel-safe: a branch that loses the race has moved no byte.
        let from_app_read = if pending > 0 {
            tokio::select! {
                biased;
                r = from_app.read_buf(buf) => r,
                r = to_app.write(&inbuf[..pending]) => {
                    let n = r.map_err(Failure::App)?;
                    if n == 0 {
                        return Err(Failure::App(io::ErrorKind::WriteZero.into()));
                    }
                    inbuf.advance(n);
                    pending -= n;
                    continue;
                }
                () = timer.passed() => return Err(Failure::StreamIdle(false)),
            }
        } else {
            tokio::select! {
                biased;
                r = from_app.read_buf(buf) => r,
                r = client.read_buf(inbuf) => {
                    if !matches!(r, Ok(n) if n > 0) {
                        return Err(Failure::Client);
                    }
                    continue;
                }
                () = timer.passed() => return Err(Failure::StreamIdle(true)),
            }
        };
        match from_app_read {
            Ok(0) => {
                return Err(Failure::App(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the app closed the connection before responding",
                )))
            }
            Err(e) => return Err(Failure::App(e)),
            Ok(_) => {}
        }
        loop {
            match informational(buf) {
                Informational::Wait => break,
                Informational::Final => return Ok(true),
                Informational::Complete(n) => {
                    write_all_timed(client, &buf[..n], idle)
                        .await
                        .map_err(|_| Failure::Client)?;
                    buf.advance(n);
                }
            }
        }
    }
}

/// What the app has sent so far while the request body is still going out.
enum Informational {
    /// Nothing yet, or the start of what may be a 1xx.
    Wait,
    /// A complete 1xx head of this many bytes.
    Complete(usize),
    /// The start of a final response (or something malformed): the app answered early.
    Final,
}

fn informational(buf: &[u8]) -> Informational {
    if buf.is_empty() {
        return Informational::Wait;
    }
    let is_1xx = |code: Option<u16>| code.is_some_and(|c| (100..200).contains(&c) && c != 101);
    parse_response(buf, |parsed, resp| match parsed {
        Ok(httparse::Status::Complete(n)) if is_1xx(resp.code) => Informational::Complete(n),
        Ok(httparse::Status::Partial) if resp.code.is_none() || is_1xx(resp.code) => {
            Informational::Wait
        }
        _ => Informational::Final,
    })
}

/// A malformed request body: the client gets 400 and the connection closes (the app
/// connection, which may hold part of the request, is not reused).
async fn refuse_body(conn: &Conn, client: &mut TcpStream, mut span: RequestSpan) {
    conn.shared.count_refusal(rules::BAD_CHUNKED);
    span.set_status(StatusCode::BAD_REQUEST);
    drop(span);
    let _ = write_local(
        client,
        StatusCode::BAD_REQUEST,
        rules::BAD_CHUNKED.message,
        false,
    )
    .await;
}

/// An app connection to `target`: a live idle one from the pool unless `fresh`, else a new one.
async fn connect(
    conn: &Conn,
    pool: &IdlePool,
    target: &Arc<str>,
    fresh: bool,
) -> Result<AppConn, ForwardError> {
    while let Some((stream, local_port)) = (!fresh).then(|| pool.take(target)).flatten() {
        if looks_closed(&stream) {
            continue;
        }
        return Ok(AppConn {
            target: target.clone(),
            local_port,
            stream,
            buf: BytesMut::with_capacity(FIRST_BUF),
            reused: true,
        });
    }
    let stream = crate::forward::connect_tcp(target, conn.shared.limits.connect_timeout).await?;
    let (looped, local) = conn.shared.own.check_local(&stream);
    if looped {
        return Err(ForwardError::Loop(target.to_string()));
    }
    // The causal table names inbound connections by this end's port: kept only while it is
    // open (read once per connection; the pool keeps it).
    let causal = conn.shared.direction == Direction::Inbound && conn.shared.telemetry.causal();
    Ok(AppConn {
        target: target.clone(),
        local_port: local.filter(|_| causal).map_or(0, |a| a.port()),
        stream,
        buf: BytesMut::with_capacity(FIRST_BUF),
        reused: false,
    })
}

/// True when an idle app connection has been closed by the app (or has unexpected bytes).
/// Costs no system call unless the reactor has seen the socket become readable.
fn looks_closed(stream: &TcpStream) -> bool {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match stream.poll_read_ready(&mut cx) {
        std::task::Poll::Pending => false,
        std::task::Poll::Ready(Err(_)) => true,
        std::task::Poll::Ready(Ok(())) => {
            let mut byte = [0u8; 1];
            !matches!(stream.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
        }
    }
}

/// Parses a response head, again with room for [`MAX_RESPONSE_HEADERS`] when it has many.
fn parse_response<'b, R>(
    buf: &'b [u8],
    f: impl FnOnce(Result<httparse::Status<usize>, httparse::Error>, &httparse::Response<'_, 'b>) -> R,
) -> R {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Err(httparse::Error::TooManyHeaders) => {
            let mut many = vec![httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
            let mut resp = httparse::Response::new(&mut many);
            let parsed = resp.parse(buf);
            f(parsed, &resp)
        }
        parsed => f(parsed, &resp),
    }
}

/// What the app's bytes so far say.
enum ResponseStart {
    /// A 1xx of this many bytes, for the client as it is.
    Informational(usize),
    Final(ResponseHead),
    Partial,
}

struct ResponseHead {
    /// The client connection ends after this response.
    close_client: bool,
    head_len: usize,
    status: u16,
    framing: Framing,
    keep_alive: bool,
}

fn invalid(message: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Reads the app's response head into `u.buf`; informational (1xx) responses are passed to the
/// client as they come. `head_request`: the response has no body whatever it says.
async fn read_response_head(
    u: &mut AppConn,
    client: &mut TcpStream,
    head_request: bool,
    close: bool,
    out: &mut Vec<u8>,
    idle: Duration,
) -> io::Result<ResponseHead> {
    loop {
        if !u.buf.is_empty() {
            let start = parse_response(&u.buf, |parsed, resp| {
                response_start(parsed, resp, head_request, close, &mut *out)
            });
            match start? {
                ResponseStart::Informational(n) => {
                    // A client that does not read is not waited for longer than a body would be.
                    write_all_timed(client, &u.buf[..n], idle)
                        .await
                        .map_err(|e| e.unwrap_or_else(|| io::ErrorKind::TimedOut.into()))?;
                    u.buf.advance(n);
                    continue;
                }
                ResponseStart::Final(head) => return Ok(head),
                ResponseStart::Partial if u.buf.len() <= MAX_HEAD => {}
                ResponseStart::Partial => {
                    return Err(invalid("response head from the app too large"))
                }
            }
        }
        if u.buf.capacity() - u.buf.len() < FIRST_BUF / 4 {
            u.buf.reserve(READ_CHUNK);
        }
        if u.stream.read_buf(&mut u.buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the app closed the connection before responding",
            ));
        }
    }
}

/// Classifies a parsed response head; for a final one, writes the client's head into `out`
/// (`close`: the client connection ends after it, whatever the framing).
fn response_start(
    parsed: Result<httparse::Status<usize>, httparse::Error>,
    resp: &httparse::Response<'_, '_>,
    head_request: bool,
    close: bool,
    out: &mut Vec<u8>,
) -> io::Result<ResponseStart> {
    let n = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(ResponseStart::Partial),
        Err(_) => return Err(invalid("malformed response head from the app")),
    };
    let status = resp.code.unwrap_or(0);
    if (100..200).contains(&status) && status != 101 {
        return Ok(ResponseStart::Informational(n));
    }
    if status == 101 || !(200..600).contains(&status) {
        return Err(invalid("unexpected status from the app"));
    }
    // RFC 9112 §6.3: transfer-encoding wins over content-length; chunked must be the last
    // coding, else the body ends at close; differing lengths are an error.
    let mut coded: Option<bool> = None;
    let mut length: Option<u64> = None;
    let mut keep_alive = resp.version == Some(1);
    // The app named headers of its own hop in `Connection` (rare): those are dropped too.
    let mut lists_headers = false;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let last = h.value.rsplit(|b| *b == b',').next().unwrap_or(b"");
            coded = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let n = content_length_value(h.value)
                .ok_or_else(|| invalid("bad content-length from the app"))?;
            if length.is_some_and(|l| l != n) {
                return Err(invalid("conflicting content-length from the app"));
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("connection") {
            for t in h.value.split(|b| *b == b',') {
                let t = t.trim_ascii();
                if t.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if t.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                } else if !t.is_empty() {
                    lists_headers = true;
                }
            }
        }
    }
    let mut framing = match (coded, length) {
        (Some(true), _) => Framing::Chunked,
        (Some(false), _) | (None, None) => Framing::Close,
        (None, Some(n)) => Framing::Length(n),
    };
    // RFC 9112 §6.3: these never have a body, whatever the headers say.
    if head_request || status == 204 || status == 304 || framing == Framing::Length(0) {
        framing = Framing::None;
    }
    let close_client = close || framing == Framing::Close;
    out.clear();
    // A content-length next to transfer-encoding is not what frames the body: not forwarded.
    write_parsed_response_head(out, resp, close_client, coded.is_some(), lists_headers);
    Ok(ResponseStart::Final(ResponseHead {
        head_len: n,
        status,
        framing,
        keep_alive: keep_alive && framing != Framing::Close,
        close_client,
    }))
}

/// The client's response head: `HTTP/1.1`, connection headers dropped (with those named in
/// `Connection` when `lists_headers`), `connection: close` when this is the connection's last
/// response.
fn write_parsed_response_head(
    out: &mut Vec<u8>,
    resp: &httparse::Response<'_, '_>,
    close: bool,
    drop_length: bool,
    lists_headers: bool,
) {
    let code = resp.code.unwrap_or(502);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa3(code).as_slice());
    out.push(b' ');
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    // Headers the app named in `Connection` belong to its hop only.
    let listed = |name: &str| {
        lists_headers
            && resp
                .headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("connection"))
                .flat_map(|h| h.value.split(|b| *b == b','))
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(name.as_bytes()))
    };
    for h in resp.headers.iter() {
        if hop_by_hop(h.name)
            || h.name.eq_ignore_ascii_case("te")
            || listed(h.name)
            || (drop_length && h.name.eq_ignore_ascii_case("content-length"))
        {
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn itoa3(code: u16) -> [u8; 3] {
    [
        b'0' + (code / 100 % 10) as u8,
        b'0' + (code / 10 % 10) as u8,
        b'0' + (code % 10) as u8,
    ]
}

/// The app could not be reached, did not answer in time or failed mid-exchange: the span says
/// why, the client gets 502, 504 or (a loop) 508.
async fn fail_local(
    conn: &Conn,
    client: &mut TcpStream,
    mut span: RequestSpan,
    e: ForwardError,
    head_request: bool,
) {
    let status = e.status();
    if status == StatusCode::LOOP_DETECTED {
        conn.shared.count_refusal(rules::LOOP);
    }
    span.set_status(status);
    span.fail(e.error_type(), e.to_string());
    drop(span);
    let message = format!("tracecar: {e}\n");
    let _ = write_local(client, status, &message, head_request).await;
}

/// A response made by the proxy itself (502, 400, 508, ...). An answer to HEAD has the length
/// of the body it would have had, and no body (RFC 9110 §9.3.2): the connection stays in step.
async fn write_local(
    client: &mut TcpStream,
    status: StatusCode,
    message: &str,
    head_request: bool,
) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\nx-tracecar-error: 1\r\ncontent-length: {}\r\n\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or(""),
        message.len()
    );
    let mut out = head.into_bytes();
    if !head_request {
        out.extend_from_slice(message.as_bytes());
    }
    match tokio::time::timeout(LINGER, client.write_all(&out)).await {
        Ok(r) => r,
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}

/// Copies the rest of a body from `from` to `to`, through `buf`, until `state` says it ended;
/// a read or write that waits longer than `idle` ends it with `TimedOut`.
async fn copy_body(
    from: &mut (impl tokio::io::AsyncRead + Unpin),
    buf: &mut BytesMut,
    to: &mut (impl tokio::io::AsyncWrite + Unpin),
    state: &mut BodyState,
    idle: Duration,
    timer: &mut Deadline<'_>,
) -> io::Result<()> {
    let timed_out = || io::Error::from(io::ErrorKind::TimedOut);
    while !state.done() {
        if buf.is_empty() {
            if buf.capacity() < READ_CHUNK {
                buf.reserve(READ_CHUNK);
            }
            timer.set(tokio::time::Instant::now() + idle);
            let read = tokio::select! {
                biased;
                r = from.read_buf(buf) => r?,
                () = timer.passed() => return Err(timed_out()),
            };
            if read == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the peer closed the connection in the middle of a body",
                ));
            }
        }
        let n = state
            .scan(buf)
            .map_err(|_| invalid("malformed chunked body"))?;
        timer.set(tokio::time::Instant::now() + idle);
        tokio::select! {
            biased;
            r = to.write_all(&buf[..n]) => r?,
            () = timer.passed() => return Err(timed_out()),
        }
        buf.advance(n);
    }
    Ok(())
}

/// Where a body copy stands: how much is left, or where in the chunked encoding it is.
#[derive(Debug)]
enum BodyState {
    Length(u64),
    Chunked(Chunk),
    Close,
    Done,
}

/// The chunked decoder's states (RFC 9112 §7.1); only positions are tracked, the bytes pass
/// through unchanged.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Chunk {
    Size { n: u64, digits: bool },
    SizeWs(u64),
    Ext(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    TrailerStart,
    TrailerName,
    TrailerValue,
    TrailerLf,
    EndLf,
}

impl BodyState {
    fn new(framing: Framing) -> Self {
        match framing {
            Framing::None | Framing::Length(0) => BodyState::Done,
            Framing::Length(n) => BodyState::Length(n),
            Framing::Chunked => BodyState::Chunked(Chunk::Size {
                n: 0,
                digits: false,
            }),
            Framing::Close => BodyState::Close,
        }
    }

    fn done(&self) -> bool {
        matches!(self, BodyState::Done)
    }

    /// How many bytes at the start of `buf` belong to the body; moves past them.
    fn scan(&mut self, buf: &[u8]) -> Result<usize, ()> {
        match self {
            BodyState::Done => Ok(0),
            BodyState::Close => Ok(buf.len()),
            BodyState::Length(left) => {
                let n = (*left).min(buf.len() as u64);
                *left -= n;
                if *left == 0 {
                    *self = BodyState::Done;
                }
                Ok(n as usize)
            }
            BodyState::Chunked(chunk) => {
                let mut i = 0;
                while i < buf.len() {
                    let b = buf[i];
                    *chunk = match *chunk {
                        Chunk::Size { n, digits } => match (b as char).to_digit(16) {
                            Some(d) => {
                                let n = n
                                    .checked_mul(16)
                                    .and_then(|n| n.checked_add(d as u64))
                                    .ok_or(())?;
                                Chunk::Size { n, digits: true }
                            }
                            None if !digits => return Err(()),
                            None if b == b'\r' => Chunk::SizeLf(n),
                            // Extensions are ignored (and copied through).
                            None if b == b';' => Chunk::Ext(n),
                            None if b == b' ' || b == b'\t' => Chunk::SizeWs(n),
                            None => return Err(()),
                        },
                        Chunk::SizeWs(n) => match b {
                            b' ' | b'\t' => Chunk::SizeWs(n),
                            b';' => Chunk::Ext(n),
                            b'\r' => Chunk::SizeLf(n),
                            _ => return Err(()),
                        },
                        // Extensions are copied through, but only visible characters, spaces
                        // and tabs (RFC 9112 §7.1.1): a bare LF or another control byte could
                        // end the line for a lenient app and not for us.
                        Chunk::Ext(n) => match b {
                            b'\r' => Chunk::SizeLf(n),
                            b if rules::is_field_byte(b) => Chunk::Ext(n),
                            _ => return Err(()),
                        },
                        Chunk::SizeLf(n) => match (b, n) {
                            (b'\n', 0) => Chunk::TrailerStart,
                            (b'\n', n) => Chunk::Data(n),
                            _ => return Err(()),
                        },
                        Chunk::Data(left) => {
                            let n = left.min((buf.len() - i) as u64);
                            i += n as usize;
                            *chunk = if left == n {
                                Chunk::DataCr
                            } else {
                                Chunk::Data(left - n)
                            };
                            continue;
                        }
                        Chunk::DataCr if b == b'\r' => Chunk::DataLf,
                        Chunk::DataLf if b == b'\n' => Chunk::Size {
                            n: 0,
                            digits: false,
                        },
                        // Trailer fields: `name: value` lines (RFC 9112 §7.1.2, §5).
                        Chunk::TrailerStart if b == b'\r' => Chunk::EndLf,
                        Chunk::TrailerStart | Chunk::TrailerName if rules::is_tchar(b) => {
                            Chunk::TrailerName
                        }
                        Chunk::TrailerName if b == b':' => Chunk::TrailerValue,
                        Chunk::TrailerValue if b == b'\r' => Chunk::TrailerLf,
                        Chunk::TrailerValue if rules::is_field_byte(b) => Chunk::TrailerValue,
                        Chunk::TrailerLf if b == b'\n' => Chunk::TrailerStart,
                        Chunk::EndLf if b == b'\n' => {
                            *self = BodyState::Done;
                            return Ok(i + 1);
                        }
                        _ => return Err(()),
                    };
                    i += 1;
                }
                Ok(i)
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The lazy deadline fires at the deadline in force, whether it was moved later (the timer
    /// re-armed when it first fires) or earlier (the timer moved at once).
    #[tokio::test(start_paused = true)]
    async fn a_deadline_fires_when_it_is_due_and_not_before() {
        let sleep = std::pin::pin!(tokio::time::sleep(Duration::ZERO));
        let mut d = Deadline::new(sleep);
        let start = tokio::time::Instant::now();
        d.set(start + Duration::from_secs(10));
        d.set(start + Duration::from_secs(30)); // later: the timer stays, then re-arms
        d.passed().await;
        assert_eq!(start.elapsed(), Duration::from_secs(30));
        let start = tokio::time::Instant::now();
        d.set(start + Duration::from_secs(60));
        d.set(start + Duration::from_secs(5)); // earlier: moved at once
        d.passed().await;
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }

    /// A request for this target panics inside the proxy (test builds only), to show that a
    /// panic ends one connection and no other.
    pub const PANIC_PATH: &str = "/__tracecar_test_panic";

    /// Feeds `input` to a chunked scanner in pieces of `step` bytes; returns how many bytes
    /// belonged to the body, or None when it was refused.
    fn scan_in_steps(input: &[u8], step: usize) -> Option<usize> {
        let mut state = BodyState::new(Framing::Chunked);
        let mut used = 0;
        for piece in input.chunks(step) {
            let n = state.scan(piece).ok()?;
            used += n;
            if state.done() {
                return Some(used);
            }
            assert_eq!(n, piece.len(), "an unfinished body takes every byte");
        }
        None
    }

    #[test]
    fn chunked_scanner_finds_the_end_however_the_bytes_arrive() {
        let body = b"3;ext=1\r\nabc\r\n10 ; x\r\n0123456789abcdef\r\n2;n=\"q\\\"v\"\r\nab\r\n0\r\nx-trailer: t\r\n\r\n";
        let mut input = body.to_vec();
        input.extend_from_slice(b"GET /next HTTP/1.1\r\n");
        for step in 1..=input.len() {
            assert_eq!(scan_in_steps(&input, step), Some(body.len()), "step {step}");
        }
    }

    #[test]
    fn chunked_scanner_refuses_what_could_be_read_two_ways() {
        for bad in [
            &b"3;x\nabc\r\n0\r\n\r\n"[..],   // bare LF ends the extension
            b"3\nabc\r\n0\r\n\r\n",          // bare LF after the size
            b"3 x\r\nabc\r\n0\r\n\r\n",      // junk after the size
            b"g\r\n",                        // not hex
            b"3\r\nabcX\r\n",                // data longer than the size
            b"0\r\nx-t: 1\n\r\n",            // bare LF in a trailer
            b"3;a\x01b\r\nabc\r\n0\r\n\r\n", // control byte in an extension
            b"0\r\nno colon\r\n\r\n",        // trailer without a name
            b"0\r\n: v\r\n\r\n",             // trailer with an empty name
            b"0\r\nx-t: a\x00b\r\n\r\n",     // NUL in a trailer
            b"fffffffffffffffff\r\n",        // overflows u64
            b"\r\n",                         // no size at all
        ] {
            assert_eq!(
                scan_in_steps(bad, bad.len()),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn length_framing_stops_at_the_length() {
        let mut state = BodyState::new(Framing::Length(5));
        assert_eq!(state.scan(b"abc"), Ok(3));
        assert_eq!(state.scan(b"defgh"), Ok(2));
        assert!(state.done());
    }

    #[test]
    fn content_length_is_digits_only() {
        assert_eq!(content_length_value(b" 42 "), Some(42));
        for bad in [
            &b"+5"[..],
            b"-1",
            b"5, 5",
            b"",
            b"0x10",
            b"99999999999999999999",
        ] {
            assert_eq!(content_length_value(bad), None, "{:?}", bad);
        }
    }

    #[test]
    fn absolute_targets_split_into_authority_and_origin_form() {
        assert_eq!(split_target("/a?b"), (None, "/a?b"));
        assert_eq!(split_target("http://h:81/a?b"), (Some("h:81"), "/a?b"));
        assert_eq!(split_target("HTTP://h?q=1"), (Some("h"), "?q=1"));
        assert_eq!(split_target("http://[::1]:8080"), (Some("[::1]:8080"), ""));
        assert_eq!(split_target("*"), (None, "*"));
    }

    fn start(head: &[u8]) -> io::Result<(ResponseStart, String)> {
        let mut out = Vec::new();
        let r = parse_response(head, |parsed, resp| {
            response_start(parsed, resp, false, false, &mut out)
        })?;
        Ok((r, String::from_utf8_lossy(&out).into_owned()))
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        // Transfer-encoding wins, and the stale length does not reach the client.
        let (r, out) =
            start(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n")
                .unwrap();
        assert!(matches!(r, ResponseStart::Final(ref h) if h.framing == Framing::Chunked));
        assert_eq!(out, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        // Repeated equal lengths are one length; differing ones are refused.
        let (r, _) =
            start(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n").unwrap();
        assert!(matches!(r, ResponseStart::Final(ref h) if h.framing == Framing::Length(3)));
        assert!(
            start(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n").is_err()
        );
        // Neither: the body ends when the app closes, and so does the client connection.
        let (r, out) = start(b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
        assert!(
            matches!(r, ResponseStart::Final(ref h) if h.framing == Framing::Close && h.close_client)
        );
        assert!(out.ends_with("connection: close\r\n\r\n"), "{out}");
    }

    #[test]
    fn response_heads_lose_connection_headers() {
        let head = b"HTTP/1.0 200 OK\r\nConnection: keep-alive, x-h\r\nX-H: 1\r\nKeep-Alive: 5\r\nContent-Length: 2\r\n\r\n";
        let (_, out) = start(head).unwrap();
        assert_eq!(out, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n");
    }

    /// Property tests: the HTTP/1 head parse and rewrite, the chunked scanner, target
    /// splitting and the response-head classifier, fed arbitrary bytes and mutated valid
    /// messages (see `crate::fuzzing`).
    mod fuzz {
        use super::*;
        use crate::fuzzing::{config, mutate, mutations};
        use proptest::prelude::*;
        use proptest::test_runner::TestRunner;

        /// Scans `input` in pieces cut at `cuts`; the body's length, or None when refused.
        fn scan_cut(input: &[u8], cuts: &[usize]) -> Option<Option<usize>> {
            let mut state = BodyState::new(Framing::Chunked);
            let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
            points.push(input.len());
            points.sort_unstable();
            let (mut at, mut used) = (0, 0);
            for p in points {
                if p <= at {
                    continue;
                }
                let piece = &input[at..p];
                let Ok(n) = state.scan(piece) else {
                    return None;
                };
                used += n;
                if state.done() {
                    return Some(Some(used));
                }
                // An unfinished body takes every byte it is given.
                assert_eq!(n, piece.len());
                at = p;
            }
            Some(None) // not finished yet
        }

        fn chunked_body() -> impl Strategy<Value = (Vec<u8>, usize)> {
            let ext = prop::sample::select(&["", ";a", ";a=b", " ; n=\"q\\\"v\"", ";x=\t1"][..]);
            let chunk = (prop::collection::vec(any::<u8>(), 1..40), ext);
            let trailer = prop::sample::select(&["", "x-t: 1\r\n", "a: b\r\nc:\t\r\n"][..]);
            (prop::collection::vec(chunk, 0..5), trailer).prop_map(|(chunks, trailer)| {
                let mut out = Vec::new();
                for (data, ext) in chunks {
                    out.extend_from_slice(format!("{:x}{ext}\r\n", data.len()).as_bytes());
                    out.extend_from_slice(&data);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\n");
                out.extend_from_slice(trailer.as_bytes());
                out.extend_from_slice(b"\r\n");
                let len = out.len();
                out.extend_from_slice(b"GET /next HTTP/1.1\r\n");
                (out, len)
            })
        }

        proptest! {
            #![proptest_config(config())]

            /// However the bytes arrive, the scanner decides the same: the same end or the same
            /// refusal; it never panics.
            #[test]
            fn fuzz_chunked_scanner_decides_the_same_however_split(
                input in prop::collection::vec(any::<u8>(), 0..200),
                cuts in prop::collection::vec(any::<usize>(), 0..8),
            ) {
                prop_assert_eq!(scan_cut(&input, &cuts), scan_cut(&input, &[]));
            }

            /// A valid chunked body ends exactly where it ends, however it is split; mutated,
            /// it still never panics and is decided the same however split.
            #[test]
            fn fuzz_chunked_scanner_finds_valid_ends_and_survives_mutations(
                (body, len) in chunked_body(),
                cuts in prop::collection::vec(any::<usize>(), 0..8),
                muts in mutations(),
            ) {
                prop_assert_eq!(scan_cut(&body, &cuts), Some(Some(len)));
                let bad = mutate(&body, &muts, &[b"\r\n", b";", b"0\r\n\r\n", b"\n", b"ff"]);
                prop_assert_eq!(scan_cut(&bad, &cuts), scan_cut(&bad, &[]));
            }

            /// Target splitting never panics (the UTF-8 crash of issue 11) and loses nothing.
            #[test]
            fn fuzz_split_target(raw in crate::fuzzing::text(), scheme in prop::sample::select(&["", "http://", "HTTPS://", "htt"][..])) {
                let raw = format!("{scheme}{raw}");
                let (authority, rest) = split_target(&raw);
                match authority {
                    None => prop_assert_eq!(rest, raw.as_str()),
                    Some(a) => {
                        let whole = format!("{a}{rest}");
                        prop_assert!(raw.ends_with(&whole));
                        prop_assert!(!a.contains(['/', '?']));
                    }
                }
            }

            /// The response-head classifier never panics; a final head it accepts is written as
            /// a well-formed head for the client.
            #[test]
            fn fuzz_response_heads(
                base in prop::sample::select(RESPONSES),
                muts in mutations(),
                head_request in any::<bool>(),
                close in any::<bool>(),
            ) {
                let input = mutate(base, &muts, &[b"\r\n", b"Content-Length: 5\r\n", b"\n", b" "]);
                let mut out = Vec::new();
                let started = parse_response(&input, |parsed, resp| {
                    response_start(parsed, resp, head_request, close, &mut out)
                });
                let _ = informational(&input);
                if let Ok(ResponseStart::Final(_)) = started {
                    let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
                    let mut resp = httparse::Response::new(&mut headers);
                    prop_assert!(matches!(resp.parse(&out), Ok(httparse::Status::Complete(n)) if n == out.len()));
                }
            }
        }

        const RESPONSES: &[&[u8]] = &[
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
            b"HTTP/1.1 204 No Content\r\nConnection: close, x\r\nX: 1\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 4\r\n\r\n",
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
        ];

        /// A listener's shared state for calling `rewrite_head` directly (no export).
        fn conn(direction: Direction, target: Option<&str>) -> Conn {
            let cfg = crate::Config::for_test(&["--traces-exporter=none"]);
            let metrics = Arc::new(crate::metrics::Metrics::new());
            let telemetry = Arc::new(
                crate::trace::Telemetry::new(&cfg, crate::trace::Sink::FromConfig, metrics)
                    .expect("telemetry"),
            );
            Conn {
                shared: Arc::new(crate::http::Shared {
                    direction,
                    telemetry,
                    upstream: crate::forward::Upstream::with_limits(
                        &Default::default(),
                        Default::default(),
                    ),
                    limits: Default::default(),
                    listen_port: 15140,
                    own: Default::default(),
                    hop: crate::rules::HopMarker::new(),
                    open: Default::default(),
                }),
                target: target.map(Into::into),
                peer_ip: None,
                app_socket: None,
            }
        }

        const HEADS: &[&[u8]] = &[
            b"GET /a?b=1 HTTP/1.1\r\nHost: app:8080\r\nUser-Agent: t\r\n\r\n",
            b"POST http://app:81/p HTTP/1.1\r\nHost: other\r\nContent-Length: 3\r\n\r\nabc",
            b"PUT /u HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 4\r\nConnection: keep-alive\r\nTE: trailers\r\n\r\n",
            b"GET / HTTP/1.1\r\nhost: app\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\nvia: 1.0 x\r\nKeep-Alive: 5\r\n\r\n",
            b"DELETE /r%C3%A9 HTTP/1.1\r\nHost: app\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
        ];
        const PIECES: &[&[u8]] = &[
            b"\r\n",
            b"Host: x\r\n",
            b"Content-Length: 9\r\n",
            b"Transfer-Encoding: chunked\r\n",
            b"Connection: close\r\n",
            b"Via: 1.1 tracecar-0\r\n",
            b"@",
            b"\xc3\xa9",
            b"\n",
            b" ",
            b"http://",
            b"Expect: 100-continue\r\n",
            b"Upgrade: h2c\r\n",
        ];

        /// What reaches the app is always one well-formed request head: it parses whole, has
        /// one Host, no length next to a coding, no hop-by-hop header, an origin-form target.
        fn check_forwarded(out: &[u8]) -> Result<(), TestCaseError> {
            let mut headers = [httparse::EMPTY_HEADER; 128];
            let mut req = httparse::Request::new(&mut headers);
            let parsed = req.parse(out);
            prop_assert!(
                matches!(parsed, Ok(httparse::Status::Complete(n)) if n == out.len()),
                "{:?}",
                String::from_utf8_lossy(out)
            );
            let count = |name: &str| {
                req.headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case(name))
                    .count()
            };
            prop_assert_eq!(count("host"), 1);
            prop_assert!(count("content-length") <= 1);
            prop_assert!(count("content-length") == 0 || count("transfer-encoding") == 0);
            for hop in ["connection", "keep-alive", "upgrade", "proxy-connection"] {
                prop_assert_eq!(count(hop), 0);
            }
            let target = req.path.unwrap_or("");
            prop_assert!(target.starts_with('/') || target == "*", "{}", target);
            Ok(())
        }

        /// `rewrite_head` never panics on any head, and what it forwards is well formed, on both
        /// listeners.
        #[test]
        fn fuzz_request_heads_are_refused_or_rewritten_well_formed() {
            let conns = [
                conn(Direction::Inbound, Some("127.0.0.1:8080")),
                conn(Direction::Outbound, None),
            ];
            let mut runner = TestRunner::new(config());
            let strategy = (
                prop::sample::select(HEADS),
                mutations(),
                prop::collection::vec(any::<u8>(), 0..120),
                any::<bool>(),
            );
            runner
                .run(&strategy, |(base, muts, noise, raw)| {
                    let input = if raw {
                        noise
                    } else {
                        mutate(base, &muts, PIECES)
                    };
                    for c in &conns {
                        let mut out = Vec::new();
                        let mut injected = Injected::default();
                        if let Prepared::Forward(_) =
                            rewrite_head(c, &input, &mut out, &mut injected)
                        {
                            check_forwarded(&out)?;
                        }
                    }
                    Ok(())
                })
                .unwrap();
        }
    }
}
