//! The apply thread: committed entries go to the state machine in order, each
//! proposal's waiter gets its output, and every `snapshot_count` applied entries a
//! snapshot file is written in the background.

use super::*;

pub(super) struct Applier<S: StateMachine> {
    pub(super) sm: S,
    pub(super) shared: Arc<Shared<S::Output>>,
    pub(super) node_tx: mpsc::Sender<NodeMsg>,
    pub(super) snaps: Arc<SnapshotStore>,
    pub(super) snapshot_count: u64,
    pub(super) conf_bytes: Vec<u8>,
    pub(super) last_snapshot: u64,
    pub(super) applied: u64,
    pub(super) applied_term: u64,
    pub(super) snapshotting: Arc<AtomicBool>,
    pub(super) spans: crate::trace::ApplySpans,
}

impl<S: StateMachine> Applier<S> {
    pub(super) fn run(mut self, mut rx: mpsc::Receiver<ApplyTask>) {
        while let Some(task) = rx.blocking_recv() {
            let r = match task {
                ApplyTask::Entries(ents, confs) => self.apply(ents, confs),
                ApplyTask::Restore(file) => self.restore(&file),
                ApplyTask::Snapshot => {
                    self.snapshot_now();
                    Ok(())
                }
            };
            if let Err(e) = r {
                tracing::error!(member_id = self.shared.id, error = %e, "applying failed; the node stops");
                self.shared.stop("apply failed");
                return;
            }
            if *self.shared.stopped.borrow() {
                return;
            }
        }
    }

    pub(super) fn apply(&mut self, ents: Vec<Entry>, confs: HashMap<u64, ConfState>) -> Result<()> {
        let mut cmds = Vec::with_capacity(ents.len());
        let mut ids = Vec::with_capacity(ents.len());
        // (index, trace context) of the traced commands in `cmds`.
        let mut traced = Vec::new();
        for e in &ents {
            if e.index <= self.applied {
                continue;
            }
            match e.get_entry_type() {
                EntryType::EntryNormal if e.data.len() >= 8 => {
                    let (id, data) = e.data.split_at(8);
                    ids.push(u64::from_be_bytes(id.try_into().expect("8 bytes")));
                    if !e.context.is_empty() {
                        traced.push((e.index, e.context.clone()));
                    }
                    cmds.push(Committed {
                        index: e.index,
                        term: e.term,
                        data,
                    });
                }
                // A new leader's empty entry.
                EntryType::EntryNormal if e.data.is_empty() => {}
                // Every member skips it alike (peers refuse to send one).
                EntryType::EntryNormal => tracing::warn!(
                    index = e.index,
                    bytes = e.data.len(),
                    "entry too short for a proposal id; skipped"
                ),
                EntryType::EntryConfChange => {
                    // Commands before it are applied first, in order.
                    self.apply_commands(&mut cmds, &mut ids, &mut traced)?;
                    let (_, change, proposal) = membership::from_entry(e.index, &e.data)?;
                    let cs = confs.get(&e.index).cloned().unwrap_or_default();
                    let out = self
                        .sm
                        .apply_change(e.index, &change, &Configuration::from(&cs))
                        .map_err(Error::state_machine)?;
                    self.conf_bytes = cs.write_to_bytes().map_err(Error::decode("raft record"))?;
                    self.shared.complete(proposal, Ok(out));
                }
                EntryType::EntryConfChangeV2 => {
                    return Err(Error::Inconsistent(format!(
                        "entry {}: joint membership changes are not used by Concord",
                        e.index
                    )));
                }
            }
        }
        self.apply_commands(&mut cmds, &mut ids, &mut traced)?;
        if let Some(last) = ents.last()
            && last.index > self.applied
        {
            self.applied = last.index;
            self.applied_term = last.term;
            let applied = self.applied;
            self.shared.state.send_modify(|s| s.applied = applied);
        }
        self.maybe_snapshot();
        Ok(())
    }

    pub(super) fn apply_commands(
        &mut self,
        cmds: &mut Vec<Committed<'_>>,
        ids: &mut Vec<u64>,
        traced: &mut Vec<(u64, bytes::Bytes)>,
    ) -> Result<()> {
        if cmds.is_empty() {
            return Ok(());
        }
        let spans = if traced.is_empty() {
            Vec::new()
        } else {
            self.spans.start(traced, cmds.len())
        };
        traced.clear();
        let outputs = self.sm.apply(cmds);
        crate::trace::end_all(spans, outputs.is_ok());
        let outputs = outputs.map_err(Error::state_machine)?;
        if storage::failpoints::planted(storage::failpoints::BUG_APPLY_TWICE)
            && let Some(last) = cmds.last()
        {
            self.sm.apply(&[*last]).map_err(Error::state_machine)?;
        }
        for (id, out) in ids.drain(..).zip(outputs) {
            self.shared.complete(id, Ok(out));
        }
        cmds.clear();
        Ok(())
    }

    pub(super) fn restore(&mut self, file: &SnapshotFile) -> Result<()> {
        let meta = file.meta().clone();
        if meta.index <= self.applied {
            return Ok(());
        }
        let started = Instant::now();
        self.sm
            .restore(&mut file.body_reader()?, meta.index, meta.term)
            .map_err(Error::state_machine)?;
        tracing::info!(
            index = meta.index,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "state machine restored from a snapshot"
        );
        self.applied = meta.index;
        self.applied_term = meta.term;
        self.conf_bytes = meta.meta;
        self.last_snapshot = meta.index;
        let applied = self.applied;
        self.shared.state.send_modify(|s| s.applied = applied);
        Ok(())
    }

    pub(super) fn maybe_snapshot(&mut self) {
        if self.applied < self.last_snapshot + self.snapshot_count {
            return;
        }
        self.snapshot_now();
    }

    /// Writes a snapshot of what is applied now, unless one is being written or the
    /// newest already covers it.
    pub(super) fn snapshot_now(&mut self) {
        if self.applied <= self.last_snapshot || self.snapshotting.load(Ordering::Acquire) {
            return;
        }
        self.last_snapshot = self.applied;
        let mut image = match self.sm.snapshot() {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(error = %e, "state machine snapshot failed; will retry");
                return;
            }
        };
        let meta = SnapshotMeta {
            index: self.applied,
            term: self.applied_term,
            meta: self.conf_bytes.clone(),
        };
        let snaps = self.snaps.clone();
        let node_tx = self.node_tx.clone();
        let busy = self.snapshotting.clone();
        busy.store(true, Ordering::Release);
        let spawned = thread::Builder::new()
            .name("raft-snapshot".into())
            .spawn(move || {
                let r = (|| -> Result<SnapshotFile> {
                    let mut w = snaps.create(&meta)?;
                    std::io::copy(&mut image, &mut w)?;
                    Ok(w.finish()?)
                })();
                let _ = node_tx.blocking_send(NodeMsg::SnapshotDone(r));
                busy.store(false, Ordering::Release);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the snapshot writer");
            self.snapshotting.store(false, Ordering::Release);
        }
    }
}
