//! Plain HTTP on the client port: the health and version endpoints etcd serves there.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::backend::HealthBackend;

/// The etcd server version whose client-visible behaviour Concord serves, reported
/// where etcd reports its own (`/version`, Maintenance `Status`). 3.5.13 is the
/// first 3.5 release whose `RequestProgress` answers only once every watcher of the
/// stream is synced (etcd-io/etcd#17555), which Concord's watch hub guarantees;
/// Kubernetes serves consistent reads from its watch cache only from that version
/// on. Clients that pick an API by version (Patroni, etcd3gw: `/v3` from 3.4 on) see
/// the API Concord serves.
pub const ETCD_API_VERSION: &str = "3.5.13";
/// The cluster version, as etcd reports it: major.minor.0.
pub const ETCD_CLUSTER_VERSION: &str = "3.5.0";

/// `/health`, `/livez`, `/readyz` and `/version`.
pub fn router<B: HealthBackend + ?Sized>(backend: Arc<B>) -> Router {
    Router::new()
        .route("/health", get(health::<B>))
        .route("/readyz", get(readyz::<B>))
        .route("/livez", get(|| async { "ok" }))
        .route("/version", get(version))
        .with_state(backend)
}

/// `/health` alone: what etcd serves beside `/metrics` on `--listen-metrics-urls`.
pub fn health_router<B: HealthBackend + ?Sized>(backend: Arc<B>) -> Router {
    Router::new()
        .route("/health", get(health::<B>))
        .with_state(backend)
}

async fn health<B: HealthBackend + ?Sized>(State(b): State<Arc<B>>) -> Response {
    let r = health_answer(&*b).await;
    let counter = if r.status().is_success() {
        crate::telemetry::HEALTH_SUCCESS
    } else {
        crate::telemetry::HEALTH_FAILURES
    };
    metrics::counter!(counter).increment(1);
    r
}

async fn health_answer<B: HealthBackend + ?Sized>(b: &B) -> Response {
    let alarms = b.alarms();
    if !alarms.is_empty() {
        let reason = alarms
            .iter()
            .map(|a| format!("ALARM {a}"))
            .collect::<Vec<_>>()
            .join(" ");
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"health": "false", "reason": reason})),
        )
            .into_response();
    }
    match b.health().await {
        Ok(()) => Json(serde_json::json!({"health": "true", "reason": ""})).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"health": "false", "reason": e.to_string()})),
        )
            .into_response(),
    }
}

async fn readyz<B: HealthBackend + ?Sized>(State(b): State<Arc<B>>) -> Response {
    match b.health().await {
        Ok(()) => "ok".into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}")).into_response(),
    }
}

async fn version() -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "etcdserver": ETCD_API_VERSION,
        "etcdcluster": ETCD_CLUSTER_VERSION,
        "concord": env!("CARGO_PKG_VERSION"),
    }))
}
