//! The replicated state machine: committed log entries become store writes.
//!
//! A [`Command`] is encoded as one tag byte plus the etcd request message it carries
//! (prost encoding), so the log holds exactly what the client asked for and every
//! member turns it into the same store change. [`KvMachine`] applies a batch of
//! committed commands in one [`concord_mvcc::Writer`] and records the index of the last
//! one in the same RocksDB write, so replay after a crash neither loses nor repeats a
//! command. The store does not fsync: the Raft WAL already made the entries durable,
//! and anything RocksDB loses on power failure is replayed from it.

use std::io::Read;
use std::sync::Arc;

use concord_consensus::{Committed, Configuration, MemberChange, StateMachine};
use concord_gateway::Error as ApiError;
use concord_mvcc as mvcc;
use concord_proto::etcdserverpb as pb;
use prost::Message as _;

use crate::alarm::Alarms;
use crate::auth::{AuthChange, AuthError, AuthStore, Requester};
use crate::convert;
use crate::lease::{self, Lessor};
use crate::membership::Membership;

const TAG_PUT: u8 = 1;
const TAG_DELETE_RANGE: u8 = 2;
const TAG_TXN: u8 = 3;
const TAG_COMPACT: u8 = 4;
const TAG_LEASE_GRANT: u8 = 5;
const TAG_LEASE_REVOKE: u8 = 6;
const TAG_LEASE_CHECKPOINT: u8 = 7;
const TAG_MEMBER_UPDATE: u8 = 8;
/// Maintenance commands are numbered from 16 on.
const TAG_ALARM: u8 = 16;
/// Auth store changes are numbered from 32 on.
const TAG_AUTH_ENABLE: u8 = 32;
const TAG_AUTH_DISABLE: u8 = 33;
const TAG_AUTHENTICATE: u8 = 34;
const TAG_USER_ADD: u8 = 35;
const TAG_USER_DELETE: u8 = 36;
const TAG_USER_CHANGE_PASSWORD: u8 = 37;
const TAG_USER_GRANT_ROLE: u8 = 38;
const TAG_USER_REVOKE_ROLE: u8 = 39;
const TAG_ROLE_ADD: u8 = 40;
const TAG_ROLE_DELETE: u8 = 41;
const TAG_ROLE_GRANT_PERMISSION: u8 = 42;
const TAG_ROLE_REVOKE_PERMISSION: u8 = 43;
/// A client's command with the user and auth revision it was proposed with.
const TAG_AS: u8 = 48;

/// The body of a [`TAG_AS`] command.
#[derive(Clone, PartialEq, prost::Message)]
struct AsUser {
    #[prost(string, tag = "1")]
    user: String,
    #[prost(uint64, tag = "2")]
    revision: u64,
    /// The command, encoded (never another `As`).
    #[prost(bytes = "vec", tag = "3")]
    command: Vec<u8>,
}

/// The body of a [`TAG_AUTHENTICATE`] command (no password: it was checked by the
/// proposer).
#[derive(Clone, PartialEq, prost::Message)]
struct Authenticate {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    token_prefix: String,
    #[prost(uint64, tag = "3")]
    revision: u64,
}

/// A write as it travels through the log.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Put(pb::PutRequest),
    DeleteRange(pb::DeleteRangeRequest),
    Txn(pb::TxnRequest),
    Compact(pb::CompactionRequest),
    /// `ID` is already chosen and `TTL` already raised to the minimum by the proposer.
    LeaseGrant(pb::LeaseGrantRequest),
    LeaseRevoke(pb::LeaseRevokeRequest),
    /// `(lease id, remaining ms or [`lease::FULL`])`, decided by the primary.
    LeaseCheckpoint(Vec<(i64, i64)>),
    /// New peer URLs for a member (adds and removals are Raft membership changes).
    MemberUpdate(pb::MemberUpdateRequest),
    /// Alarm GET, ACTIVATE or DEACTIVATE (through the log, as etcd, so every member
    /// lists the same alarms).
    Alarm(pb::AlarmRequest),
    /// A change of the auth store.
    Auth(AuthChange),
    /// A client's command with who proposed it, checked against the auth store when
    /// applied. A client command without it is anonymous, except the kinds a member
    /// also proposes itself ([`Command::member_may_propose`]).
    As(Box<(Requester, Command)>),
}

impl Command {
    pub fn encode(&self) -> Vec<u8> {
        let (tag, body) = match self {
            Command::Put(r) => (TAG_PUT, r.encode_to_vec()),
            Command::DeleteRange(r) => (TAG_DELETE_RANGE, r.encode_to_vec()),
            Command::Txn(r) => (TAG_TXN, r.encode_to_vec()),
            Command::Compact(r) => (TAG_COMPACT, r.encode_to_vec()),
            Command::LeaseGrant(r) => (TAG_LEASE_GRANT, r.encode_to_vec()),
            Command::LeaseRevoke(r) => (TAG_LEASE_REVOKE, r.encode_to_vec()),
            Command::LeaseCheckpoint(c) => (TAG_LEASE_CHECKPOINT, lease::encode_checkpoints(c)),
            Command::MemberUpdate(r) => (TAG_MEMBER_UPDATE, r.encode_to_vec()),
            Command::Alarm(r) => (TAG_ALARM, r.encode_to_vec()),
            Command::Auth(a) => match a {
                AuthChange::Enable => (TAG_AUTH_ENABLE, Vec::new()),
                AuthChange::Disable => (TAG_AUTH_DISABLE, Vec::new()),
                AuthChange::Authenticate {
                    name,
                    token_prefix,
                    revision,
                } => (
                    TAG_AUTHENTICATE,
                    Authenticate {
                        name: name.clone(),
                        token_prefix: token_prefix.clone(),
                        revision: *revision,
                    }
                    .encode_to_vec(),
                ),
                AuthChange::UserAdd(r) => (TAG_USER_ADD, r.encode_to_vec()),
                AuthChange::UserDelete(r) => (TAG_USER_DELETE, r.encode_to_vec()),
                AuthChange::UserChangePassword(r) => (TAG_USER_CHANGE_PASSWORD, r.encode_to_vec()),
                AuthChange::UserGrantRole(r) => (TAG_USER_GRANT_ROLE, r.encode_to_vec()),
                AuthChange::UserRevokeRole(r) => (TAG_USER_REVOKE_ROLE, r.encode_to_vec()),
                AuthChange::RoleAdd(r) => (TAG_ROLE_ADD, r.encode_to_vec()),
                AuthChange::RoleDelete(r) => (TAG_ROLE_DELETE, r.encode_to_vec()),
                AuthChange::RoleGrantPermission(r) => {
                    (TAG_ROLE_GRANT_PERMISSION, r.encode_to_vec())
                }
                AuthChange::RoleRevokePermission(r) => {
                    (TAG_ROLE_REVOKE_PERMISSION, r.encode_to_vec())
                }
            },
            Command::As(a) => {
                let (by, cmd) = &**a;
                let body = AsUser {
                    user: by.user.clone(),
                    revision: by.revision,
                    command: cmd.encode(),
                };
                (TAG_AS, body.encode_to_vec())
            }
        };
        let mut out = Vec::with_capacity(1 + body.len());
        out.push(tag);
        out.extend_from_slice(&body);
        out
    }

    pub fn decode(data: &[u8]) -> Result<Command, String> {
        let (&tag, body) = data.split_first().ok_or("empty command")?;
        let bad = |e: prost::DecodeError| format!("undecodable command: {e}");
        Ok(match tag {
            TAG_PUT => Command::Put(pb::PutRequest::decode(body).map_err(bad)?),
            TAG_DELETE_RANGE => {
                Command::DeleteRange(pb::DeleteRangeRequest::decode(body).map_err(bad)?)
            }
            TAG_TXN => Command::Txn(pb::TxnRequest::decode(body).map_err(bad)?),
            TAG_COMPACT => Command::Compact(pb::CompactionRequest::decode(body).map_err(bad)?),
            TAG_LEASE_GRANT => {
                Command::LeaseGrant(pb::LeaseGrantRequest::decode(body).map_err(bad)?)
            }
            TAG_LEASE_REVOKE => {
                Command::LeaseRevoke(pb::LeaseRevokeRequest::decode(body).map_err(bad)?)
            }
            TAG_LEASE_CHECKPOINT => Command::LeaseCheckpoint(lease::decode_checkpoints(body)?),
            TAG_MEMBER_UPDATE => {
                Command::MemberUpdate(pb::MemberUpdateRequest::decode(body).map_err(bad)?)
            }
            TAG_ALARM => Command::Alarm(pb::AlarmRequest::decode(body).map_err(bad)?),
            TAG_AUTH_ENABLE => Command::Auth(AuthChange::Enable),
            TAG_AUTH_DISABLE => Command::Auth(AuthChange::Disable),
            TAG_AUTHENTICATE => {
                let a = Authenticate::decode(body).map_err(bad)?;
                Command::Auth(AuthChange::Authenticate {
                    name: a.name,
                    token_prefix: a.token_prefix,
                    revision: a.revision,
                })
            }
            TAG_USER_ADD => Command::Auth(AuthChange::UserAdd(
                pb::AuthUserAddRequest::decode(body).map_err(bad)?,
            )),
            TAG_USER_DELETE => Command::Auth(AuthChange::UserDelete(
                pb::AuthUserDeleteRequest::decode(body).map_err(bad)?,
            )),
            TAG_USER_CHANGE_PASSWORD => Command::Auth(AuthChange::UserChangePassword(
                pb::AuthUserChangePasswordRequest::decode(body).map_err(bad)?,
            )),
            TAG_USER_GRANT_ROLE => Command::Auth(AuthChange::UserGrantRole(
                pb::AuthUserGrantRoleRequest::decode(body).map_err(bad)?,
            )),
            TAG_USER_REVOKE_ROLE => Command::Auth(AuthChange::UserRevokeRole(
                pb::AuthUserRevokeRoleRequest::decode(body).map_err(bad)?,
            )),
            TAG_ROLE_ADD => Command::Auth(AuthChange::RoleAdd(
                pb::AuthRoleAddRequest::decode(body).map_err(bad)?,
            )),
            TAG_ROLE_DELETE => Command::Auth(AuthChange::RoleDelete(
                pb::AuthRoleDeleteRequest::decode(body).map_err(bad)?,
            )),
            TAG_ROLE_GRANT_PERMISSION => Command::Auth(AuthChange::RoleGrantPermission(
                pb::AuthRoleGrantPermissionRequest::decode(body).map_err(bad)?,
            )),
            TAG_ROLE_REVOKE_PERMISSION => Command::Auth(AuthChange::RoleRevokePermission(
                pb::AuthRoleRevokePermissionRequest::decode(body).map_err(bad)?,
            )),
            TAG_AS => {
                let a = AsUser::decode(body).map_err(bad)?;
                // Refused before the inner command is decoded: callers nested as deep
                // as the entry is long would recurse that deep.
                if a.command.first() == Some(&TAG_AS) {
                    return Err("nested caller in a command".into());
                }
                let cmd = Command::decode(&a.command)?;
                let by = Requester {
                    user: a.user,
                    revision: a.revision,
                };
                Command::As(Box::new((by, cmd)))
            }
            other => return Err(format!("unknown command tag {other}")),
        })
    }
}

impl Command {
    /// Kinds of command a member also proposes on its own behalf (lease expiry, the
    /// quota's alarm, lease checkpoints): one of these without [`Command::As`] is the
    /// member's and is not checked, so a client's always carries its caller.
    pub fn member_may_propose(&self) -> bool {
        matches!(
            self,
            Command::LeaseRevoke(_)
                | Command::LeaseCheckpoint(_)
                | Command::Alarm(_)
                | Command::MemberUpdate(_)
                | Command::LeaseGrant(_)
        )
    }

    /// The command's kind, for spans and logs (never its keys or values).
    pub fn kind(&self) -> &'static str {
        match self {
            Command::Put(_) => "put",
            Command::DeleteRange(_) => "delete_range",
            Command::Txn(_) => "txn",
            Command::Compact(_) => "compact",
            Command::LeaseGrant(_) => "lease_grant",
            Command::LeaseRevoke(_) => "lease_revoke",
            Command::LeaseCheckpoint(_) => "lease_checkpoint",
            Command::MemberUpdate(_) => "member_update",
            Command::Alarm(_) => "alarm",
            Command::Auth(_) => "auth",
            Command::As(inner) => inner.1.kind(),
        }
    }

    /// This command as `by` proposes it: with its caller attached unless that makes
    /// no difference (an anonymous caller's command that a member never proposes).
    pub fn by(self, by: &concord_gateway::Caller) -> Command {
        let anonymous = by.user.is_none() && by.revision == 0;
        if anonymous && !self.member_may_propose() {
            return self;
        }
        Command::As(Box::new((Requester::of(by), self)))
    }
}

/// A command's result.
#[derive(Debug)]
pub enum Applied {
    Put(mvcc::PutResponse),
    DeleteRange(mvcc::DeleteRangeResponse),
    Txn(mvcc::TxnResponse),
    /// The revision after the compaction was scheduled, and a handle to wait for it.
    Compact(i64, mvcc::CompactWait),
    /// The lease granted and its TTL, and the revision.
    LeaseGrant {
        id: i64,
        ttl: i64,
        revision: i64,
    },
    /// The revision after the lease's keys were deleted.
    LeaseRevoke(i64),
    LeaseCheckpoint,
    /// The member list after a membership change or update.
    Members(Vec<pb::Member>),
    Alarm(pb::AlarmResponse),
    /// An auth store change: the revision (of the KV store) for the header, and the
    /// simple token of an `Authenticate`.
    Auth {
        revision: i64,
        token: Option<String>,
    },
}

/// What a proposer gets back: the command's result, or the deterministic refusal it
/// met.
pub type Output = Result<Applied, ApplyError>;

/// Why an applied command was refused. Decided by the log alone (the command and the
/// state before it), so every member refuses the same commands the same way; a failure
/// of the member itself (its store) is not a refusal but fatal
/// ([`crate::error::Error`]). Clients see it as the gateway's error, mapped here once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("required revision has been compacted")]
    Compacted,
    #[error("required revision is a future revision")]
    FutureRev,
    #[error("key not found")]
    KeyNotFound,
    #[error("requested lease not found")]
    LeaseNotFound,
    #[error("lease already exists")]
    LeaseExist,
    #[error("too large lease TTL")]
    LeaseTtlTooLarge,
    #[error("member not found")]
    MemberNotFound,
    /// `NOSPACE` is raised: puts, txns that put and grants are refused.
    #[error("database space exceeded")]
    NoSpace,
    /// `CORRUPT` is raised: every write is refused.
    #[error("corrupt cluster")]
    Corrupt,
    /// The entry does not decode as a command (the same bytes on every member).
    #[error("undecodable command: {0}")]
    Undecodable(String),
    /// The auth store refused the command or its caller.
    #[error("{0}")]
    Auth(AuthError),
}

impl ApplyError {
    /// The refusal for a store error, or the store error itself when it is a failure
    /// of this member rather than a property of the command.
    fn from_store(e: mvcc::Error) -> crate::error::Result<ApplyError> {
        Ok(match e {
            mvcc::Error::Compacted => ApplyError::Compacted,
            mvcc::Error::FutureRevision => ApplyError::FutureRev,
            mvcc::Error::KeyNotFound => ApplyError::KeyNotFound,
            mvcc::Error::LeaseNotFound => ApplyError::LeaseNotFound,
            e @ (mvcc::Error::Storage(_) | mvcc::Error::Corrupt(_) | mvcc::Error::Poisoned(_)) => {
                return Err(e.into());
            }
        })
    }
}

impl From<ApplyError> for ApiError {
    fn from(e: ApplyError) -> ApiError {
        match e {
            ApplyError::Compacted => ApiError::Compacted,
            ApplyError::FutureRev => ApiError::FutureRev,
            ApplyError::KeyNotFound => ApiError::KeyNotFound,
            ApplyError::LeaseNotFound => ApiError::LeaseNotFound,
            ApplyError::LeaseExist => ApiError::LeaseExist,
            ApplyError::LeaseTtlTooLarge => ApiError::LeaseTtlTooLarge,
            ApplyError::MemberNotFound => ApiError::MemberNotFound,
            ApplyError::NoSpace => ApiError::NoSpace,
            ApplyError::Corrupt => ApiError::Corrupt,
            e @ ApplyError::Undecodable(_) => ApiError::Internal(format!("etcdserver: {e}")),
            ApplyError::Auth(e) => e.into(),
        }
    }
}

/// The KV store, its leases and the alarm list as Raft's state machine.
pub struct KvMachine {
    store: Arc<mvcc::Store>,
    leases: Arc<Lessor>,
    members: Arc<Membership>,
    alarms: Arc<Alarms>,
    auth: Arc<AuthStore>,
    /// Gets every applied revision's changes once they are readable.
    hub: Arc<concord_watch::Hub>,
}

impl KvMachine {
    pub fn new(
        store: Arc<mvcc::Store>,
        leases: Arc<Lessor>,
        members: Arc<Membership>,
        alarms: Arc<Alarms>,
        auth: Arc<AuthStore>,
        hub: Arc<concord_watch::Hub>,
    ) -> KvMachine {
        KvMachine {
            store,
            leases,
            members,
            alarms,
            auth,
            hub,
        }
    }
}

/// The replicated tables a command is applied to.
struct Tables<'a> {
    store: &'a mvcc::Store,
    leases: &'a Lessor,
    members: &'a Membership,
    alarms: &'a Alarms,
    auth: &'a AuthStore,
}

fn apply_one(
    w: &mut mvcc::Writer<'_>,
    t: &Tables<'_>,
    index: u64,
    data: &[u8],
) -> crate::error::Result<Output> {
    let cmd = match Command::decode(data) {
        Ok(c) => c,
        // Every member decodes the same bytes the same way, so failing just this
        // command keeps them in step.
        Err(e) => return Ok(Err(ApplyError::Undecodable(format!("entry {index}: {e}")))),
    };
    // A client's command: who proposed it, anonymous if no one is named.
    let (by, cmd) = match cmd {
        Command::As(a) => {
            let (by, cmd) = *a;
            (Some(by), cmd)
        }
        c if c.member_may_propose() => (None, c),
        c => (
            Some(Requester {
                user: String::new(),
                revision: 0,
            }),
            c,
        ),
    };
    // The alarm list is replicated state, so every member refuses the same commands.
    if let Some(e) = t.alarms.refuse(&cmd) {
        return Ok(Err(e));
    }
    // So is the auth store: every member checks the caller the same way.
    if let Some(by) = &by {
        let lease_keys = |id: i64| t.store.lease_keys(id);
        if let Err(e) = t.auth.check_command(by, &cmd, &lease_keys) {
            return Ok(Err(ApplyError::Auth(e)));
        }
    }
    if let Command::Auth(change) = &cmd {
        let by = by.unwrap_or(Requester {
            user: String::new(),
            revision: 0,
        });
        return Ok(match t.auth.apply(w, &by, change, index) {
            Ok(token) => Ok(Applied::Auth {
                revision: w.revision(),
                token,
            }),
            Err(e) => Err(ApplyError::Auth(e)),
        });
    }
    match apply_command(w, t.leases, t.members, t.alarms, cmd) {
        Ok(applied) => Ok(Ok(applied)),
        Err(Refused::Apply(e)) => Ok(Err(e)),
        // A store failure of this member stops it rather than refuse the command here
        // alone (other members would apply it).
        Err(Refused::Store(e)) => ApplyError::from_store(e).map(Err),
    }
}

/// A command's failure while it is applied: a refusal, or a store error still to be
/// told apart ([`ApplyError::from_store`]).
#[derive(Debug)]
pub(crate) enum Refused {
    Apply(ApplyError),
    Store(mvcc::Error),
}

impl From<ApplyError> for Refused {
    fn from(e: ApplyError) -> Refused {
        Refused::Apply(e)
    }
}

impl From<mvcc::Error> for Refused {
    fn from(e: mvcc::Error) -> Refused {
        Refused::Store(e)
    }
}

fn apply_command(
    w: &mut mvcc::Writer<'_>,
    leases: &Lessor,
    members: &Membership,
    alarms: &Alarms,
    cmd: Command,
) -> Result<Applied, Refused> {
    Ok(match cmd {
        Command::Put(p) => Applied::Put(w.put(&convert::put_req(p), leases)?),
        Command::DeleteRange(d) => Applied::DeleteRange(w.delete_range(&convert::delete_req(d))?),
        Command::Txn(t) => Applied::Txn(w.txn(&convert::txn_req(t), leases)?),
        Command::Compact(c) => {
            let wait = w.compact(c.revision)?;
            Applied::Compact(w.revision(), wait)
        }
        Command::LeaseGrant(g) => {
            let ttl = leases.apply_grant(w, g.id, g.ttl)?;
            ::metrics::counter!(crate::metrics::LEASE_GRANTED).increment(1);
            ::metrics::histogram!(crate::metrics::LEASE_TTL).record(ttl as f64);
            Applied::LeaseGrant {
                id: g.id,
                ttl,
                revision: w.revision(),
            }
        }
        Command::LeaseRevoke(r) => {
            let revoked = leases.apply_revoke(w, r.id)?;
            ::metrics::counter!(crate::metrics::LEASE_REVOKED).increment(1);
            Applied::LeaseRevoke(revoked)
        }
        Command::LeaseCheckpoint(cps) => {
            leases.apply_checkpoint(w, &cps);
            Applied::LeaseCheckpoint
        }
        Command::MemberUpdate(u) => {
            Applied::Members(members.apply_update(w, u.id, &u.peer_ur_ls)?)
        }
        Command::Alarm(a) => Applied::Alarm(alarms.apply(w, &a)),
        Command::Auth(_) | Command::As(_) => {
            return Err(Refused::Apply(ApplyError::Undecodable(
                "an auth change or a nested caller where a KV command belongs".into(),
            )));
        }
    })
}

impl StateMachine for KvMachine {
    type Output = Output;
    type Error = crate::error::Error;

    fn applied_index(&self) -> u64 {
        self.store.consistent_index().unwrap_or(0)
    }

    fn apply(&mut self, cmds: &[Committed<'_>]) -> crate::error::Result<Vec<Output>> {
        fail::fail_point!(crate::failpoints::APPLY_BEFORE_BATCH);
        let started = std::time::Instant::now();
        let mut writer = self.store.writer()?;
        let tables = Tables {
            store: &self.store,
            leases: &self.leases,
            members: &self.members,
            alarms: &self.alarms,
            auth: &self.auth,
        };
        let outputs = cmds
            .iter()
            .map(|c| apply_one(&mut writer, &tables, c.index, c.data))
            .collect::<crate::error::Result<Vec<Output>>>()?;
        let last = cmds.last().map(|c| c.index);
        fail::fail_point!(crate::failpoints::APPLY_BEFORE_COMMIT);
        let (_, changes) = writer.commit_changes(last)?;
        fail::fail_point!(crate::failpoints::APPLY_AFTER_COMMIT);
        crate::watch::publish_changes(&self.hub, changes);
        if let Some(last) = last {
            ::metrics::gauge!(crate::metrics::APPLIED).set(last as f64);
        }
        if started.elapsed() > crate::metrics::SLOW_APPLY_AFTER {
            ::metrics::counter!(crate::metrics::SLOW_APPLY).increment(1);
        }
        Ok(outputs)
    }

    fn apply_change(
        &mut self,
        index: u64,
        change: &MemberChange,
        _config: &Configuration,
    ) -> crate::error::Result<Output> {
        let mut w = self.store.writer()?;
        let list = self.members.apply_change(&mut w, change);
        w.commit(Some(index))?;
        ::metrics::gauge!(crate::metrics::APPLIED).set(index as f64);
        Ok(Ok(Applied::Members(list)))
    }

    fn snapshot(&mut self) -> crate::error::Result<Box<dyn Read + Send>> {
        Ok(Box::new(self.store.export()?))
    }

    fn restore(
        &mut self,
        image: &mut dyn Read,
        index: u64,
        _term: u64,
    ) -> crate::error::Result<()> {
        use crate::error::Error;
        fail::fail_point!(crate::failpoints::SNAPSHOT_BEFORE_INSTALL);
        ::metrics::gauge!(crate::metrics::SNAPSHOT_APPLY).set(1.0);
        let imported = self.store.import(image, index);
        ::metrics::gauge!(crate::metrics::SNAPSHOT_APPLY).set(0.0);
        imported?;
        ::metrics::gauge!(crate::metrics::APPLIED).set(index as f64);
        self.leases
            .reload(&self.store)
            .map_err(Error::table("leases"))?;
        self.members
            .reload(&self.store)
            .map_err(Error::table("members"))?;
        self.alarms
            .reload(&self.store)
            .map_err(Error::table("alarms"))?;
        self.auth
            .reload(&self.store)
            .map_err(Error::table("auth"))?;
        // The revisions the snapshot skipped were never published: watchers catch up
        // from the store (or learn that their history was compacted).
        self.hub.resync(self.store.current_revision());
        fail::fail_point!(crate::failpoints::SNAPSHOT_AFTER_INSTALL);
        Ok(())
    }
}

/// A state machine on a fresh store in `dir`, for tests.
#[cfg(test)]
fn test_machine(dir: &std::path::Path) -> (KvMachine, Arc<mvcc::Store>) {
    let store =
        Arc::new(mvcc::Store::open(dir, mvcc::StoreOptions { sync_writes: false }).unwrap());
    let hub = Arc::new(concord_watch::Hub::new(
        Arc::new(crate::watch::StoreHistory(store.clone())),
        store.current_revision(),
        concord_watch::HubOptions::default(),
    ));
    let leases = Arc::new(Lessor::open(&store).unwrap());
    let alarms = Arc::new(Alarms::open(&store).unwrap());
    let members = Arc::new(Membership::open(&store, 1, Vec::new(), None).unwrap());
    let auth = Arc::new(AuthStore::open(&store, crate::auth::AuthOptions::default()).unwrap());
    (
        KvMachine::new(store.clone(), leases, members, alarms, auth, hub),
        store,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip_and_garbage_is_refused() {
        let cmds = [
            Command::Put(pb::PutRequest {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                lease: 7,
                prev_kv: true,
                ..Default::default()
            }),
            Command::DeleteRange(pb::DeleteRangeRequest {
                key: b"a".to_vec(),
                range_end: b"b".to_vec(),
                prev_kv: false,
            }),
            Command::Txn(pb::TxnRequest::default()),
            Command::Compact(pb::CompactionRequest {
                revision: 9,
                physical: true,
            }),
            Command::LeaseGrant(pb::LeaseGrantRequest { ttl: 5, id: 77 }),
            Command::LeaseRevoke(pb::LeaseRevokeRequest { id: 77 }),
            Command::LeaseCheckpoint(vec![(77, 1500), (78, lease::FULL)]),
            Command::MemberUpdate(pb::MemberUpdateRequest {
                id: 5,
                peer_ur_ls: vec!["http://h:1".into()],
            }),
            Command::Alarm(pb::AlarmRequest {
                action: 1,
                member_id: 5,
                alarm: 1,
            }),
            Command::Auth(AuthChange::Enable),
            Command::Auth(AuthChange::Disable),
            Command::Auth(AuthChange::Authenticate {
                name: "u".into(),
                token_prefix: "p".into(),
                revision: 4,
            }),
            Command::Auth(AuthChange::UserAdd(pb::AuthUserAddRequest {
                name: "u".into(),
                hashed_password: "$2a$".into(),
                ..Default::default()
            })),
            Command::Auth(AuthChange::RoleRevokePermission(
                pb::AuthRoleRevokePermissionRequest {
                    role: "r".into(),
                    key: b"k".to_vec(),
                    range_end: b"l".to_vec(),
                },
            )),
            Command::As(Box::new((
                Requester {
                    user: "u".into(),
                    revision: 3,
                },
                Command::Put(pb::PutRequest::default()),
            ))),
        ];
        for c in cmds {
            assert_eq!(Command::decode(&c.encode()).unwrap(), c);
        }
        assert!(Command::decode(&[]).is_err());
        assert!(Command::decode(&[9, 1, 2]).is_err());
        assert!(Command::decode(&[TAG_PUT, 0xff, 0xff]).is_err());
    }

    #[test]
    fn applies_in_order_and_records_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, _) = test_machine(dir.path());
        let put = |k: &str| {
            Command::Put(pb::PutRequest {
                key: k.into(),
                value: b"v".to_vec(),
                ..Default::default()
            })
            .encode()
        };
        let (a, b) = (put("a"), put("b"));
        let bad = vec![77u8];
        let out = m
            .apply(&[
                Committed {
                    index: 5,
                    term: 2,
                    data: &a,
                },
                Committed {
                    index: 6,
                    term: 2,
                    data: &bad,
                },
                Committed {
                    index: 7,
                    term: 2,
                    data: &b,
                },
            ])
            .unwrap();
        assert!(matches!(&out[0], Ok(Applied::Put(r)) if r.header_revision == 2));
        assert!(matches!(&out[1], Err(ApplyError::Undecodable(_))));
        assert!(matches!(&out[2], Ok(Applied::Put(r)) if r.header_revision == 3));
        assert_eq!(m.applied_index(), 7);
    }

    #[test]
    fn leases_gate_puts_and_a_revoke_deletes_their_keys_in_one_revision() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, store) = test_machine(dir.path());
        let leases = m.leases.clone();
        let put = |k: &str, lease: i64| {
            Command::Put(pb::PutRequest {
                key: k.into(),
                value: b"v".to_vec(),
                lease,
                ..Default::default()
            })
            .encode()
        };
        let grant = Command::LeaseGrant(pb::LeaseGrantRequest { ttl: 5, id: 9 }).encode();
        let revoke = Command::LeaseRevoke(pb::LeaseRevokeRequest { id: 9 }).encode();
        let cmds = [
            put("x", 9),
            grant.clone(),
            put("b", 9),
            put("a", 9),
            grant,
            put("c", 0),
        ];
        let batch: Vec<Committed<'_>> = cmds
            .iter()
            .enumerate()
            .map(|(i, d)| Committed {
                index: i as u64 + 1,
                term: 1,
                data: d,
            })
            .collect();
        let out = m.apply(&batch).unwrap();
        assert!(matches!(&out[0], Err(ApplyError::LeaseNotFound)));
        assert!(matches!(
            &out[1],
            Ok(Applied::LeaseGrant { id: 9, ttl: 5, .. })
        ));
        assert!(matches!(&out[4], Err(ApplyError::LeaseExist)));
        assert_eq!(store.lease_keys(9), vec![b"a".to_vec(), b"b".to_vec()]);
        let out = m
            .apply(&[
                Committed {
                    index: 7,
                    term: 1,
                    data: &revoke,
                },
                Committed {
                    index: 8,
                    term: 1,
                    data: &revoke,
                },
            ])
            .unwrap();
        // "b", "a", "c" made revisions 2..4; the revoke is revision 5.
        assert!(matches!(&out[0], Ok(Applied::LeaseRevoke(5))));
        assert!(matches!(&out[1], Err(ApplyError::LeaseNotFound)));
        assert!(leases.ids().is_empty());
        let left = store
            .range(&mvcc::RangeRequest {
                range: mvcc::KeyRange::new("a", "z"),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(left.kvs.len(), 1, "only the key without a lease is left");
        assert_eq!(left.kvs[0].key, b"c");
    }
}

#[cfg(test)]
mod alarm_tests {
    use super::*;

    fn apply(m: &mut KvMachine, index: u64, cmd: Command) -> Output {
        let data = cmd.encode();
        m.apply(&[Committed {
            index,
            term: 1,
            data: &data,
        }])
        .unwrap()
        .pop()
        .unwrap()
    }

    fn put() -> Command {
        Command::Put(pb::PutRequest {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            ..Default::default()
        })
    }

    #[test]
    fn an_alarm_in_the_log_gates_writes_and_travels_in_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let (mut a, _) = test_machine(&dir.path().join("a"));
        assert!(apply(&mut a, 1, put()).is_ok());
        let raise = Command::Alarm(pb::AlarmRequest {
            action: pb::alarm_request::AlarmAction::Activate as i32,
            member_id: 3,
            alarm: pb::AlarmType::Nospace as i32,
        });
        assert!(matches!(apply(&mut a, 2, raise), Ok(Applied::Alarm(r)) if r.alarms.len() == 1));
        assert!(matches!(apply(&mut a, 3, put()), Err(ApplyError::NoSpace)));
        let del = Command::DeleteRange(pb::DeleteRangeRequest {
            key: b"k".to_vec(),
            ..Default::default()
        });
        assert!(apply(&mut a, 4, del).is_ok());

        // A member that installs the snapshot refuses the same writes.
        let mut image = Vec::new();
        a.snapshot().unwrap().read_to_end(&mut image).unwrap();
        let (mut b, _) = test_machine(&dir.path().join("b"));
        assert!(apply(&mut b, 1, put()).is_ok());
        b.restore(&mut &image[..], 4, 1).unwrap();
        assert!(matches!(apply(&mut b, 5, put()), Err(ApplyError::NoSpace)));
        let disarm = Command::Alarm(pb::AlarmRequest {
            action: pb::alarm_request::AlarmAction::Deactivate as i32,
            member_id: 3,
            alarm: pb::AlarmType::Nospace as i32,
        });
        assert!(apply(&mut b, 6, disarm).is_ok());
        assert!(apply(&mut b, 7, put()).is_ok());
    }
}

#[cfg(test)]
mod auth_tests {
    use super::*;
    use concord_proto::authpb;

    fn apply(m: &mut KvMachine, index: u64, cmd: Command) -> Output {
        let data = cmd.encode();
        m.apply(&[Committed {
            index,
            term: 1,
            data: &data,
        }])
        .unwrap()
        .pop()
        .unwrap()
    }

    fn by(user: &str, revision: u64, cmd: Command) -> Command {
        Command::As(Box::new((
            Requester {
                user: user.into(),
                revision,
            },
            cmd,
        )))
    }

    fn put(key: &str) -> Command {
        Command::Put(pb::PutRequest {
            key: key.into(),
            value: b"v".to_vec(),
            ..Default::default()
        })
    }

    fn change(c: AuthChange) -> Command {
        Command::Auth(c)
    }

    /// root (with the root role) and alice, who may write `a`..`m`; auth enabled.
    fn setup(m: &mut KvMachine) -> u64 {
        let user = |name: &str| {
            change(AuthChange::UserAdd(pb::AuthUserAddRequest {
                name: name.into(),
                hashed_password: bcrypt::hash("pw", 4).unwrap(),
                ..Default::default()
            }))
        };
        let grant = |user: &str, role: &str| {
            change(AuthChange::UserGrantRole(pb::AuthUserGrantRoleRequest {
                user: user.into(),
                role: role.into(),
            }))
        };
        let cmds = vec![
            user("root"),
            grant("root", "root"),
            user("alice"),
            change(AuthChange::RoleAdd(pb::AuthRoleAddRequest {
                name: "w".into(),
            })),
            change(AuthChange::RoleGrantPermission(
                pb::AuthRoleGrantPermissionRequest {
                    name: "w".into(),
                    perm: Some(authpb::Permission {
                        perm_type: authpb::permission::Type::Write as i32,
                        key: b"a".to_vec(),
                        range_end: b"m".to_vec(),
                    }),
                },
            )),
            grant("alice", "w"),
            change(AuthChange::Enable),
        ];
        let mut index = 0;
        for c in cmds {
            index += 1;
            assert!(apply(m, index, c).is_ok(), "setup step {index}");
        }
        index
    }

    fn refused(o: Output) -> AuthError {
        match o {
            Err(ApplyError::Auth(e)) => e,
            other => panic!("not refused by auth: {other:?}"),
        }
    }

    #[test]
    fn writes_are_checked_at_apply_time_against_the_auth_revision() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, _) = test_machine(dir.path());
        let mut i = setup(&mut m);
        let rev = m.auth.revision();
        let mut next = || {
            i += 1;
            i
        };
        // Anonymous, or no user: etcd's "user name is empty".
        assert_eq!(
            refused(apply(&mut m, next(), put("b"))),
            AuthError::UserEmpty
        );
        assert!(apply(&mut m, next(), by("alice", rev, put("b"))).is_ok());
        assert_eq!(
            refused(apply(&mut m, next(), by("alice", rev, put("x")))),
            AuthError::PermissionDenied
        );
        // A txn's nested op outside the grant is refused (CVE-2026-33343).
        let nested = pb::TxnRequest {
            success: vec![pb::RequestOp {
                request: Some(pb::request_op::Request::RequestTxn(pb::TxnRequest {
                    success: vec![pb::RequestOp {
                        request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                            key: b"x".to_vec(),
                            ..Default::default()
                        })),
                    }],
                    ..Default::default()
                })),
            }],
            ..Default::default()
        };
        assert_eq!(
            refused(apply(
                &mut m,
                next(),
                by("alice", rev, Command::Txn(nested))
            )),
            AuthError::PermissionDenied
        );
        // prev_kv needs read access, which alice does not have.
        let mut p = pb::PutRequest {
            key: b"b".to_vec(),
            prev_kv: true,
            ..Default::default()
        };
        assert_eq!(
            refused(apply(
                &mut m,
                next(),
                by("alice", rev, Command::Put(p.clone()))
            )),
            AuthError::PermissionDenied
        );
        p.prev_kv = false;
        // Root may do anything; alice may not change the auth store.
        assert!(apply(&mut m, next(), by("root", rev, put("x"))).is_ok());
        let add = change(AuthChange::RoleAdd(pb::AuthRoleAddRequest {
            name: "r2".into(),
        }));
        assert_eq!(
            refused(apply(&mut m, next(), by("alice", rev, add.clone()))),
            AuthError::PermissionDenied
        );
        assert!(apply(&mut m, next(), by("root", rev, add)).is_ok());
        // The store moved on: a write checked at the old revision is refused.
        assert_eq!(m.auth.revision(), rev + 1);
        assert_eq!(
            refused(apply(
                &mut m,
                next(),
                by("alice", rev, Command::Put(p.clone()))
            )),
            AuthError::AuthOldRevision
        );
        assert!(apply(&mut m, next(), by("alice", rev + 1, Command::Put(p))).is_ok());
        // Compaction is root's.
        let compact = Command::Compact(pb::CompactionRequest {
            revision: 1,
            physical: false,
        });
        assert_eq!(
            refused(apply(&mut m, next(), by("alice", rev + 1, compact))),
            AuthError::PermissionDenied
        );
    }

    #[test]
    fn etcds_rules_for_root_and_the_store_travel_in_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let (mut a, _) = test_machine(&dir.path().join("a"));
        let mut i = setup(&mut a);
        let rev = a.auth.revision();
        i += 1;
        let del_root = change(AuthChange::UserDelete(pb::AuthUserDeleteRequest {
            name: "root".into(),
        }));
        assert_eq!(
            refused(apply(&mut a, i, by("root", rev, del_root))),
            AuthError::InvalidAuthMgmt
        );
        i += 1;
        let no_perm = change(AuthChange::RoleGrantPermission(
            pb::AuthRoleGrantPermissionRequest {
                name: "w".into(),
                perm: None,
            },
        ));
        assert_eq!(
            refused(apply(&mut a, i, by("root", rev, no_perm))),
            AuthError::PermissionNotGiven
        );
        // No password in the store, only its hash; and the image carries it all.
        let mut image = Vec::new();
        a.snapshot().unwrap().read_to_end(&mut image).unwrap();
        assert!(!image.windows(8).any(|w| w == b"\0\0pw\0\0\0\0"));
        let (mut b, _) = test_machine(&dir.path().join("b"));
        b.restore(&mut &image[..], i, 1).unwrap();
        assert!(b.auth.enabled());
        assert_eq!(b.auth.revision(), rev);
        assert!(b.auth.check_password("alice", "pw").is_ok());
        assert_eq!(
            b.auth.check_password("alice", "nope"),
            Err(AuthError::AuthFailed)
        );
        assert_eq!(
            refused(apply(&mut b, i + 1, by("alice", rev, put("x")))),
            AuthError::PermissionDenied
        );
    }

    #[test]
    fn authenticate_registers_a_token_named_after_its_entry() {
        let dir = tempfile::tempdir().unwrap();
        let (mut m, _) = test_machine(dir.path());
        let i = setup(&mut m);
        let rev = m.auth.check_password("alice", "pw").unwrap();
        let auth = |revision| {
            change(AuthChange::Authenticate {
                name: "alice".into(),
                token_prefix: "abcdefghijklmnop".into(),
                revision,
            })
        };
        match apply(&mut m, i + 1, auth(rev)) {
            Ok(Applied::Auth { token: Some(t), .. }) => {
                assert_eq!(t, format!("abcdefghijklmnop.{}", i + 1));
                let c = m.auth.token_caller(&t).unwrap();
                assert_eq!(c.user.as_deref(), Some("alice"));
            }
            other => panic!("{other:?}"),
        }
        // Checked against an older store: the proposer must check the password again.
        assert_eq!(
            refused(apply(&mut m, i + 2, auth(rev - 1))),
            AuthError::AuthOldRevision
        );
        assert_eq!(
            m.auth.token_caller("nope.1"),
            Err(AuthError::InvalidAuthToken)
        );
    }
}
