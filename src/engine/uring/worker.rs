//! One worker: a thread pinned to a core that owns a ring, its listeners, its buffer pool and
//! a slab of connections, and runs the event loop. Nothing here is shared with other workers
//! except the read-only config, the metrics atomics and the shutdown flag.
//!
//! The loop: submit what is queued and wait (bounded by the next tick) → take every
//! completion → decode its [`Token`] → hand it to the connection's state machine
//! ([`Conn::handle`]) → carry out the actions it returns. Every SQE goes through
//! [`Worker::push`], the one place that submits.
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{IoUring, cqueue, opcode, squeue, types};
use socket2::{SockAddr, SockRef};

use super::bufpool::{BUFFER_GROUP, BufPool};
use super::conn::{Action, Actions, Conn, DirState, Event};
use super::pipepool::PipePool;
use super::splice::{Pipe, SysPipeIo};
use super::token::{OpKind, Token};
use crate::config::{Config, DataPath, Rule};
use crate::metrics::tap::TapSession;
use crate::metrics::{CloseReason, ConnectError, Direction, Metrics, RejectReason, SessionRecord};
use crate::net;
use crate::shutdown::{Phase, Shutdown};

/// How often the worker looks at timeouts and the shutdown state when nothing else wakes it.
const TICK: Duration = Duration::from_millis(100);

/// Per-rule data the worker needs on the hot path.
struct RuleCtx {
    rule: Rule,
    /// The data path for this rule's connections (a tapped rule is always copy).
    policy: DataPath,
    upstream: SockAddr,
    /// Read by the kernel when a connect's link timeout is submitted; lives as long as the
    /// worker and is never modified.
    connect_timeout: types::Timespec,
}

#[derive(Debug, PartialEq, Eq)]
enum ListenerState {
    Armed,
    /// Out of fds: re-arm after this instant.
    Backoff(Instant),
    /// Cancel submitted; waiting for the accept's last completion.
    Cancelling,
    Closed,
}

struct Listener {
    fd: Option<OwnedFd>,
    rule: usize,
    state: ListenerState,
    exhausted: net::ExhaustionLog,
}

/// A live connection in the slab.
struct Entry {
    conn: Conn,
    rule: usize,
    client: OwnedFd,
    upstream: OwnedFd,
    peer: Option<SocketAddr>,
    /// The pipe each direction leased while on the splice path.
    pipes: [Option<Pipe>; 2],
    /// This connection's session in the rule's traffic tap, if the rule has one.
    tap: Option<TapSession>,
}

impl Entry {
    fn src(&self, dir: Direction) -> RawFd {
        match dir {
            Direction::ClientToUpstream => self.client.as_raw_fd(),
            Direction::UpstreamToClient => self.upstream.as_raw_fd(),
        }
    }

    fn dst(&self, dir: Direction) -> RawFd {
        self.dst_fd(dir).as_raw_fd()
    }

    fn dst_fd(&self, dir: Direction) -> &OwnedFd {
        match dir {
            Direction::ClientToUpstream => &self.upstream,
            Direction::UpstreamToClient => &self.client,
        }
    }
}

struct Slot {
    generation: u16,
    entry: Option<Entry>,
}

/// What a worker is built from.
pub struct WorkerSetup {
    pub id: usize,
    pub cpu: Option<usize>,
    pub listeners: Vec<(usize, TcpListener)>,
}

pub struct Worker {
    // Field order matters: the ring is dropped before the pool whose memory it references.
    ring: IoUring,
    pool: BufPool,
    pipes: PipePool,
    id: usize,
    rules: Vec<RuleCtx>,
    listeners: Vec<Listener>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    live: usize,
    max_connections: usize,
    waiters: VecDeque<(u32, u16, Direction)>,
    /// SQEs that did not fit in the submission queue; a linked pair stays one element so it
    /// is never split across two submissions (the link would be lost).
    backlog: VecDeque<(squeue::Entry, Option<squeue::Entry>)>,
    /// Spliced directions that stopped on their fairness budget and must pump again.
    run_queue: VecDeque<(u32, u16, Direction)>,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
    draining: bool,
    closing: bool,
    cqes: Vec<(u64, i32, u32)>,
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

/// Builds a ring with the best task-running mode the kernel has: SINGLE_ISSUER +
/// DEFER_TASKRUN (6.1), else COOP_TASKRUN (5.19), else plain.
pub fn build_ring(entries: u32) -> io::Result<(IoUring, &'static str)> {
    let cq = entries.saturating_mul(4);
    type Tune = fn(&mut io_uring::Builder);
    let attempts: [(&'static str, Tune); 3] = [
        ("single_issuer+defer_taskrun", |b| {
            b.setup_single_issuer().setup_defer_taskrun();
        }),
        ("coop_taskrun", |b| {
            b.setup_coop_taskrun().setup_taskrun_flag();
        }),
        ("plain", |_| {}),
    ];
    let mut last = None;
    for (name, f) in attempts {
        let mut b = IoUring::builder();
        b.setup_cqsize(cq).setup_submit_all();
        f(&mut b);
        match b.build(entries) {
            Ok(r) => return Ok((r, name)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EINVAL)))
}

impl Worker {
    /// Sets up the ring and the pool. Must run on the worker's own thread (SINGLE_ISSUER binds
    /// the ring to the thread that creates it).
    ///
    /// # Errors
    /// [`WorkerError`] when the ring or the pool cannot be set up.
    pub fn new(
        config: &Config,
        setup: WorkerSetup,
        metrics: Arc<Metrics>,
        shutdown: Shutdown,
    ) -> Result<Self, WorkerError> {
        let id = setup.id;
        let (ring, mode) = build_ring(config.uring.ring_entries)
            .map_err(|source| WorkerError::Ring { id, source })?;
        // Nothing on this engine's data path should need io-wq (splice runs on this thread after
        // ring readiness); cap its workers so a surprise fallback cannot grow thousands of
        // `iou-wrk` threads (DESIGN fact 1).
        if let Err(e) = ring.submitter().register_iowq_max_workers(&mut [2, 2]) {
            tracing::debug!(worker = id, error = %e, "cannot cap io-wq workers");
        }
        let count = u16::try_from(config.uring.buffers.min(1 << 15)).unwrap_or(1 << 15);
        let buf_size = u32::try_from(config.uring.buffer_size.bytes()).unwrap_or(u32::MAX);
        let (pool, reg_err) = BufPool::new(&ring, count, buf_size)
            .map_err(|source| WorkerError::Pool { id, source })?;
        if let Some(e) = reg_err {
            let bytes = u64::from(count) * u64::from(buf_size);
            tracing::warn!(
                worker = id,
                error = %e,
                "cannot register {} KiB of buffers per worker with io_uring (RLIMIT_MEMLOCK too low: raise it with `ulimit -l`, LimitMEMLOCK= in the systemd unit, or CAP_IPC_LOCK; or lower [uring] buffers/buffer_size); continuing with unregistered buffers",
                bytes >> 10
            );
        }
        tracing::debug!(
            worker = id,
            mode,
            registered = pool.registered(),
            "ring ready"
        );
        let rules = config
            .rules
            .iter()
            .map(|r| RuleCtx {
                rule: r.clone(),
                policy: if r.tap.is_some() {
                    DataPath::Copy
                } else {
                    config.mode
                },
                upstream: SockAddr::from(r.upstream.members[0].addrs[0]),
                connect_timeout: types::Timespec::from(r.connect_timeout),
            })
            .collect();
        let listeners = setup
            .listeners
            .into_iter()
            .map(|(rule, l)| Listener {
                fd: Some(OwnedFd::from(l)),
                rule,
                state: ListenerState::Closed,
                exhausted: net::ExhaustionLog::default(),
            })
            .collect();
        let max_connections = config.live_connections_bound();
        let wants_pipes = config.mode != DataPath::Copy;
        let pipes = PipePool::new(
            id,
            if wants_pipes {
                config.uring.pipes as usize
            } else {
                0
            },
            config.uring.pipe_size.as_usize(),
        );
        Ok(Self {
            ring,
            pool,
            pipes,
            id,
            rules,
            listeners,
            // Reserved up front and never grown past: an entry's address stays put while the
            // kernel may read from it.
            slots: Vec::with_capacity(max_connections),
            free: Vec::new(),
            live: 0,
            max_connections,
            waiters: VecDeque::new(),
            backlog: VecDeque::new(),
            run_queue: VecDeque::new(),
            metrics,
            shutdown,
            draining: false,
            closing: false,
            cqes: Vec::with_capacity(1024),
        })
    }

    /// Runs the event loop until shutdown has drained every connection.
    pub fn run(mut self) {
        for i in 0..self.listeners.len() {
            self.arm_accept(i);
        }
        let mut next_tick = Instant::now() + TICK;
        loop {
            self.flush_backlog();
            let wait = if self.run_queue.is_empty() {
                next_tick.saturating_duration_since(Instant::now())
            } else {
                Duration::ZERO
            };
            let ts = types::Timespec::from(wait.max(Duration::from_micros(1)));
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
                    ) => {}
                Err(e) => {
                    tracing::error!(worker = self.id, error = %e, "io_uring_enter failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            let now = Instant::now();
            self.cqes.clear();
            self.cqes.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
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
                && self.live == 0
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

    /// The one place SQEs are queued.
    fn push(&mut self, entry: squeue::Entry) {
        self.push_group(entry, None);
    }

    /// Queues `first` and, if given, `second` linked after it (`first` carries `IO_LINK`):
    /// both go into the same submission or both wait in the backlog.
    fn push_group(&mut self, first: squeue::Entry, second: Option<squeue::Entry>) {
        if !self.backlog.is_empty() || !self.try_push_group(&first, second.as_ref()) {
            self.backlog.push_back((first, second));
        }
    }

    fn try_push_group(&mut self, first: &squeue::Entry, second: Option<&squeue::Entry>) -> bool {
        let need = 1 + usize::from(second.is_some());
        let room = |ring: &mut IoUring| {
            let sq = ring.submission();
            sq.capacity() - sq.len()
        };
        if room(&mut self.ring) < need {
            // Full: hand what is queued to the kernel first.
            let _ = self.ring.submit();
            if room(&mut self.ring) < need {
                return false;
            }
        }
        let mut sq = self.ring.submission();
        // SAFETY: every pointer an entry carries stays valid until its completion: buffers
        // are owned by the op until its CQE (the state machine releases them only then),
        // connect timespecs live in `self.rules` for the worker's lifetime, and the fds are
        // closed only after every op on them completed (`Conn::in_flight` reaches zero).
        // There is room for the whole group (checked above), so neither push fails.
        unsafe {
            let _ = sq.push(first);
            if let Some(s) = second {
                let _ = sq.push(s);
            }
        }
        true
    }

    fn flush_backlog(&mut self) {
        while let Some((first, second)) = self.backlog.pop_front() {
            if !self.try_push_group(&first, second.as_ref()) {
                self.backlog.push_front((first, second));
                return;
            }
        }
    }

    fn arm_accept(&mut self, i: usize) {
        let Some(fd) = self.listeners[i].fd.as_ref().map(AsRawFd::as_raw_fd) else {
            return;
        };
        let token = Token::new(i as u32, 0, Direction::ClientToUpstream, OpKind::Accept);
        let e = opcode::AcceptMulti::new(types::Fd(fd))
            .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            .build()
            .user_data(token.encode());
        self.listeners[i].state = ListenerState::Armed;
        self.push(e);
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
        match t.kind {
            OpKind::Accept => self.on_accept(t.slot as usize, res, flags, now),
            OpKind::CancelAccept => {}
            OpKind::Connect => self.conn_event(t, Event::Connected { res }, now),
            OpKind::ConnectTimeout => self.conn_event(t, Event::ConnectTimerDone, now),
            OpKind::Recv => {
                let buf = cqueue::buffer_select(flags);
                if buf.is_some() {
                    self.pool.taken();
                }
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
        }
        self.wake_waiters(now);
    }

    fn on_accept(&mut self, li: usize, res: i32, flags: u32, now: Instant) {
        if !cqueue::more(flags) {
            // The multishot accept ended: cancelled, or an error such as EMFILE.
            let l = &mut self.listeners[li];
            if self.draining || l.state == ListenerState::Cancelling {
                l.state = ListenerState::Closed;
                l.fd = None;
            } else if res < 0 && net::is_resource_exhaustion(&io::Error::from_raw_os_error(-res)) {
                // io_uring's accept takes the fd before looking at the queue, so this also
                // happens with nothing pending: no connection was rejected, none is lost.
                if let Some(held_back) = l.exhausted.hit(now) {
                    tracing::warn!(worker = self.id, rule = %self.rules[l.rule].rule.name, error = %io::Error::from_raw_os_error(-res), held_back, "accept: out of file descriptors; backing off");
                }
                l.state = ListenerState::Backoff(now + net::ACCEPT_BACKOFF);
            } else {
                // Any other end (or a last connection delivered without MORE): re-arm.
                self.arm_accept(li);
            }
        }
        if res < 0 {
            return;
        }
        // SAFETY: a successful accept completion carries a new fd that nothing else owns.
        let client = unsafe { OwnedFd::from_raw_fd(res) };
        if self.listeners[li].exhausted.recovered() {
            let rule = &self.rules[self.listeners[li].rule].rule.name;
            tracing::info!(worker = self.id, rule = %rule, "accept: file descriptors available again");
        }
        self.accept_conn(li, client, now);
    }

    fn accept_conn(&mut self, li: usize, client: OwnedFd, now: Instant) {
        let ri = self.listeners[li].rule;
        let shard = self.metrics.rule(ri).shard(self.id);
        let reject = |why: RejectReason| {
            shard.rejected(why);
            net::set_reset_on_close(SockRef::from(&client));
        };
        if self.draining {
            reject(RejectReason::Shutdown);
            return;
        }
        if self.live >= self.max_connections {
            reject(RejectReason::MaxConnections);
            return;
        }
        let rc = &self.rules[ri];
        let client_ref = SockRef::from(&client);
        if let Err(e) = net::apply_tcp_options(client_ref, &rc.rule.tcp) {
            tracing::debug!(error = %e, "socket option on client socket failed");
        }
        let peer = SockRef::from(&client)
            .peer_addr()
            .ok()
            .and_then(|a| a.as_socket());
        let upstream = match net::upstream_socket(rc.rule.upstream.members[0].addrs[0], &rc.rule.tcp)
            .and_then(|s| {
                s.set_nonblocking(true)?;
                Ok(OwnedFd::from(s))
            }) {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(worker = self.id, rule = %rc.rule.name, error = %e, "cannot create upstream socket; connection dropped");
                reject(RejectReason::FdExhausted);
                return;
            }
        };
        shard.accepted();
        let conn = Conn::connecting(now, rc.policy, self.pool.buf_size());
        let tap = self
            .metrics
            .rule(ri)
            .tap()
            .map(|t| t.open_session(peer, rc.rule.upstream.members[0].addrs[0]));
        let entry = Entry {
            conn,
            rule: ri,
            client,
            upstream,
            peer,
            pipes: [None, None],
            tap,
        };
        let (slot, generation) = match self.free.pop() {
            Some(s) => {
                let sl = &mut self.slots[s as usize];
                sl.entry = Some(entry);
                (s, sl.generation)
            }
            None => {
                debug_assert!(self.slots.len() < self.slots.capacity());
                self.slots.push(Slot {
                    generation: 0,
                    entry: Some(entry),
                });
                ((self.slots.len() - 1) as u32, 0)
            }
        };
        self.live += 1;
        let e = self.slots[slot as usize]
            .entry
            .as_ref()
            .expect("just inserted");
        let rc = &self.rules[ri];
        let connect = opcode::Connect::new(
            types::Fd(e.upstream.as_raw_fd()),
            rc.upstream.as_ptr().cast(),
            rc.upstream.len(),
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
        let timeout = opcode::LinkTimeout::new(&rc.connect_timeout)
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
        self.push_group(connect, Some(timeout));
    }

    fn conn_event(&mut self, t: Token, ev: Event, now: Instant) {
        let Some(slot) = self.slots.get_mut(t.slot as usize) else {
            tracing::error!(
                worker = self.id,
                ?t,
                "completion for a slot that never existed"
            );
            return;
        };
        let Some(entry) = slot
            .entry
            .as_mut()
            .filter(|_| slot.generation == t.generation)
        else {
            // Cannot happen while every op is counted; if it does, at least keep the buffer.
            tracing::error!(worker = self.id, ?t, ?ev, "stale completion");
            if let Event::Received { buf: Some(b), .. } = ev {
                self.pool.recycle(b);
            }
            return;
        };
        let mut actions = Actions::default();
        entry.conn.handle(ev, now, &mut actions);
        for a in actions.iter() {
            self.act(t.slot, t.generation, a, now);
        }
    }

    fn act(&mut self, slot: u32, generation: u16, action: Action, now: Instant) {
        let Some(e) = self.slots[slot as usize].entry.as_ref() else {
            return;
        };
        let shard = self.metrics.rule(e.rule).shard(self.id);
        match action {
            Action::Recv(dir) => {
                let sqe = opcode::Recv::new(types::Fd(e.src(dir)), std::ptr::null_mut(), 0)
                    .buf_group(BUFFER_GROUP)
                    .build()
                    .flags(squeue::Flags::BUFFER_SELECT)
                    .user_data(Token::new(slot, generation, dir, OpKind::Recv).encode());
                self.push(sqe);
            }
            Action::Send { dir, buf, off, len } => {
                if let (0, Some(session), Some(tap)) =
                    (off, e.tap.as_ref(), self.metrics.rule(e.rule).tap())
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
                self.push(sqe.user_data(Token::new(slot, generation, dir, OpKind::Send).encode()));
            }
            Action::Release(b) => self.pool.recycle(b),
            Action::WaitBuffer(dir) => self.waiters.push_back((slot, generation, dir)),
            Action::ShutdownWrite(dir) => {
                let _ = SockRef::from(e.dst_fd(dir)).shutdown(std::net::Shutdown::Write);
            }
            Action::Connected => shard.connected(now.saturating_duration_since(e.conn.accepted_at)),
            Action::ConnectFailed(res) => {
                let err = io::Error::from_raw_os_error(-res);
                let kind = ConnectError::classify(&err);
                shard.connect_error(kind);
                let rule = &self.rules[e.rule].rule;
                let shown = if kind == ConnectError::Timeout {
                    format!("timed out after {:?}", rule.connect_timeout)
                } else {
                    err.to_string()
                };
                tracing::warn!(rule = %rule.name, upstream = %rule.upstream.members[0].addrs[0], error = %shown, "upstream connect failed");
            }
            Action::FirstByte => {
                shard.first_byte(now.saturating_duration_since(e.conn.accepted_at))
            }
            Action::Bytes { dir, n, path } => shard.bytes(dir, path, n),
            Action::TrySplice(dir) => {
                let ev = match self.pipes.lease() {
                    Some(p) => {
                        let capacity = p.capacity;
                        if let Some(e) = self.slots[slot as usize].entry.as_mut() {
                            e.pipes[dir as usize] = Some(p);
                        }
                        Event::SpliceStarted { dir, capacity }
                    }
                    None => Event::SpliceUnavailable { dir },
                };
                self.conn_event(Token::new(slot, generation, dir, OpKind::Poll), ev, now);
            }
            Action::PollIn(dir) => {
                let sqe = opcode::PollAdd::new(
                    types::Fd(e.src(dir)),
                    (libc::POLLIN | libc::POLLRDHUP) as u32,
                )
                .multi(true)
                .build()
                .user_data(Token::new(slot, generation, dir, OpKind::Poll).encode());
                self.push(sqe);
            }
            Action::PollOut(dir) => {
                let sqe = opcode::PollAdd::new(types::Fd(e.dst(dir)), libc::POLLOUT as u32)
                    .build()
                    .user_data(Token::new(slot, generation, dir, OpKind::PollOut).encode());
                self.push(sqe);
            }
            Action::Pump(dir) => self.pump(slot, generation, dir, now),
            Action::PumpLater(dir) => self.run_queue.push_back((slot, generation, dir)),
            Action::LeaveSplice(dir) => {
                let target = Token::new(slot, generation, dir, OpKind::Poll).encode();
                let sqe = opcode::PollRemove::new(target)
                    .build()
                    .user_data(Token::new(slot, generation, dir, OpKind::Cancel).encode());
                self.push(sqe);
                if let Some(p) = self.slots[slot as usize]
                    .entry
                    .as_mut()
                    .and_then(|e| e.pipes[dir as usize].take())
                {
                    self.pipes.give_back(p, true);
                }
            }
            Action::Transferred { dir, took } => shard.transfer(dir, took),
            Action::CancelAll => {
                for (fd, dir) in [
                    (e.client.as_raw_fd(), Direction::ClientToUpstream),
                    (e.upstream.as_raw_fd(), Direction::UpstreamToClient),
                ] {
                    let sqe =
                        opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
                            .build()
                            .user_data(Token::new(slot, generation, dir, OpKind::Cancel).encode());
                    self.push(sqe);
                }
            }
            Action::Finish { reason, reset } => self.finish(slot, reason, reset, now),
        }
    }

    /// Runs a spliced direction's pump (the splice syscalls) and feeds the outcome back.
    fn pump(&mut self, slot: u32, generation: u16, dir: Direction, now: Instant) {
        let Some(e) = self.slots[slot as usize].entry.as_mut() else {
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
        let (Some(pipe), Some(state)) = (pipes[dir as usize].as_ref(), conn.splice_mut(dir)) else {
            return;
        };
        let (src, dst) = match dir {
            Direction::ClientToUpstream => (&*client, &*upstream),
            Direction::UpstreamToClient => (&*upstream, &*client),
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
            if self.slots[slot as usize].generation == generation {
                self.pump(slot, generation, dir, now);
            }
        }
    }

    fn finish(&mut self, slot: u32, reason: CloseReason, reset: bool, now: Instant) {
        let s = &mut self.slots[slot as usize];
        let Some(mut e) = s.entry.take() else { return };
        s.generation = s.generation.wrapping_add(1);
        self.free.push(slot);
        self.live -= 1;
        if reset {
            net::set_reset_on_close(SockRef::from(&e.client));
            net::set_reset_on_close(SockRef::from(&e.upstream));
        }
        for d in Direction::ALL {
            if let Some(p) = e.pipes[d as usize].take() {
                self.pipes.give_back(p, !e.conn.pipe_has_bytes(d));
            }
        }
        if let (Some(session), Some(tap)) = (e.tap.take(), self.metrics.rule(e.rule).tap()) {
            tap.close_session(session, reason);
        }
        let rule = &self.rules[e.rule].rule;
        let duration = now.saturating_duration_since(e.conn.accepted_at);
        let path = match e.conn.bytes_path {
            [_, 0] => "copy",
            [0, _] => "splice",
            _ => "copy+splice",
        };
        self.metrics.rule(e.rule).shard(self.id).closed(duration);
        self.metrics.log_session(&SessionRecord {
            rule: &rule.name,
            client: e.peer,
            upstream: rule.upstream.members[0].addrs[0],
            bytes_c2u: e.conn.bytes[0],
            bytes_u2c: e.conn.bytes[1],
            duration,
            path,
            reason,
        });
        // Dropping the entry closes both fds: every op on them has completed.
        drop(e);
    }

    /// Lets directions that found the pool empty read again: as many as there are buffers in
    /// the ring now. Waiters whose connection closed meanwhile are dropped without using one.
    fn wake_waiters(&mut self, now: Instant) {
        let mut budget = self.pool.in_ring();
        while budget > 0 {
            let Some((slot, generation, dir)) = self.waiters.pop_front() else {
                return;
            };
            let waiting = self.slots[slot as usize]
                .entry
                .as_ref()
                .filter(|_| self.slots[slot as usize].generation == generation)
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

    fn tick(&mut self, now: Instant) {
        let phase = self.shutdown.phase();
        if phase >= Phase::Draining && !self.draining {
            self.draining = true;
            for i in 0..self.listeners.len() {
                match self.listeners[i].state {
                    ListenerState::Armed => {
                        self.listeners[i].state = ListenerState::Cancelling;
                        let target =
                            Token::new(i as u32, 0, Direction::ClientToUpstream, OpKind::Accept)
                                .encode();
                        let sqe = opcode::AsyncCancel::new(target).build().user_data(
                            Token::new(
                                i as u32,
                                0,
                                Direction::ClientToUpstream,
                                OpKind::CancelAccept,
                            )
                            .encode(),
                        );
                        self.push(sqe);
                    }
                    ListenerState::Backoff(_) | ListenerState::Closed => {
                        self.listeners[i].state = ListenerState::Closed;
                        self.listeners[i].fd = None;
                    }
                    ListenerState::Cancelling => {}
                }
            }
        }
        if phase == Phase::Closing && !self.closing {
            self.closing = true;
            for s in 0..self.slots.len() {
                if self.slots[s].entry.is_some() {
                    let g = self.slots[s].generation;
                    self.conn_event(
                        Token::new(s as u32, g, Direction::ClientToUpstream, OpKind::Recv),
                        Event::Shutdown,
                        now,
                    );
                }
            }
        }
        if !self.draining {
            for i in 0..self.listeners.len() {
                if let ListenerState::Backoff(until) = self.listeners[i].state
                    && now >= until
                {
                    self.arm_accept(i);
                }
            }
        }
        for s in 0..self.slots.len() {
            let Some(e) = self.slots[s].entry.as_ref() else {
                continue;
            };
            let Some(idle) = self.rules[e.rule].rule.idle_timeout else {
                continue;
            };
            if e.conn.idle_expired(now, idle) {
                let g = self.slots[s].generation;
                self.conn_event(
                    Token::new(s as u32, g, Direction::ClientToUpstream, OpKind::Recv),
                    Event::IdleTimeout,
                    now,
                );
            }
        }
        self.wake_waiters(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The per-connection memory target is 4 KiB; the slab entry is the only per-connection
    /// allocation of the engine (buffers are pooled, fds and sockets live in the kernel).
    #[test]
    fn a_connection_slot_stays_small() {
        let size = std::mem::size_of::<Slot>();
        assert!(size <= 512, "Slot grew to {size} bytes");
    }
}
