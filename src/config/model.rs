//! Stage three of configuration: the validated model every engine runs from.
//!
//! Fields carry their units (`Duration`, `SocketAddr`, `NonZeroU32`, [`ByteSize`]) and every
//! value is already in range: code that reads a [`Config`] checks nothing again.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::time::Duration;

use super::resolve::resolve_one;
use super::units::ByteSize;

/// Which engine moves the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EngineKind {
    /// io_uring where it works, otherwise tokio, with one warning saying why.
    Auto,
    /// Thread-per-core io_uring workers.
    Uring,
    /// tokio multi-thread runtime (baseline and fallback).
    Tokio,
    /// A thread per direction with blocking I/O (baseline).
    Std,
}

impl EngineKind {
    pub const NAMES: &'static str = "auto, uring, tokio, std";

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "auto" => Self::Auto,
            "uring" => Self::Uring,
            "tokio" => Self::Tokio,
            "std" => Self::Std,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Uring => "uring",
            Self::Tokio => "tokio",
            Self::Std => "std",
        }
    }
}

/// How the uring engine moves a direction's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataPath {
    /// Start on copy, move to splice on sustained full-buffer reads.
    Auto,
    /// socket → pipe → socket, never entering user space.
    Splice,
    /// recv into a registered buffer, send from it.
    Copy,
}

impl DataPath {
    pub const NAMES: &'static str = "auto, splice, copy";

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "auto" => Self::Auto,
            "splice" => Self::Splice,
            "copy" => Self::Copy,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Splice => "splice",
            Self::Copy => "copy",
        }
    }
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// TCP keepalive probe timings; `None` fields keep the kernel's defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Keepalive {
    pub idle: Option<Duration>,
    pub interval: Option<Duration>,
    pub count: Option<u32>,
}

/// Socket options applied to both the accepted and the upstream socket of a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpOptions {
    pub nodelay: bool,
    pub keepalive: Option<Keepalive>,
    /// `SO_LINGER` for ordinary closes. Resets always use a zero linger.
    pub linger: Option<Duration>,
    pub recv_buffer: Option<ByteSize>,
    pub send_buffer: Option<ByteSize>,
    /// `upload_rate`: bytes per second the upstream socket may send (client to upstream).
    pub upload_rate: Option<ByteSize>,
    /// `download_rate`: bytes per second the client socket may send (upstream to client).
    pub download_rate: Option<ByteSize>,
}

impl Default for TcpOptions {
    fn default() -> Self {
        Self {
            nodelay: true,
            keepalive: None,
            linger: None,
            recv_buffer: None,
            send_buffer: None,
            upload_rate: None,
            download_rate: None,
        }
    }
}

/// How a rule spreads its connections over the members of its upstream pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Balance {
    /// Smooth weighted round-robin (nginx's algorithm), per worker.
    RoundRobin,
    /// Fewest active connections per unit of weight, counted across every worker.
    LeastConn,
    /// Consistent (rendezvous) hash of the client IP: the same member order and hash give every
    /// host the same answer, and removing a member moves only that member's clients.
    SourceHash,
    /// Power of two random choices on active connections per unit of weight.
    RandomTwo,
}

impl Balance {
    pub const NAMES: &'static str = "round_robin, least_conn, source_hash, random_two";

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "round_robin" => Self::RoundRobin,
            "least_conn" => Self::LeastConn,
            "source_hash" => Self::SourceHash,
            "random_two" => Self::RandomTwo,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::RoundRobin => "round_robin",
            Self::LeastConn => "least_conn",
            Self::SourceHash => "source_hash",
            Self::RandomTwo => "random_two",
        }
    }
}

/// One upstream member as written: an address, or a host name whose every address is a member
/// (re-resolved every `resolve_interval`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberSpec {
    /// As written, e.g. `"10.0.0.5:8443"` or `"backend.svc:80"`.
    pub text: String,
    pub weight: NonZeroU32,
    /// Gets traffic only when every non-backup member is down.
    pub backup: bool,
    /// What `text` resolved to at load time (one address for a literal address).
    pub addrs: Vec<SocketAddr>,
}

impl MemberSpec {
    /// A member of weight 1, not a backup.
    pub fn new(text: impl Into<String>, addrs: Vec<SocketAddr>) -> Self {
        Self {
            text: text.into(),
            weight: NonZeroU32::MIN,
            backup: false,
            addrs,
        }
    }

    /// The member as written in a config: `text`, or `"host:first-last"` when it covers
    /// `ports` ports one-to-one.
    pub fn range_text(&self, ports: Option<u16>) -> String {
        match (ports, self.text.rsplit_once(':')) {
            (Some(n), Some((host, first))) if n > 1 => match first.parse::<u16>() {
                Ok(p) => format!("{host}:{p}-{}", u32::from(p) + u32::from(n) - 1),
                Err(_) => self.text.clone(),
            },
            _ => self.text.clone(),
        }
    }

    /// True when `text` is a host name (so DNS may change its addresses), not an address.
    pub fn is_name(&self) -> bool {
        self.text.parse::<SocketAddr>().is_err()
    }
}

/// Active health checks of a pool's members, off the data path: a TCP connect, and with
/// `send`/`expect` an exchange (HAProxy's `tcp-check send` / `expect string`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// Time between two probes of one member.
    pub interval: Duration,
    /// How long one probe's connect may take.
    pub timeout: Duration,
    /// Consecutive successes that bring a down member back.
    pub rise: NonZeroU32,
    /// Consecutive failures that take an up member out.
    pub fall: NonZeroU32,
    /// Bytes written once connected (the TOML string's UTF-8 bytes, its escapes applied).
    pub send: Option<String>,
    /// The probe passes only if the member's answer, within `timeout` and its first
    /// [`HEALTH_EXPECT_WINDOW`] bytes, contains this string. Without it, the connect (and
    /// writing `send`) is the check.
    pub expect: Option<String>,
}

/// Longest `health_check.send` and `health_check.expect`.
pub const MAX_HEALTH_PAYLOAD: usize = 1024;
/// How much of a member's answer a check reads looking for `expect`.
pub const HEALTH_EXPECT_WINDOW: usize = 4096;

pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(2);
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_HEALTH_RISE: NonZeroU32 = NonZeroU32::new(2).unwrap();
pub const DEFAULT_HEALTH_FALL: NonZeroU32 = NonZeroU32::new(3).unwrap();

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            interval: DEFAULT_HEALTH_INTERVAL,
            timeout: DEFAULT_HEALTH_TIMEOUT,
            rise: DEFAULT_HEALTH_RISE,
            fall: DEFAULT_HEALTH_FALL,
            send: None,
            expect: None,
        }
    }
}

pub const DEFAULT_CONNECT_RETRIES: u32 = 2;
pub const DEFAULT_MAX_FAILS: u32 = 1;
pub const DEFAULT_FAIL_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_RESOLVE_INTERVAL: Duration = Duration::from_secs(30);
/// Per-rule cap on live connections, on every engine, when the config sets none.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 8192;

/// Highest `max_connections` of a rule (and of the deprecated `[uring] max_connections`).
pub const MAX_RULE_CONNECTIONS: u32 = 1 << 20;
/// Highest `weight` of one member.
pub const MAX_WEIGHT: u32 = 1000;
/// Highest `connect_retries`.
pub const MAX_CONNECT_RETRIES: u32 = 16;
/// Highest `max_fails`.
pub const MAX_MAX_FAILS: u32 = 1000;
/// Highest `health_check.rise` and `health_check.fall`.
pub const MAX_HEALTH_RISE_FALL: u32 = 100;

// Longest value of each duration key: far beyond any sensible setting, and short enough that
// adding it to an `Instant` or passing it to the kernel can never overflow.
/// Longest `connect_timeout`.
pub const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(3600);
/// Longest `idle_timeout` other than `"0s"` (never): a week.
pub const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest `shutdown_grace`.
pub const MAX_SHUTDOWN_GRACE: Duration = Duration::from_secs(24 * 3600);
/// Longest `shutdown_delay`.
pub const MAX_SHUTDOWN_DELAY: Duration = Duration::from_secs(3600);
/// Longest `reload_drain_timeout` other than unset (no limit): a week.
pub const MAX_RELOAD_DRAIN_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest `linger` (`SO_LINGER` blocks a close for at most this long).
pub const MAX_LINGER: Duration = Duration::from_secs(3600);
/// Longest `fail_timeout`.
pub const MAX_FAIL_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Shortest and longest `resolve_interval` other than `"0s"` (only at start).
pub const RESOLVE_INTERVAL_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(24 * 3600);
/// Shortest and longest `first_byte_timeout` other than `"0s"` (off).
pub const FIRST_BYTE_TIMEOUT_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(3600);
/// Longest `health_check.interval` and `health_check.timeout`.
pub const MAX_HEALTH_TIME: Duration = Duration::from_secs(3600);

/// Where a rule forwards to: a pool of members and how to choose among them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    /// Never empty.
    pub members: Vec<MemberSpec>,
    pub balance: Balance,
    /// Further members tried after a refused, timed-out or unreachable connect (never the same
    /// member twice in one session).
    pub connect_retries: u32,
    /// Connect failures within `fail_timeout` that take a member out for `fail_timeout`
    /// (0: passive health checks off).
    pub max_fails: u32,
    pub fail_timeout: Duration,
    pub health_check: Option<HealthCheck>,
    /// How often host names are resolved again; `None`: only at start.
    pub resolve_interval: Option<Duration>,
    /// Passive health: an established connection on which the client has sent bytes and the
    /// member sent none back within this long is closed (`first_byte_timeout`) and counts
    /// as a failure of the member, as a failed connect does (`max_fails`). `None`: off.
    pub first_byte_timeout: Option<Duration>,
    /// Every member was written with a port range as long as the rule's listen range: a
    /// connection to listen port `first + i` goes to the member's port `+ i` (each member's
    /// `addrs` hold its first port). `false`: every listen port goes to the members' ports.
    pub one_to_one: bool,
    /// How connections to the members leave the host: `transparent`, `source`, `mark`,
    /// `interface`, `upstream_mptcp`.
    pub egress: Egress,
}

impl Upstream {
    /// A pool of the given members with every other setting at its default.
    pub fn with_members(members: Vec<MemberSpec>) -> Self {
        Self {
            members,
            balance: Balance::RoundRobin,
            connect_retries: DEFAULT_CONNECT_RETRIES,
            max_fails: DEFAULT_MAX_FAILS,
            fail_timeout: DEFAULT_FAIL_TIMEOUT,
            health_check: None,
            resolve_interval: Some(DEFAULT_RESOLVE_INTERVAL),
            first_byte_timeout: None,
            one_to_one: false,
            egress: Egress::PLAIN,
        }
    }

    /// Every address the members resolved to at load time, in member order.
    pub fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.members.iter().flat_map(|m| m.addrs.iter().copied())
    }
}

/// Whether (and how) the upstream is told the client's address with a PROXY protocol header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum ProxyProtocol {
    #[default]
    Off,
    /// The text header (`PROXY TCP4 …\r\n`).
    V1,
    /// The binary header.
    V2,
}

impl ProxyProtocol {
    pub const NAMES: &'static str = "off, v1, v2";

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "off" => Self::Off,
            "v1" => Self::V1,
            "v2" => Self::V2,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::V1 => "v1",
            Self::V2 => "v2",
        }
    }
}

/// `accept_proxy = true`: every connection must start with a PROXY protocol header (v1 or
/// v2), and only from a trusted source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcceptProxy {
    /// Sources allowed to send a header; a connection from anywhere else is rejected before
    /// anything is read (`untrusted_proxy`). Never empty.
    pub trusted: Vec<crate::vocab::Cidr>,
}

pub const DEFAULT_PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(3);
/// Shortest and longest `proxy_header_timeout`: a load balancer sends its header with the
/// first packet, so even a slow path needs far less than a minute, and a long wait only holds
/// a slot for a client that never sends one.
pub const PROXY_HEADER_TIMEOUT_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(60);
/// Default `per_ip_prefix_v6`: a /64 is one client.
pub const DEFAULT_PREFIX_V6: u8 = 64;
/// Default `per_ip_prefix_v4`: an address is one client.
pub const DEFAULT_PREFIX_V4: u8 = 32;

/// Highest `max_connections_per_ip` (the highest `max_connections` of a rule).
pub const MAX_CONNECTIONS_PER_IP: u32 = MAX_RULE_CONNECTIONS;

/// Who may connect, and how much: checked on the client's address (the PROXY header's source
/// when `accept_proxy` is on) before any upstream socket exists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admission {
    /// With any entry, only these sources are admitted.
    pub allow: Vec<crate::vocab::Cidr>,
    /// Never admitted (wins over `allow`).
    pub deny: Vec<crate::vocab::Cidr>,
    /// Connections one client address may hold at once.
    pub max_connections_per_ip: Option<NonZeroU32>,
    /// New connections one client address may open per period (token bucket; a fresh
    /// address may open what the rate allows in one second, at least 1, at once: see
    /// [`crate::vocab::Rate::burst`]).
    pub max_new_connections_per_ip: Option<crate::vocab::Rate>,
    /// IPv6 clients sharing this many leading bits are one client for the per-client limits
    /// (1..=128; 64 by default: one host, or one attacker, usually owns a whole /64).
    pub per_ip_prefix_v6: u8,
    /// IPv4 clients sharing this many leading bits are one client (1..=32; 32 by default).
    pub per_ip_prefix_v4: u8,
}

impl Default for Admission {
    fn default() -> Self {
        Self {
            allow: Vec::new(),
            deny: Vec::new(),
            max_connections_per_ip: None,
            max_new_connections_per_ip: None,
            per_ip_prefix_v6: DEFAULT_PREFIX_V6,
            per_ip_prefix_v4: DEFAULT_PREFIX_V4,
        }
    }
}

impl Admission {
    /// Whether any check applies at all (a rule without one pays nothing for them).
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty()
            && self.deny.is_empty()
            && self.max_connections_per_ip.is_none()
            && self.max_new_connections_per_ip.is_none()
    }
}

/// Most ports one rule's `listen` range may cover: each port costs a listening socket per
/// worker (an fd and a few KiB of kernel memory), and 10 000 ports × a few workers is already
/// tens of thousands of fds.
pub const MAX_RANGE_PORTS: u16 = 10_000;

/// A rule's listen side: one address, or one IP with a contiguous range of ports
/// (`"0.0.0.0:10000-10099"`). A range is one rule (one pool, one set of metrics) with a
/// listener per port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Listen {
    /// The address of the first (or only) port.
    pub addr: SocketAddr,
    /// Ports covered, from `addr.port()` on: 1 for a single port, at most [`MAX_RANGE_PORTS`].
    pub count: u16,
}

impl Listen {
    /// One address, one port.
    pub fn single(addr: SocketAddr) -> Self {
        Self { addr, count: 1 }
    }

    /// Resolves `"host:port"` or `"host:first-last"` (see [`split_port_range`]).
    ///
    /// # Errors
    /// A message for the operator.
    pub fn resolve(text: &str) -> Result<Self, String> {
        let (base, count) = split_port_range(text)?;
        let addr = resolve_one(&base)?;
        if count > 1 && addr.port() == 0 {
            return Err(format!(
                "{text:?}: a port range cannot start at port 0 (port 0 asks the kernel for any one port)"
            ));
        }
        Ok(Self { addr, count })
    }

    /// True when the rule covers more than one port.
    pub fn is_range(&self) -> bool {
        self.count > 1
    }

    /// Ports covered, as an inclusive range.
    pub fn ports(&self) -> std::ops::RangeInclusive<u16> {
        let first = self.addr.port();
        first..=first + (self.count - 1)
    }

    /// The address of every port, in order.
    pub fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.ports().map(|p| SocketAddr::new(self.addr.ip(), p))
    }

    pub fn ip(&self) -> std::net::IpAddr {
        self.addr.ip()
    }

    /// The first (or only) port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn is_ipv6(&self) -> bool {
        self.addr.is_ipv6()
    }

    /// The first port both cover, if any (port 0 never collides).
    pub(super) fn common_port(&self, other: &Self) -> Option<u16> {
        if self.port() == 0 || other.port() == 0 {
            return None;
        }
        let (a, b) = (self.ports(), other.ports());
        let lo = *a.start().max(b.start());
        (lo <= *a.end().min(b.end())).then_some(lo)
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_range() {
            write!(f, "{}-{}", self.addr, self.ports().end())
        } else {
            write!(f, "{}", self.addr)
        }
    }
}

impl std::str::FromStr for Listen {
    type Err = String;

    /// An IP literal with a port or a port range (no name lookup).
    fn from_str(text: &str) -> Result<Self, String> {
        let (base, count) = split_port_range(text)?;
        let addr: SocketAddr = base
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address with a port"))?;
        Ok(Self { addr, count })
    }
}

/// Splits `"host:first-last"` into `("host:first", ports)`; `"host:port"` gives 1 port. A range
/// of one port (`"host:80-80"`) is that port.
///
/// # Errors
/// A malformed range, `first > last`, or more than [`MAX_RANGE_PORTS`] ports.
pub fn split_port_range(text: &str) -> Result<(String, u16), String> {
    let Some((host, ports)) = text.rsplit_once(':') else {
        return Ok((text.to_string(), 1));
    };
    let Some((first, last)) = ports.split_once('-') else {
        return Ok((text.to_string(), 1));
    };
    let port = |p: &str| {
        p.parse::<u16>()
            .map_err(|_| format!("{text:?}: invalid port {p:?} in the range {ports:?}"))
    };
    let (first, last) = (port(first)?, port(last)?);
    if first > last {
        return Err(format!(
            "{text:?}: the range {ports:?} runs backwards; write the lower port first ({last}-{first})"
        ));
    }
    let count = u32::from(last - first) + 1;
    if count > u32::from(MAX_RANGE_PORTS) {
        return Err(format!(
            "{text:?}: the range covers {count} ports, more than the {MAX_RANGE_PORTS} one rule may have; split it over several rules"
        ));
    }
    Ok((format!("{host}:{first}"), count as u16))
}

/// One `[[rule.route]]`: the TLS server names whose connections go to its own pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// `name`, or the first pattern; unique within the rule, never `"default"`.
    pub name: String,
    /// Exact names and `*.` wildcards, as written (matched case-insensitively).
    pub sni: Vec<String>,
    pub upstream: Upstream,
}

/// The name of a rule's own upstream when it has routes (and of every rule's only route).
pub const DEFAULT_ROUTE: &str = "default";

/// One listen address (or port range) forwarded to one upstream pool, or routed by TLS
/// server name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub listen: Listen,
    /// The rule's own pool: the default route. `None` only with routes (then a connection no
    /// route matches is rejected as `no_route`).
    pub upstream: Option<Upstream>,
    /// SNI routes, tried before the default (empty: the ClientHello is not read).
    pub routes: Vec<Route>,
    /// Listen with MPTCP (`mptcp = true`): MPTCP and plain TCP clients alike are served.
    pub mptcp: bool,
    pub tcp: TcpOptions,
    pub connect_timeout: Duration,
    /// `None`: connections may stay idle forever.
    pub idle_timeout: Option<Duration>,
    /// Hexdump both directions into this file (forces the copy path).
    pub tap: Option<PathBuf>,
    /// Live connections this rule may hold at once, across every worker and engine; one more
    /// is reset at accept and counted as `rejected{reason="max_connections"}`.
    pub max_connections: NonZeroU32,
    /// The PROXY protocol header sent to the upstream before the first relayed byte.
    pub proxy_protocol: ProxyProtocol,
    /// Require a PROXY protocol header from the client (a load balancer in front).
    pub accept_proxy: Option<AcceptProxy>,
    /// How long the PROXY header and the ClientHello (with routes) may take to arrive, from
    /// accept (`proxy_header_timeout`).
    pub header_timeout: Duration,
    /// ACLs and per-client limits.
    pub admission: Admission,
}

impl Rule {
    /// `first_byte_timeout`: the same in every pool of the rule.
    pub fn first_byte_timeout(&self) -> Option<Duration> {
        self.pools().find_map(|(_, up)| up.first_byte_timeout)
    }

    /// Every pool of the rule with its route name: the routes in order, then the default.
    pub fn pools(&self) -> impl Iterator<Item = (&str, &Upstream)> + '_ {
        self.routes
            .iter()
            .map(|r| (r.name.as_str(), &r.upstream))
            .chain(self.upstream.iter().map(|u| (DEFAULT_ROUTE, u)))
    }
}

/// io_uring engine sizing, per worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UringTuning {
    pub ring_entries: u32,
    pub buffer_size: ByteSize,
    pub buffers: u32,
    pub pipe_size: ByteSize,
    pub pipes: u32,
    /// `mode = "auto"`: consecutive full-buffer reads that move a direction to splice.
    pub auto_up_reads: u8,
    /// `mode = "auto"`: consecutive small pumps (pipe drained) that move it back to copy.
    pub auto_down_pumps: u8,
    /// Pin each worker thread to its own CPU (when there are no more workers than CPUs).
    pub pin: bool,
    /// How long a worker polls for completions before it sleeps in the kernel (0: never).
    pub busy_poll: Duration,
    /// Where a worker sleeps when it has nothing to do.
    pub wait: UringWait,
}

/// Where an io_uring worker sleeps. The choice decides how the scheduler places the worker
/// when a socket wakes it (docs/TUNING.md, "Round trips and the scheduler").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UringWait {
    /// In `io_uring_enter`, for completions: io_uring's task-work wake-up carries no hint
    /// about the waker, so the worker goes back to its previous CPU when that one is idle.
    Ring,
    /// In `epoll_wait` on the worker's own sockets: a socket's wake-up reaches the worker
    /// with the "synchronous" hint, which lets the scheduler run it on the waker's CPU.
    Epoll,
}

impl UringWait {
    pub const NAMES: &'static str = "ring, epoll";

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "ring" => Self::Ring,
            "epoll" => Self::Epoll,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ring => "ring",
            Self::Epoll => "epoll",
        }
    }
}

impl Default for UringTuning {
    fn default() -> Self {
        // 64 × 32 KiB = 2 MiB of registered buffers per worker, plus about 140 KiB of ring
        // memory (SQEs, CQ ring, buffer ring) the kernel also charges to RLIMIT_MEMLOCK:
        // three workers fit under the 8 MiB an unprivileged user gets by default, a fourth
        // does not (it warns and runs with unregistered buffers).
        Self {
            ring_entries: 1024,
            buffer_size: ByteSize(32 << 10),
            buffers: 64,
            pipe_size: ByteSize(1 << 20),
            pipes: 16,
            auto_up_reads: 4,
            auto_down_pumps: 8,
            pin: true,
            busy_poll: Duration::ZERO,
            wait: UringWait::Ring,
        }
    }
}

/// The upstream side of a pool. The default leaves every choice to the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Egress {
    /// Connect from the client's own address (`IP_TRANSPARENT` / `IPV6_TRANSPARENT`).
    pub transparent: bool,
    /// Connect from this local address (ignored with `transparent`, which sets it per client).
    pub source: Option<IpAddr>,
    /// `SO_MARK`.
    pub mark: Option<u32>,
    /// `SO_BINDTODEVICE`.
    pub interface: Option<String>,
    /// Open the socket as MPTCP; the kernel falls back to TCP where the server lacks it.
    pub mptcp: bool,
}

impl Egress {
    /// No options: the kernel picks address, route and device.
    pub const PLAIN: Self = Self {
        transparent: false,
        source: None,
        mark: None,
        interface: None,
        mptcp: false,
    };

    /// Whether any of these options needs `CAP_NET_ADMIN` in the process that opens sockets.
    pub fn needs_net_admin(&self) -> bool {
        self.transparent || self.mark.is_some()
    }
}

/// The validated configuration every engine runs from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// `None`: one worker per CPU the process may run on.
    pub workers: Option<NonZeroUsize>,
    pub engine: EngineKind,
    pub mode: DataPath,
    pub shutdown_grace: Duration,
    /// After the first SIGINT/SIGTERM, how long to keep accepting while `/healthz` answers
    /// 503 `draining`, so a BGP speaker or load balancer takes the host out before its
    /// listeners close; `shutdown_grace` starts after it. Zero (the default): close at once.
    pub shutdown_delay: Duration,
    /// How long the connections of an older config generation may run on after a reload
    /// (HAProxy's `hard-stop-after`); `None` (the default): until they end by themselves.
    pub reload_drain_timeout: Option<Duration>,
    /// The admin listener (`/metrics`, `/healthz`, `/stats`, `/histograms`); off unless set.
    /// The documented address is [`DEFAULT_ADMIN`], which `ringfwd stats` also defaults to.
    pub admin: Option<SocketAddr>,
    pub admin_allow_remote: bool,
    /// `admin_token_file`: the file, and the bearer token read from it when the config was
    /// loaded (at start and at every reload). `None`: the state-changing admin endpoints
    /// (`POST /reload`, the member API) need no token, which is allowed on loopback only.
    pub admin_token: Option<(PathBuf, AdminToken)>,
    pub log_format: LogFormat,
    pub access_log: bool,
    /// Periodic HdrHistogram interval log, if configured.
    pub hdr_log: Option<HdrLogConfig>,
    /// Who `run` becomes once it is set up, when started as root (`user` / `group` keys,
    /// resolved at load time). `None`: no switch.
    pub run_as: Option<crate::privdrop::RunAs>,
    /// A unix socket on which `run` hands its listening sockets to `ringfwd run --takeover`
    /// (a binary upgrade). `None`: no takeover possible.
    pub control_socket: Option<PathBuf>,
    /// Reload when the `--config` file changes (polled; follows symlinks, so a Kubernetes
    /// ConfigMap update is seen).
    pub watch_config: bool,
    pub uring: UringTuning,
    pub rules: Vec<Rule>,
    /// Things that work but should be changed (deprecated keys), each one line worded
    /// `FILE:LINE:COL: KEY is deprecated: ...`; `run` logs them, `check` prints them.
    pub warnings: Vec<String>,
}

/// The bearer token the state-changing admin endpoints demand (`admin_token_file`).
///
/// Never printed (its `Debug` hides it), and compared in constant time: how long a wrong
/// guess takes says nothing about how much of it was right.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(Vec<u8>);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(…)")
    }
}

impl AdminToken {
    /// The longest token accepted: a header line, not a file to load whole.
    pub const MAX_LEN: usize = 4096;

    pub fn new(token: impl Into<Vec<u8>>) -> Self {
        Self(token.into())
    }

    /// Whether an `Authorization` header value is `Bearer <this token>`.
    pub fn admits(&self, header: Option<&[u8]>) -> bool {
        let Some(given) = header.and_then(|h| h.strip_prefix(b"Bearer ".as_slice())) else {
            return false;
        };
        // Every byte of the longer of the two is looked at whatever the lengths, and the
        // lengths are compared into the same accumulator: no early exit.
        let n = given.len().max(self.0.len());
        let mut diff = u8::from(given.len() != self.0.len());
        for i in 0..n {
            let a = given.get(i).copied().unwrap_or(0);
            let b = self.0.get(i).copied().unwrap_or(0);
            diff |= a ^ b;
        }
        std::hint::black_box(diff) == 0
    }
}

/// Where the HdrHistogram interval log goes and how often an interval is written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HdrLogConfig {
    pub path: PathBuf,
    pub interval: Duration,
}

/// The admin address the docs suggest (`admin = "127.0.0.1:9100"`) and `ringfwd stats` asks
/// by default. The admin listener itself stays off unless `admin` is set.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9100";
pub const DEFAULT_HDR_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Shortest and longest `hdr_log_interval`: below 100 ms the log is mostly headers and
/// compression cost; above an hour it is no longer an interval log.
pub const HDR_LOG_INTERVAL_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(3600);

pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

impl Config {
    /// The most connections the whole process may hold at once: the rules' `max_connections`
    /// summed, capped at 2^20. What one uring worker reserves its connection table for, since
    /// any worker may be handed every connection of a rule.
    pub fn live_connections_bound(&self) -> usize {
        self.rules
            .iter()
            .map(|r| r.max_connections.get() as usize)
            .sum::<usize>()
            .min(MAX_RULE_CONNECTIONS as usize)
    }
}
