//! TLS and listener hardening, black-box against the real `concord` binary: etcdctl,
//! curl and `etcd-client` over https; refusals (plain text, no / foreign / expired /
//! revoked client certificates, a handshake that never finishes) with the server still
//! serving; certificate and CA rotation under a running writer; a 3-member cluster with
//! peer TLS and `--peer-client-cert-auth` and a member with a foreign peer certificate;
//! 10,000 watch streams on one connection; a ping flood answered with GOAWAY.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use concord_integration::tlsutil::{
    Ca, ClientTls, TlsMember, connect_tls, etcdctl_tls, handshake, replace, write,
};
use concord_integration::{Concord, free_port, is_transient, wait_until};

fn s(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

async fn good_client_works(m: &TlsMember, tls: &ClientTls, key: &str) -> Result<()> {
    let mut c = connect_tls(&m.client_url(), tls).await?;
    c.put(key, "v", None).await?;
    let r = c.get(key, None).await?;
    anyhow::ensure!(r.kvs().len() == 1, "{key} not read back");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn https_clients_and_refusals() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let mut ca = Ca::new("test-ca");
    let mut other = Ca::new("other-ca");
    let server = ca.issue("localhost", false);
    let client = ca.issue("alice", false);
    let expired = ca.issue("old", true);
    let revoked = ca.issue("mallory", false);
    let foreign = other.issue("eve", false);
    let ca_file = write(d, "ca.pem", &ca.cert_pem);
    let crl = write(d, "crl.pem", &ca.crl(&[revoked.serial]));
    let cert = write(d, "server.pem", &server.cert_pem);
    let key = write(d, "server.key", &server.key_pem);
    let ccert = write(d, "client.pem", &client.cert_pem);
    let ckey = write(d, "client.key", &client.key_pem);
    let good = ClientTls {
        ca_pem: ca.cert_pem.clone(),
        identity: Some(client.clone()),
    };
    let m = TlsMember::start_single(
        d,
        &s(&[
            "--cert-file",
            &p(&cert),
            "--key-file",
            &p(&key),
            "--trusted-ca-file",
            &p(&ca_file),
            "--client-cert-auth",
            "--client-crl-file",
            &p(&crl),
        ]),
        &good,
    )
    .await?;
    let url = m.client_url();

    // etcdctl with a client certificate.
    let out = etcdctl_tls(&url, &ca_file, Some((&ccert, &ckey)), &["put", "k1", "v1"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = etcdctl_tls(&url, &ca_file, Some((&ccert, &ckey)), &["get", "k1"])?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "k1\nv1\n");
    // curl to the JSON gateway and /health on the same TLS port.
    let curl = |path: &str, body: Option<&str>| {
        let mut c = std::process::Command::new("curl");
        c.args(["-sS", "--max-time", "5", "--cacert"])
            .arg(&ca_file)
            .arg("--cert")
            .arg(&ccert)
            .arg("--key")
            .arg(&ckey);
        if let Some(b) = body {
            c.args(["-d", b]);
        }
        c.arg(format!("{url}{path}")).output()
    };
    let out = curl("/v3/kv/range", Some(r#"{"key":"azE="}"#))?;
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(body.contains(r#""value":"djE=""#), "{body}");
    let out = curl("/health", None)?;
    assert!(String::from_utf8_lossy(&out.stdout).contains(r#""health":"true""#));

    // Refusals, each followed by a good client.
    let out = etcdctl_tls(&url, &ca_file, None, &["get", "k1"])?;
    assert!(!out.status.success(), "no client certificate accepted");
    good_client_works(&m, &good, "after-no-cert").await?;
    for (what, leaf) in [
        ("foreign CA", &foreign),
        ("expired", &expired),
        ("revoked", &revoked),
    ] {
        let e = handshake(m.client_addr(), &ca.cert_pem, Some(leaf)).await;
        assert!(e.is_err(), "{what} certificate accepted");
        eprintln!("{what}: {:#}", e.unwrap_err());
        good_client_works(&m, &good, &format!("after-{}", what.replace(' ', "-"))).await?;
    }
    assert!(
        handshake(m.client_addr(), &ca.cert_pem, Some(&client))
            .await
            .is_ok()
    );
    // Plain text on the TLS port: Go's answer, then closed.
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "5"])
        .arg(format!("http://127.0.0.1:{}/health", m.client_port))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Client sent an HTTP request to an HTTPS server"),
        "{text}"
    );
    good_client_works(&m, &good, "after-plain").await?;
    // Handshakes that never finish: nothing sent, and half a ClientHello.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = Instant::now();
    let mut silent = tokio::net::TcpStream::connect(m.client_addr()).await?;
    let mut partial = tokio::net::TcpStream::connect(m.client_addr()).await?;
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
        .await?;
    for conn in [&mut silent, &mut partial] {
        let mut b = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(15), conn.read(&mut b))
            .await
            .expect("the server never closed an unfinished handshake")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(12),
        "{took:?}"
    );
    good_client_works(&m, &good, "after-slow").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn certificate_and_ca_rotation_under_a_writer_loses_no_write() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let mut ca1 = Ca::new("ca-one");
    let mut ca2 = Ca::new("ca-two");
    let s1 = ca1.issue("localhost", false);
    let cert = write(d, "server.pem", &s1.cert_pem);
    let key = write(d, "server.key", &s1.key_pem);
    let ca_file = write(d, "ca.pem", &ca1.cert_pem);
    let c1 = ca1.issue("writer", false);
    let c2 = ca2.issue("writer2", false);
    // Clients trust both CAs (the new one is rolled out to clients first).
    let both = format!("{}{}", ca1.cert_pem, ca2.cert_pem);
    let writer_tls = ClientTls {
        ca_pem: both.clone(),
        identity: Some(c1.clone()),
    };
    let m = TlsMember::start_single(
        d,
        &s(&[
            "--cert-file",
            &p(&cert),
            "--key-file",
            &p(&key),
            "--trusted-ca-file",
            &p(&ca_file),
        ]),
        &writer_tls,
    )
    .await?;
    let url = m.client_url();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let url = url.clone();
        let tls = writer_tls.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut client: Option<etcd_client::Client> = None;
            let mut i = 0u64;
            let end = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Acquire) && Instant::now() < end {
                let c = match &mut client {
                    Some(c) => c,
                    None => match connect_tls(&url, &tls).await {
                        Ok(c) => client.insert(c),
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let k = format!("w{i:06}");
                match c.put(k.clone(), "x", None).await {
                    Ok(_) => {
                        acked.push(k);
                        i += 1;
                    }
                    Err(e) => {
                        assert!(is_transient(&e.into()), "non-transient write error");
                        client = None;
                    }
                }
            }
            acked
        })
    };
    let wait_writes = |n: usize| {
        let url = url.clone();
        let tls = writer_tls.clone();
        async move {
            wait_until(Duration::from_secs(30), "writes", || async {
                let mut c = connect_tls(&url, &tls).await?;
                let r = c
                    .get(
                        "w",
                        Some(
                            etcd_client::GetOptions::new()
                                .with_prefix()
                                .with_count_only(),
                        ),
                    )
                    .await?;
                anyhow::ensure!(r.count() as usize >= n, "only {} writes", r.count());
                Ok(())
            })
            .await
        }
    };
    wait_writes(20).await?;
    // 1. A new server certificate and key from the same CA.
    let s2 = ca1.issue("localhost", false);
    replace(&cert, &s2.cert_pem);
    replace(&key, &s2.key_pem);
    let want = rustls_pem_der(&s2.cert_pem);
    wait_until(Duration::from_secs(10), "the new certificate", || async {
        let got = handshake(m.client_addr(), &both, Some(&c1)).await?;
        anyhow::ensure!(got == want, "still the old certificate");
        Ok(())
    })
    .await?;
    wait_writes(60).await?;
    // 2. A new CA: the server certificate from CA two, client certificates of both CAs
    //    accepted.
    let s3 = ca2.issue("localhost", false);
    replace(&ca_file, &both);
    replace(&cert, &s3.cert_pem);
    replace(&key, &s3.key_pem);
    let want = rustls_pem_der(&s3.cert_pem);
    wait_until(Duration::from_secs(10), "the new CA", || async {
        let got = handshake(m.client_addr(), &ca2.cert_pem, Some(&c2)).await?;
        anyhow::ensure!(got == want, "still the old certificate");
        Ok(())
    })
    .await?;
    // A broken file keeps the current material.
    replace(&cert, "not a certificate");
    assert_eq!(
        handshake(m.client_addr(), &ca2.cert_pem, Some(&c2)).await?,
        want
    );
    replace(&cert, &s3.cert_pem);
    wait_writes(100).await?;
    stop.store(true, Ordering::Release);
    let acked = writer.await?;
    let mut c = connect_tls(&url, &writer_tls).await?;
    for k in &acked {
        assert_eq!(
            c.get(k.as_str(), None).await?.kvs().len(),
            1,
            "acknowledged {k} lost"
        );
    }
    eprintln!("{} acknowledged writes all readable", acked.len());
    Ok(())
}

fn rustls_pem_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_members_with_peer_tls_and_a_foreign_member_kept_out() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let mut ca = Ca::new("peer-ca");
    let mut other = Ca::new("rogue-ca");
    let client_leaf = ca.issue("localhost", false);
    let ccert = write(d, "client.pem", &client_leaf.cert_pem);
    let ckey = write(d, "client.key", &client_leaf.key_pem);
    let ca_file = write(d, "ca.pem", &ca.cert_pem);
    let tls = ClientTls {
        ca_pem: ca.cert_pem.clone(),
        identity: None,
    };
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let cluster = ports
        .iter()
        .enumerate()
        .map(|(i, (_, pp))| format!("m{i}=https://127.0.0.1:{pp}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut members = Vec::new();
    for (i, (cp, pp)) in ports.iter().enumerate() {
        // Member 2's peer certificate comes from another CA.
        let leaf = if i == 2 {
            other.issue("localhost", false)
        } else {
            ca.issue("localhost", false)
        };
        let pc = write(d, &format!("peer{i}.pem"), &leaf.cert_pem);
        let pk = write(d, &format!("peer{i}.key"), &leaf.key_pem);
        let args = s(&[
            "--cert-file",
            &p(&ccert),
            "--key-file",
            &p(&ckey),
            "--peer-cert-file",
            &p(&pc),
            "--peer-key-file",
            &p(&pk),
            "--peer-trusted-ca-file",
            &p(&ca_file),
            "--peer-client-cert-auth",
            "--initial-cluster-token",
            "tls-cluster",
        ]);
        members.push(TlsMember::spawn(
            d,
            &format!("m{i}"),
            *cp,
            *pp,
            "https",
            &cluster,
            &args,
        )?);
    }
    members[0].wait_ready(&tls).await?;
    members[1].wait_ready(&tls).await?;
    let mut c0 = connect_tls(&members[0].client_url(), &tls).await?;
    concord_integration::retry_transient(Duration::from_secs(30), "put", || {
        let mut c = c0.clone();
        async move {
            c.put("peer-tls", "works", None).await?;
            Ok(())
        }
    })
    .await?;
    let mut c1 = connect_tls(&members[1].client_url(), &tls).await?;
    let r = c1.get("peer-tls", None).await?;
    assert_eq!(r.kvs()[0].value(), b"works");
    // The foreign member never gets the write, and its peers refuse it.
    let mut c2 = connect_tls(&members[2].client_url(), &tls).await;
    let got = match &mut c2 {
        Ok(c) => c
            .get(
                "peer-tls",
                Some(etcd_client::GetOptions::new().with_serializable()),
            )
            .await
            .map(|r| r.kvs().len())
            .unwrap_or(0),
        Err(_) => 0,
    };
    assert_eq!(
        got, 0,
        "the member with a foreign peer certificate got data"
    );
    wait_until(
        Duration::from_secs(20),
        "a refused peer connection",
        || async {
            let logs = members[0].proc.log() + &members[1].proc.log();
            anyhow::ensure!(
                logs.contains("rejected a peer connection"),
                "no refusal logged"
            );
            Ok(())
        },
    )
    .await?;
    c0.put("still", "serving", None).await?;
    drop(c0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_watch_streams_on_one_connection() -> Result<()> {
    let server = Concord::start().await?;
    let client = server.client().await?;
    let n = 10_000;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let mut c = client.clone();
        tasks.spawn(async move {
            let mut w = c.watch(format!("watch-{i}"), None).await?;
            let created = w.message().await?.is_some_and(|r| r.created());
            assert!(created, "watch {i}: no created response");
            Ok::<_, etcd_client::Error>(w)
        });
    }
    let mut open = Vec::with_capacity(n);
    let all = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(r) = tasks.join_next().await {
            open.push(r??);
        }
        anyhow::Ok(())
    })
    .await;
    assert!(
        all.is_ok(),
        "only {} of {n} watch streams were created",
        open.len()
    );
    all.unwrap()?;
    assert_eq!(open.len(), n);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_pinging_too_often_gets_goaway() -> Result<()> {
    let server = Concord::start_with(&["--grpc-keepalive-min-time", "5s"]).await?;
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", server.client_port)).await?;
    let (_send, mut conn) = h2::client::handshake(tcp).await?;
    let mut pings = conn.ping_pong().expect("ping_pong");
    let driver = tokio::spawn(conn);
    let mut answered = 0;
    for _ in 0..10 {
        match tokio::time::timeout(Duration::from_secs(5), pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => answered += 1,
            _ => break,
        }
    }
    let r = tokio::time::timeout(Duration::from_secs(5), driver).await??;
    let e = r.expect_err("the connection survived a ping flood");
    assert_eq!(e.reason(), Some(h2::Reason::ENHANCE_YOUR_CALM), "{e:?}");
    assert!(answered <= 3, "{answered} pings answered");
    // The server still serves.
    server
        .client()
        .await?
        .put("after-pings", "ok", None)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_client_cert_auth_a_certificates_cn_is_the_user() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let mut ca = Ca::new("test-ca");
    let server = ca.issue("localhost", false);
    let root = ClientTls {
        ca_pem: ca.cert_pem.clone(),
        identity: Some(ca.issue("root", false)),
    };
    let alice = ClientTls {
        ca_pem: ca.cert_pem.clone(),
        identity: Some(ca.issue("alice", false)),
    };
    let ca_file = write(d, "ca.pem", &ca.cert_pem);
    let cert = write(d, "server.pem", &server.cert_pem);
    let key = write(d, "server.key", &server.key_pem);
    let m = TlsMember::start_single(
        d,
        &s(&[
            "--cert-file",
            &p(&cert),
            "--key-file",
            &p(&key),
            "--trusted-ca-file",
            &p(&ca_file),
            "--client-cert-auth",
            "--bcrypt-cost=4",
        ]),
        &root,
    )
    .await?;
    let mut r = connect_tls(&m.client_url(), &root).await?;
    r.user_add("root", "rootpw", None).await?;
    r.role_add("root").await?;
    r.user_grant_role("root", "root").await?;
    r.user_add(
        "alice",
        "",
        Some(etcd_client::UserAddOptions::new().with_no_pwd()),
    )
    .await?;
    r.role_add("app").await?;
    r.role_grant_permission(
        "app",
        etcd_client::Permission::read_write("/app/").with_prefix(),
    )
    .await?;
    r.user_grant_role("alice", "app").await?;
    r.auth_enable().await?;

    // No token: the certificate names the caller.
    let mut a = connect_tls(&m.client_url(), &alice).await?;
    a.put("/app/x", "1", None).await?;
    let e = a.put("/other", "1", None).await.unwrap_err();
    assert!(
        e.to_string().contains("etcdserver: permission denied"),
        "{e}"
    );
    assert!(a.user_list().await.is_err(), "alice is not root");
    let mut r = connect_tls(&m.client_url(), &root).await?;
    assert_eq!(r.user_list().await?.users(), ["alice", "root"]);
    assert_eq!(r.get("/app/x", None).await?.kvs()[0].value(), b"1");
    Ok(())
}
