//! # concord-cli
//!
//! `concordctl`, Concord's ops CLI. Today it has etcdctl's `snapshot` commands:
//!
//! - `snapshot save FILE`: downloads a member's image through the etcd
//!   `Maintenance/Snapshot` RPC (image chunks, then the SHA-256 of the image as the
//!   last 32 bytes, etcd's layout), checks the digest, and writes FILE atomically
//!   (`FILE.part`, fsync, rename).
//! - `snapshot status FILE`: hash, revision, total keys and total size of a snapshot
//!   file, in etcdctl's simple, JSON or table output.
//! - `snapshot restore FILE`: offline, like `etcdutl snapshot restore`: builds a new
//!   member's data directory from a snapshot file: the store holds the image's history,
//!   leases and alarms, and no Raft log and no identity, so the `concord` started on it
//!   bootstraps a new cluster from its `--initial-cluster` flags, which must be the
//!   ones given to the restore.
//!
//! Owns: the snapshot file format on the client side ([`snapshot`]) and etcdctl's
//! output formats ([`format`]). Not: the image format itself (`concord-mvcc`), or a
//! server: `restore` writes a data directory with `concord-mvcc` and never talks to one.
//!
//! Depends on `concord-proto` (a gRPC client) and, for the offline tools, on
//! `concord-mvcc`, as `DESIGN.md` allows.

pub mod format;
pub mod snapshot;
