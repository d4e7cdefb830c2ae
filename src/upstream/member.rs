//! One upstream member at run time: its address, its health and its counters, shared by every
//! worker and read by the admin endpoint. Everything is an atomic: workers record connects and
//! failures without a lock, the health checker flips the state, readers take a snapshot.
//!
//! Times are milliseconds since the pool's epoch ([`super::Clock`]), so a deadline fits in an
//! `AtomicU64`; 0 means "never".
//!
//! Besides its health, a member has an operator's word on it ([`AdminState`], set through the
//! admin endpoint's member API) and a weight the operator may change at run time: both are
//! atomics too, read by the balancer at every pick, and carried to the member's namesake (same
//! address) when a reload or a DNS change builds a new member set.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::session::outcome::ConnectError;

/// How often one member's connect failures may be logged (the rest are counted and said with
/// the next line): an outage must not write a line per refused connection.
pub const CONNECT_LOG_EVERY: Duration = Duration::from_secs(1);

/// A health check's answer did not contain `expect` (within its window): stored where an
/// errno goes, negative so that no errno can mean it.
pub const EXPECT_MISMATCH: i32 = -1;
/// The member closed before its answer contained `expect`.
pub const EXPECT_CLOSED: i32 = -2;

/// An established connection got no byte from the member within `first_byte_timeout`.
pub const NO_FIRST_BYTE: i32 = -3;

/// What the operator said of a member (`POST /upstreams/RULE/MEMBER?state=…`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum AdminState {
    /// In rotation, as its health allows (the state every member starts in).
    #[default]
    Up = 0,
    /// No new connection, not even when every other member is down; live ones run to their
    /// end. For taking a member out of service without cutting anyone.
    Drain = 1,
    /// Out of rotation as if its health check had failed: picked only when no member is up
    /// (as an unhealthy member is), and reported down.
    Down = 2,
}

impl AdminState {
    pub const ALL: [Self; 3] = [Self::Up, Self::Drain, Self::Down];
    /// The valid values, for error messages.
    pub const NAMES: &'static str = "up, drain, down";

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Drain => "drain",
            Self::Down => "down",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Drain,
            2 => Self::Down,
            _ => Self::Up,
        }
    }
}

/// A member's health transition, for the one log line it deserves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    Up,
    Down,
}

/// One address of a pool.
#[derive(Debug)]
pub struct Member {
    pub addr: SocketAddr,
    /// The member as written in the config (an address, or the host name it resolved from).
    pub name: Arc<str>,
    /// Index of the [`crate::config::MemberSpec`] it came from.
    pub spec: usize,
    /// The weight the config gave (the run-time weight starts there).
    pub config_weight: u32,
    pub backup: bool,
    /// The weight the balancer uses: the config's until the member API sets another.
    weight: AtomicU32,
    /// [`AdminState`] as a `u8`.
    admin: AtomicU8,
    /// The active checks' verdict (true until a check says otherwise).
    probe_up: AtomicBool,
    /// Consecutive probe results against the current state (the checker's own counter).
    streak: AtomicU32,
    /// Passive ejection: out until this time.
    down_until_ms: AtomicU64,
    /// Connect failures in the current passive-health window, and when that window began.
    fails: AtomicU32,
    window_ms: AtomicU64,
    active: AtomicU64,
    connections: AtomicU64,
    connect_errors: [AtomicU64; 4],
    /// Active health checks by result: `[ok, fail]`.
    checks: [AtomicU64; 2],
    /// Errno of the last failure (connect or probe), 0 for none or since the member was
    /// seen healthy again (a connect or a probe that passed).
    last_errno: AtomicI32,
    /// When `last_errno` was set, Unix seconds.
    last_error_at: AtomicU64,
    last_log_ms: AtomicU64,
    unlogged: AtomicU64,
}

/// A point-in-time view of a member, for `/upstreams`, Prometheus and `ringfwd stats`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberSnapshot {
    pub addr: SocketAddr,
    pub name: String,
    pub weight: u32,
    pub backup: bool,
    /// Takes new connections: healthy and [`AdminState::Up`].
    pub up: bool,
    pub admin: AdminState,
    pub active: u64,
    pub connections: u64,
    pub connect_errors: [u64; 4],
    pub checks: [u64; 2],
    /// The last failure, until the member is seen healthy again.
    pub last_error: Option<String>,
    /// When `last_error` happened, Unix seconds.
    pub last_error_at: Option<u64>,
}

impl Member {
    pub fn new(addr: SocketAddr, name: Arc<str>, spec: usize, weight: u32, backup: bool) -> Self {
        Self {
            addr,
            name,
            spec,
            config_weight: weight.max(1),
            backup,
            weight: AtomicU32::new(weight.max(1)),
            admin: AtomicU8::new(AdminState::Up as u8),
            probe_up: AtomicBool::new(true),
            streak: AtomicU32::new(0),
            down_until_ms: AtomicU64::new(0),
            fails: AtomicU32::new(0),
            window_ms: AtomicU64::new(0),
            active: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            connect_errors: Default::default(),
            checks: Default::default(),
            last_errno: AtomicI32::new(0),
            last_error_at: AtomicU64::new(0),
            last_log_ms: AtomicU64::new(0),
            unlogged: AtomicU64::new(0),
        }
    }

    /// Whether the member takes traffic at `now_ms`: healthy ([`Member::healthy`]) and in
    /// rotation ([`AdminState::Up`]).
    #[inline]
    pub fn is_up(&self, now_ms: u64) -> bool {
        self.admin() == AdminState::Up && self.healthy(now_ms)
    }

    /// Whether its health allows traffic at `now_ms`: the checks say up and no passive
    /// ejection is running (whatever the operator said).
    #[inline]
    pub fn healthy(&self, now_ms: u64) -> bool {
        self.probe_up.load(Ordering::Relaxed)
            && now_ms >= self.down_until_ms.load(Ordering::Relaxed)
    }

    /// What the operator said of the member.
    #[inline]
    pub fn admin(&self) -> AdminState {
        AdminState::from_u8(self.admin.load(Ordering::Relaxed))
    }

    /// Sets the operator's state; returns the one it replaces.
    pub fn set_admin(&self, state: AdminState) -> AdminState {
        AdminState::from_u8(self.admin.swap(state as u8, Ordering::Relaxed))
    }

    /// The weight the balancer uses now.
    #[inline]
    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// Sets the run-time weight (at least 1); returns the one it replaces.
    pub fn set_weight(&self, weight: u32) -> u32 {
        self.weight.swap(weight.max(1), Ordering::Relaxed)
    }

    /// Takes over what the operator set on `older`, this member's namesake in the set it
    /// replaces: its state always, its run-time weight unless the config now gives the
    /// member another weight (a new weight in the file is the newer word).
    pub fn inherit_admin(&self, older: &Member) {
        self.set_admin(older.admin());
        if older.config_weight == self.config_weight {
            self.set_weight(older.weight());
        }
    }

    /// Live connections to this member, across every worker.
    #[inline]
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// A connection to this member was established.
    #[inline]
    pub fn connected(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
        self.fails.store(0, Ordering::Relaxed);
        self.clear_error();
    }

    /// The member answered: its last error is history, not its state.
    #[inline]
    fn clear_error(&self) {
        // A load first: on the connect path the line is shared, a store would bounce it.
        if self.last_errno.load(Ordering::Relaxed) != 0 {
            self.last_errno.store(0, Ordering::Relaxed);
        }
    }

    /// Records `errno` as the member's last error, now.
    fn set_error(&self, errno: i32) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.last_error_at.store(now, Ordering::Relaxed);
        self.last_errno.store(errno, Ordering::Relaxed);
    }

    /// A connection counted by [`Member::connected`] ended.
    #[inline]
    pub fn released(&self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }

    /// A connect to this member failed. Applies passive health (nginx's `max_fails` within
    /// `fail_timeout` takes the member out for `fail_timeout`; `max_fails` 0 turns it off) and
    /// returns `Some(Down)` when this failure took it out.
    pub fn connect_failed(
        &self,
        kind: ConnectError,
        errno: i32,
        now_ms: u64,
        max_fails: u32,
        fail_timeout: Duration,
    ) -> Option<Transition> {
        self.connect_errors[kind as usize].fetch_add(1, Ordering::Relaxed);
        self.set_error(errno);
        self.passive_failure(now_ms, max_fails, fail_timeout)
    }

    /// An established connection got no byte from this member within `first_byte_timeout`
    /// although the client spoke: a failure for passive health, as a failed connect is.
    pub fn no_first_byte(
        &self,
        now_ms: u64,
        max_fails: u32,
        fail_timeout: Duration,
    ) -> Option<Transition> {
        self.set_error(NO_FIRST_BYTE);
        self.passive_failure(now_ms, max_fails, fail_timeout)
    }

    /// Counts one failure in the passive-health window; `Some(Down)` when it took the member
    /// out.
    fn passive_failure(
        &self,
        now_ms: u64,
        max_fails: u32,
        fail_timeout: Duration,
    ) -> Option<Transition> {
        if max_fails == 0 {
            return None;
        }
        let window = duration_ms(fail_timeout);
        let start = self.window_ms.load(Ordering::Relaxed);
        let fails = if start == 0 || now_ms.saturating_sub(start) >= window {
            self.window_ms.store(now_ms, Ordering::Relaxed);
            self.fails.store(1, Ordering::Relaxed);
            1
        } else {
            self.fails.fetch_add(1, Ordering::Relaxed) + 1
        };
        if fails < max_fails {
            return None;
        }
        self.fails.store(0, Ordering::Relaxed);
        self.window_ms.store(0, Ordering::Relaxed);
        let until = now_ms.saturating_add(window);
        let before = self.down_until_ms.swap(until, Ordering::Relaxed);
        // Only the failure that took an up member out is a transition worth a line.
        (before <= now_ms && self.probe_up.load(Ordering::Relaxed)).then_some(Transition::Down)
    }

    /// Whether a connect failure may be logged now; `Some(n)` with the failures held back
    /// since the last line.
    pub fn may_log(&self, now_ms: u64) -> Option<u64> {
        let last = self.last_log_ms.load(Ordering::Relaxed);
        if last != 0 && now_ms.saturating_sub(last) < duration_ms(CONNECT_LOG_EVERY) {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        self.last_log_ms.store(now_ms.max(1), Ordering::Relaxed);
        Some(self.unlogged.swap(0, Ordering::Relaxed))
    }

    /// Records one active probe (called by the health checker only). `rise` consecutive
    /// successes bring a member that is not up back (clearing a passive ejection too: the
    /// member answered); `fall` consecutive failures take an up member out.
    pub fn record_probe(
        &self,
        ok: bool,
        errno: i32,
        now_ms: u64,
        rise: u32,
        fall: u32,
    ) -> Option<Transition> {
        self.checks[usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
        if ok {
            self.clear_error();
        } else {
            self.set_error(errno);
        }
        // Health only: an operator's `down` must not look like a failing member to the
        // checks, nor a passing check bring it back.
        let up = self.healthy(now_ms);
        if ok == up {
            self.streak.store(0, Ordering::Relaxed);
            return None;
        }
        let streak = self.streak.fetch_add(1, Ordering::Relaxed) + 1;
        if ok && streak >= rise {
            self.streak.store(0, Ordering::Relaxed);
            self.down_until_ms.store(0, Ordering::Relaxed);
            self.probe_up.store(true, Ordering::Relaxed);
            Some(Transition::Up)
        } else if !ok && streak >= fall {
            self.streak.store(0, Ordering::Relaxed);
            self.probe_up.store(false, Ordering::Relaxed);
            Some(Transition::Down)
        } else {
            None
        }
    }

    /// The member's counters and state now.
    pub fn snapshot(&self, now_ms: u64) -> MemberSnapshot {
        let errno = self.last_errno.load(Ordering::Relaxed);
        MemberSnapshot {
            addr: self.addr,
            name: self.name.to_string(),
            weight: self.weight(),
            backup: self.backup,
            up: self.is_up(now_ms),
            admin: self.admin(),
            active: self.active(),
            connections: self.connections.load(Ordering::Relaxed),
            connect_errors: std::array::from_fn(|i| self.connect_errors[i].load(Ordering::Relaxed)),
            checks: std::array::from_fn(|i| self.checks[i].load(Ordering::Relaxed)),
            last_error: (errno != 0).then(|| describe_errno(errno)),
            last_error_at: (errno != 0).then(|| self.last_error_at.load(Ordering::Relaxed)),
        }
    }
}

/// An errno as an operator reads it ("connection refused", "timed out").
pub fn describe_errno(errno: i32) -> String {
    match errno {
        libc::ECANCELED | libc::ETIMEDOUT => "timed out".to_string(),
        EXPECT_MISMATCH => "health check answer did not contain expect".to_string(),
        EXPECT_CLOSED => "closed before its answer contained expect".to_string(),
        NO_FIRST_BYTE => "no byte within first_byte_timeout".to_string(),
        _ => {
            let text = std::io::Error::from_raw_os_error(errno).to_string();
            // "Connection refused (os error 111)" → "connection refused"
            let text = text.split(" (os error").next().unwrap_or(&text).to_string();
            let mut c = text.chars();
            match c.next() {
                Some(f) => f.to_lowercase().collect::<String>() + c.as_str(),
                None => text,
            }
        }
    }
}

pub(crate) fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member() -> Member {
        Member::new("127.0.0.1:9".parse().unwrap(), "m".into(), 0, 1, false)
    }

    const FT: Duration = Duration::from_secs(10);

    #[test]
    fn max_fails_within_fail_timeout_takes_a_member_out_for_fail_timeout() {
        let m = member();
        let refused = ConnectError::Refused;
        // 1. Two of three failures: still up.
        assert_eq!(m.connect_failed(refused, 111, 1_000, 3, FT), None);
        assert_eq!(m.connect_failed(refused, 111, 2_000, 3, FT), None);
        assert!(m.is_up(2_000));
        // 2. The third within the window takes it out, for fail_timeout.
        assert_eq!(
            m.connect_failed(refused, 111, 3_000, 3, FT),
            Some(Transition::Down)
        );
        assert!(!m.is_up(3_000));
        assert!(!m.is_up(12_999));
        assert!(m.is_up(13_000));
        // 3. Failures spread wider than the window never add up.
        let m = member();
        for t in [1_000, 12_000, 23_000] {
            assert_eq!(m.connect_failed(refused, 111, t, 2, FT), None);
        }
        assert!(m.is_up(23_000));
        // 4. max_fails 0: passive checks off.
        let m = member();
        for t in 1..100 {
            assert_eq!(m.connect_failed(refused, 111, t, 0, FT), None);
        }
        assert!(m.is_up(100));
        assert_eq!(m.snapshot(100).connect_errors[0], 99);
        assert_eq!(
            m.snapshot(100).last_error.as_deref(),
            Some("connection refused")
        );
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let m = member();
        assert_eq!(m.connect_failed(ConnectError::Refused, 111, 1, 2, FT), None);
        m.connected();
        assert_eq!(m.connect_failed(ConnectError::Refused, 111, 2, 2, FT), None);
        assert!(m.is_up(3));
        m.released();
        assert_eq!(m.active(), 0);
    }

    #[test]
    fn probes_need_fall_failures_and_rise_successes() {
        let m = member();
        assert_eq!(m.record_probe(false, 111, 1, 2, 3), None);
        assert_eq!(m.record_probe(false, 111, 2, 2, 3), None);
        // A success in between restarts the count.
        assert_eq!(m.record_probe(true, 0, 3, 2, 3), None);
        assert_eq!(m.record_probe(false, 111, 4, 2, 3), None);
        assert_eq!(m.record_probe(false, 111, 5, 2, 3), None);
        assert_eq!(m.record_probe(false, 111, 6, 2, 3), Some(Transition::Down));
        assert!(!m.is_up(6));
        assert_eq!(m.record_probe(false, 111, 7, 2, 3), None);
        assert_eq!(m.record_probe(true, 0, 8, 2, 3), None);
        assert_eq!(m.record_probe(true, 0, 9, 2, 3), Some(Transition::Up));
        assert!(m.is_up(9));
        assert_eq!(m.snapshot(9).checks, [3, 6]);
    }

    #[test]
    fn a_passing_probe_ends_a_passive_ejection_after_rise_successes() {
        let m = member();
        assert_eq!(
            m.connect_failed(ConnectError::Refused, 111, 1_000, 1, FT),
            Some(Transition::Down)
        );
        assert_eq!(m.record_probe(true, 0, 1_200, 2, 2), None);
        assert_eq!(m.record_probe(true, 0, 1_400, 2, 2), Some(Transition::Up));
        assert!(m.is_up(1_400));
    }

    #[test]
    fn the_last_error_has_a_time_and_clears_once_the_member_answers() {
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let m = member();
        assert_eq!(m.snapshot(1).last_error, None);
        assert_eq!(m.snapshot(1).last_error_at, None);
        m.connect_failed(ConnectError::Refused, libc::ECONNREFUSED, 1, 0, FT);
        let s = m.snapshot(2);
        assert_eq!(s.last_error.as_deref(), Some("connection refused"));
        assert!(
            s.last_error_at
                .is_some_and(|t| t >= before && t < before + 60)
        );
        // A connect that succeeds clears it; so does a passing probe.
        m.connected();
        assert_eq!(
            (m.snapshot(3).last_error, m.snapshot(3).last_error_at),
            (None, None)
        );
        m.record_probe(false, EXPECT_MISMATCH, 4, 1, 1);
        assert_eq!(
            m.snapshot(5).last_error.as_deref(),
            Some("health check answer did not contain expect")
        );
        assert!(!m.is_up(5));
        assert_eq!(m.record_probe(true, 0, 6, 1, 1), Some(Transition::Up));
        assert_eq!(m.snapshot(7).last_error, None);
        // The counters keep the history.
        assert_eq!(m.snapshot(7).checks, [1, 1]);
        assert_eq!(m.snapshot(7).connect_errors[0], 1);
    }

    #[test]
    fn no_first_byte_counts_like_a_failed_connect() {
        let m = member();
        assert_eq!(m.no_first_byte(1_000, 2, FT), None);
        assert!(m.is_up(1_000));
        assert_eq!(m.no_first_byte(2_000, 2, FT), Some(Transition::Down));
        assert!(!m.is_up(2_000) && m.is_up(12_000));
        let s = m.snapshot(2_000);
        assert_eq!(
            s.last_error.as_deref(),
            Some("no byte within first_byte_timeout")
        );
        assert_eq!(s.connect_errors, [0; 4], "not a connect error");
        assert_eq!(member().no_first_byte(1, 0, FT), None, "max_fails 0: off");
    }

    #[test]
    fn the_operators_state_and_weight_sit_beside_health() {
        let m = member();
        // 1. Down: not up, yet the checks keep their own verdict and never bring it back.
        assert_eq!(m.set_admin(AdminState::Down), AdminState::Up);
        assert!(!m.is_up(1) && m.healthy(1));
        for t in 2..10 {
            assert_eq!(m.record_probe(true, 0, t, 1, 1), None);
        }
        assert!(!m.is_up(10));
        // 2. A failing check while down still takes its health away, and up brings back
        //    exactly what health says.
        assert_eq!(m.record_probe(false, 111, 11, 1, 1), Some(Transition::Down));
        m.set_admin(AdminState::Up);
        assert!(!m.is_up(12));
        assert_eq!(m.record_probe(true, 0, 13, 1, 1), Some(Transition::Up));
        assert!(m.is_up(13));
        // 3. Drain: healthy, not taking traffic, reported as such.
        m.set_admin(AdminState::Drain);
        let s = m.snapshot(14);
        assert!(!s.up && s.admin == AdminState::Drain);
        // 4. Weights: at least 1; a namesake inherits state and weight, but not a weight
        //    whose config value changed.
        assert_eq!(m.set_weight(0), 1);
        assert_eq!(m.weight(), 1);
        m.set_weight(7);
        let same = member();
        same.inherit_admin(&m);
        assert_eq!((same.admin(), same.weight()), (AdminState::Drain, 7));
        let reweighted = Member::new("127.0.0.1:9".parse().unwrap(), "m".into(), 0, 3, false);
        reweighted.inherit_admin(&m);
        assert_eq!(
            (reweighted.admin(), reweighted.weight()),
            (AdminState::Drain, 3)
        );
        assert_eq!(AdminState::parse("drain"), Some(AdminState::Drain));
        assert_eq!(AdminState::parse("maint"), None);
    }

    #[test]
    fn connect_failure_lines_are_rate_limited_per_member() {
        let m = member();
        assert_eq!(m.may_log(1_000), Some(0));
        assert_eq!(m.may_log(1_100), None);
        assert_eq!(m.may_log(1_900), None);
        assert_eq!(m.may_log(2_000), Some(2));
    }
}
