//! Export over mutual TLS: how many spans per second one core sustains, and what share of the
//! proxy's CPU export takes at 100% sampling.
//!
//! Part 1 (exporter): the proxy's `OtlpExporter` sends batches of 512 realistic SERVER spans (encoded
//! once, as the proxy's queue holds them, so this measures framing, TLS and transport) over
//! mTLS (gRPC, then http/protobuf) to the test OTLP receiver for a few seconds; the exporter runs
//! alone on one thread (current-thread runtime), the receiver on another, and the exporter
//! thread's CPU time (getrusage RUSAGE_THREAD) gives spans per CPU-second.
//!
//! Part 2 (proxy): the release `tracecar-proxy` binary serves a fixed request rate through its
//! inbound listener with `always_on` sampling, once exporting over mTLS gRPC and once with
//! `OTEL_TRACES_EXPORTER=none`; the difference in the proxy's CPU time (/proc/PID/stat) is the
//! cost of export.
//!
//! Run: `cargo build --release -p tracecar-proxy && cargo bench -p tracecar-benches --bench export_mtls`
//! (`EXPORT_BENCH_SECS`, `EXPORT_BENCH_RPS` change the duration and the request rate.)

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use opentelemetry::trace::{SpanKind, Tracer, TracerProvider};
use opentelemetry::KeyValue;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanProcessor};
use tracecar_proxy::config::{ExportTls, OtlpConfig, OtlpProtocol};
use tracecar_proxy::trace::encode::Batch;
use tracecar_proxy::trace::otlp::OtlpExporter;
use tracecar_tests::certs::{mtls_server_config, Ca, KeyKind};
use tracecar_tests::sink::Sink;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn thread_cpu() -> Duration {
    // SAFETY: getrusage writes into the struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(u.ru_utime) + tv(u.ru_stime)
}

fn process_cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = after
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    // Fields after the command: state is skipped by the parse, utime/stime are the 12th/13th.
    let ticks = f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

#[derive(Debug, Default)]
struct Collect(Arc<Mutex<Vec<SpanData>>>);

impl SpanProcessor for Collect {
    fn on_start(&self, _: &mut opentelemetry_sdk::trace::Span, _: &opentelemetry::Context) {}
    fn on_end(&self, span: SpanData) {
        self.0.lock().unwrap().push(span);
    }
    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        Ok(())
    }
    fn shutdown_with_timeout(&self, _: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        Ok(())
    }
}

/// 512 spans shaped like the proxy's SERVER spans.
fn spans() -> Vec<SpanData> {
    let out: Arc<Mutex<Vec<SpanData>>> = Default::default();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(Collect(out.clone()))
        .build();
    let tracer = provider.tracer("tracecar-proxy");
    for i in 0..512 {
        let mut span = tracer
            .span_builder("GET")
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("http.request.method", "GET"),
                KeyValue::new("url.path", format!("/api/orders/{i}")),
                KeyValue::new("url.scheme", "http"),
                KeyValue::new("http.response.status_code", 200i64),
                KeyValue::new("server.address", "10.0.3.17"),
                KeyValue::new("server.port", 8080i64),
                KeyValue::new("client.address", "10.0.1.4"),
                KeyValue::new("network.protocol.version", "1.1"),
                KeyValue::new("user_agent.original", "Go-http-client/1.1"),
            ])
            .start(&tracer);
        opentelemetry::trace::Span::end(&mut span);
    }
    let v = out.lock().unwrap().clone();
    v
}

struct Pki {
    dir: PathBuf,
    tls: ExportTls,
    server: Arc<rustls::ServerConfig>,
}

fn pki() -> Pki {
    let ca = Ca::new("bench-collector-ca");
    let clients = Ca::new("bench-client-ca");
    let dir = std::env::temp_dir().join(format!("tracecar-export-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ca.pem"), &ca.cert_pem).unwrap();
    let (cert, key) = clients
        .client("proxy", KeyKind::EcdsaP256Pkcs8)
        .write_to(&dir);
    let server = mtls_server_config(&ca.server(&[]), &clients);
    let tls = ExportTls {
        ca_file: Some(dir.join("ca.pem").display().to_string()),
        client_cert_file: Some(cert.display().to_string()),
        client_key_file: Some(key.display().to_string()),
        server_name: None,
    };
    Pki { dir, tls, server }
}

/// A receiver on its own thread and runtime.
fn receiver(tls: Arc<rustls::ServerConfig>) -> (tokio::runtime::Runtime, Sink) {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let sink = rt.block_on(Sink::start_on("127.0.0.1:0".parse().unwrap(), Some(tls)));
        (rt, sink)
    })
    .join()
    .unwrap()
}

fn exporter_part(pki: &Pki, secs: u64) {
    let mut batch = Batch::default();
    for span in spans() {
        batch.push_span_data(&span);
    }
    for (name, protocol, suffix) in [
        ("grpc", OtlpProtocol::Grpc, ""),
        ("http/protobuf", OtlpProtocol::HttpProtobuf, "/v1/traces"),
    ] {
        let (rt_sink, sink) = receiver(pki.server.clone());
        let cfg = OtlpConfig {
            protocol,
            endpoint: format!("https://127.0.0.1:{}{suffix}", sink.addr.port()),
            headers: vec![],
            timeout: Duration::from_secs(10),
            tls: pki.tls.clone(),
            required: true,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (spans, wall, cpu) = rt.block_on(async {
            let mut exporter = OtlpExporter::new(&cfg).expect("exporter");
            exporter.set_resource(
                &opentelemetry_sdk::Resource::builder()
                    .with_service_name("bench")
                    .build(),
            );
            exporter.export(&batch).await.expect("warm-up export");
            let (start, cpu0) = (Instant::now(), thread_cpu());
            let mut n = 0u64;
            while start.elapsed() < Duration::from_secs(secs) {
                exporter.export(&batch).await.expect("export");
                n += batch.len() as u64;
            }
            (n, start.elapsed(), thread_cpu() - cpu0)
        });
        sink.clear();
        drop(sink);
        rt_sink.shutdown_background();
        println!(
            "exporter {name:<13} mTLS: {:>9.0} spans/s wall, {:>9.0} spans per exporter CPU-second (batches of 512, {:.1} s)",
            spans as f64 / wall.as_secs_f64(),
            spans as f64 / cpu.as_secs_f64(),
            wall.as_secs_f64()
        );
    }
}

async fn upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                        Bytes::from_static(b"ok"),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// Runs the proxy at `rps` for `secs`; returns (proxy CPU, requests ok, spans exported).
async fn proxy_run(pki: &Pki, export: bool, rps: u64, secs: u64) -> (Duration, u64, f64) {
    let (rt_sink, sink) = receiver(pki.server.clone());
    let app = upstream().await;
    let (inbound, admin) = (tracecar_tests::free_port(), tracecar_tests::free_port());
    let mut cmd =
        std::process::Command::new(tracecar_tests::built_bin("release", "tracecar-proxy"));
    cmd.arg("run")
        .env_clear()
        .env("TRACECAR_INBOUND_LISTEN", format!("127.0.0.1:{inbound}"))
        .env(
            "TRACECAR_OUTBOUND_LISTEN",
            format!("127.0.0.1:{}", tracecar_tests::free_port()),
        )
        .env("TRACECAR_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("TRACECAR_INBOUND_TARGET", app.to_string())
        .env("TRACECAR_LOG", "warn")
        .env("OTEL_TRACES_SAMPLER", "always_on")
        .env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("https://127.0.0.1:{}", sink.addr.port()),
        )
        .env(
            "OTEL_EXPORTER_OTLP_CERTIFICATE",
            pki.tls.ca_file.clone().unwrap(),
        )
        .env(
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
            pki.tls.client_cert_file.clone().unwrap(),
        )
        .env(
            "OTEL_EXPORTER_OTLP_CLIENT_KEY",
            pki.tls.client_key_file.clone().unwrap(),
        )
        .env("OTEL_TRACES_EXPORTER", if export { "otlp" } else { "none" })
        .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().expect("proxy");
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let url = format!("http://127.0.0.1:{inbound}/api/orders/1");
    for _ in 0..200 {
        let req = http::Request::get(&url)
            .body(Full::new(Bytes::new()))
            .unwrap();
        if client.request(req).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let cpu0 = process_cpu(child.id());
    let ok = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let workers = 8;
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (client, url, ok) = (client.clone(), url.clone(), ok.clone());
        tasks.push(tokio::spawn(async move {
            let mut tick =
                tokio::time::interval(Duration::from_secs_f64(workers as f64 / rps as f64));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let end = Instant::now() + Duration::from_secs(secs);
            while Instant::now() < end {
                tick.tick().await;
                let req = http::Request::get(&url)
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                if let Ok(r) = client.request(req).await {
                    if r.status() == 200 && r.into_body().collect().await.is_ok() {
                        ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Let the last batches go out (schedule delay 5 s) before reading the CPU.
    tokio::time::sleep(Duration::from_millis(5500)).await;
    let cpu = process_cpu(child.id()) - cpu0;
    let exported = sink.spans().len() as f64;
    let _ = child.kill();
    let _ = child.wait();
    drop(sink);
    rt_sink.shutdown_background();
    (cpu, ok.load(std::sync::atomic::Ordering::Relaxed), exported)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let secs = env_u64("EXPORT_BENCH_SECS", 5);
    let rps = env_u64("EXPORT_BENCH_RPS", 2000);
    let pki = pki();
    exporter_part(&pki, secs);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (cpu_off, n_off, _) = proxy_run(&pki, false, rps, secs).await;
        let (cpu_on, n_on, exported) = proxy_run(&pki, true, rps, secs).await;
        let s = secs as f64;
        println!(
            "proxy at {rps} req/s, always_on: export none {:.3} cores ({n_off} req), export mTLS gRPC {:.3} cores ({n_on} req, {exported} spans received)",
            cpu_off.as_secs_f64() / s,
            cpu_on.as_secs_f64() / s
        );
        let extra = cpu_on.saturating_sub(cpu_off);
        if extra.is_zero() {
            println!("export share of proxy CPU: below the resolution of this run (no difference measured)");
        } else {
            println!(
                "export share of proxy CPU: {:.1}% ({:.0} spans per export CPU-second)",
                100.0 * extra.as_secs_f64() / cpu_on.as_secs_f64().max(1e-9),
                n_on as f64 / extra.as_secs_f64()
            );
        }
    });
    let _ = std::fs::remove_dir_all(&pki.dir);
}
