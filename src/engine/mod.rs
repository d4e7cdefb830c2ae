//! The engines that move bytes, side by side, and how one is chosen.
//!
//! - [`uring`]: thread-per-core io_uring workers (the product).
//! - [`tokio`]: a tokio multi-thread runtime (baseline, and the fallback where io_uring is
//!   unavailable).
//! - [`threaded`]: a thread per direction with blocking I/O (the `std` baseline).
//!
//! All three keep the same TCP semantics (half-close, reset passing, backpressure, timeouts,
//! graceful shutdown) and record the same [`crate::metrics`]. Listeners are bound here, before
//! any engine starts, so "port in use" is reported the same way whichever engine runs.

pub mod accept;
mod lease;
pub mod threaded;
pub mod tokio;
pub mod uring;

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use crate::config::{Config, EngineKind};
use crate::metrics::Metrics;
use crate::net::{self, ListenError};
use crate::session::Runtime;
use crate::shutdown::Shutdown;

/// Everything an engine needs besides the config.
pub struct RunContext {
    pub shutdown: Shutdown,
    pub metrics: Arc<Metrics>,
    /// The session pipeline's shared state: each rule's pool and admission gate.
    pub runtime: Arc<Runtime>,
}

/// Listeners bound for one run: `per_rule[r][p][w]` is worker `w`'s listener on port `p` of
/// rule `r` (a rule has one port group per port of its listen range; a single port, one).
///
/// A port group may hold fewer listeners than there are workers (sockets passed by systemd
/// or an older process: workers then share one, each accepting on its own descriptor of it)
/// or more (the extras are spread over the workers).
pub struct Listeners {
    pub per_rule: Vec<Vec<Vec<TcpListener>>>,
}

impl Listeners {
    /// Listening sockets over every rule, port and worker.
    pub fn count(&self) -> usize {
        self.per_rule.iter().flatten().map(Vec::len).sum()
    }
}

impl Listeners {
    /// Another descriptor of every listener (`dup`, close-on-exec): the same sockets, the
    /// same accept queues. Closing a duplicate never closes the socket while another
    /// descriptor of it is open — this is how a reload's generation takes over the sockets.
    ///
    /// # Errors
    /// `dup` failed (out of file descriptors).
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Self::dup(&self.per_rule)
    }

    /// Listeners of duplicates of `per_rule`'s descriptors (see [`Listeners::try_clone`]).
    ///
    /// # Errors
    /// `dup` failed (out of file descriptors).
    pub fn dup(per_rule: &[Vec<Vec<TcpListener>>]) -> std::io::Result<Self> {
        Ok(Self {
            per_rule: per_rule
                .iter()
                .map(|ports| {
                    ports
                        .iter()
                        .map(|ls| ls.iter().map(TcpListener::try_clone).collect())
                        .collect()
                })
                .collect::<std::io::Result<_>>()?,
        })
    }
}

/// Makes an engine's listener non-blocking and reads its port (a range's listeners are told
/// apart by it).
///
/// # Errors
/// Either call failed.
fn nonblocking_port(l: &TcpListener) -> Result<u16, EngineError> {
    l.set_nonblocking(true)
        .map_err(io("cannot set listener non-blocking"))?;
    Ok(l.local_addr()
        .map_err(io("cannot read a listener's address"))?
        .port())
}

/// An I/O error while setting an engine up, saying what failed.
fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> EngineError {
    move |source| EngineError::Io { what, source }
}

/// How many listeners per rule `engine` wants: one per worker for io_uring (each worker its
/// own `SO_REUSEPORT` socket and accept queue), one for the engines with one accept loop.
pub fn listeners_per_rule(config: &Config, engine: Resolved) -> usize {
    match engine {
        Resolved::Uring => config.worker_count(),
        Resolved::Tokio | Resolved::Std => 1,
    }
}

/// Why an engine could not run.
///
/// `Listen` and `UringUnavailable` already carry their cause in their text, so they do not
/// expose it again as an error `source`: `main` prints the whole chain (`{:#}`), and a source
/// would repeat the message on the one error line.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Listen(ListenError),
    #[error("io_uring engine unavailable: {0}")]
    UringUnavailable(uring::Unavailable),
    #[error(
        "the rules need {needed} listening sockets ({ports} ports × {per_port} per port), each held twice (by the engine, and by the control plane for reloads and upgrades), with room for as many again during a reload and for as many connections, but the open-files limit is {nofile} with {open} already open: raise it (ulimit -n, LimitNOFILE= in a systemd unit), or use fewer workers or shorter port ranges"
    )]
    TooManyListeners {
        needed: usize,
        ports: usize,
        per_port: usize,
        nofile: u64,
        open: usize,
    },
    #[error(
        "a reload would open {opening} descriptors (new listening sockets and the new generation's duplicates) and keep {room} free for connections, but the open-files limit is {nofile} with {open} already open: raise it (ulimit -n, LimitNOFILE= in a systemd unit)"
    )]
    TooManyForReload {
        opening: usize,
        room: usize,
        nofile: u64,
        open: usize,
    },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
}

impl From<ListenError> for EngineError {
    fn from(e: ListenError) -> Self {
        Self::Listen(e)
    }
}

impl From<uring::Unavailable> for EngineError {
    fn from(e: uring::Unavailable) -> Self {
        Self::UringUnavailable(e)
    }
}

/// The engine that will actually run, after `auto` is resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolved {
    Uring,
    Tokio,
    Std,
}

impl Resolved {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Uring => "uring",
            Self::Tokio => "tokio",
            Self::Std => "std",
        }
    }
}

/// Resolves `engine = "auto"`: io_uring if a ring with every needed opcode can be set up,
/// otherwise tokio with one warning that says why and how to enable io_uring.
///
/// # Errors
/// `engine = "uring"` was asked for explicitly and io_uring is unavailable.
pub fn resolve(kind: EngineKind) -> Result<Resolved, EngineError> {
    match kind {
        EngineKind::Std => Ok(Resolved::Std),
        EngineKind::Tokio => Ok(Resolved::Tokio),
        EngineKind::Uring => {
            uring::probe()?;
            Ok(Resolved::Uring)
        }
        EngineKind::Auto => match uring::probe() {
            Ok(()) => Ok(Resolved::Uring),
            Err(why) => {
                tracing::warn!("io_uring unavailable, falling back to the tokio engine: {why}");
                Ok(Resolved::Tokio)
            }
        },
    }
}

/// Binds the listeners of every rule, for every port of its range: one per worker for the
/// engines with several accept loops, sharing the port through `SO_REUSEPORT`.
///
/// # Errors
/// The listeners would not fit the open-files limit (checked first, so a long range fails
/// with one line saying what to raise, not with EMFILE on some port), or the first address
/// that cannot be bound.
pub fn bind(config: &Config, per_rule: usize) -> Result<Listeners, EngineError> {
    let ports: usize = config
        .rules
        .iter()
        .map(|r| usize::from(r.listen.count))
        .sum();
    check_listener_fds(ports, per_rule, open_fds(), nofile())?;
    let mut out = Vec::with_capacity(config.rules.len());
    for rule in &config.rules {
        let mut groups = Vec::with_capacity(usize::from(rule.listen.count));
        for addr in rule.listen.addrs() {
            groups.push(net::bind_listeners_mptcp(addr, per_rule, rule.mptcp)?);
        }
        out.push(groups);
    }
    Ok(Listeners { per_rule: out })
}

/// Refuses, before anything is bound, `ports × per_port` listeners that would not fit the
/// open-files limit (see [`bind`]); `inherited` of them are open already (passed by systemd
/// or an older process) and so are not counted again among the open descriptors.
///
/// # Errors
/// [`EngineError::TooManyListeners`], saying what to raise.
pub fn ensure_listener_fds(
    ports: usize,
    per_port: usize,
    inherited: usize,
) -> Result<(), EngineError> {
    check_listener_fds(
        ports,
        per_port,
        open_fds().saturating_sub(inherited),
        nofile(),
    )
}

/// Refuses a reload that would open `opening` descriptors unless they fit under the soft
/// open-files limit beside what is open and [`uring::FD_SLACK`], with `room` more left for
/// connections.
///
/// # Errors
/// [`EngineError::TooManyForReload`], saying what to raise.
pub fn ensure_fds(opening: usize, room: usize) -> Result<(), EngineError> {
    let (open, nofile) = (open_fds(), nofile());
    let want = open
        .saturating_add(uring::FD_SLACK)
        .saturating_add(opening)
        .saturating_add(room);
    if u64::try_from(want).unwrap_or(u64::MAX) > nofile {
        return Err(EngineError::TooManyForReload {
            opening,
            room,
            nofile,
            open,
        });
    }
    Ok(())
}

/// Descriptors this process has open now.
fn open_fds() -> usize {
    // The directory handle itself is one of the entries.
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count().saturating_sub(1))
}

/// The soft open-files limit.
fn nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit};
    getrlimit(Resource::RLIMIT_NOFILE).map_or(u64::MAX, |(soft, _)| soft)
}

/// Whether `ports × per_port` listeners fit under `nofile` beside `open` and
/// [`uring::FD_SLACK`]: what they really hold — each socket twice, once by the engine serving
/// it and once by the control plane that hands it to the next generation or process — plus
/// room for a reload (the next generation's duplicates, while the old one still holds its
/// own) and at least as many fds again for connections.
fn check_listener_fds(
    ports: usize,
    per_port: usize,
    open: usize,
    nofile: u64,
) -> Result<(), EngineError> {
    let needed = ports.saturating_mul(per_port.max(1));
    let want = open
        .saturating_add(uring::FD_SLACK)
        .saturating_add(needed.saturating_mul(4));
    if u64::try_from(want).unwrap_or(u64::MAX) > nofile {
        return Err(EngineError::TooManyListeners {
            needed,
            ports,
            per_port: per_port.max(1),
            nofile,
            open,
        });
    }
    Ok(())
}

/// Runs the chosen engine until shutdown. `on_ready` is called once, with the engine that
/// actually runs and every rule's bound address, when it is ready to serve: listeners open
/// and every worker (ring, pools, runtime) set up — so a "listening" line means connections
/// are handled, not just queued.
///
/// Under `engine = "auto"` the choice covers every set-up step, not only the probe: if any
/// io_uring worker cannot set up (its ring, its pools), every worker stands down and the tokio
/// engine serves the same listeners (still open: nothing queued on them is refused), after one
/// warning naming the cause and the fix. Under `engine = "uring"` that is an error.
///
/// # Errors
/// Listener, ring setup or runtime start-up failures. Per-connection errors never end a run.
pub fn run(
    config: &Config,
    engine: Resolved,
    ctx: RunContext,
    on_ready: impl FnOnce(Resolved, &[(String, SocketAddr)]),
) -> Result<(), EngineError> {
    let listeners = bind(config, listeners_per_rule(config, engine))?;
    serve(config, engine, listeners, ctx, on_ready)
}

/// [`run`] on listeners bound (or inherited) by the caller, one entry of
/// `listeners.per_rule` per rule of `config`, each with at least one listener.
///
/// # Errors
/// See [`run`].
pub fn serve(
    config: &Config,
    engine: Resolved,
    listeners: Listeners,
    ctx: RunContext,
    on_ready: impl FnOnce(Resolved, &[(String, SocketAddr)]),
) -> Result<(), EngineError> {
    let addrs: Vec<(String, SocketAddr)> = config
        .rules
        .iter()
        .zip(&listeners.per_rule)
        .map(|(r, l)| {
            let first = l.first().and_then(|g| g.first());
            (
                r.name.clone(),
                first
                    .and_then(|l| l.local_addr().ok())
                    .unwrap_or(r.listen.addr),
            )
        })
        .collect();
    let ready = move |e: Resolved| on_ready(e, &addrs);
    match engine {
        Resolved::Uring => match uring::start(config, listeners, &ctx) {
            Ok(started) => {
                started.run(|| ready(Resolved::Uring));
                Ok(())
            }
            Err(failed) if config.engine == EngineKind::Auto => {
                tracing::warn!(
                    "io_uring unavailable, falling back to the tokio engine: {}",
                    failed.why
                );
                tokio::run(config, failed.listeners, ctx, || ready(Resolved::Tokio))
            }
            Err(failed) => Err(EngineError::UringUnavailable(failed.why)),
        },
        Resolved::Tokio => tokio::run(config, listeners, ctx, || ready(Resolved::Tokio)),
        Resolved::Std => threaded::run(listeners, ctx, || ready(Resolved::Std)),
    }
}
