//! # concord-watch
//!
//! etcd's watch machinery as a reusable hub: watchers on single keys and key ranges,
//! grouped in client streams, fed the events of each committed revision, caught up from
//! history when they start in the past or fall behind, and told about progress.
//!
//! Owns: the watcher registry ([`Hub`]), the per-stream outbox ([`WatchStream`]), the
//! rules that give etcd's guarantees, and the catch-up thread.
//!
//! Not: storage, RPC or protobuf. The store behind it implements [`History`] (events
//! between two revisions, a key's value at a revision); the code that commits writes
//! calls [`Hub::publish`] once per revision, in revision order; an RPC layer turns
//! [`Response`]s into wire messages.
//!
//! ## How the guarantees are kept
//!
//! * A watcher is either **synced** (it has every matching event up to the hub's current
//!   revision queued, and is in the key index, so [`Hub::publish`] feeds it) or
//!   **unsynced** (it is owed events from `next_rev` on and the catch-up thread reads
//!   them from [`History`]). New watchers starting at or before the current revision
//!   begin unsynced.
//! * Each stream has a bounded outbox. When [`Hub::publish`] finds a watcher's outbox
//!   full, the watcher is moved aside (unsynced, `next_rev` = that revision) instead of
//!   waiting, so a client that never reads slows neither writes nor other streams, and
//!   the memory it pins is bounded by the outbox limits. It is caught up from history,
//!   in order, once its client reads again.
//! * All events of one revision that match a watcher go into one response (atomic);
//!   catch-up responses end at revision boundaries. Responses of a watcher are queued in
//!   revision order and `next_rev` only moves forward (ordered, unique, reliable).
//! * Progress (per-watcher `progress_notify` and a stream's `RequestProgress`) is only
//!   reported for synced watchers, at the hub's current revision, so a bookmark at `R`
//!   means every event up to `R` was queued before it. A stream's `RequestProgress` with
//!   unsynced watchers is answered as soon as they are all synced.
//! * A watcher owed events older than the history's compaction point is cancelled with
//!   the compaction revision, as etcd does.

mod catchup;
mod hub;
mod interval;
pub mod metrics;
mod state;
mod stream;
mod types;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use catchup::*;
pub use hub::Hub;
pub use interval::{End, IntervalMap};
use state::*;
pub use stream::WatchStream;
pub use types::*;

#[cfg(test)]
mod tests;
