//! TLS for the export connection: CA bundle, optional client certificate (mutual TLS), reloaded
//! from disk when the files change.
//!
//! Kubernetes rotates a mounted Secret by swapping a symlink, so the watcher compares file
//! contents rather than watching inodes. A new pair that fails to load (half-written, key not
//! matching the certificate) is rejected with one log line and the previous material stays.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

/// A problem with the export TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {var} file {path:?}: {source}")]
    Read {
        var: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{var} file {path:?} holds no usable {what}")]
    Empty {
        var: &'static str,
        path: String,
        what: &'static str,
    },
    #[error("{var} file {path:?} is not usable: {reason}")]
    Invalid {
        var: &'static str,
        path: String,
        reason: String,
    },
    #[error("client key {key:?} does not match client certificate {cert:?}: {reason}")]
    Mismatch {
        cert: String,
        key: String,
        reason: String,
    },
}

impl TlsError {
    /// The setting at fault: environment variable, CLI flag, the value given, and what a good
    /// value is; for start-up errors that name the variable.
    pub fn setting(&self) -> (&'static str, &'static str, String, String) {
        let flag = |var: &str| match var {
            CA => "otlp-certificate",
            CERT => "otlp-client-certificate",
            _ => "otlp-client-key",
        };
        match self {
            TlsError::Read { var, path, source } => (
                var,
                flag(var),
                path.clone(),
                format!("a readable PEM file ({source})"),
            ),
            TlsError::Empty { var, path, what } => (
                var,
                flag(var),
                path.clone(),
                format!("a file holding a {what}"),
            ),
            TlsError::Invalid { var, path, reason } => (
                var,
                flag(var),
                path.clone(),
                format!("a valid PEM file ({reason})"),
            ),
            TlsError::Mismatch { cert, key, reason } => (
                KEY,
                "otlp-client-key",
                key.clone(),
                format!("the private key of the certificate in {CERT} {cert:?} ({reason})"),
            ),
        }
    }
}

/// TLS material for the export connection (files, re-read when they change).
#[derive(Debug, Clone, Default)]
pub struct ExportTls {
    pub ca_file: Option<String>,
    pub client_cert_file: Option<String>,
    pub client_key_file: Option<String>,
    pub server_name: Option<String>,
}

const CA: &str = "OTEL_EXPORTER_OTLP_CERTIFICATE";
const CERT: &str = "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE";
const KEY: &str = "OTEL_EXPORTER_OTLP_CLIENT_KEY";

/// Loads and checks the material once, as start-up validation does.
pub fn check(files: &ExportTls) -> Result<(), TlsError> {
    let snap = TlsSource::snapshot(files)?;
    build(files, &snap, &[]).map(|_| ())
}

/// The raw file contents a config was built from, to notice changes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Snapshot {
    ca: Option<Vec<u8>>,
    cert: Option<Vec<u8>>,
    key: Option<Vec<u8>>,
}

/// The current client TLS configuration, swapped in place on rotation.
///
/// Every swap bumps [`TlsSource::generation`], so the exporter knows when its pooled
/// connections still run on old material and must be replaced (see [`super::otlp`]).
#[derive(Debug)]
pub struct TlsSource {
    files: ExportTls,
    alpn: Vec<Vec<u8>>,
    current: RwLock<(Snapshot, Arc<ClientConfig>)>,
    generation: AtomicU64,
}

fn read(var: &'static str, path: &Option<String>) -> Result<Option<Vec<u8>>, TlsError> {
    match path {
        None => Ok(None),
        Some(p) => std::fs::read(p).map(Some).map_err(|source| TlsError::Read {
            var,
            path: p.clone(),
            source,
        }),
    }
}

impl TlsSource {
    /// Loads the material now; an error here is a start-up error.
    pub fn load(files: &ExportTls, alpn: &[&[u8]]) -> Result<Arc<TlsSource>, TlsError> {
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|a| a.to_vec()).collect();
        let snap = Self::snapshot(files)?;
        let config = build(files, &snap, &alpn)?;
        Ok(Arc::new(TlsSource {
            files: files.clone(),
            alpn,
            current: RwLock::new((snap, Arc::new(config))),
            generation: AtomicU64::new(1),
        }))
    }

    fn snapshot(files: &ExportTls) -> Result<Snapshot, TlsError> {
        Ok(Snapshot {
            ca: read(CA, &files.ca_file)?,
            cert: read(CERT, &files.client_cert_file)?,
            key: read(KEY, &files.client_key_file)?,
        })
    }

    /// The configuration new connections should use.
    pub fn config(&self) -> Arc<ClientConfig> {
        match self.current.read() {
            Ok(g) => g.1.clone(),
            Err(p) => p.into_inner().1.clone(),
        }
    }

    /// Bumped each time new material is taken; starts at 1.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn server_name_override(&self) -> Option<&str> {
        self.files.server_name.as_deref()
    }

    /// Re-reads the files; swaps the config if they changed and load cleanly.
    /// Returns `Ok(true)` when new material was taken.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let snap = Self::snapshot(&self.files)?;
        if self.current.read().map(|g| g.0 == snap).unwrap_or(false) {
            return Ok(false);
        }
        let config = build(&self.files, &snap, &self.alpn)?;
        match self.current.write() {
            Ok(mut g) => *g = (snap, Arc::new(config)),
            Err(p) => *p.into_inner() = (snap, Arc::new(config)),
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(true)
    }

    /// Polls the files every `period` for as long as the source is in use.
    pub fn watch(self: &Arc<Self>, period: Duration) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut last_error: Option<String> = None;
            loop {
                tokio::time::sleep(period).await;
                let Some(source) = weak.upgrade() else { return };
                match source.reload() {
                    Ok(true) => {
                        tracing::info!(
                            generation = source.generation(),
                            "export TLS material changed on disk; new export connections use it"
                        );
                        last_error = None;
                    }
                    Ok(false) => last_error = None,
                    Err(e) => {
                        let msg = e.to_string();
                        if last_error.as_deref() != Some(msg.as_str()) {
                            tracing::warn!(error = %msg, "new export TLS material rejected; keeping the previous material");
                            last_error = Some(msg);
                        }
                    }
                }
            }
        });
    }
}

fn build(files: &ExportTls, snap: &Snapshot, alpn: &[Vec<u8>]) -> Result<ClientConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let ca_path = files.ca_file.clone().unwrap_or_default();
    let cert_path = files.client_cert_file.clone().unwrap_or_default();
    let invalid = |var: &'static str, path: &str| {
        let path = path.to_string();
        move |e: rustls::Error| TlsError::Invalid {
            var,
            path,
            reason: e.to_string(),
        }
    };
    let mut roots = RootCertStore::empty();
    match &snap.ca {
        Some(pem) => {
            let certs = certs(pem);
            if certs.is_empty() {
                return Err(TlsError::Empty {
                    var: CA,
                    path: ca_path,
                    what: "PEM certificate",
                });
            }
            for c in certs {
                roots.add(c).map_err(invalid(CA, &ca_path))?;
            }
        }
        None => {
            // No CA bundle given: trust the system's roots, as an SDK would.
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
        }
    }
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(invalid(CA, &ca_path))?
        .with_root_certificates(roots);
    let mut config = match (&snap.cert, &snap.key) {
        (Some(cert_pem), Some(key_pem)) => {
            let key_path = files.client_key_file.clone().unwrap_or_default();
            let chain = certs(cert_pem);
            if chain.is_empty() {
                return Err(TlsError::Empty {
                    var: CERT,
                    path: cert_path,
                    what: "PEM certificate",
                });
            }
            let key = private_key(key_pem).ok_or_else(|| TlsError::Empty {
                var: KEY,
                path: key_path.clone(),
                what: "PEM private key (PKCS#8, SEC1 or PKCS#1)",
            })?;
            let signing = provider
                .key_provider
                .load_private_key(key.clone_key())
                .map_err(|e| TlsError::Mismatch {
                    cert: cert_path.clone(),
                    key: key_path.clone(),
                    reason: e.to_string(),
                })?;
            let certified = rustls::sign::CertifiedKey::new(chain.clone(), signing);
            certified.keys_match().map_err(|e| TlsError::Mismatch {
                cert: cert_path.clone(),
                key: key_path.clone(),
                reason: e.to_string(),
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsError::Mismatch {
                    cert: cert_path.clone(),
                    key: key_path.clone(),
                    reason: e.to_string(),
                })?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.to_vec();
    Ok(config)
}

fn certs(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    rustls_pemfile::certs(&mut &pem[..])
        .filter_map(Result::ok)
        .collect()
}

fn private_key(pem: &[u8]) -> Option<PrivateKeyDer<'static>> {
    rustls_pemfile::private_key(&mut &pem[..]).ok().flatten()
}
