//! The write batch, [`Writer`]: puts, deletes and txns one revision each, caller
//! metadata and aux records, requested compactions, and the one RocksDB write that
//! commits them.

use std::collections::BTreeMap;
use std::sync::MutexGuard;

use rocksdb::{WriteBatch, WriteOptions};

use super::txn::{Change, TxnExec, View, WriterView, compare_path, for_each_op_on_path, run_path};
use super::{CompactWait, META_COMPACT_SCHEDULED, META_CONSISTENT_INDEX, META_USER_PREFIX, Store};
use crate::auxiliary::aux_key;
use crate::codec::{encode_record, rev_key};
use crate::error::{Error, Result};
use crate::types::*;

/// A batch of write transactions applied in order and committed together.
///
/// Each write txn gets the next main revision; the batch's effects become visible to
/// readers, all at once, in [`Writer::commit`]. Until then the writer sees its own
/// changes through an overlay. A batch that is dropped without commit changes nothing.
pub struct Writer<'a> {
    store: &'a Store,
    _guard: MutexGuard<'a, ()>,
    /// Latest state of each key changed in this batch; `None` once deleted.
    overlay: BTreeMap<Vec<u8>, Option<KeyValue>>,
    changes: Vec<Change>,
    meta: Vec<(Vec<u8>, Vec<u8>)>,
    /// Aux records (stored keys) to write (`Some`) or remove (`None`) with the batch,
    /// in call order.
    aux_ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// Committed revision the batch builds on.
    base: i64,
    /// Newest revision assigned in this batch.
    rev: i64,
    /// Compacted revision including compactions requested in this batch.
    compacted: i64,
    compactions: Vec<(i64, CompactWait)>,
    /// Changes made visible by this batch so far, for [`Writer::commit_changes`].
    flushed: Vec<Change>,
}

/// Tells whether a lease id is granted; the store does not own leases.
pub trait LeaseLookup {
    fn lease_exists(&self, id: i64) -> bool;
}

/// No lease exists: for callers without a lease manager.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoLeases;

impl LeaseLookup for NoLeases {
    fn lease_exists(&self, _id: i64) -> bool {
        false
    }
}

impl Store {
    /// Starts a write batch. Only one exists at a time; others wait here.
    pub fn writer(&self) -> Result<Writer<'_>> {
        let guard = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(why) = self
            .poisoned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Err(Error::Poisoned(why));
        }
        let st = self.shared.read_state();
        let base = st.current;
        let compacted = st.compacted;
        drop(st);
        Ok(Writer {
            store: self,
            _guard: guard,
            overlay: BTreeMap::new(),
            changes: Vec::new(),
            meta: Vec::new(),
            aux_ops: Vec::new(),
            base,
            rev: base,
            compacted,
            compactions: Vec::new(),
            flushed: Vec::new(),
        })
    }
}

impl Writer<'_> {
    /// The revision the batch has reached (committed or not).
    pub fn revision(&self) -> i64 {
        self.rev
    }

    /// Applies a put as a one-op write txn.
    pub fn put(&mut self, req: &PutRequest, leases: &dyn LeaseLookup) -> Result<PutResponse> {
        let txn = TxnRequest {
            compare: Vec::new(),
            success: vec![RequestOp::Put(req.clone())],
            failure: Vec::new(),
        };
        match self.txn(&txn, leases)?.responses.pop() {
            Some(ResponseOp::Put(p)) => Ok(p),
            _ => unreachable!("a one-put txn answers with one put"),
        }
    }

    /// Applies a delete as a one-op write txn.
    pub fn delete_range(&mut self, req: &DeleteRangeRequest) -> Result<DeleteRangeResponse> {
        let txn = TxnRequest {
            compare: Vec::new(),
            success: vec![RequestOp::DeleteRange(req.clone())],
            failure: Vec::new(),
        };
        match self.txn(&txn, &NoLeases)?.responses.pop() {
            Some(ResponseOp::DeleteRange(d)) => Ok(d),
            _ => unreachable!("a one-delete txn answers with one delete"),
        }
    }

    /// Applies a transaction. On error nothing of it is applied; the rest of the batch
    /// is unaffected.
    pub fn txn(&mut self, req: &TxnRequest, leases: &dyn LeaseLookup) -> Result<TxnResponse> {
        if self.reads_into_batch(req) {
            self.flush()?;
        }
        let shared = &*self.store.shared;
        let st = shared.read_state();
        let path = {
            let view = WriterView {
                shared,
                state: &st,
                overlay: &self.overlay,
                newest: self.rev,
            };
            let path = compare_path(&view, req)?;
            // Every check comes before the first change, so an error leaves no trace.
            let compacted = self.compacted;
            let newest = self.rev;
            for_each_op_on_path(req, &path, &mut |op| match op {
                RequestOp::Range(r) => {
                    if r.revision > newest {
                        Err(Error::FutureRevision)
                    } else if r.revision > 0 && r.revision < compacted {
                        Err(Error::Compacted)
                    } else {
                        Ok(())
                    }
                }
                RequestOp::Put(p) => {
                    if p.lease != 0 && !leases.lease_exists(p.lease) {
                        return Err(Error::LeaseNotFound);
                    }
                    if (p.ignore_value || p.ignore_lease) && view.latest(&p.key)?.is_none() {
                        return Err(Error::KeyNotFound);
                    }
                    Ok(())
                }
                RequestOp::DeleteRange(_) | RequestOp::Txn(_) => Ok(()),
            })?;
            path
        };
        let mut exec = TxnExec {
            rev: self.rev + 1,
            sub: 0,
            changes: Vec::new(),
            overlay: &mut self.overlay,
        };
        let mut ops = crate::metrics::OpCounts::default();
        let result = run_path(req, &path, &mut 0, &mut |op| {
            Ok(match op {
                RequestOp::Range(r) => {
                    ops.ranges += 1;
                    ResponseOp::Range(exec.view(shared, &st).range(r)?)
                }
                RequestOp::Put(p) => {
                    ops.puts += 1;
                    ResponseOp::Put(exec.put(shared, &st, p)?)
                }
                RequestOp::DeleteRange(d) => {
                    ops.deletes += 1;
                    ResponseOp::DeleteRange(exec.delete(shared, &st, d)?)
                }
                RequestOp::Txn(_) => unreachable!("run_path recurses into nested txns itself"),
            })
        });
        let TxnExec { sub, changes, .. } = exec;
        drop(st);
        match result {
            Ok(mut resp) => {
                ops.record();
                if sub > 0 {
                    self.rev += 1;
                }
                self.changes.extend(changes);
                resp.header_revision = self.rev;
                Ok(resp)
            }
            Err(e) => {
                // Undo the overlay entries this txn made.
                self.rebuild_overlay_without(&changes);
                Err(e)
            }
        }
    }

    fn rebuild_overlay_without(&mut self, dropped: &[Change]) {
        for c in dropped {
            self.overlay.remove(&c.kv.key);
        }
        for c in &self.changes {
            if dropped.iter().any(|d| d.kv.key == c.kv.key) {
                let v = (!c.tombstone).then(|| c.kv.clone());
                self.overlay.insert(c.kv.key.clone(), v);
            }
        }
    }

    /// True if some range in `req` reads history newer than what is committed.
    fn reads_into_batch(&self, req: &TxnRequest) -> bool {
        fn walk(ops: &[RequestOp], base: i64) -> bool {
            ops.iter().any(|op| match op {
                RequestOp::Range(r) => r.revision > base,
                RequestOp::Txn(t) => walk(&t.success, base) || walk(&t.failure, base),
                _ => false,
            })
        }
        self.rev > self.base && (walk(&req.success, self.base) || walk(&req.failure, self.base))
    }

    /// Schedules compaction of history before `revision`. Readers cannot ask for older
    /// revisions once the batch commits; records are removed in the background.
    pub fn compact(&mut self, revision: i64) -> Result<CompactWait> {
        if revision <= self.compacted {
            return Err(Error::Compacted);
        }
        if revision > self.rev {
            return Err(Error::FutureRevision);
        }
        self.compacted = revision;
        let wait = CompactWait::default();
        self.compactions.push((revision, wait.clone()));
        Ok(wait)
    }

    /// Stores a caller-owned metadata value with the batch (read it with [`Store::meta`]).
    pub fn put_meta(&mut self, name: &str, value: &[u8]) {
        self.meta.push((
            format!("{META_USER_PREFIX}{name}").into_bytes(),
            value.to_vec(),
        ));
    }

    /// Stores `value` under `key` in the caller's aux table `table` with the batch:
    /// replicated state, carried by images and covered by [`Store::hash`] (read it with
    /// [`Store::aux`] or [`Store::aux_scan`]). Table names are the caller's; the store
    /// only keeps them apart. The batch's own aux writes are not visible to its reads.
    ///
    /// # Panics
    ///
    /// If `table` is empty or contains `/`.
    pub fn put_aux(&mut self, table: &str, key: &[u8], value: &[u8]) {
        self.aux_ops
            .push((aux_key(table, key), Some(value.to_vec())));
    }

    /// Removes `key` from aux table `table` with the batch (nothing if absent).
    ///
    /// # Panics
    ///
    /// If `table` is empty or contains `/`.
    pub fn delete_aux(&mut self, table: &str, key: &[u8]) {
        self.aux_ops.push((aux_key(table, key), None));
    }

    /// Deletes every live key attached to `lease` in one write txn (one revision, the
    /// keys in sorted order, as etcd revokes), and returns the revision after it.
    pub fn delete_leased_keys(&mut self, lease: i64) -> Result<i64> {
        // The batch's own puts may have attached or detached keys: publish them first so
        // the attached set is current.
        if !self.changes.is_empty() {
            self.flush()?;
        }
        let keys = self.store.lease_keys(lease);
        let req = TxnRequest {
            compare: Vec::new(),
            success: keys
                .into_iter()
                .map(|k| {
                    RequestOp::DeleteRange(DeleteRangeRequest {
                        range: KeyRange::new(k, Vec::new()),
                        prev_kv: false,
                    })
                })
                .collect(),
            failure: Vec::new(),
        };
        Ok(self.txn(&req, &NoLeases)?.header_revision)
    }

    /// Writes the batch in one RocksDB write, then makes it visible. `consistent_index`
    /// (the log index of the last entry applied) is written in the same write, so
    /// replaying a log after a crash can skip what is already here.
    pub fn commit(self, consistent_index: Option<u64>) -> Result<i64> {
        self.commit_changes(consistent_index).map(|(rev, _)| rev)
    }

    /// [`Writer::commit`], also returning every change the batch made, in revision
    /// order: what a watch hub publishes.
    pub fn commit_changes(
        mut self,
        consistent_index: Option<u64>,
    ) -> Result<(i64, Vec<HistoryEvent>)> {
        if let Some(i) = consistent_index {
            self.meta.push((
                META_CONSISTENT_INDEX.to_vec(),
                (i as i64).to_be_bytes().to_vec(),
            ));
        }
        self.flush()?;
        let changes = std::mem::take(&mut self.flushed)
            .into_iter()
            .map(|c| HistoryEvent {
                tombstone: c.tombstone,
                kv: c.kv,
            })
            .collect();
        Ok((self.rev, changes))
    }

    fn flush(&mut self) -> Result<()> {
        if self.changes.is_empty()
            && self.meta.is_empty()
            && self.compactions.is_empty()
            && self.aux_ops.is_empty()
        {
            return Ok(());
        }
        let shared = &*self.store.shared;
        let mut batch = WriteBatch::default();
        for c in &self.changes {
            batch.put_cf(
                shared.kv(),
                rev_key(c.rev),
                encode_record(c.tombstone, &c.kv),
            );
        }
        for (k, v) in &self.meta {
            batch.put_cf(shared.meta_cf(), k, v);
        }
        for (k, v) in &self.aux_ops {
            match v {
                Some(v) => batch.put_cf(shared.aux_cf(), k, v),
                None => batch.delete_cf(shared.aux_cf(), k),
            }
        }
        if let Some((rev, _)) = self.compactions.last() {
            batch.put_cf(shared.meta_cf(), META_COMPACT_SCHEDULED, rev.to_be_bytes());
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(self.store.sync_writes);
        let started = std::time::Instant::now();
        let written = shared.db.write_opt(batch, &wo);
        ::metrics::histogram!(crate::metrics::COMMIT_SECONDS)
            .record(started.elapsed().as_secs_f64());
        if let Err(e) = written {
            let why = e.into_string();
            tracing::error!(error = %why, "mvcc write failed; store poisoned");
            *self
                .store
                .poisoned
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(why.clone());
            return Err(Error::Poisoned(why));
        }
        let live = {
            let mut st = shared.state.write().unwrap_or_else(|e| e.into_inner());
            for c in self.changes.drain(..) {
                if c.tombstone {
                    st.index.tombstone(&c.kv.key, c.rev);
                } else {
                    st.index.put(&c.kv.key, c.rev);
                }
                st.attached
                    .set(&c.kv.key, (!c.tombstone).then_some(c.kv.lease));
                self.flushed.push(c);
            }
            st.current = self.rev;
            st.compacted = self.compacted;
            st.index.live()
        };
        {
            use crate::metrics as m;
            ::metrics::gauge!(m::CURRENT_REVISION).set(self.rev as f64);
            ::metrics::gauge!(m::COMPACT_REVISION).set(self.compacted as f64);
            ::metrics::gauge!(m::KEYS).set(live as f64);
        }
        for (rev, wait) in self.compactions.drain(..) {
            self.store.schedule_compaction(rev, wait);
        }
        self.overlay.clear();
        self.meta.clear();
        self.aux_ops.clear();
        self.base = self.rev;
        Ok(())
    }
}
