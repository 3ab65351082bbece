//! Membership changes: one voter or learner added, promoted or removed at a time
//! (raft-rs "simple" changes, which need no joint configuration because at most one
//! voter changes). The proposer's context bytes travel with the change; the state
//! machine gets them back when the change is applied, with the configuration after it.

use raft::eraftpb::{ConfChange, ConfChangeType, ConfState};

use crate::error::{Error, Result};

/// What a change does to its member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Adds a voter, or promotes a learner to voter.
    AddVoter,
    /// Adds a learner (receives the log, does not vote).
    AddLearner,
    /// Removes a voter or learner.
    Remove,
}

/// A membership change as proposed and as applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberChange {
    pub kind: ChangeKind,
    pub id: u64,
    /// The proposer's bytes (for Concord: the member's name and URLs).
    pub context: Vec<u8>,
}

/// The voting configuration after a change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Configuration {
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
}

impl From<&ConfState> for Configuration {
    fn from(cs: &ConfState) -> Self {
        Configuration {
            voters: cs.voters.clone(),
            learners: cs.learners.clone(),
        }
    }
}

/// Why raft-rs cannot start from or restore `cs`, a configuration read from the log or
/// received with a snapshot; `None` if it can. Concord changes one member at a time, so
/// a joint configuration is never one it made.
pub(crate) fn conf_state_refusal(cs: &ConfState) -> Option<String> {
    let joint = !cs.voters_outgoing.is_empty() || !cs.learners_next.is_empty() || cs.auto_leave;
    let mut ids: Vec<u64> = cs.voters.iter().chain(&cs.learners).copied().collect();
    ids.sort_unstable();
    let repeated = ids.windows(2).any(|w| w[0] == w[1]);
    if joint || repeated || ids.first() == Some(&0) {
        return Some(format!(
            "voters {:?} and learners {:?}{} are not a configuration Concord makes",
            cs.voters,
            cs.learners,
            if joint { " (joint)" } else { "" }
        ));
    }
    None
}

/// The raft-rs change carrying `c`, with the proposal id in front of the context.
pub(crate) fn to_raft(c: &MemberChange, proposal: u64) -> ConfChange {
    let mut cc = ConfChange::default();
    cc.set_change_type(match c.kind {
        ChangeKind::AddVoter => ConfChangeType::AddNode,
        ChangeKind::AddLearner => ConfChangeType::AddLearnerNode,
        ChangeKind::Remove => ConfChangeType::RemoveNode,
    });
    cc.node_id = c.id;
    let mut ctx = proposal.to_be_bytes().to_vec();
    ctx.extend_from_slice(&c.context);
    cc.context = ctx.into();
    cc
}

/// Decodes the change entry at `index`: the change and the proposal id.
pub(crate) fn from_entry(index: u64, data: &[u8]) -> Result<(ConfChange, MemberChange, u64)> {
    let cc: ConfChange = crate::codec::decode(data)
        .map_err(Error::decode(format!("membership change entry {index}")))?;
    let kind = match cc.get_change_type() {
        ConfChangeType::AddNode => ChangeKind::AddVoter,
        ConfChangeType::AddLearnerNode => ChangeKind::AddLearner,
        ConfChangeType::RemoveNode => ChangeKind::Remove,
    };
    let (id, context) = if cc.context.len() >= 8 {
        let (id, rest) = cc.context.split_at(8);
        (
            u64::from_be_bytes(id.try_into().expect("8 bytes")),
            rest.to_vec(),
        )
    } else {
        (0, cc.context.to_vec())
    };
    let change = MemberChange {
        kind,
        id: cc.node_id,
        context,
    };
    Ok((cc, change, id))
}

/// `cs` after the simple change `cc`, computed as raft-rs's changer does (used on
/// restart to replay the changes the state machine has already applied).
pub(crate) fn apply_simple(cs: &mut ConfState, cc: &ConfChange) {
    let id = cc.node_id;
    if id == 0 {
        return;
    }
    cs.voters.retain(|&v| v != id);
    cs.learners.retain(|&l| l != id);
    match cc.get_change_type() {
        ConfChangeType::AddNode => cs.voters.push(id),
        ConfChangeType::AddLearnerNode => cs.learners.push(id),
        ConfChangeType::RemoveNode => {}
    }
    cs.voters.sort_unstable();
    cs.learners.sort_unstable();
}

#[cfg(test)]
mod tests {
    use protobuf::Message as _;

    use super::*;

    #[test]
    fn changes_round_trip_and_replay_like_raft() {
        let c = MemberChange {
            kind: ChangeKind::AddLearner,
            id: 9,
            context: b"ctx".to_vec(),
        };
        let cc = to_raft(&c, 77);
        let (back, change, id) = from_entry(5, &cc.write_to_bytes().unwrap()).unwrap();
        assert_eq!((change, id), (c, 77));
        let mut cs = ConfState::from((vec![1, 2, 3], vec![]));
        apply_simple(&mut cs, &back);
        assert_eq!(
            (cs.voters.clone(), cs.learners.clone()),
            (vec![1, 2, 3], vec![9])
        );
        let promote = to_raft(
            &MemberChange {
                kind: ChangeKind::AddVoter,
                id: 9,
                context: Vec::new(),
            },
            1,
        );
        apply_simple(&mut cs, &promote);
        // Applying it twice changes nothing more (replays are idempotent).
        apply_simple(&mut cs, &promote);
        assert_eq!(
            (cs.voters.clone(), cs.learners.clone()),
            (vec![1, 2, 3, 9], vec![])
        );
        let remove = to_raft(
            &MemberChange {
                kind: ChangeKind::Remove,
                id: 2,
                context: Vec::new(),
            },
            2,
        );
        apply_simple(&mut cs, &remove);
        assert_eq!(cs.voters, vec![1, 3, 9]);
    }
}
