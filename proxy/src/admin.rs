//! The admin listener: `/live`, `/ready` and `/metrics` (Prometheus text).

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;

/// What the admin endpoints report on.
#[derive(Debug)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    /// Set once the data listeners are bound; cleared when shutdown starts.
    pub ready: AtomicBool,
}

fn respond(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, ctype, body): (StatusCode, &str, Bytes) = match req.uri().path() {
        "/live" => (StatusCode::OK, "text/plain", Bytes::from_static(b"live\n")),
        "/ready" if state.ready.load(Ordering::Acquire) => {
            (StatusCode::OK, "text/plain", Bytes::from_static(b"ready\n"))
        }
        "/ready" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            Bytes::from_static(b"not ready\n"),
        ),
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Bytes::from(state.metrics.encode()),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"not found\n"),
        ),
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(ctype) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp
}

/// How long an admin connection may stay silent or take to send a request head.
const ADMIN_IDLE: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves until `shutdown` flips.
pub async fn run(
    listener: TcpListener,
    state: Arc<AdminState>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                };
                let state = state.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let resp = respond(&state, &req);
                        async move { Ok::<_, Infallible>(resp) }
                    });
                    // Probes and scrapes are quick: a connection silent this long is dropped.
                    let io = crate::idle::IdleIo::fixed(stream, ADMIN_IDLE);
                    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    builder
                        .http1()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(ADMIN_IDLE);
                    let _ = builder.serve_connection(TokioIo::new(io), svc).await;
                });
            }
            _ = shutdown.changed() => return,
        }
    }
}
