//! Per-rule, per-core measurements: counters and latency histograms.
//!
//! Every worker (a uring core, a tokio runtime thread, a std connection thread) records into
//! its own [`Shard`] of a rule with relaxed atomic adds — no lock on the data path. Readers
//! (the admin endpoint, tests, `ringfwd stats`) merge the shards into a [`RuleSnapshot`].
//!
//! The export side lives in the submodules: [`prom`] (Prometheus/OpenMetrics text),
//! [`report`] (the JSON `/stats` document `ringfwd stats` reads), [`admin`] (the HTTP listener
//! serving both plus raw HDR histograms), [`hdrlog`] (periodic HdrHistogram interval logs) and
//! [`tap`] (hexdumps of a rule's traffic, off the data path).

pub mod admin;
pub mod hdrlog;
pub mod hist;
pub mod prom;
pub mod report;
pub mod tap;
pub mod upstreams;

use std::cell::Cell;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

pub use hist::AtomicHistogram;
pub use tap::{Tap, TapError, TapSession};

pub use crate::session::outcome::{CloseReason, ConnectError, Direction, PathKind, RejectReason};

/// One worker's counters and histograms for one rule. Written only with relaxed atomics.
#[derive(Default)]
#[repr(align(128))]
pub struct Shard {
    accepted: AtomicU64,
    closed: AtomicU64,
    rejected: [AtomicU64; RejectReason::COUNT],
    connect_errors: [AtomicU64; 4],
    bytes: [[AtomicU64; 2]; 2],
    pub upstream_connect: AtomicHistogram,
    pub first_byte: AtomicHistogram,
    pub session: AtomicHistogram,
    pub transfer: [AtomicHistogram; 2],
}

/// False only in a build with the `bench-no-metrics` feature, which exists to measure what
/// recording costs (`scripts/bench.sh --metrics-cost`); never ship it.
const RECORD: bool = !cfg!(feature = "bench-no-metrics");

impl Shard {
    #[inline]
    pub fn accepted(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    /// A session that was counted by [`Shard::accepted`] ended (whatever the reason).
    #[inline]
    pub fn closed(&self, session: Duration) {
        if !RECORD {
            return;
        }
        self.session.record(session);
        self.closed.fetch_add(1, Ordering::Relaxed);
    }

    #[inline]
    pub fn rejected(&self, why: RejectReason) {
        self.rejected[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    #[inline]
    pub fn connect_error(&self, why: ConnectError) {
        self.connect_errors[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    #[inline]
    pub fn bytes(&self, dir: Direction, path: PathKind, n: u64) {
        if !RECORD {
            return;
        }
        self.bytes[dir as usize][path as usize].fetch_add(n, Ordering::Relaxed);
    }

    #[inline]
    pub fn connected(&self, took: Duration) {
        if !RECORD {
            return;
        }
        self.upstream_connect.record(took);
    }

    #[inline]
    pub fn first_byte(&self, since_accept: Duration) {
        if !RECORD {
            return;
        }
        self.first_byte.record(since_accept);
    }

    #[inline]
    pub fn transfer(&self, dir: Direction, took: Duration) {
        if !RECORD {
            return;
        }
        self.transfer[dir as usize].record(took);
    }
}

/// The five latency histograms every rule keeps, by the name the admin endpoints use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HistogramKind {
    /// From accept to the upstream connect completing.
    UpstreamConnect,
    /// From accept to the first byte read from the upstream.
    FirstByte,
    /// From accept to the session's end.
    Session,
    /// From a read's completion to the matching write's completion, per direction.
    Transfer(Direction),
}

impl HistogramKind {
    pub const ALL: [HistogramKind; 5] = [
        Self::UpstreamConnect,
        Self::FirstByte,
        Self::Session,
        Self::Transfer(Direction::ClientToUpstream),
        Self::Transfer(Direction::UpstreamToClient),
    ];

    /// The name used by `/histograms?metric=`, `/stats` and the HDR log tags.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UpstreamConnect => "upstream_connect",
            Self::FirstByte => "first_byte",
            Self::Session => "session",
            Self::Transfer(Direction::ClientToUpstream) => "transfer_client_to_upstream",
            Self::Transfer(Direction::UpstreamToClient) => "transfer_upstream_to_client",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == text)
    }

    /// Every accepted name, for error messages.
    pub fn names() -> String {
        Self::ALL.map(Self::as_str).join(", ")
    }
}

/// All shards of one rule.
pub struct RuleMetrics {
    pub name: String,
    shards: Box<[Shard]>,
    tap: OnceLock<Tap>,
}

impl RuleMetrics {
    /// The rule's traffic tap, if one is configured: one atomic load when there is none.
    #[inline]
    pub fn tap(&self) -> Option<&Tap> {
        self.tap.get()
    }

    /// The shard a worker records into (`index` wraps around).
    #[inline]
    pub fn shard(&self, index: usize) -> &Shard {
        &self.shards[index % self.shards.len()]
    }

    /// The shard of the calling thread (for engines whose tasks move between threads).
    #[inline]
    pub fn local(&self) -> &Shard {
        self.shard(thread_shard_index())
    }

    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// Sums every shard.
    pub fn snapshot(&self) -> RuleSnapshot {
        let mut s = RuleSnapshot {
            name: self.name.clone(),
            accepted: 0,
            active: 0,
            rejected: [0; RejectReason::COUNT],
            connect_errors: [0; 4],
            bytes: [[0; 2]; 2],
            upstream_connect: AtomicHistogram::empty(),
            first_byte: AtomicHistogram::empty(),
            session: AtomicHistogram::empty(),
            transfer: [AtomicHistogram::empty(), AtomicHistogram::empty()],
        };
        let mut closed = 0u64;
        for sh in self.shards.iter() {
            s.accepted += sh.accepted.load(Ordering::Relaxed);
            closed += sh.closed.load(Ordering::Relaxed);
            for (a, b) in s.rejected.iter_mut().zip(&sh.rejected) {
                *a += b.load(Ordering::Relaxed);
            }
            for (a, b) in s.connect_errors.iter_mut().zip(&sh.connect_errors) {
                *a += b.load(Ordering::Relaxed);
            }
            for d in 0..2 {
                for p in 0..2 {
                    s.bytes[d][p] += sh.bytes[d][p].load(Ordering::Relaxed);
                }
            }
            sh.upstream_connect.merge_into(&mut s.upstream_connect);
            sh.first_byte.merge_into(&mut s.first_byte);
            sh.session.merge_into(&mut s.session);
            sh.transfer[0].merge_into(&mut s.transfer[0]);
            sh.transfer[1].merge_into(&mut s.transfer[1]);
        }
        s.active = s.accepted.saturating_sub(closed);
        s
    }
}

/// A merged, point-in-time view of one rule (histogram values in microseconds).
pub struct RuleSnapshot {
    pub name: String,
    pub accepted: u64,
    pub active: u64,
    pub rejected: [u64; RejectReason::COUNT],
    pub connect_errors: [u64; 4],
    pub bytes: [[u64; 2]; 2],
    pub upstream_connect: hdrhistogram::Histogram<u64>,
    pub first_byte: hdrhistogram::Histogram<u64>,
    pub session: hdrhistogram::Histogram<u64>,
    pub transfer: [hdrhistogram::Histogram<u64>; 2],
}

impl RuleSnapshot {
    pub fn bytes_dir(&self, dir: Direction) -> u64 {
        self.bytes[dir as usize].iter().sum()
    }

    pub fn bytes_path(&self, dir: Direction, path: PathKind) -> u64 {
        self.bytes[dir as usize][path as usize]
    }

    /// One of the five merged histograms (values in microseconds).
    pub fn histogram(&self, kind: HistogramKind) -> &hdrhistogram::Histogram<u64> {
        match kind {
            HistogramKind::UpstreamConnect => &self.upstream_connect,
            HistogramKind::FirstByte => &self.first_byte,
            HistogramKind::Session => &self.session,
            HistogramKind::Transfer(d) => &self.transfer[d as usize],
        }
    }
}

/// Formats an optional address as the address or nothing, without building a `String`.
struct OptAddr(Option<std::net::SocketAddr>);

impl std::fmt::Display for OptAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => a.fmt(f),
            None => Ok(()),
        }
    }
}

/// One finished session, as the access log prints it.
#[derive(Debug, Clone)]
pub struct SessionRecord<'a> {
    pub rule: &'a str,
    /// The route the session took (`default`: the rule's own upstream; `-`: none chosen).
    pub route: &'a str,
    /// The listen port the client connected to, for a rule that listens on a port range.
    pub port: Option<u16>,
    pub client: Option<std::net::SocketAddr>,
    /// The member of the last connect attempt (none if no attempt was made).
    pub upstream: Option<std::net::SocketAddr>,
    /// Connect attempts made (failover tries further members).
    pub attempts: u32,
    pub bytes_c2u: u64,
    pub bytes_u2c: u64,
    pub duration: Duration,
    pub path: &'a str,
    pub reason: CloseReason,
}

/// Every rule's metrics, shared by the engines and the readers.
pub struct Metrics {
    rules: Vec<RuleMetrics>,
    /// The session runtime, for the per-member series and `/upstreams` (set once at start).
    runtime: OnceLock<Arc<crate::session::Runtime>>,
    access_log: std::sync::atomic::AtomicBool,
    created: Instant,
    /// `(engine, mode)` of this run, for `ringfwd_build_info`; set once the engine is resolved.
    build_info: OnceLock<(&'static str, &'static str)>,
}

impl Metrics {
    /// One [`RuleMetrics`] per rule name, each with `shards` shards (one per worker thread).
    pub fn new<S: AsRef<str>>(rule_names: &[S], shards: usize) -> Arc<Self> {
        let shards = shards.max(1);
        Arc::new(Self {
            rules: rule_names
                .iter()
                .map(|n| RuleMetrics {
                    name: n.as_ref().to_string(),
                    shards: (0..shards).map(|_| Shard::default()).collect(),
                    tap: OnceLock::new(),
                })
                .collect(),
            runtime: OnceLock::new(),
            access_log: std::sync::atomic::AtomicBool::new(false),
            created: Instant::now(),
            build_info: OnceLock::new(),
        })
    }

    /// Time since these metrics were created (the forwarder's uptime, near enough); readers
    /// divide counter deltas by uptime deltas to get rates that do not depend on their own
    /// clocks.
    pub fn uptime(&self) -> Duration {
        self.created.elapsed()
    }

    /// Opens the traffic tap of every rule that has one: `paths` is in rule order, `None` for
    /// rules without a tap. A rule whose tap is already open keeps it.
    ///
    /// # Errors
    /// A tap file cannot be opened or its writer thread cannot start.
    pub fn open_taps<'a>(
        &self,
        paths: impl IntoIterator<Item = Option<&'a Path>>,
    ) -> Result<(), TapError> {
        for (rule, path) in self.rules.iter().zip(paths) {
            if let Some(path) = path
                && rule.tap.get().is_none()
            {
                let _ = rule.tap.set(Tap::open(path, &rule.name)?);
            }
        }
        Ok(())
    }

    /// Makes the pools' members visible to the exporters (`/upstreams`, the per-member
    /// Prometheus series). Later calls are ignored.
    pub fn set_runtime(&self, runtime: Arc<crate::session::Runtime>) {
        let _ = self.runtime.set(runtime);
    }

    /// The session runtime, once [`Metrics::set_runtime`] was called.
    pub fn runtime(&self) -> Option<&Arc<crate::session::Runtime>> {
        self.runtime.get()
    }

    /// Records the engine that actually runs (after `auto` and any fallback are resolved) and
    /// its data path (`copy` for the engines that only copy), exported as
    /// `ringfwd_build_info{version,engine,mode} 1`. The first call wins.
    pub fn set_build_info(&self, engine: &'static str, mode: &'static str) {
        let _ = self.build_info.set((engine, mode));
    }

    /// What [`Metrics::set_build_info`] recorded, if it was called.
    pub fn build_info(&self) -> Option<(&'static str, &'static str)> {
        self.build_info.get().copied()
    }

    /// Turns the one-line-per-session access log on or off.
    pub fn set_access_log(&self, on: bool) {
        self.access_log.store(on, Ordering::Relaxed);
    }

    /// Writes the access-log line for a finished session (target `ringfwd::access`).
    pub fn log_session(&self, rec: &SessionRecord<'_>) {
        if !self.access_log.load(Ordering::Relaxed) {
            return;
        }
        let client = OptAddr(rec.client);
        tracing::info!(
            target: "ringfwd::access",
            rule = rec.rule,
            route = rec.route,
            port = rec.port,
            client = %client,
            upstream = %OptAddr(rec.upstream),
            attempts = rec.attempts,
            bytes_c2u = rec.bytes_c2u,
            bytes_u2c = rec.bytes_u2c,
            duration_ms = u64::try_from(rec.duration.as_millis()).unwrap_or(u64::MAX),
            path = rec.path,
            reason = rec.reason.as_str(),
            "session closed"
        );
    }

    pub fn rule(&self, index: usize) -> &RuleMetrics {
        &self.rules[index]
    }

    pub fn rules(&self) -> &[RuleMetrics] {
        &self.rules
    }

    pub fn rule_by_name(&self, name: &str) -> Option<&RuleMetrics> {
        self.rules.iter().find(|r| r.name == name)
    }
}

static NEXT_THREAD_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static THREAD_SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// A small per-thread number, assigned round-robin the first time a thread records.
pub fn thread_shard_index() -> usize {
    THREAD_SHARD.with(|c| {
        let v = c.get();
        if v != usize::MAX {
            return v;
        }
        let v = NEXT_THREAD_SHARD.fetch_add(1, Ordering::Relaxed);
        c.set(v);
        v
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_merge_on_read() {
        let m = Metrics::new(&["web"], 2);
        let r = m.rule(0);
        r.shard(0).accepted();
        r.shard(1).accepted();
        r.shard(1).closed(Duration::from_millis(3));
        r.shard(0)
            .bytes(Direction::ClientToUpstream, PathKind::Copy, 100);
        r.shard(1)
            .bytes(Direction::ClientToUpstream, PathKind::Splice, 50);
        r.shard(1)
            .bytes(Direction::UpstreamToClient, PathKind::Copy, 7);
        r.shard(0).rejected(RejectReason::MaxConnections);
        let s = r.snapshot();
        assert_eq!(s.accepted, 2);
        assert_eq!(s.active, 1);
        assert_eq!(s.bytes_dir(Direction::ClientToUpstream), 150);
        assert_eq!(
            s.bytes_path(Direction::ClientToUpstream, PathKind::Splice),
            50
        );
        assert_eq!(s.bytes_dir(Direction::UpstreamToClient), 7);
        assert_eq!(s.rejected[RejectReason::MaxConnections as usize], 1);
        assert_eq!(s.session.len(), 1);
    }
}
