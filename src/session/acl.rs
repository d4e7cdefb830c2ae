//! Client address ACLs: CIDR allow and deny lists, compiled once into a structure that
//! answers "is this client admitted?" in a binary search, whatever the number of entries.
//!
//! Why compiled: an edge forwarder may carry lists of 100 000 prefixes (blocklists, cloud
//! ranges) and consults them on every accept, on every worker. [`Acl::new`] folds both lists
//! into one sorted list of disjoint admitted ranges per family, so [`Acl::admits`] is a
//! single binary search (about 17 steps for 100 000 ranges), allocation- and lock-free, and
//! the `Acl` is immutable: share it in an `Arc`, swap it whole on reload.
//!
//! Rules: a denied address is refused whatever the allow list says (deny wins); if the allow
//! list has any entry, an address no entry covers is refused; with an empty allow list every
//! address not denied is admitted. A client reported as an IPv4-mapped IPv6 address
//! (`::ffff:10.1.2.3`, from a dual-stack listener) is matched as the IPv4 address it is.

#![warn(missing_docs)]

use std::net::IpAddr;

use crate::vocab::Cidr;

/// Sorted, disjoint, non-adjacent inclusive ranges `[starts[i], ends[i]]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Ranges<T> {
    starts: Vec<T>,
    ends: Vec<T>,
}

impl<T: Copy + Ord> Ranges<T> {
    fn contains(&self, x: T) -> bool {
        // The last range starting at or before x is the only one that can hold it.
        let i = self.starts.partition_point(|&s| s <= x);
        i > 0 && x <= self.ends[i - 1]
    }
}

/// Sorts and coalesces overlapping or adjacent ranges.
fn union(mut r: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
    r.sort_unstable();
    let mut out: Vec<(u128, u128)> = Vec::with_capacity(r.len());
    for (s, e) in r {
        match out.last_mut() {
            Some(last) if s <= last.1.saturating_add(1) => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// `base` minus `cut`, both as produced by [`union`]: one merge-like pass.
fn subtract(base: &[(u128, u128)], cut: &[(u128, u128)]) -> Vec<(u128, u128)> {
    let mut out = Vec::with_capacity(base.len());
    let mut j = 0;
    for &(mut s, e) in base {
        while j < cut.len() && cut[j].1 < s {
            j += 1;
        }
        let mut k = j;
        let mut alive = true;
        while k < cut.len() && cut[k].0 <= e {
            let (cs, ce) = cut[k];
            if cs > s {
                out.push((s, cs - 1));
            }
            if ce >= e {
                alive = false;
                break;
            }
            s = ce + 1;
            k += 1;
        }
        if alive {
            out.push((s, e));
        }
    }
    out
}

fn compile(allow: Option<&[(u128, u128)]>, deny: &[(u128, u128)], max: u128) -> Vec<(u128, u128)> {
    let full = [(0, max)];
    subtract(allow.unwrap_or(&full), deny)
}

/// A compiled allow/deny list (see the module docs for the rules). Immutable and `Sync`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acl {
    /// Admitted IPv4 ranges.
    v4: Ranges<u32>,
    /// Admitted IPv6 ranges (IPv4-mapped clients never look here).
    v6: Ranges<u128>,
}

impl Acl {
    /// Compiles the lists: O(n log n) in the number of entries, memory O(n).
    pub fn new(allow: &[Cidr], deny: &[Cidr]) -> Self {
        let split = |list: &[Cidr]| {
            let (mut v4, mut v6) = (Vec::new(), Vec::new());
            for c in list {
                let family = if c.addr().is_ipv4() { &mut v4 } else { &mut v6 };
                family.push(c.range());
            }
            (union(v4), union(v6))
        };
        let (allow4, allow6) = split(allow);
        let (deny4, deny6) = split(deny);
        let any_allow = !allow.is_empty();
        let v4 = compile(any_allow.then_some(&allow4), &deny4, u128::from(u32::MAX));
        let v6 = compile(any_allow.then_some(&allow6), &deny6, u128::MAX);
        Self {
            v4: Ranges {
                // IPv4 ranges were built from u32 values: they fit.
                starts: v4.iter().map(|r| r.0 as u32).collect(),
                ends: v4.iter().map(|r| r.1 as u32).collect(),
            },
            v6: Ranges {
                starts: v6.iter().map(|r| r.0).collect(),
                ends: v6.iter().map(|r| r.1).collect(),
            },
        }
    }

    /// An ACL that admits everyone (no entry at all).
    pub fn allow_all() -> Self {
        Self::new(&[], &[])
    }

    /// Whether a client at `ip` is admitted. A binary search; no allocation, no lock.
    pub fn admits(&self, ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(a) => self.v4.contains(u32::from(a)),
            IpAddr::V6(a) => self.v6.contains(u128::from(a)),
        }
    }

    /// How many disjoint admitted ranges the lists compiled to (IPv4, IPv6): the size of the
    /// search, for diagnostics.
    pub fn ranges(&self) -> (usize, usize) {
        (self.v4.starts.len(), self.v6.starts.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab::CidrError;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn c(s: &str) -> Cidr {
        Cidr::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn acl(allow: &[&str], deny: &[&str]) -> Acl {
        let p = |l: &[&str]| l.iter().map(|s| c(s)).collect::<Vec<_>>();
        Acl::new(&p(allow), &p(deny))
    }

    #[test]
    fn parse_and_display() {
        assert_eq!(c("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(c(" 192.0.2.7 ").to_string(), "192.0.2.7/32");
        assert_eq!(c("2001:db8::/32").to_string(), "2001:db8::/32");
        assert_eq!(c("::1").to_string(), "::1/128");
        assert_eq!(c("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert_eq!(c("::/0").to_string(), "::/0");
        assert_eq!(
            c("::ffff:10.0.0.0/104").to_string(),
            "10.0.0.0/8",
            "mapped is IPv4"
        );
        assert_eq!(c("::ffff:0:0/96").to_string(), "0.0.0.0/0");
        assert_eq!("10.1.0.0/16".parse::<Cidr>().unwrap().prefix(), 16);
    }

    #[test]
    fn parse_errors_speak_to_the_operator() {
        let e = |s: &str| Cidr::parse(s).unwrap_err().to_string();
        assert_eq!(
            e("10.0.0.1/8"),
            "\"10.0.0.1/8\": host bits are set past the /8 prefix, so it names no network; did you mean 10.0.0.0/8?"
        );
        assert!(e("2001:db8::1/32").contains("did you mean 2001:db8::/32?"));
        assert_eq!(
            e("10.0.0.0/33"),
            "\"10.0.0.0/33\": prefix /33 is longer than the 32 bits of an IPv4 address"
        );
        assert!(e("::/129").contains("longer than the 128 bits of an IPv6 address"));
        assert!(e("10.0.0.0/99999999999").contains("prefix /4294967295 is longer"));
        assert!(e("10.0.0/8").contains("not an IP address"));
        assert!(e("example.com/8").contains("not an IP address"));
        assert!(e("").contains("not an IP address"));
        assert!(e("10.0.0.0/").contains("must be a number"));
        assert!(e("10.0.0.0/-1").contains("must be a number"));
        assert!(e("10.0.0.0/8/8").contains("must be a number"));
        assert!(matches!(
            Cidr::new(ip("10.0.0.0"), 40),
            Err(CidrError::PrefixTooLong { max: 32, .. })
        ));
        assert_eq!(Cidr::truncating(ip("10.1.2.3"), 8), c("10.0.0.0/8"));
        assert_eq!(Cidr::truncating(ip("10.1.2.3"), 99), c("10.1.2.3/32"));
    }

    #[test]
    fn contains() {
        assert!(c("10.0.0.0/8").contains(ip("10.255.0.1")));
        assert!(c("10.0.0.0/8").contains(ip("::ffff:10.0.0.1")));
        assert!(!c("10.0.0.0/8").contains(ip("11.0.0.0")));
        assert!(c("0.0.0.0/0").contains(ip("255.255.255.255")));
        assert!(!c("0.0.0.0/0").contains(ip("::1")));
        assert!(c("::/0").contains(ip("2001:db8::1")));
        assert!(
            !c("::/0").contains(ip("::ffff:1.2.3.4")),
            "mapped clients are IPv4"
        );
    }

    #[test]
    fn rules() {
        let open = Acl::allow_all();
        assert!(open.admits(ip("1.2.3.4")) && open.admits(ip("2001:db8::1")));

        let deny_only = acl(&[], &["10.0.0.0/8", "2001:db8::/32"]);
        assert!(!deny_only.admits(ip("10.1.2.3")));
        assert!(
            !deny_only.admits(ip("::ffff:10.1.2.3")),
            "mapped matched as IPv4"
        );
        assert!(deny_only.admits(ip("11.0.0.1")));
        assert!(!deny_only.admits(ip("2001:db8:1::5")));
        assert!(deny_only.admits(ip("2001:db9::1")));

        // Deny wins over allow; with an allow list, the rest is refused.
        let a = acl(
            &["10.0.0.0/8", "192.168.0.0/16"],
            &["10.1.0.0/16", "10.2.3.4"],
        );
        assert!(a.admits(ip("10.0.0.1")));
        assert!(a.admits(ip("::ffff:192.168.1.1")));
        assert!(!a.admits(ip("10.1.200.3")));
        assert!(!a.admits(ip("10.2.3.4")));
        assert!(a.admits(ip("10.2.3.5")) && a.admits(ip("10.2.3.3")));
        assert!(!a.admits(ip("8.8.8.8")));
        assert!(
            !a.admits(ip("2001:db8::1")),
            "IPv4-only allow list refuses IPv6"
        );
        assert_eq!(a.ranges(), (4, 0));

        // Boundaries of the address space.
        let edges = acl(
            &["0.0.0.0/0", "::/0"],
            &["0.0.0.0/32", "255.255.255.255/32", "::/128"],
        );
        assert!(!edges.admits(ip("0.0.0.0")) && !edges.admits(ip("255.255.255.255")));
        assert!(edges.admits(ip("0.0.0.1")) && edges.admits(ip("255.255.255.254")));
        assert!(!edges.admits(ip("::")) && edges.admits(ip("::2")));
        assert!(edges.admits(ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")));
        assert!(!acl(&[], &["0.0.0.0/0"]).admits(ip("1.1.1.1")));
        assert!(acl(&[], &["0.0.0.0/0"]).admits(ip("::2")));

        // Overlapping and adjacent entries coalesce.
        let merged = acl(
            &["10.0.0.0/9", "10.128.0.0/9", "10.0.0.0/16", "11.0.0.0/8"],
            &[],
        );
        assert_eq!(merged.ranges(), (1, 0));
        assert!(merged.admits(ip("11.255.255.255")) && !merged.admits(ip("12.0.0.0")));
    }

    /// The rules stated directly, one entry at a time.
    fn naive(allow: &[Cidr], deny: &[Cidr], ip: IpAddr) -> bool {
        !deny.iter().any(|c| c.contains(ip))
            && (allow.is_empty() || allow.iter().any(|c| c.contains(ip)))
    }

    /// Addresses concentrated in a few small neighbourhoods, so prefixes and probes meet.
    fn near_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            (0u32..4, any::<u16>()).prop_map(|(hi, lo)| IpAddr::V4(Ipv4Addr::from(
                (0x0a00_0000 | hi << 16) | u32::from(lo)
            ))),
            any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
            (0u128..4, any::<u16>()).prop_map(|(hi, lo)| IpAddr::V6(Ipv6Addr::from(
                0x2001_0db8_u128 << 96 | hi << 16 | u128::from(lo)
            ))),
            (0u32..4, any::<u16>()).prop_map(|(hi, lo)| IpAddr::V6(
                Ipv4Addr::from((0x0a00_0000 | hi << 16) | u32::from(lo)).to_ipv6_mapped()
            )),
        ]
    }

    fn any_cidr() -> impl Strategy<Value = Cidr> {
        (near_ip(), 0u8..=128).prop_map(|(ip, p)| {
            // Mostly long prefixes, near the probes; sometimes short ones.
            let p = if ip.to_canonical().is_ipv4() {
                8 + p % 25
            } else {
                96 + p % 33
            };
            Cidr::truncating(ip, p)
        })
    }

    proptest! {
        #[test]
        fn matches_a_naive_scan(
            allow in proptest::collection::vec(any_cidr(), 0..20),
            deny in proptest::collection::vec(any_cidr(), 0..20),
            probes in proptest::collection::vec(near_ip(), 1..50),
        ) {
            let acl = Acl::new(&allow, &deny);
            for ip in probes {
                prop_assert_eq!(acl.admits(ip), naive(&allow, &deny, ip), "{}", ip);
                // Each prefix's own first and last addresses too.
                for c in allow.iter().chain(&deny) {
                    let (s, e) = c.range();
                    for x in [s, e, s.wrapping_sub(1), e.wrapping_add(1)] {
                        let probe = if c.addr().is_ipv4() {
                            IpAddr::V4(Ipv4Addr::from(x as u32))
                        } else {
                            IpAddr::V6(Ipv6Addr::from(x))
                        };
                        prop_assert_eq!(acl.admits(probe), naive(&allow, &deny, probe));
                    }
                }
            }
        }

        #[test]
        fn parse_display_round_trip(ip in near_ip(), p in 0u8..=128) {
            let cidr = Cidr::truncating(ip, p);
            prop_assert_eq!(Cidr::parse(&cidr.to_string()), Ok(cidr));
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,40}") {
            let _ = Cidr::parse(&s);
        }
    }
}
