//! The pipeline without sockets: admission, dialing with failover, the end of a session.

use super::*;
use crate::config::{Config, MemberSpec, Upstream};
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
    let a = r.admit(shard, None, now, false).unwrap();
    let _b = r.admit(shard, None, now, false).unwrap();
    assert_eq!(
        r.admit(shard, None, now, false).unwrap_err(),
        RejectReason::MaxConnections
    );
    assert_eq!(r.live(), 2);
    // 2. One ends: there is room again.
    let end = End {
        reason: CloseReason::Eof,
        bytes: [0, 0],
        path: "copy",
    };
    a.finish(r, &m, shard, end, now);
    assert!(r.admit(shard, None, now, false).is_ok());
    // 3. While draining, nothing is admitted.
    assert_eq!(
        r.admit(shard, None, now, true).unwrap_err(),
        RejectReason::Shutdown
    );
    let s = m.rule(0).snapshot();
    assert_eq!(s.accepted, 3);
    assert_eq!(s.rejected[RejectReason::MaxConnections as usize], 1);
    assert_eq!(s.rejected[RejectReason::Shutdown as usize], 1);
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
    let mut s = r.admit(shard, None, now, false).unwrap();
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
    let mut s = r.admit(shard, None, now, false).unwrap();
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
    let mut s = r.admit(shard, None, now, false).unwrap();
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
    let mut s = r.admit(shard, None, now, false).unwrap();
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
    let end = End {
        reason: CloseReason::Shutdown,
        bytes: [1, 2],
        path: "copy",
    };
    s.finish(r, &m, shard, end, now);
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
        r.admit(shard, peer("127.0.3.7:1000"), now, false)
            .unwrap_err(),
        RejectReason::Acl
    );
    assert_eq!(
        r.admit(shard, peer("127.1.0.1:1000"), now, false)
            .unwrap_err(),
        RejectReason::Acl
    );
    // 2. Two per address, a third is turned away; another address is not affected.
    let a = r.admit(shard, peer("127.0.1.1:1000"), now, false).unwrap();
    let _b = r.admit(shard, peer("127.0.1.1:1001"), now, false).unwrap();
    assert_eq!(
        r.admit(shard, peer("127.0.1.1:1002"), now, false)
            .unwrap_err(),
        RejectReason::PerIpLimit
    );
    assert!(r.admit(shard, peer("127.0.1.2:1000"), now, false).is_ok());
    // 3. A finished session gives its place back.
    let end = End {
        reason: CloseReason::Eof,
        bytes: [0, 0],
        path: "copy",
    };
    a.finish(r, &m, shard, end, now);
    assert!(r.admit(shard, peer("127.0.1.1:1003"), now, false).is_ok());
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
        r.admit(shard, peer("127.0.0.3:5000"), now, false)
            .unwrap_err(),
        RejectReason::UntrustedProxy
    );
    // 2. The proxy's header names the client: it becomes the session's client, and the
    //    stream's first bytes after it are left for the relay.
    let mut s = r.admit(shard, peer("127.0.0.2:5000"), now, false).unwrap();
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
    let mut s = r.admit(shard, peer("127.0.0.2:5001"), now, false).unwrap();
    let denied = b"PROXY TCP4 10.9.1.1 10.0.0.1 1 2\r\n";
    assert_eq!(
        s.feed_header(r, shard, denied, now),
        HeaderStep::Reject(RejectReason::Acl)
    );
    let mut s = r.admit(shard, peer("127.0.0.2:5002"), now, false).unwrap();
    assert_eq!(
        s.feed_header(r, shard, b"GET / HTTP/1.1\r\n", now),
        HeaderStep::Reject(RejectReason::BadProxyHeader)
    );
    let mut s = r.admit(shard, peer("127.0.0.2:5003"), now, false).unwrap();
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
    let mut s = r.admit(shard, peer("127.0.0.9:7000"), now, false).unwrap();
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
    let mut s = r.admit(shard, peer("127.0.0.1:4000"), now, false).unwrap();
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
    let mut s = r.admit(shard, peer("127.0.0.2:5000"), now, false).unwrap();
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
    let mut s = r.admit(shard, peer("127.0.0.1:4001"), now, false).unwrap();
    assert_eq!(
        s.feed_header(r, shard, &hello[..7], now),
        HeaderStep::NeedMore
    );
    assert_eq!(
        s.header_failed(shard, true),
        CloseReason::Rejected(RejectReason::ProxyHeaderTimeout)
    );
    let mut s = r.admit(shard, peer("127.0.0.1:4002"), now, false).unwrap();
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
    let mut s = r.admit(shard, None, Instant::now(), false).unwrap();
    s.set_listen_port(r, 10007);
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
    let mut s = r.admit(shard, None, Instant::now(), false).unwrap();
    s.set_listen_port(r, 10003);
    assert_eq!(
        s.dial(r, &mut picker[..], Instant::now()),
        Dial::Connect("127.0.0.1:9000".parse().unwrap())
    );
    assert_eq!(s.upstream(), Some("127.0.0.1:9000".parse().unwrap()));
    assert_eq!(s.listen_port, Some(10003));

    // A single-port rule ignores the port: nothing changes for it.
    let (rt, _) = setup(&["127.0.0.1:1"], 0, 8);
    let r = rt.rule(0);
    let mut s = r.admit(shard, None, Instant::now(), false).unwrap();
    s.set_listen_port(r, 4242);
    assert_eq!(s.listen_port, None);
    assert_eq!(
        s.dial(r, &mut picker[..], Instant::now()),
        Dial::Connect("127.0.0.1:1".parse().unwrap())
    );
}
