//! Compact times for the per-connection state.
//!
//! An idle connection costs what its slab entry costs, and an [`Instant`] is 16 bytes. The
//! relay state keeps its times as 32-bit counts from one process-wide origin instead and
//! compares them by wrapping difference, which is exact for any span shorter than the
//! count's wrap:
//! - [`Millis`] (wraps after 49.7 days) for when a connection last moved a byte and when its
//!   client's first bytes left: the spans measured from them are the idle timeout, the park
//!   delay and `first_byte_timeout`, each at most a week (the config's bound), and
//!   millisecond resolution is finer than the worker's timer scan;
//! - [`Micros`] (wraps after 71 minutes) for when a copy buffer was read, to time its trip to
//!   the destination: a buffer still unsent after 71 minutes is reported modulo the wrap.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The instant every count starts from (the first time one is taken).
static ORIGIN: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds from the origin to `t`, negative for an instant before it.
fn nanos(t: Instant) -> i128 {
    let origin = *ORIGIN.get_or_init(Instant::now);
    match t.checked_duration_since(origin) {
        Some(d) => d.as_nanos() as i128,
        None => -(origin.duration_since(t).as_nanos() as i128),
    }
}

/// An instant as a count of `UNIT_NS`-nanosecond units from the origin, modulo 2^32; only
/// differences are read, exact for spans shorter than 2^32 units.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp<const UNIT_NS: u64>(u32);

/// Milliseconds (wraps after 49.7 days).
pub type Millis = Stamp<1_000_000>;
/// Microseconds (wraps after 71 minutes).
pub type Micros = Stamp<1_000>;

impl<const UNIT_NS: u64> Stamp<UNIT_NS> {
    pub fn of(t: Instant) -> Self {
        // Truncation to 32 bits is the point: only differences are read, modulo the wrap.
        Self(nanos(t).div_euclid(i128::from(UNIT_NS)) as u32)
    }

    /// The time from `self` to `now`, to the unit (exact below the wrap).
    pub fn until(self, now: Instant) -> Duration {
        Duration::from_nanos(u64::from(Self::of(now).0.wrapping_sub(self.0)) * UNIT_NS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_read_back_across_the_origin_and_the_wrap() {
        let now = Instant::now();
        let before = now.checked_sub(Duration::from_secs(3)).unwrap_or(now);
        let earlier = now.duration_since(before);
        assert_eq!(
            Millis::of(before).until(now).as_millis(),
            earlier.as_millis()
        );
        let week = Duration::from_secs(7 * 24 * 3600);
        assert_eq!(Millis::of(now).until(now + week), week);
        let hour = Duration::from_secs(3600);
        assert_eq!(Micros::of(now).until(now + hour), hour);
        // Past the wrap the span is read modulo it (the documented limit).
        let wrap = Duration::from_millis(1 << 32);
        assert_eq!(Millis::of(now).until(now + wrap), Duration::ZERO);
    }

    #[test]
    fn a_stamp_is_a_quarter_of_an_instant() {
        assert_eq!(std::mem::size_of::<Millis>(), 4);
        assert_eq!(std::mem::size_of::<Micros>(), 4);
    }
}
