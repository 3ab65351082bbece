//! Recording watchers for fault tests: a logical watcher that watches a range session
//! after session (resuming from the last observed revision + 1 on the next member when
//! a stream breaks, stays silent or retires), recording every response as a
//! [`WatcherHistory`] for [`crate::watchcheck`]. Used by the Jepsen-style test and the
//! robustness scenarios.

use std::time::{Duration, Instant};

use anyhow::Result;
use etcd_client::{Client, WatchOptions};

use crate::Rng;
use crate::watchcheck::{self, KeyRange, Response, Session, WatcherHistory};

/// A watch stream without any message for this long is given up (progress
/// notifications come far more often, so a healthy stream is never this quiet).
pub const WATCH_IDLE: Duration = Duration::from_secs(3);
/// After the run, every watcher must observe the final revision within this.
pub const WATCH_CATCH_UP: Duration = Duration::from_secs(15);

/// The client a watch stream was opened with (kept alive with the stream), the
/// stream's request side and its response side.
pub type WatchConn = (
    Client,
    etcd_client::WatchRequestSender,
    etcd_client::WatchResponseStream,
);

/// Opens a watch of `range` from `start` on `endpoint` (progress notifications on).
pub async fn open_watch(endpoint: &str, range: &KeyRange, start: i64) -> Result<WatchConn> {
    let client = watchcheck::connect_for_watch(endpoint).await?;
    let mut opts = WatchOptions::new()
        .with_start_revision(start)
        .with_progress_notify();
    if !range.range_end.is_empty() {
        opts = opts.with_range(range.range_end.clone());
    }
    let stream = client
        .watch_client()
        .max_decoding_message_size(64 << 20)
        .watch(range.key.clone(), Some(opts))
        .await?;
    let (tx, rx) = stream.split();
    Ok((client, tx, rx))
}

/// Why a watch session ended, for the summary (ports and details stripped).
pub fn end_kind(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            let msg: String = s.message().chars().take(50).collect();
            format!("{:?}: {msg}", s.code())
        }
        other => format!("{other}").chars().take(50).collect(),
    }
}

/// One logical watcher: watches `range` from `first_start`, session after session,
/// until told the final revision (through `finish`) and it has observed it, or
/// [`WATCH_CATCH_UP`] after that; sends `RequestProgress` now and then if
/// `request_progress`. Returns its history and, if it did not catch up, the revision
/// it was to reach.
#[allow(clippy::too_many_arguments)]
pub async fn watcher_loop(
    name: &'static str,
    range: KeyRange,
    endpoints: Vec<String>,
    mut member: usize,
    first_start: i64,
    finish: tokio::sync::watch::Receiver<Option<i64>>,
    request_progress: bool,
    seed: u64,
) -> (WatcherHistory, Option<i64>) {
    let mut rng = Rng::new(seed);
    let mut hist = WatcherHistory::new(name, range.clone());
    let mut observed = first_start - 1;
    let mut give_up: Option<Instant> = None;
    loop {
        let target = *finish.borrow();
        if let Some(target) = target {
            if observed >= target {
                return (hist, None);
            }
            let deadline = *give_up.get_or_insert_with(|| Instant::now() + WATCH_CATCH_UP);
            if Instant::now() >= deadline {
                return (hist, Some(target));
            }
        }
        let endpoint = endpoints[member].clone();
        // The next session goes to another member, whatever happens to this one.
        member = (member + 1) % endpoints.len();
        let start = observed + 1;
        let opened = tokio::time::timeout(WATCH_IDLE, open_watch(&endpoint, &range, start)).await;
        let (_client, mut tx, mut rx) = match opened {
            Ok(Ok(pair)) => pair,
            Ok(Err(_)) | Err(_) => {
                // Down or stopped: try the next member after a short back-off.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let mut session = Session::new(endpoint, start, !hist.sessions.is_empty());
        // Sessions also end on their own, so resuming is exercised without faults.
        let retire = Instant::now() + rng.millis(2_000, 6_000);
        let mut next_progress = Instant::now() + rng.millis(200, 1_000);
        let mut last_msg = Instant::now();
        let ended = loop {
            if finish.borrow().is_some_and(|t| observed >= t) {
                break "caught up".to_string();
            }
            let now = Instant::now();
            // A member that never reaches the target (it diverged, or lags for good)
            // may still send progress: the give-up deadline holds inside a session too.
            if finish.borrow().is_some() {
                let deadline = *give_up.get_or_insert_with(|| now + WATCH_CATCH_UP);
                if now >= deadline {
                    break "gave up".to_string();
                }
            }
            if now >= last_msg + WATCH_IDLE {
                break format!("no message for {WATCH_IDLE:?}");
            }
            if now >= retire && finish.borrow().is_none() {
                break "retired".to_string();
            }
            if now >= next_progress {
                next_progress = now + rng.millis(200, 1_000);
                if !request_progress {
                    // Periodic progress notifications only.
                } else if let Err(e) = tx.request_progress().await {
                    break format!("request_progress: {}", end_kind(&e));
                }
            }
            let mut wake = (last_msg + WATCH_IDLE).min(next_progress).min(retire);
            if let Some(d) = give_up {
                wake = wake.min(d);
            }
            let msg = tokio::select! {
                msg = rx.message() => msg,
                _ = tokio::time::sleep_until(wake.into()) => continue,
            };
            match msg {
                Ok(Some(msg)) => {
                    last_msg = Instant::now();
                    let resp = Response::from_etcd(&msg);
                    if let Some(rev) = resp.observed_revision() {
                        observed = observed.max(rev);
                    }
                    let canceled = matches!(resp.kind, watchcheck::ResponseKind::Canceled { .. });
                    session.responses.push(resp);
                    if canceled {
                        break format!("canceled: {}", msg.cancel_reason());
                    }
                }
                Ok(None) => break "stream closed".to_string(),
                Err(e) => break end_kind(&e),
            }
        };
        session.ended = Some(ended);
        hist.sessions.push(session);
    }
}
