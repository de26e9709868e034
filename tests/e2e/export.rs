//! Span export over mutual TLS, end to end: the real proxy binary, a real OTLP receiver that
//! requires client certificates, certificate rotation by Kubernetes-style symlink swap,
//! collector outages under load, retry hints, start-up checks.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tracecar_tests::app::{get, App};
use tracecar_tests::certs::{mtls_server_config, Ca, KeyKind, Pair, SecretDir};
use tracecar_tests::sink::Sink;
use tracecar_tests::{base_env, wait_until, ProxyProcess};

const WAIT: Duration = Duration::from_secs(10);

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tracecar-export-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("tmp dir");
    dir
}

fn write(dir: &std::path::Path, name: &str, content: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, content).expect("write");
    p.display().to_string()
}

/// Proxy environment: export to `endpoint` with the given TLS files and fast batching.
fn env(
    endpoint: &str,
    app: &App,
    protocol: &str,
    tls: &[(&str, String)],
    extra: &[(&str, &str)],
) -> Vec<(String, String)> {
    let mut e = base_env(endpoint);
    e.push(("TRACECAR_INBOUND_TARGET".into(), app.addr.to_string()));
    e.push(("OTEL_EXPORTER_OTLP_PROTOCOL".into(), protocol.into()));
    for (k, v) in tls {
        e.push((k.to_string(), v.clone()));
    }
    for (k, v) in extra {
        e.retain(|(ek, _)| ek != k);
        e.push((k.to_string(), v.to_string()));
    }
    e
}

fn tls_files(ca: &str, cert: &str, key: &str) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", ca.to_string()),
        ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", cert.to_string()),
        ("OTEL_EXPORTER_OTLP_CLIENT_KEY", key.to_string()),
    ]
}

/// The export TLS variables pointing at a mounted-Secret directory's (symlinked) files.
fn secret_tls(secret: &SecretDir) -> Vec<(&'static str, String)> {
    tls_files(
        &secret.ca().display().to_string(),
        &secret.cert().display().to_string(),
        &secret.key().display().to_string(),
    )
}

fn ok_path(sink: &Sink, path: &str) -> bool {
    sink.spans()
        .iter()
        .any(|s| s.attr_str("url.path") == Some(path))
}

/// A sink that serves OTLP over mutual TLS: its certificate from `ca`, clients' from `clients`.
async fn mtls_sink(ca: &Ca, clients: &Ca) -> Sink {
    Sink::start_on(
        "127.0.0.1:0".parse().unwrap(),
        Some(mtls_server_config(&ca.server(&[]), clients)),
    )
    .await
}

/// A sink in its own runtime, so that stopping it closes every connection it holds (dropping a
/// [`Sink`] only stops accepting).
struct Collector {
    rt: Option<tokio::runtime::Runtime>,
    sink: Option<Sink>,
}

impl Collector {
    fn start(addr: SocketAddr, tls: Arc<rustls::ServerConfig>) -> Collector {
        // Built on a plain thread: a runtime cannot be started from inside the test's runtime.
        let (rt, sink) = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("rt");
            // The port was just released by the previous collector; bind may need a moment.
            for _ in 0..100 {
                if std::net::TcpListener::bind(addr).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let sink = rt.block_on(Sink::start_on(addr, Some(tls)));
            (rt, sink)
        })
        .join()
        .expect("collector thread");
        Collector {
            rt: Some(rt),
            sink: Some(sink),
        }
    }

    fn sink(&self) -> &Sink {
        self.sink.as_ref().expect("running")
    }

    /// Stops serving, then returns what was received. In that order: a batch acknowledged
    /// between a snapshot and the shutdown would count as exported at the proxy but be missing
    /// here.
    fn stop(mut self) -> Vec<tracecar_tests::sink::RecvSpan> {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
        // `shutdown_background` does not wait for a poll already running on the collector's
        // thread; one that stores spans now can no longer answer, so the proxy sends them again.
        std::thread::sleep(Duration::from_millis(200));
        let spans = self.sink().spans();
        drop(self.sink.take());
        spans
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        drop(self.sink.take());
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_export_over_grpc_and_http_with_every_key_kind() {
    let ca = Ca::new("collector-ca");
    let clients = Ca::new("client-ca");
    let server = ca.server(&[]);
    let sink = Sink::start_on(
        "127.0.0.1:0".parse().unwrap(),
        Some(mtls_server_config(&server, &clients)),
    )
    .await;
    let app = App::start().await;
    let dir = tmp("kinds");
    let ca_file = write(&dir, "ca.pem", &ca.cert_pem);
    let cases = [
        ("grpc", KeyKind::EcdsaP256Pkcs8),
        ("grpc", KeyKind::RsaPkcs8),
        ("grpc", KeyKind::Ed25519Pkcs8),
        ("http/protobuf", KeyKind::EcdsaP256Sec1),
        ("http/protobuf", KeyKind::EcdsaP384Sec1),
        ("http/protobuf", KeyKind::RsaPkcs8),
    ];
    for (i, (protocol, kind)) in cases.into_iter().enumerate() {
        let pair = clients.client(&format!("proxy-{i}"), kind);
        let (cert, key) = pair.write_to(&dir.join(format!("c{i}")));
        let endpoint = format!("https://127.0.0.1:{}", sink.addr.port());
        let tls = tls_files(
            &ca_file,
            &cert.display().to_string(),
            &key.display().to_string(),
        );
        let proxy = ProxyProcess::spawn(&env(&endpoint, &app, protocol, &tls, &[]));
        let path = format!("/mtls/{i}");
        assert_eq!(
            get(&format!("http://{}{path}", proxy.inbound), &[]).await.0,
            200
        );
        assert!(
            wait_until(WAIT, || ok_path(&sink, &path)).await,
            "{protocol} {kind:?}: no span; proxy log: {}",
            proxy.stderr()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_client_certificate_delivers_nothing_and_app_traffic_is_untouched() {
    let ca = Ca::new("collector-ca");
    let clients = Ca::new("client-ca");
    let rogue = Ca::new("rogue-ca");
    let sink = mtls_sink(&ca, &clients).await;
    let app = App::start().await;
    let dir = tmp("untrusted");
    let ca_file = write(&dir, "ca.pem", &ca.cert_pem);
    for protocol in ["grpc", "http/protobuf"] {
        let (cert, key) = rogue
            .client("proxy", KeyKind::EcdsaP256Pkcs8)
            .write_to(&dir.join(protocol.replace('/', "-")));
        let endpoint = format!("https://127.0.0.1:{}", sink.addr.port());
        let tls = tls_files(
            &ca_file,
            &cert.display().to_string(),
            &key.display().to_string(),
        );
        let proxy = ProxyProcess::spawn(&env(&endpoint, &app, protocol, &tls, &[]));
        for i in 0..100 {
            let (status, _, _) = get(&format!("http://{}/u/{i}", proxy.inbound), &[]).await;
            assert_eq!(status, 200, "app traffic must not fail");
        }
        assert!(
            wait_until(WAIT, || proxy
                .metric("tracecar_export_errors_total")
                .unwrap_or(0.0)
                >= 1.0)
            .await,
            "{}",
            proxy.metrics()
        );
        assert_eq!(
            proxy.metric("tracecar_export_healthy"),
            Some(0.0),
            "{protocol}"
        );
        assert!(
            sink.spans().is_empty(),
            "{protocol}: an untrusted client got spans in"
        );
        assert_eq!(
            tracecar_tests::http_get_blocking(proxy.admin, "/ready")
                .unwrap()
                .0,
            200
        );
        // One warning for the state change, not one per attempt or per span.
        let warns = proxy
            .stderr()
            .lines()
            .filter(|l| l.contains("span export failing"))
            .count();
        assert_eq!(warns, 1, "{}", proxy.stderr());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_name_override_for_collectors_addressed_by_ip() {
    let ca = Ca::new("collector-ca");
    let clients = Ca::new("client-ca");
    let server = ca.server_named("otel-collector.observability.svc");
    let sink = Sink::start_on(
        "127.0.0.1:0".parse().unwrap(),
        Some(mtls_server_config(&server, &clients)),
    )
    .await;
    let app = App::start().await;
    let dir = tmp("sni");
    let ca_file = write(&dir, "ca.pem", &ca.cert_pem);
    let (cert, key) = clients
        .client("proxy", KeyKind::EcdsaP256Pkcs8)
        .write_to(&dir);
    let endpoint = format!("https://127.0.0.1:{}", sink.addr.port());
    let tls = tls_files(
        &ca_file,
        &cert.display().to_string(),
        &key.display().to_string(),
    );

    // The name is verified: 127.0.0.1 is not in the certificate.
    let wrong = ProxyProcess::spawn(&env(&endpoint, &app, "grpc", &tls, &[]));
    assert_eq!(
        get(&format!("http://{}/no", wrong.inbound), &[]).await.0,
        200
    );
    assert!(
        wait_until(WAIT, || wrong
            .metric("tracecar_export_errors_total")
            .unwrap_or(0.0)
            >= 1.0)
        .await
    );
    assert!(sink.spans().is_empty());

    let right = ProxyProcess::spawn(&env(
        &endpoint,
        &app,
        "grpc",
        &tls,
        &[(
            "TRACECAR_EXPORT_TLS_SERVER_NAME",
            "otel-collector.observability.svc",
        )],
    ));
    assert_eq!(
        get(&format!("http://{}/yes", right.inbound), &[]).await.0,
        200
    );
    assert!(
        wait_until(WAIT, || ok_path(&sink, "/yes")).await,
        "{}",
        right.stderr()
    );
    assert!(!ok_path(&sink, "/no"));
}

async fn rotation(protocol: &str) {
    let ca = Ca::new("collector-ca");
    let clients = Ca::new("client-ca");
    let rogue = Ca::new("rogue-ca");
    let sink = mtls_sink(&ca, &clients).await;
    let app = App::start().await;
    let mut secret = SecretDir::new(
        tmp(&format!("rotate-{}", protocol.replace('/', "-"))),
        &ca.cert_pem,
        &rogue.client("proxy", KeyKind::EcdsaP256Pkcs8),
    );
    let tls = secret_tls(&secret);
    let endpoint = format!("https://127.0.0.1:{}", sink.addr.port());
    let proxy = ProxyProcess::spawn(&env(&endpoint, &app, protocol, &tls, &[]));

    // Untrusted: nothing arrives, the spans wait in the queue.
    for i in 0..20 {
        assert_eq!(
            get(&format!("http://{}/before/{i}", proxy.inbound), &[])
                .await
                .0,
            200
        );
    }
    assert!(
        wait_until(WAIT, || proxy.metric("tracecar_export_healthy")
            == Some(0.0))
        .await
    );
    assert!(sink.spans().is_empty());

    // The kubelet swaps the Secret: a trusted pair. No restart.
    let trusted = clients.client("proxy", KeyKind::RsaPkcs8);
    secret.swap(&ca.cert_pem, &trusted);
    let swapped = Instant::now();
    assert!(
        wait_until(WAIT, || ok_path(&sink, "/before/19")).await,
        "spans did not arrive within 10 s of the swap: {}",
        proxy.stderr()
    );
    let took = swapped.elapsed();
    // No span lost across the swap: the ones queued under the old material arrive too (batches
    // in flight concurrently may land in any order, so wait for all of them).
    let before_count = || {
        sink.spans()
            .iter()
            .filter_map(|s| {
                s.attr_str("url.path")
                    .filter(|p| p.starts_with("/before/"))
                    .map(String::from)
            })
            .collect::<HashSet<String>>()
    };
    wait_until(WAIT, || before_count().len() == 20).await;
    let before = before_count();
    assert_eq!(before.len(), 20, "{before:?}");
    assert!(
        wait_until(WAIT, || proxy.metric("tracecar_export_healthy")
            == Some(1.0))
        .await
    );
    eprintln!("{protocol}: spans arrived {took:?} after the swap");

    // A mismatched pair (certificate of one key, another key): rejected, old material stays.
    let other = clients.client("proxy", KeyKind::EcdsaP256Pkcs8);
    let mismatched = Pair {
        cert_pem: trusted.cert_pem.clone(),
        key_pem: other.key_pem,
    };
    secret.swap(&ca.cert_pem, &mismatched);
    assert!(
        wait_until(WAIT, || proxy
            .stderr()
            .contains("new export TLS material rejected"))
        .await,
        "{}",
        proxy.stderr()
    );
    let log = proxy.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("new export TLS material rejected"))
        .unwrap();
    assert!(line.contains("does not match"), "{line}");
    // Also force fresh connections: the pool must come back with the old (good) material.
    for i in 0..5 {
        assert_eq!(
            get(&format!("http://{}/after/{i}", proxy.inbound), &[])
                .await
                .0,
            200
        );
    }
    assert!(
        wait_until(WAIT, || ok_path(&sink, "/after/4")).await,
        "{}",
        proxy.stderr()
    );
    assert_eq!(
        log.matches("new export TLS material rejected").count(),
        1,
        "one line per change: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_by_symlink_swap_grpc() {
    rotation("grpc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_by_symlink_swap_http() {
    rotation("http/protobuf").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_that_starts_rejecting_the_old_certificate_does_not_stall_export() {
    // The collector's trust changes (client CA rotated) while the proxy holds a live connection;
    // the proxy's Secret is updated too. Export must move to new connections with new material.
    let ca = Ca::new("collector-ca");
    let old_clients = Ca::new("client-ca-1");
    let new_clients = Ca::new("client-ca-2");
    let server = ca.server(&[]);
    let port = tracecar_tests::free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let c1 = Collector::start(addr, mtls_server_config(&server, &old_clients));
    let app = App::start().await;
    let mut secret = SecretDir::new(
        tmp("reject-old"),
        &ca.cert_pem,
        &old_clients.client("proxy", KeyKind::EcdsaP256Pkcs8),
    );
    let tls = secret_tls(&secret);
    let proxy = ProxyProcess::spawn(&env(&format!("https://{addr}"), &app, "grpc", &tls, &[]));
    assert_eq!(
        get(&format!("http://{}/one", proxy.inbound), &[]).await.0,
        200
    );
    assert!(wait_until(WAIT, || ok_path(c1.sink(), "/one")).await);
    // Collector restarts trusting only the new client CA; the proxy gets its new certificate.
    c1.stop();
    let c2 = Collector::start(addr, mtls_server_config(&server, &new_clients));
    secret.swap(
        &ca.cert_pem,
        &new_clients.client("proxy", KeyKind::Ed25519Pkcs8),
    );
    assert_eq!(
        get(&format!("http://{}/two", proxy.inbound), &[]).await.0,
        200
    );
    assert!(
        wait_until(WAIT, || ok_path(c2.sink(), "/two")).await,
        "{}",
        proxy.stderr()
    );
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_outage_under_load_loses_only_counted_spans() {
    let ca = Ca::new("collector-ca");
    let clients = Ca::new("client-ca");
    let server_cfg = mtls_server_config(&ca.server(&[]), &clients);
    let port = tracecar_tests::free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let app = App::start().await;
    let dir = tmp("outage");
    let ca_file = write(&dir, "ca.pem", &ca.cert_pem);
    let (cert, key) = clients
        .client("proxy", KeyKind::EcdsaP256Pkcs8)
        .write_to(&dir);
    let tls = tls_files(
        &ca_file,
        &cert.display().to_string(),
        &key.display().to_string(),
    );
    let collector = Collector::start(addr, server_cfg.clone());
    let proxy = ProxyProcess::spawn(&env(
        &format!("https://{addr}"),
        &app,
        "grpc",
        &tls,
        &[
            ("OTEL_BSP_MAX_QUEUE_SIZE", "200"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "50"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2000"),
        ],
    ));

    // Steady load: 4 workers, each ~100 requests/s, tagged by phase.
    let phase = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let latencies: Arc<Mutex<[Vec<Duration>; 3]>> = Default::default();
    let sent = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..4 {
        let (phase, stop, latencies, sent, failed) = (
            phase.clone(),
            stop.clone(),
            latencies.clone(),
            sent.clone(),
            failed.clone(),
        );
        let url = format!("http://{}/load/{w}", proxy.inbound);
        workers.push(tokio::spawn(async move {
            let client = tracecar_tests::app::client();
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let p = phase.load(Ordering::Relaxed) as usize;
                let start = Instant::now();
                let req = http::Request::get(&url)
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let ok = match client.request(req).await {
                    Ok(resp) => resp.status() == 200 && resp.into_body().collect().await.is_ok(),
                    Err(_) => false,
                };
                sent.fetch_add(1, Ordering::Relaxed);
                if ok {
                    latencies.lock().unwrap()[p].push(start.elapsed());
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Outage: the collector goes away with its connections.
    let mut received = collector.stop();
    phase.store(1, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        proxy.metric("tracecar_export_healthy"),
        Some(0.0),
        "{}",
        proxy.metrics()
    );
    assert_eq!(
        tracecar_tests::http_get_blocking(proxy.admin, "/ready")
            .unwrap()
            .0,
        200,
        "ready during the outage"
    );
    // The collector is back on the same port.
    let collector = Collector::start(addr, server_cfg.clone());
    phase.store(2, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let sent = sent.load(Ordering::Relaxed);
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "app requests failed during the outage"
    );

    // Everything still queued drains; then sent - received == dropped.
    let metric_sum = |proxy: &ProxyProcess, prefix: &str| -> f64 {
        proxy
            .metrics()
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let unique = |spans: &[tracecar_tests::sink::RecvSpan]| {
        spans
            .iter()
            .map(|s| s.span_id.clone())
            .collect::<HashSet<_>>()
    };
    let settled = wait_until(Duration::from_secs(15), || {
        let mut all = received.clone();
        all.extend(collector.sink().spans());
        let got = unique(&all).len() as f64;
        let dropped = metric_sum(&proxy, "tracecar_spans_dropped_total");
        got + dropped == sent as f64
    })
    .await;
    received.extend(collector.sink().spans());
    let got = unique(&received).len() as u64;
    let dropped = metric_sum(&proxy, "tracecar_spans_dropped_total");
    let queue_full = proxy
        .metric(r#"tracecar_spans_dropped_total{reason="queue_full"}"#)
        .unwrap_or(0.0);
    let after: usize = received
        .iter()
        .filter(|s| s.attr_str("url.path").is_some())
        .count();
    let lat = latencies.lock().unwrap().clone();
    let summary: Vec<String> = ["before", "outage", "after"]
        .iter()
        .zip(lat.iter())
        .map(|(name, v)| {
            let mut v = v.clone();
            v.sort();
            format!(
                "{name}: n={} p50={:?} p99={:?}",
                v.len(),
                percentile(&v, 0.5),
                percentile(&v, 0.99)
            )
        })
        .collect();
    eprintln!(
        "outage: sent={sent} received={got} dropped={dropped} (queue_full={queue_full}) spans={after}; {}",
        summary.join("; ")
    );
    assert!(
        settled,
        "sent {sent} != received {got} + dropped {dropped}: {}",
        proxy.metrics()
    );
    assert!(
        queue_full > 0.0,
        "a 200-span queue must overflow during a 4 s outage at ~400 spans/s"
    );
    assert!(
        proxy.metric("tracecar_export_healthy") == Some(1.0),
        "healthy again after recovery"
    );
    // Spans from after recovery arrive (checked via counts above: nothing from phase 2 is dropped
    // unless counted). Latency: loose bound only, numbers are in the output.
    let mut before = lat[0].clone();
    let mut outage = lat[1].clone();
    before.sort();
    outage.sort();
    let bound = percentile(&before, 0.99) * 10 + Duration::from_millis(200);
    assert!(percentile(&outage, 0.99) < bound, "{summary:?}");
    let log = proxy.stderr();
    assert_eq!(log.matches("span export failing").count(), 1, "{log}");
    assert_eq!(log.matches("span export recovered").count(), 1, "{log}");
}

#[test]
fn certificate_problems_at_start_up_stop_it_with_one_line() {
    let ca = Ca::new("collector-ca");
    let clients = Ca::new("client-ca");
    let dir = tmp("startup");
    let ca_file = write(&dir, "ca.pem", &ca.cert_pem);
    let a = clients.client("a", KeyKind::EcdsaP256Pkcs8);
    let b = clients.client("b", KeyKind::EcdsaP256Pkcs8);
    let (cert_a, _) = a.write_to(&dir.join("a"));
    let (_, key_b) = b.write_to(&dir.join("b"));
    let missing = dir.join("nope.pem").display().to_string();
    let garbage = write(
        &dir,
        "garbage.pem",
        "-----BEGIN CERTIFICATE-----\nnot base64\n",
    );
    let cert_a = cert_a.display().to_string();
    let key_b = key_b.display().to_string();
    for (cert, key, var, expect) in [
        (
            missing.as_str(),
            key_b.as_str(),
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
            "readable",
        ),
        (
            cert_a.as_str(),
            missing.as_str(),
            "OTEL_EXPORTER_OTLP_CLIENT_KEY",
            "readable",
        ),
        (
            cert_a.as_str(),
            key_b.as_str(),
            "OTEL_EXPORTER_OTLP_CLIENT_KEY",
            "private key of the certificate",
        ),
        (
            garbage.as_str(),
            key_b.as_str(),
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
            "PEM certificate",
        ),
    ] {
        let out = std::process::Command::new(tracecar_tests::proxy_bin())
            .arg("run")
            .env_clear()
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", "https://127.0.0.1:4317")
            .env("OTEL_EXPORTER_OTLP_CERTIFICATE", &ca_file)
            .env("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", cert)
            .env("OTEL_EXPORTER_OTLP_CLIENT_KEY", key)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}: {err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{err}");
        assert!(lines[0].contains(var) && lines[0].contains(expect), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_not_required_serves_traffic_and_reports_failure_until_the_material_appears() {
    let ca = Ca::new("collector-ca");
    let clients = Ca::new("client-ca");
    let sink = mtls_sink(&ca, &clients).await;
    let app = App::start().await;
    let dir = tmp("not-required");
    let ca_file = write(&dir, "ca.pem", &ca.cert_pem);
    let cert = dir.join("tls.crt").display().to_string();
    let key = dir.join("tls.key").display().to_string();
    let proxy = ProxyProcess::spawn(&env(
        &format!("https://127.0.0.1:{}", sink.addr.port()),
        &app,
        "grpc",
        &tls_files(&ca_file, &cert, &key),
        &[("TRACECAR_EXPORT_REQUIRED", "false")],
    ));
    assert_eq!(
        proxy.metric("tracecar_export_healthy"),
        Some(0.0),
        "{}",
        proxy.metrics()
    );
    for i in 0..10 {
        assert_eq!(
            get(&format!("http://{}/nr/{i}", proxy.inbound), &[])
                .await
                .0,
            200
        );
    }
    assert!(
        wait_until(WAIT, || proxy
            .metric(r#"tracecar_spans_dropped_total{reason="tls_material"}"#)
            == Some(10.0))
        .await,
        "{}",
        proxy.metrics()
    );
    assert!(
        proxy
            .stderr()
            .contains("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"),
        "{}",
        proxy.stderr()
    );
    // The Secret shows up later: export starts without a restart.
    let pair = clients.client("proxy", KeyKind::EcdsaP256Sec1);
    std::fs::write(&key, &pair.key_pem).unwrap();
    std::fs::write(&cert, &pair.cert_pem).unwrap();
    assert_eq!(
        get(&format!("http://{}/late", proxy.inbound), &[]).await.0,
        200
    );
    assert!(
        wait_until(WAIT, || ok_path(&sink, "/late")).await,
        "{}",
        proxy.stderr()
    );
    assert!(
        wait_until(WAIT, || proxy.metric("tracecar_export_healthy")
            == Some(1.0))
        .await
    );
}

/// Where the injector mounts the collector TLS Secret in the proxy (injector/src/patch.rs).
const INJECTED_TLS_MOUNT: &str = "/var/run/secrets/tracecar/otlp";

/// The proxy's environment exactly as `tracecar-injector inject` writes it, as the kubelet would
/// resolve it: downward-API fields get this pod's values, and the Secret's mount path is
/// `secret_dir`. Also returns the injected proxy container, to check how it is run.
fn injected_proxy_env(
    flags: &[&str],
    secret_dir: &std::path::Path,
) -> (Vec<(String, String)>, serde_json::Value) {
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "shop-7d9f", "namespace": "shop", "uid": "u-1"},
        "spec": {"containers": [{"name": "app", "image": "ghcr.io/example/app:1"}]}
    });
    let mut child = std::process::Command::new(tracecar_tests::injector_bin())
        .arg("inject")
        .args(flags)
        .env_clear()
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn tracecar-injector");
    std::io::Write::write_all(
        &mut child.stdin.take().expect("stdin"),
        pod.to_string().as_bytes(),
    )
    .expect("write pod");
    let out = child.wait_with_output().expect("inject");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let injected: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON out");
    // The volume may be missing: the pod must be created and started anyway.
    let volume = injected["spec"]["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == "tracecar-otlp-tls"))
        .unwrap_or_else(|| panic!("no Secret volume: {injected}"));
    assert_eq!(volume["secret"]["optional"], true, "{volume}");
    let proxy = injected["spec"]["initContainers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "tracecar-proxy"))
        .unwrap_or_else(|| panic!("no tracecar-proxy init container: {injected}"))
        .clone();
    let field = |path: &str| match path {
        "metadata.name" => "shop-7d9f",
        "metadata.uid" => "u-1",
        "metadata.namespace" => "shop",
        "spec.nodeName" => "node-1",
        other => panic!("unexpected downward API field {other}"),
    };
    let mount = secret_dir.display().to_string();
    let env = proxy["env"]
        .as_array()
        .expect("proxy env")
        .iter()
        .map(|e| {
            let name = e["name"].as_str().expect("env name").to_owned();
            let value = match e["value"].as_str() {
                Some(v) => v.replace(INJECTED_TLS_MOUNT, &mount),
                None => field(
                    e["valueFrom"]["fieldRef"]["fieldPath"]
                        .as_str()
                        .unwrap_or_else(|| panic!("unexpected env entry {e}")),
                )
                .to_owned(),
            };
            (name, value)
        })
        .collect();
    (env, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_proxy_with_the_secret_missing_serves_the_app_then_exports_when_it_appears() {
    let ca = Ca::new("collector-ca");
    let clients = Ca::new("client-ca");
    let sink = mtls_sink(&ca, &clients).await;
    let app = App::start().await;
    // The optional Secret volume of a pod whose Secret does not exist yet: mounted, empty.
    let secret_dir = tmp("injected-missing-secret");
    let endpoint = format!("https://127.0.0.1:{}", sink.addr.port());
    let (mut env, proxy) = injected_proxy_env(
        &[
            "--collector-tls-secret",
            "otel-client-tls",
            "--collector-endpoint",
            &endpoint,
        ],
        &secret_dir,
    );
    // Native sidecar: the app's containers start once this probe passes.
    assert_eq!(proxy["restartPolicy"], "Always", "{proxy}");
    assert_eq!(
        proxy["startupProbe"]["httpGet"]["path"], "/ready",
        "{proxy}"
    );
    for var in [
        "OTEL_EXPORTER_OTLP_CERTIFICATE",
        "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
        "OTEL_EXPORTER_OTLP_CLIENT_KEY",
    ] {
        let (_, v) = env.iter().find(|(k, _)| k == var).expect(var);
        assert!(
            v.starts_with(&secret_dir.display().to_string()),
            "{var}={v}"
        );
    }
    // What the test adds: no iptables here, so inbound traffic goes to the app by address;
    // fast batching. Listener addresses come from ProxyProcess.
    env.push(("TRACECAR_INBOUND_TARGET".into(), app.addr.to_string()));
    env.push(("OTEL_BSP_SCHEDULE_DELAY".into(), "50".into()));

    // Waits for /ready (the startupProbe's path); panics if the proxy exits.
    let proxy = ProxyProcess::spawn(&env);
    assert_eq!(
        get(&format!("http://{}/before", proxy.inbound), &[])
            .await
            .0,
        200,
        "the app is served while the Secret is missing"
    );
    assert_eq!(
        proxy.metric("tracecar_export_healthy"),
        Some(0.0),
        "{}",
        proxy.metrics()
    );
    assert!(
        wait_until(WAIT, || proxy
            .metric(r#"tracecar_spans_dropped_total{reason="tls_material"}"#)
            .is_some_and(|n| n >= 1.0))
        .await,
        "{}",
        proxy.metrics()
    );

    // The Secret is created: the kubelet fills the volume (`..data` symlink layout).
    let pair = clients.client("proxy", KeyKind::EcdsaP256Sec1);
    let _secret = SecretDir::new(secret_dir, &ca.cert_pem, &pair);
    assert_eq!(
        get(&format!("http://{}/after", proxy.inbound), &[]).await.0,
        200
    );
    assert!(
        wait_until(WAIT, || ok_path(&sink, "/after")).await,
        "span not exported over mTLS once the files appeared: {}",
        proxy.stderr()
    );
    let span = sink
        .spans()
        .into_iter()
        .find(|s| s.attr_str("url.path") == Some("/after"))
        .expect("span");
    assert_eq!(span.kind, "SERVER");
    assert_eq!(span.service_name, "shop-7d9f");
    assert!(
        wait_until(WAIT, || proxy.metric("tracecar_export_healthy")
            == Some(1.0))
        .await,
        "{}",
        proxy.metrics()
    );
}

// ---- retry hints: a collector that answers "come back in 2 s" ----

#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<ProtoAny>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ProtoAny {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RetryInfo {
    #[prost(message, optional, tag = "1")]
    retry_delay: Option<ProtoDuration>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ProtoDuration {
    #[prost(int64, tag = "1")]
    seconds: i64,
    #[prost(int32, tag = "2")]
    nanos: i32,
}

/// Every export attempt's arrival time; the first is refused with a 2 s retry hint.
#[derive(Clone, Default)]
struct Throttling {
    attempts: Arc<Mutex<Vec<Instant>>>,
}

impl Throttling {
    fn attempt(&self) -> usize {
        let mut a = self.attempts.lock().unwrap();
        a.push(Instant::now());
        a.len()
    }

    fn gap(&self) -> Option<Duration> {
        let a = self.attempts.lock().unwrap();
        (a.len() >= 2).then(|| a[1] - a[0])
    }
}

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for Throttling
{
    async fn export(
        &self,
        _request: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        use prost::Message;
        if self.attempt() == 1 {
            let info = RetryInfo {
                retry_delay: Some(ProtoDuration {
                    seconds: 2,
                    nanos: 0,
                }),
            };
            let status = RpcStatus {
                code: tonic::Code::Unavailable as i32,
                message: "busy".into(),
                details: vec![ProtoAny {
                    type_url: "type.googleapis.com/google.rpc.RetryInfo".into(),
                    value: info.encode_to_vec(),
                }],
            };
            return Err(tonic::Status::with_details(
                tonic::Code::Unavailable,
                "busy",
                Bytes::from(status.encode_to_vec()),
            ));
        }
        Ok(tonic::Response::new(Default::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_retry_info_and_http_retry_after_are_honoured() {
    let app = App::start().await;
    // gRPC: UNAVAILABLE with google.rpc.RetryInfo { retry_delay: 2s }.
    let grpc = Throttling::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = listener.local_addr().unwrap();
    let svc = opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer::new(grpc.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    // HTTP: 429 with Retry-After: 2.
    let http = Throttling::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_addr = listener.local_addr().unwrap();
    let h = http.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let h = h.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let h = h.clone();
                        async move {
                            let _ = req.into_body().collect().await;
                            let mut resp = http::Response::new(Full::new(Bytes::new()));
                            if h.attempt() == 1 {
                                *resp.status_mut() = http::StatusCode::TOO_MANY_REQUESTS;
                                resp.headers_mut().insert(
                                    http::header::RETRY_AFTER,
                                    http::HeaderValue::from_static("2"),
                                );
                            } else {
                                resp.headers_mut().insert(
                                    http::header::CONTENT_TYPE,
                                    http::HeaderValue::from_static("application/x-protobuf"),
                                );
                            }
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
            });
        }
    });
    let p1 = ProxyProcess::spawn(&env(&format!("http://{grpc_addr}"), &app, "grpc", &[], &[]));
    let p2 = ProxyProcess::spawn(&env(
        &format!("http://{http_addr}"),
        &app,
        "http/protobuf",
        &[],
        &[],
    ));
    assert_eq!(get(&format!("http://{}/g", p1.inbound), &[]).await.0, 200);
    assert_eq!(get(&format!("http://{}/h", p2.inbound), &[]).await.0, 200);
    assert!(
        wait_until(WAIT, || grpc.gap().is_some() && http.gap().is_some()).await,
        "{} {}",
        p1.stderr(),
        p2.stderr()
    );
    let (g, h) = (grpc.gap().unwrap(), http.gap().unwrap());
    eprintln!("retry after hint: grpc {g:?}, http {h:?}");
    // Our own first back-off is 100 ms; only the hint explains a 2 s wait.
    assert!(
        g >= Duration::from_millis(1900) && g < Duration::from_secs(4),
        "grpc retried after {g:?}"
    );
    assert!(
        h >= Duration::from_millis(1900) && h < Duration::from_secs(4),
        "http retried after {h:?}"
    );
    assert!(
        wait_until(WAIT, || p1.metric("tracecar_spans_exported_total")
            == Some(1.0))
        .await
    );
    assert!(
        wait_until(WAIT, || p2.metric("tracecar_spans_exported_total")
            == Some(1.0))
        .await
    );
}

// ---- rotation between two trusted pairs: which certificate do new connections present? ----

/// Wraps the WebPKI client verifier and records every client certificate it accepted.
#[derive(Debug)]
struct Recording {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl rustls::server::danger::ClientCertVerifier for Recording {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        self.seen.lock().unwrap().push(end_entity.to_vec());
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn der(pem: &str) -> Vec<u8> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .expect("a cert")
        .expect("PEM")
        .to_vec()
}

async fn rotation_between_trusted_pairs(protocol: &str) {
    let ca = Ca::new("collector-ca");
    let clients = Ca::new("client-ca");
    let server = ca.server(&[]);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der(&clients.cert_pem).into()).unwrap();
    let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let seen: Arc<Mutex<Vec<Vec<u8>>>> = Default::default();
    let verifier = Arc::new(Recording {
        inner,
        seen: seen.clone(),
    });
    let key = rustls_pemfile::private_key(&mut server.key_pem.as_bytes())
        .unwrap()
        .unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![der(&server.cert_pem).into()], key)
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let sink = Sink::start_on("127.0.0.1:0".parse().unwrap(), Some(Arc::new(cfg))).await;
    let app = App::start().await;
    let first = clients.client("proxy-a", KeyKind::EcdsaP256Pkcs8);
    let second = clients.client("proxy-b", KeyKind::Ed25519Pkcs8);
    let mut secret = SecretDir::new(
        tmp(&format!("trusted-{}", protocol.replace('/', "-"))),
        &ca.cert_pem,
        &first,
    );
    let tls = secret_tls(&secret);
    let proxy = ProxyProcess::spawn(&env(
        &format!("https://127.0.0.1:{}", sink.addr.port()),
        &app,
        protocol,
        &tls,
        &[],
    ));
    assert_eq!(
        get(&format!("http://{}/a", proxy.inbound), &[]).await.0,
        200
    );
    assert!(
        wait_until(WAIT, || ok_path(&sink, "/a")).await,
        "{}",
        proxy.stderr()
    );
    assert_eq!(seen.lock().unwrap().last(), Some(&der(&first.cert_pem)));

    // Both pairs are trusted, so nothing fails: only the rotation can move export to new
    // connections presenting the new certificate.
    secret.swap(&ca.cert_pem, &second);
    let swapped = Instant::now();
    let mut i = 0;
    let mut moved = false;
    while swapped.elapsed() < WAIT && !moved {
        i += 1;
        assert_eq!(
            get(&format!("http://{}/b/{i}", proxy.inbound), &[]).await.0,
            200
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        moved = seen.lock().unwrap().last() == Some(&der(&second.cert_pem));
    }
    assert!(
        moved,
        "export still presents the old certificate 10 s after the swap: {}",
        proxy.stderr()
    );
    let took = swapped.elapsed();
    eprintln!("{protocol}: new certificate in use {took:?} after the swap");
    assert!(wait_until(WAIT, || ok_path(&sink, &format!("/b/{i}"))).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_between_trusted_pairs_moves_new_connections_to_the_new_certificate_grpc() {
    rotation_between_trusted_pairs("grpc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_between_trusted_pairs_moves_new_connections_to_the_new_certificate_http() {
    rotation_between_trusted_pairs("http/protobuf").await;
}
