//! The proxy binary end to end: spans received by a real OTLP receiver, headers seen by a real
//! upstream app, behaviour a user sees.

use std::time::Duration;

use tracecar_tests::app::{get, App};
use tracecar_tests::sink::{RecvSpan, Sink};
use tracecar_tests::{base_env, raw_exchange, wait_until, ProxyProcess};

const WAIT: Duration = Duration::from_secs(10);

fn env(sink: &Sink, app: &App, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut e = base_env(&sink.endpoint());
    e.push(("TRACECAR_INBOUND_TARGET".into(), app.addr.to_string()));
    for (k, v) in extra {
        e.retain(|(ek, _)| ek != k);
        e.push((k.to_string(), v.to_string()));
    }
    e
}

fn only<'a>(spans: &'a [RecvSpan], kind: &str) -> &'a RecvSpan {
    let v: Vec<_> = spans.iter().filter(|s| s.kind == kind).collect();
    assert_eq!(v.len(), 1, "expected one {kind} span, got {spans:#?}");
    v[0]
}

/// traceparent's parent-id field.
fn parent_of(traceparent: &str) -> (&str, &str, &str) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    (parts[1], parts[2], parts[3])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_request_makes_a_server_span_that_continues_the_caller() {
    let sink = Sink::start().await;
    let app = App::start().await;
    let mut e = env(&sink, &app, &[]);
    e.push(("TRACECAR_POD_NAME".into(), "web-7d9f-abcde".into()));
    e.push(("TRACECAR_POD_NAMESPACE".into(), "shop".into()));
    e.push((
        "OTEL_RESOURCE_ATTRIBUTES".into(),
        "k8s.deployment.name=web,team=checkout".into(),
    ));
    let proxy = ProxyProcess::spawn(&e);

    let caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let (status, _, _) = get(
        &format!("http://{}/orders/42?card=4111", proxy.inbound),
        &[
            ("traceparent", caller),
            ("tracestate", "vendor=abc"),
            ("baggage", "user=alice"),
            ("user-agent", "curl/8"),
        ],
    )
    .await;
    assert_eq!(status, 200);

    let spans = sink.wait_for(1, WAIT).await;
    let s = only(&spans, "SERVER");
    assert_eq!(s.trace_id, "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(s.parent_span_id, "b7ad6b7169203331");
    assert_eq!(s.name, "GET");
    assert_eq!(s.attr_str("http.request.method"), Some("GET"));
    assert_eq!(s.attr_str("url.path"), Some("/orders/42"));
    assert_eq!(s.attr_str("url.scheme"), Some("http"));
    assert_eq!(
        s.attr("http.response.status_code"),
        Some(&serde_json::json!(200))
    );
    assert_eq!(s.attr_str("server.address"), Some("127.0.0.1"));
    assert_eq!(
        s.attr("server.port"),
        Some(&serde_json::json!(proxy.inbound.port()))
    );
    assert_eq!(s.attr_str("client.address"), Some("127.0.0.1"));
    assert_eq!(s.attr_str("network.protocol.version"), Some("1.1"));
    assert_eq!(s.attr_str("user_agent.original"), Some("curl/8"));
    assert!(
        !serde_json::to_string(&s.attributes)
            .unwrap()
            .contains("4111"),
        "query string leaked"
    );
    assert_eq!(s.status, "UNSET");
    assert_eq!(s.service_name, "test-svc");
    assert_eq!(
        s.resource.get("k8s.pod.name"),
        Some(&serde_json::json!("web-7d9f-abcde"))
    );
    assert_eq!(
        s.resource.get("k8s.namespace.name"),
        Some(&serde_json::json!("shop"))
    );
    assert_eq!(
        s.resource.get("k8s.deployment.name"),
        Some(&serde_json::json!("web"))
    );

    // The app sees the proxy's span as parent; tracestate and baggage pass through.
    let seen = app.last("/orders").expect("app got the request");
    assert_eq!(seen.query, "card=4111", "the query reaches the app");
    let tp = seen.headers["traceparent"].to_str().unwrap();
    let (trace, parent, flags) = parent_of(tp);
    assert_eq!(trace, s.trace_id);
    assert_eq!(parent, s.span_id);
    assert_eq!(flags, "01");
    assert_eq!(seen.headers["tracestate"], "vendor=abc");
    assert_eq!(seen.headers["baggage"], "user=alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_forward_proxy_makes_a_client_span() {
    let sink = Sink::start().await;
    let app = App::start().await;
    let proxy = ProxyProcess::spawn(&env(&sink, &app, &[]));
    let (status, body) = tracecar_tests::app::get_via_proxy(
        &proxy.outbound.to_string(),
        &format!("http://{}/api/items?x=1", app.addr),
    )
    .await
    .expect("call through outbound");
    assert_eq!(status, 200, "{body:?}");
    let spans = sink.wait_for(1, WAIT).await;
    let c = only(&spans, "CLIENT");
    assert_eq!(
        c.parent_span_id, "",
        "no context and nothing in flight: a root span"
    );
    assert_eq!(c.attr_str("url.path"), Some("/api/items"));
    assert_eq!(c.attr_str("server.address"), Some("127.0.0.1"));
    assert_eq!(
        c.attr("server.port"),
        Some(&serde_json::json!(app.addr.port()))
    );
    let seen = app.last("/api/items").unwrap();
    let (trace, parent, _) = parent_of(seen.headers["traceparent"].to_str().unwrap());
    assert_eq!((trace, parent), (c.trace_id.as_str(), c.span_id.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_of_an_app_that_forwards_no_headers_join_the_inbound_trace() {
    let sink = Sink::start().await;
    let app = App::start().await;
    let backend = App::start().await;
    let proxy = ProxyProcess::spawn(&env(&sink, &app, &[]));
    // The app serves /call by calling the backend through the proxy, without trace headers.
    let url = format!(
        "http://{}/call?via={}&to={}&path=/stock",
        proxy.inbound, proxy.outbound, backend.addr
    );
    let (status, _, _) = get(&url, &[]).await;
    assert_eq!(status, 200);
    let spans = sink.wait_for(2, WAIT).await;
    let server = only(&spans, "SERVER");
    let client = only(&spans, "CLIENT");
    assert_eq!(client.trace_id, server.trace_id);
    assert_eq!(client.parent_span_id, server.span_id);
    // One request in flight: the parent is certain.
    assert_eq!(client.attr_str("tracecar.correlation"), Some("sole"));
    let seen = backend.last("/stock").unwrap();
    assert_eq!(
        parent_of(seen.headers["traceparent"].to_str().unwrap()).1,
        client.span_id
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn correlation_off_leaves_such_calls_as_separate_traces() {
    let sink = Sink::start().await;
    let app = App::start().await;
    let backend = App::start().await;
    let proxy = ProxyProcess::spawn(&env(&sink, &app, &[("TRACECAR_CORRELATION", "off")]));
    let url = format!(
        "http://{}/call?via={}&to={}&path=/stock",
        proxy.inbound, proxy.outbound, backend.addr
    );
    assert_eq!(get(&url, &[]).await.0, 200);
    let spans = sink.wait_for(2, WAIT).await;
    assert_ne!(
        only(&spans, "CLIENT").trace_id,
        only(&spans, "SERVER").trace_id
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_rules_and_upstream_down() {
    let sink = Sink::start().await;
    let app = App::start().await;
    let proxy = ProxyProcess::spawn(&env(&sink, &app, &[]));
    assert_eq!(
        get(&format!("http://{}/status/404", proxy.inbound), &[])
            .await
            .0,
        404
    );
    assert_eq!(
        get(&format!("http://{}/status/503", proxy.inbound), &[])
            .await
            .0,
        503
    );
    let out = proxy.outbound.to_string();
    let (s, _) =
        tracecar_tests::app::get_via_proxy(&out, &format!("http://{}/status/404", app.addr))
            .await
            .unwrap();
    assert_eq!(s, 404);
    let spans = sink.wait_for(3, WAIT).await;
    let by = |kind: &str, code: i64| {
        spans
            .iter()
            .find(|s| {
                s.kind == kind
                    && s.attr("http.response.status_code") == Some(&serde_json::json!(code))
            })
            .unwrap_or_else(|| panic!("no {kind} {code} in {spans:#?}"))
            .clone()
    };
    assert_eq!(
        by("SERVER", 404).status,
        "UNSET",
        "4xx is not a server error"
    );
    let s503 = by("SERVER", 503);
    assert_eq!(
        (s503.status.as_str(), s503.attr_str("error.type")),
        ("ERROR", Some("503"))
    );
    assert_eq!(by("CLIENT", 404).status, "ERROR", "4xx is a client error");

    // The app goes away: the caller gets 502 and the span says why.
    sink.clear();
    let dead = tracecar_tests::free_port();
    let proxy2 = ProxyProcess::spawn(&{
        let mut e = env(&sink, &app, &[]);
        e.retain(|(k, _)| k != "TRACECAR_INBOUND_TARGET");
        e.push((
            "TRACECAR_INBOUND_TARGET".into(),
            format!("127.0.0.1:{dead}"),
        ));
        e
    });
    let (status, headers, _) = get(&format!("http://{}/x", proxy2.inbound), &[]).await;
    assert_eq!(status, 502);
    assert_eq!(headers["x-tracecar-error"], "1");
    let spans = sink.wait_for(1, WAIT).await;
    let s = only(&spans, "SERVER");
    assert_eq!(s.attr_str("error.type"), Some("connection_refused"));
    assert_eq!(s.status, "ERROR");
    assert_eq!(
        proxy2.metric(r#"tracecar_requests_total{direction="inbound",status_class="5xx"}"#),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400_are_counted_and_harm_nothing() {
    let sink = Sink::start().await;
    let app = App::start().await;
    let proxy = ProxyProcess::spawn(&env(&sink, &app, &[]));
    let answer = raw_exchange(
        proxy.inbound,
        b"GET /\x01\x02 HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n",
    )
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    let answer = raw_exchange(proxy.inbound, b"\x16\x03\x01garbage-not-http\r\n\r\n").unwrap();
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "{answer:?}"
    );
    // Forward proxy request naming no destination.
    let answer = raw_exchange(proxy.outbound, b"GET /x HTTP/1.1\r\n\r\n").unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    // A forward-proxy request addressed to the proxy itself is refused, not looped.
    let own = proxy.outbound.port();
    let looped = format!("GET http://localhost:{own}/x HTTP/1.1\r\nHost: localhost:{own}\r\n\r\n");
    let answer = raw_exchange(proxy.outbound, looped.as_bytes()).unwrap();
    assert!(answer.starts_with("HTTP/1.1 508"), "{answer:?}");
    assert!(
        proxy
            .metric(r#"tracecar_malformed_requests_total{direction="inbound"}"#)
            .unwrap_or(0.0)
            >= 1.0
    );
    // The loop is counted as a loop, not as malformed.
    assert_eq!(
        proxy.metric(r#"tracecar_malformed_requests_total{direction="outbound"}"#),
        Some(1.0)
    );
    assert_eq!(
        proxy.metric(r#"tracecar_loops_detected_total{direction="outbound"}"#),
        Some(1.0)
    );
    assert_eq!(
        get(&format!("http://{}/ok", proxy.inbound), &[]).await.0,
        200,
        "still serving"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsampled_requests_propagate_with_the_flag_off_and_export_nothing() {
    let sink = Sink::start().await;
    let app = App::start().await;
    let proxy = ProxyProcess::spawn(&env(&sink, &app, &[]));
    let caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    assert_eq!(
        get(
            &format!("http://{}/u", proxy.inbound),
            &[("traceparent", caller)]
        )
        .await
        .0,
        200
    );
    let tp = app.last("/u").unwrap().headers["traceparent"]
        .to_str()
        .unwrap()
        .to_string();
    let (trace, parent, flags) = parent_of(&tp);
    assert_eq!(trace, "0af7651916cd43dd8448eb211c80319c");
    assert_ne!(parent, "b7ad6b7169203331", "the proxy's own span id");
    assert_eq!(flags, "00");
    // A sampled request afterwards arrives; the unsampled one never does.
    assert_eq!(
        get(&format!("http://{}/s", proxy.inbound), &[]).await.0,
        200
    );
    let spans = sink.wait_for(1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let spans2 = sink.spans();
    assert_eq!(spans2.len(), 1, "{spans:#?}");
    assert_eq!(spans2[0].attr_str("url.path"), Some("/s"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratio_sampler_zero_still_propagates() {
    let sink = Sink::start().await;
    let app = App::start().await;
    let proxy = ProxyProcess::spawn(&env(
        &sink,
        &app,
        &[
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0"),
        ],
    ));
    assert_eq!(
        get(&format!("http://{}/r", proxy.inbound), &[]).await.0,
        200
    );
    let tp = app.last("/r").unwrap().headers["traceparent"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(parent_of(&tp).2, "00");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(sink.spans().is_empty());
    assert_eq!(proxy.metric("tracecar_spans_exported_total"), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b3_and_jaeger_in_and_every_format_out() {
    let sink = Sink::start().await;
    let app = App::start().await;
    let proxy = ProxyProcess::spawn(&env(
        &sink,
        &app,
        &[("OTEL_PROPAGATORS", "tracecontext,b3,b3multi,jaeger")],
    ));
    let b3 = "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1";
    assert_eq!(
        get(&format!("http://{}/b3", proxy.inbound), &[("b3", b3)])
            .await
            .0,
        200
    );
    let jaeger = "a3ce929d0e0e47364bf92f3577b34da6:00f067aa0ba902b7:0:1";
    assert_eq!(
        get(
            &format!("http://{}/jaeger", proxy.inbound),
            &[("uber-trace-id", jaeger)]
        )
        .await
        .0,
        200
    );
    let spans = sink.wait_for(2, WAIT).await;
    let s_b3 = spans
        .iter()
        .find(|s| s.attr_str("url.path") == Some("/b3"))
        .unwrap();
    assert_eq!(s_b3.trace_id, "80f198ee56343ba864fe8b2a57d3eff7");
    assert_eq!(s_b3.parent_span_id, "e457b5a2e4d86bd1");
    let h = app.last("/b3").unwrap().headers;
    assert_eq!(
        parent_of(h["traceparent"].to_str().unwrap()).1,
        s_b3.span_id
    );
    assert!(h["b3"].to_str().unwrap().contains(&s_b3.span_id));
    assert_eq!(h["x-b3-spanid"].to_str().unwrap(), s_b3.span_id);
    assert!(h["uber-trace-id"].to_str().unwrap().contains(&s_b3.span_id));
    let s_j = spans
        .iter()
        .find(|s| s.attr_str("url.path") == Some("/jaeger"))
        .unwrap();
    assert_eq!(s_j.trace_id, "a3ce929d0e0e47364bf92f3577b34da6");
    assert_eq!(s_j.parent_span_id, "00f067aa0ba902b7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_protobuf_export_works() {
    let sink = Sink::start().await;
    let app = App::start().await;
    let proxy = ProxyProcess::spawn(&env(
        &sink,
        &app,
        &[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")],
    ));
    assert_eq!(
        get(&format!("http://{}/hp", proxy.inbound), &[]).await.0,
        200
    );
    let spans = sink.wait_for(1, WAIT).await;
    assert_eq!(only(&spans, "SERVER").attr_str("url.path"), Some("/hp"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_exporter_prints_json_lines() {
    let sink = Sink::start().await;
    let app = App::start().await;
    let mut proxy = ProxyProcess::spawn(&env(&sink, &app, &[("OTEL_TRACES_EXPORTER", "console")]));
    assert_eq!(
        get(&format!("http://{}/console", proxy.inbound), &[])
            .await
            .0,
        200
    );
    assert!(proxy.terminate(WAIT).success());
    let out = proxy.stdout();
    let line = out
        .lines()
        .find(|l| l.contains("/console"))
        .unwrap_or_else(|| panic!("stdout: {out}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["kind"], "SERVER");
    assert_eq!(v["attributes"]["url.path"], "/console");
    assert_eq!(v["service_name"], "test-svc");
    assert_eq!(v["trace_id"].as_str().unwrap().len(), 32);
    assert!(sink.spans().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_flushes_spans() {
    let sink = Sink::start().await;
    let app = App::start().await;
    let mut proxy = ProxyProcess::spawn(&env(&sink, &app, &[("OTEL_BSP_SCHEDULE_DELAY", "60000")]));
    let url = format!("http://{}/slow/600", proxy.inbound);
    let slow = tokio::spawn(async move { get(&url, &[]).await.0 });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let status = tokio::task::block_in_place(|| proxy.terminate(WAIT));
    assert!(status.success(), "exit {status}");
    assert_eq!(slow.await.unwrap(), 200, "the in-flight request finished");
    // Export was scheduled a minute away: only the shutdown flush can have sent it.
    let spans = sink.wait_for(1, Duration::from_secs(2)).await;
    assert_eq!(
        only(&spans, "SERVER").attr_str("url.path"),
        Some("/slow/600")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_down_never_touches_app_traffic() {
    let app = App::start().await;
    // A collector that closes every connection at once. Its port stays taken for the whole
    // test: a port merely freed could be given to another test's sink, which would then
    // receive these spans.
    let refuser = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", refuser.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in refuser.incoming() {
            drop(conn);
        }
    });
    let mut e = base_env(&dead);
    e.push(("TRACECAR_INBOUND_TARGET".into(), app.addr.to_string()));
    e.push(("OTEL_BSP_MAX_QUEUE_SIZE".into(), "16".into()));
    e.push(("OTEL_BSP_MAX_EXPORT_BATCH_SIZE".into(), "4".into()));
    let proxy = ProxyProcess::spawn(&e);
    for i in 0..200 {
        let (status, _, _) = get(&format!("http://{}/n/{i}", proxy.inbound), &[]).await;
        assert_eq!(status, 200);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        proxy.metric("tracecar_export_errors_total").unwrap_or(0.0) >= 1.0,
        "{}",
        proxy.metrics()
    );
    assert_eq!(proxy.metric("tracecar_export_healthy"), Some(0.0));
    let dropped = proxy
        .metric(r#"tracecar_spans_dropped_total{reason="queue_full"}"#)
        .unwrap_or(0.0);
    assert!(
        dropped > 0.0,
        "a 16-span queue overflows with 200 requests: {}",
        proxy.metrics()
    );
    let (status, _) = tracecar_tests::http_get_blocking(proxy.admin, "/ready").unwrap();
    assert_eq!(status, 200, "ready during a collector outage");
}

#[test]
fn invalid_settings_stop_start_up_with_one_clear_line() {
    for (var, value, expect) in [
        ("TRACECAR_CORRELATION", "maybe", "causal, inflight or off"),
        ("OTEL_TRACES_SAMPLER", "sometimes", "always_on"),
        (
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            "carrier-pigeon",
            "grpc or http/protobuf",
        ),
        (
            "TRACECAR_INBOUND_LISTEN",
            "everywhere",
            "IP address and port",
        ),
        ("OTEL_PROPAGATORS", "xray", "tracecontext"),
    ] {
        let out = std::process::Command::new(tracecar_tests::proxy_bin())
            .arg("run")
            .env(var, value)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{var}");
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{err}");
        assert!(
            lines[0].contains(var) && lines[0].contains(value) && lines[0].contains(expect),
            "{err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints() {
    let sink = Sink::start().await;
    let app = App::start().await;
    let proxy = ProxyProcess::spawn(&env(&sink, &app, &[]));
    assert_eq!(
        tracecar_tests::http_get_blocking(proxy.admin, "/live")
            .unwrap()
            .0,
        200
    );
    assert_eq!(
        tracecar_tests::http_get_blocking(proxy.admin, "/ready")
            .unwrap()
            .0,
        200
    );
    for i in 0..3 {
        get(&format!("http://{}/m/{i}", proxy.inbound), &[]).await;
    }
    sink.wait_for(3, WAIT).await;
    let m = proxy.metrics();
    assert_eq!(
        proxy.metric(r#"tracecar_requests_total{direction="inbound",status_class="2xx"}"#),
        Some(3.0),
        "{m}"
    );
    assert!(
        m.contains("tracecar_request_duration_seconds_bucket"),
        "{m}"
    );
    assert!(proxy.metric("tracecar_spans_started_total").unwrap() >= 3.0);
    // The counter moves when the export call returns, just after the sink has the spans.
    let mut exported = None;
    for _ in 0..50 {
        exported = proxy.metric("tracecar_spans_exported_total");
        if exported == Some(3.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(exported, Some(3.0), "{m}");
    assert!(m.contains("tracecar_open_connections"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_headers_reach_the_collector_over_both_protocols() {
    for protocol in ["grpc", "http/protobuf"] {
        let sink = Sink::start().await;
        let app = App::start().await;
        let proxy = ProxyProcess::spawn(&env(
            &sink,
            &app,
            &[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol),
                (
                    "OTEL_EXPORTER_OTLP_HEADERS",
                    "api-key=s3cret,x-tenant=team%20a",
                ),
            ],
        ));
        assert_eq!(
            get(&format!("http://{}/h", proxy.inbound), &[]).await.0,
            200
        );
        sink.wait_for(1, WAIT).await;
        let h = sink.last_headers().expect("an export request");
        assert_eq!(h["api-key"], "s3cret", "{protocol}");
        assert_eq!(h["x-tenant"], "team a", "{protocol}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_pooled() {
    let sink = Sink::start().await;
    let app = App::start().await;
    // One worker: each worker has its own pool, and the kernel picks the worker per connection.
    let proxy = ProxyProcess::spawn(&env(&sink, &app, &[("TRACECAR_WORKER_THREADS", "1")]));
    for i in 0..20 {
        // A new client connection each time: only the proxy's side can reuse anything.
        let answer = raw_exchange(
            proxy.inbound,
            format!("GET /p/{i} HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    }
    assert_eq!(app.seen().len(), 20);
    // One connection, give or take a race with the pool taking the connection back.
    assert!(
        app.connections() <= 2,
        "20 requests took {} upstream connections",
        app.connections()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_probes_are_proxied_but_not_traced_unless_asked() {
    for (trace_probes, expected_spans) in [("false", 1), ("true", 2)] {
        let sink = Sink::start().await;
        let app = App::start().await;
        let proxy = ProxyProcess::spawn(&env(
            &sink,
            &app,
            &[("TRACECAR_TRACE_PROBES", trace_probes)],
        ));
        let probe = get(
            &format!("http://{}/healthz", proxy.inbound),
            &[("user-agent", "kube-probe/1.33")],
        )
        .await;
        assert_eq!(probe.0, 200, "the probe still reaches the app");
        assert_eq!(
            get(&format!("http://{}/work", proxy.inbound), &[]).await.0,
            200
        );
        let spans = sink.wait_for(expected_spans, WAIT).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let paths: Vec<_> = sink
            .spans()
            .iter()
            .filter_map(|s| s.attr_str("url.path").map(String::from))
            .collect();
        assert_eq!(
            paths.len(),
            expected_spans,
            "TRACECAR_TRACE_PROBES={trace_probes}: {spans:#?}"
        );
        assert!(paths.contains(&"/work".to_string()));
        assert_eq!(
            proxy.metric(r#"tracecar_requests_total{direction="inbound",status_class="2xx"}"#),
            Some(2.0),
            "probes are counted either way"
        );
    }
}

/// `TRACECAR_WORKER_THREADS=3`: three single-threaded workers share the listeners
/// (SO_REUSEPORT); every connection is served whichever worker the kernel picks, each request is
/// traced once, and SIGTERM drains all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_workers_share_the_listeners() {
    let sink = Sink::start().await;
    let app = App::start().await;
    let mut proxy = ProxyProcess::spawn(&env(&sink, &app, &[("TRACECAR_WORKER_THREADS", "3")]));
    let names: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", proxy.pid()))
        .expect("task list")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .collect();
    for worker in ["tracecar-w1", "tracecar-w2"] {
        assert!(names.iter().any(|n| n == worker), "{worker} in {names:?}");
    }
    // New connections from many source ports, so the kernel's hash spreads them.
    let inbound = proxy.inbound;
    let answers = tokio::task::spawn_blocking(move || {
        (0..40)
            .map(|i| {
                raw_exchange(
                    inbound,
                    format!("GET /w/{i} HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .unwrap_or_default()
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for a in &answers {
        assert!(a.starts_with("HTTP/1.1 200"), "{a:?}");
    }
    let url = format!("http://{}/slow/400", proxy.inbound);
    let slow = tokio::spawn(async move { get(&url, &[]).await.0 });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let status = tokio::task::block_in_place(|| proxy.terminate(WAIT));
    assert!(status.success(), "exit {status}");
    assert_eq!(slow.await.unwrap(), 200, "the in-flight request finished");
    let spans = sink.wait_for(41, WAIT).await;
    assert_eq!(spans.iter().filter(|s| s.kind == "SERVER").count(), 41);
}

/// Reads until a response head has arrived (or 5 s passed, or the peer closed).
async fn answer(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&got).into_owned()
}

/// With its file descriptors used up by idle clients, the proxy keeps serving the connections it
/// has, says so once in its log, counts the failed accepts, and serves new connections again
/// once the idle ones go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_sheds_and_recovers() {
    let sink = Sink::start().await;
    let app = App::start().await;
    let mut e = env(&sink, &app, &[]);
    e.push(("TRACECAR_WORKER_THREADS".into(), "1".into()));
    let proxy = ProxyProcess::spawn_limited(&e, Some(64));
    // A keep-alive connection with its app connection already open.
    let mut kept = tokio::net::TcpStream::connect(proxy.inbound).await.unwrap();
    let ask = |path: &str| format!("GET {path} HTTP/1.1\r\nhost: app\r\n\r\n");
    use tokio::io::AsyncWriteExt;
    kept.write_all(ask("/ok").as_bytes()).await.unwrap();
    assert!(answer(&mut kept).await.starts_with("HTTP/1.1 200"));

    // Idle clients until accepting fails: the proxy sheds what it cannot accept (the client
    // sees its connection end at once rather than hang).
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(tokio::net::TcpStream::connect(proxy.inbound).await.unwrap());
    }
    let mut probe = tokio::net::TcpStream::connect(proxy.inbound).await.unwrap();
    let _ = probe.write_all(ask("/ok").as_bytes()).await;
    let asked = std::time::Instant::now();
    let shed = answer(&mut probe).await;
    assert_eq!(
        shed, "",
        "a connection beyond the descriptors is closed unanswered"
    );
    // (answer waits up to 5 s for a connection left hanging)
    assert!(
        asked.elapsed() < Duration::from_secs(4),
        "closed at once, not left in the backlog: {:?}",
        asked.elapsed()
    );
    // The connection it has is still served meanwhile.
    kept.write_all(ask("/ok").as_bytes()).await.unwrap();
    assert!(answer(&mut kept).await.starts_with("HTTP/1.1 200"));

    drop(idle);
    // Served again once the idle clients have gone.
    let recovered = wait_until(WAIT, || {
        std::net::TcpStream::connect(proxy.inbound)
            .and_then(|mut s| {
                use std::io::{Read, Write};
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                s.write_all(b"GET /ok HTTP/1.1\r\nhost: app\r\nconnection: close\r\n\r\n")?;
                let mut got = String::new();
                s.read_to_string(&mut got)?;
                Ok(got.starts_with("HTTP/1.1 200"))
            })
            .unwrap_or(false)
    })
    .await;
    assert!(recovered, "{}", proxy.stderr());
    assert!(
        proxy
            .metric(r#"tracecar_accept_errors_total{direction="inbound"}"#)
            .unwrap_or(0.0)
            >= 1.0,
        "{}",
        proxy.metrics()
    );
    assert!(
        proxy
            .metric(r#"tracecar_connections_shed_total{direction="inbound"}"#)
            .unwrap_or(0.0)
            >= 1.0,
        "{}",
        proxy.metrics()
    );
    let warnings = proxy.stderr().matches("accept failed").count();
    assert_eq!(warnings, 1, "one log line per episode: {}", proxy.stderr());
}
