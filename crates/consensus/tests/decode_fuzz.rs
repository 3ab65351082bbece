//! Fuzzed decoders of the consensus crate: what a node decodes from its peers (Raft
//! messages, snapshot streams) and from its own log (the Raft entries in WAL records,
//! the membership changes in them, the configuration in snapshot marks), from arbitrary
//! bytes and from valid encodings that are then damaged: bytes flipped, cut or spliced
//! in, and protobuf fields changed behind valid framing (length prefixes set to edge
//! values, tags and wire types changed, enums set out of range, fields dropped or
//! repeated).
//!
//! Whatever a peer sends, the node decodes it or refuses it, never panics, never stops,
//! and never allocates out of proportion to the bytes; a valid message is accepted (the
//! messages are mostly ones that make sense to the node, a lone voter, a follower or a
//! leader of three, so that they reach raft-rs). A snapshot stream is installed only if
//! it is a valid file with the MsgSnapshot for it, and a valid one is. A log with a
//! malformed record does not start, with an error that names the record's index; a log
//! that starts is applied as its entries decode. Each case runs on a fresh node in a
//! temporary directory, so a failure replays on its own; a panic on any of the node's
//! threads fails the case that caused it.
//!
//! Case counts are fixed and the seed is fixed, so CI runs the same cases in a few
//! seconds and a failure there replays locally as is. `PROPTEST_CASES=N` runs N cases
//! per property, `PROPTEST_RNG_SEED=S` other cases.

// The allocation probe below wraps the system allocator, which takes `unsafe`.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::{Duration, Instant};

use concord_consensus::{
    AttributesFuture, ChangeKind, Committed, Config, Configuration, Error, Inbox, MemberChange,
    Node, StateMachine, Transport, start,
};
use concord_storage::{HardState, SnapshotFile, SnapshotMark, SnapshotMeta, SnapshotStore, Wal};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::RngSeed;
use protobuf::{Message as _, ProtobufEnum as _};
use raft::eraftpb::{
    ConfChange, ConfChangeType, ConfState, Entry, EntryType, Message, MessageType, Snapshot,
    SnapshotMetadata,
};

// ---------------------------------------------------------------------------------------
// Harness: configuration, the allocation probe, and panics on any thread.

/// The seed of every property here unless `PROPTEST_RNG_SEED` says otherwise.
const SEED: u64 = 0xC0DE_C0DE_5EED_0008;

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

/// What decoding `input` bytes may allocate at once: a little, plus the decoded records
/// (an entry takes two bytes of input at least and `size_of::<Entry>()` decoded, and a
/// vector of them may have twice the room it needs).
fn allocation_bound(input: usize) -> usize {
    (64 << 10) + input * std::mem::size_of::<Entry>()
}

/// Panics on any thread of the test binary, as `thread: message` (the hook is installed
/// once; the default hook still prints them).
static PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn record_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current().name().unwrap_or("?").to_string();
            PANICS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(format!("{thread}: {info}"));
            default(info);
        }));
    });
}

/// Panics recorded on the threads of nodes (`raft`, `raft-apply`, ...), taken.
fn node_panics() -> Vec<String> {
    let mut all = PANICS.lock().unwrap_or_else(|e| e.into_inner());
    let (mine, rest): (Vec<_>, Vec<_>) = all.drain(..).partition(|p| p.starts_with("raft"));
    *all = rest;
    mine
}

fn fail(msg: String) -> TestCaseError {
    TestCaseError::fail(msg)
}

/// Whether `text` names `what` `n` (`"entry 12"` names entry 12, not entry 1).
fn names(text: &str, what: &str, n: u64) -> bool {
    let needle = format!("{what} {n}");
    text.match_indices(&needle).any(|(at, _)| {
        !text[at + needle.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

// ---------------------------------------------------------------------------------------
// A node to feed: a state machine that records what it is given, a transport that
// records where the node sends.

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Seen {
    /// (index, command) of each command applied.
    commands: Vec<(u64, Vec<u8>)>,
    /// (index, change) of each membership change applied.
    changes: Vec<(u64, MemberChange)>,
    restored: Option<(u64, u64, Vec<u8>)>,
}

struct Recorder {
    applied: u64,
    seen: Arc<Mutex<Seen>>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct MachineError(String);

impl StateMachine for Recorder {
    type Output = ();
    type Error = MachineError;

    fn applied_index(&self) -> u64 {
        self.applied
    }

    fn apply(&mut self, cmds: &[Committed<'_>]) -> Result<Vec<()>, MachineError> {
        let mut seen = self.seen.lock().unwrap();
        for c in cmds {
            seen.commands.push((c.index, c.data.to_vec()));
            self.applied = c.index;
        }
        Ok(vec![(); cmds.len()])
    }

    fn snapshot(&mut self) -> Result<Box<dyn Read + Send>, MachineError> {
        Ok(Box::new(std::io::Cursor::new(Vec::new())))
    }

    fn restore(&mut self, image: &mut dyn Read, index: u64, term: u64) -> Result<(), MachineError> {
        let mut body = Vec::new();
        image
            .read_to_end(&mut body)
            .map_err(|e| MachineError(e.to_string()))?;
        self.seen.lock().unwrap().restored = Some((index, term, body));
        self.applied = index;
        Ok(())
    }

    fn apply_change(
        &mut self,
        index: u64,
        change: &MemberChange,
        _config: &Configuration,
    ) -> Result<(), MachineError> {
        self.seen
            .lock()
            .unwrap()
            .changes
            .push((index, change.clone()));
        self.applied = index;
        Ok(())
    }
}

/// Records the recipient of every message the node sends.
#[derive(Default)]
struct Wire {
    sent_to: Mutex<Vec<u64>>,
    cond: Condvar,
    inbox: Mutex<Option<Inbox>>,
}

impl Transport for Wire {
    fn attach(&self, inbox: Inbox) {
        *self.inbox.lock().unwrap() = Some(inbox);
    }
    fn send(&self, msgs: Vec<Message>) {
        self.sent_to
            .lock()
            .unwrap()
            .extend(msgs.iter().map(|m| m.to));
        self.cond.notify_all();
    }
    fn send_snapshot(&self, msg: Message, _file: Arc<SnapshotFile>) {
        if let Some(inbox) = &*self.inbox.lock().unwrap() {
            inbox.snapshot_status(msg.to, false);
        }
    }
    fn fetch_attributes(&self, _url: &str) -> AttributesFuture {
        Box::pin(async { Err(Error::Stopped) })
    }
}

/// The node under test is member 1; 2 and 3 are the other voters when there are any.
const ME: u64 = 1;
/// A member id no configuration here has.
const STRANGER: u64 = 9;
/// Barrier messages come from ids above this one, one id per barrier.
const BARRIER_BASE: u64 = 0xBA44_0000;
static BARRIERS: AtomicU64 = AtomicU64::new(0);

/// One node at a time in this binary, so a panic on a node's thread is its own.
static ONE_NODE: Mutex<()> = Mutex::new(());

struct Fixture {
    node: Option<Node<()>>,
    /// What was stepped, as raft-proto decodes it, for failure messages.
    stepped: Mutex<Vec<String>>,
    wire: Arc<Wire>,
    seen: Arc<Mutex<Seen>>,
    /// Removed after the node is shut down.
    _dir: tempfile::TempDir,
    _alone: std::sync::MutexGuard<'static, ()>,
}

fn node_config(dir: &Path, voters: &[u64]) -> Config {
    let mut cfg = Config::new(ME, voters.to_vec(), dir.to_path_buf());
    cfg.tick = Duration::from_millis(10);
    cfg.election_ticks = 10;
    cfg.request_timeout = Duration::from_secs(2);
    cfg
}

impl Fixture {
    /// A fresh node with `voters` (a single voter leads at once).
    fn new(voters: &[u64]) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        match Fixture::open(dir, voters, 0) {
            Ok(f) => f,
            Err(e) => panic!("a fresh node does not start: {e}"),
        }
    }

    /// A node over whatever `dir` holds, its state machine having applied `applied`.
    fn open(dir: tempfile::TempDir, voters: &[u64], applied: u64) -> Result<Fixture, Error> {
        record_panics();
        let alone = ONE_NODE.lock().unwrap_or_else(|e| e.into_inner());
        // Whatever an earlier node left behind is not this one's.
        node_panics();
        let wire = Arc::new(Wire::default());
        let seen = Arc::new(Mutex::new(Seen::default()));
        let sm = Recorder {
            applied,
            seen: seen.clone(),
        };
        let node = start(node_config(dir.path(), voters), sm, wire.clone())?;
        Ok(Fixture {
            node: Some(node),
            stepped: Mutex::new(Vec::new()),
            wire,
            seen,
            _dir: dir,
            _alone: alone,
        })
    }

    fn handle(&self) -> &concord_consensus::Handle<()> {
        &self.node.as_ref().unwrap().handle
    }

    /// Whether the node has stopped (a failed thread stops it; a panicked one is seen
    /// by the panic hook).
    fn stopped(&self) -> bool {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(Duration::ZERO, self.handle().stopped())
                .await
                .is_ok()
        })
    }

    /// Waits until the raft thread has handled everything stepped so far: a pre-vote
    /// request from a fresh id is always answered (granted or not), and answers leave
    /// in order. Fails if the node panicked or stopped instead.
    fn barrier(&self) -> Result<(), TestCaseError> {
        let from = BARRIER_BASE + BARRIERS.fetch_add(1, Ordering::Relaxed);
        let mut m = Message {
            to: ME,
            from,
            term: 1,
            ..Message::default()
        };
        m.set_msg_type(MessageType::MsgRequestPreVote);
        self.handle().inbox().step(m);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut sent = self.wire.sent_to.lock().unwrap();
        let stepped = || self.stepped.lock().unwrap().join("\n");
        while !sent.contains(&from) {
            let panics = node_panics();
            prop_assert!(
                panics.is_empty(),
                "the node panicked: {:?}\nafter it was given:\n{}",
                panics,
                stepped()
            );
            prop_assert!(
                Instant::now() < deadline,
                "the node stopped answering after it was given:\n{}",
                stepped()
            );
            sent = self
                .wire
                .cond
                .wait_timeout(sent, Duration::from_millis(20))
                .unwrap()
                .0;
        }
        sent.clear();
        drop(sent);
        let panics = node_panics();
        prop_assert!(
            panics.is_empty(),
            "the node panicked: {:?}\nafter it was given:\n{}",
            panics,
            stepped()
        );
        prop_assert!(
            !self.stopped(),
            "the node stopped after it was given:\n{}",
            stepped()
        );
        Ok(())
    }

    /// Makes the node the leader of three voters: it campaigns and member 2 grants its
    /// pre-vote and its vote.
    fn lead(&self) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let wait = |role: concord_consensus::Role| {
            rt.block_on(async {
                let mut s = self.handle().subscribe();
                tokio::time::timeout(Duration::from_secs(10), s.wait_for(|s| s.role == role))
                    .await
                    .expect("role reached in time")
                    .expect("node running")
                    .term
            })
        };
        rt.block_on(self.handle().campaign()).unwrap();
        let term = wait(concord_consensus::Role::PreCandidate);
        let grant = |t: MessageType, term: u64| {
            let mut m = Message {
                to: ME,
                from: 2,
                term,
                ..Message::default()
            };
            m.set_msg_type(t);
            self.handle().inbox().step(m);
        };
        grant(MessageType::MsgRequestPreVoteResponse, term + 1);
        let term = wait(concord_consensus::Role::Candidate);
        grant(MessageType::MsgRequestVoteResponse, term);
        wait(concord_consensus::Role::Leader);
    }

    /// Waits until the node has applied `index`, or fails.
    fn applied(&self, index: u64) -> Result<(), TestCaseError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.handle().status().applied < index {
            let panics = node_panics();
            prop_assert!(panics.is_empty(), "the node panicked: {:?}", panics);
            prop_assert!(
                Instant::now() < deadline && !self.stopped(),
                "the node did not apply up to {index}: {:?}",
                self.handle().status()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(n) = self.node.take() {
            n.shutdown();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Protobuf encodings as trees of fields, to damage behind valid framing.

#[derive(Debug, Clone, PartialEq)]
enum Value {
    Varint(u64),
    Fixed64(u64),
    Fixed32(u32),
    Bytes(Vec<u8>),
    /// A length-delimited value that is itself a well-formed message.
    Message(Vec<Field>),
}

#[derive(Debug, Clone, PartialEq)]
struct Field {
    number: u64,
    wire: u8,
    value: Value,
    /// A length prefix written instead of the true one.
    len: Option<u64>,
}

fn read_varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at)?;
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

fn write_varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The fields of `b` if it is a well-formed message (nested messages parsed too, to
/// `depth` levels), `None` if it is not.
fn parse_fields(b: &[u8], depth: u32) -> Option<Vec<Field>> {
    let mut at = 0;
    let mut fields = Vec::new();
    while at < b.len() {
        let tag = read_varint(b, &mut at)?;
        let (number, wire) = (tag >> 3, (tag & 7) as u8);
        if number == 0 {
            return None;
        }
        let value = match wire {
            0 => Value::Varint(read_varint(b, &mut at)?),
            1 => {
                let v = b.get(at..at + 8)?;
                at += 8;
                Value::Fixed64(u64::from_le_bytes(v.try_into().unwrap()))
            }
            5 => {
                let v = b.get(at..at + 4)?;
                at += 4;
                Value::Fixed32(u32::from_le_bytes(v.try_into().unwrap()))
            }
            2 => {
                let len = usize::try_from(read_varint(b, &mut at)?).ok()?;
                let v = b.get(at..at.checked_add(len)?)?;
                at += len;
                match (depth > 0 && !v.is_empty())
                    .then(|| parse_fields(v, depth - 1))
                    .flatten()
                {
                    Some(inner) => Value::Message(inner),
                    None => Value::Bytes(v.to_vec()),
                }
            }
            _ => return None,
        };
        fields.push(Field {
            number,
            wire,
            value,
            len: None,
        });
    }
    Some(fields)
}

fn encode_fields(fields: &[Field], out: &mut Vec<u8>) {
    for f in fields {
        write_varint((f.number << 3) | u64::from(f.wire), out);
        match &f.value {
            Value::Varint(v) => write_varint(*v, out),
            Value::Fixed64(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::Fixed32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::Bytes(b) => {
                write_varint(f.len.unwrap_or(b.len() as u64), out);
                out.extend_from_slice(b);
            }
            Value::Message(inner) => {
                let mut b = Vec::new();
                encode_fields(inner, &mut b);
                write_varint(f.len.unwrap_or(b.len() as u64), out);
                out.extend_from_slice(&b);
            }
        }
    }
}

/// A change to one field of an encoding, at any depth.
#[derive(Debug, Clone)]
enum Edit {
    /// The value replaced by a varint (an enum out of range, an index at an edge, or a
    /// length-delimited field turned into a number).
    Varint(Index, u64),
    /// The length prefix of a length-delimited field set to a wrong value.
    Len(Index, u64),
    /// The field number or wire type changed.
    Tag(Index, u64, u8),
    /// The value replaced by bytes.
    Bytes(Index, Vec<u8>),
    Drop(Index),
    Repeat(Index),
}

fn edge_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(u64::MAX - 1),
        Just(u64::from(u32::MAX)),
        Just(i64::MAX as u64),
        0u64..20,
        any::<u64>(),
    ]
}

/// Length prefixes at the edges: a little off, the 10 MB rust-protobuf reserves at
/// most, the 64 MiB the peer service accepts, beyond everything.
fn length_value() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..64,
        Just(9_999_999),
        Just(10_000_000),
        Just(64 << 20),
        Just(u64::from(u32::MAX)),
        Just(u64::from(u32::MAX) + 1),
        Just(u64::MAX),
        any::<u64>(),
    ]
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        3 => (any::<Index>(), edge_u64()).prop_map(|(i, v)| Edit::Varint(i, v)),
        3 => (any::<Index>(), length_value()).prop_map(|(i, v)| Edit::Len(i, v)),
        2 => (any::<Index>(), prop_oneof![0u64..20, any::<u64>()], 0u8..8)
            .prop_map(|(i, n, w)| Edit::Tag(i, n, w)),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 0..12))
            .prop_map(|(i, b)| Edit::Bytes(i, b)),
        1 => any::<Index>().prop_map(Edit::Drop),
        1 => any::<Index>().prop_map(Edit::Repeat),
    ]
}

fn count_fields(fields: &[Field]) -> usize {
    fields
        .iter()
        .map(|f| {
            1 + match &f.value {
                Value::Message(inner) => count_fields(inner),
                _ => 0,
            }
        })
        .sum()
}

/// Applies `edit` to field number `target` in depth-first order.
fn edit_nth(fields: &mut Vec<Field>, target: &mut usize, edit: &Edit) -> bool {
    let mut i = 0;
    while i < fields.len() {
        if *target == 0 {
            let f = &mut fields[i];
            match edit {
                Edit::Varint(_, v) => {
                    f.wire = 0;
                    f.value = Value::Varint(*v);
                    f.len = None;
                }
                Edit::Len(_, len) => {
                    if f.wire == 2 {
                        f.len = Some(*len);
                    }
                }
                Edit::Tag(_, number, wire) => {
                    f.number = *number;
                    f.wire = *wire;
                }
                Edit::Bytes(_, b) => {
                    f.wire = 2;
                    f.value = Value::Bytes(b.clone());
                    f.len = None;
                }
                Edit::Drop(_) => {
                    fields.remove(i);
                }
                Edit::Repeat(_) => {
                    let copy = fields[i].clone();
                    fields.insert(i, copy);
                }
            }
            return true;
        }
        *target -= 1;
        if let Value::Message(inner) = &mut fields[i].value
            && edit_nth(inner, target, edit)
        {
            return true;
        }
        i += 1;
    }
    false
}

/// `bytes`, a valid encoding, with `edits` applied to its fields and framed again.
fn apply_edits(bytes: &[u8], edits: &[Edit]) -> Vec<u8> {
    let Some(mut fields) = parse_fields(bytes, 4) else {
        return bytes.to_vec();
    };
    for e in edits {
        let n = count_fields(&fields);
        if n == 0 {
            break;
        }
        let (Edit::Varint(at, _)
        | Edit::Len(at, _)
        | Edit::Tag(at, _, _)
        | Edit::Bytes(at, _)
        | Edit::Drop(at)
        | Edit::Repeat(at)) = e;
        let mut target = at.index(n);
        edit_nth(&mut fields, &mut target, e);
    }
    let mut out = Vec::new();
    encode_fields(&fields, &mut out);
    out
}

/// Damage to bytes, as a disk or a broken peer would do it.
#[derive(Debug, Clone)]
enum Damage {
    Flip(Index, u8),
    Cut(Index),
    Splice(Index, usize, Vec<u8>),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        3 => (any::<Index>(), 1u8..).prop_map(|(i, x)| Damage::Flip(i, x)),
        1 => any::<Index>().prop_map(Damage::Cut),
        1 => (any::<Index>(), 0usize..8, prop::collection::vec(any::<u8>(), 0..8))
            .prop_map(|(i, n, b)| Damage::Splice(i, n, b)),
    ]
}

fn apply_damage(b: &mut Vec<u8>, d: &Damage) {
    match d {
        Damage::Flip(at, x) => {
            if !b.is_empty() {
                let i = at.index(b.len());
                b[i] ^= x;
            }
        }
        Damage::Cut(at) => b.truncate(at.index(b.len() + 1)),
        Damage::Splice(at, remove, insert) => {
            let i = at.index(b.len() + 1);
            let end = (i + remove).min(b.len());
            b.splice(i..end, insert.iter().copied());
        }
    }
}

/// A valid encoding damaged: field edits behind valid framing, then byte damage.
#[derive(Debug, Clone)]
struct Harm {
    edits: Vec<Edit>,
    damages: Vec<Damage>,
}

impl Harm {
    fn none() -> Harm {
        Harm {
            edits: Vec::new(),
            damages: Vec::new(),
        }
    }

    fn apply(&self, bytes: &[u8]) -> Vec<u8> {
        let mut b = apply_edits(bytes, &self.edits);
        for d in &self.damages {
            apply_damage(&mut b, d);
        }
        b
    }
}

fn harm() -> impl Strategy<Value = Harm> {
    prop_oneof![
        1 => Just(Harm::none()),
        3 => (prop::collection::vec(edit(), 1..3), prop::collection::vec(damage(), 0..2))
            .prop_map(|(edits, damages)| Harm { edits, damages }),
        1 => prop::collection::vec(damage(), 1..3)
            .prop_map(|damages| Harm { edits: Vec::new(), damages }),
    ]
}

// ---------------------------------------------------------------------------------------
// Raft records as the node writes and sends them.

fn conf_change_bytes(kind: ConfChangeType, node: u64, proposal: u64, context: &[u8]) -> Vec<u8> {
    let mut cc = ConfChange::default();
    cc.set_change_type(kind);
    cc.node_id = node;
    let mut ctx = proposal.to_be_bytes().to_vec();
    ctx.extend_from_slice(context);
    cc.context = ctx.into();
    cc.write_to_bytes().unwrap()
}

/// What an entry holds: the kinds a node writes, and kinds no correct node writes.
#[derive(Debug, Clone)]
enum Body {
    /// A proposal: its id and the command.
    Command(u64, Vec<u8>),
    /// A new leader's empty entry.
    Empty,
    /// A learner added or a member removed (never a voter added: the node under test
    /// stays the only voter that can commit).
    Change(bool, u64, u64, Vec<u8>),
    /// Normal data too short to hold a proposal id.
    Short(Vec<u8>),
    /// A membership change entry whose data is not one.
    Garbage(Vec<u8>),
    /// A joint membership change.
    Joint(Vec<u8>),
}

impl Body {
    fn entry(&self, index: u64, term: u64) -> Entry {
        let mut e = Entry {
            index,
            term,
            ..Entry::default()
        };
        let (kind, data) = match self {
            Body::Command(id, cmd) => {
                let mut d = id.to_be_bytes().to_vec();
                d.extend_from_slice(cmd);
                (EntryType::EntryNormal, d)
            }
            Body::Empty => (EntryType::EntryNormal, Vec::new()),
            Body::Change(learner, node, proposal, ctx) => {
                let kind = if *learner {
                    ConfChangeType::AddLearnerNode
                } else {
                    ConfChangeType::RemoveNode
                };
                (
                    EntryType::EntryConfChange,
                    conf_change_bytes(kind, *node, *proposal, ctx),
                )
            }
            Body::Short(d) => (EntryType::EntryNormal, d.clone()),
            Body::Garbage(d) => (EntryType::EntryConfChange, d.clone()),
            Body::Joint(d) => (EntryType::EntryConfChangeV2, d.clone()),
        };
        e.set_entry_type(kind);
        e.data = data.into();
        e
    }
}

fn valid_body() -> impl Strategy<Value = Body> {
    let bytes = || prop::collection::vec(any::<u8>(), 0..24);
    prop_oneof![
        5 => (any::<u64>(), bytes()).prop_map(|(id, c)| Body::Command(id, c)),
        1 => Just(Body::Empty),
        2 => (any::<bool>(), 4u64..8, any::<u64>(), bytes())
            .prop_map(|(l, n, p, c)| Body::Change(l, n, p, c)),
    ]
}

fn body() -> impl Strategy<Value = Body> {
    let bytes = || prop::collection::vec(any::<u8>(), 0..24);
    prop_oneof![
        6 => valid_body(),
        1 => prop::collection::vec(any::<u8>(), 1..8).prop_map(Body::Short),
        1 => bytes().prop_map(Body::Garbage),
        1 => bytes().prop_map(Body::Joint),
    ]
}

// ---------------------------------------------------------------------------------------
// Messages from peers.

const MESSAGE_TYPES: i32 = 19;

/// A message as a peer might send it: mostly fields that make sense for the node under
/// test (its id, the other members, terms and indexes near its own), sometimes not.
fn peer_message() -> impl Strategy<Value = Message> {
    let member = || prop_oneof![4 => Just(2u64), 2 => Just(3u64), 1 => Just(STRANGER), 1 => Just(0u64), 1 => Just(ME)];
    let near = || prop_oneof![4 => 0u64..6, 1 => edge_u64()];
    let entries = prop::collection::vec((body(), near()), 0..4);
    (
        (
            0..MESSAGE_TYPES,
            prop_oneof![6 => Just(ME), 1 => Just(2u64), 1 => Just(0u64)],
            member(),
        ),
        (near(), near(), near(), near()),
        (entries, any::<bool>()),
        (
            any::<bool>(),
            near(),
            prop::collection::vec(any::<u8>(), 0..8),
        ),
        prop::option::of((near(), near(), prop::collection::vec(near(), 0..4))),
    )
        .prop_map(
            |(
                (t, to, from),
                (term, log_term, index, commit),
                (ents, contiguous),
                (reject, hint, ctx),
                snap,
            )| {
                let mut m = Message {
                    to,
                    from,
                    term,
                    log_term,
                    index,
                    commit,
                    reject,
                    reject_hint: hint,
                    ..Message::default()
                };
                m.set_msg_type(MessageType::from_i32(t).unwrap());
                m.context = ctx.into();
                let ents: Vec<Entry> = ents
                    .iter()
                    .enumerate()
                    .map(|(i, (b, at))| {
                        let at = if contiguous {
                            index.wrapping_add(1 + i as u64)
                        } else {
                            *at
                        };
                        b.entry(at, term)
                    })
                    .collect();
                m.set_entries(ents.into());
                if let Some((si, st, voters)) = snap {
                    let mut s = Snapshot::default();
                    let mut md = SnapshotMetadata {
                        index: si,
                        term: st,
                        ..SnapshotMetadata::default()
                    };
                    md.set_conf_state(ConfState::from((voters, Vec::<u64>::new())));
                    s.set_metadata(md);
                    m.set_snapshot(s);
                }
                m
            },
        )
}

impl Fixture {
    /// Steps `bytes` as received from a peer: decoded with an allocation bounded by
    /// their length, or refused as undecodable. Returns whether they were decoded.
    fn step_checked(&self, bytes: &[u8]) -> Result<bool, TestCaseError> {
        self.stepped.lock().unwrap().push(format!(
            "{:?}",
            reference::<Message>(bytes).ok_or("(undecodable)")
        ));
        step_checked(&self.handle().inbox(), bytes)
    }
}

fn step_checked(inbox: &Inbox, bytes: &[u8]) -> Result<bool, TestCaseError> {
    let (r, largest) = largest_allocation(|| inbox.step_bytes(bytes));
    prop_assert!(
        largest <= allocation_bound(bytes.len()),
        "decoding {} bytes from a peer allocated {largest} at once",
        bytes.len()
    );
    match r {
        Ok(()) => Ok(true),
        Err(Error::Decode { what, .. }) if what == "raft message" => Ok(false),
        Err(other) => Err(fail(format!("unexpected error kind: {other:?}"))),
    }
}

#[test]
fn test_tree_encoding_is_the_identity() {
    let m = {
        let mut m = Message {
            to: 1,
            from: 2,
            term: 3,
            ..Message::default()
        };
        m.set_msg_type(MessageType::MsgAppend);
        m.set_entries(vec![Body::Command(7, b"x".to_vec()).entry(4, 3)].into());
        m
    };
    let bytes = m.write_to_bytes().unwrap();
    assert_eq!(apply_edits(&bytes, &[]), bytes);
    assert_eq!(Harm::none().apply(&bytes), bytes);
}

/// Regression: an empty proposal from a peer panicked raft-rs on the leader ("stepped
/// empty MsgProp"), a heartbeat of term 0 a candidate, a read request without entries
/// a leader; a leadership transfer from a non-member made a single voter win before
/// its log was durable.
#[test]
fn messages_raft_rs_would_panic_on_are_refused() {
    let msg = |t: MessageType, from: u64, term: u64| {
        let mut m = Message {
            to: ME,
            from,
            term,
            ..Message::default()
        };
        m.set_msg_type(t);
        m
    };
    let leader = Fixture::new(&[ME]);
    leader.barrier().unwrap();
    let mut after_append = msg(MessageType::MsgAppend, STRANGER, 50);
    after_append.set_entries(vec![Body::Empty.entry(1, 50)].into());
    for m in [
        msg(MessageType::MsgPropose, 2, 0),
        msg(MessageType::MsgReadIndex, 2, 0),
        after_append,
        msg(MessageType::MsgTimeoutNow, STRANGER, 60),
    ] {
        leader
            .handle()
            .inbox()
            .step_bytes(&m.write_to_bytes().unwrap())
            .unwrap();
    }
    leader.barrier().unwrap();
    drop(leader);
    let candidate = Fixture::new(&[ME, 2, 3]);
    candidate
        .handle()
        .inbox()
        .step(msg(MessageType::MsgHeartbeat, 2, 0));
    candidate.barrier().unwrap();
    // A rust-protobuf length prefix of 9 999 999 bytes with none behind it was
    // reserved before it was checked.
    let (r, largest) = largest_allocation(|| {
        candidate
            .handle()
            .inbox()
            .step_bytes(&[0x62, 0xff, 0xac, 0xe2, 0x04])
    });
    assert!(r.is_err());
    assert!(largest < 1 << 20, "allocated {largest}");
}

/// The node under test: a lone voter (it leads at once), or one of three that follows
/// or leads.
#[derive(Debug, Clone, Copy)]
enum Voters {
    Alone,
    Follower,
    Leader,
}

fn voters() -> impl Strategy<Value = Voters> {
    prop_oneof![
        Just(Voters::Alone),
        Just(Voters::Follower),
        Just(Voters::Leader)
    ]
}

impl Voters {
    fn fixture(self) -> Fixture {
        match self {
            Voters::Alone => Fixture::new(&[ME]),
            Voters::Follower => Fixture::new(&[ME, 2, 3]),
            Voters::Leader => {
                let f = Fixture::new(&[ME, 2, 3]);
                f.lead();
                f
            }
        }
    }
}

proptest! {
    #![proptest_config(config(96))]

    /// Arbitrary bytes from a peer, alone or behind a valid message.
    #[test]
    fn arbitrary_bytes_from_a_peer(
        voters in voters(),
        inputs in prop::collection::vec(
            (prop::option::of(peer_message()), prop::collection::vec(any::<u8>(), 0..300)),
            1..6,
        ),
    ) {
        let f = voters.fixture();
        for (prefix, garbage) in &inputs {
            let mut bytes = prefix.as_ref().map_or_else(Vec::new, |m| m.write_to_bytes().unwrap());
            bytes.extend_from_slice(garbage);
            f.step_checked(&bytes)?;
        }
        f.barrier()?;
    }

    /// Messages a peer might send, valid or damaged: every valid encoding is accepted,
    /// every damaged one decoded or refused, and the node stays up.
    #[test]
    fn damaged_peer_messages(
        voters in voters(),
        msgs in prop::collection::vec((peer_message(), harm()), 1..6),
    ) {
        let f = voters.fixture();
        for (m, h) in &msgs {
            let valid = m.write_to_bytes().unwrap();
            let bytes = h.apply(&valid);
            let decoded = f.step_checked(&bytes)?;
            if bytes == valid {
                prop_assert!(decoded, "a valid message was refused: {:?}", m);
            }
        }
        f.barrier()?;
    }
}

// ---------------------------------------------------------------------------------------
// The log: WAL records holding Raft entries, as a node reads them back on start.

/// A log to start from: entries from index 1 (or after a snapshot), the hard state's
/// commit, what the state machine has applied, and one record damaged.
#[derive(Debug, Clone)]
struct Log {
    /// What the entries hold (all valid; the damaged one is `replace`d first).
    bodies: Vec<Body>,
    term: u64,
    /// Positions, each taken modulo the number of choices: the commit index among
    /// those after the snapshot, the applied index among those up to the commit.
    commit: usize,
    applied: usize,
    /// A snapshot mark (and its file, with this body) at this position of the log.
    snapshot: Option<(usize, Vec<u8>)>,
    /// Which record is damaged (an entry, or the mark if any) and how: an entry's
    /// body replaced (maybe by one no node writes), then its encoding harmed.
    target: usize,
    replace: Option<Body>,
    harm: Harm,
}

fn log() -> impl Strategy<Value = Log> {
    (
        prop::collection::vec(valid_body(), 1..12),
        1u64..5,
        (any::<usize>(), any::<usize>()),
        prop::option::of((any::<usize>(), prop::collection::vec(any::<u8>(), 0..32))),
        (any::<usize>(), prop::option::of(body()), harm()),
    )
        .prop_map(
            |(bodies, term, (commit, applied), snapshot, (target, replace, harm))| Log {
                bodies,
                term,
                commit,
                applied,
                snapshot,
                target,
                replace,
                harm,
            },
        )
}

/// The configuration the logs here start from: the node and two others.
fn conf_bytes() -> Vec<u8> {
    ConfState::from((vec![ME, 2, 3], Vec::<u64>::new()))
        .write_to_bytes()
        .unwrap()
}

/// `b` decoded with raft-proto's own decoder, if it is a well-formed message. (That
/// decoder is lenient with an outermost message or packed field whose length prefix
/// runs past the input: it reads what is there. The node refuses it.)
fn reference<M: protobuf::Message>(b: &[u8]) -> Option<M> {
    parse_fields(b, 0)?;
    M::parse_from_bytes(b).ok()
}

/// Whether `cs` is a configuration Concord makes: one member changed at a time (never
/// joint), every member once, none of id 0.
fn concord_made(cs: &ConfState) -> bool {
    let mut ids: Vec<u64> = cs.voters.iter().chain(&cs.learners).copied().collect();
    ids.sort_unstable();
    ids.dedup();
    ids.len() == cs.voters.len() + cs.learners.len()
        && !ids.contains(&0)
        && cs.voters_outgoing.is_empty()
        && cs.learners_next.is_empty()
        && !cs.auto_leave
}

/// A log as written: its positions, and its records as a node must decode them.
#[derive(Debug)]
struct Written {
    /// The snapshot's index and body, if there is one.
    snapshot: Option<(u64, Vec<u8>)>,
    commit: u64,
    /// What the state machine has applied.
    applied: u64,
    /// The entries, decoded with raft-proto's own decoder; `Err(index)` if the record
    /// at `index` must be refused.
    entries: Result<Vec<Entry>, u64>,
}

impl Log {
    fn write(&self, dir: &Path) -> Written {
        let n = self.bodies.len() as u64;
        let snap = self
            .snapshot
            .as_ref()
            .map(|(at, body)| ((at % self.bodies.len()) as u64 + 1, body.clone()));
        let base = snap.as_ref().map_or(0, |s| s.0);
        let commit = base + (self.commit as u64 % (n - base + 1));
        let applied = self.applied as u64 % (commit + 1);
        let t = self.target % ((n - base) as usize + usize::from(snap.is_some()));
        let mut records: Vec<(u64, Vec<u8>)> = (base + 1..=n)
            .map(|i| {
                let mut body = &self.bodies[(i - 1) as usize];
                if i == base + 1 + t as u64
                    && let Some(other) = &self.replace
                {
                    body = other;
                }
                (i, body.entry(i, self.term).write_to_bytes().unwrap())
            })
            .collect();
        let mut mark_meta = conf_bytes();
        if t < records.len() {
            records[t].1 = self.harm.apply(&records[t].1);
        } else {
            mark_meta = self.harm.apply(&mark_meta);
        }

        let (mut wal, _) = Wal::open(&dir.join("wal"), Default::default()).unwrap();
        if let Some((index, body)) = &snap {
            let store = SnapshotStore::open(&dir.join("snap")).unwrap();
            let mut w = store
                .create(&SnapshotMeta {
                    index: *index,
                    term: self.term,
                    meta: conf_bytes(),
                })
                .unwrap();
            w.write_all(body).unwrap();
            w.finish().unwrap();
            wal.mark_snapshot(&SnapshotMark {
                index: *index,
                term: self.term,
                meta: mark_meta.clone(),
            })
            .unwrap();
        }
        let entries: Vec<concord_storage::Entry> = records
            .iter()
            .map(|(index, data)| concord_storage::Entry {
                index: *index,
                term: self.term,
                data: data.clone(),
            })
            .collect();
        let hs = HardState {
            term: self.term,
            vote: 0,
            commit,
        };
        wal.append(&entries, Some(&hs)).unwrap();
        drop(wal);

        Written {
            entries: self.decoded(snap.as_ref().map(|s| s.0), &mark_meta, &records),
            snapshot: snap,
            commit,
            applied,
        }
    }

    /// The records as a node must decode them, or the index of the first it must
    /// refuse.
    fn decoded(
        &self,
        mark: Option<u64>,
        meta: &[u8],
        records: &[(u64, Vec<u8>)],
    ) -> Result<Vec<Entry>, u64> {
        if let Some(index) = mark
            && !reference::<ConfState>(meta).is_some_and(|cs| concord_made(&cs))
        {
            return Err(index);
        }
        let mut entries = Vec::new();
        for (index, data) in records {
            let e = reference::<Entry>(data).ok_or(*index)?;
            let change_ok = match e.get_entry_type() {
                EntryType::EntryNormal => true,
                EntryType::EntryConfChange => reference::<ConfChange>(&e.data).is_some(),
                EntryType::EntryConfChangeV2 => false,
            };
            if (e.index, e.term) != (*index, self.term) || !change_ok {
                return Err(*index);
            }
            entries.push(e);
        }
        Ok(entries)
    }
}

impl Written {
    /// What the state machine must be given, in order, by a node started on this log
    /// that applies it to `upto`.
    fn seen(&self, entries: &[Entry], term: u64, upto: u64) -> Seen {
        let mut seen = Seen::default();
        let mut from = self.applied;
        if let Some((index, body)) = &self.snapshot
            && self.applied < *index
        {
            seen.restored = Some((*index, term, body.clone()));
            from = *index;
        }
        for e in entries.iter().filter(|e| e.index > from && e.index <= upto) {
            if e.get_entry_type() == EntryType::EntryNormal {
                if e.data.len() >= 8 {
                    seen.commands.push((e.index, e.data[8..].to_vec()));
                }
                continue;
            }
            let cc = ConfChange::parse_from_bytes(&e.data).unwrap();
            let kind = match cc.get_change_type() {
                ConfChangeType::AddNode => ChangeKind::AddVoter,
                ConfChangeType::AddLearnerNode => ChangeKind::AddLearner,
                ConfChangeType::RemoveNode => ChangeKind::Remove,
            };
            let context = cc.context.get(8..).unwrap_or(&cc.context).to_vec();
            let change = MemberChange {
                kind,
                id: cc.node_id,
                context,
            };
            seen.changes.push((e.index, change));
        }
        seen
    }
}

#[test]
fn test_a_valid_log_is_applied_as_written() {
    let log = Log {
        bodies: vec![
            Body::Command(1, b"one".to_vec()),
            Body::Empty,
            Body::Change(true, 5, 2, b"ctx".to_vec()),
            Body::Command(3, b"three".to_vec()),
        ],
        term: 2,
        commit: 4,
        applied: 0,
        snapshot: None,
        target: 0,
        replace: None,
        harm: Harm::none(),
    };
    let dir = tempfile::tempdir().unwrap();
    let w = log.write(dir.path());
    assert_eq!(w.commit, 4);
    let entries = w.entries.as_ref().unwrap();
    let f = Fixture::open(dir, &[ME, 2, 3], w.applied).unwrap();
    f.applied(4).unwrap();
    let seen = f.seen.lock().unwrap().clone();
    assert_eq!(seen, w.seen(entries, 2, 4));
    assert_eq!(seen.commands.len(), 2);
    assert_eq!(seen.changes.len(), 1);
}

/// Regression: a WAL record holding another entry than its own index and term was
/// taken as is (raft-rs then panics on the log it was given), and a joint membership
/// change or an undecodable one beyond the applied index stopped the node after it
/// started instead of refusing the start.
#[test]
fn a_malformed_entry_is_refused_at_start_naming_its_index() {
    for (bodies, target_body) in [
        (
            Body::Command(1, b"x".to_vec()),
            Some(Body::Command(2, b"y".to_vec()).entry(7, 1)),
        ),
        (Body::Joint(b"cc".to_vec()), None),
        (Body::Garbage(vec![0xff; 3]), None),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(&dir.path().join("wal"), Default::default()).unwrap();
        let mut e = bodies.entry(1, 1);
        if let Some(other) = target_body {
            e = other;
        }
        wal.append(
            &[concord_storage::Entry {
                index: 1,
                term: 1,
                data: e.write_to_bytes().unwrap(),
            }],
            Some(&HardState {
                term: 1,
                vote: 0,
                commit: 0,
            }),
        )
        .unwrap();
        drop(wal);
        let err = Fixture::open(dir, &[ME, 2, 3], 0).err().expect("refused");
        assert!(names(&err.to_string(), "entry", 1), "{err}");
    }
}

proptest! {
    #![proptest_config(config(128))]

    /// A node started on a log with a damaged record (behind a valid checksum, so the
    /// WAL hands it over): it refuses to start, naming the record's index, or it starts
    /// and its state machine is given exactly the committed entries as they decode.
    #[test]
    fn logs_with_damaged_entries(log in log()) {
        let dir = tempfile::tempdir().unwrap();
        let w = log.write(dir.path());
        // Three voters: the node follows (it cannot win alone) and applies what the
        // hard state commits (unless a damaged configuration makes it the only voter:
        // then it leads and applies the whole log).
        let started = Fixture::open(dir, &[ME, 2, 3], w.applied);
        match (started, &w.entries) {
            (Err(e), Err(index)) => {
                let text = e.to_string();
                prop_assert!(
                    names(&text, "entry", *index) || names(&text, "snapshot mark", *index),
                    "the error does not name record {}: {}", index, text
                );
            }
            (Err(e), Ok(_)) => return Err(fail(format!("a valid log was refused: {e}"))),
            (Ok(f), Err(index)) => {
                return Err(fail(format!(
                    "a log whose record {index} is malformed started: {:?}",
                    f.handle().status()
                )));
            }
            (Ok(f), Ok(entries)) => {
                f.applied(w.commit)?;
                f.barrier()?;
                // A node that leads may be applying past the commit still: what it has
                // given so far must be the log's prefix.
                let got = f.seen.lock().unwrap().clone();
                let newest = got.commands.iter().map(|c| c.0);
                let upto = newest.chain(got.changes.iter().map(|c| c.0)).fold(w.commit, u64::max);
                prop_assert_eq!(got, w.seen(entries, log.term, upto));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Snapshot streams: what the peer service receives, over gRPC.

/// The peer protocol's snapshot chunk (`proto/peer.proto`).
#[derive(Clone, PartialEq, prost::Message)]
struct SnapshotChunk {
    #[prost(bytes = "vec", tag = "1")]
    message: Vec<u8>,
    #[prost(uint64, tag = "2")]
    total_bytes: u64,
    #[prost(bytes = "vec", tag = "3")]
    data: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Done {}

/// The node's `Peer` service on a local port, served on `rt`.
fn serve(rt: &tokio::runtime::Runtime, inbox: Inbox) -> std::net::SocketAddr {
    let _in_rt = rt.enter();
    let incoming =
        tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = incoming.local_addr().unwrap();
    let svc = concord_consensus::grpc::peer_service(inbox, Arc::new(Vec::new));
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming),
    );
    addr
}

/// Streams `chunks` to the `Snapshot` call of the peer service at `addr`.
async fn send_chunks(
    addr: std::net::SocketAddr,
    chunks: Vec<SnapshotChunk>,
) -> Result<(), tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/concord.peer.Peer/Snapshot");
    let codec = tonic_prost::ProstCodec::<SnapshotChunk, Done>::default();
    grpc.client_streaming(tonic::Request::new(tokio_stream::iter(chunks)), path, codec)
        .await
        .map(|_| ())
}

/// A snapshot as a leader sends it: its file's bytes and the MsgSnapshot for it.
#[derive(Debug, Clone)]
struct Sent {
    index: u64,
    term: u64,
    body: Vec<u8>,
    /// The message's bytes damaged, the file's bytes damaged, the announced length
    /// wrong, more bytes after the file.
    harm: Harm,
    file_damage: Vec<Damage>,
    total: Option<u64>,
    extra: Vec<u8>,
    /// Where the file is cut into chunks.
    cuts: Vec<Index>,
}

fn sent() -> impl Strategy<Value = Sent> {
    (
        (
            1u64..10,
            1u64..4,
            prop::collection::vec(any::<u8>(), 0..3000),
        ),
        prop_oneof![2 => Just(Harm::none()), 1 => harm()],
        prop_oneof![3 => Just(Vec::new()), 1 => prop::collection::vec(damage(), 1..3)],
        prop_oneof![4 => Just(None), 1 => edge_u64().prop_map(Some)],
        prop_oneof![4 => Just(Vec::new()), 1 => prop::collection::vec(any::<u8>(), 1..16)],
        prop::collection::vec(any::<Index>(), 0..5),
    )
        .prop_map(
            |((index, term, body), harm, file_damage, total, extra, cuts)| Sent {
                index,
                term,
                body,
                harm,
                file_damage,
                total,
                extra,
                cuts,
            },
        )
}

impl Sent {
    fn message(&self) -> Message {
        let mut md = SnapshotMetadata {
            index: self.index,
            term: self.term,
            ..SnapshotMetadata::default()
        };
        md.set_conf_state(ConfState::parse_from_bytes(&conf_bytes()).unwrap());
        let mut s = Snapshot::default();
        s.set_metadata(md);
        let mut m = Message {
            to: ME,
            from: 2,
            term: self.term,
            ..Message::default()
        };
        m.set_msg_type(MessageType::MsgSnapshot);
        m.set_snapshot(s);
        m
    }

    /// The file as the leader has it.
    fn file(&self) -> Vec<u8> {
        let tmp = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(tmp.path()).unwrap();
        let mut w = store
            .create(&SnapshotMeta {
                index: self.index,
                term: self.term,
                meta: conf_bytes(),
            })
            .unwrap();
        w.write_all(&self.body).unwrap();
        std::fs::read(w.finish().unwrap().path()).unwrap()
    }

    /// The stream: the message and announced length in the first chunk, then the
    /// file's bytes cut into pieces.
    fn chunks(&self, message: Vec<u8>, file: &[u8]) -> Vec<SnapshotChunk> {
        let mut data = file.to_vec();
        data.extend_from_slice(&self.extra);
        let mut at: Vec<usize> = self.cuts.iter().map(|c| c.index(data.len() + 1)).collect();
        at.push(0);
        at.push(data.len());
        at.sort_unstable();
        at.dedup();
        let mut chunks: Vec<SnapshotChunk> = at
            .windows(2)
            .map(|w| SnapshotChunk {
                data: data[w[0]..w[1]].to_vec(),
                ..SnapshotChunk::default()
            })
            .collect();
        if chunks.is_empty() {
            chunks.push(SnapshotChunk::default());
        }
        chunks[0].message = message;
        chunks[0].total_bytes = self.total.unwrap_or(data.len() as u64);
        chunks
    }
}

proptest! {
    #![proptest_config(config(48))]

    /// Snapshot streams as the peer service receives them, valid or damaged: a valid
    /// one is installed, anything else refused with the node unchanged, and the node
    /// stays up either way.
    #[test]
    fn snapshot_streams(sent in sent()) {
        let f = Voters::Follower.fixture();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let addr = serve(&rt, f.handle().inbox());
        let valid_message = sent.message().write_to_bytes().unwrap();
        let message = sent.harm.apply(&valid_message);
        let valid_file = sent.file();
        let mut file = valid_file.clone();
        for d in &sent.file_damage {
            apply_damage(&mut file, d);
        }
        f.stepped.lock().unwrap().push(format!(
            "a snapshot stream with {:?}",
            reference::<Message>(&message).ok_or("(undecodable)")
        ));
        let result = rt.block_on(send_chunks(addr, sent.chunks(message.clone(), &file)));
        let whole = file == valid_file && sent.extra.is_empty()
            && sent.total.is_none_or(|t| t == file.len() as u64);
        if whole && message == valid_message {
            prop_assert!(result.is_ok(), "a valid snapshot was refused: {:?}", result);
        }
        if result.is_ok() {
            prop_assert!(whole, "a damaged snapshot stream was taken");
            let m = reference::<Message>(&message);
            prop_assert!(
                m.as_ref().is_some_and(|m| m.get_msg_type() == MessageType::MsgSnapshot
                    && m.get_snapshot().get_metadata().index == sent.index
                    && m.get_snapshot().get_metadata().term == sent.term
                    && m.get_snapshot().get_metadata().get_conf_state()
                        == sent.message().get_snapshot().get_metadata().get_conf_state()),
                "a snapshot was taken with another message: {:?}", m
            );
            f.applied(sent.index)?;
            let restored = f.seen.lock().unwrap().restored.clone();
            prop_assert_eq!(restored, Some((sent.index, sent.term, sent.body.clone())));
        }
        f.barrier()?;
        if result.is_err() {
            prop_assert_eq!(&f.seen.lock().unwrap().restored, &None);
        }
        drop(rt);
    }
}
