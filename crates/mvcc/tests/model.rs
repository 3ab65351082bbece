//! Model-based test: the store against a naive model that keeps a full copy of the
//! key space at every revision and answers ranges by scanning and sorting.

use std::collections::BTreeMap;

use concord_mvcc::*;
use proptest::prelude::*;

type State = BTreeMap<Vec<u8>, KeyValue>;

#[derive(Debug, Clone)]
enum Op {
    Put(u8, u8),
    Delete(u8, u8),
    /// Puts two keys and deletes a third in one txn.
    Txn(u8, u8, u8),
    Compact(u8),
    Reopen,
}

#[derive(Debug, Clone)]
struct Query {
    lo: u8,
    hi: u8,
    from_key: bool,
    limit: u8,
    rev_back: u8,
    order: u8,
    target: u8,
    min_mod: u8,
    max_create: u8,
}

fn key(k: u8) -> Vec<u8> {
    vec![b'k', b'0' + (k % 8)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (any::<u8>(), any::<u8>()).prop_map(|(k, v)| Op::Put(k, v)),
        2 => (any::<u8>(), 0u8..3).prop_map(|(k, w)| Op::Delete(k, w)),
        2 => (any::<u8>(), any::<u8>(), any::<u8>()).prop_map(|(a, b, c)| Op::Txn(a, b, c)),
        1 => any::<u8>().prop_map(Op::Compact),
        1 => Just(Op::Reopen),
    ]
}

fn query() -> impl Strategy<Value = Query> {
    (
        (any::<u8>(), 0u8..4, any::<bool>(), 0u8..4),
        (any::<u8>(), 0u8..3, 0u8..5, 0u8..4, 0u8..4),
    )
        .prop_map(
            |((lo, hi, from_key, limit), (rev_back, order, target, min_mod, max_create))| Query {
                lo,
                hi,
                from_key,
                limit,
                rev_back,
                order,
                target,
                min_mod,
                max_create,
            },
        )
}

struct Model {
    /// `history[r]` is the key space at revision r (index 0 unused).
    history: Vec<State>,
    compacted: i64,
}

impl Model {
    fn current(&self) -> i64 {
        self.history.len() as i64 - 1
    }

    fn apply(&mut self, puts: &[(Vec<u8>, Vec<u8>)], dels: &[(Vec<u8>, Vec<u8>)]) {
        let rev = self.current() + 1;
        let mut st = self.history.last().unwrap().clone();
        let mut changed = false;
        for (k, end) in dels {
            let r = KeyRange::new(k.clone(), end.clone());
            let victims: Vec<_> = st.keys().filter(|x| r.contains(x)).cloned().collect();
            changed |= !victims.is_empty();
            for v in victims {
                st.remove(&v);
            }
        }
        for (k, v) in puts {
            let prev = st.get(k);
            let kv = KeyValue {
                key: k.clone(),
                create_revision: prev.map_or(rev, |p| p.create_revision),
                mod_revision: rev,
                version: prev.map_or(1, |p| p.version + 1),
                value: v.clone(),
                lease: 0,
            };
            st.insert(k.clone(), kv);
            changed = true;
        }
        if changed {
            self.history.push(st);
        }
    }

    fn range(&self, req: &RangeRequest) -> Result<RangeResponse> {
        if req.revision > self.current() {
            return Err(Error::FutureRevision);
        }
        let at = if req.revision <= 0 {
            self.current()
        } else {
            req.revision
        };
        if at < self.compacted {
            return Err(Error::Compacted);
        }
        let all: Vec<KeyValue> = self.history[at as usize]
            .values()
            .filter(|kv| req.range.contains(&kv.key))
            .cloned()
            .collect();
        let count = all.len() as i64;
        let mut kvs: Vec<KeyValue> = all
            .into_iter()
            .filter(|kv| req.min_mod_revision == 0 || kv.mod_revision >= req.min_mod_revision)
            .filter(|kv| {
                req.max_create_revision == 0 || kv.create_revision <= req.max_create_revision
            })
            .collect();
        let field = |kv: &KeyValue| -> (Vec<u8>, i64) {
            match req.sort_target {
                SortTarget::Key => (kv.key.clone(), 0),
                SortTarget::Version => (vec![], kv.version),
                SortTarget::Create => (vec![], kv.create_revision),
                SortTarget::Mod => (vec![], kv.mod_revision),
                SortTarget::Value => (kv.value.clone(), 0),
            }
        };
        let order = match (req.sort_order, req.sort_target) {
            (SortOrder::None, SortTarget::Key) => SortOrder::None,
            (SortOrder::None, _) => SortOrder::Ascend,
            (o, _) => o,
        };
        match order {
            SortOrder::None => {}
            SortOrder::Ascend => kvs.sort_by_key(|kv| field(kv)),
            SortOrder::Descend => kvs.sort_by_key(|kv| std::cmp::Reverse(field(kv))),
        }
        let mut more = false;
        if req.limit > 0 && kvs.len() > req.limit as usize {
            kvs.truncate(req.limit as usize);
            more = true;
        }
        Ok(RangeResponse {
            header_revision: self.current(),
            kvs,
            more,
            count,
        })
    }
}

fn run(ops: Vec<Op>, queries: Vec<Query>) {
    let dir = tempfile::tempdir().unwrap();
    let opts = || StoreOptions { sync_writes: false };
    let mut store = Store::open(dir.path(), opts()).unwrap();
    let mut model = Model {
        history: vec![State::new(), State::new()],
        compacted: 0,
    };
    let mut queries = queries.into_iter().cycle();
    for op in ops {
        match op {
            Op::Put(k, v) => {
                let mut w = store.writer().unwrap();
                let req = PutRequest {
                    key: key(k),
                    value: vec![v],
                    ..Default::default()
                };
                w.put(&req, &NoLeases).unwrap();
                w.commit(None).unwrap();
                model.apply(&[(key(k), vec![v])], &[]);
            }
            Op::Delete(k, width) => {
                let end = if width == 0 {
                    vec![]
                } else {
                    key(k.saturating_add(width))
                };
                let mut w = store.writer().unwrap();
                let req = DeleteRangeRequest {
                    range: KeyRange::new(key(k), end.clone()),
                    prev_kv: false,
                };
                w.delete_range(&req).unwrap();
                w.commit(None).unwrap();
                model.apply(&[], &[(key(k), end)]);
            }
            Op::Txn(a, b, c) => {
                let (ka, kb, kc) = (key(a), key(b), key(c));
                if ka == kb || kc == ka || kc == kb {
                    continue; // etcd's duplicate-key rule rejects these before the store
                }
                let req = TxnRequest {
                    compare: vec![],
                    success: vec![
                        RequestOp::DeleteRange(DeleteRangeRequest {
                            range: KeyRange::new(kc.clone(), ""),
                            prev_kv: false,
                        }),
                        RequestOp::Put(PutRequest {
                            key: ka.clone(),
                            value: vec![b],
                            ..Default::default()
                        }),
                        RequestOp::Put(PutRequest {
                            key: kb.clone(),
                            value: vec![c],
                            ..Default::default()
                        }),
                    ],
                    failure: vec![],
                };
                // Two txns in one batch: one commit, two revisions.
                let mut w = store.writer().unwrap();
                w.txn(&req, &NoLeases).unwrap();
                let again = PutRequest {
                    key: ka.clone(),
                    value: vec![a],
                    ..Default::default()
                };
                w.put(&again, &NoLeases).unwrap();
                w.commit(None).unwrap();
                model.apply(&[(ka.clone(), vec![b]), (kb, vec![c])], &[(kc, vec![])]);
                model.apply(&[(ka, vec![a])], &[]);
            }
            Op::Compact(back) => {
                let target = model.current() - i64::from(back % 4);
                let mut w = store.writer().unwrap();
                match w.compact(target) {
                    Ok(wait) => {
                        w.commit(None).unwrap();
                        wait.wait().unwrap();
                        model.compacted = target;
                    }
                    Err(e) => {
                        assert!(target <= model.compacted, "{e:?} for {target}");
                        assert_eq!(e, Error::Compacted);
                    }
                }
            }
            Op::Reopen => {
                drop(store);
                store = Store::open(dir.path(), opts()).unwrap();
            }
        }
        assert_eq!(store.current_revision(), model.current());
        let q = queries.next().unwrap();
        let end = if q.from_key {
            vec![0]
        } else if q.hi == 0 {
            vec![]
        } else {
            key(q.lo.saturating_add(q.hi))
        };
        let req = RangeRequest {
            range: KeyRange::new(key(q.lo), end),
            limit: i64::from(q.limit),
            revision: (model.current() - i64::from(q.rev_back % 6)).max(0),
            sort_order: [SortOrder::None, SortOrder::Ascend, SortOrder::Descend][q.order as usize],
            sort_target: [
                SortTarget::Key,
                SortTarget::Version,
                SortTarget::Create,
                SortTarget::Mod,
                SortTarget::Value,
            ][q.target as usize],
            min_mod_revision: i64::from(q.min_mod) * 3,
            max_create_revision: i64::from(q.max_create) * 4,
            ..Default::default()
        };
        let got = store.range(&req);
        let want = model.range(&req);
        match (&got, &want) {
            // Ties in a non-key sort may come in either order; compare as sets then.
            (Ok(g), Ok(w)) if req.sort_target != SortTarget::Key => {
                let mut gs = g.kvs.clone();
                let mut ws = w.kvs.clone();
                gs.sort_by(|a, b| a.key.cmp(&b.key));
                ws.sort_by(|a, b| a.key.cmp(&b.key));
                if req.limit == 0 {
                    assert_eq!(gs, ws, "{req:?}");
                }
                assert_eq!(
                    (g.count, g.more, g.kvs.len()),
                    (w.count, w.more, w.kvs.len()),
                    "{req:?}"
                );
            }
            _ => assert_eq!(got, want, "{req:?}"),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn store_matches_model(ops in prop::collection::vec(op(), 1..60), queries in prop::collection::vec(query(), 1..20)) {
        run(ops, queries);
    }
}
