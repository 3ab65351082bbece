//! etcd's HTTP/JSON API (its grpc-gateway) on the client port: `POST /v3/<service>/<rpc>`
//! with a protobuf-JSON body, answered in etcd's JSON; `/v3/watch`,
//! `/v3/lease/keepalive`, `/v3/maintenance/snapshot` and `/v3/election/observe`
//! stream newline-delimited `{"result":…}` objects.
//!
//! Every path calls the same service value the gRPC server runs (in process, no
//! loopback hop), so requests get the gRPC API's checks, limits and errors; only the
//! encoding differs ([`codec`]).

mod codec;

use std::future::Future;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{MethodRouter, post};
use axum::{Extension, Router};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_stream::StreamExt;
use tonic::Status;

use concord_proto::etcdserverpb::{
    WatchRequest, auth_server::Auth, cluster_server::Cluster, kv_server::Kv, lease_server::Lease,
    maintenance_server::Maintenance,
};
use concord_proto::v3electionpb::election_server::Election;
use concord_proto::v3lockpb::lock_server::Lock;

use crate::Recipes;
use crate::auth::{AuthService, ClientCertificate, caller_of};
use crate::backend::{ClusterBackend, KvBackend, LeaseBackend, MaintenanceBackend, WatchBackend};
use crate::election::ElectionService;
use crate::kv::KvService;
use crate::lease::LeaseService;
use crate::lock::LockService;
use crate::maintenance::{ClusterService, MaintenanceService};
use crate::validate::Limits;
use crate::watch::{WatchService, require_leader};

use codec::Answers;

/// The service values the client port's gRPC server runs, shared with the gateway.
pub(crate) struct Services {
    pub kv: Arc<KvService<dyn KvBackend>>,
    pub watch: Arc<WatchService<dyn WatchBackend>>,
    pub lease: Arc<LeaseService<dyn LeaseBackend>>,
    pub maintenance: Arc<MaintenanceService<dyn MaintenanceBackend>>,
    pub cluster: Arc<ClusterService<dyn ClusterBackend>>,
    pub lock: Arc<LockService<Recipes>>,
    pub election: Arc<ElectionService<Recipes>>,
    pub auth: Arc<AuthService>,
}

/// The API prefixes etcd's gateway answers on.
const PREFIXES: &[&str] = &["/v3", "/v3beta"];

/// The gateway's routes, under every prefix etcd serves them on.
pub(crate) fn router(s: &Services, limits: Limits) -> Router {
    let mut r = Router::new();
    for prefix in PREFIXES {
        r = r.nest(prefix, api(s, limits));
    }
    r
}

fn api(s: &Services, limits: Limits) -> Router {
    let l = limits;
    // A unary path: the service and its gRPC method (`recipe`: its errors as Lock and
    // Election answer them).
    macro_rules! rpc {
        ($svc:ident, $method:ident) => {
            unary(&s.$svc, l, |s, r| async move { s.$method(r).await })
        };
        ($svc:ident, $method:ident, recipe) => {
            unary(&s.$svc, l, |s, r| async move { recipe(s.$method(r).await) })
        };
    }
    let mut r = Router::new()
        .route("/kv/range", rpc!(kv, range))
        .route("/kv/put", rpc!(kv, put))
        .route("/kv/deleterange", rpc!(kv, delete_range))
        .route("/kv/txn", rpc!(kv, txn))
        .route("/kv/compaction", rpc!(kv, compact))
        .route("/watch", watch(&s.watch, l))
        .route("/lease/grant", rpc!(lease, lease_grant))
        .route("/lease/keepalive", keep_alive(&s.lease, l))
        .route("/maintenance/alarm", rpc!(maintenance, alarm))
        .route("/maintenance/status", rpc!(maintenance, status))
        .route("/maintenance/defragment", rpc!(maintenance, defragment))
        .route("/maintenance/hash", rpc!(maintenance, hash))
        .route("/maintenance/hashkv", rpc!(maintenance, hash_kv))
        .route(
            "/maintenance/snapshot",
            server_stream(&s.maintenance, l, |s, r| async move {
                s.snapshot(r).await.map(|a| a.into_inner())
            }),
        )
        .route(
            "/maintenance/transfer-leadership",
            rpc!(maintenance, move_leader),
        )
        .route("/cluster/member/add", rpc!(cluster, member_add))
        .route("/cluster/member/remove", rpc!(cluster, member_remove))
        .route("/cluster/member/update", rpc!(cluster, member_update))
        .route("/cluster/member/list", rpc!(cluster, member_list))
        .route("/cluster/member/promote", rpc!(cluster, member_promote))
        .route("/lock/lock", rpc!(lock, lock, recipe))
        .route("/lock/unlock", rpc!(lock, unlock, recipe))
        .route("/election/campaign", rpc!(election, campaign, recipe))
        .route("/election/proclaim", rpc!(election, proclaim, recipe))
        .route("/election/leader", rpc!(election, leader, recipe))
        .route(
            "/election/observe",
            server_stream(&s.election, l, |s, r| async move {
                recipe(s.observe(r).await.map(|a| a.into_inner()))
            }),
        )
        .route("/election/resign", rpc!(election, resign, recipe));
    // Revoke, time-to-live and the lease list answer under /kv/lease/ too (etcd's
    // additional bindings, from when leases lived under the KV service).
    for base in ["/lease", "/kv/lease"] {
        r = r
            .route(&format!("{base}/revoke"), rpc!(lease, lease_revoke))
            .route(
                &format!("{base}/timetolive"),
                rpc!(lease, lease_time_to_live),
            )
            .route(&format!("{base}/leases"), rpc!(lease, lease_leases));
    }
    r.route("/auth/enable", rpc!(auth, auth_enable))
        .route("/auth/disable", rpc!(auth, auth_disable))
        .route("/auth/status", rpc!(auth, auth_status))
        .route("/auth/authenticate", rpc!(auth, authenticate))
        .route("/auth/user/add", rpc!(auth, user_add))
        .route("/auth/user/get", rpc!(auth, user_get))
        .route("/auth/user/list", rpc!(auth, user_list))
        .route("/auth/user/delete", rpc!(auth, user_delete))
        .route("/auth/user/changepw", rpc!(auth, user_change_password))
        .route("/auth/user/grant", rpc!(auth, user_grant_role))
        .route("/auth/user/revoke", rpc!(auth, user_revoke_role))
        .route("/auth/role/add", rpc!(auth, role_add))
        .route("/auth/role/get", rpc!(auth, role_get))
        .route("/auth/role/list", rpc!(auth, role_list))
        .route("/auth/role/delete", rpc!(auth, role_delete))
        .route("/auth/role/grant", rpc!(auth, role_grant_permission))
        .route("/auth/role/revoke", rpc!(auth, role_revoke_permission))
}

/// A `POST` route that answers other methods as grpc-gateway does.
fn only_post<H, T>(handler: H) -> MethodRouter
where
    H: axum::handler::Handler<T, ()>,
    T: 'static,
{
    post(handler).fallback(method_not_allowed)
}

/// etcd serves Lock and Election through a gateway of their own whose errors all
/// reach the client as `Unknown` (HTTP 500), with the original text.
fn recipe<T>(r: Result<T, Status>) -> Result<T, Status> {
    r.map_err(|s| Status::unknown(s.message().to_string()))
}

/// The client certificate of the connection, if it presented one.
type Cert = Option<Extension<ClientCertificate>>;

/// A call carrying `msg`, with the call's metadata from the headers and the client's
/// certificate, as the gRPC server would hand it to the service.
fn call_of<T>(msg: T, headers: &HeaderMap, cert: Cert) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    *req.metadata_mut() = codec::metadata(headers);
    if let Some(Extension(c)) = cert {
        req.extensions_mut().insert(c);
    }
    req
}

/// A unary request's message: the body decoded, within gRPC's size limit, as a call
/// ([`call_of`]).
async fn request<T>(
    headers: &HeaderMap,
    cert: Cert,
    body: Body,
    limits: Limits,
) -> Result<tonic::Request<T>, Status>
where
    T: DeserializeOwned + prost::Message + Default,
{
    let max = limits.max_grpc_message();
    let bytes = codec::read_body(body, codec::body_limit(max)).await?;
    let msg: T = codec::decode(&bytes)?;
    codec::check_message_size(&msg, max)?;
    Ok(call_of(msg, headers, cert))
}

/// `POST` of a unary RPC: `call` is the gRPC service's method.
fn unary<S, Req, Resp, F, Fut>(svc: &Arc<S>, limits: Limits, call: F) -> MethodRouter
where
    S: ?Sized + Send + Sync + 'static,
    Req: DeserializeOwned + prost::Message + Default + Send + 'static,
    Resp: Serialize,
    F: Fn(Arc<S>, tonic::Request<Req>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<tonic::Response<Resp>, Status>> + Send + 'static,
{
    let svc = svc.clone();
    only_post(move |headers: HeaderMap, cert: Cert, body: Body| {
        let (svc, call) = (svc.clone(), call.clone());
        async move {
            let req = match request::<Req>(&headers, cert, body, limits).await {
                Ok(r) => r,
                Err(s) => return codec::error(&s),
            };
            match call(svc, req).await {
                Ok(r) => codec::ok(r.get_ref()),
                Err(s) => codec::error(&s),
            }
        }
    })
}

/// `POST` of an RPC with one request and a stream of answers.
fn server_stream<S, Req, Resp, F, Fut>(svc: &Arc<S>, limits: Limits, call: F) -> MethodRouter
where
    S: ?Sized + Send + Sync + 'static,
    Req: DeserializeOwned + prost::Message + Default + Send + 'static,
    Resp: Serialize + Send + 'static,
    F: Fn(Arc<S>, tonic::Request<Req>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Answers<Resp>, Status>> + Send + 'static,
{
    let svc = svc.clone();
    only_post(move |headers: HeaderMap, cert: Cert, body: Body| {
        let (svc, call) = (svc.clone(), call.clone());
        async move {
            let req = match request::<Req>(&headers, cert, body, limits).await {
                Ok(r) => r,
                Err(s) => return codec::error(&s),
            };
            match call(svc, req).await {
                Ok(answers) => codec::stream(answers).await,
                Err(s) => codec::error(&s),
            }
        }
    })
}

/// A streamed call's requests once the first has decoded. grpc-gateway fails the
/// whole call when the first request does not decode (later bad requests only end
/// the client's side); a body with no request at all is a stream that sends none.
async fn first_decoded<T: Send + 'static>(mut reqs: Answers<T>) -> Result<Answers<T>, Status> {
    match reqs.next().await {
        None => Ok(Box::pin(tokio_stream::empty())),
        // grpc-gateway returns that decoding error as it is, which makes it `Unknown`.
        Some(Err(s)) => Err(Status::unknown(s.message().to_string())),
        Some(Ok(first)) => Ok(Box::pin(
            tokio_stream::once(Ok(first)).chain(reqs.take_while(Result::is_ok)),
        )),
    }
}

/// `POST /v3/watch`: the body's JSON objects are the stream's `WatchRequest`s.
fn watch(svc: &Arc<WatchService<dyn WatchBackend>>, limits: Limits) -> MethodRouter {
    let svc = svc.clone();
    only_post(move |headers: HeaderMap, cert: Cert, body: Body| {
        let svc = svc.clone();
        async move {
            let call = call_of((), &headers, cert);
            let caller = match caller_of(&*svc.auth, &call).await {
                Ok(c) => c,
                Err(s) => return codec::error(&s),
            };
            let reqs = streamed_requests::<WatchRequest>(body, limits);
            let reqs = match first_decoded(reqs).await {
                Ok(r) => r,
                Err(s) => return codec::error(&s),
            };
            let leader = require_leader(call.metadata());
            match svc.serve(caller, leader, reqs) {
                Ok(answers) => codec::stream(answers).await,
                Err(s) => codec::error(&s),
            }
        }
    })
}

/// `POST /v3/lease/keepalive`: each JSON object of the body renews a lease.
fn keep_alive(svc: &Arc<LeaseService<dyn LeaseBackend>>, limits: Limits) -> MethodRouter {
    let svc = svc.clone();
    only_post(move |body: Body| {
        let svc = svc.clone();
        async move {
            let reqs = streamed_requests(body, limits);
            let reqs = match first_decoded(reqs).await {
                Ok(r) => r,
                Err(s) => return codec::error(&s),
            };
            codec::stream(svc.keep_alive(false, reqs)).await
        }
    })
}

fn streamed_requests<T>(body: Body, limits: Limits) -> Answers<T>
where
    T: DeserializeOwned + prost::Message + Send + 'static,
{
    let max = limits.max_grpc_message();
    codec::requests(body, codec::body_limit(max), max)
}

/// The answer for a path the client port does not serve: the gateway's own 404
/// under its prefixes, Go's mux's elsewhere (both plain text, as etcd's).
pub(crate) fn not_found(path: &str) -> Response {
    let ours = PREFIXES.iter().any(|p| {
        path.strip_prefix(p)
            .is_some_and(|rest| rest.starts_with('/'))
    });
    if ours {
        codec::text(StatusCode::NOT_FOUND, "Not Found")
    } else {
        codec::text(StatusCode::NOT_FOUND, "404 page not found")
    }
}

/// The answer to a gateway path called with another method than `POST`.
async fn method_not_allowed() -> Response {
    codec::text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
}
