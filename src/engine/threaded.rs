//! The `std` engine: blocking sockets, a thread per direction — the classic relay that every
//! other engine is compared with.
//!
//! Each direction runs a `std::io::copy`-style loop (read into a buffer, write it all out).
//! Blocking calls wake every [`TICK`] so a thread notices a reset on the other direction, an
//! idle timeout or a shutdown without needing another thread to close its socket under it.

use std::io::{self, Read, Write};
use std::net::{Shutdown as SockShutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use socket2::SockRef;

use super::{EngineError, Listeners, RunContext};
use crate::config::{Config, Rule};
use crate::metrics::{Direction, Metrics, PathKind, RejectReason, Shard, Tap, TapSession};
use crate::net;
use crate::session::outcome::{CloseReason, errno_of, first_byte_overdue};
use crate::session::{Dial, End, HeaderStep, RuleRuntime, Runtime, Session, proxy};
use crate::shutdown::{Phase, Shutdown};

/// How often a blocked read or write wakes to look at the connection's state.
const TICK: Duration = Duration::from_millis(100);
/// Bytes read per direction before writing them on.
const BUFFER_SIZE: usize = 16 << 10;
/// Stack of a connection thread: the relay loop needs little; keep 1000s of threads cheap.
const STACK_SIZE: usize = 256 << 10;

/// Runs the std engine until shutdown.
///
/// One accept thread serves every listener of every rule and port (an epoll set), so a rule
/// over a range of thousands of ports costs no thread per port; each connection then gets
/// its threads as before.
///
/// # Errors
/// A listener could not be set up or the accept thread could not start.
pub fn run(
    config: &Config,
    listeners: Listeners,
    ctx: RunContext,
    ready: impl FnOnce(),
) -> Result<(), EngineError> {
    let live = Arc::new(AtomicUsize::new(0));
    let _ = config;
    let io = |what| move |source| EngineError::Io { what, source };
    let mut all = Vec::with_capacity(listeners.count());
    for (idx, ports) in listeners.per_rule.into_iter().enumerate() {
        for l in ports.into_iter().flatten() {
            let port = super::nonblocking_port(&l)?;
            all.push(Accepting {
                listener: l,
                rule: idx,
                port,
            });
        }
    }
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
        .map_err(|e| io("cannot create the accept thread's epoll set")(e.into()))?;
    for (i, a) in all.iter().enumerate() {
        epoll
            .add(
                a.listener.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, i as u64),
            )
            .map_err(|e| io("cannot watch a listener")(e.into()))?;
    }
    let (runtime, metrics, shutdown, live2) = (
        ctx.runtime.clone(),
        ctx.metrics.clone(),
        ctx.shutdown.clone(),
        live.clone(),
    );
    let accept_thread = std::thread::Builder::new()
        .name("ringfwd-accept".into())
        .spawn(move || accept_loop(&epoll, &all, &runtime, &metrics, &shutdown, &live2))
        .map_err(io("cannot start the accept thread"))?;
    ready();
    let _ = accept_thread.join();
    // Draining: sessions finish by themselves, or end at Closing within a tick or two.
    while live.load(Ordering::Acquire) != 0 {
        if ctx.shutdown.wait_for(Phase::Closing, Some(TICK)) {
            let deadline = Instant::now() + 10 * TICK;
            while live.load(Ordering::Acquire) != 0 && Instant::now() < deadline {
                std::thread::sleep(TICK / 10);
            }
            break;
        }
    }
    Ok(())
}

/// One listening socket of the accept thread: the rule it serves and the port it is on.
struct Accepting {
    listener: TcpListener,
    rule: usize,
    port: u16,
}

/// Readiness events taken per `epoll_wait`: each ready listener is accepted from once per
/// round, so a busy port cannot starve the others.
const EVENTS_PER_WAIT: usize = 256;

fn accept_loop(
    epoll: &Epoll,
    all: &[Accepting],
    runtime: &Arc<Runtime>,
    metrics: &Arc<Metrics>,
    shutdown: &Shutdown,
    live: &Arc<AtomicUsize>,
) {
    let mut exhausted = net::ExhaustionLog::default();
    let mut events = vec![EpollEvent::empty(); EVENTS_PER_WAIT.min(all.len().max(1))];
    while shutdown.phase() == Phase::Running {
        let n = match epoll.wait(&mut events, EpollTimeout::from(100u16)) {
            Ok(n) => n,
            Err(nix::Error::EINTR) => continue,
            Err(e) => {
                tracing::error!(error = %e, "epoll_wait on the listeners failed");
                std::thread::sleep(net::ACCEPT_BACKOFF);
                continue;
            }
        };
        for ev in &events[..n] {
            let Some(a) = usize::try_from(ev.data()).ok().and_then(|i| all.get(i)) else {
                continue;
            };
            if !accept_one(a, runtime, metrics, shutdown, live, &mut exhausted) {
                // Out of descriptors: no listener can accept before some come back.
                break;
            }
        }
    }
}

/// Accepts one connection from `a` (if one is queued) and starts its thread. `false` when
/// the process is out of descriptors and the accept loop should back off.
fn accept_one(
    a: &Accepting,
    runtime: &Arc<Runtime>,
    metrics: &Arc<Metrics>,
    shutdown: &Shutdown,
    live: &Arc<AtomicUsize>,
    exhausted: &mut net::ExhaustionLog,
) -> bool {
    let rule_idx = a.rule;
    let rule = &runtime.rule(rule_idx).rule;
    match a.listener.accept() {
        Ok((stream, peer)) => {
            if exhausted.recovered() {
                tracing::info!(rule = %rule.name, "accept: file descriptors available again");
            }
            live.fetch_add(1, Ordering::AcqRel);
            let (runtime2, metrics2, live2, port) =
                (runtime.clone(), metrics.clone(), live.clone(), a.port);
            let shutdown2 = shutdown.clone();
            let spawned = std::thread::Builder::new()
                .name("ringfwd-conn".into())
                .stack_size(STACK_SIZE)
                .spawn(move || {
                    handle(
                        stream,
                        peer,
                        port,
                        runtime2.rule(rule_idx),
                        &metrics2,
                        &shutdown2,
                    );
                    live2.fetch_sub(1, Ordering::AcqRel);
                });
            if let Err(e) = spawned {
                // The closure (and the stream in it) was dropped: the client sees a close.
                live.fetch_sub(1, Ordering::AcqRel);
                tracing::warn!(rule = %rule.name, error = %e, "cannot start a connection thread; connection dropped");
                metrics
                    .rule(rule_idx)
                    .local()
                    .rejected(RejectReason::FdExhausted);
            }
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) if net::is_resource_exhaustion(&e) => {
            // The connection stays in the listen queue (accept takes the fd first):
            // nothing is rejected; wait for descriptors to come back.
            if let Some(held_back) = exhausted.hit(Instant::now()) {
                tracing::warn!(rule = %rule.name, error = %e, held_back, "accept: out of file descriptors; backing off");
            }
            std::thread::sleep(net::ACCEPT_BACKOFF);
            return false;
        }
        Err(e) if net::is_transient_accept_error(&e) => {}
        Err(e) => {
            tracing::error!(rule = %rule.name, error = %e, "accept failed; backing off");
            std::thread::sleep(net::ACCEPT_BACKOFF);
        }
    }
    true
}

/// What one connection's two threads share.
struct Shared {
    /// 0 while running, else the [`CloseReason`] code that ended the session.
    abort: AtomicU8,
    start: Instant,
    last_activity_ms: AtomicU64,
    bytes: [AtomicU64; 2],
    /// When the client's first bytes reached the upstream: ms since `start`, plus 1 (0: not
    /// yet), for `first_byte_timeout`.
    first_sent_ms: AtomicU64,
}

const REASONS: [CloseReason; 6] = [
    CloseReason::Eof,
    CloseReason::Reset,
    CloseReason::IdleTimeout,
    CloseReason::Shutdown,
    CloseReason::Error,
    CloseReason::FirstByteTimeout,
];

impl Shared {
    fn abort(&self, why: CloseReason) {
        let code = REASONS
            .iter()
            .position(|r| *r == why)
            .map_or(0, |p| p as u8 + 1);
        let _ = self
            .abort
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
    }

    fn aborted(&self) -> Option<CloseReason> {
        match self.abort.load(Ordering::Acquire) {
            0 => None,
            n => Some(REASONS[usize::from(n - 1)]),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_activity_ms.store(ms, Ordering::Relaxed);
    }

    fn first_sent(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.first_sent_ms.store(ms + 1, Ordering::Relaxed);
    }

    /// Called when a blocking call timed out: decides whether the session must end.
    fn check(&self, rule: &Rule, shutdown: &Shutdown) -> Option<CloseReason> {
        if let Some(r) = self.aborted() {
            return Some(r);
        }
        if shutdown.phase() >= Phase::Closing {
            self.abort(CloseReason::Shutdown);
        } else if let Some(idle) = rule.idle_timeout {
            let last = Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed));
            if self.start.elapsed() >= last + idle {
                self.abort(CloseReason::IdleTimeout);
            }
        }
        let first_sent = match self.first_sent_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(
                self.start
                    .elapsed()
                    .saturating_sub(Duration::from_millis(ms - 1)),
            ),
        };
        if first_byte_overdue(
            rule.first_byte_timeout(),
            first_sent,
            self.bytes[1].load(Ordering::Relaxed) > 0,
        ) {
            self.abort(CloseReason::FirstByteTimeout);
        }
        self.aborted()
    }
}

fn is_tick(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Reads the client's preamble when the rule requires one (a PROXY header, a ClientHello to
/// route on), within its timeout; returns the bytes after a PROXY header (the start of the
/// client's stream, a ClientHello included).
fn read_header(
    client: &TcpStream,
    session: &mut Session,
    rt: &RuleRuntime,
    shard: &Shard,
) -> Result<Vec<u8>, CloseReason> {
    if !session.awaits_header() {
        return Ok(Vec::new());
    }
    let (cap, timeout) = rt.header_limits();
    let deadline = session.accepted_at + timeout;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(session.header_failed(shard, true));
        }
        let _ = client.set_read_timeout(Some(left));
        let want = chunk.len().min(cap.saturating_sub(buf.len()).max(1));
        match (&*client).read(&mut chunk[..want]) {
            Ok(0) => return Err(session.header_failed(shard, false)),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if is_tick(&e) => continue,
            Err(_) => return Err(session.header_failed(shard, false)),
        }
        match session.feed_header(rt, shard, &buf, Instant::now()) {
            HeaderStep::NeedMore => {}
            HeaderStep::Ready { consumed } => return Ok(buf.split_off(consumed)),
            HeaderStep::Reject(why) => return Err(CloseReason::Rejected(why)),
        }
    }
}

/// Connects to the members the session picks until one answers or the attempts run out.
fn connect(
    session: &mut Session,
    rt: &RuleRuntime,
    shard: &Shard,
    shutdown: &Shutdown,
) -> Result<TcpStream, CloseReason> {
    loop {
        let addr = match rt.with_shared_picker(|p| session.dial(rt, p, Instant::now())) {
            Dial::Connect(addr) => addr,
            Dial::GiveUp(reason) => return Err(reason),
        };
        let socket = match net::upstream_socket(addr, &rt.rule.tcp, session.origin(rt)) {
            Ok(s) => s,
            Err(e) => match session.socket_failed(rt, shard, errno_of(&e), Instant::now()) {
                Some(reason) => return Err(reason),
                None => continue,
            },
        };
        match socket.connect_timeout(&addr.into(), rt.rule.connect_timeout) {
            Ok(()) => {
                session.connected(shard, Instant::now());
                return Ok(socket.into());
            }
            Err(e) => {
                session.connect_failed(rt, shard, errno_of(&e), Instant::now());
                if shutdown.phase() >= Phase::Closing {
                    return Err(CloseReason::Shutdown);
                }
            }
        }
    }
}

fn handle(
    client: TcpStream,
    peer: SocketAddr,
    port: u16,
    rt: &RuleRuntime,
    metrics: &Metrics,
    shutdown: &Shutdown,
) {
    let rule = &rt.rule;
    let rule_idx = rt.index;
    let rm = metrics.rule(rule_idx);
    let draining = shutdown.refuses_new();
    let Ok(mut session) = rt.admit(rm.local(), Some(peer), Instant::now(), draining) else {
        net::set_reset_on_close(SockRef::from(&client));
        return;
    };
    session.set_listen_port(rt, port);
    let accepted_at = session.accepted_at;
    if let Err(e) = net::apply_tcp_options(SockRef::from(&client), &rule.tcp) {
        tracing::debug!(error = %e, "socket option on client socket failed");
    }
    if rt.wants_local_addr() {
        session.set_local(client.local_addr().ok());
    }
    let preamble = read_header(&client, &mut session, rt, rm.local())
        .and_then(|early| connect(&mut session, rt, rm.local(), shutdown).map(|u| (u, early)));
    let (upstream, early) = match preamble {
        Ok(u) => u,
        Err(reason) => {
            net::set_reset_on_close(SockRef::from(&client));
            drop(client);
            let end = End {
                reason,
                bytes: [0, 0],
                path: "copy",
            };
            session.finish(rt, metrics, rm.local(), end, Instant::now());
            return;
        }
    };
    let upstream_addr = session.upstream().unwrap_or(peer);
    let tap = rm
        .tap()
        .map(|t| (t, t.open_session(session.client, upstream_addr)));
    let tap_ref = tap.as_ref().map(|(t, s)| (*t, s));

    let shared = Shared {
        abort: AtomicU8::new(0),
        start: Instant::now(),
        last_activity_ms: AtomicU64::new(0),
        bytes: [AtomicU64::new(0), AtomicU64::new(0)],
        first_sent_ms: AtomicU64::new(0),
    };
    // The PROXY header for the upstream, then what the client sent after its own header.
    let mut header = [0u8; proxy::V1_BUF_LEN];
    let n = session.upstream_header(rt, &mut header);
    if n > 0 || !early.is_empty() {
        let sent = (&upstream)
            .write_all(&header[..n])
            .and_then(|()| (&upstream).write_all(&early));
        if let Err(e) = sent {
            shared.abort(CloseReason::from_io_error(&e));
        } else if !early.is_empty() {
            rm.local().bytes(
                Direction::ClientToUpstream,
                PathKind::Copy,
                early.len() as u64,
            );
            shared.bytes[0].fetch_add(early.len() as u64, Ordering::Relaxed);
            shared.first_sent();
        }
    }
    let setup = (|| -> io::Result<(TcpStream, TcpStream)> {
        for s in [&client, &upstream] {
            s.set_read_timeout(Some(TICK))?;
            s.set_write_timeout(Some(TICK))?;
        }
        Ok((client.try_clone()?, upstream.try_clone()?))
    })();
    let reason = match setup {
        Err(e) => {
            tracing::warn!(rule = %rule.name, error = %e, "cannot set up relay");
            CloseReason::Error
        }
        Ok((client2, upstream2)) => {
            let (shared_ref, metrics_ref) = (&shared, metrics);
            std::thread::scope(|s| {
                let spawned = std::thread::Builder::new()
                    .stack_size(STACK_SIZE)
                    .spawn_scoped(s, move || {
                        pump(
                            &upstream2,
                            &client2,
                            Direction::UpstreamToClient,
                            rule,
                            rule_idx,
                            metrics_ref,
                            shared_ref,
                            shutdown,
                            Some(accepted_at),
                            tap_ref,
                        );
                    });
                if spawned.is_err() {
                    shared.abort(CloseReason::Error);
                }
                pump(
                    &client,
                    &upstream,
                    Direction::ClientToUpstream,
                    rule,
                    rule_idx,
                    metrics,
                    &shared,
                    shutdown,
                    None,
                    tap_ref,
                );
            });
            shared.aborted().unwrap_or(CloseReason::Eof)
        }
    };
    if reason.resets() {
        net::set_reset_on_close(SockRef::from(&client));
        net::set_reset_on_close(SockRef::from(&upstream));
    }
    drop(client);
    drop(upstream);
    if let Some((t, s)) = tap {
        t.close_session(s, reason);
    }
    let end = End {
        reason,
        bytes: [
            shared.bytes[0].load(Ordering::Relaxed),
            shared.bytes[1].load(Ordering::Relaxed),
        ],
        path: "copy",
    };
    session.finish(rt, metrics, rm.local(), end, Instant::now());
}

/// Moves one direction until end of stream (then half-closes `dst`) or until the session is
/// aborted by either direction, an idle timeout or shutdown.
#[allow(clippy::too_many_arguments)]
fn pump(
    mut src: &TcpStream,
    mut dst: &TcpStream,
    dir: Direction,
    rule: &Rule,
    rule_idx: usize,
    metrics: &Metrics,
    shared: &Shared,
    shutdown: &Shutdown,
    mut first_byte_since: Option<Instant>,
    tap: Option<(&Tap, &TapSession)>,
) {
    let mut buf = vec![0u8; BUFFER_SIZE];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => {
                let _ = dst.shutdown(SockShutdown::Write);
                return;
            }
            Ok(n) => n,
            Err(e) if is_tick(&e) => {
                if shared.check(rule, shutdown).is_some() {
                    return;
                }
                continue;
            }
            Err(e) => {
                shared.abort(CloseReason::from_io_error(&e));
                return;
            }
        };
        let read_done = Instant::now();
        let shard = metrics.rule(rule_idx).local();
        if let Some(t) = first_byte_since.take() {
            shard.first_byte(read_done - t);
        }
        shared.touch();
        if let Some((t, s)) = tap {
            t.data(s, dir, &buf[..n]);
        }
        let mut off = 0;
        while off < n {
            match dst.write(&buf[off..n]) {
                Ok(k) => {
                    off += k;
                    shard.bytes(dir, PathKind::Copy, k as u64);
                    let before = shared.bytes[dir as usize].fetch_add(k as u64, Ordering::Relaxed);
                    if before == 0 && dir == Direction::ClientToUpstream {
                        shared.first_sent();
                    }
                    shared.touch();
                }
                Err(e) if is_tick(&e) => {
                    // A slow reader on the other side: keep waiting, unless the session ended.
                    if shared.check(rule, shutdown).is_some() {
                        return;
                    }
                }
                Err(e) => {
                    shared.abort(CloseReason::from_io_error(&e));
                    return;
                }
            }
        }
        shard.transfer(dir, read_done.elapsed());
        if shared.aborted().is_some() {
            return;
        }
    }
}
