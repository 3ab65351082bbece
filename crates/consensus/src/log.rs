//! raft-rs's view of the log: the entries since the last compaction point, the hard and
//! conf state, and the newest snapshot's metadata, held in memory. Durability is the
//! WAL's job (the Ready loop writes there first); this is rebuilt from the WAL on start.

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

pub(crate) struct LogStore {
    pub(crate) hard_state: HardState,
    pub(crate) conf_state: ConfState,
    /// The last entry discarded from memory (index, term); (0, 0) if none.
    compacted: (u64, u64),
    entries: Vec<Entry>,
    /// The newest snapshot file's metadata, offered to followers that are too far behind.
    snapshot: Option<SnapshotMetadata>,
    /// Set when a follower needed a snapshot the newest one cannot serve (too old, or
    /// from before the follower was a member): the node should take a new one.
    snapshot_wanted: std::cell::Cell<bool>,
}

impl LogStore {
    pub(crate) fn new(
        hard_state: HardState,
        conf_state: ConfState,
        compacted: (u64, u64),
        entries: Vec<Entry>,
        snapshot: Option<SnapshotMetadata>,
    ) -> LogStore {
        LogStore {
            hard_state,
            conf_state,
            compacted,
            entries,
            snapshot,
            snapshot_wanted: std::cell::Cell::new(false),
        }
    }

    /// Whether a follower asked for a snapshot newer than the newest one (and forgets
    /// the question).
    pub(crate) fn take_snapshot_wanted(&self) -> bool {
        self.snapshot_wanted.replace(false)
    }

    fn first(&self) -> u64 {
        self.compacted.0 + 1
    }

    pub(crate) fn last(&self) -> u64 {
        self.entries.last().map_or(self.compacted.0, |e| e.index)
    }

    pub(crate) fn compacted_index(&self) -> u64 {
        self.compacted.0
    }

    /// Appends entries from a Ready; an entry at an index already present replaces it
    /// and everything after it (Raft overwriting an uncommitted suffix).
    pub(crate) fn append(&mut self, ents: &[Entry]) {
        let Some(first_new) = ents.first().map(|e| e.index) else {
            return;
        };
        let skip = self.first().saturating_sub(first_new) as usize;
        if skip >= ents.len() {
            return;
        }
        let ents = &ents[skip..];
        let keep = (ents[0].index - self.first()) as usize;
        self.entries.truncate(keep);
        self.entries.extend_from_slice(ents);
    }

    /// Installs a snapshot received from the leader: the log restarts after it.
    pub(crate) fn apply_snapshot(&mut self, meta: &SnapshotMetadata) {
        self.compacted = (meta.index, meta.term);
        self.entries.clear();
        self.hard_state.commit = self.hard_state.commit.max(meta.index);
        self.hard_state.term = self.hard_state.term.max(meta.term);
        self.conf_state = meta.get_conf_state().clone();
        self.snapshot = Some(meta.clone());
    }

    /// Records a snapshot taken locally (entries stay until [`LogStore::compact`]).
    pub(crate) fn set_snapshot(&mut self, meta: SnapshotMetadata) {
        self.snapshot = Some(meta);
    }

    /// Drops entries up to and including `to` from memory.
    pub(crate) fn compact(&mut self, to: u64) {
        let to = to.min(self.last());
        if to <= self.compacted.0 {
            return;
        }
        let term = self.entries[(to - self.first()) as usize].term;
        self.entries.drain(..=(to - self.first()) as usize);
        self.compacted = (to, term);
    }
}

impl Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState {
            hard_state: self.hard_state.clone(),
            conf_state: self.conf_state.clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let lo = (low - self.first()) as usize;
        let hi = (high - self.first()) as usize;
        let mut ents = self.entries[lo..hi].to_vec();
        raft::util::limit_size(&mut ents, max_size.into());
        Ok(ents)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.compacted.0 {
            return Ok(self.compacted.1);
        }
        if idx < self.compacted.0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.entries[(idx - self.first()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        match &self.snapshot {
            // A member added after the snapshot is not in its configuration and would
            // refuse it (raft-rs ignores a snapshot that does not list its receiver).
            Some(meta) if meta.index >= request_index && lists(meta.get_conf_state(), to) => {
                let mut s = Snapshot::default();
                s.set_metadata(meta.clone());
                Ok(s)
            }
            // Nothing recent enough on disk yet: the node takes a new snapshot, and
            // raft-rs asks again later.
            _ => {
                self.snapshot_wanted.set(true);
                Err(raft::Error::Store(
                    StorageError::SnapshotTemporarilyUnavailable,
                ))
            }
        }
    }
}

/// Whether `cs` has `id` as a voter or learner.
fn lists(cs: &ConfState, id: u64) -> bool {
    cs.voters.contains(&id) || cs.learners.contains(&id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ent(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            ..Default::default()
        }
    }

    fn store() -> LogStore {
        LogStore::new(
            HardState::default(),
            ConfState::default(),
            (0, 0),
            Vec::new(),
            None,
        )
    }

    #[test]
    fn append_overwrites_suffix_and_compaction_keeps_terms() {
        let mut s = store();
        s.append(&[ent(1, 1), ent(2, 1), ent(3, 1)]);
        s.append(&[ent(2, 2)]);
        assert_eq!(s.last(), 2);
        assert_eq!(s.term(2).unwrap(), 2);
        s.append(&[ent(3, 2), ent(4, 2)]);
        s.compact(2);
        assert_eq!(s.first_index().unwrap(), 3);
        assert_eq!(s.term(2).unwrap(), 2);
        assert!(s.term(1).is_err());
        assert!(
            s.entries(2, 4, None, GetEntriesContext::empty(false))
                .is_err()
        );
        let got = s
            .entries(3, 5, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(got.iter().map(|e| e.index).collect::<Vec<_>>(), [3, 4]);
        // Entries already compacted are skipped, not re-added.
        s.append(&[ent(2, 2), ent(3, 2), ent(4, 2), ent(5, 3)]);
        assert_eq!(s.last(), 5);
        assert_eq!(s.first_index().unwrap(), 3);
    }

    #[test]
    fn snapshot_offered_only_when_recent_enough() {
        let mut s = store();
        assert!(s.snapshot(0, 2).is_err());
        assert!(s.take_snapshot_wanted(), "none yet: one is wanted");
        let mut m = SnapshotMetadata {
            index: 10,
            term: 3,
            ..Default::default()
        };
        m.set_conf_state(ConfState::from((vec![1, 2], vec![3])));
        s.set_snapshot(m.clone());
        assert!(!s.take_snapshot_wanted());
        assert_eq!(s.snapshot(5, 2).unwrap().get_metadata().index, 10);
        assert_eq!(s.snapshot(5, 3).unwrap().get_metadata().index, 10);
        assert!(s.snapshot(11, 2).is_err());
        assert!(s.take_snapshot_wanted(), "a newer snapshot is wanted");
        assert!(!s.take_snapshot_wanted());
        // A member added after the snapshot is not in it: it would refuse it.
        assert!(s.snapshot(5, 4).is_err());
        assert!(s.take_snapshot_wanted());
        s.apply_snapshot(&m);
        assert_eq!(s.first_index().unwrap(), 11);
        assert_eq!(s.last_index().unwrap(), 10);
        assert_eq!(s.term(10).unwrap(), 3);
        assert_eq!(s.hard_state.commit, 10);
    }
}
