//! The `ringfwd` binary: parse the command line, build, run, map the outcome to an exit code.

use std::io::Write;
use std::process::ExitCode;

use ringfwd::cli::{CheckArgs, Command, RunArgs};
use ringfwd::config::{Config, LogFormat};
use ringfwd::engine;
use ringfwd::metrics::Metrics;
use ringfwd::metrics::hdrlog::HdrLog;
use ringfwd::shutdown::{self, Shutdown};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match ringfwd::cli::parse_args(std::env::args_os()) {
        Ok(cli) => cli,
        Err(line) => {
            // Like a config error: one line, exit 1.
            let _ = writeln!(std::io::stderr(), "ringfwd: error: {line}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Run(args) => run(&args),
        Command::Check(args) => check(&args),
        Command::Echo(a) => tool(|| ringfwd::tools::echo::run(a)),
        Command::Sink(a) => tool(|| ringfwd::tools::sink::run(a)),
        Command::Ping(a) => tool(|| ringfwd::tools::ping::run(a)),
        Command::Bench(a) => tool(|| ringfwd::tools::bench::run(a)),
        Command::Stats(a) => tool(|| ringfwd::tools::stats::run(a)),
        Command::Upstream(a) => tool(|| ringfwd::tools::upstream::run(a)),
        Command::Generate(a) => generate(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Not `eprintln!`: it panics (exit 101) when stderr is a closed pipe.
            let _ = writeln!(std::io::stderr(), "ringfwd: error: {}", error_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each cause added only if the text so far does not
/// already say it: several error types here embed their source in their own message *and*
/// expose it as `source()`, and plain `{:#}` then printed the cause twice
/// ("cannot listen on …: address already in use …: cannot listen on …: address already …").
fn error_line(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LogWriter)
        // On a failed write tracing-subscriber would otherwise `eprintln!` about it, and
        // `eprintln!` panics when stderr is the very pipe that is gone.
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Set once a log write failed with EPIPE: nobody will ever read this stderr again (a closed
/// `| head`, a restarted journald or log shipper), so later lines are not even attempted.
static LOG_PIPE_GONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Stderr for the log, never failing: a log line that cannot be written is dropped. Logging
/// must never end the process or a thread of it (the signal thread logs each signal).
struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        use std::sync::atomic::Ordering;
        if !LOG_PIPE_GONE.load(Ordering::Relaxed)
            && let Err(e) = std::io::stderr().write_all(buf)
            && e.kind() == std::io::ErrorKind::BrokenPipe
        {
            LOG_PIPE_GONE.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn tool(f: impl FnOnce() -> Result<(), ringfwd::tools::ToolError>) -> anyhow::Result<()> {
    init_logging(LogFormat::Text);
    f().map_err(|e| anyhow::anyhow!("{e}"))
}

/// `ringfwd generate`: one line per file written, on stderr (stdout may be the page itself).
fn generate(args: &ringfwd::cli::GenerateArgs) -> anyhow::Result<()> {
    for path in ringfwd::generate::run(args)? {
        let _ = writeln!(std::io::stderr(), "ringfwd: wrote {}", path.display());
    }
    Ok(())
}

/// `ringfwd check`: the effective config on stdout, warnings and then one verdict line on
/// stderr (`nginx -t`, `haproxy -c`), so a script or a person sees that it passed.
fn check(args: &CheckArgs) -> anyhow::Result<()> {
    let path = args.path();
    let cfg = Config::load(path)?;
    cfg.ensure_runnable()?;
    // What `run` would refuse at start: a control socket in a missing or unsafe directory.
    if let Some(socket) = &cfg.control_socket {
        let access = ringfwd::control::takeover::Access::new(cfg.run_as.as_ref());
        ringfwd::control::takeover::check_path(socket, access)?;
    }
    let mut err = std::io::stderr();
    for w in &cfg.warnings {
        let _ = writeln!(err, "ringfwd: warning: {w}");
    }
    if !args.quiet {
        let _ = write!(std::io::stdout(), "{}", cfg.to_toml());
        let _ = std::io::stdout().flush();
        let _ = writeln!(err, "ringfwd: {}", check_verdict(path, &cfg));
    }
    Ok(())
}

/// "FILE: configuration is valid (2 rules, 1 warning)".
fn check_verdict(path: &std::path::Path, cfg: &Config) -> String {
    let plural = |n: usize, one: &str| format!("{n} {one}{}", if n == 1 { "" } else { "s" });
    let mut counts = plural(cfg.rules.len(), "rule");
    if !cfg.warnings.is_empty() {
        counts.push_str(", ");
        counts.push_str(&plural(cfg.warnings.len(), "warning"));
    }
    format!("{}: configuration is valid ({counts})", path.display())
}

fn run(args: &RunArgs) -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use ringfwd::control::{self, Event, Inherited, Supervisor, Trigger};

    // What `watch_config` compares with first: the file before it is read.
    let watch_baseline = args.config.as_deref().and_then(control::watch::identity);
    let config = args.to_config()?;
    init_logging(config.log_format);
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    // Decided before anything is bound: a `user` that cannot be switched to is an error now,
    // not after the listeners are open.
    let privileges = ringfwd::privdrop::plan(config.run_as.as_ref())?;
    if let ringfwd::privdrop::Plan::Drop(to) = &privileges {
        tracing::debug!(
            user = %to.user, uid = to.uid, group = %to.group, gid = to.gid,
            "will drop root once ready"
        );
    }
    // The control socket is created now, as whoever started the process (root, before the
    // drop), so a root-owned directory works and a path that cannot be created fails the
    // start. Only root and the user the forwarder serves as may talk to it.
    let access = control::takeover::Access::new(config.run_as.as_ref());
    let mut control_socket = match &config.control_socket {
        Some(path) => Some(control::takeover::ControlSocket::create(path, access)?),
        None => None,
    };
    let control_socket_id = control_socket.as_ref().map(|c| c.id());
    let shutdown = Shutdown::new();
    let events = std::sync::mpsc::channel::<Event>();
    {
        let tx = events.0.clone();
        shutdown::install_signal_handlers(&shutdown, move || {
            let _ = tx.send(Event::Reload(Trigger::Signal, None));
        })?;
    }

    // Asked for before any engine starts: it turns the workers' heartbeats on.
    let watchdog = ringfwd::notify::watchdog_period();
    let nofile = ringfwd::net::raise_nofile_limit();
    tracing::debug!(nofile, "open-files limit");
    let engine = engine::resolve(config.engine)?;
    // The data path that runs: the uring engine's configured one; the others only copy.
    let mode_of = |engine| match engine {
        engine::Resolved::Uring => config.mode.as_str(),
        engine::Resolved::Tokio | engine::Resolved::Std => "copy",
    };

    // Listening sockets this process is given rather than binds: systemd's (socket
    // activation), or those of the ringfwd being upgraded (`--takeover`).
    let mut inherited = Inherited::default();
    let activation = control::fds::from_systemd(
        std::env::var("LISTEN_PID").ok().as_deref(),
        std::env::var("LISTEN_FDS").ok().as_deref(),
        std::env::var("LISTEN_FDNAMES").ok().as_deref(),
    );
    for w in &activation.warnings {
        tracing::warn!("socket activation: {w}");
    }
    if !activation.listeners.is_empty() {
        tracing::info!(
            sockets = activation.listeners.len(),
            "socket activation: listening sockets passed by systemd"
        );
    }
    let activated = !activation.listeners.is_empty();
    inherited.add_activated(&config, activation.listeners);
    let mut inherited_admin = None;
    let mut takeover = match &args.takeover {
        Some(path) => {
            let mut received = control::takeover::receive(path, access)?;
            // A count and the distinct addresses, not one entry per socket: a port range
            // hands over thousands (one per port and worker).
            let addrs = received.addrs();
            let mut distinct = addrs.clone();
            distinct.sort_unstable();
            distinct.dedup();
            let shown: Vec<String> = distinct.iter().take(8).map(ToString::to_string).collect();
            tracing::info!(
                path = %path.display(),
                sockets = addrs.len(),
                addresses = distinct.len(),
                first = %shown.join(" "),
                "takeover: received the running process's listening sockets"
            );
            let (rules, admin) = received.take();
            inherited.add(rules.into_iter().map(|(name, l)| (Some(name), l)));
            inherited_admin = admin;
            Some(received)
        }
        None => None,
    };

    let names: Vec<&str> = config.rules.iter().map(|r| r.name.as_str()).collect();
    let metrics = Metrics::new(&names, config.worker_count());
    let runtime = ringfwd::session::Runtime::new(&config);
    metrics.set_runtime(runtime.clone());
    metrics.set_admin_token(config.admin_token.as_ref().map(|(_, t)| t.clone()));
    metrics.set_access_log(config.access_log);
    metrics.open_taps(config.rules.iter().map(|r| r.tap.as_deref()))?;
    let mut admin_fd = None;
    if let Some(addr) = config.admin {
        let listener = match inherited_admin.take() {
            Some(l) if l.local_addr().ok() == Some(addr) || addr.port() == 0 => l,
            _ => ringfwd::net::bind_listener(addr, false)
                .map_err(ringfwd::metrics::admin::AdminError::from)?,
        };
        admin_fd = listener.try_clone().ok();
        let bound = ringfwd::metrics::admin::spawn_on(listener, metrics.clone())?;
        tracing::info!(
            addr = %bound,
            "admin listening: {}",
            ringfwd::metrics::admin::ENDPOINTS_TEXT
        );
        // Machine-readable, like the "listening" lines: tests bind port 0 and read it here.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "admin addr={bound}");
        let _ = out.flush();
    }
    let hdr_log = match &config.hdr_log {
        Some(h) => Some(HdrLog::start(&h.path, h.interval, metrics.clone())?),
        None => None,
    };

    let watch_enabled = Arc::new(AtomicBool::new(config.watch_config));
    let load: Option<control::Loader> = match &args.config {
        Some(_) => {
            let args = args.clone();
            Some(Arc::new(move || args.to_config()))
        }
        None => None,
    };
    let reloadable = load.is_some();
    let mut supervisor = Supervisor::new(
        engine,
        metrics.clone(),
        &shutdown,
        (events.0.clone(), events.1),
        load,
        watch_enabled.clone(),
    )?;
    supervisor.set_admin(admin_fd);
    supervisor.set_watch_path(args.config.clone(), watch_baseline);
    supervisor.set_socket_activated(activated);
    let sockets = control::first_listeners(
        &config,
        engine::listeners_per_rule(&config, engine),
        &mut inherited,
    )?;
    for addr in inherited.leftover() {
        tracing::warn!(%addr, "an inherited listening socket matches no rule's listen address; closed");
    }
    drop(inherited);
    let events_tx = events.0.clone();
    drop(events.0);
    let mut on_ready = |engine: engine::Resolved, addrs: &[(String, std::net::SocketAddr)]| {
        let mode = mode_of(engine);
        metrics.set_build_info(engine.as_str(), mode);
        // The control socket moves to its path (over the socket of the process this one
        // takes over from, if any) before the drop: its directory may be writable by root
        // only. Nothing was handed over yet; a process this one takes over from serves on.
        if let Some(c) = &mut control_socket
            && let Err(e) = c.publish()
        {
            let _ = writeln!(
                std::io::stderr(),
                "ringfwd: error: {}",
                error_line(&e.into())
            );
            std::process::exit(1);
        }
        // Everything privileged is done: listeners bound (any port), files opened, every
        // worker's ring, registered buffers and pipes set up. Switch every thread to `user`
        // before announcing readiness, so a "listening" line means privileges are dropped.
        // Staying root is warned about here, once serving: a run that fails before it is
        // ready reports its error alone.
        if privileges == ringfwd::privdrop::Plan::StayRoot {
            tracing::warn!(
                "running as root; set user = \"NAME\" (e.g. \"ringfwd\") in the config to drop privileges once listeners are bound"
            );
        }
        if let ringfwd::privdrop::Plan::Drop(to) = &privileges {
            if let Err(e) = ringfwd::privdrop::drop_to(to) {
                // Possibly half-switched: never serve another connection like this.
                let _ = writeln!(
                    std::io::stderr(),
                    "ringfwd: error: cannot drop privileges to user {:?} group {:?}: {e}",
                    to.user,
                    to.group
                );
                std::process::exit(1);
            }
            tracing::info!(
                user = %to.user, uid = to.uid, group = %to.group, gid = to.gid,
                groups = ?to.groups, "dropped root privileges"
            );
        }
        if let Some(received) = takeover.take() {
            // Serving: the old process may now stop accepting and drain.
            match received.ready() {
                Ok(answer) => {
                    tracing::info!(answer = %answer.trim(), "takeover: the old process is draining")
                }
                Err(e) => tracing::warn!("takeover: {e}; serving anyway"),
            }
        }
        if let Some(c) = control_socket.take() {
            let path = c.path().to_path_buf();
            match c.serve(events_tx.clone()) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), allowed = %access.who(), "control socket listening (run --takeover)")
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot serve the control socket; --takeover from this process is not possible")
                }
            }
        }
        {
            let tx = std::sync::Mutex::new(events_tx.clone());
            metrics.set_member_hook(Box::new(move |cmd| {
                use ringfwd::upstream::admin::CommandError;
                let stopping = || CommandError::Unavailable("the process is stopping".into());
                let (reply, answer) = std::sync::mpsc::channel();
                tx.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .send(Event::Member(cmd, reply))
                    .map_err(|_| stopping())?;
                answer.recv().unwrap_or_else(|_| Err(stopping()))
            }));
        }
        if reloadable {
            let tx = std::sync::Mutex::new(events_tx.clone());
            metrics.set_reload_hook(Box::new(move || {
                let (reply, answer) = std::sync::mpsc::channel();
                let sent = tx
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .send(Event::Reload(Trigger::Admin, Some(reply)));
                if sent.is_err() {
                    return Err(control::ReloadError::Stopping.into());
                }
                answer
                    .recv()
                    .unwrap_or(Err(control::ReloadError::Stopping))
                    .map_err(Into::into)
            }));
        }
        // One machine-readable line per rule on stdout: scripts and tests wait for it.
        {
            let mut out = std::io::stdout().lock();
            for (name, addr) in addrs {
                // A port range: `addr` is its first port, `ports` the whole range.
                let ports = config
                    .rules
                    .iter()
                    .find(|r| r.name == *name && r.listen.is_range())
                    .map(|r| format!("{}-{}", r.listen.port(), r.listen.ports().end()));
                tracing::info!(rule = %name, %addr, ports, engine = engine.as_str(), mode, workers = config.worker_count(), "listening");
                let _ = writeln!(
                    out,
                    "listening rule={name} addr={addr} engine={}{}",
                    engine.as_str(),
                    ports.map(|p| format!(" ports={p}")).unwrap_or_default()
                );
            }
            let _ = out.flush();
        }
        // systemd (Type=notify or notify-reload): serving now, and the watchdog may start.
        ringfwd::notify::ready("serving");
        if let Some(period) = watchdog
            && let Err(e) = ringfwd::notify::spawn_watchdog(period)
        {
            tracing::warn!(error = %e, "cannot start the watchdog thread; systemd will restart the service when WatchdogSec passes");
        }
    };
    let first = supervisor.prepare_first(config.clone(), sockets, runtime.clone())?;
    let first_id = first.id;
    let to_supervisor = supervisor.events();
    // The supervisor acts on events (reloads, stop, takeover) on a thread of its own; the
    // first generation's engine runs on this thread, as it always has.
    let supervising = std::thread::Builder::new()
        .name("ringfwd-supervisor".into())
        .spawn(move || supervisor.run())
        .map_err(|e| anyhow::anyhow!("cannot start the control-plane thread: {e}"))?;
    let mut ready = false;
    let served = engine::serve(
        &config,
        engine,
        first.listeners,
        first.ctx,
        |engine, addrs| {
            ready = true;
            let _ = to_supervisor.send(Event::FirstReady(engine));
            on_ready(engine, addrs);
        },
    );
    match served {
        Err(e) if !ready => return Err(e.into()),
        result => {
            let _ = to_supervisor.send(Event::Ended(first_id, result.err().map(|e| e.to_string())));
        }
    }
    let summary = supervising
        .join()
        .map_err(|_| anyhow::anyhow!("the control-plane thread panicked"))?;
    if let Some(log) = hdr_log {
        log.finish();
    }
    let cut = summary.cut;
    let drained = summary.live_at_drain.saturating_sub(cut);
    tracing::info!(
        drained,
        cut,
        "stopped: {drained} connections drained, {cut} cut"
    );
    if let (Some(path), Some(id)) = (&config.control_socket, control_socket_id)
        && !summary.taken_over
    {
        control::takeover::remove_if_ours(path, id);
    }
    if let Some(why) = summary.failure {
        anyhow::bail!("{why}");
    }
    Ok(())
}
