//! The `etcdserverpb.KV` service.

use std::sync::Arc;

use concord_proto::etcdserverpb::{kv_server::Kv, *};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::auth::{AuthBackend, caller_of};
use crate::backend::KvBackend;
use crate::validate::{Limits, check_delete, check_put, check_range, check_txn};

/// Serves KV over any [`KvBackend`].
pub struct KvService<B: ?Sized> {
    backend: Arc<B>,
    auth: Arc<dyn AuthBackend>,
    limits: Limits,
}

impl<B: ?Sized> KvService<B> {
    pub fn new(backend: Arc<B>, auth: Arc<dyn AuthBackend>, limits: Limits) -> Self {
        Self {
            backend,
            auth,
            limits,
        }
    }
}

/// Whether a txn writes on any branch at any depth (a read-only txn is not a proposal,
/// so etcd does not size-check it).
pub fn txn_writes(t: &TxnRequest) -> bool {
    use request_op::Request as R;
    t.success
        .iter()
        .chain(&t.failure)
        .any(|op| match &op.request {
            Some(R::RequestPut(_)) | Some(R::RequestDeleteRange(_)) => true,
            Some(R::RequestTxn(t)) => txn_writes(t),
            _ => false,
        })
}

#[tonic::async_trait]
impl<B: KvBackend + ?Sized> Kv for KvService<B> {
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let caller = caller_of(&*self.auth, &req).await?;
        let req = req.into_inner();
        check_range(&req)?;
        Ok(Response::new(self.backend.range(&caller, req).await?))
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let caller = caller_of(&*self.auth, &req).await?;
        let req = req.into_inner();
        check_put(&req)?;
        self.limits.check_size(req.encoded_len())?;
        Ok(Response::new(self.backend.put(&caller, req).await?))
    }

    async fn delete_range(
        &self,
        req: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let caller = caller_of(&*self.auth, &req).await?;
        let req = req.into_inner();
        check_delete(&req)?;
        self.limits.check_size(req.encoded_len())?;
        Ok(Response::new(
            self.backend.delete_range(&caller, req).await?,
        ))
    }

    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let caller = caller_of(&*self.auth, &req).await?;
        let req = req.into_inner();
        check_txn(&req, &self.limits)?;
        if txn_writes(&req) {
            self.limits.check_size(req.encoded_len())?;
        }
        Ok(Response::new(self.backend.txn(&caller, req).await?))
    }

    async fn compact(
        &self,
        req: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let caller = caller_of(&*self.auth, &req).await?;
        Ok(Response::new(
            self.backend.compact(&caller, req.into_inner()).await?,
        ))
    }
}
