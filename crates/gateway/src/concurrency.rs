//! What the Lock and Election services share: the building blocks of etcd's
//! `clientv3/concurrency` recipes (session keys, "first/last created under a prefix",
//! waiting for the deletion of every older key), done over the [`KvBackend`],
//! [`WatchBackend`] and [`LeaseBackend`] the way etcd's `v3lock`/`v3election` servers
//! do them over their embedded client.
//!
//! etcd's servers return their client's errors to the caller as plain Go errors, so a
//! gRPC client sees them with code `Unknown` and etcd's text (`etcdserver: requested
//! lease not found`, `election: no leader`, ...); [`etcd`] makes that mapping.

use std::sync::Arc;

use concord_proto::etcdserverpb::{
    Compare, DeleteRangeRequest, LeaseGrantRequest, PutRequest, RangeRequest, RangeResponse,
    RequestOp, ResponseHeader, TxnRequest, TxnResponse, WatchCreateRequest, compare, range_request,
    request_op, response_op, watch_create_request::FilterType,
};
use concord_proto::mvccpb::{KeyValue, event::EventType};
use prost::Message;
use tonic::{Code, Status};

use crate::auth::Caller;
use crate::backend::{KvBackend, LeaseBackend, WatchBackend, WatchSession};
use crate::error::{Error, Result as ApiResult};
use crate::kv::txn_writes;
use crate::validate::{Limits, check_range, check_txn};

/// A recipe's backends with the caller of the Lock or Election request: every call the
/// recipe makes is made as that caller, so it gets that caller's permissions.
pub(crate) struct As<B: ?Sized> {
    backend: Arc<B>,
    caller: Caller,
}

impl<B: ?Sized> As<B> {
    pub(crate) fn new(backend: Arc<B>, caller: Caller) -> Arc<Self> {
        Arc::new(Self { backend, caller })
    }
}

impl<B: KvBackend + ?Sized> As<B> {
    pub(crate) async fn txn(&self, t: TxnRequest) -> ApiResult<TxnResponse> {
        self.backend.txn(&self.caller, t).await
    }
    pub(crate) async fn range(&self, r: RangeRequest) -> ApiResult<RangeResponse> {
        self.backend.range(&self.caller, r).await
    }
    pub(crate) async fn delete_range(
        &self,
        d: DeleteRangeRequest,
    ) -> ApiResult<concord_proto::etcdserverpb::DeleteRangeResponse> {
        self.backend.delete_range(&self.caller, d).await
    }
}

impl<B: LeaseBackend + ?Sized> As<B> {
    async fn lease_grant(
        &self,
        g: LeaseGrantRequest,
    ) -> ApiResult<concord_proto::etcdserverpb::LeaseGrantResponse> {
        self.backend.lease_grant(&self.caller, g).await
    }
}

impl<B: WatchBackend + ?Sized> As<B> {
    pub(crate) fn open_watch(&self) -> ApiResult<Box<dyn WatchSession>> {
        self.backend.open_watch(self.caller.clone())
    }
}

/// `election: not leader` (`concurrency.ErrElectionNotLeader`).
pub(crate) const NOT_LEADER: &str = "election: not leader";
/// `election: no leader` (`concurrency.ErrElectionNoLeader`).
pub(crate) const NO_LEADER: &str = "election: no leader";
/// A Proclaim or Resign without its leader key (`v3election.ErrMissingLeaderKey`).
pub(crate) const MISSING_LEADER: &str = "\"leader\" field must be provided";
/// A lock whose own key went away (its lease expired) while it waited
/// (`concurrency.ErrSessionExpired`).
pub(crate) const SESSION_EXPIRED: &str = "mutex: session is expired";
/// The watch a waiter relies on ended without the delete it waited for.
pub(crate) const LOST_WATCHER: &str = "lost watcher waiting for delete";

/// An error as etcd's lock and election servers return it: code `Unknown`, etcd's text.
pub(crate) fn etcd(e: Error) -> Status {
    match e {
        Error::Unimplemented(_) => e.into(),
        e => Status::new(Code::Unknown, e.to_string()),
    }
}

/// One of the recipe errors that are not server errors (`election: not leader`, ...).
pub(crate) fn recipe_error(text: &'static str) -> Status {
    Status::new(Code::Unknown, text)
}

/// The lease a request's key is written with, which also names the key, as etcd's
/// servers get it from a `concurrency.Session`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Session {
    pub lease: i64,
}

/// The TTL of the lease etcd's servers grant a request that brings none (clientv3
/// `concurrency`'s default session TTL, in seconds).
pub(crate) const SESSION_TTL: i64 = 60;

/// A caller's lease is used as given: its key is `name/<lease>`, and a second request
/// with the same lease finds the same key. For lease 0 etcd grants a new lease of 60 s
/// for the request and never keeps it alive, so such a key goes away a minute later
/// unless the caller deletes it first.
pub(crate) async fn session<B: LeaseBackend + ?Sized>(
    backend: &As<B>,
    lease: i64,
) -> Result<Session, Status> {
    if lease != 0 {
        return Ok(Session { lease });
    }
    let granted = backend
        .lease_grant(LeaseGrantRequest {
            ttl: SESSION_TTL,
            id: 0,
        })
        .await
        .map_err(etcd)?;
    if !granted.error.is_empty() {
        return Err(Status::new(Code::Unknown, granted.error));
    }
    Ok(Session { lease: granted.id })
}

/// An id in hex the way Go's `%x` prints a signed integer (`-1` for -1).
pub(crate) fn go_hex(v: i64) -> String {
    if v < 0 {
        format!("-{:x}", v.unsigned_abs())
    } else {
        format!("{v:x}")
    }
}

/// `name/`: the prefix every key of a lock or an election lives under.
pub(crate) fn prefix(name: &[u8]) -> Vec<u8> {
    let mut p = name.to_vec();
    p.push(b'/');
    p
}

/// `prefix/<lease in hex>`.
pub(crate) fn session_key(pfx: &[u8], s: &Session) -> Vec<u8> {
    let mut k = pfx.to_vec();
    k.extend_from_slice(go_hex(s.lease).as_bytes());
    k
}

/// The end of the range of keys starting with `p` (etcd's `GetPrefixRangeEnd`).
pub(crate) fn prefix_end(p: &[u8]) -> Vec<u8> {
    let mut end = p.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn top(pfx: &[u8], order: range_request::SortOrder) -> RangeRequest {
    RangeRequest {
        key: pfx.to_vec(),
        range_end: prefix_end(pfx),
        limit: 1,
        sort_order: order as i32,
        sort_target: range_request::SortTarget::Create as i32,
        ..RangeRequest::default()
    }
}

/// The oldest key under the prefix (clientv3 `WithFirstCreate`).
pub(crate) fn first_created(pfx: &[u8]) -> RangeRequest {
    top(pfx, range_request::SortOrder::Ascend)
}

/// The newest key under the prefix created at or before `max_create_revision`
/// (`WithLastCreate` + `WithMaxCreateRev`).
pub(crate) fn last_created_until(pfx: &[u8], max_create_revision: i64) -> RangeRequest {
    RangeRequest {
        max_create_revision,
        ..top(pfx, range_request::SortOrder::Descend)
    }
}

pub(crate) fn get(key: &[u8]) -> RangeRequest {
    RangeRequest {
        key: key.to_vec(),
        ..RangeRequest::default()
    }
}

pub(crate) fn created_at(key: &[u8], revision: i64) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Create as i32,
        key: key.to_vec(),
        target_union: Some(compare::TargetUnion::CreateRevision(revision)),
        ..Compare::default()
    }
}

pub(crate) fn op_range(r: RangeRequest) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestRange(r)),
    }
}

pub(crate) fn op_put(key: &[u8], value: Vec<u8>, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: key.to_vec(),
            value,
            lease,
            ..PutRequest::default()
        })),
    }
}

pub(crate) fn op_delete(key: &[u8]) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(
            DeleteRangeRequest {
                key: key.to_vec(),
                ..DeleteRangeRequest::default()
            },
        )),
    }
}

/// The kvs of the `i`th response of a txn, if it is a range.
pub(crate) fn range_kvs(resp: &TxnResponse, i: usize) -> &[KeyValue] {
    match resp.responses.get(i).and_then(|r| r.response.as_ref()) {
        Some(response_op::Response::ResponseRange(r)) => &r.kvs,
        _ => &[],
    }
}

pub(crate) fn header_of(h: &Option<ResponseHeader>) -> ResponseHeader {
    (*h).unwrap_or_default()
}

/// A txn with the checks the KV service makes (the request comes from a client).
pub(crate) async fn txn<B: KvBackend + ?Sized>(
    backend: &As<B>,
    limits: &Limits,
    t: TxnRequest,
) -> Result<TxnResponse, Status> {
    check_txn(&t, limits).map_err(etcd)?;
    if txn_writes(&t) {
        limits.check_size(t.encoded_len()).map_err(etcd)?;
    }
    backend.txn(t).await.map_err(etcd)
}

/// A linearizable range with the KV service's checks.
pub(crate) async fn range<B: KvBackend + ?Sized>(
    backend: &As<B>,
    r: RangeRequest,
) -> Result<RangeResponse, Status> {
    check_range(&r).map_err(etcd)?;
    backend.range(r).await.map_err(etcd)
}

/// Waits until `key` is deleted at or after `revision` (etcd's `waitDelete`). The
/// watch is cancelled when this returns or is dropped.
async fn wait_delete<B: WatchBackend + ?Sized>(
    backend: &As<B>,
    key: Vec<u8>,
    revision: i64,
) -> Result<(), Status> {
    let session = backend.open_watch().map_err(etcd)?;
    session.writable().await;
    session.create(WatchCreateRequest {
        key,
        start_revision: revision,
        filters: vec![FilterType::Noput as i32],
        ..WatchCreateRequest::default()
    });
    while let Some((resp, _)) = session.next().await {
        if resp
            .events
            .iter()
            .any(|e| e.r#type == EventType::Delete as i32)
        {
            return Ok(());
        }
        if resp.compact_revision != 0 {
            return Err(etcd(Error::Compacted));
        }
        if resp.canceled {
            return Err(if resp.cancel_reason.is_empty() {
                etcd(Error::FutureRev)
            } else {
                Status::new(Code::Unknown, resp.cancel_reason)
            });
        }
    }
    Err(recipe_error(LOST_WATCHER))
}

/// Waits until every key under `pfx` created at or before `max_create_revision` is
/// gone (etcd's `waitDeletes`): the newest such key is waited on until it is deleted,
/// then the next; returns the header of the read that found none left.
pub(crate) async fn wait_deletes<B: KvBackend + WatchBackend + ?Sized>(
    backend: &As<B>,
    pfx: &[u8],
    max_create_revision: i64,
) -> Result<ResponseHeader, Status> {
    loop {
        let resp = range(backend, last_created_until(pfx, max_create_revision)).await?;
        let header = header_of(&resp.header);
        match resp.kvs.into_iter().next() {
            None => return Ok(header),
            Some(kv) => wait_delete(backend, kv.key, header.revision).await?,
        }
    }
}

/// Undoes a half-done request: the txn runs when [`Cleanup::run`] is called, or in the
/// background if the guard is dropped armed (the client went away while it waited).
pub(crate) struct Cleanup<B: KvBackend + ?Sized> {
    backend: Arc<As<B>>,
    undo: Option<TxnRequest>,
}

impl<B: KvBackend + ?Sized> Cleanup<B> {
    pub(crate) fn new(backend: Arc<As<B>>, undo: TxnRequest) -> Self {
        Self {
            backend,
            undo: Some(undo),
        }
    }

    /// Nothing to undo any more.
    pub(crate) fn disarm(&mut self) {
        self.undo = None;
    }

    /// Undoes now; its own failure is not reported (etcd ignores it too).
    pub(crate) async fn run(mut self) {
        if let Some(t) = self.undo.take() {
            let _ = self.backend.txn(t).await;
        }
    }
}

impl<B: KvBackend + ?Sized> Drop for Cleanup<B> {
    fn drop(&mut self) {
        let Some(t) = self.undo.take() else {
            return;
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let backend = self.backend.clone();
            rt.spawn(async move {
                let _ = backend.txn(t).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_print_as_go_prints_them() {
        assert_eq!(go_hex(0), "0");
        assert_eq!(go_hex(0x694d_7a3b_c2e1_0d05), "694d7a3bc2e10d05");
        assert_eq!(go_hex(-1), "-1");
        assert_eq!(go_hex(i64::MIN), "-8000000000000000");
    }

    #[test]
    fn prefix_ends_are_etcds() {
        assert_eq!(prefix_end(b"lock/"), b"lock0");
        assert_eq!(prefix_end(b"/"), b"0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
    }

    #[test]
    fn recipe_errors_are_unknown_with_etcds_text() {
        let s = etcd(Error::LeaseNotFound);
        assert_eq!(
            (s.code(), s.message()),
            (Code::Unknown, "etcdserver: requested lease not found")
        );
        let s = recipe_error(NOT_LEADER);
        assert_eq!(
            (s.code(), s.message()),
            (Code::Unknown, "election: not leader")
        );
    }
}
