//! Failpoints of a `concord` member: the catalogue ([`concord_storage::failpoints`],
//! re-exported) and, in builds with the `failpoints` feature, how they are armed while
//! the member runs: [`setup`] reads `FAILPOINTS` and makes every panic abort the
//! process; [`router`] serves `GET /debug/failpoints` (every name and its action),
//! `PUT /debug/failpoints/<name>` (body: the action, as `fail::cfg` takes it) and
//! `DELETE /debug/failpoints/<name>`. Unknown names get 404, so a typo in a test does
//! not silently arm nothing.

pub use concord_storage::failpoints::*;

/// Arms the points named in `FAILPOINTS` (`name=action;...`) and turns a failpoint's
/// `panic` (message `failpoint <name> panic`) into an abort, so it is a crash at
/// exactly that point whichever thread hits it (a panic in a helper thread or a tokio
/// task would otherwise leave a half-dead member). Other panics keep their usual
/// effect: debug builds hit h2's `debug_assert!` in `Store::drop` (enabled by the
/// `unstable` feature the gateway uses) when a connection ends with open streams,
/// and tokio contains that panic to the connection's task.
/// Keep the returned scenario alive as long as the process runs.
#[cfg(feature = "failpoints")]
pub fn setup() -> fail::FailScenario<'static> {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failpoint ") {
            std::process::abort();
        }
    }));
    fail::FailScenario::setup()
}

/// The `/debug/failpoints` endpoints (failpoint builds only).
#[cfg(feature = "failpoints")]
pub fn router() -> axum::Router {
    use axum::extract::Path;
    use axum::http::StatusCode;
    use axum::routing::get;

    async fn list() -> String {
        let armed: std::collections::HashMap<String, String> = fail::list().into_iter().collect();
        ALL.iter()
            .map(|n| format!("{n}={}\n", armed.get(*n).map_or("", String::as_str)))
            .collect()
    }
    async fn arm(Path(name): Path<String>, body: String) -> (StatusCode, String) {
        if !ALL.contains(&name.as_str()) {
            return (StatusCode::NOT_FOUND, format!("no failpoint {name}\n"));
        }
        match fail::cfg(name.as_str(), body.trim()) {
            Ok(()) => {
                tracing::warn!(failpoint = %name, action = %body.trim(), "failpoint armed");
                (StatusCode::OK, String::new())
            }
            Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")),
        }
    }
    async fn disarm(Path(name): Path<String>) -> (StatusCode, String) {
        if !ALL.contains(&name.as_str()) {
            return (StatusCode::NOT_FOUND, format!("no failpoint {name}\n"));
        }
        fail::remove(name.as_str());
        (StatusCode::OK, String::new())
    }
    axum::Router::new()
        .route("/debug/failpoints", get(list))
        .route(
            "/debug/failpoints/{name}",
            axum::routing::put(arm).delete(disarm),
        )
}

#[cfg(test)]
mod tests {
    #[test]
    fn mvcc_names_are_in_the_catalogue() {
        for name in concord_mvcc::failpoints::ALL {
            assert!(
                super::ALL.contains(name),
                "{name} missing from the catalogue"
            );
        }
    }
}
