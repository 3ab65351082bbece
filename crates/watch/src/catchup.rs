//! The catch-up thread: reads what unsynced watchers are owed from [`History`], sends
//! progress notifications, and answers `RequestProgress` once a stream is synced.

use crate::*;

/// How often unsynced watchers are retried without being kicked (etcd: 100 ms).
pub(crate) const SYNC_PERIOD: Duration = Duration::from_millis(100);

pub(crate) fn sync_loop(shared: &Shared) {
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
pub(crate) fn progress_tick(shared: &Shared) {
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

pub(crate) struct Candidate {
    pub(crate) key: u64,
    pub(crate) next_rev: i64,
}

/// One catch-up step for every unsynced watcher whose client has room. Returns true
/// if it moved something.
pub(crate) fn sync_round(shared: &Shared) -> bool {
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
            let n = evs.len();
            if !s
                .outbox
                .try_push_events(w.events_response(header_rev, evs.into()))
            {
                continue;
            }
            crate::metrics::sent(n);
            if let Some(w) = st.watchers.get_mut(&c.key) {
                w.sent = true;
            }
        }
        progressed = true;
        let current = st.current;
        let w = st.watchers.get_mut(&c.key).expect("looked up above");
        // A watcher whose start revision is past what this round read (it was moved
        // aside with the others when a snapshot was installed) keeps its start.
        w.next_rev = w.next_rev.max(covered + 1);
        if w.next_rev > current {
            st.sync(c.key);
        }
    }
    progressed
}
