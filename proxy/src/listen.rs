//! The inbound and outbound listeners: accept, find the destination (original destination or
//! configuration), detect the protocol, then serve HTTP with spans or pass bytes through.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::detect::{detect, Protocol};
use crate::http::{serve, Conn, Shared};
use crate::metrics::Direction;
use crate::orig_dst::original_dst;

/// Per-listener settings.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Where non-redirected connections go (inbound only).
    pub default_target: Option<std::sync::Arc<str>>,
    pub detect_timeout: Duration,
    pub drain_timeout: Duration,
}

/// Accepts until `shutdown` flips, then waits up to the drain timeout for open requests.
pub async fn run(
    listener: TcpListener,
    shared: Arc<Shared>,
    cfg: ListenerConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let own_addr = listener.local_addr().ok();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let shared = shared.clone();
                    let cfg = cfg.clone();
                    let watcher = graceful.watcher();
                    let stop = shutdown.clone();
                    tokio::spawn(async move {
                        let gauge = shared.telemetry.metrics.direction(shared.direction).open_connections.clone();
                        gauge.inc();
                        handle(stream, peer, own_addr, shared, cfg, watcher, stop).await;
                        gauge.dec();
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(cfg.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            direction = shared.direction.as_str(),
            "drain timeout passed with requests still open"
        );
    }
}

async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    own_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    cfg: ListenerConfig,
    watcher: hyper_util::server::graceful::Watcher,
    stop: watch::Receiver<bool>,
) {
    // A connection whose original destination is this very listener was not redirected.
    let redirected = match original_dst(&stream) {
        Ok(Some(dst)) if Some(dst) != own_addr => Some(dst),
        _ => None,
    };
    // HTTP goes to the original destination, or (not redirected) to the inbound target or,
    // outbound, wherever each forward-proxy request says; anything else redirected is spliced.
    let (target, http2) = match redirected {
        None => match shared.direction {
            Direction::Inbound => (cfg.default_target.clone(), false),
            Direction::Outbound => (None, false),
        },
        Some(dst) => match detect(&stream, cfg.detect_timeout).await {
            Protocol::Http1 => (Some(dst.to_string().into()), false),
            Protocol::Http2 => (Some(dst.to_string().into()), true),
            other => return pass_through(stream, dst, other, &shared).await,
        },
    };
    shared
        .telemetry
        .metrics
        .connection(shared.direction, "http");
    let conn = Conn {
        peer_ip: (shared.direction == Direction::Inbound).then(|| peer.ip().to_string().into()),
        shared,
        target,
    };
    serve(conn, stream, http2, watcher, stop).await;
}

/// A redirected connection that is not HTTP: TLS or anything else, forwarded byte for byte.
async fn pass_through(stream: TcpStream, dst: SocketAddr, protocol: Protocol, shared: &Shared) {
    match protocol {
        Protocol::Tls { sni } => {
            shared.telemetry.metrics.connection(shared.direction, "tls");
            // Outbound TLS gets one CLIENT span per connection; inbound TLS is the app's own.
            let span = (shared.direction == Direction::Outbound)
                .then(|| shared.telemetry.tls_span(sni.as_deref(), dst));
            splice(stream, dst, span, shared.connect_timeout).await;
        }
        // (HTTP is served, never passed here.)
        Protocol::Opaque | Protocol::Http1 | Protocol::Http2 => {
            shared
                .telemetry
                .metrics
                .connection(shared.direction, "opaque");
            splice(stream, dst, None, shared.connect_timeout).await;
        }
    }
}

/// Forwards bytes untouched in both directions.
async fn splice(
    mut client: TcpStream,
    dst: SocketAddr,
    mut span: Option<crate::trace::RequestSpan>,
    connect_timeout: std::time::Duration,
) {
    match crate::forward::connect_tcp(&dst.to_string(), connect_timeout).await {
        Ok(mut upstream) => {
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        }
        Err(e) => {
            if let Some(span) = span.as_mut() {
                span.fail(e.error_type(), e.to_string());
            }
            tracing::debug!(%dst, error = %e, "opaque forward failed");
        }
    }
}
