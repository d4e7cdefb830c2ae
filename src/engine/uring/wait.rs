//! `[uring] wait = "epoll"`: a worker that sleeps in `epoll_wait` on its own sockets instead of
//! in `io_uring_enter`, so that a socket's wake-up reaches it the way it reaches an epoll
//! server.
//!
//! Why: a socket that gets data wakes its waiters with the "synchronous" hint (the waker is
//! about to sleep or return), and epoll passes that hint on to the thread in `epoll_wait`; the
//! scheduler may then run the woken thread on the waker's CPU. A thread asleep in
//! `io_uring_enter` is woken by io_uring's task-work add instead, which carries no hint, so it
//! goes back to the CPU it last ran on whenever that one is idle: on a ping-pong through the
//! relay that is an inter-processor interrupt and an idle exit on most wake-ups
//! (docs/TUNING.md, "Round trips and the scheduler").
//!
//! How the ring and the epoll set share the work: the ring is set up with DEFER_TASKRUN, so
//! when a socket becomes ready io_uring's own poll callback only queues task work for the
//! worker, and wakes it only if it is waiting in `io_uring_enter` for completions; completions
//! are posted when the worker enters the ring with GETEVENTS. Every socket an op may wait on
//! (listeners, clients, upstreams) is also in this epoll set (edge-triggered), so the same
//! wake-up that queues io_uring's task work wakes `epoll_wait`; the worker then enters the ring
//! without waiting ([`super::ring::Ring::submit_and_peek`]) to run that work and reap.
//!
//! Why no wake-up is lost — what may be pending in the ring while the worker sleeps here, and
//! what wakes it for each (the worker checks the conditions in [`EpollWait::may_sleep`] and
//! sleeps in the ring instead when one does not hold):
//! - **Ops that complete when issued** (cancels, a recv of data already queued): they are
//!   issued by the flush that precedes every sleep, and their completions are posted by it;
//!   the worker sleeps only when that flush left the completion queue empty.
//! - **Ops waiting for a socket** (recv, send, poll, connect, accept): io_uring hangs an entry
//!   on the socket's wait queue, and so does epoll, once, when the socket enters the set. Both
//!   are called in the same pass over the wait queue, under its lock, but in list order, and
//!   epoll's wake-up may run the worker on another CPU before io_uring's entry queued its task
//!   work; the worker would then find nothing, and sleep in epoll again with the event used up.
//!   Non-exclusive entries go to the head of the list, so an io_uring entry added after the
//!   socket entered the set is called before epoll's: every socket enters the set before the
//!   first op on it is pushed (at accept, before the connect, at install). Accepts are the
//!   exception: io_uring hangs them as *exclusive* waiters, at the tail, behind epoll's entry;
//!   so an epoll return that names a listener makes the next real sleep (one that may block)
//!   one in the ring, where the accept's task-work add wakes the worker or is found already
//!   queued. The waker runs both entries in one pass with interrupts off, microseconds at most
//!   apart, while the woken worker first has to be scheduled, reap and process what it found;
//!   only a waker stalled in that pass for longer (a vCPU descheduled by its hypervisor) could
//!   queue the accept after that ring sleep ended, and then it is run at the next tick.
//!   Readiness that came before a socket entered the set is reported by the insert itself
//!   (`epoll_ctl` polls the socket once).
//! - **The connect's linked timeout** (an hrtimer, no socket involved): the worker sleeps in
//!   the ring while any connect's timeout has not completed (counted by the ring).
//! - **Work that io-wq threads finish** (nothing on this engine's data path should go there;
//!   the ring caps io-wq at two workers): an eventfd registered with the ring for io-wq
//!   completions only (`IORING_REGISTER_EVENTFD_ASYNC`) is in the set; the kernel signals it
//!   after it queued the task work.
//! - **What other threads ask of the worker** (drain, shutdown, a reload's new state): they set
//!   shared state that the worker reads at its tick, and the sleep here is bounded by the next
//!   tick exactly like the ring's.
//! - **A batch of task work cut short**: since Linux 6.13 a non-waiting enter runs at most a
//!   batch of queued task work (20 items) and keeps the rest for the next enter without a
//!   wake-up. Only task work that posted no completion could hide the rest (an op that woke
//!   and found its socket not ready after all); the worker sleeps only when the flush posted
//!   nothing, so that would take twenty such empty wake-ups at once, and even then the
//!   rest runs at the next socket event or tick.
//!
//! So nothing is lost, and only the two corner cases above may wait for the tick (100 ms).
//!
//! If the set cannot be made, or a socket cannot be added to it (`fs.epoll.max_user_watches`),
//! the worker logs it once and sleeps in the ring from then on.
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use std::time::Duration;

use io_uring::IoUring;

/// `epoll_event.u64` of a connection's socket.
const CONN: u64 = 0;
/// `epoll_event.u64` of a listener: its accepts wait behind epoll's entry (see the module doc).
const LISTENER: u64 = 1;
/// `epoll_event.u64` of the io-wq eventfd.
const IOWQ: u64 = 2;

/// Events looked at in one `epoll_wait`: which sockets woke does not matter, only whether a
/// listener or the eventfd did, so a small batch is enough (the rest stay ready for the next).
const BATCH: usize = 64;

/// What a socket is to the epoll set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Watch {
    /// A client or upstream socket of a connection.
    Conn,
    /// A listening socket (its accepts are exclusive waiters).
    Listener,
}

/// A worker's epoll set over its sockets, and the eventfd io-wq completions signal.
pub struct EpollWait {
    epoll: Epoll,
    iowq: EventFd,
    events: Vec<EpollEvent>,
    /// An epoll return named a listener: sleep in the ring next (see the module doc).
    listener_woke: bool,
    /// A socket could not be added: the set no longer covers every op, sleep in the ring.
    broken: bool,
}

impl EpollWait {
    /// Creates the set and registers its eventfd with `ring` for io-wq completions.
    ///
    /// # Errors
    /// `epoll_create1`, `eventfd` or the registration failed.
    pub fn new(ring: &IoUring) -> io::Result<Self> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let iowq = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        ring.submitter()
            .register_eventfd_async(iowq.as_fd().as_raw_fd())?;
        let w = Self {
            epoll,
            iowq,
            events: vec![EpollEvent::empty(); BATCH],
            listener_woke: false,
            broken: false,
        };
        w.add(w.iowq.as_fd(), IOWQ)?;
        Ok(w)
    }

    /// Adds `fd` to the set. Must come before the first op on `fd` is pushed (module doc). A
    /// socket leaves the set by itself when it is closed.
    pub fn watch(&mut self, fd: BorrowedFd<'_>, what: Watch) {
        if self.broken {
            return;
        }
        let data = match what {
            Watch::Conn => CONN,
            Watch::Listener => LISTENER,
        };
        if let Err(e) = self.add(fd, data) {
            tracing::warn!(error = %e, "cannot add a socket to the worker's epoll set; the worker sleeps in its ring from now on");
            self.broken = true;
        }
    }

    fn add(&self, fd: BorrowedFd<'_>, data: u64) -> io::Result<()> {
        // Edge-triggered: a wake-up is reported once, not for as long as the socket stays
        // readable (a direction waiting for its peer to drain leaves data queued). EPOLLOUT
        // because a send that found the socket full waits for write space, a wake-up without
        // the readable bits; the kernel only sends it after a write failed for room.
        let events = EpollFlags::EPOLLIN
            | EpollFlags::EPOLLOUT
            | EpollFlags::EPOLLRDHUP
            | EpollFlags::EPOLLET;
        Ok(self.epoll.add(fd, EpollEvent::new(events, data))?)
    }

    /// Whether the worker may sleep here rather than in the ring: the set covers every op
    /// that may be pending, given `timers` connect timeouts in flight (module doc).
    pub fn may_sleep(&self, timers: usize) -> bool {
        !self.broken && !self.listener_woke && timers == 0
    }

    /// The worker slept in the ring: whatever a listener's wake-up queued has been run.
    pub fn slept_in_ring(&mut self) {
        self.listener_woke = false;
    }

    /// Sleeps until a socket in the set wakes, io-wq finished work, or `timeout` passed.
    ///
    /// # Errors
    /// `epoll_wait` failed for another reason than a signal.
    pub fn wait(&mut self, timeout: Duration) -> io::Result<()> {
        // Rounded up: a wait of less than a millisecond must not become a busy loop.
        let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        let ms = EpollTimeout::try_from(ms).unwrap_or(EpollTimeout::MAX);
        let n = match self.epoll.wait(&mut self.events, ms) {
            Ok(n) => n,
            Err(Errno::EINTR) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        for ev in &self.events[..n] {
            match ev.data() {
                LISTENER => self.listener_woke = true,
                // Reset the count (edge-triggered, so only for tidiness); a failed read
                // means it was already zero.
                IOWQ => {
                    let _ = self.iowq.read();
                }
                _ => {}
            }
        }
        Ok(())
    }
}
