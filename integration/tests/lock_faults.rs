//! Mutual exclusion under faults: clients of a 3-member cluster take one lock (the Lock
//! service, each with its own kept-alive lease), read a counter, and write counter + 1
//! in a txn fenced on their lock key's create revision (and on the counter's mod
//! revision), then unlock — while a nemesis kills (-9) and pauses members.
//!
//! Checked afterwards, against the cluster's own history:
//! - the counter's final value lies between the acknowledged increments and the
//!   acknowledged plus unknown-outcome ones, and its history is 1, 2, 3, ... with no
//!   value skipped or repeated (no lost update);
//! - every acknowledged increment is in the history at its revision with its value;
//! - at the revision of every acknowledged increment, the lock's owner (the key under
//!   the lock's prefix with the lowest create revision) was the incrementing client's
//!   own lock key: no two holders at once.
//!
//! `LOCK_FAULTS_SECS` sets the run time (default 25), `LOCK_FAULTS_SEED` replays a
//! nemesis schedule (the seed is printed).

use std::time::{Duration, Instant};

use anyhow::Context;
use concord_integration::cluster::{Cluster, ClusterOptions, Kind};
use concord_integration::{RETRY_DEADLINE, Rng, retry_transient};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, LockOptions, SortOrder, SortTarget,
    Txn, TxnOp, WatchOptions,
};

const CLIENTS: u64 = 5;
const LOCK: &str = "mutex";
const COUNTER: &str = "counter";

#[derive(Debug, Default)]
struct Outcome {
    /// (revision, lock key, value written) of each acknowledged increment.
    acked: Vec<(i64, Vec<u8>, u64)>,
    unknown: u64,
    fenced_out: u64,
    locks: u64,
}

async fn client(endpoints: &[String]) -> Option<Client> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_timeout(Duration::from_secs(4));
    Client::connect(endpoints, Some(opts)).await.ok()
}

/// Renews `lease` every second until aborted, reconnecting as needed.
async fn keep_alive(endpoints: Vec<String>, lease: i64) {
    loop {
        if let Some(mut c) = client(&endpoints).await
            && let Ok((mut k, mut s)) = c.lease_keep_alive(lease).await
        {
            loop {
                if k.keep_alive().await.is_err() {
                    break;
                }
                match tokio::time::timeout(Duration::from_secs(2), s.message()).await {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                    _ => break,
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn worker(endpoints: Vec<String>, stop: Instant) -> Outcome {
    let mut out = Outcome::default();
    let pause = || tokio::time::sleep(Duration::from_millis(100));
    while Instant::now() < stop {
        let Some(mut c) = client(&endpoints).await else {
            pause().await;
            continue;
        };
        let Ok(lease) = c.lease_grant(3, None).await else {
            pause().await;
            continue;
        };
        let lease = lease.id();
        let ka = tokio::spawn(keep_alive(endpoints.clone(), lease));
        let locked = tokio::time::timeout(
            Duration::from_secs(8),
            c.lock(LOCK, Some(LockOptions::new().with_lease(lease))),
        )
        .await;
        if let Ok(Ok(l)) = locked {
            out.locks += 1;
            let key = l.key().to_vec();
            increment(&mut c, &key, &mut out).await;
            let _ = c.unlock(key).await;
        }
        ka.abort();
        let _ = c.lease_revoke(lease).await;
    }
    out
}

/// Read-modify-write of the counter, fenced on the lock key.
async fn increment(c: &mut Client, key: &[u8], out: &mut Outcome) {
    let Ok(mine) = c.get(key, None).await else {
        return;
    };
    let Some(lock_rev) = mine.kvs().first().map(|kv| kv.create_revision()) else {
        return; // the lease ran out before we looked
    };
    let Ok(cur) = c.get(COUNTER, None).await else {
        return;
    };
    let (value, mod_rev) = cur.kvs().first().map_or((0, 0), |kv| {
        (
            kv.value_str().unwrap().parse::<u64>().unwrap(),
            kv.mod_revision(),
        )
    });
    let txn = Txn::new()
        .when([
            Compare::create_revision(key, CompareOp::Equal, lock_rev),
            Compare::mod_revision(COUNTER, CompareOp::Equal, mod_rev),
        ])
        .and_then([TxnOp::put(COUNTER, (value + 1).to_string(), None)]);
    match tokio::time::timeout(Duration::from_secs(5), c.txn(txn)).await {
        Ok(Ok(r)) if r.succeeded() => {
            out.acked
                .push((r.header().unwrap().revision(), key.to_vec(), value + 1))
        }
        Ok(Ok(_)) => out.fenced_out += 1,
        _ => out.unknown += 1,
    }
}

#[tokio::test]
async fn lock_holders_never_overlap_and_no_increment_is_lost_under_faults() {
    let secs: u64 = std::env::var("LOCK_FAULTS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(25);
    let seed: u64 = std::env::var("LOCK_FAULTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| concord_integration::run_id().bytes().map(u64::from).sum());
    eprintln!("lock_faults: {secs} s, {CLIENTS} clients, seed {seed}");
    let mut cluster = Cluster::start(Kind::Concord, ClusterOptions::fast())
        .await
        .expect("starting a 3-member cluster");
    let endpoints = cluster.endpoints();
    let stop = Instant::now() + Duration::from_secs(secs);
    let workers: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(worker(endpoints.clone(), stop)))
        .collect();

    // The nemesis: one fault at a time, a quiet second between faults.
    let mut rng = Rng::new(seed);
    let (mut kills, mut pauses) = (0, 0);
    while Instant::now() + Duration::from_secs(4) < stop {
        tokio::time::sleep(rng.millis(1000, 2500)).await;
        let victim = rng.below(3) as usize;
        if rng.below(2) == 0 {
            cluster.kill9(victim);
            tokio::time::sleep(rng.millis(500, 2000)).await;
            cluster.restart(victim).await.expect("restart");
            kills += 1;
        } else {
            cluster.pause(victim).unwrap();
            tokio::time::sleep(rng.millis(500, 2000)).await;
            cluster.resume(victim).unwrap();
            pauses += 1;
        }
    }
    let mut all = Outcome::default();
    for w in workers {
        let o = w.await.unwrap();
        all.acked.extend(o.acked);
        all.unknown += o.unknown;
        all.fenced_out += o.fenced_out;
        all.locks += o.locks;
    }
    eprintln!(
        "faults: {kills} kills, {pauses} pauses; locks taken {}, increments acknowledged {}, \
         unknown {}, fenced out {}",
        all.locks,
        all.acked.len(),
        all.unknown,
        all.fenced_out
    );
    assert!(
        all.acked.len() >= 10,
        "too few increments to judge: {}",
        all.acked.len()
    );

    // The checks: each read retried while the cluster settles (a member just resumed
    // or restarted may still say "no leader" or "leader changed").
    let c = client(&endpoints).await.expect("a client after the run");
    let final_value: u64 = retry_transient(RETRY_DEADLINE, "reading the counter", || {
        let mut c = c.clone();
        async move {
            let r = c.get(COUNTER, None).await?;
            Ok(r.kvs()
                .first()
                .map_or(0, |kv| kv.value_str().unwrap().parse().unwrap()))
        }
    })
    .await
    .unwrap();
    let acked = all.acked.len() as u64;
    assert!(
        acked <= final_value && final_value <= acked + all.unknown,
        "counter {final_value}, acknowledged {acked}, unknown {}",
        all.unknown
    );

    // The counter's whole history: 1, 2, 3, ... one value per revision (read again from
    // revision 1 if the watch breaks).
    let history = retry_transient(RETRY_DEADLINE, "watching the counter's history", || {
        let mut c = c.clone();
        async move {
            let mut history = Vec::new();
            let mut w = c
                .watch(COUNTER, Some(WatchOptions::new().with_start_revision(1)))
                .await?;
            while (history.len() as u64) < final_value {
                let r = tokio::time::timeout(Duration::from_secs(10), w.message())
                    .await
                    .context("the counter's history does not arrive")??
                    .context("the watch ended")?;
                for e in r.events() {
                    let kv = e.kv().unwrap();
                    history.push((
                        kv.mod_revision(),
                        kv.value_str().unwrap().parse::<u64>().unwrap(),
                    ));
                }
            }
            Ok(history)
        }
    })
    .await
    .unwrap();
    for (i, (_, v)) in history.iter().enumerate() {
        assert_eq!(*v, i as u64 + 1, "counter history {history:?}");
    }
    for (rev, key, value) in &all.acked {
        assert!(
            history.contains(&(*rev, *value)),
            "acknowledged increment to {value} at revision {rev} is not in the history"
        );
        // Who owned the lock at that revision?
        let owner = retry_transient(RETRY_DEADLINE, "reading the lock's owner", || {
            let mut c = c.clone();
            async move {
                let opts = GetOptions::new()
                    .with_prefix()
                    .with_revision(*rev)
                    .with_sort(SortTarget::Create, SortOrder::Ascend)
                    .with_limit(1);
                Ok(c.get(format!("{LOCK}/"), Some(opts)).await?)
            }
        })
        .await
        .unwrap();
        let owner = owner.kvs().first().map(|kv| kv.key().to_vec());
        assert_eq!(
            owner.as_deref(),
            Some(key.as_slice()),
            "at revision {rev} the lock was held by {:?}, but {:?} incremented",
            owner.as_deref().map(String::from_utf8_lossy),
            String::from_utf8_lossy(key)
        );
    }
    eprintln!(
        "checked {} acknowledged increments and a history of {} values",
        all.acked.len(),
        history.len()
    );
}
