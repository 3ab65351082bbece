//! Crash safety: writers run while the server is killed with SIGKILL; after a restart
//! every acknowledged write is there, with the revision it was acknowledged at.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use concord_integration::{Concord, RETRY_DEADLINE, retry_transient, wait_until};
use etcd_client::{Client, GetOptions, GetResponse, Txn, TxnOp};

/// An acknowledged write: key, value, revision.
type Acked = (String, String, i64);

/// A read of `key`, retried while the restarted server settles.
async fn get_settled(c: &Client, key: &str, opts: Option<GetOptions>) -> GetResponse {
    retry_transient(RETRY_DEADLINE, &format!("reading {key}"), || {
        let (mut c, opts) = (c.clone(), opts.clone());
        async move { Ok(c.get(key, opts).await?) }
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn acknowledged_writes_survive_kill_9() {
    let mut server = Concord::start().await.unwrap();
    let mut all_acked: Vec<Acked> = Vec::new();
    for round in 0..3 {
        let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
        let count = Arc::new(AtomicUsize::new(0));
        let mut writers = Vec::new();
        for w in 0..6 {
            let mut c = server.client().await.unwrap();
            let (acked, count) = (acked.clone(), count.clone());
            writers.push(tokio::spawn(async move {
                for i in 0.. {
                    let key = format!("r{round}/w{w}/{i}");
                    let value = format!("v{i}");
                    // Alternate plain puts and txns so both write paths are covered.
                    let rev = if i % 2 == 0 {
                        c.put(key.as_str(), value.as_str(), None)
                            .await
                            .map(|r| r.header().unwrap().revision())
                    } else {
                        c.txn(Txn::new().and_then([TxnOp::put(key.as_str(), value.as_str(), None)]))
                            .await
                            .map(|r| r.header().unwrap().revision())
                    };
                    match rev {
                        Ok(rev) => {
                            acked.lock().unwrap().push((key, value, rev));
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                        // The server is gone: whatever was in flight is unknown.
                        Err(_) => return,
                    }
                }
            }));
        }
        let target = 150 + round * 50;
        wait_until(Duration::from_secs(60), "writes acknowledged", || {
            let n = count.load(Ordering::SeqCst);
            async move {
                anyhow::ensure!(n >= target, "{n} acknowledged");
                Ok(())
            }
        })
        .await
        .unwrap();
        server.proc.kill9();
        for w in writers {
            w.await.unwrap();
        }
        all_acked.extend(acked.lock().unwrap().drain(..));
        server.restart().await.unwrap();

        let c = server.client().await.unwrap();
        let mut revs: Vec<i64> = all_acked.iter().map(|a| a.2).collect();
        revs.sort();
        revs.dedup();
        assert_eq!(
            revs.len(),
            all_acked.len(),
            "no revision was acknowledged twice"
        );
        for (key, value, rev) in &all_acked {
            let r = get_settled(&c, key, None).await;
            let kv = r
                .kvs()
                .first()
                .unwrap_or_else(|| panic!("acknowledged {key} lost"));
            assert_eq!(
                (kv.value_str().unwrap(), kv.mod_revision()),
                (value.as_str(), *rev),
                "{key}"
            );
        }
        let current = get_settled(
            &c,
            "r",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await;
        assert!(current.header().unwrap().revision() >= *revs.last().unwrap());
        eprintln!(
            "round {round}: {} acknowledged writes all present after kill -9",
            all_acked.len()
        );
    }
    // The restarted server keeps counting from where it was.
    let mut c = server.client().await.unwrap();
    let before = c.get("x", None).await.unwrap().header().unwrap().revision();
    let after = c
        .put("x", "1", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    assert_eq!(after, before + 1);
}
