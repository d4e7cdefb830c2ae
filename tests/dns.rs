//! DNS discovery with a resolver the test controls: the forwarder runs in a mount namespace of
//! its own where `/etc/hosts` is a file the test rewrites between resolutions, so the real
//! system resolver (getaddrinfo, which reads /etc/hosts on every lookup) answers what the test
//! says. Members appear, disappear, and a failing lookup keeps the last good set. A name that
//! does not resolve at start is a member down until it does, with one warning, while the
//! host's other rules serve.
//!
//! Needs root (or CAP_SYS_ADMIN) for `unshare --mount` and `mount --bind`; without it the
//! tests fail loudly, unless `RINGFWD_SKIP_UNSHARE=1` says the host cannot do this.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use support::TempFile;
use support::pool::{Forwarder, members_of, wait_until};
use support::sock::{Backend, Upstream};

/// The name the test resolves (under `.test`, reserved for testing: never a real name).
const NAME: &str = "pool.ringfwd.test";
/// How long a change may take to show: a few resolve intervals on a loaded box.
const SETTLE: Duration = Duration::from_secs(15);

/// Whether this host lets the test give the forwarder its own /etc/hosts.
fn can_unshare() -> bool {
    let ok = Command::new("unshare")
        .args(["-m", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok && std::env::var_os("RINGFWD_SKIP_UNSHARE").is_none() {
        panic!(
            "`unshare -m` failed: the DNS tests need root (or CAP_SYS_ADMIN) to give the \
             forwarder its own /etc/hosts; set RINGFWD_SKIP_UNSHARE=1 on a host that cannot"
        );
    }
    ok
}

fn hosts(addrs: &[&str]) -> String {
    let mut s = String::from("127.0.0.1 localhost\n::1 localhost\n");
    for a in addrs {
        s.push_str(&format!("{a} {NAME}\n"));
    }
    s
}

/// An echo backend on `ip:port`.
fn echo_on(ip: &str, port: u16) -> Backend {
    let addr: SocketAddr = format!("{ip}:{port}").parse().expect("address");
    Backend::spawn_on(Upstream::bind_on(addr), support::sock::echo)
}

/// Two echo backends on 127.0.0.2 and 127.0.0.3 sharing one port.
fn two_backends() -> (Backend, Backend, u16) {
    for _ in 0..20 {
        let a = Backend::spawn_on(
            Upstream::bind_on("127.0.0.2:0".parse().expect("address")),
            support::sock::echo,
        );
        let port = a.addr().port();
        if std::net::TcpListener::bind(("127.0.0.3", port)).is_ok() {
            return (a, echo_on("127.0.0.3", port), port);
        }
    }
    panic!("no port free on both 127.0.0.2 and 127.0.0.3");
}

fn exchange(addr: SocketAddr) {
    let mut s = TcpStream::connect(addr).expect("connect through the forwarder");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(b"ping").expect("write");
    let mut back = [0u8; 4];
    s.read_exact(&mut back).expect("echo");
    assert_eq!(&back, b"ping");
}

fn member_addrs(fwd: &Forwarder) -> Vec<String> {
    let up = fwd.upstreams();
    let pool = up["rules"]
        .as_array()
        .and_then(|r| r.first())
        .expect("one pool")
        .clone();
    let mut v: Vec<String> = members_of(&pool)
        .iter()
        .map(|m| m["addr"].as_str().expect("addr").to_string())
        .collect();
    v.sort();
    v
}

fn members_follow_dns(engine: &[&str]) {
    if !can_unshare() {
        return;
    }
    let _load = support::light();
    let (a, b, port) = two_backends();
    let (ma, mb) = (a.addr().to_string(), b.addr().to_string());
    // 1. The name resolves to the first backend only.
    let file = TempFile::new("ringfwd-hosts", &hosts(&["127.0.0.2"]));
    let script = format!(
        "mount --bind {} /etc/hosts && exec \"$0\" \"$@\"",
        file.path.display()
    );
    let rules = format!(
        "[[rule]]\nname = \"dns\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{NAME}:{port}\"\nresolve_interval = \"1s\"\n"
    );
    let fwd = Forwarder::start_wrapped(&["unshare", "-m", "sh", "-c", &script], engine, &rules, 1);
    assert_eq!(member_addrs(&fwd), vec![ma.clone()]);
    for _ in 0..6 {
        exchange(fwd.addr());
    }
    assert_eq!((a.accepted(), b.accepted()), (6, 0));
    // 2. Scale out: a second address appears and takes its share.
    std::fs::write(&file.path, hosts(&["127.0.0.2", "127.0.0.3"])).expect("rewrite hosts");
    wait_until(SETTLE, "the new member to appear", || {
        let m = member_addrs(&fwd);
        (m == vec![ma.clone(), mb.clone()])
            .then_some(())
            .ok_or(format!("{m:?}"))
    });
    for _ in 0..10 {
        exchange(fwd.addr());
    }
    assert!(
        b.accepted() >= 4,
        "the new member got {} of 10",
        b.accepted()
    );
    // 3. Scale in: the first address goes away; nothing more reaches it.
    std::fs::write(&file.path, hosts(&["127.0.0.3"])).expect("rewrite hosts");
    wait_until(SETTLE, "the old member to disappear", || {
        let m = member_addrs(&fwd);
        (m == vec![mb.clone()])
            .then_some(())
            .ok_or(format!("{m:?}"))
    });
    let before = a.accepted();
    for _ in 0..6 {
        exchange(fwd.addr());
    }
    assert_eq!(
        a.accepted(),
        before,
        "a removed member still got connections"
    );
    // 4. The name stops resolving: the last good set stays, and it is said once.
    std::fs::write(&file.path, hosts(&[])).expect("rewrite hosts");
    wait_until(SETTLE, "the lookup failure to be reported", || {
        fwd.stderr()
            .contains("cannot resolve upstream")
            .then_some(())
            .ok_or_else(|| "no warning yet".to_string())
    });
    std::thread::sleep(Duration::from_millis(2500)); // two or three more failing lookups
    assert_eq!(member_addrs(&fwd), vec![mb.clone()]);
    exchange(fwd.addr());
    assert_eq!(
        fwd.stderr().matches("cannot resolve upstream").count(),
        1,
        "{}",
        fwd.stderr()
    );
}

#[test]
fn members_follow_dns_with_the_std_engine() {
    members_follow_dns(&["--engine", "std"]);
}

#[test]
fn members_follow_dns_with_the_tokio_engine() {
    members_follow_dns(&["--engine", "tokio"]);
}

#[test]
fn members_follow_dns_with_the_uring_engine() {
    if support::engine_available(&["--engine", "uring"]) {
        members_follow_dns(&["--engine", "uring"]);
    }
}

/// The name is missing from /etc/hosts at start: the forwarder starts anyway (one warning,
/// naming it), its rule refuses connections (no member to dial) while another rule serves,
/// and once the name appears, its member is dialed.
fn a_name_missing_at_start_is_down_until_it_resolves(engine: &[&str]) {
    if !can_unshare() {
        return;
    }
    let _load = support::light();
    let late = echo_on("127.0.0.2", 0);
    let other = Backend::echo();
    let file = TempFile::new("ringfwd-hosts", &hosts(&[]));
    let script = format!(
        "mount --bind {} /etc/hosts && exec \"$0\" \"$@\"",
        file.path.display()
    );
    let port = late.addr().port();
    let rules = format!(
        "[[rule]]\nname = \"dns\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{NAME}:{port}\"\nresolve_interval = \"0s\"\n\n\
         [[rule]]\nname = \"other\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
        other.addr()
    );
    let fwd = Forwarder::start_wrapped(&["unshare", "-m", "sh", "-c", &script], engine, &rules, 2);
    let warned = format!("cannot resolve \"{NAME}:{port}\"");
    // stderr is read by a thread of the harness: the warning may land after the readiness
    // lines on stdout.
    wait_until(SETTLE, "the warning about the unresolved name", || {
        fwd.stderr()
            .contains(&warned)
            .then_some(())
            .ok_or_else(|| "no warning yet".to_string())
    });
    assert_eq!(fwd.stderr().matches(&warned).count(), 1, "{}", fwd.stderr());
    assert!(member_addrs(&fwd).is_empty(), "no address for the name yet");
    // The rule that resolves serves; the unresolved one closes its clients at once.
    let other_addr = fwd.rules[1].1;
    exchange(other_addr);
    let mut s = TcpStream::connect(fwd.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let _ = s.write_all(b"ping");
    let mut buf = [0u8; 4];
    assert!(
        matches!(s.read(&mut buf), Ok(0) | Err(_)),
        "closed, not hung"
    );
    assert_eq!(late.accepted(), 0);
    // The name appears: retried every 5 s although resolve_interval is "0s".
    std::fs::write(&file.path, hosts(&["127.0.0.2"])).expect("rewrite hosts");
    wait_until(SETTLE, "the member to resolve", || {
        let m = member_addrs(&fwd);
        (m == vec![late.addr().to_string()])
            .then_some(())
            .ok_or(format!("{m:?}"))
    });
    exchange(fwd.addr());
    assert_eq!(late.accepted(), 1);
    assert!(fwd.stderr().contains("resolves again"), "{}", fwd.stderr());
    assert_eq!(fwd.stderr().matches(&warned).count(), 1, "{}", fwd.stderr());
}

#[test]
fn a_name_missing_at_start_with_the_std_engine() {
    a_name_missing_at_start_is_down_until_it_resolves(&["--engine", "std"]);
}

#[test]
fn a_name_missing_at_start_with_the_tokio_engine() {
    a_name_missing_at_start_is_down_until_it_resolves(&["--engine", "tokio"]);
}

#[test]
fn a_name_missing_at_start_with_the_uring_engine() {
    if support::engine_available(&["--engine", "uring"]) {
        a_name_missing_at_start_is_down_until_it_resolves(&["--engine", "uring"]);
    }
}
