//! Edge admission seen from outside: real PROXY-protocol peers (HAProxy, nginx) as child
//! processes, hand-built PROXY headers, an in-test upstream that decodes the header it is
//! sent, and the forwarder's rejection counters and access-log `client=` fields.
//!
//! Peers are started in the foreground on loopback ports picked by binding port 0 first,
//! from configs written into a scratch directory of the test's own; readiness is the peer's
//! own listening sockets appearing in `/proc/net/tcp{,6}` (a connect would itself be relayed
//! and pollute what the test observes). Every peer is killed by its pid and reaped on drop.
//! A missing `haproxy` or `nginx` fails the test with the install command, unless
//! `RINGFWD_SKIP_PEERS=1`.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringfwd::session::proxy::{Parse, ProxyParser};

use super::pool::{self, Metrics, connect_from, wait_until};
use super::sock::{self, Backend, End, Upstream};
use super::{Relay, STEP_TIMEOUT};

/// Environment variable that turns a missing HAProxy or nginx into skipped peer checks.
pub const SKIP_PEERS_ENV: &str = "RINGFWD_SKIP_PEERS";
/// How long a peer may take to listen on every address of its config.
const PEER_READY: Duration = Duration::from_secs(20);
/// Attempts at starting a peer: a port picked by binding port 0 can be taken again (by some
/// test's outgoing connection) before the peer binds it.
const PEER_TRIES: usize = 3;

/// Starts a forwarder with the admin endpoint on (`admin = "127.0.0.1:0"`) and `rules` (the
/// `[[rule]]` tables), waiting for `count` readiness lines.
///
/// # Panics
/// The forwarder did not start: with the current code, because it rejects an edge key.
pub fn forwarder(engine: &[&str], rules: &str, count: usize) -> Relay {
    let relay = Relay::start_config(
        engine,
        &format!("admin = \"127.0.0.1:0\"\n\n{rules}"),
        count,
    );
    assert!(
        relay.admin.is_some(),
        "the forwarder printed no admin addr="
    );
    relay
}

/// `GET /metrics` of a forwarder started by [`forwarder`].
///
/// # Panics
/// Not a 200.
pub fn metrics(relay: &Relay) -> Metrics {
    let (status, body) = pool::http_get(relay.admin.expect("admin address"), "/metrics");
    assert_eq!(status, 200, "GET /metrics: {body}");
    Metrics::parse(&body)
}

/// `ringfwd_connections_rejected_total{rule,reason}`.
pub fn rejected(m: &Metrics, rule: &str, reason: &str) -> f64 {
    m.sum(
        "ringfwd_connections_rejected_total",
        &[("rule", rule), ("reason", reason)],
    )
}

/// Waits until `ringfwd_connections_rejected_total{rule,reason}` is exactly `want`.
///
/// # Panics
/// It is not within [`STEP_TIMEOUT`]; the message lists every rejection series.
pub fn wait_rejected(relay: &Relay, rule: &str, reason: &str, want: u64) {
    wait_until(
        STEP_TIMEOUT,
        &format!("rejected{{rule={rule},reason={reason}}} == {want}"),
        || {
            let m = metrics(relay);
            let got = rejected(&m, rule, reason);
            if got == want as f64 {
                Ok(())
            } else {
                let all: Vec<String> = m
                    .matching("ringfwd_connections_rejected_total", &[])
                    .map(|s| format!("{:?}={}", s.labels, s.value))
                    .collect();
                Err(format!("{got}; rejections: {}", all.join(", ")))
            }
        },
    );
}

/// The `client=` field of an access-log line.
pub fn client_field(line: &str) -> Option<&str> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix("client="))
        .map(|v| v.trim_matches('"'))
}

/// Waits for the access-log line (`session closed`) whose `client=` is exactly `client`.
///
/// # Panics
/// None within [`STEP_TIMEOUT`]; the message lists the `client=` fields seen.
pub fn wait_access_client(relay: &Relay, client: SocketAddr) -> String {
    let want = client.to_string();
    let mut found = None;
    wait_until(
        STEP_TIMEOUT,
        &format!("an access-log line with client={want}"),
        || {
            let text = relay.stderr();
            let lines = pool::Access::parse_all(&text);
            if let Some(l) = lines.iter().find(|l| client_field(&l.line) == Some(&want)) {
                found = Some(l.line.clone());
                return Ok(());
            }
            let seen: Vec<&str> = lines.iter().filter_map(|l| client_field(&l.line)).collect();
            Err(format!("client= fields so far: {seen:?}"))
        },
    );
    found.expect("found")
}

/// A hand-written PROXY v1 line for a connection from `src` to `dst` (same family).
pub fn v1_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let proto = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {proto} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

/// The 12-byte signature of a PROXY v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// A hand-written PROXY v2 header, command PROXY, STREAM, for `src` → `dst` (same family).
pub fn v2_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut h = V2_SIGNATURE.to_vec();
    h.push(0x21);
    let mut block = Vec::new();
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            h.push(0x11);
            block.extend_from_slice(&s.octets());
            block.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            h.push(0x21);
            block.extend_from_slice(&s.octets());
            block.extend_from_slice(&d.octets());
        }
        _ => panic!("v2_header: {src} and {dst} are of different families"),
    }
    block.extend_from_slice(&src.port().to_be_bytes());
    block.extend_from_slice(&dst.port().to_be_bytes());
    h.extend_from_slice(&u16::try_from(block.len()).expect("short").to_be_bytes());
    h.extend_from_slice(&block);
    h
}

/// A v2 LOCAL header: signature, version 2 / command LOCAL (0x20), AF_UNSPEC (0x00), no
/// address block.
pub fn v2_local_header() -> Vec<u8> {
    let mut h = V2_SIGNATURE.to_vec();
    h.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    h
}

/// Connects from `local`, sends `header` then `payload`, and reads `payload` back (the
/// upstream is an echo).
///
/// # Errors
/// What failed, for the test to report.
pub fn echo_with_header(
    local: IpAddr,
    addr: SocketAddr,
    header: impl FnOnce(SocketAddr, SocketAddr) -> Vec<u8>,
    payload: &[u8],
) -> Result<SocketAddr, String> {
    let mut s = connect_from(local, addr).map_err(|e| format!("connect from {local}: {e}"))?;
    let me = s.local_addr().map_err(|e| e.to_string())?;
    let mut bytes = header(me, addr);
    bytes.extend_from_slice(payload);
    s.write_all(&bytes).map_err(|e| format!("write: {e}"))?;
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back).map_err(|e| format!("read: {e}"))?;
    if back != payload {
        return Err(format!("echoed {back:?} for {payload:?}"));
    }
    Ok(me)
}

/// Waits up to `within` for `s` to end; returns how, after how long, and asserts that the
/// forwarder sent nothing before.
pub fn wait_closed(s: &mut TcpStream, within: Duration) -> (End, Duration) {
    let started = Instant::now();
    let (end, data) = sock::wait_end(s, within);
    assert!(
        data.is_empty(),
        "{} unexpected bytes before the close: {:?}",
        data.len(),
        String::from_utf8_lossy(&data)
    );
    (end, started.elapsed())
}

/// Connects from `local` to `addr`, optionally sends `first` bytes, and waits up to `within`
/// for the close; a reset that beats the connect or the write counts as [`End::Reset`].
pub fn attempt_from(
    local: IpAddr,
    addr: SocketAddr,
    first: &[u8],
    within: Duration,
) -> (End, Duration) {
    let started = Instant::now();
    let reset = |e: &io::Error| {
        matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
        )
    };
    let mut s = match connect_from(local, addr) {
        Ok(s) => s,
        Err(e) if reset(&e) => return (End::Reset, started.elapsed()),
        Err(e) => panic!("connect from {local} to {addr}: {e}"),
    };
    if !first.is_empty() {
        match s.write_all(first) {
            Ok(()) => {}
            Err(e) if reset(&e) => return (End::Reset, started.elapsed()),
            Err(e) => panic!("write from {local} to {addr}: {e}"),
        }
    }
    let (end, _) = wait_closed(&mut s, within);
    (end, started.elapsed())
}

/// An echo upstream on `addr` that first decodes the PROXY header it is sent (with the
/// crate's own decoder), answers one line `SRC DST\n` (`- -` for LOCAL or UNKNOWN, `invalid
/// WHY` for a bad header), then echoes every byte that followed the header.
pub struct HeaderEcho {
    backend: Backend,
}

impl HeaderEcho {
    pub fn bind(addr: SocketAddr) -> Self {
        let backend = Backend::spawn_on(Upstream::bind_on(addr), |mut s| {
            let mut parser = ProxyParser::new();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let rest = loop {
                let n = match s.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                buf.extend_from_slice(&chunk[..n]);
                match parser.feed(&buf) {
                    Parse::NeedMore { .. } => {}
                    Parse::Done { header, consumed } => {
                        let show =
                            |a: Option<SocketAddr>| a.map_or_else(|| "-".into(), |a| a.to_string());
                        let line =
                            format!("{} {}\n", show(header.source), show(header.destination));
                        if s.write_all(line.as_bytes()).is_err() {
                            return;
                        }
                        break buf.split_off(consumed);
                    }
                    Parse::Invalid(why) => {
                        let _ = s.write_all(format!("invalid {why}\n").as_bytes());
                        return;
                    }
                }
            };
            if s.write_all(&rest).is_err() {
                return;
            }
            sock::echo(s);
        });
        Self { backend }
    }

    pub fn addr(&self) -> SocketAddr {
        self.backend.addr()
    }
}

/// Reads one `\n`-terminated line (at most 512 bytes), byte by byte so nothing after it is
/// consumed.
///
/// # Panics
/// The stream ended, failed or stalled first.
pub fn read_line(s: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 512 {
        match s.read(&mut b) {
            Ok(0) => panic!(
                "EOF before the end of the line {:?}",
                String::from_utf8_lossy(&line)
            ),
            Ok(_) if b[0] == b'\n' => return String::from_utf8_lossy(&line).into_owned(),
            Ok(_) => line.push(b[0]),
            Err(e) => panic!(
                "reading a line (so far {:?}): {e}",
                String::from_utf8_lossy(&line)
            ),
        }
    }
    panic!(
        "line longer than 512 bytes: {:?}",
        String::from_utf8_lossy(&line)
    );
}

/// True when `[::1]` can be bound here (IPv6 loopback configured).
pub fn has_ipv6_loopback() -> bool {
    TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_ok()
}

/// A loopback port on `ip` that was free a moment ago (bound to port 0, then released).
///
/// # Panics
/// `ip` cannot be bound.
pub fn free_port(ip: IpAddr) -> u16 {
    TcpListener::bind((ip, 0))
        .unwrap_or_else(|e| panic!("bind {ip}:0: {e}"))
        .local_addr()
        .expect("bound address")
        .port()
}

/// A directory of the test's own under the cargo scratch directory, removed on drop.
pub struct ScratchDir {
    pub path: PathBuf,
}

impl ScratchDir {
    /// # Panics
    /// The directory cannot be created.
    pub fn new(stem: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("{stem}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        Self { path }
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Which real PROXY-protocol peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerKind {
    Haproxy,
    Nginx,
}

impl PeerKind {
    fn program(self) -> &'static str {
        match self {
            Self::Haproxy => "haproxy",
            Self::Nginx => "nginx",
        }
    }

    fn package(self) -> &'static str {
        match self {
            Self::Haproxy => "haproxy",
            Self::Nginx => "nginx libnginx-mod-stream",
        }
    }
}

/// The peer's executable: on `PATH`, or in the sbin directories a non-login `PATH` may lack.
///
/// # Panics
/// It is missing and `RINGFWD_SKIP_PEERS` is not `1`: the CI installs it, so a missing peer
/// is a broken setup, never a silent pass.
pub fn peer_program(kind: PeerKind) -> Option<PathBuf> {
    let name = kind.program();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        if std::env::var(SKIP_PEERS_ENV).as_deref() == Ok("1") {
            eprintln!(
                "note: skipping the {name} checks because {SKIP_PEERS_ENV}=1 and it is missing"
            );
        } else {
            panic!(
                "{name} is not installed: these tests need it as a real PROXY-protocol peer \
                 (apt-get install {}; .ci/run installs it), or set {SKIP_PEERS_ENV}=1 to skip",
                kind.package()
            );
        }
    }
    found
}

/// nginx's stream module as a loadable module, if it is one (Debian's libnginx-mod-stream).
pub fn nginx_stream_module() -> Option<&'static str> {
    ["/usr/lib/nginx/modules/ngx_stream_module.so"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
}

/// A running HAProxy or nginx, killed by pid and reaped on drop.
pub struct Peer {
    child: Child,
    kind: PeerKind,
    /// One listen address per IP asked for, in order.
    pub addrs: Vec<SocketAddr>,
    stderr: Arc<Mutex<Vec<u8>>>,
    config: String,
    _dir: ScratchDir,
}

impl Peer {
    /// Starts `kind` with the config `make(addrs)` returns, `addrs` being one fresh port on
    /// each IP of `ips`, and waits until it listens on all of them. `None` when the peer is
    /// missing and `RINGFWD_SKIP_PEERS=1`.
    ///
    /// # Panics
    /// The peer is missing (and not skipped), or did not start after a few tries.
    pub fn start(
        kind: PeerKind,
        ips: &[IpAddr],
        make: impl Fn(&[SocketAddr]) -> String,
    ) -> Option<Self> {
        let program = peer_program(kind)?;
        let mut last = String::new();
        for _ in 0..PEER_TRIES {
            let dir = ScratchDir::new(kind.program());
            let addrs: Vec<SocketAddr> = ips
                .iter()
                .map(|ip| SocketAddr::new(*ip, free_port(*ip)))
                .collect();
            let config = make(&addrs);
            let conf = dir.path.join(format!("{}.conf", kind.program()));
            std::fs::write(&conf, &config)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", conf.display()));
            let mut cmd = Command::new(&program);
            match kind {
                PeerKind::Haproxy => {
                    cmd.arg("-f").arg(&conf).arg("-db");
                }
                PeerKind::Nginx => {
                    let mut prefix = dir.path.display().to_string();
                    prefix.push('/');
                    cmd.args(["-g", "daemon off;", "-e", "stderr", "-c"])
                        .arg(&conf)
                        .arg("-p")
                        .arg(prefix);
                }
            }
            let mut child = cmd
                .current_dir(&dir.path)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", program.display()));
            let stderr = Arc::new(Mutex::new(Vec::new()));
            for pipe in [
                Box::new(child.stdout.take().expect("piped")) as Box<dyn Read + Send>,
                Box::new(child.stderr.take().expect("piped")),
            ] {
                let sink = stderr.clone();
                std::thread::spawn(move || {
                    let mut pipe = pipe;
                    let mut buf = [0u8; 4096];
                    while let Ok(n @ 1..) = pipe.read(&mut buf) {
                        sink.lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .extend_from_slice(&buf[..n]);
                    }
                });
            }
            let mut peer = Self {
                child,
                kind,
                addrs,
                stderr,
                config,
                _dir: dir,
            };
            let pid = i32::try_from(peer.child.id()).expect("pid");
            let deadline = Instant::now() + PEER_READY;
            loop {
                let listening = listening_sockets(pid);
                if peer.addrs.iter().all(|a| listening.contains(a)) {
                    return Some(peer);
                }
                if let Ok(Some(status)) = peer.child.try_wait() {
                    super::eventually(Duration::from_secs(2), || !peer.output().is_empty());
                    last = format!(
                        "{} exited with {status}; output:\n{}\nconfig:\n{}",
                        kind.program(),
                        peer.output(),
                        peer.config
                    );
                    break;
                }
                if Instant::now() >= deadline {
                    last = format!(
                        "{} did not listen on {:?} within {PEER_READY:?} (listening: {listening:?}); \
                         output:\n{}\nconfig:\n{}",
                        kind.program(),
                        peer.addrs,
                        peer.output(),
                        peer.config
                    );
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("{last}");
    }

    /// What the peer printed so far (stdout and stderr).
    pub fn output(&self) -> String {
        String::from_utf8_lossy(
            &self
                .stderr
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
        .into_owned()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- {} (pid {}) config ---\n{}\n--- output ---\n{}",
                self.kind.program(),
                self.child.id(),
                self.config,
                self.output()
            );
        }
    }
}

/// The addresses `pid` has TCP sockets listening on, from `/proc/net/tcp{,6}`.
pub fn listening_sockets(pid: i32) -> Vec<SocketAddr> {
    let owned = super::procfs::socket_inodes(pid);
    let mut out = Vec::new();
    for (table, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) = (cols.get(1), cols.get(3), cols.get(9))
            else {
                continue;
            };
            if *state != "0A" || !inode.parse().is_ok_and(|i: u64| owned.contains(&i)) {
                continue;
            }
            if let Some(addr) = parse_proc_addr(local, v6) {
                out.push(addr);
            }
        }
    }
    out
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6), as `/proc/net/tcp*` print them:
/// each 32-bit word of the address in host (little-endian) order.
fn parse_proc_addr(text: &str, v6: bool) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Option<Vec<[u8; 4]>> = ip
        .as_bytes()
        .chunks(8)
        .map(|w| {
            let w = std::str::from_utf8(w).ok()?;
            Some(u32::from_str_radix(w, 16).ok()?.to_le_bytes())
        })
        .collect();
    let bytes: Vec<u8> = words?.concat();
    let ip = if v6 {
        IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?))
    } else {
        IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?))
    };
    Some(SocketAddr::new(ip, port))
}
