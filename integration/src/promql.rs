//! What a Grafana dashboard and a Prometheus rules file ask Prometheus for, read well
//! enough to check them against a live member: the metric names of a PromQL
//! expression ([`metric_names`], a small lexer that knows functions, keywords, label
//! names and Grafana's template variables from metric names), the expressions of a
//! dashboard's panels and variables ([`dashboard_queries`]), those of a rules file
//! ([`rule_queries`], for the plain YAML the repository's file is written in), and the
//! samples of a Prometheus text exposition ([`Exposition`]).
//!
//! For the checks of `ops/` (`integration/tests/ops_files.rs` and
//! `integration/tests/prometheus.rs`). Not a PromQL parser: Prometheus itself (and
//! `promtool`) judges whether an expression is valid.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use anyhow::{Result, bail};

/// The repository's `ops/` directory.
pub fn ops_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../ops")
}

/// The Grafana dashboard in the repository.
pub fn dashboard_path() -> PathBuf {
    ops_dir().join("grafana/concord.json")
}

/// The Prometheus alerting rules in the repository.
pub fn rules_path() -> PathBuf {
    ops_dir().join("prometheus/concord-alerts.yml")
}

/// Series Prometheus makes itself for every target (not on any member's `/metrics`).
pub const SYNTHETIC: &[&str] = &[
    "up",
    "scrape_duration_seconds",
    "scrape_samples_scraped",
    "scrape_samples_post_metric_relabeling",
    "scrape_series_added",
    "ALERTS",
    "ALERTS_FOR_STATE",
];

/// Families a member exports only with `--metrics extensive` (panels that use them
/// say so in their title).
pub const EXTENSIVE: &[&str] = &["grpc_server_handling_seconds"];

/// Words that look like identifiers but name no metric: aggregation operators (which
/// may come before their `by (...)` clause instead of their `(`), the keywords of
/// binary operators and modifiers, and the number literals `Inf` / `NaN`.
const KEYWORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "inf",
    "nan",
];

/// Keywords followed by a parenthesised list of label names.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

fn ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Reads the quoted string starting at `chars[i]` (its quote); returns its contents
/// (escapes resolved, except in raw backquoted strings) and the index after it.
fn read_string(chars: &[char], i: usize) -> (String, usize) {
    let quote = chars[i];
    let mut out = String::new();
    let mut j = i + 1;
    while j < chars.len() {
        let c = chars[j];
        if c == quote {
            return (out, j + 1);
        }
        if c == '\\' && quote != '`' && j + 1 < chars.len() {
            out.push(chars[j + 1]);
            j += 2;
            continue;
        }
        out.push(c);
        j += 1;
    }
    (out, j)
}

/// The next character after `i` that is not whitespace.
fn next_non_space(chars: &[char], mut i: usize) -> Option<char> {
    while i < chars.len() && chars[i].is_whitespace() {
        i += 1;
    }
    chars.get(i).copied()
}

/// The metric names `expr` selects: every identifier that is not a function (followed
/// by `(`), a keyword or aggregation operator, a label name (inside `{...}` or in a
/// `by`/`without`/`on`/`ignoring`/`group_left`/`group_right` list), a number or
/// duration, or a Grafana variable (`$x`, `${x}`, `[[x]]`); plus the value of a
/// `__name__="..."` matcher. Strings, comments and range/subquery brackets are
/// skipped. Names are returned as written (a histogram's `_bucket` series included).
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut depth = 0usize;
    // Inside `{...}`: the last label name and the matcher operator after it.
    let mut in_braces = false;
    let mut label = String::new();
    let mut op = String::new();
    // A `by`-like keyword was read; its `(` opens a list of label names.
    let mut expect_label_list = false;
    let mut label_list_depth: Option<usize> = None;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
            continue;
        }
        if matches!(c, '"' | '\'' | '`') {
            let (s, next) = read_string(&chars, i);
            if in_braces && label == "__name__" && op == "=" {
                names.insert(s);
            }
            i = next;
            continue;
        }
        if c == '$' {
            i += 1;
            if chars.get(i) == Some(&'{') {
                while i < chars.len() && chars[i] != '}' {
                    i += 1;
                }
                i += 1;
            } else {
                while i < chars.len() && ident_char(chars[i]) {
                    i += 1;
                }
            }
            continue;
        }
        if c == '[' {
            // `[[var]]` (Grafana) or a range / subquery: durations and variables only.
            let close = if chars.get(i + 1) == Some(&'[') {
                "]]"
            } else {
                "]"
            };
            let rest: String = chars[i..].iter().collect();
            i += rest.find(close).map_or(rest.chars().count(), |at| {
                rest[..at].chars().count() + close.len()
            });
            continue;
        }
        if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) {
            // Numbers (1e3, 0x1f, .5) and durations (5m, 1h30m).
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            continue;
        }
        if ident_start(c) {
            let start = i;
            while i < chars.len() && ident_char(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let lower = word.to_ascii_lowercase();
            if in_braces {
                label = word;
                op.clear();
            } else if label_list_depth.is_some() {
                // A label name in a `by (...)`-like list.
            } else if LABEL_LISTS.contains(&lower.as_str()) {
                expect_label_list = next_non_space(&chars, i) == Some('(');
            } else if next_non_space(&chars, i) == Some('(') || KEYWORDS.contains(&lower.as_str()) {
                // A function or an aggregation operator, or a keyword.
            } else {
                names.insert(word);
            }
            continue;
        }
        match c {
            '{' => {
                in_braces = true;
                label.clear();
                op.clear();
            }
            '}' => in_braces = false,
            '(' => {
                depth += 1;
                if expect_label_list {
                    label_list_depth = Some(depth);
                    expect_label_list = false;
                }
            }
            ')' => {
                if label_list_depth == Some(depth) {
                    label_list_depth = None;
                }
                depth = depth.saturating_sub(1);
            }
            '=' | '!' | '~' if in_braces => op.push(c),
            ',' if in_braces => {
                label.clear();
                op.clear();
            }
            _ => {}
        }
        i += 1;
    }
    names
}

/// One expression of a dashboard or rules file, with where it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// The panel title and target, the variable, or the rule name.
    pub source: String,
    pub expr: String,
}

/// Every PromQL expression of a Grafana dashboard: each panel target's `expr` (rows'
/// nested panels too) and the PromQL inside each query variable (`label_values(sel,
/// label)` gives `sel`, `query_result(q)` gives `q`; `label_values(label)` and
/// `metrics(re)` name no metric).
pub fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<Query> {
    fn panels(list: &serde_json::Value, out: &mut Vec<Query>) {
        for p in list.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?");
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    let refid = t["refId"].as_str().unwrap_or("?");
                    out.push(Query {
                        source: format!("panel {title:?} target {refid}"),
                        expr: expr.to_string(),
                    });
                }
            }
            panels(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dashboard["panels"], &mut out);
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]
            .as_str()
            .or_else(|| v["query"]["query"].as_str())
            .unwrap_or("");
        let name = v["name"].as_str().unwrap_or("?");
        if let Some(expr) = variable_promql(q) {
            out.push(Query {
                source: format!("variable {name}"),
                expr,
            });
        }
    }
    out
}

/// The PromQL inside a Grafana Prometheus variable query, if any.
fn variable_promql(q: &str) -> Option<String> {
    let q = q.trim();
    if let Some(args) = q
        .strip_prefix("label_values(")
        .and_then(|r| r.strip_suffix(')'))
    {
        // The label is the last argument; a selector before it, if any.
        return args
            .rsplit_once(',')
            .map(|(sel, _label)| sel.trim().to_string());
    }
    if let Some(inner) = q
        .strip_prefix("query_result(")
        .and_then(|r| r.strip_suffix(')'))
    {
        return Some(inner.to_string());
    }
    if q.starts_with("metrics(") || q.starts_with("label_names(") || q.is_empty() {
        return None;
    }
    Some(q.to_string())
}

/// The `expr` of every rule of a Prometheus rules file, named by its `alert` or
/// `record`. Reads the plain YAML such files are written in: `expr:` with a plain
/// one-line scalar or a `|` / `>` block scalar; anything else (a quoted or flow
/// scalar) is refused, so that nothing is silently misread.
pub fn rule_queries(yaml: &str) -> Result<Vec<Query>> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    let mut name = String::from("?");
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let body = line.trim_start();
        let indent = line.len() - body.len();
        let item = body.strip_prefix("- ").unwrap_or(body);
        for key in ["alert:", "record:"] {
            if let Some(v) = item.strip_prefix(key) {
                name = v.trim().to_string();
            }
        }
        let Some(value) = item.strip_prefix("expr:") else {
            i += 1;
            continue;
        };
        let key_indent = indent + (body.len() - item.len());
        let value = value.trim();
        i += 1;
        let expr = if value.starts_with('|') || value.starts_with('>') {
            let mut block = Vec::new();
            while i < lines.len() {
                let l = lines[i];
                let ind = l.len() - l.trim_start().len();
                if !l.trim().is_empty() && ind <= key_indent {
                    break;
                }
                block.push(l.trim());
                i += 1;
            }
            block.join("\n").trim().to_string()
        } else if value.starts_with(['"', '\'', '{', '[']) || value.is_empty() {
            bail!("rule {name}: write its expr as a plain scalar or a block scalar: {value}");
        } else {
            value.to_string()
        };
        out.push(Query {
            source: format!("rule {name}"),
            expr,
        });
    }
    Ok(out)
}

/// Replaces Grafana's variables in `expr` (`$x`, `${x}`, `${x:fmt}`, `[[x]]`) with
/// their values; unknown variables are left as they are.
pub fn substitute(expr: &str, vars: &[(&str, &str)]) -> String {
    let mut out = expr.to_string();
    // Longest names first, so `$__range` does not eat `$__range_s`.
    let mut vars = vars.to_vec();
    vars.sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
    for (k, v) in &vars {
        out = out.replace(&format!("[[{k}]]"), v);
        out = out.replace(&format!("${{{k}}}"), v);
        while let Some(at) = out.find(&format!("${{{k}:")) {
            let end = out[at..].find('}').map_or(out.len(), |e| at + e + 1);
            out.replace_range(at..end, v);
        }
        let pat = format!("${k}");
        let mut from = 0;
        while let Some(at) = out[from..].find(&pat).map(|a| a + from) {
            let after = at + pat.len();
            if out[after..].starts_with(ident_char) {
                from = after;
                continue;
            }
            out.replace_range(at..after, v);
            from = at + v.len();
        }
    }
    out
}

/// One scrape of a Prometheus text exposition: each family's type and the names of
/// the samples (a histogram's `_bucket`, `_sum` and `_count` series).
#[derive(Debug, Default, Clone)]
pub struct Exposition {
    pub types: BTreeMap<String, String>,
    pub samples: BTreeSet<String>,
}

impl Exposition {
    pub fn parse(text: &str) -> Exposition {
        let mut e = Exposition::default();
        for line in text.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split_whitespace();
                if let (Some(n), Some(t)) = (it.next(), it.next()) {
                    e.types.insert(n.to_string(), t.to_string());
                }
                continue;
            }
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            e.samples.insert(line[..end].to_string());
        }
        e
    }

    /// The family `name` belongs to: its base if `name` is a histogram's (or
    /// summary's) `_bucket` / `_sum` / `_count` series in this scrape, else `name`.
    pub fn family<'a>(&self, name: &'a str) -> &'a str {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                let t = self.types.get(base).map(String::as_str);
                if t == Some("histogram") || (t == Some("summary") && suffix != "_bucket") {
                    return base;
                }
            }
        }
        name
    }

    /// Whether Prometheus scraping this gets series named `name`: a sample of that
    /// name, of a family this scrape declares.
    pub fn has(&self, name: &str) -> bool {
        self.samples.contains(name) && self.types.contains_key(self.family(name))
    }
}
