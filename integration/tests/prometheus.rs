//! A real Prometheus (Debian's `prometheus`) scrapes a 3-member `concord` cluster under
//! load, with the repository's alerting rules loaded, and answers PromQL as an
//! operator's would: one leader (`sum(etcd_server_is_leader) == 1`), a WAL fsync p99
//! from `histogram_quantile`, `rate(grpc_server_handled_total[1m])` by method; every
//! rule of `ops/prometheus/concord-alerts.yml` loads and evaluates with health "ok";
//! every query of the dashboard `ops/grafana/concord.json` evaluates and has data.
//! After the leader is SIGKILLed, `etcd_server_leader_changes_seen_total` rises on the
//! survivors, a new leader is the only one, and the member-down alert goes off.
//!
//! Prometheus listens on a free loopback port (never its default 9090) and is killed
//! by pid when the test ends.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use concord_integration::cluster::{Cluster, ClusterOptions, Kind};
use concord_integration::promql::{
    self, EXTENSIVE, SYNTHETIC, dashboard_queries, metric_names, rule_queries,
};
use concord_integration::{Proc, READY_DEADLINE, free_port, wait_until};
use serde_json::Value;

/// How long Prometheus may take to see what the cluster does: a few scrapes and rule
/// evaluations, on a loaded machine.
const SEEN_DEADLINE: Duration = Duration::from_secs(90);

/// A Prometheus server scraping the cluster's members every second.
struct Prometheus {
    proc: Proc,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(targets: &[u16]) -> Result<Prometheus> {
        let bin = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .context(
                "prometheus not installed (apt-get install prometheus; scripts/deps.sh does)",
            )?;
        let dir = tempfile::Builder::new().prefix("prometheus").tempdir()?;
        let port = loop {
            let p = free_port();
            if p != 9090 {
                break p;
            }
        };
        let rules = promql::rules_path().canonicalize()?;
        let targets = targets
            .iter()
            .map(|p| format!("'127.0.0.1:{p}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - '{}'\n\
             scrape_configs:\n  - job_name: concord\n    static_configs:\n      - targets: [{targets}]\n",
            rules.display()
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config)?;
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .current_dir(dir.path());
        let proc = Proc::spawn(cmd, dir.path().join("prometheus.log"))?;
        Ok(Prometheus {
            proc,
            port,
            _dir: dir,
        })
    }

    /// `GET path` with `params` (URL-encoded by curl); the body.
    async fn get(&self, path: &str, params: &[(&str, &str)]) -> Result<String> {
        let mut cmd = tokio::process::Command::new("curl");
        cmd.args(["-sS", "--max-time", "10", "-G"])
            .arg(format!("http://127.0.0.1:{}{path}", self.port));
        for (k, v) in params {
            cmd.arg("--data-urlencode").arg(format!("{k}={v}"));
        }
        let out = cmd.output().await.context("running curl")?;
        ensure!(
            out.status.success(),
            "GET {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// An API call's `data`, failing unless its status is `success`.
    async fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<Value> {
        let body = self.get(path, params).await?;
        let v: Value = serde_json::from_str(&body).with_context(|| format!("{path}: {body}"))?;
        ensure!(v["status"] == "success", "{path} {params:?}: {body}");
        Ok(v["data"].clone())
    }

    /// An instant query: each sample's labels and value.
    async fn query(&self, q: &str) -> Result<Vec<(BTreeMap<String, String>, f64)>> {
        let data = self.api("/api/v1/query", &[("query", q)]).await?;
        ensure!(data["resultType"] == "vector", "{q}: {data}");
        let mut out = Vec::new();
        for r in data["result"].as_array().into_iter().flatten() {
            let labels = r["metric"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect();
            let value = r["value"][1]
                .as_str()
                .with_context(|| format!("{q}: a sample without a value: {r}"))?
                .parse::<f64>()?;
            out.push((labels, value));
        }
        Ok(out)
    }

    /// The one sample of `q`, by `label`'s value.
    async fn by(&self, q: &str, label: &str) -> Result<BTreeMap<String, f64>> {
        let mut out = BTreeMap::new();
        for (labels, v) in self.query(q).await? {
            let key = labels.get(label).cloned().unwrap_or_default();
            ensure!(
                out.insert(key.clone(), v).is_none(),
                "{q}: two samples for {key}"
            );
        }
        Ok(out)
    }
}

/// Puts (with a range and, now and then, a txn) at a steady pace until stopped;
/// failures (around the leader kill) are counted and the loop goes on.
fn start_load(c: &Cluster, stop: Arc<AtomicBool>, done: Arc<AtomicU64>) {
    let endpoints = c.endpoints();
    tokio::spawn(async move {
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5));
        let mut client = None;
        // A pace, not a synchronisation: about 50 writes a second.
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            if client.is_none() {
                client = etcd_client::Client::connect(endpoints.clone(), Some(opts.clone()))
                    .await
                    .ok();
            }
            let Some(cl) = client.as_mut() else {
                continue;
            };
            i += 1;
            let key = format!("prom/{}", i % 100);
            let ok = cl.put(key.as_str(), i.to_string(), None).await.is_ok()
                && cl.get(key.as_str(), None).await.is_ok()
                && (!i.is_multiple_of(10)
                    || cl
                        .txn(
                            etcd_client::Txn::new()
                                .and_then([etcd_client::TxnOp::get(key.as_str(), None)]),
                        )
                        .await
                        .is_ok());
            if ok {
                done.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
}

fn finite_positive(v: f64) -> bool {
    v.is_finite() && v > 0.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_cluster_and_answers_promql() -> Result<()> {
    let mut c = Cluster::start(Kind::Concord, ClusterOptions::default()).await?;
    let leader = c.leader().await?;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    start_load(&c, stop.clone(), done.clone());
    let ports: Vec<u16> = c.members.iter().map(|m| m.client_port).collect();
    let prom = Prometheus::start(&ports)?;
    let result = check(&mut c, &prom, leader, &done).await;
    stop.store(true, Ordering::Relaxed);
    if result.is_err() {
        eprintln!("prometheus log:\n{}", prom.proc.log());
        c.print_logs();
    }
    result
}

async fn check(c: &mut Cluster, prom: &Prometheus, leader: usize, done: &AtomicU64) -> Result<()> {
    let instances: Vec<String> = c
        .members
        .iter()
        .map(|m| format!("127.0.0.1:{}", m.client_port))
        .collect();
    let instance = |i: usize| instances[i].clone();
    wait_until(READY_DEADLINE, "prometheus ready", || async {
        let body = prom.get("/-/ready", &[]).await?;
        ensure!(body.contains("Ready"), "{body}");
        Ok(())
    })
    .await?;

    // Every member scraped, exactly one leader.
    wait_until(SEEN_DEADLINE, "three members up", || async {
        let up = prom.by(r#"up{job="concord"}"#, "instance").await?;
        ensure!(
            up.len() == 3 && up.values().all(|&v| v == 1.0),
            "up: {up:?}"
        );
        Ok(())
    })
    .await?;
    wait_until(SEEN_DEADLINE, "sum(etcd_server_is_leader) == 1", || async {
        let r = prom.query("sum(etcd_server_is_leader) == 1").await?;
        ensure!(r.len() == 1 && r[0].1 == 1.0, "{r:?}");
        let leaders = prom.by("etcd_server_is_leader == 1", "instance").await?;
        ensure!(
            leaders.keys().eq([&instance(leader)]),
            "leaders {leaders:?}, n{} leads",
            leader + 1
        );
        Ok(())
    })
    .await?;

    // The WAL fsync p99 of every member, from its histogram.
    let fsync = "histogram_quantile(0.99, sum by (instance, le) \
                 (rate(etcd_disk_wal_fsync_duration_seconds_bucket[1m])))";
    wait_until(SEEN_DEADLINE, "a WAL fsync p99 on every member", || async {
        let p99 = prom.by(fsync, "instance").await?;
        ensure!(
            p99.len() == 3 && p99.values().all(|&v| finite_positive(v) && v <= 8.192),
            "{p99:?}"
        );
        Ok(())
    })
    .await?;

    // Calls by method: the load's puts and ranges; methods not called are there at 0.
    let by_method = r#"sum by (grpc_method) (rate(grpc_server_handled_total{job="concord"}[1m]))"#;
    wait_until(SEEN_DEADLINE, "gRPC rates by method", || async {
        let rates = prom.by(by_method, "grpc_method").await?;
        for m in ["Put", "Range", "Txn"] {
            ensure!(
                rates.get(m).copied().is_some_and(finite_positive),
                "{m}: {rates:?}"
            );
        }
        ensure!(rates.get("Compact") == Some(&0.0), "{rates:?}");
        Ok(())
    })
    .await?;
    ensure!(
        done.load(Ordering::Relaxed) > 0,
        "the load made no progress"
    );

    check_rules(prom).await?;
    check_dashboard(prom).await?;

    // Kill the leader: the survivors see a leader change, one of them leads, the dead
    // member is down (and the rules say so).
    let changes = "etcd_server_leader_changes_seen_total";
    let before = prom.by(changes, "instance").await?;
    ensure!(before.len() == 3, "{changes}: {before:?}");
    let dead = instance(leader);
    c.kill9(leader);
    let survivors: Vec<String> = (0..3).filter(|&i| i != leader).map(instance).collect();
    wait_until(
        SEEN_DEADLINE,
        "leader changes rising on the survivors",
        || async {
            let now = prom.by(changes, "instance").await?;
            for s in &survivors {
                let (b, n) = (before[s], now.get(s).copied().unwrap_or(0.0));
                ensure!(n > b, "{s}: {b} -> {n}");
            }
            Ok(())
        },
    )
    .await?;
    wait_until(SEEN_DEADLINE, "a new leader, the only one", || async {
        let r = prom.query("sum(etcd_server_is_leader) == 1").await?;
        ensure!(r.len() == 1, "{r:?}");
        let leaders = prom.by("etcd_server_is_leader == 1", "instance").await?;
        ensure!(
            leaders.len() == 1 && survivors.iter().any(|s| leaders.contains_key(s)),
            "{leaders:?}"
        );
        let up = prom.by(r#"up{job="concord"}"#, "instance").await?;
        ensure!(up.get(&dead) == Some(&0.0), "up: {up:?}");
        Ok(())
    })
    .await?;
    wait_until(SEEN_DEADLINE, "the member-down alert", || async {
        let alerts = prom.api("/api/v1/alerts", &[]).await?;
        let active: Vec<(String, String, String)> = alerts["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| {
                let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
                (
                    s(&a["labels"]["alertname"]),
                    s(&a["labels"]["instance"]),
                    s(&a["state"]),
                )
            })
            .collect();
        ensure!(
            active
                .iter()
                .any(|(name, inst, state)| name == "ConcordMemberDown"
                    && *inst == dead
                    && (state == "pending" || state == "firing")),
            "{active:?}"
        );
        ensure!(
            !active
                .iter()
                .any(|(name, _, _)| name == "ConcordInsufficientMembers"),
            "two of three members up is a quorum: {active:?}"
        );
        Ok(())
    })
    .await?;
    Ok(())
}

/// Every rule of the file loaded, evaluated with health "ok", labelled with a
/// severity and annotated; Prometheus reads the same metric names in each as
/// [`rule_queries`] does (which `ops_files.rs` relies on).
async fn check_rules(prom: &Prometheus) -> Result<()> {
    let ours: BTreeMap<String, BTreeSet<String>> =
        rule_queries(&std::fs::read_to_string(promql::rules_path())?)?
            .into_iter()
            .map(|q| {
                let name = q.source.trim_start_matches("rule ").to_string();
                (name, metric_names(&q.expr))
            })
            .collect();
    wait_until(SEEN_DEADLINE, "every rule evaluated, health ok", || async {
        let data = prom.api("/api/v1/rules", &[]).await?;
        let mut seen = BTreeMap::new();
        for g in data["groups"].as_array().into_iter().flatten() {
            for r in g["rules"].as_array().into_iter().flatten() {
                let name = r["name"].as_str().unwrap_or_default().to_string();
                ensure!(r["health"] == "ok", "rule {name}: {r}");
                if r["type"] == "alerting" {
                    ensure!(
                        r["labels"]["severity"].is_string()
                            && r["annotations"]["summary"].is_string()
                            && r["annotations"]["description"].is_string(),
                        "rule {name}: a severity, a summary and a description: {r}"
                    );
                }
                let query = r["query"].as_str().unwrap_or_default();
                seen.insert(name, metric_names(query));
            }
        }
        ensure!(seen == ours, "Prometheus has {seen:?}\nthe file {ours:?}");
        Ok(())
    })
    .await
}

/// Every query of the dashboard (its variables given values) evaluates and returns
/// samples, except those on `--metrics extensive` histograms, which this cluster does
/// not export.
async fn check_dashboard(prom: &Prometheus) -> Result<()> {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(promql::dashboard_path())?)?;
    let vars = [
        ("job", "concord"),
        ("instance", ".+"),
        ("__rate_interval", "1m"),
        ("__interval", "1s"),
        ("__range", "5m"),
        ("datasource", "prometheus"),
    ];
    let queries = dashboard_queries(&dashboard);
    ensure!(queries.len() > 20, "{} queries", queries.len());
    for name in SYNTHETIC {
        if queries
            .iter()
            .any(|q| metric_names(&q.expr).contains(*name))
        {
            let r = prom.query(&format!("count({name})")).await?;
            ensure!(
                !r.is_empty(),
                "{name} used by the dashboard, not in Prometheus"
            );
        }
    }
    // Each query is valid PromQL (an error is final), then has data at least once
    // (a scrape that fails makes its member's series stale for a moment).
    let mut waiting = Vec::new();
    for q in &queries {
        let expr = promql::substitute(&q.expr, &vars);
        let r = prom
            .query(&expr)
            .await
            .with_context(|| format!("{}: {expr}", q.source))?;
        let extensive = metric_names(&expr).iter().any(|n| {
            EXTENSIVE
                .iter()
                .any(|f| n.strip_prefix(f).is_some_and(|s| s.starts_with('_')))
        });
        if r.is_empty() && !extensive {
            waiting.push((q.source.clone(), expr));
        }
    }
    let waiting = std::sync::Mutex::new(waiting);
    wait_until(SEEN_DEADLINE, "data for every dashboard query", || async {
        let left = waiting.lock().unwrap().clone();
        let mut still = Vec::new();
        for (source, expr) in left {
            if prom.query(&expr).await?.is_empty() {
                still.push((source, expr));
            }
        }
        let mut w = waiting.lock().unwrap();
        *w = still;
        ensure!(w.is_empty(), "no data yet: {:?}", *w);
        Ok(())
    })
    .await
}
