//! A Concord member: the store, the apply loop, and the identity that goes into every
//! response header. Implements the gateway's backend traits.

use std::sync::Arc;

use concord_gateway::{
    ClusterBackend, Error as ApiError, HealthBackend, KvBackend, MaintenanceBackend,
    Result as ApiResult,
};
use concord_mvcc as mvcc;
use concord_proto::etcdserverpb as pb;

use crate::apply::{self, Applied, Command, Proposer};
use crate::config::{Config, split_urls};
use crate::convert;

const META_MEMBER_ID: &str = "member_id";
const META_CLUSTER_ID: &str = "cluster_id";
const META_TERM: &str = "term";

/// Member and cluster identity, fixed when the data directory is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub cluster_id: u64,
    pub member_id: u64,
}

/// 64-bit FNV-1a: a stable hash for deriving ids (the same inputs give the same id on
/// every machine and every build).
fn fnv64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.iter().chain(b"\0") {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

impl Identity {
    /// As etcd derives them: the member id from its peer URLs and the cluster token,
    /// the cluster id from the member ids.
    pub fn derive(cfg: &Config) -> Identity {
        let mut urls = split_urls(&cfg.initial_advertise_peer_urls);
        urls.sort();
        let member_id = fnv64(&[
            urls.join(",").as_bytes(),
            cfg.initial_cluster_token.as_bytes(),
        ]);
        let cluster_id = fnv64(&[
            &member_id.to_be_bytes(),
            cfg.initial_cluster_token.as_bytes(),
        ]);
        Identity {
            cluster_id,
            member_id,
        }
    }
}

fn meta_u64(store: &mvcc::Store, name: &str) -> mvcc::Result<Option<u64>> {
    store.meta(name)?.map_or(Ok(None), |v| {
        let b: [u8; 8] = v
            .as_slice()
            .try_into()
            .map_err(|_| mvcc::Error::Corrupt(format!("server meta {name:?}")))?;
        Ok(Some(u64::from_be_bytes(b)))
    })
}

/// The member, as served to clients.
pub struct Node {
    store: Arc<mvcc::Store>,
    proposer: Proposer,
    identity: Identity,
    term: u64,
    member: pb::Member,
    quota: i64,
}

impl Node {
    /// Opens the member's store under the configured data directory, restores or
    /// creates its identity, and starts the apply loop.
    pub fn open(cfg: &Config) -> anyhow::Result<(Arc<Node>, std::thread::JoinHandle<()>)> {
        let dir = std::path::Path::new(&cfg.data_dir).join("mvcc");
        std::fs::create_dir_all(&dir)?;
        let store = Arc::new(mvcc::Store::open(&dir, mvcc::StoreOptions::default())?);
        let stored = (
            meta_u64(&store, META_MEMBER_ID)?,
            meta_u64(&store, META_CLUSTER_ID)?,
        );
        let identity = match stored {
            (Some(member_id), Some(cluster_id)) => Identity {
                cluster_id,
                member_id,
            },
            _ => Identity::derive(cfg),
        };
        // A single member elects itself once per start, so its term moves on like a
        // Raft leader's would: 2 on first start, one more on every restart.
        let term = meta_u64(&store, META_TERM)?.unwrap_or(1) + 1;
        let mut w = store.writer()?;
        w.put_meta(META_MEMBER_ID, &identity.member_id.to_be_bytes());
        w.put_meta(META_CLUSTER_ID, &identity.cluster_id.to_be_bytes());
        w.put_meta(META_TERM, &term.to_be_bytes());
        w.commit(None)?;
        tracing::info!(
            member_id = format!("{:x}", identity.member_id),
            cluster_id = format!("{:x}", identity.cluster_id),
            term,
            "member identity"
        );
        let (proposer, handle) = apply::start(store.clone(), Arc::new(mvcc::NoLeases))?;
        let member = pb::Member {
            id: identity.member_id,
            name: cfg.name.clone(),
            peer_ur_ls: split_urls(&cfg.initial_advertise_peer_urls),
            client_ur_ls: split_urls(&cfg.advertise_client_urls),
            is_learner: false,
        };
        let node = Node {
            store,
            proposer,
            identity,
            term,
            member,
            quota: cfg.quota_backend_bytes,
        };
        Ok((Arc::new(node), handle))
    }

    pub fn identity(&self) -> Identity {
        self.identity
    }

    fn header(&self, revision: i64) -> Option<pb::ResponseHeader> {
        Some(pb::ResponseHeader {
            cluster_id: self.identity.cluster_id,
            member_id: self.identity.member_id,
            revision,
            raft_term: self.term,
        })
    }

    /// Completes a response header that so far carries only the revision.
    fn fill(&self, h: Option<pb::ResponseHeader>) -> Option<pb::ResponseHeader> {
        self.header(h.map_or(0, |h| h.revision))
    }

    async fn propose(&self, cmd: Command) -> ApiResult<Applied> {
        match self.proposer.propose(cmd).await {
            Some(r) => r.map_err(convert::api_error),
            None => Err(ApiError::Stopped),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mvcc::Store) -> mvcc::Result<T> + Send + 'static,
    ) -> ApiResult<T> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| ApiError::Internal(format!("etcdserver: read task failed: {e}")))?
            .map_err(convert::api_error)
    }
}

fn unexpected(what: &Applied) -> ApiError {
    ApiError::Internal(format!("etcdserver: unexpected apply result {what:?}"))
}

#[concord_gateway::async_trait]
impl KvBackend for Node {
    async fn range(&self, req: pb::RangeRequest) -> ApiResult<pb::RangeResponse> {
        // One member: a linearizable read and a serializable read are the same read.
        let req = convert::range_req(req);
        let r = self.blocking(move |s| s.range(&req)).await?;
        let mut resp = convert::range_resp(r);
        resp.header = self.fill(resp.header);
        Ok(resp)
    }

    async fn put(&self, req: pb::PutRequest) -> ApiResult<pb::PutResponse> {
        match self.propose(Command::Put(convert::put_req(req))).await? {
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
        req: pb::DeleteRangeRequest,
    ) -> ApiResult<pb::DeleteRangeResponse> {
        match self
            .propose(Command::DeleteRange(convert::delete_req(req)))
            .await?
        {
            Applied::DeleteRange(r) => {
                let mut resp = convert::delete_resp(r);
                resp.header = self.fill(resp.header);
                Ok(resp)
            }
            other => Err(unexpected(&other)),
        }
    }

    async fn txn(&self, req: pb::TxnRequest) -> ApiResult<pb::TxnResponse> {
        let txn = convert::txn_req(req);
        let r = if txn.is_read_only() {
            self.blocking(move |s| s.read_txn(&txn)).await?
        } else {
            match self.propose(Command::Txn(txn)).await? {
                Applied::Txn(r) => r,
                other => return Err(unexpected(&other)),
            }
        };
        let mut resp = convert::txn_resp(r);
        resp.header = self.fill(resp.header);
        Ok(resp)
    }

    async fn compact(&self, req: pb::CompactionRequest) -> ApiResult<pb::CompactionResponse> {
        let (revision, wait) = match self.propose(Command::Compact(req.revision)).await? {
            Applied::Compact(rev, wait) => (rev, wait),
            other => return Err(unexpected(&other)),
        };
        if req.physical {
            self.blocking(move |_| wait.wait()).await?;
        }
        Ok(pb::CompactionResponse {
            header: self.header(revision),
        })
    }
}

#[concord_gateway::async_trait]
impl MaintenanceBackend for Node {
    async fn status(&self) -> ApiResult<pb::StatusResponse> {
        let (revision, index, (size, in_use)) = self
            .blocking(move |s| {
                Ok((
                    s.current_revision(),
                    s.consistent_index()?,
                    s.size_on_disk(),
                ))
            })
            .await?;
        Ok(pb::StatusResponse {
            header: self.header(revision),
            version: concord_gateway::http::ETCD_API_VERSION.into(),
            db_size: size,
            leader: self.identity.member_id,
            raft_index: index,
            raft_term: self.term,
            raft_applied_index: index,
            errors: Vec::new(),
            db_size_in_use: in_use,
            is_learner: false,
            storage_version: String::new(),
            db_size_quota: self.quota,
            downgrade_info: None,
        })
    }

    async fn alarm(&self, req: pb::AlarmRequest) -> ApiResult<pb::AlarmResponse> {
        use pb::alarm_request::AlarmAction;
        match AlarmAction::try_from(req.action) {
            // No alarm is ever raised yet (no quota enforcement, no corruption check),
            // so there is none to list and none to clear.
            Ok(AlarmAction::Get) | Ok(AlarmAction::Deactivate) => Ok(pb::AlarmResponse {
                header: self.header(self.store.current_revision()),
                alarms: Vec::new(),
            }),
            _ => Err(ApiError::Unimplemented(
                "concord: raising alarms by request is not supported yet".into(),
            )),
        }
    }
}

#[concord_gateway::async_trait]
impl ClusterBackend for Node {
    async fn member_list(&self, _req: pb::MemberListRequest) -> ApiResult<pb::MemberListResponse> {
        Ok(pb::MemberListResponse {
            // etcd's Cluster service headers carry no revision.
            header: self.header(0),
            members: vec![self.member.clone()],
        })
    }
}

#[concord_gateway::async_trait]
impl HealthBackend for Node {
    async fn health(&self) -> ApiResult<()> {
        // The same probe etcdctl makes: a read through the normal path.
        let req = mvcc::RangeRequest {
            range: mvcc::KeyRange::new("health", ""),
            ..Default::default()
        };
        self.blocking(move |s| s.range(&req)).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_depend_on_token_and_urls() {
        let cfg = |token: &str, url: &str| {
            let a = crate::config::Args {
                initial_cluster_token: Some(token.into()),
                initial_advertise_peer_urls: Some(url.into()),
                initial_cluster: Some(format!("default={url}")),
                ..Default::default()
            };
            Config::load(&a).unwrap()
        };
        let a = Identity::derive(&cfg("t1", "http://127.0.0.1:2380"));
        assert_eq!(a, Identity::derive(&cfg("t1", "http://127.0.0.1:2380")));
        assert_ne!(a, Identity::derive(&cfg("t2", "http://127.0.0.1:2380")));
        assert_ne!(
            a.member_id,
            Identity::derive(&cfg("t1", "http://127.0.0.1:2381")).member_id
        );
    }
}
