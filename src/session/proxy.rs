//! The PROXY protocol, versions 1 and 2 (haproxy's "The PROXY protocol" specification):
//! the header a load balancer in front of us prepends to tell who the client really is, and
//! the header we prepend towards an upstream that wants to know.
//!
//! Why I/O-free: the three engines read and write sockets in three different ways (SQEs,
//! futures, blocking calls), but the bytes of a PROXY header and what they mean are the same
//! for all of them. So the encoder writes into a fixed-size array the io_uring engine can keep
//! in per-connection storage ([`encode_v1`] into `[u8; 108]`, [`encode_v2`] into `[u8; 52]`),
//! and the decoder ([`ProxyParser`]) is fed the bytes the engine has read so far and answers
//! "need more", "here is the header, and it ended at byte N", or "invalid, because ...". It
//! never allocates, never copies, keeps two integers of state and never looks past the input.
//!
//! Bounds: a v1 line is at most 107 bytes (the spec's limit, CRLF included); a v2 header is
//! 16 bytes plus a length the sender declares, which we refuse past a cap
//! ([`DEFAULT_V2_CAP`] = 4096 bytes unless [`ProxyParser::with_cap`] says otherwise; the spec
//! allows 65535). So an engine that buffers until [`Parse::Done`] never holds more than
//! [`ProxyParser::max_header_len`] bytes for it, whatever the client sends, and learns of a
//! bad header as early as the bytes show it (a wrong signature at the first byte, an
//! oversized v2 length at the 16th).

#![warn(missing_docs)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Longest valid v1 header, `"PROXY "` through CRLF (spec, section 2.1).
pub const V1_MAX_LEN: usize = 107;
/// Size of the buffer [`encode_v1`] writes into (the longest line plus one spare byte).
pub const V1_BUF_LEN: usize = 108;
/// The 12-byte signature every v2 header starts with.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The fixed part of a v2 header: signature, version/command, family/protocol, length.
pub const V2_FIXED_LEN: usize = 16;
/// Size of the buffer [`encode_v2`] writes into: the fixed part and an IPv6 address block.
pub const V2_BUF_LEN: usize = V2_FIXED_LEN + V2_INET6_LEN;
/// Default cap on the length a v2 header may declare after its fixed 16 bytes (addresses and
/// TLVs). Real senders use a few dozen bytes, a few hundred with TLVs (TLS, unique id).
pub const DEFAULT_V2_CAP: u16 = 4096;

/// Shortest valid v1 header: `PROXY UNKNOWN\r\n`.
const V1_MIN_LEN: usize = 15;
const V1_PREFIX: &[u8; 6] = b"PROXY ";
const V2_INET_LEN: usize = 12;
const V2_INET6_LEN: usize = 36;

/// Which version of the protocol a header used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Version {
    /// The human-readable line (`PROXY TCP4 ...\r\n`).
    V1,
    /// The binary header (`\r\n\r\n\0\r\nQUIT\n` ...).
    V2,
}

/// What the sender says the connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    /// The sender opened the connection on its own behalf (a health check, say): use the
    /// connection's own addresses. Only v2 has it.
    Local,
    /// The connection was relayed for a client (v1 always says so, even for `UNKNOWN`).
    Proxy,
}

/// A decoded header: who the client and the address it reached really are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProxyHeader {
    /// The protocol version the header used.
    pub version: Version,
    /// LOCAL or PROXY.
    pub command: Command,
    /// The original client. `None` for LOCAL, v1 `UNKNOWN` and v2 `AF_UNSPEC`: relay with the
    /// connection's own addresses.
    pub source: Option<SocketAddr>,
    /// The address the client connected to; `None` exactly when `source` is.
    pub destination: Option<SocketAddr>,
}

/// What [`ProxyParser::feed`] makes of the bytes so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parse {
    /// Not enough bytes yet to decide; at least `at_least` (≥ 1) more are needed.
    NeedMore {
        /// A lower bound on the bytes still missing.
        at_least: usize,
    },
    /// A complete, valid header. It ends at byte `consumed` of the input; the bytes after it
    /// are the client's own and must be relayed.
    Done {
        /// What the header says.
        header: ProxyHeader,
        /// The header's length: where the client's own bytes start.
        consumed: usize,
    },
    /// The bytes are not a valid header; the connection should be closed.
    Invalid(ProxyError),
}

/// Why a header is invalid; each is a case the specification names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum ProxyError {
    /// The input starts with neither `PROXY ` (v1) nor the 12-byte v2 signature.
    #[error("not a PROXY protocol header (neither the v1 nor the v2 signature)")]
    BadSignature,
    /// No CRLF within the first 107 bytes of a v1 header.
    #[error("PROXY v1 line longer than 107 bytes")]
    V1LineTooLong,
    /// A v1 line with a bare LF, or a CR not followed by LF.
    #[error("PROXY v1 line not terminated by CRLF")]
    V1MissingCrlf,
    /// The v1 protocol token is not `TCP4`, `TCP6` or `UNKNOWN`.
    #[error("PROXY v1 protocol is not TCP4, TCP6 or UNKNOWN")]
    V1BadProtocol,
    /// A `TCP4`/`TCP6` line without exactly four fields after the protocol, each separated by
    /// one space.
    #[error(
        "PROXY v1 line does not have exactly: source, destination, source port, destination port"
    )]
    V1FieldCount,
    /// An address that does not parse, or not of the family the protocol token names.
    #[error("PROXY v1 address is not a valid address of the announced family")]
    V1BadAddress,
    /// A port that is not a decimal number.
    #[error("PROXY v1 port is not a decimal number")]
    V1BadPort,
    /// A port above 65535.
    #[error("PROXY v1 port out of range 0..65535")]
    V1PortOutOfRange,
    /// The high nibble of the 13th byte is not 2.
    #[error("PROXY v2 version is not 2")]
    V2BadVersion,
    /// The command (low nibble of the 13th byte) is neither LOCAL nor PROXY.
    #[error("PROXY v2 command is neither LOCAL nor PROXY")]
    V2BadCommand,
    /// An address family other than AF_UNSPEC, AF_INET, AF_INET6 (AF_UNIX included: we relay
    /// TCP).
    #[error("PROXY v2 address family unsupported (only UNSPEC, INET, INET6)")]
    V2UnsupportedFamily,
    /// A transport other than STREAM for INET/INET6, or anything but UNSPEC with AF_UNSPEC.
    #[error("PROXY v2 transport protocol unsupported (only STREAM)")]
    V2UnsupportedProtocol,
    /// The declared length cannot hold the addresses of the announced family.
    #[error("PROXY v2 address block too short for its address family")]
    V2AddressTooShort,
    /// The declared length exceeds the cap this parser was built with.
    #[error("PROXY v2 header longer than the configured cap")]
    V2TooLong,
    /// A TLV that runs past the end of the header, or a partial TLV header at its end.
    #[error("PROXY v2 TLV runs past the end of the header")]
    V2BadTlv,
}

/// Writes a v1 header for a connection from `src` to `dst` and returns its length.
///
/// IPv4-mapped IPv6 addresses are written as IPv4 (what a dual-stack listener reports for an
/// IPv4 client). Two IPv4 addresses give `TCP4`, two IPv6 `TCP6`; a mix of families cannot be
/// expressed in v1 and gives `PROXY UNKNOWN\r\n`, which tells the upstream to use the
/// connection's own addresses.
pub fn encode_v1(src: SocketAddr, dst: SocketAddr, out: &mut [u8; V1_BUF_LEN]) -> usize {
    use std::io::Write;
    let (src, dst) = (canonical(src), canonical(dst));
    let proto = match (src.ip(), dst.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) => Some("TCP4"),
        (IpAddr::V6(_), IpAddr::V6(_)) => Some("TCP6"),
        _ => None,
    };
    let mut w: &mut [u8] = &mut out[..];
    // Cannot fail: the longest line (two full IPv6 addresses, two 5-digit ports) is 104 bytes.
    let written = match proto {
        Some(p) => write!(
            w,
            "PROXY {p} {} {} {} {}\r\n",
            src.ip(),
            dst.ip(),
            src.port(),
            dst.port()
        ),
        None => w.write_all(b"PROXY UNKNOWN\r\n"),
    };
    debug_assert!(written.is_ok());
    V1_BUF_LEN - w.len()
}

/// Writes a v2 header (command PROXY, transport STREAM, no TLV) for a connection from `src`
/// to `dst` and returns its length: 28 bytes for IPv4, 52 for IPv6.
///
/// IPv4-mapped IPv6 addresses count as IPv4; if the two families still differ, the IPv4 one
/// is mapped into IPv6 (`::ffff:a.b.c.d`) and the header is AF_INET6.
pub fn encode_v2(src: SocketAddr, dst: SocketAddr, out: &mut [u8; V2_BUF_LEN]) -> usize {
    let (src, dst) = (canonical(src), canonical(dst));
    out[..12].copy_from_slice(&V2_SIGNATURE);
    out[12] = 0x21; // version 2, command PROXY
    let ports = |out: &mut [u8]| {
        out[..2].copy_from_slice(&src.port().to_be_bytes());
        out[2..4].copy_from_slice(&dst.port().to_be_bytes());
    };
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out[13] = 0x11; // AF_INET, STREAM
            out[14..16].copy_from_slice(&(V2_INET_LEN as u16).to_be_bytes());
            out[16..20].copy_from_slice(&s.octets());
            out[20..24].copy_from_slice(&d.octets());
            ports(&mut out[24..28]);
            V2_FIXED_LEN + V2_INET_LEN
        }
        (s, d) => {
            out[13] = 0x21; // AF_INET6, STREAM
            out[14..16].copy_from_slice(&(V2_INET6_LEN as u16).to_be_bytes());
            out[16..32].copy_from_slice(&as_v6(s).octets());
            out[32..48].copy_from_slice(&as_v6(d).octets());
            ports(&mut out[48..52]);
            V2_BUF_LEN
        }
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

fn as_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// An incremental PROXY header decoder, v1 or v2 told apart by the signature.
///
/// Feed it everything read from the connection so far, from its first byte, each time more
/// arrives (the engine keeps the bytes: they may hold the start of the client's stream). It
/// keeps no copy, only how far it has scanned a v1 line, so a client that sends its header one
/// byte at a time costs O(header length) in all, not O(length²).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyParser {
    cap: u16,
    /// Bytes of a v1 line already scanned for CRLF (no LF, no stray CR before it).
    scanned: usize,
}

impl Default for ProxyParser {
    fn default() -> Self {
        Self::new()
    }
}

impl ProxyParser {
    /// A parser with the default cap ([`DEFAULT_V2_CAP`]) on a v2 header's declared length.
    pub const fn new() -> Self {
        Self::with_cap(DEFAULT_V2_CAP)
    }

    /// A parser refusing v2 headers that declare more than `cap` bytes after the fixed 16
    /// (raised to 36, the size of an IPv6 address block, if lower).
    pub const fn with_cap(cap: u16) -> Self {
        let cap = if cap < V2_INET6_LEN as u16 {
            V2_INET6_LEN as u16
        } else {
            cap
        };
        Self { cap, scanned: 0 }
    }

    /// The most bytes a valid header can take with this parser: what an engine must be able
    /// to buffer before [`Parse::Done`].
    pub const fn max_header_len(&self) -> usize {
        let v2 = V2_FIXED_LEN + self.cap as usize;
        if v2 > V1_MAX_LEN { v2 } else { V1_MAX_LEN }
    }

    /// Decodes the header at the start of `buf`, everything read from the connection so far.
    ///
    /// Each call must pass the previous call's bytes, possibly followed by more. Calling again
    /// after [`Parse::Done`] or [`Parse::Invalid`] gives the same answer.
    pub fn feed(&mut self, buf: &[u8]) -> Parse {
        match buf.first() {
            None => Parse::NeedMore {
                at_least: V1_MIN_LEN,
            },
            Some(b'P') => self.feed_v1(buf),
            Some(b'\r') => self.feed_v2(buf),
            Some(_) => Parse::Invalid(ProxyError::BadSignature),
        }
    }

    fn feed_v1(&mut self, buf: &[u8]) -> Parse {
        let n = buf.len().min(V1_PREFIX.len());
        if buf[..n] != V1_PREFIX[..n] {
            return Parse::Invalid(ProxyError::BadSignature);
        }
        // A caller that broke the contract with a shorter buffer gets a rescan, not a panic.
        let start = if self.scanned <= buf.len() {
            self.scanned.max(V1_PREFIX.len())
        } else {
            V1_PREFIX.len()
        };
        let end = buf.len().min(V1_MAX_LEN);
        for i in start..end {
            // i >= 6, so buf[i - 1] exists (and is never the prefix's CR: it has none).
            let (prev, b) = (buf[i - 1], buf[i]);
            if b == b'\n' {
                if prev != b'\r' {
                    return Parse::Invalid(ProxyError::V1MissingCrlf);
                }
                self.scanned = i;
                return match parse_v1_line(&buf[V1_PREFIX.len()..i - 1]) {
                    Ok(header) => Parse::Done {
                        header,
                        consumed: i + 1,
                    },
                    Err(e) => Parse::Invalid(e),
                };
            }
            if prev == b'\r' {
                return Parse::Invalid(ProxyError::V1MissingCrlf);
            }
        }
        self.scanned = end.max(start);
        if buf.len() >= V1_MAX_LEN {
            return Parse::Invalid(ProxyError::V1LineTooLong);
        }
        Parse::NeedMore {
            at_least: V1_MIN_LEN.saturating_sub(buf.len()).max(1),
        }
    }

    fn feed_v2(&mut self, buf: &[u8]) -> Parse {
        let n = buf.len().min(V2_SIGNATURE.len());
        if buf[..n] != V2_SIGNATURE[..n] {
            return Parse::Invalid(ProxyError::BadSignature);
        }
        // Judge each fixed byte as soon as it is there, not once the whole header arrived.
        if let Some(&vc) = buf.get(12) {
            if vc >> 4 != 2 {
                return Parse::Invalid(ProxyError::V2BadVersion);
            }
            if vc & 0x0f > 1 {
                return Parse::Invalid(ProxyError::V2BadCommand);
            }
        }
        let local = buf.get(12).is_some_and(|&vc| vc & 0x0f == 0);
        let family = match buf.get(13) {
            // LOCAL: "the receiver must ... discard the protocol block including the family".
            Some(_) if local => Family::Unspec,
            Some(&fp) => match v2_family(fp) {
                Ok(f) => f,
                Err(e) => return Parse::Invalid(e),
            },
            None => Family::Unspec,
        };
        if buf.len() < V2_FIXED_LEN {
            return Parse::NeedMore {
                at_least: V2_FIXED_LEN - buf.len(),
            };
        }
        let len = u16::from_be_bytes([buf[14], buf[15]]);
        if len > self.cap {
            return Parse::Invalid(ProxyError::V2TooLong);
        }
        let addr_len = match family {
            Family::Unspec => 0,
            Family::Inet => V2_INET_LEN,
            Family::Inet6 => V2_INET6_LEN,
        };
        let len = usize::from(len);
        if len < addr_len {
            return Parse::Invalid(ProxyError::V2AddressTooShort);
        }
        let total = V2_FIXED_LEN + len;
        if buf.len() < total {
            return Parse::NeedMore {
                at_least: total - buf.len(),
            };
        }
        let block = &buf[V2_FIXED_LEN..total];
        let (source, destination) = match family {
            // LOCAL or AF_UNSPEC: the block's layout is unknown; skip it whole.
            Family::Unspec => (None, None),
            Family::Inet => {
                let ip = |at: usize| {
                    IpAddr::V4(Ipv4Addr::new(
                        block[at],
                        block[at + 1],
                        block[at + 2],
                        block[at + 3],
                    ))
                };
                let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
                (
                    Some(SocketAddr::new(ip(0), port(8))),
                    Some(SocketAddr::new(ip(4), port(10))),
                )
            }
            Family::Inet6 => {
                let ip = |at: usize| {
                    let mut o = [0u8; 16];
                    o.copy_from_slice(&block[at..at + 16]);
                    IpAddr::V6(Ipv6Addr::from(o))
                };
                let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
                (
                    Some(SocketAddr::new(ip(0), port(32))),
                    Some(SocketAddr::new(ip(16), port(34))),
                )
            }
        };
        if family != Family::Unspec
            && let Err(e) = check_tlvs(&block[addr_len..])
        {
            return Parse::Invalid(e);
        }
        Parse::Done {
            header: ProxyHeader {
                version: Version::V2,
                command: if local {
                    Command::Local
                } else {
                    Command::Proxy
                },
                source,
                destination,
            },
            consumed: total,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    Unspec,
    Inet,
    Inet6,
}

/// The 14th byte of a v2 header (PROXY command): family in the high nibble, transport in the
/// low one.
fn v2_family(fp: u8) -> Result<Family, ProxyError> {
    let family = match fp >> 4 {
        0 => {
            return if fp == 0 {
                Ok(Family::Unspec)
            } else {
                Err(ProxyError::V2UnsupportedProtocol)
            };
        }
        1 => Family::Inet,
        2 => Family::Inet6,
        _ => return Err(ProxyError::V2UnsupportedFamily),
    };
    if fp & 0x0f != 1 {
        return Err(ProxyError::V2UnsupportedProtocol);
    }
    Ok(family)
}

/// Walks the TLVs after the address block: each must fit, and they must fill it exactly.
/// At most `len / 3` steps, so bounded by the cap.
fn check_tlvs(mut rest: &[u8]) -> Result<(), ProxyError> {
    while !rest.is_empty() {
        let [_kind, hi, lo, ..] = *rest else {
            return Err(ProxyError::V2BadTlv);
        };
        let len = 3 + usize::from(u16::from_be_bytes([hi, lo]));
        if rest.len() < len {
            return Err(ProxyError::V2BadTlv);
        }
        rest = &rest[len..];
    }
    Ok(())
}

/// Parses the part of a v1 line between `PROXY ` and CRLF.
fn parse_v1_line(line: &[u8]) -> Result<ProxyHeader, ProxyError> {
    let (proto, rest) = match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], Some(&line[i + 1..])),
        None => (line, None),
    };
    let v6 = match proto {
        // "the receiver must ignore anything presented before the CRLF is found"
        b"UNKNOWN" => {
            return Ok(ProxyHeader {
                version: Version::V1,
                command: Command::Proxy,
                source: None,
                destination: None,
            });
        }
        b"TCP4" => false,
        b"TCP6" => true,
        _ => return Err(ProxyError::V1BadProtocol),
    };
    let rest = rest.ok_or(ProxyError::V1FieldCount)?;
    let mut fields = rest.split(|&b| b == b' ');
    let mut next = || fields.next().ok_or(ProxyError::V1FieldCount);
    let (src, dst, sport, dport) = (next()?, next()?, next()?, next()?);
    if next().is_ok() {
        return Err(ProxyError::V1FieldCount);
    }
    let addr = |f: &[u8]| -> Result<IpAddr, ProxyError> {
        let s = std::str::from_utf8(f).map_err(|_| ProxyError::V1BadAddress)?;
        if v6 {
            s.parse::<Ipv6Addr>().map(IpAddr::V6)
        } else {
            s.parse::<Ipv4Addr>().map(IpAddr::V4)
        }
        .map_err(|_| ProxyError::V1BadAddress)
    };
    let (src, dst) = (addr(src)?, addr(dst)?);
    let (sport, dport) = (v1_port(sport)?, v1_port(dport)?);
    Ok(ProxyHeader {
        version: Version::V1,
        command: Command::Proxy,
        source: Some(SocketAddr::new(src, sport)),
        destination: Some(SocketAddr::new(dst, dport)),
    })
}

fn v1_port(f: &[u8]) -> Result<u16, ProxyError> {
    if f.is_empty() || !f.iter().all(u8::is_ascii_digit) {
        return Err(ProxyError::V1BadPort);
    }
    if f.len() > 5 {
        return Err(ProxyError::V1PortOutOfRange);
    }
    let n = f.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0'));
    u16::try_from(n).map_err(|_| ProxyError::V1PortOutOfRange)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn parse(buf: &[u8]) -> Parse {
        ProxyParser::new().feed(buf)
    }

    fn invalid(buf: &[u8]) -> ProxyError {
        match parse(buf) {
            Parse::Invalid(e) => e,
            other => panic!("{:?}: expected Invalid, got {other:?}", buf),
        }
    }

    fn done(buf: &[u8]) -> (ProxyHeader, usize) {
        match parse(buf) {
            Parse::Done { header, consumed } => (header, consumed),
            other => panic!("{:?}: expected Done, got {other:?}", buf),
        }
    }

    /// Feeds `buf` one more byte at a time, as a slowloris client would send it.
    fn byte_by_byte(buf: &[u8]) -> Parse {
        let mut p = ProxyParser::new();
        for n in 0..buf.len() {
            match p.feed(&buf[..n]) {
                Parse::NeedMore { at_least } => {
                    assert!(at_least >= 1);
                    assert!(n + at_least <= buf.len() || !matches!(parse(buf), Parse::Done { .. }));
                }
                other => return other,
            }
        }
        p.feed(buf)
    }

    fn v2(vc: u8, fp: u8, block: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend([vc, fp]);
        h.extend((block.len() as u16).to_be_bytes());
        h.extend(block);
        h
    }

    fn v4_block() -> Vec<u8> {
        // 192.168.0.1:56324 -> 192.168.0.11:443
        vec![192, 168, 0, 1, 192, 168, 0, 11, 0xdc, 0x04, 0x01, 0xbb]
    }

    #[test]
    fn spec_v1_examples() {
        // Section 2.1's worst cases and example.
        let (h, n) = done(b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n");
        assert_eq!(n, 56);
        assert_eq!(h.source, Some(sa("255.255.255.255:65535")));
        let tcp6 = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(tcp6.len(), 104);
        let (h, n) = done(tcp6);
        assert_eq!(n, 104);
        assert_eq!(
            h.destination,
            Some(sa("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"))
        );
        let unknown = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
        assert_eq!(unknown.len(), 107, "the spec's longest possible line");
        let (h, n) = done(unknown);
        assert_eq!((h.source, h.destination, n), (None, None, 107));
        let (h, n) = done(b"PROXY UNKNOWN\r\n");
        assert_eq!((h.command, h.source, n), (Command::Proxy, None, 15));

        let mut req = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n".to_vec();
        let header_len = req.len();
        req.extend_from_slice(b"GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n");
        let (h, n) = done(&req);
        assert_eq!(n, header_len);
        assert_eq!(
            &req[n..n + 3],
            b"GET",
            "the client's bytes start right after"
        );
        assert_eq!(h.version, Version::V1);
        assert_eq!(h.source, Some(sa("192.168.0.1:56324")));
        assert_eq!(h.destination, Some(sa("192.168.0.11:443")));
    }

    #[test]
    fn v1_malformed() {
        use ProxyError::*;
        assert_eq!(invalid(b"GET / HTTP/1.1\r\n"), BadSignature);
        assert_eq!(invalid(b"PROXZ"), BadSignature, "rejected at the 5th byte");
        assert_eq!(invalid(b"PROXYTCP4"), BadSignature);
        let long = [b"PROXY UNKNOWN ".as_slice(), &[b'a'; 93]].concat();
        assert_eq!(long.len(), 107);
        assert_eq!(invalid(&long), V1LineTooLong);
        // A CRLF that would end at byte 108 is one too late.
        let late = [b"PROXY UNKNOWN ".as_slice(), &[b'a'; 92], b"\r\n"].concat();
        assert_eq!(late.len(), 108);
        assert_eq!(invalid(&late), V1LineTooLong);
        assert_eq!(invalid(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"), V1MissingCrlf);
        assert_eq!(
            invalid(b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n"),
            V1MissingCrlf
        );
        assert_eq!(
            invalid(b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n"),
            V1BadProtocol
        );
        assert_eq!(
            invalid(b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n"),
            V1BadProtocol
        );
        assert_eq!(invalid(b"PROXY \r\n"), V1BadProtocol);
        assert_eq!(invalid(b"PROXY UNKNOWNX\r\n"), V1BadProtocol);
        assert_eq!(invalid(b"PROXY TCP4\r\n"), V1FieldCount);
        assert_eq!(invalid(b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n"), V1FieldCount);
        assert_eq!(
            invalid(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n"),
            V1FieldCount
        );
        assert_eq!(
            invalid(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n"),
            V1FieldCount
        );
        assert_eq!(
            invalid(b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n"),
            V1FieldCount
        );
        assert_eq!(invalid(b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n"), V1BadAddress);
        assert_eq!(
            invalid(b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n"),
            V1BadAddress
        );
        assert_eq!(invalid(b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n"), V1BadAddress);
        assert_eq!(invalid(b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n"), V1BadAddress);
        assert_eq!(invalid(b"PROXY TCP6 ::1 \xff\xfe 1 2\r\n"), V1BadAddress);
        assert_eq!(invalid(b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n"), V1BadPort);
        assert_eq!(invalid(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 0x2\r\n"), V1BadPort);
        assert_eq!(
            invalid(b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n"),
            V1PortOutOfRange
        );
        assert_eq!(
            invalid(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n"),
            V1PortOutOfRange
        );
        assert_eq!(
            invalid(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 123456\r\n"),
            V1PortOutOfRange
        );
        // Port 0 and leading zeros are numbers in range.
        let (h, _) = done(b"PROXY TCP4 1.2.3.4 5.6.7.8 0 00080\r\n");
        assert_eq!(h.destination, Some(sa("5.6.7.8:80")));
    }

    #[test]
    fn v2_spec_layout() {
        // TCP over IPv4, as section 2.2 lays it out, followed by client data.
        let mut h = v2(0x21, 0x11, &v4_block());
        assert_eq!(h.len(), 28);
        h.extend_from_slice(b"hello");
        let (hdr, n) = done(&h);
        assert_eq!(n, 28);
        assert_eq!(&h[n..], b"hello");
        assert_eq!(
            hdr,
            ProxyHeader {
                version: Version::V2,
                command: Command::Proxy,
                source: Some(sa("192.168.0.1:56324")),
                destination: Some(sa("192.168.0.11:443")),
            }
        );
        // TCP over IPv6.
        let mut block = Vec::new();
        block.extend("2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        block.extend("2001:db8::2".parse::<Ipv6Addr>().unwrap().octets());
        block.extend([0, 1, 0, 2]);
        let (hdr, n) = done(&v2(0x21, 0x21, &block));
        assert_eq!(n, 52);
        assert_eq!(hdr.source, Some(sa("[2001:db8::1]:1")));
        assert_eq!(hdr.destination, Some(sa("[2001:db8::2]:2")));
    }

    #[test]
    fn v2_local_unspec_and_tlvs() {
        // LOCAL (health check): addresses ignored, whatever the family byte says.
        let (h, n) = done(&v2(0x20, 0x00, &[]));
        assert_eq!(
            (h.command, h.source, h.destination, n),
            (Command::Local, None, None, 16)
        );
        let (h, n) = done(&v2(0x20, 0x11, &v4_block()));
        assert_eq!((h.command, h.source, n), (Command::Local, None, 28));
        let (h, _) = done(&v2(0x20, 0xff, &[1, 2, 3]));
        assert_eq!(h.command, Command::Local);
        // PROXY with AF_UNSPEC: use the connection's own addresses; the block is skipped.
        let (h, n) = done(&v2(0x21, 0x00, &[9; 7]));
        assert_eq!((h.command, h.source, n), (Command::Proxy, None, 23));
        // TLVs (ALPN "h2", AUTHORITY "example.com", NOOP padding) are skipped.
        let mut block = v4_block();
        block.extend([0x01, 0, 2, b'h', b'2']);
        block.extend([0x02, 0, 11]);
        block.extend(b"example.com");
        block.extend([0x04, 0, 0]);
        let (h, n) = done(&v2(0x21, 0x11, &block));
        assert_eq!(n, 16 + block.len());
        assert_eq!(h.source, Some(sa("192.168.0.1:56324")));
    }

    #[test]
    fn v2_malformed() {
        use ProxyError::*;
        let mut sig = V2_SIGNATURE;
        sig[7] = b'X';
        assert_eq!(invalid(&sig), BadSignature);
        assert_eq!(invalid(b"\r\n\r\n\0\r\nQUIX"), BadSignature);
        assert_eq!(invalid(&v2(0x11, 0x11, &v4_block())), V2BadVersion);
        assert_eq!(invalid(&v2(0x31, 0x11, &v4_block())), V2BadVersion);
        assert_eq!(invalid(&v2(0x22, 0x11, &v4_block())), V2BadCommand);
        assert_eq!(invalid(&v2(0x2f, 0x11, &v4_block())), V2BadCommand);
        assert_eq!(
            invalid(&v2(0x21, 0x31, &[0; 216])),
            V2UnsupportedFamily,
            "AF_UNIX"
        );
        assert_eq!(invalid(&v2(0x21, 0x41, &v4_block())), V2UnsupportedFamily);
        assert_eq!(
            invalid(&v2(0x21, 0x12, &v4_block())),
            V2UnsupportedProtocol,
            "UDP"
        );
        assert_eq!(invalid(&v2(0x21, 0x10, &v4_block())), V2UnsupportedProtocol);
        assert_eq!(invalid(&v2(0x21, 0x13, &v4_block())), V2UnsupportedProtocol);
        assert_eq!(invalid(&v2(0x21, 0x01, &[])), V2UnsupportedProtocol);
        assert_eq!(invalid(&v2(0x21, 0x11, &[0; 11])), V2AddressTooShort);
        assert_eq!(invalid(&v2(0x21, 0x21, &[0; 12])), V2AddressTooShort);
        assert_eq!(invalid(&v2(0x21, 0x21, &[0; 35])), V2AddressTooShort);
        // Too long is known at the 16th byte, before any of the block arrives.
        let mut long = v2(0x21, 0x11, &[]);
        long[14..16].copy_from_slice(&4097u16.to_be_bytes());
        assert_eq!(invalid(&long), V2TooLong);
        long[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(invalid(&long), V2TooLong);
        assert_eq!(
            ProxyParser::with_cap(u16::MAX).feed(&long),
            Parse::NeedMore { at_least: 65535 }
        );
        // TLVs must fit exactly.
        for tail in [
            &[0x01][..],
            &[0x01, 0],
            &[0x01, 0, 3, b'a', b'b'],
            &[0x04, 0, 0, 0x01],
        ] {
            let block = [v4_block().as_slice(), tail].concat();
            assert_eq!(invalid(&v2(0x21, 0x11, &block)), V2BadTlv, "{tail:?}");
        }
    }

    #[test]
    fn early_rejection_and_need_more() {
        // Wrong signature at the first byte; a bad v2 byte as soon as it arrives.
        assert_eq!(invalid(b"\x16"), ProxyError::BadSignature);
        assert_eq!(
            invalid(b"\r\n\r\n\0\r\nQUIT\n\x11"),
            ProxyError::V2BadVersion
        );
        assert_eq!(
            invalid(b"\r\n\r\n\0\r\nQUIT\n\x21\x31"),
            ProxyError::V2UnsupportedFamily
        );
        assert_eq!(parse(b""), Parse::NeedMore { at_least: 15 });
        assert_eq!(parse(b"PRO"), Parse::NeedMore { at_least: 12 });
        assert_eq!(
            parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r"),
            Parse::NeedMore { at_least: 1 }
        );
        assert_eq!(parse(b"\r\n"), Parse::NeedMore { at_least: 14 });
        let h = v2(0x21, 0x11, &v4_block());
        assert_eq!(parse(&h[..16]), Parse::NeedMore { at_least: 12 });
        assert_eq!(parse(&h[..27]), Parse::NeedMore { at_least: 1 });
        assert_eq!(ProxyParser::new().max_header_len(), 16 + 4096);
        assert_eq!(ProxyParser::with_cap(0).max_header_len(), V1_MAX_LEN);
    }

    #[test]
    fn slowloris_byte_by_byte() {
        let mut tlv = v4_block();
        tlv.extend([0xee, 0, 3, 1, 2, 3]);
        let cases: Vec<Vec<u8>> = vec![
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET /".to_vec(),
            b"PROXY TCP6 2001:db8::1 ::1 1 2\r\n".to_vec(),
            b"PROXY UNKNOWN\r\n".to_vec(),
            [v2(0x21, 0x11, &tlv), b"data".to_vec()].concat(),
            v2(0x20, 0x00, &[]),
        ];
        for c in cases {
            assert_eq!(byte_by_byte(&c), parse(&c), "{c:?}");
            assert!(matches!(parse(&c), Parse::Done { .. }));
        }
        // A line that never ends is cut at 107 bytes, fed one byte at a time or not.
        let endless = [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat();
        assert_eq!(
            byte_by_byte(&endless[..107]),
            Parse::Invalid(ProxyError::V1LineTooLong)
        );
    }

    #[test]
    fn encode_shapes() {
        let mut b1 = [0u8; V1_BUF_LEN];
        let n = encode_v1(sa("192.168.0.1:56324"), sa("192.168.0.11:443"), &mut b1);
        assert_eq!(
            &b1[..n],
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
        );
        let n = encode_v1(sa("[::ffff:10.0.0.1]:1"), sa("10.0.0.2:2"), &mut b1);
        assert_eq!(
            &b1[..n],
            b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n",
            "mapped counts as v4"
        );
        let n = encode_v1(sa("10.0.0.1:1"), sa("[2001:db8::1]:2"), &mut b1);
        assert_eq!(&b1[..n], b"PROXY UNKNOWN\r\n");
        let big = sa("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535");
        assert_eq!(encode_v1(big, big, &mut b1), 104);

        let mut b2 = [0u8; V2_BUF_LEN];
        let n = encode_v2(sa("192.168.0.1:56324"), sa("192.168.0.11:443"), &mut b2);
        assert_eq!(b2[..n], v2(0x21, 0x11, &v4_block())[..]);
        let n = encode_v2(sa("10.0.0.1:1"), sa("[2001:db8::1]:2"), &mut b2);
        assert_eq!((n, b2[13]), (52, 0x21));
        let (h, _) = done(&b2[..n]);
        assert_eq!(
            h.source,
            Some(sa("[::ffff:10.0.0.1]:1")),
            "v4 mapped into v6"
        );
        assert_eq!(h.destination, Some(sa("[2001:db8::1]:2")));
    }

    #[test]
    fn round_trips() {
        let pairs = [
            ("192.168.0.1:56324", "192.168.0.11:443"),
            ("0.0.0.0:0", "255.255.255.255:65535"),
            ("[2001:db8::1]:1234", "[fe80::1]:80"),
            ("[::]:0", "[::1]:65535"),
        ];
        for (s, d) in pairs {
            let (s, d) = (sa(s), sa(d));
            let mut b1 = [0u8; V1_BUF_LEN];
            let n = encode_v1(s, d, &mut b1);
            let (h, c) = done(&b1[..n]);
            assert_eq!(
                (h.version, h.source, h.destination, c),
                (Version::V1, Some(s), Some(d), n)
            );
            let mut b2 = [0u8; V2_BUF_LEN];
            let n = encode_v2(s, d, &mut b2);
            let (h, c) = done(&b2[..n]);
            assert_eq!(
                (h.version, h.source, h.destination, c),
                (Version::V2, Some(s), Some(d), n)
            );
        }
    }

    fn any_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
            any::<u128>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))),
        ]
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..300)) {
            check_bounded(&buf);
        }

        #[test]
        fn random_after_signatures_never_panic(
            v2sig in any::<bool>(),
            tail in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let head: &[u8] = if v2sig { &V2_SIGNATURE } else { b"PROXY " };
            check_bounded(&[head, &tail].concat());
        }

        #[test]
        fn random_v2_headers_never_panic(
            vc in 0x20u8..0x22, fp in any::<u8>(),
            block in proptest::collection::vec(any::<u8>(), 0..80),
            extra in proptest::collection::vec(any::<u8>(), 0..8),
        ) {
            check_bounded(&[v2(vc, fp, &block), extra].concat());
        }

        #[test]
        fn addresses_round_trip(s in any_ip(), d in any_ip(), sp in any::<u16>(), dp in any::<u16>()) {
            let (s, d) = (SocketAddr::new(s, sp), SocketAddr::new(d, dp));
            let (cs, cd) = (canonical(s), canonical(d));
            let same_family = cs.is_ipv4() == cd.is_ipv4();
            let mut b1 = [0u8; V1_BUF_LEN];
            let n = encode_v1(s, d, &mut b1);
            prop_assert!(n <= V1_MAX_LEN);
            let (h, c) = done(&b1[..n]);
            prop_assert_eq!(c, n);
            if same_family {
                prop_assert_eq!((h.source, h.destination), (Some(cs), Some(cd)));
            } else {
                prop_assert_eq!((h.source, h.destination), (None, None));
            }
            let mut b2 = [0u8; V2_BUF_LEN];
            let n = encode_v2(s, d, &mut b2);
            let (h, c) = done(&b2[..n]);
            prop_assert_eq!(c, n);
            let map = |a: SocketAddr| SocketAddr::new(IpAddr::V6(as_v6(a.ip())), a.port());
            if same_family {
                prop_assert_eq!((h.source, h.destination), (Some(cs), Some(cd)));
            } else {
                prop_assert_eq!((h.source, h.destination), (Some(map(cs)), Some(map(cd))));
            }
        }
    }

    /// Whole input and every prefix: no panic, `consumed` within the input, byte-by-byte
    /// feeding agrees with one feed.
    fn check_bounded(buf: &[u8]) {
        let whole = parse(buf);
        if let Parse::Done { consumed, .. } = whole {
            assert!(consumed <= buf.len());
            assert!(consumed <= ProxyParser::new().max_header_len());
        }
        let mut p = ProxyParser::new();
        for n in 0..=buf.len() {
            match p.feed(&buf[..n]) {
                Parse::NeedMore { at_least } => assert!(at_least >= 1),
                Parse::Done { consumed, .. } => {
                    assert!(consumed <= n);
                    assert_eq!(p.feed(buf), whole);
                    return;
                }
                Parse::Invalid(_) => {
                    assert_eq!(p.feed(buf), whole);
                    return;
                }
            }
        }
    }
}
