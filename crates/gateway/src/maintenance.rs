//! The `etcdserverpb.Maintenance` and `etcdserverpb.Cluster` services.
//!
//! The RPCs a backend does not provide yet answer gRPC `Unimplemented` with a text that
//! names them; they never hang.

use std::sync::Arc;

use concord_proto::etcdserverpb::{cluster_server::Cluster, maintenance_server::Maintenance, *};
use tokio_stream::Empty;
use tonic::{Request, Response, Status};

use crate::backend::{ClusterBackend, MaintenanceBackend};
use crate::error::Error;

fn unavailable(rpc: &str) -> Status {
    Error::Unimplemented(format!(
        "concord: {rpc} is not supported by this server yet"
    ))
    .into()
}

/// Serves Maintenance over any [`MaintenanceBackend`].
pub struct MaintenanceService<B: ?Sized> {
    backend: Arc<B>,
}

impl<B: ?Sized> MaintenanceService<B> {
    pub fn new(backend: Arc<B>) -> Self {
        Self { backend }
    }
}

#[tonic::async_trait]
impl<B: MaintenanceBackend + ?Sized> Maintenance for MaintenanceService<B> {
    async fn alarm(&self, req: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        Ok(Response::new(self.backend.alarm(req.into_inner()).await?))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(self.backend.status().await?))
    }

    async fn defragment(
        &self,
        _: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        Err(unavailable("Maintenance.Defragment"))
    }

    async fn hash(&self, _: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        Err(unavailable("Maintenance.Hash"))
    }

    async fn hash_kv(&self, _: Request<HashKvRequest>) -> Result<Response<HashKvResponse>, Status> {
        Err(unavailable("Maintenance.HashKV"))
    }

    type SnapshotStream = Empty<Result<SnapshotResponse, Status>>;

    async fn snapshot(
        &self,
        _: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        Err(unavailable("Maintenance.Snapshot"))
    }

    async fn move_leader(
        &self,
        _: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        Err(unavailable("Maintenance.MoveLeader"))
    }

    async fn downgrade(
        &self,
        _: Request<DowngradeRequest>,
    ) -> Result<Response<DowngradeResponse>, Status> {
        Err(unavailable("Maintenance.Downgrade"))
    }
}

/// Serves Cluster over any [`ClusterBackend`].
pub struct ClusterService<B: ?Sized> {
    backend: Arc<B>,
}

impl<B: ?Sized> ClusterService<B> {
    pub fn new(backend: Arc<B>) -> Self {
        Self { backend }
    }
}

#[tonic::async_trait]
impl<B: ClusterBackend + ?Sized> Cluster for ClusterService<B> {
    async fn member_add(
        &self,
        req: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        let req = req.into_inner();
        check_peer_urls(&req.peer_ur_ls)?;
        Ok(Response::new(self.backend.member_add(req).await?))
    }

    async fn member_remove(
        &self,
        req: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        Ok(Response::new(
            self.backend.member_remove(req.into_inner()).await?,
        ))
    }

    async fn member_update(
        &self,
        req: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        let req = req.into_inner();
        check_peer_urls(&req.peer_ur_ls)?;
        Ok(Response::new(self.backend.member_update(req).await?))
    }

    async fn member_list(
        &self,
        req: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        Ok(Response::new(
            self.backend.member_list(req.into_inner()).await?,
        ))
    }

    async fn member_promote(
        &self,
        req: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        Ok(Response::new(
            self.backend.member_promote(req.into_inner()).await?,
        ))
    }
}

/// etcd refuses peer URLs that are not `scheme://host:port`.
fn check_peer_urls(urls: &[String]) -> Result<(), Status> {
    if urls.is_empty() {
        return Err(Error::MemberBadUrls.into());
    }
    for u in urls {
        let ok = u.split_once("://").is_some_and(|(scheme, rest)| {
            matches!(scheme, "http" | "https")
                && rest
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
        });
        if !ok {
            return Err(Error::MemberBadUrls.into());
        }
    }
    Ok(())
}
