//! The verdict on one recorded run, shared by the process-level robustness scenarios
//! and the in-process simulation: the reference watcher's events become the reference
//! log, every watcher is checked against it for etcd's watch guarantees
//! ([`watchcheck::check`]), and the KV history against the store model with revisions
//! ([`history::check`]).

use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::history::{self, Record, Reply, Request};
use crate::traffic::{self, PREFIX};
use crate::watchcheck::{self, KeyRange, ReferenceLog, ResponseKind, WatcherHistory};
use crate::{RETRY_DEADLINE, retry_transient};

/// The two recording watchers every scenario runs: the reference (all of [`PREFIX`]
/// from revision 1, asking for progress, on the first endpoint first) and one on key 0
/// (on the last endpoint first). Both resume across faults until [`Watchers::finish`]
/// names the final write's revision.
pub struct Watchers {
    finish: tokio::sync::watch::Sender<Option<i64>>,
    reference: tokio::task::JoinHandle<(WatcherHistory, Option<i64>)>,
    key0: tokio::task::JoinHandle<(WatcherHistory, Option<i64>)>,
}

impl Watchers {
    pub fn spawn(endpoints: &[String], rng: &mut crate::Rng) -> Watchers {
        let (finish, finish_rx) = tokio::sync::watch::channel(None);
        let reference = tokio::spawn(crate::watchrec::watcher_loop(
            "reference",
            KeyRange::prefix(PREFIX),
            endpoints.to_vec(),
            0,
            1,
            finish_rx.clone(),
            true,
            rng.next_u64(),
        ));
        let key0 = tokio::spawn(crate::watchrec::watcher_loop(
            "key-0",
            KeyRange::single(traffic::key(0)),
            endpoints.to_vec(),
            endpoints.len() - 1,
            1,
            finish_rx,
            false,
            rng.next_u64(),
        ));
        Watchers {
            finish,
            reference,
            key0,
        }
    }

    /// Lets both run until they reach `marker` (or give up), then judges the run.
    pub async fn finish(self, history: &[Record], marker: i64) -> Result<Verdict> {
        self.finish.send(Some(marker))?;
        let (reference, ref_missing) = self.reference.await?;
        let (key0, key_missing) = self.key0.await?;
        Ok(judge(
            history,
            reference,
            vec![key0],
            marker,
            ref_missing.or(key_missing),
        ))
    }
}

/// How long the traffic's short leases may take to expire after the traffic stops.
const LEASES_GONE: Duration = Duration::from_secs(60);

/// What happens to the traffic's leases before the final write (their expiries must
/// not land after it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leftover {
    /// Wait until every lease has expired.
    Expire,
    /// Revoke every lease still there (each revoke recorded in the history).
    Revoke,
}

/// The run's last write, which every watcher must reach: once every lease of the
/// traffic has gone (`leftover`), `end-N` is put to key 0 through `endpoint`, retried
/// while the cluster settles, each attempt with its own value. Returns its revision
/// and the records of the revokes and of every attempt for the history (the failed
/// ones with an unknown outcome: they may have been applied).
pub async fn final_write(endpoint: &str, leftover: Leftover) -> Result<(i64, Vec<Record>)> {
    let mut records = Vec::new();
    if leftover == Leftover::Revoke {
        let ids: Vec<i64> = retry_transient(RETRY_DEADLINE, "listing leases", || async {
            let r = crate::connect(endpoint).await?.leases().await?;
            Ok(r.leases().iter().map(|l| l.id()).collect())
        })
        .await?;
        for lease in ids {
            let r = async {
                let mut c = crate::connect(endpoint).await?;
                anyhow::Ok(c.lease_revoke(lease).await?)
            };
            let reply = match r.await {
                Ok(r) => Reply::LeaseRevoke {
                    revision: r.header().map_or(0, |h| h.revision()),
                },
                Err(e) if e.to_string().contains("requested lease not found") => {
                    Reply::Failed(e.to_string())
                }
                Err(_) => Reply::Unknown,
            };
            records.push(Record {
                client: usize::MAX,
                request: Request::LeaseRevoke { lease },
                reply,
                invoke: u64::MAX - 2,
                complete: u64::MAX - 2,
            });
        }
    }
    traffic::wait_leases_gone(endpoint, LEASES_GONE).await?;
    let tried = Mutex::new(Vec::<String>::new());
    let marker = retry_transient(RETRY_DEADLINE, "the final write", || {
        let endpoint = endpoint.to_string();
        let value = {
            let mut tried = tried.lock().unwrap_or_else(|e| e.into_inner());
            let value = format!("end-{}", tried.len() + 1);
            tried.push(value.clone());
            value
        };
        async move {
            let r = crate::connect(&endpoint)
                .await?
                .put(traffic::key(0), value, None)
                .await?;
            Ok(r.header().map_or(0, |h| h.revision()))
        }
    })
    .await?;
    let mut tried = tried.into_inner().unwrap_or_else(|e| e.into_inner());
    let done = tried.pop().context("no final write attempted")?;
    let record = |value: String, reply| Record {
        client: usize::MAX,
        request: Request::Put {
            key: traffic::key(0),
            value,
            lease: 0,
        },
        reply,
        invoke: u64::MAX - 1,
        complete: u64::MAX - 1,
    };
    records.extend(tried.into_iter().map(|v| record(v, Reply::Unknown)));
    records.push(record(done, Reply::Put { revision: marker }));
    Ok((marker, records))
}

/// What the checkers found.
#[derive(Debug, Default, Clone)]
pub struct Verdict {
    pub ops: usize,
    pub known: usize,
    pub watch_events: usize,
    pub violations: Vec<String>,
    /// The reference log's events (for dumping a failed run).
    pub events: Vec<watchcheck::WatchEvent>,
    /// The checkers' summaries, for printing.
    pub watch_report: String,
    pub history_report: String,
}

/// Judges a run: `history` of the clients (with the [`final_write`] records), the
/// `reference` watcher (from revision 1 over [`PREFIX`]) and `others`, all of which
/// ran until the final write at `marker` or, for `missing`, failed to reach it.
pub fn judge(
    history: &[Record],
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
    out.watch_report = wr.to_string();
    out.watch_events = wr.events_checked;
    out.violations
        .extend(wr.violations.iter().map(ToString::to_string));
    let hr = history::check(history, &events);
    out.history_report = hr.to_string();
    out.ops = hr.ops;
    out.known = hr.known;
    out.violations
        .extend(hr.violations.iter().map(ToString::to_string));
    out.events = events;
    out
}
