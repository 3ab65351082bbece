//! Fuzzed decoders of the storage crate: WAL segments and snapshot files, from arbitrary
//! bytes and from valid encodings that are then damaged (bytes flipped, files cut, bytes
//! spliced in, length fields changed) or re-framed with a recomputed checksum, so that
//! the decoding behind the checksum is exercised too. Whatever the bytes, opening gives
//! `Ok` (in the tolerant mode with a torn tail cut off) or an error that names the file
//! and offset of the damage: never a panic, never data that was not written, never an
//! allocation out of proportion to the input.
//!
//! The encoder below is written from the format in the modules' docs, and a test checks
//! it against what the crate itself writes.
//!
//! Case counts are fixed and the seed is fixed, so CI runs the same cases in a few
//! seconds and a failure there replays locally as is. `PROPTEST_CASES=N` runs N cases
//! per property, `PROPTEST_RNG_SEED=S` other cases.

// The allocation probe below wraps the system allocator, which takes `unsafe`.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fs;
use std::io::{Read, Write};
use std::path::Path;

use concord_storage::{
    Error, HardState, Recovered, RecoveryMode, SnapshotMeta, SnapshotStore, Wal, WalOptions,
};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::RngSeed;

// ---------------------------------------------------------------------------------------
// Harness: configuration and the allocation probe.

/// The seed of every property here unless `PROPTEST_RNG_SEED` says otherwise.
const SEED: u64 = 0xC0DE_C0DE_5EED_0007;

/// `cases` cases from the fixed seed, unless the environment asks for more or others.
fn config(cases: u32) -> ProptestConfig {
    let env = ProptestConfig::default();
    let set = |name: &str| std::env::var_os(name).is_some();
    ProptestConfig {
        cases: if set("PROPTEST_CASES") {
            env.cases
        } else {
            cases
        },
        rng_seed: if set("PROPTEST_RNG_SEED") {
            env.rng_seed
        } else {
            RngSeed::Fixed(SEED)
        },
        // The seed is fixed: a failure is replayed by running the test again, and the
        // shrunk input it prints becomes a regression test.
        failure_persistence: None,
        ..env
    }
}

/// Counts the largest single allocation made by the current thread.
struct Probe;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|l| {
        if size > l.get() {
            l.set(size);
        }
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Probe {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static PROBE: Probe = Probe;

/// Runs `f` and returns its result with the largest allocation it made on this thread.
fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.with(|l| l.set(0));
    let r = f();
    (r, LARGEST.with(Cell::get))
}

/// What decoding `input` bytes may allocate at once: buffers of fixed size (the WAL's
/// 1 MiB scan window, 256 KiB snapshot buffers) plus a few times the input.
fn allocation_bound(input: usize) -> usize {
    (2 << 20) + 4 * input
}

// ---------------------------------------------------------------------------------------
// The WAL format, from `concord_storage::wal`'s docs.

const WAL_MAGIC: &[u8; 8] = b"CNCDWAL\0";
const T_SEGMENT: u8 = 1;
const T_ENTRY: u8 = 2;
const T_HARD_STATE: u8 = 3;
const T_MARK: u8 = 4;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Rec {
    Header {
        seq: u64,
        first: u64,
        carried: u32,
    },
    Entry {
        index: u64,
        term: u64,
        data: Vec<u8>,
    },
    Hard {
        term: u64,
        vote: u64,
        commit: u64,
    },
    Mark {
        index: u64,
        term: u64,
        meta: Vec<u8>,
    },
}

impl Rec {
    fn kind(&self) -> u8 {
        match self {
            Rec::Header { .. } => T_SEGMENT,
            Rec::Entry { .. } => T_ENTRY,
            Rec::Hard { .. } => T_HARD_STATE,
            Rec::Mark { .. } => T_MARK,
        }
    }

    fn payload(&self) -> Vec<u8> {
        let mut p = Vec::new();
        match self {
            Rec::Header {
                seq,
                first,
                carried,
            } => {
                p.extend_from_slice(WAL_MAGIC);
                p.extend_from_slice(&1u32.to_le_bytes());
                p.extend_from_slice(&seq.to_le_bytes());
                p.extend_from_slice(&first.to_le_bytes());
                p.extend_from_slice(&carried.to_le_bytes());
            }
            Rec::Entry { index, term, data }
            | Rec::Mark {
                index,
                term,
                meta: data,
            } => {
                p.extend_from_slice(&index.to_le_bytes());
                p.extend_from_slice(&term.to_le_bytes());
                p.extend_from_slice(&(data.len() as u32).to_le_bytes());
                p.extend_from_slice(data);
            }
            Rec::Hard { term, vote, commit } => {
                p.extend_from_slice(&term.to_le_bytes());
                p.extend_from_slice(&vote.to_le_bytes());
                p.extend_from_slice(&commit.to_le_bytes());
            }
        }
        p
    }
}

/// `[len u32][crc32c over type+payload][type][payload]`.
fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let crc = crc32c::crc32c_append(crc32c::crc32c(&[kind]), payload);
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
    out
}

fn segment_name(seq: u64, first: u64) -> String {
    format!("{seq:016x}-{first:016x}.wal")
}

/// The recovered state as plain values, to compare with what was written.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct State {
    snapshot: Option<(u64, u64, Vec<u8>)>,
    hard: (u64, u64, u64),
    entries: Vec<(u64, u64, Vec<u8>)>,
}

impl State {
    fn of(r: &Recovered) -> State {
        State {
            snapshot: r
                .snapshot
                .as_ref()
                .map(|s| (s.index, s.term, s.meta.clone())),
            hard: (r.hard_state.term, r.hard_state.vote, r.hard_state.commit),
            entries: r
                .entries
                .iter()
                .map(|e| (e.index, e.term, e.data.clone()))
                .collect(),
        }
    }

    /// Raft's replay of one valid record (the generator only writes valid logs).
    fn replay(&mut self, r: &Rec) {
        match r {
            Rec::Header { .. } => {}
            Rec::Entry { index, term, data } => {
                self.entries.retain(|e| e.0 < *index);
                if self.snapshot.as_ref().is_none_or(|s| *index > s.0) {
                    self.entries.push((*index, *term, data.clone()));
                }
            }
            Rec::Hard { term, vote, commit } => self.hard = (*term, *vote, *commit),
            Rec::Mark { index, term, meta } => {
                self.entries.retain(|e| e.0 > *index);
                self.snapshot = Some((*index, *term, meta.clone()));
            }
        }
    }

    fn last_index(&self) -> u64 {
        let snap = self.snapshot.as_ref().map_or(0, |s| s.0);
        self.entries.last().map_or(snap, |e| e.0)
    }
}

/// A segment: its records, with the preamble (header, carried mark, hard state) first.
#[derive(Debug, Clone)]
struct Segment {
    seq: u64,
    first: u64,
    records: Vec<Rec>,
    preamble: usize,
}

impl Segment {
    fn new(seq: u64, state: &State) -> Segment {
        let mut records = vec![Rec::Header {
            seq,
            first: state.last_index() + 1,
            carried: 1 + u32::from(state.snapshot.is_some()),
        }];
        if let Some((index, term, meta)) = &state.snapshot {
            records.push(Rec::Mark {
                index: *index,
                term: *term,
                meta: meta.clone(),
            });
        }
        let (term, vote, commit) = state.hard;
        records.push(Rec::Hard { term, vote, commit });
        Segment {
            seq,
            first: state.last_index() + 1,
            preamble: records.len(),
            records,
        }
    }

    fn name(&self) -> String {
        segment_name(self.seq, self.first)
    }

    fn bytes(&self) -> Vec<u8> {
        self.records
            .iter()
            .flat_map(|r| frame(r.kind(), &r.payload()))
            .collect()
    }

    /// Offsets of the record boundaries: 0, the end of each record.
    fn boundaries(&self) -> Vec<usize> {
        let mut at = vec![0];
        for r in &self.records {
            at.push(at.last().unwrap() + 9 + r.payload().len());
        }
        at
    }
}

/// One step of a generated writer.
#[derive(Debug, Clone)]
enum Op {
    /// Entries at the end of the log, with these data lengths; maybe a hard state after.
    Append(Vec<usize>, bool),
    /// Raft overwriting an uncommitted suffix: entries from an earlier index, next term.
    Overwrite(Index, Vec<usize>),
    /// A snapshot mark at an index between the last mark and the last entry.
    Mark(Index, usize),
    /// Start a new segment.
    Rotate,
}

fn op() -> impl Strategy<Value = Op> {
    let lens = || prop::collection::vec(prop_oneof![4 => 0usize..24, 1 => 24usize..300], 1..4);
    prop_oneof![
        6 => (lens(), any::<bool>()).prop_map(|(l, h)| Op::Append(l, h)),
        2 => (any::<Index>(), lens()).prop_map(|(i, l)| Op::Overwrite(i, l)),
        1 => (any::<Index>(), 0usize..16).prop_map(|(i, n)| Op::Mark(i, n)),
        1 => Just(Op::Rotate),
    ]
}

fn data(index: u64, term: u64, len: usize) -> Vec<u8> {
    let tag = format!("{index}.{term}:");
    tag.bytes()
        .chain((0..=255u8).cycle().map(|i| i ^ 0x5a))
        .take(len)
        .collect()
}

/// A valid WAL as a writer following Raft's rules leaves it, and the states after each
/// record of the last segment (by the offset where the record ends).
#[derive(Debug, Clone)]
struct Log {
    segments: Vec<Segment>,
    /// `(end offset in the last segment, state once that record is replayed)`.
    states: Vec<(usize, State)>,
    /// Every entry and mark ever written, as `(index, term, data)`.
    written: Vec<(u64, u64, Vec<u8>)>,
}

impl Log {
    fn generate(start: Option<(u64, u64)>, ops: &[Op]) -> Log {
        let mut state = State::default();
        let mut written = Vec::new();
        if let Some((index, term)) = start {
            // The log starts from a snapshot: what a released older segment leaves.
            let meta = b"conf".to_vec();
            written.push((index, term, meta.clone()));
            state.snapshot = Some((index, term, meta));
            state.hard = (term, 1, index);
        }
        let mut segments = vec![Segment::new(0, &state)];
        let mut term = start.map_or(1, |s| s.1);
        let push = |segments: &mut Vec<Segment>, state: &mut State, r: Rec| {
            state.replay(&r);
            segments.last_mut().unwrap().records.push(r);
        };
        for op in ops {
            match op {
                Op::Append(lens, hard) => {
                    for len in lens {
                        let index = state.last_index() + 1;
                        let d = data(index, term, *len);
                        written.push((index, term, d.clone()));
                        let r = Rec::Entry {
                            index,
                            term,
                            data: d,
                        };
                        push(&mut segments, &mut state, r);
                    }
                    if *hard {
                        let r = Rec::Hard {
                            term,
                            vote: 1,
                            commit: state.last_index() / 2,
                        };
                        push(&mut segments, &mut state, r);
                    }
                }
                Op::Overwrite(at, lens) => {
                    if state.entries.is_empty() {
                        continue;
                    }
                    term += 1;
                    let from = state.entries[at.index(state.entries.len())].0;
                    for (index, len) in (from..).zip(lens) {
                        let d = data(index, term, *len);
                        written.push((index, term, d.clone()));
                        let r = Rec::Entry {
                            index,
                            term,
                            data: d,
                        };
                        push(&mut segments, &mut state, r);
                    }
                }
                Op::Mark(at, meta_len) => {
                    let Some(&(index, t, _)) =
                        state.entries.get(at.index(state.entries.len().max(1)))
                    else {
                        continue;
                    };
                    let meta = data(index, t, *meta_len);
                    written.push((index, t, meta.clone()));
                    let r = Rec::Mark {
                        index,
                        term: t,
                        meta,
                    };
                    push(&mut segments, &mut state, r);
                }
                Op::Rotate => {
                    let seq = segments.last().unwrap().seq + 1;
                    segments.push(Segment::new(seq, &state));
                }
            }
        }
        // The states along the last segment, replayed from the start.
        let last = segments.last().unwrap();
        let mut st = State::default();
        for seg in &segments[..segments.len() - 1] {
            for r in &seg.records {
                st.replay(r);
            }
        }
        let mut states = Vec::new();
        for (r, end) in last
            .records
            .iter()
            .zip(last.boundaries().into_iter().skip(1))
        {
            st.replay(r);
            states.push((end, st.clone()));
        }
        assert_eq!(states.last().unwrap().1, state, "the model replays itself");
        Log {
            segments,
            states,
            written,
        }
    }

    /// Writes the segments into `dir` with `bytes` in place of each one's encoding.
    fn write(&self, dir: &Path, bytes: &[Vec<u8>]) {
        for (seg, b) in self.segments.iter().zip(bytes) {
            fs::write(dir.join(seg.name()), b).unwrap();
        }
    }

    fn encoded(&self) -> Vec<Vec<u8>> {
        self.segments.iter().map(Segment::bytes).collect()
    }
}

fn log() -> impl Strategy<Value = Log> {
    (
        prop_oneof![
            3 => Just(None),
            1 => (1u64..2000, 1u64..5).prop_map(Some),
        ],
        prop::collection::vec(op(), 0..14),
    )
        .prop_map(|(start, ops)| Log::generate(start, &ops))
}

// ---------------------------------------------------------------------------------------
// Damage.

/// Damage that leaves the checksums as they were (what a disk or a torn write does).
#[derive(Debug, Clone)]
enum Damage {
    Flip(Index, u8),
    Cut(Index),
    Splice(Index, usize, Vec<u8>),
    /// A record's length field replaced (with its checksum left as it was).
    Len(Index, u32),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        4 => (any::<Index>(), 1u8..).prop_map(|(i, x)| Damage::Flip(i, x)),
        2 => any::<Index>().prop_map(Damage::Cut),
        2 => (any::<Index>(), 0usize..40, prop::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(i, n, b)| Damage::Splice(i, n, b)),
        2 => (any::<Index>(), length_value()).prop_map(|(i, l)| Damage::Len(i, l)),
    ]
}

/// Length values that hit the edges: zero, tiny, the limit and beyond, everything.
fn length_value() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        0u32..64,
        Just((128 << 20) - 1),
        Just(128 << 20),
        Just((128 << 20) + 1),
        Just(u32::MAX),
        any::<u32>(),
    ]
}

fn apply_damage(bytes: &mut Vec<u8>, boundaries: &[usize], d: &Damage) {
    match d {
        Damage::Flip(at, x) => {
            if !bytes.is_empty() {
                let i = at.index(bytes.len());
                bytes[i] ^= x;
            }
        }
        Damage::Cut(at) => bytes.truncate(at.index(bytes.len() + 1)),
        Damage::Splice(at, remove, insert) => {
            let i = at.index(bytes.len() + 1);
            let end = (i + remove).min(bytes.len());
            bytes.splice(i..end, insert.iter().copied());
        }
        Damage::Len(record, len) => {
            let starts = &boundaries[..boundaries.len() - 1];
            let at = starts[record.index(starts.len())];
            if at + 4 <= bytes.len() {
                bytes[at..at + 4].copy_from_slice(&len.to_le_bytes());
            }
        }
    }
}

/// A change to one record's contents after which it is framed again with a correct
/// length and checksum: only the decoding behind the checksum can catch it.
#[derive(Debug, Clone)]
enum Reframe {
    Flip(Index, u8),
    Truncate(Index),
    Extend(Vec<u8>),
    Kind(u8),
    /// One of the payload's integer fields (an index, a term, a length) set to `v`.
    Field(Index, u64),
    /// The record removed, or repeated.
    Drop,
    Repeat,
    /// A record of its own inserted before this one.
    Insert(Rec),
}

fn edge_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(u64::MAX - 1),
        Just(u64::from(u32::MAX)),
        Just(i64::MAX as u64),
        0u64..3000,
        any::<u64>(),
    ]
}

fn any_rec() -> impl Strategy<Value = Rec> {
    prop_oneof![
        (
            edge_u64(),
            edge_u64(),
            prop::collection::vec(any::<u8>(), 0..16)
        )
            .prop_map(|(index, term, data)| Rec::Entry { index, term, data }),
        (
            edge_u64(),
            edge_u64(),
            prop::collection::vec(any::<u8>(), 0..16)
        )
            .prop_map(|(index, term, meta)| Rec::Mark { index, term, meta }),
        (edge_u64(), edge_u64(), edge_u64()).prop_map(|(term, vote, commit)| Rec::Hard {
            term,
            vote,
            commit
        }),
        (edge_u64(), edge_u64(), any::<u32>()).prop_map(|(seq, first, carried)| Rec::Header {
            seq,
            first,
            carried
        }),
    ]
}

fn reframe() -> impl Strategy<Value = Reframe> {
    prop_oneof![
        2 => (any::<Index>(), 1u8..).prop_map(|(i, x)| Reframe::Flip(i, x)),
        1 => any::<Index>().prop_map(Reframe::Truncate),
        1 => prop::collection::vec(any::<u8>(), 1..12).prop_map(Reframe::Extend),
        1 => any::<u8>().prop_map(Reframe::Kind),
        3 => (any::<Index>(), edge_u64()).prop_map(|(i, v)| Reframe::Field(i, v)),
        1 => Just(Reframe::Drop),
        1 => Just(Reframe::Repeat),
        2 => any_rec().prop_map(Reframe::Insert),
    ]
}

/// The segment's bytes with record `which` changed by `r` and framed again.
fn apply_reframe(seg: &Segment, which: Index, r: &Reframe) -> Vec<u8> {
    let target = which.index(seg.records.len());
    let mut out = Vec::new();
    for (i, rec) in seg.records.iter().enumerate() {
        let (mut kind, mut p) = (rec.kind(), rec.payload());
        if i != target {
            out.extend(frame(kind, &p));
            continue;
        }
        match r {
            Reframe::Flip(at, x) => {
                if !p.is_empty() {
                    let j = at.index(p.len());
                    p[j] ^= x;
                }
            }
            Reframe::Truncate(at) => p.truncate(at.index(p.len().max(1))),
            Reframe::Extend(b) => p.extend_from_slice(b),
            Reframe::Kind(k) => kind = *k,
            Reframe::Field(at, v) => {
                // The integer fields: u64s at 0, 8, 16 (and the header's at 12, 20), the
                // u32 length of entries and marks at 16.
                let fields: &[(usize, usize)] = match rec {
                    Rec::Header { .. } => &[(8, 4), (12, 8), (20, 8), (28, 4)],
                    Rec::Entry { .. } | Rec::Mark { .. } => &[(0, 8), (8, 8), (16, 4)],
                    Rec::Hard { .. } => &[(0, 8), (8, 8), (16, 8)],
                };
                let (off, width) = fields[at.index(fields.len())];
                p[off..off + width].copy_from_slice(&v.to_le_bytes()[..width]);
            }
            Reframe::Drop => continue,
            Reframe::Repeat => out.extend(frame(kind, &p)),
            Reframe::Insert(new) => out.extend(frame(new.kind(), &new.payload())),
        }
        out.extend(frame(kind, &p));
    }
    out
}

// ---------------------------------------------------------------------------------------
// What every open must satisfy.

fn strict() -> WalOptions {
    WalOptions {
        recovery: RecoveryMode::Strict,
        ..WalOptions::default()
    }
}

fn dir_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Opens the WAL in `dir` in both modes and checks what any open must give. Returns the
/// log the tolerant mode recovered, or `None` if it refused (a correct answer to damage,
/// checked here).
fn open_checked(dir: &Path) -> Result<Option<State>, TestCaseError> {
    let before = dir_bytes(dir);
    let input: usize = before.iter().map(|(_, b)| b.len()).sum();

    let (strict_result, largest) = largest_allocation(|| Wal::open(dir, strict()));
    prop_assert!(
        largest <= allocation_bound(input),
        "strict open of {input} bytes allocated {largest} bytes at once"
    );
    let strict_state = match strict_result {
        Ok((_, rec)) => {
            prop_assert_eq!(rec.truncated_bytes, 0);
            Some(State::of(&rec))
        }
        Err(e) => {
            check_error(dir, &before, &e)?;
            // A refusal in strict mode leaves the files as they were.
            prop_assert_eq!(&dir_bytes(dir), &before);
            None
        }
    };

    let (tolerant, largest) =
        largest_allocation(|| Wal::open(dir, WalOptions::default()).map(|(_, rec)| rec));
    prop_assert!(
        largest <= allocation_bound(input),
        "open of {input} bytes allocated {largest} bytes at once"
    );
    let rec = match tolerant {
        Ok(rec) => rec,
        Err(e) => {
            check_error(dir, &before, &e)?;
            prop_assert!(
                !matches!(e, Error::TornTail { .. }),
                "a torn tail is cut in the tolerant mode: {e}"
            );
            prop_assert!(
                strict_state.is_none(),
                "strict opened what tolerant refused"
            );
            return Ok(None);
        }
    };
    let state = State::of(&rec);
    check_log(&state)?;
    match strict_state {
        Some(s) => {
            prop_assert_eq!(rec.truncated_bytes, 0);
            prop_assert_eq!(&s, &state);
        }
        None => prop_assert!(rec.truncated_bytes > 0, "strict refused a clean log"),
    }
    // Recovery is done once: opening again finds a clean log with the same contents.
    let (_, again) = Wal::open(dir, strict()).map_err(|e| fail(format!("reopen: {e}")))?;
    prop_assert_eq!(again.truncated_bytes, 0);
    prop_assert_eq!(State::of(&again), state.clone());
    Ok(Some(state))
}

fn fail(msg: String) -> TestCaseError {
    TestCaseError::fail(msg)
}

/// A refusal names a file of the WAL (or the WAL's directory) and an offset inside it.
fn check_error(dir: &Path, files: &[(String, Vec<u8>)], e: &Error) -> Result<(), TestCaseError> {
    let (segment, offset) = match e {
        Error::Corrupt {
            segment, offset, ..
        } => (segment, *offset),
        Error::TornTail {
            segment, offset, ..
        } => (segment, *offset),
        other => return Err(fail(format!("unexpected error kind: {other:?}"))),
    };
    if segment == dir {
        return Ok(());
    }
    let name = segment.file_name().unwrap().to_string_lossy();
    let file = files.iter().find(|(n, _)| *n == name);
    prop_assert!(file.is_some(), "error names a file that is not there: {e}");
    prop_assert!(
        offset <= file.unwrap().1.len() as u64,
        "error offset beyond the file: {e}"
    );
    Ok(())
}

/// A recovered log is one Raft can start from: contiguous, after its snapshot.
fn check_log(s: &State) -> Result<(), TestCaseError> {
    for pair in s.entries.windows(2) {
        prop_assert_eq!(pair[1].0, pair[0].0 + 1, "recovered log is not contiguous");
    }
    if let (Some(snap), Some(first)) = (&s.snapshot, s.entries.first()) {
        prop_assert_eq!(
            first.0,
            snap.0 + 1,
            "log does not resume after its snapshot"
        );
    }
    Ok(())
}

/// Every recovered entry and mark is one that was written, as written.
fn check_written(s: &State, written: &[(u64, u64, Vec<u8>)]) -> Result<(), TestCaseError> {
    for e in s.entries.iter().chain(&s.snapshot) {
        prop_assert!(
            written.contains(e),
            "recovered a record that was never written: {e:?}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// WAL properties.

#[test]
fn test_encoder_writes_what_the_wal_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let hs = HardState {
        term: 3,
        vote: 2,
        commit: 1,
    };
    {
        let (mut wal, _) = Wal::open(tmp.path(), WalOptions::default()).unwrap();
        let e = |index| concord_storage::Entry {
            index,
            term: 3,
            data: data(index, 3, 10),
        };
        wal.append(&[e(1), e(2)], Some(&hs)).unwrap();
        wal.mark_snapshot(&concord_storage::SnapshotMark {
            index: 1,
            term: 3,
            meta: b"m".to_vec(),
        })
        .unwrap();
    }
    let mut seg = Segment::new(0, &State::default());
    seg.records.extend([
        Rec::Entry {
            index: 1,
            term: 3,
            data: data(1, 3, 10),
        },
        Rec::Entry {
            index: 2,
            term: 3,
            data: data(2, 3, 10),
        },
        Rec::Hard {
            term: 3,
            vote: 2,
            commit: 1,
        },
        Rec::Mark {
            index: 1,
            term: 3,
            meta: b"m".to_vec(),
        },
    ]);
    assert_eq!(
        dir_bytes(tmp.path()),
        vec![(seg.name(), seg.bytes())],
        "the test's encoder and the WAL disagree"
    );
}

proptest! {
    #![proptest_config(config(128))]

    /// A valid log opens as written, in both modes.
    #[test]
    fn valid_logs_open_as_written(log in log()) {
        let tmp = tempfile::tempdir().unwrap();
        log.write(tmp.path(), &log.encoded());
        let state = open_checked(tmp.path())?;
        prop_assert_eq!(state.as_ref(), Some(&log.states.last().unwrap().1));
    }

    /// A segment of arbitrary bytes, alone or behind a valid preamble (so the bytes are
    /// read as records).
    #[test]
    fn arbitrary_segment_bytes(
        preamble in any::<bool>(),
        garbage in prop::collection::vec(any::<u8>(), 0..600),
        records in prop::collection::vec(any_rec(), 0..4),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let seg = Segment::new(0, &State::default());
        let mut bytes = if preamble { seg.bytes() } else { Vec::new() };
        // Well-framed records of arbitrary contents, then garbage.
        for r in &records {
            bytes.extend(frame(r.kind(), &r.payload()));
        }
        bytes.extend_from_slice(&garbage);
        fs::write(tmp.path().join(seg.name()), &bytes).unwrap();
        open_checked(tmp.path())?;
    }

    /// Damage that keeps the checksums as they were: refused, or cut off as a torn tail;
    /// whatever is recovered was written.
    #[test]
    fn damaged_logs(
        log in log(),
        target in any::<Index>(),
        damages in prop::collection::vec(damage(), 1..4),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let mut bytes = log.encoded();
        let t = target.index(bytes.len());
        let boundaries = log.segments[t].boundaries();
        for d in &damages {
            apply_damage(&mut bytes[t], &boundaries, d);
        }
        log.write(tmp.path(), &bytes);
        if let Some(state) = open_checked(tmp.path())? {
            check_written(&state, &log.written)?;
        }
    }

    /// A record changed and framed again with a valid checksum: the decoding behind the
    /// checksum must refuse what does not make sense, and never panic.
    #[test]
    fn reframed_records(
        log in log(),
        target in any::<Index>(),
        which in any::<Index>(),
        edit in reframe(),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let mut bytes = log.encoded();
        let t = target.index(bytes.len());
        bytes[t] = apply_reframe(&log.segments[t], which, &edit);
        log.write(tmp.path(), &bytes);
        open_checked(tmp.path())?;
    }

    /// The last segment cut anywhere (a crash in the middle of an append): the tolerant
    /// mode recovers exactly the records before the cut, the strict mode refuses unless
    /// the cut is at a record boundary, and a cut inside the preamble is corruption.
    #[test]
    fn torn_tails_recover_the_records_before_them(log in log(), cut in any::<Index>()) {
        let tmp = tempfile::tempdir().unwrap();
        let mut bytes = log.encoded();
        let last = bytes.len() - 1;
        let at = cut.index(bytes[last].len() + 1);
        bytes[last].truncate(at);
        log.write(tmp.path(), &bytes);
        let seg = log.segments.last().unwrap();
        let preamble_end = seg.boundaries()[seg.preamble];
        let clean = seg.boundaries().contains(&at);
        let state = open_checked(tmp.path())?;
        if at < preamble_end {
            prop_assert!(state.is_none(), "a cut preamble was accepted");
            return Ok(());
        }
        let state = state.ok_or_else(|| fail("a torn tail was refused".into()))?;
        let want = log.states.iter().rev().find(|(end, _)| *end <= at).unwrap();
        prop_assert_eq!(&state, &want.1);
        let (_, rec) = Wal::open(tmp.path(), strict()).unwrap();
        prop_assert_eq!(rec.truncated_bytes, 0);
        if !clean {
            prop_assert_eq!(
                fs::metadata(tmp.path().join(seg.name())).unwrap().len(),
                want.0 as u64
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Snapshot files, from `concord_storage::snap`'s docs:
// magic | version u32 | index u64 | term u64 | meta_len u32 | meta | body | body_len u64 |
// crc32c u32 over every byte before it.

fn snapshot_bytes(index: u64, term: u64, meta: &[u8], body: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"CNCDSNAP");
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&index.to_le_bytes());
    b.extend_from_slice(&term.to_le_bytes());
    b.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    b.extend_from_slice(meta);
    b.extend_from_slice(body);
    b.extend_from_slice(&(body.len() as u64).to_le_bytes());
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// Rewrites the trailing checksum so it matches the bytes before it.
fn fix_crc(b: &mut [u8]) {
    if b.len() >= 4 {
        let n = b.len() - 4;
        let crc = crc32c::crc32c(&b[..n]);
        b[n..].copy_from_slice(&crc.to_le_bytes());
    }
}

/// What opening or importing a snapshot gave: its metadata and body, or a refusal.
type SnapVerdict = Result<(SnapshotMeta, Vec<u8>), String>;

fn read_body(f: &concord_storage::SnapshotFile) -> Vec<u8> {
    let mut body = Vec::new();
    f.body_reader().unwrap().read_to_end(&mut body).unwrap();
    body
}

/// Opens `bytes` as a snapshot file and imports them in `chunks`, checks that both agree
/// and that a refused import installs nothing, and returns the verdict.
fn snapshot_checked(bytes: &[u8], chunks: &[Index]) -> Result<SnapVerdict, TestCaseError> {
    let tmp = tempfile::tempdir().unwrap();
    let store = SnapshotStore::open(&tmp.path().join("store")).unwrap();
    let path = tmp.path().join("file.snap");
    fs::write(&path, bytes).unwrap();

    let (opened, largest) = largest_allocation(|| store.open_file(&path));
    prop_assert!(
        largest <= allocation_bound(bytes.len()),
        "opening {} bytes allocated {largest} at once",
        bytes.len()
    );
    let opened: SnapVerdict = match opened {
        Ok(f) => {
            prop_assert_eq!(f.len(), bytes.len() as u64);
            Ok((f.meta().clone(), read_body(&f)))
        }
        Err(Error::CorruptSnapshot { reason, .. }) => Err(reason),
        Err(other) => return Err(fail(format!("unexpected error kind: {other:?}"))),
    };

    // The same bytes from a peer, in pieces of arbitrary sizes.
    let (imported, largest) = largest_allocation(|| -> Result<SnapVerdict, TestCaseError> {
        let mut w = store.import().unwrap();
        let mut rest = bytes;
        let mut refused_early = false;
        for c in chunks {
            if rest.is_empty() {
                break;
            }
            let n = c.index(rest.len()) + 1;
            if w.write_all(&rest[..n]).is_err() {
                refused_early = true;
                break;
            }
            rest = &rest[n..];
        }
        if !refused_early && !rest.is_empty() && w.write_all(rest).is_err() {
            refused_early = true;
        }
        Ok(match w.finish() {
            Ok(f) => {
                prop_assert!(!refused_early, "a refused write was followed by an install");
                Ok((f.meta().clone(), read_body(&f)))
            }
            Err(Error::CorruptSnapshot { reason, .. }) => Err(reason),
            Err(other) => return Err(fail(format!("unexpected error kind: {other:?}"))),
        })
    });
    prop_assert!(
        largest <= allocation_bound(bytes.len()),
        "importing {} bytes allocated {largest} at once",
        bytes.len()
    );
    let imported = imported?;
    prop_assert_eq!(opened.is_ok(), imported.is_ok(), "open and import disagree");
    if let (Ok(a), Ok(b)) = (&opened, &imported) {
        prop_assert_eq!(a, b);
    }
    let installed = fs::read_dir(store.dir()).unwrap().count();
    prop_assert_eq!(installed, usize::from(imported.is_ok()));
    Ok(opened)
}

#[derive(Debug, Clone)]
enum SnapDamage {
    Flip(Index, u8),
    Cut(Index),
    Splice(Index, usize, Vec<u8>),
    /// The header's metadata length (bytes 28..32) or the trailer's body length.
    MetaLen(u32),
    BodyLen(u64),
}

fn snap_damage() -> impl Strategy<Value = SnapDamage> {
    prop_oneof![
        3 => (any::<Index>(), 1u8..).prop_map(|(i, x)| SnapDamage::Flip(i, x)),
        1 => any::<Index>().prop_map(SnapDamage::Cut),
        1 => (any::<Index>(), 0usize..20, prop::collection::vec(any::<u8>(), 0..20))
            .prop_map(|(i, n, b)| SnapDamage::Splice(i, n, b)),
        2 => prop_oneof![
            length_value(),
            Just((64 << 20) - 1),
            Just(64 << 20),
            Just((64 << 20) + 1)
        ]
        .prop_map(SnapDamage::MetaLen),
        2 => edge_u64().prop_map(SnapDamage::BodyLen),
    ]
}

fn apply_snap_damage(b: &mut Vec<u8>, d: &SnapDamage) {
    match d {
        SnapDamage::Flip(at, x) => {
            if !b.is_empty() {
                let i = at.index(b.len());
                b[i] ^= x;
            }
        }
        SnapDamage::Cut(at) => b.truncate(at.index(b.len() + 1)),
        SnapDamage::Splice(at, remove, insert) => {
            let i = at.index(b.len() + 1);
            let end = (i + remove).min(b.len());
            b.splice(i..end, insert.iter().copied());
        }
        SnapDamage::MetaLen(len) => {
            if b.len() >= 32 {
                b[28..32].copy_from_slice(&len.to_le_bytes());
            }
        }
        SnapDamage::BodyLen(len) => {
            if b.len() >= 12 {
                let at = b.len() - 12;
                b[at..at + 8].copy_from_slice(&len.to_le_bytes());
            }
        }
    }
}

#[test]
fn test_encoder_writes_what_the_snapshot_store_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let store = SnapshotStore::open(tmp.path()).unwrap();
    let meta = SnapshotMeta {
        index: 9,
        term: 2,
        meta: b"conf".to_vec(),
    };
    let mut w = store.create(&meta).unwrap();
    w.write_all(b"body bytes").unwrap();
    let f = w.finish().unwrap();
    assert_eq!(
        fs::read(f.path()).unwrap(),
        snapshot_bytes(9, 2, b"conf", b"body bytes")
    );
}

proptest! {
    #![proptest_config(config(128))]

    /// Arbitrary bytes, alone or behind a valid header.
    #[test]
    fn arbitrary_snapshot_bytes(
        header in any::<bool>(),
        garbage in prop::collection::vec(any::<u8>(), 0..400),
        chunks in prop::collection::vec(any::<Index>(), 0..6),
    ) {
        let mut bytes = if header {
            let mut h = snapshot_bytes(1, 1, b"m", b"");
            h.truncate(33);
            h
        } else {
            Vec::new()
        };
        bytes.extend_from_slice(&garbage);
        // Both verdicts are allowed; `snapshot_checked` checks that they agree.
        let _verdict = snapshot_checked(&bytes, &chunks)?;
    }

    /// A valid file, damaged, with the checksum left alone or made to match again. With
    /// the old checksum the damage is found; with a matching one, what verifies is
    /// consistent with its own framing.
    #[test]
    fn damaged_snapshots(
        index in edge_u64(),
        term in edge_u64(),
        meta in prop::collection::vec(any::<u8>(), 0..40),
        body in prop::collection::vec(any::<u8>(), 0..2000),
        damages in prop::collection::vec(snap_damage(), 1..3),
        recompute in any::<bool>(),
        chunks in prop::collection::vec(any::<Index>(), 0..6),
    ) {
        let original = snapshot_bytes(index, term, &meta, &body);
        let mut bytes = original.clone();
        for d in &damages {
            apply_snap_damage(&mut bytes, d);
        }
        if recompute {
            fix_crc(&mut bytes);
        }
        let verdict = snapshot_checked(&bytes, &chunks)?;
        if bytes == original {
            prop_assert!(verdict.is_ok(), "an undamaged file was refused: {:?}", verdict);
        } else if let Ok((m, b)) = &verdict {
            prop_assert!(recompute, "damage passed the checksum: {:?}", damages);
            let meta_len = u32::from_le_bytes(bytes[28..32].try_into().unwrap()) as usize;
            prop_assert_eq!(m.meta.len(), meta_len);
            prop_assert_eq!(32 + meta_len + b.len() + 12, bytes.len());
        }
    }
}
