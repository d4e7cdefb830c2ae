//! The upstream side of a rule and of a route, on every engine: `transparent` (the backend
//! sees the client's address, the PROXY header's where one is trusted), `source`, `mark`,
//! `interface`, `mptcp` (listen side) and `upstream_mptcp`; and the clear start-up errors for
//! what the host refuses.
//!
//! Each scenario builds its own network namespaces (see `support::netns`) with addresses in
//! 198.18.0.0/15 and routes that only work when the option took effect: a marked socket has
//! a route only through an `ip rule fwmark` table, a device-bound socket only through an
//! `ip rule oif` table, while unmarked or unbound traffic goes into a dead-end device. The
//! transparent scenario puts client, forwarder and backend in three namespaces, the backend
//! routing the client's addresses back through the forwarder, whose policy routing
//! (`iptables -m socket --transparent`, `ip rule fwmark`, `ip route local ... table 100`,
//! as docs/DEPLOY.md gives it) delivers those replies to its own transparent sockets.
//! `iptables` is installed by .ci/run.

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use socket2::{Domain, Protocol, Socket, Type};

use support::data;
use support::netns::{Link, Netns};
use support::relay::{self, run_to_exit};
use support::sock::{Backend, Upstream, echo};
use support::{Relay, STEP_TIMEOUT, TempFile};

support::engine_suite!(
    [
        a_user_with_only_cap_net_admin_serves_marked_and_transparent_rules,
        upload_and_download_rates_cap_each_direction_with_backpressure,
    ],
    std_engine: ["--engine", "std"],
    tokio_engine: ["--engine", "tokio"],
    uring_copy: ["--engine", "uring", "--mode", "copy"],
    uring_splice: ["--engine", "uring", "--mode", "splice"],
    uring_auto: ["--engine", "uring", "--mode", "auto"],
);

mod netns_suite {
    crate::support::engine_suite!(
        netns: [
            transparent_connects_from_the_client_address,
            source_mark_and_interface_steer_upstream_connections,
            mptcp_on_both_sides_and_plain_tcp_alike,
        ],
        std_engine: ["--engine", "std"],
        tokio_engine: ["--engine", "tokio"],
        uring_copy: ["--engine", "uring", "--mode", "copy"],
        uring_splice: ["--engine", "uring", "--mode", "splice"],
        uring_auto: ["--engine", "uring", "--mode", "auto"],
    );
}

/// A fast active health check that takes a member out at its first failed probe.
const CHECKED: &str = "[rule.health_check]\ninterval = \"100ms\"\nfall = 1";

/// Bytes each exchange sends through the forwarder and gets back from the echo backend.
const PAYLOAD: usize = 256 << 10;

/// `SOL_TCP` option: 1 on an MPTCP socket whose connection is MPTCP, 0 once it fell back to
/// TCP (or on a TCP socket).
const TCP_IS_MPTCP: libc::c_int = 43;

/// Runs `ip netns exec NS ARGS`.
fn ns_exec(ns: &Netns, args: &[&str]) {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ip netns exec {args:?}: {e}"));
    assert!(
        out.status.success(),
        "ip netns exec {} {}: {}",
        ns.name,
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Each connection a backend accepted: its (local, peer) addresses.
type Seen = Arc<Mutex<Vec<(SocketAddr, SocketAddr)>>>;

/// An echo backend that records each connection's addresses.
fn recording_echo(on: Upstream) -> (Backend, Seen) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let backend = Backend::spawn_on(on, move |s: TcpStream| {
        let pair = (
            s.local_addr().expect("local address"),
            s.peer_addr().expect("peer address"),
        );
        log.lock().expect("log").push(pair);
        echo(s);
    });
    (backend, seen)
}

/// Sends `PAYLOAD` bytes (after `preamble`) through `s` to an echo backend and checks that
/// exactly those bytes come back, then EOF.
fn exact_round_trip(mut s: TcpStream, preamble: &[u8], seed: u64) {
    s.set_read_timeout(Some(STEP_TIMEOUT)).expect("timeout");
    s.set_write_timeout(Some(STEP_TIMEOUT)).expect("timeout");
    s.write_all(preamble).expect("preamble");
    let mut w = s.try_clone().expect("clone");
    let sender = std::thread::spawn(move || {
        let h = data::send_payload(&mut w, seed, PAYLOAD);
        w.shutdown(Shutdown::Write).expect("shutdown");
        h
    });
    let (n, got) = data::hash_to_eof(&mut s);
    let sent = sender.join().expect("sender");
    assert_eq!(n, PAYLOAD as u64, "bytes back");
    assert_eq!(got, sent, "the bytes that came back are not the bytes sent");
}

/// Whether a connection through `addr` reaches the echo backend: 16 bytes there and back.
fn served(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, STEP_TIMEOUT) else {
        return false;
    };
    s.set_read_timeout(Some(STEP_TIMEOUT)).expect("timeout");
    if s.write_all(b"0123456789abcdef").is_err() {
        return false;
    }
    let mut back = [0u8; 16];
    s.read_exact(&mut back).is_ok() && &back == b"0123456789abcdef"
}

fn rule(name: &str, listen: &str, upstream: SocketAddr, extra: &str) -> String {
    format!(
        "[[rule]]\nname = \"{name}\"\nlisten = \"{listen}\"\nupstream = \"{upstream}\"\n{extra}\n"
    )
}

/// Client, forwarder and backend in three namespaces:
/// `client 198.18.1.2 — 198.18.1.1 forwarder 198.18.2.1 — 198.18.2.2 backend`.
/// The backend routes 198.18.1.0/24 back through the forwarder, which delivers the replies
/// to its transparent sockets by policy routing.
struct Triangle {
    client: Netns,
    relay: Netns,
    backend: Netns,
}

impl Triangle {
    const CLIENT: &'static str = "198.18.1.2";
    const RELAY_FRONT: &'static str = "198.18.1.1";
    const BACKEND: &'static str = "198.18.2.2";

    fn new() -> Self {
        let (client, relay, backend) = (Netns::new(), Netns::new(), Netns::new());
        relay.ip(&[
            "link",
            "add",
            "rfrc",
            "type",
            "veth",
            "peer",
            "name",
            "rfcr",
            "netns",
            &client.name,
        ]);
        relay.ip(&[
            "link",
            "add",
            "rfrb",
            "type",
            "veth",
            "peer",
            "name",
            "rfbr",
            "netns",
            &backend.name,
        ]);
        relay.ip(&["addr", "add", "198.18.1.1/24", "dev", "rfrc"]);
        relay.ip(&["addr", "add", "198.18.2.1/24", "dev", "rfrb"]);
        client.ip(&["addr", "add", "198.18.1.2/24", "dev", "rfcr"]);
        backend.ip(&["addr", "add", "198.18.2.2/24", "dev", "rfbr"]);
        for (ns, dev) in [
            (&relay, "rfrc"),
            (&relay, "rfrb"),
            (&client, "rfcr"),
            (&backend, "rfbr"),
        ] {
            ns.ip(&["link", "set", dev, "up"]);
        }
        backend.ip(&["route", "add", "198.18.1.0/24", "via", "198.18.2.1"]);
        // The same for IPv6 (`nodad`: usable at once).
        for (ns, addr, dev) in [
            (&relay, "fd52::1/64", "rfrc"),
            (&relay, "fd53::1/64", "rfrb"),
            (&client, "fd52::2/64", "rfcr"),
            (&backend, "fd53::2/64", "rfbr"),
        ] {
            ns.ip(&["-6", "addr", "add", addr, "dev", dev, "nodad"]);
        }
        backend.ip(&["-6", "route", "add", "fd52::/64", "via", "fd53::1"]);
        // The host recipe of docs/DEPLOY.md, for each family: packets for a transparent
        // socket are marked and routed to the local stack, although their destination is not
        // one of ours.
        for (tables, family, all) in [("iptables", "-4", "0.0.0.0/0"), ("ip6tables", "-6", "::/0")]
        {
            let mark =
                "-t mangle -A PREROUTING -p tcp -m socket --transparent -j MARK --set-mark 1";
            let mut argv = vec![tables];
            argv.extend(mark.split(' '));
            ns_exec(&relay, &argv);
            relay.ip(&[family, "rule", "add", "fwmark", "1", "lookup", "100"]);
            relay.ip(&[
                family, "route", "add", "local", all, "dev", "lo", "table", "100",
            ]);
        }
        Self {
            client,
            relay,
            backend,
        }
    }
}

/// `transparent = true`: the backend sees the client's own address (and, with
/// `accept_proxy`, the address the trusted PROXY header named), data exact both ways; over
/// IPv6 too (`IPV6_TRANSPARENT`), where an SNI route of the rule inherits the key.
fn transparent_connects_from_the_client_address(engine: &[&str]) {
    let _load = support::light();
    let t = Triangle::new();
    let backend_addr: SocketAddr = format!("{}:0", Triangle::BACKEND).parse().unwrap();
    let (backend, seen) = recording_echo(t.backend.run(|| Upstream::bind_on(backend_addr)));
    let (backend6, seen6) = recording_echo(
        t.backend
            .run(|| Upstream::bind_on("[fd53::2]:0".parse().unwrap())),
    );
    let listen = format!("{}:0", Triangle::RELAY_FRONT);
    let rules = [
        rule("direct", &listen, backend.addr(), "transparent = true"),
        rule(
            "proxied",
            &listen,
            backend.addr(),
            "transparent = true\naccept_proxy = true\nproxy_trusted = [\"198.18.1.0/24\"]",
        ),
        format!(
            "[[rule]]\nname = \"six\"\nlisten = \"[fd52::1]:0\"\ntransparent = true\n\
             [[rule.route]]\nsni = [\"six.example\"]\nupstream = \"{}\"\n",
            backend6.addr()
        ),
    ]
    .concat();
    let relay = {
        let _inside = t.relay.enter();
        Relay::start_config(engine, &rules, 3)
    };
    let client_ip: IpAddr = Triangle::CLIENT.parse().unwrap();

    // 1. Straight from the client.
    let s = t
        .client
        .run(|| TcpStream::connect_timeout(&relay.addr_of("direct"), STEP_TIMEOUT))
        .expect("connect to the forwarder");
    let client_addr = s.local_addr().unwrap();
    exact_round_trip(s, b"", 1);
    let (_, peer) = *seen
        .lock()
        .unwrap()
        .last()
        .expect("the backend saw no connection");
    assert_eq!(
        peer.ip(),
        client_ip,
        "the backend saw {peer}, not the client"
    );
    assert_ne!(
        peer, client_addr,
        "the port is the forwarder's own, not the client's"
    );

    // 2. Behind a load balancer: the PROXY header's source is the client.
    let named: SocketAddr = "198.18.1.77:40000".parse().unwrap();
    let to = relay.addr_of("proxied");
    let s = t
        .client
        .run(|| TcpStream::connect_timeout(&to, STEP_TIMEOUT))
        .expect("connect to the forwarder");
    exact_round_trip(s, &support::edge::v1_header(named, to), 2);
    let (_, peer) = *seen.lock().unwrap().last().unwrap();
    assert_eq!(
        peer.ip(),
        named.ip(),
        "the backend saw {peer}, not the PROXY header's client"
    );
    assert_eq!(seen.lock().unwrap().len(), 2);

    // 3. IPv6, through a route that inherits transparent from its rule.
    let c6: IpAddr = "fd52::2".parse().unwrap();
    let to = relay.addr_of("six");
    let s = t
        .client
        .run(|| TcpStream::connect_timeout(&to, STEP_TIMEOUT))
        .expect("connect to the forwarder over IPv6");
    let mut s = s;
    s.set_read_timeout(Some(STEP_TIMEOUT)).unwrap();
    let hello = tls_client_hello("six.example");
    s.write_all(&hello).expect("hello");
    let mut back = vec![0u8; hello.len()];
    s.read_exact(&mut back).expect("the hello back");
    assert_eq!(back, hello);
    exact_round_trip(s, b"", 3);
    let (_, peer) = *seen6
        .lock()
        .unwrap()
        .last()
        .expect("the v6 backend saw nothing");
    assert_eq!(peer.ip(), c6, "the v6 backend saw {peer}, not the client");
}

/// `source`, `mark` and `interface` on one forwarder, each in a rule and in a route: only the
/// rules with the option reach the backend (the routes for them exist only for marked or
/// device-bound sockets), the backend sees `source`; an unknown device in a reload is refused
/// with its key named while every rule keeps serving.
fn source_mark_and_interface_steer_upstream_connections(engine: &[&str]) {
    let _load = support::light();
    let link = Link::veth();
    // The backend answers on 198.18.9.9 (only reachable through the policy tables below) and
    // on its link address.
    link.b.ip(&["addr", "add", "198.18.9.9/32", "dev", "lo"]);
    // The main table sends 198.18.9.0/24 into a dead end: a veth pair whose other end has
    // no address (this kernel may lack the dummy device), so nothing answers there.
    link.a.ip(&[
        "link", "add", "rfd0", "type", "veth", "peer", "name", "rfd1",
    ]);
    link.a.ip(&["link", "set", "rfd0", "up"]);
    link.a.ip(&["link", "set", "rfd1", "up"]);
    link.a.ip(&["route", "add", "198.18.9.0/24", "dev", "rfd0"]);
    // Marked sockets: table 107; sockets bound to the link's device: table 110.
    link.a.ip(&["rule", "add", "fwmark", "7", "lookup", "107"]);
    link.a.ip(&[
        "route",
        "add",
        "198.18.9.0/24",
        "via",
        Link::B_ADDR,
        "table",
        "107",
    ]);
    link.a.ip(&["rule", "add", "oif", "rfa", "lookup", "110"]);
    link.a.ip(&[
        "route",
        "add",
        "198.18.9.0/24",
        "via",
        Link::B_ADDR,
        "dev",
        "rfa",
        "table",
        "110",
    ]);
    // A second address of the forwarder's, for `source`.
    link.a.ip(&["addr", "add", "198.18.0.9/24", "dev", "rfa"]);

    let (backend, seen) = recording_echo(
        link.b
            .run(|| Upstream::bind_on("0.0.0.0:0".parse().unwrap())),
    );
    let port = backend.addr().port();
    let hidden: SocketAddr = format!("198.18.9.9:{port}").parse().unwrap();
    let direct = Link::b_addr(port);
    let listen = "127.0.0.1:0";
    let config = |interface: &str| {
        [
            "admin = \"127.0.0.1:0\"\n".to_string(),
            rule(
                "plain",
                listen,
                hidden,
                "connect_timeout = \"300ms\"\nconnect_retries = 0",
            ),
            rule("marked", listen, hidden, &format!("mark = 7\n{CHECKED}")),
            rule(
                "bound",
                listen,
                hidden,
                &format!("interface = \"{interface}\"\n{CHECKED}"),
            ),
            rule("sourced", listen, direct, "source = \"198.18.0.9\""),
            // A route inherits the rule's keys and may add its own: the rule's pool is
            // unmarked and lost, the route's pool marked.
            format!(
                "[[rule]]\nname = \"routed\"\nlisten = \"{listen}\"\nsource = \"198.18.0.9\"\n\
                 [[rule.route]]\nsni = [\"example.com\"]\nupstream = \"{hidden}\"\nmark = 7\n"
            ),
        ]
        .concat()
    };
    let file = TempFile::new("egress", &config("rfa"));
    let path = file.path.display().to_string();
    let mut args = vec!["run", "--config", path.as_str()];
    args.extend_from_slice(engine);
    let _inside = link.a.enter();
    let relay = Relay::try_spawn(&args, 5).unwrap_or_else(|f| panic!("ringfwd {args:?}: {f}"));

    let b_ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert!(
        !served(relay.addr_of("plain")),
        "without a mark or device the backend is unreachable"
    );
    assert!(
        served(relay.addr_of("marked")),
        "mark = 7 did not take the marked route"
    );
    assert!(
        served(relay.addr_of("bound")),
        "interface = \"rfa\" did not take the device's route"
    );
    let s = TcpStream::connect_timeout(&relay.addr_of("sourced"), STEP_TIMEOUT).expect("connect");
    exact_round_trip(s, b"", 3);
    // Health probes of the other pools connect too: find the data connections by address.
    let saw = |local: SocketAddr, peer: &str| {
        seen.lock()
            .unwrap()
            .iter()
            .any(|&(l, p)| l == local && p.ip() == b_ip(peer))
    };
    assert!(
        saw(direct, "198.18.0.9"),
        "source = did not bind the upstream connection: {:?}",
        seen.lock().unwrap()
    );
    let sni = tls_client_hello("example.com");
    let mut s =
        TcpStream::connect_timeout(&relay.addr_of("routed"), STEP_TIMEOUT).expect("connect");
    s.set_read_timeout(Some(STEP_TIMEOUT)).unwrap();
    s.write_all(&sni).expect("hello");
    let mut back = vec![0u8; sni.len()];
    s.read_exact(&mut back)
        .expect("the route's marked pool did not answer");
    assert_eq!(back, sni);
    assert!(
        saw(hidden, "198.18.0.9"),
        "the route did not inherit the rule's source: {:?}",
        seen.lock().unwrap()
    );
    // Health probes leave as the pool's connections do: they pass, and none fails.
    let checks = |rule: &str, result: &str| {
        support::edge::metrics(&relay).sum(
            "ringfwd_health_checks_total",
            &[("rule", rule), ("result", result)],
        )
    };
    assert!(
        support::eventually(STEP_TIMEOUT, || checks("marked", "ok") >= 3.0
            && checks("bound", "ok") >= 3.0),
        "the health probes of the marked and bound pools did not pass"
    );
    assert_eq!(
        checks("marked", "fail") + checks("bound", "fail"),
        0.0,
        "a health probe took another path than the pool's connections"
    );

    // A reload naming a device this host lacks is refused, naming the key; every rule serves
    // on as before.
    std::fs::write(&file.path, config("rfnope0")).expect("rewrite the config");
    kill(Pid::from_raw(relay.pid()), Signal::SIGHUP).expect("SIGHUP");
    let line = support::wait_for_line(&relay, "config reload failed", STEP_TIMEOUT);
    assert!(
        line.contains("rule \"bound\": interface = \"rfnope0\": no such network device"),
        "{line}"
    );
    for name in ["marked", "bound", "sourced"] {
        assert!(
            served(relay.addr_of(name)),
            "rule {name} stopped serving after a refused reload"
        );
    }
}

/// `mptcp = true` listens with MPTCP and serves MPTCP and plain TCP clients alike;
/// `upstream_mptcp = true` connects with MPTCP (the backend's accepted socket is MPTCP) and
/// falls back to TCP against a plain backend. Run in a fresh namespace, whose
/// `net.mptcp.enabled` is checked first; there a kernel with MPTCP switched off makes both
/// keys a start-up error naming them.
fn mptcp_on_both_sides_and_plain_tcp_alike(engine: &[&str]) {
    let _load = support::light();
    let ns = Netns::new();
    let _inside = ns.enter();
    let sysctl = std::fs::read_to_string("/proc/sys/net/mptcp/enabled")
        .expect("this kernel has no MPTCP (/proc/sys/net/mptcp/enabled is missing)");
    assert_eq!(sysctl.trim(), "1", "MPTCP is disabled in a fresh namespace");

    let mptcp_listener = || {
        let s =
            Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::MPTCP)).expect("MPTCP socket");
        s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .expect("bind");
        Upstream::from_socket(s)
    };
    let is_mptcp = Arc::new(Mutex::new(Vec::new()));
    let log = is_mptcp.clone();
    let mptcp_backend = Backend::spawn_on(mptcp_listener(), move |s: TcpStream| {
        log.lock().unwrap().push(tcp_is_mptcp(&s));
        echo(s);
    });
    let plain_backend = Backend::echo();
    let rules = [
        rule(
            "listen",
            "127.0.0.1:0",
            plain_backend.addr(),
            "mptcp = true",
        ),
        rule(
            "up",
            "127.0.0.1:0",
            mptcp_backend.addr(),
            "upstream_mptcp = true",
        ),
        rule(
            "fallback",
            "127.0.0.1:0",
            plain_backend.addr(),
            "upstream_mptcp = true",
        ),
        rule("tcp", "127.0.0.1:0", mptcp_backend.addr(), ""),
    ]
    .concat();
    let relay = Relay::start_config(engine, &rules, 4);

    // Listen side: an MPTCP client gets MPTCP, a plain one plain TCP, both served exactly.
    let c = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::MPTCP)).expect("MPTCP socket");
    c.connect_timeout(&relay.addr_of("listen").into(), STEP_TIMEOUT)
        .expect("connect");
    let c: TcpStream = c.into();
    assert_eq!(
        tcp_is_mptcp(&c),
        1,
        "the forwarder's mptcp = true listener did not speak MPTCP"
    );
    exact_round_trip(c, b"", 4);
    let c = TcpStream::connect_timeout(&relay.addr_of("listen"), STEP_TIMEOUT).expect("connect");
    exact_round_trip(c, b"", 5);

    // Upstream side: MPTCP where the backend has it, a plain connection where it has not.
    let c = TcpStream::connect_timeout(&relay.addr_of("up"), STEP_TIMEOUT).expect("connect");
    exact_round_trip(c, b"", 6);
    let c = TcpStream::connect_timeout(&relay.addr_of("fallback"), STEP_TIMEOUT).expect("connect");
    exact_round_trip(c, b"", 7);
    let c = TcpStream::connect_timeout(&relay.addr_of("tcp"), STEP_TIMEOUT).expect("connect");
    exact_round_trip(c, b"", 8);
    assert_eq!(
        *is_mptcp.lock().unwrap(),
        vec![1, 0],
        "the backend's connections, MPTCP or not (upstream_mptcp = true, then without it)"
    );

    // MPTCP switched off in this namespace: each key is a start-up error naming it.
    std::fs::write("/proc/sys/net/mptcp/enabled", "0").expect("switch MPTCP off in the namespace");
    for (key, extra) in [
        ("mptcp", "mptcp = true"),
        ("upstream_mptcp", "upstream_mptcp = true"),
    ] {
        let file = TempFile::new(
            "egress-mptcp",
            &rule("r", "127.0.0.1:0", plain_backend.addr(), extra),
        );
        let path = file.path.display().to_string();
        let mut args = vec!["run", "--config", path.as_str()];
        args.extend_from_slice(engine);
        let failed = match Relay::try_spawn(&args, 1) {
            Ok(_) => panic!("{key} = true started with MPTCP disabled"),
            Err(f) => f,
        };
        assert!(
            failed.stderr.contains(&format!(
                "rule \"r\": {key} = true: this kernel refuses MPTCP"
            )) && failed.stderr.contains("net.mptcp.enabled"),
            "{}",
            failed.stderr
        );
    }
}

/// What deploy/systemd/net-admin.conf sets up: the unprivileged user with `CAP_NET_ADMIN`
/// as its one ambient capability (here through util-linux's `setpriv`). The forwarder starts
/// with `mark` and `transparent` rules, serves, and every thread holds exactly that
/// capability: effective, permitted and ambient sets all `CAP_NET_ADMIN` alone.
fn a_user_with_only_cap_net_admin_serves_marked_and_transparent_rules(engine: &[&str]) {
    let _load = support::light();
    if !support::root_or_skip("capability") {
        return;
    }
    let backend = Backend::echo();
    let conf = [
        rule("marked", "127.0.0.1:0", backend.addr(), "mark = 7"),
        // A loopback client and backend: the client's address is one of ours, so no policy
        // routing is needed for the replies.
        rule(
            "transparent",
            "127.0.0.1:0",
            backend.addr(),
            "transparent = true",
        ),
    ]
    .concat();
    let file = TempFile::new("egress-caps", &conf);
    std::fs::set_permissions(
        &file.path,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .expect("chmod");
    let path = file.path.display().to_string();
    let mut args = vec!["run", "--config", path.as_str()];
    args.extend_from_slice(engine);
    let (uid, gid) = support::nobody();
    let mut cmd = Command::new("setpriv");
    cmd.args([
        &format!("--reuid={uid}"),
        &format!("--regid={gid}"),
        "--clear-groups",
        "--inh-caps=-all,+net_admin",
        "--ambient-caps=-all,+net_admin",
        "--bounding-set=-all,+net_admin",
        "--",
        relay::BIN,
    ])
    .args(&args);
    let relay = Relay::try_spawn_command(cmd, &args, 2)
        .unwrap_or_else(|f| panic!("ringfwd as nobody with CAP_NET_ADMIN: {f}"));
    for name in ["marked", "transparent"] {
        assert!(served(relay.addr_of(name)), "rule {name} did not serve");
    }
    let net_admin = 1u64 << 12;
    let tasks = std::fs::read_dir(format!("/proc/{}/task", relay.pid())).expect("tasks");
    let mut checked = 0;
    for task in tasks.flatten() {
        // A thread may end between the listing and the read (the std engine's connection
        // threads do): it has no capabilities left to check.
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        checked += 1;
        for key in ["CapEff:", "CapPrm:", "CapAmb:"] {
            let v = status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| u64::from_str_radix(v.trim(), 16).expect("hex"))
                .unwrap_or_else(|| panic!("no {key} in {status}"));
            assert_eq!(v, net_admin, "{key} of thread {:?}", task.file_name());
        }
    }
    assert!(checked > 0, "no thread of the forwarder could be read");
}

/// `upload_rate` and `download_rate` hold each direction of one connection to its cap over a
/// 10 s window (within ±10 %), while both ends send as fast as they can: the client's sends
/// and the backend's are held back by TCP flow control (what each has written never runs
/// more than a few socket buffers ahead of what the other end received), not buffered by
/// the forwarder. The rate is what is under test here, so the window is measured in time.
fn upload_and_download_rates_cap_each_direction_with_backpressure(engine: &[&str]) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let _load = support::light();
    const UP: u64 = 1 << 20;
    const DOWN: u64 = 2 << 20;
    const WINDOW: Duration = Duration::from_secs(10);
    // Bytes written but not yet received that three socket buffers and a relay buffer can
    // hold; a forwarder that buffered instead of pushing back would run gigabytes ahead.
    const SLACK: u64 = 64 << 20;
    // How much more may be in flight in the window's second half than in its first.
    const GROWTH: u64 = 4 << 20;
    let stop = Arc::new(AtomicBool::new(false));
    // [client wrote, backend received, backend wrote, client received]
    let counts: Arc<[AtomicU64; 4]> = Arc::new(Default::default());
    let pump = |mut s: TcpStream,
                wrote: usize,
                read: usize,
                counts: Arc<[AtomicU64; 4]>,
                stop: Arc<AtomicBool>| {
        let mut w = s.try_clone().expect("clone");
        let (c, st) = (counts.clone(), stop.clone());
        let writer = std::thread::spawn(move || {
            let chunk = vec![0x5au8; 64 << 10];
            while !st.load(Ordering::Acquire) {
                // A write held back past the timeout is the backpressure under test: retry.
                match w.write(&chunk) {
                    Ok(n) => c[wrote].fetch_add(n as u64, Ordering::AcqRel),
                    Err(e) if is_timeout(&e) => continue,
                    Err(_) => break,
                };
            }
            let _ = w.shutdown(Shutdown::Write);
        });
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => counts[read].fetch_add(n as u64, Ordering::AcqRel),
                Err(e) if is_timeout(&e) && !stop.load(Ordering::Acquire) => continue,
                Err(_) => break,
            };
        }
        let _ = writer.join();
    };
    let backend = {
        let (counts, stop) = (counts.clone(), stop.clone());
        Backend::spawn(move |s: TcpStream| {
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            s.set_write_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            pump(s, 2, 1, counts.clone(), stop.clone());
        })
    };
    let conf = rule(
        "capped",
        "127.0.0.1:0",
        backend.addr(),
        "upload_rate = \"1MiB/s\"\ndownload_rate = \"2MiB/s\"",
    );
    let relay = Relay::start_config(engine, &conf, 1);
    let client = TcpStream::connect_timeout(&relay.addr(), STEP_TIMEOUT).expect("connect");
    client
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    client
        .set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let pumping = {
        let (counts, stop) = (counts.clone(), stop.clone());
        std::thread::spawn(move || pump(client, 0, 3, counts, stop))
    };
    let read = |i: usize| counts[i].load(Ordering::Acquire);
    // The first second fills the buffers on the way; the window starts after it.
    std::thread::sleep(Duration::from_secs(1));
    let (up0, down0) = (read(1), read(3));
    let started = std::time::Instant::now();
    let gap = || {
        read(0)
            .saturating_sub(read(1))
            .max(read(2).saturating_sub(read(3)))
    };
    let (mut widest, mut half_way) = (0u64, None);
    while started.elapsed() < WINDOW {
        std::thread::sleep(Duration::from_millis(250));
        widest = widest.max(gap());
        if half_way.is_none() && started.elapsed() >= WINDOW / 2 {
            half_way = Some(widest);
        }
    }
    let half_way = half_way.expect("the window's middle");
    let secs = started.elapsed().as_secs_f64();
    let (up, down) = (read(1) - up0, read(3) - down0);
    stop.store(true, Ordering::Release);
    let _ = pumping.join();
    let up_ratio = up as f64 / secs / UP as f64;
    let down_ratio = down as f64 / secs / DOWN as f64;
    eprintln!(
        "upload {up_ratio:.3} x cap, download {down_ratio:.3} x cap, most in flight {half_way} B in the first half, {widest} B in all"
    );
    assert!(
        (0.9..=1.1).contains(&up_ratio),
        "upload ran at {up_ratio:.3} x upload_rate"
    );
    assert!(
        (0.9..=1.1).contains(&down_ratio),
        "download ran at {down_ratio:.3} x download_rate"
    );
    // Bounded, and not growing: a forwarder that buffered would add megabytes a second.
    assert!(
        widest < SLACK,
        "a sender ran {widest} bytes ahead of its receiver: no backpressure"
    );
    assert!(
        widest - half_way < GROWTH,
        "the bytes in flight grew from {half_way} to {widest} in the window's second half"
    );
}

/// A socket timeout: `WouldBlock` or `TimedOut`, whichever the platform reports.
fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// `getsockopt(SOL_TCP, TCP_IS_MPTCP)`.
fn tcp_is_mptcp(s: &TcpStream) -> i32 {
    let mut v: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for the call and `len` is `v`'s size.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_TCP,
            TCP_IS_MPTCP,
            (&raw mut v).cast(),
            &raw mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_IS_MPTCP: {}", std::io::Error::last_os_error());
    v
}

/// A minimal TLS ClientHello carrying `name` as its server name.
fn tls_client_hello(name: &str) -> Vec<u8> {
    let name = name.as_bytes();
    let mut sni = Vec::new();
    let list_len = name.len() + 3;
    sni.extend_from_slice(&[0x00, 0x00]); // extension type: server_name
    sni.extend_from_slice(&u16::try_from(list_len + 2).unwrap().to_be_bytes());
    sni.extend_from_slice(&u16::try_from(list_len).unwrap().to_be_bytes());
    sni.push(0); // host_name
    sni.extend_from_slice(&u16::try_from(name.len()).unwrap().to_be_bytes());
    sni.extend_from_slice(name);
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[0u8; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // one cipher suite
    body.extend_from_slice(&[0x01, 0x00]); // null compression
    body.extend_from_slice(&u16::try_from(sni.len()).unwrap().to_be_bytes());
    body.extend_from_slice(&sni);
    let mut hs = vec![0x01];
    hs.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&u16::try_from(hs.len()).unwrap().to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

/// `ringfwd check` shows every key with its effective value, a route's inherited ones
/// included.
#[test]
fn check_shows_the_upstream_side_keys() {
    // `check` probes the options on this host: mark and transparent need CAP_NET_ADMIN.
    if !support::root_or_skip("capability") {
        return;
    }
    let conf = "[[rule]]\nname = \"r\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n\
                mptcp = true\nmark = 7\ninterface = \"lo\"\nupstream_mptcp = true\ntransparent = true\n\
                [[rule.route]]\nsni = [\"a.example\"]\nupstream = \"127.0.0.1:10\"\nsource = \"127.0.0.1\"\n";
    let file = TempFile::new("egress-check", conf);
    let path = file.path.display().to_string();
    let out = run_to_exit(&["check", "--config", &path]);
    assert!(out.status.success(), "{}", out.stderr);
    for line in [
        "mptcp = true",
        "transparent = true",
        "mark = 7",
        "interface = \"lo\"",
        "upstream_mptcp = true",
        "source = \"127.0.0.1\"",
        "# source: each client's own address (transparent)",
    ] {
        assert!(
            out.stdout.lines().any(|l| l == line),
            "no {line:?} in:\n{}",
            out.stdout
        );
    }
    // The route: its own source, the rule's mark, and transparent off (source wins).
    let route = out
        .stdout
        .split("[[rule.route]]")
        .nth(1)
        .expect("the route");
    for line in ["transparent = false", "mark = 7", "source = \"127.0.0.1\""] {
        assert!(
            route.lines().any(|l| l == line),
            "no {line:?} in the route:\n{route}"
        );
    }
}

/// What the host refuses is one line naming the rule and the key, from `check` and `run`:
/// an unknown device; a mark or `transparent` without `CAP_NET_ADMIN` (run as nobody); a
/// source the host does not own. And `user` with a key that needs `CAP_NET_ADMIN`.
#[test]
fn the_host_refusing_an_option_is_one_line_naming_it() {
    let cases = [
        (
            "interface = \"rfnope0\"",
            "rule \"r\": interface = \"rfnope0\": no such network device",
        ),
        (
            "source = \"192.0.2.77\"",
            "rule \"r\": source = \"192.0.2.77\": cannot bind",
        ),
        ("mark = 0", "mark: must be 1..=4294967295, got 0"),
        ("source = \"0.0.0.0\"", "source: 0.0.0.0 is not an address"),
        (
            "interface = \"a/b\"",
            "interface: \"a/b\" is not a network device name",
        ),
        (
            "transparent = true\nsource = \"127.0.0.1\"",
            "source: cannot be set with transparent = true",
        ),
    ];
    for (extra, want) in cases {
        let file = TempFile::new(
            "egress-bad",
            &rule("r", "127.0.0.1:0", "127.0.0.1:9".parse().unwrap(), extra),
        );
        let path = file.path.display().to_string();
        let out = run_to_exit(&["check", "--config", &path]);
        assert!(!out.status.success(), "{extra}: check passed");
        assert!(
            out.stderr.contains(want),
            "{extra}: want {want:?} in:\n{}",
            out.stderr
        );
    }
    let file = TempFile::new(
        "egress-user",
        &format!(
            "user = \"nobody\"\n{}",
            rule(
                "r",
                "127.0.0.1:0",
                "127.0.0.1:9".parse().unwrap(),
                "mark = 3"
            )
        ),
    );
    let path = file.path.display().to_string();
    let out = run_to_exit(&["check", "--config", &path]);
    assert!(
        out.stderr.contains("mark: needs CAP_NET_ADMIN")
            && out.stderr.contains("AmbientCapabilities=CAP_NET_ADMIN"),
        "{}",
        out.stderr
    );

    // Without CAP_NET_ADMIN (as nobody): mark and transparent are refused at start, naming
    // the key and the capability.
    if !support::root_or_skip("capability") {
        return;
    }
    let (uid, gid) = support::nobody();
    for (extra, want) in [
        ("mark = 3", "rule \"r\": mark = 3: SO_MARK refused"),
        (
            "transparent = true",
            "rule \"r\": transparent = true: IP_TRANSPARENT refused",
        ),
    ] {
        let file = TempFile::new(
            "egress-cap",
            &rule("r", "127.0.0.1:0", "127.0.0.1:9".parse().unwrap(), extra),
        );
        std::fs::set_permissions(
            &file.path,
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .expect("chmod");
        let out = std::os::unix::process::CommandExt::uid(
            std::os::unix::process::CommandExt::gid(&mut Command::new(relay::BIN), gid),
            uid,
        )
        .args(["check", "--config", &file.path.display().to_string()])
        .output()
        .expect("spawn check as nobody");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{extra}: check passed without CAP_NET_ADMIN"
        );
        assert!(
            stderr.contains(want) && stderr.contains("CAP_NET_ADMIN"),
            "{extra}: want {want:?} in:\n{stderr}"
        );
    }
}
