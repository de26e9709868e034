//! One running proxy: its listeners, telemetry and shutdown.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::admin::AdminState;
use crate::config::Config;
use crate::forward::Upstream;
use crate::http::Shared;
use crate::listen::{self, ListenerConfig};
use crate::metrics::{Direction, Metrics};
use crate::trace::{Sink, Telemetry};

/// A started proxy. Dropping it without [`Proxy::shutdown`] aborts its tasks.
#[derive(Debug)]
pub struct Proxy {
    pub inbound_addr: SocketAddr,
    pub outbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    telemetry: Arc<Telemetry>,
    admin: Arc<AdminState>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    drain_timeout: Duration,
}

/// For a listener on `0.0.0.0:P` or `127.0.0.1:P`, a companion on `[::]:P` or `[::1]:P`
/// (IPv6 only, so both can bind), when the host has IPv6; `None` otherwise.
fn ipv6_twin(v4: SocketAddr) -> Option<TcpListener> {
    let SocketAddr::V4(a) = v4 else { return None };
    let ip = if a.ip().is_unspecified() {
        std::net::Ipv6Addr::UNSPECIFIED
    } else if a.ip().is_loopback() {
        std::net::Ipv6Addr::LOCALHOST
    } else {
        return None;
    };
    let addr = SocketAddr::new(ip.into(), a.port());
    let socket = socket2::Socket::new(
        socket2::Domain::IPV6,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .ok()?;
    socket.set_only_v6(true).ok()?;
    socket.set_reuse_address(true).ok()?;
    socket.set_nonblocking(true).ok()?;
    if let Err(e) = socket.bind(&addr.into()) {
        tracing::debug!(%addr, error = %e, "no IPv6 listener");
        return None;
    }
    socket.listen(1024).ok()?;
    TcpListener::from_std(socket.into()).ok()
}

/// How long connecting to an upstream may take before the client gets a 502.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl Proxy {
    /// Binds every listener and starts serving. Must run inside a tokio runtime.
    pub async fn start(config: Config, sink: Sink) -> anyhow::Result<Proxy> {
        let metrics = Arc::new(Metrics::new());
        let telemetry = Arc::new(
            Telemetry::new(&config, sink, metrics.clone()).context("cannot set up span export")?,
        );
        let bind = |addr: SocketAddr, what: &'static str| async move {
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot bind the {what} listener on {addr}"))
        };
        let inbound = bind(config.inbound_listen, "inbound").await?;
        let outbound = bind(config.outbound_listen, "outbound").await?;
        let admin_listener = bind(config.admin_listen, "admin").await?;
        // iptables redirects a pod's IPv6 traffic to the same ports over IPv6.
        let inbound6 = ipv6_twin(inbound.local_addr()?);
        let outbound6 = ipv6_twin(outbound.local_addr()?);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let upstream = Upstream::new(CONNECT_TIMEOUT);
        let listener_cfg = ListenerConfig {
            default_target: config.inbound_target.as_deref().map(Into::into),
            detect_timeout: config.detect_timeout,
            drain_timeout: config.drain_timeout,
        };
        let inbound_port = inbound.local_addr()?.port();
        let outbound_port = outbound.local_addr()?.port();
        let shared = |direction| {
            Arc::new(Shared {
                direction,
                telemetry: telemetry.clone(),
                upstream: upstream.clone(),
                connect_timeout: CONNECT_TIMEOUT,
                listen_port: match direction {
                    Direction::Inbound => inbound_port,
                    Direction::Outbound => outbound_port,
                },
            })
        };
        let admin = Arc::new(AdminState {
            metrics: metrics.clone(),
            ready: Default::default(),
        });
        let proxy_addrs = (
            inbound.local_addr()?,
            outbound.local_addr()?,
            admin_listener.local_addr()?,
        );
        let mut tasks = JoinSet::new();
        tasks.spawn(listen::run(
            inbound,
            shared(Direction::Inbound),
            listener_cfg.clone(),
            shutdown_rx.clone(),
        ));
        tasks.spawn(listen::run(
            outbound,
            shared(Direction::Outbound),
            listener_cfg.clone(),
            shutdown_rx.clone(),
        ));
        for (listener, direction) in [
            (inbound6, Direction::Inbound),
            (outbound6, Direction::Outbound),
        ] {
            if let Some(l) = listener {
                tasks.spawn(listen::run(
                    l,
                    shared(direction),
                    listener_cfg.clone(),
                    shutdown_rx.clone(),
                ));
            }
        }
        tasks.spawn(crate::admin::run(
            admin_listener,
            admin.clone(),
            shutdown_rx,
        ));
        admin.ready.store(true, Ordering::Release);
        tracing::info!(
            inbound = %proxy_addrs.0,
            outbound = %proxy_addrs.1,
            admin = %proxy_addrs.2,
            service = %config.service_name,
            "tracecar proxy ready"
        );
        Ok(Proxy {
            inbound_addr: proxy_addrs.0,
            outbound_addr: proxy_addrs.1,
            admin_addr: proxy_addrs.2,
            metrics,
            telemetry,
            admin,
            shutdown,
            tasks,
            drain_timeout: config.drain_timeout,
        })
    }

    /// Exports every span finished so far.
    pub async fn flush(&self) -> bool {
        self.telemetry.flush(Duration::from_secs(10)).await
    }

    /// Stops accepting, lets in-flight requests finish (up to the drain timeout), flushes spans.
    pub async fn shutdown(mut self) {
        self.admin.ready.store(false, Ordering::Release);
        let _ = self.shutdown.send(true);
        let deadline = self.drain_timeout + Duration::from_secs(1);
        let _ = tokio::time::timeout(deadline, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if !self.telemetry.flush(Duration::from_secs(10)).await {
            tracing::warn!("could not export every span before exit");
        }
    }
}
