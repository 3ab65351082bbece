//! A scripted `curl` session against etcd's HTTP/JSON API, and the normalising that
//! makes two servers' transcripts comparable: member and cluster ids, lease ids,
//! terms, sizes, versions and URLs differ between any two servers; revisions, keys,
//! values, codes and texts must not.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// One HTTP answer: status and body (parsed when it is JSON, else as a string).
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

fn parse_body(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

/// `curl -X <method> <url>` with `body` on stdin (none for `None`), within 20 s.
pub fn call(method: &str, url: &str, body: Option<&[u8]>, headers: &[&str]) -> Result<Answer> {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "20",
        "-X",
        method,
        "-w",
        "\n%{http_code}",
    ]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    if body.is_some() {
        cmd.args(["--data-binary", "@-"]);
    }
    cmd.arg(url)
        .stdin(if body.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("running curl")?;
    if let Some(b) = body {
        let mut stdin = child.stdin.take().context("curl stdin")?;
        stdin.write_all(b)?;
    }
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let Some((body, code)) = text.rsplit_once('\n') else {
        bail!(
            "curl {url}: no status ({})",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let status = code.trim().parse().context("curl's status")?;
    if status == 0 {
        bail!("curl {url}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(Answer {
        status,
        body: parse_body(body),
    })
}

/// A streaming `curl -N` POST whose answer lines are read as they arrive.
pub struct Streaming {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Streaming {
    /// POSTs `body` to `url` and keeps reading the answer (at most 60 s).
    pub fn start(url: &str, body: &str) -> Result<Streaming> {
        Streaming::start_with(url, body, &[])
    }

    /// [`Streaming::start`] with request headers (`Name: value`).
    pub fn start_with(url: &str, body: &str, headers: &[&str]) -> Result<Streaming> {
        let mut child = Command::new("curl")
            .args(["-sS", "-N", "--max-time", "60", "--data-binary", body, url])
            .args(headers.iter().flat_map(|h| ["-H", h]))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("running curl")?;
        let out = child.stdout.take().context("curl stdout")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ok(Streaming { child, lines })
    }

    /// The next `n` answer lines, within `deadline`.
    pub fn lines(&mut self, n: usize, deadline: Duration) -> Result<Vec<Value>> {
        let end = Instant::now() + deadline;
        let mut got = Vec::new();
        while got.len() < n {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.trim().is_empty() => {}
                Ok(l) => got.push(parse_body(&l)),
                Err(_) => bail!("stream gave {} of {n} lines: {got:?}", got.len()),
            }
        }
        Ok(got)
    }

    /// Every remaining line, once the server ends the answer.
    pub fn rest(self, deadline: Duration) -> Result<Vec<Value>> {
        let end = Instant::now() + deadline;
        let mut got = Vec::new();
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.trim().is_empty() => {}
                Ok(l) => got.push(parse_body(&l)),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Ok(got),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    bail!("stream did not end: {got:?}")
                }
            }
        }
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fields whose values are ids that differ between servers: replaced by the order in
/// which the transcript first shows each value (`<id1>`, `<id2>`, …).
const ID_FIELDS: &[&str] = &[
    "ID",
    "id",
    "lease",
    "leader",
    "member_id",
    "cluster_id",
    "IDs",
];
/// Fields whose values differ between servers by nature (sizes, terms, versions,
/// URLs, hashes, image bytes): replaced by a marker of their JSON type.
const VARYING_FIELDS: &[&str] = &[
    "raft_term",
    // An auth token (random, and names a log index).
    "token",
    "version_server",
    "dbSize",
    "dbSizeInUse",
    "raftIndex",
    "raftTerm",
    "raftAppliedIndex",
    "hash",
    "blob",
    "remaining_bytes",
    "peerURLs",
    "clientURLs",
    "name",
];

/// Lists whose order is not comparable (Go map iteration; members by random ids):
/// sorted.
const UNORDERED_FIELDS: &[&str] = &["leases", "members"];
/// Fields newer than the reference etcd (3.4): `dbSizeQuota` is etcd 3.6's.
const NEWER_FIELDS: &[&str] = &["dbSizeQuota"];

/// Makes two servers' transcripts comparable (see the module doc). `version` is
/// varying only inside a Maintenance status (a key's `version` is not).
pub struct Normaliser {
    ids: HashMap<String, String>,
}

impl Default for Normaliser {
    fn default() -> Self {
        Self::new()
    }
}

impl Normaliser {
    pub fn new() -> Normaliser {
        Normaliser {
            ids: HashMap::new(),
        }
    }

    fn id(&mut self, v: &str) -> String {
        if v == "0" {
            return v.to_string();
        }
        let n = self.ids.len() + 1;
        self.ids
            .entry(v.to_string())
            .or_insert_with(|| format!("<id{n}>"))
            .clone()
    }

    /// The value with ids numbered, varying fields masked, and lease ids inside keys
    /// (lock and election keys end in the lease id in hex) replaced too.
    pub fn normalise(&mut self, v: &Value) -> Value {
        self.walk(v)
    }

    fn walk(&mut self, v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let status = m.contains_key("raftIndex") || m.contains_key("dbSize");
                let mut out = serde_json::Map::new();
                for (k, x) in m {
                    if NEWER_FIELDS.contains(&k.as_str()) {
                        continue;
                    }
                    let masked = VARYING_FIELDS.contains(&k.as_str()) || (k == "version" && status);
                    let y = if masked {
                        type_marker(x)
                    } else if ID_FIELDS.contains(&k.as_str()) {
                        self.ids_in(x)
                    } else if k == "key" || k == "value" {
                        self.key(x)
                    } else {
                        self.walk(x)
                    };
                    let y = match y {
                        Value::Array(mut a) if UNORDERED_FIELDS.contains(&k.as_str()) => {
                            a.sort_by_key(|v| v.to_string());
                            Value::Array(a)
                        }
                        other => other,
                    };
                    out.insert(k.clone(), y);
                }
                Value::Object(out)
            }
            Value::Array(a) => Value::Array(a.iter().map(|x| self.walk(x)).collect()),
            other => other.clone(),
        }
    }

    fn ids_in(&mut self, v: &Value) -> Value {
        match v {
            Value::String(s) => Value::String(self.id(s)),
            Value::Number(n) => Value::String(self.id(&n.to_string())),
            Value::Array(a) => Value::Array(a.iter().map(|x| self.ids_in(x)).collect()),
            Value::Object(_) => self.walk(v),
            other => other.clone(),
        }
    }

    /// A base64 key or value: lease ids written into it in hex become their number.
    fn key(&mut self, v: &Value) -> Value {
        let Value::String(s) = v else {
            return v.clone();
        };
        let Some(text) = decode_base64(s).and_then(|b| String::from_utf8(b).ok()) else {
            return v.clone();
        };
        let mut text = text;
        for (id, name) in &self.ids {
            let Ok(n) = id.parse::<i64>() else { continue };
            let hex = format!("{n:x}");
            // Short ids would match ordinary text.
            if hex.len() >= 8 && text.contains(&hex) {
                text = text.replace(&hex, name);
            }
        }
        Value::String(format!("text:{text}"))
    }
}

fn type_marker(v: &Value) -> Value {
    Value::String(
        match v {
            Value::Null => "<null>",
            Value::Bool(_) => "<bool>",
            Value::Number(_) => "<number>",
            Value::String(_) => "<string>",
            Value::Array(_) => "<array>",
            Value::Object(_) => "<object>",
        }
        .to_string(),
    )
}

/// Standard base64 (what grpc-gateway writes).
pub fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for &c in s {
        acc = (acc << 6) | val(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for s in ["", "f", "fo", "foo", "foob", "fooba", "foobar"] {
            assert_eq!(decode_base64(&base64(s.as_bytes())).unwrap(), s.as_bytes());
        }
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"fo"), "Zm8=");
    }

    #[test]
    fn ids_are_numbered_and_lease_ids_found_in_keys() {
        let mut n = Normaliser::new();
        let grant = serde_json::json!({"header":{"cluster_id":"9","member_id":"8","revision":"3","raft_term":"2"},"ID":"4294967295","TTL":"60"});
        // Numbered in the order the (key-sorted) object shows them: `ID` first.
        let got = n.normalise(&grant);
        assert_eq!(
            got,
            serde_json::json!({"header":{"cluster_id":"<id2>","member_id":"<id3>","revision":"3","raft_term":"<string>"},"ID":"<id1>","TTL":"60"})
        );
        let lock = serde_json::json!({"key": base64(b"mylock/ffffffff")});
        assert_eq!(
            n.normalise(&lock),
            serde_json::json!({"key":"text:mylock/<id1>"})
        );
        // Short ids are not looked for in keys.
        n.normalise(&serde_json::json!({"ID": "255"}));
        let plain = serde_json::json!({"key": base64(b"ff")});
        assert_eq!(n.normalise(&plain), serde_json::json!({"key":"text:ff"}));
    }
}
