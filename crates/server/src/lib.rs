//! # concord-server
//!
//! The Concord member and the `concord` binary. It loads the configuration ([`config`]),
//! opens the store, runs the apply loop ([`apply`]) that turns write commands into
//! store batches, and serves the etcd API by implementing the gateway's backend traits
//! on [`node::Node`].
//!
//! Owns: configuration and etcd's flags, member identity (cluster and member ids, the
//! term), the command path from a request to a durable store write, and composing the
//! crates into a process.
//!
//! Not: the wire protocol or its checks (`concord-gateway`), revision semantics
//! (`concord-mvcc`). This crate adds policy, not mechanism.

pub mod apply;
pub mod config;
pub mod convert;
pub mod node;
pub mod watch;
