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
use crate::rules::{HopMarker, OwnPorts};
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
    /// One per extra worker thread: resolves when the thread has drained and stopped.
    workers: Vec<tokio::sync::oneshot::Receiver<()>>,
    drain_timeout: Duration,
}

/// `n` listening sockets on `addr` (port 0: the port the first one got), with `SO_REUSEPORT`
/// when there are several, so the kernel spreads connections over the workers.
fn bind_all(
    addr: SocketAddr,
    n: usize,
    v6_only: bool,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut addr = addr;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        if v6_only {
            socket.set_only_v6(true)?;
        }
        socket.set_reuse_address(true)?;
        if n > 1 {
            socket.set_reuse_port(true)?;
        }
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        let listener = std::net::TcpListener::from(socket);
        addr = listener.local_addr()?;
        out.push(listener);
    }
    Ok(out)
}

/// For listeners on `0.0.0.0:P` or `127.0.0.1:P`, companions on `[::]:P` or `[::1]:P` (IPv6
/// only, so both can bind), when the host has IPv6; none otherwise.
fn ipv6_twins(v4: SocketAddr, n: usize) -> Vec<std::net::TcpListener> {
    let SocketAddr::V4(a) = v4 else {
        return Vec::new();
    };
    let ip = if a.ip().is_unspecified() {
        std::net::Ipv6Addr::UNSPECIFIED
    } else if a.ip().is_loopback() {
        std::net::Ipv6Addr::LOCALHOST
    } else {
        return Vec::new();
    };
    let addr = SocketAddr::new(ip.into(), a.port());
    bind_all(addr, n, true).unwrap_or_else(|e| {
        tracing::debug!(%addr, error = %e, "no IPv6 listener");
        Vec::new()
    })
}

/// How many data-plane workers run: `TRACECAR_WORKER_THREADS`, else `TOKIO_WORKER_THREADS`,
/// else the CPUs the proxy may use (its cgroup limit), at most 2: a sidecar should stay small.
pub fn workers(config: &Config) -> usize {
    config
        .worker_threads
        .or_else(|| {
            std::env::var("TOKIO_WORKER_THREADS")
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
        })
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(2)))
}

/// One data-plane worker's listeners, each with what its connections share.
type WorkerListeners = Vec<(std::net::TcpListener, Arc<Shared>)>;

/// Serves one worker's listeners on the current (single-threaded) runtime until shutdown and
/// their drain are over.
async fn serve_worker(
    listeners: WorkerListeners,
    cfg: ListenerConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    // Connections wait for shutdown between requests; on the proxy-wide channel that is a
    // lock shared by every worker, taken twice per request. They wait on this worker's own
    // channel instead, which one task relays.
    let (local_tx, local) = watch::channel(*shutdown.borrow());
    tokio::spawn(async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
        let _ = local_tx.send(true);
        local_tx.closed().await;
    });
    let shutdown = local;
    let mut tasks = JoinSet::new();
    for (listener, shared) in listeners {
        // Registered with this worker's runtime, which alone drives it.
        match TcpListener::from_std(listener) {
            Ok(l) => {
                tasks.spawn(listen::run(l, shared, cfg.clone(), shutdown.clone()));
            }
            Err(e) => tracing::error!(error = %e, "cannot register a listener"),
        }
    }
    while tasks.join_next().await.is_some() {}
}

impl Proxy {
    /// Binds every listener and starts serving. Must run inside a tokio runtime.
    pub async fn start(config: Config, sink: Sink) -> anyhow::Result<Proxy> {
        let metrics = Arc::new(Metrics::new());
        let telemetry = Arc::new(
            Telemetry::new(&config, sink, metrics.clone()).context("cannot set up span export")?,
        );
        // The data plane runs on `n` workers, each a single-threaded runtime with its own
        // listeners (SO_REUSEPORT) and app connections, as nginx and Envoy run one event loop
        // per worker: no task migrates between threads and nothing on the request path is
        // shared between workers but the span queue and metrics. Worker 0 is the calling
        // runtime, which also serves admin; export runs on a thread of its own.
        let n = workers(&config);
        let limits = config.limits;
        let bind = |addr: SocketAddr, what: &'static str| {
            bind_all(addr, n, false)
                .with_context(|| format!("cannot bind the {what} listener on {addr}"))
        };
        let inbound = bind(config.inbound_listen, "inbound")?;
        let outbound = bind(config.outbound_listen, "outbound")?;
        let admin_listener = TcpListener::bind(config.admin_listen)
            .await
            .with_context(|| {
                format!("cannot bind the admin listener on {}", config.admin_listen)
            })?;
        let inbound_addr = inbound[0].local_addr()?;
        let outbound_addr = outbound[0].local_addr()?;
        // iptables redirects a pod's IPv6 traffic to the same ports over IPv6.
        let inbound6 = ipv6_twins(inbound_addr, n);
        let outbound6 = ipv6_twins(outbound_addr, n);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let listener_cfg = ListenerConfig {
            default_target: config.inbound_target.as_deref().map(Into::into),
            detect_timeout: config.detect_timeout,
            drain_timeout: config.drain_timeout,
        };
        let admin = Arc::new(AdminState {
            metrics: metrics.clone(),
            ready: Default::default(),
        });
        let proxy_addrs = (inbound_addr, outbound_addr, admin_listener.local_addr()?);
        let mut per_worker: Vec<Vec<(std::net::TcpListener, Direction)>> =
            (0..n).map(|_| Vec::new()).collect();
        for (listeners, direction) in [
            (inbound, Direction::Inbound),
            (outbound, Direction::Outbound),
            (inbound6, Direction::Inbound),
            (outbound6, Direction::Outbound),
        ] {
            for (i, listener) in listeners.into_iter().enumerate() {
                per_worker[i].push((listener, direction));
            }
        }
        // Neither listener may forward to either listener (a loop), however the address is
        // spelled; every request sent out carries this proxy's `Via` mark.
        let own = OwnPorts([Some(inbound_addr.port()), Some(outbound_addr.port())]);
        let hop = HopMarker::new();
        let open_in: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let open_out: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let mut per_worker = per_worker.into_iter().map(|listeners| {
            // Each worker its own app connections: a pooled connection stays on the runtime
            // whose reactor drives it.
            let upstream = Upstream::with_limits(&limits, own);
            listeners
                .into_iter()
                .map(|(listener, direction)| {
                    let shared = Arc::new(Shared {
                        direction,
                        telemetry: telemetry.clone(),
                        upstream: upstream.clone(),
                        limits,
                        listen_port: match direction {
                            Direction::Inbound => inbound_addr.port(),
                            Direction::Outbound => outbound_addr.port(),
                        },
                        own,
                        hop: hop.clone(),
                        open: match direction {
                            Direction::Inbound => open_in.clone(),
                            Direction::Outbound => open_out.clone(),
                        },
                    });
                    (listener, shared)
                })
                .collect::<WorkerListeners>()
        });
        let mut tasks = JoinSet::new();
        if let Some(first) = per_worker.next() {
            tasks.spawn(serve_worker(
                first,
                listener_cfg.clone(),
                shutdown_rx.clone(),
            ));
        }
        let mut workers = Vec::new();
        for (i, listeners) in per_worker.enumerate() {
            let (done, done_rx) = tokio::sync::oneshot::channel();
            let cfg = listener_cfg.clone();
            let stop = shutdown_rx.clone();
            std::thread::Builder::new()
                .name(format!("tracecar-w{}", i + 1)) // comm keeps 15 bytes
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt.block_on(serve_worker(listeners, cfg, stop)),
                        Err(e) => tracing::error!(error = %e, "cannot start a worker runtime"),
                    }
                    let _ = done.send(());
                })
                .context("cannot start a worker thread")?;
            workers.push(done_rx);
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
            workers,
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
            for worker in self.workers.drain(..) {
                let _ = worker.await;
            }
        })
        .await;
        if !self.telemetry.flush(Duration::from_secs(10)).await {
            tracing::warn!("could not export every span before exit");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// An app that answers every request head with `200 ok`, keep-alive.
    async fn app() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while let Ok(n) = s.read(&mut chunk).await {
                        if n == 0 {
                            break;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if s.write_all(ok).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    /// Sends one request and reads one `200 ok` response (or what came before the close).
    async fn exchange(s: &mut TcpStream, path: &str) -> String {
        let req = format!("GET {path} HTTP/1.1\r\nhost: app\r\n\r\n");
        if s.write_all(req.as_bytes()).await.is_err() {
            return String::new();
        }
        let mut got = Vec::new();
        let mut chunk = [0u8; 1024];
        let read = async {
            while !got.ends_with(b"\r\n\r\nok") {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&chunk[..n]),
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
        String::from_utf8_lossy(&got).into_owned()
    }

    /// A panic while serving one connection (forced: the lean path panics on a test-only
    /// target) ends that connection only: a connection open beside it and new ones are served,
    /// and the panic is counted.
    #[tokio::test(flavor = "current_thread")]
    async fn a_panic_ends_its_connection_and_no_other() {
        let app = app().await;
        let target = app.to_string();
        let cfg = Config::for_test(&[
            "--inbound-listen=127.0.0.1:0",
            "--outbound-listen=127.0.0.1:0",
            "--admin-listen=127.0.0.1:0",
            "--inbound-target",
            &target,
            "--traces-exporter=none",
            "--worker-threads=1",
        ]);
        let proxy = Proxy::start(cfg, Sink::FromConfig).await.unwrap();
        let mut beside = TcpStream::connect(proxy.inbound_addr).await.unwrap();
        assert!(exchange(&mut beside, "/before").await.ends_with("ok"));

        let mut victim = TcpStream::connect(proxy.inbound_addr).await.unwrap();
        let answer = exchange(&mut victim, crate::h1::tests::PANIC_PATH).await;
        assert_eq!(
            answer, "",
            "the panicking connection is closed without an answer"
        );

        assert!(exchange(&mut beside, "/after").await.ends_with("ok"));
        let mut fresh = TcpStream::connect(proxy.inbound_addr).await.unwrap();
        assert!(exchange(&mut fresh, "/fresh").await.ends_with("ok"));
        assert_eq!(proxy.metrics.inbound.panics.get(), 1);
        // Its connection place was given back.
        assert_eq!(proxy.metrics.inbound.open_connections.get(), 2);
        proxy.shutdown().await;
    }
}
