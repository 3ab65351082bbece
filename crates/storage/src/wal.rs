//! The Raft write-ahead log.
//!
//! A WAL is a directory of segment files named `{seq:016x}-{first_index:016x}.wal`, so that
//! lexical order is write order. Every segment is a sequence of records
//!
//! ```text
//! [len u32 LE][crc32c u32 LE over type+payload][type u8][payload: len bytes]
//! ```
//!
//! and starts with a preamble written atomically (temp file, fsync, rename): a segment
//! header record, then the latest snapshot mark (if any) and hard state, so deleting older
//! segments never loses them. Payloads (all integers LE):
//!
//! - segment header: magic `CNCDWAL\0`, version u32, seq u64, first_index u64, number of
//!   preamble records after the header u32;
//! - entry: index u64, term u64, data length u32, data;
//! - hard state: term u64, vote u64, commit u64;
//! - snapshot mark: index u64, term u64, meta length u32, meta.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use tracing::{debug, error, warn};

use crate::fsutil::{ensure_dir, parse_pair_name, remove_with_suffix, sync_dir, u32_at, u64_at};
use crate::{Error, Result};

/// Largest record payload accepted. Bounds allocations while reading a damaged file and
/// lets the torn-tail scan reject most garbage without hashing it.
pub const MAX_RECORD_LEN: u32 = 128 << 20;

const WAL_MAGIC: &[u8; 8] = b"CNCDWAL\0";
const WAL_VERSION: u32 = 1;
const SEGMENT_SUFFIX: &str = ".wal";
const TMP_SUFFIX: &str = ".wal.tmp";

const RECORD_HEADER: usize = 9;
const KEEP_BUF: usize = 8 << 20;
const T_SEGMENT: u8 = 1;
const T_ENTRY: u8 = 2;
const T_HARD_STATE: u8 = 3;
const T_MARK: u8 = 4;
const SEGMENT_PAYLOAD: usize = 32;
const HARD_STATE_PAYLOAD: usize = 24;
/// index + term + length prefix, shared by entries and snapshot marks.
const INDEXED_FIXED: usize = 20;

/// One Raft log entry; `data` is the caller's encoding of the whole entry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Entry {
    pub index: u64,
    pub term: u64,
    pub data: Vec<u8>,
}

/// Raft's hard state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HardState {
    pub term: u64,
    pub vote: u64,
    pub commit: u64,
}

/// Records that the log up to `index` is covered by a snapshot; `meta` is opaque (the
/// consensus crate keeps the Raft ConfState there).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SnapshotMark {
    pub index: u64,
    pub term: u64,
    pub meta: Vec<u8>,
}

/// How [`Wal::open`] treats a damaged tail of the last segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecoveryMode {
    /// A bad record at the end of the last segment with nothing valid after it is what a
    /// crash in the middle of an append leaves behind: it was never acknowledged, so it is
    /// cut off (and reported in [`Recovered::truncated_bytes`]).
    #[default]
    TolerateTornTail,
    /// Any damage, a torn tail included, is an error and the files are left untouched.
    Strict,
}

/// Options of [`Wal::open`].
#[derive(Debug, Clone)]
pub struct WalOptions {
    /// A new segment is started once the active one grows beyond this many bytes.
    pub segment_bytes: u64,
    pub recovery: RecoveryMode,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            segment_bytes: 64 << 20,
            recovery: RecoveryMode::TolerateTornTail,
        }
    }
}

/// What [`Wal::open`] found on disk.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Recovered {
    /// The latest snapshot mark recorded, if any.
    pub snapshot: Option<SnapshotMark>,
    /// The latest hard state recorded (zeros if never).
    pub hard_state: HardState,
    /// The live log: contiguous, overwrites resolved, all above `snapshot.index`.
    pub entries: Vec<Entry>,
    /// Bytes of torn tail cut off by recovery (0 if the log was clean).
    pub truncated_bytes: u64,
}

struct Segment {
    seq: u64,
    path: PathBuf,
    /// Highest entry index written to this segment, which decides when it may be released.
    max_entry: Option<u64>,
}

/// The write-ahead log. See the [module docs](self) for the file format.
pub struct Wal {
    dir: PathBuf,
    opts: WalOptions,
    /// Oldest first; the last one is the active segment.
    segments: Vec<Segment>,
    active: File,
    active_len: u64,
    /// How much of the active segment the last fsync covered.
    synced_len: u64,
    first_entry: Option<u64>,
    last_entry: Option<u64>,
    snapshot: Option<SnapshotMark>,
    hard_state: HardState,
    buf: Vec<u8>,
    poison: Option<String>,
    /// Test hook: `Some(n)` makes the fsync after the next `n` successful ones fail.
    fail_sync_in: Option<u32>,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("dir", &self.dir)
            .field("segments", &self.segments.len())
            .field("last_index", &self.last_index())
            .field("poison", &self.poison)
            .finish_non_exhaustive()
    }
}

impl Wal {
    /// Opens (creating if needed) the WAL in `dir` and replays it.
    pub fn open(dir: &Path, opts: WalOptions) -> Result<(Wal, Recovered)> {
        ensure_dir(dir)?;
        // A segment is only valid once renamed into place; temp files are interrupted
        // rotations and hold nothing that is not also in the previous segment.
        remove_with_suffix(dir, TMP_SUFFIX)?;
        let files = list_segments(dir)?;
        for pair in files.windows(2) {
            if pair[1].0 != pair[0].0 + 1 {
                return Err(Error::Corrupt {
                    segment: pair[1].1.clone(),
                    offset: 0,
                    reason: format!(
                        "segment sequence jumps from {} to {}: a segment is missing",
                        pair[0].0, pair[1].0
                    ),
                });
            }
        }

        let mut replay = Replay::default();
        let mut segments = Vec::with_capacity(files.len());
        let mut truncated_bytes = 0;
        for (i, (seq, path)) in files.iter().enumerate() {
            let is_last = i + 1 == files.len();
            let scan = read_segment(path, *seq, is_last, opts.recovery, &mut replay)?;
            truncated_bytes += scan.truncated;
            segments.push(Segment {
                seq: *seq,
                path: path.clone(),
                max_entry: scan.max_entry,
            });
        }
        replay.check_after_snapshot(dir)?;

        let first_entry = replay.entries.first().map(|e| e.index);
        let last_entry = replay.entries.last().map(|e| e.index);
        let (active, active_len) = match segments.last() {
            Some(seg) => {
                let mut file = OpenOptions::new().write(true).open(&seg.path)?;
                let len = file.seek(SeekFrom::End(0))?;
                (file, len)
            }
            None => {
                let first_index = last_entry
                    .unwrap_or(0)
                    .max(replay.snapshot.as_ref().map_or(0, |s| s.index))
                    + 1;
                let mut never = None;
                let (file, path, len) = create_segment(
                    dir,
                    0,
                    first_index,
                    replay.snapshot.as_ref(),
                    &replay.hard_state,
                    &mut never,
                )?;
                segments.push(Segment {
                    seq: 0,
                    path,
                    max_entry: None,
                });
                (file, len)
            }
        };

        let wal = Wal {
            dir: dir.to_path_buf(),
            opts,
            segments,
            active,
            active_len,
            synced_len: active_len,
            first_entry,
            last_entry,
            snapshot: replay.snapshot.clone(),
            hard_state: replay.hard_state,
            buf: Vec::new(),
            poison: None,
            fail_sync_in: None,
        };
        let recovered = Recovered {
            snapshot: replay.snapshot,
            hard_state: replay.hard_state,
            entries: replay.entries,
            truncated_bytes,
        };
        Ok((wal, recovered))
    }

    /// Appends `entries` (overwriting any suffix from the first entry's index on) and the
    /// hard state, with a single fsync for the whole batch. A no-op if both are empty.
    pub fn append(&mut self, entries: &[Entry], hard_state: Option<&HardState>) -> Result<()> {
        self.check_poison()?;
        if entries.is_empty() && hard_state.is_none() {
            return Ok(());
        }
        let (first, last) = self.validate(entries)?;
        fail::fail_point!(crate::failpoints::WAL_BEFORE_APPEND);

        self.buf.clear();
        for e in entries {
            encode_entry(&mut self.buf, e);
        }
        if let Some(hs) = hard_state {
            encode_hard_state(&mut self.buf, hs);
        }
        self.persist_buf()?;
        fail::fail_point!(crate::failpoints::WAL_AFTER_FSYNC);

        if let Some(max) = entries.iter().map(|e| e.index).max() {
            let seg = self
                .segments
                .last_mut()
                .expect("there is always an active segment");
            seg.max_entry = Some(seg.max_entry.map_or(max, |m| m.max(max)));
        }
        self.first_entry = first;
        self.last_entry = last;
        if let Some(hs) = hard_state {
            self.hard_state = *hs;
        }
        self.maybe_rotate()
    }

    /// Records that the log up to `mark.index` is covered by a snapshot (record + fsync).
    /// Entries at or below the mark are dropped from the live log.
    pub fn mark_snapshot(&mut self, mark: &SnapshotMark) -> Result<()> {
        self.check_poison()?;
        check_len(INDEXED_FIXED + mark.meta.len())?;
        let (first, last) = match (self.first_entry, self.last_entry) {
            (Some(_), Some(last)) if last <= mark.index => (None, None),
            (Some(first), Some(last)) if first > mark.index + 1 => {
                return Err(Error::InvalidAppend(format!(
                    "snapshot mark at {} would leave a hole before the log's first entry {first} (last {last})",
                    mark.index
                )));
            }
            (first, last) => (first.map(|f| f.max(mark.index + 1)), last),
        };

        self.buf.clear();
        encode_mark(&mut self.buf, mark);
        self.persist_buf()?;

        self.first_entry = first;
        self.last_entry = last;
        self.snapshot = Some(mark.clone());
        self.maybe_rotate()
    }

    /// Deletes whole segments, oldest first, whose entries all have an index at or below
    /// `index`, never the active segment. `index` is capped at the latest snapshot mark,
    /// because releasing entries the mark does not cover would leave a hole in the log.
    /// Returns how many segments were removed.
    pub fn release_to(&mut self, index: u64) -> Result<usize> {
        self.check_poison()?;
        let limit = self.snapshot.as_ref().map_or(index, |s| s.index.min(index));
        let mut removed = 0;
        let mut failure = None;
        // Only a prefix may go: replaying a later segment without an earlier one could
        // resurrect entries that the removed segment had overwritten.
        while self.segments.len() > 1 {
            let seg = &self.segments[0];
            if seg.max_entry.is_some_and(|m| m > limit) {
                break;
            }
            if let Err(e) = fs::remove_file(&seg.path) {
                failure = Some(e);
                break;
            }
            debug!(segment = %seg.path.display(), "released WAL segment");
            self.segments.remove(0);
            removed += 1;
        }
        if removed > 0
            && let Err(e) = sync_dir(&self.dir)
        {
            return Err(self.poisoned_by("directory fsync after release", e));
        }
        match failure {
            Some(e) => Err(e.into()),
            None => Ok(removed),
        }
    }

    /// Index of the last entry written, or of the snapshot mark if that is later (0 if
    /// neither exists).
    pub fn last_index(&self) -> u64 {
        self.last_entry
            .unwrap_or(0)
            .max(self.snapshot.as_ref().map_or(0, |s| s.index))
    }

    /// True once a write or fsync has failed; every mutating call then returns
    /// [`Error::Poisoned`].
    pub fn is_poisoned(&self) -> bool {
        self.poison.is_some()
    }

    /// Why the WAL was poisoned (the failed operation and its I/O error), if it was.
    pub fn poison_cause(&self) -> Option<&str> {
        self.poison.as_deref()
    }

    /// The latest hard state written.
    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// The latest snapshot mark written.
    pub fn snapshot_mark(&self) -> Option<&SnapshotMark> {
        self.snapshot.as_ref()
    }

    /// Number of segment files, the active one included.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// The WAL's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Simulates a power cut for in-process crash tests: cuts the active segment back
    /// to what its last fsync covered (segments before it were fsynced whole) and
    /// returns how many bytes were lost. The WAL must not be used afterwards; reopen it.
    #[doc(hidden)]
    pub fn lose_unsynced(&mut self) -> Result<u64> {
        let lost = self.active_len.saturating_sub(self.synced_len);
        if lost > 0 {
            self.active.set_len(self.synced_len)?;
            self.active.sync_all()?;
        }
        self.poison = Some("crashed".into());
        Ok(lost)
    }

    /// Test hook: the next fsync fails as if the disk had reported an error.
    #[doc(hidden)]
    pub fn inject_sync_failure(&mut self) {
        self.fail_sync_in = Some(0);
    }

    fn check_poison(&self) -> Result<()> {
        if self.poison.is_some() {
            Err(Error::Poisoned)
        } else {
            Ok(())
        }
    }

    /// After a failed write or fsync the page cache and the disk may disagree in ways the
    /// kernel no longer reports, so retrying could acknowledge lost data: stop for good.
    fn poisoned_by(&mut self, what: &str, err: io::Error) -> Error {
        error!(dir = %self.dir.display(), error = %err, "WAL {what} failed; WAL poisoned");
        self.poison = Some(format!("{what} failed: {err}"));
        Error::Poisoned
    }

    /// Checks the batch against the live log before anything is written, and returns the
    /// live log's first and last index after it.
    fn validate(&self, entries: &[Entry]) -> Result<(Option<u64>, Option<u64>)> {
        let snap = self.snapshot.as_ref().map(|s| s.index);
        let mut first = self.first_entry;
        let mut last = self.last_entry;
        for e in entries {
            check_len(INDEXED_FIXED + e.data.len())?;
            if let Some(s) = snap
                && e.index <= s
            {
                return Err(Error::InvalidAppend(format!(
                    "entry {} is at or below the snapshot mark {s}",
                    e.index
                )));
            }
            let expected = last.or(snap).map(|i| i + 1);
            if let Some(expected) = expected
                && e.index > expected
            {
                return Err(Error::InvalidAppend(format!(
                    "entry {} leaves a gap after index {}",
                    e.index,
                    expected - 1
                )));
            }
            if first.is_none_or(|f| e.index <= f) {
                first = Some(e.index);
            }
            last = Some(e.index);
        }
        Ok((first, last))
    }

    fn persist_buf(&mut self) -> Result<()> {
        if let Err(e) = self.active.write_all(&self.buf) {
            return Err(self.poisoned_by("write", e));
        }
        self.active_len += self.buf.len() as u64;
        ::metrics::gauge!(crate::metrics::WAL_WRITE_BYTES).increment(self.buf.len() as f64);
        if self.buf.capacity() > KEEP_BUF {
            // One huge batch should not pin its memory for the life of the node.
            self.buf = Vec::new();
        }
        fail::fail_point!(crate::failpoints::WAL_BEFORE_FSYNC);
        if crate::failpoints::planted(crate::failpoints::BUG_ACK_BEFORE_FSYNC) {
            return Ok(());
        }
        let started = Instant::now();
        let synced = take_injected(&mut self.fail_sync_in).and_then(|()| self.active.sync_data());
        ::metrics::histogram!(crate::metrics::WAL_FSYNC_SECONDS)
            .record(started.elapsed().as_secs_f64());
        if let Err(e) = synced {
            return Err(self.poisoned_by("fsync", e));
        }
        self.synced_len = self.active_len;
        Ok(())
    }

    fn maybe_rotate(&mut self) -> Result<()> {
        if self.active_len <= self.opts.segment_bytes {
            return Ok(());
        }
        let seq = self.segments.last().map_or(0, |s| s.seq + 1);
        let created = create_segment(
            &self.dir,
            seq,
            self.last_index() + 1,
            self.snapshot.as_ref(),
            &self.hard_state,
            &mut self.fail_sync_in,
        );
        match created {
            Ok((file, path, len)) => {
                debug!(segment = %path.display(), "started WAL segment");
                self.active = file;
                self.active_len = len;
                self.synced_len = len;
                self.segments.push(Segment {
                    seq,
                    path,
                    max_entry: None,
                });
                Ok(())
            }
            Err(e) => Err(self.poisoned_by("segment rotation", e)),
        }
    }
}

fn take_injected(countdown: &mut Option<u32>) -> io::Result<()> {
    match *countdown {
        None => Ok(()),
        Some(0) => {
            *countdown = None;
            Err(io::Error::other("injected fsync failure"))
        }
        Some(n) => {
            *countdown = Some(n - 1);
            Ok(())
        }
    }
}

fn check_len(payload: usize) -> Result<()> {
    if payload > MAX_RECORD_LEN as usize {
        return Err(Error::TooLarge {
            len: payload as u64,
            max: u64::from(MAX_RECORD_LEN),
        });
    }
    Ok(())
}

fn segment_name(seq: u64, first_index: u64) -> String {
    format!("{seq:016x}-{first_index:016x}{SEGMENT_SUFFIX}")
}

fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.ends_with(SEGMENT_SUFFIX) {
            continue;
        }
        match parse_pair_name(name, SEGMENT_SUFFIX) {
            Some((seq, _first)) => out.push((seq, entry.path())),
            None => warn!(
                file = name,
                "ignoring file with a .wal suffix but not a segment name"
            ),
        }
    }
    out.sort();
    Ok(out)
}

/// Writes a new segment's preamble to a temp file, fsyncs it and renames it into place, so
/// a segment either exists with its whole preamble or not at all.
fn create_segment(
    dir: &Path,
    seq: u64,
    first_index: u64,
    mark: Option<&SnapshotMark>,
    hs: &HardState,
    fail_sync_in: &mut Option<u32>,
) -> io::Result<(File, PathBuf, u64)> {
    let path = dir.join(segment_name(seq, first_index));
    let tmp = dir.join(format!("{}.tmp", segment_name(seq, first_index)));
    let mut buf = Vec::new();
    let carried = 1 + u32::from(mark.is_some());
    encode_segment_header(&mut buf, seq, first_index, carried);
    if let Some(mark) = mark {
        encode_mark(&mut buf, mark);
    }
    encode_hard_state(&mut buf, hs);

    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        file.write_all(&buf)?;
        take_injected(fail_sync_in)?;
        file.sync_all()?;
        fs::rename(&tmp, &path)?;
        sync_dir(dir)?;
        Ok(file)
    })();
    match result {
        Ok(file) => Ok((file, path, buf.len() as u64)),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn begin_record(buf: &mut Vec<u8>, kind: u8) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; 8]);
    buf.push(kind);
    start
}

fn end_record(buf: &mut [u8], start: usize) {
    let payload_len = buf.len() - start - RECORD_HEADER;
    let crc = crc32c::crc32c(&buf[start + 8..]);
    buf[start..start + 4].copy_from_slice(&(payload_len as u32).to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn encode_segment_header(buf: &mut Vec<u8>, seq: u64, first_index: u64, carried: u32) {
    let start = begin_record(buf, T_SEGMENT);
    buf.extend_from_slice(WAL_MAGIC);
    buf.extend_from_slice(&WAL_VERSION.to_le_bytes());
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&first_index.to_le_bytes());
    buf.extend_from_slice(&carried.to_le_bytes());
    end_record(buf, start);
}

fn encode_indexed(buf: &mut Vec<u8>, kind: u8, index: u64, term: u64, bytes: &[u8]) {
    let start = begin_record(buf, kind);
    buf.extend_from_slice(&index.to_le_bytes());
    buf.extend_from_slice(&term.to_le_bytes());
    buf.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    buf.extend_from_slice(bytes);
    end_record(buf, start);
}

fn encode_entry(buf: &mut Vec<u8>, e: &Entry) {
    encode_indexed(buf, T_ENTRY, e.index, e.term, &e.data);
}

fn encode_mark(buf: &mut Vec<u8>, m: &SnapshotMark) {
    encode_indexed(buf, T_MARK, m.index, m.term, &m.meta);
}

fn encode_hard_state(buf: &mut Vec<u8>, hs: &HardState) {
    let start = begin_record(buf, T_HARD_STATE);
    buf.extend_from_slice(&hs.term.to_le_bytes());
    buf.extend_from_slice(&hs.vote.to_le_bytes());
    buf.extend_from_slice(&hs.commit.to_le_bytes());
    end_record(buf, start);
}

struct SegmentHeader {
    version: u32,
    seq: u64,
    carried: u32,
}

enum Record {
    Segment(SegmentHeader),
    Entry(Entry),
    HardState(HardState),
    Mark(SnapshotMark),
}

/// Decodes a payload whose checksum already matched; failing here means a writer bug or an
/// incompatible format, never a torn write.
fn decode(kind: u8, p: &[u8]) -> std::result::Result<Record, String> {
    let indexed = |p: &[u8]| -> std::result::Result<(u64, u64, Vec<u8>), String> {
        if p.len() < INDEXED_FIXED || u32_at(p, 16) as usize != p.len() - INDEXED_FIXED {
            return Err(format!(
                "malformed record of type {kind} ({} bytes)",
                p.len()
            ));
        }
        Ok((u64_at(p, 0), u64_at(p, 8), p[INDEXED_FIXED..].to_vec()))
    };
    match kind {
        T_SEGMENT => {
            if p.len() != SEGMENT_PAYLOAD || &p[..8] != WAL_MAGIC {
                return Err("malformed segment header".to_string());
            }
            Ok(Record::Segment(SegmentHeader {
                version: u32_at(p, 8),
                seq: u64_at(p, 12),
                carried: u32_at(p, 28),
            }))
        }
        T_ENTRY => {
            let (index, term, data) = indexed(p)?;
            if index == u64::MAX {
                // Raft never gets there, and nothing could follow it.
                return Err(format!("entry index {index} is out of range"));
            }
            Ok(Record::Entry(Entry { index, term, data }))
        }
        T_HARD_STATE => {
            if p.len() != HARD_STATE_PAYLOAD {
                return Err("malformed hard state record".to_string());
            }
            Ok(Record::HardState(HardState {
                term: u64_at(p, 0),
                vote: u64_at(p, 8),
                commit: u64_at(p, 16),
            }))
        }
        T_MARK => {
            let (index, term, meta) = indexed(p)?;
            if index == u64::MAX {
                return Err(format!("snapshot mark index {index} is out of range"));
            }
            Ok(Record::Mark(SnapshotMark { index, term, meta }))
        }
        other => Err(format!("unknown record type {other}")),
    }
}

/// Cheap structural test on a record header plus the start of its payload. A torn tail is
/// garbage; this filter means the forward scan hashes almost nothing but real records.
/// `window` holds at least `min(RECORD_HEADER + 28, remaining)` bytes.
fn plausible(window: &[u8], remaining: u64) -> Option<u32> {
    if window.len() < RECORD_HEADER {
        return None;
    }
    let len = u32_at(window, 0);
    if len > MAX_RECORD_LEN || RECORD_HEADER as u64 + u64::from(len) > remaining {
        return None;
    }
    let p = &window[RECORD_HEADER..];
    let ok = match window[8] {
        T_SEGMENT => len as usize == SEGMENT_PAYLOAD && p.len() >= 8 && &p[..8] == WAL_MAGIC,
        T_HARD_STATE => len as usize == HARD_STATE_PAYLOAD,
        T_ENTRY | T_MARK => {
            len as usize >= INDEXED_FIXED
                && p.len() >= INDEXED_FIXED
                && u32_at(p, 16) == len - INDEXED_FIXED as u32
        }
        _ => false,
    };
    ok.then_some(len)
}

fn crc_matches_at(file: &mut File, pos: u64, len: u32) -> io::Result<bool> {
    file.seek(SeekFrom::Start(pos))?;
    let mut header = [0u8; RECORD_HEADER];
    file.read_exact(&mut header)?;
    let stored = u32_at(&header, 4);
    let mut crc = crc32c::crc32c(&header[8..9]);
    let mut left = len as usize;
    let mut chunk = vec![0u8; left.min(64 << 10)];
    while left > 0 {
        let n = left.min(chunk.len());
        file.read_exact(&mut chunk[..n])?;
        crc = crc32c::crc32c_append(crc, &chunk[..n]);
        left -= n;
    }
    Ok(crc == stored)
}

/// Scans forward byte by byte from `from` for any offset holding a valid record. The scan
/// reads the file in windows and is linear in the bytes left, so it is bounded by the
/// segment size; only structurally plausible candidates are checksummed.
fn find_valid_record(file: &mut File, from: u64, file_len: u64) -> io::Result<Option<u64>> {
    const WINDOW: usize = 1 << 20;
    const PEEK: u64 = RECORD_HEADER as u64 + 28;
    let mut buf = Vec::new();
    let mut base = from;
    let mut pos = from;
    while pos + RECORD_HEADER as u64 <= file_len {
        let need_end = (pos + PEEK).min(file_len);
        if need_end > base + buf.len() as u64 {
            base = pos;
            let n = (file_len - pos).min(WINDOW as u64) as usize;
            buf.resize(n, 0);
            file.seek(SeekFrom::Start(pos))?;
            file.read_exact(&mut buf)?;
        }
        let window = &buf[(pos - base) as usize..(need_end - base) as usize];
        if let Some(len) = plausible(window, file_len - pos)
            && crc_matches_at(file, pos, len)?
        {
            return Ok(Some(pos));
        }
        pos += 1;
    }
    Ok(None)
}

enum RecordRead {
    Eof,
    Bad(String),
    Record { kind: u8, size: u64 },
}

fn read_record(
    r: &mut impl Read,
    off: u64,
    file_len: u64,
    payload: &mut Vec<u8>,
) -> io::Result<RecordRead> {
    let remaining = file_len - off;
    if remaining == 0 {
        return Ok(RecordRead::Eof);
    }
    if remaining < RECORD_HEADER as u64 {
        return Ok(RecordRead::Bad(format!(
            "short record header ({remaining} bytes)"
        )));
    }
    let mut header = [0u8; RECORD_HEADER];
    r.read_exact(&mut header)?;
    let len = u32_at(&header, 0);
    let stored = u32_at(&header, 4);
    let kind = header[8];
    if len > MAX_RECORD_LEN {
        return Ok(RecordRead::Bad(format!("implausible record length {len}")));
    }
    if RECORD_HEADER as u64 + u64::from(len) > remaining {
        return Ok(RecordRead::Bad(format!(
            "record length {len} runs past the end of the file"
        )));
    }
    payload.resize(len as usize, 0);
    r.read_exact(payload)?;
    let crc = crc32c::crc32c_append(crc32c::crc32c(&[kind]), payload);
    if crc != stored {
        return Ok(RecordRead::Bad("checksum mismatch".to_string()));
    }
    if !(T_SEGMENT..=T_MARK).contains(&kind) {
        return Ok(RecordRead::Bad(format!("unknown record type {kind}")));
    }
    Ok(RecordRead::Record {
        kind,
        size: RECORD_HEADER as u64 + u64::from(len),
    })
}

/// Replays records in write order with Raft's semantics.
#[derive(Default)]
struct Replay {
    snapshot: Option<SnapshotMark>,
    hard_state: HardState,
    entries: Vec<Entry>,
}

impl Replay {
    fn entry(&mut self, e: Entry) -> std::result::Result<(), String> {
        // With no live entries (log start, or everything covered by a mark) the log may
        // resume anywhere: released segments and carried marks make that legitimate, and
        // `check_after_snapshot` catches a real hole at the end.
        if let Some(last) = self.entries.last()
            && e.index > last.index + 1
        {
            return Err(format!(
                "gap in the log: entry {} follows entry {}",
                e.index, last.index
            ));
        }
        let keep = self.entries.partition_point(|x| x.index < e.index);
        self.entries.truncate(keep);
        if self.snapshot.as_ref().is_some_and(|s| e.index <= s.index) {
            return Ok(());
        }
        self.entries.push(e);
        Ok(())
    }

    fn mark(&mut self, m: SnapshotMark) {
        let covered = self.entries.partition_point(|x| x.index <= m.index);
        self.entries.drain(..covered);
        self.snapshot = Some(m);
    }

    /// The live log starts right after the snapshot mark, or at index 1 if there is
    /// none: segments are only released up to a mark, and every later segment carries
    /// it, so a log without one that starts later has lost its first segment.
    fn check_after_snapshot(&self, dir: &Path) -> Result<()> {
        let Some(first) = self.entries.first() else {
            return Ok(());
        };
        let reason = match &self.snapshot {
            // Mark indexes are below u64::MAX (`decode`).
            Some(s) if first.index != s.index + 1 => format!(
                "gap in the log: entries resume at {} after the snapshot mark at {}",
                first.index, s.index
            ),
            None if first.index != 1 => format!(
                "the log starts at entry {} with no snapshot mark before it: a segment is missing",
                first.index
            ),
            _ => return Ok(()),
        };
        Err(Error::Corrupt {
            segment: dir.to_path_buf(),
            offset: 0,
            reason,
        })
    }
}

struct SegmentScan {
    max_entry: Option<u64>,
    truncated: u64,
}

fn read_segment(
    path: &Path,
    seq: u64,
    is_last: bool,
    mode: RecoveryMode,
    replay: &mut Replay,
) -> Result<SegmentScan> {
    let corrupt = |offset: u64, reason: String| Error::Corrupt {
        segment: path.to_path_buf(),
        offset,
        reason,
    };
    let file = File::open(path)?;
    let file_len = file.metadata()?.len();
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let mut payload = Vec::new();
    let mut off = 0u64;
    let mut records = 0u64;
    // Records of the preamble (header included) were fsynced before the segment got its
    // name, so damage there is never a torn append.
    let mut preamble = 1u64;
    let mut max_entry: Option<u64> = None;
    loop {
        match read_record(&mut reader, off, file_len, &mut payload)? {
            RecordRead::Eof => {
                if records < preamble {
                    return Err(corrupt(off, "segment ends inside its preamble".into()));
                }
                return Ok(SegmentScan {
                    max_entry,
                    truncated: 0,
                });
            }
            RecordRead::Bad(reason) => {
                if records < preamble {
                    return Err(corrupt(off, format!("{reason} in the segment preamble")));
                }
                if !is_last {
                    return Err(corrupt(
                        off,
                        format!("{reason} in a segment that is not the last"),
                    ));
                }
                if let Some(next) = find_valid_record(reader.get_mut(), off + 1, file_len)? {
                    return Err(corrupt(
                        off,
                        format!("{reason}, followed by a valid record at offset {next}"),
                    ));
                }
                let bytes = file_len - off;
                if mode == RecoveryMode::Strict {
                    return Err(Error::TornTail {
                        segment: path.to_path_buf(),
                        offset: off,
                        bytes,
                    });
                }
                let file = OpenOptions::new().write(true).open(path)?;
                file.set_len(off)?;
                file.sync_all()?;
                warn!(
                    segment = %path.display(),
                    offset = off,
                    bytes,
                    reason = %reason,
                    "truncated torn tail of the WAL"
                );
                return Ok(SegmentScan {
                    max_entry,
                    truncated: bytes,
                });
            }
            RecordRead::Record { kind, size } => {
                let record = decode(kind, &payload).map_err(|r| corrupt(off, r))?;
                match record {
                    Record::Segment(h) if records == 0 => {
                        if h.version != WAL_VERSION {
                            return Err(corrupt(
                                off,
                                format!("unsupported WAL version {}", h.version),
                            ));
                        }
                        if h.seq != seq {
                            return Err(corrupt(
                                off,
                                format!(
                                    "segment header says seq {} but the name says {seq}",
                                    h.seq
                                ),
                            ));
                        }
                        preamble = 1 + u64::from(h.carried);
                    }
                    _ if records == 0 => {
                        return Err(corrupt(off, "segment does not start with a header".into()));
                    }
                    Record::Segment(_) => {
                        return Err(corrupt(off, "segment header inside a segment".into()));
                    }
                    Record::Entry(e) => {
                        max_entry = Some(max_entry.map_or(e.index, |m| m.max(e.index)));
                        replay.entry(e).map_err(|r| corrupt(off, r))?;
                    }
                    Record::HardState(hs) => replay.hard_state = hs,
                    Record::Mark(m) => replay.mark(m),
                }
                off += size;
                records += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ent(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: format!("entry-{index}-{term}").into_bytes(),
        }
    }

    fn ents(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
        range.map(|i| ent(i, term)).collect()
    }

    fn open(dir: &Path) -> (Wal, Recovered) {
        Wal::open(dir, WalOptions::default()).unwrap()
    }

    fn small(segment_bytes: u64) -> WalOptions {
        WalOptions {
            segment_bytes,
            ..WalOptions::default()
        }
    }

    fn strict() -> WalOptions {
        WalOptions {
            recovery: RecoveryMode::Strict,
            ..WalOptions::default()
        }
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        list_segments(dir)
            .unwrap()
            .into_iter()
            .map(|(_, p)| p)
            .collect()
    }

    fn last_segment(dir: &Path) -> PathBuf {
        segment_files(dir).pop().unwrap()
    }

    fn find(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .position(|w| w == needle)
            .unwrap()
    }

    fn flip_byte(path: &Path, at: usize) {
        let mut bytes = fs::read(path).unwrap();
        bytes[at] ^= 0x40;
        fs::write(path, bytes).unwrap();
    }

    fn append_bytes(path: &Path, extra: &[u8]) {
        let mut f = OpenOptions::new().append(true).open(path).unwrap();
        f.write_all(extra).unwrap();
    }

    #[test]
    fn fresh_wal_is_empty_and_creates_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("nested/wal");
        let (wal, rec) = open(&dir);
        assert_eq!(rec, Recovered::default());
        assert_eq!(wal.last_index(), 0);
        assert_eq!(segment_files(&dir).len(), 1);
        drop(wal);
        let (_, rec) = open(&dir);
        assert_eq!(rec, Recovered::default());
    }

    #[test]
    fn append_reopen_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let hs = HardState {
            term: 3,
            vote: 2,
            commit: 4,
        };
        {
            let (mut wal, _) = open(tmp.path());
            wal.append(&ents(1..=5, 3), Some(&hs)).unwrap();
            wal.append(&[], None).unwrap();
            assert_eq!(wal.last_index(), 5);
        }
        let (mut wal, rec) = open(tmp.path());
        assert_eq!(rec.entries, ents(1..=5, 3));
        assert_eq!(rec.hard_state, hs);
        assert_eq!(rec.snapshot, None);
        assert_eq!(rec.truncated_bytes, 0);

        let mark = SnapshotMark {
            index: 3,
            term: 3,
            meta: b"conf-state".to_vec(),
        };
        wal.mark_snapshot(&mark).unwrap();
        let hs2 = HardState {
            term: 4,
            vote: 1,
            commit: 5,
        };
        wal.append(&[], Some(&hs2)).unwrap();
        drop(wal);
        let (wal, rec) = open(tmp.path());
        assert_eq!(rec.snapshot, Some(mark));
        assert_eq!(rec.hard_state, hs2);
        assert_eq!(rec.entries, ents(4..=5, 3));
        assert_eq!(wal.last_index(), 5);
    }

    #[test]
    fn suffix_overwrite_survives_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let (mut wal, _) = open(tmp.path());
            wal.append(&ents(1..=5, 1), None).unwrap();
            wal.append(&ents(3..=4, 2), None).unwrap();
            assert_eq!(wal.last_index(), 4);
        }
        let (mut wal, rec) = open(tmp.path());
        let mut want = ents(1..=2, 1);
        want.extend(ents(3..=4, 2));
        assert_eq!(rec.entries, want);
        assert_eq!(wal.last_index(), 4);

        wal.append(&[ent(2, 3)], None).unwrap();
        assert_eq!(wal.last_index(), 2);
        drop(wal);
        let (_, rec) = open(tmp.path());
        assert_eq!(rec.entries, vec![ent(1, 1), ent(2, 3)]);
    }

    #[test]
    fn mark_beyond_log_and_append_validation() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut wal, _) = open(tmp.path());
        wal.append(&ents(1..=10, 1), None).unwrap();
        let mark = SnapshotMark {
            index: 20,
            term: 2,
            meta: vec![],
        };
        wal.mark_snapshot(&mark).unwrap();
        assert_eq!(wal.last_index(), 20);
        assert!(matches!(
            wal.append(&[ent(22, 2)], None),
            Err(Error::InvalidAppend(_))
        ));
        assert!(matches!(
            wal.append(&[ent(15, 2)], None),
            Err(Error::InvalidAppend(_))
        ));
        // A batch is validated as a whole before anything is written.
        assert!(matches!(
            wal.append(&[ent(21, 2), ent(23, 2)], None),
            Err(Error::InvalidAppend(_))
        ));
        assert!(!wal.is_poisoned());
        wal.append(&[ent(21, 2)], None).unwrap();
        drop(wal);
        let (_, rec) = open(tmp.path());
        assert_eq!(rec.snapshot, Some(mark));
        assert_eq!(rec.entries, vec![ent(21, 2)]);
    }

    #[test]
    fn rotation_and_release_keep_mark_and_hard_state() {
        let tmp = tempfile::tempdir().unwrap();
        let mark = SnapshotMark {
            index: 20,
            term: 2,
            meta: b"voters=1,2,3".to_vec(),
        };
        let hs = HardState {
            term: 2,
            vote: 1,
            commit: 20,
        };
        {
            let (mut wal, _) = Wal::open(tmp.path(), small(300)).unwrap();
            for i in 1..=20 {
                wal.append(&[ent(i, 2)], Some(&hs)).unwrap();
            }
            wal.mark_snapshot(&mark).unwrap();
            for i in 21..=30 {
                wal.append(&[ent(i, 2)], None).unwrap();
            }
            let before = wal.segment_count();
            assert!(before > 4, "expected rotation, got {before} segments");
            assert_eq!(segment_files(tmp.path()).len(), before);

            let removed = wal.release_to(20).unwrap();
            assert!(removed >= 3, "removed {removed}");
            assert_eq!(wal.segment_count(), before - removed);
            assert_eq!(segment_files(tmp.path()).len(), before - removed);
            // Capped at the mark: nothing that holds entries above 20 may go.
            assert_eq!(wal.release_to(u64::MAX).unwrap(), 0);
        }
        let (mut wal, rec) = Wal::open(tmp.path(), small(300)).unwrap();
        assert_eq!(rec.snapshot, Some(mark.clone()));
        assert_eq!(rec.hard_state, hs);
        assert_eq!(rec.entries, ents(21..=30, 2));

        // Once the mark covers everything, all but the active segment can go.
        let mark2 = SnapshotMark {
            index: 30,
            term: 2,
            meta: vec![7],
        };
        wal.mark_snapshot(&mark2).unwrap();
        wal.release_to(30).unwrap();
        assert_eq!(wal.segment_count(), 1);
        assert_eq!(segment_files(tmp.path()).len(), 1);
        drop(wal);
        let (wal, rec) = Wal::open(tmp.path(), small(300)).unwrap();
        assert_eq!(rec.snapshot, Some(mark2));
        assert_eq!(rec.hard_state, hs);
        assert!(rec.entries.is_empty());
        assert_eq!(wal.last_index(), 30);
    }

    #[test]
    fn garbage_tail_is_truncated_and_log_continues() {
        for garbage in [b"\x07garbage-garbage-garbage".to_vec(), vec![0u8; 100]] {
            let tmp = tempfile::tempdir().unwrap();
            {
                let (mut wal, _) = open(tmp.path());
                wal.append(&ents(1..=3, 1), None).unwrap();
            }
            let seg = last_segment(tmp.path());
            let clean_len = fs::metadata(&seg).unwrap().len();
            append_bytes(&seg, &garbage);

            let (mut wal, rec) = open(tmp.path());
            assert_eq!(rec.entries, ents(1..=3, 1));
            assert_eq!(rec.truncated_bytes, garbage.len() as u64);
            assert_eq!(fs::metadata(&seg).unwrap().len(), clean_len);
            wal.append(&[ent(4, 1)], None).unwrap();
            drop(wal);

            let (_, rec) = open(tmp.path());
            assert_eq!(rec.entries, ents(1..=4, 1));
            assert_eq!(rec.truncated_bytes, 0);
        }
    }

    #[test]
    fn cut_anywhere_inside_last_record_recovers_prefix() {
        let tmp = tempfile::tempdir().unwrap();
        let (before, after, name, full) = {
            let (mut wal, _) = open(tmp.path());
            wal.append(&ents(1..=3, 1), None).unwrap();
            let seg = last_segment(tmp.path());
            let before = fs::metadata(&seg).unwrap().len() as usize;
            wal.append(&[ent(4, 1)], None).unwrap();
            let full = fs::read(&seg).unwrap();
            (
                before,
                full.len(),
                seg.file_name().unwrap().to_owned(),
                full,
            )
        };
        assert!(after > before + RECORD_HEADER);
        for cut in before + 1..after {
            let dir = tempfile::tempdir().unwrap();
            fs::write(dir.path().join(&name), &full[..cut]).unwrap();
            let (_, rec) = open(dir.path());
            assert_eq!(rec.entries, ents(1..=3, 1), "cut at {cut}");
            assert_eq!(rec.truncated_bytes, (cut - before) as u64, "cut at {cut}");
        }
    }

    #[test]
    fn flipped_byte_in_middle_record_is_an_error_in_both_modes() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let (mut wal, _) = open(tmp.path());
            wal.append(&ents(1..=5, 1), None).unwrap();
        }
        let seg = last_segment(tmp.path());
        let original = fs::read(&seg).unwrap();
        // Damage the payload, the length and the type of the third record in turn.
        let data_at = find(&original, b"entry-3-1");
        let record_at = data_at - INDEXED_FIXED - RECORD_HEADER;
        for at in [data_at + 2, record_at, record_at + 8] {
            for opts in [WalOptions::default(), strict()] {
                fs::write(&seg, &original).unwrap();
                flip_byte(&seg, at);
                let err = Wal::open(tmp.path(), opts.clone()).unwrap_err();
                match err {
                    Error::Corrupt { offset, .. } => assert_eq!(offset, record_at as u64),
                    other => panic!("expected Corrupt, got {other:?}"),
                }
                // Nothing was truncated.
                assert_eq!(fs::metadata(&seg).unwrap().len(), original.len() as u64);
            }
        }
    }

    #[test]
    fn flipped_byte_in_non_last_segment_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let (mut wal, _) = Wal::open(tmp.path(), small(200)).unwrap();
            for i in 1..=10 {
                wal.append(&[ent(i, 1)], None).unwrap();
            }
            assert!(wal.segment_count() >= 3);
        }
        let first = segment_files(tmp.path()).remove(0);
        let bytes = fs::read(&first).unwrap();
        // The last record of a non-last segment: it would look like a torn tail in the
        // last segment, but here it must not be cut.
        let last_data = bytes.len() - 3;
        for opts in [WalOptions::default(), strict()] {
            fs::write(&first, &bytes).unwrap();
            flip_byte(&first, last_data);
            let err = Wal::open(tmp.path(), opts).unwrap_err();
            assert!(
                matches!(&err, Error::Corrupt { segment, .. } if *segment == first),
                "{err:?}"
            );
            assert_eq!(fs::metadata(&first).unwrap().len(), bytes.len() as u64);
        }
    }

    #[test]
    fn strict_mode_refuses_torn_tail() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let (mut wal, _) = open(tmp.path());
            wal.append(&ents(1..=3, 1), None).unwrap();
        }
        let seg = last_segment(tmp.path());
        append_bytes(&seg, b"\x05\x00\x00");
        let len = fs::metadata(&seg).unwrap().len();
        let err = Wal::open(tmp.path(), strict()).unwrap_err();
        assert!(matches!(err, Error::TornTail { bytes: 3, .. }), "{err:?}");
        assert_eq!(fs::metadata(&seg).unwrap().len(), len);
        // The tolerant mode then repairs it.
        let (_, rec) = open(tmp.path());
        assert_eq!(rec.entries, ents(1..=3, 1));
        assert_eq!(rec.truncated_bytes, 3);
    }

    #[test]
    fn failed_sync_poisons_and_reopen_recovers_synced_data() {
        let tmp = tempfile::tempdir().unwrap();
        let hs = HardState {
            term: 1,
            vote: 1,
            commit: 3,
        };
        {
            let (mut wal, _) = open(tmp.path());
            wal.append(&ents(1..=3, 1), Some(&hs)).unwrap();
            wal.inject_sync_failure();
            assert!(wal.append(&[ent(4, 1)], None).is_err());
            assert!(wal.is_poisoned());
            assert!(wal.poison_cause().unwrap().contains("fsync"));
            assert!(matches!(
                wal.append(&[ent(5, 1)], None),
                Err(Error::Poisoned)
            ));
            assert!(matches!(wal.append(&[], Some(&hs)), Err(Error::Poisoned)));
            assert!(matches!(
                wal.mark_snapshot(&SnapshotMark::default()),
                Err(Error::Poisoned)
            ));
            assert!(matches!(wal.release_to(1), Err(Error::Poisoned)));
        }
        let (mut wal, rec) = open(tmp.path());
        assert!(!wal.is_poisoned());
        assert_eq!(&rec.entries[..3], &ents(1..=3, 1)[..]);
        assert_eq!(rec.hard_state, hs);
        wal.append(&[ent(rec.entries.len() as u64 + 1, 2)], None)
            .unwrap();
    }

    #[test]
    fn failed_rotation_poisons() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(tmp.path(), small(1)).unwrap();
        wal.append(&[ent(1, 1)], None).unwrap();
        let segments = wal.segment_count();
        // The append's own fsync succeeds; the new segment's fails.
        wal.fail_sync_in = Some(1);
        assert!(matches!(
            wal.append(&[ent(2, 1)], None),
            Err(Error::Poisoned)
        ));
        assert_eq!(wal.segment_count(), segments);
        assert!(wal.poison_cause().unwrap().contains("rotation"));
        drop(wal);
        // The append itself was fsynced before the rotation failed.
        let (_, rec) = open(tmp.path());
        assert_eq!(rec.entries, ents(1..=2, 1));
        let no_tmp = fs::read_dir(tmp.path())
            .unwrap()
            .all(|e| !e.unwrap().file_name().to_string_lossy().ends_with(".tmp"));
        assert!(no_tmp);
    }

    #[test]
    fn gap_in_log_is_detected_on_recovery() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let (mut wal, _) = open(tmp.path());
            wal.append(&ents(1..=3, 1), None).unwrap();
        }
        let seg = last_segment(tmp.path());
        let mut raw = Vec::new();
        encode_entry(&mut raw, &ent(5, 1));
        append_bytes(&seg, &raw);
        let err = Wal::open(tmp.path(), WalOptions::default()).unwrap_err();
        assert!(
            matches!(&err, Error::Corrupt { reason, .. } if reason.contains("gap")),
            "{err:?}"
        );
    }

    #[test]
    fn hole_after_snapshot_is_detected_on_recovery() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let (mut wal, _) = open(tmp.path());
            wal.mark_snapshot(&SnapshotMark {
                index: 10,
                term: 1,
                meta: vec![],
            })
            .unwrap();
        }
        let mut raw = Vec::new();
        encode_entry(&mut raw, &ent(12, 1));
        append_bytes(&last_segment(tmp.path()), &raw);
        let err = Wal::open(tmp.path(), WalOptions::default()).unwrap_err();
        assert!(
            matches!(&err, Error::Corrupt { reason, .. } if reason.contains("gap")),
            "{err:?}"
        );
    }

    #[test]
    fn entry_at_the_largest_index_is_corrupt_not_an_overflow() {
        // Found by tests/decode_fuzz.rs: a record with a valid checksum whose entry index
        // is u64::MAX, followed by another entry, overflowed the gap check (a panic).
        let tmp = tempfile::tempdir().unwrap();
        {
            let (mut wal, _) = open(tmp.path());
            wal.append(&ents(1..=2, 1), None).unwrap();
        }
        let seg = last_segment(tmp.path());
        let at = fs::metadata(&seg).unwrap().len();
        let mut raw = Vec::new();
        encode_entry(&mut raw, &ent(u64::MAX, 1));
        encode_entry(&mut raw, &ent(3, 1));
        append_bytes(&seg, &raw);
        for opts in [WalOptions::default(), strict()] {
            match Wal::open(tmp.path(), opts).unwrap_err() {
                Error::Corrupt { offset, reason, .. } => {
                    assert_eq!(offset, at);
                    assert!(reason.contains(&u64::MAX.to_string()), "{reason}");
                }
                other => panic!("expected Corrupt, got {other:?}"),
            }
        }
        let mut raw = Vec::new();
        encode_mark(
            &mut raw,
            &SnapshotMark {
                index: u64::MAX,
                term: 1,
                meta: vec![],
            },
        );
        fs::write(&seg, &fs::read(&seg).unwrap()[..at as usize]).unwrap();
        append_bytes(&seg, &raw);
        append_bytes(&seg, &raw);
        assert!(matches!(
            Wal::open(tmp.path(), WalOptions::default()),
            Err(Error::Corrupt { offset, .. }) if offset == at
        ));
    }

    #[test]
    fn log_without_a_mark_must_start_at_one() {
        // Segments are only released up to a snapshot mark, which every later segment
        // carries: without a mark, a log starting later lost its first segment.
        let tmp = tempfile::tempdir().unwrap();
        drop(open(tmp.path()));
        let mut raw = Vec::new();
        encode_entry(&mut raw, &ent(5, 1));
        append_bytes(&last_segment(tmp.path()), &raw);
        let err = Wal::open(tmp.path(), WalOptions::default()).unwrap_err();
        assert!(
            matches!(&err, Error::Corrupt { reason, .. } if reason.contains("starts at entry 5")),
            "{err:?}"
        );
    }

    #[test]
    fn missing_middle_segment_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let (mut wal, _) = Wal::open(tmp.path(), small(150)).unwrap();
            for i in 1..=10 {
                wal.append(&[ent(i, 1)], None).unwrap();
            }
        }
        let files = segment_files(tmp.path());
        assert!(files.len() >= 3);
        fs::remove_file(&files[1]).unwrap();
        let err = Wal::open(tmp.path(), WalOptions::default()).unwrap_err();
        assert!(
            matches!(&err, Error::Corrupt { reason, .. } if reason.contains("missing")),
            "{err:?}"
        );
    }

    #[test]
    fn leftover_segment_temp_file_is_removed() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let (mut wal, _) = open(tmp.path());
            wal.append(&ents(1..=2, 1), None).unwrap();
        }
        let leftover = tmp.path().join(format!("{}.tmp", segment_name(1, 3)));
        fs::write(&leftover, b"half a preamble").unwrap();
        let (_, rec) = open(tmp.path());
        assert!(!leftover.exists());
        assert_eq!(rec.entries, ents(1..=2, 1));
    }

    #[test]
    fn damaged_preamble_of_last_segment_is_not_a_torn_tail() {
        let tmp = tempfile::tempdir().unwrap();
        drop(open(tmp.path()));
        let seg = last_segment(tmp.path());
        let len = fs::metadata(&seg).unwrap().len();
        let file = OpenOptions::new().write(true).open(&seg).unwrap();
        file.set_len(len - 1).unwrap();
        let err = Wal::open(tmp.path(), WalOptions::default()).unwrap_err();
        assert!(
            matches!(&err, Error::Corrupt { reason, .. } if reason.contains("preamble")),
            "{err:?}"
        );
    }

    #[test]
    fn scan_finds_records_but_not_garbage() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("scan");
        // The record lies beyond the first scan window, so a refill must find it.
        let mut bytes = vec![0xAB; (1 << 20) + 3000];
        bytes.extend(std::iter::repeat_n(0u8, 500));
        let at = bytes.len() as u64;
        encode_hard_state(&mut bytes, &HardState::default());
        fs::write(&path, &bytes).unwrap();
        let mut f = File::open(&path).unwrap();
        let len = bytes.len() as u64;
        assert_eq!(find_valid_record(&mut f, 0, len).unwrap(), Some(at));
        assert_eq!(find_valid_record(&mut f, at + 1, len).unwrap(), None);
    }
}
