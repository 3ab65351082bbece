//! The names of every failpoint in Concord, in one place.
//!
//! Failpoints are [`fail`] crate points compiled in only with the `failpoints` cargo
//! feature (`concord-server/failpoints` turns it on in every crate that has points); in
//! other builds `fail_point!` expands to nothing. A failpoint build of `concord` arms
//! them at run time from the `FAILPOINTS` environment variable (`name=action;...`,
//! [`fail::FailScenario`]) or with `PUT /debug/failpoints/<name>` on the client port
//! (body: the action, e.g. `panic`, `1*off->panic`, `sleep(500)`, `off`); in those
//! builds a failpoint's `panic` aborts the process: a crash at that exact point.
//!
//! The names live here because every crate with points may depend on `concord-storage`
//! except `concord-mvcc` (it may depend on RocksDB only): mvcc declares its four
//! (compaction, defrag) itself with the same strings, and `concord-server`'s tests check
//! they are the ones listed in [`ALL`].

/// Before a batch of entries and hard state is written to the WAL.
pub const WAL_BEFORE_APPEND: &str = "wal_before_append";
/// After the WAL write, before its fsync.
pub const WAL_BEFORE_FSYNC: &str = "wal_before_fsync";
/// After the WAL batch is fsynced.
pub const WAL_AFTER_FSYNC: &str = "wal_after_fsync";
/// Before Raft's `persisted_messages` (votes, append responses) are sent.
pub const RAFT_BEFORE_SEND_PERSISTED: &str = "raft_before_send_persisted";
/// After Raft's `persisted_messages` are handed to the transport.
pub const RAFT_AFTER_SEND_PERSISTED: &str = "raft_after_send_persisted";
/// Before a batch of committed commands is applied to the store.
pub const APPLY_BEFORE_BATCH: &str = "apply_before_batch";
/// After the commands are applied in memory, before the RocksDB write batch.
pub const APPLY_BEFORE_COMMIT: &str = "apply_before_commit";
/// After the RocksDB write batch (data + applied index), before watchers and waiters.
pub const APPLY_AFTER_COMMIT: &str = "apply_after_commit";
/// Before a finished snapshot file is fsynced and renamed into place.
pub const SNAPSHOT_BEFORE_SAVE: &str = "snapshot_before_save";
/// After a snapshot file is in place.
pub const SNAPSHOT_AFTER_SAVE: &str = "snapshot_after_save";
/// Before a snapshot is streamed to a lagging follower.
pub const SNAPSHOT_BEFORE_SEND: &str = "snapshot_before_send";
/// After a snapshot stream to a follower ended.
pub const SNAPSHOT_AFTER_SEND: &str = "snapshot_after_send";
/// When a follower starts receiving a snapshot stream.
pub const SNAPSHOT_BEFORE_RECEIVE: &str = "snapshot_before_receive";
/// After a received snapshot is verified and saved, before Raft sees it.
pub const SNAPSHOT_AFTER_RECEIVE: &str = "snapshot_after_receive";
/// Before the state machine replaces its store with a snapshot image.
pub const SNAPSHOT_BEFORE_INSTALL: &str = "snapshot_before_install";
/// After the store was replaced with a snapshot image.
pub const SNAPSHOT_AFTER_INSTALL: &str = "snapshot_after_install";
/// mvcc: a compaction removed history from the key index, records not yet deleted.
pub const COMPACT_BEFORE_DELETE: &str = "compact_before_delete";
/// mvcc: records deleted and `compact_finished` written.
pub const COMPACT_AFTER_FINISH: &str = "compact_after_finish";
/// mvcc: a defragmentation is about to start.
pub const DEFRAG_BEFORE: &str = "defrag_before";
/// mvcc: between two column families of a defragmentation.
pub const DEFRAG_DURING: &str = "defrag_during";

/// Planted bug (simulation only): a linearizable read skips the ReadIndex round and
/// reads whatever this member has applied.
pub const BUG_READ_WITHOUT_READ_INDEX: &str = "bug_read_without_read_index";
/// Planted bug (simulation only): the WAL reports a batch durable without its fsync, so
/// Raft acknowledges entries a crash can still take away.
pub const BUG_ACK_BEFORE_FSYNC: &str = "bug_ack_before_fsync";
/// Planted bug (simulation only): the apply thread applies the last command of every
/// batch a second time.
pub const BUG_APPLY_TWICE: &str = "bug_apply_twice";

/// The planted bugs: failpoints that make Concord wrong on purpose, so tests can show
/// the simulation's checkers catch each one. Armed with `return`; never drawn by the
/// random crash faults (they are not in [`ALL`]).
pub const PLANTED_BUGS: &[&str] = &[
    BUG_READ_WITHOUT_READ_INDEX,
    BUG_ACK_BEFORE_FSYNC,
    BUG_APPLY_TWICE,
];

/// Whether planted bug `name` is armed (always false without the `failpoints` feature).
pub fn planted(name: &str) -> bool {
    #[cfg(feature = "failpoints")]
    {
        fail::fail_point!(name, |_| true);
    }
    let _ = name;
    false
}

/// Every failpoint, in the order a write meets them.
pub const ALL: &[&str] = &[
    WAL_BEFORE_APPEND,
    WAL_BEFORE_FSYNC,
    WAL_AFTER_FSYNC,
    RAFT_BEFORE_SEND_PERSISTED,
    RAFT_AFTER_SEND_PERSISTED,
    APPLY_BEFORE_BATCH,
    APPLY_BEFORE_COMMIT,
    APPLY_AFTER_COMMIT,
    SNAPSHOT_BEFORE_SAVE,
    SNAPSHOT_AFTER_SAVE,
    SNAPSHOT_BEFORE_SEND,
    SNAPSHOT_AFTER_SEND,
    SNAPSHOT_BEFORE_RECEIVE,
    SNAPSHOT_AFTER_RECEIVE,
    SNAPSHOT_BEFORE_INSTALL,
    SNAPSHOT_AFTER_INSTALL,
    COMPACT_BEFORE_DELETE,
    COMPACT_AFTER_FINISH,
    DEFRAG_BEFORE,
    DEFRAG_DURING,
];

#[cfg(test)]
mod tests {
    #[test]
    fn names_are_unique() {
        let mut names = super::ALL.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), super::ALL.len());
        assert!(super::PLANTED_BUGS.iter().all(|b| !super::ALL.contains(b)));
    }
}
