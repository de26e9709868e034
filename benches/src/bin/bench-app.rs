//! `bench-app --listen ADDR [--threads N] [--body-bytes N]`: the upstream app of the load
//! benchmark. Answers every request with `200 OK` and a small fixed body, HTTP/1.1 keep-alive,
//! doing as little work as possible so that what is measured is the proxy in front of it.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:18080")]
    listen: SocketAddr,
    /// Runtime worker threads (1: a current-thread runtime).
    #[arg(long, env = "BENCH_APP_THREADS", default_value_t = 1)]
    threads: usize,
    /// Size of the response body.
    #[arg(long, default_value_t = 64)]
    body_bytes: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tracecar_benches::runtime(args.threads)?;
    rt.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen).await?;
    let body = Bytes::from(vec![b'x'; args.body_bytes]);
    eprintln!("bench-app listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                eprintln!("bench-app: accept: {e}");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |_req| {
                let body = body.clone();
                async move {
                    Ok::<_, Infallible>(
                        http::Response::builder()
                            .header(http::header::CONTENT_TYPE, "text/plain")
                            .body(Full::new(body))
                            .unwrap_or_default(),
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
