//! The session pipeline every engine shares: everything that happens to a connection before,
//! around and after the relay, decided once and free of I/O.
//!
//! ```text
//!  accept ─► admit ─► pick upstream ─► connect ─► (retry another member) ─► relay ─► close
//!            (cap,     (balance,         (engine)   (passive health,           (engine)  (reason,
//!             drain)    health tiers)                 failover)                           record)
//! ```
//! The pipeline is a step machine ([`step`]): an engine feeds a [`Session`] what happened
//! to its connection and carries out the [`Step`] each event returns — read the preamble,
//! connect to this member, send these bytes, relay, close with this reason — and ends it
//! with [`Session::close`], which counts it, releases its slot and member, and writes the
//! access-log record, once. The engine never classifies an errno, never chooses a member,
//! never builds a record: [`crate::vocab`] (the errno classes) and this module do, for std, tokio and io_uring
//! alike, and record through a [`Recorder`] (the metrics implement it).
//!
//! Shared state (the per-rule live count, member health and counters) is atomics; the one
//! mutable piece a pick needs — the balancer's state — is a [`Picker`] the caller owns (one
//! per io_uring worker; one behind a mutex for the engines whose tasks move between threads).

pub mod acl;
pub mod limits;
pub mod proxy;
pub mod sni;
pub mod step;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{Config, ProxyProtocol, Rule};
use crate::upstream::member::{Transition, describe_errno};
use crate::upstream::{MemberSet, Picker, Pool, Tried};
use crate::vocab::{CloseReason, ConnectError, RejectReason, is_fd_exhaustion};
use acl::Acl;
use limits::{IpLimits, LimitExceeded, LimitsConfig, Permit};
use proxy::{Command, Parse, ProxyParser};
use sni::{ClientHelloParser, Hello, SniRoutes};
use step::Outgoing;
pub use step::{Accepted, Closing, Cx, End, Record, Recorder, Step};

/// The run-time side of every rule, shared by the engines, the control thread and the admin
/// endpoint for the life of the process.
#[derive(Debug)]
pub struct Runtime {
    pub rules: Vec<RuleRuntime>,
}

impl Runtime {
    /// Builds each rule's pool from the validated config.
    pub fn new(config: &Config) -> Arc<Self> {
        Arc::new(Self::build(config))
    }

    /// The runtime of a reloaded config: as [`Runtime::new`], except that a pool (a rule's
    /// own upstream or one of its routes) whose rule name, route name and upstream settings
    /// are unchanged keeps `previous`'s (member health and counters carry on), a changed one
    /// keeps what the operator set on members still in it (state, weight: matched by
    /// address), and a route that keeps its rule and route names keeps counting where it was.
    pub fn next(config: &Config, previous: &Runtime) -> Arc<Self> {
        let mut rt = Self::build(config);
        for r in &mut rt.rules {
            let Some(p) = previous.rules.iter().find(|p| p.rule.name == r.rule.name) else {
                continue;
            };
            // Admission counts across generations: the older one's live sessions hold their
            // places under `max_connections` and the per-client limits until they end.
            r.gate = p.gate.clone();
            if limits_config(&r.rule) == limits_config(&p.rule) {
                r.limits.clone_from(&p.limits);
            }
            let ups: Vec<(&str, &crate::config::Upstream)> = r.rule.pools().collect();
            for (pool, (_, up)) in r.pools.iter_mut().zip(ups) {
                let before = p
                    .rule
                    .pools()
                    .zip(&p.pools)
                    .find(|((route, _), _)| *route == pool.route);
                if let Some(((_, prev_up), prev)) = before {
                    pool.sessions = prev.sessions.clone();
                    if prev_up == up {
                        pool.pool = prev.pool.clone();
                    } else {
                        // Members still in the pool keep what the operator set on them.
                        pool.pool.inherit_admin(&prev.pool);
                    }
                }
            }
        }
        Arc::new(rt)
    }

    fn build(config: &Config) -> Self {
        let epoch = Instant::now();
        Self {
            rules: config
                .rules
                .iter()
                .enumerate()
                .map(|(index, rule)| RuleRuntime {
                    index,
                    rule: rule.clone(),
                    pools: rule
                        .pools()
                        .map(|(route, up)| RoutePool {
                            route: route.to_string(),
                            pool: Arc::new(Pool::new(
                                &if rule.routes.is_empty() {
                                    rule.name.clone()
                                } else {
                                    format!("{}/{route}", rule.name)
                                },
                                up,
                                epoch,
                            )),
                            sessions: Arc::new(AtomicU64::new(0)),
                            one_to_one: up.one_to_one,
                        })
                        .collect(),
                    default_route: rule.upstream.as_ref().map(|_| rule.routes.len()),
                    sni: (!rule.routes.is_empty()).then(|| {
                        let patterns: Vec<(usize, Vec<String>)> = rule
                            .routes
                            .iter()
                            .enumerate()
                            .map(|(i, r)| (i, r.sni.clone()))
                            .collect();
                        // The config checked every pattern.
                        SniRoutes::new(&patterns).unwrap_or_default()
                    }),
                    acl: (!rule.admission.allow.is_empty() || !rule.admission.deny.is_empty())
                        .then(|| Acl::new(&rule.admission.allow, &rule.admission.deny)),
                    limits: limits_config(rule).map(|c| Arc::new(IpLimits::new(&c, epoch))),
                    trusted: rule
                        .accept_proxy
                        .as_ref()
                        .map(|a| Acl::new(&a.trusted, &[])),
                    live: AtomicU32::new(0),
                    gate: Arc::new(AtomicU32::new(0)),
                    shared_pickers: Mutex::new(Vec::new()),
                    cut: AtomicU64::new(0),
                })
                .collect(),
        }
    }

    pub fn rule(&self, index: usize) -> &RuleRuntime {
        &self.rules[index]
    }

    /// Every pool of every rule (routes included), for the control thread.
    pub fn pools(&self) -> Vec<Arc<Pool>> {
        self.rules
            .iter()
            .flat_map(|r| r.pools.iter().map(|p| p.pool.clone()))
            .collect()
    }

    /// Every pool with its rule and route names, for the member API.
    pub fn named_pools(&self) -> Vec<crate::upstream::admin::NamedPool<'_>> {
        self.rules
            .iter()
            .flat_map(|r| {
                r.pools
                    .iter()
                    .map(move |p| (r.rule.name.as_str(), p.route.as_str(), &*p.pool))
            })
            .collect()
    }

    /// Live sessions across every rule.
    pub fn live(&self) -> u64 {
        self.rules.iter().map(|r| u64::from(r.live())).sum()
    }

    /// Sessions cut by shutdown so far.
    pub fn cut(&self) -> u64 {
        self.rules
            .iter()
            .map(|r| r.cut.load(Ordering::Relaxed))
            .sum()
    }
}

/// The per-client limits `rule` asks for, if any: what the table is built from, and what a
/// reload compares to keep it.
fn limits_config(rule: &Rule) -> Option<LimitsConfig> {
    let a = &rule.admission;
    (a.max_connections_per_ip.is_some() || a.max_new_connections_per_ip.is_some()).then(|| {
        LimitsConfig {
            max_connections_per_ip: a.max_connections_per_ip,
            max_new_connections_per_ip: a.max_new_connections_per_ip,
            // The table's size and keying are part of what must match for a reload to
            // keep it.
            slots: limits::slots_for(rule.max_connections.get()),
            ipv6_prefix: a.per_ip_prefix_v6,
            ipv4_prefix: a.per_ip_prefix_v4,
        }
    })
}

/// Says once that passive health took member `m` of `pool` out, and why.
fn member_down(rt: &RuleRuntime, m: &crate::upstream::Member, pool: &Pool, why: &str) {
    tracing::warn!(
        rule = %rt.rule.name,
        upstream = %m.addr,
        member = %m.name,
        max_fails = pool.max_fails,
        fail_timeout = %crate::config::format_duration(pool.fail_timeout),
        "upstream member down: {why}; out for fail_timeout"
    );
}

/// One upstream pool of a rule: an SNI route's, or the rule's own (the default route).
#[derive(Debug)]
pub struct RoutePool {
    /// The route's name (`"default"` for the rule's own upstream).
    pub route: String,
    pub pool: Arc<Pool>,
    /// Sessions sent to this route (`ringfwd_connections_accepted_total{route}`), shared
    /// with the route's namesake in the next config after a reload.
    sessions: Arc<AtomicU64>,
    /// The pool's members are port ranges mapped one-to-one onto the rule's listen range.
    one_to_one: bool,
}

impl RoutePool {
    /// A session is sent to this route: counted, and given the members it dials from.
    fn enter(&self) -> Arc<MemberSet> {
        self.sessions.fetch_add(1, Ordering::Relaxed);
        self.pool.members()
    }

    /// Sessions sent to this route so far.
    pub fn sessions(&self) -> u64 {
        self.sessions.load(Ordering::Relaxed)
    }
}

/// One rule at run time: its config, its pools and its admission gate.
#[derive(Debug)]
pub struct RuleRuntime {
    pub index: usize,
    pub rule: Rule,
    /// The SNI routes' pools in config order, then the rule's own (the default route).
    pub pools: Vec<RoutePool>,
    /// Index in `pools` of the default route, if the rule has an upstream of its own.
    default_route: Option<usize>,
    /// Server-name matcher, for a rule with routes.
    sni: Option<SniRoutes>,
    /// `allow`/`deny`, if any entry was configured.
    acl: Option<Acl>,
    /// Per-client limits, if any was configured (a fixed table shared by every worker, and
    /// by the rule's namesake in the next generation while its limits are unchanged).
    limits: Option<Arc<IpLimits>>,
    /// `accept_proxy`: the sources allowed to send a PROXY header.
    trusted: Option<Acl>,
    /// Live sessions of this rule in this config generation, across every worker.
    live: AtomicU32,
    /// Live sessions of this rule in every generation still running, shared with the rule's
    /// namesake after a reload: the `max_connections` gate, so that a rule never holds more
    /// than its cap while older generations drain.
    gate: Arc<AtomicU32>,
    /// Balancer state (one per pool) for engines whose connections are not tied to one
    /// thread; built on first use.
    shared_pickers: Mutex<Vec<Picker>>,
    /// Sessions ended by shutdown before they finished (grace period over or second signal).
    cut: AtomicU64,
}

/// Where to connect next, or why not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dial {
    Connect(SocketAddr),
    /// No attempt left: the client is closed with this reason.
    GiveUp(CloseReason),
}

/// A session's preamble state: the PROXY header it reads or sends, the ClientHello it routes
/// on.
#[derive(Debug)]
struct ProxyState {
    /// The address the client connected to (for the PROXY header sent upstream).
    local: Option<SocketAddr>,
    /// `accept_proxy`: the header has not been read yet.
    awaits_header: bool,
    parser: ProxyParser,
    /// Length of the PROXY header read (0 without one): the client's stream starts there.
    header_len: usize,
    /// A rule with routes, until the ClientHello is read: its parser (boxed, and only
    /// then, as it is a few hundred bytes: a PROXY-only session does not carry it).
    hello: Option<Box<ClientHelloParser>>,
    /// What goes upstream before the relay, from the preamble's end until it is sent.
    outgoing: Option<Outgoing>,
    /// Client bytes sent upstream with the preamble (counted into the record's bytes; only
    /// a session with a preamble has any, so they are kept here, out of line).
    early_sent: u64,
}

/// What reading a client's preamble (a PROXY header, then a ClientHello on a rule with
/// routes) came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderStep {
    /// Read more (within the limits of [`RuleRuntime::header_limits`]).
    NeedMore,
    /// The PROXY header is `consumed` bytes long (0 without one); what follows is the
    /// client's stream, the ClientHello included, to be relayed unchanged.
    Ready { consumed: usize },
    /// Close the connection with RST (counted).
    Reject(RejectReason),
}

impl RuleRuntime {
    /// Live sessions of this rule.
    pub fn live(&self) -> u32 {
        self.live.load(Ordering::Relaxed)
    }

    /// Admits a freshly accepted connection, or says why not (counted either way). A rejected
    /// connection must be closed with RST at once.
    ///
    /// Without `accept_proxy`, the ACL and the per-client limits are checked here on the
    /// peer's address; with it, only that the peer is a trusted proxy — the client's own
    /// address is known once the header is read ([`Session::feed_header`]).
    ///
    /// # Errors
    /// The reason the connection is turned away.
    ///
    /// The session is built whole in the returned value, its route (a rule without routes
    /// has only its own) and listen port included: it is the largest thing a connection
    /// holds, and every copy of it costs on each connection.
    fn admit<R: Recorder>(
        &self,
        rec: &R,
        a: Accepted,
        now: Instant,
        draining: bool,
    ) -> Result<Session, RejectReason> {
        let client = a.peer;
        let reject = |why| {
            rec.rejected(why);
            Err(why)
        };
        if draining {
            return reject(RejectReason::Shutdown);
        }
        let ip = client.map(|c| c.ip());
        match (&self.trusted, ip) {
            (Some(trusted), Some(ip)) if !trusted.admits(ip) => {
                return reject(RejectReason::UntrustedProxy);
            }
            (Some(_), None) => return reject(RejectReason::UntrustedProxy),
            (Some(_), Some(_)) => {}
            (None, _) => {
                if let Err(why) = self.check_acl(ip) {
                    return reject(why);
                }
            }
        }
        if self.gate.fetch_add(1, Ordering::AcqRel) >= self.rule.max_connections.get() {
            self.gate.fetch_sub(1, Ordering::AcqRel);
            return reject(RejectReason::MaxConnections);
        }
        self.live.fetch_add(1, Ordering::AcqRel);
        let routes = self.sni.is_some();
        let permit = if self.trusted.is_none() {
            match self.acquire(ip, now) {
                Ok(p) => p,
                Err(why) => {
                    self.live.fetch_sub(1, Ordering::AcqRel);
                    self.gate.fetch_sub(1, Ordering::AcqRel);
                    return reject(why);
                }
            }
        } else {
            Permit::none()
        };
        rec.accepted();
        // A rule with routes picks its route from the ClientHello; one without has its own.
        let route = if routes { None } else { self.default_route };
        let pool = route.map(|i| &self.pools[i]);
        let (listen_port, port_offset) = self.listen_port(a.port);
        Ok(Session {
            accepted_at: now,
            client,
            proxy: (self.trusted.is_some() || self.wants_local_addr() || routes).then(|| {
                Box::new(ProxyState {
                    local: None,
                    awaits_header: self.trusted.is_some(),
                    parser: ProxyParser::new(),
                    header_len: 0,
                    hello: routes.then(|| Box::new(ClientHelloParser::new())),
                    outgoing: None,
                    early_sent: 0,
                })
            }),
            permit,
            route: route.and_then(|i| u16::try_from(i).ok()),
            set: pool.map(RoutePool::enter),
            tried: Tried::default(),
            last_error: None,
            connected: false,
            listen_port,
            port_offset,
            one_to_one: pool.is_some_and(|p| p.one_to_one),
            dead_on_arrival: a.dead,
        })
    }

    /// The listen port a client connected to on `port`, for a rule that listens on a port
    /// range (the access log names it; `None` for a single-port rule), and its offset in the
    /// range (a one-to-one upstream range dials the member's port at the same offset).
    fn listen_port(&self, port: u16) -> (Option<u16>, u16) {
        let listen = &self.rule.listen;
        if !listen.is_range() {
            return (None, 0);
        }
        let offset = if listen.ports().contains(&port) {
            port - listen.port()
        } else {
            0
        };
        (Some(port), offset)
    }

    /// The pool of route `index`.
    fn pool(&self, index: usize) -> &Pool {
        &self.pools[index].pool
    }

    /// The rule's pools' balancer states, one per pool, for a worker that keeps its own
    /// (`seed` distinct per worker).
    pub fn pickers(&self, seed: u64) -> Vec<Picker> {
        (0..self.pools.len())
            .map(|i| Picker::new(seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)))
            .collect()
    }

    fn check_acl(&self, ip: Option<IpAddr>) -> Result<(), RejectReason> {
        match (&self.acl, ip) {
            (Some(acl), Some(ip)) if !acl.admits(ip) => Err(RejectReason::Acl),
            (Some(_), None) => Err(RejectReason::Acl),
            _ => Ok(()),
        }
    }

    fn acquire(&self, ip: Option<IpAddr>, now: Instant) -> Result<Permit, RejectReason> {
        match (&self.limits, ip) {
            (Some(limits), Some(ip)) => limits.try_acquire(ip, now).map_err(|e| match e {
                LimitExceeded::PerIp => RejectReason::PerIpLimit,
                LimitExceeded::Rate => RejectReason::RateLimit,
            }),
            _ => Ok(Permit::none()),
        }
    }

    /// The per-client table's `[evictions, untracked]` counters ([`IpLimits::evictions`],
    /// [`IpLimits::untracked`]); `None` for a rule without per-client limits.
    pub fn client_table_counts(&self) -> Option<[u64; 2]> {
        self.limits.as_ref().map(|l| [l.evictions(), l.untracked()])
    }

    /// Whether sessions of this rule need the accepted socket's own address
    /// ([`Session::set_local`]): to put it in the PROXY header sent upstream.
    pub fn wants_local_addr(&self) -> bool {
        self.rule.proxy_protocol != ProxyProtocol::Off
    }

    /// The longest a client's preamble may be (what an engine's header buffer may grow to:
    /// a PROXY header, then a ClientHello on a rule with routes), and how long it may take
    /// from accept.
    pub fn header_limits(&self) -> (usize, Duration) {
        let proxy = if self.trusted.is_some() {
            ProxyParser::new().max_header_len()
        } else {
            0
        };
        let hello = if self.sni.is_some() {
            ClientHelloParser::new().max_buffer_len()
        } else {
            0
        };
        let timeout = if proxy + hello > 0 {
            self.rule.header_timeout
        } else {
            Duration::ZERO
        };
        (proxy + hello, timeout)
    }

    /// Runs `f` with the rule's shared pickers, one per pool (for the std and tokio engines).
    pub fn with_shared_picker<R>(&self, f: impl FnOnce(&mut [Picker]) -> R) -> R {
        let mut p = self
            .shared_pickers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if p.is_empty() {
            *p = self.pickers(0x9e37_79b9_7f4a_7c15 ^ self.index as u64);
        }
        f(&mut p)
    }
}

/// One admitted connection's progress through the pipeline.
#[derive(Debug)]
pub struct Session {
    pub accepted_at: Instant,
    /// The client: the peer, or the source a PROXY header named.
    pub client: Option<SocketAddr>,
    /// PROXY protocol state, only for rules that read or send a header (kept out of line:
    /// every other connection pays one pointer for it).
    proxy: Option<Box<ProxyState>>,
    /// The client's place under the per-client limits.
    permit: Permit,
    /// Index of the route (pool) the session was sent to, once known.
    route: Option<u16>,
    /// The member set this session dials from (kept to its end: indices stay valid); taken
    /// from the route's pool when the route is chosen.
    set: Option<Arc<MemberSet>>,
    /// The members tried, in order: the last is the current (or last) attempt's.
    tried: Tried,
    last_error: Option<ConnectError>,
    connected: bool,
    /// The port the client connected to, for a rule that listens on a port range.
    listen_port: Option<u16>,
    /// The listen port's offset in its range (0 for a single-port rule).
    port_offset: u16,
    /// The session's pool maps the listen range one-to-one: every member's port moves by
    /// `port_offset`.
    one_to_one: bool,
    /// The client reset or vanished in the listen queue ([`Accepted::dead`]).
    dead_on_arrival: bool,
}

impl Session {
    /// Member `i` of `set`'s address, moved by the session's one-to-one port offset.
    fn target(&self, set: &MemberSet, i: usize) -> SocketAddr {
        self.target_of(&set.members[i])
    }

    fn target_of(&self, m: &crate::upstream::Member) -> SocketAddr {
        let mut addr = m.addr;
        if self.one_to_one && self.port_offset != 0 {
            addr.set_port(addr.port().saturating_add(self.port_offset));
        }
        addr
    }

    /// Records the address the client connected to (see [`RuleRuntime::wants_local_addr`]).
    fn set_local(&mut self, local: Option<SocketAddr>) {
        if let Some(p) = &mut self.proxy {
            p.local = local;
        }
    }

    /// Whether a preamble must be read from the client before dialing: a PROXY header
    /// (`accept_proxy`), a ClientHello (a rule with routes), or both in that order.
    fn awaits_header(&self) -> bool {
        self.proxy
            .as_ref()
            .is_some_and(|p| p.awaits_header || p.hello.is_some())
    }

    /// Feeds every byte read from the client so far (each call extends the previous one)
    /// while [`Session::awaits_header`].
    ///
    /// First the PROXY header, if the rule accepts one: its client becomes the session's
    /// client (ACL and limits are checked on it here). Then, on a rule with routes, the
    /// ClientHello after it, never consumed: its server name picks the route (exact names
    /// before wildcards); no name, no match, bytes that are not TLS or a malformed or
    /// oversized hello go to the default route, and with none the session is rejected as
    /// `no_route`. On `Ready`, the bytes after `consumed` belong to the stream: relay them
    /// first. A rejection is counted; close with `CloseReason::Rejected`.
    fn feed_header<R: Recorder>(
        &mut self,
        rt: &RuleRuntime,
        shard: &R,
        read: &[u8],
        now: Instant,
    ) -> HeaderStep {
        let Some(state) = self.proxy.as_mut() else {
            return HeaderStep::Ready { consumed: 0 };
        };
        if state.awaits_header {
            let (header, consumed) = match state.parser.feed(read) {
                Parse::NeedMore { .. } => return HeaderStep::NeedMore,
                Parse::Invalid(_) => {
                    return self.reject_header(shard, RejectReason::BadProxyHeader);
                }
                Parse::Done { header, consumed } => (header, consumed),
            };
            state.awaits_header = false;
            state.header_len = consumed;
            if let (Command::Proxy, Some(src)) = (header.command, header.source) {
                self.client = Some(src);
                state.local = header.destination.or(state.local);
            }
            let ip = self.client.map(|c| c.ip());
            match rt.check_acl(ip).and_then(|()| rt.acquire(ip, now)) {
                Ok(permit) => self.permit = permit,
                Err(why) => return self.reject_header(shard, why),
            }
        }
        let consumed = state.header_len;
        if let Some(hello) = &mut state.hello {
            let stream = &read[consumed.min(read.len())..];
            if stream.is_empty() {
                return HeaderStep::NeedMore;
            }
            let name = match hello.feed(stream) {
                Hello::NeedMore { .. } => return HeaderStep::NeedMore,
                Hello::Done { sni } => sni,
                Hello::NotTls | Hello::Invalid(_) => None,
            };
            state.hello = None;
            let matched = match (&rt.sni, &name) {
                (Some(routes), Some(name)) => routes.route(name),
                _ => None,
            };
            let route = matched.or(rt.default_route);
            if route.is_none() {
                return self.reject_header(shard, RejectReason::NoRoute);
            }
            self.set_route(rt, route);
        }
        HeaderStep::Ready { consumed }
    }

    /// Sends the session to route `index` of its rule (counted), or to none.
    fn set_route(&mut self, rt: &RuleRuntime, index: Option<usize>) {
        if let Some(i) = index {
            let pool = &rt.pools[i];
            self.one_to_one = pool.one_to_one;
            self.route = u16::try_from(i).ok();
            self.set = Some(pool.enter());
        }
    }

    /// The route the session was sent to (`"default"` for the rule's own upstream), once
    /// known.
    pub fn route<'a>(&self, rt: &'a RuleRuntime) -> Option<&'a str> {
        self.route.map(|i| rt.pools[usize::from(i)].route.as_str())
    }

    /// The client closed, or the preamble did not come in time: the reason to close with.
    /// A late or cut-short PROXY header and a late ClientHello are counted as rejections; a
    /// client that closes before finishing its ClientHello simply ends.
    fn header_failed<R: Recorder>(&mut self, shard: &R, timed_out: bool) -> CloseReason {
        let hello_only = self
            .proxy
            .as_ref()
            .is_some_and(|p| !p.awaits_header && p.hello.is_some());
        let why = if timed_out {
            RejectReason::ProxyHeaderTimeout
        } else if hello_only {
            if let Some(p) = &mut self.proxy {
                p.hello = None;
            }
            return CloseReason::Eof;
        } else {
            RejectReason::BadProxyHeader
        };
        match self.reject_header(shard, why) {
            HeaderStep::Reject(r) => CloseReason::Rejected(r),
            HeaderStep::NeedMore | HeaderStep::Ready { .. } => CloseReason::Rejected(why),
        }
    }

    fn reject_header<R: Recorder>(&mut self, shard: &R, why: RejectReason) -> HeaderStep {
        if let Some(p) = &mut self.proxy {
            p.awaits_header = false;
            p.hello = None;
        }
        shard.rejected(why);
        HeaderStep::Reject(why)
    }

    /// The PROXY protocol header to send to the upstream before any relayed byte, written
    /// into `out`; returns its length (0 when the rule sends none).
    pub fn upstream_header(&self, rt: &RuleRuntime, out: &mut [u8; proxy::V1_BUF_LEN]) -> usize {
        let unknown = SocketAddr::from(([0, 0, 0, 0], 0));
        let (src, dst) = (
            self.client.unwrap_or(unknown),
            self.proxy.as_ref().and_then(|p| p.local).unwrap_or(unknown),
        );
        match rt.rule.proxy_protocol {
            ProxyProtocol::Off => 0,
            ProxyProtocol::V1 => proxy::encode_v1(src, dst, out),
            ProxyProtocol::V2 => {
                let mut v2 = [0u8; proxy::V2_BUF_LEN];
                let n = proxy::encode_v2(src, dst, &mut v2);
                out[..n].copy_from_slice(&v2[..n]);
                n
            }
        }
    }

    /// The next member to connect to, or the end of the session when every attempt was used.
    /// `pickers` holds one balancer state per pool of the rule ([`RuleRuntime::pickers`]).
    fn dial(&mut self, rt: &RuleRuntime, pickers: &mut [Picker], now: Instant) -> Dial {
        let (Some(route), Some(set)) = (self.route, &self.set) else {
            return Dial::GiveUp(CloseReason::Rejected(RejectReason::NoRoute));
        };
        let route = usize::from(route);
        let pool = rt.pool(route);
        let give_up = CloseReason::Upstream(self.last_error.unwrap_or(ConnectError::Other));
        if self.tried.len() >= pool.max_attempts(set) {
            return Dial::GiveUp(give_up);
        }
        let now_ms = pool.clock.ms(now);
        let client = self.client.map(|c| c.ip());
        match pickers[route].pick(set, pool.balance, client, &self.tried, now_ms) {
            // `insert` cannot fail here (attempts stop at `MAX_ATTEMPTS`, members at 2^16);
            // were it to, the session must not dial a member it does not remember.
            Some(i) if self.tried.insert(i) => Dial::Connect(self.target(set, i)),
            Some(_) | None => Dial::GiveUp(give_up),
        }
    }

    /// Where this session's upstream connections leave from: its route's egress options
    /// (`source`, `mark`, `interface`, `transparent`, `upstream_mptcp`) and its client, the
    /// address `transparent` connects from (the PROXY header's source where one was trusted).
    pub fn origin<'a>(&self, rt: &'a RuleRuntime) -> crate::net::Origin<'a> {
        let egress = self.route.map_or(&crate::config::Egress::PLAIN, |i| {
            &rt.pool(usize::from(i)).egress
        });
        crate::net::Origin {
            egress,
            client: self.client,
        }
    }

    /// The member of the current (or last) attempt.
    fn member(&self) -> Option<&crate::upstream::Member> {
        Some(&self.set.as_ref()?.members[self.tried.last()?])
    }

    /// Connect attempts made so far.
    pub fn attempts(&self) -> usize {
        self.tried.len()
    }

    /// The address of the member of the current (or last) attempt.
    pub fn upstream(&self) -> Option<SocketAddr> {
        self.member().map(|m| self.target_of(m))
    }

    /// Whether the session reached an upstream.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// The upstream connect completed.
    fn connected<R: Recorder>(&mut self, shard: &R, now: Instant) {
        shard.connected(now.saturating_duration_since(self.accepted_at));
        if let Some(m) = self.member() {
            m.connected();
            self.connected = true;
        }
    }

    /// The upstream connect failed with `errno` (positive). Counts it against the member
    /// (passive health), logs it (rate-limited per member); the engine then dials again.
    fn connect_failed<R: Recorder>(
        &mut self,
        rt: &RuleRuntime,
        shard: &R,
        errno: i32,
        now: Instant,
    ) {
        let kind = ConnectError::from_errno(errno);
        self.last_error = Some(kind);
        shard.connect_error(kind);
        let (Some(m), Some(route)) = (self.member(), self.route) else {
            return;
        };
        let pool = rt.pool(usize::from(route));
        let now_ms = pool.clock.ms(now);
        let transition = m.connect_failed(kind, errno, now_ms, pool.max_fails, pool.fail_timeout);
        if let Some(held_back) = m.may_log(now_ms) {
            let error = if kind == ConnectError::Timeout {
                format!(
                    "timed out after {}",
                    crate::config::format_duration(rt.rule.connect_timeout)
                )
            } else {
                describe_errno(errno)
            };
            let left = self
                .set
                .as_ref()
                .map_or(0, |set| pool.max_attempts(set))
                .saturating_sub(self.tried.len());
            tracing::warn!(
                rule = %rt.rule.name,
                upstream = %self.target_of(m),
                %error,
                attempt = self.tried.len(),
                attempts_left = left,
                held_back,
                "upstream connect failed"
            );
        }
        if transition == Some(Transition::Down) {
            member_down(rt, m, pool, "too many connect failures");
        }
    }

    /// The upstream socket could not even be created. Out of descriptors or socket memory
    /// ends the session (`rejected{fd_exhausted}`); anything else (say, an address family
    /// this host lacks) is the member's failure, and `None` tells the engine to dial again.
    fn socket_failed<R: Recorder>(
        &mut self,
        rt: &RuleRuntime,
        shard: &R,
        errno: i32,
        now: Instant,
    ) -> Option<CloseReason> {
        if is_fd_exhaustion(errno) {
            shard.rejected(RejectReason::FdExhausted);
            return Some(CloseReason::FdExhausted);
        }
        self.connect_failed(rt, shard, errno, now);
        None
    }

    /// The member said nothing within `first_byte_timeout` although the client spoke: its
    /// passive-health failure (shared by every engine; the engine only noticed the time).
    fn no_first_byte(&self, rt: &RuleRuntime, m: &crate::upstream::Member, now: Instant) {
        let Some(route) = self.route else { return };
        let pool = rt.pool(usize::from(route));
        if m.no_first_byte(pool.clock.ms(now), pool.max_fails, pool.fail_timeout)
            == Some(Transition::Down)
        {
            member_down(rt, m, pool, "no answer within first_byte_timeout");
        }
    }

    /// Counts the end, frees the session's place under `max_connections`, per client and on
    /// its member, and writes its record. Only [`Session::close`] calls it, which takes
    /// the session by value (so this happens once).
    fn record<R: Recorder>(&mut self, rt: &RuleRuntime, rec: &R, end: step::End, now: Instant) {
        let duration = now.saturating_duration_since(self.accepted_at);
        rt.live.fetch_sub(1, Ordering::AcqRel);
        rt.gate.fetch_sub(1, Ordering::AcqRel);
        if let Some(limits) = &rt.limits {
            limits.release(std::mem::replace(&mut self.permit, Permit::none()));
        }
        if end.reason == CloseReason::Shutdown {
            rt.cut.fetch_add(1, Ordering::Relaxed);
        }
        if let (true, Some(m)) = (self.connected, self.member()) {
            m.released();
            if end.reason == CloseReason::FirstByteTimeout {
                self.no_first_byte(rt, m, now);
            }
        }
        rec.closed(&Record {
            rule: &rt.rule.name,
            route: self.route(rt).unwrap_or("-"),
            port: self.listen_port,
            client: self.client,
            upstream: self.upstream(),
            attempts: self.tried.len() as u32,
            bytes: end.bytes,
            duration,
            end,
        });
    }
}

#[cfg(test)]
mod tests;
