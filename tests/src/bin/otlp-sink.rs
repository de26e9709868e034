//! `otlp-sink --listen ADDR --out FILE`: an OTLP receiver (gRPC and http/protobuf) that writes
//! one JSON object per received span to FILE, for shell-driven end-to-end tests.

use std::io::Write;

use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:4317")]
    listen: std::net::SocketAddr,
    #[arg(long)]
    out: std::path::PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let file = std::fs::OpenOptions::new().create(true).append(true).open(&args.out)?;
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
