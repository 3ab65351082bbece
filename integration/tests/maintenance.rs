//! Maintenance, Cluster, health and the HTTP endpoints, through real clients.

use concord_integration::{Concord, http_get};
use etcd_client::AlarmAction;

#[tokio::test]
async fn status_alarms_members_and_health() {
    let mut s = Concord::start().await.unwrap();
    let mut c = s.client().await.unwrap();
    c.put("a", "1", None).await.unwrap();

    let st = c.status().await.unwrap();
    let h = st.header().unwrap();
    assert_eq!(st.leader(), h.member_id(), "a single member leads itself");
    assert_eq!(h.revision(), 2);
    assert_eq!(
        st.raft_term(),
        2,
        "first start: term 2, as a fresh etcd member"
    );
    assert!(st.raft_index() >= 1 && st.raft_index() == st.raft_applied_index());
    assert!(st.db_size() > 0);
    assert!(st.version().starts_with("3."));

    let alarms = c
        .alarm(AlarmAction::Get, etcd_client::AlarmType::None, None)
        .await
        .unwrap();
    assert!(alarms.alarms().is_empty());

    let members = c.member_list().await.unwrap();
    assert_eq!(members.members().len(), 1);
    let m = &members.members()[0];
    assert_eq!((m.id(), m.name()), (h.member_id(), "n1"));
    assert_eq!(m.client_urls(), [s.endpoint()]);
    assert!(!m.is_learner());

    let (code, body) = http_get(s.client_port, "/health");
    assert_eq!(code, 200);
    assert!(body.contains(r#""health":"true""#), "{body}");
    let (code, body) = http_get(s.client_port, "/version");
    assert_eq!(code, 200);
    assert!(body.contains("etcdserver"), "{body}");
    assert_eq!(http_get(s.client_port, "/livez").0, 200);
    assert_eq!(http_get(s.client_port, "/readyz").0, 200);
    assert_eq!(http_get(s.client_port, "/nope").0, 404);

    // Identity is stable across restarts; the term moves on like a re-elected leader's.
    let (cluster, member) = (h.cluster_id(), h.member_id());
    s.restart().await.unwrap();
    let mut c = s.client().await.unwrap();
    let st = c.status().await.unwrap();
    let h = st.header().unwrap();
    assert_eq!((h.cluster_id(), h.member_id()), (cluster, member));
    assert_eq!(st.raft_term(), 3);
    assert_eq!(h.revision(), 2);
}

#[tokio::test]
async fn the_auth_service_answers_with_etcds_errors_not_a_hang() {
    let s = Concord::start().await.unwrap();
    let mut c = s.client().await.unwrap();
    let e = c.auth_enable().await.unwrap_err();
    let etcd_client::Error::GRpcStatus(st) = e else {
        panic!("{e:?}")
    };
    assert_eq!(
        (st.code(), st.message()),
        (
            tonic::Code::FailedPrecondition,
            "etcdserver: root user does not exist"
        )
    );
}

#[tokio::test]
async fn joining_a_cluster_nobody_answers_for_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(concord_integration::concord_bin())
        .arg("--data-dir")
        .arg(dir.path())
        .args([
            "--name",
            "a",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:1",
            "--listen-peer-urls",
            "http://127.0.0.1:0",
            "--listen-client-urls",
            "http://127.0.0.1:0",
            "--initial-cluster",
            "a=http://127.0.0.1:1,b=http://127.0.0.1:2",
            "--initial-cluster-state",
            "existing",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("could not retrieve the cluster's members from http://127.0.0.1:2"),
        "{err}"
    );
}

#[tokio::test]
async fn settings_from_environment_and_config_file_apply() {
    use etcd_client::{Txn, TxnOp};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("concord.toml");
    std::fs::write(&file, "max_txn_ops = 3\nmax_request_bytes = 1000\n").unwrap();
    // The environment overrides the file; flags (none here for these) would win over both.
    let s = Concord::start_configured(
        &["--config-file", file.to_str().unwrap()],
        &[("CONCORD_MAX_TXN_OPS", "2")],
    )
    .await
    .unwrap();
    let mut c = s.client().await.unwrap();
    let three: Vec<TxnOp> = (0..3)
        .map(|i| TxnOp::put(format!("k{i}"), "v", None))
        .collect();
    let e = c.txn(Txn::new().and_then(three)).await.unwrap_err();
    let etcd_client::Error::GRpcStatus(st) = e else {
        panic!("{e:?}")
    };
    assert_eq!(
        st.message(),
        "etcdserver: too many operations in txn request"
    );
    let two: Vec<TxnOp> = (0..2)
        .map(|i| TxnOp::put(format!("k{i}"), "v", None))
        .collect();
    c.txn(Txn::new().and_then(two)).await.unwrap();
    let e = c.put("big", vec![b'x'; 1001], None).await.unwrap_err();
    let etcd_client::Error::GRpcStatus(st) = e else {
        panic!("{e:?}")
    };
    assert_eq!(st.message(), "etcdserver: request is too large");
}
