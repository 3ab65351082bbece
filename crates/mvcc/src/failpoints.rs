//! This crate's failpoint names. The catalogue of every name is
//! `concord_storage::failpoints` (mvcc may not depend on it); `concord-server`'s tests
//! check these strings are listed there.

/// A compaction removed history from the key index; its records are not deleted yet.
pub const COMPACT_BEFORE_DELETE: &str = "compact_before_delete";
/// A compaction deleted its records and wrote `compact_finished`.
pub const COMPACT_AFTER_FINISH: &str = "compact_after_finish";
/// A defragmentation is about to start.
pub const DEFRAG_BEFORE: &str = "defrag_before";
/// Between two column families of a defragmentation.
pub const DEFRAG_DURING: &str = "defrag_during";

/// Every name above.
pub const ALL: &[&str] = &[
    COMPACT_BEFORE_DELETE,
    COMPACT_AFTER_FINISH,
    DEFRAG_BEFORE,
    DEFRAG_DURING,
];
