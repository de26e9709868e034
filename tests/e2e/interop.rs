//! Propagation interop with an independent implementation: apps instrumented with the
//! OpenTelemetry Python SDK on both sides of the proxy, in every format the proxy speaks.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use tracecar_tests::sink::Sink;
use tracecar_tests::{base_env, free_port, python_with_otel, ProxyProcess};

fn peer_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("interop/peer.py")
}

struct PyServer(std::process::Child);

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn round_trip(python: &str, propagator: &str) {
    let sink = Sink::start().await;
    let port = free_port();
    let out = std::env::temp_dir().join(format!(
        "tracecar-interop-{}-{propagator}.jsonl",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&out);
    let mut child = Command::new(python)
        .arg(peer_script())
        .args(["server", &port.to_string(), propagator])
        .arg(&out)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python server");
    let mut ready = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut ready)
        .expect("ready line");
    assert_eq!(ready.trim(), "ready");
    let _server = PyServer(child);

    let mut env = base_env(&sink.endpoint());
    env.push(("OTEL_PROPAGATORS".into(), propagator.into()));
    env.push((
        "TRACECAR_INBOUND_TARGET".into(),
        format!("127.0.0.1:{port}"),
    ));
    let proxy = ProxyProcess::spawn(&env);

    let client = Command::new(python)
        .arg(peer_script())
        .args([
            "client",
            &format!("http://{}/interop", proxy.inbound),
            propagator,
        ])
        .output()
        .expect("python client");
    assert!(
        client.status.success(),
        "{}",
        String::from_utf8_lossy(&client.stderr)
    );
    let client_span: serde_json::Value =
        serde_json::from_slice(&client.stdout).expect("client ids");

    let spans = sink.wait_for(1, Duration::from_secs(10)).await;
    let proxy_span = spans
        .iter()
        .find(|s| s.kind == "SERVER")
        .expect("proxy SERVER span");
    assert_eq!(
        proxy_span.trace_id, client_span["trace_id"],
        "{propagator}: same trace as the Python client"
    );
    assert_eq!(
        proxy_span.parent_span_id, client_span["span_id"],
        "{propagator}: child of the Python client span"
    );

    let line = std::fs::read_to_string(&out).expect("python server record");
    let server_span: serde_json::Value =
        serde_json::from_str(line.lines().next().expect("one request")).unwrap();
    assert_eq!(
        server_span["trace_id"],
        proxy_span.trace_id.as_str(),
        "{propagator}: server continues the trace"
    );
    assert_eq!(
        server_span["parent_span_id"],
        proxy_span.span_id.as_str(),
        "{propagator}: the Python server's parent is the proxy's span"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_peers_in_every_format() {
    let Some(python) = python_with_otel() else {
        return;
    };
    for propagator in ["tracecontext", "b3", "b3multi", "jaeger"] {
        round_trip(&python, propagator).await;
    }
}
