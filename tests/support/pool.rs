//! Upstream pools seen from outside: a forwarder with its admin endpoint, the `/upstreams`
//! JSON and `/metrics` text it serves, in-test pool members that count (or name) the
//! connections they serve, `ringfwd echo` children that can be killed and restarted on their
//! port, and clients bound to a chosen loopback source address.
//!
//! [`Forwarder`] differs from [`super::Relay`] only in that it always starts the admin
//! listener (`admin = "127.0.0.1:0"`) and keeps the `admin addr=IP:PORT` line the binary
//! prints before its `listening` lines. Every wait is bounded; every child process is killed
//! by its pid and reaped.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use socket2::{Domain, Protocol, Socket, Type};

use super::relay::BIN;
use super::sock::{self, Backend};
use super::{STEP_TIMEOUT, TempFile};

/// How long a child (forwarder or echo) may take to print its readiness lines.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Read timeout of a member's connection: long enough to hold a connection open for a whole
/// scenario, finite so that a forgotten connection still ends its thread.
const HOLD: Duration = Duration::from_secs(120);
/// Poll period of [`wait_until`].
const POLL: Duration = Duration::from_millis(20);

/// A child's stdout as lines on a channel; the thread keeps reading after the receiver is
/// gone, so a late line never meets a closed pipe.
fn stdout_lines(pipe: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { return };
            let _ = tx.send(line);
        }
    });
    rx
}

fn text_of(buf: &Mutex<Vec<u8>>) -> String {
    String::from_utf8_lossy(
        &buf.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    )
    .into_owned()
}

/// Polls `check` every few milliseconds until it returns `Ok` or `within` passes; returns how
/// long it took. For state the forwarder only exposes through its admin endpoint.
///
/// # Panics
/// `check` still failed at the deadline; the message is its last error.
pub fn wait_until(
    within: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<(), String>,
) -> Duration {
    let started = Instant::now();
    loop {
        let last = match check() {
            Ok(()) => return started.elapsed(),
            Err(e) => e,
        };
        assert!(
            started.elapsed() < within,
            "{what}: still not true after {within:?}: {last}"
        );
        std::thread::sleep(POLL);
    }
}

/// `ringfwd run --config FILE` with the admin endpoint on, killed (by pid) and reaped on drop.
pub struct Forwarder {
    child: Child,
    /// The admin endpoint, from the `admin addr=` line.
    pub admin: SocketAddr,
    /// `(rule name, bound address)` in the order the forwarder printed them.
    pub rules: Vec<(String, SocketAddr)>,
    stderr: Arc<Mutex<Vec<u8>>>,
    config: String,
    _file: TempFile,
}

impl Forwarder {
    /// Starts the forwarder on a config made of `admin = "127.0.0.1:0"` followed by `rules`
    /// (the `[[rule]]` tables), with the engine flags on the command line; waits for the
    /// admin line and one `listening` line per rule. When the flags name an engine, the
    /// listening lines must report it.
    ///
    /// # Panics
    /// The forwarder exited (e.g. it rejected the config) or was not ready in time.
    pub fn start(engine: &[&str], rules: &str, rule_count: usize) -> Self {
        Self::start_wrapped(&[], engine, rules, rule_count)
    }

    /// Like [`Forwarder::start`], with the binary run by `wrapper` (its program and leading
    /// arguments; the binary and its arguments follow), e.g. `unshare -m sh -c '… exec "$0"
    /// "$@"'`. The wrapper must `exec` the binary so that the child's pid is the forwarder's.
    ///
    /// # Panics
    /// As [`Forwarder::start`].
    pub fn start_wrapped(
        wrapper: &[&str],
        engine: &[&str],
        rules: &str,
        rule_count: usize,
    ) -> Self {
        let config = format!("admin = \"127.0.0.1:0\"\n\n{rules}");
        let file = TempFile::new("ringfwd-pool", &config);
        let path = file.path.display().to_string();
        let mut args = vec!["run", "--config", path.as_str()];
        args.extend_from_slice(engine);
        let mut command = match wrapper.split_first() {
            Some((program, lead)) => {
                let mut c = Command::new(program);
                c.args(lead).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        let mut child = command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {BIN}: {e}"));
        let stderr = super::drain_into(child.stderr.take().expect("stderr is piped"));
        let lines = stdout_lines(child.stdout.take().expect("stdout is piped"));
        let want_engine = engine
            .windows(2)
            .find(|w| w[0] == "--engine")
            .map(|w| w[1])
            .filter(|e| *e != "auto");
        let mut fwd = Self {
            child,
            admin: SocketAddr::from(([0, 0, 0, 0], 0)),
            rules: Vec::new(),
            stderr,
            config,
            _file: file,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut admin = None;
        while admin.is_none() || fwd.rules.len() < rule_count {
            let line = match lines.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) => line,
                Err(e) => {
                    let status = match e {
                        RecvTimeoutError::Timeout => "was not ready in time".to_string(),
                        RecvTimeoutError::Disconnected => {
                            let mut status = None;
                            super::eventually(Duration::from_secs(5), || {
                                status = fwd.child.try_wait().expect("waitpid");
                                status.is_some()
                            });
                            format!("exited ({status:?})")
                        }
                    };
                    // Let the stderr thread catch up with the child's last words.
                    super::eventually(Duration::from_secs(2), || !fwd.stderr().is_empty());
                    panic!(
                        "ringfwd {args:?} {status}; stderr:\n{}\nconfig:\n{}",
                        fwd.stderr(),
                        fwd.config
                    );
                }
            };
            if let Some(a) = line.strip_prefix("admin addr=") {
                admin = Some(a.trim().parse().expect("admin addr=IP:PORT"));
            } else if let Some(rest) = line.strip_prefix("listening ") {
                let field = |k: &str| {
                    rest.split(' ')
                        .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
                        .map(str::to_string)
                };
                let name = field("rule").unwrap_or_else(|| panic!("no rule= in {line:?}"));
                let addr = field("addr")
                    .and_then(|a| a.parse().ok())
                    .unwrap_or_else(|| panic!("no addr= in {line:?}"));
                if let Some(want) = want_engine {
                    assert_eq!(
                        field("engine").as_deref(),
                        Some(want),
                        "the forwarder runs another engine than asked: {line:?}"
                    );
                }
                fwd.rules.push((name, addr));
            }
        }
        fwd.admin = admin.expect("admin address");
        fwd
    }

    /// Rewrites the config file with `rules` after the same admin line (and `head`, top-level
    /// keys before it), then asks for a reload with `POST /reload` (sending `headers`):
    /// status and body.
    pub fn reload_rules(&self, head: &str, rules: &str, headers: &[(&str, &str)]) -> (u16, String) {
        let config = format!("admin = \"127.0.0.1:0\"\n{head}\n{rules}");
        std::fs::write(&self._file.path, config)
            .unwrap_or_else(|e| panic!("cannot rewrite the config: {e}"));
        http_request_with(self.admin, "POST", "/reload", headers)
    }

    /// The listen address of the first rule.
    pub fn addr(&self) -> SocketAddr {
        self.rules[0].1
    }

    /// Everything the forwarder wrote on stderr so far (logs and the access log).
    pub fn stderr(&self) -> String {
        text_of(&self.stderr)
    }

    /// `GET path` on the admin endpoint: status and body.
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.admin, path)
    }

    /// `GET /upstreams`, parsed.
    ///
    /// # Panics
    /// Not a 200 with a JSON body.
    pub fn upstreams(&self) -> Value {
        let (status, body) = self.get("/upstreams");
        assert_eq!(status, 200, "GET /upstreams: {body}");
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("GET /upstreams is not JSON ({e}): {body}"))
    }

    /// The pool of rule `rule` in `/upstreams`.
    ///
    /// # Panics
    /// `/upstreams` has no such rule.
    pub fn pool(&self, rule: &str) -> Value {
        let all = self.upstreams();
        pool_in(&all, rule).clone()
    }

    /// The member of rule `rule` whose resolved `addr` is `addr`, from `/upstreams`.
    ///
    /// # Panics
    /// No such rule or member.
    pub fn member(&self, rule: &str, addr: SocketAddr) -> Value {
        member_in(&self.pool(rule), addr).clone()
    }

    /// `GET /metrics`, parsed.
    ///
    /// # Panics
    /// Not a 200.
    pub fn metrics(&self) -> Metrics {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200, "GET /metrics: {body}");
        Metrics::parse(&body)
    }

    /// The access-log lines written so far.
    pub fn access_log(&self) -> Vec<Access> {
        Access::parse_all(&self.stderr())
    }

    /// Waits until the access log holds at least `n` lines; returns them all.
    ///
    /// # Panics
    /// Fewer than `n` lines within [`STEP_TIMEOUT`].
    pub fn wait_access_log(&self, n: usize) -> Vec<Access> {
        let mut lines = Vec::new();
        wait_until(STEP_TIMEOUT, "access-log lines", || {
            lines = self.access_log();
            if lines.len() >= n {
                Ok(())
            } else {
                Err(format!("{} of {n} lines", lines.len()))
            }
        });
        lines
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        let was_running = matches!(self.child.try_wait(), Ok(None));
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let text = self.stderr();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!(
                "--- ringfwd (pid {}, {}) config ---\n{}\n--- stderr, last {} lines ---",
                self.child.id(),
                if was_running {
                    "killed by the test guard"
                } else {
                    "had exited"
                },
                self.config,
                tail.len()
            );
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// The pool of rule `rule` in a parsed `/upstreams` document.
///
/// # Panics
/// No such rule.
pub fn pool_in<'a>(upstreams: &'a Value, rule: &str) -> &'a Value {
    upstreams["rules"]
        .as_array()
        .unwrap_or_else(|| panic!("/upstreams has no \"rules\" array: {upstreams}"))
        .iter()
        .find(|r| r["rule"] == rule)
        .unwrap_or_else(|| panic!("/upstreams has no rule {rule:?}: {upstreams}"))
}

/// The members of a pool from `/upstreams`.
///
/// # Panics
/// No `members` array.
pub fn members_of(pool: &Value) -> &Vec<Value> {
    pool["members"]
        .as_array()
        .unwrap_or_else(|| panic!("pool without a \"members\" array: {pool}"))
}

/// The member of `pool` whose resolved `addr` is `addr`.
///
/// # Panics
/// No such member.
pub fn member_in(pool: &Value, addr: SocketAddr) -> &Value {
    let want = addr.to_string();
    members_of(pool)
        .iter()
        .find(|m| m["addr"] == want.as_str())
        .unwrap_or_else(|| panic!("no member with addr {want:?} in {pool}"))
}

/// A member's `up` flag.
///
/// # Panics
/// Not a boolean.
pub fn is_up(member: &Value) -> bool {
    member["up"]
        .as_bool()
        .unwrap_or_else(|| panic!("\"up\" is not a boolean in {member}"))
}

/// A member's numeric field (`active`, `connections`, `connect_errors`, `weight`).
///
/// # Panics
/// Not an unsigned number.
pub fn count(member: &Value, field: &str) -> u64 {
    member[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field:?} is not a count in {member}"))
}

/// `GET path` over plain HTTP/1.1 with `Connection: close`: status and body (a chunked body
/// is decoded).
///
/// # Panics
/// The endpoint did not answer with an HTTP response within the step timeout.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path)
}

/// `POST path` with an empty body, like [`http_get`].
///
/// # Panics
/// See [`http_get`].
pub fn http_post(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "POST", path)
}

fn http_request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    http_request_with(addr, method, path, &[])
}

/// An HTTP/1.1 request with an empty body and `headers` added, like [`http_get`].
///
/// # Panics
/// See [`http_get`].
pub fn http_request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut s = sock::connect(addr);
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("{method} {path}: reading the response: {e}"));
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("{method} {path}: no end of headers in {text:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: no status in {head:?}"));
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or_else(|_| panic!("bad chunk size {size:?}"));
        if size == 0 || after.len() < size {
            break;
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    out
}

/// One series of a Prometheus / OpenMetrics text exposition.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed `/metrics` page, queried by name and a subset of labels (so the tests never
/// depend on the order the labels are printed in).
pub struct Metrics {
    pub series: Vec<Series>,
    pub text: String,
}

impl Metrics {
    /// # Panics
    /// A sample line that is not `name{labels} value`.
    pub fn parse(text: &str) -> Self {
        let series = text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| parse_sample(l).unwrap_or_else(|| panic!("bad metrics line {l:?}")))
            .collect();
        Self {
            series,
            text: text.to_string(),
        }
    }

    /// Every series named `name` whose labels include all of `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Series> + 'a {
        self.series.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The sum over [`Metrics::matching`] series; 0 when there is none.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// The value of the one series named `name` with `labels`, if there is exactly one.
    ///
    /// # Panics
    /// Several series match: the labels given do not pick one.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<&Series> = self.matching(name, labels).collect();
        assert!(
            found.len() <= 1,
            "{name} {labels:?} matches {} series: {found:?}",
            found.len()
        );
        found.first().map(|s| s.value)
    }
}

fn parse_sample(line: &str) -> Option<Series> {
    let (name, labels, rest) = match line.find('{') {
        Some(open) if open < line.find(' ').unwrap_or(usize::MAX) => {
            let mut labels = BTreeMap::new();
            let mut chars = line[open + 1..].char_indices();
            let mut key = String::new();
            let close = loop {
                let (i, c) = chars.next()?;
                match c {
                    '}' => break open + 1 + i,
                    ',' | ' ' => {}
                    '=' => {
                        let (_, quote) = chars.next()?;
                        if quote != '"' {
                            return None;
                        }
                        let mut value = String::new();
                        loop {
                            let (_, c) = chars.next()?;
                            match c {
                                '"' => break,
                                '\\' => match chars.next()?.1 {
                                    'n' => value.push('\n'),
                                    other => value.push(other),
                                },
                                other => value.push(other),
                            }
                        }
                        labels.insert(std::mem::take(&mut key), value);
                    }
                    other => key.push(other),
                }
            };
            (&line[..open], labels, &line[close + 1..])
        }
        _ => {
            let (name, rest) = line.split_once(' ')?;
            (name, BTreeMap::new(), rest)
        }
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Series {
        name: name.to_string(),
        labels,
        value,
    })
}

/// One access-log line (target `ringfwd::access`) with the pool fields picked out.
#[derive(Clone, Debug)]
pub struct Access {
    /// `upstream=ADDR`: the member the session used.
    pub upstream: Option<String>,
    /// `attempts=N`: connects made for the session.
    pub attempts: Option<u32>,
    pub line: String,
}

impl Access {
    /// Every access-log line in a forwarder's stderr (text log format).
    pub fn parse_all(stderr: &str) -> Vec<Self> {
        stderr
            .lines()
            .filter(|l| l.contains("ringfwd::access"))
            .map(|l| {
                let field = |k: &str| {
                    l.split_whitespace().find_map(|kv| {
                        kv.strip_prefix(k)?
                            .strip_prefix('=')
                            .map(|v| v.trim_matches('"').to_string())
                    })
                };
                Self {
                    upstream: field("upstream"),
                    attempts: field("attempts").and_then(|a| a.parse().ok()),
                    line: l.to_string(),
                }
            })
            .collect()
    }
}

/// An in-test pool member on `127.0.0.1:0`: an echo server that counts the connections that
/// brought data (a health probe connects and brings none) and, if it has an identity, writes
/// that one byte on every connection it accepts before echoing. Connections stay open as long
/// as the peer keeps them open (up to two minutes idle).
pub struct Member {
    backend: Backend,
    served: Arc<AtomicUsize>,
    id: Option<u8>,
}

impl Member {
    /// An echo member that counts the connections that carried data.
    pub fn echo() -> Self {
        Self::spawn(None)
    }

    /// A member that says `id` (one byte) first on every connection, then echoes.
    pub fn identified(id: u8) -> Self {
        Self::spawn(Some(id))
    }

    fn spawn(id: Option<u8>) -> Self {
        let served = Arc::new(AtomicUsize::new(0));
        let counter = served.clone();
        let backend = Backend::spawn(move |mut s| {
            let _ = s.set_read_timeout(Some(HOLD));
            if let Some(id) = id
                && s.write_all(&[id]).is_err()
            {
                return;
            }
            let mut buf = [0u8; 16 << 10];
            let mut counted = false;
            loop {
                match s.read(&mut buf) {
                    Ok(0) => {
                        let _ = s.shutdown(Shutdown::Write);
                        return;
                    }
                    Ok(n) => {
                        if !counted {
                            counted = true;
                            counter.fetch_add(1, Ordering::AcqRel);
                        }
                        if s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            }
        });
        Self {
            backend,
            served,
            id,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.backend.addr()
    }

    /// Connections accepted, health probes included.
    pub fn accepted(&self) -> usize {
        self.backend.accepted()
    }

    /// Connections on which the peer sent at least one byte.
    pub fn served(&self) -> usize {
        self.served.load(Ordering::Acquire)
    }

    pub fn id(&self) -> Option<u8> {
        self.id
    }
}

/// `ringfwd echo --listen ADDR` as a child process, killed with SIGKILL (by pid) and reaped
/// on drop unless the test already did.
pub struct EchoChild {
    child: Child,
    addr: SocketAddr,
    reaped: bool,
    _stdout: Receiver<String>,
}

impl EchoChild {
    /// Starts `ringfwd echo --listen listen` and waits for its `listening addr=` line.
    ///
    /// # Errors
    /// The child exited first (its stderr, e.g. "address in use"), or was not ready in time.
    pub fn start(listen: &str) -> Result<Self, String> {
        let mut child = Command::new(BIN)
            .args(["echo", "--listen", listen])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {BIN} echo: {e}"));
        let stderr = super::drain_into(child.stderr.take().expect("stderr is piped"));
        let lines = stdout_lines(child.stdout.take().expect("stdout is piped"));
        let failed = |child: &mut Child, why: &str| {
            let _ = child.kill();
            let status = child.wait();
            super::eventually(Duration::from_secs(2), || !text_of(&stderr).is_empty());
            Err(format!(
                "ringfwd echo --listen {listen}: {why} ({status:?}); stderr:\n{}",
                text_of(&stderr)
            ))
        };
        let line = match lines.recv_timeout(READY_TIMEOUT) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => return failed(&mut child, "not ready in time"),
            Err(RecvTimeoutError::Disconnected) => return failed(&mut child, "exited"),
        };
        let addr = line
            .trim()
            .strip_prefix("listening addr=")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line of ringfwd echo: {line:?}"));
        Ok(Self {
            child,
            addr,
            reaped: false,
            _stdout: lines,
        })
    }

    /// Starts an echo on exactly `addr` (a port a killed echo had), retrying for a few
    /// seconds if the port is momentarily unavailable.
    ///
    /// # Panics
    /// The port could not be bound again within [`STEP_TIMEOUT`].
    pub fn restart_on(addr: SocketAddr) -> Self {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            match Self::start(&addr.to_string()) {
                Ok(e) => {
                    assert_eq!(e.addr, addr, "the echo did not come back on its port");
                    return e;
                }
                Err(why) => {
                    assert!(Instant::now() < deadline, "{why}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// SIGKILL, then reap: when this returns the process is gone and the kernel has closed
    /// its sockets. Returns the instant it was reaped.
    pub fn kill_and_reap(&mut self) -> Instant {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("SIGKILL the echo");
        self.child.wait().expect("reap the echo");
        self.reaped = true;
        Instant::now()
    }
}

impl Drop for EchoChild {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One short session: connect to `addr`, send `payload`, read it back, close.
///
/// # Errors
/// What went wrong, for the test to count and report.
pub fn echo_once(addr: SocketAddr, payload: &[u8]) -> Result<(), String> {
    let mut s = sock::try_connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.write_all(payload).map_err(|e| format!("write: {e}"))?;
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back).map_err(|e| format!("read: {e}"))?;
    if back != payload {
        return Err(format!("echoed {back:?} for {payload:?}"));
    }
    Ok(())
}

/// The loopback source address of client `i` (0..65 000): `127.77.X.Y`, never 127.0.0.1.
pub fn client_ip(i: usize) -> IpAddr {
    let i = u32::try_from(i).expect("client index");
    assert!(i < 65_000, "client index {i} out of range");
    IpAddr::V4(Ipv4Addr::new(
        127,
        77,
        u8::try_from(i / 250).expect("fits"),
        u8::try_from(i % 250 + 1).expect("fits"),
    ))
}

/// Connects to `addr` from `local` (port 0), within the step timeout; the stream is bounded.
///
/// # Errors
/// The bind or connect error.
pub fn connect_from(local: IpAddr, addr: SocketAddr) -> io::Result<TcpStream> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.bind(&SocketAddr::new(local, 0).into())?;
    s.connect_timeout(&addr.into(), STEP_TIMEOUT)?;
    let s: TcpStream = s.into();
    sock::bounded(&s);
    Ok(s)
}

/// Reads the one-byte identity an [`Member::identified`] member sends first.
///
/// # Errors
/// The stream ended or failed before the byte.
pub fn read_identity(s: &mut TcpStream) -> io::Result<u8> {
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(b[0])
}

/// A TOML array of member addresses: `["127.0.0.1:1", "127.0.0.1:2"]`.
pub fn toml_list(addrs: impl IntoIterator<Item = SocketAddr>) -> String {
    let items: Vec<String> = addrs.into_iter().map(|a| format!("\"{a}\"")).collect();
    format!("[{}]", items.join(", "))
}
