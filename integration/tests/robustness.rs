//! Robustness scenarios (etcd's robustness tests as the bar): each run starts a 1- or
//! 3-member Concord cluster built with failpoints, runs [`traffic`] clients and two
//! recording watchers, injects **one** random fault, undoes it, and then checks
//!
//! * the KV history against the store model with revisions ([`history::check`]): no
//!   acknowledged write lost, reads equal to the state at their revision, real-time
//!   order (no stale linearizable reads), serializable reads from some prefix, no
//!   phantom writes, dense revisions;
//! * both watchers against the reference log for etcd's six watch guarantees
//!   ([`watchcheck::check`]).
//!
//! Faults: kill -9 (a random member), a failpoint crash (`panic` armed over HTTP at a
//! random point on a random member, which aborts the process), SIGSTOP of the leader,
//! and on 3 members: partition, peer delay (75 ± 50 ms), random drop, blackhole until
//! a snapshot is needed, member replacement (remove a follower, add a fresh one).
//!
//! * `ROBUSTNESS_FAULTS` (e.g. `Partition,Delay,ReplaceMember`) limits the fault kinds;
//! * `ROBUSTNESS_RUNS` (default 3) runs, `ROBUSTNESS_SECS` (default 12) of traffic
//!   each, `ROBUSTNESS_SEED` (printed) replays a run sequence; `scripts/robustness.sh
//!   --runs N` runs many.
//! * A failed run copies every member's data directory and log, the history and the
//!   watch recordings to `$TMPDIR/robustness-<seed>-<run>/` and says so.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use concord_integration::cluster::{Cluster, ClusterOptions, Kind};
use concord_integration::history::Record;
use concord_integration::traffic;
use concord_integration::verdict::{Leftover, Watchers, final_write};
use concord_integration::{Rng, concord_failpoints_bin, wait_answering, wait_until};

const CLIENTS: usize = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    Kill9,
    FailpointCrash,
    PauseLeader,
    Partition,
    Delay,
    Drop,
    BlackholeUntilSnapshot,
    ReplaceMember,
}

const SINGLE: &[Fault] = &[Fault::Kill9, Fault::FailpointCrash, Fault::PauseLeader];
const MULTI: &[Fault] = &[
    Fault::Kill9,
    Fault::FailpointCrash,
    Fault::PauseLeader,
    Fault::Partition,
    Fault::Delay,
    Fault::Drop,
    Fault::BlackholeUntilSnapshot,
    Fault::ReplaceMember,
];

/// Points the traffic reaches within a few seconds (snapshot points with the low
/// `--snapshot-count` below; compaction ones through the clients' compactions).
const CRASH_POINTS: &[&str] = &[
    "wal_before_append",
    "wal_before_fsync",
    "wal_after_fsync",
    "raft_before_send_persisted",
    "raft_after_send_persisted",
    "apply_before_batch",
    "apply_before_commit",
    "apply_after_commit",
    "snapshot_before_save",
    "snapshot_after_save",
    "compact_before_delete",
    "compact_after_finish",
];

/// What one run did, for the summary.
#[derive(Debug, Default)]
struct Outcome {
    fault: String,
    ops: usize,
    known: usize,
    watch_events: usize,
    violations: Vec<String>,
}

async fn wait_recovered(cluster: &Cluster) -> Result<()> {
    for i in 0..cluster.members.len() {
        if cluster.members[i].retired || cluster.members[i].pid().is_none() {
            continue;
        }
        wait_answering(&cluster.endpoint(i), Duration::from_secs(30)).await?;
    }
    Ok(())
}

/// Injects `fault` and undoes it; returns a description.
async fn inject(cluster: &mut Cluster, fault: Fault, rng: &mut Rng) -> Result<String> {
    let n = cluster.members.len();
    let len = rng.millis(2_000, 4_000);
    Ok(match fault {
        Fault::Kill9 => {
            let i = rng.below(n as u64) as usize;
            cluster.kill9(i);
            tokio::time::sleep(len).await;
            cluster.restart(i).await?;
            format!("kill -9 n{} for {len:?}", i + 1)
        }
        Fault::FailpointCrash => {
            let i = rng.below(n as u64) as usize;
            let point = CRASH_POINTS[rng.below(CRASH_POINTS.len() as u64) as usize];
            cluster.arm_failpoint(i, point, "panic").await?;
            let end = Instant::now() + Duration::from_secs(8);
            let mut crashed = false;
            while Instant::now() < end {
                if cluster.exited(i) {
                    crashed = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // Not reached in time: a restart clears the arming either way.
            cluster.restart(i).await?;
            format!(
                "failpoint {point} on n{}: {}",
                i + 1,
                if crashed {
                    "crashed"
                } else {
                    "not reached (restarted)"
                }
            )
        }
        Fault::PauseLeader => {
            let i = cluster.leader().await?;
            cluster.pause(i)?;
            tokio::time::sleep(len).await;
            cluster.resume(i)?;
            format!("SIGSTOP leader n{} for {len:?}", i + 1)
        }
        Fault::Partition => {
            let i = rng.below(n as u64) as usize;
            cluster.partition(i)?;
            tokio::time::sleep(len).await;
            cluster.heal();
            format!("partition n{} for {len:?}", i + 1)
        }
        Fault::Delay => {
            cluster.delay_peers(Duration::from_millis(75), Duration::from_millis(50))?;
            tokio::time::sleep(len).await;
            cluster.clear_network_faults();
            format!("peer delay 75±50 ms for {len:?}")
        }
        Fault::Drop => {
            cluster.drop_peers(0.05)?;
            tokio::time::sleep(len).await;
            cluster.clear_network_faults();
            format!("peer drop 5% for {len:?}")
        }
        Fault::BlackholeUntilSnapshot => {
            let leader = cluster.leader().await?;
            let i = (leader + 1 + rng.below(n as u64 - 1) as usize) % n;
            let mut c = cluster.client(leader).await?;
            let before = c
                .get("r/", None)
                .await?
                .header()
                .map_or(0, |h| h.revision());
            cluster.partition(i)?;
            // Enough entries for a snapshot plus the kept catch-up entries.
            let r = wait_until(Duration::from_secs(20), "snapshot-worthy progress", || {
                let mut c = c.clone();
                async move {
                    let now = c
                        .get("r/", None)
                        .await?
                        .header()
                        .map_or(0, |h| h.revision());
                    anyhow::ensure!(now >= before + 250, "at {now}");
                    Ok(())
                }
            })
            .await;
            cluster.heal();
            format!(
                "blackhole n{} until snapshot ({})",
                i + 1,
                if r.is_ok() {
                    "reached"
                } else {
                    "too little traffic"
                }
            )
        }
        Fault::ReplaceMember => {
            let leader = cluster.leader().await?;
            let i = (leader + 1) % n;
            let mut c = cluster.client(leader).await?;
            let id = member_id(&cluster.endpoint(i)).await.context("member id")?;
            c.member_remove(id).await?;
            cluster.members[i].retired = true;
            cluster.kill9(i);
            let (j, url) = cluster.prepare_member();
            c.member_add([url], None).await?;
            cluster.start_added(j).await?;
            format!("replaced n{} by n{}", i + 1, j + 1)
        }
    })
}

/// The member id of the member serving `endpoint`.
async fn member_id(endpoint: &str) -> Result<u64> {
    let mut c = concord_integration::connect(endpoint).await?;
    let s = c.status().await?;
    Ok(s.header().context("no header")?.member_id())
}

/// One scenario: returns the outcome (violations included) or an error if the run
/// itself broke (cluster did not recover).
async fn run(seed: u64, secs: u64, dump: &PathBuf) -> Result<Outcome> {
    let mut rng = Rng::new(seed);
    // `ROBUSTNESS_FAULTS=Partition,Delay` picks among those kinds only (3 members).
    let only: Vec<Fault> = std::env::var("ROBUSTNESS_FAULTS")
        .map(|v| {
            MULTI
                .iter()
                .copied()
                .filter(|f| v.split(',').any(|n| n.trim() == format!("{f:?}")))
                .collect()
        })
        .unwrap_or_default();
    let size = if !only.is_empty() || rng.below(3) != 0 {
        3
    } else {
        1
    };
    let faults = match (size, only.is_empty()) {
        (_, false) => &only[..],
        (1, true) => SINGLE,
        _ => MULTI,
    };
    let fault = faults[rng.below(faults.len() as u64) as usize];
    println!("robustness: seed {seed}: {size} member(s), fault {fault:?}");
    let mut cluster = Cluster::start(
        Kind::Concord,
        ClusterOptions {
            size,
            proxied: size > 1,
            extra: [
                "--snapshot-count",
                "200",
                "--experimental-snapshot-catchup-entries",
                "50",
                "--experimental-watch-progress-notify-interval",
                "1s",
            ]
            .map(String::from)
            .to_vec(),
            bin: Some(concord_failpoints_bin()),
        },
    )
    .await?;
    let result = scenario(&mut cluster, fault, secs, &mut rng).await;
    let failed = !matches!(&result, Ok(o) if o.violations.is_empty());
    if failed {
        std::fs::create_dir_all(dump)?;
        for m in &cluster.members {
            let _ = std::process::Command::new("cp")
                .arg("-a")
                .arg(m.data_dir())
                .arg(dump.join(&m.name))
                .status();
        }
        for i in 0..cluster.members.len() {
            std::fs::write(dump.join(format!("n{}.log", i + 1)), cluster.member_log(i))?;
        }
        println!(
            "robustness: seed {seed} FAILED; data, logs and history kept in {}",
            dump.display()
        );
    }
    result
}

async fn scenario(
    cluster: &mut Cluster,
    fault: Fault,
    secs: u64,
    rng: &mut Rng,
) -> Result<Outcome> {
    let origin = Instant::now();
    let stop = origin + Duration::from_secs(secs);
    let endpoints = cluster.endpoints();
    let compact_to = Arc::new(AtomicI64::new(0));
    let watchers = Watchers::spawn(&endpoints, rng);
    // Compactions stay behind what the watchers need: their sessions are resumed from
    // history and would be canceled otherwise. Tracked from the reference's reads.
    let progress = {
        let compact_to = compact_to.clone();
        let endpoint = endpoints[0].clone();
        tokio::spawn(async move {
            // Behind the current revision by a margin a resumed watcher never needs.
            while Instant::now() < stop {
                if let Ok(mut c) = concord_integration::connect(&endpoint).await
                    && let Ok(r) = c.get("r/", None).await
                {
                    let rev = r.header().map_or(0, |h| h.revision());
                    compact_to.store(rev - 1000, Ordering::Release);
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        })
    };
    let mut clients = Vec::new();
    for id in 0..CLIENTS {
        clients.push(tokio::spawn(traffic::client_loop(
            id,
            endpoints.clone(),
            origin,
            stop,
            rng.next_u64(),
            compact_to.clone(),
        )));
    }
    tokio::time::sleep(rng.millis(1_500, 3_000)).await;
    let desc = inject(cluster, fault, rng).await;
    let mut history: Vec<Record> = Vec::new();
    for c in clients {
        history.extend(c.await?);
    }
    progress.abort();
    let desc = desc?;
    println!("robustness: fault: {desc}");
    cluster.clear_network_faults();
    wait_recovered(cluster).await?;
    // Leases expiring later would write after the final write.
    let live = (0..cluster.members.len())
        .find(|&i| !cluster.members[i].retired && cluster.members[i].pid().is_some())
        .context("no live member")?;
    let (marker, end_writes) = final_write(&cluster.endpoint(live), Leftover::Expire).await?;
    history.extend(end_writes);
    let v = watchers.finish(&history, marker).await?;
    println!("robustness: watches: {}", v.watch_report);
    println!("robustness: history: {}", v.history_report);
    let out = Outcome {
        fault: desc,
        ops: v.ops,
        known: v.known,
        watch_events: v.watch_events,
        violations: v.violations,
    };
    let events = v.events;
    if !out.violations.is_empty() {
        let mut text = String::new();
        for (i, r) in history.iter().enumerate() {
            let _ = writeln!(text, "{i}: {r:?}");
        }
        let _ = writeln!(text, "reference:");
        for e in &events {
            let _ = writeln!(text, "  {e}");
        }
        let dir = std::env::temp_dir().join("robustness-last-history.txt");
        std::fs::write(&dir, text)?;
        println!("robustness: history written to {}", dir.display());
    }
    if out.known < 50 {
        bail!(
            "only {} requests completed: the cluster did not serve",
            out.known
        );
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn randomized_scenarios() {
    let env = |k: &str, d: u64| -> u64 {
        std::env::var(k)
            .ok()
            .map(|s| s.parse().unwrap_or_else(|_| panic!("{k} must be a number")))
            .unwrap_or(d)
    };
    let runs = env("ROBUSTNESS_RUNS", 3);
    let secs = env("ROBUSTNESS_SECS", 12);
    let seed = env(
        "ROBUSTNESS_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    );
    println!("robustness: {runs} runs of {secs} s, ROBUSTNESS_SEED={seed}");
    let mut rng = Rng::new(seed);
    let mut by_fault: BTreeMap<String, u32> = BTreeMap::new();
    let (mut ops, mut known, mut watch_events) = (0, 0, 0);
    let mut failures = Vec::new();
    for run_no in 0..runs {
        let run_seed = rng.next_u64();
        let dump = std::env::temp_dir().join(format!("robustness-{seed}-{run_no}"));
        match run(run_seed, secs, &dump).await {
            Ok(o) => {
                *by_fault
                    .entry(
                        o.fault
                            .split(" n")
                            .next()
                            .unwrap_or("")
                            .split(" for")
                            .next()
                            .unwrap_or("")
                            .to_string(),
                    )
                    .or_default() += 1;
                ops += o.ops;
                known += o.known;
                watch_events += o.watch_events;
                if !o.violations.is_empty() {
                    failures.push(format!(
                        "run {run_no} (seed {run_seed}, {}): {:#?}",
                        o.fault, o.violations
                    ));
                }
            }
            Err(e) => failures.push(format!("run {run_no} (seed {run_seed}): {e:#}")),
        }
    }
    println!(
        "robustness: {runs} runs, faults {by_fault:?}, {ops} requests ({known} known), \
         {watch_events} watch events checked, {} failed",
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
