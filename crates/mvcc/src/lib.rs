//! # concord-mvcc
//!
//! etcd's multi-version key-value store on RocksDB: every write transaction creates a
//! new main revision, every change in it a sub revision; every revision of every key is
//! kept until compaction, so reads at past revisions (and, later, watches from them)
//! work. Keys carry etcd's `create_revision`, `mod_revision`, `version` and `lease`.
//!
//! Owns: the on-disk layout (column family `kv`, keyed by revision; `meta` for the
//! compaction marks, the consistent index and caller metadata; `aux`, one keyspace of
//! the caller's own replicated tables, keyed `<table>/<key>`, written with
//! [`Writer::put_aux`] in the same batch as the data and read with [`Store::aux`] and
//! [`Store::aux_scan`]), the in-memory key index, range / put / delete / txn semantics
//! exactly as etcd's applier evaluates them, compaction in the background,
//! point-in-time images for Raft snapshots and backups ([`Store::export`],
//! [`Store::import`], [`inspect_image`] for offline tools; format v4, v1 to v3 still
//! import), and maintenance: etcd's `HashKV` ([`Store::hash_kv`], equal on every
//! replica at the same revision), a hash of all records ([`Store::hash`]), online
//! defragmentation ([`Store::defragment`]) and the size a quota is checked against
//! ([`Store::db_size`]).
//!
//! Not: a network API, leases (a [`LeaseLookup`] answers whether one exists), the
//! meaning of the caller's tables, or durability policy beyond one synced RocksDB write
//! per [`Writer::commit`]. The store knows no table names but one legacy mapping:
//! records that older data directories and images v1 to v3 kept in lease, alarm and
//! state column families or frames are read into the aux tables [`LEGACY_TABLES`]
//! (`lease`, `alarm`, `state`). This is the only crate that names RocksDB types; none
//! cross its boundary.
//!
//! Key types: [`Store`] (open, read, [`Store::writer`]), [`Writer`] (a batch of write
//! transactions committed with one write), the request/response types in [`types`].

mod auxiliary;
mod codec;
mod error;
pub mod failpoints;
mod index;
mod maintenance;
pub mod metrics;
mod snapshot;
mod store;
pub mod types;

pub use auxiliary::LEGACY_TABLES;
pub use error::{Error, Result};
pub use maintenance::KvHash;
pub use snapshot::{Export, ImageInfo, inspect_image};
pub use store::{CompactWait, LeaseLookup, NoLeases, Store, StoreOptions, Writer};
pub use types::*;
