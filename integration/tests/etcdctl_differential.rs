//! Differential test: one `etcdctl` command sequence against `concord` and against a
//! real etcd started by the test; outputs must be equal once member/cluster ids, ports,
//! timings, sizes and raft counters are normalised.

use concord_integration::{Concord, Etcd, etcdctl_transcript};
use regex::Regex;

/// `(args, stdin)`; each runs as `etcdctl --endpoints <ep> <args>`.
fn script() -> Vec<(Vec<&'static str>, Option<&'static str>)> {
    let c = |s: &'static str| (s.split_whitespace().collect::<Vec<_>>(), None);
    let txn_input = "value(\"foo\") = \"bar2\"\nmod(\"foo/a\") > \"0\"\n\nput foo bar3\nget foo --prefix\ndel zoo\n\nput foo never\n\n";
    let failing_txn = "version(\"nothing\") > \"0\"\n\nput x y\n\nget foo/a\nput foo/b b2\n\n";
    vec![
        c("put foo bar"),
        c("put foo bar2 --prev-kv"),
        c("put foo/a 1"),
        c("put foo/b 2"),
        c("put foo/c 3"),
        c("put zoo 4"),
        c("put zoo2 5 -w json"),
        c("get foo"),
        c("get foo -w json"),
        c("get foo --prefix"),
        c("get foo --prefix -w json"),
        c("get foo/ --prefix --keys-only"),
        c("get foo --from-key"),
        c("get foo/a foo/c"),
        c("get foo --prefix --limit 2 -w json"),
        c("get foo --prefix --sort-by=KEY --order=DESCEND"),
        c("get foo --prefix --sort-by=VALUE --order=ASCEND"),
        c("get foo --prefix --sort-by=CREATE --order=DESCEND"),
        c("get foo --prefix --sort-by=MODIFY --order=DESCEND"),
        c("get foo --prefix --sort-by=VERSION --order=DESCEND"),
        c("get foo --prefix --sort-by=MODIFY --order=ASCEND --limit 2 -w json"),
        c("get foo --rev=2"),
        c("get foo --rev=2 -w json"),
        c("get foo --prefix --rev=4"),
        c("get foo --keys-only"),
        c("get foo --prefix --count-only -w json"),
        c("get foo --print-value-only"),
        c("get foo --prefix --print-value-only"),
        c("get nothing"),
        c("get nothing -w json"),
        (vec!["get", "--from-key", "", "--keys-only"], None),
        c("get foo --rev=1000"),
        c("del foo/a"),
        c("del nothing"),
        c("del foo/ --prefix --prev-kv"),
        c("del zoo2 -w json"),
        (vec!["txn", "-w", "json"], Some(txn_input)),
        (vec!["txn"], Some(failing_txn)),
        c("get foo --prefix -w json"),
        c("compaction 3"),
        c("get foo --rev=2"),
        c("get foo --rev=3"),
        c("compaction 3"),
        c("compaction 999"),
        c("put foo/a"),
        (vec!["put", "", "v"], None),
        c("endpoint health"),
        c("endpoint health -w json"),
        c("endpoint status -w json"),
        c("member list"),
        c("member list -w json"),
        c("alarm list"),
    ]
}

/// Makes two servers' outputs comparable: everything that legitimately differs
/// between two clusters (ids, ports, timings, sizes, raft counters, versions) is
/// replaced by a placeholder.
struct Normaliser {
    rules: Vec<(Regex, &'static str)>,
}

impl Normaliser {
    fn new(endpoint: &str) -> Self {
        let r = |p: &str, with: &'static str| (Regex::new(p).unwrap(), with);
        Self {
            rules: vec![
                (Regex::new(&regex::escape(endpoint)).unwrap(), "ENDPOINT"),
                r(r"http://127\.0\.0\.1:\d+", "URL"),
                r(
                    r#""(cluster_id|member_id|raft_term|leader|raftIndex|raftTerm|raftAppliedIndex|dbSize|dbSizeInUse|ID)":\d+"#,
                    r#""$1":N"#,
                ),
                r(r#""version":"[0-9.]+""#, r#""version":"V""#),
                r(r#""took":"[^"]+""#, r#""took":"T""#),
                r(r"took = [0-9.]+[µmn]?s", "took = T"),
                r(r"\b[0-9a-f]{10,16}\b", "ID"),
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

#[tokio::test]
async fn etcdctl_outputs_match_real_etcd() {
    let etcd = Etcd::start()
        .await
        .expect("reference etcd starts (apt-get install etcd-server)");
    let concord = Concord::start().await.unwrap();
    let mut mismatches = Vec::new();
    let mut compared = 0;
    for (args, stdin) in script() {
        let want = run(&etcd.endpoint(), &args, stdin);
        let got = run(&concord.endpoint(), &args, stdin);
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
    eprintln!("{compared} etcdctl commands gave the same output on concord and etcd");
}

#[test]
fn normaliser_keeps_revisions_and_values() {
    let n = Normaliser::new("http://127.0.0.1:5555");
    let s = r#"{"header":{"cluster_id":123,"member_id":456,"revision":7,"raft_term":2},"kvs":[{"key":"Zm9v","version":3}]}"#;
    assert_eq!(
        n.apply(s),
        r#"{"header":{"cluster_id":N,"member_id":N,"revision":7,"raft_term":N},"kvs":[{"key":"Zm9v","version":3}]}"#
    );
    assert_eq!(
        n.apply("http://127.0.0.1:5555 is healthy: successfully committed proposal: took = 1.2ms"),
        "ENDPOINT is healthy: successfully committed proposal: took = T"
    );
}
