//! A sleep with microsecond precision for open-loop pacing: a `timerfd` watched by tokio.
//!
//! tokio's timer wheel has a 1 ms resolution and rounds every sleep up, so an open-loop
//! client pacing with it sends up to a millisecond late. Since open-loop latency is measured
//! from the intended send time, that lateness would be charged to the server: against a
//! loopback relay whose round trip is tens of microseconds, the client's own timer would
//! dominate the percentiles. A `timerfd` fires on a high-resolution kernel timer and is
//! waited on through the same epoll as the sockets, so pacing stays precise without spinning
//! a core the relay needs.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::{Duration, Instant};

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Closer than this to the target, waiting costs more than it is worth.
const NOT_WORTH_WAITING: Duration = Duration::from_micros(2);

struct Timer(TimerFd);

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// One connection's pacing timer.
pub struct Pacer {
    fd: AsyncFd<Timer>,
}

impl Pacer {
    /// # Errors
    /// `timerfd_create` failed (out of fds), or the fd could not be registered.
    pub fn new() -> io::Result<Self> {
        let t = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        // tokio 1.54 deprecated its safe constructors in favour of `unsafe fn
        // register_with_interest`, whose contract is that the fd stays open and the same for
        // the AsyncFd's whole life (tokio PR #8587: an arbitrary `AsRawFd` cannot promise it).
        // `Timer` owns its fd (an `OwnedFd` inside `TimerFd`) and never replaces it, so the
        // contract holds; the crate denies `unsafe`, hence the safe, deprecated door.
        #[allow(deprecated)]
        let fd = AsyncFd::with_interest(Timer(t), Interest::READABLE)?;
        Ok(Self { fd })
    }

    /// Returns at `t` (at once if `t` has passed); `true` if it had to wait for the timer.
    ///
    /// # Errors
    /// Arming or reading the timer failed.
    pub async fn sleep_until(&self, t: Instant) -> io::Result<bool> {
        let left = t.saturating_duration_since(Instant::now());
        if left < NOT_WORTH_WAITING {
            return Ok(false);
        }
        // A relative one-shot on CLOCK_MONOTONIC, the clock `Instant` reads: no conversion
        // between clocks, and the few nanoseconds since `now()` are negligible.
        self.fd
            .get_ref()
            .0
            .set(
                Expiration::OneShot(TimeSpec::from_duration(left)),
                TimerSetTimeFlags::empty(),
            )
            .map_err(io::Error::from)?;
        loop {
            let mut ready = self.fd.readable().await?;
            // Reading the expiration count disarms readiness; EAGAIN means a stale wake-up.
            match ready.try_io(|fd| fd.get_ref().0.wait().map_err(io::Error::from)) {
                Ok(result) => return result.map(|()| true),
                Err(_would_block) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wakes_at_the_target_not_before() {
        let p = Pacer::new().unwrap();
        for wait_us in [50u64, 300, 1500] {
            let target = Instant::now() + Duration::from_micros(wait_us);
            assert!(p.sleep_until(target).await.unwrap(), "waited");
            assert!(Instant::now() >= target, "woke early for {wait_us} us");
        }
        // A past target returns at once.
        let past = Instant::now() - Duration::from_millis(1);
        assert!(!p.sleep_until(past).await.unwrap());
    }
}
