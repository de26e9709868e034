//! Hostile and malformed input, differentially: request smuggling, malformed heads and bodies,
//! loops back into the proxy, slow and silent peers, malformed responses from the app.
//!
//! Every case is one row of the table at the bottom (`cases!`): which listener the client
//! talks to, what the raw app does (a [`Script`]), what the client sends and must receive, and
//! what the app must (not) have received. Each row becomes one test that runs the case against
//! two proxies at once, one per HTTP/1 path (`TRACECAR_HTTP1_LEAN=true`, the lean path, and
//! `false`, every request served by hyper), then:
//! - checks the row's expectations on each path;
//! - checks what every case must keep: the app only ever receives well-formed CRLF requests
//!   (one `Host`, no `content-length` next to `transfer-encoding`, no control bytes, no request
//!   for `/smuggled`), and the proxy still serves a request on a fresh connection afterwards;
//! - compares the paths: the same statuses reached the client and the same requests reached
//!   the app (method, target, lowercased headers without the propagation ones, de-chunked
//!   body), unless the row says why the two legitimately differ (`differ`).
//!
//! A failing test says, for each path, what happened instead.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use std::panic::AssertUnwindSafe;
use tokio::io::AsyncWriteExt;
use tracecar_tests::raw::{head_values, lossy, Peer, RecordingApp, Script};
use tracecar_tests::sink::{RecvSpan, Sink};
use tracecar_tests::{base_env, free_port, http_get_blocking, ProxyProcess};

/// The longest a read waits for an expected byte: a missing byte fails the case, never hangs it.
const IO: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Listener {
    Inbound,
    Outbound,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Path {
    Lean,
    Hyper,
}

/// One response the client must read next.
#[derive(Clone, Debug)]
struct Want {
    lean: Vec<u16>,
    hyper: Vec<u16>,
    /// A response without a body whatever its head says (to HEAD or a CONNECT's 2xx).
    head_only: bool,
    body: Option<Vec<u8>>,
    header: Option<(&'static str, &'static str)>,
    has_header: Option<&'static str>,
    /// Measured from the client's last write.
    within: Option<Duration>,
}

/// A response with a status among `codes` on both paths.
fn resp(codes: &[u16]) -> Want {
    resp_by(codes, codes)
}

/// A response whose status differs by path.
fn resp_by(lean: &[u16], hyper: &[u16]) -> Want {
    Want {
        lean: lean.to_vec(),
        hyper: hyper.to_vec(),
        head_only: false,
        body: None,
        header: None,
        has_header: None,
        within: None,
    }
}

impl Want {
    fn head_only(mut self) -> Self {
        self.head_only = true;
        self
    }
    fn body(mut self, b: &[u8]) -> Self {
        self.body = Some(b.to_vec());
        self
    }
    fn header(mut self, name: &'static str, value: &'static str) -> Self {
        self.header = Some((name, value));
        self
    }
    fn has_header(mut self, name: &'static str) -> Self {
        self.has_header = Some(name);
        self
    }
    fn within(mut self, ms: u64) -> Self {
        self.within = Some(Duration::from_millis(ms));
        self
    }
}

/// What the client does, in order. In sent bytes, `{app}` is the app's `host:port`, `{port}`
/// the port of the listener under test and `{via}` the `via` value of the last request the app
/// received.
#[derive(Clone, Debug)]
enum Step {
    /// A step on the lean path only (what the hyper path cannot do, such as relaying a 1xx).
    LeanOnly(Box<Step>),
    Send(Vec<u8>),
    Sleep(u64),
    Resp(Want),
    /// Nothing more arrives within the time (a close is fine).
    Quiet(u64),
    /// The proxy closes the connection within the time; before the close, at most one response
    /// with one of these statuses.
    Closed(Vec<u16>, u64),
    /// A 200 whose body never completes: the connection ends first.
    Truncated,
    /// Sends the bytes and reads the same bytes back.
    Echo(Vec<u8>),
    /// Writes the bytes one every `every` ms; the proxy must close within `within` ms (a 408
    /// first is fine).
    SlowHead {
        bytes: Vec<u8>,
        every: u64,
        within: u64,
    },
    /// Resets the connection (RST); the next `Send` opens a new one.
    Reset,
    /// Closes the connection, then `tracecar_open_connections` of the listener's direction goes
    /// back to 0 within 3 s.
    OpenConnectionsSettle,
    /// The series in /metrics reaches at least this value within 3 s.
    MetricAtLeast(&'static str, f64),
    /// The listener's span (SERVER inbound, CLIENT outbound) for this `url.path` arrives with
    /// `error.type` set.
    SpanError(&'static str),
    /// `n` idle connections are accepted, the next one is closed at once without a byte; then
    /// the `n` are closed (the liveness check that ends every case shows a new connection is
    /// served again).
    ConnectionCap(usize),
    /// Every connection the app has is closed by the proxy within 3 s.
    AppClosed,
}

fn send(b: &[u8]) -> Step {
    Step::Send(b.to_vec())
}

/// One request the app must have received.
#[derive(Clone, Debug)]
struct ReqWant {
    method: &'static str,
    target: Vec<u8>,
    /// Every value the header has, for each name listed (`[]`: absent).
    headers: Vec<(&'static str, Vec<&'static str>)>,
    /// The body, de-chunked.
    body: Option<Vec<u8>>,
    /// The body's bytes as they crossed the wire, on the lean path (which copies framing).
    wire_body_lean: Option<Vec<u8>>,
}

fn req(method: &'static str, target: &[u8]) -> ReqWant {
    ReqWant {
        method,
        target: target.to_vec(),
        headers: Vec::new(),
        body: None,
        wire_body_lean: None,
    }
}

impl ReqWant {
    fn header(mut self, name: &'static str, values: &[&'static str]) -> Self {
        self.headers.push((name, values.to_vec()));
        self
    }
    fn body(mut self, b: &[u8]) -> Self {
        self.body = Some(b.to_vec());
        self
    }
    fn wire_body_lean(mut self, b: &[u8]) -> Self {
        self.wire_body_lean = Some(b.to_vec());
        self
    }
}

/// What the app must have received.
#[derive(Clone, Debug)]
enum AppWant {
    /// Only the invariants every case keeps.
    Any,
    /// Not a byte.
    Nothing,
    /// Exactly these requests, in order.
    Reqs(Vec<ReqWant>),
    /// Exactly these bytes, not HTTP (a tunnel).
    Raw(Vec<u8>),
    /// These bytes never reached the app.
    Lacks(Vec<u8>),
}

#[derive(Clone, Debug)]
struct Case {
    on: Listener,
    script: Script,
    env: Vec<(&'static str, &'static str)>,
    steps: Vec<Step>,
    app: AppWant,
    /// The app is down: the target is a port nobody listens on.
    down: bool,
    /// Why the two paths legitimately differ; `None`: they must agree.
    differ: Option<&'static str>,
}

fn case(on: Listener, script: Script, steps: Vec<Step>, app: AppWant) -> Case {
    Case {
        on,
        script,
        env: Vec::new(),
        steps,
        app,
        down: false,
        differ: None,
    }
}

impl Case {
    fn env(mut self, k: &'static str, v: &'static str) -> Self {
        self.env.push((k, v));
        self
    }
    fn down(mut self) -> Self {
        self.down = true;
        self
    }
    fn differ(mut self, why: &'static str) -> Self {
        self.differ = Some(why);
        self
    }
}

/// A request as the app received it.
#[derive(Clone, Debug, PartialEq)]
struct Req {
    method: String,
    target: Vec<u8>,
    /// In order, names lowercased.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    wire_body: Vec<u8>,
    complete: bool,
}

impl Req {
    fn values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// What the comparison of the two paths looks at.
    fn normalised(&self) -> String {
        let mut headers: Vec<String> = self
            .headers
            .iter()
            .filter(|(n, _)| !matches!(n.as_str(), "traceparent" | "tracestate" | "baggage"))
            .map(|(n, v)| match n.as_str() {
                // Each proxy has its own id.
                "via" => format!(
                    "via: {}",
                    v.split(',')
                        .map(|e| match e.trim().strip_prefix("1.1 tracecar-") {
                            Some(_) => "1.1 tracecar-{id}",
                            None => e.trim(),
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                _ => format!("{n}: {v}"),
            })
            .collect();
        headers.sort();
        format!(
            "{} {} {headers:?} body={:?}{}",
            self.method,
            lossy(&self.target),
            lossy(&self.body),
            if self.complete { "" } else { " (incomplete)" }
        )
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A field value's bytes: visible ASCII, SP, HTAB and obs-text; no other control byte.
fn value_ok(v: &[u8]) -> bool {
    v.iter().all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

/// A head line without its CR; a CR anywhere else in it is a problem.
fn line_of(l: &[u8], problems: &mut Vec<String>) -> Vec<u8> {
    let l = l.strip_suffix(b"\r").unwrap_or(l);
    if l.contains(&b'\r') {
        problems.push(format!("a bare CR in {:?}", lossy(l)));
    }
    l.to_vec()
}

/// Parses what one app connection received as strictly as RFC 9112 asks: the requests, and
/// what is wrong with the bytes (each a reason the app could read them differently).
fn parse_requests(bytes: &[u8]) -> (Vec<Req>, Vec<String>) {
    let mut reqs = Vec::new();
    let mut problems = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") else {
            problems.push(format!("a head without its CRLF end: {:?}", lossy(rest)));
            break;
        };
        let head = &rest[..end];
        rest = &rest[end + 4..];
        let mut lines = head.split(|&b| b == b'\n');
        // Every line but the last ended in LF; each must have ended in CRLF.
        let n_lines = head.split(|&b| b == b'\n').count();
        let crlf_lines = head.windows(2).filter(|w| w == b"\r\n").count();
        if crlf_lines + 1 != n_lines {
            problems.push(format!("a bare LF in the head {:?}", lossy(head)));
        }
        let request_line = line_of(lines.next().unwrap_or_default(), &mut problems);
        let parts: Vec<&[u8]> = request_line.split(|&b| b == b' ').collect();
        if parts.len() != 3
            || parts[0].is_empty()
            || !parts[0].iter().all(|&b| is_tchar(b))
            || parts[1].is_empty()
            || parts[1].iter().any(|&b| b <= 0x20 || b == 0x7f)
            || !(parts[2] == b"HTTP/1.1" || parts[2] == b"HTTP/1.0")
        {
            problems.push(format!(
                "a malformed request line {:?}",
                lossy(&request_line)
            ));
        }
        let mut headers = Vec::new();
        for l in lines {
            let l = line_of(l, &mut problems);
            if l.first().is_some_and(|&b| b == b' ' || b == b'\t') {
                problems.push(format!("an obs-fold line {:?}", lossy(&l)));
                continue;
            }
            let Some(colon) = l.iter().position(|&b| b == b':') else {
                problems.push(format!("a header line without a colon {:?}", lossy(&l)));
                continue;
            };
            let (name, value) = (&l[..colon], &l[colon + 1..]);
            if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
                problems.push(format!("a malformed field name {:?}", lossy(&l)));
            }
            if !value_ok(value) {
                problems.push(format!("a control byte in {:?}", lossy(&l)));
            }
            headers.push((
                lossy(name).to_ascii_lowercase(),
                lossy(value).trim_matches([' ', '\t']).to_string(),
            ));
        }
        let mut r = Req {
            method: lossy(parts.first().copied().unwrap_or_default()),
            target: parts.get(1).copied().unwrap_or_default().to_vec(),
            headers,
            body: Vec::new(),
            wire_body: Vec::new(),
            complete: true,
        };
        if r.method == "CONNECT" {
            // What follows is the tunnel's.
            reqs.push(r);
            break;
        }
        let te = r.values("transfer-encoding").join(",");
        let cl = r.values("content-length");
        if !te.is_empty() && !cl.is_empty() {
            problems.push(format!(
                "content-length {cl:?} next to transfer-encoding {te:?}"
            ));
        }
        if !te.is_empty() {
            let last = te.rsplit(',').next().unwrap_or("").trim();
            if !last.eq_ignore_ascii_case("chunked") {
                problems.push(format!("transfer-encoding {te:?} does not end in chunked"));
                reqs.push(r);
                break;
            }
            match dechunk(rest) {
                Ok((body, used)) => {
                    r.body = body;
                    r.wire_body = rest[..used].to_vec();
                    rest = &rest[used..];
                }
                Err(Some(p)) => {
                    problems.push(p);
                    reqs.push(r);
                    break;
                }
                Err(None) => {
                    r.wire_body = rest.to_vec();
                    r.complete = false;
                    rest = &[];
                }
            }
        } else if let Some(first) = cl.first() {
            let n = match first.parse::<usize>() {
                Ok(n)
                    if first.bytes().all(|b| b.is_ascii_digit())
                        && cl.iter().all(|v| v == first) =>
                {
                    n
                }
                _ => {
                    problems.push(format!("an unusable content-length {cl:?}"));
                    reqs.push(r);
                    break;
                }
            };
            let take = n.min(rest.len());
            r.body = rest[..take].to_vec();
            r.wire_body = r.body.clone();
            r.complete = take == n;
            rest = &rest[take..];
        }
        reqs.push(r);
    }
    (reqs, problems)
}

/// A chunked body, strictly: `Ok((body, bytes used))`; `Err(None)` when it is incomplete,
/// `Err(Some(why))` when it is malformed.
fn dechunk(b: &[u8]) -> Result<(Vec<u8>, usize), Option<String>> {
    let mut body = Vec::new();
    let mut at = 0;
    let line = |at: usize| -> Result<(&[u8], usize), Option<String>> {
        let i = b[at..].windows(2).position(|w| w == b"\r\n").ok_or(None)?;
        let l = &b[at..at + i];
        if l.contains(&b'\n') || l.contains(&b'\r') {
            return Err(Some(format!(
                "a bare CR or LF in the chunk line {:?}",
                lossy(l)
            )));
        }
        Ok((l, at + i + 2))
    };
    loop {
        let (l, next) = line(at)?;
        let (size, ext) = match l.iter().position(|&b| b == b';') {
            Some(i) => (&l[..i], &l[i..]),
            None => (l, &b""[..]),
        };
        if !value_ok(ext) {
            return Err(Some(format!(
                "a control byte in the chunk extension {:?}",
                lossy(l)
            )));
        }
        let size_text = lossy(size);
        let size_text = size_text.trim_end_matches([' ', '\t']);
        if size_text.is_empty()
            || size_text.len() > 15
            || !size_text.bytes().all(|c| c.is_ascii_hexdigit())
        {
            return Err(Some(format!("a malformed chunk size {:?}", lossy(l))));
        }
        let size = usize::from_str_radix(size_text, 16).map_err(|e| Some(e.to_string()))?;
        at = next;
        if size == 0 {
            loop {
                let (l, next) = line(at)?;
                at = next;
                if l.is_empty() {
                    return Ok((body, at));
                }
                if !l.contains(&b':') || !value_ok(l) {
                    return Err(Some(format!("a malformed trailer {:?}", lossy(l))));
                }
            }
        }
        if b.len() < at + size + 2 {
            return Err(None);
        }
        body.extend_from_slice(&b[at..at + size]);
        if &b[at + size..at + size + 2] != b"\r\n" {
            return Err(Some("chunk data not followed by CRLF".into()));
        }
        at += size + 2;
    }
}

/// A response as the client read it.
#[derive(Debug)]
struct Got {
    status: u16,
    head: String,
    body: Vec<u8>,
    /// The body ended where its framing said (or at the close when it had none).
    complete: bool,
}

impl Got {
    fn header(&self, name: &str) -> Option<String> {
        head_values(self.head.as_bytes(), name).into_iter().next()
    }
}

/// Reads one response; `Err` says what came instead.
async fn read_response(p: &mut Peer, head_only: bool, limit: Duration) -> Result<Got, String> {
    let deadline = Instant::now() + limit;
    let end = loop {
        if let Some(i) = p.buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match p.read_more(Some(left)).await {
            None => {
                return Err(format!(
                    "no response within {limit:?}; got {:?}",
                    lossy(&p.buf)
                ))
            }
            Some(0) => return Err(format!("closed before a response; got {:?}", lossy(&p.buf))),
            Some(_) => {}
        }
    };
    let head = lossy(&p.buf.drain(..end).collect::<Vec<u8>>());
    let status = head
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| head.strip_prefix("HTTP/1.0 "))
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("not a response head: {head:?}"))?;
    let mut got = Got {
        status,
        head,
        body: Vec::new(),
        complete: true,
    };
    if head_only || status < 200 || status == 204 || status == 304 {
        return Ok(got);
    }
    let te = head_values(got.head.as_bytes(), "transfer-encoding").join(",");
    let cl = got.header("content-length");
    loop {
        let framed_end = if te.to_ascii_lowercase().contains("chunked") {
            match dechunk(&p.buf) {
                Ok((body, used)) => {
                    got.body = body;
                    p.buf.drain(..used);
                    return Ok(got);
                }
                Err(Some(why)) => return Err(format!("a malformed chunked body: {why}")),
                Err(None) => None,
            }
        } else if let Some(n) = cl.as_ref().and_then(|v| v.parse::<usize>().ok()) {
            (p.buf.len() >= n).then_some(n)
        } else {
            None
        };
        if let Some(n) = framed_end {
            got.body = p.buf.drain(..n).collect();
            return Ok(got);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match p.read_more(Some(left)).await {
            None => return Err(format!("the body did not end within {limit:?}: {got:?}")),
            Some(0) => {
                // Framed by the close, or cut short.
                got.complete = te.is_empty() && cl.is_none();
                got.body = std::mem::take(&mut p.buf);
                return Ok(got);
            }
            Some(_) => {}
        }
    }
}

/// One path's run of a case: what the comparison needs.
#[derive(Debug)]
struct Observed {
    statuses: Vec<u16>,
    requests: Vec<String>,
}

struct Run<'a> {
    path: Path,
    case: &'a Case,
    proxy: &'a ProxyProcess,
    sink: &'a Sink,
    app: &'a RecordingApp,
    /// Where `{app}` points (the app, or a dead port).
    app_addr: SocketAddr,
    listen: SocketAddr,
    client: Option<Peer>,
    last_send: Instant,
    statuses: Vec<u16>,
}

async fn metric(proxy: &ProxyProcess, series: &'static str) -> Option<f64> {
    let admin = proxy.admin;
    let text = tokio::task::spawn_blocking(move || {
        http_get_blocking(admin, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    })
    .await
    .unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

impl Run<'_> {
    fn app_requests(&self) -> Vec<Req> {
        self.app
            .received()
            .iter()
            .flat_map(|b| parse_requests(b).0)
            .collect()
    }

    fn fill(&self, template: &[u8]) -> Vec<u8> {
        let mut out = template.to_vec();
        let mut replace = |from: &str, to: &str| {
            while let Some(i) = out.windows(from.len()).position(|w| w == from.as_bytes()) {
                out.splice(i..i + from.len(), to.bytes());
            }
        };
        replace("{app}", &self.app_addr.to_string());
        replace("{port}", &self.listen.port().to_string());
        if template.windows(5).any(|w| w == b"{via}") {
            let via = self
                .app_requests()
                .last()
                .and_then(|r| r.values("via").last().map(|v| v.to_string()));
            let via = via.unwrap_or_else(|| panic!("the app's last request carried no via header"));
            assert!(
                via.split(',')
                    .any(|v| v.trim().starts_with("1.1 tracecar-")),
                "the proxy's via element is not `1.1 tracecar-<id>`: {via:?}"
            );
            replace("{via}", &via);
        }
        out
    }

    async fn client(&mut self) -> &mut Peer {
        if self.client.is_none() {
            self.client = Some(Peer::connect(self.listen).await);
        }
        self.client.as_mut().expect("client connection")
    }

    async fn step(&mut self, step: &Step) {
        match step {
            Step::LeanOnly(inner) => {
                if matches!(self.path, Path::Lean) {
                    Box::pin(self.step(inner)).await;
                }
            }
            Step::Send(t) => {
                let bytes = self.fill(t);
                let c = self.client().await;
                c.s.write_all(&bytes)
                    .await
                    .unwrap_or_else(|e| panic!("the client's write failed: {e}"));
                self.last_send = Instant::now();
            }
            Step::Sleep(ms) => tokio::time::sleep(Duration::from_millis(*ms)).await,
            Step::Resp(w) => {
                let codes = match self.path {
                    Path::Lean => &w.lean,
                    Path::Hyper => &w.hyper,
                };
                let since = self.last_send;
                let limit = w.within.map_or(IO, |d| d.max(IO));
                let got = read_response(self.client().await, w.head_only, limit)
                    .await
                    .unwrap_or_else(|e| panic!("expected a response {codes:?}: {e}"));
                let took = since.elapsed();
                self.statuses.push(got.status);
                assert!(
                    codes.contains(&got.status),
                    "expected a response {codes:?}, got {} {:?} body {:?}",
                    got.status,
                    got.head,
                    lossy(&got.body)
                );
                if let Some(within) = w.within {
                    assert!(
                        took <= within,
                        "the {} took {took:?} (at most {within:?})",
                        got.status
                    );
                }
                if let Some(b) = &w.body {
                    assert_eq!(lossy(&got.body), lossy(b), "the body of {got:?}");
                }
                if let Some((n, v)) = w.header {
                    assert_eq!(got.header(n).as_deref(), Some(v), "header {n} in {got:?}");
                }
                if let Some(n) = w.has_header {
                    assert!(got.header(n).is_some(), "no {n} header in {got:?}");
                }
            }
            Step::Quiet(ms) => {
                let c = self.client().await;
                assert!(c.buf.is_empty(), "unexpected bytes: {:?}", lossy(&c.buf));
                let limit = Duration::from_millis(*ms);
                if let Some(n) = c.read_more(Some(limit)).await {
                    assert_eq!(n, 0, "unexpected bytes: {:?}", lossy(&c.buf));
                }
            }
            Step::Closed(allow, ms) => {
                let limit = Duration::from_millis(*ms);
                let start = self.last_send;
                let c = self.client().await;
                let closed = loop {
                    let left = limit.saturating_sub(start.elapsed());
                    match c.read_more(Some(left)).await {
                        None => break false,
                        Some(0) => break true,
                        Some(_) => {}
                    }
                };
                let rest = std::mem::take(&mut c.buf);
                assert!(
                    closed,
                    "still open {limit:?} after the last write; got {:?}",
                    lossy(&rest)
                );
                if !rest.is_empty() {
                    let status = lossy(&rest)
                        .get(9..12)
                        .and_then(|s| s.parse::<u16>().ok())
                        .unwrap_or(0);
                    self.statuses.push(status);
                    assert!(
                        allow.contains(&status)
                            && rest.windows(4).filter(|w| w == b"\r\n\r\n").count() == 1,
                        "before the close: {:?} (allowed: one response {allow:?})",
                        lossy(&rest)
                    );
                }
                self.client = None;
            }
            Step::Truncated => {
                let got = read_response(self.client().await, false, IO)
                    .await
                    .unwrap_or_else(|e| panic!("expected a 200 cut short: {e}"));
                self.statuses.push(got.status);
                assert_eq!(got.status, 200, "{got:?}");
                assert!(!got.complete, "the client saw a complete body: {got:?}");
            }
            Step::Echo(b) => {
                let c = self.client().await;
                c.s.write_all(b).await.expect("write into the tunnel");
                let mut back = Vec::new();
                while back.len() < b.len() {
                    if c.buf.is_empty() {
                        match c.read_more(Some(IO)).await {
                            None => {
                                panic!("the tunnel echoed {:?} of {:?}", lossy(&back), lossy(b))
                            }
                            Some(0) => panic!("the tunnel closed after {:?}", lossy(&back)),
                            Some(_) => {}
                        }
                    }
                    let n = c.buf.len().min(b.len() - back.len());
                    back.extend(c.buf.drain(..n));
                }
                assert_eq!(lossy(&back), lossy(b));
            }
            Step::SlowHead {
                bytes,
                every,
                within,
            } => {
                let start = Instant::now();
                let limit = Duration::from_millis(*within);
                let c = self.client().await;
                let mut next = 0;
                let closed = loop {
                    if start.elapsed() > limit {
                        break false;
                    }
                    match c.read_more(Some(Duration::from_millis(*every))).await {
                        Some(0) => break true,
                        Some(_) => continue,
                        None => {}
                    }
                    if next < bytes.len() {
                        if c.s.write_all(&bytes[next..next + 1]).await.is_err() {
                            break true;
                        }
                        next += 1;
                    }
                };
                let took = start.elapsed();
                let got = std::mem::take(&mut c.buf);
                assert!(
                    closed && took <= limit,
                    "a head sent one byte per {every} ms: the connection is still open after \
                     {took:?} ({next} bytes sent); got {:?}",
                    lossy(&got)
                );
                assert!(
                    got.is_empty() || got.starts_with(b"HTTP/1.1 408 "),
                    "before the close: {:?}",
                    lossy(&got)
                );
                self.client = None;
            }
            Step::Reset => {
                if let Some(c) = self.client.take() {
                    c.s.set_zero_linger().expect("SO_LINGER");
                    drop(c);
                }
            }
            Step::OpenConnectionsSettle => {
                self.client = None;
                let series = match self.case.on {
                    Listener::Inbound => r#"tracecar_open_connections{direction="inbound"}"#,
                    Listener::Outbound => r#"tracecar_open_connections{direction="outbound"}"#,
                };
                let start = Instant::now();
                loop {
                    let v = metric(self.proxy, series).await;
                    if v == Some(0.0) {
                        break;
                    }
                    assert!(
                        start.elapsed() < Duration::from_secs(3),
                        "{series} is {v:?} 3 s after the client left"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            Step::MetricAtLeast(series, min) => {
                let start = Instant::now();
                loop {
                    let v = metric(self.proxy, series).await;
                    if v.is_some_and(|v| v >= *min) {
                        break;
                    }
                    assert!(
                        start.elapsed() < Duration::from_secs(3),
                        "{series} is {v:?}, expected at least {min}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            Step::SpanError(path) => {
                let kind = match self.case.on {
                    Listener::Inbound => "SERVER",
                    Listener::Outbound => "CLIENT",
                };
                let found = |s: &[RecvSpan]| {
                    s.iter().any(|s| {
                        s.kind == kind
                            && s.attr_str("url.path") == Some(path)
                            && s.attr_str("error.type").is_some()
                    })
                };
                let spans = self.sink.wait_until(found, Duration::from_secs(5)).await;
                let mine: Vec<_> = spans
                    .iter()
                    .filter(|s| s.attr_str("url.path") == Some(path))
                    .collect();
                assert!(
                    found(&spans),
                    "no span for {path} with error.type: {mine:#?}"
                );
            }
            Step::ConnectionCap(n) => {
                let mut idle = Vec::new();
                for _ in 0..*n {
                    idle.push(Peer::connect(self.listen).await);
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
                let mut extra = Peer::connect(self.listen).await;
                let start = Instant::now();
                let got = extra.read_more(Some(Duration::from_secs(1))).await;
                assert!(
                    got == Some(0) && extra.buf.is_empty(),
                    "connection {} past the cap of {n}: {} after {:?}",
                    n + 1,
                    match got {
                        None => "still open".to_string(),
                        Some(_) => format!("got {:?}", lossy(&extra.buf)),
                    },
                    start.elapsed()
                );
                drop(idle);
                tokio::time::sleep(Duration::from_millis(300)).await;
                self.client = None;
            }
            Step::AppClosed => {
                let start = Instant::now();
                while !self.app.conns().iter().all(|c| c.closed()) {
                    assert!(
                        start.elapsed() < Duration::from_secs(3),
                        "the proxy still holds the app connection 3 s after the client left"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

fn check_app(want: &AppWant, path: Path, received: &[Vec<u8>], reqs: &[Req]) {
    let all: Vec<u8> = received.concat();
    match want {
        AppWant::Any => {}
        AppWant::Nothing => assert!(all.is_empty(), "the app received {:?}", lossy(&all)),
        AppWant::Raw(b) => assert_eq!(lossy(&all), lossy(b), "the app received"),
        AppWant::Lacks(b) => assert!(
            !all.windows(b.len()).any(|w| w == b.as_slice()),
            "the app received {:?}",
            lossy(&all)
        ),
        AppWant::Reqs(wants) => {
            let seen: Vec<String> = reqs.iter().map(Req::normalised).collect();
            assert_eq!(
                reqs.len(),
                wants.len(),
                "the app received {} requests, expected {}: {seen:#?}",
                reqs.len(),
                wants.len()
            );
            for (r, w) in reqs.iter().zip(wants) {
                assert_eq!(
                    (r.method.as_str(), lossy(&r.target)),
                    (w.method, lossy(&w.target)),
                    "the app received {seen:#?}"
                );
                assert_eq!(r.target, w.target, "the target's bytes");
                for (name, values) in &w.headers {
                    assert_eq!(
                        &r.values(name),
                        values,
                        "header {name} of {}",
                        r.normalised()
                    );
                }
                if let Some(b) = &w.body {
                    assert!(r.complete, "an incomplete body: {}", r.normalised());
                    assert_eq!(lossy(&r.body), lossy(b), "the body of {}", r.normalised());
                }
                if let (Path::Lean, Some(b)) = (path, &w.wire_body_lean) {
                    assert_eq!(lossy(&r.wire_body), lossy(b), "the body bytes on the wire");
                }
            }
        }
    }
}

/// Runs `case` on one path: every step, the app's expectations and invariants, and a normal
/// request on a fresh connection afterwards.
async fn run_path(case: Arc<Case>, path: Path) -> Observed {
    let sink = Sink::start().await;
    let app = RecordingApp::start(case.script.clone()).await;
    let app_addr: SocketAddr = if case.down {
        format!("127.0.0.1:{}", free_port()).parse().expect("addr")
    } else {
        app.addr
    };
    let mut env = base_env(&sink.endpoint());
    env.push(("TRACECAR_INBOUND_TARGET".into(), app_addr.to_string()));
    env.push(("TRACECAR_WORKER_THREADS".into(), "1".into()));
    let lean = if path == Path::Lean { "true" } else { "false" };
    env.push(("TRACECAR_HTTP1_LEAN".into(), lean.into()));
    env.extend(case.env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let proxy = tokio::task::spawn_blocking(move || ProxyProcess::spawn(&env))
        .await
        .expect("proxy start");
    let listen = match case.on {
        Listener::Inbound => proxy.inbound,
        Listener::Outbound => proxy.outbound,
    };
    let mut run = Run {
        path,
        case: &case,
        proxy: &proxy,
        sink: &sink,
        app: &app,
        app_addr,
        listen,
        client: None,
        last_send: Instant::now(),
        statuses: Vec::new(),
    };
    let stepped = AssertUnwindSafe(async {
        for step in &case.steps {
            run.step(step).await;
        }
    })
    .catch_unwind()
    .await;
    let statuses = std::mem::take(&mut run.statuses);
    drop(run);
    if let Err(p) = stepped {
        // Say whether the proxy survived what the case did to it.
        let after = match alive(&case, &proxy, listen, app_addr).await {
            Ok(()) => "the proxy still serves a new connection".to_string(),
            Err(e) => e,
        };
        panic!("{}\n    afterwards: {after}", panic_message(p.as_ref()));
    }

    // What the app received, before the liveness request adds to it.
    let received = app.received();
    let mut reqs = Vec::new();
    for bytes in &received {
        if matches!(case.script, Script::Echo) {
            continue;
        }
        let (r, problems) = parse_requests(bytes);
        assert!(
            problems.is_empty(),
            "the app received malformed bytes ({}): {:?}",
            problems.join("; "),
            lossy(bytes)
        );
        reqs.extend(r);
    }
    for r in &reqs {
        assert!(
            !r.target.windows(9).any(|w| w == b"/smuggled"),
            "the app received a request the proxy did not see: {}",
            r.normalised()
        );
        assert_eq!(
            r.values("host").len(),
            1,
            "Host fields in {}",
            r.normalised()
        );
    }
    check_app(&case.app, path, &received, &reqs);

    if let Err(e) = alive(&case, &proxy, listen, app_addr).await {
        panic!("afterwards: {e}");
    }
    Observed {
        statuses,
        // Each path has its own app.
        requests: reqs
            .iter()
            .map(|r| r.normalised().replace(&app_addr.to_string(), "{app}"))
            .collect(),
    }
}

/// A normal request on a fresh connection gets its answer (200; 502 when the app is down).
async fn alive(
    case: &Case,
    proxy: &ProxyProcess,
    listen: SocketAddr,
    app_addr: SocketAddr,
) -> Result<(), String> {
    let host = match case.on {
        Listener::Inbound => "app".to_string(),
        Listener::Outbound => app_addr.to_string(),
    };
    let request = format!("GET /__alive HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let answer = match tokio::time::timeout(IO, tokio::net::TcpStream::connect(listen)).await {
        Ok(Ok(s)) => {
            let mut c = Peer::new(s);
            match c.s.write_all(request.as_bytes()).await {
                Ok(()) => read_response(&mut c, false, IO).await,
                Err(e) => Err(format!("write failed: {e}")),
            }
        }
        Ok(Err(e)) => Err(format!("connect failed: {e}")),
        Err(_) => Err("connect timed out".into()),
    };
    let expected = if case.down { 502 } else { 200 };
    match answer {
        Ok(r) if r.status == expected => Ok(()),
        other => {
            let state = std::fs::read_to_string(format!("/proc/{}/stat", proxy.pid()))
                .ok()
                .and_then(|s| s.rsplit(')').next().map(|r| r.trim().chars().next()))
                .flatten();
            let process = match state {
                None | Some('Z') | Some('X') => "the proxy process has EXITED",
                Some(_) => "the proxy process is running",
            };
            Err(format!(
                "a normal request on a new connection got {other:?}, expected {expected}; \
                 {process}; stderr tail: {}",
                tail(&proxy.stderr())
            ))
        }
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic".into())
}

fn panic_text(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => panic_message(p.as_ref()),
        Err(e) => e.to_string(),
    }
}

/// Runs `case` on both paths at once and compares them; one panic listing every failure.
async fn differential(name: &str, case: Case) {
    let case = Arc::new(case);
    let lean = tokio::spawn(run_path(case.clone(), Path::Lean));
    let hyper = tokio::spawn(run_path(case.clone(), Path::Hyper));
    let lean = lean.await.map_err(panic_text);
    let hyper = hyper.await.map_err(panic_text);
    let mut failures = Vec::new();
    for (path, r) in [("lean", &lean), ("hyper", &hyper)] {
        match r {
            Ok(o) => eprintln!(
                "{name} [{path}] ok: client got {:?}; app got {:?}",
                o.statuses, o.requests
            ),
            Err(e) => {
                eprintln!("{name} [{path}] FAILED: {e}");
                failures.push(format!("{path}: {e}"));
            }
        }
    }
    if let (Ok(l), Ok(h), None) = (&lean, &hyper, case.differ) {
        if l.statuses != h.statuses {
            failures.push(format!(
                "the paths differ: the client got {:?} on lean, {:?} on hyper",
                l.statuses, h.statuses
            ));
        }
        if l.requests != h.requests {
            failures.push(format!(
                "the paths differ: the app received\n  lean:  {:?}\n  hyper: {:?}",
                l.requests, h.requests
            ));
        }
    }
    assert!(failures.is_empty(), "{name}:\n{}", failures.join("\n"));
}

macro_rules! cases {
    ($($name:ident => $case:expr;)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                differential(stringify!($name), $case).await;
            }
        )*
    };
}

use Listener::{Inbound, Outbound};

const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: app\r\n\r\n";

/// A POST whose head carries `headers` and whose body is `body`.
fn post(target: &str, headers: &str, body: &str) -> Step {
    send(format!("POST {target} HTTP/1.1\r\nHost: app\r\n{headers}\r\n{body}").as_bytes())
}

/// A body that is chunked (empty, ended) followed by a smuggled request, announced with a
/// content-length covering all of it, under a transfer-encoding line `te`.
fn te_smuggle(te: &str) -> Step {
    let body = format!("0\r\n\r\n{SMUGGLED}");
    post(
        "/te",
        &format!("{te}\r\nContent-Length: {}\r\n", body.len()),
        &body,
    )
}

/// A request whose head has one malformed line `line`: 400, and the app never hears of it.
fn refused_head(line: &[u8]) -> Case {
    let mut head = b"GET /bad HTTP/1.1\r\nHost: app\r\n".to_vec();
    head.extend_from_slice(line);
    head.extend_from_slice(b"\r\n\r\n");
    case(
        Inbound,
        Script::Ok,
        vec![Step::Send(head), Step::Resp(resp(&[400]))],
        AppWant::Nothing,
    )
}

/// A POST with `content-length` value `v` and a five-byte body: 400, nothing to the app.
fn refused_length(v: &str) -> Case {
    case(
        Inbound,
        Script::Ok,
        vec![
            post("/cl", &format!("Content-Length: {v}\r\n"), "hello"),
            Step::Resp(resp(&[400])),
        ],
        AppWant::Nothing,
    )
}

/// A chunked POST with body `body`: 400, and `lacks` never reaches the app.
fn refused_chunks(body: &str, lacks: &str) -> Case {
    case(
        Inbound,
        Script::Ok,
        vec![
            post("/chunks", "Transfer-Encoding: chunked\r\n", body),
            Step::Resp(resp(&[400])),
        ],
        AppWant::Lacks(lacks.as_bytes().to_vec()),
    )
}

/// A request with a raw UTF-8 target on `on`: the proxy survives, and both paths forward the
/// bytes as they came.
fn utf8_target(on: Listener, target: &'static [u8]) -> Case {
    let mut head = b"GET ".to_vec();
    head.extend_from_slice(target);
    head.extend_from_slice(match on {
        Inbound => b" HTTP/1.1\r\nHost: app\r\n\r\n",
        Outbound => b" HTTP/1.1\r\nHost: {app}\r\n\r\n",
    });
    case(
        on,
        Script::Reply(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nutf8".to_vec()),
        vec![Step::Send(head), Step::Resp(resp(&[200]))],
        AppWant::Reqs(vec![req("GET", target)]),
    )
}

/// A forward-proxy request on the outbound listener that names the proxy itself.
fn a_loop(request: &str) -> Case {
    case(
        Outbound,
        Script::Ok,
        vec![
            send(request.as_bytes()),
            Step::Resp(resp(&[508]).header("x-tracecar-error", "1").within(2000)),
            Step::OpenConnectionsSettle,
        ],
        AppWant::Nothing,
    )
}

/// A response `reply` that must not leave stray bytes for the next request on the connection.
fn no_stray_body(request: &str, reply: &[u8], status: u16, head_only: bool) -> Case {
    let mut first = resp(&[status]);
    if head_only {
        first = first.head_only();
    }
    case(
        Inbound,
        Script::Reply(reply.to_vec()),
        vec![
            send(request.as_bytes()),
            Step::Resp(first),
            send(b"GET /ok-next HTTP/1.1\r\nHost: app\r\n\r\n"),
            Step::Resp(resp(&[200]).body(b"ok")),
            Step::Quiet(200),
        ],
        AppWant::Any,
    )
}

/// A 1xx from the app after the request head, before it reads the body.
fn informational(
    info: &'static [u8],
    code: u16,
    headers: &str,
    pieces: &[&str],
    body: &[u8],
) -> Case {
    let mut steps = vec![send(
        format!("POST /p HTTP/1.1\r\nHost: app\r\n{headers}\r\n").as_bytes(),
    )];
    for p in pieces {
        steps.push(Step::Sleep(100));
        steps.push(send(p.as_bytes()));
    }
    steps.push(Step::LeanOnly(Box::new(Step::Resp(resp(&[code])))));
    steps.push(Step::Resp(resp(&[200]).body(b"ok")));
    case(
        Inbound,
        Script::Early(info.to_vec()),
        steps,
        AppWant::Reqs(vec![req("POST", b"/p").body(body)]),
    )
    .differ(HYPER_1XX)
}

/// hyper's server has no way to send an informational response it did not make itself.
const HYPER_1XX: &str = "the hyper path cannot relay a 1xx from the app (hyper drops it); the final response and the whole body still go through";

/// CL.TE: a length that covers only the end chunk, the smuggled request after it. Either 400,
/// or chunked wins, the length is dropped and the connection closes after the response.
fn smuggle_cl_te_case() -> Case {
    case(
        Inbound,
        Script::Ok,
        vec![
            post(
                "/clte",
                "Content-Length: 6\r\nTransfer-Encoding: chunked\r\n",
                &format!("0\r\n\r\n{SMUGGLED}"),
            ),
            Step::Resp(resp(&[200, 400])),
            Step::Closed(vec![], 2000),
        ],
        AppWant::Any,
    )
}

/// TE.CL: a length that covers only the chunk-size line; the chunk is a request.
fn smuggle_te_cl_case() -> Case {
    case(
        Inbound,
        Script::Ok,
        vec![
            post(
                "/tecl",
                &format!(
                    "Transfer-Encoding: chunked\r\nContent-Length: {}\r\n",
                    format!("{:x}\r\n", SMUGGLED.len()).len()
                ),
                &format!("{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n", SMUGGLED.len()),
            ),
            Step::Resp(resp(&[200, 400])),
            Step::Closed(vec![], 2000),
        ],
        AppWant::Any,
    )
}

/// The same case on the outbound listener, as a forward-proxy request: the head's first
/// `Host: app` names the app instead (bodies keep their bytes and lengths).
fn outbound(mut c: Case) -> Case {
    c.on = Outbound;
    for step in &mut c.steps {
        if let Step::Send(b) = step {
            if let Some(i) = b.windows(9).position(|w| w == b"Host: app") {
                b.splice(i..i + 9, b"Host: {app}".iter().copied());
            }
        }
    }
    c
}

cases! {
    // 1. Raw UTF-8 in the target must not crash the proxy.
    crash_utf8_target_inbound => utf8_target(Inbound, b"/aaaaa\xc3\xa9");
    crash_utf8_resume_inbound => utf8_target(Inbound, b"/r\xc3\xa9sum\xc3\xa9");
    crash_utf8_target_outbound => utf8_target(Outbound, b"/aaaaa\xc3\xa9");
    crash_utf8_resume_outbound => utf8_target(Outbound, b"/r\xc3\xa9sum\xc3\xa9");

    // 2. Requests that would loop back into the proxy: 508, fast, nothing held afterwards.
    loop_short_ipv4 => a_loop("GET /loop HTTP/1.1\r\nHost: 127.1:{port}\r\n\r\n");
    loop_v4_mapped_ipv6 => a_loop("GET /loop HTTP/1.1\r\nHost: [::ffff:127.0.0.1]:{port}\r\n\r\n");
    loop_decimal_ipv4 => a_loop("GET /loop HTTP/1.1\r\nHost: 2130706433:{port}\r\n\r\n");
    loop_localhost_dot => a_loop("GET /loop HTTP/1.1\r\nHost: localhost.:{port}\r\n\r\n");
    loop_zero_address => a_loop("GET /loop HTTP/1.1\r\nHost: 0:{port}\r\n\r\n");
    loop_absolute_uri => a_loop("GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    loop_via_marker => case(
        Outbound,
        Script::Ok,
        vec![
            send(b"GET /ok-via HTTP/1.1\r\nHost: {app}\r\n\r\n"),
            Step::Resp(resp(&[200]).body(b"ok")),
            send(b"GET /ok-again HTTP/1.1\r\nHost: {app}\r\nVia: {via}\r\n\r\n"),
            Step::Resp(resp(&[508]).header("x-tracecar-error", "1")),
        ],
        AppWant::Reqs(vec![req("GET", b"/ok-via")]),
    );

    // 3. HEAD answered by the proxy: a content-length, no body, the connection stays in step.
    head_app_closes_pipelined => case(
        Inbound,
        Script::CloseAfterHead,
        vec![
            send(b"HEAD /h HTTP/1.1\r\nHost: app\r\n\r\nGET /ok-2 HTTP/1.1\r\nHost: app\r\n\r\n"),
            Step::Resp(resp(&[502]).head_only().has_header("content-length")),
            Step::Resp(resp(&[200]).body(b"ok")),
            Step::Quiet(200),
        ],
        AppWant::Any,
    );
    head_app_down => case(
        Inbound,
        Script::Ok,
        vec![
            send(b"HEAD /h HTTP/1.1\r\nHost: app\r\n\r\n"),
            Step::Resp(resp(&[502]).head_only().has_header("content-length")),
            send(b"GET /ok-2 HTTP/1.1\r\nHost: app\r\n\r\n"),
            Step::Resp(resp(&[502]).has_header("x-tracecar-error")),
            Step::Quiet(200),
        ],
        AppWant::Nothing,
    ).down();

    // 4. A 1xx before the app reads the body: the client gets it, the app still gets the body.
    info_103_content_length => informational(
        b"HTTP/1.1 103 Early Hints\r\nlink: </s.css>\r\n\r\n", 103,
        "Content-Length: 5\r\n", &["hello"], b"hello");
    info_103_chunked => informational(
        b"HTTP/1.1 103 Early Hints\r\nlink: </s.css>\r\n\r\n", 103,
        "Transfer-Encoding: chunked\r\n", &["5\r\nhel", "lo\r\n", "0\r\n\r\n"], b"hello");
    info_100_content_length => informational(
        b"HTTP/1.1 100 Continue\r\n\r\n", 100, "Content-Length: 5\r\n", &["he", "llo"], b"hello");
    info_100_chunked => informational(
        b"HTTP/1.1 100 Continue\r\n\r\n", 100,
        "Transfer-Encoding: chunked\r\n", &["5\r\nhello\r\n0\r\n\r\n"], b"hello");

    // 5. CONNECT: to the app (itself a forward proxy) inbound; the proxy's own tunnel outbound.
    connect_inbound_to_app => case(
        Inbound,
        Script::Tunnel,
        vec![
            send(b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n"),
            Step::Resp(resp(&[200]).head_only()),
            Step::Echo(b"ping".to_vec()),
            Step::Echo(b"\x16\x03\x01 tls-ish".to_vec()),
        ],
        AppWant::Reqs(vec![req("CONNECT", b"example.test:443")]),
    );
    connect_outbound_tunnel => case(
        Outbound,
        Script::Echo,
        vec![
            send(b"CONNECT {app} HTTP/1.1\r\nHost: {app}\r\n\r\n"),
            Step::Resp(resp(&[200]).head_only()),
            Step::Echo(b"ping".to_vec()),
        ],
        AppWant::Raw(b"ping".to_vec()),
    );

    // 6. Host and framing rules.
    host_absolute_form_wins => case(
        Inbound,
        Script::Ok,
        vec![
            send(b"GET http://a.test/x HTTP/1.1\r\nHost: b.test\r\n\r\n"),
            Step::Resp(resp(&[200])),
        ],
        AppWant::Reqs(vec![req("GET", b"/x").header("host", &["a.test"])]),
    );
    host_twice => refused_head(b"Host: other");
    host_with_userinfo => case(
        Inbound,
        Script::Ok,
        vec![send(b"GET /u HTTP/1.1\r\nHost: user@app\r\n\r\n"), Step::Resp(resp(&[400]))],
        AppWant::Nothing,
    );
    absolute_uri_with_userinfo => case(
        Inbound,
        Script::Ok,
        vec![send(b"GET http://user@a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n"), Step::Resp(resp(&[400]))],
        AppWant::Nothing,
    );
    te_gzip_then_chunked => case(
        Inbound,
        Script::Ok,
        vec![
            post("/gz", "Transfer-Encoding: gzip, chunked\r\n", "5\r\nhello\r\n0\r\n\r\n"),
            Step::Resp(resp(&[200]).body(b"ok")),
        ],
        AppWant::Reqs(vec![req("POST", b"/gz")
            .header("transfer-encoding", &["gzip, chunked"])
            .header("content-length", &[])
            .body(b"hello")
            .wire_body_lean(b"5\r\nhello\r\n0\r\n\r\n")]),
    );
    te_gzip_without_chunked => case(
        Inbound,
        Script::Ok,
        vec![post("/gz", "Transfer-Encoding: gzip\r\n", "hello"), Step::Resp(resp(&[400]))],
        AppWant::Nothing,
    );
    chunk_extension_control_byte => case(
        Inbound,
        Script::Ok,
        vec![
            post("/chunks", "Transfer-Encoding: chunked\r\n", "3;a\x01b\r\nabc\r\n0\r\n\r\n"),
            Step::Resp(resp_by(&[400], &[200])),
        ],
        AppWant::Lacks(b"a\x01b".to_vec()),
    )
    .differ("hyper reads past chunk extensions and drops them (the app never sees them), so it \
             accepts what the lean path, which forwards extensions, must refuse");
    chunk_extension_quoted_passes => case(
        Inbound,
        Script::Ok,
        vec![
            post("/q", "Transfer-Encoding: chunked\r\n", "3;n=\"q\\\"v\"\r\nabc\r\n0\r\n\r\n"),
            Step::Resp(resp(&[200]).body(b"ok")),
        ],
        AppWant::Reqs(vec![req("POST", b"/q")
            .body(b"abc")
            .wire_body_lean(b"3;n=\"q\\\"v\"\r\nabc\r\n0\r\n\r\n")]),
    );
    trailer_without_colon => refused_chunks("3\r\nabc\r\n0\r\nbadtrailer\r\n\r\n", "badtrailer")
        .differ("hyper streams the request to the app before the trailer shows the body is bad: \
                 the app sees an incomplete request whose connection is then closed");
    chunk_size_not_hex => case(
        Inbound,
        Script::Ok,
        vec![
            post("/zz", "Transfer-Encoding: chunked\r\n", "zz\r\nabc\r\n0\r\n\r\n"),
            Step::Resp(resp(&[400])),
            Step::MetricAtLeast(r#"tracecar_malformed_requests_total{direction="inbound"}"#, 1.0),
        ],
        AppWant::Lacks(b"zz\r\n".to_vec()),
    );

    // 7. Smuggling.
    smuggle_cl_te => smuggle_cl_te_case();
    smuggle_te_cl => smuggle_te_cl_case();
    smuggle_te_xchunked => case(
        Inbound, Script::Ok,
        vec![te_smuggle("Transfer-Encoding: xchunked"), Step::Resp(resp(&[200, 400, 501])), Step::Quiet(300)],
        AppWant::Any,
    );
    smuggle_te_space_before_colon => case(
        Inbound, Script::Ok,
        vec![te_smuggle("Transfer-Encoding : chunked"), Step::Resp(resp(&[400])), Step::Quiet(300)],
        AppWant::Nothing,
    );
    smuggle_te_leading_space_line => case(
        Inbound, Script::Ok,
        vec![
            send(format!("POST /te HTTP/1.1\r\n Transfer-Encoding: chunked\r\nHost: app\r\nContent-Length: {}\r\n\r\n0\r\n\r\n{SMUGGLED}",
                         5 + SMUGGLED.len()).as_bytes()),
            Step::Resp(resp(&[200, 400])),
            Step::Quiet(300),
        ],
        AppWant::Any,
    );
    smuggle_te_tab => case(
        Inbound, Script::Ok,
        vec![post("/tab", "Transfer-Encoding:\tchunked\r\n", "5\r\nhello\r\n0\r\n\r\n"), Step::Resp(resp(&[200]).body(b"ok"))],
        AppWant::Reqs(vec![req("POST", b"/tab").body(b"hello")]),
    );
    smuggle_te_twice => case(
        Inbound, Script::Ok,
        vec![te_smuggle("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked"), Step::Resp(resp(&[200, 400])), Step::Closed(vec![], 2000)],
        AppWant::Any,
    );
    smuggle_te_identity => case(
        Inbound, Script::Ok,
        vec![te_smuggle("transfer-encoding: identity"), Step::Resp(resp(&[400, 501])), Step::Quiet(300)],
        AppWant::Nothing,
    );
    smuggle_te_in_obs_fold => case(
        Inbound, Script::Ok,
        vec![te_smuggle("X-A: b\r\n Transfer-Encoding: chunked"), Step::Resp(resp(&[400])), Step::Quiet(300)],
        AppWant::Nothing,
    );
    obs_fold => refused_head(b"X-A: b\r\n c");
    content_length_twice_equal => case(
        Inbound, Script::Ok,
        vec![post("/cl", "Content-Length: 5\r\nContent-Length: 5\r\n", "hello"), Step::Resp(resp(&[200]).body(b"ok"))],
        AppWant::Reqs(vec![req("POST", b"/cl").header("content-length", &["5"]).body(b"hello")]),
    );
    content_length_twice_differing => case(
        Inbound, Script::Ok,
        vec![post("/cl", "Content-Length: 5\r\nContent-Length: 6\r\n", "hello!"), Step::Resp(resp(&[400]))],
        AppWant::Nothing,
    );
    content_length_plus => refused_length("+5");
    content_length_negative => refused_length("-1");
    content_length_list => refused_length("5, 6");
    content_length_hex => refused_length("0x5");
    content_length_huge => refused_length("99999999999999999999");
    chunk_size_overflow => refused_chunks("fffffffffffffffff\r\nabc\r\n0\r\n\r\n", "fffffffffffffffff");
    bare_lf_head => case(
        Inbound, Script::Ok,
        vec![send(b"GET /lf HTTP/1.1\nHost: app\nX-A: 1\n\n"), Step::Resp(resp(&[200, 400]))],
        AppWant::Any,
    );
    bare_cr_head => case(
        Inbound, Script::Ok,
        vec![send(b"GET /cr HTTP/1.1\rHost: app\r\n\r\n"), Step::Resp(resp(&[400]))],
        AppWant::Nothing,
    );
    bare_cr_in_value => refused_head(b"X-A: a\rb");
    nul_in_value => refused_head(b"X-A: a\x00b");
    control_byte_in_value => refused_head(b"X-A: a\x01b");
    escape_in_value => refused_head(b"X-A: a\x1b[0m");
    lowercase_method => case(
        Inbound, Script::Ok,
        vec![send(b"get /lc HTTP/1.1\r\nHost: app\r\n\r\n"), Step::Resp(resp(&[200, 400]))],
        AppWant::Any,
    );
    request_line_without_version => case(
        Inbound, Script::Ok,
        vec![send(b"GET /nv\r\nHost: app\r\n\r\n"), Step::Resp(resp(&[400, 505]))],
        AppWant::Nothing,
    );
    request_line_http_1_2 => case(
        Inbound, Script::Ok,
        vec![send(b"GET /v12 HTTP/1.2\r\nHost: app\r\n\r\n"), Step::Resp(resp(&[200, 400, 505]))],
        AppWant::Any,
    );
    request_line_http_2_0 => case(
        Inbound, Script::Ok,
        vec![send(b"GET /v20 HTTP/2.0\r\nHost: app\r\n\r\n"), Step::Resp(resp(&[400, 505]))],
        AppWant::Nothing,
    );
    request_line_extra_spaces => case(
        Inbound, Script::Ok,
        vec![send(b"GET  /sp  HTTP/1.1\r\nHost: app\r\n\r\n"), Step::Resp(resp(&[200, 400]))],
        AppWant::Any,
    );
    request_line_too_long => case(
        Inbound, Script::Ok,
        vec![
            send(format!("GET /{} HTTP/1.1\r\nHost: app\r\n\r\n", "a".repeat(70 * 1024)).as_bytes()),
            Step::Resp(resp(&[400, 414, 431])),
        ],
        AppWant::Nothing,
    );
    header_too_long => case(
        Inbound, Script::Ok,
        vec![
            send(format!("GET /h HTTP/1.1\r\nHost: app\r\nX-Big: {}\r\n\r\n", "a".repeat(70 * 1024)).as_bytes()),
            Step::Resp(resp(&[400, 431])),
        ],
        AppWant::Nothing,
    );
    too_many_headers => case(
        Inbound, Script::Ok,
        vec![
            send(format!("GET /h HTTP/1.1\r\nHost: app\r\n{}\r\n",
                         (0..200).map(|i| format!("X-H{i}: {i}\r\n")).collect::<String>()).as_bytes()),
            Step::Resp(resp(&[400, 431])),
        ],
        AppWant::Nothing,
    );
    pipelined_good_then_bad => case(
        Inbound, Script::Ok,
        vec![
            send(b"GET /ok-1 HTTP/1.1\r\nHost: app\r\n\r\nPOST /bad HTTP/1.1\r\nHost: app\r\nContent-Length: +5\r\n\r\nhello"),
            Step::Resp(resp(&[200]).body(b"ok")),
            Step::Resp(resp(&[400])),
        ],
        AppWant::Reqs(vec![req("GET", b"/ok-1")]),
    );
    expect_100_continue => case(
        Inbound, Script::Ok,
        vec![
            send(b"POST /e HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"),
            Step::Resp(resp(&[100])),
            send(b"hello"),
            Step::Resp(resp(&[200]).body(b"ok")),
        ],
        AppWant::Reqs(vec![req("POST", b"/e").body(b"hello")]),
    );
    upgrade_h2c_not_taken => case(
        Inbound, Script::Ok,
        vec![
            send(b"GET /h2c HTTP/1.1\r\nHost: app\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"),
            Step::Resp(resp(&[200]).body(b"ok")),
        ],
        AppWant::Reqs(vec![req("GET", b"/h2c")]),
    );
    slow_head_times_out => case(
        Inbound, Script::Ok,
        vec![Step::SlowHead {
            bytes: b"GET /slow HTTP/1.1\r\nHost: app\r\nX-Pad: aaaaaaaaaaaaaaaa\r\n\r\n".to_vec(),
            every: 300,
            within: 3000,
        }],
        AppWant::Nothing,
    ).env("TRACECAR_REQUEST_HEAD_TIMEOUT", "1s");
    idle_client_is_closed => case(
        Inbound, Script::Ok,
        vec![
            send(b"GET /ok-idle HTTP/1.1\r\nHost: app\r\n\r\n"),
            Step::Resp(resp(&[200]).body(b"ok")),
            Step::Closed(vec![], 3000),
        ],
        AppWant::Any,
    ).env("TRACECAR_IDLE_TIMEOUT", "1s");
    app_never_answers => case(
        Inbound, Script::Silent,
        vec![
            send(b"GET /silent HTTP/1.1\r\nHost: app\r\n\r\n"),
            Step::Resp(resp(&[504]).within(3000)),
            Step::SpanError("/silent"),
        ],
        AppWant::Any,
    ).env("TRACECAR_RESPONSE_HEAD_TIMEOUT", "1s");
    slow_upload_is_not_a_slow_app => case(
        Inbound, Script::Ok,
        vec![
            send(b"POST /slow-up HTTP/1.1\r\nHost: app\r\nContent-Length: 9\r\n\r\nabc"),
            Step::Sleep(700),
            send(b"def"),
            Step::Sleep(700),
            send(b"ghi"),
            Step::Resp(resp(&[200]).body(b"ok")),
        ],
        AppWant::Reqs(vec![req("POST", b"/slow-up").body(b"abcdefghi")]),
    ).env("TRACECAR_RESPONSE_HEAD_TIMEOUT", "1s");
    app_body_stalls => case(
        Inbound,
        Script::Reply(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc".to_vec()),
        vec![send(b"GET /stall HTTP/1.1\r\nHost: app\r\n\r\n"), Step::Truncated],
        AppWant::Any,
    ).env("TRACECAR_STREAM_IDLE_TIMEOUT", "1s");
    client_body_stalls => case(
        Inbound, Script::Ok,
        vec![
            send(b"POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 10\r\n\r\nabc"),
            Step::Resp(resp(&[408]).within(3000)),
        ],
        AppWant::Any,
    ).env("TRACECAR_STREAM_IDLE_TIMEOUT", "1s");
    connection_cap => case(
        Inbound, Script::Ok,
        vec![Step::ConnectionCap(5)],
        AppWant::Nothing,
    ).env("TRACECAR_MAX_CONNECTIONS", "5");
    reset_mid_body => case(
        Inbound, Script::Ok,
        vec![
            post("/rst", "Content-Length: 10\r\n", "hello"),
            Step::Sleep(300),
            Step::Reset,
            Step::AppClosed,
        ],
        AppWant::Any,
    );

    // The same hostile requests as an app's own outgoing (forward-proxy) requests.
    outbound_smuggle_cl_te => outbound(smuggle_cl_te_case());
    outbound_smuggle_te_cl => outbound(smuggle_te_cl_case());
    outbound_smuggle_te_xchunked => outbound(case(
        Inbound, Script::Ok,
        vec![te_smuggle("Transfer-Encoding: xchunked"), Step::Resp(resp(&[200, 400, 501])), Step::Quiet(300)],
        AppWant::Any,
    ));
    outbound_host_twice => outbound(refused_head(b"Host: other"));
    outbound_obs_fold => outbound(refused_head(b"X-A: b\r\n c"));
    outbound_nul_in_value => outbound(refused_head(b"X-A: a\x00b"));
    outbound_content_length_plus => outbound(refused_length("+5"));
    outbound_chunk_size_overflow => outbound(refused_chunks("fffffffffffffffff\r\nabc\r\n0\r\n\r\n", "fffffffffffffffff"));
    outbound_request_line_too_long => outbound(case(
        Inbound, Script::Ok,
        vec![
            send(format!("GET /{} HTTP/1.1\r\nHost: app\r\n\r\n", "a".repeat(70 * 1024)).as_bytes()),
            Step::Resp(resp(&[400, 414, 431])),
        ],
        AppWant::Nothing,
    ));
    outbound_pipelined_good_then_bad => outbound(case(
        Inbound, Script::Ok,
        vec![
            send(b"GET /ok-1 HTTP/1.1\r\nHost: app\r\n\r\n"),
            Step::Resp(resp(&[200]).body(b"ok")),
            send(b"POST /bad HTTP/1.1\r\nHost: app\r\nContent-Length: +5\r\n\r\nhello"),
            Step::Resp(resp(&[400])),
        ],
        AppWant::Reqs(vec![req("GET", b"/ok-1")]),
    ));
    outbound_head_app_closes => outbound(case(
        Inbound,
        Script::CloseAfterHead,
        vec![
            send(b"HEAD /h HTTP/1.1\r\nHost: app\r\n\r\n"),
            Step::Resp(resp(&[502]).head_only().has_header("content-length")),
            send(b"GET /ok-2 HTTP/1.1\r\nHost: app\r\n\r\n"),
            Step::Resp(resp(&[200]).body(b"ok")),
            Step::Quiet(200),
        ],
        AppWant::Any,
    ));
    outbound_response_body_on_head => outbound(no_stray_body(
        "HEAD /hb HTTP/1.1\r\nHost: app\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 200, true));

    // 8. Malformed responses from the app.
    response_conflicting_lengths => case(
        Inbound,
        Script::Reply(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok".to_vec()),
        vec![send(b"GET /cc HTTP/1.1\r\nHost: app\r\n\r\n"), Step::Resp(resp(&[502]))],
        AppWant::Any,
    );
    response_1xx_sequence => case(
        Inbound,
        Script::Reply(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n\
HTTP/1.1 103 Early Hints\r\nlink: </b.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec()),
        vec![
            send(b"GET /1xx HTTP/1.1\r\nHost: app\r\n\r\n"),
            Step::LeanOnly(Box::new(Step::Resp(resp(&[100])))),
            Step::LeanOnly(Box::new(Step::Resp(resp(&[103]).header("link", "</a.css>")))),
            Step::LeanOnly(Box::new(Step::Resp(resp(&[103]).header("link", "</b.css>")))),
            Step::Resp(resp(&[200]).body(b"ok")),
        ],
        AppWant::Any,
    )
    .differ(HYPER_1XX);
    response_body_on_head => no_stray_body(
        "HEAD /hb HTTP/1.1\r\nHost: app\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 200, true);
    response_body_on_204 => no_stray_body(
        "GET /nc HTTP/1.1\r\nHost: app\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\nhello", 204, false);
    response_body_on_304 => no_stray_body(
        "GET /nm HTTP/1.1\r\nHost: app\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\nhello", 304, false);
    response_truncated_chunked => case(
        Inbound,
        Script::ReplyClose(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel".to_vec()),
        vec![
            send(b"GET /trunc HTTP/1.1\r\nHost: app\r\n\r\n"),
            Step::Truncated,
            Step::SpanError("/trunc"),
        ],
        AppWant::Any,
    );
}

// The checker itself: what it must catch, so that a passing case means something.

#[test]
fn the_checker_sees_a_smuggled_request_and_mixed_framing() {
    let (reqs, problems) = parse_requests(
        b"POST /a HTTP/1.1\r\nHost: app\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n\
          0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: app\r\n\r\n",
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("next to transfer-encoding")),
        "{problems:?}"
    );
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[1].target, b"/smuggled");
}

#[test]
fn the_checker_refuses_what_an_app_could_read_differently() {
    for bad in [
        &b"GET /lf HTTP/1.1\nHost: app\r\n\r\n"[..],
        b"GET /cr HTTP/1.1\r\nHost: a\rpp\r\n\r\n",
        b"GET /fold HTTP/1.1\r\nHost: app\r\nX-A: b\r\n c\r\n\r\n",
        b"GET /nul HTTP/1.1\r\nHost: app\r\nX-A: a\x00b\r\n\r\n",
        b"GET /sp HTTP/1.1\r\nHost: app\r\nX-A : b\r\n\r\n",
        b"GET  /two-spaces HTTP/1.1\r\nHost: app\r\n\r\n",
        b"POST /cl HTTP/1.1\r\nHost: app\r\nContent-Length: +5\r\n\r\nhello",
        b"POST /te HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST /te HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n\
          3;a\x01b\r\nabc\r\n0\r\n\r\n",
        b"POST /te HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: gzip\r\n\r\nabc",
        b"GET /partial HTTP/1.1\r\nHost: app\r\n",
    ] {
        let (_, problems) = parse_requests(bad);
        assert!(!problems.is_empty(), "accepted {:?}", lossy(bad));
    }
}

#[test]
fn the_checker_reads_good_requests() {
    let (reqs, problems) = parse_requests(
        b"POST /q HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
          3;n=\"q\\\"v\"\r\nabc\r\n0\r\nX-T: 1\r\n\r\n\
          GET /r\xc3\xa9 HTTP/1.1\r\nHost: app\r\nX-Tab:\ta\r\n\r\n",
    );
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].body, b"abc");
    assert_eq!(reqs[1].target, b"/r\xc3\xa9");
    assert_eq!(reqs[1].values("x-tab"), ["a"]);
}
