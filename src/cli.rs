//! The command line: subcommands and flags (clap), and how `run` flags override the file.
//!
//! Stage one of configuration for the command line: values here are raw; they are parsed and
//! checked with the same functions the TOML file uses ([`crate::config`]), so a flag and a
//! key reject the same bad input with the same words.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use clap_complete::Shell;

use crate::config::{
    self, Balance, Config, ConfigError, DataPath, EngineKind, Rule, TcpOptions, UringWait,
    format_duration,
};

/// ringfwd: a TCP port forwarder for Linux edge hosts (io_uring, thread-per-core).
#[derive(Debug, Parser)]
#[command(name = "ringfwd", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the forwarder.
    Run(RunArgs),
    /// Validate a config file and print the effective configuration.
    Check(CheckArgs),
    /// Echo backend: sends back every byte it receives (and answers bench TLV frames).
    Echo(crate::tools::echo::EchoArgs),
    /// Sink backend: reads and discards; with --send, also a source of bytes.
    Sink(crate::tools::sink::SinkArgs),
    /// TCP connect-time ping, for hosts that filter ICMP.
    Ping(crate::tools::ping::PingArgs),
    /// Load generator: throughput, request/response, connection churn, idle memory.
    Bench(crate::tools::bench::BenchArgs),
    /// Live per-rule table from a running forwarder's admin endpoint.
    Stats(crate::tools::stats::StatsArgs),
    /// Drain, take down, bring up or reweight a pool member of a running forwarder.
    Upstream(crate::tools::upstream::UpstreamArgs),
    /// Man pages and shell completions from this command line (for packaging).
    #[command(hide = true)]
    Generate(GenerateArgs),
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// TOML config file (see ringfwd.toml).
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Listen address of a single rule given on the command line (replaces the file's rules).
    #[arg(long, value_name = "ADDR", requires = "upstream")]
    pub listen: Option<String>,
    /// Upstream of that rule: one address, or a comma-separated pool of members
    /// (127.0.0.1:9001,127.0.0.1:9002), each of weight 1.
    #[arg(long, value_name = "ADDR[,ADDR...]", requires = "listen")]
    pub upstream: Option<String>,
    /// How every rule spreads connections over its pool: round_robin, least_conn,
    /// source_hash or random_two.
    #[arg(long, value_name = "NAME", value_parser = parse_balance)]
    pub balance: Option<Balance>,
    /// Engine: auto (io_uring, else tokio), uring, tokio or std.
    #[arg(long, value_name = "ENGINE", value_parser = parse_engine)]
    pub engine: Option<EngineKind>,
    /// Data path of the uring engine: auto, splice or copy.
    #[arg(long, value_name = "MODE", value_parser = parse_mode)]
    pub mode: Option<DataPath>,
    /// Where uring workers sleep: ring (io_uring_enter) or epoll (epoll_wait on their
    /// sockets); sets `[uring] wait`.
    #[arg(long, value_name = "WAIT", value_parser = parse_wait)]
    pub uring_wait: Option<UringWait>,
    /// Worker threads, 1 to 1024 (default: one per CPU the process may use).
    #[arg(long, value_name = "N", value_parser = parse_workers)]
    pub workers: Option<u16>,
    /// Admin listener (loopback unless admin_allow_remote) for GET /metrics, /healthz, /stats,
    /// /upstreams, /histograms and POST /reload, /upstreams/RULE/MEMBER.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<String>,
    /// Connect timeout for every rule, e.g. 3s.
    #[arg(long, value_name = "DURATION", value_parser = config::parse_duration)]
    pub connect_timeout: Option<Duration>,
    /// Idle timeout for every rule, e.g. 5m (0s: none).
    #[arg(long, value_name = "DURATION", value_parser = config::parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// How long live connections may finish after SIGINT/SIGTERM, e.g. 10s.
    #[arg(long, value_name = "DURATION", value_parser = config::parse_duration)]
    pub shutdown_grace: Option<Duration>,
    /// Binary upgrade: take the listening sockets of the ringfwd running with
    /// `control_socket = PATH`, serve them, then tell it to drain and exit.
    #[arg(long, value_name = "PATH")]
    pub takeover: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// TOML config file to validate (or give it as FILE).
    #[arg(short, long = "config", value_name = "FILE")]
    pub config_flag: Option<PathBuf>,
    /// TOML config file to validate.
    #[arg(
        value_name = "FILE",
        conflicts_with = "config_flag",
        required_unless_present = "config_flag"
    )]
    pub file: Option<PathBuf>,
    /// Print nothing when the file is valid: no effective config, no "valid" line (warnings
    /// and errors still go to stderr).
    #[arg(short, long)]
    pub quiet: bool,
}

impl CheckArgs {
    /// The file to check, however it was given.
    pub fn path(&self) -> &std::path::Path {
        self.file
            .as_deref()
            .or(self.config_flag.as_deref())
            .expect("clap requires FILE or --config")
    }
}

/// Parses the command line. `--help` and `--version` print and exit 0 as usual; any other
/// mistake is `Err` with one line for `ringfwd: error: …`, to exit 1 like a config error
/// (clap would print several lines and exit 2).
///
/// # Errors
/// The one-line description of what is wrong with the arguments.
pub fn parse_args<I, T>(args: I) -> Result<Cli, String>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::error::ErrorKind;
    let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
    let mut cmd = <Cli as clap::CommandFactory>::command();
    // Only computed when asked for: it probes io_uring.
    if args.iter().skip(1).any(|a| a == "--version") {
        cmd = cmd.long_version(crate::version::long());
    }
    let parsed = cmd
        .try_get_matches_from(args)
        .and_then(|m| <Cli as clap::FromArgMatches>::from_arg_matches(&m));
    match parsed {
        Ok(cli) => Ok(cli),
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            e.exit()
        }
        Err(e) => Err(flag_error_line(&e)),
    }
}

/// One line for a command-line error: `--FLAG: why` for a bad value (the words a config key
/// gets for the same value), else clap's first line with its tips ("a similar argument
/// exists") joined on.
pub fn flag_error_line(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    use std::error::Error as _;
    if matches!(
        e.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) && let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg)
    {
        // "--workers <N>" → "--workers"
        let flag = arg.split_whitespace().next().unwrap_or(arg);
        let value = match e.get(ContextKind::InvalidValue) {
            Some(ContextValue::String(v)) => v.as_str(),
            _ => "",
        };
        let why = match (e.source(), e.get(ContextKind::ValidValue)) {
            (Some(source), _) => source.to_string(),
            (None, _) if value.is_empty() => "a value is required".to_string(),
            (None, Some(ContextValue::Strings(valid))) if !valid.is_empty() => {
                format!(
                    "invalid value {value:?} (expected one of {})",
                    valid.join(", ")
                )
            }
            (None, _) => format!("invalid value {value:?}"),
        };
        return format!("{flag}: {why}");
    }
    let rendered = e.render().to_string();
    let mut lines = rendered.lines().map(str::trim).filter(|l| !l.is_empty());
    let mut line = lines
        .next()
        .unwrap_or("invalid arguments")
        .trim_start_matches("error: ")
        .to_string();
    let mut command = "ringfwd".to_string();
    for l in lines {
        if let Some(tip) = l.strip_prefix("tip: ") {
            line.push_str("; ");
            line.push_str(tip);
        } else if let Some(usage) = l.strip_prefix("Usage: ") {
            // "ringfwd run [OPTIONS]" → "ringfwd run"
            command = usage
                .split_whitespace()
                .take_while(|w| !w.starts_with(['[', '<', '-']))
                .collect::<Vec<_>>()
                .join(" ");
            break;
        } else if !l.starts_with("For more information") {
            // The continuation of a multi-line message (missing arguments are listed below
            // their sentence).
            line.push(' ');
            line.push_str(l);
        }
    }
    line.push_str(&format!(" (see {command} --help)"));
    line
}

fn parse_workers(s: &str) -> Result<u16, String> {
    s.parse::<u16>()
        .ok()
        .filter(|n| (1..=config::raw::MAX_WORKERS).contains(&usize::from(*n)))
        .ok_or_else(|| {
            format!(
                "invalid workers {s:?}: expected 1..={}",
                config::raw::MAX_WORKERS
            )
        })
}

fn parse_engine(s: &str) -> Result<EngineKind, String> {
    EngineKind::parse(s).ok_or_else(|| {
        format!(
            "unknown engine {s:?} (expected one of {})",
            EngineKind::NAMES
        )
    })
}

fn parse_balance(s: &str) -> Result<Balance, String> {
    Balance::parse(s)
        .ok_or_else(|| format!("unknown balance {s:?} (expected one of {})", Balance::NAMES))
}

/// A duration flag within the range of its key, worded like the key's error.
fn flag_duration(
    name: &'static str,
    d: Duration,
    zero_allowed: bool,
    max: Duration,
) -> Result<Duration, ConfigError> {
    if (d.is_zero() && !zero_allowed) || d > max {
        let want = if zero_allowed {
            format!("0s..={}", format_duration(max))
        } else {
            format!("more than 0s and at most {}", format_duration(max))
        };
        return Err(ConfigError::Flag {
            flag: name,
            message: format!("must be {want}, got {}", format_duration(d)),
        });
    }
    Ok(d)
}

fn parse_mode(s: &str) -> Result<DataPath, String> {
    DataPath::parse(s)
        .ok_or_else(|| format!("unknown mode {s:?} (expected one of {})", DataPath::NAMES))
}

fn parse_wait(s: &str) -> Result<UringWait, String> {
    UringWait::parse(s)
        .ok_or_else(|| format!("unknown wait {s:?} (expected one of {})", UringWait::NAMES))
}

impl RunArgs {
    /// The config file (if any) with the flags applied on top.
    ///
    /// # Errors
    /// The file's errors, a bad flag value, or neither a file nor `--listen/--upstream`.
    pub fn to_config(&self) -> Result<Config, ConfigError> {
        let mut cfg = match &self.config {
            Some(path) => Config::load(path)?,
            None if self.listen.is_some() => Config::parse("<command line>", "")?,
            None => {
                return Err(ConfigError::NothingToRun);
            }
        };
        if let (Some(listen), Some(upstream)) = (&self.listen, &self.upstream) {
            let flag = |flag: &'static str, message: String| ConfigError::Flag { flag, message };
            cfg.rules = vec![Rule {
                name: "default".into(),
                listen: config::Listen::resolve(listen).map_err(|m| flag("listen", m))?,
                upstream: Some(
                    config::resolve_upstream(upstream).map_err(|m| flag("upstream", m))?,
                ),
                routes: Vec::new(),
                mptcp: false,
                tcp: TcpOptions::default(),
                connect_timeout: config::DEFAULT_CONNECT_TIMEOUT,
                idle_timeout: Some(config::DEFAULT_IDLE_TIMEOUT),
                tap: None,
                max_connections: std::num::NonZeroU32::new(config::DEFAULT_MAX_CONNECTIONS)
                    .expect("non-zero"),
                proxy_protocol: config::ProxyProtocol::Off,
                accept_proxy: None,
                header_timeout: config::DEFAULT_PROXY_HEADER_TIMEOUT,
                admission: config::Admission::default(),
            }];
        }
        if let Some(e) = self.engine {
            cfg.engine = e;
        }
        if let Some(m) = self.mode {
            cfg.mode = m;
        }
        if let Some(w) = self.uring_wait {
            cfg.uring.wait = w;
        }
        if let Some(w) = self.workers {
            cfg.workers = std::num::NonZeroUsize::new(usize::from(w));
        }
        if let Some(a) = &self.admin {
            let addr = config::resolve_one(a).map_err(|message| ConfigError::Flag {
                flag: "admin",
                message,
            })?;
            if !addr.ip().is_loopback() && !cfg.admin_allow_remote {
                return Err(ConfigError::Flag {
                    flag: "admin",
                    message: format!(
                        "{addr} is not a loopback address; set admin_allow_remote = true in the config to expose metrics"
                    ),
                });
            }
            if !addr.ip().is_loopback() && cfg.admin_token.is_none() {
                return Err(ConfigError::Flag {
                    flag: "admin",
                    message: format!(
                        "{addr} is not a loopback address and no admin_token_file is set: anyone who reaches it could reload the forwarder or drain its members; set admin_token_file = \"PATH\" in the config"
                    ),
                });
            }
            cfg.admin = Some(addr);
        }
        if let Some(g) = self.shutdown_grace {
            cfg.shutdown_grace =
                flag_duration("shutdown-grace", g, true, config::MAX_SHUTDOWN_GRACE)?;
        }
        let connect_timeout = self
            .connect_timeout
            .map(|t| flag_duration("connect-timeout", t, false, config::MAX_CONNECT_TIMEOUT))
            .transpose()?;
        let idle_timeout = self
            .idle_timeout
            .map(|t| flag_duration("idle-timeout", t, true, config::MAX_IDLE_TIMEOUT))
            .transpose()?;
        for r in &mut cfg.rules {
            if let Some(t) = connect_timeout {
                r.connect_timeout = t;
            }
            if let Some(t) = idle_timeout {
                r.idle_timeout = (!t.is_zero()).then_some(t);
            }
            if let Some(b) = self.balance {
                for up in r
                    .upstream
                    .iter_mut()
                    .chain(r.routes.iter_mut().map(|r| &mut r.upstream))
                {
                    up.balance = b;
                }
            }
        }
        cfg.ensure_runnable()?;
        Ok(cfg)
    }
}

/// `ringfwd generate`'s arguments (declared here with the other commands; the work is in
/// [`crate::generate`], which reads this definition).
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(subcommand)]
    pub what: What,
}

#[derive(Debug, Subcommand)]
pub enum What {
    /// Man pages: ringfwd.1 and one ringfwd-COMMAND.1 per command, written into DIR (or
    /// ringfwd.1 alone on stdout).
    Man {
        #[arg(value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// The completion script for SHELL, written into DIR under the name that shell looks
    /// for (ringfwd.bash, _ringfwd, ringfwd.fish, …), or on stdout.
    Completions {
        #[arg(value_name = "SHELL")]
        shell: Shell,
        #[arg(value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let mut full = vec!["ringfwd", "run"];
        full.extend_from_slice(args);
        Cli::try_parse_from(full).map(|c| match c.command {
            Command::Run(r) => r,
            other => panic!("parsed as {other:?}"),
        })
    }

    #[test]
    fn listen_and_upstream_make_one_rule() {
        let cfg = run_args(&[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:9",
            "--engine",
            "std",
            "--idle-timeout",
            "0s",
        ])
        .unwrap()
        .to_config()
        .unwrap();
        assert_eq!(cfg.engine, EngineKind::Std);
        assert_eq!(cfg.rules.len(), 1);
        assert_eq!(
            cfg.rules[0].upstream.as_ref().unwrap().members[0].addrs[0].port(),
            9
        );
        assert_eq!(cfg.rules[0].idle_timeout, None);
        assert_eq!(
            cfg.rules[0].max_connections.get(),
            config::DEFAULT_MAX_CONNECTIONS
        );
    }

    fn cli_rule(extra: &[&str]) -> Result<Config, ConfigError> {
        let mut args = vec!["--listen", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        run_args(&args).unwrap().to_config()
    }

    #[test]
    fn upstream_takes_a_comma_separated_pool() {
        let cfg = cli_rule(&["--upstream", "127.0.0.1:9001,127.0.0.1:9002"]).unwrap();
        let up = cfg.rules[0].upstream.as_ref().unwrap();
        let texts: Vec<&str> = up.members.iter().map(|m| m.text.as_str()).collect();
        assert_eq!(texts, ["127.0.0.1:9001", "127.0.0.1:9002"]);
        assert!(up.members.iter().all(|m| m.weight.get() == 1 && !m.backup));
        assert_eq!(up.balance, Balance::RoundRobin);
        assert_eq!(up.connect_retries, config::DEFAULT_CONNECT_RETRIES);
        assert_eq!(
            up.addrs().map(|a| a.port()).collect::<Vec<_>>(),
            [9001, 9002]
        );
        // Spaces after the commas are forgiven.
        let cfg = cli_rule(&["--upstream", "127.0.0.1:9001, [::1]:9002"]).unwrap();
        assert_eq!(cfg.rules[0].upstream.as_ref().unwrap().members.len(), 2);
    }

    #[test]
    fn bad_upstream_pools_are_rejected() {
        let e = cli_rule(&["--upstream", "127.0.0.1:9001,127.0.0.1:9001"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--upstream: 127.0.0.1:9001 is in the pool twice (members \"127.0.0.1:9001\" and \"127.0.0.1:9001\"); list each address once"
        );
        let e = cli_rule(&["--upstream", "127.0.0.1:9001,"]).unwrap_err();
        assert!(e.to_string().contains("empty member"), "{e}");
        let e = cli_rule(&["--upstream", "127.0.0.1:0"]).unwrap_err();
        assert!(
            e.to_string().starts_with("--upstream: upstream port 0 in"),
            "{e}"
        );
        let e = cli_rule(&["--upstream", "127.0.0.1:1,nope"]).unwrap_err();
        assert!(e.to_string().contains("\"nope\" is not an address"), "{e}");
    }

    #[test]
    fn balance_flag_sets_every_rule() {
        let cfg = cli_rule(&["--upstream", "127.0.0.1:9", "--balance", "least_conn"]).unwrap();
        assert_eq!(
            cfg.rules[0].upstream.as_ref().unwrap().balance,
            Balance::LeastConn
        );
        let e = run_args(&["--balance", "fastest"]).unwrap_err();
        assert!(
            e.to_string().contains(
                "unknown balance \"fastest\" (expected one of round_robin, least_conn, source_hash, random_two)"
            ),
            "{e}"
        );
    }

    #[test]
    fn duration_flags_have_the_keys_bounds() {
        let e = cli_rule(&["--upstream", "127.0.0.1:9", "--connect-timeout", "0s"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--connect-timeout: must be more than 0s and at most 1h, got 0s"
        );
        let e = cli_rule(&["--upstream", "127.0.0.1:9", "--connect-timeout", "2h"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--connect-timeout: must be more than 0s and at most 1h, got 2h"
        );
        let e = cli_rule(&["--upstream", "127.0.0.1:9", "--idle-timeout", "200h"]).unwrap_err();
        assert_eq!(e.to_string(), "--idle-timeout: must be 0s..=168h, got 200h");
        let e = cli_rule(&["--upstream", "127.0.0.1:9", "--shutdown-grace", "25h"]).unwrap_err();
        assert_eq!(e.to_string(), "--shutdown-grace: must be 0s..=24h, got 25h");
        let e = run_args(&["--connect-timeout", "18446744073709551615h"]).unwrap_err();
        assert!(e.to_string().contains("too large"), "{e}");
    }

    #[test]
    fn listen_requires_upstream() {
        let e = run_args(&["--listen", "127.0.0.1:0"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn bad_flag_values_are_rejected_with_reasons() {
        let e = run_args(&["--listen", "a", "--upstream", "b", "--engine", "fast"]).unwrap_err();
        assert!(e.to_string().contains("unknown engine \"fast\""), "{e}");
        let e =
            run_args(&["--listen", "a", "--upstream", "b", "--idle-timeout", "10"]).unwrap_err();
        assert!(e.to_string().contains("a unit is required"), "{e}");
        let e = run_args(&["--listen", "nope", "--upstream", "127.0.0.1:1"])
            .unwrap()
            .to_config()
            .unwrap_err();
        assert!(e.to_string().starts_with("--listen:"), "{e}");
    }

    fn arg_error(args: &[&str]) -> String {
        let mut full = vec!["ringfwd"];
        full.extend_from_slice(args);
        match parse_args(full) {
            Ok(cli) => panic!("parsed: {cli:?}"),
            Err(line) => line,
        }
    }

    #[test]
    fn flag_errors_are_one_line_worded_like_the_keys() {
        assert_eq!(
            arg_error(&["run", "--workers", "0"]),
            "--workers: invalid workers \"0\": expected 1..=1024"
        );
        assert_eq!(
            arg_error(&["run", "--idle-timeout", "5"]),
            "--idle-timeout: invalid duration \"5\": a unit is required (us, ms, s, m or h)"
        );
        assert_eq!(
            arg_error(&["run", "--engine", "fast"]),
            "--engine: unknown engine \"fast\" (expected one of auto, uring, tokio, std)"
        );
        assert_eq!(
            arg_error(&["run", "--listen"]),
            "--listen: a value is required"
        );
        assert_eq!(
            arg_error(&["run", "--wrokers", "2"]),
            "unexpected argument '--wrokers' found; a similar argument exists: '--workers' (see ringfwd run --help)"
        );
        assert_eq!(
            arg_error(&["frob"]),
            "unrecognized subcommand 'frob' (see ringfwd --help)"
        );
        for line in [arg_error(&["check"]), arg_error(&["run", "--bogus"])] {
            assert!(!line.contains('\n'), "{line}");
        }
    }

    #[test]
    fn check_takes_the_file_as_flag_or_argument() {
        let path = |args: &[&str]| {
            let mut full = vec!["ringfwd", "check"];
            full.extend_from_slice(args);
            match parse_args(full).unwrap().command {
                Command::Check(c) => (c.path().to_path_buf(), c.quiet),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(path(&["a.toml"]), (PathBuf::from("a.toml"), false));
        assert_eq!(
            path(&["-c", "b.toml", "-q"]),
            (PathBuf::from("b.toml"), true)
        );
        assert_eq!(
            path(&["--quiet", "--config", "c.toml"]).0,
            PathBuf::from("c.toml")
        );
        let e = arg_error(&["check", "a.toml", "--config", "b.toml"]);
        assert!(e.contains("cannot be used with"), "{e}");
        let e = arg_error(&["check"]);
        assert!(e.contains("<FILE>"), "{e}");
    }

    #[test]
    fn admin_help_lists_every_endpoint() {
        let cmd = <Cli as clap::CommandFactory>::command();
        let run = cmd.find_subcommand("run").unwrap();
        let admin = run.get_arguments().find(|a| a.get_id() == "admin").unwrap();
        let help = admin.get_help().unwrap().to_string();
        for (path, method) in crate::metrics::admin::ENDPOINTS {
            assert!(help.contains(path), "--admin's help lacks {path}: {help}");
            assert!(help.contains(method.as_str()), "{help}");
            assert!(
                crate::metrics::admin::ENDPOINTS_TEXT.contains(path),
                "the start-up line lacks {path}"
            );
        }
    }

    #[test]
    fn nothing_to_run_is_an_error() {
        let e = run_args(&[]).unwrap().to_config().unwrap_err();
        assert!(e.to_string().contains("nothing to run"), "{e}");
    }

    #[test]
    fn remote_admin_needs_permission() {
        let e = run_args(&[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:1",
            "--admin",
            "0.0.0.0:9100",
        ])
        .unwrap()
        .to_config()
        .unwrap_err();
        assert!(e.to_string().contains("admin_allow_remote"), "{e}");
    }
}
