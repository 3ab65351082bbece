//! Fuzzed decoding and applying of the commands in the log: [`Command::decode`] on
//! arbitrary bytes and on valid encodings that are then damaged (bytes flipped, cut or
//! spliced in; the tag byte changed; protobuf fields changed behind valid framing:
//! length prefixes at edge values, tags and wire types changed, enums out of range,
//! fields dropped or repeated), and whole committed entries of that kind applied through
//! the state machine, [`KvMachine`].
//!
//! Decoding gives a command or an error, never a panic, never an allocation out of
//! proportion to the bytes (or a recursion as deep as they are long), and a command
//! decoded re-encodes to itself. Applying an entry never fails the member (that would
//! stop every member that applies it): an entry that does not decode is refused with an
//! error naming its index, and a refused entry leaves the store as it was. The same
//! entries applied one by one or in batches give the same outputs and the same store,
//! as members that batch differently must.
//!
//! Case counts are fixed and the seed is fixed, so CI runs the same cases in a few
//! seconds and a failure there replays locally as is. `PROPTEST_CASES=N` runs N cases
//! per property, `PROPTEST_RNG_SEED=S` other cases.

// The allocation probe below wraps the system allocator, which takes `unsafe`.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use concord_consensus::{Committed, StateMachine};
use concord_mvcc as mvcc;
use concord_proto::{authpb, etcdserverpb as pb};
use concord_server::alarm::Alarms;
use concord_server::apply::{Applied, ApplyError, Command, KvMachine, Output};
use concord_server::auth::{AuthChange, AuthOptions, AuthStore, Requester};
use concord_server::lease::Lessor;
use concord_server::membership::Membership;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::RngSeed;

// ---------------------------------------------------------------------------------------
// Harness: configuration and the allocation probe.

/// The seed of every property here unless `PROPTEST_RNG_SEED` says otherwise.
const SEED: u64 = 0xC0DE_C0DE_5EED_0009;

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

/// What decoding `input` bytes may allocate at once: a little, plus the decoded
/// messages (a txn op or compare takes two bytes of input at least, and a vector of
/// them may have twice the room it needs).
fn allocation_bound(input: usize) -> usize {
    let record = std::mem::size_of::<pb::RequestOp>().max(std::mem::size_of::<pb::Compare>());
    (64 << 10) + input * record
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
// Protobuf encodings as trees of fields, to damage behind valid framing (as in the
// consensus crate's decode_fuzz.rs).

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
// Commands as members propose them, with values at the edges.

fn key() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => prop::sample::select(vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]),
        1 => Just(Vec::new()),
        1 => Just(vec![0]),
        1 => prop::collection::vec(any::<u8>(), 0..4),
    ]
}

fn range_end() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![2 => Just(Vec::new()), 1 => Just(vec![0]), 1 => key()]
}

fn int() -> impl Strategy<Value = i64> {
    prop_oneof![
        6 => -2i64..8,
        1 => Just(i64::MIN),
        1 => Just(i64::MAX),
        1 => any::<i64>(),
    ]
}

fn enumeration(n: i32) -> impl Strategy<Value = i32> {
    prop_oneof![6 => 0..n, 1 => Just(n), 1 => any::<i32>()]
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..12)
}

fn put() -> BoxedStrategy<pb::PutRequest> {
    // Mostly without a lease, or with one of those the cases grant.
    let lease = prop_oneof![3 => Just(0i64), 1 => lease()];
    (key(), value(), lease, any::<[bool; 3]>())
        .prop_map(|(key, value, lease, b)| pb::PutRequest {
            key,
            value,
            lease,
            prev_kv: b[0],
            ignore_value: b[1],
            ignore_lease: b[2],
        })
        .boxed()
}

fn delete() -> BoxedStrategy<pb::DeleteRangeRequest> {
    (key(), range_end(), any::<bool>())
        .prop_map(|(key, range_end, prev_kv)| pb::DeleteRangeRequest {
            key,
            range_end,
            prev_kv,
        })
        .boxed()
}

fn range() -> BoxedStrategy<pb::RangeRequest> {
    (
        (key(), range_end(), int(), int()),
        (enumeration(3), enumeration(5), any::<[bool; 3]>()),
        (int(), int(), int(), int()),
    )
        .prop_map(
            |((key, range_end, limit, revision), (order, target, b), (a, z, c, d))| {
                pb::RangeRequest {
                    key,
                    range_end,
                    limit,
                    revision,
                    sort_order: order,
                    sort_target: target,
                    serializable: b[0],
                    keys_only: b[1],
                    count_only: b[2],
                    min_mod_revision: a,
                    max_mod_revision: z,
                    min_create_revision: c,
                    max_create_revision: d,
                }
            },
        )
        .boxed()
}

fn compare() -> BoxedStrategy<pb::Compare> {
    use pb::compare::TargetUnion as U;
    let union = prop_oneof![
        int().prop_map(U::Version),
        int().prop_map(U::CreateRevision),
        int().prop_map(U::ModRevision),
        value().prop_map(U::Value),
        int().prop_map(U::Lease),
    ];
    (
        enumeration(4),
        enumeration(5),
        key(),
        range_end(),
        prop::option::of(union),
    )
        .prop_map(
            |(result, target, key, range_end, target_union)| pb::Compare {
                result,
                target,
                key,
                range_end,
                target_union,
            },
        )
        .boxed()
}

fn txn() -> BoxedStrategy<pb::TxnRequest> {
    use pb::request_op::Request as R;
    let leaf = prop_oneof![
        range().prop_map(R::RequestRange),
        put().prop_map(R::RequestPut),
        delete().prop_map(R::RequestDeleteRange),
    ];
    let ops = |op: BoxedStrategy<R>| {
        prop::collection::vec(
            prop::option::of(op).prop_map(|request| pb::RequestOp { request }),
            0..3,
        )
    };
    let leaf_txn = (
        prop::collection::vec(compare(), 0..2),
        ops(leaf.clone().boxed()),
        ops(leaf.clone().boxed()),
    )
        .prop_map(|(compare, success, failure)| pb::TxnRequest {
            compare,
            success,
            failure,
        });
    let op = prop_oneof![4 => leaf, 1 => leaf_txn.prop_map(R::RequestTxn)].boxed();
    (
        prop::collection::vec(compare(), 0..3),
        ops(op.clone()),
        ops(op),
    )
        .prop_map(|(compare, success, failure)| pb::TxnRequest {
            compare,
            success,
            failure,
        })
        .boxed()
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec!["root".to_string(), "alice".into(), "r".into()]),
        1 => Just(String::new()),
        1 => "[a-z]{0,3}",
    ]
}

fn permission() -> BoxedStrategy<authpb::Permission> {
    (enumeration(3), key(), range_end())
        .prop_map(|(perm_type, key, range_end)| authpb::Permission {
            perm_type,
            key,
            range_end,
        })
        .boxed()
}

fn auth_change() -> BoxedStrategy<AuthChange> {
    // What a proposer puts there: a bcrypt hash of "pw" at cost 4, or not.
    let hash = prop_oneof![
        Just("$2b$04$2A0ZpUPYu9XEzomi3SW7aOSJpl9Qp8kZi0JqTnkTbbFb4K7rtGJ4m".to_string()),
        Just(String::new()),
        "[a-z$0-9]{0,8}",
    ];
    prop_oneof![
        Just(AuthChange::Enable),
        Just(AuthChange::Disable),
        (name(), "[a-z0-9.]{0,6}", 0u64..6).prop_map(|(name, token_prefix, revision)| {
            AuthChange::Authenticate {
                name,
                token_prefix,
                revision,
            }
        }),
        (name(), hash.clone(), prop::option::of(any::<bool>())).prop_map(
            |(name, hashed_password, no_password)| {
                AuthChange::UserAdd(pb::AuthUserAddRequest {
                    name,
                    password: String::new(),
                    options: no_password.map(|no_password| authpb::UserAddOptions { no_password }),
                    hashed_password,
                })
            }
        ),
        name().prop_map(|name| AuthChange::UserDelete(pb::AuthUserDeleteRequest { name })),
        (name(), hash).prop_map(|(name, hashed_password)| {
            AuthChange::UserChangePassword(pb::AuthUserChangePasswordRequest {
                name,
                password: String::new(),
                hashed_password,
            })
        }),
        (name(), name()).prop_map(|(user, role)| {
            AuthChange::UserGrantRole(pb::AuthUserGrantRoleRequest { user, role })
        }),
        (name(), name()).prop_map(|(name, role)| {
            AuthChange::UserRevokeRole(pb::AuthUserRevokeRoleRequest { name, role })
        }),
        name().prop_map(|name| AuthChange::RoleAdd(pb::AuthRoleAddRequest { name })),
        name().prop_map(|role| AuthChange::RoleDelete(pb::AuthRoleDeleteRequest { role })),
        (name(), prop::option::of(permission())).prop_map(|(name, perm)| {
            AuthChange::RoleGrantPermission(pb::AuthRoleGrantPermissionRequest { name, perm })
        }),
        (name(), key(), range_end()).prop_map(|(role, key, range_end)| {
            AuthChange::RoleRevokePermission(pb::AuthRoleRevokePermissionRequest {
                role,
                key,
                range_end,
            })
        }),
    ]
    .boxed()
}

/// A lease id: mostly one of a few, so grants, puts and revokes meet.
fn lease() -> impl Strategy<Value = i64> {
    prop_oneof![3 => 1i64..4, 1 => int()]
}

/// A command as a member proposes it (a client's with its caller, or one of the
/// member's own).
fn command() -> BoxedStrategy<Command> {
    let plain = prop_oneof![
        4 => put().prop_map(Command::Put),
        2 => delete().prop_map(Command::DeleteRange),
        3 => txn().prop_map(Command::Txn),
        1 => (int(), any::<bool>())
            .prop_map(|(revision, physical)| Command::Compact(pb::CompactionRequest { revision, physical })),
        2 => (lease(), int())
            .prop_map(|(id, ttl)| Command::LeaseGrant(pb::LeaseGrantRequest { id, ttl })),
        1 => lease().prop_map(|id| Command::LeaseRevoke(pb::LeaseRevokeRequest { id })),
        1 => prop::collection::vec((int(), int()), 0..3).prop_map(Command::LeaseCheckpoint),
        1 => (prop_oneof![Just(1u64), any::<u64>()], prop::collection::vec("[a-z:/0-9]{0,12}", 0..2))
            .prop_map(|(id, peer_ur_ls)| Command::MemberUpdate(pb::MemberUpdateRequest { id, peer_ur_ls })),
        1 => (enumeration(3), prop_oneof![Just(1u64), any::<u64>()], enumeration(3))
            .prop_map(|(action, member_id, alarm)| Command::Alarm(pb::AlarmRequest { action, member_id, alarm })),
        3 => auth_change().prop_map(Command::Auth),
    ];
    (plain, prop::option::of((name(), 0u64..6)))
        .prop_map(|(cmd, by)| match by {
            Some((user, revision)) => Command::As(Box::new((Requester { user, revision }, cmd))),
            None => cmd,
        })
        .boxed()
}

/// Every tag a command may have (the others are unknown).
const TAGS: [u8; 22] = [
    1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 48,
];

/// A command's encoding damaged: its tag byte changed, or fields of its body edited
/// behind valid framing, then bytes damaged anywhere.
#[derive(Debug, Clone)]
struct CommandHarm {
    tag: Option<u8>,
    harm: Harm,
}

fn command_harm() -> BoxedStrategy<CommandHarm> {
    (
        prop::option::weighted(
            0.2,
            prop_oneof![prop::sample::select(TAGS.to_vec()), any::<u8>()],
        ),
        harm(),
    )
        .prop_map(|(tag, harm)| CommandHarm { tag, harm })
        .boxed()
}

impl CommandHarm {
    fn apply(&self, encoded: &[u8]) -> Vec<u8> {
        let (&tag, body) = encoded.split_first().expect("a tag byte");
        let mut out = vec![self.tag.unwrap_or(tag)];
        out.extend(apply_edits(body, &self.harm.edits));
        for d in &self.harm.damages {
            apply_damage(&mut out, d);
        }
        out
    }
}

/// Decodes `bytes`, checking the allocation, and that a decoded command re-encodes to
/// itself.
fn decode_checked(bytes: &[u8]) -> Result<(), TestCaseError> {
    let (r, largest) = largest_allocation(|| Command::decode(bytes));
    prop_assert!(
        largest <= allocation_bound(bytes.len()),
        "decoding {} bytes allocated {largest} at once",
        bytes.len()
    );
    if let Ok(c) = &r {
        prop_assert_eq!(&Command::decode(&c.encode()), &Ok(c.clone()), "re-encoded");
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(512))]

    /// Arbitrary bytes, alone or behind a tag byte.
    #[test]
    fn arbitrary_command_bytes(
        tag in prop::option::of(prop::sample::select(TAGS.to_vec())),
        bytes in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut data: Vec<u8> = tag.into_iter().collect();
        data.extend_from_slice(&bytes);
        decode_checked(&data)?;
    }

    /// Every command round-trips; damaged, it decodes to some command or an error.
    #[test]
    fn damaged_commands(cmd in command(), harm in command_harm()) {
        let encoded = cmd.encode();
        prop_assert_eq!(&Command::decode(&encoded), &Ok(cmd.clone()));
        decode_checked(&harm.apply(&encoded))?;
    }
}

/// Regression: a caller wrapped around a caller was refused only after the inner
/// command was decoded, so an entry of callers nested a few thousand deep (each level
/// four bytes) overflowed the apply thread's stack, which aborts the process on every
/// member that applies it.
#[test]
fn a_deeply_nested_caller_is_refused_without_recursing() {
    const DEPTH: usize = 50_000;
    // From the inside out: a put, then each level's header (tag, field 3, length).
    let inner = Command::Put(pb::PutRequest::default()).encode();
    let mut headers = Vec::with_capacity(DEPTH);
    let mut len = inner.len();
    for _ in 0..DEPTH {
        let mut h = vec![48, 0x1a];
        prost::encoding::encode_varint(len as u64, &mut h);
        len += h.len();
        headers.push(h);
    }
    let mut bytes: Vec<u8> = headers.into_iter().rev().flatten().collect();
    bytes.extend_from_slice(&inner);
    let (r, largest) = largest_allocation(|| Command::decode(&bytes));
    assert_eq!(r, Err("nested caller in a command".to_string()));
    assert!(
        largest <= allocation_bound(bytes.len()),
        "allocated {largest}"
    );
}

// ---------------------------------------------------------------------------------------
// Committed entries through the state machine.

/// A state machine on a fresh store, with member 1 in its member list.
struct Machine {
    sm: KvMachine,
    store: Arc<mvcc::Store>,
    leases: Arc<Lessor>,
    _dir: tempfile::TempDir,
}

impl Machine {
    fn new() -> Machine {
        let dir = tempfile::tempdir().unwrap();
        let opts = mvcc::StoreOptions { sync_writes: false };
        let store = Arc::new(mvcc::Store::open(dir.path(), opts).unwrap());
        let hub = Arc::new(concord_watch::Hub::new(
            Arc::new(concord_server::watch::StoreHistory(store.clone())),
            store.current_revision(),
            concord_watch::HubOptions::default(),
        ));
        let leases = Arc::new(Lessor::open(&store).unwrap());
        let alarms = Arc::new(Alarms::open(&store).unwrap());
        let me = pb::Member {
            id: 1,
            name: "m1".into(),
            peer_ur_ls: vec!["http://127.0.0.1:2380".into()],
            client_ur_ls: Vec::new(),
            is_learner: false,
        };
        let members = Arc::new(Membership::open(&store, 1, vec![me], None).unwrap());
        let auth = Arc::new(AuthStore::open(&store, AuthOptions::default()).unwrap());
        let sm = KvMachine::new(store.clone(), leases.clone(), members, alarms, auth, hub);
        Machine {
            sm,
            store,
            leases,
            _dir: dir,
        }
    }

    /// The replicated state: every record's hash, the revision, the leases.
    fn state(&self) -> (u32, i64, Vec<i64>) {
        let (hash, revision) = self.store.hash().unwrap();
        (hash, revision, self.leases.ids())
    }

    /// Applies one batch; a failure of the member fails the case. Compactions the
    /// batch schedules are waited for, so the state is comparable.
    fn apply(&mut self, batch: &[Committed<'_>]) -> Result<Vec<Output>, TestCaseError> {
        let out = self.sm.apply(batch).map_err(|e| {
            fail(format!(
                "entries {:?} failed the member: {e}",
                batch.iter().map(|c| c.index).collect::<Vec<_>>()
            ))
        })?;
        prop_assert_eq!(out.len(), batch.len());
        for o in &out {
            if let Ok(Applied::Compact(_, wait)) = o {
                wait.wait().map_err(|e| fail(format!("compaction: {e}")))?;
            }
        }
        Ok(out)
    }
}

/// An output as every member must give it (a compaction's handle left out).
fn described(o: &Output) -> String {
    match o {
        Ok(Applied::Compact(revision, _)) => format!("Compact({revision})"),
        other => format!("{other:?}"),
    }
}

/// What a committed entry holds.
#[derive(Debug, Clone)]
enum Entry {
    Command(Command),
    Damaged(Command, CommandHarm),
    Bytes(Vec<u8>),
}

fn entry() -> BoxedStrategy<Entry> {
    prop_oneof![
        4 => command().prop_map(Entry::Command),
        3 => (command(), command_harm()).prop_map(|(c, h)| Entry::Damaged(c, h)),
        1 => prop::collection::vec(any::<u8>(), 0..40).prop_map(Entry::Bytes),
    ]
    .boxed()
}

impl Entry {
    fn data(&self) -> Vec<u8> {
        match self {
            Entry::Command(c) => c.encode(),
            Entry::Damaged(c, h) => h.apply(&c.encode()),
            Entry::Bytes(b) => b.clone(),
        }
    }
}

proptest! {
    #![proptest_config(config(24))]

    /// Committed entries, valid or not, applied one by one and in batches.
    #[test]
    fn applying_committed_entries(
        entries in prop::collection::vec(entry(), 1..16),
        cuts in prop::collection::vec(any::<Index>(), 0..3),
    ) {
        let data: Vec<Vec<u8>> = entries.iter().map(Entry::data).collect();
        let committed: Vec<Committed<'_>> = data
            .iter()
            .enumerate()
            .map(|(i, d)| Committed { index: i as u64 + 1, term: 1, data: d })
            .collect();

        let mut one_by_one = Machine::new();
        let mut outputs = Vec::new();
        for c in &committed {
            let before = one_by_one.state();
            let out = one_by_one.apply(std::slice::from_ref(c))?.remove(0);
            if Command::decode(c.data).is_err() {
                prop_assert!(
                    matches!(&out, Err(ApplyError::Undecodable(why)) if names(why, "entry", c.index)),
                    "entry {} does not decode but gave {:?}", c.index, out
                );
            }
            if out.is_err() {
                prop_assert_eq!(
                    one_by_one.state(), before,
                    "refused entry {} changed the store: {:?}", c.index, out
                );
            }
            prop_assert_eq!(one_by_one.store.consistent_index().unwrap(), c.index);
            outputs.push(described(&out));
        }

        let mut batched = Machine::new();
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(committed.len() + 1)).collect();
        at.extend([0, committed.len()]);
        at.sort_unstable();
        at.dedup();
        let mut batched_outputs = Vec::new();
        for w in at.windows(2) {
            let out = batched.apply(&committed[w[0]..w[1]])?;
            batched_outputs.extend(out.iter().map(described));
        }
        prop_assert_eq!(batched_outputs, outputs, "batching changed the outputs");
        prop_assert_eq!(batched.state(), one_by_one.state(), "batching changed the store");
        prop_assert_eq!(batched.store.consistent_index().unwrap(), committed.len() as u64);
    }
}
