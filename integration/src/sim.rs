//! The simulation tier: whole Concord members in one process, over consensus's
//! in-process network ([`LocalNetwork`]), under a fault schedule drawn from a seed.
//!
//! A scenario ([`run_seed`]) starts a 3- or 5-member cluster (the seed decides), each
//! member a [`Member`] built from its configuration and a [`LocalNetwork`] transport,
//! serving the etcd API on its own loopback port. The robustness suite's traffic
//! ([`crate::traffic`]: get, range, serializable get, put, delete, txn, CAS, leased
//! puts, revokes, compaction) and two recording watchers run against it while the
//! schedule injects, one after another, faults of these kinds ([`FaultKind`]): random
//! message drop, delay with jitter (so messages overtake each other), symmetric and
//! one-way partitions, isolation of the leader, a member crashed without a clean
//! shutdown (its WAL loses what it did not fsync) and reopened from its data
//! directory, a membership change (a follower removed, a fresh member added), and a
//! follower cut off long enough that it must catch up by snapshot. Then the network
//! heals, every member must answer again, and the history and the watches go through
//! the same checkers as the process-level robustness suite ([`crate::verdict`]).
//!
//! The seed fixes the cluster size, the fault schedule (kinds, targets, timings), the
//! network's random drop and delay decisions, and every client's request stream; the
//! interleaving of threads is the machine's. Replaying a seed replays all of those.
//!
//! Planted bugs: a build with the `failpoints` feature can arm one of
//! [`concord_storage::failpoints::PLANTED_BUGS`] for a run ([`Options::plant`]), to
//! show that the checkers catch a server that is wrong.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use concord_consensus::Role;
use concord_consensus::local::LocalNetwork;
use concord_server::Member;
use concord_server::config::{Args, Config};
use concord_server::identity::member_id;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::Rng;
use crate::history::Record;
use crate::traffic;
use crate::verdict::Leftover;

/// Heartbeat and election timeout of simulated members (ms): short, so that a
/// scenario of a few seconds sees several elections.
const HEARTBEAT_MS: u64 = 20;
const ELECTION_MS: u64 = 200;
/// Entries between snapshots, and kept behind one: small, so a follower cut off for
/// a second needs a snapshot to catch up.
const SNAPSHOT_COUNT: u64 = 120;
const CATCH_UP_ENTRIES: u64 = 30;
/// How long the cluster may take to answer on every member after the faults end.
const RECOVERY: Duration = Duration::from_secs(30);
/// A scenario that takes longer than this has hung: a violation, not a stalled run.
const SCENARIO_DEADLINE: Duration = Duration::from_secs(120);

/// The kinds of fault a schedule draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    Drop,
    Delay,
    Partition,
    OneWay,
    IsolateLeader,
    Crash,
    ReplaceMember,
    SnapshotCatchUp,
}

impl FaultKind {
    pub const ALL: [FaultKind; 8] = [
        FaultKind::Drop,
        FaultKind::Delay,
        FaultKind::Partition,
        FaultKind::OneWay,
        FaultKind::IsolateLeader,
        FaultKind::Crash,
        FaultKind::ReplaceMember,
        FaultKind::SnapshotCatchUp,
    ];

    /// The kind named `name` (as printed: `Drop`, `OneWay`, ...), case-insensitive.
    pub fn parse(name: &str) -> Option<FaultKind> {
        FaultKind::ALL
            .into_iter()
            .find(|k| format!("{k:?}").eq_ignore_ascii_case(name.trim()))
    }
}

/// How scenarios run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Seconds of client traffic.
    pub secs: f64,
    /// Concurrent clients.
    pub clients: usize,
    /// The fault kinds a schedule may draw (all when empty).
    pub kinds: Vec<FaultKind>,
    /// A planted bug to arm for the run (failpoint builds only).
    pub plant: Option<String>,
    /// Keep the data directories of a failed scenario (under the system temp dir).
    pub keep_failed: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            secs: 3.0,
            clients: 4,
            kinds: Vec::new(),
            plant: None,
            keep_failed: false,
        }
    }
}

/// What one scenario did.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub seed: u64,
    pub members: usize,
    pub faults: Vec<String>,
    /// The kinds injected, for coverage counts.
    pub kinds: Vec<FaultKind>,
    pub ops: usize,
    pub known: usize,
    pub watch_events: usize,
    pub violations: Vec<String>,
}

/// One member's place in the cluster, across restarts.
struct Slot {
    name: String,
    id: u64,
    peer_url: String,
    client_url: String,
    port: u16,
    /// The client port's listener, held from the slot's creation until its member
    /// first serves, so no other process on the machine takes the port meanwhile.
    reserved: Option<TcpListener>,
    dir: PathBuf,
    initial_cluster: String,
    existing: bool,
    running: Option<Running>,
    /// Removed from the cluster for good.
    retired: bool,
}

struct Running {
    member: Member,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
}

/// A cluster of members in this process.
pub struct SimCluster {
    /// What was injected so far (reported even when the scenario breaks).
    injected: Vec<String>,
    net: LocalNetwork,
    root: tempfile::TempDir,
    token: String,
    slots: Vec<Slot>,
}

/// Serves `router` on `listener` until `stop`, then closes every connection, so
/// nothing of the member outlives it.
async fn serve(listener: TcpListener, router: axum::Router, mut stop: watch::Receiver<bool>) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let svc = TowerToHyperService::new(router.clone());
                conns.spawn(async move {
                    let _ = Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    conns.shutdown().await;
}

impl SimCluster {
    /// Starts `n` members on a network seeded with `seed`.
    pub async fn start(n: usize, seed: u64) -> Result<SimCluster> {
        let root = tempfile::Builder::new().prefix("concord-sim-").tempdir()?;
        let mut c = SimCluster {
            injected: Vec::new(),
            net: LocalNetwork::seeded(seed),
            root,
            token: format!("sim-{seed}"),
            slots: Vec::new(),
        };
        for _ in 0..n {
            c.new_slot(false).await?;
        }
        let initial = c.initial_cluster();
        for s in &mut c.slots {
            s.initial_cluster = initial.clone();
        }
        for i in 0..n {
            c.open(i).await?;
        }
        Ok(c)
    }

    fn initial_cluster(&self) -> String {
        self.slots
            .iter()
            .filter(|s| !s.retired)
            .map(|s| format!("{}={}", s.name, s.peer_url))
            .collect::<Vec<_>>()
            .join(",")
    }

    async fn new_slot(&mut self, existing: bool) -> Result<usize> {
        let i = self.slots.len();
        let name = format!("s{}", i + 1);
        // Peer URLs only name members on the in-process network; nothing listens there.
        let peer_url = format!("http://127.0.0.1:{}", 20_000 + i);
        let reserved = TcpListener::bind("127.0.0.1:0").await?;
        let port = reserved.local_addr()?.port();
        self.slots.push(Slot {
            id: member_id(std::slice::from_ref(&peer_url), &self.token),
            client_url: format!("http://127.0.0.1:{port}"),
            dir: self.root.path().join(&name),
            name,
            peer_url,
            port,
            reserved: Some(reserved),
            initial_cluster: String::new(),
            existing,
            running: None,
            retired: false,
        });
        Ok(i)
    }

    fn config(&self, i: usize) -> Result<Config> {
        let s = &self.slots[i];
        let args = Args {
            name: Some(s.name.clone()),
            data_dir: Some(s.dir.display().to_string()),
            listen_client_urls: Some(s.client_url.clone()),
            advertise_client_urls: Some(s.client_url.clone()),
            listen_peer_urls: Some(s.peer_url.clone()),
            initial_advertise_peer_urls: Some(s.peer_url.clone()),
            initial_cluster: Some(s.initial_cluster.clone()),
            initial_cluster_state: Some(if s.existing { "existing" } else { "new" }.into()),
            initial_cluster_token: Some(self.token.clone()),
            heartbeat_interval: Some(HEARTBEAT_MS),
            election_timeout: Some(ELECTION_MS),
            snapshot_count: Some(SNAPSHOT_COUNT),
            snapshot_catchup_entries: Some(CATCH_UP_ENTRIES),
            watch_progress_notify_interval: Some("1s".into()),
            ..Default::default()
        };
        Ok(Config::load(&args)?)
    }

    /// Opens member `i` from its data directory and serves it on its port. A store
    /// still held by the member's previous life (requests finishing) is waited for.
    async fn open(&mut self, i: usize) -> Result<()> {
        let cfg = self.config(i)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut retry = tokio::time::interval(Duration::from_millis(50));
        let member = loop {
            retry.tick().await;
            let transport = self.net.transport(self.slots[i].id);
            match Member::open(&cfg, transport).await {
                Ok(m) => break m,
                Err(e) if Instant::now() < deadline && format!("{e:#}").contains("lock") => {}
                Err(e) => return Err(e).with_context(|| format!("opening {}", self.slots[i].name)),
            }
        };
        let s = &mut self.slots[i];
        self.net
            .serve_attributes(s.id, &s.peer_url, member.attributes());
        let listener = match s.reserved.take() {
            Some(l) => l,
            None => bind_port(s.port).await?,
        };
        let (stop, stop_rx) = watch::channel(false);
        let router = member.router(
            concord_gateway::Limits::default(),
            concord_gateway::Telemetry::default(),
        );
        let server = tokio::spawn(serve(listener, router, stop_rx));
        s.running = Some(Running {
            member,
            stop,
            server,
        });
        Ok(())
    }

    /// Stops member `i`: cleanly, or as a crash (`crash`).
    async fn stop(&mut self, i: usize, crash: bool) {
        let s = &mut self.slots[i];
        let Some(r) = s.running.take() else { return };
        self.net.remove(s.id);
        let _ = r.stop.send(true);
        let _ = r.server.await;
        if crash {
            r.member.crash().await;
        } else {
            r.member.shutdown().await;
        }
    }

    /// Every member still in the cluster, running or not.
    fn live(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.slots.len()).filter(|&i| !self.slots[i].retired)
    }

    fn running(&self) -> impl Iterator<Item = usize> + '_ {
        self.live().filter(|&i| self.slots[i].running.is_some())
    }

    /// The client endpoints of the initial members (clients and watchers use these).
    pub fn endpoints(&self) -> Vec<String> {
        self.slots.iter().map(|s| s.client_url.clone()).collect()
    }

    /// The running member that leads in the highest term, if any.
    pub fn leader(&self) -> Option<usize> {
        self.running()
            .filter_map(|i| {
                let st = self.slots[i].running.as_ref()?.member.status();
                (st.role == Role::Leader).then_some((st.term, i))
            })
            .max()
            .map(|(_, i)| i)
    }

    /// Waits until some member leads.
    async fn wait_leader(&self, within: Duration) -> Result<usize> {
        let deadline = Instant::now() + within;
        let mut every = tokio::time::interval(Duration::from_millis(10));
        loop {
            every.tick().await;
            if let Some(l) = self.leader() {
                return Ok(l);
            }
            if Instant::now() >= deadline {
                bail!("no leader within {within:?}");
            }
        }
    }

    fn ids(&self, members: &[usize]) -> Vec<u64> {
        members.iter().map(|&i| self.slots[i].id).collect()
    }

    /// Cuts every link between `side` and the other live members, both ways.
    fn partition(&self, side: &[usize]) {
        let others: Vec<usize> = self.live().filter(|i| !side.contains(i)).collect();
        for a in self.ids(side) {
            for b in self.ids(&others) {
                self.net.cut(a, b);
                self.net.cut(b, a);
            }
        }
    }

    async fn client(&self, i: usize) -> Result<etcd_client::Client> {
        crate::connect(&self.slots[i].client_url).await
    }

    /// Removes a follower from the cluster and adds a fresh member in its place.
    async fn replace_member(&mut self, rng: &mut Rng) -> Result<String> {
        let leader = self.wait_leader(Duration::from_secs(5)).await?;
        let followers: Vec<usize> = self.running().filter(|&i| i != leader).collect();
        let Some(&old) = followers.get(rng.below(followers.len().max(1) as u64) as usize) else {
            bail!("no follower to replace");
        };
        let mut c = self.client(leader).await?;
        c.member_remove(self.slots[old].id).await?;
        self.slots[old].retired = true;
        self.stop(old, false).await;
        let new = self.new_slot(true).await?;
        let url = self.slots[new].peer_url.clone();
        c.member_add([url], None).await?;
        self.slots[new].initial_cluster = self.initial_cluster();
        self.open(new).await?;
        Ok(format!(
            "replaced {} by {}",
            self.slots[old].name, self.slots[new].name
        ))
    }

    /// Cuts a follower off until the leader has applied enough for a snapshot past it.
    async fn snapshot_catch_up(&mut self, rng: &mut Rng) -> Result<String> {
        let leader = self.wait_leader(Duration::from_secs(5)).await?;
        let followers: Vec<usize> = self.running().filter(|&i| i != leader).collect();
        let f = followers[rng.below(followers.len() as u64) as usize];
        let start = self.status(leader).map_or(0, |s| s.applied);
        self.net.isolate(self.slots[f].id);
        let target = start + SNAPSHOT_COUNT + CATCH_UP_ENTRIES + 10;
        let deadline = Instant::now() + Duration::from_secs(6);
        let mut every = tokio::time::interval(Duration::from_millis(20));
        let reached = loop {
            every.tick().await;
            let applied = self
                .leader()
                .and_then(|l| self.status(l))
                .map_or(0, |s| s.applied);
            if applied >= target {
                break true;
            }
            if Instant::now() >= deadline {
                break false;
            }
        };
        self.net.heal();
        Ok(format!(
            "{} cut off until snapshot ({})",
            self.slots[f].name,
            if reached {
                "reached"
            } else {
                "too little traffic"
            }
        ))
    }

    fn status(&self, i: usize) -> Option<concord_consensus::Status> {
        Some(self.slots[i].running.as_ref()?.member.status())
    }

    /// Injects one fault of `kind` and undoes it.
    async fn inject(&mut self, kind: FaultKind, rng: &mut Rng) -> Result<String> {
        let live: Vec<usize> = self.live().collect();
        let n = live.len();
        let hold = rng.millis(300, 1_000);
        let pick = |rng: &mut Rng| live[rng.below(n as u64) as usize];
        Ok(match kind {
            FaultKind::Drop => {
                let p = 0.05 + rng.below(16) as f64 / 100.0;
                self.net.set_drop(p);
                tokio::time::sleep(hold).await;
                self.net.set_drop(0.0);
                format!("drop {:.0}% for {hold:?}", p * 100.0)
            }
            FaultKind::Delay => {
                let base = rng.millis(2, 20);
                let jitter = rng.millis(5, 40);
                self.net.set_jittered_delay(base, jitter);
                tokio::time::sleep(hold).await;
                self.net.set_delay(None);
                format!("delay {base:?} + <{jitter:?} for {hold:?}")
            }
            FaultKind::Partition => {
                let minority = (n - 1) / 2;
                let mut side = Vec::new();
                while side.len() < minority.max(1) {
                    let i = pick(rng);
                    if !side.contains(&i) {
                        side.push(i);
                    }
                }
                self.partition(&side);
                tokio::time::sleep(hold).await;
                self.net.heal();
                let names: Vec<&str> = side.iter().map(|&i| self.slots[i].name.as_str()).collect();
                format!("partition {names:?} for {hold:?}")
            }
            FaultKind::OneWay => {
                let from = self.leader().unwrap_or_else(|| pick(rng));
                let mut to = pick(rng);
                while to == from {
                    to = pick(rng);
                }
                self.net.cut(self.slots[from].id, self.slots[to].id);
                tokio::time::sleep(hold).await;
                self.net.heal();
                format!(
                    "one-way cut {} -> {} for {hold:?}",
                    self.slots[from].name, self.slots[to].name
                )
            }
            FaultKind::IsolateLeader => {
                let l = self.wait_leader(Duration::from_secs(5)).await?;
                self.net.isolate(self.slots[l].id);
                tokio::time::sleep(hold).await;
                self.net.heal();
                format!("leader {} isolated for {hold:?}", self.slots[l].name)
            }
            FaultKind::Crash => {
                let running: Vec<usize> = self.running().collect();
                let i = running[rng.below(running.len() as u64) as usize];
                self.stop(i, true).await;
                tokio::time::sleep(hold).await;
                self.open(i).await?;
                format!("{} crashed for {hold:?}", self.slots[i].name)
            }
            FaultKind::ReplaceMember => self.replace_member(rng).await?,
            FaultKind::SnapshotCatchUp => self.snapshot_catch_up(rng).await?,
        })
    }

    /// Heals the network, and waits until every member still in the cluster answers a
    /// linearizable read.
    async fn recover(&mut self) -> Result<()> {
        self.net.clear_faults();
        for i in self.live().collect::<Vec<_>>() {
            if self.slots[i].running.is_none() {
                self.open(i).await?;
            }
        }
        for i in self.live().collect::<Vec<_>>() {
            crate::wait_answering(&self.slots[i].client_url, RECOVERY)
                .await
                .with_context(|| format!("{} answering", self.slots[i].name))?;
        }
        Ok(())
    }

    /// Stops every member.
    pub async fn shutdown(mut self) {
        for i in 0..self.slots.len() {
            self.stop(i, false).await;
        }
    }

    /// Keeps the data directories (for a failed scenario) and says where.
    fn keep(self) -> PathBuf {
        self.root.keep()
    }
}

async fn bind_port(port: u16) -> Result<TcpListener> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut retry = tokio::time::interval(Duration::from_millis(20));
    loop {
        retry.tick().await;
        match TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => return Ok(l),
            // The previous life's sockets may hold the port for a moment.
            Err(_) if Instant::now() < deadline => {}
            Err(e) => return Err(e).context(format!("binding 127.0.0.1:{port}")),
        }
    }
}

/// The seed of scenario `i` of a run whose base seed is `base`.
pub fn scenario_seed(base: u64, i: u64) -> u64 {
    let mut r = Rng::new(base ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    r.next_u64()
}

/// Runs the scenario of `seed`.
pub async fn run_seed(seed: u64, opts: &Options) -> Result<Outcome> {
    let mut rng = Rng::new(seed);
    let members = if rng.below(4) == 0 { 5 } else { 3 };
    let kinds: Vec<FaultKind> = if opts.kinds.is_empty() {
        FaultKind::ALL.to_vec()
    } else {
        opts.kinds.clone()
    };
    let count = 1 + rng.below(3) as usize;
    let schedule: Vec<FaultKind> = (0..count)
        .map(|_| kinds[rng.below(kinds.len() as u64) as usize])
        .collect();
    let mut cluster = SimCluster::start(members, rng.next_u64()).await?;
    let result = tokio::time::timeout(
        SCENARIO_DEADLINE,
        scenario(&mut cluster, &schedule, opts, &mut rng),
    )
    .await
    .unwrap_or_else(|_| {
        Err(anyhow::anyhow!(
            "the scenario did not finish within {SCENARIO_DEADLINE:?}"
        ))
    });
    let mut out = match result {
        Ok(o) => o,
        Err(e) => Outcome {
            faults: cluster.injected.clone(),
            violations: vec![format!("the scenario broke: {e:#}")],
            ..Outcome::default()
        },
    };
    out.seed = seed;
    out.members = members;
    if out.kinds.is_empty() {
        out.kinds = schedule;
    }
    if !out.violations.is_empty() && opts.keep_failed {
        let dir = cluster.keep();
        out.violations
            .push(format!("data directories kept in {}", dir.display()));
    } else {
        cluster.shutdown().await;
    }
    Ok(out)
}

/// With `SIM_TRACE` set, each scenario says on stderr which phase it is in.
fn phase(what: &str) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("SIM_TRACE").is_some()) {
        eprintln!("sim: {what}");
    }
}

async fn scenario(
    cluster: &mut SimCluster,
    schedule: &[FaultKind],
    opts: &Options,
    rng: &mut Rng,
) -> Result<Outcome> {
    cluster.wait_leader(Duration::from_secs(10)).await?;
    let origin = Instant::now();
    let stop = origin + Duration::from_secs_f64(opts.secs);
    let endpoints = cluster.endpoints();
    let compact_to = Arc::new(AtomicI64::new(0));
    let watchers = crate::verdict::Watchers::spawn(&endpoints, rng);
    let mut clients = Vec::new();
    for id in 0..opts.clients {
        clients.push(tokio::spawn(traffic::client_loop(
            id,
            endpoints.clone(),
            origin,
            stop,
            rng.next_u64(),
            compact_to.clone(),
        )));
    }
    // Compactions stay far behind the watchers (a resumed watcher must not be
    // cancelled): up to a revision reached a while ago.
    let compactor = {
        let compact_to = compact_to.clone();
        let url = endpoints[0].clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(500));
            let mut seen = Vec::new();
            loop {
                every.tick().await;
                if let Ok(mut c) = crate::connect(&url).await
                    && let Ok(r) = c.get("r/", None).await
                {
                    seen.push(r.header().map_or(0, |h| h.revision()));
                    if seen.len() > 2 {
                        compact_to.store(seen[seen.len() - 3] - 50, Ordering::Release);
                    }
                }
            }
        })
    };
    tokio::time::sleep(rng.millis(200, 500)).await;
    for &kind in schedule {
        let desc = cluster.inject(kind, rng).await;
        cluster.injected.push(match desc {
            Ok(d) => d,
            Err(e) => format!("{kind:?} not injected: {e:#}"),
        });
        tokio::time::sleep(rng.millis(100, 300)).await;
    }
    let faults = cluster.injected.clone();
    phase("faults done; waiting for the clients");
    let mut history: Vec<Record> = Vec::new();
    for c in clients {
        history.extend(c.await?);
    }
    compactor.abort();
    phase("recovering");
    cluster.recover().await?;
    phase("final write");
    let live = cluster.running().next().context("no member running")?;
    let (marker, end_writes) =
        crate::verdict::final_write(&cluster.slots[live].client_url, Leftover::Revoke).await?;
    history.extend(end_writes);
    phase("waiting for the watchers, then checking");
    let v = watchers.finish(&history, marker).await?;
    let mut out = Outcome {
        faults,
        kinds: schedule.to_vec(),
        ops: v.ops,
        known: v.known,
        watch_events: v.watch_events,
        violations: v.violations,
        ..Outcome::default()
    };
    if v.known < 20 {
        out.violations.push(format!(
            "only {} requests completed: the cluster did not serve",
            v.known
        ));
    }
    Ok(out)
}

/// Arms planted bug `name` for the rest of the process (failpoint builds only).
pub fn plant(name: &str) -> Result<()> {
    if !concord_storage::failpoints::PLANTED_BUGS.contains(&name) {
        bail!(
            "unknown planted bug {name:?}; one of {:?}",
            concord_storage::failpoints::PLANTED_BUGS
        );
    }
    #[cfg(feature = "failpoints")]
    {
        fail::cfg(name, "return").map_err(anyhow::Error::msg)?;
        Ok(())
    }
    #[cfg(not(feature = "failpoints"))]
    bail!("planted bugs need a build with `--features concord-integration/failpoints`")
}

/// Totals over many scenarios.
#[derive(Debug, Default)]
pub struct Summary {
    pub seeds: usize,
    pub violations: usize,
    pub failed: Vec<u64>,
    pub ops: usize,
    pub known: usize,
    pub watch_events: usize,
    pub by_kind: BTreeMap<String, usize>,
    pub by_size: BTreeMap<usize, usize>,
}

impl Summary {
    pub fn add(&mut self, o: &Outcome) {
        self.seeds += 1;
        self.violations += o.violations.len();
        if !o.violations.is_empty() {
            self.failed.push(o.seed);
        }
        self.ops += o.ops;
        self.known += o.known;
        self.watch_events += o.watch_events;
        for k in &o.kinds {
            *self.by_kind.entry(format!("{k:?}")).or_default() += 1;
        }
        *self.by_size.entry(o.members).or_default() += 1;
    }
}

/// Runs the scenarios of `seeds`, `jobs` at a time, printing a line for each; stops
/// starting new ones after the first violation when `until_violation`.
pub async fn run_many(
    seeds: Vec<u64>,
    jobs: usize,
    opts: Options,
    until_violation: bool,
) -> Summary {
    let mut summary = Summary::default();
    let mut queue = seeds.into_iter();
    let mut running = JoinSet::new();
    let opts = Arc::new(opts);
    let mut stop = false;
    loop {
        while !stop && running.len() < jobs.max(1) {
            let Some(seed) = queue.next() else { break };
            let opts = opts.clone();
            running.spawn(async move {
                let started = Instant::now();
                let r = run_seed(seed, &opts).await;
                (seed, r, started.elapsed())
            });
        }
        let Some(done) = running.join_next().await else {
            break;
        };
        let (seed, r, took) = match done {
            Ok(x) => x,
            Err(e) => {
                println!("sim: a scenario task failed: {e}");
                summary.seeds += 1;
                summary.violations += 1;
                continue;
            }
        };
        let o = r.unwrap_or_else(|e| Outcome {
            seed,
            violations: vec![format!("the scenario could not start: {e:#}")],
            ..Outcome::default()
        });
        println!(
            "seed {seed}: {} members, {} ops ({} known), {} watch events, {} violations, {:.1} s; faults: {}",
            o.members,
            o.ops,
            o.known,
            o.watch_events,
            o.violations.len(),
            took.as_secs_f64(),
            o.faults.join("; ")
        );
        if !o.violations.is_empty() {
            for v in o.violations.iter().take(10) {
                println!("  violation: {v}");
            }
            println!("  FAILED seed {seed}: replay with scripts/sim.sh --seed {seed}");
            stop |= until_violation;
        }
        summary.add(&o);
    }
    summary
}
