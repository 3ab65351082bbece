//! Three nodes in one process over the in-process transport: elections, replication,
//! ReadIndex, partitions and snapshot catch-up, with a small map as the state machine.

use std::collections::BTreeMap;
use std::io::{Cursor, Read};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use concord_consensus::local::LocalNetwork;
use concord_consensus::{Committed, Config, Error, Node, StateMachine, start};

type Map = Arc<Mutex<BTreeMap<String, String>>>;

/// `key=value` commands into a map; the output is the entry's index.
struct MapMachine {
    map: Map,
    applied: u64,
}

/// The test machine's failures.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct MapError(String);

impl From<&str> for MapError {
    fn from(s: &str) -> Self {
        MapError(s.into())
    }
}

impl StateMachine for MapMachine {
    type Output = u64;
    type Error = MapError;

    fn apply_change(
        &mut self,
        index: u64,
        _change: &concord_consensus::MemberChange,
        _config: &concord_consensus::Configuration,
    ) -> Result<u64, MapError> {
        self.applied = index;
        Ok(index)
    }

    fn applied_index(&self) -> u64 {
        self.applied
    }

    fn apply(&mut self, cmds: &[Committed<'_>]) -> Result<Vec<u64>, MapError> {
        let mut m = self.map.lock().unwrap();
        let mut out = Vec::new();
        for c in cmds {
            let s = std::str::from_utf8(c.data).map_err(|e| MapError(e.to_string()))?;
            let (k, v) = s.split_once('=').ok_or("bad command")?;
            m.insert(k.into(), v.into());
            out.push(c.index);
            self.applied = c.index;
        }
        Ok(out)
    }

    fn snapshot(&mut self) -> Result<Box<dyn Read + Send>, MapError> {
        let m = self.map.lock().unwrap();
        let text: String = m.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        Ok(Box::new(Cursor::new(text.into_bytes())))
    }

    fn restore(&mut self, image: &mut dyn Read, index: u64, _term: u64) -> Result<(), MapError> {
        let mut text = String::new();
        image
            .read_to_string(&mut text)
            .map_err(|e| MapError(e.to_string()))?;
        let mut m = self.map.lock().unwrap();
        m.clear();
        for line in text.lines() {
            let (k, v) = line.split_once('=').ok_or("bad image")?;
            m.insert(k.into(), v.into());
        }
        self.applied = index;
        Ok(())
    }
}

struct Member {
    node: Option<Node<u64>>,
    map: Map,
}

struct Group {
    net: LocalNetwork,
    dir: tempfile::TempDir,
    members: Vec<Member>,
    snapshot_count: u64,
}

const IDS: [u64; 3] = [1, 2, 3];

fn config(id: u64, dir: &Path, snapshot_count: u64) -> Config {
    let mut c = Config::new(id, IDS.to_vec(), dir.join(format!("n{id}")));
    c.tick = Duration::from_millis(20);
    c.election_ticks = 10;
    c.snapshot_count = snapshot_count;
    c.catch_up_entries = 5;
    c.request_timeout = Duration::from_secs(3);
    c
}

impl Group {
    fn start(snapshot_count: u64) -> Group {
        let mut g = Group {
            net: LocalNetwork::new(),
            dir: tempfile::tempdir().unwrap(),
            members: Vec::new(),
            snapshot_count,
        };
        for id in IDS {
            let map = Map::default();
            g.members.push(Member { node: None, map });
            g.boot(id);
        }
        g
    }

    fn boot(&mut self, id: u64) {
        let i = (id - 1) as usize;
        let map = Map::default();
        let sm = MapMachine {
            map: map.clone(),
            applied: 0,
        };
        let node = start(
            config(id, self.dir.path(), self.snapshot_count),
            sm,
            self.net.transport(id),
        )
        .unwrap();
        self.members[i] = Member {
            node: Some(node),
            map,
        };
    }

    fn stop(&mut self, id: u64) {
        self.net.remove(id);
        if let Some(n) = self.members[(id - 1) as usize].node.take() {
            n.shutdown();
        }
    }

    fn handle(&self, id: u64) -> concord_consensus::Handle<u64> {
        self.members[(id - 1) as usize]
            .node
            .as_ref()
            .expect("running")
            .handle
            .clone()
    }

    fn value(&self, id: u64, k: &str) -> Option<String> {
        self.members[(id - 1) as usize]
            .map
            .lock()
            .unwrap()
            .get(k)
            .cloned()
    }

    /// The leader that every running member in `among` agrees on.
    async fn leader(&self, among: &[u64]) -> u64 {
        wait(Duration::from_secs(10), "a leader", || {
            let ls: Vec<u64> = among
                .iter()
                .map(|&i| self.handle(i).status().leader)
                .collect();
            (ls[0] != 0 && ls.iter().all(|&l| l == ls[0]) && among.contains(&ls[0]))
                .then_some(ls[0])
        })
        .await
    }
}

async fn wait<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicates_through_any_member_and_reads_are_linearizable() {
    let g = Group::start(1000);
    let leader = g.leader(&IDS).await;
    let follower = IDS.iter().copied().find(|&i| i != leader).unwrap();
    let i1 = g.handle(leader).propose(b"a=1").await.unwrap();
    // A follower's proposal is forwarded to the leader and completes on the follower.
    let i2 = g.handle(follower).propose(b"b=2").await.unwrap();
    assert!(i2 > i1);
    for id in IDS {
        let idx = g.handle(id).read_index().await.unwrap();
        assert!(idx >= i2, "read index {idx} misses write at {i2}");
        // After the barrier the member has applied both writes.
        assert_eq!(g.value(id, "a").as_deref(), Some("1"));
        assert_eq!(g.value(id, "b").as_deref(), Some("2"));
    }
    // Concurrent reads share rounds and all see the write.
    let h = g.handle(follower);
    let reads: Vec<_> = (0..50)
        .map(|_| {
            let h = h.clone();
            tokio::spawn(async move { h.read_index().await })
        })
        .collect();
    for r in reads {
        assert!(r.await.unwrap().unwrap() >= i2);
    }
    for id in IDS {
        g.handle(id).shutdown();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_leader_loses_leadership_and_majority_continues() {
    let g = Group::start(1000);
    let old = g.leader(&IDS).await;
    g.handle(old).propose(b"x=before").await.unwrap();
    g.net.isolate(old);
    let rest: Vec<u64> = IDS.iter().copied().filter(|&i| i != old).collect();
    let new = g.leader(&rest).await;
    assert_ne!(new, old);
    g.handle(new).propose(b"x=after").await.unwrap();
    // Check-quorum makes the cut-off leader step down; it then refuses.
    wait(Duration::from_secs(5), "old leader to step down", || {
        (g.handle(old).status().leader != old).then_some(())
    })
    .await;
    let e = g.handle(old).propose(b"x=lost").await.unwrap_err();
    assert!(
        matches!(e, Error::NoLeader | Error::Timeout),
        "unexpected {e:?}"
    );
    let e = g.handle(old).read_index().await.unwrap_err();
    assert!(
        matches!(e, Error::NoLeader | Error::Timeout | Error::LeaderChanged),
        "unexpected {e:?}"
    );
    assert_eq!(g.value(old, "x").as_deref(), Some("before"));
    g.net.heal();
    wait(Duration::from_secs(10), "old leader to catch up", || {
        (g.value(old, "x").as_deref() == Some("after")).then_some(())
    })
    .await;
    g.handle(old).read_index().await.unwrap();
    assert_ne!(g.value(old, "x").as_deref(), Some("lost"));
    for id in IDS {
        g.handle(id).shutdown();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_follower_catches_up_through_a_snapshot_and_restarts_from_it() {
    let mut g = Group::start(20);
    let leader = g.leader(&IDS).await;
    let lagging = IDS.iter().copied().find(|&i| i != leader).unwrap();
    g.handle(leader).propose(b"first=1").await.unwrap();
    g.stop(lagging);
    let h = g.handle(leader);
    for i in 0..200 {
        h.propose(format!("k{i}={i}").as_bytes()).await.unwrap();
    }
    // The leader has snapshotted and compacted its log past the stopped follower.
    g.boot(lagging);
    wait(Duration::from_secs(20), "follower to catch up", || {
        (g.value(lagging, "k199").as_deref() == Some("199")).then_some(())
    })
    .await;
    assert_eq!(g.value(lagging, "first").as_deref(), Some("1"));
    assert_eq!(
        g.members[(lagging - 1) as usize].map.lock().unwrap().len(),
        201
    );
    let snaps = std::fs::read_dir(g.dir.path().join(format!("n{lagging}/snap")))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".snap"))
        .count();
    assert!(
        snaps >= 1,
        "the follower should hold the snapshot it installed"
    );
    // A restart rebuilds the (in-memory) machine from the snapshot and the log.
    g.stop(lagging);
    g.boot(lagging);
    wait(
        Duration::from_secs(20),
        "restarted follower to recover",
        || (g.value(lagging, "k199").as_deref() == Some("199")).then_some(()),
    )
    .await;
    assert_eq!(g.value(lagging, "first").as_deref(), Some("1"));
    for id in IDS {
        g.stop(id);
    }
}

/// A member added after the newest snapshot is not in that snapshot's configuration
/// and would refuse it; the leader must take a new snapshot for it rather than send
/// the stale one forever (found by the simulation tier).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_added_after_the_newest_snapshot_catches_up() {
    let mut g = Group::start(20);
    let leader = g.leader(&IDS).await;
    for i in 0..60 {
        g.handle(leader)
            .propose(format!("k{i}=v{i}").as_bytes())
            .await
            .unwrap();
    }
    // The log before the snapshot is gone: a new member needs a snapshot.
    wait(Duration::from_secs(10), "a snapshot on the leader", || {
        let dir = g.dir.path().join(format!("n{leader}")).join("snap");
        (std::fs::read_dir(dir).ok()?.count() > 0).then_some(())
    })
    .await;
    g.handle(leader)
        .propose_change(concord_consensus::MemberChange {
            kind: concord_consensus::ChangeKind::AddVoter,
            id: 4,
            context: Vec::new(),
        })
        .await
        .unwrap();
    let map = Map::default();
    let mut cfg = config(4, g.dir.path(), 20);
    cfg.peers = vec![1, 2, 3, 4];
    let sm = MapMachine {
        map: map.clone(),
        applied: 0,
    };
    let node = start(cfg, sm, g.net.transport(4)).unwrap();
    g.members.push(Member {
        node: Some(node),
        map,
    });
    g.handle(leader).propose(b"after=add").await.unwrap();
    wait(
        Duration::from_secs(15),
        "the new member to catch up",
        || {
            (g.value(4, "after").as_deref() == Some("add")
                && g.value(4, "k0").as_deref() == Some("v0"))
            .then_some(())
        },
    )
    .await;
    for id in [1, 2, 3, 4] {
        g.stop(id);
    }
}
