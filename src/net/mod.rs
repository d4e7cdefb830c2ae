//! Socket plumbing shared by every engine: listeners, socket options, CPU discovery.
//!
//! Everything here is blocking-agnostic: it returns `socket2`/std sockets that each engine
//! then puts in the mode it needs (non-blocking for tokio and io_uring, blocking for std).

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use socket2::{Domain, SockRef, Socket, TcpKeepalive};

use crate::config::{Config, TcpOptions};

pub mod egress;

use crate::config::Egress;
pub use egress::EgressError;

/// Listen backlog for every listener (the kernel caps it at `net.core.somaxconn`).
pub const LISTEN_BACKLOG: i32 = 4096;

/// Why a listener could not be opened, worded for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen on {addr}: address already in use (another process holds the port)")]
    InUse { addr: SocketAddr },
    #[error(
        "cannot listen on {addr}: permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    )]
    Denied { addr: SocketAddr },
    #[error("cannot listen on {addr}: {why}")]
    Mptcp { addr: SocketAddr, why: String },
    #[error("cannot listen on {addr}: {source}")]
    Other { addr: SocketAddr, source: io::Error },
}

impl ListenError {
    fn new(addr: SocketAddr, source: io::Error) -> Self {
        match source.kind() {
            io::ErrorKind::AddrInUse => Self::InUse { addr },
            io::ErrorKind::PermissionDenied => Self::Denied { addr },
            _ => Self::Other { addr, source },
        }
    }
}

/// How a listener takes part in an `SO_REUSEPORT` group.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Share {
    /// No `SO_REUSEPORT`: the port is ours alone.
    No,
    /// The first of a group: bound *without* `SO_REUSEPORT`, so the bind fails if any socket
    /// already listens on the address — even another process's `SO_REUSEPORT` group, which a
    /// sharing bind would silently join — and only then marked for sharing, before `listen`,
    /// so that the rest of our group can join it.
    Founder,
    /// Joins the group a [`Share::Founder`] opened.
    Join,
}

/// Opens one TCP listener with `SO_REUSEADDR` and, when `reuseport`, `SO_REUSEPORT` so that
/// every worker can own a listener on the same port and the kernel spreads connections.
///
/// # Errors
/// [`ListenError`] naming the address and the likely cause.
pub fn bind_listener(addr: SocketAddr, reuseport: bool) -> Result<TcpListener, ListenError> {
    open_listener(addr, if reuseport { Share::Join } else { Share::No }, false)
}

fn open_listener(addr: SocketAddr, share: Share, mptcp: bool) -> Result<TcpListener, ListenError> {
    let wrap = |e| ListenError::new(addr, e);
    // An MPTCP listener serves plain TCP clients too: the kernel hands those over as
    // ordinary TCP sockets.
    let socket =
        egress::stream_socket(Domain::for_address(addr), mptcp, "mptcp").map_err(|e| match e {
            EgressError::Socket(e) => wrap(e),
            other => ListenError::Mptcp {
                addr,
                why: other.to_string(),
            },
        })?;
    socket.set_reuse_address(true).map_err(wrap)?;
    if share == Share::Join {
        socket.set_reuse_port(true).map_err(wrap)?;
    }
    if addr.is_ipv6() {
        // "[::]:80" means IPv6 only; "0.0.0.0:80" is a separate rule. No dual-stack surprises.
        socket.set_only_v6(true).map_err(wrap)?;
    }
    socket.bind(&addr.into()).map_err(wrap)?;
    if share == Share::Founder {
        // Linux reads SO_REUSEPORT at `listen` (to create the group) and at each later bind
        // (conflict check), not only at this socket's own bind.
        socket.set_reuse_port(true).map_err(wrap)?;
    }
    socket.listen(LISTEN_BACKLOG).map_err(wrap)?;
    Ok(socket.into())
}

/// Opens `count` listeners on `addr` sharing one port via `SO_REUSEPORT`. With port 0 the
/// first listener picks the port and the others join it.
///
/// An address on which any other socket already listens — including another forwarder's
/// `SO_REUSEPORT` listeners, which the kernel would otherwise let us join and split
/// connections with — fails with [`ListenError::InUse`]: the first listener is bound without
/// `SO_REUSEPORT` (see [`Share::Founder`]), so the check is the bind itself, with no window
/// between a probe and the real bind.
///
/// # Errors
/// See [`bind_listener`].
pub fn bind_listeners(addr: SocketAddr, count: usize) -> Result<Vec<TcpListener>, ListenError> {
    bind_listeners_mptcp(addr, count, false)
}

/// [`bind_listeners`], as MPTCP listeners when `mptcp` (a rule's `mptcp = true`): they take
/// MPTCP and plain TCP clients alike.
///
/// # Errors
/// See [`bind_listener`]; [`ListenError::Mptcp`] when the kernel refuses MPTCP.
pub fn bind_listeners_mptcp(
    addr: SocketAddr,
    count: usize,
    mptcp: bool,
) -> Result<Vec<TcpListener>, ListenError> {
    let mut out = Vec::with_capacity(count);
    let first = open_listener(addr, Share::Founder, mptcp)?;
    let actual = first.local_addr().map_err(|e| ListenError::new(addr, e))?;
    out.push(first);
    for _ in 1..count {
        out.push(open_listener(actual, Share::Join, mptcp)?);
    }
    Ok(out)
}

/// Applies a rule's options to an accepted client socket, `download_rate` included (what
/// this socket sends is what the client downloads). Failures are returned, but callers treat
/// them as warnings: a missing option never drops a connection.
///
/// # Errors
/// The first `setsockopt` that failed.
pub fn apply_tcp_options(sock: SockRef<'_>, opts: &TcpOptions) -> io::Result<()> {
    apply_options(&sock, opts, opts.download_rate)
}

/// The options of both sides, and `pacing` as the socket's `SO_MAX_PACING_RATE`.
fn apply_options(
    sock: &Socket,
    opts: &TcpOptions,
    pacing: Option<crate::config::ByteSize>,
) -> io::Result<()> {
    if let Some(rate) = pacing {
        set_max_pacing_rate(sock, rate.bytes())?;
    }
    if opts.nodelay {
        sock.set_tcp_nodelay(true)?;
    }
    if let Some(k) = opts.keepalive {
        let mut ka = TcpKeepalive::new();
        if let Some(idle) = k.idle {
            ka = ka.with_time(idle);
        }
        if let Some(interval) = k.interval {
            ka = ka.with_interval(interval);
        }
        if let Some(count) = k.count {
            ka = ka.with_retries(count);
        }
        sock.set_tcp_keepalive(&ka)?;
    }
    if let Some(l) = opts.linger {
        sock.set_linger(Some(l))?;
    }
    if let Some(b) = opts.recv_buffer {
        sock.set_recv_buffer_size(b.as_usize())?;
    }
    if let Some(b) = opts.send_buffer {
        sock.set_send_buffer_size(b.as_usize())?;
    }
    Ok(())
}

/// Caps what `sock` sends at `bytes_per_sec` (`SO_MAX_PACING_RATE`, the per-connection
/// `upload_rate` / `download_rate`). The kernel's TCP pacing spaces the segments out, so the
/// cap holds on every engine and on the copy and splice paths alike; and because the socket
/// then drains its send buffer at that rate, the relay's bounded buffer (or pipe) toward it
/// stays full, the relay stops reading the other side, and the sender meets a zero window —
/// backpressure, never a growing buffer.
///
/// # Errors
/// `setsockopt` failed.
#[allow(unsafe_code)]
fn set_max_pacing_rate(sock: &Socket, bytes_per_sec: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: `rate` outlives the call and its exact size is passed with its address; the
    // kernel copies the value in and keeps no pointer. A u64 is the size Linux reads for a
    // 64-bit rate (since 4.13).
    let rate: u64 = bytes_per_sec;
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MAX_PACING_RATE,
            (&raw const rate).cast(),
            std::mem::size_of::<u64>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Marks a socket so that its close sends RST instead of FIN (`SO_LINGER` with zero time).
/// Used to pass a reset from one side on to the other.
pub fn set_reset_on_close(sock: SockRef<'_>) {
    if let Err(e) = sock.set_linger(Some(Duration::ZERO)) {
        tracing::debug!(error = %e, "SO_LINGER 0 failed; peer will see FIN instead of RST");
    }
}

/// Where one session's upstream connection leaves from: its pool's [`Egress`] and its
/// client (the peer, or the source a trusted PROXY header named), which `transparent`
/// connects from.
#[derive(Clone, Copy, Debug)]
pub struct Origin<'a> {
    pub egress: &'a Egress,
    pub client: Option<SocketAddr>,
}

impl Origin<'static> {
    /// No egress options: the kernel picks address, route and device.
    pub const PLAIN: Self = Self {
        egress: &Egress::PLAIN,
        client: None,
    };
}

/// A fresh TCP (or MPTCP) socket for an upstream connect to `addr`, with the rule's TCP
/// options and the pool's egress options applied (bound, where `source` or `transparent`
/// asks, but not connected). Every engine makes its upstream sockets here.
///
/// # Errors
/// `socket(2)` failed (typically EMFILE), or an egress option was refused (logged at
/// debug with the key: the start-up probe already vetted the options, so this is the host
/// changing under the forwarder — a device removed — and it is counted as a connect failure
/// of the member, without a log line per connection).
pub fn upstream_socket(
    addr: SocketAddr,
    opts: &TcpOptions,
    origin: Origin<'_>,
) -> io::Result<Socket> {
    let socket = egress::open(addr, origin.egress, origin.client).map_err(|e| {
        if !matches!(e, EgressError::Socket(_)) {
            tracing::debug!(upstream = %addr, "{e}");
        }
        io::Error::from(e)
    })?;
    if let Err(e) = apply_options(&socket, opts, opts.upload_rate) {
        tracing::debug!(error = %e, "socket option on upstream socket failed");
    }
    Ok(socket)
}

/// True for the errors `accept(2)` returns when the process or system is out of file
/// descriptors or memory: the listener should back off briefly, not spin.
pub fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// True for `accept(2)` errors that concern only the one connection being accepted.
pub fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::EPROTO
                | libc::EPERM
                | libc::EINTR
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
        )
    )
}

/// How long an accept loop pauses after running out of file descriptors.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// True when a read/write error means the peer reset the connection.
pub fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// The CPUs this process may run on, in order (its affinity mask); never empty.
pub fn allowed_cpus() -> Vec<usize> {
    match nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) {
        Ok(set) => {
            let cpus: Vec<usize> = (0..nix::sched::CpuSet::count())
                .filter(|&c| set.is_set(c).unwrap_or(false))
                .collect();
            if cpus.is_empty() { vec![0] } else { cpus }
        }
        Err(_) => {
            (0..std::thread::available_parallelism().map_or(1, std::num::NonZero::get)).collect()
        }
    }
}

/// The number of CPUs this process may run on.
pub fn available_cpus() -> usize {
    allowed_cpus().len()
}

impl Config {
    /// The number of worker threads to run: configured, or the CPUs this process may use.
    /// Defined here rather than in `config`, since it asks the host: the config model stays
    /// free of the layers above it.
    pub fn worker_count(&self) -> usize {
        self.workers
            .map_or_else(available_cpus, std::num::NonZeroUsize::get)
    }
}

/// Pins the calling thread to one CPU. Failure is logged, not fatal.
pub fn pin_current_thread(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok()
        && let Err(e) = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
    {
        tracing::warn!(cpu, error = %e, "could not pin worker thread");
    }
}

/// Raises the soft open-files limit to the hard limit: every connection costs two fds (and
/// every pooled pipe two more), and the common soft default of 1024 would cap a forwarder at a
/// few hundred connections. Returns the limit now in force.
pub fn raise_nofile_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::debug!(error = %e, "cannot raise RLIMIT_NOFILE");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(_) => 0,
    }
}

/// How often an accept loop that stays out of file descriptors repeats its warning.
pub const EXHAUSTION_LOG_EVERY: Duration = Duration::from_secs(10);

/// Rate-limits an accept loop's "out of file descriptors" warning: the first of an episode is
/// logged, then at most one every [`EXHAUSTION_LOG_EVERY`] with how many were held back — a
/// loop backing off every 50 ms must not write 20 lines a second.
#[derive(Debug, Default)]
pub struct ExhaustionLog {
    last: Option<std::time::Instant>,
    held_back: u64,
}

impl ExhaustionLog {
    /// Records one exhaustion; `Some(n)` when it should be logged now (`n` were held back).
    pub fn hit(&mut self, now: std::time::Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.saturating_duration_since(t) < EXHAUSTION_LOG_EVERY => {
                self.held_back += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held_back))
            }
        }
    }

    /// An accept succeeded: the episode is over (the next exhaustion is logged at once).
    pub fn recovered(&mut self) -> bool {
        let was = self.last.is_some();
        self.last = None;
        self.held_back = 0;
        was
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_listener_group_does_not_join_a_foreign_reuseport_group() {
        // Another process's forwarder, simulated: one SO_REUSEPORT listener.
        let theirs = bind_listeners("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        let addr = theirs[0].local_addr().unwrap();
        match bind_listeners(addr, 2) {
            Err(ListenError::InUse { addr: a }) => assert_eq!(a, addr),
            other => panic!("expected InUse, got {other:?}"),
        }
        // Our own group still forms: every member listens on the same port.
        let ours = bind_listeners("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        let port = ours[0].local_addr().unwrap().port();
        assert!(ours.iter().all(|l| l.local_addr().unwrap().port() == port));
        // ... and it is one group: the kernel spreads connections over every member (60
        // connections leave one of 3 members empty with odds of (2/3)^60).
        let clients: Vec<_> = (0..60)
            .map(|_| std::net::TcpStream::connect(ours[0].local_addr().unwrap()).unwrap())
            .collect();
        for l in &ours {
            l.set_nonblocking(true).unwrap();
            assert!(
                l.accept().is_ok(),
                "a member of the group got no connection"
            );
        }
        drop(clients);
    }

    #[test]
    fn exhaustion_warnings_are_rate_limited_per_episode() {
        let mut log = ExhaustionLog::default();
        let t = Instant::now();
        assert_eq!(log.hit(t), Some(0));
        assert_eq!(log.hit(t + Duration::from_millis(50)), None);
        assert_eq!(log.hit(t + Duration::from_millis(100)), None);
        assert_eq!(log.hit(t + EXHAUSTION_LOG_EVERY), Some(2));
        assert!(log.recovered());
        assert!(!log.recovered());
        assert_eq!(log.hit(t + EXHAUSTION_LOG_EVERY), Some(0));
    }
}
