//! Watch benchmark client for `bench/watch.sh`: the same client against a single-member
//! Concord and a single-member etcd. Prints one JSON line of results.
//!
//! `bench_watch --endpoint URL --probe [--deadline-secs S]`
//!   waits until a put and a read through the endpoint succeed.
//! `bench_watch --endpoint URL --scenario one|distinct [--watchers N] [--streams S]
//!   [--conns C] [--puts P] [--gap-ms G] [--pid PID] [--settle-ms M]`
//!
//! What one run does:
//!
//! 1. Opens C connections (default: one per stream) plus one for the writer, and makes
//!    one read on each so every HTTP/2 connection is up. After `--settle-ms` (default
//!    1000) it reads the server's RSS (`VmRSS` of `/proc/PID/status`): "RSS before".
//! 2. Creates N watchers (default 10,000) spread round-robin over S gRPC watch streams
//!    (default 100; watcher `i` is on stream `i % S`, stream `s` on connection `s % C`),
//!    all on one key (`one`) or each on its own key (`distinct`), and waits until every
//!    watcher's `created` response has arrived. After `--settle-ms` it reads the RSS
//!    again: "RSS after". Bytes per watcher = (after − before) / N, so it includes the
//!    S streams (1% of N at the defaults) but not the connections.
//! 3. One writer puts P times (default 200), each value carrying the put's sequence
//!    number and its send time (ns since this process's monotonic epoch, taken just
//!    before the put is sent). With `one` every put is to the watched key (N events per
//!    put); with `distinct` put `k` goes to key `(k * stride) mod N` (one event per put,
//!    landing on a different watcher and stream each time). Puts are spaced: the next
//!    put is sent only when every expected event of the previous one has arrived (or
//!    after `--put-deadline-secs`, default 10, and then it counts as timed out), plus
//!    `--gap-ms` (default 20). So the latencies are those of one fan-out on an
//!    otherwise idle server, not of queueing behind earlier puts.
//!
//! Latency: for every event, arrival time (when the client has decoded the response
//! carrying it) − the put's send time; `event_p50_ms` / `event_p99_ms` are over all
//! events (N × P samples with `one`, P with `distinct`). `last_p50_ms` / `last_p99_ms`
//! are over puts: the time until the last watcher received that put's event (the
//! fan-out time; equal to the event latency with `distinct`).
//!
//! Checks, reported in the JSON line: events received vs expected, events that arrived
//! twice or out of order for their watcher, watchers cancelled by the server, puts whose
//! fan-out did not complete within the deadline.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use concord_integration::bench::{connect_with as connect, probe_writes};
use etcd_client::{WatchResponse, WatchResponseStream};
use serde_json::json;
use tokio::sync::Notify;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    OneKey,
    Distinct,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::OneKey => "one",
            Scenario::Distinct => "distinct",
        }
    }
}

struct Opts {
    endpoint: String,
    probe: bool,
    scenario: Scenario,
    watchers: usize,
    streams: usize,
    conns: Option<usize>,
    puts: usize,
    gap: Duration,
    pid: Option<u32>,
    settle: Duration,
    put_deadline: Duration,
    create_deadline: Duration,
    prefix: String,
    deadline: Duration,
}

fn parse() -> Result<Opts> {
    let mut o = Opts {
        endpoint: "http://127.0.0.1:2379".into(),
        probe: false,
        scenario: Scenario::OneKey,
        watchers: 10_000,
        streams: 100,
        conns: None,
        puts: 200,
        gap: Duration::from_millis(20),
        pid: None,
        settle: Duration::from_millis(1000),
        put_deadline: Duration::from_secs(10),
        create_deadline: Duration::from_secs(300),
        prefix: "bench-watch/".into(),
        deadline: Duration::from_secs(60),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--endpoint" => o.endpoint = val()?,
            "--probe" => o.probe = true,
            "--scenario" => {
                o.scenario = match val()?.as_str() {
                    "one" => Scenario::OneKey,
                    "distinct" => Scenario::Distinct,
                    other => bail!("--scenario must be one or distinct, not {other}"),
                }
            }
            "--watchers" => o.watchers = val()?.parse()?,
            "--streams" => o.streams = val()?.parse()?,
            "--conns" => o.conns = Some(val()?.parse()?),
            "--puts" => o.puts = val()?.parse()?,
            "--gap-ms" => o.gap = Duration::from_millis(val()?.parse()?),
            "--pid" => o.pid = Some(val()?.parse()?),
            "--settle-ms" => o.settle = Duration::from_millis(val()?.parse()?),
            "--put-deadline-secs" => o.put_deadline = Duration::from_secs(val()?.parse()?),
            "--create-deadline-secs" => {
                o.create_deadline = Duration::from_secs(val()?.parse()?);
            }
            "--prefix" => o.prefix = val()?,
            "--deadline-secs" => o.deadline = Duration::from_secs(val()?.parse()?),
            other => bail!("unknown argument {other}"),
        }
    }
    if o.watchers == 0 || o.streams == 0 || o.puts == 0 || o.conns == Some(0) {
        bail!("--watchers, --streams, --conns and --puts must be positive");
    }
    o.streams = o.streams.min(o.watchers);
    Ok(o)
}

/// The process's monotonic epoch: send and arrival times are both measured from it.
fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// `VmRSS` of a process in KiB.
fn rss_kib(pid: Option<u32>) -> Result<Option<u64>> {
    let Some(pid) = pid else { return Ok(None) };
    concord_integration::rss_kib(pid)
        .map(Some)
        .with_context(|| format!("no VmRSS for pid {pid}"))
}

fn pct_ms(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1e6
}

async fn probe(o: &Opts) -> Result<serde_json::Value> {
    let start = Instant::now();
    let key = format!("{}probe", o.prefix);
    probe_writes(std::slice::from_ref(&o.endpoint), &key, o.deadline).await?;
    Ok(json!({"mode": "probe", "ready_secs": start.elapsed().as_secs_f64()}))
}

/// What every stream's reader reports into.
struct Shared {
    /// Per put: events received, and the latest arrival time (ns since the epoch).
    received: Vec<AtomicU64>,
    last_arrival: Vec<AtomicU64>,
    /// Events each put should produce (N with one key, 1 with distinct keys).
    expected_per_put: u64,
    created: AtomicUsize,
    canceled: AtomicUsize,
    /// Woken when all watchers are created and when a put's fan-out completes.
    progress: Notify,
    first_problem: Mutex<Option<String>>,
}

impl Shared {
    fn problem(&self, p: String) {
        let mut f = self.first_problem.lock().unwrap_or_else(|e| e.into_inner());
        f.get_or_insert(p);
    }
}

/// One stream's reader's own tallies (only it locks them until the end).
#[derive(Default)]
struct StreamStats {
    latencies_ns: Vec<u64>,
    /// watch id -> sequence number of the last put seen.
    last_seq: HashMap<i64, u64>,
    events: u64,
    out_of_order: u64,
    foreign: u64,
    error: Option<String>,
}

fn parse_value(v: &[u8]) -> Option<(usize, u64)> {
    let s = std::str::from_utf8(v).ok()?;
    let (seq, ns) = s.split_once(':')?;
    Some((seq.parse().ok()?, ns.parse().ok()?))
}

fn on_response(resp: &WatchResponse, shared: &Shared, stats: &mut StreamStats) {
    if resp.created() {
        if resp.canceled() {
            shared.canceled.fetch_add(1, Ordering::Relaxed);
            shared.problem(format!("watch create refused: {}", resp.cancel_reason()));
        }
        shared.created.fetch_add(1, Ordering::Relaxed);
        shared.progress.notify_one();
        return;
    }
    if resp.canceled() {
        shared.canceled.fetch_add(1, Ordering::Relaxed);
        shared.problem(format!(
            "watch {} cancelled: {} (compact_revision {})",
            resp.watch_id(),
            resp.cancel_reason(),
            resp.compact_revision()
        ));
        return;
    }
    for ev in resp.events() {
        let arrival = now_ns();
        let Some((seq, sent)) = ev.kv().and_then(|kv| parse_value(kv.value())) else {
            stats.foreign += 1;
            continue;
        };
        if seq >= shared.received.len() {
            stats.foreign += 1;
            continue;
        }
        stats.events += 1;
        stats.latencies_ns.push(arrival.saturating_sub(sent));
        let last = stats.last_seq.entry(resp.watch_id()).or_insert(u64::MAX);
        if *last != u64::MAX && seq as u64 <= *last {
            stats.out_of_order += 1;
        }
        *last = seq as u64;
        shared.last_arrival[seq].fetch_max(arrival, Ordering::Relaxed);
        let n = shared.received[seq].fetch_add(1, Ordering::Relaxed) + 1;
        if n == shared.expected_per_put {
            shared.progress.notify_one();
        }
    }
}

async fn read_stream(
    mut rx: WatchResponseStream,
    shared: Arc<Shared>,
    stats: Arc<Mutex<StreamStats>>,
) {
    loop {
        match rx.message().await {
            Ok(Some(resp)) => {
                let mut s = stats.lock().unwrap_or_else(|e| e.into_inner());
                on_response(&resp, &shared, &mut s);
            }
            Ok(None) => {
                let msg = "watch stream ended by the server".to_string();
                shared.problem(msg.clone());
                stats.lock().unwrap_or_else(|e| e.into_inner()).error = Some(msg);
                return;
            }
            Err(e) => {
                let msg = format!("watch stream error: {e}");
                shared.problem(msg.clone());
                stats.lock().unwrap_or_else(|e| e.into_inner()).error = Some(msg);
                return;
            }
        }
    }
}

/// Waits until `done()` holds or `deadline` passes; true if it holds.
async fn wait_for(shared: &Shared, deadline: Duration, done: impl Fn() -> bool) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if done() {
            return true;
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        // A periodic re-check as well, so a wake-up consumed by an earlier wait
        // cannot stall this one.
        let _ = tokio::time::timeout(
            left.min(Duration::from_millis(100)),
            shared.progress.notified(),
        )
        .await;
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

async fn run(o: &Opts, run_id: &str) -> Result<serde_json::Value> {
    now_ns();
    let n = o.watchers;
    let conns_n = o.conns.unwrap_or(o.streams).min(o.streams);
    let base = format!("{}{run_id}/", o.prefix);
    let key_of = |i: usize| match o.scenario {
        Scenario::OneKey => format!("{base}one"),
        Scenario::Distinct => format!("{base}k/{i:06}"),
    };

    // 1. Connections up, then the baseline RSS.
    let mut writer = connect(&o.endpoint, Some(Duration::from_secs(30))).await?;
    writer.get("bench-watch-warm", None).await?;
    let mut conns = Vec::with_capacity(conns_n);
    for _ in 0..conns_n {
        let mut c = connect(&o.endpoint, None).await?;
        c.get("bench-watch-warm", None).await?;
        conns.push(c);
    }
    tokio::time::sleep(o.settle).await;
    let rss_before = rss_kib(o.pid)?;

    // 2. Watchers.
    let shared = Arc::new(Shared {
        received: (0..o.puts).map(|_| AtomicU64::new(0)).collect(),
        last_arrival: (0..o.puts).map(|_| AtomicU64::new(0)).collect(),
        expected_per_put: match o.scenario {
            Scenario::OneKey => n as u64,
            Scenario::Distinct => 1,
        },
        created: AtomicUsize::new(0),
        canceled: AtomicUsize::new(0),
        progress: Notify::new(),
        first_problem: Mutex::new(None),
    });
    let create_start = Instant::now();
    let mut creators = Vec::with_capacity(o.streams);
    let mut all_stats = Vec::with_capacity(o.streams);
    let mut readers = Vec::with_capacity(o.streams);
    for s in 0..o.streams {
        let mut wc = conns[s % conns_n].watch_client();
        let keys: Vec<String> = (s..n).step_by(o.streams).map(key_of).collect();
        let stats = Arc::new(Mutex::new(StreamStats::default()));
        all_stats.push(stats.clone());
        let shared = shared.clone();
        creators.push(tokio::spawn(async move {
            let stream = wc.watch(keys[0].clone(), None).await?;
            let (mut tx, rx) = stream.split();
            let reader = tokio::spawn(read_stream(rx, shared, stats));
            for k in &keys[1..] {
                tx.watch(k.clone(), None).await?;
            }
            // The request side stays open (dropping it would half-close the stream).
            anyhow::Ok((tx, reader))
        }));
    }
    let mut senders = Vec::with_capacity(o.streams);
    for c in creators {
        let (tx, reader) = c.await??;
        senders.push(tx);
        readers.push(reader);
    }
    let all_created = wait_for(&shared, o.create_deadline, || {
        shared.created.load(Ordering::Relaxed) >= n
    })
    .await;
    let create_secs = create_start.elapsed().as_secs_f64();
    if !all_created {
        bail!(
            "only {} of {n} watchers created after {:?}; first problem: {:?}",
            shared.created.load(Ordering::Relaxed),
            o.create_deadline,
            shared
                .first_problem
                .lock()
                .unwrap_or_else(|e| e.into_inner())
        );
    }
    tokio::time::sleep(o.settle).await;
    let rss_after = rss_kib(o.pid)?;

    // 3. Puts, each spaced after the previous one's fan-out.
    let mut stride = 7919 % n.max(2);
    while n > 1 && gcd(stride.max(1), n) != 1 {
        stride += 1;
    }
    let stride = stride.max(1);
    let mut timed_out = 0u64;
    let mut put_ack_ns = Vec::with_capacity(o.puts);
    let mut send_ns = Vec::with_capacity(o.puts);
    let puts_start = Instant::now();
    for k in 0..o.puts {
        let key = key_of((k * stride) % n);
        let sent = now_ns();
        send_ns.push(sent);
        writer.put(key, format!("{k}:{sent}"), None).await?;
        put_ack_ns.push(now_ns() - sent);
        let complete = wait_for(&shared, o.put_deadline, || {
            shared.received[k].load(Ordering::Relaxed) >= shared.expected_per_put
        })
        .await;
        if !complete {
            timed_out += 1;
        }
        tokio::time::sleep(o.gap).await;
    }
    let puts_secs = puts_start.elapsed().as_secs_f64();
    let rss_after_puts = rss_kib(o.pid)?;

    // Tallies.
    for r in &readers {
        r.abort();
    }
    drop(senders);
    let mut lat = Vec::new();
    let (mut events, mut out_of_order, mut foreign, mut stream_errors) = (0u64, 0u64, 0u64, 0u64);
    for s in &all_stats {
        let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
        lat.append(&mut s.latencies_ns);
        events += s.events;
        out_of_order += s.out_of_order;
        foreign += s.foreign;
        stream_errors += u64::from(s.error.is_some());
    }
    lat.sort_unstable();
    let mut last: Vec<u64> = (0..o.puts)
        .filter(|&k| shared.received[k].load(Ordering::Relaxed) >= shared.expected_per_put)
        .map(|k| shared.last_arrival[k].load(Ordering::Relaxed) - send_ns[k])
        .collect();
    last.sort_unstable();
    put_ack_ns.sort_unstable();
    let expected = shared.expected_per_put * o.puts as u64;
    let per_watcher = |before: Option<u64>, after: Option<u64>| match (before, after) {
        (Some(b), Some(a)) => json!((a as f64 - b as f64) * 1024.0 / n as f64),
        _ => serde_json::Value::Null,
    };
    let first_problem = shared
        .first_problem
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    Ok(json!({
        "mode": "run",
        "scenario": o.scenario.name(),
        "watchers": n,
        "streams": o.streams,
        "conns": conns_n,
        "puts": o.puts,
        "gap_ms": o.gap.as_millis() as u64,
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "rss_after_puts_kib": rss_after_puts,
        "bytes_per_watcher": per_watcher(rss_before, rss_after),
        "create_secs": create_secs,
        "puts_secs": puts_secs,
        "events_expected": expected,
        "events_received": events,
        "events_missing": expected.saturating_sub(events),
        "out_of_order": out_of_order,
        "foreign_events": foreign,
        "watchers_canceled": shared.canceled.load(Ordering::Relaxed),
        "stream_errors": stream_errors,
        "puts_timed_out": timed_out,
        "event_p50_ms": pct_ms(&lat, 0.50),
        "event_p99_ms": pct_ms(&lat, 0.99),
        "event_max_ms": pct_ms(&lat, 1.0),
        "last_p50_ms": pct_ms(&last, 0.50),
        "last_p99_ms": pct_ms(&last, 0.99),
        "last_max_ms": pct_ms(&last, 1.0),
        "put_ack_p50_ms": pct_ms(&put_ack_ns, 0.50),
        "first_problem": first_problem,
    }))
}

#[tokio::main]
async fn main() -> Result<()> {
    let o = parse()?;
    let run_id = concord_integration::run_id();
    let out = if o.probe {
        probe(&o).await?
    } else {
        run(&o, &run_id).await?
    };
    println!("{out}");
    Ok(())
}
