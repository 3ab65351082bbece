//! The store: RocksDB holds every revision, the [`Index`] says which one is visible.
//!
//! Concurrency: any number of readers, one [`Writer`] at a time. A reader holds the
//! index lock only while it resolves keys to revisions, then takes a RocksDB snapshot
//! and fetches values outside the lock. A writer evaluates a batch of transactions
//! against the committed state plus its own overlay, writes the whole batch in one
//! RocksDB write (one fsync), and only then publishes the new revisions to readers.
//! Compaction runs on its own thread, in chunks, so it never holds the lock for long.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::thread;

use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, DB, DBCompressionType, IteratorMode, Options,
    ReadOptions, WriteBatch, WriteOptions,
};

use crate::auxiliary::{CF_AUX, LEGACY_TABLES, aux_key, migrate_legacy};
use crate::codec::{decode_record, decode_rev_key, encode_record, rev_key};
use crate::error::{Error, Result};
use crate::index::{Index, KeyMeta};
use crate::types::*;

pub(crate) const CF_KV: &str = "kv";
pub(crate) const CF_META: &str = "meta";
pub(crate) const META_CONSISTENT_INDEX: &[u8] = b"consistent_index";
pub(crate) const META_COMPACT_SCHEDULED: &[u8] = b"compact_scheduled";
pub(crate) const META_COMPACT_FINISHED: &[u8] = b"compact_finished";
/// Keys handed to callers through [`Store::meta`] / [`Writer::put_meta`] live here, apart
/// from the store's own.
pub(crate) const META_USER_PREFIX: &str = "user/";
/// How many keys compaction handles per hold of the index lock, and how many records
/// it deletes per RocksDB write.
const COMPACT_CHUNK: usize = 10_000;

/// Store settings.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// fsync every commit. On until a replicated log makes the state machine's own
    /// writes re-creatable.
    pub sync_writes: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self { sync_writes: true }
    }
}

pub(crate) struct State {
    pub(crate) index: Index,
    pub(crate) current: i64,
    pub(crate) compacted: i64,
    pub(crate) attached: Attached,
}

/// Which live keys carry which lease: rebuilt from the records on open, kept current by
/// every commit. Only keys with a lease take space here.
#[derive(Debug, Default)]
pub(crate) struct Attached {
    by_lease: HashMap<i64, BTreeSet<Vec<u8>>>,
    by_key: HashMap<Vec<u8>, i64>,
}

impl Attached {
    /// Records the key's newest state: `lease` 0 (or a tombstone, `None`) detaches it.
    pub(crate) fn set(&mut self, key: &[u8], lease: Option<i64>) {
        let lease = lease.unwrap_or(0);
        match self.by_key.get(key) {
            Some(&old) if old == lease => return,
            Some(&old) => {
                if let Some(keys) = self.by_lease.get_mut(&old) {
                    keys.remove(key);
                    if keys.is_empty() {
                        self.by_lease.remove(&old);
                    }
                }
                self.by_key.remove(key);
            }
            None if lease == 0 => return,
            None => {}
        }
        if lease != 0 {
            self.by_key.insert(key.to_vec(), lease);
            self.by_lease.entry(lease).or_default().insert(key.to_vec());
        }
    }

    pub(crate) fn keys(&self, lease: i64) -> Vec<Vec<u8>> {
        self.by_lease
            .get(&lease)
            .map(|k| k.iter().cloned().collect())
            .unwrap_or_default()
    }
}

pub(crate) struct Shared {
    pub(crate) db: DB,
    pub(crate) state: RwLock<State>,
    /// Held by a compaction for its whole run, and by a snapshot import, so an import
    /// never swaps the key index under a compaction that is deciding what to delete.
    pub(crate) compaction: Mutex<()>,
}

impl Shared {
    pub(crate) fn kv(&self) -> &ColumnFamily {
        self.db.cf_handle(CF_KV).expect("kv column family exists")
    }

    pub(crate) fn meta_cf(&self) -> &ColumnFamily {
        self.db
            .cf_handle(CF_META)
            .expect("meta column family exists")
    }

    /// The caller's tables (see `auxiliary.rs`).
    pub(crate) fn aux_cf(&self) -> &ColumnFamily {
        self.db.cf_handle(CF_AUX).expect("aux column family exists")
    }

    /// Every column family, in a fixed order.
    pub(crate) fn column_families(&self) -> [&ColumnFamily; 3] {
        [self.kv(), self.meta_cf(), self.aux_cf()]
    }

    pub(crate) fn read_state(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running or finished compaction; [`CompactWait::wait`] blocks until its records are
/// removed from disk (etcd's `physical` compaction).
#[derive(Debug, Clone, Default)]
pub struct CompactWait {
    done: Arc<(Mutex<Option<Result<()>>>, Condvar)>,
}

impl CompactWait {
    fn finish(&self, r: Result<()>) {
        let (m, cv) = &*self.done;
        *m.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        cv.notify_all();
    }

    /// Blocks until the compaction has removed its revisions from disk.
    pub fn wait(&self) -> Result<()> {
        let (m, cv) = &*self.done;
        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
        while g.is_none() {
            g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.clone().expect("checked above")
    }
}

struct CompactJob {
    revision: i64,
    wait: CompactWait,
}

/// The revisioned key-value store. Cheap to share behind an `Arc`.
pub struct Store {
    pub(crate) shared: Arc<Shared>,
    pub(crate) writer: Mutex<()>,
    sync_writes: bool,
    pub(crate) poisoned: Mutex<Option<String>>,
    compactor: Mutex<Option<mpsc::Sender<CompactJob>>>,
    compactor_thread: Mutex<Option<thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("current_revision", &self.current_revision())
            .finish_non_exhaustive()
    }
}

fn db_options() -> Options {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.increase_parallelism(2);
    opts.set_compression_type(DBCompressionType::Lz4);
    opts.set_bottommost_compression_type(DBCompressionType::Zstd);
    opts.set_max_background_jobs(2);
    opts
}

impl Store {
    /// Opens (or creates) a store in `path`, rebuilding the key index from disk and
    /// resuming a compaction that was scheduled but not finished. A data directory from
    /// before the aux keyspace has its lease, alarm and state column families moved into
    /// the aux tables of the same names first (see [`crate::LEGACY_TABLES`]).
    pub fn open(path: impl AsRef<Path>, options: StoreOptions) -> Result<Store> {
        let mut opts = db_options();
        // Compactions (automatic ones and defragmentation) run in RocksDB's low-priority
        // pool; at the lowest CPU priority they take what requests leave, so a
        // defragmentation does not stall the member. (The default environment is
        // process-wide; this only ever lowers its pool.)
        if let Ok(mut env) = rocksdb::Env::new() {
            env.lower_thread_pool_cpu_priority();
            opts.set_env(&env);
        }
        // RocksDB opens a directory only with every family it has; the legacy per-table
        // ones are opened to be moved into `aux`. A new directory has none (`list_cf`
        // fails on it); any other failure to list shows up as an error of the open.
        let existing = DB::list_cf(&opts, path.as_ref()).unwrap_or_default();
        let legacy: Vec<&str> = LEGACY_TABLES
            .into_iter()
            .filter(|n| existing.iter().any(|e| e.as_str() == *n))
            .collect();
        let cfs = [CF_KV, CF_META, CF_AUX]
            .into_iter()
            .chain(legacy.iter().copied())
            .map(|n| ColumnFamilyDescriptor::new(n, db_options()));
        let mut db = DB::open_cf_descriptors(&opts, path.as_ref(), cfs)?;
        if !legacy.is_empty() {
            migrate_legacy(&mut db, &legacy)?;
        }
        let shared = Arc::new(Shared {
            db,
            state: RwLock::new(State {
                index: Index::new(),
                current: 1,
                compacted: 0,
                attached: Attached::default(),
            }),
            compaction: Mutex::new(()),
        });
        let scheduled = read_i64_meta(&shared, META_COMPACT_SCHEDULED)?.unwrap_or(0);
        let finished = read_i64_meta(&shared, META_COMPACT_FINISHED)?.unwrap_or(0);
        load_state(&shared, scheduled)?;
        let store = Store {
            shared: shared.clone(),
            writer: Mutex::new(()),
            sync_writes: options.sync_writes,
            poisoned: Mutex::new(None),
            compactor: Mutex::new(None),
            compactor_thread: Mutex::new(None),
        };
        let (tx, rx) = mpsc::channel::<CompactJob>();
        let handle = thread::Builder::new()
            .name("mvcc-compactor".into())
            .spawn(move || compactor_loop(&shared, rx))
            .map_err(|e| Error::Storage(format!("spawning the compactor: {e}")))?;
        *store.compactor.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        *store
            .compactor_thread
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(handle);
        if scheduled > finished {
            tracing::info!(revision = scheduled, "resuming interrupted compaction");
            store.schedule_compaction(scheduled, CompactWait::default());
        }
        Ok(store)
    }

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
    pub fn consistent_index(&self) -> Result<u64> {
        Ok(read_i64_meta(&self.shared, META_CONSISTENT_INDEX)?.unwrap_or(0) as u64)
    }

    /// Reads a caller-owned metadata value written with [`Writer::put_meta`].
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
        (total, live.min(total))
    }

    /// Serves a range read from committed state.
    pub fn range(&self, req: &RangeRequest) -> Result<RangeResponse> {
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
        let mut resp = run_path(req, &path, &mut 0, &mut |op| match op {
            RequestOp::Range(r) => Ok(ResponseOp::Range(view.range(r)?)),
            _ => unreachable!("read_txn is only called for read-only txns"),
        })?;
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

    pub(crate) fn schedule_compaction(&self, revision: i64, wait: CompactWait) {
        let sent = self
            .compactor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|tx| {
                tx.send(CompactJob {
                    revision,
                    wait: wait.clone(),
                })
            });
        if !matches!(sent, Some(Ok(()))) {
            wait.finish(Err(Error::Storage("compactor stopped".into())));
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Closing the channel ends the compactor after its current job.
        self.compactor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(h) = self
            .compactor_thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = h.join();
        }
    }
}

/// Rebuilds the in-memory state (key index, current and compacted revisions) from the
/// records on disk; `compacted` is the newest scheduled compaction.
pub(crate) fn load_state(shared: &Shared, compacted: i64) -> Result<()> {
    let mut index = Index::new();
    let mut attached = Attached::default();
    let mut max_rev = 1;
    for item in shared.db.iterator_cf(shared.kv(), IteratorMode::Start) {
        let (k, v) = item?;
        let rev = decode_rev_key(&k)?;
        let rec = decode_record(rev, &v)?;
        let created = Revision::new(rec.kv.create_revision, 0);
        index.restore(&rec.kv.key, rev, created, rec.kv.version, rec.tombstone);
        // Records come in revision order, so the last one of a key decides.
        attached.set(&rec.kv.key, (!rec.tombstone).then_some(rec.kv.lease));
        max_rev = rev.main;
    }
    let mut st = shared.state.write().unwrap_or_else(|e| e.into_inner());
    st.index = index;
    st.attached = attached;
    // Compaction may have removed the newest records (tombstones), but never past the
    // compacted revision.
    st.current = max_rev.max(compacted);
    st.compacted = compacted;
    tracing::info!(
        revision = st.current,
        compacted,
        keys = st.index.len(),
        "mvcc state loaded"
    );
    Ok(())
}

pub(crate) fn read_i64_meta(shared: &Shared, key: &[u8]) -> Result<Option<i64>> {
    match shared.db.get_cf(shared.meta_cf(), key)? {
        None => Ok(None),
        Some(v) => {
            let b: [u8; 8] = v.as_slice().try_into().map_err(|_| {
                Error::Corrupt(format!("meta key {:?}", String::from_utf8_lossy(key)))
            })?;
            Ok(Some(i64::from_be_bytes(b)))
        }
    }
}

/// Validates a requested read revision against committed state (0 = current).
fn read_revision(st: &State, requested: i64) -> Result<i64> {
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
struct Plan {
    order: SortOrder,
    /// Walk keys from the end of the range.
    reverse: bool,
    /// Stop collecting after this many matches (counting goes on).
    cap: Option<usize>,
    filtered: bool,
}

impl Plan {
    fn new(req: &RangeRequest) -> Plan {
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

fn passes_filters(req: &RangeRequest, mod_rev: i64, create_rev: i64) -> bool {
    (req.max_mod_revision == 0 || mod_rev <= req.max_mod_revision)
        && (req.min_mod_revision == 0 || mod_rev >= req.min_mod_revision)
        && (req.max_create_revision == 0 || create_rev <= req.max_create_revision)
        && (req.min_create_revision == 0 || create_rev >= req.min_create_revision)
}

/// A key chosen by a range, before its value is read.
enum Candidate {
    Stored(Revision),
    Pending(KeyValue),
}

fn collect_committed(
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

fn count_only_response(header_revision: i64, count: i64) -> RangeResponse {
    RangeResponse {
        header_revision,
        kvs: Vec::new(),
        more: false,
        count,
    }
}

/// Reads the values of candidates, in order.
fn fetch(shared: &Shared, ro: &ReadOptions, cands: Vec<Candidate>) -> Result<Vec<KeyValue>> {
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

fn finish_range(
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

// ---------------------------------------------------------------------------------
// Views: what a txn reads. Committed state for reads; committed + overlay for writers.

trait View {
    /// Live keys in `range` at the newest revision this view sees, with values.
    fn latest_in(&self, range: &KeyRange) -> Result<Vec<KeyValue>>;
    fn range(&self, req: &RangeRequest) -> Result<RangeResponse>;
}

struct CommittedView<'a> {
    shared: &'a Shared,
    state: &'a State,
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
fn compare_path(view: &dyn View, req: &TxnRequest) -> Result<Vec<bool>> {
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
fn for_each_op_on_path(
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
fn check_ranges(
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
fn run_path(
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

// ---------------------------------------------------------------------------------
// Writes.

/// One change of a batch: a put (the new key-value) or a tombstone.
struct Change {
    rev: Revision,
    kv: KeyValue,
    tombstone: bool,
}

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

/// The writer's view: committed state at `base` overlaid with the batch's changes.
struct WriterView<'a> {
    shared: &'a Shared,
    state: &'a State,
    overlay: &'a BTreeMap<Vec<u8>, Option<KeyValue>>,
    /// Revision reported for a read at the newest state.
    newest: i64,
}

impl WriterView<'_> {
    fn latest(&self, key: &[u8]) -> Result<Option<KeyValue>> {
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
        let result = run_path(req, &path, &mut 0, &mut |op| {
            Ok(match op {
                RequestOp::Range(r) => ResponseOp::Range(exec.view(shared, &st).range(r)?),
                RequestOp::Put(p) => ResponseOp::Put(exec.put(shared, &st, p)?),
                RequestOp::DeleteRange(d) => ResponseOp::DeleteRange(exec.delete(shared, &st, d)?),
                RequestOp::Txn(_) => unreachable!("run_path recurses into nested txns itself"),
            })
        });
        let TxnExec { sub, changes, .. } = exec;
        drop(st);
        match result {
            Ok(mut resp) => {
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
        if let Err(e) = shared.db.write_opt(batch, &wo) {
            let why = e.into_string();
            tracing::error!(error = %why, "mvcc write failed; store poisoned");
            *self
                .store
                .poisoned
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(why.clone());
            return Err(Error::Poisoned(why));
        }
        {
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

/// The state of one write txn while [`run_path`] executes it: its revision, the next
/// sub revision, and its changes so far.
struct TxnExec<'o> {
    rev: i64,
    sub: i64,
    changes: Vec<Change>,
    overlay: &'o mut BTreeMap<Vec<u8>, Option<KeyValue>>,
}

impl TxnExec<'_> {
    fn newest(&self) -> i64 {
        if self.sub > 0 { self.rev } else { self.rev - 1 }
    }

    fn view<'v>(&'v self, shared: &'v Shared, st: &'v State) -> WriterView<'v> {
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

    fn put(&mut self, shared: &Shared, st: &State, p: &PutRequest) -> Result<PutResponse> {
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

    fn delete(
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

// ---------------------------------------------------------------------------------
// Compaction.

fn compactor_loop(shared: &Shared, rx: mpsc::Receiver<CompactJob>) {
    while let Ok(job) = rx.recv() {
        let r = compact(shared, job.revision);
        if let Err(e) = &r {
            tracing::error!(revision = job.revision, error = %e, "compaction failed");
        }
        job.wait.finish(r);
    }
}

/// Removes history before `at`: first from the index, chunk by chunk, then the records
/// no reader can ask for any more. Readers were already refused revisions below `at`.
fn compact(shared: &Shared, at: i64) -> Result<()> {
    let _running = shared.compaction.lock().unwrap_or_else(|e| e.into_inner());
    if at <= read_i64_meta(shared, META_COMPACT_FINISHED)?.unwrap_or(0) {
        // An imported snapshot already carries this compaction's result.
        return Ok(());
    }
    let mut keep: HashSet<Revision> = HashSet::new();
    let mut cursor: Option<Vec<u8>> = None;
    loop {
        let mut st = shared.state.write().unwrap_or_else(|e| e.into_inner());
        cursor = st
            .index
            .compact_chunk(at, cursor.as_deref(), COMPACT_CHUNK, &mut keep);
        drop(st);
        if cursor.is_none() {
            break;
        }
    }
    fail::fail_point!(crate::failpoints::COMPACT_BEFORE_DELETE);
    let end = rev_key(Revision::new(at + 1, 0));
    let kv = shared.kv();
    let mut batch = WriteBatch::default();
    let mut removed = 0u64;
    let mut ro = ReadOptions::default();
    ro.set_iterate_upper_bound(end.to_vec());
    for item in shared.db.iterator_cf_opt(kv, ro, IteratorMode::Start) {
        let (k, _) = item?;
        let rev = decode_rev_key(&k)?;
        if keep.contains(&rev) {
            continue;
        }
        batch.delete_cf(kv, &k);
        removed += 1;
        if batch.len() >= COMPACT_CHUNK {
            shared.db.write(std::mem::take(&mut batch))?;
        }
    }
    batch.put_cf(shared.meta_cf(), META_COMPACT_FINISHED, at.to_be_bytes());
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    shared.db.write_opt(batch, &wo)?;
    fail::fail_point!(crate::failpoints::COMPACT_AFTER_FINISH);
    shared
        .db
        .compact_range_cf(kv, None::<&[u8]>, Some(&end[..]));
    tracing::info!(revision = at, removed, "compaction finished");
    Ok(())
}
