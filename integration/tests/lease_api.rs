//! The Lease API through the `etcd-client` crate, against a real etcd 3.4 and against
//! `concord`: every RPC and every error, with the two transcripts compared line by line
//! (ids the server picks and remaining TTLs, which tick, are normalised), and the
//! timing guarantees on one member: a lease nobody keeps alive expires within TTL + 1 s
//! and takes its keys in one revision; keep-alives hold it for several TTLs; a lease
//! survives a kill -9 and restart of its member.

use std::time::{Duration, Instant};

use concord_integration::{Concord, Etcd, connect};
use etcd_client::{
    Client, EventType, LeaseGrantOptions, LeaseTimeToLiveOptions, PutOptions, WatchOptions,
};

const DEADLINE: Duration = Duration::from_secs(20);

fn err_line(e: etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => format!("error {:?} {:?}", s.code(), s.message()),
        other => format!("client error {other}"),
    }
}

/// Every Lease RPC and error once; returns what a client saw, one line per call.
async fn lease_transcript(c: &mut Client) -> Vec<String> {
    let mut out = Vec::new();
    let mut log = |s: String| out.push(s);

    let auto = c.lease_grant(60, None).await.unwrap();
    assert!(auto.id() > 0, "a server-chosen lease id is positive");
    log(format!(
        "grant auto ttl={} error={:?}",
        auto.ttl(),
        auto.error()
    ));
    // Below the minimum: raised to it (2 s with the default election timeout).
    let short = c.lease_grant(1, None).await.unwrap();
    log(format!("grant ttl=1 -> ttl={}", short.ttl()));
    let zero = c.lease_grant(0, None).await.unwrap();
    log(format!("grant ttl=0 -> ttl={}", zero.ttl()));
    let id = 0x1234_5678;
    let g = c
        .lease_grant(30, Some(LeaseGrantOptions::new().with_id(id)))
        .await
        .unwrap();
    log(format!("grant explicit id={:x} ttl={}", g.id(), g.ttl()));
    log(format!(
        "grant same id: {}",
        err_line(
            c.lease_grant(30, Some(LeaseGrantOptions::new().with_id(id)))
                .await
                .unwrap_err()
        )
    ));
    log(format!(
        "grant huge ttl: {}",
        err_line(c.lease_grant(9_000_000_001, None).await.unwrap_err())
    ));
    log(format!(
        "grant max ttl: ttl={}",
        c.lease_grant(9_000_000_000, None).await.unwrap().ttl()
    ));

    let with = |l| Some(PutOptions::new().with_lease(l));
    c.put("lk/b", "1", with(id)).await.unwrap();
    c.put("lk/a", "2", with(id)).await.unwrap();
    c.put("lk/c", "3", None).await.unwrap();
    log(format!(
        "put unknown lease: {}",
        err_line(c.put("lk/x", "v", with(0x77)).await.unwrap_err())
    ));
    // ignore_lease keeps the key's lease.
    c.put("lk/b", "1b", Some(PutOptions::new().with_ignore_lease()))
        .await
        .unwrap();
    let kv = c.get("lk/b", None).await.unwrap();
    log(format!("lk/b lease={:x}", kv.kvs()[0].lease()));

    let t = c
        .lease_time_to_live(id, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .unwrap();
    assert!((28..=30).contains(&t.ttl()), "remaining {}", t.ttl());
    let mut keys: Vec<String> = t
        .keys()
        .iter()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    // etcd lists them in map order.
    keys.sort();
    log(format!(
        "ttl id={:x} granted={} keys={keys:?}",
        t.id(),
        t.granted_ttl()
    ));
    let t = c.lease_time_to_live(id, None).await.unwrap();
    log(format!("ttl without keys: keys={}", t.keys().len()));
    let t = c.lease_time_to_live(0x99, None).await.unwrap();
    log(format!(
        "ttl unknown: id={:x} ttl={} granted={}",
        t.id(),
        t.ttl(),
        t.granted_ttl()
    ));

    let (mut keeper, mut stream) = c.lease_keep_alive(id).await.unwrap();
    for _ in 0..3 {
        keeper.keep_alive().await.unwrap();
        let r = stream.message().await.unwrap().unwrap();
        log(format!("keep-alive id={:x} ttl={}", r.id(), r.ttl()));
    }
    // The server answers TTL 0; the client library (which sends the first renewal
    // itself) turns that into its own error.
    match c.lease_keep_alive(0x99).await {
        Ok(_) => log("keep-alive unknown: accepted".into()),
        Err(e) => log(format!("keep-alive unknown: {}", err_line(e))),
    }

    let mut ids: Vec<i64> = c
        .leases()
        .await
        .unwrap()
        .leases()
        .iter()
        .map(|l| l.id())
        .collect();
    ids.sort();
    log(format!(
        "leases: {} including explicit={}",
        ids.len(),
        ids.contains(&id)
    ));

    let before = concord_integration::revision(c).await;
    let r = c.lease_revoke(id).await.unwrap();
    log(format!(
        "revoke: revision +{}",
        r.header().unwrap().revision() - before
    ));
    let left = c
        .get("lk/", Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .unwrap();
    let left: Vec<String> = left
        .kvs()
        .iter()
        .map(|kv| kv.key_str().unwrap().to_string())
        .collect();
    log(format!("after revoke: {left:?}"));
    log(format!(
        "revoke again: {}",
        err_line(c.lease_revoke(id).await.unwrap_err())
    ));
    let t = c.lease_time_to_live(id, None).await.unwrap();
    log(format!("ttl revoked: ttl={}", t.ttl()));
    // A revoke with no keys makes no revision.
    let rev = concord_integration::revision(c).await;
    let r = c.lease_revoke(short.id()).await.unwrap();
    log(format!(
        "revoke keyless: revision +{}",
        r.header().unwrap().revision() - rev
    ));
    out
}

#[tokio::test]
async fn every_lease_rpc_and_error_matches_etcd() {
    let etcd = Etcd::start().await.expect("start etcd");
    let mut ec = connect(&etcd.endpoint()).await.unwrap();
    let want = lease_transcript(&mut ec).await;

    let concord = Concord::start().await.expect("start concord");
    let mut cc = concord.client().await.unwrap();
    let got = lease_transcript(&mut cc).await;
    assert_eq!(got, want, "concord's transcript differs from etcd's");
    // Spot checks that the transcript is the one etcd documents.
    assert!(want.contains(&"grant ttl=1 -> ttl=2".to_string()));
    assert!(want.iter().any(|l| l.contains("lease already exists")));
    assert!(want.contains(&"revoke: revision +1".to_string()));
}

/// Waits for the DELETE of `key` on a watch opened at `from`; returns when it came and
/// its revision.
async fn wait_deleted(c: &mut Client, key: &str, from: i64) -> (Instant, i64) {
    let mut s = c
        .watch(key, Some(WatchOptions::new().with_start_revision(from)))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let r = tokio::time::timeout_at(deadline, s.message())
            .await
            .expect("the key was deleted in time")
            .unwrap()
            .unwrap();
        if let Some(e) = r
            .events()
            .iter()
            .find(|e| e.event_type() == EventType::Delete)
        {
            return (Instant::now(), e.kv().unwrap().mod_revision());
        }
    }
}

#[tokio::test]
async fn an_unrenewed_lease_expires_on_time_with_its_keys_in_one_revision() {
    let concord = Concord::start().await.unwrap();
    let mut c = concord.client().await.unwrap();
    let granted = Instant::now();
    let l = c.lease_grant(3, None).await.unwrap();
    let put = c
        .put("exp/a", "1", Some(PutOptions::new().with_lease(l.id())))
        .await
        .unwrap();
    c.put("exp/b", "2", Some(PutOptions::new().with_lease(l.id())))
        .await
        .unwrap();
    let from = put.header().unwrap().revision();
    let mut c2 = concord.client().await.unwrap();
    let b = tokio::spawn(async move { wait_deleted(&mut c2, "exp/b", from).await });
    let (at, rev_a) = wait_deleted(&mut c, "exp/a", from).await;
    let (_, rev_b) = b.await.unwrap();
    let took = at - granted;
    assert!(
        took >= Duration::from_millis(2900) && took <= Duration::from_secs(4),
        "expired after {took:?}, TTL 3 s"
    );
    assert_eq!(
        rev_a, rev_b,
        "a revoke deletes all its keys in one revision"
    );
    let t = c.lease_time_to_live(l.id(), None).await.unwrap();
    assert_eq!(t.ttl(), -1);
    assert!(c.leases().await.unwrap().leases().is_empty());
}

#[tokio::test]
async fn keep_alives_hold_a_lease_for_many_ttls_and_it_survives_a_restart() {
    let mut concord = Concord::start().await.unwrap();
    let mut c = concord.client().await.unwrap();
    let l = c.lease_grant(2, None).await.unwrap();
    c.put("ka", "v", Some(PutOptions::new().with_lease(l.id())))
        .await
        .unwrap();
    let (mut keeper, mut stream) = c.lease_keep_alive(l.id()).await.unwrap();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(7) {
        keeper.keep_alive().await.unwrap();
        assert_eq!(stream.message().await.unwrap().unwrap().ttl(), 2);
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    assert_eq!(c.get("ka", None).await.unwrap().kvs().len(), 1);
    drop((keeper, stream));

    // A longer lease survives a crash of its (only) member, and its clock goes on from
    // what the log recorded rather than from the full TTL.
    let l = c.lease_grant(8, None).await.unwrap();
    c.put("kb", "v", Some(PutOptions::new().with_lease(l.id())))
        .await
        .unwrap();
    let granted = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    concord.proc.kill9();
    concord.restart().await.unwrap();
    let mut c = concord.client().await.unwrap();
    let t = c.lease_time_to_live(l.id(), None).await.unwrap();
    assert_eq!(t.granted_ttl(), 8);
    assert!(
        t.ttl() <= 6,
        "after ~3 s of 8 the restarted member reports {} s left",
        t.ttl()
    );
    assert_eq!(c.get("kb", None).await.unwrap().kvs().len(), 1);
    let from = concord_integration::revision(&mut c).await;
    let (at, _) = wait_deleted(&mut c, "kb", from).await;
    let took = at - granted;
    assert!(
        took <= Duration::from_secs(8) + Duration::from_millis(2500),
        "the lease outlived its TTL by too much across a restart: {took:?}"
    );
}
