//! Messages from peers, checked before raft-rs sees them. raft-rs trusts its input: a
//! message that no correct peer sends (a proposal without entries, a message without a
//! term, appended entries that do not follow the index they say they follow, a
//! heartbeat committing past this node's log, a snapshot message without its file)
//! makes it panic, or makes the node stop later on an entry it cannot apply. Such a
//! message is dropped with a warning saying what is wrong with it, as a lossy network
//! would have dropped it.

use super::*;

/// Terms above this are refused: raft-rs adds to terms unchecked.
const MAX_TERM: u64 = u64::MAX / 2;

/// Why `m`, received from a peer, must not be stepped; `None` if it may.
pub(super) fn refusal(raw: &RawNode<LogStore>, m: &Message) -> Option<String> {
    let r = &raw.raft;
    if let Some(why) = header_refusal(r.id, m) {
        return Some(why);
    }
    match m.get_msg_type() {
        // Snapshots arrive with their file ([`NodeMsg::InstallSnapshot`]).
        MessageType::MsgSnapshot => return Some("a snapshot message without its file".into()),
        MessageType::MsgPropose if m.entries.is_empty() => {
            return Some("a proposal without entries".into());
        }
        // The entry carries the read's context.
        MessageType::MsgReadIndex if m.entries.len() != 1 => {
            return Some(format!(
                "a read index request with {} entries",
                m.entries.len()
            ));
        }
        // A single voter would campaign and win at once, before its log is durable.
        MessageType::MsgTimeoutNow if r.prs().get(m.from).is_none() => {
            return Some("a leadership transfer from a non-member".into());
        }
        // raft-rs answers a heartbeat of an older term without looking at its commit.
        MessageType::MsgHeartbeat if m.term >= r.term && m.commit > r.raft_log.last_index() => {
            return Some(format!(
                "a heartbeat committing index {} beyond the last index {}",
                m.commit,
                r.raft_log.last_index()
            ));
        }
        // A follower acknowledges only what it was sent.
        MessageType::MsgAppendResponse if !m.reject && m.index > r.raft_log.last_index() => {
            return Some(format!(
                "an acknowledgement of index {} beyond the last index {}",
                m.index,
                r.raft_log.last_index()
            ));
        }
        MessageType::MsgAppend => {
            // raft-rs takes any index past its log to have term 0.
            if m.index > 0 && m.log_term == 0 {
                return Some(format!("an append after index {} of term 0", m.index));
            }
            for (i, e) in m.entries.iter().enumerate() {
                if m.index.checked_add(i as u64 + 1) != Some(e.index) {
                    return Some(format!(
                        "appended entry {} at position {i} after index {}",
                        e.index, m.index
                    ));
                }
            }
        }
        _ => {}
    }
    // What would be committed must be what the applier can apply.
    for e in &m.entries {
        match e.get_entry_type() {
            // Empty (a new leader's), or a proposal id and the command.
            EntryType::EntryNormal if e.data.is_empty() || e.data.len() >= 8 => {}
            EntryType::EntryNormal => {
                return Some(format!(
                    "entry {}: {} bytes, too short for a proposal id",
                    e.index,
                    e.data.len()
                ));
            }
            EntryType::EntryConfChange => {
                if let Err(err) = membership::from_entry(e.index, &e.data) {
                    return Some(err.to_string());
                }
            }
            EntryType::EntryConfChangeV2 => {
                return Some(format!(
                    "entry {}: joint membership changes are not used by Concord",
                    e.index
                ));
            }
        }
    }
    None
}

/// What every message from a peer must say: that it is for this node `id`, from another
/// member, and of a term if it has one. What a follower forwards to its leader
/// (proposals, read requests, leadership transfers) travels without a term, and
/// raft-rs forwards it again as it is; raft-rs takes any other message of term 0 for
/// one of its own.
fn header_refusal(id: u64, m: &Message) -> Option<String> {
    if m.to != id {
        return Some(format!("a message for member {:x}", m.to));
    }
    if m.from == 0 || m.from == id {
        return Some(format!("a message from member {:x}", m.from));
    }
    let forwarded = matches!(
        m.get_msg_type(),
        MessageType::MsgPropose | MessageType::MsgReadIndex | MessageType::MsgTransferLeader
    );
    if forwarded != (m.term == 0) {
        return Some(format!("a {:?} of term {}", m.get_msg_type(), m.term));
    }
    // raft-rs adds to terms unchecked; no cluster runs through half of them.
    if m.term > MAX_TERM {
        return Some(format!("a message of term {}", m.term));
    }
    None
}

/// Why `msg`, handed over with the received snapshot file `file` for node `id`, must
/// not be installed; `None` if it may: a snapshot message for exactly that file, with a
/// configuration raft-rs can restore.
pub(crate) fn snapshot_refusal(id: u64, msg: &Message, file: &SnapshotMeta) -> Option<String> {
    if msg.get_msg_type() != MessageType::MsgSnapshot {
        return Some(format!(
            "a {:?} sent as a snapshot message",
            msg.get_msg_type()
        ));
    }
    if let Some(why) = header_refusal(id, msg) {
        return Some(why);
    }
    let meta = msg.get_snapshot().get_metadata();
    if (meta.index, meta.term) != (file.index, file.term) {
        return Some(format!(
            "a snapshot message for index {} (term {}) with the file of snapshot {} (term {})",
            meta.index, meta.term, file.index, file.term
        ));
    }
    let cs = meta.get_conf_state();
    match crate::codec::decode::<ConfState>(&file.meta) {
        Ok(in_file) if &in_file == cs => {}
        Ok(_) => {
            return Some(format!(
                "snapshot {}: the message's configuration is not the file's",
                file.index
            ));
        }
        Err(e) => {
            return Some(format!(
                "snapshot {}: undecodable configuration in its file: {e}",
                file.index
            ));
        }
    }
    membership::conf_state_refusal(cs).map(|why| format!("snapshot {}: {why}", file.index))
}
