//! # concord-gateway
//!
//! The etcd v3 API as tonic services, in front of backend traits this crate defines.
//! A request is decoded, size-checked (etcd's 1.5 MiB request and 128 txn-op limits,
//! both configurable through [`Limits`]), checked the way etcd checks it (empty keys,
//! option combinations, duplicate keys in a txn), handed to the backend, and its error,
//! if any, turned into etcd's gRPC code and text in one place ([`Error`]).
//!
//! Every call's credentials (metadata `token`, or a client certificate's CN) are
//! resolved once into a [`Caller`] by the [`AuthBackend`], and every backend method a
//! permission can refuse receives it.
//!
//! Owns: the gRPC services (`KV`, `Watch`, `Lease`, `Maintenance`, `Cluster`, `Auth`,
//! `grpc.health.v1.Health`, and `v3lockpb.Lock` and `v3electionpb.Election`, which are
//! etcd's concurrency recipes done over the KV, Watch and Lease backends), etcd's
//! HTTP/JSON API (its grpc-gateway's `/v3/...` paths, served by the same service
//! values in process), the HTTP endpoints on the client port (`/health`, `/livez`,
//! `/readyz`, `/version`), and the composition of all into one router ([`router`]);
//! the client-port listener and connection loop ([`ClientListener`], [`serve`]: TLS
//! termination with [`tls::Handshaker`], etcd's stream and keep-alive limits) and the
//! [`ClientCertificate`] it puts into every request of a client with a verified
//! certificate; the request spans of distributed tracing ([`trace`], off unless the
//! process turns them on).
//!
//! The Maintenance service frames `Snapshot` as etcd does: the backend hands over an
//! image ([`SnapshotImage`]), the gateway streams it in chunks with `remaining_bytes`
//! and appends the SHA-256 of the streamed bytes as the last message.
//!
//! Not: storage, consensus, or anything that knows how the data is kept; it depends on
//! no other Concord crate than `concord-proto`. Put it in front of a different backend
//! by implementing [`KvBackend`], [`WatchBackend`], [`LeaseBackend`], [`MaintenanceBackend`],
//! [`ClusterBackend`], [`HealthBackend`] and [`AuthBackend`].

mod auth;
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
mod rest;
pub mod telemetry;
pub mod tls;
pub mod trace;
mod validate;
mod watch;

use std::sync::Arc;

use concord_proto::etcdserverpb;
use concord_proto::etcdserverpb::{
    auth_server::AuthServer, cluster_server::ClusterServer, kv_server::KvServer,
    lease_server::LeaseServer, maintenance_server::MaintenanceServer, watch_server::WatchServer,
};
use concord_proto::grpc::health::v1::health_server::HealthServer;
use concord_proto::v3electionpb::election_server::ElectionServer;
use concord_proto::v3lockpb::lock_server::LockServer;

pub use auth::{AuthBackend, AuthService, Caller, Credentials, credentials};
pub use backend::{
    ClusterBackend, HealthBackend, KvBackend, LeaseBackend, MaintenanceBackend, SnapshotImage,
    WatchBackend, WatchSession,
};
pub use election::ElectionService;
pub use error::{ERROR_CODE_KEY, Error, Result};
pub use health::HealthService;
pub use kv::{KvService, txn_writes};
pub use lease::{FORWARDED_KEY, LeaseService};
pub use listener::{ClientListener, ListenerOptions, PingPolicy, ServeOptions, serve};
pub use lock::LockService;
pub use maintenance::{ClusterService, MaintenanceService};
pub use telemetry::{GrpcMetricsLayer, Telemetry};
pub use tls::ClientCertificate;
/// The attribute the backend traits are declared with; implementors use it too, so they
/// need no direct tonic dependency.
pub use tonic::async_trait;
pub use validate::Limits;
pub use watch::{WatchService, create_filters, fragments};

/// Everything a backend must provide to be served by [`router`].
pub trait Backend:
    KvBackend
    + WatchBackend
    + LeaseBackend
    + MaintenanceBackend
    + ClusterBackend
    + HealthBackend
    + AuthBackend
{
}
impl<
    T: KvBackend
        + WatchBackend
        + LeaseBackend
        + MaintenanceBackend
        + ClusterBackend
        + HealthBackend
        + AuthBackend,
> Backend for T
{
}

/// The backends the client port serves, one per etcd service, each holding only what
/// its service needs. [`Backends::from_one`] serves everything from one value.
#[derive(Clone)]
pub struct Backends {
    pub kv: Arc<dyn KvBackend>,
    pub watch: Arc<dyn WatchBackend>,
    pub lease: Arc<dyn LeaseBackend>,
    pub maintenance: Arc<dyn MaintenanceBackend>,
    pub cluster: Arc<dyn ClusterBackend>,
    pub health: Arc<dyn HealthBackend>,
    /// Resolves every call's credentials, and serves the Auth service.
    pub auth: Arc<dyn AuthBackend>,
}

impl std::fmt::Debug for Backends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backends").finish_non_exhaustive()
    }
}

impl Backends {
    /// Every service served by `backend`.
    pub fn from_one<B: Backend>(backend: Arc<B>) -> Backends {
        Backends {
            kv: backend.clone(),
            watch: backend.clone(),
            lease: backend.clone(),
            maintenance: backend.clone(),
            cluster: backend.clone(),
            health: backend.clone(),
            auth: backend,
        }
    }

    /// What Lock and Election run their recipes over.
    fn recipes(&self) -> Arc<Recipes> {
        Arc::new(Recipes {
            kv: self.kv.clone(),
            watch: self.watch.clone(),
            lease: self.lease.clone(),
        })
    }
}

/// One router for the client port over a single backend of every service.
pub fn router<B: Backend>(backend: Arc<B>, limits: Limits) -> axum::Router {
    router_for(Backends::from_one(backend), limits)
}

/// One router for the client port: gRPC (HTTP/2) services, etcd's HTTP/JSON API
/// (`/v3/...`, served by the same service values) and the HTTP endpoints.
pub fn router_for(b: Backends, limits: Limits) -> axum::Router {
    router_with(b, limits, Telemetry::default())
}

/// [`router_for`] with the request layers' settings (etcd's `--metrics`).
pub fn router_with(b: Backends, limits: Limits, telemetry: Telemetry) -> axum::Router {
    let max = limits.max_grpc_message();
    let recipes = b.recipes();
    let auth = &b.auth;
    let services = rest::Services {
        kv: Arc::new(KvService::new(b.kv.clone(), auth.clone(), limits)),
        watch: Arc::new(WatchService::new(b.watch.clone(), auth.clone(), limits)),
        lease: Arc::new(LeaseService::new(b.lease.clone(), auth.clone())),
        maintenance: Arc::new(MaintenanceService::new(b.maintenance.clone(), auth.clone())),
        cluster: Arc::new(ClusterService::new(b.cluster.clone(), auth.clone())),
        lock: Arc::new(LockService::new(recipes.clone(), auth.clone(), limits)),
        election: Arc::new(ElectionService::new(recipes, auth.clone(), limits)),
        auth: Arc::new(AuthService::new(auth.clone())),
    };
    let rest = rest::router(&services, limits);
    let kv = KvServer::from_arc(services.kv).max_decoding_message_size(max);
    let watch = WatchServer::from_arc(services.watch).max_decoding_message_size(max);
    let lease = LeaseServer::from_arc(services.lease);
    let maintenance =
        MaintenanceServer::from_arc(services.maintenance).max_decoding_message_size(max);
    let cluster = ClusterServer::from_arc(services.cluster).max_decoding_message_size(max);
    let health = HealthServer::new(HealthService::new(b.health.clone()));
    let lock = LockServer::from_arc(services.lock).max_decoding_message_size(max);
    let election = ElectionServer::from_arc(services.election).max_decoding_message_size(max);
    let auth = AuthServer::from_arc(services.auth).max_decoding_message_size(max);
    let grpc = tonic::service::Routes::new(kv)
        .add_service(watch)
        .add_service(lease)
        .add_service(maintenance)
        .add_service(cluster)
        .add_service(health)
        .add_service(lock)
        .add_service(election)
        .add_service(auth)
        .into_axum_router()
        .layer(GrpcMetricsLayer::new(telemetry))
        .layer(trace::TraceLayer);
    grpc.merge(rest)
        .merge(http::router(b.health))
        .fallback(fallback)
}

/// The KV, Watch and Lease backends together, for the Lock and Election recipes.
pub(crate) struct Recipes {
    kv: Arc<dyn KvBackend>,
    watch: Arc<dyn WatchBackend>,
    lease: Arc<dyn LeaseBackend>,
}

#[tonic::async_trait]
impl KvBackend for Recipes {
    async fn range(
        &self,
        c: &Caller,
        req: etcdserverpb::RangeRequest,
    ) -> Result<etcdserverpb::RangeResponse> {
        self.kv.range(c, req).await
    }
    async fn put(
        &self,
        c: &Caller,
        req: etcdserverpb::PutRequest,
    ) -> Result<etcdserverpb::PutResponse> {
        self.kv.put(c, req).await
    }
    async fn delete_range(
        &self,
        c: &Caller,
        req: etcdserverpb::DeleteRangeRequest,
    ) -> Result<etcdserverpb::DeleteRangeResponse> {
        self.kv.delete_range(c, req).await
    }
    async fn txn(
        &self,
        c: &Caller,
        req: etcdserverpb::TxnRequest,
    ) -> Result<etcdserverpb::TxnResponse> {
        self.kv.txn(c, req).await
    }
    async fn compact(
        &self,
        c: &Caller,
        req: etcdserverpb::CompactionRequest,
    ) -> Result<etcdserverpb::CompactionResponse> {
        self.kv.compact(c, req).await
    }
}

impl WatchBackend for Recipes {
    fn open_watch(&self, c: Caller) -> Result<Box<dyn WatchSession>> {
        self.watch.open_watch(c)
    }
    fn has_leader(&self) -> bool {
        self.watch.has_leader()
    }
    fn leader_check(&self) -> std::time::Duration {
        self.watch.leader_check()
    }
}

#[tonic::async_trait]
impl LeaseBackend for Recipes {
    async fn lease_grant(
        &self,
        c: &Caller,
        req: etcdserverpb::LeaseGrantRequest,
    ) -> Result<etcdserverpb::LeaseGrantResponse> {
        self.lease.lease_grant(c, req).await
    }
    async fn lease_revoke(
        &self,
        c: &Caller,
        req: etcdserverpb::LeaseRevokeRequest,
    ) -> Result<etcdserverpb::LeaseRevokeResponse> {
        self.lease.lease_revoke(c, req).await
    }
    async fn lease_keep_alive(
        &self,
        req: etcdserverpb::LeaseKeepAliveRequest,
        forwarded: bool,
    ) -> Result<etcdserverpb::LeaseKeepAliveResponse> {
        self.lease.lease_keep_alive(req, forwarded).await
    }
    async fn lease_time_to_live(
        &self,
        c: &Caller,
        req: etcdserverpb::LeaseTimeToLiveRequest,
        forwarded: bool,
    ) -> Result<etcdserverpb::LeaseTimeToLiveResponse> {
        self.lease.lease_time_to_live(c, req, forwarded).await
    }
    async fn lease_leases(
        &self,
        c: &Caller,
        req: etcdserverpb::LeaseLeasesRequest,
    ) -> Result<etcdserverpb::LeaseLeasesResponse> {
        self.lease.lease_leases(c, req).await
    }
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
    rest::not_found(req.uri().path())
}
