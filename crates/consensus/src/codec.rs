//! Decoding raft-rs's protobuf records that come from outside the raft thread: messages
//! from peers, and entries and configuration states read back from the log and from
//! snapshot files.
//!
//! rust-protobuf 2 trusts a field's length prefix before it has looked at the bytes: it
//! reserves what the prefix claims (up to 10 MB for one field) and only then finds the
//! input too short. So a few bytes from a peer could make a node allocate megabytes, and
//! a message whose field claims a few hundred megabytes is read in 10 MB steps. [`decode`]
//! reads from a shared buffer with the input's own length as the stream's limit, so every
//! length prefix is checked against the bytes that are actually there first.

use protobuf::error::WireError;
use protobuf::{CodedInputStream, Message, ProtobufError, ProtobufResult};

/// Decodes one whole `M` from `bytes`; allocates in proportion to `bytes` whatever its
/// length prefixes say.
pub(crate) fn decode<M: Message>(bytes: &[u8]) -> ProtobufResult<M> {
    // Fields of type `bytes` are slices of this buffer (raft-proto decodes them as
    // `Bytes`), so the copy replaces the one per field that decoding from a slice makes.
    let buf = bytes::Bytes::copy_from_slice(bytes);
    let mut is = CodedInputStream::from_carllerche_bytes(&buf);
    let outer = is.push_limit(buf.len() as u64)?;
    let m = M::parse_from(&mut is).map_err(|e| match e {
        // What rust-protobuf says when a nested length prefix runs past the end.
        ProtobufError::WireError(WireError::Other) => {
            ProtobufError::WireError(WireError::TruncatedMessage)
        }
        e => e,
    })?;
    is.check_eof()?;
    is.pop_limit(outer);
    Ok(m)
}

#[cfg(test)]
mod tests {
    use raft::eraftpb::{Entry, Message as RaftMessage};

    use super::*;

    #[test]
    fn round_trips_and_refuses_what_the_bytes_do_not_hold() {
        let mut e = Entry {
            index: 7,
            term: 2,
            ..Default::default()
        };
        e.data = b"payload".to_vec().into();
        let mut m = RaftMessage {
            to: 1,
            from: 2,
            ..Default::default()
        };
        m.set_entries(vec![e].into());
        let bytes = m.write_to_bytes().unwrap();
        assert_eq!(decode::<RaftMessage>(&bytes).unwrap(), m);
        // `context` (field 12) claiming 9 999 999 bytes, then none.
        assert!(decode::<RaftMessage>(&[0x62, 0xff, 0xac, 0xe2, 0x04]).is_err());
        // Cut inside the entry.
        assert!(decode::<RaftMessage>(&bytes[..bytes.len() - 1]).is_err());
    }
}
