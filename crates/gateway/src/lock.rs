//! The `v3lockpb.Lock` service: etcd's distributed mutex (`clientv3/concurrency.Mutex`)
//! served over the KV, Watch and Lease backends, as etcd's `v3lock` server does.
//!
//! A locker's key is `name/<lease in hex>`, put with its lease. The lock belongs to the
//! oldest key under `name/` (smallest create revision); a locker waits until every older
//! key is deleted, one at a time, newest first. Locking again with the same lease finds
//! the same key and so the same place in line; lease 0 gets a new 60 s lease, as etcd's
//! server gives it. Once the older keys are gone, the locker reads its own key back: if
//! that went too (its lease expired while it waited), the answer is `mutex: session is expired`, as from etcd 3.5 on (etcd 3.4 reports the lock
//! as acquired with a key that no longer exists).

use std::sync::Arc;

use concord_proto::etcdserverpb::{DeleteRangeRequest, TxnRequest};
use concord_proto::v3lockpb::{
    LockRequest, LockResponse, UnlockRequest, UnlockResponse, lock_server::Lock,
};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::auth::{AuthBackend, caller_of};
use crate::backend::{KvBackend, LeaseBackend, WatchBackend};
use crate::concurrency::{
    As, Cleanup, SESSION_EXPIRED, created_at, etcd, first_created, get, header_of, op_delete,
    op_put, op_range, prefix, range, range_kvs, recipe_error, session, session_key, txn,
    wait_deletes,
};
use crate::error::Error;
use crate::validate::{Limits, check_delete};

/// Serves Lock over a backend with KV, Watch and Lease.
pub struct LockService<B: ?Sized> {
    backend: Arc<B>,
    auth: Arc<dyn AuthBackend>,
    limits: Limits,
}

impl<B: ?Sized> LockService<B> {
    pub fn new(backend: Arc<B>, auth: Arc<dyn AuthBackend>, limits: Limits) -> Self {
        Self {
            backend,
            auth,
            limits,
        }
    }
}

#[tonic::async_trait]
impl<B: KvBackend + WatchBackend + LeaseBackend + ?Sized> Lock for LockService<B> {
    async fn lock(&self, req: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        let as_caller = As::new(self.backend.clone(), caller_of(&*self.auth, &req).await?);
        let backend = &*as_caller;
        let LockRequest { name, lease } = req.into_inner();
        let pfx = prefix(&name);
        let s = session(backend, lease).await?;
        let key = session_key(&pfx, &s);
        // Join the line with a new key, or find this lease's key already in it; and read
        // the holder, so that an uncontended lock takes one round trip.
        let resp = txn(
            backend,
            &self.limits,
            TxnRequest {
                compare: vec![created_at(&key, 0)],
                success: vec![
                    op_put(&key, Vec::new(), s.lease),
                    op_range(first_created(&pfx)),
                ],
                failure: vec![op_range(get(&key)), op_range(first_created(&pfx))],
            },
        )
        .await?;
        let header = header_of(&resp.header);
        let my_rev = if resp.succeeded {
            header.revision
        } else {
            match range_kvs(&resp, 0).first() {
                Some(kv) => kv.create_revision,
                None => return Err(etcd(Error::Internal("lock key vanished".into()))),
            }
        };
        let holder = range_kvs(&resp, 1).first().map(|kv| kv.create_revision);
        if holder.is_none_or(|rev| rev == my_rev) {
            return Ok(Response::new(LockResponse {
                header: Some(header),
                key,
            }));
        }

        // Wait in line. A failed wait, or a client that stops waiting, gives up the place
        // (etcd's Mutex.Lock deletes its key on any error).
        let mut give_up = Cleanup::new(
            as_caller.clone(),
            TxnRequest {
                success: vec![op_delete(&key)],
                ..TxnRequest::default()
            },
        );
        if let Err(e) = wait_deletes(backend, &pfx, my_rev - 1).await {
            give_up.run().await;
            return Err(e);
        }
        // Still in line? The key goes with its lease.
        let mine = match range(backend, get(&key)).await {
            Ok(r) => r,
            Err(e) => {
                give_up.run().await;
                return Err(e);
            }
        };
        give_up.disarm();
        if mine.kvs.is_empty() {
            return Err(recipe_error(SESSION_EXPIRED));
        }
        Ok(Response::new(LockResponse {
            header: mine.header,
            key,
        }))
    }

    async fn unlock(
        &self,
        req: Request<UnlockRequest>,
    ) -> Result<Response<UnlockResponse>, Status> {
        let backend = As::new(self.backend.clone(), caller_of(&*self.auth, &req).await?);
        let d = DeleteRangeRequest {
            key: req.into_inner().key,
            ..DeleteRangeRequest::default()
        };
        check_delete(&d).map_err(etcd)?;
        self.limits.check_size(d.encoded_len()).map_err(etcd)?;
        let resp = backend.delete_range(d).await.map_err(etcd)?;
        Ok(Response::new(UnlockResponse {
            header: resp.header,
        }))
    }
}
