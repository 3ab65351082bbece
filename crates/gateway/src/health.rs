//! The standard `grpc.health.v1.Health` service, answered from [`HealthBackend`].

use std::sync::Arc;
use std::time::Duration;

use concord_proto::grpc::health::v1::{
    HealthCheckRequest, HealthCheckResponse, health_check_response::ServingStatus,
    health_server::Health,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::backend::HealthBackend;

/// How often a `Watch` stream re-checks health.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

pub struct HealthService<B: ?Sized> {
    backend: Arc<B>,
}

impl<B: ?Sized> HealthService<B> {
    pub fn new(backend: Arc<B>) -> Self {
        Self { backend }
    }
}

async fn status_of<B: HealthBackend + ?Sized>(b: &B, service: &str) -> ServingStatus {
    // "" is the server as a whole; Concord answers for its etcd services too.
    let known = service.is_empty() || service.starts_with("etcdserverpb.");
    if !known {
        return ServingStatus::ServiceUnknown;
    }
    match b.health().await {
        Ok(()) => ServingStatus::Serving,
        Err(_) => ServingStatus::NotServing,
    }
}

#[tonic::async_trait]
impl<B: HealthBackend + ?Sized> Health for HealthService<B> {
    async fn check(
        &self,
        req: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let s = status_of(&*self.backend, &req.into_inner().service).await;
        if s == ServingStatus::ServiceUnknown {
            return Err(Status::not_found("unknown service"));
        }
        Ok(Response::new(HealthCheckResponse { status: s as i32 }))
    }

    type WatchStream = ReceiverStream<Result<HealthCheckResponse, Status>>;

    async fn watch(
        &self,
        req: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let service = req.into_inner().service;
        let backend = self.backend.clone();
        // One message in flight is enough: only changes are sent.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let s = status_of(&*backend, &service).await;
                if last != Some(s) {
                    let msg = HealthCheckResponse { status: s as i32 };
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                    last = Some(s);
                }
                tokio::select! {
                    _ = tokio::time::sleep(WATCH_INTERVAL) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
