//! Lease benchmark client for `bench/lease.sh`: the same client against Concord and
//! etcd. Prints one JSON line of results.
//!
//! `bench_lease --endpoints A[,B,C] --probe [--deadline-secs S]` (or `--mode probe`)
//!   waits until a put and a read through every endpoint succeed.
//! `bench_lease --endpoints A[,B,C] --mode keepalive [--leases L] [--clients C]
//!   [--conns K] [--seconds S] [--ttl T]`
//! `bench_lease --endpoints A[,B,C] --mode grant-revoke [--clients C] [--conns K]
//!   [--seconds S] [--ttl T] [--keys]`
//!
//! Layout, both modes: K connections (default K = C, one per client), connection `k` to
//! endpoint `k mod E`; client task `i` uses connection `i mod K`. `--endpoint URL` is
//! the same as `--endpoints URL`.
//!
//! **keepalive** (defaults L = 100, C = 64, S = 10, T = 60):
//!
//! 1. Grants L leases with TTL T (one by one, not measured).
//! 2. Client `i` owns leases `i, i + C, i + 2C, …` below L (lease `i mod L` when
//!    L < C). For each lease it owns it opens a `LeaseKeepAlive` stream on its
//!    connection: the `etcd-client` crate's `LeaseKeeper` renews one lease id per
//!    stream, so there are max(L, C) streams (100 at the defaults), none shared between
//!    clients. Opening a stream sends one renewal; that one is not measured.
//! 3. All clients start together. Each loops for S seconds: send a renewal for its next
//!    lease (round-robin over the leases it owns) and wait for that renewal's answer.
//!    So exactly C renewals are in flight at any time.
//! 4. Renewals/s = answered renewals / (start to the last answer; renewals in flight
//!    when the S seconds end are waited for and counted). Latency = from just before
//!    the request is handed to the stream to the answer decoded by the client.
//! 5. Checks: answers whose TTL is ≤ 0 (the lease was not found: expired or never
//!    granted), answers naming another lease, and stream errors. The leases are
//!    revoked afterwards (not measured).
//!
//! **grant-revoke** (defaults C = 64, S = 10, T = 60):
//!
//! 1. Grant: C clients each grant leases with TTL T back to back for S seconds.
//!    Grants/s = granted / (start to the last answer); latency per grant.
//! 2. With `--keys` only: one key `<prefix><run>/<lease id>` is put with each lease by
//!    C clients (not measured; `attach_secs`), so that each revoke also deletes a key.
//! 3. Revoke: C clients revoke every lease granted in step 1, each taking the next
//!    lease from one shared list, back to back. Revokes/s = revoked / (first request to
//!    the last answer); latency per revoke.
//! 4. Checks: grant answers with a TTL other than T; revokes answered "lease not found"
//!    (`revoke_not_found`: the lease expired before its revoke, so T must outlast steps
//!    1 to 3; they are not counted as revoked); keys left under the run's prefix (with
//!    `--keys`, a count-only range after step 3); this run's leases still listed by
//!    `LeaseLeases` after step 3.
//!
//! Errors (any failed request) are counted with the first message in the JSON line.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use concord_integration::bench::{
    Args, Errors, connect_with, mean_ms, pct_ms, probe_writes, run_for,
};
use etcd_client::{Client, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions};
use serde_json::json;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Probe,
    KeepAlive,
    GrantRevoke,
}

struct Opts {
    endpoints: Vec<String>,
    mode: Mode,
    leases: usize,
    clients: usize,
    conns: Option<usize>,
    seconds: f64,
    ttl: i64,
    keys: bool,
    prefix: String,
    deadline: Duration,
}

fn parse() -> Result<Opts> {
    let a = Args::parse(
        &[
            "--endpoints",
            "--endpoint",
            "--mode",
            "--leases",
            "--clients",
            "--conns",
            "--seconds",
            "--ttl",
            "--prefix",
            "--deadline-secs",
        ],
        &["--probe", "--keys"],
    )?;
    let mut endpoints = a.list("--endpoints");
    endpoints.extend(a.list("--endpoint"));
    let mode = match a.opt::<String>("--mode")?.as_deref() {
        _ if a.flag("--probe") => Mode::Probe,
        Some("probe") => Mode::Probe,
        None | Some("keepalive") => Mode::KeepAlive,
        Some("grant-revoke") => Mode::GrantRevoke,
        Some(other) => bail!("--mode must be probe, keepalive or grant-revoke, not {other}"),
    };
    let o = Opts {
        endpoints,
        mode,
        leases: a.get("--leases", 100)?,
        clients: a.get("--clients", 64)?,
        conns: a.opt("--conns")?,
        seconds: a.get("--seconds", 10.0)?,
        ttl: a.get("--ttl", 60)?,
        keys: a.flag("--keys"),
        prefix: a.get("--prefix", "bench-lease/".to_string())?,
        deadline: Duration::from_secs(a.get("--deadline-secs", 60)?),
    };
    if o.endpoints.is_empty() {
        bail!("--endpoints A[,B,C] is required");
    }
    if o.leases == 0 || o.clients == 0 || o.conns == Some(0) || o.ttl <= 0 {
        bail!("--leases, --clients, --conns and --ttl must be positive");
    }
    Ok(o)
}

/// K connections spread round-robin over the endpoints. Requests on them time out
/// after 30 s; keep-alive streams are not bounded by that (it covers a call until its
/// response headers arrive, not the stream after them).
async fn open_conns(o: &Opts) -> Result<Vec<Client>> {
    let k = o.conns.unwrap_or(o.clients);
    let mut conns = Vec::with_capacity(k);
    for i in 0..k {
        let e = &o.endpoints[i % o.endpoints.len()];
        conns.push(connect_with(e, Some(Duration::from_secs(30))).await?);
    }
    Ok(conns)
}

/// The latency fields of a JSON line, names prefixed with `name` (`sorted` ascending).
fn latency_json(name: &str, sorted: &[Duration]) -> serde_json::Value {
    json!({
        format!("{name}p50_ms"): pct_ms(sorted, 0.50),
        format!("{name}p99_ms"): pct_ms(sorted, 0.99),
        format!("{name}mean_ms"): mean_ms(sorted),
        format!("{name}max_ms"): pct_ms(sorted, 1.0),
    })
}

/// `a` with `b`'s fields added (both JSON objects).
fn merge(mut a: serde_json::Value, b: serde_json::Value) -> serde_json::Value {
    if let (Some(a), serde_json::Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

/// One client's keep-alive loop tallies.
#[derive(Default)]
struct RenewStats {
    latencies: Vec<Duration>,
    ttl_nonpositive: u64,
    wrong_id: u64,
}

/// A client's keep-alive streams, one per lease it owns.
type Streams = Vec<(i64, LeaseKeeper, LeaseKeepAliveStream)>;

/// Renews the leases of `owned` round-robin, one renewal in flight, until `stop`.
async fn renew_loop(mut owned: Streams, stop: Arc<AtomicBool>, errors: Arc<Errors>) -> RenewStats {
    let mut s = RenewStats::default();
    let mut next = 0;
    while !stop.load(Ordering::Relaxed) && !owned.is_empty() {
        let n = owned.len();
        let (id, keeper, stream) = &mut owned[next % n];
        next += 1;
        let t = Instant::now();
        if let Err(e) = keeper.keep_alive().await {
            errors.record(e);
            break;
        }
        match stream.message().await {
            Ok(Some(r)) => {
                s.latencies.push(t.elapsed());
                s.ttl_nonpositive += u64::from(r.ttl() <= 0);
                s.wrong_id += u64::from(r.id() != *id);
            }
            Ok(None) => {
                errors.record("keep-alive stream ended by the server");
                break;
            }
            Err(e) => {
                errors.record(e);
                break;
            }
        }
    }
    s
}

async fn keepalive(o: &Opts) -> Result<serde_json::Value> {
    let conns = open_conns(o).await?;
    let mut lc = conns[0].lease_client();
    let mut ids = Vec::with_capacity(o.leases);
    for _ in 0..o.leases {
        ids.push(lc.grant(o.ttl, None).await.context("lease grant")?.id());
    }

    // Every client's streams, opened concurrently before the clock starts.
    let errors = Arc::new(Errors::default());
    let mut openers = Vec::with_capacity(o.clients);
    for i in 0..o.clients {
        let mine: Vec<i64> = if o.leases >= o.clients {
            ids.iter().skip(i).step_by(o.clients).copied().collect()
        } else {
            vec![ids[i % o.leases]]
        };
        let mut lc = conns[i % conns.len()].lease_client();
        let errors = errors.clone();
        openers.push(tokio::spawn(async move {
            let mut owned = Streams::new();
            for id in mine {
                match lc.keep_alive(id).await {
                    Ok((keeper, stream)) => owned.push((id, keeper, stream)),
                    Err(e) => errors.record(format!("opening keep-alive for {id:x}: {e}")),
                }
            }
            owned
        }));
    }
    let mut streams = Vec::with_capacity(o.clients);
    for t in openers {
        streams.push(t.await?);
    }
    let n_streams: usize = streams.iter().map(Vec::len).sum();

    let mut streams = streams.into_iter();
    let (stats, secs) = run_for(o.clients, o.seconds, |_, stop| {
        renew_loop(streams.next().unwrap_or_default(), stop, errors.clone())
    })
    .await?;
    let mut lat = Vec::new();
    let (mut ttl_nonpositive, mut wrong_id) = (0, 0);
    for mut s in stats {
        lat.append(&mut s.latencies);
        ttl_nonpositive += s.ttl_nonpositive;
        wrong_id += s.wrong_id;
    }
    lat.sort_unstable();
    for id in ids {
        if let Err(e) = lc.revoke(id).await {
            errors.record(format!("revoking {id:x} afterwards: {e}"));
        }
    }
    Ok(merge(
        json!({
            "mode": "keepalive",
            "endpoints": o.endpoints.len(),
            "leases": o.leases,
            "clients": o.clients,
            "conns": conns.len(),
            "streams": n_streams,
            "ttl": o.ttl,
            "secs": secs,
            "renewals": lat.len(),
            "renewals_per_sec": lat.len() as f64 / secs,
            "ttl_nonpositive": ttl_nonpositive,
            "wrong_id": wrong_id,
            "errors": errors.count(),
            "first_error": errors.first(),
        }),
        latency_json("", &lat),
    ))
}

/// Runs `op` once for every item of `items` with `clients` tasks (task `i` on
/// connection `i mod K`), each taking the next item from the shared list until none is
/// left. `op` answers whether the item counted (`Ok(false)`: skipped, e.g. a lease
/// already gone). Returns the latencies of the counted ops, how many were skipped, and
/// the time from the first request to the last answer.
async fn for_each<F, Fut>(
    conns: &[Client],
    clients: usize,
    items: Arc<Vec<i64>>,
    errors: Arc<Errors>,
    op: F,
) -> Result<(Vec<Duration>, u64, f64)>
where
    F: Fn(Client, i64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<bool, etcd_client::Error>> + Send + 'static,
{
    let next = Arc::new(AtomicUsize::new(0));
    let skipped = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for i in 0..clients {
        let c = conns[i % conns.len()].clone();
        let (items, errors, next, skipped, op) = (
            items.clone(),
            errors.clone(),
            next.clone(),
            skipped.clone(),
            op.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while let Some(&item) = items.get(next.fetch_add(1, Ordering::Relaxed)) {
                let t = Instant::now();
                match op(c.clone(), item).await {
                    Ok(true) => lat.push(t.elapsed()),
                    Ok(false) => {
                        skipped.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => errors.record(e),
                }
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await?);
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    Ok((lat, skipped.load(Ordering::Relaxed), secs))
}

async fn grant_revoke(o: &Opts, run: &str) -> Result<serde_json::Value> {
    let conns = open_conns(o).await?;
    let ttl = o.ttl;

    // 1. Grants for S seconds.
    let grant_errors = Arc::new(Errors::default());
    let (per_client, grant_secs) = run_for(o.clients, o.seconds, |i, stop| {
        let mut lc = conns[i % conns.len()].lease_client();
        let errors = grant_errors.clone();
        async move {
            let (mut lat, mut ids, mut ttl_mismatch) = (Vec::new(), Vec::new(), 0u64);
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match lc.grant(ttl, None).await {
                    Ok(r) if !r.error().is_empty() => errors.record(r.error()),
                    Ok(r) => {
                        lat.push(t.elapsed());
                        ids.push(r.id());
                        ttl_mismatch += u64::from(r.ttl() != ttl);
                    }
                    Err(e) => errors.record(e),
                }
            }
            (lat, ids, ttl_mismatch)
        }
    })
    .await?;
    let (mut grant_lat, mut ids, mut ttl_mismatch) = (Vec::new(), Vec::new(), 0);
    for (mut l, mut i, m) in per_client {
        grant_lat.append(&mut l);
        ids.append(&mut i);
        ttl_mismatch += m;
    }
    grant_lat.sort_unstable();
    if ids.is_empty() {
        bail!(
            "no lease granted in {grant_secs:.1} s; first error: {:?}",
            grant_errors.first()
        );
    }
    let ids = Arc::new(ids);

    // 2. One key per lease (--keys), not measured.
    let key_prefix = format!("{}{run}/", o.prefix);
    let attach_errors = Arc::new(Errors::default());
    let mut attach_secs = 0.0;
    if o.keys {
        let p = key_prefix.clone();
        let (_, _, secs) = for_each(
            &conns,
            o.clients,
            ids.clone(),
            attach_errors.clone(),
            move |mut c, id| {
                let key = format!("{p}{id:016x}");
                async move {
                    c.put(key, "x", Some(PutOptions::new().with_lease(id)))
                        .await
                        .map(|_| true)
                }
            },
        )
        .await?;
        attach_secs = secs;
    }

    // 3. Revoke every lease.
    let revoke_errors = Arc::new(Errors::default());
    let (revoke_lat, not_found, revoke_secs) = for_each(
        &conns,
        o.clients,
        ids.clone(),
        revoke_errors.clone(),
        |c, id| async move {
            match c.lease_client().revoke(id).await {
                Ok(_) => Ok(true),
                Err(e) if e.to_string().contains("lease not found") => Ok(false),
                Err(e) => Err(e),
            }
        },
    )
    .await?;

    // 4. What is left.
    let mut c = conns[0].clone();
    let keys_left = if o.keys {
        let opts = GetOptions::new().with_prefix().with_count_only();
        Some(c.get(key_prefix, Some(opts)).await?.count())
    } else {
        None
    };
    let mine: HashSet<i64> = ids.iter().copied().collect();
    let leases_left = c
        .lease_client()
        .leases()
        .await?
        .leases()
        .iter()
        .filter(|l| mine.contains(&l.id()))
        .count();

    let first_error = [&grant_errors, &attach_errors, &revoke_errors]
        .iter()
        .find_map(|e| e.first());
    Ok(merge(
        merge(
            json!({
                "mode": "grant-revoke",
                "endpoints": o.endpoints.len(),
                "clients": o.clients,
                "conns": conns.len(),
                "ttl": ttl,
                "keys": o.keys,
                "grant_secs": grant_secs,
                "grants": grant_lat.len(),
                "grants_per_sec": grant_lat.len() as f64 / grant_secs,
                "grant_ttl_mismatch": ttl_mismatch,
                "grant_errors": grant_errors.count(),
                "attach_secs": attach_secs,
                "attach_errors": attach_errors.count(),
                "revoke_secs": revoke_secs,
                "revokes": revoke_lat.len(),
                "revokes_per_sec": revoke_lat.len() as f64 / revoke_secs,
                "revoke_not_found": not_found,
                "revoke_errors": revoke_errors.count(),
                "keys_left": keys_left,
                "leases_left": leases_left,
                "first_error": first_error,
            }),
            latency_json("grant_", &grant_lat),
        ),
        latency_json("revoke_", &revoke_lat),
    ))
}

#[tokio::main]
async fn main() -> Result<()> {
    let o = parse()?;
    let run = concord_integration::run_id();
    let out = match o.mode {
        Mode::Probe => {
            let start = Instant::now();
            probe_writes(&o.endpoints, &format!("{}probe", o.prefix), o.deadline).await?;
            json!({"mode": "probe", "ready_secs": start.elapsed().as_secs_f64()})
        }
        Mode::KeepAlive => keepalive(&o).await?,
        Mode::GrantRevoke => grant_revoke(&o, &run).await?,
    };
    println!("{out}");
    Ok(())
}
