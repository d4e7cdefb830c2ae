//! A bench run's results and their three renderings: a table for people, JSON and CSV for
//! `scripts/bench.sh`.
//!
//! One [`Report`] struct holds every field any mode produces; a mode fills what applies and
//! the rest stays `None` and is left out of the JSON. The CSV has one fixed column set
//! ([`CSV_COLUMNS`]) for every mode, taken from the same JSON names, so rows of different
//! modes can share a file and a column never changes meaning; inapplicable cells are empty.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{Map, Value};

use super::{Common, Format};
use crate::tools::ToolError;

/// Every result a mode may produce. Times in the `*_us` fields are microseconds; sizes are
/// bytes, memory `*_kib` kibibytes.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Report {
    pub mode: &'static str,
    pub target: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Seconds since the Unix epoch when the results were written.
    pub unix_time: u64,
    pub connections: u32,
    pub threads: u16,
    /// The measured time (warm-up excluded).
    pub duration_s: f64,
    pub errors: u64,
    pub error_kinds: BTreeMap<&'static str, u64>,

    #[serde(skip_serializing_if = "Option::is_none")]
    pub direction: Option<&'static str>,
    /// Write size (throughput) or frame payload size (rr, connect, idle).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_up: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_down: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gbit_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gbit_per_s_up: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gbit_per_s_down: Option<f64>,

    /// "closed" or "open" (rr).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load: Option<&'static str>,
    /// Requested total rate of an open-loop run, req/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub req_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connects: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conn_per_s: Option<f64>,

    /// What the percentiles below measure: "rtt" (rr) or "connect" (connect).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p90_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p999_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_us: Option<f64>,
    /// connect mode: from the start of the connect to the answer of its one request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub txn_p50_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub txn_p99_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub txn_max_us: Option<f64>,

    /// Open-loop rr: how late the client's pacing timer woke when it had to wait. Charged
    /// to the latencies above; a floor under them that the target did not cause.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timer_late_p50_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timer_late_p99_us: Option<f64>,

    #[serde(skip_serializing_if = "Option::is_none")]
    pub established: Option<u64>,
    /// idle: connections that were still open (not closed by the peer) after the hold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alive_after_hold: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub settle_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_before_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_after_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_per_conn_bytes: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pss_before_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pss_after_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pss_per_conn_bytes: Option<f64>,
}

/// The CSV columns, in order: JSON field names of [`Report`].
pub const CSV_COLUMNS: &[&str] = &[
    "unix_time",
    "label",
    "mode",
    "target",
    "connections",
    "threads",
    "direction",
    "load",
    "rate",
    "size",
    "duration_s",
    "bytes",
    "gbit_per_s",
    "gbit_per_s_up",
    "gbit_per_s_down",
    "requests",
    "req_per_s",
    "connects",
    "conn_per_s",
    "latency",
    "min_us",
    "mean_us",
    "p50_us",
    "p90_us",
    "p99_us",
    "p999_us",
    "max_us",
    "txn_p50_us",
    "txn_p99_us",
    "timer_late_p50_us",
    "timer_late_p99_us",
    "established",
    "alive_after_hold",
    "rss_per_conn_bytes",
    "pss_per_conn_bytes",
    "errors",
];

/// Percentiles of a histogram of nanoseconds, in microseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Percentiles {
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    /// `None` for an empty histogram.
    pub fn of(h: &Histogram<u64>) -> Option<Self> {
        if h.is_empty() {
            return None;
        }
        let us = |ns: u64| round3(ns as f64 / 1e3);
        Some(Self {
            min: us(h.min()),
            mean: round3(h.mean() / 1e3),
            p50: us(h.value_at_quantile(0.5)),
            p90: us(h.value_at_quantile(0.9)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        })
    }
}

impl Report {
    /// Fills the latency fields from a histogram of nanoseconds.
    pub fn set_latency(&mut self, what: &'static str, h: &Histogram<u64>) {
        self.latency = Some(what);
        if let Some(p) = Percentiles::of(h) {
            self.min_us = Some(p.min);
            self.mean_us = Some(p.mean);
            self.p50_us = Some(p.p50);
            self.p90_us = Some(p.p90);
            self.p99_us = Some(p.p99);
            self.p999_us = Some(p.p999);
            self.max_us = Some(p.max);
        }
    }

    pub fn set_duration(&mut self, d: Duration) {
        self.duration_s = round3(d.as_secs_f64());
    }

    fn fields(&self) -> Map<String, Value> {
        match serde_json::to_value(self) {
            Ok(Value::Object(m)) => m,
            // A struct of plain fields always serializes to an object.
            _ => Map::new(),
        }
    }

    /// The JSON rendering, pretty-printed.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The CSV header line (no newline).
    pub fn csv_header() -> String {
        CSV_COLUMNS.join(",")
    }

    /// This report as one CSV row (no newline).
    pub fn to_csv_row(&self) -> String {
        let fields = self.fields();
        CSV_COLUMNS
            .iter()
            .map(|c| match fields.get(*c) {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => csv_quote(s),
                Some(v) => v.to_string(),
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The human table: one `name  value` line per result that applies.
    pub fn to_table(&self) -> String {
        let f = self.fields();
        let num = |k: &str| f.get(k).and_then(Value::as_f64);
        let mut rows: Vec<(&str, String)> = Vec::new();
        let mode = match (self.mode, self.load, self.direction) {
            (m, Some(l), _) => format!("{m} ({l} loop)"),
            (m, None, Some(d)) => format!("{m} ({d})"),
            (m, None, None) => m.to_string(),
        };
        rows.push(("mode", mode));
        rows.push(("target", self.target.clone()));
        if let Some(l) = &self.label {
            rows.push(("label", l.clone()));
        }
        rows.push((
            "connections",
            format!("{} ({} thread(s))", self.connections, self.threads),
        ));
        if let Some(s) = self.size {
            rows.push(("size", format!("{s} B")));
        }
        rows.push(("duration", format!("{:.3} s", self.duration_s)));
        if let Some(b) = self.bytes {
            let mut v = format!("{b} B, {:.3} Gbit/s", num("gbit_per_s").unwrap_or(0.0));
            if let (Some(u), Some(d)) = (self.gbit_per_s_up, self.gbit_per_s_down) {
                v.push_str(&format!(" (up {u:.3}, down {d:.3})"));
            }
            rows.push(("transferred", v));
        }
        if let Some(r) = self.requests {
            let mut v = format!("{r}, {:.1} req/s", self.req_per_s.unwrap_or(0.0));
            if let Some(rate) = self.rate {
                v.push_str(&format!(" (asked for {rate:.1} req/s)"));
            }
            rows.push(("requests", v));
        }
        if let Some(c) = self.connects {
            rows.push((
                "connections made",
                format!("{c}, {:.1} conn/s", self.conn_per_s.unwrap_or(0.0)),
            ));
        }
        if let (Some(what), Some(p50)) = (self.latency, self.p50_us) {
            rows.push((
                "latency",
                format!(
                    "{what}: min {} / p50 {p50} / p90 {} / p99 {} / p99.9 {} / max {} us (mean {})",
                    self.min_us.unwrap_or(0.0),
                    self.p90_us.unwrap_or(0.0),
                    self.p99_us.unwrap_or(0.0),
                    self.p999_us.unwrap_or(0.0),
                    self.max_us.unwrap_or(0.0),
                    self.mean_us.unwrap_or(0.0),
                ),
            ));
        }
        if let (Some(p50), Some(p99), Some(max)) =
            (self.txn_p50_us, self.txn_p99_us, self.txn_max_us)
        {
            rows.push((
                "connect+request",
                format!("p50 {p50} / p99 {p99} / max {max} us"),
            ));
        }
        if let (Some(p50), Some(p99)) = (self.timer_late_p50_us, self.timer_late_p99_us) {
            rows.push((
                "pacing",
                format!("own timer woke late by p50 {p50} / p99 {p99} us (included above)"),
            ));
        }
        if let Some(e) = self.established {
            let mut v = e.to_string();
            if let Some(a) = self.alive_after_hold {
                v.push_str(&format!(", {a} still open after the hold"));
            }
            rows.push(("established", v));
        }
        if let Some(pid) = self.pid {
            let mem = |before: Option<u64>, after: Option<u64>, per: Option<f64>| match (
                before, after, per,
            ) {
                (Some(b), Some(a), Some(p)) => {
                    format!("{b} KiB -> {a} KiB, {p:.0} B per connection")
                }
                (Some(b), Some(a), None) => format!("{b} KiB -> {a} KiB"),
                _ => "unreadable".to_string(),
            };
            rows.push((
                "rss",
                format!(
                    "pid {pid}: {}",
                    mem(
                        self.rss_before_kib,
                        self.rss_after_kib,
                        self.rss_per_conn_bytes
                    )
                ),
            ));
            rows.push((
                "pss",
                format!(
                    "pid {pid}: {}",
                    mem(
                        self.pss_before_kib,
                        self.pss_after_kib,
                        self.pss_per_conn_bytes
                    )
                ),
            ));
        }
        let mut errors = self.errors.to_string();
        if !self.error_kinds.is_empty() {
            let kinds: Vec<String> = self
                .error_kinds
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            errors.push_str(&format!(" ({})", kinds.join(", ")));
        }
        rows.push(("errors", errors));
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        rows.iter()
            .map(|(k, v)| format!("{k:<width$}  {v}\n"))
            .collect()
    }
}

/// Rounds to three decimals: the JSON need not carry float noise.
pub fn round3(x: f64) -> f64 {
    (x * 1e3).round() / 1e3
}

fn csv_quote(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Prints the results (table or JSON on stdout) and writes the `--json` / `--csv` files.
///
/// # Errors
/// A results file that cannot be written, or a CSV file with another header.
pub fn emit(report: &Report, common: &Common) -> Result<(), ToolError> {
    let mut report = report.clone();
    report.unix_time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    match common.format {
        Format::Human => print!("{}", report.to_table()),
        Format::Json => println!("{}", report.to_json()),
    }
    if let Some(path) = &common.json {
        std::fs::write(path, report.to_json() + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if let Some(path) = &common.csv {
        append_csv(path, &report)?;
    }
    Ok(())
}

/// Appends one row, writing the header first if the file is new or empty. A file that starts
/// with a different header is refused rather than mixed.
fn append_csv(path: &Path, report: &Report) -> Result<(), ToolError> {
    let header = Report::csv_header();
    let fail = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(path)
        .map_err(fail)?;
    let mut first = String::new();
    BufReader::new(&file).read_line(&mut first).map_err(fail)?;
    let mut out = String::new();
    if first.is_empty() {
        out.push_str(&header);
        out.push('\n');
    } else if first.trim_end() != header {
        return Err(format!(
            "{} has other CSV columns than this version writes; use a new file",
            path.display()
        )
        .into());
    }
    out.push_str(&report.to_csv_row());
    out.push('\n');
    file.write_all(out.as_bytes()).map_err(fail)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> Report {
        Report {
            mode: "rr",
            target: "127.0.0.1:1".into(),
            label: Some("uring, copy \"x\"".into()),
            unix_time: 1,
            connections: 2,
            threads: 1,
            duration_s: 1.0,
            errors: 3,
            error_kinds: [("timeout", 3)].into_iter().collect(),
            direction: Some("up"),
            size: Some(64),
            bytes: Some(1),
            bytes_up: Some(1),
            bytes_down: Some(0),
            gbit_per_s: Some(0.5),
            gbit_per_s_up: Some(0.5),
            gbit_per_s_down: Some(0.0),
            load: Some("open"),
            rate: Some(100.0),
            requests: Some(10),
            req_per_s: Some(10.0),
            connects: Some(1),
            conn_per_s: Some(1.0),
            latency: Some("rtt"),
            min_us: Some(1.0),
            mean_us: Some(2.0),
            p50_us: Some(2.0),
            p90_us: Some(3.0),
            p99_us: Some(4.0),
            p999_us: Some(5.0),
            max_us: Some(6.0),
            txn_p50_us: Some(7.0),
            txn_p99_us: Some(8.0),
            txn_max_us: Some(9.0),
            timer_late_p50_us: Some(1.0),
            timer_late_p99_us: Some(2.0),
            established: Some(2),
            alive_after_hold: Some(2),
            settle_s: Some(1.0),
            pid: Some(1),
            rss_before_kib: Some(1),
            rss_after_kib: Some(2),
            rss_per_conn_bytes: Some(512.0),
            pss_before_kib: Some(1),
            pss_after_kib: Some(2),
            pss_per_conn_bytes: Some(512.0),
        }
    }

    #[test]
    fn every_csv_column_is_a_report_field() {
        let fields = full().fields();
        for c in CSV_COLUMNS {
            assert!(fields.contains_key(*c), "column {c} is not a field");
        }
    }

    #[test]
    fn inapplicable_fields_are_left_out_of_json_and_empty_in_csv() {
        let r = Report {
            mode: "throughput",
            target: "t".into(),
            bytes: Some(10),
            ..Report::default()
        };
        let json: Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(json["bytes"], 10);
        assert!(json.get("p50_us").is_none());
        assert!(json.get("label").is_none());
        let row = r.to_csv_row();
        assert_eq!(row.split(',').count(), CSV_COLUMNS.len());
        assert!(row.contains(",throughput,t,"), "{row}");
    }

    #[test]
    fn csv_quotes_text_with_commas_and_quotes() {
        let row = full().to_csv_row();
        assert!(row.contains(",\"uring, copy \"\"x\"\"\",rr,"), "{row}");
    }

    #[test]
    fn csv_file_gets_one_header_and_refuses_a_foreign_one() {
        let dir = std::env::temp_dir().join(format!("ringfwd-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.csv");
        let _ = std::fs::remove_file(&path);
        append_csv(&path, &full()).unwrap();
        append_csv(&path, &full()).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], Report::csv_header());
        assert_eq!(lines[1], lines[2]);
        std::fs::write(&path, "a,b\n").unwrap();
        let e = append_csv(&path, &full()).unwrap_err();
        assert!(e.to_string().contains("other CSV columns"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn percentiles_come_from_the_histogram_in_microseconds() {
        let mut h = super::super::new_histogram();
        for us in 1..=1000u64 {
            h.record(us * 1000).unwrap();
        }
        let p = Percentiles::of(&h).unwrap();
        assert_eq!(p.min, 1.0);
        assert!((p.p50 - 500.0).abs() <= 1.0, "{p:?}");
        assert!((p.p99 - 990.0).abs() <= 1.0, "{p:?}");
        assert!((p.max - 1000.0).abs() <= 1.0, "{p:?}");
        assert!(Percentiles::of(&super::super::new_histogram()).is_none());
    }

    #[test]
    fn table_names_what_was_measured() {
        let t = full().to_table();
        assert!(t.contains("mode"), "{t}");
        assert!(t.contains("rr (open loop)"), "{t}");
        assert!(t.contains("asked for 100.0 req/s"), "{t}");
        assert!(t.contains("errors"), "{t}");
        assert!(t.contains("3 (timeout 3)"), "{t}");
    }
}
