//! The WAL's metrics (etcd's names, help texts and buckets), recorded through the
//! `metrics` facade; a binary that installs an exporter calls [`describe`] and gives
//! the exporter [`HISTOGRAMS`].

pub const WAL_FSYNC_SECONDS: &str = "etcd_disk_wal_fsync_duration_seconds";
/// A gauge in etcd (3.4 and 3.5), though named like a counter.
pub const WAL_WRITE_BYTES: &str = "etcd_disk_wal_write_bytes_total";

/// etcd's disk latency buckets: 1 ms doubling to 8.192 s.
pub const DISK_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096,
    8.192,
];

pub const HISTOGRAMS: &[(&str, &[f64])] = &[(WAL_FSYNC_SECONDS, DISK_BUCKETS)];

pub fn describe() {
    ::metrics::describe_histogram!(
        WAL_FSYNC_SECONDS,
        "The latency distributions of fsync called by WAL."
    );
    ::metrics::describe_gauge!(WAL_WRITE_BYTES, "Total number of bytes written in WAL.");
    // Present from the start, as etcd's.
    let _ = ::metrics::histogram!(WAL_FSYNC_SECONDS);
    ::metrics::gauge!(WAL_WRITE_BYTES).increment(0.0);
}
