//! # concord-gateway
//!
//! The etcd v3 API as tonic services, in front of backend traits this crate defines.
//! A request is decoded, size-checked (etcd's 1.5 MiB request and 128 txn-op limits,
//! both configurable through [`Limits`]), checked the way etcd checks it (empty keys,
//! option combinations, duplicate keys in a txn), handed to the backend, and its error,
//! if any, turned into etcd's gRPC code and text in one place ([`Error`]).
//!
//! Owns: the gRPC services (`KV`, `Watch`, `Lease`, `Maintenance`, `Cluster`,
//! `grpc.health.v1.Health`, and `v3lockpb.Lock` and `v3electionpb.Election`, which are
//! etcd's concurrency recipes done over the KV, Watch and Lease backends), the HTTP
//! endpoints on the client port (`/health`, `/livez`, `/readyz`, `/version`), and the
//! composition of both into one router ([`router`]).
//!
//! The Maintenance service frames `Snapshot` as etcd does: the backend hands over an
//! image ([`SnapshotImage`]), the gateway streams it in chunks with `remaining_bytes`
//! and appends the SHA-256 of the streamed bytes as the last message.
//!
//! Not: storage, consensus, or anything that knows how the data is kept; it depends on
//! no other Concord crate than `concord-proto`. Put it in front of a different backend
//! by implementing [`KvBackend`], [`WatchBackend`], [`LeaseBackend`], [`MaintenanceBackend`],
//! [`ClusterBackend`] and [`HealthBackend`].

mod backend;
mod concurrency;
mod election;
mod error;
mod health;
pub mod http;
mod kv;
mod lease;
mod listener;
mod lock;
mod maintenance;
mod validate;
mod watch;

use std::sync::Arc;

use axum::response::IntoResponse;

use concord_proto::etcdserverpb::{
    cluster_server::ClusterServer, kv_server::KvServer, lease_server::LeaseServer,
    maintenance_server::MaintenanceServer, watch_server::WatchServer,
};
use concord_proto::grpc::health::v1::health_server::HealthServer;
use concord_proto::v3electionpb::election_server::ElectionServer;
use concord_proto::v3lockpb::lock_server::LockServer;

pub use backend::{
    ClusterBackend, HealthBackend, KvBackend, LeaseBackend, MaintenanceBackend, SnapshotImage,
    WatchBackend, WatchSession,
};
pub use election::ElectionService;
pub use error::{ERROR_CODE_KEY, Error, Result};
pub use health::HealthService;
pub use kv::{KvService, txn_writes};
pub use lease::{FORWARDED_KEY, LeaseService};
pub use listener::ClientListener;
pub use lock::LockService;
pub use maintenance::{ClusterService, MaintenanceService};
/// The attribute the backend traits are declared with; implementors use it too, so they
/// need no direct tonic dependency.
pub use tonic::async_trait;
pub use validate::Limits;
pub use watch::{WatchService, create_filters, fragments};

/// Everything a backend must provide to be served by [`router`].
pub trait Backend:
    KvBackend + WatchBackend + LeaseBackend + MaintenanceBackend + ClusterBackend + HealthBackend
{
}
impl<
    T: KvBackend + WatchBackend + LeaseBackend + MaintenanceBackend + ClusterBackend + HealthBackend,
> Backend for T
{
}

/// One router for the client port: gRPC (HTTP/2) services and the HTTP endpoints.
pub fn router<B: Backend>(backend: Arc<B>, limits: Limits) -> axum::Router {
    let max = limits.max_grpc_message();
    let kv = KvServer::from_arc(Arc::new(KvService::new(backend.clone(), limits)))
        .max_decoding_message_size(max);
    let watch = WatchServer::from_arc(Arc::new(WatchService::new(backend.clone(), limits)))
        .max_decoding_message_size(max);
    let lease = LeaseServer::new(LeaseService::new(backend.clone()));
    let maintenance = MaintenanceServer::new(MaintenanceService::new(backend.clone()))
        .max_decoding_message_size(max);
    let cluster =
        ClusterServer::new(ClusterService::new(backend.clone())).max_decoding_message_size(max);
    let health = HealthServer::new(HealthService::new(backend.clone()));
    let lock = LockServer::from_arc(Arc::new(LockService::new(backend.clone(), limits)))
        .max_decoding_message_size(max);
    let election =
        ElectionServer::from_arc(Arc::new(ElectionService::new(backend.clone(), limits)))
            .max_decoding_message_size(max);
    let grpc = tonic::service::Routes::new(kv)
        .add_service(watch)
        .add_service(lease)
        .add_service(maintenance)
        .add_service(cluster)
        .add_service(health)
        .add_service(lock)
        .add_service(election)
        .into_axum_router();
    grpc.merge(http::router(backend)).fallback(fallback)
}

/// Unknown paths: gRPC callers get gRPC's `Unimplemented`, anyone else a 404.
async fn fallback(req: axum::extract::Request) -> axum::response::Response {
    let grpc = req
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc {
        let status = tonic::Status::unimplemented(format!("unknown method {}", req.uri().path()));
        return status.into_http::<axum::body::Body>();
    }
    axum::http::StatusCode::NOT_FOUND.into_response()
}
