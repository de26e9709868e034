//! Load driver: real AdmissionReviews over HTTPS to the real server restricted to ONE
//! worker thread (a current-thread runtime on its own OS thread), from a client on another
//! thread. Reports admission latency p50/p99 and admissions per second.
//!
//! `cargo run --release -p tracecar-injector --example admission_load -- [connections] [seconds]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use rustls::pki_types::ServerName;
use tracecar_injector::server;
use tracecar_injector::Defaults;

fn main() {
    let mut args = std::env::args().skip(1);
    let connections: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(8);
    let seconds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);

    // A CA and a serving certificate, as the cluster would provide.
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tls.crt"), leaf.pem()).unwrap();
    std::fs::write(dir.path().join("tls.key"), leaf_key.serialize_pem()).unwrap();

    // The server: one worker thread.
    let (tx, rx) = std::sync::mpsc::channel();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let running = server::start(server::Options {
                listen: "127.0.0.1:0".parse().unwrap(),
                admin_listen: "127.0.0.1:0".parse().unwrap(),
                tls_cert: cert,
                tls_key: key,
                tls_reload_interval: Duration::from_secs(2),
                shutdown_timeout: Duration::from_secs(1),
                defaults: Defaults::default(),
            })
            .await
            .unwrap();
            tx.send(running.addr).unwrap();
            std::future::pending::<()>().await;
        });
    });
    let addr = rx.recv().unwrap();

    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "web-7d9f8c6b5-", "namespace": "shop",
            "labels": {"app": "web", "pod-template-hash": "7d9f8c6b5"},
            "annotations": {"tracecar.dev/sampling-ratio": "0.5"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9f8c6b5",
                "uid": "5b1f1b9e-1b7e-4c55-9b43-5f3d3c2b1a00", "controller": true}]},
        "spec": {"containers": [{"name": "web", "image": "nginx:1.27", "ports": [{"containerPort": 8080}]}],
            "volumes": [{"name": "cfg", "configMap": {"name": "web"}}]}
    });
    let body = Bytes::from(
        serde_json::to_vec(&serde_json::json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "8d3f8b2e-0000-0000-0000-000000000000",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "shop", "operation": "CREATE",
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                "object": pod}
        }))
        .unwrap(),
    );

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));

    // The client: one thread; keep-alive connections like the API server's.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (mut lat, elapsed) = rt.block_on(async move {
        let warmup = Duration::from_secs(1);
        let start = Instant::now();
        let end = start + warmup + Duration::from_secs(seconds);
        let mut tasks = Vec::new();
        for _ in 0..connections {
            let (connector, body) = (connector.clone(), body.clone());
            tasks.push(tokio::spawn(async move {
                let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                tcp.set_nodelay(true).unwrap();
                let tls = connector
                    .connect(ServerName::try_from("localhost").unwrap(), tcp)
                    .await
                    .unwrap();
                let (mut send, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                        .await
                        .unwrap();
                tokio::spawn(conn);
                let mut lat = Vec::new();
                loop {
                    let now = Instant::now();
                    if now >= end {
                        break;
                    }
                    send.ready().await.unwrap();
                    let req = http::Request::post("/inject")
                        .header("host", "localhost")
                        .header("content-type", "application/json")
                        .body(Full::new(body.clone()))
                        .unwrap();
                    let resp = send.send_request(req).await.unwrap();
                    assert_eq!(resp.status(), 200);
                    let b = resp.into_body().collect().await.unwrap().to_bytes();
                    assert!(
                        b.windows(5).any(|w| w == b"patch"),
                        "no patch in the response"
                    );
                    if now >= start + warmup {
                        lat.push(now.elapsed());
                    }
                }
                lat
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        (all, Duration::from_secs(seconds))
    });
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!("server: 1 worker thread (current-thread runtime); client: 1 thread, {connections} keep-alive HTTPS connections, {seconds}s after 1s warm-up");
    println!("admissions: {}", lat.len());
    println!(
        "admissions/s: {:.0}",
        lat.len() as f64 / elapsed.as_secs_f64()
    );
    println!(
        "latency p50: {:?}  p99: {:?}  max: {:?}",
        pct(0.50),
        pct(0.99),
        lat[lat.len() - 1]
    );
}
