//! A TCP fault proxy for peer links.
//!
//! [`FaultProxy`] listens on one address and pipes every accepted connection, both
//! ways, to an upstream address. Tests use it in front of a member's peer listener to
//! cut links: by the source IP of the connecting member (each member binds its
//! outgoing peer connections to its own `127.0.0.x`), or all at once. Cuts are
//! immediate: existing connections from a blocked source are dropped (both halves),
//! and new ones are accepted and closed at once, until unblocked.
//!
//! Besides cuts: a forwarding delay with jitter (each chunk waits `delay ± jitter`,
//! uniformly; order is kept, as on one TCP stream) and random drop: each forwarded
//! chunk is, with the set probability, dropped together with its connection (on a
//! stream transport losing bytes means losing the connection; the members reconnect
//! and Raft resends what was lost).
//!
//! The controls are synchronous and cheap, so they can be called from sync or async
//! code. Dropping the proxy stops it (its listener and every connection).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// What is currently blocked, and the forwarding delay.
#[derive(Debug, Default)]
struct State {
    blocked: HashSet<IpAddr>,
    all: bool,
    delay: Duration,
    jitter: Duration,
    /// Probability (in millionths) that a forwarded chunk is dropped with its connection.
    drop_ppm: u32,
    rng: u64,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Bumped on every change to the blocks; each connection re-checks itself.
    generation: watch::Sender<u64>,
}

impl Shared {
    fn is_blocked(&self, src: IpAddr) -> bool {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.all || s.blocked.contains(&src)
    }

    /// The delay for the next chunk, or `None` if it is to be dropped.
    fn next_chunk(&self) -> Option<Duration> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.drop_ppm == 0 && s.jitter.is_zero() {
            return Some(s.delay);
        }
        // xorshift64*: fault schedules do not need to replay byte for byte.
        s.rng ^= s.rng >> 12;
        s.rng ^= s.rng << 25;
        s.rng ^= s.rng >> 27;
        let r = s.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
        if (r % 1_000_000) < u64::from(s.drop_ppm) {
            return None;
        }
        let jitter = s.jitter.as_micros() as u64;
        if jitter == 0 {
            return Some(s.delay);
        }
        let offset = (r >> 20) % (2 * jitter + 1);
        let base = s.delay.as_micros() as u64;
        Some(Duration::from_micros(
            (base + offset).saturating_sub(jitter),
        ))
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()));
        self.generation.send_modify(|g| *g += 1);
    }
}

/// A running TCP proxy with fault controls. Dropping it stops it.
#[derive(Debug)]
pub struct FaultProxy {
    listen: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    /// The accept loop; it owns every connection task (in a `JoinSet`), so aborting
    /// it stops them all.
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy listening on `listen` (port 0 picks a free port: see
    /// [`FaultProxy::local_addr`]) that forwards to `upstream`. Must be called
    /// within a tokio runtime.
    pub fn start(listen: SocketAddr, upstream: SocketAddr) -> Result<FaultProxy> {
        let handle = tokio::runtime::Handle::try_current()
            .context("FaultProxy::start must run inside a tokio runtime")?;
        let std_listener = std::net::TcpListener::bind(listen)
            .with_context(|| format!("binding fault proxy on {listen}"))?;
        std_listener.set_nonblocking(true)?;
        let listen = std_listener.local_addr()?;
        let listener = {
            let _guard = handle.enter();
            TcpListener::from_std(std_listener)?
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rng: 0x9e37_79b9_7f4a_7c15 ^ u64::from(listen.port()),
                ..State::default()
            }),
            generation: watch::channel(0).0,
        });
        let task = handle.spawn(accept_loop(listener, upstream, shared.clone()));
        Ok(FaultProxy {
            listen,
            upstream,
            shared,
            task,
        })
    }

    /// Where the proxy listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.listen
    }

    /// Where the proxy forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Refuses connections from these source IPs and cuts the existing ones (in
    /// addition to any already blocked).
    pub fn block_sources(&self, ips: &[IpAddr]) {
        self.shared
            .update(|s| s.blocked.extend(ips.iter().copied()));
    }

    /// Cuts every connection and refuses all new ones, until [`Self::unblock_all`].
    pub fn block_all(&self) {
        self.shared.update(|s| s.all = true);
    }

    /// Lifts every block (the delay stays).
    pub fn unblock_all(&self) {
        self.shared.update(|s| {
            s.all = false;
            s.blocked.clear();
        });
    }

    /// Delays every forwarded chunk by `delay` (zero: no delay).
    pub fn set_delay(&self, delay: Duration) {
        self.set_delay_jitter(delay, Duration::ZERO);
    }

    /// Delays every forwarded chunk by `delay ± jitter` (uniform), e.g. etcd's
    /// robustness delay of 75 ± 50 ms.
    pub fn set_delay_jitter(&self, delay: Duration, jitter: Duration) {
        self.shared.update(|s| {
            s.delay = delay;
            s.jitter = jitter.min(delay);
        });
    }

    /// Drops each forwarded chunk, and its connection, with probability `p` (0 stops).
    pub fn set_drop(&self, p: f64) {
        let ppm = (p.clamp(0.0, 1.0) * 1_000_000.0) as u32;
        self.shared.update(|s| s.drop_ppm = ppm);
    }

    /// Lifts every block, delay and drop.
    pub fn clear(&self) {
        self.shared.update(|s| {
            s.all = false;
            s.blocked.clear();
            s.delay = Duration::ZERO;
            s.jitter = Duration::ZERO;
            s.drop_ppm = 0;
        });
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((inbound, peer)) = accepted else {
                    // E.g. out of file descriptors: back off briefly, keep serving.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                // Subscribe before checking, so a block that comes later is seen.
                let mut generation = shared.generation.subscribe();
                generation.mark_unchanged();
                if shared.is_blocked(peer.ip()) {
                    drop(inbound);
                    continue;
                }
                conns.spawn(serve_conn(inbound, peer.ip(), upstream, shared.clone(), generation));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Pipes one connection until either side closes or its source is blocked; dropping
/// both streams on return cuts it.
async fn serve_conn(
    inbound: TcpStream,
    src: IpAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    mut generation: watch::Receiver<u64>,
) {
    let cut = async {
        loop {
            if generation.changed().await.is_err() || shared.is_blocked(src) {
                return;
            }
        }
    };
    let forward = async {
        let Ok(outbound) = TcpStream::connect(upstream).await else {
            return;
        };
        let _ = inbound.set_nodelay(true);
        let _ = outbound.set_nodelay(true);
        let (mut ri, mut wi) = inbound.into_split();
        let (mut ro, mut wo) = outbound.into_split();
        let _ = tokio::try_join!(
            pipe(&mut ri, &mut wo, &shared),
            pipe(&mut ro, &mut wi, &shared)
        );
    };
    tokio::select! {
        () = cut => {}
        () = forward => {}
    }
}

/// Copies `from` to `to` (each chunk delayed by the current delay); on EOF shuts
/// down `to`'s write side.
async fn pipe(
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    shared: &Shared,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            to.shutdown().await?;
            return Ok(());
        }
        let Some(delay) = shared.next_chunk() else {
            return Err(std::io::Error::other("dropped by the fault proxy"));
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        to.write_all(&buf[..n]).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tokio::net::TcpSocket;

    const DEADLINE: Duration = Duration::from_secs(5);

    /// An echo server on 127.0.0.1; runs until the test ends.
    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn connect_from(src: [u8; 4], to: SocketAddr) -> TcpStream {
        let sock = TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::from((src, 0))).unwrap();
        sock.connect(to).await.unwrap()
    }

    /// Sends `msg` and expects it echoed back.
    async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
        s.write_all(msg).await?;
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(DEADLINE, s.read_exact(&mut got))
            .await
            .map_err(|_| std::io::Error::other("echo timed out"))??;
        assert_eq!(got, msg);
        Ok(())
    }

    /// Asserts the connection is closed (EOF or error) within the deadline.
    async fn assert_cut(s: &mut TcpStream) {
        let start = Instant::now();
        // The write may fail or succeed; either way the read must end.
        let _ = s.write_all(b"ping").await;
        let mut buf = [0u8; 16];
        match tokio::time::timeout(DEADLINE, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {}
            Ok(Ok(n)) => panic!("connection still open: read {n} bytes"),
            Err(_) => panic!("connection not cut after {:?}", start.elapsed()),
        }
    }

    #[tokio::test]
    async fn forwards_both_ways() {
        let echo = echo_server().await;
        let proxy = FaultProxy::start("127.0.0.1:0".parse().unwrap(), echo).unwrap();
        assert_eq!(proxy.upstream(), echo);
        let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
        round_trip(&mut s, b"hello").await.unwrap();
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        round_trip(&mut s, &big).await.unwrap();
        // Half-close: the echo server sees EOF, finishes, and closes its side.
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(DEADLINE, s.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn delay_is_applied() {
        let echo = echo_server().await;
        let proxy = FaultProxy::start("127.0.0.1:0".parse().unwrap(), echo).unwrap();
        proxy.set_delay(Duration::from_millis(200));
        let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
        let start = Instant::now();
        round_trip(&mut s, b"slow").await.unwrap();
        // Delayed once each way.
        assert!(
            start.elapsed() >= Duration::from_millis(400),
            "{:?}",
            start.elapsed()
        );
        proxy.set_delay(Duration::ZERO);
        round_trip(&mut s, b"fast").await.unwrap();
    }

    #[tokio::test]
    async fn jitter_stays_in_bounds_and_drop_cuts() {
        let echo = echo_server().await;
        let proxy = FaultProxy::start("127.0.0.1:0".parse().unwrap(), echo).unwrap();
        proxy.set_delay_jitter(Duration::from_millis(75), Duration::from_millis(50));
        for _ in 0..200 {
            let d = proxy.shared.next_chunk().unwrap();
            assert!(d >= Duration::from_millis(25) && d <= Duration::from_millis(125));
        }
        let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
        let start = Instant::now();
        round_trip(&mut s, b"jittered").await.unwrap();
        assert!(start.elapsed() >= Duration::from_millis(50));
        proxy.set_drop(1.0);
        assert_cut(&mut s).await;
        proxy.clear();
        let mut t = TcpStream::connect(proxy.local_addr()).await.unwrap();
        round_trip(&mut t, b"clear").await.unwrap();
    }

    #[tokio::test]
    async fn block_sources_cuts_and_refuses_by_source_ip() {
        let echo = echo_server().await;
        let proxy = FaultProxy::start("127.0.0.1:0".parse().unwrap(), echo).unwrap();
        let addr = proxy.local_addr();
        let mut from1 = connect_from([127, 0, 0, 1], addr).await;
        let mut from3 = connect_from([127, 0, 0, 3], addr).await;
        round_trip(&mut from1, b"a").await.unwrap();
        round_trip(&mut from3, b"b").await.unwrap();

        proxy.block_sources(&["127.0.0.1".parse().unwrap()]);
        // The existing connection from 127.0.0.1 is cut; the one from .3 is not.
        assert_cut(&mut from1).await;
        round_trip(&mut from3, b"still up").await.unwrap();
        // New connections from 127.0.0.1 are accepted and closed at once.
        let mut again = connect_from([127, 0, 0, 1], addr).await;
        assert_cut(&mut again).await;
        let mut new3 = connect_from([127, 0, 0, 3], addr).await;
        round_trip(&mut new3, b"new .3").await.unwrap();

        proxy.unblock_all();
        let mut back = connect_from([127, 0, 0, 1], addr).await;
        round_trip(&mut back, b"restored").await.unwrap();
        round_trip(&mut from3, b"untouched").await.unwrap();
    }

    #[tokio::test]
    async fn block_all_cuts_everything_until_unblocked() {
        let echo = echo_server().await;
        let proxy = FaultProxy::start("127.0.0.1:0".parse().unwrap(), echo).unwrap();
        let addr = proxy.local_addr();
        let mut a = connect_from([127, 0, 0, 1], addr).await;
        let mut b = connect_from([127, 0, 0, 4], addr).await;
        round_trip(&mut a, b"a").await.unwrap();
        round_trip(&mut b, b"b").await.unwrap();
        proxy.block_all();
        assert_cut(&mut a).await;
        assert_cut(&mut b).await;
        let mut c = connect_from([127, 0, 0, 4], addr).await;
        assert_cut(&mut c).await;
        proxy.unblock_all();
        let mut d = connect_from([127, 0, 0, 4], addr).await;
        round_trip(&mut d, b"d").await.unwrap();
    }

    #[tokio::test]
    async fn drop_stops_listener_and_connections() {
        let echo = echo_server().await;
        let proxy = FaultProxy::start("127.0.0.1:0".parse().unwrap(), echo).unwrap();
        let addr = proxy.local_addr();
        let mut a = TcpStream::connect(addr).await.unwrap();
        round_trip(&mut a, b"a").await.unwrap();
        drop(proxy);
        assert_cut(&mut a).await;
        // The listener is gone: connecting fails (or, if the port was reused, at
        // least does not reach the echo server through us).
        crate::wait_until(DEADLINE, "proxy listener closed", || async {
            match TcpStream::connect(addr).await {
                Err(_) => Ok(()),
                Ok(_) => anyhow::bail!("still accepting"),
            }
        })
        .await
        .unwrap();
    }
}
