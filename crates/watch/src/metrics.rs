//! The hub's metrics (etcd's names and help texts), recorded through the `metrics`
//! facade; a binary that installs an exporter calls [`describe`].

use ::metrics::{counter, describe_counter, describe_gauge, gauge};

pub const WATCHERS: &str = "etcd_debugging_mvcc_watcher_total";
pub const STREAMS: &str = "etcd_debugging_mvcc_watch_stream_total";
pub const SLOW_WATCHERS: &str = "etcd_debugging_mvcc_slow_watcher_total";
pub const EVENTS: &str = "etcd_debugging_mvcc_events_total";

pub fn describe() {
    describe_gauge!(WATCHERS, "Total number of watchers.");
    describe_gauge!(STREAMS, "Total number of watch streams.");
    describe_gauge!(SLOW_WATCHERS, "Total number of unsynced slow watchers.");
    describe_counter!(EVENTS, "Total number of events sent by this member.");
    for g in [WATCHERS, STREAMS, SLOW_WATCHERS] {
        gauge!(g).increment(0.0);
    }
    counter!(EVENTS).increment(0);
}

/// Events queued for watchers.
pub(crate) fn sent(events: usize) {
    if events > 0 {
        counter!(EVENTS).increment(events as u64);
    }
}

impl crate::State {
    /// Publishes the hub's sizes; called where watchers or streams come and go, or a
    /// watcher is moved aside or back.
    pub(crate) fn record_gauges(&self) {
        gauge!(WATCHERS).set(self.watchers.len() as f64);
        gauge!(STREAMS).set(self.streams.len() as f64);
        gauge!(SLOW_WATCHERS).set(self.unsynced.len() as f64);
    }
}
