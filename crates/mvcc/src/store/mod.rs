//! The store: RocksDB holds every revision, the [`Index`] says which one is visible.
//!
//! Concurrency: any number of readers, one [`Writer`] at a time. A reader holds the
//! index lock only while it resolves keys to revisions, then takes a RocksDB snapshot
//! and fetches values outside the lock. A writer evaluates a batch of transactions
//! against the committed state plus its own overlay, writes the whole batch in one
//! RocksDB write (one fsync), and only then publishes the new revisions to readers.
//! Compaction runs on its own thread, in chunks, so it never holds the lock for long.
//!
//! Here: opening a store, its column families and the state readers and the writer
//! share. Reads are in `reads`, txn evaluation in `txn`, the write batch in `writer`,
//! compaction in `compaction`.

mod compaction;
mod reads;
mod txn;
mod writer;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::thread;

use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, DB, DBCompressionType, IteratorMode, Options};

use crate::auxiliary::{CF_AUX, LEGACY_TABLES, migrate_legacy};
use crate::codec::{decode_record, decode_rev_key};
use crate::error::{Error, Result};
use crate::index::Index;
use crate::types::*;

pub use compaction::CompactWait;
use compaction::{CompactJob, compactor_loop};
pub use writer::{LeaseLookup, NoLeases, Writer};

pub(crate) const CF_KV: &str = "kv";
pub(crate) const CF_META: &str = "meta";
pub(crate) const META_CONSISTENT_INDEX: &[u8] = b"consistent_index";
pub(crate) const META_COMPACT_SCHEDULED: &[u8] = b"compact_scheduled";
pub(crate) const META_COMPACT_FINISHED: &[u8] = b"compact_finished";
/// Keys handed to callers through [`Store::meta`] / [`Writer::put_meta`] live here, apart
/// from the store's own.
pub(crate) const META_USER_PREFIX: &str = "user/";

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
