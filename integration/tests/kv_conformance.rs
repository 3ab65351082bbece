//! The KV API against a real `concord` process, through the `etcd-client` crate.

use concord_integration::Concord;
use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, SortOrder, SortTarget, Txn,
    TxnOp, TxnOpResponse,
};
use tonic::Code;

fn status(e: etcd_client::Error) -> (Code, String) {
    match e {
        etcd_client::Error::GRpcStatus(s) => (s.code(), s.message().to_string()),
        other => panic!("expected a gRPC status, got {other:?}"),
    }
}

fn keys(r: &etcd_client::GetResponse) -> Vec<String> {
    r.kvs()
        .iter()
        .map(|kv| kv.key_str().unwrap().to_string())
        .collect()
}

async fn put(c: &mut Client, k: &str, v: &str) -> i64 {
    c.put(k, v, None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision()
}

#[tokio::test]
async fn range_options() {
    let s = Concord::start().await.unwrap();
    let mut c = s.client().await.unwrap();
    // Revision 1 is the empty store; each put below makes the next one.
    assert_eq!(put(&mut c, "a", "5").await, 2);
    put(&mut c, "b", "4").await; // 3
    put(&mut c, "c", "3").await; // 4
    put(&mut c, "d", "2").await; // 5
    put(&mut c, "e", "1").await; // 6
    put(&mut c, "b", "44").await; // 7
    put(&mut c, "c", "33").await; // 8
    put(&mut c, "c", "333").await; // 9

    // Single key, with every field.
    let r = c.get("b", None).await.unwrap();
    let kv = &r.kvs()[0];
    assert_eq!(
        (
            kv.value(),
            kv.create_revision(),
            kv.mod_revision(),
            kv.version()
        ),
        (&b"44"[..], 3, 7, 2)
    );
    assert_eq!(
        (r.count(), r.more(), r.header().unwrap().revision()),
        (1, false, 9)
    );
    assert!(c.get("zz", None).await.unwrap().kvs().is_empty());

    // [key, range_end), from-key ("\0"), prefix, all keys.
    let r = c
        .get("b", Some(GetOptions::new().with_range("d")))
        .await
        .unwrap();
    assert_eq!(keys(&r), ["b", "c"]);
    let r = c
        .get("c", Some(GetOptions::new().with_from_key()))
        .await
        .unwrap();
    assert_eq!(keys(&r), ["c", "d", "e"]);
    put(&mut c, "p/1", "x").await; // 10
    put(&mut c, "p/2", "y").await; // 11
    put(&mut c, "q", "z").await; // 12
    let r = c
        .get("p/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(keys(&r), ["p/1", "p/2"]);
    let r = c
        .get("d", Some(GetOptions::new().with_range("b")))
        .await
        .unwrap();
    assert_eq!((r.kvs().len(), r.count()), (0, 0), "an empty interval");

    // limit + more + count (count is every match, not the page).
    let r = c
        .get("", Some(GetOptions::new().with_all_keys().with_limit(2)))
        .await
        .unwrap();
    assert_eq!(
        (keys(&r), r.more(), r.count()),
        (vec!["a".to_string(), "b".into()], true, 8)
    );
    let r = c
        .get("a", Some(GetOptions::new().with_range("c").with_limit(2)))
        .await
        .unwrap();
    assert_eq!((r.kvs().len(), r.more(), r.count()), (2, false, 2));

    // Historical reads: older values, versions; keys that did not exist yet.
    let r = c
        .get("c", Some(GetOptions::new().with_revision(8)))
        .await
        .unwrap();
    assert_eq!((r.kvs()[0].value(), r.kvs()[0].version()), (&b"33"[..], 2));
    assert_eq!(
        r.header().unwrap().revision(),
        12,
        "header carries the current revision"
    );
    let r = c
        .get(
            "a",
            Some(GetOptions::new().with_from_key().with_revision(4)),
        )
        .await
        .unwrap();
    assert_eq!(keys(&r), ["a", "b", "c"]);
    assert_eq!(r.kvs()[1].value(), b"4");

    // sort_order x sort_target.
    let abcde = || GetOptions::new().with_range("f");
    let sorted = |target, order| abcde().with_sort(target, order);
    let r = c
        .get("a", Some(sorted(SortTarget::Key, SortOrder::Descend)))
        .await
        .unwrap();
    assert_eq!(keys(&r), ["e", "d", "c", "b", "a"]);
    let r = c
        .get("a", Some(sorted(SortTarget::Key, SortOrder::Ascend)))
        .await
        .unwrap();
    assert_eq!(keys(&r), ["a", "b", "c", "d", "e"]);
    let r = c
        .get("a", Some(sorted(SortTarget::Value, SortOrder::Ascend)))
        .await
        .unwrap();
    assert_eq!(keys(&r), ["e", "d", "c", "b", "a"], "1 < 2 < 333 < 44 < 5");
    let r = c
        .get("a", Some(sorted(SortTarget::Value, SortOrder::None)))
        .await
        .unwrap();
    assert_eq!(
        keys(&r),
        ["e", "d", "c", "b", "a"],
        "a non-key target sorts ascending by default"
    );
    let r = c
        .get("a", Some(sorted(SortTarget::Create, SortOrder::Descend)))
        .await
        .unwrap();
    assert_eq!(keys(&r), ["e", "d", "c", "b", "a"]);
    let r = c
        .get("a", Some(sorted(SortTarget::Mod, SortOrder::Descend)))
        .await
        .unwrap();
    assert_eq!(keys(&r), ["c", "b", "e", "d", "a"]);
    let r = c
        .get(
            "a",
            Some(sorted(SortTarget::Version, SortOrder::Descend).with_limit(1)),
        )
        .await
        .unwrap();
    assert_eq!(
        (keys(&r), r.more(), r.count()),
        (vec!["c".to_string()], true, 5)
    );
    let r = c
        .get(
            "a",
            Some(sorted(SortTarget::Key, SortOrder::Descend).with_limit(2)),
        )
        .await
        .unwrap();
    assert_eq!(
        (keys(&r), r.more()),
        (vec!["e".to_string(), "d".into()], true)
    );

    // keys_only, count_only.
    let r = c.get("a", Some(abcde().with_keys_only())).await.unwrap();
    assert_eq!(r.kvs().len(), 5);
    assert!(r.kvs().iter().all(|kv| kv.value().is_empty()));
    assert_eq!(r.kvs()[2].version(), 3, "metadata stays with keys_only");
    let r = c.get("a", Some(abcde().with_count_only())).await.unwrap();
    assert_eq!((r.kvs().len(), r.count()), (0, 5));

    // min/max mod and create revision filters (count is before filtering, as etcd).
    let r = c
        .get("a", Some(abcde().with_min_mod_revision(7)))
        .await
        .unwrap();
    assert_eq!(
        (keys(&r), r.count()),
        (vec!["b".to_string(), "c".into()], 5)
    );
    let r = c
        .get("a", Some(abcde().with_max_mod_revision(5)))
        .await
        .unwrap();
    assert_eq!(keys(&r), ["a", "d"]);
    let r = c
        .get("a", Some(abcde().with_min_create_revision(4)))
        .await
        .unwrap();
    assert_eq!(keys(&r), ["c", "d", "e"]);
    let r = c
        .get("a", Some(abcde().with_max_create_revision(3)))
        .await
        .unwrap();
    assert_eq!(keys(&r), ["a", "b"]);
    let r = c
        .get(
            "a",
            Some(
                abcde()
                    .with_min_mod_revision(5)
                    .with_max_create_revision(4)
                    .with_limit(1),
            ),
        )
        .await
        .unwrap();
    assert_eq!((keys(&r), r.more()), (vec!["b".to_string()], true));

    // Serializable reads see the same data on one member.
    let r = c
        .get("b", Some(GetOptions::new().with_serializable()))
        .await
        .unwrap();
    assert_eq!(r.kvs()[0].value(), b"44");
}

#[tokio::test]
async fn put_delete_prev_kv_and_versions() {
    let s = Concord::start().await.unwrap();
    let mut c = s.client().await.unwrap();
    let r = c
        .put("k", "v1", Some(PutOptions::new().with_prev_key()))
        .await
        .unwrap();
    assert!(r.prev_key().is_none());
    let r = c
        .put("k", "v2", Some(PutOptions::new().with_prev_key()))
        .await
        .unwrap();
    assert_eq!(r.prev_key().unwrap().value(), b"v1");
    // ignore_value keeps the value and bumps the version.
    let r = c
        .put(
            "k",
            "",
            Some(PutOptions::new().with_ignore_value().with_prev_key()),
        )
        .await
        .unwrap();
    assert_eq!(r.header().unwrap().revision(), 4);
    let kv = c.get("k", None).await.unwrap().kvs()[0].clone();
    assert_eq!(
        (
            kv.value(),
            kv.version(),
            kv.create_revision(),
            kv.mod_revision()
        ),
        (&b"v2"[..], 3, 2, 4)
    );

    put(&mut c, "k2", "x").await; // 5
    put(&mut c, "k3", "y").await; // 6
    let r = c
        .delete(
            "k",
            Some(DeleteOptions::new().with_prefix().with_prev_key()),
        )
        .await
        .unwrap();
    assert_eq!(r.deleted(), 3);
    assert_eq!(
        r.header().unwrap().revision(),
        7,
        "one revision for the whole delete"
    );
    let prev: Vec<_> = r.prev_kvs().iter().map(|kv| kv.value().to_vec()).collect();
    assert_eq!(prev, [b"v2".to_vec(), b"x".to_vec(), b"y".to_vec()]);
    // Deleting nothing does not make a revision.
    let r = c.delete("k", None).await.unwrap();
    assert_eq!((r.deleted(), r.header().unwrap().revision()), (0, 7));
    // A new generation starts at version 1 with a new create revision.
    put(&mut c, "k", "again").await;
    let kv = c.get("k", None).await.unwrap().kvs()[0].clone();
    assert_eq!((kv.version(), kv.create_revision()), (1, 8));
    // The deleted generation is still readable in history.
    let r = c
        .get("k", Some(GetOptions::new().with_revision(6)))
        .await
        .unwrap();
    assert_eq!(r.kvs()[0].value(), b"v2");
    let r = c
        .get("k", Some(GetOptions::new().with_revision(7)))
        .await
        .unwrap();
    assert!(r.kvs().is_empty());
    // Binary keys and values, including NUL bytes.
    c.put(vec![0u8, 1, 255], vec![0u8, 0, 7], None)
        .await
        .unwrap();
    let r = c.get(vec![0u8, 1, 255], None).await.unwrap();
    assert_eq!(r.kvs()[0].value(), &[0u8, 0, 7]);
}

#[tokio::test]
async fn txn_compares_and_nesting() {
    let s = Concord::start().await.unwrap();
    let mut c = s.client().await.unwrap();
    put(&mut c, "t", "m").await; // 2
    put(&mut c, "t", "m").await; // 3: version 2, create 2, mod 3
    put(&mut c, "u", "a").await; // 4

    // Every target with every result, each once true and once false.
    use CompareOp::*;
    let cases: Vec<(Compare, bool)> = vec![
        (Compare::version("t", Equal, 2), true),
        (Compare::version("t", Equal, 1), false),
        (Compare::version("t", Greater, 1), true),
        (Compare::version("t", Greater, 2), false),
        (Compare::version("t", Less, 3), true),
        (Compare::version("t", Less, 2), false),
        (Compare::version("t", NotEqual, 1), true),
        (Compare::version("t", NotEqual, 2), false),
        (Compare::create_revision("t", Equal, 2), true),
        (Compare::create_revision("t", Greater, 2), false),
        (Compare::create_revision("t", Less, 3), true),
        (Compare::create_revision("t", NotEqual, 2), false),
        (Compare::mod_revision("t", Equal, 3), true),
        (Compare::mod_revision("t", Greater, 2), true),
        (Compare::mod_revision("t", Less, 3), false),
        (Compare::mod_revision("t", NotEqual, 3), false),
        (Compare::value("t", Equal, "m"), true),
        (Compare::value("t", Equal, "n"), false),
        (Compare::value("t", Greater, "l"), true),
        (Compare::value("t", Less, "l"), false),
        (Compare::value("t", NotEqual, "n"), true),
        (Compare::lease("t", Equal, 0), true),
        (Compare::lease("t", Greater, 0), false),
        (Compare::lease("t", Less, 1), true),
        (Compare::lease("t", NotEqual, 0), false),
        // A missing key compares as zero; its value never compares.
        (Compare::version("missing", Equal, 0), true),
        (Compare::create_revision("missing", Equal, 0), true),
        (Compare::value("missing", Equal, ""), false),
        (Compare::value("missing", NotEqual, "x"), false),
        // Range compares hold only if every key in the range satisfies them.
        (Compare::mod_revision("t", Greater, 2).with_range("v"), true),
        (Compare::mod_revision("t", Less, 4).with_range("v"), false),
        (Compare::version("a", Equal, 0).with_prefix(), true),
    ];
    for (cmp, expect) in cases {
        let txn = Txn::new()
            .when([cmp.clone()])
            .and_then([TxnOp::get("t", None)])
            .or_else([TxnOp::get("u", None)]);
        let r = c.txn(txn).await.unwrap();
        assert_eq!(r.succeeded(), expect, "{cmp:?}");
        let TxnOpResponse::Get(g) = &r.op_responses()[0] else {
            panic!("a get response")
        };
        assert_eq!(g.kvs()[0].key(), if expect { b"t" } else { b"u" });
        assert_eq!(
            r.header().unwrap().revision(),
            4,
            "a read-only txn makes no revision"
        );
    }

    // Writes: one revision for every write of the txn, sub-ops see earlier ones.
    let txn = Txn::new()
        .when([Compare::value("t", Equal, "m")])
        .and_then([
            TxnOp::put("w1", "1", Some(PutOptions::new().with_prev_key())),
            TxnOp::put("t", "m2", Some(PutOptions::new().with_prev_key())),
            TxnOp::get("w", Some(GetOptions::new().with_prefix())),
            TxnOp::delete("u", Some(DeleteOptions::new().with_prev_key())),
        ]);
    let r = c.txn(txn).await.unwrap();
    assert!(r.succeeded());
    assert_eq!(r.header().unwrap().revision(), 5);
    let resps = r.op_responses();
    let TxnOpResponse::Put(p) = &resps[1] else {
        panic!()
    };
    assert_eq!(p.prev_key().unwrap().value(), b"m");
    let TxnOpResponse::Get(g) = &resps[2] else {
        panic!()
    };
    assert_eq!(keys(g), ["w1"], "a range sees the txn's own earlier put");
    let TxnOpResponse::Delete(d) = &resps[3] else {
        panic!()
    };
    assert_eq!((d.deleted(), d.prev_kvs()[0].value()), (1, &b"a"[..]));
    let r = c.get("w1", None).await.unwrap();
    assert_eq!(r.kvs()[0].mod_revision(), 5);
    let r = c.get("t", None).await.unwrap();
    assert_eq!((r.kvs()[0].mod_revision(), r.kvs()[0].version()), (5, 3));

    // Nested txns: inner compares see the state before the outer txn's writes.
    let inner_ok = Txn::new()
        .when([Compare::value("t", Equal, "m2")])
        .and_then([TxnOp::put("n1", "inner-then", None)])
        .or_else([TxnOp::put("n1", "inner-else", None)]);
    let inner_fail = Txn::new()
        .when([Compare::version("n2", Greater, 0)])
        .and_then([TxnOp::put("n2", "then", None)])
        .or_else([TxnOp::put("n2", "else", None)]);
    let outer = Txn::new()
        .when([Compare::version("t", Equal, 3)])
        .and_then([
            TxnOp::put("t", "m3", None),
            TxnOp::txn(inner_ok),
            TxnOp::txn(inner_fail),
        ])
        .or_else([TxnOp::put("never", "x", None)]);
    let r = c.txn(outer).await.unwrap();
    assert!(r.succeeded());
    assert_eq!(r.header().unwrap().revision(), 6);
    let resps = r.op_responses();
    let TxnOpResponse::Txn(t1) = &resps[1] else {
        panic!()
    };
    let TxnOpResponse::Txn(t2) = &resps[2] else {
        panic!()
    };
    assert!(t1.succeeded());
    assert!(!t2.succeeded());
    assert_eq!(
        c.get("n1", None).await.unwrap().kvs()[0].value(),
        b"inner-then"
    );
    assert_eq!(c.get("n2", None).await.unwrap().kvs()[0].value(), b"else");
    assert!(c.get("never", None).await.unwrap().kvs().is_empty());
    // Failure branch with a write.
    let r = c
        .txn(
            Txn::new()
                .when([Compare::value("t", Equal, "nope")])
                .or_else([TxnOp::put("f", "1", None)]),
        )
        .await
        .unwrap();
    assert!(!r.succeeded());
    assert_eq!(r.header().unwrap().revision(), 7);
    // A txn whose chosen branch writes nothing makes no revision.
    let r = c
        .txn(
            Txn::new()
                .when([Compare::value("t", Equal, "nope")])
                .and_then([TxnOp::put("x", "1", None)]),
        )
        .await
        .unwrap();
    assert_eq!((r.succeeded(), r.header().unwrap().revision()), (false, 7));
    // Historical range inside a txn.
    let r = c
        .txn(Txn::new().and_then([TxnOp::get("t", Some(GetOptions::new().with_revision(3)))]))
        .await
        .unwrap();
    let TxnOpResponse::Get(g) = &r.op_responses()[0] else {
        panic!()
    };
    assert_eq!(g.kvs()[0].value(), b"m");
}

#[tokio::test]
async fn compaction() {
    let s = Concord::start().await.unwrap();
    let mut c = s.client().await.unwrap();
    for i in 0..10 {
        put(&mut c, "c", &format!("v{i}")).await; // revisions 2..=11
    }
    put(&mut c, "gone", "x").await; // 12
    c.delete("gone", None).await.unwrap(); // 13
    let r = c.compact(6, None).await.unwrap();
    assert_eq!(r.header().unwrap().revision(), 13);
    let e = c
        .get("c", Some(GetOptions::new().with_revision(5)))
        .await
        .unwrap_err();
    assert_eq!(
        status(e),
        (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision has been compacted".into()
        )
    );
    // The compacted revision itself stays readable.
    let r = c
        .get("c", Some(GetOptions::new().with_revision(6)))
        .await
        .unwrap();
    assert_eq!(r.kvs()[0].value(), b"v4");
    let e = c.compact(6, None).await.unwrap_err();
    assert_eq!(
        status(e),
        (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision has been compacted".into()
        )
    );
    let e = c.compact(100, None).await.unwrap_err();
    assert_eq!(
        status(e),
        (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision is a future revision".into()
        )
    );
    // Physical compaction past the tombstone removes the deleted key's history.
    c.compact(
        13,
        Some(etcd_client::CompactionOptions::new().with_physical()),
    )
    .await
    .unwrap();
    let r = c
        .get("c", Some(GetOptions::new().with_revision(13)))
        .await
        .unwrap();
    assert_eq!((r.kvs()[0].value(), r.kvs()[0].version()), (&b"v9"[..], 10));
    let e = c
        .get("c", Some(GetOptions::new().with_revision(12)))
        .await
        .unwrap_err();
    assert_eq!(status(e).0, Code::OutOfRange);
    // A txn reading a compacted revision fails as a whole.
    let e = c
        .txn(Txn::new().and_then([
            TxnOp::put("z", "1", None),
            TxnOp::get("c", Some(GetOptions::new().with_revision(3))),
        ]))
        .await
        .unwrap_err();
    assert_eq!(
        status(e).1,
        "etcdserver: mvcc: required revision has been compacted"
    );
    assert!(
        c.get("z", None).await.unwrap().kvs().is_empty(),
        "nothing of a failed txn is applied"
    );

    // Compaction and its effects survive a restart; the revision does not go back.
    let mut s = s;
    s.restart().await.unwrap();
    let mut c = s.client().await.unwrap();
    let r = c.get("c", None).await.unwrap();
    assert_eq!(
        (
            r.kvs()[0].value(),
            r.kvs()[0].version(),
            r.header().unwrap().revision()
        ),
        (&b"v9"[..], 10, 13)
    );
    let e = c
        .get("c", Some(GetOptions::new().with_revision(12)))
        .await
        .unwrap_err();
    assert_eq!(status(e).0, Code::OutOfRange);
    assert_eq!(put(&mut c, "after", "1").await, 14);
}

#[tokio::test]
async fn errors_match_etcd() {
    let s = Concord::start().await.unwrap();
    let mut c = s.client().await.unwrap();
    put(&mut c, "k", "v").await;
    let inval = |m: &str| (Code::InvalidArgument, m.to_string());

    let e = c.get("", None).await.unwrap_err();
    assert_eq!(status(e), inval("etcdserver: key is not provided"));
    let e = c.put("", "v", None).await.unwrap_err();
    assert_eq!(status(e), inval("etcdserver: key is not provided"));
    let e = c.delete("", None).await.unwrap_err();
    assert_eq!(status(e), inval("etcdserver: key is not provided"));

    let e = c
        .get("k", Some(GetOptions::new().with_revision(1000)))
        .await
        .unwrap_err();
    assert_eq!(
        status(e),
        (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision is a future revision".into()
        )
    );

    let ops: Vec<TxnOp> = (0..129)
        .map(|i| TxnOp::put(format!("op{i}"), "v", None))
        .collect();
    let e = c.txn(Txn::new().and_then(ops)).await.unwrap_err();
    assert_eq!(
        status(e),
        inval("etcdserver: too many operations in txn request")
    );
    let ops: Vec<TxnOp> = (0..128)
        .map(|i| TxnOp::put(format!("op{i}"), "v", None))
        .collect();
    c.txn(Txn::new().and_then(ops))
        .await
        .expect("128 ops is within the limit");

    let e = c
        .txn(Txn::new().and_then([TxnOp::put("d", "1", None), TxnOp::put("d", "2", None)]))
        .await
        .unwrap_err();
    assert_eq!(
        status(e),
        inval("etcdserver: duplicate key given in txn request")
    );
    let e = c
        .txn(Txn::new().and_then([
            TxnOp::delete("a", Some(DeleteOptions::new().with_range("z"))),
            TxnOp::put("d", "2", None),
        ]))
        .await
        .unwrap_err();
    assert_eq!(
        status(e),
        inval("etcdserver: duplicate key given in txn request")
    );

    let big = vec![b'x'; 1536 * 1024 + 1];
    let e = c.put("big", big, None).await.unwrap_err();
    assert_eq!(status(e), inval("etcdserver: request is too large"));
    let e = c
        .txn(Txn::new().and_then([TxnOp::put("big", vec![b'y'; 1600 * 1024], None)]))
        .await
        .unwrap_err();
    assert_eq!(status(e), inval("etcdserver: request is too large"));
    // Just under the limit is fine, and reads back whole.
    let fits = vec![b'z'; 1536 * 1024 - 64];
    c.put("fits", fits.clone(), None).await.unwrap();
    assert_eq!(
        c.get("fits", None).await.unwrap().kvs()[0].value(),
        &fits[..]
    );

    let e = c
        .put("missing", "", Some(PutOptions::new().with_ignore_value()))
        .await
        .unwrap_err();
    assert_eq!(status(e), inval("etcdserver: key not found"));
    let e = c
        .put("missing", "v", Some(PutOptions::new().with_ignore_lease()))
        .await
        .unwrap_err();
    assert_eq!(status(e), inval("etcdserver: key not found"));
    let e = c
        .put("k", "v", Some(PutOptions::new().with_ignore_value()))
        .await
        .unwrap_err();
    assert_eq!(status(e), inval("etcdserver: value is provided"));

    let e = c
        .put("k", "v", Some(PutOptions::new().with_lease(0x1234)))
        .await
        .unwrap_err();
    assert_eq!(
        status(e),
        (
            Code::NotFound,
            "etcdserver: requested lease not found".into()
        )
    );
    let e = c
        .txn(Txn::new().and_then([TxnOp::put("k2", "v", Some(PutOptions::new().with_lease(7)))]))
        .await
        .unwrap_err();
    assert_eq!(
        status(e),
        (
            Code::NotFound,
            "etcdserver: requested lease not found".into()
        )
    );

    // None of the rejected writes changed anything.
    let r = c.get("k", None).await.unwrap();
    assert_eq!(
        (r.kvs()[0].version(), r.header().unwrap().revision()),
        (1, 4)
    );
    assert!(c.get("k2", None).await.unwrap().kvs().is_empty());
}

#[tokio::test]
async fn concurrent_writers_get_distinct_revisions() {
    let s = Concord::start().await.unwrap();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let mut c = s.client().await.unwrap();
        tasks.push(tokio::spawn(async move {
            let mut revs = Vec::new();
            for i in 0..50 {
                revs.push(put(&mut c, &format!("w{w}/{i}"), "v").await);
            }
            revs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    let expect: Vec<i64> = (2..2 + 400).collect();
    assert_eq!(all, expect, "every put got its own revision, none skipped");
    let mut c = s.client().await.unwrap();
    let r = c
        .get("w", Some(GetOptions::new().with_prefix().with_count_only()))
        .await
        .unwrap();
    assert_eq!(r.count(), 400);
}
