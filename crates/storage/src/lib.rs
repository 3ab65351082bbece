//! # concord-storage
//!
//! The durable half of a Concord node's Raft state: the write-ahead log and the snapshot
//! files. Everything here is plain files in a directory, checked with CRC32C.
//!
//! **What it owns**
//!
//! - [`Wal`]: the Raft log as append-only segment files of length-prefixed, CRC32C-checked
//!   records (entries, hard state, snapshot marks). One fsync per [`Wal::append`] batch
//!   (group commit), Raft's suffix-overwrite semantics, segment rotation and release of old
//!   segments after a snapshot, and recovery on open: a torn tail is truncated (in
//!   [`RecoveryMode::TolerateTornTail`]), anything else that is damaged is an error. A failed
//!   write or fsync poisons the log for good: the node must stop, an fsync is never retried.
//! - [`SnapshotStore`]: the state machine's point-in-time images as self-checking files,
//!   written to a temporary path, fsynced and renamed into place, either from a local
//!   [`SnapshotWriter`] or from raw bytes received from a peer ([`ImportWriter`]), and read
//!   back as a body stream or as raw bytes to ship to a lagging follower ([`SnapshotFile`]).
//!
//! **What it is not**
//!
//! It knows nothing about Raft itself, protobuf or RocksDB: entry data and snapshot metadata
//! are opaque bytes encoded by the caller (the consensus crate), and a snapshot body is
//! whatever stream the state machine writes. It does no networking, no threading and no
//! caching of log entries; the caller keeps the in-memory log.
//!
//! **Key types**: [`Wal`], [`WalOptions`], [`Recovered`], [`Entry`], [`HardState`],
//! [`SnapshotMark`]; [`SnapshotStore`], [`SnapshotMeta`], [`SnapshotWriter`],
//! [`ImportWriter`], [`SnapshotFile`]; [`Error`] and [`Result`].

use std::path::PathBuf;

pub mod failpoints;
mod fsutil;
pub mod metrics;
pub mod snap;
pub mod wal;

pub use snap::{
    ImportWriter, MAX_SNAPSHOT_META_LEN, SnapshotFile, SnapshotMeta, SnapshotStore, SnapshotWriter,
};
pub use wal::{
    Entry, HardState, MAX_RECORD_LEN, Recovered, RecoveryMode, SnapshotMark, Wal, WalOptions,
};

/// Errors of the WAL and the snapshot store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("storage I/O error: {0}")]
    Io(#[from] std::io::Error),

    /// An earlier write or fsync failed. The state of the file on disk is unknown, so the
    /// log refuses all further work; the node must stop and recover from disk on restart.
    #[error("WAL is poisoned by an earlier failed write or fsync; the node must restart")]
    Poisoned,

    /// Damage that recovery must not paper over: a bad record with valid data after it, a
    /// bad record in a segment other than the last, a gap in the log, a missing segment.
    #[error("corrupt WAL segment {}: offset {offset}: {reason}", .segment.display())]
    Corrupt {
        segment: PathBuf,
        offset: u64,
        reason: String,
    },

    /// A torn tail found while opening in [`RecoveryMode::Strict`]; the file is untouched.
    #[error(
        "torn tail in WAL segment {} at offset {offset} ({bytes} bytes); refused in strict recovery mode",
        .segment.display()
    )]
    TornTail {
        segment: PathBuf,
        offset: u64,
        bytes: u64,
    },

    /// The caller asked for something that would leave an unrecoverable log (a gap, an entry
    /// below the snapshot). Nothing was written and the WAL is not poisoned.
    #[error("invalid WAL operation: {0}")]
    InvalidAppend(String),

    /// A single record (entry data or snapshot meta) is larger than the format allows.
    #[error("record of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u64, max: u64 },

    /// A snapshot file (or imported byte stream) failed its format or checksum check.
    #[error("corrupt snapshot {}: {reason}", .path.display())]
    CorruptSnapshot { path: PathBuf, reason: String },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
