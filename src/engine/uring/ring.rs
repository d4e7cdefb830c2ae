//! The worker's ring: setup with the best task-running mode the kernel has, and the one place
//! that pushes SQEs.
//!
//! A push that finds the submission queue full submits what is queued and tries again; what
//! still does not fit waits in a backlog, in order, and a linked pair (a connect and its
//! timeout) stays one backlog element so that it is never split across two submissions (the
//! link would be lost).
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::time::Duration;

use io_uring::{IoUring, squeue, types};

/// Builds a ring with the best task-running mode the kernel has: SINGLE_ISSUER +
/// DEFER_TASKRUN (6.1), else COOP_TASKRUN (5.19), else plain. Returns the mode's name.
///
/// # Errors
/// `io_uring_setup` failed in every mode.
pub fn build(entries: u32) -> io::Result<(IoUring, &'static str)> {
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

/// A ring and the SQEs waiting for room in it.
pub struct Ring {
    ring: IoUring,
    backlog: VecDeque<(squeue::Entry, Option<squeue::Entry>)>,
}

impl Ring {
    pub fn new(ring: IoUring) -> Self {
        Self {
            ring,
            backlog: VecDeque::new(),
        }
    }

    /// The ring itself, for registrations.
    pub fn raw(&self) -> &IoUring {
        &self.ring
    }

    /// Queues one SQE.
    ///
    /// # Safety
    /// Every pointer the entry carries (buffer, sockaddr, timespec) and every fd it names must
    /// stay valid until the entry's completion has been reaped.
    pub unsafe fn push(&mut self, entry: squeue::Entry) {
        // SAFETY: forwarded to the caller.
        unsafe { self.push_group(entry, None) }
    }

    /// Queues `first` and, if given, `second` linked after it (`first` carries `IO_LINK`):
    /// both go into the same submission or both wait in the backlog.
    ///
    /// # Safety
    /// As for [`Ring::push`], for both entries.
    pub unsafe fn push_group(&mut self, first: squeue::Entry, second: Option<squeue::Entry>) {
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
        // SAFETY: the entries' pointers and fds are valid until their completions (the
        // contract of `push`/`push_group`, whose callers are the only way in). There is room
        // for the whole group (checked above), so neither push fails.
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
        // SAFETY: no argument pointer is passed; the SQEs being submitted were pushed under
        // the contract of `push`/`push_group` (their memory outlives their completions).
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

    /// Appends every available completion as `(user_data, result, flags)`.
    pub fn reap(&mut self, into: &mut Vec<(u64, i32, u32)>) {
        into.extend(
            self.ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
    }
}
