//! The apply loop: the one thread that changes the store.
//!
//! Write commands arrive on a bounded queue (a full queue makes proposers wait). The
//! loop takes every command that is waiting, up to [`MAX_BATCH`], applies them in
//! order in one [`concord_mvcc::Writer`] and commits them with one synced write; only
//! then are the proposers answered. Each command is given the next log index, written
//! with the batch as the store's consistent index, which is the shape the replicated
//! log's apply loop takes over.

use std::sync::Arc;
use std::thread;

use concord_mvcc as mvcc;
use tokio::sync::{mpsc, oneshot};

/// Commands applied in one write at most.
pub const MAX_BATCH: usize = 1024;
/// Commands waiting at most; a proposer waits while the queue is full.
pub const QUEUE_DEPTH: usize = 4096;

/// A state machine command.
#[derive(Debug)]
pub enum Command {
    Put(mvcc::PutRequest),
    DeleteRange(mvcc::DeleteRangeRequest),
    Txn(mvcc::TxnRequest),
    Compact(i64),
}

/// A command's result.
#[derive(Debug)]
pub enum Applied {
    Put(mvcc::PutResponse),
    DeleteRange(mvcc::DeleteRangeResponse),
    Txn(mvcc::TxnResponse),
    /// The revision after the compaction was scheduled, and a handle to wait for it.
    Compact(i64, mvcc::CompactWait),
}

struct Proposal {
    cmd: Command,
    reply: oneshot::Sender<mvcc::Result<Applied>>,
}

/// Hands commands to the apply loop.
#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::Sender<Proposal>,
}

impl Proposer {
    /// Applies `cmd` and waits until it is durable. `None` if the loop has stopped.
    pub async fn propose(&self, cmd: Command) -> Option<mvcc::Result<Applied>> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Proposal { cmd, reply }).await.ok()?;
        rx.await.ok()
    }
}

/// Starts the apply loop over `store`; it ends when every [`Proposer`] is dropped.
pub fn start(
    store: Arc<mvcc::Store>,
    leases: Arc<dyn mvcc::LeaseLookup + Send + Sync>,
) -> std::io::Result<(Proposer, thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
    let handle = thread::Builder::new()
        .name("apply".into())
        .spawn(move || run(&store, &*leases, rx))?;
    Ok((Proposer { tx }, handle))
}

fn run(store: &mvcc::Store, leases: &dyn mvcc::LeaseLookup, mut rx: mpsc::Receiver<Proposal>) {
    let mut index = match store.consistent_index() {
        Ok(i) => i,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the consistent index; apply loop stops");
            return;
        }
    };
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let mut writer = match store.writer() {
            Ok(w) => w,
            Err(e) => {
                for p in batch.drain(..) {
                    let _ = p.reply.send(Err(e.clone()));
                }
                continue;
            }
        };
        let results: Vec<_> = batch
            .iter()
            .map(|p| apply_one(&mut writer, leases, &p.cmd))
            .collect();
        match writer.commit(Some(index + batch.len() as u64)) {
            Ok(_) => {
                index += batch.len() as u64;
                for (p, r) in batch.drain(..).zip(results) {
                    let _ = p.reply.send(r);
                }
            }
            Err(e) => {
                for p in batch.drain(..) {
                    let _ = p.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

fn apply_one(
    w: &mut mvcc::Writer<'_>,
    leases: &dyn mvcc::LeaseLookup,
    cmd: &Command,
) -> mvcc::Result<Applied> {
    Ok(match cmd {
        Command::Put(p) => Applied::Put(w.put(p, leases)?),
        Command::DeleteRange(d) => Applied::DeleteRange(w.delete_range(d)?),
        Command::Txn(t) => Applied::Txn(w.txn(t, leases)?),
        Command::Compact(rev) => {
            let wait = w.compact(*rev)?;
            Applied::Compact(w.revision(), wait)
        }
    })
}
