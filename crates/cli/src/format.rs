//! etcdctl's output formats for the commands concordctl shares with it.

use crate::snapshot::Status;

/// A byte count as etcdctl prints it (go-humanize's `Bytes`: SI units, one decimal
/// below 10): `544 B`, `9.5 kB`, `709 kB`, `1.1 MB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    if n < 10 {
        return format!("{n} B");
    }
    let e = ((n as f64).ln() / 1000f64.ln()).floor() as usize;
    let e = e.min(UNITS.len() - 1);
    let val = (n as f64 / 1000f64.powi(e as i32) * 10.0 + 0.5).floor() / 10.0;
    if e == 0 {
        format!("{n} B")
    } else if val < 10.0 {
        format!("{val:.1} {}", UNITS[e])
    } else {
        format!("{val:.0} {}", UNITS[e])
    }
}

/// `snapshot status` in etcdctl's `-w simple` (its default): `hash, revision, keys, size`.
pub fn status_simple(s: &Status) -> String {
    format!(
        "{:x}, {}, {}, {}",
        s.hash,
        s.revision,
        s.total_keys,
        human_bytes(s.total_size)
    )
}

/// `snapshot status -w json`, with etcdctl's field names.
pub fn status_json(s: &Status) -> String {
    serde_json::json!({
        "hash": s.hash,
        "revision": s.revision,
        "totalKey": s.total_keys,
        "totalSize": s.total_size,
    })
    .to_string()
}

/// `snapshot status -w table`: etcdctl's bordered table.
pub fn status_table(s: &Status) -> String {
    table(
        &["HASH", "REVISION", "TOTAL KEYS", "TOTAL SIZE"],
        &[vec![
            format!("{:x}", s.hash),
            s.revision.to_string(),
            s.total_keys.to_string(),
            human_bytes(s.total_size),
        ]],
    )
}

/// A table as etcdctl's tablewriter draws it: centred headers, right-aligned cells.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = header
        .iter()
        .enumerate()
        .map(|(i, h)| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([h.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let rule: String = widths
        .iter()
        .map(|w| format!("+{}", "-".repeat(w + 2)))
        .collect::<String>()
        + "+\n";
    let mut out = rule.clone();
    for (h, w) in header.iter().zip(&widths) {
        let pad = w - h.len();
        let left = pad / 2 + pad % 2;
        out += &format!("| {}{}{} ", " ".repeat(left), h, " ".repeat(pad - left));
    }
    out += "|\n";
    out += &rule;
    for r in rows {
        for (c, w) in r.iter().zip(&widths) {
            out += &format!("| {c:>w$} ");
        }
        out += "|\n";
    }
    out += &rule;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_like_go_humanize() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(544), "544 B");
        assert_eq!(human_bytes(9_500), "9.5 kB");
        assert_eq!(human_bytes(20_480), "20 kB");
        assert_eq!(human_bytes(708_608), "709 kB");
        assert_eq!(human_bytes(1_100_000), "1.1 MB");
    }

    #[test]
    fn status_outputs_match_etcdctl() {
        // The figures etcdctl 3.4 printed for one of its snapshot files.
        let s = Status {
            hash: 0xc187_9e2e,
            revision: 16,
            total_keys: 20,
            total_size: 708_608,
        };
        assert_eq!(status_simple(&s), "c1879e2e, 16, 20, 709 kB");
        assert_eq!(
            status_json(&s),
            r#"{"hash":3246890542,"revision":16,"totalKey":20,"totalSize":708608}"#
        );
        assert_eq!(
            status_table(&s),
            "+----------+----------+------------+------------+\n\
             |   HASH   | REVISION | TOTAL KEYS | TOTAL SIZE |\n\
             +----------+----------+------------+------------+\n\
             | c1879e2e |       16 |         20 |     709 kB |\n\
             +----------+----------+------------+------------+\n"
        );
    }
}
