//! `otlp-sink --listen ADDR --out FILE`: an OTLP receiver (gRPC and http/protobuf) that writes
//! one JSON object per received span to FILE, for shell-driven end-to-end tests.
//!
//! With `--count-only` (load benchmarks) it is a minimal gRPC receiver (hyper HTTP/2) that only
//! counts the spans of each export, without decoding them: FILE then holds one line `{"spans":N,"requests":M}`, rewritten at
//! most every 200 ms and at exit, so the receiver is not what limits the exporting proxy.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use clap::Parser;

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

/// The spans in one encoded `ExportTraceServiceRequest`, found by walking the protobuf
/// (resource_spans = 1 → scope_spans = 2 → spans = 2) without decoding any span: a full decode
/// cost the receiver more CPU than the proxy spent exporting, and on a small machine the
/// receiver shares a core with the load generator.
fn count_spans(request: &[u8]) -> Option<u64> {
    fn varint(buf: &mut &[u8]) -> Option<u64> {
        prost::encoding::decode_varint(buf).ok()
    }
    /// Calls `f` with each length-delimited field number `want` of `b`, skipping the rest.
    fn each<'a>(
        mut b: &'a [u8],
        want: u64,
        f: &mut dyn FnMut(&'a [u8]) -> Option<()>,
    ) -> Option<()> {
        while !b.is_empty() {
            let key = varint(&mut b)?;
            match key & 7 {
                0 => {
                    varint(&mut b)?;
                }
                1 => b = b.get(8..)?,
                5 => b = b.get(4..)?,
                2 => {
                    let len = usize::try_from(varint(&mut b)?).ok()?;
                    let value = b.get(..len)?;
                    b = &b[len..];
                    if key >> 3 == want {
                        f(value)?;
                    }
                }
                _ => return None,
            }
        }
        Some(())
    }
    let mut n = 0u64;
    each(request, 1, &mut |rs| {
        each(rs, 2, &mut |ss| {
            each(ss, 2, &mut |_| {
                n += 1;
                Some(())
            })
        })
    })?;
    Some(n)
}

/// One gRPC `Export` call: count its spans, answer OK with an empty response.
async fn export(
    req: http::Request<hyper::body::Incoming>,
    counts: Arc<Counts>,
) -> Result<http::Response<GrpcBody>, std::convert::Infallible> {
    use http_body_util::BodyExt;
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    // gRPC framing: 1 byte "compressed", 4 bytes length, the message.
    let mut rest = &body[..];
    let mut status = "0";
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let Some(message) = rest.get(5..5 + len) else {
            break;
        };
        match count_spans(message) {
            Some(n) => {
                counts.spans.fetch_add(n, Ordering::Relaxed);
            }
            None => status = "3", // INVALID_ARGUMENT
        }
        rest = &rest[5 + len..];
    }
    counts.requests.fetch_add(1, Ordering::Relaxed);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static(status));
    let frames = vec![
        Ok(hyper::body::Frame::data(bytes::Bytes::from_static(&[
            0, 0, 0, 0, 0,
        ]))),
        Ok(hyper::body::Frame::trailers(trailers)),
    ];
    let mut resp = http::Response::new(http_body_util::StreamBody::new(
        futures_util::stream::iter(frames),
    ));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    Ok(resp)
}

type GrpcBody = http_body_util::StreamBody<
    futures_util::stream::Iter<
        std::vec::IntoIter<Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>>,
    >,
>;

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
    let server = {
        let counts = counts.clone();
        async move {
            loop {
                let (stream, _) = listener.accept().await?;
                let _ = stream.set_nodelay(true);
                let counts = counts.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| export(req, counts.clone()));
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .max_frame_size(1 << 20)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
                });
            }
            #[allow(unreachable_code)]
            Ok::<(), std::io::Error>(())
        }
    };
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

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    use prost::Message;

    fn span(i: u8) -> Span {
        Span {
            trace_id: vec![i; 16],
            span_id: vec![i; 8],
            name: "GET".into(),
            start_time_unix_nano: 1,
            end_time_unix_nano: 2,
            attributes: vec![KeyValue {
                key: "url.path".into(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::StringValue("/x".repeat(i as usize * 50))),
                }),
                key_strindex: 0,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn counts_spans_across_resources_and_scopes() {
        let scope = |n: u8| ScopeSpans {
            spans: (0..n).map(span).collect(),
            ..Default::default()
        };
        let req = ExportTraceServiceRequest {
            resource_spans: vec![
                ResourceSpans {
                    resource: Some(Resource::default()),
                    scope_spans: vec![scope(3), scope(0), scope(200)],
                    ..Default::default()
                },
                ResourceSpans {
                    scope_spans: vec![scope(7)],
                    ..Default::default()
                },
            ],
        };
        assert_eq!(count_spans(&req.encode_to_vec()), Some(210));
        assert_eq!(count_spans(&[]), Some(0));
        assert_eq!(count_spans(&[0x0a, 0x05, 0x12]), None, "truncated");
    }
}
