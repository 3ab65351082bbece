//! The network transport: a tonic `Peer` service. Each member keeps one client stream
//! of message batches open to every peer (reconnecting when it breaks) and receives its
//! peers' streams in its own `Peer` server. Snapshots travel on a stream of their own,
//! in chunks, and are verified before the node sees them.
//!
//! Peer TLS: for `https://` peer URLs the transport dials TCP itself and runs a rustls
//! client handshake with the configuration its [`PeerTls`] gives at that moment (so a
//! rotated peer certificate or CA applies to the next connection), presenting the
//! member's peer certificate; tonic then speaks plain HTTP/2 over that stream. The
//! configuration comes from the caller: this crate knows no files or flags.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use concord_storage::SnapshotFile;
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};

use crate::peerpb::peer_client::PeerClient;
use crate::peerpb::peer_server::{Peer, PeerServer};
use crate::peerpb::{AttributesReply, Done, RaftBatch, SnapshotChunk};
pub use crate::transport::Attributes;
use crate::transport::{AttributesFuture, Inbox, Transport};

/// Messages queued for one peer at most; more are dropped while it is slow or away.
const PEER_QUEUE: usize = 4096;
/// Bytes of messages sent in one batch at most.
const BATCH_BYTES: usize = 4 << 20;
/// Snapshot bytes per chunk.
const CHUNK_BYTES: usize = 1 << 20;
/// Largest message the peer service accepts (a batch, or an entry near the request
/// size limit plus framing).
pub const MAX_PEER_MESSAGE: usize = 64 << 20;
/// Pause between reconnection attempts to a peer that is away.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(100);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 pings on peer connections: a link that stops answering (a peer frozen, a
/// network that drops packets, a half-closed connection) is noticed within seconds and
/// reconnected, instead of hanging until TCP gives up.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);
/// A batch that cannot be handed to the stream for this long means the stream is stuck.
const SEND_STALL: Duration = Duration::from_secs(3);
/// A stream that ends sooner than this counts as a failed attempt (back off).
const SHORT_STREAM: Duration = Duration::from_secs(1);
/// How often the round trip to each peer is measured.
const PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// The TLS client configuration for `https://` peers, asked for at every connection.
pub type PeerTls = Arc<dyn Fn() -> Arc<rustls::ClientConfig> + Send + Sync>;

/// Where and how one peer URL is dialed.
#[derive(Clone)]
struct PeerEndpoint {
    ep: Endpoint,
    /// For `https://` URLs: the TLS configuration and the name to verify.
    tls: Option<(PeerTls, rustls::pki_types::ServerName<'static>)>,
    local_ip: Option<IpAddr>,
}

impl PeerEndpoint {
    fn new(
        url: &str,
        local_ip: Option<IpAddr>,
        tls: Option<&PeerTls>,
    ) -> Result<PeerEndpoint, String> {
        let (ep_url, tls) = match url.strip_prefix("https://") {
            Some(rest) => {
                let tls = tls.ok_or_else(|| {
                    format!("{url}: an https:// peer URL needs peer TLS (--peer-cert-file or --peer-auto-tls)")
                })?;
                let hostport = rest.trim_end_matches('/');
                let host = hostport
                    .rsplit_once(':')
                    .map_or(hostport, |(h, _)| h)
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                let name = rustls::pki_types::ServerName::try_from(host.to_string())
                    .map_err(|e| format!("{url}: {e}"))?;
                // tonic must not try TLS itself: the connector does it.
                (format!("http://{rest}"), Some((tls.clone(), name)))
            }
            None => (url.to_string(), None),
        };
        let ep = Endpoint::from_shared(ep_url).map_err(|e| e.to_string())?;
        Ok(PeerEndpoint { ep, tls, local_ip })
    }

    fn map(mut self, f: impl FnOnce(Endpoint) -> Endpoint) -> Self {
        self.ep = f(self.ep);
        self
    }

    async fn connect(&self) -> Result<Channel, tonic::transport::Error> {
        let Some((tls, name)) = self.tls.clone() else {
            return self.ep.connect().await;
        };
        let local_ip = self.local_ip;
        let connector = tower::service_fn(move |uri: tonic::codegen::http::Uri| {
            let tls = tls.clone();
            let name = name.clone();
            async move {
                let host = uri
                    .host()
                    .unwrap_or_default()
                    .trim_start_matches('[')
                    .trim_end_matches(']');
                let port = uri.port_u16().unwrap_or(443);
                let addr = tokio::net::lookup_host((host, port))
                    .await?
                    .next()
                    .ok_or_else(|| {
                        std::io::Error::other(format!("{host} resolves to no address"))
                    })?;
                let sock = if addr.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()?
                } else {
                    tokio::net::TcpSocket::new_v6()?
                };
                if let Some(ip) = local_ip {
                    sock.bind(std::net::SocketAddr::new(ip, 0))?;
                }
                let tcp = sock.connect(addr).await?;
                tcp.set_nodelay(true)?;
                let stream = tokio_rustls::TlsConnector::from(tls())
                    .connect(name, tcp)
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        });
        self.ep.connect_with_connector(connector).await
    }
}

/// Sends Raft messages to peers over gRPC.
pub struct GrpcTransport {
    peers: Mutex<HashMap<u64, String>>,
    local_ip: Option<IpAddr>,
    tls: Option<PeerTls>,
    runtime: tokio::runtime::Handle,
    queues: Mutex<HashMap<u64, mpsc::Sender<Vec<u8>>>>,
    inbox: OnceLock<Inbox>,
}

impl std::fmt::Debug for GrpcTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcTransport")
            .field("peers", &self.peers)
            .finish_non_exhaustive()
    }
}

impl GrpcTransport {
    /// `peers`: id → peer URL (`http://host:port`) of every other member.
    /// `local_ip`: bind outgoing connections to this address (the host this member
    /// listens on for peers), so a peer's connections can be told apart by source.
    /// Tasks run on `runtime`. `https://` peers are dialed with `tls` (see the module
    /// docs); without it they are unreachable.
    pub fn new(
        peers: HashMap<u64, String>,
        local_ip: Option<IpAddr>,
        runtime: tokio::runtime::Handle,
        tls: Option<PeerTls>,
    ) -> Arc<GrpcTransport> {
        Arc::new(GrpcTransport {
            peers: Mutex::new(peers),
            local_ip,
            tls,
            runtime,
            queues: Mutex::new(HashMap::new()),
            inbox: OnceLock::new(),
        })
    }

    /// Adds a peer, or changes where it is reached (membership changes).
    fn add_peer(&self, id: u64, url: &str) {
        let mut peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        if peers.get(&id).map(String::as_str) == Some(url) {
            return;
        }
        peers.insert(id, url.to_string());
        drop(peers);
        if let Some(inbox) = self.inbox.get() {
            self.start_peer(id, url, inbox);
        }
    }

    /// Stops sending to a peer (it was removed).
    fn drop_peer(&self, id: u64) {
        self.peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
        // Dropping the queue ends the peer's task.
        self.queues
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }

    fn start_peer(&self, id: u64, url: &str, inbox: &Inbox) {
        let (tx, rx) = mpsc::channel(PEER_QUEUE);
        self.queues
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, tx);
        match self.endpoint(url) {
            Ok(ep) => {
                self.runtime
                    .spawn(probe_loop(id, ep.clone(), tx_weak(&self.queues, id)));
                self.runtime.spawn(peer_loop(id, ep, rx, inbox.clone()));
            }
            Err(e) => {
                tracing::error!(peer = format!("{id:x}"), url, error = %e, "bad peer URL")
            }
        }
    }

    fn endpoint(&self, url: &str) -> Result<PeerEndpoint, String> {
        Ok(
            PeerEndpoint::new(url, self.local_ip, self.tls.as_ref())?.map(|ep| {
                ep.connect_timeout(CONNECT_TIMEOUT)
                    .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                    .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                    .keep_alive_while_idle(true)
                    .tcp_nodelay(true)
                    .local_address(self.local_ip)
            }),
        )
    }
}

impl Transport for GrpcTransport {
    fn attach(&self, inbox: Inbox) {
        let peers = self
            .peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        for (id, url) in &peers {
            self.start_peer(*id, url, &inbox);
        }
        let _ = self.inbox.set(inbox);
    }

    fn send(&self, msgs: Vec<Message>) {
        let queues = self.queues.lock().unwrap_or_else(PoisonError::into_inner);
        for m in msgs {
            let Some(q) = queues.get(&m.to) else {
                tracing::debug!(to = m.to, "message for an unknown peer dropped");
                continue;
            };
            match m.write_to_bytes() {
                Ok(bytes) => {
                    if q.try_send(bytes).is_err() {
                        tracing::debug!(to = m.to, "peer queue full; message dropped");
                        let to = crate::metrics::id_label(m.to);
                        ::metrics::counter!(crate::metrics::PEER_SENT_FAILURES, "To" => to)
                            .increment(1);
                        if m.get_msg_type() == MessageType::MsgHeartbeat {
                            ::metrics::counter!(crate::metrics::HEARTBEAT_SEND_FAILURES)
                                .increment(1);
                        }
                    }
                }
                Err(e) => tracing::error!(error = %e, "encoding a raft message"),
            }
        }
    }

    fn set_peer(&self, id: u64, url: &str) {
        self.add_peer(id, url);
    }

    fn remove_peer(&self, id: u64) {
        self.drop_peer(id);
    }

    fn fetch_attributes(&self, url: &str) -> AttributesFuture {
        let url = url.to_string();
        let local_ip = self.local_ip;
        let tls = self.tls.clone();
        Box::pin(async move {
            fetch_attributes(&url, local_ip, tls.as_ref())
                .await
                .map_err(|reason| crate::Error::Peer { url, reason })
        })
    }

    fn send_snapshot(&self, msg: Message, file: Arc<SnapshotFile>) {
        let Some(inbox) = self.inbox.get().cloned() else {
            return;
        };
        let to = msg.to;
        let url = self
            .peers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&to)
            .cloned();
        let Some(ep) = url.and_then(|u| self.endpoint(&u).ok()) else {
            inbox.snapshot_status(to, false);
            return;
        };
        self.runtime.spawn(async move {
            let r = send_snapshot(ep, msg, file).await;
            if let Err(e) = &r {
                tracing::warn!(to = format!("{to:x}"), error = %e, "sending a snapshot failed");
            }
            inbox.snapshot_status(to, r.is_ok());
        });
    }
}

/// A weak handle on a peer's queue: the peer's prober ends once the queue is gone.
fn tx_weak(
    queues: &Mutex<HashMap<u64, mpsc::Sender<Vec<u8>>>>,
    id: u64,
) -> Option<mpsc::WeakSender<Vec<u8>>> {
    queues
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&id)
        .map(mpsc::Sender::downgrade)
}

/// Measures the round trip to a peer every [`PROBE_INTERVAL`] with a small call on a
/// connection of its own (etcd's prober), for `etcd_network_peer_round_trip_time_seconds`,
/// until the peer is removed.
async fn probe_loop(id: u64, ep: PeerEndpoint, queue: Option<mpsc::WeakSender<Vec<u8>>>) {
    let Some(queue) = queue else { return };
    let to = crate::metrics::id_label(id);
    let rtt = ::metrics::histogram!(crate::metrics::PEER_RTT, "To" => to);
    let mut client = None;
    let mut every = tokio::time::interval(PROBE_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while queue.upgrade().is_some() {
        every.tick().await;
        if client.is_none() {
            client = ep.connect().await.ok().map(PeerClient::new);
        }
        let Some(c) = client.as_mut() else { continue };
        let started = std::time::Instant::now();
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, c.attributes(Done {})).await {
            Ok(Ok(_)) => rtt.record(started.elapsed().as_secs_f64()),
            _ => client = None,
        }
    }
}

/// Keeps a stream open to one peer and feeds it from the peer's queue.
async fn peer_loop(id: u64, ep: PeerEndpoint, mut rx: mpsc::Receiver<Vec<u8>>, inbox: Inbox) {
    let mut reported = false;
    let active = ::metrics::gauge!(
        crate::metrics::ACTIVE_PEERS,
        "Local" => crate::metrics::id_label(inbox.id()),
        "Remote" => crate::metrics::id_label(id)
    );
    let sent =
        ::metrics::counter!(crate::metrics::PEER_SENT_BYTES, "To" => crate::metrics::id_label(id));
    // Messages that never left for an unreachable peer (etcd counts them too).
    let failures = ::metrics::counter!(crate::metrics::PEER_SENT_FAILURES, "To" => crate::metrics::id_label(id));
    loop {
        let channel = match ep.connect().await {
            Ok(c) => c,
            Err(e) => {
                if !reported {
                    tracing::debug!(peer = format!("{id:x}"), error = %e, "peer unreachable");
                    reported = true;
                }
                inbox.unreachable(id);
                // Whatever queued meanwhile is stale; Raft resends what it needs.
                while rx.try_recv().is_ok() {
                    failures.increment(1);
                }
                tokio::time::sleep(RECONNECT_BACKOFF).await;
                if rx.is_closed() {
                    return;
                }
                continue;
            }
        };
        reported = false;
        let began = std::time::Instant::now();
        active.set(1.0);
        let more = stream_to(channel, &mut rx, &sent).await;
        active.set(0.0);
        if !more {
            return;
        }
        inbox.unreachable(id);
        if began.elapsed() < SHORT_STREAM {
            tokio::time::sleep(RECONNECT_BACKOFF).await;
        }
    }
}

/// Streams batches until the stream breaks (returns true: reconnect) or the queue
/// closes (false: the node is gone).
async fn stream_to(
    channel: Channel,
    rx: &mut mpsc::Receiver<Vec<u8>>,
    sent: &::metrics::Counter,
) -> bool {
    let mut client = PeerClient::new(channel)
        .max_decoding_message_size(MAX_PEER_MESSAGE)
        .max_encoding_message_size(MAX_PEER_MESSAGE);
    let (tx, srx) = mpsc::channel::<RaftBatch>(16);
    let mut call = Box::pin(client.raft(ReceiverStream::new(srx)));
    loop {
        tokio::select! {
            _ = &mut call => return true,
            m = rx.recv() => {
                let Some(first) = m else { return false };
                let mut size = first.len();
                let mut messages = vec![first];
                while size < BATCH_BYTES {
                    match rx.try_recv() {
                        Ok(m) => {
                            size += m.len();
                            messages.push(m);
                        }
                        Err(_) => break,
                    }
                }
                // Waiting here while the peer is slow is fine: the raft thread never
                // waits on this task, it drops messages when the queue is full.
                tokio::select! {
                    r = tokio::time::timeout(SEND_STALL, tx.send(RaftBatch { messages })) => {
                        if !matches!(r, Ok(Ok(()))) {
                            return true;
                        }
                        sent.increment(size as u64);
                    }
                    _ = &mut call => return true,
                }
            }
        }
    }
}

async fn send_snapshot(
    ep: PeerEndpoint,
    msg: Message,
    file: Arc<SnapshotFile>,
) -> Result<(), String> {
    fail::fail_point!(concord_storage::failpoints::SNAPSHOT_BEFORE_SEND);
    let channel = ep.connect().await.map_err(|e| e.to_string())?;
    let mut client = PeerClient::new(channel)
        .max_decoding_message_size(MAX_PEER_MESSAGE)
        .max_encoding_message_size(MAX_PEER_MESSAGE);
    let header = msg.write_to_bytes().map_err(|e| e.to_string())?;
    let total = file.len();
    let (tx, rx) = mpsc::channel::<SnapshotChunk>(4);
    // Reading the file is blocking work; it feeds the stream from its own thread.
    let reader = tokio::task::spawn_blocking(move || -> Result<(), String> {
        let mut r = file.raw_reader().map_err(|e| e.to_string())?;
        let mut first = Some(header);
        loop {
            let mut buf = vec![0u8; CHUNK_BYTES];
            let mut n = 0;
            while n < buf.len() {
                match r.read(&mut buf[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) => return Err(e.to_string()),
                }
            }
            buf.truncate(n);
            let last = n == 0;
            let chunk = SnapshotChunk {
                message: first.take().unwrap_or_default(),
                total_bytes: total,
                data: buf,
            };
            if tx.blocking_send(chunk).is_err() {
                return Err("snapshot stream closed".into());
            }
            if last {
                return Ok(());
            }
        }
    });
    let sent = client
        .snapshot(ReceiverStream::new(rx))
        .await
        .map_err(|s| s.message().to_string());
    let read = reader.await.map_err(|e| e.to_string())?;
    fail::fail_point!(concord_storage::failpoints::SNAPSHOT_AFTER_SEND);
    sent?;
    read
}

/// Asks the member at `url` for the attributes it publishes (see [`peer_service`]).
pub async fn fetch_attributes(
    url: &str,
    local_ip: Option<IpAddr>,
    tls: Option<&PeerTls>,
) -> Result<Vec<u8>, String> {
    let ep = PeerEndpoint::new(url, local_ip, tls)?.map(|ep| {
        ep.connect_timeout(CONNECT_TIMEOUT)
            .timeout(KEEPALIVE_TIMEOUT)
            .local_address(local_ip)
    });
    let channel = ep.connect().await.map_err(|e| e.to_string())?;
    let reply = PeerClient::new(channel)
        .attributes(Done {})
        .await
        .map_err(|s| s.message().to_string())?;
    Ok(reply.into_inner().attributes)
}

/// The `Peer` service: delivers what peers send into this node's inbox.
#[derive(Clone)]
pub struct PeerService {
    inbox: Inbox,
    attributes: Attributes,
}

impl std::fmt::Debug for PeerService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerService")
            .field("inbox", &self.inbox)
            .finish_non_exhaustive()
    }
}

/// The `Peer` gRPC service for a node, ready to add to a tonic server. `attributes`
/// says what the member publishes about itself to peers that ask.
pub fn peer_service(inbox: Inbox, attributes: Attributes) -> PeerServer<PeerService> {
    PeerServer::new(PeerService { inbox, attributes })
        .max_decoding_message_size(MAX_PEER_MESSAGE)
        .max_encoding_message_size(MAX_PEER_MESSAGE)
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn attributes(&self, _req: Request<Done>) -> Result<Response<AttributesReply>, Status> {
        Ok(Response::new(AttributesReply {
            attributes: (self.attributes)(),
        }))
    }

    async fn raft(&self, req: Request<Streaming<RaftBatch>>) -> Result<Response<Done>, Status> {
        let mut s = req.into_inner();
        while let Some(batch) = s.message().await? {
            for m in batch.messages {
                self.inbox
                    .step_bytes(&m)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?;
            }
        }
        Ok(Response::new(Done {}))
    }

    async fn snapshot(
        &self,
        req: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<Done>, Status> {
        fail::fail_point!(concord_storage::failpoints::SNAPSHOT_BEFORE_RECEIVE);
        let mut s = req.into_inner();
        let first = s
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        let msg: Message = crate::codec::decode(&first.message)
            .map_err(|e| Status::invalid_argument(format!("snapshot message: {e}")))?;
        let total = first.total_bytes;
        let inbox = self.inbox.clone();
        let mut w = inbox
            .import_snapshot()
            .map_err(|e| Status::internal(e.to_string()))?;
        let mut received = first.data.len() as u64;
        tokio::task::block_in_place(|| w.write_all(&first.data))
            .map_err(|e| Status::internal(e.to_string()))?;
        while let Some(c) = s.message().await? {
            received += c.data.len() as u64;
            if received > total {
                return Err(Status::invalid_argument("snapshot longer than announced"));
            }
            tokio::task::block_in_place(|| w.write_all(&c.data))
                .map_err(|e| Status::internal(e.to_string()))?;
        }
        if received != total {
            return Err(Status::invalid_argument(format!(
                "snapshot truncated: {received} of {total} bytes"
            )));
        }
        let file = tokio::task::block_in_place(|| w.finish())
            .map_err(|e| Status::data_loss(e.to_string()))?;
        tracing::info!(
            index = file.meta().index,
            bytes = total,
            "snapshot received"
        );
        fail::fail_point!(concord_storage::failpoints::SNAPSHOT_AFTER_RECEIVE);
        inbox
            .install_snapshot(msg, file)
            .await
            .map_err(|e| match e {
                crate::Error::Refused(why) => Status::invalid_argument(why),
                e => Status::unavailable(e.to_string()),
            })?;
        Ok(Response::new(Done {}))
    }
}
