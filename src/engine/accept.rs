//! What every engine does the same between the accept and the relay, and at the close, so
//! that the engines themselves only move bytes: accept errors and their back-off, the check
//! for a client that died in the listen queue, admission and the client socket's set-up,
//! the session's steps up to the relay (preamble, dial and failover, the preamble sent
//! upstream) and the close with RST or FIN.
//!
//! The steps are decided by [`crate::session::Session`]; [`open`] carries them out through a
//! [`Wire`], the few socket calls an engine provides. The tokio engine awaits it; the std
//! engine's wire blocks inside each call, so its future never waits and [`block_on`] polls it
//! once. The io_uring engine feeds the same session events from its completions.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use socket2::SockRef;

use crate::config::Rule;
use crate::metrics::{RuleMetrics, Shard, Tap, TapSession};
use crate::net::{self, ExhaustionLog};
use crate::session::step::End;
use crate::session::{Accepted, Closing, Cx, Recorder, Session, Step, proxy};
use crate::vocab::{CloseReason, Direction, PathKind, errno_of, first_byte_overdue};

/// Bytes asked for per preamble read: a PROXY header or a ClientHello takes one or a few.
const PREAMBLE_CHUNK: usize = 512;

/// An accept loop's view of its accepts' results: what to do after a failure, and whether
/// descriptors had run out (said once per while, see [`ExhaustionLog`]).
#[derive(Default)]
pub struct Accepts {
    exhausted: ExhaustionLog,
}

impl Accepts {
    /// The accepted socket, or how long to pause before accepting on this listener again
    /// (zero: at once, when ready). Out of descriptors, the connection stays in the listen
    /// queue (accept takes the fd first): nothing is rejected, the loop waits for
    /// descriptors to come back.
    ///
    /// # Errors
    /// The accept failed: the pause.
    pub fn judge<T>(&mut self, accepted: io::Result<T>, rule: &str) -> Result<T, Duration> {
        let e = match accepted {
            Ok(s) => {
                if self.exhausted.recovered() {
                    tracing::info!(rule = %rule, "accept: file descriptors available again");
                }
                return Ok(s);
            }
            Err(e) => e,
        };
        if e.kind() == io::ErrorKind::WouldBlock {
            Err(Duration::ZERO)
        } else if net::is_resource_exhaustion(&e) {
            if let Some(held_back) = self.exhausted.hit(Instant::now()) {
                tracing::warn!(rule = %rule, error = %e, held_back, "accept: out of file descriptors; backing off");
            }
            Err(net::ACCEPT_BACKOFF)
        } else if net::is_transient_accept_error(&e) {
            tracing::debug!(rule = %rule, error = %e, "accept: transient error");
            Err(Duration::ZERO)
        } else {
            tracing::error!(rule = %rule, error = %e, "accept failed; backing off");
            Err(net::ACCEPT_BACKOFF)
        }
    }
}

/// Most connections a worker holds unsettled (accepted, not yet relaying) or closing (waiting
/// for their ops) before it stops accepting until they drain.
pub const ACCEPT_BOUND_MAX: usize = 256;

/// One rule's share of an accept bound split over `rules` (each with its listeners: one, or
/// one per port of a range): an even split, but never below 32 (or the whole bound, if that
/// is smaller), so a rule among many still accepts in bursts. Each rule is bounded on its own
/// connections; its ports split its share (see `Listeners::fill`).
pub fn listener_share(bound: usize, rules: usize) -> usize {
    (bound / rules.max(1)).max(bound.min(32)).max(1)
}

/// How many connections of one rule an engine with `workers` workers and `rules` rules lets
/// be accepted and not yet settled (connected upstream, or disposed of): an accept loop
/// takes a place before each accept, so a flood of connections that reset at once is
/// accepted no faster than it is disposed of — the io_uring engine's pacing — and one rule
/// whose upstream hangs cannot stall another rule's accepts.
pub fn unsettled_per_rule(workers: usize, rules: usize) -> usize {
    listener_share(ACCEPT_BOUND_MAX * workers, rules)
}

/// Admits an accepted client socket and sets it up: its peer address (`getpeername`, which
/// fails for a client that reset or vanished while it waited in the listen queue — the one
/// check every engine makes), admission (a turned-away client is reset here; `None`), then
/// for a live client its TCP options and, when the rule sends a PROXY header, its local
/// address. Returns the session and its first step.
pub fn admit<R: Recorder>(
    client: &impl AsFd,
    cx: &mut Cx<'_, R>,
    port: u16,
    draining: bool,
) -> Option<(Session, Step)> {
    let sock = SockRef::from(client);
    let peer = sock.peer_addr().ok().and_then(|a| a.as_socket());
    let accepted = Accepted {
        peer,
        dead: peer.is_none(),
        port,
    };
    let now = Instant::now();
    let Ok(mut session) = Session::accept(cx, accepted, now, draining) else {
        net::set_reset_on_close(sock);
        return None;
    };
    let mut local = None;
    if !accepted.dead {
        if let Err(e) = net::apply_tcp_options(SockRef::from(client), &cx.rule.rule.tcp) {
            tracing::debug!(error = %e, "socket option on client socket failed");
        }
        if cx.rule.wants_local_addr() {
            local = sock.local_addr().ok().and_then(|a| a.as_socket());
        }
    }
    let step = session.start(cx, local, now);
    Some((session, step))
}

/// Closes a socket, with RST when `reset` (`SO_LINGER` 0), else with FIN.
pub fn close_socket(socket: impl AsFd, reset: bool) {
    if reset {
        net::set_reset_on_close(SockRef::from(&socket));
    }
    drop(socket);
}

/// Closes the session's sockets as `closing` says, then hands it the end (counted, its
/// places freed, its record written).
pub fn close<R: Recorder, S: AsFd>(
    session: Session,
    closing: Closing,
    cx: &Cx<'_, R>,
    client: S,
    upstream: Option<S>,
) {
    let reset = closing.resets();
    close_socket(client, reset);
    if let Some(u) = upstream {
        close_socket(u, reset);
    }
    session.close(closing, cx, Instant::now());
}

/// How one read of the client's preamble went.
#[derive(Debug)]
pub enum Read {
    /// This many bytes were read.
    Got(usize),
    /// The client closed or failed.
    Closed,
    /// The preamble's deadline passed.
    TimedOut,
}

/// One connect for [`Wire::connect`] to carry out.
pub struct Connecting {
    /// The upstream socket, made by [`net::upstream_socket`], not yet connected.
    pub socket: socket2::Socket,
    /// Where to.
    pub addr: SocketAddr,
    /// How long the connect may take (the rule's `connect_timeout`).
    pub timeout: Duration,
}

/// Why a connect attempt gave no upstream.
#[derive(Debug)]
pub enum Dialed {
    /// The socket could not be created: no connect was attempted.
    Socket(io::Error),
    /// The connect failed (or timed out).
    Failed(io::Error),
}

/// The socket calls [`open`] needs from an engine.
pub trait Wire {
    type Upstream: AsFd;

    /// Reads once from the client into `room`, by `deadline`.
    fn read(&self, room: &mut [u8], deadline: Instant) -> impl Future<Output = Read>;

    /// Connects the upstream socket [`open`] made (the rule's options and the session's
    /// origin already on it, see [`net::upstream_socket`]) within its timeout.
    fn connect(&self, to: Connecting) -> impl Future<Output = Result<Self::Upstream, Dialed>>;

    /// Writes all of `bytes` to the upstream.
    fn send(&self, up: &mut Self::Upstream, bytes: &[u8]) -> impl Future<Output = io::Result<()>>;

    /// Completes when the engine starts closing: a preamble read or a connect under way
    /// then ends the session as `shutdown`, and so does a failed connect.
    fn closing(&self) -> impl Future<Output = ()>;
}

/// `f`'s output, or `None` if `cut` completes first (looked at first).
pub async fn unless<T>(f: impl Future<Output = T>, cut: impl Future<Output = ()>) -> Option<T> {
    let (mut f, mut cut) = (pin!(f), pin!(cut));
    std::future::poll_fn(|cx| {
        if cut.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        f.as_mut().poll(cx).map(Some)
    })
    .await
}

/// The session's steps up to the relay, from its first: `Ok` with the connected upstream
/// and whether the client's first bytes already reached it ([`Step::Relay`]), or the end the
/// session came to before, with the upstream socket if one was connected.
///
/// # Errors
/// The session ends before the relay: close with the `Closing`.
pub async fn open<W: Wire, R: Recorder>(
    wire: &W,
    session: &mut Session,
    cx: &mut Cx<'_, R>,
    step: Step,
) -> Result<(W::Upstream, bool), (Closing, Option<W::Upstream>)> {
    let mut preamble = Vec::new();
    let step = read_preamble(wire, session, cx, step, &mut preamble).await;
    connect(wire, session, cx, step, &preamble).await
}

/// Carries out [`Step::ReadPreamble`] until the session asks for something else, which it
/// returns; `buf` holds what was read (a waiting client costs what it sent, no scratch
/// array). Its own call, so that an engine can wait for a slow preamble holding only this.
pub async fn read_preamble<W: Wire, R: Recorder>(
    wire: &W,
    session: &mut Session,
    cx: &mut Cx<'_, R>,
    mut step: Step,
    buf: &mut Vec<u8>,
) -> Step {
    while let Step::ReadPreamble { cap, deadline } = step {
        let start = buf.len();
        let chunk = PREAMBLE_CHUNK.min(cap.saturating_sub(start).max(1));
        // Exactly this much, not a doubling: a client dripping its preamble byte by byte
        // holds this buffer across every wait, so its size is what a slowloris costs.
        buf.reserve_exact(chunk);
        buf.resize(start + chunk, 0);
        let read = unless(wire.read(&mut buf[start..], deadline), wire.closing()).await;
        let got = match read {
            Some(Read::Got(n)) => n,
            Some(Read::Closed) => 0,
            Some(Read::TimedOut) => return session.on_preamble_failed(cx, true),
            None => return Step::Close(session.abort(cx, CloseReason::Shutdown)),
        };
        buf.truncate(start + got);
        step = if got == 0 {
            session.on_preamble_failed(cx, false)
        } else {
            session.on_preamble(cx, buf, Instant::now())
        };
    }
    step
}

/// The session's steps after its preamble (`preamble`: what [`read_preamble`] read): dial,
/// fail over, send the preamble upstream; see [`open`].
///
/// # Errors
/// The session ends before the relay: close with the `Closing`.
pub async fn connect<W: Wire, R: Recorder>(
    wire: &W,
    session: &mut Session,
    cx: &mut Cx<'_, R>,
    mut step: Step,
    preamble: &[u8],
) -> Result<(W::Upstream, bool), (Closing, Option<W::Upstream>)> {
    let mut upstream = None;
    let cut = |session: &mut Session, cx: &Cx<'_, R>| {
        Step::Close(session.abort(cx, CloseReason::Shutdown))
    };
    loop {
        step = match step {
            Step::Connect { addr, timeout } => {
                let origin = session.origin(cx.rule);
                let dialed = match net::upstream_socket(addr, &cx.rule.rule.tcp, origin) {
                    Ok(socket) => {
                        let to = Connecting {
                            socket,
                            addr,
                            timeout,
                        };
                        unless(wire.connect(to), wire.closing()).await
                    }
                    Err(e) => Some(Err(Dialed::Socket(e))),
                };
                match dialed {
                    Some(Ok(u)) => {
                        upstream = Some(u);
                        session.on_connected(cx, Instant::now())
                    }
                    Some(Err(Dialed::Socket(e))) => {
                        let next = session.on_socket_failed(cx, errno_of(&e), Instant::now());
                        if let Step::Close(c) = &next
                            && c.reason() == CloseReason::FdExhausted
                        {
                            tracing::warn!(rule = %cx.rule.rule.name, error = %e, "cannot create upstream socket; connection reset");
                        }
                        next
                    }
                    Some(Err(Dialed::Failed(e))) => {
                        match session.on_connect_failed(cx, errno_of(&e), Instant::now()) {
                            Step::Connect { .. } if now_or_never(wire.closing()).is_some() => {
                                cut(session, cx)
                            }
                            next => next,
                        }
                    }
                    None => cut(session, cx),
                }
            }
            Step::SendPreamble { early_from } => {
                let mut header = [0u8; proxy::V1_BUF_LEN];
                let n = session.upstream_header(cx.rule, &mut header);
                let early = preamble.get(early_from..).unwrap_or_default();
                let sent = match &mut upstream {
                    Some(u) => match wire.send(u, &header[..n]).await {
                        Ok(()) => wire.send(u, early).await,
                        Err(e) => Err(e),
                    },
                    None => Err(io::ErrorKind::NotConnected.into()),
                };
                match sent {
                    Ok(()) => session.on_sent(cx),
                    Err(e) => session.on_send_failed(errno_of(&e)),
                }
            }
            Step::ReadPreamble { .. } => Step::Close(session.abort(cx, CloseReason::Error)),
            Step::Relay { client_spoke } => {
                return match upstream {
                    Some(u) => Ok((u, client_spoke)),
                    None => Err((session.abort(cx, CloseReason::Error), None)),
                };
            }
            Step::Close(c) => return Err((c, upstream)),
        };
    }
}

/// `f`'s output if it is ready at once.
fn now_or_never<F: Future>(f: F) -> Option<F::Output> {
    match pin!(f).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}

/// An opened session's relay under way: its [`Activity`] and the rule's tap.
pub struct Relaying<'a> {
    pub activity: Activity,
    tap: Option<(&'a Tap, TapSession)>,
}

impl<'a> Relaying<'a> {
    /// The relay of `session` starts (see [`Step::Relay`] for `client_spoke`).
    pub fn start(rm: &'a RuleMetrics, session: &Session, client_spoke: bool) -> Self {
        let tap = session
            .upstream()
            .and_then(|up| rm.tap().map(|t| (t, t.open_session(session.client, up))));
        Self {
            activity: Activity::new(client_spoke),
            tap,
        }
    }

    /// The tap, for the directions to write to.
    pub fn tap(&self) -> Tapped<'_> {
        self.tap.as_ref().map(|(t, s)| (*t, s))
    }

    /// The relay ended with `reason`: closes the tap, the sockets, and records the session.
    pub fn end<R: Recorder, S: AsFd>(
        self,
        mut session: Session,
        cx: &Cx<'_, R>,
        reason: CloseReason,
        client: S,
        upstream: S,
    ) {
        if let Some((t, s)) = self.tap {
            t.close_session(s, reason);
        }
        let closing = session.on_relay_ended(End::copied(reason, self.activity.bytes()));
        close(session, closing, cx, client, Some(upstream));
    }
}

/// Runs a future whose awaits never wait — the std engine's [`Wire`], whose calls block
/// inside — to its end: one poll.
///
/// # Panics
/// The future waited after all (a wire that is not blocking).
pub fn block_on<F: Future>(f: F) -> F::Output {
    now_or_never(f).unwrap_or_else(|| unreachable!("a blocking wire never waits"))
}

/// A relay's bookkeeping, shared by its two directions (whichever threads run them) in the
/// tokio and std engines: bytes moved, the last activity (for `idle_timeout`) and when the
/// client's first bytes reached the upstream (for `first_byte_timeout`).
pub struct Activity {
    start: Instant,
    /// ms since `start` of the last read or write.
    last_ms: AtomicU64,
    /// ms since `start` plus 1 when the client's first bytes reached the upstream (0: not
    /// yet).
    first_sent_ms: AtomicU64,
    bytes: [AtomicU64; 2],
}

impl Activity {
    /// A relay starting now; `client_spoke`: the preamble already carried client bytes.
    pub fn new(client_spoke: bool) -> Self {
        let a = Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            first_sent_ms: AtomicU64::new(0),
            bytes: [AtomicU64::new(0), AtomicU64::new(0)],
        };
        if client_spoke {
            a.first_sent();
        }
        a
    }

    fn ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    fn first_sent(&self) {
        self.first_sent_ms.store(self.ms() + 1, Ordering::Relaxed);
    }

    /// `data` was read from `dir`'s source: the first-byte latency (once, `first_byte_since`
    /// holds the accept time until then), the tap, the activity clock.
    pub fn read(
        &self,
        shard: &Shard,
        dir: Direction,
        first_byte_since: &mut Option<Instant>,
        tap: Tapped<'_>,
        data: &[u8],
    ) {
        if let Some(t) = first_byte_since.take() {
            shard.first_byte(t.elapsed());
        }
        self.last_ms.store(self.ms(), Ordering::Relaxed);
        if let Some((t, s)) = tap {
            t.data(s, dir, data);
        }
    }

    /// `n` bytes of `dir` were written on (counted, copy path).
    pub fn moved(&self, shard: &Shard, dir: Direction, n: u64) {
        shard.bytes(dir, PathKind::Copy, n);
        let before = self.bytes[dir as usize].fetch_add(n, Ordering::Relaxed);
        if before == 0 && dir == Direction::ClientToUpstream {
            self.first_sent();
        }
        self.last_ms.store(self.ms(), Ordering::Relaxed);
    }

    /// Whether the relay must end now by `idle_timeout` or `first_byte_timeout` (`Err`,
    /// the idle one first), else when to look again (`None`: no timeout can fire until
    /// something moves). A client that has not spoken yet starts no first-byte clock (see
    /// [`first_byte_overdue`]): it is looked at again `first_byte_timeout` later.
    pub fn expiry(&self, rule: &Rule, now: Instant) -> Result<Option<Instant>, CloseReason> {
        let idle = rule.idle_timeout.map(|idle| {
            self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + idle
        });
        if idle.is_some_and(|t| now >= t) {
            return Err(CloseReason::IdleTimeout);
        }
        let since = self.since_first_sent();
        if first_byte_overdue(rule.first_byte_timeout(), since, self.upstream_spoke()) {
            return Err(CloseReason::FirstByteTimeout);
        }
        let first_byte = match (rule.first_byte_timeout(), self.upstream_spoke()) {
            (Some(limit), false) => Some(now + limit.saturating_sub(since.unwrap_or_default())),
            _ => None,
        };
        Ok(match (idle, first_byte) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    fn upstream_spoke(&self) -> bool {
        self.bytes[Direction::UpstreamToClient as usize].load(Ordering::Relaxed) > 0
    }

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

    /// Bytes moved `[client → upstream, upstream → client]`.
    pub fn bytes(&self) -> [u64; 2] {
        self.bytes.each_ref().map(|b| b.load(Ordering::Relaxed))
    }
}

/// A relay's tap, if its rule has one.
pub type Tapped<'a> = Option<(&'a Tap, &'a TapSession)>;
