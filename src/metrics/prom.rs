//! Prometheus exposition: a `prometheus-client` [`Collector`] that merges every rule's shards
//! at scrape time and encodes them as OpenMetrics text.
//!
//! Nothing is kept between scrapes: the shards are the source of truth, so a scrape costs one
//! merge and the data path never learns that Prometheus exists. Histograms are exported in
//! seconds with log-spaced buckets (1, 2, 5 × 10^k from 10 µs to 50 s, then 60 s, the
//! recording ceiling) computed from the merged HDR data, and their p50/p90/p99/p99.9/max as a
//! gauge family `<histogram>_quantile{quantile="…"}` (`quantile="1"` is the max), because
//! fixed buckets alone lose the tail HdrHistogram keeps.
//!
//! Bucket boundaries use HdrHistogram's lowest equivalent value of each recorded bucket, so a
//! value is never counted above its bucket; one within HDR's 0.1 % precision above a boundary
//! may be counted at it. Sums are `mean × count` over the HDR data (the same precision).

use std::sync::Arc;

use hdrhistogram::Histogram;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

use super::report::QUANTILES;
use super::{
    ConnectError, Direction, HistogramKind, Metrics, PathKind, RejectReason, RuleSnapshot,
};
use crate::config::DEFAULT_ROUTE;
use crate::upstream::MemberSnapshot;

/// The `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds of the histogram buckets, in microseconds (before `+Inf`).
pub const BUCKET_BOUNDS_US: [u64; 23] = [
    10,
    20,
    50,
    100,
    200,
    500,
    1_000,
    2_000,
    5_000,
    10_000,
    20_000,
    50_000,
    100_000,
    200_000,
    500_000,
    1_000_000,
    2_000_000,
    5_000_000,
    10_000_000,
    20_000_000,
    50_000_000,
    60_000_000,
    u64::MAX,
];

/// The per-member families: up, connections, active connections, health checks.
/// One pool's members: (rule, route, members).
type PoolMembers<'a> = (&'a str, &'a str, Vec<MemberSnapshot>);

fn encode_members(
    enc: &mut DescriptorEncoder,
    pools: &[PoolMembers<'_>],
) -> Result<(), std::fmt::Error> {
    let all: Vec<(&str, &str, String, &MemberSnapshot)> = pools
        .iter()
        .flat_map(|(rule, route, ms)| {
            ms.iter()
                .map(move |m| (*rule, *route, m.addr.to_string(), m))
        })
        .collect();
    let mut f = enc.encode_descriptor(
        "ringfwd_upstream_up",
        "1 if the member takes traffic (health checks pass, not ejected after connect failures, not set to drain or down by the member API).",
        None,
        MetricType::Gauge,
    )?;
    for (rule, route, addr, m) in &all {
        ConstGauge::new(i64::from(m.up)).encode(f.encode_family(&[
            ("rule", *rule),
            ("route", *route),
            ("upstream", addr.as_str()),
        ])?)?;
    }
    let mut f = enc.encode_descriptor(
        "ringfwd_upstream_admin_state",
        "1 for the state the operator set on the member through the member API (up, drain, down), 0 for the others.",
        None,
        MetricType::Gauge,
    )?;
    for (rule, route, addr, m) in &all {
        for state in crate::upstream::member::AdminState::ALL {
            ConstGauge::new(i64::from(m.admin == state)).encode(f.encode_family(&[
                ("rule", *rule),
                ("route", *route),
                ("upstream", addr.as_str()),
                ("state", state.as_str()),
            ])?)?;
        }
    }
    let mut f = enc.encode_descriptor(
        "ringfwd_upstream_connections",
        "Connections established to the member.",
        None,
        MetricType::Counter,
    )?;
    for (rule, route, addr, m) in &all {
        ConstCounter::new(m.connections).encode(f.encode_family(&[
            ("rule", *rule),
            ("route", *route),
            ("upstream", addr.as_str()),
        ])?)?;
    }
    let mut f = enc.encode_descriptor(
        "ringfwd_upstream_connections_active",
        "Live connections to the member, across every worker.",
        None,
        MetricType::Gauge,
    )?;
    for (rule, route, addr, m) in &all {
        ConstGauge::new(m.active).encode(f.encode_family(&[
            ("rule", *rule),
            ("route", *route),
            ("upstream", addr.as_str()),
        ])?)?;
    }
    let mut f = enc.encode_descriptor(
        "ringfwd_health_checks",
        "Active health-check probes of the member, by result.",
        None,
        MetricType::Counter,
    )?;
    for (rule, route, addr, m) in &all {
        for (i, result) in ["ok", "fail"].into_iter().enumerate() {
            let labels = [
                ("rule", *rule),
                ("route", *route),
                ("upstream", addr.as_str()),
                ("result", result),
            ];
            ConstCounter::new(m.checks[i]).encode(f.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

/// One labelled histogram series: its labels (without `le`/`quantile`) and its data.
type Series<'a> = (Vec<(&'a str, &'a str)>, &'a Histogram<u64>);

/// Merges and encodes [`Metrics`] on every scrape.
pub struct MetricsCollector {
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for MetricsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsCollector")
            .field("rules", &self.metrics.rules().len())
            .finish()
    }
}

impl MetricsCollector {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

/// A registry holding the ringfwd collector and the standard process metrics.
pub fn registry(metrics: Arc<Metrics>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(MetricsCollector::new(metrics)));
    r.register_collector(Box::new(super::process::ProcessCollector));
    r
}

/// Encodes a registry as OpenMetrics text (ends with `# EOF`).
pub fn render(registry: &Registry) -> String {
    let mut out = String::with_capacity(16 << 10);
    // Writing to a String cannot fail, and the collector's encoders only fail on write errors.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// The per-rule histograms, with the metric name stem (before `_seconds`) and help text.
const HISTOGRAMS: [(HistogramKind, &str, &str); 3] = [
    (
        HistogramKind::UpstreamConnect,
        "ringfwd_upstream_connect",
        "Time from accept to the upstream connect completing.",
    ),
    (
        HistogramKind::FirstByte,
        "ringfwd_first_byte",
        "Time from accept to the first byte read from the upstream.",
    ),
    (
        HistogramKind::Session,
        "ringfwd_session_duration",
        "Time from accept to the end of the session.",
    ),
];

impl Collector for MetricsCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snaps: Vec<RuleSnapshot> = self.metrics.rules().iter().map(|r| r.snapshot()).collect();

        if let Some((engine, mode)) = self.metrics.build_info() {
            let mut f = enc.encode_descriptor(
                "ringfwd_build_info",
                "Always 1; the labels say which version runs, with which engine and data path.",
                None,
                MetricType::Gauge,
            )?;
            let labels = [
                ("version", env!("CARGO_PKG_VERSION")),
                ("engine", engine),
                ("mode", mode),
            ];
            ConstGauge::new(1i64).encode(f.encode_family(&labels)?)?;
        }

        let mut f = enc.encode_descriptor(
            "ringfwd_accepts",
            "Connections accepted by each io_uring worker, by whether the CPU that processed their packets (SO_INCOMING_CPU) is the worker's.",
            None,
            MetricType::Counter,
        )?;
        // Samples only where the io_uring engine runs: the others do not look at CPUs.
        if let Some(("uring", _)) = self.metrics.build_info() {
            for (w, [other, same]) in self.metrics.accepts().into_iter().enumerate() {
                let worker = w.to_string();
                for (n, m) in [(same, "true"), (other, "false")] {
                    let labels = [("worker", worker.as_str()), ("cpu_match", m)];
                    ConstCounter::new(n).encode(f.encode_family(&labels)?)?;
                }
            }
        }

        let mut f = enc.encode_descriptor(
            "ringfwd_config_reloads",
            "Config reloads (SIGHUP, POST /reload, watch_config), by result.",
            None,
            MetricType::Counter,
        )?;
        let [ok, failed] = self.metrics.reloads();
        ConstCounter::new(ok).encode(f.encode_family(&[("result", "success")])?)?;
        ConstCounter::new(failed).encode(f.encode_family(&[("result", "failure")])?)?;
        let f = enc.encode_descriptor(
            "ringfwd_config_last_reload_success_timestamp_seconds",
            "Unix time the running config took effect (start-up or the last successful reload).",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(self.metrics.last_reload_success()).encode(f)?;
        let f = enc.encode_descriptor(
            "ringfwd_admin_unauthorized",
            "Admin requests to a state-changing endpoint turned away for a wrong or missing token.",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(self.metrics.unauthorized_count()).encode(f)?;

        let mut f = enc.encode_descriptor(
            "ringfwd_connections_accepted",
            "Client connections accepted, by the route they took (a rule with SNI routes counts a connection once its route is chosen).",
            None,
            MetricType::Counter,
        )?;
        let runtime = self.metrics.runtime();
        for s in &snaps {
            // By name: after a reload, the metrics hold every rule any config had.
            match runtime
                .as_ref()
                .and_then(|rt| rt.rules.iter().find(|r| r.rule.name == s.name))
                .filter(|r| !r.rule.routes.is_empty())
            {
                Some(r) => {
                    for p in &r.pools {
                        let labels = [("rule", s.name.as_str()), ("route", p.route.as_str())];
                        ConstCounter::new(p.sessions()).encode(f.encode_family(&labels)?)?;
                    }
                }
                None => {
                    let labels = [("rule", s.name.as_str()), ("route", DEFAULT_ROUTE)];
                    ConstCounter::new(s.accepted).encode(f.encode_family(&labels)?)?;
                }
            }
        }

        let mut f = enc.encode_descriptor(
            "ringfwd_connections_active",
            "Sessions accepted and not yet closed.",
            None,
            MetricType::Gauge,
        )?;
        for s in &snaps {
            ConstGauge::new(s.active).encode(f.encode_family(&[("rule", s.name.as_str())])?)?;
        }

        let mut f = enc.encode_descriptor(
            "ringfwd_connections_rejected",
            "Connections turned away before reaching the upstream, by reason.",
            None,
            MetricType::Counter,
        )?;
        for s in &snaps {
            for r in RejectReason::ALL {
                let labels = [("rule", s.name.as_str()), ("reason", r.as_str())];
                ConstCounter::new(s.rejected[r as usize]).encode(f.encode_family(&labels)?)?;
            }
        }

        let tables: Vec<(&str, [u64; 2])> = runtime
            .as_ref()
            .map(|rt| {
                rt.rules
                    .iter()
                    .filter_map(|r| Some((r.rule.name.as_str(), r.client_table_counts()?)))
                    .collect()
            })
            .unwrap_or_default();
        for (i, (name, help)) in [
            (
                "ringfwd_client_table_evictions",
                "Per-client table entries given to a new client while their own, holding no connection, was inside its rate window.",
            ),
            (
                "ringfwd_client_table_untracked",
                "Connections admitted without a per-client table entry: every slot their client may use held a live connection.",
            ),
        ]
        .into_iter()
        .enumerate()
        {
            let mut f = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (rule, counts) in &tables {
                ConstCounter::new(counts[i]).encode(f.encode_family(&[("rule", *rule)])?)?;
            }
        }

        let pools: Vec<PoolMembers<'_>> = runtime
            .as_ref()
            .map(|rt| {
                let now = std::time::Instant::now();
                rt.rules
                    .iter()
                    .flat_map(|r| {
                        r.pools.iter().map(move |p| {
                            (r.rule.name.as_str(), p.route.as_str(), p.pool.snapshot(now))
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut f = enc.encode_descriptor(
            "ringfwd_upstream_connect_errors",
            "Failed upstream connects, by member and reason.",
            None,
            MetricType::Counter,
        )?;
        if pools.is_empty() {
            // No pools to read (a bare `Metrics`, as in unit tests): per rule only.
            for s in &snaps {
                for e in ConnectError::ALL {
                    let labels = [("rule", s.name.as_str()), ("reason", e.as_str())];
                    ConstCounter::new(s.connect_errors[e as usize])
                        .encode(f.encode_family(&labels)?)?;
                }
            }
        }
        for (rule, route, members) in &pools {
            for m in members {
                let addr = m.addr.to_string();
                for e in ConnectError::ALL {
                    let labels = [
                        ("rule", *rule),
                        ("route", *route),
                        ("upstream", addr.as_str()),
                        ("reason", e.as_str()),
                    ];
                    ConstCounter::new(m.connect_errors[e as usize])
                        .encode(f.encode_family(&labels)?)?;
                }
            }
        }
        encode_members(&mut enc, &pools)?;

        let mut f = enc.encode_descriptor(
            "ringfwd_bytes",
            "Bytes forwarded, by direction and data path.",
            None,
            MetricType::Counter,
        )?;
        for s in &snaps {
            for d in Direction::ALL {
                for p in PathKind::ALL {
                    let labels = [
                        ("rule", s.name.as_str()),
                        ("direction", d.as_str()),
                        ("path", p.as_str()),
                    ];
                    ConstCounter::new(s.bytes_path(d, p)).encode(f.encode_family(&labels)?)?;
                }
            }
        }

        for (kind, stem, help) in HISTOGRAMS {
            let series: Vec<Series<'_>> = snaps
                .iter()
                .map(|s| (vec![("rule", s.name.as_str())], s.histogram(kind)))
                .collect();
            encode_histogram_family(&mut enc, stem, help, &series)?;
        }
        let series: Vec<Series<'_>> = snaps
            .iter()
            .flat_map(|s| {
                Direction::ALL.map(|d| {
                    (
                        vec![("rule", s.name.as_str()), ("direction", d.as_str())],
                        &s.transfer[d as usize],
                    )
                })
            })
            .collect();
        encode_histogram_family(
            &mut enc,
            "ringfwd_transfer",
            "Time from a read's completion to the matching write's completion.",
            &series,
        )?;

        let rules = self.metrics.rules();
        let taps: Vec<(&str, u64)> = rules
            .iter()
            .filter_map(|r| r.tap().map(|t| (r.name.as_str(), t.dropped().0)))
            .collect();
        if !taps.is_empty() {
            let mut f = enc.encode_descriptor(
                "ringfwd_tap_dropped_events",
                "Tap events dropped because the tap writer fell behind (rules with a tap only).",
                None,
                MetricType::Counter,
            )?;
            for (rule, n) in taps {
                ConstCounter::new(n).encode(f.encode_family(&[("rule", rule)])?)?;
            }
        }
        Ok(())
    }
}

/// Encodes `<stem>_seconds` (histogram) and `<stem>_seconds_quantile` (gauge) for each
/// labelled series.
fn encode_histogram_family(
    enc: &mut DescriptorEncoder,
    stem: &str,
    help: &str,
    series: &[Series<'_>],
) -> Result<(), std::fmt::Error> {
    {
        let mut f =
            enc.encode_descriptor(stem, help, Some(&Unit::Seconds), MetricType::Histogram)?;
        for (labels, h) in series {
            let buckets = buckets_seconds(h);
            let sum = if h.is_empty() {
                0.0
            } else {
                h.mean() * h.len() as f64 / 1e6
            };
            f.encode_family(labels)?.encode_histogram::<NoLabelSet>(
                sum,
                h.len(),
                &buckets,
                None,
            )?;
        }
    }
    let name = format!("{stem}_seconds_quantile");
    let qhelp = format!("{help} Quantiles from the HDR histogram (quantile=\"1\" is the max).");
    let mut f = enc.encode_descriptor(&name, &qhelp, None, MetricType::Gauge)?;
    for (labels, h) in series {
        for (q, label) in QUANTILES
            .iter()
            .map(|&q| (q, q.to_string()))
            .chain([(1.0, "1".to_string())])
        {
            let v = if h.is_empty() {
                f64::NAN
            } else if q >= 1.0 {
                h.max() as f64 / 1e6
            } else {
                h.value_at_quantile(q) as f64 / 1e6
            };
            let mut l = labels.clone();
            l.push(("quantile", label.as_str()));
            ConstGauge::new(v).encode(f.encode_family(&l)?)?;
        }
    }
    Ok(())
}

/// Non-cumulative counts per bucket of [`BUCKET_BOUNDS_US`] (the encoder accumulates), with
/// the bounds in seconds and the last one `+Inf`.
fn buckets_seconds(h: &Histogram<u64>) -> Vec<(f64, u64)> {
    let mut counts = [0u64; BUCKET_BOUNDS_US.len()];
    for v in h.iter_recorded() {
        let low = h.lowest_equivalent(v.value_iterated_to());
        let i = BUCKET_BOUNDS_US.partition_point(|&b| b < low);
        counts[i.min(counts.len() - 1)] += v.count_since_last_iteration();
    }
    BUCKET_BOUNDS_US
        .iter()
        .zip(counts)
        .map(|(&b, n)| {
            let le = if b == u64::MAX {
                f64::INFINITY
            } else {
                b as f64 / 1e6
            };
            (le, n)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn lines_with<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
        text.lines().filter(|l| l.starts_with(prefix)).collect()
    }

    fn sample() -> Arc<Metrics> {
        let m = Metrics::new(&["web", "db"], 2);
        let web = m.rule(0);
        for i in 0..3 {
            web.shard(i).accepted();
        }
        web.shard(1).closed(Duration::from_millis(150));
        web.shard(0).rejected(RejectReason::MaxConnections);
        web.shard(1).connect_error(ConnectError::Timeout);
        web.shard(0)
            .bytes(Direction::ClientToUpstream, PathKind::Copy, 1000);
        web.shard(1)
            .bytes(Direction::ClientToUpstream, PathKind::Splice, 24);
        web.shard(1)
            .bytes(Direction::UpstreamToClient, PathKind::Splice, 65536);
        // Connect times: 15 µs, 40 µs, 3 ms, 3 ms.
        web.shard(0).connected(Duration::from_micros(15));
        web.shard(1).connected(Duration::from_micros(40));
        web.shard(0).connected(Duration::from_millis(3));
        web.shard(1).connected(Duration::from_millis(3));
        web.shard(0)
            .transfer(Direction::UpstreamToClient, Duration::from_micros(10));
        m
    }

    #[test]
    fn counters_and_gauges_have_the_documented_names_and_labels() {
        let text = render(&registry(sample()));
        assert!(text.ends_with("# EOF\n"), "{text}");
        for want in [
            "# TYPE ringfwd_connections_accepted counter",
            "ringfwd_connections_accepted_total{rule=\"web\",route=\"default\"} 3",
            "ringfwd_connections_accepted_total{rule=\"db\",route=\"default\"} 0",
            "# TYPE ringfwd_connections_active gauge",
            "ringfwd_connections_active{rule=\"web\"} 2",
            "ringfwd_connections_rejected_total{rule=\"web\",reason=\"max_connections\"} 1",
            "ringfwd_connections_rejected_total{rule=\"web\",reason=\"shutdown\"} 0",
            "ringfwd_connections_rejected_total{rule=\"web\",reason=\"fd_exhausted\"} 0",
            "ringfwd_upstream_connect_errors_total{rule=\"web\",reason=\"timeout\"} 1",
            "ringfwd_upstream_connect_errors_total{rule=\"web\",reason=\"refused\"} 0",
            "ringfwd_bytes_total{rule=\"web\",direction=\"client_to_upstream\",path=\"copy\"} 1000",
            "ringfwd_bytes_total{rule=\"web\",direction=\"client_to_upstream\",path=\"splice\"} 24",
            "ringfwd_bytes_total{rule=\"web\",direction=\"upstream_to_client\",path=\"splice\"} 65536",
            "ringfwd_bytes_total{rule=\"web\",direction=\"upstream_to_client\",path=\"copy\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == want),
                "missing {want:?} in\n{text}"
            );
        }
        // Every series of both rules, no more: 2 rules × (4 bytes + every reject reason + 4
        // errors).
        assert_eq!(lines_with(&text, "ringfwd_bytes_total{").len(), 8);
        assert_eq!(
            lines_with(&text, "ringfwd_connections_rejected_total{").len(),
            2 * RejectReason::COUNT
        );
        assert_eq!(
            lines_with(&text, "ringfwd_upstream_connect_errors_total{").len(),
            8
        );
        assert!(!text.contains("ringfwd_tap_dropped"), "no tap configured");
        assert!(
            !text.contains("ringfwd_build_info"),
            "no engine resolved yet"
        );
    }

    #[test]
    fn build_info_names_version_engine_and_mode() {
        let m = sample();
        m.set_build_info("tokio", "copy");
        m.set_build_info("uring", "splice"); // the first call wins
        let text = render(&registry(m));
        assert!(text.contains("# TYPE ringfwd_build_info gauge"), "{text}");
        let want = format!(
            "ringfwd_build_info{{version=\"{}\",engine=\"tokio\",mode=\"copy\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(lines_with(&text, "ringfwd_build_info{"), [want.as_str()]);
    }

    #[test]
    fn histograms_are_in_seconds_with_cumulative_hdr_buckets() {
        let text = render(&registry(sample()));
        assert!(text.contains("# TYPE ringfwd_upstream_connect_seconds histogram"));
        assert!(text.contains("# UNIT ringfwd_upstream_connect_seconds seconds"));
        let buckets: Vec<&str> = lines_with(&text, "ringfwd_upstream_connect_seconds_bucket{")
            .into_iter()
            .filter(|l| l.contains("rule=\"web\""))
            .collect();
        let expect = [
            ("0.00001", 0),
            ("0.00002", 1),
            ("0.00005", 2),
            ("0.0001", 2),
            ("0.002", 2),
            ("0.005", 4),
            ("1.0", 4),
            ("60.0", 4),
            ("+Inf", 4),
        ];
        assert_eq!(buckets.len(), BUCKET_BOUNDS_US.len(), "{buckets:#?}");
        for (le, n) in expect {
            let want =
                format!("ringfwd_upstream_connect_seconds_bucket{{le=\"{le}\",rule=\"web\"}} {n}");
            assert!(
                buckets.contains(&want.as_str()),
                "missing {want:?} in {buckets:#?}"
            );
        }
        assert!(text.contains("ringfwd_upstream_connect_seconds_count{rule=\"web\"} 4\n"));
        let sum: f64 = lines_with(&text, "ringfwd_upstream_connect_seconds_sum{rule=\"web\"}")[0]
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!((sum - 0.006055).abs() < 0.006055 * 0.001, "sum {sum}");
        // Quantiles: p50 is the 2nd of 4 values (40 µs), p90 and max are 3 ms (within 1/128,
        // two significant digits: the top of the 16-µs-wide bucket holding 3 ms).
        let q = |quantile: &str| -> f64 {
            let prefix = format!(
                "ringfwd_upstream_connect_seconds_quantile{{rule=\"web\",quantile=\"{quantile}\"}} "
            );
            lines_with(&text, &prefix)[0][prefix.len()..]
                .parse()
                .unwrap()
        };
        assert_eq!(q("0.5"), 40e-6);
        for quantile in ["0.9", "0.99", "0.999", "1"] {
            let v = q(quantile);
            assert!(
                (0.003..=0.003 * (1.0 + 1.0 / 128.0)).contains(&v),
                "q{quantile} = {v}"
            );
        }
        // An empty histogram has zero buckets and NaN quantiles, not made-up numbers.
        assert!(text.contains("ringfwd_first_byte_seconds_count{rule=\"web\"} 0\n"));
        assert!(
            text.contains(
                "ringfwd_first_byte_seconds_quantile{rule=\"web\",quantile=\"0.99\"} NaN\n"
            )
        );
        assert!(text.contains("ringfwd_session_duration_seconds_count{rule=\"web\"} 1\n"));
        assert!(text.contains(
            "ringfwd_transfer_seconds_bucket{le=\"0.00001\",rule=\"web\",direction=\"upstream_to_client\"} 1\n"
        ));
        assert!(text.contains(
            "ringfwd_transfer_seconds_count{rule=\"web\",direction=\"client_to_upstream\"} 0\n"
        ));
        assert!(text.contains("# TYPE ringfwd_transfer_seconds_quantile gauge"));
    }

    #[test]
    fn rule_names_are_escaped_in_labels() {
        let m = Metrics::new(&["a \"quoted\" \\ rule"], 1);
        m.rule(0).shard(0).accepted();
        let text = render(&registry(m));
        assert!(
            text.contains(r#"ringfwd_connections_accepted_total{rule="a \"quoted\" \\ rule",route="default"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn the_client_table_counters_are_per_rule_with_limits() {
        let cfg = crate::config::Config::parse(
            "t.toml",
            "[[rule]]\nname = \"limited\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n\
             max_new_connections_per_ip = \"1/m\"\n\n\
             [[rule]]\nname = \"open\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n",
        )
        .unwrap();
        let m = Metrics::new(&["limited", "open"], 1);
        m.set_runtime(crate::session::Runtime::new(&cfg));
        let text = render(&registry(m));
        for name in [
            "ringfwd_client_table_evictions_total",
            "ringfwd_client_table_untracked_total",
        ] {
            assert_eq!(
                lines_with(&text, name),
                vec![format!("{name}{{rule=\"limited\"}} 0").as_str()],
                "{text}"
            );
        }
    }
}
