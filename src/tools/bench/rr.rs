//! `bench rr`: request/response over TLV frames, one request in flight per connection.
//!
//! Each request is one [`frame`](crate::tools::frame) of `--size` payload bytes; the answer
//! must be the same frame back (what `ringfwd echo` does), checked for type and length as soon
//! as its header arrives.
//!
//! Closed loop (no `--rate`): each connection sends its next request as soon as the previous
//! answer is in; latency is measured from the send. This finds the maximum rate, but a server
//! stall also stalls the client, so the stall shows up as a handful of slow samples instead of
//! every request that should have been sent meanwhile (coordinated omission).
//!
//! Open loop (`--rate R`): the R requests/s are spread evenly over the connections, each on its
//! own schedule of intended send times (staggered so they do not fire together), and latency is
//! measured from the *intended* time, as wrk2 does. A request that could not be sent on time
//! because the previous answer was late is charged the wait. Pacing uses a `timerfd`
//! ([`super::pace`]) because tokio's 1 ms timer would charge its own lateness to the server.
//! An answer that takes longer than `--timeout` counts as an error and the connection is
//! reopened.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::pace::Pacer;
use super::report::{Percentiles, Report, round3};
use super::{
    Common, Counters, ErrKind, Progress, Run, merge, new_histogram, open_all, record,
    spawn_progress, until,
};
use crate::config::{self, ByteSize};
use crate::tools::ToolError;
use crate::tools::frame::{Codec, HEADER_LEN, Header, KIND_DATA};

#[derive(Debug, Args)]
pub struct RrArgs {
    #[command(flatten)]
    pub common: Common,
    /// Payload bytes of each request (and answer), e.g. 64 or 16KiB.
    #[arg(long, value_name = "BYTES", default_value = "64", value_parser = parse_payload)]
    pub size: ByteSize,
    /// Open loop: total requests per second over all connections (default: closed loop).
    #[arg(long, value_name = "REQ_PER_S", value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// An answer later than this is an error (the connection is reopened).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = super::parse_positive)]
    pub timeout: Duration,
}

/// Payload sizes the request frames may have (the bench allocates one buffer per connection).
pub fn parse_payload(text: &str) -> Result<ByteSize, String> {
    let s = config::parse_size(text)?;
    if s.bytes() > 16 << 20 {
        return Err(format!("invalid size {text:?}: at most 16MiB per frame"));
    }
    Ok(s)
}

fn parse_rate(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 && r <= 1e8 => Ok(r),
        _ => Err(format!(
            "invalid rate {text:?}: expected requests per second, more than 0"
        )),
    }
}

const DEFAULT_DURATION: Duration = Duration::from_secs(10);

pub async fn run(args: &RrArgs, target: SocketAddr, conns: u32) -> Result<Report, ToolError> {
    let duration = args.common.duration.unwrap_or(DEFAULT_DURATION);
    let req = Arc::new(request(args.size.as_usize())?);
    // Connect first and start the clock after: otherwise the first request of every
    // connection (and, open loop, every request scheduled meanwhile) is charged the set-up.
    let (mut ready, setup_errors) = open_all(target, conns, args.common.connect_timeout).await;
    let run = Arc::new(Run::new(&args.common, target, duration));
    for k in setup_errors {
        run.counters.error(k);
    }
    let progress = spawn_progress(run.clone(), Progress::Requests, args.common.quiet);
    let tasks: Vec<_> = (0..conns)
        .map(|i| {
            let schedule = args
                .rate
                .map(|rate| Schedule::new(run.start, rate, conns, i));
            let first = ready.pop().flatten();
            tokio::spawn(connection(
                run.clone(),
                first,
                req.clone(),
                schedule,
                args.timeout,
            ))
        })
        .collect();
    let mut hist = new_histogram();
    let mut timer_late = new_histogram();
    for t in tasks {
        match t.await {
            Ok(Ok((h, late))) => {
                merge(&mut hist, &h);
                merge(&mut timer_late, &late);
            }
            Ok(Err(e)) => return Err(e.into()),
            Err(e) => return Err(format!("connection task failed: {e}").into()),
        }
    }
    if let Some(p) = progress {
        p.abort();
    }
    let c = &run.counters;
    let measured = run.deadline.duration_since(run.measure_from);
    let mut r = Report {
        mode: "rr",
        size: Some(args.size.bytes()),
        load: Some(if args.rate.is_some() {
            "open"
        } else {
            "closed"
        }),
        rate: args.rate,
        requests: Some(hist.len()),
        req_per_s: Some(round3(hist.len() as f64 / measured.as_secs_f64().max(1e-9))),
        errors: c.errors(),
        error_kinds: c.error_kinds(),
        ..Report::default()
    };
    r.set_duration(measured);
    r.set_latency("rtt", &hist);
    if let Some(p) = Percentiles::of(&timer_late) {
        r.timer_late_p50_us = Some(p.p50);
        r.timer_late_p99_us = Some(p.p99);
    }
    Ok(r)
}

/// The request frame every connection sends.
pub fn request(size: usize) -> Result<Vec<u8>, ToolError> {
    let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let mut out = Vec::with_capacity(HEADER_LEN + size);
    Codec::new(u32::try_from(size).map_err(|_| "frame too large")?)
        .encode(KIND_DATA, &payload, &mut out)?;
    Ok(out)
}

/// When a connection of an open-loop run intends to send its requests.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    first: Instant,
    /// Per-connection interval, in nanoseconds (f64: exact enough over any run length).
    period_ns: f64,
}

impl Schedule {
    /// Connection `index` of `conns` sharing `rate` req/s; offsets spread the connections
    /// evenly over one period.
    pub fn new(start: Instant, rate: f64, conns: u32, index: u32) -> Self {
        let period_ns = 1e9 * f64::from(conns) / rate;
        let offset = period_ns * f64::from(index) / f64::from(conns);
        Self {
            first: start + Duration::from_nanos(offset as u64),
            period_ns,
        }
    }

    /// The intended send time of request `k` (from 0).
    pub fn at(&self, k: u64) -> Instant {
        self.first + Duration::from_nanos((self.period_ns * k as f64) as u64)
    }
}

/// One connection slot: (re)connects and exchanges requests until the deadline. Returns the
/// round-trip histogram and, for an open loop, how late the pacing timer woke whenever the
/// connection was ahead of schedule and had to wait (the client's own share of the latency).
///
/// # Errors
/// Only set-up (the pacing timer); connection failures are counted, not returned.
async fn connection(
    run: Arc<Run>,
    mut first: Option<TcpStream>,
    req: Arc<Vec<u8>>,
    schedule: Option<Schedule>,
    timeout: Duration,
) -> Result<(Histogram<u64>, Histogram<u64>), String> {
    let mut hist = new_histogram();
    let mut timer_late = new_histogram();
    let pacer = match schedule {
        Some(_) => Some(Pacer::new().map_err(|e| format!("cannot create a pacing timer: {e}"))?),
        None => None,
    };
    let codec = Codec::new((req.len() - HEADER_LEN) as u32);
    let mut resp = vec![0u8; req.len()];
    let mut k = 0u64;
    'connect: loop {
        let attempt = match first.take() {
            Some(s) => Ok(s),
            None => match run.connect().await {
                Some(a) => a,
                None => break,
            },
        };
        let mut stream = match attempt {
            Ok(s) => s,
            Err(e) => {
                if run.failed(e).await {
                    continue;
                }
                break;
            }
        };
        let _ = stream.set_nodelay(true);
        loop {
            let start = match (&schedule, &pacer) {
                (Some(s), Some(p)) => {
                    let at = s.at(k);
                    if at >= run.deadline {
                        break 'connect;
                    }
                    match until(run.deadline, p.sleep_until(at)).await {
                        None => break 'connect,
                        Some(Ok(true)) if at >= run.measure_from => {
                            record(&mut timer_late, Instant::now() - at);
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Err(format!("pacing timer failed: {e}")),
                    }
                    at
                }
                _ => Instant::now(),
            };
            let outcome = until(
                run.deadline,
                tokio::time::timeout(timeout, exchange(&mut stream, &req, &mut resp, codec)),
            )
            .await;
            let result = match outcome {
                None => break 'connect,
                Some(Err(_elapsed)) => Err(ErrKind::Timeout),
                Some(Ok(r)) => r,
            };
            k += 1;
            match result {
                Ok(()) => {
                    let done = Instant::now();
                    if start >= run.measure_from {
                        record(&mut hist, done - start);
                    }
                    Counters::add(&run.counters.done, 1);
                }
                Err(e) => {
                    if run.failed(e).await {
                        continue 'connect;
                    }
                    break 'connect;
                }
            }
        }
    }
    Ok((hist, timer_late))
}

/// Sends the request and reads its answer, which must be the same frame type and length.
/// Sending and receiving run together, so a frame larger than the socket buffers cannot
/// deadlock against an echo that answers while it is still being sent.
pub async fn exchange(
    s: &mut TcpStream,
    req: &[u8],
    resp: &mut [u8],
    codec: Codec,
) -> Result<(), ErrKind> {
    let (mut rd, mut wr) = s.split();
    let send = async { wr.write_all(req).await.map_err(|e| ErrKind::of(&e)) };
    let receive = async {
        let mut got = 0;
        let mut checked = false;
        while got < resp.len() {
            match rd.read(&mut resp[got..]).await {
                Ok(0) => return Err(ErrKind::Closed),
                Ok(n) => got += n,
                Err(e) => return Err(ErrKind::of(&e)),
            }
            if !checked && got >= HEADER_LEN {
                let mut head = [0u8; HEADER_LEN];
                head.copy_from_slice(&resp[..HEADER_LEN]);
                let h = codec
                    .check(Header::decode(head))
                    .map_err(|_| ErrKind::Protocol)?;
                if h.kind != req[0] || h.len as usize != req.len() - HEADER_LEN {
                    return Err(ErrKind::Protocol);
                }
                checked = true;
            }
        }
        Ok(())
    };
    tokio::try_join!(send, receive).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_spreads_connections_and_keeps_the_rate() {
        let t0 = Instant::now();
        // 1000 req/s over 4 connections: each every 4 ms, offset by 1 ms.
        let s: Vec<Schedule> = (0..4).map(|i| Schedule::new(t0, 1000.0, 4, i)).collect();
        assert_eq!(s[0].at(0), t0);
        assert_eq!(s[1].at(0) - t0, Duration::from_millis(1));
        assert_eq!(s[3].at(2) - t0, Duration::from_millis(11));
        assert_eq!(s[0].at(1000) - t0, Duration::from_secs(4));
    }

    #[test]
    fn rates_and_sizes_are_checked() {
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("-5").is_err());
        assert!(parse_rate("NaN").is_err());
        assert_eq!(parse_rate("2500").unwrap(), 2500.0);
        assert!(
            parse_payload("17MiB")
                .unwrap_err()
                .contains("at most 16MiB")
        );
    }

    #[test]
    fn request_is_one_data_frame() {
        let r = request(3).unwrap();
        assert_eq!(r, [KIND_DATA, 0, 0, 0, 3, 0, 1, 2]);
        assert_eq!(request(0).unwrap(), [KIND_DATA, 0, 0, 0, 0]);
    }
}
