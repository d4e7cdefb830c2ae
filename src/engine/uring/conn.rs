//! One connection's relay logic, free of I/O: it takes a completion (and the time) and says
//! what to do next. The worker ([`super::worker`]) owns the ring, the fds and the buffers and
//! carries the [`Action`]s out; tests drive this machine with plain values.
//!
//! The connection owns its whole life: `Dialing` (the worker asks the session core for a
//! member and submits the connect) → `Connecting` → `Relaying`, or on a failed connect
//! `Redialing` until the attempt's ops are all complete, then `Dialing` again with another
//! member (failover). Each direction is `Reading → Writing → Reading … → Done`. EOF on a
//! direction half-closes its destination (`shutdown(SHUT_WR)`) and the other direction keeps
//! flowing; the connection closes when both are `Done`, or at once on a reset, an error, the
//! idle timeout or shutdown.
//!
//! A direction whose last read was short reads with one multishot recv ([`Multishot`]) that
//! stays armed across messages. Only such a recv can complete while its direction is
//! `Writing`; that completion is held by the worker ([`Action::Hold`]) and the recv
//! cancelled, and each finished send takes the next one back ([`Action::Unhold`]), so bytes
//! go out in the order they came and a destination that does not take them stops the reading.
//!
//! The worker counts this connection's ops where it pushes them and where their last
//! completion arrives, and says [`Event::OpsDrained`] when none is left: only then does the
//! machine redial (the old socket may be closed) or finish ([`Action::Finish`]: the fds are
//! released), so no buffer, fd or slot is reused while the kernel may still touch it.

use std::time::{Duration, Instant};

use super::splice::{Pumped, SpliceDir};
use super::stamp::{Micros, Millis};
use crate::config::DataPath;
use crate::vocab::{CloseReason, Direction, PathKind};

/// Auto mode moves a direction to splice after this many consecutive full-buffer reads (the
/// default of `[uring] auto_up_reads`).
pub const AUTO_UP_FULL_READS: u8 = 4;
/// Auto mode moves a spliced direction back to copy after this many consecutive small pumps
/// (less than half a copy buffer, pipe drained): the default of `[uring] auto_down_pumps`.
pub const AUTO_DOWN_SMALL_PUMPS: u8 = 8;

/// A copy direction with no bytes either way for this long trades its armed recv for a
/// readiness poll ([`DirState::Parked`]): an armed recv holds more kernel memory (the request,
/// its async message header and its poll entry, about 860 bytes) than a poll (the request
/// alone, about 256 bytes), and waking up from a poll costs one more ring round trip, which
/// only the first message after a pause pays.
pub const PARK_AFTER: Duration = Duration::from_secs(1);

/// A direction's multishot recv: one recv armed for many messages (kernel 6.0), which the
/// request/response case reads with, so that a message costs no new recv and no new poll.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Multishot {
    /// None armed: the direction reads with one recv per message.
    Off,
    /// Armed; every message comes as another completion of the same op.
    Armed,
    /// Being cancelled (or ending): its last completion (no `F_MORE`) is still to come.
    Ending,
}

/// Where a direction is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirState {
    /// Waiting for the upstream connect; nothing in flight for this direction.
    Connecting,
    /// A recv is in flight; no buffer is held until data arrives.
    Reading,
    /// The recv found the buffer pool empty; queued until a buffer comes back.
    WaitBuffer,
    /// A send of `buf[off..len]` is in flight; the buffer was read at `read_at`.
    Writing {
        buf: u16,
        off: u32,
        len: u32,
        read_at: Micros,
    },
    /// Waiting for the worker to lease a pipe (nothing in flight).
    Switching,
    /// On the splice path: a multishot POLLIN on the source, bytes moved by the pump.
    Splicing(SpliceDir),
    /// Idle: the recv is being cancelled to park the direction; its completion says whether
    /// it was cancelled (then poll) or raced the cancel with data (then carry on reading).
    Parking,
    /// Idle: a one-shot POLLIN is armed on the source instead of a recv; readable → recv.
    Parked,
    /// End of stream passed on (or the connection is closing).
    Done,
}

/// Where the connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// `accept_proxy`: reading the client's PROXY header (into the connection's own small
    /// buffer, never a pool buffer).
    ReadingHeader,
    /// Waiting for the worker to pick a member and submit the connect.
    Dialing,
    /// A connect (and its link timeout) is in flight.
    Connecting,
    /// Connected; the PROXY header for the upstream (and the client's bytes that came with
    /// its own header) are being sent before the relay starts.
    SendingPreamble,
    /// The last connect failed; waiting for its ops to complete before dialing again.
    Redialing,
    Relaying,
    /// Cancels issued; waiting for every in-flight op to complete.
    Closing(CloseReason),
}

/// What happened, as the worker reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A freshly admitted connection: start dialing.
    Start,
    /// The session core has no member left to try (or no descriptor for a socket), or turned
    /// the connection away after reading its header.
    GaveUp { reason: CloseReason },
    /// The client's header is not complete yet: read more.
    HeaderIncomplete,
    /// The client's header is complete and admitted: dial.
    HeaderRead,
    /// Part of the preamble went out; send the rest.
    PreambleProgress,
    /// The whole preamble went out: relay.
    PreambleDone,
    /// Sending the preamble failed (`res`: 0 or `-errno`).
    PreambleFailed { res: i32 },
    /// The connect completed (`res` 0 or `-errno`).
    Connected { res: i32 },
    /// The connect's link timeout completed (fired or cancelled).
    ConnectTimerDone,
    /// A recv completed: bytes read, 0 for EOF, or `-errno`; `buf` is the selected buffer.
    /// `more`: a multishot recv that stays armed (`IORING_CQE_F_MORE`).
    Received {
        dir: Direction,
        res: i32,
        buf: Option<u16>,
        more: bool,
    },
    /// The oldest completion the worker held for the direction ([`Action::Unhold`]), as it
    /// arrived; `last`: none is held behind it.
    Unheld {
        dir: Direction,
        res: i32,
        buf: Option<u16>,
        last: bool,
    },
    /// A send completed: bytes written or `-errno`.
    Sent { dir: Direction, res: i32 },
    /// A cancel op completed.
    CancelDone,
    /// A buffer returned to the pool and this waiting direction may read again.
    BufferAvailable { dir: Direction },
    /// No bytes either way for the idle timeout.
    IdleTimeout,
    /// The upstream sent nothing within `first_byte_timeout` of the client's first bytes.
    FirstByteTimeout,
    /// The forwarder is closing every connection.
    Shutdown,
    /// The worker leased a pipe of `capacity` bytes for the direction.
    SpliceStarted { dir: Direction, capacity: usize },
    /// No pipe was free: stay on copy.
    SpliceUnavailable { dir: Direction },
    /// The direction's source is readable (multishot poll; the op stays in flight).
    Readable { dir: Direction },
    /// The direction's destination is writable (one-shot poll completed).
    Writable { dir: Direction },
    /// The multishot poll on the direction's source ended (`res`: its last result).
    PollEnded { dir: Direction, res: i32 },
    /// Idle for [`PARK_AFTER`]: park the directions that wait in a recv.
    Park,
    /// The parked direction's source is readable (or the poll ended): read again.
    Unparked { dir: Direction },
    /// The worker ran the direction's pump.
    Pumped { dir: Direction, p: Pumped },
    /// No op of this connection is in flight any more.
    OpsDrained,
}

/// What the worker must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Submit a recv of the client's header into the connection's header buffer.
    RecvHeader,
    /// Ask the session core for a member, open a socket (closing the previous attempt's) and
    /// submit the connect with its link timeout; answer `GaveUp` if there is none.
    Dial,
    /// Send (the rest of) the preamble to the upstream; answer `PreambleDone` at once if
    /// there is nothing to send.
    SendPreamble,
    /// Submit a recv on the direction's source.
    Recv(Direction),
    /// Submit a multishot recv on the direction's source, which polls first.
    RecvMulti(Direction),
    /// A completion of the direction's multishot recv came while its last bytes are still
    /// being sent: keep it, in order, until [`Action::Unhold`].
    Hold {
        dir: Direction,
        res: i32,
        buf: Option<u16>,
    },
    /// The direction's send finished: feed back the oldest completion held for it, as
    /// [`Event::Unheld`].
    Unhold(Direction),
    /// Submit a send of `buf[off..off + len]` on the direction's destination.
    Send {
        dir: Direction,
        buf: u16,
        off: u32,
        len: u32,
    },
    /// Give a buffer back to the pool.
    Release(u16),
    /// Queue the direction until a buffer is free.
    WaitBuffer(Direction),
    /// `shutdown(SHUT_WR)` the direction's destination.
    ShutdownWrite(Direction),
    /// Upstream connected: record the connect time.
    Connected,
    /// Upstream connect failed with this `-errno`.
    ConnectFailed(i32),
    /// First byte from upstream arrived.
    FirstByte,
    /// `n` bytes reached the direction's destination.
    Bytes {
        dir: Direction,
        n: u64,
        path: PathKind,
    },
    /// Lease a pipe and answer with `SpliceStarted` or `SpliceUnavailable`.
    TrySplice(Direction),
    /// Cancel the direction's recv (to park it).
    CancelRecv(Direction),
    /// Arm a one-shot POLLIN on the parked direction's source.
    ParkPoll(Direction),
    /// Arm a multishot POLLIN on the direction's source.
    PollIn(Direction),
    /// Arm a one-shot POLLOUT on the direction's destination.
    PollOut(Direction),
    /// Run the direction's pump now.
    Pump(Direction),
    /// Run the direction's pump again after other connections had their turn.
    PumpLater(Direction),
    /// Back to copy: remove the multishot poll (one op) and give the (empty) pipe back.
    LeaveSplice(Direction),
    /// A whole buffer went from read completion to write completion in `took`.
    Transferred { dir: Direction, took: Duration },
    /// Cancel every op on the connection's fds (if any is in flight).
    CancelAll,
    /// Every op is complete: close both fds (with RST if `reset`) and free the slot.
    Finish { reason: CloseReason, reset: bool },
}

/// A small fixed-capacity list of actions (no allocation on the data path).
#[derive(Debug, Default)]
pub struct Actions {
    items: [Option<Action>; 10],
    len: usize,
}

impl Actions {
    fn push(&mut self, a: Action) {
        // Capacity is larger than any single transition emits (checked by tests).
        self.items[self.len] = Some(a);
        self.len += 1;
    }

    pub fn iter(&self) -> impl Iterator<Item = Action> + '_ {
        self.items[..self.len].iter().flatten().copied()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One connection's state.
///
/// Every idle connection carries one, so it is kept small: times as 32-bit counts
/// ([`super::stamp`]), a copy buffer's read time inside its `Writing` state, the bytes per path
/// as the total and the spliced part. The accept time lives in the session.
#[derive(Debug)]
pub struct Conn {
    phase: Phase,
    dirs: [DirState; 2],
    pub bytes: [u64; 2],
    /// Bytes delivered on the splice path, both directions together (the rest went by copy).
    spliced: u64,
    last_activity: Millis,
    /// When the client's first bytes were handed to the upstream (`first_byte_timeout`), once
    /// `first_sent`.
    first_sent_at: Millis,
    first_sent: bool,
    first_byte_seen: bool,
    policy: DataPath,
    buf_size: u32,
    full_reads: [u8; 2],
    /// Auto mode's thresholds (full reads up to splice, small pumps back to copy).
    auto_up: u8,
    auto_down: u8,
    /// [`READS_HEADER`], [`SENDS_PREAMBLE`], [`POLL_FIRST`], [`MULTISHOT`] and
    /// [`holding`] bits, in one byte: every idle connection carries this state.
    flags: u8,
    mshot: [Multishot; 2],
}

/// Read a PROXY header before dialing.
const READS_HEADER: u8 = 1;
/// Something may have to go to the upstream before the relay (a PROXY header, or the
/// client's bytes that came with its own header).
const SENDS_PREAMBLE: u8 = 1 << 1;
/// The ring takes a recv's "poll first" hint ([`Conn::expects_empty`]).
const POLL_FIRST: u8 = 1 << 2;
/// The ring has multishot recvs, and a direction that expects an empty socket reads with
/// one.
const MULTISHOT: u8 = 1 << 3;

/// The bit that says the worker holds completions for direction `d` ([`Action::Hold`]).
fn holding(d: Direction) -> u8 {
    1 << (4 + d as u8)
}

/// How a relay ends after a recv, send or splice failed with `res` (`-errno`).
fn io_end(res: i32) -> CloseReason {
    CloseReason::from_io_errno(-res)
}

impl Conn {
    /// A freshly admitted connection, nothing in flight; [`Event::Start`] sets it going.
    /// `policy` chooses the data path; `buf_size` is the copy buffer (a "full read").
    pub fn new(now: Instant, policy: DataPath, buf_size: u32) -> Self {
        Self::with_preamble(now, policy, buf_size, false, false)
    }

    /// [`Conn::new`] for a rule that reads a PROXY header from the client first
    /// (`reads_header`) and/or may send something to the upstream before relaying
    /// (`sends_preamble`).
    pub fn with_preamble(
        now: Instant,
        policy: DataPath,
        buf_size: u32,
        reads_header: bool,
        sends_preamble: bool,
    ) -> Self {
        let mut flags = 0;
        if reads_header {
            flags |= READS_HEADER | SENDS_PREAMBLE;
        }
        if sends_preamble {
            flags |= SENDS_PREAMBLE;
        }
        Self {
            flags,
            phase: Phase::Dialing,
            dirs: [DirState::Connecting; 2],
            bytes: [0; 2],
            spliced: 0,
            last_activity: Millis::of(now),
            first_byte_seen: false,
            first_sent_at: Millis::of(now),
            first_sent: false,
            policy,
            buf_size,
            full_reads: [0; 2],
            auto_up: AUTO_UP_FULL_READS,
            auto_down: AUTO_DOWN_SMALL_PUMPS,
            mshot: [Multishot::Off; 2],
        }
    }

    /// Lets [`Conn::expects_empty`] say yes (the worker's ring takes the hint).
    pub fn with_poll_first(mut self, on: bool) -> Self {
        self.set(POLL_FIRST, on);
        self
    }

    /// Lets a direction that expects an empty socket read with a multishot recv.
    pub fn with_multishot(mut self, on: bool) -> Self {
        self.set(MULTISHOT, on);
        self
    }

    fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    fn set(&mut self, flag: u8, on: bool) {
        if on {
            self.flags |= flag;
        } else {
            self.flags &= !flag;
        }
    }

    /// The direction's multishot recv.
    pub fn multishot(&self, d: Direction) -> Multishot {
        self.mshot[d as usize]
    }

    /// Whether the direction's next recv will most likely find its socket empty, so that the
    /// kernel should arm the readiness poll at once rather than try the read first: the last
    /// read was short, so it took everything there was (a request/response peer now waits for
    /// the other side). After a full read more is likely queued (a bulk stream), and the read
    /// is tried first. A wrong guess costs little either way: a poll armed on a readable
    /// socket fires at once, and a read of an empty one fails and arms the same poll.
    pub fn expects_empty(&self, d: Direction) -> bool {
        self.has(POLL_FIRST) && self.full_reads[d as usize] == 0
    }

    /// Auto mode's thresholds instead of the defaults ([`AUTO_UP_FULL_READS`],
    /// [`AUTO_DOWN_SMALL_PUMPS`]); values below 1 count as 1.
    pub fn with_auto_thresholds(mut self, up: u8, down: u8) -> Self {
        self.auto_up = up.max(1);
        self.auto_down = down.max(1);
        self
    }

    /// Bytes delivered per path (copy, splice), both directions together.
    pub fn bytes_path(&self) -> [u64; 2] {
        let mut by = [0; 2];
        by[PathKind::Copy as usize] = self.bytes[0] + self.bytes[1] - self.spliced;
        by[PathKind::Splice as usize] = self.spliced;
        by
    }

    /// The spliced direction's state, for the worker's pump.
    pub fn splice_mut(&mut self, d: Direction) -> Option<&mut SpliceDir> {
        match &mut self.dirs[d as usize] {
            DirState::Splicing(s) => Some(s),
            _ => None,
        }
    }

    /// Whether the direction's pipe (if any) still holds bytes.
    pub fn pipe_has_bytes(&self, d: Direction) -> bool {
        matches!(self.dirs[d as usize], DirState::Splicing(s) if s.in_pipe > 0)
    }

    fn wants_splice(&self, d: Direction) -> bool {
        match self.policy {
            DataPath::Copy => false,
            DataPath::Splice => true,
            DataPath::Auto => self.full_reads[d as usize] >= self.auto_up,
        }
    }

    /// Starts reading a direction on the path its policy says. A multishot recv still in
    /// flight keeps reading (armed), or ends first (its last completion starts reading again),
    /// so no bytes can arrive by two paths at once.
    fn start_reading(&mut self, d: Direction, out: &mut Actions) {
        if self.mshot[d as usize] != Multishot::Off {
            self.dirs[d as usize] = DirState::Reading;
        } else if self.wants_splice(d) {
            self.dirs[d as usize] = DirState::Switching;
            out.push(Action::TrySplice(d));
        } else {
            self.dirs[d as usize] = DirState::Reading;
            self.arm_recv(d, out);
        }
    }

    /// Submits the direction's recv: a multishot one where the socket is expected empty (a
    /// request/response peer) and the ring has them, else one recv.
    fn arm_recv(&mut self, d: Direction, out: &mut Actions) {
        if self.has(MULTISHOT) && self.expects_empty(d) {
            self.mshot[d as usize] = Multishot::Armed;
            out.push(Action::RecvMulti(d));
        } else {
            out.push(Action::Recv(d));
        }
    }

    /// Cancels the direction's multishot recv if it is armed.
    fn end_multishot(&mut self, d: Direction, out: &mut Actions) {
        if self.mshot[d as usize] == Multishot::Armed {
            self.mshot[d as usize] = Multishot::Ending;
            out.push(Action::CancelRecv(d));
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn dir(&self, d: Direction) -> DirState {
        self.dirs[d as usize]
    }

    pub fn is_closing(&self) -> bool {
        matches!(self.phase, Phase::Closing(_))
    }

    /// Whether the connection counts as settled for the worker's accept bound: relaying, or
    /// only waiting for its client's header (one fd, no upstream socket, a deadline).
    pub fn is_settled(&self) -> bool {
        matches!(self.phase, Phase::Relaying | Phase::ReadingHeader)
    }

    /// Both directions start reading (after the connect, and the preamble if any).
    fn start_relaying(&mut self, now: Instant, out: &mut Actions) {
        self.phase = Phase::Relaying;
        self.last_activity = Millis::of(now);
        for d in Direction::ALL {
            self.start_reading(d, out);
        }
    }

    /// Whether the machine waits for [`Event::OpsDrained`] (to finish, or to dial again).
    pub fn awaits_drain(&self) -> bool {
        matches!(self.phase, Phase::Closing(_) | Phase::Redialing)
    }

    /// True when no byte moved either way for `idle` (and the connection is not closing).
    /// Not while connecting: that is the connect timeout's job.
    /// Whether the connection has been idle long enough to park a direction that waits in a
    /// recv ([`Event::Park`]).
    pub fn wants_park(&self, now: Instant) -> bool {
        self.phase == Phase::Relaying
            && self.dirs.contains(&DirState::Reading)
            && self.last_activity.until(now) >= PARK_AFTER
    }

    pub fn idle_expired(&self, now: Instant, idle: Duration) -> bool {
        self.phase == Phase::Relaying && self.last_activity.until(now) >= idle
    }

    /// The client's first bytes went to the upstream at `now` (a later call keeps the first
    /// time).
    pub fn note_sent(&mut self, now: Instant) {
        if !self.first_sent {
            (self.first_sent, self.first_sent_at) = (true, Millis::of(now));
        }
    }

    /// Whether the relay must end as `first_byte_timeout` (the shared rule:
    /// [`crate::vocab::first_byte_overdue`]).
    pub fn first_byte_overdue(&self, now: Instant, timeout: Option<Duration>) -> bool {
        self.phase == Phase::Relaying
            && crate::vocab::first_byte_overdue(
                timeout,
                self.first_sent.then(|| self.first_sent_at.until(now)),
                self.first_byte_seen,
            )
    }

    /// The one transition function.
    pub fn handle(&mut self, ev: Event, now: Instant, out: &mut Actions) {
        match ev {
            Event::Start => {
                if self.phase == Phase::Dialing && self.has(READS_HEADER) {
                    self.phase = Phase::ReadingHeader;
                    out.push(Action::RecvHeader);
                } else if self.phase == Phase::Dialing {
                    self.phase = Phase::Connecting;
                    out.push(Action::Dial);
                }
            }
            Event::GaveUp { reason } => self.begin_close(reason, out),
            Event::HeaderIncomplete => {
                if self.phase == Phase::ReadingHeader {
                    out.push(Action::RecvHeader);
                }
            }
            Event::HeaderRead => {
                if self.phase == Phase::ReadingHeader {
                    self.phase = Phase::Connecting;
                    out.push(Action::Dial);
                }
            }
            Event::PreambleProgress => {
                if self.phase == Phase::SendingPreamble {
                    out.push(Action::SendPreamble);
                }
            }
            Event::PreambleDone => {
                if self.phase == Phase::SendingPreamble {
                    self.start_relaying(now, out);
                }
            }
            Event::PreambleFailed { res } => {
                let why = if res == 0 {
                    CloseReason::Reset
                } else {
                    io_end(res)
                };
                self.begin_close(why, out);
            }
            Event::Connected { res } => match self.phase {
                Phase::Connecting if res >= 0 => {
                    out.push(Action::Connected);
                    if self.has(SENDS_PREAMBLE) {
                        self.phase = Phase::SendingPreamble;
                        out.push(Action::SendPreamble);
                    } else {
                        self.start_relaying(now, out);
                    }
                }
                Phase::Connecting => {
                    // Another member is tried once this attempt's ops are all complete.
                    out.push(Action::ConnectFailed(res));
                    self.phase = Phase::Redialing;
                }
                Phase::ReadingHeader
                | Phase::Dialing
                | Phase::SendingPreamble
                | Phase::Redialing
                | Phase::Relaying
                | Phase::Closing(_) => {}
            },
            Event::OpsDrained => match self.phase {
                Phase::Redialing => {
                    self.phase = Phase::Connecting;
                    out.push(Action::Dial);
                }
                Phase::Closing(reason) => out.push(Action::Finish {
                    reason,
                    reset: reason.resets(),
                }),
                Phase::ReadingHeader
                | Phase::Dialing
                | Phase::Connecting
                | Phase::SendingPreamble
                | Phase::Relaying => {}
            },
            Event::ConnectTimerDone | Event::CancelDone => {}
            Event::Received {
                dir,
                res,
                buf,
                more,
            } => self.received(dir, res, buf, more, now, out),
            Event::Unheld {
                dir,
                res,
                buf,
                last,
            } => {
                if last {
                    self.set(holding(dir), false);
                }
                // Its multishot bookkeeping was done when it arrived.
                self.received(dir, res, buf, true, now, out);
            }
            Event::Sent { dir, res } => self.sent(dir, res, now, out),
            Event::BufferAvailable { dir } => {
                if !self.is_closing() && self.dirs[dir as usize] == DirState::WaitBuffer {
                    self.dirs[dir as usize] = DirState::Reading;
                    self.arm_recv(dir, out);
                }
            }
            Event::Park => {
                if self.phase == Phase::Relaying {
                    for d in [Direction::ClientToUpstream, Direction::UpstreamToClient] {
                        if self.dirs[d as usize] == DirState::Reading {
                            self.dirs[d as usize] = DirState::Parking;
                            if self.mshot[d as usize] == Multishot::Armed {
                                self.mshot[d as usize] = Multishot::Ending;
                            }
                            out.push(Action::CancelRecv(d));
                        }
                    }
                }
            }
            Event::Unparked { dir } => {
                if !self.is_closing() && self.dirs[dir as usize] == DirState::Parked {
                    self.dirs[dir as usize] = DirState::Reading;
                    self.arm_recv(dir, out);
                }
            }
            Event::IdleTimeout => self.begin_close(CloseReason::IdleTimeout, out),
            Event::FirstByteTimeout => self.begin_close(CloseReason::FirstByteTimeout, out),
            Event::Shutdown => self.begin_close(CloseReason::Shutdown, out),
            Event::SpliceStarted { dir, capacity } => {
                if self.dirs[dir as usize] == DirState::Switching {
                    self.dirs[dir as usize] = DirState::Splicing(SpliceDir::new(capacity));
                    out.push(Action::PollIn(dir));
                    out.push(Action::Pump(dir));
                }
            }
            Event::SpliceUnavailable { dir } => {
                if self.dirs[dir as usize] == DirState::Switching {
                    self.full_reads[dir as usize] = 0;
                    self.dirs[dir as usize] = DirState::Reading;
                    self.arm_recv(dir, out);
                }
            }
            Event::Readable { dir } => {
                if !self.is_closing() && matches!(self.dirs[dir as usize], DirState::Splicing(_)) {
                    out.push(Action::Pump(dir));
                }
            }
            Event::Writable { dir } => {
                if let DirState::Splicing(s) = &mut self.dirs[dir as usize] {
                    s.pollout_armed = false;
                    if !self.is_closing() {
                        out.push(Action::Pump(dir));
                    }
                }
            }
            Event::PollEnded { dir, res } => {
                if !self.is_closing() && matches!(self.dirs[dir as usize], DirState::Splicing(_)) {
                    if res >= 0 {
                        // Ended without error (e.g. completion-queue overflow): re-arm.
                        out.push(Action::PollIn(dir));
                    } else {
                        // The kernel refused the poll itself: re-arming would only spin.
                        self.begin_close(CloseReason::Error, out);
                    }
                }
            }
            Event::Pumped { dir, p } => self.pumped(dir, p, now, out),
        }
    }

    fn pumped(&mut self, dir: Direction, p: Pumped, now: Instant, out: &mut Actions) {
        let i = dir as usize;
        if self.is_closing() {
            return;
        }
        let DirState::Splicing(mut s) = self.dirs[i] else {
            return;
        };
        if p.moved_in > 0 || p.moved_out > 0 {
            self.last_activity = Millis::of(now);
        }
        if p.moved_out > 0 {
            if dir == Direction::ClientToUpstream {
                self.note_sent(now);
            }
            self.bytes[i] += p.moved_out;
            self.spliced += p.moved_out;
            if dir == Direction::UpstreamToClient && !self.first_byte_seen {
                self.first_byte_seen = true;
                out.push(Action::FirstByte);
            }
            out.push(Action::Bytes {
                dir,
                n: p.moved_out,
                path: PathKind::Splice,
            });
        }
        if let Some(e) = p.error {
            self.begin_close(CloseReason::from_io_errno(e), out);
            return;
        }
        if p.finished {
            self.dirs[i] = DirState::Done;
            out.push(Action::ShutdownWrite(dir));
            if self.dirs[dir.reverse() as usize] == DirState::Done {
                self.begin_close(CloseReason::Eof, out);
            } else {
                // The other direction may run for long: give the drained pipe back now and
                // stop the readiness poll on this finished source (one removal op).
                out.push(Action::LeaveSplice(dir));
            }
            return;
        }
        if p.need_writable {
            s.small_pumps = 0;
            if !s.pollout_armed {
                s.pollout_armed = true;
                out.push(Action::PollOut(dir));
            }
            self.dirs[i] = DirState::Splicing(s);
            return;
        }
        if p.again {
            self.dirs[i] = DirState::Splicing(s);
            out.push(Action::PumpLater(dir));
            return;
        }
        if self.policy == DataPath::Auto && p.moved_in > 0 && s.in_pipe == 0 && !s.pollout_armed {
            if p.moved_in < u64::from(self.buf_size / 2) {
                s.small_pumps += 1;
            } else {
                s.small_pumps = 0;
            }
            if s.small_pumps >= self.auto_down {
                // Traffic turned small: back to copy, which serves it with fewer syscalls.
                self.full_reads[i] = 0;
                out.push(Action::LeaveSplice(dir));
                self.dirs[i] = DirState::Reading;
                self.arm_recv(dir, out);
                return;
            }
        }
        self.dirs[i] = DirState::Splicing(s);
    }

    fn received(
        &mut self,
        dir: Direction,
        res: i32,
        buf: Option<u16>,
        more: bool,
        now: Instant,
        out: &mut Actions,
    ) {
        let i = dir as usize;
        // A multishot recv's last completion: a cancel we asked for, or the kernel ended it.
        let ended = !more && self.mshot[i] != Multishot::Off;
        if !more {
            self.mshot[i] = Multishot::Off;
        }
        if !self.is_closing() && self.dirs[i] == DirState::Parking {
            if res == -libc::ECANCELED {
                // Cancelled before anything arrived: wait for readability instead.
                self.dirs[i] = DirState::Parked;
                out.push(Action::ParkPoll(dir));
                return;
            }
            // Bytes, end of stream or an error won the race with the cancel: as if read.
            self.dirs[i] = DirState::Reading;
        }
        if !self.is_closing() && matches!(self.dirs[i], DirState::Writing { .. }) {
            // Only a multishot recv completes while its direction writes. Nothing was read
            // when it ends by our own cancel; anything else (bytes, end of stream, an error)
            // waits its turn behind the send, and the recv is cancelled: a slow destination
            // stops the reading, as it does with one recv at a time.
            if !(ended && res == -libc::ECANCELED) {
                self.set(holding(dir), true);
                out.push(Action::Hold { dir, res, buf });
                self.end_multishot(dir, out);
            }
            return;
        }
        if self.is_closing() || self.dirs[i] != DirState::Reading {
            if let Some(b) = buf {
                out.push(Action::Release(b));
            }
            return;
        }
        if ended && res == -libc::ECANCELED {
            // Our cancel ended the multishot recv (a bulk read, or a send that fell behind)
            // before anything else arrived: read on the path the direction needs now.
            self.start_reading(dir, out);
            return;
        }
        match (res, buf) {
            (n, Some(b)) if n > 0 => {
                if n as u32 >= self.buf_size {
                    self.full_reads[i] = self.full_reads[i].saturating_add(1);
                    // A full read: a bulk stream, which reads one recv at a time (and may
                    // move to splice).
                    self.end_multishot(dir, out);
                } else {
                    self.full_reads[i] = 0;
                }
                self.dirs[i] = DirState::Writing {
                    buf: b,
                    off: 0,
                    len: n as u32,
                    read_at: Micros::of(now),
                };
                self.last_activity = Millis::of(now);
                if dir == Direction::UpstreamToClient && !self.first_byte_seen {
                    self.first_byte_seen = true;
                    out.push(Action::FirstByte);
                }
                out.push(Action::Send {
                    dir,
                    buf: b,
                    off: 0,
                    len: n as u32,
                });
            }
            (0, b) => {
                if let Some(b) = b {
                    out.push(Action::Release(b));
                }
                self.dirs[i] = DirState::Done;
                self.last_activity = Millis::of(now);
                out.push(Action::ShutdownWrite(dir));
                if self.dirs[dir.reverse() as usize] == DirState::Done {
                    self.begin_close(CloseReason::Eof, out);
                }
            }
            (e, _) if -e == libc::ENOBUFS => {
                self.dirs[i] = DirState::WaitBuffer;
                out.push(Action::WaitBuffer(dir));
            }
            (e, b) if -e == libc::EINTR || -e == libc::EAGAIN => {
                if let Some(b) = b {
                    out.push(Action::Release(b));
                }
                if self.mshot[i] == Multishot::Off {
                    self.arm_recv(dir, out);
                }
            }
            (e, b) => {
                if let Some(b) = b {
                    out.push(Action::Release(b));
                }
                // A positive result without a buffer cannot carry data: treat it as a reset.
                let why = if e > 0 { CloseReason::Reset } else { io_end(e) };
                self.begin_close(why, out);
            }
        }
    }

    fn sent(&mut self, dir: Direction, res: i32, now: Instant, out: &mut Actions) {
        let i = dir as usize;
        let DirState::Writing {
            buf,
            off,
            len,
            read_at,
        } = self.dirs[i]
        else {
            debug_assert!(false, "send completion while not writing");
            return;
        };
        if self.is_closing() {
            self.dirs[i] = DirState::Done;
            out.push(Action::Release(buf));
            return;
        }
        // EINTR/EAGAIN count as a write of nothing: the rest is resent like a short write.
        let retry = -res == libc::EINTR || -res == libc::EAGAIN;
        if res > 0 || retry {
            let n = res.max(0) as u32;
            if n > 0 {
                if dir == Direction::ClientToUpstream {
                    self.note_sent(now);
                }
                self.bytes[i] += u64::from(n);
                self.last_activity = Millis::of(now);
                out.push(Action::Bytes {
                    dir,
                    n: u64::from(n),
                    path: PathKind::Copy,
                });
            }
            let off = off + n;
            if off < len {
                self.dirs[i] = DirState::Writing {
                    buf,
                    off,
                    len,
                    read_at,
                };
                out.push(Action::Send {
                    dir,
                    buf,
                    off,
                    len: len - off,
                });
            } else {
                out.push(Action::Release(buf));
                out.push(Action::Transferred {
                    dir,
                    took: read_at.until(now),
                });
                if self.has(holding(dir)) {
                    // The next completion, in the order it arrived.
                    self.dirs[i] = DirState::Reading;
                    out.push(Action::Unhold(dir));
                } else {
                    self.start_reading(dir, out);
                }
            }
        } else {
            self.dirs[i] = DirState::Done;
            out.push(Action::Release(buf));
            // A send that wrote nothing means the peer is gone, as a reset does.
            let why = if res == 0 {
                CloseReason::Reset
            } else {
                io_end(res)
            };
            self.begin_close(why, out);
        }
    }

    fn begin_close(&mut self, reason: CloseReason, out: &mut Actions) {
        if self.is_closing() {
            return;
        }
        self.phase = Phase::Closing(reason);
        for d in &mut self.dirs {
            if matches!(
                *d,
                DirState::Reading
                    | DirState::WaitBuffer
                    | DirState::Connecting
                    | DirState::Switching
                    | DirState::Parking
                    | DirState::Parked
            ) {
                *d = DirState::Done;
            }
        }
        // The worker cancels what is in flight (nothing to do if nothing is) and reports
        // `OpsDrained` when the last completion arrived: then the machine finishes.
        out.push(Action::CancelAll);
    }
}

#[cfg(test)]
mod tests;
