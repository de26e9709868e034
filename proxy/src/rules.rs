//! Request rules both HTTP paths apply before forwarding (RFC 9110 / RFC 9112), and the
//! loop guards: what is refused, with which status, and why, written once.
//!
//! Each function takes plain values (bytes of a header, a socket pair), so the lean path's
//! in-place heads and hyper's `HeaderMap` reach the same decision.

use std::net::{IpAddr, SocketAddr};

use http::StatusCode;

/// Why the proxy answers a request itself instead of forwarding it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: &'static str,
}

impl Refusal {
    const fn bad(message: &'static str) -> Refusal {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            message,
        }
    }
}

pub const MANY_HOSTS: Refusal = Refusal::bad("tracecar: more than one Host header\n");
pub const BAD_HOST: Refusal = Refusal::bad("tracecar: invalid Host header\n");
pub const USERINFO: Refusal = Refusal::bad("tracecar: userinfo in the request target or Host\n");
pub const BAD_CODING: Refusal =
    Refusal::bad("tracecar: Transfer-Encoding must be a list of codings ending in chunked\n");
pub const BAD_LENGTH: Refusal = Refusal::bad("tracecar: invalid or conflicting Content-Length\n");
pub const BAD_CHUNKED: Refusal = Refusal::bad("tracecar: malformed chunked request body\n");
pub const TOO_LARGE: Refusal = Refusal {
    status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
    message: "tracecar: request head too large\n",
};
pub const URI_TOO_LONG: Refusal = Refusal {
    status: StatusCode::URI_TOO_LONG,
    message: "tracecar: request target too long\n",
};
pub const LOOP: Refusal = Refusal {
    status: StatusCode::LOOP_DETECTED,
    message: "tracecar: the request would come back to this proxy\n",
};
pub const NO_AUTHORITY: Refusal =
    Refusal::bad("tracecar: request names no destination (absolute URI or Host header)\n");

/// Checks a `Host` field value (one of possibly several: `seen` counts those before it).
/// RFC 9112 §3.2: a request with more than one `Host`, or an invalid one, gets 400; RFC 9110
/// §4.2.4: userinfo is treated as an error.
pub fn check_host(seen: usize, value: &[u8]) -> Result<(), Refusal> {
    if seen > 0 {
        return Err(MANY_HOSTS);
    }
    check_authority(value.trim_ascii())
}

/// An authority from a `Host` field or an absolute-form target: printable ASCII without
/// whitespace, and no userinfo (an empty `Host` is allowed by RFC 9112 §3.2).
pub fn check_authority(a: &[u8]) -> Result<(), Refusal> {
    if a.contains(&b'@') {
        return Err(USERINFO);
    }
    if a.iter().any(|b| !b.is_ascii_graphic()) {
        return Err(BAD_HOST);
    }
    Ok(())
}

/// What `Transfer-Encoding` field values (all of a request's, in order) say about framing.
/// `Ok(true)`: the body is chunked (chunked is the last coding); `Err`: refused, since a request
/// whose final coding is not chunked cannot be framed (RFC 9112 §6.3) and a coding that is not a
/// token could be read differently by the app.
pub fn request_codings<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Result<bool, Refusal> {
    let mut last_chunked = None;
    for value in values {
        for coding in value.split(|b| *b == b',') {
            // A coding may carry parameters (`gzip;q=1` is not valid here, but `x;p=v` is).
            let coding = coding.trim_ascii();
            if coding.is_empty() {
                continue; // empty list elements are allowed (RFC 9110 §5.6.1)
            }
            let name = coding
                .split(|b| *b == b';')
                .next()
                .unwrap_or_default()
                .trim_ascii();
            if name.is_empty() || !name.iter().all(|b| is_tchar(*b)) {
                return Err(BAD_CODING);
            }
            if last_chunked == Some(true) {
                // chunked must be applied once, last (RFC 9112 §6.1).
                return Err(BAD_CODING);
            }
            last_chunked = Some(name.eq_ignore_ascii_case(b"chunked"));
        }
    }
    match last_chunked {
        Some(true) => Ok(true),
        _ => Err(BAD_CODING),
    }
}

/// RFC 9110 §5.6.2 token characters.
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A byte allowed in a field value or chunk extension (RFC 9110 §5.5): visible ASCII, space,
/// tab, obs-text; no other control byte, so nothing can end a line early.
pub fn is_field_byte(b: u8) -> bool {
    b == b'\t' || b == b' ' || b.is_ascii_graphic() || b >= 0x80
}

/// The proxy's mark in the `Via` header of the requests it sends out (RFC 9110 §7.6.3), made
/// once per process: a request that arrives at the outbound listener carrying it has been
/// through this proxy already, and would loop.
#[derive(Debug, Clone)]
pub struct HopMarker {
    /// The whole field value this proxy adds: `1.1 tracecar-<id>`.
    value: Box<str>,
}

impl HopMarker {
    pub fn new() -> HopMarker {
        use opentelemetry_sdk::trace::IdGenerator as _;
        let id = opentelemetry_sdk::trace::RandomIdGenerator::default().new_span_id();
        HopMarker {
            value: format!("1.1 tracecar-{id}").into(),
        }
    }

    /// The `Via` field value to add.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// The received-by part that identifies this proxy.
    fn token(&self) -> &[u8] {
        &self.value.as_bytes()[4..]
    }

    /// A `Via` field value that lists this proxy among its hops.
    pub fn seen_in(&self, via: &[u8]) -> bool {
        via.split(|b| *b == b',').any(|hop| {
            hop.trim_ascii()
                .split(|b| *b == b' ')
                .nth(1)
                .is_some_and(|by| by == self.token())
        })
    }
}

impl Default for HopMarker {
    fn default() -> Self {
        HopMarker::new()
    }
}

/// The listener ports a connection from the proxy must not reach on one of this host's own
/// addresses: that connection would come straight back to the proxy.
#[derive(Debug, Clone, Copy, Default)]
pub struct OwnPorts(pub [Option<u16>; 2]);

impl OwnPorts {
    /// True when `peer`, seen from a connection whose local end is `local`, is one of the
    /// proxy's listeners: a loopback, unspecified or this host's own address (the kernel gives
    /// a connection to a local address that address as its source too), in any spelling
    /// (IPv4-mapped IPv6 included), on a listener's port. Decided on the connected socket, so
    /// no name or literal can spell around it.
    pub fn is_self(&self, local: SocketAddr, peer: SocketAddr) -> bool {
        if !self.0.contains(&Some(peer.port())) {
            return false;
        }
        let ip = canonical(peer.ip());
        ip.is_loopback() || ip.is_unspecified() || ip == canonical(local.ip())
    }

    /// [`Self::is_self`] for a connected stream.
    pub fn check(&self, stream: &tokio::net::TcpStream) -> bool {
        self.check_local(stream).0
    }

    /// [`Self::check`], and this end's address, which it reads anyway (for callers that need
    /// it too: one `getsockname`, not two).
    pub fn check_local(
        &self,
        stream: &tokio::net::TcpStream,
    ) -> (bool, Option<std::net::SocketAddr>) {
        match (stream.local_addr(), stream.peer_addr()) {
            (Ok(local), Ok(peer)) => (self.is_self(local, peer), Some(local)),
            (local, _) => (false, local.ok()),
        }
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_rules() {
        assert_eq!(check_host(0, b"app:8080"), Ok(()));
        assert_eq!(check_host(0, b""), Ok(()));
        assert_eq!(check_host(1, b"app"), Err(MANY_HOSTS));
        assert_eq!(check_host(0, b"user@app"), Err(USERINFO));
        assert_eq!(check_host(0, b"a pp"), Err(BAD_HOST));
        assert_eq!(check_host(0, b"app\x01"), Err(BAD_HOST));
        assert_eq!(check_host(0, "h\u{e9}".as_bytes()), Err(BAD_HOST));
    }

    #[test]
    fn codings_must_end_in_chunked() {
        assert_eq!(request_codings([&b"chunked"[..]]), Ok(true));
        assert_eq!(request_codings([&b"gzip, chunked"[..]]), Ok(true));
        assert_eq!(request_codings([&b"gzip"[..], b"Chunked"]), Ok(true));
        assert_eq!(request_codings([&b" , chunked ,"[..]]), Ok(true));
        for bad in [
            &b"gzip"[..],
            b"chunked, gzip",
            b"chunked, chunked",
            b"xchunked",
            b"chu nked",
            b"\"chunked\"",
            b"",
            b"identity",
        ] {
            assert_eq!(
                request_codings([bad]),
                Err(BAD_CODING),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn hop_marker_is_recognised_in_any_via_list() {
        let m = HopMarker::new();
        let v = m.value().to_string();
        assert!(v.starts_with("1.1 tracecar-") && v.len() == 13 + 16, "{v}");
        assert!(m.seen_in(v.as_bytes()));
        assert!(m.seen_in(format!("1.0 fred, {v} (comment)").as_bytes()));
        assert!(!m.seen_in(b"1.1 tracecar-0000000000000000"));
        assert!(!m.seen_in(HopMarker::new().value().as_bytes()));
        assert!(!m.seen_in(b""));
    }

    #[test]
    fn own_listeners_are_recognised_in_every_spelling() {
        let own = OwnPorts([Some(15140), None]);
        let local: SocketAddr = "10.1.2.3:40000".parse().unwrap();
        for peer in [
            "127.0.0.1:15140",
            "127.0.0.2:15140",
            "0.0.0.0:15140",
            "[::1]:15140",
            "[::ffff:127.0.0.1]:15140",
            "[::ffff:10.1.2.3]:15140",
            "10.1.2.3:15140",
        ] {
            assert!(own.is_self(local, peer.parse().unwrap()), "{peer}");
        }
        for peer in [
            "10.9.9.9:15140",
            "127.0.0.1:15141",
            "[::ffff:10.9.9.9]:15140",
        ] {
            assert!(!own.is_self(local, peer.parse().unwrap()), "{peer}");
        }
    }

    mod fuzz {
        use super::*;
        use crate::fuzzing::config;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(config())]

            /// The request rules never panic, and what they accept is what they promise.
            #[test]
            fn fuzz_request_rules(values in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..24), 0..4)) {
                if request_codings(values.iter().map(Vec::as_slice)) == Ok(true) {
                    let joined = values.concat();
                    prop_assert!(joined.to_ascii_lowercase().windows(7).any(|w| w == b"chunked"));
                }
                for v in &values {
                    if check_authority(v).is_ok() {
                        prop_assert!(v.iter().all(|b| b.is_ascii_graphic() && *b != b'@'));
                    }
                    let _ = check_host(0, v);
                    let _ = HopMarker::new().seen_in(v);
                }
            }
        }
    }
}
