//! The store's metrics (etcd's names, help texts and buckets), recorded through the
//! `metrics` facade; a binary that installs an exporter calls [`describe`] and gives
//! the exporter [`HISTOGRAMS`].

use ::metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge};

pub const PUT: &str = "etcd_mvcc_put_total";
pub const DELETE: &str = "etcd_mvcc_delete_total";
pub const RANGE: &str = "etcd_mvcc_range_total";
pub const TXN: &str = "etcd_mvcc_txn_total";
pub const DB_SIZE: &str = "etcd_mvcc_db_total_size_in_bytes";
pub const DB_SIZE_IN_USE: &str = "etcd_mvcc_db_total_size_in_use_in_bytes";
pub const DEBUGGING_DB_SIZE: &str = "etcd_debugging_mvcc_db_total_size_in_bytes";
pub const KEYS: &str = "etcd_debugging_mvcc_keys_total";
pub const CURRENT_REVISION: &str = "etcd_debugging_mvcc_current_revision";
pub const COMPACT_REVISION: &str = "etcd_debugging_mvcc_compact_revision";
pub const HASH_SECONDS: &str = "etcd_mvcc_hash_duration_seconds";
pub const COMMIT_SECONDS: &str = "etcd_disk_backend_commit_duration_seconds";
pub const DEFRAG_SECONDS: &str = "etcd_disk_backend_defrag_duration_seconds";
pub const SNAPSHOT_SECONDS: &str = "etcd_disk_backend_snapshot_duration_seconds";
pub const DEFRAG_INFLIGHT: &str = "etcd_disk_defrag_inflight";

const fn doubling<const N: usize>(start: f64) -> [f64; N] {
    let mut b = [0.0; N];
    let mut i = 0;
    let mut v = start;
    while i < N {
        b[i] = v;
        v *= 2.0;
        i += 1;
    }
    b
}

const COMMIT_BUCKETS: [f64; 14] = doubling(0.001);
const DEFRAG_BUCKETS: [f64; 13] = doubling(0.1);
const SNAPSHOT_BUCKETS: [f64; 17] = doubling(0.01);
const HASH_BUCKETS: [f64; 15] = doubling(0.01);

pub const HISTOGRAMS: &[(&str, &[f64])] = &[
    (COMMIT_SECONDS, &COMMIT_BUCKETS),
    (DEFRAG_SECONDS, &DEFRAG_BUCKETS),
    (SNAPSHOT_SECONDS, &SNAPSHOT_BUCKETS),
    (HASH_SECONDS, &HASH_BUCKETS),
];

pub fn describe() {
    describe_counter!(PUT, "Total number of puts seen by this member.");
    describe_counter!(DELETE, "Total number of deletes seen by this member.");
    describe_counter!(RANGE, "Total number of ranges seen by this member.");
    describe_counter!(TXN, "Total number of txns seen by this member.");
    describe_gauge!(
        DB_SIZE,
        "Total size of the underlying database physically allocated in bytes."
    );
    describe_gauge!(
        DEBUGGING_DB_SIZE,
        "Total size of the underlying database physically allocated in bytes."
    );
    describe_gauge!(
        DB_SIZE_IN_USE,
        "Total size of the underlying database logically in use in bytes."
    );
    describe_gauge!(KEYS, "Total number of keys.");
    describe_gauge!(CURRENT_REVISION, "The current revision of store.");
    describe_gauge!(
        COMPACT_REVISION,
        "The revision of the last compaction in store."
    );
    describe_histogram!(
        HASH_SECONDS,
        "The latency distribution of storage hash operation."
    );
    describe_histogram!(
        COMMIT_SECONDS,
        "The latency distributions of commit called by backend."
    );
    describe_histogram!(
        DEFRAG_SECONDS,
        "The latency distribution of backend defragmentation."
    );
    describe_histogram!(
        SNAPSHOT_SECONDS,
        "The latency distribution of backend snapshots."
    );
    describe_gauge!(
        DEFRAG_INFLIGHT,
        "Whether or not defrag is active on the member. 1 means active, 0 means not."
    );
    for c in [PUT, DELETE, RANGE, TXN] {
        counter!(c).increment(0);
    }
    for g in [
        DB_SIZE,
        DB_SIZE_IN_USE,
        DEBUGGING_DB_SIZE,
        KEYS,
        CURRENT_REVISION,
        COMPACT_REVISION,
        DEFRAG_INFLIGHT,
    ] {
        gauge!(g).increment(0.0);
    }
    for (h, _) in HISTOGRAMS {
        let _ = ::metrics::histogram!(*h);
    }
}

/// The operations one transaction ran, counted as etcd counts them when the
/// transaction ends: each range, put and delete, and the transaction itself when it
/// ran more than one operation.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct OpCounts {
    pub ranges: u64,
    pub puts: u64,
    pub deletes: u64,
}

impl OpCounts {
    pub(crate) fn record(self) {
        if self.ranges + self.puts + self.deletes > 1 {
            counter!(TXN).increment(1);
        }
        if self.ranges > 0 {
            counter!(RANGE).increment(self.ranges);
        }
        if self.puts > 0 {
            counter!(PUT).increment(self.puts);
        }
        if self.deletes > 0 {
            counter!(DELETE).increment(self.deletes);
        }
    }
}

/// The store's sizes (physically allocated, and in use), as Maintenance `Status`
/// reports them.
pub(crate) fn record_sizes(total: i64, in_use: i64) {
    gauge!(DB_SIZE).set(total as f64);
    gauge!(DEBUGGING_DB_SIZE).set(total as f64);
    gauge!(DB_SIZE_IN_USE).set(in_use as f64);
}
