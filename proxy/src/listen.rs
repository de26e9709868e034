//! The inbound and outbound listeners: accept, find the destination (original destination or
//! configuration), detect the protocol, then serve HTTP with spans or pass bytes through.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::detect::{detect, Protocol};
use crate::http::{serve, Conn, Shared};
use crate::metrics::Direction;
use crate::orig_dst::original_dst;

/// Connections shed at most per back-off while out of file descriptors (a backlog is 4096
/// at most by default).
const SHED_BATCH: usize = 1024;

/// Per-listener settings.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Where non-redirected connections go (inbound only).
    pub default_target: Option<std::sync::Arc<str>>,
    pub detect_timeout: Duration,
    pub drain_timeout: Duration,
}

/// How long a spliced (opaque or TLS) connection may go without a byte either way, as Envoy's
/// TCP proxy `idle_timeout`: long, since database and other pooled connections idle for minutes.
const SPLICE_IDLE: Duration = Duration::from_secs(3600);

/// Accepts until `shutdown` flips, then waits up to the drain timeout for open requests.
pub async fn run(
    listener: TcpListener,
    shared: Arc<Shared>,
    cfg: ListenerConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let own_addr = listener.local_addr().ok();
    let metrics = shared.telemetry.metrics.clone();
    let direction = shared.direction;
    // One log line when accepting starts failing or shedding, one when it recovers: the log
    // must not grow with the load that causes it.
    let mut accept_failing = false;
    let mut shedding = false;
    // A descriptor held in reserve: when accepting fails for want of descriptors, it is closed
    // so that one waiting connection can be accepted and closed at once (the client learns at
    // once instead of hanging in the backlog), then taken again.
    let mut spare = std::fs::File::open("/dev/null").ok();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if accept_failing {
                        accept_failing = false;
                        tracing::info!(direction = direction.as_str(), "accepting again");
                    }
                    let Some(slot) = ConnSlot::take(&shared) else {
                        // At the limit: close at once (the peer sees the connection end) rather
                        // than hold it unserved.
                        metrics.direction(direction).shed.inc();
                        if !shedding {
                            shedding = true;
                            tracing::warn!(
                                direction = direction.as_str(),
                                limit = shared.limits.max_connections,
                                "connection limit reached: new connections are closed (TRACECAR_MAX_CONNECTIONS)"
                            );
                        }
                        drop(stream);
                        continue;
                    };
                    if shedding {
                        shedding = false;
                        tracing::info!(direction = direction.as_str(), "below the connection limit again");
                    }
                    let _ = stream.set_nodelay(true);
                    let shared = shared.clone();
                    let cfg = cfg.clone();
                    let watcher = graceful.watcher();
                    let stop = shutdown.clone();
                    tokio::spawn(async move {
                        let _slot = slot;
                        let served = std::panic::AssertUnwindSafe(
                            handle(stream, peer, own_addr, shared.clone(), cfg, watcher, stop),
                        );
                        // A bug that panics ends this connection only (its task and sockets);
                        // the others, and the process, go on.
                        if let Err(panic) = futures_util::FutureExt::catch_unwind(served).await {
                            shared.telemetry.metrics.direction(shared.direction).panics.inc();
                            tracing::error!(
                                direction = shared.direction.as_str(),
                                panic = panic_message(&*panic),
                                "panic while serving a connection; the connection was closed"
                            );
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: shed what waits, back off instead of
                    // spinning; the connections already open go on, and so does accepting once
                    // descriptors free up.
                    metrics.direction(direction).accept_errors.inc();
                    if !accept_failing {
                        accept_failing = true;
                        tracing::warn!(direction = direction.as_str(), error = %e, "accept failed; shedding new connections until it works again");
                    }
                    let out_of_files = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
                    if out_of_files && spare.take().is_some() {
                        // Everything waiting in the backlog now (bounded), not one connection
                        // per back-off: a client behind a queue of others must not wait for
                        // them all to be shed one by one.
                        for _ in 0..SHED_BATCH {
                            let waiting =
                                tokio::time::timeout(Duration::from_millis(1), listener.accept());
                            match waiting.await {
                                Ok(Ok((stream, _))) => {
                                    metrics.direction(direction).shed.inc();
                                    drop(stream);
                                }
                                _ => break,
                            }
                        }
                        spare = std::fs::File::open("/dev/null").ok();
                    }
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

/// A panic's message, when it has one.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// One of a listener's `TRACECAR_MAX_CONNECTIONS` places, held while the connection is open
/// (and given back by its drop, whatever ends the connection, a panic included).
struct ConnSlot {
    open: Arc<AtomicUsize>,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl ConnSlot {
    fn take(shared: &Shared) -> Option<ConnSlot> {
        let max = shared.limits.max_connections;
        shared
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        let gauge = shared
            .telemetry
            .metrics
            .direction(shared.direction)
            .open_connections
            .clone();
        gauge.inc();
        Some(ConnSlot {
            open: shared.open.clone(),
            gauge,
        })
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        self.gauge.dec();
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
            other => return pass_through(stream, peer, dst, other, &shared).await,
        },
    };
    shared
        .telemetry
        .metrics
        .connection(shared.direction, "http");
    let conn = Conn {
        peer_ip: (shared.direction == Direction::Inbound).then(|| peer.ip().to_string().into()),
        // What the app connected to: the original destination, else this listener (HTTP_PROXY).
        app_socket: (shared.direction == Direction::Outbound && shared.telemetry.causal())
            .then(|| redirected.or_else(|| stream.local_addr().ok()))
            .flatten()
            .map(|dst| tracecar_causal::Key::new(peer.port(), dst)),
        shared,
        target,
    };
    serve(conn, stream, http2, watcher, stop).await;
}

/// A redirected connection that is not HTTP: TLS or anything else, forwarded byte for byte.
async fn pass_through(
    stream: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    protocol: Protocol,
    shared: &Shared,
) {
    match protocol {
        Protocol::Tls { sni } => {
            shared.telemetry.metrics.connection(shared.direction, "tls");
            // Outbound TLS gets one CLIENT span per connection; inbound TLS is the app's own.
            let span = (shared.direction == Direction::Outbound).then(|| {
                let key = shared
                    .telemetry
                    .causal()
                    .then(|| tracecar_causal::Key::new(peer.port(), dst));
                shared.telemetry.tls_span(sni.as_deref(), dst, key)
            });
            splice(stream, dst, span, shared.limits.connect_timeout).await;
        }
        // (HTTP is served, never passed here.)
        Protocol::Opaque | Protocol::Http1 | Protocol::Http2 => {
            shared
                .telemetry
                .metrics
                .connection(shared.direction, "opaque");
            splice(stream, dst, None, shared.limits.connect_timeout).await;
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
        Ok(upstream) => {
            let _ = crate::idle::splice(&mut client, upstream, SPLICE_IDLE).await;
        }
        Err(e) => {
            if let Some(span) = span.as_mut() {
                span.fail(e.error_type(), e.to_string());
            }
            tracing::debug!(%dst, error = %e, "opaque forward failed");
        }
    }
}
