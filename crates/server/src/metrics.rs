//! The member's own metrics (etcd's names, labels, help texts and buckets): apply,
//! snapshots, learners, leases, and the member's identity; recorded through the
//! `metrics` facade. [`HISTOGRAMS`] and [`describe_all`] gather every crate's, for the
//! binary's exporter.

use ::metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge};

pub const APPLIED: &str = "etcd_server_proposals_applied_total";
pub const SLOW_APPLY: &str = "etcd_server_slow_apply_total";
pub const SNAPSHOT_APPLY: &str = "etcd_server_snapshot_apply_in_progress_total";
pub const LEARNER_PROMOTED: &str = "etcd_server_learner_promote_successes";
pub const QUOTA: &str = "etcd_server_quota_backend_bytes";
pub const ID: &str = "etcd_server_id";
pub const VERSION: &str = "etcd_server_version";
pub const CLUSTER_VERSION: &str = "etcd_cluster_version";
pub const LEASE_GRANTED: &str = "etcd_debugging_lease_granted_total";
pub const LEASE_REVOKED: &str = "etcd_debugging_lease_revoked_total";
pub const LEASE_RENEWED: &str = "etcd_debugging_lease_renewed_total";
pub const LEASE_TTL: &str = "etcd_debugging_lease_ttl_total";
pub const LEASE_EXPIRED: &str = "etcd_debugging_server_lease_expired_total";

/// etcd's warning threshold for one apply (`warnApplyDuration`).
pub const SLOW_APPLY_AFTER: std::time::Duration = std::time::Duration::from_millis(100);

/// etcd's lease TTL buckets: 1 s doubling to about 97 days.
const LEASE_TTL_BUCKETS: [f64; 24] = {
    let mut b = [0.0; 24];
    let mut i = 0;
    while i < 24 {
        b[i] = (1u64 << i) as f64;
        i += 1;
    }
    b
};

/// Every histogram recorded in the process, with etcd's buckets.
pub fn histograms() -> Vec<(&'static str, &'static [f64])> {
    let mut h: Vec<(&'static str, &'static [f64])> = vec![(LEASE_TTL, &LEASE_TTL_BUCKETS)];
    h.extend_from_slice(concord_storage::metrics::HISTOGRAMS);
    h.extend_from_slice(concord_consensus::metrics::HISTOGRAMS);
    h.extend_from_slice(concord_mvcc::metrics::HISTOGRAMS);
    h.extend_from_slice(concord_gateway::telemetry::HISTOGRAMS);
    h
}

/// Describes (and registers at zero) every crate's metrics; call once a recorder is
/// installed.
pub fn describe_all() {
    concord_storage::metrics::describe();
    concord_consensus::metrics::describe();
    concord_mvcc::metrics::describe();
    concord_watch::metrics::describe();
    concord_gateway::telemetry::describe();
    describe_gauge!(APPLIED, "The total number of consensus proposals applied.");
    describe_counter!(
        SLOW_APPLY,
        "The total number of slow apply requests (likely overloaded from slow disk)."
    );
    describe_gauge!(
        SNAPSHOT_APPLY,
        "1 if the server is applying the incoming snapshot. 0 if none."
    );
    describe_counter!(
        LEARNER_PROMOTED,
        "The total number of successful learner promotions while this member is leader."
    );
    describe_gauge!(QUOTA, "Current backend storage quota size in bytes.");
    describe_gauge!(
        ID,
        "Server or member ID in hexadecimal format. 1 for 'server_id' label with current ID."
    );
    describe_gauge!(
        VERSION,
        "Which version is running. 1 for 'server_version' label with current version."
    );
    describe_gauge!(
        CLUSTER_VERSION,
        "Which version is running. 1 for 'cluster_version' label with current cluster version"
    );
    describe_counter!(LEASE_GRANTED, "The total number of granted leases.");
    describe_counter!(LEASE_REVOKED, "The total number of revoked leases.");
    describe_counter!(
        LEASE_RENEWED,
        "The number of renewed leases seen by the leader."
    );
    describe_histogram!(LEASE_TTL, "Bucketed histogram of lease TTLs.");
    describe_counter!(LEASE_EXPIRED, "The total number of expired leases.");
    gauge!(APPLIED).increment(0.0);
    gauge!(SNAPSHOT_APPLY).increment(0.0);
    for c in [
        SLOW_APPLY,
        LEARNER_PROMOTED,
        LEASE_GRANTED,
        LEASE_REVOKED,
        LEASE_RENEWED,
        LEASE_EXPIRED,
    ] {
        counter!(c).increment(0);
    }
    let _ = ::metrics::histogram!(LEASE_TTL);
}

/// The member's identity and limits, as etcd publishes them at start.
pub fn record_member(member_id: u64, quota_bytes: i64) {
    gauge!(ID, "server_id" => format!("{member_id:x}")).set(1.0);
    gauge!(VERSION, "server_version" => concord_gateway::http::ETCD_API_VERSION).set(1.0);
    // etcd writes the cluster version as major.minor.
    let cluster = concord_gateway::http::ETCD_CLUSTER_VERSION
        .rsplit_once('.')
        .map_or(concord_gateway::http::ETCD_CLUSTER_VERSION, |(mm, _)| mm);
    gauge!(CLUSTER_VERSION, "cluster_version" => cluster).set(1.0);
    gauge!(QUOTA).set(quota_bytes as f64);
}
