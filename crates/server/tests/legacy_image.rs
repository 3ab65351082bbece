//! A v3 store image (from before the aux keyspace, stored by the mvcc crate's tests)
//! still gives the server its leases, alarms and member list: the tables the server
//! reads are the ones mvcc maps the old frames into.

use concord_mvcc as mvcc;
use concord_proto::etcdserverpb as pb;
use concord_server::{alarm, lease, membership};

const V3: &[u8] = include_bytes!("../../mvcc/tests/fixtures/image-v3.bin");

#[test]
fn the_server_tables_are_the_legacy_ones() {
    for t in [lease::TABLE, alarm::TABLE, membership::STATE_TABLE] {
        assert!(mvcc::LEGACY_TABLES.contains(&t), "{t}");
    }
}

#[test]
fn a_v3_image_brings_back_leases_alarms_and_members() {
    let dir = tempfile::tempdir().unwrap();
    let store = mvcc::Store::open(dir.path(), mvcc::StoreOptions::default()).unwrap();
    store.import(&mut &V3[..], 30).unwrap();

    let lessor = lease::Lessor::open(&store).unwrap();
    assert_eq!(lessor.ids(), vec![7, 9]);
    lessor.promote(1);
    let (left, ttl) = lessor.time_to_live(7).unwrap();
    assert_eq!(ttl, 60);
    assert!((59..=60).contains(&left), "{left}");
    let (left, ttl) = lessor.time_to_live(9).unwrap();
    assert_eq!(ttl, 30);
    assert!((11..=12).contains(&left), "{left}");
    assert_eq!(store.lease_keys(7), vec![b"b".to_vec()]);

    let alarms = alarm::Alarms::open(&store).unwrap();
    assert!(alarms.contains(0x1111, pb::AlarmType::Nospace));
    assert_eq!(alarms.list(pb::AlarmType::None as i32).len(), 1);

    assert!(membership::recorded(&store).unwrap());
    let m = membership::Membership::open(&store, 0x1111, Vec::new(), None).unwrap();
    let list: Vec<_> = m
        .list()
        .into_iter()
        .map(|m| (m.id, m.name, m.peer_ur_ls, m.is_learner))
        .collect();
    assert_eq!(
        list,
        vec![
            (
                0x1111,
                "m1".into(),
                vec!["http://127.0.0.1:2380".into()],
                false
            ),
            (
                0x2222,
                "m2".into(),
                vec!["http://127.0.0.1:2390".into()],
                true
            ),
        ]
    );
}
