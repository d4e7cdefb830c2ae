//! Configuration: the TOML file and the `run` flags, turned into one validated [`Config`].
//!
//! Two stages, as in ripgrep's low/high args: [`raw`] mirrors the file as written, and
//! [`Config::from_raw`] resolves addresses, applies defaults and cross-checks, producing fields
//! that carry their units (`Duration`, `SocketAddr`, `NonZeroUsize`, [`ByteSize`]). Every error
//! names the file, the line and the key, in one line an operator can act on.

mod hint;
pub mod raw;
pub mod units;

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use units::{ByteSize, format_duration, parse_duration, parse_size};

use raw::{KeepaliveValue, MemberValue, RawConfig, RawRule, UpstreamValue, WorkersValue};

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
}

impl Default for TcpOptions {
    fn default() -> Self {
        Self {
            nodelay: true,
            keepalive: None,
            linger: None,
            recv_buffer: None,
            send_buffer: None,
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
    pub trusted: Vec<crate::session::acl::Cidr>,
}

pub const DEFAULT_PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(3);
/// Shortest and longest `proxy_header_timeout`: a load balancer sends its header with the
/// first packet, so even a slow path needs far less than a minute, and a long wait only holds
/// a slot for a client that never sends one.
pub const PROXY_HEADER_TIMEOUT_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(60);
/// Highest `max_connections_per_ip` (the highest `max_connections` of a rule).
pub const MAX_CONNECTIONS_PER_IP: u32 = MAX_RULE_CONNECTIONS;

/// Who may connect, and how much: checked on the client's address (the PROXY header's source
/// when `accept_proxy` is on) before any upstream socket exists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admission {
    /// With any entry, only these sources are admitted.
    pub allow: Vec<crate::session::acl::Cidr>,
    /// Never admitted (wins over `allow`).
    pub deny: Vec<crate::session::acl::Cidr>,
    /// Connections one client address may hold at once.
    pub max_connections_per_ip: Option<NonZeroU32>,
    /// New connections one client address may open per period (token bucket; a fresh
    /// address may open what the rate allows in one second, at least 1, at once: see
    /// [`crate::session::limits::Rate::burst`]).
    pub max_new_connections_per_ip: Option<crate::session::limits::Rate>,
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
            per_ip_prefix_v6: crate::session::limits::DEFAULT_PREFIX_V6,
            per_ip_prefix_v4: crate::session::limits::DEFAULT_PREFIX_V4,
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
    fn common_port(&self, other: &Self) -> Option<u16> {
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
        }
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

/// A configuration error, already worded for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Where a value came from, for error messages.
struct Source<'a> {
    name: &'a str,
    text: &'a str,
    /// Warnings found deep in the parse (an upstream name that does not resolve yet), moved
    /// to [`Config::warnings`] at the end.
    warnings: std::cell::RefCell<Vec<String>>,
}

impl Source<'_> {
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before
            .rfind('\n')
            .map_or(before.len(), |nl| before.len() - nl - 1)
            + 1;
        (line, col)
    }

    /// The key written at the start of the given line, if any.
    fn key_on_line(&self, line: usize) -> Option<String> {
        let text = self.text.lines().nth(line.checked_sub(1)?)?;
        let (key, _) = text.split_once('=')?;
        let key = key.trim();
        (!key.is_empty() && !key.starts_with('#')).then(|| key.to_string())
    }

    fn error_at(
        &self,
        span: std::ops::Range<usize>,
        key: &str,
        msg: impl fmt::Display,
    ) -> ConfigError {
        ConfigError {
            message: self.at(span, key, msg),
        }
    }

    /// `FILE:LINE:COL: KEY: MSG`.
    fn at(&self, span: std::ops::Range<usize>, key: &str, msg: impl fmt::Display) -> String {
        let (line, col) = self.line_col(span.start);
        format!("{}:{line}:{col}: {key}: {msg}", self.name)
    }

    /// A duration key checked against its range. `zero`: what `"0s"` means where it is
    /// allowed (`None`: it is not); the caller maps a zero to its meaning.
    fn duration(
        &self,
        s: &toml::Spanned<raw::DurationValue>,
        key: &str,
        zero: Option<&str>,
        range: std::ops::RangeInclusive<Duration>,
    ) -> Result<Duration, ConfigError> {
        let d = s.get_ref().0;
        if (d.is_zero() && zero.is_some()) || (!d.is_zero() && range.contains(&d)) {
            return Ok(d);
        }
        let (lo, hi) = (
            format_duration(*range.start()),
            format_duration(*range.end()),
        );
        let want = match zero {
            None => format!("more than 0s and at most {hi}"),
            Some(_) if range.start().is_zero() => format!("0s..={hi}"),
            Some(meaning) => format!("0s ({meaning}) or {lo}..={hi}"),
        };
        Err(self.error_at(
            s.span(),
            key,
            format!("must be {want}, got {}", format_duration(d)),
        ))
    }

    /// An integer key checked against `lo..=hi`.
    fn count(
        &self,
        s: &toml::Spanned<i64>,
        key: &str,
        lo: u32,
        hi: u32,
    ) -> Result<u32, ConfigError> {
        u32::try_from(*s.get_ref())
            .ok()
            .filter(|v| (lo..=hi).contains(v))
            .ok_or_else(|| {
                self.error_at(
                    s.span(),
                    key,
                    format!("must be {lo}..={hi}, got {}", s.get_ref()),
                )
            })
    }
}

impl Config {
    /// Reads and validates a TOML file.
    ///
    /// # Errors
    /// Unreadable file, TOML syntax, unknown keys, bad values, unresolvable addresses: one
    /// line naming the file, line and key.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            message: format!("{}: cannot read config: {e}", path.display()),
        })?;
        Self::parse(&path.display().to_string(), &text)
    }

    /// Parses and validates TOML text; `name` is used in error messages.
    ///
    /// # Errors
    /// See [`Config::load`].
    pub fn parse(name: &str, text: &str) -> Result<Self, ConfigError> {
        let src = Source {
            name,
            text,
            warnings: std::cell::RefCell::new(Vec::new()),
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let mut msg = e.message().trim().to_string();
            match e.span() {
                Some(span) => {
                    let (line, col) = src.line_col(span.start);
                    let line_text = text.lines().nth(line - 1).unwrap_or("");
                    if let Some(hint) = hint::for_error(&msg, line_text) {
                        msg = format!("{msg}; {hint}");
                    }
                    let key = if msg.starts_with("unknown field") {
                        None
                    } else {
                        src.key_on_line(line)
                    };
                    match key {
                        Some(key) => ConfigError {
                            message: format!("{name}:{line}:{col}: {key}: {msg}"),
                        },
                        None => ConfigError {
                            message: format!("{name}:{line}:{col}: {msg}"),
                        },
                    }
                }
                None => ConfigError {
                    message: format!("{name}: {msg}"),
                },
            }
        })?;
        Self::from_raw(raw, &src)
    }

    fn from_raw(raw: RawConfig, src: &Source<'_>) -> Result<Self, ConfigError> {
        let workers = match raw.workers {
            None | Some(WorkersValue::Auto) => None,
            Some(WorkersValue::Count(n)) => Some(n),
        };
        let engine = match &raw.engine {
            None => EngineKind::Auto,
            Some(s) => EngineKind::parse(s.get_ref()).ok_or_else(|| {
                src.error_at(
                    s.span(),
                    "engine",
                    format!(
                        "unknown engine {:?} (expected one of {})",
                        s.get_ref(),
                        EngineKind::NAMES
                    ),
                )
            })?,
        };
        let mode = match &raw.mode {
            None => DataPath::Auto,
            Some(s) => DataPath::parse(s.get_ref()).ok_or_else(|| {
                src.error_at(
                    s.span(),
                    "mode",
                    format!(
                        "unknown mode {:?} (expected one of {})",
                        s.get_ref(),
                        DataPath::NAMES
                    ),
                )
            })?,
        };
        let log_format = match &raw.log_format {
            None => LogFormat::Text,
            Some(s) => match s.get_ref().as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => {
                    return Err(src.error_at(
                        s.span(),
                        "log_format",
                        format!("unknown format {other:?} (expected text or json)"),
                    ));
                }
            },
        };
        let admin_allow_remote = raw.admin_allow_remote.unwrap_or(false);
        let admin = match &raw.admin {
            None => None,
            Some(s) => {
                let addr =
                    resolve_one(s.get_ref()).map_err(|m| src.error_at(s.span(), "admin", m))?;
                if !addr.ip().is_loopback() && !admin_allow_remote {
                    return Err(src.error_at(
                        s.span(),
                        "admin",
                        format!("{addr} is not a loopback address; set admin_allow_remote = true to expose metrics beyond this host"),
                    ));
                }
                Some(addr)
            }
        };
        let hdr_log = hdr_log(raw.hdr_log.as_ref(), raw.hdr_log_interval.as_ref(), src)?;
        let run_as = run_as(raw.user.as_ref(), raw.group.as_ref(), src)?;
        let shutdown_grace = match &raw.shutdown_grace {
            None => DEFAULT_SHUTDOWN_GRACE,
            Some(d) => src.duration(
                d,
                "shutdown_grace",
                Some("close at once"),
                Duration::ZERO..=MAX_SHUTDOWN_GRACE,
            )?,
        };
        let shutdown_delay = match &raw.shutdown_delay {
            None => Duration::ZERO,
            Some(d) => src.duration(
                d,
                "shutdown_delay",
                Some("close the listeners at once"),
                Duration::ZERO..=MAX_SHUTDOWN_DELAY,
            )?,
        };
        let reload_drain_timeout = raw
            .reload_drain_timeout
            .as_ref()
            .map(|d| {
                src.duration(
                    d,
                    "reload_drain_timeout",
                    Some("cut at once"),
                    Duration::ZERO..=MAX_RELOAD_DRAIN_TIMEOUT,
                )
            })
            .transpose()?;
        let mut raw_uring = raw.uring.unwrap_or_default();
        let mut warnings = Vec::new();
        // `[uring] max_connections` was a per-worker table size; it survives as the default of
        // the per-rule cap so that old files keep their limit, with a warning.
        let default_max_connections = match raw_uring.max_connections.take() {
            None => NonZeroU32::new(DEFAULT_MAX_CONNECTIONS).expect("non-zero"),
            Some(m) => {
                let n = src.count(&m, "uring.max_connections", 1, MAX_RULE_CONNECTIONS)?;
                warnings.push(src.at(
                    m.span(),
                    "uring.max_connections is deprecated",
                    format!(
                        "it is now the default max_connections of each [[rule]] that sets none ({n}); set max_connections in the rules instead"
                    ),
                ));
                NonZeroU32::new(n).expect("checked at least 1")
            }
        };
        let uring = uring_tuning(raw_uring, src)?;

        let mut rules = Vec::with_capacity(raw.rules.len());
        for (i, r) in raw.rules.into_iter().enumerate() {
            // Duplicates are found after conversion; keep where the second one was written.
            let name_span = r
                .name
                .as_ref()
                .map_or_else(|| r.listen.span(), |n| n.span());
            let listen_span = r.listen.span();
            let rule = rule_from_raw(i, r, default_max_connections, src)?;
            if let Some(prev) = rules.iter().find(|p: &&Rule| p.name == rule.name) {
                return Err(src.error_at(
                    name_span,
                    "name",
                    format!(
                        "rule name {:?} is used twice (listen {} and {})",
                        rule.name, prev.listen, rule.listen
                    ),
                ));
            }
            if let Some(msg) = rules.iter().find_map(|p: &Rule| listen_conflict(p, &rule)) {
                return Err(src.error_at(listen_span, "listen", msg));
            }
            rules.push(rule);
        }
        warnings.append(&mut src.warnings.borrow_mut());

        Ok(Config {
            workers,
            engine,
            mode,
            shutdown_grace,
            shutdown_delay,
            reload_drain_timeout,
            admin,
            admin_allow_remote,
            log_format,
            access_log: raw.access_log.unwrap_or(true),
            hdr_log,
            run_as,
            control_socket: match &raw.control_socket {
                None => None,
                Some(s) if s.get_ref().is_empty() => {
                    return Err(src.error_at(
                        s.span(),
                        "control_socket",
                        "expected the path of a unix socket, e.g. \"/run/ringfwd/control.sock\"",
                    ));
                }
                Some(s) => Some(PathBuf::from(s.get_ref())),
            },
            watch_config: raw.watch_config.unwrap_or(false),
            uring,
            rules,
            warnings,
        })
    }

    /// Checks what a runnable configuration needs beyond a well-formed file.
    ///
    /// # Errors
    /// No rule at all.
    pub fn ensure_runnable(&self) -> Result<(), ConfigError> {
        if self.rules.is_empty() {
            return Err(ConfigError {
                message: "no rule to run: add a [[rule]] table to the config, or pass --listen and --upstream".into(),
            });
        }
        Ok(())
    }

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

    /// The number of worker threads to run: configured, or the CPUs this process may use.
    pub fn worker_count(&self) -> usize {
        self.workers
            .map_or_else(crate::net::available_cpus, NonZeroUsize::get)
    }

    /// The effective configuration as TOML, the way `ringfwd check` prints it.
    pub fn to_toml(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "workers = {}",
            self.workers
                .map_or("\"auto\"".to_string(), |n| n.to_string())
        );
        let _ = writeln!(out, "engine = {:?}", self.engine.as_str());
        let _ = writeln!(out, "mode = {:?}", self.mode.as_str());
        let _ = writeln!(
            out,
            "shutdown_grace = {:?}",
            format_duration(self.shutdown_grace)
        );
        let _ = writeln!(
            out,
            "shutdown_delay = {:?}",
            format_duration(self.shutdown_delay)
        );
        match self.reload_drain_timeout {
            Some(t) => {
                let _ = writeln!(out, "reload_drain_timeout = {:?}", format_duration(t));
            }
            None => {
                let _ = writeln!(
                    out,
                    "# reload_drain_timeout unset: old connections run to their end"
                );
            }
        }
        if let Some(a) = self.admin {
            let _ = writeln!(out, "admin = \"{a}\"");
        }
        let _ = writeln!(out, "admin_allow_remote = {}", self.admin_allow_remote);
        let _ = writeln!(
            out,
            "log_format = {:?}",
            match self.log_format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            }
        );
        let _ = writeln!(out, "access_log = {}", self.access_log);
        if let Some(h) = &self.hdr_log {
            let _ = writeln!(out, "hdr_log = {:?}", h.path.display().to_string());
            let _ = writeln!(out, "hdr_log_interval = {:?}", format_duration(h.interval));
        }
        if let Some(r) = &self.run_as {
            let _ = writeln!(out, "user = {:?}", r.user);
            let _ = writeln!(out, "group = {:?}", r.group);
        }
        if let Some(p) = &self.control_socket {
            let _ = writeln!(out, "control_socket = {:?}", p.display().to_string());
        }
        if self.watch_config {
            let _ = writeln!(out, "watch_config = true");
        }
        let u = &self.uring;
        let _ = writeln!(out, "\n[uring]");
        let _ = writeln!(out, "ring_entries = {}", u.ring_entries);
        let _ = writeln!(out, "buffer_size = \"{}\"", u.buffer_size);
        let _ = writeln!(out, "buffers = {}", u.buffers);
        let _ = writeln!(out, "pipe_size = \"{}\"", u.pipe_size);
        let _ = writeln!(out, "pipes = {}", u.pipes);
        let _ = writeln!(out, "auto_up_reads = {}", u.auto_up_reads);
        let _ = writeln!(out, "auto_down_pumps = {}", u.auto_down_pumps);
        let _ = writeln!(out, "pin = {}", u.pin);
        let _ = writeln!(out, "busy_poll = \"{}us\"", u.busy_poll.as_micros());
        for r in &self.rules {
            let _ = writeln!(out, "\n[[rule]]");
            let _ = writeln!(out, "name = {:?}", r.name);
            let _ = writeln!(out, "listen = \"{}\"", r.listen);
            match &r.upstream {
                Some(up) => write_upstream(&mut out, up, r.listen.count),
                None => {
                    let _ = writeln!(
                        out,
                        "# no upstream: a connection no route matches is rejected (no_route)"
                    );
                }
            }
            let _ = writeln!(out, "max_connections = {}", r.max_connections);
            let _ = writeln!(out, "nodelay = {}", r.tcp.nodelay);
            match r.tcp.keepalive {
                None => {
                    let _ = writeln!(out, "keepalive = false");
                }
                Some(k) => {
                    let mut parts = Vec::new();
                    if let Some(d) = k.idle {
                        parts.push(format!("idle = {:?}", format_duration(d)));
                    }
                    if let Some(d) = k.interval {
                        parts.push(format!("interval = {:?}", format_duration(d)));
                    }
                    if let Some(c) = k.count {
                        parts.push(format!("count = {c}"));
                    }
                    let _ = writeln!(out, "keepalive = {{ {} }}", parts.join(", "));
                }
            }
            if let Some(l) = r.tcp.linger {
                let _ = writeln!(out, "linger = {:?}", format_duration(l));
            }
            if let Some(b) = r.tcp.recv_buffer {
                let _ = writeln!(out, "recv_buffer = \"{b}\"");
            }
            if let Some(b) = r.tcp.send_buffer {
                let _ = writeln!(out, "send_buffer = \"{b}\"");
            }
            let _ = writeln!(
                out,
                "connect_timeout = {:?}",
                format_duration(r.connect_timeout)
            );
            let _ = writeln!(
                out,
                "idle_timeout = {:?}",
                r.idle_timeout.map_or("0s".to_string(), format_duration)
            );
            let _ = writeln!(
                out,
                "first_byte_timeout = {:?}",
                r.first_byte_timeout()
                    .map_or("0s".to_string(), format_duration)
            );
            if let Some(t) = &r.tap {
                let _ = writeln!(out, "tap = {:?}", t.display().to_string());
            }
            write_edge(&mut out, r);
            // A sub-table ends the rule's own keys, so it comes last.
            if let Some(h) = r.upstream.as_ref().and_then(|u| u.health_check.as_ref()) {
                write_health_check(&mut out, "rule.health_check", h);
            }
            for route in &r.routes {
                let _ = writeln!(out, "\n[[rule.route]]");
                let _ = writeln!(out, "name = {:?}", route.name);
                let _ = writeln!(out, "sni = {:?}", route.sni);
                write_upstream(&mut out, &route.upstream, r.listen.count);
                if let Some(h) = &route.upstream.health_check {
                    write_health_check(&mut out, "rule.route.health_check", h);
                }
            }
        }
        out
    }
}

fn write_health_check(out: &mut String, table: &str, h: &HealthCheck) {
    use std::fmt::Write;
    let _ = writeln!(out, "\n[{table}]");
    let _ = writeln!(out, "interval = {:?}", format_duration(h.interval));
    let _ = writeln!(out, "timeout = {:?}", format_duration(h.timeout));
    let _ = writeln!(out, "rise = {}", h.rise);
    let _ = writeln!(out, "fall = {}", h.fall);
    match &h.send {
        Some(v) => {
            let _ = writeln!(out, "send = {}", toml_string(v));
        }
        None => {
            let _ = writeln!(out, "# send: unset, nothing is written");
        }
    }
    match &h.expect {
        Some(v) => {
            let _ = writeln!(out, "expect = {}", toml_string(v));
        }
        None => {
            let _ = writeln!(out, "# expect: unset, a completed connect passes");
        }
    }
}

/// `v` as a TOML basic string, control characters escaped.
fn toml_string(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A rule's pool keys: members as inline tables, each followed by what it resolved to.
fn write_upstream(out: &mut String, up: &Upstream, listen_ports: u16) {
    use std::fmt::Write;
    let _ = writeln!(out, "upstream = [");
    for m in &up.members {
        let _ = writeln!(
            out,
            "    {{ addr = {:?}, weight = {}, backup = {} }},",
            m.range_text(up.one_to_one.then_some(listen_ports)),
            m.weight,
            m.backup
        );
    }
    let _ = writeln!(out, "]");
    for m in &up.members {
        if m.addrs.is_empty() {
            let _ = writeln!(
                out,
                "# member {:?} does not resolve now: down until it resolves",
                m.text
            );
            continue;
        }
        let addrs: Vec<String> = m.addrs.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "# member {:?} resolves to {}",
            m.text,
            addrs.join(", ")
        );
    }
    let _ = writeln!(out, "balance = {:?}", up.balance.as_str());
    let _ = writeln!(out, "connect_retries = {}", up.connect_retries);
    let _ = writeln!(out, "max_fails = {}", up.max_fails);
    let _ = writeln!(out, "fail_timeout = {:?}", format_duration(up.fail_timeout));
    let _ = writeln!(
        out,
        "resolve_interval = {:?}",
        up.resolve_interval
            .map_or("0s".to_string(), format_duration)
    );
}

/// A rule's edge-admission keys, every one printed (unset limits as a comment), so that
/// `check` shows the effective ACLs and limits.
fn write_edge(out: &mut String, r: &Rule) {
    use std::fmt::Write;
    let list = |out: &mut String, key: &str, l: &[crate::session::acl::Cidr]| {
        if l.is_empty() {
            let _ = writeln!(out, "{key} = []");
        } else {
            let _ = writeln!(out, "{key} = [");
            for c in l {
                let _ = writeln!(out, "    \"{c}\",");
            }
            let _ = writeln!(out, "]");
        }
    };
    let _ = writeln!(out, "proxy_protocol = {:?}", r.proxy_protocol.as_str());
    match &r.accept_proxy {
        None => {
            let _ = writeln!(out, "accept_proxy = false");
        }
        Some(a) => {
            let _ = writeln!(out, "accept_proxy = true");
            list(out, "proxy_trusted", &a.trusted);
        }
    }
    if r.accept_proxy.is_some() || !r.routes.is_empty() {
        let _ = writeln!(
            out,
            "proxy_header_timeout = {:?}",
            format_duration(r.header_timeout)
        );
    }
    let a = &r.admission;
    list(out, "allow", &a.allow);
    list(out, "deny", &a.deny);
    match a.max_connections_per_ip {
        None => {
            let _ = writeln!(out, "# max_connections_per_ip: unset, no limit");
        }
        Some(n) => {
            let _ = writeln!(out, "max_connections_per_ip = {n}");
        }
    }
    match a.max_new_connections_per_ip {
        None => {
            let _ = writeln!(out, "# max_new_connections_per_ip: unset, no limit");
        }
        Some(rate) => {
            let _ = writeln!(out, "max_new_connections_per_ip = \"{rate}\"");
            let _ = writeln!(
                out,
                "# a new client address may open {} at once, then one every {:?}",
                rate.burst(),
                rate.interval()
            );
        }
    }
    let _ = writeln!(out, "per_ip_prefix_v6 = {}", a.per_ip_prefix_v6);
    let _ = writeln!(out, "per_ip_prefix_v4 = {}", a.per_ip_prefix_v4);
}

/// The `user` and `group` keys, resolved against the user and group databases now, so that an
/// unknown name is reported at its key rather than when `run` is about to drop root.
fn run_as(
    user: Option<&toml::Spanned<String>>,
    group: Option<&toml::Spanned<String>>,
    src: &Source<'_>,
) -> Result<Option<crate::privdrop::RunAs>, ConfigError> {
    use crate::privdrop::{ResolveError, RunAs};
    let Some(user) = user else {
        return match group {
            None => Ok(None),
            Some(g) => Err(src.error_at(
                g.span(),
                "group",
                "is set but user is not: add user = \"NAME\" (the group applies to the user ringfwd switches to)",
            )),
        };
    };
    RunAs::resolve(user.get_ref(), group.map(|g| g.get_ref().as_str()))
        .map(Some)
        .map_err(|e| match (e, group) {
            (ResolveError::Group(m), Some(g)) => src.error_at(g.span(), "group", m),
            (ResolveError::User(m) | ResolveError::Group(m), _) => {
                src.error_at(user.span(), "user", m)
            }
        })
}

fn hdr_log(
    path: Option<&toml::Spanned<String>>,
    interval: Option<&toml::Spanned<raw::DurationValue>>,
    src: &Source<'_>,
) -> Result<Option<HdrLogConfig>, ConfigError> {
    if let Some(i) = interval {
        let d = i.get_ref().0;
        if !HDR_LOG_INTERVAL_RANGE.contains(&d) {
            return Err(src.error_at(
                i.span(),
                "hdr_log_interval",
                format!(
                    "must be {}..={}, got {}",
                    format_duration(*HDR_LOG_INTERVAL_RANGE.start()),
                    format_duration(*HDR_LOG_INTERVAL_RANGE.end()),
                    format_duration(d)
                ),
            ));
        }
    }
    match (path, interval) {
        (None, None) => Ok(None),
        (None, Some(i)) => Err(src.error_at(
            i.span(),
            "hdr_log_interval",
            "is set but hdr_log is not: add hdr_log = \"FILE\" or remove the interval",
        )),
        (Some(p), _) if p.get_ref().trim().is_empty() => Err(src.error_at(
            p.span(),
            "hdr_log",
            "must be a file path, got an empty string",
        )),
        (Some(p), _) if let Err(m) = check_writable(Path::new(p.get_ref())) => {
            Err(src.error_at(p.span(), "hdr_log", m))
        }
        (Some(p), i) => Ok(Some(HdrLogConfig {
            path: PathBuf::from(p.get_ref()),
            interval: i.map_or(DEFAULT_HDR_LOG_INTERVAL, |i| i.get_ref().0),
        })),
    }
}

/// Longest `[uring] busy_poll`: past this a worker spins for nothing a sleep would not do as well.
const MAX_BUSY_POLL: Duration = Duration::from_millis(1);

fn uring_tuning(raw: raw::RawUring, src: &Source<'_>) -> Result<UringTuning, ConfigError> {
    // Defaults are in range; a value out of range is reported where it was written.
    let count = |v: Option<toml::Spanned<u32>>, default: u32, lo: u32, hi: u32, key: &str| match v {
        None => Ok(default),
        Some(s) if (lo..=hi).contains(s.get_ref()) => Ok(*s.get_ref()),
        Some(s) => Err(src.error_at(
            s.span(),
            &format!("uring.{key}"),
            format!("must be {lo}..={hi}, got {}", s.get_ref()),
        )),
    };
    let size = |v: Option<toml::Spanned<raw::SizeValue>>,
                default: ByteSize,
                lo: ByteSize,
                hi: ByteSize,
                key: &str| match v {
        None => Ok(default),
        Some(s) if (lo..=hi).contains(&s.get_ref().0) => Ok(s.get_ref().0),
        Some(s) => Err(src.error_at(
            s.span(),
            &format!("uring.{key}"),
            format!("must be {lo}..={hi}, got {}", s.get_ref().0),
        )),
    };
    let d = UringTuning::default();
    let t = UringTuning {
        ring_entries: count(raw.ring_entries, d.ring_entries, 8, 32768, "ring_entries")?,
        buffer_size: size(
            raw.buffer_size,
            d.buffer_size,
            ByteSize(4 << 10),
            ByteSize(16 << 20),
            "buffer_size",
        )?,
        buffers: count(raw.buffers, d.buffers, 1, 32768, "buffers")?,
        pipe_size: size(
            raw.pipe_size,
            d.pipe_size,
            ByteSize(4 << 10),
            ByteSize(1 << 30),
            "pipe_size",
        )?,
        pipes: count(raw.pipes, d.pipes, 0, 65536, "pipes")?,
        auto_up_reads: count(
            raw.auto_up_reads,
            d.auto_up_reads.into(),
            1,
            255,
            "auto_up_reads",
        )? as u8,
        auto_down_pumps: count(
            raw.auto_down_pumps,
            d.auto_down_pumps.into(),
            1,
            255,
            "auto_down_pumps",
        )? as u8,
        pin: raw.pin.unwrap_or(d.pin),
        busy_poll: match raw.busy_poll {
            None => d.busy_poll,
            Some(s) if s.get_ref().0 <= MAX_BUSY_POLL => s.get_ref().0,
            Some(s) => {
                return Err(src.error_at(
                    s.span(),
                    "uring.busy_poll",
                    format!("must be at most 1ms, got {:?}", s.get_ref().0),
                ));
            }
        },
    };
    Ok(t)
}

fn rule_from_raw(
    index: usize,
    r: RawRule,
    default_max_connections: NonZeroU32,
    src: &Source<'_>,
) -> Result<Rule, ConfigError> {
    let name = match &r.name {
        Some(n) if n.get_ref().trim().is_empty() => {
            return Err(src.error_at(n.span(), "name", "must not be empty"));
        }
        Some(n) => n.get_ref().clone(),
        None => format!("rule{}", index + 1),
    };
    let listen = Listen::resolve(r.listen.get_ref())
        .map_err(|m| src.error_at(r.listen.span(), "listen", m))?;
    let (mut upstream, mut routes) = pools_from_raw(&r, &listen, src)?;
    if let Some(d) = &r.first_byte_timeout {
        // A rule key, applied to every pool of the rule (routes included): it is passive
        // health, judged per member like `max_fails`.
        let d = src.duration(
            d,
            "first_byte_timeout",
            Some("off"),
            FIRST_BYTE_TIMEOUT_RANGE,
        )?;
        let d = (!d.is_zero()).then_some(d);
        for up in upstream
            .iter_mut()
            .chain(routes.iter_mut().map(|r| &mut r.upstream))
        {
            up.first_byte_timeout = d;
        }
    }
    let (proxy_protocol, accept_proxy, header_timeout, admission) = edge_from_raw(&r, src)?;
    // `keepalive.count = 0` is refused while deserializing, where its position is known.
    let keepalive = match r.keepalive {
        None | Some(KeepaliveValue::Enabled(false)) => None,
        Some(KeepaliveValue::Enabled(true)) => Some(Keepalive::default()),
        Some(KeepaliveValue::Tuned(t)) => Some(Keepalive {
            idle: t.idle.map(|d| d.0),
            interval: t.interval.map(|d| d.0),
            count: t.count,
        }),
    };
    let connect_timeout = match &r.connect_timeout {
        None => DEFAULT_CONNECT_TIMEOUT,
        Some(d) => src.duration(
            d,
            "connect_timeout",
            None,
            Duration::ZERO..=MAX_CONNECT_TIMEOUT,
        )?,
    };
    let idle_timeout = match &r.idle_timeout {
        None => Some(DEFAULT_IDLE_TIMEOUT),
        Some(d) => Some(src.duration(
            d,
            "idle_timeout",
            Some("never"),
            Duration::ZERO..=MAX_IDLE_TIMEOUT,
        )?)
        .filter(|d| !d.is_zero()),
    };
    let linger = match &r.linger {
        None => None,
        Some(d) => Some(src.duration(
            d,
            "linger",
            Some("every close is a reset"),
            Duration::ZERO..=MAX_LINGER,
        )?),
    };
    let max_connections = match &r.max_connections {
        None => default_max_connections,
        Some(m) => NonZeroU32::new(src.count(m, "max_connections", 1, MAX_RULE_CONNECTIONS)?)
            .expect("checked at least 1"),
    };
    let tap = match &r.tap {
        None => None,
        Some(t) => {
            let path = PathBuf::from(t.get_ref());
            check_writable(&path).map_err(|m| src.error_at(t.span(), "tap", m))?;
            Some(path)
        }
    };
    Ok(Rule {
        name,
        listen,
        upstream,
        routes,
        tcp: TcpOptions {
            nodelay: r.nodelay.unwrap_or(true),
            keepalive,
            linger,
            recv_buffer: r.recv_buffer.map(|s| s.0),
            send_buffer: r.send_buffer.map(|s| s.0),
        },
        connect_timeout,
        idle_timeout,
        tap,
        max_connections,
        proxy_protocol,
        accept_proxy,
        header_timeout,
        admission,
    })
}

/// A rule's edge-admission keys: the PROXY header it sends, the one it accepts, its ACLs and
/// its per-client limits.
fn edge_from_raw(
    r: &RawRule,
    src: &Source<'_>,
) -> Result<(ProxyProtocol, Option<AcceptProxy>, Duration, Admission), ConfigError> {
    let proxy_protocol = match &r.proxy_protocol {
        None => ProxyProtocol::Off,
        Some(p) => ProxyProtocol::parse(p.get_ref()).ok_or_else(|| {
            src.error_at(
                p.span(),
                "proxy_protocol",
                format!(
                    "unknown version {:?} (expected one of {})",
                    p.get_ref(),
                    ProxyProtocol::NAMES
                ),
            )
        })?,
    };

    let accept = r.accept_proxy.as_ref().map(|a| *a.get_ref());
    // The keys that only mean something with accept_proxy = true (the timeout also bounds
    // the ClientHello of a rule with routes).
    if accept != Some(true) {
        let lonely = [
            r.proxy_trusted
                .as_ref()
                .map(|t| ("proxy_trusted", t.span())),
            r.proxy_header_timeout
                .as_ref()
                .filter(|_| r.routes.is_empty())
                .map(|t| ("proxy_header_timeout", t.span())),
        ];
        if let Some((key, span)) = lonely.into_iter().flatten().next() {
            let msg = match accept {
                None if key == "proxy_header_timeout" => format!(
                    "is set but neither accept_proxy = true nor a [[rule.route]] is there to wait for: add one, or remove {key}"
                ),
                None => format!(
                    "is set but accept_proxy = true is missing: add accept_proxy = true, or remove {key}"
                ),
                _ => format!(
                    "is set but accept_proxy is false: set accept_proxy = true, or remove {key}"
                ),
            };
            return Err(src.error_at(span, key, msg));
        }
    }
    let header_timeout = match &r.proxy_header_timeout {
        None => DEFAULT_PROXY_HEADER_TIMEOUT,
        Some(d) => {
            let v = d.get_ref().0;
            if !PROXY_HEADER_TIMEOUT_RANGE.contains(&v) {
                return Err(src.error_at(
                    d.span(),
                    "proxy_header_timeout",
                    format!(
                        "must be {}..={}, got {}",
                        format_duration(*PROXY_HEADER_TIMEOUT_RANGE.start()),
                        format_duration(*PROXY_HEADER_TIMEOUT_RANGE.end()),
                        format_duration(v)
                    ),
                ));
            }
            v
        }
    };
    let accept_proxy = match (&r.accept_proxy, &r.proxy_trusted) {
        (Some(a), None) if *a.get_ref() => {
            return Err(src.error_at(
                a.span(),
                "accept_proxy",
                "is true but proxy_trusted is missing: list the sources allowed to send a PROXY header (your load balancers), e.g. proxy_trusted = [\"10.0.0.0/8\"]",
            ));
        }
        (Some(a), Some(t)) if *a.get_ref() => {
            if t.get_ref().0.is_empty() {
                return Err(src.error_at(
                    t.span(),
                    "proxy_trusted",
                    "an empty list trusts no one, so every connection would be refused: list the sources allowed to send a PROXY header (your load balancers), e.g. [\"10.0.0.0/8\"]",
                ));
            }
            Some(AcceptProxy {
                trusted: cidrs(t.get_ref(), "proxy_trusted", src)?,
            })
        }
        _ => None,
    };

    let list = |l: &Option<toml::Spanned<raw::CidrList>>, key: &str| match l {
        None => Ok(Vec::new()),
        Some(l) => cidrs(l.get_ref(), key, src),
    };
    let allow = list(&r.allow, "allow")?;
    let deny = list(&r.deny, "deny")?;
    let max_connections_per_ip = match &r.max_connections_per_ip {
        None => None,
        Some(n) => Some(
            NonZeroU32::new(src.count(n, "max_connections_per_ip", 1, MAX_CONNECTIONS_PER_IP)?)
                .expect("checked at least 1"),
        ),
    };
    let max_new_connections_per_ip = match &r.max_new_connections_per_ip {
        None => None,
        Some(t) => Some(
            crate::session::limits::Rate::parse(&t.get_ref().0)
                .map_err(|e| src.error_at(t.span(), "max_new_connections_per_ip", e))?,
        ),
    };
    let prefix = |v: &Option<toml::Spanned<i64>>, key: &str, max: u8, default: u8| match v {
        None => Ok(default),
        Some(n) => src.count(n, key, 1, u32::from(max)).map(|n| n as u8),
    };
    let per_ip_prefix_v6 = prefix(
        &r.per_ip_prefix_v6,
        "per_ip_prefix_v6",
        128,
        crate::session::limits::DEFAULT_PREFIX_V6,
    )?;
    let per_ip_prefix_v4 = prefix(
        &r.per_ip_prefix_v4,
        "per_ip_prefix_v4",
        32,
        crate::session::limits::DEFAULT_PREFIX_V4,
    )?;
    Ok((
        proxy_protocol,
        accept_proxy,
        header_timeout,
        Admission {
            allow,
            deny,
            max_connections_per_ip,
            max_new_connections_per_ip,
            per_ip_prefix_v6,
            per_ip_prefix_v4,
        },
    ))
}

/// Parses every entry of a CIDR list, reporting a bad one at its own position. A bare address
/// is one host (`/32` or `/128`).
fn cidrs(
    list: &raw::CidrList,
    key: &str,
    src: &Source<'_>,
) -> Result<Vec<crate::session::acl::Cidr>, ConfigError> {
    list.0
        .iter()
        .map(|e| {
            crate::session::acl::Cidr::parse(e.get_ref())
                .map_err(|m| src.error_at(e.span(), key, m))
        })
        .collect()
}

/// The pool keys of a rule or of one of its routes, as written.
struct PoolKeys<'a> {
    upstream: &'a toml::Spanned<UpstreamValue>,
    balance: Option<&'a toml::Spanned<String>>,
    connect_retries: Option<&'a toml::Spanned<i64>>,
    max_fails: Option<&'a toml::Spanned<i64>>,
    fail_timeout: Option<&'a toml::Spanned<raw::DurationValue>>,
    resolve_interval: Option<&'a toml::Spanned<raw::DurationValue>>,
    health_check: Option<&'a raw::RawHealthCheck>,
}

/// A rule's own pool (its default route) and its SNI routes, each with its own pool.
fn pools_from_raw(
    r: &RawRule,
    listen: &Listen,
    src: &Source<'_>,
) -> Result<(Option<Upstream>, Vec<Route>), ConfigError> {
    let upstream = match &r.upstream {
        Some(u) => Some(upstream_from_raw(
            &PoolKeys {
                upstream: u,
                balance: r.balance.as_ref(),
                connect_retries: r.connect_retries.as_ref(),
                max_fails: r.max_fails.as_ref(),
                fail_timeout: r.fail_timeout.as_ref(),
                resolve_interval: r.resolve_interval.as_ref(),
                health_check: r.health_check.as_ref(),
            },
            listen,
            src,
        )?),
        None if r.routes.is_empty() => {
            return Err(src.error_at(
                r.listen.span(),
                "upstream",
                "missing: give the rule an upstream = \"host:port\" (or [[rule.route]] tables with upstreams of their own)",
            ));
        }
        None => {
            let lonely = [
                r.balance.as_ref().map(|k| ("balance", k.span())),
                r.connect_retries
                    .as_ref()
                    .map(|k| ("connect_retries", k.span())),
                r.max_fails.as_ref().map(|k| ("max_fails", k.span())),
                r.fail_timeout.as_ref().map(|k| ("fail_timeout", k.span())),
                r.resolve_interval
                    .as_ref()
                    .map(|k| ("resolve_interval", k.span())),
                r.health_check
                    .as_ref()
                    .map(|_| ("health_check", r.listen.span())),
            ];
            if let Some((key, span)) = lonely.into_iter().flatten().next() {
                return Err(src.error_at(
                    span,
                    key,
                    "is set but the rule has no upstream of its own (no default route): set it in the [[rule.route]] tables, or give the rule an upstream",
                ));
            }
            None
        }
    };
    let mut routes: Vec<Route> = Vec::with_capacity(r.routes.len());
    // Lower-cased pattern → the route that listed it first.
    let mut seen: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    for (i, rr) in r.routes.iter().enumerate() {
        let patterns = rr.sni.get_ref();
        if patterns.is_empty() {
            return Err(src.error_at(
                rr.sni.span(),
                "sni",
                "an empty list matches no connection: list server names such as [\"api.example.com\", \"*.example.com\"]",
            ));
        }
        for p in patterns {
            crate::session::sni::SniRoutes::new(&[(i + 1, vec![p.get_ref().clone()])])
                .map_err(|e| src.error_at(p.span(), "sni", e))?;
        }
        let name = match &rr.name {
            Some(n) if n.get_ref().trim().is_empty() => {
                return Err(src.error_at(n.span(), "name", "must not be empty"));
            }
            Some(n) if n.get_ref() == DEFAULT_ROUTE => {
                return Err(src.error_at(
                    n.span(),
                    "name",
                    "\"default\" names the rule's own upstream: choose another route name",
                ));
            }
            Some(n) => n.get_ref().clone(),
            None => patterns[0].get_ref().to_ascii_lowercase(),
        };
        for p in patterns {
            let key = p.get_ref().to_ascii_lowercase();
            let key = key.strip_suffix('.').unwrap_or(&key).to_string();
            if let Some(prev) = seen.get(&key) {
                return Err(src.error_at(
                    p.span(),
                    "sni",
                    format!(
                        "{:?} is already routed by route {prev:?}: a name goes to one route; remove one of them",
                        p.get_ref()
                    ),
                ));
            }
            seen.insert(key, name.clone());
        }
        if routes.iter().any(|prev| prev.name == name) {
            let span = rr.name.as_ref().map_or_else(|| rr.sni.span(), |n| n.span());
            return Err(src.error_at(
                span,
                "name",
                format!("route name {name:?} is used twice in this rule: give each route a different name"),
            ));
        }
        let upstream = upstream_from_raw(
            &PoolKeys {
                upstream: &rr.upstream,
                balance: rr.balance.as_ref(),
                connect_retries: rr.connect_retries.as_ref(),
                max_fails: rr.max_fails.as_ref(),
                fail_timeout: rr.fail_timeout.as_ref(),
                resolve_interval: rr.resolve_interval.as_ref(),
                health_check: rr.health_check.as_ref(),
            },
            listen,
            src,
        )?;
        routes.push(Route {
            name,
            sni: patterns.iter().map(|p| p.get_ref().clone()).collect(),
            upstream,
        });
    }
    Ok((upstream, routes))
}

/// A pool: its members, resolved and checked, and how to use them.
fn upstream_from_raw(
    r: &PoolKeys<'_>,
    listen: &Listen,
    src: &Source<'_>,
) -> Result<Upstream, ConfigError> {
    let whole = r.upstream.span();
    // (where it was written, text, weight, backup)
    let written: Vec<(std::ops::Range<usize>, &str, Option<i64>, bool)> = match r.upstream.get_ref()
    {
        UpstreamValue::One(text) => vec![(whole.clone(), text.as_str(), None, false)],
        UpstreamValue::Pool(list) if list.is_empty() => {
            return Err(src.error_at(
                whole,
                "upstream",
                "an empty array has no member to forward to: give at least one \"host:port\"",
            ));
        }
        UpstreamValue::Pool(list) => list
            .iter()
            .map(|m| match m.get_ref() {
                MemberValue::Text(t) => (m.span(), t.as_str(), None, false),
                MemberValue::Table(t) => (
                    m.span(),
                    t.addr.as_str(),
                    t.weight,
                    t.backup.unwrap_or(false),
                ),
            })
            .collect(),
    };
    let mut members: Vec<MemberSpec> = Vec::with_capacity(written.len());
    // Members written with a port range (one-to-one with the listen range), and without.
    let (mut ranged, mut single): (Option<&str>, Option<&str>) = (None, None);
    for (span, written_text, weight, backup) in written {
        let (base, count) = split_port_range(written_text)
            .map_err(|m| src.error_at(span.clone(), "upstream", m))?;
        if count > 1 {
            if !listen.is_range() {
                return Err(src.error_at(
                    span,
                    "upstream",
                    format!(
                        "{written_text:?} is a port range ({count} ports) but listen {listen} is one port: a range maps one-to-one onto a listen range of the same length; give listen a range, or give the upstream one port"
                    ),
                ));
            }
            if count != listen.count {
                return Err(src.error_at(
                    span,
                    "upstream",
                    format!(
                        "{written_text:?} covers {count} ports but listen {listen} covers {}: a one-to-one range must have the listen range's length",
                        listen.count
                    ),
                ));
            }
            ranged.get_or_insert(written_text);
        } else {
            single.get_or_insert(written_text);
        }
        if let (Some(r), Some(s)) = (ranged, single) {
            return Err(src.error_at(
                span,
                "upstream",
                format!(
                    "members {r:?} and {s:?} mix a port range with a single port: in one pool, either every member is a range (one-to-one) or none is"
                ),
            ));
        }
        let text = base.as_str();
        // A name that does not resolve now is a member with no address, down until a later
        // lookup finds one (HAProxy's `init-addr none`): one bad DNS entry must not stop
        // every rule of the host. A malformed member is still an error.
        let addrs = match lookup_member(text) {
            Ok(addrs) => addrs,
            Err(Unresolved::Lookup(why)) => {
                src.warnings.borrow_mut().push(src.at(
                    span.clone(),
                    "upstream",
                    format!(
                        "{why}; the member is down until it resolves (looked up again every {})",
                        format_duration(r.resolve_interval.map_or(DEFAULT_RESOLVE_INTERVAL, |d| {
                            if d.get_ref().0.is_zero() {
                                UNRESOLVED_RETRY
                            } else {
                                d.get_ref().0
                            }
                        }))
                    ),
                ));
                Vec::new()
            }
            Err(Unresolved::Invalid(m)) => return Err(src.error_at(span.clone(), "upstream", m)),
        };
        let weight = match weight {
            None => NonZeroU32::MIN,
            Some(w) => u32::try_from(w)
                .ok()
                .filter(|w| (1..=MAX_WEIGHT).contains(w))
                .and_then(NonZeroU32::new)
                .ok_or_else(|| {
                    src.error_at(
                        span.clone(),
                        "upstream",
                        format!("member {text:?}: weight must be 1..={MAX_WEIGHT}, got {w}"),
                    )
                })?,
        };
        for prev in &members {
            if let Some(a) = addrs.iter().find(|a| prev.addrs.contains(a)) {
                return Err(src.error_at(
                    span,
                    "upstream",
                    format!(
                        "{a} is in the pool twice (members {:?} and {text:?}); list each address once",
                        prev.text
                    ),
                ));
            }
        }
        members.push(MemberSpec {
            text: text.to_string(),
            weight,
            backup,
            addrs,
        });
    }
    if members.iter().all(|m| m.backup) {
        return Err(src.error_at(
            whole,
            "upstream",
            "every member is a backup: at least one member must have backup = false",
        ));
    }
    let mut up = Upstream::with_members(members);
    up.one_to_one = ranged.is_some();
    if let Some(b) = r.balance {
        up.balance = Balance::parse(b.get_ref()).ok_or_else(|| {
            src.error_at(
                b.span(),
                "balance",
                format!(
                    "unknown balance {:?} (expected one of {})",
                    b.get_ref(),
                    Balance::NAMES
                ),
            )
        })?;
    }
    if let Some(n) = r.connect_retries {
        up.connect_retries = src.count(n, "connect_retries", 0, MAX_CONNECT_RETRIES)?;
    }
    if let Some(n) = r.max_fails {
        up.max_fails = src.count(n, "max_fails", 0, MAX_MAX_FAILS)?;
    }
    if let Some(d) = r.fail_timeout {
        up.fail_timeout =
            src.duration(d, "fail_timeout", None, Duration::ZERO..=MAX_FAIL_TIMEOUT)?;
    }
    if let Some(d) = r.resolve_interval {
        let d = src.duration(
            d,
            "resolve_interval",
            Some("resolve only at start"),
            RESOLVE_INTERVAL_RANGE,
        )?;
        up.resolve_interval = (!d.is_zero()).then_some(d);
    }
    if let Some(h) = r.health_check {
        let time = |v: &Option<toml::Spanned<raw::DurationValue>>, key: &str, default| match v {
            None => Ok(default),
            Some(d) => src.duration(
                d,
                &format!("health_check.{key}"),
                None,
                Duration::ZERO..=MAX_HEALTH_TIME,
            ),
        };
        let times = |v: &Option<toml::Spanned<i64>>, key: &str, default: NonZeroU32| match v {
            None => Ok(default),
            Some(n) => src
                .count(n, &format!("health_check.{key}"), 1, MAX_HEALTH_RISE_FALL)
                .map(|n| NonZeroU32::new(n).expect("checked at least 1")),
        };
        let payload = |v: &Option<toml::Spanned<String>>, key: &str| match v {
            None => Ok(None),
            Some(t) if t.get_ref().is_empty() || t.get_ref().len() > MAX_HEALTH_PAYLOAD => Err(src
                .error_at(
                    t.span(),
                    &format!("health_check.{key}"),
                    format!(
                        "must be 1..={MAX_HEALTH_PAYLOAD} bytes, got {} (leave it out to {})",
                        t.get_ref().len(),
                        if key == "send" {
                            "send nothing"
                        } else {
                            "check the connect only"
                        }
                    ),
                )),
            Some(t) => Ok(Some(t.get_ref().clone())),
        };
        up.health_check = Some(HealthCheck {
            interval: time(&h.interval, "interval", DEFAULT_HEALTH_INTERVAL)?,
            timeout: time(&h.timeout, "timeout", DEFAULT_HEALTH_TIMEOUT)?,
            rise: times(&h.rise, "rise", DEFAULT_HEALTH_RISE)?,
            fall: times(&h.fall, "fall", DEFAULT_HEALTH_FALL)?,
            send: payload(&h.send, "send")?,
            expect: payload(&h.expect, "expect")?,
        });
    }
    Ok(up)
}

/// Why two rules' listen sides cannot both be bound, if they cannot: a port both cover on the
/// same address, or on two addresses of one family where one is the unspecified address
/// (`0.0.0.0:P` takes `127.0.0.1:P` too; `[::]:P` takes `[::1]:P`). Port 0 never collides.
fn listen_conflict(prev: &Rule, rule: &Rule) -> Option<String> {
    let (a, b) = (&prev.listen, &rule.listen);
    let port = a.common_port(b)?;
    if a.is_ipv6() != b.is_ipv6() {
        return None;
    }
    // For ranges, say which port and which ranges; single ports read as before.
    let within = if a.is_range() || b.is_range() {
        format!(" (port {port} is in {a} and in {b})")
    } else {
        String::new()
    };
    if a.ip() == b.ip() {
        let at = SocketAddr::new(a.ip(), port);
        return Some(format!(
            "rules {:?} and {:?} both listen on {at}{within}",
            prev.name, rule.name
        ));
    }
    if !a.ip().is_unspecified() && !b.ip().is_unspecified() {
        return None;
    }
    let (wide, narrow) = if a.ip().is_unspecified() {
        (a.ip(), b.ip())
    } else {
        (b.ip(), a.ip())
    };
    Some(format!(
        "rules {:?} and {:?} overlap: {} already takes every connection to {}{within}; give them different ports, or drop one",
        prev.name,
        rule.name,
        SocketAddr::new(wide, port),
        SocketAddr::new(narrow, port)
    ))
}

/// Whether `run` could open `path` for appending: checked with `stat`/`access(2)`, without
/// creating or truncating anything.
fn check_writable(path: &Path) -> Result<(), String> {
    use nix::unistd::{AccessFlags, access};
    let shown = path.display();
    if path.as_os_str().is_empty() {
        return Err("must be a file path, got an empty string".into());
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Err(format!("{shown:?} is a directory, not a file")),
        Ok(_) => access(path, AccessFlags::W_OK)
            .map_err(|e| format!("cannot write {shown:?}: {}", e.desc())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            match std::fs::metadata(dir) {
                Ok(m) if m.is_dir() => {
                    access(dir, AccessFlags::W_OK | AccessFlags::X_OK).map_err(|e| {
                        format!(
                            "cannot create {shown:?}: directory {:?} is not writable ({})",
                            dir.display(),
                            e.desc()
                        )
                    })
                }
                Ok(_) => Err(format!(
                    "cannot create {shown:?}: {:?} is not a directory",
                    dir.display()
                )),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!(
                    "cannot create {shown:?}: directory {:?} does not exist",
                    dir.display()
                )),
                Err(e) => Err(format!("cannot create {shown:?}: {:?}: {e}", dir.display())),
            }
        }
        Err(e) => Err(format!("cannot open {shown:?}: {e}")),
    }
}

/// Resolves "host:port" / "[v6]:port" to one address (the first the resolver gives).
///
/// # Errors
/// A message for the operator.
pub fn resolve_one(text: &str) -> Result<SocketAddr, String> {
    resolve_addrs(text).map(|a| a[0])
}

/// Resolves "host:port" to every address it names (never an empty list).
///
/// # Errors
/// A message for the operator.
pub fn resolve_addrs(text: &str) -> Result<Vec<SocketAddr>, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(vec![addr]);
    }
    check_host_port(text)?;
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for a in text
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {text:?}: {e}"))?
    {
        // The resolver may list an address twice (e.g. two /etc/hosts lines): keep one.
        if !addrs.contains(&a) {
            addrs.push(a);
        }
    }
    if addrs.is_empty() {
        return Err(format!("cannot resolve {text:?}: no addresses"));
    }
    Ok(addrs)
}

/// Checks that `text` is written "host:port" (a bracketed IPv6 host, a valid port), without
/// looking anything up.
///
/// # Errors
/// A message for the operator.
fn check_host_port(text: &str) -> Result<(), String> {
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!(
            "{text:?} is not an address: expected host:port, e.g. 127.0.0.1:8080 or [::1]:8080"
        ));
    };
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        // "fe80::1:8080" could be an address without a port or one with port 8080.
        return Err(format!(
            "{text:?}: an IPv6 address needs brackets around it, e.g. [::1]:8080"
        ));
    }
    if port.parse::<u16>().is_err() {
        return Err(format!("{text:?}: invalid port {port:?}"));
    }
    if host.is_empty() {
        return Err(format!("{text:?}: missing host before the port"));
    }
    Ok(())
}

/// Why an upstream member has no address.
#[derive(Debug)]
enum Unresolved {
    /// Written wrong (no port, port 0, an IPv6 address without brackets): a config error.
    Invalid(String),
    /// Well written, but the lookup failed or found nothing now.
    Lookup(String),
}

/// How often a member name that did not resolve is looked up again when its pool has
/// `resolve_interval = "0s"` (resolve only at start), until it resolves once.
pub const UNRESOLVED_RETRY: Duration = Duration::from_secs(5);

/// [`resolve_member`], telling a malformed member from one whose lookup failed.
fn lookup_member(text: &str) -> Result<Vec<SocketAddr>, Unresolved> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return resolve_member(&addr.to_string()).map_err(Unresolved::Invalid);
    }
    check_host_port(text).map_err(Unresolved::Invalid)?;
    if text
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse() == Ok(0u16))
    {
        return Err(Unresolved::Invalid(format!(
            "upstream port 0 in {text:?}: give the port the upstream listens on"
        )));
    }
    resolve_member(text).map_err(Unresolved::Lookup)
}

/// Resolves one upstream member's text: [`resolve_addrs`], and no port 0 (a listen address
/// may ask the kernel for any port; a connect cannot).
///
/// # Errors
/// A message for the operator.
pub fn resolve_member(text: &str) -> Result<Vec<SocketAddr>, String> {
    let addrs = resolve_addrs(text)?;
    if addrs.iter().any(|a| a.port() == 0) {
        return Err(format!(
            "upstream port 0 in {text:?}: give the port the upstream listens on"
        ));
    }
    Ok(addrs)
}

/// Resolves the `--upstream` flag: one member, or a comma-separated list of members
/// (`127.0.0.1:9001,127.0.0.1:9002`), each of weight 1, every pool setting at its default.
///
/// # Errors
/// A message for the operator: a member that does not resolve, port 0, an empty member, or an
/// address listed twice.
pub fn resolve_upstream(text: &str) -> Result<Upstream, String> {
    let mut members: Vec<MemberSpec> = Vec::new();
    for part in text.split(',').map(str::trim) {
        if part.is_empty() {
            return Err(format!(
                "{text:?}: empty member in the list; separate members with single commas"
            ));
        }
        let addrs = resolve_member(part)?;
        if let Some((prev, a)) = members.iter().find_map(|m| {
            addrs
                .iter()
                .find(|a| m.addrs.contains(a))
                .map(|a| (&m.text, a))
        }) {
            return Err(format!(
                "{a} is in the pool twice (members {prev:?} and {part:?}); list each address once"
            ));
        }
        members.push(MemberSpec::new(part, addrs));
    }
    Ok(Upstream::with_members(members))
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod metrics_key_tests {
    use super::*;

    const RULE: &str = "[[rule]]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n";

    fn parse(top: &str) -> Result<Config, ConfigError> {
        Config::parse("t.toml", &format!("{top}\n{RULE}"))
    }

    #[test]
    fn hdr_log_has_a_default_interval_and_round_trips() {
        let c = parse("hdr_log = \"/tmp/x.hlog\"").unwrap();
        let h = c.hdr_log.clone().unwrap();
        assert_eq!(h.path, PathBuf::from("/tmp/x.hlog"));
        assert_eq!(h.interval, DEFAULT_HDR_LOG_INTERVAL);
        let c = parse("hdr_log = \"x.hlog\"\nhdr_log_interval = \"250ms\"").unwrap();
        assert_eq!(
            c.hdr_log.as_ref().unwrap().interval,
            Duration::from_millis(250)
        );
        assert!(
            c.to_toml().contains("hdr_log_interval = \"250ms\""),
            "{}",
            c.to_toml()
        );
        assert_eq!(parse("").unwrap().hdr_log, None);
    }

    #[test]
    fn hdr_log_mistakes_are_reported_at_their_key() {
        let e = parse("hdr_log_interval = \"5s\"").unwrap_err();
        assert!(e.message.starts_with("t.toml:1:"), "{e}");
        assert!(e.message.contains("hdr_log is not"), "{e}");
        let e = parse("hdr_log = \"x\"\nhdr_log_interval = \"10\"").unwrap_err();
        assert!(e.message.contains("hdr_log_interval"), "{e}");
        assert!(e.message.contains("unit"), "{e}");
        let e = parse("hdr_log = \"x\"\nhdr_log_interval = \"10ms\"").unwrap_err();
        assert!(e.message.contains("must be 100ms..=1h"), "{e}");
        let e = parse("hdr_log = \" \"").unwrap_err();
        assert!(e.message.contains("hdr_log: must be a file path"), "{e}");
    }

    #[test]
    fn default_admin_is_a_loopback_address() {
        let a = resolve_one(DEFAULT_ADMIN).unwrap();
        assert!(a.ip().is_loopback());
        assert_eq!(a.port(), 9100);
        assert_eq!(
            parse("").unwrap().admin,
            None,
            "admin stays off unless configured"
        );
    }
}
