//! The standard Prometheus process metrics (`process_open_fds`, `process_max_fds`,
//! `process_resident_memory_bytes`, `process_cpu_seconds_total`,
//! `process_start_time_seconds`), read from `/proc/self` at scrape time.
//!
//! These are the names every Prometheus client library exports, so the dashboards and alerts
//! written for them (fd exhaustion, memory growth, restarts) work on ringfwd unchanged.
//! Nothing is kept between scrapes; a file that cannot be read leaves its metric out of that
//! scrape rather than exporting a made-up zero.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

/// One reading of this process's figures; `None` where `/proc` did not say.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessStats {
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub resident_bytes: Option<u64>,
    pub cpu_seconds: Option<f64>,
    pub start_time_seconds: Option<f64>,
}

/// The fields of `/proc/self/stat` used here (after the command name, which may hold spaces
/// and parentheses, so it is skipped up to its last `)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    /// utime + stime, in clock ticks.
    cpu_ticks: u64,
    /// Start time after boot, in clock ticks.
    start_ticks: u64,
    /// Resident set size, in pages.
    rss_pages: u64,
}

fn parse_stat(text: &str) -> Option<Stat> {
    // Fields after ") " start at field 3 (state); utime is field 14, stime 15, starttime 22,
    // rss 24 (proc(5)).
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        cpu_ticks: field(14)? + field(15)?,
        start_ticks: field(22)?,
        rss_pages: field(24)?,
    })
}

/// `btime` of `/proc/stat`: the boot time, in seconds since the epoch.
fn parse_btime(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

impl ProcessStats {
    /// This process, now.
    pub fn current() -> Self {
        use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit};
        use nix::unistd::{SysconfVar, sysconf};
        let ticks = sysconf(SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .and_then(|t| u64::try_from(t).ok())
            .filter(|&t| t > 0);
        let page = sysconf(SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .and_then(|p| u64::try_from(p).ok());
        let stat = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|t| parse_stat(&t));
        let btime = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|t| parse_btime(&t));
        Self {
            // The directory's own descriptor is one of the entries while it is read.
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|d| (d.count() as u64).saturating_sub(1)),
            max_fds: getrlimit(Resource::RLIMIT_NOFILE)
                .ok()
                .map(|(soft, _)| soft)
                .filter(|&s| s != RLIM_INFINITY),
            resident_bytes: stat.zip(page).map(|(s, p)| s.rss_pages * p),
            cpu_seconds: stat.zip(ticks).map(|(s, t)| s.cpu_ticks as f64 / t as f64),
            start_time_seconds: stat
                .zip(ticks)
                .zip(btime)
                .map(|((s, t), b)| b as f64 + s.start_ticks as f64 / t as f64),
        }
    }
}

/// Encodes [`ProcessStats::current`] on every scrape.
#[derive(Debug, Default)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        encode(&ProcessStats::current(), enc)
    }
}

fn gauge_u64(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: Option<u64>,
) -> Result<(), std::fmt::Error> {
    if let Some(v) = value {
        let f = enc.encode_descriptor(name, help, unit, MetricType::Gauge)?;
        ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX)).encode(f)?;
    }
    Ok(())
}

fn encode(s: &ProcessStats, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
    gauge_u64(
        &mut enc,
        "process_open_fds",
        "Number of open file descriptors.",
        None,
        s.open_fds,
    )?;
    gauge_u64(
        &mut enc,
        "process_max_fds",
        "Maximum number of open file descriptors (the soft RLIMIT_NOFILE).",
        None,
        s.max_fds,
    )?;
    gauge_u64(
        &mut enc,
        "process_resident_memory",
        "Resident memory size in bytes.",
        Some(&Unit::Bytes),
        s.resident_bytes,
    )?;
    if let Some(v) = s.cpu_seconds {
        let f = enc.encode_descriptor(
            "process_cpu",
            "Total user and system CPU time spent in seconds.",
            Some(&Unit::Seconds),
            MetricType::Counter,
        )?;
        ConstCounter::new(v).encode(f)?;
    }
    if let Some(v) = s.start_time_seconds {
        let f = enc.encode_descriptor(
            "process_start_time",
            "Start time of the process since unix epoch in seconds.",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?;
        ConstGauge::new(v).encode(f)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(s: &ProcessStats) -> String {
        struct One(ProcessStats);
        impl std::fmt::Debug for One {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("One")
            }
        }
        impl Collector for One {
            fn encode(&self, enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
                encode(&self.0, enc)
            }
        }
        let mut r = prometheus_client::registry::Registry::default();
        r.register_collector(Box::new(One(s.clone())));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        out
    }

    #[test]
    fn stat_fields_are_read_past_a_command_name_with_spaces_and_parens() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        // utime stime cutime cstime priority nice threads itrealvalue starttime vsize rss …
        let text = "42 (ring fwd) (x)) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 12345 1000000 777 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            parse_stat(text),
            Some(Stat {
                cpu_ticks: 300,
                start_ticks: 12345,
                rss_pages: 777,
            })
        );
        assert_eq!(parse_stat("42 (short) S 1"), None);
        assert_eq!(
            parse_btime("cpu 1 2\nbtime 1700000000\nprocesses 9\n"),
            Some(1_700_000_000)
        );
    }

    #[test]
    fn the_standard_names_and_types_are_exported() {
        let text = render(&ProcessStats {
            open_fds: Some(12),
            max_fds: Some(1024),
            resident_bytes: Some(4096),
            cpu_seconds: Some(1.5),
            start_time_seconds: Some(1_700_000_000.25),
        });
        for want in [
            "# TYPE process_open_fds gauge",
            "process_open_fds 12",
            "# TYPE process_max_fds gauge",
            "process_max_fds 1024",
            "# TYPE process_resident_memory_bytes gauge",
            "process_resident_memory_bytes 4096",
            "# TYPE process_cpu_seconds counter",
            "process_cpu_seconds_total 1.5",
            "# TYPE process_start_time_seconds gauge",
            "process_start_time_seconds 1700000000.25",
        ] {
            assert!(
                text.lines().any(|l| l == want),
                "missing {want:?} in\n{text}"
            );
        }
        // What /proc did not say is left out, not exported as 0.
        let text = render(&ProcessStats::default());
        assert!(!text.contains("process_"), "{text}");
    }

    #[test]
    fn this_process_reads_plausibly() {
        let s = ProcessStats::current();
        let open = s.open_fds.unwrap();
        assert!(open >= 3, "stdin, stdout, stderr at least: {open}");
        assert!(s.max_fds.is_none_or(|m| m >= open));
        assert!(s.resident_bytes.unwrap() > 1 << 20);
        assert!(s.cpu_seconds.unwrap() >= 0.0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = s.start_time_seconds.unwrap();
        assert!(
            start <= now + 1.0 && start > now - 86_400.0 * 365.0,
            "{start} vs {now}"
        );
    }
}
