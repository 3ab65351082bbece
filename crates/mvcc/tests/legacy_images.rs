//! Images in the formats before v4, stored as files (see `fixtures/README.md`), still
//! import with every record, their lease, alarm and state frames in the aux tables of
//! the same names.

use std::io::Read;
use std::sync::Arc;

use concord_mvcc::*;

const V3: &[u8] = include_bytes!("fixtures/image-v3.bin");
const V2: &[u8] = include_bytes!("fixtures/image-v2.bin");
const V1: &[u8] = include_bytes!("fixtures/image-v1.bin");

/// `etcd`'s HashKV of the fixture store at its current revision, as the code that
/// wrote the v3 image computed it.
const HASH_KV: u32 = 4_020_531_798;
/// `inspect_image(V3).hash` as the code that wrote the image computed it.
const V3_IMAGE_HASH: u32 = 3_730_037_613;

fn lease_record(ttl: i64, remaining_ms: i64) -> Vec<u8> {
    [ttl.to_be_bytes(), remaining_ms.to_be_bytes()].concat()
}

fn leases() -> Vec<(Vec<u8>, Vec<u8>)> {
    vec![
        (7i64.to_be_bytes().to_vec(), lease_record(60, -1)),
        (9i64.to_be_bytes().to_vec(), lease_record(30, 12_345)),
    ]
}

fn alarms() -> Vec<(Vec<u8>, Vec<u8>)> {
    let key = [0x1111u64.to_be_bytes().as_slice(), &1i32.to_be_bytes()].concat();
    vec![(key, Vec::new())]
}

fn get(s: &Store, k: &str, revision: i64) -> Result<Option<KeyValue>> {
    Ok(s.range(&RangeRequest {
        range: KeyRange::new(k, ""),
        revision,
        ..Default::default()
    })?
    .kvs
    .into_iter()
    .next())
}

fn import(dir: &std::path::Path, image: &[u8]) -> Arc<Store> {
    let s = Arc::new(Store::open(dir, StoreOptions { sync_writes: false }).unwrap());
    // Whatever was there before goes.
    let mut w = s.writer().unwrap();
    w.put(
        &PutRequest {
            key: "stale".into(),
            value: "x".into(),
            ..Default::default()
        },
        &NoLeases,
    )
    .unwrap();
    w.put_aux("lease", &1i64.to_be_bytes(), b"stale");
    w.put_aux("other", b"k", b"stale");
    w.commit(None).unwrap();
    s.import(&mut &image[..], 30).unwrap();
    s
}

/// The revision history every fixture holds: a=1 (rev 2, compacted away), b=two with
/// lease 7 (3), a=3 (4), c=x with lease 9 (5), c deleted (6), compaction at 4, d=after
/// (7).
fn check_history(s: &Store) {
    assert_eq!(s.current_revision(), 7);
    assert_eq!(s.compacted_revision(), 4);
    assert_eq!(s.consistent_index().unwrap(), 30);
    assert_eq!(s.hash_kv(0).unwrap().hash, HASH_KV);
    let a = get(s, "a", 0).unwrap().unwrap();
    assert_eq!(
        (
            a.value.as_slice(),
            a.create_revision,
            a.mod_revision,
            a.version
        ),
        (&b"3"[..], 2, 4, 2)
    );
    let b = get(s, "b", 0).unwrap().unwrap();
    assert_eq!(
        (b.value.as_slice(), b.mod_revision, b.lease),
        (&b"two"[..], 3, 7)
    );
    assert_eq!(get(s, "c", 0).unwrap(), None);
    let c = get(s, "c", 5).unwrap().unwrap();
    assert_eq!((c.value.as_slice(), c.lease), (&b"x"[..], 9));
    assert_eq!(get(s, "d", 0).unwrap().unwrap().value, b"after");
    assert_eq!(get(s, "stale", 0).unwrap(), None);
    assert!(matches!(get(s, "a", 3), Err(Error::Compacted)));
    assert_eq!(s.lease_keys(7), vec![b"b".to_vec()]);
    assert!(s.lease_keys(9).is_empty());
    let HistoryPage::Events(ev) = s.history(5, 7, 100, 1 << 20).unwrap() else {
        panic!("history after the compaction is kept");
    };
    let ev: Vec<_> = ev
        .iter()
        .map(|e| (e.kv.key.as_slice(), e.kv.mod_revision, e.tombstone))
        .collect();
    assert_eq!(
        ev,
        [(&b"c"[..], 5, false), (b"c", 6, true), (b"d", 7, false)]
    );
    // The exporter's own metadata never travels.
    assert_eq!(s.meta("member_id").unwrap(), None);
    assert_eq!(s.aux_scan("other").unwrap(), Vec::new());
}

fn tables(pairs: &[(&str, u64)]) -> std::collections::BTreeMap<String, u64> {
    pairs.iter().map(|&(t, n)| (t.to_string(), n)).collect()
}

/// Exporting the imported store gives a v4 image with the same records.
fn reexport(dir: &std::path::Path, s: &Arc<Store>, old: &ImageInfo) {
    let mut image = Vec::new();
    s.export().unwrap().read_to_end(&mut image).unwrap();
    let info = inspect_image(&mut &image[..]).unwrap();
    assert_eq!(info.format, 4);
    assert_eq!(
        (
            info.revision,
            info.compacted,
            info.records,
            info.aux,
            &info.tables
        ),
        (
            old.revision,
            old.compacted,
            old.records,
            old.aux,
            &old.tables
        )
    );
    let t = import(dir, &image);
    check_history(&t);
    assert_eq!(t.hash().unwrap(), s.hash().unwrap());
    for table in ["lease", "alarm", "state"] {
        assert_eq!(t.aux_scan(table).unwrap(), s.aux_scan(table).unwrap());
    }
}

#[test]
fn a_v3_image_imports_every_record() {
    let info = inspect_image(&mut &V3[..]).unwrap();
    assert_eq!(
        (info.format, info.revision, info.compacted, info.records),
        (3, 7, 4, 5)
    );
    assert_eq!(info.aux, 4);
    assert_eq!(
        info.tables,
        tables(&[("alarm", 1), ("lease", 2), ("state", 1)])
    );
    assert_eq!(info.hash, V3_IMAGE_HASH);
    assert_eq!(info.size, V3.len() as u64);

    let dir = tempfile::tempdir().unwrap();
    let s = import(&dir.path().join("a"), V3);
    check_history(&s);
    assert_eq!(s.aux_scan("lease").unwrap(), leases());
    assert_eq!(s.aux_scan("alarm").unwrap(), alarms());
    let state = s.aux_scan("state").unwrap();
    assert_eq!(state.len(), 1);
    assert_eq!(state[0].0, b"members");
    assert_eq!(
        s.aux("state", b"members").unwrap().as_ref(),
        Some(&state[0].1)
    );
    reexport(&dir.path().join("b"), &s, &info);

    // The records survive a reopen of the importing store.
    let members = state[0].1.clone();
    drop(s);
    let s = Store::open(dir.path().join("a"), StoreOptions::default()).unwrap();
    assert_eq!(s.aux_scan("lease").unwrap(), leases());
    assert_eq!(s.aux("state", b"members").unwrap(), Some(members));
}

#[test]
fn a_v2_image_imports_leases_and_state() {
    let info = inspect_image(&mut &V2[..]).unwrap();
    assert_eq!((info.format, info.records, info.aux), (2, 5, 3));
    // v2's tag 3 is a state value, not an alarm (v2 images never held alarms).
    assert_eq!(info.tables, tables(&[("lease", 2), ("state", 1)]));
    let dir = tempfile::tempdir().unwrap();
    let s = import(&dir.path().join("a"), V2);
    check_history(&s);
    assert_eq!(s.aux_scan("lease").unwrap(), leases());
    assert_eq!(s.aux_scan("alarm").unwrap(), Vec::new());
    let v3 = import(&dir.path().join("v3"), V3);
    assert_eq!(
        s.aux("state", b"members").unwrap(),
        v3.aux("state", b"members").unwrap()
    );
    reexport(&dir.path().join("b"), &s, &info);
}

#[test]
fn a_v1_image_imports_the_revision_history() {
    let info = inspect_image(&mut &V1[..]).unwrap();
    assert_eq!((info.format, info.records, info.aux), (1, 5, 0));
    assert!(info.tables.is_empty());
    let dir = tempfile::tempdir().unwrap();
    let s = import(&dir.path().join("a"), V1);
    check_history(&s);
    for table in ["lease", "alarm", "state"] {
        assert_eq!(s.aux_scan(table).unwrap(), Vec::new());
    }
    reexport(&dir.path().join("b"), &s, &info);
}

/// The header of an image of `format` at revision 7, compacted to 4.
fn header(format: u8) -> Vec<u8> {
    let mut out = format!("concord-mvcc-v{format}\n").into_bytes();
    for v in [7i64, 4, 4] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out
}

fn frame(out: &mut Vec<u8>, tag: u8, k: &[u8], v: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&(k.len() as u32).to_be_bytes());
    out.extend_from_slice(k);
    out.extend_from_slice(&(v.len() as u32).to_be_bytes());
    out.extend_from_slice(v);
}

fn end(out: &mut Vec<u8>, count: u64) {
    out.push(0);
    out.extend_from_slice(&count.to_be_bytes());
}

#[test]
fn frames_outside_their_format_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), StoreOptions { sync_writes: false }).unwrap();
    let refused = |image: &[u8]| {
        assert!(matches!(
            inspect_image(&mut &image[..]),
            Err(Error::Corrupt(_))
        ));
        assert!(matches!(
            s.import(&mut &image[..], 1),
            Err(Error::Corrupt(_))
        ));
    };
    // v4 has no per-table frames, v1 no lease frames, v2 no tag 4, v3 no aux frames.
    for (format, tag) in [(4, 2), (4, 3), (4, 4), (1, 2), (2, 4), (3, 5), (4, 6)] {
        let mut image = header(format);
        frame(&mut image, tag, &7i64.to_be_bytes(), b"v");
        end(&mut image, 1);
        refused(&image);
    }
    // A v4 aux record must name its table.
    for key in [&b"no-separator"[..], b"/empty-table", b"\xff\xfe/not-utf8"] {
        let mut image = header(4);
        frame(&mut image, 5, key, b"v");
        end(&mut image, 1);
        refused(&image);
    }
    // A well-formed v4 image with one aux record of a table nobody declared.
    let mut image = header(4);
    frame(&mut image, 5, b"anything/k", b"v");
    end(&mut image, 1);
    let info = inspect_image(&mut &image[..]).unwrap();
    assert_eq!(info.tables, tables(&[("anything", 1)]));
    s.import(&mut &image[..], 1).unwrap();
    assert_eq!(s.aux("anything", b"k").unwrap(), Some(b"v".to_vec()));
}
