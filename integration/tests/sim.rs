//! The simulation tier in CI: seeded scenarios of whole members in one process
//! (`concord_integration::sim`), and the planted bugs they must catch.
//!
//! * `SIM_SEEDS` (default 20) scenarios, `SIM_BASE` (printed) repeats a run; a failing
//!   seed prints itself, and `scripts/sim.sh --seed S` replays it.
//! * Each planted bug (a failpoint that makes Concord wrong on purpose) must be caught
//!   within 200 seeds by the same checkers.

use std::process::{Command, Stdio};
use std::time::Duration;

use concord_integration::concord_sim_failpoints_bin;
use concord_integration::sim::{self, Options};

fn env_u64(k: &str) -> Option<u64> {
    std::env::var(k)
        .ok()
        .map(|s| s.parse().unwrap_or_else(|_| panic!("{k} must be a number")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seeded_scenarios_find_no_violation() {
    let n = env_u64("SIM_SEEDS").unwrap_or(20);
    let base = env_u64("SIM_BASE").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    println!("sim: {n} seeds, SIM_BASE={base}");
    let seeds = (0..n).map(|i| sim::scenario_seed(base, i)).collect();
    let s = sim::run_many(seeds, 3, Options::default(), false).await;
    println!(
        "sim: {} requests ({} known), {} watch events; sizes {:?}; faults {:?}",
        s.ops, s.known, s.watch_events, s.by_size, s.by_kind
    );
    println!("{} seeds, {} violations", s.seeds, s.violations);
    assert_eq!(s.seeds as u64, n);
    assert!(s.known > 0, "no request completed");
    assert_eq!(s.violations, 0, "failing seeds: {:?}", s.failed);
}

/// Runs the failpoint build of `concord-sim` with `bug` planted until the first
/// violation (200 seeds at most) and returns (seeds run, violations).
fn hunt(bug: &str, faults: &str) -> (u64, u64) {
    let bin = concord_sim_failpoints_bin();
    let mut cmd = Command::new(&bin);
    cmd.args([
        "--plant",
        bug,
        "--seeds",
        "200",
        "--until-violation",
        "--jobs",
        "2",
    ]);
    if !faults.is_empty() {
        cmd.args(["--faults", faults]);
    }
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting concord-sim");
    let pid = child.id();
    // Bounded: a hunt that does not end in 15 minutes is killed (by its pid).
    let watchdog = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(900);
        while std::time::Instant::now() < deadline {
            std::thread::park_timeout(Duration::from_secs(1));
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                return;
            }
        }
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    });
    let out = child.wait_with_output().expect("waiting for concord-sim");
    let _ = watchdog.join();
    let text = String::from_utf8_lossy(&out.stdout);
    print!("{text}");
    let last = text.lines().last().unwrap_or("");
    let mut words = last.split_whitespace();
    let seeds = words.next().and_then(|w| w.parse().ok());
    let violations = words.nth(1).and_then(|w| w.parse().ok());
    match (seeds, violations) {
        (Some(s), Some(v)) if last.ends_with(" violations") => (s, v),
        _ => panic!("concord-sim did not end with its summary line: {last:?}"),
    }
}

#[test]
fn planted_read_without_read_index_is_caught() {
    let (seeds, v) = hunt(
        "bug_read_without_read_index",
        "Delay,Partition,IsolateLeader",
    );
    assert!(v > 0, "no violation in {seeds} seeds");
}

#[test]
fn planted_apply_twice_is_caught() {
    let (seeds, v) = hunt("bug_apply_twice", "");
    assert!(v > 0, "no violation in {seeds} seeds");
}

#[test]
fn planted_ack_before_fsync_is_caught() {
    let (seeds, v) = hunt("bug_ack_before_fsync", "Crash");
    assert!(v > 0, "no violation in {seeds} seeds");
}
