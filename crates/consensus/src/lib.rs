//! # concord-consensus
//!
//! Raft for Concord, on TiKV's raft-rs, generic over the state machine it replicates.
//!
//! Owns: the one thread that owns `raft::RawNode` and processes its `Ready` in
//! raft-rs's documented order (with the WAL of `concord-storage` for durability, one
//! fsync per Ready); the apply thread that feeds committed entries to a
//! [`StateMachine`] and completes proposals by id; ReadIndex with concurrent reads
//! batched into one round; snapshots every `snapshot_count` entries, log compaction,
//! and sending and installing snapshots in chunks; the peer [`Transport`] (gRPC in
//! [`grpc`], in-process with fault filters in [`local`]); pre-vote and check-quorum.
//!
//! Membership: one voter or learner added, promoted or removed at a time
//! ([`Handle::propose_change`]); Raft takes the change when it is committed, the state
//! machine records it ([`StateMachine::apply_change`]), and on restart the changes the
//! state machine has applied are replayed from the log into Raft's configuration.
//!
//! Tracing: a proposal's OpenTelemetry context travels in its Raft entry to the
//! leader and to every member that applies it, with forward, proposal, commit and
//! apply spans (the `trace` module; nothing is recorded for untraced proposals).
//!
//! Not: what the commands mean (the state machine's business), client-facing errors
//! (callers map [`Error`]), or where members are reached (the transport's business).
//!
//! Key types: [`start`] → [`Node`] with a [`Handle`] (propose, read_index, status),
//! [`StateMachine`], [`Config`], [`Transport`] and [`Inbox`]. raft-rs's types do not
//! appear in the API except in [`Transport`], which transports implement.

mod codec;
mod error;
pub mod grpc;
pub mod local;
mod log;
mod logger;
mod membership;
pub mod metrics;
mod node;
mod trace;
mod transport;

#[allow(clippy::all, missing_docs)]
pub(crate) mod peerpb {
    tonic::include_proto!("concord.peer");
}

pub use error::{Error, Result};
pub use membership::{ChangeKind, Configuration, MemberChange};
pub use node::{Committed, Config, Handle, Node, Role, StateMachine, Status, start};
pub use transport::{Attributes, AttributesFuture, Inbox, Transport};
