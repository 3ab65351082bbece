//! The member's side of leases: the Lease service ([`LeaseApi`], a [`LeaseBackend`]), the
//! leader's clock task (promotion, expiry), the checkpoint task, and forwarding the
//! calls only the leader can answer (through `forward.rs`). The rules themselves are
//! in [`crate::lease`].

use std::sync::{Arc, Weak};
use std::time::Duration;

use concord_consensus::Role;
use concord_gateway::{Caller, Error as ApiError, LeaseBackend, Result as ApiResult};
use concord_proto::etcdserverpb as pb;
use concord_proto::etcdserverpb::lease_client::LeaseClient;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;

use crate::apply::{Applied, Command};
use crate::core::{Core, shares_core, unexpected};
use crate::forward::{LeaderLink, forwarded_request, status_error};
use crate::lease::Lessor;
use crate::lease::{CHECKPOINT_BATCH, FULL, Renewal};
use crate::tasks::Tasks;

/// Lease: grants, revokes and checkpoints through the log; keep-alives and TTLs on
/// the primary (the leader once it has applied its predecessors' entries), forwarded
/// to it from other members.
pub struct LeaseApi {
    pub(crate) core: Arc<Core>,
    pub(crate) lessor: Arc<Lessor>,
    /// Keep-alives that need the full TTL restored in the log before they are answered.
    pub(crate) restores: mpsc::Sender<RestoreRequest>,
    /// etcd's minimum lease TTL for this member's election timeout.
    pub(crate) min_ttl: i64,
    pub(crate) leader: Arc<LeaderLink>,
}

shares_core!(LeaseApi);

/// A keep-alive waiting for the full TTL of its lease to be restored in the log.
pub(crate) type RestoreRequest = (i64, oneshot::Sender<ApiResult<()>>);

/// How often the clock task looks for expired leases and leadership changes.
const CLOCK_TICK: Duration = Duration::from_millis(100);
/// Revokes proposed per clock tick at most (etcd revokes at most 1000 a second).
const REVOKES_PER_TICK: usize = 100;
/// A revoke that has not removed its lease by then is proposed again.
const REVOKE_RETRY: Duration = Duration::from_secs(3);
/// Pause before retrying a call on the leader while leadership settles.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Starts the clock and checkpoint tasks in the member's task set.
pub(crate) fn spawn(
    tasks: &Tasks,
    node: &Arc<LeaseApi>,
    restores: mpsc::Receiver<RestoreRequest>,
    every: Duration,
) {
    tasks.spawn("lease-clock", clock(Arc::downgrade(node)));
    tasks.spawn(
        "lease-checkpoints",
        checkpointer(Arc::downgrade(node), restores, every),
    );
}

/// Follows leadership: a leader becomes primary (runs lease clocks) once it has applied
/// everything committed before its term; any other member stops its clocks. The primary
/// proposes the revoke of every lease whose clock ran out.
async fn clock(node: Weak<LeaseApi>) {
    let mut tick = tokio::time::interval(CLOCK_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(node) = node.upgrade() else { return };
        let st = node.raft.status();
        if st.role != Role::Leader {
            node.lessor.demote();
            continue;
        }
        if node.lessor.primary_term() != Some(st.term) {
            node.lessor.demote();
            // ReadIndex returns once this leader has committed in its term and applied
            // up to there: every grant, revoke and checkpoint of earlier terms.
            if node.raft.read_index().await.is_err() {
                continue;
            }
            let now = node.raft.status();
            if now.role == Role::Leader && now.term == st.term {
                node.lessor.promote(st.term);
            }
            continue;
        }
        for id in node.lessor.take_expired(REVOKES_PER_TICK, REVOKE_RETRY) {
            ::metrics::counter!(crate::metrics::LEASE_EXPIRED).increment(1);
            let n = node.clone();
            tokio::spawn(async move {
                tracing::debug!(lease = format!("{id:x}"), "lease expired; revoking");
                match n
                    .propose(Command::LeaseRevoke(pb::LeaseRevokeRequest { id }))
                    .await
                {
                    Ok(_) | Err(ApiError::LeaseNotFound) => {}
                    Err(e) => {
                        tracing::info!(lease = format!("{id:x}"), error = %e, "revoking an expired lease failed; will retry")
                    }
                }
            });
        }
    }
}

/// Puts remaining TTLs into the log: every `every` those that ran down (see the rule in
/// [`crate::lease`]), and at once the full TTL of leases whose keep-alive waits for it.
/// One task proposes them all, one entry after another, so they land in the order they
/// were decided.
async fn checkpointer(
    node: Weak<LeaseApi>,
    mut restores: mpsc::Receiver<RestoreRequest>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut waiting = Vec::new();
        let periodic = tokio::select! {
            _ = tick.tick() => true,
            r = restores.recv() => match r {
                Some(r) => { waiting.push(r); false }
                None => return,
            },
        };
        while let Ok(r) = restores.try_recv() {
            waiting.push(r);
        }
        let Some(node) = node.upgrade() else { return };
        let mut cps = if periodic {
            node.lessor.due_checkpoints(every / 2)
        } else {
            Vec::new()
        };
        // Restores after the computed values: a lease in both ends at its full TTL.
        cps.extend(waiting.iter().map(|(id, _)| (*id, FULL)));
        let mut result = Ok(());
        for chunk in cps.chunks(CHECKPOINT_BATCH) {
            if let Err(e) = node.propose(Command::LeaseCheckpoint(chunk.to_vec())).await {
                tracing::debug!(error = %e, "lease checkpoint not committed");
                result = Err(e);
                break;
            }
        }
        for (_, w) in waiting {
            let _ = w.send(result.clone());
        }
    }
}

impl LeaseApi {
    /// Restores lease `id`'s full TTL in the log.
    async fn restore_full_ttl(&self, id: i64) -> ApiResult<()> {
        let (tx, rx) = oneshot::channel();
        self.restores
            .send((id, tx))
            .await
            .map_err(|_| ApiError::Stopped)?;
        tokio::time::timeout(self.request_timeout, rx)
            .await
            .map_err(|_| ApiError::Timeout)?
            .map_err(|_| ApiError::Stopped)?
    }

    /// Runs `local` until it answers; while this member is not primary, asks the leader
    /// with `remote` instead (or, for a call another member forwarded here, says "not
    /// leader" so that member retries). Gives up after the request timeout.
    async fn on_primary<T, L, R, Fut>(&self, forwarded: bool, local: L, remote: R) -> ApiResult<T>
    where
        L: Fn() -> Option<ApiResult<T>>,
        R: Fn(LeaseClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        let mut state = self.raft.subscribe();
        loop {
            if let Some(r) = local() {
                return r;
            }
            let st = self.raft.status();
            if forwarded && st.role != Role::Leader {
                return Err(ApiError::NotLeader);
            }
            // A leader not yet primary is applying its predecessor's entries: wait.
            if st.role != Role::Leader && st.leader != 0 && st.leader != st.id {
                match remote(LeaseClient::new(self.leader.channel(st.leader)?)).await {
                    Ok(v) => return Ok(v),
                    // Leadership moved or the leader is unreachable: try again.
                    Err(s)
                        if matches!(
                            s.code(),
                            tonic::Code::Unavailable | tonic::Code::FailedPrecondition
                        ) => {}
                    Err(s) => return Err(status_error(s)),
                }
            }
            if st.leader == 0 && tokio::time::Instant::now() + RETRY_PAUSE >= deadline {
                return Err(ApiError::NoLeader);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ApiError::Timeout);
            }
            // Leadership is settling: look again when the state changes (a new leader,
            // this leader applied its predecessor's entries) or after a pause.
            state.borrow_and_update();
            let _ = tokio::time::timeout(RETRY_PAUSE, state.changed()).await;
        }
    }
}

#[concord_gateway::async_trait]
impl LeaseBackend for LeaseApi {
    async fn lease_grant(
        &self,
        _c: &Caller,
        req: pb::LeaseGrantRequest,
    ) -> ApiResult<pb::LeaseGrantResponse> {
        if req.ttl > crate::lease::MAX_LEASE_TTL {
            return Err(ApiError::LeaseTtlTooLarge);
        }
        self.check_quota(crate::maintenance::LEASE_COST).await?;
        let mut id = req.id;
        while id == 0 {
            // Only positive ids, as etcd.
            id = (self.raft.next_id() & (i64::MAX as u64)) as i64;
        }
        let cmd = Command::LeaseGrant(pb::LeaseGrantRequest {
            id,
            ttl: req.ttl.max(self.min_ttl),
        });
        match self.propose(cmd).await? {
            Applied::LeaseGrant { id, ttl, revision } => Ok(pb::LeaseGrantResponse {
                header: self.header(revision),
                id,
                ttl,
                error: String::new(),
            }),
            other => Err(unexpected(&other)),
        }
    }

    async fn lease_revoke(
        &self,
        c: &Caller,
        req: pb::LeaseRevokeRequest,
    ) -> ApiResult<pb::LeaseRevokeResponse> {
        match self.propose_as(c, Command::LeaseRevoke(req)).await? {
            Applied::LeaseRevoke(revision) => Ok(pb::LeaseRevokeResponse {
                header: self.header(revision),
            }),
            other => Err(unexpected(&other)),
        }
    }

    async fn lease_keep_alive(
        &self,
        req: pb::LeaseKeepAliveRequest,
        forwarded: bool,
    ) -> ApiResult<pb::LeaseKeepAliveResponse> {
        let id = req.id;
        let renewal = self
            .on_primary(
                forwarded,
                || match self.lessor.renew(id) {
                    Renewal::NotPrimary => None,
                    r => Some(Ok(r)),
                },
                |mut leader| async move {
                    let out = leader
                        .lease_keep_alive(forwarded_request(tokio_stream::once(
                            pb::LeaseKeepAliveRequest { id },
                        )))
                        .await?
                        .into_inner()
                        .message()
                        .await?;
                    let ttl = out.map_or(0, |r| r.ttl);
                    Ok(if ttl > 0 {
                        // The leader has done what a renewal needs.
                        Renewal::Renewed {
                            ttl,
                            restore: false,
                        }
                    } else {
                        Renewal::NotFound
                    })
                },
            )
            .await?;
        let ttl = match renewal {
            Renewal::Renewed { ttl, restore } => {
                if self.lessor.primary_term().is_some() {
                    if restore {
                        self.restore_full_ttl(id).await?;
                    } else {
                        // Still the leader? Otherwise the renewal may not count.
                        self.linearize().await?;
                    }
                }
                ttl
            }
            Renewal::NotFound | Renewal::NotPrimary => 0,
        };
        Ok(pb::LeaseKeepAliveResponse {
            header: self.header(self.store.current_revision()),
            id,
            ttl,
        })
    }

    async fn lease_time_to_live(
        &self,
        c: &Caller,
        req: pb::LeaseTimeToLiveRequest,
        forwarded: bool,
    ) -> ApiResult<pb::LeaseTimeToLiveResponse> {
        let id = req.id;
        // The keys are read here: first catch up with everything committed.
        self.linearize().await?;
        let (ttl, granted_ttl) = self
            .on_primary(
                forwarded,
                || match self.lessor.time_to_live(id) {
                    Ok(v) => Some(Ok(v)),
                    Err(false) => Some(Ok((-1, 0))),
                    Err(true) => None,
                },
                |mut leader| async move {
                    let r = leader
                        .lease_time_to_live(forwarded_request(pb::LeaseTimeToLiveRequest {
                            id,
                            keys: false,
                        }))
                        .await?
                        .into_inner();
                    Ok((r.ttl, r.granted_ttl))
                },
            )
            .await?;
        let keys = if req.keys && ttl != -1 {
            // Names of keys the caller may not read are not told (beyond etcd, whose
            // answer lists them to anyone).
            let keys = self.store.lease_keys(id);
            for k in &keys {
                self.may_read(c, k, &[])?;
            }
            keys
        } else {
            Vec::new()
        };
        Ok(pb::LeaseTimeToLiveResponse {
            header: self.header(self.store.current_revision()),
            id,
            ttl,
            granted_ttl,
            keys,
        })
    }

    async fn lease_leases(
        &self,
        _c: &Caller,
        _req: pb::LeaseLeasesRequest,
    ) -> ApiResult<pb::LeaseLeasesResponse> {
        self.linearize().await?;
        Ok(pb::LeaseLeasesResponse {
            header: self.header(self.store.current_revision()),
            leases: self
                .lessor
                .ids()
                .into_iter()
                .map(|id| pb::LeaseStatus { id })
                .collect(),
        })
    }
}
