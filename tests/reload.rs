//! Reloads cut no one: a connection lives until its own end across any number of reloads
//! (only `reload_drain_timeout`, when set, or a stop's `shutdown_grace` ends it), reloads are
//! never refused for coming often, requests that pile up are served together, `/healthz`
//! answers while they run, and a rule's `max_connections` counts across generations.
//!
//! [`engine_suite!`] lines at the bottom run every scenario once per engine.

mod support;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use support::data::{Stream, hash_to_eof};
use support::pool::http_get;
use support::sock::{Backend, End, wait_end};
use support::{Relay, STEP_TIMEOUT, TempFile, eventually};

/// Reloads in the storm, and how long it spreads them over.
const RELOADS: usize = 50;
const STORM: Duration = Duration::from_secs(10);
/// Each long transfer writes this much per step and pauses, for as long as the storm lasts
/// and a little more: every one of them spans many reloads.
const STEP: usize = 16 << 10;
const PAUSE: Duration = Duration::from_millis(50);
const SPAN: Duration = Duration::from_secs(12);

fn rule(name: &str, upstream: SocketAddr, extra: &str) -> String {
    format!(
        "[[rule]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\n{extra}"
    )
}

fn post(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, STEP_TIMEOUT)?;
    s.set_read_timeout(Some(STEP_TIMEOUT))?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other(format!("no end of headers in {text:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no status in {head:?}")))?;
    Ok((status, body.to_string()))
}

/// Replaces the file at `path` at once (write aside, rename over it).
fn replace(path: &std::path::Path, contents: &str) {
    let aside = path.with_extension("new");
    std::fs::write(&aside, contents).expect("write the next config");
    std::fs::rename(&aside, path).expect("rename it into place");
}

fn metric(admin: SocketAddr, series: &str) -> f64 {
    let (_, text) = http_get(admin, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
}

/// A transfer through `addr` to an echo backend that writes a seeded stream in steps with
/// pauses for [`SPAN`], then half-closes and checks that every byte came back (SHA-256).
fn long_transfer(addr: SocketAddr, seed: u64) -> JoinHandle<Result<u64, String>> {
    std::thread::spawn(move || {
        let mut s = TcpStream::connect_timeout(&addr, STEP_TIMEOUT)
            .map_err(|e| format!("transfer {seed}: connect: {e}"))?;
        s.set_write_timeout(Some(STEP_TIMEOUT))
            .map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(STEP_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let mut r = s.try_clone().map_err(|e| e.to_string())?;
        let reader = std::thread::spawn(move || hash_to_eof(&mut r));
        let mut stream = Stream::new(seed, 4 << 10);
        let end = Instant::now() + SPAN;
        while Instant::now() < end {
            let target = stream.accepted + STEP as u64;
            while stream.accepted < target {
                stream.write_once(&mut s).map_err(|e| {
                    format!(
                        "transfer {seed}: write after {} bytes: {e}",
                        stream.accepted
                    )
                })?;
            }
            std::thread::sleep(PAUSE);
        }
        let sent = stream.accepted;
        let want = stream.finish();
        s.shutdown(Shutdown::Write)
            .map_err(|e| format!("transfer {seed}: shutdown: {e}"))?;
        let (got, hash) = reader
            .join()
            .map_err(|_| format!("transfer {seed}: the reader failed (reset or timeout)"))?;
        if got != sent || hash != want {
            return Err(format!(
                "transfer {seed}: sent {sent} bytes, {got} came back{}",
                if got == sent {
                    " with other content"
                } else {
                    ""
                }
            ));
        }
        Ok(sent)
    })
}

/// 50 reloads in 10 s (SIGHUP and `POST /reload` in turn) while long transfers run on a
/// rule that stays the same, one whose pool changes at every reload, and one the first
/// reload removes; more transfers start mid-storm, so several generations hold live
/// connections at once. `shutdown_grace` is 1 s: were it applied to reloads, every transfer
/// would be cut. Every byte arrives, no reload is refused, and the memory the storm leaves
/// behind is printed.
fn reload_storm_cuts_no_one(engine: &[&str]) {
    let _g = support::heavy();
    let steady = Backend::echo();
    let (pool_a, pool_b) = (Backend::echo(), Backend::echo());
    let removed = Backend::echo();
    let head = "admin = \"127.0.0.1:0\"\nshutdown_grace = \"1s\"\n";
    let conf = |i: usize| {
        let changed = if i.is_multiple_of(2) {
            &pool_a
        } else {
            &pool_b
        };
        let mut c = format!(
            "{head}{}{}",
            rule("steady", steady.addr(), ""),
            rule("changed", changed.addr(), "")
        );
        if i == 0 {
            c.push_str(&rule("removed", removed.addr(), ""));
        }
        c
    };
    let file = TempFile::new("reload-storm", &conf(0));
    let path = file.path.display().to_string();
    let mut args = vec!["run", "--config", &path];
    args.extend_from_slice(engine);
    let mut relay = Relay::try_spawn(&args, 3).unwrap_or_else(|f| panic!("ringfwd {args:?}: {f}"));
    let admin = relay.admin.expect("admin addr");
    let (steady_at, changed_at) = (relay.addr_of("steady"), relay.addr_of("changed"));
    let mut transfers = vec![
        long_transfer(steady_at, 1),
        long_transfer(changed_at, 2),
        long_transfer(relay.addr_of("removed"), 3),
    ];
    // Let the transfers connect before the first reload.
    std::thread::sleep(Duration::from_millis(300));
    let rss_before = support::procfs::rss(relay.pid());
    let started = Instant::now();
    let mut answers = Vec::new();
    for i in 1..=RELOADS {
        // Written aside and renamed into place: a SIGHUP's reload may still be reading the
        // file when the next version is written.
        replace(&file.path, &conf(i));
        if i.is_multiple_of(2) {
            kill(Pid::from_raw(relay.pid()), Signal::SIGHUP).expect("SIGHUP");
        } else {
            let (status, body) = post(admin, "/reload").expect("POST /reload");
            answers.push((i, status, body));
        }
        if i == 10 || i == 25 {
            transfers.push(long_transfer(steady_at, 10 + i as u64));
            transfers.push(long_transfer(changed_at, 20 + i as u64));
        }
        let next = STORM.mul_f64(i as f64 / RELOADS as f64);
        std::thread::sleep(next.saturating_sub(started.elapsed()));
    }
    let rss_after = support::procfs::rss(relay.pid());
    for (i, status, body) in &answers {
        assert_eq!(*status, 200, "reload {i} was answered {status}: {body}");
    }
    // Every transfer, on every rule and every generation, arrives whole.
    let mut bytes = 0;
    for t in transfers {
        bytes += t
            .join()
            .expect("a transfer thread panicked")
            .unwrap_or_else(|e| panic!("{e}\n{}", relay.stderr()));
    }
    assert_eq!(
        metric(admin, "ringfwd_config_reloads_total{result=\"failure\"}"),
        0.0,
        "{}",
        relay.stderr()
    );
    let ok = metric(admin, "ringfwd_config_reloads_total{result=\"success\"}");
    let stderr = relay.stderr();
    assert!(
        !stderr.contains("closing the remaining connections"),
        "a reload cut connections:\n{stderr}"
    );
    eprintln!(
        "{engine:?}: {RELOADS} reloads ({ok} applied, the rest coalesced) in {:?}; {bytes} bytes \
         through 7 transfers intact; RSS {} KiB before, {} KiB after the storm ({} B per reload)",
        started.elapsed(),
        rss_before >> 10,
        rss_after >> 10,
        rss_after.saturating_sub(rss_before) / RELOADS as u64
    );
    relay.stop_and_wait();
}

/// `reload_drain_timeout` bounds an older generation's connections, and only theirs: the
/// connection accepted before the reload is closed once it passes, the one accepted after
/// keeps working.
fn drain_timeout_ends_only_older_connections(engine: &[&str]) {
    let _g = support::light();
    let pool = Backend::echo();
    // The reload moves the rule to another port (and name), so a connection to that port is
    // certainly the new generation's, however long the old one takes to stop accepting.
    let moved = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let conf = |name: &str, listen: &str| {
        format!(
            "admin = \"127.0.0.1:0\"\nreload_drain_timeout = \"1s\"\n[[rule]]\nname = \"{name}\"\nlisten = \"{listen}\"\nupstream = \"{}\"\n",
            pool.addr()
        )
    };
    let file = TempFile::new("reload-drain-timeout", &conf("r", "127.0.0.1:0"));
    let path = file.path.display().to_string();
    let mut args = vec!["run", "--config", &path];
    args.extend_from_slice(engine);
    let mut relay = Relay::try_spawn(&args, 1).unwrap_or_else(|f| panic!("ringfwd {args:?}: {f}"));
    let admin = relay.admin.expect("admin addr");
    let mut old = support::sock::connect(relay.addr());
    old.write_all(b"a").unwrap();
    assert_eq!(support::sock::read_n(&mut old, 1), b"a");
    replace(&file.path, &conf("r2", &moved.to_string()));
    let (status, body) = post(admin, "/reload").expect("POST /reload");
    assert_eq!(status, 200, "{body}");
    let mut new = support::sock::connect(moved);
    new.write_all(b"b").unwrap();
    assert_eq!(support::sock::read_n(&mut new, 1), b"b");
    let (end, _) = wait_end(&mut old, STEP_TIMEOUT);
    assert!(
        end.is_closed(),
        "the older connection was not ended by reload_drain_timeout: {end:?}\n{}",
        relay.stderr()
    );
    new.write_all(b"c").unwrap();
    assert_eq!(support::sock::read_n(&mut new, 1), b"c");
    assert!(
        relay
            .stderr()
            .contains("reload_drain_timeout over: closing the remaining connections"),
        "{}",
        relay.stderr()
    );
    drop(new);
    relay.stop_and_wait();
}

/// A rule whose cap (`limit`, a rule key) is filled by `held` connections from before a
/// reload: after the reload — a new generation with no connection of its own — one more is
/// turned away, the old ones keep working, and once one of them ends there is room again.
fn a_cap_counts_across_generations(engine: &[&str], limit: &str, held: u8) {
    let _g = support::light();
    let pool = Backend::echo();
    let conf = |idle: &str| {
        format!(
            "admin = \"127.0.0.1:0\"\n{}",
            rule(
                "capped",
                pool.addr(),
                &format!("{limit}\nidle_timeout = \"{idle}\"\n")
            )
        )
    };
    let file = TempFile::new("reload-cap", &conf("5m"));
    let path = file.path.display().to_string();
    let mut args = vec!["run", "--config", &path];
    args.extend_from_slice(engine);
    let mut relay = Relay::try_spawn(&args, 1).unwrap_or_else(|f| panic!("ringfwd {args:?}: {f}"));
    let admin = relay.admin.expect("admin addr");
    let mut old: Vec<TcpStream> = (0..held)
        .map(|i| {
            let mut c = support::sock::connect(relay.addr());
            c.write_all(&[i]).unwrap();
            assert_eq!(support::sock::read_n(&mut c, 1), [i]);
            c
        })
        .collect();
    replace(&file.path, &conf("6m"));
    let (status, body) = post(admin, "/reload").expect("POST /reload");
    assert_eq!(status, 200, "{body}");
    let (end, _) = support::sock::connect_expect_closed(relay.addr(), STEP_TIMEOUT);
    assert!(
        end.is_closed(),
        "one connection more than `{limit}` was served after a reload: {end:?}"
    );
    for c in &mut old {
        c.write_all(b"y").unwrap();
        assert_eq!(support::sock::read_n(c, 1), b"y");
    }
    drop(old.remove(0));
    assert!(
        eventually(STEP_TIMEOUT, || {
            let Ok(mut c) = support::sock::try_connect(relay.addr()) else {
                return false;
            };
            c.write_all(b"z").is_ok() && matches!(wait_end_one(&mut c), Some(b'z'))
        }),
        "no room once an old connection ended\n{}",
        relay.stderr()
    );
    relay.stop_and_wait();
}

/// `max_connections` counts the connections of every generation of a rule.
fn max_connections_counts_across_generations(engine: &[&str]) {
    a_cap_counts_across_generations(engine, "max_connections = 2", 2);
}

/// `max_connections_per_ip` too, while the limits are unchanged: the client's one connection
/// from before a reload leaves it no second one after it.
fn per_client_limits_count_across_generations(engine: &[&str]) {
    a_cap_counts_across_generations(engine, "max_connections_per_ip = 1", 1);
}

/// One byte read within a short bound, or `None` if the stream ended or stayed silent.
fn wait_end_one(c: &mut TcpStream) -> Option<u8> {
    let (end, data) = wait_end(c, Duration::from_millis(500));
    match (end, data.first()) {
        (_, Some(b)) => Some(*b),
        (End::Open | End::Eof | End::Reset | End::Failed(_), None) => None,
    }
}

/// 64 clients looping on `POST /reload` for 3 s: reloads run one at a time and the requests
/// that pile up are served together (far fewer reloads than requests), every request is
/// answered 200 or, when it gave way to a probe, closed — never refused — and every
/// `/healthz` probe meanwhile is answered.
#[test]
fn reload_requests_coalesce_and_healthz_answers() {
    let _g = support::heavy();
    let pool = Backend::echo();
    let file = TempFile::new(
        "reload-coalesce",
        &format!("admin = \"127.0.0.1:0\"\n{}", rule("r", pool.addr(), "")),
    );
    let path = file.path.display().to_string();
    let mut relay = Relay::try_spawn(&["run", "--config", &path, "--engine", "std"], 1)
        .unwrap_or_else(|f| panic!("ringfwd: {f}"));
    let admin = relay.admin.expect("admin addr");
    let stop = Arc::new(AtomicBool::new(false));
    let (answered, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let loops: Vec<_> = (0..64)
        .map(|_| {
            let (stop, answered, refused) = (stop.clone(), answered.clone(), refused.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    match post(admin, "/reload") {
                        Ok((200, _)) => {
                            answered.fetch_add(1, Ordering::AcqRel);
                        }
                        Ok((status, body)) => {
                            refused.fetch_add(1, Ordering::AcqRel);
                            eprintln!("reload answered {status}: {body}");
                        }
                        // Evicted for a probe while waiting: the reload still ran.
                        Err(_) => {}
                    }
                }
            })
        })
        .collect();
    let mut probes = 0;
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        let (status, body) = http_get(admin, "/healthz");
        assert_eq!(status, 200, "/healthz during a reload storm: {body}");
        probes += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Release);
    for l in loops {
        l.join().expect("a reload loop panicked");
    }
    let requests = answered.load(Ordering::Acquire);
    let reloads = metric(admin, "ringfwd_config_reloads_total{result=\"success\"}");
    eprintln!("{requests} reload requests answered 200 by {reloads} reloads; {probes} probes");
    assert_eq!(refused.load(Ordering::Acquire), 0, "a reload was refused");
    assert!(requests > 0, "no reload request was answered");
    assert!(
        reloads < requests as f64,
        "{reloads} reloads for {requests} requests: none was coalesced"
    );
    relay.stop_and_wait();
}

/// A reload reads its file, and resolves its host names, off the control plane's event loop:
/// a SIGTERM during a reload stuck in DNS stops the forwarder at once. Steps: 1. a network
/// namespace whose resolver (`/etc/netns/NAME/resolv.conf`, bind-mounted by `ip netns exec`)
/// is a UDP socket that never answers, with a 30 s timeout; 2. the forwarder runs there on a
/// config without host names; 3. the file now names an upstream by host name, SIGHUP; 4. a
/// SIGTERM while that reload waits on DNS ends the process within the step timeout, well
/// before the resolver's 30 s.
#[test]
fn a_stop_is_not_delayed_by_a_reload_stuck_in_dns() {
    let _g = support::light();
    if !support::netns::available() {
        return;
    }
    let ns = support::netns::Netns::new();
    let etc = std::path::PathBuf::from(format!("/etc/netns/{}", ns.name));
    std::fs::create_dir_all(&etc).expect("create /etc/netns/NAME");
    struct RemoveDir(std::path::PathBuf);
    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _etc = RemoveDir(etc.clone());
    std::fs::write(
        etc.join("resolv.conf"),
        "nameserver 127.0.0.1\noptions timeout:30 attempts:1\n",
    )
    .expect("write resolv.conf");
    // 1. A resolver that takes every query and never answers.
    let _silent = ns.run(|| std::net::UdpSocket::bind("127.0.0.1:53").expect("bind udp :53"));
    // 2.
    let rule_at = |up: &str| {
        format!("[[rule]]\nname = \"r\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{up}\"\n")
    };
    let file = TempFile::new("reload-dns", &rule_at("127.0.0.1:9"));
    let path = file.path.display().to_string();
    let args = ["run", "--config", path.as_str(), "--engine", "std"];
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, support::relay::BIN])
        .args(args);
    let mut relay = Relay::try_spawn_command(cmd, &args, 1)
        .unwrap_or_else(|f| panic!("ringfwd in a namespace: {f}"));
    // 3.
    replace(&file.path, &rule_at("stuck.invalid-zone.example:80"));
    kill(Pid::from_raw(relay.pid()), Signal::SIGHUP).expect("SIGHUP");
    std::thread::sleep(Duration::from_millis(300));
    // 4.
    let asked = Instant::now();
    relay.sigterm();
    let status = relay.wait_exit(STEP_TIMEOUT);
    assert!(
        status.is_some(),
        "still running {:?} after SIGTERM, behind a reload stuck in DNS\n{}",
        asked.elapsed(),
        relay.stderr()
    );
    eprintln!("stopped {:?} after SIGTERM", asked.elapsed());
}

/// No connection waits behind a hand-over: one client connects again and again, one
/// connection at a time, while 40 reloads each retire the generation serving it. A
/// connection whose wake-up went to a retiring generation's accept as it was cancelled (io_uring
/// accepts wait as exclusive waiters) would sit in the listen queue until the next connection
/// came — and with one client, none comes: the step timeout fails the test.
fn one_client_is_never_stranded_by_a_hand_over(engine: &[&str]) {
    let _g = support::light();
    let pool = Backend::echo();
    let conf = |i: usize| {
        format!(
            "admin = \"127.0.0.1:0\"\n{}",
            rule(
                "r",
                pool.addr(),
                &format!("idle_timeout = \"{}m\"\n", 10 + i)
            )
        )
    };
    let file = TempFile::new("reload-stranded", &conf(0));
    let path = file.path.display().to_string();
    let mut args = vec!["run", "--config", &path];
    args.extend_from_slice(engine);
    let mut relay = Relay::try_spawn(&args, 1).unwrap_or_else(|f| panic!("ringfwd {args:?}: {f}"));
    let (admin, addr) = (relay.admin.expect("admin addr"), relay.addr());
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<u64, String> {
            let mut n = 0u64;
            while !stop.load(Ordering::Acquire) {
                n += 1;
                let started = Instant::now();
                let mut c = TcpStream::connect_timeout(&addr, STEP_TIMEOUT)
                    .map_err(|e| format!("connection {n}: connect: {e}"))?;
                c.set_read_timeout(Some(STEP_TIMEOUT)).unwrap();
                c.write_all(&n.to_be_bytes())
                    .map_err(|e| format!("connection {n}: write: {e}"))?;
                let mut back = [0u8; 8];
                c.read_exact(&mut back).map_err(|e| {
                    format!("connection {n}: no echo after {:?}: {e}", started.elapsed())
                })?;
                if back != n.to_be_bytes() {
                    return Err(format!("connection {n}: wrong echo"));
                }
            }
            Ok(n)
        })
    };
    for i in 1..=40 {
        replace(&file.path, &conf(i));
        let (status, body) = post(admin, "/reload").expect("POST /reload");
        assert_eq!(status, 200, "{body}");
        std::thread::sleep(Duration::from_millis(120));
        if client.is_finished() {
            break;
        }
    }
    stop.store(true, Ordering::Release);
    let served = client
        .join()
        .expect("the client panicked")
        .unwrap_or_else(|e| panic!("{e}\n{}", relay.stderr()));
    eprintln!("{engine:?}: {served} connections, one at a time, across 40 hand-overs");
    relay.stop_and_wait();
}

support::engine_suite!(
    [
        reload_storm_cuts_no_one,
        drain_timeout_ends_only_older_connections,
        max_connections_counts_across_generations,
        per_client_limits_count_across_generations,
        one_client_is_never_stranded_by_a_hand_over,
    ],
    std_engine: ["--engine", "std"],
    tokio_engine: ["--engine", "tokio"],
    uring: ["--engine", "uring"],
);
