//! Watches: the mvcc store as the watch hub's [`History`], the apply path's changes as
//! the hub's input ([`publish_changes`]), and the hub's streams as the gateway's
//! [`WatchSession`]s.

use std::sync::Arc;

use std::time::Duration;

use concord_gateway::{
    Caller, Result as ApiResult, WatchBackend, WatchSession, async_trait, create_filters,
};
use concord_mvcc as mvcc;
use concord_proto::etcdserverpb as pb;
use concord_proto::mvccpb;
use concord_watch as w;

/// The store's history, as the hub reads it to catch watchers up.
pub struct StoreHistory(pub Arc<mvcc::Store>);

fn watch_kv(kv: mvcc::KeyValue) -> w::KeyValue {
    w::KeyValue {
        key: kv.key,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        value: kv.value,
        lease: kv.lease,
    }
}

fn watch_event(e: mvcc::HistoryEvent) -> w::Event {
    w::Event {
        kind: if e.tombstone {
            w::EventKind::Delete
        } else {
            w::EventKind::Put
        },
        kv: watch_kv(e.kv),
        prev_kv: None,
    }
}

impl w::History for StoreHistory {
    fn events(
        &self,
        from: i64,
        to: i64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Vec<w::Event>, w::HistoryError> {
        match self.0.history(from, to, max_events, max_bytes) {
            Ok(mvcc::HistoryPage::Events(evs)) => Ok(evs.into_iter().map(watch_event).collect()),
            Ok(mvcc::HistoryPage::Compacted(at)) => Err(w::HistoryError::Compacted(at)),
            Err(e) => Err(w::HistoryError::Failed(e.to_string())),
        }
    }

    fn value_at(&self, key: &[u8], revision: i64) -> Option<w::KeyValue> {
        if revision <= 0 {
            return None;
        }
        let req = mvcc::RangeRequest {
            range: mvcc::KeyRange::new(key.to_vec(), Vec::new()),
            revision,
            ..mvcc::RangeRequest::default()
        };
        let mut resp = self.0.range(&req).ok()?;
        resp.kvs.pop().map(watch_kv)
    }
}

/// Hands a committed batch's changes to the hub, one call per revision, in order.
pub fn publish_changes(hub: &w::Hub, changes: Vec<mvcc::HistoryEvent>) {
    let mut batch: Vec<w::Event> = Vec::new();
    let mut rev = 0;
    for c in changes {
        if c.kv.mod_revision != rev && !batch.is_empty() {
            hub.publish(rev, &batch);
            batch.clear();
        }
        rev = c.kv.mod_revision;
        batch.push(watch_event(c));
    }
    if !batch.is_empty() {
        hub.publish(rev, &batch);
    }
}

fn pb_kv(kv: w::KeyValue) -> mvccpb::KeyValue {
    mvccpb::KeyValue {
        key: kv.key,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        value: kv.value,
        lease: kv.lease,
    }
}

fn pb_event(e: w::Event) -> mvccpb::Event {
    mvccpb::Event {
        r#type: match e.kind {
            w::EventKind::Put => mvccpb::event::EventType::Put as i32,
            w::EventKind::Delete => mvccpb::event::EventType::Delete as i32,
        },
        kv: Some(pb_kv(e.kv)),
        prev_kv: e.prev_kv.map(pb_kv),
    }
}

/// Builds a response header for a revision (cluster, member, term filled in).
pub type HeaderFn = Arc<dyn Fn(i64) -> Option<pb::ResponseHeader> + Send + Sync>;

/// A gRPC watch stream on the hub, for one caller: a watcher on keys the caller may
/// not read is refused when it is created.
pub struct Session {
    stream: w::WatchStream,
    header: HeaderFn,
    caller: Caller,
    auth: Arc<crate::auth::AuthStore>,
    /// For the revision in a refusal's header.
    store: Arc<mvcc::Store>,
    /// Refusals of watchers the caller may not create, answered in order.
    refused_tx: tokio::sync::mpsc::UnboundedSender<pb::WatchResponse>,
    refused: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<pb::WatchResponse>>,
}

impl Session {
    pub fn new(
        stream: w::WatchStream,
        header: HeaderFn,
        caller: Caller,
        auth: Arc<crate::auth::AuthStore>,
        store: Arc<mvcc::Store>,
    ) -> Session {
        let (refused_tx, refused) = tokio::sync::mpsc::unbounded_channel();
        Session {
            stream,
            header,
            caller,
            auth,
            store,
            refused_tx,
            refused: tokio::sync::Mutex::new(refused),
        }
    }
}

/// Converts a hub response to etcd's message; the flag says whether to fragment.
pub fn to_pb(r: w::Response, header: &HeaderFn) -> (pb::WatchResponse, bool) {
    let mut out = pb::WatchResponse::default();
    let mut fragment = false;
    let revision = match r {
        w::Response::Created { watch_id, revision } => {
            out.watch_id = watch_id;
            out.created = true;
            revision
        }
        w::Response::CreateFailed {
            watch_id,
            revision,
            reason,
        } => {
            out.watch_id = watch_id;
            out.created = true;
            out.canceled = true;
            out.cancel_reason = reason;
            revision
        }
        w::Response::Events {
            watch_id,
            revision,
            events,
            fragment: f,
            ..
        } => {
            out.watch_id = watch_id;
            out.events = events.iter().cloned().map(pb_event).collect();
            fragment = f;
            revision
        }
        w::Response::Progress { watch_id, revision } => {
            out.watch_id = watch_id;
            revision
        }
        w::Response::Canceled {
            watch_id,
            revision,
            compact_revision,
        } => {
            out.watch_id = watch_id;
            out.canceled = true;
            out.compact_revision = compact_revision;
            revision
        }
    };
    out.header = header(revision);
    (out, fragment)
}

#[async_trait]
impl WatchSession for Session {
    fn create(&self, c: pb::WatchCreateRequest) {
        // etcd checks a watcher once, when it is created; one it refuses is answered
        // as created and canceled at once, with id -1 and the error's full text.
        let access = crate::auth::Access::Read;
        if let Err(e) = self.auth.check(&self.caller, &c.key, &c.range_end, access) {
            let e = concord_gateway::Error::from(e);
            let refusal = pb::WatchResponse {
                header: (self.header)(self.store.current_revision()),
                watch_id: -1,
                created: true,
                canceled: true,
                cancel_reason: format!("rpc error: code = {:?} desc = {e}", e.code()),
                ..pb::WatchResponse::default()
            };
            let _ = self.refused_tx.send(refusal);
            return;
        }
        let (no_put, no_delete) = create_filters(&c);
        self.stream.create(w::WatchSpec {
            watch_id: c.watch_id,
            key: c.key,
            range_end: c.range_end,
            start_revision: c.start_revision,
            prev_kv: c.prev_kv,
            progress_notify: c.progress_notify,
            no_put,
            no_delete,
            fragment: c.fragment,
        });
    }

    fn cancel(&self, watch_id: i64) {
        self.stream.cancel(watch_id);
    }

    fn progress(&self) {
        self.stream.request_progress();
    }

    async fn writable(&self) {
        self.stream.writable().await
    }

    async fn next(&self) -> Option<(pb::WatchResponse, bool)> {
        let mut refused = self.refused.lock().await;
        tokio::select! {
            biased;
            Some(r) = refused.recv() => Some((r, false)),
            r = self.stream.next() => Some(to_pb(r?, &self.header)),
        }
    }
}

/// Watch: client streams over the member's watch hub.
pub struct WatchApi {
    pub(crate) core: std::sync::Arc<crate::core::Core>,
    pub(crate) hub: std::sync::Arc<concord_watch::Hub>,
}

crate::core::shares_core!(WatchApi);

impl WatchBackend for WatchApi {
    fn has_leader(&self) -> bool {
        self.raft.status().leader != 0
    }

    fn leader_check(&self) -> Duration {
        self.election_timeout
    }

    fn open_watch(&self, caller: Caller) -> ApiResult<Box<dyn WatchSession>> {
        let identity = self.identity;
        let raft = self.raft.clone();
        let header: HeaderFn = Arc::new(move |revision| {
            Some(pb::ResponseHeader {
                cluster_id: identity.cluster_id,
                member_id: identity.member_id,
                revision,
                raft_term: raft.status().term,
            })
        });
        Ok(Box::new(crate::watch::Session::new(
            self.hub.stream(),
            header,
            caller,
            self.auth.clone(),
            self.store.clone(),
        )))
    }
}
