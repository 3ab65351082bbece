//! Cluster benchmark client for `bench/cluster.sh`: the same client against a 3-node
//! Concord and a 3-node etcd. Prints one JSON line of results.
//!
//! `bench_cluster --endpoints A,B,C --mode probe [--deadline-secs S]`
//!   waits until a put through every endpoint succeeds (the cluster has a leader and
//!   every member forwards or serves writes).
//! `bench_cluster --endpoints A,B,C --mode latency [--ops N]`
//!   one client, N sequential puts to the leader (found with `Status`, as etcd's
//!   benchmark docs measure latency); reports p50/p99 in ms.
//! `bench_cluster --endpoints A,B,C --mode throughput [--clients C] [--seconds S] [--conns K]`
//!   C concurrent client tasks sharing K connections (default 48) spread round-robin
//!   over every endpoint (etcd's `benchmark` tool also multiplexes its clients over a
//!   few connections), each putting as fast as it can for S seconds; reports puts/s,
//!   p50/p99.
//!
//! Common: `--value-size V` (default 256, incompressible bytes), `--prefix P` (keys are
//! `P<run>/<client>/<n>`, unique across runs).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use concord_integration::bench::{Errors, mean_ms, pct_ms, probe_writes, run_for};
use concord_integration::connect;
use serde_json::json;

#[derive(Debug, PartialEq, Eq)]
enum Mode {
    Probe,
    Latency,
    Throughput,
}

struct Opts {
    endpoints: Vec<String>,
    mode: Mode,
    ops: u64,
    clients: usize,
    conns: usize,
    seconds: f64,
    value_size: usize,
    prefix: String,
    deadline: Duration,
}

fn parse() -> Result<Opts> {
    let mut o = Opts {
        endpoints: Vec::new(),
        mode: Mode::Latency,
        ops: 2000,
        clients: 1000,
        conns: 48,
        seconds: 10.0,
        value_size: 256,
        prefix: "bench-cluster/".into(),
        deadline: Duration::from_secs(60),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--endpoints" => {
                o.endpoints = val()?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect();
            }
            "--mode" => {
                o.mode = match val()?.as_str() {
                    "probe" => Mode::Probe,
                    "latency" => Mode::Latency,
                    "throughput" => Mode::Throughput,
                    other => bail!("--mode must be probe, latency or throughput, not {other}"),
                }
            }
            "--ops" => o.ops = val()?.parse()?,
            "--clients" => o.clients = val()?.parse()?,
            "--conns" => o.conns = val()?.parse()?,
            "--seconds" => o.seconds = val()?.parse()?,
            "--value-size" => o.value_size = val()?.parse()?,
            "--prefix" => o.prefix = val()?,
            "--deadline-secs" => o.deadline = Duration::from_secs(val()?.parse()?),
            other => bail!("unknown argument {other}"),
        }
    }
    if o.endpoints.is_empty() {
        bail!("--endpoints A,B,C is required");
    }
    if o.clients == 0 || o.conns == 0 || o.ops == 0 {
        bail!("--clients, --conns and --ops must be positive");
    }
    Ok(o)
}

/// Incompressible bytes, different for every (client, n) (xorshift64*), as in
/// `bench_load`.
fn value_for(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

/// The endpoint of the member every answering member names as leader.
async fn leader_endpoint(endpoints: &[String]) -> Result<String> {
    let mut ids = Vec::new();
    let mut leader = None;
    for e in endpoints {
        let s = connect(e).await?.maintenance_client().status().await?;
        let id = s.header().context("status without header")?.member_id();
        ids.push((id, e.clone()));
        match leader {
            None => leader = Some(s.leader()),
            Some(l) if l == s.leader() => {}
            Some(l) => bail!("members disagree on the leader: {l:x} vs {:x}", s.leader()),
        }
    }
    let leader = leader.context("no endpoints")?;
    ids.into_iter()
        .find(|(id, _)| *id == leader)
        .map(|(_, e)| e)
        .with_context(|| format!("leader {leader:x} is not among the endpoints"))
}

async fn probe(o: &Opts) -> Result<serde_json::Value> {
    let start = Instant::now();
    probe_writes(&o.endpoints, &format!("{}probe", o.prefix), o.deadline).await?;
    // Writes through every member succeed, but a leader that just won may still be
    // settling; agreeing on one is what the latency mode needs.
    concord_integration::wait_until(
        o.deadline.saturating_sub(start.elapsed()),
        "a leader agreed by every member",
        || async { leader_endpoint(&o.endpoints).await.map(drop) },
    )
    .await?;
    Ok(json!({"mode": "probe", "ready_secs": start.elapsed().as_secs_f64()}))
}

async fn latency(o: &Opts, run: &str) -> Result<serde_json::Value> {
    let leader = leader_endpoint(&o.endpoints).await?;
    let mut c = connect(&leader).await?;
    // Warm the connection (and the server's code paths) up; not measured.
    for n in 0..20u64 {
        c.put(
            format!("{}{run}/warm/{n}", o.prefix),
            value_for(n, o.value_size),
            None,
        )
        .await?;
    }
    let mut lat = Vec::with_capacity(o.ops as usize);
    let start = Instant::now();
    for n in 0..o.ops {
        let key = format!("{}{run}/0/{n:08}", o.prefix);
        let value = value_for(n, o.value_size);
        let t = Instant::now();
        c.put(key, value, None).await?;
        lat.push(t.elapsed());
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort();
    Ok(json!({
        "mode": "latency",
        "endpoint": leader,
        "ops": o.ops,
        "value_size": o.value_size,
        "secs": secs,
        "p50_ms": pct_ms(&lat, 0.50),
        "p99_ms": pct_ms(&lat, 0.99),
        "mean_ms": mean_ms(&lat),
        "max_ms": pct_ms(&lat, 1.0),
    }))
}

async fn throughput(o: &Opts, run: &str) -> Result<serde_json::Value> {
    let mut conns = Vec::with_capacity(o.conns);
    for i in 0..o.conns {
        conns.push(connect(&o.endpoints[i % o.endpoints.len()]).await?);
    }
    let errors = Arc::new(Errors::default());
    // Puts still in flight when the window closes are counted: the window is measured
    // up to the last answer.
    let (lats, secs) = run_for(o.clients, o.seconds, |i, stop| {
        let mut c = conns[i % conns.len()].clone();
        let errors = errors.clone();
        let (prefix, value_size) = (format!("{}{run}/{i}/", o.prefix), o.value_size);
        async move {
            let mut lat = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let value = value_for(((i as u64) << 32) | n, value_size);
                let t = Instant::now();
                match c.put(format!("{prefix}{n:08}"), value, None).await {
                    Ok(_) => lat.push(t.elapsed()),
                    Err(e) => errors.record(e),
                }
                n += 1;
            }
            lat
        }
    })
    .await?;
    let mut lat: Vec<Duration> = lats.into_iter().flatten().collect();
    lat.sort();
    Ok(json!({
        "mode": "throughput",
        "clients": o.clients,
        "conns": o.conns,
        "endpoints": o.endpoints.len(),
        "value_size": o.value_size,
        "secs": secs,
        "puts": lat.len(),
        "puts_per_sec": lat.len() as f64 / secs,
        "p50_ms": pct_ms(&lat, 0.50),
        "p99_ms": pct_ms(&lat, 0.99),
        "mean_ms": mean_ms(&lat),
        "errors": errors.count(),
        "first_error": errors.first(),
    }))
}

#[tokio::main]
async fn main() -> Result<()> {
    let o = parse()?;
    let run = concord_integration::run_id();
    let out = match o.mode {
        Mode::Probe => probe(&o).await?,
        Mode::Latency => latency(&o, &run).await?,
        Mode::Throughput => throughput(&o, &run).await?,
    };
    println!("{out}");
    Ok(())
}
