//! Compaction: the background thread that removes history below a compacted revision,
//! and [`CompactWait`], how a caller waits for it.

use std::collections::HashSet;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};

use rocksdb::{IteratorMode, ReadOptions, WriteBatch, WriteOptions};

use super::{META_COMPACT_FINISHED, Shared, Store, read_i64_meta};
use crate::codec::{decode_rev_key, rev_key};
use crate::error::{Error, Result};
use crate::types::Revision;

/// How many keys compaction handles per hold of the index lock, and how many records
/// it deletes per RocksDB write.
const COMPACT_CHUNK: usize = 10_000;

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

pub(super) struct CompactJob {
    revision: i64,
    wait: CompactWait,
}

impl Store {
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

pub(super) fn compactor_loop(shared: &Shared, rx: mpsc::Receiver<CompactJob>) {
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
