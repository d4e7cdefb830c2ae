//! The process-wide stop signal: running → draining (stop accepting, let sessions finish)
//! → closing (end every session now).
//!
//! A signal thread (see [`install_signal_handlers`]) or a test moves the state forward; engines
//! poll [`Shutdown::phase`] on their own clocks or block in [`Shutdown::wait_for`].

use std::sync::atomic::{AtomicU8, Ordering};
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

    /// Starts the grace clock: once draining, moves to closing after `grace` unless already
    /// there. Runs on its own thread.
    pub fn spawn_grace_timer(&self, grace: Duration) {
        let s = self.clone();
        std::thread::Builder::new()
            .name("ringfwd-grace".into())
            .spawn(move || {
                s.wait_for(Phase::Draining, None);
                if !s.wait_for(Phase::Closing, Some(grace)) {
                    s.advance(Phase::Closing);
                    log_never_panics(|| tracing::info!(grace = ?grace, "shutdown grace period over: closing remaining connections"));
                }
            })
            .expect("spawn grace timer thread");
    }
}

/// Blocks SIGINT and SIGTERM in the calling thread (and so in every thread it starts later)
/// and starts a thread that turns the first into [`Phase::Draining`], the second into
/// [`Phase::Closing`]. Call before starting any other thread.
///
/// # Errors
/// The signal mask could not be set.
pub fn install_signal_handlers(shutdown: &Shutdown) -> nix::Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block()?;
    let s = shutdown.clone();
    std::thread::Builder::new()
        .name("ringfwd-signals".into())
        .spawn(move || {
            loop {
                let Ok(sig) = set.wait() else { continue };
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
    fn grace_timer_closes_after_grace() {
        let s = Shutdown::new();
        s.spawn_grace_timer(Duration::from_millis(20));
        assert!(!s.wait_for(Phase::Draining, Some(Duration::from_millis(10))));
        s.advance(Phase::Draining);
        assert!(s.wait_for(Phase::Closing, Some(Duration::from_secs(5))));
    }
}
