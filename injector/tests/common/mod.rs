//! Shared test helpers: certificates made with rcgen, the real server on loopback, an
//! HTTPS client that reports the certificate the server presented, and the
//! `kubernetes-validate` runner.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracecar_injector::config::Defaults;
use tracecar_injector::server::{self, Running};

/// A CA and a function to issue `localhost` serving certificates from it.
pub struct Pki {
    ca_params: rcgen::CertificateParams,
    ca_key: rcgen::KeyPair,
    pub ca_der: CertificateDer<'static>,
}

pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

impl Pki {
    pub fn new() -> Pki {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "tracecar test CA");
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        Pki {
            ca_der: ca.der().clone(),
            ca_params,
            ca_key,
        }
    }

    pub fn leaf(&self, cn: &str) -> Leaf {
        let issuer = rcgen::Issuer::from_params(&self.ca_params, &self.ca_key);
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }
}

/// Writes a pair atomically (write + rename), as Kubernetes secret volumes do.
pub fn write_pair(dir: &Path, leaf: &Leaf) -> (PathBuf, PathBuf) {
    let cert = dir.join("tls.crt");
    let key = dir.join("tls.key");
    for (path, body) in [(&cert, &leaf.cert_pem), (&key, &leaf.key_pem)] {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, body).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }
    (cert, key)
}

/// The server with default settings and a serving certificate from a new CA; the directory
/// holding the certificate lives as long as the caller keeps it.
pub async fn start_default() -> (Pki, tempfile::TempDir, Running) {
    let pki = Pki::new();
    let leaf = pki.leaf("a");
    let dir = tempfile::tempdir().unwrap();
    let running = start(
        dir.path(),
        &leaf,
        Defaults::default(),
        Duration::from_secs(2),
    )
    .await;
    (pki, dir, running)
}

/// Starts the real server on loopback with `defaults`.
pub async fn start(dir: &Path, leaf: &Leaf, defaults: Defaults, reload: Duration) -> Running {
    let (cert, key) = write_pair(dir, leaf);
    server::start(server::Options {
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        tls_cert: cert,
        tls_key: key,
        tls_reload_interval: reload,
        shutdown_timeout: Duration::from_secs(5),
        defaults,
    })
    .await
    .expect("server starts")
}

/// An HTTPS client trusting `pki`'s CA; every request uses a new connection (a new handshake).
#[derive(Clone)]
pub struct Client {
    connector: TlsConnector,
}

pub struct Reply {
    pub status: u16,
    pub body: Bytes,
    pub peer_cert: Option<CertificateDer<'static>>,
}

impl Client {
    pub fn new(pki: &Pki) -> Client {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca_der.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        // Full handshakes only: a resumed session does not present a certificate.
        cfg.resumption = rustls::client::Resumption::disabled();
        Client {
            connector: TlsConnector::from(Arc::new(cfg)),
        }
    }

    pub async fn post(
        &self,
        addr: std::net::SocketAddr,
        path: &str,
        body: impl Into<Bytes>,
    ) -> Result<Reply, String> {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = ServerName::try_from("localhost").unwrap();
        let tls = self
            .connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let peer_cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.clone().into_owned());
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = http::Request::post(path)
            .header("host", "localhost")
            .header("content-type", "application/json")
            .body(Full::new(body.into()))
            .unwrap();
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Reply {
            status,
            body,
            peer_cert,
        })
    }
}

/// Plain-HTTP GET (admin port).
pub async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Wraps a pod in an `admission.k8s.io/v1` AdmissionReview for a CREATE.
pub fn review(pod: &serde_json::Value, uid: &str) -> serde_json::Value {
    let ns = pod
        .pointer("/metadata/namespace")
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let name = pod
        .pointer("/metadata/name")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": name,
            "namespace": ns,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    })
}

/// The Kubernetes versions to validate against: 1.29 and the newest the tool ships.
/// `None` (with a printed skip) when `kubernetes-validate` is missing and `CI` is unset.
pub fn validate_versions() -> Option<Vec<String>> {
    let help = match Command::new("kubernetes-validate").arg("--help").output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        other => {
            let why = match other {
                Ok(o) => format!("exit {:?}", o.status.code()),
                Err(e) => e.to_string(),
            };
            if std::env::var_os("CI").is_some() {
                panic!("kubernetes-validate is required when CI is set ({why}); pip install -r tests/requirements.txt");
            }
            // Written to the real stderr (not captured by the test harness) so the skip shows.
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "SKIP: kubernetes-validate not available ({why}); schema validation skipped (pip install -r tests/requirements.txt; set CI to make this a failure)"
            );
            return None;
        }
    };
    // "Defaults to 1.37.0": the newest version it ships.
    let flat = help.split_whitespace().collect::<Vec<_>>().join(" ");
    let newest = flat
        .split("Defaults to ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .map(|s| s.trim_end_matches('.').to_owned())
        .expect("kubernetes-validate --help names its default (newest) version");
    Some(vec!["1.29.0".to_owned(), newest])
}

/// Validates files strictly against each version; panics with the tool's output on failure.
pub fn validate_strict(files: &[PathBuf], versions: &[String]) {
    validate_strict_docs(files, versions, files.len());
}

/// [`validate_strict`] for files holding `documents` objects in all.
pub fn validate_strict_docs(files: &[PathBuf], versions: &[String], documents: usize) {
    for v in versions {
        let out = Command::new("kubernetes-validate")
            .args(["--strict", "--no-warn", "-k", v])
            .args(files)
            .output()
            .expect("run kubernetes-validate");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "kubernetes-validate --strict -k {v} failed:\n{text}"
        );
        let passed = text.matches("passed").count();
        assert_eq!(
            passed, documents,
            "expected every document to pass against {v}:\n{text}"
        );
    }
}

/// Loads a YAML fixture as JSON.
pub fn load_yaml(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// Compares `actual` to the golden file, or rewrites it with `UPDATE_GOLDEN=1`.
pub fn golden(name: &str, actual: &serde_json::Value) {
    let path = golden_dir().join(name);
    let text = serde_json::to_string_pretty(actual).unwrap() + "\n";
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &text).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with UPDATE_GOLDEN=1 to create)",
            path.display()
        )
    });
    let want: serde_json::Value = serde_json::from_str(&want).unwrap();
    assert_eq!(
        &want,
        actual,
        "golden {} differs (UPDATE_GOLDEN=1 regenerates):\n{text}",
        path.display()
    );
}
