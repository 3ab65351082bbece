//! The operator's files in `ops/`: the Grafana dashboard (`ops/grafana/concord.json`)
//! and the Prometheus alerting rules (`ops/prometheus/concord-alerts.yml`).
//!
//! Every metric name their PromQL uses is on the `/metrics` of a live member of a
//! 3-member cluster under load; the rules pass `promtool check rules` and their unit
//! tests (`promtool test rules`); the dashboard is JSON with what Grafana needs to
//! import it (a Prometheus datasource variable, panels with ids, grid positions and
//! queries, every variable a query names defined). `integration/tests/prometheus.rs`
//! runs both files in a real Prometheus.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use anyhow::{Context, Result, ensure};
use concord_integration::cluster::{Cluster, ClusterOptions, Kind};
use concord_integration::promql::{
    self, EXTENSIVE, Exposition, SYNTHETIC, dashboard_queries, metric_names, rule_queries,
};
use concord_integration::{Concord, READY_DEADLINE, RETRY_DEADLINE, retry_transient, wait_until};

fn names(expr: &str) -> Vec<String> {
    metric_names(expr).into_iter().collect()
}

#[test]
fn promql_metric_names_are_read_properly() {
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (instance, le) (rate(etcd_disk_wal_fsync_duration_seconds_bucket{job="$job",instance=~"$instance"}[$__rate_interval])))"#
        ),
        ["etcd_disk_wal_fsync_duration_seconds_bucket"]
    );
    // Aggregations with the clause before or after, on/group_left lists, keywords,
    // numbers, durations, offsets, strings with metric-like words.
    assert_eq!(
        names(
            r#"sum(rate(a_total[5m] offset 1h)) without (le) / on (job) group_left (instance) max by (job) (b) > bool 0.5e3 and c unless d or count_values("up", e)"#
        ),
        ["a_total", "b", "c", "d", "e"]
    );
    // Label names inside braces, __name__ matchers, Grafana's variable forms.
    assert_eq!(
        names(
            r#"{__name__="f", job=~"x|y", le!="+Inf"} + g{sum="by"}[1m:10s] * ${h} - [[i]] + $j"#
        ),
        ["f", "g"]
    );
    assert_eq!(
        names(r#"label_replace(up, "dst", "$1", "instance", "(.*):.*") # comment k"#),
        ["up"]
    );
    assert_eq!(
        names("time() - process_start_time_seconds"),
        ["process_start_time_seconds"]
    );
    assert_eq!(names("1 - Inf + NaN"), Vec::<String>::new());

    let rules = rule_queries(
        "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: up == 0\n        for: 1m\n      - record: r:b\n        expr: |\n          sum by (job) (\n            b)\n        labels: {}\n",
    )
    .unwrap();
    assert_eq!(rules.len(), 2);
    assert_eq!(
        (rules[0].source.as_str(), rules[0].expr.as_str()),
        ("rule A", "up == 0")
    );
    assert_eq!(rules[1].expr, "sum by (job) (\nb)");
    assert!(rule_queries("      - alert: A\n        expr: \"up\"\n").is_err());

    assert_eq!(
        promql::substitute(
            r#"x{a="$job",b=~"${instance}",c="${instance:regex}"}[$__range] + y[$__range_s] $jobs"#,
            &[("job", "j"), ("instance", ".+"), ("__range", "5m")]
        ),
        r#"x{a="j",b=~".+",c=".+"}[5m] + y[$__range_s] $jobs"#
    );

    let e = Exposition::parse(
        "# TYPE h histogram\nh_bucket{le=\"1\"} 0\nh_sum 0\nh_count 0\n# TYPE c_count counter\nc_count 1\n",
    );
    assert_eq!(e.family("h_bucket"), "h");
    assert_eq!(e.family("c_count"), "c_count");
    assert!(e.has("h_bucket") && e.has("c_count") && !e.has("h") && !e.has("c"));
}

/// `promtool`, from Debian's `prometheus` package.
fn promtool(args: &[&str], dir: &std::path::Path) -> Result<String> {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .context("running promtool (apt-get install prometheus; scripts/deps.sh does)")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success(),
        "promtool {args:?}: {}\n{text}",
        out.status
    );
    Ok(text)
}

#[test]
fn the_rules_pass_promtool_and_their_unit_tests() -> Result<()> {
    let dir = promql::ops_dir().join("prometheus");
    let text = promtool(
        &[
            "check",
            "rules",
            "--lint=all",
            "--lint-fatal",
            "concord-alerts.yml",
        ],
        &dir,
    )?;
    let rules = rule_queries(&std::fs::read_to_string(promql::rules_path())?)?;
    ensure!(
        text.contains(&format!("SUCCESS: {} rules found", rules.len())),
        "promtool counts other rules than the {} exprs read here:\n{text}",
        rules.len()
    );
    promtool(&["test", "rules", "concord-alerts.test.yml"], &dir)?;
    Ok(())
}

/// What an etcd operator looks for, by the metrics that show it: each must be on the
/// dashboard (`D`), in the rules (`R`), or both.
const COVERAGE: &[(&str, &str)] = &[
    ("up", "DR"),
    ("etcd_server_has_leader", "DR"),
    ("etcd_server_is_leader", "D"),
    ("etcd_server_leader_changes_seen_total", "DR"),
    ("etcd_server_proposals_committed_total", "DR"),
    ("etcd_server_proposals_applied_total", "DR"),
    ("etcd_server_proposals_pending", "DR"),
    ("etcd_server_proposals_failed_total", "DR"),
    ("etcd_server_slow_apply_total", "DR"),
    ("etcd_disk_wal_fsync_duration_seconds_bucket", "DR"),
    ("etcd_disk_backend_commit_duration_seconds_bucket", "DR"),
    ("etcd_mvcc_db_total_size_in_bytes", "DR"),
    ("etcd_mvcc_db_total_size_in_use_in_bytes", "D"),
    ("etcd_server_quota_backend_bytes", "DR"),
    ("grpc_server_started_total", "D"),
    ("grpc_server_handled_total", "DR"),
    ("etcd_network_client_grpc_received_bytes_total", "D"),
    ("etcd_network_client_grpc_sent_bytes_total", "D"),
    ("etcd_network_peer_sent_bytes_total", "D"),
    ("etcd_network_peer_received_bytes_total", "D"),
    ("etcd_network_peer_round_trip_time_seconds_bucket", "DR"),
    ("etcd_network_active_peers", "DR"),
    ("etcd_debugging_mvcc_watcher_total", "D"),
    ("etcd_debugging_mvcc_watch_stream_total", "D"),
    ("etcd_debugging_mvcc_slow_watcher_total", "DR"),
    ("etcd_debugging_lease_granted_total", "D"),
    ("etcd_debugging_lease_revoked_total", "D"),
    ("etcd_debugging_lease_renewed_total", "D"),
    ("process_resident_memory_bytes", "D"),
    ("process_cpu_seconds_total", "D"),
    ("process_open_fds", "DR"),
    ("process_max_fds", "DR"),
];

/// Grafana's own variables a query may use.
const GRAFANA_VARIABLES: &[&str] = &[
    "__rate_interval",
    "__interval",
    "__interval_ms",
    "__range",
    "__range_s",
    "__range_ms",
];

/// The `$name` / `${name}` / `[[name]]` variables `expr` uses.
fn variables(expr: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]").unwrap();
    re.captures_iter(expr)
        .filter_map(|c| c.get(1).or(c.get(2)).or(c.get(3)))
        .map(|m| m.as_str().to_string())
        // `$1` in label_replace's replacement.
        .filter(|v| !v.chars().all(|c| c.is_ascii_digit()))
        .collect()
}

#[test]
fn the_dashboard_has_what_grafana_needs() -> Result<()> {
    let text = std::fs::read_to_string(promql::dashboard_path())?;
    let d: serde_json::Value = serde_json::from_str(&text).context("the dashboard is not JSON")?;
    let mut problems = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            problems.push(what);
        }
    };
    check(
        d["title"].as_str().is_some_and(|t| !t.is_empty()),
        "no title".into(),
    );
    let uid = d["uid"].as_str().unwrap_or("");
    check(
        !uid.is_empty()
            && uid.len() <= 40
            && uid
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        format!("uid {uid:?}: 1 to 40 of [A-Za-z0-9_-]"),
    );
    let schema = d["schemaVersion"].as_u64().unwrap_or(0);
    check(
        (36..=41).contains(&schema),
        format!("schemaVersion {schema}, want Grafana 9-11's 36..=41"),
    );
    check(
        d["time"]["from"].is_string() && d["time"]["to"].is_string(),
        "no time range".into(),
    );

    // Variables: a Prometheus datasource variable; every query variable on it.
    let vars = d["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut defined: BTreeSet<String> = GRAFANA_VARIABLES.iter().map(|s| s.to_string()).collect();
    let mut datasource_var = None;
    for v in &vars {
        let name = v["name"].as_str().unwrap_or("").to_string();
        check(!name.is_empty(), format!("a variable without a name: {v}"));
        match v["type"].as_str() {
            Some("datasource") => {
                check(
                    v["query"] == "prometheus",
                    format!("datasource variable {name} is not of Prometheus"),
                );
                datasource_var = Some(name.clone());
            }
            Some("query") => {
                check(
                    v["datasource"]["type"] == "prometheus",
                    format!("variable {name}: not on a Prometheus datasource"),
                );
                for used in variables(&v["definition"].to_string()) {
                    check(
                        defined.contains(&used),
                        format!("variable {name} uses ${used} before it is defined"),
                    );
                }
            }
            other => check(false, format!("variable {name}: type {other:?}")),
        }
        defined.insert(name);
    }
    let Some(ds) = datasource_var else {
        panic!("no datasource variable of type prometheus");
    };
    let ds_uid = format!("${{{ds}}}");
    for v in vars.iter().filter(|v| v["type"] == "query") {
        check(
            v["datasource"]["uid"] == ds_uid.as_str(),
            format!("variable {}: datasource uid is not {ds_uid}", v["name"]),
        );
    }

    // Panels: unique ids, known types, inside the 24-column grid without overlaps, a
    // Prometheus datasource and queries on every panel but rows.
    let mut all = Vec::new();
    fn flatten(list: &serde_json::Value, out: &mut Vec<serde_json::Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p.clone());
            flatten(&p["panels"], out);
        }
    }
    flatten(&d["panels"], &mut all);
    check(all.len() >= 20, format!("only {} panels", all.len()));
    let mut ids = BTreeSet::new();
    let mut cells: BTreeMap<(u64, u64), String> = BTreeMap::new();
    for p in &all {
        let title = p["title"].as_str().unwrap_or("");
        check(
            !title.is_empty(),
            format!("a panel without a title: id {}", p["id"]),
        );
        let id = p["id"].as_u64();
        check(
            id.is_some_and(|id| ids.insert(id)),
            format!("panel {title:?}: id {} missing or not unique", p["id"]),
        );
        let kind = p["type"].as_str().unwrap_or("");
        check(
            [
                "row",
                "timeseries",
                "stat",
                "gauge",
                "bargauge",
                "table",
                "heatmap",
                "text",
            ]
            .contains(&kind),
            format!("panel {title:?}: type {kind:?}"),
        );
        let g = &p["gridPos"];
        let (Some(x), Some(y), Some(w), Some(h)) = (
            g["x"].as_u64(),
            g["y"].as_u64(),
            g["w"].as_u64(),
            g["h"].as_u64(),
        ) else {
            check(false, format!("panel {title:?}: gridPos {g}"));
            continue;
        };
        check(
            w >= 1 && h >= 1 && x + w <= 24,
            format!("panel {title:?}: gridPos {g} outside the 24 columns"),
        );
        for cx in x..x + w {
            for cy in y..y + h {
                if let Some(other) = cells.insert((cx, cy), title.to_string()) {
                    check(false, format!("panels {other:?} and {title:?} overlap"));
                }
            }
        }
        if kind == "row" {
            continue;
        }
        check(
            p["datasource"]["type"] == "prometheus" && p["datasource"]["uid"] == ds_uid.as_str(),
            format!("panel {title:?}: datasource is not {ds_uid}"),
        );
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        check(!targets.is_empty(), format!("panel {title:?}: no queries"));
        let mut refs = BTreeSet::new();
        for t in &targets {
            let expr = t["expr"].as_str().unwrap_or("");
            check(
                !expr.trim().is_empty(),
                format!("panel {title:?}: an empty query"),
            );
            check(
                t["refId"]
                    .as_str()
                    .is_some_and(|r| refs.insert(r.to_string())),
                format!("panel {title:?}: refId missing or repeated"),
            );
            for used in variables(expr) {
                check(
                    defined.contains(&used),
                    format!("panel {title:?}: ${used} is not a variable"),
                );
            }
        }
    }

    // What an operator expects to see (and be alerted on) is there.
    let dash_names: BTreeSet<String> = dashboard_queries(&d)
        .iter()
        .flat_map(|q| metric_names(&q.expr))
        .collect();
    let rule_names: BTreeSet<String> =
        rule_queries(&std::fs::read_to_string(promql::rules_path())?)?
            .iter()
            .flat_map(|q| metric_names(&q.expr))
            .collect();
    for (name, wher) in COVERAGE {
        if wher.contains('D') {
            check(
                dash_names.contains(*name),
                format!("{name} is not on the dashboard"),
            );
        }
        if wher.contains('R') {
            check(rule_names.contains(*name), format!("{name} is in no rule"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}

/// Puts (one with a lease), ranges, a txn, a delete, a compaction, a watch that sees
/// events and a lease kept alive: every family the files use gets samples.
async fn load(c: &Cluster) -> Result<()> {
    let mut client = c.client_all().await?;
    let mut w = client
        .watch("ops/", Some(etcd_client::WatchOptions::new().with_prefix()))
        .await?;
    w.message().await?;
    let lease = client.lease_grant(60, None).await?;
    let (mut keeper, mut responses) = client.lease_keep_alive(lease.id()).await?;
    keeper.keep_alive().await?;
    responses.message().await?;
    let mut last = 0;
    for i in 0..50 {
        let opts = (i == 0).then(|| etcd_client::PutOptions::new().with_lease(lease.id()));
        let r = client.put(format!("ops/{i}"), "v", opts).await?;
        last = r.header().map_or(0, |h| h.revision());
    }
    client
        .get("ops/", Some(etcd_client::GetOptions::new().with_prefix()))
        .await?;
    client
        .txn(etcd_client::Txn::new().and_then([etcd_client::TxnOp::get("ops/0", None)]))
        .await?;
    client.delete("ops/1", None).await?;
    client.compact(last, None).await?;
    // The watch saw the events.
    w.message().await?;
    Ok(())
}

async fn scrape(port: u16) -> Result<Exposition> {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "10"])
        .arg(format!("http://127.0.0.1:{port}/metrics"))
        .output()
        .await
        .context("running curl")?;
    ensure!(out.status.success(), "scraping :{port} failed");
    Ok(Exposition::parse(&String::from_utf8_lossy(&out.stdout)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_rules_use_is_on_a_live_member() -> Result<()> {
    // Every name used, with where it is used.
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(promql::dashboard_path())?)?;
    let mut queries = dashboard_queries(&dashboard);
    queries.extend(rule_queries(&std::fs::read_to_string(
        promql::rules_path(),
    )?)?);
    let mut used: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for q in &queries {
        let names = metric_names(&q.expr);
        assert!(!names.is_empty(), "{}: no metric in {:?}", q.source, q.expr);
        for n in names {
            used.entry(n).or_default().push(q.source.clone());
        }
    }

    // A 3-member cluster with the default (basic) metrics, and one member with
    // `--metrics extensive` for the families only that exports.
    let c = Cluster::start(Kind::Concord, ClusterOptions::default()).await?;
    c.leader().await?;
    retry_transient(RETRY_DEADLINE, "the load", || load(&c)).await?;

    // Peer round trips are measured every few seconds: wait until every member has
    // them, then take the scrapes.
    let rtt = "etcd_network_peer_round_trip_time_seconds_bucket";
    let taken = std::sync::Mutex::new(Vec::new());
    let ports: Vec<u16> = c.members.iter().map(|m| m.client_port).collect();
    wait_until(
        READY_DEADLINE,
        "round trips measured on every member",
        || async {
            let mut got = Vec::new();
            for &port in &ports {
                let s = scrape(port).await?;
                ensure!(s.has(rtt), "no {rtt} on :{port} yet");
                got.push(s);
            }
            *taken.lock().unwrap() = got;
            Ok(())
        },
    )
    .await?;
    let scrapes = taken.into_inner().unwrap();

    let member = Concord::start_with(&["--metrics", "extensive"]).await?;
    let mut client = member.client().await?;
    client.put("ops/x", "v", None).await?;
    client.get("ops/x", None).await?;
    let extensive = scrape(member.client_port).await?;

    let mut problems = Vec::new();
    for (name, sources) in &used {
        if SYNTHETIC.contains(&name.as_str()) {
            // Prometheus's own; tests/prometheus.rs finds it there.
            continue;
        }
        if EXTENSIVE.contains(&extensive.family(name)) {
            if !extensive.has(name) {
                problems.push(format!(
                    "{name} (used by {}) is not on the /metrics of a member with --metrics extensive",
                    sources.join(", ")
                ));
            }
            continue;
        }
        for (i, s) in scrapes.iter().enumerate() {
            if !s.has(name) {
                problems.push(format!(
                    "{name} (used by {}) is not on member n{}'s /metrics",
                    sources.join(", "),
                    i + 1
                ));
            }
        }
    }
    if !problems.is_empty() {
        c.print_logs();
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}
