//! Store semantics through the public API, on a real RocksDB in a temp dir.

use concord_mvcc::*;

fn open(dir: &std::path::Path) -> Store {
    Store::open(dir, StoreOptions { sync_writes: false }).unwrap()
}

fn put(s: &Store, k: &str, v: &str) -> i64 {
    let mut w = s.writer().unwrap();
    let r = w
        .put(
            &PutRequest {
                key: k.into(),
                value: v.into(),
                ..Default::default()
            },
            &NoLeases,
        )
        .unwrap();
    w.commit(None).unwrap();
    r.header_revision
}

fn get(s: &Store, k: &str, rev: i64) -> Result<Option<KeyValue>> {
    let r = s.range(&RangeRequest {
        range: KeyRange::new(k, ""),
        revision: rev,
        ..Default::default()
    })?;
    Ok(r.kvs.into_iter().next())
}

fn del(s: &Store, k: &str, end: &str) -> DeleteRangeResponse {
    let mut w = s.writer().unwrap();
    let r = w
        .delete_range(&DeleteRangeRequest {
            range: KeyRange::new(k, end),
            prev_kv: true,
        })
        .unwrap();
    w.commit(None).unwrap();
    r
}

#[test]
fn revisions_versions_and_history() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    assert_eq!(s.current_revision(), 1);
    assert_eq!(put(&s, "a", "1"), 2);
    assert_eq!(put(&s, "a", "2"), 3);
    let kv = get(&s, "a", 0).unwrap().unwrap();
    assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (2, 3, 2));
    assert_eq!(get(&s, "a", 2).unwrap().unwrap().value, b"1");
    assert_eq!(get(&s, "a", 9), Err(Error::FutureRevision));
    let d = del(&s, "a", "");
    assert_eq!((d.deleted, d.header_revision), (1, 4));
    assert_eq!(get(&s, "a", 0).unwrap(), None);
    assert_eq!(
        del(&s, "a", "").header_revision,
        4,
        "deleting nothing makes no revision"
    );
    assert_eq!(put(&s, "a", "3"), 5);
    let kv = get(&s, "a", 0).unwrap().unwrap();
    assert_eq!((kv.create_revision, kv.version), (5, 1));
}

#[test]
fn batch_of_txns_commits_once_and_sees_itself() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let mut w = s.writer().unwrap();
    let p = |k: &str, v: &str| PutRequest {
        key: k.into(),
        value: v.into(),
        prev_kv: true,
        ..Default::default()
    };
    assert_eq!(w.put(&p("k", "1"), &NoLeases).unwrap().header_revision, 2);
    let r = w.put(&p("k", "2"), &NoLeases).unwrap();
    assert_eq!(r.header_revision, 3);
    assert_eq!(
        r.prev_kv.unwrap().value,
        b"1",
        "a later txn sees an earlier one in the batch"
    );
    // Not visible to readers before commit.
    assert_eq!(s.current_revision(), 1);
    assert_eq!(get(&s, "k", 0).unwrap(), None);
    // A failed txn in the middle leaves no trace.
    let bad = TxnRequest {
        compare: vec![],
        success: vec![
            RequestOp::Put(p("x", "1")),
            RequestOp::Put(PutRequest {
                key: "y".into(),
                lease: 5,
                ..Default::default()
            }),
        ],
        failure: vec![],
    };
    assert_eq!(w.txn(&bad, &NoLeases), Err(Error::LeaseNotFound));
    // A historical read into the batch flushes it first and still answers correctly.
    let hist = TxnRequest {
        compare: vec![],
        success: vec![
            RequestOp::Put(p("z", "1")),
            RequestOp::Range(RangeRequest {
                range: KeyRange::new("k", ""),
                revision: 2,
                ..Default::default()
            }),
        ],
        failure: vec![],
    };
    let r = w.txn(&hist, &NoLeases).unwrap();
    let ResponseOp::Range(rr) = &r.responses[1] else {
        panic!()
    };
    assert_eq!(rr.kvs[0].value, b"1");
    assert_eq!(w.commit(Some(7)).unwrap(), 4);
    assert_eq!(s.current_revision(), 4);
    assert_eq!(get(&s, "x", 0).unwrap(), None);
    assert_eq!(get(&s, "k", 0).unwrap().unwrap().version, 2);
    assert_eq!(s.consistent_index().unwrap(), 7);
}

#[test]
fn restart_rebuilds_the_index_and_resumes_compaction() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(dir.path());
        for i in 0..20 {
            put(&s, &format!("k{}", i % 4), &format!("v{i}"));
        }
        del(&s, "k0", "");
        put(&s, "k0", "again");
        let mut w = s.writer().unwrap();
        w.put_meta("owner", b"me");
        let wait = w.compact(12).unwrap();
        w.commit(Some(3)).unwrap();
        wait.wait().unwrap();
        assert_eq!(s.compacted_revision(), 12);
    }
    let s = open(dir.path());
    assert_eq!(s.current_revision(), 23);
    assert_eq!(s.compacted_revision(), 12);
    assert_eq!(s.meta("owner").unwrap().unwrap(), b"me");
    assert_eq!(s.consistent_index().unwrap(), 3);
    assert_eq!(get(&s, "k1", 11), Err(Error::Compacted));
    // Versions and create revisions survive compaction and restart.
    let kv = get(&s, "k1", 0).unwrap().unwrap();
    assert_eq!(
        (kv.value.as_slice(), kv.version, kv.create_revision),
        (&b"v17"[..], 5, 3)
    );
    let kv = get(&s, "k1", 12).unwrap().unwrap();
    assert_eq!((kv.value.as_slice(), kv.version), (&b"v9"[..], 3));
    let kv = get(&s, "k0", 0).unwrap().unwrap();
    assert_eq!((kv.version, kv.create_revision), (1, 23));
    let all = s
        .range(&RangeRequest {
            range: KeyRange::new("k", vec![0]),
            count_only: true,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(all.count, 4);
}

#[test]
fn compaction_to_the_latest_tombstone_keeps_the_revision() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(dir.path());
        put(&s, "a", "1");
        del(&s, "a", "");
        let mut w = s.writer().unwrap();
        let wait = w.compact(3).unwrap();
        w.commit(None).unwrap();
        wait.wait().unwrap();
    }
    let s = open(dir.path());
    assert_eq!(
        s.current_revision(),
        3,
        "every record is gone but the revision stays"
    );
    assert_eq!(put(&s, "b", "1"), 4);
}

#[test]
fn limits_counts_and_filters_use_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let mut w = s.writer().unwrap();
    for i in 0..1000 {
        w.put(
            &PutRequest {
                key: format!("k{i:04}").into_bytes(),
                value: vec![b'x'; 10],
                ..Default::default()
            },
            &NoLeases,
        )
        .unwrap();
    }
    w.commit(None).unwrap();
    let r = s
        .range(&RangeRequest {
            range: KeyRange::new("k", vec![0]),
            limit: 3,
            sort_order: SortOrder::Descend,
            ..Default::default()
        })
        .unwrap();
    let keys: Vec<_> = r
        .kvs
        .iter()
        .map(|k| String::from_utf8_lossy(&k.key).into_owned())
        .collect();
    assert_eq!(keys, ["k0999", "k0998", "k0997"]);
    assert_eq!((r.more, r.count), (true, 1000));
    let r = s
        .range(&RangeRequest {
            range: KeyRange::new("k0100", "k0200"),
            min_mod_revision: 150,
            max_mod_revision: 160,
            ..Default::default()
        })
        .unwrap();
    assert_eq!((r.kvs.len(), r.count), (11, 100));
}

#[test]
fn history_pages_end_at_revision_boundaries_and_report_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    put(&s, "a", "1"); // 2
    put(&s, "b", "1"); // 3
    // One txn, three changes at revision 4.
    let mut w = s.writer().unwrap();
    w.txn(
        &TxnRequest {
            compare: Vec::new(),
            success: vec![
                RequestOp::Put(PutRequest {
                    key: "a".into(),
                    value: "2".into(),
                    ..Default::default()
                }),
                RequestOp::Put(PutRequest {
                    key: "c".into(),
                    value: "1".into(),
                    ..Default::default()
                }),
                RequestOp::DeleteRange(DeleteRangeRequest {
                    range: KeyRange::new("b", ""),
                    prev_kv: false,
                }),
            ],
            failure: Vec::new(),
        },
        &NoLeases,
    )
    .unwrap();
    let (rev, changes) = w.commit_changes(None).unwrap();
    assert_eq!(rev, 4);
    assert_eq!(changes.len(), 3);
    assert!(changes.iter().all(|c| c.kv.mod_revision == 4));
    put(&s, "a", "3"); // 5

    let page = |from, to, n| match s.history(from, to, n, usize::MAX).unwrap() {
        HistoryPage::Events(e) => e
            .into_iter()
            .map(|e| {
                (
                    String::from_utf8(e.kv.key).unwrap(),
                    e.kv.mod_revision,
                    e.tombstone,
                )
            })
            .collect::<Vec<_>>(),
        HistoryPage::Compacted(c) => panic!("compacted at {c}"),
    };
    assert_eq!(
        page(2, 5, 100),
        vec![
            ("a".into(), 2, false),
            ("b".into(), 3, false),
            ("a".into(), 4, false),
            ("c".into(), 4, false),
            ("b".into(), 4, true),
            ("a".into(), 5, false),
        ]
    );
    // A limit reached inside revision 4 still returns all of revision 4.
    assert_eq!(page(3, 5, 2).len(), 4);
    assert_eq!(page(5, 5, 1), vec![("a".into(), 5, false)]);
    assert_eq!(page(6, 5, 10), vec![]);

    let mut w = s.writer().unwrap();
    let wait = w.compact(4).unwrap();
    w.commit(None).unwrap();
    wait.wait().unwrap();
    assert_eq!(
        s.history(3, 5, 10, usize::MAX).unwrap(),
        HistoryPage::Compacted(4)
    );
    assert_eq!(
        page(4, 5, 10).len(),
        3,
        "a, c at 4 (b's tombstone is compacted away) and a at 5"
    );
}

/// Every lease id is granted: the store only tracks attachment.
struct AllLeases;

impl LeaseLookup for AllLeases {
    fn lease_exists(&self, _id: i64) -> bool {
        true
    }
}

fn put_leased(w: &mut Writer<'_>, k: &str, lease: i64) {
    w.put(
        &PutRequest {
            key: k.into(),
            value: b"v".to_vec(),
            lease,
            ..Default::default()
        },
        &AllLeases,
    )
    .unwrap();
}

#[test]
fn lease_records_and_attached_keys_survive_reopen_and_images() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(&dir.path().join("a"));
    let mut w = s.writer().unwrap();
    w.put_aux("lease", &7i64.to_be_bytes(), b"seven");
    w.put_aux("lease", &9i64.to_be_bytes(), b"nine");
    put_leased(&mut w, "b", 7);
    put_leased(&mut w, "a", 7);
    put_leased(&mut w, "c", 9);
    put_leased(&mut w, "d", 7);
    // Re-put without a lease detaches; a delete detaches.
    put_leased(&mut w, "d", 0);
    w.commit(Some(3)).unwrap();
    del(&s, "c", "");
    assert_eq!(s.lease_keys(7), vec![b"a".to_vec(), b"b".to_vec()]);
    assert!(s.lease_keys(9).is_empty());
    assert_eq!(
        s.aux_scan("lease").unwrap(),
        vec![
            (7i64.to_be_bytes().to_vec(), b"seven".to_vec()),
            (9i64.to_be_bytes().to_vec(), b"nine".to_vec())
        ]
    );
    drop(s);

    let s = std::sync::Arc::new(open(&dir.path().join("a")));
    assert_eq!(s.lease_keys(7), vec![b"a".to_vec(), b"b".to_vec()]);
    assert_eq!(s.aux_scan("lease").unwrap().len(), 2);
    let mut image = Vec::new();
    std::io::Read::read_to_end(&mut s.export().unwrap(), &mut image).unwrap();

    // Revoking: the batch's own new attachment is included, all in one revision.
    let before = s.current_revision();
    let mut w = s.writer().unwrap();
    put_leased(&mut w, "e", 7);
    let rev = w.delete_leased_keys(7).unwrap();
    w.delete_aux("lease", &7i64.to_be_bytes());
    w.commit(Some(4)).unwrap();
    assert_eq!(rev, before + 2);
    assert_eq!(s.current_revision(), before + 2);
    for k in ["a", "b", "e"] {
        assert!(get(&s, k, 0).unwrap().is_none(), "{k} survived the revoke");
    }
    let kvs = s
        .range(&RangeRequest {
            range: KeyRange::new("a", "z"),
            revision: before + 1,
            ..Default::default()
        })
        .unwrap()
        .kvs;
    assert_eq!(
        kvs.len(),
        4,
        "a, b, d and e all live just before the revoke"
    );
    assert!(s.lease_keys(7).is_empty());
    assert_eq!(
        s.aux_scan("lease").unwrap(),
        vec![(9i64.to_be_bytes().to_vec(), b"nine".to_vec())]
    );
    // An empty revoke makes no revision.
    let mut w = s.writer().unwrap();
    assert_eq!(w.delete_leased_keys(9).unwrap(), before + 2);
    w.commit(None).unwrap();
    assert_eq!(s.current_revision(), before + 2);

    // The image from before the revoke brings both leases and the attachments back.
    let t = open(&dir.path().join("b"));
    t.import(&mut &image[..], 10).unwrap();
    assert_eq!(t.lease_keys(7), vec![b"a".to_vec(), b"b".to_vec()]);
    assert_eq!(t.aux_scan("lease").unwrap().len(), 2);
}
