//! Protocol detection on a captured connection by a short, bounded peek.
//!
//! The accept loops call [`detect`] on every connection iptables sent us, before deciding how to
//! proxy it: HTTP/1 and HTTP/2 get spans, TLS and everything else are copied byte for byte.
//! Detection only *peeks* (`MSG_PEEK`), so whatever the peer sent is still there for the handler,
//! and it never waits longer than the timeout: a server-speaks-first protocol (MySQL, SMTP, ...)
//! sends nothing first and ends up [`Protocol::Opaque`] after the timeout.
//!
//! The decision itself is [`classify`], a pure function over the bytes seen so far.

use std::time::Duration;

use tokio::time::Instant;

/// What a captured connection speaks, decided from its first bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.x request line.
    Http1,
    /// HTTP/2 with prior knowledge (the connection preface).
    Http2,
    /// A TLS ClientHello; `sni` is the server name it asks for, if any.
    Tls { sni: Option<String> },
    /// Anything else, or nothing within the timeout (server-speaks-first protocols).
    Opaque,
}

/// The most bytes detection looks at. A ClientHello with post-quantum key shares is about 2 KB;
/// an HTTP/1 request line longer than this is decided on its method alone.
pub const MAX_PEEK: usize = 4096;

/// The HTTP/2 connection preface (RFC 9113, section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Methods that decide HTTP/1 as soon as `METHOD ` is seen and the request line cannot be
/// checked yet (the registered methods that clients actually send).
const KNOWN_METHODS: &[&[u8]] = &[
    b"GET",
    b"HEAD",
    b"POST",
    b"PUT",
    b"DELETE",
    b"CONNECT",
    b"OPTIONS",
    b"TRACE",
    b"PATCH",
    b"PROPFIND",
    b"PROPPATCH",
    b"MKCOL",
    b"COPY",
    b"MOVE",
    b"LOCK",
    b"UNLOCK",
    b"REPORT",
    b"SEARCH",
    b"PURGE",
];

/// The longest method token accepted (`UPDATEREDIRECTREF` has 17 characters).
const MAX_METHOD_LEN: usize = 20;

/// Peeks at the first bytes of `stream` (without consuming them) for at most `timeout`.
///
/// Peeks again as more bytes arrive until the bytes decide the protocol, [`MAX_PEEK`] bytes
/// have been seen, the peer closed its side, or the timeout expires; then it decides on what it
/// has. Errors while peeking give [`Protocol::Opaque`] (the handler will see the error itself).
pub async fn detect(stream: &tokio::net::TcpStream, timeout: Duration) -> Protocol {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; MAX_PEEK];
    let mut seen = 0usize;
    let mut backoff = Duration::from_millis(1);
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) => return Protocol::Opaque,
            // Nothing (more) arrived in time: decide on what we have.
            Err(_) => return classify(&buf[..seen]).finish(),
        };
        if n == 0 {
            // The peer closed its side before sending anything.
            return classify(&buf[..seen]).finish();
        }
        let verdict = classify(&buf[..n]);
        if let Verdict::Done(protocol) = verdict {
            return protocol;
        }
        if n == buf.len() {
            return verdict.finish();
        }
        if n == seen {
            // `peek` returns at once while unread bytes are queued, whether or not new ones
            // arrived; back off briefly instead of spinning until the rest of the data comes.
            let now = Instant::now();
            if now >= deadline {
                return verdict.finish();
            }
            tokio::time::sleep_until((now + backoff).min(deadline)).await;
            backoff = (backoff * 2).min(Duration::from_millis(20));
        } else {
            backoff = Duration::from_millis(1);
        }
        seen = n;
    }
}

/// The decision on the bytes seen so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The bytes decide the protocol.
    Done(Protocol),
    /// More bytes could change the decision; `fallback` is the answer if no more come.
    NeedMore { fallback: Protocol },
}

impl Verdict {
    /// The protocol now: the decision, or the fallback when no more bytes will be looked at.
    pub fn finish(self) -> Protocol {
        match self {
            Verdict::Done(p) | Verdict::NeedMore { fallback: p } => p,
        }
    }
}

/// Decides the protocol from the first bytes of a connection (a pure function).
pub fn classify(buf: &[u8]) -> Verdict {
    let need_more = |fallback| Verdict::NeedMore { fallback };
    let Some(&first) = buf.first() else {
        return need_more(Protocol::Opaque);
    };
    if first == 0x16 {
        return classify_tls(buf);
    }
    // The HTTP/2 preface (checked before HTTP/1: `PRI` is a token too).
    let common = buf.len().min(H2_PREFACE.len());
    if buf[..common] == H2_PREFACE[..common] {
        return if buf.len() >= H2_PREFACE.len() {
            Verdict::Done(Protocol::Http2)
        } else {
            need_more(Protocol::Opaque)
        };
    }
    classify_http1(buf)
}

/// HTTP/1: `token SP request-target SP HTTP/1.x CRLF`. A complete request line is checked in
/// full (so `SET key value` or an inline Redis `GET key` stay opaque); an incomplete one is
/// accepted on a well-known method followed by a space if no more bytes come.
fn classify_http1(buf: &[u8]) -> Verdict {
    let opaque = Verdict::Done(Protocol::Opaque);
    let token_len = buf.iter().take_while(|&&b| is_tchar(b)).count();
    if token_len == 0 || token_len > MAX_METHOD_LEN {
        return opaque;
    }
    let Some(&after) = buf.get(token_len) else {
        // Only token characters so far: could still become a request line.
        return Verdict::NeedMore {
            fallback: Protocol::Opaque,
        };
    };
    if after != b' ' {
        return opaque;
    }
    let method = &buf[..token_len];
    if method == b"PRI" {
        // `PRI` is reserved for the HTTP/2 preface, which did not match.
        return opaque;
    }
    let known = KNOWN_METHODS.contains(&method);
    let end = buf.iter().position(|&b| b == b'\n');
    let line = &buf[..end.unwrap_or(buf.len())];
    // Control characters end it as soon as they are seen, complete line or not (so the decision
    // does not depend on whether the line's end had arrived yet).
    if line
        .get(token_len + 1..)
        .unwrap_or_default()
        .iter()
        .any(|&b| b.is_ascii_control() && b != b'\r' && b != b'\t')
    {
        return opaque;
    }
    match end {
        Some(_) => {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let is_http1 = line.len() > token_len + 1 + b" HTTP/1.x".len()
                && (line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0"));
            Verdict::Done(if is_http1 {
                Protocol::Http1
            } else {
                Protocol::Opaque
            })
        }
        None => Verdict::NeedMore {
            fallback: if known {
                Protocol::Http1
            } else {
                Protocol::Opaque
            },
        },
    }
}

/// `tchar` of RFC 9110, section 5.6.2.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// TLS: a handshake record (`0x16 0x03 ..`) that starts a ClientHello.
fn classify_tls(buf: &[u8]) -> Verdict {
    let opaque = Verdict::Done(Protocol::Opaque);
    // Record header: type 0x16, legacy version 0x03 0x00..=0x04, length.
    match buf.get(1) {
        None => {
            return Verdict::NeedMore {
                fallback: Protocol::Opaque,
            }
        }
        Some(3) => {}
        Some(_) => return opaque,
    }
    match buf.get(2) {
        None => {
            return Verdict::NeedMore {
                fallback: Protocol::Opaque,
            }
        }
        Some(0..=4) => {}
        Some(_) => return opaque,
    }
    let sni = client_hello_sni(buf);
    if buf.len() < 6 && sni == Sni::Incomplete {
        // Not even the handshake type yet: too little to call it TLS.
        return Verdict::NeedMore {
            fallback: Protocol::Opaque,
        };
    }
    match sni {
        Sni::NotClientHello => opaque,
        Sni::Found(name) => Verdict::Done(Protocol::Tls { sni: Some(name) }),
        Sni::Absent => Verdict::Done(Protocol::Tls { sni: None }),
        Sni::Incomplete => Verdict::NeedMore {
            fallback: Protocol::Tls { sni: None },
        },
    }
}

/// What the SNI parser found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sni {
    /// The ClientHello names this server (a valid DNS name, as sent).
    Found(String),
    /// A complete (or unparseable) ClientHello without a usable `server_name`.
    Absent,
    /// The bytes so far are a ClientHello prefix that ends before the extension.
    Incomplete,
    /// Not a TLS handshake record carrying a ClientHello.
    NotClientHello,
}

/// Finds the `server_name` of a ClientHello in `buf`, which starts at a TLS record header.
///
/// Reassembles the handshake message from consecutive handshake records (a ClientHello may be
/// fragmented) and reads it with bounds checks only: garbage gives `Absent` or
/// `NotClientHello`, never a panic.
pub fn client_hello_sni(buf: &[u8]) -> Sni {
    // Reassemble the handshake bytes from the records we have.
    let mut handshake: Vec<u8> = Vec::new();
    let mut rest = buf;
    // Whether more of the message may still come: false once something other than a handshake
    // record follows. Records that end exactly where the bytes end say nothing about whether
    // the message goes on in the next record.
    let mut more_may_come = true;
    while !rest.is_empty() {
        if rest[0] != 0x16 {
            more_may_come = false;
            break;
        }
        if rest.len() < 5 {
            break;
        }
        if rest[1] != 3 && handshake.is_empty() {
            return Sni::NotClientHello;
        }
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if rest[1] != 3 || len == 0 {
            // Not a record a client sends: the message ends with what came before it.
            more_may_come = false;
            break;
        }
        let body = &rest[5..];
        if body.len() < len {
            handshake.extend_from_slice(body);
            break;
        }
        handshake.extend_from_slice(&body[..len]);
        rest = &body[len..];
    }
    if buf.len() < 5 {
        return Sni::Incomplete;
    }
    match parse_client_hello(&handshake) {
        Parse::Done(sni) => sni,
        Parse::Truncated if more_may_come => Sni::Incomplete,
        Parse::Truncated => Sni::Absent,
    }
}

/// A parse that ran out of bytes, or finished.
enum Parse {
    Done(Sni),
    Truncated,
}

/// A bounds-checked reader; every read returns `None` past the end.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.buf.split_first()?;
        self.buf = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<usize> {
        let b = self.take(2)?;
        Some(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn u24(&mut self) -> Option<usize> {
        let b = self.take(3)?;
        Some(usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Some(head)
    }
}

/// Parses a ClientHello handshake message (possibly truncated) up to the SNI extension.
fn parse_client_hello(hs: &[u8]) -> Parse {
    let mut r = Reader { buf: hs };
    // `?` on a short read means "truncated"; malformed lengths are caught by the bounds below.
    macro_rules! need {
        ($e:expr) => {
            match $e {
                Some(v) => v,
                None => return Parse::Truncated,
            }
        };
    }
    let msg_type = need!(r.u8());
    if msg_type != 0x01 {
        return Parse::Done(Sni::NotClientHello);
    }
    let msg_len = need!(r.u24());
    // Only look inside the message's own length.
    let truncated = r.buf.len() < msg_len;
    let body = &r.buf[..msg_len.min(r.buf.len())];
    let mut r = Reader { buf: body };
    let short = |complete_msg: bool| {
        if complete_msg {
            Parse::Done(Sni::Absent)
        } else {
            Parse::Truncated
        }
    };
    macro_rules! field {
        ($e:expr) => {
            match $e {
                Some(v) => v,
                None => return short(!truncated),
            }
        };
    }
    field!(r.take(2)); // legacy_version
    field!(r.take(32)); // random
    let sid_len = field!(r.u8());
    field!(r.take(usize::from(sid_len)));
    let suites_len = field!(r.u16());
    field!(r.take(suites_len));
    let comp_len = field!(r.u8());
    field!(r.take(usize::from(comp_len)));
    if r.buf.is_empty() && !truncated {
        return Parse::Done(Sni::Absent); // no extensions at all
    }
    let ext_len = field!(r.u16());
    let ext_complete = r.buf.len() >= ext_len;
    let mut exts = Reader {
        buf: &r.buf[..ext_len.min(r.buf.len())],
    };
    loop {
        let Some(ty) = exts.u16() else {
            return short(ext_complete);
        };
        let Some(len) = exts.u16() else {
            return short(ext_complete);
        };
        let Some(data) = exts.take(len) else {
            return short(ext_complete);
        };
        if ty == 0 {
            return Parse::Done(server_name(data));
        }
    }
}

/// The `host_name` entry of a `server_name` extension body (RFC 6066, section 3).
fn server_name(data: &[u8]) -> Sni {
    let mut r = Reader { buf: data };
    let Some(list_len) = r.u16() else {
        return Sni::Absent;
    };
    let Some(list) = r.take(list_len) else {
        return Sni::Absent;
    };
    let mut r = Reader { buf: list };
    while let (Some(name_type), Some(len)) = (r.u8(), r.u16()) {
        let Some(name) = r.take(len) else {
            return Sni::Absent;
        };
        if name_type == 0 {
            return match std::str::from_utf8(name) {
                Ok(s) if is_dns_name(s) => Sni::Found(s.to_owned()),
                _ => Sni::Absent,
            };
        }
    }
    Sni::Absent
}

/// A plausible DNS name: at most 253 bytes of dot-separated labels, each 1..=63 letters,
/// digits, `-` and `_` (no empty label, so no leading, trailing or doubled dot).
fn is_dns_name(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A ClientHello that `openssl s_client -servername api.example.com` (OpenSSL 3.0) sent.
    const OPENSSL_HELLO: &[&str] = &[
        "160301013c01000138030335c56384f56abe5b4d4a16906d5e235b89d2491ceff2fdefb2ef500f48875f0e209211b985",
        "258fa4189346d2970b146b5e2c464df07d3c3287088158b452a53d89003e130213031301c02cc030009fcca9cca8ccaa",
        "c02bc02f009ec024c028006bc023c0270067c00ac0140039c009c0130033009d009c003d003c0035002f00ff010000b1",
        "00000014001200000f6170692e6578616d706c652e636f6d000b000403000102000a00160014001d0017001e00190018",
        "01000101010201030104002300000016000000170000000d002a0028040305030603080708080809080a080b08040805",
        "0806040105010601030303010302040205020602002b0009080304030303020301002d00020101003300260024001d00",
        "2073b22ef4188dc6cf735f4b07762713b71aa378d1d1353fa5ef011f4537eb6f47",
    ];

    fn openssl_hello() -> Vec<u8> {
        let hex: String = OPENSSL_HELLO.concat();
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Builds a ClientHello record with the given extensions (type, body).
    fn hello_with(exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend([7u8; 32]); // random
        body.push(0); // session id
        body.extend([0, 2, 0x13, 0x01]); // one cipher suite
        body.extend([1, 0]); // null compression
        let mut ext_bytes = Vec::new();
        for (ty, data) in exts {
            ext_bytes.extend(ty.to_be_bytes());
            ext_bytes.extend((data.len() as u16).to_be_bytes());
            ext_bytes.extend(data);
        }
        body.extend((ext_bytes.len() as u16).to_be_bytes());
        body.extend(ext_bytes);
        let mut hs = vec![0x01];
        hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend(body);
        let mut rec = vec![0x16, 0x03, 0x01];
        rec.extend((hs.len() as u16).to_be_bytes());
        rec.extend(hs);
        rec
    }

    fn sni_ext(name: &str) -> (u16, Vec<u8>) {
        let mut entry = vec![0u8];
        entry.extend((name.len() as u16).to_be_bytes());
        entry.extend(name.as_bytes());
        let mut data = (entry.len() as u16).to_be_bytes().to_vec();
        data.extend(entry);
        (0, data)
    }

    fn tls(sni: Option<&str>) -> Protocol {
        Protocol::Tls {
            sni: sni.map(str::to_owned),
        }
    }

    #[test]
    fn real_openssl_client_hello() {
        let hello = openssl_hello();
        assert_eq!(
            client_hello_sni(&hello),
            Sni::Found("api.example.com".into())
        );
        assert_eq!(
            classify(&hello),
            Verdict::Done(tls(Some("api.example.com")))
        );
    }

    #[test]
    fn sni_after_other_extensions_and_without_sni() {
        let hello = hello_with(&[
            (10, vec![0, 2, 0, 29]),
            (43, vec![2, 3, 4]),
            sni_ext("b.svc"),
        ]);
        assert_eq!(classify(&hello), Verdict::Done(tls(Some("b.svc"))));
        let hello = hello_with(&[(10, vec![0, 2, 0, 29])]);
        assert_eq!(classify(&hello), Verdict::Done(tls(None)));
        let hello = hello_with(&[]);
        assert_eq!(classify(&hello), Verdict::Done(tls(None)));
        // A name that is not a DNS name is not reported.
        for bad in ["bad name\0", "", ".", "a..b", ".a", "a.", &"x".repeat(64)] {
            let hello = hello_with(&[sni_ext(bad)]);
            assert_eq!(classify(&hello), Verdict::Done(tls(None)), "{bad:?}");
        }
        let longest = vec!["x".repeat(63); 4].join(".")[..253].to_string();
        let hello = hello_with(&[sni_ext(&longest)]);
        assert_eq!(classify(&hello), Verdict::Done(tls(Some(&longest))));
    }

    #[test]
    fn fragmented_client_hello_is_reassembled() {
        let hello = openssl_hello();
        let hs = &hello[5..];
        let (a, b) = hs.split_at(40);
        let mut two = vec![0x16, 0x03, 0x01];
        two.extend((a.len() as u16).to_be_bytes());
        two.extend(a);
        two.extend([0x16, 0x03, 0x01]);
        two.extend((b.len() as u16).to_be_bytes());
        two.extend(b);
        assert_eq!(client_hello_sni(&two), Sni::Found("api.example.com".into()));
        // Found by fuzz_valid_client_hello_gives_its_sni: the first record alone, complete, was
        // taken for a whole hello without SNI, and detection stopped there.
        let first = 5 + a.len();
        assert_eq!(client_hello_sni(&two[..first]), Sni::Incomplete);
        assert_eq!(
            classify(&two[..first]),
            Verdict::NeedMore {
                fallback: tls(None)
            }
        );
        // Something other than a handshake record after it: the rest will not come.
        let mut cut_short = two[..first].to_vec();
        cut_short.extend([0x17, 0x03, 0x03, 0x00, 0x01, 0x00]);
        assert_eq!(client_hello_sni(&cut_short), Sni::Absent);
        // Found by the same property: a malformed record after a whole hello lost its SNI.
        for after in [
            [0x16, 0x04, 0x00, 0x00, 0x00],
            [0x16, 0x03, 0x03, 0x00, 0x00],
        ] {
            let mut hello = openssl_hello();
            hello.extend(after);
            assert_eq!(
                client_hello_sni(&hello),
                Sni::Found("api.example.com".into())
            );
        }
    }

    #[test]
    fn every_truncation_of_a_client_hello_is_incomplete_or_found() {
        let hello = openssl_hello();
        // The SNI extension ends at this offset in the record.
        let sni_end = 5 + 4 + 2 + 32 + 33 + 2 + 0x3e + 2 + 2 + 4 + 2 + 3 + 15;
        for len in 0..hello.len() {
            let got = classify(&hello[..len]);
            if len < sni_end {
                assert!(
                    matches!(got, Verdict::NeedMore { .. }),
                    "prefix of {len} bytes: {got:?}"
                );
            } else {
                assert_eq!(got, Verdict::Done(tls(Some("api.example.com"))), "{len}");
            }
        }
    }

    /// xorshift64*: deterministic pseudo-random bytes for the fuzz-ish tests.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = Rng(0x5eed_1234_abcd_ef01);
        let hello = openssl_hello();
        for i in 0..20_000 {
            let len = (rng.next() % 600) as usize;
            let mut buf = rng.bytes(len);
            match i % 4 {
                // Random bytes behind a plausible record header.
                0 if len >= 3 => buf[..3].copy_from_slice(&[0x16, 0x03, 0x01]),
                // The real hello with random bytes flipped and a random truncation.
                1 => {
                    buf = hello.clone();
                    for _ in 0..1 + rng.next() % 4 {
                        let at = (rng.next() as usize) % buf.len();
                        buf[at] ^= rng.next() as u8 | 1;
                    }
                    buf.truncate((rng.next() as usize) % (buf.len() + 1));
                }
                // Random tail after a request-line-ish head.
                2 if len >= 4 => buf[..4].copy_from_slice(b"GET "),
                _ => {}
            }
            let _ = classify(&buf).finish();
            let _ = client_hello_sni(&buf);
        }
    }

    #[test]
    fn http1_request_lines() {
        for req in [
            &b"GET / HTTP/1.1\r\nHost: b\r\n\r\n"[..],
            b"POST /x?y=1 HTTP/1.0\r\n",
            b"CONNECT b.svc:443 HTTP/1.1\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\n",
            b"M-SEARCH * HTTP/1.1\r\n",
            b"GET / HTTP/1.1\n",
        ] {
            assert_eq!(classify(req), Verdict::Done(Protocol::Http1), "{req:?}");
        }
        // An incomplete line with a known method is HTTP/1 unless more bytes say otherwise.
        assert_eq!(
            classify(b"GET /very/long"),
            Verdict::NeedMore {
                fallback: Protocol::Http1
            }
        );
        assert_eq!(
            classify(b"GE"),
            Verdict::NeedMore {
                fallback: Protocol::Opaque
            }
        );
        assert_eq!(
            classify(b"FROB /x"),
            Verdict::NeedMore {
                fallback: Protocol::Opaque
            }
        );
    }

    #[test]
    fn not_http1() {
        for req in [
            &b"SET key value\r\n"[..], // redis inline command
            b"GET key\r\n",            // redis inline GET: no HTTP version
            b"PING\r\n",
            b"PRI * HTTP/1.1\r\n", // PRI is reserved for the HTTP/2 preface
            b" GET / HTTP/1.1\r\n",
            b"GET\t/ HTTP/1.1\r\n",
            b"GET / HTTP/2.0\r\n",
            b"\x00\x00\x00\x01",
            b"SSH-2.0-OpenSSH_9.2\r\n",
            // Found by fuzz_mutated_http1_and_http2: a control character was refused while the
            // line was incomplete but accepted once its end arrived.
            b"POST /a\x16\x03/b HTTP/1.1\r\n",
        ] {
            assert_eq!(classify(req), Verdict::Done(Protocol::Opaque), "{req:?}");
        }
        assert_eq!(
            classify(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ / HTTP/1.1\r\n"),
            Verdict::Done(Protocol::Opaque)
        );
    }

    #[test]
    fn http2_preface() {
        assert_eq!(classify(H2_PREFACE), Verdict::Done(Protocol::Http2));
        let mut more = H2_PREFACE.to_vec();
        more.extend([0, 0, 18, 4, 0]);
        assert_eq!(classify(&more), Verdict::Done(Protocol::Http2));
        assert_eq!(
            classify(b"PRI * HTTP/2.0\r\n"),
            Verdict::NeedMore {
                fallback: Protocol::Opaque
            }
        );
        assert_eq!(
            classify(b"PRI * HTTP/2.0\r\n\r\nXX"),
            Verdict::Done(Protocol::Opaque)
        );
    }

    #[test]
    fn tls_headers() {
        assert_eq!(
            classify(&[0x16]),
            Verdict::NeedMore {
                fallback: Protocol::Opaque
            }
        );
        assert_eq!(
            classify(&[0x16, 0x02, 0x00]),
            Verdict::Done(Protocol::Opaque)
        );
        assert_eq!(
            classify(&[0x16, 0x03, 0x09]),
            Verdict::Done(Protocol::Opaque)
        );
        // A handshake record that is not a ClientHello (a ServerHello).
        assert_eq!(
            classify(&[0x16, 0x03, 0x03, 0x00, 0x04, 0x02, 0, 0, 0]),
            Verdict::Done(Protocol::Opaque)
        );
        assert_eq!(
            classify(&[0x16, 0x03, 0x01, 0x00]),
            Verdict::NeedMore {
                fallback: Protocol::Opaque
            }
        );
        assert_eq!(
            classify(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]),
            Verdict::NeedMore {
                fallback: tls(None)
            }
        );
    }

    /// A connected pair over loopback: (client, server side).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    const T: Duration = Duration::from_millis(500);

    #[tokio::test]
    async fn detects_over_loopback_without_consuming() {
        let cases: Vec<(Vec<u8>, Protocol)> = vec![
            (
                b"GET / HTTP/1.1\r\nHost: b\r\n\r\n".to_vec(),
                Protocol::Http1,
            ),
            (H2_PREFACE.to_vec(), Protocol::Http2),
            (openssl_hello(), tls(Some("api.example.com"))),
            (b"\x00\x01binary".to_vec(), Protocol::Opaque),
        ];
        for (bytes, want) in cases {
            let (mut client, mut server) = pair().await;
            client.write_all(&bytes).await.unwrap();
            assert_eq!(detect(&server, T).await, want);
            // Everything is still there for the handler.
            let mut got = vec![0u8; bytes.len()];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(got, bytes);
        }
    }

    #[tokio::test]
    async fn waits_for_bytes_that_arrive_in_pieces() {
        let (mut client, server) = pair().await;
        let hello = openssl_hello();
        let writer = tokio::spawn(async move {
            for chunk in hello.chunks(50) {
                client.write_all(chunk).await.unwrap();
                client.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            client
        });
        assert_eq!(
            detect(&server, Duration::from_secs(2)).await,
            tls(Some("api.example.com"))
        );
        drop(writer.await.unwrap());

        let (mut client, server) = pair().await;
        let writer = tokio::spawn(async move {
            client.write_all(b"PO").await.unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
            client.write_all(b"ST /a HTTP/1.1\r\n").await.unwrap();
            client
        });
        assert_eq!(
            detect(&server, Duration::from_secs(2)).await,
            Protocol::Http1
        );
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn silence_is_opaque_after_the_timeout() {
        let (_client, server) = pair().await;
        let start = std::time::Instant::now();
        assert_eq!(
            detect(&server, Duration::from_millis(200)).await,
            Protocol::Opaque
        );
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(190), "{took:?}");
        assert!(took < Duration::from_millis(1000), "{took:?}");
    }

    #[tokio::test]
    async fn a_stalled_partial_request_is_decided_at_the_timeout() {
        let (mut client, server) = pair().await;
        client.write_all(b"GET /slow").await.unwrap();
        let start = std::time::Instant::now();
        assert_eq!(
            detect(&server, Duration::from_millis(200)).await,
            Protocol::Http1
        );
        assert!(start.elapsed() < Duration::from_millis(1000));

        let (mut client, server) = pair().await;
        client.write_all(b"\x16\x03").await.unwrap();
        assert_eq!(
            detect(&server, Duration::from_millis(100)).await,
            Protocol::Opaque
        );
    }

    #[tokio::test]
    async fn a_peer_that_closes_at_once_is_opaque() {
        let (client, server) = pair().await;
        drop(client);
        assert_eq!(detect(&server, T).await, Protocol::Opaque);
    }

    /// Property tests over arbitrary, generated and mutated first bytes.
    mod fuzz {
        use super::*;
        use crate::fuzzing::{self, mutate, mutations};
        use proptest::prelude::*;

        /// A ClientHello's parts, as a generator picks them.
        #[derive(Debug, Clone)]
        struct Hello {
            record_version: u8,
            session_id: Vec<u8>,
            suites: Vec<u16>,
            compression: Vec<u8>,
            /// `None`: no extensions block at all (TLS 1.2 allows it).
            extensions: Option<Vec<(u16, Vec<u8>)>>,
            /// Where the handshake message is cut into records (offsets into it).
            cuts: Vec<usize>,
        }

        impl Hello {
            /// The handshake message (type, length, body).
            fn message(&self) -> Vec<u8> {
                let mut body = vec![0x03, 0x03];
                body.extend([0x5a; 32]);
                body.push(self.session_id.len() as u8);
                body.extend(&self.session_id);
                body.extend(((self.suites.len() * 2) as u16).to_be_bytes());
                for s in &self.suites {
                    body.extend(s.to_be_bytes());
                }
                body.push(self.compression.len() as u8);
                body.extend(&self.compression);
                if let Some(exts) = &self.extensions {
                    let mut block = Vec::new();
                    for (ty, data) in exts {
                        block.extend(ty.to_be_bytes());
                        block.extend((data.len() as u16).to_be_bytes());
                        block.extend(data);
                    }
                    body.extend((block.len() as u16).to_be_bytes());
                    body.extend(block);
                }
                let mut msg = vec![0x01];
                msg.extend(&(body.len() as u32).to_be_bytes()[1..]);
                msg.extend(body);
                msg
            }

            /// The message in one or more handshake records.
            fn records(&self) -> Vec<u8> {
                self.records_and_ends().0
            }

            /// [`Hello::records`], and the offset where each record ends.
            fn records_and_ends(&self) -> (Vec<u8>, Vec<usize>) {
                let msg = self.message();
                let mut cuts: Vec<usize> = self.cuts.iter().map(|c| c % msg.len()).collect();
                cuts.retain(|&c| c > 0);
                cuts.push(0);
                cuts.push(msg.len());
                cuts.sort_unstable();
                cuts.dedup();
                let (mut out, mut ends) = (Vec::new(), Vec::new());
                for w in cuts.windows(2) {
                    let part = &msg[w[0]..w[1]];
                    out.extend([0x16, 0x03, self.record_version]);
                    out.extend((part.len() as u16).to_be_bytes());
                    out.extend(part);
                    ends.push(out.len());
                }
                (out, ends)
            }
        }

        /// A host name as `is_dns_name` accepts it.
        fn host_name() -> impl Strategy<Value = String> {
            "[a-zA-Z0-9_-]{1,40}(\\.[a-zA-Z0-9_-]{1,40}){0,4}"
        }

        /// A `server_name` extension naming `name`, maybe after an entry of another type.
        fn sni_extension(name: &str, other: Option<(u8, Vec<u8>)>) -> (u16, Vec<u8>) {
            let mut list = Vec::new();
            if let Some((ty, data)) = other {
                list.push(ty);
                list.extend((data.len() as u16).to_be_bytes());
                list.extend(data);
            }
            list.push(0);
            list.extend((name.len() as u16).to_be_bytes());
            list.extend(name.as_bytes());
            let mut data = (list.len() as u16).to_be_bytes().to_vec();
            data.extend(list);
            (0, data)
        }

        /// A ClientHello and the name in its SNI, if it has one.
        fn hello() -> impl Strategy<Value = (Hello, Option<String>)> {
            let other_exts =
                prop::collection::vec((1u16.., prop::collection::vec(any::<u8>(), 0..48)), 0..8);
            let sni = prop::option::of((
                host_name(),
                prop::option::of((1u8.., prop::collection::vec(any::<u8>(), 0..8))),
                any::<prop::sample::Index>(),
            ));
            (
                0u8..=4,
                prop::collection::vec(any::<u8>(), 0..=32),
                prop::collection::vec(any::<u16>(), 1..32),
                prop::collection::vec(any::<u8>(), 1..4),
                prop::option::weighted(0.9, (other_exts, sni)),
                prop::collection::vec(any::<usize>(), 0..4),
            )
                .prop_map(
                    |(record_version, session_id, suites, compression, exts, cuts)| {
                        let mut name = None;
                        let extensions = exts.map(|(mut exts, sni)| {
                            if let Some((host, other, at)) = sni {
                                let at = at.index(exts.len() + 1);
                                exts.insert(at, sni_extension(&host, other));
                                name = Some(host);
                            }
                            exts
                        });
                        let hello = Hello {
                            record_version,
                            session_id,
                            suites,
                            compression,
                            extensions,
                            cuts,
                        };
                        (hello, name)
                    },
                )
        }

        /// Whether `needle` occurs in `hay` in order (not necessarily contiguously: a name may
        /// straddle two records).
        fn subsequence(needle: &[u8], hay: &[u8]) -> bool {
            let mut hay = hay.iter();
            needle.iter().all(|b| hay.any(|h| h == b))
        }

        /// What detection must hold for any bytes: an SNI is only ever a host name taken from
        /// the bytes, and a decision made on a prefix is the one made on the whole (detection
        /// stops at the first decision, so it must not depend on how the bytes arrived).
        fn check_any(buf: &[u8], cut: prop::sample::Index) -> Result<(), TestCaseError> {
            let whole = classify(buf);
            if let Sni::Found(name) = client_hello_sni(buf) {
                let label = |l: &str| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
                };
                prop_assert!(
                    name.len() <= 253 && name.split('.').all(label),
                    "not a host name: {name:?}"
                );
                prop_assert!(
                    subsequence(name.as_bytes(), buf),
                    "{name:?} is not in the input"
                );
            }
            if let Verdict::Done(Protocol::Tls { sni: Some(name) }) = &whole {
                prop_assert_eq!(client_hello_sni(buf), Sni::Found(name.clone()));
            }
            let prefix = &buf[..cut.index(buf.len() + 1)];
            if let Verdict::Done(early) = classify(prefix) {
                prop_assert_eq!(
                    &whole,
                    &Verdict::Done(early),
                    "decided on {} of {} bytes",
                    prefix.len(),
                    buf.len()
                );
            }
            Ok(())
        }

        /// Pieces of valid first bytes that mutations splice in.
        const PIECES: &[&[u8]] = &[
            &[0x16, 0x03, 0x01],
            &[0x16, 0x03, 0x03, 0x00, 0x00],
            &[0x00, 0x00],
            &[0xff, 0xff],
            &[0x01, 0x00, 0x00],
            b"GET ",
            b" HTTP/1.1\r\n",
            b"\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"example.com",
        ];

        /// First bytes that start like one of the protocols more often than random bytes do.
        fn first_bytes() -> impl Strategy<Value = Vec<u8>> {
            let start = prop::sample::select(PIECES);
            (start, prop::collection::vec(any::<u8>(), 0..600)).prop_map(|(s, rest)| {
                let mut v = s.to_vec();
                v.extend(rest);
                v
            })
        }

        proptest! {
            #![proptest_config(fuzzing::config())]

            #[test]
            fn fuzz_classify_arbitrary_bytes(
                buf in prop_oneof![prop::collection::vec(any::<u8>(), 0..700), first_bytes()],
                cut in any::<prop::sample::Index>(),
            ) {
                check_any(&buf, cut)?;
            }

            #[test]
            fn fuzz_valid_client_hello_gives_its_sni(
                (hello, name) in hello(),
                trailing in prop::collection::vec(any::<u8>(), 0..16),
                cut in any::<prop::sample::Index>(),
            ) {
                let (mut buf, ends) = hello.records_and_ends();
                let want = match &name {
                    Some(n) => Sni::Found(n.clone()),
                    None => Sni::Absent,
                };
                prop_assert_eq!(client_hello_sni(&buf), want.clone());
                prop_assert_eq!(classify(&buf), Verdict::Done(tls(name.as_deref())));
                // Whatever the client sends next does not change the answer.
                let len = buf.len();
                buf.extend(&trailing);
                prop_assert_eq!(client_hello_sni(&buf), want);
                // A prefix is undecided, or decided as the whole hello is.
                // A prefix is undecided, or decided as the whole hello is: a random one, and
                // each that ends with a record (where a reader could take the records it has for
                // all there is).
                for end in ends.iter().copied().chain([cut.index(len + 1)]) {
                    match classify(&buf[..end]) {
                        Verdict::NeedMore { .. } => {}
                        got => prop_assert_eq!(
                            got,
                            Verdict::Done(tls(name.as_deref())),
                            "decided on {} of {} bytes",
                            end,
                            len
                        ),
                    }
                }
                check_any(&buf, cut)?;
            }

            #[test]
            fn fuzz_mutated_client_hello(
                (hello, _) in hello(),
                muts in mutations(),
                cut in any::<prop::sample::Index>(),
            ) {
                let buf = mutate(&hello.records(), &muts, PIECES);
                check_any(&buf, cut)?;
            }

            #[test]
            fn fuzz_valid_http1_request_line(
                method in prop_oneof![
                    prop::sample::select(KNOWN_METHODS).prop_map(|m| m.to_vec()),
                    "[A-Z][A-Z_-]{0,15}".prop_map(String::into_bytes),
                ],
                target in "/[!-~]{0,60}",
                version in prop::sample::select(vec![&b" HTTP/1.1"[..], b" HTTP/1.0"]),
                crlf in any::<bool>(),
                rest in prop::collection::vec(any::<u8>(), 0..64),
                cut in any::<prop::sample::Index>(),
            ) {
                prop_assume!(method != b"PRI");
                let mut buf = method.clone();
                buf.push(b' ');
                buf.extend(target.as_bytes());
                buf.extend(version);
                buf.extend(if crlf { &b"\r\n"[..] } else { b"\n" });
                buf.extend(&rest);
                prop_assert_eq!(classify(&buf), Verdict::Done(Protocol::Http1));
                check_any(&buf, cut)?;
            }

            #[test]
            fn fuzz_mutated_http1_and_http2(
                h2 in any::<bool>(),
                muts in mutations(),
                cut in any::<prop::sample::Index>(),
            ) {
                let valid: &[u8] = if h2 {
                    H2_PREFACE
                } else {
                    b"POST /v1/orders?id=7 HTTP/1.1\r\nHost: shop\r\n\r\n"
                };
                let buf = mutate(valid, &muts, PIECES);
                check_any(&buf, cut)?;
            }

            #[test]
            fn fuzz_http2_preface_and_its_prefixes(
                rest in prop::collection::vec(any::<u8>(), 0..64),
                cut in 0..H2_PREFACE.len(),
            ) {
                let mut buf = H2_PREFACE.to_vec();
                buf.extend(&rest);
                prop_assert_eq!(classify(&buf), Verdict::Done(Protocol::Http2));
                prop_assert_eq!(
                    classify(&H2_PREFACE[..cut]),
                    Verdict::NeedMore { fallback: Protocol::Opaque }
                );
            }
        }
    }
}
