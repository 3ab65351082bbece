//! # concord-watch
//!
//! etcd's watch machinery as a reusable hub: watchers on single keys and key ranges,
//! grouped in client streams, fed the events of each committed revision, caught up from
//! history when they start in the past or fall behind, and told about progress.
//!
//! Owns: the watcher registry ([`Hub`]), the per-stream outbox ([`WatchStream`]), the
//! rules that give etcd's guarantees, and the catch-up thread.
//!
//! Not: storage, RPC or protobuf. The store behind it implements [`History`] (events
//! between two revisions, a key's value at a revision); the code that commits writes
//! calls [`Hub::publish`] once per revision, in revision order; an RPC layer turns
//! [`Response`]s into wire messages.
//!
//! ## How the guarantees are kept
//!
//! * A watcher is either **synced** (it has every matching event up to the hub's current
//!   revision queued, and is in the key index, so [`Hub::publish`] feeds it) or
//!   **unsynced** (it is owed events from `next_rev` on and the catch-up thread reads
//!   them from [`History`]). New watchers starting at or before the current revision
//!   begin unsynced.
//! * Each stream has a bounded outbox. When [`Hub::publish`] finds a watcher's outbox
//!   full, the watcher is moved aside (unsynced, `next_rev` = that revision) instead of
//!   waiting, so a client that never reads slows neither writes nor other streams, and
//!   the memory it pins is bounded by the outbox limits. It is caught up from history,
//!   in order, once its client reads again.
//! * All events of one revision that match a watcher go into one response (atomic);
//!   catch-up responses end at revision boundaries. Responses of a watcher are queued in
//!   revision order and `next_rev` only moves forward (ordered, unique, reliable).
//! * Progress (per-watcher `progress_notify` and a stream's `RequestProgress`) is only
//!   reported for synced watchers, at the hub's current revision, so a bookmark at `R`
//!   means every event up to `R` was queued before it. A stream's `RequestProgress` with
//!   unsynced watchers is answered as soon as they are all synced.
//! * A watcher owed events older than the history's compaction point is cancelled with
//!   the compaction revision, as etcd does.

mod interval;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

pub use interval::{End, IntervalMap};

/// A key's state, as etcd's `mvccpb.KeyValue`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    pub value: Vec<u8>,
    pub lease: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change. A delete carries only the key and its `mod_revision` (the deleting
/// revision), as in etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub kv: KeyValue,
    pub prev_kv: Option<KeyValue>,
}

impl Event {
    fn revision(&self) -> i64 {
        self.kv.mod_revision
    }

    fn size(&self) -> usize {
        48 + self.kv.key.len() + self.kv.value.len()
    }

    /// A put that created the key (no previous version to report).
    fn is_create(&self) -> bool {
        self.kind == EventKind::Put && self.kv.version == 1
    }
}

/// Why [`History::events`] could not answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HistoryError {
    /// `from` is below the oldest revision kept; the payload is that revision.
    Compacted(i64),
    Failed(String),
}

/// What the hub needs from the store.
pub trait History: Send + Sync + 'static {
    /// Every event with a revision in `from..=to`, in revision order (and change order
    /// within a revision), without `prev_kv`. May stop early, but only at the end of a
    /// revision, once `max_events` or `max_bytes` is reached.
    fn events(
        &self,
        from: i64,
        to: i64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Vec<Event>, HistoryError>;

    /// `key` as it was at `revision`, if it existed and that revision is still kept.
    fn value_at(&self, key: &[u8], revision: i64) -> Option<KeyValue>;
}

/// Tuning. The defaults suit a server; tests shrink the outbox.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// How often watchers created with `progress_notify` get an empty response if no
    /// event was sent to them since the last one (etcd: 10 minutes).
    pub progress_notify_interval: Duration,
    /// Event responses a stream may have queued before its watchers are moved aside.
    pub max_queued_responses: usize,
    /// Event bytes a stream may have queued before its watchers are moved aside.
    pub max_queued_bytes: usize,
    /// Events read from history per catch-up step.
    pub catch_up_events: usize,
    /// Bytes read from history per catch-up step.
    pub catch_up_bytes: usize,
}

impl Default for HubOptions {
    fn default() -> Self {
        HubOptions {
            progress_notify_interval: Duration::from_secs(600),
            max_queued_responses: 256,
            max_queued_bytes: 4 << 20,
            catch_up_events: 1000,
            // etcd bounds a catch-up response by revisions only (1000); the byte bound
            // keeps one slow watcher's page from pinning unbounded memory.
            catch_up_bytes: 8 << 20,
        }
    }
}

/// What a client asks to watch, in etcd's terms.
#[derive(Debug, Clone, Default)]
pub struct WatchSpec {
    /// 0 lets the stream pick the id (the lowest unused one, counting from 0).
    pub watch_id: i64,
    pub key: Vec<u8>,
    /// Empty: just `key`; `[0]`: every key `>= key`; else `[key, range_end)`.
    pub range_end: Vec<u8>,
    /// First revision to report; 0 is "the current revision + 1".
    pub start_revision: i64,
    pub prev_kv: bool,
    pub progress_notify: bool,
    pub no_put: bool,
    pub no_delete: bool,
    /// Passed back in [`Response::Events`] for the RPC layer.
    pub fragment: bool,
}

/// etcd's text for a create that reuses an id on the stream.
pub const ERR_DUPLICATE_ID: &str = "mvcc: duplicate watch ID provided on the WatchStream";
/// etcd's text for a range that selects nothing.
pub const ERR_EMPTY_RANGE: &str = "mvcc: watcher range is empty";

/// What a stream sends its client, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Created {
        watch_id: i64,
        revision: i64,
    },
    /// The create was refused (`watch_id` is -1 as in etcd).
    CreateFailed {
        watch_id: i64,
        revision: i64,
        reason: String,
    },
    /// Shared between the watchers that got the same events (the common case of a
    /// revision fanned out unchanged), so publishing copies no keys or values.
    Events {
        watch_id: i64,
        revision: i64,
        events: Arc<[Event]>,
        fragment: bool,
        /// The watcher asked for `prev_kv` (filled in by [`WatchStream::next`]).
        prev_kv: bool,
    },
    /// A bookmark: `watch_id` is -1 for a stream-wide `RequestProgress` answer.
    Progress {
        watch_id: i64,
        revision: i64,
    },
    Canceled {
        watch_id: i64,
        revision: i64,
        /// Set when the watcher was owed compacted history.
        compact_revision: i64,
    },
}

impl Response {
    fn size(&self) -> usize {
        match self {
            Response::Events { events, .. } => events.iter().map(Event::size).sum(),
            _ => 0,
        }
    }
}

struct Watcher {
    stream: u64,
    id: i64,
    key: Vec<u8>,
    /// `None` watches `key` alone.
    end: Option<End>,
    /// The lowest revision not yet queued for this watcher.
    next_rev: i64,
    synced: bool,
    prev_kv: bool,
    progress_notify: bool,
    no_put: bool,
    no_delete: bool,
    fragment: bool,
    /// An event response was queued since the last progress tick.
    sent: bool,
}

impl Watcher {
    fn contains(&self, key: &[u8]) -> bool {
        match &self.end {
            None => key == self.key.as_slice(),
            Some(end) => {
                key >= self.key.as_slice()
                    && match end {
                        End::Before(e) => key < e.as_slice(),
                        End::Unbounded => true,
                    }
            }
        }
    }

    fn wants(&self, e: &Event) -> bool {
        match e.kind {
            EventKind::Put => !self.no_put,
            EventKind::Delete => !self.no_delete,
        }
    }

    fn events_response(&self, revision: i64, events: Arc<[Event]>) -> Response {
        Response::Events {
            watch_id: self.id,
            revision,
            events,
            fragment: self.fragment,
            prev_kv: self.prev_kv,
        }
    }
}

struct StreamState {
    outbox: Arc<Outbox>,
    /// watch id -> watcher key.
    ids: HashMap<i64, u64>,
    next_id: i64,
    unsynced: usize,
    progress_pending: bool,
}

struct State {
    current: i64,
    next_watcher: u64,
    next_stream: u64,
    watchers: HashMap<u64, Watcher>,
    singles: HashMap<Vec<u8>, HashSet<u64>>,
    ranges: IntervalMap,
    unsynced: BTreeSet<u64>,
    streams: HashMap<u64, StreamState>,
}

impl State {
    /// Moves a synced watcher aside.
    fn unsync(&mut self, w: u64) {
        let Some(watcher) = self.watchers.get_mut(&w) else {
            return;
        };
        if !watcher.synced {
            return;
        }
        watcher.synced = false;
        match &watcher.end {
            None => {
                if let Some(set) = self.singles.get_mut(&watcher.key) {
                    set.remove(&w);
                    if set.is_empty() {
                        self.singles.remove(&watcher.key);
                    }
                }
            }
            Some(end) => self.ranges.remove(&watcher.key, end, w),
        }
        self.unsynced.insert(w);
        if let Some(s) = self.streams.get_mut(&watcher.stream) {
            s.unsynced += 1;
        }
    }

    /// Puts an unsynced watcher (whose `next_rev` is past the current revision) back
    /// into the index, and answers a `RequestProgress` that waited for it.
    fn sync(&mut self, w: u64) {
        let current = self.current;
        let Some(watcher) = self.watchers.get_mut(&w) else {
            return;
        };
        if watcher.synced {
            return;
        }
        watcher.synced = true;
        match &watcher.end {
            None => {
                self.singles
                    .entry(watcher.key.clone())
                    .or_default()
                    .insert(w);
            }
            Some(end) => self.ranges.insert(&watcher.key, end, w),
        }
        self.unsynced.remove(&w);
        if let Some(s) = self.streams.get_mut(&watcher.stream) {
            s.unsynced -= 1;
            if s.unsynced == 0 && s.progress_pending {
                s.progress_pending = false;
                s.outbox.push_control(Response::Progress {
                    watch_id: -1,
                    revision: current,
                });
            }
        }
    }

    /// Removes a watcher entirely; returns its stream's outbox.
    fn remove(&mut self, w: u64) -> Option<(i64, Arc<Outbox>)> {
        self.unsync(w);
        let watcher = self.watchers.remove(&w)?;
        self.unsynced.remove(&w);
        let current = self.current;
        let s = self.streams.get_mut(&watcher.stream)?;
        s.unsynced -= 1;
        s.ids.remove(&watcher.id);
        if s.unsynced == 0 && s.progress_pending {
            // The last watcher a `RequestProgress` waited for is gone.
            s.progress_pending = false;
            s.outbox.push_control(Response::Progress {
                watch_id: -1,
                revision: current,
            });
        }
        Some((watcher.id, s.outbox.clone()))
    }
}

struct Queue {
    items: VecDeque<Response>,
    bytes: usize,
    events: usize,
    closed: bool,
}

/// A stream's queue of responses. Event responses are bounded; control responses
/// (created, cancelled, progress) are not, but the RPC layer waits for
/// [`WatchStream::writable`] before taking the next client request.
struct Outbox {
    q: Mutex<Queue>,
    ready: tokio::sync::Notify,
    space: tokio::sync::Notify,
    max_responses: usize,
    max_bytes: usize,
}

impl Outbox {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.q.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn has_room(&self) -> bool {
        let q = self.lock();
        q.events < self.max_responses && q.bytes < self.max_bytes
    }

    /// Queues an event response if the stream has room (an empty queue always does).
    fn try_push_events(&self, r: Response) -> bool {
        let size = r.size();
        let mut q = self.lock();
        if q.events > 0 && (q.events >= self.max_responses || q.bytes + size > self.max_bytes) {
            return false;
        }
        q.bytes += size;
        q.events += 1;
        q.items.push_back(r);
        drop(q);
        self.ready.notify_one();
        true
    }

    fn push_control(&self, r: Response) {
        self.lock().items.push_back(r);
        self.ready.notify_one();
    }

    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
    }
}

struct Shared {
    state: Mutex<State>,
    history: Arc<dyn History>,
    options: HubOptions,
    kick: Mutex<bool>,
    kicked: Condvar,
    stop: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn kick(&self) {
        *self.kick.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.kicked.notify_one();
    }
}

/// The registry of every watcher on one store. Dropping it stops its catch-up thread.
pub struct Hub {
    shared: Arc<Shared>,
    syncer: Option<thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.shared.lock();
        f.debug_struct("Hub")
            .field("current", &st.current)
            .field("watchers", &st.watchers.len())
            .field("unsynced", &st.unsynced.len())
            .finish()
    }
}

impl Hub {
    /// A hub over `history`, whose newest revision is `current`.
    pub fn new(history: Arc<dyn History>, current: i64, options: HubOptions) -> Hub {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                current,
                next_watcher: 0,
                next_stream: 0,
                watchers: HashMap::new(),
                singles: HashMap::new(),
                ranges: IntervalMap::default(),
                unsynced: BTreeSet::new(),
                streams: HashMap::new(),
            }),
            history,
            options,
            kick: Mutex::new(false),
            kicked: Condvar::new(),
            stop: std::sync::atomic::AtomicBool::new(false),
        });
        let s = shared.clone();
        let syncer = thread::Builder::new()
            .name("watch-sync".into())
            .spawn(move || sync_loop(&s))
            .expect("spawning the watch catch-up thread");
        Hub {
            shared,
            syncer: Some(syncer),
        }
    }

    /// The newest revision published.
    pub fn current_revision(&self) -> i64 {
        self.shared.lock().current
    }

    /// Number of watchers, and how many of them are unsynced.
    pub fn watcher_counts(&self) -> (usize, usize) {
        let st = self.shared.lock();
        (st.watchers.len(), st.unsynced.len())
    }

    /// Hands the events of one committed revision to the watchers. Call once per
    /// revision, in order, after the revision is readable from [`History`]. Never
    /// blocks on a client.
    pub fn publish(&self, revision: i64, events: &[Event]) {
        let mut st = self.shared.lock();
        if revision <= st.current {
            return;
        }
        st.current = revision;
        // (watcher, event index) pairs, grouped by watcher with events in order.
        let mut hits: Vec<(u64, usize)> = Vec::new();
        for (i, e) in events.iter().enumerate() {
            let single = st.singles.get(&e.kv.key).into_iter().flatten().copied();
            for w in single.chain(st.ranges.stab(&e.kv.key)) {
                hits.push((w, i));
            }
        }
        if hits.is_empty() {
            return;
        }
        hits.sort_unstable();
        let all: Arc<[Event]> = events.into();
        let mut aside = Vec::new();
        for group in hits.chunk_by(|a, b| a.0 == b.0) {
            let w = group[0].0;
            let State {
                watchers, streams, ..
            } = &mut *st;
            let Some(watcher) = watchers.get_mut(&w) else {
                continue;
            };
            if revision < watcher.next_rev {
                continue;
            }
            let evs: Arc<[Event]> =
                if group.len() == all.len() && all.iter().all(|e| watcher.wants(e)) {
                    all.clone()
                } else {
                    group
                        .iter()
                        .map(|&(_, i)| &events[i])
                        .filter(|e| watcher.wants(e))
                        .cloned()
                        .collect()
                };
            if evs.is_empty() {
                continue;
            }
            let Some(stream) = streams.get(&watcher.stream) else {
                continue;
            };
            if stream
                .outbox
                .try_push_events(watcher.events_response(revision, evs))
            {
                watcher.next_rev = revision + 1;
                watcher.sent = true;
            } else {
                watcher.next_rev = revision;
                aside.push(w);
            }
        }
        let moved = !aside.is_empty();
        for w in aside {
            st.unsync(w);
        }
        drop(st);
        if moved {
            self.shared.kick();
        }
    }

    /// The store jumped to `current` without publishing the revisions in between (a
    /// snapshot was installed): every watcher catches up from history.
    pub fn resync(&self, current: i64) {
        let mut st = self.shared.lock();
        let old = st.current;
        let synced: Vec<u64> = st
            .watchers
            .iter()
            .filter(|(_, w)| w.synced)
            .map(|(k, _)| *k)
            .collect();
        for w in synced {
            if let Some(watcher) = st.watchers.get_mut(&w) {
                watcher.next_rev = watcher.next_rev.max(old + 1);
            }
            st.unsync(w);
        }
        st.current = st.current.max(current);
        drop(st);
        self.shared.kick();
    }

    /// Opens a client stream.
    pub fn stream(&self) -> WatchStream {
        let o = &self.shared.options;
        let outbox = Arc::new(Outbox {
            q: Mutex::new(Queue {
                items: VecDeque::new(),
                bytes: 0,
                events: 0,
                closed: false,
            }),
            ready: tokio::sync::Notify::new(),
            space: tokio::sync::Notify::new(),
            max_responses: o.max_queued_responses.max(1),
            max_bytes: o.max_queued_bytes.max(1),
        });
        let mut st = self.shared.lock();
        let id = st.next_stream;
        st.next_stream += 1;
        st.streams.insert(
            id,
            StreamState {
                outbox: outbox.clone(),
                ids: HashMap::new(),
                next_id: 0,
                unsynced: 0,
                progress_pending: false,
            },
        );
        WatchStream {
            shared: self.shared.clone(),
            id,
            outbox,
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.shared
            .stop
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.shared.kick();
        if let Some(t) = self.syncer.take() {
            let _ = t.join();
        }
    }
}

/// One client's watch stream: watchers created on it and the responses owed to it.
/// Dropping it cancels its watchers.
pub struct WatchStream {
    shared: Arc<Shared>,
    id: u64,
    outbox: Arc<Outbox>,
}

impl std::fmt::Debug for WatchStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchStream").field("id", &self.id).finish()
    }
}

fn parse_end(range_end: &[u8]) -> Option<End> {
    match range_end {
        [] => None,
        [0] => Some(End::Unbounded),
        e => Some(End::Before(e.to_vec())),
    }
}

impl WatchStream {
    /// Creates a watcher; its `Created` (or `CreateFailed`) response is queued before
    /// any of its events. Returns the watch id, or `None` if refused.
    pub fn create(&self, spec: WatchSpec) -> Option<i64> {
        let end = parse_end(&spec.range_end);
        let mut guard = self.shared.lock();
        let st = &mut *guard;
        let current = st.current;
        let refuse = |reason: &str| Response::CreateFailed {
            watch_id: -1,
            revision: current,
            reason: reason.to_string(),
        };
        if let Some(End::Before(e)) = &end
            && spec.key.as_slice() >= e.as_slice()
        {
            self.outbox.push_control(refuse(ERR_EMPTY_RANGE));
            return None;
        }
        let stream = st.streams.get_mut(&self.id)?;
        let id = if spec.watch_id == 0 {
            while stream.ids.contains_key(&stream.next_id) {
                stream.next_id += 1;
            }
            let id = stream.next_id;
            stream.next_id += 1;
            id
        } else if stream.ids.contains_key(&spec.watch_id) {
            self.outbox.push_control(refuse(ERR_DUPLICATE_ID));
            return None;
        } else {
            spec.watch_id
        };
        let key = st.next_watcher;
        st.next_watcher += 1;
        stream.ids.insert(id, key);
        stream.unsynced += 1;
        let start = if spec.start_revision > 0 {
            spec.start_revision
        } else {
            current + 1
        };
        st.watchers.insert(
            key,
            Watcher {
                stream: self.id,
                id,
                key: spec.key,
                end,
                next_rev: start,
                synced: false,
                prev_kv: spec.prev_kv,
                progress_notify: spec.progress_notify,
                no_put: spec.no_put,
                no_delete: spec.no_delete,
                fragment: spec.fragment,
                sent: false,
            },
        );
        st.unsynced.insert(key);
        self.outbox.push_control(Response::Created {
            watch_id: id,
            revision: current,
        });
        if start > current {
            st.sync(key);
        } else {
            drop(guard);
            self.shared.kick();
        }
        Some(id)
    }

    /// Cancels a watcher of this stream; `false` (and nothing queued) if there is none
    /// with that id, as in etcd.
    pub fn cancel(&self, watch_id: i64) -> bool {
        let mut st = self.shared.lock();
        let Some(key) = st
            .streams
            .get(&self.id)
            .and_then(|s| s.ids.get(&watch_id).copied())
        else {
            return false;
        };
        st.remove(key);
        let current = st.current;
        self.outbox.push_control(Response::Canceled {
            watch_id,
            revision: current,
            compact_revision: 0,
        });
        true
    }

    /// etcd's `RequestProgress`: a stream-wide bookmark (watch id -1) at the current
    /// revision, sent once every watcher of the stream is synced.
    pub fn request_progress(&self) {
        let mut st = self.shared.lock();
        let current = st.current;
        let Some(s) = st.streams.get_mut(&self.id) else {
            return;
        };
        if s.unsynced == 0 {
            self.outbox.push_control(Response::Progress {
                watch_id: -1,
                revision: current,
            });
        } else {
            s.progress_pending = true;
        }
    }

    /// Waits until the outbox is below its limit; the RPC layer calls this before
    /// reading the next client request, so a client that sends but never reads is
    /// held back by its own transport.
    pub async fn writable(&self) {
        loop {
            let waiting = self.outbox.space.notified();
            {
                let q = self.outbox.lock();
                if q.items.len() < self.outbox.max_responses || q.closed {
                    return;
                }
            }
            waiting.await;
        }
    }

    /// The next response, with `prev_kv` filled in where the watcher asked for it;
    /// `None` once the stream is closed.
    pub async fn next(&self) -> Option<Response> {
        loop {
            let item = {
                let mut q = self.outbox.lock();
                let was_full =
                    q.events >= self.outbox.max_responses || q.bytes >= self.outbox.max_bytes;
                match q.items.pop_front() {
                    Some(r) => {
                        if matches!(r, Response::Events { .. }) {
                            q.events -= 1;
                            q.bytes -= r.size();
                        }
                        Some((r, was_full))
                    }
                    None if q.closed => return None,
                    None => None,
                }
            };
            match item {
                Some((r, was_full)) => {
                    self.outbox.space.notify_one();
                    if was_full {
                        // Watchers moved aside while the outbox was full can be caught
                        // up now; otherwise the catch-up thread's periodic pass suffices
                        // and the fan-out path stays free of wake-ups.
                        self.shared.kick();
                    }
                    return Some(self.with_prev_kv(r));
                }
                None => self.outbox.ready.notified().await,
            }
        }
    }

    fn with_prev_kv(&self, r: Response) -> Response {
        let Response::Events {
            watch_id,
            revision,
            events,
            fragment,
            prev_kv: true,
        } = r
        else {
            return r;
        };
        let mut events = events.to_vec();
        for e in events.iter_mut().filter(|e| !e.is_create()) {
            e.prev_kv = self.shared.history.value_at(&e.kv.key, e.revision() - 1);
        }
        Response::Events {
            watch_id,
            revision,
            events: events.into(),
            fragment,
            prev_kv: true,
        }
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        let keys: Vec<u64> = st
            .streams
            .get(&self.id)
            .map(|s| s.ids.values().copied().collect())
            .unwrap_or_default();
        for k in keys {
            st.remove(k);
        }
        st.streams.remove(&self.id);
        drop(st);
        self.outbox.close();
    }
}

// ---------------------------------------------------------------------------------
// The catch-up thread.

/// How often unsynced watchers are retried without being kicked (etcd: 100 ms).
const SYNC_PERIOD: Duration = Duration::from_millis(100);

fn sync_loop(shared: &Shared) {
    let period = shared.options.progress_notify_interval;
    let mut next_progress = Instant::now() + period;
    loop {
        {
            let mut k = shared.kick.lock().unwrap_or_else(|e| e.into_inner());
            if !*k {
                let wait = SYNC_PERIOD.min(next_progress.saturating_duration_since(Instant::now()));
                k = shared
                    .kicked
                    .wait_timeout(k, wait)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            *k = false;
        }
        if shared.stop.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        if Instant::now() >= next_progress {
            progress_tick(shared);
            next_progress = Instant::now() + period;
        }
        // Keep going while there is work the clients can take.
        for _ in 0..64 {
            if !sync_round(shared) {
                break;
            }
        }
    }
}

/// Per-watcher progress notifications: synced watchers that asked for them and were
/// sent nothing since the last tick get an empty response at the current revision.
fn progress_tick(shared: &Shared) {
    let mut guard = shared.lock();
    let st = &mut *guard;
    let current = st.current;
    for w in st.watchers.values_mut() {
        if !w.progress_notify || !w.synced {
            continue;
        }
        if std::mem::take(&mut w.sent) {
            continue;
        }
        // A client that is not reading gets no more of these than fit its outbox.
        if let Some(s) = st.streams.get(&w.stream)
            && s.outbox.lock().items.len() < s.outbox.max_responses
        {
            s.outbox.push_control(Response::Progress {
                watch_id: w.id,
                revision: current,
            });
        }
    }
}

struct Candidate {
    key: u64,
    next_rev: i64,
}

/// One catch-up step for every unsynced watcher whose client has room. Returns true
/// if it moved something.
fn sync_round(shared: &Shared) -> bool {
    let (cands, to) = {
        let st = shared.lock();
        let cands: Vec<Candidate> = st
            .unsynced
            .iter()
            .filter_map(|k| {
                let w = st.watchers.get(k)?;
                let room = st.streams.get(&w.stream)?.outbox.has_room();
                room.then_some(Candidate {
                    key: *k,
                    next_rev: w.next_rev,
                })
            })
            .collect();
        (cands, st.current)
    };
    let Some(from) = cands.iter().map(|c| c.next_rev).min() else {
        return false;
    };
    if from > to {
        // Only watchers of future revisions: they are synced as they are.
        let mut st = shared.lock();
        for c in &cands {
            if st
                .watchers
                .get(&c.key)
                .is_some_and(|w| w.next_rev > st.current)
            {
                st.sync(c.key);
            }
        }
        return false;
    }
    let o = &shared.options;
    let events = match shared
        .history
        .events(from, to, o.catch_up_events, o.catch_up_bytes)
    {
        Ok(e) => e,
        Err(HistoryError::Compacted(at)) => {
            let mut st = shared.lock();
            for c in &cands {
                let owed = st.watchers.get(&c.key).is_some_and(|w| w.next_rev < at);
                if owed && let Some((watch_id, outbox)) = st.remove(c.key) {
                    outbox.push_control(Response::Canceled {
                        watch_id,
                        revision: 0,
                        compact_revision: at,
                    });
                }
            }
            return true;
        }
        Err(HistoryError::Failed(why)) => {
            tracing::warn!(error = %why, "watch catch-up: reading history failed; retrying");
            return false;
        }
    };
    let full = events.len() >= o.catch_up_events
        || events.iter().map(Event::size).sum::<usize>() >= o.catch_up_bytes;
    let covered = match events.last() {
        Some(e) if full => e.revision(),
        _ => to,
    };
    let mut progressed = false;
    let mut guard = shared.lock();
    let st = &mut *guard;
    // As etcd, a catch-up response's header carries the current revision (not a
    // bookmark: only event-less progress responses are).
    let header_rev = st.current;
    for c in &cands {
        let Some(w) = st.watchers.get(&c.key) else {
            continue;
        };
        if w.synced || w.next_rev != c.next_rev {
            continue;
        }
        let evs: Vec<Event> = events
            .iter()
            .filter(|e| e.revision() >= w.next_rev && e.revision() <= covered)
            .filter(|e| w.contains(&e.kv.key) && w.wants(e))
            .cloned()
            .collect();
        if !evs.is_empty() {
            let Some(s) = st.streams.get(&w.stream) else {
                continue;
            };
            if !s
                .outbox
                .try_push_events(w.events_response(header_rev, evs.into()))
            {
                continue;
            }
            if let Some(w) = st.watchers.get_mut(&c.key) {
                w.sent = true;
            }
        }
        progressed = true;
        let current = st.current;
        let w = st.watchers.get_mut(&c.key).expect("looked up above");
        w.next_rev = covered + 1;
        if w.next_rev > current {
            st.sync(c.key);
        }
    }
    progressed
}

#[cfg(test)]
mod tests;
