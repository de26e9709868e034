//! `loadgen --url URL [--rate R] [--connections N] [--duration S] [--warmup S]`: the load
//! generator of the load benchmark; prints one JSON object on stdout.
//!
//! - `--rate R > 0` (open loop): a pacer thread issues R requests per second at fixed intended
//!   send times; N keep-alive HTTP/1.1 connections take them from one queue. Latency is measured
//!   from the *intended* send time, so a stalled server is charged for the requests that queue
//!   up behind it (no coordinated omission, as in wrk2). `service_us` is measured from the actual
//!   send (`svc_*`), for comparison; `lat_*` are the corrected latencies.
//! - `--rate 0` (closed loop, saturation): every connection sends its next request as soon as the
//!   previous response arrived; reports the throughput.
//!
//! Requests sent during `--warmup` are not counted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, Mutex};

#[derive(Parser, Clone)]
struct Args {
    /// `http://host:port/path` (plain HTTP/1.1; the host must be an IP address).
    #[arg(long)]
    url: String,
    /// Aggregate requests per second; 0 runs closed-loop at saturation.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of load before measuring starts.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Runtime worker threads (1: a current-thread runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

/// Latencies in nanoseconds, 1 ns to 100 s, 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("constant histogram bounds are valid")
}

struct Target {
    addr: SocketAddr,
    host: String,
    path: String,
}

fn parse_url(url: &str) -> anyhow::Result<Target> {
    let uri: http::Uri = url.parse().with_context(|| format!("--url {url:?}"))?;
    anyhow::ensure!(
        uri.scheme_str() == Some("http"),
        "--url {url:?}: only http:// is supported"
    );
    let auth = uri.authority().context("--url needs host:port")?;
    let port = auth.port_u16().unwrap_or(80);
    let ip: std::net::IpAddr = auth
        .host()
        .trim_matches(|c| c == '[' || c == ']')
        .parse()
        .with_context(|| format!("--url {url:?}: the host must be an IP address"))?;
    Ok(Target {
        addr: SocketAddr::new(ip, port),
        host: auth.as_str().to_owned(),
        path: uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_owned(),
    })
}

struct Conn {
    target: Arc<Target>,
    sender: Option<SendRequest<Empty<Bytes>>>,
}

impl Conn {
    async fn sender(&mut self) -> anyhow::Result<&mut SendRequest<Empty<Bytes>>> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let stream = tokio::net::TcpStream::connect(self.target.addr).await?;
            stream.set_nodelay(true)?;
            let (sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            self.sender = Some(sender);
        }
        self.sender.as_mut().context("no connection")
    }

    /// One request/response exchange, body read to the end.
    async fn exchange(&mut self) -> anyhow::Result<()> {
        let req = http::Request::get(self.target.path.as_str())
            .header(http::header::HOST, self.target.host.as_str())
            .header(http::header::USER_AGENT, "tracecar-loadgen")
            .body(Empty::<Bytes>::new())?;
        let sender = self.sender().await?;
        sender.ready().await?;
        let res = sender.send_request(req).await;
        let res = match res {
            Ok(r) => r,
            Err(e) => {
                self.sender = None;
                return Err(e.into());
            }
        };
        let ok = res.status().is_success();
        res.into_body().collect().await?;
        anyhow::ensure!(ok, "non-2xx status");
        Ok(())
    }
}

#[derive(Default)]
struct Tally {
    latency: Option<Histogram<u64>>,
    service: Option<Histogram<u64>>,
    requests: u64,
    /// Successful exchanges including the warm-up (for CPU-per-request accounting).
    all_requests: u64,
    errors: u64,
    /// Measured requests never sent: still queued 5 s after the end (open loop only).
    unsent: u64,
}

impl Tally {
    fn new() -> Self {
        Tally {
            latency: Some(histogram()),
            service: Some(histogram()),
            ..Default::default()
        }
    }

    fn merge(&mut self, other: Tally) {
        if let (Some(a), Some(b)) = (self.latency.as_mut(), other.latency.as_ref()) {
            let _ = a.add(b);
        }
        if let (Some(a), Some(b)) = (self.service.as_mut(), other.service.as_ref()) {
            let _ = a.add(b);
        }
        self.requests += other.requests;
        self.all_requests += other.all_requests;
        self.errors += other.errors;
        self.unsent += other.unsent;
    }

    fn record(&mut self, latency: Duration, service: Duration) {
        self.requests += 1;
        if let Some(h) = self.latency.as_mut() {
            h.saturating_record(latency.as_nanos().max(1) as u64);
        }
        if let Some(h) = self.service.as_mut() {
            h.saturating_record(service.as_nanos().max(1) as u64);
        }
    }
}

/// Adds `{prefix}_p50_us` ... `{prefix}_max_us` (flat keys, easy to read from a shell).
fn percentiles(out: &mut serde_json::Value, prefix: &str, h: &Histogram<u64>) {
    let us = |ns: f64| (ns / 100.0).round() / 10.0;
    for (name, q) in [("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p999", 0.999)] {
        out[format!("{prefix}_{name}_us")] = us(h.value_at_quantile(q) as f64).into();
    }
    out[format!("{prefix}_max_us")] = us(h.max() as f64).into();
    out[format!("{prefix}_mean_us")] = us(h.mean()).into();
}

/// Makes `thread::sleep` wake on time (default timer slack is 50 µs).
fn tight_timer_slack() {
    // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}

async fn open_loop(args: &Args, target: Arc<Target>) -> anyhow::Result<Tally> {
    let (tx, rx) = mpsc::unbounded_channel::<Instant>();
    let rx = Arc::new(Mutex::new(rx));
    let start = Instant::now() + Duration::from_millis(50);
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);
    // Requests still queued this long after the end are given up on and reported as `unsent`.
    let give_up = end + Duration::from_secs(5);
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let pacer = std::thread::spawn(move || {
        tight_timer_slack();
        let mut i: u32 = 0;
        loop {
            let intended = start + interval * i;
            if intended >= end {
                break;
            }
            let now = Instant::now();
            if intended > now {
                std::thread::sleep(intended - now);
            }
            if tx.send(intended).is_err() {
                break;
            }
            i += 1;
        }
    });
    let mut workers = Vec::new();
    for _ in 0..args.connections {
        let rx = rx.clone();
        let target = target.clone();
        workers.push(tokio::spawn(async move {
            let mut conn = Conn {
                target,
                sender: None,
            };
            let mut tally = Tally::new();
            loop {
                let intended = {
                    let mut rx = rx.lock().await;
                    match rx.recv().await {
                        Some(t) => t,
                        None => break,
                    }
                };
                if Instant::now() > give_up {
                    if intended >= measure_from {
                        tally.unsent += 1;
                    }
                    continue;
                }
                let sent = Instant::now();
                let ok = conn.exchange().await.is_ok();
                let done = Instant::now();
                tally.all_requests += ok as u64;
                if intended < measure_from {
                    continue;
                }
                if ok {
                    tally.record(done - intended, done - sent);
                } else {
                    tally.errors += 1;
                }
            }
            tally
        }));
    }
    let mut total = Tally::new();
    for w in workers {
        total.merge(w.await?);
    }
    let _ = pacer.join();
    Ok(total)
}

async fn closed_loop(args: &Args, target: Arc<Target>) -> anyhow::Result<Tally> {
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let end = measure_from + Duration::from_secs_f64(args.duration);
    let mut workers = Vec::new();
    for _ in 0..args.connections {
        let target = target.clone();
        workers.push(tokio::spawn(async move {
            let mut conn = Conn {
                target,
                sender: None,
            };
            let mut tally = Tally::new();
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let ok = conn.exchange().await.is_ok();
                let done = Instant::now();
                tally.all_requests += ok as u64;
                if sent < measure_from || done > end {
                    continue;
                }
                if ok {
                    tally.record(done - sent, done - sent);
                } else {
                    tally.errors += 1;
                }
            }
            tally
        }));
    }
    let mut total = Tally::new();
    for w in workers {
        total.merge(w.await?);
    }
    Ok(total)
}

async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.connections > 0, "--connections must be at least 1");
    anyhow::ensure!(args.duration > 0.0, "--duration must be positive");
    anyhow::ensure!(
        args.rate >= 0.0,
        "--rate must be 0 (saturation) or positive"
    );
    let target = Arc::new(parse_url(&args.url)?);
    let open = args.rate > 0.0;
    let secs = args.duration;
    let tally = if open {
        open_loop(&args, target).await?
    } else {
        closed_loop(&args, target).await?
    };
    let mut out = serde_json::json!({
        "mode": if open { "rate" } else { "saturation" },
        "url": args.url,
        "connections": args.connections,
        "target_rate": args.rate,
        "duration_s": secs,
        "requests": tally.requests,
        "all_requests": tally.all_requests,
        "errors": tally.errors,
        "unsent": tally.unsent,
        "rate": (tally.requests as f64 / secs * 10.0).round() / 10.0,
    });
    if let (Some(l), Some(s)) = (tally.latency.as_ref(), tally.service.as_ref()) {
        percentiles(&mut out, "lat", l);
        percentiles(&mut out, "svc", s);
    }
    println!("{out}");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tracecar_benches::runtime(args.threads)?;
    rt.block_on(run(args))
}
