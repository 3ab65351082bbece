//! Plain HTTP on the client port: the health and version endpoints etcd serves there.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::backend::HealthBackend;

/// The etcd API version Concord implements, reported where etcd reports its own.
pub const ETCD_API_VERSION: &str = "3.5.0";

/// `/health`, `/livez`, `/readyz` and `/version`.
pub fn router<B: HealthBackend + ?Sized>(backend: Arc<B>) -> Router {
    Router::new()
        .route("/health", get(health::<B>))
        .route("/readyz", get(readyz::<B>))
        .route("/livez", get(|| async { "ok" }))
        .route("/version", get(version))
        .with_state(backend)
}

async fn health<B: HealthBackend + ?Sized>(State(b): State<Arc<B>>) -> Response {
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
        "etcdcluster": ETCD_API_VERSION,
        "concord": env!("CARGO_PKG_VERSION"),
    }))
}
