//! Differential test of `etcdctl watch`: the same writes and watch commands against a
//! real etcd 3.4 started by the test and against `concord`; every watch's output must
//! be byte-for-byte equal once cluster id, member id and raft term are normalised.
//!
//! `etcdctl watch` never exits by itself (unless the server cancels the watch): each one
//! runs as a child process; the test writes, waits until the output shows what it
//! waits for (a marker value written last, or a line count), then kills the child by
//! its pid and compares what it printed.

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use concord_integration::{Concord, Etcd, connect};
use etcd_client::{Client, DeleteOptions, Txn, TxnOp};
use regex::Regex;

const DEADLINE: Duration = Duration::from_secs(20);

/// A running `etcdctl watch`, its output collected as it comes.
struct Watching {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
}

fn collect(mut from: impl Read + Send + 'static, into: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                return;
            }
            into.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    })
}

impl Watching {
    /// `etcdctl --endpoints <endpoint> watch <args>`.
    fn start(name: &str, endpoint: &str, args: &[&str]) -> Watching {
        let mut child = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(endpoint)
            .arg("watch")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running etcdctl (apt-get install etcd-client)");
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(Vec::new()));
        let readers = vec![
            collect(child.stdout.take().unwrap(), out.clone()),
            collect(child.stderr.take().unwrap(), err.clone()),
        ];
        Watching {
            name: format!("{name}: etcdctl watch {}", args.join(" ")),
            stdin: child.stdin.take(),
            child,
            out,
            err,
            readers,
        }
    }

    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    /// A command line for `watch -i`.
    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(format!("{line}\n").as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    /// Waits until stdout satisfies `done`.
    async fn wait(&self, what: &str, done: impl Fn(&str) -> bool) {
        let end = Instant::now() + DEADLINE;
        while !done(&self.stdout()) {
            assert!(
                Instant::now() < end,
                "{}: no {what} within {DEADLINE:?}; stdout:\n{}\nstderr:\n{}",
                self.name,
                self.stdout(),
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until stdout shows the value `v` (plain, or base64 in JSON output).
    async fn saw(&self, v: &str) {
        self.wait(&format!("value {v:?}"), |out| {
            out.lines().any(|l| l == v) || out.contains(&format!("\"{}\"", base64(v.as_bytes())))
        })
        .await;
    }

    async fn lines(&self, n: usize) {
        self.wait(&format!("{n} lines"), |out| out.lines().count() >= n)
            .await;
    }

    /// Kills the child by its pid, reaps it, and returns what it printed.
    fn stop(mut self) -> (String, String) {
        // Killed before its stdin closes: `watch -i` would exit on EOF by itself, with
        // an error message racing the kill.
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stdin.take();
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        (self.stdout(), self.stderr())
    }

    /// Waits for the child to exit by itself; returns its exit code.
    async fn exit(&mut self) -> Option<i32> {
        let end = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                return status.code();
            }
            assert!(
                Instant::now() < end,
                "{}: did not exit within {DEADLINE:?}; stdout:\n{}\nstderr:\n{}",
                self.name,
                self.stdout(),
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                s.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// What legitimately differs between two clusters.
fn normalise(s: &str) -> String {
    let ids = Regex::new(r#""(cluster_id|member_id|raft_term)":\d+"#).unwrap();
    ids.replace_all(s, r#""$1":N"#).into_owned()
}

/// stderr without client-side logging (timestamped lines).
fn messages(stderr: &str) -> String {
    let logged = Regex::new(r"^(\{|\d{4}[-/]\d\d[-/]\d\d)").unwrap();
    stderr
        .lines()
        .filter(|l| !logged.is_match(l))
        .map(|l| format!("{l}\n"))
        .collect()
}

async fn put(c: &mut Client, k: &str, v: &str) -> i64 {
    c.put(k, v, None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision()
}

/// The whole scenario against one server; returns `(what, output)` pairs to compare.
async fn scenario(server: &str, ep: &str) -> Vec<(String, String)> {
    let mut c = connect(ep).await.unwrap();
    let mut results = Vec::new();

    // History: revisions 2..=9; the last write marks its end for every watcher below.
    assert_eq!(put(&mut c, "foo", "bar").await, 2);
    put(&mut c, "foo/a", "1").await; // 3
    put(&mut c, "foo", "bar2").await; // 4
    put(&mut c, "fox", "x").await; // 5
    c.delete("foo", None).await.unwrap(); // 6
    put(&mut c, "foo", "bar3").await; // 7
    let txn = Txn::new().and_then([
        TxnOp::put("foo/b", "2", None),
        TxnOp::put("foo/c", "3", None),
    ]);
    c.txn(txn).await.unwrap(); // 8
    assert_eq!(put(&mut c, "foo", "mark1").await, 9);

    let specs: &[&[&str]] = &[
        &["foo", "--rev", "1"],
        &["fo", "--prefix", "--rev", "2", "--prev-kv"],
        &["foo", "--prefix", "--rev", "3", "-w", "json"],
        &["--rev", "4", "--prev-kv", "foo"],
        &["foo", "foo0", "--rev", "5"],
        &["--prefix", "--rev", "6", "--prev-kv", "-w", "json", "f"],
        // Starts at the next revision, so no write can race its creation.
        &["--rev", "10", "foo", "--prefix", "--prev-kv"],
    ];
    let watches: Vec<Watching> = specs
        .iter()
        .map(|a| Watching::start(server, ep, a))
        .collect();
    for w in &watches[..watches.len() - 1] {
        w.saw("mark1").await;
    }

    // Live writes, one multi-event revision among them; the last one marks the end.
    put(&mut c, "foo", "bar4").await; // 10
    c.delete("foo", Some(DeleteOptions::new().with_prefix()))
        .await
        .unwrap(); // 11: foo, foo/a, foo/b, foo/c
    put(&mut c, "fox", "y").await; // 12
    let txn = Txn::new().and_then([TxnOp::put("foo", "z", None), TxnOp::put("foo/d", "d", None)]);
    c.txn(txn).await.unwrap(); // 13
    assert_eq!(put(&mut c, "foo", "mark2").await, 14);
    for w in watches {
        w.saw("mark2").await;
        let name = w.name.clone();
        let (out, err) = w.stop();
        results.push((name.clone(), normalise(&out)));
        results.push((format!("{name} (stderr)"), messages(&err)));
    }

    // Interactive: one command at a time, each watcher on its own keys so that no two
    // print at once.
    let r = put(&mut c, "i/a", "1").await; // 15
    put(&mut c, "i/b/1", "1").await; // 16
    put(&mut c, "i/a", "2").await; // 17
    let mut i = Watching::start(server, ep, &["-i"]);
    i.send(&format!("watch --rev {r} i/a"));
    i.lines(6).await; // PUT i/a 1, PUT i/a 2
    i.send("watch --prefix --prev-kv --rev 2 i/b");
    i.lines(9).await; // PUT i/b/1 1
    i.send("bogus");
    i.send("watch");
    i.send("watch --rev 18 i/c");
    put(&mut c, "i/b/1", "2").await; // 18
    i.lines(14).await; // PUT, prev i/b/1 1, i/b/1 2
    put(&mut c, "i/a", "3").await; // 19
    i.lines(17).await;
    put(&mut c, "i/c", "c").await; // 20
    i.lines(20).await;
    i.send("progress");
    i.lines(23).await; // one "progress notify: 20" per watcher
    let name = i.name.clone();
    let (out, err) = i.stop();
    results.push((name.clone(), normalise(&out)));
    results.push((format!("{name} (stderr)"), messages(&err)));

    // A watch from the current revision without --rev: its start cannot be observed,
    // so probe writes are made until one shows, and the probes are cut from the output.
    let live = Watching::start(server, ep, &["--prefix", "live/"]);
    let end = Instant::now() + DEADLINE;
    loop {
        put(&mut c, "live/probe", "probe").await;
        let seen = Instant::now() + Duration::from_millis(500);
        while Instant::now() < seen && !live.stdout().contains("probe") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if live.stdout().contains("probe") {
            break;
        }
        assert!(
            Instant::now() < end,
            "{server}: the plain watch never started"
        );
    }
    put(&mut c, "live/a", "1").await;
    c.delete(
        "live/",
        Some(DeleteOptions::new().with_prefix().with_prev_key()),
    )
    .await
    .unwrap();
    put(&mut c, "live/a", "mark3").await;
    live.saw("mark3").await;
    let name = live.name.clone();
    let (out, err) = live.stop();
    let mut out = out.as_str();
    while let Some(rest) = out.strip_prefix("PUT\nlive/probe\nprobe\n") {
        out = rest;
    }
    results.push((name.clone(), normalise(out)));
    results.push((format!("{name} (stderr)"), messages(&err)));

    // A start revision below the compaction: the server cancels the watch and etcdctl
    // exits by itself.
    c.compact(5, None).await.unwrap();
    let mut w = Watching::start(server, ep, &["foo", "--rev", "2"]);
    let code = w.exit().await;
    let name = w.name.clone();
    let (out, err) = w.stop();
    results.push((
        name,
        format!(
            "exit={code:?}\n{}--- stderr\n{}",
            normalise(&out),
            messages(&err)
        ),
    ));
    // At the compaction revision itself: still allowed.
    let w = Watching::start(server, ep, &["fo", "--prefix", "--rev", "5"]);
    w.saw("mark2").await;
    let name = w.name.clone();
    let (out, err) = w.stop();
    results.push((name.clone(), normalise(&out)));
    results.push((format!("{name} (stderr)"), messages(&err)));
    results
}

#[tokio::test]
async fn etcdctl_watch_matches_real_etcd() {
    let (etcd, concord) = tokio::join!(Etcd::start(), Concord::start());
    let etcd = etcd.expect("reference etcd starts (apt-get install etcd-server)");
    let concord = concord.expect("concord starts");
    let (e, c) = (etcd.endpoint(), concord.endpoint());
    let (want, got) = tokio::join!(scenario("etcd", &e), scenario("concord", &c));
    assert_eq!(want.len(), got.len());
    let mut mismatches = Vec::new();
    for ((what, w), (_, g)) in want.iter().zip(&got) {
        if w != g {
            mismatches.push(format!("{what}\n--- etcd\n{w}\n--- concord\n{g}"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} outputs differ:\n{}",
        mismatches.len(),
        want.len(),
        mismatches.join("\n")
    );
    for (what, out) in &want {
        eprintln!("== {what}\n{out}");
    }
}

#[test]
fn base64_and_normalise() {
    assert_eq!(base64(b"mark1"), "bWFyazE=");
    assert_eq!(base64(b"y"), "eQ==");
    assert_eq!(base64(b"foo"), "Zm9v");
    assert_eq!(
        normalise(r#"{"Header":{"cluster_id":1,"member_id":22,"revision":7,"raft_term":2}}"#),
        r#"{"Header":{"cluster_id":N,"member_id":N,"revision":7,"raft_term":N}}"#
    );
}
