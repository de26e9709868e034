//! The original destination of a connection that iptables redirected to us
//! (`SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`).

use std::net::SocketAddr;

/// The address the peer meant to reach before the nat table redirected the connection,
/// or `None` when the connection was not redirected (it was addressed to us directly).
pub fn original_dst(stream: &tokio::net::TcpStream) -> std::io::Result<Option<SocketAddr>> {
    // Placeholder until interception lands: every connection is treated as direct.
    let _ = stream;
    Ok(None)
}
