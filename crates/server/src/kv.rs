//! The KV service ([`KvApi`]) and the health probe ([`HealthApi`]) of a member.

use std::sync::Arc;

use concord_gateway::{Caller, HealthBackend, KvBackend, Result as ApiResult};
use concord_mvcc as mvcc;
use concord_proto::etcdserverpb as pb;

use crate::apply::{Applied, Command};
use crate::convert;
use crate::core::{Core, shares_core, unexpected};

/// KV: reads from the store (after ReadIndex unless serializable), writes through
/// the log after the quota check.
pub struct KvApi {
    pub(crate) core: Arc<Core>,
}

/// `/health` and the gRPC health service: a linearizable read of key `health`, as
/// etcdctl's probe, and the alarm list.
pub struct HealthApi {
    pub(crate) core: Arc<Core>,
}

shares_core!(KvApi, HealthApi);

/// etcd serves a read-only txn serializably only when every range in it asks for that.
fn txn_is_serializable(t: &pb::TxnRequest) -> bool {
    use pb::request_op::Request;
    let mut any = false;
    let all = t
        .success
        .iter()
        .chain(&t.failure)
        .all(|op| match &op.request {
            Some(Request::RequestRange(r)) => {
                any = true;
                r.serializable
            }
            Some(Request::RequestTxn(inner)) => txn_is_serializable(inner),
            _ => true,
        });
    all && any
}

#[concord_gateway::async_trait]
impl KvBackend for KvApi {
    async fn range(&self, c: &Caller, req: pb::RangeRequest) -> ApiResult<pb::RangeResponse> {
        if !req.serializable {
            self.linearize().await?;
        }
        self.may_read(c, &req.key, &req.range_end)?;
        let req = convert::range_req(req);
        let r = self.blocking(move |s| s.range(&req)).await?;
        self.still_current(c)?;
        let mut resp = convert::range_resp(r);
        resp.header = self.fill(resp.header);
        Ok(resp)
    }

    async fn put(&self, c: &Caller, req: pb::PutRequest) -> ApiResult<pb::PutResponse> {
        self.check_quota(crate::maintenance::put_cost(&req)).await?;
        match self.propose_as(c, Command::Put(req)).await? {
            Applied::Put(r) => {
                let mut resp = convert::put_resp(r);
                resp.header = self.fill(resp.header);
                Ok(resp)
            }
            other => Err(unexpected(&other)),
        }
    }

    async fn delete_range(
        &self,
        c: &Caller,
        req: pb::DeleteRangeRequest,
    ) -> ApiResult<pb::DeleteRangeResponse> {
        match self.propose_as(c, Command::DeleteRange(req)).await? {
            Applied::DeleteRange(r) => {
                let mut resp = convert::delete_resp(r);
                resp.header = self.fill(resp.header);
                Ok(resp)
            }
            other => Err(unexpected(&other)),
        }
    }

    async fn txn(&self, c: &Caller, req: pb::TxnRequest) -> ApiResult<pb::TxnResponse> {
        let serializable = txn_is_serializable(&req);
        let txn = convert::txn_req(req.clone());
        let r = if txn.is_read_only() {
            if !serializable {
                self.linearize().await?;
            }
            crate::auth::check_read_txn(&self.auth, c, &req)?;
            let r = self.blocking(move |s| s.read_txn(&txn)).await?;
            self.still_current(c)?;
            r
        } else {
            self.check_quota(crate::maintenance::txn_cost(&req)).await?;
            match self.propose_as(c, Command::Txn(req)).await? {
                Applied::Txn(r) => r,
                other => return Err(unexpected(&other)),
            }
        };
        let mut resp = convert::txn_resp(r);
        resp.header = self.fill(resp.header);
        Ok(resp)
    }

    async fn compact(
        &self,
        c: &Caller,
        req: pb::CompactionRequest,
    ) -> ApiResult<pb::CompactionResponse> {
        let physical = req.physical;
        let (revision, wait) = match self.propose_as(c, Command::Compact(req)).await? {
            Applied::Compact(rev, wait) => (rev, wait),
            other => return Err(unexpected(&other)),
        };
        if physical {
            self.blocking(move |_| wait.wait()).await?;
        }
        Ok(pb::CompactionResponse {
            header: self.header(revision),
        })
    }
}

#[concord_gateway::async_trait]
impl HealthBackend for HealthApi {
    async fn health(&self) -> ApiResult<()> {
        // The same probe etcdctl makes: a linearizable read through the normal path,
        // which fails without a leader.
        self.linearize().await?;
        let req = mvcc::RangeRequest {
            range: mvcc::KeyRange::new("health", ""),
            ..Default::default()
        };
        self.blocking(move |s| s.range(&req)).await.map(|_| ())
    }

    fn alarms(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .alarms
            .list(pb::AlarmType::None as i32)
            .iter()
            .map(|a| crate::alarm::alarm_name(a.alarm))
            .collect();
        names.sort();
        names.dedup();
        names
    }
}
