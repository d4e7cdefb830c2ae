//! A rule's pool: its settings, its members and how the member set follows DNS.
//!
//! The member set is immutable once published ([`MemberSet`], behind an `ArcSwap`): a session
//! takes the current set when it starts and keeps it to its end, so indices and counters stay
//! valid while the control thread publishes a new set next to it. A refresh is I/O-free here
//! ([`Pool::refresh`] takes what the resolver answered); the lookups themselves run on the
//! control thread ([`super::control`]).

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use arc_swap::ArcSwap;

use super::member::{MAX_MEMBERS, Member, MemberSnapshot, duration_ms};
use crate::config::{Balance, HealthCheck, MemberSpec, Upstream};

/// Milliseconds since a pool's creation; 0 is reserved for "never".
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    epoch: Instant,
}

impl Clock {
    pub fn new(epoch: Instant) -> Self {
        Self { epoch }
    }

    #[inline]
    pub fn ms(&self, now: Instant) -> u64 {
        duration_ms(now.saturating_duration_since(self.epoch)).saturating_add(1)
    }
}

/// One published generation of a pool's members.
#[derive(Debug)]
pub struct MemberSet {
    /// Changes whenever the members change (per-worker balancer state is reset on it).
    pub version: u64,
    pub members: Vec<Arc<Member>>,
}

impl MemberSet {
    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

/// What a refresh changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Refresh {
    pub added: Vec<SocketAddr>,
    pub removed: Vec<SocketAddr>,
    /// Members whose lookup failed and kept their last good addresses: `(name, error)`.
    pub failed: Vec<(String, String)>,
}

impl Refresh {
    pub fn changed(&self) -> bool {
        !self.added.is_empty() || !self.removed.is_empty()
    }
}

/// A rule's upstream pool.
#[derive(Debug)]
pub struct Pool {
    pub rule: String,
    pub specs: Vec<MemberSpec>,
    pub balance: Balance,
    pub connect_retries: u32,
    pub max_fails: u32,
    pub fail_timeout: std::time::Duration,
    pub health_check: Option<HealthCheck>,
    pub resolve_interval: Option<std::time::Duration>,
    /// How connections to the members leave the host (data connections and health probes).
    pub egress: crate::config::Egress,
    pub clock: Clock,
    set: ArcSwap<MemberSet>,
    versions: AtomicU64,
}

impl Pool {
    /// The pool of a rule, with the addresses its members resolved to at load time.
    pub fn new(rule: &str, upstream: &Upstream, epoch: Instant) -> Self {
        let specs = upstream.members.clone();
        let mut seen = HashSet::new();
        let mut members = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let name: Arc<str> = Arc::from(spec.text.as_str());
            for &addr in &spec.addrs {
                if members.len() < MAX_MEMBERS && seen.insert(addr) {
                    members.push(Arc::new(Member::new(
                        addr,
                        name.clone(),
                        i,
                        spec.weight.get(),
                        spec.backup,
                    )));
                }
            }
        }
        Self {
            rule: rule.to_string(),
            specs,
            balance: upstream.balance,
            connect_retries: upstream.connect_retries,
            max_fails: upstream.max_fails,
            fail_timeout: upstream.fail_timeout,
            health_check: upstream.health_check.clone(),
            resolve_interval: upstream.resolve_interval,
            egress: upstream.egress.clone(),
            clock: Clock::new(epoch),
            set: ArcSwap::from_pointee(MemberSet {
                version: 0,
                members,
            }),
            versions: AtomicU64::new(0),
        }
    }

    /// The current member set (one atomic load and a reference count).
    #[inline]
    pub fn members(&self) -> Arc<MemberSet> {
        self.set.load_full()
    }

    /// Whether any member is a host name that DNS may change.
    pub fn has_names(&self) -> bool {
        self.specs.iter().any(MemberSpec::is_name)
    }

    /// Whether a member name has no address in the current set (it did not resolve at load
    /// and no lookup found one since): that member is down until one does.
    pub fn has_unresolved(&self) -> bool {
        let set = self.members();
        (0..self.specs.len()).any(|i| !set.members.iter().any(|m| m.spec == i))
    }

    /// The most connect attempts one session makes: `connect_retries + 1`, never more than
    /// there are members (a member is never tried twice in one session).
    pub fn max_attempts(&self, set: &MemberSet) -> usize {
        (self.connect_retries as usize + 1).min(set.len())
    }

    /// Applies one round of lookups: `answers[i]` is what member spec `i` resolved to (only
    /// host names are looked up; `None` for literal addresses, which never change). A failed
    /// lookup keeps that member's last good addresses. Members whose address stays keep their
    /// counters and health; a new set is published only if something changed.
    pub fn refresh(&self, answers: &[Option<io::Result<Vec<SocketAddr>>>]) -> Refresh {
        let current = self.members();
        let mut out = Refresh::default();
        let mut seen = HashSet::new();
        let mut members = Vec::with_capacity(current.len());
        for (i, spec) in self.specs.iter().enumerate() {
            let kept: Vec<SocketAddr> = current
                .members
                .iter()
                .filter(|m| m.spec == i)
                .map(|m| m.addr)
                .collect();
            let addrs: Vec<SocketAddr> = match answers.get(i) {
                Some(Some(Ok(a))) if !a.is_empty() => a.clone(),
                Some(Some(Ok(_))) => {
                    out.failed
                        .push((spec.text.clone(), "no addresses".to_string()));
                    kept
                }
                Some(Some(Err(e))) => {
                    out.failed.push((spec.text.clone(), e.to_string()));
                    kept
                }
                Some(None) | None => kept,
            };
            let name: Arc<str> = Arc::from(spec.text.as_str());
            for addr in addrs {
                if members.len() >= MAX_MEMBERS || !seen.insert(addr) {
                    continue;
                }
                match current
                    .members
                    .iter()
                    .find(|m| m.spec == i && m.addr == addr)
                {
                    Some(m) => members.push(m.clone()),
                    None => {
                        out.added.push(addr);
                        members.push(Arc::new(Member::new(
                            addr,
                            name.clone(),
                            i,
                            spec.weight.get(),
                            spec.backup,
                        )));
                    }
                }
            }
        }
        out.removed = current
            .members
            .iter()
            .filter(|m| !seen.contains(&m.addr))
            .map(|m| m.addr)
            .collect();
        if out.changed() {
            let version = self.versions.fetch_add(1, Ordering::Relaxed) + 1;
            self.set.store(Arc::new(MemberSet { version, members }));
        }
        out
    }

    /// Takes over what the operator set on `older`'s members (the same rule's pool in the
    /// config this one replaces) for every member still here, matched by address.
    pub fn inherit_admin(&self, older: &Pool) {
        let (mine, theirs) = (self.members(), older.members());
        for m in &mine.members {
            if let Some(o) = theirs.members.iter().find(|o| o.addr == m.addr) {
                m.inherit_admin(o);
            }
        }
    }

    /// Every member's state now.
    pub fn snapshot(&self, now: Instant) -> Vec<MemberSnapshot> {
        let now_ms = self.clock.ms(now);
        self.members()
            .members
            .iter()
            .map(|m| m.snapshot(now_ms))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MemberSpec, Upstream};

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn pool_of(specs: Vec<MemberSpec>) -> Pool {
        Pool::new("web", &Upstream::with_members(specs), Instant::now())
    }

    #[test]
    fn every_address_of_a_name_is_a_member_and_duplicates_count_once() {
        let p = pool_of(vec![
            MemberSpec::new(
                "db.svc:5432",
                vec![addr("10.0.0.1:5432"), addr("10.0.0.2:5432")],
            ),
            MemberSpec::new("10.0.0.2:5432", vec![addr("10.0.0.2:5432")]),
        ]);
        let set = p.members();
        assert_eq!(set.len(), 2);
        assert_eq!(&*set.members[0].name, "db.svc:5432");
        assert_eq!(p.max_attempts(&set), 2, "retries never exceed the members");
    }

    #[test]
    fn dns_refresh_follows_members_that_appear_and_disappear() {
        // A resolver the test controls: each round is what the name resolves to now.
        let p = pool_of(vec![
            MemberSpec::new("svc:80", vec![addr("10.0.0.1:80")]),
            MemberSpec::new("10.9.9.9:80", vec![addr("10.9.9.9:80")]),
        ]);
        let old = p.members();
        old.members[0].connected();
        // 1. Scale out: a second address appears; the first keeps its counters.
        let r = p.refresh(&[
            Some(Ok(vec![addr("10.0.0.1:80"), addr("10.0.0.2:80")])),
            None,
        ]);
        assert_eq!(r.added, vec![addr("10.0.0.2:80")]);
        assert!(r.removed.is_empty());
        let set = p.members();
        assert_eq!(set.len(), 3);
        assert!(set.version > old.version);
        assert!(Arc::ptr_eq(&set.members[0], &old.members[0]));
        assert_eq!(set.members[0].active(), 1);
        // 2. Nothing changed: no new version.
        let v = p.members().version;
        let r = p.refresh(&[
            Some(Ok(vec![addr("10.0.0.2:80"), addr("10.0.0.1:80")])),
            None,
        ]);
        assert!(!r.changed());
        assert_eq!(p.members().version, v);
        // 3. Scale in: the first address goes away.
        let r = p.refresh(&[Some(Ok(vec![addr("10.0.0.2:80")])), None]);
        assert_eq!(r.removed, vec![addr("10.0.0.1:80")]);
        let addrs: Vec<SocketAddr> = p.members().members.iter().map(|m| m.addr).collect();
        assert_eq!(addrs, vec![addr("10.0.0.2:80"), addr("10.9.9.9:80")]);
        // 4. A failed lookup keeps the last good set and says so.
        let r = p.refresh(&[Some(Err(io::Error::other("server failure"))), None]);
        assert!(!r.changed());
        assert_eq!(r.failed.len(), 1);
        assert_eq!(r.failed[0].0, "svc:80");
        assert_eq!(p.members().len(), 2);
        let r = p.refresh(&[Some(Ok(vec![])), None]);
        assert!(!r.changed());
        assert_eq!(r.failed[0].1, "no addresses");
    }

    #[test]
    fn a_new_pool_inherits_the_operators_word_on_members_still_in_it() {
        use crate::upstream::member::AdminState;
        let old = pool_of(vec![
            MemberSpec::new("10.0.0.1:80", vec![addr("10.0.0.1:80")]),
            MemberSpec::new("10.0.0.2:80", vec![addr("10.0.0.2:80")]),
        ]);
        old.members().members[0].set_admin(AdminState::Drain);
        old.members().members[1].set_admin(AdminState::Down);
        old.members().members[1].set_weight(5);
        // The member that stays is now listed second; a new one comes first.
        let new = pool_of(vec![
            MemberSpec::new("10.0.0.3:80", vec![addr("10.0.0.3:80")]),
            MemberSpec::new("10.0.0.2:80", vec![addr("10.0.0.2:80")]),
        ]);
        new.inherit_admin(&old);
        let set = new.members();
        assert_eq!(set.members[0].admin(), AdminState::Up);
        assert_eq!(set.members[1].admin(), AdminState::Down);
        assert_eq!(set.members[1].weight(), 5);
    }

    #[test]
    fn the_clock_never_says_never() {
        let t = Instant::now();
        let c = Clock::new(t);
        assert_eq!(c.ms(t), 1);
        assert_eq!(c.ms(t - std::time::Duration::from_secs(1)), 1);
        assert_eq!(c.ms(t + std::time::Duration::from_millis(5)), 6);
    }
}
