//! The Maintenance service of a member: status, alarms and the space quota, hashes,
//! online defragmentation, snapshots and leader transfer.
//!
//! - `Status` reports this member's view: Raft's leader, term, commit and applied
//!   index, the store's size and live size, the quota, and in `errors` "no leader" and
//!   every active alarm (etcd's texts).
//! - `Alarm` goes through the log, GET included, as in etcd (see [`crate::alarm`]).
//!   A put, a txn that puts, or a lease grant that would take this member's store to
//!   `--quota-backend-bytes` or beyond is refused with `etcdserver: mvcc: database
//!   space exceeded`, and the member raises `NOSPACE` for itself; from then on every
//!   member refuses such writes until the alarm is disarmed (an over-quota write
//!   raises it again).
//! - `Hash` and `HashKV` are local reads of the store (`mvcc::Store::hash_kv`: equal on
//!   every member at the same revision).
//! - `Defragment` rewrites the store's files on a blocking thread; reads and writes go
//!   on meanwhile, and the call answers when it is done.
//! - `Snapshot` exports the store at one point in time (`mvcc::Store::export`: the KV
//!   history, leases, alarms, compaction marks), spools it to an unnamed temp file in
//!   the data directory so its size is known up front, pads it to 512-byte blocks and
//!   hands it to the gateway, which streams it with etcd's trailing SHA-256.
//! - `MoveLeader` runs only on the leader, to a voting member, and answers once the
//!   target leads (re-asking Raft every election timeout), or fails after the request
//!   timeout with etcd's "leader transfer took too long".

use std::io::{Seek, Write};
use std::path::PathBuf;
use std::sync::Arc;

use concord_consensus::Role;
use concord_gateway::{
    Caller, Error as ApiError, MaintenanceBackend, Result as ApiResult, SnapshotImage,
};
use concord_proto::etcdserverpb as pb;
use tokio::time::Instant;

use crate::apply::{Applied, Command};
use crate::core::{Core, raft_error, shares_core, unexpected};

/// etcd's estimate of the bytes a put adds beyond its key and value.
const KV_OVERHEAD: usize = 256;
/// etcd's estimate of the bytes a lease grant adds.
pub(crate) const LEASE_COST: usize = 64;
/// Snapshot images are padded to this, for etcdctl's size check.
const SNAPSHOT_BLOCK: u64 = 512;

pub(crate) fn put_cost(p: &pb::PutRequest) -> usize {
    KV_OVERHEAD + p.key.len() + p.value.len()
}

/// The bytes a txn may add: its costlier branch's puts (nested ones included).
pub(crate) fn txn_cost(t: &pb::TxnRequest) -> usize {
    use pb::request_op::Request as R;
    let branch = |ops: &[pb::RequestOp]| -> usize {
        ops.iter()
            .map(|op| match &op.request {
                Some(R::RequestPut(p)) => put_cost(p),
                Some(R::RequestTxn(t)) => txn_cost(t),
                _ => 0,
            })
            .sum()
    };
    branch(&t.success).max(branch(&t.failure))
}

/// Maintenance: status, alarms, hashes, defragmentation, snapshots, leader transfer.
pub struct MaintenanceApi {
    pub(crate) core: Arc<Core>,
    /// `--data-dir`: where snapshot images are spooled.
    pub(crate) data_dir: PathBuf,
}

shares_core!(MaintenanceApi);

/// Copies a store image into an unnamed file (gone when closed, even after a crash)
/// and pads it with zeros to whole 512-byte blocks; the image format ignores what
/// follows its end frame.
fn spool(
    export: &mut concord_mvcc::Export,
    dir: &std::path::Path,
) -> std::io::Result<(std::fs::File, u64)> {
    let mut file = tempfile::tempfile_in(dir)?;
    let n = std::io::copy(export, &mut file)?;
    let size = n.div_ceil(SNAPSHOT_BLOCK) * SNAPSHOT_BLOCK;
    file.write_all(&vec![0u8; (size - n) as usize])?;
    file.rewind()?;
    Ok((file, size))
}

impl MaintenanceApi {
    /// The admin check of etcd's Maintenance service (Defragment, Snapshot, Hash,
    /// HashKV), whose refusals reach clients unmapped: code `Unknown`, `auth: ...`.
    fn maintainer(&self, c: &Caller) -> ApiResult<()> {
        self.auth.check_admin(c).map_err(|e| e.unmapped())
    }
}

#[concord_gateway::async_trait]
impl MaintenanceBackend for MaintenanceApi {
    async fn status(&self) -> ApiResult<pb::StatusResponse> {
        let (revision, (size, in_use)) = self
            .blocking(move |s| Ok((s.current_revision(), s.size_on_disk())))
            .await?;
        let st = self.raft.status();
        let mut errors = Vec::new();
        if st.leader == 0 {
            errors.push(ApiError::NoLeader.to_string());
        }
        errors.extend(self.alarms.status_errors());
        Ok(pb::StatusResponse {
            header: self.header(revision),
            version: concord_gateway::http::ETCD_API_VERSION.into(),
            db_size: size,
            leader: st.leader,
            raft_index: st.commit,
            raft_term: st.term,
            raft_applied_index: st.applied,
            errors,
            db_size_in_use: in_use,
            is_learner: self.is_learner(),
            storage_version: String::new(),
            db_size_quota: self.quota_bytes().unwrap_or(0),
            downgrade_info: None,
        })
    }

    async fn alarm(&self, c: &Caller, req: pb::AlarmRequest) -> ApiResult<pb::AlarmResponse> {
        match self.propose_as(c, Command::Alarm(req)).await? {
            Applied::Alarm(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }

    async fn hash(&self, c: &Caller, _req: pb::HashRequest) -> ApiResult<pb::HashResponse> {
        self.maintainer(c)?;
        let (hash, revision) = self.blocking(|s| s.hash()).await?;
        Ok(pb::HashResponse {
            header: self.header(revision),
            hash,
        })
    }

    async fn hash_kv(&self, c: &Caller, req: pb::HashKvRequest) -> ApiResult<pb::HashKvResponse> {
        self.maintainer(c)?;
        let h = self.blocking(move |s| s.hash_kv(req.revision)).await?;
        Ok(pb::HashKvResponse {
            header: self.header(h.revision),
            hash: h.hash,
            hash_revision: if req.revision > 0 {
                req.revision
            } else {
                h.revision
            },
            // etcd reports -1 for a store that was never compacted.
            compact_revision: if h.compacted == 0 { -1 } else { h.compacted },
        })
    }

    async fn defragment(
        &self,
        c: &Caller,
        _req: pb::DefragmentRequest,
    ) -> ApiResult<pb::DefragmentResponse> {
        self.maintainer(c)?;
        let started = std::time::Instant::now();
        tracing::info!("defragment starting");
        self.blocking(|s| s.defragment()).await?;
        tracing::info!(
            took_ms = started.elapsed().as_millis() as u64,
            "defragment finished"
        );
        // etcd's DefragmentResponse carries no header.
        Ok(pb::DefragmentResponse { header: None })
    }

    async fn snapshot(&self, c: &Caller) -> ApiResult<SnapshotImage> {
        self.maintainer(c)?;
        let store = self.store.clone();
        let dir = self.data_dir.clone();
        let (file, size) = tokio::task::spawn_blocking(move || {
            let mut export = store.export().map_err(crate::convert::api_error)?;
            spool(&mut export, &dir).map_err(|e| {
                ApiError::Internal(format!("etcdserver: writing the snapshot image: {e}"))
            })
        })
        .await
        .map_err(|e| ApiError::Internal(format!("etcdserver: snapshot task failed: {e}")))??;
        tracing::info!(bytes = size, "streaming a snapshot");
        Ok(SnapshotImage {
            size,
            data: Box::new(file),
        })
    }

    async fn move_leader(
        &self,
        _c: &Caller,
        req: pb::MoveLeaderRequest,
    ) -> ApiResult<pb::MoveLeaderResponse> {
        let me = self.identity.member_id;
        if self.raft.status().leader != me {
            return Err(ApiError::NotLeader);
        }
        let target = req.target_id;
        let voter = self.members.get(target).is_some_and(|m| !m.is_learner);
        if !voter {
            return Err(ApiError::BadLeaderTransferee);
        }
        tracing::info!(
            member_id = format!("{me:x}"),
            transferee = format!("{target:x}"),
            "leadership transfer starting"
        );
        let started = Instant::now();
        let deadline = started + self.request_timeout;
        // Raft gives up a transfer that has not finished within an election timeout;
        // ask again while this member still leads.
        let mut state = self.raft.subscribe();
        loop {
            if state.borrow_and_update().role == Role::Leader {
                self.raft
                    .transfer_leader(target)
                    .await
                    .map_err(raft_error)?;
            }
            let ask_again = (Instant::now() + self.election_timeout).min(deadline);
            match tokio::time::timeout_at(ask_again, state.wait_for(|s| s.leader == target)).await {
                Ok(Ok(_)) => break,
                Ok(Err(_)) => return Err(ApiError::Stopped),
                Err(_) if Instant::now() >= deadline => {
                    return Err(ApiError::LeaderTransferTimeout);
                }
                Err(_) => {}
            }
        }
        tracing::info!(
            transferee = format!("{target:x}"),
            took_ms = started.elapsed().as_millis() as u64,
            "leadership transfer finished"
        );
        // etcd's MoveLeaderResponse carries no header.
        Ok(pb::MoveLeaderResponse { header: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_are_etcds_estimates() {
        let put = |k: &str, v: usize| pb::PutRequest {
            key: k.into(),
            value: vec![0; v],
            ..Default::default()
        };
        assert_eq!(put_cost(&put("ab", 10)), 256 + 12);
        let op = |p: pb::PutRequest| pb::RequestOp {
            request: Some(pb::request_op::Request::RequestPut(p)),
        };
        let del = pb::RequestOp {
            request: Some(pb::request_op::Request::RequestDeleteRange(
                Default::default(),
            )),
        };
        let t = pb::TxnRequest {
            success: vec![op(put("a", 1)), del.clone()],
            failure: vec![op(put("a", 100))],
            ..Default::default()
        };
        assert_eq!(txn_cost(&t), 256 + 101);
        let deletes = pb::TxnRequest {
            success: vec![del],
            ..Default::default()
        };
        assert_eq!(txn_cost(&deletes), 0);
    }

    #[test]
    fn spooled_images_are_whole_blocks_and_import() {
        use std::io::Read;
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            concord_mvcc::Store::open(dir.path().join("s"), concord_mvcc::StoreOptions::default())
                .unwrap(),
        );
        let mut w = store.writer().unwrap();
        w.put(
            &concord_mvcc::PutRequest {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                ..Default::default()
            },
            &concord_mvcc::NoLeases,
        )
        .unwrap();
        w.commit(None).unwrap();
        let (mut f, size) = spool(&mut store.export().unwrap(), dir.path()).unwrap();
        assert_eq!(size % SNAPSHOT_BLOCK, 0);
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).unwrap();
        assert_eq!(bytes.len() as u64, size);
        let info = concord_mvcc::inspect_image(&mut &bytes[..]).unwrap();
        assert_eq!((info.revision, info.records), (2, 1));
    }
}
