//! What the gateway needs from whatever serves the data. Implement these traits to put
//! the etcd v3 API in front of any store; the gateway does decoding, limits, request
//! checks and error mapping, the backend does the work and fills response headers.

use concord_proto::etcdserverpb::*;

use crate::auth::Caller;
use crate::error::Result;

/// The KV service's backend. Requests arrive already checked (keys present, options
/// valid, txn ops within limits and free of duplicate keys), with the [`Caller`] whose
/// permissions the backend checks (every method of every backend that takes one).
#[tonic::async_trait]
pub trait KvBackend: Send + Sync + 'static {
    async fn range(&self, c: &Caller, req: RangeRequest) -> Result<RangeResponse>;
    async fn put(&self, c: &Caller, req: PutRequest) -> Result<PutResponse>;
    async fn delete_range(
        &self,
        c: &Caller,
        req: DeleteRangeRequest,
    ) -> Result<DeleteRangeResponse>;
    async fn txn(&self, c: &Caller, req: TxnRequest) -> Result<TxnResponse>;
    async fn compact(&self, c: &Caller, req: CompactionRequest) -> Result<CompactionResponse>;
}

/// The Lease service's backend.
#[tonic::async_trait]
pub trait LeaseBackend: Send + Sync + 'static {
    async fn lease_grant(&self, c: &Caller, req: LeaseGrantRequest) -> Result<LeaseGrantResponse>;
    async fn lease_revoke(
        &self,
        c: &Caller,
        req: LeaseRevokeRequest,
    ) -> Result<LeaseRevokeResponse>;
    /// One renewal. An unknown lease is not an error: it answers TTL 0. `forwarded`:
    /// another member sent this call here believing this member leads.
    async fn lease_keep_alive(
        &self,
        req: LeaseKeepAliveRequest,
        forwarded: bool,
    ) -> Result<LeaseKeepAliveResponse>;
    /// An unknown lease is not an error: it answers TTL -1.
    async fn lease_time_to_live(
        &self,
        c: &Caller,
        req: LeaseTimeToLiveRequest,
        forwarded: bool,
    ) -> Result<LeaseTimeToLiveResponse>;
    async fn lease_leases(
        &self,
        c: &Caller,
        req: LeaseLeasesRequest,
    ) -> Result<LeaseLeasesResponse>;
}

/// The Maintenance service's backend. Only `status` and `alarm` are required; the
/// other RPCs answer gRPC `Unimplemented` unless the backend provides them.
#[tonic::async_trait]
pub trait MaintenanceBackend: Send + Sync + 'static {
    async fn status(&self) -> Result<StatusResponse>;
    async fn alarm(&self, c: &Caller, req: AlarmRequest) -> Result<AlarmResponse>;

    async fn hash(&self, _c: &Caller, _req: HashRequest) -> Result<HashResponse> {
        Err(not_offered("Maintenance.Hash"))
    }

    async fn hash_kv(&self, _c: &Caller, _req: HashKvRequest) -> Result<HashKvResponse> {
        Err(not_offered("Maintenance.HashKV"))
    }

    /// Answers once the defragmentation is done; must not stall other requests.
    async fn defragment(&self, _c: &Caller, _req: DefragmentRequest) -> Result<DefragmentResponse> {
        Err(not_offered("Maintenance.Defragment"))
    }

    /// Answers once `target_id` leads (etcd waits for it).
    async fn move_leader(
        &self,
        _c: &Caller,
        _req: MoveLeaderRequest,
    ) -> Result<MoveLeaderResponse> {
        Err(not_offered("Maintenance.MoveLeader"))
    }

    /// A consistent image of the member's state for `Snapshot`. The gateway streams
    /// it in chunks and appends etcd's trailing SHA-256 of the streamed bytes.
    async fn snapshot(&self, _c: &Caller) -> Result<SnapshotImage> {
        Err(not_offered("Maintenance.Snapshot"))
    }
}

/// A state image for the `Snapshot` RPC: `size` bytes read from `data` (on a blocking
/// thread). etcdctl 3.4 refuses a download whose length is not 32 (the checksum) more
/// than a multiple of 512, so `size` must be a multiple of 512.
pub struct SnapshotImage {
    pub size: u64,
    pub data: Box<dyn std::io::Read + Send>,
}

impl std::fmt::Debug for SnapshotImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotImage")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

fn not_offered(rpc: &str) -> crate::Error {
    crate::Error::Unimplemented(format!(
        "concord: {rpc} is not supported by this server yet"
    ))
}

/// The parts of the Cluster service a backend provides.
#[tonic::async_trait]
pub trait ClusterBackend: Send + Sync + 'static {
    async fn member_list(&self, c: &Caller, req: MemberListRequest) -> Result<MemberListResponse>;
    async fn member_add(&self, c: &Caller, req: MemberAddRequest) -> Result<MemberAddResponse>;
    async fn member_remove(
        &self,
        c: &Caller,
        req: MemberRemoveRequest,
    ) -> Result<MemberRemoveResponse>;
    async fn member_update(
        &self,
        c: &Caller,
        req: MemberUpdateRequest,
    ) -> Result<MemberUpdateResponse>;
    async fn member_promote(
        &self,
        c: &Caller,
        req: MemberPromoteRequest,
    ) -> Result<MemberPromoteResponse>;
}

/// Answers the HTTP health endpoints. `Ok` is healthy; the error says why not.
#[tonic::async_trait]
pub trait HealthBackend: Send + Sync + 'static {
    async fn health(&self) -> Result<()>;

    /// Active alarms, by name (`NOSPACE`, `CORRUPT`): HTTP `/health` reports the member
    /// unhealthy while there is one, as etcd does (the gRPC health service does not).
    fn alarms(&self) -> Vec<String> {
        Vec::new()
    }
}

/// One client's watch stream, opened by [`WatchBackend::open_watch`] for one caller
/// (a watcher on keys the caller may not read is cancelled at creation). Requests arrive
/// as etcd sends them; every answer (created, events, progress, cancelled) comes out of
/// [`WatchSession::next`] in the order the client must see it. Dropping the session
/// cancels its watchers.
#[tonic::async_trait]
pub trait WatchSession: Send + Sync + 'static {
    fn create(&self, req: WatchCreateRequest);
    /// Unknown ids are ignored, as etcd does.
    fn cancel(&self, watch_id: i64);
    /// `RequestProgress`.
    fn progress(&self);
    /// Resolves when the session can take another request.
    async fn writable(&self);
    /// The next response with its header filled in, and whether its watcher asked for
    /// fragmenting; `None` once the session is closed.
    async fn next(&self) -> Option<(WatchResponse, bool)>;
}

/// The Watch service's backend.
pub trait WatchBackend: Send + Sync + 'static {
    fn open_watch(&self, c: Caller) -> Result<Box<dyn WatchSession>>;

    /// Whether this member knows a leader. Streams of clients that send etcd's
    /// `hasleader` metadata (clientv3 `WithRequireLeader`) are refused without one,
    /// and ended once the leader has been missing for [`WatchBackend::leader_check`]
    /// three checks in a row, as etcd does.
    fn has_leader(&self) -> bool {
        true
    }

    /// How often `hasleader` streams check for a leader (etcd: the election timeout).
    fn leader_check(&self) -> std::time::Duration {
        std::time::Duration::from_secs(1)
    }
}
