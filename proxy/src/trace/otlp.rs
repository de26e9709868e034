//! The OTLP exporter (gRPC or http/protobuf) over our own connector, so that every new export
//! connection takes the current TLS material (see [`super::tls`]).
//!
//! [`OtlpExporter`] owns the connection pool (a tonic channel, or a hyper client) and replaces it
//! when the TLS material changes (the [`TlsSource`] generation moved) or after a transport
//! failure, so rotated certificates take effect on the next export and a collector that starts
//! refusing the old certificate cannot pin us to a dead connection.
//!
//! Each failure is classified as the OTLP specification says ([`Retry`]) and carries the
//! collector's retry hint when it sent one: gRPC `google.rpc.RetryInfo` in
//! `grpc-status-details-bin`, HTTP `Retry-After`. The request body is encoded once per attempt
//! by [`super::encode`] (the same `ExportTraceServiceRequest` opentelemetry-proto would make, for
//! a fraction of the CPU) and sent as bytes: over tonic's gRPC client with a pass-through codec,
//! so the full `tonic::Status` is ours to read, or POSTed with hyper for http/protobuf. The
//! retry loop itself is in [`super::export`].

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use super::encode::Batch;
use bytes::Bytes;
use http::Uri;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use opentelemetry_sdk::Resource;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::{OtlpConfig, OtlpProtocol};

use super::tls::{TlsError, TlsSource};

/// How often the TLS files are re-read.
const TLS_POLL: Duration = Duration::from_secs(2);

/// A failure to set up the exporter.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("invalid OTLP endpoint {0:?}")]
    Endpoint(String),
    #[error("cannot build the OTLP exporter: {0}")]
    Build(String),
}

/// What to do after a failed export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// The collector refused the data itself (or we cannot send at all): drop the batch.
    Never,
    /// Transient: try again after the exponential back-off.
    Backoff,
    /// Transient, and the collector said when: try again after this delay.
    After(Duration),
}

/// One failed export attempt.
#[derive(Debug, Clone)]
pub struct ExportFailure {
    pub retry: Retry,
    /// The `tracecar_spans_dropped_total` reason when the batch is dropped for it.
    pub reason: &'static str,
    pub message: String,
}

impl ExportFailure {
    fn new(retry: Retry, reason: &'static str, message: impl Into<String>) -> Self {
        ExportFailure {
            retry,
            reason,
            message: message.into(),
        }
    }
}

/// TLS for the export connection, if any.
#[derive(Debug, Clone)]
enum TlsState {
    Off,
    On(Arc<TlsSource>),
    /// The material could not be loaded at start-up and export is not required: retried on
    /// every export, spans are dropped (reason `tls_material`) until it loads.
    Broken(String),
}

/// The exporter with its current connection pool.
#[derive(Debug)]
enum Client {
    Grpc {
        grpc: tonic::client::Grpc<tonic::transport::Channel>,
        metadata: tonic::metadata::MetadataMap,
    },
    Http {
        client: Box<hyper_util::client::legacy::Client<Connector, Full<Bytes>>>,
        uri: Uri,
        headers: http::HeaderMap,
    },
}

/// The gRPC method every OTLP trace export calls.
const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// A tonic codec that sends an already encoded request (`len` bytes) and decodes the OTLP
/// response.
#[derive(Debug, Clone, Copy, Default)]
struct PreEncoded {
    len: usize,
}

impl tonic::codec::Codec for PreEncoded {
    type Encode = Bytes;
    type Decode = ExportTraceServiceResponse;
    type Encoder = PreEncoded;
    type Decoder = PreEncoded;

    fn encoder(&mut self) -> Self::Encoder {
        *self
    }

    fn decoder(&mut self) -> Self::Decoder {
        *self
    }
}

impl tonic::codec::Encoder for PreEncoded {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put(dst, item);
        Ok(())
    }

    /// One buffer that fits the whole message: tonic's default (8 KiB, doubling) reallocated
    /// and page-faulted its way up to a batch's size on every export.
    fn buffer_settings(&self) -> tonic::codec::BufferSettings {
        tonic::codec::BufferSettings::new(self.len + 64, self.len + 64)
    }
}

impl tonic::codec::Decoder for PreEncoded {
    type Item = ExportTraceServiceResponse;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<ExportTraceServiceResponse>, tonic::Status> {
        prost::Message::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

/// What an http/protobuf export got back.
#[derive(Debug, Clone, Copy)]
enum HttpAnswer {
    Status(u16, Option<Duration>),
    Transport,
}

/// The OTLP span exporter: protocol, TLS and the pool, rebuilt when the TLS material changes.
#[derive(Debug)]
pub struct OtlpExporter {
    cfg: OtlpConfig,
    tls: TlsState,
    resource: Resource,
    /// The pool and the TLS generation its connections were made with.
    client: Option<(u64, Client)>,
}

impl OtlpExporter {
    /// Builds the exporter; TLS is on for `https://` endpoints or when any TLS file is configured.
    /// With `cfg.required` false, unusable TLS material is reported by [`Self::problem`] and
    /// retried on each export instead of failing here.
    pub fn new(cfg: &OtlpConfig) -> Result<OtlpExporter, OtlpError> {
        let uri: Uri = cfg
            .endpoint
            .parse()
            .map_err(|_| OtlpError::Endpoint(cfg.endpoint.clone()))?;
        if uri.host().is_none() {
            return Err(OtlpError::Endpoint(cfg.endpoint.clone()));
        }
        let wants_tls = uri.scheme_str() == Some("https")
            || cfg.tls.ca_file.is_some()
            || cfg.tls.client_cert_file.is_some();
        let tls = if !wants_tls {
            TlsState::Off
        } else {
            match load_tls(cfg) {
                Ok(source) => TlsState::On(source),
                Err(e) if !cfg.required => {
                    tracing::error!(
                        error = %e,
                        "export TLS material unusable; serving traffic without span export \
                         (TRACECAR_EXPORT_REQUIRED=false) until it loads"
                    );
                    TlsState::Broken(e.to_string())
                }
                Err(e) => return Err(e.into()),
            }
        };
        let resource = Resource::builder_empty().build();
        let mut this = OtlpExporter {
            cfg: cfg.clone(),
            tls,
            resource,
            client: None,
        };
        // Build the pool now so endpoint problems show at start-up.
        if !matches!(this.tls, TlsState::Broken(_)) {
            let generation = this.generation();
            this.client = Some((generation, this.build()?));
        }
        Ok(this)
    }

    /// Another exporter for concurrent exports: same settings and TLS source (one file watcher),
    /// its own connection pool, built on first use.
    pub fn sibling(&self) -> OtlpExporter {
        OtlpExporter {
            cfg: self.cfg.clone(),
            tls: self.tls.clone(),
            resource: self.resource.clone(),
            client: None,
        }
    }

    /// Why export cannot work at all right now (start-up material missing), if so.
    pub fn problem(&self) -> Option<String> {
        match &self.tls {
            TlsState::Broken(e) => Some(e.clone()),
            _ => None,
        }
    }

    pub fn set_resource(&mut self, resource: &Resource) {
        self.resource = resource.clone();
    }

    fn generation(&self) -> u64 {
        match &self.tls {
            TlsState::On(s) => s.generation(),
            _ => 0,
        }
    }

    /// Sends one batch, once. The caller retries as [`ExportFailure::retry`] says.
    pub async fn export(&mut self, batch: &Batch) -> Result<(), ExportFailure> {
        if let TlsState::Broken(_) = &self.tls {
            match load_tls(&self.cfg) {
                Ok(source) => {
                    tracing::info!("export TLS material loaded; span export starts");
                    self.tls = TlsState::On(source);
                }
                Err(e) => {
                    let msg = e.to_string();
                    self.tls = TlsState::Broken(msg.clone());
                    return Err(ExportFailure::new(Retry::Never, "tls_material", msg));
                }
            }
        }
        let generation = self.generation();
        let stale = !matches!(&self.client, Some((g, _)) if *g == generation);
        if stale {
            // New material (or none yet): new pool, so new connections use it; the old pool and
            // its connections are dropped.
            let client = self
                .build()
                .map_err(|e| ExportFailure::new(Retry::Never, "export_failed", e.to_string()))?;
            self.client = Some((generation, client));
        }
        let Some((_, client)) = &mut self.client else {
            return Err(ExportFailure::new(
                Retry::Backoff,
                "export_failed",
                "no export client",
            ));
        };
        let body = Bytes::from(super::encode::export_request(&self.resource, batch));
        let len = body.len();
        let timeout = self.cfg.timeout;
        let result = match client {
            Client::Grpc { grpc, metadata } => {
                let mut request = tonic::Request::new(body);
                *request.metadata_mut() = metadata.clone();
                request.set_timeout(timeout);
                let call = async {
                    grpc.ready().await.map_err(|e| {
                        tonic::Status::unknown(format!("Service was not ready: {e}"))
                    })?;
                    grpc.unary(
                        request,
                        http::uri::PathAndQuery::from_static(EXPORT_PATH),
                        PreEncoded { len },
                    )
                    .await
                };
                match tokio::time::timeout(timeout, call).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(status)) => Err(classify_grpc(&status)),
                    Err(_) => Err(ExportFailure::new(
                        Retry::Backoff,
                        "export_failed",
                        "export timed out",
                    )),
                }
            }
            Client::Http {
                client,
                uri,
                headers,
            } => post(client, uri, headers, body, timeout).await,
        };
        if let Err(f) = &result {
            // Without a hint from a live collector, assume the connection is the problem and
            // start the next attempt on a fresh one (with the current material).
            if f.retry == Retry::Backoff {
                self.client = None;
            }
        }
        result
    }

    fn build(&self) -> Result<Client, OtlpError> {
        let connector = Connector {
            tls: match &self.tls {
                TlsState::On(s) => Some(s.clone()),
                _ => None,
            },
            connect_timeout: self.cfg.timeout,
        };
        let cfg = &self.cfg;
        match cfg.protocol {
            OtlpProtocol::Grpc => {
                // The scheme only tells tonic how to build URIs; TLS is the connector's job.
                let plain = cfg.endpoint.replacen("https://", "http://", 1);
                let endpoint = tonic::transport::Endpoint::from_shared(plain)
                    .map_err(|e| OtlpError::Endpoint(e.to_string()))?
                    .connect_timeout(cfg.timeout)
                    .timeout(cfg.timeout);
                let channel = endpoint.connect_with_connector_lazy(connector);
                let mut metadata = tonic::metadata::MetadataMap::new();
                for (k, v) in &cfg.headers {
                    if let (Ok(k), Ok(v)) = (
                        tonic::metadata::MetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes()),
                        v.parse(),
                    ) {
                        metadata.insert(k, v);
                    }
                }
                Ok(Client::Grpc {
                    grpc: tonic::client::Grpc::new(channel),
                    metadata,
                })
            }
            OtlpProtocol::HttpProtobuf => {
                let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(30))
                    .build(connector);
                let uri: Uri = cfg
                    .endpoint
                    .parse()
                    .map_err(|_| OtlpError::Endpoint(cfg.endpoint.clone()))?;
                let mut headers = http::HeaderMap::new();
                for (k, v) in &cfg.headers {
                    if let (Ok(k), Ok(v)) = (
                        http::header::HeaderName::from_bytes(k.as_bytes()),
                        http::HeaderValue::from_str(v),
                    ) {
                        headers.insert(k, v);
                    }
                }
                headers.insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/x-protobuf"),
                );
                Ok(Client::Http {
                    client: Box::new(client),
                    uri,
                    headers,
                })
            }
        }
    }
}

/// One http/protobuf export: POST the encoded request, classify what came back.
async fn post(
    client: &hyper_util::client::legacy::Client<Connector, Full<Bytes>>,
    uri: &Uri,
    headers: &http::HeaderMap,
    body: Bytes,
    timeout: Duration,
) -> Result<(), ExportFailure> {
    let mut request = http::Request::new(Full::new(body));
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = uri.clone();
    *request.headers_mut() = headers.clone();
    let transport = |message: String| classify_http(HttpAnswer::Transport, message);
    let response = match tokio::time::timeout(timeout, client.request(request)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(transport(crate::errors::error_chain(&e))),
        Err(_) => return Err(transport("export request timed out".into())),
    };
    let (parts, body) = response.into_parts();
    let answer = HttpAnswer::Status(parts.status.as_u16(), retry_after(&parts.headers));
    // Read the body to the end so the connection goes back to the pool.
    let body = match tokio::time::timeout(timeout, body.collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) => return Err(transport(e.to_string())),
        Err(_) => return Err(transport("export response timed out".into())),
    };
    if parts.status.is_success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(256)]);
    let message = if text.trim().is_empty() {
        "the collector sent no explanation".to_string()
    } else {
        text.trim().to_string()
    };
    Err(classify_http(answer, message))
}

fn load_tls(cfg: &OtlpConfig) -> Result<Arc<TlsSource>, TlsError> {
    let alpn: &[&[u8]] = match cfg.protocol {
        OtlpProtocol::Grpc => &[b"h2"],
        OtlpProtocol::HttpProtobuf => &[b"http/1.1"],
    };
    let source = TlsSource::load(&cfg.tls, alpn)?;
    source.watch(TLS_POLL);
    Ok(source)
}

/// OTLP/gRPC failure handling per the OTLP specification: these codes are transient;
/// `RESOURCE_EXHAUSTED` only when the collector sent `RetryInfo`. Errors tonic made locally
/// (connect, TLS handshake, broken connection) are transient too.
fn classify_grpc(status: &tonic::Status) -> ExportFailure {
    use tonic::Code;
    let hint = retry_info(status.details());
    let source = std::error::Error::source(status);
    let local = source.is_some();
    let message = match source {
        Some(src) => format!(
            "gRPC {:?}: {} ({})",
            status.code(),
            status.message(),
            crate::errors::error_chain(src)
        ),
        None => format!("gRPC {:?}: {}", status.code(), status.message()),
    };
    let transient = matches!(
        status.code(),
        Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::OutOfRange
            | Code::Unavailable
            | Code::DataLoss
    ) || (status.code() == Code::ResourceExhausted && hint.is_some())
        || local;
    let retry = match (transient, hint) {
        (false, _) => Retry::Never,
        (true, Some(d)) => Retry::After(d),
        (true, None) => Retry::Backoff,
    };
    let reason = if transient {
        "export_failed"
    } else {
        "rejected"
    };
    ExportFailure::new(retry, reason, message)
}

/// OTLP/HTTP failure handling: 429, 502, 503, 504 and network errors are transient, honouring
/// `Retry-After`; any other status means the collector refused the data.
fn classify_http(answer: HttpAnswer, message: String) -> ExportFailure {
    match answer {
        HttpAnswer::Status(code, hint) => {
            let message = format!("HTTP {code}: {message}");
            if matches!(code, 429 | 502 | 503 | 504) {
                let retry = hint.map_or(Retry::Backoff, Retry::After);
                ExportFailure::new(retry, "export_failed", message)
            } else {
                ExportFailure::new(Retry::Never, "rejected", message)
            }
        }
        HttpAnswer::Transport => ExportFailure::new(Retry::Backoff, "export_failed", message),
    }
}

/// `Retry-After` in its delay-seconds form (the HTTP-date form is rare from collectors and is
/// treated as no hint).
fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let v = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The `google.rpc.RetryInfo.retry_delay` inside an encoded `google.rpc.Status` (the
/// `grpc-status-details-bin` trailer), if present. A small protobuf walk: Status.details (3) is
/// a repeated `Any` {type_url (1), value (2)}; RetryInfo.retry_delay (1) is a `Duration`
/// {seconds (1), nanos (2)}.
fn retry_info(details: &[u8]) -> Option<Duration> {
    for (field, value) in proto_fields(details)? {
        let (3, Field::Bytes(any)) = (field, value) else {
            continue;
        };
        let mut type_url: &[u8] = b"";
        let mut payload: &[u8] = b"";
        for (f, v) in proto_fields(any)? {
            match (f, v) {
                (1, Field::Bytes(b)) => type_url = b,
                (2, Field::Bytes(b)) => payload = b,
                _ => {}
            }
        }
        if !type_url.ends_with(b"google.rpc.RetryInfo") {
            continue;
        }
        for (f, v) in proto_fields(payload)? {
            if let (1, Field::Bytes(d)) = (f, v) {
                let (mut secs, mut nanos) = (0u64, 0u64);
                for (f, v) in proto_fields(d)? {
                    match (f, v) {
                        (1, Field::Varint(s)) => secs = s,
                        (2, Field::Varint(n)) => nanos = n,
                        _ => {}
                    }
                }
                return Some(
                    Duration::from_secs(secs) + Duration::from_nanos(nanos.min(999_999_999)),
                );
            }
        }
    }
    None
}

enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Other,
}

/// The top-level fields of one protobuf message; `None` when it is malformed.
fn proto_fields(mut buf: &[u8]) -> Option<Vec<(u64, Field<'_>)>> {
    fn varint(buf: &mut &[u8]) -> Option<u64> {
        prost::encoding::decode_varint(buf).ok()
    }
    let mut out = Vec::new();
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let field = match key & 7 {
            0 => Field::Varint(varint(&mut buf)?),
            1 => {
                buf = buf.get(8..)?;
                Field::Other
            }
            2 => {
                let len = usize::try_from(varint(&mut buf)?).ok()?;
                let (b, rest) = (buf.get(..len)?, buf.get(len..)?);
                buf = rest;
                Field::Bytes(b)
            }
            5 => {
                buf = buf.get(4..)?;
                Field::Other
            }
            _ => return None,
        };
        out.push((key >> 3, field));
    }
    Some(out)
}

/// TCP, then TLS with the material current at connect time.
#[derive(Debug, Clone)]
struct Connector {
    tls: Option<Arc<TlsSource>>,
    connect_timeout: Duration,
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<ExportStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "endpoint has no host"))?
                .trim_matches(|c| c == '[' || c == ']')
                .to_string();
            let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
                Some("https") => 443,
                _ => 80,
            });
            let tcp = tokio::time::timeout(
                this.connect_timeout,
                TcpStream::connect((host.as_str(), port)),
            )
            .await
            .map_err(|_| {
                io::Error::new(io::ErrorKind::TimedOut, "connect to collector timed out")
            })??;
            let _ = tcp.set_nodelay(true);
            let Some(tls) = this.tls else {
                return Ok(TokioIo::new(ExportStream::Plain(tcp)));
            };
            let name = tls.server_name_override().unwrap_or(&host).to_string();
            let server_name = rustls::pki_types::ServerName::try_from(name)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let stream = tokio_rustls::TlsConnector::from(tls.config())
                .connect(server_name, tcp)
                .await?;
            Ok(TokioIo::new(ExportStream::Tls(Box::new(stream))))
        })
    }
}

/// A plain or TLS connection to the collector.
#[derive(Debug)]
pub enum ExportStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Connection for ExportStream {
    fn connected(&self) -> Connected {
        match self {
            ExportStream::Tls(s) if s.get_ref().1.alpn_protocol() == Some(b"h2") => {
                Connected::new().negotiated_h2()
            }
            _ => Connected::new(),
        }
    }
}

impl AsyncRead for ExportStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ExportStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ExportStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ExportStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ExportStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ExportStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ExportStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ExportStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ExportStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ExportStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_info_is_read_from_status_details() {
        // google.rpc.Status { code: 14, details: [Any { type_url, value: RetryInfo { 2.5s } }] }
        let duration = [0x08, 0x02, 0x10, 0x80, 0xca, 0xb5, 0xee, 0x01]; // 2s, 500_000_000ns
        let mut retry = vec![0x0a, duration.len() as u8];
        retry.extend_from_slice(&duration);
        let url = b"type.googleapis.com/google.rpc.RetryInfo";
        let mut any = vec![0x0a, url.len() as u8];
        any.extend_from_slice(url);
        any.extend_from_slice(&[0x12, retry.len() as u8]);
        any.extend_from_slice(&retry);
        let mut status = vec![0x08, 14];
        status.extend_from_slice(&[0x1a, any.len() as u8]);
        status.extend_from_slice(&any);
        assert_eq!(retry_info(&status), Some(Duration::from_millis(2500)));
        assert_eq!(retry_info(&[0x08, 14]), None);
        assert_eq!(retry_info(&[0x1a, 0x7f]), None, "truncated");
    }

    #[test]
    fn grpc_and_http_failures_follow_the_otlp_spec() {
        let s = tonic::Status::unavailable("down");
        assert_eq!(classify_grpc(&s).retry, Retry::Backoff);
        let s = tonic::Status::invalid_argument("bad");
        assert_eq!(classify_grpc(&s).retry, Retry::Never);
        assert_eq!(classify_grpc(&s).reason, "rejected");
        let s = tonic::Status::resource_exhausted("slow down");
        assert_eq!(classify_grpc(&s).retry, Retry::Never);
        let hint = HttpAnswer::Status(429, Some(Duration::from_secs(3)));
        assert_eq!(
            classify_http(hint, String::new()).retry,
            Retry::After(Duration::from_secs(3))
        );
        let r = classify_http(HttpAnswer::Status(503, None), String::new());
        assert_eq!(r.retry, Retry::Backoff);
        let r = classify_http(HttpAnswer::Status(400, None), String::new());
        assert_eq!((r.retry, r.reason), (Retry::Never, "rejected"));
        let r = classify_http(HttpAnswer::Transport, String::new());
        assert_eq!(r.retry, Retry::Backoff);
    }

    /// Property tests: what a collector answers (status details, Retry-After), arbitrary and
    /// mutated.
    mod fuzz {
        use super::*;
        use crate::fuzzing::{self, mutate, mutations, text};
        use proptest::prelude::*;

        fn varint(mut v: u64, out: &mut Vec<u8>) {
            while v >= 0x80 {
                out.push((v as u8) | 0x80);
                v >>= 7;
            }
            out.push(v as u8);
        }

        fn bytes_field(field: u64, data: &[u8], out: &mut Vec<u8>) {
            varint(field << 3 | 2, out);
            varint(data.len() as u64, out);
            out.extend_from_slice(data);
        }

        /// An encoded `google.rpc.Status` whose details hold a RetryInfo of `secs`/`nanos`,
        /// after `before` other details.
        fn status(code: u64, secs: u64, nanos: u64, before: &[Vec<u8>]) -> Vec<u8> {
            let mut duration = Vec::new();
            varint(1 << 3, &mut duration);
            varint(secs, &mut duration);
            varint(2 << 3, &mut duration);
            varint(nanos, &mut duration);
            let mut retry = Vec::new();
            bytes_field(1, &duration, &mut retry);
            let mut out = Vec::new();
            varint(1 << 3, &mut out);
            varint(code, &mut out);
            bytes_field(2, b"try later", &mut out);
            for other in before {
                let mut any = Vec::new();
                bytes_field(1, b"type.googleapis.com/google.rpc.DebugInfo", &mut any);
                bytes_field(2, other, &mut any);
                bytes_field(3, &any, &mut out);
            }
            let mut any = Vec::new();
            bytes_field(1, b"type.googleapis.com/google.rpc.RetryInfo", &mut any);
            bytes_field(2, &retry, &mut any);
            bytes_field(3, &any, &mut out);
            out
        }

        proptest! {
            #![proptest_config(fuzzing::config())]

            #[test]
            fn fuzz_retry_info_valid(
                code in 0u64..17,
                secs in any::<u64>(),
                nanos in 0u64..1_000_000_000,
                before in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..16), 0..3),
            ) {
                let details = status(code, secs, nanos, &before);
                prop_assert_eq!(retry_info(&details), Some(Duration::new(secs, nanos as u32)));
            }

            /// Whatever the details hold, reading them never panics, and a delay is only found
            /// inside a RetryInfo.
            #[test]
            fn fuzz_retry_info_arbitrary(
                details in prop_oneof![
                    prop::collection::vec(any::<u8>(), 0..128),
                    (any::<u64>(), any::<u64>(), mutations()).prop_map(|(s, n, m)| {
                        mutate(&status(14, s, n, &[]), &m, &[&[0x1a], &[0xff; 10], &[0x0a, 0x7f]])
                    }),
                ],
            ) {
                if retry_info(&details).is_some() {
                    let name = b"google.rpc.RetryInfo";
                    prop_assert!(details.windows(name.len()).any(|w| w == name));
                }
                let status = tonic::Status::with_details(
                    tonic::Code::Unavailable,
                    "down",
                    bytes::Bytes::from(details),
                );
                let _ = classify_grpc(&status);
            }

            #[test]
            fn fuzz_retry_after(v in prop_oneof![text(), any::<u64>().prop_map(|n| n.to_string())]) {
                let mut h = http::HeaderMap::new();
                if let Ok(value) = http::HeaderValue::from_str(&v) {
                    h.insert(http::header::RETRY_AFTER, value);
                    // Only a visible-ASCII value is read (`0\u{a0}`, found by a long run, is
                    // no hint, though `trim` would make it `0`).
                    let want = v
                        .is_ascii()
                        .then(|| v.trim().parse::<u64>().ok().map(Duration::from_secs))
                        .flatten();
                    prop_assert_eq!(retry_after(&h), want);
                }
            }
        }
    }
}
