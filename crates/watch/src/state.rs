//! The hub's state under one lock: watchers (synced ones indexed by key and range),
//! streams with their bounded outboxes, and the catch-up queue.

use crate::*;

pub(crate) struct Watcher {
    pub(crate) stream: u64,
    pub(crate) id: i64,
    pub(crate) key: Vec<u8>,
    /// `None` watches `key` alone.
    pub(crate) end: Option<End>,
    /// The lowest revision not yet queued for this watcher.
    pub(crate) next_rev: i64,
    pub(crate) synced: bool,
    pub(crate) prev_kv: bool,
    pub(crate) progress_notify: bool,
    pub(crate) no_put: bool,
    pub(crate) no_delete: bool,
    pub(crate) fragment: bool,
    /// An event response was queued since the last progress tick.
    pub(crate) sent: bool,
}

impl Watcher {
    pub(crate) fn contains(&self, key: &[u8]) -> bool {
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

    pub(crate) fn wants(&self, e: &Event) -> bool {
        match e.kind {
            EventKind::Put => !self.no_put,
            EventKind::Delete => !self.no_delete,
        }
    }

    pub(crate) fn events_response(&self, revision: i64, events: Arc<[Event]>) -> Response {
        Response::Events {
            watch_id: self.id,
            revision,
            events,
            fragment: self.fragment,
            prev_kv: self.prev_kv,
        }
    }
}

pub(crate) struct StreamState {
    pub(crate) outbox: Arc<Outbox>,
    /// watch id -> watcher key.
    pub(crate) ids: HashMap<i64, u64>,
    pub(crate) next_id: i64,
    pub(crate) unsynced: usize,
    pub(crate) progress_pending: bool,
}

pub(crate) struct State {
    pub(crate) current: i64,
    pub(crate) next_watcher: u64,
    pub(crate) next_stream: u64,
    pub(crate) watchers: HashMap<u64, Watcher>,
    pub(crate) singles: HashMap<Vec<u8>, HashSet<u64>>,
    pub(crate) ranges: IntervalMap,
    pub(crate) unsynced: BTreeSet<u64>,
    pub(crate) streams: HashMap<u64, StreamState>,
}

impl State {
    /// Moves a synced watcher aside.
    pub(crate) fn unsync(&mut self, w: u64) {
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
        self.record_gauges();
    }

    /// Puts an unsynced watcher (whose `next_rev` is past the current revision) back
    /// into the index, and answers a `RequestProgress` that waited for it.
    pub(crate) fn sync(&mut self, w: u64) {
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
        let stream = watcher.stream;
        self.record_gauges();
        if let Some(s) = self.streams.get_mut(&stream) {
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
    pub(crate) fn remove(&mut self, w: u64) -> Option<(i64, Arc<Outbox>)> {
        self.unsync(w);
        let watcher = self.watchers.remove(&w)?;
        self.unsynced.remove(&w);
        self.record_gauges();
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

pub(crate) struct Queue {
    pub(crate) items: VecDeque<Response>,
    pub(crate) bytes: usize,
    pub(crate) events: usize,
    pub(crate) closed: bool,
}

/// A stream's queue of responses. Event responses are bounded; control responses
/// (created, cancelled, progress) are not, but the RPC layer waits for
/// [`WatchStream::writable`] before taking the next client request.
pub(crate) struct Outbox {
    pub(crate) q: Mutex<Queue>,
    pub(crate) ready: tokio::sync::Notify,
    pub(crate) space: tokio::sync::Notify,
    pub(crate) max_responses: usize,
    pub(crate) max_bytes: usize,
}

impl Outbox {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Queue> {
        self.q.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn has_room(&self) -> bool {
        let q = self.lock();
        q.events < self.max_responses && q.bytes < self.max_bytes
    }

    /// Queues an event response if the stream has room (an empty queue always does).
    pub(crate) fn try_push_events(&self, r: Response) -> bool {
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

    pub(crate) fn push_control(&self, r: Response) {
        self.lock().items.push_back(r);
        self.ready.notify_one();
    }

    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
    }
}

pub(crate) struct Shared {
    pub(crate) state: Mutex<State>,
    pub(crate) history: Arc<dyn History>,
    pub(crate) options: HubOptions,
    pub(crate) kick: Mutex<bool>,
    pub(crate) kicked: Condvar,
    pub(crate) stop: std::sync::atomic::AtomicBool,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn kick(&self) {
        *self.kick.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.kicked.notify_one();
    }
}
