//! The `v3electionpb.Election` service: etcd's leader election
//! (`clientv3/concurrency.Election`) served over the KV, Watch and Lease backends, as
//! etcd's `v3election` server does.
//!
//! A candidate's key is `name/<lease in hex>` holding its proposal (lease 0: a new 60 s
//! lease, as etcd's server grants); the leader is the oldest key under `name/`.
//! Campaign returns once every older key is deleted; the leader's key (with its create
//! revision) proves leadership to Proclaim and Resign.
//! Observe streams the leader's key: now, on every change, and each next leader's.

use std::pin::Pin;
use std::sync::Arc;

use concord_proto::etcdserverpb::{ResponseHeader, TxnRequest, WatchCreateRequest};
use concord_proto::mvccpb::{KeyValue, event::EventType};
use concord_proto::v3electionpb::{
    CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest, LeaderResponse, ProclaimRequest,
    ProclaimResponse, ResignRequest, ResignResponse, election_server::Election,
};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::auth::{AuthBackend, caller_of};
use crate::backend::{KvBackend, LeaseBackend, WatchBackend};
use crate::concurrency::{
    As, Cleanup, MISSING_LEADER, NO_LEADER, NOT_LEADER, created_at, etcd, first_created, get,
    header_of, op_delete, op_put, op_range, prefix, prefix_end, range, range_kvs, recipe_error,
    session, session_key, txn, wait_deletes,
};
use crate::error::Error;
use crate::validate::Limits;

/// Serves Election over a backend with KV, Watch and Lease.
pub struct ElectionService<B: ?Sized> {
    backend: Arc<B>,
    auth: Arc<dyn AuthBackend>,
    limits: Limits,
}

impl<B: ?Sized> ElectionService<B> {
    pub fn new(backend: Arc<B>, auth: Arc<dyn AuthBackend>, limits: Limits) -> Self {
        Self {
            backend,
            auth,
            limits,
        }
    }

    /// The backends as the request's caller.
    async fn as_caller<T>(&self, req: &Request<T>) -> Result<Arc<As<B>>, Status> {
        Ok(As::new(
            self.backend.clone(),
            caller_of(&*self.auth, req).await?,
        ))
    }
}

type ObserveStream = Pin<Box<dyn Stream<Item = Result<LeaderResponse, Status>> + Send>>;

/// The txn that puts a new value on a leader's key, if it is still that leader's.
fn proclaim_txn(key: &[u8], rev: i64, lease: i64, value: Vec<u8>) -> TxnRequest {
    TxnRequest {
        compare: vec![created_at(key, rev)],
        success: vec![op_put(key, value, lease)],
        ..TxnRequest::default()
    }
}

/// The txn that deletes a leader's key, if it is still that leader's.
fn resign_txn(key: &[u8], rev: i64) -> TxnRequest {
    TxnRequest {
        compare: vec![created_at(key, rev)],
        success: vec![op_delete(key)],
        ..TxnRequest::default()
    }
}

impl<B: KvBackend + WatchBackend + ?Sized> ElectionService<B> {
    async fn proclaim_as(
        &self,
        backend: &As<B>,
        key: &[u8],
        rev: i64,
        lease: i64,
        value: Vec<u8>,
    ) -> Result<ResponseHeader, Status> {
        let resp = txn(backend, &self.limits, proclaim_txn(key, rev, lease, value)).await?;
        if !resp.succeeded {
            return Err(recipe_error(NOT_LEADER));
        }
        Ok(header_of(&resp.header))
    }
}

#[tonic::async_trait]
impl<B: KvBackend + WatchBackend + LeaseBackend + ?Sized> Election for ElectionService<B> {
    type ObserveStream = ObserveStream;

    async fn campaign(
        &self,
        req: Request<CampaignRequest>,
    ) -> Result<Response<CampaignResponse>, Status> {
        let as_caller = self.as_caller(&req).await?;
        let backend = &*as_caller;
        let CampaignRequest { name, lease, value } = req.into_inner();
        let pfx = prefix(&name);
        let s = session(backend, lease).await?;
        let key = session_key(&pfx, &s);
        let resp = txn(
            backend,
            &self.limits,
            TxnRequest {
                compare: vec![created_at(&key, 0)],
                success: vec![op_put(&key, value.clone(), s.lease)],
                failure: vec![op_range(get(&key))],
            },
        )
        .await?;
        // The response carries the header of this first txn, whatever follows.
        let header = header_of(&resp.header);
        let rev = if resp.succeeded {
            header.revision
        } else {
            // Campaigning again with the same lease: the same key and place in line,
            // with the new value proclaimed.
            let Some(kv) = range_kvs(&resp, 0).first() else {
                return Err(etcd(Error::Internal("campaign key vanished".into())));
            };
            let rev = kv.create_revision;
            if kv.value != value
                && let Err(e) = self.proclaim_as(backend, &key, rev, s.lease, value).await
            {
                let _ = backend.txn(resign_txn(&key, rev)).await;
                return Err(e);
            }
            rev
        };

        // A client that stops waiting withdraws its candidacy; other errors leave the
        // key in place, as etcd does.
        let mut withdraw = Cleanup::new(as_caller.clone(), resign_txn(&key, rev));
        let waited = wait_deletes(backend, &pfx, rev - 1).await;
        withdraw.disarm();
        waited?;
        Ok(Response::new(CampaignResponse {
            header: Some(header),
            leader: Some(LeaderKey {
                name,
                key,
                rev,
                lease: s.lease,
            }),
        }))
    }

    async fn proclaim(
        &self,
        req: Request<ProclaimRequest>,
    ) -> Result<Response<ProclaimResponse>, Status> {
        let backend = self.as_caller(&req).await?;
        let ProclaimRequest { leader, value } = req.into_inner();
        let leader = leader.ok_or_else(|| recipe_error(MISSING_LEADER))?;
        // Lease 0 gets a new lease here too, and the key is put with it, as in etcd.
        let s = session(&backend, leader.lease).await?;
        let header = self
            .proclaim_as(&backend, &leader.key, leader.rev, s.lease, value)
            .await?;
        Ok(Response::new(ProclaimResponse {
            header: Some(header),
        }))
    }

    async fn leader(
        &self,
        req: Request<LeaderRequest>,
    ) -> Result<Response<LeaderResponse>, Status> {
        let backend = self.as_caller(&req).await?;
        let pfx = prefix(&req.into_inner().name);
        let resp = range(&backend, first_created(&pfx)).await?;
        let Some(kv) = resp.kvs.into_iter().next() else {
            return Err(recipe_error(NO_LEADER));
        };
        Ok(Response::new(LeaderResponse {
            header: resp.header,
            kv: Some(kv),
        }))
    }

    async fn observe(
        &self,
        req: Request<LeaderRequest>,
    ) -> Result<Response<ObserveStream>, Status> {
        let backend = self.as_caller(&req).await?;
        let pfx = prefix(&req.into_inner().name);
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let closed = tx.clone();
            // Everything the observer holds (watches above all) goes when the client
            // does.
            tokio::select! {
                _ = observe(&*backend, &pfx, &tx) => {}
                _ = closed.closed() => {}
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn resign(
        &self,
        req: Request<ResignRequest>,
    ) -> Result<Response<ResignResponse>, Status> {
        let backend = self.as_caller(&req).await?;
        let leader = req
            .into_inner()
            .leader
            .ok_or_else(|| recipe_error(MISSING_LEADER))?;
        // Not being the leader (any more) is no error: the txn just does nothing. (etcd
        // also grants a lease here for lease 0, which nothing uses; that is skipped.)
        let resp = txn(&backend, &self.limits, resign_txn(&leader.key, leader.rev)).await?;
        Ok(Response::new(ResignResponse {
            header: resp.header,
        }))
    }
}

/// etcd's `Election.Observe`: send the leader's key; follow it, sending every new
/// value, until it is deleted; then the next leader. With no leader, wait for the first
/// key put under the prefix. Ends (the stream closes without an error, as etcd's does)
/// when a read fails or a watch is lost.
async fn observe<B: KvBackend + WatchBackend + ?Sized>(
    backend: &As<B>,
    pfx: &[u8],
    tx: &mpsc::Sender<Result<LeaderResponse, Status>>,
) {
    let send = |header: ResponseHeader, kv: KeyValue| async move {
        tx.send(Ok(LeaderResponse {
            header: Some(header),
            kv: Some(kv),
        }))
        .await
        .is_ok()
    };
    loop {
        let Ok(resp) = range(backend, first_created(pfx)).await else {
            return;
        };
        let header = header_of(&resp.header);
        let leader = match resp.kvs.into_iter().next() {
            Some(kv) => Some((header, kv)),
            None => first_put(backend, pfx, header.revision).await,
        };
        let Some((header, kv)) = leader else {
            return;
        };
        let key = kv.key.clone();
        let from = header.revision + 1;
        if !send(header, kv).await {
            return;
        }

        let Ok(watch) = backend.open_watch() else {
            return;
        };
        watch.writable().await;
        watch.create(WatchCreateRequest {
            key,
            start_revision: from,
            ..WatchCreateRequest::default()
        });
        'leader: loop {
            let Some((wr, _)) = watch.next().await else {
                return;
            };
            if wr.canceled {
                return;
            }
            let header = header_of(&wr.header);
            for ev in wr.events {
                if ev.r#type == EventType::Delete as i32 {
                    break 'leader;
                }
                if !send(header, ev.kv.unwrap_or_default()).await {
                    return;
                }
            }
        }
    }
}

/// The first key put under the prefix from `revision` on, with a header at its
/// revision; `None` if the watch fails.
async fn first_put<B: WatchBackend + ?Sized>(
    backend: &As<B>,
    pfx: &[u8],
    revision: i64,
) -> Option<(ResponseHeader, KeyValue)> {
    let watch = backend.open_watch().ok()?;
    watch.writable().await;
    watch.create(WatchCreateRequest {
        key: pfx.to_vec(),
        range_end: prefix_end(pfx),
        start_revision: revision,
        ..WatchCreateRequest::default()
    });
    loop {
        let (wr, _) = watch.next().await?;
        if wr.canceled {
            return None;
        }
        let put = wr
            .events
            .into_iter()
            .find(|e| e.r#type == EventType::Put as i32)
            .and_then(|e| e.kv);
        if let Some(kv) = put {
            let mut header = header_of(&wr.header);
            // A response may hold several revisions; the header speaks for this put.
            header.revision = kv.mod_revision;
            return Some((header, kv));
        }
    }
}
