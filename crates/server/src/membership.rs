//! The member list as replicated state.
//!
//! Who is in the cluster changes only through the log: `MemberAdd`, `MemberRemove` and
//! `MemberPromote` are Raft membership changes (one member at a time) whose context is
//! the member (`etcdserverpb.Member`: id, peer URLs, learner flag); `MemberUpdate` is an
//! ordinary command. Applying one rewrites the list in the store's replicated state
//! (`members`, in the same write as the applied index, and in Raft snapshot images) and
//! points the peer transport at the new set. Names and client URLs are not replicated:
//! each member publishes its own on the peer `Attributes` call, and the others fill
//! them in as they learn them (etcd publishes them through the log; clients see the
//! same list).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::apply::ApplyError;
use concord_consensus::{ChangeKind, MemberChange, Transport};
use concord_mvcc as mvcc;
use concord_proto::etcdserverpb as pb;
use prost::Message as _;
use tokio::sync::watch;

/// The store's aux table of replicated state values, by name. The name is the one
/// mvcc maps old state values into ([`mvcc::LEGACY_TABLES`]), so stores and images from
/// before the aux keyspace load.
pub const STATE_TABLE: &str = "state";
/// The key of the member list in [`STATE_TABLE`].
const STATE_MEMBERS: &[u8] = b"members";

#[derive(Default)]
struct Inner {
    /// Replicated: id, peer URLs, learner flag (and the names of the initial members).
    members: Vec<pb::Member>,
    /// Learned from each member itself: name and client URLs.
    learned: HashMap<u64, (String, Vec<String>)>,
}

/// The encoded member list recorded in `store`, if any.
fn stored(store: &mvcc::Store) -> Result<Option<Vec<u8>>, mvcc::Error> {
    store.aux(STATE_TABLE, STATE_MEMBERS)
}

/// Whether `store` holds a member list.
pub fn recorded(store: &mvcc::Store) -> Result<bool, mvcc::Error> {
    Ok(stored(store)?.is_some())
}

/// Records the member list a member starts with (before any change was applied).
pub fn record_initial(w: &mut mvcc::Writer<'_>, members: &[pb::Member]) {
    let list = pb::MemberListResponse {
        members: members.to_vec(),
        ..Default::default()
    };
    w.put_aux(STATE_TABLE, STATE_MEMBERS, &list.encode_to_vec());
}

/// The cluster's members as this member knows them.
pub struct Membership {
    self_id: u64,
    inner: Mutex<Inner>,
    transport: Option<Arc<dyn Transport>>,
    /// Set once a change removes this member.
    removed: watch::Sender<bool>,
}

impl Membership {
    /// The list recorded in `store`, or `initial` for a new member.
    pub fn open(
        store: &mvcc::Store,
        self_id: u64,
        initial: Vec<pb::Member>,
        transport: Option<Arc<dyn Transport>>,
    ) -> Result<Membership, String> {
        let m = Membership {
            self_id,
            inner: Mutex::new(Inner {
                members: initial,
                learned: HashMap::new(),
            }),
            transport,
            removed: watch::Sender::new(false),
        };
        m.reload(store)?;
        Ok(m)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the list recorded in `store` (after a snapshot install) if there is one.
    pub fn reload(&self, store: &mvcc::Store) -> Result<(), String> {
        if let Some(b) = stored(store).map_err(|e| e.to_string())? {
            let list = pb::MemberListResponse::decode(&b[..])
                .map_err(|e| format!("recorded member list: {e}"))?;
            self.lock().members = list.members;
            self.sync_transport();
        }
        Ok(())
    }

    /// Points the peer transport at every member but this one.
    fn sync_transport(&self) {
        let Some(t) = &self.transport else { return };
        for m in &self.lock().members {
            if m.id != self.self_id
                && let Some(url) = m.peer_ur_ls.first()
            {
                t.set_peer(m.id, url);
            }
        }
    }

    fn record(&self, w: &mut mvcc::Writer<'_>, g: &Inner) {
        record_initial(w, &g.members);
    }

    /// Applies a committed membership change (already taken by Raft).
    pub fn apply_change(&self, w: &mut mvcc::Writer<'_>, c: &MemberChange) -> Vec<pb::Member> {
        let mut g = self.lock();
        match c.kind {
            ChangeKind::AddVoter | ChangeKind::AddLearner => {
                let learner = c.kind == ChangeKind::AddLearner;
                if let Some(m) = g.members.iter_mut().find(|m| m.id == c.id) {
                    // A promotion (or a replay).
                    m.is_learner = learner;
                } else {
                    let mut m = pb::Member::decode(&c.context[..]).unwrap_or_default();
                    m.id = c.id;
                    m.is_learner = learner;
                    m.client_ur_ls.clear();
                    if let (Some(t), Some(url)) = (&self.transport, m.peer_ur_ls.first())
                        && c.id != self.self_id
                    {
                        t.set_peer(c.id, url);
                    }
                    g.members.push(m);
                }
            }
            ChangeKind::Remove => {
                g.members.retain(|m| m.id != c.id);
                g.learned.remove(&c.id);
                if c.id == self.self_id {
                    self.removed.send_replace(true);
                } else if let Some(t) = &self.transport {
                    t.remove_peer(c.id);
                }
            }
        }
        self.record(w, &g);
        self.listed(&g)
    }

    /// Applies `MemberUpdate`: new peer URLs for a member.
    pub fn apply_update(
        &self,
        w: &mut mvcc::Writer<'_>,
        id: u64,
        peer_urls: &[String],
    ) -> Result<Vec<pb::Member>, ApplyError> {
        let mut g = self.lock();
        let m = g
            .members
            .iter_mut()
            .find(|m| m.id == id)
            .ok_or(ApplyError::MemberNotFound)?;
        m.peer_ur_ls = peer_urls.to_vec();
        if let (Some(t), Some(url)) = (&self.transport, peer_urls.first())
            && id != self.self_id
        {
            t.set_peer(id, url);
        }
        self.record(w, &g);
        Ok(self.listed(&g))
    }

    /// Records what a member published about itself.
    pub fn learned(&self, id: u64, name: String, client_urls: Vec<String>) {
        self.lock().learned.insert(id, (name, client_urls));
    }

    /// The members as clients see them: learned names and client URLs filled in.
    pub fn list(&self) -> Vec<pb::Member> {
        self.listed(&self.lock())
    }

    fn listed(&self, g: &Inner) -> Vec<pb::Member> {
        g.members
            .iter()
            .map(|m| {
                let mut m = m.clone();
                if let Some((name, urls)) = g.learned.get(&m.id) {
                    if !name.is_empty() {
                        m.name = name.clone();
                    }
                    m.client_ur_ls = urls.clone();
                }
                m
            })
            .collect()
    }

    pub fn get(&self, id: u64) -> Option<pb::Member> {
        self.list().into_iter().find(|m| m.id == id)
    }

    /// Resolves once this member has been removed from the cluster.
    pub async fn removed(&self) {
        let mut rx = self.removed.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    /// Records that the cluster removed this member (learned from its peers, when the
    /// removal was committed without this member hearing of it).
    pub fn mark_removed(&self) {
        self.removed.send_replace(true);
    }

    pub fn is_removed(&self) -> bool {
        *self.removed.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u64, url: &str) -> pb::Member {
        pb::Member {
            id,
            peer_ur_ls: vec![url.into()],
            ..Default::default()
        }
    }

    #[test]
    fn changes_are_recorded_and_replays_are_harmless() {
        let dir = tempfile::tempdir().unwrap();
        let s = mvcc::Store::open(dir.path(), mvcc::StoreOptions { sync_writes: false }).unwrap();
        let m = Membership::open(&s, 1, vec![member(1, "http://a:1")], None).unwrap();
        let add = MemberChange {
            kind: ChangeKind::AddLearner,
            id: 2,
            context: member(2, "http://b:2").encode_to_vec(),
        };
        let mut w = s.writer().unwrap();
        m.apply_change(&mut w, &add);
        m.apply_change(&mut w, &add);
        w.commit(Some(5)).unwrap();
        let list = m.list();
        assert_eq!(list.len(), 2);
        assert!(list[1].is_learner);
        let promote = MemberChange {
            kind: ChangeKind::AddVoter,
            id: 2,
            context: Vec::new(),
        };
        let mut w = s.writer().unwrap();
        m.apply_change(&mut w, &promote);
        assert_eq!(
            m.apply_update(&mut w, 9, &["http://x:1".into()]),
            Err(ApplyError::MemberNotFound)
        );
        w.commit(Some(6)).unwrap();
        m.learned(2, "n2".into(), vec!["http://b:3".into()]);
        let two = m.get(2).unwrap();
        assert!(!two.is_learner);
        assert_eq!(two.name, "n2");
        assert_eq!(two.client_ur_ls, vec!["http://b:3".to_string()]);
        // A restart reads the recorded list, not the initial one.
        let again = Membership::open(&s, 1, Vec::new(), None).unwrap();
        assert_eq!(again.list().len(), 2);
        // Removing this member says so.
        let mut w = s.writer().unwrap();
        again.apply_change(
            &mut w,
            &MemberChange {
                kind: ChangeKind::Remove,
                id: 1,
                context: Vec::new(),
            },
        );
        w.commit(Some(7)).unwrap();
        assert!(again.is_removed());
        assert_eq!(again.list().len(), 1);
    }
}
