//! The `etcdserverpb.Lease` service. Grant, revoke, time-to-live and the lease list map
//! one-to-one onto a [`LeaseBackend`]; `LeaseKeepAlive` is a bidirectional stream whose
//! requests are renewed one at a time, in order, each answered on the stream (an
//! unknown lease answers TTL 0, as etcd does; any other error ends the stream with
//! etcd's status).

use std::pin::Pin;
use std::sync::Arc;

use concord_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse, lease_server::Lease,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{AuthBackend, caller_of};
use crate::backend::LeaseBackend;

/// gRPC metadata a member sets when it forwards a lease call to the member it believes
/// leads, so the receiver answers "not leader" instead of forwarding it again.
pub const FORWARDED_KEY: &str = "concord-forwarded";

/// Serves Lease over any [`LeaseBackend`].
pub struct LeaseService<B: ?Sized> {
    backend: Arc<B>,
    auth: Arc<dyn AuthBackend>,
}

impl<B: ?Sized> LeaseService<B> {
    pub fn new(backend: Arc<B>, auth: Arc<dyn AuthBackend>) -> Self {
        Self { backend, auth }
    }
}

fn forwarded(m: &MetadataMap) -> bool {
    m.get(FORWARDED_KEY).is_some()
}

pub(crate) type KeepAliveStream =
    Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl<B: LeaseBackend + ?Sized> Lease for LeaseService<B> {
    async fn lease_grant(
        &self,
        req: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let caller = caller_of(&*self.auth, &req).await?;
        Ok(Response::new(
            self.backend.lease_grant(&caller, req.into_inner()).await?,
        ))
    }

    async fn lease_revoke(
        &self,
        req: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let caller = caller_of(&*self.auth, &req).await?;
        Ok(Response::new(
            self.backend.lease_revoke(&caller, req.into_inner()).await?,
        ))
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<KeepAliveStream>, Status> {
        let hop = forwarded(req.metadata());
        Ok(Response::new(self.keep_alive(hop, req.into_inner())))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let hop = forwarded(req.metadata());
        let caller = caller_of(&*self.auth, &req).await?;
        Ok(Response::new(
            self.backend
                .lease_time_to_live(&caller, req.into_inner(), hop)
                .await?,
        ))
    }

    async fn lease_leases(
        &self,
        req: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        let caller = caller_of(&*self.auth, &req).await?;
        Ok(Response::new(
            self.backend.lease_leases(&caller, req.into_inner()).await?,
        ))
    }
}

impl<B: LeaseBackend + ?Sized> LeaseService<B> {
    /// Renews the leases of `inbound`'s requests one at a time, in order (a gRPC
    /// stream, or the JSON objects of an HTTP body), answering each on the returned
    /// stream; `hop`: the calls were forwarded by another member.
    pub(crate) fn keep_alive<S>(&self, hop: bool, mut inbound: S) -> KeepAliveStream
    where
        S: Stream<Item = Result<LeaseKeepAliveRequest, Status>> + Send + Unpin + 'static,
    {
        let backend = self.backend.clone();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(next) = inbound.next().await {
                let Ok(r) = next else { return };
                let out = backend.lease_keep_alive(r, hop).await.map_err(Status::from);
                let failed = out.is_err();
                if tx.send(out).await.is_err() || failed {
                    return;
                }
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }
}
