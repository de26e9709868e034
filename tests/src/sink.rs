//! An OTLP receiver for tests: gRPC (`TraceService/Export`) and http/protobuf (`POST /v1/traces`)
//! on one port, optionally behind TLS. Received spans are flattened into [`RecvSpan`]s.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// One received span, flattened for assertions.
#[derive(Debug, Clone, Serialize)]
pub struct RecvSpan {
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub name: String,
    /// `SERVER`, `CLIENT`, ...
    pub kind: String,
    pub service_name: String,
    pub resource: BTreeMap<String, serde_json::Value>,
    pub attributes: BTreeMap<String, serde_json::Value>,
    /// `UNSET`, `OK`, `ERROR`
    pub status: String,
    /// The sampled flag and the rest of the W3C flags.
    pub flags: u32,
    /// Span links (`Span.links`), as sent.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<RecvLink>,
    /// Attribute keys sent more than once (OTLP requires unique keys; `spans` refuses these).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub repeated_keys: Vec<String>,
}

/// One span link of a received span.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecvLink {
    pub trace_id: String,
    pub span_id: String,
    pub trace_state: String,
    pub flags: u32,
}

impl RecvSpan {
    pub fn attr(&self, key: &str) -> Option<&serde_json::Value> {
        self.attributes.get(key)
    }

    pub fn attr_str(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).and_then(|v| v.as_str())
    }
}

fn any_json(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> serde_json::Value {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => serde_json::json!(s),
        Some(AnyValue::BoolValue(b)) => serde_json::json!(b),
        Some(AnyValue::IntValue(i)) => serde_json::json!(i),
        Some(AnyValue::DoubleValue(d)) => serde_json::json!(d),
        Some(other) => serde_json::json!(format!("{other:?}")),
        None => serde_json::Value::Null,
    }
}

/// Keys that occur more than once in `kvs`.
fn repeated(kvs: &[KeyValue]) -> Vec<String> {
    let mut seen = std::collections::BTreeSet::new();
    kvs.iter()
        .filter(|kv| !seen.insert(kv.key.as_str()))
        .map(|kv| kv.key.clone())
        .collect()
}

fn kv_map(kvs: &[KeyValue]) -> BTreeMap<String, serde_json::Value> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), any_json(&kv.value)))
        .collect()
}

/// Flattens an export request into spans.
pub fn flatten(req: &ExportTraceServiceRequest) -> Vec<RecvSpan> {
    let mut out = Vec::new();
    for rs in &req.resource_spans {
        let resource = rs
            .resource
            .as_ref()
            .map(|r| kv_map(&r.attributes))
            .unwrap_or_default();
        let service_name = resource
            .get("service.name")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        for ss in &rs.scope_spans {
            for s in &ss.spans {
                let kind = match s.kind {
                    1 => "INTERNAL",
                    2 => "SERVER",
                    3 => "CLIENT",
                    4 => "PRODUCER",
                    5 => "CONSUMER",
                    _ => "UNSPECIFIED",
                };
                let status = match s.status.as_ref().map(|st| st.code) {
                    Some(1) => "OK",
                    Some(2) => "ERROR",
                    _ => "UNSET",
                };
                out.push(RecvSpan {
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    name: s.name.clone(),
                    kind: kind.to_string(),
                    service_name: service_name.clone(),
                    resource: resource.clone(),
                    attributes: kv_map(&s.attributes),
                    status: status.to_string(),
                    flags: s.flags,
                    links: s
                        .links
                        .iter()
                        .map(|l| RecvLink {
                            trace_id: hex(&l.trace_id),
                            span_id: hex(&l.span_id),
                            trace_state: l.trace_state.clone(),
                            flags: l.flags,
                        })
                        .collect(),
                    repeated_keys: repeated(&s.attributes),
                });
            }
        }
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What the sink answers; tests flip it to simulate a failing collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    Accept,
    /// gRPC UNAVAILABLE / HTTP 503.
    Unavailable,
}

type BatchHook = Box<dyn FnMut(&[RecvSpan]) + Send>;

#[derive(Default)]
struct State {
    spans: Mutex<Vec<RecvSpan>>,
    requests: Mutex<u64>,
    /// Headers of the last export request (gRPC metadata or HTTP headers).
    last_headers: Mutex<Option<http::HeaderMap>>,
    unavailable: std::sync::atomic::AtomicBool,
    /// Called with every batch, e.g. to write JSON lines.
    on_batch: Mutex<Option<BatchHook>>,
}

impl State {
    fn take(&self, req: &ExportTraceServiceRequest) -> bool {
        if self.unavailable.load(std::sync::atomic::Ordering::SeqCst) {
            return false;
        }
        let spans = flatten(req);
        if let Ok(mut f) = self.on_batch.lock() {
            if let Some(f) = f.as_mut() {
                f(&spans);
            }
        }
        if let Ok(mut r) = self.requests.lock() {
            *r += 1;
        }
        if let Ok(mut all) = self.spans.lock() {
            all.extend(spans);
        }
        true
    }
}

#[derive(Clone)]
struct Grpc(Arc<State>);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if self.0.take(request.get_ref()) {
            Ok(tonic::Response::new(ExportTraceServiceResponse {
                partial_success: None,
            }))
        } else {
            Err(tonic::Status::unavailable("sink is unavailable (test)"))
        }
    }
}

/// A running receiver. Stops when dropped.
pub struct Sink {
    pub addr: SocketAddr,
    state: Arc<State>,
    _stop: oneshot::Sender<()>,
}

impl Sink {
    /// Plain-text receiver on an ephemeral loopback port.
    pub async fn start() -> Sink {
        Self::start_on("127.0.0.1:0".parse().expect("addr"), None).await
    }

    /// Receiver on `addr`, with TLS when `tls` is given (client auth as that config says).
    pub async fn start_on(addr: SocketAddr, tls: Option<Arc<rustls::ServerConfig>>) -> Sink {
        let listener = TcpListener::bind(addr).await.expect("bind sink");
        let addr = listener.local_addr().expect("sink addr");
        let state = Arc::new(State::default());
        let (stop, mut stopped) = oneshot::channel::<()>();
        let grpc = TraceServiceServer::new(Grpc(state.clone()));
        let http_state = state.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                    _ = &mut stopped => return,
                };
                let grpc = grpc.clone();
                let state = http_state.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let mut grpc = grpc.clone();
                            let state = state.clone();
                            if let Ok(mut h) = state.last_headers.lock() {
                                *h = Some(req.headers().clone());
                            }
                            async move {
                                if req.uri().path() == "/v1/traces" {
                                    return Ok::<_, std::convert::Infallible>(
                                        http_export(&state, req).await,
                                    );
                                }
                                let resp = tower_service_call(&mut grpc, req).await;
                                Ok(resp)
                            }
                        },
                    );
                    let builder = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    match tls {
                        None => {
                            let _ = builder
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                                .await;
                        }
                        Some(cfg) => {
                            let Ok(tls_stream) =
                                tokio_rustls::TlsAcceptor::from(cfg).accept(stream).await
                            else {
                                return;
                            };
                            let _ = builder
                                .serve_connection(hyper_util::rt::TokioIo::new(tls_stream), svc)
                                .await;
                        }
                    }
                });
            }
        });
        Sink {
            addr,
            state,
            _stop: stop,
        }
    }

    /// `http://addr` for gRPC or http/protobuf.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far. Every test reads spans through here, so each one also checks
    /// that no span repeats an attribute key.
    pub fn spans(&self) -> Vec<RecvSpan> {
        let spans = self
            .state
            .spans
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        for s in &spans {
            assert!(
                s.repeated_keys.is_empty(),
                "span {} {} repeats attributes {:?}",
                s.kind,
                s.name,
                s.repeated_keys
            );
        }
        spans
    }

    /// Headers of the last export request received.
    pub fn last_headers(&self) -> Option<http::HeaderMap> {
        self.state.last_headers.lock().ok().and_then(|h| h.clone())
    }

    pub fn clear(&self) {
        if let Ok(mut s) = self.state.spans.lock() {
            s.clear();
        }
    }

    pub fn set_behaviour(&self, b: Behaviour) {
        self.state.unavailable.store(
            b == Behaviour::Unavailable,
            std::sync::atomic::Ordering::SeqCst,
        );
    }

    pub fn on_batch(&self, f: impl FnMut(&[RecvSpan]) + Send + 'static) {
        if let Ok(mut slot) = self.state.on_batch.lock() {
            *slot = Some(Box::new(f));
        }
    }

    /// Waits until at least `n` spans arrived (or `timeout` passed) and returns all of them.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<RecvSpan> {
        self.wait_until(|spans| spans.len() >= n, timeout).await
    }

    /// Waits until the spans received so far satisfy `done` (or `timeout` passed) and returns
    /// them. For a span that may come after others: the proxy sends batches concurrently, so
    /// arrival order is not end order.
    pub async fn wait_until(
        &self,
        done: impl Fn(&[RecvSpan]) -> bool,
        timeout: Duration,
    ) -> Vec<RecvSpan> {
        let start = Instant::now();
        loop {
            let spans = self.spans();
            if done(&spans) || start.elapsed() > timeout {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn tower_service_call(
    grpc: &mut TraceServiceServer<Grpc>,
    req: http::Request<hyper::body::Incoming>,
) -> http::Response<http_body_util::Either<tonic::body::Body, http_body_util::Full<bytes::Bytes>>> {
    use tower_service::Service;
    let req = req.map(tonic::body::Body::new);
    match grpc.call(req).await {
        Ok(resp) => resp.map(http_body_util::Either::Left),
        Err(never) => match never {},
    }
}

async fn http_export(
    state: &State,
    req: http::Request<hyper::body::Incoming>,
) -> http::Response<http_body_util::Either<tonic::body::Body, http_body_util::Full<bytes::Bytes>>> {
    use http_body_util::BodyExt;
    use prost::Message;
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return status(400),
    };
    let Ok(decoded) = ExportTraceServiceRequest::decode(body) else {
        return status(400);
    };
    if state.take(&decoded) {
        let resp = ExportTraceServiceResponse {
            partial_success: None,
        }
        .encode_to_vec();
        let mut r = http::Response::new(http_body_util::Either::Right(http_body_util::Full::new(
            bytes::Bytes::from(resp),
        )));
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/x-protobuf"),
        );
        r
    } else {
        status(503)
    }
}

fn status(
    code: u16,
) -> http::Response<http_body_util::Either<tonic::body::Body, http_body_util::Full<bytes::Bytes>>> {
    let mut r = http::Response::new(http_body_util::Either::Right(http_body_util::Full::new(
        bytes::Bytes::new(),
    )));
    *r.status_mut() =
        http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    r
}
