//! The JSON document served at `/stats` and read by `ringfwd stats`: every counter and, per
//! histogram, its count and p50/p90/p99/p99.9/max.
//!
//! One set of types serves both ends (serialized by the admin listener, deserialized by the
//! tool), so the two cannot drift apart. Maps are keyed by the same label values the
//! Prometheus output uses (`max_connections`, `refused`, `client_to_upstream`, `splice`, …).

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::{
    ConnectError, Direction, HistogramKind, Metrics, PathKind, RejectReason, RuleSnapshot,
};

/// The quantiles every summary carries, with the JSON field each one is written to.
pub const QUANTILES: [f64; 4] = [0.5, 0.9, 0.99, 0.999];

/// The whole `/stats` document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatsReport {
    /// Seconds since the forwarder's metrics were created: rates are counter deltas divided
    /// by uptime deltas.
    pub uptime_seconds: f64,
    pub rules: Vec<RuleReport>,
}

/// One rule's counters and histogram summaries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RuleReport {
    pub name: String,
    pub accepted: u64,
    pub active: u64,
    /// By [`RejectReason`] label.
    pub rejected: BTreeMap<String, u64>,
    /// By [`ConnectError`] label.
    pub connect_errors: BTreeMap<String, u64>,
    /// `bytes[direction][path]`, e.g. `bytes["client_to_upstream"]["splice"]`.
    pub bytes: BTreeMap<String, BTreeMap<String, u64>>,
    /// By [`HistogramKind`] name.
    pub histograms: BTreeMap<String, HistogramSummary>,
}

impl RuleReport {
    /// Bytes moved in one direction, both paths together.
    pub fn bytes_dir(&self, dir: Direction) -> u64 {
        self.bytes
            .get(dir.as_str())
            .map_or(0, |paths| paths.values().sum())
    }

    /// Bytes moved in one direction by one path.
    pub fn bytes_path(&self, dir: Direction, path: PathKind) -> u64 {
        self.bytes
            .get(dir.as_str())
            .and_then(|p| p.get(path.as_str()))
            .copied()
            .unwrap_or(0)
    }
}

/// A histogram's size and quantiles, in microseconds (HdrHistogram's highest equivalent
/// value, i.e. within 0.1 % above the true value). All zero when nothing was recorded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistogramSummary {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl HistogramSummary {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let [p50, p90, p99, p999] = QUANTILES.map(|q| h.value_at_quantile(q));
        Self {
            count: h.len(),
            p50_us: p50,
            p90_us: p90,
            p99_us: p99,
            p999_us: p999,
            max_us: h.max(),
        }
    }

    /// The quantiles in [`QUANTILES`] order, then the max.
    pub fn values_us(&self) -> [u64; 5] {
        [
            self.p50_us,
            self.p90_us,
            self.p99_us,
            self.p999_us,
            self.max_us,
        ]
    }
}

impl RuleReport {
    pub fn from_snapshot(s: &RuleSnapshot) -> Self {
        Self {
            name: s.name.clone(),
            accepted: s.accepted,
            active: s.active,
            rejected: RejectReason::ALL
                .iter()
                .map(|r| (r.as_str().to_string(), s.rejected[*r as usize]))
                .collect(),
            connect_errors: ConnectError::ALL
                .iter()
                .map(|e| (e.as_str().to_string(), s.connect_errors[*e as usize]))
                .collect(),
            bytes: Direction::ALL
                .iter()
                .map(|d| {
                    let paths = PathKind::ALL
                        .iter()
                        .map(|p| (p.as_str().to_string(), s.bytes_path(*d, *p)))
                        .collect();
                    (d.as_str().to_string(), paths)
                })
                .collect(),
            histograms: HistogramKind::ALL
                .iter()
                .map(|k| {
                    (
                        k.as_str().to_string(),
                        HistogramSummary::of(s.histogram(*k)),
                    )
                })
                .collect(),
        }
    }
}

impl StatsReport {
    /// Merges every rule's shards now.
    pub fn collect(metrics: &Metrics) -> Self {
        Self {
            uptime_seconds: metrics.uptime().as_secs_f64(),
            rules: metrics
                .rules()
                .iter()
                .map(|r| RuleReport::from_snapshot(&r.snapshot()))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn report_carries_counters_and_quantiles_and_round_trips() {
        let m = Metrics::new(&["web"], 2);
        let r = m.rule(0);
        for ms in 1..=100u64 {
            r.shard(ms as usize).accepted();
            r.shard(ms as usize).connected(Duration::from_millis(ms));
        }
        r.shard(0)
            .bytes(Direction::UpstreamToClient, PathKind::Splice, 4000);
        r.shard(1)
            .bytes(Direction::UpstreamToClient, PathKind::Copy, 1000);
        r.shard(1).connect_error(ConnectError::Refused);

        let report = StatsReport::collect(&m);
        let json = serde_json::to_string(&report).unwrap();
        let back: StatsReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, report);

        let w = &back.rules[0];
        assert_eq!((w.accepted, w.active), (100, 100));
        assert_eq!(w.bytes_dir(Direction::UpstreamToClient), 5000);
        assert_eq!(
            w.bytes_path(Direction::UpstreamToClient, PathKind::Splice),
            4000
        );
        assert_eq!(w.bytes_dir(Direction::ClientToUpstream), 0);
        assert_eq!(w.connect_errors["refused"], 1);
        assert_eq!(w.rejected["max_connections"], 0);
        let c = w.histograms["upstream_connect"];
        assert_eq!(c.count, 100);
        // 1..=100 ms: p50 is 50 ms, p90 90 ms, max 100 ms, each within the histogram's
        // 1/128 (two significant digits).
        for (got, want) in [(c.p50_us, 50_000), (c.p90_us, 90_000), (c.max_us, 100_000)] {
            assert!(got >= want && got <= want + want / 128, "{got} vs {want}");
        }
        assert_eq!(w.histograms["session"], HistogramSummary::default());
        assert_eq!(w.histograms.len(), HistogramKind::ALL.len());
    }
}
