//! The verdict on one recorded run, shared by the process-level robustness scenarios
//! and the in-process simulation: the reference watcher's events become the reference
//! log, every watcher is checked against it for etcd's watch guarantees
//! ([`watchcheck::check`]), and the KV history against the store model with revisions
//! ([`history::check`]).

use crate::history::{self, Record, Reply, Request};
use crate::traffic::{self, PREFIX};
use crate::watchcheck::{self, KeyRange, ReferenceLog, ResponseKind, WatcherHistory};

/// What the checkers found.
#[derive(Debug, Default, Clone)]
pub struct Verdict {
    pub ops: usize,
    pub known: usize,
    pub watch_events: usize,
    pub violations: Vec<String>,
    /// The reference log's events (for dumping a failed run).
    pub events: Vec<watchcheck::WatchEvent>,
}

/// Judges a run: `history` of the clients, the `reference` watcher (from revision 1
/// over [`PREFIX`]) and `others`, all of which ran until the final write `marker`
/// (a put of `end` to key 0) or, for `missing`, failed to reach it.
pub fn judge(
    mut history: Vec<Record>,
    reference: WatcherHistory,
    others: Vec<WatcherHistory>,
    marker: i64,
    missing: Option<i64>,
) -> Verdict {
    let mut out = Verdict::default();
    if let Some(t) = missing {
        out.violations
            .push(format!("a watcher did not reach revision {t}"));
    }
    history.push(Record {
        client: usize::MAX,
        request: Request::Put {
            key: traffic::key(0),
            value: "end".into(),
            lease: 0,
        },
        reply: Reply::Put { revision: marker },
        invoke: u64::MAX - 1,
        complete: u64::MAX - 1,
    });
    // The reference log: the reference watcher's events, deduplicated by revision
    // (a duplicate is reported by the watch check).
    let mut events = Vec::new();
    let mut last = 0;
    for s in &reference.sessions {
        for r in &s.responses {
            if let ResponseKind::Events(evs) = &r.kind {
                for e in evs {
                    if e.mod_revision > last || (e.mod_revision == last && !events.contains(e)) {
                        last = e.mod_revision;
                        events.push(e.clone());
                    }
                }
            }
        }
    }
    let log = ReferenceLog {
        range: KeyRange::prefix(PREFIX),
        from_revision: 1,
        through_revision: marker,
        events: events.clone(),
    };
    for e in log.validate() {
        out.violations.push(format!("reference: {e}"));
    }
    let mut watches = vec![reference];
    watches.extend(others);
    let wr = watchcheck::check(&watches, &log);
    out.watch_events = wr.events_checked;
    out.violations
        .extend(wr.violations.iter().map(ToString::to_string));
    let hr = history::check(&history, &events);
    out.ops = hr.ops;
    out.known = hr.known;
    out.violations
        .extend(hr.violations.iter().map(ToString::to_string));
    out.events = events;
    out
}
