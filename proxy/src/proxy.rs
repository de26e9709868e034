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
        let (shutdown, shutdown_rx) = watch::channel(false);
        let upstream = Upstream::new(CONNECT_TIMEOUT);
        let listener_cfg = ListenerConfig {
            default_target: config.inbound_target.clone(),
            detect_timeout: config.detect_timeout,
            drain_timeout: config.drain_timeout,
        };
        let shared = |direction| {
            Arc::new(Shared {
                direction,
                telemetry: telemetry.clone(),
                upstream: upstream.clone(),
                connect_timeout: CONNECT_TIMEOUT,
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
            listener_cfg,
            shutdown_rx.clone(),
        ));
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
