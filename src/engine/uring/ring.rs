//! The worker's ring: setup with the best task-running mode the kernel has, and the one place
//! that pushes SQEs, built here from typed [`Op`]s so that pushing is safe to call.
//!
//! A push that finds the submission queue full submits what is queued and tries again; what
//! still does not fit waits in a backlog, in order, and a linked pair (a connect and its
//! timeout) stays one backlog element so that it is never split across two submissions (the
//! link would be lost).
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::time::Duration;

use std::os::fd::RawFd;

use io_uring::{IoUring, opcode, squeue, types};

use super::slab::Target;
use super::token::{OpKind, Token};

/// `IORING_RECVSEND_POLL_FIRST` (include/uapi/linux/io_uring.h), in a recv's `ioprio`.
const RECVSEND_POLL_FIRST: u16 = 1;
/// `IORING_RECV_MULTISHOT` (6.0), in a recv's `ioprio`.
const RECV_MULTISHOT: u16 = 1 << 1;

/// Whether a ring built in `mode` (a name [`build`] returns) takes
/// [`Op::RecvSelect`]'s `poll_first`: the flag came in 5.19 with COOP_TASKRUN, and
/// DEFER_TASKRUN is later still; a plain ring may be older, where the flag is `EINVAL`.
pub fn takes_poll_first(mode: &str) -> bool {
    mode != PLAIN
}

/// Whether a ring built in `mode` takes a multishot recv (`IORING_RECV_MULTISHOT`, 6.0):
/// DEFER_TASKRUN came in 6.1; the older modes may run on a kernel without it.
pub fn takes_multishot_recv(mode: &str) -> bool {
    mode == DEFER_TASKRUN
}

/// The name [`build`] gives a ring with neither task-running mode (a kernel before 5.19).
const PLAIN: &str = "plain";

/// The name [`build`] gives the SINGLE_ISSUER + DEFER_TASKRUN mode.
pub const DEFER_TASKRUN: &str = "single_issuer+defer_taskrun";

/// Builds a ring with the best task-running mode the kernel has: SINGLE_ISSUER +
/// DEFER_TASKRUN (6.1), else COOP_TASKRUN (5.19), else plain. Returns the mode's name.
///
/// # Errors
/// `io_uring_setup` failed in every mode.
pub fn build(entries: u32) -> io::Result<(IoUring, &'static str)> {
    let cq = entries.saturating_mul(4);
    type Tune = fn(&mut io_uring::Builder);
    let attempts: [(&'static str, Tune); 3] = [
        (DEFER_TASKRUN, |b| {
            b.setup_single_issuer().setup_defer_taskrun();
        }),
        ("coop_taskrun", |b| {
            b.setup_coop_taskrun().setup_taskrun_flag();
        }),
        (PLAIN, |_| {}),
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

/// A ring and the SQEs waiting for room in it.
pub struct Ring {
    ring: IoUring,
    backlog: VecDeque<(squeue::Entry, Option<squeue::Entry>)>,
    /// Connect timeouts pushed whose completion has not been dispatched: each is an hrtimer
    /// that completes without any socket waking, which only a sleep in the ring notices.
    timers: usize,
}

impl Ring {
    pub fn new(ring: IoUring) -> Self {
        Self {
            ring,
            backlog: VecDeque::new(),
            timers: 0,
        }
    }

    /// Connect timeouts in flight (see [`Ring::timer_done`]).
    pub fn timers(&self) -> usize {
        self.timers
    }

    /// A connect timeout's completion (fired or cancelled) was taken from the ring.
    pub fn timer_done(&mut self) {
        debug_assert!(self.timers > 0, "a timer completed twice");
        self.timers = self.timers.saturating_sub(1);
    }

    /// The ring itself, for registrations.
    pub fn raw(&self) -> &IoUring {
        &self.ring
    }

    /// Queues `op` with `token` as its user data (a connect and its link timeout go into
    /// the same submission, or wait in the backlog together).
    ///
    /// Safe to call because of how the worker owns what ops name, until their completions:
    /// - pool buffers (recv, send, write-fixed) live in a mapping the worker drops after the
    ///   ring (field order), and a buffer is owned by one direction from the recv that
    ///   selected it until its last send completed;
    /// - a connection's header buffer and connect target live in its slab entry, which never
    ///   moves (the slab does not grow) and is not removed or redialled while the entry
    ///   counts ops in flight; the header buffer is resized only between completions;
    /// - connect timeouts live in the worker's per-rule data for its lifetime;
    /// - fds are closed only once no op is in flight on them (a connection's when its entry
    ///   is removed, a listener's when its last accept completed).
    pub fn push(&mut self, op: Op<'_>, token: Token) {
        if matches!(op, Op::Connect { .. }) {
            self.timers += 1;
        }
        let (first, second) = op.build(token);
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
        // SAFETY: the entries were built by `Op::build` from what the worker keeps alive until
        // their completions (see `Ring::push`, the only way in). There is room for the whole
        // group (checked above), so neither push fails.
        unsafe {
            let _ = sq.push(first);
            if let Some(s) = second {
                let _ = sq.push(s);
            }
        }
        true
    }

    /// Moves backlogged SQEs into the queue while there is room.
    pub fn flush_backlog(&mut self) {
        while let Some((first, second)) = self.backlog.pop_front() {
            if !self.try_push_group(&first, second.as_ref()) {
                self.backlog.push_front((first, second));
                return;
            }
        }
    }

    /// Submits everything queued and waits up to `wait` for at least one completion.
    ///
    /// # Errors
    /// `io_uring_enter` failed for another reason than the wait ending.
    pub fn submit_and_wait(&mut self, wait: Duration) -> io::Result<()> {
        let ts = types::Timespec::from(wait.max(Duration::from_micros(1)));
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Submits everything queued and runs completion work without waiting (a busy-poll
    /// step): with DEFER_TASKRUN, completions are only posted when this thread enters the
    /// kernel, so looking at the CQ ring alone would never see them.
    ///
    /// # Errors
    /// `io_uring_enter` failed.
    pub fn submit_and_peek(&mut self) -> io::Result<()> {
        const IORING_ENTER_GETEVENTS: u32 = 1;
        let to_submit = u32::try_from(self.ring.submission().len()).unwrap_or(u32::MAX);
        // SAFETY: no argument pointer is passed; the SQEs being submitted were built by
        // `Op::build` from memory that outlives their completions (see `Ring::push`).
        let r = unsafe {
            self.ring.submitter().enter::<libc::sigset_t>(
                to_submit,
                0,
                IORING_ENTER_GETEVENTS,
                None,
            )
        };
        match r {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Whether a completion is waiting in the CQ ring.
    pub fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// Appends available completions as `(user_data, result, flags)` up to `into`'s spare
    /// capacity (at least one): the rest stay in the CQ ring for the next turn, so a burst
    /// (a park or shutdown broadcast over thousands of connections) never grows `into`, and
    /// the memory it took would otherwise stay with the process.
    pub fn reap(&mut self, into: &mut Vec<(u64, i32, u32)>) {
        let room = (into.capacity() - into.len()).max(1);
        into.extend(
            self.ring
                .completion()
                .take(room)
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
    }
}

/// One operation for the ring, built from what it reads or writes. Pushing it is safe to
/// call: what an op names must outlive its completion, and the worker's modules keep that
/// promise by how they own memory (see [`Ring::push`]), not by the caller's care at each
/// site.
pub enum Op<'a> {
    /// A one-shot accept on a listener (no peer address asked for).
    Accept { listener: RawFd },
    /// A connect to `target`, linked to a timeout of `timeout` (two SQEs: the completion of
    /// the timeout carries the same token with [`OpKind::ConnectTimeout`]).
    Connect {
        fd: RawFd,
        target: &'a Target,
        timeout: &'a types::Timespec,
    },
    /// A recv that takes a buffer of `group` from the provided-buffer ring when data is there.
    /// `poll_first`: the socket is most likely empty, so the kernel arms its readiness poll
    /// at once instead of trying the read first (`IORING_RECVSEND_POLL_FIRST`, 5.19).
    RecvSelect {
        fd: RawFd,
        group: u16,
        poll_first: bool,
        /// One recv that stays armed and completes once per arrival (`F_MORE` while armed),
        /// each time into a buffer of the group.
        multishot: bool,
    },
    /// A recv into the connection's own buffer (its PROXY header).
    RecvInto { fd: RawFd, into: &'a mut [u8] },
    /// A send of `bytes` (MSG_NOSIGNAL).
    Send { fd: RawFd, bytes: &'a [u8] },
    /// A write of `bytes` from registered buffer `index`.
    WriteFixed {
        fd: RawFd,
        bytes: &'a [u8],
        index: u16,
    },
    /// A poll for `events`, multishot or one-shot.
    Poll {
        fd: RawFd,
        events: u32,
        multishot: bool,
    },
    /// Cancels the op (or, with `all`, every op) submitted with `target`.
    Cancel { target: Token, all: bool },
    /// Cancels every op on `fd`.
    CancelFd { fd: RawFd },
    /// Removes the poll submitted with `target`.
    PollRemove { target: Token },
}

impl Op<'_> {
    /// SQEs this op takes (a connect is two: the connect and its link timeout).
    pub fn sqes(&self) -> u32 {
        match self {
            Op::Connect { .. } => 2,
            _ => 1,
        }
    }

    /// The SQE (and the linked one) with `token` as user data.
    fn build(self, token: Token) -> (squeue::Entry, Option<squeue::Entry>) {
        let ud = token.encode();
        let one = |e: squeue::Entry| (e.user_data(ud), None);
        match self {
            Op::Accept { listener } => one(opcode::Accept::new(
                types::Fd(listener),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
            .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            .build()),
            Op::Connect {
                fd,
                target,
                timeout,
            } => {
                let connect = opcode::Connect::new(types::Fd(fd), target.as_ptr(), target.len())
                    .build()
                    .flags(squeue::Flags::IO_LINK)
                    .user_data(ud);
                let timer = opcode::LinkTimeout::new(timeout).build().user_data(
                    Token {
                        kind: OpKind::ConnectTimeout,
                        ..token
                    }
                    .encode(),
                );
                (connect, Some(timer))
            }
            Op::RecvSelect {
                fd,
                group,
                poll_first,
                multishot,
            } => one(opcode::Recv::new(types::Fd(fd), std::ptr::null_mut(), 0)
                .ioprio(
                    if poll_first { RECVSEND_POLL_FIRST } else { 0 }
                        | if multishot { RECV_MULTISHOT } else { 0 },
                )
                .buf_group(group)
                .build()
                .flags(squeue::Flags::BUFFER_SELECT)),
            Op::RecvInto { fd, into } => {
                one(
                    opcode::Recv::new(types::Fd(fd), into.as_mut_ptr(), len_u32(into.len()))
                        .build(),
                )
            }
            Op::Send { fd, bytes } => {
                one(
                    opcode::Send::new(types::Fd(fd), bytes.as_ptr(), len_u32(bytes.len()))
                        .flags(libc::MSG_NOSIGNAL)
                        .build(),
                )
            }
            Op::WriteFixed { fd, bytes, index } => one(opcode::WriteFixed::new(
                types::Fd(fd),
                bytes.as_ptr(),
                len_u32(bytes.len()),
                index,
            )
            .build()),
            Op::Poll {
                fd,
                events,
                multishot,
            } => one(opcode::PollAdd::new(types::Fd(fd), events)
                .multi(multishot)
                .build()),
            Op::Cancel { target, all } => {
                let b = types::CancelBuilder::user_data(target.encode());
                one(opcode::AsyncCancel2::new(if all { b.all() } else { b }).build())
            }
            Op::CancelFd { fd } => one(opcode::AsyncCancel2::new(
                types::CancelBuilder::fd(types::Fd(fd)).all(),
            )
            .build()),
            Op::PollRemove { target } => one(opcode::PollRemove::new(target.encode()).build()),
        }
    }
}

fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::uring::token::OpKind;
    use crate::vocab::Direction;

    /// A burst of completions is taken in batches of the vector's capacity, never by growing
    /// it: the rest wait in the CQ ring, and the memory of a grown vector would stay with the
    /// process for good.
    #[test]
    fn reaping_never_grows_the_batch() {
        let (raw, _) = build(16).expect("io_uring");
        let mut ring = Ring::new(raw);
        // Cancels of ops that do not exist: each completes at once (-ENOENT).
        for slot in 0..6 {
            let target = Token::new(slot, 0, Direction::ClientToUpstream, OpKind::Recv);
            let token = Token::new(slot, 0, Direction::ClientToUpstream, OpKind::Cancel);
            ring.push(Op::Cancel { target, all: false }, token);
        }
        let mut got = Vec::with_capacity(4);
        let mut seen = 0;
        for _ in 0..100 {
            ring.submit_and_wait(Duration::from_millis(10))
                .expect("io_uring_enter");
            got.clear();
            ring.reap(&mut got);
            assert!(got.len() <= 4 && got.capacity() == 4, "{}", got.capacity());
            seen += got.len();
            if seen == 6 {
                break;
            }
        }
        assert_eq!(seen, 6, "every completion arrives, four at a time");
    }
}
