//! The Raft node's and the peer transport's metrics (etcd's names, labels, help texts
//! and buckets), recorded through the `metrics` facade; a binary that installs an
//! exporter calls [`describe`] and gives the exporter [`HISTOGRAMS`].

pub const HAS_LEADER: &str = "etcd_server_has_leader";
pub const IS_LEADER: &str = "etcd_server_is_leader";
pub const IS_LEARNER: &str = "etcd_server_is_learner";
pub const LEADER_CHANGES: &str = "etcd_server_leader_changes_seen_total";
/// Gauges in etcd (the commit index), though named like counters.
pub const PROPOSALS_COMMITTED: &str = "etcd_server_proposals_committed_total";
pub const PROPOSALS_PENDING: &str = "etcd_server_proposals_pending";
pub const PROPOSALS_FAILED: &str = "etcd_server_proposals_failed_total";
pub const READ_INDEXES_FAILED: &str = "etcd_server_read_indexes_failed_total";
pub const SLOW_READ_INDEXES: &str = "etcd_server_slow_read_indexes_total";
pub const HEARTBEAT_SEND_FAILURES: &str = "etcd_server_heartbeat_send_failures_total";
pub const PEER_SENT_BYTES: &str = "etcd_network_peer_sent_bytes_total";
pub const PEER_RECEIVED_BYTES: &str = "etcd_network_peer_received_bytes_total";
pub const PEER_SENT_FAILURES: &str = "etcd_network_peer_sent_failures_total";
pub const PEER_RTT: &str = "etcd_network_peer_round_trip_time_seconds";
pub const ACTIVE_PEERS: &str = "etcd_network_active_peers";

/// etcd's round-trip buckets: 0.1 ms doubling 14 times.
pub const RTT_BUCKETS: &[f64] = &[
    0.0001, 0.0002, 0.0004, 0.0008, 0.0016, 0.0032, 0.0064, 0.0128, 0.0256, 0.0512, 0.1024, 0.2048,
    0.4096, 0.8192,
];

pub const HISTOGRAMS: &[(&str, &[f64])] = &[(PEER_RTT, RTT_BUCKETS)];

/// A member id as etcd writes it in labels: hexadecimal, no padding.
pub(crate) fn id_label(id: u64) -> String {
    format!("{id:x}")
}

pub fn describe() {
    use ::metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        HAS_LEADER,
        "Whether or not a leader exists. 1 is existence, 0 is not."
    );
    describe_gauge!(
        IS_LEADER,
        "Whether or not this member is a leader. 1 if is, 0 otherwise."
    );
    describe_gauge!(
        IS_LEARNER,
        "Whether or not this member is a learner. 1 if is, 0 otherwise."
    );
    describe_counter!(LEADER_CHANGES, "The number of leader changes seen.");
    describe_gauge!(
        PROPOSALS_COMMITTED,
        "The total number of consensus proposals committed."
    );
    describe_gauge!(
        PROPOSALS_PENDING,
        "The current number of pending proposals to commit."
    );
    describe_counter!(
        PROPOSALS_FAILED,
        "The total number of failed proposals seen."
    );
    describe_counter!(
        READ_INDEXES_FAILED,
        "The total number of failed read indexes seen."
    );
    describe_counter!(
        SLOW_READ_INDEXES,
        "The total number of pending read indexes not in sync with leader's or timed out read index requests."
    );
    describe_counter!(
        HEARTBEAT_SEND_FAILURES,
        "The total number of leader heartbeat send failures (likely overloaded from slow disk)."
    );
    describe_counter!(PEER_SENT_BYTES, "The total number of bytes sent to peers.");
    describe_counter!(
        PEER_RECEIVED_BYTES,
        "The total number of bytes received from peers."
    );
    describe_counter!(
        PEER_SENT_FAILURES,
        "The total number of send failures from peers."
    );
    describe_histogram!(PEER_RTT, "Round-Trip-Time histogram between peers");
    describe_gauge!(
        ACTIVE_PEERS,
        "The current number of active peer connections."
    );
    for name in [
        HAS_LEADER,
        IS_LEADER,
        IS_LEARNER,
        PROPOSALS_COMMITTED,
        PROPOSALS_PENDING,
    ] {
        ::metrics::gauge!(name).increment(0.0);
    }
    for name in [
        LEADER_CHANGES,
        PROPOSALS_FAILED,
        READ_INDEXES_FAILED,
        SLOW_READ_INDEXES,
        HEARTBEAT_SEND_FAILURES,
    ] {
        ::metrics::counter!(name).increment(0);
    }
}
