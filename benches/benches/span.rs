//! Micro-benchmarks of the proxy's per-request span work, through its library API:
//! - `server_span/*`: start the SERVER span with attributes from the headers, inject the
//!   proxy's context into the headers, record the status and end the span (into the export
//!   queue), without and with an incoming `traceparent`;
//! - `extract/*`: extract context from request headers with the configured propagators.
//!
//! Run: `cargo bench -p tracecar-benches --bench span` (about 30 s).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Method, StatusCode, Version};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry_http::HeaderExtractor;
use tracecar_proxy::config::{Config, RunArgs};
use tracecar_proxy::metrics::Metrics;
use tracecar_proxy::trace::span::RequestInfo;
use tracecar_proxy::trace::{propagate, Sink, Telemetry};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
}

/// The proxy's configuration for these flags (the rest are the proxy's defaults).
fn config(flags: &[&str]) -> Config {
    let argv = std::iter::once("tracecar-proxy").chain(flags.iter().copied());
    Cli::parse_from(argv)
        .run
        .into_config()
        .expect("benchmark flags are valid")
}

fn request_headers(traceparent: bool) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::HOST,
        HeaderValue::from_static("app.default.svc:8080"),
    );
    h.insert(
        http::header::USER_AGENT,
        HeaderValue::from_static("curl/8.5.0"),
    );
    h.insert(http::header::ACCEPT, HeaderValue::from_static("*/*"));
    if traceparent {
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        h.insert("baggage", HeaderValue::from_static("tenant=acme,region=eu"));
    }
    h
}

fn info() -> RequestInfo<'static> {
    RequestInfo {
        method: &Method::GET,
        path: "/api/v1/items",
        scheme: "http",
        version: Version::HTTP_11,
        server_address: None,
        server_port: Some(8080),
        client_address: Some("10.1.2.3"),
        host: None,
        user_agent: None,
        app_socket: None,
    }
}

fn server_span(c: &mut Criterion) {
    // The export queue drains on this runtime's worker thread, as in the proxy; the spans end up
    // in a channel that a task empties.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    rt.spawn(async move { while rx.recv().await.is_some() {} });
    let cfg = config(&[
        "--sampler",
        "always_on",
        "--bsp-schedule-delay",
        "50",
        "--bsp-max-queue-size",
        "65536",
    ]);
    let telemetry = Arc::new(
        Telemetry::new(&cfg, Sink::Channel(tx), Arc::new(Metrics::new())).expect("telemetry"),
    );
    let mut group = c.benchmark_group("server_span");
    for (name, parent) in [("root", false), ("with_traceparent", true)] {
        let template = request_headers(parent);
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut headers = template.clone();
                let mut span = telemetry.server_span(info(), &mut headers);
                span.set_status(StatusCode::OK);
                drop(span);
                black_box(headers)
            })
        });
    }
    group.finish();
    let _ = rt.block_on(telemetry.flush(Duration::from_secs(5)));
}

fn extract(c: &mut Criterion) {
    let mut group = c.benchmark_group("extract");
    for (name, formats) in [
        ("tracecontext,baggage", "tracecontext,baggage"),
        ("all_formats", "tracecontext,baggage,b3,b3multi,jaeger"),
    ] {
        let cfg = config(&["--propagators", formats]);
        let propagator = propagate::composite(&cfg.propagators);
        let headers = request_headers(true);
        group.bench_function(name, |b| {
            b.iter(|| black_box(propagator.extract(&HeaderExtractor(black_box(&headers)))))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = server_span, extract
}
criterion_main!(benches);
