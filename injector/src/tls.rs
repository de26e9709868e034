//! The serving certificate, reloaded when its files change without dropping requests.
//!
//! [`ReloadingResolver`] is a rustls `ResolvesServerCert` holding the current
//! `CertifiedKey` in an `ArcSwap`: every handshake loads it lock-free, [`watch`] polls the
//! files and swaps in a new pair when their contents changed and the pair is valid. A bad
//! pair (unparsable, or key not matching the certificate) is logged and the old one stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: no PEM certificate found")]
    NoCert(PathBuf),
    #[error("{0}: no PEM private key found")]
    NoKey(PathBuf),
    #[error("{path}: bad PEM: {source}")]
    Pem {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate and key do not form a usable pair: {0}")]
    Pair(rustls::Error),
    #[error("TLS configuration: {0}")]
    Config(rustls::Error),
}

/// Parses a PEM certificate chain and private key into a checked `CertifiedKey`.
pub fn certified_key(
    cert_pem: &[u8],
    key_pem: &[u8],
    cert_path: &Path,
    key_path: &Path,
) -> Result<CertifiedKey, TlsError> {
    let certs = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: cert_path.into(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCert(cert_path.into()));
    }
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|source| TlsError::Pem {
            path: key_path.into(),
            source,
        })?
        .ok_or_else(|| TlsError::NoKey(key_path.into()))?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(certs, key, &provider).map_err(TlsError::Pair)
}

/// Hands the current certificate to every handshake.
#[derive(Debug)]
pub struct ReloadingResolver {
    current: ArcSwap<CertifiedKey>,
}

impl ReloadingResolver {
    pub fn new(key: CertifiedKey) -> Self {
        ReloadingResolver {
            current: ArcSwap::from_pointee(key),
        }
    }

    pub fn set(&self, key: CertifiedKey) {
        self.current.store(Arc::new(key));
    }

    pub fn current(&self) -> Arc<CertifiedKey> {
        self.current.load_full()
    }
}

impl ResolvesServerCert for ReloadingResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The certificate files, their last-seen contents and the resolver they feed.
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    last: (Vec<u8>, Vec<u8>),
    pub resolver: Arc<ReloadingResolver>,
}

impl CertFiles {
    /// Loads the pair once; start-up fails if it is not valid.
    pub async fn load(cert: PathBuf, key: PathBuf) -> Result<CertFiles, TlsError> {
        let (c, k) = read_pair(&cert, &key).await?;
        let ck = certified_key(&c, &k, &cert, &key)?;
        Ok(CertFiles {
            cert,
            key,
            last: (c, k),
            resolver: Arc::new(ReloadingResolver::new(ck)),
        })
    }

    /// Re-reads the files; swaps the certificate if their contents changed and are valid.
    /// Returns `Some(result)` when something changed.
    pub async fn poll(&mut self) -> Option<Result<(), TlsError>> {
        let pair = match read_pair(&self.cert, &self.key).await {
            Ok(p) => p,
            Err(e) => return Some(Err(e)),
        };
        if pair == self.last {
            return None;
        }
        let result =
            certified_key(&pair.0, &pair.1, &self.cert, &self.key).map(|ck| self.resolver.set(ck));
        // Remember the contents either way, so a bad pair is reported once, not every poll.
        self.last = pair;
        Some(result)
    }
}

async fn read_pair(cert: &Path, key: &Path) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    let c = tokio::fs::read(cert)
        .await
        .map_err(|source| TlsError::Read {
            path: cert.into(),
            source,
        })?;
    let k = tokio::fs::read(key)
        .await
        .map_err(|source| TlsError::Read {
            path: key.into(),
            source,
        })?;
    Ok((c, k))
}

/// Polls the files every `interval` until `shutdown` fires.
pub async fn watch(
    mut files: CertFiles,
    interval: Duration,
    metrics: Arc<Metrics>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error: Option<String> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        match files.poll().await {
            None => {}
            Some(Ok(())) => {
                last_error = None;
                metrics.tls_reload(true);
                tracing::info!(cert = %files.cert.display(), "serving certificate reloaded");
            }
            Some(Err(e)) => {
                let msg = e.to_string();
                // Read errors (e.g. files mid-rotation) repeat every poll: log changes only.
                if last_error.as_deref() != Some(msg.as_str()) {
                    metrics.tls_reload(false);
                    tracing::warn!(error = %msg, "new serving certificate rejected; keeping the current one");
                }
                last_error = Some(msg);
            }
        }
    }
}

/// The rustls server configuration: ring provider, TLS 1.2/1.3, ALPN h2 and http/1.1.
pub fn server_config(resolver: Arc<ReloadingResolver>) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}
