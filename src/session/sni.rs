//! The server name a TLS client asks for, read from its ClientHello without terminating TLS,
//! and the routes it selects.
//!
//! Why: SNI routing sends `a.example.com` and `b.example.com` arriving on one port to
//! different upstreams while the TLS session stays end to end. The forwarder only peeks at
//! the first flight: the bytes it reads are relayed unchanged once the route is chosen.
//!
//! Why I/O-free and incremental: the ClientHello may arrive in several reads and, legally,
//! in several TLS records (anti-censorship tools split it on purpose). The engine feeds
//! [`ClientHelloParser::feed`] everything read so far; the parser walks record headers as
//! they arrive (keeping a few integers of state, so one byte per read costs O(length) in
//! all), and parses the handshake message once it is complete. The answer borrows nothing:
//! the name is copied, lower-cased, into a fixed 253-byte [`ServerName`], so nothing is
//! allocated on the data path.
//!
//! Bounds: the handshake message may take at most [`DEFAULT_HELLO_CAP`] bytes (16 KiB, a cap
//! [`ClientHelloParser::with_cap`] can change), and the records carrying it, headers
//! included, at most [`ClientHelloParser::max_buffer_len`] bytes: the cap plus
//! [`MAX_RECORDS`] record headers. Within that byte bound a hello may be split into any
//! number of records (a 500-byte hello in one-byte records is 3 000 bytes, and is read):
//! what an engine buffers is bounded by bytes, so counting records bought nothing and sent
//! heavily split hellos to the default route.

#![warn(missing_docs)]

use std::collections::HashMap;
use std::fmt;

use crate::vocab::{MAX_NAME_LEN, SniPattern, SniPatternError, is_valid_host_name};

/// Default cap on the ClientHello handshake message (its 4-byte header included).
pub const DEFAULT_HELLO_CAP: usize = 16 * 1024;
/// Record headers the buffer bound allows beyond the message cap: a hello of exactly the cap
/// may be split into this many records, a smaller one into as many more as its spare bytes
/// pay for (5 bytes a header). Real clients use one record; tools that split it to hide the
/// name from middleboxes use a handful to a few hundred.
pub const MAX_RECORDS: usize = 64;

const RECORD_HEADER_LEN: usize = 5;
/// RFC 8446 5.1: a TLSPlaintext fragment is at most 2^14 bytes.
const MAX_RECORD_LEN: usize = 1 << 14;
const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST_NAME: u8 = 0;

/// A validated server name: 1 to 253 bytes of lower-case letters, digits, hyphens and dots,
/// stored inline (no allocation).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServerName {
    len: u8,
    bytes: [u8; MAX_NAME_LEN],
}

impl ServerName {
    /// The name, lower-case.
    pub fn as_str(&self) -> &str {
        // Only ASCII is ever stored, so this never falls back.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("")
    }
}

impl std::ops::Deref for ServerName {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What [`ClientHelloParser::feed`] makes of the bytes so far.
///
/// 264 bytes, because `Done` holds the name inline: boxing it would allocate per connection.
#[allow(
    clippy::large_enum_variant,
    reason = "the name is inline so that no connection allocates"
)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hello {
    /// The ClientHello is not complete; at least `at_least` (≥ 1) more bytes are needed.
    NeedMore {
        /// A lower bound on the bytes still missing.
        at_least: usize,
    },
    /// The first bytes are not a TLS handshake record (plain HTTP, SSH, an SSLv2-style
    /// hello...): route to the default route and relay the bytes as they are.
    NotTls,
    /// A complete, well-formed ClientHello, with its host name if it carries one.
    Done {
        /// The host_name of the server_name extension, lower-case, without the trailing dot a
        /// client may have sent; `None` without one.
        sni: Option<ServerName>,
    },
    /// It looks like TLS but is malformed or over the bounds; the connection should be closed.
    Invalid(HelloError),
}

/// Why a ClientHello was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum HelloError {
    /// A handshake record whose version is not 3.1 to 3.4 (TLS 1.0 to 1.3), or a later record
    /// not of major version 3.
    #[error("TLS record version outside 0x0301..0x0304")]
    RecordVersion,
    /// A record with no payload (forbidden for handshake records).
    #[error("empty TLS handshake record")]
    EmptyRecord,
    /// A record longer than 2^14 bytes.
    #[error("TLS record longer than 16384 bytes")]
    RecordTooLong,
    /// A record other than a handshake one before the ClientHello was complete.
    #[error("non-handshake TLS record inside the ClientHello")]
    UnexpectedRecord,
    /// The records carrying the ClientHello, headers included, run past
    /// [`ClientHelloParser::max_buffer_len`] (more than [`MAX_RECORDS`] records for a hello
    /// near the cap).
    #[error("ClientHello split into so many TLS records that they exceed the buffer bound")]
    TooFragmented,
    /// The first handshake message is not a ClientHello.
    #[error("first TLS handshake message is not a ClientHello")]
    NotClientHello,
    /// The handshake message is longer than the cap.
    #[error("ClientHello longer than the configured cap")]
    TooLarge,
    /// The ClientHello's legacy_version is not 3.x.
    #[error("ClientHello version is not 3.x")]
    HelloVersion,
    /// A field runs past the end of the handshake message.
    #[error("ClientHello field runs past the end of the message")]
    Truncated,
    /// A session id longer than 32 bytes.
    #[error("ClientHello session id longer than 32 bytes")]
    SessionId,
    /// An empty or odd-length cipher suite list.
    #[error("ClientHello cipher suite list empty or of odd length")]
    CipherSuites,
    /// An empty compression method list.
    #[error("ClientHello compression method list empty")]
    Compression,
    /// The extensions' length does not match the rest of the message, or an extension runs
    /// past it.
    #[error("ClientHello extensions block inconsistent with its length")]
    Extensions,
    /// Two server_name extensions, or two host_name entries in one.
    #[error("ClientHello carries more than one server name")]
    DuplicateServerName,
    /// A server_name extension whose list is empty or disagrees with its length.
    #[error("ClientHello server_name list malformed")]
    ServerNameList,
    /// A host_name that is not a valid DNS name (see [`is_valid_host_name`]).
    #[error("ClientHello server name is not a valid DNS host name")]
    BadServerName,
}

/// An incremental ClientHello reader.
///
/// Feed it everything read from the connection so far, from its first byte, each time more
/// arrives; each call must pass the previous call's bytes, possibly followed by more. Once it
/// answers [`Hello::NotTls`], [`Hello::Done`] or [`Hello::Invalid`], it gives the same answer
/// again.
#[derive(Clone, Copy, Debug)]
pub struct ClientHelloParser {
    cap: usize,
    /// Bytes of the input accounted for (record headers and payload walked).
    pos: usize,
    /// Payload bytes of the current record not yet walked (0: a record header comes next).
    rec_left: usize,
    records: usize,
    /// Handshake bytes walked so far, and the first four of them (the message header).
    hs_have: usize,
    hs_header: [u8; 4],
    /// Length of the handshake message, header included; 0 until its header is walked.
    hs_need: usize,
    end: Option<Hello>,
}

impl Default for ClientHelloParser {
    fn default() -> Self {
        Self::new()
    }
}

impl ClientHelloParser {
    /// A parser with the default cap ([`DEFAULT_HELLO_CAP`]).
    pub const fn new() -> Self {
        Self::with_cap(DEFAULT_HELLO_CAP)
    }

    /// A parser refusing handshake messages longer than `cap` bytes (4-byte header included).
    pub const fn with_cap(cap: usize) -> Self {
        Self {
            cap,
            pos: 0,
            rec_left: 0,
            records: 0,
            hs_have: 0,
            hs_header: [0; 4],
            hs_need: 0,
            end: None,
        }
    }

    /// The most bytes this parser can ask an engine to buffer before it decides: the message
    /// cap plus [`MAX_RECORDS`] record headers. Records and message together never need more.
    pub const fn max_buffer_len(&self) -> usize {
        self.cap + MAX_RECORDS * RECORD_HEADER_LEN
    }

    /// Reads the ClientHello at the start of `buf`, everything read from the connection so
    /// far.
    pub fn feed(&mut self, buf: &[u8]) -> Hello {
        if let Some(end) = self.end {
            return end;
        }
        if self.pos > buf.len() {
            // The caller broke the contract with a shorter buffer: start over, don't panic.
            *self = Self::with_cap(self.cap);
        }
        let answer = self.walk(buf);
        if !matches!(answer, Hello::NeedMore { .. }) {
            self.end = Some(answer);
        }
        answer
    }

    /// Walks records until the handshake message is complete, then parses it.
    fn walk(&mut self, buf: &[u8]) -> Hello {
        loop {
            if self.hs_need != 0 && self.hs_have >= self.hs_need {
                return match parse_hello(buf, self.hs_need) {
                    Ok(sni) => Hello::Done { sni },
                    Err(e) => Hello::Invalid(e),
                };
            }
            if self.rec_left == 0 {
                let header = &buf[self.pos..buf.len().min(self.pos + RECORD_HEADER_LEN)];
                if let Some(refusal) = self.check_record_header(header) {
                    return refusal;
                }
                if header.len() < RECORD_HEADER_LEN {
                    // The rest of the header and at least one payload byte.
                    return Hello::NeedMore {
                        at_least: RECORD_HEADER_LEN - header.len() + 1,
                    };
                }
                self.records += 1;
                // What the records will take once the message is complete: every header so
                // far and the whole message (as far as it is known; at least one more byte).
                let message = self.hs_need.max(self.hs_have + 1);
                if self.records * RECORD_HEADER_LEN + message > self.max_buffer_len() {
                    return Hello::Invalid(HelloError::TooFragmented);
                }
                let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
                if len == 0 {
                    return Hello::Invalid(HelloError::EmptyRecord);
                }
                if len > MAX_RECORD_LEN {
                    return Hello::Invalid(HelloError::RecordTooLong);
                }
                self.rec_left = len;
                self.pos += RECORD_HEADER_LEN;
            }
            let take = self.rec_left.min(buf.len() - self.pos);
            if take == 0 {
                return Hello::NeedMore {
                    at_least: self.missing(),
                };
            }
            let chunk = &buf[self.pos..self.pos + take];
            if self.hs_have < 4 {
                let n = (4 - self.hs_have).min(take);
                self.hs_header[self.hs_have..self.hs_have + n].copy_from_slice(&chunk[..n]);
            }
            self.hs_have += take;
            self.pos += take;
            self.rec_left -= take;
            if self.hs_header[0] != HANDSHAKE_CLIENT_HELLO {
                return Hello::Invalid(HelloError::NotClientHello);
            }
            if self.hs_need == 0 && self.hs_have >= 4 {
                let [_, a, b, c] = self.hs_header;
                let len = 4 + (usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c));
                if len > self.cap {
                    return Hello::Invalid(HelloError::TooLarge);
                }
                self.hs_need = len;
            }
        }
    }

    /// Judges a record header, possibly partial, as soon as its bytes arrive.
    fn check_record_header(&self, header: &[u8]) -> Option<Hello> {
        let first = self.records == 0;
        if header.first().is_some_and(|&t| t != CONTENT_HANDSHAKE) {
            return Some(if first {
                Hello::NotTls
            } else {
                Hello::Invalid(HelloError::UnexpectedRecord)
            });
        }
        if header.get(1).is_some_and(|&major| major != 3) {
            return Some(if first {
                Hello::NotTls
            } else {
                Hello::Invalid(HelloError::RecordVersion)
            });
        }
        if header
            .get(2)
            .is_some_and(|&minor| !(1..=4).contains(&minor))
        {
            return Some(Hello::Invalid(HelloError::RecordVersion));
        }
        None
    }

    /// A lower bound on the bytes still needed while inside a record with nothing to take.
    fn missing(&self) -> usize {
        let wanted = if self.hs_need != 0 {
            self.hs_need - self.hs_have
        } else {
            4usize.saturating_sub(self.hs_have).max(1)
        };
        if wanted <= self.rec_left {
            wanted
        } else {
            // This record's rest, then another record's header and payload.
            self.rec_left + RECORD_HEADER_LEN + (wanted - self.rec_left)
        }
    }
}

/// Reads the handshake message's bytes in order across the record headers that split it.
/// Every read is checked against the message's length (`left`) and the input.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    rec_left: usize,
    left: usize,
}

impl<'a> Reader<'a> {
    /// The next at most `want` contiguous bytes of the message (fewer at a record boundary).
    fn chunk(&mut self, want: usize) -> Result<&'a [u8], HelloError> {
        if want > self.left {
            return Err(HelloError::Truncated);
        }
        if self.rec_left == 0 {
            let h = self
                .buf
                .get(self.pos..self.pos + RECORD_HEADER_LEN)
                .ok_or(HelloError::Truncated)?;
            self.rec_left = usize::from(u16::from_be_bytes([h[3], h[4]]));
            self.pos += RECORD_HEADER_LEN;
        }
        let n = want.min(self.rec_left);
        let c = self
            .buf
            .get(self.pos..self.pos + n)
            .ok_or(HelloError::Truncated)?;
        if n == 0 && want > 0 {
            return Err(HelloError::Truncated);
        }
        self.pos += n;
        self.rec_left -= n;
        self.left -= n;
        Ok(c)
    }

    fn read(&mut self, out: &mut [u8]) -> Result<(), HelloError> {
        let mut done = 0;
        while done < out.len() {
            let c = self.chunk(out.len() - done)?;
            out[done..done + c.len()].copy_from_slice(c);
            done += c.len();
        }
        Ok(())
    }

    fn skip(&mut self, mut n: usize) -> Result<(), HelloError> {
        while n > 0 {
            n -= self.chunk(n)?.len();
        }
        Ok(())
    }

    fn u8(&mut self) -> Result<u8, HelloError> {
        let mut b = [0; 1];
        self.read(&mut b)?;
        Ok(b[0])
    }

    fn u16(&mut self) -> Result<usize, HelloError> {
        let mut b = [0; 2];
        self.read(&mut b)?;
        Ok(usize::from(u16::from_be_bytes(b)))
    }
}

/// Parses the complete handshake message of `len` bytes starting in the first record.
fn parse_hello(buf: &[u8], len: usize) -> Result<Option<ServerName>, HelloError> {
    let mut r = Reader {
        buf,
        pos: 0,
        rec_left: 0,
        left: len,
    };
    r.skip(4)?; // type and length, already checked
    if r.u8()? != 3 {
        return Err(HelloError::HelloVersion);
    }
    r.skip(1 + 32)?; // minor version, random
    let session_id = usize::from(r.u8()?);
    if session_id > 32 {
        return Err(HelloError::SessionId);
    }
    r.skip(session_id)?;
    let suites = r.u16()?;
    if suites == 0 || suites % 2 != 0 {
        return Err(HelloError::CipherSuites);
    }
    r.skip(suites)?;
    let compression = usize::from(r.u8()?);
    if compression == 0 {
        return Err(HelloError::Compression);
    }
    r.skip(compression)?;
    if r.left == 0 {
        return Ok(None); // no extensions at all (allowed before TLS 1.3)
    }
    if r.u16()? != r.left {
        return Err(HelloError::Extensions);
    }
    let mut sni = None;
    let mut seen = false;
    while r.left > 0 {
        if r.left < 4 {
            return Err(HelloError::Extensions);
        }
        let (kind, len) = (r.u16()?, r.u16()?);
        if len > r.left {
            return Err(HelloError::Extensions);
        }
        if kind == usize::from(EXT_SERVER_NAME) {
            if seen {
                return Err(HelloError::DuplicateServerName);
            }
            seen = true;
            sni = server_name(&mut r, len)?;
        } else {
            r.skip(len)?;
        }
    }
    Ok(sni)
}

/// The server_name extension's data (RFC 6066 section 3): a list of (type, name) entries,
/// at most one host_name. Entries of other types are skipped.
fn server_name(r: &mut Reader<'_>, len: usize) -> Result<Option<ServerName>, HelloError> {
    if len < 2 {
        return Err(HelloError::ServerNameList);
    }
    let list = r.u16()?;
    if list == 0 || list + 2 != len {
        return Err(HelloError::ServerNameList);
    }
    let mut left = list;
    let mut name = None;
    while left > 0 {
        if left < 3 {
            return Err(HelloError::ServerNameList);
        }
        let (kind, n) = (r.u8()?, r.u16()?);
        left -= 3;
        if n > left {
            return Err(HelloError::ServerNameList);
        }
        left -= n;
        if kind != NAME_TYPE_HOST_NAME {
            r.skip(n)?;
            continue;
        }
        if name.is_some() {
            return Err(HelloError::DuplicateServerName);
        }
        // One trailing dot (an absolute name, `api.example.com.`) is allowed and dropped:
        // RFC 6066 says clients send none, but some do (`openssl s_client -servername`
        // passes it on), and it names the same host, so routes match it as they document.
        if n == 0 || n > MAX_NAME_LEN + 1 {
            return Err(HelloError::BadServerName);
        }
        let mut raw = [0u8; MAX_NAME_LEN + 1];
        r.read(&mut raw[..n])?;
        let host = match &raw[..n] {
            [rest @ .., b'.'] => rest,
            all => all,
        };
        if host.is_empty() || host.len() > MAX_NAME_LEN {
            return Err(HelloError::BadServerName);
        }
        let mut sn = ServerName {
            len: host.len() as u8,
            bytes: [0; MAX_NAME_LEN],
        };
        sn.bytes[..host.len()].copy_from_slice(host);
        sn.bytes[..host.len()].make_ascii_lowercase();
        if !is_valid_host_name(&sn.bytes[..host.len()]) {
            return Err(HelloError::BadServerName);
        }
        name = Some(sn);
    }
    Ok(name)
}

/// Host-name patterns mapped to route indices.
///
/// A pattern is an exact name (`api.example.com`) or a wildcard `*.example.com`, which
/// matches exactly one more leading label, the usual TLS certificate rule: `a.example.com`,
/// not `example.com`, nor `a.b.example.com`. Matching ignores ASCII case and one trailing dot
/// on the name. An exact pattern wins over any wildcard; between equal patterns the first
/// route listed wins.
#[derive(Clone, Debug, Default)]
pub struct SniRoutes {
    exact: HashMap<Box<str>, usize>,
    /// Keyed by what follows `*.`.
    wildcard: HashMap<Box<str>, usize>,
}

impl SniRoutes {
    /// Builds the matcher from each route's index and patterns, in priority order.
    ///
    /// # Errors
    /// The first pattern that is neither a valid host name nor `*.` followed by one (a `*`
    /// anywhere else, an empty label, a character outside letters, digits, hyphens and dots).
    pub fn new(routes: &[(usize, Vec<String>)]) -> Result<Self, SniPatternError> {
        let mut s = Self::default();
        for (route, patterns) in routes {
            for pattern in patterns {
                let (map, name) = match SniPattern::parse(pattern) {
                    Some(SniPattern::Wildcard(name)) => (&mut s.wildcard, name),
                    Some(SniPattern::Exact(name)) => (&mut s.exact, name),
                    None => {
                        return Err(SniPatternError {
                            route: *route,
                            pattern: pattern.clone(),
                        });
                    }
                };
                map.entry(name.into()).or_insert(*route);
            }
        }
        Ok(s)
    }

    /// Whether no pattern was given.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty()
    }

    /// The route for `sni`: an exact match first, else a wildcard one, else `None` (the
    /// caller's default route). Allocation-free.
    pub fn route(&self, sni: &str) -> Option<usize> {
        let name = sni.strip_suffix('.').unwrap_or(sni).as_bytes();
        if name.is_empty() || name.len() > MAX_NAME_LEN {
            return None;
        }
        let mut lower = [0u8; MAX_NAME_LEN];
        let lower = &mut lower[..name.len()];
        lower.copy_from_slice(name);
        lower.make_ascii_lowercase();
        // Only ASCII bytes changed, so still UTF-8.
        let name = std::str::from_utf8(lower).ok()?;
        if let Some(&r) = self.exact.get(name) {
            return Some(r);
        }
        match name.split_once('.') {
            Some((first, rest)) if !first.is_empty() && !first.contains('*') => {
                self.wildcard.get(rest).copied()
            }
            _ => None,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `openssl s_client -servername Www.Example.COM`,
    /// OpenSSL 3.0 offering TLS 1.3: 321 bytes as captured on a listening socket.
    const OPENSSL_TLS13: &str = concat!(
        "160301013c01000138030379ce560971a5586570c52a5f7469ca83dc55a92ba40f729dd23f2c5cb5905df220",
        "7ed540b7b9d9ce793931361c0b8954fdf740644a0248102a1e5c8d8385166900003e130213031301c02cc030",
        "009fcca9cca8ccaac02bc02f009ec024c028006bc023c0270067c00ac0140039c009c0130033009d009c003d",
        "003c0035002f00ff010000b100000014001200000f5777772e4578616d706c652e434f4d000b000403000102",
        "000a00160014001d0017001e0019001801000101010201030104002300000016000000170000000d002a0028",
        "040305030603080708080809080a080b080408050806040105010601030303010302040205020602002b0009",
        "080304030303020301002d00020101003300260024001d0020c6f87b316c6c42f6180ef97cf012a82deb5814",
        "545caded2537c2756fd2516e28",
    );
    /// `openssl s_client -servername api.example.org -tls1_2`: 212 bytes.
    const OPENSSL_TLS12: &str = concat!(
        "16030100cf010000cb03031b6713ead0e8d015c9e6c789e8e0d5e4c2f1da79a5e7ba67996061c32666544000",
        "0038c02cc030009fcca9cca8ccaac02bc02f009ec024c028006bc023c0270067c00ac0140039c009c0130033",
        "009d009c003d003c0035002f00ff0100006a00000014001200000f6170692e6578616d706c652e6f7267000b",
        "000403000102000a000c000a001d0017001e00190018002300000016000000170000000d002a002804030503",
        "0603080708080809080a080b080408050806040105010601030303010302040205020602",
    );
    /// `openssl s_client -noservername`: 297 bytes.
    const OPENSSL_NO_SNI: &str = concat!(
        "160301012401000120030329d861dcdd2329c6546cf30b8d7b3a284b493381669e0dfc1372b69ef97b2e7b20",
        "111312cdf030d549280ded1b169f1df83a713e6a0328632f8c826f0a84d1778b003e130213031301c02cc030",
        "009fcca9cca8ccaac02bc02f009ec024c028006bc023c0270067c00ac0140039c009c0130033009d009c003d",
        "003c0035002f00ff01000099000b000403000102000a00160014001d0017001e001900180100010101020103",
        "0104002300000016000000170000000d002a0028040305030603080708080809080a080b0804080508060401",
        "05010601030303010302040205020602002b0009080304030303020301002d00020101003300260024001d00",
        "208dca06cb857aa0c69c290f53f589e342426e2df22a713ae69c084ec3aad78b40",
    );

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn feed(buf: &[u8]) -> Hello {
        ClientHelloParser::new().feed(buf)
    }

    fn sni(buf: &[u8]) -> Option<String> {
        match feed(buf) {
            Hello::Done { sni } => sni.map(|n| n.to_string()),
            other => panic!("expected Done, got {other:?}"),
        }
    }

    fn invalid(buf: &[u8]) -> HelloError {
        match feed(buf) {
            Hello::Invalid(e) => e,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    /// The handshake message inside a single-record hello.
    fn message(hello: &[u8]) -> &[u8] {
        &hello[5..]
    }

    /// Frames a handshake message into records cut at `cuts` (offsets into the message).
    fn records(msg: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut start = 0;
        for &end in cuts.iter().chain([&msg.len()]) {
            if end <= start {
                continue;
            }
            out.extend([22, 3, 1]);
            out.extend(((end - start) as u16).to_be_bytes());
            out.extend(&msg[start..end]);
            start = end;
        }
        out
    }

    fn u16be(n: usize) -> [u8; 2] {
        (n as u16).to_be_bytes()
    }

    /// A server_name extension with the given (type, name) entries.
    fn sni_ext(entries: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (t, n) in entries {
            list.push(*t);
            list.extend(u16be(n.len()));
            list.extend(*n);
        }
        let mut e = vec![0, 0];
        e.extend(u16be(list.len() + 2));
        e.extend(u16be(list.len()));
        e.extend(list);
        e
    }

    /// A ClientHello handshake message with `exts` (each a full extension) or none at all.
    fn hello_msg(exts: Option<&[Vec<u8>]>) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend([0xaa; 32]);
        body.push(32);
        body.extend([0x55; 32]);
        body.extend([0, 4, 0x13, 0x01, 0x13, 0x02]);
        body.extend([1, 0]);
        if let Some(exts) = exts {
            let all: Vec<u8> = exts.concat();
            body.extend(u16be(all.len()));
            body.extend(all);
        }
        let mut m = vec![1];
        m.extend(&(body.len() as u32).to_be_bytes()[1..]);
        m.extend(body);
        m
    }

    /// A single-record ClientHello naming `name` in its server_name extension.
    pub(crate) fn hello_with_name(name: &[u8]) -> Vec<u8> {
        let other = vec![0x00, 0x0b, 0, 2, 1, 0]; // ec_point_formats
        records(&hello_msg(Some(&[other, sni_ext(&[(0, name)])])), &[])
    }

    #[test]
    fn openssl_hellos() {
        let h13 = unhex(OPENSSL_TLS13);
        assert_eq!(h13.len(), 321);
        assert_eq!(sni(&h13).as_deref(), Some("www.example.com"), "lower-cased");
        assert_eq!(
            sni(&unhex(OPENSSL_TLS12)).as_deref(),
            Some("api.example.org")
        );
        assert_eq!(sni(&unhex(OPENSSL_NO_SNI)), None);
    }

    #[test]
    fn every_split_position_and_byte_by_byte() {
        for hex in [OPENSSL_TLS13, OPENSSL_TLS12, OPENSSL_NO_SNI] {
            let h = unhex(hex);
            let whole = feed(&h);
            for cut in 0..h.len() {
                let mut p = ClientHelloParser::new();
                match p.feed(&h[..cut]) {
                    Hello::NeedMore { at_least } => {
                        assert!(
                            at_least >= 1 && cut + at_least <= h.len(),
                            "cut {cut}: {at_least}"
                        )
                    }
                    other => panic!("cut {cut}: {other:?}"),
                }
                assert_eq!(p.feed(&h), whole, "cut {cut}");
            }
            let mut p = ClientHelloParser::new();
            for n in 0..h.len() {
                assert!(matches!(p.feed(&h[..n]), Hello::NeedMore { .. }));
            }
            assert_eq!(p.feed(&h), whole);
        }
    }

    #[test]
    fn split_across_records_at_every_position() {
        let h = unhex(OPENSSL_TLS13);
        let msg = message(&h);
        for cut in 1..msg.len() {
            let two = records(msg, &[cut]);
            assert_eq!(sni(&two).as_deref(), Some("www.example.com"), "cut {cut}");
            // And fed byte by byte.
            let mut p = ClientHelloParser::new();
            for n in 0..two.len() {
                assert!(
                    matches!(p.feed(&two[..n]), Hello::NeedMore { .. }),
                    "cut {cut} n {n}"
                );
            }
            assert!(matches!(p.feed(&two), Hello::Done { sni: Some(_) }));
        }
        // The name itself split over three records.
        let at = msg.windows(7).position(|w| w == b"Example").unwrap();
        assert_eq!(
            sni(&records(msg, &[at + 2, at + 4])).as_deref(),
            Some("www.example.com")
        );
        // One-byte records: the 4-byte header split too.
        let small = hello_msg(None);
        let cuts: Vec<usize> = (1..small.len()).collect();
        assert_eq!(sni(&records(&small, &cuts)), None);
    }

    #[test]
    fn more_than_64_records_are_read_within_the_byte_bound() {
        // A real hello in one-byte records: 316 records, 1 896 bytes, well inside the bound
        // (it used to be refused past 64 records and sent to the default route).
        let h = unhex(OPENSSL_TLS13);
        let msg = message(&h);
        let cuts: Vec<usize> = (1..msg.len()).collect();
        let split = records(msg, &cuts);
        assert!(msg.len() > 4 * MAX_RECORDS);
        assert!(split.len() <= ClientHelloParser::new().max_buffer_len());
        assert_eq!(sni(&split).as_deref(), Some("www.example.com"));
        // And fed byte by byte.
        let mut p = ClientHelloParser::new();
        for n in 0..split.len() {
            assert!(matches!(p.feed(&split[..n]), Hello::NeedMore { .. }), "{n}");
        }
        assert!(matches!(p.feed(&split), Hello::Done { sni: Some(_) }));
        // The bound is bytes: a hello of exactly the cap fits in MAX_RECORDS records, and
        // one more header would take the records past what an engine may buffer.
        let pad = |n: usize| [vec![0, 21], u16be(n).to_vec(), vec![0; n]].concat();
        let name = sni_ext(&[(0, b"big.example")]);
        let base = hello_msg(Some(&[pad(0), name.clone()])).len();
        let msg = hello_msg(Some(&[pad(DEFAULT_HELLO_CAP - base), name]));
        let cuts = |n: usize| -> Vec<usize> { (1..n).map(|i| i * 200).collect() };
        let fits = records(&msg, &cuts(MAX_RECORDS));
        assert_eq!(fits.len(), ClientHelloParser::new().max_buffer_len());
        assert_eq!(sni(&fits).as_deref(), Some("big.example"));
        let over = records(&msg, &cuts(MAX_RECORDS + 1));
        assert_eq!(invalid(&over), HelloError::TooFragmented);
        // Refused at the header that crosses the bound, before its payload is buffered.
        let at = (MAX_RECORDS) * (RECORD_HEADER_LEN + 200) + RECORD_HEADER_LEN;
        assert_eq!(
            ClientHelloParser::new().feed(&over[..at]),
            Hello::Invalid(HelloError::TooFragmented)
        );
    }

    #[test]
    fn a_trailing_dot_is_dropped_and_routes_match() {
        for name in [
            &b"api.example.com."[..],
            b"API.Example.COM.",
            b"api.example.com",
        ] {
            let h = hello_with_name(name);
            assert_eq!(sni(&h).as_deref(), Some("api.example.com"), "{name:?}");
        }
        // The longest name with its dot (254 bytes on the wire) is still a name.
        let long = format!("{0}.{0}.{0}.{1}.", "a".repeat(63), "a".repeat(61)).into_bytes();
        assert_eq!(long.len(), 254);
        assert_eq!(sni(&hello_with_name(&long)).map(|n| n.len()), Some(253));
        // Only one dot, and not the whole name.
        for bad in [&b"."[..], b"a..", b"api.example.com..", b"1.2.3.4."] {
            assert_eq!(
                feed(&hello_with_name(bad)),
                Hello::Invalid(HelloError::BadServerName),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // What the parser answers picks the exact and the wildcard route alike.
        let r = SniRoutes::new(&[
            (0, vec!["api.example.com".into()]),
            (1, vec!["*.example.com".into()]),
        ])
        .unwrap();
        let route = |name: &[u8]| match feed(&hello_with_name(name)) {
            Hello::Done { sni: Some(n) } => r.route(&n),
            other => panic!("{other:?}"),
        };
        assert_eq!(route(b"api.example.com."), Some(0));
        assert_eq!(route(b"www.example.com."), Some(1));
        assert_eq!(route(b"example.com."), None);
    }

    #[test]
    fn bytes_after_the_hello_do_not_matter() {
        let h = unhex(OPENSSL_TLS12);
        let mut more = h.clone();
        more.extend([23, 3, 3, 0, 5, 1, 2, 3, 4, 5]); // early data record
        assert_eq!(sni(&more).as_deref(), Some("api.example.org"));
        // A record longer than the message (another handshake message coalesced).
        let mut msg = message(&h).to_vec();
        msg.extend([0xfe; 10]);
        assert_eq!(sni(&records(&msg, &[])).as_deref(), Some("api.example.org"));
        // Decided without waiting for the rest of an over-long record.
        let mut partial = records(&msg, &[]);
        partial.truncate(partial.len() - 10);
        assert_eq!(sni(&partial).as_deref(), Some("api.example.org"));
    }

    #[test]
    fn not_tls() {
        assert_eq!(feed(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        assert_eq!(feed(b"SSH-2.0-OpenSSH"), Hello::NotTls);
        assert_eq!(
            feed(&[0x80, 0x2e, 0x01, 0x03, 0x01]),
            Hello::NotTls,
            "SSLv2 hello"
        );
        assert_eq!(feed(&[22]), Hello::NeedMore { at_least: 5 });
        assert_eq!(feed(&[22, 2]), Hello::NotTls);
        assert_eq!(feed(b""), Hello::NeedMore { at_least: 6 });
    }

    #[test]
    fn record_layer_errors() {
        use HelloError::*;
        assert_eq!(invalid(&[22, 3, 0]), RecordVersion, "SSL 3.0");
        assert_eq!(invalid(&[22, 3, 5, 0, 1]), RecordVersion);
        assert_eq!(invalid(&[22, 3, 1, 0, 0]), EmptyRecord);
        assert_eq!(invalid(&[22, 3, 1, 0x40, 0x01]), RecordTooLong);
        assert_eq!(
            invalid(&[22, 3, 1, 0, 1, 2]),
            NotClientHello,
            "ServerHello type"
        );
        let msg = hello_msg(None);
        let mut two = records(&msg, &[10]);
        two[5 + 10] = 21; // the second record is an alert
        assert_eq!(invalid(&two), UnexpectedRecord);
        two[5 + 10] = 22;
        two[5 + 10 + 1] = 2;
        assert_eq!(invalid(&two), RecordVersion);
    }

    #[test]
    fn oversized() {
        // Declared larger than the cap: refused at the handshake header, before any body.
        let hdr = [22, 3, 1, 0x40, 0x00, 1, 0, 0x40, 0x01];
        assert_eq!(invalid(&hdr), HelloError::TooLarge);
        let exactly = [22, 3, 1, 0x40, 0x00, 1, 0, 0x3f, 0xfc];
        assert!(
            matches!(feed(&exactly), Hello::NeedMore { .. }),
            "16 KiB is allowed"
        );
        assert_eq!(
            ClientHelloParser::with_cap(300).feed(&unhex(OPENSSL_TLS13)),
            Hello::Invalid(HelloError::TooLarge)
        );
        // A message of exactly the cap is read (across two records); one byte more is not.
        let pad = |n: usize| [vec![0, 21], u16be(n).to_vec(), vec![0; n]].concat();
        let name = sni_ext(&[(0, b"big.example")]);
        let base = hello_msg(Some(&[pad(0), name.clone()])).len();
        let msg = hello_msg(Some(&[pad(DEFAULT_HELLO_CAP - base), name.clone()]));
        assert_eq!(msg.len(), DEFAULT_HELLO_CAP);
        let two = records(&msg, &[9000]);
        assert_eq!(sni(&two).as_deref(), Some("big.example"));
        assert!(two.len() <= ClientHelloParser::new().max_buffer_len());
        let msg = hello_msg(Some(&[pad(DEFAULT_HELLO_CAP - base + 1), name]));
        assert_eq!(invalid(&records(&msg, &[9000])), HelloError::TooLarge);
    }

    #[test]
    fn truncated_and_inconsistent_lengths() {
        use HelloError::*;
        let msg = hello_msg(Some(&[sni_ext(&[(0, b"a.example")])]));
        // Shorten the declared message length by one: the extensions no longer fit.
        let mut m = msg.clone();
        m[3] -= 1;
        m.pop();
        assert_eq!(invalid(&records(&m, &[])), Extensions);
        // A message that ends inside the cipher suites.
        let mut m = msg[..4 + 2 + 32 + 1 + 32 + 3].to_vec();
        let len = (m.len() - 4) as u32;
        m[1..4].copy_from_slice(&len.to_be_bytes()[1..]);
        assert_eq!(invalid(&records(&m, &[])), Truncated);
        let body = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut m = msg.clone();
            f(&mut m);
            invalid(&records(&m, &[]))
        };
        assert_eq!(body(&|m| m[4] = 2), HelloVersion);
        assert_eq!(body(&|m| m[4 + 34] = 33), SessionId);
        assert_eq!(body(&|m| m[4 + 35 + 32 + 1] = 3), CipherSuites);
        assert_eq!(body(&|m| m[4 + 35 + 32 + 1] = 0), CipherSuites);
        assert_eq!(body(&|m| m[4 + 35 + 32 + 6] = 0), Compression);
        // Extensions: block length off by one; an extension running past the end.
        assert_eq!(body(&|m| m[4 + 35 + 32 + 9] += 1), Extensions);
        let ext_at = 4 + 35 + 32 + 10;
        assert_eq!(body(&|m| m[ext_at + 3] += 1), Extensions);
        let three = [hello_msg(Some(&[])), vec![0, 0, 0]].concat();
        let mut three = three;
        three[3] += 3;
        let n = three.len();
        three[n - 5] = 0;
        three[n - 4] = 3;
        assert_eq!(invalid(&records(&three, &[])), Extensions, "3 stray bytes");
    }

    #[test]
    fn server_name_extension_cases() {
        use HelloError::*;
        let one = |exts: &[Vec<u8>]| records(&hello_msg(Some(exts)), &[]);
        assert_eq!(
            sni(&records(&hello_msg(None), &[])),
            None,
            "no extensions block"
        );
        assert_eq!(sni(&one(&[])), None, "empty extensions block");
        let e = sni_ext(&[(0, b"A.Example.COM")]);
        assert_eq!(
            sni(&one(std::slice::from_ref(&e))).as_deref(),
            Some("a.example.com")
        );
        assert_eq!(invalid(&one(&[e.clone(), e.clone()])), DuplicateServerName);
        assert_eq!(
            invalid(&one(&[sni_ext(&[(0, b"a.com"), (0, b"b.com")])])),
            DuplicateServerName
        );
        // Unknown name types are skipped.
        assert_eq!(
            sni(&one(&[sni_ext(&[(7, b"\x00\x01"), (0, b"b.com")])])).as_deref(),
            Some("b.com")
        );
        assert_eq!(sni(&one(&[sni_ext(&[(7, b"xyz")])])), None);
        assert_eq!(invalid(&one(&[sni_ext(&[])])), ServerNameList);
        assert_eq!(
            invalid(&one(&[vec![0, 0, 0, 0]])),
            ServerNameList,
            "no list at all"
        );
        let mut bad = sni_ext(&[(0, b"a.com")]);
        bad[5] += 1; // list length disagrees with the extension length
        assert_eq!(invalid(&one(&[bad])), ServerNameList);
        let mut bad = sni_ext(&[(0, b"a.com")]);
        bad[8] += 1; // the name runs past the list
        assert_eq!(invalid(&one(&[bad])), ServerNameList);
    }

    #[test]
    fn name_validation() {
        let ok = |n: &[u8]| matches!(feed(&hello_with_name(n)), Hello::Done { sni: Some(_) });
        let long = format!("{0}.{0}.{0}.{1}", "a".repeat(63), "a".repeat(61)).into_bytes();
        assert_eq!(long.len(), 253);
        for good in [
            &b"a"[..],
            b"x-1.example",
            b"xn--bcher-kva.example",
            b"0a.example",
            b"WWW.EXAMPLE.COM",
            long.as_slice(),
        ] {
            assert!(ok(good), "{}", String::from_utf8_lossy(good));
        }
        let mut too_long = long.clone();
        too_long.push(b'a');
        let label64 = [b'a'; 64];
        for bad in [
            &b""[..],
            b"a..b",
            b".a",
            b"a..",
            b"-a.example",
            b"a-.example",
            b"a_b.example",
            b"a b",
            b"1.2.3.4",
            b"example.123",
            b"[::1]",
            b"::1",
            b"caf\xc3\xa9.example",
            b"a\0b",
            too_long.as_slice(),
            &label64,
        ] {
            assert_eq!(
                feed(&hello_with_name(bad)),
                Hello::Invalid(HelloError::BadServerName),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn answer_sizes() {
        // Returned by value on every feed: keep them small enough to copy, and as documented.
        assert_eq!(std::mem::size_of::<ServerName>(), 254);
        assert!(std::mem::size_of::<Hello>() <= 264);
        assert!(std::mem::size_of::<ClientHelloParser>() <= 320);
    }

    #[test]
    fn answers_are_final() {
        let h = unhex(OPENSSL_TLS13);
        let mut p = ClientHelloParser::new();
        let first = p.feed(&h);
        assert_eq!(p.feed(&h), first);
        let mut p = ClientHelloParser::new();
        assert_eq!(p.feed(b"GET"), Hello::NotTls);
        assert_eq!(p.feed(&h), Hello::NotTls);
        // A shorter buffer than before breaks the contract but is handled.
        let mut p = ClientHelloParser::new();
        let _ = p.feed(&h[..100]);
        assert!(matches!(p.feed(&h[..10]), Hello::NeedMore { .. }));
        assert_eq!(p.feed(&h), first);
    }

    #[test]
    fn routes() {
        let r = SniRoutes::new(&[
            (0, vec!["api.example.com".into(), "*.example.com".into()]),
            (1, vec!["*.example.com".into(), "WWW.Example.com".into()]),
            (2, vec!["*.b.example.com".into(), "example.com.".into()]),
            (3, vec!["api.example.com".into()]),
        ])
        .unwrap();
        assert_eq!(r.route("api.example.com"), Some(0));
        assert_eq!(r.route("API.EXAMPLE.COM."), Some(0));
        assert_eq!(
            r.route("www.example.com"),
            Some(1),
            "exact beats an earlier wildcard"
        );
        assert_eq!(r.route("a.example.com"), Some(0), "first wildcard wins");
        assert_eq!(
            r.route("example.com"),
            Some(2),
            "the wildcard needs a label"
        );
        assert_eq!(r.route("a.b.example.com"), Some(2), "only one label");
        assert_eq!(r.route("x.a.b.example.com"), None);
        assert_eq!(r.route("example.org"), None);
        assert_eq!(r.route(".example.com"), None);
        assert_eq!(r.route(""), None);
        assert_eq!(r.route("*.example.com"), None);
        assert_eq!(r.route(&"a".repeat(300)), None);
        assert_eq!(
            r.route("ÿ.example.com"),
            Some(0),
            "non-ASCII first label, matched as a label"
        );
        assert!(!r.is_empty());
        assert!(SniRoutes::new(&[]).unwrap().is_empty());
        for bad in [
            "*",
            "*.",
            "a.*.com",
            "*a.example.com",
            "**.example.com",
            "a..b",
            "a_b.com",
            "",
        ] {
            let e = SniRoutes::new(&[(5, vec!["ok.com".into(), bad.into()])]).unwrap_err();
            assert_eq!((e.route, e.pattern.as_str()), (5, bad));
            assert!(e.to_string().contains("not a host name"));
        }
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..400)) {
            check(&buf);
        }

        #[test]
        fn random_after_a_record_header_never_panic(
            tail in proptest::collection::vec(any::<u8>(), 0..400),
            len in 0u16..600,
        ) {
            let mut buf = vec![22, 3, 1];
            buf.extend(len.to_be_bytes());
            buf.push(1);
            buf.extend(tail);
            check(&buf);
        }

        #[test]
        fn mutated_real_hellos_never_panic(
            which in 0usize..3,
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut h = unhex([OPENSSL_TLS13, OPENSSL_TLS12, OPENSSL_NO_SNI][which]);
            for (i, b) in flips {
                let i = i.index(h.len());
                h[i] = b;
            }
            let split = records(message(&h), &[cut.index(h.len() - 5)]);
            check(&h);
            check(&split);
        }
    }

    /// No panic on the whole input or any prefix; prefixes agree with the whole.
    fn check(buf: &[u8]) {
        let whole = feed(buf);
        let mut p = ClientHelloParser::new();
        for n in 0..=buf.len() {
            match p.feed(&buf[..n]) {
                Hello::NeedMore { at_least } => assert!(at_least >= 1),
                other => {
                    assert_eq!(other, whole);
                    return;
                }
            }
        }
    }
}
