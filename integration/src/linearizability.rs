//! # Linearizability checking (Wing–Gong–Lowe, as in Porcupine)
//!
//! Jepsen-style tests run concurrent clients against a cluster while a nemesis kills,
//! pauses and partitions servers, record every operation with its invoke and completion
//! time, and then ask: is there *some* total order of these operations that (a) respects
//! real time (an operation that completed before another was invoked comes first) and
//! (b) is a legal sequential history of the model? This module answers that question.
//!
//! ## Model
//!
//! Every key is an independent register holding `Option<String>` (`None` = absent).
//! [`Op::Get`] observes it, [`Op::Put`] overwrites it, and [`Op::Cas`] swaps it iff it
//! equals `expected` (`expected: None` means "only if absent", i.e. create-if-absent).
//!
//! ## Algorithm
//!
//! Every operation touches exactly one key, so by P-compositionality the history is
//! linearizable iff each per-key sub-history is; each key is checked on its own (which
//! shrinks the search exponentially). Per key, the search is Lowe's refinement of
//! Wing & Gong: a doubly linked list of call/return entries sorted by time, a depth-first
//! search that repeatedly linearizes the first call entries whose model step is legal
//! (removing the op's entries from the list, "lifting") and backtracks ("unlifting") when
//! it reaches the return entry of an op it has not linearized, plus a cache of
//! (set of linearized ops, model state) pairs already explored, which prunes the search.
//! The set is a `Vec<u64>` bitset, keyed in the cache by an incrementally maintained
//! Zobrist hash; register values are interned to integer ids.
//!
//! Pending unknown-outcome writes (common under a nemesis) would otherwise multiply the
//! search space by 2^k, so three exact reductions apply to them: values no known get
//! returns and no cas expects are merged into one state (nothing can tell them apart);
//! an unknown op whose effect would leave the state unchanged is not linearized (same as
//! never taking effect); and of several pending unknown ops with the same effect only the
//! earliest-invoked is tried (they are interchangeable). A unit test cross-checks the
//! checker against an unpruned exhaustive search on thousands of tiny random histories.
//!
//! ## Rules worth knowing
//!
//! * **Ties.** An op that completed at `t` precedes an op invoked at `t' > t`. With
//!   `t == t'` the two are treated as *concurrent* (at equal timestamps call entries sort
//!   before return entries). Timestamps are taken before sending and after receiving, so
//!   the real interval lies inside the recorded one; erring towards concurrency can only
//!   accept more orders, never reject a correct history.
//! * **Unknown outcomes** ([`Outcome::Unknown`]: timeout, connection failure, cancelled
//!   future) may or may not have taken effect, at any time after their invoke. Their
//!   return is at +infinity (they get no return entry) and the search succeeds once every
//!   op with a *known* outcome is linearized; unknown ops may stay unlinearized (never
//!   took effect). An unknown `Get` constrains nothing and is dropped. An unknown `Cas`
//!   applies the swap iff `expected` matches (its only legal effect); only its return value
//!   is unconstrained.
//! * **Budget.** Checking is NP-complete in general; each key's search stops after
//!   `per_key_budget` of wall time with [`Verdict::Timeout`], which callers must treat as
//!   "could not verify", not as a pass.
//! * Write values need not be unique for correctness (tests make them unique because that
//!   makes violations easier to find and to read).
//!
//! Recording: [`Recorder`] is a cheap-to-clone, thread-safe log shared by many tokio
//! tasks; [`Recorder::invoke`] takes the invoke time and returns a [`Pending`] whose
//! [`Pending::complete`] takes the completion time. A `Pending` dropped without being
//! completed (e.g. the task's future was cancelled by a timeout) is recorded as
//! [`Outcome::Unknown`], so no operation silently disappears from the history.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One client operation on one key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Op {
    /// Read the key.
    Get { key: String },
    /// Overwrite the key.
    Put { key: String, value: String },
    /// Set the key to `new` iff it currently equals `expected` (`None` = absent).
    Cas {
        key: String,
        expected: Option<String>,
        new: String,
    },
}

impl Op {
    /// The key this op touches (each op touches exactly one, which is what lets the
    /// checker split the history per key).
    pub fn key(&self) -> &str {
        match self {
            Op::Get { key } | Op::Put { key, .. } | Op::Cas { key, .. } => key,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Get { key } => write!(f, "get({key:?})"),
            Op::Put { key, value } => write!(f, "put({key:?}, {value:?})"),
            Op::Cas { key, expected, new } => write!(f, "cas({key:?}, {expected:?} -> {new:?})"),
        }
    }
}

/// What the client saw.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// A `Get` returned this value (`None` = key absent).
    Get(Option<String>),
    /// A `Put` was acknowledged.
    Put,
    /// A `Cas` returned whether it swapped.
    Cas(bool),
    /// The client timed out or the connection failed: the op may or may not have taken
    /// effect, at any time after its invoke.
    Unknown,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Get(v) => write!(f, "{v:?}"),
            Outcome::Put => f.write_str("ok"),
            Outcome::Cas(b) => write!(f, "{b}"),
            Outcome::Unknown => f.write_str("unknown"),
        }
    }
}

/// One completed (or abandoned) operation in a history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Which client (a sequential process) issued it; only used in explanations.
    pub client: usize,
    pub op: Op,
    pub outcome: Outcome,
    /// Nanoseconds from a common monotonic origin, taken before the request was sent.
    pub invoke: u64,
    /// Nanoseconds from the same origin, taken after the answer arrived. Ignored
    /// (treated as +infinity) when `outcome` is [`Outcome::Unknown`].
    pub complete: u64,
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "client {} {} -> {} ", self.client, self.op, self.outcome)?;
        if self.outcome == Outcome::Unknown {
            write!(f, "[{}, inf)", self.invoke)
        } else {
            write!(f, "[{}, {}]", self.invoke, self.complete)
        }
    }
}

/// Thread-safe history log shared by all client tasks (clone it freely; clones share the
/// log and the time origin).
#[derive(Clone)]
pub struct Recorder {
    inner: Arc<RecorderInner>,
}

struct RecorderInner {
    origin: Instant,
    events: Mutex<Vec<Event>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    /// A new empty log whose time origin is now.
    pub fn new() -> Self {
        Recorder {
            inner: Arc::new(RecorderInner {
                origin: Instant::now(),
                events: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Nanoseconds since this recorder's origin (monotonic).
    pub fn now(&self) -> u64 {
        u64::try_from(self.inner.origin.elapsed().as_nanos()).unwrap_or(u64::MAX - 1)
    }

    /// Start an operation: takes the invoke time now, so call it right before sending.
    pub fn invoke(&self, client: usize, op: Op) -> Pending {
        let invoke = self.now();
        Pending {
            recorder: self.clone(),
            client,
            op: Some(op),
            invoke,
        }
    }

    /// Add a fully formed event (e.g. from a replayed log).
    pub fn record(&self, event: Event) {
        self.inner
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(event);
    }

    /// A snapshot of the events recorded so far (ops still pending are not included).
    pub fn events(&self) -> Vec<Event> {
        self.inner
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// An invoked, not yet completed operation. Complete it with [`Pending::complete`];
/// dropping it instead records [`Outcome::Unknown`].
pub struct Pending {
    recorder: Recorder,
    client: usize,
    op: Option<Op>,
    invoke: u64,
}

impl Pending {
    /// The operation being performed.
    pub fn op(&self) -> &Op {
        self.op.as_ref().expect("op is present until completion")
    }

    /// Finish the operation: takes the completion time now, so call it right after the
    /// answer (or the error) arrived.
    pub fn complete(mut self, outcome: Outcome) {
        self.finish(outcome);
    }

    fn finish(&mut self, outcome: Outcome) {
        if let Some(op) = self.op.take() {
            let complete = self.recorder.now();
            self.recorder.record(Event {
                client: self.client,
                op,
                outcome,
                invoke: self.invoke,
                complete,
            });
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.finish(Outcome::Unknown);
    }
}

/// The answer of [`check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every key's sub-history has a linearization.
    Linearizable,
    /// This key's sub-history has none (the first such key in key order).
    NotLinearizable { key: String, explanation: String },
    /// This key's search ran out of budget (reported only if no key was refuted).
    Timeout { key: String },
}

/// Per-key result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyResult {
    Linearizable,
    NotLinearizable,
    Timeout,
}

/// Per-key statistics, for logs and for tuning budgets.
#[derive(Debug, Clone)]
pub struct KeyStats {
    pub key: String,
    /// Ops that entered the search (known outcomes plus unknown writes).
    pub ops: usize,
    /// Of those, ops with an unknown outcome.
    pub unknown: usize,
    /// Unknown-outcome gets that were dropped (they constrain nothing).
    pub dropped_gets: usize,
    /// Distinct (linearized set, state) configurations cached.
    pub states: usize,
    /// Search iterations.
    pub steps: u64,
    pub elapsed: Duration,
    pub result: KeyResult,
}

/// Everything [`check`] found.
#[derive(Debug, Clone)]
pub struct Report {
    pub verdict: Verdict,
    /// Ops that entered the search, over all keys.
    pub ops_checked: usize,
    /// Number of distinct keys.
    pub keys: usize,
    /// In key order.
    pub per_key: Vec<KeyStats>,
}

impl Report {
    /// True only for a full [`Verdict::Linearizable`] (a timeout is not a pass).
    pub fn is_linearizable(&self) -> bool {
        self.verdict == Verdict::Linearizable
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.verdict {
            Verdict::Linearizable => f.write_str("linearizable")?,
            Verdict::NotLinearizable { key, explanation } => {
                write!(f, "NOT linearizable on key {key:?}: {explanation}")?
            }
            Verdict::Timeout { key } => write!(f, "timed out checking key {key:?}")?,
        }
        write!(f, " ({} ops, {} keys)", self.ops_checked, self.keys)?;
        for s in &self.per_key {
            write!(
                f,
                "\n  {:?}: {:?}, {} ops ({} unknown, {} unknown gets dropped), {} states, {} steps, {:?}",
                s.key, s.result, s.ops, s.unknown, s.dropped_gets, s.states, s.steps, s.elapsed
            )?;
        }
        Ok(())
    }
}

/// Check `events` for linearizability against the per-key register model, spending at
/// most `per_key_budget` of wall time on each key. Every key is checked (so the stats
/// are complete); the verdict names the first refuted key, else the first timed-out key.
pub fn check(events: &[Event], per_key_budget: Duration) -> Report {
    let mut by_key: HashMap<&str, Vec<&Event>> = HashMap::new();
    for e in events {
        by_key.entry(e.op.key()).or_default().push(e);
    }
    let mut keys: Vec<&str> = by_key.keys().copied().collect();
    keys.sort_unstable();

    let mut refuted: Option<(String, String)> = None;
    let mut timed_out: Option<String> = None;
    let mut per_key = Vec::with_capacity(keys.len());
    let mut ops_checked = 0;
    for key in &keys {
        let (stats, failure) = check_key(key, &by_key[key], per_key_budget);
        ops_checked += stats.ops;
        match (stats.result, failure) {
            (KeyResult::NotLinearizable, Some(why)) if refuted.is_none() => {
                refuted = Some((key.to_string(), why));
            }
            (KeyResult::Timeout, _) if timed_out.is_none() => timed_out = Some(key.to_string()),
            _ => {}
        }
        per_key.push(stats);
    }
    let verdict = match (refuted, timed_out) {
        (Some((key, explanation)), _) => Verdict::NotLinearizable { key, explanation },
        (None, Some(key)) => Verdict::Timeout { key },
        (None, None) => Verdict::Linearizable,
    };
    Report {
        verdict,
        ops_checked,
        keys: keys.len(),
        per_key,
    }
}

/// Interned register value: 0 is "absent", 1 is "some value no op observes", others
/// index `Interner::names`.
type State = u32;
const ABSENT: State = 0;
const UNOBSERVED: State = 1;

/// An op compiled to interned ids.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Step {
    Get(State),
    Put(State),
    /// `swapped: None` = unknown outcome.
    Cas {
        expected: State,
        new: State,
        swapped: Option<bool>,
    },
}

impl Step {
    /// The register's state after this op, or `None` if the op cannot happen in `state`.
    fn apply(self, state: State) -> Option<State> {
        match self {
            Step::Get(seen) => (seen == state).then_some(state),
            Step::Put(v) => Some(v),
            Step::Cas {
                expected,
                new,
                swapped,
            } => {
                let matches = state == expected;
                match swapped {
                    Some(s) if s != matches => None,
                    _ => Some(if matches { new } else { state }),
                }
            }
        }
    }
}

/// Maps values to states. A value that no known-outcome get returns and no cas expects
/// can only ever be told apart from the others by being unequal to all of them, so all
/// such values share the one state [`UNOBSERVED`]; that merge is exact, and it makes
/// unknown writes of never-read values interchangeable (see `check_key`).
struct Interner<'a> {
    observable: HashSet<&'a str>,
    ids: HashMap<&'a str, State>,
    names: Vec<&'a str>,
}

impl<'a> Interner<'a> {
    fn id(&mut self, v: Option<&'a str>) -> State {
        let Some(v) = v else { return ABSENT };
        if !self.observable.contains(v) {
            return UNOBSERVED;
        }
        *self.ids.entry(v).or_insert_with(|| {
            self.names.push(v);
            State::try_from(self.names.len() + 1).expect("fewer than 2^32 values")
        })
    }

    fn show(&self, s: State) -> String {
        match s {
            ABSENT => "None".to_string(),
            UNOBSERVED => "Some(<a value no get returns and no cas expects>)".to_string(),
            _ => format!("Some({:?})", self.names[s as usize - 2]),
        }
    }
}

const NIL: usize = usize::MAX;
const HEAD: usize = 0;

/// A node of the call/return list; index 0 is the head sentinel.
struct Node {
    op: usize,
    call: bool,
    prev: usize,
    next: usize,
}

/// Where the deepest search got stuck, for the explanation.
struct Stuck {
    depth: usize,
    blocking: usize,
    state: State,
    recent: Vec<usize>,
}

/// Deterministic 64-bit mixer (splitmix64) for the Zobrist keys.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn check_key(key: &str, events: &[&Event], budget: Duration) -> (KeyStats, Option<String>) {
    let start = Instant::now();
    let mut stats = KeyStats {
        key: key.to_string(),
        ops: 0,
        unknown: 0,
        dropped_gets: 0,
        states: 0,
        steps: 0,
        elapsed: Duration::ZERO,
        result: KeyResult::Linearizable,
    };

    // Compile the ops, dropping unknown gets and refusing malformed events.
    let mut observable = HashSet::new();
    for e in events {
        match (&e.op, &e.outcome) {
            (Op::Get { .. }, Outcome::Get(Some(v))) => {
                observable.insert(v.as_str());
            }
            (
                Op::Cas {
                    expected: Some(v), ..
                },
                _,
            ) => {
                observable.insert(v.as_str());
            }
            _ => {}
        }
    }
    let mut interner = Interner {
        observable,
        ids: HashMap::new(),
        names: Vec::new(),
    };
    let mut ops: Vec<&Event> = Vec::new();
    let mut steps: Vec<Step> = Vec::new();
    for &e in events {
        let known = e.outcome != Outcome::Unknown;
        let step = match (&e.op, &e.outcome) {
            (Op::Get { .. }, Outcome::Unknown) => {
                stats.dropped_gets += 1;
                continue;
            }
            (Op::Get { .. }, Outcome::Get(v)) => Step::Get(interner.id(v.as_deref())),
            (Op::Put { value, .. }, Outcome::Put | Outcome::Unknown) => {
                Step::Put(interner.id(Some(value)))
            }
            (Op::Cas { expected, new, .. }, Outcome::Cas(_) | Outcome::Unknown) => Step::Cas {
                expected: interner.id(expected.as_deref()),
                new: interner.id(Some(new)),
                swapped: match e.outcome {
                    Outcome::Cas(b) => Some(b),
                    _ => None,
                },
            },
            _ => {
                stats.result = KeyResult::NotLinearizable;
                stats.elapsed = start.elapsed();
                return (
                    stats,
                    Some(format!("malformed event (outcome does not fit op): {e}")),
                );
            }
        };
        if known && e.complete < e.invoke {
            stats.result = KeyResult::NotLinearizable;
            stats.elapsed = start.elapsed();
            return (
                stats,
                Some(format!("malformed event (completes before invoke): {e}")),
            );
        }
        if !known {
            stats.unknown += 1;
        }
        ops.push(e);
        steps.push(step);
    }
    stats.ops = ops.len();
    let n = ops.len();
    let is_known = |i: usize| ops[i].outcome != Outcome::Unknown;

    // The call/return list: calls before returns at equal times (= concurrent); unknown
    // ops have no return entry (return at +infinity).
    let mut order: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * n);
    for (i, e) in ops.iter().enumerate() {
        order.push((e.invoke, false, i));
        if is_known(i) {
            order.push((e.complete, true, i));
        }
    }
    order.sort_unstable();
    let mut nodes = Vec::with_capacity(order.len() + 1);
    nodes.push(Node {
        op: NIL,
        call: false,
        prev: NIL,
        next: if order.is_empty() { NIL } else { 1 },
    });
    let mut call_node = vec![NIL; n];
    let mut ret_node = vec![NIL; n];
    for (idx, &(_, is_ret, op)) in order.iter().enumerate() {
        let me = idx + 1;
        if is_ret {
            ret_node[op] = me;
        } else {
            call_node[op] = me;
        }
        nodes.push(Node {
            op,
            call: !is_ret,
            prev: me - 1,
            next: if me == order.len() { NIL } else { me + 1 },
        });
    }

    // Unknown ops with the same step are interchangeable once invoked (same effect, same
    // return at +infinity), so only the earliest-invoked unlinearized one of each class is
    // ever tried. Lifts within a class then happen in invoke order and unlifts in reverse,
    // so the linearized members of a class are always a prefix of it: a counter suffices.
    let mut class_of: Vec<(usize, usize)> = vec![(NIL, 0); n];
    let mut class_len: Vec<usize> = Vec::new();
    {
        let mut classes: HashMap<Step, usize> = HashMap::new();
        for &(_, is_ret, op) in &order {
            if !is_ret && !is_known(op) {
                let next_class = classes.len();
                let class = *classes.entry(steps[op]).or_insert(next_class);
                if class == class_len.len() {
                    class_len.push(0);
                }
                class_of[op] = (class, class_len[class]);
                class_len[class] += 1;
            }
        }
    }
    let mut class_lifted = vec![0usize; class_len.len()];

    let unlink = |nodes: &mut Vec<Node>, i: usize| {
        let (p, nx) = (nodes[i].prev, nodes[i].next);
        nodes[p].next = nx;
        if nx != NIL {
            nodes[nx].prev = p;
        }
    };
    let relink = |nodes: &mut Vec<Node>, i: usize| {
        let (p, nx) = (nodes[i].prev, nodes[i].next);
        nodes[p].next = i;
        if nx != NIL {
            nodes[nx].prev = i;
        }
    };

    let zobrist: Vec<u64> = (0..n as u64).map(mix64).collect();
    let mut bits = vec![0u64; n.div_ceil(64)];
    let mut hash = 0u64;
    let mut cache: HashMap<(u64, State), Vec<Box<[u64]>>> = HashMap::new();
    let mut state = ABSENT;
    let mut stack: Vec<(usize, State)> = Vec::new();
    let known_total = (0..n).filter(|&i| is_known(i)).count();
    let mut known_left = known_total;
    let mut stuck: Option<Stuck> = None;
    let mut entry = nodes[HEAD].next;

    let outcome = loop {
        if known_left == 0 {
            break KeyResult::Linearizable;
        }
        if stats.steps & 1023 == 0 && start.elapsed() >= budget {
            break KeyResult::Timeout;
        }
        stats.steps += 1;

        if entry != NIL && nodes[entry].call {
            let op = nodes[entry].op;
            let (class, rank) = class_of[op];
            let candidate = steps[op].apply(state).filter(|&next_state| {
                // An unknown op that would not change the state is equivalent to one that
                // never took effect; an unknown op behind an identical one is redundant.
                is_known(op) || (next_state != state && class_lifted[class] == rank)
            });
            if let Some(next_state) = candidate {
                bits[op / 64] |= 1 << (op % 64);
                hash ^= zobrist[op];
                let seen = cache.entry((hash, next_state)).or_default();
                if !seen.iter().any(|b| **b == *bits) {
                    seen.push(bits.clone().into_boxed_slice());
                    stats.states += 1;
                    stack.push((op, state));
                    state = next_state;
                    if is_known(op) {
                        known_left -= 1;
                    } else {
                        class_lifted[class] += 1;
                    }
                    unlink(&mut nodes, call_node[op]);
                    if ret_node[op] != NIL {
                        unlink(&mut nodes, ret_node[op]);
                    }
                    entry = nodes[HEAD].next;
                    continue;
                }
                bits[op / 64] &= !(1 << (op % 64));
                hash ^= zobrist[op];
            }
            entry = nodes[entry].next;
            continue;
        }

        // A return entry of an op not yet linearized (or, defensively, the list's end):
        // nothing before it can be linearized next, so backtrack.
        debug_assert!(entry != NIL, "a known return entry always remains");
        let depth = known_total - known_left;
        if entry != NIL && stuck.as_ref().is_none_or(|s| depth > s.depth) {
            stuck = Some(Stuck {
                depth,
                blocking: nodes[entry].op,
                state,
                recent: stack.iter().rev().take(5).rev().map(|&(o, _)| o).collect(),
            });
        }
        let Some((op, prev_state)) = stack.pop() else {
            break KeyResult::NotLinearizable;
        };
        if ret_node[op] != NIL {
            relink(&mut nodes, ret_node[op]);
        }
        relink(&mut nodes, call_node[op]);
        bits[op / 64] &= !(1 << (op % 64));
        hash ^= zobrist[op];
        state = prev_state;
        if is_known(op) {
            known_left += 1;
        } else {
            class_lifted[class_of[op].0] -= 1;
        }
        entry = nodes[call_node[op]].next;
    };

    stats.result = outcome;
    stats.elapsed = start.elapsed();
    let explanation = (outcome == KeyResult::NotLinearizable).then(|| match stuck {
        Some(s) => {
            let mut why = format!(
                "no linearization: longest linearized prefix {} of {} known-outcome ops \
                 ({} unknown-outcome ops); stuck at {} while the register held {}",
                s.depth,
                known_total,
                n - known_total,
                ops[s.blocking],
                interner.show(s.state),
            );
            if !s.recent.is_empty() {
                why.push_str("; last linearized:");
                for o in s.recent {
                    why.push_str(&format!(" [{}]", ops[o]));
                }
            }
            why
        }
        None => "no linearization".to_string(),
    });
    (stats, explanation)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Rng;

    const BUDGET: Duration = Duration::from_secs(5);

    fn get(client: usize, key: &str, seen: Option<&str>, invoke: u64, complete: u64) -> Event {
        Event {
            client,
            op: Op::Get { key: key.into() },
            outcome: Outcome::Get(seen.map(Into::into)),
            invoke,
            complete,
        }
    }

    fn put(client: usize, key: &str, value: &str, invoke: u64, complete: u64) -> Event {
        Event {
            client,
            op: Op::Put {
                key: key.into(),
                value: value.into(),
            },
            outcome: Outcome::Put,
            invoke,
            complete,
        }
    }

    fn cas(
        client: usize,
        key: &str,
        expected: Option<&str>,
        new: &str,
        swapped: bool,
        invoke: u64,
        complete: u64,
    ) -> Event {
        Event {
            client,
            op: Op::Cas {
                key: key.into(),
                expected: expected.map(Into::into),
                new: new.into(),
            },
            outcome: Outcome::Cas(swapped),
            invoke,
            complete,
        }
    }

    fn unknown(mut e: Event) -> Event {
        e.outcome = Outcome::Unknown;
        e.complete = 0;
        e
    }

    fn assert_ok(events: &[Event]) -> Report {
        let r = check(events, BUDGET);
        assert_eq!(r.verdict, Verdict::Linearizable, "{r}");
        r
    }

    fn assert_refuted(events: &[Event], key: &str) -> String {
        let r = check(events, BUDGET);
        match &r.verdict {
            Verdict::NotLinearizable {
                key: k,
                explanation,
            } => {
                assert_eq!(k, key, "{r}");
                explanation.clone()
            }
            _ => panic!("expected a violation on {key:?}, got {r}"),
        }
    }

    #[test]
    fn empty_history_passes() {
        let r = assert_ok(&[]);
        assert_eq!((r.ops_checked, r.keys), (0, 0));
    }

    #[test]
    fn sequential_put_get_cas_passes() {
        let h = [
            get(0, "x", None, 0, 1),
            cas(0, "x", None, "a", true, 2, 3),
            get(0, "x", Some("a"), 4, 5),
            put(0, "x", "b", 6, 7),
            cas(0, "x", Some("a"), "c", false, 8, 9),
            cas(0, "x", Some("b"), "c", true, 10, 11),
            cas(0, "x", None, "d", false, 12, 13),
            get(0, "x", Some("c"), 14, 15),
        ];
        let r = assert_ok(&h);
        assert_eq!(r.ops_checked, 8);
    }

    #[test]
    fn concurrent_put_and_get_old_or_new_value_passes() {
        let base = put(0, "x", "old", 0, 1);
        assert_ok(&[
            base.clone(),
            put(0, "x", "new", 10, 20),
            get(1, "x", Some("old"), 12, 18),
        ]);
        assert_ok(&[
            base,
            put(0, "x", "new", 10, 20),
            get(1, "x", Some("new"), 12, 18),
        ]);
    }

    #[test]
    fn equal_timestamps_are_concurrent() {
        // The put completes at 10 and the get is invoked at 10: concurrent, so the get
        // may still see the old value.
        assert_ok(&[put(0, "x", "v", 5, 10), get(1, "x", None, 10, 12)]);
        // One nanosecond later it may not.
        assert_refuted(&[put(0, "x", "v", 5, 10), get(1, "x", None, 11, 12)], "x");
    }

    #[test]
    fn stale_read_is_rejected() {
        let why = assert_refuted(
            &[
                put(0, "x", "1", 0, 10),
                put(0, "x", "2", 20, 30),
                get(1, "x", Some("1"), 40, 50),
            ],
            "x",
        );
        assert!(why.contains("get(\"x\") -> Some(\"1\")"), "{why}");
        assert_refuted(&[put(0, "x", "1", 0, 10), get(1, "x", None, 20, 30)], "x");
    }

    #[test]
    fn double_cas_winners_are_rejected() {
        assert_refuted(
            &[
                put(0, "x", "v0", 0, 1),
                cas(1, "x", Some("v0"), "v1", true, 10, 20),
                cas(2, "x", Some("v0"), "v2", true, 12, 22),
            ],
            "x",
        );
        // One winner and one loser is fine, in either order.
        assert_ok(&[
            put(0, "x", "v0", 0, 1),
            cas(1, "x", Some("v0"), "v1", true, 10, 20),
            cas(2, "x", Some("v0"), "v2", false, 12, 22),
        ]);
        // Two create-if-absent winners are just as wrong.
        assert_refuted(
            &[
                cas(1, "x", None, "v1", true, 10, 20),
                cas(2, "x", None, "v2", true, 12, 22),
            ],
            "x",
        );
    }

    #[test]
    fn cas_success_with_never_current_expected_is_rejected() {
        assert_refuted(
            &[
                put(0, "x", "a", 0, 1),
                cas(0, "x", Some("zzz"), "b", true, 2, 3),
            ],
            "x",
        );
        // And a failed cas whose expected value was certainly current is rejected too.
        assert_refuted(
            &[
                put(0, "x", "a", 0, 1),
                cas(0, "x", Some("a"), "b", false, 2, 3),
            ],
            "x",
        );
    }

    #[test]
    fn unknown_put_later_read_passes() {
        assert_ok(&[
            unknown(put(0, "x", "u", 0, 0)),
            get(1, "x", None, 5, 6),
            get(1, "x", Some("u"), 1000, 1001),
            get(1, "x", Some("u"), 1002, 1003),
        ]);
    }

    #[test]
    fn unknown_put_never_read_passes() {
        let r = assert_ok(&[
            put(1, "x", "a", 0, 1),
            unknown(put(0, "x", "u", 2, 0)),
            get(1, "x", Some("a"), 5, 6),
            get(1, "x", Some("a"), 1000, 1001),
        ]);
        assert_eq!(r.per_key[0].unknown, 1);
    }

    #[test]
    fn unknown_put_cannot_take_effect_before_invoke() {
        assert_refuted(
            &[
                get(1, "x", Some("u"), 0, 1),
                unknown(put(0, "x", "u", 2, 0)),
            ],
            "x",
        );
    }

    #[test]
    fn unknown_cas_takes_effect_only_if_expected_matches() {
        // Swapping from "a" to "b" is its only possible effect ...
        assert_ok(&[
            put(0, "x", "a", 0, 1),
            unknown(cas(0, "x", Some("a"), "b", true, 2, 0)),
            get(1, "x", Some("b"), 10, 11),
        ]);
        // ... and it cannot swap from a value that was never current.
        assert_refuted(
            &[
                put(0, "x", "a", 0, 1),
                unknown(cas(0, "x", Some("zzz"), "b", true, 2, 0)),
                get(1, "x", Some("b"), 10, 11),
            ],
            "x",
        );
    }

    #[test]
    fn read_of_never_written_value_is_rejected_despite_unknown_ops() {
        let why = assert_refuted(
            &[
                put(0, "x", "a", 0, 1),
                unknown(put(1, "x", "u1", 2, 0)),
                unknown(cas(2, "x", Some("a"), "u2", true, 3, 0)),
                unknown(get(3, "x", Some("junk"), 4, 0)),
                get(4, "x", Some("ghost"), 10, 20),
            ],
            "x",
        );
        assert!(why.contains("ghost"), "{why}");
    }

    /// Many pending unknown writes must not blow the search up when it has to be
    /// exhaustive: never-read values are merged, no-op unknown cas ops are skipped and
    /// identical unknown ops are tried only once.
    fn many_unknowns(stale_read_at_end: bool) -> Vec<Event> {
        let mut h = vec![put(0, "x", "a", 0, 1)];
        for i in 0..40 {
            h.push(unknown(put(1 + i, "x", &format!("u{i}"), 2 + i as u64, 0)));
            h.push(unknown(cas(
                50 + i,
                "x",
                Some(&format!("nope{i}")),
                &format!("w{i}"),
                true,
                2 + i as u64,
                0,
            )));
        }
        for j in 0..30u64 {
            let v = format!("p{j}");
            h.push(put(100, "x", &v, 100 + 10 * j, 105 + 10 * j));
            h.push(get(101, "x", Some(&v), 106 + 10 * j, 108 + 10 * j));
        }
        if stale_read_at_end {
            h.push(get(101, "x", Some("p0"), 1000, 1001));
        }
        h
    }

    #[test]
    fn many_unknown_ops_stay_tractable() {
        assert_ok(&many_unknowns(false));
        let why = assert_refuted(&many_unknowns(true), "x");
        assert!(why.contains("prefix 61 of 62"), "{why}");
    }

    #[test]
    fn violation_is_reported_on_its_key() {
        let h = [
            put(0, "a", "1", 0, 10),
            put(0, "b", "1", 0, 10),
            get(1, "a", Some("1"), 20, 30),
            get(1, "b", None, 20, 30),
            put(2, "c", "9", 0, 5),
        ];
        let r = check(&h, BUDGET);
        assert!(
            matches!(&r.verdict, Verdict::NotLinearizable { key, .. } if key == "b"),
            "{r}"
        );
        assert_eq!(r.keys, 3);
        let results: Vec<_> = r.per_key.iter().map(|s| s.result).collect();
        assert_eq!(
            results,
            [
                KeyResult::Linearizable,
                KeyResult::NotLinearizable,
                KeyResult::Linearizable
            ]
        );
    }

    #[test]
    fn malformed_event_is_rejected() {
        let mut e = put(0, "x", "a", 10, 5);
        assert_refuted(std::slice::from_ref(&e), "x");
        e.complete = 11;
        e.outcome = Outcome::Cas(true);
        assert_refuted(&[e], "x");
    }

    #[test]
    fn zero_budget_times_out() {
        let r = check(&[put(0, "x", "a", 0, 1)], Duration::ZERO);
        assert_eq!(
            r.verdict,
            Verdict::Timeout {
                key: "x".to_string()
            }
        );
        assert!(!r.is_linearizable());
    }

    #[test]
    fn recorder_records_completed_and_dropped_ops() {
        let rec = Recorder::new();
        let p = rec.invoke(0, Op::Get { key: "x".into() });
        assert_eq!(p.op().key(), "x");
        p.complete(Outcome::Get(None));
        let r2 = rec.clone();
        std::thread::spawn(move || {
            let _abandoned = r2.invoke(
                1,
                Op::Put {
                    key: "x".into(),
                    value: "v".into(),
                },
            );
        })
        .join()
        .unwrap();
        let events = rec.events();
        assert_eq!(events.len(), 2);
        assert!(events[0].invoke <= events[0].complete);
        assert_eq!(events[1].outcome, Outcome::Unknown);
        assert_ok(&events);
    }

    /// A history of a real linearizable register: every op gets a random interval per
    /// client (clients are sequential), a random linearization point inside it, and its
    /// outcome is computed by applying the ops in linearization-point order. A few ops
    /// get an unknown outcome (and then take effect or not, at random).
    fn generate(seed: u64, clients: usize, ops_per_client: usize, keys: usize) -> Vec<Event> {
        let mut rng = Rng::new(seed);
        struct Gen {
            event: Event,
            point: u64,
            applies: bool,
        }
        let mut gens = Vec::new();
        for client in 0..clients {
            let mut t = 0;
            for _ in 0..ops_per_client {
                let invoke = t + rng.below(50);
                let complete = invoke + 1 + rng.below(200);
                let point = invoke + rng.below(complete - invoke + 1);
                t = complete;
                let key = format!("k{}", rng.below(keys as u64));
                let op = match rng.below(10) {
                    0..4 => Op::Get { key },
                    4..7 => Op::Put {
                        key,
                        value: String::new(),
                    },
                    _ => Op::Cas {
                        key,
                        expected: None,
                        new: String::new(),
                    },
                };
                let is_unknown = rng.below(100) < 3;
                gens.push(Gen {
                    event: Event {
                        client,
                        op,
                        outcome: if is_unknown {
                            Outcome::Unknown
                        } else {
                            Outcome::Put
                        },
                        invoke,
                        complete,
                    },
                    point,
                    applies: !is_unknown || rng.below(2) == 0,
                });
            }
        }
        gens.sort_by_key(|g| (g.point, g.event.client));
        let mut regs: HashMap<String, Option<String>> = HashMap::new();
        let mut written: HashMap<String, Vec<String>> = HashMap::new();
        let mut counter = 0;
        for g in &mut gens {
            let key = g.event.op.key().to_string();
            let cur = regs.entry(key.clone()).or_default();
            let old = written.entry(key).or_default();
            let unknown = g.event.outcome == Outcome::Unknown;
            match &mut g.event.op {
                Op::Get { .. } => {
                    if !unknown {
                        g.event.outcome = Outcome::Get(cur.clone());
                    }
                }
                Op::Put { value, .. } => {
                    counter += 1;
                    *value = format!("v{counter}");
                    if g.applies {
                        *cur = Some(value.clone());
                        old.push(value.clone());
                    }
                }
                Op::Cas { expected, new, .. } => {
                    counter += 1;
                    *new = format!("v{counter}");
                    *expected = match rng.below(4) {
                        0 | 1 => cur.clone(),
                        2 => None,
                        _ if old.is_empty() => None,
                        _ => Some(old[rng.below(old.len() as u64) as usize].clone()),
                    };
                    let swapped = *expected == *cur;
                    if g.applies && swapped {
                        *cur = Some(new.clone());
                        old.push(new.clone());
                    }
                    if !unknown {
                        g.event.outcome = Outcome::Cas(swapped);
                    }
                }
            }
        }
        gens.into_iter().map(|g| g.event).collect()
    }

    /// Index of a known get and a value that makes it a certainly-stale read: written by a
    /// known put that completed before a known overwrite (put or successful cas) was
    /// invoked, which itself completed before the get was invoked.
    fn find_stale_mutation(h: &[Event]) -> Option<(usize, String)> {
        let known = |e: &Event| e.outcome != Outcome::Unknown;
        for (gi, g) in h.iter().enumerate() {
            if !matches!(g.op, Op::Get { .. }) || !known(g) {
                continue;
            }
            for p in h {
                let Op::Put { key, value } = &p.op else {
                    continue;
                };
                if key != g.op.key() || !known(p) || p.complete >= g.invoke {
                    continue;
                }
                if g.outcome == Outcome::Get(Some(value.clone())) {
                    continue;
                }
                let overwritten = h.iter().any(|q| {
                    let writes = matches!(q.op, Op::Put { .. }) && known(q)
                        || q.outcome == Outcome::Cas(true);
                    writes && q.op.key() == key && q.invoke > p.complete && q.complete < g.invoke
                });
                if overwritten {
                    return Some((gi, value.clone()));
                }
            }
        }
        None
    }

    #[test]
    fn generated_history_passes_and_mutated_read_fails() {
        let mut h = generate(0x5eed_1234_abcd_0001, 8, 250, 3);
        assert_eq!(h.len(), 2000);
        let r = assert_ok(&h);
        assert_eq!(r.keys, 3);
        assert!(r.per_key.iter().all(|s| s.elapsed < BUDGET), "{r}");

        // Prefer a read late in the history, so the search must get far first.
        let n = h.len();
        let (gi, stale) = find_stale_mutation(&h[n / 2..])
            .map(|(i, v)| (i + n / 2, v))
            .or_else(|| find_stale_mutation(&h))
            .expect("a stale value to plant");
        let key = h[gi].op.key().to_string();
        h[gi].outcome = Outcome::Get(Some(stale.clone()));
        let why = assert_refuted(&h, &key);
        assert!(why.contains(&format!("{stale:?}")), "{why}");
    }

    /// Reference checker: plain exhaustive search over real-time-respecting orders, no
    /// pruning at all (exponential; only for tiny histories).
    fn brute_force(events: &[Event]) -> bool {
        fn apply(state: &Option<String>, e: &Event) -> Option<Option<String>> {
            match (&e.op, &e.outcome) {
                (Op::Get { .. }, Outcome::Get(v)) => (v == state).then(|| state.clone()),
                (Op::Get { .. }, _) => Some(state.clone()),
                (Op::Put { value, .. }, _) => Some(Some(value.clone())),
                (Op::Cas { expected, new, .. }, outcome) => {
                    let matches = expected == state;
                    match outcome {
                        Outcome::Cas(s) if *s != matches => None,
                        _ => Some(if matches {
                            Some(new.clone())
                        } else {
                            state.clone()
                        }),
                    }
                }
            }
        }
        fn go(events: &[Event], done: &mut Vec<bool>, state: &Option<String>) -> bool {
            let known = |e: &Event| e.outcome != Outcome::Unknown;
            if events.iter().zip(done.iter()).all(|(e, &d)| d || !known(e)) {
                return true;
            }
            for i in 0..events.len() {
                let blocked = (0..events.len()).any(|j| {
                    !done[j] && known(&events[j]) && events[j].complete < events[i].invoke
                });
                if done[i] || blocked {
                    continue;
                }
                if let Some(next) = apply(state, &events[i]) {
                    done[i] = true;
                    let ok = go(events, done, &next);
                    done[i] = false;
                    if ok {
                        return true;
                    }
                }
            }
            false
        }
        go(events, &mut vec![false; events.len()], &None)
    }

    #[test]
    fn agrees_with_brute_force_on_small_random_histories() {
        let mut rng = Rng::new(0x0dd_ba11_cafe_f00d);
        let vals = ["a", "b", "c"];
        let mut refuted = 0;
        for _ in 0..3000 {
            let n = 1 + rng.below(7) as usize;
            let mut h = Vec::new();
            for client in 0..n {
                let invoke = rng.below(20);
                let complete = invoke + rng.below(10);
                let v = |rng: &mut Rng| vals[rng.below(3) as usize].to_string();
                let ov = |rng: &mut Rng| (rng.below(4) > 0).then(|| v(rng));
                let (op, outcome) = match rng.below(3) {
                    0 => (Op::Get { key: "x".into() }, Outcome::Get(ov(&mut rng))),
                    1 => (
                        Op::Put {
                            key: "x".into(),
                            value: v(&mut rng),
                        },
                        Outcome::Put,
                    ),
                    _ => (
                        Op::Cas {
                            key: "x".into(),
                            expected: ov(&mut rng),
                            new: v(&mut rng),
                        },
                        Outcome::Cas(rng.below(2) == 0),
                    ),
                };
                let outcome = if rng.below(5) == 0 {
                    Outcome::Unknown
                } else {
                    outcome
                };
                h.push(Event {
                    client,
                    op,
                    outcome,
                    invoke,
                    complete,
                });
            }
            let expected = brute_force(&h);
            let r = check(&h, BUDGET);
            assert_eq!(r.is_linearizable(), expected, "{h:#?}\n{r}");
            refuted += usize::from(!expected);
        }
        assert!(
            (300..2700).contains(&refuted),
            "the generator should produce both outcomes, got {refuted} violations of 3000"
        );
    }

    #[test]
    fn generated_histories_with_other_seeds_pass() {
        for seed in 1..=4u64 {
            let h = generate(mix64(seed), 8, 60, 2);
            assert_ok(&h);
        }
    }
}
