//! The OTLP exporter (gRPC or http/protobuf) over our own connector, so that every new export
//! connection takes the current TLS material (see [`super::tls`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::{OtlpConfig, OtlpProtocol};

use super::tls::{TlsError, TlsSource};

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

/// Builds the exporter; TLS is on for `https://` endpoints or when any TLS file is configured.
pub fn exporter(cfg: &OtlpConfig) -> Result<opentelemetry_otlp::SpanExporter, OtlpError> {
    let uri: Uri = cfg
        .endpoint
        .parse()
        .map_err(|_| OtlpError::Endpoint(cfg.endpoint.clone()))?;
    let wants_tls = uri.scheme_str() == Some("https")
        || cfg.tls.ca_file.is_some()
        || cfg.tls.client_cert_file.is_some();
    let alpn: &[&[u8]] = match cfg.protocol {
        OtlpProtocol::Grpc => &[b"h2"],
        OtlpProtocol::HttpProtobuf => &[b"http/1.1"],
    };
    let tls = if wants_tls {
        let source = TlsSource::load(&cfg.tls, alpn)?;
        source.watch(Duration::from_secs(2));
        Some(source)
    } else {
        None
    };
    let connector = Connector {
        tls,
        connect_timeout: cfg.timeout,
    };
    match cfg.protocol {
        OtlpProtocol::Grpc => {
            // The scheme only tells tonic how to build URIs; TLS is the connector's job.
            let plain = cfg.endpoint.replacen("https://", "http://", 1);
            let endpoint = tonic::transport::Endpoint::from_shared(plain)
                .map_err(|e| OtlpError::Endpoint(e.to_string()))?
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
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_channel(channel)
                .with_metadata(metadata)
                .with_timeout(cfg.timeout)
                .build()
                .map_err(|e| OtlpError::Build(e.to_string()))
        }
        OtlpProtocol::HttpProtobuf => {
            let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector);
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_http_client(HttpClient {
                    client,
                    timeout: cfg.timeout,
                })
                .with_endpoint(cfg.endpoint.clone())
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_headers(cfg.headers.iter().cloned().collect())
                .with_timeout(cfg.timeout)
                .build()
                .map_err(|e| OtlpError::Build(e.to_string()))
        }
    }
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

/// `opentelemetry_http::HttpClient` over hyper with our connector.
#[derive(Debug, Clone)]
struct HttpClient {
    client: hyper_util::client::legacy::Client<Connector, Full<Bytes>>,
    timeout: Duration,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for HttpClient {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let request = request.map(Full::new);
        let response = tokio::time::timeout(self.timeout, self.client.request(request))
            .await
            .map_err(|_| "export request timed out")??;
        let (parts, body) = response.into_parts();
        let body = tokio::time::timeout(self.timeout, body.collect())
            .await
            .map_err(|_| "export response timed out")??
            .to_bytes();
        Ok(http::Response::from_parts(parts, body))
    }
}
