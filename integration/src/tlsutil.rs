//! Support for the TLS tests: a test PKI made with `rcgen` (CAs, server and client
//! certificates, expired ones, CRLs), `concord` started on `https://` URLs, and TLS
//! clients (`etcd-client`, `etcdctl`, a raw rustls connection).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, RevokedCertParams, SerialNumber,
};

use crate::{Etcd, Proc, READY_DEADLINE, answered, concord_bin, free_port, wait_until};

/// A certificate authority of the test.
pub struct Ca {
    pub cert_pem: String,
    params: CertificateParams,
    key: KeyPair,
    next_serial: u64,
}

/// A leaf certificate and its key, as PEM, and its serial number.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub serial: u64,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA cert");
        Ca {
            cert_pem: cert.pem(),
            params,
            key,
            next_serial: 1,
        }
    }

    /// A certificate for `cn`, valid for 127.0.0.1 and localhost (as server and
    /// client), expired if `expired`.
    pub fn issue(&mut self, cn: &str, expired: bool) -> Leaf {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, cn);
        let serial = self.next_serial;
        self.next_serial += 1;
        params.serial_number = Some(SerialNumber::from(serial));
        let now = time::OffsetDateTime::now_utc();
        if expired {
            params.not_before = now - time::Duration::days(10);
            params.not_after = now - time::Duration::days(1);
        } else {
            params.not_before = now - time::Duration::days(1);
            params.not_after = now + time::Duration::days(30);
        }
        let key = KeyPair::generate().expect("leaf key");
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("leaf cert");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial,
        }
    }

    /// A CRL revoking `serials`.
    pub fn crl(&self, serials: &[u64]) -> String {
        let now = time::OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - time::Duration::hours(1),
            next_update: now + time::Duration::days(30),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from(*s),
                    revocation_time: now - time::Duration::hours(1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let issuer = Issuer::from_params(&self.params, &self.key);
        params
            .signed_by(&issuer)
            .expect("CRL")
            .pem()
            .expect("CRL pem")
    }
}

/// Writes `contents` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, contents).expect("writing a test file");
    p
}

/// Replaces `path` atomically (write a temporary file, rename), as operators and
/// cert-manager-like tools do.
pub fn replace(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).expect("writing a test file");
    std::fs::rename(&tmp, path).expect("renaming a test file");
}

/// Client TLS material: the CA bundle to trust and, optionally, a client identity.
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub ca_pem: String,
    pub identity: Option<Leaf>,
}

/// An `etcd-client` over TLS with short timeouts.
pub async fn connect_tls(endpoint: &str, tls: &ClientTls) -> Result<etcd_client::Client> {
    let mut t = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(&tls.ca_pem))
        .domain_name("localhost");
    if let Some(id) = &tls.identity {
        t = t.identity(etcd_client::Identity::from_pem(&id.cert_pem, &id.key_pem));
    }
    let opts = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(10))
        .with_tls(t);
    Ok(etcd_client::Client::connect([endpoint], Some(opts)).await?)
}

/// A raw TLS handshake to `addr` trusting `ca_pem`; returns the server's leaf
/// certificate (DER) or the handshake error.
pub async fn handshake(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    identity: Option<&Leaf>,
) -> Result<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    let cfg = match identity {
        Some(id) => b.with_client_auth_cert(
            CertificateDer::pem_slice_iter(id.cert_pem.as_bytes()).collect::<Result<_, _>>()?,
            PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes())?,
        )?,
        None => b.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    // TLS 1.3 reports a refused client certificate only after the handshake: a read
    // tells.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut buf)).await??;
    anyhow::ensure!(
        buf.starts_with(b"HTTP/1.1 200"),
        "no HTTP answer over TLS: {:?}",
        String::from_utf8_lossy(&buf)
    );
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .context("no server certificate")?;
    Ok(leaf.to_vec())
}

/// `etcdctl` over https with the given files.
pub fn etcdctl_tls(
    endpoint: &str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    args: &[&str],
) -> Result<std::process::Output> {
    let mut cmd = Command::new("etcdctl");
    cmd.env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(endpoint)
        .arg("--command-timeout=5s")
        .arg("--dial-timeout=3s")
        .arg("--cacert")
        .arg(ca);
    if let Some((c, k)) = identity {
        cmd.arg("--cert").arg(c).arg("--key").arg(k);
    }
    Ok(cmd.args(args).output()?)
}

/// One `concord` member started with TLS flags; killed (by pid) when dropped.
pub struct TlsMember {
    pub proc: Proc,
    pub dir: PathBuf,
    pub client_port: u16,
    pub peer_port: u16,
}

impl TlsMember {
    pub fn client_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.client_port)
    }

    pub fn client_addr(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.client_port).into()
    }

    /// Starts `concord` with `args` added to its name, data dir and URLs (client URLs
    /// `https`, peer URLs per `peer_scheme`), without waiting.
    pub fn spawn(
        dir: &Path,
        name: &str,
        client_port: u16,
        peer_port: u16,
        peer_scheme: &str,
        initial_cluster: &str,
        args: &[String],
    ) -> Result<TlsMember> {
        let data = dir.join(format!("{name}.data"));
        let client = format!("https://127.0.0.1:{client_port}");
        let peer = format!("{peer_scheme}://127.0.0.1:{peer_port}");
        let mut cmd = Command::new(concord_bin());
        cmd.arg("--name")
            .arg(name)
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(initial_cluster)
            .args(args);
        let proc = Proc::spawn(cmd, dir.join(format!("{name}.log")))?;
        Ok(TlsMember {
            proc,
            dir: data,
            client_port,
            peer_port,
        })
    }

    /// A single member on fresh ports with `args`, waited for with `tls`.
    pub async fn start_single(dir: &Path, args: &[String], tls: &ClientTls) -> Result<TlsMember> {
        let (cp, pp) = (free_port(), free_port());
        let m = TlsMember::spawn(
            dir,
            "n1",
            cp,
            pp,
            "http",
            &format!("n1=http://127.0.0.1:{pp}"),
            args,
        )?;
        m.wait_ready(tls).await?;
        Ok(m)
    }

    pub async fn wait_ready(&self, tls: &ClientTls) -> Result<()> {
        let url = self.client_url();
        wait_until(READY_DEADLINE, &url, || async {
            connect_tls(&url, tls).await?.get("health", None).await?;
            Ok(())
        })
        .await
        .inspect_err(|_| eprintln!("concord log:\n{}", self.proc.log()))
    }
}

/// A real etcd (the reference) serving `https` client URLs with `args` (its
/// certificate flags among them), waited for with `tls`.
pub async fn start_etcd_tls(args: &[&str], tls: &ClientTls) -> Result<Etcd> {
    let e = Etcd::spawn("https", args)?;
    let url = e.endpoint();
    wait_until(READY_DEADLINE, &url, || async {
        let mut c = connect_tls(&url, tls).await?;
        answered(c.get("health", None).await)
    })
    .await
    .inspect_err(|_| eprintln!("etcd log:\n{}", e.proc.log()))?;
    Ok(e)
}
