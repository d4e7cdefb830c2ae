//! The session pipeline every engine shares: everything that happens to a connection before,
//! around and after the relay, decided once and free of I/O.
//!
//! ```text
//!  accept ─► admit ─► pick upstream ─► connect ─► (retry another member) ─► relay ─► close
//!            (cap,     (balance,         (engine)   (passive health,           (engine)  (reason,
//!             drain)    health tiers)                 failover)                           record)
//! ```
//! An engine accepts, asks [`RuleRuntime::admit`] for a [`Session`], asks the session where to
//! connect ([`Session::dial`]), reports how the connect went ([`Session::connected`],
//! [`Session::connect_failed`], [`Session::socket_failed`]), relays, and hands the session its
//! end ([`Session::finish`]), which counts it, releases its slot and member, and writes the
//! access-log record. The engine never classifies an errno, never chooses a member, never
//! builds a record: [`outcome`] and this module do, for std, tokio and io_uring alike.
//!
//! Shared state (the per-rule live count, member health and counters) is atomics; the one
//! mutable piece a pick needs — the balancer's state — is a [`Picker`] the caller owns (one
//! per io_uring worker; one behind a mutex for the engines whose tasks move between threads).

pub mod acl;
pub mod limits;
pub mod outcome;
pub mod proxy;
pub mod sni;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{Config, ProxyProtocol, Rule};
use crate::metrics::{Metrics, SessionRecord, Shard};
use crate::upstream::member::{Transition, describe_errno};
use crate::upstream::{MemberSet, Picker, Pool, Tried};
use acl::Acl;
use limits::{IpLimits, LimitExceeded, LimitsConfig, Permit};
use outcome::{CloseReason, ConnectError, RejectReason, is_fd_exhaustion};
use proxy::{Command, Parse, ProxyParser};

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

    /// The runtime of a reloaded config: as [`Runtime::new`], except that a rule whose name
    /// and upstream settings are unchanged keeps `previous`'s pool (member health and
    /// counters carry on).
    pub fn next(config: &Config, previous: &Runtime) -> Arc<Self> {
        let mut rt = Self::build(config);
        for r in &mut rt.rules {
            if let Some(p) = previous
                .rules
                .iter()
                .find(|p| p.rule.name == r.rule.name && p.rule.upstream == r.rule.upstream)
            {
                r.pool = p.pool.clone();
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
                    pool: Arc::new(Pool::new(&rule.name, &rule.upstream, epoch)),
                    acl: (!rule.admission.allow.is_empty() || !rule.admission.deny.is_empty())
                        .then(|| Acl::new(&rule.admission.allow, &rule.admission.deny)),
                    limits: (rule.admission.max_connections_per_ip.is_some()
                        || rule.admission.max_new_connections_per_ip.is_some())
                    .then(|| {
                        IpLimits::new(
                            &LimitsConfig {
                                max_connections_per_ip: rule.admission.max_connections_per_ip,
                                max_new_connections_per_ip: rule
                                    .admission
                                    .max_new_connections_per_ip,
                                ..LimitsConfig::default()
                            },
                            epoch,
                        )
                    }),
                    trusted: rule
                        .accept_proxy
                        .as_ref()
                        .map(|a| Acl::new(&a.trusted, &[])),
                    live: AtomicU32::new(0),
                    shared_picker: Mutex::new(Picker::new(0x9e37_79b9_7f4a_7c15 ^ index as u64)),
                    cut: AtomicU64::new(0),
                })
                .collect(),
        }
    }

    pub fn rule(&self, index: usize) -> &RuleRuntime {
        &self.rules[index]
    }

    /// Every rule's pool, for the control thread.
    pub fn pools(&self) -> Vec<Arc<Pool>> {
        self.rules.iter().map(|r| r.pool.clone()).collect()
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

/// One rule at run time: its config, its pool and its admission gate.
#[derive(Debug)]
pub struct RuleRuntime {
    pub index: usize,
    pub rule: Rule,
    pub pool: Arc<Pool>,
    /// `allow`/`deny`, if any entry was configured.
    acl: Option<Acl>,
    /// Per-client limits, if any was configured (a fixed table shared by every worker).
    limits: Option<IpLimits>,
    /// `accept_proxy`: the sources allowed to send a PROXY header.
    trusted: Option<Acl>,
    /// Live sessions of this rule, across every worker (the `max_connections` gate).
    live: AtomicU32,
    /// Balancer state for engines whose connections are not tied to one thread.
    shared_picker: Mutex<Picker>,
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

/// A session's PROXY protocol state.
#[derive(Debug)]
struct ProxyState {
    /// The address the client connected to (for the PROXY header sent upstream).
    local: Option<SocketAddr>,
    /// `accept_proxy`: the header has not been read yet.
    awaits_header: bool,
    parser: ProxyParser,
}

/// What reading a client's PROXY header came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderStep {
    /// Read more (within the limits of [`RuleRuntime::header_limits`]).
    NeedMore,
    /// The header is `consumed` bytes long; what follows is the client's stream.
    Ready { consumed: usize },
    /// Close the connection with RST (counted).
    Reject(RejectReason),
}

/// How a relay ended, as the engine saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct End<'a> {
    pub reason: CloseReason,
    /// Bytes delivered `[client → upstream, upstream → client]`.
    pub bytes: [u64; 2],
    /// "copy", "splice" or "copy+splice".
    pub path: &'a str,
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
    pub fn admit(
        &self,
        shard: &Shard,
        client: Option<SocketAddr>,
        now: Instant,
        draining: bool,
    ) -> Result<Session, RejectReason> {
        let reject = |why| {
            shard.rejected(why);
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
        if self.live.fetch_add(1, Ordering::AcqRel) >= self.rule.max_connections.get() {
            self.live.fetch_sub(1, Ordering::AcqRel);
            return reject(RejectReason::MaxConnections);
        }
        let permit = if self.trusted.is_none() {
            match self.acquire(ip, now) {
                Ok(p) => p,
                Err(why) => {
                    self.live.fetch_sub(1, Ordering::AcqRel);
                    return reject(why);
                }
            }
        } else {
            Permit::none()
        };
        shard.accepted();
        Ok(Session {
            accepted_at: now,
            client,
            proxy: (self.trusted.is_some() || self.wants_local_addr()).then(|| {
                Box::new(ProxyState {
                    local: None,
                    awaits_header: self.trusted.is_some(),
                    parser: ProxyParser::new(),
                })
            }),
            permit,
            set: self.pool.members(),
            current: None,
            tried: Tried::default(),
            last_error: None,
            connected: false,
        })
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

    /// Whether sessions of this rule need the accepted socket's own address
    /// ([`Session::set_local`]): to put it in the PROXY header sent upstream.
    pub fn wants_local_addr(&self) -> bool {
        self.rule.proxy_protocol != ProxyProtocol::Off
    }

    /// The longest a PROXY header from a client may be (what an engine's header buffer may
    /// grow to), and how long it may take.
    pub fn header_limits(&self) -> (usize, Duration) {
        (
            ProxyParser::new().max_header_len(),
            self.rule
                .accept_proxy
                .as_ref()
                .map_or(Duration::ZERO, |a| a.header_timeout),
        )
    }

    /// Runs `f` with the rule's shared picker (for the std and tokio engines).
    pub fn with_shared_picker<R>(&self, f: impl FnOnce(&mut Picker) -> R) -> R {
        let mut p = self
            .shared_picker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
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
    /// The member set this session dials from (kept to its end: indices stay valid).
    set: Arc<MemberSet>,
    /// Index of the member of the current (or last) attempt.
    current: Option<u32>,
    tried: Tried,
    last_error: Option<ConnectError>,
    connected: bool,
}

impl Session {
    /// Records the address the client connected to (see [`RuleRuntime::wants_local_addr`]).
    pub fn set_local(&mut self, local: Option<SocketAddr>) {
        if let Some(p) = &mut self.proxy {
            p.local = local;
        }
    }

    /// Whether a PROXY header must be read from the client before dialing.
    pub fn awaits_header(&self) -> bool {
        self.proxy.as_ref().is_some_and(|p| p.awaits_header)
    }

    /// Feeds every byte read from the client so far (each call extends the previous one)
    /// while [`Session::awaits_header`]. On `Ready`, the header's client is the session's
    /// client (ACL and limits are checked on it here) and the bytes after `consumed` belong
    /// to the stream: relay them first. A rejection is counted; close with
    /// `CloseReason::Rejected`.
    pub fn feed_header(
        &mut self,
        rt: &RuleRuntime,
        shard: &Shard,
        read: &[u8],
        now: Instant,
    ) -> HeaderStep {
        let Some(state) = self.proxy.as_mut().filter(|p| p.awaits_header) else {
            return HeaderStep::Ready { consumed: 0 };
        };
        let (header, consumed) = match state.parser.feed(read) {
            Parse::NeedMore { .. } => return HeaderStep::NeedMore,
            Parse::Invalid(_) => return self.reject_header(shard, RejectReason::BadProxyHeader),
            Parse::Done { header, consumed } => (header, consumed),
        };
        state.awaits_header = false;
        if let (Command::Proxy, Some(src)) = (header.command, header.source) {
            self.client = Some(src);
            state.local = header.destination.or(state.local);
        }
        let ip = self.client.map(|c| c.ip());
        let admitted = rt.check_acl(ip).and_then(|()| rt.acquire(ip, now));
        match admitted {
            Ok(permit) => {
                self.permit = permit;
                HeaderStep::Ready { consumed }
            }
            Err(why) => self.reject_header(shard, why),
        }
    }

    /// The client closed, or the header did not come in time: counted, and the reason to
    /// close with.
    pub fn header_failed(&mut self, shard: &Shard, timed_out: bool) -> CloseReason {
        let why = if timed_out {
            RejectReason::ProxyHeaderTimeout
        } else {
            RejectReason::BadProxyHeader
        };
        match self.reject_header(shard, why) {
            HeaderStep::Reject(r) => CloseReason::Rejected(r),
            HeaderStep::NeedMore | HeaderStep::Ready { .. } => CloseReason::Rejected(why),
        }
    }

    fn reject_header(&mut self, shard: &Shard, why: RejectReason) -> HeaderStep {
        if let Some(p) = &mut self.proxy {
            p.awaits_header = false;
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
    pub fn dial(&mut self, rt: &RuleRuntime, picker: &mut Picker, now: Instant) -> Dial {
        let give_up = CloseReason::Upstream(self.last_error.unwrap_or(ConnectError::Other));
        if self.tried.len() >= rt.pool.max_attempts(&self.set) {
            return Dial::GiveUp(give_up);
        }
        let now_ms = rt.pool.clock.ms(now);
        let client = self.client.map(|c| c.ip());
        match picker.pick(&self.set, rt.pool.balance, client, &self.tried, now_ms) {
            Some(i) => {
                self.tried.insert(i);
                self.current = Some(i as u32);
                Dial::Connect(self.set.members[i].addr)
            }
            None => Dial::GiveUp(give_up),
        }
    }

    /// Connect attempts made so far.
    pub fn attempts(&self) -> usize {
        self.tried.len()
    }

    /// The member of the current (or last) attempt.
    pub fn upstream(&self) -> Option<SocketAddr> {
        self.current.map(|i| self.set.members[i as usize].addr)
    }

    /// Whether the session reached an upstream.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// The upstream connect completed.
    pub fn connected(&mut self, shard: &Shard, now: Instant) {
        shard.connected(now.saturating_duration_since(self.accepted_at));
        if let Some(i) = self.current {
            self.set.members[i as usize].connected();
            self.connected = true;
        }
    }

    /// The upstream connect failed with `errno` (positive). Counts it against the member
    /// (passive health), logs it (rate-limited per member); the engine then dials again.
    pub fn connect_failed(&mut self, rt: &RuleRuntime, shard: &Shard, errno: i32, now: Instant) {
        let kind = ConnectError::from_errno(errno);
        self.last_error = Some(kind);
        shard.connect_error(kind);
        let Some(i) = self.current else { return };
        let m = &self.set.members[i as usize];
        let pool = &rt.pool;
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
            let left = pool
                .max_attempts(&self.set)
                .saturating_sub(self.tried.len());
            tracing::warn!(
                rule = %rt.rule.name,
                upstream = %m.addr,
                %error,
                attempt = self.tried.len(),
                attempts_left = left,
                held_back,
                "upstream connect failed"
            );
        }
        if transition == Some(Transition::Down) {
            tracing::warn!(
                rule = %rt.rule.name,
                upstream = %m.addr,
                member = %m.name,
                max_fails = pool.max_fails,
                fail_timeout = %crate::config::format_duration(pool.fail_timeout),
                "upstream member down: too many connect failures; out for fail_timeout"
            );
        }
    }

    /// The upstream socket could not even be created. Out of descriptors or socket memory
    /// ends the session (`rejected{fd_exhausted}`); anything else (say, an address family
    /// this host lacks) is the member's failure, and `None` tells the engine to dial again.
    pub fn socket_failed(
        &mut self,
        rt: &RuleRuntime,
        shard: &Shard,
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

    /// The session is over: counts it, frees its place under `max_connections` and on its
    /// member, and writes its access-log record.
    pub fn finish(
        mut self,
        rt: &RuleRuntime,
        metrics: &Metrics,
        shard: &Shard,
        end: End<'_>,
        now: Instant,
    ) {
        let duration = now.saturating_duration_since(self.accepted_at);
        shard.closed(duration);
        rt.live.fetch_sub(1, Ordering::AcqRel);
        if let Some(limits) = &rt.limits {
            limits.release(std::mem::replace(&mut self.permit, Permit::none()));
        }
        if end.reason == CloseReason::Shutdown {
            rt.cut.fetch_add(1, Ordering::Relaxed);
        }
        if let (true, Some(i)) = (self.connected, self.current) {
            self.set.members[i as usize].released();
        }
        metrics.log_session(&SessionRecord {
            rule: &rt.rule.name,
            client: self.client,
            upstream: self.upstream(),
            attempts: self.tried.len() as u32,
            bytes_c2u: end.bytes[0],
            bytes_u2c: end.bytes[1],
            duration,
            path: end.path,
            reason: end.reason,
        });
    }
}

#[cfg(test)]
mod tests;
