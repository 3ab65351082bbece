//! A Concord member: the store, the Raft node that orders writes, and the identity
//! that goes into every response header. Implements the gateway's backend traits.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use concord_consensus as consensus;
use concord_gateway::{
    ClusterBackend, Error as ApiError, HealthBackend, KvBackend, Result as ApiResult, WatchBackend,
    WatchSession,
};
use concord_mvcc as mvcc;
use concord_proto::etcdserverpb as pb;
use tokio::sync::mpsc;

use crate::alarm::Alarms;
use crate::apply::{Applied, Command, KvMachine, Output};
use crate::config::{Config, split_urls};
use crate::convert;
use crate::lease::Lessor;
use crate::lease_node::{self, LeaseForward, RestoreRequest};

const META_MEMBER_ID: &str = "member_id";
const META_CLUSTER_ID: &str = "cluster_id";

/// Member and cluster identity, fixed when the data directory is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub cluster_id: u64,
    pub member_id: u64,
}

/// 64-bit FNV-1a: a stable hash for deriving ids (the same inputs give the same id on
/// every machine and every build).
fn fnv64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.iter().chain(b"\0") {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// As etcd derives it: from the member's peer URLs and the cluster token.
pub fn member_id(peer_urls: &[String], token: &str) -> u64 {
    let mut urls = peer_urls.to_vec();
    urls.sort();
    // 0 means "none" to Raft.
    fnv64(&[urls.join(",").as_bytes(), token.as_bytes()]).max(1)
}

/// Every member of `--initial-cluster` with its derived id, in the listed order.
pub fn initial_members(cfg: &Config) -> anyhow::Result<Vec<(u64, String, Vec<String>)>> {
    let mut out = Vec::new();
    for (name, urls) in cfg.initial_member_urls()? {
        out.push((member_id(&urls, &cfg.initial_cluster_token), name, urls));
    }
    let mut ids: Vec<u64> = out.iter().map(|m| m.0).collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.len() != out.len() {
        anyhow::bail!("--initial-cluster lists the same peer URLs under two names");
    }
    Ok(out)
}

impl Identity {
    /// As etcd derives them: each member id from its peer URLs and the cluster token,
    /// the cluster id from all member ids.
    pub fn derive(cfg: &Config) -> anyhow::Result<Identity> {
        let members = initial_members(cfg)?;
        let member_id = members
            .iter()
            .find(|m| m.1 == cfg.name)
            .map(|m| m.0)
            .ok_or_else(|| anyhow::anyhow!("{:?} is not in --initial-cluster", cfg.name))?;
        let mut ids: Vec<u64> = members.iter().map(|m| m.0).collect();
        ids.sort_unstable();
        let joined: Vec<u8> = ids.iter().flat_map(|i| i.to_be_bytes()).collect();
        let cluster_id = fnv64(&[&joined, cfg.initial_cluster_token.as_bytes()]);
        Ok(Identity {
            cluster_id,
            member_id,
        })
    }
}

fn meta_u64(store: &mvcc::Store, name: &str) -> mvcc::Result<Option<u64>> {
    store.meta(name)?.map_or(Ok(None), |v| {
        let b: [u8; 8] = v
            .as_slice()
            .try_into()
            .map_err(|_| mvcc::Error::Corrupt(format!("server meta {name:?}")))?;
        Ok(Some(u64::from_be_bytes(b)))
    })
}

/// etcd's client-visible error for a consensus failure.
pub fn raft_error(e: consensus::Error) -> ApiError {
    match e {
        consensus::Error::NoLeader => ApiError::NoLeader,
        consensus::Error::LeaderChanged => ApiError::LeaderChanged,
        consensus::Error::Timeout => ApiError::Timeout,
        consensus::Error::Stopped => ApiError::Stopped,
        other => ApiError::Internal(format!("etcdserver: {other}")),
    }
}

/// The member, as served to clients.
pub struct Node {
    pub(crate) store: Arc<mvcc::Store>,
    hub: Arc<concord_watch::Hub>,
    pub(crate) election_timeout: Duration,
    pub(crate) raft: consensus::Handle<Output>,
    pub(crate) identity: Identity,
    /// Client URLs of other members fill in as they answer `Peer/Attributes`.
    pub(crate) members: std::sync::Mutex<Vec<pb::Member>>,
    client_urls: Vec<String>,
    /// `--quota-backend-bytes` as configured (0: etcd's default, negative: no quota).
    pub(crate) quota: i64,
    pub(crate) lessor: Arc<Lessor>,
    /// The replicated alarm list (shared with the apply thread).
    pub(crate) alarms: Arc<Alarms>,
    /// `--data-dir`: where maintenance spools snapshot images.
    pub(crate) data_dir: PathBuf,
    /// etcd's minimum lease TTL for this member's election timeout.
    pub(crate) min_ttl: i64,
    /// Keep-alives that need the full TTL restored in the log before they are answered.
    pub(crate) restores: mpsc::Sender<RestoreRequest>,
    /// A client of the leader's Lease service, for calls only the leader can answer.
    pub(crate) lease_forward: LeaseForward,
    pub(crate) request_timeout: Duration,
}

/// A running member: what serves clients, and what the binary stops on shutdown.
pub struct Started {
    pub node: Arc<Node>,
    pub raft: consensus::Node<Output>,
}

impl Node {
    /// Opens the member's store and Raft log under the configured data directory,
    /// restores or creates its identity, and starts Raft with peers reached over gRPC
    /// (tasks on the current tokio runtime).
    pub fn open(cfg: &Config) -> anyhow::Result<Started> {
        let data = Path::new(&cfg.data_dir);
        let mvcc_dir = data.join("mvcc");
        let raft_dir = data.join("raft");
        let existed = raft_dir.join("wal").exists();
        if cfg.initial_cluster_state == "existing" && !existed {
            anyhow::bail!(
                "--initial-cluster-state=existing needs this member to be added to the cluster \
                 first (member add), which this version does not support; start every member \
                 of a new cluster with --initial-cluster-state=new"
            );
        }
        std::fs::create_dir_all(&mvcc_dir)?;
        // The Raft WAL makes every applied write re-creatable, so the store itself does
        // not fsync (one fsync per write batch, in the WAL).
        let store = Arc::new(mvcc::Store::open(
            &mvcc_dir,
            mvcc::StoreOptions { sync_writes: false },
        )?);
        let derived = Identity::derive(cfg)?;
        let identity = match (
            meta_u64(&store, META_MEMBER_ID)?,
            meta_u64(&store, META_CLUSTER_ID)?,
        ) {
            (Some(member_id), Some(cluster_id)) => Identity {
                cluster_id,
                member_id,
            },
            _ => derived,
        };
        let mut w = store.writer()?;
        w.put_meta(META_MEMBER_ID, &identity.member_id.to_be_bytes());
        w.put_meta(META_CLUSTER_ID, &identity.cluster_id.to_be_bytes());
        w.commit(None)?;
        let members = initial_members(cfg)?;
        tracing::info!(
            member_id = format!("{:x}", identity.member_id),
            cluster_id = format!("{:x}", identity.cluster_id),
            members = members.len(),
            "member identity"
        );
        let peers: HashMap<u64, String> = members
            .iter()
            .filter(|m| m.0 != identity.member_id)
            .map(|m| (m.0, m.2[0].clone()))
            .collect();
        let peer_list: Vec<(u64, String)> = peers.iter().map(|(i, u)| (*i, u.clone())).collect();
        let local_ip = cfg
            .peer_listen_addrs()?
            .first()
            .map(|a| a.ip())
            .filter(|ip: &IpAddr| !ip.is_unspecified());
        let transport =
            consensus::grpc::GrpcTransport::new(peers, local_ip, tokio::runtime::Handle::current());
        let tick = Duration::from_millis(cfg.heartbeat_interval.max(1));
        let mut rcfg = consensus::Config::new(
            identity.member_id,
            members.iter().map(|m| m.0).collect(),
            raft_dir,
        );
        rcfg.tick = tick;
        rcfg.election_ticks = (cfg.election_timeout / cfg.heartbeat_interval.max(1)) as usize;
        rcfg.heartbeat_ticks = 1;
        rcfg.snapshot_count = cfg.snapshot_count;
        rcfg.catch_up_entries = cfg.snapshot_catchup_entries;
        // etcd's request timeout: 5 s plus two election timeouts.
        rcfg.request_timeout = Duration::from_millis(5000 + 2 * cfg.election_timeout);
        let hub = Arc::new(concord_watch::Hub::new(
            Arc::new(crate::watch::StoreHistory(store.clone())),
            store.current_revision(),
            concord_watch::HubOptions {
                progress_notify_interval: cfg.watch_progress_interval()?,
                ..concord_watch::HubOptions::default()
            },
        ));
        let lessor = Arc::new(Lessor::open(&store).map_err(anyhow::Error::msg)?);
        let min_ttl = crate::lease::min_ttl(rcfg.election_ticks as u64, tick.as_millis() as u64);
        let request_timeout = rcfg.request_timeout;
        let alarms = Arc::new(Alarms::open(&store).map_err(anyhow::Error::msg)?);
        let machine = KvMachine::new(store.clone(), lessor.clone(), alarms.clone(), hub.clone());
        let raft = consensus::start(rcfg, machine, transport)?;
        let (restores, restore_rx) = mpsc::channel(4096);
        let client_urls = split_urls(&cfg.advertise_client_urls);
        let members = members
            .into_iter()
            .map(|(id, name, peer_urls)| pb::Member {
                id,
                client_ur_ls: if id == identity.member_id {
                    client_urls.clone()
                } else {
                    Vec::new()
                },
                name,
                peer_ur_ls: peer_urls,
                is_learner: false,
            })
            .collect();
        let node = Arc::new(Node {
            store,
            hub,
            election_timeout: Duration::from_millis(cfg.election_timeout),
            raft: raft.handle.clone(),
            identity,
            members: std::sync::Mutex::new(members),
            client_urls,
            quota: cfg.quota_backend_bytes,
            lessor,
            alarms,
            data_dir: data.to_path_buf(),
            min_ttl,
            restores,
            lease_forward: LeaseForward::default(),
            request_timeout,
        });
        lease_node::spawn(&node, restore_rx, cfg.lease_checkpoint_interval()?);
        for (id, url) in peer_list {
            tokio::spawn(learn_client_urls(Arc::downgrade(&node), id, url, local_ip));
        }
        Ok(Started { node, raft })
    }

    pub fn identity(&self) -> Identity {
        self.identity
    }

    /// What this member publishes to its peers: its client URLs, comma-separated.
    pub fn attributes(&self) -> Vec<u8> {
        self.client_urls.join(",").into_bytes()
    }

    /// Where peers deliver Raft messages for this member.
    pub fn inbox(&self) -> consensus::Inbox {
        self.raft.inbox()
    }

    /// Resolves when Raft has stopped (a fatal storage error, or shutdown).
    pub async fn stopped(&self) {
        self.raft.stopped().await
    }

    pub(crate) fn header(&self, revision: i64) -> Option<pb::ResponseHeader> {
        Some(pb::ResponseHeader {
            cluster_id: self.identity.cluster_id,
            member_id: self.identity.member_id,
            revision,
            raft_term: self.raft.status().term,
        })
    }

    /// Completes a response header that so far carries only the revision.
    fn fill(&self, h: Option<pb::ResponseHeader>) -> Option<pb::ResponseHeader> {
        self.header(h.map_or(0, |h| h.revision))
    }

    pub(crate) async fn propose(&self, cmd: Command) -> ApiResult<Applied> {
        self.raft.propose(&cmd.encode()).await.map_err(raft_error)?
    }

    /// Waits until this member has applied everything committed before the call
    /// (ReadIndex), so a read after it is linearizable.
    pub(crate) async fn linearize(&self) -> ApiResult<()> {
        self.raft.read_index().await.map(|_| ()).map_err(raft_error)
    }

    pub(crate) async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mvcc::Store) -> mvcc::Result<T> + Send + 'static,
    ) -> ApiResult<T> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| ApiError::Internal(format!("etcdserver: read task failed: {e}")))?
            .map_err(convert::api_error)
    }
}

/// Asks peer `id` for its client URLs until it answers (etcd members publish them
/// through Raft; here each member asks its peers directly), while the node lives.
async fn learn_client_urls(
    node: std::sync::Weak<Node>,
    id: u64,
    url: String,
    local_ip: Option<IpAddr>,
) {
    loop {
        if let Ok(attrs) = consensus::grpc::fetch_attributes(&url, local_ip).await {
            let Some(node) = node.upgrade() else { return };
            let urls = split_urls(&String::from_utf8_lossy(&attrs));
            let mut members = node.members.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(m) = members.iter_mut().find(|m| m.id == id) {
                m.client_ur_ls = urls;
            }
            return;
        }
        if node.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// etcd serves a read-only txn serializably only when every range in it asks for that.
fn txn_is_serializable(t: &pb::TxnRequest) -> bool {
    use pb::request_op::Request;
    let mut any = false;
    let all = t
        .success
        .iter()
        .chain(&t.failure)
        .all(|op| match &op.request {
            Some(Request::RequestRange(r)) => {
                any = true;
                r.serializable
            }
            Some(Request::RequestTxn(inner)) => txn_is_serializable(inner),
            _ => true,
        });
    all && any
}

pub(crate) fn unexpected(what: &Applied) -> ApiError {
    ApiError::Internal(format!("etcdserver: unexpected apply result {what:?}"))
}

#[concord_gateway::async_trait]
impl KvBackend for Node {
    async fn range(&self, req: pb::RangeRequest) -> ApiResult<pb::RangeResponse> {
        if !req.serializable {
            self.linearize().await?;
        }
        let req = convert::range_req(req);
        let r = self.blocking(move |s| s.range(&req)).await?;
        let mut resp = convert::range_resp(r);
        resp.header = self.fill(resp.header);
        Ok(resp)
    }

    async fn put(&self, req: pb::PutRequest) -> ApiResult<pb::PutResponse> {
        self.check_quota(crate::maintenance::put_cost(&req)).await?;
        match self.propose(Command::Put(req)).await? {
            Applied::Put(r) => {
                let mut resp = convert::put_resp(r);
                resp.header = self.fill(resp.header);
                Ok(resp)
            }
            other => Err(unexpected(&other)),
        }
    }

    async fn delete_range(
        &self,
        req: pb::DeleteRangeRequest,
    ) -> ApiResult<pb::DeleteRangeResponse> {
        match self.propose(Command::DeleteRange(req)).await? {
            Applied::DeleteRange(r) => {
                let mut resp = convert::delete_resp(r);
                resp.header = self.fill(resp.header);
                Ok(resp)
            }
            other => Err(unexpected(&other)),
        }
    }

    async fn txn(&self, req: pb::TxnRequest) -> ApiResult<pb::TxnResponse> {
        let serializable = txn_is_serializable(&req);
        let txn = convert::txn_req(req.clone());
        let r = if txn.is_read_only() {
            if !serializable {
                self.linearize().await?;
            }
            self.blocking(move |s| s.read_txn(&txn)).await?
        } else {
            self.check_quota(crate::maintenance::txn_cost(&req)).await?;
            match self.propose(Command::Txn(req)).await? {
                Applied::Txn(r) => r,
                other => return Err(unexpected(&other)),
            }
        };
        let mut resp = convert::txn_resp(r);
        resp.header = self.fill(resp.header);
        Ok(resp)
    }

    async fn compact(&self, req: pb::CompactionRequest) -> ApiResult<pb::CompactionResponse> {
        let physical = req.physical;
        let (revision, wait) = match self.propose(Command::Compact(req)).await? {
            Applied::Compact(rev, wait) => (rev, wait),
            other => return Err(unexpected(&other)),
        };
        if physical {
            self.blocking(move |_| wait.wait()).await?;
        }
        Ok(pb::CompactionResponse {
            header: self.header(revision),
        })
    }
}

#[concord_gateway::async_trait]
impl ClusterBackend for Node {
    async fn member_list(&self, _req: pb::MemberListRequest) -> ApiResult<pb::MemberListResponse> {
        Ok(pb::MemberListResponse {
            // etcd's Cluster service headers carry no revision.
            header: self.header(0),
            members: self
                .members
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        })
    }
}

impl WatchBackend for Node {
    fn has_leader(&self) -> bool {
        self.raft.status().leader != 0
    }

    fn leader_check(&self) -> Duration {
        self.election_timeout
    }

    fn open_watch(&self) -> ApiResult<Box<dyn WatchSession>> {
        let identity = self.identity;
        let raft = self.raft.clone();
        Ok(Box::new(crate::watch::Session {
            stream: self.hub.stream(),
            header: Arc::new(move |revision| {
                Some(pb::ResponseHeader {
                    cluster_id: identity.cluster_id,
                    member_id: identity.member_id,
                    revision,
                    raft_term: raft.status().term,
                })
            }),
        }))
    }
}

#[concord_gateway::async_trait]
impl HealthBackend for Node {
    async fn health(&self) -> ApiResult<()> {
        // The same probe etcdctl makes: a linearizable read through the normal path,
        // which fails without a leader.
        self.linearize().await?;
        let req = mvcc::RangeRequest {
            range: mvcc::KeyRange::new("health", ""),
            ..Default::default()
        };
        self.blocking(move |s| s.range(&req)).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_depend_on_token_and_urls() {
        let cfg = |token: &str, url: &str| {
            let a = crate::config::Args {
                initial_cluster_token: Some(token.into()),
                initial_advertise_peer_urls: Some(url.into()),
                initial_cluster: Some(format!("default={url}")),
                ..Default::default()
            };
            Config::load(&a).unwrap()
        };
        let id = |t: &str, u: &str| Identity::derive(&cfg(t, u)).unwrap();
        let a = id("t1", "http://127.0.0.1:2380");
        assert_eq!(a, id("t1", "http://127.0.0.1:2380"));
        assert_ne!(a, id("t2", "http://127.0.0.1:2380"));
        assert_ne!(a.member_id, id("t1", "http://127.0.0.1:2381").member_id);
    }

    #[test]
    fn every_member_derives_the_same_ids() {
        let cluster = "n1=http://127.0.0.1:7001,n2=http://127.0.0.1:7002,n3=http://127.0.0.1:7003";
        let ids: Vec<Identity> = (1..=3)
            .map(|i| {
                let a = crate::config::Args {
                    name: Some(format!("n{i}")),
                    initial_advertise_peer_urls: Some(format!("http://127.0.0.1:700{i}")),
                    initial_cluster: Some(cluster.into()),
                    ..Default::default()
                };
                Identity::derive(&Config::load(&a).unwrap()).unwrap()
            })
            .collect();
        assert!(ids.iter().all(|i| i.cluster_id == ids[0].cluster_id));
        let members = initial_members(
            &Config::load(&crate::config::Args {
                name: Some("n1".into()),
                initial_advertise_peer_urls: Some("http://127.0.0.1:7001".into()),
                initial_cluster: Some(cluster.into()),
                ..Default::default()
            })
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            members.iter().map(|m| m.0).collect::<Vec<_>>(),
            ids.iter().map(|i| i.member_id).collect::<Vec<_>>()
        );
    }
}
