//! The node: one thread owns `raft::RawNode` and processes `Ready` in raft-rs's
//! documented order; a second thread applies committed entries to the state machine.
//! [`Handle`] is how the rest of the process proposes, reads and watches status.
//!
//! Ready order (raft-rs `RawNode` docs): send `messages` (a leader may send before its
//! own log is durable); install a snapshot; hand committed entries to the apply thread;
//! append entries and the hard state to the WAL with one fsync; only then send
//! `persisted_messages` (votes and append responses promise durability); advance, and
//! handle the light ready the same way.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use concord_storage::{
    self as storage, SnapshotFile, SnapshotMark, SnapshotMeta, SnapshotStore, Wal, WalOptions,
};
use protobuf::Message as _;
use raft::eraftpb::{
    ConfState, Entry, EntryType, HardState, Message, MessageType, SnapshotMetadata,
};
use raft::{RawNode, ReadState, SnapshotStatus, StateRole};
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::{Error, Result};
use crate::log::LogStore;
use crate::membership::{self, Configuration, MemberChange};
use crate::transport::{Inbox, Transport};

/// Messages into the raft thread. Bounded; proposals wait for room, network input is
/// dropped when it is full.
pub(crate) const INBOX_DEPTH: usize = 4096;
/// Batches of committed entries waiting for the apply thread; when full the raft thread
/// waits, which slows the leader down instead of growing memory.
const APPLY_DEPTH: usize = 64;
/// Messages handled between two Ready rounds at most.
const MAX_MSGS_PER_ROUND: usize = 1024;
/// Ticks after which an unanswered ReadIndex round is asked again (a new leader drops
/// reads until it has committed an entry in its term).
const READ_RETRY_TICKS: u64 = 3;
/// Snapshot files kept on disk.
const SNAPSHOTS_KEPT: usize = 2;

/// Node settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's id (non-zero).
    pub id: u64,
    /// Voters of the initial configuration, used when the log is new.
    pub peers: Vec<u64>,
    /// Learners of the initial configuration (a member joining as a learner is one).
    pub learners: Vec<u64>,
    /// Start as the only voter whatever the log says (etcd's `--force-new-cluster`, for
    /// recovering a survivor when a quorum is lost for good). The caller makes it
    /// permanent by proposing the removal of the other members.
    pub force_new_cluster: bool,
    /// Where the WAL (`wal/`) and snapshot files (`snap/`) live.
    pub dir: PathBuf,
    /// One Raft tick (the heartbeat interval).
    pub tick: Duration,
    /// Ticks without a leader's message before an election.
    pub election_ticks: usize,
    /// Ticks between heartbeats.
    pub heartbeat_ticks: usize,
    /// Applied entries between two snapshots (etcd's `--snapshot-count`).
    pub snapshot_count: u64,
    /// Entries kept before a snapshot's index so slightly slow followers catch up from
    /// the log rather than a whole snapshot (etcd keeps 5000).
    pub catch_up_entries: u64,
    /// How long a proposal or a linearizable read may wait.
    pub request_timeout: Duration,
    /// Largest total size of entries in one append message.
    pub max_size_per_msg: u64,
    /// Append messages in flight to one follower at most.
    pub max_inflight_msgs: usize,
}

impl Config {
    /// etcd's defaults: 100 ms heartbeat, 1000 ms election timeout, request timeout of
    /// 5 s plus two election timeouts.
    pub fn new(id: u64, peers: Vec<u64>, dir: PathBuf) -> Config {
        Config {
            id,
            peers,
            learners: Vec::new(),
            force_new_cluster: false,
            dir,
            tick: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 1,
            snapshot_count: 100_000,
            catch_up_entries: 5_000,
            request_timeout: Duration::from_secs(7),
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
        }
    }
}

/// A committed command handed to the state machine.
#[derive(Debug, Clone, Copy)]
pub struct Committed<'a> {
    pub index: u64,
    pub term: u64,
    pub data: &'a [u8],
}

/// What the node replicates. Everything it does must be deterministic: the same
/// commands in the same order give the same state on every member.
pub trait StateMachine: Send + 'static {
    /// The result of one command, returned to its proposer.
    type Output: Send + 'static;
    /// Why applying, snapshotting or restoring failed (fatal: the node stops).
    type Error: std::error::Error + Send + Sync + 'static;

    /// Index of the last entry whose effects are durable in the state machine.
    fn applied_index(&self) -> u64;

    /// Applies commands in order and makes them durable together with the index of the
    /// last one (so replay after a crash neither loses nor repeats one). One output per
    /// command. An `Err` is fatal: the node stops.
    fn apply(
        &mut self,
        cmds: &[Committed<'_>],
    ) -> std::result::Result<Vec<Self::Output>, Self::Error>;

    /// A point-in-time image of the state as of [`StateMachine::applied_index`]; may be
    /// read on another thread while applying continues.
    fn snapshot(&mut self) -> std::result::Result<Box<dyn Read + Send>, Self::Error>;

    /// Replaces the whole state with an image made by [`StateMachine::snapshot`] on
    /// some member, recording `index` as applied. An `Err` is fatal.
    fn restore(
        &mut self,
        image: &mut dyn Read,
        index: u64,
        term: u64,
    ) -> std::result::Result<(), Self::Error>;

    /// Applies a committed membership change at `index`, durably with the index like
    /// [`StateMachine::apply`]; `config` is Raft's configuration after it. Raft has
    /// already applied it. The output goes to its proposer.
    fn apply_change(
        &mut self,
        index: u64,
        change: &MemberChange,
        config: &Configuration,
    ) -> std::result::Result<Self::Output, Self::Error>;
}

/// A node's role in its Raft group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    #[default]
    Follower,
    PreCandidate,
    Candidate,
    Leader,
}

impl From<StateRole> for Role {
    fn from(r: StateRole) -> Role {
        match r {
            StateRole::Follower => Role::Follower,
            StateRole::PreCandidate => Role::PreCandidate,
            StateRole::Candidate => Role::Candidate,
            StateRole::Leader => Role::Leader,
        }
    }
}

/// The node's view of the group, as of its last Ready round (and, for `applied`, its
/// last applied batch). Published on a `tokio::sync::watch` channel
/// ([`Handle::subscribe`]): whoever waits for a condition on it (a leader, a role, an
/// applied index, a membership) waits on that channel, never in a polling loop.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    pub id: u64,
    /// 0 when no leader is known.
    pub leader: u64,
    pub term: u64,
    pub commit: u64,
    pub last_index: u64,
    pub applied: u64,
    pub role: Role,
    /// Raft's voters and learners as this node knows them.
    pub membership: Configuration,
}

pub(crate) enum NodeMsg {
    Propose { id: u64, data: Vec<u8> },
    ProposeChange { id: u64, change: MemberChange },
    Read(oneshot::Sender<Result<u64>>),
    Step(Message),
    Unreachable(u64),
    SnapshotStatus(u64, bool),
    InstallSnapshot(Message, Arc<SnapshotFile>),
    SnapshotDone(std::result::Result<SnapshotFile, Error>),
    TransferLeader(u64),
    Campaign,
}

type Waiters<O> = Mutex<HashMap<u64, oneshot::Sender<Result<O>>>>;

struct Shared<O> {
    id: u64,
    waiters: Waiters<O>,
    /// The node's state: written by the raft thread (role, leader, term, indexes,
    /// membership) and the apply thread (`applied`).
    state: watch::Sender<Status>,
    /// On the leader: each member's matched index.
    progress: Mutex<Vec<(u64, u64)>>,
    stopped: watch::Sender<bool>,
    /// Set by [`Node::crash`]: the raft thread ends without another write, and the
    /// WAL loses what was not fsynced, as at a power cut.
    crashed: AtomicBool,
}

impl<O> Shared<O> {
    fn stop(&self, why: &str) {
        if !*self.stopped.borrow() {
            tracing::info!(member_id = self.id, why, "raft node stopping");
        }
        self.stopped.send_replace(true);
    }

    fn status(&self) -> Status {
        self.state.borrow().clone()
    }

    fn complete(&self, id: u64, r: Result<O>) {
        let waiter = self
            .waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
        if let Some(w) = waiter {
            let _ = w.send(r);
        }
    }
}

/// Proposes, reads, and reports status. Cheap to clone.
pub struct Handle<O> {
    tx: mpsc::Sender<NodeMsg>,
    shared: Arc<Shared<O>>,
    next_id: Arc<AtomicU64>,
    timeout: Duration,
    inbox: Inbox,
}

impl<O> Clone for Handle<O> {
    fn clone(&self) -> Self {
        Handle {
            tx: self.tx.clone(),
            shared: self.shared.clone(),
            next_id: self.next_id.clone(),
            timeout: self.timeout,
            inbox: self.inbox.clone(),
        }
    }
}

/// Removes a proposal's waiter when the proposer stops waiting (timeout, cancel).
struct Unregister<'a, O> {
    shared: &'a Shared<O>,
    id: u64,
}

impl<O> Drop for Unregister<'_, O> {
    fn drop(&mut self) {
        self.shared
            .waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

impl<O: Send + 'static> Handle<O> {
    /// Replicates `payload` and returns the state machine's output once this member has
    /// applied it. A follower's proposal is forwarded to the leader by Raft.
    /// [`Error::Timeout`] means the outcome is unknown: it may still be applied.
    pub async fn propose(&self, payload: &[u8]) -> Result<O> {
        let mut data = Vec::with_capacity(8 + payload.len());
        data.extend_from_slice(&[0; 8]);
        data.extend_from_slice(payload);
        self.submit(|id| {
            data[..8].copy_from_slice(&id.to_be_bytes());
            NodeMsg::Propose { id, data }
        })
        .await
    }

    /// Proposes a membership change; returns the state machine's output once this
    /// member has applied it. raft-rs refuses a change while another is not yet
    /// applied ([`Error::ChangeInProgress`]).
    pub async fn propose_change(&self, change: MemberChange) -> Result<O> {
        self.submit(|id| NodeMsg::ProposeChange { id, change })
            .await
    }

    /// Each member's matched log index as the leader sees it (empty elsewhere), and
    /// the leader's last index.
    pub fn progress(&self) -> (Vec<(u64, u64)>, u64) {
        let p = self
            .shared
            .progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        (p, self.shared.status().last_index)
    }

    async fn submit(&self, msg: impl FnOnce(u64) -> NodeMsg) -> Result<O> {
        self.check_serving()?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.shared
            .waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, tx);
        let _unregister = Unregister {
            shared: &self.shared,
            id,
        };
        let msg = msg(id);
        let wait = async {
            self.tx.send(msg).await.map_err(|_| Error::Stopped)?;
            rx.await.map_err(|_| Error::Stopped)?
        };
        tokio::time::timeout(self.timeout, wait)
            .await
            .map_err(|_| Error::Timeout)?
    }

    /// A linearizable read barrier: confirms with a quorum (ReadIndex) that this node
    /// knows every write committed before the call, and waits until it has applied
    /// them. Returns the read index. Concurrent callers share one ReadIndex round.
    pub async fn read_index(&self) -> Result<u64> {
        self.check_serving()?;
        // A planted bug for the simulation's checkers: read the local state at once.
        fail::fail_point!(
            concord_storage::failpoints::BUG_READ_WITHOUT_READ_INDEX,
            |_| { Ok(self.shared.status().applied) }
        );
        let deadline = tokio::time::Instant::now() + self.timeout;
        let (tx, rx) = oneshot::channel();
        tokio::time::timeout_at(deadline, self.tx.send(NodeMsg::Read(tx)))
            .await
            .map_err(|_| Error::Timeout)?
            .map_err(|_| Error::Stopped)?;
        let index = tokio::time::timeout_at(deadline, rx)
            .await
            .map_err(|_| Error::Timeout)?
            .map_err(|_| Error::Stopped)??;
        let mut state = self.shared.state.subscribe();
        tokio::time::timeout_at(deadline, state.wait_for(|s| s.applied >= index))
            .await
            .map_err(|_| Error::Timeout)?
            .map_err(|_| Error::Stopped)?;
        Ok(index)
    }

    fn check_serving(&self) -> Result<()> {
        if *self.shared.stopped.borrow() {
            return Err(Error::Stopped);
        }
        if self.shared.status().leader == 0 {
            return Err(Error::NoLeader);
        }
        Ok(())
    }

    /// A fresh id in the layout of the proposal ids (member bits, start time, counter):
    /// unique per member across restarts. etcd picks lease ids the same way.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The node's current view of the group.
    pub fn status(&self) -> Status {
        self.shared.status()
    }

    /// The node's state as a signal: wait on it (`wait_for`, `changed`) for a leader,
    /// a role, an applied index or a membership, instead of polling [`Handle::status`].
    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.shared.state.subscribe()
    }

    /// Asks the leader to hand leadership to `to` (call on the leader).
    pub async fn transfer_leader(&self, to: u64) -> Result<()> {
        self.tx
            .send(NodeMsg::TransferLeader(to))
            .await
            .map_err(|_| Error::Stopped)
    }

    /// Starts an election now.
    pub async fn campaign(&self) -> Result<()> {
        self.tx
            .send(NodeMsg::Campaign)
            .await
            .map_err(|_| Error::Stopped)
    }

    /// Where the network delivers messages for this node.
    pub fn inbox(&self) -> Inbox {
        self.inbox.clone()
    }

    /// Resolves when the node has stopped (shut down or failed).
    pub async fn stopped(&self) {
        let mut rx = self.shared.stopped.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Stops the node; pending requests fail with [`Error::Stopped`].
    pub fn shutdown(&self) {
        self.shared.stop("shutdown requested");
    }
}

/// A started node: its handle and its threads.
pub struct Node<O> {
    pub handle: Handle<O>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl<O: Send + 'static> Node<O> {
    /// Stops the node and waits for its threads.
    pub fn shutdown(self) {
        self.handle.shutdown();
        for t in self.threads {
            let _ = t.join();
        }
    }

    /// Stops the node as a crash would, for fault tests in one process: the raft
    /// thread makes no further write, and the WAL loses whatever it wrote but did not
    /// fsync (as at a power cut; with a correct WAL that is nothing). Waits for the
    /// threads, so the data directory can be opened again.
    pub fn crash(self) {
        self.handle.shared.crashed.store(true, Ordering::Release);
        self.shutdown();
    }
}

fn to_storage_hs(hs: &HardState) -> storage::HardState {
    storage::HardState {
        term: hs.term,
        vote: hs.vote,
        commit: hs.commit,
    }
}

fn snapshot_metadata(meta: &SnapshotMeta) -> Result<SnapshotMetadata> {
    let mut m = SnapshotMetadata {
        index: meta.index,
        term: meta.term,
        ..Default::default()
    };
    m.set_conf_state(
        ConfState::parse_from_bytes(&meta.meta).map_err(Error::decode("snapshot conf state"))?,
    );
    Ok(m)
}

/// Opens the WAL and snapshots under `cfg.dir`, brings the state machine up to the
/// newest snapshot if it is behind it, and starts the raft and apply threads. Must be
/// called inside a tokio runtime only if the transport needs one.
pub fn start<S: StateMachine>(
    cfg: Config,
    mut sm: S,
    transport: Arc<dyn Transport>,
) -> Result<Node<S::Output>> {
    if cfg.id == 0 || !(cfg.peers.contains(&cfg.id) || cfg.learners.contains(&cfg.id)) {
        return Err(Error::Config(format!(
            "node id {:x} must be non-zero and one of the initial voters or learners",
            cfg.id
        )));
    }
    let (wal, rec) = Wal::open(&cfg.dir.join("wal"), WalOptions::default())?;
    if rec.truncated_bytes > 0 {
        tracing::warn!(
            bytes = rec.truncated_bytes,
            "WAL had a torn tail; truncated"
        );
    }
    let snaps = Arc::new(SnapshotStore::open(&cfg.dir.join("snap"))?);
    let latest = snaps.latest()?.map(Arc::new);
    let fresh = rec.snapshot.is_none()
        && rec.entries.is_empty()
        && rec.hard_state == storage::HardState::default();
    let mut applied = sm.applied_index();
    if fresh && applied > 0 {
        return Err(Error::Config(format!(
            "the state machine has applied index {applied} but the raft log is empty \
             (a data directory from a Concord without a raft log, or a deleted wal/)"
        )));
    }
    let mut applied_term = 0;
    if let Some(mark) = &rec.snapshot
        && mark.index > applied
    {
        let file = match &latest {
            Some(f) if f.meta().index == mark.index && f.meta().term == mark.term => f.clone(),
            _ => {
                return Err(Error::Config(format!(
                    "the WAL starts from snapshot {} (term {}) but no such snapshot file is in {}",
                    mark.index,
                    mark.term,
                    cfg.dir.join("snap").display()
                )));
            }
        };
        tracing::info!(
            index = mark.index,
            "restoring the state machine from a snapshot"
        );
        sm.restore(&mut file.body_reader()?, mark.index, mark.term)
            .map_err(Error::state_machine)?;
        applied = mark.index;
        applied_term = mark.term;
    }
    let mut conf_state = match &rec.snapshot {
        Some(m) if !m.meta.is_empty() => {
            ConfState::parse_from_bytes(&m.meta).map_err(Error::decode("conf state in the WAL"))?
        }
        _ => ConfState::from((cfg.peers.clone(), cfg.learners.clone())),
    };
    let mut entries = Vec::with_capacity(rec.entries.len());
    for e in &rec.entries {
        entries.push(
            Entry::parse_from_bytes(&e.data)
                .map_err(Error::decode(format!("WAL entry {}", e.index)))?,
        );
    }
    // Raft re-delivers only what the state machine has not applied: the membership
    // changes it has applied are replayed here, so Raft starts with the configuration
    // that goes with the applied index.
    for e in entries.iter().filter(|e| e.index <= applied) {
        if e.get_entry_type() == EntryType::EntryConfChange {
            let (cc, _, _) = membership::from_entry(&e.data)?;
            membership::apply_simple(&mut conf_state, &cc);
        }
    }
    if cfg.force_new_cluster {
        tracing::warn!(
            member_id = cfg.id,
            was = ?conf_state.voters,
            "forcing a new cluster: this member is the only voter"
        );
        conf_state = ConfState::from((vec![cfg.id], Vec::<u64>::new()));
    }
    let compacted = rec.snapshot.as_ref().map_or((0, 0), |m| (m.index, m.term));
    let last = entries.last().map_or(compacted.0, |e| e.index);
    if applied > last {
        return Err(Error::Config(format!(
            "the state machine applied index {applied} but the raft log ends at {last}"
        )));
    }
    let hs = HardState {
        // A new log starts at term 1, as etcd's bootstrap does (its initial
        // configuration entries are written at term 1), so the first leader is elected
        // for term 2 there and here alike.
        term: if fresh { 1 } else { rec.hard_state.term },
        vote: rec.hard_state.vote,
        // Entries can be applied before the hard state that commits them is written.
        commit: rec.hard_state.commit.max(applied).min(last),
        ..Default::default()
    };
    if let Some(e) = entries.iter().find(|e| e.index == applied) {
        applied_term = e.term;
    }
    if cfg.force_new_cluster {
        // As etcd: what the old cluster never committed is dropped, not committed by
        // the new one-member cluster.
        let dropped = entries.iter().filter(|e| e.index > hs.commit).count();
        entries.retain(|e| e.index <= hs.commit);
        if dropped > 0 {
            tracing::warn!(
                dropped,
                commit = hs.commit,
                "forcing a new cluster: uncommitted entries dropped"
            );
        }
    }
    let offered = match &latest {
        Some(f) => Some(snapshot_metadata(f.meta())?),
        None => None,
    };
    let log = LogStore::new(hs, conf_state.clone(), compacted, entries, offered);
    let raft_cfg = raft::Config {
        id: cfg.id,
        election_tick: cfg.election_ticks,
        heartbeat_tick: cfg.heartbeat_ticks,
        applied,
        max_size_per_msg: cfg.max_size_per_msg,
        max_inflight_msgs: cfg.max_inflight_msgs,
        check_quorum: true,
        pre_vote: true,
        ..Default::default()
    };
    raft_cfg.validate()?;
    let mut raw = RawNode::new(&raft_cfg, log, &crate::logger::raft_logger(cfg.id))?;
    if conf_state.voters == [cfg.id] {
        // Alone in the group: no reason to wait an election timeout.
        raw.campaign()?;
    }

    let (tx, rx) = mpsc::channel(INBOX_DEPTH);
    let (apply_tx, apply_rx) = mpsc::channel(APPLY_DEPTH);
    let shared = Arc::new(Shared {
        id: cfg.id,
        waiters: Mutex::new(HashMap::new()),
        state: watch::Sender::new(Status {
            id: cfg.id,
            applied,
            membership: Configuration::from(&conf_state),
            ..Default::default()
        }),
        progress: Mutex::new(Vec::new()),
        stopped: watch::Sender::new(false),
        crashed: AtomicBool::new(false),
    });
    let inbox = Inbox {
        id: cfg.id,
        tx: tx.clone(),
        snaps: snaps.clone(),
    };
    transport.attach(inbox.clone());
    let started_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    // etcd's request id layout: member bits, start time, counter; unique per member
    // across restarts.
    let first_id = ((cfg.id & 0xffff) << 48) | ((started_ms << 8) & ((1 << 48) - 1));
    let handle = Handle {
        tx: tx.clone(),
        shared: shared.clone(),
        next_id: Arc::new(AtomicU64::new(first_id)),
        timeout: cfg.request_timeout,
        inbox,
    };

    let applier = Applier {
        sm,
        shared: shared.clone(),
        node_tx: tx.clone(),
        snaps: snaps.clone(),
        snapshot_count: cfg.snapshot_count,
        conf_bytes: conf_state
            .write_to_bytes()
            .map_err(Error::decode("conf state"))?,
        last_snapshot: latest
            .as_ref()
            .map_or(0, |f| f.meta().index)
            .max(compacted.0),
        applied,
        applied_term,
        snapshotting: Arc::new(AtomicBool::new(false)),
    };
    let apply_thread = thread::Builder::new()
        .name("raft-apply".into())
        .spawn(move || applier.run(apply_rx))?;

    let driver = Driver {
        raw,
        wal,
        snaps,
        transport,
        apply_tx,
        shared: shared.clone(),
        reads: Reads::default(),
        current_snapshot: latest,
        received: HashMap::new(),
        cfg: cfg.clone(),
        leader: 0,
        ticks: 0,
    };
    let raft_thread = thread::Builder::new()
        .name("raft".into())
        .spawn(move || driver.run(rx))?;
    Ok(Node {
        handle,
        threads: vec![raft_thread, apply_thread],
    })
}

struct ReadBatch {
    ctx: Vec<u8>,
    waiters: Vec<oneshot::Sender<Result<u64>>>,
    issued_tick: u64,
}

#[derive(Default)]
struct Reads {
    new: Vec<oneshot::Sender<Result<u64>>>,
    in_flight: Vec<ReadBatch>,
    seq: u64,
}

impl Reads {
    fn fail_all(&mut self, e: fn() -> Error) {
        for w in self.new.drain(..) {
            let _ = w.send(Err(e()));
        }
        for b in self.in_flight.drain(..) {
            for w in b.waiters {
                let _ = w.send(Err(e()));
            }
        }
    }
}

enum ApplyTask {
    /// Committed entries, with Raft's configuration after each membership change.
    Entries(Vec<Entry>, HashMap<u64, ConfState>),
    Restore(Arc<SnapshotFile>),
}

struct Driver<O> {
    raw: RawNode<LogStore>,
    wal: Wal,
    snaps: Arc<SnapshotStore>,
    transport: Arc<dyn Transport>,
    apply_tx: mpsc::Sender<ApplyTask>,
    shared: Arc<Shared<O>>,
    reads: Reads,
    current_snapshot: Option<Arc<SnapshotFile>>,
    received: HashMap<u64, Arc<SnapshotFile>>,
    cfg: Config,
    leader: u64,
    ticks: u64,
}

impl<O: Send + 'static> Driver<O> {
    fn run(mut self, mut rx: mpsc::Receiver<NodeMsg>) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the raft thread's runtime");
                self.shared.stop("no runtime");
                return;
            }
        };
        let mut stopped = self.shared.stopped.subscribe();
        let result: Result<()> = rt.block_on(async {
            let mut ticker = tokio::time::interval(self.cfg.tick);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticker.tick() => self.on_tick(),
                    m = rx.recv() => match m {
                        None => return Ok(()),
                        Some(m) => {
                            self.handle(m)?;
                            for _ in 0..MAX_MSGS_PER_ROUND {
                                match rx.try_recv() {
                                    Ok(m) => self.handle(m)?,
                                    Err(_) => break,
                                }
                            }
                        }
                    },
                    _ = stopped.wait_for(|s| *s) => return Ok(()),
                }
                self.flush_reads();
                if self.raw.has_ready() {
                    self.on_ready().await?;
                }
            }
        });
        if let Err(e) = &result {
            tracing::error!(member_id = self.cfg.id, error = %e, "raft thread failed; the node stops");
        }
        if self.shared.crashed.load(Ordering::Acquire) {
            match self.wal.lose_unsynced() {
                Ok(0) => {}
                Ok(bytes) => {
                    tracing::warn!(bytes, "crash: the WAL lost what it had not fsynced")
                }
                Err(e) => tracing::warn!(error = %e, "crash: truncating the WAL failed"),
            }
        }
        self.shared.stop(if result.is_ok() {
            "raft thread ended"
        } else {
            "raft thread failed"
        });
        self.reads.fail_all(|| Error::Stopped);
        // Dropping the senders fails every waiting proposer with Stopped.
        self.shared
            .waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    fn on_tick(&mut self) {
        self.raw.tick();
        self.ticks += 1;
        let ticks = self.ticks;
        self.reads.in_flight.retain_mut(|b| {
            b.waiters.retain(|w| !w.is_closed());
            !b.waiters.is_empty()
        });
        for b in &mut self.reads.in_flight {
            if ticks - b.issued_tick >= READ_RETRY_TICKS {
                b.issued_tick = ticks;
                self.raw.read_index(b.ctx.clone());
            }
        }
    }

    fn handle(&mut self, m: NodeMsg) -> Result<()> {
        match m {
            NodeMsg::Propose { id, data } => {
                if let Err(e) = self.raw.propose(Vec::new(), data) {
                    tracing::debug!(error = %e, "proposal dropped");
                    let err = if self.raw.raft.leader_id == 0 {
                        Error::NoLeader
                    } else {
                        // Leadership is being transferred.
                        Error::LeaderChanged
                    };
                    self.shared.complete(id, Err(err));
                }
            }
            NodeMsg::ProposeChange { id, change } => {
                let cc = membership::to_raft(&change, id);
                if let Err(e) = self.raw.propose_conf_change(Vec::new(), cc) {
                    tracing::info!(error = %e, "membership change refused");
                    let err = if self.raw.raft.leader_id == 0 {
                        Error::NoLeader
                    } else if self.raw.raft.has_pending_conf() {
                        Error::ChangeInProgress
                    } else {
                        Error::LeaderChanged
                    };
                    self.shared.complete(id, Err(err));
                }
            }
            NodeMsg::Read(w) => self.reads.new.push(w),
            NodeMsg::Step(msg) => {
                if let Err(e) = self.raw.step(msg) {
                    tracing::debug!(error = %e, "message not stepped");
                }
            }
            NodeMsg::Unreachable(to) => self.raw.report_unreachable(to),
            NodeMsg::SnapshotStatus(to, ok) => self.raw.report_snapshot(
                to,
                if ok {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                },
            ),
            NodeMsg::InstallSnapshot(msg, file) => {
                self.received.insert(file.meta().index, file);
                if let Err(e) = self.raw.step(msg) {
                    tracing::warn!(error = %e, "snapshot message not stepped");
                }
            }
            NodeMsg::SnapshotDone(Ok(file)) => self.snapshot_taken(file)?,
            NodeMsg::SnapshotDone(Err(e)) => {
                tracing::warn!(error = %e, "taking a snapshot failed; will retry later");
            }
            NodeMsg::TransferLeader(to) => self.raw.transfer_leader(to),
            NodeMsg::Campaign => self.raw.campaign()?,
        }
        Ok(())
    }

    /// A local snapshot file is durable: record it, then let go of the log before it
    /// (keeping some entries for followers that are only a little behind).
    fn snapshot_taken(&mut self, file: SnapshotFile) -> Result<()> {
        let meta = file.meta().clone();
        if meta.index <= self.raw.store().compacted_index() {
            return Ok(());
        }
        self.wal.mark_snapshot(&SnapshotMark {
            index: meta.index,
            term: meta.term,
            meta: meta.meta.clone(),
        })?;
        self.raw.mut_store().set_snapshot(snapshot_metadata(&meta)?);
        let compact_to = meta.index.saturating_sub(self.cfg.catch_up_entries);
        self.raw.mut_store().compact(compact_to);
        let released = self.wal.release_to(compact_to)?;
        self.current_snapshot = Some(Arc::new(file));
        let purged = self.snaps.purge(SNAPSHOTS_KEPT)?;
        tracing::info!(
            index = meta.index,
            term = meta.term,
            compacted_to = compact_to,
            wal_segments_released = released,
            snapshots_purged = purged,
            "snapshot saved; log compacted"
        );
        Ok(())
    }

    fn flush_reads(&mut self) {
        if self.reads.new.is_empty() {
            return;
        }
        if self.raw.raft.leader_id == 0 {
            for w in self.reads.new.drain(..) {
                let _ = w.send(Err(Error::NoLeader));
            }
            return;
        }
        self.reads.seq += 1;
        let mut ctx = Vec::with_capacity(16);
        ctx.extend_from_slice(&self.cfg.id.to_be_bytes());
        ctx.extend_from_slice(&self.reads.seq.to_be_bytes());
        self.raw.read_index(ctx.clone());
        let waiters = std::mem::take(&mut self.reads.new);
        self.reads.in_flight.push(ReadBatch {
            ctx,
            waiters,
            issued_tick: self.ticks,
        });
    }

    fn read_states(&mut self, states: Vec<ReadState>) {
        for rs in states {
            if let Some(pos) = self
                .reads
                .in_flight
                .iter()
                .position(|b| b.ctx == rs.request_ctx)
            {
                let b = self.reads.in_flight.swap_remove(pos);
                for w in b.waiters {
                    let _ = w.send(Ok(rs.index));
                }
            }
        }
    }

    fn send(&mut self, msgs: Vec<Message>) {
        if msgs.is_empty() {
            return;
        }
        let mut regular = Vec::with_capacity(msgs.len());
        for m in msgs {
            if m.get_msg_type() != MessageType::MsgSnapshot {
                regular.push(m);
                continue;
            }
            let index = m.get_snapshot().get_metadata().index;
            match &self.current_snapshot {
                Some(f) if f.meta().index == index => {
                    tracing::info!(to = m.to, index, "sending a snapshot");
                    self.transport.send_snapshot(m, f.clone());
                }
                _ => self.raw.report_snapshot(m.to, SnapshotStatus::Failure),
            }
        }
        self.transport.send(regular);
    }

    async fn apply(&mut self, entries: Vec<Entry>) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        // Raft takes a membership change when it is handed to the apply thread (as
        // raft-rs's own examples do); the state machine records it in order.
        let mut confs = HashMap::new();
        for e in &entries {
            if e.get_entry_type() == EntryType::EntryConfChange {
                let (cc, change, _) = membership::from_entry(&e.data)?;
                let cs = match self.raw.apply_conf_change(&cc) {
                    Ok(cs) => cs,
                    Err(err) => {
                        tracing::warn!(error = %err, ?change, "membership change not taken");
                        self.raw.raft.prs().conf().to_conf_state()
                    }
                };
                tracing::info!(index = e.index, ?change, voters = ?cs.voters, learners = ?cs.learners, "membership changed");
                self.raw.mut_store().conf_state = cs.clone();
                confs.insert(e.index, cs);
            }
        }
        self.apply_tx
            .send(ApplyTask::Entries(entries, confs))
            .await
            .map_err(|_| Error::Stopped)
    }

    async fn install_snapshot(&mut self, meta: SnapshotMetadata) -> Result<()> {
        let file = self
            .received
            .remove(&meta.index)
            .or_else(|| {
                self.current_snapshot
                    .clone()
                    .filter(|f| f.meta().index == meta.index)
            })
            .ok_or_else(|| {
                Error::Inconsistent(format!("accepted snapshot {} has no file", meta.index))
            })?;
        self.received.clear();
        self.wal.mark_snapshot(&SnapshotMark {
            index: meta.index,
            term: meta.term,
            meta: meta
                .get_conf_state()
                .write_to_bytes()
                .map_err(Error::decode("conf state"))?,
        })?;
        self.raw.mut_store().apply_snapshot(&meta);
        tracing::info!(
            index = meta.index,
            term = meta.term,
            "installing a snapshot from the leader"
        );
        self.current_snapshot = Some(file.clone());
        self.apply_tx
            .send(ApplyTask::Restore(file))
            .await
            .map_err(|_| Error::Stopped)
    }

    fn persist(&mut self, entries: &[Entry], hs: Option<&HardState>) -> Result<()> {
        if entries.is_empty() && hs.is_none() {
            return Ok(());
        }
        let mut records = Vec::with_capacity(entries.len());
        for e in entries {
            records.push(storage::Entry {
                index: e.index,
                term: e.term,
                data: e.write_to_bytes().map_err(Error::decode("raft record"))?,
            });
        }
        // One fsync covers the entries and the hard state (group commit).
        self.wal.append(&records, hs.map(to_storage_hs).as_ref())?;
        let store = self.raw.mut_store();
        store.append(entries);
        if let Some(hs) = hs {
            store.hard_state = hs.clone();
        }
        Ok(())
    }

    async fn on_ready(&mut self) -> Result<()> {
        let mut rd = self.raw.ready();
        self.send(rd.take_messages());
        if !rd.snapshot().is_empty() {
            let meta = rd.snapshot().get_metadata().clone();
            self.install_snapshot(meta).await?;
        }
        self.apply(rd.take_committed_entries()).await?;
        let entries = rd.take_entries();
        self.persist(&entries, rd.hs())?;
        self.read_states(rd.take_read_states());
        fail::fail_point!(concord_storage::failpoints::RAFT_BEFORE_SEND_PERSISTED);
        self.send(rd.take_persisted_messages());
        fail::fail_point!(concord_storage::failpoints::RAFT_AFTER_SEND_PERSISTED);
        let mut light = self.raw.advance(rd);
        if let Some(c) = light.commit_index() {
            self.raw.mut_store().hard_state.commit = c;
        }
        self.send(light.take_messages());
        self.apply(light.take_committed_entries()).await?;
        self.raw.advance_apply();
        self.publish_status();
        Ok(())
    }

    fn publish_status(&mut self) {
        let r = &self.raw.raft;
        let leader = r.leader_id;
        let role: Role = r.state.into();
        let (term, commit, last_index) = (r.term, r.raft_log.committed, r.raft_log.last_index());
        let conf = self.raw.store().conf_state.clone();
        self.shared.state.send_if_modified(|s| {
            let membership_changed =
                s.membership.voters != conf.voters || s.membership.learners != conf.learners;
            let changed = membership_changed
                || (s.leader, s.term, s.commit, s.last_index, s.role)
                    != (leader, term, commit, last_index, role);
            s.leader = leader;
            s.term = term;
            s.commit = commit;
            s.last_index = last_index;
            s.role = role;
            if membership_changed {
                s.membership = Configuration::from(&conf);
            }
            changed
        });
        let r = &self.raw.raft;
        let progress = if r.state == StateRole::Leader {
            r.prs().iter().map(|(id, p)| (*id, p.matched)).collect()
        } else {
            Vec::new()
        };
        *self
            .shared
            .progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = progress;
        if leader != self.leader {
            tracing::info!(
                member_id = self.cfg.id,
                leader = format!("{leader:x}"),
                term = r.term,
                "leader changed"
            );
            if self.leader != 0 {
                self.reads.fail_all(|| Error::LeaderChanged);
            }
            self.leader = leader;
        }
    }
}

struct Applier<S: StateMachine> {
    sm: S,
    shared: Arc<Shared<S::Output>>,
    node_tx: mpsc::Sender<NodeMsg>,
    snaps: Arc<SnapshotStore>,
    snapshot_count: u64,
    conf_bytes: Vec<u8>,
    last_snapshot: u64,
    applied: u64,
    applied_term: u64,
    snapshotting: Arc<AtomicBool>,
}

impl<S: StateMachine> Applier<S> {
    fn run(mut self, mut rx: mpsc::Receiver<ApplyTask>) {
        while let Some(task) = rx.blocking_recv() {
            let r = match task {
                ApplyTask::Entries(ents, confs) => self.apply(ents, confs),
                ApplyTask::Restore(file) => self.restore(&file),
            };
            if let Err(e) = r {
                tracing::error!(member_id = self.shared.id, error = %e, "applying failed; the node stops");
                self.shared.stop("apply failed");
                return;
            }
            if *self.shared.stopped.borrow() {
                return;
            }
        }
    }

    fn apply(&mut self, ents: Vec<Entry>, confs: HashMap<u64, ConfState>) -> Result<()> {
        let mut cmds = Vec::with_capacity(ents.len());
        let mut ids = Vec::with_capacity(ents.len());
        for e in &ents {
            if e.index <= self.applied {
                continue;
            }
            match e.get_entry_type() {
                EntryType::EntryNormal if e.data.len() >= 8 => {
                    let (id, data) = e.data.split_at(8);
                    ids.push(u64::from_be_bytes(id.try_into().expect("8 bytes")));
                    cmds.push(Committed {
                        index: e.index,
                        term: e.term,
                        data,
                    });
                }
                // A new leader's empty entry.
                EntryType::EntryNormal => {}
                EntryType::EntryConfChange => {
                    // Commands before it are applied first, in order.
                    self.apply_commands(&mut cmds, &mut ids)?;
                    let (_, change, proposal) = membership::from_entry(&e.data)?;
                    let cs = confs.get(&e.index).cloned().unwrap_or_default();
                    let out = self
                        .sm
                        .apply_change(e.index, &change, &Configuration::from(&cs))
                        .map_err(Error::state_machine)?;
                    self.conf_bytes = cs.write_to_bytes().map_err(Error::decode("raft record"))?;
                    self.shared.complete(proposal, Ok(out));
                }
                EntryType::EntryConfChangeV2 => {
                    return Err(Error::Inconsistent(format!(
                        "entry {}: joint membership changes are not used by Concord",
                        e.index
                    )));
                }
            }
        }
        self.apply_commands(&mut cmds, &mut ids)?;
        if let Some(last) = ents.last()
            && last.index > self.applied
        {
            self.applied = last.index;
            self.applied_term = last.term;
            let applied = self.applied;
            self.shared.state.send_modify(|s| s.applied = applied);
        }
        self.maybe_snapshot();
        Ok(())
    }

    fn apply_commands(&mut self, cmds: &mut Vec<Committed<'_>>, ids: &mut Vec<u64>) -> Result<()> {
        if cmds.is_empty() {
            return Ok(());
        }
        let outputs = self.sm.apply(cmds).map_err(Error::state_machine)?;
        if storage::failpoints::planted(storage::failpoints::BUG_APPLY_TWICE)
            && let Some(last) = cmds.last()
        {
            self.sm.apply(&[*last]).map_err(Error::state_machine)?;
        }
        for (id, out) in ids.drain(..).zip(outputs) {
            self.shared.complete(id, Ok(out));
        }
        cmds.clear();
        Ok(())
    }

    fn restore(&mut self, file: &SnapshotFile) -> Result<()> {
        let meta = file.meta().clone();
        if meta.index <= self.applied {
            return Ok(());
        }
        let started = Instant::now();
        self.sm
            .restore(&mut file.body_reader()?, meta.index, meta.term)
            .map_err(Error::state_machine)?;
        tracing::info!(
            index = meta.index,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "state machine restored from a snapshot"
        );
        self.applied = meta.index;
        self.applied_term = meta.term;
        self.conf_bytes = meta.meta;
        self.last_snapshot = meta.index;
        let applied = self.applied;
        self.shared.state.send_modify(|s| s.applied = applied);
        Ok(())
    }

    fn maybe_snapshot(&mut self) {
        if self.applied < self.last_snapshot + self.snapshot_count
            || self.snapshotting.load(Ordering::Acquire)
        {
            return;
        }
        self.last_snapshot = self.applied;
        let mut image = match self.sm.snapshot() {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(error = %e, "state machine snapshot failed; will retry");
                return;
            }
        };
        let meta = SnapshotMeta {
            index: self.applied,
            term: self.applied_term,
            meta: self.conf_bytes.clone(),
        };
        let snaps = self.snaps.clone();
        let node_tx = self.node_tx.clone();
        let busy = self.snapshotting.clone();
        busy.store(true, Ordering::Release);
        let spawned = thread::Builder::new()
            .name("raft-snapshot".into())
            .spawn(move || {
                let r = (|| -> Result<SnapshotFile> {
                    let mut w = snaps.create(&meta)?;
                    std::io::copy(&mut image, &mut w)?;
                    Ok(w.finish()?)
                })();
                let _ = node_tx.blocking_send(NodeMsg::SnapshotDone(r));
                busy.store(false, Ordering::Release);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the snapshot writer");
            self.snapshotting.store(false, Ordering::Release);
        }
    }
}
