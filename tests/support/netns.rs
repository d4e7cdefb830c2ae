//! Network namespaces made and removed by a test, and a user-space impairment bridge between
//! them, for faults that loopback cannot produce: packets that vanish, delay, loss and
//! reordering on the path between the forwarder and its upstream.
//!
//! Layout of a [`Link`]: namespace `a` holds the client and the forwarder (its loopback is
//! up, so the forwarder listens on `127.0.0.1:0` there), namespace `b` holds the upstream.
//! Between them runs either a veth pair ([`Link::veth`]) or two TUN devices joined by an
//! [`Impairment`] bridge thread ([`Link::bridged`]): the kernel here has no `netem`, so delay,
//! loss and reordering are done by the test itself. Every address lives inside the two
//! namespaces only (198.18.0.0/15, the range set aside for benchmarking network devices);
//! nothing is routed out of them.
//!
//! A thread joins a namespace with [`Netns::enter`]; sockets it creates and children it spawns
//! (the forwarder) belong there, and the guard brings the thread back. Dropping a [`Netns`]
//! deletes it, also when the test panics; namespaces left by a killed test run are removed by
//! the next one ([`Netns::new`] sweeps those whose process is gone).
//!
//! Where namespaces or `/dev/net/tun` are missing the fault tests fail, naming the cause,
//! unless `RINGFWD_SKIP_NETNS=1` says to skip them ([`available`]).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sched::{CloneFlags, setns};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Environment variable that turns missing namespace or TUN support into skipped fault tests.
pub const SKIP_NETNS_ENV: &str = "RINGFWD_SKIP_NETNS";

/// Prefix of every namespace these tests create: `ringfwd-t<PID>-<N>`.
const PREFIX: &str = "ringfwd-t";

/// Whether the fault tests can run here: `ip` from iproute2, permission to create network
/// namespaces, and `/dev/net/tun`. Checked once per test process.
///
/// # Panics
/// Something is missing and `RINGFWD_SKIP_NETNS=1` is not set: a host that cannot run the
/// fault tests must not pass them silently.
pub fn available() -> bool {
    static VERDICT: OnceLock<Result<(), String>> = OnceLock::new();
    let verdict = VERDICT.get_or_init(probe);
    match verdict {
        Ok(()) => true,
        Err(why) if std::env::var(SKIP_NETNS_ENV).as_deref() == Ok("1") => {
            eprintln!(
                "note: skipping a network-namespace fault test because {SKIP_NETNS_ENV}=1: {why}"
            );
            false
        }
        Err(why) => panic!(
            "the network-namespace fault tests cannot run here: {why}\n\
             (they need root, iproute2's `ip` and /dev/net/tun; set {SKIP_NETNS_ENV}=1 to skip them)"
        ),
    }
}

fn probe() -> Result<(), String> {
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return Err(format!(
                "`ip -V` failed: {}",
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        Err(e) => return Err(format!("cannot run `ip` (install iproute2): {e}")),
    }
    if let Err(e) = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        return Err(format!("cannot open /dev/net/tun: {e}"));
    }
    let ns = Netns::try_new().map_err(|e| format!("cannot create a network namespace: {e}"))?;
    ns.try_ip(&["link", "set", "lo", "up"])
        .map_err(|e| format!("cannot configure a network namespace: {e}"))?;
    drop(ns);
    Ok(())
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
    fd: OwnedFd,
}

impl Netns {
    /// Creates a fresh namespace with its loopback up.
    ///
    /// # Panics
    /// `ip netns add` failed.
    pub fn new() -> Self {
        let ns = Self::try_new().unwrap_or_else(|e| panic!("ip netns add: {e}"));
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn try_new() -> Result<Self, String> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        sweep_stale();
        let name = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run_ip(&["netns", "add", &name])?;
        let fd = File::open(format!("/var/run/netns/{name}"))
            .map_err(|e| {
                let _ = run_ip(&["netns", "del", &name]);
                format!("open /var/run/netns/{name}: {e}")
            })?
            .into();
        Ok(Self { name, fd })
    }

    /// Runs `ip -n NAME ARGS`.
    ///
    /// # Panics
    /// The command failed.
    pub fn ip(&self, args: &[&str]) {
        self.try_ip(args)
            .unwrap_or_else(|e| panic!("ip -n {} {}: {e}", self.name, args.join(" ")));
    }

    fn try_ip(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run_ip(&all)
    }

    /// Moves the calling thread into this namespace until the guard drops. Sockets the thread
    /// creates meanwhile, threads it spawns and child processes it starts live here.
    ///
    /// # Panics
    /// `setns` failed.
    pub fn enter(&self) -> Entered {
        let home: OwnedFd = File::open("/proc/thread-self/ns/net")
            .expect("open this thread's network namespace")
            .into();
        setns(self.fd.as_fd(), CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns into {}: {e}", self.name));
        Entered { home }
    }

    /// Runs `f` inside this namespace on the calling thread.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> T {
        let _inside = self.enter();
        f()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run_ip(&["netns", "del", &self.name]) {
            eprintln!(
                "warning: could not delete network namespace {}: {e}",
                self.name
            );
        }
    }
}

/// A thread's stay in another namespace; dropping it returns the thread home.
pub struct Entered {
    home: OwnedFd,
}

impl Drop for Entered {
    fn drop(&mut self) {
        setns(self.home.as_fd(), CloneFlags::CLONE_NEWNET)
            .expect("setns back into the test's own network namespace");
    }
}

fn run_ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Deletes namespaces of earlier test processes that died without cleaning up (SIGKILL).
fn sweep_stale() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let Ok(dir) = std::fs::read_dir("/var/run/netns") else {
            return;
        };
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix(PREFIX)
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = run_ip(&["netns", "del", &name]);
            }
        }
    });
}

/// How the bridge mistreats packets, per direction.
#[derive(Clone, Copy, Debug)]
pub struct Impairment {
    /// Every packet waits at least this long.
    pub delay: Duration,
    /// Plus a uniform random extra of up to this; packets overtake each other when it exceeds
    /// their spacing, which reorders them.
    pub jitter: Duration,
    /// Probability that a packet is dropped.
    pub loss: f64,
    pub seed: u64,
}

impl Impairment {
    /// Every packet dropped: a black hole.
    pub fn blackhole() -> Self {
        Self {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 1.0,
            seed: 0,
        }
    }
}

/// What the bridge did, both directions together.
#[derive(Debug, Default)]
pub struct BridgeStats {
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
    /// Packets sent out after a packet that arrived later than them.
    pub reordered: AtomicU64,
}

/// Two namespaces joined by a link; `a` has [`Link::A_ADDR`], `b` has [`Link::B_ADDR`].
pub struct Link {
    // Field order is drop order: the bridge threads stop before the TUN devices' namespaces go.
    bridge: Option<Bridge>,
    pub a: Netns,
    pub b: Netns,
}

impl Link {
    /// The forwarder's side.
    pub const A_ADDR: &'static str = "198.18.0.1";
    /// The upstream's side.
    pub const B_ADDR: &'static str = "198.18.0.2";

    /// Two namespaces joined by a veth pair.
    pub fn veth() -> Self {
        let (a, b) = (Netns::new(), Netns::new());
        a.ip(&[
            "link", "add", "rfa", "type", "veth", "peer", "name", "rfb", "netns", &b.name,
        ]);
        a.ip(&["addr", "add", &format!("{}/24", Self::A_ADDR), "dev", "rfa"]);
        b.ip(&["addr", "add", &format!("{}/24", Self::B_ADDR), "dev", "rfb"]);
        a.ip(&["link", "set", "rfa", "up"]);
        b.ip(&["link", "set", "rfb", "up"]);
        Self { bridge: None, a, b }
    }

    /// Two namespaces, each with a TUN device (MTU `mtu`), joined by a bridge thread pair
    /// that applies `imp` to the packets both ways.
    pub fn bridged(imp: Impairment, mtu: u32) -> Self {
        let (a, b) = (Netns::new(), Netns::new());
        let ta = a.run(|| Tun::open("rft0"));
        let tb = b.run(|| Tun::open("rft0"));
        let mtu = mtu.to_string();
        for (ns, local, peer) in [
            (&a, Self::A_ADDR, Self::B_ADDR),
            (&b, Self::B_ADDR, Self::A_ADDR),
        ] {
            ns.ip(&["link", "set", "rft0", "mtu", &mtu]);
            ns.ip(&["addr", "add", local, "peer", peer, "dev", "rft0"]);
            ns.ip(&["link", "set", "rft0", "up"]);
        }
        let bridge = Bridge::spawn(ta, tb, imp);
        Self {
            bridge: Some(bridge),
            a,
            b,
        }
    }

    /// The bridge's counters (zeros for a veth link).
    pub fn stats(&self) -> (u64, u64, u64) {
        self.bridge.as_ref().map_or((0, 0, 0), |b| {
            (
                b.stats.forwarded.load(Ordering::Relaxed),
                b.stats.dropped.load(Ordering::Relaxed),
                b.stats.reordered.load(Ordering::Relaxed),
            )
        })
    }

    /// `B_ADDR:port`.
    pub fn b_addr(port: u16) -> SocketAddr {
        SocketAddr::new(Self::B_ADDR.parse::<IpAddr>().expect("address"), port)
    }
}

/// A TUN device (raw IP packets, no packet-info header), gone when the fd closes.
pub struct Tun {
    file: File,
}

/// `struct ifreq` as TUNSETIFF reads it: a name and the flags, padded to the kernel's size.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tun {
    /// Creates TUN device `name` in the calling thread's namespace.
    ///
    /// # Panics
    /// `/dev/net/tun` cannot be opened or TUNSETIFF fails.
    pub fn open(name: &str) -> Self {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/net/tun")
            .unwrap_or_else(|e| panic!("open /dev/net/tun: {e}"));
        let mut req = IfReq {
            name: [0; 16],
            flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
            _pad: [0; 22],
        };
        assert!(name.len() < 16, "interface name too long");
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `IfReq` lays out (40
        // bytes); the pointer is valid for the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &raw mut req) };
        assert!(rc == 0, "TUNSETIFF {name}: {}", io::Error::last_os_error());
        Self { file }
    }
}

/// Two threads moving packets between two TUN devices through a delay line.
struct Bridge {
    stop: Arc<AtomicBool>,
    stats: Arc<BridgeStats>,
    threads: Vec<JoinHandle<()>>,
}

impl Bridge {
    fn spawn(a: Tun, b: Tun, imp: Impairment) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(BridgeStats::default());
        let a2 = Tun {
            file: a.file.try_clone().expect("dup tun fd"),
        };
        let b2 = Tun {
            file: b.file.try_clone().expect("dup tun fd"),
        };
        let threads = [(a, b2, imp.seed), (b, a2, imp.seed ^ 0xb1d6e)]
            .into_iter()
            .map(|(from, to, seed)| {
                let (stop, stats) = (stop.clone(), stats.clone());
                let imp = Impairment { seed, ..imp };
                std::thread::Builder::new()
                    .name("test-tun-bridge".into())
                    .spawn(move || pump(from, to, imp, &stop, &stats))
                    .expect("spawn a bridge thread")
            })
            .collect();
        Self {
            stop,
            stats,
            threads,
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One direction of the bridge: read every packet `from` has, schedule each at arrival +
/// delay + random jitter (or drop it), write those due to `to`.
fn pump(mut from: Tun, mut to: Tun, imp: Impairment, stop: &AtomicBool, stats: &BridgeStats) {
    let mut rng = StdRng::seed_from_u64(imp.seed);
    // (due, arrival sequence number) → packet; popped in due order.
    let mut queue: BinaryHeap<Reverse<(Instant, u64, Vec<u8>)>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut last_sent_seq = 0u64;
    let mut buf = vec![0u8; 65536];
    let jitter_us = u64::try_from(imp.jitter.as_micros()).unwrap_or(u64::MAX);
    while !stop.load(Ordering::Acquire) {
        let now = Instant::now();
        let wait = queue
            .peek()
            .map_or(Duration::from_millis(20), |Reverse((due, _, _))| {
                due.saturating_duration_since(now)
            })
            .min(Duration::from_millis(20));
        let mut fds = [PollFd::new(from.file.as_fd(), PollFlags::POLLIN)];
        // Round a partial millisecond up, so a packet due soon is not busy-waited for.
        let ms = wait.as_micros().div_ceil(1000);
        let timeout = PollTimeout::from(u16::try_from(ms).unwrap_or(20));
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::Error::EINTR) => {}
            Err(e) => panic!("poll on a tun device: {e}"),
        }
        loop {
            match from.file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    seq += 1;
                    if rng.gen_bool(imp.loss.clamp(0.0, 1.0)) {
                        stats.dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let extra = if jitter_us == 0 {
                        0
                    } else {
                        rng.gen_range(0..=jitter_us)
                    };
                    let due = Instant::now() + imp.delay + Duration::from_micros(extra);
                    queue.push(Reverse((due, seq, buf[..n].to_vec())));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The device went away (namespace deleted): stop.
                Err(_) => return,
            }
        }
        let now = Instant::now();
        while queue.peek().is_some_and(|Reverse((due, _, _))| *due <= now) {
            let Reverse((_, s, pkt)) = queue.pop().expect("peeked");
            if s < last_sent_seq {
                stats.reordered.fetch_add(1, Ordering::Relaxed);
            }
            last_sent_seq = last_sent_seq.max(s);
            // A full device queue drops the packet, as a router would.
            if to.file.write(&pkt).is_ok() {
                stats.forwarded.fetch_add(1, Ordering::Relaxed);
            } else {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// TCP states (`/proc/net/tcp` names) of the sockets `pid` holds, also for a process inside
/// another namespace (see [`super::procfs::tcp_sockets`]).
pub fn tcp_states(pid: i32) -> Vec<&'static str> {
    super::procfs::tcp_sockets(pid)
        .into_iter()
        .map(|e| e.state)
        .collect()
}
