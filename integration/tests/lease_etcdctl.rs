//! Differential test of `etcdctl lease ...`: the same script against a real etcd 3.4
//! started by the test and against `concord`. Lease ids are chosen by the server, so
//! each id a `lease grant` prints becomes a name (`L1`, `L2`, ...) that later commands
//! use and outputs show; `remaining(Ns)` ticks, so it is compared separately within a
//! second; attached keys and `lease list` come in map order from etcd, so they are
//! sorted. Everything else must be byte-for-byte equal, error lines included.
//!
//! `etcdctl lease keep-alive` (without `--once`) runs as a child: it must keep the lease
//! alive past its TTL, print a line per renewal, and stop with "expired or revoked" when
//! the lease is revoked under it.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use concord_integration::{Concord, Etcd, etcdctl};
use regex::Regex;

/// The script: `{L1}` etc. stand for the id printed by the n-th `lease grant`.
const SCRIPT: &[&str] = &[
    "lease grant 60",
    "lease grant 1",
    "lease grant 9000000001",
    "put k1 v1 --lease={L1}",
    "put k2 v2 --lease={L1}",
    "put k3 v3 --lease=1234abcd",
    "lease timetolive {L1}",
    "lease timetolive {L1} --keys",
    "lease timetolive 1234abcd",
    "lease timetolive 1234abcd --keys",
    "lease keep-alive --once {L1}",
    "lease keep-alive --once 1234abcd",
    "lease list",
    "get k --prefix",
    "lease revoke {L1}",
    "get k --prefix",
    "lease revoke {L1}",
    "lease timetolive {L1}",
    "lease revoke {L2}",
    "lease list",
    "lease revoke zz",
];

struct Names {
    ids: Vec<String>,
}

impl Names {
    fn substitute(&self, cmd: &str) -> String {
        let mut s = cmd.to_string();
        for (i, id) in self.ids.iter().enumerate() {
            s = s.replace(&format!("{{L{}}}", i + 1), id);
        }
        s
    }

    /// Replaces ids by names, sorts what etcd prints in map order, and takes out the
    /// remaining TTLs (returned separately).
    fn normalise(&self, out: &str) -> (String, Vec<i64>) {
        let mut s = out.to_string();
        for (i, id) in self.ids.iter().enumerate() {
            s = s.replace(id.as_str(), &format!("L{}", i + 1));
        }
        let remaining = Regex::new(r"remaining\((-?\d+)s\)").unwrap();
        let ttls = remaining
            .captures_iter(&s)
            .map(|c| c[1].parse().unwrap())
            .collect();
        s = remaining.replace_all(&s, "remaining(Ns)").into_owned();
        let keys = Regex::new(r"attached keys\(\[([^\]]*)\]\)").unwrap();
        s = keys
            .replace_all(&s, |c: &regex::Captures<'_>| {
                let mut k: Vec<&str> = c[1].split(' ').collect();
                k.sort();
                format!("attached keys([{}])", k.join(" "))
            })
            .into_owned();
        if let Some(rest) = s.strip_prefix("exit=0\nfound ") {
            let mut lines: Vec<&str> = rest.lines().collect();
            let head = lines.remove(0);
            lines.sort();
            s = format!("exit=0\nfound {head}\n{}\n", lines.join("\n"));
        }
        (s, ttls)
    }
}

/// Exit status, stdout, and the `Error:` lines of stderr.
fn run(endpoint: &str, cmd: &str) -> String {
    let args: Vec<&str> = cmd.split(' ').collect();
    let out = etcdctl(endpoint, &args, None).expect("etcdctl runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("Error:")).collect();
    format!(
        "exit={}\n{}{}",
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout),
        errors.join("\n")
    )
}

/// Runs the script; returns each command with its normalised output, and the
/// remaining TTLs seen.
fn transcript(endpoint: &str) -> (Vec<String>, Vec<i64>) {
    let granted = Regex::new(r"^lease ([0-9a-f]+) granted").unwrap();
    let mut names = Names { ids: Vec::new() };
    let mut lines = Vec::new();
    let mut ttls = Vec::new();
    for cmd in SCRIPT {
        let full = names.substitute(cmd);
        let out = run(endpoint, &full);
        if let Some(c) = out
            .strip_prefix("exit=0\n")
            .and_then(|o| granted.captures(o))
        {
            names.ids.push(c[1].to_string());
        }
        let (norm, t) = names.normalise(&out);
        ttls.extend(t);
        lines.push(format!("$ etcdctl {cmd}\n{norm}"));
    }
    (lines, ttls)
}

#[tokio::test]
async fn etcdctl_lease_commands_match_real_etcd() {
    let etcd = Etcd::start()
        .await
        .expect("reference etcd starts (apt-get install etcd-server)");
    let concord = Concord::start().await.unwrap();
    let (want, want_ttls) = transcript(&etcd.endpoint());
    let (got, got_ttls) = transcript(&concord.endpoint());
    let diffs: Vec<String> = want
        .iter()
        .zip(&got)
        .filter(|(w, g)| w != g)
        .map(|(w, g)| format!("--- etcd\n{w}\n--- concord\n{g}"))
        .collect();
    assert!(diffs.is_empty(), "outputs differ:\n{}", diffs.join("\n"));
    assert_eq!(want_ttls.len(), got_ttls.len());
    for (w, g) in want_ttls.iter().zip(&got_ttls) {
        assert!((w - g).abs() <= 1, "remaining TTL {g} vs etcd's {w}");
    }
    // The transcript shows what etcd documents.
    let all = want.join("\n");
    assert!(all.contains("granted with TTL(2s)"), "{all}");
    assert!(all.contains("attached keys([k1 k2])"), "{all}");
    assert!(all.contains("lease L1 revoked"), "{all}");
    eprintln!("{} etcdctl lease commands matched", want.len());
}

/// `etcdctl lease keep-alive ID` until the lease is revoked under it: its lines with
/// the id replaced, in order, duplicates folded, and how many renewals it printed.
fn keep_alive_run(endpoint: &str) -> (Vec<String>, usize, bool) {
    let out = run(endpoint, "lease grant 2");
    let id = Regex::new(r"lease ([0-9a-f]+) granted")
        .unwrap()
        .captures(&out)
        .expect("granted")[1]
        .to_string();
    run(endpoint, &format!("put held v --lease={id}"));
    let child = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", endpoint, "lease", "keep-alive", &id])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("etcdctl runs");
    let pid = child.id();
    // Three TTLs: the key must still be there.
    std::thread::sleep(Duration::from_secs(6));
    let held = run(endpoint, "get held --print-value-only") == "exit=0\nv\n";
    run(endpoint, &format!("lease revoke {id}"));
    // The revoke ends the command on its own; a watchdog kills it (by pid) if not.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(15) {
                if done.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        })
    };
    let out = child.wait_with_output().expect("etcdctl ends");
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    watchdog.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).replace(&id, "L");
    let mut lines: Vec<String> = Vec::new();
    let mut renewals = 0;
    for l in stdout.lines() {
        if l.contains("keepalived") {
            renewals += 1;
        }
        if lines.last().map(String::as_str) != Some(l) {
            lines.push(l.to_string());
        }
    }
    lines.push(format!("exit={}", out.status.code().unwrap_or(-1)));
    (lines, renewals, held)
}

#[tokio::test]
async fn etcdctl_keep_alive_holds_a_lease_until_it_is_revoked() {
    let etcd = Etcd::start().await.unwrap();
    let concord = Concord::start().await.unwrap();
    let (want, want_n, want_held) = keep_alive_run(&etcd.endpoint());
    let (got, got_n, got_held) = keep_alive_run(&concord.endpoint());
    assert!(want_held, "etcd kept the key");
    assert!(
        got_held,
        "concord let the key go while etcdctl kept its lease alive"
    );
    assert_eq!(got, want, "keep-alive output differs from etcd's");
    assert!(
        got_n >= 6,
        "only {got_n} renewals printed in 6 s of a 2 s lease"
    );
    eprintln!("renewals printed: etcd {want_n}, concord {got_n}; lines {got:?}");
}
