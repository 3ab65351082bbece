//! The client-port listener.
//!
//! etcd's Go clients put things in the HTTP/2 `:authority` pseudo-header that are not
//! an authority: clientv3 3.4 dials single endpoints (`etcdctl endpoint status`,
//! `defrag`, `snapshot save`, ...) with `:authority = http://127.0.0.1:2379`, and
//! clientv3 3.5.0 sends `#initially=[http://...]` on every request. Go's gRPC server
//! (etcd) accepts those; Rust's `h2` rejects the stream with PROTOCOL_ERROR. To serve
//! those clients unchanged, every accepted connection passes through a pump: on HTTP/2
//! connections the client's frames are decoded, an invalid `:authority` is replaced by
//! the `host:port` inside it (or dropped), and the frames are re-encoded for the
//! server. Server-to-client bytes, and HTTP/1 connections, are copied untouched.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use h2::frame::{BytesStr, Frame, Pseudo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::StreamExt;

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Bytes buffered between the pump and the server per direction.
const PIPE_BYTES: usize = 256 * 1024;

/// A TCP listener for [`axum::serve`] whose connections tolerate etcd clients'
/// malformed `:authority` (see the module docs). Sets `TCP_NODELAY`.
pub struct ClientListener {
    inner: TcpListener,
}

impl ClientListener {
    pub fn new(inner: TcpListener) -> Self {
        Self { inner }
    }
}

impl axum::serve::Listener for ClientListener {
    type Io = DuplexStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((tcp, addr)) => {
                    // Small gRPC frames must not wait for Nagle.
                    let _ = tcp.set_nodelay(true);
                    let (server_side, pump_side) = tokio::io::duplex(PIPE_BYTES);
                    tokio::spawn(async move {
                        if let Err(e) = pump(tcp, pump_side).await {
                            tracing::debug!(peer = %addr, error = %e, "client connection ended");
                        }
                    });
                    return (server_side, addr);
                }
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a client connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

async fn pump(tcp: TcpStream, server: DuplexStream) -> io::Result<()> {
    let (mut client_rd, mut client_wr) = tcp.into_split();
    let (mut server_rd, mut server_wr) = tokio::io::split(server);
    let to_client = tokio::spawn(async move {
        let r = tokio::io::copy(&mut server_rd, &mut client_wr).await;
        let _ = client_wr.shutdown().await;
        r
    });
    // Sniff the HTTP/2 preface, stopping at the first byte that differs.
    let mut head = [0u8; PREFACE.len()];
    let mut n = 0;
    while n < head.len() {
        let m = client_rd.read(&mut head[n..]).await?;
        if m == 0 || head[n..n + m] != PREFACE[n..n + m] {
            n += m;
            break;
        }
        n += m;
    }
    server_wr.write_all(&head[..n]).await?;
    let inbound = if n == PREFACE.len() && &head == PREFACE {
        relay_h2_frames(client_rd, server_wr).await
    } else {
        let r = tokio::io::copy(&mut client_rd, &mut server_wr)
            .await
            .map(|_| ());
        let _ = server_wr.shutdown().await;
        r
    };
    let outbound = to_client.await.map_err(io::Error::other)?;
    inbound.and(outbound.map(|_| ()))
}

async fn relay_h2_frames<R, W>(client: R, server: W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut from_client = h2::Codec::<_, Bytes>::new(ReadOnly(client));
    let mut to_server = h2::Codec::<_, Bytes>::new(WriteOnly(server));
    while let Some(frame) = from_client.next().await {
        let mut frame = frame.map_err(|e| io::Error::other(format!("{e:?}")))?;
        if let Frame::Headers(h) = &mut frame {
            repair_authority(h.pseudo_mut());
        }
        std::future::poll_fn(|cx| to_server.poll_ready(cx)).await?;
        to_server.buffer(frame).map_err(io::Error::other)?;
        std::future::poll_fn(|cx| to_server.flush(cx)).await?;
    }
    std::future::poll_fn(|cx| to_server.shutdown(cx)).await
}

fn repair_authority(p: &mut Pseudo) {
    let Some(a) = &p.authority else { return };
    if http::uri::Authority::try_from(&a[..]).is_ok() {
        return;
    }
    p.authority = authority_inside(a).and_then(|s| BytesStr::try_from(Bytes::from(s)).ok());
}

/// The `host:port` of the first URL inside `value` (`http://h:p`,
/// `#initially=[http://h:p;...]`), if it is a valid authority.
fn authority_inside(value: &str) -> Option<String> {
    let after = &value[value.find("://")? + 3..];
    let end = after.find(['/', ']', ';', ',', ' ']).unwrap_or(after.len());
    let cand = &after[..end];
    http::uri::Authority::try_from(cand)
        .ok()
        .map(|_| cand.to_string())
}

/// Gives a read half the write half `h2::Codec` wants; never written to.
struct ReadOnly<R>(R);

impl<R: AsyncRead + Unpin> AsyncRead for ReadOnly<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<R: Unpin> AsyncWrite for ReadOnly<R> {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(io::Error::other(
            "the client side of the relay is read-only",
        )))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Gives a write half the read half `h2::Codec` wants; reads as end of stream.
struct WriteOnly<W>(W);

impl<W: Unpin> AsyncRead for WriteOnly<W> {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for WriteOnly<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_authority_inside_etcd_client_values() {
        assert_eq!(
            authority_inside("http://127.0.0.1:2379").as_deref(),
            Some("127.0.0.1:2379")
        );
        assert_eq!(
            authority_inside("#initially=[https://example.com:2379;http://b:1]").as_deref(),
            Some("example.com:2379")
        );
        assert_eq!(authority_inside("http://h:1/path").as_deref(), Some("h:1"));
        assert_eq!(authority_inside("no url here"), None);
        assert_eq!(authority_inside("unix:///tmp/s.sock"), None);
    }

    #[test]
    fn repairs_or_drops_only_invalid_authorities() {
        let mut p = Pseudo {
            authority: BytesStr::try_from(Bytes::from_static(b"127.0.0.1:1")).ok(),
            ..Default::default()
        };
        repair_authority(&mut p);
        assert_eq!(p.authority.as_deref(), Some("127.0.0.1:1"));
        p.authority = BytesStr::try_from(Bytes::from_static(b"http://127.0.0.1:2")).ok();
        repair_authority(&mut p);
        assert_eq!(p.authority.as_deref(), Some("127.0.0.1:2"));
        p.authority = BytesStr::try_from(Bytes::from_static(b"/var/run/x.sock")).ok();
        repair_authority(&mut p);
        assert_eq!(p.authority, None);
    }
}
