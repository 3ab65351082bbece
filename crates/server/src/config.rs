//! Node configuration: etcd's flag names, a TOML config file, `CONCORD_*` environment
//! variables, and etcd's defaults. Precedence: flag, environment, file, default.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use clap::Parser;
use serde::Deserialize;

/// `concord` command line. Every flag can also come from the config file (the same
/// name with `_` for `-`) or from `CONCORD_<NAME>` in the environment.
#[derive(Debug, Clone, Parser, Default)]
#[command(
    name = "concord",
    version,
    about = "Concord: a coordination service speaking the etcd v3 API"
)]
pub struct Args {
    /// TOML file with any of the settings below.
    #[arg(long)]
    pub config_file: Option<PathBuf>,
    /// Human-readable name of this member.
    #[arg(long)]
    pub name: Option<String>,
    /// Where this member keeps its data (default: `<name>.concord`).
    #[arg(long)]
    pub data_dir: Option<String>,
    /// Comma-separated URLs to serve clients on (gRPC and HTTP on the same port).
    #[arg(long)]
    pub listen_client_urls: Option<String>,
    /// Comma-separated client URLs advertised to the cluster.
    #[arg(long)]
    pub advertise_client_urls: Option<String>,
    /// Comma-separated URLs to listen on for peer traffic.
    #[arg(long)]
    pub listen_peer_urls: Option<String>,
    /// Comma-separated peer URLs advertised to the cluster.
    #[arg(long)]
    pub initial_advertise_peer_urls: Option<String>,
    /// Initial cluster configuration, `name=peer-url,...`.
    #[arg(long)]
    pub initial_cluster: Option<String>,
    /// `new` or `existing`.
    #[arg(long)]
    pub initial_cluster_state: Option<String>,
    /// Token that tells clusters apart when ids are derived.
    #[arg(long)]
    pub initial_cluster_token: Option<String>,
    /// Largest write request accepted, in bytes.
    #[arg(long)]
    pub max_request_bytes: Option<usize>,
    /// Most operations in one txn.
    #[arg(long)]
    pub max_txn_ops: Option<usize>,
    /// Raft heartbeat interval in milliseconds.
    #[arg(long)]
    pub heartbeat_interval: Option<u64>,
    /// Raft election timeout in milliseconds.
    #[arg(long)]
    pub election_timeout: Option<u64>,
    /// Applied entries between snapshots.
    #[arg(long)]
    pub snapshot_count: Option<u64>,
    /// Entries kept behind a snapshot so slow followers catch up from the log.
    #[arg(long = "experimental-snapshot-catchup-entries")]
    pub snapshot_catchup_entries: Option<u64>,
    /// Backend size quota in bytes, reported as etcd's `dbSizeQuota`.
    #[arg(long)]
    pub quota_backend_bytes: Option<i64>,
    /// Log filter (`info`, `debug`, or a `tracing` filter); `RUST_LOG` wins.
    #[arg(long)]
    pub log_level: Option<String>,
    /// How often watchers that asked for progress notifications get one when idle, as
    /// a Go duration (`10m`, `5s`, `500ms`). etcd 3.4's name has `experimental-`.
    #[arg(long, alias = "experimental-watch-progress-notify-interval")]
    pub watch_progress_notify_interval: Option<String>,
    /// How often the leader records the remaining TTL of leases in the log, as a Go
    /// duration: a dead client's lease outlives a leader change by at most about this.
    #[arg(long, alias = "experimental-lease-checkpoint-interval")]
    pub lease_checkpoint_interval: Option<String>,
    /// The leader promotes a learner to voter as soon as it has caught up (etcd needs
    /// `member promote`).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub auto_promote_learners: Option<bool>,
    /// Restart this member's data as a new one-member cluster, as etcd's flag: for a
    /// survivor when a quorum is lost for good. The other members are removed.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub force_new_cluster: Option<bool>,
    /// Auth tokens: `simple` (etcd's default), or
    /// `jwt,pub-key=PATH,priv-key=PATH,sign-method=RS256|ES256|EdDSA[,ttl=5m]`.
    #[arg(long)]
    pub auth_token: Option<String>,
    /// Seconds a simple token lives after its last use.
    #[arg(long)]
    pub auth_token_ttl: Option<u64>,
    /// bcrypt cost of the password hashes (4 to 31; etcd's default 10).
    #[arg(long)]
    pub bcrypt_cost: Option<u32>,
    // --- Observability ---
    /// `basic` or `extensive` (adds the gRPC handling-time histograms), as etcd.
    #[arg(long)]
    pub metrics: Option<String>,
    /// URLs serving only `/metrics` and `/health` (comma-separated; `https` ones use
    /// the client certificate).
    #[arg(long)]
    pub listen_metrics_urls: Option<String>,
    // --- TLS and listener hardening (etcd's flags) ---
    /// Client server TLS certificate file.
    #[arg(long)]
    pub cert_file: Option<String>,
    /// Client server TLS key file.
    #[arg(long)]
    pub key_file: Option<String>,
    /// Client server trusted CA bundle; as in etcd, giving one requires client certificates.
    #[arg(long)]
    pub trusted_ca_file: Option<String>,
    /// Require client certificates.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub client_cert_auth: Option<bool>,
    /// Client TLS with a generated self-signed certificate (<data-dir>/fixtures/client).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub auto_tls: Option<bool>,
    /// Client certificate revocation list (PEM).
    #[arg(long)]
    pub client_crl_file: Option<String>,
    /// Peer TLS certificate file (served, and presented to peers as a client certificate).
    #[arg(long)]
    pub peer_cert_file: Option<String>,
    /// Peer TLS key file.
    #[arg(long)]
    pub peer_key_file: Option<String>,
    /// Peer trusted CA bundle.
    #[arg(long)]
    pub peer_trusted_ca_file: Option<String>,
    /// Require client certificates from peers.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub peer_client_cert_auth: Option<bool>,
    /// Peer TLS with a generated self-signed certificate (<data-dir>/fixtures/peer).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub peer_auto_tls: Option<bool>,
    /// A peer's client certificate must have this common name.
    #[arg(long)]
    pub peer_cert_allowed_cn: Option<String>,
    /// Peer certificate revocation list (PEM).
    #[arg(long)]
    pub peer_crl_file: Option<String>,
    /// Comma-separated TLS 1.2 cipher suites, Go's names (empty: rustls' defaults).
    #[arg(long)]
    pub cipher_suites: Option<String>,
    /// Lowest TLS version offered: TLS1.2 (default) or TLS1.3.
    #[arg(long)]
    pub tls_min_version: Option<String>,
    /// Highest TLS version offered: TLS1.2 or TLS1.3 (default).
    #[arg(long)]
    pub tls_max_version: Option<String>,
    /// Streams one client connection may have open at once (default: unlimited).
    #[arg(long)]
    pub max_concurrent_streams: Option<u32>,
    /// A client pinging more often than this gets GOAWAY (Go duration, default 5s).
    #[arg(long)]
    pub grpc_keepalive_min_time: Option<String>,
    /// The server pings idle client connections this often (Go duration, default 2h).
    #[arg(long)]
    pub grpc_keepalive_interval: Option<String>,
    /// A server ping unanswered this long closes the connection (default 20s).
    #[arg(long)]
    pub grpc_keepalive_timeout: Option<String>,
    // --- end of TLS and listener hardening ---
    // --- Distributed tracing and log format (etcd 3.5's names; 3.6's as aliases) ---
    /// Export OpenTelemetry spans of requests, proposals, commits and applies.
    #[arg(
        long = "experimental-enable-distributed-tracing",
        alias = "enable-distributed-tracing",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub enable_distributed_tracing: Option<bool>,
    /// The OTLP/gRPC collector, `host:port` (default localhost:4317).
    #[arg(
        long = "experimental-distributed-tracing-address",
        alias = "distributed-tracing-address"
    )]
    pub distributed_tracing_address: Option<String>,
    /// `service.name` of the spans (default etcd); the same on every member.
    #[arg(
        long = "experimental-distributed-tracing-service-name",
        alias = "distributed-tracing-service-name"
    )]
    pub distributed_tracing_service_name: Option<String>,
    /// `service.instance.id` of the spans, unique per member (no default).
    #[arg(
        long = "experimental-distributed-tracing-instance-id",
        alias = "distributed-tracing-instance-id"
    )]
    pub distributed_tracing_instance_id: Option<String>,
    /// Requests without a sampled parent traced per million (default 0: only those
    /// whose caller's trace is sampled).
    #[arg(
        long = "experimental-distributed-tracing-sampling-rate",
        alias = "distributed-tracing-sampling-rate",
        allow_negative_numbers = true
    )]
    pub distributed_tracing_sampling_rate: Option<i64>,
    /// `text` (default; etcd's `console` is the same) or `json`: one JSON object per
    /// line with the event's fields.
    #[arg(long)]
    pub log_format: Option<String>,
}

/// Parses a Go `time.Duration` string: a sequence of decimal numbers with units
/// (`h`, `m`, `s`, `ms`, `us`, `µs`, `ns`), e.g. `1m30s` or `1.5s`.
pub fn parse_go_duration(s: &str) -> Option<std::time::Duration> {
    let mut rest = s.trim();
    if rest == "0" {
        return Some(std::time::Duration::ZERO);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += n * scale;
    }
    Some(std::time::Duration::from_secs_f64(total))
}

/// Resolved settings.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub name: String,
    #[serde(default)]
    pub data_dir: String,
    pub listen_client_urls: String,
    pub advertise_client_urls: String,
    pub listen_peer_urls: String,
    pub initial_advertise_peer_urls: String,
    #[serde(default)]
    pub initial_cluster: String,
    pub initial_cluster_state: String,
    pub initial_cluster_token: String,
    pub max_request_bytes: usize,
    pub max_txn_ops: usize,
    pub heartbeat_interval: u64,
    pub election_timeout: u64,
    pub snapshot_count: u64,
    pub snapshot_catchup_entries: u64,
    pub quota_backend_bytes: i64,
    pub log_level: String,
    pub watch_progress_notify_interval: String,
    pub lease_checkpoint_interval: String,
    pub auto_promote_learners: bool,
    pub force_new_cluster: bool,
    pub auth_token: String,
    pub auth_token_ttl: u64,
    pub bcrypt_cost: u32,
    pub metrics: String,
    pub listen_metrics_urls: String,
    // --- TLS and listener hardening ---
    pub cert_file: String,
    pub key_file: String,
    pub trusted_ca_file: String,
    pub client_cert_auth: bool,
    pub auto_tls: bool,
    pub client_crl_file: String,
    pub peer_cert_file: String,
    pub peer_key_file: String,
    pub peer_trusted_ca_file: String,
    pub peer_client_cert_auth: bool,
    pub peer_auto_tls: bool,
    pub peer_cert_allowed_cn: String,
    pub peer_crl_file: String,
    pub cipher_suites: String,
    pub tls_min_version: String,
    pub tls_max_version: String,
    pub max_concurrent_streams: u32,
    pub grpc_keepalive_min_time: String,
    pub grpc_keepalive_interval: String,
    pub grpc_keepalive_timeout: String,
    // --- end of TLS and listener hardening ---
    pub enable_distributed_tracing: bool,
    pub distributed_tracing_address: String,
    pub distributed_tracing_service_name: String,
    pub distributed_tracing_instance_id: String,
    pub distributed_tracing_sampling_rate: i64,
    pub log_format: String,
}

/// A duration flag's value, which must be a positive Go duration.
fn positive_duration(flag: &str, v: &str) -> Result<std::time::Duration, ConfigError> {
    parse_go_duration(v).filter(|d| !d.is_zero()).ok_or_else(|| {
        ConfigError::Invalid(format!(
            "invalid value {v:?} for --{flag}: use a positive duration such as 10m, 30s or 500ms"
        ))
    })
}

/// A configuration that cannot be used; the text says which setting and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Load(#[from] config::ConfigError),
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    pub fn load(args: &Args) -> Result<Config, ConfigError> {
        let mut b = config::Config::builder()
            .set_default("name", "default")?
            .set_default("listen_client_urls", "http://localhost:2379")?
            .set_default("advertise_client_urls", "http://localhost:2379")?
            .set_default("listen_peer_urls", "http://localhost:2380")?
            .set_default("initial_advertise_peer_urls", "http://localhost:2380")?
            .set_default("initial_cluster_state", "new")?
            .set_default("initial_cluster_token", "etcd-cluster")?
            .set_default("max_request_bytes", 1536 * 1024)?
            .set_default("max_txn_ops", 128)?
            .set_default("heartbeat_interval", 100)?
            .set_default("election_timeout", 1000)?
            .set_default("snapshot_count", 100_000)?
            .set_default("snapshot_catchup_entries", 5_000)?
            .set_default("quota_backend_bytes", 2i64 * 1024 * 1024 * 1024)?
            .set_default("log_level", "info")?
            .set_default("watch_progress_notify_interval", "10m")?
            .set_default("lease_checkpoint_interval", "1s")?
            .set_default("auto_promote_learners", false)?
            .set_default("force_new_cluster", false)?
            .set_default("auth_token", "simple")?
            .set_default("auth_token_ttl", 300)?
            .set_default("bcrypt_cost", crate::auth::DEFAULT_BCRYPT_COST)?
            .set_default("metrics", "basic")?
            .set_default("listen_metrics_urls", "")?;
        // TLS and listener hardening (etcd's defaults).
        for k in [
            "cert_file",
            "key_file",
            "trusted_ca_file",
            "client_crl_file",
            "peer_cert_file",
            "peer_key_file",
            "peer_trusted_ca_file",
            "peer_cert_allowed_cn",
            "peer_crl_file",
            "cipher_suites",
            "tls_min_version",
            "tls_max_version",
        ] {
            b = b.set_default(k, "")?;
        }
        for k in [
            "client_cert_auth",
            "auto_tls",
            "peer_client_cert_auth",
            "peer_auto_tls",
        ] {
            b = b.set_default(k, false)?;
        }
        b = b
            .set_default("max_concurrent_streams", u64::from(u32::MAX))?
            .set_default("grpc_keepalive_min_time", "5s")?
            .set_default("grpc_keepalive_interval", "2h")?
            .set_default("grpc_keepalive_timeout", "20s")?;
        // Distributed tracing and log format (etcd's defaults; text logs as before).
        b = b
            .set_default("enable_distributed_tracing", false)?
            .set_default("distributed_tracing_address", "localhost:4317")?
            .set_default("distributed_tracing_service_name", "etcd")?
            .set_default("distributed_tracing_instance_id", "")?
            .set_default("distributed_tracing_sampling_rate", 0)?
            .set_default("log_format", "text")?;
        if let Some(f) = &args.config_file {
            b = b.add_source(config::File::from(f.as_path()).format(config::FileFormat::Toml));
        }
        b = b.add_source(config::Environment::with_prefix("CONCORD").try_parsing(true));
        let a = args.clone();
        b = b
            .set_override_option("name", a.name)?
            .set_override_option("data_dir", a.data_dir)?
            .set_override_option("listen_client_urls", a.listen_client_urls)?
            .set_override_option("advertise_client_urls", a.advertise_client_urls)?
            .set_override_option("listen_peer_urls", a.listen_peer_urls)?
            .set_override_option("initial_advertise_peer_urls", a.initial_advertise_peer_urls)?
            .set_override_option("initial_cluster", a.initial_cluster)?
            .set_override_option("initial_cluster_state", a.initial_cluster_state)?
            .set_override_option("initial_cluster_token", a.initial_cluster_token)?
            .set_override_option("max_request_bytes", a.max_request_bytes.map(|v| v as u64))?
            .set_override_option("max_txn_ops", a.max_txn_ops.map(|v| v as u64))?
            .set_override_option("heartbeat_interval", a.heartbeat_interval)?
            .set_override_option("election_timeout", a.election_timeout)?
            .set_override_option("snapshot_count", a.snapshot_count)?
            .set_override_option("snapshot_catchup_entries", a.snapshot_catchup_entries)?
            .set_override_option("quota_backend_bytes", a.quota_backend_bytes)?
            .set_override_option("log_level", a.log_level)?
            .set_override_option(
                "watch_progress_notify_interval",
                a.watch_progress_notify_interval,
            )?
            .set_override_option("lease_checkpoint_interval", a.lease_checkpoint_interval)?
            .set_override_option("auto_promote_learners", a.auto_promote_learners)?
            .set_override_option("force_new_cluster", a.force_new_cluster)?
            .set_override_option("auth_token", a.auth_token)?
            .set_override_option("auth_token_ttl", a.auth_token_ttl)?
            .set_override_option("bcrypt_cost", a.bcrypt_cost)?
            .set_override_option("metrics", a.metrics)?
            .set_override_option("listen_metrics_urls", a.listen_metrics_urls)?
            // TLS and listener hardening.
            .set_override_option("cert_file", a.cert_file)?
            .set_override_option("key_file", a.key_file)?
            .set_override_option("trusted_ca_file", a.trusted_ca_file)?
            .set_override_option("client_cert_auth", a.client_cert_auth)?
            .set_override_option("auto_tls", a.auto_tls)?
            .set_override_option("client_crl_file", a.client_crl_file)?
            .set_override_option("peer_cert_file", a.peer_cert_file)?
            .set_override_option("peer_key_file", a.peer_key_file)?
            .set_override_option("peer_trusted_ca_file", a.peer_trusted_ca_file)?
            .set_override_option("peer_client_cert_auth", a.peer_client_cert_auth)?
            .set_override_option("peer_auto_tls", a.peer_auto_tls)?
            .set_override_option("peer_cert_allowed_cn", a.peer_cert_allowed_cn)?
            .set_override_option("peer_crl_file", a.peer_crl_file)?
            .set_override_option("cipher_suites", a.cipher_suites)?
            .set_override_option("tls_min_version", a.tls_min_version)?
            .set_override_option("tls_max_version", a.tls_max_version)?
            .set_override_option(
                "max_concurrent_streams",
                a.max_concurrent_streams.map(u64::from),
            )?
            .set_override_option("grpc_keepalive_min_time", a.grpc_keepalive_min_time)?
            .set_override_option("grpc_keepalive_interval", a.grpc_keepalive_interval)?
            .set_override_option("grpc_keepalive_timeout", a.grpc_keepalive_timeout)?;
        b = b
            .set_override_option("enable_distributed_tracing", a.enable_distributed_tracing)?
            .set_override_option("distributed_tracing_address", a.distributed_tracing_address)?
            .set_override_option(
                "distributed_tracing_service_name",
                a.distributed_tracing_service_name,
            )?
            .set_override_option(
                "distributed_tracing_instance_id",
                a.distributed_tracing_instance_id,
            )?
            .set_override_option(
                "distributed_tracing_sampling_rate",
                a.distributed_tracing_sampling_rate,
            )?
            .set_override_option("log_format", a.log_format)?;
        let mut c: Config = b.build()?.try_deserialize()?;
        if c.data_dir.is_empty() {
            c.data_dir = format!("{}.concord", c.name);
        }
        if c.initial_cluster.is_empty() {
            c.initial_cluster = format!("{}={}", c.name, c.initial_advertise_peer_urls);
        }
        c.validate()?;
        Ok(c)
    }

    /// `--watch-progress-notify-interval` as a duration.
    pub fn watch_progress_interval(&self) -> Result<std::time::Duration, ConfigError> {
        positive_duration(
            "watch-progress-notify-interval",
            &self.watch_progress_notify_interval,
        )
    }

    /// `--lease-checkpoint-interval` as a duration.
    pub fn lease_checkpoint_interval(&self) -> Result<std::time::Duration, ConfigError> {
        positive_duration("lease-checkpoint-interval", &self.lease_checkpoint_interval)
    }

    /// `--experimental-distributed-tracing-*`: the tracing settings, or `None` when
    /// tracing is off (the default). The sampling rate's bounds and texts are etcd's.
    pub fn tracing(&self) -> Result<Option<crate::trace::TracingOptions>, ConfigError> {
        let rate = self.distributed_tracing_sampling_rate;
        if rate < 0 {
            return Err(ConfigError::Invalid(
                "tracing sampling rate must be positive".into(),
            ));
        }
        let max = crate::trace::SAMPLES_PER_MILLION;
        if rate > i64::from(max) {
            return Err(ConfigError::Invalid(format!(
                "tracing sampling rate must be less than {max}"
            )));
        }
        let address = self.distributed_tracing_address.trim();
        let endpoint = match address.split_once("://") {
            None if !address.is_empty() => format!("http://{address}"),
            Some(("http", rest)) if !rest.is_empty() => address.to_string(),
            _ => {
                return Err(ConfigError::Invalid(format!(
                    "invalid value {address:?} for --experimental-distributed-tracing-address: \
                     use host:port (OTLP over gRPC without TLS, as etcd)"
                )));
            }
        };
        if !self.enable_distributed_tracing {
            return Ok(None);
        }
        let id = &self.distributed_tracing_instance_id;
        Ok(Some(crate::trace::TracingOptions {
            endpoint,
            service_name: self.distributed_tracing_service_name.clone(),
            instance_id: (!id.is_empty()).then(|| id.clone()),
            samples_per_million: rate as u32,
        }))
    }

    /// `--log-format`: whether log lines are JSON objects.
    pub fn json_logs(&self) -> Result<bool, ConfigError> {
        match self.log_format.as_str() {
            "text" | "console" => Ok(false),
            "json" => Ok(true),
            other => Err(ConfigError::Invalid(format!(
                "invalid value {other:?} for --log-format: use text or json"
            ))),
        }
    }

    /// How the auth store runs: `--auth-token`, `--auth-token-ttl`, `--bcrypt-cost`.
    pub fn auth_options(&self) -> Result<crate::auth::AuthOptions, ConfigError> {
        let (kind, opts) = self
            .auth_token
            .split_once(',')
            .unwrap_or((self.auth_token.as_str(), ""));
        let jwt = match kind {
            "simple" => None,
            "jwt" => Some(crate::auth::JwtOptions::parse(opts).map_err(|e| {
                ConfigError::Invalid(format!("invalid value for --auth-token jwt: {e}"))
            })?),
            other => {
                return Err(ConfigError::Invalid(format!(
                    "invalid value {other:?} for --auth-token: use simple or jwt,..."
                )));
            }
        };
        if self.auth_token_ttl == 0 {
            return Err(ConfigError::Invalid(
                "--auth-token-ttl must be positive".into(),
            ));
        }
        Ok(crate::auth::AuthOptions {
            token_ttl: std::time::Duration::from_secs(self.auth_token_ttl),
            bcrypt_cost: self.bcrypt_cost,
            jwt,
        })
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |s: String| Err(ConfigError::Invalid(s));
        self.watch_progress_interval()?;
        self.auth_options()?;
        self.lease_checkpoint_interval()?;
        self.grpc_keepalive()?;
        self.extensive_metrics()?;
        self.metrics_listen_urls()?;
        self.tracing()?;
        self.json_logs()?;
        if !matches!(self.initial_cluster_state.as_str(), "new" | "existing") {
            return bad(format!(
                "invalid value {:?} for --initial-cluster-state: use new or existing",
                self.initial_cluster_state
            ));
        }
        if self.max_txn_ops == 0 || self.max_request_bytes == 0 {
            return bad("--max-txn-ops and --max-request-bytes must be positive".into());
        }
        if self.election_timeout < 5 * self.heartbeat_interval {
            return bad(format!(
                "--election-timeout[{}ms] should be at least 5 times as --heartbeat-interval[{}ms]",
                self.election_timeout, self.heartbeat_interval
            ));
        }
        let members = self.initial_members()?;
        let mine: Vec<_> = members.iter().filter(|(n, _)| n == &self.name).collect();
        if mine.is_empty() {
            return bad(format!(
                "couldn't find local name {:?} in the initial cluster configuration",
                self.name
            ));
        }
        let mut advertised = split_urls(&self.initial_advertise_peer_urls);
        let mut listed: Vec<String> = mine.iter().map(|(_, u)| u.clone()).collect();
        advertised.sort();
        listed.sort();
        if advertised != listed {
            return bad(format!(
                "--initial-cluster has {}={} but missing from --initial-advertise-peer-urls={}",
                self.name,
                listed.join(","),
                self.initial_advertise_peer_urls
            ));
        }
        for u in split_urls(&self.listen_client_urls) {
            parse_url(&u)?;
        }
        for u in split_urls(&self.listen_peer_urls) {
            parse_url(&u)?;
        }
        if self.snapshot_count == 0 {
            return bad("--snapshot-count must be positive".into());
        }
        Ok(())
    }

    /// Members of `--initial-cluster` as `(name, peer urls)`, in order of first
    /// appearance; a name listed more than once has several URLs.
    pub fn initial_member_urls(&self) -> Result<Vec<(String, Vec<String>)>, ConfigError> {
        let mut out: Vec<(String, Vec<String>)> = Vec::new();
        for (name, url) in self.initial_members()? {
            match out.iter_mut().find(|(n, _)| *n == name) {
                Some((_, urls)) => urls.push(url),
                None => out.push((name, vec![url])),
            }
        }
        Ok(out)
    }

    /// Addresses to listen on for peers.
    pub fn peer_listen_addrs(&self) -> Result<Vec<SocketAddr>, ConfigError> {
        let mut out = Vec::new();
        for u in split_urls(&self.listen_peer_urls) {
            out.extend(parse_url(&u)?);
        }
        Ok(out)
    }

    /// `(name, peer url)` pairs of `--initial-cluster`.
    pub fn initial_members(&self) -> Result<Vec<(String, String)>, ConfigError> {
        split_urls(&self.initial_cluster)
            .into_iter()
            .map(|item| {
                item.split_once('=')
                    .map(|(n, u)| (n.trim().to_string(), u.trim().to_string()))
                    .ok_or_else(|| {
                        ConfigError::Invalid(format!(
                            "--initial-cluster entry {item:?} is not name=url"
                        ))
                    })
            })
            .collect()
    }

    /// Addresses to listen on for peers, each with whether it is `https`.
    pub fn peer_listen_urls(&self) -> Result<Vec<(SocketAddr, bool)>, ConfigError> {
        let mut out = Vec::new();
        for u in split_urls(&self.listen_peer_urls) {
            out.extend(parse_url(&u)?.into_iter().map(|a| (a, is_https(&u))));
        }
        Ok(out)
    }

    /// Addresses to serve clients on, each with whether it is `https`.
    pub fn client_listen_urls(&self) -> Result<Vec<(SocketAddr, bool)>, ConfigError> {
        let mut out = Vec::new();
        for u in split_urls(&self.listen_client_urls) {
            out.extend(parse_url(&u)?.into_iter().map(|a| (a, is_https(&u))));
        }
        Ok(out)
    }

    /// `--listen-metrics-urls` as addresses, each with whether it is `https`.
    pub fn metrics_listen_urls(&self) -> Result<Vec<(SocketAddr, bool)>, ConfigError> {
        let mut out = Vec::new();
        for u in split_urls(&self.listen_metrics_urls) {
            out.extend(parse_url(&u)?.into_iter().map(|a| (a, is_https(&u))));
        }
        Ok(out)
    }

    /// `--metrics`: whether the extensive set is asked for.
    pub fn extensive_metrics(&self) -> Result<bool, ConfigError> {
        match self.metrics.as_str() {
            "basic" => Ok(false),
            "extensive" => Ok(true),
            other => Err(ConfigError::Invalid(format!(
                "unknown --metrics {other:?} (want \"basic\" or \"extensive\")"
            ))),
        }
    }

    /// `--grpc-keepalive-min-time`, `-interval`, `-timeout` as durations.
    pub fn grpc_keepalive(
        &self,
    ) -> Result<
        (
            std::time::Duration,
            std::time::Duration,
            std::time::Duration,
        ),
        ConfigError,
    > {
        Ok((
            positive_duration("grpc-keepalive-min-time", &self.grpc_keepalive_min_time)?,
            positive_duration("grpc-keepalive-interval", &self.grpc_keepalive_interval)?,
            positive_duration("grpc-keepalive-timeout", &self.grpc_keepalive_timeout)?,
        ))
    }

    /// Addresses to serve clients on.
    pub fn client_listen_addrs(&self) -> Result<Vec<SocketAddr>, ConfigError> {
        let mut out = Vec::new();
        for u in split_urls(&self.listen_client_urls) {
            out.extend(parse_url(&u)?);
        }
        Ok(out)
    }
}

pub fn split_urls(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(String::from)
        .collect()
}

/// Whether a listen URL is `https://` (TLS).
pub fn is_https(u: &str) -> bool {
    u.starts_with("https://")
}

/// The host of a URL (`https://h:p` → `h`), for self-signed certificates.
pub fn url_host(u: &str) -> Option<String> {
    let rest = u.split_once("://")?.1.trim_end_matches('/');
    let (host, _) = rest.rsplit_once(':')?;
    Some(
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
    )
}

/// `http://host:port` or `https://host:port` to socket addresses.
fn parse_url(u: &str) -> Result<Vec<SocketAddr>, ConfigError> {
    let invalid = |why: &str| ConfigError::Invalid(format!("URL {u:?}: {why}"));
    let rest = u
        .strip_prefix("http://")
        .or_else(|| u.strip_prefix("https://"))
        .ok_or_else(|| invalid("only http:// and https:// URLs are supported"))?;
    let hostport = rest.trim_end_matches('/');
    let addrs: Vec<SocketAddr> = hostport
        .to_socket_addrs()
        .map_err(|e| invalid(&e.to_string()))?
        .collect();
    if addrs.is_empty() {
        return Err(invalid("resolves to no address"));
    }
    // `localhost` can resolve to both families; one listener per address family is
    // what etcd does with the first address.
    Ok(vec![addrs[0]])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(f: impl FnOnce(&mut Args)) -> Args {
        let mut a = Args::default();
        f(&mut a);
        a
    }

    #[test]
    fn etcd_defaults() {
        let c = Config::load(&Args::default()).unwrap();
        assert_eq!(c.name, "default");
        assert_eq!(c.data_dir, "default.concord");
        assert_eq!(c.initial_cluster, "default=http://localhost:2380");
        assert_eq!((c.heartbeat_interval, c.election_timeout), (100, 1000));
        assert_eq!((c.max_request_bytes, c.max_txn_ops), (1536 * 1024, 128));
    }

    #[test]
    fn watch_progress_interval_takes_go_durations() {
        let c = Config::load(&Args::default()).unwrap();
        assert_eq!(
            c.watch_progress_interval().unwrap(),
            std::time::Duration::from_secs(600)
        );
        let c = Config::load(&args(|a| {
            a.watch_progress_notify_interval = Some("1m30s".into())
        }))
        .unwrap();
        assert_eq!(
            c.watch_progress_interval().unwrap(),
            std::time::Duration::from_secs(90)
        );
        assert_eq!(
            parse_go_duration("1.5s"),
            Some(std::time::Duration::from_millis(1500))
        );
        assert_eq!(
            parse_go_duration("250ms"),
            Some(std::time::Duration::from_millis(250))
        );
        for bad in ["", "10", "5x", "0"] {
            let e = Config::load(&args(|a| {
                a.watch_progress_notify_interval = Some(bad.into())
            }));
            assert!(
                e.unwrap_err()
                    .to_string()
                    .contains("--watch-progress-notify-interval"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn flags_override_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "name = \"n1\"\nmax_txn_ops = 7\ninitial_cluster_token = \"t\"\n",
        )
        .unwrap();
        let c = Config::load(&args(|a| {
            a.config_file = Some(f.clone());
            a.max_txn_ops = Some(9);
        }))
        .unwrap();
        assert_eq!((c.name.as_str(), c.max_txn_ops), ("n1", 9));
        assert_eq!(c.initial_cluster_token, "t");
        assert_eq!(c.data_dir, "n1.concord");
    }

    #[test]
    fn distributed_tracing_flags() {
        // Off by default, with etcd's defaults for the rest.
        let c = Config::load(&Args::default()).unwrap();
        assert!(!c.enable_distributed_tracing);
        assert_eq!(c.distributed_tracing_address, "localhost:4317");
        assert_eq!(c.distributed_tracing_service_name, "etcd");
        assert_eq!(c.distributed_tracing_instance_id, "");
        assert_eq!(c.distributed_tracing_sampling_rate, 0);
        assert_eq!(c.tracing().unwrap(), None);
        // etcd 3.5's flag names.
        let a = Args::try_parse_from([
            "concord",
            "--experimental-enable-distributed-tracing",
            "--experimental-distributed-tracing-address",
            "127.0.0.1:4999",
            "--experimental-distributed-tracing-service-name",
            "kv",
            "--experimental-distributed-tracing-instance-id",
            "n1",
            "--experimental-distributed-tracing-sampling-rate",
            "1000000",
        ])
        .unwrap();
        let t = Config::load(&a).unwrap().tracing().unwrap().unwrap();
        assert_eq!(
            t,
            crate::trace::TracingOptions {
                endpoint: "http://127.0.0.1:4999".into(),
                service_name: "kv".into(),
                instance_id: Some("n1".into()),
                samples_per_million: 1_000_000,
            }
        );
        // etcd 3.6's names, `=true`, and a URL with its scheme.
        let a = Args::try_parse_from([
            "concord",
            "--enable-distributed-tracing=true",
            "--distributed-tracing-address=http://collector:4317",
            "--distributed-tracing-sampling-rate=100",
        ])
        .unwrap();
        let t = Config::load(&a).unwrap().tracing().unwrap().unwrap();
        assert_eq!(t.endpoint, "http://collector:4317");
        assert_eq!((t.instance_id, t.samples_per_million), (None, 100));
        assert_eq!(t.service_name, "etcd");
        // From the config file, as the other settings.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "enable_distributed_tracing = true\ndistributed_tracing_sampling_rate = 7\n",
        )
        .unwrap();
        let c = Config::load(&args(|a| a.config_file = Some(f.clone()))).unwrap();
        assert_eq!(c.tracing().unwrap().unwrap().samples_per_million, 7);
        // etcd's bounds and texts.
        for (rate, text) in [
            (-1, "tracing sampling rate must be positive"),
            (1_000_001, "tracing sampling rate must be less than 1000000"),
        ] {
            let a = Args::try_parse_from([
                "concord".to_string(),
                format!("--experimental-distributed-tracing-sampling-rate={rate}"),
            ])
            .unwrap();
            let e = Config::load(&a).unwrap_err().to_string();
            assert_eq!(e, text);
        }
        for bad in ["", "https://collector:4317", "http://"] {
            let e = Config::load(&args(|a| a.distributed_tracing_address = Some(bad.into())));
            assert!(
                e.unwrap_err()
                    .to_string()
                    .contains("--experimental-distributed-tracing-address"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn log_format_is_text_or_json() {
        let c = Config::load(&Args::default()).unwrap();
        assert_eq!(c.log_format, "text");
        assert!(!c.json_logs().unwrap());
        let a = Args::try_parse_from(["concord", "--log-format", "json"]).unwrap();
        assert!(Config::load(&a).unwrap().json_logs().unwrap());
        let a = Args::try_parse_from(["concord", "--log-format=console"]).unwrap();
        assert!(!Config::load(&a).unwrap().json_logs().unwrap());
        let e = Config::load(&args(|a| a.log_format = Some("xml".into())));
        assert!(e.unwrap_err().to_string().contains("--log-format"));
    }

    #[test]
    fn rejects_bad_cluster_settings() {
        let e = Config::load(&args(|a| {
            a.initial_cluster = Some("other=http://localhost:2380".into())
        }));
        assert!(
            e.unwrap_err()
                .to_string()
                .contains("couldn't find local name")
        );
        let e = Config::load(&args(|a| a.initial_cluster_state = Some("weird".into())));
        assert!(
            e.unwrap_err()
                .to_string()
                .contains("--initial-cluster-state")
        );
        let e = Config::load(&args(|a| {
            a.listen_client_urls = Some("unix:///tmp/x".into())
        }));
        assert!(
            e.unwrap_err()
                .to_string()
                .contains("only http:// and https://")
        );
        let c = Config::load(&args(|a| {
            a.listen_client_urls = Some("https://127.0.0.1:1".into())
        }))
        .unwrap();
        assert!(c.client_listen_urls().unwrap()[0].1);
        assert_eq!(c.max_concurrent_streams, u32::MAX);
        let e = Config::load(&args(|a| a.grpc_keepalive_min_time = Some("5".into())));
        assert!(
            e.unwrap_err()
                .to_string()
                .contains("--grpc-keepalive-min-time")
        );
    }
}
