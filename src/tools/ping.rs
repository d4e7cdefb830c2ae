//! `ringfwd ping`: TCP connect-time ping, for hosts and paths that filter ICMP.
//!
//! Each probe is one TCP handshake (`connect(2)` with a timeout), timed from the call to the
//! established socket, then closed with an ordinary FIN. The target is resolved once, at start,
//! like ping(8). A refused connection or an unresolvable name is permanent (nothing will answer
//! on that port): the run stops and the process exits 1 with a message saying so. A timeout or
//! an unreachable network is counted as a failed probe and probing goes on. With `-c 0` it runs
//! until Ctrl-C; Ctrl-C also ends a counted run early. Either way the summary is printed, and
//! the exit status is 1 when no probe succeeded.
//!
//! Plain blocking threads: one probe at a time needs no runtime. SIGINT is blocked in every
//! thread and taken by a `sigwait` thread, which wakes the interval wait at once.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;

use super::ToolError;
use crate::config;
use crate::shutdown::{Phase, Shutdown};

#[derive(Debug, Args)]
pub struct PingArgs {
    /// Target, HOST:PORT or [IPv6]:PORT.
    #[arg(value_name = "HOST:PORT")]
    pub target: String,
    /// Number of probes; 0 runs until Ctrl-C.
    #[arg(short = 'c', long, value_name = "COUNT", default_value_t = 4)]
    pub count: u64,
    /// Time between the starts of two probes, e.g. 1s or 200ms.
    #[arg(short = 'i', long, value_name = "INTERVAL", default_value = "1s", value_parser = parse_positive)]
    pub interval: Duration,
    /// How long one handshake may take before it counts as a timeout, e.g. 2s.
    #[arg(short = 'W', long, value_name = "TIMEOUT", default_value = "2s", value_parser = parse_positive)]
    pub timeout: Duration,
}

fn parse_positive(text: &str) -> Result<Duration, String> {
    let d = config::parse_duration(text)?;
    if d.is_zero() {
        return Err(format!("invalid duration {text:?}: must be more than 0"));
    }
    Ok(d)
}

/// What one probe found.
#[derive(Debug)]
enum Probe {
    Connected(Duration),
    /// No answer within the timeout, or a transient network error: try again.
    Failed(String),
    /// Nothing will ever answer: stop.
    Permanent(String),
}

fn probe(addr: SocketAddr, timeout: Duration) -> Probe {
    let start = Instant::now();
    match TcpStream::connect_timeout(&addr, timeout) {
        Ok(stream) => {
            let took = start.elapsed();
            drop(stream);
            Probe::Connected(took)
        }
        Err(e) => classify(&e, timeout),
    }
}

fn classify(e: &io::Error, timeout: Duration) -> Probe {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => {
            Probe::Permanent("connection refused (nothing listens on that port)".into())
        }
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Probe::Failed(format!(
            "timeout: no answer within {}",
            config::format_duration(timeout)
        )),
        io::ErrorKind::PermissionDenied => {
            Probe::Permanent(format!("{e} (a firewall rule forbids this connection)"))
        }
        _ => Probe::Failed(e.to_string()),
    }
}

/// Connect times and counts; percentiles from an HdrHistogram of nanoseconds, so a run of any
/// length keeps constant memory.
struct Stats {
    sent: u64,
    ok: u64,
    min: Duration,
    max: Duration,
    total: Duration,
    hist: Histogram<u64>,
}

impl Stats {
    fn new() -> Self {
        Self {
            sent: 0,
            ok: 0,
            min: Duration::MAX,
            max: Duration::ZERO,
            total: Duration::ZERO,
            // 1 ns .. 1 h at 3 significant digits: these bounds are valid, so this cannot fail.
            hist: Histogram::new_with_bounds(1, 3_600_000_000_000, 3)
                .expect("valid histogram bounds"),
        }
    }

    fn record(&mut self, d: Duration) {
        self.ok += 1;
        self.min = self.min.min(d);
        self.max = self.max.max(d);
        self.total += d;
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.hist.saturating_record(ns);
    }

    /// The connect time at quantile `q`, within the measured `min..=max`. The histogram
    /// answers with the top of the value's bucket (3 significant digits), which can lie above
    /// the largest time actually seen: a p99 printed above the max.
    fn quantile(&self, q: f64) -> Duration {
        let ns = self.hist.value_at_quantile(q);
        Duration::from_nanos(ns).clamp(self.min.min(self.max), self.max)
    }

    fn summary(&self, target: &str, elapsed: Duration) -> String {
        let failed = self.sent - self.ok;
        let pct = if self.sent == 0 {
            0.0
        } else {
            failed as f64 * 100.0 / self.sent as f64
        };
        let mut s = format!(
            "--- {target} tcp ping statistics ---\n{} sent, {} ok, {failed} failed ({pct:.1}% failed), time {:.0} ms\n",
            self.sent,
            self.ok,
            ms(elapsed)
        );
        if self.ok > 0 {
            let avg = self.total / u32::try_from(self.ok).unwrap_or(u32::MAX);
            let p = |q: f64| ms(self.quantile(q));
            s.push_str(&format!(
                "connect min/avg/max = {:.3}/{:.3}/{:.3} ms, p50 = {:.3} ms, p99 = {:.3} ms\n",
                ms(self.min),
                ms(avg),
                ms(self.max),
                p(0.5),
                p(0.99)
            ));
        }
        s
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Blocks SIGINT in this thread (so in every thread started later) and starts a thread that
/// turns it into `Phase::Closing`.
fn catch_sigint(stop: &Shutdown) -> Result<(), ToolError> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.thread_block()
        .map_err(|e| format!("cannot block SIGINT: {e}"))?;
    let stop = stop.clone();
    std::thread::Builder::new()
        .name("ping-sigint".into())
        .spawn(move || {
            if set.wait().is_ok() {
                stop.advance(Phase::Closing);
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    Ok(())
}

/// Runs the ping.
///
/// # Errors
/// Unresolvable or ill-formed target, connection refused, or no successful probe.
pub fn run(args: PingArgs) -> Result<(), ToolError> {
    let addr = config::resolve_one(&args.target)?;
    let stop = Shutdown::new();
    catch_sigint(&stop)?;

    println!(
        "TCP PING {} ({addr}): timeout {}, interval {}",
        args.target,
        config::format_duration(args.timeout),
        config::format_duration(args.interval)
    );
    let mut stats = Stats::new();
    let started = Instant::now();
    let mut permanent = None;
    let mut seq = 0u64;
    while args.count == 0 || seq < args.count {
        seq += 1;
        let probe_start = Instant::now();
        stats.sent += 1;
        match probe(addr, args.timeout) {
            Probe::Connected(d) => {
                stats.record(d);
                println!("connected to {addr}: seq={seq} time={:.3} ms", ms(d));
            }
            Probe::Failed(why) => println!("no connection to {addr}: seq={seq} {why}"),
            Probe::Permanent(why) => {
                println!("cannot connect to {addr}: seq={seq} {why}");
                permanent = Some(format!("cannot connect to {addr}: {why}"));
                break;
            }
        }
        if stop.phase() == Phase::Closing || (args.count != 0 && seq >= args.count) {
            break;
        }
        let next = probe_start + args.interval;
        let wait = next.saturating_duration_since(Instant::now());
        if stop.wait_for(Phase::Closing, Some(wait)) {
            break;
        }
    }
    print!("\n{}", stats.summary(&args.target, started.elapsed()));
    if let Some(why) = permanent {
        return Err(why.into());
    }
    if stats.ok == 0 {
        return Err(format!("no probe of {addr} succeeded").into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_is_permanent_and_timeout_is_not() {
        let t = Duration::from_secs(2);
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert!(matches!(classify(&refused, t), Probe::Permanent(m) if m.contains("refused")));
        let timed_out = io::Error::from(io::ErrorKind::TimedOut);
        assert!(matches!(classify(&timed_out, t), Probe::Failed(m) if m.contains("within 2s")));
        let unreachable = io::Error::from_raw_os_error(libc::ENETUNREACH);
        assert!(matches!(classify(&unreachable, t), Probe::Failed(_)));
    }

    #[test]
    fn summary_counts_and_times() {
        let mut s = Stats::new();
        s.sent = 3;
        s.record(Duration::from_micros(100));
        s.record(Duration::from_micros(300));
        let text = s.summary("h:1", Duration::from_millis(2000));
        assert!(
            text.contains("3 sent, 2 ok, 1 failed (33.3% failed), time 2000 ms"),
            "{text}"
        );
        assert!(
            text.contains("connect min/avg/max = 0.100/0.200/0.300 ms"),
            "{text}"
        );
        assert!(text.contains("p50 = 0.100 ms, p99 = 0.300 ms"), "{text}");
    }

    #[test]
    fn percentiles_never_exceed_the_max() {
        // Times that are not on a histogram bucket boundary: the bucket's top lies above them.
        for times in [
            vec![1_234_567u64],
            vec![100_001, 1_234_567],
            (1..=200).map(|i| 1_000_003 * i).collect(),
            vec![999_999_999, 5, 77_777_777],
        ] {
            let mut s = Stats::new();
            for &t in &times {
                s.sent += 1;
                s.record(Duration::from_nanos(t));
            }
            let (p50, p99) = (s.quantile(0.5), s.quantile(0.99));
            assert!(
                s.min <= p50 && p50 <= p99 && p99 <= s.max,
                "{times:?}: min {:?} p50 {p50:?} p99 {p99:?} max {:?}",
                s.min,
                s.max
            );
            // And so in the printed summary.
            let text = s.summary("h:1", Duration::from_secs(1));
            let num = |key: &str| -> f64 {
                let at = text.find(key).unwrap() + key.len();
                text[at..].split(' ').next().unwrap().parse().unwrap()
            };
            let max: f64 = text
                .split("ms, p50")
                .next()
                .unwrap()
                .rsplit('/')
                .next()
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            assert!(
                num("p50 = ") <= num("p99 = ") && num("p99 = ") <= max,
                "{text}"
            );
        }
    }

    #[test]
    fn zero_durations_are_rejected() {
        assert!(parse_positive("0s").unwrap_err().contains("more than 0"));
        assert_eq!(parse_positive("200ms").unwrap(), Duration::from_millis(200));
    }
}
