//! The tokio engine: a multi-thread runtime, one task per connection, the two directions
//! pumped concurrently inside it (the shape of `tokio::io::copy_bidirectional`, with the
//! reset, idle-timeout and metrics handling that function lacks).
//!
//! It is the baseline ringfwd is measured against and the fallback wherever io_uring is
//! unavailable, so it keeps every semantic of the other engines.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use socket2::SockRef;
use tokio::io::AsyncWriteExt;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};

use super::{EngineError, Listeners, RunContext};
use crate::config::{Config, Rule};
use crate::metrics::{Direction, Metrics, PathKind, Shard, Tap, TapSession};
use crate::net;
use crate::session::outcome::{CloseReason, errno_of, first_byte_overdue, is_fd_exhaustion};
use crate::session::{Dial, End, HeaderStep, RuleRuntime, Runtime, Session, proxy};
use crate::shutdown::Phase;

/// Bytes read per direction before writing them on (a [`Lease`]d buffer: held only while the
/// direction has bytes to move).
const BUFFER_SIZE: usize = 16 << 10;

/// Live connection count, with a wake-up when it reaches zero.
#[derive(Default)]
struct Live {
    count: AtomicUsize,
    idle: Notify,
}

struct LiveGuard(Arc<Live>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Runs the tokio engine until shutdown.
///
/// # Errors
/// The runtime could not be built or a listener could not be registered with it.
pub fn run(
    config: &Config,
    listeners: Listeners,
    ctx: RunContext,
    ready: impl FnOnce(),
) -> Result<(), EngineError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_count())
        .thread_name("ringfwd-tokio")
        .enable_all()
        .build()
        .map_err(|source| EngineError::Io {
            what: "cannot start the tokio runtime",
            source,
        })?;

    // Feed the shutdown phases into the runtime.
    let (phase_tx, phase_rx) = watch::channel(Phase::Running);
    {
        let s = ctx.shutdown.clone();
        std::thread::Builder::new()
            .name("ringfwd-phase".into())
            .spawn(move || {
                for p in [Phase::Draining, Phase::Closing] {
                    s.wait_for(p, None);
                    if phase_tx.send(p).is_err() {
                        return;
                    }
                }
            })
            .map_err(|source| EngineError::Io {
                what: "cannot start a thread",
                source,
            })?;
    }

    let live = Arc::new(Live::default());
    // Connections accepted and not yet connected upstream (or not yet disposed of): each
    // accept task waits for a permit of its rule before each accept, so a flood of
    // connections that reset at once is accepted no faster than it is disposed of, as in the
    // uring engine — and one rule whose upstream hangs cannot stall another rule's accepts.
    // A rule over a port range has one task per port (tasks, not threads), all drawing on
    // the rule's one semaphore; a task waits for its port to be readable before it takes a
    // permit, so idle ports hold none.
    let per_rule = super::uring::listener_share(
        super::uring::ACCEPT_BOUND_MAX * config.worker_count(),
        listeners.per_rule.len(),
    );
    rt.block_on(async {
        let mut accept_loops = Vec::new();
        for (idx, ports) in listeners.per_rule.into_iter().enumerate() {
            let unsettled = Arc::new(Semaphore::new(per_rule));
            for l in ports.into_iter().flatten() {
                let io = |what| move |source| EngineError::Io { what, source };
                let port = super::nonblocking_port(&l)?;
                // `AsyncFd::new` is deprecated for fds someone else may close under it; this
                // one owns its listener for its whole life, so the concern does not apply.
                #[allow(deprecated)]
                let l = AsyncFd::new(l).map_err(io("cannot register listener"))?;
                accept_loops.push(tokio::spawn(accept_loop(
                    l,
                    port,
                    ctx.runtime.clone(),
                    idx,
                    ctx.metrics.clone(),
                    phase_rx.clone(),
                    live.clone(),
                    unsettled.clone(),
                    ctx.shutdown.clone(),
                )));
            }
        }
        ready();
        for a in accept_loops {
            let _ = a.await;
        }
        // Draining: wait for live sessions; they end themselves at Closing.
        loop {
            let notified = live.idle.notified();
            if live.count.load(Ordering::Acquire) == 0 {
                break;
            }
            notified.await;
        }
        Ok::<(), EngineError>(())
    })?;
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

// One per listener, spawned once: the arguments are what the loop owns, not a hot call.
#[allow(clippy::too_many_arguments)]
async fn accept_loop(
    listener: AsyncFd<std::net::TcpListener>,
    port: u16,
    runtime: Arc<Runtime>,
    rule_idx: usize,
    metrics: Arc<Metrics>,
    mut phase: watch::Receiver<Phase>,
    live: Arc<Live>,
    unsettled: Arc<Semaphore>,
    stop: crate::shutdown::Shutdown,
) {
    let mut exhausted = net::ExhaustionLog::default();
    let rt = runtime.rule(rule_idx);
    let rule = &rt.rule;
    loop {
        let readable = tokio::select! {
            biased;
            _ = phase.wait_for(|p| *p >= Phase::Draining) => return,
            r = listener.readable() => r,
        };
        let mut ready = match readable {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(rule = %rule.name, error = %e, "waiting on a listener failed; backing off");
                tokio::time::sleep(net::ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let permit = tokio::select! {
            biased;
            _ = phase.wait_for(|p| *p >= Phase::Draining) => return,
            p = unsettled.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        // `Err` here: not readable after all (readiness cleared); wait again.
        let Ok(accepted) = ready.try_io(|l| {
            let (s, peer) = l.get_ref().accept()?;
            s.set_nonblocking(true)?;
            Ok((s, peer))
        }) else {
            continue;
        };
        drop(ready);
        let accepted = accepted.and_then(|(s, peer)| Ok((TcpStream::from_std(s)?, peer)));
        match accepted {
            Ok((stream, peer)) => {
                if exhausted.recovered() {
                    tracing::info!(rule = %rule.name, "accept: file descriptors available again");
                }
                let shard = metrics.rule(rule_idx).local();
                let draining = stop.refuses_new();
                let Ok(mut session) = rt.admit(shard, Some(peer), Instant::now(), draining) else {
                    net::set_reset_on_close(SockRef::from(&stream));
                    continue;
                };
                session.set_listen_port(rt, port);
                if let Ok(Some(_)) | Err(_) = stream.take_error() {
                    // The client reset while it waited in the listen queue: nothing to dial
                    // for; close it at once (a flood of these must cost no upstream connect).
                    net::set_reset_on_close(SockRef::from(&stream));
                    drop(stream);
                    let end = End {
                        reason: CloseReason::Reset,
                        bytes: [0, 0],
                        path: "copy",
                    };
                    session.finish(rt, &metrics, shard, end, Instant::now());
                    continue;
                }
                live.count.fetch_add(1, Ordering::AcqRel);
                let guard = LiveGuard(live.clone());
                let (runtime, metrics, phase) = (runtime.clone(), metrics.clone(), phase.clone());
                prepare(&stream, &mut session, rt);
                if session.awaits_header() {
                    // A client still sending its preamble holds one fd and the bytes it sent
                    // in a small task of its own (the relay's larger state comes only after),
                    // and no accept permit: a slowloris on the preamble must neither cost
                    // much memory nor stall accepts.
                    drop(permit);
                    tokio::spawn(async move {
                        let rt = runtime.rule(rule_idx);
                        let read = preamble(&stream, session, rt, &metrics, phase.clone()).await;
                        let Some((session, early)) = read else {
                            drop(guard);
                            return;
                        };
                        tokio::spawn(async move {
                            let rt = runtime.rule(rule_idx);
                            handle(stream, session, rt, &metrics, phase, None, early).await;
                            drop(guard);
                        });
                    });
                } else {
                    tokio::spawn(async move {
                        let rt = runtime.rule(rule_idx);
                        handle(
                            stream,
                            session,
                            rt,
                            &metrics,
                            phase,
                            Some(permit),
                            Vec::new(),
                        )
                        .await;
                        drop(guard);
                    });
                }
            }
            Err(e) if net::is_resource_exhaustion(&e) => {
                // The connection stays in the listen queue (accept takes the fd first):
                // nothing is rejected; wait for descriptors to come back.
                if let Some(held_back) = exhausted.hit(Instant::now()) {
                    tracing::warn!(rule = %rule.name, error = %e, held_back, "accept: out of file descriptors; backing off");
                }
                tokio::time::sleep(net::ACCEPT_BACKOFF).await;
            }
            Err(e) if net::is_transient_accept_error(&e) => {
                tracing::debug!(rule = %rule.name, error = %e, "accept: transient error");
            }
            Err(e) => {
                tracing::error!(rule = %rule.name, error = %e, "accept failed; backing off");
                tokio::time::sleep(net::ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Socket options and the session's local address, before anything is read.
fn prepare(client: &TcpStream, session: &mut Session, rt: &RuleRuntime) {
    if let Err(e) = net::apply_tcp_options(SockRef::from(client), &rt.rule.tcp) {
        tracing::debug!(error = %e, "socket option on client socket failed");
    }
    if rt.wants_local_addr() {
        session.set_local(client.local_addr().ok());
    }
}

/// Reads the client's preamble (until shutdown closes in); the bytes after a PROXY header,
/// or `None` when the session ended here (reset, counted and logged).
async fn preamble(
    client: &TcpStream,
    mut session: Session,
    rt: &RuleRuntime,
    metrics: &Metrics,
    mut phase: watch::Receiver<Phase>,
) -> Option<(Session, Vec<u8>)> {
    let rm = metrics.rule(rt.index);
    let read = tokio::select! {
        biased;
        _ = phase.wait_for(|p| *p >= Phase::Closing) => Err(CloseReason::Shutdown),
        r = read_header(client, &mut session, rt, rm.local()) => r,
    };
    match read {
        Ok(early) => Some((session, early)),
        Err(reason) => {
            net::set_reset_on_close(SockRef::from(client));
            let end = End {
                reason,
                bytes: [0, 0],
                path: "copy",
            };
            session.finish(rt, metrics, rm.local(), end, Instant::now());
            None
        }
    }
}

/// Reads the client's preamble when the rule requires one (a PROXY header, a ClientHello to
/// route on), within its timeout; returns the bytes after a PROXY header (the start of the
/// client's stream, a ClientHello included).
async fn read_header(
    client: &TcpStream,
    session: &mut Session,
    rt: &RuleRuntime,
    shard: &Shard,
) -> Result<Vec<u8>, CloseReason> {
    if !session.awaits_header() {
        return Ok(Vec::new());
    }
    let (cap, timeout) = rt.header_limits();
    let deadline = tokio::time::Instant::from_std(session.accepted_at + timeout);
    // Read straight into the buffer's spare room: a waiting client costs what it sent plus
    // the task, no scratch array in the task's state (a slowloris holds thousands of these).
    let mut buf: Vec<u8> = Vec::with_capacity(256);
    loop {
        let want = 512.min(cap.saturating_sub(buf.len()).max(1));
        let start = buf.len();
        buf.resize(start + want, 0);
        let room = &mut buf[start..];
        let read = tokio::time::timeout_at(deadline, async {
            loop {
                client.readable().await?;
                match client.try_read(room) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    r => return r,
                }
            }
        })
        .await;
        match read {
            Err(_) => return Err(session.header_failed(shard, true)),
            Ok(Ok(0) | Err(_)) => return Err(session.header_failed(shard, false)),
            Ok(Ok(n)) => buf.truncate(start + n),
        }
        match session.feed_header(rt, shard, &buf, Instant::now()) {
            HeaderStep::NeedMore => {}
            HeaderStep::Ready { consumed } => return Ok(buf.split_off(consumed)),
            HeaderStep::Reject(why) => return Err(CloseReason::Rejected(why)),
        }
    }
}

/// One connect attempt, bounded by the rule's connect timeout.
async fn connect_one(
    addr: SocketAddr,
    rule: &Rule,
    origin: net::Origin<'_>,
) -> io::Result<TcpStream> {
    let socket = net::upstream_socket(addr, &rule.tcp, origin)?;
    socket.set_nonblocking(true)?;
    let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
    match tokio::time::timeout(rule.connect_timeout, socket.connect(addr)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::from_raw_os_error(libc::ETIMEDOUT)),
    }
}

/// Connects to the members the session picks until one answers or the attempts run out.
async fn connect(
    session: &mut Session,
    rt: &RuleRuntime,
    shard: &Shard,
) -> Result<TcpStream, CloseReason> {
    loop {
        let addr = match rt.with_shared_picker(|p| session.dial(rt, p, Instant::now())) {
            Dial::Connect(addr) => addr,
            Dial::GiveUp(reason) => return Err(reason),
        };
        match connect_one(addr, &rt.rule, session.origin(rt)).await {
            Ok(s) => {
                session.connected(shard, Instant::now());
                return Ok(s);
            }
            // `socket(2)` itself failed: no connect was attempted.
            Err(e) if e.raw_os_error().is_some_and(is_fd_exhaustion) => {
                if let Some(reason) = session.socket_failed(rt, shard, errno_of(&e), Instant::now())
                {
                    return Err(reason);
                }
            }
            Err(e) => session.connect_failed(rt, shard, errno_of(&e), Instant::now()),
        }
    }
}

/// Connects and relays one session whose preamble, if any, was read (`early`: the client's
/// bytes read with it, sent upstream first). `unsettled` is the accept permit, held until
/// the upstream is connected.
async fn handle(
    client: TcpStream,
    mut session: Session,
    rt: &RuleRuntime,
    metrics: &Metrics,
    mut phase: watch::Receiver<Phase>,
    unsettled: Option<OwnedSemaphorePermit>,
    early: Vec<u8>,
) {
    let rule = &rt.rule;
    let rule_idx = rt.index;
    let accepted_at = session.accepted_at;
    let rm = metrics.rule(rule_idx);
    let upstream = tokio::select! {
        biased;
        _ = phase.wait_for(|p| *p >= Phase::Closing) => Err(CloseReason::Shutdown),
        r = connect(&mut session, rt, rm.local()) => r.map(|u| (u, early)),
    };
    // Settled (relaying) or about to be disposed of: the accept loops may take another.
    drop(unsettled);
    let (upstream, early) = match upstream {
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
    let upstream_addr = session
        .upstream()
        .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
    let tap = rm
        .tap()
        .map(|t| (t, t.open_session(session.client, upstream_addr)));

    let mut client = client;
    let mut upstream = upstream;
    let counters = Counters {
        bytes: [AtomicU64::new(0), AtomicU64::new(0)],
        last_activity_ms: AtomicU64::new(0),
        start: Instant::now(),
        first_sent_ms: AtomicU64::new(0),
    };
    // The PROXY header for the upstream, then what the client sent after its own header.
    let mut header = [0u8; proxy::V1_BUF_LEN];
    let n = session.upstream_header(rt, &mut header);
    let mut preamble_failed = None;
    if n > 0 || !early.is_empty() {
        let sent = async {
            upstream.write_all(&header[..n]).await?;
            upstream.write_all(&early).await
        };
        match sent.await {
            Ok(()) => {
                rm.local().bytes(
                    Direction::ClientToUpstream,
                    PathKind::Copy,
                    early.len() as u64,
                );
                counters.bytes[0].fetch_add(early.len() as u64, Ordering::Relaxed);
                if !early.is_empty() {
                    counters.first_sent();
                }
            }
            Err(e) => preamble_failed = Some(CloseReason::from_io_error(&e)),
        }
    }
    let reason = match preamble_failed {
        Some(reason) => reason,
        None => {
            relay(
                &mut client,
                &mut upstream,
                rule,
                rule_idx,
                metrics,
                &counters,
                accepted_at,
                &mut phase,
                tap.as_ref().map(|(t, s)| (*t, s)),
            )
            .await
        }
    };
    if let Some((t, s)) = tap {
        t.close_session(s, reason);
    }
    if reason.resets() {
        net::set_reset_on_close(SockRef::from(&client));
        net::set_reset_on_close(SockRef::from(&upstream));
    }
    drop(client);
    drop(upstream);
    let end = End {
        reason,
        bytes: [
            counters.bytes[0].load(Ordering::Relaxed),
            counters.bytes[1].load(Ordering::Relaxed),
        ],
        path: "copy",
    };
    session.finish(rt, metrics, rm.local(), end, Instant::now());
}

struct Counters {
    bytes: [AtomicU64; 2],
    last_activity_ms: AtomicU64,
    start: Instant,
    /// When the client's first bytes reached the upstream: ms since `start`, plus 1 (0: not
    /// yet), for `first_byte_timeout`.
    first_sent_ms: AtomicU64,
}

impl Counters {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_activity_ms.store(ms, Ordering::Relaxed);
    }

    fn first_sent(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.first_sent_ms.store(ms + 1, Ordering::Relaxed);
    }

    /// How long ago the client's first bytes reached the upstream, if they did.
    fn since_first_sent(&self) -> Option<Duration> {
        match self.first_sent_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(
                self.start
                    .elapsed()
                    .saturating_sub(Duration::from_millis(ms - 1)),
            ),
        }
    }

    fn idle_deadline(&self, idle: Duration) -> tokio::time::Instant {
        let last = Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed));
        tokio::time::Instant::from_std(self.start + last + idle)
    }
}

#[allow(clippy::too_many_arguments)]
async fn relay(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    rule: &Rule,
    rule_idx: usize,
    metrics: &Metrics,
    counters: &Counters,
    accepted_at: Instant,
    phase: &mut watch::Receiver<Phase>,
    tap: Option<(&Tap, &TapSession)>,
) -> CloseReason {
    let (mut cr, mut cw) = client.split();
    let (mut ur, mut uw) = upstream.split();
    let c2u = pump(
        &mut cr,
        &mut uw,
        Direction::ClientToUpstream,
        rule_idx,
        metrics,
        counters,
        None,
        tap,
    );
    let u2c = pump(
        &mut ur,
        &mut cw,
        Direction::UpstreamToClient,
        rule_idx,
        metrics,
        counters,
        Some(accepted_at),
        tap,
    );
    tokio::pin!(c2u, u2c);
    let (mut c2u_done, mut u2c_done) = (false, false);
    loop {
        let idle = async {
            match rule.idle_timeout {
                None => std::future::pending::<()>().await,
                Some(idle) => loop {
                    let deadline = counters.idle_deadline(idle);
                    if tokio::time::Instant::now() >= deadline {
                        return;
                    }
                    tokio::time::sleep_until(deadline).await;
                },
            }
        };
        let first_byte = async {
            let Some(limit) = rule.first_byte_timeout() else {
                return std::future::pending::<()>().await;
            };
            loop {
                let spoke = counters.bytes[1].load(Ordering::Relaxed) > 0;
                let since = counters.since_first_sent();
                if first_byte_overdue(Some(limit), since, spoke) {
                    return;
                }
                match (spoke, since) {
                    (true, _) => std::future::pending::<()>().await,
                    // The client has not spoken: look again in a while (its first bytes
                    // wake the select anyway, which makes this future anew).
                    (false, None) => tokio::time::sleep(limit).await,
                    (false, Some(since)) => tokio::time::sleep(limit.saturating_sub(since)).await,
                }
            }
        };
        tokio::select! {
            r = &mut c2u, if !c2u_done => match r {
                Ok(()) => c2u_done = true,
                Err(e) => return CloseReason::from_io_error(&e),
            },
            r = &mut u2c, if !u2c_done => match r {
                Ok(()) => u2c_done = true,
                Err(e) => return CloseReason::from_io_error(&e),
            },
            () = idle => return CloseReason::IdleTimeout,
            () = first_byte => return CloseReason::FirstByteTimeout,
            _ = phase.wait_for(|p| *p >= Phase::Closing) => return CloseReason::Shutdown,
        }
        if c2u_done && u2c_done {
            return CloseReason::Eof;
        }
    }
}

/// Moves one direction until end of stream, then half-closes the writer.
#[allow(clippy::too_many_arguments)]
async fn pump(
    r: &mut tokio::net::tcp::ReadHalf<'_>,
    w: &mut tokio::net::tcp::WriteHalf<'_>,
    dir: Direction,
    rule_idx: usize,
    metrics: &Metrics,
    counters: &Counters,
    mut first_byte_since: Option<Instant>,
    tap: Option<(&Tap, &TapSession)>,
) -> io::Result<()> {
    loop {
        // Idle: wait for bytes holding no buffer at all.
        r.readable().await?;
        let mut buf = Lease::take();
        loop {
            let n = match r.try_read(&mut buf) {
                Ok(0) => {
                    drop(buf);
                    return match w.shutdown().await {
                        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
                        other => other,
                    };
                }
                Ok(n) => n,
                // Drained (or a spurious wake-up): give the buffer back and wait again.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            };
            let read_done = Instant::now();
            let shard = metrics.rule(rule_idx).local();
            if let Some(t) = first_byte_since.take() {
                shard.first_byte(read_done - t);
            }
            counters.touch();
            if let Some((t, s)) = tap {
                t.data(s, dir, &buf[..n]);
            }
            w.write_all(&buf[..n]).await?;
            shard.transfer(dir, read_done.elapsed());
            shard.bytes(dir, PathKind::Copy, n as u64);
            let before = counters.bytes[dir as usize].fetch_add(n as u64, Ordering::Relaxed);
            if before == 0 && dir == Direction::ClientToUpstream {
                counters.first_sent();
            }
            counters.touch();
        }
    }
}

/// A copy buffer lent to one direction while it moves bytes, from a small per-thread pool:
/// an idle connection holds none (it waits for readability first), and a flowing one keeps
/// its buffer across reads until the socket is drained. Returned to the pool of whichever
/// thread drops it (tasks move between threads); each pool keeps at most [`POOL_KEEP`].
struct Lease(Option<Box<[u8]>>);

/// Buffers a thread's pool keeps for reuse; more are freed.
const POOL_KEEP: usize = 64;

thread_local! {
    static POOL: std::cell::RefCell<Vec<Box<[u8]>>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Lease {
    fn take() -> Self {
        let b = POOL
            .with(|p| p.borrow_mut().pop())
            .unwrap_or_else(|| vec![0u8; BUFFER_SIZE].into_boxed_slice());
        Self(Some(b))
    }
}

impl std::ops::Deref for Lease {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0.as_deref().unwrap_or(&[])
    }
}

impl std::ops::DerefMut for Lease {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().unwrap_or(&mut [])
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            // `try_with`: a lease dropped while the thread itself is exiting is just freed.
            let _ = POOL.try_with(|p| {
                let mut p = p.borrow_mut();
                if p.len() < POOL_KEEP {
                    p.push(b);
                }
            });
        }
    }
}
