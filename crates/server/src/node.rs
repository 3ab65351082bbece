//! A Concord member: the store, the Raft node that orders writes, and the identity
//! that goes into every response header. Implements the gateway's backend traits.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use concord_consensus::{self as consensus, ChangeKind, MemberChange, Transport};
use concord_gateway::{
    ClusterBackend, Error as ApiError, HealthBackend, KvBackend, Result as ApiResult, WatchBackend,
    WatchSession,
};
use concord_mvcc as mvcc;
use concord_proto::etcdserverpb as pb;
use prost::Message as _;
use tokio::sync::mpsc;

use crate::alarm::Alarms;
use crate::apply::{Applied, Command, KvMachine, Output};
use crate::config::{Config, split_urls};
use crate::convert;
use crate::lease::Lessor;
use crate::lease_node::{self, RestoreRequest};
use crate::membership::Membership;
use crate::tasks::Tasks;

const META_MEMBER_ID: &str = "member_id";
const META_CLUSTER_ID: &str = "cluster_id";
/// How often a member asks a peer that has not answered for its attributes.
const ATTRIBUTES_RETRY: Duration = Duration::from_secs(1);

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
        consensus::Error::ChangeInProgress => ApiError::Internal(
            "etcdserver: a membership change is already in progress; retry".into(),
        ),
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
    /// The member list (replicated); names and client URLs of other members fill in as
    /// they answer `Peer/Attributes`.
    pub(crate) members: Arc<Membership>,
    name: String,
    client_urls: Vec<String>,
    token: String,
    /// How Raft messages and attribute questions reach the other members.
    transport: Arc<dyn Transport>,
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
    /// A channel to the leader's client port, for calls only the leader can answer.
    leader_channel: std::sync::Mutex<Option<(u64, tonic::transport::Channel)>>,
    auto_promote: bool,
    pub(crate) request_timeout: Duration,
}

/// A running member built from parts: its configuration and the transport that
/// reaches its peers. What serves clients ([`Member::node`]), its Raft node, and its
/// background tasks, which [`Member::shutdown`] stops in order. The binary wires the
/// listeners and the gRPC transport; tests put several members in one process over
/// [`concord_consensus::local::LocalNetwork`].
pub struct Member {
    node: Arc<Node>,
    raft: consensus::Node<Output>,
    tasks: Arc<Tasks>,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("identity", &self.node.identity)
            .field("tasks", &self.tasks)
            .finish_non_exhaustive()
    }
}

impl Member {
    /// Opens the member's store and Raft log under `cfg.data_dir`, restores or creates
    /// its identity, and starts Raft over `transport` and the member's tasks on the
    /// current tokio runtime.
    pub async fn open(cfg: &Config, transport: Arc<dyn Transport>) -> anyhow::Result<Member> {
        Node::open(cfg, transport).await
    }

    /// What serves the etcd API.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// The client port's router (gRPC services and HTTP endpoints) over this member.
    pub fn router(&self, limits: concord_gateway::Limits) -> axum::Router {
        concord_gateway::router(self.node.clone(), limits)
    }

    /// Raft's view of the group from this member (role, leader, term, indexes).
    pub fn status(&self) -> consensus::Status {
        self.node.raft.status()
    }

    /// The names of the background tasks still running.
    pub fn tasks(&self) -> Vec<&'static str> {
        self.tasks.running()
    }

    /// Stops the member: its tasks in start order, then Raft (which fails whatever
    /// still waits on it). Requests still being served fail with `etcdserver: server
    /// stopped`.
    pub async fn shutdown(self) {
        self.tasks.shutdown().await;
        let raft = self.raft;
        let _ = tokio::task::spawn_blocking(move || raft.shutdown()).await;
    }

    /// Stops the member as a crash would (for fault tests in one process): its tasks
    /// end, Raft writes nothing more, and the WAL loses what it had not fsynced.
    pub async fn crash(self) {
        self.tasks.shutdown().await;
        let raft = self.raft;
        let _ = tokio::task::spawn_blocking(move || raft.crash()).await;
    }
}

impl Node {
    async fn open(cfg: &Config, transport: Arc<dyn Transport>) -> anyhow::Result<Member> {
        let data = Path::new(&cfg.data_dir);
        let mvcc_dir = data.join("mvcc");
        let raft_dir = data.join("raft");
        let existed = raft_dir.join("wal").exists();
        std::fs::create_dir_all(&mvcc_dir)?;
        // The Raft WAL makes every applied write re-creatable, so the store itself does
        // not fsync (one fsync per write batch, in the WAL).
        let store = Arc::new(mvcc::Store::open(
            &mvcc_dir,
            mvcc::StoreOptions { sync_writes: false },
        )?);
        let own_peer_urls = split_urls(&cfg.initial_advertise_peer_urls);
        let (identity, initial) = match (
            meta_u64(&store, META_MEMBER_ID)?,
            meta_u64(&store, META_CLUSTER_ID)?,
        ) {
            (Some(member_id), Some(cluster_id)) => (
                Identity {
                    cluster_id,
                    member_id,
                },
                // Restarting: the member list recorded at the first start (or by a
                // later change) is loaded below; the flags' list only stands in for a
                // data directory that has none recorded.
                flag_members(cfg)?,
            ),
            _ if cfg.initial_cluster_state == "existing" && !existed => {
                // Joining: the cluster tells us who is in it (we must have been added).
                join_info(cfg, &own_peer_urls, transport.as_ref()).await?
            }
            _ => (Identity::derive(cfg)?, flag_members(cfg)?),
        };
        let mut w = store.writer()?;
        w.put_meta(META_MEMBER_ID, &identity.member_id.to_be_bytes());
        w.put_meta(META_CLUSTER_ID, &identity.cluster_id.to_be_bytes());
        if !existed || !crate::membership::recorded(&store)? {
            // The first start (no Raft log yet): every member of a new cluster records
            // the same list (from the same --initial-cluster), a joining member the one
            // the cluster sent; changes through the log replace it. A store restored
            // from a snapshot (`concordctl snapshot restore`) carries the old cluster's
            // list: the new cluster's replaces it, as etcd's restore does.
            crate::membership::record_initial(&mut w, &initial);
        }
        w.commit(None)?;
        tracing::info!(
            member_id = format!("{:x}", identity.member_id),
            cluster_id = format!("{:x}", identity.cluster_id),
            "member identity"
        );
        let membership = Arc::new(
            Membership::open(&store, identity.member_id, initial, Some(transport.clone()))
                .map_err(anyhow::Error::msg)?,
        );
        membership.learned(
            identity.member_id,
            cfg.name.clone(),
            split_urls(&cfg.advertise_client_urls),
        );
        let members = membership.list();
        let voters: Vec<u64> = members
            .iter()
            .filter(|m| !m.is_learner)
            .map(|m| m.id)
            .collect();
        let learners: Vec<u64> = members
            .iter()
            .filter(|m| m.is_learner)
            .map(|m| m.id)
            .collect();
        let tick = Duration::from_millis(cfg.heartbeat_interval.max(1));
        let force = cfg.force_new_cluster && existed;
        let mut rcfg = consensus::Config::new(identity.member_id, voters, raft_dir);
        rcfg.learners = learners;
        rcfg.force_new_cluster = force;
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
        let machine = KvMachine::new(
            store.clone(),
            lessor.clone(),
            membership.clone(),
            alarms.clone(),
            hub.clone(),
        );
        let raft = consensus::start(rcfg, machine, transport.clone())?;
        let (restores, restore_rx) = mpsc::channel(4096);
        let client_urls = split_urls(&cfg.advertise_client_urls);
        let node = Arc::new(Node {
            store,
            hub,
            election_timeout: Duration::from_millis(cfg.election_timeout),
            raft: raft.handle.clone(),
            identity,
            members: membership,
            name: cfg.name.clone(),
            client_urls,
            token: cfg.initial_cluster_token.clone(),
            transport,
            quota: cfg.quota_backend_bytes,
            lessor,
            alarms,
            data_dir: data.to_path_buf(),
            min_ttl,
            restores,
            leader_channel: std::sync::Mutex::new(None),
            auto_promote: cfg.auto_promote_learners,
            request_timeout,
        });
        let tasks = Arc::new(Tasks::default());
        // Shutdown goes in this order: the tasks that propose first.
        lease_node::spawn(&tasks, &node, restore_rx, cfg.lease_checkpoint_interval()?);
        if node.auto_promote {
            tasks.spawn("auto-promote", auto_promote(Arc::downgrade(&node)));
        }
        if force {
            tasks.spawn(
                "force-new-cluster",
                remove_the_others(Arc::downgrade(&node)),
            );
        }
        tasks.spawn("detect-removal", detect_removal(Arc::downgrade(&node)));
        tasks.spawn("learn-attributes", learn_attributes(Arc::downgrade(&node)));
        Ok(Member { node, raft, tasks })
    }

    pub fn identity(&self) -> Identity {
        self.identity
    }

    /// What this member publishes to peers that ask: the member list as it knows it,
    /// with its own name and client URLs, under a header with the cluster and member
    /// ids (a joining member learns the cluster from it).
    pub fn attributes(self: &Arc<Self>) -> consensus::grpc::Attributes {
        let node = Arc::downgrade(self);
        Arc::new(move || {
            let Some(node) = node.upgrade() else {
                return Vec::new();
            };
            node.members.learned(
                node.identity.member_id,
                node.name.clone(),
                node.client_urls.clone(),
            );
            pb::MemberListResponse {
                header: Some(pb::ResponseHeader {
                    cluster_id: node.identity.cluster_id,
                    member_id: node.identity.member_id,
                    ..Default::default()
                }),
                members: node.members.list(),
            }
            .encode_to_vec()
        })
    }

    /// A channel to the client port of member `leader` (cached), for forwarding.
    pub(crate) fn leader_channel(&self, leader: u64) -> ApiResult<tonic::transport::Channel> {
        let mut cached = self
            .leader_channel
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((id, c)) = cached.as_ref()
            && *id == leader
        {
            return Ok(c.clone());
        }
        let url = self
            .members
            .get(leader)
            .and_then(|m| m.client_ur_ls.first().cloned())
            // Its client URLs are not known yet: as good as no leader for this call.
            .ok_or(ApiError::NoLeader)?;
        let channel = tonic::transport::Endpoint::from_shared(url)
            .map_err(|e| ApiError::Internal(format!("etcdserver: leader client URL: {e}")))?
            .connect_timeout(Duration::from_secs(1))
            .connect_lazy();
        *cached = Some((leader, channel.clone()));
        Ok(channel)
    }

    /// Resolves once a membership change has removed this member.
    pub async fn removed(&self) {
        self.members.removed().await
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

/// The members `--initial-cluster` names.
fn flag_members(cfg: &Config) -> anyhow::Result<Vec<pb::Member>> {
    Ok(initial_members(cfg)?
        .into_iter()
        .map(|(id, name, peer_urls)| pb::Member {
            id,
            name,
            peer_ur_ls: peer_urls,
            ..Default::default()
        })
        .collect())
}

/// Decodes what a member publishes ([`Node::attributes`]).
fn decode_attributes(b: &[u8]) -> Option<pb::MemberListResponse> {
    pb::MemberListResponse::decode(b)
        .ok()
        .filter(|r| r.header.is_some())
}

/// Learns the name and client URLs of every member that has not told this member yet
/// (the initial members, and members added later), asking each in turn once a second
/// while any is unknown. etcd members publish them through Raft; here each member asks
/// its peers directly.
async fn learn_attributes(node: std::sync::Weak<Node>) {
    let mut retry = tokio::time::interval(ATTRIBUTES_RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        retry.tick().await;
        let Some(n) = node.upgrade() else { return };
        let me = n.identity.member_id;
        let unknown: Vec<(u64, String)> = n
            .members
            .list()
            .into_iter()
            .filter(|m| m.id != me && m.client_ur_ls.is_empty())
            .filter_map(|m| Some((m.id, m.peer_ur_ls.first()?.clone())))
            .collect();
        let transport = n.transport.clone();
        drop(n);
        for (id, url) in unknown {
            if let Ok(attrs) = transport.fetch_attributes(&url).await
                && let Some(r) = decode_attributes(&attrs)
                && let Some(m) = r.members.iter().find(|m| m.id == id)
            {
                let Some(n) = node.upgrade() else { return };
                n.members
                    .learned(id, m.name.clone(), m.client_ur_ls.clone());
            }
        }
    }
}

/// For a member started with `--initial-cluster-state existing` and no data: asks the
/// other members in `--initial-cluster` for the cluster's id and member list; this
/// member must be in it (added with `member add` first).
async fn join_info(
    cfg: &Config,
    own_peer_urls: &[String],
    transport: &dyn Transport,
) -> anyhow::Result<(Identity, Vec<pb::Member>)> {
    let member_id = member_id(own_peer_urls, &cfg.initial_cluster_token);
    let others: Vec<String> = cfg
        .initial_member_urls()?
        .into_iter()
        .filter(|(name, _)| *name != cfg.name)
        .filter_map(|(_, urls)| urls.first().cloned())
        .collect();
    if others.is_empty() {
        anyhow::bail!(
            "--initial-cluster-state=existing needs the cluster's other members in \
             --initial-cluster (as `member add` prints them)"
        );
    }
    // etcd gives up at once when no peer answers; a few seconds cover peers starting.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut last = String::new();
    let mut retry = tokio::time::interval(Duration::from_millis(500));
    while std::time::Instant::now() < deadline {
        retry.tick().await;
        for url in &others {
            match transport.fetch_attributes(url).await {
                Ok(attrs) => match decode_attributes(&attrs) {
                    Some(r) => {
                        if !r.members.iter().any(|m| m.id == member_id) {
                            anyhow::bail!(
                                "this member ({member_id:x}, peer URLs {own_peer_urls:?}) is \
                                 not in the cluster's member list; add it with `member add` \
                                 first"
                            );
                        }
                        let cluster_id = r.header.map_or(0, |h| h.cluster_id);
                        let members = r
                            .members
                            .into_iter()
                            .map(|mut m| {
                                m.client_ur_ls.clear();
                                if m.id == member_id {
                                    m.name = cfg.name.clone();
                                }
                                m
                            })
                            .collect();
                        return Ok((
                            Identity {
                                cluster_id,
                                member_id,
                            },
                            members,
                        ));
                    }
                    None => last = format!("{url}: not a Concord member"),
                },
                Err(e) => last = e.to_string(),
            }
        }
    }
    anyhow::bail!(
        "--initial-cluster-state=existing: could not retrieve the cluster's members from \
         {}: {last}",
        others.join(", ")
    )
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

impl Node {
    async fn change_members(&self, change: MemberChange) -> ApiResult<Vec<pb::Member>> {
        match self
            .raft
            .propose_change(change)
            .await
            .map_err(raft_error)??
        {
            Applied::Members(list) => Ok(list),
            other => Err(unexpected(&other)),
        }
    }

    /// Whether learner `id` has caught up with the leader (etcd: its matched index is
    /// at least 90% of the leader's). Leader only.
    fn learner_ready(&self, id: u64) -> bool {
        let (progress, _) = self.raft.progress();
        let own = progress
            .iter()
            .find(|(m, _)| *m == self.identity.member_id)
            .map_or(0, |p| p.1);
        progress
            .iter()
            .find(|(m, _)| *m == id)
            .is_some_and(|&(_, matched)| matched as f64 >= own as f64 * 0.9)
    }

    /// `MemberPromote` on the leader.
    async fn promote_here(&self, id: u64) -> ApiResult<Vec<pb::Member>> {
        let m = self.members.get(id).ok_or(ApiError::MemberNotFound)?;
        if !m.is_learner {
            return Err(ApiError::MemberNotLearner);
        }
        if !self.learner_ready(id) {
            return Err(ApiError::LearnerNotReady);
        }
        self.change_members(MemberChange {
            kind: ChangeKind::AddVoter,
            id,
            context: Vec::new(),
        })
        .await
    }
}

/// A member removed from the cluster may never hear that its removal was committed:
/// the leader stops sending to it at once. Once such a member has had no leader for
/// three election timeouts it asks its peers for their member lists; if every peer
/// that answers (a majority of the others at least) lists it no more, it was removed
/// and stops, as an etcd member told "removed" by its peers does.
async fn detect_removal(node: std::sync::Weak<Node>) {
    let Some((mut state, election_timeout)) = node
        .upgrade()
        .map(|n| (n.raft.subscribe(), n.election_timeout))
    else {
        return;
    };
    loop {
        // Wait for a leaderless spell, then for three election timeouts of it.
        if state.wait_for(|s| s.leader == 0).await.is_err() {
            return;
        }
        let back = tokio::time::timeout(3 * election_timeout, state.wait_for(|s| s.leader != 0));
        if back.await.is_ok() {
            continue;
        }
        let Some(n) = node.upgrade() else { return };
        if n.members.is_removed() {
            return;
        }
        let me = n.identity.member_id;
        let cluster = n.identity.cluster_id;
        let peers: Vec<String> = n
            .members
            .list()
            .iter()
            .filter(|m| m.id != me)
            .filter_map(|m| m.peer_ur_ls.first().cloned())
            .collect();
        let transport = n.transport.clone();
        drop(n);
        let mut answered = 0;
        let mut listed = false;
        for url in &peers {
            if let Ok(attrs) = transport.fetch_attributes(url).await
                && let Some(r) = decode_attributes(&attrs)
                && r.header.as_ref().is_some_and(|h| h.cluster_id == cluster)
            {
                answered += 1;
                listed |= r.members.iter().any(|m| m.id == me);
            }
        }
        if !listed && answered * 2 > peers.len() {
            let Some(n) = node.upgrade() else { return };
            tracing::warn!(
                answered,
                "the cluster's members no longer list this member: it was removed"
            );
            n.members.mark_removed();
            return;
        }
        // Still listed (or too few answered): ask again after another election timeout.
        tokio::time::sleep(election_timeout).await;
    }
}

/// `--force-new-cluster`: once this member leads its one-voter cluster, the other
/// members are removed through the log, so the new configuration survives restarts.
async fn remove_the_others(node: std::sync::Weak<Node>) {
    let Some((mut state, election_timeout)) = node
        .upgrade()
        .map(|n| (n.raft.subscribe(), n.election_timeout))
    else {
        return;
    };
    let mut first = true;
    loop {
        if !first {
            // A removal did not go through: try again after an election timeout.
            tokio::time::sleep(election_timeout).await;
        }
        first = false;
        if state
            .wait_for(|s| s.role == consensus::Role::Leader)
            .await
            .is_err()
        {
            return;
        }
        let Some(node) = node.upgrade() else { return };
        let me = node.identity.member_id;
        let others: Vec<u64> = node
            .members
            .list()
            .iter()
            .map(|m| m.id)
            .filter(|id| *id != me)
            .collect();
        if others.is_empty() {
            tracing::info!("forced new cluster: this member is the only one");
            return;
        }
        for id in others {
            let change = MemberChange {
                kind: ChangeKind::Remove,
                id,
                context: Vec::new(),
            };
            match node.change_members(change).await {
                Ok(_) => tracing::info!(
                    member = format!("{id:x}"),
                    "forced new cluster: member removed"
                ),
                Err(e) => {
                    tracing::warn!(member = format!("{id:x}"), error = %e, "forced new cluster: removal not done yet")
                }
            }
        }
    }
}

/// With `--auto-promote-learners`: the leader promotes each learner once it has caught
/// up (checked every second).
async fn auto_promote(node: std::sync::Weak<Node>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(node) = node.upgrade() else { return };
        if node.raft.status().role != consensus::Role::Leader {
            continue;
        }
        for m in node.members.list().into_iter().filter(|m| m.is_learner) {
            if node.learner_ready(m.id) {
                match node.promote_here(m.id).await {
                    Ok(_) => tracing::info!(
                        member = format!("{:x}", m.id),
                        "learner promoted automatically"
                    ),
                    Err(e) => {
                        tracing::debug!(member = format!("{:x}", m.id), error = %e, "automatic promotion not done")
                    }
                }
            }
        }
    }
}

#[concord_gateway::async_trait]
impl ClusterBackend for Node {
    async fn member_list(&self, req: pb::MemberListRequest) -> ApiResult<pb::MemberListResponse> {
        if req.linearizable {
            self.linearize().await?;
        }
        Ok(pb::MemberListResponse {
            // etcd's Cluster service headers carry no revision.
            header: self.header(0),
            members: self.members.list(),
        })
    }

    async fn member_add(&self, req: pb::MemberAddRequest) -> ApiResult<pb::MemberAddResponse> {
        let list = self.members.list();
        if list
            .iter()
            .any(|m| m.peer_ur_ls.iter().any(|u| req.peer_ur_ls.contains(u)))
        {
            return Err(ApiError::PeerUrlExist);
        }
        // The new member derives the same id from its peer URLs and the token.
        let id = member_id(&req.peer_ur_ls, &self.token);
        if list.iter().any(|m| m.id == id) {
            return Err(ApiError::MemberExist);
        }
        // etcd allows one learner at a time.
        if req.is_learner && list.iter().any(|m| m.is_learner) {
            return Err(ApiError::TooManyLearners);
        }
        let member = pb::Member {
            id,
            peer_ur_ls: req.peer_ur_ls,
            is_learner: req.is_learner,
            ..Default::default()
        };
        let members = self
            .change_members(MemberChange {
                kind: if member.is_learner {
                    ChangeKind::AddLearner
                } else {
                    ChangeKind::AddVoter
                },
                id,
                context: member.encode_to_vec(),
            })
            .await?;
        Ok(pb::MemberAddResponse {
            header: self.header(0),
            member: Some(member),
            members,
        })
    }

    async fn member_remove(
        &self,
        req: pb::MemberRemoveRequest,
    ) -> ApiResult<pb::MemberRemoveResponse> {
        if self.members.get(req.id).is_none() {
            return Err(ApiError::MemberNotFound);
        }
        let members = self
            .change_members(MemberChange {
                kind: ChangeKind::Remove,
                id: req.id,
                context: Vec::new(),
            })
            .await?;
        Ok(pb::MemberRemoveResponse {
            header: self.header(0),
            members,
        })
    }

    async fn member_update(
        &self,
        req: pb::MemberUpdateRequest,
    ) -> ApiResult<pb::MemberUpdateResponse> {
        if self.members.get(req.id).is_none() {
            return Err(ApiError::MemberNotFound);
        }
        match self.propose(Command::MemberUpdate(req)).await? {
            Applied::Members(members) => Ok(pb::MemberUpdateResponse {
                header: self.header(0),
                members,
            }),
            other => Err(unexpected(&other)),
        }
    }

    async fn member_promote(
        &self,
        req: pb::MemberPromoteRequest,
    ) -> ApiResult<pb::MemberPromoteResponse> {
        let st = self.raft.status();
        let members = if st.role == consensus::Role::Leader {
            self.promote_here(req.id).await?
        } else if st.leader == 0 {
            return Err(ApiError::NoLeader);
        } else {
            // Only the leader knows whether the learner has caught up: ask it.
            let mut leader =
                pb::cluster_client::ClusterClient::new(self.leader_channel(st.leader)?);
            leader
                .member_promote(req)
                .await
                .map_err(crate::lease_node::status_error)?
                .into_inner()
                .members
        };
        Ok(pb::MemberPromoteResponse {
            header: self.header(0),
            members,
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

    fn alarms(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .alarms
            .list(pb::AlarmType::None as i32)
            .iter()
            .map(|a| crate::alarm::alarm_name(a.alarm))
            .collect();
        names.sort();
        names.dedup();
        names
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
