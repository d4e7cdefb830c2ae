//! Carrying out what the connection machine and the session core ask for: taking a
//! connection on at accept, the PROXY header and preamble, the dial, the actions that push
//! ops (built by [`super::super::ops`]), the splice pumps, and the close.

use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use socket2::SockRef;

use super::{Held, Worker};
use crate::engine::accept;
use crate::engine::uring::conn::{Action, Conn, DirState, Event, Phase as ConnPhase};
use crate::engine::uring::listeners::Accepted;
use crate::engine::uring::ops;
use crate::engine::uring::slab::{Entry, Preamble, Target};
use crate::engine::uring::token::{OpKind, Token};
use crate::engine::uring::wait::Watch;
use crate::net;
use crate::session::step::End;
use crate::session::{Cx, Step, proxy};
use crate::vocab::{CloseReason, Direction, errno_of};

/// The header buffer a connection starts with (grown by doubling up to the header's cap):
/// a slowloris on the PROXY header costs this, not a pool buffer.
const HEADER_BUF_START: usize = 256;

impl Worker {
    /// Takes an accepted connection on: admission and the client socket's set-up
    /// ([`accept::admit`]), its entry, and the machine's start.
    pub(super) fn accept_conn(&mut self, accepted: Accepted, now: Instant) {
        let Accepted {
            client,
            rule: ri,
            port,
        } = accepted;
        let rt = self.runtime.rule(ri);
        let sink = self.metrics.sink(self.metrics.rule(ri).shard(self.id));
        let mut cx = Cx {
            rule: rt,
            rec: &sink,
            pickers: Some(&mut self.rules[ri].pickers),
        };
        let draining = self.shutdown.refuses_new();
        let Some((mut session, step)) = accept::admit(&client, &mut cx, port, draining) else {
            return;
        };
        // Where the connection's packets were processed, against where this worker runs: what
        // CPU-affine accept (`steer`) is for, exported as `ringfwd_accepts_total`.
        if let (Ok(incoming), Ok(here)) = (
            SockRef::from(&client).cpu_affinity(),
            nix::sched::sched_getcpu(),
        ) {
            self.metrics.accepted_on(self.id, incoming == here);
        }
        let step = match step {
            // The slab holds every rule's max_connections, so the gate turns connections
            // away before this; should it ever be full, close this one cleanly.
            _ if !self.slab.has_room() => Step::Close(session.abort(&cx, CloseReason::Error)),
            step => step,
        };
        if let Step::Close(closing) = step {
            return accept::close(session, closing, &cx, client, None);
        }
        if let Some(w) = &mut self.epoll {
            // Before the first op on it is pushed (see the wait module).
            w.watch(client.as_fd(), Watch::Conn);
        }
        let reads_header = matches!(step, Step::ReadPreamble { .. });
        let sends_header = rt.rule.proxy_protocol != crate::config::ProxyProtocol::Off;
        let conn = Conn::with_preamble(
            now,
            self.rules[ri].policy,
            self.pool.buf_size(),
            reads_header,
            sends_header,
        )
        .with_auto_thresholds(self.auto_thresholds.0, self.auto_thresholds.1)
        .with_poll_first(self.poll_first)
        .with_multishot(self.multishot);
        let deadline = match step {
            Step::ReadPreamble { deadline, .. } => Some(deadline),
            _ => None,
        };
        let mut entry = Entry::new(conn, session, ri, client, step);
        if reads_header || sends_header {
            entry.setup_mut().preamble = Some(Box::new(Preamble {
                buf: if reads_header {
                    vec![0; HEADER_BUF_START]
                } else {
                    Vec::new()
                },
                deadline,
                ..Preamble::default()
            }));
        }
        let (slot, generation) = self.slab.insert(entry);
        self.listeners.unsettled(ri);
        let t = Token::new(
            slot,
            generation,
            Direction::ClientToUpstream,
            OpKind::Connect,
        );
        self.conn_event(t, Event::Start, now);
    }

    /// Feeds a header recv's bytes (`res`) to the session core — or, with `timed_out`, the
    /// header's deadline: read more, dial, or close.
    pub(super) fn header_received(&mut self, t: Token, res: i32, now: Instant) -> Event {
        self.preamble_event(t, Some(res), now)
    }

    /// The preamble's deadline passed.
    pub(super) fn header_expired(&mut self, t: Token, now: Instant) -> Event {
        self.preamble_event(t, None, now)
    }

    fn preamble_event(&mut self, t: Token, res: Option<i32>, now: Instant) -> Event {
        let Some(e) = self.slab.get_mut(t.slot, t.generation) else {
            return Event::CancelDone;
        };
        if e.conn.phase() != ConnPhase::ReadingHeader {
            // Cancelled by a close already under way.
            return Event::CancelDone;
        }
        let ri = e.rule();
        let sink = self.metrics.sink(self.metrics.rule(ri).shard(self.id));
        let mut cx = Cx {
            rule: self.runtime.rule(ri),
            rec: &sink,
            pickers: Some(&mut self.rules[ri].pickers),
        };
        let (_, session, setup) = e.parts();
        let p = setup
            .and_then(|s| s.preamble.as_deref_mut())
            .expect("a header is being read");
        let step = match res {
            None => session.on_preamble_failed(&cx, true),
            // The client closed or failed before its header was complete.
            Some(res) if res <= 0 => session.on_preamble_failed(&cx, false),
            Some(res) => {
                p.filled += res as usize;
                session.on_preamble(&mut cx, &p.buf[..p.filled], now)
            }
        };
        let ev = match &step {
            Step::ReadPreamble { .. } => Event::HeaderIncomplete,
            Step::Close(c) => Event::GaveUp { reason: c.reason() },
            _ => {
                p.deadline = None;
                Event::HeaderRead
            }
        };
        e.set_step(step);
        ev
    }

    /// Carries out the session's `Connect` step: opens a socket to the member and submits
    /// the connect with its link timeout; tells the machine `GaveUp` when the session ends.
    fn dial(&mut self, slot: u32, generation: u16, now: Instant) {
        let Some(e) = self.slab.get_mut(slot, generation) else {
            return;
        };
        debug_assert_eq!(e.in_flight(), 0, "dialing with ops in flight");
        // The previous attempt's socket: every op on it has completed.
        e.upstream = None;
        let ri = e.rule();
        let sink = self.metrics.sink(self.metrics.rule(ri).shard(self.id));
        let mut cx = Cx {
            rule: self.runtime.rule(ri),
            rec: &sink,
            pickers: Some(&mut self.rules[ri].pickers),
        };
        let gave_up = loop {
            let addr = match e.take_step() {
                Some(Step::Connect { addr, .. }) => addr,
                Some(Step::Close(c)) => {
                    let reason = c.reason();
                    e.set_step(Step::Close(c));
                    break reason;
                }
                _ => {
                    let c = e.session.abort(&cx, CloseReason::Error);
                    e.set_step(Step::Close(c));
                    break CloseReason::Error;
                }
            };
            let socket = net::upstream_socket(addr, &cx.rule.rule.tcp, e.session.origin(cx.rule))
                .and_then(|s| {
                    s.set_nonblocking(true)?;
                    Ok(OwnedFd::from(s))
                });
            match socket {
                Ok(fd) => {
                    if let Some(w) = &mut self.epoll {
                        // Before the connect is pushed (see the wait module).
                        w.watch(fd.as_fd(), Watch::Conn);
                    }
                    e.upstream = Some(fd);
                    e.setup_mut().target = Target::from(addr);
                    self.submit(slot, generation, Action::Dial);
                    return;
                }
                Err(err) => {
                    let next = e.session.on_socket_failed(&mut cx, errno_of(&err), now);
                    if let Step::Close(c) = &next
                        && c.reason() == CloseReason::FdExhausted
                    {
                        tracing::warn!(worker = self.id, rule = %cx.rule.rule.name, error = %err, "cannot create upstream socket; connection reset");
                    }
                    e.set_step(next);
                }
            }
        };
        let t = Token::new(
            slot,
            generation,
            Direction::ClientToUpstream,
            OpKind::Connect,
        );
        self.conn_event(t, Event::GaveUp { reason: gave_up }, now);
    }

    /// Carries out one action of connection `slot`: the ops it pushes go through
    /// [`Worker::submit`]; the rest (counting, buffers, pumps, the close) is done here.
    pub(super) fn act(&mut self, slot: u32, generation: u16, action: Action, now: Instant) {
        let Some(e) = self.slab.get(slot, generation) else {
            return;
        };
        let ri = e.rule();
        let shard = self.metrics.rule(ri).shard(self.id);
        match action {
            Action::Dial => self.dial(slot, generation, now),
            Action::RecvHeader => {
                let cap = self.runtime.rule(ri).header_limits().0;
                let Some(p) = self
                    .slab
                    .get_mut(slot, generation)
                    .and_then(Entry::preamble_mut)
                else {
                    return;
                };
                if p.filled == p.buf.len() {
                    // Grown only here, between completions: no recv is writing into it.
                    // `filled < buf.len()` after this (the header parser rejects a header
                    // before it reaches `cap`).
                    let grown = (p.buf.len() * 2).clamp(HEADER_BUF_START, cap.max(1));
                    p.buf.resize(grown, 0);
                }
                self.submit(slot, generation, action);
            }
            Action::SendPreamble => self.send_preamble(slot, generation, now),
            Action::Send { dir, buf, off, len } => {
                if let (0, Some(session), Some(tap)) = (off, e.tap(), self.metrics.rule(ri).tap()) {
                    tap.data(session, dir, self.pool.filled(buf, len));
                }
                self.submit(slot, generation, action);
            }
            Action::Recv(_)
            | Action::RecvMulti(_)
            | Action::CancelRecv(_)
            | Action::ParkPoll(_)
            | Action::PollIn(_)
            | Action::PollOut(_)
            | Action::CancelAll => self.submit(slot, generation, action),
            Action::LeaveSplice(dir) => {
                self.submit(slot, generation, action);
                if let Some(p) = self
                    .slab
                    .get_mut(slot, generation)
                    .and_then(|e| e.take_pipe(dir))
                {
                    self.pipes.give_back(p, true);
                }
            }
            Action::Release(b) => self.pool.recycle(b),
            Action::Hold { dir, res, buf } => {
                self.held.push_back(Held {
                    slot,
                    generation,
                    dir,
                    res,
                    buf,
                });
            }
            Action::Unhold(dir) => {
                let at = self
                    .held
                    .iter()
                    .position(|h| (h.slot, h.generation, h.dir) == (slot, generation, dir));
                if let Some(h) = at.and_then(|i| self.held.remove(i)) {
                    let last = !self
                        .held
                        .iter()
                        .any(|h| (h.slot, h.generation, h.dir) == (slot, generation, dir));
                    let ev = Event::Unheld {
                        dir,
                        res: h.res,
                        buf: h.buf,
                        last,
                    };
                    self.conn_event(Token::new(slot, generation, dir, OpKind::Recv), ev, now);
                } else {
                    tracing::error!(worker = self.id, slot, ?dir, "nothing held to hand back");
                }
            }
            Action::WaitBuffer(dir) => self.waiters.push_back((slot, generation, dir)),
            Action::ShutdownWrite(dir) => {
                let fd = e.dst(dir);
                // The fd is open (owned by this entry); -1 (no upstream) fails harmlessly.
                let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Write);
            }
            Action::Connected | Action::ConnectFailed(_) => {
                let tap = self.metrics.rule(ri).tap();
                let sink = self.metrics.sink(shard);
                let Some(e) = self.slab.get_mut(slot, generation) else {
                    return;
                };
                let mut cx = Cx {
                    rule: self.runtime.rule(ri),
                    rec: &sink,
                    pickers: Some(&mut self.rules[ri].pickers),
                };
                match action {
                    // The next member is picked now; the machine dials it once the failed
                    // attempt's ops have drained.
                    Action::ConnectFailed(res) => {
                        let next = e.session.on_connect_failed(&mut cx, -res, now);
                        e.set_step(next);
                    }
                    _ => match e.session.on_connected(&cx, now) {
                        // Nothing to send first: the connection relays from here on, and
                        // what it needed to get here goes.
                        Step::Relay { client_spoke } => {
                            if client_spoke {
                                e.conn.note_sent(now);
                            }
                            e.relaying();
                        }
                        next => e.set_step(next),
                    },
                }
                if let (Some(tap), Some(up), Action::Connected) =
                    (tap, e.session.upstream(), action)
                {
                    let session = tap.open_session(e.session.client, up);
                    e.set_tap(session);
                }
            }
            Action::FirstByte => {
                shard.first_byte(now.saturating_duration_since(e.session.accepted_at));
            }
            Action::Bytes { dir, n, path } => shard.bytes(dir, path, n),
            Action::TrySplice(dir) => {
                let ev = match self.pipes.lease() {
                    Some(p) => {
                        let capacity = p.capacity;
                        if let Some(e) = self.slab.get_mut(slot, generation) {
                            e.set_pipe(dir, p);
                        }
                        Event::SpliceStarted { dir, capacity }
                    }
                    None => Event::SpliceUnavailable { dir },
                };
                self.conn_event(Token::new(slot, generation, dir, OpKind::Poll), ev, now);
            }
            Action::Pump(dir) => self.pump(slot, generation, dir, now),
            Action::PumpLater(dir) => self.run_queue.push_back((slot, generation, dir)),
            Action::Transferred { dir, took } => shard.transfer(dir, took),
            Action::Finish { reason, reset } => self.finish(slot, generation, reason, reset, now),
        }
    }

    /// Pushes the ops `action` submits for connection `slot` (built by [`ops::build`] from
    /// its entry) and counts them on the entry: they are in flight until their last
    /// completions.
    fn submit(&mut self, slot: u32, generation: u16, action: Action) {
        let Some(e) = self.slab.get_mut(slot, generation) else {
            return;
        };
        let expected = ops::pushed(action, e.open_fds(), e.in_flight());
        let timeout = &self.rules[e.rule()].connect_timeout;
        let list = ops::build(action, slot, generation, e, &self.pool, timeout);
        let n = list.sqes();
        debug_assert_eq!(
            n, expected,
            "{action:?} pushed other ops than ops::pushed says"
        );
        for (op, token) in list {
            self.ring.push(op, token);
        }
        e.submitted(n);
    }

    /// Carries out the session's `SendPreamble` step (the PROXY header the session core
    /// writes, then the client's bytes after its own header), built once, sent until done;
    /// then tells the session it was sent.
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
        let ri = e.rule();
        let rt = self.runtime.rule(ri);
        let (conn, session, setup) = e.parts();
        if let Some(s) = setup
            && let (Some(p), Some(Step::SendPreamble { early_from })) =
                (s.preamble.as_mut(), &s.step)
        {
            if !p.outgoing {
                let mut header = [0u8; proxy::V1_BUF_LEN];
                let n = session.upstream_header(rt, &mut header);
                let early = p.buf.get(*early_from..p.filled).unwrap_or(&[]);
                p.buf = [&header[..n], early].concat();
                (p.filled, p.sent, p.outgoing) = (p.buf.len(), 0, true);
            }
            if p.sent < p.filled {
                return self.submit(slot, generation, Action::SendPreamble);
            }
        }
        let sink = self.metrics.sink(self.metrics.rule(ri).shard(self.id));
        let cx = Cx::shared(rt, &sink);
        if let Step::Relay { client_spoke: true } = session.on_sent(&cx) {
            conn.note_sent(Instant::now());
        }
        // Sent (or nothing to send): the buffer's job is done, and the connection relays.
        e.relaying();
        self.conn_event(token, Event::PreambleDone, now);
    }

    /// Runs a spliced direction's pump (the splice syscalls) and feeds the outcome back.
    fn pump(&mut self, slot: u32, generation: u16, dir: Direction, now: Instant) {
        let Some(e) = self.slab.get_mut(slot, generation) else {
            return;
        };
        if e.conn.is_closing() {
            return;
        }
        let ri = e.rule();
        let Some((state, mut io)) = e.splice_parts(dir) else {
            return;
        };
        let started = Instant::now();
        let mut p = state.pump(&mut io);
        // An end of stream on the splice path is checked as the copy path checks a recv of 0
        // (see `was_reset`): a reset whose error a send on the same socket already took must
        // not pass on as FIN.
        if p.finished && e.conn.dir(dir.reverse()) != DirState::Done && super::was_reset(e.src(dir))
        {
            p.finished = false;
            p.error = Some(libc::ECONNRESET);
        }
        if p.moved_out > 0 {
            self.metrics
                .rule(ri)
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
    pub(super) fn run_pending_pumps(&mut self, now: Instant) {
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
        self.listeners.settled(e.rule());
        if reset {
            net::set_reset_on_close(SockRef::from(&e.client));
            if let Some(u) = &e.upstream {
                net::set_reset_on_close(SockRef::from(u));
            }
        }
        // Completions held for a send that will not finish now.
        if !self.held.is_empty() {
            let pool = &mut self.pool;
            self.held.retain(|h| {
                let mine = (h.slot, h.generation) == (slot, generation);
                if let (true, Some(b)) = (mine, h.buf) {
                    pool.recycle(b);
                }
                !mine
            });
        }
        for d in Direction::ALL {
            if let Some(p) = e.take_pipe(d) {
                self.pipes.give_back(p, !e.conn.pipe_has_bytes(d));
            }
        }
        if let (Some(session), Some(tap)) = (e.take_tap(), self.metrics.rule(e.rule()).tap()) {
            tap.close_session(session, reason);
        }
        // The close the session decided on, or the relay's end.
        let closing = match e.take_step() {
            Some(Step::Close(c)) => c,
            _ => {
                (e.session).on_relay_ended(End::by_path(reason, e.conn.bytes, e.conn.bytes_path()))
            }
        };
        let ri = e.rule();
        let sink = self.metrics.sink(self.metrics.rule(ri).shard(self.id));
        // Dropping the fds closes them: every op on them has completed.
        drop(e.upstream);
        drop(e.client);
        e.session
            .close(closing, &Cx::shared(self.runtime.rule(ri), &sink), now);
    }
}
