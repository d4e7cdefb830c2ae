//! Choosing a member: the four balancing algorithms, the health tiers and "never the same
//! member twice in one session".
//!
//! A [`Picker`] holds the per-worker state an algorithm needs (smooth round-robin's current
//! weights, a random generator, a scratch list) and is owned by one worker, so picking takes
//! no lock and, once warm, allocates nothing. Which members may be picked goes in tiers:
//! 1. untried non-backup members that are up;
//! 2. else untried backup members that are up;
//! 3. else every untried member, up or not — health may be stale, and trying beats refusing.
//!
//! A member the operator set to `drain` is in no tier: it takes no new connection, even when
//! every other member is down. One set to `down` is treated as unhealthy (tier 3 only).
//!
//! - `round_robin`: smooth weighted round-robin (nginx's): each candidate's current weight
//!   grows by its weight, the largest is picked and lowered by the total. Exact per worker;
//!   across workers the split is the sum of exact per-worker splits.
//! - `least_conn`: the fewest active connections per unit of weight, counted across every
//!   worker (shared atomics, so exact up to connections opening at the same instant); ties
//!   go round the members.
//! - `source_hash`: weighted rendezvous (highest random weight) hashing of the client IP and
//!   each member's address with a fixed hash: removing a member moves only its clients, and
//!   every host with the same members gives the same answer whatever their order.
//! - `random_two`: two distinct random candidates, the less loaded one wins.

use std::net::{IpAddr, SocketAddr};

use super::member::AdminState;
use super::pool::MemberSet;
use crate::config::Balance;

/// The most connect attempts a session can make (`connect_retries` is at most 16).
pub const MAX_ATTEMPTS: usize = 17;

/// Members already tried in this session (by index in its [`MemberSet`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tried {
    items: [u16; MAX_ATTEMPTS],
    len: u8,
}

impl Tried {
    pub fn contains(&self, i: usize) -> bool {
        self.items[..usize::from(self.len)]
            .iter()
            .any(|&t| usize::from(t) == i)
    }

    /// Records member `i`; false when the set is full (or `i` does not fit: pools hold at
    /// most [`MAX_MEMBERS`](super::member::MAX_MEMBERS) members).
    pub fn insert(&mut self, i: usize) -> bool {
        let Ok(i) = u16::try_from(i) else {
            return false;
        };
        if usize::from(self.len) == MAX_ATTEMPTS {
            return false;
        }
        self.items[usize::from(self.len)] = i;
        self.len += 1;
        true
    }

    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// The member recorded last (a session's current attempt).
    pub fn last(&self) -> Option<usize> {
        let n = usize::from(self.len.checked_sub(1)?);
        Some(usize::from(self.items[n]))
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Per-worker balancing state.
#[derive(Debug)]
pub struct Picker {
    /// The member set `current` was built for.
    version: u64,
    current: Vec<i64>,
    scratch: Vec<u32>,
    cursor: usize,
    rng: u64,
}

impl Picker {
    /// A picker whose random choices start from `seed` (give each worker its own).
    pub fn new(seed: u64) -> Self {
        Self {
            version: u64::MAX,
            current: Vec::new(),
            scratch: Vec::new(),
            cursor: 0,
            rng: seed | 1,
        }
    }

    /// Picks the next member to try, or `None` when every member was tried.
    pub fn pick(
        &mut self,
        set: &MemberSet,
        balance: Balance,
        client: Option<IpAddr>,
        tried: &Tried,
        now_ms: u64,
    ) -> Option<usize> {
        if self.version != set.version || self.current.len() != set.len() {
            self.version = set.version;
            self.current.clear();
            self.current.resize(set.len(), 0);
        }
        self.candidates(set, tried, now_ms);
        if self.scratch.is_empty() {
            return None;
        }
        let pick = match balance {
            Balance::RoundRobin => self.smooth_round_robin(set),
            Balance::LeastConn => self.least_conn(set),
            Balance::SourceHash => match client {
                Some(ip) => rendezvous(set, &self.scratch, ip),
                None => self.smooth_round_robin(set),
            },
            Balance::RandomTwo => self.random_two(set),
        };
        Some(pick)
    }

    /// Fills `scratch` with the first non-empty tier of candidates.
    fn candidates(&mut self, set: &MemberSet, tried: &Tried, now_ms: u64) {
        for tier in 0..3 {
            self.scratch.clear();
            for (i, m) in set.members.iter().enumerate() {
                let fits = match tier {
                    0 => !m.backup && m.is_up(now_ms),
                    1 => m.backup && m.is_up(now_ms),
                    _ => m.admin() != AdminState::Drain,
                };
                if fits && !tried.contains(i) {
                    self.scratch.push(i as u32);
                }
            }
            if !self.scratch.is_empty() {
                return;
            }
        }
    }

    fn smooth_round_robin(&mut self, set: &MemberSet) -> usize {
        let mut total = 0i64;
        let mut best = self.scratch[0] as usize;
        for &i in &self.scratch {
            let i = i as usize;
            let w = i64::from(set.members[i].weight());
            self.current[i] += w;
            total += w;
            if self.current[i] > self.current[best] {
                best = i;
            }
        }
        self.current[best] -= total;
        best
    }

    fn least_conn(&mut self, set: &MemberSet) -> usize {
        let n = self.scratch.len();
        let start = self.cursor % n;
        self.cursor = self.cursor.wrapping_add(1);
        let mut best = self.scratch[start] as usize;
        for k in 1..n {
            let i = self.scratch[(start + k) % n] as usize;
            if lighter(set, i, best) {
                best = i;
            }
        }
        best
    }

    fn random_two(&mut self, set: &MemberSet) -> usize {
        let n = self.scratch.len();
        if n == 1 {
            return self.scratch[0] as usize;
        }
        let a = (self.next_random() % n as u64) as usize;
        let mut b = (self.next_random() % (n as u64 - 1)) as usize;
        if b >= a {
            b += 1;
        }
        let (a, b) = (self.scratch[a] as usize, self.scratch[b] as usize);
        if lighter(set, b, a) { b } else { a }
    }

    /// xorshift64*: fast, and plenty for choosing between two members.
    fn next_random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Whether member `a` carries fewer active connections per unit of weight than `b`.
fn lighter(set: &MemberSet, a: usize, b: usize) -> bool {
    let (ma, mb) = (&set.members[a], &set.members[b]);
    u128::from(ma.active()) * u128::from(mb.weight())
        < u128::from(mb.active()) * u128::from(ma.weight())
}

/// Weighted rendezvous hashing: the candidate with the highest `weight / -ln(u)`, where `u`
/// in (0, 1) comes from hashing the client IP with the member's address.
fn rendezvous(set: &MemberSet, candidates: &[u32], ip: IpAddr) -> usize {
    let mut best = candidates[0] as usize;
    let mut best_score = f64::NEG_INFINITY;
    for &i in candidates {
        let m = &set.members[i as usize];
        let h = hash_pair(ip, m.addr);
        // 53 random bits → u in (0, 1], never 0, so ln(u) is finite.
        let u = ((h >> 11) + 1) as f64 / (1u64 << 53) as f64;
        let score = if u >= 1.0 {
            f64::INFINITY
        } else {
            f64::from(m.weight()) / -u.ln()
        };
        if score > best_score {
            best_score = score;
            best = i as usize;
        }
    }
    best
}

/// A fixed 64-bit hash of (client IP, member address): FNV-1a over the bytes, then the
/// MurmurHash3 finaliser. Fixed on purpose: every host and every version must agree.
pub fn hash_pair(ip: IpAddr, member: SocketAddr) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    match ip {
        IpAddr::V4(a) => feed(&a.octets()),
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => feed(&v4.octets()),
            None => feed(&a.octets()),
        },
    }
    feed(&[0xff]);
    match member.ip() {
        IpAddr::V4(a) => feed(&a.octets()),
        IpAddr::V6(a) => feed(&a.octets()),
    }
    feed(&member.port().to_be_bytes());
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::member::Member;
    use crate::vocab::ConnectError;
    use std::sync::Arc;
    use std::time::Duration;

    fn set_of(weights: &[(u32, bool)]) -> MemberSet {
        MemberSet {
            version: 0,
            members: weights
                .iter()
                .enumerate()
                .map(|(i, &(w, backup))| {
                    Arc::new(Member::new(
                        SocketAddr::from(([10, 0, 0, i as u8 + 1], 80)),
                        "m".into(),
                        i,
                        w,
                        backup,
                    ))
                })
                .collect(),
        }
    }

    fn counts(set: &MemberSet, balance: Balance, n: usize) -> Vec<usize> {
        let mut p = Picker::new(7);
        let mut c = vec![0; set.len()];
        for k in 0..n {
            let ip = IpAddr::from([192, 168, (k >> 8) as u8, k as u8]);
            c[p.pick(set, balance, Some(ip), &Tried::default(), 1)
                .unwrap()] += 1;
        }
        c
    }

    #[test]
    fn smooth_round_robin_follows_weights_and_interleaves() {
        let set = set_of(&[(5, false), (1, false), (1, false)]);
        let mut p = Picker::new(1);
        let seq: Vec<usize> = (0..7)
            .map(|_| {
                p.pick(&set, Balance::RoundRobin, None, &Tried::default(), 1)
                    .unwrap()
            })
            .collect();
        // nginx's documented sequence for weights 5,1,1: a a b a c a a.
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(
            counts(
                &set_of(&[(3, false), (1, false), (1, false)]),
                Balance::RoundRobin,
                500
            ),
            vec![300, 100, 100]
        );
    }

    #[test]
    fn tried_members_are_never_picked_again() {
        let set = set_of(&[(1, false), (1, false), (1, false)]);
        for balance in [
            Balance::RoundRobin,
            Balance::LeastConn,
            Balance::SourceHash,
            Balance::RandomTwo,
        ] {
            let mut p = Picker::new(3);
            let mut tried = Tried::default();
            let ip = Some(IpAddr::from([1, 2, 3, 4]));
            for _ in 0..3 {
                let i = p.pick(&set, balance, ip, &tried, 1).unwrap();
                assert!(!tried.contains(i), "{balance:?} picked {i} twice");
                tried.insert(i);
            }
            assert_eq!(p.pick(&set, balance, ip, &tried, 1), None, "{balance:?}");
        }
    }

    #[test]
    fn down_members_are_skipped_backups_wait_and_all_down_still_tries() {
        let set = set_of(&[(1, false), (1, false), (1, true)]);
        let down = |i: usize| {
            set.members[i].connect_failed(
                ConnectError::Refused,
                libc::ECONNREFUSED,
                1,
                1,
                Duration::from_secs(10),
            );
        };
        // 1. Both primaries up: the backup gets nothing.
        assert_eq!(counts(&set, Balance::RoundRobin, 100)[2], 0);
        // 2. One primary down: everything goes to the other.
        down(0);
        assert_eq!(counts(&set, Balance::RoundRobin, 100), vec![0, 100, 0]);
        // 3. Both primaries down: the backup takes over.
        down(1);
        assert_eq!(counts(&set, Balance::LeastConn, 100), vec![0, 0, 100]);
        // 4. Everything down: still try, primaries first.
        down(2);
        let mut p = Picker::new(1);
        let first = p
            .pick(&set, Balance::RoundRobin, None, &Tried::default(), 2)
            .unwrap();
        assert!(first < 3);
    }

    #[test]
    fn drained_members_get_nothing_down_ones_only_when_all_are_down() {
        let set = set_of(&[(1, false), (1, false), (1, false)]);
        for balance in [
            Balance::RoundRobin,
            Balance::LeastConn,
            Balance::SourceHash,
            Balance::RandomTwo,
        ] {
            // 1. Drain one, down another: everything goes to the third.
            set.members[0].set_admin(AdminState::Drain);
            set.members[1].set_admin(AdminState::Down);
            assert_eq!(counts(&set, balance, 60), vec![0, 0, 60], "{balance:?}");
            // 2. The third fails too: the down member is tried (as an unhealthy one would
            //    be), the drained one never.
            set.members[2].set_admin(AdminState::Down);
            let c = counts(&set, balance, 60);
            assert_eq!(c[0], 0, "{balance:?}: {c:?}");
            // 3. Everything drained: nothing to pick.
            for m in &set.members {
                m.set_admin(AdminState::Drain);
            }
            let mut p = Picker::new(1);
            assert_eq!(p.pick(&set, balance, None, &Tried::default(), 1), None);
            for m in &set.members {
                m.set_admin(AdminState::Up);
            }
        }
    }

    #[test]
    fn a_run_time_weight_takes_effect_at_the_next_pick() {
        let set = set_of(&[(1, false), (1, false)]);
        assert_eq!(counts(&set, Balance::RoundRobin, 100), vec![50, 50]);
        set.members[0].set_weight(3);
        assert_eq!(counts(&set, Balance::RoundRobin, 100), vec![75, 25]);
    }

    #[test]
    fn least_conn_prefers_the_least_loaded_per_weight() {
        let set = set_of(&[(1, false), (2, false), (1, false)]);
        set.members[0].connected();
        set.members[0].connected();
        set.members[1].connected();
        set.members[1].connected();
        set.members[2].connected();
        // loads per weight: 2, 1, 1 → member 1 or 2, never 0.
        let mut p = Picker::new(1);
        for _ in 0..10 {
            let i = p
                .pick(&set, Balance::LeastConn, None, &Tried::default(), 1)
                .unwrap();
            assert_ne!(i, 0);
        }
        // Filling the pool keeps it level.
        let mut p = Picker::new(1);
        for _ in 0..7 {
            let i = p
                .pick(&set, Balance::LeastConn, None, &Tried::default(), 1)
                .unwrap();
            set.members[i].connected();
        }
        let loads: Vec<u64> = set.members.iter().map(|m| m.active()).collect();
        // Per unit of weight: 3, 3, 3.
        assert_eq!(loads, vec![3, 6, 3]);
    }

    #[test]
    fn source_hash_is_stable_and_moves_only_the_removed_members_clients() {
        let four = set_of(&[(1, false), (1, false), (1, false), (1, false)]);
        // The same members minus the third, in the same order.
        let three = MemberSet {
            version: 1,
            members: vec![
                four.members[0].clone(),
                four.members[1].clone(),
                four.members[3].clone(),
            ],
        };
        let mut p4 = Picker::new(1);
        let mut p3 = Picker::new(99);
        let mut moved = 0;
        for k in 0..1000u32 {
            let ip = IpAddr::from(k.to_be_bytes());
            let a = p4
                .pick(&four, Balance::SourceHash, Some(ip), &Tried::default(), 1)
                .unwrap();
            let again = p4
                .pick(&four, Balance::SourceHash, Some(ip), &Tried::default(), 1)
                .unwrap();
            assert_eq!(a, again, "stable");
            let b = p3
                .pick(&three, Balance::SourceHash, Some(ip), &Tried::default(), 1)
                .unwrap();
            let (addr_a, addr_b) = (four.members[a].addr, three.members[b].addr);
            if a == 2 {
                moved += 1;
            } else {
                assert_eq!(addr_a, addr_b, "client {ip} moved off a member that stayed");
            }
        }
        assert!(
            (180..=320).contains(&moved),
            "{moved} of 1000 on the removed member"
        );
    }

    #[test]
    fn source_hash_honours_weights_and_ignores_member_order() {
        let set = set_of(&[(3, false), (1, false)]);
        let c = counts(&set, Balance::SourceHash, 4000);
        assert!((2800..=3200).contains(&c[0]), "{c:?}");
        let ip = IpAddr::from([10, 1, 2, 3]);
        let swapped = MemberSet {
            version: 0,
            members: vec![set.members[1].clone(), set.members[0].clone()],
        };
        let mut p = Picker::new(1);
        let a = p.pick(&set, Balance::SourceHash, Some(ip), &Tried::default(), 1);
        let b = p.pick(
            &swapped,
            Balance::SourceHash,
            Some(ip),
            &Tried::default(),
            1,
        );
        assert_eq!(
            set.members[a.unwrap()].addr,
            swapped.members[b.unwrap()].addr
        );
    }

    #[test]
    fn random_two_spreads_and_avoids_the_loaded() {
        let set = set_of(&[(1, false), (1, false), (1, false)]);
        let c = counts(&set, Balance::RandomTwo, 3000);
        assert!(c.iter().all(|&n| n > 700), "{c:?}");
        for _ in 0..50 {
            set.members[0].connected();
        }
        let c = counts(&set, Balance::RandomTwo, 300);
        // Member 0 wins only when both draws are it, which cannot happen (distinct draws).
        assert_eq!(c[0], 0, "{c:?}");
    }

    #[test]
    fn a_new_member_set_resets_round_robin_state() {
        let mut p = Picker::new(1);
        let a = set_of(&[(1, false), (1, false)]);
        p.pick(&a, Balance::RoundRobin, None, &Tried::default(), 1);
        let b = MemberSet {
            version: 5,
            members: set_of(&[(1, false), (1, false), (1, false)]).members,
        };
        let c: Vec<usize> = (0..3)
            .map(|_| {
                p.pick(&b, Balance::RoundRobin, None, &Tried::default(), 1)
                    .unwrap()
            })
            .collect();
        assert_eq!(c, vec![0, 1, 2]);
    }
}
