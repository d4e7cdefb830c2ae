//! Robustness against the operating environment rather than the traffic: dead log pipes, a
//! second instance on the same port, a starved admin endpoint, low open-files and locked-memory
//! limits, and a flood of connections that reset at once.
//!
//! Same layout as `tests/semantics.rs`: each scenario is a plain function taking the engine's
//! extra `run` flags, and [`engine_suite!`] turns the list into one module per engine. The
//! forwarder is the real binary, every socket is on loopback port 0, every wait is bounded.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::relay::BIN;
use support::sock::{Backend, connect, read_n, read_to_eof};
use support::{Relay, STEP_TIMEOUT, procfs};

support::engine_suite!(
    [
        dead_log_pipes_neither_kill_nor_wedge,
        second_instance_on_a_used_port_is_refused_v4,
        second_instance_on_a_used_port_is_refused_v6,
        restart_on_the_same_port_despite_time_wait,
        serves_clients_under_a_low_fd_limit,
        rst_flood_keeps_fds_bounded_and_serves,
        a_hanging_rule_does_not_stall_another,
    ],
    std_engine: ["--engine", "std"],
    tokio_engine: ["--engine", "tokio"],
    uring_copy: ["--engine", "uring", "--mode", "copy"],
    uring_splice: ["--engine", "uring", "--mode", "splice"],
    uring_auto: ["--engine", "uring", "--mode", "auto"],
    // `[uring] wait = "epoll"`: the worker sleeps on an epoll set of its sockets.
    uring_auto_epoll: ["--engine", "uring", "--mode", "auto", "--uring-wait", "epoll"],
);

/// How long a SIGTERM'd forwarder with no live sessions may take to exit: generous for an
/// exit that needs no waiting (milliseconds on an idle box), yet under the 10 s default
/// `shutdown_grace`, so a forwarder that waits the grace out with nothing to drain still fails.
const PROMPT_EXIT: Duration = Duration::from_secs(5);

/// One echo round trip through `addr`, then a clean close both ways.
fn round_trip(addr: SocketAddr, payload: &[u8]) {
    let mut client = connect(addr);
    client.write_all(payload).expect("write through the relay");
    assert_eq!(read_n(&mut client, payload.len()), payload);
    client.shutdown(Shutdown::Write).expect("FIN");
    assert!(read_to_eof(&mut client).is_empty());
}

/// Reads the child's stdout up to its `listening` line (bounded) and hands the pipe back, so
/// the test can close it.
fn wait_listening(stdout: ChildStdout) -> (SocketAddr, ChildStdout) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if let Some(addr) = line.strip_prefix("listening ").and_then(|rest| {
                rest.split_whitespace()
                    .find_map(|w| w.strip_prefix("addr="))
            }) {
                let addr: SocketAddr = addr.parse().expect("addr= is an address");
                let _ = tx.send((addr, reader.into_inner()));
                return;
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("the forwarder printed no listening line")
}

/// `ringfwd run … | head -1` with the log on a pipe that is closed too (journald restarting,
/// a log shipper gone): every later log line and access-log line fails with EPIPE.
///
/// Steps: 1. start with stdout and stderr on pipes, read the `listening` line; 2. close both
/// read ends; 3. two sessions are still forwarded (the first one's access-log line was
/// written in between); 4. SIGTERM: the process exits 0 promptly.
fn dead_log_pipes_neither_kill_nor_wedge(engine: &[&str]) {
    let _load = support::light();
    let backend = Backend::echo();
    let upstream = backend.addr().to_string();
    let mut args = vec!["run", "--listen", "127.0.0.1:0", "--upstream", &upstream];
    args.extend_from_slice(engine);
    let mut child = Command::new(BIN)
        .args(&args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {BIN}: {e}"));
    let guard = ChildGuard(child.id());
    // 1. Ready.
    let (addr, stdout) = wait_listening(child.stdout.take().expect("stdout is piped"));
    // 2. Nobody reads the logs any more.
    drop(stdout);
    drop(child.stderr.take());
    // 3. Still forwarding, also after a session's access-log line hit the dead pipe.
    round_trip(addr, b"first");
    round_trip(addr, b"second");
    assert!(
        child.try_wait().expect("waitpid").is_none(),
        "the forwarder died after writing to a closed log pipe"
    );
    // 4. SIGTERM still stops it, cleanly and promptly.
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let Some(status) = support::wait_child(&mut child, PROMPT_EXIT) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the forwarder ignored SIGTERM for {PROMPT_EXIT:?} once its log pipes were closed");
    };
    assert_eq!(
        status.code(),
        Some(0),
        "the forwarder did not exit cleanly after closed log pipes: {status}"
    );
    std::mem::forget(guard);
}

/// Kills the child by pid if the test panics before it was reaped.
struct ChildGuard(u32);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Steps: 1. a forwarder listens on `listen` (port 0); 2. a second one is started on the
/// port the first one got; 3. the second exits 1 with the one-line "address already in use"
/// error and never claims to listen; 4. the first still serves every connection.
fn second_instance_is_refused(engine: &[&str], listen: &str) {
    let _load = support::light();
    let backend = Backend::echo();
    let upstream = backend.addr();
    // 1. The first instance.
    let mut first = Relay::start_listen(engine, listen, upstream, &[]);
    let taken = first.addr().to_string();
    // 2. The second, on the same address.
    let upstream = upstream.to_string();
    let mut args = vec!["run", "--listen", &taken, "--upstream", &upstream];
    args.extend_from_slice(engine);
    // 3. Refused, with the same error as any other port in use.
    match Relay::try_spawn(&args, 1) {
        Ok(mut second) => {
            second.stop_and_wait();
            panic!("a second forwarder started listening on {taken}, already served by the first");
        }
        Err(failure) => {
            assert_eq!(
                failure.status.and_then(|s| s.code()),
                Some(1),
                "the second forwarder: {failure}"
            );
            let err = failure.stderr.trim();
            assert!(
                err.contains(&format!("cannot listen on {taken}: address already in use")),
                "the second forwarder: {err}"
            );
        }
    }
    // 4. The first one is untouched: every connection still reaches it.
    for i in 0..8u8 {
        round_trip(first.addr(), &[i; 3]);
    }
    first.stop_and_wait();
}

fn second_instance_on_a_used_port_is_refused_v4(engine: &[&str]) {
    second_instance_is_refused(engine, "127.0.0.1:0");
}

fn second_instance_on_a_used_port_is_refused_v6(engine: &[&str]) {
    if TcpListener::bind("[::1]:0").is_err() {
        eprintln!("note: no IPv6 loopback on this host; skipping the [::1] test");
        return;
    }
    second_instance_is_refused(engine, "[::1]:0");
}

/// Sockets in TIME_WAIT whose local port is `port`, from `/proc/net/tcp` (IPv4).
/// `TCPTimeWaitOverflow` from /proc/net/netstat: TIME_WAIT sockets the kernel dropped because
/// its table was full.
fn time_wait_overflows() -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").expect("read /proc/net/netstat");
    let mut lines = text.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if let Some(i) = names
            .split_whitespace()
            .position(|n| n == "TCPTimeWaitOverflow")
        {
            return values
                .split_whitespace()
                .nth(i)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        }
    }
    0
}

fn time_wait_on_port(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3
                && f[3] == "06"
                && f[1].rsplit(':').next() == Some(format!("{port:04X}").as_str())
        })
        .count()
}

/// The refusal above must not refuse a plain restart: the stopped forwarder's closed sessions
/// leave TIME_WAIT sockets on the port, which `SO_REUSEADDR` lets a new listener bind over.
/// Steps: 1. a forwarder whose upstream closes first, so the forwarder sends the first FIN
/// and its side of the session ends in TIME_WAIT; 2. stop it; 3. a new forwarder on the same
/// port starts and serves.
fn restart_on_the_same_port_despite_time_wait(engine: &[&str]) {
    let _load = support::light();
    let closing = Backend::spawn(drop);
    // 1. Sessions the forwarder closes first.
    let mut first = Relay::start(engine, closing.addr(), &[]);
    let addr = first.addr();
    let overflows = time_wait_overflows();
    for _ in 0..3 {
        let mut client = connect(addr);
        assert!(read_to_eof(&mut client).is_empty());
    }
    // The kernel's TIME_WAIT table is shared by the whole machine (tcp_max_tw_buckets): after
    // other suites' churn it can be full, and then it drops new TIME_WAIT sockets and counts
    // an overflow. Only then may the precondition be missing; the restart is checked anyway.
    assert!(
        support::eventually(STEP_TIMEOUT, || time_wait_on_port(addr.port()) > 0
            || time_wait_overflows() > overflows),
        "no TIME_WAIT socket on {addr}: the scenario did not set up what it tests"
    );
    // 2. Stopped.
    first.stop_and_wait();
    // 3. Restarted on the same address.
    let echo = Backend::echo();
    let mut second = Relay::start_listen(engine, &addr.to_string(), echo.addr(), &[]);
    assert_eq!(second.addr(), addr);
    round_trip(addr, b"again");
    second.stop_and_wait();
}

/// `GET path` on the admin endpoint with a raw HTTP/1.1 request, the whole exchange bounded by
/// `within`; the status line and body, or what went wrong.
fn admin_get(admin: SocketAddr, path: &str, within: Duration) -> Result<String, String> {
    let started = Instant::now();
    let mut s = TcpStream::connect_timeout(&admin, within).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(within))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: ringfwd\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply)
        .map_err(|e| format!("no full reply after {:?}: {e}", started.elapsed()))?;
    if started.elapsed() > within {
        return Err(format!("reply took {:?}", started.elapsed()));
    }
    Ok(String::from_utf8_lossy(&reply).into_owned())
}

/// A Kubernetes liveness probe must not fail because of other clients. Steps: 1. a forwarder
/// with its admin endpoint; 2. 200 connections to the admin port, each sending one byte and
/// then nothing (slowloris); 3. while they are held, `/healthz` answers, again and again.
/// Each probe is bounded by [`STEP_TIMEOUT`], not by a kubelet's 1 s: an admin endpoint that
/// waited on the idle clients would hold each for its 5 s header timeout, minutes in all, and
/// still fail here; how fast it answers is a figure (printed), not a pass mark on a shared box.
#[test]
fn admin_healthz_answers_while_200_clients_hold_connections() {
    let _load = support::light();
    support::ensure_fd_limit(1024);
    let mut relay = Relay::start(
        &["--engine", "tokio"],
        "127.0.0.1:9".parse().expect("address"),
        &["--admin", "127.0.0.1:0"],
    );
    let admin = relay
        .admin
        .expect("the forwarder printed its admin address");
    // 1. Healthy to begin with.
    let ok = admin_get(admin, "/healthz", STEP_TIMEOUT).expect("/healthz before the load");
    assert!(
        ok.starts_with("HTTP/1.1 200") && ok.ends_with("ok\n"),
        "{ok}"
    );
    // 2. 200 silent clients.
    let held: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut s = connect(admin);
            s.write_all(b"G").expect("one byte");
            s
        })
        .collect();
    // 3. Still answering.
    let mut worst = Duration::ZERO;
    for probe in 0..5 {
        let started = Instant::now();
        match admin_get(admin, "/healthz", STEP_TIMEOUT) {
            Ok(reply) => assert!(
                reply.starts_with("HTTP/1.1 200") && reply.ends_with("ok\n"),
                "probe {probe}: {reply}"
            ),
            Err(why) => panic!("/healthz probe {probe} with 200 idle admin clients: {why}"),
        }
        worst = worst.max(started.elapsed());
    }
    eprintln!("/healthz with 200 idle admin clients: slowest of 5 probes {worst:?}");
    drop(held);
    relay.stop_and_wait();
}

/// Steps: 1. another socket holds a port; 2. the forwarder is asked to put its admin endpoint
/// there; 3. it exits 1 with one line in the style of a rule listener's, naming the address
/// once, and never claims to listen.
#[test]
fn admin_port_in_use_is_one_clear_line() {
    let _load = support::light();
    let holder = TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = holder.local_addr().expect("address").to_string();
    let out = support::relay::run_to_exit(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "127.0.0.1:9",
        "--engine",
        "std",
        "--admin",
        &taken,
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    let lines: Vec<&str> = out.stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(lines.len(), 1, "{}", out.stderr);
    let line = lines[0];
    assert!(
        line.contains(&format!("cannot listen on {taken}: address already in use")),
        "{line}"
    );
    assert_eq!(line.matches(&taken).count(), 1, "{line}");
    assert!(line.contains("admin"), "{line}");
    assert!(!out.stdout.contains("listening"), "{}", out.stdout);
}

/// Steps: 1. a forwarder with its admin endpoint, its open-files limit then capped just above
/// what it holds; 2. more admin clients than fit, so the admin accept loop keeps hitting
/// EMFILE; 3. it says so, then over 1.5 s at most once more, not 20 times a second; 4. it
/// still runs.
#[test]
fn admin_out_of_fds_warns_rarely() {
    let _load = support::heavy();
    let mut relay = Relay::start(
        &["--engine", "tokio"],
        "127.0.0.1:9".parse().expect("address"),
        &["--admin", "127.0.0.1:0"],
    );
    let admin = relay
        .admin
        .expect("the forwarder printed its admin address");
    let ok = admin_get(admin, "/healthz", STEP_TIMEOUT).expect("/healthz");
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    // 1. Room for two more fds.
    let base = procfs::fd_count(relay.pid());
    procfs::set_nofile_limit(relay.pid(), base + 2);
    // 2. Twenty clients: the kernel completes their handshakes, the admin cannot accept them.
    let clients: Vec<TcpStream> = (0..20).map(|_| connect(admin)).collect();
    assert!(support::eventually(STEP_TIMEOUT, || {
        procfs::fd_count(relay.pid()) >= base + 2
    }));
    // 3. The accept loop retries every 50 ms; its warning must not. The first one is waited
    //    for (not assumed to be out after a fixed sleep), then 1.5 s of retries (30 of them)
    //    may add at most one more (the repeat comes every 10 s at most).
    let warned = || relay.stderr().matches("admin accept failed").count();
    assert!(
        support::eventually(STEP_TIMEOUT, || warned() >= 1),
        "no 'admin accept failed' line while out of fds:\n{}",
        relay.stderr()
    );
    std::thread::sleep(Duration::from_millis(1500));
    let warnings = warned();
    assert!(
        warnings <= 2,
        "{warnings} 'admin accept failed' lines in 1.5 s of retries:\n{}",
        relay.stderr()
    );
    // 4. Alive, and SIGTERM still stops it.
    assert!(relay.is_running());
    drop(clients);
    relay.stop_and_wait();
}

/// A `ringfwd run` child started under resource limits (util-linux `prlimit` execs it, so the
/// pid is the forwarder's), with its stdout lines and stderr collected on threads.
struct Limited {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
    stderr: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

/// The capability bit of CAP_IPC_LOCK (`linux/capability.h`).
const CAP_IPC_LOCK: u32 = 14;

/// Whether this process holds CAP_IPC_LOCK, with which the kernel does not account locked
/// memory at all (root in most containers): a low RLIMIT_MEMLOCK then changes nothing.
fn has_cap_ipc_lock() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

impl Limited {
    /// Starts `ringfwd ARGS` with `limits` (`prlimit` options such as `--nofile=64:64`).
    /// With `memlock_counts`, CAP_IPC_LOCK is dropped first (`setpriv`) so that the memlock
    /// limit applies even when the test runs as root.
    fn spawn(limits: &[&str], memlock_counts: bool, args: &[&str]) -> Self {
        let mut cmd = if memlock_counts && has_cap_ipc_lock() {
            let mut c = Command::new("setpriv");
            c.args([
                "--inh-caps=-ipc_lock",
                "--bounding-set=-ipc_lock",
                "prlimit",
            ]);
            c
        } else {
            Command::new("prlimit")
        };
        cmd.args(limits)
            .arg(BIN)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn prlimit/setpriv (util-linux): {e}"));
        let stderr = support::drain_into(child.stderr.take().expect("stderr is piped"));
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().expect("stdout is piped");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self {
            child,
            lines,
            stderr,
        }
    }

    /// The `listening` line's address and engine, or `None` if stdout closed first (the
    /// forwarder exited) or nothing came within 30 s.
    fn listening(&self) -> Option<(SocketAddr, String)> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let line = self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .ok()?;
            let Some(rest) = line.strip_prefix("listening ") else {
                continue;
            };
            let field = |k: &str| {
                rest.split(' ')
                    .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
                    .map(str::to_string)
            };
            let addr = field("addr")?.parse().ok()?;
            return Some((addr, field("engine").unwrap_or_default()));
        }
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(
            &self
                .stderr
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
        .into_owned()
    }

    /// Waits up to `within` for the child to exit.
    fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let mut status = None;
        support::eventually(within, || {
            status = self.child.try_wait().expect("waitpid");
            status.is_some()
        });
        status
    }

    /// SIGTERM, then a clean exit within [`PROMPT_EXIT`].
    fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let status = self.wait_exit(PROMPT_EXIT);
        assert!(
            status.is_some_and(|s| s.success()),
            "the forwarder did not exit cleanly after SIGTERM ({status:?}); stderr:\n{}",
            self.stderr()
        );
    }
}

impl Drop for Limited {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- ringfwd stderr ---\n{}", self.stderr());
        }
    }
}

/// One echo round trip through `addr` with every step bounded by `within`.
fn bounded_round_trip(addr: SocketAddr, payload: &[u8], within: Duration) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&addr, within).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(within))
        .and_then(|()| s.set_write_timeout(Some(within)))
        .map_err(|e| e.to_string())?;
    s.write_all(payload).map_err(|e| format!("write: {e}"))?;
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back)
        .map_err(|e| format!("read the echo: {e}"))?;
    if back != payload {
        return Err("the echo differs".into());
    }
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("FIN: {e}"))?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .map_err(|e| format!("read to EOF: {e}"))?;
    Ok(())
}

/// The open-files limit of the low-fd scenario: far below what the default pools want
/// (the splice pipe pools alone ask 2 × 16 × 2 = 64 fds on two workers).
const LOW_NOFILE: &str = "--nofile=64:64";

/// `ulimit -n 64`: the engine must size what it creates at start (pipe pools) to the limit and
/// keep descriptors for connections. Steps: 1. start the forwarder under the limit; 2. it says
/// "listening" on the engine asked for, with at most one warning (what was cut, how to raise
/// the limit), not one per worker; 3. 200 clients one after the other are each served (every
/// step bounded by [`STEP_TIMEOUT`]); 4. SIGTERM stops it cleanly.
fn serves_clients_under_a_low_fd_limit(engine: &[&str]) {
    let _load = support::light();
    let backend = Backend::echo();
    let upstream = backend.addr().to_string();
    let mut args = vec![
        "run",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &upstream,
        "--workers",
        "2",
    ];
    args.extend_from_slice(engine);
    // 1.
    let mut relay = Limited::spawn(&[LOW_NOFILE], false, &args);
    // 2.
    let (addr, actual) = relay.listening().unwrap_or_else(|| {
        panic!(
            "no listening line under {LOW_NOFILE}; stderr:\n{}",
            relay.stderr()
        )
    });
    let asked = engine[1];
    assert_eq!(
        actual, asked,
        "the forwarder runs another engine than asked"
    );
    // 3.
    for i in 0..200u32 {
        if let Err(why) = bounded_round_trip(addr, &i.to_be_bytes(), STEP_TIMEOUT) {
            panic!("client {i} of 200 was not served under {LOW_NOFILE}: {why}");
        }
    }
    let stderr = relay.stderr();
    let warnings = support::warnings(&stderr).len();
    assert!(
        warnings <= 1,
        "{warnings} warnings under {LOW_NOFILE} (expected at most one):\n{stderr}"
    );
    if warnings == 1 {
        assert!(
            stderr.contains("ulimit -n"),
            "the warning does not say how to raise the limit:\n{stderr}"
        );
    }
    // 4.
    relay.stop();
}

/// A locked-memory limit too small for the workers' rings (64 KiB, with CAP_IPC_LOCK dropped
/// so that it counts even for root).
const LOW_MEMLOCK: &str = "--memlock=65536:65536";

/// `engine = "auto"` decides on every worker's set-up, not only on the probe ring: with too
/// little locked memory for the workers' rings it runs tokio, says so once, and serves.
/// Steps: 1. start with `--engine auto --workers 4` under [`LOW_MEMLOCK`]; 2. its listening
/// line says engine=tokio; 3. exactly one warning, naming the cause and the fix; 4. clients
/// are served; 5. SIGTERM stops it cleanly.
#[test]
fn auto_falls_back_to_tokio_when_a_worker_cannot_set_up() {
    let _load = support::light();
    let backend = Backend::echo();
    let upstream = backend.addr().to_string();
    // 1.
    let mut relay = Limited::spawn(
        &[LOW_MEMLOCK],
        true,
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &upstream,
            "--engine",
            "auto",
            "--workers",
            "4",
        ],
    );
    // 2.
    let (addr, engine) = relay.listening().unwrap_or_else(|| {
        panic!(
            "--engine auto did not start under {LOW_MEMLOCK}; stderr:\n{}",
            relay.stderr()
        )
    });
    assert_eq!(engine, "tokio", "stderr:\n{}", relay.stderr());
    // 4. (before 3, so that any late warning has been written)
    for i in 0..20u32 {
        if let Err(why) = bounded_round_trip(addr, &i.to_be_bytes(), STEP_TIMEOUT) {
            panic!("client {i} was not served after the fallback: {why}");
        }
    }
    // 3.
    let stderr = relay.stderr();
    let warnings: Vec<&str> = support::warnings(&stderr);
    assert_eq!(warnings.len(), 1, "expected one warning:\n{stderr}");
    assert!(
        warnings[0].contains("falling back to the tokio engine")
            && warnings[0].contains("ulimit -l"),
        "the warning does not name the cause and the fix: {}",
        warnings[0]
    );
    // 5.
    relay.stop();
}

/// `engine = "uring"` asked for explicitly and the workers cannot set up: one error line and
/// exit status 1, not a warning per worker. Steps: 1. start with `--engine uring --workers 8`
/// under [`LOW_MEMLOCK`]; 2. it exits 1 within 15 s without a listening line; 3. stderr holds
/// one error line, naming the cause and the fix, and nothing per worker.
#[test]
fn uring_workers_that_cannot_set_up_are_one_error_line() {
    let _load = support::light();
    // 1.
    let mut relay = Limited::spawn(
        &[LOW_MEMLOCK],
        true,
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:9",
            "--engine",
            "uring",
            "--workers",
            "8",
        ],
    );
    // 2.
    assert!(
        relay.listening().is_none(),
        "the forwarder started on io_uring with {LOW_MEMLOCK}: the scenario did not set up what it tests"
    );
    let status = relay.wait_exit(STEP_TIMEOUT);
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{}", relay.stderr());
    // 3.
    let stderr = relay.stderr();
    let lines = stderr.lines().filter(|l| !l.trim().is_empty()).count();
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert!(
        errors.len() == 1 && lines <= 2,
        "expected one error line and no per-worker lines:\n{stderr}"
    );
    assert!(
        errors[0].contains("ulimit -l"),
        "the error does not name the cause and the fix: {}",
        errors[0]
    );
}

/// An echo upstream that costs no thread per connection (a flood makes tens of thousands):
/// a single-threaded tokio runtime on its own thread, for the life of the test process.
fn light_echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the upstream");
    listener.set_nonblocking(true).expect("non-blocking");
    let addr = listener.local_addr().expect("upstream address");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime for the upstream");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("register");
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
    });
    addr
}

/// Connect + RST cycles of the flood, over [`FLOOD_THREADS`] threads.
const FLOOD_CYCLES: usize = 20_000;
const FLOOD_THREADS: usize = 2;
/// The most fds the relay may hold during the flood. A connection costs two (client and
/// upstream); this leaves room for a few hundred connections being disposed of per worker
/// (measured: 20–210 with paced accepts; 11 000 for tokio and the 20 000 limit for io_uring
/// before).
const FLOOD_FD_BOUND: usize = 3000;

/// Clients that connect and reset at once, as fast as two threads can: the relay must accept
/// no faster than it disposes of connections. Steps: 1. a relay with its admin endpoint in
/// front of a light echo upstream; 2. 20 000 connect + RST (SO_LINGER 0) cycles from two
/// threads while a sampler reads the relay's fd count and a normal client does one echo
/// round trip every 20 ms; 3. the fd count stayed under [`FLOOD_FD_BOUND`], and every normal
/// client was served, its echo exact, each step within [`STEP_TIMEOUT`]; 4. `/metrics` counts
/// no connection rejected for lack of fds; 5. the relay still serves and stops cleanly.
///
/// How long a normal client waits during the flood (0.2–0.55 s with paced accepts, 1.9–5.2 s
/// before; debug build, two shared cores) depends on the machine, so it is printed here and
/// measured by `scripts/flood_latency.sh`, not asserted: a bound tight enough to catch a
/// regression failed on a busy machine (800 ms against 750 ms) and hid every later test.
fn rst_flood_keeps_fds_bounded_and_serves(engine: &[&str]) {
    if engine.contains(&"std") {
        // A thread per direction: the std baseline is not built for connection floods.
        eprintln!("note: the RST flood is not run against the std engine");
        return;
    }
    let _load = support::heavy();
    support::ensure_fd_limit(4096);
    // 1.
    let upstream = light_echo_upstream();
    let mut relay = Relay::start(engine, upstream, &["--admin", "127.0.0.1:0"]);
    let (addr, pid) = (relay.addr(), relay.pid());
    let admin = relay
        .admin
        .expect("the forwarder printed its admin address");
    round_trip(addr, b"warm");
    let base = procfs::fd_count(pid);
    // 2.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
                    peak = peak.max(dir.count());
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            peak
        })
    };
    let prober = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut worst = Duration::ZERO;
            let mut n = 0u32;
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                let started = Instant::now();
                if let Err(why) = bounded_round_trip(addr, &n.to_be_bytes(), STEP_TIMEOUT) {
                    return Err(format!("probe {n} during the flood: {why}"));
                }
                worst = worst.max(started.elapsed());
                n += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok((worst, n))
        })
    };
    let started = Instant::now();
    let flooders: Vec<_> = (0..FLOOD_THREADS)
        .map(|_| {
            std::thread::spawn(move || {
                let mut failed = 0usize;
                for _ in 0..FLOOD_CYCLES / FLOOD_THREADS {
                    match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
                        Ok(s) => support::sock::reset(s),
                        Err(_) => failed += 1,
                    }
                }
                failed
            })
        })
        .collect();
    let failed: usize = flooders
        .into_iter()
        .map(|t| t.join().expect("flood thread"))
        .sum();
    let flood_took = started.elapsed();
    // Let the relay dispose of what the flood left queued, then stop sampling.
    let drained = support::eventually(STEP_TIMEOUT, || procfs::fd_count(pid) <= base + 8);
    done.store(true, std::sync::atomic::Ordering::Release);
    let peak = sampler.join().expect("sampler");
    let probes = prober.join().expect("prober");
    let normal = match &probes {
        Ok((worst, n)) => format!("{n} normal clients served, the slowest in {worst:?}"),
        Err(why) => why.clone(),
    };
    eprintln!(
        "RST flood {engine:?}: {FLOOD_CYCLES} cycles in {flood_took:?} ({failed} connects failed), \
         relay fd peak {peak}; {normal}"
    );
    // 3.
    assert!(
        drained,
        "the relay still holds {} fds after the flood ({base} before)",
        procfs::fd_count(pid)
    );
    assert!(
        peak < FLOOD_FD_BOUND,
        "the relay held {peak} fds during the RST flood (bound {FLOOD_FD_BOUND})"
    );
    let (_, served) = probes.unwrap_or_else(|why| panic!("{why}"));
    assert!(
        served > 0,
        "no normal client ran during the flood: the scenario did not set up what it tests"
    );
    // 4.
    let metrics = admin_get(admin, "/metrics", STEP_TIMEOUT).expect("/metrics");
    let rejected = metrics
        .lines()
        .find(|l| l.starts_with("ringfwd_connections_rejected_total") && l.contains("fd_exhausted"))
        .unwrap_or_else(|| panic!("no fd_exhausted series in /metrics:\n{metrics}"));
    assert!(
        rejected.ends_with(" 0"),
        "connections were dropped for lack of fds: {rejected}"
    );
    // 5.
    round_trip(addr, b"after");
    relay.stop_and_wait();
}

/// Connections one rule holds while its upstream never answers (more than a worker's whole
/// accept bound, on two workers).
const HANGING: usize = 800;

/// One rule's upstream drops every SYN, so its connections sit connecting for the connect
/// timeout; meanwhile another rule of the same forwarder serves at once. (Accept pacing used
/// to bound unsettled connections per worker, not per listener: the hanging rule used up the
/// bound and the other rule's listener got no accept.)
fn a_hanging_rule_does_not_stall_another(engine: &[&str]) {
    let _load = support::heavy();
    // 1. Two rules: "hang" to an upstream whose handshakes never complete, "live" to an echo.
    let blackhole = support::sock::Unresponsive::new();
    let echo = Backend::echo();
    let toml = format!(
        "[[rule]]\nname = \"hang\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n\
         connect_timeout = \"60s\"\n\n[[rule]]\nname = \"live\"\nlisten = \"127.0.0.1:0\"\n\
         upstream = \"{}\"\n",
        blackhole.addr(),
        echo.addr()
    );
    let relay = Relay::start_config(engine, &toml, 2);
    // 2. Flood "hang" with connections that all wait on their upstream connect.
    let hang = relay.addr_of("hang");
    let held: Vec<TcpStream> = (0..HANGING)
        .filter_map(|_| TcpStream::connect(hang).ok())
        .collect();
    assert!(
        held.len() > HANGING / 2,
        "only {} connections to the hanging rule",
        held.len()
    );
    std::thread::sleep(Duration::from_millis(300)); // let the relay take what it will
    // 3. "live" still answers, over more connections than any accept window (a listener's
    //    pre-armed accepts alone would not last). Every step is bounded by STEP_TIMEOUT, well
    //    under the hanging rule's 60 s connect timeout: a "live" that had to wait for the
    //    hanging connections to give up fails here however fast the machine is.
    let live = relay.addr_of("live");
    let started = Instant::now();
    for i in 0..=255u8 {
        if let Err(why) = bounded_round_trip(live, &[i; 8], STEP_TIMEOUT) {
            panic!("round trip {i} on the live rule while the other hangs: {why}");
        }
    }
    eprintln!(
        "256 round trips on the live rule beside {} hanging connections: {:?}",
        held.len(),
        started.elapsed()
    );
    drop(held);
}
