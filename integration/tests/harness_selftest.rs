//! Self-test of the cluster harness against the reference implementation: a real
//! 3-member etcd cluster (Debian's etcd), with SIGKILL + restart and SIGSTOP /
//! SIGCONT of a follower. Shows the harness works independently of Concord.

use std::time::Duration;

use anyhow::{Result, ensure};
use concord_integration::cluster::{Cluster, ClusterOptions, Kind};
use concord_integration::{etcd_bin, wait_until};
use etcd_client::GetOptions;

const DEADLINE: Duration = Duration::from_secs(30);

async fn etcd_cluster() -> Cluster {
    assert!(
        etcd_bin().is_some(),
        "the harness self-test needs the real etcd at /usr/bin/etcd \
         (apt-get install etcd-server)"
    );
    Cluster::start(Kind::Etcd, ClusterOptions::default())
        .await
        .expect("starting a 3-member etcd cluster")
}

/// The value of `key` as member `i` serves it (linearizable unless `serializable`).
async fn get(c: &Cluster, i: usize, key: &str, serializable: bool) -> Result<Option<String>> {
    let opts = serializable.then(|| GetOptions::new().with_serializable());
    let resp = c.client(i).await?.get(key, opts).await?;
    Ok(match resp.kvs() {
        [] => None,
        [kv] => Some(kv.value_str()?.to_string()),
        more => anyhow::bail!("{} kvs for one key", more.len()),
    })
}

/// Waits until member `i` serves `key` = `want` with a serializable read.
async fn wait_serves(c: &Cluster, i: usize, key: &str, want: &str) -> Result<()> {
    wait_until(
        DEADLINE,
        &format!("n{} serving {key}={want}", i + 1),
        || async {
            let got = get(c, i, key, true).await?;
            ensure!(got.as_deref() == Some(want), "got {got:?}");
            Ok(())
        },
    )
    .await
}

#[tokio::test]
async fn etcd_cluster_kill9_and_restart_follower() {
    let mut c = etcd_cluster().await;
    assert_eq!(c.members.len(), 3);
    assert_eq!(c.endpoints().len(), 3);
    let names: Vec<&str> = c.members.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["n1", "n2", "n3"]);

    // Write through member 0, read back linearizably from member 2.
    let put = c
        .client(0)
        .await
        .unwrap()
        .put("k1", "v1", None)
        .await
        .unwrap();
    let rev1 = put.header().unwrap().revision();
    assert!(rev1 > 1, "revision {rev1}");
    assert_eq!(
        get(&c, 2, "k1", false).await.unwrap().as_deref(),
        Some("v1")
    );
    // The all-endpoints client sees it too.
    let all = c.client_all().await.unwrap().get("k1", None).await.unwrap();
    assert_eq!(all.kvs()[0].value_str().unwrap(), "v1");

    let leader = c.leader().await.unwrap();
    assert!(leader < 3);
    let follower = (leader + 1) % 3;
    let other = 3 - leader - follower;
    assert_ne!(follower, other);

    // SIGKILL a follower: the remaining majority keeps serving writes and reads.
    c.kill9(follower);
    let put = c
        .client(other)
        .await
        .unwrap()
        .put("k2", "while-down", None)
        .await
        .unwrap();
    assert!(put.header().unwrap().revision() > rev1);
    assert_eq!(
        get(&c, leader, "k2", false).await.unwrap().as_deref(),
        Some("while-down")
    );
    // A killed member is not asked, and the leader does not change for it.
    assert_eq!(c.leader().await.unwrap(), leader);

    // Restart it on the same data dir: it catches up with the write it missed.
    c.restart(follower).await.unwrap();
    wait_serves(&c, follower, "k2", "while-down").await.unwrap();
    assert_eq!(
        get(&c, follower, "k1", true).await.unwrap().as_deref(),
        Some("v1")
    );
    // And it takes part again: a linearizable read through it sees a new write.
    c.client(leader)
        .await
        .unwrap()
        .put("k3", "after-restart", None)
        .await
        .unwrap();
    assert_eq!(
        get(&c, follower, "k3", false).await.unwrap().as_deref(),
        Some("after-restart")
    );
    // Two starts, so two log files, both in its log.
    let log = c.member_log(follower);
    assert_eq!(log.matches("=====").count(), 4, "{log}");
}

#[tokio::test]
async fn etcd_cluster_pause_and_resume_follower() {
    let c = etcd_cluster().await;
    let leader = c.leader().await.unwrap();
    let follower = (leader + 2) % 3;
    let other = 3 - leader - follower;

    c.pause(follower).unwrap();
    // A stopped process does not answer.
    let stalled = tokio::time::timeout(Duration::from_secs(2), async {
        c.client(follower)
            .await?
            .get("k", Some(GetOptions::new().with_serializable()))
            .await?;
        anyhow::Ok(())
    })
    .await;
    assert!(
        !matches!(stalled, Ok(Ok(()))),
        "a SIGSTOPped member answered"
    );
    // Writes keep working through the others while it is paused.
    for i in 0..5 {
        c.client(other)
            .await
            .unwrap()
            .put(format!("p{i}"), format!("v{i}"), None)
            .await
            .unwrap();
    }
    assert_eq!(
        get(&c, leader, "p4", false).await.unwrap().as_deref(),
        Some("v4")
    );
    assert_eq!(c.leader().await.unwrap(), leader);

    c.resume(follower).unwrap();
    wait_serves(&c, follower, "p4", "v4").await.unwrap();
    for i in 0..5 {
        assert_eq!(
            get(&c, follower, &format!("p{i}"), false)
                .await
                .unwrap()
                .as_deref(),
            Some(format!("v{i}").as_str())
        );
    }
}

/// Dropping a cluster with a paused member still kills every process.
#[tokio::test]
async fn drop_kills_paused_members() {
    let c = etcd_cluster().await;
    let pids: Vec<u32> = c
        .members
        .iter()
        .map(|m| m.pid().expect("running"))
        .collect();
    c.pause(1).unwrap();
    drop(c);
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} survived the cluster's drop"
        );
    }
}

/// The proxied layout carries real raft traffic: etcd members listen for peers on
/// 127.0.0.{2,3,4} behind fault proxies and still form a cluster. (Source-IP
/// partitions are Concord-only: etcd does not bind its outgoing connections.)
#[tokio::test]
async fn etcd_cluster_through_proxies() {
    assert!(etcd_bin().is_some(), "needs the real etcd at /usr/bin/etcd");
    let opts = ClusterOptions {
        proxied: true,
        ..ClusterOptions::default()
    };
    let c = Cluster::start(Kind::Etcd, opts).await.unwrap();
    for (i, m) in c.members.iter().enumerate() {
        assert_eq!(m.peer_listen.ip().to_string(), format!("127.0.0.{}", i + 2));
        let proxy = m.proxy.as_ref().expect("proxied");
        assert_eq!(m.peer_advertise, proxy.local_addr());
        assert_eq!(proxy.upstream(), m.peer_listen);
    }
    c.client(1)
        .await
        .unwrap()
        .put("px", "1", None)
        .await
        .unwrap();
    assert_eq!(get(&c, 0, "px", false).await.unwrap().as_deref(), Some("1"));
    assert!(c.partition(0).is_err(), "partition is Concord-only");
    c.heal();
    assert!(c.leader().await.unwrap() < 3);
}
