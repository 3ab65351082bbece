//! The handle: proposals wait for their entry to be applied (by proposal id),
//! linearizable reads wait on ReadIndex and the applied index, and the node's state
//! is published on a watch channel.

use super::*;

pub(super) type Waiters<O> = Mutex<HashMap<u64, oneshot::Sender<Result<O>>>>;

pub(super) struct Shared<O> {
    pub(super) id: u64,
    pub(super) waiters: Waiters<O>,
    /// The node's state: written by the raft thread (role, leader, term, indexes,
    /// membership) and the apply thread (`applied`).
    pub(super) state: watch::Sender<Status>,
    /// On the leader: each member's matched index.
    pub(super) progress: Mutex<Vec<(u64, u64)>>,
    pub(super) stopped: watch::Sender<bool>,
    /// Set by [`Node::crash`]: the raft thread ends without another write, and the
    /// WAL loses what was not fsynced, as at a power cut.
    pub(super) crashed: AtomicBool,
}

impl<O> Shared<O> {
    pub(super) fn stop(&self, why: &str) {
        if !*self.stopped.borrow() {
            tracing::info!(member_id = self.id, why, "raft node stopping");
        }
        self.stopped.send_replace(true);
    }

    pub(super) fn status(&self) -> Status {
        self.state.borrow().clone()
    }

    pub(super) fn complete(&self, id: u64, r: Result<O>) {
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
    pub(super) tx: mpsc::Sender<NodeMsg>,
    pub(super) shared: Arc<Shared<O>>,
    pub(super) next_id: Arc<AtomicU64>,
    pub(super) timeout: Duration,
    pub(super) inbox: Inbox,
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
pub(super) struct Unregister<'a, O> {
    pub(super) shared: &'a Shared<O>,
    pub(super) id: u64,
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
    /// applied it. A follower's proposal is forwarded to the leader by Raft. A sampled
    /// OpenTelemetry span current in the caller is the parent of the proposal's spans
    /// on every member (see the `trace` module).
    /// [`Error::Timeout`] means the outcome is unknown: it may still be applied.
    pub async fn propose(&self, payload: &[u8]) -> Result<O> {
        let mut data = Vec::with_capacity(8 + payload.len());
        data.extend_from_slice(&[0; 8]);
        data.extend_from_slice(payload);
        // The caller's trace goes with the entry (empty unless it is sampled).
        let trace = crate::trace::current();
        self.submit(|id| {
            data[..8].copy_from_slice(&id.to_be_bytes());
            NodeMsg::Propose { id, data, trace }
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

    pub(super) async fn submit(&self, msg: impl FnOnce(u64) -> NodeMsg) -> Result<O> {
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

    pub(super) fn check_serving(&self) -> Result<()> {
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
