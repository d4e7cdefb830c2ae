//! The `ringfwd` binary: parse the command line, build, run, map the outcome to an exit code.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use ringfwd::cli::{Cli, Command, RunArgs};
use ringfwd::config::{Config, LogFormat};
use ringfwd::engine::{self, RunContext};
use ringfwd::metrics::Metrics;
use ringfwd::metrics::hdrlog::HdrLog;
use ringfwd::shutdown::{self, Shutdown};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(&args),
        Command::Check(args) => check(&args.config),
        Command::Echo(a) => tool(|| ringfwd::tools::echo::run(a)),
        Command::Sink(a) => tool(|| ringfwd::tools::sink::run(a)),
        Command::Ping(a) => tool(|| ringfwd::tools::ping::run(a)),
        Command::Bench(a) => tool(|| ringfwd::tools::bench::run(a)),
        Command::Stats(a) => tool(|| ringfwd::tools::stats::run(a)),
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

fn check(path: &std::path::Path) -> anyhow::Result<()> {
    let cfg = Config::load(path)?;
    cfg.ensure_runnable()?;
    for w in &cfg.warnings {
        let _ = writeln!(std::io::stderr(), "ringfwd: warning: {w}");
    }
    let _ = write!(std::io::stdout(), "{}", cfg.to_toml());
    Ok(())
}

fn run(args: &RunArgs) -> anyhow::Result<()> {
    let config = args.to_config()?;
    init_logging(config.log_format);
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    // Decided before anything is bound: a `user` that cannot be switched to is an error now,
    // not after the listeners are open.
    let privileges = ringfwd::privdrop::plan(config.run_as.as_ref()).map_err(anyhow::Error::msg)?;
    if let ringfwd::privdrop::Plan::Drop(to) = &privileges {
        tracing::debug!(
            user = %to.user, uid = to.uid, group = %to.group, gid = to.gid,
            "will drop root once ready"
        );
    }
    let shutdown = Shutdown::new();
    shutdown::install_signal_handlers(&shutdown)?;
    shutdown.spawn_grace_timer(config.shutdown_grace);

    let nofile = ringfwd::net::raise_nofile_limit();
    tracing::debug!(nofile, "open-files limit");
    let engine = engine::resolve(config.engine)?;
    // The data path that runs: the uring engine's configured one; the others only copy.
    let mode_of = |engine| match engine {
        engine::Resolved::Uring => config.mode.as_str(),
        engine::Resolved::Tokio | engine::Resolved::Std => "copy",
    };
    let names: Vec<&str> = config.rules.iter().map(|r| r.name.as_str()).collect();
    let metrics = Metrics::new(&names, config.worker_count());
    let runtime = ringfwd::session::Runtime::new(&config);
    metrics.set_runtime(runtime.clone());
    metrics.set_access_log(config.access_log);
    metrics.open_taps(config.rules.iter().map(|r| r.tap.as_deref()))?;
    if let Some(addr) = config.admin {
        let bound = ringfwd::metrics::admin::spawn(addr, metrics.clone())?;
        tracing::info!(addr = %bound, "admin listening: /metrics /healthz /stats /histograms");
        // Machine-readable, like the "listening" lines: tests bind port 0 and read it here.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "admin addr={bound}");
        let _ = out.flush();
    }
    let hdr_log = match &config.hdr_log {
        Some(h) => Some(HdrLog::start(&h.path, h.interval, metrics.clone())?),
        None => None,
    };
    ringfwd::upstream::control::spawn(
        runtime.pools(),
        std::sync::Arc::new(ringfwd::upstream::control::SystemResolver),
    )
    .map_err(|e| anyhow::anyhow!("cannot start the upstream health-check thread: {e}"))?;
    // Live sessions when draining begins: at the end, those not cut were drained.
    let live_at_drain = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    {
        let (s, rt, at) = (shutdown.clone(), runtime.clone(), live_at_drain.clone());
        let _ = std::thread::Builder::new()
            .name("ringfwd-drain".into())
            .spawn(move || {
                s.wait_for(shutdown::Phase::Draining, None);
                let live = rt.live();
                at.store(live, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(live, "draining: no new connections; live ones may finish");
            });
    }
    let ctx = RunContext {
        shutdown,
        metrics,
        runtime: runtime.clone(),
    };
    let build_info = ctx.metrics.clone();
    // `engine` may still change here: `auto` falls back to tokio if an io_uring worker
    // cannot set up, so the engine that runs is the one `run` reports.
    engine::run(&config, engine, ctx, |engine, addrs| {
        let mode = mode_of(engine);
        build_info.set_build_info(engine.as_str(), mode);
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
        // One machine-readable line per rule on stdout: scripts and tests wait for it.
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
    })?;
    if let Some(log) = hdr_log {
        log.finish();
    }
    let cut = runtime.cut();
    let drained = live_at_drain
        .load(std::sync::atomic::Ordering::Relaxed)
        .saturating_sub(cut);
    tracing::info!(
        drained,
        cut,
        "stopped: {drained} connections drained, {cut} cut"
    );
    Ok(())
}
