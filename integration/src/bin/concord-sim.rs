//! `concord-sim`: seeded scenarios of whole members in one process (the simulation
//! tier, see `concord_integration::sim`).
//!
//! ```text
//! concord-sim --seeds N [--base B] [--jobs J] [--secs S] [--faults Kind,...]
//!             [--plant BUG] [--until-violation] [--keep-failed]
//! concord-sim --seed S            # replays one scenario
//! ```
//!
//! Prints a line per scenario, every failing seed with how to replay it, a coverage
//! summary, and last exactly `N seeds, V violations`. Exits 1 when V > 0.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use concord_integration::sim::{self, FaultKind, Options};

fn main() -> Result<()> {
    // Members log (to stderr) only when asked: RUST_LOG=info, or a finer filter.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let mut args = std::env::args().skip(1);
    let mut seeds: Option<u64> = None;
    let mut one: Option<u64> = None;
    let mut base: Option<u64> = None;
    let mut jobs = 3usize;
    let mut until_violation = false;
    let mut opts = Options::default();
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--seeds" => seeds = Some(value()?.parse()?),
            "--seed" => one = Some(value()?.parse()?),
            "--base" => base = Some(value()?.parse()?),
            "--jobs" => jobs = value()?.parse()?,
            "--secs" => opts.secs = value()?.parse()?,
            "--clients" => opts.clients = value()?.parse()?,
            "--faults" => {
                for name in value()?.split(',') {
                    opts.kinds.push(
                        FaultKind::parse(name)
                            .with_context(|| format!("unknown fault kind {name:?}"))?,
                    );
                }
            }
            "--plant" => opts.plant = Some(value()?),
            "--until-violation" => until_violation = true,
            "--keep-failed" => opts.keep_failed = true,
            "-h" | "--help" => {
                println!(
                    "concord-sim --seeds N [--base B] [--jobs J] [--secs S] [--clients C] \
                     [--faults Kind,...] [--plant BUG] [--until-violation] [--keep-failed] | \
                     --seed S\nfault kinds: {:?}\nplanted bugs: {:?}",
                    FaultKind::ALL,
                    concord_storage::failpoints::PLANTED_BUGS
                );
                return Ok(());
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    if let Some(bug) = &opts.plant {
        sim::plant(bug)?;
    }
    let list: Vec<u64> = match (one, seeds) {
        (Some(s), _) => vec![s],
        (None, Some(n)) => {
            let base = base.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
            println!("sim: base seed {base} (--base {base} repeats this run)");
            (0..n).map(|i| sim::scenario_seed(base, i)).collect()
        }
        (None, None) => bail!("give --seeds N or --seed S (see --help)"),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?;
    let started = Instant::now();
    let summary = runtime.block_on(sim::run_many(list, jobs, opts, until_violation));
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    println!(
        "sim: {:.1} seeds/minute; {} requests ({} known), {} watch events checked; \
         cluster sizes {:?}; faults by kind {:?}",
        summary.seeds as f64 / minutes.max(1e-9),
        summary.ops,
        summary.known,
        summary.watch_events,
        summary.by_size,
        summary.by_kind
    );
    if !summary.failed.is_empty() {
        println!("sim: failing seeds: {:?}", summary.failed);
    }
    println!("{} seeds, {} violations", summary.seeds, summary.violations);
    runtime.shutdown_background();
    if summary.violations > 0 {
        std::process::exit(1);
    }
    Ok(())
}
