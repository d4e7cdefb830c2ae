//! `bench throughput`: bulk streaming over N connections for a fixed time → Gbit/s.
//!
//! `up` writes as fast as the target takes it (use a `sink`), `down` reads what the target
//! sends (use `sink --send SIZE`; a connection whose download ends is reopened so the run
//! keeps streaming), `both` does both at once on every connection (use an `echo`, which sends
//! back what it is sent). Bytes are counted as they are written or read; the rate is taken
//! between two snapshots of the counters, at the end of the warm-up and at the deadline, so
//! connection set-up and tear-down fall outside the measured window.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::report::{Report, round3};
use super::{Common, Counters, ErrKind, Progress, Run, spawn_progress, until};
use crate::config::{self, ByteSize};
use crate::tools::ToolError;

#[derive(Debug, Args)]
pub struct ThroughputArgs {
    #[command(flatten)]
    pub common: Common,
    /// up: client → target (target: `ringfwd sink`); down: target → client (target:
    /// `ringfwd sink --send SIZE`); both: each way at once (target: `ringfwd echo`).
    #[arg(long, value_enum, default_value_t = Direction::Up)]
    pub direction: Direction,
    /// Bytes per write and per read call, e.g. 128KiB.
    #[arg(long, value_name = "BYTES", default_value = "128KiB", value_parser = parse_io_size)]
    pub size: ByteSize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Direction {
    Up,
    Down,
    Both,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down => "down",
            Direction::Both => "both",
        }
    }
}

fn parse_io_size(text: &str) -> Result<ByteSize, String> {
    let s = config::parse_size(text)?;
    if !(1..=(64 << 20)).contains(&s.bytes()) {
        return Err(format!("invalid size {text:?}: must be 1B..=64MiB"));
    }
    Ok(s)
}

const DEFAULT_DURATION: Duration = Duration::from_secs(10);

pub async fn run(
    args: &ThroughputArgs,
    target: SocketAddr,
    conns: u32,
) -> Result<Report, ToolError> {
    let duration = args.common.duration.unwrap_or(DEFAULT_DURATION);
    let run = Arc::new(Run::new(&args.common, target, duration));
    let progress = spawn_progress(run.clone(), Progress::Bytes, args.common.quiet);
    let size = args.size.as_usize();
    let tasks: Vec<_> = (0..conns)
        .map(|_| tokio::spawn(connection(run.clone(), args.direction, size)))
        .collect();

    let c = &run.counters;
    let snapshot = || (Counters::get(&c.up), Counters::get(&c.down), Instant::now());
    tokio::time::sleep_until(run.measure_from.into()).await;
    let (up0, down0, t0) = snapshot();
    // Halfway through the window too: a run whose bytes all moved in the first half is a
    // target that stopped taking or sending data (an echo that nobody reads from), not a rate.
    let halfway = run.measure_from + run.deadline.saturating_duration_since(run.measure_from) / 2;
    tokio::time::sleep_until(halfway.into()).await;
    let (up_h, down_h, _) = snapshot();
    tokio::time::sleep_until(run.deadline.into()).await;
    let (up1, down1, t1) = snapshot();
    for t in tasks {
        let _ = t.await;
    }
    if let Some(p) = progress {
        p.abort();
    }

    let secs = t1.duration_since(t0).as_secs_f64().max(1e-9);
    let gbit = |bytes: u64| round3(bytes as f64 * 8.0 / secs / 1e9);
    let (up, down) = (up1 - up0, down1 - down0);
    let moved = Moved {
        up,
        down,
        second_half: (up1 + down1) - (up_h + down_h),
    };
    moved.check(args.direction, target, t1.duration_since(t0))?;
    let mut r = Report {
        mode: "throughput",
        direction: Some(args.direction.as_str()),
        size: Some(args.size.bytes()),
        bytes: Some(up + down),
        gbit_per_s: Some(gbit(up + down)),
        errors: c.errors(),
        error_kinds: c.error_kinds(),
        ..Report::default()
    };
    if args.direction == Direction::Both {
        r.bytes_up = Some(up);
        r.bytes_down = Some(down);
        r.gbit_per_s_up = Some(gbit(up));
        r.gbit_per_s_down = Some(gbit(down));
    }
    r.set_duration(t1.duration_since(t0));
    Ok(r)
}

/// What a run moved in its measured window.
struct Moved {
    up: u64,
    down: u64,
    /// Both directions, in the second half of the window.
    second_half: u64,
}

impl Moved {
    /// Refuses a run that measured no transfer: nothing moved, nothing came back (`both`), or
    /// the transfer stopped early. Each is a target of the wrong kind for the direction, and a
    /// number printed for it (0 B, or the few MiB the socket buffers took) would be a lie.
    fn check(
        &self,
        direction: Direction,
        target: SocketAddr,
        window: Duration,
    ) -> Result<(), ToolError> {
        let need = backend_needed(direction);
        let secs = config::format_duration(window);
        let total = self.up + self.down;
        if total == 0 {
            return Err(format!("no data moved to or from {target} in {secs}: {need}").into());
        }
        if direction == Direction::Both && (self.up == 0 || self.down == 0) {
            let (dir, what) = if self.down == 0 {
                ("target to client", "nothing came back")
            } else {
                ("client to target", "nothing was taken")
            };
            return Err(format!("{what} ({dir}) from {target} in {secs}: {need}").into());
        }
        if self.second_half == 0 {
            return Err(format!(
                "the transfer with {target} stalled: {total} bytes moved early, none in the second half of {secs} (the target stopped reading or sending): {need}"
            )
            .into());
        }
        Ok(())
    }
}

/// The backend a direction needs, as said in errors and `--help`.
fn backend_needed(direction: Direction) -> &'static str {
    match direction {
        Direction::Up => {
            "--direction up needs a target that reads and discards, like `ringfwd sink`"
        }
        Direction::Down => {
            "--direction down needs a target that sends, like `ringfwd sink --send 100GiB`"
        }
        Direction::Both => "--direction both needs a target that echoes, like `ringfwd echo`",
    }
}

/// One connection slot: (re)connects and streams until the deadline.
async fn connection(run: Arc<Run>, direction: Direction, size: usize) {
    while let Some(attempt) = run.connect().await {
        let stream = match attempt {
            Ok(s) => s,
            Err(k) => {
                if run.failed(k).await {
                    continue;
                }
                return;
            }
        };
        match stream_until_deadline(&run, stream, direction, size).await {
            Some(Ok(())) => {}
            Some(Err(k)) => {
                if !run.failed(k).await {
                    return;
                }
            }
            None => return,
        }
    }
}

/// Streams on one connection. `None`: the deadline came. `Some(Ok)`: the target ended the
/// download (reconnect). `Some(Err)`: the connection failed.
async fn stream_until_deadline(
    run: &Run,
    mut stream: TcpStream,
    direction: Direction,
    size: usize,
) -> Option<Result<(), ErrKind>> {
    let c = &run.counters;
    let (mut r, mut w) = stream.split();
    let upload = async {
        let buf = vec![0u8; size];
        loop {
            match w.write(&buf).await {
                Ok(n) => Counters::add(&c.up, n as u64),
                Err(e) => return Err(ErrKind::of(&e)),
            }
        }
    };
    let download = async {
        let mut buf = vec![0u8; size];
        loop {
            match r.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => Counters::add(&c.down, n as u64),
                Err(e) => return Err(ErrKind::of(&e)),
            }
        }
    };
    let work = async {
        match direction {
            Direction::Up => upload.await,
            Direction::Down => download.await,
            // Either side ending ends the connection: an echo that stops echoing has failed.
            Direction::Both => tokio::select! {
                r = upload => r,
                r = download => r.and(Err(ErrKind::Closed)),
            },
        }
    };
    until(run.deadline, work).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(up: u64, down: u64, second_half: u64, d: Direction) -> Result<(), String> {
        let target: SocketAddr = "127.0.0.1:9".parse().unwrap();
        Moved {
            up,
            down,
            second_half,
        }
        .check(d, target, Duration::from_secs(10))
        .map_err(|e| e.to_string())
    }

    #[test]
    fn a_run_that_measured_no_transfer_is_refused() {
        let e = check(0, 0, 0, Direction::Down).unwrap_err();
        assert!(
            e.contains("no data moved") && e.contains("sink --send"),
            "{e}"
        );
        // Up against an echo nobody reads: the socket buffers fill, then nothing.
        let e = check(80 << 20, 0, 0, Direction::Up).unwrap_err();
        assert!(e.contains("stalled") && e.contains("`ringfwd sink`"), "{e}");
        let e = check(1 << 30, 0, 1 << 29, Direction::Both).unwrap_err();
        assert!(e.contains("nothing came back") && e.contains("echo"), "{e}");
        assert!(check(1 << 30, 0, 1 << 29, Direction::Up).is_ok());
        assert!(check(1 << 30, 1 << 30, 1 << 29, Direction::Both).is_ok());
    }
}
