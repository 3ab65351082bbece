//! An in-process transport for tests: nodes in one process exchange messages through a
//! [`LocalNetwork`] that can drop links, partition nodes and delay delivery.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use concord_storage::SnapshotFile;
use raft::eraftpb::Message;

use crate::transport::{Inbox, Transport};

#[derive(Default)]
struct Net {
    inboxes: HashMap<u64, Inbox>,
    /// Directed links (from, to) that drop everything.
    cut: HashSet<(u64, u64)>,
    delay: Option<Duration>,
}

/// A network between nodes of one process. Cheap to clone.
#[derive(Clone, Default)]
pub struct LocalNetwork {
    net: Arc<Mutex<Net>>,
}

impl std::fmt::Debug for LocalNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalNetwork").finish_non_exhaustive()
    }
}

impl LocalNetwork {
    pub fn new() -> LocalNetwork {
        LocalNetwork::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Net> {
        self.net.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The transport for node `id` (it joins the network when the node starts).
    pub fn transport(&self, id: u64) -> Arc<LocalTransport> {
        Arc::new(LocalTransport {
            id,
            net: self.clone(),
        })
    }

    /// Drops everything from `from` to `to`.
    pub fn cut(&self, from: u64, to: u64) {
        self.lock().cut.insert((from, to));
    }

    /// Cuts `id` off from every other node, both ways.
    pub fn isolate(&self, id: u64) {
        let mut n = self.lock();
        let others: Vec<u64> = n.inboxes.keys().copied().filter(|&o| o != id).collect();
        for o in others {
            n.cut.insert((id, o));
            n.cut.insert((o, id));
        }
    }

    /// Restores every link.
    pub fn heal(&self) {
        self.lock().cut.clear();
    }

    /// Delays every delivery by `d` (`None`: deliver at once).
    pub fn set_delay(&self, d: Option<Duration>) {
        self.lock().delay = d;
    }

    /// Takes node `id` off the network (it was stopped); a restarted node rejoins by
    /// attaching a new transport.
    pub fn remove(&self, id: u64) {
        self.lock().inboxes.remove(&id);
    }

    fn route(&self, from: u64, to: u64) -> Option<(Inbox, Option<Duration>)> {
        let n = self.lock();
        if n.cut.contains(&(from, to)) {
            return None;
        }
        n.inboxes.get(&to).map(|i| (i.clone(), n.delay))
    }
}

/// One node's side of a [`LocalNetwork`].
pub struct LocalTransport {
    id: u64,
    net: LocalNetwork,
}

impl Transport for LocalTransport {
    fn attach(&self, inbox: Inbox) {
        self.net.lock().inboxes.insert(self.id, inbox);
    }

    fn send(&self, msgs: Vec<Message>) {
        for m in msgs {
            let Some((inbox, delay)) = self.net.route(self.id, m.to) else {
                continue;
            };
            match delay {
                None => inbox.step(m),
                Some(d) => {
                    // A simulated slow link, not synchronisation: the message is
                    // delivered late on a thread of its own.
                    let _ = std::thread::Builder::new()
                        .name("local-net-delay".into())
                        .spawn(move || {
                            std::thread::sleep(d);
                            inbox.step(m);
                        });
                }
            }
        }
    }

    fn send_snapshot(&self, msg: Message, file: Arc<SnapshotFile>) {
        let from = self.id;
        let to = msg.to;
        let net = self.net.clone();
        let _ = std::thread::Builder::new()
            .name("local-net-snapshot".into())
            .spawn(move || {
                let delivered = (|| -> Option<()> {
                    let (target, _) = net.route(from, to)?;
                    let mut w = target.import_snapshot().ok()?;
                    let mut r = file.raw_reader().ok()?;
                    std::io::copy(&mut r, &mut w).ok()?;
                    w.flush().ok()?;
                    let f = w.finish().ok()?;
                    target.install_snapshot_blocking(msg, f).ok()
                })()
                .is_some();
                let me = net.lock().inboxes.get(&from).cloned();
                if let Some(me) = me {
                    me.snapshot_status(to, delivered);
                }
            });
    }
}
