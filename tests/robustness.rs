//! Robustness against the operating environment rather than the traffic: dead log pipes, a
//! second instance on the same port, a starved admin endpoint.
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

/// Lists every scenario once; each becomes a `#[test]` in every engine's module.
macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                if crate::support::engine_available(ENGINE) {
                    crate::$name(ENGINE);
                }
            }
        )*
    };
}

/// One module of tests for one engine, given as the extra flags of `ringfwd run`.
macro_rules! engine_suite {
    ($suite:ident, [$($arg:literal),* $(,)?]) => {
        mod $suite {
            const ENGINE: &[&str] = &[$($arg),*];
            scenarios!(
                dead_log_pipes_neither_kill_nor_wedge,
                second_instance_on_a_used_port_is_refused_v4,
                second_instance_on_a_used_port_is_refused_v6,
                restart_on_the_same_port_despite_time_wait,
            );
        }
    };
}

engine_suite!(std_engine, ["--engine", "std"]);
engine_suite!(tokio_engine, ["--engine", "tokio"]);
engine_suite!(uring_copy, ["--engine", "uring", "--mode", "copy"]);
engine_suite!(uring_splice, ["--engine", "uring", "--mode", "splice"]);

/// How long a SIGTERM'd forwarder with no live sessions may take to exit.
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
    let mut status = None;
    support::eventually(PROMPT_EXIT, || {
        status = child.try_wait().expect("waitpid");
        status.is_some()
    });
    let Some(status) = status else {
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
    for _ in 0..3 {
        let mut client = connect(addr);
        assert!(read_to_eof(&mut client).is_empty());
    }
    assert!(
        support::eventually(STEP_TIMEOUT, || time_wait_on_port(addr.port()) > 0),
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
/// then nothing (slowloris); 3. while they are held, `/healthz` answers within 1 s, again and
/// again.
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
    // 3. Still answering, promptly.
    for probe in 0..5 {
        match admin_get(admin, "/healthz", Duration::from_secs(1)) {
            Ok(reply) => assert!(
                reply.starts_with("HTTP/1.1 200") && reply.ends_with("ok\n"),
                "probe {probe}: {reply}"
            ),
            Err(why) => panic!("/healthz probe {probe} with 200 idle admin clients: {why}"),
        }
    }
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
/// EMFILE; 3. over 1.5 s it says so at most twice, not 20 times a second; 4. it still runs.
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
    // 3. The accept loop retries every 50 ms; its warning must not.
    std::thread::sleep(Duration::from_millis(1500));
    let warnings = relay.stderr().matches("admin accept failed").count();
    assert!(
        (1..=2).contains(&warnings),
        "{warnings} 'admin accept failed' lines in 1.5 s:\n{}",
        relay.stderr()
    );
    // 4. Alive, and SIGTERM still stops it.
    assert!(relay.is_running());
    drop(clients);
    relay.stop_and_wait();
}
