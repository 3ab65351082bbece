//! TLS termination for the client port (and, through the server, the peer port).
//!
//! A [`Handshaker`] turns an accepted TCP connection into a TLS stream: it takes the
//! server configuration of the moment from a [`ServerConfigSource`] (so certificates,
//! keys, CA bundles and CRLs that change on disk apply to the next connection), bounds
//! how many handshakes run at once ([`MAX_HANDSHAKES`]) and how long one may take, from
//! accept to finish, waiting for a slot included ([`HANDSHAKE_TIMEOUT`], etcd advisory
//! GHSA-6vch-q96h-7gc3: a client that opens connections and never finishes the
//! handshake cannot pin the server's memory or descriptors). A connection that starts
//! with plain HTTP instead of a TLS record gets Go's answer to that
//! (`400 Client sent an HTTP request to an HTTPS server.`) and is closed.
//!
//! The verified client certificate's common name reaches request handlers as a
//! [`ClientCertificate`] in every HTTP request's extensions (see
//! [`crate::ClientListener`]): under `--client-cert-auth` it is the user when a request
//! carries no token, as in etcd.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::server::TlsStream;

/// A TLS handshake must finish within this time of the connection being accepted.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// TLS handshakes in progress at once, per listener; further connections wait for a
/// slot (within their [`HANDSHAKE_TIMEOUT`]).
pub const MAX_HANDSHAKES: usize = 256;

/// The verified certificate a client presented, inserted into the extensions of every
/// HTTP request on its connection. Present only when the client presented a
/// certificate that verified and that has a common name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertificate {
    pub common_name: String,
}

/// Where a TLS listener takes the server configuration for each handshake: a fixed one,
/// or one that follows files on disk.
pub trait ServerConfigSource: Send + Sync + 'static {
    fn server_config(&self) -> Arc<rustls::ServerConfig>;
}

impl ServerConfigSource for Arc<rustls::ServerConfig> {
    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.clone()
    }
}

/// Why a connection did not become a TLS stream.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("TLS handshake not finished within {0:?}")]
    Timeout(Duration),
    #[error("plain text on a TLS port")]
    PlainText,
    #[error("connection closed before the TLS handshake")]
    Closed,
    #[error("TLS handshake failed: {0}")]
    Tls(#[source] io::Error),
}

/// Accepts TLS on TCP connections; see the module docs.
#[derive(Clone)]
pub struct Handshaker {
    source: Arc<dyn ServerConfigSource>,
    slots: Arc<Semaphore>,
    timeout: Duration,
}

impl std::fmt::Debug for Handshaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshaker")
            .field("timeout", &self.timeout)
            .field("free_slots", &self.slots.available_permits())
            .finish_non_exhaustive()
    }
}

impl Handshaker {
    pub fn new(source: Arc<dyn ServerConfigSource>) -> Handshaker {
        Handshaker::with_limits(source, MAX_HANDSHAKES, HANDSHAKE_TIMEOUT)
    }

    pub fn with_limits(
        source: Arc<dyn ServerConfigSource>,
        max_handshakes: usize,
        timeout: Duration,
    ) -> Handshaker {
        Handshaker {
            source,
            slots: Arc::new(Semaphore::new(max_handshakes)),
            timeout,
        }
    }

    /// Runs the server side of a TLS handshake on `tcp`, and returns the stream with
    /// the client's verified certificate, if it presented one with a common name.
    pub async fn accept(
        &self,
        tcp: TcpStream,
    ) -> Result<(TlsStream<TcpStream>, Option<ClientCertificate>), HandshakeError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let timeout = HandshakeError::Timeout(self.timeout);
        let _slot = tokio::time::timeout_at(deadline, self.slots.acquire())
            .await
            .map_err(|_| HandshakeError::Timeout(self.timeout))?
            .map_err(|_| HandshakeError::Closed)?;
        let tls = tokio::time::timeout_at(deadline, self.handshake(tcp))
            .await
            .map_err(|_| timeout)??;
        let cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|c| common_name(c))
            .map(|common_name| ClientCertificate { common_name });
        Ok((tls, cert))
    }

    async fn handshake(&self, mut tcp: TcpStream) -> Result<TlsStream<TcpStream>, HandshakeError> {
        let mut first = [0u8; 1];
        if tcp.peek(&mut first).await.map_err(HandshakeError::Tls)? == 0 {
            return Err(HandshakeError::Closed);
        }
        // 0x16: a TLS handshake record. Anything else is not TLS; letters are most
        // likely an HTTP request (or HTTP/2's preface) sent in the clear.
        if first[0] != 0x16 {
            if first[0].is_ascii_uppercase() {
                let _ = tcp
                    .write_all(
                        b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n",
                    )
                    .await;
                let _ = tcp.shutdown().await;
            }
            return Err(HandshakeError::PlainText);
        }
        tokio_rustls::TlsAcceptor::from(self.source.server_config())
            .accept(tcp)
            .await
            .map_err(HandshakeError::Tls)
    }
}

/// The first common name in a DER certificate's subject, if it has one.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_string)
}

/// The ALPN protocols the client port offers: gRPC needs `h2`; curl and the HTTP
/// endpoints may use `http/1.1`.
pub fn alpn_protocols() -> Vec<Vec<u8>> {
    vec![b"h2".to_vec(), b"http/1.1".to_vec()]
}
