//! Maintenance of a store: consistency hashes and defragmentation.
//!
//! [`Store::hash_kv`] is etcd's `HashKV`: a CRC-32C over the revision records a reader
//! at some revision may still ask for, so two stores that applied the same commands
//! agree on it at the same revision, however far each has got removing compacted
//! records. [`Store::hash`] covers every replicated record as stored (revision records
//! and the aux keyspace). [`Store::defragment`]
//! rewrites the files (a full RocksDB compaction) while reads and writes go on.

use std::collections::HashSet;

use rocksdb::{BottommostLevelCompaction, CompactOptions, IteratorMode, ReadOptions};

use crate::auxiliary::CF_AUX;
use crate::codec::{decode_record, decode_rev_key, rev_key};
use crate::error::{Error, Result};
use crate::store::{CF_KV, Store};
use crate::types::Revision;

/// Records looked up in the key index per hold of its lock.
const HASH_CHUNK: usize = 1_000;

/// A record waiting for the key index to say whether it counts: its revision, its
/// key, and the stored key and value bytes.
type Pending = (Revision, Vec<u8>, Box<[u8]>, Box<[u8]>);

/// The answer of [`Store::hash_kv`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvHash {
    pub hash: u32,
    /// The store's current revision when the hash was taken.
    pub revision: i64,
    /// The compacted revision (0 if never compacted).
    pub compacted: i64,
}

impl Store {
    /// etcd's `HashKV`: a hash of the revision records up to `revision` (0: the
    /// current one) that are newer than the compacted revision, plus the older records
    /// that are still the visible version of their key at `revision`. Records that a
    /// running compaction is about to remove do not count, so every member that applied
    /// the same commands gives the same hash for the same revision.
    ///
    /// As etcd: [`Error::Compacted`] if `revision` is at or below the compacted
    /// revision, [`Error::FutureRevision`] if it is above the current one.
    pub fn hash_kv(&self, revision: i64) -> Result<KvHash> {
        let started = std::time::Instant::now();
        let r = self.hash_kv_inner(revision);
        ::metrics::histogram!(crate::metrics::HASH_SECONDS).record(started.elapsed().as_secs_f64());
        r
    }

    fn hash_kv_inner(&self, revision: i64) -> Result<KvHash> {
        let shared = &*self.shared;
        let (snap, current, compacted) = {
            let st = shared.read_state();
            // Taken under the state lock: no compaction that this hash does not know
            // of has removed anything from this snapshot.
            (shared.db.snapshot(), st.current, st.compacted)
        };
        if revision > 0 && revision <= compacted {
            return Err(Error::Compacted);
        }
        if revision > current {
            return Err(Error::FutureRevision);
        }
        let at = if revision <= 0 { current } else { revision };
        let mut ro = ReadOptions::default();
        ro.set_snapshot(&snap);
        ro.set_iterate_upper_bound(rev_key(Revision::new(at.saturating_add(1), 0)).to_vec());
        let mut hash = crc32c::crc32c(CF_KV.as_bytes());
        // Records at or below the compacted revision wait here until the index says
        // whether they are still visible at `at`.
        let mut pending: Vec<Pending> = Vec::new();
        let flush = |pending: &mut Vec<Pending>, hash: &mut u32| {
            let visible: HashSet<Revision> = {
                let st = shared.read_state();
                pending
                    .iter()
                    .filter(|(rev, key, ..)| {
                        st.index.get(key, at).is_some_and(|m| m.modified == *rev)
                    })
                    .map(|(rev, ..)| *rev)
                    .collect()
            };
            for (rev, _, k, v) in pending.drain(..) {
                if visible.contains(&rev) {
                    *hash = crc32c::crc32c_append(crc32c::crc32c_append(*hash, &k), &v);
                }
            }
        };
        for item in shared
            .db
            .iterator_cf_opt(shared.kv(), ro, IteratorMode::Start)
        {
            let (k, v) = item?;
            let rev = decode_rev_key(&k)?;
            if rev.main <= compacted {
                let key = decode_record(rev, &v)?.kv.key;
                pending.push((rev, key, k, v));
                if pending.len() >= HASH_CHUNK {
                    flush(&mut pending, &mut hash);
                }
                continue;
            }
            flush(&mut pending, &mut hash);
            hash = crc32c::crc32c_append(crc32c::crc32c_append(hash, &k), &v);
        }
        flush(&mut pending, &mut hash);
        // A compaction past `at` that became visible meanwhile may have changed the
        // index history the lookups above relied on.
        if revision > 0 && revision <= self.compacted_revision() {
            return Err(Error::Compacted);
        }
        Ok(KvHash {
            hash,
            revision: current,
            compacted,
        })
    }

    /// etcd's `Hash`: a CRC-32C over every replicated record as stored, and the
    /// revision it was taken at: the name `kv`, each revision record's key and value
    /// in revision order, the name `aux`, each aux record's stored key (`<table>/<key>`)
    /// and value in key order. Unlike [`Store::hash_kv`] it depends on how far
    /// compaction has removed old records.
    pub fn hash(&self) -> Result<(u32, i64)> {
        let shared = &*self.shared;
        let (snap, current) = {
            let st = shared.read_state();
            (shared.db.snapshot(), st.current)
        };
        let mut hash = 0u32;
        for (name, cf) in [(CF_KV, shared.kv()), (CF_AUX, shared.aux_cf())] {
            hash = crc32c::crc32c_append(hash, name.as_bytes());
            let mut ro = ReadOptions::default();
            ro.set_snapshot(&snap);
            for item in shared.db.iterator_cf_opt(cf, ro, IteratorMode::Start) {
                let (k, v) = item?;
                hash = crc32c::crc32c_append(crc32c::crc32c_append(hash, &k), &v);
            }
        }
        Ok((hash, current))
    }

    /// Rewrites every column family's files, dropping deleted and overwritten data
    /// (etcd's defragmentation). Blocks the calling thread until done, but neither
    /// readers nor writers wait for it: RocksDB compacts from immutable files while
    /// new writes go to the memtable, and its background jobs keep running.
    pub fn defragment(&self) -> Result<()> {
        use crate::metrics as m;
        ::metrics::gauge!(m::DEFRAG_INFLIGHT).set(1.0);
        let started = std::time::Instant::now();
        let r = self.defragment_inner();
        ::metrics::histogram!(m::DEFRAG_SECONDS).record(started.elapsed().as_secs_f64());
        ::metrics::gauge!(m::DEFRAG_INFLIGHT).set(0.0);
        r
    }

    fn defragment_inner(&self) -> Result<()> {
        let shared = &*self.shared;
        let mut opts = CompactOptions::default();
        opts.set_exclusive_manual_compaction(false);
        // Also rewrite the last level, where compacted-away revisions leave their
        // deletion markers.
        opts.set_bottommost_level_compaction(BottommostLevelCompaction::Force);
        fail::fail_point!(crate::failpoints::DEFRAG_BEFORE);
        for cf in shared.column_families() {
            fail::fail_point!(crate::failpoints::DEFRAG_DURING);
            shared.db.flush_cf(cf)?;
            shared
                .db
                .compact_range_cf_opt(cf, None::<&[u8]>, None::<&[u8]>, &opts);
        }
        Ok(())
    }

    /// Bytes on disk and in memtables: what etcd's quota compares with its limit.
    /// Cheaper than [`Store::size_on_disk`].
    pub fn db_size(&self) -> i64 {
        let shared = &*self.shared;
        let prop = |cf, name: &str| {
            shared
                .db
                .property_int_value_cf(cf, name)
                .ok()
                .flatten()
                .unwrap_or(0) as i64
        };
        shared
            .column_families()
            .into_iter()
            .map(|cf| {
                prop(cf, "rocksdb.total-sst-files-size")
                    + prop(cf, "rocksdb.cur-size-all-mem-tables")
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::sync::Arc;

    use super::*;
    use crate::{DeleteRangeRequest, KeyRange, NoLeases, PutRequest, StoreOptions};

    fn open(dir: &std::path::Path) -> Arc<Store> {
        Arc::new(Store::open(dir, StoreOptions { sync_writes: false }).unwrap())
    }

    fn put(s: &Store, k: &str, v: &[u8]) {
        let mut w = s.writer().unwrap();
        w.put(
            &PutRequest {
                key: k.into(),
                value: v.to_vec(),
                ..Default::default()
            },
            &NoLeases,
        )
        .unwrap();
        w.commit(None).unwrap();
    }

    fn del(s: &Store, k: &str) {
        let mut w = s.writer().unwrap();
        w.delete_range(&DeleteRangeRequest {
            range: KeyRange::new(k, ""),
            prev_kv: false,
        })
        .unwrap();
        w.commit(None).unwrap();
    }

    /// The same history on every store: puts, overwrites, a deletion.
    fn history(s: &Store) {
        for i in 0..30 {
            put(s, &format!("k{}", i % 4), format!("v{i}").as_bytes());
        }
        del(s, "k1");
        put(s, "z", b"last");
    }

    fn compact(s: &Store, at: i64) -> crate::CompactWait {
        let mut w = s.writer().unwrap();
        let wait = w.compact(at).unwrap();
        w.commit(None).unwrap();
        wait
    }

    #[test]
    fn hash_kv_agrees_whatever_compaction_has_removed_yet() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            open(&dir.path().join("a")),
            open(&dir.path().join("b")),
            open(&dir.path().join("c")),
        );
        for s in [&a, &b, &c] {
            history(s);
        }
        let current = a.current_revision();
        let before = a.hash_kv(0).unwrap();
        assert_eq!(before.revision, current);
        assert_eq!(before.compacted, 0);
        assert_eq!(before, b.hash_kv(0).unwrap());
        assert_eq!(before, c.hash_kv(current).unwrap());

        // `a` removes the compacted records; `b`'s compactor is held back, so its old
        // records are all still there.
        compact(&a, 20).wait().unwrap();
        let held = b.shared.compaction.lock().unwrap();
        let b_wait = compact(&b, 20);
        let ha = a.hash_kv(0).unwrap();
        assert_eq!(ha.compacted, 20);
        assert_eq!(ha, b.hash_kv(0).unwrap());
        assert_eq!(a.hash_kv(25).unwrap(), b.hash_kv(25).unwrap());
        assert_ne!(ha.hash, before.hash);
        drop(held);
        b_wait.wait().unwrap();
        assert_eq!(ha, b.hash_kv(0).unwrap());

        // A revision's hash does not move when later writes come.
        let at = a.current_revision();
        put(&a, "k0", b"later");
        assert_eq!(a.hash_kv(at).unwrap().hash, ha.hash);
        assert_ne!(a.hash_kv(0).unwrap().hash, ha.hash);
        // Different data, different hash.
        put(&b, "k0", b"other");
        assert_ne!(a.hash_kv(0).unwrap().hash, b.hash_kv(0).unwrap().hash);

        assert_eq!(a.hash_kv(20), Err(Error::Compacted));
        assert_eq!(a.hash_kv(3), Err(Error::Compacted));
        assert_eq!(
            a.hash_kv(a.current_revision() + 1),
            Err(Error::FutureRevision)
        );
    }

    #[test]
    fn store_hash_covers_records_and_aux_tables() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (open(&dir.path().join("a")), open(&dir.path().join("b")));
        history(&a);
        history(&b);
        assert_eq!(a.hash().unwrap(), b.hash().unwrap());
        let mut w = a.writer().unwrap();
        w.put_aux("alarm", b"m1/nospace", b"");
        w.commit(None).unwrap();
        let (h, rev) = a.hash().unwrap();
        assert_eq!(rev, b.current_revision());
        assert_ne!(h, b.hash().unwrap().0);
        // The table is part of what is hashed, not only the key and value.
        let mut w = b.writer().unwrap();
        w.put_aux("alarms", b"m1/nospace", b"");
        w.commit(None).unwrap();
        assert_ne!(h, b.hash().unwrap().0);
        let mut w = b.writer().unwrap();
        w.delete_aux("alarms", b"m1/nospace");
        w.put_aux("alarm", b"m1/nospace", b"");
        w.commit(None).unwrap();
        assert_eq!(a.hash().unwrap(), b.hash().unwrap());
    }

    #[test]
    fn aux_tables_persist_and_travel_in_images() {
        let dir = tempfile::tempdir().unwrap();
        let a = open(&dir.path().join("a"));
        put(&a, "k", b"v");
        let mut w = a.writer().unwrap();
        w.put_aux("alarm", b"one", b"1");
        w.put_aux("alarm", b"two", b"2");
        w.put_aux("lease", &7i64.to_be_bytes(), b"lease");
        // A key with the separator in it, and a table whose name extends another's.
        w.put_aux("alarm0", b"x/y", b"3");
        w.commit(None).unwrap();
        let mut w = a.writer().unwrap();
        w.delete_aux("alarm", b"one");
        // In one batch, the later call wins.
        w.put_aux("alarm", b"three", b"3");
        w.delete_aux("alarm", b"three");
        w.commit(None).unwrap();
        let two = vec![(b"two".to_vec(), b"2".to_vec())];
        assert_eq!(a.aux_scan("alarm").unwrap(), two);
        drop(a);
        let a = open(&dir.path().join("a"));
        assert_eq!(a.aux_scan("alarm").unwrap(), two);
        assert_eq!(a.aux("alarm", b"two").unwrap(), Some(b"2".to_vec()));
        assert_eq!(a.aux("alarm", b"one").unwrap(), None);
        assert_eq!(
            a.aux_scan("alarm0").unwrap(),
            vec![(b"x/y".to_vec(), b"3".to_vec())]
        );
        assert_eq!(a.aux_scan("none").unwrap(), Vec::new());

        let mut image = Vec::new();
        a.export().unwrap().read_to_end(&mut image).unwrap();
        let info = crate::inspect_image(&mut &image[..]).unwrap();
        assert_eq!(
            (info.format, info.revision, info.records, info.aux),
            (4, 2, 1, 3)
        );
        assert_eq!(
            info.tables,
            [("alarm", 1), ("alarm0", 1), ("lease", 1)]
                .map(|(t, n)| (t.to_string(), n))
                .into()
        );
        assert_eq!(info.size, image.len() as u64);
        // Padding after the end frame is not part of the image.
        let mut padded = image.clone();
        padded.resize(image.len() + 300, 0);
        assert_eq!(crate::inspect_image(&mut &padded[..]).unwrap(), info);
        let mut bad = image.clone();
        bad.truncate(image.len() - 1);
        assert!(crate::inspect_image(&mut &bad[..]).is_err());

        let b = open(&dir.path().join("b"));
        let mut w = b.writer().unwrap();
        w.put_aux("alarm", b"stale", b"");
        w.put_aux("gone", b"stale", b"");
        w.commit(None).unwrap();
        b.import(&mut &padded[..], 0).unwrap();
        for t in ["alarm", "alarm0", "lease", "gone"] {
            assert_eq!(b.aux_scan(t).unwrap(), a.aux_scan(t).unwrap(), "{t}");
        }
        assert_eq!(b.hash_kv(0).unwrap(), a.hash_kv(0).unwrap());
        assert_eq!(b.hash().unwrap(), a.hash().unwrap());
    }

    #[test]
    fn defragment_gives_back_the_space_of_removed_history() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        // Incompressible values (xorshift), so the files hold what was written.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut value = || -> Vec<u8> {
            (0..16 * 1024)
                .flat_map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x.to_le_bytes()
                })
                .collect()
        };
        for i in 0..100 {
            put(&s, &format!("big{}", i % 20), &value());
        }
        s.defragment().unwrap();
        let full = s.db_size();
        for i in 0..20 {
            del(&s, &format!("big{i}"));
        }
        put(&s, "small", b"x");
        compact(&s, s.current_revision()).wait().unwrap();
        s.defragment().unwrap();
        let after = s.db_size();
        assert!(after * 10 < full, "{after} of {full} bytes left");
        assert_eq!(
            s.range(&crate::RangeRequest {
                range: KeyRange::new("small", ""),
                ..Default::default()
            })
            .unwrap()
            .kvs
            .len(),
            1
        );
    }
}
