//! Txn evaluation as etcd's applier does it: the views a txn reads (committed state, or
//! committed state under a writer's overlay), compares, the path a txn takes, and the
//! execution of one write txn's ops into changes.

use std::collections::BTreeMap;

use rocksdb::ReadOptions;

use super::reads::{
    Candidate, Plan, collect_committed, count_only_response, fetch, finish_range, passes_filters,
    read_revision,
};
use super::{Shared, State};
use crate::error::{Error, Result};
use crate::index::KeyMeta;
use crate::types::*;

pub(super) trait View {
    /// Live keys in `range` at the newest revision this view sees, with values.
    fn latest_in(&self, range: &KeyRange) -> Result<Vec<KeyValue>>;
    fn range(&self, req: &RangeRequest) -> Result<RangeResponse>;
}

pub(super) struct CommittedView<'a> {
    pub(super) shared: &'a Shared,
    pub(super) state: &'a State,
}

impl View for CommittedView<'_> {
    fn latest_in(&self, range: &KeyRange) -> Result<Vec<KeyValue>> {
        let at = self.state.current;
        let cands = self
            .state
            .index
            .range(range, false)
            .filter_map(|(_, ki)| ki.get(at))
            .map(|m| Candidate::Stored(m.modified))
            .collect();
        fetch(self.shared, &ReadOptions::default(), cands)
    }

    fn range(&self, req: &RangeRequest) -> Result<RangeResponse> {
        let at = read_revision(self.state, req.revision)?;
        let plan = Plan::new(req);
        let (cands, count) = collect_committed(&self.state.index, req, at, &plan);
        if req.count_only {
            return Ok(count_only_response(self.state.current, count));
        }
        let kvs = fetch(self.shared, &ReadOptions::default(), cands)?;
        Ok(finish_range(kvs, count, self.state.current, req, &plan))
    }
}

fn compare_holds(view: &dyn View, c: &Compare) -> Result<bool> {
    let kvs = view.latest_in(&c.range)?;
    if kvs.is_empty() {
        // A missing key has no value to compare; the other targets compare as zero.
        if matches!(c.target, CompareTarget::Value(_)) {
            return Ok(false);
        }
        return Ok(compare_kv(c, &KeyValue::default()));
    }
    Ok(kvs.iter().all(|kv| compare_kv(c, kv)))
}

fn compare_kv(c: &Compare, kv: &KeyValue) -> bool {
    let ord = match &c.target {
        CompareTarget::Version(v) => kv.version.cmp(v),
        CompareTarget::Create(v) => kv.create_revision.cmp(v),
        CompareTarget::Mod(v) => kv.mod_revision.cmp(v),
        CompareTarget::Lease(v) => kv.lease.cmp(v),
        CompareTarget::Value(v) => kv.value.as_slice().cmp(v.as_slice()),
    };
    c.result.holds(ord)
}

/// Evaluates every compare on the path a txn will take, nested ones included, before
/// any of its writes, as etcd does. Depth-first order, one bool per txn on the path.
pub(super) fn compare_path(view: &dyn View, req: &TxnRequest) -> Result<Vec<bool>> {
    let mut path = Vec::new();
    fn walk(view: &dyn View, req: &TxnRequest, path: &mut Vec<bool>) -> Result<()> {
        let mut ok = true;
        for c in &req.compare {
            if !compare_holds(view, c)? {
                ok = false;
                break;
            }
        }
        path.push(ok);
        let ops = if ok { &req.success } else { &req.failure };
        for op in ops {
            if let RequestOp::Txn(t) = op {
                walk(view, t, path)?;
            }
        }
        Ok(())
    }
    walk(view, req, &mut path)?;
    Ok(path)
}

/// Visits the ops on a txn's chosen path, depth first.
pub(super) fn for_each_op_on_path(
    req: &TxnRequest,
    path: &[bool],
    f: &mut dyn FnMut(&RequestOp) -> Result<()>,
) -> Result<()> {
    fn walk(
        req: &TxnRequest,
        path: &[bool],
        cursor: &mut usize,
        f: &mut dyn FnMut(&RequestOp) -> Result<()>,
    ) -> Result<()> {
        let ok = path[*cursor];
        *cursor += 1;
        for op in if ok { &req.success } else { &req.failure } {
            f(op)?;
            if let RequestOp::Txn(t) = op {
                walk(t, path, cursor, f)?;
            }
        }
        Ok(())
    }
    walk(req, path, &mut 0, f)
}

/// etcd rejects a whole txn whose ranges ask for a compacted or future revision.
pub(super) fn check_ranges(
    view: &CommittedView<'_>,
    req: &TxnRequest,
    path: &[bool],
    newest: i64,
) -> Result<()> {
    for_each_op_on_path(req, path, &mut |op| {
        if let RequestOp::Range(r) = op {
            if r.revision > newest {
                return Err(Error::FutureRevision);
            }
            if r.revision > 0 && r.revision < view.state.compacted {
                return Err(Error::Compacted);
            }
        }
        Ok(())
    })
}

/// Runs the ops of the branch a txn took (nested txns recursively), handing every
/// other op to `exec`; responses come back in request order.
pub(super) fn run_path(
    req: &TxnRequest,
    path: &[bool],
    cursor: &mut usize,
    exec: &mut dyn FnMut(&RequestOp) -> Result<ResponseOp>,
) -> Result<TxnResponse> {
    let ok = path[*cursor];
    *cursor += 1;
    let mut responses = Vec::new();
    for op in if ok { &req.success } else { &req.failure } {
        responses.push(match op {
            RequestOp::Txn(t) => ResponseOp::Txn(run_path(t, path, cursor, exec)?),
            other => exec(other)?,
        });
    }
    Ok(TxnResponse {
        header_revision: 0,
        succeeded: ok,
        responses,
    })
}

/// One change of a batch: a put (the new key-value) or a tombstone.
pub(super) struct Change {
    pub(super) rev: Revision,
    pub(super) kv: KeyValue,
    pub(super) tombstone: bool,
}

/// The writer's view: committed state at `base` overlaid with the batch's changes.
pub(super) struct WriterView<'a> {
    pub(super) shared: &'a Shared,
    pub(super) state: &'a State,
    pub(super) overlay: &'a BTreeMap<Vec<u8>, Option<KeyValue>>,
    /// Revision reported for a read at the newest state.
    pub(super) newest: i64,
}

impl WriterView<'_> {
    pub(super) fn latest(&self, key: &[u8]) -> Result<Option<KeyValue>> {
        if let Some(v) = self.overlay.get(key) {
            return Ok(v.clone());
        }
        self.committed(key)
    }

    /// `(create_revision, version)` of the key's newest state, from the overlay or the
    /// index alone: no value is read.
    fn latest_meta(&self, key: &[u8]) -> Option<(i64, i64)> {
        match self.overlay.get(key) {
            Some(v) => v.as_ref().map(|kv| (kv.create_revision, kv.version)),
            None => self
                .state
                .index
                .get(key, self.state.current)
                .map(|m| (m.created.main, m.version)),
        }
    }

    fn committed(&self, key: &[u8]) -> Result<Option<KeyValue>> {
        let Some(m) = self.state.index.get(key, self.state.current) else {
            return Ok(None);
        };
        let mut kvs = fetch(
            self.shared,
            &ReadOptions::default(),
            vec![Candidate::Stored(m.modified)],
        )?;
        Ok(kvs.pop())
    }

    /// Candidates at the newest state: committed keys merged with the overlay.
    fn collect_latest(&self, range: &KeyRange) -> BTreeMap<Vec<u8>, (KeyMeta, Candidate)> {
        let at = self.state.current;
        let mut merged = BTreeMap::new();
        for (k, ki) in self.state.index.range(range, false) {
            if let Some(m) = ki.get(at) {
                merged.insert(k.clone(), (m, Candidate::Stored(m.modified)));
            }
        }
        let lower = std::ops::Bound::Included(range.key.clone());
        for (k, v) in self.overlay.range((lower, std::ops::Bound::Unbounded)) {
            if !range.contains(k) {
                if range.single()
                    || (range.range_end != [0] && k.as_slice() >= range.range_end.as_slice())
                {
                    break;
                }
                continue;
            }
            match v {
                None => {
                    merged.remove(k);
                }
                Some(kv) => {
                    let m = KeyMeta {
                        modified: Revision::new(kv.mod_revision, 0),
                        created: Revision::new(kv.create_revision, 0),
                        version: kv.version,
                    };
                    merged.insert(k.clone(), (m, Candidate::Pending(kv.clone())));
                }
            }
        }
        merged
    }
}

impl View for WriterView<'_> {
    fn latest_in(&self, range: &KeyRange) -> Result<Vec<KeyValue>> {
        let cands = self
            .collect_latest(range)
            .into_values()
            .map(|(_, c)| c)
            .collect();
        fetch(self.shared, &ReadOptions::default(), cands)
    }

    fn range(&self, req: &RangeRequest) -> Result<RangeResponse> {
        if req.revision > 0 {
            // A historical read: the writer flushed first if it reaches into the batch.
            let committed = CommittedView {
                shared: self.shared,
                state: self.state,
            };
            let mut r = committed.range(req)?;
            r.header_revision = self.newest;
            return Ok(r);
        }
        let plan = Plan::new(req);
        let mut cands = Vec::new();
        let mut count = 0i64;
        let merged = self.collect_latest(&req.range);
        let iter: Box<dyn Iterator<Item = _>> = if plan.reverse {
            Box::new(merged.into_values().rev())
        } else {
            Box::new(merged.into_values())
        };
        for (m, c) in iter {
            count += 1;
            if req.count_only || plan.cap.is_some_and(|cap| cands.len() >= cap) {
                continue;
            }
            if !plan.filtered || passes_filters(req, m.modified.main, m.created.main) {
                cands.push(c);
            }
        }
        if req.count_only {
            return Ok(count_only_response(self.newest, count));
        }
        let kvs = fetch(self.shared, &ReadOptions::default(), cands)?;
        Ok(finish_range(kvs, count, self.newest, req, &plan))
    }
}

/// The state of one write txn while [`run_path`] executes it: its revision, the next
/// sub revision, and its changes so far.
pub(super) struct TxnExec<'o> {
    pub(super) rev: i64,
    pub(super) sub: i64,
    pub(super) changes: Vec<Change>,
    pub(super) overlay: &'o mut BTreeMap<Vec<u8>, Option<KeyValue>>,
}

impl TxnExec<'_> {
    fn newest(&self) -> i64 {
        if self.sub > 0 { self.rev } else { self.rev - 1 }
    }

    pub(super) fn view<'v>(&'v self, shared: &'v Shared, st: &'v State) -> WriterView<'v> {
        WriterView {
            shared,
            state: st,
            overlay: self.overlay,
            newest: self.newest(),
        }
    }

    fn record(&mut self, kv: KeyValue, tombstone: bool) {
        let rev = Revision::new(self.rev, self.sub);
        self.sub += 1;
        self.overlay
            .insert(kv.key.clone(), (!tombstone).then(|| kv.clone()));
        self.changes.push(Change { rev, kv, tombstone });
    }

    pub(super) fn put(
        &mut self,
        shared: &Shared,
        st: &State,
        p: &PutRequest,
    ) -> Result<PutResponse> {
        let view = self.view(shared, st);
        // The previous value is read only when the request needs it; creation and
        // version come from the index.
        let needs_prev = p.prev_kv || p.ignore_value || p.ignore_lease;
        let prev = if needs_prev {
            view.latest(&p.key)?
        } else {
            None
        };
        let (create_revision, version) = match &prev {
            Some(kv) => (kv.create_revision, kv.version + 1),
            None => view
                .latest_meta(&p.key)
                .map_or((self.rev, 1), |(c, v)| (c, v + 1)),
        };
        let kv = KeyValue {
            key: p.key.clone(),
            create_revision,
            mod_revision: self.rev,
            version,
            value: match (&prev, p.ignore_value) {
                (Some(prev), true) => prev.value.clone(),
                _ => p.value.clone(),
            },
            lease: match (&prev, p.ignore_lease) {
                (Some(prev), true) => prev.lease,
                _ => p.lease,
            },
        };
        self.record(kv, false);
        Ok(PutResponse {
            header_revision: self.rev,
            prev_kv: if p.prev_kv { prev } else { None },
        })
    }

    pub(super) fn delete(
        &mut self,
        shared: &Shared,
        st: &State,
        d: &DeleteRangeRequest,
    ) -> Result<DeleteRangeResponse> {
        let victims = self.view(shared, st).latest_in(&d.range)?;
        let deleted = victims.len() as i64;
        for kv in &victims {
            let tomb = KeyValue {
                key: kv.key.clone(),
                mod_revision: self.rev,
                ..KeyValue::default()
            };
            self.record(tomb, true);
        }
        Ok(DeleteRangeResponse {
            header_revision: self.newest(),
            deleted,
            prev_kvs: if d.prev_kv { victims } else { Vec::new() },
        })
    }
}
