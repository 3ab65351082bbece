//! The Maintenance service and the snapshot tools, through real clients: the
//! `etcd-client` crate, `etcdctl` (against Concord and, where the outcome is the
//! server's, against the real etcd for comparison) and `concordctl`.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use concord_integration::cluster::{Cluster, ClusterOptions, Kind};
use concord_integration::{Concord, Etcd, concordctl, etcdctl, wait_until};
use etcd_client::{AlarmAction, AlarmOptions, AlarmType, GetOptions, Txn, TxnOp};
use tonic::Code;

fn status_of(e: etcd_client::Error) -> (Code, String) {
    match e {
        etcd_client::Error::GRpcStatus(s) => (s.code(), s.message().to_string()),
        other => panic!("not a gRPC status: {other:?}"),
    }
}

fn run_ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn alarm(
    c: &mut etcd_client::Client,
    action: AlarmAction,
    kind: AlarmType,
    member: u64,
) -> Vec<(u64, i32)> {
    let mut o = AlarmOptions::new();
    o.with_member(member);
    c.alarm(action, kind, Some(o))
        .await
        .unwrap()
        .alarms()
        .iter()
        .map(|a| (a.member_id(), a.alarm() as i32))
        .collect()
}

#[tokio::test]
async fn hash_status_defrag_alarms_and_their_errors() {
    let mut s = Concord::start().await.unwrap();
    let mut c = s.client().await.unwrap();
    for i in 0..20 {
        c.put(format!("k{}", i % 5), format!("v{i}"), None)
            .await
            .unwrap();
    }
    let me = c.status().await.unwrap().header().unwrap().member_id();

    // HashKV: at the current revision by default, etcd's -1 before any compaction,
    // stable for a past revision while writes go on.
    let h = c.hash_kv(0).await.unwrap();
    assert_eq!(h.header().unwrap().revision(), 21);
    assert_eq!(h.compact_version(), -1);
    assert_eq!(h.hash_revision(), 21);
    let at15 = c.hash_kv(15).await.unwrap().hash();
    c.put("later", "x", None).await.unwrap();
    assert_eq!(c.hash_kv(15).await.unwrap().hash(), at15);
    assert_eq!(c.hash_kv(21).await.unwrap().hash(), h.hash());
    assert_ne!(c.hash_kv(0).await.unwrap().hash(), h.hash());
    assert_eq!(
        status_of(c.hash_kv(100).await.unwrap_err()),
        (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision is a future revision".into()
        )
    );
    c.compact(10, None).await.unwrap();
    let h = c.hash_kv(0).await.unwrap();
    assert_eq!(h.compact_version(), 10);
    for rev in [5, 10] {
        assert_eq!(
            status_of(c.hash_kv(rev).await.unwrap_err()),
            (
                Code::OutOfRange,
                "etcdserver: mvcc: required revision has been compacted".into()
            )
        );
    }
    c.hash_kv(11).await.unwrap();

    let hash = c.hash().await.unwrap();
    assert_eq!(hash.header().unwrap().revision(), 22);

    // Status, every field.
    let st = c.status().await.unwrap();
    assert_eq!(st.leader(), me);
    assert_eq!(st.raft_term(), 2);
    assert!(st.raft_index() >= st.raft_applied_index() && st.raft_applied_index() > 20);
    assert!(st.db_size() > 0 && st.raft_used_db_size() <= st.db_size());
    assert!(st.errors().is_empty(), "{:?}", st.errors());
    assert!(!st.is_learner());
    assert_eq!(st.db_size_quota(), 2 << 30, "etcd's default quota");
    assert_eq!(st.header().unwrap().revision(), 22);

    c.defragment().await.unwrap();
    assert_eq!(c.get("k0", None).await.unwrap().kvs()[0].value(), b"v15");

    // MoveLeader: a single member may "move" to itself; nobody else is a member.
    c.move_leader(me).await.unwrap();
    assert_eq!(
        status_of(c.move_leader(me ^ 1).await.unwrap_err()),
        (
            Code::FailedPrecondition,
            "etcdserver: bad leader transferee".into()
        )
    );

    // CORRUPT refuses every write, reads go on; it is replicated state, so it
    // survives a restart until disarmed.
    assert_eq!(
        alarm(&mut c, AlarmAction::Activate, AlarmType::Corrupt, me).await,
        vec![(me, 2)]
    );
    let corrupt = (Code::DataLoss, "etcdserver: corrupt cluster".to_string());
    assert_eq!(status_of(c.put("x", "y", None).await.unwrap_err()), corrupt);
    assert_eq!(status_of(c.delete("k1", None).await.unwrap_err()), corrupt);
    assert_eq!(c.get("k1", None).await.unwrap().kvs().len(), 1);
    let st = c.status().await.unwrap();
    assert_eq!(st.errors(), [format!("memberID:{me} alarm:CORRUPT ")]);
    s.restart().await.unwrap();
    let mut c = s.client().await.unwrap();
    assert_eq!(
        alarm(&mut c, AlarmAction::Get, AlarmType::None, 0).await,
        vec![(me, 2)]
    );
    assert_eq!(status_of(c.put("x", "y", None).await.unwrap_err()), corrupt);
    // Disarming an alarm that is not active answers nothing.
    assert!(
        alarm(&mut c, AlarmAction::Deactivate, AlarmType::Nospace, me)
            .await
            .is_empty()
    );
    assert_eq!(
        alarm(&mut c, AlarmAction::Deactivate, AlarmType::Corrupt, me).await,
        vec![(me, 2)]
    );
    c.put("x", "y", None).await.unwrap();
    assert!(c.status().await.unwrap().errors().is_empty());
}

#[tokio::test]
async fn nospace_with_a_small_quota_then_free_space_and_disarm() {
    let s = Concord::start_with(&["--quota-backend-bytes", "3000000"])
        .await
        .unwrap();
    let mut c = s.client().await.unwrap();
    let me = c.status().await.unwrap().header().unwrap().member_id();
    c.put("keep", "1", None).await.unwrap();
    let lease = c.lease_grant(600, None).await.unwrap().id();
    let value = pseudo_random_text(100_000, 7);
    let nospace = (
        Code::ResourceExhausted,
        "etcdserver: mvcc: database space exceeded".to_string(),
    );
    let mut written = 0;
    let first = loop {
        match c.put(format!("big{written}"), value.clone(), None).await {
            Ok(_) => written += 1,
            Err(e) => break status_of(e),
        }
        assert!(written < 200, "the quota never applied");
    };
    assert_eq!(first, nospace);
    assert!(written >= 10, "only {written} puts fit in 3 MB");
    assert_eq!(
        alarm(&mut c, AlarmAction::Get, AlarmType::Nospace, 0).await,
        vec![(me, 1)]
    );
    // Writes that add data fail (even small ones: the alarm is up); reads, deletes,
    // delete-only txns, revocations and compaction work.
    assert_eq!(
        status_of(c.put("small", "1", None).await.unwrap_err()),
        nospace
    );
    let txn_put = Txn::new().and_then([TxnOp::put("t", "1", None)]);
    assert_eq!(status_of(c.txn(txn_put).await.unwrap_err()), nospace);
    assert_eq!(
        status_of(c.lease_grant(10, None).await.unwrap_err()),
        nospace
    );
    assert_eq!(c.get("keep", None).await.unwrap().kvs().len(), 1);
    c.txn(Txn::new().and_then([TxnOp::delete("big0", None)]))
        .await
        .unwrap();
    c.lease_revoke(lease).await.unwrap();
    let st = c.status().await.unwrap();
    assert_eq!(st.errors(), [format!("memberID:{me} alarm:NOSPACE ")]);
    // HTTP /health says unhealthy while an alarm is active, as etcd's.
    let (code, body) = concord_integration::http_get(s.client_port, "/health");
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains(r#""health":"false""#) && body.contains("NOSPACE"),
        "{body}"
    );

    // Disarmed while still over the quota: the next big write raises it again.
    assert_eq!(
        alarm(&mut c, AlarmAction::Deactivate, AlarmType::Nospace, me).await,
        vec![(me, 1)]
    );
    assert_eq!(
        status_of(c.put("again", value.clone(), None).await.unwrap_err()),
        nospace
    );
    assert_eq!(
        alarm(&mut c, AlarmAction::Get, AlarmType::None, 0).await,
        vec![(me, 1)]
    );

    // Free the space: delete, compact, defragment; then disarm and write.
    c.delete("big", Some(etcd_client::DeleteOptions::new().with_prefix()))
        .await
        .unwrap();
    compact_to_now(&mut c).await;
    c.defragment().await.unwrap();
    let size = c.status().await.unwrap().db_size();
    assert!(size < 1_000_000, "{size} bytes after defragmenting");
    assert_eq!(
        status_of(c.put("small", "1", None).await.unwrap_err()),
        nospace
    );
    alarm(&mut c, AlarmAction::Deactivate, AlarmType::Nospace, me).await;
    c.put("small", "1", None).await.unwrap();
    c.put("bigger", value, None).await.unwrap();
    assert!(c.status().await.unwrap().errors().is_empty());
    let (code, body) = concord_integration::http_get(s.client_port, "/health");
    assert_eq!(code, 200, "{body}");
}

/// Printable bytes that neither RocksDB's LZ4 nor etcd can shrink much.
fn pseudo_random_text(n: usize, seed: u64) -> String {
    let mut rng = concord_integration::Rng::new(seed);
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    (0..n)
        .map(|_| ALPHABET[rng.below(64) as usize] as char)
        .collect()
}

/// Runs etcdctl and keeps what a user reads: stdout and the `Error:` lines, with this
/// server's member id and endpoint replaced, so two servers' outputs compare.
fn ctl(endpoint: &str, id: u64, args: &[&str], stdin: Option<&str>) -> String {
    let out = etcdctl(endpoint, args, stdin).unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    for line in String::from_utf8_lossy(&out.stderr).lines() {
        if line.starts_with("Error:") {
            text.push_str(line);
            text.push('\n');
        }
    }
    text.replace(&id.to_string(), "<ID>")
        .replace(&format!("{id:x}"), "<ID>")
        .replace(endpoint, "<EP>")
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// etcdctl's JSON output, as it is.
fn ctl_json(endpoint: &str, args: &[&str]) -> serde_json::Value {
    json(&String::from_utf8_lossy(
        &etcdctl(endpoint, args, None).unwrap().stdout,
    ))
}

/// The etcdctl session of an operator who runs out of space and recovers, as seen by
/// that operator: `(step, output)`.
fn quota_session(ep: &str) -> Vec<(String, String)> {
    let status = ctl_json(ep, &["endpoint", "status", "-w", "json"]);
    let id = status[0]["Status"]["header"]["member_id"].as_u64().unwrap();
    let mut log: Vec<(String, String)> = Vec::new();
    let mut step = |name: &str, args: &[&str], stdin: Option<&str>| {
        let out = ctl(ep, id, args, stdin);
        log.push((name.to_string(), out.clone()));
        out
    };
    step("put", &["put", "a", "1"], None);
    let hashkv = ctl_json(ep, &["endpoint", "hashkv", "-w", "json"]);
    let h = &hashkv[0]["HashKV"];
    let hashkv_fields = format!(
        "rev {} compact {}",
        h["header"]["revision"], h["compact_revision"]
    );
    let big = pseudo_random_text(100_000, 11);
    let mut first_error = String::new();
    for i in 0..200 {
        let out = ctl(ep, id, &["put", &format!("big{i}")], Some(&big));
        if out != "OK\n" {
            first_error = out;
            break;
        }
    }
    step("alarm list", &["alarm", "list"], None);
    let st = ctl_json(ep, &["endpoint", "status", "-w", "json"]);
    let errors = st[0]["Status"]["errors"]
        .to_string()
        .replace(&id.to_string(), "<ID>");
    step("get", &["get", "a", "--print-value-only"], None);
    step("put small", &["put", "x", "y"], None);
    step("txn put", &["txn"], Some("\nput t 1\n\n\n"));
    step("lease grant", &["lease", "grant", "10"], None);
    step("del", &["del", "big1"], None);
    step("disarm", &["alarm", "disarm"], None);
    step("alarm list after disarm", &["alarm", "list"], None);
    step("big put re-raises", &["put", "again"], Some(&big));
    step("alarm list again", &["alarm", "list"], None);
    ctl(ep, id, &["del", "big", "--prefix"], None);
    let rev = ctl_json(ep, &["get", "a", "-w", "json"])["header"]["revision"]
        .as_i64()
        .unwrap();
    ctl(ep, id, &["compact", &rev.to_string(), "--physical"], None);
    step("defrag", &["defrag"], None);
    step("disarm after defrag", &["alarm", "disarm"], None);
    step("put after disarm", &["put", "x", "y"], None);
    step("alarm list at the end", &["alarm", "list"], None);
    log.push(("hashkv fields".into(), hashkv_fields));
    log.push(("first failing put".into(), first_error));
    log.push(("status errors while NOSPACE".into(), errors));
    log
}

#[tokio::test]
async fn etcdctl_alarm_quota_defrag_and_hashkv_as_etcd() {
    let flags = ["--quota-backend-bytes", "4000000"];
    let etcd = Etcd::start_with(&flags).await.unwrap();
    let concord = Concord::start_with(&flags).await.unwrap();
    let want = quota_session(&etcd.endpoint());
    let got = quota_session(&concord.endpoint());
    for ((step, e), (_, c)) in want.iter().zip(&got) {
        eprintln!("{step}: etcd {e:?} concord {c:?}");
    }
    assert_eq!(got, want);
    // The session did hit the quota.
    assert!(
        want.iter()
            .any(|(s, o)| s == "alarm list" && o == "memberID:<ID> alarm:NOSPACE \n"),
        "{want:?}"
    );
}

#[tokio::test]
async fn a_cluster_agrees_on_hashkv_alarms_and_moves_its_leader() {
    let cluster = Cluster::start(Kind::Concord, ClusterOptions::default())
        .await
        .unwrap();
    let leader = cluster.leader().await.unwrap();
    let mut c = cluster.client(leader).await.unwrap();
    for i in 0..60 {
        c.put(format!("k{}", i % 9), format!("v{i}"), None)
            .await
            .unwrap();
    }
    c.delete("k3", None).await.unwrap();
    c.compact(30, None).await.unwrap();
    let rev = c
        .put("last", "1", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();

    // Every member gives the same HashKV for the same revision, once it has it.
    let mut hashes = Vec::new();
    for i in 0..3 {
        let mut m = cluster.client(i).await.unwrap();
        hashes.push(hash_kv_once_applied(&mut m, rev).await);
    }
    assert!(hashes.iter().all(|h| *h == hashes[0]), "{hashes:?}");
    assert_eq!(hashes[0].1, 30);

    // etcdctl's cluster-wide views.
    let ep = cluster.endpoint(0);
    let out = run_ok(etcdctl(&ep, &["endpoint", "hashkv", "--cluster"], None).unwrap());
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    let hash_of = |l: &str| l.rsplit(", ").next().unwrap().to_string();
    assert!(
        lines.iter().all(|l| hash_of(l) == hash_of(lines[0])),
        "{out}"
    );
    let out = run_ok(
        etcdctl(
            &ep,
            &["endpoint", "status", "--cluster", "-w", "json"],
            None,
        )
        .unwrap(),
    );
    let st = json(&out);
    let leaders: Vec<u64> = (0..3)
        .map(|i| st[i]["Status"]["leader"].as_u64().unwrap())
        .collect();
    assert!(leaders.iter().all(|l| *l == leaders[0]), "{out}");
    let out = run_ok(etcdctl(&ep, &["defrag", "--cluster"], None).unwrap());
    assert_eq!(
        out.matches("Finished defragmenting etcd member").count(),
        3,
        "{out}"
    );

    // Alarms are replicated: raised through one member, every member refuses writes
    // and lists the alarm.
    let follower = (leader + 1) % 3;
    let mut f = cluster.client(follower).await.unwrap();
    let fid = f.status().await.unwrap().header().unwrap().member_id();
    alarm(&mut f, AlarmAction::Activate, AlarmType::Corrupt, fid).await;
    for i in 0..3 {
        let mut m = cluster.client(i).await.unwrap();
        wait_until(Duration::from_secs(10), "alarm on every member", || {
            let mut m = m.clone();
            async move {
                let st = m.status().await?;
                ensure!(st.errors() == [format!("memberID:{fid} alarm:CORRUPT ")]);
                Ok(())
            }
        })
        .await
        .unwrap();
        assert_eq!(
            status_of(m.put("x", "1", None).await.unwrap_err()).0,
            Code::DataLoss
        );
    }
    alarm(&mut c, AlarmAction::Deactivate, AlarmType::Corrupt, fid).await;
    c.put("x", "1", None).await.unwrap();

    // MoveLeader: refused on a follower and to a non-member, then done by etcdctl.
    assert_eq!(
        status_of(f.move_leader(fid).await.unwrap_err()),
        (Code::FailedPrecondition, "etcdserver: not leader".into())
    );
    assert_eq!(
        status_of(c.move_leader(12345).await.unwrap_err()),
        (
            Code::FailedPrecondition,
            "etcdserver: bad leader transferee".into()
        )
    );
    let lid = c.status().await.unwrap().header().unwrap().member_id();
    let all = cluster.endpoints().join(",");
    let out = run_ok(etcdctl(&all, &["move-leader", &format!("{fid:x}")], None).unwrap());
    assert_eq!(
        out.trim(),
        format!("Leadership transferred from {lid:x} to {fid:x}")
    );
    assert_eq!(cluster.leader().await.unwrap(), follower);
    // The old leader follows; back again through the etcd-client API, which answers
    // once the target leads.
    let mut f = cluster.client(follower).await.unwrap();
    f.move_leader(lid).await.unwrap();
    assert_eq!(c.status().await.unwrap().leader(), lid);
    c.put("after", "moves", None).await.unwrap();
}

/// Every key with its metadata, from a point of view that ignores the member.
async fn contents(c: &mut etcd_client::Client) -> Vec<(Vec<u8>, Vec<u8>, i64, i64, i64, i64)> {
    c.get("", Some(GetOptions::new().with_all_keys()))
        .await
        .unwrap()
        .kvs()
        .iter()
        .map(|kv| {
            (
                kv.key().to_vec(),
                kv.value().to_vec(),
                kv.create_revision(),
                kv.mod_revision(),
                kv.version(),
                kv.lease(),
            )
        })
        .collect()
}

#[tokio::test]
async fn snapshot_save_then_restore_serves_the_same_data() {
    let src = Concord::start().await.unwrap();
    let mut c = src.client().await.unwrap();
    let lease = c.lease_grant(3600, None).await.unwrap().id();
    for i in 0..40 {
        let opts = (i % 4 == 0).then(|| etcd_client::PutOptions::new().with_lease(lease));
        c.put(format!("k{:02}", i % 13), format!("v{i}"), opts)
            .await
            .unwrap();
    }
    c.delete("k05", None).await.unwrap();
    c.compact(
        20,
        Some(etcd_client::CompactionOptions::new().with_physical()),
    )
    .await
    .unwrap();
    // An alarm travels in the image too (member 42 does not exist; NOSPACE of a
    // departed member is still NOSPACE).
    alarm(&mut c, AlarmAction::Activate, AlarmType::Nospace, 42).await;
    // So do the auth store's users and roles.
    c.user_add("alice", "pw", None).await.unwrap();
    c.role_add("readers").await.unwrap();
    c.user_grant_role("alice", "readers").await.unwrap();
    let rev = concord_integration::revision(&mut c).await;
    let hash = c.hash_kv(rev).await.unwrap();
    let want = contents(&mut c).await;

    let dir = tempfile::tempdir().unwrap();
    let by_etcdctl = dir.path().join("etcdctl.db");
    let by_concordctl = dir.path().join("concordctl.db");
    let out = run_ok(
        etcdctl(
            &src.endpoint(),
            &["snapshot", "save", by_etcdctl.to_str().unwrap()],
            None,
        )
        .unwrap(),
    );
    assert!(out.contains("Snapshot saved at"), "{out}");
    let len = std::fs::metadata(&by_etcdctl).unwrap().len();
    assert_eq!(len % 512, 32, "image in 512-byte blocks, then the SHA-256");
    let out = run_ok(
        concordctl(&[
            "--endpoints",
            &src.endpoint(),
            "snapshot",
            "save",
            by_concordctl.to_str().unwrap(),
        ])
        .unwrap(),
    );
    assert_eq!(
        out.trim(),
        format!("Snapshot saved at {}", by_concordctl.display())
    );
    let st = json(&run_ok(
        concordctl(&[
            "snapshot",
            "status",
            by_etcdctl.to_str().unwrap(),
            "-w",
            "json",
        ])
        .unwrap(),
    ));
    assert_eq!(st["revision"].as_i64(), Some(rev));
    assert_eq!(st["totalSize"].as_u64(), Some(len - 32));
    assert!(st["totalKey"].as_u64().unwrap() > 13);
    // The second image holds the same records (lease checkpoints may have changed a
    // lease's recorded TTL in between, so the bytes may differ).
    let st2 = json(&run_ok(
        concordctl(&[
            "snapshot",
            "status",
            by_concordctl.to_str().unwrap(),
            "-w",
            "json",
        ])
        .unwrap(),
    ));
    assert_eq!(
        (&st2["revision"], &st2["totalKey"]),
        (&st["revision"], &st["totalKey"])
    );
    let table = run_ok(
        concordctl(&[
            "snapshot",
            "status",
            by_etcdctl.to_str().unwrap(),
            "-w",
            "table",
        ])
        .unwrap(),
    );
    assert!(table.contains("| REVISION |"), "{table}");

    // A new single-member cluster from the file, on the ports of a fresh member.
    let mut dst = Concord::start().await.unwrap();
    let old_id = c.status().await.unwrap().header().unwrap().member_id();
    dst.proc.kill9();
    std::fs::remove_dir_all(&dst.dir).unwrap();
    let peer = format!("http://127.0.0.1:{}", dst.peer_port);
    let cluster = format!("n1={peer}");
    let data_dir = dst.dir.to_str().unwrap().to_string();
    let restore = [
        "snapshot",
        "restore",
        by_etcdctl.to_str().unwrap(),
        "--data-dir",
        &data_dir,
        "--name",
        "n1",
        "--initial-cluster",
        &cluster,
        "--initial-advertise-peer-urls",
        &peer,
        "--initial-cluster-token",
        "etcd-cluster",
    ];
    let out = run_ok(concordctl(&restore).unwrap());
    assert!(out.contains(&format!("revision {rev}")), "{out}");
    dst.restart().await.unwrap();
    let mut d = dst.client().await.unwrap();
    let st = d.status().await.unwrap();
    assert_ne!(st.header().unwrap().member_id(), old_id, "a new member");
    assert_eq!(d.user_get("alice").await.unwrap().roles(), ["readers"]);
    let h = d.hash_kv(rev).await.unwrap();
    assert_eq!((h.hash(), h.compact_version()), (hash.hash(), 20));
    assert_eq!(contents(&mut d).await, want);
    assert_eq!(
        status_of(
            d.get("k01", Some(GetOptions::new().with_revision(10)))
                .await
                .unwrap_err()
        )
        .0,
        Code::OutOfRange,
        "compacted history stays compacted"
    );
    let leases = d.leases().await.unwrap();
    assert_eq!(
        leases.leases().iter().map(|l| l.id()).collect::<Vec<_>>(),
        [lease]
    );
    assert_eq!(
        d.lease_time_to_live(
            lease,
            Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys())
        )
        .await
        .unwrap()
        .keys()
        .len(),
        c.lease_time_to_live(
            lease,
            Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys())
        )
        .await
        .unwrap()
        .keys()
        .len()
    );
    assert_eq!(
        alarm(&mut d, AlarmAction::Get, AlarmType::None, 0).await,
        vec![(42, 1)]
    );
    alarm(&mut d, AlarmAction::Deactivate, AlarmType::Nospace, 42).await;
    let r = d.put("new", "write", None).await.unwrap();
    assert_eq!(r.header().unwrap().revision(), rev + 1);

    // Restoring over an existing member is refused.
    let out = concordctl(&restore).unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"));
}

/// Latencies of a concurrent put/get load on `endpoint` while `during` runs (or for
/// `min` at least), in microseconds, sorted.
async fn load_latencies(
    endpoint: &str,
    min: Duration,
    during: impl std::future::Future<Output = Result<usize>>,
) -> Result<(Vec<u128>, usize)> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..8 {
        let stop = stop.clone();
        let mut c = concord_integration::connect(endpoint).await?;
        workers.spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("load/{w}/{}", i % 100);
                let t = Instant::now();
                if i.is_multiple_of(2) {
                    c.put(key, vec![b'x'; 100], None).await?;
                } else {
                    c.get(key, None).await?;
                }
                lat.push(t.elapsed().as_micros());
                i += 1;
            }
            anyhow::Ok(lat)
        });
    }
    let started = Instant::now();
    let n = during.await?;
    if let Some(left) = min.checked_sub(started.elapsed()) {
        tokio::time::sleep(left).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut all = Vec::new();
    while let Some(r) = workers.join_next().await {
        all.extend(r??);
    }
    all.sort_unstable();
    Ok((all, n))
}

fn pct(sorted: &[u128], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

#[tokio::test]
async fn defrag_does_not_stall_a_concurrent_load() {
    let s = Concord::start().await.unwrap();
    let mut c = s.client().await.unwrap();
    // ~25 MB of incompressible values, written twice, then the first copies compacted
    // away: plenty for a defragmentation to rewrite.
    let value = pseudo_random_text(2_000, 3);
    for round in 0..2 {
        for t in 0..200 {
            let ops: Vec<TxnOp> = (0..64)
                .map(|i| {
                    TxnOp::put(
                        format!("fill/{t:03}/{i:02}"),
                        format!("{round}{value}"),
                        None,
                    )
                })
                .collect();
            c.txn(Txn::new().and_then(ops)).await.unwrap();
        }
    }
    compact_to_now(&mut c).await;
    let ep = s.endpoint();
    let window = Duration::from_secs(4);

    let (base, _) = load_latencies(&ep, window, async { anyhow::Ok(0) })
        .await
        .unwrap();
    let size_before = c.status().await.unwrap().db_size();
    let defrag_ep = ep.clone();
    let (during, defrags) = load_latencies(&ep, Duration::ZERO, async move {
        // Defragment back to back for the whole window (at least once). The RPC
        // answers when the rewrite is done, which on a machine busy with other work
        // takes long: RocksDB compacts at the lowest CPU priority, so requests (and
        // anything else) go first. Hence no 10 s request timeout on this client.
        let mut d =
            concord_integration::bench::connect_with(&defrag_ep, Some(Duration::from_secs(300)))
                .await?;
        let started = Instant::now();
        let mut n = 0;
        while n == 0 || started.elapsed() < window {
            let t = Instant::now();
            d.defragment().await.context("defragment")?;
            eprintln!("defragment took {:?}", t.elapsed());
            n += 1;
        }
        Ok(n)
    })
    .await
    .unwrap();
    let size_after = c.status().await.unwrap().db_size();
    println!(
        "load without defrag: {} ops, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        base.len(),
        pct(&base, 0.5),
        pct(&base, 0.99),
        pct(&base, 1.0)
    );
    println!(
        "load during {defrags} defrags: {} ops, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms \
         (p99 ratio {:.2}); db size {size_before} -> {size_after} bytes",
        during.len(),
        pct(&during, 0.5),
        pct(&during, 0.99),
        pct(&during, 1.0),
        pct(&during, 0.99) / pct(&base, 0.99)
    );
    assert!(!during.is_empty() && defrags >= 1);
    assert_eq!(
        c.get("fill/199/63", None).await.unwrap().kvs()[0].value()[0],
        b'1'
    );
}

#[tokio::test]
async fn a_snapshot_restores_into_a_new_three_member_cluster() {
    let src = Concord::start().await.unwrap();
    let mut c = src.client().await.unwrap();
    for i in 0..30 {
        c.put(format!("k{:02}", i % 11), format!("v{i}"), None)
            .await
            .unwrap();
    }
    c.compact(12, None).await.unwrap();
    let rev = concord_integration::revision(&mut c).await;
    let hash = c.hash_kv(rev).await.unwrap().hash();
    let want = contents(&mut c).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("backup.db");
    run_ok(
        concordctl(&[
            "--endpoints",
            &src.endpoint(),
            "snapshot",
            "save",
            file.to_str().unwrap(),
        ])
        .unwrap(),
    );

    // A cluster's ports and flags; its members' data is replaced by the backup, each
    // restored with that member's own flags.
    let mut cluster = Cluster::start(Kind::Concord, ClusterOptions::default())
        .await
        .unwrap();
    for i in 0..3 {
        cluster.kill9(i);
    }
    for i in 0..3 {
        let args: Vec<String> = cluster.members[i]
            .args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let flag = |name: &str| {
            let at = args.iter().position(|a| a == name).unwrap();
            args[at + 1].clone()
        };
        std::fs::remove_dir_all(flag("--data-dir")).unwrap();
        let mut restore = vec!["snapshot".to_string(), "restore".into()];
        restore.push(file.to_str().unwrap().into());
        for f in [
            "--data-dir",
            "--name",
            "--initial-cluster",
            "--initial-cluster-token",
            "--initial-advertise-peer-urls",
        ] {
            restore.push(f.into());
            restore.push(flag(f));
        }
        let restore: Vec<&str> = restore.iter().map(String::as_str).collect();
        run_ok(concordctl(&restore).unwrap());
    }
    for i in 0..3 {
        cluster.restart(i).await.unwrap();
    }
    let leader = cluster.leader().await.unwrap();
    let mut l = cluster.client(leader).await.unwrap();
    let r = l.put("after", "restore", None).await.unwrap();
    assert_eq!(r.header().unwrap().revision(), rev + 1);
    for i in 0..3 {
        let mut m = cluster.client(i).await.unwrap();
        // Once the member has the new write, its HashKV at the restored revision.
        hash_kv_once_applied(&mut m, rev + 1).await;
        let h = m.hash_kv(rev).await.unwrap();
        assert_eq!(
            (h.hash(), h.compact_version()),
            (hash, 12),
            "member n{}",
            i + 1
        );
        let mut got = contents(&mut m).await;
        got.retain(|kv| kv.0 != b"after");
        assert_eq!(got, want, "member n{}", i + 1);
    }
}

/// `(hash, compact revision)` of HashKV at `rev` on `m`'s member, once it has applied
/// `rev` (followers may lag a little behind the write that made it).
async fn hash_kv_once_applied(m: &mut etcd_client::Client, rev: i64) -> (u32, i64) {
    wait_until(
        Duration::from_secs(10),
        "member applied the revision",
        || {
            let mut m = m.clone();
            async move {
                m.hash_kv(rev).await?;
                Ok(())
            }
        },
    )
    .await
    .unwrap();
    let h = m.hash_kv(rev).await.unwrap();
    (h.hash(), h.compact_version())
}

/// Compacts `c`'s store physically up to its current revision.
async fn compact_to_now(c: &mut etcd_client::Client) {
    let rev = concord_integration::revision(c).await;
    c.compact(
        rev,
        Some(etcd_client::CompactionOptions::new().with_physical()),
    )
    .await
    .unwrap();
}
