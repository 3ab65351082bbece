//! The `etcdserverpb.Watch` service: one bidirectional stream per client call, many
//! watchers per stream. Requests are handed to a [`WatchSession`] the backend opens per
//! stream; its responses go back in order, split into fragments (as etcd does) when a
//! watcher asked for `fragment` and a response reaches the request size limit plus
//! etcd's 512 KiB gRPC allowance.

use std::pin::Pin;
use std::sync::Arc;

use concord_proto::etcdserverpb::{
    WatchCreateRequest, WatchRequest, WatchResponse, watch_request::RequestUnion,
    watch_server::Watch,
};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{AuthBackend, Caller, caller_of};
use crate::backend::{WatchBackend, WatchSession};
use crate::error::Error;
use crate::validate::Limits;

/// Serves Watch over any [`WatchBackend`].
pub struct WatchService<B: ?Sized> {
    backend: Arc<B>,
    pub(crate) auth: Arc<dyn AuthBackend>,
    limits: Limits,
}

impl<B: ?Sized> WatchService<B> {
    pub fn new(backend: Arc<B>, auth: Arc<dyn AuthBackend>, limits: Limits) -> Self {
        Self {
            backend,
            auth,
            limits,
        }
    }
}

/// gRPC metadata a client sets to have its streams cancelled while this member has no
/// leader, with the value `true` (etcd's `rpctypes.MetadataRequireLeaderKey`).
const REQUIRE_LEADER_KEY: &str = "hasleader";
/// Consecutive leaderless checks before such a stream ends (etcd's `maxNoLeaderCnt`).
const LEADERLESS_CHECKS: u32 = 3;

pub(crate) type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl<B: WatchBackend + ?Sized> Watch for WatchService<B> {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<WatchStream>, Status> {
        let require_leader = require_leader(req.metadata());
        let caller = caller_of(&*self.auth, &req).await?;
        Ok(Response::new(self.serve(
            caller,
            require_leader,
            req.into_inner(),
        )?))
    }
}

/// Whether the call's metadata asks for its streams to end while there is no leader.
pub(crate) fn require_leader(m: &tonic::metadata::MetadataMap) -> bool {
    m.get(REQUIRE_LEADER_KEY)
        .is_some_and(|v| v.as_bytes() == b"true")
}

impl<B: WatchBackend + ?Sized> WatchService<B> {
    /// One watch stream over any source of requests (a gRPC stream, or the JSON
    /// objects of an HTTP body): the responses, in order, until the session ends or
    /// the returned stream is dropped.
    pub(crate) fn serve<S>(
        &self,
        caller: Caller,
        require_leader: bool,
        mut inbound: S,
    ) -> Result<WatchStream, Status>
    where
        S: Stream<Item = Result<WatchRequest, Status>> + Send + Unpin + 'static,
    {
        if require_leader && !self.backend.has_leader() {
            return Err(Error::NoLeader.into());
        }
        let session: Arc<dyn WatchSession> = Arc::from(self.backend.open_watch(caller)?);
        let (tx, rx) = mpsc::channel::<Result<WatchResponse, Status>>(16);

        let reader_session = session.clone();
        let reader = tokio::spawn(async move {
            loop {
                // A client that sends requests but does not read answers waits here.
                reader_session.writable().await;
                match inbound.next().await {
                    Some(Ok(WatchRequest {
                        request_union: Some(r),
                    })) => match r {
                        RequestUnion::CreateRequest(c) => reader_session.create(c),
                        RequestUnion::CancelRequest(c) => reader_session.cancel(c.watch_id),
                        RequestUnion::ProgressRequest(_) => reader_session.progress(),
                    },
                    Some(Ok(WatchRequest {
                        request_union: None,
                    })) => {}
                    // The client closed its side (etcd keeps sending until the call
                    // ends) or the call is gone.
                    None | Some(Err(_)) => return,
                }
            }
        });

        // etcd's watch server fragments at the request limit plus its 512 KiB gRPC
        // allowance (`grpcOverheadBytes`), not at the request limit itself.
        let max = self.limits.max_grpc_message();
        let backend = self.backend.clone();
        let period = backend.leader_check();
        let mut leader_checks =
            tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        leader_checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut leaderless = 0;
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    r = session.next() => r,
                    _ = tx.closed() => break,
                    _ = leader_checks.tick(), if require_leader => {
                        leaderless = if backend.has_leader() { 0 } else { leaderless + 1 };
                        if leaderless >= LEADERLESS_CHECKS {
                            let _ = tx.send(Err(Error::NoLeader.into())).await;
                            break;
                        }
                        continue;
                    }
                };
                let Some((resp, fragment)) = next else {
                    break;
                };
                let parts = if fragment {
                    fragments(resp, max)
                } else {
                    vec![resp]
                };
                for part in parts {
                    if tx.send(Ok(part)).await.is_err() {
                        reader.abort();
                        return;
                    }
                }
            }
            reader.abort();
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

/// etcd's fragmenting: a response of two or more events that is at least `max` bytes
/// is sent as several, each as large as fits (but at least one event), all marked
/// `fragment` except the last.
pub fn fragments(resp: WatchResponse, max: usize) -> Vec<WatchResponse> {
    if resp.encoded_len() < max || resp.events.len() < 2 {
        return vec![resp];
    }
    let mut shell = resp.clone();
    shell.events.clear();
    shell.fragment = true;
    let mut out = Vec::new();
    let mut cur = shell.clone();
    for ev in resp.events {
        cur.events.push(ev);
        if cur.events.len() > 1 && cur.encoded_len() >= max {
            let ev = cur.events.pop().expect("just pushed");
            out.push(std::mem::replace(&mut cur, shell.clone()));
            cur.events.push(ev);
        }
    }
    cur.fragment = false;
    out.push(cur);
    out
}

/// The create request's filters as (no put, no delete).
pub fn create_filters(c: &WatchCreateRequest) -> (bool, bool) {
    use concord_proto::etcdserverpb::watch_create_request::FilterType;
    let has = |f: FilterType| c.filters.contains(&(f as i32));
    (has(FilterType::Noput), has(FilterType::Nodelete))
}

#[cfg(test)]
mod tests {
    use super::*;
    use concord_proto::mvccpb::{Event, KeyValue};

    fn resp(n: usize, value: usize) -> WatchResponse {
        WatchResponse {
            watch_id: 7,
            events: (0..n)
                .map(|i| Event {
                    kv: Some(KeyValue {
                        key: format!("k{i}").into_bytes(),
                        value: vec![b'x'; value],
                        ..KeyValue::default()
                    }),
                    ..Event::default()
                })
                .collect(),
            ..WatchResponse::default()
        }
    }

    #[test]
    fn small_or_single_event_responses_are_not_split() {
        assert_eq!(fragments(resp(3, 10), 1000).len(), 1);
        let one = fragments(resp(1, 5000), 1000);
        assert_eq!(one.len(), 1);
        assert!(!one[0].fragment);
    }

    #[test]
    fn large_responses_split_in_order_and_only_the_last_is_final() {
        let parts = fragments(resp(10, 300), 1000);
        assert!(parts.len() > 1);
        let keys: Vec<Vec<u8>> = parts
            .iter()
            .flat_map(|p| p.events.iter().map(|e| e.kv.as_ref().unwrap().key.clone()))
            .collect();
        let want: Vec<Vec<u8>> = (0..10).map(|i| format!("k{i}").into_bytes()).collect();
        assert_eq!(keys, want);
        for (i, p) in parts.iter().enumerate() {
            assert_eq!(p.fragment, i + 1 < parts.len());
            assert_eq!(p.watch_id, 7);
            assert!(p.events.len() == 1 || p.encoded_len() < 1000);
        }
    }
}
