//! `concordctl`: Concord's ops CLI. Flags and output follow etcdctl's (API v3).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use concord_cli::{format, snapshot};

#[derive(Parser, Debug)]
#[command(
    name = "concordctl",
    version,
    about = "Concord's ops CLI (etcdctl-compatible)"
)]
struct Cli {
    /// gRPC endpoints (comma-separated).
    #[arg(long, global = true, default_value = "127.0.0.1:2379")]
    endpoints: String,
    /// Timeout of a command that talks to a server, in seconds (etcdctl: 5s).
    #[arg(long, global = true, default_value = "5s", value_parser = parse_duration)]
    command_timeout: Duration,
    /// Output format.
    #[arg(short = 'w', long, global = true, value_enum, default_value = "simple")]
    write_out: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Simple,
    Json,
    Table,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Manages snapshots of a member's store.
    Snapshot {
        #[command(subcommand)]
        command: SnapshotCommand,
    },
}

#[derive(Subcommand, Debug)]
enum SnapshotCommand {
    /// Stores a member's snapshot in a file.
    Save { file: PathBuf },
    /// Prints a snapshot file's hash, revision, total keys and size.
    Status { file: PathBuf },
    /// Builds a new member's data directory from a snapshot file (offline).
    Restore {
        file: PathBuf,
        /// Where to create the member's data (default: `<name>.etcd`, as etcdctl).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long, default_value = "default")]
        name: String,
        #[arg(long, default_value = "default=http://localhost:2380")]
        initial_cluster: String,
        #[arg(long, default_value = "etcd-cluster")]
        initial_cluster_token: String,
        #[arg(long, default_value = "http://localhost:2380")]
        initial_advertise_peer_urls: String,
        /// Restore even if the file's SHA-256 is missing or does not match.
        #[arg(long)]
        skip_hash_check: bool,
    },
}

/// `5s`, `500ms`, `1m`, or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {s:?}");
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let v: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(bad()),
    };
    Ok(Duration::from_secs_f64(secs))
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("Error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Snapshot { command } => match command {
            SnapshotCommand::Save { file } => {
                let endpoints: Vec<&str> = cli
                    .endpoints
                    .split(',')
                    .map(str::trim)
                    .filter(|e| !e.is_empty())
                    .collect();
                if endpoints.len() != 1 {
                    bail!(
                        "snapshot must be requested to one selected node, not multiple {endpoints:?}"
                    );
                }
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(snapshot::save(endpoints[0], &file, cli.command_timeout))?;
                println!("Snapshot saved at {}", file.display());
            }
            SnapshotCommand::Status { file } => {
                let s = snapshot::status(&file)?;
                match cli.write_out {
                    Output::Simple => println!("{}", format::status_simple(&s)),
                    Output::Json => println!("{}", format::status_json(&s)),
                    Output::Table => print!("{}", format::status_table(&s)),
                }
            }
            SnapshotCommand::Restore {
                file,
                data_dir,
                name,
                initial_cluster,
                initial_cluster_token,
                initial_advertise_peer_urls,
                skip_hash_check,
            } => {
                let data_dir = data_dir.unwrap_or_else(|| PathBuf::from(format!("{name}.etcd")));
                let o = snapshot::RestoreOptions {
                    snapshot: file,
                    data_dir,
                    name,
                    initial_cluster,
                    initial_cluster_token,
                    initial_advertise_peer_urls,
                    skip_hash_check,
                };
                let r = snapshot::restore(&o)?;
                println!(
                    "Restored snapshot {} (revision {}, {} records, {} server records) into {}",
                    o.snapshot.display(),
                    r.revision,
                    r.records,
                    r.aux,
                    o.data_dir.display()
                );
                println!(
                    "Start it with: concord --name {} --data-dir {} --initial-cluster {} \
                     --initial-cluster-token {} --initial-advertise-peer-urls {} \
                     --initial-cluster-state new",
                    o.name,
                    o.data_dir.display(),
                    o.initial_cluster,
                    o.initial_cluster_token,
                    o.initial_advertise_peer_urls
                );
            }
        },
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_etcdctl_flags() {
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn flags_parse() {
        let c = Cli::try_parse_from([
            "concordctl",
            "--endpoints",
            "http://127.0.0.1:1",
            "snapshot",
            "status",
            "f.db",
            "-w",
            "json",
        ])
        .unwrap();
        assert!(matches!(c.write_out, Output::Json));
        assert!(matches!(
            c.command,
            Command::Snapshot {
                command: SnapshotCommand::Status { .. }
            }
        ));
    }
}
