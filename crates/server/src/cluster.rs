//! The Cluster service of a member ([`ClusterApi`]): the member list, and membership
//! changes as Raft changes (one member at a time); promotion decided on the leader;
//! the leader's automatic promotion of caught-up learners and, after
//! `--force-new-cluster`, the removal of the old members.

use std::sync::{Arc, Weak};
use std::time::Duration;

use concord_consensus::{self as consensus, ChangeKind, MemberChange};
use concord_gateway::{Caller, ClusterBackend, Error as ApiError, Result as ApiResult};
use concord_proto::etcdserverpb as pb;
use prost::Message as _;

use crate::apply::{Applied, Command};
use crate::core::{Core, raft_error, shares_core, unexpected};
use crate::forward::LeaderLink;
use crate::identity::member_id;

/// Cluster: the member list and its changes.
pub struct ClusterApi {
    pub(crate) core: Arc<Core>,
    /// `--initial-cluster-token`: a new member's id is derived from it.
    pub(crate) token: String,
    pub(crate) leader: Arc<LeaderLink>,
}

shares_core!(ClusterApi);

impl ClusterApi {
    async fn change_members(&self, change: MemberChange) -> ApiResult<Vec<pb::Member>> {
        match self
            .raft
            .propose_change(change)
            .await
            .map_err(raft_error)?
            .map_err(ApiError::from)?
        {
            Applied::Members(list) => Ok(list),
            other => Err(unexpected(&other)),
        }
    }

    /// Whether learner `id` has caught up with the leader (etcd: its matched index is
    /// at least 90% of the leader's). Leader only.
    fn learner_ready(&self, id: u64) -> bool {
        let (progress, _) = self.raft.progress();
        let own = progress
            .iter()
            .find(|(m, _)| *m == self.identity.member_id)
            .map_or(0, |p| p.1);
        progress
            .iter()
            .find(|(m, _)| *m == id)
            .is_some_and(|&(_, matched)| matched as f64 >= own as f64 * 0.9)
    }

    /// `MemberPromote` on the leader.
    async fn promote_here(&self, id: u64) -> ApiResult<Vec<pb::Member>> {
        let m = self.members.get(id).ok_or(ApiError::MemberNotFound)?;
        if !m.is_learner {
            return Err(ApiError::MemberNotLearner);
        }
        if !self.learner_ready(id) {
            return Err(ApiError::LearnerNotReady);
        }
        let members = self
            .change_members(MemberChange {
                kind: ChangeKind::AddVoter,
                id,
                context: Vec::new(),
            })
            .await?;
        ::metrics::counter!(crate::metrics::LEARNER_PROMOTED).increment(1);
        Ok(members)
    }
}

/// `--force-new-cluster`: once this member leads its one-voter cluster, the other
/// members are removed through the log, so the new configuration survives restarts.
pub(crate) async fn remove_the_others(node: Weak<ClusterApi>) {
    // A removal that does not go through is tried again an election timeout later.
    let Some((mut state, mut retry)) = node.upgrade().map(|n| n.state_and_retry()) else {
        return;
    };
    loop {
        retry.tick().await;
        if state
            .wait_for(|s| s.role == consensus::Role::Leader)
            .await
            .is_err()
        {
            return;
        }
        let Some(node) = node.upgrade() else { return };
        let me = node.identity.member_id;
        let others: Vec<u64> = node
            .members
            .list()
            .iter()
            .map(|m| m.id)
            .filter(|id| *id != me)
            .collect();
        if others.is_empty() {
            tracing::info!("forced new cluster: this member is the only one");
            return;
        }
        for id in others {
            let change = MemberChange {
                kind: ChangeKind::Remove,
                id,
                context: Vec::new(),
            };
            match node.change_members(change).await {
                Ok(_) => tracing::info!(
                    member = format!("{id:x}"),
                    "forced new cluster: member removed"
                ),
                Err(e) => {
                    tracing::warn!(member = format!("{id:x}"), error = %e, "forced new cluster: removal not done yet")
                }
            }
        }
    }
}

/// With `--auto-promote-learners`: the leader promotes each learner once it has caught
/// up (checked every second).
pub(crate) async fn auto_promote(node: Weak<ClusterApi>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(node) = node.upgrade() else { return };
        if node.raft.status().role != consensus::Role::Leader {
            continue;
        }
        for m in node.members.list().into_iter().filter(|m| m.is_learner) {
            if node.learner_ready(m.id) {
                match node.promote_here(m.id).await {
                    Ok(_) => tracing::info!(
                        member = format!("{:x}", m.id),
                        "learner promoted automatically"
                    ),
                    Err(e) => {
                        tracing::debug!(member = format!("{:x}", m.id), error = %e, "automatic promotion not done")
                    }
                }
            }
        }
    }
}

#[concord_gateway::async_trait]
impl ClusterBackend for ClusterApi {
    async fn member_list(
        &self,
        _c: &Caller,
        req: pb::MemberListRequest,
    ) -> ApiResult<pb::MemberListResponse> {
        if req.linearizable {
            self.linearize().await?;
        }
        Ok(pb::MemberListResponse {
            // etcd's Cluster service headers carry no revision.
            header: self.header(0),
            members: self.members.list(),
        })
    }

    async fn member_add(
        &self,
        c: &Caller,
        req: pb::MemberAddRequest,
    ) -> ApiResult<pb::MemberAddResponse> {
        self.admin(c)?;
        let list = self.members.list();
        if list
            .iter()
            .any(|m| m.peer_ur_ls.iter().any(|u| req.peer_ur_ls.contains(u)))
        {
            return Err(ApiError::PeerUrlExist);
        }
        // The new member derives the same id from its peer URLs and the token.
        let id = member_id(&req.peer_ur_ls, &self.token);
        if list.iter().any(|m| m.id == id) {
            return Err(ApiError::MemberExist);
        }
        // etcd allows one learner at a time.
        if req.is_learner && list.iter().any(|m| m.is_learner) {
            return Err(ApiError::TooManyLearners);
        }
        let member = pb::Member {
            id,
            peer_ur_ls: req.peer_ur_ls,
            is_learner: req.is_learner,
            ..Default::default()
        };
        let members = self
            .change_members(MemberChange {
                kind: if member.is_learner {
                    ChangeKind::AddLearner
                } else {
                    ChangeKind::AddVoter
                },
                id,
                context: member.encode_to_vec(),
            })
            .await?;
        Ok(pb::MemberAddResponse {
            header: self.header(0),
            member: Some(member),
            members,
        })
    }

    async fn member_remove(
        &self,
        c: &Caller,
        req: pb::MemberRemoveRequest,
    ) -> ApiResult<pb::MemberRemoveResponse> {
        self.admin(c)?;
        if self.members.get(req.id).is_none() {
            return Err(ApiError::MemberNotFound);
        }
        let members = self
            .change_members(MemberChange {
                kind: ChangeKind::Remove,
                id: req.id,
                context: Vec::new(),
            })
            .await?;
        Ok(pb::MemberRemoveResponse {
            header: self.header(0),
            members,
        })
    }

    async fn member_update(
        &self,
        c: &Caller,
        req: pb::MemberUpdateRequest,
    ) -> ApiResult<pb::MemberUpdateResponse> {
        self.admin(c)?;
        if self.members.get(req.id).is_none() {
            return Err(ApiError::MemberNotFound);
        }
        match self.propose(Command::MemberUpdate(req)).await? {
            Applied::Members(members) => Ok(pb::MemberUpdateResponse {
                header: self.header(0),
                members,
            }),
            other => Err(unexpected(&other)),
        }
    }

    async fn member_promote(
        &self,
        c: &Caller,
        req: pb::MemberPromoteRequest,
    ) -> ApiResult<pb::MemberPromoteResponse> {
        self.admin(c)?;
        let st = self.raft.status();
        let members = if st.role == consensus::Role::Leader {
            self.promote_here(req.id).await?
        } else if st.leader == 0 {
            return Err(ApiError::NoLeader);
        } else {
            // Only the leader knows whether the learner has caught up: ask it.
            let mut leader =
                pb::cluster_client::ClusterClient::new(self.leader.channel(st.leader)?);
            let mut call = tonic::Request::new(req);
            // The leader checks the caller again: it gets the caller's token.
            if let Some(t) = c.token.as_deref().and_then(|t| t.parse().ok()) {
                call.metadata_mut().insert("token", t);
            }
            leader
                .member_promote(call)
                .await
                .map_err(crate::forward::status_error)?
                .into_inner()
                .members
        };
        Ok(pb::MemberPromoteResponse {
            header: self.header(0),
            members,
        })
    }
}
