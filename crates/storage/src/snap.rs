//! Snapshot files: the state machine's point-in-time image plus its Raft metadata.
//!
//! A snapshot is one file named `{term:016x}-{index:016x}.snap`, so lexical order is
//! (term, index) order:
//!
//! ```text
//! magic "CNCDSNAP" | version u32 | index u64 | term u64 | meta_len u32 | meta
//! body (any length)
//! body_len u64 | crc32c u32 over every byte before it
//! ```
//!
//! Files are written under a `.tmp` name, fsynced, renamed into place and the directory
//! fsynced, so a snapshot is either complete and verified or absent.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::warn;

use crate::fsutil::{ensure_dir, parse_pair_name, remove_with_suffix, sync_dir, u32_at, u64_at};
use crate::{Error, Result};

/// Largest `meta` accepted, so a damaged length field cannot trigger a huge allocation.
pub const MAX_SNAPSHOT_META_LEN: usize = 64 << 20;

const SNAP_MAGIC: &[u8; 8] = b"CNCDSNAP";
const SNAP_VERSION: u32 = 1;
const FIXED_HEADER: usize = 8 + 4 + 8 + 8 + 4;
const TRAILER: usize = 12;
const SNAP_SUFFIX: &str = ".snap";
const TMP_SUFFIX: &str = ".tmp";
const BROKEN_SUFFIX: &str = ".broken";
const IO_BUF: usize = 256 << 10;

/// Distinguishes temp files of concurrent writers in one process.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The Raft position a snapshot covers and the caller's opaque metadata (ConfState).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SnapshotMeta {
    pub index: u64,
    pub term: u64,
    pub meta: Vec<u8>,
}

/// A directory of snapshot files.
#[derive(Debug, Clone)]
pub struct SnapshotStore {
    dir: PathBuf,
}

impl SnapshotStore {
    /// Opens (creating if needed) the store and removes temp files of interrupted writes.
    pub fn open(dir: &Path) -> Result<SnapshotStore> {
        ensure_dir(dir)?;
        remove_with_suffix(dir, TMP_SUFFIX)?;
        Ok(SnapshotStore {
            dir: dir.to_path_buf(),
        })
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Starts a snapshot; the returned writer takes the body.
    pub fn create(&self, meta: &SnapshotMeta) -> Result<SnapshotWriter> {
        if meta.meta.len() > MAX_SNAPSHOT_META_LEN {
            return Err(Error::TooLarge {
                len: meta.meta.len() as u64,
                max: MAX_SNAPSHOT_META_LEN as u64,
            });
        }
        let header = encode_header(meta);
        let (file, tmp) = self.temp_file(&final_name(meta.term, meta.index))?;
        let mut writer = SnapshotWriter {
            dir: self.dir.clone(),
            out: Some(BufWriter::with_capacity(IO_BUF, file)),
            tmp: Some(tmp),
            meta: meta.clone(),
            crc: crc32c::crc32c(&header),
            header_len: header.len() as u64,
            body_len: 0,
        };
        if let Some(out) = writer.out.as_mut() {
            out.write_all(&header)?;
        }
        Ok(writer)
    }

    /// Starts receiving a snapshot file as raw bytes (what a peer's
    /// [`SnapshotFile::raw_reader`] produced). Nothing is installed unless the whole stream
    /// verifies.
    pub fn import(&self) -> Result<ImportWriter> {
        let (file, tmp) = self.temp_file("import")?;
        Ok(ImportWriter {
            dir: self.dir.clone(),
            out: Some(BufWriter::with_capacity(IO_BUF, file)),
            tmp: Some(tmp),
            verifier: Verifier::default(),
            failed: None,
        })
    }

    /// The newest snapshot whose checksum verifies. Newer files that fail are renamed to
    /// `*.broken` (kept for inspection, never considered again) and logged.
    pub fn latest(&self) -> Result<Option<SnapshotFile>> {
        for (term, index, path) in self.list()?.into_iter().rev() {
            let reason = match self.open_file(&path) {
                Ok(f) if f.meta.term == term && f.meta.index == index => return Ok(Some(f)),
                Ok(f) => format!(
                    "contents say term {} index {} but the name says term {term} index {index}",
                    f.meta.term, f.meta.index
                ),
                Err(Error::CorruptSnapshot { reason, .. }) => reason,
                Err(e) => return Err(e),
            };
            let mut broken = path.clone().into_os_string();
            broken.push(BROKEN_SUFFIX);
            warn!(
                snapshot = %path.display(),
                term,
                index,
                reason = %reason,
                "skipping corrupt snapshot"
            );
            fs::rename(&path, &broken)?;
            sync_dir(&self.dir)?;
        }
        Ok(None)
    }

    /// Opens and fully verifies the snapshot file at `path`.
    pub fn open_file(&self, path: &Path) -> Result<SnapshotFile> {
        let mut file = File::open(path)?;
        let mut verifier = Verifier::default();
        let mut buf = vec![0u8; IO_BUF];
        let corrupt = |reason: String| Error::CorruptSnapshot {
            path: path.to_path_buf(),
            reason,
        };
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            verifier.feed(&buf[..n]).map_err(corrupt)?;
        }
        let v = verifier.finish().map_err(corrupt)?;
        Ok(SnapshotFile {
            meta: v.meta,
            path: path.to_path_buf(),
            len: v.total,
            body_offset: v.header_len,
            body_len: v.body_len,
        })
    }

    /// Deletes all but the newest `keep` snapshots; returns how many were deleted.
    pub fn purge(&self, keep: usize) -> Result<usize> {
        let files = self.list()?;
        let doomed = files.len().saturating_sub(keep);
        for (_, _, path) in &files[..doomed] {
            fs::remove_file(path)?;
        }
        if doomed > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(doomed)
    }

    /// Snapshot files by name, oldest first.
    fn list(&self) -> Result<Vec<(u64, u64, PathBuf)>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some((term, index)) = parse_pair_name(name, SNAP_SUFFIX) {
                out.push((term, index, entry.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    fn temp_file(&self, stem: &str) -> Result<(File, PathBuf)> {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .dir
            .join(format!("{stem}.{}-{n}{TMP_SUFFIX}", std::process::id()));
        let file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        Ok((file, tmp))
    }
}

fn final_name(term: u64, index: u64) -> String {
    format!("{term:016x}-{index:016x}{SNAP_SUFFIX}")
}

fn encode_header(meta: &SnapshotMeta) -> Vec<u8> {
    let mut h = Vec::with_capacity(FIXED_HEADER + meta.meta.len());
    h.extend_from_slice(SNAP_MAGIC);
    h.extend_from_slice(&SNAP_VERSION.to_le_bytes());
    h.extend_from_slice(&meta.index.to_le_bytes());
    h.extend_from_slice(&meta.term.to_le_bytes());
    h.extend_from_slice(&(meta.meta.len() as u32).to_le_bytes());
    h.extend_from_slice(&meta.meta);
    h
}

/// fsync, rename into place, fsync the directory: after this the snapshot survives a crash.
fn install(
    mut out: BufWriter<File>,
    tmp: &Path,
    dir: &Path,
    meta: &SnapshotMeta,
) -> Result<PathBuf> {
    out.flush()?;
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    let path = dir.join(final_name(meta.term, meta.index));
    fs::rename(tmp, &path)?;
    sync_dir(dir)?;
    Ok(path)
}

/// Drops buffered bytes without writing them and removes the temp file.
fn discard(out: Option<BufWriter<File>>, tmp: Option<PathBuf>) {
    if let Some(out) = out {
        drop(out.into_parts());
    }
    if let Some(tmp) = tmp {
        let _ = fs::remove_file(tmp);
    }
}

/// Streams a snapshot body to a temp file; [`SnapshotWriter::finish`] installs it. Dropping
/// an unfinished writer removes the temp file.
pub struct SnapshotWriter {
    dir: PathBuf,
    out: Option<BufWriter<File>>,
    tmp: Option<PathBuf>,
    meta: SnapshotMeta,
    crc: u32,
    header_len: u64,
    body_len: u64,
}

impl SnapshotWriter {
    /// Writes the trailer, fsyncs, renames into place and fsyncs the directory.
    pub fn finish(mut self) -> Result<SnapshotFile> {
        let (Some(mut out), Some(tmp)) = (self.out.take(), self.tmp.clone()) else {
            return Err(io::Error::other("snapshot writer already finished").into());
        };
        let body_len = self.body_len.to_le_bytes();
        let crc = crc32c::crc32c_append(self.crc, &body_len);
        out.write_all(&body_len)?;
        out.write_all(&crc.to_le_bytes())?;
        fail::fail_point!(crate::failpoints::SNAPSHOT_BEFORE_SAVE);
        let path = install(out, &tmp, &self.dir, &self.meta)?;
        fail::fail_point!(crate::failpoints::SNAPSHOT_AFTER_SAVE);
        self.tmp = None;
        Ok(SnapshotFile {
            meta: self.meta.clone(),
            path,
            len: self.header_len + self.body_len + TRAILER as u64,
            body_offset: self.header_len,
            body_len: self.body_len,
        })
    }
}

impl Write for SnapshotWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let out = self
            .out
            .as_mut()
            .ok_or_else(|| io::Error::other("snapshot writer already finished"))?;
        let n = out.write(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        self.body_len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.out.as_mut() {
            Some(out) => out.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        discard(self.out.take(), self.tmp.take());
    }
}

impl std::fmt::Debug for SnapshotWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotWriter")
            .field("meta", &self.meta)
            .field("tmp", &self.tmp)
            .field("body_len", &self.body_len)
            .finish_non_exhaustive()
    }
}

/// Receives a snapshot file's raw bytes from a peer. The stream is checked as it arrives
/// (a bad header fails the first write) and in full by [`ImportWriter::finish`], before
/// anything is renamed into place. Dropping it, or a failed finish, removes the temp file.
pub struct ImportWriter {
    dir: PathBuf,
    out: Option<BufWriter<File>>,
    tmp: Option<PathBuf>,
    verifier: Verifier,
    failed: Option<String>,
}

impl ImportWriter {
    /// Verifies the whole file (format, length, checksum), then installs it under the
    /// name its metadata gives. Bad data is an error and leaves nothing behind.
    pub fn finish(mut self) -> Result<SnapshotFile> {
        let (Some(out), Some(tmp)) = (self.out.take(), self.tmp.clone()) else {
            return Err(io::Error::other("import writer already finished").into());
        };
        let verdict = match self.failed.take() {
            Some(reason) => Err(reason),
            None => self.verifier.finish(),
        };
        let v = match verdict {
            Ok(v) => v,
            Err(reason) => {
                discard(Some(out), self.tmp.take());
                warn!(reason = %reason, "rejected imported snapshot");
                return Err(Error::CorruptSnapshot { path: tmp, reason });
            }
        };
        let path = install(out, &tmp, &self.dir, &v.meta)?;
        self.tmp = None;
        Ok(SnapshotFile {
            meta: v.meta,
            path,
            len: v.total,
            body_offset: v.header_len,
            body_len: v.body_len,
        })
    }
}

impl Write for ImportWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(reason) = &self.failed {
            return Err(io::Error::new(io::ErrorKind::InvalidData, reason.clone()));
        }
        let out = self
            .out
            .as_mut()
            .ok_or_else(|| io::Error::other("import writer already finished"))?;
        out.write_all(buf)?;
        if let Err(reason) = self.verifier.feed(buf) {
            self.failed = Some(reason.clone());
            return Err(io::Error::new(io::ErrorKind::InvalidData, reason));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.out.as_mut() {
            Some(out) => out.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for ImportWriter {
    fn drop(&mut self) {
        discard(self.out.take(), self.tmp.take());
    }
}

impl std::fmt::Debug for ImportWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImportWriter")
            .field("tmp", &self.tmp)
            .field("received", &self.verifier.total)
            .finish_non_exhaustive()
    }
}

/// A verified snapshot file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotFile {
    meta: SnapshotMeta,
    path: PathBuf,
    len: u64,
    body_offset: u64,
    body_len: u64,
}

impl SnapshotFile {
    pub fn meta(&self) -> &SnapshotMeta {
        &self.meta
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the whole file in bytes (what [`SnapshotFile::raw_reader`] yields).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Always false for a verified file (it has at least a header and a trailer).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Size of the body in bytes.
    pub fn body_len(&self) -> u64 {
        self.body_len
    }

    /// The body: the state machine's image as it was written to [`SnapshotWriter`].
    pub fn body_reader(&self) -> Result<Box<dyn Read + Send>> {
        let mut file = File::open(&self.path)?;
        file.seek(SeekFrom::Start(self.body_offset))?;
        Ok(Box::new(
            BufReader::with_capacity(IO_BUF, file).take(self.body_len),
        ))
    }

    /// The whole file, to send to a peer, which feeds it to [`SnapshotStore::import`].
    pub fn raw_reader(&self) -> Result<Box<dyn Read + Send>> {
        let file = File::open(&self.path)?;
        Ok(Box::new(
            BufReader::with_capacity(IO_BUF, file).take(self.len),
        ))
    }
}

struct Verified {
    meta: SnapshotMeta,
    header_len: u64,
    body_len: u64,
    total: u64,
}

/// Checks a snapshot file fed to it in order, in one pass and bounded memory, so files of
/// any size can be verified and imports can be checked as they stream in.
#[derive(Default)]
struct Verifier {
    /// Header bytes collected until the header is complete.
    head: Vec<u8>,
    header: Option<(SnapshotMeta, u64)>,
    crc: u32,
    /// The last (up to) `TRAILER` bytes seen, not yet hashed: the checksum covers
    /// everything but the final four bytes, and the end is only known at `finish`.
    held: Vec<u8>,
    total: u64,
}

impl Verifier {
    fn feed(&mut self, mut buf: &[u8]) -> std::result::Result<(), String> {
        self.total += buf.len() as u64;
        self.hash(buf);
        while self.header.is_none() && !buf.is_empty() {
            let target = if self.head.len() < FIXED_HEADER {
                FIXED_HEADER
            } else {
                FIXED_HEADER + u32_at(&self.head, 28) as usize
            };
            let take = (target - self.head.len()).min(buf.len());
            self.head.extend_from_slice(&buf[..take]);
            buf = &buf[take..];
            self.parse_header()?;
        }
        Ok(())
    }

    fn hash(&mut self, buf: &[u8]) {
        let total = self.held.len() + buf.len();
        if total <= TRAILER {
            self.held.extend_from_slice(buf);
            return;
        }
        let hash_now = total - TRAILER;
        let from_held = hash_now.min(self.held.len());
        self.crc = crc32c::crc32c_append(self.crc, &self.held[..from_held]);
        let from_buf = hash_now - from_held;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..from_buf]);
        self.held.drain(..from_held);
        self.held.extend_from_slice(&buf[from_buf..]);
    }

    fn parse_header(&mut self) -> std::result::Result<(), String> {
        let h = &self.head;
        if h.len() < FIXED_HEADER {
            return Ok(());
        }
        if &h[..8] != SNAP_MAGIC {
            return Err("not a snapshot file (bad magic)".to_string());
        }
        let version = u32_at(h, 8);
        if version != SNAP_VERSION {
            return Err(format!("unsupported snapshot version {version}"));
        }
        let meta_len = u32_at(h, 28) as usize;
        if meta_len > MAX_SNAPSHOT_META_LEN {
            return Err(format!("implausible metadata length {meta_len}"));
        }
        if h.len() == FIXED_HEADER + meta_len {
            let meta = SnapshotMeta {
                index: u64_at(h, 12),
                term: u64_at(h, 20),
                meta: h[FIXED_HEADER..].to_vec(),
            };
            self.header = Some((meta, h.len() as u64));
            self.head = Vec::new();
        }
        Ok(())
    }

    fn finish(&self) -> std::result::Result<Verified, String> {
        let Some((meta, header_len)) = &self.header else {
            return Err(format!(
                "truncated inside the header ({} bytes)",
                self.total
            ));
        };
        if self.total < header_len + TRAILER as u64 {
            return Err(format!("truncated: no trailer ({} bytes)", self.total));
        }
        let body_len = u64_at(&self.held, 0);
        let stored = u32_at(&self.held, 8);
        if crc32c::crc32c_append(self.crc, &self.held[..8]) != stored {
            return Err("checksum mismatch".to_string());
        }
        let actual = self.total - header_len - TRAILER as u64;
        if body_len != actual {
            return Err(format!(
                "trailer says the body is {body_len} bytes but it is {actual}"
            ));
        }
        Ok(Verified {
            meta: meta.clone(),
            header_len: *header_len,
            body_len,
            total: self.total,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(term: u64, index: u64) -> SnapshotMeta {
        SnapshotMeta {
            index,
            term,
            meta: format!("conf-{term}-{index}").into_bytes(),
        }
    }

    fn body(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    fn write_snapshot(store: &SnapshotStore, m: &SnapshotMeta, data: &[u8]) -> SnapshotFile {
        let mut w = store.create(m).unwrap();
        // Uneven pieces exercise the incremental checksum.
        for chunk in data.chunks(7777) {
            w.write_all(chunk).unwrap();
        }
        w.finish().unwrap()
    }

    fn read_all(mut r: impl Read) -> Vec<u8> {
        let mut v = Vec::new();
        r.read_to_end(&mut v).unwrap();
        v
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(&tmp.path().join("snap")).unwrap();
        assert!(store.latest().unwrap().is_none());
        let data = body(1, 100_000);
        let m = meta(3, 42);
        let written = write_snapshot(&store, &m, &data);
        assert_eq!(written.meta(), &m);
        assert_eq!(written.len(), fs::metadata(written.path()).unwrap().len());
        assert_eq!(names(store.dir()), vec![final_name(3, 42)]);

        let latest = store.latest().unwrap().unwrap();
        assert_eq!(latest, written);
        assert_eq!(read_all(latest.body_reader().unwrap()), data);
        assert_eq!(
            read_all(latest.raw_reader().unwrap()),
            fs::read(latest.path()).unwrap()
        );
        assert_eq!(store.open_file(latest.path()).unwrap(), written);
    }

    #[test]
    fn empty_body_and_meta() {
        let tmp = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(tmp.path()).unwrap();
        let m = SnapshotMeta {
            index: 1,
            term: 1,
            meta: vec![],
        };
        let f = store.create(&m).unwrap().finish().unwrap();
        assert_eq!(f.body_len(), 0);
        let latest = store.latest().unwrap().unwrap();
        assert_eq!(latest.meta(), &m);
        assert!(read_all(latest.body_reader().unwrap()).is_empty());
    }

    #[test]
    fn flipped_byte_fails_open_and_latest_falls_back() {
        let tmp = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(tmp.path()).unwrap();
        let old_data = body(2, 5000);
        let old = write_snapshot(&store, &meta(1, 10), &old_data);
        let new = write_snapshot(&store, &meta(1, 20), &body(3, 5000));

        let mut bytes = fs::read(new.path()).unwrap();
        bytes[2500] ^= 0x01;
        fs::write(new.path(), &bytes).unwrap();
        assert!(matches!(
            store.open_file(new.path()),
            Err(Error::CorruptSnapshot { .. })
        ));

        let latest = store.latest().unwrap().unwrap();
        assert_eq!(latest, old);
        assert_eq!(read_all(latest.body_reader().unwrap()), old_data);
        assert!(!new.path().exists());
        assert_eq!(
            names(tmp.path()),
            vec![
                final_name(1, 10),
                format!("{}{BROKEN_SUFFIX}", final_name(1, 20))
            ]
        );
    }

    #[test]
    fn import_round_trip_between_stores() {
        let tmp = tempfile::tempdir().unwrap();
        let a = SnapshotStore::open(&tmp.path().join("a")).unwrap();
        let b = SnapshotStore::open(&tmp.path().join("b")).unwrap();
        let data = body(4, 300_000);
        let sent = write_snapshot(&a, &meta(5, 900), &data);

        let mut import = b.import().unwrap();
        let mut raw = sent.raw_reader().unwrap();
        let mut chunk = vec![0u8; 4099];
        loop {
            let n = raw.read(&mut chunk).unwrap();
            if n == 0 {
                break;
            }
            import.write_all(&chunk[..n]).unwrap();
        }
        let got = import.finish().unwrap();
        assert_eq!(got.meta(), sent.meta());
        assert_eq!(got.len(), sent.len());
        assert_eq!(read_all(got.body_reader().unwrap()), data);
        assert_eq!(b.latest().unwrap().unwrap(), got);
        assert_eq!(names(b.dir()), vec![final_name(5, 900)]);
    }

    #[test]
    fn bad_imports_install_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let a = SnapshotStore::open(&tmp.path().join("a")).unwrap();
        let b = SnapshotStore::open(&tmp.path().join("b")).unwrap();
        let sent = write_snapshot(&a, &meta(2, 7), &body(5, 20_000));
        let raw = fs::read(sent.path()).unwrap();

        let mut flipped = raw.clone();
        flipped[10_000] ^= 0x80;
        let mut bad_trailer = raw.clone();
        let last = bad_trailer.len() - 1;
        bad_trailer[last] ^= 0x01;
        let mut extra = raw.clone();
        extra.extend_from_slice(b"more");
        let cases: Vec<(&str, &[u8])> = vec![
            ("flipped body byte", &flipped),
            ("flipped crc byte", &bad_trailer),
            ("truncated trailer", &raw[..raw.len() - 5]),
            ("truncated body", &raw[..raw.len() / 2]),
            ("truncated header", &raw[..20]),
            ("trailing bytes", &extra),
            ("empty", &[]),
        ];
        for (what, bytes) in cases {
            let mut import = b.import().unwrap();
            import.write_all(bytes).unwrap();
            let err = import.finish().unwrap_err();
            assert!(
                matches!(err, Error::CorruptSnapshot { .. }),
                "{what}: {err:?}"
            );
            assert!(names(b.dir()).is_empty(), "{what}: {:?}", names(b.dir()));
        }

        // A wrong magic is refused on the first write.
        let mut import = b.import().unwrap();
        let mut not_snap = raw.clone();
        not_snap[0] = b'X';
        let err = import.write_all(&not_snap).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(import.finish().is_err());
        assert!(names(b.dir()).is_empty());
        assert!(b.latest().unwrap().is_none());
    }

    #[test]
    fn purge_keeps_newest() {
        let tmp = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(tmp.path()).unwrap();
        for (term, index) in [(1, 10), (1, 20), (2, 30), (2, 40)] {
            write_snapshot(&store, &meta(term, index), &body(6, 100));
        }
        assert_eq!(store.purge(2).unwrap(), 2);
        assert_eq!(
            names(tmp.path()),
            vec![final_name(2, 30), final_name(2, 40)]
        );
        assert_eq!(store.purge(5).unwrap(), 0);
        assert_eq!(store.latest().unwrap().unwrap().meta(), &meta(2, 40));
    }

    #[test]
    fn leftover_and_abandoned_temp_files_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let store = SnapshotStore::open(tmp.path()).unwrap();
            write_snapshot(&store, &meta(1, 5), &body(7, 10));
            let mut w = store.create(&meta(1, 6)).unwrap();
            w.write_all(b"partial body").unwrap();
            assert_eq!(names(tmp.path()).len(), 2);
            drop(w);
            assert_eq!(names(tmp.path()), vec![final_name(1, 5)]);
        }
        let leftover = tmp.path().join(format!("{}.123-0.tmp", final_name(1, 9)));
        fs::write(&leftover, b"crashed mid-write").unwrap();
        let store = SnapshotStore::open(tmp.path()).unwrap();
        assert!(!leftover.exists());
        assert_eq!(store.latest().unwrap().unwrap().meta(), &meta(1, 5));
    }
}
