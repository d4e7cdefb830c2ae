//! `ringfwd stats`: a per-rule table of a running forwarder, read from its admin endpoint's
//! `/stats` JSON ([`crate::metrics::report`]).
//!
//! Rates need two samples: the tool fetches `/stats`, waits `--interval`, fetches again and
//! divides the byte deltas by the forwarder's own uptime delta (so a slow fetch does not skew
//! them). Percentiles are over the forwarder's whole run (cumulative HDR histograms). With
//! `--watch` it keeps sampling and redraws every interval until interrupted.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;

use super::ToolError;
use crate::config::{self, DEFAULT_ADMIN};
use crate::metrics::HistogramKind;
use crate::metrics::report::{RuleReport, StatsReport};
use crate::metrics::upstreams::{PoolReport, UpstreamsReport};
use crate::vocab::{Direction, PathKind};

/// A fetch that takes longer than this is an error (the admin endpoint answers in
/// milliseconds).
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Admin address of the forwarder (its `admin` setting).
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_ADMIN)]
    pub admin: String,
    /// Redraw every interval until Ctrl-C.
    #[arg(long)]
    pub watch: bool,
    /// Time between the two samples rates are computed from (and between redraws), e.g. 1s.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_interval)]
    pub interval: Duration,
}

fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = config::parse_duration(s)?;
    if d < Duration::from_millis(10) || d > Duration::from_secs(3600) {
        return Err(format!("interval must be 10ms..=1h, got {s}"));
    }
    Ok(d)
}

/// Runs the tool.
///
/// # Errors
/// A bad address, the forwarder cannot be reached, or its answer is not a stats document.
pub fn run(args: StatsArgs) -> Result<(), ToolError> {
    let addr = config::resolve_one(&args.admin).map_err(|m| format!("--admin: {m}"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let fetch = || rt.block_on(fetch_json::<StatsReport>(addr, "/stats"));
    // Members are optional: a forwarder without pools to show (or an older one) has none.
    let members = || {
        rt.block_on(fetch_json::<UpstreamsReport>(addr, "/upstreams"))
            .ok()
    };
    let mut prev = fetch()?;
    let stdout = std::io::stdout();
    let tty = std::io::IsTerminal::is_terminal(&stdout);
    loop {
        std::thread::sleep(args.interval);
        let cur = fetch()?;
        let pools = members();
        let mut screen = String::new();
        if args.watch && tty {
            // Home and clear, so the table redraws in place.
            screen.push_str("\x1b[H\x1b[2J");
        }
        screen.push_str(&render(&prev, &cur, pools.as_ref(), addr));
        let mut out = stdout.lock();
        out.write_all(screen.as_bytes())?;
        out.flush()?;
        if !args.watch {
            return Ok(());
        }
        prev = cur;
    }
}

/// `GET path` (a JSON document) with hyper's HTTP/1 client on one connection.
async fn fetch_json<T: serde::de::DeserializeOwned>(
    addr: SocketAddr,
    path: &str,
) -> Result<T, ToolError> {
    let work = async {
        let (mut sender, conn) = super::admin_connect(addr).await?;
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        conn.abort();
        if !status.is_success() {
            return Err(format!(
                "{addr}{path} answered {status}: {}",
                String::from_utf8_lossy(&body).trim()
            )
            .into());
        }
        serde_json::from_slice::<T>(&body)
            .map_err(|e| format!("{addr}{path} is not a ringfwd document: {e}").into())
    };
    match tokio::time::timeout(FETCH_TIMEOUT, work).await {
        Ok(r) => r,
        Err(_) => Err(format!("{addr}{path}: no answer within {FETCH_TIMEOUT:?}").into()),
    }
}

/// The table for two samples of the same forwarder, `prev` taken before `cur`, with each
/// rule's pool members when `pools` is given.
pub fn render(
    prev: &StatsReport,
    cur: &StatsReport,
    pools: Option<&UpstreamsReport>,
    addr: SocketAddr,
) -> String {
    let mut out = String::new();
    let dt = cur.uptime_seconds - prev.uptime_seconds;
    let _ = writeln!(
        out,
        "ringfwd at {addr} — up {}, rates over {:.1}s",
        format_uptime(cur.uptime_seconds),
        dt
    );
    for rule in &cur.rules {
        let before = prev.rules.iter().find(|r| r.name == rule.name);
        out.push('\n');
        render_rule(&mut out, before, rule, dt);
        let rule_pools = pools.iter().flat_map(|p| p.rules.iter());
        let rule_pools: Vec<&PoolReport> = rule_pools.filter(|p| p.rule == rule.name).collect();
        let routed = rule_pools.len() > 1 || rule_pools.iter().any(|p| p.route != "default");
        for pool in rule_pools {
            if routed {
                let _ = writeln!(out, "  route {}", pool.route);
            }
            render_pool(&mut out, pool);
        }
    }
    out
}

fn render_pool(out: &mut String, pool: &PoolReport) {
    let _ = writeln!(
        out,
        "  {:<28} {:>11} {:>6} {:>8} {:>11} {:>9}  last error ({})",
        "upstream", "state", "weight", "active", "connections", "errors", pool.balance
    );
    for m in &pool.members {
        let mut name = m.addr.clone();
        if m.name != m.addr {
            let _ = write!(name, " ({})", m.name);
        }
        if m.backup {
            name.push_str(" backup");
        }
        let _ = writeln!(
            out,
            "  {:<28} {:>11} {:>6} {:>8} {:>11} {:>9}  {}",
            name,
            // What the operator set shows first: a drained member is healthy, yet out.
            match (m.state.as_str(), m.up) {
                ("up", true) => "up".to_string(),
                ("up", false) => "DOWN".to_string(),
                (admin, _) => format!("admin:{admin}"),
            },
            m.weight,
            m.active,
            m.connections,
            m.connect_errors,
            m.last_error.as_deref().unwrap_or("-")
        );
    }
}

fn render_rule(out: &mut String, prev: Option<&RuleReport>, r: &RuleReport, dt: f64) {
    let rate = |dir: Direction| -> f64 {
        let before = prev.map_or(0, |p| p.bytes_dir(dir));
        if dt > 0.0 {
            r.bytes_dir(dir).saturating_sub(before) as f64 / dt
        } else {
            0.0
        }
    };
    let total: u64 = Direction::ALL.iter().map(|d| r.bytes_dir(*d)).sum();
    let spliced: u64 = Direction::ALL
        .iter()
        .map(|d| r.bytes_path(*d, PathKind::Splice))
        .sum();
    let splice_share = if total == 0 {
        "-".to_string()
    } else {
        format!("{:.1}%", 100.0 * spliced as f64 / total as f64)
    };
    let rejected: u64 = r.rejected.values().sum();
    let errors: u64 = r.connect_errors.values().sum();
    let _ = writeln!(
        out,
        "rule {}: active {}  accepted {}  rejected {}  connect errors {}",
        r.name, r.active, r.accepted, rejected, errors
    );
    let _ = writeln!(
        out,
        "  client→upstream {}/s   upstream→client {}/s   splice share {}",
        format_bytes(rate(Direction::ClientToUpstream)),
        format_bytes(rate(Direction::UpstreamToClient)),
        splice_share
    );
    let _ = writeln!(
        out,
        "  {:<28} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "histogram", "count", "p50", "p90", "p99", "p99.9", "max"
    );
    for kind in HistogramKind::ALL {
        let Some(h) = r.histograms.get(kind.as_str()) else {
            continue;
        };
        let _ = write!(out, "  {:<28} {:>8}", kind.as_str(), h.count);
        for v in h.values_us() {
            let cell = if h.count == 0 {
                "-".to_string()
            } else {
                format_micros(v)
            };
            let _ = write!(out, " {cell:>9}");
        }
        out.push('\n');
    }
}

/// 850µs, 12.3ms, 4.56s.
pub fn format_micros(us: u64) -> String {
    if us < 1_000 {
        format!("{us}µs")
    } else if us < 1_000_000 {
        format!("{:.1}ms", us as f64 / 1e3)
    } else {
        format!("{:.2}s", us as f64 / 1e6)
    }
}

/// Bytes in binary units: 512 B, 1.5 KiB, 12.0 MiB.
pub fn format_bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

fn format_uptime(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use clap::Parser;

    #[test]
    fn units_read_naturally() {
        assert_eq!(format_micros(850), "850µs");
        assert_eq!(format_micros(12_345), "12.3ms");
        assert_eq!(format_micros(4_560_000), "4.56s");
        assert_eq!(format_bytes(512.0), "512 B");
        assert_eq!(format_bytes(1536.0), "1.5 KiB");
        assert_eq!(format_bytes(12.0 * 1024.0 * 1024.0), "12.0 MiB");
        assert_eq!(format_uptime(3725.0), "1h02m");
    }

    #[test]
    fn table_shows_rates_from_two_samples_and_percentiles() {
        let m = Metrics::new(&["web"], 1);
        let r = m.rule(0);
        r.shard(0).accepted();
        r.shard(0)
            .bytes(Direction::ClientToUpstream, PathKind::Copy, 1000);
        let mut prev = StatsReport::collect(&m);
        prev.uptime_seconds = 10.0;
        r.shard(0)
            .bytes(Direction::ClientToUpstream, PathKind::Copy, 2048);
        r.shard(0)
            .bytes(Direction::UpstreamToClient, PathKind::Splice, 3048);
        r.shard(0).connected(Duration::from_micros(800));
        let mut cur = StatsReport::collect(&m);
        cur.uptime_seconds = 12.0;
        let text = render(&prev, &cur, None, "127.0.0.1:9100".parse().unwrap());
        assert!(text.contains("rule web: active 1  accepted 1"), "{text}");
        // 2048 B over 2 s each way; half of all bytes moved by splice.
        assert!(text.contains("client→upstream 1.0 KiB/s"), "{text}");
        assert!(text.contains("upstream→client 1.5 KiB/s"), "{text}");
        assert!(text.contains("splice share 50.0%"), "{text}");
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with("upstream_connect"))
            .unwrap();
        assert_eq!(
            line.split_whitespace().collect::<Vec<_>>()[1..],
            // The top of the 4-µs-wide bucket 800 µs falls in (two significant digits).
            ["1", "803µs", "803µs", "803µs", "803µs", "803µs"]
        );
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with("session"))
            .unwrap();
        assert!(line.ends_with("-         -         -         -         -"));
    }

    #[test]
    fn members_are_listed_under_their_rule_with_state_and_last_error() {
        use crate::metrics::upstreams::MemberReport;
        let m = Metrics::new(&["web"], 1);
        let cur = StatsReport::collect(&m);
        let member = |addr: &str, name: &str, up: bool, err: Option<&str>| MemberReport {
            addr: addr.into(),
            name: name.into(),
            weight: 1,
            backup: false,
            up,
            state: if addr.ends_with(":81") { "drain" } else { "up" }.into(),
            active: 2,
            connections: 7,
            connect_errors: u64::from(!up),
            connect_errors_by_reason: Default::default(),
            health_checks: Default::default(),
            last_error: err.map(str::to_string),
            last_error_at: err.map(|_| 1_700_000_000),
        };
        let pools = UpstreamsReport {
            rules: vec![PoolReport {
                route: "default".into(),
                rule: "web".into(),
                balance: "least_conn".into(),
                members: vec![
                    member("10.0.0.1:80", "10.0.0.1:80", true, None),
                    member(
                        "10.0.0.2:80",
                        "api.svc:80",
                        false,
                        Some("connection refused"),
                    ),
                    member("10.0.0.3:81", "10.0.0.3:81", false, None),
                ],
            }],
        };
        let text = render(&cur, &cur, Some(&pools), "127.0.0.1:9100".parse().unwrap());
        assert!(text.contains("(least_conn)"), "{text}");
        let up = text.lines().find(|l| l.contains("10.0.0.1:80")).unwrap();
        assert_eq!(
            up.split_whitespace().collect::<Vec<_>>(),
            ["10.0.0.1:80", "up", "1", "2", "7", "0", "-"]
        );
        let drained = text.lines().find(|l| l.contains("10.0.0.3:81")).unwrap();
        assert!(drained.contains("admin:drain"), "{drained}");
        let down = text.lines().find(|l| l.contains("10.0.0.2:80")).unwrap();
        assert!(
            down.contains("(api.svc:80)") && down.contains("DOWN"),
            "{down}"
        );
        assert!(down.ends_with("connection refused"), "{down}");
    }

    #[derive(Debug, clap::Parser)]
    struct Wrap {
        #[command(flatten)]
        args: StatsArgs,
    }

    #[test]
    fn flags_have_defaults_and_reject_bad_intervals() {
        let w = Wrap::try_parse_from(["stats"]).unwrap();
        assert_eq!(w.args.admin, "127.0.0.1:9100");
        assert_eq!(w.args.interval, Duration::from_secs(1));
        assert!(!w.args.watch);
        let e = Wrap::try_parse_from(["stats", "--interval", "0s"]).unwrap_err();
        assert!(e.to_string().contains("10ms..=1h"), "{e}");
        let e = Wrap::try_parse_from(["stats", "--interval", "2"]).unwrap_err();
        assert!(e.to_string().contains("unit"), "{e}");
    }
}
