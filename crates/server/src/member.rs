//! A Concord member built from parts: its configuration and the transport that
//! reaches its peers. [`Member::open`] opens the store and the Raft log, fixes the
//! identity, builds one backend value per etcd service over a shared core (`core.rs`), and
//! starts the member's background tasks in one [`Tasks`] set. The binary wires the
//! listeners and the gRPC transport around it; tests put several members in one
//! process over [`concord_consensus::local::LocalNetwork`].

use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

use concord_consensus::{self as consensus, Transport};
use concord_gateway::Backends;
use concord_mvcc as mvcc;
use concord_proto::etcdserverpb as pb;
use prost::Message as _;
use tokio::sync::mpsc;

use crate::alarm::Alarms;
use crate::apply::{KvMachine, Output};
use crate::cluster::{ClusterApi, auto_promote, remove_the_others};
use crate::config::{Config, split_urls};
use crate::core::Core;
use crate::forward::LeaderLink;
use crate::identity::{
    Identity, META_CLUSTER_ID, META_MEMBER_ID, initial_members, member_id, meta_u64,
};
use crate::kv::{HealthApi, KvApi};
use crate::lease::Lessor;
use crate::lease_node::{self, LeaseApi};
use crate::maintenance::MaintenanceApi;
use crate::membership::Membership;
use crate::tasks::Tasks;
use crate::watch::WatchApi;

/// How often a member asks a peer that has not answered for its attributes.
const ATTRIBUTES_RETRY: Duration = Duration::from_secs(1);

/// A running member: one backend per etcd service, its Raft node, and its background
/// tasks, which [`Member::shutdown`] stops in order.
pub struct Member {
    core: Arc<Core>,
    kv: Arc<KvApi>,
    watch: Arc<WatchApi>,
    lease: Arc<LeaseApi>,
    maintenance: Arc<MaintenanceApi>,
    cluster: Arc<ClusterApi>,
    health: Arc<HealthApi>,
    auth: Arc<crate::auth_api::AuthApi>,
    raft: consensus::Node<Output>,
    tasks: Arc<Tasks>,
    /// What this member publishes about itself (names and client URLs are not
    /// replicated).
    name: String,
    client_urls: Vec<String>,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("identity", &self.core.identity)
            .field("tasks", &self.tasks)
            .finish_non_exhaustive()
    }
}

impl Member {
    /// Opens the member's store and Raft log under `cfg.data_dir`, restores or creates
    /// its identity, and starts Raft over `transport` and the member's tasks on the
    /// current tokio runtime.
    pub async fn open(cfg: &Config, transport: Arc<dyn Transport>) -> anyhow::Result<Member> {
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
        let auth = Arc::new(
            crate::auth::AuthStore::open(&store, cfg.auth_options()?)
                .map_err(anyhow::Error::msg)?,
        );
        let machine = KvMachine::new(
            store.clone(),
            lessor.clone(),
            membership.clone(),
            alarms.clone(),
            auth.clone(),
            hub.clone(),
        );
        let raft = consensus::start(rcfg, machine, transport.clone())?;
        let (restores, restore_rx) = mpsc::channel(4096);
        let core = Arc::new(Core {
            store,
            raft: raft.handle.clone(),
            identity,
            election_timeout: Duration::from_millis(cfg.election_timeout),
            request_timeout,
            members: membership.clone(),
            alarms,
            auth,
            quota: cfg.quota_backend_bytes,
        });
        let leader = Arc::new(LeaderLink::new(membership));
        let lease = Arc::new(LeaseApi {
            core: core.clone(),
            lessor,
            restores,
            min_ttl,
            leader: leader.clone(),
        });
        let cluster = Arc::new(ClusterApi {
            core: core.clone(),
            token: cfg.initial_cluster_token.clone(),
            leader,
        });
        let tasks = Arc::new(Tasks::default());
        // Shutdown goes in this order: the tasks that propose first.
        lease_node::spawn(&tasks, &lease, restore_rx, cfg.lease_checkpoint_interval()?);
        if cfg.auto_promote_learners {
            tasks.spawn("auto-promote", auto_promote(Arc::downgrade(&cluster)));
        }
        if force {
            tasks.spawn(
                "force-new-cluster",
                remove_the_others(Arc::downgrade(&cluster)),
            );
        }
        tasks.spawn(
            "detect-removal",
            detect_removal(Arc::downgrade(&core), transport.clone()),
        );
        tasks.spawn(
            "learn-attributes",
            learn_attributes(Arc::downgrade(&core), transport.clone()),
        );
        crate::metrics::record_member(identity.member_id, cfg.quota_backend_bytes);
        tasks.spawn("db-size", record_db_size(Arc::downgrade(&core)));
        Ok(Member {
            kv: Arc::new(KvApi { core: core.clone() }),
            watch: Arc::new(WatchApi {
                core: core.clone(),
                hub,
            }),
            maintenance: Arc::new(MaintenanceApi {
                core: core.clone(),
                data_dir: data.to_path_buf(),
            }),
            health: Arc::new(HealthApi { core: core.clone() }),
            auth: Arc::new(crate::auth_api::AuthApi { core: core.clone() }),
            lease,
            cluster,
            core,
            raft,
            tasks,
            name: cfg.name.clone(),
            client_urls: split_urls(&cfg.advertise_client_urls),
        })
    }

    /// One backend per etcd service, for the gateway.
    pub fn backends(&self) -> Backends {
        Backends {
            kv: self.kv.clone(),
            watch: self.watch.clone(),
            lease: self.lease.clone(),
            maintenance: self.maintenance.clone(),
            cluster: self.cluster.clone(),
            health: self.health.clone(),
            auth: self.auth.clone(),
        }
    }

    /// The client port's router (gRPC services and HTTP endpoints) over this member.
    pub fn router(
        &self,
        limits: concord_gateway::Limits,
        telemetry: concord_gateway::Telemetry,
    ) -> axum::Router {
        concord_gateway::router_with(self.backends(), limits, telemetry)
    }

    pub fn identity(&self) -> Identity {
        self.core.identity
    }

    /// Raft's view of the group from this member (role, leader, term, indexes).
    pub fn status(&self) -> consensus::Status {
        self.core.raft.status()
    }

    /// The names of the background tasks still running.
    pub fn tasks(&self) -> Vec<&'static str> {
        self.tasks.running()
    }

    /// What this member publishes to peers that ask: the member list as it knows it,
    /// with its own name and client URLs, under a header with the cluster and member
    /// ids (a joining member learns the cluster from it).
    pub fn attributes(&self) -> consensus::Attributes {
        let core = Arc::downgrade(&self.core);
        let (name, client_urls) = (self.name.clone(), self.client_urls.clone());
        Arc::new(move || {
            let Some(node) = core.upgrade() else {
                return Vec::new();
            };
            node.members
                .learned(node.identity.member_id, name.clone(), client_urls.clone());
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

    /// Resolves once a membership change has removed this member.
    pub async fn removed(&self) {
        self.core.members.removed().await
    }

    /// Where peers deliver Raft messages for this member.
    pub fn inbox(&self) -> consensus::Inbox {
        self.core.raft.inbox()
    }

    /// Resolves when Raft has stopped (a fatal storage error, or shutdown).
    pub async fn stopped(&self) {
        self.core.raft.stopped().await
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

/// Decodes what a member publishes ([`Member::attributes`]).
fn decode_attributes(b: &[u8]) -> Option<pb::MemberListResponse> {
    pb::MemberListResponse::decode(b)
        .ok()
        .filter(|r| r.header.is_some())
}

/// Learns the name and client URLs of every member that has not told this member yet
/// (the initial members, and members added later), asking each in turn once a second
/// while any is unknown. etcd members publish them through Raft; here each member asks
/// its peers directly.
async fn learn_attributes(node: Weak<Core>, transport: Arc<dyn Transport>) {
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

/// A member removed from the cluster may never hear that its removal was committed:
/// the leader stops sending to it at once. Once such a member has had no leader for
/// three election timeouts it asks its peers for their member lists; if every peer
/// that answers (a majority of the others at least) lists it no more, it was removed
/// and stops, as an etcd member told "removed" by its peers does.
async fn detect_removal(node: Weak<Core>, transport: Arc<dyn Transport>) {
    // Still listed (or too few peers answered): ask again an election timeout later.
    let Some((mut state, mut retry, election_timeout)) = node.upgrade().map(|n| {
        let (state, retry) = n.state_and_retry();
        (state, retry, n.election_timeout)
    }) else {
        return;
    };
    loop {
        retry.tick().await;
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
    }
}

/// Keeps the store's size gauges current (etcd updates them on every backend commit;
/// RocksDB's size properties are read once a second instead).
async fn record_db_size(core: std::sync::Weak<Core>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(core) = core.upgrade() else { return };
        core.store.size_on_disk();
    }
}
