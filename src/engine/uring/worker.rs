//! One worker: a thread pinned to a core that owns a ring, its listeners, its buffer pool and
//! a slab of connections, and runs the event loop. Nothing here is shared with other workers
//! except the read-only config, the session runtime (atomics), the metrics atomics and the
//! shutdown flag.
//!
//! The loop: submit what is queued and wait (bounded by the next tick) → take every
//! completion → decode its [`Token`] → hand it to the connection's state machine
//! ([`Conn::handle`]) → carry out the actions it returns ([`steps`]). Decisions about the
//! session (which member, failover, limits, the record) are the session core's
//! ([`crate::session`]); the worker only turns them into ops, which [`super::ops`] builds and
//! [`super::ring`] pushes. A connection's entry counts its ops in flight: what the worker
//! pushes for it, until each op's last completion ([`Worker::dispatch`]).
//!
//! Accepting, its pacing and the hand-over of listening sockets are [`super::listeners`]'s.
//! A client that reset while it waited in the listen queue is closed at accept, without an
//! upstream connect.
#![allow(unsafe_code)]

mod steps;

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{cqueue, types};

use super::bufpool::BufPool;
use super::conn::{Actions, DirState, Event, Phase as ConnPhase};
use super::listeners::{Bound, Listeners};
use super::pipepool::PipePool;
use super::ring::{self, Ring};
use super::slab::{Entry, Slab};
use super::token::{OpKind, Token};
use super::wait::{EpollWait, Watch};
use crate::config::{Config, DataPath, UringWait};
use crate::metrics::Metrics;
use crate::session::Runtime;
use crate::shutdown::{Phase, Shutdown};
use crate::upstream::Picker;
use crate::vocab::Direction;

/// How often the worker looks at timeouts and the shutdown state when nothing else wakes it.
const TICK: Duration = Duration::from_millis(100);
/// New connections after which a tick with none of them unsettled returns the
/// allocator's freed pages to the kernel (see [`crate::thp::return_freed_memory`]).
const COLLECT_AFTER: u64 = 256;

/// Per-rule data the worker needs on the hot path.
struct RuleCtx {
    /// The data path for this rule's connections (a tapped rule is always copy).
    policy: DataPath,
    /// Read by the kernel when a connect's link timeout is submitted; lives as long as the
    /// worker and is never modified.
    connect_timeout: types::Timespec,
    /// This worker's balancer state for each of the rule's pools (SNI routes, then its own).
    pickers: Vec<Picker>,
}

/// What a worker is built from: its place, and what it may create at start (the engine sizes
/// the pools to the process's fd and locked-memory limits, see [`super::Budget`]).
pub struct WorkerSetup {
    pub id: usize,
    pub cpu: Option<usize>,
    /// Pipes for the splice pool (0 on the copy path).
    pub pipes: usize,
    /// Whether to register the copy buffers with the ring (locked memory).
    pub register_buffers: bool,
    /// Most connections this worker has accepted and not yet settled (relaying) or disposed
    /// of (closed) before it stops accepting; see [`super::Budget::accept_bound`].
    pub accept_bound: usize,
}

/// What did not go as asked while a worker set up, without stopping it; the engine reports
/// every worker's notes in one line.
#[derive(Debug, Default)]
pub struct SetupNotes {
    /// Pipes created, and why not all of them.
    pub pipes_short: Option<(usize, String)>,
    /// Why the buffers could not be registered.
    pub registration: Option<String>,
    /// Why `wait = "epoll"` could not be set up (the worker sleeps in its ring).
    pub epoll: Option<String>,
}

pub struct Worker {
    // Field order matters: the ring is dropped before the pool whose memory it references.
    ring: Ring,
    pool: BufPool,
    pipes: PipePool,
    id: usize,
    rules: Vec<RuleCtx>,
    listeners: Listeners,
    slab: Slab,
    waiters: VecDeque<(u32, u16, Direction)>,
    /// Multishot recv completions that came while their direction was still sending, in
    /// arrival order ([`conn::Action::Hold`]).
    held: VecDeque<Held>,
    /// Spliced directions that stopped on their fairness budget and must pump again.
    run_queue: VecDeque<(u32, u16, Direction)>,
    runtime: Arc<Runtime>,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
    draining: bool,
    closing: bool,
    cqes: Vec<(u64, i32, u32)>,
    /// `[uring] auto_up_reads`, `auto_down_pumps`.
    auto_thresholds: (u8, u8),
    /// How long to busy-poll for completions before sleeping in the kernel.
    spin: Duration,
    /// No busy-polling before this instant: the last poll was preempted.
    spin_resume: Instant,
    /// This thread's involuntary context switches when last looked at.
    preempted: libc::c_long,
    /// `slab.inserted()` when the worker last returned freed memory.
    collected_at: u64,
    /// The ring takes the recv "poll first" hint ([`ring::takes_poll_first`]).
    poll_first: bool,
    /// The ring takes multishot recvs ([`ring::takes_multishot_recv`]).
    multishot: bool,
    /// `[uring] wait = "epoll"`: the epoll set the worker sleeps on instead of the ring.
    epoll: Option<EpollWait>,
}

/// A multishot recv's completion held until its direction's send finished.
struct Held {
    slot: u32,
    generation: u16,
    dir: Direction,
    res: i32,
    buf: Option<u16>,
}

/// The completion batch, its memory faulted in now (a burst fills it, never grows it: see
/// [`Ring::reap`]): a fixed cost of the worker, kept out of what its first busy turn seems to
/// cost.
fn touched_batch(capacity: usize) -> Vec<(u64, i32, u32)> {
    let mut batch = Vec::with_capacity(capacity);
    batch.resize(capacity, (0, 0, 0));
    batch.clear();
    batch
}

/// How long a worker stops busy-polling after it was preempted while polling.
const SPIN_BACKOFF: Duration = Duration::from_secs(1);

/// Involuntary context switches of the calling thread so far.
fn involuntary_switches() -> libc::c_long {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `ru` is a writable `rusage` that outlives the call; RUSAGE_THREAD reports on the
    // calling thread only.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, ru.as_mut_ptr()) };
    if rc != 0 {
        return 0;
    }
    // SAFETY: getrusage succeeded, so it filled `ru` (and it was zeroed before).
    unsafe { ru.assume_init() }.ru_nivcsw
}

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("worker {id}: cannot set up io_uring: {source}")]
    Ring { id: usize, source: io::Error },
    #[error("worker {id}: {source}")]
    Pool {
        id: usize,
        source: super::bufpool::PoolError,
    },
}

impl Worker {
    /// Sets up the ring and the pool. Must run on the worker's own thread (SINGLE_ISSUER binds
    /// the ring to the thread that creates it).
    ///
    /// Nothing is logged here: what fell short is returned in [`SetupNotes`] for the engine
    /// to report once for all workers.
    ///
    /// # Errors
    /// [`WorkerError`] when the ring or the pool cannot be set up.
    pub fn new(
        config: &Config,
        setup: &WorkerSetup,
        runtime: Arc<Runtime>,
        metrics: Arc<Metrics>,
        shutdown: Shutdown,
    ) -> Result<(Self, SetupNotes), WorkerError> {
        let mut notes = SetupNotes::default();
        let id = setup.id;
        let (ring, mode) = ring::build(config.uring.ring_entries)
            .map_err(|source| WorkerError::Ring { id, source })?;
        // Nothing on this engine's data path should need io-wq (splice runs on this thread after
        // ring readiness; io_uring's own SPLICE op would always hand off to an io-wq thread);
        // cap its workers so a surprise fallback cannot grow thousands of `iou-wrk` threads.
        if let Err(e) = ring.submitter().register_iowq_max_workers(&mut [2, 2]) {
            tracing::debug!(worker = id, error = %e, "cannot cap io-wq workers");
        }
        let count = u16::try_from(config.uring.buffers.min(1 << 15)).unwrap_or(1 << 15);
        let buf_size = u32::try_from(config.uring.buffer_size.bytes()).unwrap_or(u32::MAX);
        let (pool, reg_err) =
            BufPool::with_registration(&ring, count, buf_size, setup.register_buffers)
                .map_err(|source| WorkerError::Pool { id, source })?;
        notes.registration = reg_err.map(|e| e.to_string());
        tracing::debug!(
            worker = id,
            mode,
            registered = pool.registered(),
            "ring ready"
        );
        let rules = config
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| RuleCtx {
                policy: if r.tap.is_some() {
                    DataPath::Copy
                } else {
                    config.mode
                },
                connect_timeout: types::Timespec::from(r.connect_timeout),
                pickers: r
                    .pools()
                    .enumerate()
                    .map(|(p, _)| {
                        Picker::new(
                            ((id as u64) << 32)
                                ^ ((p as u64) << 16)
                                ^ (i as u64)
                                ^ 0x5851_f42d_4c95_7f2d,
                        )
                    })
                    .collect(),
            })
            .collect();
        let epoll = match config.uring.wait {
            UringWait::Ring => None,
            // The wait module's argument rests on DEFER_TASKRUN: without it, io_uring runs
            // completions through signal-like task work that an epoll sleep may not notice.
            UringWait::Epoll if mode != ring::DEFER_TASKRUN => {
                notes.epoll = Some(format!(
                    "the ring runs in {mode} mode, not {}",
                    ring::DEFER_TASKRUN
                ));
                None
            }
            UringWait::Epoll => match EpollWait::new(&ring) {
                Ok(w) => Some(w),
                Err(e) => {
                    notes.epoll = Some(e.to_string());
                    None
                }
            },
        };
        let (pipes, short) = PipePool::create(setup.pipes, config.uring.pipe_size.as_usize());
        notes.pipes_short = short.map(|e| (pipes.available(), e.to_string()));
        let worker = Self {
            ring: Ring::new(ring),
            pool,
            pipes,
            id,
            rules,
            listeners: Listeners::new(id, config.rules.len(), setup.accept_bound),
            // Every live connection of every rule could land on one worker (the kernel spreads
            // SO_REUSEPORT connections by hash, not by load).
            slab: Slab::with_capacity(config.live_connections_bound()),
            waiters: VecDeque::new(),
            held: VecDeque::new(),
            run_queue: VecDeque::new(),
            runtime,
            metrics,
            shutdown,
            draining: false,
            closing: false,
            cqes: touched_batch(1024),
            auto_thresholds: (config.uring.auto_up_reads, config.uring.auto_down_pumps),
            spin: config.uring.busy_poll,
            spin_resume: Instant::now(),
            preempted: 0,
            collected_at: 0,
            poll_first: ring::takes_poll_first(mode),
            multishot: ring::takes_multishot_recv(mode),
            epoll,
        };
        Ok((worker, notes))
    }

    /// Runs the event loop on `listeners` until shutdown has drained every connection.
    pub fn run(mut self, listeners: Vec<Bound>) {
        self.listeners.install(listeners);
        if let Some(w) = &mut self.epoll {
            // Before the first accept is pushed (see the wait module).
            for fd in self.listeners.fds() {
                w.watch(fd, Watch::Listener);
            }
        }
        let mut now = Instant::now();
        let mut next_tick = now + TICK;
        loop {
            self.listeners.fill(&mut self.ring);
            self.ring.flush_backlog();
            // The clock is read once per turn, after the wait: the time this turn's work
            // took makes the tick that much later, which does not matter for a 100 ms tick,
            // while each read costs 25 ns warm and several times that right after a sleep
            // (a round trip on one CPU read it four times, now twice).
            let wait = if self.run_queue.is_empty() {
                next_tick.saturating_duration_since(now)
            } else {
                Duration::ZERO
            };
            // `[uring] busy_poll`: look for completions without sleeping for a while first.
            // A sleeping worker pays a wake-up (and, between cores, an IPI) for every
            // message; one that polls does not — at the price of the CPU it spins on, which
            // only pays while nobody else wants that CPU: a worker preempted while it polled
            // (other runnable threads on its core, e.g. a loaded host) stops polling for
            // SPIN_BACKOFF.
            if !wait.is_zero() && !self.spin.is_zero() && Instant::now() >= self.spin_resume {
                let start = Instant::now();
                loop {
                    if let Err(e) = self.ring.submit_and_peek() {
                        tracing::error!(worker = self.id, error = %e, "io_uring_enter failed");
                        break;
                    }
                    if self.ring.has_completions() || start.elapsed() >= self.spin {
                        break;
                    }
                    std::hint::spin_loop();
                }
                let preempted = involuntary_switches();
                if preempted > self.preempted {
                    self.spin_resume = Instant::now() + SPIN_BACKOFF;
                }
                self.preempted = preempted;
            }
            let wait = if self.ring.has_completions() {
                Duration::ZERO
            } else {
                wait
            };
            if let Err(e) = self.sleep(wait) {
                tracing::error!(worker = self.id, error = %e, "io_uring_enter failed");
                std::thread::sleep(Duration::from_millis(10));
            }
            now = Instant::now();
            crate::notify::beat();
            self.cqes.clear();
            self.ring.reap(&mut self.cqes);
            for i in 0..self.cqes.len() {
                let (ud, res, flags) = self.cqes[i];
                self.dispatch(ud, res, flags, now);
            }
            self.run_pending_pumps(now);
            if now >= next_tick {
                self.tick(now);
                next_tick = now + TICK;
            }
            if self.draining && self.slab.is_empty() && self.listeners.all_closed() {
                break;
            }
        }
        tracing::debug!(worker = self.id, "worker stopped");
    }

    /// Submits what is queued and waits up to `wait` for something to do: in the ring, or
    /// (`wait = "epoll"`, when the epoll set covers everything that may be pending) in
    /// `epoll_wait`, then in the ring without waiting to post what the wake-up queued.
    fn sleep(&mut self, wait: Duration) -> io::Result<()> {
        let timers = self.ring.timers();
        match &mut self.epoll {
            Some(w) if !wait.is_zero() && w.may_sleep(timers) => {
                self.ring.submit_and_peek()?;
                if self.ring.has_completions() {
                    return Ok(());
                }
                if let Err(e) = w.wait(wait) {
                    tracing::error!(worker = self.id, error = %e, "epoll_wait failed");
                }
                self.ring.submit_and_peek()
            }
            Some(w) => {
                if !wait.is_zero() {
                    w.slept_in_ring();
                }
                self.ring.submit_and_wait(wait)
            }
            None => self.ring.submit_and_wait(wait),
        }
    }

    fn dispatch(&mut self, ud: u64, res: i32, flags: u32, now: Instant) {
        let Some(t) = Token::decode(ud) else {
            tracing::error!(
                worker = self.id,
                user_data = ud,
                "completion with an unknown token"
            );
            return;
        };
        if !matches!(t.kind, OpKind::Accept | OpKind::CancelAccept) {
            // A connection op: its last completion (no F_MORE) takes it out of flight.
            let last = !cqueue::more(flags);
            match self.slab.get_mut(t.slot, t.generation) {
                Some(e) if last => e.completed(),
                Some(_) => {}
                None => {
                    // Cannot happen while every op is counted; if it does, keep the buffer.
                    tracing::error!(worker = self.id, ?t, res, "stale completion");
                    if let Some(b) = cqueue::buffer_select(flags) {
                        self.pool.taken();
                        self.pool.recycle(b);
                    }
                    return;
                }
            }
        }
        match t.kind {
            OpKind::Accept => {
                let li = t.slot as usize;
                let rule = &self.runtime.rule(self.listeners.rule(li)).rule.name;
                if let Some(a) = self.listeners.accept_completed(li, res, now, rule) {
                    self.accept_conn(a, now);
                }
            }
            OpKind::CancelAccept => {}
            OpKind::Connect => self.conn_event(t, Event::Connected { res }, now),
            OpKind::ConnectTimeout => {
                self.ring.timer_done();
                self.conn_event(t, Event::ConnectTimerDone, now);
            }
            OpKind::Recv => {
                let buf = cqueue::buffer_select(flags);
                if buf.is_some() {
                    self.pool.taken();
                }
                // A recv of 0 is end of stream — or a reset whose error another op on the same
                // socket (a send) already took: the socket then reads as empty and closed.
                // While we still write to that socket, a FIN leaves it in CLOSE_WAIT and only
                // a reset in CLOSE; after our own FIN a clean close ends in CLOSE too, so the
                // state is asked only while the reverse direction still flows. A reset must
                // never pass on as FIN.
                let res = match self.slab.get(t.slot, t.generation) {
                    Some(e)
                        if res == 0
                            && e.conn.dir(t.dir.reverse()) != DirState::Done
                            && was_reset(e.src(t.dir)) =>
                    {
                        -libc::ECONNRESET
                    }
                    _ => res,
                };
                self.conn_event(
                    t,
                    Event::Received {
                        dir: t.dir,
                        res,
                        buf,
                        more: cqueue::more(flags),
                    },
                    now,
                );
            }
            OpKind::Send => self.conn_event(t, Event::Sent { dir: t.dir, res }, now),
            OpKind::Cancel => self.conn_event(t, Event::CancelDone, now),
            OpKind::Poll => {
                let ev = if cqueue::more(flags) {
                    Event::Readable { dir: t.dir }
                } else {
                    Event::PollEnded { dir: t.dir, res }
                };
                self.conn_event(t, ev, now);
            }
            OpKind::PollOut => self.conn_event(t, Event::Writable { dir: t.dir }, now),
            OpKind::ParkPoll => self.conn_event(t, Event::Unparked { dir: t.dir }, now),
            OpKind::HeaderRecv => {
                let ev = self.header_received(t, res, now);
                self.conn_event(t, ev, now);
            }
            OpKind::PreambleSend => {
                let ev = match self.slab.get_mut(t.slot, t.generation) {
                    Some(e) if e.conn.phase() != ConnPhase::SendingPreamble => Event::CancelDone,
                    Some(e) if res > 0 => {
                        let p = e.preamble_mut().expect("a preamble is being sent");
                        p.sent += res as usize;
                        // The rest, or (all sent) the session told and the relay started.
                        Event::PreambleProgress
                    }
                    _ => Event::PreambleFailed { res },
                };
                self.conn_event(t, ev, now);
            }
        }
        self.wake_waiters(now);
    }

    fn conn_event(&mut self, t: Token, ev: Event, now: Instant) {
        let Some(entry) = self.slab.get_mut(t.slot, t.generation) else {
            tracing::error!(
                worker = self.id,
                ?t,
                ?ev,
                "event for a connection that is gone"
            );
            if let Event::Received { buf: Some(b), .. } = ev {
                self.pool.recycle(b);
            }
            return;
        };
        let mut actions = Actions::default();
        let rule = entry.rule();
        let was_settled = entry.conn.is_settled();
        entry.conn.handle(ev, now, &mut actions);
        match (was_settled, entry.conn.is_settled()) {
            (false, true) => self.listeners.settled(rule),
            (true, false) => self.listeners.unsettled(rule),
            _ => {}
        }
        for a in actions.iter() {
            self.act(t.slot, t.generation, a, now);
        }
        // Nothing in flight any more: the machine may finish or dial the next member.
        if let Some(e) = self.slab.get(t.slot, t.generation)
            && e.in_flight() == 0
            && e.conn.awaits_drain()
        {
            self.conn_event(t, Event::OpsDrained, now);
        }
    }

    /// Lets directions that found the pool empty read again: as many as there are buffers in
    /// the ring now. Waiters whose connection closed meanwhile are dropped without using one.
    fn wake_waiters(&mut self, now: Instant) {
        let mut budget = self.pool.in_ring();
        while budget > 0 {
            let Some((slot, generation, dir)) = self.waiters.pop_front() else {
                return;
            };
            let waiting = self
                .slab
                .get(slot, generation)
                .is_some_and(|e| !e.conn.is_closing() && e.conn.dir(dir) == DirState::WaitBuffer);
            if waiting {
                budget -= 1;
                self.conn_event(
                    Token::new(slot, generation, dir, OpKind::Recv),
                    Event::BufferAvailable { dir },
                    now,
                );
            }
        }
    }

    /// Feeds `ev` to every live connection.
    fn broadcast(&mut self, ev: Event, now: Instant, only: impl Fn(&Entry) -> bool) {
        for s in 0..self.slab.len() as u32 {
            let Some(g) = self.slab.generation(s) else {
                continue;
            };
            if self.slab.get(s, g).is_some_and(&only) {
                self.conn_event(
                    Token::new(s, g, Direction::ClientToUpstream, OpKind::Recv),
                    ev,
                    now,
                );
            }
        }
    }

    /// Closes connections whose PROXY header did not arrive within `proxy_header_timeout`.
    fn expire_headers(&mut self, now: Instant) {
        for s in 0..self.slab.len() as u32 {
            let Some(g) = self.slab.generation(s) else {
                continue;
            };
            let expired = self.slab.get(s, g).is_some_and(|e| {
                e.conn.phase() == ConnPhase::ReadingHeader
                    && e.preamble()
                        .and_then(|p| p.deadline)
                        .is_some_and(|d| now >= d)
            });
            if !expired {
                continue;
            }
            let t = Token::new(s, g, Direction::ClientToUpstream, OpKind::HeaderRecv);
            let ev = self.header_expired(t, now);
            self.conn_event(t, ev, now);
        }
    }

    fn tick(&mut self, now: Instant) {
        let phase = self.shutdown.phase();
        if phase >= Phase::Draining && !self.draining {
            self.draining = true;
            self.listeners.drain(&mut self.ring);
        }
        if phase == Phase::Closing && !self.closing {
            self.closing = true;
            self.broadcast(Event::Shutdown, now, |_| true);
        }
        self.listeners.resume(now);
        let runtime = self.runtime.clone();
        self.expire_headers(now);
        self.broadcast(Event::Park, now, |e| e.conn.wants_park(now));
        self.broadcast(Event::IdleTimeout, now, |e| {
            runtime
                .rule(e.rule())
                .rule
                .idle_timeout
                .is_some_and(|idle| e.conn.idle_expired(now, idle))
        });
        if runtime
            .rules
            .iter()
            .any(|r| r.rule.first_byte_timeout().is_some())
        {
            self.broadcast(Event::FirstByteTimeout, now, |e| {
                e.conn
                    .first_byte_overdue(now, runtime.rule(e.rule()).rule.first_byte_timeout())
            });
        }
        self.wake_waiters(now);
        // After a burst of new connections has settled (none is dialing or closing), hand the
        // pages their set-up state used back to the kernel: an idle worker would keep them.
        if self.slab.inserted() >= self.collected_at + COLLECT_AFTER
            && !self.listeners.any_unsettled()
        {
            crate::thp::return_freed_memory();
            self.collected_at = self.slab.inserted();
        }
    }
}

/// Whether a socket that read as end of stream, and that we have not shut down for writing,
/// was in fact reset: its TCP state is CLOSE (a FIN alone leaves it in CLOSE_WAIT).
fn was_reset(fd: std::os::fd::RawFd) -> bool {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is a writable `tcp_info` of `len` bytes that outlives the call, and the
    // kernel writes at most `len` bytes into it; `fd` is owned by a live slab entry.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    // SAFETY: zero-initialised, and possibly (partly) written by the kernel: valid either way.
    let state = unsafe { info.assume_init() }.tcpi_state;
    rc == 0 && state == TCP_CLOSE
}

/// `TCP_CLOSE` in the kernel's `tcp_states.h` (not exported by libc).
const TCP_CLOSE: u8 = 7;
