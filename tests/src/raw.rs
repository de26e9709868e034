//! Raw TCP on both sides of the proxy: a client ([`Peer`]) that writes exact bytes and reads
//! exact bytes back, and apps scripted over raw TCP ([`FakeApp`], driven step by step by a test;
//! [`RecordingApp`], which answers by a script and records every byte it receives).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The longest any single read may wait: a missing byte fails the test instead of hanging it.
pub const IO: Duration = Duration::from_secs(5);

pub fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// One end of a raw TCP conversation, with what was read but not consumed yet.
pub struct Peer {
    pub s: TcpStream,
    pub buf: Vec<u8>,
    /// Where every byte read is also appended (the recording app's connections).
    rec: Option<Arc<ConnLog>>,
}

/// A response as a client reads it: status line, headers in order, body (by content-length).
pub struct Resp {
    pub status_line: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl std::fmt::Debug for Resp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resp")
            .field("status_line", &self.status_line)
            .field("headers", &self.headers)
            .field("body", &lossy(&self.body))
            .finish()
    }
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl Peer {
    pub fn new(s: TcpStream) -> Peer {
        Peer {
            s,
            buf: Vec::new(),
            rec: None,
        }
    }

    pub async fn connect(addr: SocketAddr) -> Peer {
        let s = tokio::time::timeout(IO, TcpStream::connect(addr))
            .await
            .expect("connect in time")
            .expect("connect");
        s.set_nodelay(true).expect("nodelay");
        Peer::new(s)
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        tokio::time::timeout(IO, self.s.write_all(bytes))
            .await
            .expect("write in time")
            .expect("write");
    }

    /// Writes each piece on its own. The pause lets each piece arrive as a separate read on the
    /// far side; nothing signals that the proxy has read a piece, so there is nothing to wait on.
    pub async fn send_split(&mut self, pieces: &[&[u8]]) {
        for piece in pieces {
            self.send(piece).await;
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    }

    /// One read into the buffer; 0 when the other side closed (a reset counts as closed).
    pub async fn fill(&mut self) -> usize {
        match self.read_more(Some(IO)).await {
            Some(n) => n,
            None => panic!(
                "nothing arrived within {IO:?}; unconsumed: {:?}",
                lossy(&self.buf)
            ),
        }
    }

    /// One read into the buffer, waiting at most `limit` (forever when `None`): `Some(0)` when
    /// the other side closed (or reset), `None` when nothing came in time.
    pub async fn read_more(&mut self, limit: Option<Duration>) -> Option<usize> {
        self.buf.reserve(64 * 1024);
        let before = self.buf.len();
        let read = self.s.read_buf(&mut self.buf);
        let n = match limit {
            Some(limit) => match tokio::time::timeout(limit, read).await {
                Ok(r) => r.unwrap_or(0),
                Err(_) => return None,
            },
            None => read.await.unwrap_or(0),
        };
        if let Some(rec) = &self.rec {
            rec.record(&self.buf[before..]);
            if n == 0 {
                rec.closed.store(true, Ordering::SeqCst);
            }
        }
        Some(n)
    }

    /// The next head (through the blank line); `None` if the peer closed before sending a byte.
    pub async fn try_head(&mut self) -> Option<String> {
        loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head: Vec<u8> = self.buf.drain(..i + 4).collect();
                return Some(lossy(&head));
            }
            if self.fill().await == 0 {
                assert!(
                    self.buf.is_empty(),
                    "closed in the middle of a head: {:?}",
                    lossy(&self.buf)
                );
                return None;
            }
        }
    }

    pub async fn head(&mut self) -> String {
        self.try_head().await.expect("a head before the close")
    }

    pub async fn exact(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            if self.fill().await == 0 {
                panic!(
                    "closed after {} of {n} bytes: {:?}",
                    self.buf.len(),
                    lossy(&self.buf)
                );
            }
        }
        self.buf.drain(..n).collect()
    }

    /// Reads exactly `expected.len()` bytes and checks they are `expected`.
    pub async fn expect(&mut self, expected: &[u8]) {
        let got = self.exact(expected.len()).await;
        assert_eq!(lossy(&got), lossy(expected));
    }

    /// The other side closed, with nothing more sent.
    pub async fn expect_eof(&mut self) {
        assert!(self.buf.is_empty(), "unread: {:?}", lossy(&self.buf));
        let n = self.fill().await;
        assert_eq!(n, 0, "expected a close, got {:?}", lossy(&self.buf));
    }

    /// A response whose body, if any, has a content-length; `None` if the peer closed first.
    pub async fn try_response(&mut self) -> Option<Resp> {
        let head = self.try_head().await?;
        let mut lines = head.trim_end_matches("\r\n").split("\r\n");
        let status_line = lines.next().unwrap_or_default().to_string();
        let headers: Vec<(String, String)> = lines
            .map(|l| {
                let (n, v) = l.split_once(':').expect("header line");
                (n.to_string(), v.trim().to_string())
            })
            .collect();
        let mut resp = Resp {
            status_line,
            headers,
            body: Vec::new(),
        };
        if let Some(n) = resp.header("content-length") {
            let n: usize = n.parse().expect("content-length");
            resp.body = self.exact(n).await;
        }
        Some(resp)
    }

    pub async fn response(&mut self) -> Resp {
        self.try_response()
            .await
            .expect("a response before the close")
    }
}

/// An app scripted by the test over raw TCP.
pub struct FakeApp {
    listener: TcpListener,
    pub addr: SocketAddr,
    /// Connections accepted so far.
    pub accepted: usize,
}

impl FakeApp {
    pub async fn start() -> FakeApp {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
        let addr = listener.local_addr().expect("app addr");
        FakeApp {
            listener,
            addr,
            accepted: 0,
        }
    }

    pub async fn accept(&mut self) -> Peer {
        let (s, _) = tokio::time::timeout(IO, self.listener.accept())
            .await
            .expect("the proxy connects to the app in time")
            .expect("accept");
        self.accepted += 1;
        Peer::new(s)
    }

    /// The next request head, on `conn` while it stays open, else on the next connection.
    pub async fn next_head(&mut self, conn: &mut Option<Peer>) -> String {
        loop {
            if conn.is_none() {
                *conn = Some(self.accept().await);
            }
            match conn.as_mut().expect("a connection").try_head().await {
                Some(head) => return head,
                None => *conn = None,
            }
        }
    }
}

/// What a [`RecordingApp`] connection received: every byte, and whether the proxy closed it.
#[derive(Default)]
pub struct ConnLog {
    bytes: Mutex<Vec<u8>>,
    closed: AtomicBool,
}

impl ConnLog {
    fn record(&self, b: &[u8]) {
        if let Ok(mut bytes) = self.bytes.lock() {
            bytes.extend_from_slice(b);
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.bytes.lock().map(|b| b.clone()).unwrap_or_default()
    }

    pub fn closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

/// How a [`RecordingApp`] answers a request. Requests whose target starts with `/ok` or
/// `/__alive` always get [`OK`]; the script is for every other request.
#[derive(Clone, Debug)]
pub enum Script {
    /// Reads the body by its framing and answers [`OK`].
    Ok,
    /// Sends these bytes (e.g. a 1xx) as soon as the head is in, then reads the body and
    /// answers [`OK`].
    Early(Vec<u8>),
    /// Reads the body and answers with exactly these bytes, then goes on reading requests.
    Reply(Vec<u8>),
    /// Reads the body, sends these bytes and closes.
    ReplyClose(Vec<u8>),
    /// Closes as soon as the head is in, without a byte of answer.
    CloseAfterHead,
    /// Reads the body and never answers; holds the connection until the proxy closes it.
    Silent,
    /// An HTTP forward proxy's CONNECT: answers 200 after the head, then echoes every byte.
    Tunnel,
    /// No HTTP at all: echoes every byte from the first (a connection that starts with `GET `
    /// is served as [`Script::Ok`]).
    Echo,
}

/// The answer of every request the script does not handle.
pub const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

/// What the app answers when it cannot frame what it received. The status is one no proxy
/// would make up, so a test can never mistake it for the proxy's own 400.
pub const APP_PARSE_ERROR: &[u8] =
    b"HTTP/1.1 555 App Could Not Parse\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// A raw-TCP app that answers by a [`Script`] and records every byte it receives, per
/// connection, so a test can assert exactly what the proxy sent it.
pub struct RecordingApp {
    pub addr: SocketAddr,
    conns: Arc<Mutex<Vec<Arc<ConnLog>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RecordingApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RecordingApp {
    pub async fn start(script: Script) -> RecordingApp {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
        let addr = listener.local_addr().expect("app addr");
        let conns: Arc<Mutex<Vec<Arc<ConnLog>>>> = Default::default();
        let log = conns.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let rec = Arc::new(ConnLog::default());
                if let Ok(mut conns) = log.lock() {
                    conns.push(rec.clone());
                }
                let _ = s.set_nodelay(true);
                let mut peer = Peer::new(s);
                peer.rec = Some(rec);
                tokio::spawn(serve(peer, script.clone()));
            }
        });
        RecordingApp { addr, conns, task }
    }

    /// Every connection's log, in the order they were accepted.
    pub fn conns(&self) -> Vec<Arc<ConnLog>> {
        self.conns.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Every byte received, each connection's bytes in one piece.
    pub fn received(&self) -> Vec<Vec<u8>> {
        self.conns().iter().map(|c| c.bytes()).collect()
    }
}

/// Where the head in `buf` ends (after its blank line). A bare-LF head counts too, so a head
/// the proxy should not have forwarded still gets an answer and the test can say what arrived.
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The values of header `name` (any case) in a head.
pub fn head_values(head: &[u8], name: &str) -> Vec<String> {
    lossy(head)
        .split('\n')
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim().to_string())
        .collect()
}

/// How a message body is framed, read from its head as an HTTP/1.1 recipient would.
enum Framing {
    None,
    Length(usize),
    Chunked,
    Bad,
}

fn request_framing(head: &[u8]) -> Framing {
    let te = head_values(head, "transfer-encoding");
    if !te.is_empty() {
        let last = te
            .join(",")
            .rsplit(',')
            .next()
            .map(|t| t.trim().to_ascii_lowercase())
            .unwrap_or_default();
        return if last == "chunked" {
            Framing::Chunked
        } else {
            Framing::Bad
        };
    }
    let cl = head_values(head, "content-length");
    match cl.first() {
        None => Framing::None,
        Some(v) if cl.iter().all(|x| x == v) => match v.parse::<usize>() {
            Ok(n) if v.bytes().all(|b| b.is_ascii_digit()) => Framing::Length(n),
            _ => Framing::Bad,
        },
        Some(_) => Framing::Bad,
    }
}

/// Reads one line (through LF) from the peer's buffer; `None` when the peer closed first.
async fn app_line(p: &mut Peer) -> Option<Vec<u8>> {
    loop {
        if let Some(i) = p.buf.iter().position(|&b| b == b'\n') {
            return Some(p.buf.drain(..=i).collect());
        }
        if p.read_more(None).await == Some(0) {
            return None;
        }
    }
}

async fn app_exact(p: &mut Peer, n: usize) -> Option<Vec<u8>> {
    while p.buf.len() < n {
        if p.read_more(None).await == Some(0) {
            return None;
        }
    }
    Some(p.buf.drain(..n).collect())
}

/// Reads a body by `framing`; `None` when the peer closed first or the framing is unreadable.
async fn app_body(p: &mut Peer, framing: Framing) -> Option<()> {
    match framing {
        Framing::None => Some(()),
        Framing::Length(n) => app_exact(p, n).await.map(drop),
        Framing::Bad => None,
        Framing::Chunked => loop {
            let line = app_line(p).await?;
            let text = lossy(&line);
            let size = text.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size, 16).ok()?;
            if size == 0 {
                // Trailers, up to the blank line.
                loop {
                    let l = app_line(p).await?;
                    if l == b"\r\n" || l == b"\n" {
                        return Some(());
                    }
                }
            }
            app_exact(p, size).await?;
            app_line(p).await?;
        },
    }
}

async fn serve(mut p: Peer, script: Script) {
    let mut script = script;
    if let Script::Echo = script {
        // A plain GET (a liveness check) is still answered as HTTP.
        while p.buf.len() < 4 {
            if p.read_more(None).await == Some(0) {
                return;
            }
        }
        if !p.buf.starts_with(b"GET ") {
            echo(&mut p).await;
            return;
        }
        script = Script::Ok;
    }
    loop {
        let end = loop {
            if let Some(end) = head_end(&p.buf) {
                break end;
            }
            if p.read_more(None).await == Some(0) {
                return;
            }
        };
        let head: Vec<u8> = p.buf.drain(..end).collect();
        let target = head.split(|&b| b == b' ').nth(1).unwrap_or_default();
        let script = if target.starts_with(b"/ok") || target.starts_with(b"/__alive") {
            Script::Ok
        } else {
            script.clone()
        };
        match &script {
            Script::CloseAfterHead => return,
            Script::Tunnel => {
                let _ =
                    p.s.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .await;
                echo(&mut p).await;
                return;
            }
            Script::Early(bytes) => {
                let _ = p.s.write_all(bytes).await;
            }
            _ => {}
        }
        let expects = head_values(&head, "expect")
            .iter()
            .any(|v| v.eq_ignore_ascii_case("100-continue"));
        if expects {
            let _ = p.s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
        }
        if app_body(&mut p, request_framing(&head)).await.is_none() {
            let _ = p.s.write_all(APP_PARSE_ERROR).await;
            return;
        }
        let answer = match &script {
            Script::Reply(bytes) | Script::ReplyClose(bytes) => bytes.as_slice(),
            Script::Silent => {
                while p.read_more(None).await != Some(0) {}
                return;
            }
            _ => OK,
        };
        if p.s.write_all(answer).await.is_err() {
            return;
        }
        if let Script::ReplyClose(_) = script {
            return;
        }
    }
}

async fn echo(p: &mut Peer) {
    loop {
        if !p.buf.is_empty() {
            let out: Vec<u8> = p.buf.drain(..).collect();
            if p.s.write_all(&out).await.is_err() {
                return;
            }
        }
        if p.read_more(None).await == Some(0) {
            return;
        }
    }
}
