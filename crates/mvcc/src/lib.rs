//! # concord-mvcc
//!
//! etcd's multi-version key-value store on RocksDB: every write transaction creates a
//! new main revision, every change in it a sub revision; every revision of every key is
//! kept until compaction, so reads at past revisions (and, later, watches from them)
//! work. Keys carry etcd's `create_revision`, `mod_revision`, `version` and `lease`.
//!
//! Owns: the on-disk layout (column family `kv`, keyed by revision; `meta` for the
//! compaction marks, the consistent index and caller metadata; `lease` and `alarm` for
//! the caller's lease and alarm records, which are replicated state), the in-memory key
//! index, range / put / delete / txn semantics exactly as etcd's applier evaluates them,
//! compaction in the background, point-in-time images for Raft snapshots and backups
//! ([`Store::export`], [`Store::import`], [`inspect_image`] for offline tools), and
//! maintenance: etcd's `HashKV` ([`Store::hash_kv`], equal on every replica at the same
//! revision), a hash of all records ([`Store::hash`]), online defragmentation
//! ([`Store::defragment`]) and the size a quota is checked against ([`Store::db_size`]).
//!
//! Not: a network API, leases (a [`LeaseLookup`] answers whether one exists), or
//! durability policy beyond one synced RocksDB write per [`Writer::commit`]. This is the
//! only crate that names RocksDB types; none cross its boundary.
//!
//! Key types: [`Store`] (open, read, [`Store::writer`]), [`Writer`] (a batch of write
//! transactions committed with one write), the request/response types in [`types`].

mod codec;
mod error;
pub mod failpoints;
mod index;
mod maintenance;
mod snapshot;
mod store;
pub mod types;

pub use error::{Error, Result};
pub use maintenance::KvHash;
pub use snapshot::{Export, ImageInfo, inspect_image};
pub use store::{CompactWait, LeaseLookup, NoLeases, Store, StoreOptions, Writer};
pub use types::*;
