//! Leases: etcd's semantics, with the remaining TTL kept through leader changes.
//!
//! A lease is granted, revoked and checkpointed only through the Raft log, so every
//! member holds the same set of leases with the same granted TTL, the same attached keys
//! (the store tracks them) and the same *persisted remaining TTL*. Only the leader runs
//! the clocks: once it has applied everything from earlier terms (a ReadIndex round) it
//! is **primary** and gives each lease an expiry of `now + persisted remaining`; keep-
//! alives it serves move the expiry to `now + TTL`; when an expiry passes it proposes
//! the revoke (which deletes the attached keys in one revision, as etcd does).
//!
//! ## The rule that keeps TTLs across leader changes
//!
//! etcd gives every lease its full TTL again on each new leader, so a dead client's lease
//! can live forever under frequent leader changes, and its optional checkpoints come every
//! five minutes. Here:
//!
//! 1. Every `checkpoint interval` (1 s by default) the primary proposes, in batches, the
//!    remaining TTL of each lease whose clock has run at least half an interval below
//!    what the log last recorded for it. A new leader starts each lease from the recorded
//!    value, so a dead lease gains at most about one interval (plus the election) per
//!    leader change: it expires on time, give or take that, however often leaders change.
//! 2. A keep-alive for a lease whose recorded remaining TTL is below its full TTL is
//!    answered only after a checkpoint restoring the full TTL is committed; any other
//!    keep-alive is answered after a ReadIndex round confirms this member still leads.
//!    Either way, once a client holds a keep-alive answer, every later leader starts that
//!    lease from at least the full TTL at its takeover: a live lease never expires early
//!    because the leader changed.
//!
//! Checkpoints and restoring ones go to the log from one task, in the order they were
//! decided, so a stale checkpoint never lands after the keep-alive that made it stale.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::apply::{ApplyError, Refused};
use concord_mvcc as mvcc;

/// etcd's `MaxLeaseTTL`: a grant above it fails with "too large lease TTL".
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;
/// The persisted remaining TTL of a lease nobody has checkpointed since its grant or
/// its last restoring checkpoint: the full TTL.
pub const FULL: i64 = -1;
/// Checkpoints per log entry (etcd's batch size).
pub const CHECKPOINT_BATCH: usize = 1000;
/// The store's aux table of lease records: key the lease id (big-endian), value a
/// [`Record`]. The name is the one mvcc maps old lease records into
/// ([`mvcc::LEGACY_TABLES`]), so stores and images from before the aux keyspace load.
pub const TABLE: &str = "lease";

/// What the log records for a lease: its granted TTL (s) and remaining TTL (ms, or
/// [`FULL`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub ttl: i64,
    pub remaining_ms: i64,
}

impl Record {
    pub fn encode(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.ttl.to_be_bytes());
        out[8..].copy_from_slice(&self.remaining_ms.to_be_bytes());
        out
    }

    pub fn decode(b: &[u8]) -> Result<Record, String> {
        if b.len() != 16 {
            return Err(format!("lease record of {} bytes", b.len()));
        }
        let at = |i: usize| i64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Ok(Record {
            ttl: at(0),
            remaining_ms: at(8),
        })
    }

    fn persisted(&self) -> Duration {
        if self.remaining_ms == FULL {
            Duration::from_secs(self.ttl.max(0) as u64)
        } else {
            Duration::from_millis(self.remaining_ms.max(0) as u64)
        }
    }
}

#[derive(Debug)]
struct Lease {
    rec: Record,
    /// Primary only: when the lease expires.
    expiry: Option<Instant>,
    /// Primary only: when its revoke was proposed.
    revoking: Option<Instant>,
}

#[derive(Debug, Default)]
struct Inner {
    leases: HashMap<i64, Lease>,
    /// The term this member became primary in.
    primary: Option<u64>,
}

/// What a keep-alive found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// This member does not run the lease clocks: ask the leader.
    NotPrimary,
    /// No such lease (etcd answers TTL 0).
    NotFound,
    /// Renewed in memory; `restore` says a checkpoint restoring the full TTL must be
    /// committed before the renewal is acknowledged.
    Renewed { ttl: i64, restore: bool },
}

/// Every lease of the member, and, on the primary, their clocks.
#[derive(Debug, Default)]
pub struct Lessor {
    inner: Mutex<Inner>,
}

impl Lessor {
    /// The leases recorded in `store`.
    pub fn open(store: &mvcc::Store) -> Result<Lessor, String> {
        let l = Lessor::default();
        l.reload(store)?;
        Ok(l)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the leases with those recorded in `store` (after a snapshot install).
    pub fn reload(&self, store: &mvcc::Store) -> Result<(), String> {
        let mut leases = HashMap::new();
        for (k, v) in store.aux_scan(TABLE).map_err(|e| e.to_string())? {
            let id: [u8; 8] = k[..]
                .try_into()
                .map_err(|_| format!("lease record key of {} bytes", k.len()))?;
            leases.insert(
                i64::from_be_bytes(id),
                Lease {
                    rec: Record::decode(&v)?,
                    expiry: None,
                    revoking: None,
                },
            );
        }
        let mut g = self.lock();
        g.leases = leases;
        if g.primary.is_some() {
            let now = Instant::now();
            for l in g.leases.values_mut() {
                l.expiry = Some(now + l.rec.persisted());
            }
        }
        Ok(())
    }

    // ---- applied through the log: deterministic on every member ----

    /// Grants lease `id` with `ttl` seconds (already raised to the minimum by the
    /// proposer).
    pub fn apply_grant(
        &self,
        w: &mut mvcc::Writer<'_>,
        id: i64,
        ttl: i64,
    ) -> Result<i64, ApplyError> {
        if id == 0 {
            return Err(ApplyError::LeaseNotFound);
        }
        if ttl > MAX_LEASE_TTL {
            return Err(ApplyError::LeaseTtlTooLarge);
        }
        let mut g = self.lock();
        if g.leases.contains_key(&id) {
            return Err(ApplyError::LeaseExist);
        }
        let rec = Record {
            ttl,
            remaining_ms: FULL,
        };
        w.put_aux(TABLE, &id.to_be_bytes(), &rec.encode());
        let expiry = g.primary.map(|_| Instant::now() + rec.persisted());
        g.leases.insert(
            id,
            Lease {
                rec,
                expiry,
                revoking: None,
            },
        );
        Ok(ttl)
    }

    /// Revokes lease `id`, deleting its keys in one revision; returns the revision after.
    pub(crate) fn apply_revoke(&self, w: &mut mvcc::Writer<'_>, id: i64) -> Result<i64, Refused> {
        if !self.lock().leases.contains_key(&id) {
            return Err(ApplyError::LeaseNotFound.into());
        }
        let rev = w.delete_leased_keys(id)?;
        w.delete_aux(TABLE, &id.to_be_bytes());
        self.lock().leases.remove(&id);
        Ok(rev)
    }

    /// Records remaining TTLs; unknown ids (revoked meanwhile) are skipped.
    pub fn apply_checkpoint(&self, w: &mut mvcc::Writer<'_>, cps: &[(i64, i64)]) {
        let mut g = self.lock();
        for &(id, remaining_ms) in cps {
            if let Some(l) = g.leases.get_mut(&id) {
                l.rec.remaining_ms = remaining_ms;
                w.put_aux(TABLE, &id.to_be_bytes(), &l.rec.encode());
            }
        }
    }

    // ---- the leader's clocks ----

    /// The term this member is primary in, if it is.
    pub fn primary_term(&self) -> Option<u64> {
        self.lock().primary
    }

    /// Starts the clocks: every lease expires its persisted remaining TTL from now.
    pub fn promote(&self, term: u64) {
        let mut g = self.lock();
        let now = Instant::now();
        for l in g.leases.values_mut() {
            l.expiry = Some(now + l.rec.persisted());
            l.revoking = None;
        }
        g.primary = Some(term);
        tracing::info!(
            term,
            leases = g.leases.len(),
            "lease clocks started (primary)"
        );
    }

    /// Stops the clocks (leadership lost).
    pub fn demote(&self) {
        let mut g = self.lock();
        if g.primary.take().is_some() {
            for l in g.leases.values_mut() {
                l.expiry = None;
                l.revoking = None;
            }
            tracing::info!("lease clocks stopped");
        }
    }

    /// A keep-alive.
    pub fn renew(&self, id: i64) -> Renewal {
        let mut g = self.lock();
        if g.primary.is_none() {
            return Renewal::NotPrimary;
        }
        let Some(l) = g.leases.get_mut(&id) else {
            return Renewal::NotFound;
        };
        if l.revoking.is_some() {
            // Already expired here; the revoke is on its way.
            return Renewal::NotFound;
        }
        l.expiry = Some(Instant::now() + Duration::from_secs(l.rec.ttl.max(0) as u64));
        ::metrics::counter!(crate::metrics::LEASE_RENEWED).increment(1);
        Renewal::Renewed {
            ttl: l.rec.ttl,
            restore: l.rec.remaining_ms != FULL,
        }
    }

    /// `(remaining seconds, granted TTL)` as the primary sees it; `Err(true)` when this
    /// member is not primary, `Err(false)` when there is no such lease.
    pub fn time_to_live(&self, id: i64) -> Result<(i64, i64), bool> {
        let g = self.lock();
        if g.primary.is_none() {
            return Err(true);
        }
        let l = g.leases.get(&id).ok_or(false)?;
        let now = Instant::now();
        let remaining = match l.expiry {
            Some(e) if e >= now => (e - now).as_secs() as i64,
            // Truncated towards zero like etcd's int64(Remaining().Seconds()).
            Some(e) => -((now - e).as_secs() as i64),
            None => l.rec.ttl,
        };
        Ok((remaining, l.rec.ttl))
    }

    pub fn exists(&self, id: i64) -> bool {
        self.lock().leases.contains_key(&id)
    }

    /// Every lease id, sorted.
    pub fn ids(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self.lock().leases.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Leases whose expiry has passed and whose revoke is not already under way (or was
    /// proposed over `retry` ago), at most `max`, marked as being revoked.
    pub fn take_expired(&self, max: usize, retry: Duration) -> Vec<i64> {
        let mut g = self.lock();
        if g.primary.is_none() {
            return Vec::new();
        }
        let now = Instant::now();
        let mut out = Vec::new();
        for (id, l) in g.leases.iter_mut() {
            if out.len() >= max {
                break;
            }
            let expired = l.expiry.is_some_and(|e| e <= now);
            let waiting = l.revoking.is_some_and(|t| now.duration_since(t) < retry);
            if expired && !waiting {
                l.revoking = Some(now);
                out.push(*id);
            }
        }
        out
    }

    /// `(id, remaining ms)` of every lease whose clock runs at least `slack` below what
    /// the log records for it.
    pub fn due_checkpoints(&self, slack: Duration) -> Vec<(i64, i64)> {
        let g = self.lock();
        if g.primary.is_none() {
            return Vec::new();
        }
        let now = Instant::now();
        let mut out = Vec::new();
        for (id, l) in &g.leases {
            let Some(expiry) = l.expiry else { continue };
            if l.revoking.is_some() {
                continue;
            }
            let left = expiry.saturating_duration_since(now);
            if left + slack <= l.rec.persisted() {
                out.push((*id, left.as_millis() as i64));
            }
        }
        out.sort_unstable();
        out
    }
}

impl mvcc::LeaseLookup for Lessor {
    fn lease_exists(&self, id: i64) -> bool {
        self.exists(id)
    }
}

/// etcd's minimum lease TTL: 1.5 election timeouts, rounded up to whole seconds.
pub fn min_ttl(election_ticks: u64, heartbeat_ms: u64) -> i64 {
    let ms = (3 * election_ticks / 2) * heartbeat_ms;
    ms.div_ceil(1000) as i64
}

/// The checkpoint command's payload: `(id, remaining ms)` pairs, 16 bytes each.
pub fn encode_checkpoints(cps: &[(i64, i64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(cps.len() * 16);
    for (id, ms) in cps {
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&ms.to_be_bytes());
    }
    out
}

pub fn decode_checkpoints(b: &[u8]) -> Result<Vec<(i64, i64)>, String> {
    if !b.len().is_multiple_of(16) {
        return Err(format!("checkpoint payload of {} bytes", b.len()));
    }
    Ok(b.chunks_exact(16)
        .map(|c| {
            let at = |i: usize| i64::from_be_bytes(c[i..i + 8].try_into().expect("8 bytes"));
            (at(0), at(8))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &std::path::Path) -> mvcc::Store {
        mvcc::Store::open(dir, mvcc::StoreOptions { sync_writes: false }).unwrap()
    }

    #[test]
    fn min_ttl_is_etcds() {
        // etcd defaults: 10 election ticks of 100 ms -> 1.5 s -> 2 s.
        assert_eq!(min_ttl(10, 100), 2);
        assert_eq!(min_ttl(20, 100), 3);
        assert_eq!(min_ttl(10, 200), 3);
    }

    #[test]
    fn records_and_checkpoints_round_trip() {
        let r = Record {
            ttl: 30,
            remaining_ms: 12_345,
        };
        assert_eq!(Record::decode(&r.encode()).unwrap(), r);
        assert!(Record::decode(&[1, 2, 3]).is_err());
        let cps = vec![(1, FULL), (i64::MAX, 7)];
        assert_eq!(decode_checkpoints(&encode_checkpoints(&cps)).unwrap(), cps);
        assert!(decode_checkpoints(&[0; 15]).is_err());
    }

    #[test]
    fn grant_revoke_and_errors_are_etcds() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let l = Lessor::open(&s).unwrap();
        let mut w = s.writer().unwrap();
        assert_eq!(l.apply_grant(&mut w, 5, 10).unwrap(), 10);
        assert_eq!(l.apply_grant(&mut w, 5, 10), Err(ApplyError::LeaseExist));
        assert_eq!(
            l.apply_grant(&mut w, 6, MAX_LEASE_TTL + 1),
            Err(ApplyError::LeaseTtlTooLarge)
        );
        assert!(matches!(
            l.apply_revoke(&mut w, 6),
            Err(Refused::Apply(ApplyError::LeaseNotFound))
        ));
        w.commit(Some(1)).unwrap();
        assert!(mvcc::LeaseLookup::lease_exists(&l, 5));
        assert_eq!(l.ids(), vec![5]);
        // Recorded: a new lessor over the same store knows the lease.
        assert_eq!(Lessor::open(&s).unwrap().ids(), vec![5]);
        let mut w = s.writer().unwrap();
        l.apply_revoke(&mut w, 5).unwrap();
        w.commit(Some(2)).unwrap();
        assert!(l.ids().is_empty());
        assert!(Lessor::open(&s).unwrap().ids().is_empty());
    }

    #[test]
    fn only_the_primary_runs_clocks_and_a_new_one_starts_from_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let l = Lessor::open(&s).unwrap();
        let mut w = s.writer().unwrap();
        l.apply_grant(&mut w, 1, 100).unwrap();
        w.commit(None).unwrap();
        assert_eq!(l.renew(1), Renewal::NotPrimary);
        assert_eq!(l.time_to_live(1), Err(true));
        assert!(l.take_expired(10, Duration::from_secs(1)).is_empty());

        l.promote(3);
        assert_eq!(
            l.renew(1),
            Renewal::Renewed {
                ttl: 100,
                restore: false
            }
        );
        assert_eq!(l.renew(2), Renewal::NotFound);
        assert_eq!(l.time_to_live(2), Err(false));
        let (left, granted) = l.time_to_live(1).unwrap();
        assert_eq!(granted, 100);
        assert!((99..=100).contains(&left), "{left}");
        // Nothing ran below the record yet.
        assert!(l.due_checkpoints(Duration::from_millis(500)).is_empty());
        // With no slack at all, the lease is due: its clock has moved.
        let due = l.due_checkpoints(Duration::ZERO);
        assert_eq!(due.len(), 1);
        assert!(due[0].1 <= 100_000 && due[0].1 > 99_000);

        // A checkpoint of 40 s: a later primary starts the lease from 40 s, and a
        // keep-alive must restore the full TTL through the log before it is answered.
        let mut w = s.writer().unwrap();
        l.apply_checkpoint(&mut w, &[(1, 40_000), (99, 5)]);
        w.commit(None).unwrap();
        l.demote();
        assert_eq!(l.primary_term(), None);
        let l2 = Lessor::open(&s).unwrap();
        l2.promote(4);
        let (left, _) = l2.time_to_live(1).unwrap();
        assert!((39..=40).contains(&left), "{left}");
        assert_eq!(
            l2.renew(1),
            Renewal::Renewed {
                ttl: 100,
                restore: true
            }
        );
        let mut w = s.writer().unwrap();
        l2.apply_checkpoint(&mut w, &[(1, FULL)]);
        w.commit(None).unwrap();
        assert_eq!(
            l2.renew(1),
            Renewal::Renewed {
                ttl: 100,
                restore: false
            }
        );
    }

    #[test]
    fn expired_leases_are_handed_out_once_until_the_retry_time() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let l = Lessor::open(&s).unwrap();
        let mut w = s.writer().unwrap();
        l.apply_grant(&mut w, 1, 0).unwrap();
        l.apply_grant(&mut w, 2, 1000).unwrap();
        w.commit(None).unwrap();
        l.promote(1);
        let long = Duration::from_secs(60);
        assert_eq!(l.take_expired(10, long), vec![1]);
        assert!(l.take_expired(10, long).is_empty());
        // Being revoked: a keep-alive no longer saves it.
        assert_eq!(l.renew(1), Renewal::NotFound);
        assert_eq!(l.take_expired(10, Duration::ZERO), vec![1]);
    }
}
