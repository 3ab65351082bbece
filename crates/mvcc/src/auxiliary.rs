//! The auxiliary keyspace: the caller's own replicated tables (a server keeps its
//! leases, alarms, member list and, later, auth there), next to the revision history.
//!
//! One column family, `aux`, holds every table. A record's key is the table name, a
//! `/`, then the caller's key: `lease/<8 bytes>` is key `<8 bytes>` of table `lease`.
//! Table names are non-empty UTF-8 without `/`, so the first `/` always ends the table
//! name, no table's keys are a prefix range of another's, and (UTF-8 has no `0xff`
//! byte) every aux key sorts below `[0xff]`. The store gives the records no meaning:
//! they are written in the same RocksDB batch as the data ([`Writer::put_aux`]), read
//! back by key or by table ([`Store::aux`], [`Store::aux_scan`]), hashed with the data
//! ([`Store::hash`]) and carried whole by images, so a new table needs neither a new
//! column family nor a new image format.
//!
//! The one exception to "no table names here" is the past: images v1 to v3 and data
//! directories written before this keyspace existed kept leases, alarms and replicated
//! state in column families (and image frames) of their own, named `lease`, `alarm` and
//! `state`. Those records are mapped into the tables of the same names
//! ([`LEGACY_TABLES`]), keys and values unchanged; a caller that stored them then reads
//! them from those tables now.
//!
//! [`Writer::put_aux`]: crate::Writer::put_aux

use rocksdb::{ColumnFamily, DB, IteratorMode, ReadOptions, WriteBatch, WriteOptions};

use crate::error::{Error, Result};
use crate::store::Store;

pub(crate) const CF_AUX: &str = "aux";
/// Ends the table name in an aux key.
const SEP: u8 = b'/';
/// Above every aux key (see the module docs): the end of a range that clears them all.
pub(crate) const AUX_END: [u8; 1] = [0xff];

/// The tables that lease, alarm and replicated state records written before the
/// auxiliary keyspace existed are found in: the old column families of these names
/// (moved on open) and the lease, alarm and state frames of images v1 to v3.
pub const LEGACY_TABLES: [&str; 3] = [LEGACY_LEASE, LEGACY_ALARM, LEGACY_STATE];
pub(crate) const LEGACY_LEASE: &str = "lease";
pub(crate) const LEGACY_ALARM: &str = "alarm";
pub(crate) const LEGACY_STATE: &str = "state";

fn check_table(table: &str) {
    assert!(
        !table.is_empty() && !table.as_bytes().contains(&SEP),
        "aux table name {table:?} is empty or contains '/'"
    );
}

/// `<table>/`: where the table's keys start.
fn table_prefix(table: &str) -> Vec<u8> {
    check_table(table);
    let mut k = Vec::with_capacity(table.len() + 1);
    k.extend_from_slice(table.as_bytes());
    k.push(SEP);
    k
}

/// The stored key of `key` in `table`.
///
/// # Panics
///
/// If `table` is empty or contains `/`.
pub(crate) fn aux_key(table: &str, key: &[u8]) -> Vec<u8> {
    let mut k = table_prefix(table);
    k.extend_from_slice(key);
    k
}

/// Splits a stored aux key into its table and the caller's key; `None` if it is not
/// one (no `/`, an empty or non-UTF-8 table name).
pub(crate) fn split_aux_key(k: &[u8]) -> Option<(&str, &[u8])> {
    let at = k.iter().position(|&b| b == SEP)?;
    let table = std::str::from_utf8(&k[..at]).ok()?;
    (!table.is_empty()).then(|| (table, &k[at + 1..]))
}

impl Store {
    /// Reads `key` of aux table `table` ([`crate::Writer::put_aux`]).
    ///
    /// # Panics
    ///
    /// If `table` is empty or contains `/`.
    pub fn aux(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let shared = &*self.shared;
        Ok(shared.db.get_cf(shared.aux_cf(), aux_key(table, key))?)
    }

    /// Every record of aux table `table`, in key order: `(key, value)`.
    ///
    /// # Panics
    ///
    /// If `table` is empty or contains `/`.
    pub fn aux_scan(&self, table: &str) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let shared = &*self.shared;
        let prefix = table_prefix(table);
        let mut end = prefix.clone();
        // `/` + 1: past every key of the table, before any other table's.
        *end.last_mut().expect("the separator") += 1;
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(end);
        let mut out = Vec::new();
        for item in shared.db.iterator_cf_opt(
            shared.aux_cf(),
            ro,
            IteratorMode::From(&prefix, rocksdb::Direction::Forward),
        ) {
            let (k, v) = item?;
            out.push((k[prefix.len()..].to_vec(), v.to_vec()));
        }
        Ok(out)
    }
}

/// Moves the rows of the old per-table column families (`present`: those of
/// [`LEGACY_TABLES`] the data directory has) into the aux keyspace, in one synced
/// batch that also empties them, then drops them. A crash before the batch changes
/// nothing; one after it leaves empty families that the next open drops.
pub(crate) fn migrate_legacy(db: &mut DB, present: &[&str]) -> Result<()> {
    let mut batch = WriteBatch::default();
    let mut moved = 0u64;
    {
        let aux = db.cf_handle(CF_AUX).expect("aux column family exists");
        for &name in present {
            let cf: &ColumnFamily = db
                .cf_handle(name)
                .expect("legacy column families present are opened");
            for item in db.iterator_cf(cf, IteratorMode::Start) {
                let (k, v) = item?;
                batch.put_cf(aux, aux_key(name, &k), v);
                batch.delete_cf(cf, k);
                moved += 1;
            }
        }
    }
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    db.write_opt(batch, &wo)?;
    for &name in present {
        db.drop_cf(name)?;
    }
    tracing::info!(
        records = moved,
        families = present.len(),
        "moved lease, alarm and state records into the aux keyspace"
    );
    Ok(())
}

/// Checks a stored aux key read from an image.
pub(crate) fn check_aux_key(k: &[u8]) -> Result<()> {
    split_aux_key(k)
        .map(|_| ())
        .ok_or_else(|| Error::Corrupt("store image: aux record key without a table".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_back_and_tables_do_not_overlap() {
        assert_eq!(aux_key("lease", b"\0\x01"), b"lease/\0\x01");
        assert_eq!(split_aux_key(b"lease/\0/x"), Some(("lease", &b"\0/x"[..])));
        assert_eq!(split_aux_key(b"lease/"), Some(("lease", &b""[..])));
        assert_eq!(split_aux_key(b"/k"), None);
        assert_eq!(split_aux_key(b"nosep"), None);
        assert_eq!(split_aux_key(b"\xff/k"), None);
        // `a/...` and `a0/...` (`0` is `/` + 1) stay apart.
        assert!(aux_key("a", &[0xff; 4]) < aux_key("a0", b""));
        assert!(aux_key("\u{10ffff}", &[0xff; 4]).as_slice() < &AUX_END[..]);
    }

    /// A data directory as the code before the aux keyspace left it: `kv` and `meta`,
    /// and of the per-table families those in `legacy`, each holding `rows`.
    fn legacy_dir(path: &std::path::Path, legacy: &[&str], rows: &[(&[u8], &[u8])]) {
        use crate::codec::{encode_record, rev_key};
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let names = [crate::store::CF_KV, crate::store::CF_META]
            .into_iter()
            .chain(legacy.iter().copied());
        let db = DB::open_cf(&opts, path, names).unwrap();
        let kv = crate::types::KeyValue {
            key: b"a".to_vec(),
            create_revision: 2,
            mod_revision: 2,
            version: 1,
            value: b"1".to_vec(),
            lease: 7,
        };
        db.put_cf(
            db.cf_handle(crate::store::CF_KV).unwrap(),
            rev_key(crate::types::Revision::new(2, 0)),
            encode_record(false, &kv),
        )
        .unwrap();
        for &name in legacy {
            for &(k, v) in rows {
                db.put_cf(db.cf_handle(name).unwrap(), k, v).unwrap();
            }
        }
    }

    fn families(path: &std::path::Path) -> Vec<String> {
        let mut f = DB::list_cf(&rocksdb::Options::default(), path).unwrap();
        f.sort();
        f
    }

    fn open(path: &std::path::Path) -> Store {
        Store::open(path, crate::StoreOptions { sync_writes: false }).unwrap()
    }

    #[test]
    fn opening_an_old_data_directory_moves_its_tables_into_aux() {
        let dir = tempfile::tempdir().unwrap();
        let rows: &[(&[u8], &[u8])] = &[(b"\0\0\0\0\0\0\0\x07", b"seven"), (b"k", b"")];
        legacy_dir(dir.path(), &LEGACY_TABLES, rows);
        let want: Vec<(Vec<u8>, Vec<u8>)> =
            rows.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
        for _ in 0..2 {
            // Moved once; a second open finds nothing to move and keeps the records.
            let s = open(dir.path());
            for t in LEGACY_TABLES {
                assert_eq!(s.aux_scan(t).unwrap(), want, "{t}");
            }
            assert_eq!(s.current_revision(), 2);
            assert_eq!(s.lease_keys(7), vec![b"a".to_vec()]);
            drop(s);
            assert_eq!(families(dir.path()), ["aux", "default", "kv", "meta"]);
        }
    }

    #[test]
    fn some_or_emptied_legacy_families_are_handled_too() {
        // Only `lease` (a directory from before alarms and state existed).
        let dir = tempfile::tempdir().unwrap();
        legacy_dir(dir.path(), &[LEGACY_LEASE], &[(b"id", b"v")]);
        let s = open(dir.path());
        assert_eq!(
            s.aux_scan(LEGACY_LEASE).unwrap(),
            vec![(b"id".to_vec(), b"v".to_vec())]
        );
        assert_eq!(s.aux_scan(LEGACY_STATE).unwrap(), Vec::new());
        drop(s);
        assert_eq!(families(dir.path()), ["aux", "default", "kv", "meta"]);

        // A crash after the moving batch, before the drops: empty families next to
        // the moved records. Nothing is lost, and they go.
        let dir = tempfile::tempdir().unwrap();
        legacy_dir(dir.path(), &[], &[]);
        let s = open(dir.path());
        let mut w = s.writer().unwrap();
        w.put_aux(LEGACY_ALARM, b"k", b"moved");
        w.commit(None).unwrap();
        drop(s);
        {
            let opts = rocksdb::Options::default();
            let mut db = DB::open_cf(&opts, dir.path(), ["kv", "meta", "aux"]).unwrap();
            db.create_cf(LEGACY_ALARM, &opts).unwrap();
            db.create_cf(LEGACY_STATE, &opts).unwrap();
        }
        let s = open(dir.path());
        assert_eq!(
            s.aux_scan(LEGACY_ALARM).unwrap(),
            vec![(b"k".to_vec(), b"moved".to_vec())]
        );
        drop(s);
        assert_eq!(families(dir.path()), ["aux", "default", "kv", "meta"]);
    }

    #[test]
    #[should_panic(expected = "contains '/'")]
    fn a_table_name_with_the_separator_is_refused() {
        aux_key("a/b", b"k");
    }
}
