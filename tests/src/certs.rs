//! Test PKI: a CA, a server certificate for `127.0.0.1`/`localhost`, client certificates with
//! RSA, ECDSA and Ed25519 keys in PKCS#8 or SEC1 PEM, and rustls server configs that require
//! client certificates. Certificates come from rcgen; RSA key generation and the SEC1 form use
//! the `openssl` command (rcgen's ring backend cannot generate RSA keys).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// The kind and encoding of a client key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    EcdsaP256Pkcs8,
    EcdsaP256Sec1,
    EcdsaP384Sec1,
    RsaPkcs8,
    Ed25519Pkcs8,
}

impl KeyKind {
    pub const ALL: [KeyKind; 5] = [
        KeyKind::EcdsaP256Pkcs8,
        KeyKind::EcdsaP256Sec1,
        KeyKind::EcdsaP384Sec1,
        KeyKind::RsaPkcs8,
        KeyKind::Ed25519Pkcs8,
    ];
}

/// A certificate and its private key, PEM.
#[derive(Debug, Clone)]
pub struct Pair {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Pair {
    /// Writes `cert.pem` and `key.pem` into `dir` (created if needed).
    pub fn write_to(&self, dir: &Path) -> (PathBuf, PathBuf) {
        std::fs::create_dir_all(dir).expect("cert dir");
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, &self.cert_pem).expect("write cert");
        std::fs::write(&key, &self.key_pem).expect("write key");
        (cert, key)
    }
}

/// A certificate authority.
pub struct Ca {
    pub cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn openssl(args: &[&str], input: Option<&str>) -> String {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the openssl command is needed to make RSA and SEC1 test keys");
    if let Some(input) = input {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write to openssl");
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("openssl output is PEM")
}

/// A new key: rcgen's `KeyPair` for signing and the PEM to hand to the proxy.
fn key(kind: KeyKind) -> (KeyPair, String) {
    match kind {
        KeyKind::EcdsaP256Pkcs8 | KeyKind::Ed25519Pkcs8 => {
            let alg = if kind == KeyKind::Ed25519Pkcs8 {
                &rcgen::PKCS_ED25519
            } else {
                &rcgen::PKCS_ECDSA_P256_SHA256
            };
            let k = KeyPair::generate_for(alg).expect("key");
            let pem = k.serialize_pem();
            (k, pem)
        }
        KeyKind::EcdsaP256Sec1 | KeyKind::EcdsaP384Sec1 => {
            let alg = if kind == KeyKind::EcdsaP256Sec1 {
                &rcgen::PKCS_ECDSA_P256_SHA256
            } else {
                &rcgen::PKCS_ECDSA_P384_SHA384
            };
            let k = KeyPair::generate_for(alg).expect("key");
            let sec1 = openssl(&["ec", "-outform", "PEM"], Some(&k.serialize_pem()));
            assert!(sec1.contains("BEGIN EC PRIVATE KEY"), "{sec1}");
            (k, sec1)
        }
        KeyKind::RsaPkcs8 => {
            let pem = openssl(
                &[
                    "genpkey",
                    "-algorithm",
                    "RSA",
                    "-pkeyopt",
                    "rsa_keygen_bits:2048",
                ],
                None,
            );
            assert!(pem.contains("BEGIN PRIVATE KEY"), "{pem}");
            let k = KeyPair::from_pem(&pem).expect("rcgen loads the RSA key");
            (k, pem)
        }
    }
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("ca key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("ca cert");
        Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    fn leaf(
        &self,
        cn: &str,
        sans: Vec<SanType>,
        usage: ExtendedKeyUsagePurpose,
        kind: KeyKind,
    ) -> Pair {
        let (key, key_pem) = key(kind);
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("leaf params");
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        Pair {
            cert_pem: cert.pem(),
            key_pem,
        }
    }

    /// A server certificate valid for `127.0.0.1`, `localhost` and `extra_dns`.
    pub fn server(&self, extra_dns: &[&str]) -> Pair {
        let mut sans = vec![
            SanType::IpAddress("127.0.0.1".parse().expect("ip")),
            SanType::DnsName("localhost".try_into().expect("dns")),
        ];
        for d in extra_dns {
            sans.push(SanType::DnsName((*d).try_into().expect("dns")));
        }
        self.leaf(
            "collector",
            sans,
            ExtendedKeyUsagePurpose::ServerAuth,
            KeyKind::EcdsaP256Pkcs8,
        )
    }

    /// A server certificate valid only for the DNS name `name` (no IP address).
    pub fn server_named(&self, name: &str) -> Pair {
        let sans = vec![SanType::DnsName(name.try_into().expect("dns"))];
        self.leaf(
            "collector",
            sans,
            ExtendedKeyUsagePurpose::ServerAuth,
            KeyKind::EcdsaP256Pkcs8,
        )
    }

    /// A client certificate with a key of `kind`.
    pub fn client(&self, cn: &str, kind: KeyKind) -> Pair {
        let sans = vec![SanType::DnsName(cn.try_into().expect("dns"))];
        self.leaf(cn, sans, ExtendedKeyUsagePurpose::ClientAuth, kind)
    }
}

fn certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("PEM certs")
}

/// A rustls server config presenting `server`, requiring a client certificate issued by
/// `client_ca` (ALPN h2 and http/1.1, so one port serves gRPC and http/protobuf).
pub fn mtls_server_config(server: &Pair, client_ca: &Ca) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(&client_ca.cert_pem) {
        roots.add(c).expect("client CA");
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .expect("client verifier");
    let key = rustls_pemfile::private_key(&mut server.key_pem.as_bytes())
        .expect("server key PEM")
        .expect("server key");
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&server.cert_pem), key)
        .expect("server cert");
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// Directory layout of a Kubernetes Secret volume: `..data` → `..<stamp>/` holding the files,
/// and `ca.crt`, `tls.crt`, `tls.key` → `..data/<name>`. [`SecretDir::swap`] replaces the
/// content the way the kubelet does: write a new timestamped directory, then atomically rename a
/// new `..data` symlink over the old one.
pub struct SecretDir {
    pub root: PathBuf,
    n: u32,
}

impl SecretDir {
    pub fn new(root: PathBuf, ca_pem: &str, pair: &Pair) -> SecretDir {
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("secret dir");
        let mut s = SecretDir { root, n: 0 };
        s.swap(ca_pem, pair);
        for name in ["ca.crt", "tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(format!("..data/{name}"), s.root.join(name))
                .expect("file symlink");
        }
        s
    }

    pub fn ca(&self) -> PathBuf {
        self.root.join("ca.crt")
    }

    pub fn cert(&self) -> PathBuf {
        self.root.join("tls.crt")
    }

    pub fn key(&self) -> PathBuf {
        self.root.join("tls.key")
    }

    /// Publishes new content atomically.
    pub fn swap(&mut self, ca_pem: &str, pair: &Pair) {
        self.n += 1;
        let stamp = format!("..2026_01_01_00_00_{:02}.{}", self.n, std::process::id());
        let dir = self.root.join(&stamp);
        std::fs::create_dir_all(&dir).expect("stamp dir");
        std::fs::write(dir.join("ca.crt"), ca_pem).expect("ca");
        std::fs::write(dir.join("tls.crt"), &pair.cert_pem).expect("cert");
        std::fs::write(dir.join("tls.key"), &pair.key_pem).expect("key");
        let tmp = self.root.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&stamp, &tmp).expect("tmp symlink");
        std::fs::rename(&tmp, self.root.join("..data")).expect("atomic swap");
    }
}
