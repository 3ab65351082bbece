//! # concord-integration
//!
//! Black-box test support: start the real `concord` binary (and, for differential
//! tests, Debian's real `etcd`) as child processes on loopback ports, drive them with
//! real clients (the `etcd-client` crate and `etcdctl`), and always clean them up (by
//! pid, on drop).
//!
//! Not: a library for production use. The tests live in `tests/`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub mod bench;
pub mod cluster;
pub mod curl;
pub mod history;
pub mod linearizability;
pub mod promql;
pub mod proxy;
pub mod sim;
pub mod tlsutil;
pub mod traffic;
pub mod verdict;
pub mod watchcheck;
pub mod watchrec;

/// How long a server may take to answer after it is started.
pub const READY_DEADLINE: Duration = Duration::from_secs(60);

/// The `concord` binary: `$CONCORD_BIN`, or the one cargo builds next to this test
/// binary (built on first use, so `cargo test` alone is enough).
pub fn concord_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| workspace_bin("concord", "CONCORD_BIN"))
        .clone()
}

/// The `concordctl` binary: `$CONCORDCTL_BIN`, or built like [`concord_bin`].
pub fn concordctl_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| workspace_bin("concordctl", "CONCORDCTL_BIN"))
        .clone()
}

/// `$env`, or the workspace binary `name` next to this test binary, built if needed.
fn workspace_bin(name: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    build_workspace_bin(name, &[])
}

/// Builds the workspace binary `name` (with extra cargo `args`) and returns where
/// cargo put it, next to this test binary.
fn build_workspace_bin(name: &str, args: &[&str]) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile dir");
    let bin = profile_dir.join(name);
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    // `--workspace` keeps the feature set of every build the same, so nothing
    // (RocksDB above all) is rebuilt for this one binary.
    cmd.args(["build", "--quiet", "--workspace", "--bin", name]);
    cmd.args(args);
    if release {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("running cargo build for {name}: {e}"));
    assert!(status.success(), "cargo build of {name} failed");
    assert!(bin.exists(), "{name} binary not found at {}", bin.display());
    bin
}

/// `concord` built with failpoints (`--features concord-server/failpoints`):
/// `$CONCORD_FAILPOINTS_BIN`, or built now and copied to `concord-failpoints` next to
/// the test binary's profile directory, so builds without the feature (which put their
/// own `concord` in the same place) do not replace it under a running test. The
/// feature only changes the storage, consensus, mvcc and server crates: RocksDB is
/// not rebuilt.
pub fn concord_failpoints_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("CONCORD_FAILPOINTS_BIN") {
            return PathBuf::from(p);
        }
        let built = build_workspace_bin("concord", &["--features", "concord-server/failpoints"]);
        let out = built.with_file_name("concord-failpoints");
        let tmp = built.with_file_name(format!("concord-failpoints.{}", std::process::id()));
        std::fs::copy(&built, &tmp).expect("copying concord");
        std::fs::rename(&tmp, &out).expect("renaming concord-failpoints");
        out
    })
    .clone()
}

/// `concord-sim` built with failpoints (`--features concord-integration/failpoints`),
/// so planted bugs can be armed: built now and copied to `concord-sim-failpoints`
/// (a later build without the feature replaces `concord-sim`, not the copy).
pub fn concord_sim_failpoints_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let built = build_workspace_bin(
            "concord-sim",
            &["--features", "concord-integration/failpoints"],
        );
        let out = built.with_file_name("concord-sim-failpoints");
        let tmp = built.with_file_name(format!("concord-sim-failpoints.{}", std::process::id()));
        std::fs::copy(&built, &tmp).expect("copying concord-sim");
        std::fs::rename(&tmp, &out).expect("renaming concord-sim-failpoints");
        out
    })
    .clone()
}

/// One HTTP/1.1 request with a text body to `addr`; fails unless the answer is 2xx.
pub async fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut resp = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut resp)).await??;
    let status = resp.split_whitespace().nth(1).unwrap_or("");
    anyhow::ensure!(
        status.starts_with('2'),
        "{method} {path}: {}",
        resp.lines().next().unwrap_or("")
    );
    Ok(())
}

/// Runs `concordctl <args>`.
pub fn concordctl(args: &[&str]) -> Result<Output> {
    Command::new(concordctl_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running concordctl")
}

/// A free TCP port on 127.0.0.1 (the OS picks; the port is released before use).
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    // Picked below the kernel's ephemeral range (32768-60999 on Linux), at random: a
    // port the kernel hands out for `bind(0)` is also what it hands out as the source
    // port of any outgoing connection, so between this call and the server's bind a
    // long-lived connection of another test could take it (seen: a Patroni test's
    // postgres finding its port in use for minutes).
    for _ in 0..200 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let port = 20_000 + (h.finish() % 12_768) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral port")
}

/// Polls `probe` until it succeeds or `deadline` passes.
pub async fn wait_until<F, Fut>(deadline: Duration, what: &str, mut probe: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let end = Instant::now() + deadline;
    let mut last = None;
    while Instant::now() < end {
        match probe().await {
            Ok(()) => return Ok(()),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{what} not ready after {deadline:?}: {last:?}")
}

/// What an etcd server or client says when a request could not be served *now* but
/// may be later: leadership is moving or missing, the request timed out, the member is
/// restarting, or the connection is down. Anything else (a wrong answer, "compacted",
/// "lease not found", a failed assertion) is not transient.
const TRANSIENT: &[&str] = &[
    "etcdserver: no leader",
    "etcdserver: not leader",
    "etcdserver: leader changed",
    "etcdserver: request timed out",
    "etcdserver: server stopped",
    "transport error",
    "connection refused",
    "connection reset",
    "broken pipe",
    "deadline has elapsed",
    "timeout expired",
    "timed out",
];

/// Whether `e` is an error worth retrying (see [`TRANSIENT`]): from its gRPC code
/// (`Unavailable`, `DeadlineExceeded`, `Cancelled`), its kind (transport, I/O, an
/// elapsed tokio timeout) or, for errors that reached us as text (e.g. `etcdctl`'s
/// stderr), its message.
pub fn is_transient(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        if let Some(e) = cause.downcast_ref::<etcd_client::Error>() {
            return is_transient_etcd(e);
        }
        if let Some(s) = cause.downcast_ref::<tonic::Status>() {
            return transient_status(s);
        }
        if cause.is::<tokio::time::error::Elapsed>() {
            return true;
        }
        if let Some(e) = cause.downcast_ref::<std::io::Error>() {
            return transient_io(e);
        }
        transient_text(&cause.to_string())
    })
}

fn transient_io(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused
            | ConnectionReset
            | ConnectionAborted
            | NotConnected
            | BrokenPipe
            | TimedOut
            | UnexpectedEof
    )
}

/// [`is_transient`] for an `etcd-client` error.
pub fn is_transient_etcd(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => transient_status(s),
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::IoError(e) => transient_io(e),
        other => transient_text(&other.to_string()),
    }
}

fn transient_status(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
    ) || transient_text(s.message())
}

fn transient_text(text: &str) -> bool {
    let text = text.to_lowercase();
    TRANSIENT.iter().any(|t| text.contains(t))
}

/// Runs `f` until it succeeds, retrying (after a short pause) only while it fails with
/// a transient error ([`is_transient`]) and `deadline` has not passed; any other error
/// is returned at once. For the checking phase of fault tests: after the faults are
/// undone, an election or a restarting member may still refuse a request or two, which
/// says nothing about what is being checked. `f` should be safe to repeat (a read, or
/// a write whose repetition the check tolerates).
pub async fn retry_transient<T, F, Fut>(deadline: Duration, what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let end = Instant::now() + deadline;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let e = match f().await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        if !is_transient(&e) {
            return Err(e.context(format!("{what} (attempt {attempts}, not transient)")));
        }
        if Instant::now() >= end {
            return Err(e.context(format!(
                "{what}: still failing after {attempts} attempts in {deadline:?}"
            )));
        }
        // A retry pause, not synchronisation: what we wait for is the next success.
        let pause = Duration::from_millis(50 * u64::from(attempts.min(10)));
        tokio::time::sleep(pause.min(end.saturating_duration_since(Instant::now()))).await;
    }
}

/// How long the checking phase of a fault test retries transient errors
/// ([`retry_transient`]): several elections' worth.
pub const RETRY_DEADLINE: Duration = Duration::from_secs(30);

/// Waits until the server at `endpoint` answers a read, as `etcdctl endpoint health`
/// checks it (a refusal by auth is an answer too, as etcdctl counts it).
pub async fn wait_answering(endpoint: &str, deadline: Duration) -> Result<()> {
    wait_until(deadline, endpoint, || async move {
        answered(connect(endpoint).await?.get("health", None).await)
    })
    .await
}

/// Whether a probe's read was answered: served, or refused by auth (with auth
/// enabled a read without credentials is refused, and that is an answer too).
pub fn answered<T>(r: Result<T, etcd_client::Error>) -> Result<()> {
    match r {
        Ok(_) => Ok(()),
        Err(etcd_client::Error::GRpcStatus(s))
            if s.message() == "etcdserver: user name is empty"
                || s.code() == tonic::Code::PermissionDenied =>
        {
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// A child process that is killed (by pid) and reaped when dropped.
#[derive(Debug)]
pub struct Proc {
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdin closed and stdout and stderr to the file `log`.
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Result<Proc> {
        let out = std::fs::File::create(&log)?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
        Ok(Proc {
            child: Some(child),
            log,
        })
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The process's combined output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A running `concord` member with its own data directory.
#[derive(Debug)]
pub struct Concord {
    pub proc: Proc,
    pub dir: PathBuf,
    pub client_port: u16,
    pub peer_port: u16,
    extra: Vec<String>,
    env: Vec<(String, String)>,
    _tmp: Option<tempfile::TempDir>,
}

impl Concord {
    /// Starts a fresh single-member server and waits until it answers.
    pub async fn start() -> Result<Concord> {
        Self::start_with(&[]).await
    }

    /// Like [`Concord::start`], with extra command-line flags.
    pub async fn start_with(extra: &[&str]) -> Result<Concord> {
        Self::start_configured(extra, &[]).await
    }

    /// Like [`Concord::start`], with extra flags and environment variables.
    pub async fn start_configured(extra: &[&str], env: &[(&str, &str)]) -> Result<Concord> {
        let tmp = tempfile::Builder::new().prefix("concord-test").tempdir()?;
        let mut c = Concord {
            proc: Proc {
                child: None,
                log: tmp.path().join("concord.log"),
            },
            dir: tmp.path().join("data"),
            client_port: free_port(),
            peer_port: free_port(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            _tmp: Some(tmp),
        };
        c.restart().await?;
        Ok(c)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// (Re)starts the process on the same data directory and ports.
    pub async fn restart(&mut self) -> Result<()> {
        self.proc.kill9();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(concord_bin());
        cmd.arg("--name")
            .arg("n1")
            .arg("--data-dir")
            .arg(&self.dir)
            .arg("--listen-client-urls")
            .arg(self.endpoint())
            .arg("--advertise-client-urls")
            .arg(self.endpoint())
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("n1={peer}"))
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        let log = self.dir.with_file_name(format!(
            "concord-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        self.proc = Proc::spawn(cmd, log)?;
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<()> {
        wait_answering(&self.endpoint(), READY_DEADLINE)
            .await
            .inspect_err(|_| eprintln!("concord log:\n{}", self.proc.log()))
    }

    pub async fn client(&self) -> Result<etcd_client::Client> {
        connect(&self.endpoint()).await
    }
}

/// Connects an `etcd-client` with short timeouts.
pub async fn connect(endpoint: &str) -> Result<etcd_client::Client> {
    let opts = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(10));
    Ok(etcd_client::Client::connect([endpoint], Some(opts)).await?)
}

/// Where Debian's `etcd` is, if installed.
pub fn etcd_bin() -> Option<PathBuf> {
    ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// A running real etcd (the reference implementation) with its own data directory.
#[derive(Debug)]
pub struct Etcd {
    pub proc: Proc,
    pub client_port: u16,
    scheme: String,
    _tmp: tempfile::TempDir,
}

impl Etcd {
    pub async fn start() -> Result<Etcd> {
        Etcd::start_with(&[]).await
    }

    /// Like [`Etcd::start`], with extra command-line flags (e.g.
    /// `--max-request-bytes`, `--experimental-watch-progress-notify-interval`).
    pub async fn start_with(extra: &[&str]) -> Result<Etcd> {
        let e = Etcd::spawn("http", extra)?;
        wait_answering(&e.endpoint(), READY_DEADLINE)
            .await
            .inspect_err(|_| eprintln!("etcd log:\n{}", e.proc.log()))?;
        Ok(e)
    }

    /// Starts etcd with client URLs of `scheme` (`http`, or `https` with the
    /// certificate flags in `extra`) and `extra` flags, without waiting for it.
    pub fn spawn(scheme: &str, extra: &[&str]) -> Result<Etcd> {
        let bin = etcd_bin().context("etcd not installed (apt-get install etcd-server)")?;
        let tmp = tempfile::Builder::new().prefix("etcd-ref").tempdir()?;
        let client_port = free_port();
        let peer = format!("http://127.0.0.1:{}", free_port());
        let client = format!("{scheme}://127.0.0.1:{client_port}");
        let mut cmd = Command::new(bin);
        cmd.arg("--name")
            .arg("n1")
            .arg("--data-dir")
            .arg(tmp.path().join("data"))
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("n1={peer}"))
            .args(extra)
            .env("ETCD_UNSUPPORTED_ARCH", std::env::consts::ARCH);
        let proc = Proc::spawn(cmd, tmp.path().join("etcd.log"))?;
        Ok(Etcd {
            proc,
            client_port,
            scheme: scheme.to_string(),
            _tmp: tmp,
        })
    }

    pub fn endpoint(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.client_port)
    }
}

/// What a differential test judges an `etcdctl` command by: its exit status, stdout,
/// and the `Error:` lines of stderr (the rest of stderr is client-side logging with
/// timestamps).
pub fn etcdctl_transcript(endpoint: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let out = etcdctl(endpoint, args, stdin)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("Error:")).collect();
    Ok(format!(
        "exit={}\n{}{}",
        out.status.code().unwrap_or(-1),
        stdout,
        errors.join("\n")
    ))
}

/// Runs `etcdctl --endpoints <endpoint> <args>` (API v3), feeding `stdin` if given.
pub fn etcdctl(endpoint: &str, args: &[&str], stdin: Option<&str>) -> Result<Output> {
    use std::io::Write;
    let mut cmd = Command::new("etcdctl");
    cmd.env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(endpoint)
        .arg("--command-timeout=10s")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .context("running etcdctl (apt-get install etcd-client)")?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(input.as_bytes())?;
    }
    Ok(child.wait_with_output()?)
}

impl Proc {
    /// The child's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The child's resident set size in KiB (see [`rss_kib`]).
    pub fn rss_kib(&self) -> Option<u64> {
        rss_kib(self.pid()?)
    }
}

/// xorshift64*: a tiny seeded PRNG (the integration crate has no `rand`), so generated
/// histories and nemesis schedules replay from their printed seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-ish in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A duration between `lo` and `hi` milliseconds, both included.
    pub fn millis(&mut self, lo: u64, hi: u64) -> std::time::Duration {
        std::time::Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

/// A process's resident set size in KiB (`VmRSS` of `/proc/<pid>/status`), if it runs.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// A key prefix unique to this process run (pid and wall-clock milliseconds), so
/// benchmark runs against the same server do not collide.
pub fn run_id() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("{}-{ms}", std::process::id())
}

/// A plain HTTP/1.1 GET on the client port (the same socket that serves gRPC).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string();
    (code, body)
}

/// The store's current revision as `c`'s endpoint reports it (from a read's header).
pub async fn revision(c: &mut etcd_client::Client) -> i64 {
    c.get("revision-probe", None)
        .await
        .expect("a read for the revision")
        .header()
        .expect("a header")
        .revision()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_errors_are_told_from_the_others() {
        let status = |code, msg: &str| {
            anyhow::Error::from(etcd_client::Error::GRpcStatus(tonic::Status::new(
                code, msg,
            )))
        };
        assert!(is_transient(&status(
            tonic::Code::Unavailable,
            "etcdserver: no leader"
        )));
        assert!(is_transient(
            &status(tonic::Code::Unavailable, "etcdserver: leader changed").context("a get")
        ));
        assert!(is_transient(&status(
            tonic::Code::Unknown,
            "transport error"
        )));
        assert!(!is_transient(&status(
            tonic::Code::OutOfRange,
            "etcdserver: mvcc: required revision has been compacted"
        )));
        assert!(!is_transient(&status(
            tonic::Code::NotFound,
            "etcdserver: requested lease not found"
        )));
        // As text, e.g. from etcdctl's stderr.
        assert!(is_transient(&anyhow::anyhow!(
            "Error: etcdserver: request timed out"
        )));
        assert!(!is_transient(&anyhow::anyhow!("counter 3, acknowledged 4")));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(is_transient(&anyhow::Error::from(refused)));
        let missing = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert!(!is_transient(&anyhow::Error::from(missing)));
    }

    #[tokio::test]
    async fn retry_transient_retries_only_transient_errors() {
        let mut calls = 0;
        let v = retry_transient(Duration::from_secs(10), "flaky", || {
            calls += 1;
            let n = calls;
            async move {
                if n < 3 {
                    bail!("etcdserver: no leader");
                }
                Ok(n)
            }
        })
        .await
        .unwrap();
        assert_eq!(v, 3);

        let mut calls = 0;
        let e = retry_transient(Duration::from_secs(10), "broken", || {
            calls += 1;
            async { Err::<(), _>(anyhow::anyhow!("wrong value")) }
        })
        .await
        .unwrap_err();
        assert_eq!(calls, 1, "{e:#}");

        let e = retry_transient(Duration::from_millis(200), "down", || async {
            Err::<(), _>(anyhow::anyhow!("etcdserver: leader changed"))
        })
        .await
        .unwrap_err();
        assert!(format!("{e:#}").contains("still failing"), "{e:#}");
    }
}
