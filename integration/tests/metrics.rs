//! Observability acceptance: a 3-member `concord` cluster and a 3-member real etcd
//! under the same load, each member's `/metrics` scraped. Every metric the issue names
//! is on every concord member, with etcd's type and label names; values are sane
//! (exactly one leader, committed proposals and WAL fsyncs rising under more load, the
//! db size gauge equal to what Maintenance `Status` reports); `--listen-metrics-urls`
//! serves `/metrics` and `/health`.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result};
use concord_integration::cluster::{Cluster, ClusterOptions, Kind};
use std::time::Duration;

use concord_integration::{Concord, READY_DEADLINE, retry_transient, wait_until};

/// The metrics the issue asks for, by name (histograms by their base name).
const REQUIRED: &[&str] = &[
    "etcd_server_has_leader",
    "etcd_server_is_leader",
    "etcd_server_is_learner",
    "etcd_server_leader_changes_seen_total",
    "etcd_server_proposals_committed_total",
    "etcd_server_proposals_applied_total",
    "etcd_server_proposals_pending",
    "etcd_server_proposals_failed_total",
    "etcd_server_slow_apply_total",
    "etcd_server_read_indexes_failed_total",
    "etcd_server_slow_read_indexes_total",
    "etcd_server_heartbeat_send_failures_total",
    "etcd_server_client_requests_total",
    "etcd_server_health_success",
    "etcd_server_health_failures",
    "etcd_server_quota_backend_bytes",
    "etcd_server_id",
    "etcd_server_version",
    "etcd_server_snapshot_apply_in_progress_total",
    "etcd_server_learner_promote_successes",
    "etcd_disk_wal_fsync_duration_seconds",
    "etcd_disk_backend_commit_duration_seconds",
    "etcd_disk_backend_defrag_duration_seconds",
    "etcd_disk_backend_snapshot_duration_seconds",
    "etcd_disk_wal_write_bytes_total",
    "etcd_disk_defrag_inflight",
    "etcd_mvcc_db_total_size_in_bytes",
    "etcd_mvcc_db_total_size_in_use_in_bytes",
    "etcd_mvcc_put_total",
    "etcd_mvcc_delete_total",
    "etcd_mvcc_range_total",
    "etcd_mvcc_txn_total",
    "etcd_mvcc_hash_duration_seconds",
    "etcd_network_peer_sent_bytes_total",
    "etcd_network_peer_received_bytes_total",
    "etcd_network_peer_round_trip_time_seconds",
    "etcd_network_active_peers",
    "etcd_network_client_grpc_sent_bytes_total",
    "etcd_network_client_grpc_received_bytes_total",
    "etcd_debugging_mvcc_keys_total",
    "etcd_debugging_mvcc_watcher_total",
    "etcd_debugging_mvcc_watch_stream_total",
    "etcd_debugging_mvcc_slow_watcher_total",
    "etcd_debugging_mvcc_events_total",
    "etcd_debugging_mvcc_current_revision",
    "etcd_debugging_mvcc_compact_revision",
    "etcd_debugging_lease_granted_total",
    "etcd_debugging_lease_revoked_total",
    "etcd_debugging_lease_renewed_total",
    "etcd_debugging_lease_ttl_total",
    "etcd_cluster_version",
    "grpc_server_started_total",
    "grpc_server_handled_total",
    "grpc_server_msg_received_total",
    "grpc_server_msg_sent_total",
    "process_cpu_seconds_total",
    "process_open_fds",
    "process_max_fds",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_start_time_seconds",
];

/// One scrape: per metric, its type, the label-name sets of its samples (without a
/// histogram's `le`) and its samples by their full text of labels.
#[derive(Debug, Default)]
struct Scrape {
    types: BTreeMap<String, String>,
    labels: BTreeMap<String, BTreeSet<Vec<String>>>,
    samples: BTreeMap<String, f64>,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut s = Scrape::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split_whitespace();
                if let (Some(n), Some(t)) = (it.next(), it.next()) {
                    s.types.insert(n.to_string(), t.to_string());
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (series, value) = match line.rsplit_once(' ') {
                Some(x) => x,
                None => continue,
            };
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, l.trim_end_matches('}')),
                None => (series, ""),
            };
            let mut names: Vec<String> = labels
                .split(',')
                .filter_map(|kv| kv.split_once('=').map(|(k, _)| k.trim().to_string()))
                .filter(|k| k != "le")
                .collect();
            names.sort();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    name.strip_suffix(suffix)
                        .filter(|b| s.types.get(*b).is_some_and(|t| t == "histogram"))
                })
                .unwrap_or(name);
            s.labels.entry(base.to_string()).or_default().insert(names);
            if let Ok(v) = value.parse::<f64>() {
                s.samples.insert(series.to_string(), v);
            }
        }
        s
    }

    fn value(&self, series: &str) -> Option<f64> {
        self.samples.get(series).copied()
    }

    /// The sum over the samples whose series starts with `prefix` and contains `has`.
    fn sum(&self, prefix: &str, has: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(k, _)| k.starts_with(prefix) && k.contains(has))
            .map(|(_, v)| v)
            .sum()
    }
}

async fn scrape(port: u16) -> Result<Scrape> {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "5"])
        .arg(format!("http://127.0.0.1:{port}/metrics"))
        .output()
        .await
        .context("running curl")?;
    anyhow::ensure!(out.status.success(), "scraping :{port} failed");
    Ok(Scrape::parse(&String::from_utf8_lossy(&out.stdout)))
}

/// Puts, a txn, ranges, a watch that sees events, a lease with a keep-alive: every
/// family gets samples. Each call is retried through an election on a busy machine.
async fn load(c: &Cluster, round: usize) -> Result<()> {
    let client = c.client_all().await?;
    let retry = |what: &'static str| (Duration::from_secs(30), what);
    let (d, what) = retry("watch");
    let mut w = retry_transient(d, what, || {
        let mut c = client.clone();
        async move {
            let mut w = c
                .watch(
                    "load/",
                    Some(etcd_client::WatchOptions::new().with_prefix()),
                )
                .await?;
            w.message().await?;
            Ok(w)
        }
    })
    .await?;
    let (d, what) = retry("lease with a keep-alive");
    let lease = retry_transient(d, what, || {
        let mut c = client.clone();
        async move {
            let lease = c.lease_grant(60, None).await?;
            let (mut keeper, mut responses) = c.lease_keep_alive(lease.id()).await?;
            keeper.keep_alive().await?;
            responses.message().await?;
            Ok(lease.id())
        }
    })
    .await?;
    for i in 0..100 {
        let (d, what) = retry("put");
        retry_transient(d, what, || {
            let mut c = client.clone();
            let opts = (i == 0).then(|| etcd_client::PutOptions::new().with_lease(lease));
            async move { Ok(c.put(format!("load/{round}/{i}"), "v", opts).await?) }
        })
        .await?;
    }
    let (d, what) = retry("range, txn and delete");
    retry_transient(d, what, || {
        let mut c = client.clone();
        async move {
            c.get("load/", Some(etcd_client::GetOptions::new().with_prefix()))
                .await?;
            c.txn(etcd_client::Txn::new().and_then([etcd_client::TxnOp::get("load/0/0", None)]))
                .await?;
            c.delete(format!("load/{round}/1"), None).await?;
            Ok(())
        }
    })
    .await?;
    // The watch saw the events.
    w.message().await?;
    Ok(())
}

async fn scrapes(c: &Cluster) -> Result<Vec<Scrape>> {
    let mut out = Vec::new();
    for m in &c.members {
        out.push(scrape(m.client_port).await?);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_expose_etcds_metrics_with_sane_values() -> Result<()> {
    // etcd's default timing: six members on two cores keep a leader.
    let etcd = Cluster::start(Kind::Etcd, ClusterOptions::default()).await?;
    let concord = Cluster::start(Kind::Concord, ClusterOptions::default()).await?;
    for c in [&etcd, &concord] {
        c.leader().await?;
        load(c, 0).await?;
    }
    // Peer round trips are measured every few seconds: wait until every member has
    // them, on both clusters (etcd's prober too).
    for c in [&etcd, &concord] {
        wait_until(
            READY_DEADLINE,
            "round trips measured to every peer",
            || async {
                for s in scrapes(c).await? {
                    let n = s
                        .labels
                        .get("etcd_network_peer_round_trip_time_seconds")
                        .map_or(0, |l| l.len());
                    anyhow::ensure!(n > 0, "no round trips yet");
                }
                Ok(())
            },
        )
        .await?;
    }
    let reference = scrapes(&etcd).await?;
    let before = scrapes(&concord).await?;
    let mut problems = Vec::new();
    for name in REQUIRED {
        let want = reference.iter().find(|s| s.labels.contains_key(*name));
        let Some(want) = want else {
            problems.push(format!(
                "{name}: not on any etcd member (the list is wrong)"
            ));
            continue;
        };
        for (i, got) in before.iter().enumerate() {
            match got.labels.get(*name) {
                None => problems.push(format!("{name}: missing on concord member {i}")),
                Some(labels) if labels != &want.labels[*name] => problems.push(format!(
                    "{name}: labels {labels:?} on concord member {i}, etcd has {:?}",
                    want.labels[*name]
                )),
                Some(_) => {}
            }
            if got.types.get(*name) != want.types.get(*name) {
                problems.push(format!(
                    "{name}: type {:?} on concord member {i}, etcd's is {:?}",
                    got.types.get(*name),
                    want.types.get(*name)
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // Exactly one leader, every member with a leader, none a learner.
    let leaders: f64 = before
        .iter()
        .map(|s| s.value("etcd_server_is_leader").unwrap_or(0.0))
        .sum();
    assert_eq!(leaders, 1.0, "is_leader summed over the members");
    for s in &before {
        assert_eq!(s.value("etcd_server_has_leader"), Some(1.0));
        assert_eq!(s.value("etcd_server_is_learner"), Some(0.0));
        assert!(s.sum("etcd_network_active_peers{", "") >= 2.0);
    }
    let ok: f64 = before
        .iter()
        .map(|s| s.sum("grpc_server_handled_total{", "grpc_code=\"OK\""))
        .sum();
    assert!(ok >= 100.0, "{ok} calls handled OK");

    // More load: committed proposals and fsyncs rise on every member.
    load(&concord, 1).await?;
    let fsyncs = "etcd_disk_wal_fsync_duration_seconds_count";
    wait_until(
        READY_DEADLINE,
        "counters rising on every member",
        || async {
            let after = scrapes(&concord).await?;
            for (i, (a, b)) in after.iter().zip(&before).enumerate() {
                let (ca, cb) = (
                    a.value("etcd_server_proposals_committed_total")
                        .unwrap_or(0.0),
                    b.value("etcd_server_proposals_committed_total")
                        .unwrap_or(0.0),
                );
                anyhow::ensure!(ca >= cb + 100.0, "member {i}: committed {cb} -> {ca}");
                let (fa, fb) = (
                    a.value(fsyncs).unwrap_or(0.0),
                    b.value(fsyncs).unwrap_or(0.0),
                );
                anyhow::ensure!(fa > fb, "member {i}: fsyncs {fb} -> {fa}");
                let (pa, pb) = (
                    a.value("etcd_mvcc_put_total").unwrap_or(0.0),
                    b.value("etcd_mvcc_put_total").unwrap_or(0.0),
                );
                anyhow::ensure!(pa >= pb + 100.0, "member {i}: puts {pb} -> {pa}");
            }
            Ok(())
        },
    )
    .await?;

    // The db size gauge is what `endpoint status` reports (both read once the store
    // is quiet; a background flush may move it, so look again until they agree).
    for i in 0..concord.members.len() {
        let c = concord.client(i).await?;
        let port = concord.members[i].client_port;
        wait_until(READY_DEADLINE, "db size gauge equal to Status", || {
            let mut c = c.clone();
            async move {
                let status = c.status().await?;
                let s = scrape(port).await?;
                let gauge = s.value("etcd_mvcc_db_total_size_in_bytes").unwrap_or(-1.0);
                anyhow::ensure!(
                    gauge == status.db_size() as f64,
                    "gauge {gauge}, status {}",
                    status.db_size()
                );
                Ok(())
            }
        })
        .await?;
    }
    Ok(())
}

#[tokio::test]
async fn listen_metrics_urls_serve_metrics_and_health() -> Result<()> {
    let port = concord_integration::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let server =
        Concord::start_with(&["--listen-metrics-urls", &url, "--metrics", "extensive"]).await?;
    let mut c = server.client().await?;
    c.put("k", "v", None).await?;
    let s = scrape(port).await?;
    assert!(s.value("etcd_server_has_leader") == Some(1.0));
    // Extensive metrics add the handling-time histograms.
    assert!(
        s.labels.contains_key("grpc_server_handling_seconds"),
        "no grpc_server_handling_seconds with --metrics extensive"
    );
    let (code, body) = concord_integration::http_get(port, "/health");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"health\":\"true\""), "{body}");
    // Only /metrics and /health there.
    let (code, _) = concord_integration::http_get(port, "/version");
    assert_eq!(code, 404);
    // The client port serves /metrics too, without the extensive set by default.
    let plain = Concord::start().await?;
    let s = scrape(plain.client_port).await?;
    assert!(!s.labels.contains_key("grpc_server_handling_seconds"));
    assert!(s.labels.contains_key("grpc_server_handled_total"));
    Ok(())
}

#[tokio::test]
async fn a_bad_metrics_flag_is_refused() {
    let out = std::process::Command::new(concord_integration::concord_bin())
        .args([
            "--metrics",
            "everything",
            "--data-dir",
            "/nonexistent/never-created",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--metrics"), "{err}");
}
