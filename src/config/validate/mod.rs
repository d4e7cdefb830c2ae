//! Stage two of configuration: the raw file checked and turned into the model.
//!
//! Every check reports the file, line, column and key of the value it refused; a rule's pool
//! and its routes' pools go through the one function in [`pool`].

mod egress;
mod pool;

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::ConfigError;
use super::error::Source;
use super::hint;
use super::model::*;
use super::raw::{self, KeepaliveValue, RawConfig, RawRule, RuleKeys, WithPool, WorkersValue};
use super::resolve::resolve_one;
use super::units::{ByteSize, format_duration};
use pool::pools_from_raw;
pub use pool::resolve_upstream;

impl Config {
    /// Reads and validates a TOML file.
    ///
    /// # Errors
    /// Unreadable file, TOML syntax, unknown keys, bad values, unresolvable addresses: one
    /// line naming the file, line and key.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: path.to_path_buf(),
            source,
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
            let message = e.message().trim().to_string();
            let Some(span) = e.span() else {
                return ConfigError::Toml {
                    file: name.to_string(),
                    at: None,
                    key: None,
                    message,
                    hint: None,
                };
            };
            let (line, col) = src.line_col(span.start);
            let line_text = text.lines().nth(line - 1).unwrap_or("");
            let hint = hint::for_error(&message, line_text);
            // An unknown key is named in the message itself.
            let key = if message.starts_with("unknown field") {
                None
            } else {
                src.key_on_line(line)
            };
            ConfigError::Toml {
                file: name.to_string(),
                at: Some((line, col)),
                key,
                message,
                hint,
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
        let admin_token = raw
            .admin_token_file
            .as_ref()
            .map(|s| {
                admin_token(s.get_ref())
                    .map(|t| (PathBuf::from(s.get_ref()), t))
                    .map_err(|m| src.error_at(s.span(), "admin_token_file", m))
            })
            .transpose()?;
        if let (Some(addr), None, Some(s)) = (admin, &admin_token, &raw.admin)
            && !addr.ip().is_loopback()
        {
            return Err(src.error_at(
                s.span(),
                "admin",
                format!("{addr} is not a loopback address and no admin_token_file is set: anyone who reaches it could reload the forwarder or drain its members; set admin_token_file = \"PATH\" (a file others may not read)"),
            ));
        }
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
                .keys
                .name
                .as_ref()
                .map_or_else(|| r.keys.listen.span(), |n| n.span());
            let listen_span = r.keys.listen.span();
            if run_as.is_some() {
                egress::check_no_switch(&r.keys, src)?;
            }
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
            admin_token,
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
}

/// The token in `path`: its content without surrounding white space, from a file no one but
/// its owner and group may read and only its owner may write (the token lets whoever holds
/// it reload the forwarder). Group read is allowed because it is how a service user reads a
/// file root owns (`root:ringfwd 0640`) and how a non-root Kubernetes pod reads a mounted
/// Secret (`fsGroup`, `defaultMode: 0440`).
///
/// # Errors
/// The file is missing or unreadable, readable by others or writable by its group or
/// others, empty, or not one token.
pub fn admin_token(path: &str) -> Result<AdminToken, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {path:?}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{path:?} is not a file"));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o027 != 0 {
        return Err(format!(
            "{path:?} may be read by others or written by its group (mode {mode:04o}); chmod 600 it (or 640 for a group the service runs in)"
        ));
    }
    let text = std::fs::read(path).map_err(|e| format!("cannot read {path:?}: {e}"))?;
    let token = text.trim_ascii();
    if token.is_empty() {
        return Err(format!("{path:?} is empty: write the token in it"));
    }
    if token.len() > AdminToken::MAX_LEN || token.iter().any(|b| !b.is_ascii_graphic()) {
        return Err(format!(
            "{path:?} must hold one token of printable characters without spaces, at most {} bytes",
            AdminToken::MAX_LEN
        ));
    }
    Ok(AdminToken::new(token))
}

/// The `user` and `group` keys, resolved against the user and group databases now, so that an
/// unknown name is reported at its key rather than when `run` is about to drop root.
fn run_as(
    user: Option<&toml::Spanned<String>>,
    group: Option<&toml::Spanned<String>>,
    src: &Source<'_>,
) -> Result<Option<crate::privdrop::RunAs>, ConfigError> {
    use crate::privdrop::RunAs;
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
        .map_err(|e| match (e.key(), group) {
            ("group", Some(g)) => src.error_at(g.span(), "group", e.to_string()),
            _ => src.error_at(user.span(), "user", e.to_string()),
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
        wait: match raw.wait {
            None => d.wait,
            Some(s) => UringWait::parse(s.get_ref()).ok_or_else(|| {
                src.error_at(
                    s.span(),
                    "uring.wait",
                    format!(
                        "unknown wait {:?} (expected one of {})",
                        s.get_ref(),
                        UringWait::NAMES
                    ),
                )
            })?,
        },
    };
    Ok(t)
}

fn rule_from_raw(
    index: usize,
    raw: RawRule,
    default_max_connections: NonZeroU32,
    src: &Source<'_>,
) -> Result<Rule, ConfigError> {
    let WithPool { keys: r, pool } = raw;
    let name = match &r.name {
        Some(n) if n.get_ref().trim().is_empty() => {
            return Err(src.error_at(n.span(), "name", "must not be empty"));
        }
        Some(n) => n.get_ref().clone(),
        None => format!("rule{}", index + 1),
    };
    let listen = Listen::resolve(r.listen.get_ref())
        .map_err(|m| src.error_at(r.listen.span(), "listen", m))?;
    let (mut upstream, mut routes) = pools_from_raw(&r, &pool, &listen, src)?;
    // The rule's upstream-side keys: its own pool's, and its routes' unless they say otherwise.
    let rule_egress =
        egress::EgressKeys::of_rule(&r).resolve(&crate::config::Egress::PLAIN, src)?;
    if let Some(up) = &mut upstream {
        up.egress = rule_egress.clone();
    }
    for (route, raw_route) in routes.iter_mut().zip(&r.routes) {
        route.upstream.egress =
            egress::EgressKeys::of_route(&raw_route.keys).resolve(&rule_egress, src)?;
    }
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
    // The kernel paces TCP sockets only: an MPTCP socket refuses SO_MAX_PACING_RATE, so a
    // cap on it would silently not hold.
    let mptcp_upstream = upstream
        .iter()
        .chain(routes.iter().map(|r| &r.upstream))
        .any(|u| u.egress.mptcp);
    let paced_mptcp = [
        (&r.upload_rate, mptcp_upstream, "upstream_mptcp"),
        (
            &r.download_rate,
            r.mptcp.as_ref().is_some_and(|m| *m.get_ref()),
            "mptcp",
        ),
    ];
    for (rate, mptcp, other) in paced_mptcp {
        if let (Some(rate), true) = (rate, mptcp) {
            let key = if other == "mptcp" {
                "download_rate"
            } else {
                "upload_rate"
            };
            return Err(src.error_at(
                rate.span(),
                key,
                format!("cannot cap an MPTCP connection (the kernel paces TCP sockets only): remove {key} or {other} = true"),
            ));
        }
    }
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
        mptcp: r.mptcp.as_ref().is_some_and(|m| *m.get_ref()),
        tcp: TcpOptions {
            nodelay: r.nodelay.unwrap_or(true),
            keepalive,
            linger,
            recv_buffer: r.recv_buffer.map(|s| s.0),
            send_buffer: r.send_buffer.map(|s| s.0),
            upload_rate: r
                .upload_rate
                .as_ref()
                .map(|v| egress::rate(v, "upload_rate", src))
                .transpose()?,
            download_rate: r
                .download_rate
                .as_ref()
                .map(|v| egress::rate(v, "download_rate", src))
                .transpose()?,
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
    r: &RuleKeys,
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
            crate::vocab::Rate::parse(&t.get_ref().0)
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
        DEFAULT_PREFIX_V6,
    )?;
    let per_ip_prefix_v4 = prefix(
        &r.per_ip_prefix_v4,
        "per_ip_prefix_v4",
        32,
        DEFAULT_PREFIX_V4,
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
) -> Result<Vec<crate::vocab::Cidr>, ConfigError> {
    list.0
        .iter()
        .map(|e| crate::vocab::Cidr::parse(e.get_ref()).map_err(|m| src.error_at(e.span(), key, m)))
        .collect()
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
