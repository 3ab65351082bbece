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
//!   anyone observed that revision; every delete event is explained by a request that
//!   may have taken effect at that revision (see *Deletes* below) or by the expiry of
//!   the key's lease.
//! * **Leases expire no earlier than their TTL** ([`Violation::EarlyExpiry`]): a leased
//!   key that disappears with nothing but its lease's expiry to explain it must have
//!   outlived its lease's TTL from the last renewal the client had certainly received
//!   (see *Leases* below).
//! * **Revisions are dense** ([`Violation::Reference`]): every revision from 2 to the
//!   last has an event (every write of the run is under the watched range; revision 1
//!   is the empty store).
//!
//! Unknown-outcome writes may or may not have happened: a put or txn whose value is in
//! the reference happened at that revision (and must not have been applied before it
//! was invoked); one whose value is not never happened. Unknown reads constrain
//! nothing.
//!
//! ## When a revision happened
//!
//! The reference gives revisions, not times; the records bound them (all times are the
//! clients' clock, from the run's origin):
//!
//! * **Upper bound** `seen(r)`: the earliest completion of a known record whose reply
//!   carries a header revision `>= r` (a read, serializable ones included, or a write
//!   or revoke). The member that answered had applied `r`, so `r` was committed, so
//!   whatever caused it (a request, or the leader deciding a lease had expired) came
//!   before that completion. No such record: unbounded.
//! * **Lower bound** `unseen(r)`: the latest invocation of a known *linearizable*
//!   record (a linearizable read, a write, a revoke) whose header revision is `< r`.
//!   Its linearization point lies after its invocation and saw a state without `r`,
//!   so `r` was committed after that invocation. Serializable reads are left out
//!   (they may be stale). No such record: 0.
//!
//! ## Deletes
//!
//! A delete event of key `k` at revision `r` is explained by
//!
//! * a delete of `k` (or a txn deleting `k`) acknowledged at `r` (a delete that deleted
//!   something, a txn that succeeded), or one with an unknown outcome invoked no later
//!   than `seen(r)`;
//! * if `k`'s last put before `r` attached it to lease `L` (the put that wrote the value
//!   the reference shows; txn puts attach no lease): a revoke of `L` acknowledged at `r`
//!   (a revoke that deletes keys returns the revision of their deletion), or one with
//!   an unknown outcome invoked no later than `seen(r)` (a revoke that failed, e.g.
//!   "lease not found", did nothing);
//! * or else the expiry of `L`, under the rule below.
//!
//! ## Leases
//!
//! A lease granted with TTL `t` (the smaller of the asked and the granted TTL) and
//! renewed by keep-alives may live longer than `t` (leader changes extend it, expiry is
//! noticed on a clock tick), but never shorter than `t` from the later of
//!
//! * the **invocation** of its grant (the server starts the clock when it applies the
//!   grant, which is after the invocation), and
//! * the **invocation** of every keep-alive acknowledged with a TTL > 0 whose
//!   **completion** is no later than `unseen(r)`. The server renewed it somewhere
//!   between invocation and completion, so the invocation is the safe end; and only
//!   keep-alives that certainly came before the deletion count (one overlapping it may
//!   have been answered after it, which is a different question than early expiry).
//!
//! So a delete of `k` at `r` explained by nothing but `L`'s expiry is a violation iff
//! `seen(r) < anchor + t - EXPIRY_SLACK`, where `anchor` is the later of those
//! invocations. [`EXPIRY_SLACK`] only absorbs clock granularity: clients and servers
//! read the same monotonic clock, and every bound above already errs on the server's
//! side. A lease whose grant is not in the history (unknown outcome, or a caller that
//! does not record grants) has no known TTL: its keys may vanish at any time. Lease ids
//! are assumed not to be reused within a run (Concord and etcd draw them from a
//! member-unique generator); if one were, the earliest grant's invocation is used.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

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
    /// A lease of `ttl` seconds (granting writes no revision).
    LeaseGrant {
        ttl: i64,
    },
    /// One keep-alive of `lease` (one request on a keep-alive stream, one answer).
    LeaseKeepAlive {
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
    /// Lease `lease` granted with `ttl` seconds (which may be above the asked TTL: the
    /// server raises it to its minimum).
    LeaseGrant {
        lease: i64,
        ttl: i64,
    },
    /// Renewed to `ttl` seconds (`ttl > 0`; etcd answers a keep-alive of a lease it
    /// does not have with TTL 0, which callers record as [`Reply::Failed`]).
    LeaseKeepAlive {
        ttl: i64,
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
    /// A leased key vanished at `revision` with only its lease's expiry to explain it,
    /// before that lease's TTL had run out.
    EarlyExpiry {
        revision: i64,
        lease: i64,
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
            Violation::EarlyExpiry {
                revision,
                lease,
                detail,
            } => write!(
                f,
                "lease {lease:x} expired early (its keys deleted at revision {revision}): {detail}"
            ),
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
    /// Deletes of leased keys that only the lease's expiry explains, with a known TTL
    /// (each checked against it).
    pub expiries_checked: usize,
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
            "{} ops ({} known, {} unknown, {} of those applied), {} reads ({} serializable), \
             {} writes and {} lease expiries checked over {} revisions: ",
            self.ops,
            self.known,
            self.unknown,
            self.unknown_applied,
            self.reads_checked,
            self.serializable_reads,
            self.writes_checked,
            self.expiries_checked,
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

/// Allowance for clock granularity in the lease expiry rule (see the module docs).
pub const EXPIRY_SLACK: Duration = Duration::from_millis(100);
const EXPIRY_SLACK_NANOS: u64 = EXPIRY_SLACK.as_nanos() as u64;
const NANOS_PER_SEC: u64 = 1_000_000_000;

/// A record time (nanoseconds from the origin) in seconds, for messages.
fn secs(t: u64) -> String {
    if t == u64::MAX {
        "never".into()
    } else {
        format!("{:.3} s", t as f64 / 1e9)
    }
}

/// Bounds on when each revision happened (see the module docs).
struct RevisionTimes {
    /// `(revision, completion)` by revision, each completion lowered to the earliest
    /// at or after its revision.
    seen: Vec<(i64, u64)>,
    /// `(revision, invocation)` of linearizable records by revision, each invocation
    /// raised to the latest at or before its revision.
    unseen: Vec<(i64, u64)>,
}

impl RevisionTimes {
    fn new(history: &[Record]) -> RevisionTimes {
        let mut seen = Vec::new();
        let mut unseen = Vec::new();
        for rec in history {
            let (revision, linearizable) = match (&rec.request, &rec.reply) {
                (Request::Range { serializable, .. }, Reply::Range { revision, .. }) => {
                    (*revision, !serializable)
                }
                (_, Reply::Put { revision })
                | (_, Reply::Delete { revision, .. })
                | (_, Reply::Txn { revision, .. })
                | (_, Reply::LeaseRevoke { revision }) => (*revision, true),
                _ => continue,
            };
            if revision <= 0 {
                continue;
            }
            seen.push((revision, rec.complete));
            if linearizable {
                unseen.push((revision, rec.invoke));
            }
        }
        seen.sort_unstable();
        for i in (1..seen.len()).rev() {
            seen[i - 1].1 = seen[i - 1].1.min(seen[i].1);
        }
        unseen.sort_unstable();
        for i in 1..unseen.len() {
            unseen[i].1 = unseen[i].1.max(unseen[i - 1].1);
        }
        RevisionTimes { seen, unseen }
    }

    /// By then revision `rev` existed (`u64::MAX`: no bound).
    fn seen(&self, rev: i64) -> u64 {
        let i = self.seen.partition_point(|(r, _)| *r < rev);
        self.seen.get(i).map_or(u64::MAX, |(_, t)| *t)
    }

    /// Revision `rev` was committed after this time (0: no bound).
    fn unseen(&self, rev: i64) -> u64 {
        let i = self.unseen.partition_point(|(r, _)| *r < rev);
        i.checked_sub(1).map_or(0, |j| self.unseen[j].1)
    }
}

/// Whether `rec` (a delete, txn or revoke) may have written revision `rev`, which
/// existed by `seen`.
fn may_have_written(rec: &Record, rev: i64, seen: u64) -> bool {
    match &rec.reply {
        Reply::Delete { revision, deleted } => *deleted > 0 && *revision == rev,
        Reply::Txn {
            revision,
            succeeded,
        } => *succeeded && *revision == rev,
        Reply::LeaseRevoke { revision } => *revision == rev,
        Reply::Unknown => rec.invoke <= seen,
        _ => false,
    }
}

/// A lease's grant as the history knows it.
struct Grant {
    /// The earliest invocation of an acknowledged grant of this id.
    invoke: u64,
    /// The smaller of the asked and the granted TTL, in seconds.
    ttl: i64,
}

/// The lease requests of a history, by lease id.
struct Leases {
    grants: HashMap<i64, Grant>,
    /// `(invoke, complete)` of every keep-alive acknowledged with a TTL > 0.
    renewals: HashMap<i64, Vec<(u64, u64)>>,
    /// Indexes of the revokes of each lease.
    revokes: HashMap<i64, Vec<usize>>,
}

impl Leases {
    fn new(history: &[Record]) -> Leases {
        let mut l = Leases {
            grants: HashMap::new(),
            renewals: HashMap::new(),
            revokes: HashMap::new(),
        };
        for (i, rec) in history.iter().enumerate() {
            match (&rec.request, &rec.reply) {
                // The earliest grant of an id (see the module docs on reuse).
                (Request::LeaseGrant { ttl: asked }, Reply::LeaseGrant { lease, ttl })
                    if l.grants.get(lease).is_none_or(|g| rec.invoke < g.invoke) =>
                {
                    let ttl = (*asked).min(*ttl).max(0);
                    l.grants.insert(
                        *lease,
                        Grant {
                            invoke: rec.invoke,
                            ttl,
                        },
                    );
                }
                (Request::LeaseKeepAlive { lease }, Reply::LeaseKeepAlive { ttl }) if *ttl > 0 => {
                    l.renewals
                        .entry(*lease)
                        .or_default()
                        .push((rec.invoke, rec.complete));
                }
                (Request::LeaseRevoke { lease }, _) => l.revokes.entry(*lease).or_default().push(i),
                _ => {}
            }
        }
        l
    }

    /// Whether a revoke of `lease` may have written revision `rev` (existing by `seen`).
    fn revoked(&self, lease: i64, history: &[Record], rev: i64, seen: u64) -> bool {
        self.revokes.get(&lease).is_some_and(|ops| {
            ops.iter()
                .any(|&i| may_have_written(&history[i], rev, seen))
        })
    }

    /// The latest invocation of a renewal of `lease` that completed by `by`.
    fn renewed_before(&self, lease: i64, by: u64) -> Option<u64> {
        self.renewals
            .get(&lease)?
            .iter()
            .filter(|(_, complete)| *complete <= by)
            .map(|(invoke, _)| *invoke)
            .max()
    }
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
    let times = RevisionTimes::new(history);
    let leases = Leases::new(history);
    // The requests that may delete each key.
    let mut deleters: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, rec) in history.iter().enumerate() {
        match &rec.request {
            Request::Delete { key } => deleters.entry(key).or_default().push(i),
            Request::Txn { then, .. } => {
                for w in then {
                    if let TxnWrite::Delete { key } = w {
                        deleters.entry(key).or_default().push(i);
                    }
                }
            }
            _ => {}
        }
    }
    // Where each write landed according to the reference.
    let mut applied_at: HashMap<usize, i64> = HashMap::new();
    // The lease each key is attached to now (0: none), as its last put set it.
    let mut attached: HashMap<&str, i64> = HashMap::new();
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
                        let lease = match &history[op].request {
                            Request::Put { lease, .. } => *lease,
                            _ => 0,
                        };
                        attached.insert(key, lease);
                    }
                    None => {
                        attached.remove(key);
                        r.violations.push(Violation::Phantom {
                            revision: e.mod_revision,
                            detail: format!("{e} was written by no request"),
                        });
                    }
                }
            }
            EventKind::Delete => {
                let rev = e.mod_revision;
                let seen = times.seen(rev);
                let lease = attached.remove(key).unwrap_or(0);
                let by_request = deleters.get(key).is_some_and(|ops| {
                    ops.iter()
                        .any(|&i| may_have_written(&history[i], rev, seen))
                });
                if by_request {
                    continue;
                }
                if lease == 0 {
                    r.violations.push(Violation::Phantom {
                        revision: rev,
                        detail: format!(
                            "{e} was asked by no request that may have taken effect there"
                        ),
                    });
                    continue;
                }
                if leases.revoked(lease, history, rev, seen) {
                    continue;
                }
                let Some(grant) = leases.grants.get(&lease) else {
                    // No known TTL: it may have expired any time.
                    continue;
                };
                r.expiries_checked += 1;
                let unseen = times.unseen(rev);
                let renewed = leases.renewed_before(lease, unseen);
                let anchor = renewed.map_or(grant.invoke, |ka| ka.max(grant.invoke));
                let ttl = u64::try_from(grant.ttl)
                    .unwrap_or(0)
                    .saturating_mul(NANOS_PER_SEC);
                let earliest = anchor
                    .saturating_add(ttl)
                    .saturating_sub(EXPIRY_SLACK_NANOS);
                if seen < earliest {
                    r.violations.push(Violation::EarlyExpiry {
                        revision: rev,
                        lease,
                        detail: format!(
                            "{e} was seen by {} (nothing else deleted it), but the lease \
                             (TTL {} s) was granted at {}{} and may not expire before {}",
                            secs(seen),
                            grant.ttl,
                            secs(grant.invoke),
                            renewed.map_or(String::new(), |ka| format!(
                                ", renewed by a keep-alive invoked at {}",
                                secs(ka)
                            )),
                            secs(anchor.saturating_add(ttl))
                        ),
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

    const MS: u64 = 1_000_000;
    const S: u64 = 1_000 * MS;

    /// Lease 7 (TTL 2 s) granted at 0, `x` put with it at revision 2, `x` deleted at 3
    /// with nothing but the lease to explain it; a read completing at `seen` is the
    /// first to observe revision 3.
    fn leased(seen: u64) -> (Vec<Record>, Vec<WatchEvent>) {
        let history = vec![
            rec(
                0,
                Request::LeaseGrant { ttl: 2 },
                Reply::LeaseGrant { lease: 7, ttl: 2 },
                0,
                10 * MS,
            ),
            rec(
                0,
                Request::Put {
                    key: "x".into(),
                    value: "1".into(),
                    lease: 7,
                },
                Reply::Put { revision: 2 },
                20 * MS,
                30 * MS,
            ),
            rec(
                1,
                get("x"),
                Reply::Range {
                    revision: 3,
                    kvs: vec![],
                },
                seen - 10 * MS,
                seen,
            ),
        ];
        let reference = vec![put_event("x", "1", 2, 2, 1), WatchEvent::delete("x", 3)];
        (history, reference)
    }

    fn early_expiry(r: &Report) -> bool {
        r.violations.iter().any(|v| {
            matches!(
                v,
                Violation::EarlyExpiry {
                    revision: 3,
                    lease: 7,
                    ..
                }
            )
        })
    }

    #[test]
    fn a_leased_key_gone_before_its_ttl_ran_out_is_an_early_expiry() {
        let (h, reference) = leased(S);
        let r = check(&h, &reference);
        assert!(early_expiry(&r), "{r}");
        assert_eq!(r.violations.len(), 1, "{r}");
        assert_eq!(r.expiries_checked, 1);
        // Just outside the slack.
        let (h, reference) = leased(2 * S - EXPIRY_SLACK_NANOS - MS);
        assert!(early_expiry(&check(&h, &reference)));
    }

    #[test]
    fn a_leased_key_gone_after_its_ttl_ran_out_is_fine() {
        for seen in [2 * S - EXPIRY_SLACK_NANOS, 2 * S, 30 * S] {
            let (h, reference) = leased(seen);
            let r = check(&h, &reference);
            assert!(r.is_ok(), "seen at {seen}: {r}");
            assert_eq!(r.expiries_checked, 1);
        }
        // Nobody observed the deletion: it may have happened any time later.
        let (mut h, reference) = leased(S);
        h.pop();
        assert!(check(&h, &reference).is_ok());
    }

    #[test]
    fn a_leased_key_gone_after_a_revoke_is_fine() {
        let revoke = |reply: Reply, invoke: u64| {
            rec(
                2,
                Request::LeaseRevoke { lease: 7 },
                reply,
                invoke,
                invoke + 10 * MS,
            )
        };
        // Acknowledged at the deletion's revision.
        let (mut h, reference) = leased(S);
        h.push(revoke(Reply::LeaseRevoke { revision: 3 }, 500 * MS));
        let r = check(&h, &reference);
        assert!(r.is_ok(), "{r}");
        assert_eq!(r.expiries_checked, 0);
        // Unknown outcome, invoked before the deletion was seen.
        let (mut h, reference) = leased(S);
        h.push(revoke(Reply::Unknown, 500 * MS));
        assert!(check(&h, &reference).is_ok());
        // But not one invoked after the deletion was seen, one that failed, one
        // acknowledged elsewhere or one of another lease.
        for (reply, invoke) in [
            (Reply::Unknown, 1500 * MS),
            (Reply::Failed("lease not found".into()), 500 * MS),
            (Reply::LeaseRevoke { revision: 2 }, 500 * MS),
        ] {
            let (mut h, reference) = leased(S);
            h.push(revoke(reply.clone(), invoke));
            assert!(early_expiry(&check(&h, &reference)), "{reply:?}");
        }
        let (mut h, reference) = leased(S);
        h.push(rec(
            2,
            Request::LeaseRevoke { lease: 8 },
            Reply::LeaseRevoke { revision: 3 },
            500 * MS,
            510 * MS,
        ));
        assert!(early_expiry(&check(&h, &reference)));
    }

    #[test]
    fn a_renewed_lease_gone_before_its_ttl_from_the_renewal_is_an_early_expiry() {
        let keep_alive = rec(
            0,
            Request::LeaseKeepAlive { lease: 7 },
            Reply::LeaseKeepAlive { ttl: 2 },
            1500 * MS,
            1600 * MS,
        );
        // A linearizable read invoked after the keep-alive completed still saw the key:
        // the renewal certainly came first, so the lease lives until 3.5 s at least.
        let still_there = rec(
            1,
            get("x"),
            Reply::Range {
                revision: 2,
                kvs: vec![kv("x", "1", 2, 2, 1)],
            },
            1700 * MS,
            1800 * MS,
        );
        let (mut h, reference) = leased(2500 * MS);
        assert!(check(&h, &reference).is_ok(), "without the renewal");
        h.push(keep_alive.clone());
        h.push(still_there.clone());
        let r = check(&h, &reference);
        assert!(early_expiry(&r), "{r}");
        // Gone after the renewed TTL: fine.
        let (mut h, reference) = leased(3500 * MS);
        h.push(keep_alive.clone());
        h.push(still_there.clone());
        assert!(check(&h, &reference).is_ok());
        // A keep-alive nothing orders before the deletion may have been answered after
        // it: it does not count.
        let (mut h, reference) = leased(2500 * MS);
        h.push(keep_alive.clone());
        assert!(check(&h, &reference).is_ok());
        // Nor does one that found no lease.
        let (mut h, reference) = leased(2500 * MS);
        h.push(rec(
            0,
            Request::LeaseKeepAlive { lease: 7 },
            Reply::Failed("lease not found".into()),
            1500 * MS,
            1600 * MS,
        ));
        h.push(still_there);
        assert!(check(&h, &reference).is_ok());
    }

    #[test]
    fn a_lease_without_a_recorded_grant_may_expire_any_time() {
        let (mut h, reference) = leased(S);
        h.remove(0);
        let r = check(&h, &reference);
        assert!(r.is_ok(), "{r}");
        assert_eq!(r.expiries_checked, 0);
    }

    #[test]
    fn a_delete_needs_a_request_that_may_have_taken_effect_there() {
        let (mut h, mut reference) = base();
        reference.push(WatchEvent::delete("x", 4));
        // A delete of x that found nothing (at 1, before the first put) explains
        // nothing at 4.
        h.push(rec(
            3,
            Request::Delete { key: "x".into() },
            Reply::Delete {
                revision: 1,
                deleted: 0,
            },
            0,
            5,
        ));
        h.push(rec(
            4,
            get("x"),
            Reply::Range {
                revision: 4,
                kvs: vec![],
            },
            60,
            70,
        ));
        let r = check(&h, &reference);
        assert!(
            r.violations
                .iter()
                .any(|v| matches!(v, Violation::Phantom { revision: 4, .. })),
            "{r}"
        );
        // One with an unknown outcome, invoked before revision 4 was seen, does.
        h.push(rec(
            5,
            Request::Delete { key: "x".into() },
            Reply::Unknown,
            65,
            80,
        ));
        assert!(check(&h, &reference).is_ok());
        // One invoked after it was seen does not.
        h.last_mut().expect("pushed").invoke = 75;
        assert!(!check(&h, &reference).is_ok());
    }
}
