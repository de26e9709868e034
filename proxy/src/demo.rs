//! `tracecar-proxy demo`: two uninstrumented services, each behind its own proxy, on loopback.
//!
//! `shop` serves `/checkout/{id}` and calls `inventory` through its proxy's outbound listener
//! (as an app with `HTTP_PROXY` set would), without forwarding any trace header. The proxies
//! still produce one connected trace per checkout: the shop proxy ties the outbound call to the
//! inbound request in flight, and propagates context to the inventory proxy. The spans are then
//! printed as trees with timings.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use clap::Args;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_sdk::trace::SpanData;

use crate::trace::export::SpanRecord;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::config::{Config, RunArgs};
use crate::trace::console::kind_str;
use crate::trace::Sink;
use crate::Proxy;

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Checkout requests to send.
    #[arg(long, default_value_t = 3)]
    pub requests: u32,
    /// `console` prints the traces here; `otlp` sends them to the collector named by the
    /// OTEL_EXPORTER_OTLP_* variables instead.
    #[arg(long, default_value = "console")]
    pub exporter: String,
}

/// Starts a plain HTTP/1 server on an ephemeral loopback port.
async fn serve_app<F, Fut>(handler: F) -> anyhow::Result<SocketAddr>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let fut = handler(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

/// An HTTP/1 GET sent to `via` with `uri` as the request target: absolute-form makes it a
/// forward-proxy request, which is all `HTTP_PROXY` does for an app.
async fn get(via: SocketAddr, uri: &str) -> anyhow::Result<(StatusCode, Bytes)> {
    let stream = TcpStream::connect(via).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let host = uri
        .parse::<http::Uri>()?
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let req = Request::get(uri)
        .header(http::header::HOST, host)
        .header("user-agent", "demo-app/1.0")
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    Ok((status, resp.into_body().collect().await?.to_bytes()))
}

fn proxy_config(service: &str, inbound_target: SocketAddr) -> anyhow::Result<Config> {
    // Start from the real defaults (and the OTEL_EXPORTER_OTLP_* variables, for --exporter otlp),
    // then pin what the demo needs.
    let mut args = RunArgs::from_env();
    args.inbound_listen = "127.0.0.1:0".into();
    args.outbound_listen = "127.0.0.1:0".into();
    args.admin_listen = "127.0.0.1:0".into();
    args.inbound_target = Some(inbound_target.to_string());
    args.correlation = "causal".into();
    args.log = "warn".into();
    args.drain_timeout = "2s".into();
    args.service_name = Some(service.into());
    args.resource_attributes = Some(format!(
        "k8s.namespace.name=demo,k8s.deployment.name={service}"
    ));
    args.traces_exporter = "otlp".into();
    args.sampler = "parentbased_always_on".into();
    args.propagators = "tracecontext,baggage".into();
    args.bsp_schedule_delay = "200".into();
    Ok(args.into_config()?)
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let to_console = match args.exporter.as_str() {
        "console" => true,
        "otlp" => false,
        other => anyhow::bail!("invalid --exporter value {other:?}: expected console or otlp"),
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<SpanRecord>();
    let sink = || {
        if to_console {
            Sink::Channel(tx.clone())
        } else {
            Sink::FromConfig
        }
    };

    // inventory: the leaf service.
    let inventory_app = serve_app(|req: Request<Incoming>| async move {
        let id = req
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or("")
            .to_string();
        tokio::time::sleep(Duration::from_millis(3)).await;
        match id.parse::<u32>() {
            Ok(0) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "{\"error\":\"warehouse offline\"}".into(),
            ),
            Ok(n) => text(
                StatusCode::OK,
                format!("{{\"item\":{n},\"stock\":{}}}", n * 7 % 11),
            ),
            Err(_) => text(StatusCode::NOT_FOUND, "{\"error\":\"no such item\"}".into()),
        }
    })
    .await?;
    let inventory = Proxy::start(proxy_config("inventory", inventory_app)?, sink())
        .await
        .context("inventory proxy")?;

    // shop: calls inventory twice per checkout through its own proxy, forwarding no headers.
    let shop_outbound = std::sync::Arc::new(std::sync::OnceLock::<SocketAddr>::new());
    let inventory_in = inventory.inbound_addr;
    let outbound = shop_outbound.clone();
    let shop_app = serve_app(move |req: Request<Incoming>| {
        let outbound = outbound.clone();
        async move {
            let id = req
                .uri()
                .path()
                .rsplit('/')
                .next()
                .unwrap_or("")
                .to_string();
            let Some(via) = outbound.get().copied() else {
                return text(StatusCode::SERVICE_UNAVAILABLE, "not ready".into());
            };
            let stock = get(via, &format!("http://{inventory_in}/items/{id}")).await;
            let price = get(via, &format!("http://{inventory_in}/prices/{id}")).await;
            match (stock, price) {
                (Ok((StatusCode::OK, s)), Ok((_, p))) => text(
                    StatusCode::OK,
                    format!(
                        "{{\"stock\":{},\"price\":{}}}",
                        String::from_utf8_lossy(&s),
                        String::from_utf8_lossy(&p)
                    ),
                ),
                (Ok((status, _)), _) => {
                    text(StatusCode::BAD_GATEWAY, format!("inventory said {status}"))
                }
                (Err(e), _) => text(
                    StatusCode::BAD_GATEWAY,
                    format!("inventory unreachable: {e}"),
                ),
            }
        }
    })
    .await?;
    let shop = Proxy::start(proxy_config("shop", shop_app)?, sink())
        .await
        .context("shop proxy")?;
    let _ = shop_outbound.set(shop.outbound_addr);

    println!(
        "tracecar demo: two uninstrumented services on loopback, each behind a tracecar proxy"
    );
    println!(
        "  shop      app {shop_app}  proxy inbound {}  outbound {}",
        shop.inbound_addr, shop.outbound_addr
    );
    println!(
        "  inventory app {inventory_app}  proxy inbound {}",
        inventory.inbound_addr
    );
    println!();
    // The user's client: plain requests with no trace context, as from a browser.
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Empty<Bytes>>();
    for i in 0..args.requests {
        // The last checkout asks for item 0, which inventory fails, to show an error trace.
        let id = if i + 1 == args.requests && args.requests > 1 {
            0
        } else {
            i + 1
        };
        let uri: http::Uri = format!("http://{}/checkout/{id}", shop.inbound_addr).parse()?;
        let resp = client
            .get(uri.clone())
            .await
            .with_context(|| format!("GET {uri}"))?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        println!(
            "GET /checkout/{id} -> {status} {}",
            String::from_utf8_lossy(&body)
        );
    }
    shop.shutdown().await;
    inventory.shutdown().await;
    drop(tx);
    if !to_console {
        println!("\nspans exported over OTLP; open your Jaeger or Grafana to see the traces");
        return Ok(());
    }
    let mut spans = Vec::new();
    while let Ok(s) = rx.try_recv() {
        spans.push(s);
    }
    println!();
    print_traces(&spans);
    Ok(())
}

/// Prints spans grouped by trace as indented trees with durations and a timeline bar.
pub fn print_traces(records: &[SpanRecord]) {
    let services: HashMap<_, _> = records
        .iter()
        .map(|(svc, s)| (s.span_context.span_id(), svc.clone()))
        .collect();
    let mut traces: Vec<(opentelemetry::trace::TraceId, Vec<&SpanData>)> = Vec::new();
    for (_, s) in records {
        let id = s.span_context.trace_id();
        match traces.iter_mut().find(|(t, _)| *t == id) {
            Some((_, v)) => v.push(s),
            None => traces.push((id, vec![s])),
        }
    }
    traces.sort_by_key(|(_, v)| v.iter().map(|s| s.start_time).min());
    for (trace_id, mut members) in traces {
        members.sort_by_key(|s| s.start_time);
        let start = members
            .iter()
            .map(|s| s.start_time)
            .min()
            .unwrap_or(std::time::UNIX_EPOCH);
        let end = members.iter().map(|s| s.end_time).max().unwrap_or(start);
        let total = end
            .duration_since(start)
            .unwrap_or_default()
            .as_secs_f64()
            .max(1e-6);
        println!(
            "trace {trace_id}  {} spans  {:.2} ms",
            members.len(),
            total * 1e3
        );
        let ids: HashMap<_, _> = members
            .iter()
            .map(|s| (s.span_context.span_id(), *s))
            .collect();
        let roots: Vec<&SpanData> = members
            .iter()
            .copied()
            .filter(|s| !ids.contains_key(&s.parent_span_id))
            .collect();
        for root in roots {
            print_span(root, &members, &services, 0, start, total);
        }
        println!();
    }
}

fn attr<'a>(s: &'a SpanData, key: &str) -> Option<&'a opentelemetry::Value> {
    s.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

fn print_span(
    s: &SpanData,
    all: &[&SpanData],
    services: &HashMap<opentelemetry::trace::SpanId, std::sync::Arc<str>>,
    depth: usize,
    t0: std::time::SystemTime,
    total: f64,
) {
    const WIDTH: f64 = 30.0;
    let offset = s
        .start_time
        .duration_since(t0)
        .unwrap_or_default()
        .as_secs_f64();
    let dur = s
        .end_time
        .duration_since(s.start_time)
        .unwrap_or_default()
        .as_secs_f64();
    let lead = ((offset / total) * WIDTH).round() as usize;
    let len = (((dur / total) * WIDTH).round() as usize).max(1);
    let bar = format!(
        "{}{}",
        " ".repeat(lead.min(WIDTH as usize)),
        "█".repeat(len.min(WIDTH as usize))
    );
    let service = services
        .get(&s.span_context.span_id())
        .map(|s| s.to_string())
        .unwrap_or_default();
    let status = attr(s, "http.response.status_code")
        .map(|v| v.to_string())
        .unwrap_or_else(|| "-".into());
    let path = attr(s, "url.path")
        .map(|v| v.to_string())
        .unwrap_or_default();
    let server = attr(s, "server.address")
        .map(|v| v.to_string())
        .unwrap_or_default();
    let error = attr(s, "error.type")
        .map(|v| format!(" error.type={v}"))
        .unwrap_or_default();
    let inferred = attr(s, "tracecar.correlation")
        .map(|how| format!(" (linked by correlation: {how})"))
        .unwrap_or_default();
    let indent = if depth == 0 {
        String::new()
    } else {
        format!("{}└─ ", "   ".repeat(depth - 1))
    };
    let label = format!(
        "{indent}{service} {} {} {path}",
        kind_str(&s.span_kind),
        s.name
    );
    println!(
        "  {label:<44} {status:>4} {:>8.2} ms |{bar:<30}| {server}{error}{inferred}",
        dur * 1e3
    );
    let mut children: Vec<&&SpanData> = all
        .iter()
        .filter(|c| c.parent_span_id == s.span_context.span_id())
        .collect();
    children.sort_by_key(|c| c.start_time);
    for c in children {
        print_span(c, all, services, depth + 1, t0, total);
    }
}
