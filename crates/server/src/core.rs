//! What every service of a member shares: the store, the Raft handle, the identity
//! that goes into response headers, the member list, the alarm list and the space
//! quota, with the steps every request path takes (propose a command, wait for a
//! linearizable read point, read the store on a blocking thread, fill a header).
//! Each etcd service is its own value over an `Arc<Core>` plus only what it needs
//! ([`crate::kv`], [`crate::watch`], [`crate::lease_node`], [`crate::maintenance`],
//! [`crate::cluster`]); they deref to the core.

use std::sync::Arc;
use std::time::Duration;

use concord_consensus as consensus;
use concord_gateway::{Caller, Error as ApiError, Result as ApiResult};
use concord_mvcc as mvcc;
use concord_proto::etcdserverpb as pb;

use crate::alarm::Alarms;
use crate::apply::{Applied, Command, Output};
use crate::auth::{Access, AuthStore};
use crate::convert;
use crate::identity::Identity;
use crate::membership::Membership;

/// etcd's default `--quota-backend-bytes` (2 GiB), used when it is 0.
const DEFAULT_QUOTA: i64 = 2 * 1024 * 1024 * 1024;

/// The parts of a member every service uses.
pub struct Core {
    pub(crate) store: Arc<mvcc::Store>,
    pub(crate) raft: consensus::Handle<Output>,
    pub(crate) identity: Identity,
    pub(crate) election_timeout: Duration,
    /// etcd's request timeout: 5 s plus two election timeouts.
    pub(crate) request_timeout: Duration,
    /// The member list (replicated); names and client URLs of other members fill in as
    /// they answer `Peer/Attributes`.
    pub(crate) members: Arc<Membership>,
    /// The replicated alarm list (shared with the apply thread).
    pub(crate) alarms: Arc<Alarms>,
    /// The replicated auth store (shared with the apply thread) and this member's
    /// simple tokens.
    pub(crate) auth: Arc<AuthStore>,
    /// `--quota-backend-bytes` as configured (0: etcd's default, negative: no quota).
    pub(crate) quota: i64,
}

/// A service value that shares a [`Core`] derefs to it.
macro_rules! shares_core {
    ($($t:ty),* $(,)?) => {
        $(impl std::ops::Deref for $t {
            type Target = $crate::core::Core;
            fn deref(&self) -> &$crate::core::Core {
                &self.core
            }
        })*
    };
}
pub(crate) use shares_core;

/// etcd's client-visible error for a consensus failure.
pub fn raft_error(e: consensus::Error) -> ApiError {
    match e {
        consensus::Error::NoLeader => ApiError::NoLeader,
        consensus::Error::LeaderChanged => ApiError::LeaderChanged,
        consensus::Error::Timeout => ApiError::Timeout,
        consensus::Error::Stopped => ApiError::Stopped,
        consensus::Error::ChangeInProgress => ApiError::Internal(
            "etcdserver: a membership change is already in progress; retry".into(),
        ),
        other => ApiError::Internal(format!("etcdserver: {other}")),
    }
}

pub(crate) fn unexpected(what: &Applied) -> ApiError {
    ApiError::Internal(format!("etcdserver: unexpected apply result {what:?}"))
}

impl Core {
    /// For a background task: the consensus state to wait on, and a timer of one
    /// election timeout for its retries.
    pub(crate) fn state_and_retry(
        &self,
    ) -> (
        tokio::sync::watch::Receiver<consensus::Status>,
        tokio::time::Interval,
    ) {
        let mut retry = tokio::time::interval(self.election_timeout);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        (self.raft.subscribe(), retry)
    }

    pub(crate) fn header(&self, revision: i64) -> Option<pb::ResponseHeader> {
        Some(pb::ResponseHeader {
            cluster_id: self.identity.cluster_id,
            member_id: self.identity.member_id,
            revision,
            raft_term: self.raft.status().term,
        })
    }

    /// Completes a response header that so far carries only the revision.
    pub(crate) fn fill(&self, h: Option<pb::ResponseHeader>) -> Option<pb::ResponseHeader> {
        self.header(h.map_or(0, |h| h.revision))
    }

    pub(crate) async fn propose(&self, cmd: Command) -> ApiResult<Applied> {
        let proposal = async {
            Ok(self
                .raft
                .propose(&cmd.encode())
                .await
                .map_err(raft_error)??)
        };
        if crate::trace::sampled() {
            return crate::trace::propose(cmd.kind(), self.identity.member_id, proposal).await;
        }
        proposal.await
    }

    /// Proposes a client's command as `caller`: the apply path checks its permissions.
    pub(crate) async fn propose_as(&self, caller: &Caller, cmd: Command) -> ApiResult<Applied> {
        self.propose(cmd.by(caller)).await
    }

    /// Whether `caller` may read the key (empty `range_end`) or range, now.
    pub(crate) fn may_read(&self, caller: &Caller, key: &[u8], range_end: &[u8]) -> ApiResult<()> {
        Ok(self.auth.check(caller, key, range_end, Access::Read)?)
    }

    /// etcd's admin check (root only, while auth is enabled).
    pub(crate) fn admin(&self, caller: &Caller) -> ApiResult<()> {
        Ok(self.auth.check_admin(caller)?)
    }

    /// A read's answer stands only if the auth store did not change under it (etcd's
    /// `doSerialize`).
    pub(crate) fn still_current(&self, caller: &Caller) -> ApiResult<()> {
        if caller.revision != 0 && caller.revision != self.auth.revision() {
            return Err(ApiError::AuthOldRevision);
        }
        Ok(())
    }

    /// Waits until this member has applied everything committed before the call
    /// (ReadIndex), so a read after it is linearizable.
    pub(crate) async fn linearize(&self) -> ApiResult<()> {
        self.raft.read_index().await.map(|_| ()).map_err(raft_error)
    }

    pub(crate) async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mvcc::Store) -> mvcc::Result<T> + Send + 'static,
    ) -> ApiResult<T> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| ApiError::Internal(format!("etcdserver: read task failed: {e}")))?
            .map_err(convert::api_error)
    }

    /// The effective quota; `None` when disabled (negative, as in etcd).
    pub(crate) fn quota_bytes(&self) -> Option<i64> {
        match self.quota {
            q if q < 0 => None,
            0 => Some(DEFAULT_QUOTA),
            q => Some(q),
        }
    }

    /// etcd's quota check for a write that may add `cost` bytes: refused with
    /// `NoSpace` if this member's store would reach the quota, after raising `NOSPACE`
    /// for this member through the log.
    pub(crate) async fn check_quota(&self, cost: usize) -> ApiResult<()> {
        let Some(quota) = self.quota_bytes() else {
            return Ok(());
        };
        if cost == 0 || self.store.db_size() + (cost as i64) < quota {
            return Ok(());
        }
        let me = self.identity.member_id;
        if self.alarms.contains(me, pb::AlarmType::Nospace) {
            // Raised already; the log need not hear it again for every refused write.
            return Err(ApiError::NoSpace);
        }
        let raise = pb::AlarmRequest {
            action: pb::alarm_request::AlarmAction::Activate as i32,
            member_id: me,
            alarm: pb::AlarmType::Nospace as i32,
        };
        // As etcd, the write fails whether or not raising the alarm worked.
        if let Err(e) = self.propose(Command::Alarm(raise)).await {
            tracing::warn!(error = %e, "raising the NOSPACE alarm failed");
        }
        Err(ApiError::NoSpace)
    }

    pub(crate) fn is_learner(&self) -> bool {
        let me = self.identity.member_id;
        self.members.get(me).is_some_and(|m| m.is_learner)
    }
}
