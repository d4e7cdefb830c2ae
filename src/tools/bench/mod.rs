//! `ringfwd bench`: the load generator, one mode per sub-subcommand.
//!
//! `ringfwd bench MODE [OPTIONS] HOST:PORT`, where MODE is
//! - `throughput`: N connections stream for T seconds, `--direction up` (to a sink),
//!   `down` (from `sink --send`) or `both` (through an echo) → Gbit/s;
//! - `rr`: request/response over TLV frames ([`super::frame`]) against an echo, one request
//!   in flight per connection, closed loop (next request as soon as the answer is in) or
//!   open loop at a fixed total `--rate`, where latency is measured from each request's
//!   *intended* send time so a stalled server cannot hide its stall (coordinated omission)
//!   → req/s and RTT percentiles;
//! - `connect`: connection churn (connect, one request/response, close) → connections/s and
//!   connect-time percentiles;
//! - `idle`: open N connections, let them sit, and report a process's (`--pid`, the relay)
//!   resident memory per connection.
//!
//! Sub-subcommands rather than a `--mode` flag because each mode has its own options and
//! `--help` then shows only the ones that apply.
//!
//! The generator shares two cores with the relay and its backend, so it is lean by default:
//! one current-thread tokio runtime (`--threads N` for more), one task per connection, counters
//! in relaxed atomics, histograms per task merged at the end. Every wait is bounded by the
//! run's deadline, so each mode stops by itself; a connection error is counted by kind and
//! the connection retried after a short pause, never a panic. A target that refuses the very
//! first connection ends the run at once with a clear message instead of counting errors for
//! the whole duration.
//!
//! Output: a progress line on stderr once a second (`--quiet` silences it), the results as a
//! table on stdout (`--format json` prints JSON instead), `--json FILE` writes the JSON and
//! `--csv FILE` appends one row (header first if the file is new); see [`report`].

mod connect;
mod idle;
mod pace;
pub mod report;
mod rr;
mod throughput;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use tokio::net::TcpStream;

use super::ToolError;
use super::serve;
use crate::config;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub mode: Mode,
}

#[derive(Debug, Subcommand)]
pub enum Mode {
    /// Streaming throughput in Gbit/s. Target: `ringfwd sink` (--direction up), `ringfwd sink
    /// --send SIZE` (down) or `ringfwd echo` (both), directly or behind the relay.
    Throughput(throughput::ThroughputArgs),
    /// Request/response rate and round-trip percentiles over TLV frames. Target: `ringfwd
    /// echo` (or any echo server).
    Rr(rr::RrArgs),
    /// Connection churn: connect, one request/response, close; connections/s and connect
    /// times. Target: `ringfwd echo`.
    Connect(connect::ConnectArgs),
    /// Hold idle connections and report a process's memory per connection. Target: `ringfwd
    /// echo` (any listener with --no-exchange).
    Idle(idle::IdleArgs),
}

/// Options every mode has.
#[derive(Debug, Args)]
pub struct Common {
    /// Target, HOST:PORT or [IPv6]:PORT: the relay, or a backend directly for a baseline.
    #[arg(value_name = "HOST:PORT")]
    pub target: String,
    /// Concurrent connections (default 1; idle: 100).
    #[arg(short = 'c', long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub connections: Option<u32>,
    /// Measured run time, e.g. 10s (default 10s; idle: how long to hold after measuring, 0s).
    #[arg(short = 'd', long, value_name = "DURATION", value_parser = config::parse_duration)]
    pub duration: Option<Duration>,
    /// Run this long before measuring starts (connections ramp up, caches warm).
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = config::parse_duration)]
    pub warmup: Duration,
    /// Give up on a connect after this long (counted as a timeout error).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_positive)]
    pub connect_timeout: Duration,
    /// Runtime threads (1: a single-threaded runtime, the lean default).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: u16,
    /// Results on stdout as a table (human) or as JSON.
    #[arg(long, value_enum, default_value_t = Format::Human)]
    pub format: Format,
    /// Also write the results as JSON to this file (replaced).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Also append the results as one CSV row to this file (header written if it is new).
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
    /// Free text stored with the results (e.g. the engine under test).
    #[arg(long, value_name = "TEXT")]
    pub label: Option<String>,
    /// No progress line on stderr.
    #[arg(short = 'q', long)]
    pub quiet: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Human,
    Json,
}

fn parse_positive(text: &str) -> Result<Duration, String> {
    let d = config::parse_duration(text)?;
    if d.is_zero() {
        return Err(format!("invalid duration {text:?}: must be more than 0"));
    }
    Ok(d)
}

/// Pause after a failed connection before trying again, so a refusing target is not spun on.
const ERROR_BACKOFF: Duration = Duration::from_millis(20);

/// Runs the chosen mode and writes its results.
///
/// # Errors
/// Bad target, the first connection refused or timed out, not enough file descriptors,
/// or a results file that cannot be written.
pub fn run(args: BenchArgs) -> Result<(), ToolError> {
    let common = match &args.mode {
        Mode::Throughput(a) => &a.common,
        Mode::Rr(a) => &a.common,
        Mode::Connect(a) => &a.common,
        Mode::Idle(a) => &a.common,
    };
    let target = config::resolve_one(&common.target).map_err(|m| format!("target: {m}"))?;
    let fd_limit = raise_fd_limit();
    let conns = match &args.mode {
        Mode::Idle(_) => common.connections.unwrap_or(idle::DEFAULT_CONNECTIONS),
        _ => common.connections.unwrap_or(1),
    };
    // Each connection holds one fd here; keep a margin for the runtime and stdio.
    if u64::from(conns) + 64 > fd_limit {
        return Err(format!(
            "{conns} connections need more file descriptors than the open-file limit of {fd_limit} allows (raise it with ulimit -n)"
        )
        .into());
    }
    let rt = serve::runtime(usize::from(common.threads))?;
    let mut report = rt.block_on(async {
        preflight(target, common.connect_timeout).await?;
        match &args.mode {
            Mode::Throughput(a) => throughput::run(a, target, conns).await,
            Mode::Rr(a) => rr::run(a, target, conns).await,
            Mode::Connect(a) => connect::run(a, target, conns).await,
            Mode::Idle(a) => idle::run(a, target, conns).await,
        }
    })?;
    // Dropping the runtime here closes any connection a timed-out task still held.
    drop(rt);
    report.target = common.target.clone();
    report.label = common.label.clone();
    report.connections = conns;
    report.threads = common.threads;
    report::emit(&report, common)
}

/// Raises the soft open-file limit to the hard one; returns the limit in force.
fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(_) => soft,
        },
        Ok((soft, _)) => soft,
        Err(_) => 1024,
    }
}

/// One connection before the clock starts: a refused or silent target is an error at once.
async fn preflight(target: SocketAddr, timeout: Duration) -> Result<(), ToolError> {
    match tokio::time::timeout(timeout, TcpStream::connect(target)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => Err(format!(
            "cannot connect to {target}: connection refused (nothing listens there)"
        )
        .into()),
        Ok(Err(e)) => Err(format!("cannot connect to {target}: {e}").into()),
        Err(_) => Err(format!(
            "cannot connect to {target}: no answer within {}",
            config::format_duration(timeout)
        )
        .into()),
    }
}

/// Why a connection or exchange failed, as counted in the results.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrKind {
    Refused,
    Reset,
    Timeout,
    /// The peer closed the connection in the middle of an exchange.
    Closed,
    /// An answer that was not the frame sent.
    Protocol,
    /// No local port or address left (`EADDRNOTAVAIL`, typical of connection churn).
    AddrNotAvail,
    /// Out of file descriptors.
    Fds,
    Other,
}

impl ErrKind {
    const ALL: [ErrKind; 8] = [
        ErrKind::Refused,
        ErrKind::Reset,
        ErrKind::Timeout,
        ErrKind::Closed,
        ErrKind::Protocol,
        ErrKind::AddrNotAvail,
        ErrKind::Fds,
        ErrKind::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrKind::Refused => "refused",
            ErrKind::Reset => "reset",
            ErrKind::Timeout => "timeout",
            ErrKind::Closed => "closed",
            ErrKind::Protocol => "protocol",
            ErrKind::AddrNotAvail => "addr_not_avail",
            ErrKind::Fds => "fds",
            ErrKind::Other => "other",
        }
    }

    pub fn of(e: &io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => ErrKind::Refused,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => ErrKind::Reset,
            io::ErrorKind::TimedOut => ErrKind::Timeout,
            io::ErrorKind::UnexpectedEof => ErrKind::Closed,
            io::ErrorKind::AddrNotAvailable => ErrKind::AddrNotAvail,
            _ if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => ErrKind::Fds,
            _ => ErrKind::Other,
        }
    }
}

/// Live counters, shared by the connection tasks and the progress line.
#[derive(Default)]
pub struct Counters {
    pub up: AtomicU64,
    pub down: AtomicU64,
    /// Completed requests (rr), connections (connect) or established connections (idle).
    pub done: AtomicU64,
    errors: [AtomicU64; ErrKind::ALL.len()],
}

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    pub fn error(&self, k: ErrKind) {
        self.errors[k as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn errors(&self) -> u64 {
        self.errors.iter().map(Self::get).sum()
    }

    /// Non-zero error counts by kind, for the report.
    pub fn error_kinds(&self) -> std::collections::BTreeMap<&'static str, u64> {
        ErrKind::ALL
            .iter()
            .map(|k| (k.as_str(), Self::get(&self.errors[*k as usize])))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

/// The clock and target of one timed run, shared by its tasks.
pub struct Run {
    pub target: SocketAddr,
    pub connect_timeout: Duration,
    pub start: Instant,
    /// Samples taken before this instant (the warm-up) are not counted.
    pub measure_from: Instant,
    pub deadline: Instant,
    pub counters: Counters,
}

impl Run {
    pub fn new(common: &Common, target: SocketAddr, duration: Duration) -> Self {
        let start = Instant::now();
        let measure_from = start + common.warmup;
        Self {
            target,
            connect_timeout: common.connect_timeout,
            start,
            measure_from,
            deadline: measure_from + duration,
            counters: Counters::default(),
        }
    }

    /// One connect attempt with the connect timeout. `None`: the run's deadline came first.
    pub async fn connect(&self) -> Option<Result<TcpStream, ErrKind>> {
        let attempt = tokio::time::timeout(self.connect_timeout, TcpStream::connect(self.target));
        Some(match until(self.deadline, attempt).await? {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(ErrKind::of(&e)),
            Err(_) => Err(ErrKind::Timeout),
        })
    }

    /// Counts an error and pauses before the next attempt. `false`: the deadline came first.
    pub async fn failed(&self, k: ErrKind) -> bool {
        self.counters.error(k);
        until(self.deadline, tokio::time::sleep(ERROR_BACKOFF))
            .await
            .is_some()
    }
}

/// Opens `n` connections at once, before a run's clock starts. A failed one is `None` (its
/// task connects on its own later) and its error is returned to be counted.
pub async fn open_all(
    target: SocketAddr,
    n: u32,
    timeout: Duration,
) -> (Vec<Option<TcpStream>>, Vec<ErrKind>) {
    let mut opening = tokio::task::JoinSet::new();
    for _ in 0..n {
        opening.spawn(tokio::time::timeout(timeout, TcpStream::connect(target)));
    }
    let mut streams = Vec::with_capacity(n as usize);
    let mut errors = Vec::new();
    while let Some(joined) = opening.join_next().await {
        let outcome = match joined {
            Ok(Ok(Ok(s))) => Ok(s),
            Ok(Ok(Err(e))) => Err(ErrKind::of(&e)),
            Ok(Err(_elapsed)) => Err(ErrKind::Timeout),
            Err(_panicked) => Err(ErrKind::Other),
        };
        match outcome {
            Ok(s) => streams.push(Some(s)),
            Err(k) => {
                errors.push(k);
                streams.push(None);
            }
        }
    }
    (streams, errors)
}

/// Runs `f` unless `deadline` comes first (`None`).
pub async fn until<F: Future>(deadline: Instant, f: F) -> Option<F::Output> {
    tokio::time::timeout_at(deadline.into(), f).await.ok()
}

/// What the progress line shows.
#[derive(Clone, Copy)]
pub enum Progress {
    Bytes,
    Requests,
    Connections,
    Established { of: u32 },
}

/// Prints one progress line a second on stderr until aborted.
pub fn spawn_progress(
    run: std::sync::Arc<Run>,
    what: Progress,
    quiet: bool,
) -> Option<tokio::task::JoinHandle<()>> {
    if quiet {
        return None;
    }
    Some(tokio::spawn(async move {
        let c = &run.counters;
        let mut tick = tokio::time::interval_at(
            (run.start + Duration::from_secs(1)).into(),
            Duration::from_secs(1),
        );
        let (mut up, mut down, mut done) = (0, 0, 0);
        let mut last = run.start;
        loop {
            tick.tick().await;
            let now = Instant::now();
            let secs = now.duration_since(last).as_secs_f64().max(1e-9);
            last = now;
            let (u, d, n) = (
                Counters::get(&c.up),
                Counters::get(&c.down),
                Counters::get(&c.done),
            );
            let rate = |x: u64, prev: u64| (x - prev) as f64 / secs;
            let body = match what {
                Progress::Bytes => format!(
                    "up {:.3} Gbit/s  down {:.3} Gbit/s",
                    rate(u, up) * 8e-9,
                    rate(d, down) * 8e-9
                ),
                Progress::Requests => format!("{:.0} req/s", rate(n, done)),
                Progress::Connections => format!("{:.0} conn/s", rate(n, done)),
                Progress::Established { of } => format!("established {n}/{of}"),
            };
            (up, down, done) = (u, d, n);
            let phase = if now < run.measure_from {
                " (warm-up)"
            } else {
                ""
            };
            eprintln!(
                "[{:6.1}s] {body}  errors {}{phase}",
                now.duration_since(run.start).as_secs_f64(),
                c.errors()
            );
        }
    }))
}

/// A latency histogram in nanoseconds, 1 ns … 60 s, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    // These bounds are valid for HdrHistogram, so creation cannot fail.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

/// Records a duration (clamped into the histogram's range).
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1));
}

/// Merges per-task histograms (same bounds, so adding cannot fail).
pub fn merge(into: &mut Histogram<u64>, from: &Histogram<u64>) {
    let _ = into.add(from);
}
