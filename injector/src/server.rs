//! The HTTPS webhook: a thin shell that reads an AdmissionReview, calls
//! [`crate::decide`], and writes the AdmissionReview response with the JSON Patch.
//!
//! One task per connection (HTTP/1.1 and HTTP/2 via hyper-util's auto builder over
//! tokio-rustls); on shutdown the listener closes and in-flight requests finish.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::prelude::{Engine as _, BASE64_STANDARD};
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Body;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use k8s_openapi::api::core::v1::Pod;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::core::DynamicObject;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::config::Defaults;
use crate::decide::{decide, Decision, Reason};
use crate::metrics::Metrics;
use crate::tls::{self, CertFiles, ReloadingResolver, TlsError};

/// How long a request head, or a whole request and its answer, may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest accepted request body (the API server sends at most ~3 MiB objects).
pub const MAX_BODY: usize = 4 * 1024 * 1024;

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub use crate::state::State;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("listening on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Where and how to serve; see [`crate::config::ServeConfig`].
pub struct Options {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub tls_reload_interval: Duration,
    pub shutdown_timeout: Duration,
    pub defaults: Defaults,
}

/// A running webhook; [`Running::shutdown`] drains it.
pub struct Running {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub state: Arc<State>,
    pub resolver: Arc<ReloadingResolver>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, waits for in-flight requests (up to the shutdown timeout).
    pub async fn shutdown(self) {
        self.state.ready.store(false, Ordering::SeqCst);
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Binds both listeners, loads the certificate and starts serving.
pub async fn start(opts: Options) -> Result<Running, ServerError> {
    let metrics = Arc::new(Metrics::new());
    let state = Arc::new(State::new(opts.defaults, metrics.clone()));
    let files = CertFiles::load(opts.tls_cert, opts.tls_key).await?;
    let resolver = files.resolver.clone();
    let tls = Arc::new(tls::server_config(resolver.clone())?);

    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })
    };
    let listener = bind(opts.listen).await?;
    let admin = bind(opts.admin_listen).await?;
    let addr = listener.local_addr().map_err(|source| ServerError::Bind {
        addr: opts.listen,
        source,
    })?;
    let admin_addr = admin.local_addr().map_err(|source| ServerError::Bind {
        addr: opts.admin_listen,
        source,
    })?;

    let (tx, rx) = watch::channel(false);
    let tasks = vec![
        tokio::spawn(tls::watch(
            files,
            opts.tls_reload_interval,
            metrics.clone(),
            rx.clone(),
        )),
        tokio::spawn(crate::admin::serve(admin, state.clone(), rx.clone())),
        tokio::spawn(serve(
            listener,
            tls,
            state.clone(),
            rx,
            opts.shutdown_timeout,
        )),
    ];
    state.ready.store(true, Ordering::SeqCst);
    tracing::info!(%addr, %admin_addr, "webhook serving");
    Ok(Running {
        addr,
        admin_addr,
        state,
        resolver,
        shutdown: tx,
        tasks,
    })
}

/// Accepts TLS connections until `shutdown`, then drains for up to `drain`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: Arc<State>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let acceptor = TlsAcceptor::from(tls);
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // A client that sends its head slowly, or nothing, is dropped (the API server's webhook
    // timeout is at most 30 s anyway); a request must be answered within the same bound.
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(REQUEST_TIMEOUT);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // E.g. EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let state = state.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move {
                    let answer = tokio::time::timeout(REQUEST_TIMEOUT, handle(&state, req)).await;
                    Ok::<_, Infallible>(answer.unwrap_or_else(|_| {
                        text(
                            StatusCode::REQUEST_TIMEOUT,
                            "request not received in time\n",
                        )
                    }))
                }
            });
            let conn = builder
                .serve_connection(TokioIo::new(stream), svc)
                .into_owned();
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%peer, error = %e, "connection error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown timeout: some connections were still open");
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Routes one request: `POST /inject` and `POST /inject/opt-in`, each optionally followed by
/// `/correlation/<policy>` (the namespace's policy).
pub async fn handle<B>(state: &State, req: Request<B>) -> Response<Full<Bytes>>
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let defaults = match state.defaults_for(req.uri().path()) {
        Some(d) => d,
        None => {
            state.metrics.bad_request("not-found");
            return text(
                StatusCode::NOT_FOUND,
                "not found: POST /inject or /inject/opt-in, optionally followed by \
                 /correlation/causal, /correlation/inflight or /correlation/off\n",
            );
        }
    };
    if req.method() != Method::POST {
        state.metrics.bad_request("method");
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: use POST\n",
        );
    }
    let too_large = || format!("request body over {MAX_BODY} bytes\n");
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        state.metrics.bad_request("too-large");
        return text(StatusCode::PAYLOAD_TOO_LARGE, too_large());
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            state.metrics.bad_request("too-large");
            return text(StatusCode::PAYLOAD_TOO_LARGE, too_large());
        }
        Err(e) => {
            state.metrics.bad_request("malformed");
            return text(
                StatusCode::BAD_REQUEST,
                format!("reading request body: {e}\n"),
            );
        }
    };
    let started = Instant::now();
    let resp = match admit(state, defaults, &body) {
        Ok(json) => {
            let mut r = Response::new(Full::new(Bytes::from(json)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(reason) => {
            state.metrics.bad_request("malformed");
            tracing::warn!(%reason, "malformed AdmissionReview");
            text(
                StatusCode::BAD_REQUEST,
                format!("malformed AdmissionReview: {reason}\n"),
            )
        }
    };
    state
        .metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    resp
}

/// Decodes a review, decides, encodes the response review. `Err` is the 400 reason.
pub fn admit(state: &State, defaults: &Defaults, body: &[u8]) -> Result<Vec<u8>, String> {
    let response = match serde_json::from_slice::<AdmissionReview<Pod>>(body) {
        Ok(review) => {
            check_types(&review.types)?;
            let req: AdmissionRequest<Pod> = review
                .try_into()
                .map_err(|_| "the AdmissionReview has no request".to_owned())?;
            let decision = match (&req.object, is_pod_create(&req)) {
                (Some(pod), true) => decide(pod, defaults),
                (None, true) => skip(Reason::InvalidObject),
                (_, false) => skip(Reason::NotPodCreate),
            };
            respond(state, &req, decision)?
        }
        Err(pod_err) => {
            // A well-formed review of something that is not a Pod is allowed unchanged.
            let review: AdmissionReview<DynamicObject> =
                serde_json::from_slice(body).map_err(|e| e.to_string())?;
            check_types(&review.types)?;
            let req: AdmissionRequest<DynamicObject> = review
                .try_into()
                .map_err(|_| "the AdmissionReview has no request".to_owned())?;
            let reason = if is_pod_create(&req) {
                Reason::InvalidObject
            } else {
                Reason::NotPodCreate
            };
            if reason == Reason::InvalidObject {
                tracing::warn!(uid = %req.uid, error = %pod_err, "pod object does not decode");
            }
            respond(state, &req, skip(reason))?
        }
    };
    encode_review(response)
}

/// Serializes the response review with `response.patch` as a base64 string, as the
/// Kubernetes API documents it (`[]byte`); kube-core would write a JSON array of numbers.
pub fn encode_review(mut response: AdmissionResponse) -> Result<Vec<u8>, String> {
    let patch = response.patch.take();
    let mut review = serde_json::to_value(response.into_review()).map_err(|e| e.to_string())?;
    if let Some(bytes) = patch {
        let Some(resp) = review
            .get_mut("response")
            .and_then(serde_json::Value::as_object_mut)
        else {
            return Err("the response review has no response object".to_owned());
        };
        resp.insert(
            "patch".to_owned(),
            serde_json::Value::String(BASE64_STANDARD.encode(bytes)),
        );
    }
    serde_json::to_vec(&review).map_err(|e| e.to_string())
}

// Small helpers keep `admit` readable: build, log and count the response.

fn check_types(types: &kube::core::TypeMeta) -> Result<(), String> {
    use kube::core::admission::{META_API_VERSION_V1, META_KIND};
    if types.kind == META_KIND && types.api_version == META_API_VERSION_V1 {
        Ok(())
    } else {
        Err(format!(
            "expected apiVersion {META_API_VERSION_V1}, kind {META_KIND}; got {:?}, {:?}",
            types.api_version, types.kind
        ))
    }
}

fn skip(reason: Reason) -> Decision {
    Decision {
        patch: None,
        warnings: Vec::new(),
        reason,
    }
}

fn is_pod_create<T: kube::core::Resource>(req: &AdmissionRequest<T>) -> bool {
    req.operation == Operation::Create
        && req.kind.group.is_empty()
        && req.kind.kind == "Pod"
        && req.sub_resource.as_deref().unwrap_or("").is_empty()
}

/// Logs and counts the decision, then builds the AdmissionResponse.
fn respond<T: kube::core::Resource>(
    state: &State,
    req: &AdmissionRequest<T>,
    decision: Decision,
) -> Result<AdmissionResponse, String> {
    let metrics = &state.metrics;
    metrics.admission(decision.reason);
    for w in &decision.warnings {
        metrics.warning(&w.annotation);
        tracing::warn!(uid = %req.uid, namespace = req.namespace.as_deref().unwrap_or(""), annotation = %w.annotation, warning = %w.message, "invalid annotation");
    }
    tracing::info!(
        uid = %req.uid,
        namespace = req.namespace.as_deref().unwrap_or(""),
        name = %req.name,
        operation = ?req.operation,
        reason = decision.reason.as_str(),
        warnings = decision.warnings.len(),
        "admission decision"
    );
    let mut resp = AdmissionResponse::from(req);
    if !decision.warnings.is_empty() {
        resp.warnings = Some(
            decision
                .warnings
                .iter()
                .map(|w| w.message.clone())
                .collect(),
        );
    }
    if let Some(p) = decision.patch {
        resp = resp.with_patch(p).map_err(|e| e.to_string())?;
    }
    Ok(resp)
}
