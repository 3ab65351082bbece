//! How Raft messages leave and enter a node. The raft thread hands outgoing messages to
//! a [`Transport`]; whatever carries them delivers incoming ones through the receiving
//! node's [`Inbox`]. [`crate::grpc`] carries them over the network, [`crate::local`]
//! between nodes in one process (with faults, for tests).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use concord_storage::{ImportWriter, SnapshotFile, SnapshotStore};
use raft::eraftpb::Message;
use tokio::sync::mpsc;

use crate::error::{Error, Result};
use crate::node::NodeMsg;

/// What a member publishes to peers that ask (its member list, name and client URLs,
/// as bytes the server defines), made afresh for each question.
pub type Attributes = Arc<dyn Fn() -> Vec<u8> + Send + Sync>;

/// A peer's answer to [`Transport::fetch_attributes`].
pub type AttributesFuture = Pin<Box<dyn Future<Output = Result<Vec<u8>>> + Send>>;

/// Carries a node's outgoing Raft messages, and the one question members ask each
/// other outside Raft (what a peer publishes about itself). The member is built on an
/// `Arc<dyn Transport>`: [`crate::grpc::GrpcTransport`] in the binary,
/// [`crate::local::LocalNetwork`] for members of one process.
pub trait Transport: Send + Sync + 'static {
    /// Called once, before the first message is sent, with the sending node's inbox
    /// (where delivery failures are reported).
    fn attach(&self, inbox: Inbox);
    /// Queues messages for their recipients. Never blocks the raft thread: a message
    /// that cannot be queued is dropped (Raft retransmits what matters).
    fn send(&self, msgs: Vec<Message>);
    /// Sends a snapshot file, then `msg` (the MsgSnapshot that refers to it); reports
    /// the outcome through the inbox's [`Inbox::snapshot_status`].
    fn send_snapshot(&self, msg: Message, file: Arc<SnapshotFile>);
    /// Member `id` is reached at peer URL `url` (added, or moved). A transport that
    /// routes by id needs nothing more.
    fn set_peer(&self, id: u64, url: &str) {
        let _ = (id, url);
    }
    /// Member `id` was removed: stop sending to it.
    fn remove_peer(&self, id: u64) {
        let _ = id;
    }
    /// Asks the member listening on peer URL `url` what it publishes.
    fn fetch_attributes(&self, url: &str) -> AttributesFuture;
}

/// The way into a running node's raft thread for network input. Cheap to clone.
#[derive(Clone)]
pub struct Inbox {
    pub(crate) id: u64,
    pub(crate) tx: mpsc::Sender<NodeMsg>,
    pub(crate) snaps: Arc<SnapshotStore>,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox").field("id", &self.id).finish()
    }
}

impl Inbox {
    /// The node's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Delivers a message. If the node's queue is full the message is dropped, as a
    /// lossy network would; Raft recovers.
    pub fn step(&self, msg: Message) {
        if self.tx.try_send(NodeMsg::Step(msg)).is_err() {
            tracing::debug!(member_id = self.id, "raft inbox full; message dropped");
        }
    }

    /// Decodes and delivers a message received as bytes.
    pub fn step_bytes(&self, bytes: &[u8]) -> Result<()> {
        let msg: Message = crate::codec::decode(bytes).map_err(Error::decode("raft message"))?;
        ::metrics::counter!(crate::metrics::PEER_RECEIVED_BYTES, "From" => crate::metrics::id_label(msg.from))
            .increment(bytes.len() as u64);
        self.step(msg);
        Ok(())
    }

    /// Tells Raft that `to` could not be reached (it slows down sending there).
    pub fn unreachable(&self, to: u64) {
        let _ = self.tx.try_send(NodeMsg::Unreachable(to));
    }

    /// Tells Raft whether a snapshot sent to `to` arrived.
    pub fn snapshot_status(&self, to: u64, delivered: bool) {
        let _ = self.tx.try_send(NodeMsg::SnapshotStatus(to, delivered));
    }

    /// A writer for a snapshot file arriving from the leader; its checksum is verified
    /// when it is finished.
    pub fn import_snapshot(&self) -> Result<ImportWriter> {
        Ok(self.snaps.import()?)
    }

    /// Hands a received, verified snapshot file and its MsgSnapshot to the node.
    /// [`Error::Refused`] if `msg` is not the MsgSnapshot of that file.
    pub async fn install_snapshot(&self, msg: Message, file: SnapshotFile) -> Result<()> {
        self.check_snapshot(&msg, &file)?;
        self.tx
            .send(NodeMsg::InstallSnapshot(msg, Arc::new(file)))
            .await
            .map_err(|_| Error::Stopped)
    }

    fn check_snapshot(&self, msg: &Message, file: &SnapshotFile) -> Result<()> {
        match crate::node::inbound::snapshot_refusal(self.id, msg, file.meta()) {
            Some(why) => Err(Error::Refused(why)),
            None => Ok(()),
        }
    }

    /// [`Inbox::install_snapshot`] for threads outside the async runtime.
    pub fn install_snapshot_blocking(&self, msg: Message, file: SnapshotFile) -> Result<()> {
        self.check_snapshot(&msg, &file)?;
        self.tx
            .blocking_send(NodeMsg::InstallSnapshot(msg, Arc::new(file)))
            .map_err(|_| Error::Stopped)
    }
}
