//! An address prefix as an operator writes it in an ACL or a list of trusted sources
//! (`10.0.0.0/8`, `2001:db8::/32`, one address), parsed and normalised.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An address prefix: `10.0.0.0/8`, `2001:db8::/32`, or one address (`192.0.2.7` = `/32`).
///
/// The address has no bit set past the prefix. IPv4-mapped IPv6 prefixes of length ≥ 96
/// (`::ffff:10.0.0.0/104`) are stored as the IPv4 prefix they denote (`10.0.0.0/8`), so they
/// match mapped and plain IPv4 clients alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Why a CIDR was refused, worded for the operator who wrote it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// The part before `/` is not an IPv4 or IPv6 address.
    #[error(
        "\"{input}\": not an IP address or prefix (expected e.g. 10.0.0.0/8, 192.0.2.7 or 2001:db8::/32)"
    )]
    BadAddress {
        /// What was written.
        input: String,
    },
    /// The part after `/` is not a decimal number.
    #[error("\"{input}\": the prefix length after '/' must be a number of bits, e.g. /24")]
    BadPrefix {
        /// What was written.
        input: String,
    },
    /// The prefix length exceeds the address size.
    #[error("\"{input}\": prefix /{prefix} is longer than the {max} bits of an {family} address")]
    PrefixTooLong {
        /// What was written.
        input: String,
        /// The prefix length given.
        prefix: u32,
        /// The family's address size in bits: 32 or 128.
        max: u8,
        /// "IPv4" or "IPv6".
        family: &'static str,
    },
    /// Bits are set past the prefix: a typo, or a host address where a network was meant.
    #[error(
        "\"{input}\": host bits are set past the /{prefix} prefix, so it names no network; did you mean {network}?"
    )]
    HostBitsSet {
        /// What was written.
        input: String,
        /// The prefix length given.
        prefix: u8,
        /// The network with the host bits cleared: probably what was meant.
        network: Cidr,
    },
}

impl Cidr {
    /// A prefix of `prefix` bits of `addr`.
    ///
    /// # Errors
    /// [`CidrError::PrefixTooLong`] past 32 (IPv4) or 128 (IPv6) bits,
    /// [`CidrError::HostBitsSet`] if `addr` has bits set past the prefix.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, CidrError> {
        let input = || format!("{addr}/{prefix}");
        let max = bits(addr);
        if prefix > max {
            return Err(CidrError::PrefixTooLong {
                input: input(),
                prefix: u32::from(prefix),
                max,
                family: family(addr),
            });
        }
        if mask(addr, prefix) != addr {
            return Err(CidrError::HostBitsSet {
                input: input(),
                prefix,
                network: Self::truncating(addr, prefix),
            });
        }
        Ok(Self::truncating(addr, prefix))
    }

    /// The prefix of `prefix` bits (clamped to the address size) containing `addr`, host bits
    /// cleared: never fails.
    pub fn truncating(addr: IpAddr, prefix: u8) -> Self {
        let prefix = prefix.min(bits(addr));
        let addr = mask(addr, prefix);
        match addr {
            IpAddr::V6(v6) if prefix >= 96 => match v6.to_ipv4_mapped() {
                Some(v4) => Self {
                    addr: IpAddr::V4(v4),
                    prefix: prefix - 96,
                },
                None => Self { addr, prefix },
            },
            _ => Self { addr, prefix },
        }
    }

    /// Parses `a.b.c.d/n`, `x:y::z/n` or a bare address (a single host).
    ///
    /// # Errors
    /// A [`CidrError`] quoting `s` and saying what is wrong: not an address, a prefix length
    /// that is not a number or too long for the family, host bits set past the prefix (with
    /// the network that was probably meant).
    pub fn parse(s: &str) -> Result<Self, CidrError> {
        let t = s.trim();
        let (addr, prefix) = match t.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (t, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| CidrError::BadAddress {
            input: s.to_owned(),
        })?;
        let prefix = match prefix {
            None => bits(addr),
            Some(p) => {
                if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(CidrError::BadPrefix {
                        input: s.to_owned(),
                    });
                }
                let n: u32 = p.parse().unwrap_or(u32::MAX);
                if n > u32::from(bits(addr)) {
                    return Err(CidrError::PrefixTooLong {
                        input: s.to_owned(),
                        prefix: n,
                        max: bits(addr),
                        family: family(addr),
                    });
                }
                n as u8
            }
        };
        Self::new(addr, prefix).map_err(|e| match e {
            CidrError::HostBitsSet {
                prefix, network, ..
            } => CidrError::HostBitsSet {
                input: s.to_owned(),
                prefix,
                network,
            },
            other => other,
        })
    }

    /// The network address (IPv4 for a mapped prefix).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits, of [`Cidr::addr`]'s family.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is inside this prefix (an IPv4-mapped `ip` counts as IPv4). A linear
    /// check of one entry; [`Acl`] is what scales.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        bits(ip) == bits(self.addr) && mask(ip, self.prefix) == self.addr
    }

    /// The first and last address covered, as integers of the family (IPv4 in the low 32
    /// bits).
    pub(crate) fn range(&self) -> (u128, u128) {
        let (start, width) = match self.addr {
            IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
            IpAddr::V6(a) => (u128::from(a), 128),
        };
        let host_bits = width - u32::from(self.prefix);
        let span = if host_bits == 128 {
            u128::MAX
        } else {
            (1u128 << host_bits) - 1
        };
        (start, start + span)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, CidrError> {
        Self::parse(s)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn bits(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// `ip` with every bit past `prefix` cleared (`prefix` at most the family's size).
fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}
