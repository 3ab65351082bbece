//! Point-in-time images of the store, for Raft snapshots: [`Store::export`] streams the
//! whole revision history as it was at one instant, [`Store::import`] replaces the
//! store's contents with such an image.
//!
//! The image is a logical dump of the `kv` column family (every revision record, as
//! stored), the aux keyspace (every record of the caller's tables, as stored), and the
//! compaction marks, read through a RocksDB snapshot so writes that continue after the
//! export started are not in it. Caller metadata (`user/` keys such as the member's own
//! identity) is neither exported nor replaced: it belongs to the member, not to the
//! replicated state. Integrity of the bytes in transit or on disk is the snapshot
//! file's job (it carries a checksum); this format only checks its own framing. Bytes
//! after the end frame are ignored, so a carrier may pad an image (the `Snapshot` RPC
//! pads it to 512-byte blocks, as etcdctl expects). [`inspect_image`] summarises an
//! image without a store (for offline tools).
//!
//! ## Format v4
//!
//! The magic `concord-mvcc-v4\n` (16 bytes); the current, compacted and
//! compaction-finished revisions (`i64`, big-endian); then frames of `tag: u8`,
//! `key length: u32`, `key`, `value length: u32`, `value` (lengths big-endian):
//! tag 1 is a revision record of `kv`, tag 5 an aux record (key `<table>/<key>`), both
//! exactly as stored; then tag 0 and the number of frames before it (`u64`, big-endian).
//! A new aux table changes nothing here.
//!
//! ## Older images
//!
//! Still imported, with the same header and framing: v1 has only tag 1; v2 adds tag 2,
//! a lease record (key: the lease id, big-endian), and tag 3, a replicated state value
//! (key: its name); v3 has tag 2 lease, tag 3 alarm record, tag 4 state value. Lease,
//! alarm and state frames become records of the aux tables [`LEGACY_TABLES`] (`lease`,
//! `alarm`, `state`) with the frame's key and value, as the column families of those
//! names become on open. (v2's tag 3 is a state value: v2 images never held alarms.)
//!
//! [`LEGACY_TABLES`]: crate::LEGACY_TABLES

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::sync::mpsc;
use std::sync::{Arc, PoisonError};
use std::thread;

use rocksdb::{IteratorMode, ReadOptions, WriteBatch, WriteOptions};

use crate::auxiliary::{
    AUX_END, LEGACY_ALARM, LEGACY_LEASE, LEGACY_STATE, aux_key, check_aux_key, split_aux_key,
};
use crate::error::{Error, Result};
use crate::store::{
    META_COMPACT_FINISHED, META_COMPACT_SCHEDULED, META_CONSISTENT_INDEX, Store, load_state,
    read_i64_meta,
};

const MAGIC: &[u8; 16] = b"concord-mvcc-v4\n";
/// Every format [`Store::import`] reads, with its version.
const MAGICS: [(&[u8; 16], u8); 4] = [
    (MAGIC, 4),
    (b"concord-mvcc-v3\n", 3),
    (b"concord-mvcc-v2\n", 2),
    (b"concord-mvcc-v1\n", 1),
];
const TAG_END: u8 = 0;
const TAG_RECORD: u8 = 1;
/// v4's aux record. (2 to 4 were the per-table frames of v2 and v3; never reused.)
const TAG_AUX: u8 = 5;
/// Bytes handed from the export thread to the reader at a time.
const CHUNK: usize = 256 * 1024;
/// Chunks the export thread may run ahead of its reader.
const CHUNKS_AHEAD: usize = 8;
/// Records per import write (the last one is synced).
const IMPORT_BATCH: usize = 10_000;

/// A store image being produced; read it to the end. Reading after the store was
/// dropped still works: the export thread holds the store until it is done.
pub struct Export {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    pos: usize,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export").finish_non_exhaustive()
    }
}

impl Read for Export {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.pos < self.buf.len() {
                let n = out.len().min(self.buf.len() - self.pos);
                out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    self.buf = chunk;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                // The thread hangs up after sending the end frame.
                Err(_) => return Ok(0),
            }
        }
    }
}

/// What a frame of an image holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    End,
    /// A revision record of `kv`.
    Record,
    /// An aux record with its stored key (v4).
    Aux,
    /// A record of a v1 to v3 per-table frame, and the aux table it now belongs to.
    Legacy(&'static str),
}

/// The meaning of `tag` in an image of format `version`; `None` if it has none.
fn frame(version: u8, tag: u8) -> Option<Frame> {
    Some(match (version, tag) {
        (_, TAG_END) => Frame::End,
        (_, TAG_RECORD) => Frame::Record,
        (4, TAG_AUX) => Frame::Aux,
        (2 | 3, 2) => Frame::Legacy(LEGACY_LEASE),
        (2, 3) | (3, 4) => Frame::Legacy(LEGACY_STATE),
        (3, 3) => Frame::Legacy(LEGACY_ALARM),
        _ => return None,
    })
}

/// Reads the magic, answering the format version.
fn read_magic(r: &mut impl Read) -> Result<u8> {
    let mut magic = [0u8; 16];
    read_exact(r, &mut magic)?;
    MAGICS
        .iter()
        .find(|(m, _)| **m == magic)
        .map(|&(_, v)| v)
        .ok_or_else(|| Error::Corrupt("store image: not a concord store image".into()))
}

fn put_frame(out: &mut Vec<u8>, tag: u8, k: &[u8], v: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&(k.len() as u32).to_be_bytes());
    out.extend_from_slice(k);
    out.extend_from_slice(&(v.len() as u32).to_be_bytes());
    out.extend_from_slice(v);
}

impl Store {
    /// Starts an image of the store as it is now. Returns once the point in time is
    /// fixed (writes after that are not in the image); the bytes are produced by a
    /// background thread as the returned reader is read.
    pub fn export(self: &Arc<Self>) -> Result<Export> {
        let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<()>>(1);
        let (tx, rx) = mpsc::sync_channel(CHUNKS_AHEAD);
        let store = self.clone();
        thread::Builder::new()
            .name("mvcc-export".into())
            .spawn(move || {
                let started = std::time::Instant::now();
                let shared = &*store.shared;
                // No write batch may be half-published while the point in time is taken.
                let guard = store.writer.lock().unwrap_or_else(PoisonError::into_inner);
                let snap = shared.db.snapshot();
                let (current, compacted) = {
                    let st = shared.read_state();
                    (st.current, st.compacted)
                };
                let finished = match read_i64_meta(shared, META_COMPACT_FINISHED) {
                    Ok(f) => f.unwrap_or(0),
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                drop(guard);
                let _ = ready_tx.send(Ok(()));

                let mut chunk = Vec::with_capacity(CHUNK + 1024);
                chunk.extend_from_slice(MAGIC);
                for v in [current, compacted, finished] {
                    chunk.extend_from_slice(&v.to_be_bytes());
                }
                let mut ro = ReadOptions::default();
                ro.set_snapshot(&snap);
                let mut count: u64 = 0;
                let mut aux_ro = ReadOptions::default();
                aux_ro.set_snapshot(&snap);
                let records = shared
                    .db
                    .iterator_cf_opt(shared.kv(), ro, IteratorMode::Start)
                    .map(|r| (TAG_RECORD, r));
                let aux = shared
                    .db
                    .iterator_cf_opt(shared.aux_cf(), aux_ro, IteratorMode::Start)
                    .map(|r| (TAG_AUX, r));
                for (tag, item) in records.chain(aux) {
                    match item {
                        Ok((k, v)) => put_frame(&mut chunk, tag, &k, &v),
                        Err(e) => {
                            let _ = tx.send(Err(io::Error::other(e.into_string())));
                            return;
                        }
                    }
                    count += 1;
                    if chunk.len() >= CHUNK
                        && tx
                            .send(Ok(std::mem::replace(
                                &mut chunk,
                                Vec::with_capacity(CHUNK + 1024),
                            )))
                            .is_err()
                    {
                        return; // the reader gave up
                    }
                }
                chunk.push(TAG_END);
                chunk.extend_from_slice(&count.to_be_bytes());
                if tx.send(Ok(chunk)).is_ok() {
                    ::metrics::histogram!(crate::metrics::SNAPSHOT_SECONDS)
                        .record(started.elapsed().as_secs_f64());
                }
            })
            .map_err(|e| Error::Storage(format!("spawning the export thread: {e}")))?;
        ready_rx
            .recv()
            .map_err(|_| Error::Storage("the export thread stopped".into()))??;
        Ok(Export {
            rx,
            buf: Vec::new(),
            pos: 0,
        })
    }

    /// Replaces the store's revision history with an image from [`Store::export`] and
    /// records `consistent_index` as applied, in that order and durably. Writers wait
    /// meanwhile. An interrupted import leaves the consistent index at 0, so the caller
    /// knows to import again after a restart.
    pub fn import(&self, image: &mut dyn Read, consistent_index: u64) -> Result<()> {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(why) = self
            .poisoned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            return Err(Error::Poisoned(why));
        }
        let running = self
            .shared
            .compaction
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let shared = &*self.shared;
        let corrupt = |what: &str| Error::Corrupt(format!("store image: {what}"));
        let mut r = io::BufReader::with_capacity(1 << 20, image);
        let version = read_magic(&mut r)?;
        let current = read_i64(&mut r)?;
        let compacted = read_i64(&mut r)?;
        let finished = read_i64(&mut r)?;

        // Clear first; the consistent index goes with it, so a crash from here on is
        // seen as "no state" rather than as the old state.
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(shared.kv(), Vec::<u8>::new(), vec![0xffu8; 17]);
        batch.delete_range_cf(shared.aux_cf(), &[][..], &AUX_END[..]);
        for k in [
            META_CONSISTENT_INDEX,
            META_COMPACT_SCHEDULED,
            META_COMPACT_FINISHED,
        ] {
            batch.delete_cf(shared.meta_cf(), k);
        }
        shared.db.write(std::mem::take(&mut batch))?;

        let mut count: u64 = 0;
        loop {
            let mut tag = [0u8; 1];
            read_exact(&mut r, &mut tag)?;
            let kind = frame(version, tag[0]).ok_or_else(|| corrupt("unknown frame"))?;
            if kind == Frame::End {
                break;
            }
            let k = read_bytes(&mut r)?;
            let v = read_bytes(&mut r)?;
            match kind {
                Frame::Record => batch.put_cf(shared.kv(), k, v),
                Frame::Aux => {
                    check_aux_key(&k)?;
                    batch.put_cf(shared.aux_cf(), k, v);
                }
                Frame::Legacy(table) => batch.put_cf(shared.aux_cf(), aux_key(table, &k), v),
                Frame::End => unreachable!("handled above"),
            }
            count += 1;
            if batch.len() >= IMPORT_BATCH {
                shared.db.write(std::mem::take(&mut batch))?;
            }
        }
        if read_i64(&mut r)? as u64 != count {
            return Err(corrupt("record count does not match"));
        }
        batch.put_cf(
            shared.meta_cf(),
            META_COMPACT_SCHEDULED,
            compacted.to_be_bytes(),
        );
        batch.put_cf(
            shared.meta_cf(),
            META_COMPACT_FINISHED,
            finished.to_be_bytes(),
        );
        batch.put_cf(
            shared.meta_cf(),
            META_CONSISTENT_INDEX,
            (consistent_index as i64).to_be_bytes(),
        );
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        shared.db.write_opt(batch, &wo)?;
        load_state(shared, compacted)?;
        {
            let mut st = shared.state.write().unwrap_or_else(PoisonError::into_inner);
            st.current = st.current.max(current);
        }
        drop(running);
        tracing::info!(
            records = count,
            format = version,
            revision = current,
            compacted,
            consistent_index,
            "store image imported"
        );
        if compacted > finished {
            // The exporter was still removing old revisions; finish that here.
            self.schedule_compaction(compacted, crate::CompactWait::default());
        }
        Ok(())
    }
}

/// What an image holds, as [`inspect_image`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The image format (4 for images [`Store::export`] writes now).
    pub format: u8,
    /// The store's revision at the image's point in time.
    pub revision: i64,
    /// The compacted revision (0 if never compacted).
    pub compacted: i64,
    /// Revision records (every revision of every key still kept).
    pub records: u64,
    /// Aux records, of every table (in an older image: its lease, alarm and state
    /// records, counted in the tables they are imported into).
    pub aux: u64,
    /// Aux records per table, by table name.
    pub tables: BTreeMap<String, u64>,
    /// CRC-32C over every frame's key and value as they appear in the image, in image
    /// order.
    pub hash: u32,
    /// Bytes of the image up to and including its end frame (padding excluded).
    pub size: u64,
}

/// Reads a whole image from [`Store::export`] and checks its framing, without a
/// store: for offline tools (`snapshot status`, checks before a restore).
pub fn inspect_image(image: &mut dyn Read) -> Result<ImageInfo> {
    let corrupt = |what: &str| Error::Corrupt(format!("store image: {what}"));
    let mut r = Counting {
        inner: io::BufReader::with_capacity(1 << 20, image),
        n: 0,
    };
    let format = read_magic(&mut r)?;
    let revision = read_i64(&mut r)?;
    let compacted = read_i64(&mut r)?;
    let _finished = read_i64(&mut r)?;
    let (mut records, mut aux) = (0u64, 0u64);
    let mut tables: BTreeMap<String, u64> = BTreeMap::new();
    let mut hash = 0u32;
    loop {
        let mut tag = [0u8; 1];
        read_exact(&mut r, &mut tag)?;
        let kind = frame(format, tag[0]).ok_or_else(|| corrupt("unknown frame"))?;
        if kind == Frame::End {
            break;
        }
        let k = read_bytes(&mut r)?;
        let v = read_bytes(&mut r)?;
        let table = match kind {
            Frame::Record => None,
            Frame::Aux => Some(
                split_aux_key(&k)
                    .ok_or_else(|| corrupt("aux record key without a table"))?
                    .0,
            ),
            Frame::Legacy(table) => Some(table),
            Frame::End => unreachable!("handled above"),
        };
        match table {
            None => records += 1,
            Some(t) => {
                aux += 1;
                *tables.entry(t.to_string()).or_default() += 1;
            }
        }
        hash = crc32c::crc32c_append(crc32c::crc32c_append(hash, &k), &v);
    }
    if read_i64(&mut r)? as u64 != records + aux {
        return Err(corrupt("record count does not match"));
    }
    Ok(ImageInfo {
        format,
        revision,
        compacted,
        records,
        aux,
        tables,
        hash,
        size: r.n,
    })
}

/// Counts the bytes read through it.
struct Counting<R> {
    inner: R,
    n: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}

fn read_exact(r: &mut impl Read, buf: &mut [u8]) -> Result<()> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Error::Corrupt("store image: truncated".into())
        } else {
            Error::Storage(format!("reading a store image: {e}"))
        }
    })
}

fn read_i64(r: &mut impl Read) -> Result<i64> {
    let mut b = [0u8; 8];
    read_exact(r, &mut b)?;
    Ok(i64::from_be_bytes(b))
}

fn read_bytes(r: &mut impl Read) -> Result<Vec<u8>> {
    let mut l = [0u8; 4];
    read_exact(r, &mut l)?;
    let len = u32::from_be_bytes(l) as usize;
    if len > 64 << 20 {
        return Err(Error::Corrupt("store image: record too large".into()));
    }
    let mut v = vec![0u8; len];
    read_exact(r, &mut v)?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{KeyRange, NoLeases, PutRequest, RangeRequest, StoreOptions};

    fn put(store: &Store, k: &str, v: &str) {
        let mut w = store.writer().unwrap();
        w.put(
            &PutRequest {
                key: k.into(),
                value: v.into(),
                ..Default::default()
            },
            &NoLeases,
        )
        .unwrap();
        w.commit(None).unwrap();
    }

    fn get_at(store: &Store, k: &str, rev: i64) -> Option<Vec<u8>> {
        store
            .range(&RangeRequest {
                range: KeyRange::new(k, ""),
                revision: rev,
                ..Default::default()
            })
            .unwrap()
            .kvs
            .first()
            .map(|kv| kv.value.clone())
    }

    #[test]
    fn image_round_trips_history_and_is_point_in_time() {
        let dir = tempfile::tempdir().unwrap();
        let src = Arc::new(Store::open(dir.path().join("a"), StoreOptions::default()).unwrap());
        for i in 0..50 {
            put(&src, &format!("k{}", i % 7), &format!("v{i}"));
        }
        let mut w = src.writer().unwrap();
        w.compact(10).unwrap();
        w.put_meta("identity", b"source");
        w.put_aux("state", b"members", b"abc");
        w.commit(Some(77)).unwrap();
        let mut export = src.export().unwrap();
        // Written after the point in time: must not be in the image.
        put(&src, "late", "x");
        let mut image = Vec::new();
        export.read_to_end(&mut image).unwrap();

        let dst = Store::open(dir.path().join("b"), StoreOptions::default()).unwrap();
        put(&dst, "stale", "gone");
        let mut w = dst.writer().unwrap();
        w.put_meta("identity", b"dest");
        w.put_aux("other", b"stale", b"gone");
        w.commit(None).unwrap();
        dst.import(&mut &image[..], 500).unwrap();

        assert_eq!(dst.consistent_index().unwrap(), 500);
        assert_eq!(dst.current_revision(), 51);
        assert_eq!(dst.compacted_revision(), 10);
        assert_eq!(get_at(&dst, "stale", 0), None);
        assert_eq!(get_at(&dst, "late", 0), None);
        assert_eq!(get_at(&dst, "k0", 0), Some(b"v49".to_vec()));
        // History after the compaction survives; before it is refused.
        assert_eq!(get_at(&dst, "k3", 20), Some(b"v17".to_vec()));
        assert!(matches!(
            dst.range(&RangeRequest {
                range: KeyRange::new("k3", ""),
                revision: 5,
                ..Default::default()
            }),
            Err(Error::Compacted)
        ));
        // The member's own metadata is not replicated state; aux records are.
        assert_eq!(dst.meta("identity").unwrap(), Some(b"dest".to_vec()));
        assert_eq!(dst.aux("state", b"members").unwrap(), Some(b"abc".to_vec()));
        assert_eq!(dst.aux_scan("other").unwrap(), Vec::new());
        // Writes continue from the image's revision, and survive a reopen.
        put(&dst, "after", "y");
        assert_eq!(dst.current_revision(), 52);
        drop(dst);
        let dst = Store::open(dir.path().join("b"), StoreOptions::default()).unwrap();
        assert_eq!(get_at(&dst, "after", 0), Some(b"y".to_vec()));
        assert_eq!(get_at(&dst, "k3", 20), Some(b"v17".to_vec()));
        assert_eq!(dst.consistent_index().unwrap(), 500);
    }

    #[test]
    fn damaged_image_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let src = Arc::new(Store::open(dir.path().join("a"), StoreOptions::default()).unwrap());
        put(&src, "a", "1");
        let mut image = Vec::new();
        src.export().unwrap().read_to_end(&mut image).unwrap();
        let dst = Store::open(dir.path().join("b"), StoreOptions::default()).unwrap();
        let cut = &image[..image.len() - 3];
        assert!(matches!(
            dst.import(&mut &cut[..], 9),
            Err(Error::Corrupt(_))
        ));
        assert_eq!(dst.consistent_index().unwrap(), 0);
        let mut bad = image.clone();
        bad[0] ^= 1;
        assert!(matches!(
            dst.import(&mut &bad[..], 9),
            Err(Error::Corrupt(_))
        ));
        dst.import(&mut &image[..], 9).unwrap();
        assert_eq!(get_at(&dst, "a", 0), Some(b"1".to_vec()));
    }
}
