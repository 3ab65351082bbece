//! The node: one thread owns `raft::RawNode` and processes `Ready` in raft-rs's
//! documented order; a second thread applies committed entries to the state machine.
//! [`Handle`] is how the rest of the process proposes, reads and watches status.
//!
//! Ready order (raft-rs `RawNode` docs): send `messages` (a leader may send before its
//! own log is durable); install a snapshot; hand committed entries to the apply thread;
//! append entries and the hard state to the WAL with one fsync; only then send
//! `persisted_messages` (votes and append responses promise durability); advance, and
//! handle the light ready the same way.

mod applier;
mod driver;
mod handle;
pub(crate) mod inbound;
mod read_index;
mod recovery;

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

use applier::*;
use driver::*;
pub use handle::Handle;
use handle::*;
use read_index::*;
pub use recovery::start;
use recovery::{snapshot_metadata, to_storage_hs};

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
    /// `trace`: the entry's trace context (empty: not traced).
    Propose {
        id: u64,
        data: Vec<u8>,
        trace: Vec<u8>,
    },
    ProposeChange {
        id: u64,
        change: MemberChange,
    },
    Read(oneshot::Sender<Result<u64>>),
    Step(Message),
    Unreachable(u64),
    SnapshotStatus(u64, bool),
    InstallSnapshot(Message, Arc<SnapshotFile>),
    SnapshotDone(std::result::Result<SnapshotFile, Error>),
    TransferLeader(u64),
    Campaign,
}

/// A started node: its handle and its threads.
pub struct Node<O> {
    pub handle: Handle<O>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl<O: Send + 'static> Node<O> {
    /// Stops the node and waits for its threads.
    pub fn shutdown(mut self) {
        self.handle.shutdown();
        for t in std::mem::take(&mut self.threads) {
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

/// A node dropped without [`Node::shutdown`] still stops: its threads end on their own
/// (not waited for here).
impl<O> Drop for Node<O> {
    fn drop(&mut self) {
        self.handle.shared.stop("node dropped");
    }
}
