//! systemd notifications end to end: the forwarder started with `NOTIFY_SOCKET` pointing at a
//! datagram socket this test binds (as systemd would) and `WATCHDOG_USEC` set.
//!
//! 1. On every engine: `READY=1` once serving, `WATCHDOG=1` while it runs, `RELOADING=1` with
//!    `MONOTONIC_USEC=` at SIGHUP and `READY=1` after the reload, `STOPPING=1` at SIGTERM, in
//!    that order.
//! 2. A wedged worker: the forwarder's stderr is a pipe the test stops reading, with the
//!    access log on, so the worker that writes a session's line blocks in `write(2)` once the
//!    pipe is full (as a stalled journald would do). The watchdog pings must stop. The `std`
//!    engine writes access-log lines from per-connection threads, not from its event loop
//!    (the accept loop), so it is wedged differently and is not part of this case; the tokio
//!    engine runs with one worker thread, the one that blocks.

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use support::relay::{BIN, Relay};
use support::sock::{self, Backend};
use support::{STEP_TIMEOUT, TempFile};

support::engine_suite!(
    [ready_reloading_stopping_and_watchdog_in_order],
    std_engine: ["--engine", "std"],
    tokio_engine: ["--engine", "tokio"],
    uring_copy: ["--engine", "uring", "--mode", "copy"],
    uring_splice: ["--engine", "uring", "--mode", "splice"],
    uring_auto: ["--engine", "uring", "--mode", "auto"],
);

mod wedged_uring {
    const ENGINE: &[&str] = &["--engine", "uring", "--mode", "copy"];
    crate::support::scenarios!([a_wedged_worker_stops_the_watchdog]);
}

mod wedged_tokio {
    const ENGINE: &[&str] = &["--engine", "tokio"];
    crate::support::scenarios!([a_wedged_worker_stops_the_watchdog]);
}

/// `WATCHDOG_USEC` of these runs: pings every 200 ms.
const WATCHDOG: Duration = Duration::from_millis(400);

/// The fake systemd end: a datagram socket at a scratch path.
struct Systemd {
    sock: UnixDatagram,
    path: std::path::PathBuf,
}

impl Systemd {
    fn bind() -> Self {
        let path = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "notify-{}-{}.sock",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
        Self { sock, path }
    }

    /// The next message's lines, or `None` after `within`.
    fn recv(&self, within: Duration) -> Option<Vec<String>> {
        self.sock
            .set_read_timeout(Some(within.max(Duration::from_millis(1))))
            .expect("timeout");
        let mut buf = [0u8; 4096];
        let n = self.sock.recv(&mut buf).ok()?;
        Some(
            String::from_utf8_lossy(&buf[..n])
                .lines()
                .map(str::to_string)
                .collect(),
        )
    }

    /// Messages until one has `line`, within `within`: every message up to it (inclusive).
    fn until(&self, line: &str, within: Duration) -> Vec<Vec<String>> {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(msg) = self.recv(left) else {
                panic!("no {line} within {within:?}; got {seen:?}");
            };
            let done = msg.iter().any(|l| l == line);
            seen.push(msg);
            if done {
                return seen;
            }
        }
    }

    /// How many `WATCHDOG=1` arrive within `window`.
    fn watchdogs_within(&self, window: Duration) -> usize {
        let deadline = Instant::now() + window;
        let mut n = 0;
        while let Some(msg) = self.recv(deadline.saturating_duration_since(Instant::now())) {
            n += usize::from(msg.iter().any(|l| l == "WATCHDOG=1"));
            if Instant::now() >= deadline {
                break;
            }
        }
        n
    }
}

impl Drop for Systemd {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn config(upstream: std::net::SocketAddr, extra: &str) -> TempFile {
    TempFile::new(
        "ringfwd-notify",
        &format!(
            "{extra}\n[[rule]]\nname = \"n\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\n"
        ),
    )
}

/// The non-watchdog states in order (`READY=1`, `RELOADING=1`, `STOPPING=1`).
fn states(msgs: &[Vec<String>]) -> Vec<String> {
    msgs.iter()
        .flatten()
        .filter(|l| matches!(l.as_str(), "READY=1" | "RELOADING=1" | "STOPPING=1"))
        .cloned()
        .collect()
}

fn ready_reloading_stopping_and_watchdog_in_order(engine: &[&str]) {
    let _load = support::light();
    let backend = Backend::echo();
    let file = config(backend.addr(), "");
    let systemd = Systemd::bind();
    let path = file.path.display().to_string();
    let mut args = vec!["run", "--config", path.as_str()];
    args.extend_from_slice(engine);
    let mut cmd = Command::new(BIN);
    cmd.args(&args)
        .env("NOTIFY_SOCKET", &systemd.path)
        .env("WATCHDOG_USEC", WATCHDOG.as_micros().to_string());
    let mut relay = Relay::try_spawn_command(cmd, &args, 1).unwrap_or_else(|e| panic!("{e}"));
    // 1. READY once serving: the listener answers by then.
    let first = systemd.until("READY=1", STEP_TIMEOUT);
    assert_eq!(states(&first), ["READY=1"], "{first:?}");
    let mut s = sock::connect(relay.addr());
    s.write_all(b"ping").expect("write");
    let mut back = [0u8; 4];
    s.read_exact(&mut back).expect("served once READY");
    drop(s);
    // 2. The watchdog pings.
    let pings = systemd.until("WATCHDOG=1", STEP_TIMEOUT);
    assert!(states(&pings).is_empty(), "{pings:?}");
    systemd.until("WATCHDOG=1", STEP_TIMEOUT);
    // 3. SIGHUP: RELOADING=1 with MONOTONIC_USEC in the same message, then READY=1.
    kill(Pid::from_raw(relay.pid()), Signal::SIGHUP).expect("SIGHUP");
    let reload = systemd.until("READY=1", STEP_TIMEOUT);
    assert_eq!(states(&reload), ["RELOADING=1", "READY=1"], "{reload:?}");
    let with = reload
        .iter()
        .find(|m| m.iter().any(|l| l == "RELOADING=1"))
        .expect("the RELOADING message");
    assert!(
        with.iter().any(|l| l
            .strip_prefix("MONOTONIC_USEC=")
            .is_some_and(|v| v.parse::<u64>().is_ok_and(|v| v > 0))),
        "{with:?}"
    );
    // 4. SIGTERM: STOPPING=1, and the process ends.
    relay.sigterm();
    let stop = systemd.until("STOPPING=1", STEP_TIMEOUT);
    assert_eq!(states(&stop), ["STOPPING=1"], "{stop:?}");
    assert!(
        relay.wait_exit(STEP_TIMEOUT).is_some(),
        "exits after SIGTERM"
    );
}

fn a_wedged_worker_stops_the_watchdog(engine: &[&str]) {
    let _load = support::light();
    let backend = Backend::echo();
    let file = config(backend.addr(), "workers = 1\naccess_log = true");
    let systemd = Systemd::bind();
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&file.path)
        .args(engine)
        .env("NOTIFY_SOCKET", &systemd.path)
        .env("WATCHDOG_USEC", WATCHDOG.as_micros().to_string())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ringfwd");
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    // stderr is read until the test says stop; then the pipe fills.
    let reading = Arc::new(AtomicBool::new(true));
    {
        let mut pipe = child.stderr.take().expect("stderr");
        let reading = reading.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while reading.load(Ordering::Acquire) {
                if matches!(pipe.read(&mut buf), Ok(0) | Err(_)) {
                    return;
                }
            }
            // Holds the pipe, unread, until the child is gone.
            std::thread::sleep(STEP_TIMEOUT * 4);
        });
    }
    let mut stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = stdout.read_to_end(&mut sink);
    });
    let guard = KillOnDrop(pid);
    // 1. Serving, and pinging.
    systemd.until("READY=1", STEP_TIMEOUT);
    systemd.until("WATCHDOG=1", STEP_TIMEOUT);
    let addr = listen_addr(&child);
    // 2. Stop reading stderr and open sessions until one is not served: the worker is stuck
    //    writing an access-log line.
    reading.store(false, Ordering::Release);
    let mut wedged = false;
    for _ in 0..20_000 {
        let Ok(mut s) = sock::try_connect(addr) else {
            wedged = true;
            break;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut back = [0u8; 1];
        if s.write_all(b"x").is_err() || s.read_exact(&mut back).is_err() {
            wedged = true;
            break;
        }
    }
    assert!(wedged, "the worker never blocked on its stderr");
    // 3. Within the watchdog period (plus one ping in flight) the pings stop, for good.
    systemd.watchdogs_within(WATCHDOG * 3);
    let later = systemd.watchdogs_within(WATCHDOG * 5);
    assert_eq!(later, 0, "WATCHDOG=1 still sent while a worker is wedged");
    drop(guard);
    let _ = child.wait();
}

/// The rule's address, from `/proc`: the child's stdout is not parsed here (it is drained).
fn listen_addr(child: &std::process::Child) -> std::net::SocketAddr {
    let pid = i32::try_from(child.id()).expect("pid");
    let mut found = None;
    support::eventually(STEP_TIMEOUT, || {
        found = support::edge::listening_sockets(pid).into_iter().next();
        found.is_some()
    });
    found.expect("the rule's listening socket")
}

/// Kills the child by pid (SIGKILL) when the test ends, however it ends.
struct KillOnDrop(Pid);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGKILL);
    }
}
