//! The `std` engine: blocking sockets, a thread per direction — the classic relay that every
//! other engine is compared with.
//!
//! Each direction runs a `std::io::copy`-style loop (read into a buffer, write it all out).
//! Blocking calls wake every [`TICK`] so a thread notices a reset on the other direction, an
//! idle timeout or a shutdown without needing another thread to close its socket under it.
//! The session's steps up to the relay are [`accept::open`]'s, carried out through
//! [`StdWire`], whose calls block (so [`accept::block_on`] runs them); this file moves bytes.

use std::io::{self, Read as _, Write};
use std::net::{Shutdown as SockShutdown, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use super::accept::{self, Connecting, Dialed, Read, Relaying, Wire};
use super::{EngineError, Listeners, RunContext};
use crate::config::Rule;
use crate::metrics::{Metrics, RuleMetrics};
use crate::net;
use crate::session::{Cx, Runtime, Session, Step};
use crate::shutdown::{Phase, Shutdown};
use crate::vocab::{CloseReason, Direction};

/// How often a blocked read or write wakes to look at the connection's state.
const TICK: Duration = Duration::from_millis(100);
/// Bytes read per direction before writing them on.
const BUFFER_SIZE: usize = 16 << 10;
/// Stack of a connection thread: the relay loop needs little; keep 1000s of threads cheap.
const STACK_SIZE: usize = 256 << 10;
/// Readiness events taken per `epoll_wait`: each ready listener is accepted from once per
/// round, so a busy port cannot starve the others.
const EVENTS_PER_WAIT: usize = 256;

/// What the accept thread and every connection thread share.
struct Engine {
    runtime: Arc<Runtime>,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
    live: AtomicUsize,
}

/// One listening socket of the accept thread: the rule it serves and the port it is on.
struct Accepting {
    listener: TcpListener,
    rule: usize,
    port: u16,
}

/// Runs the std engine until shutdown.
///
/// One accept thread serves every listener of every rule and port (an epoll set), so a rule
/// over a range of thousands of ports costs no thread per port; each connection then gets
/// its threads as before.
///
/// # Errors
/// A listener could not be set up or the accept thread could not start.
pub fn run(listeners: Listeners, ctx: RunContext, ready: impl FnOnce()) -> Result<(), EngineError> {
    let io = super::io;
    let mut all = Vec::with_capacity(listeners.count());
    for (rule, ports) in listeners.per_rule.into_iter().enumerate() {
        for listener in ports.into_iter().flatten() {
            let port = super::nonblocking_port(&listener)?;
            all.push(Accepting {
                listener,
                rule,
                port,
            });
        }
    }
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
        .map_err(|e| io("cannot create the accept thread's epoll set")(e.into()))?;
    for (i, a) in all.iter().enumerate() {
        let ev = EpollEvent::new(EpollFlags::EPOLLIN, i as u64);
        epoll
            .add(a.listener.as_fd(), ev)
            .map_err(|e| io("cannot watch a listener")(e.into()))?;
    }
    let engine = Arc::new(Engine {
        runtime: ctx.runtime,
        metrics: ctx.metrics,
        shutdown: ctx.shutdown,
        live: AtomicUsize::new(0),
    });
    let e = engine.clone();
    let accept_thread = std::thread::Builder::new()
        .name("ringfwd-accept".into())
        .spawn(move || accept_loop(&epoll, &all, &e))
        .map_err(io("cannot start the accept thread"))?;
    ready();
    let _ = accept_thread.join();
    // Draining: sessions finish by themselves, or end at Closing within a tick or two.
    while engine.live.load(Ordering::Acquire) != 0 {
        if engine.shutdown.wait_for(Phase::Closing, Some(TICK)) {
            let deadline = Instant::now() + 10 * TICK;
            while engine.live.load(Ordering::Acquire) != 0 && Instant::now() < deadline {
                std::thread::sleep(TICK / 10);
            }
            break;
        }
    }
    Ok(())
}

fn accept_loop(epoll: &Epoll, all: &[Accepting], engine: &Arc<Engine>) {
    let mut accepts = accept::Accepts::default();
    let mut events = vec![EpollEvent::empty(); EVENTS_PER_WAIT.min(all.len().max(1))];
    while engine.shutdown.phase() == Phase::Running {
        crate::notify::beat();
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
            let name = &engine.runtime.rule(a.rule).rule.name;
            match accepts.judge(a.listener.accept(), name) {
                Ok((client, _)) => start(client, a, engine),
                // Out of descriptors: no listener can accept before some come back.
                Err(pause) if !pause.is_zero() => {
                    std::thread::sleep(pause);
                    break;
                }
                Err(_) => {}
            }
        }
    }
}

/// Admits a client accepted on `a` (here, as every engine does, before any thread is
/// started for it) and starts its connection thread.
fn start(client: TcpStream, a: &Accepting, engine: &Arc<Engine>) {
    let rt = engine.runtime.rule(a.rule);
    let sink = engine.metrics.local_sink(a.rule);
    let mut cx = Cx::shared(rt, &sink);
    let draining = engine.shutdown.refuses_new();
    let Some((session, step)) = accept::admit(&client, &mut cx, a.port, draining) else {
        return;
    };
    engine.live.fetch_add(1, Ordering::AcqRel);
    let conn = Conn {
        engine: engine.clone(),
        rule: a.rule,
        parts: Some((client, session)),
    };
    let spawned = std::thread::Builder::new()
        .name("ringfwd-conn".into())
        .stack_size(STACK_SIZE)
        .spawn(move || conn.serve(step));
    if let Err(e) = spawned {
        // The closure, and the connection in it, was dropped: closed as `fd_exhausted`.
        tracing::warn!(rule = %rt.rule.name, error = %e, "cannot start a connection thread; connection dropped");
    }
}

/// An admitted connection on its way to its thread, counted live until dropped. Should the
/// thread not start, dropping it ends the session as `fd_exhausted` (counted and recorded).
struct Conn {
    engine: Arc<Engine>,
    rule: usize,
    parts: Option<(TcpStream, Session)>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some((client, mut session)) = self.parts.take() {
            let rt = self.engine.runtime.rule(self.rule);
            let sink = self.engine.metrics.local_sink(self.rule);
            let cx = Cx::shared(rt, &sink);
            let closing = session.abort(&cx, CloseReason::FdExhausted);
            accept::close(session, closing, &cx, client, None);
        }
        self.engine.live.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Conn {
    /// The connection thread: the session's steps up to the relay, the relay, the close.
    fn serve(mut self, step: Step) {
        let Some((client, mut session)) = self.parts.take() else {
            return;
        };
        let (e, rule) = (&*self.engine, self.rule);
        let (rt, sink) = (e.runtime.rule(rule), e.metrics.local_sink(rule));
        let mut cx = Cx::shared(rt, &sink);
        let wire = StdWire {
            client: &client,
            shutdown: &e.shutdown,
        };
        let opened = accept::block_on(accept::open(&wire, &mut session, &mut cx, step));
        let (upstream, client_spoke) = match opened {
            Ok(u) => u,
            Err((closing, upstream)) => {
                return accept::close(session, closing, &cx, client, upstream);
            }
        };
        let relaying = Relaying::start(e.metrics.rule(rule), &session, client_spoke);
        let relay = Relay {
            rule: &rt.rule,
            rm: e.metrics.rule(rule),
            relaying: &relaying,
            shutdown: &e.shutdown,
            abort: OnceLock::new(),
        };
        let reason = relay.run(&client, &upstream, session.accepted_at);
        relaying.end(session, &cx, reason, client, upstream);
    }
}

/// The std engine's socket calls for [`accept::open`]: each blocks until it is done.
struct StdWire<'a> {
    client: &'a TcpStream,
    shutdown: &'a Shutdown,
}

impl Wire for StdWire<'_> {
    type Upstream = TcpStream;

    async fn read(&self, room: &mut [u8], deadline: Instant) -> Read {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Read::TimedOut;
            }
            let _ = self.client.set_read_timeout(Some(left));
            match (&*self.client).read(room) {
                Ok(0) => return Read::Closed,
                Ok(n) => return Read::Got(n),
                Err(e) if is_tick(&e) => {}
                Err(_) => return Read::Closed,
            }
        }
    }

    async fn connect(&self, to: Connecting) -> Result<TcpStream, Dialed> {
        match to.socket.connect_timeout(&to.addr.into(), to.timeout) {
            Ok(()) => Ok(to.socket.into()),
            Err(e) => Err(Dialed::Failed(e)),
        }
    }

    async fn send(&self, up: &mut TcpStream, bytes: &[u8]) -> io::Result<()> {
        up.write_all(bytes)
    }

    async fn closing(&self) {
        if self.shutdown.phase() < Phase::Closing {
            // Never ready while running: a blocking call runs to its end, then this is
            // looked at again.
            std::future::pending::<()>().await;
        }
    }
}

fn is_tick(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// One relay's state, shared by its two direction threads.
struct Relay<'a> {
    rule: &'a Rule,
    rm: &'a RuleMetrics,
    relaying: &'a Relaying<'a>,
    shutdown: &'a Shutdown,
    /// What ended the session: set once, by whichever direction saw it first.
    abort: OnceLock<CloseReason>,
}

impl Relay<'_> {
    /// Moves both directions (upstream to client on a thread of its own) until both ended
    /// or the session was aborted.
    fn run(&self, client: &TcpStream, upstream: &TcpStream, accepted_at: Instant) -> CloseReason {
        let setup = (|| -> io::Result<(TcpStream, TcpStream)> {
            for s in [client, upstream] {
                s.set_read_timeout(Some(TICK))?;
                s.set_write_timeout(Some(TICK))?;
            }
            Ok((client.try_clone()?, upstream.try_clone()?))
        })();
        let (client2, upstream2) = match setup {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(rule = %self.rule.name, error = %e, "cannot set up relay");
                return CloseReason::Error;
            }
        };
        std::thread::scope(|s| {
            let u2c = Direction::UpstreamToClient;
            let spawned = std::thread::Builder::new()
                .stack_size(STACK_SIZE)
                .spawn_scoped(s, move || {
                    self.pump(&upstream2, &client2, u2c, Some(accepted_at))
                });
            if spawned.is_err() {
                self.abort(CloseReason::Error);
            }
            self.pump(client, upstream, Direction::ClientToUpstream, None);
        });
        self.aborted().unwrap_or(CloseReason::Eof)
    }

    fn abort(&self, why: CloseReason) {
        let _ = self.abort.set(why);
    }

    fn aborted(&self) -> Option<CloseReason> {
        self.abort.get().copied()
    }

    /// Called when a blocking call timed out: decides whether the session must end.
    fn check(&self) -> Option<CloseReason> {
        if let Some(r) = self.aborted() {
            return Some(r);
        }
        if self.shutdown.phase() >= Phase::Closing {
            self.abort(CloseReason::Shutdown);
        } else if let Err(reason) = self.relaying.activity.expiry(self.rule, Instant::now()) {
            self.abort(reason);
        }
        self.aborted()
    }

    /// Moves one direction until end of stream (then half-closes `dst`) or until the
    /// session is aborted by either direction, a timeout or shutdown.
    fn pump(
        &self,
        mut src: &TcpStream,
        mut dst: &TcpStream,
        dir: Direction,
        mut first_byte_since: Option<Instant>,
    ) {
        let mut buf = vec![0u8; BUFFER_SIZE];
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) => {
                    let _ = dst.shutdown(SockShutdown::Write);
                    return;
                }
                Ok(n) => n,
                Err(e) if is_tick(&e) && self.check().is_none() => continue,
                Err(e) => return self.abort(CloseReason::from_io_error(&e)),
            };
            let read_done = Instant::now();
            let shard = self.rm.local();
            let (a, tap) = (&self.relaying.activity, self.relaying.tap());
            a.read(shard, dir, &mut first_byte_since, tap, &buf[..n]);
            let mut off = 0;
            while off < n {
                match dst.write(&buf[off..n]) {
                    Ok(k) => {
                        off += k;
                        a.moved(shard, dir, k as u64);
                    }
                    // A slow reader on the other side: keep waiting, unless the session ended.
                    Err(e) if is_tick(&e) && self.check().is_none() => {}
                    Err(e) => return self.abort(CloseReason::from_io_error(&e)),
                }
            }
            shard.transfer(dir, read_done.elapsed());
            if self.aborted().is_some() {
                return;
            }
        }
    }
}
