//! etcd's alarm list as replicated state.
//!
//! An alarm is a `(member id, alarm type)` pair. Alarms are raised and cleared only by
//! applied `Alarm` commands, so every member holds the same list; each one is a record
//! of the store's aux table `alarm` (key: member id and type, big-endian), written in
//! the batch of the command, kept across restarts and carried in Raft snapshot images.
//! The in-memory set mirrors the records for the checks every write makes.
//!
//! While an alarm is active the apply path refuses writes as etcd's appliers do:
//! `CORRUPT` refuses every write (`etcdserver: corrupt cluster`), `NOSPACE` refuses
//! puts, txns that put, and lease grants (`etcdserver: mvcc: database space
//! exceeded`) while deletes, compaction and lease revocation still go through, so an
//! operator can free space and then disarm. The member that finds its store over the
//! quota raises `NOSPACE` itself (see `maintenance.rs`).

use std::collections::BTreeSet;
use std::sync::{PoisonError, RwLock};

use crate::apply::ApplyError;
use concord_mvcc as mvcc;
use concord_proto::etcdserverpb as pb;
use pb::alarm_request::AlarmAction;

use crate::apply::Command;

/// `(member id, alarm type)`, ordered for listing.
type Alarm = (u64, i32);

/// The store's aux table of alarm records: key the member id and alarm type
/// (big-endian), value empty. The name is the one mvcc maps old alarm records into
/// ([`mvcc::LEGACY_TABLES`]), so stores and images from before the aux keyspace load.
pub const TABLE: &str = "alarm";

const NOSPACE: i32 = pb::AlarmType::Nospace as i32;
const CORRUPT: i32 = pb::AlarmType::Corrupt as i32;

fn record_key((member, alarm): Alarm) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&member.to_be_bytes());
    k[8..].copy_from_slice(&alarm.to_be_bytes());
    k
}

fn decode_key(k: &[u8]) -> Result<Alarm, String> {
    if k.len() != 12 {
        return Err(format!("alarm record key of {} bytes", k.len()));
    }
    let member = u64::from_be_bytes(k[..8].try_into().expect("8 bytes"));
    let alarm = i32::from_be_bytes(k[8..].try_into().expect("4 bytes"));
    Ok((member, alarm))
}

/// The active alarms of the cluster.
#[derive(Debug, Default)]
pub struct Alarms {
    active: RwLock<BTreeSet<Alarm>>,
}

impl Alarms {
    /// Loads the alarm records of `store`.
    pub fn open(store: &mvcc::Store) -> Result<Alarms, String> {
        let alarms = Alarms::default();
        alarms.reload(store)?;
        Ok(alarms)
    }

    /// Replaces the set with the store's records (after a snapshot was installed).
    pub fn reload(&self, store: &mvcc::Store) -> Result<(), String> {
        let mut set = BTreeSet::new();
        for (k, _) in store.aux_scan(TABLE).map_err(|e| e.to_string())? {
            set.insert(decode_key(&k)?);
        }
        *self.active.write().unwrap_or_else(PoisonError::into_inner) = set;
        Ok(())
    }

    /// Active alarms of type `alarm` (every type for `NONE`), as etcd lists them.
    pub fn list(&self, alarm: i32) -> Vec<pb::AlarmMember> {
        self.active
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|a| alarm == pb::AlarmType::None as i32 || a.1 == alarm)
            .map(|&(member_id, alarm)| pb::AlarmMember { member_id, alarm })
            .collect()
    }

    /// Whether `member` has raised `alarm`.
    pub fn contains(&self, member: u64, alarm: pb::AlarmType) -> bool {
        self.active
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&(member, alarm as i32))
    }

    fn is_active(&self, alarm: i32) -> bool {
        self.active
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .any(|a| a.1 == alarm)
    }

    /// The error etcd's alarm appliers give `cmd` while alarms are active, if any.
    pub fn refuse(&self, cmd: &Command) -> Option<ApplyError> {
        if matches!(cmd, Command::Alarm(_) | Command::LeaseCheckpoint(_)) {
            return None;
        }
        if self.is_active(CORRUPT) {
            return Some(ApplyError::Corrupt);
        }
        let grows = match cmd {
            Command::Put(_) | Command::LeaseGrant(_) => true,
            Command::Txn(t) => txn_puts(t),
            _ => false,
        };
        (grows && self.is_active(NOSPACE)).then_some(ApplyError::NoSpace)
    }

    /// Applies an `Alarm` command in the batch `w`, as etcd's applier does: GET lists,
    /// ACTIVATE adds (answering the alarm, new or not), DEACTIVATE removes (answering
    /// the alarm if it was active, nothing otherwise).
    pub fn apply(&self, w: &mut mvcc::Writer<'_>, req: &pb::AlarmRequest) -> pb::AlarmResponse {
        let alarm = (req.member_id, req.alarm);
        let alarms = match AlarmAction::try_from(req.action) {
            Ok(AlarmAction::Get) => self.list(req.alarm),
            Ok(AlarmAction::Activate) => {
                let mut set = self.active.write().unwrap_or_else(PoisonError::into_inner);
                if set.insert(alarm) {
                    w.put_aux(TABLE, &record_key(alarm), &[]);
                    tracing::warn!(
                        member_id = format!("{:x}", alarm.0),
                        alarm = alarm_name(alarm.1),
                        "alarm raised"
                    );
                }
                vec![member(alarm)]
            }
            Ok(AlarmAction::Deactivate) => {
                let mut set = self.active.write().unwrap_or_else(PoisonError::into_inner);
                if set.remove(&alarm) {
                    w.delete_aux(TABLE, &record_key(alarm));
                    tracing::info!(
                        member_id = format!("{:x}", alarm.0),
                        alarm = alarm_name(alarm.1),
                        "alarm cleared"
                    );
                    vec![member(alarm)]
                } else {
                    Vec::new()
                }
            }
            Err(_) => Vec::new(),
        };
        // etcd's AlarmResponse carries no header.
        pb::AlarmResponse {
            header: None,
            alarms,
        }
    }

    /// The texts etcd's `Status` lists in `errors`, one per alarm.
    pub fn status_errors(&self) -> Vec<String> {
        self.list(pb::AlarmType::None as i32)
            .iter()
            .map(|a| format!("memberID:{} alarm:{} ", a.member_id, alarm_name(a.alarm)))
            .collect()
    }
}

fn member((member_id, alarm): Alarm) -> pb::AlarmMember {
    pb::AlarmMember { member_id, alarm }
}

/// The alarm type's name as etcd prints it (`NOSPACE`, `CORRUPT`).
pub fn alarm_name(alarm: i32) -> String {
    pb::AlarmType::try_from(alarm)
        .map(|a| a.as_str_name().to_string())
        .unwrap_or_else(|_| alarm.to_string())
}

/// Whether a txn puts on any branch at any depth: what `NOSPACE` refuses. (etcd counts
/// only the top level's puts; a nested put grows the store just the same.)
pub fn txn_puts(t: &pb::TxnRequest) -> bool {
    use pb::request_op::Request as R;
    t.success
        .iter()
        .chain(&t.failure)
        .any(|op| match &op.request {
            Some(R::RequestPut(_)) => true,
            Some(R::RequestTxn(t)) => txn_puts(t),
            _ => false,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(action: AlarmAction, member_id: u64, alarm: pb::AlarmType) -> pb::AlarmRequest {
        pb::AlarmRequest {
            action: action as i32,
            member_id,
            alarm: alarm as i32,
        }
    }

    #[test]
    fn alarms_gate_writes_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = mvcc::Store::open(dir.path(), mvcc::StoreOptions::default()).unwrap();
        let alarms = Alarms::open(&store).unwrap();
        let put = Command::Put(pb::PutRequest::default());
        let del = Command::DeleteRange(pb::DeleteRangeRequest::default());
        let read_txn = Command::Txn(pb::TxnRequest::default());
        let nested_put = Command::Txn(pb::TxnRequest {
            failure: vec![pb::RequestOp {
                request: Some(pb::request_op::Request::RequestTxn(pb::TxnRequest {
                    success: vec![pb::RequestOp {
                        request: Some(pb::request_op::Request::RequestPut(
                            pb::PutRequest::default(),
                        )),
                    }],
                    ..Default::default()
                })),
            }],
            ..Default::default()
        });
        assert_eq!(alarms.refuse(&put), None);

        let mut w = store.writer().unwrap();
        let r = alarms.apply(
            &mut w,
            &req(AlarmAction::Activate, 7, pb::AlarmType::Nospace),
        );
        assert_eq!(r.alarms, vec![member((7, NOSPACE))]);
        // Raising it again answers the same alarm and changes nothing.
        let r = alarms.apply(
            &mut w,
            &req(AlarmAction::Activate, 7, pb::AlarmType::Nospace),
        );
        assert_eq!(r.alarms, vec![member((7, NOSPACE))]);
        w.commit(None).unwrap();
        assert_eq!(alarms.refuse(&put), Some(ApplyError::NoSpace));
        assert_eq!(alarms.refuse(&nested_put), Some(ApplyError::NoSpace));
        assert_eq!(
            alarms.refuse(&Command::LeaseGrant(Default::default())),
            Some(ApplyError::NoSpace)
        );
        assert_eq!(alarms.refuse(&del), None);
        assert_eq!(alarms.refuse(&read_txn), None);
        assert_eq!(
            alarms.status_errors(),
            vec!["memberID:7 alarm:NOSPACE ".to_string()]
        );

        let reopened = Alarms::open(&store).unwrap();
        assert_eq!(reopened.list(0), vec![member((7, NOSPACE))]);

        let mut w = store.writer().unwrap();
        alarms.apply(
            &mut w,
            &req(AlarmAction::Activate, 9, pb::AlarmType::Corrupt),
        );
        assert_eq!(alarms.refuse(&del), Some(ApplyError::Corrupt));
        assert_eq!(
            alarms
                .apply(&mut w, &req(AlarmAction::Get, 0, pb::AlarmType::Corrupt))
                .alarms,
            vec![member((9, CORRUPT))]
        );
        assert_eq!(alarms.list(0).len(), 2);
        let r = alarms.apply(
            &mut w,
            &req(AlarmAction::Deactivate, 9, pb::AlarmType::Corrupt),
        );
        assert_eq!(r.alarms, vec![member((9, CORRUPT))]);
        let r = alarms.apply(
            &mut w,
            &req(AlarmAction::Deactivate, 9, pb::AlarmType::Corrupt),
        );
        assert!(r.alarms.is_empty());
        alarms.apply(
            &mut w,
            &req(AlarmAction::Deactivate, 7, pb::AlarmType::Nospace),
        );
        w.commit(None).unwrap();
        assert_eq!(alarms.refuse(&put), None);
        assert!(Alarms::open(&store).unwrap().list(0).is_empty());
    }
}
