//! Unit tests of the config parser: defaults, every form a value may take, and the exact
//! words (with file, line, column and key) of each error an operator can meet.

use super::*;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

const RULE: &str = "[[rule]]\nlisten = \"127.0.0.1:8080\"\nupstream = \"127.0.0.1:9000\"\n";

fn parse(text: &str) -> Config {
    Config::parse("cfg.toml", text).unwrap_or_else(|e| panic!("{text:?} failed: {e}"))
}

fn err(text: &str) -> String {
    match Config::parse("cfg.toml", text) {
        Ok(c) => panic!("{text:?} was accepted: {c:?}"),
        Err(e) => e.to_string(),
    }
}

/// A config with one rule whose extra lines are `extra` (they start on line 4).
fn rule_with(extra: &str) -> String {
    format!("{RULE}{extra}\n")
}

#[test]
fn an_empty_file_has_the_documented_defaults_and_no_rule() {
    let c = parse("");
    assert_eq!(c.workers, None);
    assert_eq!(c.engine, EngineKind::Auto);
    assert_eq!(c.mode, DataPath::Auto);
    assert_eq!(c.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
    assert_eq!(
        c.reload_drain_timeout, None,
        "a reload cuts no one by default"
    );
    assert_eq!(c.admin, None);
    assert!(!c.admin_allow_remote);
    assert_eq!(c.log_format, LogFormat::Text);
    assert!(c.access_log);
    assert_eq!(c.uring, UringTuning::default());
    assert!(c.rules.is_empty());
    let e = c.ensure_runnable().unwrap_err();
    assert!(e.to_string().starts_with("no rule to run"), "{e}");
}

#[test]
fn a_minimal_rule_gets_defaults() {
    let c = parse(RULE);
    c.ensure_runnable().unwrap();
    let r = &c.rules[0];
    assert_eq!(r.name, "rule1");
    assert_eq!(r.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(
        r.upstream.as_ref().unwrap().members[0].text,
        "127.0.0.1:9000"
    );
    assert_eq!(
        r.upstream.as_ref().unwrap().members[0].addrs[0],
        "127.0.0.1:9000".parse().unwrap()
    );
    assert_eq!(r.tcp, TcpOptions::default());
    assert!(r.tcp.nodelay);
    assert_eq!(r.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
    assert_eq!(r.idle_timeout, Some(DEFAULT_IDLE_TIMEOUT));
    assert_eq!(r.tap, None);
    assert_eq!(r.max_connections.get(), DEFAULT_MAX_CONNECTIONS);
    assert_eq!(r.proxy_protocol, ProxyProtocol::Off);
    assert_eq!(r.accept_proxy, None);
    assert_eq!(r.admission, Admission::default());
    assert!(r.admission.is_empty());
    assert_eq!(
        r.upstream,
        Some(Upstream::with_members(vec![MemberSpec::new(
            "127.0.0.1:9000",
            vec!["127.0.0.1:9000".parse().unwrap()]
        )]))
    );
    assert!(c.warnings.is_empty());
}

#[test]
fn every_key_is_read() {
    let c = parse(
        r#"
workers = 3
engine = "tokio"
mode = "splice"
shutdown_grace = "30s"
admin = "127.0.0.1:9100"
log_format = "json"
access_log = false

[uring]
ring_entries = 256
buffer_size = "64KiB"
buffers = 128
pipe_size = "256KiB"
pipes = 0
auto_up_reads = 2
auto_down_pumps = 16
pin = false
busy_poll = "20us"
wait = "epoll"

[[rule]]
name = "web"
listen = "127.0.0.1:8080"
upstream = [{ addr = "127.0.0.1:9000", weight = 5 }, { addr = "127.0.0.1:9001", backup = true }]
balance = "least_conn"
connect_retries = 0
max_fails = 3
fail_timeout = "30s"
resolve_interval = "0s"
max_connections = 100
nodelay = false
keepalive = { idle = "60s", interval = "10s", count = 5 }
linger = "1s"
recv_buffer = "1MiB"
send_buffer = 65536
connect_timeout = "250ms"
idle_timeout = "0s"
tap = "/tmp/web.hex"

[rule.health_check]
interval = "5s"
timeout = "500ms"
rise = 1
fall = 10
"#,
    );
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    assert_eq!(c.workers, NonZeroUsize::new(3));
    assert_eq!(c.engine, EngineKind::Tokio);
    assert_eq!(c.mode, DataPath::Splice);
    assert_eq!(c.shutdown_grace, Duration::from_secs(30));
    assert_eq!(c.admin, Some("127.0.0.1:9100".parse().unwrap()));
    assert_eq!(c.log_format, LogFormat::Json);
    assert!(!c.access_log);
    assert_eq!(
        c.uring,
        UringTuning {
            ring_entries: 256,
            buffer_size: ByteSize(64 << 10),
            buffers: 128,
            pipe_size: ByteSize(256 << 10),
            pipes: 0,
            auto_up_reads: 2,
            auto_down_pumps: 16,
            pin: false,
            busy_poll: Duration::from_micros(20),
            wait: UringWait::Epoll,
        }
    );
    let r = &c.rules[0];
    assert_eq!(r.name, "web");
    assert_eq!(
        r.tcp,
        TcpOptions {
            nodelay: false,
            keepalive: Some(Keepalive {
                idle: Some(Duration::from_secs(60)),
                interval: Some(Duration::from_secs(10)),
                count: Some(5),
            }),
            linger: Some(Duration::from_secs(1)),
            recv_buffer: Some(ByteSize(1 << 20)),
            send_buffer: Some(ByteSize(65536)),
            upload_rate: None,
            download_rate: None,
        }
    );
    assert_eq!(r.connect_timeout, Duration::from_millis(250));
    assert_eq!(r.idle_timeout, None, "0s means no idle timeout");
    assert_eq!(r.tap, Some(PathBuf::from("/tmp/web.hex")));
    assert_eq!(r.max_connections.get(), 100);
    let up = r.upstream.as_ref().unwrap();
    assert_eq!(
        up.members,
        [
            MemberSpec {
                text: "127.0.0.1:9000".into(),
                weight: NonZeroU32::new(5).unwrap(),
                backup: false,
                addrs: vec!["127.0.0.1:9000".parse().unwrap()],
            },
            MemberSpec {
                text: "127.0.0.1:9001".into(),
                weight: NonZeroU32::MIN,
                backup: true,
                addrs: vec!["127.0.0.1:9001".parse().unwrap()],
            },
        ]
    );
    assert_eq!(up.balance, Balance::LeastConn);
    assert_eq!(up.connect_retries, 0);
    assert_eq!(up.max_fails, 3);
    assert_eq!(up.fail_timeout, Duration::from_secs(30));
    assert_eq!(up.resolve_interval, None, "0s: resolve only at start");
    assert_eq!(
        up.health_check,
        Some(HealthCheck {
            interval: Duration::from_secs(5),
            timeout: Duration::from_millis(500),
            rise: NonZeroU32::new(1).unwrap(),
            fall: NonZeroU32::new(10).unwrap(),
            send: None,
            expect: None,
        })
    );
}

#[test]
fn workers_is_auto_or_a_bounded_count() {
    assert_eq!(parse("workers = \"auto\"").workers, None);
    assert_eq!(parse("workers = 1024").workers, NonZeroUsize::new(1024));
    for bad in ["0", "1025", "-1"] {
        assert_eq!(
            err(&format!("workers = {bad}")),
            format!("cfg.toml:1:11: workers: invalid workers {bad}: expected \"auto\" or 1..=1024")
        );
    }
    assert_eq!(
        err("workers = \"many\""),
        "cfg.toml:1:11: workers: invalid workers \"many\": expected \"auto\" or 1..=1024"
    );
}

#[test]
fn unknown_keys_name_file_line_and_key() {
    let e = err("engine = \"std\"\nbogus = 1\n");
    assert!(e.starts_with("cfg.toml:2:1: unknown field `bogus`"), "{e}");
    assert!(e.contains("expected one of `workers`"), "{e}");
    let e = err(&rule_with("colour = \"blue\""));
    assert!(e.starts_with("cfg.toml:4:1: unknown field `colour`"), "{e}");
    let e = err("\n[uring]\nringentries = 8\n");
    assert!(
        e.starts_with("cfg.toml:3:1: unknown field `ringentries`"),
        "{e}"
    );
    assert!(
        e.contains("`ring_entries`"),
        "the right spelling is offered: {e}"
    );
    let e = err(&rule_with("keepalive = { idel = \"30s\" }"));
    assert!(e.starts_with("cfg.toml:4:15: unknown field `idel`"), "{e}");
}

/// The pool keys are declared once (`raw::RawPool`) and read the same way in a rule and in a
/// route: same values, same errors at the same positions, and a misspelt one is still caught
/// at its key with the pool keys among the suggestions.
#[test]
fn pool_keys_are_one_set_for_rules_and_routes() {
    let pool = "balance = \"least_conn\"\nconnect_retries = 3\nmax_fails = 4\nfail_timeout = \"7s\"\nresolve_interval = \"9s\"\n[rule.health_check]\nrise = 5\n";
    let c = Config::parse(
        "cfg.toml",
        &format!("[[rule]]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:1\"\n{pool}"),
    )
    .unwrap();
    let own = c.rules[0].upstream.clone().unwrap();
    let c = Config::parse(
        "cfg.toml",
        &format!(
            "[[rule]]\nlisten = \"127.0.0.1:0\"\n[[rule.route]]\nsni = [\"a.test\"]\nupstream = \"127.0.0.1:1\"\n{}",
            pool.replace("[rule.health_check]", "[rule.route.health_check]")
        ),
    )
    .unwrap();
    assert_eq!(c.rules[0].routes[0].upstream, own);
    assert_eq!(own.balance, Balance::LeastConn);
    assert_eq!(
        (own.connect_retries, own.max_fails, own.fail_timeout),
        (3, 4, Duration::from_secs(7))
    );
    assert_eq!(own.resolve_interval, Some(Duration::from_secs(9)));
    assert_eq!(own.health_check.unwrap().rise.get(), 5);

    // A bad pool value: at its own position, in a rule (line 4) and in a route (line 6).
    assert_eq!(
        err(&rule_with("max_fails = -1")),
        "cfg.toml:4:13: max_fails: must be 0..=1000, got -1"
    );
    assert_eq!(
        err(
            "[[rule]]\nlisten = \"127.0.0.1:0\"\n[[rule.route]]\nsni = [\"a.test\"]\nupstream = \"127.0.0.1:1\"\nmax_fails = -1\n"
        ),
        "cfg.toml:6:13: max_fails: must be 0..=1000, got -1"
    );
    // A misspelt pool key: reported at the key, the rule's keys and the pool's offered.
    let e = err(&rule_with("max_fail = 2"));
    assert!(
        e.starts_with("cfg.toml:4:1: unknown field `max_fail`, expected one of `name`, `listen`"),
        "{e}"
    );
    assert!(e.contains("`resolve_interval`, `health_check`"), "{e}");
    assert!(e.ends_with("did you mean `max_fails`?"), "{e}");
    // A value of the wrong type for a pool key keeps the key and position.
    let e = err(&rule_with("connect_retries = \"x\""));
    assert!(
        e.starts_with("cfg.toml:4:19: connect_retries: invalid type"),
        "{e}"
    );
}

#[test]
fn bad_durations_are_reported_at_their_key() {
    assert_eq!(
        err("shutdown_grace = \"10\""),
        "cfg.toml:1:18: shutdown_grace: invalid duration \"10\": a unit is required (us, ms, s, m or h)"
    );
    assert_eq!(
        err("shutdown_grace = 10"),
        "cfg.toml:1:18: shutdown_grace: invalid duration 10: a unit is required, written as a string such as \"10s\""
    );
    assert_eq!(
        err(&rule_with("idle_timeout = \"3 fortnights\"")),
        "cfg.toml:4:16: idle_timeout: invalid duration \"3 fortnights\": unknown unit \"fortnights\" (use us, ms, s, m or h)"
    );
    assert_eq!(
        err(&rule_with("linger = true")),
        "cfg.toml:4:10: linger: expected a duration with a unit, such as \"5s\""
    );
    assert_eq!(
        err(&rule_with("connect_timeout = \"0s\"")),
        "cfg.toml:4:19: connect_timeout: must be more than 0s and at most 1h, got 0s"
    );
}

#[test]
fn reload_drain_timeout_is_unset_or_a_bounded_duration() {
    assert_eq!(
        parse("reload_drain_timeout = \"30m\"").reload_drain_timeout,
        Some(Duration::from_secs(1800))
    );
    assert_eq!(
        parse("reload_drain_timeout = \"0s\"").reload_drain_timeout,
        Some(Duration::ZERO)
    );
    assert_eq!(
        err("reload_drain_timeout = \"200h\""),
        "cfg.toml:1:24: reload_drain_timeout: must be 0s..=168h, got 200h"
    );
    assert!(
        parse("reload_drain_timeout = \"2h\"")
            .to_toml()
            .contains("reload_drain_timeout = \"2h\"")
    );
}

#[test]
fn shutdown_delay_is_zero_by_default_and_bounded() {
    assert_eq!(parse("").shutdown_delay, Duration::ZERO);
    assert_eq!(
        parse("shutdown_delay = \"5s\"").shutdown_delay,
        Duration::from_secs(5)
    );
    assert_eq!(
        err("shutdown_delay = \"2h\""),
        "cfg.toml:1:18: shutdown_delay: must be 0s..=1h, got 2h"
    );
    assert!(
        parse("shutdown_delay = \"5s\"")
            .to_toml()
            .contains("shutdown_delay = \"5s\"")
    );
}

#[test]
fn bad_sizes_are_reported_at_their_key() {
    assert_eq!(
        err(&rule_with("recv_buffer = \"10 parsecs\"")),
        "cfg.toml:4:15: recv_buffer: invalid size \"10 parsecs\": unknown unit \"parsecs\" (use B, KiB, MiB or GiB)"
    );
    assert_eq!(
        err(&rule_with("send_buffer = \"KiB\"")),
        "cfg.toml:4:15: send_buffer: invalid size \"KiB\": expected a number followed by a unit such as 64KiB"
    );
    assert_eq!(
        err(&rule_with("send_buffer = true")),
        "cfg.toml:4:15: send_buffer: expected a size such as \"64KiB\" or a number of bytes"
    );
}

#[test]
fn unknown_engine_mode_and_log_format() {
    assert_eq!(
        err("engine = \"fast\""),
        "cfg.toml:1:10: engine: unknown engine \"fast\" (expected one of auto, uring, tokio, std)"
    );
    assert_eq!(
        err("\nmode = \"zerocopy\""),
        "cfg.toml:2:8: mode: unknown mode \"zerocopy\" (expected one of auto, splice, copy)"
    );
    assert_eq!(
        err("log_format = \"xml\""),
        "cfg.toml:1:14: log_format: unknown format \"xml\" (expected text or json)"
    );
    for (text, kind) in [
        ("auto", EngineKind::Auto),
        ("uring", EngineKind::Uring),
        ("tokio", EngineKind::Tokio),
        ("std", EngineKind::Std),
    ] {
        assert_eq!(parse(&format!("engine = {text:?}")).engine, kind);
        assert_eq!(kind.as_str(), text);
    }
    for (text, mode) in [
        ("auto", DataPath::Auto),
        ("splice", DataPath::Splice),
        ("copy", DataPath::Copy),
    ] {
        assert_eq!(parse(&format!("mode = {text:?}")).mode, mode);
        assert_eq!(mode.as_str(), text);
    }
}

#[test]
fn ill_formed_addresses_say_what_is_wrong() {
    let listen = |addr: &str| {
        err(&format!(
            "[[rule]]\nlisten = \"{addr}\"\nupstream = \"127.0.0.1:9000\"\n"
        ))
    };
    assert_eq!(
        listen("nope"),
        "cfg.toml:2:10: listen: \"nope\" is not an address: expected host:port, e.g. 127.0.0.1:8080 or [::1]:8080"
    );
    assert_eq!(
        listen("127.0.0.1:99999"),
        "cfg.toml:2:10: listen: \"127.0.0.1:99999\": invalid port \"99999\""
    );
    assert_eq!(
        listen(":80"),
        "cfg.toml:2:10: listen: \":80\": missing host before the port"
    );
    assert_eq!(
        listen("::1:80"),
        "cfg.toml:2:10: listen: \"::1:80\": an IPv6 address needs brackets around it, e.g. [::1]:8080"
    );
}

#[test]
fn an_unresolvable_upstream_name_is_a_member_down_until_it_resolves_with_one_warning() {
    // .invalid is reserved (RFC 6761): no resolver answers it. The rule loads (one bad DNS
    // entry must not stop every rule), the member has no address yet, one warning names it.
    let c = parse(
        "[[rule]]\nlisten = \"127.0.0.1:8080\"\nupstream = [\"no-such-host.invalid:80\", \"127.0.0.1:9\"]\n\n\
         [[rule]]\nlisten = \"127.0.0.1:8081\"\nupstream = \"no-such-host.invalid:81\"\nresolve_interval = \"0s\"\n",
    );
    assert_eq!(c.warnings.len(), 2, "{:?}", c.warnings);
    assert!(
        c.warnings[0]
            .starts_with("cfg.toml:3:13: upstream: cannot resolve \"no-such-host.invalid:80\": "),
        "{}",
        c.warnings[0]
    );
    assert!(
        c.warnings[0]
            .ends_with("; the member is down until it resolves (looked up again every 30s)"),
        "{}",
        c.warnings[0]
    );
    assert!(
        c.warnings[1].ends_with("(looked up again every 5s)"),
        "{}",
        c.warnings[1]
    );
    let up = c.rules[0].upstream.as_ref().unwrap();
    assert_eq!(up.members[0].text, "no-such-host.invalid:80");
    assert!(up.members[0].addrs.is_empty());
    assert_eq!(up.members[1].addrs, vec!["127.0.0.1:9".parse().unwrap()]);
    assert!(c.to_toml().contains(
        "# member \"no-such-host.invalid:80\" does not resolve now: down until it resolves\n"
    ));
    // Written wrong is still an error, name or not.
    for (bad, msg) in [
        ("no-such-host.invalid", "is not an address"),
        ("no-such-host.invalid:0", "upstream port 0"),
        ("no-such-host.invalid:x", "invalid port"),
        (":80", "missing host"),
    ] {
        let e = err(&format!(
            "[[rule]]\nlisten = \"127.0.0.1:8080\"\nupstream = {bad:?}\n"
        ));
        assert!(e.contains(msg), "{bad}: {e}");
    }
}

#[test]
fn names_resolve_and_ipv6_needs_brackets() {
    let c = parse("[[rule]]\nlisten = \"[::1]:8080\"\nupstream = \"localhost:9000\"\n");
    let r = &c.rules[0];
    assert_eq!(r.listen, "[::1]:8080".parse().unwrap());
    assert!(r.listen.is_ipv6());
    assert_eq!(
        r.upstream.as_ref().unwrap().members[0].text,
        "localhost:9000"
    );
    assert!(
        r.upstream
            .as_ref()
            .unwrap()
            .addrs()
            .all(|a| a.port() == 9000)
    );
    assert!(
        r.upstream.as_ref().unwrap().members[0].addrs[0]
            .ip()
            .is_loopback()
    );
    let c = parse("[[rule]]\nlisten = \"0.0.0.0:80\"\nupstream = \"[::1]:9000\"\n");
    assert_eq!(
        c.rules[0].upstream.as_ref().unwrap().members[0].addrs[0],
        "[::1]:9000".parse().unwrap()
    );
}

#[test]
fn duplicate_rule_names_and_listen_addresses_point_at_the_second() {
    let two = |a: (&str, &str), b: (&str, &str)| {
        format!(
            "[[rule]]\nname = \"{}\"\nlisten = \"{}\"\nupstream = \"127.0.0.1:9000\"\n\n[[rule]]\nname = \"{}\"\nlisten = \"{}\"\nupstream = \"127.0.0.1:9001\"\n",
            a.0, a.1, b.0, b.1
        )
    };
    assert_eq!(
        err(&two(("a", "127.0.0.1:1"), ("a", "127.0.0.1:2"))),
        "cfg.toml:7:8: name: rule name \"a\" is used twice (listen 127.0.0.1:1 and 127.0.0.1:2)"
    );
    assert_eq!(
        err(&two(("a", "127.0.0.1:1"), ("b", "127.0.0.1:1"))),
        "cfg.toml:8:10: listen: rules \"a\" and \"b\" both listen on 127.0.0.1:1"
    );
    // Port 0 asks for any free port: two such rules do not collide.
    let c = parse(&two(("a", "127.0.0.1:0"), ("b", "127.0.0.1:0")));
    assert_eq!(c.rules.len(), 2);
    // Unnamed rules are numbered, so they never collide by name.
    let c = parse(&format!(
        "{RULE}\n[[rule]]\nlisten = \"127.0.0.1:8081\"\nupstream = \"127.0.0.1:9000\"\n"
    ));
    assert_eq!(c.rules[1].name, "rule2");
}

#[test]
fn empty_rule_name_and_missing_keys() {
    assert_eq!(
        err("[[rule]]\nname = \" \"\nlisten = \"127.0.0.1:1\"\nupstream = \"127.0.0.1:2\"\n"),
        "cfg.toml:2:8: name: must not be empty"
    );
    let e = err("\n[[rule]]\nupstream = \"127.0.0.1:2\"\n");
    assert!(e.starts_with("cfg.toml:2:1: missing field `listen`"), "{e}");
}

#[test]
fn uring_bounds_are_enforced_at_the_value() {
    let cases = [
        (
            "ring_entries = 4",
            "cfg.toml:2:16: uring.ring_entries: must be 8..=32768, got 4",
        ),
        (
            "ring_entries = 32769",
            "cfg.toml:2:16: uring.ring_entries: must be 8..=32768, got 32769",
        ),
        (
            "buffer_size = \"1KiB\"",
            "cfg.toml:2:15: uring.buffer_size: must be 4KiB..=16MiB, got 1KiB",
        ),
        (
            "buffer_size = \"32MiB\"",
            "cfg.toml:2:15: uring.buffer_size: must be 4KiB..=16MiB, got 32MiB",
        ),
        (
            "buffers = 0",
            "cfg.toml:2:11: uring.buffers: must be 1..=32768, got 0",
        ),
        (
            "pipe_size = \"2GiB\"",
            "cfg.toml:2:13: uring.pipe_size: must be 4KiB..=1GiB, got 2GiB",
        ),
        (
            "pipes = 65537",
            "cfg.toml:2:9: uring.pipes: must be 0..=65536, got 65537",
        ),
        (
            "auto_up_reads = 0",
            "cfg.toml:2:17: uring.auto_up_reads: must be 1..=255, got 0",
        ),
        (
            "auto_down_pumps = 256",
            "cfg.toml:2:19: uring.auto_down_pumps: must be 1..=255, got 256",
        ),
        (
            "busy_poll = \"2ms\"",
            "cfg.toml:2:13: uring.busy_poll: must be at most 1ms, got 2ms",
        ),
        (
            "wait = \"spin\"",
            "cfg.toml:2:8: uring.wait: unknown wait \"spin\" (expected one of ring, epoll)",
        ),
        (
            "max_connections = 0",
            "cfg.toml:2:19: uring.max_connections: must be 1..=1048576, got 0",
        ),
        (
            "max_connections = -1",
            "cfg.toml:2:19: uring.max_connections: must be 1..=1048576, got -1",
        ),
    ];
    for (line, want) in cases {
        assert_eq!(err(&format!("[uring]\n{line}\n")), want);
    }
    // The edges themselves are accepted.
    let c = parse(
        "[uring]\nring_entries = 8\nbuffer_size = \"16MiB\"\nbuffers = 32768\npipe_size = \"4KiB\"\npipes = 65536\n",
    );
    assert_eq!(c.uring.ring_entries, 8);
    assert_eq!(c.uring.buffer_size, ByteSize(16 << 20));
}

#[test]
fn keepalive_takes_a_bool_or_a_table() {
    let ka = |v: &str| {
        parse(&rule_with(&format!("keepalive = {v}"))).rules[0]
            .tcp
            .keepalive
    };
    assert_eq!(ka("false"), None);
    assert_eq!(ka("true"), Some(Keepalive::default()));
    assert_eq!(
        ka("{ idle = \"2m\" }"),
        Some(Keepalive {
            idle: Some(Duration::from_secs(120)),
            interval: None,
            count: None,
        })
    );
    assert_eq!(
        ka("{ count = 3, interval = \"5s\" }"),
        Some(Keepalive {
            idle: None,
            interval: Some(Duration::from_secs(5)),
            count: Some(3),
        })
    );
    assert_eq!(
        err(&rule_with("keepalive = { count = 0 }")),
        "cfg.toml:4:13: keepalive: count must be at least 1"
    );
    let e = err(&rule_with("keepalive = \"yes\""));
    assert!(
        e.starts_with("cfg.toml:4:13: keepalive: invalid type: string \"yes\", expected true, false, or a table"),
        "{e}"
    );
    let e = err(&rule_with("keepalive = { idle = \"60\" }"));
    assert!(
        e.contains("invalid duration \"60\": a unit is required"),
        "{e}"
    );
}

#[test]
fn admin_must_be_loopback_unless_allowed() {
    assert_eq!(
        err("admin = \"0.0.0.0:9100\""),
        "cfg.toml:1:9: admin: 0.0.0.0:9100 is not a loopback address; set admin_allow_remote = true to expose metrics beyond this host"
    );
    // Allowed, yet refused without a token: a remote admin port could reload anyone's relay.
    assert_eq!(
        err("admin_allow_remote = true\nadmin = \"0.0.0.0:9100\""),
        "cfg.toml:2:9: admin: 0.0.0.0:9100 is not a loopback address and no admin_token_file is set: anyone who reaches it could reload the forwarder or drain its members; set admin_token_file = \"PATH\" (a file others may not read)"
    );
    let token = token_file("remote", "s3cret\n", 0o600);
    let c = parse(&format!(
        "admin_allow_remote = true\nadmin = \"0.0.0.0:9100\"\nadmin_token_file = {:?}",
        token.display().to_string()
    ));
    assert_eq!(c.admin, Some("0.0.0.0:9100".parse().unwrap()));
    assert_eq!(
        parse("admin = \"[::1]:9100\"").admin,
        Some("[::1]:9100".parse().unwrap())
    );
    let _ = std::fs::remove_file(token);
}

/// A token file with `mode`, in the temp directory.
fn token_file(stem: &str, text: &str, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::temp_dir().join(format!("ringfwd-token-{stem}-{}", std::process::id()));
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

#[test]
fn admin_token_file_is_read_and_checked_and_never_printed() {
    // 1. Read, white space trimmed; `check` prints the path, never the token.
    let good = token_file("good", "  s3cret-token\n", 0o600);
    let key = |p: &Path| format!("admin_token_file = {:?}\n", p.display().to_string());
    let c = parse(&key(&good));
    let (path, token) = c.admin_token.clone().expect("a token");
    assert_eq!(path, good);
    assert!(token.admits(Some(b"Bearer s3cret-token")));
    let printed = c.to_toml();
    assert!(printed.contains(&key(&good)), "{printed}");
    assert!(!printed.contains("s3cret") && !format!("{c:?}").contains("s3cret"));
    // 2. Each bad file, with the key named.
    let open = token_file("open", "s3cret\n", 0o644);
    let e = err(&key(&open));
    assert!(
        e.starts_with("cfg.toml:1:20: admin_token_file: ")
            && e.contains("mode 0644")
            && e.contains("chmod 600"),
        "{e}"
    );
    // Group read is how a service user reads root's file: allowed; group write is not.
    let group = token_file("group", "s3cret\n", 0o640);
    assert!(parse(&key(&group)).admin_token.is_some());
    let _ = std::fs::set_permissions(&group, std::os::unix::fs::PermissionsExt::from_mode(0o660));
    assert!(err(&key(&group)).contains("written by its group (mode 0660)"));
    let empty = token_file("empty", "\n", 0o600);
    assert!(err(&key(&empty)).contains("is empty"));
    let spaced = token_file("spaced", "two words\n", 0o600);
    assert!(err(&key(&spaced)).contains("without spaces"));
    let missing = std::env::temp_dir().join("ringfwd-token-none-such");
    let e = err(&key(&missing));
    assert!(
        e.contains("admin_token_file: cannot read") && e.contains("No such file"),
        "{e}"
    );
    for p in [good, open, group, empty, spaced] {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn toml_syntax_errors_have_a_position() {
    let e = err("engine = \"std\"\nmode = \n");
    assert!(e.starts_with("cfg.toml:2:"), "{e}");
    let e = err("engine = 5");
    assert_eq!(
        e,
        "cfg.toml:1:10: engine: invalid type: integer `5`, expected a string"
    );
}

#[test]
fn a_missing_file_names_the_path() {
    let e = Config::load(Path::new("/nonexistent/ringfwd.toml")).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("/nonexistent/ringfwd.toml: cannot read config: "),
        "{e}"
    );
}

#[test]
fn errors_in_a_later_rule_have_its_line() {
    let text = format!(
        "{RULE}\n[[rule]]\nname = \"second\"\nlisten = \"127.0.0.1:8081\"\nupstream = \"127.0.0.1:9000\"\nidle_timeout = \"5\"\n"
    );
    let e = err(&text);
    assert!(e.starts_with("cfg.toml:9:16: idle_timeout: "), "{e}");
}

#[test]
fn to_toml_parses_back_to_the_same_config() {
    let texts = [
        String::new(),
        RULE.to_string(),
        r#"
workers = 2
engine = "std"
mode = "copy"
shutdown_grace = "1500ms"
admin = "[::1]:9100"
log_format = "json"
access_log = false

[uring]
ring_entries = 64
buffer_size = "16KiB"
buffers = 8
pipe_size = "64KiB"
pipes = 2

[[rule]]
name = "a \"quoted\" name"
listen = "[::1]:0"
upstream = [
    { addr = "localhost:9000", weight = 7 },
    "127.0.0.2:9000",
    { addr = "[::1]:9001", backup = true, weight = 1000 },
]
balance = "source_hash"
connect_retries = 16
max_fails = 0
fail_timeout = "1500ms"
resolve_interval = "0s"
max_connections = 1048576
nodelay = false
keepalive = { idle = "90s", interval = "1s", count = 2 }
linger = "0s"
recv_buffer = "100"
send_buffer = "3MiB"
connect_timeout = "1h"
idle_timeout = "0s"
tap = "/tmp/tap file.hex"


[rule.health_check]
fall = 1

[[rule]]
listen = "127.0.0.1:0"
upstream = "127.0.0.1:1"
keepalive = true
balance = "random_two"
resolve_interval = "5m"
mptcp = true
mark = 4294967295
interface = "lo"
source = "127.0.0.9"
upstream_mptcp = true

[rule.health_check]

[[rule]]
listen = "127.0.0.1:0"
upstream = ["127.0.0.1:1", "127.0.0.1:2"]
max_connections = 1
proxy_protocol = "v2"
accept_proxy = true
proxy_trusted = ["10.0.0.0/8", "2001:db8::/32", "127.0.0.1", "::ffff:192.168.0.0/112"]
proxy_header_timeout = "150ms"
allow = ["0.0.0.0/0", "::/0"]
deny = ["10.1.0.0/16", "192.0.2.7", "2001:db8:1::/48", "::1"]
max_connections_per_ip = 1048576
max_new_connections_per_ip = "600/m"

[[rule]]
listen = "127.0.0.1:0"
upstream = "127.0.0.1:1"
proxy_protocol = "v1"
accept_proxy = false
transparent = true
allow = []
deny = ["0.0.0.0/0"]
max_connections_per_ip = 1

[[rule]]
listen = "127.0.0.1:0"
upstream = "127.0.0.1:1"
accept_proxy = true
proxy_trusted = ["127.0.0.1/32"]
max_new_connections_per_ip = " 7 / h "

[[rule]]
name = "tls"
listen = "127.0.0.1:0"
upstream = "127.0.0.1:1"
proxy_header_timeout = "2s"

[rule.health_check]
rise = 3

[[rule.route]]
sni = ["API.example.com", "api2.example.com."]
upstream = ["127.0.0.1:2", "127.0.0.1:3"]
balance = "least_conn"

[[rule.route]]
name = "wild"
sni = ["*.example.com"]
upstream = "127.0.0.1:4"
connect_retries = 0

[rule.route.health_check]
interval = "1s"

[[rule]]
listen = "127.0.0.1:0"

[[rule.route]]
sni = ["only.example.com"]
upstream = "127.0.0.1:5"
"#
        .to_string(),
    ];
    for text in texts {
        let c = parse(&text);
        let printed = c.to_toml();
        let again = Config::parse("printed", &printed)
            .unwrap_or_else(|e| panic!("to_toml output does not parse: {e}\n{printed}"));
        assert_eq!(again, c, "round trip changed the config:\n{printed}");
        assert_eq!(again.to_toml(), printed, "printing is not stable");
    }
}

/// A rule listening on 127.0.0.1:8080 whose upstream line (line 3) is `upstream = {value}`.
fn upstream_is(value: &str) -> String {
    format!("[[rule]]\nlisten = \"127.0.0.1:8080\"\nupstream = {value}\n")
}

#[test]
fn upstream_takes_a_string_an_array_of_strings_or_of_tables() {
    let members = |value: &str| {
        parse(&upstream_is(value)).rules[0]
            .upstream
            .as_ref()
            .unwrap()
            .members
            .clone()
    };
    let one = members("[\"127.0.0.1:9000\"]");
    assert_eq!(one, members("\"127.0.0.1:9000\""));
    assert_eq!(one, members("[{ addr = \"127.0.0.1:9000\" }]"));
    let m = members("[\"127.0.0.1:1\", { addr = \"127.0.0.1:2\", weight = 1000, backup = true }]");
    assert_eq!(m.len(), 2);
    assert_eq!((m[0].weight.get(), m[0].backup), (1, false));
    assert_eq!((m[1].weight.get(), m[1].backup), (1000, true));
    // A host name is one member with every address it resolves to.
    let m = members("[\"localhost:9000\"]");
    assert_eq!(m.len(), 1);
    assert!(!m[0].addrs.is_empty());
    assert!(m[0].is_name());
}

#[test]
fn bad_pools_are_reported_at_the_member() {
    assert_eq!(
        err(&upstream_is("[]")),
        "cfg.toml:3:12: upstream: an empty array has no member to forward to: give at least one \"host:port\""
    );
    assert_eq!(
        err(&upstream_is("[\"127.0.0.1:1\", \"127.0.0.1:0\"]")),
        "cfg.toml:3:28: upstream: upstream port 0 in \"127.0.0.1:0\": give the port the upstream listens on"
    );
    assert_eq!(
        err(&upstream_is("\"127.0.0.1:0\"")),
        "cfg.toml:3:12: upstream: upstream port 0 in \"127.0.0.1:0\": give the port the upstream listens on"
    );
    assert_eq!(
        err(&upstream_is(
            "[\"127.0.0.1:1\", { addr = \"127.0.0.1:1\", weight = 2 }]"
        )),
        "cfg.toml:3:28: upstream: 127.0.0.1:1 is in the pool twice (members \"127.0.0.1:1\" and \"127.0.0.1:1\"); list each address once"
    );
    assert_eq!(
        err(&upstream_is("[{ addr = \"127.0.0.1:1\", weight = 0 }]")),
        "cfg.toml:3:13: upstream: member \"127.0.0.1:1\": weight must be 1..=1000, got 0"
    );
    assert_eq!(
        err(&upstream_is("[{ addr = \"127.0.0.1:1\", weight = 1001 }]")),
        "cfg.toml:3:13: upstream: member \"127.0.0.1:1\": weight must be 1..=1000, got 1001"
    );
    assert_eq!(
        err(&upstream_is("[{ addr = \"127.0.0.1:1\", backup = true }]")),
        "cfg.toml:3:12: upstream: every member is a backup: at least one member must have backup = false"
    );
    let e = err(&upstream_is("[{ addr = \"127.0.0.1:1\", wieght = 2 }]"));
    assert!(e.starts_with("cfg.toml:3:"), "{e}");
    assert!(
        e.contains("unknown field `wieght`, expected one of `addr`, `weight`, `backup`"),
        "{e}"
    );
    let e = err(&upstream_is("[{ weight = 2 }]"));
    assert!(e.contains("missing field `addr`"), "{e}");
    let e = err(&upstream_is("[1]"));
    assert!(e.contains("expected a member \"host:port\""), "{e}");
    let e = err(&upstream_is("5"));
    assert!(e.starts_with("cfg.toml:3:12: upstream: invalid type: integer `5`, expected \"host:port\", or an array"), "{e}");
    assert_eq!(
        err(&upstream_is("[\"127.0.0.1:1\", \"nope\"]")),
        "cfg.toml:3:28: upstream: \"nope\" is not an address: expected host:port, e.g. 127.0.0.1:8080 or [::1]:8080"
    );
}

#[test]
fn pool_keys_have_defaults_and_ranges() {
    let up = parse(RULE).rules[0].upstream.as_ref().unwrap().clone();
    assert_eq!(up.balance, Balance::RoundRobin);
    assert_eq!(up.connect_retries, DEFAULT_CONNECT_RETRIES);
    assert_eq!(up.max_fails, DEFAULT_MAX_FAILS);
    assert_eq!(up.fail_timeout, DEFAULT_FAIL_TIMEOUT);
    assert_eq!(up.resolve_interval, Some(DEFAULT_RESOLVE_INTERVAL));
    assert_eq!(up.health_check, None);
    for (text, b) in [
        ("round_robin", Balance::RoundRobin),
        ("least_conn", Balance::LeastConn),
        ("source_hash", Balance::SourceHash),
        ("random_two", Balance::RandomTwo),
    ] {
        let c = parse(&rule_with(&format!("balance = {text:?}")));
        assert_eq!(c.rules[0].upstream.as_ref().unwrap().balance, b);
        assert_eq!(b.as_str(), text);
    }
    let cases = [
        (
            "balance = \"fastest\"",
            "cfg.toml:4:11: balance: unknown balance \"fastest\" (expected one of round_robin, least_conn, source_hash, random_two)",
        ),
        (
            "connect_retries = 17",
            "cfg.toml:4:19: connect_retries: must be 0..=16, got 17",
        ),
        (
            "connect_retries = -1",
            "cfg.toml:4:19: connect_retries: must be 0..=16, got -1",
        ),
        (
            "max_fails = 1001",
            "cfg.toml:4:13: max_fails: must be 0..=1000, got 1001",
        ),
        (
            "fail_timeout = \"0s\"",
            "cfg.toml:4:16: fail_timeout: must be more than 0s and at most 24h, got 0s",
        ),
        (
            "fail_timeout = \"25h\"",
            "cfg.toml:4:16: fail_timeout: must be more than 0s and at most 24h, got 25h",
        ),
        (
            "resolve_interval = \"500ms\"",
            "cfg.toml:4:20: resolve_interval: must be 0s (resolve only at start) or 1s..=24h, got 500ms",
        ),
        (
            "max_connections = 0",
            "cfg.toml:4:19: max_connections: must be 1..=1048576, got 0",
        ),
        (
            "max_connections = 1048577",
            "cfg.toml:4:19: max_connections: must be 1..=1048576, got 1048577",
        ),
        (
            "connect_retries = \"2\"",
            "cfg.toml:4:19: connect_retries: invalid type: string \"2\", expected i64",
        ),
    ];
    for (line, want) in cases {
        assert_eq!(err(&rule_with(line)), want, "{line}");
    }
    // The edges are accepted.
    let c = parse(&rule_with(
        "connect_retries = 16\nmax_fails = 1000\nfail_timeout = \"24h\"\nresolve_interval = \"24h\"\nmax_connections = 1048576",
    ));
    let r = &c.rules[0];
    assert_eq!(r.upstream.as_ref().unwrap().connect_retries, 16);
    assert_eq!(r.upstream.as_ref().unwrap().max_fails, 1000);
    assert_eq!(
        r.upstream.as_ref().unwrap().resolve_interval,
        Some(Duration::from_secs(86400))
    );
    assert_eq!(r.max_connections.get(), 1 << 20);
}

#[test]
fn health_check_table_defaults_and_bounds() {
    let hc = |extra: &str| {
        parse(&format!("{RULE}\n[rule.health_check]\n{extra}\n")).rules[0]
            .upstream
            .as_ref()
            .unwrap()
            .health_check
            .clone()
    };
    assert_eq!(hc(""), Some(HealthCheck::default()));
    assert_eq!(
        hc("rise = 100\nfall = 1\ninterval = \"1h\"\ntimeout = \"1ms\""),
        Some(HealthCheck {
            interval: Duration::from_secs(3600),
            timeout: Duration::from_millis(1),
            rise: NonZeroU32::new(100).unwrap(),
            fall: NonZeroU32::MIN,
            send: None,
            expect: None,
        })
    );
    // send/expect: TOML's escapes are the bytes sent; both optional, each 1..=1024 bytes.
    let h = hc("send = \"PING\\r\\n\"\nexpect = '+PONG'").unwrap();
    assert_eq!(
        (h.send.as_deref(), h.expect.as_deref()),
        (Some("PING\r\n"), Some("+PONG"))
    );
    assert_eq!(hc("expect = \"SSH-\"").unwrap().send, None);
    let bad = |extra: &str| err(&format!("{RULE}\n[rule.health_check]\n{extra}\n"));
    assert_eq!(
        bad("rise = 0"),
        "cfg.toml:6:8: health_check.rise: must be 1..=100, got 0"
    );
    assert_eq!(
        bad("fall = 101"),
        "cfg.toml:6:8: health_check.fall: must be 1..=100, got 101"
    );
    assert_eq!(
        bad("interval = \"0s\""),
        "cfg.toml:6:12: health_check.interval: must be more than 0s and at most 1h, got 0s"
    );
    assert_eq!(
        bad("timeout = \"2h\""),
        "cfg.toml:6:11: health_check.timeout: must be more than 0s and at most 1h, got 2h"
    );
    assert_eq!(
        bad("send = \"\""),
        "cfg.toml:6:8: health_check.send: must be 1..=1024 bytes, got 0 (leave it out to send nothing)"
    );
    assert_eq!(
        bad(&format!("expect = \"{}\"", "x".repeat(1025))),
        "cfg.toml:6:10: health_check.expect: must be 1..=1024 bytes, got 1025 (leave it out to check the connect only)"
    );
    assert_eq!(
        bad("expect = 200"),
        "cfg.toml:6:10: expect: invalid type: integer `200`, expected a string"
    );
    // `check` prints them as TOML that reads back the same.
    let c = parse(&format!(
        "{RULE}\n[rule.health_check]\nsend = \"PING\\r\\n\\u0001\\\"\"\nexpect = \"+PONG\"\n"
    ));
    let text = c.to_toml();
    assert!(
        text.contains("send = \"PING\\r\\n\\u0001\\\"\"\n"),
        "{text}"
    );
    assert!(text.contains("expect = \"+PONG\"\n"), "{text}");
    let again = parse(&text);
    assert_eq!(
        again.rules[0].upstream.as_ref().unwrap().health_check,
        c.rules[0].upstream.as_ref().unwrap().health_check
    );
    assert!(
        parse(&format!("{RULE}\n[rule.health_check]\n"))
            .to_toml()
            .contains("# expect: unset, a completed connect passes\n")
    );
    let e = bad("port = 80");
    assert!(
        e.starts_with("cfg.toml:6:1: unknown field `port`, expected one of `interval`, `timeout`, `rise`, `fall`"),
        "{e}"
    );
}

#[test]
fn every_duration_key_has_a_maximum() {
    let cases = [
        (
            rule_with("connect_timeout = \"18446744073709551615h\""),
            "cfg.toml:4:19: connect_timeout: invalid duration \"18446744073709551615h\": too large",
        ),
        (
            rule_with("connect_timeout = \"61m\""),
            "cfg.toml:4:19: connect_timeout: must be more than 0s and at most 1h, got 61m",
        ),
        (
            rule_with("idle_timeout = \"169h\""),
            "cfg.toml:4:16: idle_timeout: must be 0s..=168h, got 169h",
        ),
        (
            rule_with("linger = \"2h\""),
            "cfg.toml:4:10: linger: must be 0s..=1h, got 2h",
        ),
        (
            "shutdown_grace = \"25h\"".to_string(),
            "cfg.toml:1:18: shutdown_grace: must be 0s..=24h, got 25h",
        ),
        (
            rule_with("keepalive = { idle = \"32768s\" }"),
            "cfg.toml:4:13: keepalive: idle must be whole seconds, 1s..=32767s (the kernel's unit and limit), got 32768s",
        ),
        (
            rule_with("keepalive = { interval = \"1500ms\" }"),
            "cfg.toml:4:13: keepalive: interval must be whole seconds, 1s..=32767s (the kernel's unit and limit), got 1500ms",
        ),
        (
            rule_with("keepalive = { count = 128 }"),
            "cfg.toml:4:13: keepalive: count must be 1..=127 (the kernel's limit), got 128",
        ),
    ];
    for (text, want) in cases {
        assert_eq!(err(&text), want);
    }
    let c = parse(&format!(
        "shutdown_grace = \"24h\"\n{RULE}idle_timeout = \"168h\"\nlinger = \"1h\"\nconnect_timeout = \"1h\"\nkeepalive = {{ idle = \"32767s\", interval = \"1s\", count = 127 }}\n"
    ));
    assert_eq!(c.rules[0].idle_timeout, Some(MAX_IDLE_TIMEOUT));
    assert_eq!(c.shutdown_grace, MAX_SHUTDOWN_GRACE);
}

#[test]
fn overlapping_listens_name_both_rules() {
    let two = |a: &str, b: &str| {
        format!(
            "[[rule]]\nname = \"a\"\nlisten = \"{a}\"\nupstream = \"127.0.0.1:9000\"\n\n[[rule]]\nname = \"b\"\nlisten = \"{b}\"\nupstream = \"127.0.0.1:9001\"\n"
        )
    };
    assert_eq!(
        err(&two("0.0.0.0:8080", "127.0.0.1:8080")),
        "cfg.toml:8:10: listen: rules \"a\" and \"b\" overlap: 0.0.0.0:8080 already takes every connection to 127.0.0.1:8080; give them different ports, or drop one"
    );
    assert_eq!(
        err(&two("[::1]:8080", "[::]:8080")),
        "cfg.toml:8:10: listen: rules \"a\" and \"b\" overlap: [::]:8080 already takes every connection to [::1]:8080; give them different ports, or drop one"
    );
    // Other family, other port, two specific addresses, port 0: no overlap.
    for (a, b) in [
        ("0.0.0.0:8080", "[::]:8080"),
        ("0.0.0.0:8080", "[::1]:8080"),
        ("0.0.0.0:8080", "127.0.0.1:8081"),
        ("127.0.0.1:8080", "127.0.0.2:8080"),
        ("0.0.0.0:0", "127.0.0.1:0"),
    ] {
        assert_eq!(parse(&two(a, b)).rules.len(), 2, "{a} {b}");
    }
}

#[test]
fn tap_must_be_writable_without_being_created() {
    let dir = std::env::temp_dir().join(format!("ringfwd-tap-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tap = |p: &Path| rule_with(&format!("tap = {:?}", p.display().to_string()));
    // A new file in a writable directory: accepted, and not created by the check.
    let fresh = dir.join("new.hex");
    assert_eq!(parse(&tap(&fresh)).rules[0].tap.as_deref(), Some(&*fresh));
    assert!(!fresh.exists(), "check created the tap file");
    // An existing file keeps its contents.
    let old = dir.join("old.hex");
    std::fs::write(&old, b"keep").unwrap();
    parse(&tap(&old));
    assert_eq!(std::fs::read(&old).unwrap(), b"keep");
    // Missing directory, a directory, a file as a directory.
    let missing = dir.join("no-such-dir/x.hex");
    assert_eq!(
        err(&tap(&missing)),
        format!(
            "cfg.toml:4:7: tap: cannot create {:?}: directory {:?} does not exist",
            missing.display().to_string(),
            dir.join("no-such-dir").display().to_string()
        )
    );
    assert_eq!(
        err(&tap(&dir)),
        format!(
            "cfg.toml:4:7: tap: {:?} is a directory, not a file",
            dir.display().to_string()
        )
    );
    let under_file = old.join("x.hex");
    let e = err(&tap(&under_file));
    assert!(e.contains("Not a directory"), "{e}");
    assert_eq!(
        err(&format!("hdr_log = {:?}", missing.display().to_string())),
        format!(
            "cfg.toml:1:11: hdr_log: cannot create {:?}: directory {:?} does not exist",
            missing.display().to_string(),
            dir.join("no-such-dir").display().to_string()
        )
    );
    assert_eq!(
        err(&rule_with("tap = \"\"")),
        "cfg.toml:4:7: tap: must be a file path, got an empty string"
    );
    // A read-only directory (root may write anywhere, so only asserted when it bites).
    let ro = dir.join("ro");
    std::fs::create_dir_all(&ro).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    if nix::unistd::access(&ro, nix::unistd::AccessFlags::W_OK).is_err() {
        let e = err(&tap(&ro.join("x.hex")));
        assert!(e.contains("is not writable (Permission denied)"), "{e}");
    }
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn uring_max_connections_is_a_deprecated_rule_default() {
    let c = parse(&format!(
        "[uring]\nmax_connections = 300\n\n{RULE}\n[[rule]]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:1\"\nmax_connections = 5\n"
    ));
    assert_eq!(c.rules[0].max_connections.get(), 300);
    assert_eq!(c.rules[1].max_connections.get(), 5);
    assert_eq!(
        c.warnings,
        [
            "cfg.toml:2:19: uring.max_connections is deprecated: it is now the default max_connections of each [[rule]] that sets none (300); set max_connections in the rules instead"
        ]
    );
    assert_eq!(c.live_connections_bound(), 305);
    // Printed back, the limit moves into the rules and the warning goes away.
    let again = Config::parse("printed", &c.to_toml()).unwrap();
    assert!(again.warnings.is_empty());
    assert_eq!(again.rules, c.rules);
}

#[test]
fn live_connections_bound_is_capped() {
    let c = parse(&format!(
        "{RULE}max_connections = 1048576\n[[rule]]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:1\"\n"
    ));
    assert_eq!(c.live_connections_bound(), 1 << 20);
    assert_eq!(parse("").live_connections_bound(), 0);
}

#[test]
fn the_shipped_config_parses_without_warnings_and_its_pool_example_works() {
    let shipped = include_str!("../../ringfwd.toml");
    let c = parse(shipped);
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    assert_eq!(c.rules.len(), 1);
    assert_eq!(c.rules[0].listen, "127.0.0.1:8080".parse().unwrap());
    // The commented-out pool and health check, uncommented in place of the single upstream.
    let mut text = String::new();
    let mut in_pool = false;
    for line in shipped.lines() {
        let uncommented = line.strip_prefix("# ").unwrap_or(line);
        if line == "upstream = \"127.0.0.1:9000\"" {
            continue;
        }
        if uncommented.starts_with("upstream = [") {
            in_pool = true;
        }
        let keep = in_pool
            || uncommented == "[rule.health_check]"
            || (text.contains("[rule.health_check]") && uncommented.contains(" = "));
        text.push_str(if keep { uncommented } else { line });
        text.push('\n');
        if in_pool && uncommented == "]" {
            in_pool = false;
        }
    }
    let c = parse(&text);
    let up = c.rules[0].upstream.as_ref().unwrap();
    assert_eq!(up.members.len(), 3, "{text}");
    assert_eq!(up.members[0].weight.get(), 3);
    assert!(up.members[2].backup);
    assert_eq!(up.health_check, Some(HealthCheck::default()));
}

#[test]
fn edge_admission_keys_are_read() {
    use crate::vocab::Cidr;
    use crate::vocab::Rate;
    let c = parse(&rule_with(
        r#"proxy_protocol = "v1"
accept_proxy = true
proxy_trusted = ["10.0.0.0/8", "2001:db8::/32", "127.0.0.1"]
proxy_header_timeout = "500ms"
allow = ["192.0.2.0/24", "::1"]
deny = ["192.0.2.7/32"]
max_connections_per_ip = 10
max_new_connections_per_ip = "50/s"
per_ip_prefix_v6 = 56"#,
    ));
    let r = &c.rules[0];
    let cidrs = |l: &[&str]| {
        l.iter()
            .map(|t| Cidr::parse(t).unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(r.proxy_protocol, ProxyProtocol::V1);
    assert_eq!(
        r.accept_proxy,
        Some(AcceptProxy {
            trusted: cidrs(&["10.0.0.0/8", "2001:db8::/32", "127.0.0.1/32"]),
        })
    );
    assert_eq!(r.header_timeout, Duration::from_millis(500));
    assert_eq!(
        r.admission,
        Admission {
            allow: cidrs(&["192.0.2.0/24", "::1/128"]),
            deny: cidrs(&["192.0.2.7/32"]),
            max_connections_per_ip: NonZeroU32::new(10),
            max_new_connections_per_ip: Some(Rate::parse("50/s").unwrap()),
            per_ip_prefix_v6: 56,
            per_ip_prefix_v4: 32,
        }
    );
    // Each value on its own, and the defaults of the others.
    let one = |extra: &str| parse(&rule_with(extra)).rules.remove(0);
    for (text, want) in [
        ("off", ProxyProtocol::Off),
        ("v1", ProxyProtocol::V1),
        ("v2", ProxyProtocol::V2),
    ] {
        assert_eq!(
            one(&format!("proxy_protocol = {text:?}")).proxy_protocol,
            want
        );
    }
    let a = one("accept_proxy = true\nproxy_trusted = [\"10.0.0.1\"]");
    assert!(a.accept_proxy.is_some());
    assert_eq!(a.header_timeout, DEFAULT_PROXY_HEADER_TIMEOUT);
    assert_eq!(one("accept_proxy = false").accept_proxy, None);
    for bound in ["100ms", "60s", "1m"] {
        let text = format!(
            "accept_proxy = true\nproxy_trusted = [\"10.0.0.1\"]\nproxy_header_timeout = {bound:?}"
        );
        assert!(one(&text).accept_proxy.is_some(), "{bound}");
    }
    // Empty lists are allowed and mean no entry; so the rule has no check at all.
    let r = one("allow = []\ndeny = []");
    assert!(r.admission.is_empty());
    assert_eq!(
        one("max_connections_per_ip = 1048576")
            .admission
            .max_connections_per_ip,
        NonZeroU32::new(1 << 20)
    );
    let rate = one("max_new_connections_per_ip = \"5/m\"")
        .admission
        .max_new_connections_per_ip
        .unwrap();
    assert_eq!(
        (rate.count(), rate.period(), rate.burst()),
        (5, Duration::from_secs(60), 1)
    );
    let rate = one("max_new_connections_per_ip = \"7200/h\"")
        .admission
        .max_new_connections_per_ip
        .unwrap();
    assert_eq!(rate.burst(), 2, "burst: one second's worth, rounded up");
}

#[test]
fn proxy_protocol_mistakes_are_reported_at_the_value() {
    assert_eq!(
        err(&rule_with("proxy_protocol = \"v3\"")),
        "cfg.toml:4:18: proxy_protocol: unknown version \"v3\" (expected one of off, v1, v2)"
    );
    assert_eq!(
        err(&rule_with("proxy_protocol = true")),
        "cfg.toml:4:18: proxy_protocol: invalid type: boolean `true`, expected a string"
    );
    assert_eq!(
        err(&rule_with("accept_proxy = \"yes\"")),
        "cfg.toml:4:16: accept_proxy: invalid type: string \"yes\", expected a boolean"
    );
}

#[test]
fn accept_proxy_and_its_keys_need_each_other() {
    // accept_proxy = true without a trusted list: at accept_proxy, naming the missing key.
    assert_eq!(
        err(&rule_with("accept_proxy = true")),
        "cfg.toml:4:16: accept_proxy: is true but proxy_trusted is missing: list the sources allowed to send a PROXY header (your load balancers), e.g. proxy_trusted = [\"10.0.0.0/8\"]"
    );
    assert_eq!(
        err(&rule_with("accept_proxy = true\nproxy_trusted = []")),
        "cfg.toml:5:17: proxy_trusted: an empty list trusts no one, so every connection would be refused: list the sources allowed to send a PROXY header (your load balancers), e.g. [\"10.0.0.0/8\"]"
    );
    // The keys that need accept_proxy = true, without it: at the key, naming what is missing.
    assert_eq!(
        err(&rule_with("proxy_trusted = [\"10.0.0.0/8\"]")),
        "cfg.toml:4:17: proxy_trusted: is set but accept_proxy = true is missing: add accept_proxy = true, or remove proxy_trusted"
    );
    assert_eq!(
        err(&rule_with("accept_proxy = false\nproxy_trusted = []")),
        "cfg.toml:5:17: proxy_trusted: is set but accept_proxy is false: set accept_proxy = true, or remove proxy_trusted"
    );
    assert_eq!(
        err(&rule_with("proxy_header_timeout = \"1s\"")),
        "cfg.toml:4:24: proxy_header_timeout: is set but neither accept_proxy = true nor a [[rule.route]] is there to wait for: add one, or remove proxy_header_timeout"
    );
    assert_eq!(
        err(&rule_with(
            "accept_proxy = false\nproxy_header_timeout = \"1s\""
        )),
        "cfg.toml:5:24: proxy_header_timeout: is set but accept_proxy is false: set accept_proxy = true, or remove proxy_header_timeout"
    );
    // The timeout's range, at the value.
    let with_timeout = |t: &str| {
        rule_with(&format!(
            "accept_proxy = true\nproxy_trusted = [\"10.0.0.0/8\"]\nproxy_header_timeout = {t}"
        ))
    };
    assert_eq!(
        err(&with_timeout("\"99ms\"")),
        "cfg.toml:6:24: proxy_header_timeout: must be 100ms..=1m, got 99ms"
    );
    assert_eq!(
        err(&with_timeout("\"61s\"")),
        "cfg.toml:6:24: proxy_header_timeout: must be 100ms..=1m, got 61s"
    );
    assert_eq!(
        err(&with_timeout("\"0s\"")),
        "cfg.toml:6:24: proxy_header_timeout: must be 100ms..=1m, got 0s"
    );
    assert_eq!(
        err(&with_timeout("3")),
        "cfg.toml:6:24: proxy_header_timeout: invalid duration 3: a unit is required, written as a string such as \"3s\""
    );
}

#[test]
fn bad_cidrs_are_reported_at_their_own_entry() {
    // Every list, an entry on the first line and one further along or on a later line.
    for key in ["allow", "deny", "proxy_trusted"] {
        let prefix = if key == "proxy_trusted" {
            "accept_proxy = true\n"
        } else {
            ""
        };
        let line = if key == "proxy_trusted" { 5 } else { 4 };
        let col = key.len() + 5;
        let text = rule_with(&format!("{prefix}{key} = [\"10.0.0.1/8\"]"));
        assert_eq!(
            err(&text),
            format!(
                "cfg.toml:{line}:{col}: {key}: \"10.0.0.1/8\": host bits are set past the /8 prefix, so it names no network; did you mean 10.0.0.0/8?"
            )
        );
        let text = rule_with(&format!(
            "{prefix}{key} = [\n    \"10.0.0.0/8\",\n    \"192.0.2.0/24\", \"2001:db8::/129\",\n]"
        ));
        assert_eq!(
            err(&text),
            format!(
                "cfg.toml:{}:21: {key}: \"2001:db8::/129\": prefix /129 is longer than the 128 bits of an IPv6 address",
                line + 2
            )
        );
    }
    assert_eq!(
        err(&rule_with("deny = [\"10.0.0.0/8\", \"example.com\"]")),
        "cfg.toml:4:23: deny: \"example.com\": not an IP address or prefix (expected e.g. 10.0.0.0/8, 192.0.2.7 or 2001:db8::/32)"
    );
    assert_eq!(
        err(&rule_with("allow = [\"10.0.0.0/x\"]")),
        "cfg.toml:4:10: allow: \"10.0.0.0/x\": the prefix length after '/' must be a number of bits, e.g. /24"
    );
    // Not an array, or an entry that is not a string.
    assert_eq!(
        err(&rule_with("allow = \"10.0.0.0/8\"")),
        "cfg.toml:4:9: allow: invalid type: string \"10.0.0.0/8\", expected an array of addresses or prefixes, such as [\"10.0.0.0/8\", \"2001:db8::/32\"]"
    );
    assert_eq!(
        err(&rule_with("deny = [\"10.0.0.0/8\", 10]")),
        "cfg.toml:4:23: deny: invalid type: integer `10`, expected a string"
    );
}

#[test]
fn first_byte_timeout_is_off_by_default_and_applies_to_every_pool() {
    let one = |extra: &str| parse(&rule_with(extra)).rules.remove(0);
    assert_eq!(one("").first_byte_timeout(), None);
    assert_eq!(
        one("first_byte_timeout = \"0s\"").first_byte_timeout(),
        None
    );
    assert_eq!(
        one("first_byte_timeout = \"5s\"").first_byte_timeout(),
        Some(Duration::from_secs(5))
    );
    for (bad, col) in [("\"50ms\"", 22), ("\"61m\"", 22), ("5", 22)] {
        let e = err(&rule_with(&format!("first_byte_timeout = {bad}")));
        assert!(
            e.starts_with(&format!("cfg.toml:4:{col}: first_byte_timeout: ")),
            "{e}"
        );
    }
    assert_eq!(
        err(&rule_with("first_byte_timeout = \"50ms\"")),
        "cfg.toml:4:22: first_byte_timeout: must be 0s (off) or 100ms..=1h, got 50ms"
    );
    // A rule key: the routes' pools get it too, and `check` prints it.
    let c = parse(
        "[[rule]]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:1\"\nfirst_byte_timeout = \"2s\"\n\n\
         [[rule.route]]\nsni = [\"a.example\"]\nupstream = \"127.0.0.1:2\"\n",
    );
    let r = &c.rules[0];
    assert!(
        r.pools()
            .all(|(_, up)| up.first_byte_timeout == Some(Duration::from_secs(2)))
    );
    assert!(c.to_toml().contains("first_byte_timeout = \"2s\"\n"));
    assert!(
        parse(&rule_with(""))
            .to_toml()
            .contains("first_byte_timeout = \"0s\"\n")
    );
}

#[test]
fn per_ip_prefixes_have_ranges_and_defaults() {
    for bad in ["0", "129", "-1"] {
        assert_eq!(
            err(&rule_with(&format!("per_ip_prefix_v6 = {bad}"))),
            format!("cfg.toml:4:20: per_ip_prefix_v6: must be 1..=128, got {bad}")
        );
    }
    for bad in ["0", "33"] {
        assert_eq!(
            err(&rule_with(&format!("per_ip_prefix_v4 = {bad}"))),
            format!("cfg.toml:4:20: per_ip_prefix_v4: must be 1..=32, got {bad}")
        );
    }
    assert_eq!(
        err(&rule_with("per_ip_prefix_v6 = \"/64\"")),
        "cfg.toml:4:20: per_ip_prefix_v6: invalid type: string \"/64\", expected i64"
    );
    let one = |extra: &str| parse(&rule_with(extra)).rules.remove(0).admission;
    let d = one("");
    assert_eq!((d.per_ip_prefix_v6, d.per_ip_prefix_v4), (64, 32));
    let a = one("per_ip_prefix_v6 = 128\nper_ip_prefix_v4 = 1");
    assert_eq!((a.per_ip_prefix_v6, a.per_ip_prefix_v4), (128, 1));
    // `check` prints them, set or not.
    let c = parse(&rule_with("per_ip_prefix_v6 = 48"));
    let text = c.to_toml();
    assert!(text.contains("per_ip_prefix_v6 = 48\n"), "{text}");
    assert!(text.contains("per_ip_prefix_v4 = 32\n"), "{text}");
}

#[test]
fn per_ip_limits_have_ranges_and_rate_syntax() {
    for bad in ["0", "1048577", "-1"] {
        assert_eq!(
            err(&rule_with(&format!("max_connections_per_ip = {bad}"))),
            format!("cfg.toml:4:26: max_connections_per_ip: must be 1..=1048576, got {bad}")
        );
    }
    assert_eq!(
        err(&rule_with("max_connections_per_ip = \"10\"")),
        "cfg.toml:4:26: max_connections_per_ip: invalid type: string \"10\", expected i64"
    );
    let rate = |v: &str| err(&rule_with(&format!("max_new_connections_per_ip = {v}")));
    for bad in [
        "50",
        "50/",
        "/s",
        "50/sec",
        "50/d",
        "1.5/s",
        "-1/s",
        "4294967296/s",
    ] {
        assert_eq!(
            rate(&format!("{bad:?}")),
            format!(
                "cfg.toml:4:30: max_new_connections_per_ip: {bad:?}: expected a number of connections per second, minute or hour, e.g. \"50/s\", \"600/m\""
            )
        );
    }
    assert_eq!(
        rate("\"0/m\""),
        "cfg.toml:4:30: max_new_connections_per_ip: \"0/m\": the count must be at least 1 (to disable the limit, leave it out)"
    );
    assert_eq!(
        rate("50"),
        "cfg.toml:4:30: max_new_connections_per_ip: invalid rate 50: a period is required, written as a string such as \"50/s\""
    );
    assert_eq!(
        rate("true"),
        "cfg.toml:4:30: max_new_connections_per_ip: expected a rate such as \"50/s\", \"600/m\" or \"100/h\""
    );
}

#[test]
fn check_prints_the_effective_acls_and_limits() {
    let c = parse(&rule_with(
        "accept_proxy = true\nproxy_trusted = [\"10.0.0.0/8\", \"::ffff:192.168.0.0/112\"]\ndeny = [\"192.0.2.7\"]\nmax_new_connections_per_ip = \"600/m\"",
    ));
    let printed = c.to_toml();
    for line in [
        "proxy_protocol = \"off\"",
        "accept_proxy = true",
        "proxy_trusted = [",
        "    \"10.0.0.0/8\",",
        "    \"192.168.0.0/16\",",
        "proxy_header_timeout = \"3s\"",
        "allow = []",
        "deny = [",
        "    \"192.0.2.7/32\",",
        "# max_connections_per_ip: unset, no limit",
        "max_new_connections_per_ip = \"600/m\"",
        "# a new client address may open 10 at once, then one every 100ms",
    ] {
        assert!(
            printed.lines().any(|l| l == line),
            "{line:?} missing from:\n{printed}"
        );
    }
    let plain = parse(RULE).to_toml();
    for line in [
        "proxy_protocol = \"off\"",
        "accept_proxy = false",
        "allow = []",
        "deny = []",
        "# max_new_connections_per_ip: unset, no limit",
    ] {
        assert!(
            plain.lines().any(|l| l == line),
            "{line:?} missing from:\n{plain}"
        );
    }
    assert!(!plain.contains("proxy_trusted"), "{plain}");
}

#[test]
fn the_shipped_edge_admission_examples_parse_when_uncommented() {
    let shipped = include_str!("../../ringfwd.toml");
    let mut text = String::new();
    let mut in_edge = false;
    for line in shipped.lines() {
        if line.starts_with("# --- Edge admission") {
            in_edge = true;
        } else if in_edge && line.starts_with("# [rule.health_check]") {
            in_edge = false;
        }
        let example = line
            .strip_prefix("# ")
            .filter(|l| in_edge && l.split_once(" = ").is_some_and(|(k, _)| !k.contains(' ')));
        text.push_str(example.unwrap_or(line));
        text.push('\n');
    }
    let r = &parse(&text).rules[0];
    assert_eq!(r.proxy_protocol, ProxyProtocol::V2);
    let a = r.accept_proxy.as_ref().expect("accept_proxy example");
    assert_eq!(a.trusted.len(), 3);
    assert_eq!(r.header_timeout, DEFAULT_PROXY_HEADER_TIMEOUT);
    assert_eq!((r.admission.allow.len(), r.admission.deny.len()), (2, 1));
    assert_eq!(r.admission.max_connections_per_ip, NonZeroU32::new(100));
    assert!(r.admission.max_new_connections_per_ip.is_some());
}

#[test]
fn user_resolves_with_its_primary_group_and_round_trips() {
    assert_eq!(parse("").run_as, None);
    // `nobody` exists on every Linux distribution this is built on.
    let pw = crate::privdrop::lookup_user("nobody")
        .unwrap()
        .expect("a nobody user");
    let c = parse(&format!("user = \"nobody\"\n{RULE}"));
    let r = c.run_as.clone().expect("run_as");
    assert_eq!((r.user.as_str(), r.uid, r.gid), ("nobody", pw.uid, pw.gid));
    assert!(r.groups.contains(&pw.gid), "{r:?}");
    let printed = c.to_toml();
    assert!(printed.contains("user = \"nobody\"\n"), "{printed}");
    assert!(
        printed.contains(&format!("group = {:?}\n", r.group)),
        "{printed}"
    );
    assert_eq!(parse(&printed).run_as, c.run_as);
    // An explicit group, by number.
    let c = parse(&format!("user = \"nobody\"\ngroup = \"{}\"\n", pw.gid));
    assert_eq!(c.run_as.unwrap().gid, pw.gid);
}

#[test]
fn user_and_group_mistakes_are_reported_at_their_key() {
    let e = err("user = \"ringfwd-no-such-user\"");
    assert!(
        e.starts_with("cfg.toml:1:8: user: unknown user \"ringfwd-no-such-user\""),
        "{e}"
    );
    let e = err("user = \"root\"");
    assert!(
        e.starts_with("cfg.toml:1:8: user: \"root\" is uid 0"),
        "{e}"
    );
    let e = err("user = \"\"");
    assert!(e.starts_with("cfg.toml:1:8: user: must name a user"), "{e}");
    let e = err("user = \"nobody\"\ngroup = \"ringfwd-no-such-group\"");
    assert_eq!(
        e,
        "cfg.toml:2:9: group: unknown group \"ringfwd-no-such-group\""
    );
    let e = err("user = \"nobody\"\ngroup = \"0\"");
    assert!(
        e.starts_with("cfg.toml:2:9: group: group \"root\" is gid 0"),
        "{e}"
    );
    let e = err("group = \"nogroup\"");
    assert!(
        e.starts_with("cfg.toml:1:9: group: is set but user is not"),
        "{e}"
    );
    let e = err("user = 1000");
    assert!(e.starts_with("cfg.toml:1:8: user: invalid type"), "{e}");
}

#[test]
fn routes_have_their_own_pools_and_the_rule_upstream_is_the_default() {
    let c = parse(
        r#"
[[rule]]
listen = "127.0.0.1:8443"
upstream = "127.0.0.1:9000"
proxy_header_timeout = "1s"

[[rule.route]]
sni = ["Api.Example.com"]
upstream = ["127.0.0.1:9001", "127.0.0.1:9002"]
balance = "least_conn"

[[rule.route]]
name = "wild"
sni = ["*.example.com", "example.org"]
upstream = "127.0.0.1:9003"

[rule.route.health_check]
interval = "1s"
"#,
    );
    let r = &c.rules[0];
    assert_eq!(r.header_timeout, Duration::from_secs(1));
    let pools: Vec<(&str, usize, Balance, bool)> = r
        .pools()
        .map(|(n, u)| (n, u.members.len(), u.balance, u.health_check.is_some()))
        .collect();
    assert_eq!(
        pools,
        [
            ("api.example.com", 2, Balance::LeastConn, false),
            ("wild", 1, Balance::RoundRobin, true),
            ("default", 1, Balance::RoundRobin, false),
        ]
    );
    assert_eq!(r.routes[1].sni, ["*.example.com", "example.org"]);
    // Without an upstream of its own, a rule with routes has no default route.
    let c = parse(
        "[[rule]]\nlisten = \"127.0.0.1:1\"\n[[rule.route]]\nsni = [\"a.test\"]\nupstream = \"127.0.0.1:2\"\n",
    );
    assert!(c.rules[0].upstream.is_none());
    assert_eq!(c.rules[0].pools().count(), 1);
    assert!(c.to_toml().contains("no_route"), "{}", c.to_toml());
}

#[test]
fn route_errors_name_the_key_and_say_what_to_do() {
    let route = |keys: &str| format!("{RULE}\n[[rule.route]]\n{keys}\n");
    assert_eq!(
        err("[[rule]]\nlisten = \"127.0.0.1:8080\"\n"),
        "cfg.toml:2:10: upstream: missing: give the rule an upstream = \"host:port\" (or [[rule.route]] tables with upstreams of their own)"
    );
    assert_eq!(
        err(&route("sni = []\nupstream = \"127.0.0.1:1\"")),
        "cfg.toml:6:7: sni: an empty list matches no connection: list server names such as [\"api.example.com\", \"*.example.com\"]"
    );
    assert_eq!(
        err(&route(
            "sni = [\"a.*.example.com\"]\nupstream = \"127.0.0.1:1\""
        )),
        "cfg.toml:6:8: sni: SNI pattern \"a.*.example.com\" of route 1: not a host name (letters, digits, hyphens, dots; labels of 1 to 63, at most 253 in all) nor \"*.\" followed by one"
    );
    assert_eq!(
        err(&route(
            "sni = [\"a.test\", \"A.TEST.\"]\nupstream = \"127.0.0.1:1\""
        )),
        "cfg.toml:6:18: sni: \"A.TEST.\" is already routed by route \"a.test\": a name goes to one route; remove one of them"
    );
    assert_eq!(
        err(&route(
            "name = \"default\"\nsni = [\"a.test\"]\nupstream = \"127.0.0.1:1\""
        )),
        "cfg.toml:6:8: name: \"default\" names the rule's own upstream: choose another route name"
    );
    assert_eq!(
        err(&format!(
            "{}[[rule.route]]\nsni = [\"b.test\"]\nname = \"a.test\"\nupstream = \"127.0.0.1:2\"\n",
            route("sni = [\"a.test\"]\nupstream = \"127.0.0.1:1\"")
        )),
        "cfg.toml:10:8: name: route name \"a.test\" is used twice in this rule: give each route a different name"
    );
    assert_eq!(
        err(&route("sni = [\"a.test\"]")),
        "cfg.toml:5:1: missing field `upstream`"
    );
    assert_eq!(
        err(
            "[[rule]]\nlisten = \"127.0.0.1:8080\"\nbalance = \"least_conn\"\n[[rule.route]]\nsni = [\"a.test\"]\nupstream = \"127.0.0.1:1\"\n"
        ),
        "cfg.toml:3:11: balance: is set but the rule has no upstream of its own (no default route): set it in the [[rule.route]] tables, or give the rule an upstream"
    );
    assert_eq!(
        err(&route(
            "sni = [\"a.test\"]\nupstream = \"127.0.0.1:1\"\nweight = 3"
        )),
        "cfg.toml:8:1: unknown field `weight`, expected one of `name`, `sni`, `upstream`, `transparent`, `source`, `mark`, `interface`, `upstream_mptcp`, `balance`, `connect_retries`, `max_fails`, `fail_timeout`, `resolve_interval`, `health_check`"
    );
}

/// A config with one rule `listen → upstream` (listen on line 2, upstream on line 3).
fn ranged(listen: &str, upstream: &str) -> String {
    format!("[[rule]]\nlisten = \"{listen}\"\nupstream = {upstream}\n")
}

#[test]
fn a_listen_range_maps_one_to_one_onto_an_upstream_range_and_round_trips() {
    let c = parse(&ranged("127.0.0.1:10000-10099", "\"10.0.0.5:20000-20099\""));
    let r = &c.rules[0];
    assert_eq!(r.listen.addr, "127.0.0.1:10000".parse().unwrap());
    assert_eq!(r.listen.count, 100);
    assert!(r.listen.is_range());
    assert_eq!(r.listen.ports(), 10000..=10099);
    assert_eq!(r.listen.addrs().count(), 100);
    assert_eq!(
        r.listen.addrs().last(),
        Some("127.0.0.1:10099".parse().unwrap())
    );
    assert_eq!(r.listen.to_string(), "127.0.0.1:10000-10099");
    assert!(r.upstream.as_ref().unwrap().one_to_one);
    // The member is its first port (what health checks probe and DNS resolves).
    assert_eq!(
        r.upstream.as_ref().unwrap().members[0].text,
        "10.0.0.5:20000"
    );
    assert_eq!(
        r.upstream.as_ref().unwrap().members[0].addrs,
        vec!["10.0.0.5:20000".parse().unwrap()]
    );
    let printed = c.to_toml();
    assert!(
        printed.contains("listen = \"127.0.0.1:10000-10099\""),
        "{printed}"
    );
    assert!(
        printed.contains("addr = \"10.0.0.5:20000-20099\""),
        "{printed}"
    );
    assert_eq!(parse(&printed), c);
}

#[test]
fn a_listen_range_may_forward_every_port_to_one_upstream_port() {
    let c = parse(&ranged("[::1]:10000-10009", "\"[::1]:9000\""));
    let r = &c.rules[0];
    assert!(r.listen.is_ipv6());
    assert_eq!(r.listen.count, 10);
    assert_eq!(r.listen.to_string(), "[::1]:10000-10009");
    assert!(!r.upstream.as_ref().unwrap().one_to_one);
    assert_eq!(parse(&c.to_toml()), c);
    // A range of one port is that port, on either side.
    let c = parse(&ranged("127.0.0.1:8080-8080", "\"127.0.0.1:9000-9000\""));
    assert_eq!(c.rules[0].listen, "127.0.0.1:8080".parse().unwrap());
    assert!(!c.rules[0].upstream.as_ref().unwrap().one_to_one);
    // The most ports a rule may cover.
    let c = parse(&ranged("127.0.0.1:50000-59999", "\"127.0.0.1:9000\""));
    assert_eq!(c.rules[0].listen.count, MAX_RANGE_PORTS);
}

#[test]
fn a_pool_of_ranges_maps_each_member_one_to_one() {
    let c = parse(&ranged(
        "0.0.0.0:10000-10009",
        "[\"10.0.0.5:20000-20009\", { addr = \"10.0.0.6:30000-30009\", weight = 2 }]",
    ));
    let up = c.rules[0].upstream.as_ref().unwrap();
    assert!(up.one_to_one);
    assert_eq!(up.members[1].text, "10.0.0.6:30000");
    assert_eq!(up.members[1].weight.get(), 2);
    assert_eq!(parse(&c.to_toml()), c);
}

#[test]
fn port_range_mistakes_are_reported_at_their_key() {
    assert_eq!(
        err(&ranged("127.0.0.1:10000-10099", "\"10.0.0.5:20000-20098\"")),
        "cfg.toml:3:12: upstream: \"10.0.0.5:20000-20098\" covers 99 ports but listen 127.0.0.1:10000-10099 covers 100: a one-to-one range must have the listen range's length"
    );
    assert_eq!(
        err(&ranged("127.0.0.1:10000", "\"10.0.0.5:20000-20099\"")),
        "cfg.toml:3:12: upstream: \"10.0.0.5:20000-20099\" is a port range (100 ports) but listen 127.0.0.1:10000 is one port: a range maps one-to-one onto a listen range of the same length; give listen a range, or give the upstream one port"
    );
    assert_eq!(
        err(&ranged("127.0.0.1:10099-10000", "\"10.0.0.5:20000\"")),
        "cfg.toml:2:10: listen: \"127.0.0.1:10099-10000\": the range \"10099-10000\" runs backwards; write the lower port first (10000-10099)"
    );
    assert_eq!(
        err(&ranged("127.0.0.1:1-10001", "\"10.0.0.5:20000\"")),
        "cfg.toml:2:10: listen: \"127.0.0.1:1-10001\": the range covers 10001 ports, more than the 10000 one rule may have; split it over several rules"
    );
    assert_eq!(
        err(&ranged("127.0.0.1:0-10", "\"10.0.0.5:20000\"")),
        "cfg.toml:2:10: listen: \"127.0.0.1:0-10\": a port range cannot start at port 0 (port 0 asks the kernel for any one port)"
    );
    assert_eq!(
        err(&ranged("127.0.0.1:10000-x", "\"10.0.0.5:20000\"")),
        "cfg.toml:2:10: listen: \"127.0.0.1:10000-x\": invalid port \"x\" in the range \"10000-x\""
    );
    assert_eq!(
        err(&ranged("127.0.0.1:10000-70000", "\"10.0.0.5:20000\"")),
        "cfg.toml:2:10: listen: \"127.0.0.1:10000-70000\": invalid port \"70000\" in the range \"10000-70000\""
    );
    assert_eq!(
        err(&ranged("127.0.0.1:10000-10001", "\"10.0.0.5:0-1\"")),
        "cfg.toml:3:12: upstream: upstream port 0 in \"10.0.0.5:0\": give the port the upstream listens on"
    );
    assert_eq!(
        err(&ranged(
            "127.0.0.1:10000-10009",
            "[\"10.0.0.5:20000-20009\", \"10.0.0.6:9000\"]"
        )),
        "cfg.toml:3:37: upstream: members \"10.0.0.5:20000-20009\" and \"10.0.0.6:9000\" mix a port range with a single port: in one pool, either every member is a range (one-to-one) or none is"
    );
}

#[test]
fn overlapping_port_ranges_name_both_rules_and_the_port() {
    let two = |a: &str, b: &str| {
        format!(
            "[[rule]]\nname = \"a\"\nlisten = \"{a}\"\nupstream = \"127.0.0.1:9000\"\n\n[[rule]]\nname = \"b\"\nlisten = \"{b}\"\nupstream = \"127.0.0.1:9001\"\n"
        )
    };
    assert_eq!(
        err(&two("127.0.0.1:10000-10099", "127.0.0.1:10050")),
        "cfg.toml:8:10: listen: rules \"a\" and \"b\" both listen on 127.0.0.1:10050 (port 10050 is in 127.0.0.1:10000-10099 and in 127.0.0.1:10050)"
    );
    assert_eq!(
        err(&two("127.0.0.1:10090-10109", "0.0.0.0:10000-10099")),
        "cfg.toml:8:10: listen: rules \"a\" and \"b\" overlap: 0.0.0.0:10090 already takes every connection to 127.0.0.1:10090 (port 10090 is in 127.0.0.1:10090-10109 and in 0.0.0.0:10000-10099); give them different ports, or drop one"
    );
    // Adjacent ranges, another family, two specific addresses: no overlap.
    for (a, b) in [
        ("127.0.0.1:10000-10099", "127.0.0.1:10100-10199"),
        ("0.0.0.0:10000-10099", "[::]:10000-10099"),
        ("127.0.0.1:10000-10099", "127.0.0.2:10000-10099"),
    ] {
        assert_eq!(parse(&two(a, b)).rules.len(), 2, "{a} {b}");
    }
}

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
        assert!(e.to_string().starts_with("t.toml:1:"), "{e}");
        assert!(e.to_string().contains("hdr_log is not"), "{e}");
        let e = parse("hdr_log = \"x\"\nhdr_log_interval = \"10\"").unwrap_err();
        assert!(e.to_string().contains("hdr_log_interval"), "{e}");
        assert!(e.to_string().contains("unit"), "{e}");
        let e = parse("hdr_log = \"x\"\nhdr_log_interval = \"10ms\"").unwrap_err();
        assert!(e.to_string().contains("must be 100ms..=1h"), "{e}");
        let e = parse("hdr_log = \" \"").unwrap_err();
        assert!(
            e.to_string().contains("hdr_log: must be a file path"),
            "{e}"
        );
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

/// A config error carries where it is (file, line, column) and the key, as data; the line an
/// operator reads is made from them by `Display`.
#[test]
fn errors_carry_their_location_and_key() {
    let e = Config::parse("cfg.toml", &rule_with("max_fails = -1")).unwrap_err();
    assert!(matches!(e, ConfigError::Value { .. }), "{e:?}");
    assert_eq!(
        e.location(),
        Some(Location {
            file: "cfg.toml".into(),
            line: 4,
            column: 13
        })
    );
    assert_eq!(e.key(), Some("max_fails"));
    assert_eq!(
        e.to_string(),
        "cfg.toml:4:13: max_fails: must be 0..=1000, got -1"
    );

    // A type error from the parser: the key written on that line.
    let e = Config::parse("cfg.toml", "workers = true\n").unwrap_err();
    assert!(matches!(e, ConfigError::Toml { .. }), "{e:?}");
    assert_eq!(e.location().map(|l| (l.line, l.column)), Some((1, 11)));
    assert_eq!(e.key(), Some("workers"));
    // An unknown key names itself in the message; the hint is part of the line.
    let e = Config::parse("cfg.toml", "wrokers = 2\n").unwrap_err();
    assert_eq!(e.key(), None);
    assert!(
        e.to_string()
            .starts_with("cfg.toml:1:1: unknown field `wrokers`"),
        "{e}"
    );
    assert!(e.to_string().ends_with("; did you mean `workers`?"), "{e}");

    // No position: a file that cannot be read keeps the io error as its source.
    let e = Config::load(Path::new("/nonexistent/ringfwd.toml")).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }), "{e:?}");
    assert_eq!(e.location(), None);
    assert!(std::error::Error::source(&e).is_some());
    assert!(
        e.to_string()
            .starts_with("/nonexistent/ringfwd.toml: cannot read config: "),
        "{e}"
    );
    assert!(matches!(
        parse("").ensure_runnable(),
        Err(ConfigError::NoRule)
    ));
}

#[test]
fn upstream_side_keys_apply_to_the_rule_pool_and_are_the_routes_defaults() {
    let c = parse(
        r#"
[[rule]]
listen = "127.0.0.1:8443"
upstream = "127.0.0.1:9000"
mptcp = true
transparent = true
mark = 7
interface = "lo"

[[rule.route]]
sni = ["a.test"]
upstream = "127.0.0.1:9001"
source = "127.0.0.2"
upstream_mptcp = true

[[rule.route]]
sni = ["b.test"]
upstream = "127.0.0.1:9002"
mark = 9
"#,
    );
    let r = &c.rules[0];
    assert!(r.mptcp);
    let own = &r.upstream.as_ref().unwrap().egress;
    assert!(own.transparent && !own.mptcp);
    assert_eq!((own.mark, own.interface.as_deref()), (Some(7), Some("lo")));
    // A route's source turns the inherited transparent off; the rest is inherited.
    let a = &r.routes[0].upstream.egress;
    assert!(!a.transparent && a.mptcp);
    assert_eq!(a.source, Some("127.0.0.2".parse().unwrap()));
    assert_eq!((a.mark, a.interface.as_deref()), (Some(7), Some("lo")));
    let b = &r.routes[1].upstream.egress;
    assert!(b.transparent);
    assert_eq!(b.mark, Some(9));
    // Without any key, nothing changes.
    let plain = parse(RULE);
    assert!(!plain.rules[0].mptcp);
    assert_eq!(
        plain.rules[0].upstream.as_ref().unwrap().egress,
        crate::config::Egress::PLAIN
    );
    assert_eq!(
        err(&format!("{RULE}mark = 4294967296\n")),
        "cfg.toml:4:8: mark: must be 1..=4294967295, got 4294967296"
    );
    assert!(
        err(&format!(
            "{RULE}interface = \"an-interface-name-too-long\"\n"
        ))
        .contains("interface: \"an-interface-name-too-long\" is not a network device name")
    );
    assert!(
        err(&format!("{RULE}source = \"eth0\"\n"))
            .contains("source: \"eth0\" is not an IP address")
    );
}

#[test]
fn rates_are_sizes_per_second_and_never_zero() {
    let c = parse(&format!(
        "{RULE}upload_rate = \"10MiB/s\"\ndownload_rate = \"512KiB/s\"\n"
    ));
    let t = &c.rules[0].tcp;
    assert_eq!(t.upload_rate, Some(ByteSize(10 << 20)));
    assert_eq!(t.download_rate, Some(ByteSize(512 << 10)));
    let printed = c.to_toml();
    assert!(printed.contains("upload_rate = \"10MiB/s\"\n"), "{printed}");
    assert!(
        printed.contains("download_rate = \"512KiB/s\"\n"),
        "{printed}"
    );
    assert_eq!(Config::parse("again", &printed).unwrap().rules[0].tcp, *t);
    assert_eq!(parse(RULE).rules[0].tcp.upload_rate, None);
    assert_eq!(
        err(&format!("{RULE}upload_rate = \"0MiB/s\"\n")),
        "cfg.toml:4:15: upload_rate: \"0MiB/s\" would never send a byte: remove upload_rate for no cap, or give at least 1KiB/s"
    );
    assert_eq!(
        err(&format!("{RULE}download_rate = \"10MiB\"\n")),
        "cfg.toml:4:17: download_rate: invalid rate \"10MiB\": a size per second is required, such as \"10MiB/s\""
    );
    assert_eq!(
        err(&format!("{RULE}download_rate = \"100/s\"\n")),
        "cfg.toml:4:17: download_rate: must be 1KiB/s..=1024GiB/s, got \"100/s\""
    ); // MPTCP sockets cannot be paced.
    assert_eq!(
        err(&format!(
            "{RULE}upload_rate = \"1MiB/s\"\nupstream_mptcp = true\n"
        )),
        "cfg.toml:4:15: upload_rate: cannot cap an MPTCP connection (the kernel paces TCP sockets only): remove upload_rate or upstream_mptcp = true"
    );
    assert!(
        err(&format!("{RULE}mptcp = true\ndownload_rate = \"1MiB/s\"\n"))
            .contains("download_rate: cannot cap an MPTCP connection")
    );
}
