//! TLS material for the client and peer ports, from etcd's flags: certificates, keys,
//! CA bundles and CRLs read from files, rustls configurations built from them, and
//! `--auto-tls` / `--peer-auto-tls` self-signed certificates.
//!
//! Reloading: [`Reloading`] re-reads its files at every handshake (they are small; a
//! handshake costs far more) and rebuilds the configuration only when their bytes
//! changed, so a new connection after a change uses the new certificate, key, CA
//! bundle or CRL, and old connections keep theirs. A changed set that does not build
//! (a half-written file, a key that does not match its certificate) keeps the last good
//! configuration and logs an error, once per distinct content.
//!
//! `--cipher-suites` takes Go's (etcd's) names for TLS 1.2 suites; rustls offers only
//! the six ECDHE AEAD ones, so Go's other names are refused with a clear error. TLS 1.3
//! suites are always on (Go does not let them be chosen either). TLS 1.0 and 1.1 are not
//! offered at all.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use concord_gateway::tls::ServerConfigSource;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
    SupportedProtocolVersion,
};

/// A TLS setting or file that cannot be used; the text names the flag or file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}")]
    Invalid(String),
    #[error("reading {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{what}: {source}")]
    Rustls {
        what: String,
        #[source]
        source: rustls::Error,
    },
}

/// The protocol versions and TLS 1.2 cipher suites both ports offer
/// (`--tls-min-version`, `--tls-max-version`, `--cipher-suites`).
#[derive(Debug, Clone)]
pub struct TlsPolicy {
    provider: Arc<CryptoProvider>,
    versions: Vec<&'static SupportedProtocolVersion>,
}

impl TlsPolicy {
    /// `cipher_suites`: comma-separated Go names, empty for rustls' defaults;
    /// versions: `TLS1.2` or `TLS1.3`, empty for the default (1.2 to 1.3).
    pub fn new(cipher_suites: &str, min: &str, max: &str) -> Result<TlsPolicy, TlsError> {
        let min = parse_version("tls-min-version", min, 2)?;
        let max = parse_version("tls-max-version", max, 3)?;
        if min > max {
            return Err(TlsError::Invalid(format!(
                "--tls-min-version (TLS1.{min}) is greater than --tls-max-version (TLS1.{max})"
            )));
        }
        let mut versions = Vec::new();
        if min <= 2 {
            versions.push(&rustls::version::TLS12);
        }
        if max >= 3 {
            versions.push(&rustls::version::TLS13);
        }
        let base = rustls::crypto::ring::default_provider();
        let names: Vec<&str> = cipher_suites
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        let suites = if names.is_empty() {
            base.cipher_suites.clone()
        } else {
            if min == 3 {
                return Err(TlsError::Invalid(
                    "--cipher-suites cannot be configured when only TLS1.3 is enabled".into(),
                ));
            }
            let mut chosen: Vec<rustls::SupportedCipherSuite> = base
                .cipher_suites
                .iter()
                .filter(|s| s.version() == &rustls::version::TLS13)
                .copied()
                .collect();
            for name in names {
                if let Some(s) = cipher_suite(name)?
                    && !chosen.contains(&s)
                {
                    chosen.push(s);
                }
            }
            chosen
        };
        Ok(TlsPolicy {
            provider: Arc::new(CryptoProvider {
                cipher_suites: suites,
                ..base
            }),
            versions,
        })
    }

    pub fn provider(&self) -> &Arc<CryptoProvider> {
        &self.provider
    }

    fn algorithms(&self) -> WebPkiSupportedAlgorithms {
        self.provider.signature_verification_algorithms
    }
}

impl Default for TlsPolicy {
    fn default() -> Self {
        TlsPolicy::new("", "", "").expect("the default TLS policy is valid")
    }
}

/// `TLS1.2` → 2, `TLS1.3` → 3.
fn parse_version(flag: &str, v: &str, default: u8) -> Result<u8, TlsError> {
    match v.trim() {
        "" => Ok(default),
        "TLS1.2" => Ok(2),
        "TLS1.3" => Ok(3),
        "TLS1.0" | "TLS1.1" => Err(TlsError::Invalid(format!(
            "--{flag} {v} is not supported: Concord offers TLS1.2 and TLS1.3 only"
        ))),
        other => Err(TlsError::Invalid(format!(
            "unexpected TLS version {other:?} for --{flag} (use TLS1.2 or TLS1.3)"
        ))),
    }
}

/// A Go cipher-suite name as a rustls suite; `None` for TLS 1.3 names (always on).
fn cipher_suite(name: &str) -> Result<Option<rustls::SupportedCipherSuite>, TlsError> {
    use rustls::crypto::ring::cipher_suite as cs;
    let s = match name {
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256" => cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384" => cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305"
        | "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256" => {
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        }
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256" => cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384" => cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305" | "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256" => {
            cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
        }
        "TLS_AES_128_GCM_SHA256" | "TLS_AES_256_GCM_SHA384" | "TLS_CHACHA20_POLY1305_SHA256" => {
            return Ok(None);
        }
        "TLS_RSA_WITH_RC4_128_SHA"
        | "TLS_RSA_WITH_3DES_EDE_CBC_SHA"
        | "TLS_RSA_WITH_AES_128_CBC_SHA"
        | "TLS_RSA_WITH_AES_256_CBC_SHA"
        | "TLS_RSA_WITH_AES_128_CBC_SHA256"
        | "TLS_RSA_WITH_AES_128_GCM_SHA256"
        | "TLS_RSA_WITH_AES_256_GCM_SHA384"
        | "TLS_ECDHE_ECDSA_WITH_RC4_128_SHA"
        | "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA"
        | "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA"
        | "TLS_ECDHE_RSA_WITH_RC4_128_SHA"
        | "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA"
        | "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA"
        | "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA"
        | "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256"
        | "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256" => {
            return Err(TlsError::Invalid(format!(
                "TLS cipher suite {name:?} is not supported: Concord (rustls) offers only \
                 TLS_ECDHE_{{ECDSA,RSA}}_WITH_{{AES_128_GCM_SHA256,AES_256_GCM_SHA384,CHACHA20_POLY1305}}"
            )));
        }
        // etcd's text.
        _ => {
            return Err(TlsError::Invalid(format!(
                "unexpected TLS cipher suite {name:?}"
            )));
        }
    };
    Ok(Some(s))
}

/// The files and checks of one TLS server (the client port or the peer port).
#[derive(Debug, Clone, Default)]
pub struct ServerFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `--trusted-ca-file`: as in etcd, giving one requires client certificates.
    pub trusted_ca: Option<PathBuf>,
    pub crl: Option<PathBuf>,
    /// `--client-cert-auth`: require a client certificate (verified against the
    /// trusted CA file or, without one, the system's roots, as Go does).
    pub client_cert_auth: bool,
    /// `--peer-cert-allowed-cn`: the client certificate must have this common name.
    pub allowed_cn: Option<String>,
}

/// The files of a TLS client (a member dialing its peers).
#[derive(Debug, Clone, Default)]
pub struct ClientFiles {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub trusted_ca: Option<PathBuf>,
    /// `--peer-auto-tls` without a trusted CA: peers' self-signed certificates cannot
    /// be verified, so (as etcd) they are not.
    pub skip_verify: bool,
}

/// What a [`Reloading`] builds from the bytes of its files (a server or client config).
pub trait Build: Send + Sync + 'static {
    type Output: Send + Sync + 'static;
    fn paths(&self) -> Vec<PathBuf>;
    fn build(&self, contents: &[Vec<u8>]) -> Result<Self::Output, TlsError>;
}

/// A configuration that follows its files (see the module docs).
pub struct Reloading<B: Build> {
    builder: B,
    state: Mutex<ReloadState<B::Output>>,
}

struct ReloadState<T> {
    /// The bytes of the last attempt (good or not), so a bad set is logged once.
    seen: Vec<Vec<u8>>,
    current: Arc<T>,
}

impl<B: Build> std::fmt::Debug for Reloading<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading")
            .field("files", &self.builder.paths())
            .finish_non_exhaustive()
    }
}

fn read_all(paths: &[PathBuf]) -> Result<Vec<Vec<u8>>, TlsError> {
    paths
        .iter()
        .map(|p| {
            std::fs::read(p).map_err(|e| TlsError::File {
                path: p.clone(),
                reason: e.to_string(),
            })
        })
        .collect()
}

impl<B: Build> Reloading<B> {
    /// Loads the files now; an error here is a startup error.
    fn load(builder: B) -> Result<Arc<Self>, TlsError> {
        let seen = read_all(&builder.paths())?;
        let current = Arc::new(builder.build(&seen)?);
        Ok(Arc::new(Reloading {
            builder,
            state: Mutex::new(ReloadState { seen, current }),
        }))
    }

    /// The configuration for a new connection: rebuilt first if the files changed.
    pub fn current(&self) -> Arc<B::Output> {
        let paths = self.builder.paths();
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match read_all(&paths) {
            Ok(now) if now != st.seen => {
                match self.builder.build(&now) {
                    Ok(c) => {
                        tracing::info!(files = ?paths, "TLS material changed on disk; reloaded");
                        st.current = Arc::new(c);
                    }
                    Err(e) => tracing::error!(
                        files = ?paths,
                        error = %e,
                        "TLS material changed on disk but cannot be used; keeping the previous one"
                    ),
                }
                st.seen = now;
            }
            Ok(_) => {}
            Err(e) => {
                if !st.seen.is_empty() {
                    tracing::error!(error = %e, "TLS material unreadable; keeping the previous one");
                    st.seen = Vec::new();
                }
            }
        }
        st.current.clone()
    }
}

/// A TLS server configuration from files.
pub type ServerTls = Reloading<ServerBuild>;
/// A TLS client configuration from files.
pub type ClientTls = Reloading<ClientBuild>;

impl ServerConfigSource for Reloading<ServerBuild> {
    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.current()
    }
}

pub struct ServerBuild {
    files: ServerFiles,
    policy: TlsPolicy,
}

impl ServerTls {
    pub fn open(files: ServerFiles, policy: TlsPolicy) -> Result<Arc<ServerTls>, TlsError> {
        Reloading::load(ServerBuild { files, policy })
    }
}

impl Build for ServerBuild {
    type Output = rustls::ServerConfig;

    fn paths(&self) -> Vec<PathBuf> {
        let f = &self.files;
        let mut p = vec![f.cert.clone(), f.key.clone()];
        p.extend(f.trusted_ca.clone());
        p.extend(f.crl.clone());
        p
    }

    fn build(&self, contents: &[Vec<u8>]) -> Result<rustls::ServerConfig, TlsError> {
        let f = &self.files;
        let certs = certs(&f.cert, &contents[0])?;
        let key = key(&f.key, &contents[1])?;
        let mut rest = contents[2..].iter();
        let ca = f
            .trusted_ca
            .as_ref()
            .map(|p| (p, rest.next().expect("ca bytes")));
        let crl = f.crl.as_ref().map(|p| (p, rest.next().expect("crl bytes")));
        let builder = rustls::ServerConfig::builder_with_provider(self.policy.provider.clone())
            .with_protocol_versions(&self.policy.versions)
            .map_err(|e| rustls_err("TLS versions", e))?;
        let builder = if f.client_cert_auth || ca.is_some() {
            let roots = match ca {
                Some((p, bytes)) => roots(p, bytes)?,
                None => system_roots(),
            };
            let mut v = WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                self.policy.provider.clone(),
            );
            if let Some((p, bytes)) = crl {
                v = v
                    .with_crls(crls(p, bytes)?)
                    .allow_unknown_revocation_status();
            }
            let v = v
                .build()
                .map_err(|e| TlsError::Invalid(format!("client certificate verification: {e}")))?;
            let v: Arc<dyn ClientCertVerifier> = match &f.allowed_cn {
                Some(cn) => Arc::new(AllowedCn {
                    inner: v,
                    cn: cn.clone(),
                }),
                None => v,
            };
            builder.with_client_cert_verifier(v)
        } else {
            builder.with_no_client_auth()
        };
        let mut cfg = builder.with_single_cert(certs, key).map_err(|e| {
            rustls_err(&format!("{} with {}", f.cert.display(), f.key.display()), e)
        })?;
        cfg.alpn_protocols = concord_gateway::tls::alpn_protocols();
        Ok(cfg)
    }
}

pub struct ClientBuild {
    files: ClientFiles,
    policy: TlsPolicy,
}

impl ClientTls {
    pub fn open(files: ClientFiles, policy: TlsPolicy) -> Result<Arc<ClientTls>, TlsError> {
        Reloading::load(ClientBuild { files, policy })
    }
}

impl Build for ClientBuild {
    type Output = rustls::ClientConfig;

    fn paths(&self) -> Vec<PathBuf> {
        let f = &self.files;
        let mut p = Vec::new();
        p.extend(f.cert.clone());
        p.extend(f.key.clone());
        p.extend(f.trusted_ca.clone());
        p
    }

    fn build(&self, contents: &[Vec<u8>]) -> Result<rustls::ClientConfig, TlsError> {
        let f = &self.files;
        let mut it = contents.iter();
        let cert = f.cert.as_ref().map(|p| (p, it.next().expect("cert bytes")));
        let pkey = f.key.as_ref().map(|p| (p, it.next().expect("key bytes")));
        let ca = f
            .trusted_ca
            .as_ref()
            .map(|p| (p, it.next().expect("ca bytes")));
        let builder = rustls::ClientConfig::builder_with_provider(self.policy.provider.clone())
            .with_protocol_versions(&self.policy.versions)
            .map_err(|e| rustls_err("TLS versions", e))?;
        let builder = match ca {
            Some((p, bytes)) => builder.with_root_certificates(roots(p, bytes)?),
            None if f.skip_verify => {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(NoServerVerification(
                        self.policy.algorithms(),
                    )))
            }
            None => builder.with_root_certificates(system_roots()),
        };
        let mut cfg = match (cert, pkey) {
            (Some((cp, cb)), Some((kp, kb))) => builder
                .with_client_auth_cert(certs(cp, cb)?, key(kp, kb)?)
                .map_err(|e| rustls_err(&format!("{} with {}", cp.display(), kp.display()), e))?,
            _ => builder.with_no_client_auth(),
        };
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(cfg)
    }
}

fn rustls_err(what: &str, source: rustls::Error) -> TlsError {
    TlsError::Rustls {
        what: what.to_string(),
        source,
    }
}

fn pem_err(path: &Path, what: &str, e: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        reason: format!("{what}: {e}"),
    }
}

fn certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(path, "not a PEM certificate file", e))?;
    if certs.is_empty() {
        return Err(pem_err(
            path,
            "no certificate",
            "the file has no CERTIFICATE block",
        ));
    }
    Ok(certs)
}

fn key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| pem_err(path, "not a PEM private key", e))
}

fn roots(path: &Path, pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for c in certs(path, pem)? {
        store
            .add(c)
            .map_err(|e| pem_err(path, "not a usable CA certificate", e))?;
    }
    Ok(store)
}

fn crls(path: &Path, pem: &[u8]) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let crls = CertificateRevocationListDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(path, "not a PEM CRL file", e))?;
    if crls.is_empty() {
        return Err(pem_err(path, "no CRL", "the file has no X509 CRL block"));
    }
    Ok(crls)
}

/// The system's CA certificates (Go's default when no CA file is given).
fn system_roots() -> RootCertStore {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::warn!(error = %e, "loading the system's CA certificates");
    }
    let mut store = RootCertStore::empty();
    store.add_parsable_certificates(found.certs);
    store
}

/// `--peer-cert-allowed-cn`: a verified client certificate must also have this CN.
#[derive(Debug)]
struct AllowedCn {
    inner: Arc<dyn ClientCertVerifier>,
    cn: String,
}

impl ClientCertVerifier for AllowedCn {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let cn = concord_gateway::tls::common_name(end_entity);
        if cn.as_deref() != Some(self.cn.as_str()) {
            tracing::warn!(
                allowed = %self.cn,
                got = cn.as_deref().unwrap_or(""),
                "peer certificate's CN is not the allowed one"
            );
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(ok)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Accepts any server certificate (signatures still checked): etcd's behaviour for
/// `--peer-auto-tls` without a trusted CA, where every member's certificate is
/// self-signed.
#[derive(Debug)]
struct NoServerVerification(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for NoServerVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// `--auto-tls` / `--peer-auto-tls`: a self-signed certificate and key in `dir`
/// (`<data-dir>/fixtures/client` or `fixtures/peer`, as etcd), for `hosts` (the hosts
/// of the listen URLs). Existing files are kept, as etcd does. Returns (cert, key).
pub fn self_signed(dir: &Path, hosts: &[String]) -> Result<(PathBuf, PathBuf), TlsError> {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    let io = |p: &Path, e: std::io::Error| TlsError::File {
        path: p.to_path_buf(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let gen_err =
        |e: rcgen::Error| TlsError::Invalid(format!("generating a self-signed certificate: {e}"));
    let mut params = rcgen::CertificateParams::new(hosts.to_vec()).map_err(gen_err)?;
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "etcd");
    let pair = rcgen::KeyPair::generate().map_err(gen_err)?;
    let c = params.self_signed(&pair).map_err(gen_err)?;
    write_private(&key, pair.serialize_pem().as_bytes()).map_err(|e| io(&key, e))?;
    std::fs::write(&cert, c.pem()).map_err(|e| io(&cert, e))?;
    Ok((cert, key))
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

/// A TLS connection from a peer, for tonic's server.
pub struct PeerConn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl tonic::transport::server::Connected for PeerConn {
    type ConnectInfo = Option<std::net::SocketAddr>;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().0.peer_addr().ok()
    }
}

impl tokio::io::AsyncRead for PeerConn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for PeerConn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Peer connections accepted on `listener` after a TLS handshake each (run in its own
/// task, bounded and timed by `handshaker`); refused ones are logged and dropped.
pub fn tls_incoming(
    listener: tokio::net::TcpListener,
    handshaker: concord_gateway::tls::Handshaker,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<PeerConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let (tcp, addr) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a peer connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let h = handshaker.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match h.accept(tcp).await {
                    Ok((tls, _)) => {
                        let _ = tx.send(Ok(PeerConn(tls))).await;
                    }
                    Err(e) => {
                        tracing::warn!(peer = %addr, error = %e, "rejected a peer connection")
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_cipher_suites() {
        assert!(TlsPolicy::new("", "", "").is_ok());
        let e = TlsPolicy::new("", "TLS1.1", "").unwrap_err().to_string();
        assert!(
            e.contains("--tls-min-version TLS1.1 is not supported"),
            "{e}"
        );
        let e = TlsPolicy::new("", "TLS1.3", "TLS1.2")
            .unwrap_err()
            .to_string();
        assert!(e.contains("greater than"), "{e}");
        let e = TlsPolicy::new("FOO", "", "").unwrap_err().to_string();
        assert_eq!(e, "unexpected TLS cipher suite \"FOO\"");
        let e = TlsPolicy::new("TLS_RSA_WITH_AES_128_CBC_SHA", "", "")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not supported"), "{e}");
        let p = TlsPolicy::new(
            "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305",
            "",
            "",
        )
        .unwrap();
        let tls12: Vec<_> = p
            .provider()
            .cipher_suites
            .iter()
            .filter(|s| s.version() == &rustls::version::TLS12)
            .map(|s| s.suite())
            .collect();
        assert_eq!(
            tls12,
            vec![
                rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
                rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
            ]
        );
        assert!(TlsPolicy::new("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "TLS1.3", "").is_err());
    }

    fn write_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let pair = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        let c = params.self_signed(&pair).unwrap();
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, c.pem()).unwrap();
        std::fs::write(&key, pair.serialize_pem()).unwrap();
        (cert, key)
    }

    #[test]
    fn reloads_changed_files_and_keeps_the_old_config_on_a_bad_change() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_pair(dir.path(), "a");
        let tls = ServerTls::open(
            ServerFiles {
                cert: cert.clone(),
                key: key.clone(),
                ..Default::default()
            },
            TlsPolicy::default(),
        )
        .unwrap();
        let first = tls.current();
        assert!(
            Arc::ptr_eq(&first, &tls.current()),
            "unchanged files: same config"
        );
        // A broken certificate: the old configuration stays.
        std::fs::write(&cert, b"garbage").unwrap();
        assert!(Arc::ptr_eq(&first, &tls.current()));
        // A new pair: a new configuration.
        let (c2, k2) = write_pair(dir.path(), "b");
        std::fs::copy(&c2, &cert).unwrap();
        std::fs::copy(&k2, &key).unwrap();
        let second = tls.current();
        assert!(!Arc::ptr_eq(&first, &second));
        assert!(Arc::ptr_eq(&second, &tls.current()));
        // A missing file: keeps the last good one.
        std::fs::remove_file(&key).unwrap();
        assert!(Arc::ptr_eq(&second, &tls.current()));
    }

    #[test]
    fn startup_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = ServerTls::open(
            ServerFiles {
                cert: dir.path().join("missing.crt"),
                key: dir.path().join("missing.key"),
                ..Default::default()
            },
            TlsPolicy::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("missing.crt"), "{e}");
    }

    #[test]
    fn auto_tls_writes_and_then_keeps_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("fixtures/client");
        let (c, k) = self_signed(&d, &["127.0.0.1".into(), "localhost".into()]).unwrap();
        let before = std::fs::read(&c).unwrap();
        let again = self_signed(&d, &["127.0.0.1".into()]).unwrap();
        assert_eq!(again, (c.clone(), k.clone()));
        assert_eq!(std::fs::read(&c).unwrap(), before);
        ServerTls::open(
            ServerFiles {
                cert: c,
                key: k,
                ..Default::default()
            },
            TlsPolicy::default(),
        )
        .unwrap();
    }
}
