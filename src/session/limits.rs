//! Per-client-IP admission limits: how many connections one address may hold at once
//! (`max_connections_per_ip`) and how fast it may open new ones
//! (`max_new_connections_per_ip = "50/s"`), in memory that does not grow with the number of
//! addresses, shared lock-free by every worker thread.
//!
//! Why bounded: an attacker controls how many source addresses we see (an IPv6 /64 alone
//! holds 2^64). A map keyed by address would grow without limit or need eviction, which an
//! attacker can drive to evict the very entries that hold others back. Instead [`IpLimits`]
//! is a fixed table of `slots` entries chosen at construction (65 536 by default, 16 bytes
//! each: 1 MiB); an address is hashed, with a per-process random key, to one slot, and the
//! slot holds both its live count and its token bucket. Past as many addresses as slots, two
//! addresses may share a slot and then share its limits: a limit can only become stricter,
//! never looser, under a flood of addresses, and nothing is ever evicted. Size `slots` a few
//! times above the number of simultaneously active client addresses to keep sharing rare.
//!
//! Why lock-free: each slot is two atomics (`AtomicU32` live count, `AtomicU64` bucket
//! state) updated by compare-and-swap, so workers never wait on each other, and a permit
//! remembers its slot so its release is exact whatever else happened meanwhile.
//!
//! The rate limit is a token bucket written as GCRA (the "virtual scheduling" form): one
//! `u64` per slot, the theoretical arrival time of the next connection. A fresh address may
//! open `burst` connections at once, then one per `period / count`. Unless told otherwise
//! ([`Rate::with_burst`]), the burst is the number the rate allows in one second, at least 1:
//! `50/s` bursts 50, `600/m` bursts 10, `5/m` bursts 1.
//!
//! IPv4-mapped IPv6 clients count as their IPv4 address. IPv6 clients can be grouped by
//! prefix ([`LimitsConfig::ipv6_prefix`]; 128, one address, by default) since one host
//! usually owns a whole /64.

#![warn(missing_docs)]

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Default number of slots in the table.
pub const DEFAULT_SLOTS: usize = 1 << 16;
/// Most slots a table may have (16 Mi slots, 256 MiB): a guard against a typo.
pub const MAX_SLOTS: usize = 1 << 24;

/// A rate: `count` new connections per `period`, with a burst.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rate {
    count: u32,
    period: Duration,
    burst: u32,
}

/// Why a rate was refused, quoting what the operator wrote.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    /// Not of the form `N/s`, `N/m` or `N/h`.
    #[error(
        "\"{0}\": expected a number of connections per second, minute or hour, e.g. \"50/s\", \"600/m\""
    )]
    Syntax(String),
    /// A count of zero (it would refuse everything: leave the limit out instead).
    #[error("\"{0}\": the count must be at least 1 (to disable the limit, leave it out)")]
    Zero(String),
}

impl Rate {
    /// `count` connections per `period` (which must be longer than zero), with the default
    /// burst: what the rate allows in one second, rounded up, at least 1.
    ///
    /// # Errors
    /// [`RateError::Zero`] for a zero count, [`RateError::Syntax`] for a zero period.
    pub fn new(count: u32, period: Duration) -> Result<Self, RateError> {
        let shown = || format!("{count}/{period:?}");
        if count == 0 {
            return Err(RateError::Zero(shown()));
        }
        if period.is_zero() {
            return Err(RateError::Syntax(shown()));
        }
        let per_second = (u128::from(count) * 1_000_000_000).div_ceil(period.as_nanos());
        let burst = u32::try_from(per_second).unwrap_or(u32::MAX).max(1);
        Ok(Self {
            count,
            period,
            burst,
        })
    }

    /// Parses `"N/s"`, `"N/m"` or `"N/h"` (spaces around the parts allowed).
    ///
    /// # Errors
    /// [`RateError`] quoting `s`: not of that form, or a count of zero.
    pub fn parse(s: &str) -> Result<Self, RateError> {
        let syntax = || RateError::Syntax(s.to_owned());
        let (n, unit) = s.split_once('/').ok_or_else(syntax)?;
        let (n, unit) = (n.trim(), unit.trim());
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return Err(syntax());
        }
        let count: u32 = n.parse().map_err(|_| syntax())?;
        let period = match unit {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(syntax()),
        };
        if count == 0 {
            return Err(RateError::Zero(s.to_owned()));
        }
        Self::new(count, period)
    }

    /// The same rate with another burst (at least 1).
    pub fn with_burst(self, burst: u32) -> Self {
        Self {
            burst: burst.max(1),
            ..self
        }
    }

    /// Connections per period.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The period `count` applies to.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// Connections a fresh (or long quiet) address may open at once.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// The steady spacing between connections: `period / count`, rounded up to the
    /// nanosecond (so never faster than configured).
    pub fn interval(&self) -> Duration {
        let ns = self
            .period
            .as_nanos()
            .div_ceil(u128::from(self.count))
            .max(1);
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }
}

impl FromStr for Rate {
    type Err = RateError;
    fn from_str(s: &str) -> Result<Self, RateError> {
        Self::parse(s)
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.period.as_secs() {
            1 if self.period.subsec_nanos() == 0 => write!(f, "{}/s", self.count),
            60 if self.period.subsec_nanos() == 0 => write!(f, "{}/m", self.count),
            3600 if self.period.subsec_nanos() == 0 => write!(f, "{}/h", self.count),
            _ => write!(f, "{}/{:?}", self.count, self.period),
        }
    }
}

/// What to limit, and the table's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Connections one address may hold at once; `None`: no such limit.
    pub max_connections_per_ip: Option<NonZeroU32>,
    /// New connections one address may open per period; `None`: no such limit.
    pub max_new_connections_per_ip: Option<Rate>,
    /// Slots in the table (rounded up to a power of two, 1 to [`MAX_SLOTS`]).
    pub slots: usize,
    /// IPv6 clients sharing this many leading bits share limits (0 to 128; 64 treats a
    /// whole /64 as one client). IPv4 clients are always limited per address.
    pub ipv6_prefix: u8,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections_per_ip: None,
            max_new_connections_per_ip: None,
            slots: DEFAULT_SLOTS,
            ipv6_prefix: 128,
        }
    }
}

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum LimitExceeded {
    /// The address already holds `max_connections_per_ip` connections.
    #[error("too many connections from this address")]
    PerIp,
    /// The address opened connections faster than `max_new_connections_per_ip`.
    #[error("new connections from this address too fast")]
    Rate,
}

/// A connection's place under `max_connections_per_ip`. Hand it back to
/// [`IpLimits::release`] when the connection ends (and only then: it is not `Clone`, so it
/// cannot be released twice). It is four bytes, to keep in per-connection state.
#[must_use = "a permit must be handed back to IpLimits::release when the connection ends"]
#[derive(Debug, PartialEq, Eq)]
pub struct Permit {
    /// The slot whose live count this permit holds; [`NO_SLOT`] when there is none.
    slot: u32,
}

const NO_SLOT: u32 = u32::MAX;

impl Permit {
    /// A permit that holds nothing (limits disabled): releasing it is a no-op.
    pub const fn none() -> Self {
        Self { slot: NO_SLOT }
    }
}

/// One slot: 16 bytes.
#[derive(Default)]
struct Slot {
    live: AtomicU32,
    /// GCRA theoretical arrival time, in ns since the table's epoch.
    tat: AtomicU64,
}

/// The per-IP limits, shared by every worker (`Sync`; put it in an `Arc`). Memory is fixed
/// at construction: [`IpLimits::memory_bytes`].
pub struct IpLimits {
    slots: Box<[Slot]>,
    mask: usize,
    hasher: RandomState,
    /// 0: no per-IP connection limit.
    max_live: u32,
    /// 0: no rate limit.
    interval_ns: u64,
    /// How far ahead of now the arrival time may run: (burst - 1) intervals.
    tolerance_ns: u64,
    epoch: Instant,
    v6_mask: u128,
}

impl fmt::Debug for IpLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IpLimits")
            .field("slots", &self.slots.len())
            .field("max_live", &self.max_live)
            .field("interval_ns", &self.interval_ns)
            .field("tolerance_ns", &self.tolerance_ns)
            .finish_non_exhaustive()
    }
}

impl IpLimits {
    /// A table for `config`; `epoch` is the origin of its clock (any `Instant` not after the
    /// first `now` given to [`IpLimits::try_acquire`]; earlier ones count as the epoch).
    pub fn new(config: &LimitsConfig, epoch: Instant) -> Self {
        let enabled =
            config.max_connections_per_ip.is_some() || config.max_new_connections_per_ip.is_some();
        // A table of one slot when nothing is limited: no memory for nothing.
        let n = if enabled {
            config.slots.clamp(1, MAX_SLOTS).next_power_of_two()
        } else {
            1
        };
        let (interval_ns, tolerance_ns) = match config.max_new_connections_per_ip {
            Some(rate) => {
                let i = u64::try_from(rate.interval().as_nanos()).unwrap_or(u64::MAX);
                (i, i.saturating_mul(u64::from(rate.burst() - 1)))
            }
            None => (0, 0),
        };
        let p = u32::from(config.ipv6_prefix.min(128));
        Self {
            slots: (0..n).map(|_| Slot::default()).collect(),
            mask: n - 1,
            hasher: RandomState::new(),
            max_live: config.max_connections_per_ip.map_or(0, NonZeroU32::get),
            interval_ns,
            tolerance_ns,
            epoch,
            v6_mask: u128::MAX.checked_shl(128 - p).unwrap_or(0),
        }
    }

    /// Whether any limit is configured (if not, [`IpLimits::try_acquire`] always succeeds
    /// without touching memory).
    pub fn is_enabled(&self) -> bool {
        self.max_live != 0 || self.interval_ns != 0
    }

    /// Admits a new connection from `ip` at `now`, or says which limit it hits. On success the
    /// connection counts against its address until its permit is released. A refused
    /// connection takes nothing: no place, and no token (only admitted connections use up
    /// the rate). Lock-free: a few compare-and-swaps on the address's slot.
    ///
    /// # Errors
    /// [`LimitExceeded::PerIp`] if the address holds `max_connections_per_ip` connections
    /// already, [`LimitExceeded::Rate`] if it opened them too fast.
    pub fn try_acquire(&self, ip: IpAddr, now: Instant) -> Result<Permit, LimitExceeded> {
        if !self.is_enabled() {
            return Ok(Permit::none());
        }
        let i = self.slot_of(ip);
        let slot = &self.slots[i];
        if self.max_live != 0
            && slot
                .live
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < self.max_live).then_some(n + 1)
                })
                .is_err()
        {
            return Err(LimitExceeded::PerIp);
        }
        if self.interval_ns != 0 && !self.take_token(slot, now) {
            if self.max_live != 0 {
                slot.live.fetch_sub(1, Ordering::AcqRel);
            }
            return Err(LimitExceeded::Rate);
        }
        Ok(if self.max_live != 0 {
            Permit { slot: i as u32 }
        } else {
            Permit::none()
        })
    }

    /// Ends a connection's place under `max_connections_per_ip`.
    pub fn release(&self, permit: Permit) {
        if let Some(slot) = self.slots.get(permit.slot as usize) {
            // A permit comes from a successful acquire on this table, so the count is >= 1;
            // saturate anyway rather than wrap if one from another table is handed in.
            let _ = slot
                .live
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        }
    }

    /// Connections counted against `ip`'s slot now (those of addresses sharing the slot
    /// included). For tests and diagnostics.
    pub fn live(&self, ip: IpAddr) -> u32 {
        self.slots[self.slot_of(ip)].live.load(Ordering::Acquire)
    }

    /// Sum of every slot's live count: 0 once every permit was released.
    pub fn total_live(&self) -> u64 {
        self.slots
            .iter()
            .map(|s| u64::from(s.live.load(Ordering::Acquire)))
            .sum()
    }

    /// Slots in the table.
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Bytes this table holds, fixed at construction whatever the traffic.
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of::<Self>() + std::mem::size_of_val::<[Slot]>(&self.slots)
    }

    fn slot_of(&self, ip: IpAddr) -> usize {
        let key: (u8, u128) = match ip.to_canonical() {
            IpAddr::V4(a) => (4, u128::from(u32::from(a))),
            IpAddr::V6(a) => (6, u128::from(a) & self.v6_mask),
        };
        self.hasher.hash_one(key) as usize & self.mask
    }

    /// GCRA: admit if the slot's arrival time is at most `tolerance` ahead of now, and push
    /// it one interval further.
    fn take_token(&self, slot: &Slot, now: Instant) -> bool {
        let t =
            u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX);
        let mut tat = slot.tat.load(Ordering::Acquire);
        loop {
            let base = tat.max(t);
            if base - t > self.tolerance_ns {
                return false;
            }
            match slot.tat.compare_exchange_weak(
                tat,
                base.saturating_add(self.interval_ns),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(current) => tat = current,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::sync::Arc;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn limits(max: Option<u32>, rate: Option<&str>, slots: usize) -> (IpLimits, Instant) {
        let epoch = Instant::now();
        let cfg = LimitsConfig {
            max_connections_per_ip: max.and_then(NonZeroU32::new),
            max_new_connections_per_ip: rate.map(|r| Rate::parse(r).unwrap()),
            slots,
            ..LimitsConfig::default()
        };
        (IpLimits::new(&cfg, epoch), epoch)
    }

    /// An address whose slot differs from `of`'s, so the test does not depend on the hash.
    fn other_slot(l: &IpLimits, of: IpAddr) -> IpAddr {
        (1..=255u8)
            .map(|b| IpAddr::V4(Ipv4Addr::new(198, 51, 100, b)))
            .find(|&c| l.slot_of(c) != l.slot_of(of))
            .unwrap()
    }

    #[test]
    fn rate_parsing() {
        let r = Rate::parse("50/s").unwrap();
        assert_eq!(
            (r.count(), r.period(), r.burst()),
            (50, Duration::from_secs(1), 50)
        );
        assert_eq!(r.interval(), Duration::from_millis(20));
        assert_eq!(r.to_string(), "50/s");
        let r: Rate = " 600 / m ".parse().unwrap();
        assert_eq!(
            (r.count(), r.burst(), r.interval()),
            (600, 10, Duration::from_millis(100))
        );
        assert_eq!(r.to_string(), "600/m");
        assert_eq!(Rate::parse("5/m").unwrap().burst(), 1);
        assert_eq!(Rate::parse("7200/h").unwrap().burst(), 2);
        assert_eq!(
            Rate::parse("3/s").unwrap().interval(),
            Duration::from_nanos(333_333_334)
        );
        assert_eq!(Rate::parse("50/s").unwrap().with_burst(0).burst(), 1);
        assert_eq!(Rate::parse("4294967295/s").unwrap().burst(), u32::MAX);
        for bad in [
            "",
            "50",
            "50/",
            "/s",
            "50/x",
            "50/sec",
            "-1/s",
            "1.5/s",
            "4294967296/s",
            "5 0/s",
        ] {
            let e = Rate::parse(bad).unwrap_err();
            assert!(matches!(e, RateError::Syntax(_)), "{bad}: {e:?}");
            assert!(e.to_string().contains("e.g. \"50/s\""));
        }
        assert!(
            Rate::parse("0/s")
                .unwrap_err()
                .to_string()
                .contains("at least 1")
        );
        assert!(Rate::new(1, Duration::ZERO).is_err());
    }

    #[test]
    fn per_ip_limit_holds_and_others_pass() {
        let (l, t0) = limits(Some(10), None, DEFAULT_SLOTS);
        let a = ip("203.0.113.7");
        let mut held = Vec::new();
        let mut refused = 0;
        for _ in 0..1000 {
            match l.try_acquire(a, t0) {
                Ok(p) => held.push(p),
                Err(e) => {
                    assert_eq!(e, LimitExceeded::PerIp);
                    refused += 1;
                }
            }
        }
        assert_eq!((held.len(), refused), (10, 990));
        assert_eq!(l.live(a), 10);
        let b = other_slot(&l, a);
        let pb = l.try_acquire(b, t0).expect("another address is admitted");
        // The same client seen through a dual-stack listener is the same client.
        let mapped = IpAddr::V6(Ipv4Addr::new(203, 0, 113, 7).to_ipv6_mapped());
        assert_eq!(l.try_acquire(mapped, t0), Err(LimitExceeded::PerIp));
        l.release(held.pop().unwrap());
        let again = l
            .try_acquire(a, t0)
            .expect("a released place is free again");
        held.push(again);
        for p in held {
            l.release(p);
        }
        l.release(pb);
        assert_eq!((l.live(a), l.total_live()), (0, 0));
    }

    #[test]
    fn rate_holds_over_a_simulated_clock() {
        // 50/s offered 1000/s for 100 s: 50 * 100 plus the burst of 50.
        let (l, t0) = limits(None, Some("50/s"), DEFAULT_SLOTS);
        let a = ip("2001:db8::1");
        let mut ok = 0u32;
        for ms in 0..100_000u64 {
            if let Ok(p) = l.try_acquire(a, t0 + Duration::from_millis(ms)) {
                assert_eq!(p, Permit::none(), "no live count without a per-IP limit");
                ok += 1;
            }
        }
        assert!((4500..=5500).contains(&ok), "admitted {ok}");
        // Tighter: the steady rate plus the burst, give or take the 1 ms offering grid.
        assert!((5040..=5060).contains(&ok), "admitted {ok}");
        // The burst: a fresh address gets exactly 50 at one instant, then waits 20 ms.
        let b = other_slot(&l, a);
        let t = t0 + Duration::from_secs(200);
        let burst = (0..1000).filter(|_| l.try_acquire(b, t).is_ok()).count();
        assert_eq!(burst, 50);
        assert_eq!(
            l.try_acquire(b, t + Duration::from_millis(19)),
            Err(LimitExceeded::Rate)
        );
        assert!(l.try_acquire(b, t + Duration::from_millis(20)).is_ok());

        // Per minute, offered every 10 ms for 10 minutes: 1200 plus a burst of 2.
        let (l, t0) = limits(None, Some("120/m"), DEFAULT_SLOTS);
        let ok = (0..60_000u64)
            .filter(|i| l.try_acquire(a, t0 + Duration::from_millis(10 * i)).is_ok())
            .count();
        assert!((1080..=1320).contains(&ok), "admitted {ok}");
    }

    #[test]
    fn both_limits_and_rate_refusals_release_their_place() {
        let (l, t0) = limits(Some(3), Some("2/s"), DEFAULT_SLOTS);
        let a = ip("192.0.2.1");
        let p1 = l.try_acquire(a, t0).unwrap();
        let p2 = l.try_acquire(a, t0).unwrap();
        assert_eq!(l.try_acquire(a, t0), Err(LimitExceeded::Rate));
        assert_eq!(l.live(a), 2, "a rate refusal holds no place");
        let p3 = l.try_acquire(a, t0 + Duration::from_millis(500)).unwrap();
        assert_eq!(
            l.try_acquire(a, t0 + Duration::from_secs(10)),
            Err(LimitExceeded::PerIp)
        );
        for p in [p1, p2, p3] {
            l.release(p);
        }
        assert_eq!(l.total_live(), 0);
    }

    #[test]
    fn sharing_a_slot_is_stricter_never_looser() {
        // One slot: every address shares it, so together they get one address's allowance.
        let (l, t0) = limits(Some(5), None, 1);
        let held: Vec<_> = (0..100u32)
            .filter_map(|i| l.try_acquire(IpAddr::V4(Ipv4Addr::from(i)), t0).ok())
            .collect();
        assert_eq!(held.len(), 5);
        for p in held {
            l.release(p);
        }
        assert_eq!(l.total_live(), 0);
    }

    #[test]
    fn ipv6_prefix_groups_a_host() {
        let epoch = Instant::now();
        let cfg = LimitsConfig {
            max_connections_per_ip: NonZeroU32::new(1),
            ipv6_prefix: 64,
            ..LimitsConfig::default()
        };
        let l = IpLimits::new(&cfg, epoch);
        let p = l.try_acquire(ip("2001:db8:1:2::1"), epoch).unwrap();
        assert_eq!(
            l.try_acquire(ip("2001:db8:1:2:ffff::9"), epoch),
            Err(LimitExceeded::PerIp),
            "same /64"
        );
        l.release(p);
    }

    #[test]
    fn disabled_costs_nothing() {
        let l = IpLimits::new(&LimitsConfig::default(), Instant::now());
        assert!(!l.is_enabled());
        assert_eq!(l.slots(), 1);
        for _ in 0..100 {
            let p = l.try_acquire(ip("10.0.0.1"), Instant::now()).unwrap();
            assert_eq!(p, Permit::none());
            l.release(p);
        }
        assert_eq!(l.total_live(), 0);
    }

    #[test]
    fn memory_is_bounded_under_a_million_addresses() {
        let (l, t0) = limits(Some(10), Some("50/s"), DEFAULT_SLOTS);
        let before = l.memory_bytes();
        assert!(before <= DEFAULT_SLOTS * 16 + 1024, "{before} bytes");
        let mut held = Vec::with_capacity(1_000_000);
        let mut refused = 0u32;
        for i in 0..1_000_000u32 {
            // Half IPv4, half IPv6 (each a different /64, too).
            let a = if i % 2 == 0 {
                IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + i))
            } else {
                IpAddr::V6(Ipv6Addr::from(
                    0x2001_0db8_u128 << 96 | u128::from(i) << 64 | 1,
                ))
            };
            match l.try_acquire(a, t0) {
                Ok(p) => held.push(p),
                Err(_) => refused += 1,
            }
        }
        assert_eq!(
            l.memory_bytes(),
            before,
            "no growth with the number of addresses"
        );
        // 1M addresses over 64Ki slots of 10: shared slots refuse the excess, never admit more.
        assert!(held.len() <= DEFAULT_SLOTS * 10);
        assert!(refused > 0);
        assert_eq!(l.total_live(), held.len() as u64);
        for p in held {
            l.release(p);
        }
        assert_eq!(l.total_live(), 0);
    }

    #[test]
    fn concurrent_use_keeps_counts_exact() {
        const THREADS: usize = 4;
        const ROUNDS: usize = 20_000;
        const MAX: u32 = 3;
        let (l, t0) = limits(Some(MAX), None, DEFAULT_SLOTS);
        let l = Arc::new(l);
        let addrs: Vec<IpAddr> = (1..=8u8)
            .map(|b| IpAddr::V4(Ipv4Addr::new(10, 9, 8, b)))
            .collect();
        // Holders per address as the test sees them: never above the limit.
        let holders: Arc<Vec<AtomicU32>> =
            Arc::new(addrs.iter().map(|_| AtomicU32::new(0)).collect());
        let admitted = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let (l, addrs, holders, admitted) =
                    (l.clone(), addrs.clone(), holders.clone(), admitted.clone());
                std::thread::spawn(move || {
                    let mut mine: Vec<(usize, Permit)> = Vec::new();
                    for r in 0..ROUNDS {
                        let k = (r * 7 + t * 3) % addrs.len();
                        if let Ok(p) = l.try_acquire(addrs[k], t0) {
                            let h = holders[k].fetch_add(1, Ordering::SeqCst) + 1;
                            assert!(h <= MAX, "{h} holders of one address");
                            admitted.fetch_add(1, Ordering::Relaxed);
                            mine.push((k, p));
                        }
                        // Release in a different order than acquired.
                        if (r % 3 == 0 || mine.len() > 4)
                            && let Some((k, p)) = mine.pop()
                        {
                            holders[k].fetch_sub(1, Ordering::SeqCst);
                            l.release(p);
                        }
                    }
                    for (k, p) in mine {
                        holders[k].fetch_sub(1, Ordering::SeqCst);
                        l.release(p);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(admitted.load(Ordering::Relaxed) > 0);
        assert_eq!(l.total_live(), 0, "no place leaked");
        for a in &addrs {
            assert_eq!(l.live(*a), 0);
        }
    }

    #[test]
    fn concurrent_rate_admits_exactly_the_burst() {
        // At one instant, four threads racing on one address get exactly the burst.
        let (l, t0) = limits(None, Some("100/s"), DEFAULT_SLOTS);
        let l = Arc::new(l);
        let a = ip("192.0.2.99");
        let oks: usize = (0..4)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || {
                    (0..1000).filter(|_| l.try_acquire(a, t0).is_ok()).count()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .sum();
        assert_eq!(oks, 100);
    }
}
