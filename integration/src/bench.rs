//! Pieces shared by the benchmark clients in `examples/` (`bench_cluster`,
//! `bench_lease`, `bench_watch`): parsing options, connecting, waiting for a server to
//! take writes, latency percentiles and an error tally for many client tasks.
//!
//! Not: used by the tests; nothing here measures or asserts a figure by itself.

use std::collections::{HashMap, HashSet};
use std::fmt::Display;
use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use etcd_client::{Client, ConnectOptions, GetOptions};

/// Latency percentile `p` (0.0..=1.0) in ms of `sorted` (ascending); 0 when empty.
/// Nearest rank, so p99 of 200 samples is the second-worst.
pub fn pct_ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// Mean latency in ms; 0 when empty.
pub fn mean_ms(v: &[Duration]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.iter().map(Duration::as_secs_f64).sum::<f64>() * 1000.0 / v.len() as f64
}

/// Failed requests of a run: how many, and the first one's message (shared by every
/// client task of the run).
#[derive(Debug, Default)]
pub struct Errors {
    count: AtomicU64,
    first: Mutex<Option<String>>,
}

impl Errors {
    pub fn record(&self, e: impl Display) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut f = self.first.lock().unwrap_or_else(|e| e.into_inner());
        f.get_or_insert_with(|| e.to_string());
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn first(&self) -> Option<String> {
        self.first.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Connects an `etcd-client` with a 2 s connect timeout and, if given, a per-request
/// timeout (leave it out for connections that carry long-lived streams).
pub async fn connect_with(endpoint: &str, timeout: Option<Duration>) -> Result<Client> {
    let mut opts = ConnectOptions::new().with_connect_timeout(Duration::from_secs(2));
    if let Some(t) = timeout {
        opts = opts.with_timeout(t);
    }
    Ok(Client::connect([endpoint], Some(opts)).await?)
}

/// Waits (within `deadline` in all) until a put of `key` and a serializable read of it
/// through every endpoint succeed: each member is up and writes through it commit.
pub async fn probe_writes(endpoints: &[String], key: &str, deadline: Duration) -> Result<()> {
    let start = Instant::now();
    for e in endpoints {
        crate::wait_until(deadline.saturating_sub(start.elapsed()), e, || async move {
            let mut c = crate::connect(e).await?;
            c.put(key, "x", None).await?;
            c.get(key, Some(GetOptions::new().with_serializable()))
                .await?;
            Ok(())
        })
        .await?;
    }
    Ok(())
}

/// A bench client's command line: `--name value` options and bare `--flag`s, every
/// name checked against the ones the client knows.
#[derive(Debug, Default)]
pub struct Args {
    values: HashMap<String, String>,
    flags: HashSet<String>,
}

impl Args {
    /// Parses the process's arguments: names in `valued` take a value, names in `flags`
    /// none; anything else is an error.
    pub fn parse(valued: &[&str], flags: &[&str]) -> Result<Args> {
        Args::parse_from(std::env::args().skip(1), valued, flags)
    }

    pub fn parse_from(
        args: impl IntoIterator<Item = String>,
        valued: &[&str],
        flags: &[&str],
    ) -> Result<Args> {
        let mut out = Args::default();
        let mut args = args.into_iter();
        while let Some(a) = args.next() {
            if flags.contains(&a.as_str()) {
                out.flags.insert(a);
            } else if valued.contains(&a.as_str()) {
                let v = args.next().with_context(|| format!("{a} needs a value"))?;
                out.values.insert(a, v);
            } else {
                bail!("unknown argument {a}");
            }
        }
        Ok(out)
    }

    /// Whether the bare `--flag` was given.
    pub fn flag(&self, name: &str) -> bool {
        self.flags.contains(name)
    }

    /// The value of `name`, parsed, if given.
    pub fn opt<T>(&self, name: &str) -> Result<Option<T>>
    where
        T: FromStr,
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        self.values
            .get(name)
            .map(|v| v.parse().with_context(|| format!("{name} {v}")))
            .transpose()
    }

    /// The value of `name`, parsed, or `default`.
    pub fn get<T>(&self, name: &str, default: T) -> Result<T>
    where
        T: FromStr,
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        Ok(self.opt(name)?.unwrap_or(default))
    }

    /// A comma-separated value of `name` (empty parts dropped; empty if not given).
    pub fn list(&self, name: &str) -> Vec<String> {
        self.values
            .get(name)
            .map(|v| {
                v.split(',')
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Runs `clients` tasks together for `secs` seconds: task `i` is `task(i, stop)`, which
/// should loop until `stop` is set. Requests in flight when the time is up are waited
/// for: returns each task's result and the time from the start to the last task's end.
pub async fn run_for<T, F, Fut>(clients: usize, secs: f64, mut task: F) -> Result<(Vec<T>, f64)>
where
    F: FnMut(usize, Arc<AtomicBool>) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|i| tokio::spawn(task(i, stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut out = Vec::with_capacity(clients);
    for t in tasks {
        out.push(t.await?);
    }
    Ok((out, start.elapsed().as_secs_f64()))
}
