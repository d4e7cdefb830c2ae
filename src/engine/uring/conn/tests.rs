//! The relay state machine driven without a ring: fixtures build on each other
//! (`connecting` → `relaying` → `half_closed` …), each step checks the actions.
//!
//! [`Driver`] plays the worker's part in op accounting: it counts the ops each action pushes
//! (by [`ops::pushed`], which the worker checks its pushes against) and the completions each
//! event stands for, and says `OpsDrained` when none is left, exactly when the worker would.

use super::*;
use crate::engine::uring::ops;
use crate::vocab::ConnectError;
use Direction::{ClientToUpstream as C2U, UpstreamToClient as U2C};

fn t0() -> Instant {
    Instant::now()
}

/// A connection and the ops the worker would have in flight for it.
struct Driver {
    conn: Conn,
    in_flight: u32,
    /// The connection's sockets: the client, and the upstream once dialled.
    open_fds: u32,
}

impl std::ops::Deref for Driver {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        &self.conn
    }
}

impl std::ops::DerefMut for Driver {
    fn deref_mut(&mut self) -> &mut Conn {
        &mut self.conn
    }
}

/// Whether an event is the last completion of an op.
fn completes_op(ev: Event) -> bool {
    matches!(
        ev,
        Event::Connected { .. }
            | Event::ConnectTimerDone
            | Event::Received { more: false, .. }
            | Event::Sent { .. }
            | Event::CancelDone
            | Event::Writable { .. }
            | Event::PollEnded { .. }
            | Event::Unparked { .. }
            | Event::HeaderIncomplete
            | Event::HeaderRead
            | Event::PreambleProgress
            | Event::PreambleFailed { .. }
    )
}

fn step(d: &mut Driver, ev: Event, now: Instant) -> Vec<Action> {
    if completes_op(ev) {
        assert!(
            d.in_flight > 0,
            "completion without an op in flight: {ev:?}"
        );
        d.in_flight -= 1;
    }
    let mut all = Vec::new();
    let mut ev = Some(ev);
    while let Some(e) = ev.take() {
        let mut out = Actions::default();
        d.conn.handle(e, now, &mut out);
        for a in out.iter() {
            d.in_flight += ops::pushed(a, d.open_fds, d.in_flight);
            if a == Action::Dial {
                d.open_fds = 2;
            }
            all.push(a);
        }
        if d.in_flight == 0
            && d.conn.awaits_drain()
            && !all.iter().any(|a| matches!(a, Action::Finish { .. }))
        {
            ev = Some(Event::OpsDrained);
        }
    }
    all
}

const BUF: u32 = 1000;

/// Accepted, connect and its timer in flight (copy path).
fn connecting() -> (Driver, Instant) {
    connecting_with(DataPath::Copy)
}

fn connecting_with(policy: DataPath) -> (Driver, Instant) {
    connecting_from(|now| Conn::new(now, policy, BUF))
}

/// Accepted, connect and its timer in flight, for the connection `make` builds.
fn connecting_from(make: impl FnOnce(Instant) -> Conn) -> (Driver, Instant) {
    let now = t0();
    let mut c = Driver {
        conn: make(now),
        in_flight: 0,
        open_fds: 1,
    };
    assert_eq!(c.phase(), Phase::Dialing);
    assert_eq!(step(&mut c, Event::Start, now), vec![Action::Dial]);
    assert_eq!(c.phase(), Phase::Connecting);
    assert_eq!(c.in_flight, 2);
    (c, now)
}

/// Connected: both directions reading.
fn relaying() -> (Driver, Instant) {
    let (mut c, now) = connecting();
    let a = step(&mut c, Event::Connected { res: 0 }, now);
    assert_eq!(
        a,
        vec![Action::Connected, Action::Recv(C2U), Action::Recv(U2C)]
    );
    let a = step(&mut c, Event::ConnectTimerDone, now);
    assert!(a.is_empty());
    assert_eq!(c.phase(), Phase::Relaying);
    assert_eq!(c.in_flight, 2);
    (c, now)
}

/// The client sent EOF: upstream half-closed, the other direction still reading.
fn client_half_closed() -> (Driver, Instant) {
    let (mut c, now) = relaying();
    let a = step(
        &mut c,
        Event::Received {
            dir: C2U,
            res: 0,
            buf: None,
            more: false,
        },
        now,
    );
    assert_eq!(a, vec![Action::ShutdownWrite(C2U)]);
    assert_eq!(c.dir(C2U), DirState::Done);
    assert_eq!(c.dir(U2C), DirState::Reading);
    (c, now)
}

#[test]
fn data_is_sent_then_reading_resumes() {
    let (mut c, now) = relaying();
    let later = now + Duration::from_millis(5);
    // 1. 100 bytes from the client land in buffer 3: send them upstream.
    let a = step(
        &mut c,
        Event::Received {
            dir: C2U,
            res: 100,
            buf: Some(3),
            more: false,
        },
        now,
    );
    assert_eq!(
        a,
        vec![Action::Send {
            dir: C2U,
            buf: 3,
            off: 0,
            len: 100
        }]
    );
    // 2. Backpressure: no new recv for this direction while the send is in flight.
    assert!(matches!(
        c.dir(C2U),
        DirState::Writing {
            buf: 3,
            off: 0,
            len: 100,
            ..
        }
    ));
    // 3. A short write resubmits the rest from the same buffer.
    let a = step(&mut c, Event::Sent { dir: C2U, res: 60 }, now);
    assert_eq!(
        a,
        vec![
            Action::Bytes {
                dir: C2U,
                n: 60,
                path: PathKind::Copy
            },
            Action::Send {
                dir: C2U,
                buf: 3,
                off: 60,
                len: 40
            }
        ]
    );
    // 4. The rest goes: the buffer is released and the direction reads again.
    let a = step(&mut c, Event::Sent { dir: C2U, res: 40 }, later);
    assert_eq!(
        a,
        vec![
            Action::Bytes {
                dir: C2U,
                n: 40,
                path: PathKind::Copy
            },
            Action::Release(3),
            Action::Transferred {
                dir: C2U,
                took: Duration::from_millis(5)
            },
            Action::Recv(C2U)
        ]
    );
    assert_eq!(c.bytes, [100, 0]);
    assert_eq!(c.in_flight, 2);
}

/// [`relaying`] with the ring's "poll first" hint available.
fn relaying_polling_first() -> (Driver, Instant) {
    let (mut c, now) =
        connecting_from(|now| Conn::new(now, DataPath::Copy, BUF).with_poll_first(true));
    step(&mut c, Event::Connected { res: 0 }, now);
    step(&mut c, Event::ConnectTimerDone, now);
    assert_eq!(c.phase(), Phase::Relaying);
    (c, now)
}

#[test]
fn the_next_recv_polls_first_after_a_short_read_and_reads_first_after_a_full_one() {
    let (c, _) = relaying();
    assert!(!c.expects_empty(C2U), "never without the ring's support");
    let (mut c, now) = relaying_polling_first();
    assert!(
        c.expects_empty(C2U) && c.expects_empty(U2C),
        "nothing read yet"
    );
    let relay = |c: &mut Driver, res: i32, buf: u16| {
        let ev = Event::Received {
            dir: C2U,
            res,
            buf: Some(buf),
            more: false,
        };
        step(c, ev, now);
        let a = step(c, Event::Sent { dir: C2U, res }, now);
        assert_eq!(a.last(), Some(&Action::Recv(C2U)));
    };
    // A full read: more is most likely queued behind it, so the next recv reads first.
    relay(&mut c, BUF as i32, 1);
    assert!(!c.expects_empty(C2U));
    assert!(c.expects_empty(U2C), "the other direction is its own");
    // A short read took everything there was: the next recv arms its poll first.
    relay(&mut c, 10, 2);
    assert!(c.expects_empty(C2U));
}

#[test]
fn a_request_response_direction_reads_with_one_multishot_recv_that_a_slow_send_stops() {
    let (mut c, now) = connecting_from(|now| {
        Conn::new(now, DataPath::Copy, BUF)
            .with_poll_first(true)
            .with_multishot(true)
    });
    let a = step(&mut c, Event::Connected { res: 0 }, now);
    assert_eq!(
        a,
        vec![
            Action::Connected,
            Action::RecvMulti(C2U),
            Action::RecvMulti(U2C)
        ]
    );
    step(&mut c, Event::ConnectTimerDone, now);
    assert_eq!(
        c.in_flight, 2,
        "one recv per direction, for every message to come"
    );
    let recv = |dir, res, buf, more| Event::Received {
        dir,
        res,
        buf,
        more,
    };
    let send = |buf, len| Action::Send {
        dir: C2U,
        buf,
        off: 0,
        len,
    };

    // 1. A message is sent on, and nothing is armed again after its send.
    let a = step(&mut c, recv(C2U, 64, Some(1), true), now);
    assert_eq!(a, vec![send(1, 64)]);
    let a = step(&mut c, Event::Sent { dir: C2U, res: 64 }, now);
    assert!(
        matches!(a.last(), Some(Action::Transferred { .. })),
        "{a:?}"
    );
    assert_eq!(c.dir(C2U), DirState::Reading);
    assert_eq!(c.multishot(C2U), Multishot::Armed);
    assert_eq!(c.in_flight, 2);

    // 2. Bytes that come while the send is out wait behind it, and the recv is cancelled:
    //    a destination that does not take them stops the reading.
    assert_eq!(
        step(&mut c, recv(C2U, 64, Some(2), true), now),
        vec![send(2, 64)]
    );
    let a = step(&mut c, recv(C2U, 10, Some(3), true), now);
    let held = Action::Hold {
        dir: C2U,
        res: 10,
        buf: Some(3),
    };
    assert_eq!(a, vec![held, Action::CancelRecv(C2U)]);
    assert_eq!(c.multishot(C2U), Multishot::Ending);
    // Its end by the cancel read nothing.
    assert!(step(&mut c, recv(C2U, -libc::ECANCELED, None, false), now).is_empty());
    assert_eq!(c.multishot(C2U), Multishot::Off);
    // 3. The send finishes: the held bytes go next, then the direction arms a new recv.
    let a = step(&mut c, Event::Sent { dir: C2U, res: 64 }, now);
    assert_eq!(a.last(), Some(&Action::Unhold(C2U)));
    assert!(a.contains(&Action::Release(2)));
    let unheld = |res, buf| Event::Unheld {
        dir: C2U,
        res,
        buf,
        last: true,
    };
    assert_eq!(step(&mut c, unheld(10, Some(3)), now), vec![send(3, 10)]);
    let a = step(&mut c, Event::Sent { dir: C2U, res: 10 }, now);
    assert_eq!(a.last(), Some(&Action::RecvMulti(C2U)));

    // 4. A full read is a bulk stream: the multishot recv ends, and the direction reads one
    //    recv at a time (reading first) once its end has come.
    let a = step(&mut c, recv(U2C, BUF as i32, Some(4), true), now);
    assert_eq!(a[0], Action::CancelRecv(U2C));
    assert!(step(&mut c, recv(U2C, -libc::ECANCELED, None, false), now).is_empty());
    let a = step(
        &mut c,
        Event::Sent {
            dir: U2C,
            res: BUF as i32,
        },
        now,
    );
    assert_eq!(a.last(), Some(&Action::Recv(U2C)));

    // 5. An end of stream that came while sending is passed on after the bytes before it.
    let a = step(&mut c, recv(C2U, 5, Some(5), true), now);
    assert_eq!(a, vec![send(5, 5)]);
    let a = step(&mut c, recv(C2U, 0, None, false), now);
    assert_eq!(
        a,
        vec![Action::Hold {
            dir: C2U,
            res: 0,
            buf: None
        }]
    );
    let a = step(&mut c, Event::Sent { dir: C2U, res: 5 }, now);
    assert_eq!(a.last(), Some(&Action::Unhold(C2U)));
    let a = step(&mut c, unheld(0, None), now);
    assert_eq!(a, vec![Action::ShutdownWrite(C2U)]);
    assert_eq!(c.dir(C2U), DirState::Done);
}

#[test]
fn first_upstream_byte_is_reported_once() {
    let (mut c, now) = relaying();
    let a = step(
        &mut c,
        Event::Received {
            dir: U2C,
            res: 1,
            buf: Some(0),
            more: false,
        },
        now,
    );
    assert_eq!(a[0], Action::FirstByte);
    step(&mut c, Event::Sent { dir: U2C, res: 1 }, now);
    let a = step(
        &mut c,
        Event::Received {
            dir: U2C,
            res: 1,
            buf: Some(0),
            more: false,
        },
        now,
    );
    assert!(!a.contains(&Action::FirstByte));
}

#[test]
fn half_close_keeps_the_other_direction_flowing() {
    let (mut c, now) = client_half_closed();
    let a = step(
        &mut c,
        Event::Received {
            dir: U2C,
            res: 10,
            buf: Some(1),
            more: false,
        },
        now,
    );
    assert!(a.contains(&Action::Send {
        dir: U2C,
        buf: 1,
        off: 0,
        len: 10
    }));
    let a = step(&mut c, Event::Sent { dir: U2C, res: 10 }, now);
    assert!(a.contains(&Action::Recv(U2C)));
    assert_eq!(c.phase(), Phase::Relaying);
}

#[test]
fn both_eofs_close_cleanly_after_every_op() {
    let (mut c, now) = client_half_closed();
    // The last EOF: nothing else in flight, so the connection finishes with FIN.
    let a = step(
        &mut c,
        Event::Received {
            dir: U2C,
            res: 0,
            buf: None,
            more: false,
        },
        now,
    );
    assert_eq!(
        a,
        vec![
            Action::ShutdownWrite(U2C),
            Action::CancelAll,
            Action::Finish {
                reason: CloseReason::Eof,
                reset: false
            }
        ]
    );
    assert_eq!(c.in_flight, 0, "no cancel pushed: nothing was in flight");
}

#[test]
fn reset_on_one_side_cancels_then_finishes_with_rst() {
    let (mut c, now) = relaying();
    // 1. The upstream resets: cancel what is in flight (the client's recv).
    let a = step(
        &mut c,
        Event::Received {
            dir: U2C,
            res: -libc::ECONNRESET,
            buf: None,
            more: false,
        },
        now,
    );
    assert_eq!(a, vec![Action::CancelAll]);
    assert_eq!(c.in_flight, 3, "one recv plus two cancels");
    // 2. The cancelled recv and the two cancels complete; only then the fds close, with RST.
    assert!(
        step(
            &mut c,
            Event::Received {
                dir: C2U,
                res: -libc::ECANCELED,
                buf: None,
                more: false,
            },
            now
        )
        .is_empty()
    );
    assert!(step(&mut c, Event::CancelDone, now).is_empty());
    let a = step(&mut c, Event::CancelDone, now);
    assert_eq!(
        a,
        vec![Action::Finish {
            reason: CloseReason::Reset,
            reset: true
        }]
    );
}

#[test]
fn a_buffer_that_arrives_while_closing_is_released() {
    let (mut c, now) = relaying();
    step(&mut c, Event::Shutdown, now);
    let a = step(
        &mut c,
        Event::Received {
            dir: C2U,
            res: 50,
            buf: Some(9),
            more: false,
        },
        now,
    );
    assert_eq!(a, vec![Action::Release(9)]);
}

#[test]
fn a_send_cancelled_by_close_releases_its_buffer_only_on_its_completion() {
    let (mut c, now) = relaying();
    step(
        &mut c,
        Event::Received {
            dir: C2U,
            res: 10,
            buf: Some(4),
            more: false,
        },
        now,
    );
    let a = step(&mut c, Event::IdleTimeout, now);
    assert_eq!(a, vec![Action::CancelAll]);
    assert!(
        matches!(
            c.dir(C2U),
            DirState::Writing {
                buf: 4,
                off: 0,
                len: 10,
                ..
            }
        ),
        "buffer still owned by the send"
    );
    let a = step(
        &mut c,
        Event::Sent {
            dir: C2U,
            res: -libc::ECANCELED,
        },
        now,
    );
    assert_eq!(a, vec![Action::Release(4)]);
}

#[test]
fn a_refused_connect_dials_again_once_its_ops_are_done() {
    let (mut c, now) = connecting();
    // 1. The connect is refused: report it, but the link timeout is still in flight, so the
    //    socket cannot be closed and no new one dialed yet.
    let a = step(
        &mut c,
        Event::Connected {
            res: -libc::ECONNREFUSED,
        },
        now,
    );
    assert_eq!(a, vec![Action::ConnectFailed(-libc::ECONNREFUSED)]);
    assert_eq!(c.phase(), Phase::Redialing);
    // 2. The timer's completion drains the attempt: dial the next member.
    let a = step(&mut c, Event::ConnectTimerDone, now);
    assert_eq!(a, vec![Action::Dial]);
    assert_eq!(c.phase(), Phase::Connecting);
    assert_eq!(c.in_flight, 2);
    // 3. The next member answers: relay as usual.
    let a = step(&mut c, Event::Connected { res: 0 }, now);
    assert_eq!(
        a,
        vec![Action::Connected, Action::Recv(C2U), Action::Recv(U2C)]
    );
}

#[test]
fn when_no_member_is_left_the_client_is_reset() {
    let (mut c, now) = connecting();
    step(
        &mut c,
        Event::Connected {
            res: -libc::ETIMEDOUT,
        },
        now,
    );
    assert_eq!(
        step(&mut c, Event::ConnectTimerDone, now),
        vec![Action::Dial]
    );
    step(
        &mut c,
        Event::Connected {
            res: -libc::ECONNREFUSED,
        },
        now,
    );
    assert_eq!(
        step(&mut c, Event::ConnectTimerDone, now),
        vec![Action::Dial]
    );
    // The session core has nothing left: the worker's dial pushed nothing and says so; the
    // client is closed at once (nothing in flight), with RST.
    c.in_flight = 0;
    let reason = CloseReason::Upstream(ConnectError::Refused);
    let a = step(&mut c, Event::GaveUp { reason }, now);
    assert_eq!(
        a,
        vec![
            Action::CancelAll,
            Action::Finish {
                reason,
                reset: true
            }
        ]
    );
}

#[test]
fn shutdown_while_connecting_cancels_the_attempt_first() {
    let (mut c, now) = connecting();
    assert_eq!(step(&mut c, Event::Shutdown, now), vec![Action::CancelAll]);
    assert_eq!(c.in_flight, 4, "connect, timer and two cancels");
    step(
        &mut c,
        Event::Connected {
            res: -libc::ECANCELED,
        },
        now,
    );
    step(&mut c, Event::ConnectTimerDone, now);
    step(&mut c, Event::CancelDone, now);
    let a = step(&mut c, Event::CancelDone, now);
    assert_eq!(
        a,
        vec![Action::Finish {
            reason: CloseReason::Shutdown,
            reset: true
        }]
    );
}

#[test]
fn empty_pool_waits_then_resumes() {
    let (mut c, now) = relaying();
    let a = step(
        &mut c,
        Event::Received {
            dir: C2U,
            res: -libc::ENOBUFS,
            buf: None,
            more: false,
        },
        now,
    );
    assert_eq!(a, vec![Action::WaitBuffer(C2U)]);
    assert_eq!(c.in_flight, 1);
    let a = step(&mut c, Event::BufferAvailable { dir: C2U }, now);
    assert_eq!(a, vec![Action::Recv(C2U)]);
    assert_eq!(c.in_flight, 2);
}

#[test]
fn idle_expiry_follows_last_activity() {
    let (mut c, now) = relaying();
    let idle = Duration::from_secs(1);
    assert!(!c.idle_expired(now + Duration::from_millis(900), idle));
    step(
        &mut c,
        Event::Received {
            dir: C2U,
            res: 1,
            buf: Some(0),
            more: false,
        },
        now + Duration::from_millis(900),
    );
    assert!(!c.idle_expired(now + Duration::from_millis(1500), idle));
    assert!(c.idle_expired(now + Duration::from_millis(1900), idle));
}

#[test]
fn write_error_resets() {
    let (mut c, now) = relaying();
    step(
        &mut c,
        Event::Received {
            dir: U2C,
            res: 10,
            buf: Some(2),
            more: false,
        },
        now,
    );
    let a = step(
        &mut c,
        Event::Sent {
            dir: U2C,
            res: -libc::EPIPE,
        },
        now,
    );
    assert_eq!(a, vec![Action::Release(2), Action::CancelAll]);
    assert_eq!(c.phase(), Phase::Closing(CloseReason::Reset));
}

/// Splice mode, connected: both directions asked for a pipe; the client side got one.
fn spliced() -> (Driver, Instant) {
    let (mut c, now) = connecting_with(DataPath::Splice);
    let a = step(&mut c, Event::Connected { res: 0 }, now);
    assert_eq!(
        a,
        vec![
            Action::Connected,
            Action::TrySplice(C2U),
            Action::TrySplice(U2C)
        ]
    );
    step(&mut c, Event::ConnectTimerDone, now);
    let a = step(
        &mut c,
        Event::SpliceStarted {
            dir: C2U,
            capacity: 4096,
        },
        now,
    );
    assert_eq!(a, vec![Action::PollIn(C2U), Action::Pump(C2U)]);
    // 2. No pipe left for the other direction: it stays on copy.
    let a = step(&mut c, Event::SpliceUnavailable { dir: U2C }, now);
    assert_eq!(a, vec![Action::Recv(U2C)]);
    assert_eq!(c.in_flight, 2, "the multishot poll and the recv");
    (c, now)
}

fn pumped(moved_in: u64, moved_out: u64) -> Pumped {
    Pumped {
        moved_in,
        moved_out,
        ..Pumped::default()
    }
}

#[test]
fn splice_counts_bytes_and_waits_for_writable() {
    let (mut c, now) = spliced();
    // 1. Readiness runs the pump.
    assert_eq!(
        step(&mut c, Event::Readable { dir: C2U }, now),
        vec![Action::Pump(C2U)]
    );
    // 2. The destination blocked with bytes in the pipe: one POLLOUT, not two.
    c.splice_mut(C2U).unwrap().in_pipe = 100;
    let p = Pumped {
        need_writable: true,
        ..pumped(500, 400)
    };
    let a = step(&mut c, Event::Pumped { dir: C2U, p }, now);
    assert_eq!(
        a,
        vec![
            Action::Bytes {
                dir: C2U,
                n: 400,
                path: PathKind::Splice
            },
            Action::PollOut(C2U)
        ]
    );
    let a = step(
        &mut c,
        Event::Pumped {
            dir: C2U,
            p: Pumped {
                need_writable: true,
                ..Pumped::default()
            },
        },
        now,
    );
    assert!(a.is_empty());
    assert!(c.pipe_has_bytes(C2U));
    // 3. Writable: pump again.
    assert_eq!(
        step(&mut c, Event::Writable { dir: C2U }, now),
        vec![Action::Pump(C2U)]
    );
    assert_eq!(c.bytes_path(), [0, 400]);
}

#[test]
fn splice_eof_half_closes_after_the_pipe_drained() {
    let (mut c, now) = spliced();
    let p = Pumped {
        finished: true,
        ..pumped(10, 10)
    };
    let a = step(&mut c, Event::Pumped { dir: C2U, p }, now);
    assert_eq!(
        a,
        vec![
            Action::Bytes {
                dir: C2U,
                n: 10,
                path: PathKind::Splice
            },
            Action::ShutdownWrite(C2U),
            // The other direction still runs: the drained pipe goes back to the pool now.
            Action::LeaveSplice(C2U)
        ]
    );
    assert_eq!(c.in_flight, 3, "poll, recv and the poll removal");
    assert_eq!(c.dir(C2U), DirState::Done);
    assert_eq!(c.dir(U2C), DirState::Reading);
}

#[test]
fn splice_reset_closes_with_rst_and_keeps_the_pipe_marked() {
    let (mut c, now) = spliced();
    c.splice_mut(C2U).unwrap().in_pipe = 7;
    let p = Pumped {
        error: Some(libc::ECONNRESET),
        ..Pumped::default()
    };
    let a = step(&mut c, Event::Pumped { dir: C2U, p }, now);
    assert_eq!(a, vec![Action::CancelAll]);
    assert!(
        c.pipe_has_bytes(C2U),
        "a pipe with bytes must not go back to the pool"
    );
}

#[test]
fn auto_moves_to_splice_after_full_reads_and_back_when_small() {
    let (mut c, now) = connecting_with(DataPath::Auto);
    step(&mut c, Event::Connected { res: 0 }, now);
    step(&mut c, Event::ConnectTimerDone, now);
    // 1. Full-buffer reads: after enough of them the direction asks for a pipe.
    let mut last = vec![];
    for _ in 0..AUTO_UP_FULL_READS {
        step(
            &mut c,
            Event::Received {
                dir: C2U,
                res: BUF as i32,
                buf: Some(0),
                more: false,
            },
            now,
        );
        last = step(
            &mut c,
            Event::Sent {
                dir: C2U,
                res: BUF as i32,
            },
            now,
        );
    }
    assert_eq!(last.last(), Some(&Action::TrySplice(C2U)));
    step(
        &mut c,
        Event::SpliceStarted {
            dir: C2U,
            capacity: 1 << 20,
        },
        now,
    );
    // 2. Small pumps with the pipe drained: back to copy.
    let mut a = vec![];
    for _ in 0..AUTO_DOWN_SMALL_PUMPS {
        a = step(
            &mut c,
            Event::Pumped {
                dir: C2U,
                p: pumped(64, 64),
            },
            now,
        );
    }
    assert_eq!(a[1..], [Action::LeaveSplice(C2U), Action::Recv(C2U)]);
    assert_eq!(c.dir(C2U), DirState::Reading);
}

#[test]
fn small_reads_keep_auto_on_copy() {
    let (mut c, now) = connecting_with(DataPath::Auto);
    step(&mut c, Event::Connected { res: 0 }, now);
    for _ in 0..20 {
        step(
            &mut c,
            Event::Received {
                dir: C2U,
                res: 64,
                buf: Some(0),
                more: false,
            },
            now,
        );
        let a = step(&mut c, Event::Sent { dir: C2U, res: 64 }, now);
        assert_eq!(a.last(), Some(&Action::Recv(C2U)));
    }
}

#[test]
fn idle_timeout_does_not_cut_a_slow_connect() {
    let (c, now) = connecting();
    assert!(!c.idle_expired(now + Duration::from_secs(3600), Duration::from_secs(1)));
}

#[test]
fn a_poll_the_kernel_refuses_closes_instead_of_spinning() {
    let (mut c, now) = spliced();
    let a = step(
        &mut c,
        Event::PollEnded {
            dir: C2U,
            res: -libc::ENOMEM,
        },
        now,
    );
    assert_eq!(a, vec![Action::CancelAll]);
    assert_eq!(c.phase(), Phase::Closing(CloseReason::Error));
}

#[test]
fn a_poll_ended_by_overflow_is_rearmed() {
    let (mut c, now) = spliced();
    let a = step(
        &mut c,
        Event::PollEnded {
            dir: C2U,
            res: libc::POLLIN as i32,
        },
        now,
    );
    assert_eq!(a, vec![Action::PollIn(C2U)]);
    assert_eq!(c.in_flight, 2);
}

/// Property tests: the machine under random completion orders and results, with the
/// worker's side modelled op by op (copy path; a requested pipe is never free, so the
/// splice and auto policies stay on copy too), with and without multishot recvs. Whatever
/// happens, the connection finishes exactly once, only when no op is in flight, every
/// buffer a recv took is released exactly once, after any send from it completed, and each
/// direction sends its buffers in the order they were read.
mod prop {
    use super::*;
    use proptest::prelude::*;

    /// One op the worker has in flight for the connection.
    #[derive(Clone, Copy, Debug)]
    enum Op {
        Connect,
        Timer,
        Recv(Direction),
        /// A multishot recv: it completes many times (`more`) before its last completion.
        RecvMulti(Direction),
        Send {
            dir: Direction,
            buf: u16,
            len: u32,
        },
        Cancel,
        /// The cancel of a recv to park its direction.
        CancelRecv,
        ParkPoll(Direction),
    }

    /// The worker's side: ops in flight, buffers handed to the connection, queued directions.
    #[derive(Default)]
    struct World {
        ops: Vec<Op>,
        held: Vec<u16>,
        next_buf: u16,
        /// Each buffer's direction and its place in that direction's reads.
        order: std::collections::HashMap<u16, (Direction, u32)>,
        read_seq: [u32; 2],
        sent_seq: [u32; 2],
        /// Completions the connection asked the worker to hold, in arrival order.
        holds: Vec<(Direction, i32, Option<u16>)>,
        waiting: Vec<Direction>,
        cancelled: bool,
        /// Directions whose recv a park cancel may have caught.
        parking: Vec<Direction>,
        dials: u32,
        finishes: u32,
        log: Vec<String>,
    }

    impl World {
        /// Feeds `ev` and every event the worker answers with synchronously.
        fn feed(&mut self, conn: &mut Conn, ev: Event, now: Instant) {
            let mut queue = vec![ev];
            while let Some(ev) = queue.pop() {
                assert_eq!(self.finishes, 0, "event {ev:?} after Finish");
                self.log.push(format!("{ev:?}"));
                let mut out = Actions::default();
                conn.handle(ev, now, &mut out);
                for a in out.iter() {
                    self.log.push(format!("  -> {a:?}"));
                    match a {
                        Action::Dial => {
                            self.dials += 1;
                            if self.dials > 3 {
                                // The session core has no member left: nothing is pushed.
                                queue.push(Event::GaveUp {
                                    reason: CloseReason::Upstream(ConnectError::Refused),
                                });
                            } else {
                                self.ops.push(Op::Connect);
                                self.ops.push(Op::Timer);
                            }
                        }
                        Action::RecvHeader | Action::SendPreamble => {
                            panic!("a connection without a preamble asked for one: {a:?}")
                        }
                        Action::Recv(d) => self.ops.push(Op::Recv(d)),
                        Action::RecvMulti(d) => {
                            assert!(
                                !self.ops.iter().any(
                                    |o| matches!(o, Op::Recv(x) | Op::RecvMulti(x) if *x == d)
                                ),
                                "a second recv on {d:?}"
                            );
                            self.ops.push(Op::RecvMulti(d));
                        }
                        Action::Hold { dir, res, buf } => self.holds.push((dir, res, buf)),
                        Action::Unhold(d) => {
                            let i = self
                                .holds
                                .iter()
                                .position(|h| h.0 == d)
                                .unwrap_or_else(|| panic!("Unhold({d:?}) with nothing held"));
                            let (dir, res, buf) = self.holds.remove(i);
                            let last = !self.holds.iter().any(|h| h.0 == d);
                            queue.push(Event::Unheld {
                                dir,
                                res,
                                buf,
                                last,
                            });
                        }
                        Action::Send { dir, buf, off, len } => {
                            assert!(self.held.contains(&buf), "send from unheld buffer {buf}");
                            if off == 0 {
                                let (d, seq) = self.order[&buf];
                                assert_eq!(d, dir, "buffer {buf} read on {d:?} sent on {dir:?}");
                                assert_eq!(
                                    seq, self.sent_seq[dir as usize],
                                    "{dir:?} sends buffer {buf} out of order"
                                );
                                self.sent_seq[dir as usize] += 1;
                            }
                            assert!(len > 0 && off + len <= BUF, "send of {off}+{len}");
                            self.ops.push(Op::Send { dir, buf, len });
                        }
                        Action::Release(b) => {
                            let i = self.held.iter().position(|&h| h == b).unwrap_or_else(|| {
                                panic!("Release({b}) of a buffer not held (double release?)")
                            });
                            assert!(
                                !self
                                    .ops
                                    .iter()
                                    .any(|o| matches!(o, Op::Send { buf, .. } if *buf == b)),
                                "Release({b}) while a send from it is in flight"
                            );
                            self.held.swap_remove(i);
                        }
                        Action::WaitBuffer(d) => self.waiting.push(d),
                        Action::TrySplice(d) => queue.push(Event::SpliceUnavailable { dir: d }),
                        Action::CancelAll => {
                            let in_flight = u32::try_from(self.ops.len()).unwrap_or(u32::MAX);
                            for _ in 0..ops::pushed(a, 2, in_flight) {
                                self.ops.push(Op::Cancel);
                                self.cancelled = true;
                            }
                        }
                        Action::Finish { .. } => {
                            assert!(
                                self.ops.is_empty(),
                                "Finish with ops in flight: {:?}",
                                self.ops
                            );
                            // The worker gives back what it held for the connection.
                            for (_, _, b) in self.holds.drain(..) {
                                if let Some(b) = b {
                                    self.held.retain(|&h| h != b);
                                }
                            }
                            self.finishes += 1;
                        }
                        Action::CancelRecv(d) => {
                            self.ops.push(Op::CancelRecv);
                            self.parking.push(d);
                        }
                        Action::ParkPoll(d) => self.ops.push(Op::ParkPoll(d)),
                        Action::PollIn(_)
                        | Action::PollOut(_)
                        | Action::Pump(_)
                        | Action::PumpLater(_)
                        | Action::LeaveSplice(_) => {
                            panic!("{a:?} without a leased pipe")
                        }
                        Action::ShutdownWrite(_)
                        | Action::Connected
                        | Action::ConnectFailed(_)
                        | Action::FirstByte
                        | Action::Bytes { .. }
                        | Action::Transferred { .. } => {}
                    }
                }
                if self.finishes == 0 && self.ops.is_empty() && conn.awaits_drain() {
                    queue.push(Event::OpsDrained);
                }
            }
        }

        /// Completes op `i` with a result picked by `r`; `closing` picks cancelled results.
        fn complete(&mut self, conn: &mut Conn, i: usize, r: u16, now: Instant) {
            let op = self.ops.swap_remove(i);
            let cancelled = self.cancelled && r.is_multiple_of(2);
            let ev = match op {
                Op::Connect => Event::Connected {
                    res: match (cancelled, r % 5) {
                        (true, _) => -libc::ECANCELED,
                        (false, 0) => -libc::ECONNREFUSED,
                        (false, 1) => -libc::ETIMEDOUT,
                        _ => 0,
                    },
                },
                Op::Timer => Event::ConnectTimerDone,
                Op::Cancel | Op::CancelRecv => Event::CancelDone,
                Op::ParkPoll(dir) => Event::Unparked { dir },
                Op::Recv(dir) => {
                    let parked = self.parking.iter().position(|&d| d == dir);
                    if let Some(p) = parked {
                        self.parking.swap_remove(p);
                    }
                    let cancelled = cancelled || (parked.is_some() && !r.is_multiple_of(3));
                    let (res, buf) = match (cancelled, r % 8) {
                        (true, _) => (-libc::ECANCELED, None),
                        (false, 0) => (0, None),
                        (false, 1) => (-libc::ECONNRESET, None),
                        (false, 2) => (-libc::ENOBUFS, None),
                        (false, _) => {
                            let b = self.take_buf(dir);
                            let n = if r.is_multiple_of(3) {
                                BUF
                            } else {
                                1 + u32::from(r) % BUF
                            };
                            (n as i32, Some(b))
                        }
                    };
                    Event::Received {
                        dir,
                        res,
                        buf,
                        more: false,
                    }
                }
                Op::RecvMulti(dir) => {
                    // A cancel (to park, or to end the multishot) or the close's cancels end
                    // it, unless bytes race them; else it reads, mostly staying armed.
                    let asked = self.parking.iter().position(|&d| d == dir);
                    let ends_by_cancel = match asked {
                        Some(p) if r.is_multiple_of(3) || r == 0 => {
                            self.parking.swap_remove(p);
                            true
                        }
                        _ => cancelled,
                    };
                    let (res, buf, more) = match (ends_by_cancel, r % 8) {
                        (true, _) => (-libc::ECANCELED, None, false),
                        (false, 0) => (0, None, false),
                        (false, 1) => (-libc::ECONNRESET, None, false),
                        (false, 2) => (-libc::ENOBUFS, None, false),
                        (false, _) => {
                            let b = self.take_buf(dir);
                            let n = if r.is_multiple_of(7) {
                                BUF
                            } else {
                                1 + u32::from(r) % BUF
                            };
                            (n as i32, Some(b), !r.is_multiple_of(5))
                        }
                    };
                    if more {
                        self.ops.push(op);
                    }
                    Event::Received {
                        dir,
                        res,
                        buf,
                        more,
                    }
                }
                Op::Send { dir, len, .. } => Event::Sent {
                    dir,
                    res: match (cancelled, r % 6) {
                        (true, _) => -libc::ECANCELED,
                        (false, 0) => -libc::EPIPE,
                        (false, 1) => (1 + u32::from(r / 6) % len) as i32,
                        _ => len as i32,
                    },
                },
            };
            self.feed(conn, ev, now);
        }
    }

    impl World {
        /// A buffer from the pool for a read on `dir`, numbered in that direction's order.
        fn take_buf(&mut self, dir: Direction) -> u16 {
            self.next_buf = self.next_buf.wrapping_add(1);
            let b = self.next_buf;
            assert!(!self.held.contains(&b), "buffer ids wrapped");
            self.held.push(b);
            self.order.insert(b, (dir, self.read_seq[dir as usize]));
            self.read_seq[dir as usize] += 1;
            b
        }
    }

    fn run(policy: u8, steps: &[(u8, u16)]) {
        let now = t0();
        let multishot = policy >= 3;
        let policy = [DataPath::Copy, DataPath::Auto, DataPath::Splice][usize::from(policy % 3)];
        let mut conn = Conn::new(now, policy, BUF)
            .with_poll_first(multishot)
            .with_multishot(multishot);
        let mut w = World::default();
        w.feed(&mut conn, Event::Start, now);
        // 1. Random completions, with now and then a buffer coming back, the idle timeout or
        //    a shutdown.
        for &(kind, r) in steps {
            if w.finishes > 0 {
                break;
            }
            match kind % 32 {
                0 => w.feed(&mut conn, Event::Shutdown, now),
                1 => w.feed(&mut conn, Event::IdleTimeout, now),
                6 | 7 => w.feed(&mut conn, Event::Park, now),
                2..=5 if !w.waiting.is_empty() => {
                    let d = w.waiting.remove(0);
                    // The worker skips queued directions of a closing connection.
                    if !conn.is_closing() {
                        w.feed(&mut conn, Event::BufferAvailable { dir: d }, now);
                    }
                }
                _ if !w.ops.is_empty() => {
                    let i = usize::from(r) % w.ops.len();
                    w.complete(&mut conn, i, r.rotate_left(u32::from(kind % 16)), now);
                }
                _ => {}
            }
        }
        // 2. Whatever state that left, a shutdown and the completion of everything in flight
        //    must finish the connection.
        if w.finishes == 0 {
            w.feed(&mut conn, Event::Shutdown, now);
        }
        let mut guard = 0;
        while w.finishes == 0 {
            guard += 1;
            assert!(
                guard < 10_000,
                "no Finish after draining:\n{}",
                w.log.join("\n")
            );
            assert!(
                !w.ops.is_empty(),
                "stuck: nothing in flight, not finished, phase {:?}:\n{}",
                conn.phase(),
                w.log.join("\n")
            );
            w.complete(&mut conn, 0, 0, now);
        }
        assert_eq!(w.finishes, 1);
        assert!(w.ops.is_empty(), "ops in flight after Finish: {:?}", w.ops);
        assert!(
            w.held.is_empty(),
            "buffers never released: {:?}\n{}",
            w.held,
            w.log.join("\n")
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn random_completion_orders_finish_once_and_leak_nothing(
            policy in 0u8..6,
            steps in proptest::collection::vec((any::<u8>(), any::<u16>()), 0..300),
        ) {
            run(policy, &steps);
        }
    }
}

#[test]
fn a_proxy_header_is_read_before_dialing_and_a_preamble_sent_before_relaying() {
    let now = t0();
    let mut c = Driver {
        conn: Conn::with_preamble(now, DataPath::Copy, BUF, true, true),
        in_flight: 0,
        open_fds: 1,
    };
    // 1. The header is read first (one recv into the connection's own buffer).
    assert_eq!(step(&mut c, Event::Start, now), vec![Action::RecvHeader]);
    assert_eq!(c.phase(), Phase::ReadingHeader);
    assert!(
        c.is_settled(),
        "a connection reading its header does not hold up accepts"
    );
    assert_eq!(c.in_flight, 1, "the header recv");
    // It completed with part of the header.
    assert_eq!(
        step(&mut c, Event::HeaderIncomplete, now),
        vec![Action::RecvHeader]
    );
    // 2. Complete: dial.
    assert_eq!(step(&mut c, Event::HeaderRead, now), vec![Action::Dial]);
    // 3. Connected: the preamble goes out before any relay op.
    let a = step(&mut c, Event::Connected { res: 0 }, now);
    assert_eq!(a, vec![Action::Connected, Action::SendPreamble]);
    assert_eq!(c.phase(), Phase::SendingPreamble);
    assert!(!c.is_settled());
    assert_eq!(
        step(&mut c, Event::PreambleProgress, now),
        vec![Action::SendPreamble]
    );
    let a = step(&mut c, Event::PreambleDone, now);
    assert_eq!(a, vec![Action::Recv(C2U), Action::Recv(U2C)]);
    assert_eq!(c.phase(), Phase::Relaying);
}

#[test]
fn a_header_rejected_or_late_closes_with_rst_and_nothing_dialed() {
    let now = t0();
    let mut c = Driver {
        conn: Conn::with_preamble(now, DataPath::Copy, BUF, true, false),
        in_flight: 0,
        open_fds: 1,
    };
    step(&mut c, Event::Start, now);
    let reason = CloseReason::Rejected(crate::vocab::RejectReason::ProxyHeaderTimeout);
    let a = step(&mut c, Event::GaveUp { reason }, now);
    assert_eq!(a, vec![Action::CancelAll]);
    assert_eq!(
        c.in_flight, 2,
        "the header recv and one cancel: no upstream socket"
    );
    // The cancelled header recv (the worker feeds it as `CancelDone`), then the cancel.
    assert!(step(&mut c, Event::CancelDone, now).is_empty());
    assert_eq!(
        step(&mut c, Event::CancelDone, now),
        vec![Action::Finish {
            reason,
            reset: true
        }]
    );
}

#[test]
fn a_failed_preamble_send_resets() {
    let (mut c, now) = connecting();
    c.conn = Conn::with_preamble(now, DataPath::Copy, BUF, false, true);
    c.in_flight = 0;
    assert_eq!(step(&mut c, Event::Start, now), vec![Action::Dial]);
    step(&mut c, Event::Connected { res: 0 }, now);
    let a = step(
        &mut c,
        Event::PreambleFailed {
            res: -libc::ECONNRESET,
        },
        now,
    );
    assert!(a.contains(&Action::CancelAll), "{a:?}");
    assert!(matches!(c.phase(), Phase::Closing(CloseReason::Reset)));
}

#[test]
fn auto_thresholds_come_from_the_config() {
    // `[uring] auto_up_reads = 1`: the first full-buffer read already asks for a pipe.
    let now = t0();
    let mut c = Driver {
        conn: Conn::new(now, DataPath::Auto, BUF).with_auto_thresholds(1, 8),
        in_flight: 0,
        open_fds: 1,
    };
    step(&mut c, Event::Start, now);
    step(&mut c, Event::Connected { res: 0 }, now);
    step(&mut c, Event::ConnectTimerDone, now);
    step(
        &mut c,
        Event::Received {
            dir: C2U,
            res: BUF as i32,
            buf: Some(0),
            more: false,
        },
        now,
    );
    let a = step(
        &mut c,
        Event::Sent {
            dir: C2U,
            res: BUF as i32,
        },
        now,
    );
    assert_eq!(a.last(), Some(&Action::TrySplice(C2U)));
}

/// Relaying, then idle for [`PARK_AFTER`]: both recvs cancelled and replaced by polls.
fn parked() -> (Driver, Instant) {
    let (mut c, now) = relaying();
    assert!(!c.wants_park(now));
    let later = now + PARK_AFTER;
    assert!(c.wants_park(later));
    let a = step(&mut c, Event::Park, later);
    assert_eq!(a, vec![Action::CancelRecv(C2U), Action::CancelRecv(U2C)]);
    assert_eq!(c.in_flight, 4, "two recvs and their two cancels");
    for dir in [C2U, U2C] {
        let a = step(
            &mut c,
            Event::Received {
                dir,
                res: -libc::ECANCELED,
                buf: None,
                more: false,
            },
            later,
        );
        assert_eq!(a, vec![Action::ParkPoll(dir)]);
        assert!(step(&mut c, Event::CancelDone, later).is_empty());
        assert_eq!(c.dir(dir), DirState::Parked);
    }
    assert_eq!(c.in_flight, 2, "one poll per direction, no recv");
    assert!(!c.wants_park(later), "nothing left to park");
    (c, later)
}

#[test]
fn an_idle_connection_parks_and_reads_again_when_readable() {
    let (mut c, now) = parked();
    let a = step(&mut c, Event::Unparked { dir: C2U }, now);
    assert_eq!(a, vec![Action::Recv(C2U)]);
    assert_eq!(c.dir(C2U), DirState::Reading);
    assert_eq!(c.dir(U2C), DirState::Parked);
    let a = step(
        &mut c,
        Event::Received {
            dir: C2U,
            res: 10,
            buf: Some(3),
            more: false,
        },
        now,
    );
    assert_eq!(
        a,
        vec![Action::Send {
            dir: C2U,
            buf: 3,
            off: 0,
            len: 10
        }]
    );
}

#[test]
fn bytes_that_race_the_park_cancel_are_relayed() {
    let (mut c, now) = relaying();
    let later = now + PARK_AFTER;
    step(&mut c, Event::Park, later);
    // The recv completed with data before the cancel reached it.
    let a = step(
        &mut c,
        Event::Received {
            dir: U2C,
            res: 5,
            buf: Some(1),
            more: false,
        },
        later,
    );
    assert_eq!(
        a,
        vec![
            Action::FirstByte,
            Action::Send {
                dir: U2C,
                buf: 1,
                off: 0,
                len: 5
            }
        ]
    );
    assert!(step(&mut c, Event::CancelDone, later).is_empty());
    // End of stream racing the cancel is passed on as well.
    let a = step(
        &mut c,
        Event::Received {
            dir: C2U,
            res: 0,
            buf: None,
            more: false,
        },
        later,
    );
    assert_eq!(a, vec![Action::ShutdownWrite(C2U)]);
    assert_eq!(c.dir(C2U), DirState::Done);
}

#[test]
fn a_parked_connection_closes_after_its_polls_complete() {
    let (mut c, now) = parked();
    let a = step(&mut c, Event::Shutdown, now);
    assert_eq!(a, vec![Action::CancelAll]);
    assert!(step(&mut c, Event::Unparked { dir: C2U }, now).is_empty());
    assert!(step(&mut c, Event::Unparked { dir: U2C }, now).is_empty());
    assert!(step(&mut c, Event::CancelDone, now).is_empty());
    let a = step(&mut c, Event::CancelDone, now);
    assert_eq!(
        a,
        vec![Action::Finish {
            reason: CloseReason::Shutdown,
            reset: true
        }]
    );
}
