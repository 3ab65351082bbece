//! Reads of committed state: ranges, read-only txns, history, the keys of a lease, the
//! revisions, consistent index, caller metadata and size; and the range evaluation
//! that plain reads, read-only txns and the writer share.

use rocksdb::{ColumnFamily, IteratorMode, ReadOptions};

use super::txn::{CommittedView, View, check_ranges, compare_path, run_path};
use super::{META_CONSISTENT_INDEX, META_USER_PREFIX, Shared, State, Store, read_i64_meta};
use crate::codec::{decode_record, decode_rev_key, rev_key};
use crate::error::{Error, Result};
use crate::index::Index;
use crate::types::*;

impl Store {
    /// The newest revision readers can see.
    pub fn current_revision(&self) -> i64 {
        self.shared.read_state().current
    }

    /// The revision history was compacted to (0 if never).
    pub fn compacted_revision(&self) -> i64 {
        self.shared.read_state().compacted
    }

    /// Index of the last log entry whose effects are in the store (see
    /// [`Writer::commit`]), 0 if none.
    ///
    /// [`Writer::commit`]: crate::Writer::commit
    pub fn consistent_index(&self) -> Result<u64> {
        Ok(read_i64_meta(&self.shared, META_CONSISTENT_INDEX)?.unwrap_or(0) as u64)
    }

    /// Reads a caller-owned metadata value written with [`Writer::put_meta`].
    ///
    /// [`Writer::put_meta`]: crate::Writer::put_meta
    pub fn meta(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let key = format!("{META_USER_PREFIX}{name}");
        Ok(self.shared.db.get_cf(self.shared.meta_cf(), key)?)
    }

    /// Approximate bytes on disk (SST files and memtables), and the part of it that
    /// holds live data.
    pub fn size_on_disk(&self) -> (i64, i64) {
        let prop = |cf: &ColumnFamily, name: &str| {
            self.shared
                .db
                .property_int_value_cf(cf, name)
                .ok()
                .flatten()
                .unwrap_or(0) as i64
        };
        let mut total = 0;
        let mut live = 0;
        for cf in self.shared.column_families() {
            let mem = prop(cf, "rocksdb.cur-size-all-mem-tables");
            total += prop(cf, "rocksdb.total-sst-files-size") + mem;
            live += prop(cf, "rocksdb.estimate-live-data-size") + mem;
        }
        crate::metrics::record_sizes(total, live.min(total));
        (total, live.min(total))
    }

    /// Serves a range read from committed state.
    pub fn range(&self, req: &RangeRequest) -> Result<RangeResponse> {
        crate::metrics::OpCounts {
            ranges: 1,
            ..Default::default()
        }
        .record();
        let st = self.shared.read_state();
        let at = read_revision(&st, req.revision)?;
        let plan = Plan::new(req);
        let (cands, count) = collect_committed(&st.index, req, at, &plan);
        let current = st.current;
        // Revisions resolved above stay readable in this snapshot even if a compaction
        // starts once the lock is released.
        let snap = self.shared.db.snapshot();
        drop(st);
        if req.count_only {
            return Ok(count_only_response(current, count));
        }
        let mut ro = ReadOptions::default();
        ro.set_snapshot(&snap);
        let kvs = fetch(&self.shared, &ro, cands)?;
        Ok(finish_range(kvs, count, current, req, &plan))
    }

    /// Serves a transaction that does not write (see [`TxnRequest::is_read_only`]).
    /// Everything is read at one revision.
    pub fn read_txn(&self, req: &TxnRequest) -> Result<TxnResponse> {
        debug_assert!(req.is_read_only());
        let st = self.shared.read_state();
        let view = CommittedView {
            shared: &self.shared,
            state: &st,
        };
        let path = compare_path(&view, req)?;
        check_ranges(&view, req, &path, st.current)?;
        let mut ops = crate::metrics::OpCounts::default();
        let mut resp = run_path(req, &path, &mut 0, &mut |op| match op {
            RequestOp::Range(r) => {
                ops.ranges += 1;
                Ok(ResponseOp::Range(view.range(r)?))
            }
            _ => unreachable!("read_txn is only called for read-only txns"),
        })?;
        ops.record();
        resp.header_revision = st.current;
        Ok(resp)
    }

    /// Every change with a main revision in `from..=to`, in revision order, read from
    /// one consistent view. Stops early only at the end of a revision, once
    /// `max_events` or `max_bytes` (keys plus values) is reached. If `from` is below the
    /// compaction point the answer is [`HistoryPage::Compacted`] with that revision.
    pub fn history(
        &self,
        from: i64,
        to: i64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<HistoryPage> {
        let (snap, compacted) = {
            let st = self.shared.read_state();
            // Taken under the state lock: records this read needs are only removed by
            // compactions that are not yet visible to it.
            (self.shared.db.snapshot(), st.compacted)
        };
        if from < compacted {
            return Ok(HistoryPage::Compacted(compacted));
        }
        let mut ro = ReadOptions::default();
        ro.set_snapshot(&snap);
        ro.set_iterate_upper_bound(rev_key(Revision::new(to.saturating_add(1), 0)).to_vec());
        let start = rev_key(Revision::new(from, 0));
        let mut out: Vec<HistoryEvent> = Vec::new();
        let mut bytes = 0usize;
        let iter = self.shared.db.iterator_cf_opt(
            self.shared.kv(),
            ro,
            IteratorMode::From(&start, rocksdb::Direction::Forward),
        );
        for item in iter {
            let (k, v) = item?;
            let rev = decode_rev_key(&k)?;
            if let Some(last) = out.last()
                && last.kv.mod_revision != rev.main
                && (out.len() >= max_events || bytes >= max_bytes)
            {
                break;
            }
            let rec = decode_record(rev, &v)?;
            bytes += rec.kv.key.len() + rec.kv.value.len();
            out.push(HistoryEvent {
                tombstone: rec.tombstone,
                kv: rec.kv,
            });
        }
        Ok(HistoryPage::Events(out))
    }

    /// The live keys attached to `lease`, sorted.
    pub fn lease_keys(&self, lease: i64) -> Vec<Vec<u8>> {
        self.shared.read_state().attached.keys(lease)
    }
}

/// Validates a requested read revision against committed state (0 = current).
pub(super) fn read_revision(st: &State, requested: i64) -> Result<i64> {
    if requested > st.current {
        return Err(Error::FutureRevision);
    }
    let at = if requested <= 0 {
        st.current
    } else {
        requested
    };
    if at < st.compacted {
        return Err(Error::Compacted);
    }
    Ok(at)
}

// ---------------------------------------------------------------------------------
// Range evaluation, shared by plain reads, read-only txns and writers.

/// How a range request walks the index.
pub(super) struct Plan {
    pub(super) order: SortOrder,
    /// Walk keys from the end of the range.
    pub(super) reverse: bool,
    /// Stop collecting after this many matches (counting goes on).
    pub(super) cap: Option<usize>,
    pub(super) filtered: bool,
}

impl Plan {
    pub(super) fn new(req: &RangeRequest) -> Plan {
        let mut order = req.sort_order;
        if req.sort_target != SortTarget::Key && order == SortOrder::None {
            // etcd sorts ascending by default when the target is not the key.
            order = SortOrder::Ascend;
        }
        let by_key = req.sort_target == SortTarget::Key;
        let reverse = by_key && order == SortOrder::Descend;
        let filtered = req.min_mod_revision != 0
            || req.max_mod_revision != 0
            || req.min_create_revision != 0
            || req.max_create_revision != 0;
        // In key order the first `limit + 1` matches are the answer (+1 tells `more`).
        let cap = (by_key && !filtered && req.limit > 0).then(|| req.limit as usize + 1);
        Plan {
            order,
            reverse,
            cap,
            filtered,
        }
    }
}

pub(super) fn passes_filters(req: &RangeRequest, mod_rev: i64, create_rev: i64) -> bool {
    (req.max_mod_revision == 0 || mod_rev <= req.max_mod_revision)
        && (req.min_mod_revision == 0 || mod_rev >= req.min_mod_revision)
        && (req.max_create_revision == 0 || create_rev <= req.max_create_revision)
        && (req.min_create_revision == 0 || create_rev >= req.min_create_revision)
}

/// A key chosen by a range, before its value is read.
pub(super) enum Candidate {
    Stored(Revision),
    Pending(KeyValue),
}

pub(super) fn collect_committed(
    index: &Index,
    req: &RangeRequest,
    at: i64,
    plan: &Plan,
) -> (Vec<Candidate>, i64) {
    let mut cands = Vec::new();
    let mut count = 0i64;
    for (_, ki) in index.range(&req.range, plan.reverse) {
        let Some(m) = ki.get(at) else { continue };
        count += 1;
        if req.count_only || plan.cap.is_some_and(|c| cands.len() >= c) {
            continue;
        }
        if !plan.filtered || passes_filters(req, m.modified.main, m.created.main) {
            cands.push(Candidate::Stored(m.modified));
        }
    }
    (cands, count)
}

pub(super) fn count_only_response(header_revision: i64, count: i64) -> RangeResponse {
    RangeResponse {
        header_revision,
        kvs: Vec::new(),
        more: false,
        count,
    }
}

/// Reads the values of candidates, in order.
pub(super) fn fetch(
    shared: &Shared,
    ro: &ReadOptions,
    cands: Vec<Candidate>,
) -> Result<Vec<KeyValue>> {
    let keys: Vec<_> = cands
        .iter()
        .filter_map(|c| match c {
            Candidate::Stored(r) => Some((*r, rev_key(*r))),
            Candidate::Pending(_) => None,
        })
        .collect();
    let cf = shared.kv();
    let mut values = shared
        .db
        .batched_multi_get_cf_opt(cf, keys.iter().map(|(_, k)| k), false, ro)
        .into_iter()
        .zip(&keys);
    let mut out = Vec::with_capacity(cands.len());
    for c in cands {
        match c {
            Candidate::Pending(kv) => out.push(kv),
            Candidate::Stored(_) => {
                let (v, (rev, _)) = values.next().expect("one value per stored candidate");
                let v = v?.ok_or_else(|| {
                    Error::Corrupt(format!("revision {rev:?} is indexed but not stored"))
                })?;
                out.push(decode_record(*rev, &v)?.kv);
            }
        }
    }
    Ok(out)
}

pub(super) fn finish_range(
    mut kvs: Vec<KeyValue>,
    count: i64,
    header_revision: i64,
    req: &RangeRequest,
    plan: &Plan,
) -> RangeResponse {
    let already_sorted = req.sort_target == SortTarget::Key && plan.order != SortOrder::Descend
        || (plan.reverse && plan.cap.is_some());
    if plan.order != SortOrder::None && !already_sorted {
        let key = |a: &KeyValue, b: &KeyValue| match req.sort_target {
            SortTarget::Key => a.key.cmp(&b.key),
            SortTarget::Version => a.version.cmp(&b.version),
            SortTarget::Create => a.create_revision.cmp(&b.create_revision),
            SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
            SortTarget::Value => a.value.cmp(&b.value),
        };
        if plan.order == SortOrder::Descend {
            kvs.sort_by(|a, b| key(b, a));
        } else {
            kvs.sort_by(key);
        }
    }
    let mut more = false;
    if req.limit > 0 && kvs.len() > req.limit as usize {
        kvs.truncate(req.limit as usize);
        more = true;
    }
    if req.keys_only {
        for kv in &mut kvs {
            kv.value.clear();
        }
    }
    RangeResponse {
        header_revision,
        kvs,
        more,
        count,
    }
}
