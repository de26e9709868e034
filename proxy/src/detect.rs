//! Protocol detection on a captured connection by a short, bounded peek.

use std::time::Duration;

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

/// Peeks at the first bytes of `stream` (without consuming them) for at most `timeout`.
pub async fn detect(stream: &tokio::net::TcpStream, timeout: Duration) -> Protocol {
    // Placeholder until interception lands.
    let _ = (stream, timeout);
    Protocol::Http1
}
