//! On-disk encodings. Data keys are the revision, big-endian `main` then `sub`, so
//! RocksDB's byte order is revision order. Values are a small versioned record.

use crate::error::{Error, Result};
use crate::types::{KeyValue, Revision};

pub(crate) const REV_KEY_LEN: usize = 16;
const FORMAT: u8 = 1;
const FLAG_TOMBSTONE: u8 = 1;
const HEADER_LEN: usize = 2 + 8 * 3 + 4;

pub(crate) fn rev_key(rev: Revision) -> [u8; REV_KEY_LEN] {
    let mut k = [0u8; REV_KEY_LEN];
    k[..8].copy_from_slice(&rev.main.to_be_bytes());
    k[8..].copy_from_slice(&rev.sub.to_be_bytes());
    k
}

pub(crate) fn decode_rev_key(k: &[u8]) -> Result<Revision> {
    if k.len() != REV_KEY_LEN {
        return Err(Error::Corrupt(format!("data key of {} bytes", k.len())));
    }
    let main = i64::from_be_bytes(k[..8].try_into().expect("8 bytes"));
    let sub = i64::from_be_bytes(k[8..].try_into().expect("8 bytes"));
    Ok(Revision::new(main, sub))
}

/// One stored revision of a key: a put (the full key-value) or a deletion's tombstone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub tombstone: bool,
    pub kv: KeyValue,
}

pub(crate) fn encode_record(tombstone: bool, kv: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + kv.key.len() + kv.value.len());
    out.push(FORMAT);
    out.push(if tombstone { FLAG_TOMBSTONE } else { 0 });
    out.extend_from_slice(&kv.create_revision.to_le_bytes());
    out.extend_from_slice(&kv.version.to_le_bytes());
    out.extend_from_slice(&kv.lease.to_le_bytes());
    out.extend_from_slice(&(kv.key.len() as u32).to_le_bytes());
    out.extend_from_slice(&kv.key);
    out.extend_from_slice(&kv.value);
    out
}

pub(crate) fn decode_record(rev: Revision, buf: &[u8]) -> Result<Record> {
    let corrupt = |why: &str| Error::Corrupt(format!("record at revision {rev:?}: {why}"));
    if buf.len() < HEADER_LEN {
        return Err(corrupt("truncated header"));
    }
    if buf[0] != FORMAT {
        return Err(corrupt("unknown record format"));
    }
    let i64_at = |at: usize| i64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"));
    let key_len = u32::from_le_bytes(buf[26..30].try_into().expect("4 bytes")) as usize;
    if buf.len() < HEADER_LEN + key_len {
        return Err(corrupt("truncated key"));
    }
    let key = buf[HEADER_LEN..HEADER_LEN + key_len].to_vec();
    let value = buf[HEADER_LEN + key_len..].to_vec();
    Ok(Record {
        tombstone: buf[1] & FLAG_TOMBSTONE != 0,
        kv: KeyValue {
            key,
            create_revision: i64_at(2),
            mod_revision: rev.main,
            version: i64_at(10),
            value,
            lease: i64_at(18),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip_and_corruption() {
        let kv = KeyValue {
            key: b"k".to_vec(),
            create_revision: 3,
            mod_revision: 9,
            version: 4,
            value: b"v\0x".to_vec(),
            lease: 77,
        };
        let rev = Revision::new(9, 2);
        let enc = encode_record(false, &kv);
        assert_eq!(
            decode_record(rev, &enc).unwrap(),
            Record {
                tombstone: false,
                kv: kv.clone()
            }
        );
        assert!(decode_record(rev, &enc[..5]).is_err());
        let mut bad = enc.clone();
        bad[0] = 9;
        assert!(decode_record(rev, &bad).is_err());
        let mut short_key = enc;
        short_key[26] = 200;
        assert!(decode_record(rev, &short_key).is_err());
        assert_eq!(decode_rev_key(&rev_key(rev)).unwrap(), rev);
        assert!(rev_key(Revision::new(2, 0)) < rev_key(Revision::new(10, 0)));
    }
}
