//! `otlp-sink --listen ADDR --out FILE`: an OTLP receiver (gRPC and http/protobuf) that writes
//! one JSON object per received span to FILE, for shell-driven end-to-end tests.
//!
//! With `--count-only` (load benchmarks) it is a minimal gRPC receiver that decodes each export
//! and only counts its spans: FILE then holds one line `{"spans":N,"requests":M}`, rewritten at
//! most every 200 ms and at exit, so the receiver is not what limits the exporting proxy.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use clap::Parser;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:4317")]
    listen: std::net::SocketAddr,
    #[arg(long)]
    out: std::path::PathBuf,
    /// Count spans (gRPC only) instead of writing them; FILE holds the running count.
    #[arg(long)]
    count_only: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.count_only {
        return count_only(args).await;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.out)?;
    let file = std::sync::Mutex::new(file);
    let sink = tracecar_tests::sink::Sink::start_on(args.listen, None).await;
    sink.on_batch(move |spans| {
        if let Ok(mut f) = file.lock() {
            for s in spans {
                if let Ok(line) = serde_json::to_string(s) {
                    let _ = writeln!(f, "{line}");
                }
            }
            let _ = f.flush();
        }
    });
    eprintln!("otlp-sink listening on {}", sink.addr);
    tokio::signal::ctrl_c().await?;
    Ok(())
}

#[derive(Default)]
struct Counts {
    spans: AtomicU64,
    requests: AtomicU64,
}

#[derive(Clone)]
struct Counter(Arc<Counts>);

#[tonic::async_trait]
impl TraceService for Counter {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|rs| &rs.scope_spans)
            .map(|ss| ss.spans.len())
            .sum();
        self.0.spans.fetch_add(n as u64, Ordering::Relaxed);
        self.0.requests.fetch_add(1, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn write_counts(out: &std::path::Path, counts: &Counts) -> std::io::Result<()> {
    let tmp = out.with_extension("tmp");
    std::fs::write(
        &tmp,
        format!(
            "{{\"spans\":{},\"requests\":{}}}\n",
            counts.spans.load(Ordering::Relaxed),
            counts.requests.load(Ordering::Relaxed)
        ),
    )?;
    std::fs::rename(tmp, out)
}

async fn count_only(args: Args) -> anyhow::Result<()> {
    let counts = Arc::new(Counts::default());
    write_counts(&args.out, &counts)?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!(
        "otlp-sink (count-only) listening on {}",
        listener.local_addr()?
    );
    let server = tonic::transport::Server::builder()
        .add_service(
            TraceServiceServer::new(Counter(counts.clone())).max_decoding_message_size(64 << 20),
        )
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    let writer = {
        let counts = counts.clone();
        let out = args.out.clone();
        async move {
            let mut last = (u64::MAX, u64::MAX);
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                let now = (
                    counts.spans.load(Ordering::Relaxed),
                    counts.requests.load(Ordering::Relaxed),
                );
                if now != last {
                    let _ = write_counts(&out, &counts);
                    last = now;
                }
            }
        }
    };
    tokio::select! {
        r = server => r?,
        _ = writer => {}
        r = tokio::signal::ctrl_c() => r?,
    }
    write_counts(&args.out, &counts)?;
    Ok(())
}
