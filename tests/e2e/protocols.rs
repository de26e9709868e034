//! Protocols through the proxy: HTTP/2 and gRPC, upgrades, CONNECT, 100-continue, and large
//! streamed bodies with flat memory.

use std::io::{Read, Write};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tracecar_tests::app::App;
use tracecar_tests::sink::Sink;
use tracecar_tests::{base_env, ProxyProcess};

const WAIT: Duration = Duration::from_secs(10);

fn env(sink: &Sink, target: std::net::SocketAddr) -> Vec<(String, String)> {
    let mut e = base_env(&sink.endpoint());
    e.push(("TRACECAR_INBOUND_TARGET".into(), target.to_string()));
    e
}

/// An HTTP/2 (prior knowledge) client connection to `addr`, driven in the background.
async fn h2_client<B>(addr: std::net::SocketAddr) -> hyper::client::conn::http2::SendRequest<B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_through_the_inbound_listener() {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

    let sink = Sink::start().await;
    // The "app" is itself a gRPC server: a second receiver.
    let grpc_app = Sink::start().await;
    let proxy = ProxyProcess::spawn(&env(&sink, grpc_app.addr));
    let mut client = TraceServiceClient::connect(format!("http://{}", proxy.inbound))
        .await
        .expect("h2c connect");
    let span = Span {
        trace_id: vec![1; 16],
        span_id: vec![2; 8],
        name: "payload".into(),
        kind: 2,
        ..Default::default()
    };
    let req = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans: vec![span],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    client
        .export(req)
        .await
        .expect("gRPC call through the proxy");
    let got = grpc_app.wait_for(1, WAIT).await;
    assert_eq!(got[0].name, "payload");

    let spans = sink.wait_for(1, WAIT).await;
    let s = spans
        .iter()
        .find(|s| s.kind == "SERVER")
        .expect("server span");
    assert_eq!(s.attr_str("network.protocol.version"), Some("2"));
    assert_eq!(s.attr_str("http.request.method"), Some("POST"));
    assert_eq!(
        s.attr_str("url.path"),
        Some("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
    );
    assert_eq!(
        s.attr("http.response.status_code"),
        Some(&serde_json::json!(200))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streaming_request_and_response_with_trailers() {
    let sink = Sink::start().await;
    let app = App::start().await;
    let proxy = ProxyProcess::spawn(&env(&sink, app.addr));
    let mut sender = h2_client(proxy.inbound).await;

    // Response side: data frames then trailers.
    let req = http::Request::get("http://app/trailers")
        .body(
            Empty::<Bytes>::new()
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected
        .trailers()
        .cloned()
        .expect("trailers crossed the proxy");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-checksum"], "abc");
    assert_eq!(collected.to_bytes(), Bytes::from_static(b"part1,part2"));

    // Request side: a body streamed in chunks, counted by the app.
    let chunks =
        (0..64).map(|_| Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![7u8; 16 * 1024]))));
    let body = StreamBody::new(futures_util::stream::iter(chunks)).boxed();
    let req = http::Request::post("http://app/count").body(body).unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let n = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(n, (64 * 16 * 1024).to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_is_spliced_end_to_end() {
    let sink = Sink::start().await;
    let app = App::start().await;
    let proxy = ProxyProcess::spawn(&env(&sink, app.addr));
    let addr = proxy.inbound;
    let echoed = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(
            b"GET /upgrade HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
        )
        .unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).unwrap();
            head.push(b[0]);
        }
        let head = String::from_utf8(head).unwrap();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(
            head.to_ascii_lowercase().contains("upgrade: echo"),
            "{head}"
        );
        let mut out = Vec::new();
        for msg in [&b"hello "[..], b"over the upgraded connection"] {
            s.write_all(msg).unwrap();
            let mut buf = vec![0u8; msg.len()];
            s.read_exact(&mut buf).unwrap();
            out.extend_from_slice(&buf);
        }
        String::from_utf8(out).unwrap()
    })
    .await
    .unwrap();
    assert_eq!(echoed, "hello over the upgraded connection");
    let spans = sink.wait_for(1, WAIT).await;
    assert_eq!(
        spans[0].attr("http.response.status_code"),
        Some(&serde_json::json!(101))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tunnels_pass_through_the_outbound_listener() {
    let sink = Sink::start().await;
    let app = App::start().await;
    let proxy = ProxyProcess::spawn(&env(&sink, app.addr));
    let (outbound, app_addr) = (proxy.outbound, app.addr);
    let answer = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(outbound).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "CONNECT {app_addr} HTTP/1.1\r\nHost: {app_addr}\r\n\r\n").unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).unwrap();
            head.push(b[0]);
        }
        assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 200"));
        s.write_all(b"GET /status/204 HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut rest = String::new();
        let _ = s.read_to_string(&mut rest);
        rest
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    let spans = sink.wait_for(1, WAIT).await;
    let c = spans
        .iter()
        .find(|s| s.kind == "CLIENT")
        .expect("CONNECT span");
    assert_eq!(c.name, "CONNECT");
    assert_eq!(
        c.attr("server.port"),
        Some(&serde_json::json!(app.addr.port()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue() {
    let sink = Sink::start().await;
    let app = App::start().await;
    let proxy = ProxyProcess::spawn(&env(&sink, app.addr));
    let addr = proxy.inbound;
    let answer = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"POST /count HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 25];
        s.read_exact(&mut buf).unwrap();
        assert!(buf.starts_with(b"HTTP/1.1 100 Continue"), "{}", String::from_utf8_lossy(&buf));
        s.write_all(b"hello").unwrap();
        let mut rest = String::new();
        let _ = s.read_to_string(&mut rest);
        rest
    })
    .await
    .unwrap();
    assert!(
        answer.contains("200 OK") && answer.ends_with('5'),
        "{answer:?}"
    );
}

/// 100 MiB down and 100 MiB up through the proxy, chunked; the proxy's memory must stay flat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_with_flat_memory() {
    const SIZE: u64 = 100 * 1024 * 1024;
    let sink = Sink::start().await;
    let app = App::start().await;
    let proxy = ProxyProcess::spawn(&env(&sink, app.addr));
    // Warm up so the baseline includes the runtime's and pool's steady state.
    tracecar_tests::app::get(&format!("http://{}/warm", proxy.inbound), &[]).await;
    let before = proxy.rss_kib();

    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Empty<Bytes>>();
    let resp = client
        .get(
            format!("http://{}/stream/{SIZE}", proxy.inbound)
                .parse()
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = 0u64;
    while let Some(frame) = body.frame().await {
        got += frame
            .unwrap()
            .data_ref()
            .map(|d| d.len() as u64)
            .unwrap_or(0);
    }
    assert_eq!(got, SIZE);

    let chunk = Bytes::from(vec![1u8; 256 * 1024]);
    let n = SIZE / chunk.len() as u64;
    let chunks = futures_util::stream::iter(
        (0..n).map(move |_| Ok::<_, std::io::Error>(Frame::data(chunk.clone()))),
    );
    let up = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<StreamBody<futures_util::stream::Iter<_>>>();
    let req = http::Request::post(format!("http://{}/count", proxy.inbound))
        .body(StreamBody::new(chunks))
        .unwrap();
    let resp = up.request(req).await.unwrap();
    let counted = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(counted, SIZE.to_string());

    let peak = proxy.peak_rss_kib();
    eprintln!("proxy RSS before {before} KiB, peak after 2 x 100 MiB {peak} KiB");
    assert!(
        peak < before + 32 * 1024,
        "memory grew with the body: {before} KiB -> peak {peak} KiB"
    );
}

/// The hyper path (here HTTP/2) classifies a failed connect like the lean path does: from the
/// I/O error, not from its text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_to_a_dead_app_is_a_502_with_connection_refused() {
    let sink = Sink::start().await;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], tracecar_tests::free_port()));
    let proxy = ProxyProcess::spawn(&env(&sink, addr));
    let mut sender = h2_client(proxy.inbound).await;
    let req = http::Request::get("http://app/x")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["x-tracecar-error"], "1");
    let spans = sink.wait_for(1, WAIT).await;
    let server = spans
        .iter()
        .find(|s| s.kind == "SERVER")
        .expect("a SERVER span");
    assert_eq!(server.attr_str("error.type"), Some("connection_refused"));
    assert_eq!(server.attr_str("network.protocol.version"), Some("2"));
}
