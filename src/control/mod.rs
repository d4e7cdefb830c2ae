//! The control plane: config reload, binary upgrade (socket takeover) and socket activation.
//!
//! A running config is a **generation**: a validated [`Config`], its session [`Runtime`], its
//! metrics view and one engine instance serving its listeners. A reload (SIGHUP, `POST
//! /reload`, `watch_config`) never changes a generation in place; it starts the next one:
//!
//! 1. load and validate the whole new file; bind the addresses no current rule listens on;
//! 2. start a new engine instance on *duplicates of the very same sockets* for the addresses
//!    it keeps (same sockets, same accept queues — with `SO_REUSEPORT` each worker has its own
//!    queue, and closing a socket would drop it) plus the newly bound ones, and wait until it
//!    is ready;
//! 3. retire the old generation ([`Shutdown::retire`]): it stops accepting, closes only its
//!    own descriptors (never `shutdown(2)` on a listener), serves what it already accepted,
//!    and its live connections run on until they end by themselves — or, if
//!    `reload_drain_timeout` is set, until it passes. A removed rule's socket has no other
//!    descriptor, so its port closes then.
//!
//! Any error before step 3 drops what was built and leaves the running generation alone. A
//! connection keeps the generation (rule version, pool) it was accepted by, across any number
//! of reloads; admission (`max_connections`, the per-client limits) counts across generations
//! of a rule, so a rule never holds more than its cap while older ones drain. Only a stop
//! (SIGTERM) bounds every generation by `shutdown_grace`.
//!
//! Reloads never run two at once and are never refused for coming often: the new file is
//! read (and its host names resolved) on a thread of its own while the supervisor keeps
//! answering, and requests that arrive meanwhile are served together by one more reload.
//! The same hand-over serves `run --takeover` ([`takeover`]) across processes, and sockets
//! passed by systemd ([`fds::from_systemd`]) are matched to rules by address like taken-over
//! ones, or by name: a socket whose `LISTEN_FDNAMES` entry (`FileDescriptorName=`) is a
//! rule's name is that rule's. systemd hears of readiness, reloads and stops through
//! [`notify`].

mod error;
pub mod fds;
pub mod takeover;
pub mod watch;

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::{Config, ConfigError};
use crate::engine::{self, EngineError, Listeners, Resolved, RunContext};
use crate::metrics::Metrics;
use crate::net;
use crate::session::Runtime;
use crate::shutdown::{Phase, Shutdown};
use crate::upstream;

pub use error::{ReloadError, StartError};

/// What asked for a reload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    Signal,
    Admin,
    Watch,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Signal => "SIGHUP",
            Self::Admin => "POST /reload",
            Self::Watch => "watch_config",
        }
    }
}

/// Where a reload's result goes.
pub type Reply = mpsc::Sender<Result<String, ReloadError>>;

/// Loads the config again (the file, with the `run` flags applied), on a thread of its own.
pub type Loader = Arc<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

/// A config read for a reload, with the file's identity from before it was read.
pub struct Loaded {
    result: Result<Config, ReloadError>,
    read_from: Option<watch::Identity>,
}

/// What the supervisor acts on, one at a time.
pub enum Event {
    /// Reload the config; the result goes to the sender, if any.
    Reload(Trigger, Option<Reply>),
    /// The loader thread has read the file a reload asked for.
    Loaded(Box<Loaded>),
    /// The process moved to this shutdown phase (SIGINT/SIGTERM).
    Stop(Phase),
    /// A generation's engine returned (with its error, if it failed).
    Ended(u64, Option<String>),
    /// A new process asks for the listening sockets (`None`: not serving).
    Handoff(mpsc::Sender<Option<takeover::Handoff>>),
    /// The new process serves them: retire everything, exit once drained.
    TakenOver,
    /// The first generation serves, on this engine.
    FirstReady(Resolved),
    /// A member API command for the serving generation's pools, and who waits for its
    /// result. Carried out here, between reloads, so that a reload never builds the next
    /// generation from a member state that is changing under it.
    Member(upstream::admin::Command, MemberReply),
}

/// Where a member command's result goes.
pub type MemberReply =
    mpsc::Sender<Result<Vec<upstream::admin::Done>, upstream::admin::CommandError>>;

/// Listening sockets this process did not bind: passed by systemd or taken over.
#[derive(Default)]
pub struct Inherited {
    /// `(address, the rule that served it in the old process (takeover only), socket)`.
    listeners: Vec<(SocketAddr, Option<String>, TcpListener)>,
    /// Sockets systemd named after a rule (`FileDescriptorName=` = the rule's name): that
    /// rule's, whatever address they are on.
    named: Vec<(SocketAddr, String, TcpListener)>,
}

impl Inherited {
    /// Adds sockets, each with the name of the rule that served it, if known.
    pub fn add(&mut self, ls: impl IntoIterator<Item = (Option<String>, TcpListener)>) {
        for (name, l) in ls {
            match l.local_addr() {
                Ok(a) => self.listeners.push((a, name, l)),
                Err(e) => tracing::warn!(error = %e, "an inherited socket has no address; closed"),
            }
        }
    }

    /// Adds sockets systemd passed with their `LISTEN_FDNAMES` names: one named after a rule
    /// of `config` is that rule's, on whatever address it listens; any other (systemd names
    /// a socket after its unit, `ringfwd.socket`, by default) is matched by address as
    /// [`Inherited::add`]'s are.
    pub fn add_activated(
        &mut self,
        config: &Config,
        ls: impl IntoIterator<Item = (Option<String>, TcpListener)>,
    ) {
        for (name, l) in ls {
            let rule = name.filter(|n| config.rules.iter().any(|r| r.name == *n));
            match (rule, l.local_addr()) {
                (Some(rule), Ok(a)) => self.named.push((a, rule, l)),
                (None, Ok(a)) => self.listeners.push((a, None, l)),
                (_, Err(e)) => {
                    tracing::warn!(error = %e, "an inherited socket has no address; closed");
                }
            }
        }
    }

    /// The inherited sockets for `rule`, one group per port of its listen range (empty where
    /// none was passed): those systemd named after the rule (in the group of their port when
    /// the range has it, else the first), then those listening on exactly that port's
    /// address — or, for a rule on port 0 (any port), those its namesake served on the same
    /// IP. A socket named after another rule is never taken by address.
    fn take(&mut self, rule: &crate::config::Rule) -> Vec<Vec<TcpListener>> {
        let mut groups: Vec<Vec<TcpListener>> = rule
            .listen
            .addrs()
            .map(|addr| {
                let wanted = |a: &SocketAddr, name: &Option<String>| {
                    *a == addr
                        || (addr.port() == 0
                            && a.ip() == addr.ip()
                            && name.as_deref() == Some(rule.name.as_str()))
                };
                let (matched, rest) = std::mem::take(&mut self.listeners)
                    .into_iter()
                    .partition(|(a, n, _)| wanted(a, n));
                self.listeners = rest;
                matched.into_iter().map(|(_, _, l)| l).collect()
            })
            .collect();
        let (mine, rest) = std::mem::take(&mut self.named)
            .into_iter()
            .partition::<Vec<_>, _>(|(_, n, _)| *n == rule.name);
        self.named = rest;
        if !mine.is_empty() {
            // Named sockets replace whatever the address matched: the unit said which is which.
            for g in &mut groups {
                g.clear();
            }
        }
        let first = rule.listen.port();
        for (addr, _, l) in mine {
            tracing::info!(rule = %rule.name, %addr, "socket activation: a socket named after the rule (LISTEN_FDNAMES)");
            let i = if rule.listen.ports().contains(&addr.port()) {
                usize::from(addr.port() - first)
            } else {
                0
            };
            if let Some(g) = groups.get_mut(i) {
                g.push(l);
            }
        }
        groups
    }

    pub fn is_empty(&self) -> bool {
        self.listeners.is_empty() && self.named.is_empty()
    }

    /// How many sockets are held.
    fn len(&self) -> usize {
        self.listeners.len() + self.named.len()
    }

    /// The addresses no rule took (their sockets close when this is dropped).
    pub fn leftover(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .map(|(a, _, _)| *a)
            .chain(self.named.iter().map(|(a, _, _)| *a))
            .collect()
    }
}

/// `sockets` made up to `n` descriptors by duplicating them round-robin (systemd passes one
/// socket per address; each io_uring worker then accepts on its own descriptor of it).
fn fill(mut sockets: Vec<TcpListener>, n: usize) -> std::io::Result<Vec<TcpListener>> {
    let k = sockets.len();
    while sockets.len() < n {
        let l = sockets[sockets.len() % k].try_clone()?;
        sockets.push(l);
    }
    Ok(sockets)
}

/// Every rule's listeners for the first generation: inherited ones on the rule's address if
/// any (matched by address, whatever their name was), else freshly bound.
///
/// # Errors
/// A rule's address cannot be bound.
pub fn first_listeners(
    config: &Config,
    per_rule: usize,
    inherited: &mut Inherited,
) -> Result<Vec<Vec<Vec<TcpListener>>>, EngineError> {
    let ports: usize = config
        .rules
        .iter()
        .map(|r| usize::from(r.listen.count))
        .sum();
    // Inherited sockets are already open and are the listeners' own descriptors: count
    // them once, as listeners, not again as what is open.
    engine::ensure_listener_fds(ports, per_rule, inherited.len())?;
    let mut out = Vec::with_capacity(config.rules.len());
    for rule in &config.rules {
        let mut groups = Vec::with_capacity(usize::from(rule.listen.count));
        let mut taken = 0;
        for (addr, got) in rule.listen.addrs().zip(inherited.take(rule)) {
            if got.is_empty() {
                groups.push(net::bind_listeners_mptcp(addr, per_rule, rule.mptcp)?);
            } else {
                taken += got.len();
                groups.push(fill(got, per_rule).map_err(|source| EngineError::Io {
                    what: "cannot duplicate an inherited listener",
                    source,
                })?);
            }
        }
        if taken > 0 {
            tracing::info!(rule = %rule.name, addr = %rule.listen, sockets = taken, "serving inherited listening sockets");
        }
        out.push(groups);
    }
    Ok(out)
}

/// Where the current generation's sockets for `addr` (one port of `rule`'s listen side) are:
/// `(rule, port)` of the port with that address in any current rule (a rule on port 0, any
/// port, keeps the port its namesake was given).
fn kept_port(
    config: &Config,
    rule: &crate::config::Rule,
    addr: SocketAddr,
) -> Option<(usize, usize)> {
    config.rules.iter().enumerate().find_map(|(i, r)| {
        if addr.port() == 0 {
            (r.listen.addr == addr && r.name == rule.name).then_some((i, 0))
        } else {
            // The port's place in `r`'s range, if `r` listens on it.
            let first = r.listen.port();
            (r.listen.ip() == addr.ip() && r.listen.ports().contains(&addr.port()))
                .then(|| (i, usize::from(addr.port() - first)))
        }
    })
}

/// Listening sockets per rule, per port of its range, per worker.
type Sockets = Vec<Vec<Vec<TcpListener>>>;

/// A generation that did not start: why, and the sockets it was given, back.
struct StartFailed {
    why: StartError,
    sockets: Sockets,
}

/// A port of a reloaded rule: its address and where the socket group it keeps is in the
/// current generation (`None`: bound fresh).
type PortPlan = (SocketAddr, Option<(usize, usize)>);

/// Puts the socket groups a failed reload took from the current generation back in place.
fn give_back(cur: &mut [Vec<Vec<TcpListener>>], plan: &[Vec<PortPlan>], mut taken: Sockets) {
    for (ports, groups) in plan.iter().zip(&mut taken) {
        for ((_, kept), group) in ports.iter().zip(groups) {
            if let Some((r, p)) = kept {
                cur[*r][*p] = std::mem::take(group);
            }
        }
    }
}

/// One config generation and the engine instance serving it.
struct Generation {
    id: u64,
    config: Config,
    metrics: Arc<Metrics>,
    runtime: Arc<Runtime>,
    shutdown: Shutdown,
    /// This supervisor's own descriptors of the generation's listeners, per rule (the engine
    /// serves duplicates): what the next generation or a new process is handed.
    sockets: Vec<Vec<Vec<TcpListener>>>,
    thread: Option<JoinHandle<()>>,
    upstreams: Option<upstream::control::Stop>,
    /// When the connections still open are cut, and which setting said so (`None`: they run
    /// until they end).
    deadline: Option<(Instant, &'static str)>,
}

impl Generation {
    /// Stops accepting (the next generation serves the same sockets) and drains, for at most
    /// `drain` if set.
    fn retire(&mut self, drain: Option<Duration>) {
        self.shutdown.retire();
        self.sockets.clear();
        self.upstreams = None;
        if let Some(d) = drain {
            self.cut_at(Instant::now() + d, "reload_drain_timeout");
        }
    }

    /// Cuts what is still open at `when`, unless an earlier deadline is set.
    fn cut_at(&mut self, when: Instant, by: &'static str) {
        if self.deadline.is_none_or(|(d, _)| when < d) {
            self.deadline = Some((when, by));
        }
    }

    /// Cuts every connection now if the deadline has passed.
    fn cut_if_due(&mut self, now: Instant) {
        let Some((when, by)) = self.deadline else {
            return;
        };
        if now < when {
            return;
        }
        self.deadline = None;
        let live = self.runtime.live();
        if live > 0 {
            tracing::info!(
                generation = self.id,
                live,
                "{by} over: closing the remaining connections"
            );
        }
        self.shutdown.advance(Phase::Closing);
    }
}

/// The listeners of `sockets` duplicated for an engine instance.
fn dup_all(sockets: &[Vec<Vec<TcpListener>>]) -> Result<Listeners, StartError> {
    Listeners::dup(sockets).map_err(|e| StartError::Duplicate(Arc::new(e)))
}

/// The health-check / DNS thread of one generation's pools (`None`: none needed, or it
/// could not start, which is logged: the forwarder serves on with passive health only).
fn spawn_upstreams(runtime: &Runtime) -> Option<upstream::control::Stop> {
    upstream::control::spawn_stoppable(runtime.pools(), Arc::new(upstream::control::SystemResolver))
        .map_err(|e| {
            tracing::warn!(error = %e, "cannot start the upstream health-check thread");
        })
        .ok()
        .flatten()
}

/// The first generation, for the caller to run (see [`Supervisor::prepare_first`]).
pub struct First {
    pub id: u64,
    pub listeners: Listeners,
    pub ctx: RunContext,
}

/// How the run ended.
pub struct Summary {
    /// Live sessions when the process began to stop.
    pub live_at_drain: u64,
    /// Sessions cut by a grace period running out, over every generation.
    pub cut: u64,
    /// Why the serving generation stopped by itself, if it did.
    pub failure: Option<String>,
    /// A new process took the sockets over (it owns the control socket's path now).
    pub taken_over: bool,
}

/// Runs the generations: starts the first, then acts on [`Event`]s until the process has
/// stopped (or handed over) and every generation has drained.
pub struct Supervisor {
    engine: Resolved,
    /// The first generation's metrics view: what the readers hold.
    metrics: Arc<Metrics>,
    events_tx: mpsc::Sender<Event>,
    events: mpsc::Receiver<Event>,
    /// Loads the config again (the file, with the `run` flags applied); `None` without a file.
    load: Option<Loader>,
    /// The reload whose file is being read now, and who waits for its result.
    loading: Option<(Trigger, Vec<Reply>)>,
    /// Reload requests that came while one was being read: one more reload serves them all.
    queued: Option<(Trigger, Vec<Reply>)>,
    current: Option<Generation>,
    retiring: Vec<Generation>,
    next_id: u64,
    /// A descriptor of the admin listener, handed over with the rules' sockets.
    admin: Option<TcpListener>,
    watch_enabled: Arc<AtomicBool>,
    /// The `--config` file, for `watch_config`'s poller (started the first time a
    /// generation has `watch_config = true`; no thread before).
    watch_path: Option<std::path::PathBuf>,
    /// The config file as it was when the running config was read from it: the poller's
    /// first comparison, so a change made before the poller starts is not missed.
    watch_baseline: Option<watch::Identity>,
    watching: bool,
    /// The first generation has reported ready.
    started: bool,
    /// The listeners came from systemd, which keeps them open across our restart: a stop
    /// then hands over like a reload (what was dequeued is served, never reset).
    activated: bool,
    stopping: bool,
    /// A stop asked for while `shutdown_delay` runs: `/healthz` already answers 503, the
    /// listeners close (and the drain starts) at this instant.
    delayed_stop: Option<Instant>,
    taken_over: bool,
    live_at_drain: u64,
    cut: u64,
    failure: Option<String>,
}

impl Supervisor {
    /// A supervisor reading `events` (whose sender the signal thread, the admin endpoint,
    /// the watcher and the control socket hold clones of). Forwards the process's shutdown
    /// phases as [`Event::Stop`].
    ///
    /// # Errors
    /// The thread forwarding shutdown phases cannot start.
    pub fn new(
        engine: Resolved,
        metrics: Arc<Metrics>,
        process: &Shutdown,
        events: (mpsc::Sender<Event>, mpsc::Receiver<Event>),
        load: Option<Loader>,
        watch_enabled: Arc<AtomicBool>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = events;
        {
            let (s, tx) = (process.clone(), tx.clone());
            std::thread::Builder::new()
                .name("ringfwd-stop".into())
                .spawn(move || {
                    for p in [Phase::Draining, Phase::Closing] {
                        s.wait_for(p, None);
                        if tx.send(Event::Stop(p)).is_err() {
                            return;
                        }
                    }
                })?;
        }
        Ok(Self {
            engine,
            metrics,
            events_tx: tx,
            events: rx,
            load,
            loading: None,
            queued: None,
            current: None,
            retiring: Vec::new(),
            next_id: 0,
            admin: None,
            watch_enabled,
            watch_path: None,
            watch_baseline: None,
            watching: false,
            started: false,
            activated: false,
            stopping: false,
            delayed_stop: None,
            taken_over: false,
            live_at_drain: 0,
            cut: 0,
            failure: None,
        })
    }

    /// The config file `watch_config` watches.
    /// `baseline`: the file's identity taken before the running config was read from it.
    pub fn set_watch_path(
        &mut self,
        path: Option<std::path::PathBuf>,
        baseline: Option<watch::Identity>,
    ) {
        self.watch_path = path;
        self.watch_baseline = baseline;
    }

    /// Starts the config poller if `config` asks for it and it does not run yet.
    fn watch_if_asked(&mut self, config: &Config) {
        self.watch_enabled
            .store(config.watch_config, std::sync::atomic::Ordering::Relaxed);
        if !config.watch_config || self.watching {
            return;
        }
        let Some(path) = self.watch_path.clone() else {
            return;
        };
        let baseline = self.watch_baseline.take();
        match watch::spawn(
            path,
            baseline,
            self.watch_enabled.clone(),
            self.events_tx.clone(),
        ) {
            Ok(()) => self.watching = true,
            Err(e) => tracing::warn!(error = %e, "cannot start the config watcher"),
        }
    }

    /// Marks the listeners as passed by systemd (see [`Supervisor::stop`]'s handling).
    pub fn set_socket_activated(&mut self, yes: bool) {
        self.activated = yes;
    }

    /// Keeps a descriptor of the admin listener, to hand it over in a takeover.
    pub fn set_admin(&mut self, admin: Option<TcpListener>) {
        self.admin = admin;
    }

    /// Prepares the first generation on `sockets` (one entry per rule) for the caller to
    /// run on its own thread — the main thread, where the engine ran before the control
    /// plane existed — with [`crate::engine::serve`] on [`First::listeners`] and
    /// [`First::ctx`]. Its `on_ready` must send [`Event::FirstReady`], and its end
    /// [`Event::Ended`] with [`First::id`]. Until the supervisor has seen `FirstReady`, a
    /// reload or a takeover request is answered "still starting".
    ///
    /// # Errors
    /// The listeners cannot be duplicated (out of file descriptors).
    pub fn prepare_first(
        &mut self,
        config: Config,
        sockets: Vec<Vec<Vec<TcpListener>>>,
        runtime: Arc<Runtime>,
    ) -> Result<First, StartError> {
        let listeners = dup_all(&sockets)?;
        let shutdown = Shutdown::new();
        let id = self.next_id;
        self.next_id += 1;
        let ctx = RunContext {
            shutdown: shutdown.clone(),
            metrics: self.metrics.clone(),
            runtime: runtime.clone(),
        };
        self.current = Some(Generation {
            id,
            config,
            metrics: self.metrics.clone(),
            runtime,
            shutdown,
            sockets,
            thread: None,
            upstreams: None,
            deadline: None,
        });
        Ok(First { id, listeners, ctx })
    }

    /// A sender of events, for the thread running the first generation.
    pub fn events(&self) -> mpsc::Sender<Event> {
        self.events_tx.clone()
    }

    fn start_generation(
        &mut self,
        config: Config,
        sockets: Vec<Vec<Vec<TcpListener>>>,
        metrics: Arc<Metrics>,
        runtime: Arc<Runtime>,
    ) -> Result<(Generation, Vec<(String, SocketAddr)>), StartFailed> {
        let listeners = match dup_all(&sockets) {
            Ok(l) => l,
            Err(why) => return Err(StartFailed { why, sockets }),
        };
        let shutdown = Shutdown::new();
        let id = self.next_id;
        self.next_id += 1;
        let (ready_tx, ready_rx) = mpsc::channel();
        let ctx = RunContext {
            shutdown: shutdown.clone(),
            metrics: metrics.clone(),
            runtime: runtime.clone(),
        };
        let (cfg, engine, events) = (config.clone(), self.engine, self.events_tx.clone());
        let thread = std::thread::Builder::new()
            .name(format!("ringfwd-gen{id}"))
            .spawn(move || {
                let on_ready = ready_tx.clone();
                let result = engine::serve(&cfg, engine, listeners, ctx, move |e, addrs| {
                    let _ = on_ready.send(Ok((e, addrs.to_vec())));
                });
                let err = result.err().map(|e| e.to_string());
                if let Some(e) = &err {
                    let _ = ready_tx.send(Err(e.clone()));
                }
                let _ = events.send(Event::Ended(id, err));
            });
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                return Err(StartFailed {
                    why: StartError::Spawn(Arc::new(e)),
                    sockets,
                });
            }
        };
        match ready_rx.recv() {
            Ok(Ok((resolved, addrs))) => {
                self.engine = resolved;
                let upstreams = spawn_upstreams(&runtime);
                Ok((
                    Generation {
                        id,
                        config,
                        metrics,
                        runtime,
                        shutdown,
                        sockets,
                        thread: Some(thread),
                        upstreams,
                        deadline: None,
                    },
                    addrs,
                ))
            }
            Ok(Err(why)) => {
                shutdown.advance(Phase::Closing);
                let _ = thread.join();
                Err(StartFailed {
                    why: StartError::Engine(why),
                    sockets,
                })
            }
            Err(_) => {
                shutdown.advance(Phase::Closing);
                let _ = thread.join();
                Err(StartFailed {
                    why: StartError::Stopped,
                    sockets,
                })
            }
        }
    }

    /// Acts on events until the process has stopped or handed over, and every generation
    /// has drained.
    pub fn run(mut self) -> Summary {
        loop {
            if (self.stopping || self.taken_over)
                && self.current.is_none()
                && self.retiring.is_empty()
            {
                break;
            }
            let next_cut = self
                .current
                .iter()
                .chain(&self.retiring)
                .filter_map(|g| g.deadline.map(|(d, _)| d))
                .chain(self.delayed_stop)
                .min();
            let ev = match next_cut {
                None => match self.events.recv() {
                    Ok(ev) => ev,
                    Err(_) => break,
                },
                Some(when) => {
                    match self
                        .events
                        .recv_timeout(when.saturating_duration_since(Instant::now()))
                    {
                        Ok(ev) => ev,
                        Err(mpsc::RecvTimeoutError::Timeout) => {
                            let now = Instant::now();
                            if self.delayed_stop.is_some_and(|t| t <= now) {
                                self.delayed_stop = None;
                                self.drain();
                            }
                            for g in self.current.iter_mut().chain(&mut self.retiring) {
                                g.cut_if_due(now);
                            }
                            continue;
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
            };
            match ev {
                Event::FirstReady(engine) => {
                    self.started = true;
                    self.engine = engine;
                    if let Some(g) = &mut self.current {
                        g.upstreams = spawn_upstreams(&g.runtime);
                        let config = g.config.clone();
                        self.watch_if_asked(&config);
                    }
                }
                Event::Reload(trigger, reply) => self.request_reload(trigger, reply),
                Event::Loaded(loaded) => self.loaded(*loaded),
                Event::Stop(phase) => self.stop(phase),
                Event::Ended(id, err) => self.ended(id, err),
                Event::Handoff(reply) => {
                    let _ = reply.send(self.handoff());
                }
                Event::Member(cmd, reply) => {
                    let _ = reply.send(self.member(&cmd));
                }
                Event::TakenOver => {
                    self.taken_over = true;
                    if let Some(mut g) = self.current.take() {
                        self.live_at_drain = g.runtime.live();
                        // An upgrade cuts no one either: the old process's connections run
                        // to their end (or `reload_drain_timeout`, or a later SIGTERM's
                        // `shutdown_grace`).
                        g.retire(g.config.reload_drain_timeout);
                        self.retiring.push(g);
                    }
                }
            }
        }
        for (_, replies) in self.loading.take().into_iter().chain(self.queued.take()) {
            for r in replies {
                let _ = r.send(Err(ReloadError::Stopping));
            }
        }
        Summary {
            live_at_drain: self.live_at_drain,
            cut: self.cut,
            failure: self.failure,
            taken_over: self.taken_over,
        }
    }

    /// A reload was asked for: starts reading the file, or — while one is being read — joins
    /// the next reload (one is in flight at most, and at most one more waits).
    fn request_reload(&mut self, trigger: Trigger, reply: Option<Reply>) {
        let refuse = if !self.started {
            Some(ReloadError::Starting)
        } else if self.stopping || self.taken_over {
            Some(ReloadError::Stopping)
        } else if self.load.is_none() {
            Some(ReloadError::NoConfigFile)
        } else {
            None
        };
        if let Some(why) = refuse {
            self.metrics.reloaded(false);
            tracing::warn!(
                trigger = trigger.as_str(),
                "config reload refused, still running the previous config: {why}"
            );
            if let Some(r) = reply {
                let _ = r.send(Err(why));
            }
            return;
        }
        if self.loading.is_some() {
            let (_, replies) = self.queued.get_or_insert_with(|| (trigger, Vec::new()));
            replies.extend(reply);
        } else {
            self.loading = Some((trigger, reply.into_iter().collect()));
            self.start_loading();
        }
    }

    /// Reads the config for the reload in [`Supervisor::loading`] on a thread of its own: a
    /// slow file system or DNS answer delays neither a stop nor the other events.
    fn start_loading(&mut self) {
        let Some(load) = self.load.clone() else {
            return;
        };
        crate::notify::reloading();
        let watched = self.watch_path.clone();
        let events = self.events_tx.clone();
        let spawned = std::thread::Builder::new()
            .name("ringfwd-load".into())
            .spawn(move || {
                let read_from = watched.as_deref().and_then(watch::identity);
                let result = load()
                    .and_then(|c| c.ensure_runnable().map(|()| c))
                    .map_err(|e| ReloadError::Config(Arc::new(e)));
                let _ = events.send(Event::Loaded(Box::new(Loaded { result, read_from })));
            });
        if let Err(e) = spawned {
            let _ = self.events_tx.send(Event::Loaded(Box::new(Loaded {
                result: Err(ReloadError::LoaderThread(Arc::new(e))),
                read_from: None,
            })));
        }
    }

    /// The file a reload asked for has been read: applies it, answers everyone who waited
    /// for it, and starts the queued reload, if any.
    fn loaded(&mut self, loaded: Loaded) {
        let Some((trigger, replies)) = self.loading.take() else {
            return;
        };
        let r = match loaded.result {
            Ok(new) if !self.stopping && !self.taken_over => self.apply(new, loaded.read_from),
            Ok(_) => Err(ReloadError::Stopping),
            Err(e) => Err(e),
        };
        self.metrics.reloaded(r.is_ok());
        match &r {
            Ok(changes) => tracing::info!(
                trigger = trigger.as_str(),
                coalesced = replies.len().saturating_sub(1),
                "config reloaded: {changes}"
            ),
            Err(why) => tracing::warn!(
                trigger = trigger.as_str(),
                "config reload failed, still running the previous config: {why}"
            ),
        }
        crate::notify::ready(&match &r {
            Ok(changes) => format!("reloaded: {changes}"),
            Err(why) => format!("reload failed, still running the previous config: {why}"),
        });
        for reply in replies {
            let _ = reply.send(r.clone());
        }
        if let Some(next) = self.queued.take() {
            if self.stopping || self.taken_over {
                for reply in next.1 {
                    let _ = reply.send(Err(ReloadError::Stopping));
                }
            } else {
                self.loading = Some(next);
                self.start_loading();
            }
        }
    }

    fn stop(&mut self, phase: Phase) {
        // Health checkers see the stop first, whatever follows: `/healthz` answers 503 now.
        self.metrics.set_draining();
        let delay = self
            .current
            .as_ref()
            .map_or(Duration::ZERO, |g| g.config.shutdown_delay);
        if phase == Phase::Draining && !self.stopping && self.delayed_stop.is_none() {
            if delay.is_zero() {
                self.drain();
            } else {
                self.delayed_stop = Some(Instant::now() + delay);
                tracing::info!(
                    delay = %crate::config::format_duration(delay),
                    "shutdown_delay: /healthz answers 503 draining; still accepting until the delay ends"
                );
            }
        }
        if phase == Phase::Closing {
            // A second signal ends the delay too.
            if self.delayed_stop.take().is_some() {
                self.drain();
            }
            for g in self.current.iter().chain(&self.retiring) {
                g.shutdown.advance(Phase::Closing);
            }
        }
    }

    /// The stop proper: closes the listeners and bounds every generation's drain by
    /// `shutdown_grace`.
    fn drain(&mut self) {
        if !self.stopping {
            self.stopping = true;
            crate::notify::stopping();
            self.live_at_drain = self
                .current
                .iter()
                .chain(&self.retiring)
                .map(|g| g.runtime.live())
                .sum();
            tracing::info!(
                live = self.live_at_drain,
                "draining: no new connections; live ones may finish"
            );
            if let Some(mut g) = self.current.take() {
                // Only the engine's descriptors may keep a socket open now: a stopping
                // process closes its ports (unless systemd holds them).
                g.sockets.clear();
                if self.activated {
                    // systemd holds the sockets: connections keep queueing for the next
                    // instance, and one this instance already dequeued is served.
                    g.shutdown.retire();
                } else {
                    g.shutdown.advance(Phase::Draining);
                }
                self.retiring.push(g);
            }
            // A stop bounds every generation, the older ones still draining included.
            let grace = self.retiring.last().map(|g| g.config.shutdown_grace);
            if let Some(grace) = grace {
                let when = Instant::now() + grace;
                for g in &mut self.retiring {
                    g.cut_at(when, "shutdown_grace");
                    g.cut_if_due(Instant::now());
                }
            }
        }
    }

    fn ended(&mut self, id: u64, err: Option<String>) {
        let mut g = if self.current.as_ref().is_some_and(|g| g.id == id) {
            let g = self.current.take();
            // The serving generation stopped by itself: an engine failure.
            let why = err
                .clone()
                .unwrap_or_else(|| "the engine stopped".to_string());
            tracing::error!(generation = id, error = %why, "the serving engine stopped; exiting");
            self.failure = Some(why);
            self.stopping = true;
            for r in &mut self.retiring {
                r.shutdown.advance(Phase::Closing);
            }
            g
        } else if let Some(i) = self.retiring.iter().position(|g| g.id == id) {
            Some(self.retiring.remove(i))
        } else {
            // A generation that failed to start: already joined.
            None
        };
        if let Some(g) = &mut g {
            if let Some(t) = g.thread.take() {
                let _ = t.join();
            }
            self.cut += g.runtime.cut();
            if let Some(e) = err {
                tracing::warn!(generation = id, error = %e, "a draining generation ended with an error");
            } else if !self.stopping && !self.taken_over {
                tracing::info!(generation = id, "an older config generation has drained");
            }
        }
    }

    /// Carries out a member API command on the serving generation, and logs what changed.
    fn member(
        &self,
        cmd: &upstream::admin::Command,
    ) -> Result<Vec<upstream::admin::Done>, upstream::admin::CommandError> {
        use upstream::admin::CommandError;
        if self.stopping || self.taken_over {
            return Err(CommandError::Unavailable("the process is stopping".into()));
        }
        let Some(g) = self.current.as_ref() else {
            return Err(CommandError::Unavailable("not serving yet".into()));
        };
        let done = upstream::admin::apply(&g.runtime.named_pools(), cmd)?;
        for d in &done {
            tracing::info!(
                rule = %d.rule,
                route = %d.route,
                upstream = %d.addr,
                before = %d.before,
                "upstream member set to {} by the member API",
                d.after
            );
        }
        Ok(done)
    }

    /// Descriptors of the serving generation's sockets, for a new process.
    fn handoff(&self) -> Option<takeover::Handoff> {
        if self.stopping || self.taken_over || !self.started {
            return None;
        }
        let g = self.current.as_ref()?;
        let mut rules = Vec::new();
        for (rule, ports) in g.config.rules.iter().zip(&g.sockets) {
            for l in ports.iter().flatten() {
                rules.push((rule.name.clone(), l.try_clone().ok()?));
            }
        }
        let admin = self.admin.as_ref().and_then(|a| a.try_clone().ok());
        Some(takeover::Handoff { rules, admin })
    }

    /// Starts a generation on `new` (read by the loader) and retires the serving one.
    fn apply(
        &mut self,
        mut new: Config,
        read_from: Option<watch::Identity>,
    ) -> Result<String, ReloadError> {
        let Some(cur) = self.current.as_ref() else {
            return Err(ReloadError::NotServing);
        };
        let not_applied = keep_process_settings(&cur.config, &mut new);
        for w in &new.warnings {
            tracing::warn!("{w}");
        }
        let diff = Diff::between(&cur.config, &new);
        let mut summary = diff.to_string();
        if !not_applied.is_empty() {
            summary.push_str(&format!(
                "; not applied (they need a restart or a --takeover upgrade): {}",
                not_applied.join(", ")
            ));
        }
        let mut same = new.clone();
        same.warnings.clone_from(&cur.config.warnings);
        if same == cur.config {
            return Ok(format!(
                "no change{}",
                summary.strip_prefix("no change").unwrap_or("")
            ));
        }
        // Kept addresses: the same sockets (by address, whatever the rule is called now),
        // moved to the new generation — the supervisor holds one descriptor of each socket,
        // never two. New addresses: bound now, so a taken port fails the reload before
        // anything moves.
        let per_rule = engine::listeners_per_rule(&new, self.engine);
        let plan: Vec<Vec<PortPlan>> = new
            .rules
            .iter()
            .map(|rule| {
                rule.listen
                    .addrs()
                    .map(|a| (a, kept_port(&cur.config, rule, a)))
                    .collect()
            })
            .collect();
        let fresh = plan.iter().flatten().filter(|(_, k)| k.is_none()).count();
        let kept: usize = plan
            .iter()
            .flatten()
            .filter_map(|(_, k)| k.map(|(r, p)| cur.sockets[r][p].len()))
            .sum();
        // What this reload opens: the fresh ports' sockets, and the new engine's duplicate
        // of every socket it serves (the old engine closes its own once it has stopped).
        engine::ensure_fds(fresh * per_rule * 2 + kept, fresh * per_rule + kept)
            .map_err(|e| ReloadError::Fds(Arc::new(e)))?;
        let mut bound = Vec::with_capacity(new.rules.len());
        for (rule, ports) in new.rules.iter().zip(&plan) {
            // Port by port, so a range that grows or shrinks keeps the ports it had.
            let mut groups = Vec::with_capacity(ports.len());
            for (addr, kept) in ports {
                groups.push(match kept {
                    Some(_) => None,
                    None => Some(
                        net::bind_listeners_mptcp(*addr, per_rule, rule.mptcp).map_err(|e| {
                            ReloadError::Bind {
                                rule: rule.name.clone(),
                                source: Arc::new(e),
                            }
                        })?,
                    ),
                });
            }
            bound.push(groups);
        }
        let names: Vec<&str> = new.rules.iter().map(|r| r.name.as_str()).collect();
        let metrics = cur.metrics.next_generation(&names);
        metrics
            .open_taps(new.rules.iter().map(|r| r.tap.as_deref()))
            .map_err(|e| ReloadError::Tap(Arc::new(e)))?;
        let runtime = Runtime::next(&new, &cur.runtime);
        let cur_sockets = &mut self.current.as_mut().expect("checked above").sockets;
        let sockets: Vec<Vec<Vec<TcpListener>>> = plan
            .iter()
            .zip(bound)
            .map(|(ports, groups)| {
                ports
                    .iter()
                    .zip(groups)
                    .map(|((_, kept), fresh)| match (kept, fresh) {
                        (Some((r, p)), _) => std::mem::take(&mut cur_sockets[*r][*p]),
                        (None, fresh) => fresh.unwrap_or_default(),
                    })
                    .collect()
            })
            .collect();
        let (g, addrs) = match self.start_generation(new, sockets, metrics, runtime) {
            Ok(started) => started,
            Err(StartFailed { why, sockets }) => {
                if let Some(cur) = self.current.as_mut() {
                    give_back(&mut cur.sockets, &plan, sockets);
                }
                return Err(why.into());
            }
        };
        if !self.watching {
            self.watch_baseline = read_from;
        }
        self.metrics.set_access_log(g.config.access_log);
        let watch = g.config.clone();
        self.watch_if_asked(&watch);
        // The switch: the new generation serves; the old one stops accepting and drains.
        g.metrics.publish();
        self.metrics.set_runtime(g.runtime.clone());
        // The token file is read at every reload: a rotated token takes effect now.
        self.metrics
            .set_admin_token(g.config.admin_token.as_ref().map(|(_, t)| t.clone()));
        let id = g.id;
        let drain = g.config.reload_drain_timeout;
        if let Some(mut old) = self.current.replace(g) {
            old.retire(drain);
            self.retiring.push(old);
        }
        let mut out = std::io::stdout().lock();
        for (name, addr) in &addrs {
            if diff.added.contains(name) {
                tracing::info!(rule = %name, %addr, "listening");
                let _ = writeln!(
                    out,
                    "listening rule={name} addr={addr} engine={}",
                    self.engine.as_str()
                );
            }
        }
        let _ = writeln!(out, "reloaded generation={id}");
        let _ = out.flush();
        Ok(format!("generation {id}: {summary}"))
    }
}

/// Resets in `new` what only a new process can change, and names each such setting that
/// differed.
fn keep_process_settings(cur: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut kept = Vec::new();
    macro_rules! keep {
        ($($field:ident),*) => {$(
            if new.$field != cur.$field {
                kept.push(stringify!($field));
                new.$field = cur.$field.clone();
            }
        )*};
    }
    keep!(
        workers,
        engine,
        admin,
        admin_allow_remote,
        log_format,
        hdr_log,
        run_as,
        control_socket
    );
    // A port that stays keeps its listening socket, and with it the protocol it was opened
    // with: `mptcp` of such a port changes at the next restart.
    let was: Vec<Option<bool>> = new
        .rules
        .iter()
        .map(|r| {
            r.listen
                .addrs()
                .find_map(|a| kept_port(cur, r, a))
                .map(|(i, _)| cur.rules[i].mptcp)
        })
        .collect();
    for (rule, was) in new.rules.iter_mut().zip(was) {
        if let Some(was) = was
            && was != rule.mptcp
        {
            rule.mptcp = was;
            if !kept.contains(&"mptcp") {
                kept.push("mptcp");
            }
        }
    }
    kept
}

/// Which rules a reload adds, removes and changes (by name).
#[derive(Debug, Default)]
pub struct Diff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    pub kept: usize,
    /// Settings outside the rules that changed.
    pub settings: Vec<&'static str>,
}

impl Diff {
    pub fn between(old: &Config, new: &Config) -> Self {
        let mut d = Self::default();
        for r in &new.rules {
            match old.rules.iter().find(|o| o.name == r.name) {
                None => d.added.push(r.name.clone()),
                Some(o) if o != r => d.changed.push(r.name.clone()),
                Some(_) => d.kept += 1,
            }
        }
        for o in &old.rules {
            if !new.rules.iter().any(|r| r.name == o.name) {
                d.removed.push(o.name.clone());
            }
        }
        if old.mode != new.mode {
            d.settings.push("mode");
        }
        if old.shutdown_grace != new.shutdown_grace {
            d.settings.push("shutdown_grace");
        }
        if old.shutdown_delay != new.shutdown_delay {
            d.settings.push("shutdown_delay");
        }
        if old.access_log != new.access_log {
            d.settings.push("access_log");
        }
        if old.watch_config != new.watch_config {
            d.settings.push("watch_config");
        }
        if old.uring != new.uring {
            d.settings.push("uring");
        }
        if old.admin_token != new.admin_token {
            d.settings.push("admin_token_file");
        }
        d
    }
}

impl std::fmt::Display for Diff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        for (what, names) in [
            ("added", &self.added),
            ("removed", &self.removed),
            ("changed", &self.changed),
        ] {
            if !names.is_empty() {
                parts.push(format!("{what} {}", names.join(", ")));
            }
        }
        if !self.settings.is_empty() {
            parts.push(format!("settings {}", self.settings.join(", ")));
        }
        if parts.is_empty() {
            return write!(f, "no change");
        }
        write!(f, "{}; {} unchanged", parts.join("; "), self.kept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reload refused or failed answers with why, as a value the caller can match: asked
    /// before the first generation serves it is `Starting`, and one whose file does not load
    /// carries the config error itself.
    #[test]
    fn reload_errors_are_typed() {
        let load: Loader = Arc::new(|| Config::parse("bad.toml", "workers = 0\n"));
        let (tx, rx) = mpsc::channel();
        let process = Shutdown::new();
        let sup = Supervisor::new(
            Resolved::Std,
            Metrics::new(&["r"], 1),
            &process,
            (tx.clone(), rx),
            Some(load.clone()),
            Arc::new(AtomicBool::new(false)),
        )
        .unwrap();
        let (reply, answer) = mpsc::channel();
        tx.send(Event::Reload(Trigger::Admin, Some(reply))).unwrap();
        process.advance(Phase::Draining);
        let summary = sup.run();
        assert!(summary.failure.is_none());
        let e = answer.recv().unwrap().unwrap_err();
        assert!(matches!(e, ReloadError::Starting), "{e:?}");
        assert_eq!(e.to_string(), "still starting; try again once it serves");

        let e = ReloadError::Config(Arc::new(load().unwrap_err()));
        assert!(e.to_string().starts_with("bad.toml:1:11: workers: "), "{e}");
        let ReloadError::Config(c) = &e else {
            unreachable!()
        };
        assert_eq!(c.key(), Some("workers"));
        let e = ReloadError::from(StartError::Stopped);
        assert_eq!(e.to_string(), "the engine stopped while starting");
    }

    fn config(text: &str) -> Config {
        Config::parse("test.toml", text).expect("valid config")
    }

    const RULES: &str = r#"
[[rule]]
name = "web"
listen = "127.0.0.1:0"
upstream = "127.0.0.1:9000"
[[rule]]
name = "db"
listen = "127.0.0.1:5432"
upstream = "127.0.0.1:9001"
"#;

    #[test]
    fn a_diff_names_added_removed_and_changed_rules() {
        let old = config(RULES);
        let new = config(
            r#"
[[rule]]
name = "web"
listen = "127.0.0.1:0"
upstream = "127.0.0.1:9999"
[[rule]]
name = "cache"
listen = "127.0.0.1:6379"
upstream = "127.0.0.1:9002"
"#,
        );
        let d = Diff::between(&old, &new);
        assert_eq!(d.added, ["cache"]);
        assert_eq!(d.removed, ["db"]);
        assert_eq!(d.changed, ["web"]);
        assert_eq!(
            d.to_string(),
            "added cache; removed db; changed web; 0 unchanged"
        );
        assert_eq!(Diff::between(&old, &old).to_string(), "no change");
    }

    #[test]
    fn process_settings_are_kept_and_named() {
        let cur = config(&format!("workers = 2\nengine = \"std\"\n{RULES}"));
        let mut new = config(&format!(
            "workers = 4\nengine = \"tokio\"\nshutdown_grace = \"3s\"\n{RULES}"
        ));
        assert_eq!(keep_process_settings(&cur, &mut new), ["workers", "engine"]);
        assert_eq!(new.workers, cur.workers);
        assert_eq!(new.engine, cur.engine);
        // What a reload may change stays changed.
        assert_eq!(new.shutdown_grace, std::time::Duration::from_secs(3));
    }

    #[test]
    fn mptcp_of_a_port_that_stays_is_kept_and_named() {
        let cur = config(RULES);
        let mut new = config(&RULES.replace(
            "listen = \"127.0.0.1:5432\"",
            "listen = \"127.0.0.1:5432\"\nmptcp = true",
        ));
        assert!(new.rules[1].mptcp);
        assert_eq!(keep_process_settings(&cur, &mut new), ["mptcp"]);
        assert!(!new.rules[1].mptcp, "the kept socket is plain TCP");
        // A new port gets what the file says.
        let mut moved = config(&RULES.replace(
            "listen = \"127.0.0.1:5432\"",
            "listen = \"127.0.0.1:5433\"\nmptcp = true",
        ));
        assert!(keep_process_settings(&cur, &mut moved).is_empty());
        assert!(moved.rules[1].mptcp);
    }

    #[test]
    fn inherited_sockets_match_by_address_or_port_zero_by_name() {
        let cfg = config(RULES);
        let db = TcpListener::bind("127.0.0.1:0").unwrap();
        let web = TcpListener::bind("127.0.0.1:0").unwrap();
        let stray = TcpListener::bind("127.0.0.1:0").unwrap();
        let db_addr = db.local_addr().unwrap();
        let mut cfg = cfg;
        cfg.rules[1].listen = crate::config::Listen::single(db_addr);
        let mut inherited = Inherited::default();
        inherited.add([
            (None, db),
            (Some("web".to_string()), web),
            (Some("other".to_string()), stray),
        ]);
        let sockets =
            |groups: Vec<Vec<TcpListener>>| groups.iter().map(Vec::len).collect::<Vec<_>>();
        assert_eq!(sockets(inherited.take(&cfg.rules[1])), [1]);
        assert_eq!(sockets(inherited.take(&cfg.rules[0])), [1]);
        assert_eq!(inherited.leftover().len(), 1);
        assert_eq!(sockets(inherited.take(&cfg.rules[0])), [0]);
    }

    #[test]
    fn sockets_named_after_a_rule_are_its_own_whatever_their_address() {
        let mut cfg = config(RULES);
        let web_l = TcpListener::bind("127.0.0.1:0").unwrap();
        let db_l = TcpListener::bind("127.0.0.1:0").unwrap();
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        // db's config address is where the socket named "web" listens: the name wins.
        let web_addr = web_l.local_addr().unwrap();
        cfg.rules[1].listen = crate::config::Listen::single(web_addr);
        let mut inherited = Inherited::default();
        inherited.add_activated(
            &cfg,
            [
                (Some("web".to_string()), web_l),
                (Some("db".to_string()), db_l),
                (Some("ringfwd.socket".to_string()), other),
            ],
        );
        let web = inherited.take(&cfg.rules[0]);
        assert_eq!(web[0].len(), 1);
        assert_eq!(web[0][0].local_addr().unwrap(), web_addr);
        let db = inherited.take(&cfg.rules[1]);
        assert_eq!(db[0].len(), 1);
        assert_ne!(db[0][0].local_addr().unwrap(), web_addr);
        // The unit-named socket matched no rule by address: left over.
        assert_eq!(inherited.leftover().len(), 1);
        assert_eq!(fds::fd_name(Some("a::c"), 0).as_deref(), Some("a"));
        assert_eq!(fds::fd_name(Some("a::c"), 1), None);
        assert_eq!(fds::fd_name(Some("a::c"), 2).as_deref(), Some("c"));
        assert_eq!(fds::fd_name(None, 0), None);
    }

    #[test]
    fn inherited_sockets_of_a_port_range_are_matched_port_by_port() {
        // Three consecutive free ports: bind them, then hand over the first and the third.
        let (first, ls) = (0..50)
            .find_map(|_| {
                let a = TcpListener::bind("127.0.0.1:0").ok()?;
                let p = a.local_addr().ok()?.port();
                let b = TcpListener::bind(("127.0.0.1", p.checked_add(1)?)).ok()?;
                let c = TcpListener::bind(("127.0.0.1", p.checked_add(2)?)).ok()?;
                Some((p, [a, b, c]))
            })
            .expect("three consecutive free ports");
        let [a, _b, c] = ls;
        let mut cfg = config(RULES);
        cfg.rules[1].listen =
            crate::config::Listen::resolve(&format!("127.0.0.1:{first}-{}", first + 2)).unwrap();
        let mut inherited = Inherited::default();
        inherited.add([(None, a), (None, c)]);
        let groups = inherited.take(&cfg.rules[1]);
        assert_eq!(groups.iter().map(Vec::len).collect::<Vec<_>>(), [1, 0, 1]);
        assert_eq!(groups[2][0].local_addr().unwrap().port(), first + 2);
        assert!(inherited.is_empty());
    }

    #[test]
    fn systemd_sockets_for_another_process_are_left_alone() {
        let a = fds::from_systemd(Some("1"), Some("1"), None);
        assert!(a.listeners.is_empty());
        assert!(
            a.warnings[0].contains("is not this process"),
            "{:?}",
            a.warnings
        );
        let b = fds::from_systemd(None, Some("2"), None);
        assert!(b.listeners.is_empty() && !b.warnings.is_empty());
        assert!(fds::from_systemd(None, None, None).warnings.is_empty());
    }
}
