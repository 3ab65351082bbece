//! RBAC through the `etcd-client` crate against a real `concord`: what a user without
//! the permission cannot read, write, watch or revoke (nested txn ops and `prev_kv`
//! included), admin RPCs as a non-root user, tokens of a deleted user and across a
//! restart, and that no password reaches the data directory or the log.

use std::time::Duration;

use concord_integration::{Concord, curl, retry_transient};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, Error, GetOptions, Permission,
    PutOptions, Txn, TxnOp, WatchOptions,
};
use tonic::Code;

const DEADLINE: Duration = Duration::from_secs(30);
/// Passwords nothing else in the data directory or the log could contain.
const ROOT_PW: &str = "Root-Secret-6f1d2";
const ALICE_PW: &str = "Alice-Secret-93ab7";

async fn connect(c: &Concord, user: Option<(&str, &str)>) -> Client {
    let opts = user.map(|(u, p)| ConnectOptions::new().with_user(u, p));
    retry_transient(DEADLINE, "connecting", || {
        let opts = opts.clone();
        let ep = c.endpoint();
        async move { Ok(Client::connect([ep], opts).await?) }
    })
    .await
    .unwrap()
}

/// The gRPC status of a refused call.
fn status(e: Error) -> (Code, String) {
    match e {
        Error::GRpcStatus(s) => (s.code(), s.message().to_string()),
        other => panic!("not a gRPC status: {other:?}"),
    }
}

fn denied<T: std::fmt::Debug>(r: Result<T, Error>) {
    let e = r.expect_err("the call is refused");
    assert_eq!(
        status(e),
        (
            Code::PermissionDenied,
            "etcdserver: permission denied".into()
        )
    );
}

/// root and alice; alice may read and write `a`..`m` and read `/pub/`.
async fn setup(c: &Concord) -> Client {
    let mut admin = connect(c, None).await;
    admin.user_add("root", ROOT_PW, None).await.unwrap();
    admin.user_add("alice", ALICE_PW, None).await.unwrap();
    admin.role_add("root").await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.role_add("rw").await.unwrap();
    admin
        .role_grant_permission("rw", Permission::read_write("a").with_range_end("m"))
        .await
        .unwrap();
    admin
        .role_grant_permission("rw", Permission::read("/pub/").with_prefix())
        .await
        .unwrap();
    admin.user_grant_role("alice", "rw").await.unwrap();
    admin.put("/pub/x", "1", None).await.unwrap();
    admin.put("secret", "s1", None).await.unwrap();
    admin.auth_enable().await.unwrap();
    connect(c, Some(("root", ROOT_PW))).await
}

#[tokio::test]
async fn a_user_gets_only_what_its_roles_grant() {
    let c = Concord::start_with(&["--bcrypt-cost=4"]).await.unwrap();
    let mut root = setup(&c).await;
    let mut alice = connect(&c, Some(("alice", ALICE_PW))).await;

    // Without credentials.
    let mut anon = connect(&c, None).await;
    assert_eq!(
        status(anon.get("b", None).await.unwrap_err()),
        (
            Code::InvalidArgument,
            "etcdserver: user name is empty".into()
        )
    );

    // Reads and writes inside and outside the grant.
    alice.put("b", "1", None).await.unwrap();
    assert_eq!(alice.get("b", None).await.unwrap().kvs()[0].value(), b"1");
    alice
        .get("/pub/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    denied(alice.get("secret", None).await);
    denied(alice.put("secret", "mine", None).await);
    denied(alice.put("/pub/y", "1", None).await);
    denied(
        alice
            .get("a", Some(GetOptions::new().with_from_key()))
            .await,
    );
    denied(
        alice
            .delete("a", Some(DeleteOptions::new().with_range("z")))
            .await,
    );

    // A txn: a compare, an op in the branch that does not run, a nested op.
    let cmp_secret = Txn::new().when([Compare::value("secret", CompareOp::Equal, "s1")]);
    denied(alice.txn(cmp_secret).await);
    let other_branch = Txn::new()
        .when([Compare::version("b", CompareOp::Greater, 0)])
        .and_then([TxnOp::put("c", "1", None)])
        .or_else([TxnOp::get("secret", None)]);
    denied(alice.txn(other_branch).await);
    let nested = Txn::new().and_then([TxnOp::txn(Txn::new().and_then([TxnOp::txn(
        Txn::new().and_then([TxnOp::put("secret", "nested", None)]),
    )]))]);
    denied(alice.txn(nested).await);
    // prev_kv of a key alice may write but not read.
    root.role_add("w").await.unwrap();
    root.role_grant_permission("w", Permission::write("wo"))
        .await
        .unwrap();
    root.user_grant_role("alice", "w").await.unwrap();
    alice.put("wo", "1", None).await.unwrap();
    denied(
        alice
            .put("wo", "2", Some(PutOptions::new().with_prev_key()))
            .await,
    );
    let txn_prev = Txn::new().and_then([TxnOp::put(
        "wo",
        "3",
        Some(PutOptions::new().with_prev_key()),
    )]);
    denied(alice.txn(txn_prev).await);
    assert_eq!(
        root.get("secret", None).await.unwrap().kvs()[0].value(),
        b"s1"
    );
    assert_eq!(root.get("wo", None).await.unwrap().kvs()[0].value(), b"1");

    // Watches: outside the grant, and from a key on (checked as the whole range).
    for opts in [None, Some(WatchOptions::new().with_from_key())] {
        let key = if opts.is_none() { "secret" } else { "b" };
        let mut stream = alice.watch(key, opts).await.unwrap();
        let r = stream.message().await.unwrap().expect("a refusal");
        assert!(r.created() && r.canceled(), "{r:?}");
        assert_eq!(r.watch_id(), -1);
        assert_eq!(
            r.cancel_reason(),
            "rpc error: code = PermissionDenied desc = etcdserver: permission denied"
        );
    }
    let mut stream = alice
        .watch("b", Some(WatchOptions::new().with_prev_key()))
        .await
        .unwrap();
    assert!(stream.message().await.unwrap().unwrap().created());
    root.put("b", "2", None).await.unwrap();
    let ev = stream.message().await.unwrap().unwrap();
    assert_eq!(ev.events()[0].kv().unwrap().value(), b"2");
    assert_eq!(ev.events()[0].prev_kv().unwrap().value(), b"1");

    // A lease holding a key alice may not write: she can neither revoke it nor put
    // a key of her own on it; her own lease she can revoke.
    let lease = root.lease_grant(600, None).await.unwrap().id();
    root.put(
        "secret",
        "leased",
        Some(PutOptions::new().with_lease(lease)),
    )
    .await
    .unwrap();
    denied(alice.lease_revoke(lease).await);
    denied(
        alice
            .put("c", "1", Some(PutOptions::new().with_lease(lease)))
            .await,
    );
    denied(
        alice
            .lease_time_to_live(
                lease,
                Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys()),
            )
            .await,
    );
    let mine = alice.lease_grant(600, None).await.unwrap().id();
    alice
        .put("c", "1", Some(PutOptions::new().with_lease(mine)))
        .await
        .unwrap();
    alice.lease_revoke(mine).await.unwrap();
    assert!(root.get("c", None).await.unwrap().kvs().is_empty());
    root.lease_revoke(lease).await.unwrap();

    // Admin RPCs are root's.
    denied(alice.compact(1, None).await);
    denied(alice.user_list().await);
    denied(alice.role_add("mine").await);
    denied(alice.auth_disable().await);
    denied(alice.member_add(["http://127.0.0.1:1"], None).await);
    let (code, text) = status(alice.defragment().await.unwrap_err());
    assert_eq!(
        (code, text.as_str()),
        (Code::Unknown, "auth: permission denied")
    );
    let (code, _) = status(alice.snapshot().await.err().unwrap());
    assert_eq!(code, Code::Unknown);
    let (code, _) = status(alice.hash_kv(0).await.unwrap_err());
    assert_eq!(code, Code::Unknown);
    root.compact(2, None).await.unwrap();
    root.defragment().await.unwrap();
    alice.status().await.unwrap();
    alice.user_get("alice").await.unwrap();
    denied(alice.user_get("root").await);

    // Lock and Election run as their caller (their errors are `Unknown`, as etcd's).
    let (code, text) = status(alice.lock("secret-lock", None).await.unwrap_err());
    assert_eq!(
        (code, text.as_str()),
        (Code::Unknown, "etcdserver: permission denied")
    );
    alice.lock("b-lock", None).await.unwrap();
}

#[tokio::test]
async fn tokens_die_with_their_user_and_a_restart_and_no_password_is_kept() {
    let mut c = Concord::start_with(&["--bcrypt-cost=4"]).await.unwrap();
    let mut root = setup(&c).await;
    let mut alice = connect(&c, Some(("alice", ALICE_PW))).await;
    alice.put("b", "1", None).await.unwrap();

    // A token of a deleted user is no token.
    let authenticate = format!("{}/v3/auth/authenticate", c.endpoint());
    let login = format!(r#"{{"name":"alice","password":"{ALICE_PW}"}}"#);
    let a = curl::call("POST", &authenticate, Some(login.as_bytes()), &[]).unwrap();
    assert_eq!(a.status, 200, "{a:?}");
    let token = a.body["token"].as_str().unwrap().to_string();
    root.user_delete("alice").await.unwrap();
    // Over the HTTP/JSON API, the token in `Authorization` as etcd's gateway takes it.
    let range = format!("{}/v3/kv/range", c.endpoint());
    let header = format!("Authorization: {token}");
    let a = curl::call("POST", &range, Some(br#"{"key":"Yg=="}"#), &[&header]).unwrap();
    assert_eq!(a.status, 401, "{a:?}");
    assert_eq!(a.body["message"], "etcdserver: invalid auth token");
    assert_eq!(a.body["code"], 16);
    let a = curl::call("POST", &authenticate, Some(login.as_bytes()), &[]).unwrap();
    assert_eq!((a.status, a.body["code"].as_i64()), (400, Some(3)), "{a:?}");
    assert_eq!(
        a.body["message"],
        "etcdserver: authentication failed, invalid user ID or password"
    );

    // The auth store survives a restart; the client signs in again.
    c.restart().await.unwrap();
    let mut root = connect(&c, Some(("root", ROOT_PW))).await;
    let users = root.user_list().await.unwrap();
    assert_eq!(users.users(), ["root"]);
    let mut anon = connect(&c, None).await;
    assert_eq!(
        status(anon.get("b", None).await.unwrap_err()).0,
        Code::InvalidArgument
    );

    // No plaintext password anywhere in the data directory or the logs (both runs'),
    // which sit beside it.
    let dir = c.dir.parent().expect("the test's directory").to_path_buf();
    let files = grep_dir(&dir, b"");
    assert!(
        files
            .iter()
            .any(|f| f.extension().is_some_and(|e| e == "log"))
    );
    assert!(
        files
            .iter()
            .any(|f| f.extension().is_some_and(|e| e == "wal"))
    );
    for pw in [ROOT_PW, ALICE_PW] {
        let found = grep_dir(&dir, pw.as_bytes());
        assert!(found.is_empty(), "{pw} found in {found:?}");
    }
}

/// Files under `dir` whose bytes contain `needle` (every file for an empty one).
fn grep_dir(dir: &std::path::Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if let Ok(bytes) = std::fs::read(&p)
                && (needle.is_empty() || bytes.windows(needle.len()).any(|w| w == needle))
            {
                found.push(p);
            }
        }
    }
    found
}
