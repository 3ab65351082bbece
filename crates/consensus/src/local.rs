//! An in-process transport: nodes in one process exchange messages through a
//! [`LocalNetwork`], which can cut links one way or both, isolate nodes, drop messages
//! at random, and delay them by a random amount (so they also arrive out of order).
//! Every random choice comes from the network's seed, so a test that drives the same
//! schedule gets the same fault decisions for the same sequence of messages.
//!
//! Delayed messages wait in one timer queue served by one delivery thread per network
//! (not a thread per message), so a simulation can delay thousands of messages.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use concord_storage::SnapshotFile;
use raft::eraftpb::Message;

use crate::error::Error;
use crate::transport::{Attributes, AttributesFuture, Inbox, Transport};

/// How long the delivery thread sleeps at most before it checks whether the network
/// still exists.
const IDLE_CHECK: Duration = Duration::from_millis(100);

#[derive(Default)]
struct Net {
    inboxes: HashMap<u64, Inbox>,
    /// What each node publishes, by its peer URL, with the node's id.
    attributes: HashMap<String, (u64, Attributes)>,
    /// Directed links (from, to) that drop everything.
    cut: HashSet<(u64, u64)>,
    /// Each message is dropped with this probability.
    drop: f64,
    /// Each message is delayed by `base + [0, jitter)`.
    delay: Option<(Duration, Duration)>,
    rng: u64,
}

impl Net {
    /// splitmix64: small, seedable, good enough to decide faults.
    fn next(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// A message waiting in the timer queue.
struct Pending {
    at: Instant,
    seq: u64,
    inbox: Inbox,
    msg: Message,
}

impl PartialEq for Pending {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Pending {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

#[derive(Default)]
struct Queue {
    heap: BinaryHeap<Reverse<Pending>>,
    seq: u64,
    running: bool,
}

#[derive(Default)]
struct Inner {
    net: Mutex<Net>,
    queue: Mutex<Queue>,
    wake: Condvar,
}

/// A network between nodes of one process. Cheap to clone.
#[derive(Clone, Default)]
pub struct LocalNetwork {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LocalNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalNetwork").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl LocalNetwork {
    pub fn new() -> LocalNetwork {
        LocalNetwork::default()
    }

    /// A network whose random faults are decided from `seed`.
    pub fn seeded(seed: u64) -> LocalNetwork {
        let n = LocalNetwork::default();
        n.lock().rng = seed;
        n
    }

    fn lock(&self) -> MutexGuard<'_, Net> {
        lock(&self.inner.net)
    }

    /// The transport for node `id` (it joins the network when the node starts).
    pub fn transport(&self, id: u64) -> Arc<LocalTransport> {
        Arc::new(LocalTransport {
            id,
            net: self.clone(),
        })
    }

    /// Node `id`, reached at peer URL `url`, publishes `attributes` to peers that ask.
    pub fn serve_attributes(&self, id: u64, url: &str, attributes: Attributes) {
        self.lock()
            .attributes
            .insert(url.to_string(), (id, attributes));
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

    /// Restores every link (random drops and delays stay as set).
    pub fn heal(&self) {
        self.lock().cut.clear();
    }

    /// Delays every delivery by `d` (`None`: deliver at once).
    pub fn set_delay(&self, d: Option<Duration>) {
        self.lock().delay = d.map(|d| (d, Duration::ZERO));
    }

    /// Delays every delivery by `base` plus a random part below `jitter`, so messages
    /// also overtake each other.
    pub fn set_jittered_delay(&self, base: Duration, jitter: Duration) {
        self.lock().delay = Some((base, jitter));
    }

    /// Drops each message with probability `p` (0: none).
    pub fn set_drop(&self, p: f64) {
        self.lock().drop = p;
    }

    /// Clears cuts, drops and delays.
    pub fn clear_faults(&self) {
        let mut n = self.lock();
        n.cut.clear();
        n.drop = 0.0;
        n.delay = None;
    }

    /// Takes node `id` off the network (it was stopped); a restarted node rejoins by
    /// attaching a new transport.
    pub fn remove(&self, id: u64) {
        let mut n = self.lock();
        n.inboxes.remove(&id);
        n.attributes.retain(|_, (owner, _)| *owner != id);
    }

    /// Where a message from `from` to `to` goes, and how late; `None`: dropped.
    fn route(&self, from: u64, to: u64, faults: bool) -> Option<(Inbox, Option<Duration>)> {
        let mut n = self.lock();
        if n.cut.contains(&(from, to)) {
            return None;
        }
        let inbox = n.inboxes.get(&to)?.clone();
        if !faults {
            return Some((inbox, None));
        }
        let p = n.drop;
        if n.chance(p) {
            return None;
        }
        let delay = match n.delay {
            Some((base, jitter)) if !jitter.is_zero() => {
                let extra = n.next() % (jitter.as_micros() as u64).max(1);
                Some(base + Duration::from_micros(extra))
            }
            Some((base, _)) => Some(base),
            None => None,
        };
        Some((inbox, delay))
    }

    fn deliver_later(&self, at: Instant, inbox: Inbox, msg: Message) {
        let mut q = lock(&self.inner.queue);
        q.seq += 1;
        let seq = q.seq;
        q.heap.push(Reverse(Pending {
            at,
            seq,
            inbox,
            msg,
        }));
        if !q.running {
            q.running = true;
            let weak = Arc::downgrade(&self.inner);
            let spawned = std::thread::Builder::new()
                .name("local-net".into())
                .spawn(move || deliver_loop(weak));
            if spawned.is_err() {
                q.running = false;
            }
        }
        drop(q);
        self.inner.wake.notify_one();
    }
}

/// The delivery thread: hands each delayed message over when its time comes; ends when
/// the network is gone.
fn deliver_loop(weak: Weak<Inner>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let mut due = Vec::new();
        {
            let mut q = lock(&inner.queue);
            let now = Instant::now();
            while q.heap.peek().is_some_and(|p| p.0.at <= now) {
                if let Some(Reverse(p)) = q.heap.pop() {
                    due.push(p);
                }
            }
            if due.is_empty() {
                let wait = q
                    .heap
                    .peek()
                    .map_or(IDLE_CHECK, |p| p.0.at.saturating_duration_since(now))
                    .min(IDLE_CHECK);
                let _ = inner
                    .wake
                    .wait_timeout(q, wait)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
        drop(inner);
        for p in due {
            p.inbox.step(p.msg);
        }
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
            let Some((inbox, delay)) = self.net.route(self.id, m.to, true) else {
                continue;
            };
            match delay {
                None => inbox.step(m),
                Some(d) => self.net.deliver_later(Instant::now() + d, inbox, m),
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
                    let (target, _) = net.route(from, to, false)?;
                    let mut w = target.import_snapshot().ok()?;
                    let mut r = file.raw_reader().ok()?;
                    std::io::copy(&mut r, &mut w).ok()?;
                    w.flush().ok()?;
                    let f = w.finish().ok()?;
                    // A link cut while the file travelled loses it.
                    net.route(from, to, false)?;
                    target.install_snapshot_blocking(msg, f).ok()
                })()
                .is_some();
                let me = net.lock().inboxes.get(&from).cloned();
                if let Some(me) = me {
                    me.snapshot_status(to, delivered);
                }
            });
    }

    fn fetch_attributes(&self, url: &str) -> AttributesFuture {
        let found = {
            let n = self.net.lock();
            n.attributes
                .get(url)
                .filter(|(to, _)| {
                    !n.cut.contains(&(self.id, *to)) && !n.cut.contains(&(*to, self.id))
                })
                .map(|(_, a)| a.clone())
        };
        let url = url.to_string();
        Box::pin(async move {
            match found {
                Some(a) => Ok(a()),
                None => Err(Error::Peer {
                    url,
                    reason: "unreachable".into(),
                }),
            }
        })
    }
}
