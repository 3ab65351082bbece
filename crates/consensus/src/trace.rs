//! Distributed tracing of proposals, through the OpenTelemetry API (a no-op until the
//! process installs a tracer provider).
//!
//! A proposal carries its trace context in the Raft entry's `context` field (raft-rs
//! keeps it through the forwarded `MsgPropose`, the leader's log, `MsgAppend` and the
//! WAL; the state machine never sees it). The proposer's context comes from the
//! caller's current OpenTelemetry context ([`current`]); with no sampled span there,
//! the field stays empty and nothing here runs beyond that emptiness check.
//!
//! Spans (the `member_id` attribute names the member):
//! - `raft.forward` on a follower that hands its proposal to the leader;
//! - `raft.proposal` on the leader, from accepting the entry until it is durable in
//!   its WAL, then `raft.commit` (its child) until a quorum has it;
//! - `raft.apply` on every member that applies it (a child of the leader's
//!   `raft.proposal`: the leader rewrites the entry's context before appending it).
//!
//! The encoding in the entry is this crate's own (not W3C text): a version byte, the
//! 16-byte trace id, the 8-byte span id and the flags byte.

use std::collections::BTreeMap;

use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _,
};
use opentelemetry::{Context, KeyValue, global};

/// The instrumentation scope of these spans.
const SCOPE: &str = "concord-consensus";
const VERSION: u8 = 0;
const ENCODED_LEN: usize = 1 + 16 + 8 + 1;
/// Leader-side proposals followed at once at most; beyond it new ones are not traced
/// by the leader (their entries keep the proposer's context, so apply spans still
/// join the trace).
const MAX_PENDING: usize = 4096;

type Span = global::BoxedSpan;

/// The entry context for `sc`.
pub(crate) fn encode(sc: &SpanContext) -> Vec<u8> {
    let mut out = Vec::with_capacity(ENCODED_LEN);
    out.push(VERSION);
    out.extend_from_slice(&sc.trace_id().to_bytes());
    out.extend_from_slice(&sc.span_id().to_bytes());
    out.push(sc.trace_flags().to_u8());
    out
}

/// The span context in an entry's `context`, if it holds one.
pub(crate) fn decode(b: &[u8]) -> Option<SpanContext> {
    if b.len() != ENCODED_LEN || b[0] != VERSION {
        return None;
    }
    let trace_id = TraceId::from_bytes(b[1..17].try_into().ok()?);
    let span_id = SpanId::from_bytes(b[17..25].try_into().ok()?);
    let sc = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(b[25]),
        true,
        TraceState::NONE,
    );
    sc.is_valid().then_some(sc)
}

/// The caller's sampled span as an entry context; empty when there is none (tracing
/// off, or this request not sampled).
pub(crate) fn current() -> Vec<u8> {
    Context::map_current(|cx| {
        let sc = cx.span().span_context().clone();
        if sc.is_valid() && sc.is_sampled() {
            encode(&sc)
        } else {
            Vec::new()
        }
    })
}

/// The tracer, fetched from the global provider on first use (the binary installs the
/// provider before it starts a member).
fn tracer(slot: &mut Option<global::BoxedTracer>) -> &global::BoxedTracer {
    slot.get_or_insert_with(|| global::tracer(SCOPE))
}

fn member(id: u64) -> KeyValue {
    KeyValue::new("member_id", format!("{id:x}"))
}

/// Starts span `name` under the span context encoded in `parent`; `None` if it
/// holds none.
fn start(
    tracer: &global::BoxedTracer,
    name: &'static str,
    kind: SpanKind,
    parent: &[u8],
    attributes: Vec<KeyValue>,
) -> Option<Span> {
    let parent = decode(parent)?;
    let cx = Context::new().with_remote_span_context(parent);
    Some(
        tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes)
            .start_with_context(tracer, &cx),
    )
}

fn fail(mut span: Span, why: &'static str) {
    span.set_status(Status::error(why));
    span.end();
}

enum Phase {
    /// Accepted; not yet durable in the leader's WAL.
    Proposal(Span),
    /// Durable on the leader; waiting for a quorum.
    Commit(Span),
}

/// The raft thread's spans.
pub(crate) struct RaftSpans {
    id: u64,
    tracer: Option<global::BoxedTracer>,
    /// `raft.forward` spans of this round, ended once its messages are sent.
    forwards: Vec<Span>,
    /// The `raft.forward` span of the proposal being stepped.
    forward: Option<Span>,
    /// `raft.proposal` spans of the entries of the proposal being stepped, in order
    /// (`None`: an entry without a trace).
    staged: Vec<Option<Span>>,
    /// On the leader: traced entries by index.
    pending: BTreeMap<u64, Phase>,
}

impl RaftSpans {
    pub(crate) fn new(id: u64) -> RaftSpans {
        RaftSpans {
            id,
            tracer: None,
            forwards: Vec::new(),
            forward: None,
            staged: Vec::new(),
            pending: BTreeMap::new(),
        }
    }

    /// A local proposal with trace context `parent` (not empty): the context its
    /// entry carries. On the leader a `raft.proposal` span is staged for it, on a
    /// follower a `raft.forward` span (see [`RaftSpans::stepped`]).
    pub(crate) fn local(&mut self, parent: Vec<u8>, leader: bool, leader_id: u64) -> Vec<u8> {
        let id = self.id;
        let (name, kind, attrs) = if leader {
            ("raft.proposal", SpanKind::Internal, vec![member(id)])
        } else {
            (
                "raft.forward",
                SpanKind::Producer,
                vec![
                    member(id),
                    KeyValue::new("raft.leader", format!("{leader_id:x}")),
                ],
            )
        };
        let tracer = tracer(&mut self.tracer);
        let Some(span) = start(tracer, name, kind, &parent, attrs) else {
            return parent;
        };
        let context = encode(span.span_context());
        if leader {
            self.staged.push(Some(span));
        } else {
            self.forward = Some(span);
        }
        context
    }

    /// A `MsgPropose` a follower forwarded, about to be stepped on the leader: stages a
    /// `raft.proposal` span for each traced entry and puts its context in the entry.
    /// Whether any entry was traced.
    pub(crate) fn forwarded(&mut self, msg: &mut raft::eraftpb::Message) -> bool {
        if msg.get_entries().iter().all(|e| e.context.is_empty()) {
            return false;
        }
        let id = self.id;
        let from = msg.from;
        let tracer = tracer(&mut self.tracer);
        for e in msg.mut_entries().iter_mut() {
            let span = (!e.context.is_empty())
                .then(|| {
                    start(
                        tracer,
                        "raft.proposal",
                        SpanKind::Consumer,
                        &e.context,
                        vec![member(id), KeyValue::new("raft.from", format!("{from:x}"))],
                    )
                })
                .flatten();
            if let Some(s) = &span {
                e.context = encode(s.span_context()).into();
            }
            self.staged.push(span);
        }
        true
    }

    /// After stepping the staged proposal (`ok`: raft-rs took it): the log's last
    /// index went from `before` to `after`. Appended entries are followed by index;
    /// dropped ones end as errors.
    pub(crate) fn stepped(&mut self, ok: bool, before: u64, after: u64, term: u64) {
        if let Some(forward) = self.forward.take() {
            if ok {
                self.forwards.push(forward);
            } else {
                fail(forward, "proposal dropped");
            }
        }
        let staged = std::mem::take(&mut self.staged);
        let appended = ok && after.saturating_sub(before) == staged.len() as u64;
        for (i, span) in staged.into_iter().enumerate() {
            let Some(mut span) = span else { continue };
            if !appended {
                fail(span, "proposal dropped");
                continue;
            }
            if self.pending.len() >= MAX_PENDING {
                span.end();
                continue;
            }
            let index = before + 1 + i as u64;
            span.set_attribute(KeyValue::new("raft.index", index as i64));
            span.set_attribute(KeyValue::new("raft.term", term as i64));
            self.pending.insert(index, Phase::Proposal(span));
        }
    }

    /// This round's messages went to the transport.
    pub(crate) fn sent(&mut self) {
        for mut s in self.forwards.drain(..) {
            s.end();
        }
    }

    /// Entries up to `last` are durable in this member's WAL.
    pub(crate) fn persisted(&mut self, last: u64) {
        if self.pending.is_empty() {
            return;
        }
        let tracer = tracer(&mut self.tracer);
        for (index, phase) in self.pending.range_mut(..=last) {
            if let Phase::Proposal(span) = phase {
                let cx = Context::new().with_remote_span_context(span.span_context().clone());
                span.end();
                let commit = tracer
                    .span_builder("raft.commit")
                    .with_kind(SpanKind::Internal)
                    .with_attributes([member(self.id), KeyValue::new("raft.index", *index as i64)])
                    .start_with_context(tracer, &cx);
                *phase = Phase::Commit(commit);
            }
        }
    }

    /// Entries up to `last` are committed.
    pub(crate) fn committed(&mut self, last: u64) {
        while let Some(entry) = self.pending.first_entry() {
            if *entry.key() > last {
                break;
            }
            match entry.remove() {
                Phase::Proposal(mut s) | Phase::Commit(mut s) => s.end(),
            }
        }
    }

    /// Leadership is lost: proposals not yet committed end as errors (they may still
    /// commit under the next leader).
    pub(crate) fn not_leader(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        for (_, phase) in std::mem::take(&mut self.pending) {
            match phase {
                Phase::Proposal(s) | Phase::Commit(s) => fail(s, "leadership lost"),
            }
        }
    }
}

/// The apply thread's spans: one `raft.apply` per traced entry of a batch.
pub(crate) struct ApplySpans {
    id: u64,
    tracer: Option<global::BoxedTracer>,
}

impl ApplySpans {
    pub(crate) fn new(id: u64) -> ApplySpans {
        ApplySpans { id, tracer: None }
    }

    /// Starts the spans of the traced entries `(index, context)` of a batch of `batch`
    /// commands about to be applied.
    pub(crate) fn start(&mut self, traced: &[(u64, bytes::Bytes)], batch: usize) -> Vec<Span> {
        let id = self.id;
        let tracer = tracer(&mut self.tracer);
        traced
            .iter()
            .filter_map(|(index, context)| {
                start(
                    tracer,
                    "raft.apply",
                    SpanKind::Internal,
                    context,
                    vec![
                        member(id),
                        KeyValue::new("raft.index", *index as i64),
                        KeyValue::new("raft.batch", batch as i64),
                    ],
                )
            })
            .collect()
    }
}

/// Ends the spans [`ApplySpans::start`] made.
pub(crate) fn end_all(spans: Vec<Span>, ok: bool) {
    for mut s in spans {
        if !ok {
            s.set_status(Status::error("apply failed"));
        }
        s.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_context_round_trips() {
        let sc = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            false,
            TraceState::NONE,
        );
        let b = encode(&sc);
        assert_eq!(b.len(), ENCODED_LEN);
        let back = decode(&b).unwrap();
        assert_eq!(back.trace_id(), sc.trace_id());
        assert_eq!(back.span_id(), sc.span_id());
        assert!(back.is_sampled() && back.is_remote());
        assert!(decode(&[]).is_none());
        assert!(decode(&b[1..]).is_none());
        let mut other = b.clone();
        other[0] = 9;
        assert!(decode(&other).is_none(), "unknown version");
        assert!(decode(&encode(&SpanContext::NONE)).is_none(), "invalid ids");
    }

    #[test]
    fn no_current_span_means_no_context() {
        assert!(current().is_empty());
    }
}
