//! Real neighbours of etcd's HTTP/JSON API, unmodified, against `concord`: Python's
//! `etcd3gw` through a scenario, and Patroni keeping a PostgreSQL 15 pair highly
//! available through a failover, the same run against a real etcd for reference. The
//! scenarios are the scripts in `integration/neighbours/` (their setup is
//! `integration/neighbours/deps.sh`, run by `scripts/deps.sh`).

use std::path::PathBuf;
use std::process::{Command, Stdio};

use concord_integration::{Concord, Etcd};

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("neighbours")
        .join(name)
}

/// Runs a scenario script against `endpoint` (bounded by `timeout`, in seconds) and
/// returns its output; fails the test with the output unless it exits 0.
fn run(name: &str, endpoint: &str, extra: &[&str], timeout: u32) -> String {
    let out = Command::new("timeout")
        .arg(timeout.to_string())
        .arg("python3")
        .arg(script(name))
        .args(["--endpoint", endpoint])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("running python3");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{name} against {endpoint} failed:\n{text}"
    );
    text
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd3gw_passes_its_scenario() {
    let concord = Concord::start().await.expect("concord");
    let ep = concord.endpoint();
    let out = tokio::task::spawn_blocking(move || run("etcd3gw_scenario.py", &ep, &[], 600))
        .await
        .unwrap();
    let last = out
        .lines()
        .rev()
        .find(|l| l.contains("checks,"))
        .unwrap_or("");
    assert!(last.ends_with(" 0 failed"), "{out}");
}

/// `failover_seconds=F rejoin_seconds=R` from the Patroni scenario's last line.
fn failover(out: &str) -> (f64, f64) {
    let line = out
        .lines()
        .rev()
        .find(|l| l.starts_with("failover_seconds="))
        .unwrap_or_else(|| panic!("no figures in:\n{out}"));
    let mut f = line.split_whitespace().map(|kv| {
        kv.split_once('=')
            .and_then(|(_, v)| v.parse::<f64>().ok())
            .expect("a figure")
    });
    (f.next().expect("failover"), f.next().expect("rejoin"))
}

fn patroni(endpoint: &str, label: &str) -> (f64, f64) {
    let work = tempfile::Builder::new()
        .prefix(&format!("patroni-{label}"))
        .tempdir_in("/tmp")
        .expect("workdir");
    // The postgres user owns the data directories the script makes in there.
    let mut perm = std::fs::metadata(work.path()).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o777);
    std::fs::set_permissions(work.path(), perm).unwrap();
    let dir = work.path().to_str().unwrap().to_string();
    let out = run(
        "patroni_failover.py",
        endpoint,
        &["--workdir", &dir, "--ttl", "10", "--loop-wait", "2"],
        900,
    );
    failover(&out)
}

/// The scenario itself asserts promotion within ttl + loop_wait + 20 s and the old
/// leader's rejoin as a streaming replica; both servers must pass it.
#[tokio::test(flavor = "multi_thread")]
async fn patroni_fails_over_on_concord_as_on_etcd() {
    let concord = Concord::start().await.expect("concord");
    let etcd = Etcd::start().await.expect("etcd");
    let (c, e) = (concord.endpoint(), etcd.endpoint());
    let (ours, theirs) =
        tokio::task::spawn_blocking(move || (patroni(&c, "concord"), patroni(&e, "etcd")))
            .await
            .unwrap();
    for (f, r) in [ours, theirs] {
        assert!(f <= 10.0 + 2.0 + 20.0 && r > 0.0);
    }
    eprintln!(
        "patroni failover: concord {:.2} s (rejoin {:.2} s), etcd {:.2} s (rejoin {:.2} s)",
        ours.0, ours.1, theirs.0, theirs.1
    );
}
