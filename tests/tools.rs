//! End-to-end tests of the tools in the built `ringfwd` binary: echo, sink, ping and bench,
//! on loopback with kernel-chosen ports. Every wait is bounded; servers started here are
//! killed by pid when their handle drops.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_ringfwd");
/// Upper bound for anything a test waits on; the tools themselves finish far sooner.
const PATIENCE: Duration = Duration::from_secs(30);

/// A backend (`echo` or `sink`) started for one test, killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
    _stdout: BufReader<ChildStdout>,
}

impl Server {
    /// Starts `ringfwd ARGS` and waits for its `listening addr=` line.
    fn start(args: &[&str]) -> Server {
        let mut child = Command::new(BIN)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start ringfwd");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            let n = r.read_line(&mut line);
            let _ = tx.send((n.map(|_| line), r));
        });
        let Ok((Ok(line), reader)) = rx.recv_timeout(PATIENCE) else {
            let _ = child.kill();
            panic!("{args:?} printed no listening line");
        };
        let addr = line
            .trim()
            .strip_prefix("listening addr=")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .expect("an address");
        Server {
            child,
            addr,
            _stdout: reader,
        }
    }

    fn target(&self) -> String {
        self.addr.to_string()
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).expect("connect");
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        s.set_write_timeout(Some(PATIENCE)).unwrap();
        s
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `ringfwd ARGS` to completion (bounded by [`PATIENCE`]).
fn ringfwd(args: &[&str]) -> Output {
    let child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ringfwd");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(PATIENCE) {
        Ok(out) => out.expect("wait for ringfwd"),
        Err(_) => {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            panic!("ringfwd {args:?} did not finish within {PATIENCE:?}");
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs a bench with `--format json` and returns its parsed output.
fn bench(args: &[&str]) -> Value {
    let mut all = vec!["bench"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--format", "json", "--quiet"]);
    let out = ringfwd(&all);
    assert!(
        out.status.success(),
        "bench {args:?} failed: {}",
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bench output is not JSON ({e}): {}", text(&out.stdout)))
}

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no number {key} in {v}"))
}

/// A loopback port with nothing listening (bound, then released).
fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![kind];
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[test]
fn echo_returns_every_byte_and_passes_half_close_on() {
    let echo = Server::start(&["echo", "--listen", "127.0.0.1:0"]);
    let mut s = echo.connect();
    // More than the socket buffers hold, so writing and reading must overlap.
    let data: Vec<u8> = (0..4_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let mut writer = s.try_clone().unwrap();
    let sent = data.clone();
    let w = std::thread::spawn(move || {
        writer.write_all(&sent).unwrap();
        // Half-close: no more data from us, but we still expect everything back.
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    // read_to_end returns only at the echo's FIN: the half-close came back.
    s.read_to_end(&mut back)
        .expect("echo closes its side after echoing");
    w.join().unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "echoed bytes differ");
}

#[test]
fn echo_over_ipv6_loopback() {
    if TcpListener::bind("[::1]:0").is_err() {
        // Skipping would hide a gap only where the host has no IPv6 at all.
        eprintln!("no IPv6 loopback on this host");
        return;
    }
    let echo = Server::start(&["echo", "--listen", "[::1]:0"]);
    assert!(echo.addr.is_ipv6());
    let mut s = echo.connect();
    s.write_all(b"ping").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut back = String::new();
    s.read_to_string(&mut back).unwrap();
    assert_eq!(back, "ping");
}

#[test]
fn echo_max_frame_answers_frames_and_closes_an_oversize_one() {
    let echo = Server::start(&["echo", "--listen", "127.0.0.1:0", "--max-frame", "1KiB"]);
    let mut s = echo.connect();
    let ok = frame(1, &[7u8; 1024]);
    s.write_all(&ok).unwrap();
    let mut back = vec![0u8; ok.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, ok, "a frame at the maximum is echoed");

    // A header announcing 1025 bytes: refused from the header alone, connection closed.
    s.write_all(&[1, 0, 0, 4, 1]).unwrap();
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty(), "nothing of the bad frame is echoed"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }

    // Only that connection: the server still answers others.
    let mut t = echo.connect();
    t.write_all(&frame(1, b"still here")).unwrap();
    let mut back = vec![0u8; 15];
    t.read_exact(&mut back).unwrap();
    assert_eq!(&back[5..], b"still here");
}

#[test]
fn sink_send_delivers_exactly_n_pattern_bytes_then_eof() {
    let n: usize = 3 * 1024 * 1024 + 17;
    let sink = Server::start(&["sink", "--listen", "127.0.0.1:0", "--send", "3145745"]);
    let mut s = sink.connect();
    let mut got = Vec::with_capacity(n);
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), n);
    let wrong = got
        .iter()
        .enumerate()
        .position(|(i, &b)| b != (i % 251) as u8);
    assert_eq!(wrong, None, "pattern broken");
    // The sink only shut down its write side: it still reads what we send.
    s.write_all(&[0u8; 100_000]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
}

#[test]
fn sink_accepts_sizes_with_units_and_rejects_nonsense() {
    let out = ringfwd(&["sink", "--listen", "127.0.0.1:0", "--send", "3 parsecs"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("unknown unit \"parsecs\""),
        "{}",
        text(&out.stderr)
    );
    let sink = Server::start(&["sink", "--listen", "127.0.0.1:0", "--send", "1KiB"]);
    let mut got = Vec::new();
    sink.connect().read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), 1024);
}

#[test]
fn ping_a_live_listener() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = l.local_addr().unwrap().to_string();
    // The kernel completes handshakes into the backlog; nobody needs to accept.
    let out = ringfwd(&["ping", &target, "-c", "3", "-i", "50ms", "-W", "1s"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    for seq in 1..=3 {
        assert!(
            stdout.contains(&format!("connected to {target}: seq={seq} time=")),
            "{stdout}"
        );
    }
    assert!(stdout.contains("3 sent, 3 ok, 0 failed"), "{stdout}");
    assert!(stdout.contains("connect min/avg/max = "), "{stdout}");
    assert!(stdout.contains("p99 = "), "{stdout}");
}

#[test]
fn ping_forever_stops_on_ctrl_c_with_a_summary() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = l.local_addr().unwrap().to_string();
    let mut child = Command::new(BIN)
        .args(["ping", &target, "-c", "0", "-i", "20ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        // Wait for the second probe, then hand the rest of the output over.
        let seen = lines
            .by_ref()
            .map_while(Result::ok)
            .any(|l| l.contains("seq=2 "));
        let _ = tx.send(seen);
        let rest: Vec<String> = lines.map_while(Result::ok).collect();
        let _ = tx.send(rest.iter().any(|l| l.contains(" ok, 0 failed")));
    });
    let seen = rx.recv_timeout(PATIENCE);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    assert_eq!(seen, Ok(true), "two probes ran");
    let summary = rx.recv_timeout(PATIENCE);
    if summary != Ok(true) {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    assert_eq!(summary, Ok(true), "a summary was printed after SIGINT");
    assert!(status.success(), "{status}");
}

#[test]
fn ping_a_closed_port_fails_at_once_with_a_reason() {
    let target = closed_port().to_string();
    let out = ringfwd(&["ping", &target, "-c", "5"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("cannot connect to {target}: connection refused")),
        "{stderr}"
    );
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("1 sent, 0 ok, 1 failed"),
        "stopped after the first refusal: {stdout}"
    );
}

#[test]
fn ping_an_unresolvable_name_fails() {
    let out = ringfwd(&["ping", "no-such-host.invalid:80", "-c", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot resolve \"no-such-host.invalid:80\""),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn bench_rr_closed_and_open_loop_against_echo() {
    let echo = Server::start(&["echo", "--listen", "127.0.0.1:0", "--max-frame", "64KiB"]);
    let closed = bench(&["rr", &echo.target(), "-c", "2", "-d", "1s", "--size", "100"]);
    assert_eq!(closed["mode"], "rr");
    assert_eq!(closed["load"], "closed");
    assert_eq!(closed["connections"], 2);
    assert_eq!(closed["errors"], 0, "{closed}");
    assert!(num(&closed, "requests") > 100.0, "{closed}");
    assert!(num(&closed, "req_per_s") > 100.0, "{closed}");
    let (p50, p90, p99, p999, max) = (
        num(&closed, "p50_us"),
        num(&closed, "p90_us"),
        num(&closed, "p99_us"),
        num(&closed, "p999_us"),
        num(&closed, "max_us"),
    );
    assert!(
        0.0 < p50 && p50 <= p90 && p90 <= p99 && p99 <= p999 && p999 <= max,
        "{closed}"
    );

    let open = bench(&["rr", &echo.target(), "-c", "2", "-d", "1s", "--rate", "400"]);
    assert_eq!(open["load"], "open");
    assert_eq!(open["rate"], 400.0);
    // The schedule holds 400 intended sends in the second; nearly all must complete.
    let n = num(&open, "requests");
    assert!((300.0..=400.0).contains(&n), "{open}");
    assert_eq!(open["errors"], 0, "{open}");
    // The client's own pacing lateness is reported next to the latencies it inflates.
    assert!(open["timer_late_p50_us"].is_number(), "{open}");
    assert!(closed.get("timer_late_p50_us").is_none(), "{closed}");
}

#[test]
fn bench_throughput_each_direction() {
    let sink = Server::start(&["sink", "--listen", "127.0.0.1:0", "--send", "64MiB"]);
    let echo = Server::start(&["echo", "--listen", "127.0.0.1:0"]);
    let up = bench(&["throughput", &sink.target(), "-d", "500ms"]);
    assert_eq!(up["direction"], "up");
    assert!(num(&up, "bytes") > 1e6, "{up}");
    assert!(num(&up, "gbit_per_s") > 0.01, "{up}");
    // Download reconnects each time the 64 MiB of a connection are delivered.
    let down = bench(&[
        "throughput",
        &sink.target(),
        "-d",
        "500ms",
        "--direction",
        "down",
    ]);
    assert!(num(&down, "bytes") > 1e6, "{down}");
    let both = bench(&[
        "throughput",
        &echo.target(),
        "-d",
        "500ms",
        "--direction",
        "both",
        "-c",
        "2",
    ]);
    assert!(num(&both, "bytes_up") > 1e6, "{both}");
    assert!(num(&both, "bytes_down") > 1e6, "{both}");
    assert_eq!(
        num(&both, "bytes"),
        num(&both, "bytes_up") + num(&both, "bytes_down")
    );
    for r in [&up, &down, &both] {
        assert_eq!(r["errors"], 0, "{r}");
        assert!((0.4..=0.7).contains(&num(r, "duration_s")), "{r}");
    }
}

/// A throughput run against the wrong backend measured nothing and must say so (exit 1, a
/// reason naming the right backend) instead of printing 0 B, or the few MiB the socket
/// buffers took, as a rate: up against an echo nobody reads (stalls once the buffers are
/// full), down against an echo (never sends), both against a sink (never answers).
#[test]
fn bench_throughput_refuses_a_run_that_moved_nothing() {
    let sink = Server::start(&["sink", "--listen", "127.0.0.1:0"]);
    let echo = Server::start(&["echo", "--listen", "127.0.0.1:0"]);
    for (target, direction, says) in [
        (echo.target(), "up", "`ringfwd sink`"),
        (echo.target(), "down", "sink --send"),
        (sink.target(), "both", "`ringfwd echo`"),
    ] {
        let out = ringfwd(&[
            "bench",
            "throughput",
            &target,
            "-d",
            "1s",
            "--direction",
            direction,
            "--quiet",
        ]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{direction}: {err}");
        assert!(err.contains(says), "{direction}: {err}");
        assert!(
            !text(&out.stdout).contains("Gbit"),
            "{direction}: {}",
            text(&out.stdout)
        );
    }
}

#[test]
fn bench_help_names_the_backend_of_each_mode() {
    let out = ringfwd(&["bench", "--help"]);
    let help = text(&out.stdout);
    for (mode, backend) in [
        ("throughput", "ringfwd sink"),
        ("rr", "ringfwd echo"),
        ("connect", "ringfwd echo"),
        ("idle", "ringfwd echo"),
    ] {
        let line = help
            .lines()
            .find(|l| l.trim_start().starts_with(mode))
            .unwrap_or_else(|| panic!("no {mode} in\n{help}"));
        assert!(line.contains(backend), "{mode}: {line}");
    }
}

#[test]
fn bench_connect_churns_against_echo() {
    let echo = Server::start(&["echo", "--listen", "127.0.0.1:0"]);
    let r = bench(&["connect", &echo.target(), "-c", "2", "-d", "500ms"]);
    assert_eq!(r["mode"], "connect");
    assert_eq!(r["latency"], "connect");
    assert!(num(&r, "connects") > 10.0, "{r}");
    assert!(num(&r, "conn_per_s") > 20.0, "{r}");
    assert!(num(&r, "p50_us") <= num(&r, "txn_p50_us"), "{r}");
    assert_eq!(r["errors"], 0, "{r}");
}

#[test]
fn bench_idle_reports_memory_per_connection() {
    let echo = Server::start(&["echo", "--listen", "127.0.0.1:0"]);
    let pid = echo.child.id().to_string();
    let r = bench(&[
        "idle",
        &echo.target(),
        "-c",
        "200",
        "--pid",
        &pid,
        "--settle",
        "100ms",
    ]);
    assert_eq!(r["established"], 200, "{r}");
    assert_eq!(r["alive_after_hold"], 200, "{r}");
    assert!(num(&r, "rss_before_kib") > 0.0, "{r}");
    assert!(num(&r, "rss_after_kib") > 0.0, "{r}");
    assert!(r["rss_per_conn_bytes"].is_number(), "{r}");
    assert!(r["pss_per_conn_bytes"].is_number(), "{r}");
}

#[test]
fn bench_refused_target_fails_fast_with_a_reason() {
    let target = closed_port().to_string();
    let started = std::time::Instant::now();
    // A duration far past PATIENCE: waiting it out fails however fast the machine is.
    let out = ringfwd(&["bench", "rr", &target, "-d", "120s"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        started.elapsed() < PATIENCE,
        "waited {:?}, as if for the 120 s duration",
        started.elapsed()
    );
    assert!(
        text(&out.stderr).contains(&format!("cannot connect to {target}: connection refused")),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn bench_writes_json_and_appends_csv_rows() {
    let echo = Server::start(&["echo", "--listen", "127.0.0.1:0"]);
    let dir = std::env::temp_dir().join(format!("ringfwd-tools-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (json, csv) = (dir.join("r.json"), dir.join("r.csv"));
    for _ in 0..2 {
        let out = ringfwd(&[
            "bench",
            "rr",
            &echo.target(),
            "-d",
            "200ms",
            "-q",
            "--label",
            "tokio, copy",
            "--json",
            json.to_str().unwrap(),
            "--csv",
            csv.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let table = text(&out.stdout);
        assert!(table.contains("rr (closed loop)"), "{table}");
        assert!(table.contains("latency"), "{table}");
    }
    let j: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(j["label"], "tokio, copy");
    let rows = std::fs::read_to_string(&csv).unwrap();
    let lines: Vec<&str> = rows.lines().collect();
    assert_eq!(lines.len(), 3, "one header, two rows: {rows}");
    assert!(
        lines[0].starts_with("unix_time,label,mode,target,"),
        "{rows}"
    );
    assert!(lines[1].contains(",\"tokio, copy\",rr,"), "{rows}");
    std::fs::remove_dir_all(&dir).unwrap();
}
