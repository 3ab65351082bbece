//! Client traffic for the robustness scenarios: sequential clients issuing a realistic
//! mix of requests (get, range, serializable get, put, delete, multi-op txn,
//! compare-and-set, lease grant followed by a put with that lease, put with an older
//! lease, keep-alive, lease revoke, compaction) on a few keys under [`PREFIX`], each
//! recorded as a [`history::Record`] with invoke / complete times. Writes that fail in
//! any way are recorded as [`Reply::Unknown`] (they may have been applied); failed
//! reads as unknown too (they constrain nothing); "lease not found" and "compacted"
//! answers, and keep-alives answered with TTL 0, as [`Reply::Failed`]. Every value
//! written is unique in the run (`c<client>-<n>`), which is what lets the checker tell
//! which request wrote what.
//!
//! Leases are short ([`LEASE_TTLS`]: the server's minimum and a little more), so that
//! within a run of a few seconds some expire, some are kept alive for a while, and
//! some are revoked; the put after a grant goes to one of a few [`lease_key`]s that
//! nothing else writes or deletes, so its lease decides when it goes: the checker's
//! lease expiry rule gets exercised.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};

use crate::Rng;
use crate::history::{Kv, Record, Reply, Request, TxnWrite};

/// Every key the traffic touches is under this prefix.
pub const PREFIX: &str = "r/";
/// The end of [`PREFIX`]'s range.
pub const PREFIX_END: &str = "r0";
/// Keys the clients contend on.
pub const KEYS: usize = 6;
/// A request that has not answered by then is given up (unknown outcome).
const OP_TIMEOUT: Duration = Duration::from_secs(4);
/// The TTLs (seconds) leases are granted with, picked at random.
pub const LEASE_TTLS: [i64; 3] = [2, 3, 5];
/// Leases a client remembers for keep-alives, revokes and puts (oldest dropped).
const MAX_LEASES: usize = 32;

/// The key of index `i`.
pub fn key(i: u64) -> String {
    format!("{PREFIX}k{i}")
}

/// Keys only puts with a fresh lease write (nothing deletes them but their lease), so
/// that many leased keys live until their lease is revoked or expires.
pub const LEASE_KEYS: usize = 16;

/// The lease key of index `i` (under [`PREFIX`], apart from the [`key`]s).
pub fn lease_key(i: u64) -> String {
    format!("{PREFIX}l{i}")
}

/// Waits until the cluster at `endpoint` holds no lease: every lease the traffic
/// granted has been revoked or has expired. Until then an expiry may still write a
/// revision (deleting its keys), so a run calls this after its clients stop and before
/// its final write, which must be the last revision. Leases live longer than their TTL
/// under faults, so give it several TTLs.
pub async fn wait_leases_gone(endpoint: &str, deadline: Duration) -> anyhow::Result<()> {
    crate::wait_until(deadline, "every lease expired or revoked", || async {
        let left = crate::connect(endpoint).await?.leases().await?;
        anyhow::ensure!(
            left.leases().is_empty(),
            "{} leases left",
            left.leases().len()
        );
        Ok(())
    })
    .await
}

fn to_kv(kv: &etcd_client::KeyValue) -> Kv {
    Kv {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: String::from_utf8_lossy(kv.value()).into_owned(),
        mod_revision: kv.mod_revision(),
        create_revision: kv.create_revision(),
        version: kv.version(),
    }
}

fn revision(h: Option<&etcd_client::ResponseHeader>) -> i64 {
    h.map_or(0, etcd_client::ResponseHeader::revision)
}

async fn perform(c: &mut Client, req: &Request) -> Result<Reply, etcd_client::Error> {
    Ok(match req {
        Request::Range {
            start,
            end,
            serializable,
        } => {
            let mut o = GetOptions::new();
            if !end.is_empty() {
                o = o.with_range(end.as_str());
            }
            if *serializable {
                o = o.with_serializable();
            }
            let r = c.get(start.as_str(), Some(o)).await?;
            Reply::Range {
                revision: revision(r.header()),
                kvs: r.kvs().iter().map(to_kv).collect(),
            }
        }
        Request::Put { key, value, lease } => {
            let o = (*lease != 0).then(|| etcd_client::PutOptions::new().with_lease(*lease));
            let r = c.put(key.as_str(), value.as_str(), o).await?;
            Reply::Put {
                revision: revision(r.header()),
            }
        }
        Request::Delete { key } => {
            let r = c.delete(key.as_str(), None).await?;
            Reply::Delete {
                revision: revision(r.header()),
                deleted: r.deleted(),
            }
        }
        Request::Txn { compares, then } => {
            let cmps: Vec<Compare> = compares
                .iter()
                .map(|(k, v)| match v {
                    Some(v) => Compare::value(k.as_str(), CompareOp::Equal, v.as_str()),
                    None => Compare::create_revision(k.as_str(), CompareOp::Equal, 0),
                })
                .collect();
            let ops: Vec<TxnOp> = then
                .iter()
                .map(|w| match w {
                    TxnWrite::Put { key, value } => TxnOp::put(key.as_str(), value.as_str(), None),
                    TxnWrite::Delete { key } => TxnOp::delete(key.as_str(), None),
                })
                .collect();
            let r = c.txn(Txn::new().when(cmps).and_then(ops)).await?;
            Reply::Txn {
                revision: revision(r.header()),
                succeeded: r.succeeded(),
            }
        }
        Request::LeaseRevoke { lease } => {
            let r = c.lease_revoke(*lease).await?;
            Reply::LeaseRevoke {
                revision: revision(r.header()),
            }
        }
        Request::LeaseGrant { ttl } => {
            let r = c.lease_grant(*ttl, None).await?;
            Reply::LeaseGrant {
                lease: r.id(),
                ttl: r.ttl(),
            }
        }
        Request::LeaseKeepAlive { lease } => {
            // The keeper sends the one request; it must live until the answer.
            let (_keeper, mut answers) = c.lease_keep_alive(*lease).await?;
            match answers.message().await? {
                Some(a) if a.ttl() > 0 => Reply::LeaseKeepAlive { ttl: a.ttl() },
                Some(_) => Reply::Failed("keep-alive answered TTL 0: lease not found".into()),
                // The stream ended unanswered: it may have renewed.
                None => Reply::Unknown,
            }
        }
        Request::Compact { revision } => {
            c.compact(*revision, None).await?;
            Reply::Compact
        }
    })
}

/// One client: requests until `stop`, reconnecting to the next endpoint after an
/// error. `compact_to` is the highest revision it may compact to (the watchers'
/// progress: compacting what a watcher still needs would cancel it).
pub async fn client_loop(
    id: usize,
    endpoints: Vec<String>,
    origin: Instant,
    stop: Instant,
    seed: u64,
    compact_to: Arc<AtomicI64>,
) -> Vec<Record> {
    let mut rng = Rng::new(seed);
    let mut history = Vec::new();
    let mut member = id % endpoints.len();
    let mut conn: Option<Client> = None;
    let mut n = 0u64;
    let mut last_seen: Vec<Option<String>> = vec![None; KEYS];
    let mut leases: Vec<i64> = Vec::new();
    // The next request, if one is decided already (the put after a grant).
    let mut queued: Option<Request> = None;
    let now = |origin: Instant| u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
    while Instant::now() < stop {
        let Some(c) = conn.as_mut() else {
            match tokio::time::timeout(OP_TIMEOUT, crate::connect(&endpoints[member])).await {
                Ok(Ok(c)) => conn = Some(c),
                _ => {
                    member = (member + 1) % endpoints.len();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            continue;
        };
        n += 1;
        let value = format!("c{id}-{n}");
        let k = rng.below(KEYS as u64) as usize;
        let dice = rng.below(100);
        let req = if let Some(req) = queued.take() {
            req
        } else {
            match dice {
                0..=19 => Request::Range {
                    start: key(k as u64),
                    end: String::new(),
                    serializable: false,
                },
                20..=27 => Request::Range {
                    start: PREFIX.into(),
                    end: PREFIX_END.into(),
                    serializable: false,
                },
                28..=34 => Request::Range {
                    start: key(k as u64),
                    end: String::new(),
                    serializable: true,
                },
                35..=54 => Request::Put {
                    key: key(k as u64),
                    value,
                    lease: 0,
                },
                55..=61 => Request::Delete { key: key(k as u64) },
                62..=69 => {
                    let other = (k + 1) % KEYS;
                    Request::Txn {
                        compares: vec![(key(k as u64), last_seen[k].clone())],
                        then: vec![
                            TxnWrite::Put {
                                key: key(k as u64),
                                value: value.clone(),
                            },
                            TxnWrite::Put {
                                key: key(other as u64),
                                value: format!("{value}b"),
                            },
                        ],
                    }
                }
                70..=84 => Request::Txn {
                    compares: vec![(key(k as u64), last_seen[k].clone())],
                    then: vec![TxnWrite::Put {
                        key: key(k as u64),
                        value,
                    }],
                },
                // A grant; a put with the new lease follows (see below).
                85..=89 => Request::LeaseGrant {
                    ttl: LEASE_TTLS[rng.below(LEASE_TTLS.len() as u64) as usize],
                },
                // Another key on a lease already granted (which may have expired).
                90..=91 if !leases.is_empty() => Request::Put {
                    key: key(k as u64),
                    value,
                    lease: leases[rng.below(leases.len() as u64) as usize],
                },
                92..=94 if !leases.is_empty() => Request::LeaseKeepAlive {
                    lease: leases[rng.below(leases.len() as u64) as usize],
                },
                95..=97 if !leases.is_empty() => {
                    let i = rng.below(leases.len() as u64) as usize;
                    Request::LeaseRevoke {
                        lease: leases.swap_remove(i),
                    }
                }
                _ => {
                    let safe = compact_to.load(Ordering::Acquire) - 5;
                    if safe < 2 {
                        continue;
                    }
                    Request::Compact {
                        revision: safe - rng.below(10) as i64,
                    }
                }
            }
        };
        let invoke = now(origin);
        let r = tokio::time::timeout(OP_TIMEOUT, perform(c, &req)).await;
        let complete = now(origin);
        let reply = match r {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => {
                let msg = e.to_string();
                if msg.contains("requested lease not found") || msg.contains("compacted") {
                    Reply::Failed(msg)
                } else {
                    conn = None;
                    member = (member + 1) % endpoints.len();
                    Reply::Unknown
                }
            }
            Err(_) => {
                conn = None;
                member = (member + 1) % endpoints.len();
                Reply::Unknown
            }
        };
        if reply == Reply::Unknown {
            // The member is down or cut off: do not spin on it.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let (Request::Range { start, end, .. }, Reply::Range { kvs, .. }) = (&req, &reply)
            && end.is_empty()
            && let Some(i) = (0..KEYS).find(|&i| key(i as u64) == *start)
        {
            last_seen[i] = kvs.first().map(|kv| kv.value.clone());
        }
        match (&req, &reply) {
            (Request::LeaseGrant { .. }, Reply::LeaseGrant { lease, .. }) => {
                if leases.len() >= MAX_LEASES {
                    leases.remove(0);
                }
                leases.push(*lease);
                queued = Some(Request::Put {
                    key: lease_key(rng.below(LEASE_KEYS as u64)),
                    value: format!("c{id}-{n}l"),
                    lease: *lease,
                });
            }
            (Request::LeaseKeepAlive { lease }, Reply::Failed(_))
            | (Request::Put { lease, .. }, Reply::Failed(_)) => {
                // Gone (expired or revoked).
                leases.retain(|l| l != lease);
            }
            _ => {}
        }
        history.push(Record {
            client: id,
            request: req,
            reply,
            invoke,
            complete,
        });
    }
    history
}
