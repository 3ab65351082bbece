//! Acceptance tests of the Watch API through the `etcd-client` crate.
//!
//! Every differential scenario runs twice: against a real etcd 3.4 (Debian's
//! `etcd-server`) started by the test, and against `concord`. Each run must pass the
//! absolute assertions (every watcher's events equal those a model of the writes
//! predicts; headers, ids, flags as etcd documents them), and the two runs' transcripts
//! must be equal: every response, grouped per stream and watch id, with cluster id,
//! member id and raft term left out (they legitimately differ between clusters).
//!
//! The slow-watcher test runs against concord alone: a client that never reads must
//! delay neither writes nor other watchers, and must not make the server's memory grow
//! without bound.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use concord_integration::{Concord, Etcd, connect};
use etcd_client::{
    Client, DeleteOptions, EventType, KeyValue, Txn, TxnOp, WatchFilterType, WatchOptions,
    WatchResponse, WatchStream,
};

/// How long any one awaited condition may take.
const DEADLINE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------
// A model of the writes: what each watcher must see.

/// One event as a watcher must see it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ev {
    rev: i64,
    put: bool,
    key: Vec<u8>,
    value: Vec<u8>,
    /// The previous value, when the watcher asked for `prev_kv` and the key existed.
    prev: Option<Vec<u8>>,
}

/// Every event the test caused, in revision order (and op order within a revision).
#[derive(Default)]
struct Model {
    evs: Vec<Ev>,
}

impl Model {
    /// `key`'s value just before `rev`, if it existed then.
    fn value_before(&self, key: &[u8], rev: i64) -> Option<Vec<u8>> {
        self.evs
            .iter()
            .rev()
            .find(|e| e.key == key && e.rev < rev)
            .and_then(|e| e.put.then(|| e.value.clone()))
    }

    fn record(&mut self, rev: i64, put: bool, key: &[u8], value: &[u8]) {
        let prev = self.value_before(key, rev);
        self.evs.push(Ev {
            rev,
            put,
            key: key.to_vec(),
            value: value.to_vec(),
            prev,
        });
    }

    fn exists(&self, key: &[u8]) -> bool {
        self.value_before(key, i64::MAX).is_some()
    }

    /// What the watcher `spec` must receive, in order.
    fn expected(&self, spec: &Spec) -> Vec<Ev> {
        self.evs
            .iter()
            .filter(|e| spec.matches(e))
            .map(|e| Ev {
                prev: if spec.prev_kv { e.prev.clone() } else { None },
                ..e.clone()
            })
            .collect()
    }
}

/// A client that records every write in the model.
struct Writer {
    client: Client,
    model: Model,
}

impl Writer {
    async fn put(&mut self, key: &str, value: &[u8]) -> i64 {
        let r = self.client.put(key, value, None).await.unwrap();
        let rev = r.header().unwrap().revision();
        self.model.record(rev, true, key.as_bytes(), value);
        rev
    }

    /// Deletes `key`, or every key with the prefix `key`.
    async fn delete(&mut self, key: &str, prefix: bool) -> i64 {
        let mut opts = DeleteOptions::new().with_prev_key();
        if prefix {
            opts = opts.with_prefix();
        }
        let r = self.client.delete(key, Some(opts)).await.unwrap();
        let rev = r.header().unwrap().revision();
        for kv in r.prev_kvs() {
            self.model.record(rev, false, kv.key(), b"");
        }
        rev
    }

    /// One txn of puts (`Some(value)`) and single-key deletes (`None`).
    async fn txn(&mut self, ops: &[(&str, Option<&[u8]>)]) -> i64 {
        let txn = Txn::new().and_then(
            ops.iter()
                .map(|(k, v)| match v {
                    Some(v) => TxnOp::put(*k, *v, None),
                    None => TxnOp::delete(*k, None),
                })
                .collect::<Vec<_>>(),
        );
        let r = self.client.txn(txn).await.unwrap();
        let rev = r.header().unwrap().revision();
        for (k, v) in ops {
            match v {
                Some(v) => self.model.record(rev, true, k.as_bytes(), v),
                None if self.model.exists(k.as_bytes()) => {
                    self.model.record(rev, false, k.as_bytes(), b"")
                }
                None => {}
            }
        }
        rev
    }

    async fn revision(&mut self) -> i64 {
        let r = self.client.get("any", None).await.unwrap();
        r.header().unwrap().revision()
    }
}

// ---------------------------------------------------------------------------------
// Watchers, streams and transcripts.

/// A watch create request, and the model's view of what it selects.
#[derive(Debug, Clone, Default)]
struct Spec {
    key: Vec<u8>,
    /// The raw `range_end`: empty for one key, `[0]` for "every key >= key".
    end: Vec<u8>,
    start: i64,
    id: i64,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    fragment: bool,
    progress_notify: bool,
}

impl Spec {
    fn key(key: &str) -> Spec {
        Spec {
            key: key.as_bytes().to_vec(),
            ..Spec::default()
        }
    }

    fn prefix(prefix: &str) -> Spec {
        let mut end = prefix.as_bytes().to_vec();
        while let Some(last) = end.pop() {
            if last < 0xff {
                end.push(last + 1);
                break;
            }
        }
        Spec {
            end,
            ..Spec::key(prefix)
        }
    }

    fn range(key: &str, end: &[u8]) -> Spec {
        Spec {
            end: end.to_vec(),
            ..Spec::key(key)
        }
    }

    fn start(self, start: i64) -> Spec {
        Spec { start, ..self }
    }

    fn id(self, id: i64) -> Spec {
        Spec { id, ..self }
    }

    fn prev_kv(self) -> Spec {
        Spec {
            prev_kv: true,
            ..self
        }
    }

    fn no_put(self) -> Spec {
        Spec {
            no_put: true,
            ..self
        }
    }

    fn no_delete(self) -> Spec {
        Spec {
            no_delete: true,
            ..self
        }
    }

    fn fragment(self) -> Spec {
        Spec {
            fragment: true,
            ..self
        }
    }

    fn progress_notify(self) -> Spec {
        Spec {
            progress_notify: true,
            ..self
        }
    }

    /// The model's view of a watcher created while the current revision was `current`:
    /// start revision 0 means `current + 1`.
    fn created_at(&self, current: i64) -> Spec {
        Spec {
            start: if self.start == 0 {
                current + 1
            } else {
                self.start
            },
            ..self.clone()
        }
    }

    fn options(&self) -> WatchOptions {
        let mut o = WatchOptions::new()
            .with_start_revision(self.start)
            .with_watch_id(self.id);
        if !self.end.is_empty() {
            o = o.with_range(self.end.clone());
        }
        let mut filters = Vec::new();
        if self.no_put {
            filters.push(WatchFilterType::NoPut);
        }
        if self.no_delete {
            filters.push(WatchFilterType::NoDelete);
        }
        if !filters.is_empty() {
            o = o.with_filters(filters);
        }
        if self.prev_kv {
            o = o.with_prev_key();
        }
        if self.fragment {
            o = o.with_fragment();
        }
        if self.progress_notify {
            o = o.with_progress_notify();
        }
        o
    }

    fn selects(&self, key: &[u8]) -> bool {
        match self.end.as_slice() {
            [] => key == self.key,
            [0] => key >= self.key.as_slice(),
            end => key >= self.key.as_slice() && key < end,
        }
    }

    fn matches(&self, e: &Ev) -> bool {
        self.selects(&e.key)
            && e.rev >= self.start
            && if e.put { !self.no_put } else { !self.no_delete }
    }
}

fn ev(e: &etcd_client::Event) -> Ev {
    let kv = e.kv().expect("an event carries its kv");
    Ev {
        rev: kv.mod_revision(),
        put: e.event_type() == EventType::Put,
        key: kv.key().to_vec(),
        value: kv.value().to_vec(),
        prev: e.prev_kv().map(|p| p.value().to_vec()),
    }
}

/// `etcd-client` hides `WatchResponse.fragment` (it is only public with the crate's
/// `pub-response-field` feature); its `Debug` output shows the wire message's fields.
fn is_fragment(r: &WatchResponse) -> bool {
    format!("{r:?}").contains("fragment: true")
}

fn revision(r: &WatchResponse) -> i64 {
    r.header().map_or(-1, |h| h.revision())
}

/// A progress notification (per watcher) or a `RequestProgress` answer (watch id -1).
fn is_progress(r: &WatchResponse) -> bool {
    r.events().is_empty() && !r.created() && !r.canceled() && r.compact_revision() == 0
}

fn bytes(b: &[u8]) -> String {
    if b.len() > 40 {
        format!(
            "<{} bytes {:?}..>",
            b.len(),
            String::from_utf8_lossy(&b[..8])
        )
    } else {
        format!("{:?}", String::from_utf8_lossy(b))
    }
}

fn kv_text(kv: &KeyValue) -> String {
    format!(
        "{}={} c{} m{} v{} l{}",
        bytes(kv.key()),
        bytes(kv.value()),
        kv.create_revision(),
        kv.mod_revision(),
        kv.version(),
        kv.lease()
    )
}

/// One response with everything that must be equal on two clusters.
fn render(r: &WatchResponse) -> String {
    let mut s = format!("id={} rev={}", r.watch_id(), revision(r));
    if r.created() {
        s += " created";
    }
    if r.canceled() {
        s += " canceled";
    }
    if r.compact_revision() != 0 {
        s += &format!(" compact={}", r.compact_revision());
    }
    if !r.cancel_reason().is_empty() {
        s += &format!(" reason={:?}", r.cancel_reason());
    }
    if is_fragment(r) {
        s += " fragment";
    }
    for e in r.events() {
        let kind = match e.event_type() {
            EventType::Put => "PUT",
            EventType::Delete => "DELETE",
        };
        s += &format!(" [{kind} {}", kv_text(e.kv().unwrap()));
        if let Some(p) = e.prev_kv() {
            s += &format!(" prev {}", kv_text(p));
        }
        s += "]";
    }
    s
}

/// A client's watch stream and every response it has read.
struct Recorder {
    name: String,
    stream: WatchStream,
    log: Vec<WatchResponse>,
    /// When each response was read.
    at: Vec<Instant>,
}

impl Recorder {
    async fn open(client: &mut Client, name: &str, first: &Spec) -> Recorder {
        let stream = client
            .watch(first.key.clone(), Some(first.options()))
            .await
            .unwrap();
        Recorder {
            name: name.to_string(),
            stream,
            log: Vec::new(),
            at: Vec::new(),
        }
    }

    async fn add(&mut self, spec: &Spec) {
        self.stream
            .watch(spec.key.clone(), Some(spec.options()))
            .await
            .unwrap();
    }

    /// Reads responses until `done` holds for everything read so far.
    async fn read_until(&mut self, what: &str, done: impl Fn(&[WatchResponse]) -> bool) {
        let end = Instant::now() + DEADLINE;
        while !done(&self.log) {
            let left = end.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.stream.message()).await {
                Ok(Ok(Some(r))) => {
                    self.log.push(r);
                    self.at.push(Instant::now());
                }
                Ok(Ok(None)) => panic!("{}: stream ended waiting for {what}", self.name),
                Ok(Err(e)) => panic!("{}: stream failed waiting for {what}: {e}", self.name),
                Err(_) => panic!(
                    "{}: no {what} within {DEADLINE:?}; read so far:\n{}",
                    self.name,
                    self.lines().join("\n")
                ),
            }
        }
    }

    /// Reads until `n` created responses (including refused creates) arrived.
    async fn created(&mut self, n: usize) {
        self.read_until(&format!("{n} created responses"), |log| {
            log.iter().filter(|r| r.created()).count() >= n
        })
        .await;
    }

    /// Reads until each `(id, spec)` has all the events the model predicts.
    async fn caught_up(&mut self, model: &Model, watchers: &[(i64, &Spec)]) {
        let want: Vec<(i64, usize)> = watchers
            .iter()
            .map(|(id, s)| (*id, model.expected(s).len()))
            .collect();
        self.read_until("the predicted events", |log| {
            want.iter().all(|(id, n)| events_of(log, *id).len() >= *n)
        })
        .await;
    }

    /// Sends `RequestProgress` and reads until it is answered; returns the answer.
    async fn progress(&mut self) -> WatchResponse {
        let before = self.log.len();
        self.stream.request_progress().await.unwrap();
        self.read_until("the RequestProgress answer", |log| {
            log[before..]
                .iter()
                .any(|r| r.watch_id() == -1 && is_progress(r))
        })
        .await;
        self.log[before..]
            .iter()
            .find(|r| r.watch_id() == -1 && is_progress(r))
            .cloned()
            .unwrap()
    }

    /// The transcript: responses grouped per watch id, in the order read.
    fn lines(&self) -> Vec<String> {
        let label = self
            .name
            .split_once(' ')
            .map_or(self.name.as_str(), |(_, l)| l);
        let mut by_id: BTreeMap<i64, Vec<String>> = BTreeMap::new();
        for r in &self.log {
            by_id.entry(r.watch_id()).or_default().push(render(r));
        }
        by_id
            .into_values()
            .flatten()
            .map(|l| format!("{label}: {l}"))
            .collect()
    }

    fn of(&self, id: i64) -> Vec<&WatchResponse> {
        self.log.iter().filter(|r| r.watch_id() == id).collect()
    }
}

/// Every event the watcher `id` received, in order.
fn events_of(log: &[WatchResponse], id: i64) -> Vec<Ev> {
    log.iter()
        .filter(|r| r.watch_id() == id)
        .flat_map(|r| r.events().iter().map(ev))
        .collect()
}

/// Asserts that each watcher received exactly what the model predicts, every revision
/// in one response (or one run of fragments), and live headers at the event's revision.
fn check_events(server: &str, rec: &Recorder, model: &Model, watchers: &[(i64, &Spec)]) {
    for (id, spec) in watchers {
        assert_eq!(
            events_of(&rec.log, *id),
            model.expected(spec),
            "{server}: {}: events of watcher {id} ({spec:?})",
            rec.name
        );
        // Atomic: a revision's events never straddle two responses (unless fragmented).
        let mut seen_revs: Vec<i64> = Vec::new();
        for r in rec.of(*id) {
            let revs: Vec<i64> = r
                .events()
                .iter()
                .map(|e| e.kv().unwrap().mod_revision())
                .collect();
            if let (Some(first), Some(last)) = (revs.first(), revs.last()) {
                assert!(
                    seen_revs.last().is_none_or(|prev| prev < first),
                    "{server}: watcher {id}: revision {first} split over responses or out of order"
                );
                assert!(
                    revision(r) >= *last,
                    "{server}: watcher {id}: header revision {} below its events' {last}",
                    revision(r)
                );
                if !is_fragment(r) {
                    seen_revs.push(*last);
                }
            }
        }
    }
}

fn compare(what: &str, etcd: &[String], concord: &[String]) {
    if etcd == concord {
        return;
    }
    let mut diff = String::new();
    for i in 0..etcd.len().max(concord.len()) {
        let (a, b) = (etcd.get(i), concord.get(i));
        if a != b {
            diff += &format!(
                "  etcd:    {}\n  concord: {}\n",
                a.map_or("-", |s| s),
                b.map_or("-", |s| s)
            );
        }
    }
    panic!(
        "{what}: concord's transcript differs from etcd's\n{diff}\n--- etcd\n{}\n--- concord\n{}",
        etcd.join("\n"),
        concord.join("\n")
    );
}

async fn pair(concord_flags: &[&str], etcd_flags: &[&str]) -> (Etcd, Concord) {
    let (e, c) = tokio::join!(
        Etcd::start_with(etcd_flags),
        Concord::start_with(concord_flags)
    );
    (
        e.expect("reference etcd starts (apt-get install etcd-server)"),
        c.expect("concord starts"),
    )
}

// ---------------------------------------------------------------------------------
// Scenarios.

/// Key, prefix, from-key and all-keys ranges; start revisions 0, past and future;
/// filters; prev_kv; client-chosen and duplicate ids; many watchers on one stream;
/// multi-event revisions; cancel; RequestProgress; compacted start revisions. Returns the
/// transcript.
async fn options_scenario(server: &str, endpoint: &str) -> Vec<String> {
    let mut w = Writer {
        client: connect(endpoint).await.unwrap(),
        model: Model::default(),
    };
    // History: revisions 2..=9.
    assert_eq!(w.put("a", b"1").await, 2);
    w.put("foo", b"v1").await; // 3
    w.put("foo/x", b"x1").await; // 4
    w.put("foo", b"v2").await; // 5
    w.delete("foo", false).await; // 6
    let r7 = w
        .txn(&[
            ("foo/y", Some(b"y1")),
            ("foo/z", Some(b"z1")),
            ("zz", Some(b"1")),
            ("foo/x", None),
        ])
        .await;
    assert_eq!(r7, 7);
    w.put("foo", b"v3").await; // 8
    assert_eq!(w.put("b", b"1").await, 9);

    // One stream, many watchers; ids are assigned in order, skipping the chosen one.
    let specs: Vec<(i64, Spec)> = vec![
        (0, Spec::key("foo")),                              // now: current + 1
        (1, Spec::key("foo").start(2).prev_kv()),           // history
        (2, Spec::prefix("foo").start(1)),                  // whole history, prefix
        (3, Spec::key("foo/y").start(1).prev_kv().id(3)),   // chosen id
        (4, Spec::range("foo", b"\0").start(4).no_put()),   // from-key, deletes only
        (5, Spec::range("\0", b"\0").start(1).no_delete()), // all keys, puts only
        (6, Spec::range("b", b"foo0").start(7)),            // [b, foo0)
        (7, Spec::prefix("foo").start(12).prev_kv()),       // future: waits for 12
        (100, Spec::prefix("foo/").id(100)),                // chosen id above the rest
    ];
    let duplicate = Spec::key("zz").start(1).id(100);
    let empty = Spec::range("b", b"a");
    let mut s1 = Recorder::open(&mut w.client, &format!("{server} s1"), &specs[0].1).await;
    for (_, spec) in &specs[1..] {
        s1.add(spec).await;
    }
    s1.add(&duplicate).await;
    s1.add(&empty).await;
    s1.created(specs.len() + 2).await;

    // Created responses: in request order, the stream's ids, at the current revision.
    let created: Vec<(i64, bool, String, i64)> = s1
        .log
        .iter()
        .filter(|r| r.created())
        .map(|r| {
            (
                r.watch_id(),
                r.canceled(),
                r.cancel_reason().to_string(),
                revision(r),
            )
        })
        .collect();
    let mut want: Vec<(i64, bool, String, i64)> = specs
        .iter()
        .map(|(id, _)| (*id, false, String::new(), 9))
        .collect();
    want.push((
        -1,
        true,
        "mvcc: duplicate watch ID provided on the WatchStream".into(),
        9,
    ));
    want.push((-1, true, "mvcc: watcher range is empty".into(), 9));
    assert_eq!(created, want, "{server}: created responses");

    let resolved: Vec<(i64, Spec)> = specs.iter().map(|(id, s)| (*id, s.created_at(9))).collect();
    let watchers: Vec<(i64, &Spec)> = resolved.iter().map(|(id, s)| (*id, s)).collect();
    s1.caught_up(&w.model, &watchers).await;
    // A catch-up from history is one response at the current revision.
    for id in [1, 2, 3, 4, 5, 6] {
        let evs: Vec<_> = s1.of(id).into_iter().filter(|r| !r.created()).collect();
        assert_eq!(
            evs.len(),
            1,
            "{server}: watcher {id} caught up in one response"
        );
        assert_eq!(
            revision(evs[0]),
            9,
            "{server}: watcher {id} catch-up header"
        );
    }

    // Live writes.
    w.put("foo", b"v4").await; // 10
    w.delete("foo/", true).await; // 11: foo/y and foo/z in one revision
    w.put("foo/q", b"q1").await; // 12: the future watcher's first
    w.txn(&[("foo", Some(b"v5")), ("foo/r", Some(b"r1")), ("a", None)])
        .await; // 13
    w.delete("foo", false).await; // 14
    s1.caught_up(&w.model, &watchers).await;
    for id in [0, 7] {
        for r in s1.of(id).into_iter().filter(|r| !r.created()) {
            let rev = r.events()[0].kv().unwrap().mod_revision();
            assert_eq!(
                revision(r),
                rev,
                "{server}: a live response's header revision"
            );
        }
    }
    // A revision's events arrive together: the prefix delete's two, the txn's two.
    for (id, rev, n) in [(100, 11, 2), (2, 11, 2), (2, 13, 2), (5, 13, 2), (4, 11, 2)] {
        let rs: Vec<&WatchResponse> = s1
            .of(id)
            .into_iter()
            .filter(|r| {
                r.events()
                    .iter()
                    .any(|e| e.kv().unwrap().mod_revision() == rev)
            })
            .collect();
        assert_eq!(
            rs.len(),
            1,
            "{server}: watcher {id}: revision {rev} in one response"
        );
        assert_eq!(rs[0].events().len(), n, "{server}: {}", render(rs[0]));
    }

    // Cancel: answered, and the watcher gets nothing more; unknown ids are ignored.
    s1.stream.cancel(999).await.unwrap();
    s1.stream.cancel(1).await.unwrap();
    s1.read_until("the cancel answer", |log| {
        log.iter().any(|r| r.watch_id() == 1 && r.canceled())
    })
    .await;
    let cancel = s1.of(1).into_iter().find(|r| r.canceled()).unwrap().clone();
    assert_eq!(
        (
            revision(&cancel),
            cancel.events().len(),
            cancel.compact_revision()
        ),
        (14, 0, 0),
        "{server}: the cancel answer"
    );
    let after_cancel = s1.of(1).len();
    let last = w.put("foo", b"v6").await; // 15
    let live: Vec<(i64, &Spec)> = watchers
        .iter()
        .copied()
        .filter(|(id, _)| *id != 1)
        .collect();
    s1.caught_up(&w.model, &live).await;

    // RequestProgress: a stream-wide answer (watch id -1) at the current revision, read
    // after every event before it.
    let p = s1.progress().await;
    assert_eq!(
        revision(&p),
        last,
        "{server}: RequestProgress header revision"
    );
    assert_eq!(
        s1.of(1).len(),
        after_cancel,
        "{server}: a canceled watcher got more"
    );
    assert!(
        s1.of(999).is_empty(),
        "{server}: canceling an unknown id answered"
    );
    check_events(server, &s1, &w.model, &live);
    let m1 = Model {
        evs: w
            .model
            .evs
            .iter()
            .filter(|e| e.rev <= 14)
            .cloned()
            .collect(),
    };
    check_events(server, &s1, &m1, &[(1, &resolved[1].1)]);

    // Many watchers on one stream, all told about one write.
    let many = Spec::key("many");
    let mut s2 = Recorder::open(&mut w.client, &format!("{server} s2"), &many).await;
    for _ in 1..200 {
        s2.add(&many).await;
    }
    s2.created(200).await;
    w.put("many", b"1").await; // 16
    s2.read_until("an event for each of 200 watchers", |log| {
        log.iter().filter(|r| !r.events().is_empty()).count() >= 200
    })
    .await;
    let ids: Vec<i64> = s2
        .log
        .iter()
        .filter(|r| r.created())
        .map(|r| r.watch_id())
        .collect();
    assert_eq!(
        ids,
        (0..200).collect::<Vec<_>>(),
        "{server}: ids of 200 watchers"
    );
    let many = many.created_at(15);
    let many_w: Vec<(i64, &Spec)> = (0..200).map(|id| (id, &many)).collect();
    check_events(server, &s2, &w.model, &many_w);

    // Compaction: a start revision below it is refused with the compaction revision,
    // at it or above it works.
    w.client.compact(5, None).await.unwrap();
    let current = w.revision().await;
    assert_eq!(current, 16);
    let compacted = [
        (0, Spec::key("foo").start(2)),
        (1, Spec::prefix("foo").start(4).prev_kv()),
    ];
    let fine = [
        (2, Spec::key("foo").start(5)),
        (3, Spec::prefix("foo").start(6).prev_kv()),
    ];
    let mut s3 = Recorder::open(&mut w.client, &format!("{server} s3"), &compacted[0].1).await;
    for (_, s) in compacted[1..].iter().chain(&fine) {
        s3.add(s).await;
    }
    s3.created(4).await;
    s3.read_until("the compacted cancels", |log| {
        log.iter().filter(|r| r.compact_revision() != 0).count() >= 2
    })
    .await;
    for (id, _) in &compacted {
        let rs = s3.of(*id);
        assert_eq!(
            rs.len(),
            2,
            "{server}: watcher {id}: created, then canceled"
        );
        assert!(rs[0].created() && !rs[0].canceled());
        assert!(
            rs[1].canceled() && !rs[1].created(),
            "{server}: {}",
            render(rs[1])
        );
        assert_eq!(rs[1].compact_revision(), 5, "{server}: compact_revision");
        assert!(rs[1].events().is_empty());
    }
    let fine_w: Vec<(i64, &Spec)> = fine.iter().map(|(id, s)| (*id, s)).collect();
    s3.caught_up(&w.model, &fine_w).await;
    // The compacted watchers are gone: a write reaches only the others.
    w.put("foo", b"v7").await; // 17
    s3.caught_up(&w.model, &fine_w).await;
    s3.progress().await;
    check_events(server, &s3, &w.model, &fine_w);
    for (id, _) in &compacted {
        assert_eq!(
            s3.of(*id).len(),
            2,
            "{server}: watcher {id} after its cancel"
        );
    }

    let mut t = s1.lines();
    t.extend(s2.lines());
    t.extend(s3.lines());
    t
}

#[tokio::test]
async fn watch_options_match_etcd() {
    let (etcd, concord) = pair(&[], &[]).await;
    let want = options_scenario("etcd", &etcd.endpoint()).await;
    let got = options_scenario("concord", &concord.endpoint()).await;
    compare("watch options", &want, &got);
    eprintln!("concord and etcd answered alike:\n{}", want.join("\n"));
}

/// Per-watcher progress notifications with a 1 s interval: only for watchers that asked
/// (including one waiting for a future revision), at the current revision, about once
/// an interval. Returns the transcript with repeats collapsed (their number depends on
/// timing).
async fn progress_scenario(server: &str, endpoint: &str) -> Vec<String> {
    let mut w = Writer {
        client: connect(endpoint).await.unwrap(),
        model: Model::default(),
    };
    w.put("p", b"1").await; // 2
    let notified = Spec::key("p").progress_notify();
    let quiet = Spec::key("p");
    let future = Spec::key("p").start(100).progress_notify();
    let mut s = Recorder::open(&mut w.client, &format!("{server} s"), &notified).await;
    s.add(&quiet).await;
    s.add(&future).await;
    s.created(3).await;
    let notifications = |log: &[WatchResponse], id: i64| {
        log.iter()
            .filter(|r| r.watch_id() == id && is_progress(r))
            .count()
    };
    s.read_until("two notifications for each notified watcher", |log| {
        notifications(log, 0) >= 2 && notifications(log, 2) >= 2
    })
    .await;
    w.put("p", b"2").await; // 3
    s.read_until("a notification at the write's revision", |log| {
        [0, 2].iter().all(|id| {
            log.iter()
                .any(|r| r.watch_id() == *id && is_progress(r) && revision(r) == 3)
        })
    })
    .await;
    assert_eq!(
        notifications(&s.log, 1),
        0,
        "{server}: a watcher that did not ask"
    );
    for id in [0, 2] {
        let at: Vec<(Instant, i64)> = s
            .log
            .iter()
            .zip(&s.at)
            .filter(|(r, _)| r.watch_id() == id && is_progress(r))
            .map(|(r, t)| (*t, revision(r)))
            .collect();
        assert_eq!(at[0].1, 2, "{server}: progress at the current revision");
        for pair in at.windows(2) {
            let gap = pair[1].0 - pair[0].0;
            assert!(
                gap > Duration::from_millis(700) && gap < Duration::from_secs(4),
                "{server}: watcher {id}: notifications {gap:?} apart at a 1 s interval"
            );
            assert!(pair[0].1 <= pair[1].1, "{server}: progress went back");
        }
    }
    let mut lines = s.lines();
    lines.dedup();
    lines
}

#[tokio::test]
async fn progress_notify_matches_etcd() {
    let (etcd, concord) = pair(
        &["--watch-progress-notify-interval", "1s"],
        &["--experimental-watch-progress-notify-interval", "1s"],
    )
    .await;
    let (e, c) = (etcd.endpoint(), concord.endpoint());
    let (want, got) = tokio::join!(
        progress_scenario("etcd", &e),
        progress_scenario("concord", &c)
    );
    compare("progress notify", &want, &got);
}

/// The request size limit both servers run with in the fragment test.
const MAX_REQUEST: usize = 1024 * 1024;
/// etcd splits a response only from `--max-request-bytes` plus its gRPC allowance
/// (`grpcOverheadBytes`, 512 KiB) on: `maxRequestBytes: int(s.Cfg.MaxRequestBytes +
/// grpcOverheadBytes)` in `NewWatchServer`.
const FRAGMENT_AT: usize = MAX_REQUEST + 512 * 1024;

/// Large responses to watchers with and without `fragment`: catch-ups of 1.2 MB (under
/// etcd's fragmenting threshold) and 1.9 MB (over it), and one txn whose request fits
/// under the request limit but whose events with their previous values exceed it.
async fn fragment_scenario(server: &str, endpoint: &str) -> Vec<String> {
    let mut w = Writer {
        client: connect(endpoint).await.unwrap(),
        model: Model::default(),
    };
    let value = |i: usize, round: u8, len: usize| vec![b'a' + (i % 20) as u8 + round; len];
    for i in 0..16 {
        w.put(&format!("h{i:02}"), &value(i, 0, 120_000)).await; // 2..=17
    }
    // Catch-ups, each of one response (concord reads history in pages of 2 MiB, so the
    // total stays under that).
    let history = Spec::prefix("h").start(1).fragment();
    let history_whole = Spec::prefix("h").start(1);
    // h00..h09: 1.2 MB, above --max-request-bytes but below etcd's threshold.
    let below = Spec::range("h00", b"h10").start(1).fragment();
    let mut s = Recorder::open(&mut w.client, &format!("{server} s"), &history).await;
    s.add(&history_whole).await;
    s.add(&below).await;
    s.created(3).await;
    s.caught_up(&w.model, &[(0, &history), (1, &history_whole), (2, &below)])
        .await;

    let live = Spec::prefix("k").prev_kv().fragment();
    let live_whole = Spec::prefix("k").prev_kv();
    s.add(&live).await;
    s.add(&live_whole).await;
    s.created(5).await;
    let (live, live_whole) = (live.created_at(17), live_whole.created_at(17));
    let all = [
        (0, &history),
        (1, &history_whole),
        (2, &below),
        (3, &live),
        (4, &live_whole),
    ];
    let keys: Vec<String> = (0..8).map(|i| format!("k{i}")).collect();
    for (i, k) in keys.iter().enumerate() {
        w.put(k, &value(i, 0, 125_000)).await; // 18..=25
    }
    let ops: Vec<(String, Vec<u8>)> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.clone(), value(i, 5, 125_000)))
        .collect();
    let ops: Vec<(&str, Option<&[u8]>)> = ops
        .iter()
        .map(|(k, v)| (k.as_str(), Some(v.as_slice())))
        .collect();
    assert_eq!(w.txn(&ops).await, 26);
    s.caught_up(&w.model, &all).await;
    s.progress().await;
    check_events(server, &s, &w.model, &all);

    let size = |r: &WatchResponse| -> usize {
        r.events()
            .iter()
            .map(|e| e.kv().unwrap().value().len() + e.prev_kv().map_or(0, |p| p.value().len()))
            .sum()
    };
    // Under etcd's threshold: one response, though it is larger than the request limit.
    let rs: Vec<&WatchResponse> = s.of(2).into_iter().filter(|r| !r.created()).collect();
    let total: usize = rs.iter().map(|r| size(r)).sum();
    assert!(total > MAX_REQUEST && total < FRAGMENT_AT - 4096);
    assert_eq!(
        rs.len(),
        1,
        "{server}: a {total} byte response below --max-request-bytes + 512 KiB was split: {}",
        rs.iter().map(|r| render(r)).collect::<Vec<_>>().join("\n")
    );

    // Over it: fragments, all but the last marked, each under the threshold unless it
    // holds a single event, each as large as fits, all with the same header; put
    // together they are the unfragmented response.
    let at_or_after = |id: i64, rev: i64| -> Vec<&WatchResponse> {
        s.of(id)
            .into_iter()
            .filter(|r| {
                r.events()
                    .iter()
                    .any(|e| e.kv().unwrap().mod_revision() >= rev)
            })
            .collect()
    };
    for (id, whole, from, n) in [(0, 1, 0, 16), (3, 4, 26, 8)] {
        let parts = at_or_after(id, from);
        assert!(
            parts.len() >= 2,
            "{server}: watcher {id}: {} response(s), not fragments",
            parts.len()
        );
        for (i, p) in parts.iter().enumerate() {
            assert_eq!(
                is_fragment(p),
                i + 1 < parts.len(),
                "{server}: {}",
                render(p)
            );
            assert_eq!(revision(p), revision(parts[0]));
            assert!(
                p.events().len() == 1 || size(p) < FRAGMENT_AT,
                "{server}: a fragment of {} bytes",
                size(p)
            );
            if let Some(next) = parts.get(i + 1) {
                let first_next = next.events()[0].kv().unwrap().value().len()
                    + next.events()[0].prev_kv().map_or(0, |p| p.value().len());
                assert!(
                    size(p) + first_next >= FRAGMENT_AT - 4096,
                    "{server}: watcher {id}: fragment {i} of {} bytes could hold the next \
                     event ({first_next} bytes)",
                    size(p)
                );
            }
        }
        let reassembled: Vec<Ev> = parts
            .iter()
            .flat_map(|p| p.events().iter().map(ev))
            .collect();
        assert_eq!(reassembled.len(), n);
        let unfragmented = at_or_after(whole, from);
        assert_eq!(
            unfragmented.len(),
            1,
            "{server}: without fragment, one response"
        );
        assert!(!is_fragment(unfragmented[0]));
        let whole_events: Vec<Ev> = unfragmented[0].events().iter().map(ev).collect();
        assert_eq!(whole_events, reassembled);
    }
    s.lines()
}

#[tokio::test]
async fn fragmented_responses_match_etcd() {
    let limit = MAX_REQUEST.to_string();
    let (etcd, concord) = pair(
        &["--max-request-bytes", &limit],
        &["--max-request-bytes", &limit],
    )
    .await;
    let (e, c) = (etcd.endpoint(), concord.endpoint());
    let (want, got) = tokio::join!(
        fragment_scenario("etcd", &e),
        fragment_scenario("concord", &c)
    );
    compare("fragment", &want, &got);
}

// ---------------------------------------------------------------------------------
// A slow watcher (concord only).

/// A client that never reads its watch stream delays neither writes nor another
/// watcher, and concord's memory stays bounded; once it reads, it gets every event, in
/// order, exactly once.
///
/// Memory is judged against a control: a second concord gets the same writes without
/// the stalled watcher. Storage and Raft grow with the data either way; what the
/// stalled watcher makes the server hold must stay far below the backlog it is owed.
#[tokio::test]
async fn slow_watcher_delays_nobody_and_catches_up() {
    // Half the puts 64 KiB, half 1 KiB: 63.5 MiB, far more than the transport and the
    // server's per-stream queue hold for a client that does not read, in large and in
    // many small responses.
    const PUTS: usize = 2_000;
    const WRITERS: usize = 16;
    let value_len = |i: usize| if i.is_multiple_of(2) { 64 * 1024 } else { 1024 };
    let backlog_mib = (0..PUTS).map(value_len).sum::<usize>() >> 20;
    let (s, control) = tokio::join!(Concord::start(), Concord::start());
    let (s, control) = (s.unwrap(), control.unwrap());
    let mut c = s.client().await.unwrap();
    // The key exists before, so every event below has a previous value.
    let base = put_rev(&mut c, "slow", vec![b'-'; 8]).await;
    put_rev(&mut control.client().await.unwrap(), "slow", vec![b'-'; 8]).await;

    // The slow watcher, on its own connection: after its created response, its stream
    // is not polled until every write is done. Catch-up responses carry many
    // revisions (etcd: up to 1000) with their previous values; like Go's clientv3 (no
    // receive limit), it accepts more than tonic's default of 4 MiB.
    let slow_client = s.client().await.unwrap();
    let mut slow = slow_client
        .watch_client()
        .max_decoding_message_size(256 << 20)
        .watch("slow", Some(WatchOptions::new().with_prev_key()))
        .await
        .unwrap();
    let r = next(&mut slow).await;
    assert!(r.created(), "{}", render(&r));
    // The reading watcher, on another connection.
    let mut fast_client = s.client().await.unwrap();
    let mut fast = fast_client.watch("slow", None).await.unwrap();
    let r = next(&mut fast).await;
    assert!(r.created(), "{}", render(&r));
    let rss = |c: &Concord| c.proc.rss_kib().expect("concord's VmRSS");
    let (rss0, control0) = (rss(&s), rss(&control));

    // Put `i` writes `i` in its value's first 8 bytes; when it was sent and the
    // revision it made are recorded by `i`.
    let next_put = Arc::new(AtomicUsize::new(0));
    let sent: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; PUTS]));
    let revs: Arc<Mutex<Vec<i64>>> = Arc::new(Mutex::new(vec![0; PUTS]));
    let mut writers = Vec::new();
    for _ in 0..WRITERS {
        let mut c = s.client().await.unwrap();
        let mut cc = control.client().await.unwrap();
        let (next_put, sent, revs) = (next_put.clone(), sent.clone(), revs.clone());
        writers.push(tokio::spawn(async move {
            let mut slowest = Duration::ZERO;
            loop {
                let i = next_put.fetch_add(1, Ordering::SeqCst);
                if i >= PUTS {
                    return slowest;
                }
                let mut v = vec![b'x'; value_len(i)];
                v[..8].copy_from_slice(&i.to_be_bytes());
                let t = Instant::now();
                sent.lock().unwrap()[i] = Some(t);
                let (rev, _) = tokio::join!(
                    put_rev(&mut c, "slow", v.clone()),
                    put_rev(&mut cc, "slow", v)
                );
                slowest = slowest.max(t.elapsed());
                revs.lock().unwrap()[i] = rev;
            }
        }));
    }
    let index = |kv: &KeyValue| usize::from_be_bytes(kv.value()[..8].try_into().unwrap());

    // The reading watcher sees every revision, in order, promptly; memory is sampled
    // as the events arrive.
    let mut got = 0usize;
    let mut delays = Vec::new();
    let (mut peak, mut control_peak) = (rss0, control0);
    let t0 = Instant::now();
    while got < PUTS {
        let r = next(&mut fast).await;
        let now = Instant::now();
        for e in r.events() {
            got += 1;
            let kv = e.kv().unwrap();
            assert_eq!(
                kv.mod_revision(),
                base + got as i64,
                "the reading watcher: revisions in order, without gaps"
            );
            let sent_at = sent.lock().unwrap()[index(kv)].expect("sent before seen");
            delays.push(now - sent_at);
        }
        if got.is_multiple_of(100) {
            peak = peak.max(rss(&s));
            control_peak = control_peak.max(rss(&control));
        }
    }
    let elapsed = t0.elapsed();
    let mut slowest_put = Duration::ZERO;
    for w in writers {
        slowest_put = slowest_put.max(w.await.unwrap());
    }
    peak = peak.max(rss(&s));
    control_peak = control_peak.max(rss(&control));
    delays.sort();
    let p99 = delays[delays.len() * 99 / 100];
    let growth_mib = peak.saturating_sub(rss0) as i64 / 1024;
    let control_mib = control_peak.saturating_sub(control0) as i64 / 1024;
    eprintln!(
        "{PUTS} puts ({backlog_mib} MiB) in {elapsed:?}; put-to-event p50 {:?} p99 {p99:?} \
         max {:?}; slowest put {slowest_put:?}; RSS growth {growth_mib} MiB with the \
         stalled watcher, {control_mib} MiB without",
        delays[delays.len() / 2],
        delays.last().unwrap()
    );
    assert!(
        slowest_put < Duration::from_secs(5),
        "a put took {slowest_put:?}"
    );
    assert!(p99 < Duration::from_secs(2), "put-to-event p99 {p99:?}");
    assert!(growth_mib < 200, "concord's RSS grew by {growth_mib} MiB");
    assert!(
        growth_mib - control_mib < backlog_mib as i64 / 2,
        "the stalled watcher cost {} MiB of a {backlog_mib} MiB backlog",
        growth_mib - control_mib
    );
    drop(control);

    // Now the slow watcher reads: every revision, in order, exactly once, each with its
    // value and previous value.
    let revs = revs.lock().unwrap().clone();
    let mut seen = 0usize;
    while seen < PUTS {
        let r = next(&mut slow).await;
        assert!(
            !r.canceled(),
            "the slow watcher was canceled: {}",
            render(&r)
        );
        for e in r.events() {
            seen += 1;
            let kv = e.kv().unwrap();
            assert_eq!(
                kv.mod_revision(),
                base + seen as i64,
                "the slow watcher: in order, without gaps or duplicates"
            );
            assert_eq!(
                revs[index(kv)],
                kv.mod_revision(),
                "the value of a revision"
            );
            assert_eq!(kv.value().len(), value_len(index(kv)));
            let prev = e.prev_kv().expect("prev_kv");
            assert_eq!(prev.mod_revision(), kv.mod_revision() - 1);
            assert_eq!(prev.version() + 1, kv.version());
        }
    }
    // Nothing more is owed: the next response answers a progress request.
    slow.request_progress().await.unwrap();
    let r = next(&mut slow).await;
    assert!(
        is_progress(&r) && r.watch_id() == -1,
        "after catching up: {}",
        render(&r)
    );
    assert_eq!(revision(&r), base + PUTS as i64);
}

async fn put_rev(c: &mut Client, key: &str, value: Vec<u8>) -> i64 {
    c.put(key, value, None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision()
}

async fn next(stream: &mut WatchStream) -> WatchResponse {
    tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("no watch response within the deadline")
        .expect("the watch stream failed")
        .expect("the watch stream ended")
}
