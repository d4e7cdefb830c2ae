//! One worker: a thread pinned to a core that owns a ring, its listeners, its buffer pool and
//! a slab of connections, and runs the event loop. Nothing here is shared with other workers
//! except the read-only config, the session runtime (atomics), the metrics atomics and the
//! shutdown flag.
//!
//! The loop: submit what is queued and wait (bounded by the next tick) → take every
//! completion → decode its [`Token`] → hand it to the connection's state machine
//! ([`Conn::handle`]) → carry out the actions it returns. Decisions about the session (which
//! member, failover, limits, the record) are the session core's ([`crate::session`]); this
//! module only turns them into ops. Every connection op goes through [`Worker::push_conn`],
//! which counts it; its last completion uncounts it in [`Worker::dispatch`].
//!
//! Accepting is paced: one-shot accepts, at most [`ACCEPT_WINDOW`] per listener in flight,
//! and none while the worker holds its accept bound of connections that are not relaying
//! yet or are closing ([`Worker::fill_accepts`]). A client that reset while it waited in
//! the listen queue is closed at accept, without an upstream connect.
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types};
use socket2::SockRef;

use super::bufpool::{BUFFER_GROUP, BufPool};
use super::conn::{Action, Actions, Conn, DirState, Event, Phase as ConnPhase};
use super::pipepool::PipePool;
use super::ring::{self, Ring};
use super::slab::{Entry, Preamble, Slab, Target};
use super::splice::SysPipeIo;
use super::token::{OpKind, Token};
use crate::config::{Config, DataPath};
use crate::metrics::{CloseReason, Direction, Metrics, PathKind};
use crate::net;
use crate::session::outcome::errno_of;
use crate::session::{Dial, End, HeaderStep, Runtime, proxy};
use crate::shutdown::{Phase, Shutdown};
use crate::upstream::Picker;

/// The header buffer a connection starts with (grown by doubling up to the header's cap):
/// a slowloris on the PROXY header costs this, not a pool buffer.
const HEADER_BUF_START: usize = 256;

/// How often the worker looks at timeouts and the shutdown state when nothing else wakes it.
const TICK: Duration = Duration::from_millis(100);

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

/// One-shot accepts a listener keeps in flight at most (while the worker is under its
/// accept bound). One-shot, not multishot: a multishot accept drains the whole listen queue
/// into the completion queue at once (thousands of fds in one burst under a connection flood),
/// where one-shot accepts let the worker take no more than it can dispose of.
const ACCEPT_WINDOW: u32 = 64;

/// How long after it starts a worker looks for connections whose accept wake-up was lost
/// to an older instance's cancelled accepts (see [`Worker::pick_up_lost_wakeups`]).
const HANDOFF_WATCH: Duration = Duration::from_secs(5);

#[derive(Debug, PartialEq, Eq)]
enum ListenerState {
    /// Accepting (as many accepts in flight as the window and the accept bound allow).
    Open,
    /// Out of fds: no new accept before this instant.
    Backoff(Instant),
    /// Cancel submitted; waiting for the last accept in flight to complete.
    Cancelling,
    Closed,
}

/// A listener handed to a worker: the rule it serves and its port group in
/// [`crate::engine::Listeners`] (to give it back in place if the engine stands down).
pub struct Bound {
    pub rule: usize,
    pub port: usize,
    pub listener: TcpListener,
}

struct Listener {
    fd: Option<OwnedFd>,
    rule: usize,
    /// The port it listens on (a range rule's sessions map the upstream port from it).
    port: u16,
    /// In [`Worker::to_arm`].
    queued: bool,
    state: ListenerState,
    /// One-shot accepts submitted and not yet completed.
    in_flight: u32,
    exhausted: net::ExhaustionLog,
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
}

pub struct Worker {
    // Field order matters: the ring is dropped before the pool whose memory it references.
    ring: Ring,
    pool: BufPool,
    pipes: PipePool,
    id: usize,
    rules: Vec<RuleCtx>,
    listeners: Vec<Listener>,
    slab: Slab,
    waiters: VecDeque<(u32, u16, Direction)>,
    /// Spliced directions that stopped on their fairness budget and must pump again.
    run_queue: VecDeque<(u32, u16, Direction)>,
    runtime: Arc<Runtime>,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
    draining: bool,
    closing: bool,
    cqes: Vec<(u64, i32, u32)>,
    /// Connections accepted and not yet relaying, or closing: the fds the worker holds for
    /// connections it has not settled or not yet disposed of.
    unsettled: usize,
    /// `unsettled`, per rule (each rule's listeners are bounded on their own connections).
    unsettled_by_rule: Vec<usize>,
    /// This worker's listeners per rule (a port range has one per port).
    listeners_by_rule: Vec<usize>,
    /// Accepts in flight over every listener.
    accepts_in_flight: usize,
    /// Accepts in flight, per rule.
    accepts_by_rule: Vec<usize>,
    /// Open listeners that may want more accepts armed (each at most once): only these are
    /// looked at by [`Worker::fill_accepts`], so a worker with thousands of mostly idle
    /// listeners does not walk them all on every loop.
    to_arm: Vec<usize>,
    /// No new accept while `unsettled + accepts_in_flight` reaches this.
    accept_bound: usize,
    /// `[uring] auto_up_reads`, `auto_down_pumps`.
    auto_thresholds: (u8, u8),
    /// See [`Worker::pick_up_lost_wakeups`].
    handoff_watch_until: Instant,
    /// How long to busy-poll for completions before sleeping in the kernel.
    spin: Duration,
    /// No busy-polling before this instant: the last poll was preempted.
    spin_resume: Instant,
    /// This thread's involuntary context switches when last looked at.
    preempted: libc::c_long,
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
        let (pipes, short) = PipePool::create(setup.pipes, config.uring.pipe_size.as_usize());
        notes.pipes_short = short.map(|e| (pipes.available(), e.to_string()));
        let worker = Self {
            ring: Ring::new(ring),
            pool,
            pipes,
            id,
            rules,
            listeners: Vec::new(),
            // Every live connection of every rule could land on one worker (the kernel spreads
            // SO_REUSEPORT connections by hash, not by load).
            slab: Slab::with_capacity(config.live_connections_bound()),
            waiters: VecDeque::new(),
            run_queue: VecDeque::new(),
            runtime,
            metrics,
            shutdown,
            draining: false,
            closing: false,
            cqes: Vec::with_capacity(1024),
            unsettled: 0,
            unsettled_by_rule: vec![0; config.rules.len()],
            listeners_by_rule: vec![0; config.rules.len()],
            accepts_in_flight: 0,
            accepts_by_rule: vec![0; config.rules.len()],
            to_arm: Vec::new(),
            accept_bound: setup.accept_bound.max(1),
            auto_thresholds: (config.uring.auto_up_reads, config.uring.auto_down_pumps),
            handoff_watch_until: Instant::now(),
            spin: config.uring.busy_poll,
            spin_resume: Instant::now(),
            preempted: 0,
        };
        Ok((worker, notes))
    }

    /// Runs the event loop on `listeners` until shutdown has drained every connection.
    pub fn run(mut self, listeners: Vec<Bound>) {
        for b in &listeners {
            self.listeners_by_rule[b.rule] += 1;
        }
        self.to_arm = (0..listeners.len()).collect();
        self.listeners = listeners
            .into_iter()
            .map(|b| Listener {
                port: b.listener.local_addr().map_or(0, |a| a.port()),
                fd: Some(OwnedFd::from(b.listener)),
                rule: b.rule,
                queued: true,
                state: ListenerState::Open,
                in_flight: 0,
                exhausted: net::ExhaustionLog::default(),
            })
            .collect();
        let mut next_tick = Instant::now() + TICK;
        self.handoff_watch_until = Instant::now() + HANDOFF_WATCH;
        loop {
            self.fill_accepts();
            self.ring.flush_backlog();
            let wait = if self.run_queue.is_empty() {
                next_tick.saturating_duration_since(Instant::now())
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
            if let Err(e) = self.ring.submit_and_wait(wait) {
                tracing::error!(worker = self.id, error = %e, "io_uring_enter failed");
                std::thread::sleep(Duration::from_millis(10));
            }
            let now = Instant::now();
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
            if self.draining
                && self.slab.is_empty()
                && self
                    .listeners
                    .iter()
                    .all(|l| l.state == ListenerState::Closed)
            {
                break;
            }
        }
        tracing::debug!(worker = self.id, "worker stopped");
    }

    /// Pushes an op of connection `slot` and counts it in flight.
    fn push_conn(
        &mut self,
        slot: u32,
        generation: u16,
        first: squeue::Entry,
        second: Option<squeue::Entry>,
    ) {
        let Some(e) = self.slab.get_mut(slot, generation) else {
            return;
        };
        e.in_flight += 1 + u32::from(second.is_some());
        // SAFETY: the pointers these ops carry stay valid until their completions: buffers
        // are owned by the op until its CQE (the state machine releases them only then), the
        // connect's sockaddr lives in this slot's entry (the slab never moves or frees an
        // entry while `in_flight > 0`: `Finish` and `Dial` come only after `OpsDrained`),
        // connect timespecs live in `self.rules` for the worker's lifetime, and the fds are
        // closed only once this connection's ops have all completed.
        unsafe { self.ring.push_group(first, second) };
    }

    /// Tops up the open listeners' one-shot accepts, as long as each rule holds fewer than
    /// its share of the worker's accept bound in unsettled or closing connections plus accepts
    /// in flight: a flood of connections that reset at once is then accepted no faster than
    /// it is disposed of, and the rest waits in the kernel's listen queue instead of costing
    /// fds here.
    ///
    /// Every rule gets its own share of the bound, counted on its own connections: a rule
    /// whose upstream hangs (its connections stay unsettled) cannot stall another rule's
    /// accepts, and a worker with many rules cannot spend the bound on its first ones. A
    /// rule's listeners (one per port of a range) split its share as their window (at most
    /// [`ACCEPT_WINDOW`], at least 1); each open listener keeps at least one accept armed while
    /// the rule is under its share, even when a range has more ports than the share — an
    /// io_uring listener with no accept in flight would not see its connections at all.
    fn fill_accepts(&mut self) {
        if self.draining || self.to_arm.is_empty() {
            return;
        }
        let rules_here = self.listeners_by_rule.iter().filter(|&&n| n > 0).count();
        let share = super::listener_share(self.accept_bound, rules_here);
        let mut queue = std::mem::take(&mut self.to_arm);
        for &i in &queue {
            let rule = self.listeners[i].rule;
            let window = u32::try_from(share / self.listeners_by_rule[rule].max(1))
                .unwrap_or(u32::MAX)
                .clamp(1, ACCEPT_WINDOW);
            self.listeners[i].queued = false;
            while self.listeners[i].state == ListenerState::Open
                && self.listeners[i].in_flight < window
                && (self.unsettled_by_rule[rule] + self.accepts_by_rule[rule] < share
                    || (self.listeners[i].in_flight == 0 && self.unsettled_by_rule[rule] < share))
            {
                if !self.push_accept(i) {
                    break;
                }
            }
            let l = &mut self.listeners[i];
            if l.state == ListenerState::Open && l.in_flight < window {
                // Held back by the rule's share: try again when its connections settle.
                l.queued = true;
            }
        }
        queue.retain(|&i| self.listeners[i].queued);
        // Listeners queued meanwhile were not in `queue` (each is queued at most once).
        queue.append(&mut self.to_arm);
        self.to_arm = queue;
    }

    /// Puts listener `i` up for [`Worker::fill_accepts`] (once).
    fn queue_arm(&mut self, i: usize) {
        let l = &mut self.listeners[i];
        if !l.queued && l.state == ListenerState::Open {
            l.queued = true;
            self.to_arm.push(i);
        }
    }

    /// Submits one one-shot accept on listener `i`; false if it has no fd.
    fn push_accept(&mut self, i: usize) -> bool {
        let Some(fd) = self.listeners[i].fd.as_ref().map(AsRawFd::as_raw_fd) else {
            return false;
        };
        let token = Token::new(i as u32, 0, Direction::ClientToUpstream, OpKind::Accept);
        let e = opcode::Accept::new(types::Fd(fd), std::ptr::null_mut(), std::ptr::null_mut())
            .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            .build()
            .user_data(token.encode());
        self.listeners[i].in_flight += 1;
        self.accepts_in_flight += 1;
        let rule = self.listeners[i].rule;
        self.accepts_by_rule[rule] += 1;
        // SAFETY: the accept carries no pointer (null address and length); the
        // listener fd is closed only once no accept is in flight on it
        // (`ListenerState::Cancelling` → `Closed`).
        unsafe { self.ring.push(e) };
        true
    }

    /// The first [`HANDOFF_WATCH`] of a worker's life, when an older engine instance (a
    /// reload's previous generation, or the process this one took the sockets over from)
    /// cancels its accepts on the same sockets: io_uring accepts wait as *exclusive* waiters
    /// on a listener, so a connection's one wake-up can go to an accept that is being
    /// cancelled and is then lost — the connection sits in the queue, with this worker's
    /// accepts armed, until the next connection arrives. Each tick of that window looks
    /// (one `poll(2)` over every open listener) for a queue with a connection in it and
    /// submits one more accept there, whose first, inline attempt takes it.
    fn pick_up_lost_wakeups(&mut self, now: Instant) {
        if self.draining || now >= self.handoff_watch_until {
            return;
        }
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::AsFd;
        let open: Vec<usize> = (0..self.listeners.len())
            .filter(|&i| {
                self.listeners[i].state == ListenerState::Open && self.listeners[i].fd.is_some()
            })
            .collect();
        let ready: Vec<usize> = {
            let mut fds: Vec<PollFd<'_>> = open
                .iter()
                .filter_map(|&i| self.listeners[i].fd.as_ref())
                .map(|fd| PollFd::new(fd.as_fd(), PollFlags::POLLIN))
                .collect();
            if !matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0) {
                return;
            }
            open.iter()
                .zip(&fds)
                .filter(|(_, p)| p.revents().is_some_and(|r| r.contains(PollFlags::POLLIN)))
                .map(|(&i, _)| i)
                .collect()
        };
        for i in ready {
            self.push_accept(i);
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
                Some(e) if last => e.in_flight -= 1,
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
            OpKind::Accept => self.on_accept(t.slot as usize, res, now),
            OpKind::CancelAccept => {}
            OpKind::Connect => self.conn_event(t, Event::Connected { res }, now),
            OpKind::ConnectTimeout => self.conn_event(t, Event::ConnectTimerDone, now),
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
                        let p = e.preamble.as_mut().expect("a preamble is being sent");
                        p.sent += res as usize;
                        if p.sent >= p.filled {
                            // Sent: the buffer's job is done, give its memory back.
                            e.preamble = None;
                            Event::PreambleDone
                        } else {
                            Event::PreambleProgress
                        }
                    }
                    _ => Event::PreambleFailed { res },
                };
                self.conn_event(t, ev, now);
            }
        }
        self.wake_waiters(now);
    }

    fn on_accept(&mut self, li: usize, res: i32, now: Instant) {
        // A one-shot accept: every completion is its last.
        self.accepts_in_flight = self.accepts_in_flight.saturating_sub(1);
        let ri = self.listeners[li].rule;
        self.accepts_by_rule[ri] = self.accepts_by_rule[ri].saturating_sub(1);
        let rule_name = &self.runtime.rule(ri).rule.name;
        let l = &mut self.listeners[li];
        l.in_flight = l.in_flight.saturating_sub(1);
        if l.state == ListenerState::Cancelling {
            if l.in_flight == 0 {
                l.state = ListenerState::Closed;
                l.fd = None;
            }
        } else if res < 0 && net::is_resource_exhaustion(&io::Error::from_raw_os_error(-res)) {
            // io_uring's accept takes the fd before looking at the queue, so this also
            // happens with nothing pending: no connection was rejected, none is lost.
            if let Some(held_back) = l.exhausted.hit(now) {
                tracing::warn!(worker = self.id, rule = %rule_name, error = %io::Error::from_raw_os_error(-res), held_back, "accept: out of file descriptors; backing off");
            }
            l.state = ListenerState::Backoff(now + net::ACCEPT_BACKOFF);
        }
        self.queue_arm(li);
        if res < 0 {
            return;
        }
        // SAFETY: a successful accept completion carries a new fd that nothing else owns.
        let client = unsafe { OwnedFd::from_raw_fd(res) };
        if self.listeners[li].exhausted.recovered() {
            let rule = &self.runtime.rule(self.listeners[li].rule).rule.name;
            tracing::info!(worker = self.id, rule = %rule, "accept: file descriptors available again");
        }
        self.accept_conn(li, client, now);
    }

    fn accept_conn(&mut self, li: usize, client: OwnedFd, now: Instant) {
        let ri = self.listeners[li].rule;
        let rt = self.runtime.rule(ri);
        let shard = self.metrics.rule(ri).shard(self.id);
        let peer = SockRef::from(&client)
            .peer_addr()
            .ok()
            .and_then(|a| a.as_socket());
        let Ok(session) = rt.admit(shard, peer, now, self.shutdown.refuses_new()) else {
            net::set_reset_on_close(SockRef::from(&client));
            return;
        };
        if peer.is_none() {
            // getpeername failed (ENOTCONN): the client reset or vanished while it waited in
            // the listen queue. Nothing to dial for; close it at once (a flood of such
            // connections must cost no upstream connect).
            net::set_reset_on_close(SockRef::from(&client));
            let end = End {
                reason: CloseReason::Reset,
                bytes: [0, 0],
                path: "copy",
            };
            session.finish(rt, &self.metrics, shard, end, now);
            return;
        }
        if let Err(e) = net::apply_tcp_options(SockRef::from(&client), &rt.rule.tcp) {
            tracing::debug!(error = %e, "socket option on client socket failed");
        }
        if !self.slab.has_room() {
            // The slab holds every rule's max_connections, so the gate turns connections
            // away before this; should it ever be full, close this one cleanly.
            net::set_reset_on_close(SockRef::from(&client));
            let end = End {
                reason: CloseReason::Error,
                bytes: [0, 0],
                path: "copy",
            };
            session.finish(rt, &self.metrics, shard, end, now);
            return;
        }
        let mut session = session;
        session.set_listen_port(rt, self.listeners[li].port);
        if rt.wants_local_addr() {
            session.set_local(
                SockRef::from(&client)
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_socket()),
            );
        }
        let reads_header = session.awaits_header();
        let sends_header = rt.rule.proxy_protocol != crate::config::ProxyProtocol::Off;
        let conn = Conn::with_preamble(
            now,
            self.rules[ri].policy,
            self.pool.buf_size(),
            reads_header,
            sends_header,
        )
        .with_auto_thresholds(self.auto_thresholds.0, self.auto_thresholds.1);
        let mut entry = Entry::new(conn, session, ri, client);
        if reads_header || sends_header {
            let (_, timeout) = rt.header_limits();
            entry.preamble = Some(Box::new(Preamble {
                buf: if reads_header {
                    vec![0; HEADER_BUF_START]
                } else {
                    Vec::new()
                },
                deadline: reads_header.then(|| now + timeout),
                ..Preamble::default()
            }));
        }
        let (slot, generation) = self.slab.insert(entry);
        self.unsettled += 1;
        self.unsettled_by_rule[ri] += 1;
        self.conn_event(
            Token::new(
                slot,
                generation,
                Direction::ClientToUpstream,
                OpKind::Connect,
            ),
            Event::Start,
            now,
        );
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
        let rule = entry.rule;
        let was_settled = entry.conn.is_settled();
        entry.conn.handle(ev, now, &mut actions);
        match (was_settled, entry.conn.is_settled()) {
            (false, true) => {
                self.unsettled = self.unsettled.saturating_sub(1);
                self.unsettled_by_rule[rule] = self.unsettled_by_rule[rule].saturating_sub(1);
            }
            (true, false) => {
                self.unsettled += 1;
                self.unsettled_by_rule[rule] += 1;
            }
            _ => {}
        }
        for a in actions.iter() {
            self.act(t.slot, t.generation, a, now);
        }
        // Nothing in flight any more: the machine may finish or dial the next member.
        if let Some(e) = self.slab.get(t.slot, t.generation)
            && e.in_flight == 0
            && e.conn.awaits_drain()
        {
            self.conn_event(t, Event::OpsDrained, now);
        }
    }

    /// Feeds a header recv's bytes to the session core: read more, dial, or close.
    fn header_received(&mut self, t: Token, res: i32, now: Instant) -> Event {
        let Some(e) = self.slab.get_mut(t.slot, t.generation) else {
            return Event::CancelDone;
        };
        if e.conn.phase() != ConnPhase::ReadingHeader {
            // Cancelled by a close already under way.
            return Event::CancelDone;
        }
        let rt = self.runtime.rule(e.rule);
        let shard = self.metrics.rule(e.rule).shard(self.id);
        let p = e.preamble.as_mut().expect("a header is being read");
        if res <= 0 {
            // The client closed or failed before its header was complete.
            return Event::GaveUp {
                reason: e.session.header_failed(shard, false),
            };
        }
        p.filled += res as usize;
        match e.session.feed_header(rt, shard, &p.buf[..p.filled], now) {
            HeaderStep::NeedMore => Event::HeaderIncomplete,
            HeaderStep::Ready { consumed } => {
                // What follows the header is the client's stream: it goes out first.
                p.sent = consumed;
                p.deadline = None;
                Event::HeaderRead
            }
            HeaderStep::Reject(why) => Event::GaveUp {
                reason: CloseReason::Rejected(why),
            },
        }
    }

    /// Asks the session core for the next member, opens a socket to it and submits the
    /// connect with its link timeout; tells the machine `GaveUp` when there is none.
    fn dial(&mut self, slot: u32, generation: u16, now: Instant) {
        let Some(e) = self.slab.get_mut(slot, generation) else {
            return;
        };
        debug_assert_eq!(e.in_flight, 0, "dialing with ops in flight");
        // The previous attempt's socket: every op on it has completed.
        e.upstream = None;
        let rt = self.runtime.rule(e.rule);
        let shard = self.metrics.rule(e.rule).shard(self.id);
        let pickers = &mut self.rules[e.rule].pickers;
        let gave_up = loop {
            let addr = match e.session.dial(rt, pickers, now) {
                Dial::Connect(addr) => addr,
                Dial::GiveUp(reason) => break reason,
            };
            let socket =
                net::upstream_socket(addr, &rt.rule.tcp, e.session.origin(rt)).and_then(|s| {
                    s.set_nonblocking(true)?;
                    Ok(OwnedFd::from(s))
                });
            match socket {
                Ok(fd) => {
                    e.upstream = Some(fd);
                    e.target = Target::from(addr);
                    let connect = opcode::Connect::new(
                        types::Fd(e.dst(Direction::ClientToUpstream)),
                        e.target.as_ptr(),
                        e.target.len(),
                    )
                    .build()
                    .flags(squeue::Flags::IO_LINK)
                    .user_data(
                        Token::new(
                            slot,
                            generation,
                            Direction::ClientToUpstream,
                            OpKind::Connect,
                        )
                        .encode(),
                    );
                    let timeout = opcode::LinkTimeout::new(&self.rules[e.rule].connect_timeout)
                        .build()
                        .user_data(
                            Token::new(
                                slot,
                                generation,
                                Direction::ClientToUpstream,
                                OpKind::ConnectTimeout,
                            )
                            .encode(),
                        );
                    self.push_conn(slot, generation, connect, Some(timeout));
                    return;
                }
                Err(err) => {
                    if let Some(reason) = e.session.socket_failed(rt, shard, errno_of(&err), now) {
                        tracing::warn!(worker = self.id, rule = %rt.rule.name, error = %err, "cannot create upstream socket; connection reset");
                        break reason;
                    }
                }
            }
        };
        self.conn_event(
            Token::new(
                slot,
                generation,
                Direction::ClientToUpstream,
                OpKind::Connect,
            ),
            Event::GaveUp { reason: gave_up },
            now,
        );
    }

    fn act(&mut self, slot: u32, generation: u16, action: Action, now: Instant) {
        let Some(e) = self.slab.get(slot, generation) else {
            return;
        };
        let ri = e.rule;
        let shard = self.metrics.rule(ri).shard(self.id);
        let token = |dir, kind| Token::new(slot, generation, dir, kind).encode();
        match action {
            Action::Dial => self.dial(slot, generation, now),
            Action::RecvHeader => {
                let cap = self.runtime.rule(ri).header_limits().0;
                let Some(p) = self
                    .slab
                    .get_mut(slot, generation)
                    .and_then(|e| e.preamble.as_mut())
                else {
                    return;
                };
                if p.filled == p.buf.len() {
                    // Grown only here, between completions: no recv is writing into it.
                    let grown = (p.buf.len() * 2).clamp(HEADER_BUF_START, cap.max(1));
                    p.buf.resize(grown, 0);
                }
                let room = u32::try_from(p.buf.len() - p.filled).unwrap_or(u32::MAX);
                // SAFETY (pointer arithmetic): `filled < buf.len()` (the header parser
                // rejects a header before it reaches `cap`), so the pointer stays in `buf`.
                let ptr = unsafe { p.buf.as_mut_ptr().add(p.filled) };
                let fd = e_client_fd(&self.slab, slot, generation);
                let sqe = opcode::Recv::new(types::Fd(fd), ptr, room)
                    .build()
                    .user_data(token(Direction::ClientToUpstream, OpKind::HeaderRecv));
                self.push_conn(slot, generation, sqe, None);
            }
            Action::SendPreamble => self.send_preamble(slot, generation, now),
            Action::Recv(dir) => {
                let sqe = opcode::Recv::new(types::Fd(e.src(dir)), std::ptr::null_mut(), 0)
                    .buf_group(BUFFER_GROUP)
                    .build()
                    .flags(squeue::Flags::BUFFER_SELECT)
                    .user_data(token(dir, OpKind::Recv));
                self.push_conn(slot, generation, sqe, None);
            }
            Action::Send { dir, buf, off, len } => {
                if let (0, Some(session), Some(tap)) =
                    (off, e.tap.as_ref(), self.metrics.rule(ri).tap())
                {
                    tap.data(session, dir, self.pool.filled(buf, len));
                }
                // SAFETY (pointer arithmetic): off + len <= the bytes received into `buf`,
                // which is at most the buffer size.
                let ptr = unsafe { self.pool.ptr(buf).add(off as usize) };
                let fd = types::Fd(e.dst(dir));
                let sqe = if self.pool.registered() {
                    opcode::WriteFixed::new(fd, ptr, len, buf).build()
                } else {
                    opcode::Send::new(fd, ptr, len)
                        .flags(libc::MSG_NOSIGNAL)
                        .build()
                };
                self.push_conn(
                    slot,
                    generation,
                    sqe.user_data(token(dir, OpKind::Send)),
                    None,
                );
            }
            Action::Release(b) => self.pool.recycle(b),
            Action::WaitBuffer(dir) => self.waiters.push_back((slot, generation, dir)),
            Action::ShutdownWrite(dir) => {
                let fd = e.dst(dir);
                // The fd is open (owned by this entry); -1 (no upstream) fails harmlessly.
                let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Write);
            }
            Action::Connected => {
                let tap = self.metrics.rule(ri).tap();
                if let Some(e) = self.slab.get_mut(slot, generation) {
                    e.session.connected(shard, now);
                    if let (Some(tap), Some(up)) = (tap, e.session.upstream()) {
                        e.tap = Some(tap.open_session(e.session.client, up));
                    }
                }
            }
            Action::ConnectFailed(res) => {
                let rt = self.runtime.rule(ri);
                if let Some(e) = self.slab.get_mut(slot, generation) {
                    e.session.connect_failed(rt, shard, -res, now);
                }
            }
            Action::FirstByte => {
                shard.first_byte(now.saturating_duration_since(e.conn.accepted_at));
            }
            Action::Bytes { dir, n, path } => shard.bytes(dir, path, n),
            Action::TrySplice(dir) => {
                let ev = match self.pipes.lease() {
                    Some(p) => {
                        let capacity = p.capacity;
                        if let Some(e) = self.slab.get_mut(slot, generation) {
                            e.pipes[dir as usize] = Some(p);
                        }
                        Event::SpliceStarted { dir, capacity }
                    }
                    None => Event::SpliceUnavailable { dir },
                };
                self.conn_event(Token::new(slot, generation, dir, OpKind::Poll), ev, now);
            }
            Action::CancelRecv(dir) => {
                let sqe = opcode::AsyncCancel2::new(types::CancelBuilder::user_data(token(
                    dir,
                    OpKind::Recv,
                )))
                .build()
                .user_data(token(dir, OpKind::Cancel));
                self.push_conn(slot, generation, sqe, None);
            }
            Action::ParkPoll(dir) => {
                let sqe = opcode::PollAdd::new(
                    types::Fd(e.src(dir)),
                    (libc::POLLIN | libc::POLLRDHUP) as u32,
                )
                .build()
                .user_data(token(dir, OpKind::ParkPoll));
                self.push_conn(slot, generation, sqe, None);
            }
            Action::PollIn(dir) => {
                let sqe = opcode::PollAdd::new(
                    types::Fd(e.src(dir)),
                    (libc::POLLIN | libc::POLLRDHUP) as u32,
                )
                .multi(true)
                .build()
                .user_data(token(dir, OpKind::Poll));
                self.push_conn(slot, generation, sqe, None);
            }
            Action::PollOut(dir) => {
                let sqe = opcode::PollAdd::new(types::Fd(e.dst(dir)), libc::POLLOUT as u32)
                    .build()
                    .user_data(token(dir, OpKind::PollOut));
                self.push_conn(slot, generation, sqe, None);
            }
            Action::Pump(dir) => self.pump(slot, generation, dir, now),
            Action::PumpLater(dir) => self.run_queue.push_back((slot, generation, dir)),
            Action::LeaveSplice(dir) => {
                let sqe = opcode::PollRemove::new(token(dir, OpKind::Poll))
                    .build()
                    .user_data(token(dir, OpKind::Cancel));
                self.push_conn(slot, generation, sqe, None);
                if let Some(p) = self
                    .slab
                    .get_mut(slot, generation)
                    .and_then(|e| e.pipes[dir as usize].take())
                {
                    self.pipes.give_back(p, true);
                }
            }
            Action::Transferred { dir, took } => shard.transfer(dir, took),
            Action::CancelAll => {
                if e.in_flight == 0 {
                    return;
                }
                let fds: Vec<(i32, Direction)> = e.fds().collect();
                for (fd, dir) in fds {
                    let sqe =
                        opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
                            .build()
                            .user_data(token(dir, OpKind::Cancel));
                    self.push_conn(slot, generation, sqe, None);
                }
            }
            Action::Finish { reason, reset } => self.finish(slot, generation, reason, reset, now),
        }
    }

    /// Sends (the rest of) the preamble to the upstream: built once from the PROXY header the
    /// session core writes and the client's bytes that came after its own header.
    fn send_preamble(&mut self, slot: u32, generation: u16, now: Instant) {
        let token = Token::new(
            slot,
            generation,
            Direction::ClientToUpstream,
            OpKind::PreambleSend,
        );
        let Some(e) = self.slab.get_mut(slot, generation) else {
            return;
        };
        let rt = self.runtime.rule(e.rule);
        let shard = self.metrics.rule(e.rule).shard(self.id);
        let fd = e.dst(Direction::ClientToUpstream);
        let Entry {
            preamble,
            session,
            conn,
            ..
        } = e;
        let pending = preamble
            .as_mut()
            .filter(|p| !p.outgoing || p.sent < p.filled);
        let Some(p) = pending else {
            // Nothing (left) to send: the buffer's job is done.
            *preamble = None;
            return self.conn_event(token, Event::PreambleDone, now);
        };
        if !p.outgoing {
            let mut header = [0u8; proxy::V1_BUF_LEN];
            let n = session.upstream_header(rt, &mut header);
            let early = p.buf.get(p.sent..p.filled).unwrap_or(&[]);
            let mut out = Vec::with_capacity(n + early.len());
            out.extend_from_slice(&header[..n]);
            out.extend_from_slice(early);
            if !early.is_empty() {
                conn.bytes[0] += early.len() as u64;
                conn.note_sent(Instant::now());
                shard.bytes(
                    Direction::ClientToUpstream,
                    PathKind::Copy,
                    early.len() as u64,
                );
            }
            p.filled = out.len();
            p.buf = out;
            p.sent = 0;
            p.outgoing = true;
            if p.filled == 0 {
                *preamble = None;
                return self.conn_event(token, Event::PreambleDone, now);
            }
        }
        let len = u32::try_from(p.filled - p.sent).unwrap_or(u32::MAX);
        // SAFETY (pointer arithmetic): `sent < filled <= buf.len()`.
        let ptr = unsafe { p.buf.as_ptr().add(p.sent) };
        let sqe = opcode::Send::new(types::Fd(fd), ptr, len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(token.encode());
        self.push_conn(slot, generation, sqe, None);
    }

    /// Runs a spliced direction's pump (the splice syscalls) and feeds the outcome back.
    fn pump(&mut self, slot: u32, generation: u16, dir: Direction, now: Instant) {
        let Some(e) = self.slab.get_mut(slot, generation) else {
            return;
        };
        if e.conn.is_closing() {
            return;
        }
        let Entry {
            conn,
            client,
            upstream,
            pipes,
            rule,
            ..
        } = e;
        let (Some(upstream), Some(pipe), Some(state)) = (
            upstream.as_ref(),
            pipes[dir as usize].as_ref(),
            conn.splice_mut(dir),
        ) else {
            return;
        };
        let (src, dst) = match dir {
            Direction::ClientToUpstream => (&*client, upstream),
            Direction::UpstreamToClient => (upstream, &*client),
        };
        let started = Instant::now();
        let p = state.pump(&mut SysPipeIo { src, dst, pipe });
        if p.moved_out > 0 {
            self.metrics
                .rule(*rule)
                .shard(self.id)
                .transfer(dir, started.elapsed());
        }
        self.conn_event(
            Token::new(slot, generation, dir, OpKind::Poll),
            Event::Pumped { dir, p },
            now,
        );
    }

    /// Pumps the directions that yielded on their budget last round (only those: a pump that
    /// yields again waits for the next round, after the ring had its turn).
    fn run_pending_pumps(&mut self, now: Instant) {
        for _ in 0..self.run_queue.len() {
            let Some((slot, generation, dir)) = self.run_queue.pop_front() else {
                break;
            };
            self.pump(slot, generation, dir, now);
        }
    }

    fn finish(
        &mut self,
        slot: u32,
        generation: u16,
        reason: CloseReason,
        reset: bool,
        now: Instant,
    ) {
        let Some(mut e) = self.slab.remove(slot, generation) else {
            return;
        };
        // A finishing connection is closing, so it was counted unsettled.
        self.unsettled = self.unsettled.saturating_sub(1);
        self.unsettled_by_rule[e.rule] = self.unsettled_by_rule[e.rule].saturating_sub(1);
        if reset {
            net::set_reset_on_close(SockRef::from(&e.client));
            if let Some(u) = &e.upstream {
                net::set_reset_on_close(SockRef::from(u));
            }
        }
        for d in Direction::ALL {
            if let Some(p) = e.pipes[d as usize].take() {
                self.pipes.give_back(p, !e.conn.pipe_has_bytes(d));
            }
        }
        if let (Some(session), Some(tap)) = (e.tap.take(), self.metrics.rule(e.rule).tap()) {
            tap.close_session(session, reason);
        }
        let path = match e.conn.bytes_path {
            [_, 0] => "copy",
            [0, _] => "splice",
            _ => "copy+splice",
        };
        let end = End {
            reason,
            bytes: e.conn.bytes,
            path,
        };
        let shard = self.metrics.rule(e.rule).shard(self.id);
        // Dropping the fds closes them: every op on them has completed.
        drop(e.upstream);
        drop(e.client);
        e.session
            .finish(self.runtime.rule(e.rule), &self.metrics, shard, end, now);
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
            let id = self.id;
            let reason = match self.slab.get_mut(s, g) {
                Some(e)
                    if e.conn.phase() == ConnPhase::ReadingHeader
                        && e.preamble
                            .as_ref()
                            .and_then(|p| p.deadline)
                            .is_some_and(|d| now >= d) =>
                {
                    let shard = self.metrics.rule(e.rule).shard(id);
                    e.session.header_failed(shard, true)
                }
                _ => continue,
            };
            self.conn_event(
                Token::new(s, g, Direction::ClientToUpstream, OpKind::HeaderRecv),
                Event::GaveUp { reason },
                now,
            );
        }
    }

    fn tick(&mut self, now: Instant) {
        let phase = self.shutdown.phase();
        if phase >= Phase::Draining && !self.draining {
            self.draining = true;
            for i in 0..self.listeners.len() {
                let l = &mut self.listeners[i];
                if l.state == ListenerState::Cancelling || l.state == ListenerState::Closed {
                    continue;
                }
                if l.in_flight == 0 {
                    l.state = ListenerState::Closed;
                    l.fd = None;
                    continue;
                }
                l.state = ListenerState::Cancelling;
                let target =
                    Token::new(i as u32, 0, Direction::ClientToUpstream, OpKind::Accept).encode();
                let sqe = opcode::AsyncCancel2::new(types::CancelBuilder::user_data(target).all())
                    .build()
                    .user_data(
                        Token::new(
                            i as u32,
                            0,
                            Direction::ClientToUpstream,
                            OpKind::CancelAccept,
                        )
                        .encode(),
                    );
                // SAFETY: a cancel carries no pointer and names no fd.
                unsafe { self.ring.push(sqe) };
            }
        }
        if phase == Phase::Closing && !self.closing {
            self.closing = true;
            self.broadcast(Event::Shutdown, now, |_| true);
        }
        if !self.draining {
            for i in 0..self.listeners.len() {
                if let ListenerState::Backoff(until) = self.listeners[i].state
                    && now >= until
                {
                    self.listeners[i].state = ListenerState::Open;
                    self.queue_arm(i);
                }
            }
        }
        self.pick_up_lost_wakeups(now);
        let runtime = self.runtime.clone();
        self.expire_headers(now);
        self.broadcast(Event::Park, now, |e| e.conn.wants_park(now));
        self.broadcast(Event::IdleTimeout, now, |e| {
            runtime
                .rule(e.rule)
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
                    .first_byte_overdue(now, runtime.rule(e.rule).rule.first_byte_timeout())
            });
        }
        self.wake_waiters(now);
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

/// The client fd of a live entry (-1 if it is gone: the op then fails with EBADF).
fn e_client_fd(slab: &Slab, slot: u32, generation: u16) -> std::os::fd::RawFd {
    slab.get(slot, generation)
        .map_or(-1, |e| e.src(Direction::ClientToUpstream))
}
