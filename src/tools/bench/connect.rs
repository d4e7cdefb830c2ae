//! `bench connect`: connection churn. Each of N workers loops: connect, one request/response
//! (a TLV frame echoed back, so a relay must have reached its upstream), close.
//!
//! Reported: completed connections per second, the percentiles of the connect time (the
//! TCP handshake with the target) and of the whole transaction (connect start to answer; through
//! a relay this includes the relay's own upstream connect). The client closes first, so its
//! side keeps the TIME_WAIT; on loopback Linux reuses those ports (`tcp_tw_reuse` = 2 is the
//! default), elsewhere a long run may run out of ports, counted as `addr_not_avail` errors.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;

use super::report::{Percentiles, Report, round3};
use super::rr::{exchange, parse_payload, request};
use super::{
    Common, Counters, ErrKind, Progress, Run, merge, new_histogram, record, spawn_progress, until,
};
use crate::config::ByteSize;
use crate::tools::ToolError;
use crate::tools::frame::{Codec, HEADER_LEN};

#[derive(Debug, Args)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub common: Common,
    /// Payload bytes of the one request each connection makes.
    #[arg(long, value_name = "BYTES", default_value = "64", value_parser = parse_payload)]
    pub size: ByteSize,
    /// An answer later than this is an error.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = super::parse_positive)]
    pub timeout: Duration,
}

const DEFAULT_DURATION: Duration = Duration::from_secs(10);

pub async fn run(args: &ConnectArgs, target: SocketAddr, conns: u32) -> Result<Report, ToolError> {
    let duration = args.common.duration.unwrap_or(DEFAULT_DURATION);
    let run = Arc::new(Run::new(&args.common, target, duration));
    let progress = spawn_progress(run.clone(), Progress::Connections, args.common.quiet);
    let req = Arc::new(request(args.size.as_usize())?);
    let tasks: Vec<_> = (0..conns)
        .map(|_| tokio::spawn(worker(run.clone(), req.clone(), args.timeout)))
        .collect();
    let mut connect_hist = new_histogram();
    let mut txn_hist = new_histogram();
    for t in tasks {
        let (c, x) = t
            .await
            .map_err(|e| format!("connection task failed: {e}"))?;
        merge(&mut connect_hist, &c);
        merge(&mut txn_hist, &x);
    }
    if let Some(p) = progress {
        p.abort();
    }
    let c = &run.counters;
    let measured = run.deadline.duration_since(run.measure_from);
    let mut r = Report {
        mode: "connect",
        size: Some(args.size.bytes()),
        connects: Some(txn_hist.len()),
        conn_per_s: Some(round3(
            txn_hist.len() as f64 / measured.as_secs_f64().max(1e-9),
        )),
        errors: c.errors(),
        error_kinds: c.error_kinds(),
        ..Report::default()
    };
    r.set_duration(measured);
    r.set_latency("connect", &connect_hist);
    if let Some(p) = Percentiles::of(&txn_hist) {
        r.txn_p50_us = Some(p.p50);
        r.txn_p99_us = Some(p.p99);
        r.txn_max_us = Some(p.max);
    }
    Ok(r)
}

/// Churns connections until the deadline; returns (connect times, transaction times).
async fn worker(
    run: Arc<Run>,
    req: Arc<Vec<u8>>,
    timeout: Duration,
) -> (Histogram<u64>, Histogram<u64>) {
    let mut connect_hist = new_histogram();
    let mut txn_hist = new_histogram();
    let codec = Codec::new((req.len() - HEADER_LEN) as u32);
    let mut resp = vec![0u8; req.len()];
    loop {
        let t0 = Instant::now();
        let Some(attempt) = run.connect().await else {
            break;
        };
        let mut stream = match attempt {
            Ok(s) => s,
            Err(k) => {
                if run.failed(k).await {
                    continue;
                }
                break;
            }
        };
        let t1 = Instant::now();
        let _ = stream.set_nodelay(true);
        let answer = until(
            run.deadline,
            tokio::time::timeout(timeout, exchange(&mut stream, &req, &mut resp, codec)),
        )
        .await;
        let t2 = Instant::now();
        let result = match answer {
            None => break,
            Some(Err(_elapsed)) => Err(ErrKind::Timeout),
            Some(Ok(r)) => r,
        };
        drop(stream);
        match result {
            Ok(()) => {
                if t0 >= run.measure_from {
                    record(&mut connect_hist, t1 - t0);
                    record(&mut txn_hist, t2 - t0);
                }
                Counters::add(&run.counters.done, 1);
            }
            Err(k) => {
                if !run.failed(k).await {
                    break;
                }
            }
        }
    }
    (connect_hist, txn_hist)
}
