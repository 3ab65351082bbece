//! Differential test of the Auth service: one `etcdctl` session of user, role,
//! permission and `auth enable/disable` commands, and RBAC as seen by a user, against
//! `concord` and against a real etcd started by the test. Outputs must be equal once
//! ids and ports are normalised; a second session runs over TLS with client
//! certificates against both servers started with the same certificates.

use concord_integration::tlsutil::{Ca, ClientTls, TlsMember, start_etcd_tls, write};
use concord_integration::{Concord, Etcd, etcdctl_transcript};
use regex::Regex;

const ROOT: &str = "--user=root:rootpw";
const ALICE: &str = "--user=alice:pw2";

/// `(args, stdin)`; each runs as `etcdctl --endpoints <ep> <args>`.
fn script() -> Vec<(Vec<&'static str>, Option<&'static str>)> {
    let c = |s: &'static str| (s.split_whitespace().collect::<Vec<_>>(), None);
    let root = |s: &'static str| {
        let mut v = vec![ROOT];
        v.extend(s.split_whitespace());
        (v, None)
    };
    let alice = |s: &'static str| {
        let mut v = vec![ALICE];
        v.extend(s.split_whitespace());
        (v, None)
    };
    vec![
        c("auth enable"),
        c("user add root --new-user-password=rootpw"),
        c("user add root --new-user-password=rootpw"),
        c("user add alice:pw"),
        c("user add bob --no-password"),
        (vec!["user", "add", "", "--new-user-password=x"], None),
        c("user list"),
        c("user list -w json"),
        c("user get alice"),
        c("user get alice -w json"),
        c("user get nosuch"),
        (
            vec!["user", "passwd", "alice", "--interactive=false"],
            Some("pw2\n"),
        ),
        c("user passwd nosuch --interactive=false"),
        c("role add r1"),
        c("role add r1"),
        (vec!["role", "add", ""], None),
        c("role grant-permission r1 read k1"),
        c("role grant-permission r1 readwrite /p/ --prefix"),
        c("role grant-permission r1 write a z"),
        c("role grant-permission r1 read f --from-key"),
        c("role grant-permission r1 READ k1"),
        c("role grant-permission nosuch read k1"),
        c("role get r1"),
        c("role get r1 -w json"),
        c("role get nosuch"),
        c("role add r2"),
        c("role list"),
        c("role list -w json"),
        c("role revoke-permission r1 k1"),
        c("role revoke-permission r1 k1"),
        c("role revoke-permission r1 a"),
        c("role revoke-permission nosuch k1"),
        c("role grant-permission r1 read k1"),
        c("user grant-role alice r1"),
        c("user grant-role alice r1"),
        c("user grant-role alice r2"),
        c("user grant-role alice nosuch"),
        c("user grant-role nosuch r1"),
        c("user get alice"),
        c("user get alice --detail"),
        c("user get alice --detail -w json"),
        c("user revoke-role alice r2"),
        c("user revoke-role alice r2"),
        c("user revoke-role nosuch r1"),
        c("role delete r2"),
        c("role delete r2"),
        c("user delete bob"),
        c("user delete bob"),
        c("put k1 before"),
        // etcdctl adds the root role and grants it, then enables.
        c("auth enable"),
        root("auth enable"),
        root("user list"),
        root("role get root"),
        root("user get root"),
        // What alice may and may not do.
        alice("get k1"),
        alice("put k1 v1"),
        alice("get k1 -w json"),
        alice("put /p/x 1"),
        alice("get /p/ --prefix"),
        alice("get /q"),
        alice("put /q 1"),
        alice("del /q"),
        alice("get b"),
        alice("put b 1"),
        alice("put b 2 --prev-kv"),
        alice("put m 3 --prev-kv"),
        alice("get a z"),
        alice("get f z"),
        alice("get f --from-key"),
        alice("del a z"),
        alice("user list"),
        alice("user get alice"),
        alice("user get root"),
        alice("role get r1"),
        alice("role get root"),
        alice("role add r3"),
        alice("auth disable"),
        c("get k1"),
        c("auth disable"),
        (vec!["--user=alice:wrong", "get", "k1"], None),
        (vec!["--user=nosuch:pw", "get", "k1"], None),
        root("user delete root"),
        root("role delete root"),
        root("user revoke-role root root"),
        root("user add carol:pw"),
        root("user delete carol"),
        root("auth disable"),
        c("auth disable"),
        c("user list"),
        c("get k1"),
        c("user delete root"),
        c("user list"),
    ]
}

/// Makes two servers' outputs comparable: ids and the endpoint.
struct Normaliser {
    rules: Vec<(Regex, &'static str)>,
}

impl Normaliser {
    fn new(endpoint: &str) -> Self {
        let r = |p: &str, with: &'static str| (Regex::new(p).unwrap(), with);
        Self {
            rules: vec![
                (Regex::new(&regex::escape(endpoint)).unwrap(), "ENDPOINT"),
                r(r#""(cluster_id|member_id|raft_term)":\d+"#, r#""$1":N"#),
            ],
        }
    }

    fn apply(&self, s: &str) -> String {
        let mut s = s.to_string();
        for (re, with) in &self.rules {
            s = re.replace_all(&s, *with).into_owned();
        }
        s
    }
}

/// A command's transcript ([`etcdctl_transcript`]), normalised.
fn run(endpoint: &str, args: &[&str], stdin: Option<&str>) -> String {
    let out = etcdctl_transcript(endpoint, args, stdin).expect("etcdctl runs");
    Normaliser::new(endpoint).apply(&out)
}

/// Runs the script against both servers, each command with `prefix` before its
/// arguments (the TLS flags), and panics with every command whose output differs.
fn compare(etcd: &str, concord: &str, prefix: &[String]) -> usize {
    let mut mismatches = Vec::new();
    let mut compared = 0;
    for (args, stdin) in script() {
        let args: Vec<&str> = prefix.iter().map(String::as_str).chain(args).collect();
        let want = run(etcd, &args, stdin);
        let got = run(concord, &args, stdin);
        compared += 1;
        if want != got {
            mismatches.push(format!(
                "etcdctl {}\n--- etcd\n{want}\n--- concord\n{got}\n",
                args.join(" ")
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {compared} commands differ:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    compared
}

#[tokio::test]
async fn an_etcdctl_auth_session_matches_real_etcd() {
    // A low bcrypt cost keeps the session quick; both servers get the same.
    let etcd = Etcd::start_with(&["--bcrypt-cost=4"])
        .await
        .expect("reference etcd starts (apt-get install etcd-server)");
    let concord = Concord::start_with(&["--bcrypt-cost=4"]).await.unwrap();
    let compared = compare(&etcd.endpoint(), &concord.endpoint(), &[]);
    eprintln!("{compared} etcdctl auth commands gave the same output on concord and etcd");
}

/// The same session over TLS with client certificates (`--cacert --cert --key`,
/// with `--user` where the script gives one), both servers started with the same
/// certificates and `--client-cert-auth`: a command without `--user` is then the
/// certificate's CN (`client`, a user the script never adds).
#[tokio::test]
async fn an_etcdctl_auth_session_over_tls_matches_real_etcd() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut ca = Ca::new("test-ca");
    let server = ca.issue("localhost", false);
    let client = ca.issue("client", false);
    let path = |name: &str, pem: &str| write(d, name, pem).display().to_string();
    let ca_file = path("ca.pem", &ca.cert_pem);
    let (cert, key) = (
        path("server.pem", &server.cert_pem),
        path("server.key", &server.key_pem),
    );
    let (ccert, ckey) = (
        path("client.pem", &client.cert_pem),
        path("client.key", &client.key_pem),
    );
    let flags = [
        format!("--cert-file={cert}"),
        format!("--key-file={key}"),
        format!("--trusted-ca-file={ca_file}"),
        "--client-cert-auth".to_string(),
        "--bcrypt-cost=4".to_string(),
    ];
    let tls = ClientTls {
        ca_pem: ca.cert_pem.clone(),
        identity: Some(client.clone()),
    };
    let etcd_flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let etcd = start_etcd_tls(&etcd_flags, &tls)
        .await
        .expect("reference etcd starts over TLS (apt-get install etcd-server)");
    let concord = TlsMember::start_single(d, &flags, &tls).await.unwrap();
    let prefix = [
        format!("--cacert={ca_file}"),
        format!("--cert={ccert}"),
        format!("--key={ckey}"),
    ];
    let compared = compare(&etcd.endpoint(), &concord.client_url(), &prefix);
    eprintln!("{compared} etcdctl auth commands over TLS gave the same output on concord and etcd");
}
