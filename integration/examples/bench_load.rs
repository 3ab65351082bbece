//! Load generator for `bench/`: puts N keys with C concurrent clients, or (with
//! `--probe`) waits until a server answers a read and prints how long that took.
//!
//! `bench_load --endpoint URL [--keys N] [--clients C] [--value-size V] [--prefix P]`
//! `bench_load --endpoint URL --probe [--deadline-secs S]`
//! `bench_load --endpoint URL --verify --keys N [--prefix P]` (fails unless N keys exist)

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

struct Opts {
    endpoint: String,
    keys: u64,
    clients: usize,
    value_size: usize,
    prefix: String,
    probe: bool,
    verify: bool,
    deadline: Duration,
}

fn parse() -> Result<Opts> {
    let mut o = Opts {
        endpoint: "http://127.0.0.1:2379".into(),
        keys: 1_000_000,
        clients: 64,
        value_size: 256,
        prefix: "bench/".into(),
        probe: false,
        verify: false,
        deadline: Duration::from_secs(300),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--endpoint" => o.endpoint = val()?,
            "--keys" => o.keys = val()?.parse()?,
            "--clients" => o.clients = val()?.parse()?,
            "--value-size" => o.value_size = val()?.parse()?,
            "--prefix" => o.prefix = val()?,
            "--deadline-secs" => o.deadline = Duration::from_secs(val()?.parse()?),
            "--probe" => o.probe = true,
            "--verify" => o.verify = true,
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(o)
}

/// Incompressible bytes, different for every key (xorshift64*), so no store gains
/// from compressing the benchmark's own filler.
fn value_for(key: u64, len: usize) -> Vec<u8> {
    let mut x = key.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

#[tokio::main]
async fn main() -> Result<()> {
    let o = parse()?;
    if o.probe {
        let start = Instant::now();
        concord_integration::wait_answering(&o.endpoint, o.deadline).await?;
        println!("ready_secs {:.3}", start.elapsed().as_secs_f64());
        return Ok(());
    }
    if o.verify {
        let mut c = concord_integration::connect(&o.endpoint).await?;
        let opts = etcd_client::GetOptions::new()
            .with_prefix()
            .with_count_only();
        let n = c.get(o.prefix.as_str(), Some(opts)).await?.count();
        println!("count {n}");
        if n as u64 != o.keys {
            bail!("expected {} keys under {:?}, found {n}", o.keys, o.prefix);
        }
        return Ok(());
    }
    let next = Arc::new(AtomicU64::new(0));
    let value_size = o.value_size;
    // A few connections, many streams each: how a real client fleet looks to a server.
    let mut conns = Vec::new();
    for _ in 0..o.clients.clamp(1, 8) {
        conns.push(concord_integration::connect(&o.endpoint).await?);
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    let mut latencies_total = Vec::new();
    for i in 0..o.clients {
        let mut c = conns[i % conns.len()].clone();
        let (next, prefix, keys) = (next.clone(), o.prefix.clone(), o.keys);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= keys {
                    return Ok::<_, anyhow::Error>(lat);
                }
                let t = Instant::now();
                c.put(format!("{prefix}{k:010}"), value_for(k, value_size), None)
                    .await?;
                lat.push(t.elapsed());
            }
        }));
    }
    for t in tasks {
        latencies_total.extend(t.await??);
    }
    let secs = start.elapsed().as_secs_f64();
    latencies_total.sort();
    let pct = |p: f64| {
        let i = ((latencies_total.len() as f64 - 1.0) * p) as usize;
        latencies_total
            .get(i)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "keys {} secs {:.2} puts_per_sec {:.0} p50_ms {:.2} p99_ms {:.2}",
        o.keys,
        secs,
        o.keys as f64 / secs,
        pct(0.50),
        pct(0.99)
    );
    Ok(())
}
