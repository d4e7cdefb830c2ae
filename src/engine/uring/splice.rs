//! The zero-copy path's pump: socket → pipe → socket with `splice(2)`, run on the worker
//! thread when the ring reports readiness (io_uring's own SPLICE op always
//! hands off to an io-wq thread, so readiness from the ring plus a direct non-blocking splice
//! is the fast shape — HAProxy's).
//!
//! [`SpliceDir::pump`] holds the decisions (how much to ask for, when to stop, when to wait
//! for the destination) over a [`PipeIo`] trait; the worker supplies the real syscalls and
//! tests a fake. Occupancy of the pipe is tracked here so that no request is ever larger than
//! the room left in the pipe.
//!
//! `EAGAIN` from a splice into the pipe does not say whether the socket was empty or the pipe
//! full, and a pipe fills by *slots*, not bytes: each socket-buffer fragment spliced in takes
//! a slot of its own however short it is, so a pipe can refuse more while its byte count is
//! far below its capacity (a 4 KiB pipe has a single slot). Only an `EAGAIN` into an empty
//! pipe proves the source dry; after any other the pipe is emptied and the source asked again
//! (HAProxy's raw socket layer makes the same distinction). Taking the second kind for the
//! first strands the bytes left in the socket: no new readiness comes for data that was
//! already there when the last one fired.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use nix::fcntl::{SpliceFFlags, splice};

/// The two splices of one direction.
pub trait PipeIo {
    /// Source socket → pipe, at most `max` bytes. `Ok(0)` is end of stream.
    fn splice_in(&mut self, max: usize) -> io::Result<usize>;
    /// Pipe → destination socket, at most `max` bytes; `more`: more bytes follow at once
    /// (`SPLICE_F_MORE`: TCP may hold a partial segment back for them).
    fn splice_out(&mut self, max: usize, more: bool) -> io::Result<usize>;
    /// Sends what a `more` splice held back (the expected bytes did not come).
    fn flush(&mut self);
}

/// One pipe of the per-worker pool.
#[derive(Debug)]
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
    /// Capacity in bytes (`F_GETPIPE_SZ`).
    pub capacity: usize,
}

/// The real syscalls for one direction.
pub struct SysPipeIo<'a> {
    pub src: &'a OwnedFd,
    pub dst: &'a OwnedFd,
    pub pipe: &'a Pipe,
}

fn to_io(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

impl PipeIo for SysPipeIo<'_> {
    fn splice_in(&mut self, max: usize) -> io::Result<usize> {
        splice(
            self.src.as_fd(),
            None,
            self.pipe.write.as_fd(),
            None,
            max,
            SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE,
        )
        .map_err(to_io)
    }

    fn splice_out(&mut self, max: usize, more: bool) -> io::Result<usize> {
        let mut flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
        if more {
            flags |= SpliceFFlags::SPLICE_F_MORE;
        }
        splice(
            self.pipe.read.as_fd(),
            None,
            self.dst.as_fd(),
            None,
            max,
            flags,
        )
        .map_err(to_io)
    }

    fn flush(&mut self) {
        // Clearing TCP_CORK pushes pending partial segments whether or not it was set.
        let _ = socket2::SockRef::from(self.dst).set_tcp_cork(false);
    }
}

/// What one pump did and what the direction waits for next.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pumped {
    pub moved_in: u64,
    pub moved_out: u64,
    /// The destination would block with bytes left in the pipe: wait until it is writable.
    pub need_writable: bool,
    /// The pump stopped on its fairness budget with work left: run it again soon.
    pub again: bool,
    /// End of stream seen and the pipe drained: half-close the destination.
    pub finished: bool,
    /// A socket error (`errno`).
    pub error: Option<i32>,
}

/// A spliced direction's state (32-bit counts: it sits in every spliced connection's entry,
/// and a pipe holds at most `fs.pipe-max-size`, well below 4 GiB).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpliceDir {
    /// Bytes sitting in the pipe.
    pub in_pipe: u32,
    pub capacity: u32,
    pub src_eof: bool,
    /// A one-shot POLLOUT on the destination is in flight.
    pub pollout_armed: bool,
    /// Consecutive pumps that moved little (for auto mode's return to copy).
    pub small_pumps: u8,
}

/// Bytes one pump may move before it yields to other connections on the core.
pub const FAIRNESS_BUDGET: usize = 4 << 20;

impl SpliceDir {
    pub fn new(capacity: usize) -> Self {
        Self {
            in_pipe: 0,
            capacity: u32::try_from(capacity).unwrap_or(u32::MAX),
            src_eof: false,
            pollout_armed: false,
            small_pumps: 0,
        }
    }

    /// Moves what can be moved now without blocking: fills the pipe with as many splices
    /// from the source as it takes, then empties it into the destination, and again, until
    /// the source is empty, the destination full, or the fairness budget spent.
    ///
    /// Batching: a splice out that follows a fill which stopped on a full pipe (the source
    /// likely has more right behind) carries `SPLICE_F_MORE`, so TCP sends full segments
    /// instead of ending each pipeful with a short one; if the expected bytes then do not
    /// come, the held-back tail is flushed before the pump returns.
    pub fn pump(&mut self, io: &mut impl PipeIo) -> Pumped {
        let mut corked = false;
        let p = self.pump_batched(io, &mut corked);
        if corked && p.error.is_none() {
            io.flush();
        }
        p
    }

    fn pump_batched(&mut self, io: &mut impl PipeIo, corked: &mut bool) -> Pumped {
        let mut p = Pumped::default();
        loop {
            let mut progress = false;
            let mut src_dry = false;
            // The source would block while the pipe held bytes: the pipe may be out of
            // slots rather than the source out of bytes (see the module's notes).
            let mut pipe_blocked = false;
            while !self.src_eof && self.in_pipe < self.capacity {
                let room = self.capacity - self.in_pipe;
                match io.splice_in(room as usize) {
                    Ok(0) => self.src_eof = true,
                    Ok(n) => {
                        // Never more than asked for: `room` bounds it.
                        let n = n.min(room as usize);
                        self.in_pipe += n as u32;
                        p.moved_in += n as u64;
                        progress = true;
                    }
                    Err(e)
                        if e.kind() == io::ErrorKind::WouldBlock
                            || e.kind() == io::ErrorKind::Interrupted =>
                    {
                        if self.in_pipe == 0 {
                            src_dry = true;
                        } else {
                            pipe_blocked = true;
                        }
                        break;
                    }
                    Err(e) => {
                        p.error = Some(e.raw_os_error().unwrap_or(libc::EIO));
                        return p;
                    }
                }
            }
            if self.in_pipe > 0 {
                // Only a fill that stopped on a pipe full by bytes promises more right behind.
                let more = !self.src_eof && !src_dry && !pipe_blocked;
                match io.splice_out(self.in_pipe as usize, more) {
                    Ok(n) => {
                        let n = n.min(self.in_pipe as usize);
                        self.in_pipe -= n as u32;
                        p.moved_out += n as u64;
                        progress |= n > 0;
                        *corked = more;
                    }
                    Err(e)
                        if e.kind() == io::ErrorKind::WouldBlock
                            || e.kind() == io::ErrorKind::Interrupted =>
                    {
                        p.need_writable = true;
                        return p;
                    }
                    Err(e) => {
                        p.error = Some(e.raw_os_error().unwrap_or(libc::EIO));
                        return p;
                    }
                }
            }
            if self.src_eof && self.in_pipe == 0 {
                p.finished = true;
                return p;
            }
            // A source found dry (into an empty pipe): nothing more to do until the next
            // readiness. A pipe that blocked and has been emptied goes round again, to ask
            // the source once more with room for it.
            if !progress || src_dry {
                return p;
            }
            if p.moved_out as usize >= FAIRNESS_BUDGET {
                p.again = true;
                return p;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A fake socket pair around a pipe: `incoming` is what the source will yield per call
    /// (`None` = would block, `Some(0)` = EOF), `out_room` what the destination accepts.
    struct Fake {
        incoming: VecDeque<Option<usize>>,
        out_room: VecDeque<Option<usize>>,
        asked_in: Vec<usize>,
        delivered: usize,
        /// The `more` flag of every splice out.
        more: Vec<bool>,
        flushes: usize,
    }

    impl PipeIo for Fake {
        fn splice_in(&mut self, max: usize) -> io::Result<usize> {
            self.asked_in.push(max);
            match self.incoming.pop_front() {
                Some(Some(n)) => Ok(n.min(max)),
                _ => Err(io::ErrorKind::WouldBlock.into()),
            }
        }
        fn flush(&mut self) {
            self.flushes += 1;
        }
        fn splice_out(&mut self, max: usize, more: bool) -> io::Result<usize> {
            self.more.push(more);
            match self.out_room.pop_front() {
                Some(Some(n)) => {
                    let n = n.min(max);
                    self.delivered += n;
                    Ok(n)
                }
                _ => Err(io::ErrorKind::WouldBlock.into()),
            }
        }
    }

    fn fake(incoming: &[Option<usize>], out_room: &[Option<usize>]) -> Fake {
        Fake {
            incoming: incoming.iter().copied().collect(),
            out_room: out_room.iter().copied().collect(),
            asked_in: vec![],
            delivered: 0,
            more: vec![],
            flushes: 0,
        }
    }

    #[test]
    fn moves_until_the_source_is_empty() {
        let mut d = SpliceDir::new(1000);
        let mut io = fake(
            &[Some(300), Some(200), None],
            &[Some(1000), Some(1000), Some(1000)],
        );
        let p = d.pump(&mut io);
        assert_eq!((p.moved_in, p.moved_out), (500, 500));
        assert!(!p.need_writable && !p.finished && p.error.is_none());
        assert_eq!(d.in_pipe, 0);
    }

    #[test]
    fn a_pipe_is_filled_by_several_splices_before_it_is_emptied() {
        let mut d = SpliceDir::new(1000);
        let mut io = fake(
            &[Some(300), Some(300), Some(300), None],
            &[Some(1000), Some(1000)],
        );
        let p = d.pump(&mut io);
        assert_eq!((p.moved_in, p.moved_out), (900, 900));
        // The EAGAIN into a pipe holding 900 bytes is not proof of a dry source: once the
        // pipe is empty the source is asked once more.
        assert_eq!(io.asked_in, vec![1000, 700, 400, 100, 1000]);
        assert_eq!(io.more, vec![false], "one splice out for the whole batch");
        assert_eq!(io.flushes, 0);
    }

    #[test]
    fn a_pipe_out_of_slots_is_not_taken_for_a_dry_source() {
        // A one-slot pipe: each splice in takes one short fragment and the next says EAGAIN
        // although the socket holds more. Every fragment must still go through in one pump:
        // no readiness will come for bytes that are already there.
        let mut d = SpliceDir::new(4096);
        let mut io = fake(
            &[Some(1000), None, Some(1000), None, Some(616), None, None],
            &[Some(4096), Some(4096), Some(4096)],
        );
        let p = d.pump(&mut io);
        assert_eq!((p.moved_in, p.moved_out), (2616, 2616));
        assert_eq!(io.delivered, 2616);
        assert!(!p.need_writable && !p.finished && p.error.is_none());
        assert_eq!(
            io.asked_in.len(),
            7,
            "asked until EAGAIN into an empty pipe"
        );
    }

    #[test]
    fn a_full_pipe_goes_out_with_more_and_the_tail_is_flushed() {
        let mut d = SpliceDir::new(1000);
        // A pipeful, then a short read, then nothing: the first splice out expects more.
        let mut io = fake(&[Some(1000), Some(200), None], &[Some(1000), Some(1000)]);
        let p = d.pump(&mut io);
        assert_eq!(p.moved_out, 1200);
        assert_eq!(io.more, vec![true, false]);
        assert_eq!(io.flushes, 0, "the last splice out pushed everything");
        // A pipeful and then nothing: the held-back tail is flushed before returning.
        let mut d = SpliceDir::new(1000);
        let mut io = fake(&[Some(1000), None], &[Some(1000)]);
        let p = d.pump(&mut io);
        assert_eq!(p.moved_out, 1000);
        assert_eq!(io.more, vec![true]);
        assert_eq!(io.flushes, 1);
    }

    #[test]
    fn never_asks_for_more_than_the_room_in_the_pipe() {
        let mut d = SpliceDir::new(1000);
        // The destination takes nothing: the pipe fills and the pump waits for POLLOUT.
        let mut io = fake(&[Some(700), Some(700), Some(700)], &[Some(0), None]);
        let p = d.pump(&mut io);
        assert!(p.need_writable);
        assert_eq!(d.in_pipe, 1000);
        assert_eq!(io.asked_in, vec![1000, 300]);
    }

    #[test]
    fn eof_is_passed_on_only_after_the_pipe_drains() {
        let mut d = SpliceDir::new(1000);
        // 1. 400 bytes then EOF, but the destination blocks after 100.
        let mut io = fake(&[Some(400), Some(0)], &[Some(100), None]);
        let p = d.pump(&mut io);
        assert!(p.need_writable && !p.finished);
        assert_eq!(d.in_pipe, 300);
        // 2. The destination drains: now the half-close may be passed on.
        let mut io = fake(&[Some(0)], &[Some(300)]);
        let p = d.pump(&mut io);
        assert!(p.finished);
        assert_eq!(io.delivered, 300);
    }

    #[test]
    fn socket_errors_are_reported() {
        struct Reset;
        impl PipeIo for Reset {
            fn splice_in(&mut self, _: usize) -> io::Result<usize> {
                Err(io::Error::from_raw_os_error(libc::ECONNRESET))
            }
            fn splice_out(&mut self, _: usize, _: bool) -> io::Result<usize> {
                unreachable!()
            }
            fn flush(&mut self) {}
        }
        let p = SpliceDir::new(10).pump(&mut Reset);
        assert_eq!(p.error, Some(libc::ECONNRESET));
    }

    #[test]
    fn a_long_stream_yields_after_its_budget() {
        let mut d = SpliceDir::new(1 << 20);
        let chunks: Vec<Option<usize>> = std::iter::repeat_n(Some(1 << 20), 16).collect();
        let mut io = fake(&chunks, &chunks);
        let p = d.pump(&mut io);
        assert!(p.again);
        assert_eq!(p.moved_out as usize, FAIRNESS_BUDGET);
    }
}
