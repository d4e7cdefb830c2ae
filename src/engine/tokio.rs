//! The tokio engine: a multi-thread runtime, one task per connection, the two directions
//! pumped concurrently inside it (the shape of `tokio::io::copy_bidirectional`, with the
//! reset, idle-timeout and metrics handling that function lacks).
//!
//! It is the baseline ringfwd is measured against and the fallback wherever io_uring is
//! unavailable, so it keeps every semantic of the other engines: the session's steps up to
//! the relay are [`accept`]'s, carried out through the [`Wire`] of a [`Conn`]; this file
//! moves bytes.

use std::io;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use super::accept::{self, Connecting, Dialed, Read, Relaying, Wire};
use super::lease::Lease;
use super::{EngineError, Listeners, RunContext};
use crate::config::{Config, Rule};
use crate::metrics::{Metrics, RuleMetrics};
use crate::net;
use crate::session::{Cx, Runtime, Session, Step};
use crate::shutdown::{Phase, Shutdown};
use crate::vocab::{CloseReason, Direction};

/// What every task of the engine shares.
struct Engine {
    runtime: Arc<Runtime>,
    metrics: Arc<Metrics>,
    phase: watch::Receiver<Phase>,
    stop: Shutdown,
    /// One permit held by each live connection (of `u32::MAX`, more than there can be):
    /// draining waits until all came back.
    live: Arc<Semaphore>,
}

impl Engine {
    /// Completes once shutdown reached `phase`.
    async fn reached(&self, phase: Phase) {
        let _ = self.phase.clone().wait_for(|p| *p >= phase).await;
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
        .map_err(super::io("cannot start the tokio runtime"))?;
    // Feed the shutdown phases into the runtime.
    let (phase_tx, phase) = watch::channel(Phase::Running);
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
        .map_err(super::io("cannot start a thread"))?;
    let engine = Arc::new(Engine {
        runtime: ctx.runtime,
        metrics: ctx.metrics,
        phase,
        stop: ctx.shutdown,
        live: Arc::new(Semaphore::new(u32::MAX as usize)),
    });
    // Each accept task takes a permit of its rule before each accept (see
    // `accept::unsettled_per_rule`). A rule over a port range has one task per port (tasks,
    // not threads), all drawing on the rule's one semaphore; a task waits for its port to be
    // readable before it takes a permit, so idle ports hold none.
    let per_rule = accept::unsettled_per_rule(config.worker_count(), listeners.per_rule.len());
    rt.block_on(async {
        let mut accept_loops = Vec::new();
        for (idx, ports) in listeners.per_rule.into_iter().enumerate() {
            let unsettled = Arc::new(Semaphore::new(per_rule));
            for l in ports.into_iter().flatten() {
                let port = super::nonblocking_port(&l)?;
                // `AsyncFd::new` is deprecated for fds someone else may close under it; this
                // one owns its listener for its whole life, so the concern does not apply.
                #[allow(deprecated)]
                let l = AsyncFd::new(l).map_err(super::io("cannot register listener"))?;
                let (e, u) = (engine.clone(), unsettled.clone());
                accept_loops.push(tokio::spawn(accept_loop(l, port, idx, e, u)));
            }
        }
        tokio::spawn(crate::notify::tokio_ticker());
        ready();
        for a in accept_loops {
            let _ = a.await;
        }
        // Draining: wait for live sessions; they end themselves at Closing.
        let _ = engine.live.acquire_many(u32::MAX).await;
        Ok::<(), EngineError>(())
    })?;
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

async fn accept_loop(
    listener: AsyncFd<std::net::TcpListener>,
    port: u16,
    rule: usize,
    engine: Arc<Engine>,
    unsettled: Arc<Semaphore>,
) {
    let mut accepts = accept::Accepts::default();
    let rt = engine.runtime.rule(rule);
    let name = &rt.rule.name;
    let draining = || engine.reached(Phase::Draining);
    loop {
        let Some(readable) = accept::unless(listener.readable(), draining()).await else {
            return;
        };
        let Ok(mut ready) = readable.inspect_err(|e| {
            tracing::error!(rule = %name, error = %e, "waiting on a listener failed; backing off");
        }) else {
            tokio::time::sleep(net::ACCEPT_BACKOFF).await;
            continue;
        };
        let acquired = accept::unless(unsettled.clone().acquire_owned(), draining()).await;
        let Some(Ok(permit)) = acquired else {
            return;
        };
        // `Err` here: not readable after all (readiness cleared); wait again.
        let Ok(accepted) = ready.try_io(|l| {
            let (s, _) = l.get_ref().accept()?;
            s.set_nonblocking(true)?;
            Ok(s)
        }) else {
            continue;
        };
        let client = match accepts.judge(accepted.and_then(TcpStream::from_std), name) {
            Ok(s) => s,
            Err(pause) => {
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        let sink = engine.metrics.local_sink(rule);
        let mut cx = Cx::shared(rt, &sink);
        let draining = engine.stop.refuses_new();
        let Some((session, step)) = accept::admit(&client, &mut cx, port, draining) else {
            continue;
        };
        let conn = Conn {
            client,
            engine: engine.clone(),
            rule,
            _live: engine.live.clone().try_acquire_owned().ok(),
        };
        let task = Task {
            conn,
            session,
            preamble: Vec::new(),
        };
        if matches!(step, Step::ReadPreamble { .. }) {
            // A client still sending its preamble holds one fd and the bytes it sent in a
            // small task of its own (the connect's and the relay's larger state come only
            // after), and no accept permit: a slowloris on the preamble must neither cost
            // much memory nor stall accepts.
            drop(permit);
            tokio::spawn(task.read_preamble(step));
        } else {
            tokio::spawn(task.serve(step, Some(permit)));
        }
    }
}

/// One admitted connection: its socket, for the session's steps ([`Wire`]) and the relay.
struct Conn {
    client: TcpStream,
    engine: Arc<Engine>,
    rule: usize,
    /// Its place in [`Engine::live`].
    _live: Option<OwnedSemaphorePermit>,
}

/// A connection and its session, owned by its task(s).
struct Task {
    conn: Conn,
    session: Session,
    /// The preamble read, if any.
    preamble: Vec<u8>,
}

impl Task {
    /// Reads the client's preamble, then serves the session in a task of its own (or
    /// closes and records it when it ended there).
    async fn read_preamble(mut self, step: Step) {
        let (e, rule) = (self.conn.engine.clone(), self.conn.rule);
        let sink = e.metrics.local_sink(rule);
        let mut cx = Cx::shared(e.runtime.rule(rule), &sink);
        let (session, buf) = (&mut self.session, &mut self.preamble);
        match accept::read_preamble(&self.conn, session, &mut cx, step, buf).await {
            Step::Close(closing) => {
                accept::close(self.session, closing, &cx, self.conn.client, None);
            }
            step => drop(tokio::spawn(self.serve(step, None))),
        }
    }

    /// Connects (the accept permit `unsettled` held until then), relays, closes.
    async fn serve(mut self, step: Step, unsettled: Option<OwnedSemaphorePermit>) {
        let (e, rule) = (self.conn.engine.clone(), self.conn.rule);
        let sink = e.metrics.local_sink(rule);
        let mut cx = Cx::shared(e.runtime.rule(rule), &sink);
        let (session, preamble) = (&mut self.session, &self.preamble);
        let opened = accept::connect(&self.conn, session, &mut cx, step, preamble).await;
        // Settled (relaying) or about to be disposed of: the accept loops may take another.
        drop(unsettled);
        match opened {
            Ok((upstream, client_spoke)) => self.relay(upstream, client_spoke).await,
            Err((closing, upstream)) => {
                accept::close(self.session, closing, &cx, self.conn.client, upstream);
            }
        }
    }

    /// Relays until the session ends, then closes and records it.
    async fn relay(self, mut upstream: TcpStream, client_spoke: bool) {
        let Task {
            mut conn, session, ..
        } = self;
        let e = &conn.engine;
        let (rt, rm) = (e.runtime.rule(conn.rule), e.metrics.rule(conn.rule));
        let relaying = Relaying::start(rm, &session, client_spoke);
        let relay = Relay {
            rule: &rt.rule,
            rm,
            relaying: &relaying,
        };
        let at = session.accepted_at;
        let reason = relay.run(&mut conn.client, &mut upstream, at, e).await;
        let sink = e.metrics.local_sink(conn.rule);
        let cx = Cx::shared(rt, &sink);
        relaying.end(session, &cx, reason, conn.client, upstream);
    }
}

/// The tokio engine's socket calls for the session's steps.
impl Wire for Conn {
    type Upstream = TcpStream;

    async fn read(&self, room: &mut [u8], deadline: Instant) -> Read {
        let read = tokio::time::timeout_at(deadline.into(), async {
            loop {
                self.client.readable().await?;
                match self.client.try_read(room) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    r => return r,
                }
            }
        });
        match read.await {
            Err(_) => Read::TimedOut,
            Ok(Ok(0) | Err(_)) => Read::Closed,
            Ok(Ok(n)) => Read::Got(n),
        }
    }

    async fn connect(&self, to: Connecting) -> Result<TcpStream, Dialed> {
        to.socket.set_nonblocking(true).map_err(Dialed::Socket)?;
        let socket = tokio::net::TcpSocket::from_std_stream(to.socket.into());
        match tokio::time::timeout(to.timeout, socket.connect(to.addr)).await {
            Ok(r) => r.map_err(Dialed::Failed),
            Err(_) => Err(Dialed::Failed(io::ErrorKind::TimedOut.into())),
        }
    }

    async fn send(&self, up: &mut TcpStream, bytes: &[u8]) -> io::Result<()> {
        up.write_all(bytes).await
    }

    async fn closing(&self) {
        self.engine.reached(Phase::Closing).await;
    }
}

/// One relay's state, shared by its two directions.
struct Relay<'a> {
    rule: &'a Rule,
    rm: &'a RuleMetrics,
    relaying: &'a Relaying<'a>,
}

impl Relay<'_> {
    /// Moves both directions until both ended, one failed, a timeout or shutdown.
    async fn run(
        &self,
        client: &mut TcpStream,
        upstream: &mut TcpStream,
        at: Instant,
        engine: &Engine,
    ) -> CloseReason {
        let (mut cr, mut cw) = client.split();
        let (mut ur, mut uw) = upstream.split();
        let c2u = self.pump(&mut cr, &mut uw, Direction::ClientToUpstream, None);
        let u2c = self.pump(&mut ur, &mut cw, Direction::UpstreamToClient, Some(at));
        tokio::pin!(c2u, u2c);
        let (mut c2u_done, mut u2c_done) = (false, false);
        loop {
            tokio::select! {
                r = &mut c2u, if !c2u_done => match r {
                    Ok(()) => c2u_done = true,
                    Err(e) => return CloseReason::from_io_error(&e),
                },
                r = &mut u2c, if !u2c_done => match r {
                    Ok(()) => u2c_done = true,
                    Err(e) => return CloseReason::from_io_error(&e),
                },
                reason = self.expiry() => return reason,
                () = engine.reached(Phase::Closing) => return CloseReason::Shutdown,
            }
            if c2u_done && u2c_done {
                return CloseReason::Eof;
            }
        }
    }

    /// Ends with the timeout that ran out: `idle_timeout`, `first_byte_timeout`.
    async fn expiry(&self) -> CloseReason {
        loop {
            match self.relaying.activity.expiry(self.rule, Instant::now()) {
                Err(reason) => return reason,
                Ok(Some(t)) => tokio::time::sleep_until(t.into()).await,
                Ok(None) => std::future::pending().await,
            }
        }
    }

    /// Moves one direction until end of stream, then half-closes the writer.
    async fn pump(
        &self,
        r: &mut ReadHalf<'_>,
        w: &mut WriteHalf<'_>,
        dir: Direction,
        mut first_byte_since: Option<Instant>,
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
                let (a, tap) = (&self.relaying.activity, self.relaying.tap());
                a.read(self.rm.local(), dir, &mut first_byte_since, tap, &buf[..n]);
                w.write_all(&buf[..n]).await?;
                let shard = self.rm.local();
                shard.transfer(dir, read_done.elapsed());
                a.moved(shard, dir, n as u64);
            }
        }
    }
}
