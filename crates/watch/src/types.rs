//! What the hub speaks: keys and events, the store's [`History`], watch requests
//! ([`WatchSpec`]) and what a stream answers ([`Response`]).

use crate::*;

/// A key's state, as etcd's `mvccpb.KeyValue`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    pub value: Vec<u8>,
    pub lease: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change. A delete carries only the key and its `mod_revision` (the deleting
/// revision), as in etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub kv: KeyValue,
    pub prev_kv: Option<KeyValue>,
}

impl Event {
    pub(crate) fn revision(&self) -> i64 {
        self.kv.mod_revision
    }

    pub(crate) fn size(&self) -> usize {
        48 + self.kv.key.len() + self.kv.value.len()
    }

    /// A put that created the key (no previous version to report).
    pub(crate) fn is_create(&self) -> bool {
        self.kind == EventKind::Put && self.kv.version == 1
    }
}

/// Why [`History::events`] could not answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HistoryError {
    /// `from` is below the oldest revision kept; the payload is that revision.
    Compacted(i64),
    Failed(String),
}

/// What the hub needs from the store.
pub trait History: Send + Sync + 'static {
    /// Every event with a revision in `from..=to`, in revision order (and change order
    /// within a revision), without `prev_kv`. May stop early, but only at the end of a
    /// revision, once `max_events` or `max_bytes` is reached.
    fn events(
        &self,
        from: i64,
        to: i64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Vec<Event>, HistoryError>;

    /// `key` as it was at `revision`, if it existed and that revision is still kept.
    fn value_at(&self, key: &[u8], revision: i64) -> Option<KeyValue>;
}

/// Tuning. The defaults suit a server; tests shrink the outbox.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// How often watchers created with `progress_notify` get an empty response if no
    /// event was sent to them since the last one (etcd: 10 minutes).
    pub progress_notify_interval: Duration,
    /// Event responses a stream may have queued before its watchers are moved aside.
    pub max_queued_responses: usize,
    /// Event bytes a stream may have queued before its watchers are moved aside.
    pub max_queued_bytes: usize,
    /// Events read from history per catch-up step.
    pub catch_up_events: usize,
    /// Bytes read from history per catch-up step.
    pub catch_up_bytes: usize,
}

impl Default for HubOptions {
    fn default() -> Self {
        HubOptions {
            progress_notify_interval: Duration::from_secs(600),
            max_queued_responses: 256,
            max_queued_bytes: 4 << 20,
            catch_up_events: 1000,
            // etcd bounds a catch-up response by revisions only (1000); the byte bound
            // keeps one slow watcher's page from pinning unbounded memory.
            catch_up_bytes: 8 << 20,
        }
    }
}

/// What a client asks to watch, in etcd's terms.
#[derive(Debug, Clone, Default)]
pub struct WatchSpec {
    /// 0 lets the stream pick the id (the lowest unused one, counting from 0).
    pub watch_id: i64,
    pub key: Vec<u8>,
    /// Empty: just `key`; `[0]`: every key `>= key`; else `[key, range_end)`.
    pub range_end: Vec<u8>,
    /// First revision to report; 0 is "the current revision + 1".
    pub start_revision: i64,
    pub prev_kv: bool,
    pub progress_notify: bool,
    pub no_put: bool,
    pub no_delete: bool,
    /// Passed back in [`Response::Events`] for the RPC layer.
    pub fragment: bool,
}

/// etcd's text for a create that reuses an id on the stream.
pub const ERR_DUPLICATE_ID: &str = "mvcc: duplicate watch ID provided on the WatchStream";
/// etcd's text for a range that selects nothing.
pub const ERR_EMPTY_RANGE: &str = "mvcc: watcher range is empty";

/// What a stream sends its client, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Created {
        watch_id: i64,
        revision: i64,
    },
    /// The create was refused (`watch_id` is -1 as in etcd).
    CreateFailed {
        watch_id: i64,
        revision: i64,
        reason: String,
    },
    /// Shared between the watchers that got the same events (the common case of a
    /// revision fanned out unchanged), so publishing copies no keys or values.
    Events {
        watch_id: i64,
        revision: i64,
        events: Arc<[Event]>,
        fragment: bool,
        /// The watcher asked for `prev_kv` (filled in by [`WatchStream::next`]).
        prev_kv: bool,
    },
    /// A bookmark: `watch_id` is -1 for a stream-wide `RequestProgress` answer.
    Progress {
        watch_id: i64,
        revision: i64,
    },
    Canceled {
        watch_id: i64,
        revision: i64,
        /// Set when the watcher was owed compacted history.
        compact_revision: i64,
    },
}

impl Response {
    pub(crate) fn size(&self) -> usize {
        match self {
            Response::Events { events, .. } => events.iter().map(Event::size).sum(),
            _ => 0,
        }
    }
}
