//! Disaster recovery, as the README's operations section describes it: a 3-member
//! cluster loses two members for good; the survivor with the newest log is restarted
//! with `--force-new-cluster` and serves every acknowledged write as a one-member
//! cluster (the others removed through its log, so a plain restart keeps it that way),
//! then grows again with `member add`.

use std::collections::BTreeMap;
use std::time::Duration;

use concord_integration::cluster::{Cluster, ClusterOptions, Kind};
use concord_integration::{RETRY_DEADLINE, connect, etcdctl, retry_transient, wait_until};
use etcd_client::GetOptions;

const DEADLINE: Duration = Duration::from_secs(30);

/// Every `dr/` key and value (the read retried while the member settles).
async fn all_writes(endpoint: &str) -> BTreeMap<String, String> {
    let r = retry_transient(RETRY_DEADLINE, "reading every write", || async {
        let opts = GetOptions::new().with_prefix();
        Ok(connect(endpoint).await?.get("dr/", Some(opts)).await?)
    })
    .await
    .unwrap();
    r.kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str().unwrap().to_string(),
                kv.value_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Puts `key` = `yes` through `endpoint` (retried while the member settles: the same
/// value again is harmless).
async fn put_settled(endpoint: &str, key: &str) {
    retry_transient(RETRY_DEADLINE, &format!("put {key}"), || async {
        connect(endpoint).await?.put(key, "yes", None).await?;
        Ok(())
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_survivor_restarted_with_force_new_cluster_keeps_every_acknowledged_write() {
    let mut c = Cluster::start(Kind::Concord, ClusterOptions::default())
        .await
        .unwrap();
    let mut cl = c.client_all().await.unwrap();
    let mut acked = BTreeMap::new();
    for i in 0..300 {
        let (k, v) = (format!("dr/{i:04}"), format!("v{i}"));
        cl.put(k.clone(), v.clone(), None).await.unwrap();
        acked.insert(k, v);
    }
    let lease = cl.lease_grant(600, None).await.unwrap().id();
    // Every member has applied everything before the loss (the survivor must be the
    // member with the newest log, as the procedure says).
    wait_until(DEADLINE, "members caught up", || async {
        let mut applied = Vec::new();
        for i in 0..3 {
            applied.push(
                connect(&c.endpoint(i))
                    .await?
                    .status()
                    .await?
                    .raft_applied_index(),
            );
        }
        anyhow::ensure!(applied.iter().all(|a| *a == applied[0]), "{applied:?}");
        Ok(())
    })
    .await
    .unwrap();

    // Two members are lost for good; the survivor alone has no quorum.
    c.kill9(1);
    c.kill9(2);
    let mut alone = connect(&c.endpoint(0)).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(5), alone.put("dr/x", "x", None))
            .await
            .map_or(true, |r| r.is_err()),
        "a member without quorum must not accept writes"
    );

    // The procedure: restart the survivor with --force-new-cluster.
    c.kill9(0);
    c.args_mut(0).push("--force-new-cluster".into());
    c.restart(0).await.unwrap();
    let first = c.endpoint(0);
    let ready = wait_until(DEADLINE, "a one-member cluster", || async {
        let out = etcdctl(&first, &["member", "list"], None)?;
        let list = String::from_utf8_lossy(&out.stdout).into_owned();
        anyhow::ensure!(list.lines().count() == 1, "{list}");
        Ok(())
    })
    .await;
    if let Err(e) = ready {
        c.print_logs();
        panic!("{e:#}");
    }
    assert_eq!(
        all_writes(&first).await,
        acked,
        "acknowledged writes after recovery"
    );
    put_settled(&first, "dr/after").await;
    let ttl = retry_transient(RETRY_DEADLINE, "lease time-to-live", || async {
        Ok(connect(&first)
            .await?
            .lease_time_to_live(lease, None)
            .await?)
    })
    .await
    .unwrap();
    assert_eq!(ttl.granted_ttl(), 600, "leases survive the recovery");

    // Permanent: a plain restart (without the flag) is still a one-member cluster.
    c.kill9(0);
    c.args_mut(0).pop();
    c.restart(0).await.unwrap();
    let members = retry_transient(RETRY_DEADLINE, "member list", || async {
        Ok(connect(&first).await?.member_list().await?)
    })
    .await
    .unwrap();
    assert_eq!(members.members().len(), 1);
    put_settled(&first, "dr/again").await;
    // The write that timed out without a quorum was never committed: dropped, as etcd
    // drops uncommitted entries on --force-new-cluster, and it stays dropped.
    let mut want = acked.clone();
    want.insert("dr/after".into(), "yes".into());
    want.insert("dr/again".into(), "yes".into());
    assert_eq!(all_writes(&first).await, want);

    // And it grows again.
    c.members[1].retired = true;
    c.members[2].retired = true;
    let (n, url) = c.prepare_member();
    let out = etcdctl(
        &first,
        &["member", "add", "n4", &format!("--peer-urls={url}")],
        None,
    )
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.start_added(n).await.unwrap();
    let grown = wait_until(DEADLINE, "the new member serving", || {
        let endpoint = c.endpoint(n);
        async move {
            let mut c4 = connect(&endpoint).await?;
            let r = c4.get("dr/again", None).await?;
            anyhow::ensure!(r.kvs().len() == 1, "not there yet");
            Ok(())
        }
    })
    .await;
    assert!(grown.is_ok(), "{grown:?}");
}
