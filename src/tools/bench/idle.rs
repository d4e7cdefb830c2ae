//! `bench idle`: hold N idle connections through the target and report what they cost a
//! process (`--pid`, normally the relay) in memory.
//!
//! Steps: read the process's `VmRSS` (`/proc/PID/status`) and `Pss` (`/proc/PID/smaps_rollup`,
//! when readable); open the connections, `--parallel` at a time, each doing one small
//! request/response (so a relay has connected upstream and built its whole per-connection
//! state; `--no-exchange` only connects); wait `--settle` for the process to finish its own
//! allocations; read the memory again; hold for `--duration`; check which connections the
//! peer closed meanwhile (an idle timeout shows up there); close all. Memory per connection is
//! the delta divided by the connections established. RSS counts shared pages in full; PSS
//! splits them among the processes sharing them, so the two together show how much of the
//! growth is private. A connection that fails to open is counted as an error, not retried, so
//! the mode stays bounded by N × (connect timeout + answer timeout) / parallelism.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use super::report::{Report, round3};
use super::rr::{exchange, parse_payload, request};
use super::{Common, Counters, ErrKind, Progress, Run, spawn_progress, until};
use crate::config::ByteSize;
use crate::tools::ToolError;
use crate::tools::frame::{Codec, HEADER_LEN};

pub const DEFAULT_CONNECTIONS: u32 = 100;

#[derive(Debug, Args)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: Common,
    /// Process whose memory to measure (the relay's pid). Without it, connections are only
    /// held and counted.
    #[arg(long, value_name = "PID")]
    pub pid: Option<u32>,
    /// Pause between the last connection established and the second memory reading.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = crate::config::parse_duration)]
    pub settle: Duration,
    /// Payload bytes of the one request/response each connection makes.
    #[arg(long, value_name = "BYTES", default_value = "16", value_parser = parse_payload)]
    pub size: ByteSize,
    /// Only connect; no request/response (for a target that does not echo).
    #[arg(long)]
    pub no_exchange: bool,
    /// Connections opened at the same time.
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub parallel: u32,
    /// An answer later than this is an error.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = super::parse_positive)]
    pub timeout: Duration,
}

/// A process's memory, in KiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Memory {
    pub rss_kib: u64,
    /// `None` when smaps_rollup is not readable (another user's process).
    pub pss_kib: Option<u64>,
}

/// Reads `VmRSS` and, if possible, `Pss` of `pid`.
///
/// # Errors
/// `/proc/PID/status` unreadable (no such process) or without `VmRSS` (a kernel thread).
pub fn read_memory(pid: u32) -> Result<Memory, String> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let rss_kib = field_kib(&status, "VmRSS").ok_or_else(|| format!("{path} has no VmRSS"))?;
    let pss_kib = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|t| field_kib(&t, "Pss"));
    Ok(Memory { rss_kib, pss_kib })
}

/// The value of a `Key:   123 kB` line.
fn field_kib(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        rest.trim().strip_suffix("kB")?.trim().parse().ok()
    })
}

pub async fn run(args: &IdleArgs, target: SocketAddr, conns: u32) -> Result<Report, ToolError> {
    let before = args.pid.map(read_memory).transpose()?;
    // The opening phase is bounded by the per-connection timeouts; give the run a deadline
    // that only those can reach.
    let waves = u64::from(conns.div_ceil(args.parallel));
    let budget = (args.common.connect_timeout + args.timeout)
        * u32::try_from(waves).unwrap_or(u32::MAX)
        + Duration::from_secs(1);
    let run = Arc::new(Run::new(&args.common, target, budget));
    let progress = spawn_progress(
        run.clone(),
        Progress::Established { of: conns },
        args.common.quiet,
    );
    let req = Arc::new(request(args.size.as_usize())?);
    let exchange_timeout = (!args.no_exchange).then_some(args.timeout);

    let opened = Instant::now();
    let mut streams = Vec::with_capacity(conns as usize);
    let mut pending = JoinSet::new();
    let mut started = 0u32;
    while started < conns || !pending.is_empty() {
        while started < conns && pending.len() < args.parallel as usize {
            pending.spawn(open(run.clone(), req.clone(), exchange_timeout));
            started += 1;
        }
        match pending.join_next().await {
            Some(Ok(Ok(s))) => {
                streams.push(s);
                Counters::add(&run.counters.done, 1);
            }
            Some(Ok(Err(k))) => run.counters.error(k),
            Some(Err(e)) => return Err(format!("connection task failed: {e}").into()),
            None => break,
        }
    }
    let open_time = opened.elapsed();
    tokio::time::sleep(args.settle).await;
    let after = args.pid.map(read_memory).transpose()?;
    if let Some(p) = progress {
        p.abort();
    }
    let hold = args.common.duration.unwrap_or(Duration::ZERO);
    tokio::time::sleep(hold).await;
    let alive = streams.iter().filter(|s| still_open(s)).count() as u64;
    drop(streams);

    let c = &run.counters;
    let established = Counters::get(&c.done);
    let mut r = Report {
        mode: "idle",
        size: (!args.no_exchange).then_some(args.size.bytes()),
        established: Some(established),
        alive_after_hold: Some(alive),
        settle_s: Some(round3(args.settle.as_secs_f64())),
        pid: args.pid,
        errors: c.errors(),
        error_kinds: c.error_kinds(),
        ..Report::default()
    };
    r.set_duration(open_time + args.settle + hold);
    let per_conn = |b: u64, a: u64| {
        (established > 0).then(|| round3((a as f64 - b as f64) * 1024.0 / established as f64))
    };
    if let (Some(b), Some(a)) = (before, after) {
        r.rss_before_kib = Some(b.rss_kib);
        r.rss_after_kib = Some(a.rss_kib);
        r.rss_per_conn_bytes = per_conn(b.rss_kib, a.rss_kib);
        if let (Some(pb), Some(pa)) = (b.pss_kib, a.pss_kib) {
            r.pss_before_kib = Some(pb);
            r.pss_after_kib = Some(pa);
            r.pss_per_conn_bytes = per_conn(pb, pa);
        }
    }
    Ok(r)
}

/// Opens one connection and, unless `exchange_timeout` is `None`, makes one request.
async fn open(
    run: Arc<Run>,
    req: Arc<Vec<u8>>,
    exchange_timeout: Option<Duration>,
) -> Result<TcpStream, ErrKind> {
    let mut s = run.connect().await.ok_or(ErrKind::Timeout)??;
    let _ = s.set_nodelay(true);
    if let Some(timeout) = exchange_timeout {
        let codec = Codec::new((req.len() - HEADER_LEN) as u32);
        let mut resp = vec![0u8; req.len()];
        let answer = until(
            run.deadline,
            tokio::time::timeout(timeout, exchange(&mut s, &req, &mut resp, codec)),
        )
        .await;
        match answer {
            Some(Ok(r)) => r?,
            None | Some(Err(_)) => return Err(ErrKind::Timeout),
        }
    }
    Ok(s)
}

/// True unless the peer closed or reset the connection (checked without blocking).
fn still_open(s: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    match s.try_read(&mut b) {
        Ok(0) => false,
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_fields_are_parsed_in_kib() {
        let text = "Name:\tringfwd\nVmHWM:\t  9000 kB\nVmRSS:\t    1964 kB\n";
        assert_eq!(field_kib(text, "VmRSS"), Some(1964));
        assert_eq!(field_kib("Pss:                 296 kB\n", "Pss"), Some(296));
        assert_eq!(field_kib("Pss_Anon:  112 kB\n", "Pss"), None);
        assert_eq!(field_kib(text, "VmSwap"), None);
    }

    #[test]
    fn own_memory_is_readable_and_a_missing_pid_is_an_error() {
        let m = read_memory(std::process::id()).unwrap();
        assert!(m.rss_kib > 0);
        assert!(m.pss_kib.is_some_and(|p| p > 0));
        // PIDs never reach u32::MAX (pid_max is at most 2^22).
        let e = read_memory(u32::MAX).unwrap_err();
        assert!(e.contains("cannot read /proc/4294967295/status"), "{e}");
    }
}
