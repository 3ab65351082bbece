//! # Watch history checking: etcd's six watch guarantees
//!
//! A fault test records what every watcher received (a [`WatcherHistory`]: one
//! [`Session`] per watch stream, each with every [`Response`] in arrival order), and
//! after the run fetches the authoritative event log of the watched keys (a
//! [`ReferenceLog`]: a watch from an early revision on a healthy cluster, which must
//! not have compacted). [`check`] then compares every watcher against the reference.
//!
//! ## Model
//!
//! * A **logical watcher** watches one [`KeyRange`] (etcd encoding: empty `range_end` =
//!   the single key, `"\0"` = every key `>= key`, otherwise `[key, range_end)`).
//! * Its first session watches from an explicit `start_revision` (≥ 1: a recorder
//!   resolves "now" to a revision itself, because etcd's answer to a watch from "now"
//!   does not say exactly where it started). When a stream breaks (error, end, silence)
//!   the recorder opens a new session, possibly on another member, **resumed** from
//!   `last observed revision + 1`, where the last observed revision is the highest of
//!   the last event revision and the last progress-notification revision (the header
//!   revision of an events response is *not* a bookmark: etcd may send it ahead of
//!   events still to come).
//! * A [`Response`] is `Created`, `Events` (with the events in order), `Progress` (no
//!   events; `header_revision` is the bookmark) or `Canceled`.
//!
//! ## Guarantees checked (one [`Violation`] variant each)
//!
//! * **Ordered** ([`Violation::Ordered`]): across all sessions of a logical watcher,
//!   event revisions never go back; events of one revision come in the reference's
//!   (sub-revision) order; within one session, the header revisions of responses
//!   other than progress notifications never go back, an events response's header
//!   revision is at least its events' revisions, and nothing follows a cancel.
//! * **Unique** ([`Violation::Duplicate`]): no event (key + mod revision) is delivered
//!   twice to a logical watcher.
//! * **Atomic** ([`Violation::Atomic`]): a response holding an event of revision R holds
//!   every reference event of R inside the watched range (fragmenting is not modelled:
//!   recorders must not ask for it).
//! * **Reliable** ([`Violation::Gap`]): between a logical watcher's first start revision
//!   and the last revision it observed, it received exactly the reference events in its
//!   range; a reference event it jumped over and never got is a gap.
//! * **Resumable** ([`Violation::Resume`]): a session's first event is exactly the first
//!   reference event in range at or after its start revision (no skipped events), and a
//!   session never delivers an event below its start revision (no repeats).
//! * **Bookmarkable** ([`Violation::Bookmark`]): a progress notification at R comes only
//!   after every reference event in range with revision ≤ R (and ≥ the watcher's first
//!   start) was delivered; R never exceeds the reference's last revision.
//!
//! Also: event contents (kind, value, create revision, version) equal the reference's
//! ([`Violation::Content`]); every event is in the reference ([`Violation::Phantom`]) and
//! in the watched range ([`Violation::OutOfRange`]); no watch is canceled as compacted
//! while the reference shows the history was still there ([`Violation::Canceled`]); the
//! reference itself is consistent (revisions ascending, per-key versions chaining,
//! optionally equal to a final read: [`Violation::Reference`]); the recording is well
//! formed ([`Violation::InvalidHistory`]).
//!
//! ## Classification
//!
//! Each fault is reported once, under the most specific guarantee: a reference event
//! jumped over is held back; if it arrives later the watcher broke *ordered*, if it
//! never arrives it broke *resumable* (jumped over by a session's first event) or
//! *reliable* (anywhere else). An event missing from its revision's response is an
//! *atomic* violation, one that a progress notification claimed as delivered is a
//! *bookmark* violation; their late arrival is not reported again.
//!
//! A progress notification *lower* than revisions already seen is not a violation (it
//! is true, it just says nothing new): a resumed session on a lagging member reports
//! that member's own older revision, and etcd 3.4 answers `RequestProgress` outside the
//! event queue, so its answer (the revision when the request was read) can arrive
//! after events of later revisions, even within one stream. What a bookmark must never
//! do is claim a revision whose events have not all arrived yet.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

/// A watched key range in etcd's encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRange {
    pub key: Vec<u8>,
    /// Empty: just `key`. `"\0"`: every key `>= key`. Otherwise `[key, range_end)`.
    pub range_end: Vec<u8>,
}

impl KeyRange {
    /// Exactly `key`.
    pub fn single(key: impl Into<Vec<u8>>) -> KeyRange {
        KeyRange {
            key: key.into(),
            range_end: Vec::new(),
        }
    }

    /// `[key, range_end)` (`range_end = "\0"`: every key `>= key`).
    pub fn between(key: impl Into<Vec<u8>>, range_end: impl Into<Vec<u8>>) -> KeyRange {
        KeyRange {
            key: key.into(),
            range_end: range_end.into(),
        }
    }

    /// Every key starting with `prefix`, as etcd encodes it (the prefix with its last
    /// byte below 0xff incremented; `"\0"` if there is none).
    pub fn prefix(prefix: impl Into<Vec<u8>>) -> KeyRange {
        let key = prefix.into();
        let mut end = key.clone();
        while let Some(&last) = end.last() {
            if last < 0xff {
                *end.last_mut().expect("non-empty") += 1;
                return KeyRange {
                    key,
                    range_end: end,
                };
            }
            end.pop();
        }
        KeyRange {
            key,
            range_end: vec![0],
        }
    }

    /// Whether `key` is in the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        if self.range_end.is_empty() {
            key == self.key.as_slice()
        } else if self.range_end == [0] {
            key >= self.key.as_slice()
        } else {
            key >= self.key.as_slice() && key < self.range_end.as_slice()
        }
    }

    /// Whether every key of `other` is in this range.
    pub fn covers(&self, other: &KeyRange) -> bool {
        if other.range_end.is_empty() {
            return self.contains(&other.key);
        }
        if other.key < self.key {
            return false;
        }
        if self.range_end == [0] {
            return true;
        }
        if self.range_end.is_empty() {
            // A single key covers only `[key, key\0)`.
            let mut next = self.key.clone();
            next.push(0);
            return other.key == self.key && other.range_end == next;
        }
        other.range_end != [0] && other.range_end <= self.range_end
    }
}

impl fmt::Display for KeyRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.range_end.is_empty() {
            write!(f, "key {}", show(&self.key))
        } else if self.range_end == [0] {
            write!(f, "keys >= {}", show(&self.key))
        } else {
            write!(f, "[{}, {})", show(&self.key), show(&self.range_end))
        }
    }
}

/// Bytes as escaped ASCII, quoted.
fn show(bytes: &[u8]) -> String {
    format!("\"{}\"", bytes.escape_ascii())
}

/// A put or a delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One watch event: the event kind and the key-value it carries (etcd's delete events
/// carry only the key and the deletion revision as `mod_revision`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: EventKind,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub mod_revision: i64,
    pub create_revision: i64,
    pub version: i64,
}

/// What identifies an event: its key and revision.
pub type EventId = (Vec<u8>, i64);

impl WatchEvent {
    /// A put of `key = value` at `revision`, with the given create revision and version.
    pub fn put(key: &str, value: &str, revision: i64, create_revision: i64, version: i64) -> Self {
        WatchEvent {
            kind: EventKind::Put,
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            mod_revision: revision,
            create_revision,
            version,
        }
    }

    /// A delete of `key` at `revision` (as etcd reports it: no value, no versions).
    pub fn delete(key: &str, revision: i64) -> Self {
        WatchEvent {
            kind: EventKind::Delete,
            key: key.as_bytes().to_vec(),
            value: Vec::new(),
            mod_revision: revision,
            create_revision: 0,
            version: 0,
        }
    }

    pub fn id(&self) -> EventId {
        (self.key.clone(), self.mod_revision)
    }

    /// From an `etcd-client` event (an event without a key-value gets an empty key,
    /// which no reference holds).
    pub fn from_etcd(e: &etcd_client::Event) -> WatchEvent {
        let kind = match e.event_type() {
            etcd_client::EventType::Put => EventKind::Put,
            etcd_client::EventType::Delete => EventKind::Delete,
        };
        match e.kv() {
            Some(kv) => WatchEvent {
                kind,
                key: kv.key().to_vec(),
                value: kv.value().to_vec(),
                mod_revision: kv.mod_revision(),
                create_revision: kv.create_revision(),
                version: kv.version(),
            },
            None => WatchEvent {
                kind,
                key: Vec::new(),
                value: Vec::new(),
                mod_revision: 0,
                create_revision: 0,
                version: 0,
            },
        }
    }

    /// A key-value from a read, as the put event that wrote it.
    pub fn from_kv(kv: &etcd_client::KeyValue) -> WatchEvent {
        WatchEvent {
            kind: EventKind::Put,
            key: kv.key().to_vec(),
            value: kv.value().to_vec(),
            mod_revision: kv.mod_revision(),
            create_revision: kv.create_revision(),
            version: kv.version(),
        }
    }
}

impl fmt::Display for WatchEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            EventKind::Put => write!(
                f,
                "put {}={} @{} (create {}, version {})",
                show(&self.key),
                show(&self.value),
                self.mod_revision,
                self.create_revision,
                self.version
            ),
            EventKind::Delete => write!(f, "delete {} @{}", show(&self.key), self.mod_revision),
        }
    }
}

/// What a watch response was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseKind {
    /// The watch was created (not a bookmark: etcd's header revision here is the
    /// store's current revision, not how far the watcher got).
    Created,
    /// Events, in the order received.
    Events(Vec<WatchEvent>),
    /// A progress notification: every event up to `header_revision` was delivered.
    Progress,
    /// The watch was canceled; `compact_revision > 0` means "compacted".
    Canceled {
        compact_revision: i64,
        reason: String,
    },
}

/// One watch response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub header_revision: i64,
    pub kind: ResponseKind,
}

impl Response {
    pub fn created(header_revision: i64) -> Response {
        Response {
            header_revision,
            kind: ResponseKind::Created,
        }
    }

    pub fn events(header_revision: i64, events: Vec<WatchEvent>) -> Response {
        Response {
            header_revision,
            kind: ResponseKind::Events(events),
        }
    }

    pub fn progress(revision: i64) -> Response {
        Response {
            header_revision: revision,
            kind: ResponseKind::Progress,
        }
    }

    /// From an `etcd-client` response. A response without events that is neither a
    /// creation nor a cancellation is a progress notification (etcd's
    /// `IsProgressNotify`).
    pub fn from_etcd(r: &etcd_client::WatchResponse) -> Response {
        let header_revision = r.header().map_or(0, |h| h.revision());
        let kind = if r.canceled() || r.compact_revision() != 0 {
            ResponseKind::Canceled {
                compact_revision: r.compact_revision(),
                reason: r.cancel_reason().to_string(),
            }
        } else if r.created() {
            ResponseKind::Created
        } else if r.events().is_empty() {
            ResponseKind::Progress
        } else {
            ResponseKind::Events(r.events().iter().map(WatchEvent::from_etcd).collect())
        };
        Response {
            header_revision,
            kind,
        }
    }

    /// The revision a recorder may resume after: the last event's revision or the
    /// progress revision (`None` for other responses).
    pub fn observed_revision(&self) -> Option<i64> {
        match &self.kind {
            ResponseKind::Events(evs) => evs.iter().map(|e| e.mod_revision).max(),
            ResponseKind::Progress => Some(self.header_revision),
            _ => None,
        }
    }
}

/// One watch stream of a logical watcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Where it ran (for messages), e.g. the member's endpoint.
    pub member: String,
    /// The revision watched from (≥ 1).
    pub start_revision: i64,
    /// Opened after an earlier session of the same watcher broke, from the last
    /// observed revision + 1.
    pub resumed: bool,
    pub responses: Vec<Response>,
    /// Why the session ended (for messages), if it did.
    pub ended: Option<String>,
}

impl Session {
    pub fn new(member: impl Into<String>, start_revision: i64, resumed: bool) -> Session {
        Session {
            member: member.into(),
            start_revision,
            resumed,
            responses: Vec::new(),
            ended: None,
        }
    }
}

/// Everything one logical watcher received: its sessions in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatcherHistory {
    pub name: String,
    pub range: KeyRange,
    pub sessions: Vec<Session>,
}

impl WatcherHistory {
    pub fn new(name: impl Into<String>, range: KeyRange) -> WatcherHistory {
        WatcherHistory {
            name: name.into(),
            range,
            sessions: Vec::new(),
        }
    }

    /// The highest revision observed so far (events and progress notifications),
    /// or `start - 1` of the first session if nothing was: the next session resumes
    /// from this + 1.
    pub fn observed_revision(&self) -> Option<i64> {
        let first = self.sessions.first()?.start_revision - 1;
        Some(
            self.sessions
                .iter()
                .flat_map(|s| &s.responses)
                .filter_map(Response::observed_revision)
                .fold(first, i64::max),
        )
    }
}

/// The authoritative event log of `range` for revisions `from_revision..=through_revision`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferenceLog {
    pub range: KeyRange,
    pub from_revision: i64,
    pub through_revision: i64,
    /// In revision order, events of one revision in sub-revision order.
    pub events: Vec<WatchEvent>,
}

impl ReferenceLog {
    /// Internal consistency: every event in range and in `from..=through`, revisions
    /// ascending, no key twice in a revision, and per key: a put after a put keeps the
    /// create revision and bumps the version; a put after a delete (or the first put
    /// of a log from revision 1) creates the key (version 1, create = mod revision).
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let mut last_rev = 0;
        let mut in_rev: HashSet<&[u8]> = HashSet::new();
        let mut last: HashMap<&[u8], &WatchEvent> = HashMap::new();
        for e in &self.events {
            if !self.range.contains(&e.key) {
                errors.push(format!("{e} is outside {}", self.range));
            }
            if e.mod_revision < self.from_revision || e.mod_revision > self.through_revision {
                errors.push(format!(
                    "{e} is outside revisions {}..={}",
                    self.from_revision, self.through_revision
                ));
            }
            if e.mod_revision < last_rev {
                errors.push(format!("{e} comes after revision {last_rev}"));
            }
            if e.mod_revision != last_rev {
                in_rev.clear();
            }
            if !in_rev.insert(&e.key) {
                errors.push(format!("{e}: key changed twice in one revision"));
            }
            last_rev = last_rev.max(e.mod_revision);
            if e.kind == EventKind::Put {
                let creation = e.version == 1 && e.create_revision == e.mod_revision;
                let problem = match last.get(e.key.as_slice()) {
                    Some(prev) if prev.kind == EventKind::Put => {
                        (e.create_revision != prev.create_revision || e.version != prev.version + 1)
                            .then(|| format!("{e} does not follow {prev}"))
                    }
                    Some(_) => (!creation).then(|| format!("{e} after a delete is not a creation")),
                    None if self.from_revision <= 1 => {
                        (!creation).then(|| format!("{e}: the key's first put is not a creation"))
                    }
                    None => None,
                };
                errors.extend(problem);
            }
            last.insert(&e.key, e);
        }
        errors
    }

    /// Compares the log's end state with `kvs`, a read of the whole range at
    /// `through_revision`: each key's last event must be a put equal to the key-value
    /// read, and every key read must have one. Only meaningful for a log from revision
    /// 1 (otherwise keys written before `from_revision` are not in it).
    pub fn check_final_state(&self, kvs: &[WatchEvent]) -> Vec<String> {
        let mut errors = Vec::new();
        let mut last: BTreeMap<&[u8], &WatchEvent> = BTreeMap::new();
        for e in &self.events {
            last.insert(&e.key, e);
        }
        let mut read: BTreeMap<&[u8], &WatchEvent> = BTreeMap::new();
        for kv in kvs {
            read.insert(&kv.key, kv);
        }
        for (key, e) in &last {
            match (e.kind, read.get(key)) {
                (EventKind::Put, Some(kv)) if *kv == *e => {}
                (EventKind::Put, got) => errors.push(format!(
                    "the log ends with {e}, a read at {} gives {}",
                    self.through_revision,
                    got.map_or("nothing".to_string(), |kv| kv.to_string())
                )),
                (EventKind::Delete, Some(kv)) => errors.push(format!(
                    "the log ends with {e}, a read at {} gives {kv}",
                    self.through_revision
                )),
                (EventKind::Delete, None) => {}
            }
        }
        for (key, kv) in &read {
            if self.range.contains(key) && !last.contains_key(key) {
                errors.push(format!("a read gives {kv}, which the log never wrote"));
            }
        }
        errors
    }
}

/// Where in a watcher's history something happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct At {
    pub watcher: String,
    /// 0-based session index.
    pub session: usize,
    /// 0-based response index within the session.
    pub response: usize,
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "watcher {} session {} response {}",
            self.watcher, self.session, self.response
        )
    }
}

/// A broken guarantee (or a broken recording / reference).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// The recording is malformed (a recorder bug, not the server's).
    InvalidHistory { watcher: String, detail: String },
    /// The reference log is inconsistent.
    Reference { detail: String },
    /// Revisions went back.
    Ordered { at: At, detail: String },
    /// An event delivered twice.
    Duplicate {
        at: At,
        event: WatchEvent,
        first: At,
    },
    /// A revision's events were split over responses (or some never came).
    Atomic {
        at: At,
        revision: i64,
        received: usize,
        missing: Vec<WatchEvent>,
    },
    /// Events jumped over mid-stream and never delivered.
    Gap {
        at: At,
        after: i64,
        next: WatchEvent,
        missing: Vec<WatchEvent>,
    },
    /// A session skipped events at its start or delivered one below its start revision.
    Resume {
        at: At,
        start_revision: i64,
        detail: String,
    },
    /// A progress notification claimed events delivered that were not.
    Bookmark {
        at: At,
        progress_revision: i64,
        detail: String,
    },
    /// An event differs from the reference's event of the same key and revision.
    Content {
        at: At,
        got: WatchEvent,
        want: WatchEvent,
    },
    /// An event the reference does not have.
    Phantom {
        at: At,
        event: WatchEvent,
        through: i64,
    },
    /// An event outside the watched range.
    OutOfRange {
        at: At,
        event: WatchEvent,
        range: KeyRange,
    },
    /// Canceled as compacted though the reference shows the history was available.
    Canceled {
        at: At,
        start_revision: i64,
        compact_revision: i64,
        reason: String,
    },
}

/// Lists a few events (all if few).
fn list(events: &[WatchEvent]) -> String {
    const MAX: usize = 5;
    let mut s = events
        .iter()
        .take(MAX)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if events.len() > MAX {
        s.push_str(&format!(" and {} more", events.len() - MAX));
    }
    s
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::InvalidHistory { watcher, detail } => {
                write!(f, "invalid recording of watcher {watcher}: {detail}")
            }
            Violation::Reference { detail } => write!(f, "inconsistent reference log: {detail}"),
            Violation::Ordered { at, detail } => write!(f, "ordered: {at}: {detail}"),
            Violation::Duplicate { at, event, first } => write!(
                f,
                "unique: {at}: {event} delivered again (first at {first})"
            ),
            Violation::Atomic {
                at,
                revision,
                received,
                missing,
            } => write!(
                f,
                "atomic: {at}: revision {revision} delivered with {received} of its {} \
                 event(s) in range; missing {}",
                received + missing.len(),
                list(missing)
            ),
            Violation::Gap {
                at,
                after,
                next,
                missing,
            } => write!(
                f,
                "reliable: {at}: after revision {after} came {next}, and {} event(s) in \
                 between never arrived: {}",
                missing.len(),
                list(missing)
            ),
            Violation::Resume {
                at,
                start_revision,
                detail,
            } => write!(
                f,
                "resumable: {at} (watch from revision {start_revision}): {detail}"
            ),
            Violation::Bookmark {
                at,
                progress_revision,
                detail,
            } => write!(
                f,
                "bookmarkable: {at}: progress notification at revision \
                 {progress_revision}: {detail}"
            ),
            Violation::Content { at, got, want } => {
                write!(f, "content: {at}: got {got}, the reference has {want}")
            }
            Violation::Phantom { at, event, through } => write!(
                f,
                "content: {at}: {event} is not in the reference log (through revision \
                 {through})"
            ),
            Violation::OutOfRange { at, event, range } => {
                write!(f, "range: {at}: {event} is outside the watched {range}")
            }
            Violation::Canceled {
                at,
                start_revision,
                compact_revision,
                reason,
            } => write!(
                f,
                "reliable: {at}: watch from revision {start_revision} canceled as compacted \
                 at {compact_revision} ({reason:?}), but the reference history is complete"
            ),
        }
    }
}

/// The outcome of [`check`].
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub watchers: usize,
    pub sessions: usize,
    pub resumed_sessions: usize,
    pub responses: usize,
    pub events_checked: usize,
    pub bookmarks: usize,
    pub reference_events: usize,
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
            "{} watcher(s), {} session(s) ({} resumed), {} response(s), {} event(s) \
             checked, {} bookmark(s), {} reference event(s): ",
            self.watchers,
            self.sessions,
            self.resumed_sessions,
            self.responses,
            self.events_checked,
            self.bookmarks,
            self.reference_events
        )?;
        if self.violations.is_empty() {
            return f.write_str("all six guarantees hold");
        }
        write!(f, "{} violation(s)", self.violations.len())?;
        const MAX: usize = 20;
        for v in self.violations.iter().take(MAX) {
            write!(f, "\n  {v}")?;
        }
        if self.violations.len() > MAX {
            write!(f, "\n  ... and {} more", self.violations.len() - MAX)?;
        }
        Ok(())
    }
}

/// Checks every watcher against the reference (see the module docs).
pub fn check(watchers: &[WatcherHistory], reference: &ReferenceLog) -> Report {
    let mut report = Report {
        watchers: watchers.len(),
        reference_events: reference.events.len(),
        ..Report::default()
    };
    for detail in reference.validate() {
        report.violations.push(Violation::Reference { detail });
    }
    let index: HashMap<EventId, usize> = reference
        .events
        .iter()
        .enumerate()
        .map(|(i, e)| (e.id(), i))
        .collect();
    for w in watchers {
        WatcherCheck::new(w, reference, &index, &mut report).run();
    }
    report
}

/// Why a reference event was jumped over (decided at the end if it never arrives).
#[derive(Debug, Clone)]
struct Skip {
    at: At,
    /// Jumped over by a session's first event (resumable) rather than mid-stream.
    at_session_start: bool,
    start_revision: i64,
    after: i64,
    next: WatchEvent,
}

/// The walk over one logical watcher.
struct WatcherCheck<'a> {
    w: &'a WatcherHistory,
    reference: &'a ReferenceLog,
    index: &'a HashMap<EventId, usize>,
    report: &'a mut Report,
    /// Reference events in the watcher's range, by revision (indices into the log).
    by_rev: BTreeMap<i64, Vec<usize>>,
    /// Delivered events, with where they were first delivered.
    seen: HashMap<EventId, At>,
    /// Reference events jumped over and not (yet) delivered.
    skipped: BTreeMap<usize, Skip>,
    /// Reference events already blamed (atomic, bookmark): their late arrival is not
    /// reported again.
    blamed: HashSet<usize>,
    /// The watcher has a complete view of everything up to here (by delivery,
    /// skip or blame).
    frontier: i64,
    /// The highest revision delivered.
    last_delivered: i64,
}

impl<'a> WatcherCheck<'a> {
    fn new(
        w: &'a WatcherHistory,
        reference: &'a ReferenceLog,
        index: &'a HashMap<EventId, usize>,
        report: &'a mut Report,
    ) -> Self {
        let mut by_rev: BTreeMap<i64, Vec<usize>> = BTreeMap::new();
        for (i, e) in reference.events.iter().enumerate() {
            if w.range.contains(&e.key) {
                by_rev.entry(e.mod_revision).or_default().push(i);
            }
        }
        WatcherCheck {
            w,
            reference,
            index,
            report,
            by_rev,
            seen: HashMap::new(),
            skipped: BTreeMap::new(),
            blamed: HashSet::new(),
            frontier: 0,
            last_delivered: 0,
        }
    }

    fn violation(&mut self, v: Violation) {
        self.report.violations.push(v);
    }

    fn invalid(&mut self, detail: String) {
        let watcher = self.w.name.clone();
        self.violation(Violation::InvalidHistory { watcher, detail });
    }

    fn at(&self, session: usize, response: usize) -> At {
        At {
            watcher: self.w.name.clone(),
            session,
            response,
        }
    }

    fn ref_event(&self, i: usize) -> &'a WatchEvent {
        &self.reference.events[i]
    }

    /// Reference events in range with revision in `lo..=hi`.
    fn in_range(&self, lo: i64, hi: i64) -> Vec<usize> {
        if lo > hi {
            return Vec::new();
        }
        self.by_rev
            .range(lo..=hi)
            .flat_map(|(_, v)| v.iter().copied())
            .collect()
    }

    fn run(mut self) {
        if !self.reference.range.covers(&self.w.range) {
            self.invalid(format!(
                "watches {}, but the reference log covers only {}",
                self.w.range, self.reference.range
            ));
            return;
        }
        let Some(first) = self.w.sessions.first() else {
            return;
        };
        self.frontier = first.start_revision - 1;
        self.last_delivered = first.start_revision - 1;
        let mut observed = first.start_revision - 1;
        for (s, session) in self.w.sessions.iter().enumerate() {
            self.report.sessions += 1;
            if session.resumed {
                self.report.resumed_sessions += 1;
            }
            if session.start_revision < 1 {
                self.invalid(format!(
                    "session {s} watches from revision {} (must be explicit, >= 1)",
                    session.start_revision
                ));
                return;
            }
            if session.start_revision < self.reference.from_revision {
                self.invalid(format!(
                    "session {s} watches from revision {}, before the reference log starts \
                     ({})",
                    session.start_revision, self.reference.from_revision
                ));
                return;
            }
            if session.resumed != (s > 0) {
                self.invalid(format!(
                    "session {s} is {}marked resumed",
                    if session.resumed { "" } else { "not " }
                ));
            }
            if s > 0 && session.start_revision != observed + 1 {
                self.invalid(format!(
                    "session {s} resumes from revision {}, but the last revision observed \
                     was {observed}",
                    session.start_revision
                ));
                return;
            }
            self.session(s, session);
            observed = session
                .responses
                .iter()
                .filter_map(Response::observed_revision)
                .fold(observed, i64::max);
        }
        self.finish();
    }

    fn session(&mut self, s: usize, session: &Session) {
        let mut header = 0;
        let mut canceled = false;
        let mut first_event = true;
        for (r, resp) in session.responses.iter().enumerate() {
            self.report.responses += 1;
            let at = self.at(s, r);
            if canceled {
                self.violation(Violation::Ordered {
                    at: at.clone(),
                    detail: "a response after the watch was canceled".into(),
                });
            }
            // Progress notifications may lag (see the module docs).
            if resp.kind != ResponseKind::Progress {
                if resp.header_revision < header {
                    self.violation(Violation::Ordered {
                        at: at.clone(),
                        detail: format!(
                            "header revision went back from {header} to {} within one \
                             stream",
                            resp.header_revision
                        ),
                    });
                }
                header = header.max(resp.header_revision);
            }
            match &resp.kind {
                ResponseKind::Created => {}
                ResponseKind::Canceled {
                    compact_revision,
                    reason,
                } => {
                    canceled = true;
                    if *compact_revision > 0 {
                        self.violation(Violation::Canceled {
                            at,
                            start_revision: session.start_revision,
                            compact_revision: *compact_revision,
                            reason: reason.clone(),
                        });
                    }
                }
                ResponseKind::Progress => self.progress(at, resp.header_revision),
                ResponseKind::Events(evs) => {
                    if evs.is_empty() {
                        continue;
                    }
                    let max = evs.iter().map(|e| e.mod_revision).max().unwrap_or(0);
                    if max > resp.header_revision {
                        self.violation(Violation::Ordered {
                            at: at.clone(),
                            detail: format!(
                                "header revision {} is below its event revision {max}",
                                resp.header_revision
                            ),
                        });
                    }
                    // Consecutive events of one revision form a group.
                    let mut i = 0;
                    while i < evs.len() {
                        let rev = evs[i].mod_revision;
                        let mut j = i;
                        while j < evs.len() && evs[j].mod_revision == rev {
                            j += 1;
                        }
                        self.group(&at, session, first_event, rev, &evs[i..j]);
                        first_event = false;
                        i = j;
                    }
                }
            }
        }
    }

    fn progress(&mut self, at: At, rev: i64) {
        self.report.bookmarks += 1;
        if rev > self.reference.through_revision {
            self.violation(Violation::Bookmark {
                at,
                progress_revision: rev,
                detail: format!(
                    "beyond the last revision {}",
                    self.reference.through_revision
                ),
            });
            return;
        }
        let missing: Vec<usize> = self
            .in_range(self.frontier + 1, rev)
            .into_iter()
            .filter(|&i| {
                !self.seen.contains_key(&self.ref_event(i).id())
                    && !self.skipped.contains_key(&i)
                    && !self.blamed.contains(&i)
            })
            .collect();
        if !missing.is_empty() {
            let events: Vec<WatchEvent> =
                missing.iter().map(|&i| self.ref_event(i).clone()).collect();
            self.blamed.extend(missing);
            self.violation(Violation::Bookmark {
                at,
                progress_revision: rev,
                detail: format!(
                    "{} event(s) up to it not delivered before it: {}",
                    events.len(),
                    list(&events)
                ),
            });
        }
        self.frontier = self.frontier.max(rev);
    }

    /// Events of one revision, consecutive in one response.
    fn group(
        &mut self,
        at: &At,
        session: &Session,
        first_event: bool,
        rev: i64,
        evs: &[WatchEvent],
    ) {
        self.report.events_checked += evs.len();
        // Reference indices of the valid events, in arrival order.
        let mut valid: Vec<usize> = Vec::new();
        for e in evs {
            if !self.w.range.contains(&e.key) {
                self.violation(Violation::OutOfRange {
                    at: at.clone(),
                    event: e.clone(),
                    range: self.w.range.clone(),
                });
                continue;
            }
            let Some(&i) = self.index.get(&e.id()) else {
                self.violation(Violation::Phantom {
                    at: at.clone(),
                    event: e.clone(),
                    through: self.reference.through_revision,
                });
                continue;
            };
            let want = self.ref_event(i);
            if e != want {
                self.violation(Violation::Content {
                    at: at.clone(),
                    got: e.clone(),
                    want: want.clone(),
                });
            }
            valid.push(i);
        }
        if valid.is_empty() {
            return;
        }
        if rev < session.start_revision {
            let e = self.ref_event(valid[0]);
            let detail = if self.seen.contains_key(&e.id()) {
                format!("repeats {e}, from before its start revision")
            } else {
                format!("delivered {e}, from before its start revision")
            };
            self.violation(Violation::Resume {
                at: at.clone(),
                start_revision: session.start_revision,
                detail,
            });
            for &i in &valid {
                let id = self.ref_event(i).id();
                self.seen.entry(id).or_insert_with(|| at.clone());
            }
            return;
        }
        // Unique.
        let mut fresh: Vec<usize> = Vec::new();
        for &i in &valid {
            let e = self.ref_event(i);
            if let Some(first) = self.seen.get(&e.id()) {
                let first = first.clone();
                self.violation(Violation::Duplicate {
                    at: at.clone(),
                    event: e.clone(),
                    first,
                });
            } else {
                self.seen.insert(e.id(), at.clone());
                fresh.push(i);
            }
        }
        if fresh.is_empty() {
            return;
        }
        // Within-revision order follows the reference (indices ascend).
        if fresh.windows(2).any(|p| p[0] > p[1]) {
            self.violation(Violation::Ordered {
                at: at.clone(),
                detail: format!(
                    "events of revision {rev} out of the reference's order: got {}",
                    list(
                        &fresh
                            .iter()
                            .map(|&i| self.ref_event(i).clone())
                            .collect::<Vec<_>>()
                    )
                ),
            });
        }
        // Atomic: every reference event of `rev` in range is here or came before.
        let here: HashSet<usize> = valid.iter().copied().collect();
        let missing: Vec<usize> = self
            .by_rev
            .get(&rev)
            .into_iter()
            .flatten()
            .copied()
            .filter(|i| {
                !here.contains(i)
                    && !self.seen.contains_key(&self.ref_event(*i).id())
                    && !self.blamed.contains(i)
            })
            .collect();
        if !missing.is_empty() {
            let events: Vec<WatchEvent> =
                missing.iter().map(|&i| self.ref_event(i).clone()).collect();
            self.blamed.extend(missing);
            self.violation(Violation::Atomic {
                at: at.clone(),
                revision: rev,
                received: here.len(),
                missing: events,
            });
        }
        if rev > self.frontier {
            // Reliable / resumable: everything in range strictly between the frontier
            // and `rev` was jumped over.
            let next = self.ref_event(fresh[0]).clone();
            for i in self.in_range(self.frontier + 1, rev - 1) {
                if self.blamed.contains(&i) || self.seen.contains_key(&self.ref_event(i).id()) {
                    continue;
                }
                self.skipped.insert(
                    i,
                    Skip {
                        at: at.clone(),
                        at_session_start: first_event,
                        start_revision: session.start_revision,
                        after: self.frontier,
                        next: next.clone(),
                    },
                );
            }
            self.frontier = rev;
        } else {
            // A late arrival: fine only if already blamed (atomic, bookmark).
            let mut late = Vec::new();
            let mut jumped_by = None;
            for &i in &fresh {
                if self.blamed.contains(&i) {
                    continue;
                }
                if let Some(skip) = self.skipped.remove(&i) {
                    jumped_by.get_or_insert((skip.next, skip.at));
                }
                late.push(self.ref_event(i).clone());
            }
            if !late.is_empty() {
                let detail = match jumped_by {
                    Some((next, first)) => format!(
                        "{} arrived after {next} (delivered at {first})",
                        list(&late)
                    ),
                    None => format!(
                        "{} arrived after revision {} had been delivered",
                        list(&late),
                        self.last_delivered
                    ),
                };
                self.violation(Violation::Ordered {
                    at: at.clone(),
                    detail,
                });
            }
        }
        self.last_delivered = self.last_delivered.max(rev);
    }

    /// Reference events jumped over and never delivered: gaps.
    fn finish(&mut self) {
        let skipped = std::mem::take(&mut self.skipped);
        // One violation per jump (same place, same next event).
        let mut jumps: Vec<(Skip, Vec<WatchEvent>)> = Vec::new();
        for (i, skip) in skipped {
            let e = self.ref_event(i).clone();
            match jumps.last_mut() {
                Some((s, evs)) if s.at == skip.at && s.next == skip.next => evs.push(e),
                _ => jumps.push((skip, vec![e])),
            }
        }
        for (skip, missing) in jumps {
            if skip.at_session_start {
                self.violation(Violation::Resume {
                    at: skip.at,
                    start_revision: skip.start_revision,
                    detail: format!(
                        "the first event is {}, skipping {} event(s) that never arrived: {}",
                        skip.next,
                        missing.len(),
                        list(&missing)
                    ),
                });
            } else {
                self.violation(Violation::Gap {
                    at: skip.at,
                    after: skip.after,
                    next: skip.next,
                    missing,
                });
            }
        }
    }
}

/// Connects to one endpoint for watching: no per-request timeout (a watch is one
/// long request), a short connect timeout.
pub async fn connect_for_watch(endpoint: &str) -> Result<etcd_client::Client> {
    let opts = etcd_client::ConnectOptions::new().with_connect_timeout(Duration::from_secs(2));
    Ok(etcd_client::Client::connect([endpoint], Some(opts)).await?)
}

/// Fetches the reference log of `range` for `from..=through` with a watch on
/// `endpoint`, reading until an event of revision `through` arrives (so `through`
/// must be the revision of a write in `range`, e.g. a marker put after the run).
/// Progress notifications are not trusted for completion (etcd 3.4 may send one
/// before catch-up events, etcd-io/etcd#15220).
pub async fn fetch_reference(
    endpoint: &str,
    range: &KeyRange,
    from: i64,
    through: i64,
    deadline: Duration,
) -> Result<ReferenceLog> {
    ensure!(
        from >= 1 && from <= through,
        "bad revisions {from}..={through}"
    );
    let end = Instant::now() + deadline;
    let client = tokio::time::timeout(deadline, connect_for_watch(endpoint))
        .await
        .context("connecting for the reference watch timed out")??;
    let mut opts = etcd_client::WatchOptions::new().with_start_revision(from);
    if !range.range_end.is_empty() {
        opts = opts.with_range(range.range_end.clone());
    }
    let mut stream = tokio::time::timeout(
        deadline,
        client
            .watch_client()
            .max_decoding_message_size(256 << 20)
            .watch(range.key.clone(), Some(opts)),
    )
    .await
    .context("creating the reference watch timed out")??;
    let mut events = Vec::new();
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, stream.message())
            .await
            .with_context(|| {
                format!(
                    "reference watch: no event of revision {through} within {deadline:?} \
                     ({} events so far)",
                    events.len()
                )
            })??;
        let Some(msg) = msg else {
            bail!("reference watch stream ended before revision {through}");
        };
        let resp = Response::from_etcd(&msg);
        match resp.kind {
            ResponseKind::Canceled {
                compact_revision,
                reason,
            } => bail!("reference watch canceled (compacted at {compact_revision}): {reason}"),
            ResponseKind::Events(evs) => {
                let done = evs.iter().any(|e| e.mod_revision >= through);
                events.extend(evs.into_iter().filter(|e| e.mod_revision <= through));
                if done {
                    break;
                }
            }
            ResponseKind::Created | ResponseKind::Progress => {}
        }
    }
    Ok(ReferenceLog {
        range: range.clone(),
        from_revision: from,
        through_revision: through,
        events,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, rev: i64, create: i64, version: i64) -> WatchEvent {
        WatchEvent::put(key, &format!("v{rev}"), rev, create, version)
    }

    /// Revisions 2..=8 under "p/": 2 put a, 3 put b, 4 txn put a + put c, 5 delete b,
    /// 6 put a, 7 txn delete a + delete c, 8 put b.
    fn reference() -> ReferenceLog {
        let events = vec![
            put("p/a", 2, 2, 1),
            put("p/b", 3, 3, 1),
            put("p/a", 4, 2, 2),
            put("p/c", 4, 4, 1),
            WatchEvent::delete("p/b", 5),
            put("p/a", 6, 2, 3),
            WatchEvent::delete("p/a", 7),
            WatchEvent::delete("p/c", 7),
            put("p/b", 8, 8, 1),
        ];
        ReferenceLog {
            range: KeyRange::prefix("p/"),
            from_revision: 1,
            through_revision: 8,
            events,
        }
    }

    /// The reference events of `rev`.
    fn r(rev: i64) -> Vec<WatchEvent> {
        reference()
            .events
            .into_iter()
            .filter(|e| e.mod_revision == rev)
            .collect()
    }

    /// The reference events of `revs`, in that order.
    fn rs(revs: &[i64]) -> Vec<WatchEvent> {
        revs.iter().flat_map(|&rev| r(rev)).collect()
    }

    fn session(start: i64, resumed: bool, responses: Vec<Response>) -> Session {
        let mut s = Session::new("m", start, resumed);
        s.responses = responses;
        s
    }

    fn watcher(range: KeyRange, sessions: Vec<Session>) -> WatcherHistory {
        let mut w = WatcherHistory::new("w", range);
        w.sessions = sessions;
        w
    }

    /// A correct history of "p/": catch-up from revision 1, a break after revision 4,
    /// a resume from 5 (on another member) with bookmarks.
    fn good() -> WatcherHistory {
        watcher(
            KeyRange::prefix("p/"),
            vec![
                session(
                    1,
                    false,
                    vec![
                        Response::created(3),
                        Response::events(3, rs(&[2, 3])),
                        Response::events(4, r(4)),
                    ],
                ),
                session(
                    5,
                    true,
                    vec![
                        Response::created(6),             // 0
                        Response::events(6, rs(&[5, 6])), // 1
                        Response::events(7, r(7)),        // 2
                        Response::progress(7),            // 3
                        Response::events(8, r(8)),        // 4
                        Response::progress(8),            // 5
                    ],
                ),
            ],
        )
    }

    fn run(w: WatcherHistory) -> Report {
        let report = check(&[w], &reference());
        println!("{report}");
        report
    }

    /// Asserts there is exactly one violation and that it matches `pred`.
    fn only(report: &Report, pred: impl Fn(&Violation) -> bool) {
        assert_eq!(report.violations.len(), 1, "{report}");
        assert!(pred(&report.violations[0]), "{report}");
    }

    #[test]
    fn watchcheck_key_ranges() {
        let p = KeyRange::prefix("p/");
        assert_eq!(p.range_end, b"p0");
        assert!(p.contains(b"p/") && p.contains(b"p/zz") && !p.contains(b"p0"));
        assert!(!p.contains(b"p") && !p.contains(b"q"));
        assert_eq!(KeyRange::prefix(vec![0xff]).range_end, vec![0]);
        assert_eq!(KeyRange::prefix(vec![b'a', 0xff]).range_end, b"b");
        let one = KeyRange::single("p/a");
        assert!(one.contains(b"p/a") && !one.contains(b"p/ab"));
        let from = KeyRange::between("p/b", "\0");
        assert!(from.contains(b"p/b") && from.contains(b"zzz") && !from.contains(b"p/a"));
        assert!(p.covers(&one) && p.covers(&KeyRange::between("p/a", "p/c")));
        assert!(!p.covers(&from) && from.covers(&KeyRange::single("q")));
        assert!(!one.covers(&p) && one.covers(&KeyRange::single("p/a")));
    }

    #[test]
    fn watchcheck_accepts_a_correct_history() {
        let report = run(good());
        assert!(report.is_ok(), "{report}");
        assert_eq!(report.sessions, 2);
        assert_eq!(report.resumed_sessions, 1);
        assert_eq!(report.events_checked, 9);
        assert_eq!(report.bookmarks, 2);
    }

    #[test]
    fn watchcheck_accepts_narrow_ranges_late_starts_and_lagging_members() {
        // Only "p/a", from revision 4: 4 and 7 are parts of multi-key revisions.
        let a = |rev: i64| -> Vec<WatchEvent> {
            r(rev).into_iter().filter(|e| e.key == b"p/a").collect()
        };
        let w = watcher(
            KeyRange::single("p/a"),
            vec![
                session(
                    4,
                    false,
                    vec![Response::events(4, a(4)), Response::progress(5)],
                ),
                session(6, true, vec![Response::events(7, [a(6), a(7)].concat())]),
            ],
        );
        let report = run(w);
        assert!(report.is_ok(), "{report}");
        // [p/b, p/c) from 1.
        let w = watcher(
            KeyRange::between("p/b", "p/c"),
            vec![session(
                1,
                false,
                vec![Response::events(5, rs(&[3, 5])), Response::progress(7)],
            )],
        );
        assert!(run(w).is_ok());
        // A resume on a member still at revision 3 bookmarks below the start.
        let mut w = good();
        w.sessions[1].responses[0] = Response::created(3);
        w.sessions[1].responses.insert(1, Response::progress(3));
        assert!(run(w).is_ok());
    }

    #[test]
    fn watchcheck_rejects_a_duplicated_event() {
        let mut w = good();
        w.sessions[1].responses[2] = Response::events(7, rs(&[6, 7]));
        only(
            &run(w),
            |v| matches!(v, Violation::Duplicate { event, .. } if event.mod_revision == 6),
        );
    }

    #[test]
    fn watchcheck_rejects_a_reordered_event() {
        let mut w = good();
        w.sessions[0].responses[1] = Response::events(3, rs(&[3, 2]));
        only(&run(w), |v| matches!(v, Violation::Ordered { .. }));
        // Across responses.
        let mut w = good();
        w.sessions[1].responses[2] = Response::events(8, r(8));
        w.sessions[1].responses[3] = Response::events(8, r(7));
        w.sessions[1].responses[4] = Response::progress(8);
        only(&run(w), |v| matches!(v, Violation::Ordered { .. }));
        // Within a revision (the reference's sub-revision order is c after a).
        let mut w = good();
        w.sessions[0].responses[2] = Response::events(4, rs(&[4]).into_iter().rev().collect());
        only(
            &run(w),
            |v| matches!(v, Violation::Ordered { detail, .. } if detail.contains("revision 4")),
        );
    }

    #[test]
    fn watchcheck_rejects_a_gap() {
        let mut w = good();
        w.sessions[1].responses[1] = Response::events(6, r(5));
        only(&run(w), |v| {
            matches!(v, Violation::Gap { after: 5, missing, .. }
                if missing.len() == 1 && missing[0].mod_revision == 6)
        });
    }

    #[test]
    fn watchcheck_rejects_a_split_revision() {
        let mut w = good();
        let (a, c) = (r(4)[0].clone(), r(4)[1].clone());
        w.sessions[0].responses[2] = Response::events(4, vec![a]);
        w.sessions[0].responses.push(Response::events(4, vec![c]));
        only(&run(w), |v| {
            matches!(v, Violation::Atomic { revision: 4, received: 1, missing, .. }
                if missing.len() == 1)
        });
        // A revision with an event missing for good is not atomic either.
        let mut w = good();
        w.sessions[1].responses[2] = Response::events(7, r(7)[..1].to_vec());
        only(&run(w), |v| {
            matches!(v, Violation::Atomic { revision: 7, .. })
        });
    }

    #[test]
    fn watchcheck_rejects_a_bad_bookmark() {
        // Progress at 6 before revision 6's event.
        let mut w = good();
        w.sessions[1].responses[1] = Response::events(6, r(5));
        w.sessions[1].responses.insert(2, Response::progress(6));
        w.sessions[1].responses.insert(3, Response::events(6, r(6)));
        only(&run(w), |v| {
            matches!(
                v,
                Violation::Bookmark {
                    progress_revision: 6,
                    ..
                }
            )
        });
        // Progress at 8 with revision 8 never delivered.
        let mut w = good();
        w.sessions[1].responses.remove(4);
        only(&run(w), |v| {
            matches!(
                v,
                Violation::Bookmark {
                    progress_revision: 8,
                    ..
                }
            )
        });
        // Beyond the last revision.
        let mut w = good();
        w.sessions[1].responses.push(Response::progress(9));
        only(&run(w), |v| {
            matches!(
                v,
                Violation::Bookmark {
                    progress_revision: 9,
                    ..
                }
            )
        });
    }

    #[test]
    fn watchcheck_rejects_a_resume_that_skips_or_repeats() {
        // Resumed from 5, the first event is revision 6.
        let mut w = good();
        w.sessions[1].responses[1] = Response::events(6, r(6));
        only(&run(w), |v| {
            matches!(v, Violation::Resume { start_revision: 5, detail, .. }
                if detail.contains("skipping 1"))
        });
        // Resumed from 5, revision 4 again.
        let mut w = good();
        w.sessions[1].responses[1] = Response::events(6, rs(&[4, 5, 6]));
        only(&run(w), |v| {
            matches!(v, Violation::Resume { start_revision: 5, detail, .. }
                if detail.contains("repeats"))
        });
        // A first session that skips from its start revision.
        let mut w = good();
        w.sessions[0].responses[1] = Response::events(3, r(3));
        only(&run(w), |v| {
            matches!(
                v,
                Violation::Resume {
                    start_revision: 1,
                    ..
                }
            )
        });
    }

    #[test]
    fn watchcheck_rejects_wrong_contents_and_foreign_events() {
        let mut w = good();
        let mut six = r(6);
        six[0].value = b"other".to_vec();
        w.sessions[1].responses[1] = Response::events(6, [r(5), six].concat());
        only(&run(w), |v| matches!(v, Violation::Content { .. }));

        let mut w = good();
        let z = put("p/z", 7, 7, 1);
        w.sessions[1]
            .responses
            .insert(2, Response::events(7, vec![z]));
        only(&run(w), |v| matches!(v, Violation::Phantom { .. }));

        let w = watcher(
            KeyRange::between("p/a", "p/c"),
            vec![session(
                1,
                false,
                vec![Response::events(3, rs(&[2, 3])), Response::events(4, r(4))],
            )],
        );
        only(
            &run(w),
            |v| matches!(v, Violation::OutOfRange { event, .. } if event.key == b"p/c"),
        );
    }

    #[test]
    fn watchcheck_rejects_header_regressions_cancels_and_bad_resumes() {
        let mut w = good();
        w.sessions[1].responses[2].header_revision = 9;
        only(
            &run(w),
            |v| matches!(v, Violation::Ordered { detail, .. } if detail.contains("went back")),
        );
        // A lagging progress notification within one stream is fine (etcd 3.4 sends
        // them): it claims nothing that was not delivered.
        let mut w = good();
        w.sessions[1].responses[3] = Response::progress(5);
        assert!(run(w).is_ok());

        let mut w = good();
        w.sessions[1].responses[2].header_revision = 6;
        only(
            &run(w),
            |v| matches!(v, Violation::Ordered { detail, .. } if detail.contains("below")),
        );

        let mut w = good();
        w.sessions[1].responses.push(Response {
            header_revision: 8,
            kind: ResponseKind::Canceled {
                compact_revision: 3,
                reason: "compacted".into(),
            },
        });
        only(&run(w), |v| matches!(v, Violation::Canceled { .. }));

        // The recorder resumed from the wrong revision.
        let mut w = good();
        w.sessions[1].start_revision = 4;
        only(&run(w), |v| matches!(v, Violation::InvalidHistory { .. }));
    }

    #[test]
    fn watchcheck_validates_the_reference() {
        let mut reference = reference();
        assert!(reference.validate().is_empty());
        let kvs = [put("p/b", 8, 8, 1)];
        assert!(reference.check_final_state(&kvs).is_empty());
        assert_eq!(reference.check_final_state(&[]).len(), 1);
        let extra = [kvs[0].clone(), put("p/q", 8, 8, 1)];
        assert_eq!(reference.check_final_state(&extra).len(), 1);
        reference.events[2].version = 3;
        assert_eq!(reference.validate().len(), 2, "{:?}", reference.validate());
        reference.events.swap(0, 1);
        assert!(!reference.validate().is_empty());
        let report = check(&[good()], &reference);
        assert!(
            report
                .violations
                .iter()
                .any(|v| matches!(v, Violation::Reference { .. }))
        );
    }
}
