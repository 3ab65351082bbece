//! An N-member cluster of real processes (`concord` or the reference `etcd`) on
//! loopback, with process faults (SIGKILL + restart, SIGSTOP / SIGCONT) and, for
//! Concord, network partitions through a [`FaultProxy`] in front of each member's
//! peer listener.
//!
//! Member `i` (0-based) is named `n{i+1}`. Its client URL is
//! `http://127.0.0.1:<port>`. Unproxied, it listens for peers on
//! `http://127.0.0.1:<port>`. Proxied, it listens for peers on
//! `http://127.0.0.{i+2}:<port>` (all of 127/8 is loopback on Linux) and advertises
//! its proxy (`127.0.0.1:<port>`) instead; since Concord binds its outgoing peer
//! connections to its own peer-listen IP, every proxy can tell which member a
//! connection comes from, which is what [`Cluster::partition`] relies on.
//!
//! Dropping the cluster SIGKILLs every process (stopped ones too) and removes the
//! data directories.

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use etcd_client::GetOptions;

use crate::proxy::FaultProxy;
use crate::{Proc, READY_DEADLINE, concord_bin, connect, etcd_bin, free_port, wait_until};

/// Which server the cluster runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Concord,
    Etcd,
}

/// etcd's timing scaled down (heartbeat 50 ms, election 500 ms) and a 200 ms lease
/// checkpoint interval: for tests that change leaders or wait for lease expiry.
pub const FAST_FLAGS: [&str; 6] = [
    "--heartbeat-interval",
    "50",
    "--election-timeout",
    "500",
    "--lease-checkpoint-interval",
    "200ms",
];

impl ClusterOptions {
    /// Three members with [`FAST_FLAGS`].
    pub fn fast() -> ClusterOptions {
        ClusterOptions {
            extra: FAST_FLAGS.iter().map(|s| s.to_string()).collect(),
            ..ClusterOptions::default()
        }
    }
}

/// How to start a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Number of members (default 3).
    pub size: usize,
    /// Put a [`FaultProxy`] in front of each member's peer listener (Concord only:
    /// etcd does not bind its outgoing peer connections, so source-IP blocks cannot
    /// tell its members apart).
    pub proxied: bool,
    /// Extra flags for every member, e.g. `--snapshot-count`.
    pub extra: Vec<String>,
    /// Run this binary instead of the default one (e.g. a failpoint build).
    pub bin: Option<PathBuf>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            size: 3,
            proxied: false,
            extra: Vec::new(),
            bin: None,
        }
    }
}

/// One member process.
#[derive(Debug)]
pub struct Member {
    /// `n1`, `n2`, ...
    pub name: String,
    pub client_port: u16,
    /// Where the process listens for peers.
    pub peer_listen: SocketAddr,
    /// What `--initial-cluster` says for this member: the proxy if proxied, else
    /// `peer_listen`.
    pub peer_advertise: SocketAddr,
    pub proc: Proc,
    pub proxy: Option<FaultProxy>,
    dir: PathBuf,
    args: Vec<OsString>,
    /// Every log file this member has written, oldest first (one per start).
    logs: Vec<PathBuf>,
    /// Removed from the cluster (by `member remove`): no longer in `--initial-cluster`
    /// of members added later.
    pub retired: bool,
}

impl Member {
    /// The client URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The process id, unless the member is killed.
    pub fn pid(&self) -> Option<u32> {
        self.proc.child.as_ref().map(std::process::Child::id)
    }

    /// The data directory (`--data-dir`).
    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    /// The full command line (without the binary) the member is started with.
    pub fn args(&self) -> &[OsString] {
        &self.args
    }
}

/// A running cluster. Dropping it kills every member.
#[derive(Debug)]
pub struct Cluster {
    pub kind: Kind,
    pub members: Vec<Member>,
    bin: PathBuf,
    /// Member ids (from each member's own status header), learned by [`Self::leader`].
    ids: Mutex<Vec<Option<u64>>>,
    token: String,
    extra: Vec<String>,
    // Last, so the processes are killed before their directories are removed.
    tmp: tempfile::TempDir,
}

/// How long one status probe of one member may take in [`Cluster::leader`].
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Starts of a cluster tried when a member finds its port taken.
const START_ATTEMPTS: usize = 3;
/// What a start that lost a port race fails with.
const PORT_TAKEN: &str = "a port was taken before the member bound it";

impl Cluster {
    /// Starts all members at once and waits until every one answers a linearizable
    /// read (printing every member's log if one does not).
    pub async fn start(kind: Kind, opts: ClusterOptions) -> Result<Cluster> {
        Self::start_each(kind, opts, |_| Vec::new()).await
    }

    /// Like [`Cluster::start`], with `own(i)`'s flags for member `i` only (after
    /// `opts.extra`), e.g. an id of its own.
    pub async fn start_each(
        kind: Kind,
        opts: ClusterOptions,
        own: impl Fn(usize) -> Vec<String>,
    ) -> Result<Cluster> {
        // A port picked free can be taken by another process before the member binds
        // it (tests run in parallel): then the whole cluster starts again on new ports.
        for attempt in 1.. {
            match Self::start_attempt(kind, &opts, &own).await {
                Err(e) if attempt < START_ATTEMPTS && format!("{e:#}").contains(PORT_TAKEN) => {
                    eprintln!(
                        "{kind:?} cluster: a port was taken before a member bound it; starting again"
                    );
                }
                r => return r,
            }
        }
        unreachable!("the last attempt returns")
    }

    async fn start_attempt(
        kind: Kind,
        opts: &ClusterOptions,
        own: &impl Fn(usize) -> Vec<String>,
    ) -> Result<Cluster> {
        let n = opts.size;
        ensure!(n >= 1, "a cluster needs at least one member");
        if opts.proxied {
            ensure!(n <= 250, "proxied clusters use 127.0.0.2..=127.0.0.251");
        }
        let bin = match (kind, &opts.bin) {
            (_, Some(bin)) => bin.clone(),
            (Kind::Concord, None) => concord_bin(),
            (Kind::Etcd, None) => {
                etcd_bin().context("etcd not installed (apt-get install etcd-server)")?
            }
        };
        let tmp = tempfile::Builder::new()
            .prefix(match kind {
                Kind::Concord => "concord-cluster",
                Kind::Etcd => "etcd-cluster",
            })
            .tempdir()?;

        // Addresses first: every member's flags name every other member.
        let mut addrs = Vec::with_capacity(n);
        for i in 0..n {
            let client_port = free_port();
            let (peer_listen, proxy) = if opts.proxied {
                let listen = free_port_on(member_ip(i))?;
                let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], 0)), listen)?;
                (listen, Some(proxy))
            } else {
                (SocketAddr::from(([127, 0, 0, 1], free_port())), None)
            };
            let peer_advertise = proxy.as_ref().map_or(peer_listen, FaultProxy::local_addr);
            addrs.push((client_port, peer_listen, peer_advertise, proxy));
        }
        let initial_cluster = addrs
            .iter()
            .enumerate()
            .map(|(i, (_, _, adv, _))| format!("n{}=http://{adv}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let token = unique_token();

        let mut members = Vec::with_capacity(n);
        for (i, (client_port, peer_listen, peer_advertise, proxy)) in addrs.into_iter().enumerate()
        {
            let name = format!("n{}", i + 1);
            let dir = tmp.path().join(&name);
            let client = format!("http://127.0.0.1:{client_port}");
            let mut args: Vec<OsString> = Vec::new();
            let mut flag = |k: &str, v: &str| {
                args.push(k.into());
                args.push(v.into());
            };
            flag("--name", &name);
            flag("--data-dir", &dir.to_string_lossy());
            flag("--listen-client-urls", &client);
            flag("--advertise-client-urls", &client);
            flag("--listen-peer-urls", &format!("http://{peer_listen}"));
            flag(
                "--initial-advertise-peer-urls",
                &format!("http://{peer_advertise}"),
            );
            flag("--initial-cluster", &initial_cluster);
            flag("--initial-cluster-state", "new");
            flag("--initial-cluster-token", &token);
            args.extend(opts.extra.iter().map(OsString::from));
            args.extend(own(i).into_iter().map(OsString::from));
            members.push(Member {
                name,
                client_port,
                peer_listen,
                peer_advertise,
                // Not running yet: spawned below, once every member is built.
                proc: Proc {
                    child: None,
                    log: PathBuf::new(),
                },
                proxy,
                dir,
                args,
                logs: Vec::new(),
                retired: false,
            });
        }
        let mut cluster = Cluster {
            kind,
            members,
            bin,
            ids: Mutex::new(vec![None; n]),
            token,
            extra: opts.extra.clone(),
            tmp,
        };
        for i in 0..n {
            cluster.spawn(i)?;
        }

        let end = Instant::now() + READY_DEADLINE;
        for i in 0..n {
            loop {
                let left = end.saturating_duration_since(Instant::now());
                let step = left.min(Duration::from_secs(1));
                let Err(e) = crate::wait_answering(&cluster.endpoint(i), step).await else {
                    break;
                };
                // A member that exited will not answer: no need to wait out the deadline.
                if !cluster.exited(i) && left > step {
                    continue;
                }
                let logs: String = (0..n).map(|j| cluster.member_log(j)).collect();
                if logs.to_ascii_lowercase().contains("address already in use") {
                    return Err(
                        e.context(format!("{kind:?} cluster member n{}: {PORT_TAKEN}", i + 1))
                    );
                }
                cluster.print_logs();
                return Err(e.context(format!("{kind:?} cluster member n{} not ready", i + 1)));
            }
        }
        Ok(cluster)
    }

    /// (Re)spawns member `i`'s process with its flags, logging to a new file.
    fn spawn(&mut self, i: usize) -> Result<()> {
        let m = &mut self.members[i];
        m.proc.kill9();
        let log = self
            .tmp
            .path()
            .join(format!("{}.{}.log", m.name, m.logs.len()));
        let mut cmd = Command::new(&self.bin);
        cmd.args(&m.args);
        if self.kind == Kind::Etcd {
            cmd.env("ETCD_UNSUPPORTED_ARCH", std::env::consts::ARCH);
        }
        m.proc = Proc::spawn(cmd, log.clone())?;
        m.logs.push(log);
        Ok(())
    }

    /// Prepares a member to add to the running cluster (not proxied): its ports and
    /// flags, with `--initial-cluster-state existing` and an `--initial-cluster` of the
    /// members not retired plus itself. Returns its index and its peer URL, for
    /// `member add`; start it with [`Cluster::start_added`] once the add is committed.
    pub fn prepare_member(&mut self) -> (usize, String) {
        let i = self.members.len();
        let name = format!("n{}", i + 1);
        let client_port = free_port();
        let peer_listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let peer_url = format!("http://{peer_listen}");
        let mut cluster: Vec<String> = self
            .members
            .iter()
            .filter(|m| !m.retired)
            .map(|m| format!("{}=http://{}", m.name, m.peer_advertise))
            .collect();
        cluster.push(format!("{name}={peer_url}"));
        let dir = self.tmp.path().join(&name);
        let client = format!("http://127.0.0.1:{client_port}");
        let mut args: Vec<OsString> = Vec::new();
        for (k, v) in [
            ("--name", name.clone()),
            ("--data-dir", dir.to_string_lossy().into_owned()),
            ("--listen-client-urls", client.clone()),
            ("--advertise-client-urls", client),
            ("--listen-peer-urls", peer_url.clone()),
            ("--initial-advertise-peer-urls", peer_url.clone()),
            ("--initial-cluster", cluster.join(",")),
            ("--initial-cluster-state", "existing".into()),
            ("--initial-cluster-token", self.token.clone()),
        ] {
            args.push(k.into());
            args.push(v.into());
        }
        args.extend(self.extra.iter().map(OsString::from));
        self.members.push(Member {
            name,
            client_port,
            peer_listen,
            peer_advertise: peer_listen,
            proc: Proc {
                child: None,
                log: PathBuf::new(),
            },
            proxy: None,
            dir,
            args,
            logs: Vec::new(),
            retired: false,
        });
        self.ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(None);
        (i, peer_url)
    }

    /// Starts member `i` prepared by [`Cluster::prepare_member`] and waits until it
    /// answers `Status` (a learner does not serve linearizable reads in etcd).
    pub async fn start_added(&mut self, i: usize) -> Result<()> {
        self.spawn(i)?;
        let endpoint = self.endpoint(i);
        let ready = wait_until(READY_DEADLINE, "the added member", || {
            let endpoint = endpoint.clone();
            async move {
                connect(&endpoint)
                    .await?
                    .maintenance_client()
                    .status()
                    .await?;
                Ok(())
            }
        })
        .await;
        if ready.is_err() {
            eprintln!("{}", self.member_log(i));
        }
        ready
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::endpoint).collect()
    }

    /// Member `i`'s client URL.
    pub fn endpoint(&self, i: usize) -> String {
        self.members[i].endpoint()
    }

    /// A client connected to member `i` only.
    pub async fn client(&self, i: usize) -> Result<etcd_client::Client> {
        connect(&self.endpoint(i)).await
    }

    /// A client over every member's endpoint.
    pub async fn client_all(&self) -> Result<etcd_client::Client> {
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(10));
        Ok(etcd_client::Client::connect(self.endpoints(), Some(opts)).await?)
    }

    /// SIGKILLs member `i` (stopped or not) and reaps it.
    pub fn kill9(&mut self, i: usize) {
        self.members[i].proc.kill9();
    }

    /// Restarts member `i` (killing it first if it runs) with the same data
    /// directory, ports and flags as its first start, and waits until it answers a
    /// serializable read.
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        self.spawn(i)?;
        let endpoint = self.endpoint(i);
        let ready = wait_until(READY_DEADLINE, &endpoint, || {
            let endpoint = endpoint.clone();
            async move {
                crate::answered(
                    connect(&endpoint)
                        .await?
                        .get("health", Some(GetOptions::new().with_serializable()))
                        .await,
                )
            }
        })
        .await;
        if ready.is_err() {
            eprintln!("{}", self.member_log(i));
        }
        ready.with_context(|| format!("restarted member n{}", i + 1))
    }

    /// Member `i`'s command-line flags (without the binary), to change before a
    /// [`Cluster::restart`] (e.g. to add `--force-new-cluster`).
    pub fn args_mut(&mut self, i: usize) -> &mut Vec<OsString> {
        &mut self.members[i].args
    }

    /// Whether member `i`'s process has ended on its own (reaped if so).
    pub fn exited(&mut self, i: usize) -> bool {
        let m = &mut self.members[i];
        match m.proc.child.as_mut().map(std::process::Child::try_wait) {
            Some(Ok(Some(_))) => {
                m.proc.child = None;
                true
            }
            Some(_) => false,
            None => true,
        }
    }

    /// Arms failpoint `name` on member `i` with `action` (`fail` syntax, e.g. `panic`)
    /// through `PUT /debug/failpoints/<name>`; needs a failpoint build
    /// ([`crate::concord_failpoints_bin`]).
    pub async fn arm_failpoint(&self, i: usize, name: &str, action: &str) -> Result<()> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.members[i].client_port));
        crate::http_request(addr, "PUT", &format!("/debug/failpoints/{name}"), action).await
    }

    /// SIGSTOPs member `i`.
    pub fn pause(&self, i: usize) -> Result<()> {
        self.signal(i, "STOP")
    }

    /// SIGCONTs member `i`.
    pub fn resume(&self, i: usize) -> Result<()> {
        self.signal(i, "CONT")
    }

    fn signal(&self, i: usize, sig: &str) -> Result<()> {
        let pid = self.members[i]
            .pid()
            .with_context(|| format!("member n{} is not running", i + 1))?;
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .context("running kill")?;
        ensure!(status.success(), "kill -{sig} {pid}: {status}");
        Ok(())
    }

    /// Cuts member `i` off from every other member (both directions): its own proxy
    /// refuses everything, and every other proxy refuses connections from its IP.
    /// Proxied Concord clusters only.
    pub fn partition(&self, i: usize) -> Result<()> {
        ensure!(
            self.kind == Kind::Concord,
            "partitions need members that bind their outgoing peer connections (Concord)"
        );
        let ip = self.members[i].peer_listen.ip();
        for (j, m) in self.members.iter().enumerate() {
            let proxy = m
                .proxy
                .as_ref()
                .context("partition needs a proxied cluster")?;
            if j == i {
                proxy.block_all();
            } else {
                proxy.block_sources(&[ip]);
            }
        }
        Ok(())
    }

    /// Delays every peer link by `delay ± jitter` (each proxy: traffic into its member).
    pub fn delay_peers(&self, delay: Duration, jitter: Duration) -> Result<()> {
        for m in &self.members {
            let proxy = m.proxy.as_ref().context("delays need a proxied cluster")?;
            proxy.set_delay_jitter(delay, jitter);
        }
        Ok(())
    }

    /// Drops peer traffic at random (probability `p` per forwarded chunk, with its
    /// connection) on every link.
    pub fn drop_peers(&self, p: f64) -> Result<()> {
        for m in &self.members {
            let proxy = m.proxy.as_ref().context("drops need a proxied cluster")?;
            proxy.set_drop(p);
        }
        Ok(())
    }

    /// Lifts every network fault (blocks, delays, drops) on every proxy.
    pub fn clear_network_faults(&self) {
        for p in self.members.iter().filter_map(|m| m.proxy.as_ref()) {
            p.clear();
        }
    }

    /// Lifts every block on every proxy.
    pub fn heal(&self) {
        for p in self.members.iter().filter_map(|m| m.proxy.as_ref()) {
            p.unblock_all();
        }
    }

    /// The index of the leader: polls every running member's status until a
    /// majority of the cluster reports the same leader and that leader itself
    /// answers and reports itself (so a freshly killed leader is not returned).
    pub async fn leader(&self) -> Result<usize> {
        let found = Mutex::new(None);
        wait_until(READY_DEADLINE, "a leader agreed by a majority", || async {
            let idx = self.leader_once(None).await?;
            *found.lock().unwrap_or_else(|e| e.into_inner()) = Some(idx);
            Ok(())
        })
        .await?;
        let idx = found.lock().unwrap_or_else(|e| e.into_inner()).take();
        idx.context("leader not recorded")
    }

    /// Makes leadership move: SIGSTOPs the leader until a majority agrees on another
    /// member (which confirms), then lets the old one go on; it rejoins as a follower.
    /// Returns the old and the new leader's indexes.
    pub async fn change_leader(&self) -> Result<(usize, usize)> {
        let old = self.leader().await?;
        self.pause(old)?;
        let found = Mutex::new(None);
        let waited = wait_until(READY_DEADLINE, "a new leader", || async {
            let idx = self.leader_once(Some(old)).await?;
            ensure!(idx != old, "n{} still leads", old + 1);
            *found.lock().unwrap_or_else(|e| e.into_inner()) = Some(idx);
            Ok(())
        })
        .await;
        self.resume(old)?;
        waited?;
        let new = found.lock().unwrap_or_else(|e| e.into_inner()).take();
        Ok((old, new.context("new leader not recorded")?))
    }

    /// One round of [`Cluster::leader`]'s probes, leaving out member `skip`.
    async fn leader_once(&self, skip: Option<usize>) -> Result<usize> {
        let mut probes = tokio::task::JoinSet::new();
        for (i, m) in self.members.iter().enumerate() {
            if m.pid().is_none() || skip == Some(i) {
                continue;
            }
            let endpoint = m.endpoint();
            probes.spawn(async move {
                let r = tokio::time::timeout(PROBE_TIMEOUT, async {
                    let s = connect(&endpoint)
                        .await?
                        .maintenance_client()
                        .status()
                        .await?;
                    let id = s.header().context("status without header")?.member_id();
                    anyhow::Ok((id, s.leader()))
                })
                .await;
                (i, r)
            });
        }
        let mut reports = Vec::new();
        let mut errors = Vec::new();
        while let Some(joined) = probes.join_next().await {
            let (i, r) = joined?;
            match r {
                Ok(Ok((id, leader))) => reports.push((i, id, leader)),
                Ok(Err(e)) => errors.push(format!("n{}: {e:#}", i + 1)),
                Err(_) => errors.push(format!("n{}: status timed out", i + 1)),
            }
        }
        let index_of: HashMap<u64, usize> = {
            let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
            for &(i, id, _) in &reports {
                ids[i] = Some(id);
            }
            ids.iter()
                .enumerate()
                .filter_map(|(i, id)| id.map(|id| (id, i)))
                .collect()
        };
        let mut votes: HashMap<u64, usize> = HashMap::new();
        for &(_, _, leader) in &reports {
            if leader != 0 {
                *votes.entry(leader).or_default() += 1;
            }
        }
        let majority = self.members.len() / 2 + 1;
        let Some((&leader, _)) = votes.iter().find(|&(_, &v)| v >= majority) else {
            bail!("no leader reported by a majority: {reports:?} {errors:?}");
        };
        let Some(&idx) = index_of.get(&leader) else {
            bail!("leader {leader:x} is not a known member: {reports:?}");
        };
        ensure!(
            reports.iter().any(|&(i, _, l)| i == idx && l == leader),
            "leader n{} did not confirm: {reports:?} {errors:?}",
            idx + 1
        );
        Ok(idx)
    }

    /// Member `i`'s output from every start so far.
    pub fn member_log(&self, i: usize) -> String {
        let m = &self.members[i];
        let mut out = String::new();
        for log in &m.logs {
            out.push_str(&format!("===== {} =====\n", log.display()));
            out.push_str(&std::fs::read_to_string(log).unwrap_or_default());
        }
        out
    }

    /// Prints every member's log to stderr (for failing tests).
    pub fn print_logs(&self) {
        for i in 0..self.members.len() {
            eprintln!("{}", self.member_log(i));
        }
    }
}

/// Member `i`'s own loopback IP in a proxied cluster.
fn member_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, (i + 2) as u8))
}

/// A free port on `ip` (released before use).
fn free_port_on(ip: IpAddr) -> Result<SocketAddr> {
    let l = std::net::TcpListener::bind((ip, 0)).with_context(|| format!("binding {ip}:0"))?;
    Ok(l.local_addr()?)
}

/// A cluster token no other cluster on this machine uses.
fn unique_token() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "concord-test-{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}
