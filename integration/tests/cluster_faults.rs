//! Cluster faults, black-box: a 3-member Concord cluster driven with real clients
//! (`etcdctl` and `etcd-client`) through leader kills under write load, follower
//! catch-up through a snapshot, a SIGSTOPped leader, and network partitions of a
//! follower and of the leader. Every test starts its own cluster.
//!
//! The errors a member may answer with when it cannot serve a linearizable request
//! are etcd's, all gRPC `Unavailable`: see [`UNAVAILABLE`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use concord_integration::cluster::{Cluster, ClusterOptions, Kind};
use concord_integration::{RETRY_DEADLINE, etcdctl, retry_transient, wait_until};
use etcd_client::{Client, ConnectOptions, GetOptions};

/// Which server the tests run against (`Kind::Etcd` to check the tests themselves).
const KIND: Kind = Kind::Concord;

/// How long a member may take to catch up or recover after a fault.
const DEADLINE: Duration = Duration::from_secs(30);

/// What a member answers when it cannot serve a linearizable request (code
/// `Unavailable`, as etcd).
const UNAVAILABLE: [&str; 3] = [
    "etcdserver: no leader",
    "etcdserver: request timed out",
    "etcdserver: leader changed",
];

// ---------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------

async fn start(proxied: bool, extra: &[&str]) -> Cluster {
    let opts = ClusterOptions {
        proxied,
        extra: extra.iter().map(|s| s.to_string()).collect(),
        ..ClusterOptions::default()
    };
    Cluster::start(KIND, opts)
        .await
        .expect("starting a 3-member cluster")
}

/// Unwraps `r`, or prints every member's log and panics.
fn ok<T>(c: &Cluster, what: &str, r: Result<T>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => fail(c, &format!("{what}: {e:#}")),
    }
}

/// Prints every member's log and panics with `msg`.
fn fail(c: &Cluster, msg: &str) -> ! {
    c.print_logs();
    panic!("{msg}")
}

/// A client of one endpoint with the given per-request timeout.
async fn client_to(endpoint: &str, timeout: Duration) -> Result<Client> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_timeout(timeout);
    Ok(Client::connect([endpoint], Some(opts)).await?)
}

/// Whether `e` is one of the errors a member answers with when it cannot serve a
/// linearizable request.
fn is_unavailable(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if s.code() == tonic::Code::Unavailable && UNAVAILABLE.contains(&s.message()))
}

/// A member's own view, from the Maintenance `Status` RPC.
#[derive(Debug, Clone, Copy)]
struct Status {
    id: u64,
    leader: u64,
    term: u64,
    /// Commit index (`raft_index`).
    commit: u64,
    applied: u64,
}

/// Member `i`'s status (2 s timeout).
async fn status_of(c: &Cluster, i: usize) -> Result<Status> {
    status(&c.endpoint(i), Duration::from_secs(2)).await
}

async fn status(endpoint: &str, timeout: Duration) -> Result<Status> {
    tokio::time::timeout(timeout, async {
        let s = client_to(endpoint, timeout).await?.status().await?;
        anyhow::Ok(Status {
            id: s.header().context("status without header")?.member_id(),
            leader: s.leader(),
            term: s.raft_term(),
            commit: s.raft_index(),
            applied: s.raft_applied_index(),
        })
    })
    .await
    .map_err(|_| anyhow!("status of {endpoint} timed out after {timeout:?}"))?
}

/// The status of each of `members`, probed concurrently (`Err` for those that do not
/// answer within `timeout`).
async fn statuses(
    c: &Cluster,
    members: &[usize],
    timeout: Duration,
) -> Vec<(usize, Result<Status>)> {
    let mut probes = tokio::task::JoinSet::new();
    for &i in members {
        let endpoint = c.endpoint(i);
        probes.spawn(async move { (i, status(&endpoint, timeout).await) });
    }
    let mut out = Vec::new();
    while let Some(r) = probes.join_next().await {
        out.push(r.expect("status probe task"));
    }
    out.sort_by_key(|(i, _)| *i);
    out
}

/// Polls the status of `members` (short timeouts) until one of them names a leader
/// that is one of `members` and not `old` (with `all`: until every one of them names
/// the same such leader). Returns the leader's index and id, and when it was first
/// seen, measured from `since`.
async fn wait_new_leader(
    c: &Cluster,
    members: &[usize],
    old: u64,
    all: bool,
    since: Instant,
    deadline: Duration,
) -> Result<(usize, u64, Duration)> {
    let mut last = Vec::new();
    while since.elapsed() < deadline {
        let reports = statuses(c, members, Duration::from_millis(500)).await;
        let seen = since.elapsed();
        let ids: BTreeMap<u64, usize> = reports
            .iter()
            .filter_map(|(i, s)| s.as_ref().ok().map(|s| (s.id, *i)))
            .collect();
        let leaders: Vec<Option<u64>> = reports
            .iter()
            .map(|(_, s)| s.as_ref().ok().map(|s| s.leader))
            .collect();
        let candidate = leaders
            .iter()
            .flatten()
            .find(|&&l| l != 0 && l != old && ids.contains_key(&l));
        if let Some(&l) = candidate
            && (!all || leaders.iter().all(|&x| x == Some(l)))
        {
            return Ok((ids[&l], l, seen));
        }
        last = reports
            .into_iter()
            .map(|(i, s)| format!("n{}: {s:?}", i + 1))
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("no new leader (old {old:x}) among {members:?} within {deadline:?}: {last:?}")
}

/// The value of `key` through `client` (linearizable unless `serializable`).
async fn get(
    client: &mut Client,
    key: &str,
    serializable: bool,
) -> std::result::Result<Option<String>, etcd_client::Error> {
    let opts = serializable.then(|| GetOptions::new().with_serializable());
    let resp = client.get(key, opts).await?;
    Ok(match resp.kvs() {
        [] => None,
        [kv, ..] => Some(kv.value_str()?.to_string()),
    })
}

/// Waits until member `i` serves `key` = `want` with a serializable read.
async fn wait_serves(c: &Cluster, i: usize, key: &str, want: &str) -> Result<()> {
    let endpoint = c.endpoint(i);
    wait_until(
        DEADLINE,
        &format!("n{} serving {key}={want}", i + 1),
        || {
            let endpoint = endpoint.clone();
            async move {
                let got = get(
                    &mut client_to(&endpoint, Duration::from_secs(2)).await?,
                    key,
                    true,
                )
                .await?;
                ensure!(got.as_deref() == Some(want), "got {got:?}");
                Ok(())
            }
        },
    )
    .await
}

/// Waits until member `i` has applied at least `index`.
async fn wait_applied(c: &Cluster, i: usize, index: u64) -> Result<()> {
    let endpoint = c.endpoint(i);
    wait_until(DEADLINE, &format!("n{} applying {index}", i + 1), || {
        let endpoint = endpoint.clone();
        async move {
            let s = status(&endpoint, Duration::from_secs(2)).await?;
            ensure!(s.applied >= index, "applied {} < {index}", s.applied);
            Ok(())
        }
    })
    .await
}

/// `key -> (value, create_revision, mod_revision, version)` of every key under
/// `prefix` as `client` serves it.
type Kvs = BTreeMap<String, (String, i64, i64, i64)>;

async fn range(client: &mut Client, prefix: &str, serializable: bool) -> Result<Kvs> {
    let mut opts = GetOptions::new().with_prefix();
    if serializable {
        opts = opts.with_serializable();
    }
    let resp = client.get(prefix, Some(opts)).await?;
    let mut out = Kvs::new();
    for kv in resp.kvs() {
        out.insert(
            kv.key_str()?.to_string(),
            (
                kv.value_str()?.to_string(),
                kv.create_revision(),
                kv.mod_revision(),
                kv.version(),
            ),
        );
    }
    Ok(out)
}

/// Runs `etcdctl` (off the runtime's threads) and returns its stdout, failing if it
/// fails.
async fn ctl(endpoints: &str, args: &[&str]) -> Result<String> {
    let endpoints = endpoints.to_string();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = etcdctl(&endpoints, &argv, None)?;
        ensure!(
            out.status.success(),
            "etcdctl {argv:?} at {endpoints}: {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    })
    .await?
}

/// `(member_id, leader, raft_index)` per endpoint from `etcdctl endpoint status -w json`.
async fn ctl_endpoint_status(endpoints: &str) -> Result<Vec<(String, u64, u64, u64)>> {
    let out = ctl(endpoints, &["endpoint", "status", "-w", "json"]).await?;
    let v: serde_json::Value = serde_json::from_str(&out).with_context(|| out.clone())?;
    let list = v.as_array().with_context(|| format!("not a list: {out}"))?;
    let num = |v: &serde_json::Value| v.as_u64().unwrap_or(0); // omitted when 0
    Ok(list
        .iter()
        .map(|e| {
            let s = &e["Status"];
            (
                e["Endpoint"].as_str().unwrap_or_default().to_string(),
                num(&s["header"]["member_id"]),
                num(&s["leader"]),
                num(&s["raftIndex"]),
            )
        })
        .collect())
}

// ---------------------------------------------------------------------------------
// 1. etcdctl against every member
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_members_serve_etcdctl() {
    let c = start(false, &[]).await;
    let all = c.endpoints().join(",");

    // A put through each member.
    for i in 0..3 {
        let out = ok(
            &c,
            "etcdctl put",
            ctl(&c.endpoint(i), &["put", &format!("k{i}"), &format!("v{i}")]).await,
        );
        assert_eq!(out.trim(), "OK", "put through n{}", i + 1);
    }
    // Every key from every member: linearizable, then serializable (after the
    // member has applied the write).
    for j in 0..3 {
        for i in 0..3 {
            let (key, want) = (format!("k{i}"), format!("v{i}"));
            let got = ok(
                &c,
                "etcdctl get",
                ctl(&c.endpoint(j), &["get", &key, "--print-value-only"]).await,
            );
            assert_eq!(got.trim(), want, "linearizable {key} through n{}", j + 1);
        }
    }
    for j in 0..3 {
        ok(
            &c,
            "replication of k2",
            wait_serves(&c, j, "k2", "v2").await,
        );
        for i in 0..3 {
            let (key, want) = (format!("k{i}"), format!("v{i}"));
            let got = ok(
                &c,
                "etcdctl get --consistency=s",
                ctl(
                    &c.endpoint(j),
                    &["get", &key, "--print-value-only", "--consistency=s"],
                )
                .await,
            );
            assert_eq!(got.trim(), want, "serializable {key} through n{}", j + 1);
        }
    }
    // The all-endpoints form works too.
    let got = ok(
        &c,
        "get over all endpoints",
        ctl(&all, &["get", "k1", "--print-value-only"]).await,
    );
    assert_eq!(got.trim(), "v1");

    // endpoint status: distinct members, one leader everyone agrees on, and (once
    // replication settles) the same raft index everywhere.
    let st = ok(&c, "endpoint status", ctl_endpoint_status(&all).await);
    assert_eq!(st.len(), 3, "{st:?}");
    let mut eps: Vec<&str> = st.iter().map(|s| s.0.as_str()).collect();
    eps.sort();
    let mut want_eps = c.endpoints();
    want_eps.sort();
    assert_eq!(eps, want_eps, "{st:?}");
    let ids: BTreeSet<u64> = st.iter().map(|s| s.1).collect();
    assert_eq!(ids.len(), 3, "member ids not distinct / missing: {st:?}");
    assert!(!ids.contains(&0), "{st:?}");
    let leader = st[0].2;
    assert!(
        st.iter().all(|s| s.2 == leader),
        "members disagree on the leader: {st:?}"
    );
    assert_eq!(
        st.iter().filter(|s| s.1 == s.2).count(),
        1,
        "exactly one member must report itself leader: {st:?}"
    );
    assert!(ids.contains(&leader), "{st:?}");
    let st = ok(
        &c,
        "equal raft indexes",
        async {
            let last = Mutex::new(Vec::new());
            let r = wait_until(DEADLINE, "equal raft_index on every member", || async {
                let st = ctl_endpoint_status(&all).await?;
                *last.lock().unwrap() = st.clone();
                let idx: BTreeSet<u64> = st.iter().map(|s| s.3).collect();
                ensure!(st.len() == 3 && idx.len() == 1, "{st:?}");
                Ok(())
            })
            .await;
            r.map(|()| last.into_inner().unwrap())
        }
        .await,
    );
    assert!(st[0].3 > 0, "{st:?}");

    // member list: the three members, with their names and client URLs.
    let out = ok(
        &c,
        "member list",
        ctl(&all, &["member", "list", "-w", "json"]).await,
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let members = v["members"].as_array().expect("members");
    assert_eq!(members.len(), 3, "{out}");
    let listed_ids: BTreeSet<u64> = members.iter().filter_map(|m| m["ID"].as_u64()).collect();
    assert_eq!(
        listed_ids, ids,
        "member list ids vs endpoint status ids: {out}"
    );
    let mut names: Vec<&str> = members
        .iter()
        .map(|m| m["name"].as_str().unwrap_or_default())
        .collect();
    names.sort();
    assert_eq!(names, ["n1", "n2", "n3"], "{out}");
    let table = ok(
        &c,
        "member list (table)",
        ctl(&all, &["member", "list"]).await,
    );
    assert_eq!(
        table.lines().filter(|l| !l.trim().is_empty()).count(),
        3,
        "{table}"
    );
    // Every member's client URLs, whichever member answers (as etcd publishes them).
    for j in 0..3 {
        let out = ok(
            &c,
            "member list",
            ctl(&c.endpoint(j), &["member", "list", "-w", "json"]).await,
        );
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let mut listed: Vec<(String, String)> = v["members"]
            .as_array()
            .expect("members")
            .iter()
            .map(|m| {
                (
                    m["name"].as_str().unwrap_or_default().to_string(),
                    m["clientURLs"][0].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        listed.sort();
        let want: Vec<(String, String)> = (0..3)
            .map(|i| (format!("n{}", i + 1), c.endpoint(i)))
            .collect();
        assert_eq!(listed, want, "member list through n{}: {out}", j + 1);
    }
}

// ---------------------------------------------------------------------------------
// 2. Leader SIGKILL under write load
// ---------------------------------------------------------------------------------

/// An acknowledged put: key, value, revision of the response.
type Acked = (String, String, i64);

/// Writes unique keys `load/w{w}/{seq}` round-robin through every member until
/// `stop`, recording each acknowledged put. A member that fails is skipped for a
/// while (and its client rebuilt), so the writer keeps going through the others.
async fn writer(
    w: usize,
    endpoints: Vec<String>,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Acked>>>,
    errors: Arc<Mutex<Vec<String>>>,
) {
    let n = endpoints.len();
    let mut clients: Vec<Option<Client>> = vec![None; n];
    let mut skip_until = vec![Instant::now(); n];
    let mut next = w;
    for seq in 0u64.. {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let now = Instant::now();
        let Some(m) = (0..n)
            .map(|k| (next + k) % n)
            .find(|&m| skip_until[m] <= now)
        else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        next = m + 1;
        if clients[m].is_none() {
            match client_to(&endpoints[m], Duration::from_secs(2)).await {
                Ok(cl) => clients[m] = Some(cl),
                Err(e) => {
                    errors
                        .lock()
                        .unwrap()
                        .push(format!("n{}: connect: {e}", m + 1));
                    skip_until[m] = now + Duration::from_millis(500);
                    continue;
                }
            }
        }
        let key = format!("load/w{w}/{seq:07}");
        let value = format!("v{w}-{seq}");
        let client = clients[m].as_mut().expect("connected");
        match client.put(key.as_str(), value.as_str(), None).await {
            Ok(r) => {
                let rev = r.header().map(|h| h.revision()).unwrap_or(-1);
                acked.lock().unwrap().push((key, value, rev));
            }
            Err(e) => {
                errors.lock().unwrap().push(format!("n{}: {e}", m + 1));
                clients[m] = None;
                skip_until[m] = Instant::now() + Duration::from_millis(500);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_kill_under_write_load() {
    let mut c = start(false, &[]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            tokio::spawn(writer(
                w,
                c.endpoints(),
                stop.clone(),
                acked.clone(),
                errors.clone(),
            ))
        })
        .collect();
    let n_acked = || acked.lock().unwrap().len();

    // Load first, then kill the leader.
    ok(
        &c,
        "writes before the kill",
        wait_until(DEADLINE, "100 acknowledged writes", || async {
            ensure!(n_acked() >= 100, "{} acknowledged", n_acked());
            Ok(())
        })
        .await,
    );
    let old = ok(&c, "leader", c.leader().await);
    let old_id = ok(
        &c,
        "leader status",
        status(&c.endpoint(old), Duration::from_secs(2)).await,
    )
    .id;
    let survivors: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let at_kill = n_acked();
    c.kill9(old);
    let killed = Instant::now();
    eprintln!(
        "killed leader n{} ({old_id:x}) after {at_kill} acknowledged writes",
        old + 1
    );

    let (new, new_id, took) = ok(
        &c,
        "new leader after the kill",
        wait_new_leader(
            &c,
            &survivors,
            old_id,
            false,
            killed,
            Duration::from_secs(10),
        )
        .await,
    );
    eprintln!(
        "new leader n{} ({new_id:x}) seen {took:?} after the kill",
        new + 1
    );
    if took >= Duration::from_secs(3) {
        fail(
            &c,
            &format!("new leader took {took:?} (>= 3 s) to appear after the leader's kill"),
        );
    }
    let at_elected = n_acked();

    // Writes go on through the new leader (fault duration: a few seconds).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let at_restart = n_acked();
    if at_restart < at_elected + 20 {
        fail(
            &c,
            &format!(
                "only {} writes acknowledged in 3 s after failover; errors: {:?}",
                at_restart - at_elected,
                errors
                    .lock()
                    .unwrap()
                    .iter()
                    .rev()
                    .take(10)
                    .collect::<Vec<_>>()
            ),
        );
    }
    let restarted = c.restart(old).await;
    ok(&c, "restarting the old leader", restarted);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let acked: Vec<Acked> = std::mem::take(&mut *acked.lock().unwrap());
    let errors = errors.lock().unwrap().clone();
    eprintln!(
        "{} acknowledged ({at_kill} before the kill, {} between kill and election, {} after), {} errors",
        acked.len(),
        at_elected - at_kill,
        acked.len() - at_elected,
        errors.len()
    );
    eprintln!("first errors: {:?}", &errors[..errors.len().min(5)]);
    assert!(acked.iter().all(|a| a.2 > 0), "a put without a revision");

    // The old leader catches up: it applies what the others had committed, and
    // serves the last acknowledged write.
    let mut target = 0;
    for &i in &survivors {
        let s = retry_transient(RETRY_DEADLINE, &format!("status of n{}", i + 1), || {
            status_of(&c, i)
        })
        .await;
        target = target.max(ok(&c, &format!("status of n{}", i + 1), s).commit);
    }
    let last = acked.iter().max_by_key(|a| a.2).unwrap().clone();
    ok(
        &c,
        "old leader catching up",
        wait_applied(&c, old, target).await,
    );
    ok(
        &c,
        "old leader serving the last write",
        wait_serves(&c, old, &last.0, &last.1).await,
    );

    // A marker write: once every member serves it, each has every write before it.
    let marker = retry_transient(RETRY_DEADLINE, "marker put", || async {
        Ok(c.client(new).await?.put("load-marker", "m", None).await?)
    })
    .await;
    let marker_rev = ok(&c, "marker put", marker).header().unwrap().revision();
    for i in 0..3 {
        ok(
            &c,
            "marker replicated",
            wait_serves(&c, i, "load-marker", "m").await,
        );
    }

    // Every acknowledged write, with its acknowledged revision, on every member; and
    // the members agree on everything below the marker.
    let mut views = Vec::new();
    for i in 0..3 {
        let kvs = retry_transient(RETRY_DEADLINE, "prefix read", || async {
            range(&mut c.client(i).await?, "load/", true).await
        })
        .await;
        let kvs = ok(&c, "prefix read", kvs);
        let mut bad = Vec::new();
        for (k, v, rev) in &acked {
            match kvs.get(k) {
                Some((got_v, _, got_rev, _)) if got_v == v && got_rev == rev => {}
                other => bad.push(format!("{k}={v}@{rev}: {other:?}")),
            }
        }
        if !bad.is_empty() {
            fail(
                &c,
                &format!(
                    "n{}: {} of {} acknowledged writes missing or wrong (old leader n{}): {:?}",
                    i + 1,
                    bad.len(),
                    acked.len(),
                    old + 1,
                    &bad[..bad.len().min(10)]
                ),
            );
        }
        let below: Kvs = kvs.into_iter().filter(|(_, v)| v.2 < marker_rev).collect();
        views.push(below);
    }
    for i in 1..3 {
        if views[i] != views[0] {
            let diff: Vec<_> = views[0]
                .iter()
                .filter(|(k, v)| views[i].get(*k) != Some(v))
                .chain(views[i].iter().filter(|(k, v)| views[0].get(*k) != Some(v)))
                .take(10)
                .collect();
            fail(
                &c,
                &format!("n1 and n{} differ below the marker: {diff:?}", i + 1),
            );
        }
    }
}

// ---------------------------------------------------------------------------------
// 3. Follower catch-up through a snapshot
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn follower_catches_up_through_snapshot() {
    const KEYS: usize = 600;
    let mut c = start(
        false,
        &[
            "--snapshot-count",
            "50",
            "--experimental-snapshot-catchup-entries",
            "10",
        ],
    )
    .await;
    let leader = ok(&c, "leader", c.leader().await);
    let follower = (leader + 1) % 3;
    c.kill9(follower);

    // Far more entries than the leader keeps behind its snapshots.
    let mut tasks = Vec::new();
    for t in 0..4 {
        let mut cl = ok(&c, "client", c.client(leader).await);
        tasks.push(tokio::spawn(async move {
            for i in (t..KEYS).step_by(4) {
                cl.put(format!("snap/{i:04}"), format!("val-{i}"), None)
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        ok(&c, "writes with a follower down", t.await.unwrap());
    }
    let mut lc = ok(&c, "client", c.client(leader).await);
    ok(
        &c,
        "last put",
        lc.put("snap-done", "yes", None).await.map_err(Into::into),
    );
    let target = ok(
        &c,
        "leader status",
        status(&c.endpoint(leader), Duration::from_secs(2)).await,
    )
    .commit;

    let restarted = c.restart(follower).await;
    ok(&c, "restarting the follower", restarted);
    ok(
        &c,
        "follower serving the last key",
        wait_serves(&c, follower, "snap-done", "yes").await,
    );
    ok(
        &c,
        "follower applying",
        wait_applied(&c, follower, target).await,
    );

    // It caught up through a snapshot from the leader (this start's log).
    let log = c.member_log(follower);
    let this_start = log.rsplit("===== ").next().unwrap_or_default();
    let snap_lines: Vec<&str> = this_start
        .lines()
        .filter(|l| l.contains("snapshot"))
        .collect();
    eprintln!("follower n{} snapshot lines: {snap_lines:#?}", follower + 1);
    if !snap_lines
        .iter()
        .any(|l| l.to_lowercase().contains("install"))
    {
        fail(
            &c,
            &format!(
                "follower n{} caught up without installing a snapshot from the leader; \
                 its snapshot lines: {snap_lines:?}",
                follower + 1
            ),
        );
    }

    // And its data is complete and identical to the leader's.
    let count = retry_transient(RETRY_DEADLINE, "count", || async {
        let opts = GetOptions::new()
            .with_prefix()
            .with_count_only()
            .with_serializable();
        Ok(c.client(follower).await?.get("snap/", Some(opts)).await?)
    })
    .await;
    let count = ok(&c, "count", count).count();
    assert_eq!(count, KEYS as i64, "keys on the caught-up follower");
    let on_follower = retry_transient(RETRY_DEADLINE, "follower range", || async {
        range(&mut c.client(follower).await?, "snap/", true).await
    })
    .await;
    let on_follower = ok(&c, "follower range", on_follower);
    let on_leader = retry_transient(RETRY_DEADLINE, "leader range", || {
        let mut lc = lc.clone();
        async move { range(&mut lc, "snap/", false).await }
    })
    .await;
    let on_leader = ok(&c, "leader range", on_leader);
    assert_eq!(on_leader.len(), KEYS);
    for i in 0..KEYS {
        let k = format!("snap/{i:04}");
        assert_eq!(on_leader[&k].0, format!("val-{i}"), "{k} on the leader");
    }
    if on_follower != on_leader {
        let diff: Vec<_> = on_leader
            .iter()
            .filter(|(k, v)| on_follower.get(*k) != Some(v))
            .take(10)
            .collect();
        fail(&c, &format!("follower differs from the leader: {diff:?}"));
    }
}

// ---------------------------------------------------------------------------------
// 4. A paused leader serves no stale linearizable read
// ---------------------------------------------------------------------------------

/// Checks a linearizable read of `x` through the resumed old leader: `new`, or an
/// `Unavailable` error; never `old`.
fn check_resumed_read(
    c: &Cluster,
    what: &str,
    r: std::result::Result<Option<String>, etcd_client::Error>,
) {
    match r {
        Ok(Some(v)) if v == "new" => eprintln!("{what}: new"),
        Err(e) if is_unavailable(&e) => eprintln!("{what}: {e}"),
        Ok(Some(v)) if v == "old" => fail(c, &format!("{what}: STALE linearizable read: x = old")),
        other => fail(c, &format!("{what}: unexpected answer {other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paused_leader_steps_down_and_serves_no_stale_read() {
    const PAUSE: Duration = Duration::from_secs(5);
    let c = start(false, &[]).await;
    let l = ok(&c, "leader", c.leader().await);
    let before = ok(
        &c,
        "leader status",
        status(&c.endpoint(l), Duration::from_secs(2)).await,
    );
    let l_id = before.id;
    let others: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    let mut lc = ok(
        &c,
        "client",
        client_to(&c.endpoint(l), Duration::from_secs(10)).await,
    );
    let old_rev = ok(
        &c,
        "put x=old",
        lc.put("x", "old", None).await.map_err(Into::into),
    )
    .header()
    .unwrap()
    .revision();
    for i in 0..3 {
        ok(&c, "x=old replicated", wait_serves(&c, i, "x", "old").await);
    }
    // The connection to L is open before it stops.
    assert_eq!(
        get(&mut lc, "x", false).await.unwrap().as_deref(),
        Some("old")
    );

    ok(&c, "SIGSTOP", c.pause(l));
    let paused = Instant::now();
    let (new, new_id, took) = ok(
        &c,
        "new leader while the old one is paused",
        wait_new_leader(
            &c,
            &others,
            l_id,
            true,
            paused,
            PAUSE - Duration::from_millis(500),
        )
        .await,
    );
    eprintln!(
        "n{} ({new_id:x}) leads {took:?} after pausing n{}",
        new + 1,
        l + 1
    );
    let follower = others.iter().copied().find(|&i| i != new).unwrap();
    let mut fc = ok(
        &c,
        "client",
        client_to(&c.endpoint(follower), Duration::from_secs(10)).await,
    );
    let put = fc.put("x", "new", None).await;
    let new_rev = match put {
        Ok(r) => r.header().unwrap().revision(),
        Err(e) => fail(
            &c,
            &format!("put x=new through n{} while L paused: {e}", follower + 1),
        ),
    };
    assert!(new_rev > old_rev);
    if paused.elapsed() >= PAUSE {
        fail(
            &c,
            &format!("x=new only written {:?} into the pause", paused.elapsed()),
        );
    }
    // The rest of the fault's duration.
    tokio::time::sleep(PAUSE.saturating_sub(paused.elapsed())).await;

    // One read queued while L is still stopped, one right after SIGCONT.
    let mut queued_client = lc.clone();
    let queued = tokio::spawn(async move { get(&mut queued_client, "x", false).await });
    tokio::time::sleep(Duration::from_millis(50)).await; // let it reach the socket
    ok(&c, "SIGCONT", c.resume(l));
    let immediate = get(&mut lc, "x", false).await;
    check_resumed_read(&c, "read right after SIGCONT", immediate);
    check_resumed_read(&c, "read queued while stopped", queued.await.unwrap());

    // L follows the new leader, and then serves the new value linearizably.
    let endpoint = c.endpoint(l);
    ok(
        &c,
        "old leader following",
        wait_until(DEADLINE, "old leader reporting another leader", || async {
            let s = status(&endpoint, Duration::from_secs(2)).await?;
            ensure!(s.leader != 0 && s.leader != l_id, "{s:?}");
            ensure!(
                s.term > before.term,
                "term {} not past {}",
                s.term,
                before.term
            );
            let cur = statuses(&c, &others, Duration::from_secs(2)).await;
            ensure!(
                cur.iter()
                    .all(|(_, r)| r.as_ref().is_ok_and(|o| o.leader == s.leader)),
                "L says {:x}, others: {cur:?}",
                s.leader
            );
            Ok(())
        })
        .await,
    );
    ok(
        &c,
        "linearizable x through L",
        wait_until(DEADLINE, "x=new through L", || async {
            let got = get(
                &mut client_to(&endpoint, Duration::from_secs(10)).await?,
                "x",
                false,
            )
            .await?;
            ensure!(got.as_deref() == Some("new"), "got {got:?}");
            Ok(())
        })
        .await,
    );
}

// ---------------------------------------------------------------------------------
// 5. A partitioned member refuses, the majority serves
// ---------------------------------------------------------------------------------

/// How long after the partition the partitioned member must have refused.
const REFUSE_WITHIN: Duration = Duration::from_secs(10);

/// Partitions the leader (`leader`) or a follower: the majority keeps serving, the
/// partitioned member refuses linearizable requests with `Unavailable` but still
/// serves serializable reads; after healing it catches up.
async fn partition_scenario(partition_leader: bool) {
    let c = start(true, &[]).await;
    let leader = ok(&c, "leader", c.leader().await);
    let p = if partition_leader {
        leader
    } else {
        (leader + 1) % 3
    };
    let others: Vec<usize> = (0..3).filter(|&i| i != p).collect();
    let p_id = ok(
        &c,
        "status",
        status(&c.endpoint(p), Duration::from_secs(2)).await,
    )
    .id;
    let mut lc = ok(&c, "client", c.client(leader).await);
    ok(
        &c,
        "put before",
        lc.put("before", "1", None).await.map_err(Into::into),
    );
    for i in 0..3 {
        ok(
            &c,
            "before replicated",
            wait_serves(&c, i, "before", "1").await,
        );
    }
    let mut pc = ok(
        &c,
        "client",
        client_to(&c.endpoint(p), Duration::from_secs(10)).await,
    );
    eprintln!(
        "partitioning n{} ({}; leader n{})",
        p + 1,
        if partition_leader {
            "the leader"
        } else {
            "a follower"
        },
        leader + 1
    );
    ok(&c, "partition", c.partition(p));
    let cut = Instant::now();

    // The partitioned member: linearizable reads and writes fail with Unavailable.
    let minority = async {
        let mut served = Vec::new();
        let get_err = loop {
            let asked = cut.elapsed();
            match get(&mut pc, "before", false).await {
                Err(e) if is_unavailable(&e) => break e,
                r => served.push(format!("{asked:?}..{:?}: {r:?}", cut.elapsed())),
            }
            if cut.elapsed() >= REFUSE_WITHIN {
                bail!("linearizable gets through the partitioned member never refused: {served:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let get_at = cut.elapsed();
        let put_start = Instant::now();
        let put = pc.put("minority-put", "no", None).await;
        let put_took = put_start.elapsed();
        match &put {
            Ok(r) => bail!(
                "a put through the partitioned member was ACKNOWLEDGED (revision {:?})",
                r.header().map(|h| h.revision())
            ),
            Err(e) if is_unavailable(e) => {}
            Err(e) => {
                bail!("put through the partitioned member failed with {e} (after {put_took:?})")
            }
        }
        ensure!(
            put_took < REFUSE_WITHIN,
            "the put through the partitioned member took {put_took:?} to fail"
        );
        anyhow::Ok(format!(
            "get refused after {get_at:?} ({get_err}); earlier answers {served:?}; put refused after {put_took:?} ({})",
            put.err().unwrap()
        ))
    };

    // The majority: (a new leader, then) writes and reads go through.
    let majority = async {
        if partition_leader {
            let (n, id, took) =
                wait_new_leader(&c, &others, p_id, true, cut, Duration::from_secs(10)).await?;
            eprintln!(
                "majority elected n{} ({id:x}) {took:?} after the partition",
                n + 1
            );
        }
        for &s in &others {
            let mut sc = client_to(&c.endpoint(s), Duration::from_secs(10)).await?;
            sc.put(format!("during/n{}", s + 1), "maj", None)
                .await
                .with_context(|| format!("put through majority member n{}", s + 1))?;
        }
        for &s in &others {
            let mut sc = client_to(&c.endpoint(s), Duration::from_secs(10)).await?;
            for &t in &others {
                let got = get(&mut sc, &format!("during/n{}", t + 1), false)
                    .await
                    .with_context(|| format!("linearizable get through n{}", s + 1))?;
                ensure!(
                    got.as_deref() == Some("maj"),
                    "n{}: during/n{} = {got:?}",
                    s + 1,
                    t + 1
                );
            }
        }
        anyhow::Ok(())
    };

    let (min, maj) = tokio::join!(minority, majority);
    let min = ok(&c, "partitioned member", min);
    eprintln!("partitioned n{}: {min}", p + 1);
    ok(&c, "majority while partitioned", maj);

    // Serializable reads still answer on the partitioned member (stale allowed:
    // it has what was replicated before the cut, and nothing written after it).
    let stale = get(&mut pc, "before", true).await;
    assert_eq!(
        stale.unwrap().as_deref(),
        Some("1"),
        "serializable read through P"
    );
    let during_key = format!("during/n{}", others[0] + 1);
    let stale = get(&mut pc, &during_key, true).await.unwrap();
    assert_eq!(stale, None, "P got a write made during its partition");

    c.heal();
    let endpoint = c.endpoint(p);
    ok(
        &c,
        "partitioned member after healing",
        wait_until(
            DEADLINE,
            "P serving the majority's write linearizably",
            || async {
                let got = get(
                    &mut client_to(&endpoint, Duration::from_secs(10)).await?,
                    &during_key,
                    false,
                )
                .await?;
                ensure!(got.as_deref() == Some("maj"), "got {got:?}");
                Ok(())
            },
        )
        .await,
    );
    let l = ok(&c, "leader after healing", c.leader().await);
    eprintln!("after healing the leader is n{}", l + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitioned_member_refuses_while_majority_serves_follower() {
    partition_scenario(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partitioned_member_refuses_while_majority_serves_leader() {
    partition_scenario(true).await;
}

// ---------------------------------------------------------------------------------
// 5. Watches that require a leader (clientv3 `WithRequireLeader`)
// ---------------------------------------------------------------------------------

/// A watch opened with etcd's `hasleader` metadata on a member that is then cut off
/// ends with `Unavailable: etcdserver: no leader` once the member has lost its leader,
/// and a new one is refused; a plain watch on the same member stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn require_leader_watch_ends_on_a_partitioned_member() {
    let c = start(true, &[]).await;
    let leader = ok(&c, "leader", c.leader().await);
    let p = (leader + 1) % 3;
    let ep = c.endpoint(p);
    let rl_opts = || {
        ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(1))
            .with_require_leader(true)
    };
    let mut rl_client = ok(
        &c,
        "client",
        Client::connect([ep.as_str()], Some(rl_opts()))
            .await
            .map_err(Into::into),
    );
    let mut plain_client = ok(&c, "client", client_to(&ep, Duration::from_secs(10)).await);
    let mut rl = ok(
        &c,
        "require-leader watch",
        rl_client.watch("rl", None).await.map_err(Into::into),
    );
    let mut plain = ok(
        &c,
        "plain watch",
        plain_client.watch("rl", None).await.map_err(Into::into),
    );
    let mut lc = ok(&c, "client", c.client(leader).await);
    ok(&c, "put", lc.put("rl", "1", None).await.map_err(Into::into));
    // Both streams are live: each gets the created response and the event.
    for (name, s) in [("require-leader", &mut rl), ("plain", &mut plain)] {
        let mut events = 0;
        while events == 0 {
            let m = tokio::time::timeout(Duration::from_secs(10), s.message()).await;
            match m {
                Ok(Ok(Some(r))) => events += r.events().len(),
                other => fail(&c, &format!("{name} watch before the cut: {other:?}")),
            }
        }
    }

    ok(&c, "partition", c.partition(p));
    let cut = Instant::now();
    // Election timeout 1 s: the member loses its leader within ~2 s and the stream
    // ends after three more leaderless checks.
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match rl.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await;
    match ended {
        Ok(Err(e)) if is_unavailable(&e) && e.to_string().contains("no leader") => {
            eprintln!("require-leader watch ended after {:?}: {e}", cut.elapsed())
        }
        other => fail(
            &c,
            &format!("require-leader watch did not end with no leader: {other:?}"),
        ),
    }
    // A new one is refused (at once, or as its first answer).
    let refused = match rl_client.watch("rl", None).await {
        Err(e) => is_unavailable(&e),
        Ok(mut s) => matches!(
            tokio::time::timeout(Duration::from_secs(5), s.message()).await,
            Ok(Err(ref e)) if is_unavailable(e)
        ),
    };
    if !refused {
        fail(
            &c,
            "a new require-leader watch on the leaderless member was not refused",
        );
    }
    // The plain watch is still open: nothing arrives, and no error either.
    match tokio::time::timeout(Duration::from_secs(2), plain.message()).await {
        Err(_) => {}
        Ok(other) => fail(&c, &format!("the plain watch ended or answered: {other:?}")),
    }
    c.heal();
}
