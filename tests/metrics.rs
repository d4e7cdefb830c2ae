//! The export side of the metrics, end to end: the real binary forwarding real loopback
//! traffic, read back through its admin endpoints, `ringfwd stats` and the traffic tap.
//!
//! Every test binds port 0 (the forwarder prints `admin addr=…` and `listening … addr=…` on
//! stdout), waits on explicit readiness with bounded deadlines, and kills only the forwarder
//! it started.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine as _;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::Deserializer;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use ringfwd::metrics::report::StatsReport;
use ringfwd::vocab::{Direction, PathKind};

const BIN: &str = env!("CARGO_BIN_EXE_ringfwd");
/// Upper bound for anything a test waits for.
const DEADLINE: Duration = Duration::from_secs(20);

/// A backend on 127.0.0.1:0 that serves exactly `sessions` connections: it answers each chunk
/// with `reply(chunk)` and half-closes after the client's EOF.
struct Backend {
    addr: SocketAddr,
    thread: JoinHandle<()>,
}

impl Backend {
    fn start(sessions: usize, reply: fn(&[u8]) -> Vec<u8>) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let thread = std::thread::spawn(move || {
            let mut conns = Vec::new();
            for _ in 0..sessions {
                let (mut s, _) = l.accept().unwrap();
                conns.push(std::thread::spawn(move || {
                    s.set_read_timeout(Some(DEADLINE)).unwrap();
                    let mut buf = vec![0u8; 32 << 10];
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if s.write_all(&reply(&buf[..n])).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = s.shutdown(Shutdown::Write);
                }));
            }
            for c in conns {
                let _ = c.join();
            }
        });
        Self { addr, thread }
    }

    fn join(self) {
        self.thread.join().unwrap();
    }
}

/// The forwarder under test; killed (by its pid, through `Child`) when dropped.
struct Forwarder {
    child: Child,
    admin: SocketAddr,
    listen: SocketAddr,
}

impl Forwarder {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let (mut admin, mut listen) = (None, None);
        let deadline = Instant::now() + DEADLINE;
        while admin.is_none() || listen.is_none() {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| {
                    let status = child.try_wait();
                    panic!("forwarder never became ready (status {status:?})")
                });
            if let Some(a) = line.strip_prefix("admin addr=") {
                admin = Some(a.parse().unwrap());
            } else if line.starts_with("listening ") {
                let addr = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("addr="))
                    .unwrap();
                listen = Some(addr.parse().unwrap());
            }
        }
        Self {
            child,
            admin: admin.unwrap(),
            listen: listen.unwrap(),
        }
    }

    /// `engine` is an engine name, optionally with the uring data path: `"uring:splice"`.
    fn simple(engine: &str, upstream: SocketAddr) -> Self {
        let (engine, mode) = engine.split_once(':').unwrap_or((engine, "auto"));
        Self::start(&[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &upstream.to_string(),
            "--engine",
            engine,
            "--mode",
            mode,
            "--admin",
            "127.0.0.1:0",
        ])
    }

    fn get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path)
    }

    fn stats(&self) -> StatsReport {
        let (status, body) = self.get("/stats");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Waits (bounded) until every accepted session has been closed and counted.
    fn wait_idle(&self, accepted: u64) -> StatsReport {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let s = self.stats();
            let r = &s.rules[0];
            if r.accepted == accepted && r.active == 0 {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "sessions never closed: accepted {} active {}",
                r.accepted,
                r.active
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path` with hyper's client (the test side of the admin endpoint).
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = tokio::time::timeout(DEADLINE, sender.send_request(req))
            .await
            .unwrap()
            .unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    })
}

/// Sends `payload` through the forwarder while reading the reply, then half-closes and reads
/// to EOF. Returns everything received.
fn exchange(listen: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(listen).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut reader = s.try_clone().unwrap();
    let got = std::thread::spawn(move || {
        let mut got = Vec::new();
        reader.read_to_end(&mut got).unwrap();
        got
    });
    s.write_all(payload).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    got.join().unwrap()
}

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn decode_histogram(base64_text: &str) -> Histogram<u64> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(base64_text.trim())
        .unwrap();
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .unwrap()
}

fn metric_value(text: &str, series: &str) -> f64 {
    let line = text
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"));
    line[series.len() + 1..].parse().unwrap()
}

/// Steps: 1. three sessions of different sizes through the engine; 2. wait until all are
/// counted closed; 3. every byte counter equals what was sent, each way; 4. every per-session
/// histogram counted each session once, in /stats, /metrics and /histograms alike.
/// `path` is the data path every byte must be counted under.
fn counters_are_exact(engine: &str, path: PathKind) {
    const SESSIONS: usize = 3;
    let backend = Backend::start(SESSIONS, <[u8]>::to_vec);
    let fwd = Forwarder::simple(engine, backend.addr);

    let mut sent = 0u64;
    for i in 0..SESSIONS {
        let p = payload(100_000 + 7_777 * i, i as u8);
        assert_eq!(
            exchange(fwd.listen, &p),
            p,
            "session {i} echoed wrong bytes"
        );
        sent += p.len() as u64;
    }
    backend.join();

    let stats = fwd.wait_idle(SESSIONS as u64);
    let r = &stats.rules[0];
    assert_eq!(r.name, "default");
    for dir in Direction::ALL {
        assert_eq!(r.bytes_dir(dir), sent, "{dir:?}");
        let other = match path {
            PathKind::Copy => PathKind::Splice,
            PathKind::Splice => PathKind::Copy,
        };
        assert_eq!(r.bytes_path(dir, path), sent, "{dir:?}");
        assert_eq!(r.bytes_path(dir, other), 0, "{dir:?}");
    }
    for h in ["upstream_connect", "first_byte", "session"] {
        assert_eq!(r.histograms[h].count, SESSIONS as u64, "{h}");
        assert!(r.histograms[h].max_us >= r.histograms[h].p50_us, "{h}");
    }
    for h in ["transfer_client_to_upstream", "transfer_upstream_to_client"] {
        // At least one transfer per session; a chunk is at most the 16 KiB relay buffer.
        assert!(r.histograms[h].count >= SESSIONS as u64, "{h}");
    }
    assert_eq!(r.connect_errors.values().sum::<u64>(), 0);

    let (status, text) = fwd.get("/metrics");
    assert_eq!(status, 200);
    let c2u = format!(
        "ringfwd_bytes_total{{rule=\"default\",direction=\"client_to_upstream\",path=\"{}\"}}",
        path.as_str()
    );
    let u2c = format!(
        "ringfwd_bytes_total{{rule=\"default\",direction=\"upstream_to_client\",path=\"{}\"}}",
        path.as_str()
    );
    for (series, want) in [
        (c2u.as_str(), sent as f64),
        (u2c.as_str(), sent as f64),
        (
            "ringfwd_connections_accepted_total{rule=\"default\",route=\"default\"}",
            SESSIONS as f64,
        ),
        ("ringfwd_connections_active{rule=\"default\"}", 0.0),
        (
            "ringfwd_session_duration_seconds_count{rule=\"default\"}",
            SESSIONS as f64,
        ),
        (
            "ringfwd_upstream_connect_seconds_bucket{le=\"+Inf\",rule=\"default\"}",
            SESSIONS as f64,
        ),
    ] {
        assert_eq!(metric_value(&text, series), want, "{series}");
    }

    let (status, body) = fwd.get("/histograms?rule=default&metric=session");
    assert_eq!(status, 200, "{body}");
    let h = decode_histogram(&body);
    assert_eq!(h.len(), SESSIONS as u64);
    assert_eq!(h.max(), r.histograms["session"].max_us);
}

#[test]
fn counters_are_exact_with_the_std_engine() {
    counters_are_exact("std", PathKind::Copy);
}

#[test]
fn counters_are_exact_with_the_tokio_engine() {
    counters_are_exact("tokio", PathKind::Copy);
}

#[test]
fn counters_are_exact_with_the_uring_copy_path() {
    counters_are_exact("uring:copy", PathKind::Copy);
}

#[test]
fn counters_are_exact_with_the_uring_splice_path() {
    counters_are_exact("uring:splice", PathKind::Splice);
}

/// `ringfwd_build_info` names the engine and data path that actually run: `engine` is the
/// engine asked for (no silent fallback in these runs), `mode` the uring data path, or `copy`
/// for an engine that only copies, whatever `--mode` says.
fn build_info_names_the_running_engine(engine: &str, want_mode: &str) {
    let backend = Backend::start(0, <[u8]>::to_vec);
    let fwd = Forwarder::simple(engine, backend.addr);
    let (status, text) = fwd.get("/metrics");
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("# TYPE ringfwd_build_info gauge"), "{text}");
    let engine = engine.split(':').next().unwrap();
    let want = format!(
        "ringfwd_build_info{{version=\"{}\",engine=\"{engine}\",mode=\"{want_mode}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(metric_value(&text, &want), 1.0, "{text}");
    backend.join();
}

#[test]
fn build_info_with_the_tokio_engine() {
    // `--mode auto` is what `Forwarder::simple` passes: tokio still only copies.
    build_info_names_the_running_engine("tokio", "copy");
}

#[test]
fn build_info_with_the_uring_engine() {
    build_info_names_the_running_engine("uring:splice", "splice");
    build_info_names_the_running_engine("uring", "auto");
}

#[test]
fn admin_endpoints_answer_and_reject_clearly() {
    let backend = Backend::start(0, <[u8]>::to_vec);
    let fwd = Forwarder::simple("tokio", backend.addr);
    assert_eq!(fwd.get("/healthz"), (200, "ok\n".to_string()));
    let (status, body) = fwd.get("/histograms?rule=nope&metric=session");
    assert_eq!(status, 404);
    assert!(
        body.contains("unknown rule \"nope\"") && body.contains("\"default\""),
        "{body}"
    );
    let (status, body) = fwd.get("/histograms?rule=default&metric=latency");
    assert_eq!(status, 400);
    assert!(
        body.contains("unknown metric \"latency\"") && body.contains("first_byte"),
        "{body}"
    );
    let (status, body) = fwd.get("/histograms");
    assert_eq!(status, 400);
    assert!(body.starts_with("usage:"), "{body}");
    let (status, body) = fwd.get("/nothing");
    assert_eq!(status, 404);
    assert!(body.contains("/metrics"), "{body}");
    // Nothing recorded yet: a valid, empty histogram, not an error.
    let (status, body) = fwd.get("/histograms?rule=default&metric=transfer_upstream_to_client");
    assert_eq!(status, 200);
    assert_eq!(decode_histogram(&body).len(), 0);
    backend.join();
}

/// The keys of a JSON object and of every object under it, as `a.b.c` paths; `rules` arrays
/// are walked through their first element.
fn json_paths(v: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let path = format!("{prefix}{k}");
                json_paths(v, &format!("{path}."), out);
                out.push(path);
            }
        }
        serde_json::Value::Array(items) => {
            if let Some(first) = items.first() {
                json_paths(first, prefix, out);
            }
        }
        _ => {}
    }
}

/// docs/METRICS.md's `/stats` example has the shape the binary answers with: every key of the
/// example exists in a live answer, and every key of the live answer is in the example, except
/// the histograms the example leaves out (its `...`), which its note names instead.
/// Steps: 1. the example, its `...` line dropped, parses as JSON; 2. a forwarder that served
/// one session answers `/stats`; 3. the key paths match both ways.
#[test]
fn metrics_md_stats_example_matches_the_binary() {
    // 1.
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/METRICS.md"))
            .expect("docs/METRICS.md");
    let example = doc
        .split("`/stats` looks like this")
        .nth(1)
        .and_then(|rest| rest.split("```json\n").nth(1))
        .and_then(|rest| rest.split("\n```").next())
        .expect("the /stats example in docs/METRICS.md");
    // The paragraph right under the example.
    let note = doc
        .split(example)
        .nth(1)
        .and_then(|rest| rest.split("\n\n").next())
        .unwrap_or_default();
    let example = example.replace(",\n                ...", "");
    let example: serde_json::Value = serde_json::from_str(&example).unwrap_or_else(|e| {
        panic!("the /stats example is not JSON once `...` is dropped: {e}\n{example}")
    });
    // 2.
    let backend = Backend::start(1, <[u8]>::to_vec);
    let fwd = Forwarder::simple("tokio", backend.addr);
    assert_eq!(exchange(fwd.listen, b"ping"), b"ping");
    fwd.wait_idle(1);
    let (status, body) = fwd.get("/stats");
    assert_eq!(status, 200, "{body}");
    let live: serde_json::Value = serde_json::from_str(&body).expect("/stats is JSON");
    backend.join();
    // 3.
    let (mut documented, mut answered) = (Vec::new(), Vec::new());
    json_paths(&example, "", &mut documented);
    json_paths(&live, "", &mut answered);
    let invented: Vec<&String> = documented
        .iter()
        .filter(|p| !answered.contains(p))
        .collect();
    assert!(
        invented.is_empty(),
        "docs/METRICS.md's /stats example has keys the binary does not send: {invented:?}\n{body}"
    );
    let missing: Vec<&String> = answered
        .iter()
        .filter(|p| !documented.contains(p))
        .filter(|p| {
            // A histogram left out of the example must at least be named in its note.
            let hist = p
                .strip_prefix("rules.histograms.")
                .map(|h| h.split('.').next().unwrap_or(h));
            !hist.is_some_and(|h| note.contains(&format!("`{h}`")))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "the binary's /stats has keys docs/METRICS.md's example lacks: {missing:?}\n{body}"
    );
}

/// Steps: 1. open a session and hold it open after one round trip; 2. `ringfwd stats` shows
/// it active with real percentiles; 3. close it.
#[test]
fn stats_tool_shows_live_sessions_and_percentiles() {
    let backend = Backend::start(1, <[u8]>::to_vec);
    let fwd = Forwarder::simple("tokio", backend.addr);

    let mut s = TcpStream::connect(fwd.listen).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(b"ping").unwrap();
    let mut back = [0u8; 4];
    s.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ping");

    let out = Command::new(BIN)
        .args([
            "stats",
            "--admin",
            &fwd.admin.to_string(),
            "--interval",
            "50ms",
        ])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("rule default: active 1  accepted 1"),
        "{text}"
    );
    let row = |name: &str| -> Vec<String> {
        text.lines()
            .find(|l| l.trim_start().starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} row in\n{text}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    for name in ["upstream_connect", "first_byte"] {
        let cells = row(name);
        assert_eq!(cells[1], "1", "{name}: {text}");
        for cell in &cells[2..] {
            assert!(
                cell.ends_with("µs") || cell.ends_with("ms") || cell.ends_with('s'),
                "{name}: {cell:?} in\n{text}"
            );
        }
    }
    // The session is still open: nothing recorded for its duration yet.
    assert_eq!(row("session")[1..], ["0", "-", "-", "-", "-", "-"]);
    // The rule's one member is listed, up, holding the live connection.
    assert_eq!(
        row(&backend.addr.to_string())[1..4],
        ["up", "1", "1"],
        "{text}"
    );

    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    backend.join();
    fwd.wait_idle(1);
}

#[test]
fn stats_tool_says_clearly_when_nothing_listens() {
    // Bind and drop to get a port with (almost certainly) nobody on it.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(BIN)
        .args(["stats", "--admin", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the admin endpoint"), "{err}");
}

/// Collects the bytes a tap file shows for one direction, from its hexdump lines.
fn tapped_bytes(text: &str, dir: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        if line.contains(" #") {
            // An event header: "<time> #<id> <direction> <n> bytes", or open/close.
            inside = line.split_whitespace().nth(2) == Some(dir);
            continue;
        }
        if inside {
            let hex = &line[10..line.find("  |").unwrap()];
            out.extend(
                hex.split_whitespace()
                    .map(|b| u8::from_str_radix(b, 16).unwrap()),
            );
        }
    }
    out
}

fn tap_roundtrip(engine: &str, dir: &Path) {
    let backend = Backend::start(1, <[u8]>::to_ascii_uppercase);
    let tap = dir.join(format!("{engine}.tap"));
    let _ = std::fs::remove_file(&tap);
    let config = dir.join(format!("{engine}.toml"));
    std::fs::write(
        &config,
        format!(
            "[[rule]]\nname = \"tapped\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\ntap = {:?}\n",
            backend.addr,
            tap.display().to_string()
        ),
    )
    .unwrap();
    let fwd = Forwarder::start(&[
        "run",
        "--config",
        config.to_str().unwrap(),
        "--engine",
        engine,
        "--admin",
        "127.0.0.1:0",
    ]);
    let request = b"hello tap, binary too: \x00\x01\xfe\n".to_vec();
    let reply = exchange(fwd.listen, &request);
    assert_eq!(reply, request.to_ascii_uppercase());
    backend.join();

    // The writer thread is asynchronous: wait (bounded) for the session's close line.
    let deadline = Instant::now() + DEADLINE;
    let text = loop {
        let text = std::fs::read_to_string(&tap).unwrap_or_default();
        if text.contains(" close ") {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "tap never closed the session:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(text.contains(" open client=127.0.0.1:"), "{text}");
    assert_eq!(tapped_bytes(&text, "client_to_upstream"), request, "{text}");
    assert_eq!(tapped_bytes(&text, "upstream_to_client"), reply, "{text}");
    let n = request.len();
    assert!(
        text.contains(&format!(
            "close eof client_to_upstream={n} upstream_to_client={n}"
        )),
        "{text}"
    );
}

fn scratch_dir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn tap_records_both_directions_with_the_tokio_engine() {
    tap_roundtrip("tokio", &scratch_dir("metrics-tap-tokio"));
}

#[test]
fn tap_records_both_directions_with_the_uring_engine() {
    tap_roundtrip("uring", &scratch_dir("metrics-tap-uring"));
}

#[test]
fn tap_records_both_directions_with_the_std_engine() {
    tap_roundtrip("std", &scratch_dir("metrics-tap-std"));
}

/// Steps: 1. run with `hdr_log` at a short interval; 2. one session; 3. the intervals in the
/// file, parsed with hdrhistogram's own reader, add up to exactly that one session.
#[test]
fn hdr_log_intervals_add_up_to_the_sessions_served() {
    use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
    let dir = scratch_dir("metrics-hdrlog");
    let log = dir.join("run.hlog");
    let _ = std::fs::remove_file(&log);
    let backend = Backend::start(1, <[u8]>::to_vec);
    let config = dir.join("hdrlog.toml");
    std::fs::write(
        &config,
        format!(
            "hdr_log = {:?}\nhdr_log_interval = \"100ms\"\n[[rule]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
            log.display().to_string(),
            backend.addr
        ),
    )
    .unwrap();
    let fwd = Forwarder::start(&[
        "run",
        "--config",
        config.to_str().unwrap(),
        "--engine",
        "tokio",
        "--admin",
        "127.0.0.1:0",
    ]);
    assert_eq!(exchange(fwd.listen, b"interval"), b"interval");
    backend.join();
    fwd.wait_idle(1);

    let count = |tag: &str| -> u64 {
        let text = std::fs::read(&log).unwrap_or_default();
        IntervalLogIterator::new(&text)
            .filter_map(|e| match e {
                Ok(LogEntry::Interval(h)) if h.tag().map(|t| t.as_str()) == Some(tag) => {
                    Some(decode_histogram(h.encoded_histogram()).len())
                }
                _ => None,
            })
            .sum()
    };
    let deadline = Instant::now() + DEADLINE;
    while count("web.session") < 1 {
        assert!(Instant::now() < deadline, "session never logged");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Wait one more interval: later intervals must not count the session again.
    let lines = |path: &Path| std::fs::read_to_string(path).unwrap().lines().count();
    let seen = lines(&log);
    while lines(&log) <= seen {
        assert!(Instant::now() < deadline, "no further interval written");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(count("web.session"), 1);
    assert_eq!(count("web.upstream_connect"), 1);
    assert_eq!(count("web.first_byte"), 1);
}

/// One raw HTTP/1.1 request (`Connection: close`); returns the status line's code, the
/// headers (lower-cased names) and the body.
fn http_raw(addr: SocketAddr, method: &str, path: &str) -> (u16, Vec<(String, String)>, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines.next().unwrap().split_whitespace().nth(1).unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status.parse().unwrap(), headers, body.to_string())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Steps: 1. `GET /reload` is 405 with `Allow: POST`, and a GET endpoint asked with another
/// method 405 with `Allow: GET`; 2. every 404 lists every real endpoint.
#[test]
fn wrong_methods_get_405_with_allow_and_404_lists_every_endpoint() {
    let backend = Backend::start(0, <[u8]>::to_vec);
    let fwd = Forwarder::simple("tokio", backend.addr);
    let (status, headers, body) = http_raw(fwd.admin, "GET", "/reload");
    assert_eq!(status, 405, "{body}");
    assert_eq!(header(&headers, "allow"), Some("POST"), "{headers:?}");
    assert!(body.contains("/reload answers POST only"), "{body}");
    for path in ["/metrics", "/stats", "/upstreams", "/healthz"] {
        let (status, headers, body) = http_raw(fwd.admin, "POST", path);
        assert_eq!(status, 405, "POST {path}: {body}");
        assert_eq!(header(&headers, "allow"), Some("GET"), "{headers:?}");
    }
    for (method, path) in [
        ("GET", "/nothing"),
        ("POST", "/nothing"),
        ("GET", "/reload/x"),
    ] {
        let (status, _, body) = http_raw(fwd.admin, method, path);
        assert_eq!(status, 404, "{method} {path}: {body}");
        for endpoint in ringfwd::metrics::admin::ENDPOINTS.map(|(p, _)| p) {
            assert!(body.contains(endpoint), "the 404 lacks {endpoint}: {body}");
        }
    }
    backend.join();
}

/// The sample names in the first column of docs/METRICS.md's metrics table.
fn documented_metric_names() -> Vec<String> {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/METRICS.md"))
            .unwrap();
    doc.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`').map(|(name, _)| name.to_string()))
        .filter(|n| {
            (n.starts_with("ringfwd_") || n.starts_with("process_"))
                && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        .collect()
}

/// Steps: 1. scrape a running forwarder; 2. every metric METRICS.md documents is exported
/// (a family's `# TYPE` line; the tap's only exists with a tap) and every `process_` family
/// exported is documented; 3. the process metrics hold values that make sense for this very
/// process: the fds it has open (at least its listener and admin socket), its limit, its
/// memory, its CPU time and its start time (no later than now, no earlier than the test).
#[test]
fn every_documented_metric_is_exported_with_the_process_metrics() {
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let backend = Backend::start(1, <[u8]>::to_vec);
    let fwd = Forwarder::simple("tokio", backend.addr);
    assert_eq!(exchange(fwd.listen, b"ping"), b"ping");
    let (status, text) = fwd.get("/metrics");
    assert_eq!(status, 200);
    let names = documented_metric_names();
    for want in [
        "process_open_fds",
        "process_max_fds",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_start_time_seconds",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "METRICS.md does not document {want}"
        );
    }
    for name in &names {
        if name == "ringfwd_tap_dropped_events_total" {
            continue;
        }
        let family = name.strip_suffix("_total").unwrap_or(name);
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("# TYPE {family} "))),
            "documented {name} is not exported:\n{text}"
        );
    }
    for family in text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE process_"))
        .filter_map(|l| l.split_whitespace().next())
    {
        assert!(
            names
                .iter()
                .any(|n| n.strip_suffix("_total").unwrap_or(n) == format!("process_{family}")),
            "process_{family} is exported but not documented"
        );
    }
    let open = metric_value(&text, "process_open_fds");
    let max = metric_value(&text, "process_max_fds");
    assert!(open >= 4.0 && open <= max, "open {open}, max {max}");
    assert!(metric_value(&text, "process_resident_memory_bytes") > f64::from(1 << 20));
    assert!(metric_value(&text, "process_cpu_seconds_total") >= 0.0);
    let start = metric_value(&text, "process_start_time_seconds");
    let after = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    // /proc's start time is in clock ticks after a boot time in whole seconds: allow both.
    assert!(
        start >= before - 2.0 && start <= after + 1.0,
        "start {start}, test ran {before}..{after}"
    );
    backend.join();
}
