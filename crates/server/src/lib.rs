//! # concord-server
//!
//! The Concord member and the `concord` binary. A [`Member`] is built from its
//! configuration ([`config`]) and an `Arc<dyn Transport>`: it opens the store, runs the
//! apply loop ([`apply`]) that turns write commands into store batches, and serves the
//! etcd API with one backend value per service over a shared core (KV, Watch, Lease,
//! Maintenance, Cluster, health), handed to the gateway as `concord_gateway::Backends`.
//! Its background tasks (lease clocks and checkpoints, membership watchers, peers'
//! attributes) run in one [`tasks::Tasks`] set and wait on the consensus state signal.
//! The binary (`main.rs`) only wires listeners and the gRPC peer transport around it.
//!
//! Key types: [`Member`], [`config::Config`], [`apply::KvMachine`] (the state machine),
//! [`error::Error`], [`identity::Identity`].
//!
//! Owns: configuration and etcd's flags, member identity (cluster and member ids, the
//! term), the command path from a request to a durable store write, leases, and
//! composing the crates into a process.
//!
//! Leases ([`lease`]): granted, revoked and checkpointed through the log; only the
//! leader runs their clocks. The leader records each lease's remaining TTL in the log
//! about every second (`--lease-checkpoint-interval`) once it has run down, and restores
//! the full TTL in the log before answering a keep-alive that needs it. So a new leader
//! continues each lease from its recorded remaining TTL: a dead client's lease outlives
//! a leader change by about one interval at most (etcd restarts it at the full TTL), and
//! a lease with an answered keep-alive never expires early because leadership moved.
//!
//! Maintenance ([`alarm`], `maintenance.rs`): the alarm list is replicated state (an
//! `Alarm` command through the log, stored in mvcc, in snapshot images); `NOSPACE` is
//! raised by the member whose store reaches `--quota-backend-bytes` and then refuses
//! puts, txns that put and lease grants on every member until disarmed, `CORRUPT`
//! refuses every write. `Status`, `Hash`, `HashKV`, online `Defragment`, `Snapshot`
//! (a point-in-time store image) and `MoveLeader` are served as etcd serves them.
//!
//! Not: the wire protocol or its checks (`concord-gateway`), revision semantics
//! (`concord-mvcc`). This crate adds policy, not mechanism.

pub mod alarm;
pub mod apply;
pub mod auth;
mod auth_api;
mod cluster;
pub mod config;
pub mod convert;
mod core;
pub mod error;
pub mod failpoints;
mod forward;
pub mod identity;
mod kv;
pub mod lease;
mod lease_node;
mod maintenance;
pub mod member;
pub mod membership;
pub mod metrics;
pub mod tasks;
pub mod tls;
pub mod trace;
pub mod watch;

pub use member::Member;
