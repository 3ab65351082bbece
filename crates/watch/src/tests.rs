use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use super::*;

/// An in-memory store: a log of revisions, each with its events.
#[derive(Default)]
struct Log {
    revs: Mutex<Vec<(i64, Vec<Event>)>>,
    compacted: AtomicI64,
}

impl Log {
    fn put(&self, hub: &Hub, key: &str, value: &str) -> i64 {
        let mut revs = self.revs.lock().unwrap();
        let rev = revs.last().map_or(2, |r| r.0 + 1);
        let version = revs
            .iter()
            .flat_map(|(_, e)| e)
            .rev()
            .find(|e| e.kv.key == key.as_bytes())
            .map_or(1, |e| {
                if e.kind == EventKind::Put {
                    e.kv.version + 1
                } else {
                    1
                }
            });
        let ev = Event {
            kind: EventKind::Put,
            kv: KeyValue {
                key: key.into(),
                create_revision: rev,
                mod_revision: rev,
                version,
                value: value.into(),
                lease: 0,
            },
            prev_kv: None,
        };
        revs.push((rev, vec![ev.clone()]));
        drop(revs);
        hub.publish(rev, &[ev]);
        rev
    }

    fn txn(&self, hub: &Hub, changes: &[(&str, Option<&str>)]) -> i64 {
        let mut revs = self.revs.lock().unwrap();
        let rev = revs.last().map_or(2, |r| r.0 + 1);
        let evs: Vec<Event> = changes
            .iter()
            .map(|(k, v)| Event {
                kind: if v.is_some() {
                    EventKind::Put
                } else {
                    EventKind::Delete
                },
                kv: KeyValue {
                    key: k.as_bytes().to_vec(),
                    mod_revision: rev,
                    value: v.unwrap_or("").into(),
                    version: 1,
                    create_revision: rev,
                    ..KeyValue::default()
                },
                prev_kv: None,
            })
            .collect();
        revs.push((rev, evs.clone()));
        drop(revs);
        hub.publish(rev, &evs);
        rev
    }
}

impl History for Log {
    fn events(
        &self,
        from: i64,
        to: i64,
        max_events: usize,
        _max_bytes: usize,
    ) -> Result<Vec<Event>, HistoryError> {
        let c = self.compacted.load(Ordering::SeqCst);
        if from < c {
            return Err(HistoryError::Compacted(c));
        }
        let mut out = Vec::new();
        for (rev, evs) in self.revs.lock().unwrap().iter() {
            if *rev < from || *rev > to {
                continue;
            }
            out.extend(evs.iter().cloned());
            if out.len() >= max_events {
                break;
            }
        }
        Ok(out)
    }

    fn value_at(&self, key: &[u8], revision: i64) -> Option<KeyValue> {
        let revs = self.revs.lock().unwrap();
        let last = revs
            .iter()
            .filter(|(r, _)| *r <= revision)
            .flat_map(|(_, e)| e)
            .rev()
            .find(|e| e.kv.key == key)?;
        (last.kind == EventKind::Put).then(|| last.kv.clone())
    }
}

fn hub_with(log: &Arc<Log>, options: HubOptions) -> Hub {
    Hub::new(log.clone(), 1, options)
}

fn spec(key: &str, end: &str, start: i64) -> WatchSpec {
    WatchSpec {
        key: key.into(),
        range_end: end.into(),
        start_revision: start,
        ..WatchSpec::default()
    }
}

async fn next(s: &WatchStream) -> Response {
    tokio::time::timeout(Duration::from_secs(5), s.next())
        .await
        .expect("a response within 5 s")
        .expect("stream open")
}

/// (watch id, [(key, revision)]) of an events response.
fn evs(r: &Response) -> (i64, Vec<(String, i64)>) {
    match r {
        Response::Events {
            watch_id, events, ..
        } => (
            *watch_id,
            events
                .iter()
                .map(|e| {
                    (
                        String::from_utf8(e.kv.key.clone()).unwrap(),
                        e.kv.mod_revision,
                    )
                })
                .collect(),
        ),
        other => panic!("expected events, got {other:?}"),
    }
}

#[tokio::test]
async fn live_events_for_keys_prefixes_and_open_ranges() {
    let log = Arc::new(Log::default());
    let hub = hub_with(&log, HubOptions::default());
    let s = hub.stream();
    assert_eq!(s.create(spec("a", "", 0)), Some(0));
    assert_eq!(s.create(spec("b/", "b0", 0)), Some(1));
    assert_eq!(s.create(spec("c", "\0", 0)), Some(2));
    for want in 0..3 {
        assert_eq!(
            next(&s).await,
            Response::Created {
                watch_id: want,
                revision: 1
            }
        );
    }
    log.put(&hub, "a", "1"); // 2
    log.put(&hub, "b/x", "1"); // 3
    log.put(&hub, "zz", "1"); // 4
    log.put(&hub, "ab", "1"); // 5: nobody
    assert_eq!(evs(&next(&s).await), (0, vec![("a".into(), 2)]));
    assert_eq!(evs(&next(&s).await), (1, vec![("b/x".into(), 3)]));
    assert_eq!(evs(&next(&s).await), (2, vec![("zz".into(), 4)]));
    log.put(&hub, "c", "1"); // 6
    assert_eq!(evs(&next(&s).await), (2, vec![("c".into(), 6)]));
}

#[tokio::test]
async fn one_response_per_revision_and_filters() {
    let log = Arc::new(Log::default());
    let hub = hub_with(&log, HubOptions::default());
    let s = hub.stream();
    s.create(spec("k", "l", 0));
    s.create(WatchSpec {
        no_put: true,
        ..spec("k", "l", 0)
    });
    next(&s).await;
    next(&s).await;
    let rev = log.txn(&hub, &[("k1", Some("v")), ("k2", Some("v")), ("k3", None)]);
    let mut got = vec![evs(&next(&s).await), evs(&next(&s).await)];
    got.sort();
    assert_eq!(
        got,
        vec![
            (
                0,
                vec![("k1".into(), rev), ("k2".into(), rev), ("k3".into(), rev)]
            ),
            (1, vec![("k3".into(), rev)]),
        ]
    );
}

#[tokio::test]
async fn history_then_live_without_gap_or_duplicate() {
    let log = Arc::new(Log::default());
    let hub = hub_with(&log, HubOptions::default());
    for i in 0..50 {
        log.put(&hub, &format!("h{}", i % 5), "v");
    }
    let s = hub.stream();
    s.create(spec("h", "i", 10));
    assert!(matches!(next(&s).await, Response::Created { .. }));
    let mut seen = Vec::new();
    let mut writer = 0;
    while seen.last().copied() != Some(51 + 20) {
        if writer < 20 {
            log.put(&hub, "h1", "live");
            writer += 1;
        }
        let (_, e) = evs(&next(&s).await);
        seen.extend(e.into_iter().map(|x| x.1));
    }
    let want: Vec<i64> = (10..=71).collect();
    assert_eq!(seen, want);
}

#[tokio::test]
async fn future_start_revision_waits() {
    let log = Arc::new(Log::default());
    let hub = hub_with(&log, HubOptions::default());
    let s = hub.stream();
    s.create(spec("f", "", 4));
    next(&s).await;
    log.put(&hub, "f", "2");
    log.put(&hub, "f", "3");
    log.put(&hub, "f", "4");
    assert_eq!(evs(&next(&s).await), (0, vec![("f".into(), 4)]));
}

#[tokio::test]
async fn compacted_start_is_cancelled_with_the_compact_revision() {
    let log = Arc::new(Log::default());
    let hub = hub_with(&log, HubOptions::default());
    for _ in 0..5 {
        log.put(&hub, "x", "v");
    }
    log.compacted.store(4, Ordering::SeqCst);
    let s = hub.stream();
    s.create(spec("x", "", 2));
    next(&s).await;
    assert_eq!(
        next(&s).await,
        Response::Canceled {
            watch_id: 0,
            revision: 0,
            compact_revision: 4
        }
    );
    assert_eq!(hub.watcher_counts(), (0, 0));
    // At the compaction revision itself history is still there.
    s.create(spec("x", "", 4));
    next(&s).await;
    assert_eq!(
        evs(&next(&s).await),
        (1, vec![("x".into(), 4), ("x".into(), 5), ("x".into(), 6)])
    );
}

#[tokio::test]
async fn ids_cancel_and_errors_follow_etcd() {
    let log = Arc::new(Log::default());
    let hub = hub_with(&log, HubOptions::default());
    let s = hub.stream();
    assert_eq!(
        s.create(WatchSpec {
            watch_id: 1,
            ..spec("a", "", 0)
        }),
        Some(1)
    );
    assert_eq!(s.create(spec("a", "", 0)), Some(0));
    assert_eq!(s.create(spec("a", "", 0)), Some(2), "skips the taken id 1");
    assert_eq!(
        s.create(WatchSpec {
            watch_id: 2,
            ..spec("a", "", 0)
        }),
        None
    );
    assert_eq!(s.create(spec("b", "a", 0)), None);
    for _ in 0..3 {
        next(&s).await;
    }
    assert_eq!(
        next(&s).await,
        Response::CreateFailed {
            watch_id: -1,
            revision: 1,
            reason: ERR_DUPLICATE_ID.into()
        }
    );
    assert_eq!(
        next(&s).await,
        Response::CreateFailed {
            watch_id: -1,
            revision: 1,
            reason: ERR_EMPTY_RANGE.into()
        }
    );
    assert!(s.cancel(0));
    assert!(!s.cancel(0), "unknown ids are ignored");
    assert_eq!(
        next(&s).await,
        Response::Canceled {
            watch_id: 0,
            revision: 1,
            compact_revision: 0
        }
    );
    log.put(&hub, "a", "v");
    let mut ids = vec![evs(&next(&s).await).0, evs(&next(&s).await).0];
    ids.sort();
    assert_eq!(ids, vec![1, 2], "the cancelled watcher gets nothing");
    drop(s);
    assert_eq!(hub.watcher_counts(), (0, 0));
}

#[tokio::test]
async fn slow_stream_is_moved_aside_and_caught_up_in_order() {
    let log = Arc::new(Log::default());
    let hub = hub_with(
        &log,
        HubOptions {
            max_queued_responses: 4,
            ..HubOptions::default()
        },
    );
    let slow = hub.stream();
    let fast = hub.stream();
    slow.create(spec("k", "", 0));
    fast.create(spec("k", "", 0));
    next(&fast).await;
    let mut fast_seen = Vec::new();
    for _ in 0..100 {
        let rev = log.put(&hub, "k", "v");
        // The fast stream gets each event at once although `slow` never reads.
        let (_, e) = evs(&next(&fast).await);
        assert_eq!(e, vec![("k".into(), rev)]);
        fast_seen.push(rev);
    }
    assert_eq!(hub.watcher_counts(), (2, 1), "the slow watcher is unsynced");
    {
        let q = slow.outbox.lock();
        assert!(q.events <= 4, "the slow stream's queue stays bounded");
    }
    // Now it reads: every event, in order, once.
    assert!(matches!(next(&slow).await, Response::Created { .. }));
    let mut slow_seen = Vec::new();
    while slow_seen.len() < 100 {
        slow_seen.extend(evs(&next(&slow).await).1.into_iter().map(|x| x.1));
    }
    assert_eq!(slow_seen, fast_seen);
    tokio::time::timeout(Duration::from_secs(5), async {
        while hub.watcher_counts().1 != 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the slow watcher is synced again");
    let rev = log.put(&hub, "k", "v");
    assert_eq!(evs(&next(&slow).await).1, vec![("k".into(), rev)]);
}

#[tokio::test]
async fn request_progress_waits_for_unsynced_watchers() {
    let log = Arc::new(Log::default());
    let hub = hub_with(
        &log,
        HubOptions {
            max_queued_responses: 2,
            ..HubOptions::default()
        },
    );
    let s = hub.stream();
    s.request_progress();
    assert_eq!(
        next(&s).await,
        Response::Progress {
            watch_id: -1,
            revision: 1
        }
    );
    s.create(spec("p", "", 0));
    next(&s).await;
    for _ in 0..10 {
        log.put(&hub, "p", "v");
    }
    // The queue is full, so the watcher is unsynced: the bookmark must come after
    // every event up to the revision it names.
    s.request_progress();
    let mut last = 0;
    loop {
        match next(&s).await {
            Response::Events { events, .. } => last = events.last().unwrap().kv.mod_revision,
            Response::Progress { watch_id, revision } => {
                assert_eq!(watch_id, -1);
                assert_eq!(revision, 11);
                assert_eq!(last, 11, "all events up to the bookmark came first");
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn progress_notify_only_when_idle() {
    let log = Arc::new(Log::default());
    let hub = hub_with(
        &log,
        HubOptions {
            progress_notify_interval: Duration::from_millis(200),
            ..HubOptions::default()
        },
    );
    let s = hub.stream();
    s.create(WatchSpec {
        progress_notify: true,
        ..spec("q", "", 0)
    });
    s.create(spec("other", "", 0));
    next(&s).await;
    next(&s).await;
    log.put(&hub, "zzz", "v");
    assert_eq!(
        next(&s).await,
        Response::Progress {
            watch_id: 0,
            revision: 2
        }
    );
}

#[tokio::test]
async fn prev_kv_is_filled_for_updates_and_deletes() {
    let log = Arc::new(Log::default());
    let hub = hub_with(&log, HubOptions::default());
    let s = hub.stream();
    s.create(WatchSpec {
        prev_kv: true,
        ..spec("k", "", 0)
    });
    next(&s).await;
    log.put(&hub, "k", "one");
    log.put(&hub, "k", "two");
    log.txn(&hub, &[("k", None)]);
    let prev = |r: Response| match r {
        Response::Events { events, .. } => events[0].prev_kv.as_ref().map(|p| p.value.clone()),
        other => panic!("{other:?}"),
    };
    assert_eq!(prev(next(&s).await), None);
    assert_eq!(prev(next(&s).await), Some(b"one".to_vec()));
    assert_eq!(prev(next(&s).await), Some(b"two".to_vec()));
}

#[tokio::test]
async fn resync_catches_up_revisions_that_were_not_published() {
    let log = Arc::new(Log::default());
    let hub = hub_with(&log, HubOptions::default());
    let s = hub.stream();
    s.create(spec("r", "", 0));
    next(&s).await;
    // Revisions written behind the hub's back, as a snapshot install does.
    {
        let mut revs = log.revs.lock().unwrap();
        for rev in 2..=4 {
            revs.push((
                rev,
                vec![Event {
                    kind: EventKind::Put,
                    kv: KeyValue {
                        key: b"r".to_vec(),
                        mod_revision: rev,
                        ..KeyValue::default()
                    },
                    prev_kv: None,
                }],
            ));
        }
    }
    hub.resync(4);
    assert_eq!(
        evs(&next(&s).await).1,
        vec![("r".into(), 2), ("r".into(), 3), ("r".into(), 4)]
    );
}

/// Found by the robustness suite: a snapshot install moves every watcher aside, and a
/// catch-up round that read history only up to the current revision set a future
/// watcher's next revision to just past it, so it got events from before its start.
#[tokio::test]
async fn a_future_start_survives_a_catch_up_after_a_resync() {
    let log = Arc::new(Log::default());
    let hub = hub_with(&log, HubOptions::default());
    let s = hub.stream();
    s.create(spec("r", "", 0));
    next(&s).await;
    s.create(spec("r", "", 8));
    next(&s).await;
    {
        let mut revs = log.revs.lock().unwrap();
        for rev in 2..=4 {
            revs.push((
                rev,
                vec![Event {
                    kind: EventKind::Put,
                    kv: KeyValue {
                        key: b"r".to_vec(),
                        mod_revision: rev,
                        ..KeyValue::default()
                    },
                    prev_kv: None,
                }],
            ));
        }
    }
    hub.resync(4);
    // The round that catches the first watcher up read history up to 4 only.
    let (id, first) = evs(&next(&s).await);
    assert_eq!(
        (id, first.iter().map(|e| e.1).collect::<Vec<_>>()),
        (0, vec![2, 3, 4])
    );
    for _ in 5..=9 {
        log.put(&hub, "r", "v");
    }
    let mut seen: HashMap<i64, Vec<i64>> = HashMap::from([(0, vec![2, 3, 4])]);
    while seen.get(&0).and_then(|r| r.last()) != Some(&9)
        || seen.get(&1).and_then(|r| r.last()) != Some(&9)
    {
        let (id, events) = evs(&next(&s).await);
        seen.entry(id)
            .or_default()
            .extend(events.iter().map(|e| e.1));
    }
    assert_eq!(seen[&0], vec![2, 3, 4, 5, 6, 7, 8, 9]);
    assert_eq!(
        seen[&1],
        vec![8, 9],
        "the watcher from 8 got earlier events"
    );
}

#[tokio::test]
async fn request_progress_is_answered_when_the_unsynced_watcher_is_cancelled() {
    let log = Arc::new(Log::default());
    let hub = hub_with(&log, HubOptions::default());
    for _ in 0..3 {
        log.put(&hub, "x", "v");
    }
    // Compacted history the watcher is owed keeps it unsynced until cancelled.
    log.compacted.store(3, Ordering::SeqCst);
    let s = hub.stream();
    let id = s.create(spec("x", "", 2)).unwrap();
    s.request_progress();
    assert!(s.cancel(id) || hub.watcher_counts().0 == 0);
    let mut got_progress = false;
    for _ in 0..3 {
        match tokio::time::timeout(Duration::from_secs(5), s.next()).await {
            Ok(Some(Response::Progress { watch_id, revision })) => {
                assert_eq!((watch_id, revision), (-1, 4));
                got_progress = true;
                break;
            }
            Ok(Some(_)) => {}
            other => panic!("no progress answer: {other:?}"),
        }
    }
    assert!(got_progress);
}
