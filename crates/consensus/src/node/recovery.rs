//! Opening a node: the WAL and snapshot files are read back, the state machine is
//! brought up to the newest snapshot if it is behind it, the membership changes it has
//! applied are replayed into Raft's configuration, and the raft and apply threads start.

use super::*;

pub(super) fn to_storage_hs(hs: &HardState) -> storage::HardState {
    storage::HardState {
        term: hs.term,
        vote: hs.vote,
        commit: hs.commit,
    }
}

pub(super) fn snapshot_metadata(meta: &SnapshotMeta) -> Result<SnapshotMetadata> {
    let mut m = SnapshotMetadata {
        index: meta.index,
        term: meta.term,
        ..Default::default()
    };
    let cs: ConfState = crate::codec::decode(&meta.meta).map_err(Error::decode(format!(
        "conf state of snapshot {}",
        meta.index
    )))?;
    if let Some(why) = membership::conf_state_refusal(&cs) {
        return Err(Error::Inconsistent(format!(
            "conf state of snapshot {}: {why}",
            meta.index
        )));
    }
    m.set_conf_state(cs);
    Ok(m)
}

/// Opens the WAL and snapshots under `cfg.dir`, brings the state machine up to the
/// newest snapshot if it is behind it, and starts the raft and apply threads. Must be
/// called inside a tokio runtime only if the transport needs one.
pub fn start<S: StateMachine>(
    cfg: Config,
    mut sm: S,
    transport: Arc<dyn Transport>,
) -> Result<Node<S::Output>> {
    if cfg.id == 0 || !(cfg.peers.contains(&cfg.id) || cfg.learners.contains(&cfg.id)) {
        return Err(Error::Config(format!(
            "node id {:x} must be non-zero and one of the initial voters or learners",
            cfg.id
        )));
    }
    let (wal, rec) = Wal::open(&cfg.dir.join("wal"), WalOptions::default())?;
    if rec.truncated_bytes > 0 {
        tracing::warn!(
            bytes = rec.truncated_bytes,
            "WAL had a torn tail; truncated"
        );
    }
    let snaps = Arc::new(SnapshotStore::open(&cfg.dir.join("snap"))?);
    let latest = snaps.latest()?.map(Arc::new);
    let fresh = rec.snapshot.is_none()
        && rec.entries.is_empty()
        && rec.hard_state == storage::HardState::default();
    let mut applied = sm.applied_index();
    if fresh && applied > 0 {
        return Err(Error::Config(format!(
            "the state machine has applied index {applied} but the raft log is empty \
             (a data directory from a Concord without a raft log, or a deleted wal/)"
        )));
    }
    let mut applied_term = 0;
    if let Some(mark) = &rec.snapshot
        && mark.index > applied
    {
        let file = match &latest {
            Some(f) if f.meta().index == mark.index && f.meta().term == mark.term => f.clone(),
            _ => {
                return Err(Error::Config(format!(
                    "the WAL starts from snapshot {} (term {}) but no such snapshot file is in {}",
                    mark.index,
                    mark.term,
                    cfg.dir.join("snap").display()
                )));
            }
        };
        tracing::info!(
            index = mark.index,
            "restoring the state machine from a snapshot"
        );
        sm.restore(&mut file.body_reader()?, mark.index, mark.term)
            .map_err(Error::state_machine)?;
        applied = mark.index;
        applied_term = mark.term;
    }
    let mut conf_state = match &rec.snapshot {
        Some(m) if !m.meta.is_empty() => {
            let cs: ConfState = crate::codec::decode(&m.meta).map_err(Error::decode(format!(
                "conf state of the WAL's snapshot mark {}",
                m.index
            )))?;
            if let Some(why) = membership::conf_state_refusal(&cs) {
                return Err(Error::Inconsistent(format!(
                    "conf state of the WAL's snapshot mark {}: {why}",
                    m.index
                )));
            }
            cs
        }
        _ => ConfState::from((cfg.peers.clone(), cfg.learners.clone())),
    };
    // Every entry is decoded here, membership changes included, so a damaged one stops
    // the start with its index rather than Raft or the apply thread later.
    let mut entries = Vec::with_capacity(rec.entries.len());
    for e in &rec.entries {
        let entry: Entry = crate::codec::decode(&e.data)
            .map_err(Error::decode(format!("WAL entry {}", e.index)))?;
        // raft-rs takes the log as contiguous: an entry that says it is another one
        // would make it panic later, far from the cause.
        if (entry.index, entry.term) != (e.index, e.term) {
            return Err(Error::Inconsistent(format!(
                "WAL entry {} (term {}) holds entry {} of term {}",
                e.index, e.term, entry.index, entry.term
            )));
        }
        match entry.get_entry_type() {
            EntryType::EntryNormal => {}
            EntryType::EntryConfChange => {
                let (cc, _, _) = membership::from_entry(entry.index, &entry.data)?;
                // Raft re-delivers only what the state machine has not applied: the
                // membership changes it has applied are replayed here, so Raft starts
                // with the configuration that goes with the applied index.
                if entry.index <= applied {
                    membership::apply_simple(&mut conf_state, &cc);
                }
            }
            EntryType::EntryConfChangeV2 => {
                return Err(Error::Inconsistent(format!(
                    "WAL entry {}: joint membership changes are not used by Concord",
                    entry.index
                )));
            }
        }
        entries.push(entry);
    }
    if cfg.force_new_cluster {
        tracing::warn!(
            member_id = cfg.id,
            was = ?conf_state.voters,
            "forcing a new cluster: this member is the only voter"
        );
        conf_state = ConfState::from((vec![cfg.id], Vec::<u64>::new()));
    }
    let compacted = rec.snapshot.as_ref().map_or((0, 0), |m| (m.index, m.term));
    let last = entries.last().map_or(compacted.0, |e| e.index);
    if applied > last {
        return Err(Error::Config(format!(
            "the state machine applied index {applied} but the raft log ends at {last}"
        )));
    }
    let hs = HardState {
        // A new log starts at term 1, as etcd's bootstrap does (its initial
        // configuration entries are written at term 1), so the first leader is elected
        // for term 2 there and here alike.
        term: if fresh { 1 } else { rec.hard_state.term },
        vote: rec.hard_state.vote,
        // Entries can be applied before the hard state that commits them is written.
        commit: rec.hard_state.commit.max(applied).min(last),
        ..Default::default()
    };
    if let Some(e) = entries.iter().find(|e| e.index == applied) {
        applied_term = e.term;
    }
    if cfg.force_new_cluster {
        // As etcd: what the old cluster never committed is dropped, not committed by
        // the new one-member cluster.
        let dropped = entries.iter().filter(|e| e.index > hs.commit).count();
        entries.retain(|e| e.index <= hs.commit);
        if dropped > 0 {
            tracing::warn!(
                dropped,
                commit = hs.commit,
                "forcing a new cluster: uncommitted entries dropped"
            );
        }
    }
    let offered = match &latest {
        Some(f) => Some(snapshot_metadata(f.meta())?),
        None => None,
    };
    let log = LogStore::new(hs, conf_state.clone(), compacted, entries, offered);
    let raft_cfg = raft::Config {
        id: cfg.id,
        election_tick: cfg.election_ticks,
        heartbeat_tick: cfg.heartbeat_ticks,
        applied,
        max_size_per_msg: cfg.max_size_per_msg,
        max_inflight_msgs: cfg.max_inflight_msgs,
        check_quorum: true,
        pre_vote: true,
        ..Default::default()
    };
    raft_cfg.validate()?;
    let mut raw = RawNode::new(&raft_cfg, log, &crate::logger::raft_logger(cfg.id))?;
    if conf_state.voters == [cfg.id] {
        // Alone in the group: no reason to wait an election timeout.
        raw.campaign()?;
    }

    let (tx, rx) = mpsc::channel(INBOX_DEPTH);
    let (apply_tx, apply_rx) = mpsc::channel(APPLY_DEPTH);
    let shared = Arc::new(Shared {
        id: cfg.id,
        waiters: Mutex::new(HashMap::new()),
        state: watch::Sender::new(Status {
            id: cfg.id,
            applied,
            membership: Configuration::from(&conf_state),
            ..Default::default()
        }),
        progress: Mutex::new(Vec::new()),
        stopped: watch::Sender::new(false),
        crashed: AtomicBool::new(false),
    });
    let inbox = Inbox {
        id: cfg.id,
        tx: tx.clone(),
        snaps: snaps.clone(),
    };
    transport.attach(inbox.clone());
    let started_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    // etcd's request id layout: member bits, start time, counter; unique per member
    // across restarts.
    let first_id = ((cfg.id & 0xffff) << 48) | ((started_ms << 8) & ((1 << 48) - 1));
    let handle = Handle {
        tx: tx.clone(),
        shared: shared.clone(),
        next_id: Arc::new(AtomicU64::new(first_id)),
        timeout: cfg.request_timeout,
        inbox,
    };

    let applier = Applier {
        sm,
        shared: shared.clone(),
        node_tx: tx.clone(),
        snaps: snaps.clone(),
        snapshot_count: cfg.snapshot_count,
        conf_bytes: conf_state
            .write_to_bytes()
            .map_err(Error::decode("conf state"))?,
        last_snapshot: latest
            .as_ref()
            .map_or(0, |f| f.meta().index)
            .max(compacted.0),
        applied,
        applied_term,
        snapshotting: Arc::new(AtomicBool::new(false)),
        spans: crate::trace::ApplySpans::new(cfg.id),
    };
    let apply_thread = thread::Builder::new()
        .name("raft-apply".into())
        .spawn(move || applier.run(apply_rx))?;

    let driver = Driver {
        raw,
        wal,
        snaps,
        transport,
        apply_tx,
        shared: shared.clone(),
        reads: Reads::default(),
        current_snapshot: latest,
        received: HashMap::new(),
        cfg: cfg.clone(),
        leader: 0,
        ticks: 0,
        spans: crate::trace::RaftSpans::new(cfg.id),
    };
    let raft_thread = thread::Builder::new()
        .name("raft".into())
        .spawn(move || driver.run(rx))?;
    Ok(Node {
        handle,
        threads: vec![raft_thread, apply_thread],
    })
}
