//! The HTTPS shell: bad input (400, 413, non-pod reviews), admin endpoints, and serving
//! certificate reload under load.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Client, Pki};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracecar_injector::config::Defaults;
use tracecar_injector::server::MAX_BODY;

fn plain_pod() -> serde_json::Value {
    serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "n"},
        "spec": {"containers": [{"name": "app", "image": "nginx"}]}})
}

#[tokio::test]
async fn malformed_reviews_get_400_with_a_reason() {
    let (pki, _dir, s) = common::start_default().await;
    let c = Client::new(&pki);
    let mut wrong_kind = common::review(&plain_pod(), "u1");
    wrong_kind["kind"] = "ConfigMap".into();
    let mut no_request = common::review(&plain_pod(), "u2");
    no_request.as_object_mut().unwrap().remove("request");
    for (body, expect) in [
        (b"not json".to_vec(), "malformed AdmissionReview"),
        (b"{}".to_vec(), "malformed AdmissionReview"),
        (b"[1,2".to_vec(), "malformed AdmissionReview"),
        (
            serde_json::to_vec(&wrong_kind).unwrap(),
            "kind AdmissionReview",
        ),
        (serde_json::to_vec(&no_request).unwrap(), "has no request"),
    ] {
        let r = c.post(s.addr, "/inject", body.clone()).await.unwrap();
        let text = String::from_utf8_lossy(&r.body);
        assert_eq!(r.status, 400, "{}: {text}", String::from_utf8_lossy(&body));
        assert!(text.contains(expect), "{text}");
    }
    // Unknown paths and methods.
    for path in [
        "/mutate",
        "/inject/correlation",
        "/inject/correlation/bogus",
        "/inject/opt-in/correlation/",
        "/inject/correlation/inflight/x",
    ] {
        assert_eq!(
            c.post(s.addr, path, "{}").await.unwrap().status,
            404,
            "{path}"
        );
    }

    // A well-formed review of a non-pod or a pod UPDATE is allowed without a patch.
    let mut cm = common::review(
        &serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}),
        "u3",
    );
    cm["request"]["kind"]["kind"] = "ConfigMap".into();
    let mut update = common::review(&plain_pod(), "u4");
    update["request"]["operation"] = "UPDATE".into();
    for review in [cm, update] {
        let r = c
            .post(s.addr, "/inject", serde_json::to_vec(&review).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["response"]["allowed"], true);
        assert!(v["response"].get("patch").is_none(), "{v}");
    }
    let (_, metrics) = common::get(s.admin_addr, "/metrics").await;
    assert!(
        metrics.contains("tracecar_injector_bad_requests_total{reason=\"malformed\"} 5"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tracecar_injector_admissions_total{reason=\"not-pod-create\"} 2"),
        "{metrics}"
    );
    s.shutdown().await;
}

#[tokio::test]
async fn patch_is_a_base64_string_holding_a_json_patch_that_applies() {
    let (pki, _dir, s) = common::start_default().await;
    let pod = plain_pod();
    let r = Client::new(&pki)
        .post(
            s.addr,
            "/inject",
            serde_json::to_vec(&common::review(&pod, "b64")).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let resp = &v["response"];
    assert_eq!(resp["allowed"], true);
    assert_eq!(resp["patchType"], "JSONPatch");
    // The API documents `patch` as base64-encoded bytes (Go `[]byte`).
    let text = resp["patch"]
        .as_str()
        .unwrap_or_else(|| panic!("patch is not a string: {}", resp["patch"]));
    let bytes = base64::Engine::decode(&base64::prelude::BASE64_STANDARD, text)
        .unwrap_or_else(|e| panic!("patch is not base64 ({e}): {text}"));
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
    let mut doc = pod.clone();
    json_patch::patch(&mut doc, &patch).unwrap();
    assert_eq!(
        doc["metadata"]["annotations"]["tracecar.dev/status"],
        "injected"
    );
    assert_eq!(doc["spec"]["initContainers"][1]["name"], "tracecar-proxy");
    s.shutdown().await;
}

#[tokio::test]
async fn bodies_over_4_mib_get_413() {
    let (pki, _dir, s) = common::start_default().await;
    let c = Client::new(&pki);

    // With Content-Length.
    let big = vec![b' '; MAX_BODY + 1];
    let r = c.post(s.addr, "/inject", big).await.unwrap();
    assert_eq!(r.status, 413);

    // Exactly 4 MiB is read (and, being whitespace, is malformed rather than too large).
    let r = c
        .post(s.addr, "/inject", vec![b' '; MAX_BODY])
        .await
        .unwrap();
    assert_eq!(r.status, 400);

    // Chunked, no Content-Length: refused once the limit is crossed.
    let tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    let (mut rd, mut wr) = tokio::io::split(tls);
    let writer = tokio::spawn(async move {
        let head = "POST /inject HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\n\r\n";
        wr.write_all(head.as_bytes()).await?;
        let chunk = vec![b' '; 1024 * 1024];
        for _ in 0..5 {
            wr.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                .await?;
            wr.write_all(&chunk).await?;
            wr.write_all(b"\r\n").await?;
        }
        wr.write_all(b"0\r\n\r\n").await?;
        wr.flush().await?;
        std::io::Result::Ok(wr)
    });
    let mut buf = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), rd.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    let _ = writer.await;
    s.shutdown().await;
}

#[tokio::test]
async fn admin_endpoints() {
    let (_pki, _dir, s) = common::start_default().await;
    assert_eq!(common::get(s.admin_addr, "/live").await.0, 200);
    assert_eq!(common::get(s.admin_addr, "/ready").await.0, 200);
    let (status, m) = common::get(s.admin_addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        m.contains("# TYPE tracecar_injector_admissions counter"),
        "{m}"
    );
    assert!(
        m.contains("tracecar_injector_admissions_total{reason=\"injected\"} 0"),
        "{m}"
    );
    assert_eq!(common::get(s.admin_addr, "/nope").await.0, 404);
    s.state.ready.store(false, Ordering::SeqCst);
    assert_eq!(common::get(s.admin_addr, "/ready").await.0, 503);
    s.shutdown().await;
}

/// Swaps the certificate files while a client keeps sending admissions on new connections:
/// new handshakes present the new certificate, and no request fails. A bad pair is refused
/// and the current certificate stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_reload_without_dropping_requests() {
    let pki = Pki::new();
    let old = pki.leaf("old");
    let new = pki.leaf("new");
    let dir = tempfile::tempdir().unwrap();
    let s = common::start(
        dir.path(),
        &old,
        Defaults::default(),
        Duration::from_millis(100),
    )
    .await;
    let c = Client::new(&pki);
    let body = serde_json::to_vec(&common::review(&plain_pod(), "u")).unwrap();

    let first = c.post(s.addr, "/inject", body.clone()).await.unwrap();
    assert_eq!(first.peer_cert.as_ref(), Some(&old.der));

    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (c, body, ok, failed, stop, addr) = (
            c.clone(),
            body.clone(),
            ok.clone(),
            failed.clone(),
            stop.clone(),
            s.addr,
        );
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                match c.post(addr, "/inject", body.clone()).await {
                    Ok(r) if r.status == 200 => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(r) => failed.lock().unwrap().push(format!("status {}", r.status)),
                    Err(e) => failed.lock().unwrap().push(e),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    common::write_pair(dir.path(), &new);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = c.post(s.addr, "/inject", body.clone()).await.unwrap();
        if r.peer_cert.as_ref() == Some(&new.der) {
            break;
        }
        assert!(Instant::now() < deadline, "new certificate never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A key that does not match the certificate is rejected; the new cert stays.
    let other = pki.leaf("other");
    std::fs::write(dir.path().join("tls.key"), &other.key_pem).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.await.unwrap();
    }
    let after = c.post(s.addr, "/inject", body.clone()).await.unwrap();
    assert_eq!(after.status, 200);
    assert_eq!(
        after.peer_cert.as_ref(),
        Some(&new.der),
        "a bad pair must not replace the served one"
    );

    let failed = failed.lock().unwrap().clone();
    assert!(
        failed.is_empty(),
        "requests failed during reload: {failed:?}"
    );
    assert!(
        ok.load(Ordering::SeqCst) > 20,
        "too few requests to mean anything: {}",
        ok.load(Ordering::SeqCst)
    );
    let (_, m) = common::get(s.admin_addr, "/metrics").await;
    assert!(
        m.contains("tracecar_injector_tls_reloads_total{result=\"ok\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("tracecar_injector_tls_reloads_total{result=\"rejected\"}"),
        "{m}"
    );
    s.shutdown().await;
}
