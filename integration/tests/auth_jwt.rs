//! JWT auth tokens (`--auth-token jwt,...`) on a 3-member cluster: a token issued by
//! one member works on every member, across a leader change and a restart; it carries
//! etcd's claims; any later change of the auth store makes it stale (`revision of auth
//! store is old`), the token of a deleted user included; a forged one is refused.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use concord_integration::cluster::{Cluster, ClusterOptions, Kind};
use concord_integration::curl::{self, base64, decode_base64};
use concord_integration::{retry_transient, wait_until};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(30);

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl runs (apt-get install openssl)");
    assert!(out.status.success(), "openssl {args:?}: {out:?}");
}

/// An RSA key pair in PEM files under `dir`: (public, private).
fn rsa_keys(dir: &Path) -> (String, String) {
    let private = dir.join("jwt.key").display().to_string();
    let public = dir.join("jwt.pub").display().to_string();
    openssl(&["genrsa", "-out", &private, "2048"]);
    openssl(&["rsa", "-in", &private, "-pubout", "-out", &public]);
    (public, private)
}

fn post(endpoint: &str, path: &str, body: Value, token: Option<&str>) -> curl::Answer {
    let header = token.map(|t| format!("Authorization: {t}"));
    let headers: Vec<&str> = header.iter().map(String::as_str).collect();
    curl::call(
        "POST",
        &format!("{endpoint}{path}"),
        Some(body.to_string().as_bytes()),
        &headers,
    )
    .expect("curl runs")
}

/// A 200 answer, retried while the cluster settles (no leader for a moment).
async fn ok(endpoint: &str, path: &str, body: Value, token: Option<&str>) -> Value {
    retry_transient(DEADLINE, path, || {
        let body = body.clone();
        async move {
            let a = post(endpoint, path, body, token);
            anyhow::ensure!(a.status == 200, "{path}: {a:?}");
            Ok(a.body)
        }
    })
    .await
    .unwrap()
}

fn claims(token: &str) -> Value {
    let part = token.split('.').nth(1).expect("a JWT has three parts");
    let mut b64 = part.replace('-', "+").replace('_', "/");
    while !b64.len().is_multiple_of(4) {
        b64.push('=');
    }
    serde_json::from_slice(&decode_base64(&b64).expect("base64 claims")).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn jwt_tokens_work_on_every_member_across_leader_changes_and_restarts() {
    let keys = tempfile::tempdir().unwrap();
    let (public, private) = rsa_keys(keys.path());
    let mut opts = ClusterOptions::fast();
    opts.extra.extend([
        "--bcrypt-cost=4".to_string(),
        format!("--auth-token=jwt,pub-key={public},priv-key={private},sign-method=RS256,ttl=10m"),
    ]);
    let mut cluster = Cluster::start(Kind::Concord, opts).await.unwrap();
    let eps = cluster.endpoints();
    let e0 = eps[0].clone();
    for (path, body) in [
        (
            "/v3/auth/user/add",
            json!({"name": "root", "password": "rootpw"}),
        ),
        (
            "/v3/auth/user/add",
            json!({"name": "alice", "password": "pw"}),
        ),
        ("/v3/auth/role/add", json!({"name": "root"})),
        (
            "/v3/auth/user/grant",
            json!({"user": "root", "role": "root"}),
        ),
        ("/v3/auth/role/add", json!({"name": "rw"})),
        (
            "/v3/auth/role/grant",
            json!({"name": "rw", "perm": {"permType": "READWRITE", "key": base64(b"k"), "range_end": base64(b"l")}}),
        ),
        (
            "/v3/auth/user/grant",
            json!({"user": "alice", "role": "rw"}),
        ),
        ("/v3/auth/enable", json!({})),
    ] {
        ok(&e0, path, body, None).await;
    }
    let login = json!({"name": "alice", "password": "pw"});
    let token = ok(&e0, "/v3/auth/authenticate", login.clone(), None).await["token"]
        .as_str()
        .unwrap()
        .to_string();
    let c = claims(&token);
    assert_eq!(c["username"], "alice");
    let status = ok(&e0, "/v3/auth/status", json!({}), None).await;
    assert_eq!(
        c["revision"].as_u64().unwrap().to_string(),
        status["authRevision"].as_str().unwrap()
    );
    assert!(c["exp"].as_u64().unwrap() > 0);

    let put = |v: &str| json!({"key": base64(b"k1"), "value": base64(v.as_bytes())});
    // Every member takes the token another member issued.
    for (i, ep) in eps.iter().enumerate() {
        ok(
            ep,
            "/v3/kv/put",
            put(&format!("from n{}", i + 1)),
            Some(&token),
        )
        .await;
    }
    let denied = post(
        &e0,
        "/v3/kv/put",
        json!({"key": base64(b"z")}),
        Some(&token),
    );
    assert_eq!(
        (denied.status, denied.body["code"].as_i64()),
        (403, Some(7))
    );

    // A leader change and a restart change nothing for the token.
    cluster.change_leader().await.unwrap();
    for ep in &eps {
        ok(
            ep,
            "/v3/kv/put",
            put("after the leader change"),
            Some(&token),
        )
        .await;
    }
    cluster.restart(1).await.unwrap();
    ok(&eps[1], "/v3/kv/put", put("after a restart"), Some(&token)).await;

    // A forged token (another key) is no token.
    let other = tempfile::tempdir().unwrap();
    let (_, other_private) = rsa_keys(other.path());
    let forged = {
        let parts: Vec<&str> = token.split('.').collect();
        // The same header and claims, signed by someone else: sign with openssl.
        let input = format!("{}.{}", parts[0], parts[1]);
        let input_file = other.path().join("input");
        std::fs::write(&input_file, &input).unwrap();
        let sig_file = other.path().join("sig");
        openssl(&[
            "dgst",
            "-sha256",
            "-sign",
            &other_private,
            "-out",
            &sig_file.display().to_string(),
            &input_file.display().to_string(),
        ]);
        let sig = base64(&std::fs::read(&sig_file).unwrap())
            .replace('+', "-")
            .replace('/', "_")
            .trim_end_matches('=')
            .to_string();
        format!("{input}.{sig}")
    };
    let a = post(&e0, "/v3/kv/put", put("forged"), Some(&forged));
    assert_eq!(
        (a.status, a.body["code"].as_i64()),
        (401, Some(16)),
        "{a:?}"
    );

    // Any change of the auth store makes the token stale; a new one works.
    let root = ok(
        &e0,
        "/v3/auth/authenticate",
        json!({"name": "root", "password": "rootpw"}),
        None,
    )
    .await["token"]
        .as_str()
        .unwrap()
        .to_string();
    ok(&e0, "/v3/auth/role/add", json!({"name": "r2"}), Some(&root)).await;
    wait_until(DEADLINE, "a stale token refused", || {
        let (token, e0) = (token.clone(), e0.clone());
        async move {
            let a = post(&e0, "/v3/kv/put", put("stale"), Some(&token));
            anyhow::ensure!(a.status == 400, "{a:?}");
            anyhow::ensure!(
                a.body["message"] == "etcdserver: revision of auth store is old",
                "{a:?}"
            );
            Ok(())
        }
    })
    .await
    .unwrap();
    let fresh = ok(&e0, "/v3/auth/authenticate", login, None).await["token"]
        .as_str()
        .unwrap()
        .to_string();
    ok(&eps[2], "/v3/kv/put", put("fresh"), Some(&fresh)).await;

    // A deleted user's token: stale with the deletion, and no new one is issued.
    ok(
        &e0,
        "/v3/auth/user/delete",
        json!({"name": "alice"}),
        Some(&root),
    )
    .await;
    let a = post(&e0, "/v3/kv/put", put("deleted"), Some(&fresh));
    assert_eq!((a.status, a.body["code"].as_i64()), (400, Some(3)), "{a:?}");
    let a = post(
        &e0,
        "/v3/auth/authenticate",
        json!({"name": "alice", "password": "pw"}),
        None,
    );
    assert_eq!(a.status, 400, "{a:?}");
    // Root's own token went stale with the deletion too: it reads with a new one.
    let root = ok(
        &e0,
        "/v3/auth/authenticate",
        json!({"name": "root", "password": "rootpw"}),
        None,
    )
    .await["token"]
        .as_str()
        .unwrap()
        .to_string();
    let got = ok(
        &eps[2],
        "/v3/kv/range",
        json!({"key": base64(b"k1")}),
        Some(&root),
    )
    .await;
    assert_eq!(got["kvs"][0]["value"], base64(b"fresh"));
}
