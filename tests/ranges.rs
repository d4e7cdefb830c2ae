//! Port ranges on every engine: a rule `listen = "127.0.0.1:A-B"` is one rule with a listener
//! per port, forwarding one-to-one to an upstream range or to one upstream port; 2 000 ports
//! load in under a second and cost no thread per port.
//!
//! A range cannot be bound on port 0, so each scenario picks a random base below the
//! ephemeral range (10 000–32 000: outgoing connections of parallel tests, and their
//! TIME_WAIT, take ports from 32 768 up and would make binds fail at random) and checks that
//! every port of it is free by binding them all first (retrying elsewhere on
//! a collision, a bounded number of times). The upstream side of a range is served by
//! [`PortServer`]: one thread over many listeners, each answering with its own port number,
//! so a client sees exactly which upstream port its connection reached.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;

use support::pool::{Metrics, http_get};
use support::{Relay, STEP_TIMEOUT};

support::engine_suite!(
    [
        a_range_forwards_each_port_to_the_same_offset_upstream,
        a_range_forwards_every_port_to_one_upstream_port,
        an_ipv6_range_forwards_one_to_one,
        two_thousand_ports_are_ready_at_no_thread_per_port,
        the_fd_budget_counts_what_listeners_hold_and_a_reload_fits,
    ],
    std_engine: ["--engine", "std"],
    tokio_engine: ["--engine", "tokio"],
    uring_engine: ["--engine", "uring"],
);

/// `count` consecutive free loopback ports, bound (so nobody takes them meanwhile): the
/// listeners, and the first port.
///
/// # Panics
/// No free run of ports found in 50 tries.
fn bind_free_range(count: u16) -> (u16, Vec<TcpListener>) {
    bind_free_range_on("127.0.0.1", count)
}

/// [`bind_free_range`] on another loopback address (`"::1"`).
fn bind_free_range_on(ip: &str, count: u16) -> (u16, Vec<TcpListener>) {
    let mut rng = rand::thread_rng();
    for _ in 0..50 {
        let base: u16 = rng.gen_range(10_000..=32_000 - count);
        let bound: Result<Vec<_>, _> = (0..count)
            .map(|i| TcpListener::bind((ip, base + i)))
            .collect();
        if let Ok(ls) = bound {
            return (base, ls);
        }
    }
    panic!("no run of {count} free loopback ports found in 50 tries");
}

/// Upstream servers on many ports, served by one thread: each accepted connection is sent
/// the listener's own port in decimal, then closed.
struct PortServer {
    base: u16,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PortServer {
    fn start(count: u16) -> Self {
        let (base, listeners) = bind_free_range(count);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
            for l in &listeners {
                l.set_nonblocking(true).expect("non-blocking listener");
            }
            while !stopped.load(Ordering::Relaxed) {
                let mut fds: Vec<PollFd> = listeners
                    .iter()
                    .map(|l| PollFd::new(l.as_fd(), PollFlags::POLLIN))
                    .collect();
                if poll(&mut fds, PollTimeout::from(50u16)).unwrap_or(0) == 0 {
                    continue;
                }
                let ready: Vec<usize> = fds
                    .iter()
                    .enumerate()
                    .filter(|(_, f)| f.revents().is_some_and(|r| !r.is_empty()))
                    .map(|(i, _)| i)
                    .collect();
                drop(fds);
                for i in ready {
                    while let Ok((mut s, _)) = listeners[i].accept() {
                        let _ = s.set_nonblocking(false);
                        let _ = s.write_all((base + i as u16).to_string().as_bytes());
                    }
                }
            }
        });
        Self {
            base,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for PortServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects to `addr` and returns everything the upstream sent before closing, as text.
fn answer(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect_timeout(&addr, STEP_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(STEP_TIMEOUT)).expect("timeout");
    let mut text = String::new();
    s.read_to_string(&mut text)
        .unwrap_or_else(|e| panic!("read from {addr}: {e}"));
    text
}

fn at(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Threads of a process (`Threads:` in /proc/PID/status).
fn threads(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("a Threads: line")
}

/// A forwarder with one rule `r` over `listen` (a range text) to `upstream`, with the admin
/// endpoint on; retries on a fresh range if a port of `listen` was taken meanwhile.
fn start_range(
    engine: &[&str],
    count: u16,
    upstream: impl Fn() -> String,
) -> (Relay, u16, Duration) {
    start_range_on(engine, "127.0.0.1", count, upstream)
}

/// [`start_range`] listening on another loopback address (`"::1"`).
fn start_range_on(
    engine: &[&str],
    ip: &str,
    count: u16,
    upstream: impl Fn() -> String,
) -> (Relay, u16, Duration) {
    for _ in 0..5 {
        let base = bind_free_range_on(ip, count).0;
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.to_string()
        };
        let toml = format!(
            "admin = \"127.0.0.1:0\"\n[[rule]]\nname = \"r\"\nlisten = \"{host}:{base}-{}\"\nupstream = {}\n",
            base + (count - 1),
            upstream()
        );
        let file = support::TempFile::new("ringfwd-ranges", &toml);
        let path = file.path.display().to_string();
        let mut args = vec!["run", "--config", path.as_str()];
        args.extend_from_slice(engine);
        let started = Instant::now();
        match Relay::try_spawn(&args, 1) {
            Ok(relay) => return (relay, base, started.elapsed()),
            Err(f) if f.stderr.contains("address already in use") => continue,
            Err(f) => panic!("ringfwd did not start: {f}\nconfig:\n{toml}"),
        }
    }
    panic!("every range tried was taken by the time the forwarder bound it");
}

fn accepted(relay: &Relay) -> f64 {
    let (code, body) = http_get(relay.admin.expect("admin addr"), "/metrics");
    assert_eq!(code, 200, "{body}");
    Metrics::parse(&body)
        .get("ringfwd_connections_accepted_total", &[("rule", "r")])
        .unwrap_or(0.0)
}

fn a_range_forwards_each_port_to_the_same_offset_upstream(engine: &[&str]) {
    let _load = support::light();
    const N: u16 = 50;
    let upstream = PortServer::start(N);
    let up = upstream.base;
    let (mut relay, base, _) =
        start_range(engine, N, || format!("\"127.0.0.1:{up}-{}\"", up + (N - 1)));
    // 1. Every listen port reaches the upstream port at the same offset.
    for i in 0..N {
        assert_eq!(
            answer(at(base + i)),
            (up + i).to_string(),
            "listen port {}",
            base + i
        );
    }
    // 2. One rule: one set of metrics counts every port's connection.
    assert!(
        support::eventually(STEP_TIMEOUT, || accepted(&relay) == f64::from(N)),
        "accepted: {}",
        accepted(&relay)
    );
    // 3. The access log names the listen port and the upstream port it mapped to.
    let want = format!("port={} ", base + 7);
    let line = support::wait_for_line(&relay, &want, STEP_TIMEOUT);
    assert!(
        line.contains(&format!("upstream=127.0.0.1:{} ", up + 7)),
        "{line}"
    );
    relay.stop_and_wait();
}

fn a_range_forwards_every_port_to_one_upstream_port(engine: &[&str]) {
    let _load = support::light();
    const N: u16 = 20;
    let upstream = PortServer::start(1);
    let up = upstream.base;
    let (mut relay, base, _) = start_range(engine, N, || format!("\"127.0.0.1:{up}\""));
    for i in 0..N {
        assert_eq!(
            answer(at(base + i)),
            up.to_string(),
            "listen port {}",
            base + i
        );
    }
    let line = support::wait_for_line(&relay, &format!("port={} ", base + N - 1), STEP_TIMEOUT);
    assert!(
        line.contains(&format!("upstream=127.0.0.1:{up} ")),
        "{line}"
    );
    relay.stop_and_wait();
}

fn an_ipv6_range_forwards_one_to_one(engine: &[&str]) {
    let _load = support::light();
    const N: u16 = 10;
    let upstream = PortServer::start(N);
    let up = upstream.base;
    let (mut relay, base, _) = start_range_on(engine, "::1", N, || {
        format!("\"127.0.0.1:{up}-{}\"", up + (N - 1))
    });
    for i in 0..N {
        let addr = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, base + i));
        assert_eq!(answer(addr), (up + i).to_string(), "listen port {addr}");
    }
    relay.stop_and_wait();
}

/// 2 000 ports of one rule start, each forwards to its own upstream port, and the forwarder
/// runs as many threads as with one port. How fast they are ready (well under a second on an
/// idle box) is printed here and measured by `scripts/range_cost.sh` (`ready_ms`), not
/// asserted: the start-up is bounded by the harness's readiness wait, which fails a forwarder
/// that never says `listening`.
fn two_thousand_ports_are_ready_at_no_thread_per_port(engine: &[&str]) {
    // Measures the child's threads and start-up time: runs alone.
    let _load = support::heavy();
    const N: u16 = 2000;
    support::ensure_fd_limit(3 * u64::from(N) + 256);
    // 1. The baseline: the same engine with a one-port rule.
    let one = PortServer::start(1);
    let one_port = one.base;
    let (mut small, _, small_ready) =
        start_range(engine, 1, || format!("\"127.0.0.1:{one_port}\""));
    let small_threads = threads(small.pid());
    small.stop_and_wait();
    drop(one);
    // 2. 2 000 ports, one-to-one onto 2 000 upstream ports: ready ...
    let upstream = PortServer::start(N);
    let up = upstream.base;
    let (mut relay, base, ready) =
        start_range(engine, N, || format!("\"127.0.0.1:{up}-{}\"", up + (N - 1)));
    eprintln!(
        "{engine:?}: ready in {ready:?} with {N} ports ({small_ready:?} with 1); threads {} vs {small_threads}",
        threads(relay.pid())
    );
    // 3. ... with as many threads as one port takes.
    assert_eq!(
        threads(relay.pid()),
        small_threads,
        "threads grew with the number of ports"
    );
    // 4. Every port forwards, to its own upstream port (each connection bounded by
    //    STEP_TIMEOUT).
    let started = Instant::now();
    for i in 0..N {
        assert_eq!(
            answer(at(base + i)),
            (up + i).to_string(),
            "listen port {}",
            base + i
        );
    }
    eprintln!(
        "{engine:?}: {N} connections, one per port, in {:?}",
        started.elapsed()
    );
    assert!(
        support::eventually(STEP_TIMEOUT, || accepted(&relay) == f64::from(N)),
        "accepted: {}",
        accepted(&relay)
    );
    relay.stop_and_wait();
}

/// A range whose listeners cannot fit the open-files limit is refused before anything is
/// bound, in one line that says what to raise.
#[test]
fn a_range_beyond_the_fd_limit_is_refused_in_one_line() {
    let _load = support::light();
    let file = support::TempFile::new(
        "ringfwd-ranges-fd",
        "[[rule]]\nlisten = \"127.0.0.1:40000-41999\"\nupstream = \"127.0.0.1:9\"\n",
    );
    // `ulimit -n` in a shell sets the hard limit too: the forwarder cannot raise it.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n 1024 && exec {} run --config {} --engine tokio",
            support::relay::BIN,
            file.path.display()
        ))
        .stdin(Stdio::null())
        .output()
        .expect("run sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].starts_with(
            "ringfwd: error: the rules need 2000 listening sockets (2000 ports × 1 per port), each held twice (by the engine, and by the control plane for reloads and upgrades), with room for as many again during a reload and for as many connections, but the open-files limit is 1024"
        ),
        "{stderr}"
    );
    assert!(errors[0].contains("raise it (ulimit -n"), "{stderr}");
}

/// When io_uring workers cannot set up under `engine = "auto"`, every port's listeners come
/// back in place and the tokio engine serves the whole range (the hand-back keeps each
/// listener with its rule and port). Locked memory too small for 4 workers' rings, with
/// CAP_IPC_LOCK dropped so that the limit counts for root too (as tests/robustness.rs does).
#[test]
fn a_range_survives_the_fallback_from_uring_to_tokio() {
    use std::io::BufRead;
    let _load = support::light();
    if !support::engine_available(&["--engine", "uring"]) {
        return;
    }
    const N: u16 = 30;
    let upstream = PortServer::start(N);
    let up = upstream.base;
    let (base, held) = bind_free_range(N);
    drop(held);
    let file = support::TempFile::new(
        "ringfwd-ranges-fallback",
        &format!(
            "[[rule]]\nlisten = \"127.0.0.1:{base}-{}\"\nupstream = \"127.0.0.1:{up}-{}\"\n",
            base + N - 1,
            up + N - 1
        ),
    );
    let mut child = Command::new("setpriv")
        .args([
            "--inh-caps=-ipc_lock",
            "--bounding-set=-ipc_lock",
            "prlimit",
            "--memlock=65536:65536",
            support::relay::BIN,
            "run",
            "--config",
        ])
        .arg(&file.path)
        .args(["--engine", "auto", "--workers", "4"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn setpriv/prlimit (util-linux)");
    let stderr = support::drain_into(child.stderr.take().expect("piped"));
    let (tx, rx) = std::sync::mpsc::channel();
    let out = child.stdout.take().expect("piped");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let text = || String::from_utf8_lossy(&stderr.lock().unwrap()).into_owned();
    let line = rx
        .recv_timeout(STEP_TIMEOUT)
        .unwrap_or_else(|_| panic!("no listening line; stderr:\n{}", text()));
    assert!(
        line.contains(" engine=tokio")
            && line.ends_with(&format!(" ports={base}-{}", base + N - 1)),
        "{line}\n{}",
        text()
    );
    for i in 0..N {
        assert_eq!(
            answer(at(base + i)),
            (up + i).to_string(),
            "listen port {} after the fallback",
            base + i
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// `ringfwd run --config FILE ENGINE` under `ulimit -n 1024` (which a shell sets as the hard
/// limit too, so the forwarder cannot raise it).
fn at_1024_fds(path: &str, engine: &[&str]) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "ulimit -n 1024 && exec {} run --config {path} {}",
            support::relay::BIN,
            engine.join(" ")
        ))
        .stdin(Stdio::null());
    cmd
}

/// The open-files check counts what a range really holds: each listener twice (the engine's
/// descriptor and the control plane's, kept for reloads and upgrades), room for a reload's
/// duplicates, and as many again for connections. Steps: 1. at 1 024 fds, 300 ports are
/// refused at start in one line (the old check, "as many again for connections", let them
/// start and then failed every reload with EMFILE); 2. 100 ports start, a reload that
/// changes the upstream succeeds, and the last port forwards to the new upstream.
fn the_fd_budget_counts_what_listeners_hold_and_a_reload_fits(engine: &[&str]) {
    let _g = support::light();
    // 1.
    let base = bind_free_range(300).0;
    let file = support::TempFile::new(
        "ringfwd-ranges-budget",
        &format!(
            "[[rule]]\nlisten = \"127.0.0.1:{base}-{}\"\nupstream = \"127.0.0.1:9\"\n",
            base + 299
        ),
    );
    let out = at_1024_fds(&file.path.display().to_string(), engine)
        .output()
        .expect("run sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("held twice (by the engine, and by the control plane"),
        "{stderr}"
    );
    // 2.
    let (first, second) = (PortServer::start(1), PortServer::start(1));
    let conf = |up: u16| {
        move |base: u16| {
            format!(
                "admin = \"127.0.0.1:0\"\n[[rule]]\nname = \"r\"\nlisten = \"127.0.0.1:{base}-{}\"\nupstream = \"127.0.0.1:{up}\"\n",
                base + 99
            )
        }
    };
    let (mut relay, base, file) = (0..5)
        .find_map(|_| {
            let base = bind_free_range(100).0;
            let file = support::TempFile::new("ringfwd-ranges-budget", &conf(first.base)(base));
            let path = file.path.display().to_string();
            let mut args = vec!["run", "--config", path.as_str()];
            args.extend_from_slice(engine);
            match Relay::try_spawn_command(at_1024_fds(&path, engine), &args, 1) {
                Ok(relay) => Some((relay, base, file)),
                Err(f) if f.stderr.contains("address already in use") => None,
                Err(f) => panic!("ringfwd did not start at 1024 fds: {f}"),
            }
        })
        .expect("a free range of 100 ports");
    assert_eq!(answer(at(base + 99)), first.base.to_string());
    std::fs::write(&file.path, conf(second.base)(base)).expect("rewrite the config");
    let (code, body) = support::pool::http_post(relay.admin.expect("admin addr"), "/reload");
    assert_eq!(code, 200, "{body}\n{}", relay.stderr());
    assert!(
        support::eventually(STEP_TIMEOUT, || answer(at(base + 99))
            == second.base.to_string()),
        "the reloaded range does not reach the new upstream\n{}",
        relay.stderr()
    );
    relay.stop_and_wait();
}
