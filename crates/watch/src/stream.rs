//! [`WatchStream`]: one client stream's watchers and outbox.

use crate::*;

/// One client's watch stream: watchers created on it and the responses owed to it.
/// Dropping it cancels its watchers.
pub struct WatchStream {
    pub(crate) shared: Arc<Shared>,
    pub(crate) id: u64,
    pub(crate) outbox: Arc<Outbox>,
}

impl std::fmt::Debug for WatchStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchStream").field("id", &self.id).finish()
    }
}

pub(crate) fn parse_end(range_end: &[u8]) -> Option<End> {
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
        st.record_gauges();
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

    pub(crate) fn with_prev_kv(&self, r: Response) -> Response {
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
        st.record_gauges();
        drop(st);
        self.outbox.close();
    }
}

// ---------------------------------------------------------------------------------
// The catch-up thread.
