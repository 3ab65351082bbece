//! The raft thread: owns `RawNode`, takes proposals, messages, ticks and reports from
//! its inbox, and handles each `Ready` in raft-rs's documented order (see the module
//! docs of `node`).

use super::*;

pub(super) enum ApplyTask {
    /// Take a snapshot now (a follower needs one newer than the newest).
    Snapshot,
    /// Committed entries, with Raft's configuration after each membership change.
    Entries(Vec<Entry>, HashMap<u64, ConfState>),
    Restore(Arc<SnapshotFile>),
}

pub(super) struct Driver<O> {
    pub(super) raw: RawNode<LogStore>,
    pub(super) wal: Wal,
    pub(super) snaps: Arc<SnapshotStore>,
    pub(super) transport: Arc<dyn Transport>,
    pub(super) apply_tx: mpsc::Sender<ApplyTask>,
    pub(super) shared: Arc<Shared<O>>,
    pub(super) reads: Reads,
    pub(super) current_snapshot: Option<Arc<SnapshotFile>>,
    pub(super) received: HashMap<u64, Arc<SnapshotFile>>,
    pub(super) cfg: Config,
    pub(super) leader: u64,
    pub(super) ticks: u64,
    pub(super) spans: crate::trace::RaftSpans,
}

impl<O: Send + 'static> Driver<O> {
    pub(super) fn run(mut self, mut rx: mpsc::Receiver<NodeMsg>) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the raft thread's runtime");
                self.shared.stop("no runtime");
                return;
            }
        };
        let mut stopped = self.shared.stopped.subscribe();
        let result: Result<()> = rt.block_on(async {
            let mut ticker = tokio::time::interval(self.cfg.tick);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticker.tick() => self.on_tick(),
                    m = rx.recv() => match m {
                        None => return Ok(()),
                        Some(m) => {
                            self.handle(m)?;
                            for _ in 0..MAX_MSGS_PER_ROUND {
                                match rx.try_recv() {
                                    Ok(m) => self.handle(m)?,
                                    Err(_) => break,
                                }
                            }
                        }
                    },
                    _ = stopped.wait_for(|s| *s) => return Ok(()),
                }
                self.flush_reads();
                self.ask_for_snapshot();
                if self.raw.has_ready() {
                    self.on_ready().await?;
                }
            }
        });
        if let Err(e) = &result {
            tracing::error!(member_id = self.cfg.id, error = %e, "raft thread failed; the node stops");
        }
        if self.shared.crashed.load(Ordering::Acquire) {
            match self.wal.lose_unsynced() {
                Ok(0) => {}
                Ok(bytes) => {
                    tracing::warn!(bytes, "crash: the WAL lost what it had not fsynced")
                }
                Err(e) => tracing::warn!(error = %e, "crash: truncating the WAL failed"),
            }
        }
        self.shared.stop(if result.is_ok() {
            "raft thread ended"
        } else {
            "raft thread failed"
        });
        self.reads.fail_all(|| Error::Stopped);
        // Dropping the senders fails every waiting proposer with Stopped.
        self.shared
            .waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    pub(super) fn on_tick(&mut self) {
        self.raw.tick();
        self.ticks += 1;
        let ticks = self.ticks;
        self.reads.in_flight.retain_mut(|b| {
            b.waiters.retain(|w| !w.is_closed());
            !b.waiters.is_empty()
        });
        for b in &mut self.reads.in_flight {
            if ticks - b.issued_tick >= READ_RETRY_TICKS {
                b.issued_tick = ticks;
                ::metrics::counter!(crate::metrics::SLOW_READ_INDEXES).increment(1);
                self.raw.read_index(b.ctx.clone());
            }
        }
    }

    pub(super) fn handle(&mut self, m: NodeMsg) -> Result<()> {
        match m {
            NodeMsg::Propose { id, data, trace } => {
                let proposed = if trace.is_empty() {
                    self.raw.propose(trace, data)
                } else {
                    self.propose_traced(trace, data)
                };
                if let Err(e) = proposed {
                    tracing::debug!(error = %e, "proposal dropped");
                    let err = if self.raw.raft.leader_id == 0 {
                        Error::NoLeader
                    } else {
                        // Leadership is being transferred.
                        Error::LeaderChanged
                    };
                    ::metrics::counter!(crate::metrics::PROPOSALS_FAILED).increment(1);
                    self.shared.complete(id, Err(err));
                }
            }
            NodeMsg::ProposeChange { id, change } => {
                let cc = membership::to_raft(&change, id);
                if let Err(e) = self.raw.propose_conf_change(Vec::new(), cc) {
                    tracing::info!(error = %e, "membership change refused");
                    let err = if self.raw.raft.leader_id == 0 {
                        Error::NoLeader
                    } else if self.raw.raft.has_pending_conf() {
                        Error::ChangeInProgress
                    } else {
                        Error::LeaderChanged
                    };
                    self.shared.complete(id, Err(err));
                }
            }
            NodeMsg::Read(w) => self.reads.new.push(w),
            NodeMsg::Step(msg) => {
                if let Some(why) = inbound::refusal(&self.raw, &msg) {
                    tracing::warn!(
                        member_id = self.cfg.id,
                        from = format!("{:x}", msg.from),
                        msg_type = ?msg.get_msg_type(),
                        why,
                        "peer message refused"
                    );
                    return Ok(());
                }
                if let Err(e) = self.step(msg) {
                    tracing::debug!(error = %e, "message not stepped");
                }
            }
            NodeMsg::Unreachable(to) => self.raw.report_unreachable(to),
            NodeMsg::SnapshotStatus(to, ok) => self.raw.report_snapshot(
                to,
                if ok {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                },
            ),
            NodeMsg::InstallSnapshot(msg, file) => {
                self.received.insert(file.meta().index, file);
                if let Err(e) = self.raw.step(msg) {
                    tracing::warn!(error = %e, "snapshot message not stepped");
                }
            }
            NodeMsg::SnapshotDone(Ok(file)) => self.snapshot_taken(file)?,
            NodeMsg::SnapshotDone(Err(e)) => {
                tracing::warn!(error = %e, "taking a snapshot failed; will retry later");
            }
            NodeMsg::TransferLeader(to) => self.raw.transfer_leader(to),
            NodeMsg::Campaign => self.raw.campaign()?,
        }
        Ok(())
    }

    /// A local snapshot file is durable: record it, then let go of the log before it
    /// (keeping some entries for followers that are only a little behind).
    /// A follower needs a snapshot newer than the newest (raft-rs asked the log store
    /// for one it could not serve): the apply thread takes one, unless one is being
    /// written or nothing was applied since the newest (raft-rs asks again at the
    /// follower's next probe, so a full queue only delays it).
    pub(super) fn ask_for_snapshot(&mut self) {
        if self.raw.store().take_snapshot_wanted() {
            let _ = self.apply_tx.try_send(ApplyTask::Snapshot);
        }
    }

    pub(super) fn snapshot_taken(&mut self, file: SnapshotFile) -> Result<()> {
        let meta = file.meta().clone();
        if meta.index <= self.raw.store().compacted_index() {
            return Ok(());
        }
        self.wal.mark_snapshot(&SnapshotMark {
            index: meta.index,
            term: meta.term,
            meta: meta.meta.clone(),
        })?;
        self.raw.mut_store().set_snapshot(snapshot_metadata(&meta)?);
        let compact_to = meta.index.saturating_sub(self.cfg.catch_up_entries);
        self.raw.mut_store().compact(compact_to);
        let released = self.wal.release_to(compact_to)?;
        self.current_snapshot = Some(Arc::new(file));
        let purged = self.snaps.purge(SNAPSHOTS_KEPT)?;
        tracing::info!(
            index = meta.index,
            term = meta.term,
            compacted_to = compact_to,
            wal_segments_released = released,
            snapshots_purged = purged,
            "snapshot saved; log compacted"
        );
        Ok(())
    }
}

impl<O: Send + 'static> Driver<O> {
    pub(super) fn send(&mut self, msgs: Vec<Message>) {
        if msgs.is_empty() {
            return;
        }
        let mut regular = Vec::with_capacity(msgs.len());
        for m in msgs {
            if m.get_msg_type() != MessageType::MsgSnapshot {
                regular.push(m);
                continue;
            }
            let index = m.get_snapshot().get_metadata().index;
            match &self.current_snapshot {
                Some(f) if f.meta().index == index => {
                    tracing::info!(to = m.to, index, "sending a snapshot");
                    self.transport.send_snapshot(m, f.clone());
                }
                _ => self.raw.report_snapshot(m.to, SnapshotStatus::Failure),
            }
        }
        self.transport.send(regular);
    }

    pub(super) async fn apply(&mut self, entries: Vec<Entry>) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        if let Some(last) = entries.last() {
            self.spans.committed(last.index);
        }
        // Raft takes a membership change when it is handed to the apply thread (as
        // raft-rs's own examples do); the state machine records it in order.
        let mut confs = HashMap::new();
        for e in &entries {
            if e.get_entry_type() == EntryType::EntryConfChange {
                let (cc, change, _) = membership::from_entry(e.index, &e.data)?;
                let cs = match self.raw.apply_conf_change(&cc) {
                    Ok(cs) => cs,
                    Err(err) => {
                        tracing::warn!(error = %err, ?change, "membership change not taken");
                        self.raw.raft.prs().conf().to_conf_state()
                    }
                };
                tracing::info!(index = e.index, ?change, voters = ?cs.voters, learners = ?cs.learners, "membership changed");
                self.raw.mut_store().conf_state = cs.clone();
                confs.insert(e.index, cs);
            }
        }
        self.apply_tx
            .send(ApplyTask::Entries(entries, confs))
            .await
            .map_err(|_| Error::Stopped)
    }

    pub(super) async fn install_snapshot(&mut self, meta: SnapshotMetadata) -> Result<()> {
        let file = self
            .received
            .remove(&meta.index)
            .or_else(|| {
                self.current_snapshot
                    .clone()
                    .filter(|f| f.meta().index == meta.index)
            })
            .ok_or_else(|| {
                Error::Inconsistent(format!("accepted snapshot {} has no file", meta.index))
            })?;
        self.received.clear();
        self.wal.mark_snapshot(&SnapshotMark {
            index: meta.index,
            term: meta.term,
            meta: meta
                .get_conf_state()
                .write_to_bytes()
                .map_err(Error::decode("conf state"))?,
        })?;
        self.raw.mut_store().apply_snapshot(&meta);
        tracing::info!(
            index = meta.index,
            term = meta.term,
            "installing a snapshot from the leader"
        );
        self.current_snapshot = Some(file.clone());
        self.apply_tx
            .send(ApplyTask::Restore(file))
            .await
            .map_err(|_| Error::Stopped)
    }

    pub(super) fn persist(&mut self, entries: &[Entry], hs: Option<&HardState>) -> Result<()> {
        if entries.is_empty() && hs.is_none() {
            return Ok(());
        }
        let mut records = Vec::with_capacity(entries.len());
        for e in entries {
            records.push(storage::Entry {
                index: e.index,
                term: e.term,
                data: e.write_to_bytes().map_err(Error::decode("raft record"))?,
            });
        }
        // One fsync covers the entries and the hard state (group commit).
        self.wal.append(&records, hs.map(to_storage_hs).as_ref())?;
        if let Some(last) = entries.last() {
            self.spans.persisted(last.index);
        }
        let store = self.raw.mut_store();
        store.append(entries);
        if let Some(hs) = hs {
            store.hard_state = hs.clone();
        }
        Ok(())
    }

    pub(super) async fn on_ready(&mut self) -> Result<()> {
        let mut rd = self.raw.ready();
        self.send(rd.take_messages());
        self.spans.sent();
        if !rd.snapshot().is_empty() {
            let meta = rd.snapshot().get_metadata().clone();
            self.install_snapshot(meta).await?;
        }
        self.apply(rd.take_committed_entries()).await?;
        let entries = rd.take_entries();
        self.persist(&entries, rd.hs())?;
        self.read_states(rd.take_read_states());
        fail::fail_point!(concord_storage::failpoints::RAFT_BEFORE_SEND_PERSISTED);
        self.send(rd.take_persisted_messages());
        fail::fail_point!(concord_storage::failpoints::RAFT_AFTER_SEND_PERSISTED);
        let mut light = self.raw.advance(rd);
        if let Some(c) = light.commit_index() {
            self.raw.mut_store().hard_state.commit = c;
        }
        self.send(light.take_messages());
        self.apply(light.take_committed_entries()).await?;
        self.raw.advance_apply();
        if self.raw.raft.state != StateRole::Leader {
            self.spans.not_leader();
        }
        self.publish_status();
        Ok(())
    }

    pub(super) fn publish_status(&mut self) {
        let r = &self.raw.raft;
        let leader = r.leader_id;
        let role: Role = r.state.into();
        let (term, commit, last_index) = (r.term, r.raft_log.committed, r.raft_log.last_index());
        let conf = self.raw.store().conf_state.clone();
        {
            use crate::metrics as m;
            ::metrics::gauge!(m::HAS_LEADER).set(if leader != 0 { 1.0 } else { 0.0 });
            ::metrics::gauge!(m::IS_LEADER).set(if role == Role::Leader { 1.0 } else { 0.0 });
            let learner = conf.learners.contains(&self.cfg.id);
            ::metrics::gauge!(m::IS_LEARNER).set(if learner { 1.0 } else { 0.0 });
            ::metrics::gauge!(m::PROPOSALS_COMMITTED).set(commit as f64);
            let pending = self
                .shared
                .waiters
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .len();
            ::metrics::gauge!(m::PROPOSALS_PENDING).set(pending as f64);
        }
        self.shared.state.send_if_modified(|s| {
            let membership_changed =
                s.membership.voters != conf.voters || s.membership.learners != conf.learners;
            let changed = membership_changed
                || (s.leader, s.term, s.commit, s.last_index, s.role)
                    != (leader, term, commit, last_index, role);
            s.leader = leader;
            s.term = term;
            s.commit = commit;
            s.last_index = last_index;
            s.role = role;
            if membership_changed {
                s.membership = Configuration::from(&conf);
            }
            changed
        });
        let r = &self.raw.raft;
        let progress = if r.state == StateRole::Leader {
            r.prs().iter().map(|(id, p)| (*id, p.matched)).collect()
        } else {
            Vec::new()
        };
        *self
            .shared
            .progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = progress;
        if leader != self.leader {
            tracing::info!(
                member_id = self.cfg.id,
                leader = format!("{leader:x}"),
                term = r.term,
                "leader changed"
            );
            if self.leader != 0 {
                self.reads.fail_all(|| Error::LeaderChanged);
            }
            if leader != 0 {
                ::metrics::counter!(crate::metrics::LEADER_CHANGES).increment(1);
            }
            self.leader = leader;
        }
    }
}

/// Proposals with a trace (see `crate::trace`).
impl<O: Send + 'static> Driver<O> {
    /// A local proposal whose caller is traced: its entry carries the context of this
    /// member's `raft.proposal` (leader) or `raft.forward` (follower) span.
    fn propose_traced(&mut self, parent: Vec<u8>, data: Vec<u8>) -> raft::Result<()> {
        let r = &self.raw.raft;
        let before = r.raft_log.last_index();
        let context = self
            .spans
            .local(parent, r.state == StateRole::Leader, r.leader_id);
        let proposed = self.raw.propose(context, data);
        let r = &self.raw.raft;
        let after = r.raft_log.last_index();
        self.spans.stepped(proposed.is_ok(), before, after, r.term);
        proposed
    }

    /// Steps a message from a peer. On the leader, a follower's forwarded proposal
    /// with traced entries gets `raft.proposal` spans in the follower's trace.
    fn step(&mut self, mut msg: Message) -> raft::Result<()> {
        let forwarded = msg.get_msg_type() == MessageType::MsgPropose
            && self.raw.raft.state == StateRole::Leader;
        if !forwarded || !self.spans.forwarded(&mut msg) {
            return self.raw.step(msg);
        }
        let before = self.raw.raft.raft_log.last_index();
        let stepped = self.raw.step(msg);
        let r = &self.raw.raft;
        let after = r.raft_log.last_index();
        self.spans.stepped(stepped.is_ok(), before, after, r.term);
        stepped
    }
}
