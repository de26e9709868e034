//! An uninstrumented upstream app: it knows nothing of tracing and forwards no headers.
//!
//! Routes: `/status/{code}`, `/slow/{ms}`, `/stream/{bytes}` (streamed response), `/count`
//! (consumes the request body, answers its length), `/upgrade` (101 then echoes bytes),
//! `/trailers` (HTTP/2 body with trailers), `/call?via=ADDR&to=ADDR&path=P` (calls `to` through
//! the forward proxy at `via`), anything else echoes. Every request's headers are recorded.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type AppBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// A request as the app saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    /// The query string as received (the proxy forwards it; it only keeps it out of spans).
    pub query: String,
    pub headers: HeaderMap,
}

/// A running app. Stops accepting when dropped.
pub struct App {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl App {
    pub async fn start() -> App {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
        let addr = listener.local_addr().expect("app addr");
        let seen: Arc<Mutex<Vec<Seen>>> = Default::default();
        let seen2 = seen.clone();
        let connections: Arc<std::sync::atomic::AtomicUsize> = Default::default();
        let accepted = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let seen = seen2.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let seen = seen.clone();
                        async move { Ok::<_, Infallible>(route(req, seen).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        App {
            addr,
            seen,
            connections,
            task,
        }
    }

    /// TCP connections the app has accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Headers of the last request whose path starts with `prefix`.
    pub fn last(&self, prefix: &str) -> Option<Seen> {
        self.seen()
            .into_iter()
            .rev()
            .find(|s| s.path.starts_with(prefix))
    }
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<AppBody> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn route(mut req: Request<Incoming>, seen: Arc<Mutex<Vec<Seen>>>) -> Response<AppBody> {
    let path = req.uri().path().to_string();
    if let Ok(mut s) = seen.lock() {
        s.push(Seen {
            path: path.clone(),
            query: req.uri().query().unwrap_or("").to_string(),
            headers: req.headers().clone(),
        });
    }
    let tail = |p: &str| path.strip_prefix(p).unwrap_or("").to_string();
    if path.starts_with("/status/") {
        let code = tail("/status/")
            .parse()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok());
        return full(code.unwrap_or(StatusCode::BAD_REQUEST), "status\n");
    }
    if path.starts_with("/slow/") {
        let ms: u64 = tail("/slow/").parse().unwrap_or(100);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        return full(StatusCode::OK, "slow\n");
    }
    if path.starts_with("/stream/") {
        let total: u64 = tail("/stream/").parse().unwrap_or(0);
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        let stream = futures_util::stream::unfold(0u64, move |sent| {
            let chunk = chunk.clone();
            async move {
                if sent >= total {
                    return None;
                }
                let n = (total - sent).min(chunk.len() as u64);
                Some((
                    Ok::<_, std::io::Error>(Frame::data(chunk.slice(..n as usize))),
                    sent + n,
                ))
            }
        });
        return Response::new(StreamBody::new(stream).boxed());
    }
    if path == "/count" {
        let mut body = req.into_body();
        let mut n = 0u64;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => n += f.data_ref().map(|d| d.len() as u64).unwrap_or(0),
                Err(_) => return full(StatusCode::BAD_REQUEST, "body error\n"),
            }
        }
        return full(StatusCode::OK, n.to_string());
    }
    if path == "/upgrade" {
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on_upgrade.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let mut r = Response::new(Empty::new().map_err(|never| match never {}).boxed());
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut().insert(
            http::header::UPGRADE,
            http::HeaderValue::from_static("echo"),
        );
        r.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("upgrade"),
        );
        return r;
    }
    if path == "/trailers" {
        let frames = vec![
            Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b"part1,"))),
            Ok(Frame::data(Bytes::from_static(b"part2"))),
            Ok(Frame::trailers({
                let mut t = HeaderMap::new();
                t.insert("grpc-status", http::HeaderValue::from_static("0"));
                t.insert("x-checksum", http::HeaderValue::from_static("abc"));
                t
            })),
        ];
        return Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed());
    }
    if path == "/call" {
        let q = query(&req);
        let (Some(via), Some(to)) = (q.get("via"), q.get("to")) else {
            return full(StatusCode::BAD_REQUEST, "via and to required\n");
        };
        let target_path = q.get("path").cloned().unwrap_or_else(|| "/".into());
        let uri = format!("http://{to}{target_path}");
        return match get_via_proxy(via, &uri).await {
            Ok((status, body)) => full(status, body),
            Err(e) => full(StatusCode::BAD_GATEWAY, format!("call failed: {e}\n")),
        };
    }
    let headers: BTreeMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let body =
        serde_json::json!({ "method": req.method().as_str(), "path": path, "headers": headers });
    full(StatusCode::OK, body.to_string())
}

/// A GET sent to a forward proxy in absolute form, with no trace headers.
pub async fn get_via_proxy(via: &str, uri: &str) -> anyhow::Result<(StatusCode, Bytes)> {
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
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    Ok((status, resp.into_body().collect().await?.to_bytes()))
}

/// A plain HTTP/1.1 client for tests (pooled).
pub fn client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
> {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

/// GET `url` with extra headers; returns status, response headers and body.
pub async fn get(url: &str, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, Bytes) {
    let mut req = Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client()
        .request(req.body(Full::new(Bytes::new())).expect("request"))
        .await
        .expect("send");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, headers, body)
}
