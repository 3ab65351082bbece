//! The client-port listener and the connection loop that serves the router on it.
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
//!
//! On an `https` listener TLS is terminated before the pump ([`crate::tls::Handshaker`]),
//! so the pump and the server see the same plain bytes as on an `http` one; the
//! client's verified certificate goes into every request's extensions
//! ([`crate::ClientCertificate`]).
//!
//! The pump also enforces grpc-go's keep-alive policy on client PINGs (etcd's
//! `--grpc-keepalive-min-time`, [`PingPolicy`]): a client that pings more often than
//! that more than twice in a row gets `GOAWAY ENHANCE_YOUR_CALM` ("too_many_pings")
//! and the connection is closed. As in grpc-go, a ping after the server sent data or
//! headers does not count. [`serve`] runs hyper's HTTP/1 + HTTP/2 connection builder
//! with etcd's `--max-concurrent-streams` and server keep-alive pings
//! (`--grpc-keepalive-interval`, `--grpc-keepalive-timeout`) over a [`ClientListener`].

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use h2::frame::{BytesStr, Frame, GoAway, Pseudo, Reason, StreamId};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_stream::StreamExt;

use crate::tls::{ClientCertificate, Handshaker};

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Bytes buffered between the pump and the server per direction.
const PIPE_BYTES: usize = 256 * 1024;
/// grpc-go's `maxPingStrikes`: this many pings too soon are forgiven, the next one is not.
const MAX_PING_STRIKES: u32 = 2;
/// How long a GOAWAY waits for the server's current frame to end before the
/// connection is closed without it.
const GOAWAY_WAIT: Duration = Duration::from_secs(1);
/// HTTP/2 connection flow-control window the server grants a client. Beyond bounding
/// unread bytes, h2 (since 0.4.20) sets from it a budget for small DATA frames not yet
/// read by their handlers (half the window, each frame costing 256 bytes less its
/// size) and sends `GOAWAY ENHANCE_YOUR_CALM "too_many_data_frames"` when it runs out.
/// Each new watch or keep-alive stream opens with one small frame, so with hyper's
/// 1 MiB default a client that opens a few thousand streams on one connection faster
/// than their handlers start (a Kubernetes API server's watches on a loaded machine)
/// was cut off. 16 MiB (grpc-go's largest BDP window) budgets about 32,000 such
/// frames in flight.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// How often a client may ping (etcd's `--grpc-keepalive-min-time`, grpc-go's
/// `EnforcementPolicy.MinTime`). See the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PingPolicy {
    pub min_time: Duration,
}

impl Default for PingPolicy {
    /// etcd's default, 5 s.
    fn default() -> Self {
        PingPolicy {
            min_time: Duration::from_secs(5),
        }
    }
}

/// grpc-go's ping-strike accounting for one connection.
#[derive(Debug)]
struct PingStrikes {
    policy: PingPolicy,
    last_ping: Option<Instant>,
    strikes: u32,
}

impl PingStrikes {
    fn new(policy: PingPolicy) -> Self {
        PingStrikes {
            policy,
            last_ping: None,
            strikes: 0,
        }
    }

    /// A client PING arrived at `now`; `server_wrote` says whether the server sent
    /// data or headers since the last one. True: the client is over the limit.
    fn on_ping(&mut self, now: Instant, server_wrote: bool) -> bool {
        let last = self.last_ping.replace(now);
        if server_wrote {
            self.strikes = 0;
            return false;
        }
        if last.is_some_and(|l| now.duration_since(l) < self.policy.min_time) {
            self.strikes += 1;
        }
        self.strikes > MAX_PING_STRIKES
    }
}

/// Listener settings beyond the socket: TLS (for `https` URLs) and the ping policy.
#[derive(Debug, Clone, Default)]
pub struct ListenerOptions {
    pub tls: Option<Handshaker>,
    pub ping_policy: PingPolicy,
}

/// A TCP listener whose connections tolerate etcd clients' malformed `:authority`
/// (see the module docs), optionally behind TLS. Sets `TCP_NODELAY`. Served by
/// [`serve`].
pub struct ClientListener {
    inner: TcpListener,
    opts: ListenerOptions,
}

impl ClientListener {
    pub fn new(inner: TcpListener) -> Self {
        Self::with_options(inner, ListenerOptions::default())
    }

    pub fn with_options(inner: TcpListener, opts: ListenerOptions) -> Self {
        Self { inner, opts }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    async fn accept_tcp(&self) -> (TcpStream, SocketAddr) {
        loop {
            match self.inner.accept().await {
                Ok((tcp, addr)) => {
                    // Small gRPC frames must not wait for Nagle.
                    let _ = tcp.set_nodelay(true);
                    return (tcp, addr);
                }
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a client connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Turns an accepted connection into the server's end of a pump, after the TLS
    /// handshake if this listener has TLS. `None`: the connection was refused.
    async fn open(
        tcp: TcpStream,
        addr: SocketAddr,
        opts: &ListenerOptions,
    ) -> Option<(DuplexStream, Option<ClientCertificate>)> {
        let (server_side, pump_side) = tokio::io::duplex(PIPE_BYTES);
        let policy = opts.ping_policy;
        let cert = match &opts.tls {
            None => {
                tokio::spawn(run_pump(tcp, pump_side, policy, addr));
                None
            }
            Some(h) => match h.accept(tcp).await {
                Ok((tls, cert)) => {
                    tokio::spawn(run_pump(tls, pump_side, policy, addr));
                    cert
                }
                Err(e) => {
                    tracing::info!(peer = %addr, error = %e, "rejected a client connection");
                    return None;
                }
            },
        };
        Some((server_side, cert))
    }
}

/// How [`serve`] runs HTTP/2 connections (etcd's flags).
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// `--max-concurrent-streams`: streams one client connection may have open.
    pub max_concurrent_streams: u32,
    /// `--grpc-keepalive-interval`: the server pings an idle connection this often.
    pub keepalive_interval: Option<Duration>,
    /// `--grpc-keepalive-timeout`: a ping unanswered this long closes the connection.
    pub keepalive_timeout: Duration,
}

impl Default for ServeOptions {
    /// etcd's defaults: unlimited streams, a ping after 2 h, 20 s to answer it.
    fn default() -> Self {
        ServeOptions {
            max_concurrent_streams: u32::MAX,
            keepalive_interval: Some(Duration::from_secs(2 * 3600)),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// Serves `router` on `listener` until `shutdown` completes; then stops accepting,
/// asks every open connection to finish (HTTP/2 GOAWAY, HTTP/1 close after the
/// current response) and returns once they have. The caller bounds that wait.
pub async fn serve(
    listener: ClientListener,
    router: axum::Router,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(opts.max_concurrent_streams)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .keep_alive_interval(opts.keepalive_interval)
        .keep_alive_timeout(opts.keepalive_timeout);
    let builder = Arc::new(builder);
    let listener = Arc::new(listener);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, addr) = tokio::select! {
            _ = &mut shutdown => break,
            c = listener.accept_tcp() => c,
        };
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let router = router.clone();
        let listener = listener.clone();
        // Each connection's handshake runs in its own task: a slow one never holds up
        // the accept loop.
        tokio::spawn(async move {
            let Some((io, cert)) = ClientListener::open(tcp, addr, &listener.opts).await else {
                return;
            };
            let svc = tower::ServiceExt::map_request(
                router,
                move |mut req: http::Request<hyper::body::Incoming>| {
                    if let Some(c) = &cert {
                        req.extensions_mut().insert(c.clone());
                    }
                    req
                },
            );
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(svc))
                .into_owned();
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(peer = %addr, error = %e, "client connection ended");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

async fn run_pump<IO>(io: IO, server: DuplexStream, policy: PingPolicy, addr: SocketAddr)
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    if let Err(e) = pump(io, server, policy).await {
        tracing::debug!(peer = %addr, error = %e, "client connection ended");
    }
}

/// What the two directions of an HTTP/2 pump tell each other.
#[derive(Debug, Default)]
struct H2State {
    /// The server sent a DATA or HEADERS frame since the client's last PING.
    server_wrote: AtomicBool,
    /// The highest stream id the client opened (for GOAWAY's last-stream-id).
    last_stream: AtomicU32,
    /// Set when the client broke the ping policy: send GOAWAY and close.
    calm_down: AtomicBool,
    wake: Notify,
}

async fn pump<IO>(io: IO, server: DuplexStream, policy: PingPolicy) -> io::Result<()>
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut client_rd, client_wr) = tokio::io::split(io);
    let (server_rd, mut server_wr) = tokio::io::split(server);
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
    let h2 = n == PREFACE.len() && &head == PREFACE;
    let state = Arc::new(H2State::default());
    let to_client = tokio::spawn(copy_to_client(
        server_rd,
        client_wr,
        h2.then(|| state.clone()),
    ));
    let inbound = if h2 {
        relay_h2_frames(client_rd, server_wr, &state, policy).await
    } else {
        let r = tokio::io::copy(&mut client_rd, &mut server_wr)
            .await
            .map(|_| ());
        let _ = server_wr.shutdown().await;
        r
    };
    let outbound = to_client.await.map_err(io::Error::other)?;
    inbound.and(outbound)
}

/// Tracks HTTP/2 frame boundaries in the server's byte stream, without decoding it.
#[derive(Debug, Default)]
struct FrameCursor {
    head: [u8; 9],
    head_len: usize,
    /// Payload bytes of the current frame not yet seen.
    remaining: usize,
}

impl FrameCursor {
    /// Feeds bytes; returns whether a DATA or HEADERS frame started among them.
    fn feed(&mut self, mut bytes: &[u8]) -> bool {
        let mut wrote = false;
        while !bytes.is_empty() {
            if self.remaining > 0 {
                let take = self.remaining.min(bytes.len());
                self.remaining -= take;
                bytes = &bytes[take..];
                continue;
            }
            let take = (9 - self.head_len).min(bytes.len());
            self.head[self.head_len..self.head_len + take].copy_from_slice(&bytes[..take]);
            self.head_len += take;
            bytes = &bytes[take..];
            if self.head_len == 9 {
                let h = &self.head;
                self.remaining =
                    (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                // 0x0 DATA, 0x1 HEADERS.
                wrote |= h[3] <= 1;
                self.head_len = 0;
            }
        }
        wrote
    }

    fn at_boundary(&self) -> bool {
        self.head_len == 0 && self.remaining == 0
    }
}

/// The server-to-client direction: bytes copied as they come; on HTTP/2 connections
/// (`state`) frame boundaries are tracked so that a GOAWAY can be slipped in between
/// two frames when the client broke the ping policy.
async fn copy_to_client<R, W>(
    mut server: R,
    mut client: W,
    state: Option<Arc<H2State>>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Some(state) = state else {
        let r = tokio::io::copy(&mut server, &mut client).await.map(|_| ());
        let _ = client.shutdown().await;
        return r;
    };
    let mut cursor = FrameCursor::default();
    let mut buf = vec![0u8; 16 * 1024];
    let mut calm_since: Option<tokio::time::Instant> = None;
    loop {
        if state.calm_down.load(Ordering::Acquire) {
            let since = *calm_since.get_or_insert_with(tokio::time::Instant::now);
            if cursor.at_boundary() {
                let _ = client.write_all(&too_many_pings(&state)).await;
                let _ = client.flush().await;
                let _ = client.shutdown().await;
                return Ok(());
            }
            if since.elapsed() > GOAWAY_WAIT {
                let _ = client.shutdown().await;
                return Ok(());
            }
        }
        let n = tokio::select! {
            r = server.read(&mut buf) => r?,
            _ = state.wake.notified(), if calm_since.is_none() => continue,
            _ = tokio::time::sleep(GOAWAY_WAIT), if calm_since.is_some() => continue,
        };
        if n == 0 {
            if state.calm_down.load(Ordering::Acquire) && cursor.at_boundary() {
                let _ = client.write_all(&too_many_pings(&state)).await;
            }
            let _ = client.shutdown().await;
            return Ok(());
        }
        if cursor.feed(&buf[..n]) {
            state.server_wrote.store(true, Ordering::Release);
        }
        client.write_all(&buf[..n]).await?;
    }
}

/// grpc-go's answer to a client that pings too often.
fn too_many_pings(state: &H2State) -> BytesMut {
    let last = StreamId::from(state.last_stream.load(Ordering::Acquire));
    let frame = GoAway::with_debug_data(
        last,
        Reason::ENHANCE_YOUR_CALM,
        Bytes::from_static(b"too_many_pings"),
    );
    let mut out = BytesMut::new();
    frame.encode(&mut out);
    out
}

async fn relay_h2_frames<R, W>(
    client: R,
    server: W,
    state: &H2State,
    policy: PingPolicy,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut from_client = h2::Codec::<_, Bytes>::new(ReadOnly(client));
    let mut to_server = h2::Codec::<_, Bytes>::new(WriteOnly(server));
    let mut strikes = PingStrikes::new(policy);
    while let Some(frame) = from_client.next().await {
        let mut frame = frame.map_err(|e| io::Error::other(format!("{e:?}")))?;
        match &mut frame {
            Frame::Headers(h) => {
                state
                    .last_stream
                    .fetch_max(u32::from(h.stream_id()), Ordering::AcqRel);
                repair_authority(h.pseudo_mut());
            }
            Frame::Ping(p) if !p.is_ack() => {
                let wrote = state.server_wrote.swap(false, Ordering::AcqRel);
                if strikes.on_ping(Instant::now(), wrote) {
                    tracing::info!(
                        min_time = ?policy.min_time,
                        "client pings too often; closing its connection (GOAWAY ENHANCE_YOUR_CALM)"
                    );
                    state.calm_down.store(true, Ordering::Release);
                    state.wake.notify_one();
                    // The server gets nothing more from this client.
                    let _ = std::future::poll_fn(|cx| to_server.shutdown(cx)).await;
                    return Ok(());
                }
            }
            _ => {}
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

    /// Thousands of streams on one connection, each opened with one small DATA frame
    /// that its handler has not read yet, are all served (hyper's default window let
    /// h2 cut the connection off at about 2,200).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_unread_small_frames_do_not_cut_the_connection() {
        const STREAMS: usize = 8_000;
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let arrived = Arc::new(tokio::sync::Semaphore::new(0));
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let (a, r) = (arrived.clone(), release.clone());
        let router = axum::Router::new().route(
            "/s",
            axum::routing::post(move |body: axum::body::Body| {
                let (a, r) = (a.clone(), r.clone());
                async move {
                    a.add_permits(1);
                    // Every handler waits until all streams have arrived unread.
                    r.acquire().await.unwrap().forget();
                    let mut data = body.into_data_stream();
                    let first = data.next().await.unwrap().unwrap();
                    first.len().to_string()
                }
            }),
        );
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            ClientListener::new(tcp),
            router,
            ServeOptions::default(),
            async move {
                let _ = stop_rx.await;
            },
        ));
        let io = TcpStream::connect(addr).await.unwrap();
        let (client, conn) = h2::client::handshake(io).await.unwrap();
        let conn = tokio::spawn(conn);
        let mut replies = Vec::with_capacity(STREAMS);
        let mut bodies = Vec::with_capacity(STREAMS);
        for _ in 0..STREAMS {
            let mut c = client.clone().ready().await.unwrap();
            let req = http::Request::post(format!("http://{addr}/s"))
                .body(())
                .unwrap();
            let (reply, mut body) = c.send_request(req, false).unwrap();
            // A gRPC message's size: a 5-byte prefix and a short WatchCreateRequest.
            body.send_data(Bytes::from_static(&[7; 20]), false).unwrap();
            replies.push(reply);
            bodies.push(body);
        }
        let waited = tokio::time::timeout(
            Duration::from_secs(60),
            arrived.acquire_many(STREAMS as u32),
        )
        .await;
        assert!(
            waited.is_ok(),
            "only {} of {STREAMS} streams reached their handler (conn: {:?})",
            arrived.available_permits(),
            conn.is_finished()
        );
        release.add_permits(STREAMS);
        for reply in replies {
            let reply = reply.await.expect("stream answered");
            assert_eq!(reply.status(), 200);
            let mut b = reply.into_body();
            assert_eq!(b.data().await.unwrap().unwrap(), Bytes::from_static(b"20"));
        }
        drop(bodies);
        let _ = stop_tx.send(());
        drop(client);
        let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    }

    #[test]
    fn ping_policy_is_grpc_gos() {
        let mut p = PingStrikes::new(PingPolicy {
            min_time: Duration::from_secs(5),
        });
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // The first ping is free; two too soon are forgiven; the third is not.
        assert!(!p.on_ping(at(0), false));
        assert!(!p.on_ping(at(100), false));
        assert!(!p.on_ping(at(200), false));
        assert!(p.on_ping(at(300), false));
        // Pings after the server sent data, or spaced by min_time, never count.
        let mut p = PingStrikes::new(PingPolicy::default());
        for i in 0..10 {
            assert!(!p.on_ping(at(i * 10), true));
        }
        let mut p = PingStrikes::new(PingPolicy::default());
        for i in 0..10 {
            assert!(!p.on_ping(at(i * 5_000), false));
        }
    }

    #[test]
    fn frame_cursor_follows_frame_boundaries() {
        let mut c = FrameCursor::default();
        // SETTINGS (type 4), 6 payload bytes, fed in pieces.
        let settings = [0, 0, 6, 4, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6];
        assert!(!c.feed(&settings[..4]));
        assert!(!c.at_boundary());
        assert!(!c.feed(&settings[4..12]));
        assert!(!c.at_boundary());
        assert!(!c.feed(&settings[12..]));
        assert!(c.at_boundary());
        // HEADERS (type 1) with 2 bytes, then DATA (type 0) with none.
        assert!(c.feed(&[0, 0, 2, 1, 4, 0, 0, 0, 1, 9, 9, 0, 0, 0, 0, 1, 0, 0, 0, 1]));
        assert!(c.at_boundary());
    }

    #[test]
    fn goaway_is_enhance_your_calm_too_many_pings() {
        let st = H2State::default();
        st.last_stream.store(7, Ordering::Release);
        let f = too_many_pings(&st);
        // length 8 + 14, type 7, stream 0, last stream 7, code 0xb.
        assert_eq!(&f[..9], &[0, 0, 22, 7, 0, 0, 0, 0, 0]);
        assert_eq!(&f[9..17], &[0, 0, 0, 7, 0, 0, 0, 0xb]);
        assert_eq!(&f[17..], b"too_many_pings");
    }

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
