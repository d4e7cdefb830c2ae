//! Command-line behaviour of the binary, once (not per engine): `check` on good and broken
//! files, `run` on a port already taken, and an IPv6 loopback rule.
//!
//! An operator meets these paths first, so the contract is the exit code and one clear line
//! on stderr naming the file, line and key — never a panic or a backtrace (the commands run
//! with `RUST_BACKTRACE=1`, so a panic could not hide).

mod support;

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::path::Path;

use support::TempFile;
use support::relay::{Relay, run_to_exit};
use support::sock::{Upstream, connect, read_n, read_to_eof};

/// The single non-empty line of `text`.
///
/// # Panics
/// There is not exactly one, or it looks like a panic.
fn one_line(text: &str) -> &str {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr, got:\n{text}");
    assert!(
        !text.contains("panicked") && !text.contains("backtrace"),
        "a panic instead of an error message:\n{text}"
    );
    lines[0]
}

const GOOD: &str = r#"engine = "std"
shutdown_grace = "3s"

[[rule]]
name = "web"
listen = "127.0.0.1:0"
upstream = "127.0.0.1:8080"
idle_timeout = "90s"
"#;

#[test]
fn check_prints_the_effective_config() {
    // 1. A good file is accepted and printed with every default filled in.
    let file = TempFile::new("check-good", GOOD);
    let path = file.path.display().to_string();
    let out = run_to_exit(&["check", "--config", &path]);
    assert!(out.status.success(), "exit {}: {}", out.status, out.stderr);
    for expected in [
        "engine = \"std\"",
        "shutdown_grace = \"3s\"",
        "name = \"web\"",
        "listen = \"127.0.0.1:0\"",
        "idle_timeout = \"90s\"",
        "connect_timeout = \"5s\"",
        "nodelay = true",
    ] {
        assert!(
            out.stdout
                .lines()
                .any(|l| l.trim() == expected || l.starts_with(expected)),
            "{expected:?} missing from:\n{}",
            out.stdout
        );
    }
    // 2. What it prints is itself a valid config that checks to the same output.
    let again = TempFile::new("check-roundtrip", &out.stdout);
    let path2 = again.path.display().to_string();
    let out2 = run_to_exit(&["check", "--config", &path2]);
    assert!(out2.status.success(), "re-check failed: {}", out2.stderr);
    assert_eq!(
        out2.stdout, out.stdout,
        "the printed config does not round-trip"
    );
}

#[test]
fn check_rejects_broken_files_with_one_line() {
    // (what is wrong, file text, the key the message must name, line it is on)
    let rule = "[[rule]]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:80\"\n";
    let cases = [
        (
            "unknown key",
            format!("{rule}bogus_key = 1\n"),
            "bogus_key",
            4,
        ),
        (
            "bad duration",
            format!("{rule}idle_timeout = \"10 fortnights\"\n"),
            "idle_timeout",
            4,
        ),
        (
            "bad address",
            "engine = \"std\"\n\n[[rule]]\nlisten = \"nope\"\nupstream = \"127.0.0.1:80\"\n".into(),
            "listen",
            4,
        ),
        (
            "bad CIDR on its own line",
            format!("{rule}deny = [\n    \"10.0.0.0/8\",\n    \"10.0.0.1/8\",\n]\n"),
            "deny",
            6,
        ),
        (
            "accept_proxy without proxy_trusted",
            format!("{rule}accept_proxy = true\n"),
            "proxy_trusted",
            4,
        ),
        (
            "bad rate",
            format!("{rule}max_new_connections_per_ip = \"50/d\"\n"),
            "max_new_connections_per_ip",
            4,
        ),
        (
            "duration without a unit",
            "shutdown_grace = \"10\"\n".into(),
            "shutdown_grace",
            1,
        ),
    ];
    for (what, text, key, line) in cases {
        let file = TempFile::new("check-bad", &text);
        let path = file.path.display().to_string();
        let out = run_to_exit(&["check", "--config", &path]);
        assert_eq!(out.status.code(), Some(1), "{what}: exit {}", out.status);
        assert!(
            out.stdout.is_empty(),
            "{what}: printed a config anyway:\n{}",
            out.stdout
        );
        let msg = one_line(&out.stderr);
        assert!(
            msg.contains(&format!("{path}:{line}:")),
            "{what}: message does not name {path}:{line}: {msg}"
        );
        assert!(
            msg.contains(key),
            "{what}: message does not name {key:?}: {msg}"
        );
    }
}

#[test]
fn run_on_a_port_in_use_fails_with_one_line() {
    // 1. Another process holds the port (a plain listener, without SO_REUSEPORT).
    let holder = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = holder.local_addr().expect("address").to_string();
    // 2. The forwarder cannot listen there: exit 1, one line that names the address once.
    let out = run_to_exit(&[
        "run",
        "--listen",
        &addr,
        "--upstream",
        "127.0.0.1:9",
        "--engine",
        "std",
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "exit {}: {}",
        out.status,
        out.stderr
    );
    let msg = one_line(&out.stderr);
    assert!(msg.contains("address already in use"), "{msg}");
    assert_eq!(
        msg.matches(&addr).count(),
        1,
        "the cause is repeated: {msg}"
    );
    assert!(
        !out.stdout.contains("listening"),
        "claimed to listen: {}",
        out.stdout
    );
}

#[test]
fn ipv6_loopback_rule_forwards() {
    // 1. Only where the host has ::1.
    let Ok(probe) = TcpListener::bind("[::1]:0") else {
        eprintln!("note: no IPv6 loopback on this host; skipping the [::1] test");
        return;
    };
    drop(probe);
    // 2. A forwarder listening on [::1]:0 in front of an upstream on [::1].
    let upstream = Upstream::bind_on("[::1]:0".parse().expect("v6 address"));
    let relay = Relay::start_listen(&[], "[::1]:0", upstream.addr(), &[]);
    let listen: SocketAddr = relay.addr();
    assert!(
        listen.is_ipv6() && listen.ip().is_loopback(),
        "listening on {listen}"
    );
    // 3. Bytes go both ways and the ends propagate.
    let mut client = connect(listen);
    let mut server = upstream.accept();
    assert!(server.peer_addr().expect("peer").is_ipv6());
    client.write_all(b"over v6").expect("write");
    assert_eq!(read_n(&mut server, 7), b"over v6");
    server.write_all(b"ack").expect("write");
    assert_eq!(read_n(&mut client, 3), b"ack");
    client.shutdown(Shutdown::Write).expect("FIN");
    assert!(read_to_eof(&mut server).is_empty());
    drop(server);
    assert!(read_to_eof(&mut client).is_empty());
}

#[test]
fn check_prints_pools_with_what_they_resolved_to() {
    // A pool of weighted, backup and named members, with a health check.
    let text = "engine = \"std\"\n\n[[rule]]\nname = \"pool\"\nlisten = \"127.0.0.1:0\"\nupstream = [{ addr = \"localhost:9000\", weight = 3 }, \"127.0.0.1:9001\", { addr = \"127.0.0.2:9002\", backup = true }]\nbalance = \"least_conn\"\nresolve_interval = \"0s\"\nmax_connections = 77\n\n[rule.health_check]\nrise = 5\n";
    let file = TempFile::new("check-pool", text);
    let path = file.path.display().to_string();
    let out = run_to_exit(&["check", "--config", &path]);
    assert!(out.status.success(), "exit {}: {}", out.status, out.stderr);
    assert_eq!(
        one_line(&out.stderr),
        format!("ringfwd: {path}: configuration is valid (1 rule)"),
        "nothing but the verdict on stderr"
    );
    for expected in [
        "    { addr = \"localhost:9000\", weight = 3, backup = false },",
        "    { addr = \"127.0.0.1:9001\", weight = 1, backup = false },",
        "    { addr = \"127.0.0.2:9002\", weight = 1, backup = true },",
        "# member \"127.0.0.1:9001\" resolves to 127.0.0.1:9001",
        "balance = \"least_conn\"",
        "resolve_interval = \"0s\"",
        "max_connections = 77",
        "[rule.health_check]",
        "rise = 5",
        "fall = 3",
    ] {
        assert!(
            out.stdout.lines().any(|l| l == expected),
            "{expected:?} missing from:\n{}",
            out.stdout
        );
    }
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("# member \"localhost:9000\" resolves to ")),
        "{}",
        out.stdout
    );
    // And the printed pool checks to the same output.
    let again = TempFile::new("check-pool-again", &out.stdout);
    let out2 = run_to_exit(&["check", "--config", &again.path.display().to_string()]);
    assert!(out2.status.success(), "re-check failed: {}", out2.stderr);
    assert_eq!(out2.stdout, out.stdout);
}

#[test]
fn check_prints_the_effective_acls_and_limits() {
    let text = "engine = \"std\"\n\n[[rule]]\nname = \"edge\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9000\"\nproxy_protocol = \"v1\"\naccept_proxy = true\nproxy_trusted = [\"10.0.0.0/8\", \"::1\"]\nallow = [\"192.0.2.0/24\"]\ndeny = [\"192.0.2.7\"]\nmax_connections_per_ip = 20\nmax_new_connections_per_ip = \"600/m\"\n\n[[rule]]\nname = \"plain\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9001\"\n";
    let file = TempFile::new("check-edge", text);
    let path = file.path.display().to_string();
    let out = run_to_exit(&["check", "--config", &path]);
    assert!(out.status.success(), "exit {}: {}", out.status, out.stderr);
    assert_eq!(
        one_line(&out.stderr),
        format!("ringfwd: {path}: configuration is valid (2 rules)"),
        "nothing but the verdict on stderr"
    );
    let stdout = &out.stdout;
    let (edge, plain) = stdout.split_once("name = \"plain\"").expect("both rules");
    for expected in [
        "proxy_protocol = \"v1\"",
        "accept_proxy = true",
        "    \"10.0.0.0/8\",",
        "    \"::1/128\",",
        "proxy_header_timeout = \"3s\"",
        "    \"192.0.2.0/24\",",
        "    \"192.0.2.7/32\",",
        "max_connections_per_ip = 20",
        "max_new_connections_per_ip = \"600/m\"",
        "# a new client address may open 10 at once, then one every 100ms",
    ] {
        assert!(
            edge.lines().any(|l| l == expected),
            "{expected:?} missing from:\n{stdout}"
        );
    }
    for expected in [
        "proxy_protocol = \"off\"",
        "accept_proxy = false",
        "allow = []",
        "deny = []",
        "# max_connections_per_ip: unset, no limit",
        "# max_new_connections_per_ip: unset, no limit",
    ] {
        assert!(
            plain.lines().any(|l| l == expected),
            "{expected:?} missing from:\n{stdout}"
        );
    }
    // What check prints is a config that checks to the same output.
    let again = TempFile::new("check-edge-again", stdout);
    let out2 = run_to_exit(&["check", "--config", &again.path.display().to_string()]);
    assert!(out2.status.success(), "re-check failed: {}", out2.stderr);
    assert_eq!(&out2.stdout, stdout);
}

#[test]
fn deprecated_uring_max_connections_warns_in_check_and_run() {
    // 1. A port another process holds, so `run` gets past loading and logging, then stops.
    let holder = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = holder.local_addr().expect("address");
    let text = format!(
        "engine = \"std\"\n\n[uring]\nmax_connections = 300\n\n[[rule]]\nlisten = \"{addr}\"\nupstream = \"127.0.0.1:9\"\n"
    );
    let file = TempFile::new("deprecated", &text);
    let path = file.path.display().to_string();
    let warning = format!(
        "{path}:4:19: uring.max_connections is deprecated: it is now the default max_connections of each [[rule]] that sets none (300); set max_connections in the rules instead"
    );
    // 2. check: exit 0, the config on stdout, the warning alone on stderr.
    let out = run_to_exit(&["check", "--config", &path]);
    assert!(out.status.success(), "exit {}: {}", out.status, out.stderr);
    assert_eq!(
        out.stderr.trim_end(),
        format!(
            "ringfwd: warning: {warning}\nringfwd: {path}: configuration is valid (1 rule, 1 warning)"
        )
    );
    assert!(
        out.stdout.contains("max_connections = 300"),
        "{}",
        out.stdout
    );
    assert!(
        !out.stdout.contains("[uring]\nmax_connections"),
        "{}",
        out.stdout
    );
    // 3. run: the warning is logged once, then the bind error ends it.
    let out = run_to_exit(&["run", "--config", &path]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    let warns: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("is deprecated"))
        .collect();
    assert_eq!(warns.len(), 1, "{}", out.stderr);
    assert!(
        warns[0].contains("WARN") && warns[0].contains(&warning),
        "{}",
        warns[0]
    );
    assert!(
        out.stderr.contains("address already in use"),
        "{}",
        out.stderr
    );
    drop(holder);
}

#[test]
fn check_rejects_what_run_could_not_do() {
    // (file text, the start of the message after the file name)
    let cases = [
        (
            "[[rule]]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:80\"\ntap = \"/nonexistent-ringfwd-dir/t.hex\"\n",
            ":4:7: tap: cannot create \"/nonexistent-ringfwd-dir/t.hex\": directory \"/nonexistent-ringfwd-dir\" does not exist",
        ),
        (
            "[[rule]]\nname = \"any\"\nlisten = \"0.0.0.0:7\"\nupstream = \"127.0.0.1:80\"\n\n[[rule]]\nname = \"lo\"\nlisten = \"127.0.0.1:7\"\nupstream = \"127.0.0.1:81\"\n",
            ":8:10: listen: rules \"any\" and \"lo\" overlap: 0.0.0.0:7 already takes every connection to 127.0.0.1:7",
        ),
        (
            "[[rule]]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:0\"\n",
            ":3:12: upstream: upstream port 0 in \"127.0.0.1:0\"",
        ),
        (
            "[[rule]]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:80\"\nconnect_timeout = \"18446744073709551615h\"\n",
            ":4:19: connect_timeout: invalid duration \"18446744073709551615h\": too large",
        ),
    ];
    for (text, want) in cases {
        let file = TempFile::new("check-run", text);
        let path = file.path.display().to_string();
        let out = run_to_exit(&["check", "--config", &path]);
        assert_eq!(out.status.code(), Some(1), "{text}: {}", out.stderr);
        let msg = one_line(&out.stderr);
        let want = format!("ringfwd: error: {path}{want}");
        assert!(msg.starts_with(&want), "got  {msg}\nwant {want}");
    }
    assert!(
        !Path::new("/nonexistent-ringfwd-dir").exists(),
        "check created the tap directory"
    );
}

#[test]
fn flag_errors_are_one_line_and_exit_1_like_config_errors() {
    let base = [
        "run",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "127.0.0.1:9",
    ];
    // (extra flags, the whole line)
    let cases: [(&[&str], &str); 4] = [
        (
            &["--workers", "0"],
            "--workers: invalid workers \"0\": expected 1..=1024",
        ),
        (
            &["--idle-timeout", "5"],
            "--idle-timeout: invalid duration \"5\": a unit is required (us, ms, s, m or h)",
        ),
        (
            &["--engine", "fast"],
            "--engine: unknown engine \"fast\" (expected one of auto, uring, tokio, std)",
        ),
        (
            &["--wrokers", "2"],
            "unexpected argument '--wrokers' found; a similar argument exists: '--workers' (see ringfwd run --help)",
        ),
    ];
    for (extra, want) in cases {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let out = run_to_exit(&args);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {}", out.stderr);
        assert_eq!(one_line(&out.stderr), format!("ringfwd: error: {want}"));
        assert!(out.stdout.is_empty(), "{}", out.stdout);
    }
    // Help and the version still print and exit 0.
    for args in [&["--help"][..], &["run", "--help"], &["-V"], &["--version"]] {
        let out = run_to_exit(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", out.stderr);
        assert!(!out.stdout.is_empty(), "{args:?} printed nothing");
        if args[0].starts_with("-V") || args[0] == "--version" {
            assert!(out.stdout.starts_with("ringfwd "), "{}", out.stdout);
        }
    }
}

#[test]
fn check_ends_with_a_valid_line_takes_a_positional_file_and_can_be_quiet() {
    let file = TempFile::new("check-verdict", GOOD);
    let path = file.path.display().to_string();
    // 1. Positional or --config: the effective config on stdout, one verdict line on stderr.
    for args in [
        vec!["check", path.as_str()],
        vec!["check", "--config", path.as_str()],
    ] {
        let out = run_to_exit(&args);
        assert!(out.status.success(), "{args:?}: {}", out.stderr);
        assert!(out.stdout.contains("name = \"web\""), "{}", out.stdout);
        assert_eq!(
            one_line(&out.stderr),
            format!("ringfwd: {path}: configuration is valid (1 rule)")
        );
    }
    // 2. --quiet: nothing at all for a valid file.
    let out = run_to_exit(&["check", "--quiet", &path]);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!((out.stdout.as_str(), out.stderr.as_str()), ("", ""));
    // 3. --quiet still reports an error.
    let bad = TempFile::new("check-verdict-bad", "[rule]\nlisten = \"127.0.0.1:0\"\n");
    let bad_path = bad.path.display().to_string();
    let out = run_to_exit(&["check", "-q", &bad_path]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(one_line(&out.stderr).starts_with("ringfwd: error: "));
    // 4. Both forms at once is a mistake, said in one line.
    let out = run_to_exit(&["check", &path, "--config", &path]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(
        one_line(&out.stderr).contains("cannot be used with"),
        "{}",
        out.stderr
    );
}

#[test]
fn structure_mistakes_say_what_to_write() {
    let rule = "listen = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:80\"\n";
    let cases = [
        (
            format!("[rule]\n{rule}"),
            ":1:1: invalid type: map, expected a sequence; `[rule]` is a single table, but `rule` is a list of tables: write `[[rule]]` (double brackets), once per entry",
        ),
        (
            format!("wrokers = 2\n[[rule]]\n{rule}"),
            "; did you mean `workers`?",
        ),
        (
            format!("[[rule]]\n{rule}idel_timeout = \"5m\"\n"),
            "; did you mean `idle_timeout`?",
        ),
    ];
    for (text, want) in cases {
        let file = TempFile::new("check-structure", &text);
        let path = file.path.display().to_string();
        let out = run_to_exit(&["check", &path]);
        assert_eq!(out.status.code(), Some(1), "{text}: {}", out.stderr);
        let msg = one_line(&out.stderr);
        assert!(
            msg.starts_with(&format!("ringfwd: error: {path}:")) && msg.contains(want),
            "{msg}\nlacks {want}"
        );
    }
    // A name close to nothing gets the list, and no guess.
    let file = TempFile::new("check-structure", &format!("colour = 1\n[[rule]]\n{rule}"));
    let out = run_to_exit(&["check", &file.path.display().to_string()]);
    assert!(!out.stderr.contains("did you mean"), "{}", out.stderr);
}

#[test]
fn version_is_short_with_v_and_long_with_version() {
    let short = run_to_exit(&["-V"]);
    assert!(short.status.success());
    assert_eq!(
        short.stdout,
        format!("ringfwd {}\n", env!("CARGO_PKG_VERSION"))
    );
    let long = run_to_exit(&["--version"]);
    assert!(long.status.success(), "{}", long.stderr);
    let text = long.stdout;
    assert!(
        text.starts_with(&format!("ringfwd {}\n", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    for key in [
        "commit:",
        "profile:",
        "target:",
        "kernel:",
        "seccomp:",
        "io_uring:",
        "engines:",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(key)),
            "--version lacks a {key} line:\n{text}"
        );
    }
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    assert!(text.contains(&format!("profile:  {profile}\n")), "{text}");
    // The io_uring line says what auto would pick: either available, or why not.
    let uring = text.lines().find(|l| l.starts_with("io_uring:")).unwrap();
    assert!(
        uring.starts_with("io_uring: available (task running: ")
            || uring.starts_with("io_uring: unavailable: "),
        "{uring}"
    );
}
