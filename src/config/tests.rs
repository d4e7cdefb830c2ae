//! Unit tests of the config parser: defaults, every form a value may take, and the exact
//! words (with file, line, column and key) of each error an operator can meet.

use super::*;

const RULE: &str = "[[rule]]\nlisten = \"127.0.0.1:8080\"\nupstream = \"127.0.0.1:9000\"\n";

fn parse(text: &str) -> Config {
    Config::parse("cfg.toml", text).unwrap_or_else(|e| panic!("{text:?} failed: {e}"))
}

fn err(text: &str) -> String {
    match Config::parse("cfg.toml", text) {
        Ok(c) => panic!("{text:?} was accepted: {c:?}"),
        Err(e) => e.message,
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
    assert_eq!(c.admin, None);
    assert!(!c.admin_allow_remote);
    assert_eq!(c.log_format, LogFormat::Text);
    assert!(c.access_log);
    assert_eq!(c.uring, UringTuning::default());
    assert!(c.rules.is_empty());
    let e = c.ensure_runnable().unwrap_err();
    assert!(e.message.starts_with("no rule to run"), "{e}");
}

#[test]
fn a_minimal_rule_gets_defaults() {
    let c = parse(RULE);
    c.ensure_runnable().unwrap();
    let r = &c.rules[0];
    assert_eq!(r.name, "rule1");
    assert_eq!(r.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(r.upstream.members[0].text, "127.0.0.1:9000");
    assert_eq!(
        r.upstream.members[0].addrs[0],
        "127.0.0.1:9000".parse().unwrap()
    );
    assert_eq!(r.tcp, TcpOptions::default());
    assert!(r.tcp.nodelay);
    assert_eq!(r.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
    assert_eq!(r.idle_timeout, Some(DEFAULT_IDLE_TIMEOUT));
    assert_eq!(r.tap, None);
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
max_connections = 1000

[[rule]]
name = "web"
listen = "127.0.0.1:8080"
upstream = "127.0.0.1:9000"
nodelay = false
keepalive = { idle = "60s", interval = "10s", count = 5 }
linger = "1s"
recv_buffer = "1MiB"
send_buffer = 65536
connect_timeout = "250ms"
idle_timeout = "0s"
tap = "/tmp/web.hex"
"#,
    );
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
            max_connections: 1000,
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
        }
    );
    assert_eq!(r.connect_timeout, Duration::from_millis(250));
    assert_eq!(r.idle_timeout, None, "0s means no idle timeout");
    assert_eq!(r.tap, Some(PathBuf::from("/tmp/web.hex")));
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
        "cfg.toml:4:19: connect_timeout: rule \"rule1\": must be more than 0s"
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
fn unresolvable_upstream_names_the_name() {
    // .invalid is reserved (RFC 6761): no resolver answers it.
    let e = err("[[rule]]\nlisten = \"127.0.0.1:8080\"\nupstream = \"no-such-host.invalid:80\"\n");
    assert!(
        e.starts_with("cfg.toml:3:12: upstream: cannot resolve \"no-such-host.invalid:80\": "),
        "{e}"
    );
}

#[test]
fn names_resolve_and_ipv6_needs_brackets() {
    let c = parse("[[rule]]\nlisten = \"[::1]:8080\"\nupstream = \"localhost:9000\"\n");
    let r = &c.rules[0];
    assert_eq!(r.listen, "[::1]:8080".parse().unwrap());
    assert!(r.listen.is_ipv6());
    assert_eq!(r.upstream.members[0].text, "localhost:9000");
    assert!(r.upstream.addrs().all(|a| a.port() == 9000));
    assert!(r.upstream.members[0].addrs[0].ip().is_loopback());
    let c = parse("[[rule]]\nlisten = \"0.0.0.0:80\"\nupstream = \"[::1]:9000\"\n");
    assert_eq!(
        c.rules[0].upstream.members[0].addrs[0],
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
            "max_connections = 0",
            "cfg.toml:2:19: uring.max_connections: must be 1..=1048576, got 0",
        ),
    ];
    for (line, want) in cases {
        assert_eq!(err(&format!("[uring]\n{line}\n")), want);
    }
    // The edges themselves are accepted.
    let c = parse(
        "[uring]\nring_entries = 8\nbuffer_size = \"16MiB\"\nbuffers = 32768\npipe_size = \"4KiB\"\npipes = 65536\nmax_connections = 1048576\n",
    );
    assert_eq!(c.uring.ring_entries, 8);
    assert_eq!(c.uring.buffer_size, ByteSize(16 << 20));
    assert_eq!(c.uring.max_connections, 1 << 20);
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
    let c = parse("admin_allow_remote = true\nadmin = \"0.0.0.0:9100\"");
    assert_eq!(c.admin, Some("0.0.0.0:9100".parse().unwrap()));
    assert_eq!(
        parse("admin = \"[::1]:9100\"").admin,
        Some("[::1]:9100".parse().unwrap())
    );
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
        e.message
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
max_connections = 10

[[rule]]
name = "a \"quoted\" name"
listen = "[::1]:0"
upstream = "localhost:9000"
nodelay = false
keepalive = { idle = "90s", interval = "100us", count = 2 }
linger = "0s"
recv_buffer = "100"
send_buffer = "3MiB"
connect_timeout = "1h"
idle_timeout = "0s"
tap = "/tmp/tap file.hex"

[[rule]]
listen = "127.0.0.1:0"
upstream = "127.0.0.1:1"
keepalive = true
"#
        .to_string(),
    ];
    for text in texts {
        let c = parse(&text);
        let printed = c.to_toml();
        let again = Config::parse("printed", &printed)
            .unwrap_or_else(|e| panic!("to_toml output does not parse: {e}\n{printed}"));
        assert_eq!(again, c, "round trip changed the config:\n{printed}");
    }
}
