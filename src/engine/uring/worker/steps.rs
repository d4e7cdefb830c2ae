//! Carrying out what the connection machine and the session core ask for: taking a
//! connection on at accept, the PROXY header and preamble, the dial, the actions that push
//! ops (built by [`super::super::ops`]), the splice pumps, and the close.

use std::os::fd::OwnedFd;
use std::time::Instant;

use socket2::SockRef;

use super::Worker;
use crate::engine::uring::conn::{Action, Conn, Event, Phase as ConnPhase};
use crate::engine::uring::listeners::Accepted;
use crate::engine::uring::ops;
use crate::engine::uring::slab::{Entry, Preamble, Target};
use crate::engine::uring::splice::SysPipeIo;
use crate::engine::uring::token::{OpKind, Token};
use crate::net;
use crate::session::{Dial, End, HeaderStep, proxy};
use crate::vocab::errno_of;
use crate::vocab::{CloseReason, Direction, PathKind};

/// The header buffer a connection starts with (grown by doubling up to the header's cap):
/// a slowloris on the PROXY header costs this, not a pool buffer.
const HEADER_BUF_START: usize = 256;

impl Worker {
    /// Takes an accepted connection on: admission by the session core, the client socket's
    /// options, its entry, and the machine's start.
    pub(super) fn accept_conn(&mut self, accepted: Accepted, now: Instant) {
        let Accepted {
            client,
            rule: ri,
            port,
        } = accepted;
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
        // Where the connection's packets were processed, against where this worker runs: what
        // CPU-affine accept (`steer`) is for, exported as `ringfwd_accepts_total`.
        if let (Ok(incoming), Ok(here)) = (
            SockRef::from(&client).cpu_affinity(),
            nix::sched::sched_getcpu(),
        ) {
            self.metrics.accepted_on(self.id, incoming == here);
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
        session.set_listen_port(rt, port);
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
        self.listeners.unsettled(ri);
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

    /// Feeds a header recv's bytes to the session core: read more, dial, or close.
    pub(super) fn header_received(&mut self, t: Token, res: i32, now: Instant) -> Event {
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
        debug_assert_eq!(e.in_flight(), 0, "dialing with ops in flight");
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
                    self.submit(slot, generation, Action::Dial);
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

    /// Carries out one action of connection `slot`: the ops it pushes go through
    /// [`Worker::submit`]; the rest (counting, buffers, pumps, the close) is done here.
    pub(super) fn act(&mut self, slot: u32, generation: u16, action: Action, now: Instant) {
        let Some(e) = self.slab.get(slot, generation) else {
            return;
        };
        let ri = e.rule;
        let shard = self.metrics.rule(ri).shard(self.id);
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
                    // `filled < buf.len()` after this (the header parser rejects a header
                    // before it reaches `cap`).
                    let grown = (p.buf.len() * 2).clamp(HEADER_BUF_START, cap.max(1));
                    p.buf.resize(grown, 0);
                }
                self.submit(slot, generation, action);
            }
            Action::SendPreamble => self.send_preamble(slot, generation, now),
            Action::Send { dir, buf, off, len } => {
                if let (0, Some(session), Some(tap)) =
                    (off, e.tap.as_ref(), self.metrics.rule(ri).tap())
                {
                    tap.data(session, dir, self.pool.filled(buf, len));
                }
                self.submit(slot, generation, action);
            }
            Action::Recv(_)
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
                    .and_then(|e| e.pipes[dir as usize].take())
                {
                    self.pipes.give_back(p, true);
                }
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
        let timeout = &self.rules[e.rule].connect_timeout;
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
        self.submit(slot, generation, Action::SendPreamble);
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
        self.listeners.settled(e.rule);
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
}
