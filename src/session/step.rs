//! The session as a step machine, free of I/O: an engine feeds it what happened to the
//! connection (accepted, preamble bytes read, connected, connect failed with an errno,
//! preamble sent, relay ended) and carries out the [`Step`] each event returns (read the
//! preamble within a cap and a deadline, connect to this address, send these bytes, relay,
//! close with this reason, RST or FIN). Nothing here touches a socket or a clock: `now` is
//! passed in, so every sequence runs in `tests.rs` without either.
//!
//! ```text
//!  accept ─► start ─┬─► ReadPreamble ─(bytes)─► … ─┐
//!                   └──────────────────────────────┴─► Connect ─(failed)─► Connect … ─► Close
//!                                                        │ (connected)
//!                                                        ├─► SendPreamble ─(sent)─┐
//!                                                        └────────────────────────┴─► Relay
//!  Relay ─(relay ended)─► Close                          any step ─(abort)─► Close
//! ```
//!
//! The record is written exactly once by construction: only the machine makes a
//! [`Closing`] (it is `#[must_use]` and cannot be built or cloned elsewhere), and
//! [`Session::close`] takes both the session and its `Closing` by value — no session ends
//! unrecorded behind a `Closing`, and none is recorded twice.
//!
//! Every count goes through a [`Recorder`], which the metrics implement: the session knows
//! what to count, not where the counters live.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::{Dial, HeaderStep, RuleRuntime, Session};
use crate::upstream::Picker;
use crate::vocab::{CloseReason, ConnectError, Direction, PathKind, RejectReason};

/// Where a session's counts and its access-log record go (implemented by the metrics; by a
/// plain list in the tests).
pub trait Recorder {
    /// A connection was admitted.
    fn accepted(&self);
    /// A connection was turned away (at accept, or when its preamble was read).
    fn rejected(&self, why: RejectReason);
    /// The upstream connect completed `took` after the accept.
    fn connected(&self, took: Duration);
    /// An upstream connect failed.
    fn connect_error(&self, why: ConnectError);
    /// `n` bytes the client sent with its preamble reached the upstream (by copy).
    fn sent_early(&self, n: u64);
    /// The session ended: count it and write its access-log record.
    fn closed(&self, record: &Record<'_>);
}

/// One finished session, as the access log prints it.
#[derive(Debug, Clone)]
pub struct Record<'a> {
    pub rule: &'a str,
    /// The route the session took (`default`: the rule's own upstream; `-`: none chosen).
    pub route: &'a str,
    /// The listen port the client connected to, for a rule that listens on a port range.
    pub port: Option<u16>,
    pub client: Option<SocketAddr>,
    /// The member of the last connect attempt (none if no attempt was made).
    pub upstream: Option<SocketAddr>,
    /// Connect attempts made (failover tries further members).
    pub attempts: u32,
    /// Bytes delivered `[client → upstream, upstream → client]`, the preamble's included.
    pub bytes: [u64; 2],
    pub duration: Duration,
    /// How the bytes moved.
    pub end: End,
}

/// How a session ended, as the engine saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct End {
    pub reason: CloseReason,
    /// Bytes the relay delivered `[client → upstream, upstream → client]` (the session adds
    /// the preamble bytes it had sent).
    pub bytes: [u64; 2],
    /// The path that carried the bytes (`Copy` when none moved).
    pub path: PathKind,
    /// Both paths carried some (the io_uring engine moves a direction to splice mid-session
    /// in `auto` mode, or copies when no pipe is free): the record says `copy+splice`.
    pub mixed: bool,
}

impl End {
    /// A relay that copied every byte (the tokio and std engines, any early close).
    pub fn copied(reason: CloseReason, bytes: [u64; 2]) -> Self {
        Self {
            reason,
            bytes,
            path: PathKind::Copy,
            mixed: false,
        }
    }

    /// A relay whose bytes went `by_path[PathKind as usize]` each way.
    pub fn by_path(reason: CloseReason, bytes: [u64; 2], by_path: [u64; 2]) -> Self {
        let [copy, splice] = by_path;
        Self {
            reason,
            bytes,
            path: if copy == 0 && splice > 0 {
                PathKind::Splice
            } else {
                PathKind::Copy
            },
            mixed: copy > 0 && splice > 0,
        }
    }

    /// The record's `path`: `copy`, `splice` or `copy+splice`.
    pub fn path_label(&self) -> &'static str {
        if self.mixed {
            "copy+splice"
        } else {
            self.path.as_str()
        }
    }
}

/// What the engine does next for a session.
#[must_use = "a step is what the engine must carry out"]
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Read the client's preamble: at most `cap` bytes in all, by `deadline`; after each
    /// read feed everything read so far to [`Session::on_preamble`], or report
    /// [`Session::on_preamble_failed`].
    ReadPreamble { cap: usize, deadline: Instant },
    /// Open a socket to `addr` and connect within `timeout`; report
    /// [`Session::on_connected`], [`Session::on_connect_failed`] or [`Session::on_socket_failed`].
    Connect { addr: SocketAddr, timeout: Duration },
    /// Send the upstream, before any relayed byte, the PROXY header the rule sends
    /// ([`Session::upstream_header`]), then the preamble's bytes from `early_from` on (the
    /// client's stream after its own PROXY header, a ClientHello included); report
    /// [`Session::on_sent`] or [`Session::on_send_failed`].
    SendPreamble { early_from: usize },
    /// Relay until the session ends, then report [`Session::on_relay_ended`]. `client_spoke`:
    /// the client's first bytes already reached the upstream (with the preamble), so the
    /// `first_byte_timeout` clock starts now.
    Relay { client_spoke: bool },
    /// Close the client (and the upstream, if any), with RST when [`Closing::resets`], then
    /// hand the `Closing` to [`Session::close`].
    Close(Closing),
}

/// The end the machine decided on. Only the machine makes one; [`Session::close`] takes it.
#[must_use = "a closing session must be handed to Session::close, which counts and records it"]
#[derive(Debug, PartialEq, Eq)]
pub struct Closing {
    end: End,
}

impl Closing {
    fn new(end: End) -> Self {
        Self { end }
    }

    /// Close both sockets with RST (`SO_LINGER` 0) rather than FIN.
    pub fn resets(&self) -> bool {
        self.end.reason.resets()
    }

    pub fn reason(&self) -> CloseReason {
        self.end.reason
    }
}

/// What an event needs besides the session: its rule, where it records, and the balancer
/// state to pick a member with.
pub struct Cx<'a, R: Recorder> {
    pub rule: &'a RuleRuntime,
    pub rec: &'a R,
    /// The worker's own balancer states (one per pool of the rule), or `None` to use the
    /// rule's shared ones (engines whose tasks move between threads).
    pub pickers: Option<&'a mut [Picker]>,
}

impl<'a, R: Recorder> Cx<'a, R> {
    /// A context on the rule's shared balancer states.
    pub fn shared(rule: &'a RuleRuntime, rec: &'a R) -> Self {
        Self {
            rule,
            rec,
            pickers: None,
        }
    }
}

/// What the engine learnt about an accepted socket before the session starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// The peer's address (`getpeername`); `None` when it failed.
    pub peer: Option<SocketAddr>,
    /// The client reset or vanished while it waited in the listen queue (no peer address,
    /// or an error pending on the socket).
    pub dead: bool,
    /// The listener's port.
    pub port: u16,
}

impl Session {
    /// Admits an accepted connection (counted either way); `Err`: reset it at once, there
    /// is no session.
    ///
    /// # Errors
    /// The reason the connection is turned away.
    pub fn accept<R: Recorder>(
        cx: &Cx<'_, R>,
        a: Accepted,
        now: Instant,
        draining: bool,
    ) -> Result<Self, RejectReason> {
        cx.rule.admit(cx.rec, a, now, draining)
    }

    /// The first step, once the engine set the socket up; `local` is the address the client
    /// connected to, needed only when [`RuleRuntime::wants_local_addr`]. A client that died
    /// in the listen queue is closed at once: a flood of them must cost no upstream connect.
    pub fn start<R: Recorder>(
        &mut self,
        cx: &mut Cx<'_, R>,
        local: Option<SocketAddr>,
        now: Instant,
    ) -> Step {
        if self.dead_on_arrival {
            return self.closing(CloseReason::Reset);
        }
        self.set_local(local);
        if self.awaits_header() {
            return self.read_preamble(cx.rule);
        }
        self.ready(cx, 0, &[], now)
    }

    fn read_preamble(&self, rt: &RuleRuntime) -> Step {
        let (cap, timeout) = rt.header_limits();
        Step::ReadPreamble {
            cap,
            deadline: self.accepted_at + timeout,
        }
    }

    /// Everything read from the client so far (each call extends the previous one).
    pub fn on_preamble<R: Recorder>(
        &mut self,
        cx: &mut Cx<'_, R>,
        read: &[u8],
        now: Instant,
    ) -> Step {
        match self.feed_header(cx.rule, cx.rec, read, now) {
            HeaderStep::NeedMore => self.read_preamble(cx.rule),
            HeaderStep::Ready { consumed } => self.ready(cx, consumed, read, now),
            HeaderStep::Reject(why) => self.closing(CloseReason::Rejected(why)),
        }
    }

    /// The client closed or failed before its preamble was complete, or (`timed_out`) the
    /// deadline passed.
    pub fn on_preamble_failed<R: Recorder>(&mut self, cx: &Cx<'_, R>, timed_out: bool) -> Step {
        let reason = self.header_failed(cx.rec, timed_out);
        self.closing(reason)
    }

    /// The preamble is read (or there is none): what goes upstream first is the PROXY header
    /// the rule sends, then the client's bytes after its own header (`read[consumed..]`);
    /// then dial. Always inlined, as is [`Session::next_member`]: a session without a
    /// preamble then reaches its one out-of-line call, [`Session::dial`], straight from
    /// `start` (a call less on every connection; measured in the session bench).
    #[inline(always)]
    fn ready<R: Recorder>(
        &mut self,
        cx: &mut Cx<'_, R>,
        consumed: usize,
        read: &[u8],
        now: Instant,
    ) -> Step {
        if let Some(p) = &mut self.proxy {
            let early = read.len().saturating_sub(consumed) as u64;
            if cx.rule.wants_local_addr() || early > 0 {
                p.outgoing = Some(Outgoing {
                    from: consumed,
                    early,
                });
            }
        }
        self.next_member(cx, now)
    }

    #[inline(always)]
    fn next_member<R: Recorder>(&mut self, cx: &mut Cx<'_, R>, now: Instant) -> Step {
        let rt = cx.rule;
        let dial = match cx.pickers.as_deref_mut() {
            Some(p) => self.dial(rt, p, now),
            None => rt.with_shared_picker(|p| self.dial(rt, p, now)),
        };
        match dial {
            Dial::Connect(addr) => Step::Connect {
                addr,
                timeout: rt.rule.connect_timeout,
            },
            Dial::GiveUp(reason) => self.closing(reason),
        }
    }

    /// The upstream connect completed.
    pub fn on_connected<R: Recorder>(&mut self, cx: &Cx<'_, R>, now: Instant) -> Step {
        self.connected(cx.rec, now);
        if let Some(o) = self.proxy.as_ref().and_then(|p| p.outgoing.as_ref()) {
            Step::SendPreamble { early_from: o.from }
        } else {
            Step::Relay {
                client_spoke: false,
            }
        }
    }

    /// The upstream connect failed with `errno` (positive): counted against the member
    /// (passive health); the next member, or the end.
    pub fn on_connect_failed<R: Recorder>(
        &mut self,
        cx: &mut Cx<'_, R>,
        errno: i32,
        now: Instant,
    ) -> Step {
        self.connect_failed(cx.rule, cx.rec, errno, now);
        self.next_member(cx, now)
    }

    /// The upstream socket could not be created: out of descriptors or socket memory ends
    /// the session (`rejected{fd_exhausted}`); anything else is the member's failure.
    pub fn on_socket_failed<R: Recorder>(
        &mut self,
        cx: &mut Cx<'_, R>,
        errno: i32,
        now: Instant,
    ) -> Step {
        match self.socket_failed(cx.rule, cx.rec, errno, now) {
            Some(reason) => self.closing(reason),
            None => self.next_member(cx, now),
        }
    }

    fn take_outgoing(&mut self) -> Option<Outgoing> {
        self.proxy.as_mut().and_then(|p| p.outgoing.take())
    }

    /// The preamble ([`Step::SendPreamble`]) was sent whole.
    pub fn on_sent<R: Recorder>(&mut self, cx: &Cx<'_, R>) -> Step {
        let early = self.take_outgoing().map_or(0, |o| o.early);
        if let (Some(p), true) = (&mut self.proxy, early > 0) {
            cx.rec.sent_early(early);
            p.early_sent = early;
        }
        Step::Relay {
            client_spoke: early > 0,
        }
    }

    /// Sending the preamble failed with `errno` (positive).
    pub fn on_send_failed(&mut self, errno: i32) -> Step {
        self.closing(CloseReason::from_io_errno(errno))
    }

    /// The relay ended; `end.bytes` are the relay's own counts.
    pub fn on_relay_ended(&mut self, end: End) -> Closing {
        Closing::new(end)
    }

    /// The engine ends the session before its relay for a reason of its own: shutdown cut
    /// in, no room or thread for it (`FdExhausted`, counted as turned away, as a socket
    /// that could not be created), a relay it could not set up.
    pub fn abort<R: Recorder>(&mut self, cx: &Cx<'_, R>, reason: CloseReason) -> Closing {
        if reason == CloseReason::FdExhausted {
            cx.rec.rejected(RejectReason::FdExhausted);
        }
        self.take_outgoing();
        Closing::new(End::copied(reason, [0, 0]))
    }

    fn closing(&mut self, reason: CloseReason) -> Step {
        self.take_outgoing();
        Step::Close(Closing::new(End::copied(reason, [0, 0])))
    }

    /// The session is over and its sockets are closed: counts it, frees its place under
    /// `max_connections`, per client and on its member, and writes its record — once, as it
    /// takes the session and the machine's `Closing` by value.
    pub fn close<R: Recorder>(mut self, closing: Closing, cx: &Cx<'_, R>, now: Instant) {
        let mut end = closing.end;
        end.bytes[Direction::ClientToUpstream as usize] +=
            self.proxy.as_ref().map_or(0, |p| p.early_sent);
        // By reference: the session is not copied again on its way out.
        self.record(cx.rule, cx.rec, end, now);
    }
}

/// What goes upstream before the relay: the PROXY header, then the client's bytes read with
/// its preamble, from `from` on (`early` of them).
#[derive(Debug)]
pub(super) struct Outgoing {
    from: usize,
    early: u64,
}
