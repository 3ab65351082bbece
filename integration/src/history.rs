//! # KV history checking against a model of etcd's store, revisions included
//!
//! The robustness runner records every client request as an [`Record`]: what was
//! asked ([`Request`]), what came back ([`Reply`], or [`Reply::Unknown`] when the
//! outcome is not known: timeout, broken connection, `Unavailable` on a write) and the
//! invoke / complete times. After the run, [`check`] compares the history with the
//! **reference log**: every event of every revision, as one watcher from revision 1
//! over all keys received them (its own correctness is checked separately by
//! [`crate::watchcheck`] and by being gap-free here).
//!
//! The reference fixes the order of all writes, so linearizability becomes a check
//! per operation instead of a search (etcd's robustness tests do the same: they
//! complete the history from watch events before checking it):
//!
//! * **Writes happened where they say** ([`Violation::LostWrite`]): an acknowledged put
//!   or txn at revision `r` is in the reference at `r` with exactly its changes; an
//!   acknowledged delete that deleted keys has its delete events at `r`.
//! * **Reads return the state at their revision** ([`Violation::WrongRead`]): a get or
//!   range (linearizable or serializable) at header revision `h` returns exactly the
//!   reference state at `h` for its range (keys, values, mod and create revisions,
//!   versions); a txn's compare outcome is the one the state at `r - 1` (writing txn)
//!   or `h` (failed txn) gives; a delete that deleted nothing saw no key.
//! * **Real time** ([`Violation::RealTime`], e.g. a stale read): each request gets a
//!   position in revision order (a write at `r`: `2r`; a read of the state at `h`:
//!   `2h + 1`); if A completed before B was invoked, `pos(A) <= pos(B)`. Serializable
//!   reads are exempt as B (they may be stale: consistent with *some* prefix), but
//!   they may never observe a write invoked after they completed.
//! * **No phantom writes** ([`Violation::Phantom`]): every put event in the reference
//!   carries a value some put or txn wrote (values are unique per run), invoked before
//!   anyone observed that revision; every delete event belongs to a delete, txn or
//!   lease revoke on that key (or a key that had a lease, which may expire).
//! * **Revisions are dense** ([`Violation::Reference`]): every revision from 2 to the
//!   last has an event (every write of the run is under the watched range; revision 1
//!   is the empty store).
//!
//! Unknown-outcome writes may or may not have happened: a put or txn whose value is in
//! the reference happened at that revision (and must not have been applied before it
//! was invoked); one whose value is not never happened. Unknown reads constrain
//! nothing.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use crate::watchcheck::{EventKind, WatchEvent};

/// A key-value pair as a read returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: String,
    pub mod_revision: i64,
    pub create_revision: i64,
    pub version: i64,
}

/// One write inside a txn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnWrite {
    Put { key: String, value: String },
    Delete { key: String },
}

/// What the client asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Keys in `[start, end)` (`end` empty: just `start`).
    Range {
        start: String,
        end: String,
        serializable: bool,
    },
    Put {
        key: String,
        value: String,
        lease: i64,
    },
    Delete {
        key: String,
    },
    /// If every `(key, expected value)` holds (`None`: key absent), do `then`.
    Txn {
        compares: Vec<(String, Option<String>)>,
        then: Vec<TxnWrite>,
    },
    LeaseRevoke {
        lease: i64,
    },
    Compact {
        revision: i64,
    },
}

/// What came back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Range {
        revision: i64,
        kvs: Vec<Kv>,
    },
    Put {
        revision: i64,
    },
    Delete {
        revision: i64,
        deleted: i64,
    },
    Txn {
        revision: i64,
        succeeded: bool,
    },
    LeaseRevoke {
        revision: i64,
    },
    Compact,
    /// Known not to have taken effect (e.g. a read refused as compacted, a revoke of a
    /// lease already gone).
    Failed(String),
    /// May or may not have taken effect.
    Unknown,
}

/// One request with its times (nanoseconds from the run's origin).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub client: usize,
    pub request: Request,
    pub reply: Reply,
    pub invoke: u64,
    pub complete: u64,
}

/// A broken guarantee; the `usize`s are indexes into the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    LostWrite {
        op: usize,
        detail: String,
    },
    WrongRead {
        op: usize,
        detail: String,
    },
    RealTime {
        before: usize,
        after: usize,
        detail: String,
    },
    Phantom {
        revision: i64,
        detail: String,
    },
    Reference(String),
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::LostWrite { op, detail } => write!(f, "lost write (op {op}): {detail}"),
            Violation::WrongRead { op, detail } => write!(f, "wrong read (op {op}): {detail}"),
            Violation::RealTime {
                before,
                after,
                detail,
            } => write!(
                f,
                "real-time order (op {before} completed before op {after} began): {detail}"
            ),
            Violation::Phantom { revision, detail } => {
                write!(f, "phantom write at revision {revision}: {detail}")
            }
            Violation::Reference(d) => write!(f, "reference log: {d}"),
        }
    }
}

/// The answer of [`check`].
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub ops: usize,
    pub known: usize,
    pub unknown: usize,
    /// Unknown-outcome writes found in the reference (they happened).
    pub unknown_applied: usize,
    pub reads_checked: usize,
    pub serializable_reads: usize,
    pub writes_checked: usize,
    pub revisions: i64,
    pub violations: Vec<Violation>,
}

impl Report {
    pub fn is_ok(&self) -> bool {
        self.violations.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ops ({} known, {} unknown, {} of those applied), {} reads ({} serializable) \
             and {} writes checked over {} revisions: ",
            self.ops,
            self.known,
            self.unknown,
            self.unknown_applied,
            self.reads_checked,
            self.serializable_reads,
            self.writes_checked,
            self.revisions
        )?;
        if self.violations.is_empty() {
            return f.write_str("ok");
        }
        writeln!(f, "{} violations", self.violations.len())?;
        for v in self.violations.iter().take(20) {
            writeln!(f, "  {v}")?;
        }
        Ok(())
    }
}

/// The reference as a function of revision.
struct Model<'a> {
    /// Per key: (revision, the event) in revision order.
    keys: BTreeMap<&'a str, Vec<(i64, &'a WatchEvent)>>,
    by_revision: BTreeMap<i64, Vec<&'a WatchEvent>>,
}

impl<'a> Model<'a> {
    fn new(events: &'a [WatchEvent]) -> Model<'a> {
        let mut keys: BTreeMap<&str, Vec<(i64, &WatchEvent)>> = BTreeMap::new();
        let mut by_revision: BTreeMap<i64, Vec<&WatchEvent>> = BTreeMap::new();
        for e in events {
            let key = std::str::from_utf8(&e.key).unwrap_or("<binary>");
            keys.entry(key).or_default().push((e.mod_revision, e));
            by_revision.entry(e.mod_revision).or_default().push(e);
        }
        Model { keys, by_revision }
    }

    /// The key's value at revision `rev` (after applying it).
    fn get(&self, key: &str, rev: i64) -> Option<Kv> {
        let hist = self.keys.get(key)?;
        let i = hist.partition_point(|(r, _)| *r <= rev);
        let (_, e) = hist.get(i.checked_sub(1)?)?;
        (e.kind == EventKind::Put).then(|| Kv {
            key: key.to_string(),
            value: String::from_utf8_lossy(&e.value).into_owned(),
            mod_revision: e.mod_revision,
            create_revision: e.create_revision,
            version: e.version,
        })
    }

    fn range(&self, start: &str, end: &str, rev: i64) -> Vec<Kv> {
        if end.is_empty() {
            return self.get(start, rev).into_iter().collect();
        }
        self.keys
            .range(start..end)
            .filter_map(|(k, _)| self.get(k, rev))
            .collect()
    }

    fn events_at(&self, rev: i64) -> &[&'a WatchEvent] {
        self.by_revision.get(&rev).map_or(&[], Vec::as_slice)
    }
}

fn compares_hold(m: &Model<'_>, compares: &[(String, Option<String>)], rev: i64) -> bool {
    compares
        .iter()
        .all(|(k, want)| m.get(k, rev).map(|kv| kv.value) == *want)
}

fn show_kvs(kvs: &[Kv]) -> String {
    let items: Vec<String> = kvs
        .iter()
        .map(|kv| {
            format!(
                "{}={}@{}(c{} v{})",
                kv.key, kv.value, kv.mod_revision, kv.create_revision, kv.version
            )
        })
        .collect();
    format!("[{}]", items.join(", "))
}

fn show_events(events: &[&WatchEvent]) -> String {
    let items: Vec<String> = events.iter().map(|e| e.to_string()).collect();
    format!("[{}]", items.join(", "))
}

/// The position of a request in revision order (see the module docs) and whether it
/// is a serializable read.
#[derive(Debug, Clone, Copy)]
struct Position {
    pos: i64,
    serializable: bool,
}

/// Checks `history` against `reference` (every event of every revision, in order).
pub fn check(history: &[Record], reference: &[WatchEvent]) -> Report {
    let model = Model::new(reference);
    let mut r = Report {
        ops: history.len(),
        ..Report::default()
    };
    let last = reference.last().map_or(1, |e| e.mod_revision);
    r.revisions = last;
    for rev in 2..=last {
        if model.events_at(rev).is_empty() {
            r.violations
                .push(Violation::Reference(format!("no event at revision {rev}")));
        }
    }

    // Which op wrote each put value (values are unique per run).
    let mut writer_of: HashMap<(&str, &str), usize> = HashMap::new();
    for (i, rec) in history.iter().enumerate() {
        match &rec.request {
            Request::Put { key, value, .. } => {
                writer_of.insert((key, value), i);
            }
            Request::Txn { then, .. } => {
                for w in then {
                    if let TxnWrite::Put { key, value } = w {
                        writer_of.insert((key, value), i);
                    }
                }
            }
            _ => {}
        }
    }
    // Where each write landed according to the reference.
    let mut applied_at: HashMap<usize, i64> = HashMap::new();
    let mut leased_keys: HashMap<&str, bool> = HashMap::new();
    for e in reference {
        let key = std::str::from_utf8(&e.key).unwrap_or("<binary>");
        match e.kind {
            EventKind::Put => {
                let value = String::from_utf8_lossy(&e.value);
                match writer_of.get(&(key, value.as_ref())) {
                    Some(&op) => {
                        if let Some(prev) = applied_at.insert(op, e.mod_revision)
                            && prev != e.mod_revision
                        {
                            r.violations.push(Violation::Phantom {
                                revision: e.mod_revision,
                                detail: format!("op {op} applied twice (also at {prev})"),
                            });
                        }
                        let leased = matches!(&history[op].request, Request::Put { lease, .. } if *lease != 0);
                        leased_keys.insert(key, leased);
                    }
                    None => r.violations.push(Violation::Phantom {
                        revision: e.mod_revision,
                        detail: format!("{e} was written by no request"),
                    }),
                }
            }
            EventKind::Delete => {
                let explained = leased_keys.get(key).copied().unwrap_or(false)
                    || history.iter().any(|rec| match &rec.request {
                        Request::Delete { key: k } => k == key,
                        Request::Txn { then, .. } => then
                            .iter()
                            .any(|w| matches!(w, TxnWrite::Delete { key: k } if k == key)),
                        Request::LeaseRevoke { .. } => true,
                        _ => false,
                    });
                if !explained {
                    r.violations.push(Violation::Phantom {
                        revision: e.mod_revision,
                        detail: format!("{e} was asked by no request"),
                    });
                }
            }
        }
    }

    let mut positions: Vec<Option<Position>> = vec![None; history.len()];
    for (i, rec) in history.iter().enumerate() {
        let known = !matches!(rec.reply, Reply::Unknown);
        if known {
            r.known += 1;
        } else {
            r.unknown += 1;
        }
        let lost = |detail: String| Violation::LostWrite { op: i, detail };
        let wrong = |detail: String| Violation::WrongRead { op: i, detail };
        let pos = match (&rec.request, &rec.reply) {
            (
                Request::Range {
                    start,
                    end,
                    serializable,
                },
                Reply::Range { revision, kvs },
            ) => {
                r.reads_checked += 1;
                if *serializable {
                    r.serializable_reads += 1;
                }
                let want = model.range(start, end, *revision);
                if *kvs != want {
                    r.violations.push(wrong(format!(
                        "range [{start}, {end}) at {revision} returned {} but the state there is {}",
                        show_kvs(kvs),
                        show_kvs(&want)
                    )));
                }
                Some(Position {
                    pos: 2 * revision + 1,
                    serializable: *serializable,
                })
            }
            (Request::Put { key, value, .. }, Reply::Put { revision }) => {
                r.writes_checked += 1;
                let got = model.events_at(*revision);
                let ok = applied_at.get(&i) == Some(revision)
                    && got.len() == 1
                    && got[0].key == key.as_bytes();
                if !ok {
                    r.violations.push(lost(format!(
                        "put {key}={value} acknowledged at {revision}, the reference has {} there",
                        show_events(got)
                    )));
                }
                Some(Position {
                    pos: 2 * revision,
                    serializable: false,
                })
            }
            (Request::Delete { key }, Reply::Delete { revision, deleted }) => {
                r.writes_checked += 1;
                let got = model.events_at(*revision);
                if *deleted > 0 {
                    let ok = got.len() == 1
                        && got[0].kind == EventKind::Delete
                        && got[0].key == key.as_bytes();
                    if !ok {
                        r.violations.push(lost(format!(
                            "delete {key} acknowledged at {revision}, the reference has {} there",
                            show_events(got)
                        )));
                    }
                    Some(Position {
                        pos: 2 * revision,
                        serializable: false,
                    })
                } else {
                    if let Some(kv) = model.get(key, *revision) {
                        r.violations.push(wrong(format!(
                            "delete {key} at {revision} deleted nothing, but {} was there",
                            show_kvs(&[kv])
                        )));
                    }
                    Some(Position {
                        pos: 2 * revision + 1,
                        serializable: false,
                    })
                }
            }
            (
                Request::Txn { compares, then },
                Reply::Txn {
                    revision,
                    succeeded,
                },
            ) => {
                r.writes_checked += 1;
                if *succeeded && !then.is_empty() {
                    if !compares_hold(&model, compares, revision - 1) {
                        r.violations.push(wrong(format!(
                            "txn at {revision} succeeded, but its compares {compares:?} fail at {}",
                            revision - 1
                        )));
                    }
                    let got = model.events_at(*revision);
                    let puts = then
                        .iter()
                        .filter(|w| matches!(w, TxnWrite::Put { .. }))
                        .count();
                    let put_events = got.iter().filter(|e| e.kind == EventKind::Put).count();
                    if puts > 0 && (applied_at.get(&i) != Some(revision) || put_events != puts) {
                        r.violations.push(lost(format!(
                            "txn {then:?} acknowledged at {revision}, the reference has {} there",
                            show_events(got)
                        )));
                    }
                    Some(Position {
                        pos: 2 * revision,
                        serializable: false,
                    })
                } else {
                    if *succeeded != compares_hold(&model, compares, *revision) {
                        r.violations.push(wrong(format!(
                            "txn compares {compares:?} returned {succeeded} at {revision}, the state there says otherwise"
                        )));
                    }
                    Some(Position {
                        pos: 2 * revision + 1,
                        serializable: false,
                    })
                }
            }
            (Request::LeaseRevoke { .. }, Reply::LeaseRevoke { revision }) => {
                // The revoke wrote `revision` if its lease still had keys, else it read
                // it (its keys were overwritten or deleted since): either way it came
                // after that revision's write.
                Some(Position {
                    pos: 2 * revision + 1,
                    serializable: false,
                })
            }
            (Request::Put { .. } | Request::Txn { .. }, Reply::Unknown) => {
                applied_at.get(&i).map(|rev| {
                    r.unknown_applied += 1;
                    Position {
                        pos: 2 * rev,
                        serializable: false,
                    }
                })
            }
            _ => None,
        };
        positions[i] = pos;
    }

    // Real time: sweep invokes in order, keeping the highest position among the
    // requests (linearizable, known) completed strictly before.
    let mut by_complete: Vec<usize> = (0..history.len())
        .filter(|&i| {
            !matches!(history[i].reply, Reply::Unknown)
                && positions[i].is_some_and(|p| !p.serializable)
        })
        .collect();
    by_complete.sort_by_key(|&i| history[i].complete);
    let mut by_invoke: Vec<usize> = (0..history.len())
        .filter(|&i| positions[i].is_some())
        .collect();
    by_invoke.sort_by_key(|&i| history[i].invoke);
    let mut next = 0;
    let mut best: Option<(i64, usize)> = None;
    for &b in &by_invoke {
        while next < by_complete.len() && history[by_complete[next]].complete < history[b].invoke {
            let a = by_complete[next];
            let p = positions[a].map_or(0, |p| p.pos);
            if best.is_none_or(|(bp, _)| p > bp) {
                best = Some((p, a));
            }
            next += 1;
        }
        let pb = positions[b].expect("filtered");
        if pb.serializable {
            continue;
        }
        if let Some((pa, a)) = best
            && pb.pos < pa
        {
            r.violations.push(Violation::RealTime {
                before: a,
                after: b,
                detail: format!(
                    "{:?} -> {:?} is at revision {}, before {:?} -> {:?} at {}",
                    history[b].request,
                    history[b].reply,
                    pb.pos / 2,
                    history[a].request,
                    history[a].reply,
                    pa / 2
                ),
            });
        }
    }
    // A serializable read may be stale, never from the future: no write it observed
    // may have been invoked after it completed.
    for (i, rec) in history.iter().enumerate() {
        let Some(p) = positions[i].filter(|p| p.serializable) else {
            continue;
        };
        let observed = p.pos / 2;
        for (&op, &rev) in &applied_at {
            if rev <= observed && history[op].invoke > rec.complete {
                r.violations.push(Violation::RealTime {
                    before: i,
                    after: op,
                    detail: format!(
                        "serializable read at {observed} saw revision {rev}, written by a request invoked after it completed"
                    ),
                });
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put_event(key: &str, value: &str, rev: i64, create: i64, version: i64) -> WatchEvent {
        WatchEvent::put(key, value, rev, create, version)
    }

    fn rec(client: usize, request: Request, reply: Reply, invoke: u64, complete: u64) -> Record {
        Record {
            client,
            request,
            reply,
            invoke,
            complete,
        }
    }

    fn put(key: &str, value: &str) -> Request {
        Request::Put {
            key: key.into(),
            value: value.into(),
            lease: 0,
        }
    }

    fn get(key: &str) -> Request {
        Request::Range {
            start: key.into(),
            end: String::new(),
            serializable: false,
        }
    }

    fn kv(key: &str, value: &str, rev: i64, create: i64, version: i64) -> Kv {
        Kv {
            key: key.into(),
            value: value.into(),
            mod_revision: rev,
            create_revision: create,
            version,
        }
    }

    /// x=1 at 2, x=2 at 3: a history that is fine, and variants that are not.
    fn base() -> (Vec<Record>, Vec<WatchEvent>) {
        let history = vec![
            rec(0, put("x", "1"), Reply::Put { revision: 2 }, 0, 10),
            rec(1, put("x", "2"), Reply::Put { revision: 3 }, 20, 30),
            rec(
                2,
                get("x"),
                Reply::Range {
                    revision: 3,
                    kvs: vec![kv("x", "2", 3, 2, 2)],
                },
                40,
                50,
            ),
        ];
        let reference = vec![put_event("x", "1", 2, 2, 1), put_event("x", "2", 3, 2, 2)];
        (history, reference)
    }

    #[test]
    fn a_correct_history_passes() {
        let (h, reference) = base();
        let r = check(&h, &reference);
        assert!(r.is_ok(), "{r}");
        assert_eq!(r.writes_checked, 2);
        assert_eq!(r.reads_checked, 1);
    }

    #[test]
    fn catches_a_stale_read() {
        let (mut h, reference) = base();
        // Invoked after x=2 was acknowledged, but returns the state at 2.
        h[2].reply = Reply::Range {
            revision: 2,
            kvs: vec![kv("x", "1", 2, 2, 1)],
        };
        let r = check(&h, &reference);
        assert!(
            r.violations.iter().any(|v| matches!(
                v,
                Violation::RealTime {
                    before: 1,
                    after: 2,
                    ..
                }
            )),
            "{r}"
        );
        // The same read marked serializable may be stale.
        if let Request::Range { serializable, .. } = &mut h[2].request {
            *serializable = true;
        }
        assert!(check(&h, &reference).is_ok());
    }

    #[test]
    fn catches_a_lost_acknowledged_write() {
        let (mut h, mut reference) = base();
        h.push(rec(3, put("y", "9"), Reply::Put { revision: 4 }, 60, 70));
        let r = check(&h, &reference);
        assert!(
            r.violations
                .iter()
                .any(|v| matches!(v, Violation::LostWrite { op: 3, .. })),
            "{r}"
        );
        reference.push(put_event("y", "9", 4, 4, 1));
        assert!(check(&h, &reference).is_ok());
    }

    #[test]
    fn catches_a_wrong_value_and_a_phantom() {
        let (mut h, mut reference) = base();
        h[2].reply = Reply::Range {
            revision: 3,
            kvs: vec![kv("x", "1", 2, 2, 1)],
        };
        reference.push(put_event("x", "never-written", 4, 2, 3));
        let r = check(&h, &reference);
        assert!(
            r.violations
                .iter()
                .any(|v| matches!(v, Violation::WrongRead { op: 2, .. }))
        );
        assert!(
            r.violations
                .iter()
                .any(|v| matches!(v, Violation::Phantom { revision: 4, .. }))
        );
    }

    #[test]
    fn unknown_writes_may_or_may_not_have_happened() {
        let (mut h, mut reference) = base();
        h.push(rec(3, put("y", "a"), Reply::Unknown, 60, 70));
        h.push(rec(4, put("y", "b"), Reply::Unknown, 60, 70));
        reference.push(put_event("y", "b", 4, 4, 1));
        let r = check(&h, &reference);
        assert!(r.is_ok(), "{r}");
        assert_eq!(r.unknown_applied, 1);
        // But not before it was invoked: a read that completed before saw it.
        h.push(rec(
            5,
            get("y"),
            Reply::Range {
                revision: 4,
                kvs: vec![kv("y", "b", 4, 4, 1)],
            },
            52,
            55,
        ));
        let r = check(&h, &reference);
        assert!(
            r.violations.iter().any(|v| matches!(
                v,
                Violation::RealTime {
                    before: 5,
                    after: 4,
                    ..
                }
            )),
            "{r}"
        );
    }

    #[test]
    fn txn_compares_are_checked_against_the_revision_before() {
        let (mut h, mut reference) = base();
        let cas = |expected: &str, new: &str| Request::Txn {
            compares: vec![("x".into(), Some(expected.into()))],
            then: vec![TxnWrite::Put {
                key: "x".into(),
                value: new.into(),
            }],
        };
        h.push(rec(
            3,
            cas("2", "3"),
            Reply::Txn {
                revision: 4,
                succeeded: true,
            },
            60,
            70,
        ));
        h.push(rec(
            4,
            cas("2", "4"),
            Reply::Txn {
                revision: 4,
                succeeded: false,
            },
            80,
            90,
        ));
        reference.push(put_event("x", "3", 4, 2, 3));
        assert!(check(&h, &reference).is_ok());
        // A CAS that claims success against a value that was not there.
        h[3].request = cas("1", "3");
        assert!(!check(&h, &reference).is_ok());
    }

    #[test]
    fn a_gap_in_the_reference_is_reported() {
        let (h, mut reference) = base();
        reference[1].mod_revision = 4;
        let r = check(&h, &reference);
        assert!(
            r.violations
                .iter()
                .any(|v| matches!(v, Violation::Reference(_))),
            "{r}"
        );
    }
}
