//! The process-wide stop signal: running → draining (stop accepting, let sessions finish)
//! → closing (end every session now).
//!
//! A signal thread (see [`install_signal_handlers`]) or a test moves the state forward; engines
//! poll [`Shutdown::phase`] on their own clocks or block in [`Shutdown::wait_for`].

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Where the process is in its shutdown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Running = 0,
    /// Stop accepting; live sessions may finish until the grace period ends.
    Draining = 1,
    /// Close every session now.
    Closing = 2,
}

#[derive(Default)]
struct Inner {
    phase: AtomicU8,
    /// Set by [`Shutdown::retire`]: draining because another generation (a reload's, or a new
    /// process's) serves the same sockets now, not because the process stops.
    handoff: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

/// A cloneable handle on the shutdown state.
#[derive(Clone, Default)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    #[inline]
    pub fn phase(&self) -> Phase {
        match self.inner.phase.load(Ordering::Acquire) {
            0 => Phase::Running,
            1 => Phase::Draining,
            _ => Phase::Closing,
        }
    }

    /// Moves to `phase` if it is later than the current one.
    pub fn advance(&self, phase: Phase) {
        let _g = self
            .inner
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.inner.phase.fetch_max(phase as u8, Ordering::AcqRel);
        self.inner.cv.notify_all();
    }

    /// Stops accepting because a newer generation serves the same sockets (a reload or a
    /// binary upgrade): like [`Phase::Draining`], except that a connection an engine had
    /// already taken off a listen queue when it stopped is still served
    /// ([`Shutdown::refuses_new`] stays false until [`Phase::Closing`]). The sockets
    /// themselves are left alone: the engine only closes its own descriptor of each.
    pub fn retire(&self) {
        self.inner.handoff.store(true, Ordering::Release);
        self.advance(Phase::Draining);
    }

    /// Whether a connection accepted now must be turned away (`RejectReason::Shutdown`):
    /// draining for a stop, or closing. After [`Shutdown::retire`] only closing does: a
    /// connection accepted during a handoff was dequeued from a socket the next generation
    /// also serves, and resetting it would refuse a client nobody else can serve.
    #[inline]
    pub fn refuses_new(&self) -> bool {
        match self.phase() {
            Phase::Running => false,
            Phase::Draining => !self.inner.handoff.load(Ordering::Acquire),
            Phase::Closing => true,
        }
    }

    /// Blocks until the phase is at least `phase`, or `timeout` passes. Returns whether it was
    /// reached.
    pub fn wait_for(&self, phase: Phase, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut g = self
            .inner
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            if self.phase() >= phase {
                return true;
            }
            match deadline {
                None => {
                    g = self
                        .inner
                        .cv
                        .wait(g)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                }
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return false;
                    }
                    g = self
                        .inner
                        .cv
                        .wait_timeout(g, d - now)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0;
                }
            }
        }
    }
}

/// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread (and so in every thread it starts
/// later) and starts a thread that turns the first SIGINT/SIGTERM into [`Phase::Draining`],
/// the second into [`Phase::Closing`], and every SIGHUP into a call of `on_hup` (the config
/// reload). Call before starting any other thread.
///
/// # Errors
/// The signal mask could not be set.
pub fn install_signal_handlers(
    shutdown: &Shutdown,
    on_hup: impl Fn() + Send + 'static,
) -> nix::Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    set.thread_block()?;
    let s = shutdown.clone();
    std::thread::Builder::new()
        .name("ringfwd-signals".into())
        .spawn(move || {
            loop {
                let Ok(sig) = set.wait() else { continue };
                if sig == Signal::SIGHUP {
                    log_never_panics(&on_hup);
                    continue;
                }
                // The phase moves first and the log line follows: whatever becomes of the log
                // (a closed pipe, a panicking writer), this thread must live on, or every later
                // SIGTERM would stay blocked and ignored while the process holds its ports.
                match s.phase() {
                    Phase::Running => {
                        s.advance(Phase::Draining);
                        log_never_panics(|| tracing::info!(signal = %sig, "stopping: no new connections, live ones may finish"));
                    }
                    _ => {
                        s.advance(Phase::Closing);
                        log_never_panics(|| tracing::info!(signal = %sig, "second signal: closing every connection now"));
                    }
                }
            }
        })
        .map_err(|_| nix::Error::EAGAIN)?;
    Ok(())
}

/// Runs a logging statement on a thread that must survive it: a panic in the log's writer
/// is swallowed (the line is lost, the thread keeps its job).
fn log_never_panics(log: impl FnOnce()) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(log));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_only_move_forward() {
        let s = Shutdown::new();
        assert_eq!(s.phase(), Phase::Running);
        s.advance(Phase::Closing);
        s.advance(Phase::Draining);
        assert_eq!(s.phase(), Phase::Closing);
        assert!(s.wait_for(Phase::Draining, Some(Duration::ZERO)));
    }

    #[test]
    fn a_retired_generation_serves_what_it_already_accepted() {
        let stop = Shutdown::new();
        stop.advance(Phase::Draining);
        assert!(stop.refuses_new());
        let handoff = Shutdown::new();
        assert!(!handoff.refuses_new());
        handoff.retire();
        assert_eq!(handoff.phase(), Phase::Draining);
        assert!(!handoff.refuses_new());
        handoff.advance(Phase::Closing);
        assert!(handoff.refuses_new());
    }
}
