//! Jepsen-style linearizability test: concurrent clients run random gets, puts and
//! compare-and-sets on a few keys of a 3-member cluster while a nemesis SIGKILLs and
//! restarts members, SIGSTOPs the leader and partitions members; every operation is
//! recorded with its invoke and completion time and the history is checked with the
//! project's Wing–Gong–Lowe checker ([`concord_integration::linearizability`]).
//!
//! * `JEPSEN_SECS` (default 30): how long the clients and the nemesis run.
//! * `JEPSEN_TARGET=etcd`: run against a real etcd cluster instead of Concord (to
//!   validate the test itself). etcd does not bind its outgoing peer connections, so
//!   the proxies cannot partition it: the nemesis then skips partitions.
//! * `JEPSEN_SEED`: the random seed (printed on every run), to replay a schedule.
//! * `JEPSEN_WATCH_REQUEST_PROGRESS=0|1`: whether watchers also send
//!   `RequestProgress` (default: on for Concord, off for etcd). Members always send
//!   periodic progress notifications every [`WATCH_PROGRESS_INTERVAL`]. etcd 3.4.23
//!   (Debian's) answers `RequestProgress` outside its event queue, so the answer can
//!   overtake events it claims were delivered (etcd-io/etcd#15220, fixed in 3.4.25 and
//!   3.5.8): with `=1` against etcd the checker reports that as a bookmarkable
//!   violation within a few runs.
//!
//! Recording rules: an op is invoked right before it is sent and completed right
//! after its answer. A get that fails constrains nothing (the checker drops unknown
//! gets); a put or cas that fails in *any* way (timeout, `Unavailable`, connection
//! reset, ...) may still have been applied, so it is recorded as
//! [`Outcome::Unknown`], never as "did not happen".
//!
//! Liveness: every fault is undone before the next (restart, SIGCONT, heal), and then
//! every member must serve a write and a linearizable read again within 30 s. If one
//! does not, the run stops there; the history so far is still checked, and every
//! member's log and the loopback TCP connections (`ss -tnp`, to tell a stuck peer
//! link from a cut one) are printed.
//!
//! Watches: while the clients and the nemesis run, [`WATCHERS`] logical watchers
//! watch the `jepsen/` prefix (and narrower ranges) with `progress_notify` (and, on
//! Concord, ask for progress every second or so). A stream that errors, ends or stays
//! silent for `watchrec::WATCH_IDLE` (member killed, stopped, cut off), and every stream after
//! a random lifetime, is replaced by a new one on the next member, resumed from the last
//! observed revision + 1 (the last event's or progress notification's revision). A
//! writer adds multi-key transactions and range deletes under `jepsen/w/`, so
//! revisions with several events (atomicity) and delete events occur. After the run a
//! marker is written, every watcher must catch up with it, the reference event log is
//! read with a watch from revision 1 (the test never compacts) and cross-checked with a
//! read at the marker's revision, and [`concord_integration::watchcheck`] checks the
//! six watch guarantees (ordered, unique, atomic, reliable, resumable, bookmarkable)
//! over every watcher's sessions.
//!
//! `scripts/jepsen.sh [SECS]` runs the same test for longer.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use concord_integration::cluster::{Cluster, ClusterOptions, Kind};
use concord_integration::linearizability::{self, Event, Op, Outcome, Recorder};
use concord_integration::watchcheck::{self, KeyRange, WatcherHistory};
use concord_integration::watchrec::{WATCH_CATCH_UP, watcher_loop};
use concord_integration::{RETRY_DEADLINE, Rng, etcd_bin, retry_transient, wait_until};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, Txn, TxnOp,
};

/// Keys the clients work on (few, so operations contend).
const KEYS: [&str; 4] = ["jepsen/a", "jepsen/b", "jepsen/c", "jepsen/d"];
/// Concurrent clients (each a sequential process with its own connection).
const CLIENTS: usize = 8;
/// Per-request gRPC timeout.
const OP_TIMEOUT: Duration = Duration::from_secs(3);
/// Hard bound on one operation, in case a request ignores its gRPC deadline.
const OP_GUARD: Duration = Duration::from_secs(5);
/// Wall-time budget of the checker per key.
const CHECK_BUDGET: Duration = Duration::from_secs(30);
/// A dead cluster must not pass: at least this many ops must have a known outcome.
const MIN_OK_OPS: u64 = 200;

/// The prefix every key of the test is under (what the widest watchers watch).
const PREFIX: &str = "jepsen/";
/// Keys the transaction writer works on (not part of the linearizability history).
const TXN_KEYS: [&str; 3] = ["jepsen/w/x", "jepsen/w/y", "jepsen/w/z"];
/// Written after the run: every watcher must observe its revision.
const MARKER_KEY: &str = "jepsen/w/end";
/// Logical watchers: name, range, whether it starts from revision 1 (else from the
/// revision current at the start of the run, + 1).
const WATCHERS: [(&str, WatchRange, bool); 4] = [
    ("all-from-1", WatchRange::Prefix(PREFIX), true),
    ("all-from-now", WatchRange::Prefix(PREFIX), false),
    ("key-a-from-1", WatchRange::Single("jepsen/a"), true),
    // Cuts through the writer's transactions: only x of x, y, z is inside.
    (
        "c-to-w/y",
        WatchRange::Between("jepsen/c", "jepsen/w/y"),
        false,
    ),
];
/// `--experimental-watch-progress-notify-interval` of every member (etcd's flag;
/// Concord accepts it too).
const WATCH_PROGRESS_INTERVAL: &str = "1s";
/// A dead watch must not pass: at least this many events must be checked.
const MIN_WATCH_EVENTS: usize = 200;

/// Counters shared by all clients.
#[derive(Default)]
struct Stats {
    get_ok: AtomicU64,
    put_ok: AtomicU64,
    cas_true: AtomicU64,
    cas_false: AtomicU64,
    get_failed: AtomicU64,
    write_unknown: AtomicU64,
    reconnects: AtomicU64,
    /// Failures by kind (gRPC code and message, or "client timeout").
    errors: std::sync::Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    fn error(&self, kind: String) {
        *self
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(kind)
            .or_insert(0) += 1;
    }

    fn ok(&self) -> u64 {
        self.get_ok.load(Ordering::Relaxed)
            + self.put_ok.load(Ordering::Relaxed)
            + self.cas_true.load(Ordering::Relaxed)
            + self.cas_false.load(Ordering::Relaxed)
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        write!(
            f,
            "ok ops {} (get {}, put {}, cas true {}, cas false {}); failed gets {}; \
             unknown puts/cas {}; reconnects {}",
            self.ok(),
            l(&self.get_ok),
            l(&self.put_ok),
            l(&self.cas_true),
            l(&self.cas_false),
            l(&self.get_failed),
            l(&self.write_unknown),
            l(&self.reconnects)
        )?;
        let errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        for (kind, n) in errors.iter() {
            write!(f, "\n  {n} x {kind}")?;
        }
        Ok(())
    }
}

async fn connect(endpoint: &str) -> Result<Client> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_timeout(OP_TIMEOUT);
    Ok(Client::connect([endpoint], Some(opts)).await?)
}

/// Connects to `endpoint` and waits until the member answers a serializable read
/// (not recorded: it only keeps a client from burning through ops against a member
/// that is down). `None` if `stop` passes first.
async fn reconnect(endpoint: &str, stop: Instant) -> Option<Client> {
    while Instant::now() < stop {
        let attempt = tokio::time::timeout(Duration::from_secs(1), async {
            let mut c = connect(endpoint).await?;
            c.get("jepsen/probe", Some(GetOptions::new().with_serializable()))
                .await?;
            anyhow::Ok(c)
        })
        .await;
        if let Ok(Ok(c)) = attempt {
            return Some(c);
        }
        // Back-off between attempts while the member is down or stopped.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Performs `op`; `Err` means the outcome is unknown.
async fn perform(c: &mut Client, op: &Op) -> Result<Outcome> {
    match op {
        Op::Get { key } => {
            let r = c.get(key.as_str(), None).await?;
            Ok(Outcome::Get(match r.kvs() {
                [] => None,
                [kv] => Some(kv.value_str()?.to_string()),
                more => bail!("{} kvs for one key", more.len()),
            }))
        }
        Op::Put { key, value } => {
            c.put(key.as_str(), value.as_str(), None).await?;
            Ok(Outcome::Put)
        }
        Op::Cas { key, expected, new } => {
            let cmp = match expected {
                Some(v) => Compare::value(key.as_str(), CompareOp::Equal, v.as_str()),
                None => Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
            };
            let txn =
                Txn::new()
                    .when([cmp])
                    .and_then([TxnOp::put(key.as_str(), new.as_str(), None)]);
            Ok(Outcome::Cas(c.txn(txn).await?.succeeded()))
        }
    }
}

/// A short description of a failure, for the summary (values and ports stripped).
fn error_kind(e: &anyhow::Error) -> String {
    match e.downcast_ref::<etcd_client::Error>() {
        Some(etcd_client::Error::GRpcStatus(s)) => {
            let msg: String = s.message().chars().take(60).collect();
            format!("{:?}: {msg}", s.code())
        }
        Some(other) => format!("{other}").chars().take(80).collect(),
        None => format!("{e}").chars().take(80).collect(),
    }
}

/// One client: a sequential process issuing random ops until `stop`.
async fn client_loop(
    id: usize,
    endpoint: String,
    rec: Recorder,
    stats: Arc<Stats>,
    stop: Instant,
    seed: u64,
) {
    let mut rng = Rng::new(seed);
    // The last value this client saw per key: cas mostly expects it, so some swap.
    let mut seen: BTreeMap<&str, Option<String>> = BTreeMap::new();
    let mut conn = reconnect(&endpoint, stop).await;
    let mut n = 0u64;
    while Instant::now() < stop {
        let Some(c) = conn.as_mut() else {
            stats.reconnects.fetch_add(1, Ordering::Relaxed);
            conn = reconnect(&endpoint, stop).await;
            continue;
        };
        let key = KEYS[rng.below(KEYS.len() as u64) as usize];
        n += 1;
        let value = format!("c{id}-{n}");
        let op = match rng.below(10) {
            0..4 => Op::Get { key: key.into() },
            4..7 => Op::Put {
                key: key.into(),
                value,
            },
            r => Op::Cas {
                key: key.into(),
                expected: if r == 9 {
                    None
                } else {
                    seen.get(key).cloned().flatten()
                },
                new: value,
            },
        };
        let pending = rec.invoke(id, op.clone());
        let result = tokio::time::timeout(OP_GUARD, perform(c, &op)).await;
        match result {
            Ok(Ok(outcome)) => {
                pending.complete(outcome.clone());
                match (&op, outcome) {
                    (Op::Get { .. }, Outcome::Get(v)) => {
                        stats.get_ok.fetch_add(1, Ordering::Relaxed);
                        seen.insert(key, v);
                    }
                    (Op::Put { value, .. }, _) => {
                        stats.put_ok.fetch_add(1, Ordering::Relaxed);
                        seen.insert(key, Some(value.clone()));
                    }
                    (Op::Cas { new, .. }, Outcome::Cas(true)) => {
                        stats.cas_true.fetch_add(1, Ordering::Relaxed);
                        seen.insert(key, Some(new.clone()));
                    }
                    _ => {
                        stats.cas_false.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Ok(Err(_)) | Err(_) => {
                // Any failure: the write may or may not have been applied.
                pending.complete(Outcome::Unknown);
                stats.error(match &result {
                    Ok(Err(e)) => error_kind(e),
                    _ => "no answer within the guard timeout".into(),
                });
                if matches!(op, Op::Get { .. }) {
                    stats.get_failed.fetch_add(1, Ordering::Relaxed);
                } else {
                    stats.write_unknown.fetch_add(1, Ordering::Relaxed);
                }
                conn = None;
                // Back off a little, so a leaderless stretch (which fails fast with
                // "no leader") does not flood the history with unknown writes.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A watched range (a `const`-friendly form of [`KeyRange`]).
#[derive(Debug, Clone, Copy)]
enum WatchRange {
    Prefix(&'static str),
    Single(&'static str),
    Between(&'static str, &'static str),
}

impl WatchRange {
    fn key_range(self) -> KeyRange {
        match self {
            WatchRange::Prefix(p) => KeyRange::prefix(p),
            WatchRange::Single(k) => KeyRange::single(k),
            WatchRange::Between(k, end) => KeyRange::between(k, end),
        }
    }
}

/// Multi-key transactions and range deletes under `jepsen/w/` until `stop`, so
/// revisions with several events and delete events occur. Returns how many succeeded.
async fn txn_writer(endpoints: Vec<String>, stop: Instant, seed: u64) -> u64 {
    let mut rng = Rng::new(seed);
    let mut ok = 0;
    let mut member = 0;
    let mut conn = None;
    let mut n = 0u64;
    while Instant::now() < stop {
        let Some(c) = conn.as_mut() else {
            member = (member + 1) % endpoints.len();
            conn = reconnect(&endpoints[member], stop).await;
            continue;
        };
        n += 1;
        let v = format!("t{n}");
        let put = |k: &str| TxnOp::put(k, v.as_str(), None);
        let txn = match rng.below(4) {
            0 => Some(Txn::new().and_then([put(TXN_KEYS[0]), put(TXN_KEYS[1])])),
            1 => Some(Txn::new().and_then(TXN_KEYS.map(put))),
            2 => None,
            _ => Some(Txn::new().and_then([put(TXN_KEYS[2]), TxnOp::delete(TXN_KEYS[0], None)])),
        };
        let op = async {
            match txn {
                Some(txn) => c.txn(txn).await.map(|_| ()),
                None => c
                    .delete("jepsen/w/", Some(DeleteOptions::new().with_prefix()))
                    .await
                    .map(|_| ()),
            }
        };
        match tokio::time::timeout(OP_GUARD, op).await {
            Ok(Ok(())) => ok += 1,
            _ => conn = None,
        }
        tokio::time::sleep(rng.millis(30, 120)).await;
    }
    ok
}

/// What the watch phase found.
struct WatchOutcome {
    report: watchcheck::Report,
    /// Failures outside the six guarantees (catch-up, reference vs final read).
    problems: Vec<String>,
    /// Why sessions ended, with counts.
    ends: BTreeMap<String, usize>,
    histories: Vec<WatcherHistory>,
    reference: Option<watchcheck::ReferenceLog>,
}

/// After the run: writes a marker, lets every watcher catch up with it, reads the
/// reference log (a watch from revision 1) and the final state, and checks.
async fn check_watches(
    cluster: &Cluster,
    watchers: Vec<tokio::task::JoinHandle<(WatcherHistory, Option<i64>)>>,
    finish: tokio::sync::watch::Sender<Option<i64>>,
) -> Result<WatchOutcome> {
    let endpoint = cluster.endpoint(0);
    let marker = retry_transient(RETRY_DEADLINE, "writing the end marker", || async {
        Ok(connect(&endpoint)
            .await?
            .put(MARKER_KEY, "end", None)
            .await?
            .header()
            .context("put without header")?
            .revision())
    })
    .await?;
    finish.send_replace(Some(marker));
    let mut out = WatchOutcome {
        report: watchcheck::Report::default(),
        problems: Vec::new(),
        ends: BTreeMap::new(),
        histories: Vec::new(),
        reference: None,
    };
    for w in watchers {
        let (hist, behind) = w.await.context("watcher task")?;
        if let Some(target) = behind {
            out.problems.push(format!(
                "watcher {} did not observe revision {target} (the end marker) within \
                 {WATCH_CATCH_UP:?} after the run; it got to {:?}",
                hist.name,
                hist.observed_revision()
            ));
        }
        for s in &hist.sessions {
            let end = s.ended.clone().unwrap_or_else(|| "running".into());
            *out.ends.entry(end).or_default() += 1;
        }
        out.histories.push(hist);
    }
    let range = KeyRange::prefix(PREFIX);
    let reference = retry_transient(RETRY_DEADLINE, "reading the reference log", || {
        watchcheck::fetch_reference(&endpoint, &range, 1, marker, Duration::from_secs(30))
    })
    .await?;
    let read = retry_transient(RETRY_DEADLINE, "reading the final state", || async {
        let opts = GetOptions::new().with_prefix().with_revision(marker);
        Ok(connect(&endpoint).await?.get(PREFIX, Some(opts)).await?)
    })
    .await?;
    let kvs: Vec<watchcheck::WatchEvent> = read
        .kvs()
        .iter()
        .map(watchcheck::WatchEvent::from_kv)
        .collect();
    for e in reference.check_final_state(&kvs) {
        out.problems
            .push(format!("reference log vs a read at revision {marker}: {e}"));
    }
    out.report = watchcheck::check(&out.histories, &reference);
    out.reference = Some(reference);
    Ok(out)
}

/// Writes every watcher's sessions and the reference log to a file, for reading a
/// violation.
fn dump_watches(out: &WatchOutcome) -> std::path::PathBuf {
    let mut text = String::new();
    if let Some(r) = &out.reference {
        text.push_str(&format!(
            "reference {} revisions {}..={}:\n",
            r.range, r.from_revision, r.through_revision
        ));
        for e in &r.events {
            text.push_str(&format!("  {e}\n"));
        }
    }
    for h in &out.histories {
        text.push_str(&format!("watcher {} ({}):\n", h.name, h.range));
        for (i, s) in h.sessions.iter().enumerate() {
            text.push_str(&format!(
                "  session {i} on {} from {}{}, ended: {:?}\n",
                s.member,
                s.start_revision,
                if s.resumed { " (resumed)" } else { "" },
                s.ended
            ));
            for (j, r) in s.responses.iter().enumerate() {
                let body = match &r.kind {
                    watchcheck::ResponseKind::Events(evs) => evs
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; "),
                    other => format!("{other:?}"),
                };
                text.push_str(&format!("    {j}: header {}: {body}\n", r.header_revision));
            }
        }
    }
    let path = std::env::temp_dir().join(format!("jepsen-watches-{}.txt", std::process::id()));
    if let Err(e) = std::fs::write(&path, text) {
        eprintln!("writing {}: {e}", path.display());
    }
    path
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    Kill9Restart,
    PauseLeader,
    Partition,
}

/// Cycles through the faults until too little time is left for another one; every
/// fault is undone (restart, resume, heal) before the next starts.
async fn nemesis(
    cluster: &mut Cluster,
    stop: Instant,
    rng: &mut Rng,
    counts: &mut BTreeMap<Fault, u32>,
) -> Result<()> {
    let faults: &[Fault] = if cluster.kind == Kind::Concord {
        &[Fault::Kill9Restart, Fault::PauseLeader, Fault::Partition]
    } else {
        &[Fault::Kill9Restart, Fault::PauseLeader]
    };
    let n = cluster.members.len();
    let mut next = rng.below(faults.len() as u64) as usize;
    loop {
        // Quiet period, then a fault lasting a few seconds.
        let quiet = rng.millis(1_000, 2_000);
        let fault_len = rng.millis(2_000, 3_500);
        if Instant::now() + quiet + fault_len + Duration::from_secs(2) >= stop {
            break;
        }
        tokio::time::sleep(quiet).await;
        let fault = faults[next % faults.len()];
        next += 1;
        let t0 = Instant::now();
        let member = match fault {
            Fault::Kill9Restart => {
                let i = rng.below(n as u64) as usize;
                cluster.kill9(i);
                tokio::time::sleep(fault_len).await;
                cluster.restart(i).await?;
                println!(
                    "nemesis: kill -9 n{} for {fault_len:?}, restarted after {:?}",
                    i + 1,
                    t0.elapsed()
                );
                i
            }
            Fault::PauseLeader => {
                let i = cluster.leader().await.context("finding the leader")?;
                cluster.pause(i)?;
                tokio::time::sleep(fault_len).await;
                cluster.resume(i)?;
                println!("nemesis: SIGSTOP leader n{} for {fault_len:?}", i + 1);
                i
            }
            Fault::Partition => {
                let i = rng.below(n as u64) as usize;
                cluster.partition(i)?;
                tokio::time::sleep(fault_len).await;
                cluster.heal();
                println!("nemesis: partition n{} for {fault_len:?}", i + 1);
                i
            }
        };
        *counts.entry(fault).or_insert(0) += 1;
        // Every fault is transient: once it is undone the cluster must serve again
        // (a 3-member cluster tolerates one fault at a time).
        wait_recovered(cluster).await.with_context(|| {
            format!(
                "the cluster did not recover from {fault:?} of n{}",
                member + 1
            )
        })?;
    }
    Ok(())
}

/// Waits until every member answers a linearizable read and a write (the cluster
/// recovered from the nemesis).
async fn wait_recovered(cluster: &Cluster) -> Result<()> {
    for i in 0..cluster.members.len() {
        let endpoint = cluster.endpoint(i);
        wait_until(
            Duration::from_secs(30),
            &format!("n{} serving after the nemesis", i + 1),
            || {
                let endpoint = endpoint.clone();
                async move {
                    let mut c = connect(&endpoint).await?;
                    c.put("jepsen/recovered", endpoint.as_str(), None).await?;
                    c.get("jepsen/recovered", None).await?;
                    Ok(())
                }
            },
        )
        .await?;
    }
    Ok(())
}

/// Prints each member's pid and peer addresses and the loopback TCP connections
/// (`ss -tnp`), so a peer link that is stuck (open but not delivering) or missing can
/// be told apart from a cut one when the cluster does not recover.
fn print_links(cluster: &Cluster) {
    for m in &cluster.members {
        println!(
            "{}: pid {:?}, peer listen {}, advertised (proxy) {}",
            m.name,
            m.pid(),
            m.peer_listen,
            m.peer_advertise
        );
    }
    println!("test process (proxies): pid {}", std::process::id());
    match std::process::Command::new("ss").args(["-tnp"]).output() {
        Ok(out) => println!("{}", String::from_utf8_lossy(&out.stdout)),
        Err(e) => println!("ss -tnp: {e}"),
    }
}

/// Writes the whole history (sorted by invoke time) next to the system temp dir, for
/// reading a violation.
fn dump_history(events: &[Event]) -> std::path::PathBuf {
    let mut sorted: Vec<&Event> = events.iter().collect();
    sorted.sort_by_key(|e| (e.op.key().to_string(), e.invoke));
    let text: String = sorted.iter().map(|e| format!("{e}\n")).collect();
    let path = std::env::temp_dir().join(format!("jepsen-history-{}.txt", std::process::id()));
    if let Err(e) = std::fs::write(&path, text) {
        eprintln!("writing {}: {e}", path.display());
    }
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn linearizable_under_nemesis() {
    let secs: u64 = std::env::var("JEPSEN_SECS")
        .ok()
        .map(|s| s.parse().expect("JEPSEN_SECS must be a number of seconds"))
        .unwrap_or(30);
    let kind = match std::env::var("JEPSEN_TARGET").as_deref() {
        Ok("etcd") => Kind::Etcd,
        Ok("concord") | Err(_) => Kind::Concord,
        Ok(other) => panic!("JEPSEN_TARGET must be concord or etcd, not {other:?}"),
    };
    if kind == Kind::Etcd {
        assert!(
            etcd_bin().is_some(),
            "JEPSEN_TARGET=etcd needs /usr/bin/etcd"
        );
    }
    let seed: u64 = std::env::var("JEPSEN_SEED")
        .ok()
        .map(|s| s.parse().expect("JEPSEN_SEED must be a number"))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    println!("jepsen: {kind:?}, {secs} s, {CLIENTS} clients, seed {seed}");

    let opts = ClusterOptions {
        size: 3,
        proxied: kind == Kind::Concord,
        extra: vec![format!(
            "--experimental-watch-progress-notify-interval={WATCH_PROGRESS_INTERVAL}"
        )],
        bin: None,
    };
    let request_progress = match std::env::var("JEPSEN_WATCH_REQUEST_PROGRESS").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        Err(_) => kind == Kind::Concord,
        Ok(other) => panic!("JEPSEN_WATCH_REQUEST_PROGRESS must be 0 or 1, not {other:?}"),
    };
    println!(
        "jepsen: {} watchers, progress notify every {WATCH_PROGRESS_INTERVAL}, \
         RequestProgress {}",
        WATCHERS.len(),
        if request_progress { "on" } else { "off" }
    );
    let mut cluster = Cluster::start(kind, opts)
        .await
        .expect("starting a 3-member cluster");
    let endpoints = cluster.endpoints();

    let start_revision = {
        let mut c = connect(&endpoints[0]).await.expect("connecting to n1");
        c.get("jepsen/probe", None)
            .await
            .expect("reading the start revision")
            .header()
            .expect("get without header")
            .revision()
    };

    let rec = Recorder::new();
    let stats = Arc::new(Stats::default());
    let start = Instant::now();
    let stop = start + Duration::from_secs(secs);
    let mut rng = Rng::new(seed);
    let (finish_watches, finish_rx) = tokio::sync::watch::channel(None);
    let watchers: Vec<_> = WATCHERS
        .iter()
        .enumerate()
        .map(|(i, &(name, range, from_1))| {
            tokio::spawn(watcher_loop(
                name,
                range.key_range(),
                endpoints.clone(),
                i % endpoints.len(),
                if from_1 { 1 } else { start_revision + 1 },
                finish_rx.clone(),
                request_progress,
                rng.next_u64(),
            ))
        })
        .collect();
    let writer = tokio::spawn(txn_writer(endpoints.clone(), stop, rng.next_u64()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| {
            tokio::spawn(client_loop(
                id,
                endpoints[id % endpoints.len()].clone(),
                rec.clone(),
                stats.clone(),
                stop,
                rng.next_u64(),
            ))
        })
        .collect();

    let mut faults = BTreeMap::new();
    let nemesis_result = nemesis(&mut cluster, stop, &mut rng, &mut faults).await;
    // Whatever happened, leave the cluster whole.
    cluster.heal();
    for i in 0..cluster.members.len() {
        if cluster.members[i].pid().is_some() {
            let _ = cluster.resume(i);
        }
    }
    if nemesis_result.is_err() {
        // No point running on: the history so far is still checked below. Ops cut
        // short are recorded as unknown.
        for c in &clients {
            c.abort();
        }
        writer.abort();
        for w in &watchers {
            w.abort();
        }
    }
    for c in clients {
        if let Err(e) = c.await {
            assert!(e.is_cancelled(), "client task panicked: {e}");
        }
    }
    let txns_ok = match writer.await {
        Ok(n) => n,
        Err(e) => {
            assert!(e.is_cancelled(), "transaction writer panicked: {e}");
            0
        }
    };
    let ran = start.elapsed();
    let mut failures = Vec::new();
    match nemesis_result {
        Err(e) => failures.push(format!("nemesis failed: {e:#}")),
        Ok(()) => {
            if let Err(e) = wait_recovered(&cluster).await {
                failures.push(format!("the cluster did not recover after the run: {e:#}"));
            }
        }
    }

    // The watch phase needs a whole cluster; after a failed run the watchers are
    // aborted above and the linearizability check below still runs.
    let mut watch_outcome = None;
    if failures.is_empty() {
        let t0 = Instant::now();
        match check_watches(&cluster, watchers, finish_watches).await {
            Ok(out) => {
                println!(
                    "jepsen: watches checked in {:.1?} ({txns_ok} multi-key txns/deletes): {}",
                    t0.elapsed(),
                    out.report
                );
                println!("jepsen: watch sessions ended: {:?}", out.ends);
                if !out.report.is_ok() || !out.problems.is_empty() {
                    let path = dump_watches(&out);
                    failures.push(format!(
                        "watch guarantees violated (histories in {}): {}",
                        path.display(),
                        out.report
                    ));
                }
                failures.extend(out.problems.iter().cloned());
                watch_outcome = Some(out);
            }
            Err(e) => failures.push(format!("watch phase failed: {e:#}")),
        }
    }

    let events = rec.events();
    let t0 = Instant::now();
    let report = linearizability::check(&events, CHECK_BUDGET);
    let check_time = t0.elapsed();
    println!("jepsen: ran {ran:.1?}, {} events recorded", events.len());
    println!("jepsen: faults {faults:?}");
    println!("jepsen: {stats}");
    println!("jepsen: checked in {check_time:.1?}: {report}");

    if !report.is_linearizable() {
        let path = dump_history(&events);
        failures.push(format!(
            "history is not linearizable (full history in {}): {report}",
            path.display()
        ));
    }
    if !failures.is_empty() {
        cluster.print_logs();
        print_links(&cluster);
        panic!("{}", failures.join("\n"));
    }
    assert!(
        stats.ok() >= MIN_OK_OPS,
        "too little work got done under the nemesis ({stats}); a dead cluster cannot pass"
    );
    assert!(
        !faults.is_empty(),
        "the nemesis injected no fault (JEPSEN_SECS too short?)"
    );
    let watch = watch_outcome.expect("the watch phase ran");
    assert!(
        watch.report.events_checked >= MIN_WATCH_EVENTS && watch.report.resumed_sessions > 0,
        "too little watching got done ({}); a dead watch cannot pass",
        watch.report
    );
}
