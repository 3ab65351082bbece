//! [`Hub`]: the registry every stream and every committed revision goes through.

use crate::*;

/// The registry of every watcher on one store. Dropping it stops its catch-up thread.
pub struct Hub {
    pub(crate) shared: Arc<Shared>,
    pub(crate) syncer: Option<thread::JoinHandle<()>>,
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
        // Counted once per revision, not per watcher: this is the fan-out's hot loop.
        let mut sent = 0;
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
            let n = evs.len();
            if stream
                .outbox
                .try_push_events(watcher.events_response(revision, evs))
            {
                sent += n;
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
        crate::metrics::sent(sent);
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
        st.record_gauges();
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
