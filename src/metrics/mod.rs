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
pub mod process;
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

use crate::session::{Record, Recorder};
use crate::vocab::{CloseReason, ConnectError, Direction, PathKind, RejectReason};

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

/// A shard counts what a session reports (no access log: see [`Sink`]).
impl Recorder for Shard {
    #[inline]
    fn accepted(&self) {
        Shard::accepted(self);
    }

    #[inline]
    fn rejected(&self, why: RejectReason) {
        Shard::rejected(self, why);
    }

    #[inline]
    fn connected(&self, took: Duration) {
        Shard::connected(self, took);
    }

    #[inline]
    fn connect_error(&self, why: ConnectError) {
        Shard::connect_error(self, why);
    }

    #[inline]
    fn sent_early(&self, n: u64) {
        self.bytes(Direction::ClientToUpstream, PathKind::Copy, n);
    }

    #[inline]
    fn closed(&self, record: &Record<'_>) {
        Shard::closed(self, record.duration);
    }
}

/// Where one session records: a shard of its rule (`S`: a worker's own, or the calling
/// thread's for engines whose tasks move between threads) and the access log. Which shard
/// is a type, not a value matched on every count: the io_uring worker's sink counts
/// straight into its shard.
pub struct Sink<'a, S: ShardOf = &'a Shard> {
    metrics: &'a Metrics,
    shard: S,
}

/// How a [`Sink`] finds its shard.
pub trait ShardOf {
    fn shard(&self) -> &Shard;
}

/// A fixed shard (a worker's own).
impl ShardOf for &Shard {
    #[inline]
    fn shard(&self) -> &Shard {
        self
    }
}

/// The shard of the calling thread, of one rule.
pub struct ThreadShard<'a>(&'a RuleMetrics);

impl ShardOf for ThreadShard<'_> {
    #[inline]
    fn shard(&self) -> &Shard {
        self.0.local()
    }
}

impl<S: ShardOf> Recorder for Sink<'_, S> {
    #[inline]
    fn accepted(&self) {
        self.shard.shard().accepted();
    }

    #[inline]
    fn rejected(&self, why: RejectReason) {
        self.shard.shard().rejected(why);
    }

    #[inline]
    fn connected(&self, took: Duration) {
        self.shard.shard().connected(took);
    }

    #[inline]
    fn connect_error(&self, why: ConnectError) {
        self.shard.shard().connect_error(why);
    }

    #[inline]
    fn sent_early(&self, n: u64) {
        Recorder::sent_early(self.shard.shard(), n);
    }

    #[inline]
    fn closed(&self, record: &Record<'_>) {
        self.shard.shard().closed(record.duration);
        self.metrics.log_session(record);
    }
}

/// Every rule's metrics, shared by the engines and the readers.
///
/// One `Metrics` is one generation's view (see `control`): `rule(i)` is that generation's
/// rule `i`, with no lock on the data path. The rules' counters themselves are keyed by rule
/// *name* across generations: a reload builds the next view with
/// [`Metrics::next_generation`], which hands a kept rule the very same [`RuleMetrics`], so its
/// counters continue. Readers ([`Metrics::rules`]) see every rule any generation has had.
pub struct Metrics {
    rules: Vec<Arc<RuleMetrics>>,
    common: Arc<Common>,
}

/// What every generation's view shares.
struct Common {
    /// Every rule ever run, by name, in the order they first appeared.
    all: std::sync::Mutex<Vec<Arc<RuleMetrics>>>,
    shards: usize,
    /// The current generation's session runtime, for the per-member series and `/upstreams`.
    runtime: arc_swap::ArcSwapOption<crate::session::Runtime>,
    access_log: std::sync::atomic::AtomicBool,
    created: Instant,
    /// `(engine, mode)` of this run, for `ringfwd_build_info`; set once the engine is resolved.
    build_info: OnceLock<(&'static str, &'static str)>,
    /// Config reloads `[success, failure]`.
    reloads: [AtomicU64; 2],
    /// io_uring accepts per worker, `[on another CPU, on the worker's CPU]` (where the
    /// connection's packets were processed, `SO_INCOMING_CPU`, against the worker's CPU).
    accepts: Box<[[AtomicU64; 2]]>,
    /// Unix time (seconds, as f64 bits) of the last config load that took effect.
    last_reload_success: AtomicU64,
    /// What `POST /reload` calls (set by `run` when a config file can be reloaded).
    reload_hook: OnceLock<ReloadHook>,
    /// What `POST /upstreams/RULE/MEMBER` calls (set by `run` once it serves).
    member_hook: OnceLock<MemberHook>,
    /// Admin requests turned away for a wrong or missing token.
    unauthorized: AtomicU64,
    /// The token state-changing admin requests must carry (`admin_token_file`), if any.
    admin_token: arc_swap::ArcSwapOption<admin::AdminToken>,
    /// Set at the first SIGINT/SIGTERM: `/healthz` answers 503 from then on, so a health
    /// checker (a BGP speaker, a load balancer) takes the host out while it drains.
    draining: std::sync::atomic::AtomicBool,
}

/// Carries out a member API command on the serving config.
pub type MemberHook = Box<
    dyn Fn(
            crate::upstream::admin::Command,
        )
            -> Result<Vec<crate::upstream::admin::Done>, crate::upstream::admin::CommandError>
        + Send
        + Sync,
>;

/// Reloads the config and says what changed, or why nothing did.
pub type ReloadHook = Box<dyn Fn() -> Result<String, ReloadFailed> + Send + Sync>;

/// Why a reload asked for over HTTP did not happen: the control plane's `ReloadError`,
/// carried without naming it (metrics sits below the control plane in the module graph).
pub type ReloadFailed = Box<dyn std::error::Error + Send + Sync>;

fn rule_metrics(name: &str, shards: usize) -> Arc<RuleMetrics> {
    Arc::new(RuleMetrics {
        name: name.to_string(),
        shards: (0..shards).map(|_| Shard::default()).collect(),
        tap: OnceLock::new(),
    })
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Metrics {
    /// One [`RuleMetrics`] per rule name, each with `shards` shards (one per worker thread).
    pub fn new<S: AsRef<str>>(rule_names: &[S], shards: usize) -> Arc<Self> {
        let shards = shards.max(1);
        let rules: Vec<Arc<RuleMetrics>> = rule_names
            .iter()
            .map(|n| rule_metrics(n.as_ref(), shards))
            .collect();
        Arc::new(Self {
            common: Arc::new(Common {
                all: std::sync::Mutex::new(rules.clone()),
                shards,
                runtime: arc_swap::ArcSwapOption::empty(),
                access_log: std::sync::atomic::AtomicBool::new(false),
                created: Instant::now(),
                build_info: OnceLock::new(),
                reloads: [AtomicU64::new(0), AtomicU64::new(0)],
                accepts: (0..shards)
                    .map(|_| [AtomicU64::new(0), AtomicU64::new(0)])
                    .collect(),
                last_reload_success: AtomicU64::new(unix_now().to_bits()),
                reload_hook: OnceLock::new(),
                member_hook: OnceLock::new(),
                unauthorized: AtomicU64::new(0),
                admin_token: arc_swap::ArcSwapOption::empty(),
                draining: std::sync::atomic::AtomicBool::new(false),
            }),
            rules,
        })
    }

    /// The view of the next generation, whose rules are `rule_names`: a rule whose name this
    /// process has run before gets the same counters back; a new name gets fresh ones, which
    /// readers see once the view is [`Metrics::publish`]ed (a reload that fails after this
    /// leaves no trace in the exported series).
    pub fn next_generation<S: AsRef<str>>(&self, rule_names: &[S]) -> Arc<Self> {
        let all = self
            .common
            .all
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let rules = rule_names
            .iter()
            .map(|n| {
                let n = n.as_ref();
                all.iter()
                    .find(|r| r.name == n)
                    .cloned()
                    .unwrap_or_else(|| rule_metrics(n, self.common.shards))
            })
            .collect();
        Arc::new(Self {
            rules,
            common: self.common.clone(),
        })
    }

    /// Makes this view's rules visible to the readers ([`Metrics::rules`]).
    pub fn publish(&self) {
        let mut all = self
            .common
            .all
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for r in &self.rules {
            if !all.iter().any(|a| Arc::ptr_eq(a, r)) {
                all.push(r.clone());
            }
        }
    }

    /// Counts a reload attempt; a success also stamps
    /// `ringfwd_config_last_reload_success_timestamp_seconds`.
    pub fn reloaded(&self, ok: bool) {
        self.common.reloads[usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
        if ok {
            self.common
                .last_reload_success
                .store(unix_now().to_bits(), Ordering::Relaxed);
        }
    }

    /// Counts an io_uring accept by `worker`: whether the connection's packets were
    /// processed on the CPU the worker runs on (see `engine::uring::steer`).
    pub fn accepted_on(&self, worker: usize, cpu_match: bool) {
        let a = &self.common.accepts;
        a[worker % a.len()][usize::from(cpu_match)].fetch_add(1, Ordering::Relaxed);
    }

    /// io_uring accepts per worker, `[other CPU, same CPU]`.
    pub fn accepts(&self) -> Vec<[u64; 2]> {
        self.common
            .accepts
            .iter()
            .map(|[a, b]| [a.load(Ordering::Relaxed), b.load(Ordering::Relaxed)])
            .collect()
    }

    /// Reloads `[success, failure]` so far.
    pub fn reloads(&self) -> [u64; 2] {
        [
            self.common.reloads[0].load(Ordering::Relaxed),
            self.common.reloads[1].load(Ordering::Relaxed),
        ]
    }

    /// Unix time of the last config load that took effect (the start, until a reload).
    pub fn last_reload_success(&self) -> f64 {
        f64::from_bits(self.common.last_reload_success.load(Ordering::Relaxed))
    }

    /// Sets what `POST /reload` runs. Later calls are ignored.
    pub fn set_reload_hook(&self, hook: ReloadHook) {
        let _ = self.common.reload_hook.set(hook);
    }

    /// Sets what the member API runs. Later calls are ignored.
    pub fn set_member_hook(&self, hook: MemberHook) {
        let _ = self.common.member_hook.set(hook);
    }

    /// Runs a member API command; `None` until the process serves.
    pub fn member_command(
        &self,
        cmd: crate::upstream::admin::Command,
    ) -> Option<Result<Vec<crate::upstream::admin::Done>, crate::upstream::admin::CommandError>>
    {
        self.common.member_hook.get().map(|h| h(cmd))
    }

    /// Sets the token the state-changing admin endpoints demand (`None`: none).
    pub fn set_admin_token(&self, token: Option<admin::AdminToken>) {
        self.common.admin_token.store(token.map(Arc::new));
    }

    /// The token the state-changing admin endpoints demand, if any.
    pub fn admin_token(&self) -> Option<Arc<admin::AdminToken>> {
        self.common.admin_token.load_full()
    }

    /// Counts an admin request turned away for its token.
    pub fn unauthorized(&self) {
        self.common.unauthorized.fetch_add(1, Ordering::Relaxed);
    }

    /// Admin requests turned away for a wrong or missing token so far.
    pub fn unauthorized_count(&self) -> u64 {
        self.common.unauthorized.load(Ordering::Relaxed)
    }

    /// Runs the reload hook; `None` when reloading is not possible in this run.
    pub fn reload(&self) -> Option<Result<String, ReloadFailed>> {
        self.common.reload_hook.get().map(|h| h())
    }

    /// Marks the process as stopping: `/healthz` turns to 503 `draining` for good.
    pub fn set_draining(&self) {
        self.common.draining.store(true, Ordering::Release);
    }

    /// Whether the process is stopping (see [`Metrics::set_draining`]).
    pub fn draining(&self) -> bool {
        self.common.draining.load(Ordering::Acquire)
    }

    /// Time since these metrics were created (the forwarder's uptime, near enough); readers
    /// divide counter deltas by uptime deltas to get rates that do not depend on their own
    /// clocks.
    pub fn uptime(&self) -> Duration {
        self.common.created.elapsed()
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
            let rule: &RuleMetrics = rule;
            if let Some(path) = path
                && rule.tap.get().is_none()
            {
                let _ = rule.tap.set(Tap::open(path, &rule.name)?);
            }
        }
        Ok(())
    }

    /// Makes the pools' members visible to the exporters (`/upstreams`, the per-member
    /// Prometheus series): the current generation's runtime.
    pub fn set_runtime(&self, runtime: Arc<crate::session::Runtime>) {
        self.common.runtime.store(Some(runtime));
    }

    /// The current session runtime, once [`Metrics::set_runtime`] was called.
    pub fn runtime(&self) -> Option<Arc<crate::session::Runtime>> {
        self.common.runtime.load_full()
    }

    /// Records the engine that actually runs (after `auto` and any fallback are resolved) and
    /// its data path (`copy` for the engines that only copy), exported as
    /// `ringfwd_build_info{version,engine,mode} 1`. The first call wins.
    pub fn set_build_info(&self, engine: &'static str, mode: &'static str) {
        let _ = self.common.build_info.set((engine, mode));
    }

    /// What [`Metrics::set_build_info`] recorded, if it was called.
    pub fn build_info(&self) -> Option<(&'static str, &'static str)> {
        self.common.build_info.get().copied()
    }

    /// Turns the one-line-per-session access log on or off.
    pub fn set_access_log(&self, on: bool) {
        self.common.access_log.store(on, Ordering::Relaxed);
    }

    /// Where a session records on `shard` (a shard of its rule).
    pub fn sink<'a>(&'a self, shard: &'a Shard) -> Sink<'a> {
        Sink {
            metrics: self,
            shard,
        }
    }

    /// Where a session of rule `rule` records from whichever thread runs it.
    pub fn local_sink(&self, rule: usize) -> Sink<'_, ThreadShard<'_>> {
        Sink {
            metrics: self,
            shard: ThreadShard(self.rule(rule)),
        }
    }

    /// Writes the access-log line for a finished session (target `ringfwd::access`) when
    /// the access log is on: the check is inlined into every close, the writing is not.
    #[inline]
    pub fn log_session(&self, rec: &Record<'_>) {
        if self.common.access_log.load(Ordering::Relaxed) {
            Self::write_access_log(rec);
        }
    }

    #[inline(never)]
    fn write_access_log(rec: &Record<'_>) {
        let client = OptAddr(rec.client);
        tracing::info!(
            target: "ringfwd::access",
            rule = rec.rule,
            route = rec.route,
            port = rec.port,
            client = %client,
            upstream = %OptAddr(rec.upstream),
            attempts = rec.attempts,
            bytes_c2u = rec.bytes[0],
            bytes_u2c = rec.bytes[1],
            duration_ms = u64::try_from(rec.duration.as_millis()).unwrap_or(u64::MAX),
            path = rec.end.path_label(),
            reason = rec.end.reason.as_str(),
            "session closed"
        );
    }

    pub fn rule(&self, index: usize) -> &RuleMetrics {
        &self.rules[index]
    }

    /// Every rule any generation of this run has had, in the order they first appeared (a
    /// removed rule keeps its final counters; one added back by name continues them).
    pub fn rules(&self) -> Vec<Arc<RuleMetrics>> {
        self.common
            .all
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn rule_by_name(&self, name: &str) -> Option<Arc<RuleMetrics>> {
        self.rules().into_iter().find(|r| r.name == name)
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

    #[test]
    fn a_kept_rule_keeps_its_counters_across_generations() {
        let m = Metrics::new(&["web", "db"], 2);
        m.rule(1).shard(0).accepted();
        let next = m.next_generation(&["new", "db"]);
        assert_eq!(next.rule(1).name, "db");
        assert_eq!(next.rule(1).snapshot().accepted, 1);
        next.rule(1).shard(1).accepted();
        assert_eq!(m.rule(1).snapshot().accepted, 2);
        assert_eq!(m.rules().len(), 2, "not published yet");
        next.publish();
        let names: Vec<String> = m.rules().iter().map(|r| r.name.clone()).collect();
        assert_eq!(names, ["web", "db", "new"]);
        next.reloaded(true);
        next.reloaded(false);
        assert_eq!(m.reloads(), [1, 1]);
    }
}
