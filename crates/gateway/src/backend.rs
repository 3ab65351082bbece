//! What the gateway needs from whatever serves the data. Implement these traits to put
//! the etcd v3 API in front of any store; the gateway does decoding, limits, request
//! checks and error mapping, the backend does the work and fills response headers.

use concord_proto::etcdserverpb::*;

use crate::error::Result;

/// The KV service's backend. Requests arrive already checked (keys present, options
/// valid, txn ops within limits and free of duplicate keys).
#[tonic::async_trait]
pub trait KvBackend: Send + Sync + 'static {
    async fn range(&self, req: RangeRequest) -> Result<RangeResponse>;
    async fn put(&self, req: PutRequest) -> Result<PutResponse>;
    async fn delete_range(&self, req: DeleteRangeRequest) -> Result<DeleteRangeResponse>;
    async fn txn(&self, req: TxnRequest) -> Result<TxnResponse>;
    async fn compact(&self, req: CompactionRequest) -> Result<CompactionResponse>;
}

/// The parts of the Maintenance service a backend provides.
#[tonic::async_trait]
pub trait MaintenanceBackend: Send + Sync + 'static {
    async fn status(&self) -> Result<StatusResponse>;
    async fn alarm(&self, req: AlarmRequest) -> Result<AlarmResponse>;
}

/// The parts of the Cluster service a backend provides.
#[tonic::async_trait]
pub trait ClusterBackend: Send + Sync + 'static {
    async fn member_list(&self, req: MemberListRequest) -> Result<MemberListResponse>;
}

/// Answers the HTTP health endpoints. `Ok` is healthy; the error says why not.
#[tonic::async_trait]
pub trait HealthBackend: Send + Sync + 'static {
    async fn health(&self) -> Result<()>;
}
