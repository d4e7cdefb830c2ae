//! The pipeline without sockets: admission, dialing with failover, the end of a session.

use super::*;
use crate::config::{Config, MemberSpec, Upstream};
use crate::metrics::{Metrics, Shard};
use std::num::NonZeroU32;
use std::time::Duration;

fn config(members: &[&str], retries: u32, cap: u32) -> Config {
    let mut c = Config::parse(
        "t.toml",
        "[[rule]]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n",
    )
    .expect("base config");
    let specs = members
        .iter()
        .map(|m| MemberSpec::new(*m, vec![m.parse().unwrap()]))
        .collect();
    let mut up = Upstream::with_members(specs);
    up.connect_retries = retries;
    c.rules[0].upstream = Some(up);
    c.rules[0].max_connections = NonZeroU32::new(cap).unwrap();
    c
}

/// Ends session `s` as an engine does after its relay: `reason`, `bytes` relayed.
fn end(
    mut s: Session,
    r: &RuleRuntime,
    m: &Metrics,
    shard: &Shard,
    reason: CloseReason,
    bytes: [u64; 2],
) {
    let sink = m.sink(shard);
    let closing = s.on_relay_ended(End::copied(reason, bytes));
    s.close(closing, &Cx::shared(r, &sink), Instant::now());
}

/// An accepted connection from `peer` (alive, on a single-port listener).
fn at(peer: Option<SocketAddr>) -> Accepted {
    Accepted {
        peer,
        dead: false,
        port: 0,
    }
}

fn setup(members: &[&str], retries: u32, cap: u32) -> (Arc<Runtime>, Arc<Metrics>) {
    let c = config(members, retries, cap);
    (Runtime::new(&c), Metrics::new(&["r"], 1))
}

#[test]
fn max_connections_holds_on_every_engine_through_one_gate() {
    let (rt, m) = setup(&["127.0.0.1:1"], 2, 2);
    let (r, shard) = (rt.rule(0), m.rule(0).shard(0));
    let now = Instant::now();
    // 1. Two sessions fit, the third is turned away and counted.
    let a = r.admit(shard, at(None), now, false).unwrap();
    let _b = r.admit(shard, at(None), now, false).unwrap();
    assert_eq!(
        r.admit(shard, at(None), now, false).unwrap_err(),
        RejectReason::MaxConnections
    );
    assert_eq!(r.live(), 2);
    // 2. One ends: there is room again.
    end(a, r, &m, shard, CloseReason::Eof, [0, 0]);
    assert!(r.admit(shard, at(None), now, false).is_ok());
    // 3. While draining, nothing is admitted.
    assert_eq!(
        r.admit(shard, at(None), now, true).unwrap_err(),
        RejectReason::Shutdown
    );
    let s = m.rule(0).snapshot();
    assert_eq!(s.accepted, 3);
    assert_eq!(s.rejected[RejectReason::MaxConnections as usize], 1);
    assert_eq!(s.rejected[RejectReason::Shutdown as usize], 1);
}

#[test]
fn a_session_stays_small() {
    // Every live connection holds one (the io_uring engine's slab entry among them), and it
    // is built and closed on every connection: what only a preamble needs is boxed, the
    // current member is the last one tried. 136 bytes before both.
    assert!(
        std::mem::size_of::<Session>() <= 120,
        "Session grew to {} bytes",
        std::mem::size_of::<Session>()
    );
}

#[test]
fn failover_tries_each_member_once_up_to_the_retry_budget() {
    let (rt, m) = setup(
        &["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4"],
        2,
        10,
    );
    let (r, shard) = (rt.rule(0), m.rule(0).shard(0));
    let now = Instant::now();
    let mut picker = r.pickers(1);
    let mut s = r.admit(shard, at(None), now, false).unwrap();
    let mut seen = Vec::new();
    // connect_retries = 2: three attempts, three different members, then the end.
    loop {
        match s.dial(r, &mut picker[..], now) {
            Dial::Connect(addr) => {
                assert!(!seen.contains(&addr), "{addr} tried twice");
                seen.push(addr);
                s.connect_failed(r, shard, libc::ECONNREFUSED, now);
            }
            Dial::GiveUp(reason) => {
                assert_eq!(reason, CloseReason::Upstream(ConnectError::Refused));
                break;
            }
        }
    }
    assert_eq!(seen.len(), 3);
    assert_eq!(s.attempts(), 3);
    let snap = m.rule(0).snapshot();
    assert_eq!(snap.connect_errors[ConnectError::Refused as usize], 3);
    // Each failed member counted its own error (and was taken out: max_fails = 1).
    let members = r.pools[0].pool.snapshot(now);
    let failed: u64 = members.iter().map(|m| m.connect_errors[0]).sum();
    assert_eq!(failed, 3);
    assert_eq!(members.iter().filter(|m| !m.up).count(), 3);
}

#[test]
fn a_timed_out_connect_gives_up_as_a_connect_timeout() {
    let (rt, m) = setup(&["127.0.0.1:1"], 5, 10);
    let (r, shard) = (rt.rule(0), m.rule(0).shard(0));
    let now = Instant::now();
    let mut picker = r.pickers(1);
    let mut s = r.admit(shard, at(None), now, false).unwrap();
    assert!(matches!(s.dial(r, &mut picker[..], now), Dial::Connect(_)));
    s.connect_failed(r, shard, libc::ECANCELED, now);
    // One member: retries never exceed the members.
    assert_eq!(
        s.dial(r, &mut picker[..], now),
        Dial::GiveUp(CloseReason::Upstream(ConnectError::Timeout))
    );
}

#[test]
fn out_of_fds_ends_the_session_but_a_foreign_family_fails_over() {
    let (rt, m) = setup(&["[::1]:1", "127.0.0.1:2"], 2, 10);
    let (r, shard) = (rt.rule(0), m.rule(0).shard(0));
    let now = Instant::now();
    let mut picker = r.pickers(1);
    let mut s = r.admit(shard, at(None), now, false).unwrap();
    assert!(matches!(s.dial(r, &mut picker[..], now), Dial::Connect(_)));
    assert_eq!(s.socket_failed(r, shard, libc::EAFNOSUPPORT, now), None);
    assert!(matches!(s.dial(r, &mut picker[..], now), Dial::Connect(_)));
    assert_eq!(
        s.socket_failed(r, shard, libc::EMFILE, now),
        Some(CloseReason::FdExhausted)
    );
    assert_eq!(
        m.rule(0).snapshot().rejected[RejectReason::FdExhausted as usize],
        1
    );
}

#[test]
fn finishing_releases_the_member_and_counts_cuts() {
    let (rt, m) = setup(&["127.0.0.1:1", "127.0.0.1:2"], 2, 10);
    let (r, shard) = (rt.rule(0), m.rule(0).shard(0));
    let now = Instant::now();
    let mut picker = r.pickers(1);
    let mut s = r.admit(shard, at(None), now, false).unwrap();
    let Dial::Connect(addr) = s.dial(r, &mut picker[..], now) else {
        panic!()
    };
    s.connected(shard, now + Duration::from_millis(3));
    assert_eq!(s.upstream(), Some(addr));
    let member = |rt: &Runtime| {
        rt.rule(0).pools[0]
            .pool
            .snapshot(now)
            .into_iter()
            .find(|m| m.addr == addr)
            .unwrap()
    };
    assert_eq!(member(&rt).active, 1);
    assert_eq!(member(&rt).connections, 1);
    end(s, r, &m, shard, CloseReason::Shutdown, [1, 2]);
    assert_eq!(member(&rt).active, 0);
    assert_eq!(rt.cut(), 1);
    assert_eq!(rt.live(), 0);
    let snap = m.rule(0).snapshot();
    assert_eq!(snap.active, 0);
    assert_eq!(snap.upstream_connect.len(), 1);
}

fn cidrs(list: &[&str]) -> Vec<crate::vocab::Cidr> {
    list.iter().map(|c| c.parse().expect("cidr")).collect()
}

fn peer(s: &str) -> Option<SocketAddr> {
    Some(s.parse().unwrap())
}

#[test]
fn the_acl_and_per_client_limits_turn_connections_away_before_any_upstream_socket() {
    let mut c = config(&["127.0.0.1:1"], 2, 100);
    c.rules[0].admission.allow = cidrs(&["127.0.0.0/16"]);
    c.rules[0].admission.deny = cidrs(&["127.0.3.0/24"]);
    c.rules[0].admission.max_connections_per_ip = NonZeroU32::new(2);
    let rt = Runtime::new(&c);
    let m = Metrics::new(&["r"], 1);
    let (r, shard) = (rt.rule(0), m.rule(0).shard(0));
    let now = Instant::now();
    // 1. Denied, and outside the allow list.
    assert_eq!(
        r.admit(shard, at(peer("127.0.3.7:1000")), now, false)
            .unwrap_err(),
        RejectReason::Acl
    );
    assert_eq!(
        r.admit(shard, at(peer("127.1.0.1:1000")), now, false)
            .unwrap_err(),
        RejectReason::Acl
    );
    // 2. Two per address, a third is turned away; another address is not affected.
    let a = r
        .admit(shard, at(peer("127.0.1.1:1000")), now, false)
        .unwrap();
    let _b = r
        .admit(shard, at(peer("127.0.1.1:1001")), now, false)
        .unwrap();
    assert_eq!(
        r.admit(shard, at(peer("127.0.1.1:1002")), now, false)
            .unwrap_err(),
        RejectReason::PerIpLimit
    );
    assert!(
        r.admit(shard, at(peer("127.0.1.2:1000")), now, false)
            .is_ok()
    );
    // 3. A finished session gives its place back.
    end(a, r, &m, shard, CloseReason::Eof, [0, 0]);
    assert!(
        r.admit(shard, at(peer("127.0.1.1:1003")), now, false)
            .is_ok()
    );
    let s = m.rule(0).snapshot();
    assert_eq!(s.rejected[RejectReason::Acl as usize], 2);
    assert_eq!(s.rejected[RejectReason::PerIpLimit as usize], 1);
}

#[test]
fn accept_proxy_trusts_only_its_proxies_and_judges_the_client_from_the_header() {
    let mut c = config(&["127.0.0.1:1"], 2, 100);
    c.rules[0].accept_proxy = Some(crate::config::AcceptProxy {
        trusted: cidrs(&["127.0.0.2/32"]),
    });
    c.rules[0].admission.deny = cidrs(&["10.9.0.0/16"]);
    c.rules[0].proxy_protocol = crate::config::ProxyProtocol::V1;
    let rt = Runtime::new(&c);
    let m = Metrics::new(&["r"], 1);
    let (r, shard) = (rt.rule(0), m.rule(0).shard(0));
    let now = Instant::now();
    // 1. Not a trusted proxy: rejected before anything is read.
    assert_eq!(
        r.admit(shard, at(peer("127.0.0.3:5000")), now, false)
            .unwrap_err(),
        RejectReason::UntrustedProxy
    );
    // 2. The proxy's header names the client: it becomes the session's client, and the
    //    stream's first bytes after it are left for the relay.
    let mut s = r
        .admit(shard, at(peer("127.0.0.2:5000")), now, false)
        .unwrap();
    assert!(s.awaits_header());
    let wire = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 443\r\nGET /";
    assert_eq!(
        s.feed_header(r, shard, &wire[..10], now),
        HeaderStep::NeedMore
    );
    assert_eq!(
        s.feed_header(r, shard, wire, now),
        HeaderStep::Ready {
            consumed: wire.len() - 5
        }
    );
    assert_eq!(s.client, peer("192.0.2.7:40000"));
    // 3. ...and the header sent upstream carries the original client and destination.
    let mut out = [0u8; crate::session::proxy::V1_BUF_LEN];
    let n = s.upstream_header(r, &mut out);
    assert_eq!(
        &out[..n],
        b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 443\r\n"
    );
    // 4. A denied client behind a trusted proxy, a malformed header, a late one.
    let mut s = r
        .admit(shard, at(peer("127.0.0.2:5001")), now, false)
        .unwrap();
    let denied = b"PROXY TCP4 10.9.1.1 10.0.0.1 1 2\r\n";
    assert_eq!(
        s.feed_header(r, shard, denied, now),
        HeaderStep::Reject(RejectReason::Acl)
    );
    let mut s = r
        .admit(shard, at(peer("127.0.0.2:5002")), now, false)
        .unwrap();
    assert_eq!(
        s.feed_header(r, shard, b"GET / HTTP/1.1\r\n", now),
        HeaderStep::Reject(RejectReason::BadProxyHeader)
    );
    let mut s = r
        .admit(shard, at(peer("127.0.0.2:5003")), now, false)
        .unwrap();
    assert_eq!(
        s.header_failed(shard, true),
        CloseReason::Rejected(RejectReason::ProxyHeaderTimeout)
    );
    let snap = m.rule(0).snapshot();
    for (why, n) in [
        (RejectReason::UntrustedProxy, 1),
        (RejectReason::Acl, 1),
        (RejectReason::BadProxyHeader, 1),
        (RejectReason::ProxyHeaderTimeout, 1),
    ] {
        assert_eq!(snap.rejected[why as usize], n, "{why:?}");
    }
}

#[test]
fn a_local_header_keeps_the_connections_own_addresses() {
    let mut c = config(&["127.0.0.1:1"], 2, 100);
    c.rules[0].accept_proxy = Some(crate::config::AcceptProxy {
        trusted: cidrs(&["127.0.0.0/8"]),
    });
    let rt = Runtime::new(&c);
    let m = Metrics::new(&["r"], 1);
    let (r, shard) = (rt.rule(0), m.rule(0).shard(0));
    let now = Instant::now();
    let mut s = r
        .admit(shard, at(peer("127.0.0.9:7000")), now, false)
        .unwrap();
    let mut local = crate::session::proxy::V2_SIGNATURE.to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    assert_eq!(
        s.feed_header(r, shard, &local, now),
        HeaderStep::Ready { consumed: 16 }
    );
    assert_eq!(s.client, peer("127.0.0.9:7000"));
}

/// A rule with two SNI routes (`api` exact, `*.example.com` wildcard) and, when
/// `default` is set, an upstream of its own.
fn routed(default: bool, accept_proxy: bool) -> (Arc<Runtime>, Arc<Metrics>) {
    let mut text = String::from("[[rule]]\nlisten = \"127.0.0.1:0\"\n");
    if default {
        text.push_str("upstream = \"127.0.0.1:10\"\n");
    }
    if accept_proxy {
        text.push_str("accept_proxy = true\nproxy_trusted = [\"127.0.0.0/8\"]\n");
    }
    text.push_str(
        "[[rule.route]]\nsni = [\"api.example.com\"]\nupstream = \"127.0.0.1:11\"\n\
         [[rule.route]]\nname = \"web\"\nsni = [\"*.example.com\", \"Example.ORG\"]\n\
         upstream = [\"127.0.0.1:12\", \"127.0.0.1:13\"]\n",
    );
    let c = Config::parse("t.toml", &text).expect("routed config");
    (Runtime::new(&c), Metrics::new(&["r"], 1))
}

/// Where a session whose client sends `wire` is sent: its route name and first member, or
/// the rejection.
fn route_of(r: &RuleRuntime, shard: &Shard, wire: &[u8]) -> Result<(String, u16), RejectReason> {
    let now = Instant::now();
    let mut s = r
        .admit(shard, at(peer("127.0.0.1:4000")), now, false)
        .unwrap();
    assert!(s.awaits_header());
    // Byte by byte: the decision waits for the whole hello.
    for end in 1..wire.len() {
        match s.feed_header(r, shard, &wire[..end], now) {
            HeaderStep::NeedMore => {}
            HeaderStep::Ready { consumed } => {
                assert_eq!(consumed, 0);
                break;
            }
            HeaderStep::Reject(why) => return Err(why),
        }
    }
    match s.feed_header(r, shard, wire, now) {
        HeaderStep::Ready { consumed: 0 } => {}
        HeaderStep::Reject(why) => return Err(why),
        other => panic!("{other:?}"),
    }
    let mut pickers = r.pickers(7);
    let Dial::Connect(addr) = s.dial(r, &mut pickers, now) else {
        panic!("no member to dial");
    };
    Ok((s.route(r).unwrap().to_string(), addr.port()))
}

#[test]
fn sni_picks_exact_before_wildcard_and_falls_back_to_the_default_route() {
    use crate::session::sni::tests::hello_with_name;
    let (rt, m) = routed(true, false);
    let (r, shard) = (rt.rule(0), m.rule(0).shard(0));
    let route = |wire: &[u8]| route_of(r, shard, wire).unwrap();
    assert_eq!(
        route(&hello_with_name(b"api.example.com")).0,
        "api.example.com"
    );
    assert_eq!(route(&hello_with_name(b"api.example.com")).1, 11);
    assert_eq!(route(&hello_with_name(b"www.example.com")).0, "web");
    assert_eq!(route(&hello_with_name(b"example.org")).0, "web");
    // One label only for a wildcard; the bare domain and deeper names are not matched.
    assert_eq!(route(&hello_with_name(b"example.com")).0, "default");
    assert_eq!(route(&hello_with_name(b"a.b.example.com")).0, "default");
    assert_eq!(
        route(&hello_with_name(b"other.net")),
        ("default".into(), 10)
    );
    // Not TLS at all: the default route, at the first byte.
    assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n").0, "default");
    let counts: Vec<(String, u64)> = r
        .pools
        .iter()
        .map(|p| (p.route.clone(), p.sessions()))
        .collect();
    assert_eq!(
        counts,
        [
            ("api.example.com".to_string(), 2),
            ("web".to_string(), 2),
            ("default".to_string(), 4)
        ]
    );
}

#[test]
fn without_a_default_route_an_unmatched_hello_is_rejected_as_no_route() {
    use crate::session::sni::tests::hello_with_name;
    let (rt, m) = routed(false, false);
    let (r, shard) = (rt.rule(0), m.rule(0).shard(0));
    assert_eq!(
        route_of(r, shard, &hello_with_name(b"api.example.com")).unwrap(),
        ("api.example.com".into(), 11)
    );
    assert_eq!(
        route_of(r, shard, &hello_with_name(b"nope.test")),
        Err(RejectReason::NoRoute)
    );
    assert_eq!(
        route_of(r, shard, b"SSH-2.0-OpenSSH_9.2\r\n"),
        Err(RejectReason::NoRoute)
    );
    assert_eq!(
        m.rule(0).snapshot().rejected[RejectReason::NoRoute as usize],
        2
    );
}

#[test]
fn a_proxy_header_then_a_hello_routes_on_the_hello_and_keeps_it_for_the_upstream() {
    use crate::session::sni::tests::hello_with_name;
    let (rt, m) = routed(true, true);
    let (r, shard) = (rt.rule(0), m.rule(0).shard(0));
    let now = Instant::now();
    let mut s = r
        .admit(shard, at(peer("127.0.0.2:5000")), now, false)
        .unwrap();
    let header = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 443\r\n";
    let mut wire = header.to_vec();
    // The header alone is not enough: the route needs the hello.
    assert_eq!(s.feed_header(r, shard, &wire, now), HeaderStep::NeedMore);
    wire.extend(hello_with_name(b"x.example.com"));
    assert_eq!(
        s.feed_header(r, shard, &wire, now),
        HeaderStep::Ready {
            consumed: header.len()
        }
    );
    assert_eq!(s.client, peer("192.0.2.7:40000"));
    assert_eq!(s.route(r), Some("web"));
    // Preamble limits: the PROXY cap plus the hello's.
    let (cap, timeout) = r.header_limits();
    assert!(cap > 16 * 1024 + 107, "{cap}");
    assert_eq!(timeout, crate::config::DEFAULT_PROXY_HEADER_TIMEOUT);
}

#[test]
fn a_late_hello_is_rejected_and_a_client_that_leaves_simply_ends() {
    use crate::session::sni::tests::hello_with_name;
    let (rt, m) = routed(true, false);
    let (r, shard) = (rt.rule(0), m.rule(0).shard(0));
    let now = Instant::now();
    let hello = hello_with_name(b"api.example.com");
    let mut s = r
        .admit(shard, at(peer("127.0.0.1:4001")), now, false)
        .unwrap();
    assert_eq!(
        s.feed_header(r, shard, &hello[..7], now),
        HeaderStep::NeedMore
    );
    assert_eq!(
        s.header_failed(shard, true),
        CloseReason::Rejected(RejectReason::ProxyHeaderTimeout)
    );
    let mut s = r
        .admit(shard, at(peer("127.0.0.1:4002")), now, false)
        .unwrap();
    assert_eq!(
        s.feed_header(r, shard, &hello[..7], now),
        HeaderStep::NeedMore
    );
    assert_eq!(s.header_failed(shard, false), CloseReason::Eof);
    let snap = m.rule(0).snapshot();
    assert_eq!(snap.rejected[RejectReason::ProxyHeaderTimeout as usize], 1);
    assert_eq!(snap.rejected.iter().sum::<u64>(), 1);
    // A rule without routes or accept_proxy reads no preamble.
    let (plain, _) = setup(&["127.0.0.1:1"], 0, 10);
    assert_eq!(plain.rule(0).header_limits(), (0, Duration::ZERO));
}

#[test]
fn a_range_rule_dials_the_member_port_at_the_listen_port_offset() {
    let one_to_one = Config::parse(
        "t.toml",
        "[[rule]]\nlisten = \"127.0.0.1:10000-10009\"\nupstream = [\"127.0.0.1:20000-20009\", \"127.0.0.2:30000-30009\"]\nconnect_retries = 1\n",
    )
    .unwrap();
    let rt = Runtime::new(&one_to_one);
    let m = Metrics::new(&["r"], 1);
    let (r, shard) = (rt.rule(0), m.rule(0).shard(0));
    let mut picker = r.pickers(1);
    let on_port = Accepted {
        port: 10007,
        ..at(None)
    };
    let mut s = r.admit(shard, on_port, Instant::now(), false).unwrap();
    let mut dialed = Vec::new();
    while let Dial::Connect(a) = s.dial(r, &mut picker[..], Instant::now()) {
        dialed.push(a);
        s.connect_failed(r, shard, libc::ECONNREFUSED, Instant::now());
    }
    dialed.sort();
    assert_eq!(
        dialed,
        vec![
            "127.0.0.1:20007".parse().unwrap(),
            "127.0.0.2:30007".parse().unwrap()
        ],
        "failover keeps the offset on every member"
    );
    assert_eq!(s.listen_port, Some(10007));

    // Every port of a range to one upstream port: the port is recorded, the target fixed.
    let fixed = Config::parse(
        "t.toml",
        "[[rule]]\nlisten = \"127.0.0.1:10000-10009\"\nupstream = \"127.0.0.1:9000\"\n",
    )
    .unwrap();
    let rt = Runtime::new(&fixed);
    let r = rt.rule(0);
    let on_port = Accepted {
        port: 10003,
        ..at(None)
    };
    let mut s = r.admit(shard, on_port, Instant::now(), false).unwrap();
    assert_eq!(
        s.dial(r, &mut picker[..], Instant::now()),
        Dial::Connect("127.0.0.1:9000".parse().unwrap())
    );
    assert_eq!(s.upstream(), Some("127.0.0.1:9000".parse().unwrap()));
    assert_eq!(s.listen_port, Some(10003));

    // A single-port rule ignores the port: nothing changes for it.
    let (rt, _) = setup(&["127.0.0.1:1"], 0, 8);
    let r = rt.rule(0);
    let on_port = Accepted {
        port: 4242,
        ..at(None)
    };
    let mut s = r.admit(shard, on_port, Instant::now(), false).unwrap();
    assert_eq!(s.listen_port, None);
    assert_eq!(
        s.dial(r, &mut picker[..], Instant::now()),
        Dial::Connect("127.0.0.1:1".parse().unwrap())
    );
}

/// What a session reported through its [`Recorder`], in order.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Rec {
    Accepted,
    Rejected(&'static str),
    Connected,
    ConnectError(&'static str),
    SentEarly(u64),
    /// The record: reason, bytes, path, attempts, route.
    Closed(&'static str, [u64; 2], &'static str, u32, String),
}

#[derive(Default)]
struct List(std::cell::RefCell<Vec<Rec>>);

impl Recorder for List {
    fn accepted(&self) {
        self.0.borrow_mut().push(Rec::Accepted);
    }
    fn rejected(&self, why: RejectReason) {
        self.0.borrow_mut().push(Rec::Rejected(why.as_str()));
    }
    fn connected(&self, _: Duration) {
        self.0.borrow_mut().push(Rec::Connected);
    }
    fn connect_error(&self, why: ConnectError) {
        self.0.borrow_mut().push(Rec::ConnectError(why.as_str()));
    }
    fn sent_early(&self, n: u64) {
        self.0.borrow_mut().push(Rec::SentEarly(n));
    }
    fn closed(&self, r: &Record<'_>) {
        self.0.borrow_mut().push(Rec::Closed(
            r.end.reason.as_str(),
            r.bytes,
            r.end.path_label(),
            r.attempts,
            r.route.to_string(),
        ));
    }
}

/// What the engine tells the machine.
#[derive(Clone, Copy, Debug)]
enum In {
    /// Everything read so far.
    Read(&'static [u8]),
    ReadEof,
    ReadTimeout,
    Connected,
    ConnectFailed(i32),
    SocketFailed(i32),
    Sent,
    SendFailed(i32),
    RelayEnded(CloseReason, [u64; 2], [u64; 2]),
    Abort(CloseReason),
}

/// What the machine tells the engine, as the tests spell it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Out {
    Read,
    /// The port of the member to connect to.
    Connect(u16),
    /// The bytes to send upstream.
    Send(Vec<u8>),
    Relay {
        client_spoke: bool,
    },
    Close {
        reason: &'static str,
        reset: bool,
    },
}

/// `read`: the preamble read so far.
fn out(
    step: Step,
    s: &Session,
    r: &RuleRuntime,
    read: &[u8],
    closing: &mut Option<Closing>,
) -> Out {
    match step {
        Step::ReadPreamble { .. } => Out::Read,
        Step::Connect { addr, .. } => Out::Connect(addr.port()),
        Step::SendPreamble { early_from } => {
            let mut header = [0u8; proxy::V1_BUF_LEN];
            let n = s.upstream_header(r, &mut header);
            Out::Send([&header[..n], &read[early_from..]].concat())
        }
        Step::Relay { client_spoke } => Out::Relay { client_spoke },
        Step::Close(c) => close_out(c, closing),
    }
}

fn close_out(c: Closing, closing: &mut Option<Closing>) -> Out {
    let o = Out::Close {
        reason: c.reason().as_str(),
        reset: c.resets(),
    };
    *closing = Some(c);
    o
}

struct Case {
    name: &'static str,
    /// The rule's keys after `listen`.
    rule: &'static str,
    peer: &'static str,
    dead: bool,
    first: Out,
    script: Vec<(In, Out)>,
    /// Everything recorded, the record last.
    recorded: Vec<Rec>,
}

const TWO: &str = "upstream = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\nconnect_retries = 1\n";
const PROXIED: &str =
    "upstream = \"127.0.0.1:1\"\naccept_proxy = true\nproxy_trusted = [\"127.0.0.0/8\"]\n";
const PROXY_HEADER: &[u8] = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 443\r\nhi";

fn close(reason: &'static str, reset: bool) -> Out {
    Out::Close { reason, reset }
}

fn closed(reason: &'static str, bytes: [u64; 2], attempts: u32, route: &str) -> Rec {
    Rec::Closed(reason, bytes, "copy", attempts, route.to_string())
}

fn cases() -> Vec<Case> {
    use CloseReason as C;
    let refused = libc::ECONNREFUSED;
    vec![
        Case {
            name: "plain: connect, relay, clean end",
            rule: TWO,
            peer: "127.0.0.1:5000",
            dead: false,
            first: Out::Connect(0),
            script: vec![
                (
                    In::Connected,
                    Out::Relay {
                        client_spoke: false,
                    },
                ),
                (In::RelayEnded(C::Eof, [5, 7], [12, 0]), close("eof", false)),
            ],
            recorded: vec![
                Rec::Accepted,
                Rec::Connected,
                closed("eof", [5, 7], 1, "default"),
            ],
        },
        Case {
            name: "failover: a refused member, then the other one",
            rule: TWO,
            peer: "127.0.0.1:5000",
            dead: false,
            first: Out::Connect(0),
            script: vec![
                (In::ConnectFailed(refused), Out::Connect(0)),
                (
                    In::Connected,
                    Out::Relay {
                        client_spoke: false,
                    },
                ),
                (
                    In::RelayEnded(C::Reset, [1, 0], [1, 0]),
                    close("reset", true),
                ),
            ],
            recorded: vec![
                Rec::Accepted,
                Rec::ConnectError("refused"),
                Rec::Connected,
                closed("reset", [1, 0], 2, "default"),
            ],
        },
        Case {
            name: "every attempt used: the last error ends it",
            rule: TWO,
            peer: "127.0.0.1:5000",
            dead: false,
            first: Out::Connect(0),
            script: vec![
                (In::ConnectFailed(refused), Out::Connect(0)),
                (
                    In::ConnectFailed(libc::ETIMEDOUT),
                    close("connect_timeout", true),
                ),
            ],
            recorded: vec![
                Rec::Accepted,
                Rec::ConnectError("refused"),
                Rec::ConnectError("timeout"),
                closed("connect_timeout", [0, 0], 2, "default"),
            ],
        },
        Case {
            name: "no descriptor for the upstream socket",
            rule: TWO,
            peer: "127.0.0.1:5000",
            dead: false,
            first: Out::Connect(0),
            script: vec![(In::SocketFailed(libc::EMFILE), close("fd_exhausted", true))],
            recorded: vec![
                Rec::Accepted,
                Rec::Rejected("fd_exhausted"),
                closed("fd_exhausted", [0, 0], 1, "default"),
            ],
        },
        Case {
            name: "a foreign address family fails over",
            rule: TWO,
            peer: "127.0.0.1:5000",
            dead: false,
            first: Out::Connect(0),
            script: vec![
                (In::SocketFailed(libc::EAFNOSUPPORT), Out::Connect(0)),
                (In::Abort(C::Shutdown), close("shutdown", true)),
            ],
            recorded: vec![
                Rec::Accepted,
                Rec::ConnectError("other"),
                closed("shutdown", [0, 0], 2, "default"),
            ],
        },
        Case {
            name: "dead in the listen queue: closed at once, no connect",
            rule: TWO,
            peer: "127.0.0.1:5000",
            dead: true,
            first: close("reset", true),
            script: vec![],
            recorded: vec![Rec::Accepted, closed("reset", [0, 0], 0, "default")],
        },
        Case {
            name: "a PROXY header read, then the early bytes sent upstream",
            rule: PROXIED,
            peer: "127.0.0.2:5000",
            dead: false,
            first: Out::Read,
            script: vec![
                (In::Read(b"PROXY TCP4"), Out::Read),
                (In::Read(PROXY_HEADER), Out::Connect(1)),
                (In::Connected, Out::Send(b"hi".to_vec())),
                (In::Sent, Out::Relay { client_spoke: true }),
                (In::RelayEnded(C::Eof, [3, 4], [7, 0]), close("eof", false)),
            ],
            recorded: vec![
                Rec::Accepted,
                Rec::Connected,
                Rec::SentEarly(2),
                closed("eof", [5, 4], 1, "default"),
            ],
        },
        Case {
            name: "a client denied behind a trusted proxy",
            rule: "upstream = \"127.0.0.1:1\"\naccept_proxy = true\nproxy_trusted = [\"127.0.0.0/8\"]\ndeny = [\"192.0.2.0/24\"]\n",
            peer: "127.0.0.2:5000",
            dead: false,
            first: Out::Read,
            script: vec![(In::Read(PROXY_HEADER), close("acl", true))],
            recorded: vec![
                Rec::Accepted,
                Rec::Rejected("acl"),
                closed("acl", [0, 0], 0, "default"),
            ],
        },
        Case {
            name: "shutdown while the preamble is read",
            rule: PROXIED,
            peer: "127.0.0.2:5000",
            dead: false,
            first: Out::Read,
            script: vec![
                (In::Read(b"PROXY"), Out::Read),
                (In::Abort(C::Shutdown), close("shutdown", true)),
            ],
            recorded: vec![Rec::Accepted, closed("shutdown", [0, 0], 0, "default")],
        },
        Case {
            name: "a late PROXY header",
            rule: PROXIED,
            peer: "127.0.0.2:5000",
            dead: false,
            first: Out::Read,
            script: vec![(In::ReadTimeout, close("proxy_header_timeout", true))],
            recorded: vec![
                Rec::Accepted,
                Rec::Rejected("proxy_header_timeout"),
                closed("proxy_header_timeout", [0, 0], 0, "default"),
            ],
        },
        Case {
            name: "a client that leaves in its PROXY header",
            rule: PROXIED,
            peer: "127.0.0.2:5000",
            dead: false,
            first: Out::Read,
            script: vec![(In::ReadEof, close("bad_proxy_header", true))],
            recorded: vec![
                Rec::Accepted,
                Rec::Rejected("bad_proxy_header"),
                closed("bad_proxy_header", [0, 0], 0, "default"),
            ],
        },
        Case {
            name: "a PROXY header sent upstream; its send fails",
            rule: "upstream = \"127.0.0.1:1\"\nproxy_protocol = \"v1\"\n",
            peer: "127.0.0.1:5000",
            dead: false,
            first: Out::Connect(1),
            script: vec![
                (
                    In::Connected,
                    Out::Send(b"PROXY TCP4 127.0.0.1 127.0.0.1 5000 4444\r\n".to_vec()),
                ),
                (In::SendFailed(libc::EPIPE), close("reset", true)),
            ],
            recorded: vec![
                Rec::Accepted,
                Rec::Connected,
                closed("reset", [0, 0], 1, "default"),
            ],
        },
        Case {
            name: "SNI: the hello picks the route, and goes upstream unchanged",
            rule: "[[rule.route]]\nsni = [\"api.example.com\"]\nupstream = \"127.0.0.1:11\"\n",
            peer: "127.0.0.1:5000",
            dead: false,
            first: Out::Read,
            script: vec![
                (In::Read(&[22]), Out::Read),
                (In::Read(HELLO_PLACEHOLDER), Out::Connect(11)),
                (In::Connected, Out::Send(HELLO_PLACEHOLDER.to_vec())),
                (In::Sent, Out::Relay { client_spoke: true }),
                (
                    In::RelayEnded(C::Shutdown, [0, 0], [0, 0]),
                    close("shutdown", true),
                ),
            ],
            recorded: vec![
                Rec::Accepted,
                Rec::Connected,
                Rec::SentEarly(HELLO_LEN),
                closed("shutdown", [HELLO_LEN, 0], 1, "api.example.com"),
            ],
        },
        Case {
            name: "SNI without a match nor a default route",
            rule: "[[rule.route]]\nsni = [\"api.example.com\"]\nupstream = \"127.0.0.1:11\"\n",
            peer: "127.0.0.1:5000",
            dead: false,
            first: Out::Read,
            script: vec![(In::Read(b"SSH-2.0-x\r\n"), close("no_route", true))],
            recorded: vec![
                Rec::Accepted,
                Rec::Rejected("no_route"),
                closed("no_route", [0, 0], 0, "-"),
            ],
        },
        Case {
            name: "a splice relay that copied too says copy+splice",
            rule: TWO,
            peer: "127.0.0.1:5000",
            dead: false,
            first: Out::Connect(0),
            script: vec![
                (
                    In::Connected,
                    Out::Relay {
                        client_spoke: false,
                    },
                ),
                (
                    In::RelayEnded(C::IdleTimeout, [9, 9], [2, 16]),
                    close("idle_timeout", false),
                ),
            ],
            recorded: vec![
                Rec::Accepted,
                Rec::Connected,
                Rec::Closed("idle_timeout", [9, 9], "copy+splice", 1, "default".into()),
            ],
        },
    ]
}

/// Stands for a ClientHello in the table; replaced by a real one naming `api.example.com`.
const HELLO_PLACEHOLDER: &[u8] = b"<hello>";

/// Stands for the hello's length in the table.
const HELLO_LEN: u64 = u64::MAX;

#[test]
fn every_step_sequence_without_sockets() {
    use crate::session::sni::tests::hello_with_name;
    let hello = hello_with_name(b"api.example.com");
    let now = Instant::now();
    for case in cases() {
        let text = format!("[[rule]]\nlisten = \"127.0.0.1:4444\"\n{}", case.rule);
        let config =
            Config::parse("t.toml", &text).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let rt = Runtime::new(&config);
        let list = List::default();
        let mut pickers = rt.rule(0).pickers(3);
        let mut cx = Cx {
            rule: rt.rule(0),
            rec: &list,
            pickers: Some(&mut pickers),
        };
        let accepted = Accepted {
            peer: peer(case.peer),
            dead: case.dead,
            port: 4444,
        };
        let mut s = Session::accept(&cx, accepted, now, false).expect(case.name);
        let local = peer("127.0.0.1:4444");
        let mut closing = None;
        let first = s.start(&mut cx, local, now);
        let mut got = vec![out(first, &s, rt.rule(0), &[], &mut closing)];
        let mut read = Vec::new();
        let mut want = vec![case.first.clone()];
        let real = |b: &'static [u8]| {
            if b == HELLO_PLACEHOLDER {
                hello.clone()
            } else {
                b.to_vec()
            }
        };
        for (input, expected) in &case.script {
            let step = match *input {
                In::Read(b) => {
                    read = real(b);
                    s.on_preamble(&mut cx, &read, now)
                }
                In::ReadEof => s.on_preamble_failed(&cx, false),
                In::ReadTimeout => s.on_preamble_failed(&cx, true),
                In::Connected => s.on_connected(&cx, now),
                In::ConnectFailed(e) => s.on_connect_failed(&mut cx, e, now),
                In::SocketFailed(e) => s.on_socket_failed(&mut cx, e, now),
                In::Sent => s.on_sent(&cx),
                In::SendFailed(e) => s.on_send_failed(e),
                In::RelayEnded(reason, bytes, by_path) => {
                    Step::Close(s.on_relay_ended(step::End::by_path(reason, bytes, by_path)))
                }
                In::Abort(reason) => Step::Close(s.abort(&cx, reason)),
            };
            let mut o = out(step, &s, rt.rule(0), &read, &mut closing);
            if o == Out::Send(hello.clone()) {
                o = Out::Send(HELLO_PLACEHOLDER.to_vec());
            }
            // A member's port: 0 stands for "either of the rule's two".
            let mut e = expected.clone();
            if let (Out::Connect(0), Out::Connect(p)) = (&e, &o)
                && [1, 2].contains(p)
            {
                e = o.clone();
            }
            got.push(o);
            want.push(e);
        }
        if let (Out::Connect(0), Some(Out::Connect(p))) = (&want[0], got.first()) {
            want[0] = Out::Connect(*p);
        }
        assert_eq!(got, want, "{}", case.name);
        let closing = closing.unwrap_or_else(|| panic!("{}: the session never closed", case.name));
        s.close(closing, &cx, now);
        let recorded = list.0.borrow().clone();
        let len = hello.len() as u64;
        let want: Vec<Rec> = case
            .recorded
            .iter()
            .map(|r| match r.clone() {
                Rec::SentEarly(HELLO_LEN) => Rec::SentEarly(len),
                Rec::Closed(why, [HELLO_LEN, b], path, n, route) => {
                    Rec::Closed(why, [len, b], path, n, route)
                }
                other => other,
            })
            .collect();
        assert_eq!(recorded, want, "{}", case.name);
        assert_eq!(rt.live(), 0, "{}: its place was given back", case.name);
    }
}
