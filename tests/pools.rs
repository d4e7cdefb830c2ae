//! Upstream pools end to end: how a rule with several members spreads, fails over and reports
//! its connections, on every engine.
//!
//! Written against the spec of upstream pools (`upstream = [...]`, `balance`, weights,
//! backups, `connect_retries`, passive and active health checks, `GET /upstreams`, the
//! `ringfwd_upstream_*` series of `/metrics`, `upstream=`/`attempts=` in the access log). Each
//! scenario is a plain function taking the engine's extra `run` flags; the [`engine_suite!`]
//! lines at the bottom make one test module per engine, as in `tests/semantics.rs`.
//!
//! The forwarder is the real binary with its admin endpoint on (`support::pool::Forwarder`);
//! members are in-test servers on loopback port 0 or `ringfwd echo` children. Every wait has a
//! deadline; states the forwarder only exposes through the admin endpoint (a member marked
//! down, a counter reaching its value) are polled with a deadline. Scenarios that open
//! thousands of connections or judge detection times run alone (`support::heavy`).
//!
//! Tolerances are stated where they are asserted. The balancers are deterministic on a
//! sequential client (round-robin per worker, least-conn on shared counts, a hash of the
//! source address), so the bounds are wide for a correct implementation and still tight
//! enough to catch a wrong one.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use socket2::{Domain, Protocol, Socket, Type};

use support::STEP_TIMEOUT;
use support::pool::{
    self, EchoChild, Forwarder, Member, client_ip, connect_from, count, echo_once, is_up,
    member_in, members_of, read_identity, toml_list, wait_until,
};
use support::sock::{self, Backend, ClosedPort};

support::engine_suite!(
    [
        round_robin_splits_evenly,
        weights_split_3_1_1,
        least_conn_balances_long_lived,
        failover_when_a_member_is_killed,
        source_hash_is_stable_and_moves_only_the_removed_share,
        every_member_refusing_closes_promptly,
        backup_only_when_primaries_are_down,
        localhost_member_resolves,
        send_expect_marks_a_member_that_never_answers_down,
        first_byte_timeout_fails_a_member_that_never_answers,
    ],
    std_engine: ["--engine", "std"],
    tokio_engine: ["--engine", "tokio"],
    uring_copy: ["--engine", "uring", "--mode", "copy"],
    uring_splice: ["--engine", "uring", "--mode", "splice"],
    uring_auto: ["--engine", "uring", "--mode", "auto"],
);

/// Health checks of the scenarios that use them: a member is down after `FALL` failed probes
/// `INTERVAL` apart, up again after `RISE` good ones.
const INTERVAL: Duration = Duration::from_millis(200);
const FALL: u32 = 2;
const RISE: u32 = 2;
const HEALTH_CHECK: &str =
    "[rule.health_check]\ninterval = \"200ms\"\ntimeout = \"200ms\"\nrise = 2\nfall = 2\n";
/// Added to every "reported within" bound: the box is shared and loaded, so a probe or a
/// scrape may be late by far more than its period. Generous ([`STEP_TIMEOUT`]), but finite:
/// a member never reported still fails the scenario; how long it took is printed.
const MARGIN: Duration = STEP_TIMEOUT;

/// One `[[rule]]` table: `upstream` is TOML as written (a string or an array), `extra` more
/// keys and sub-tables of the rule.
fn rule(name: &str, upstream: &str, extra: &str) -> String {
    format!(
        "[[rule]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nupstream = {upstream}\n{extra}\n"
    )
}

/// `n` short sessions one after the other (connect, a few bytes, read them back, close).
///
/// # Panics
/// At the first session that fails: no session may fail while every member is up.
fn sessions(addr: SocketAddr, n: usize) {
    for i in 0..n {
        let payload = format!("session {i}");
        echo_once(addr, payload.as_bytes())
            .unwrap_or_else(|e| panic!("session {i} of {n} failed: {e}"));
    }
}

/// `ringfwd_upstream_connections_total` of one member.
fn connections_total(m: &pool::Metrics, rule: &str, upstream: SocketAddr) -> f64 {
    m.sum(
        "ringfwd_upstream_connections_total",
        &[("rule", rule), ("upstream", &upstream.to_string())],
    )
}

/// Waits until `/metrics` and `/upstreams` both count exactly `want[i]` connections for member
/// `addrs[i]` (counters may be published a little after the session), then checks the other
/// idle-pool fields: every member up, nothing active, no connect error.
fn assert_connections_reported(fwd: &Forwarder, rule: &str, addrs: &[SocketAddr], want: &[usize]) {
    wait_until(STEP_TIMEOUT, "per-member connection counters", || {
        let m = fwd.metrics();
        let pool = fwd.pool(rule);
        let mut wrong = Vec::new();
        for (addr, want) in addrs.iter().zip(want) {
            let metric = connections_total(&m, rule, *addr);
            let member = member_in(&pool, *addr);
            let listed = count(member, "connections");
            if metric != *want as f64 || listed != *want as u64 || count(member, "active") != 0 {
                wrong.push(format!(
                    "{addr}: served {want}, ringfwd_upstream_connections_total {metric}, \
                     /upstreams {member}"
                ));
            }
        }
        if wrong.is_empty() {
            Ok(())
        } else {
            Err(wrong.join("; "))
        }
    });
    let pool = fwd.pool(rule);
    for addr in addrs {
        let member = member_in(&pool, *addr);
        assert!(is_up(member), "{member}");
        assert_eq!(count(member, "connect_errors"), 0, "{member}");
        assert!(member["last_error"].is_null(), "{member}");
        assert_eq!(member["name"], addr.to_string().as_str(), "{member}");
        assert_eq!(member["backup"], false, "{member}");
    }
}

/// Checks that the access log has a line per session, every one naming a member of `addrs`
/// with `attempts=1`, and that per member the lines agree with what the members served.
fn assert_access_log_matches(fwd: &Forwarder, addrs: &[SocketAddr], served: &[usize]) {
    let total: usize = served.iter().sum();
    let lines = fwd.wait_access_log(total);
    assert_eq!(lines.len(), total, "one access-log line per session");
    let mut per_member: BTreeMap<String, usize> = BTreeMap::new();
    for l in &lines {
        let upstream = l
            .upstream
            .clone()
            .unwrap_or_else(|| panic!("no upstream= in {:?}", l.line));
        assert_eq!(
            l.attempts,
            Some(1),
            "every member up: one attempt: {:?}",
            l.line
        );
        *per_member.entry(upstream).or_default() += 1;
    }
    let want: BTreeMap<String, usize> = addrs
        .iter()
        .zip(served)
        .filter(|(_, n)| **n > 0)
        .map(|(a, n)| (a.to_string(), *n))
        .collect();
    assert_eq!(
        per_member, want,
        "sessions per upstream= in the access log vs served"
    );
}

/// Three equal members, 3 000 sequential sessions: each member serves 1 000 ± 5 % (± 50).
/// Smooth round-robin is exact per worker, so a correct forwarder is within a few sessions of
/// 1 000 whatever worker each connection lands on; state kept per connection thread instead
/// of per worker (always the first member), a shared cursor that skips, or a member left out
/// all break the bound. The counts are cross-checked, member by member, with
/// `ringfwd_upstream_connections_total`, `/upstreams` and the access log.
fn round_robin_splits_evenly(engine: &[&str]) {
    let _load = support::heavy();
    const SESSIONS: usize = 3_000;
    // 1. Three echo members behind one round-robin rule.
    let members: Vec<Member> = (0..3).map(|_| Member::echo()).collect();
    let addrs: Vec<SocketAddr> = members.iter().map(Member::addr).collect();
    let fwd = Forwarder::start(
        engine,
        &rule("rr", &toml_list(addrs.clone()), "balance = \"round_robin\""),
        1,
    );
    let pool = fwd.pool("rr");
    assert_eq!(pool["balance"], "round_robin", "{pool}");
    assert_eq!(members_of(&pool).len(), 3, "{pool}");
    // 2. Sequential short sessions, every one answered.
    sessions(fwd.addr(), SESSIONS);
    // 3. Even split: ±5 % of the expected 1 000 per member; nothing lost or duplicated.
    let served: Vec<usize> = members.iter().map(Member::served).collect();
    assert_eq!(served.iter().sum::<usize>(), SESSIONS, "served {served:?}");
    let expected = SESSIONS / 3;
    let tolerance = expected * 5 / 100;
    for (addr, n) in addrs.iter().zip(&served) {
        assert!(
            n.abs_diff(expected) <= tolerance,
            "{addr} served {n} of {SESSIONS}, expected {expected} ± {tolerance}: {served:?}"
        );
    }
    // 4. The forwarder's own counts agree with the members', member by member.
    assert_connections_reported(&fwd, "rr", &addrs, &served);
    assert_access_log_matches(&fwd, &addrs, &served);
}

/// Weights 3:1:1 over 3 000 sequential sessions: 1 800 / 600 / 600, each within ±5 % *of its
/// own expected count* (± 90 / ± 30 / ± 30) — stricter than ±5 % of the total, and smooth
/// weighted round-robin is exact per worker, so it is far inside. Weights ignored (1 000
/// each) or applied as random draws (σ ≈ 22 on 600) fail it.
fn weights_split_3_1_1(engine: &[&str]) {
    let _load = support::heavy();
    const SESSIONS: usize = 3_000;
    const WEIGHTS: [usize; 3] = [3, 1, 1];
    // 1. Three echo members weighted 3, 1, 1.
    let members: Vec<Member> = (0..3).map(|_| Member::echo()).collect();
    let addrs: Vec<SocketAddr> = members.iter().map(Member::addr).collect();
    let upstream = format!(
        "[{}]",
        addrs
            .iter()
            .zip(WEIGHTS)
            .map(|(a, w)| format!("{{ addr = \"{a}\", weight = {w} }}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let fwd = Forwarder::start(engine, &rule("weighted", &upstream, ""), 1);
    let pool = fwd.pool("weighted");
    for (addr, w) in addrs.iter().zip(WEIGHTS) {
        assert_eq!(count(member_in(&pool, *addr), "weight"), w as u64, "{pool}");
    }
    // 2. Sequential short sessions, every one answered.
    sessions(fwd.addr(), SESSIONS);
    // 3. The split follows the weights.
    let served: Vec<usize> = members.iter().map(Member::served).collect();
    assert_eq!(served.iter().sum::<usize>(), SESSIONS, "served {served:?}");
    let total_weight: usize = WEIGHTS.iter().sum();
    for ((addr, n), w) in addrs.iter().zip(&served).zip(WEIGHTS) {
        let expected = SESSIONS * w / total_weight;
        let tolerance = expected * 5 / 100;
        assert!(
            n.abs_diff(expected) <= tolerance,
            "{addr} (weight {w}) served {n} of {SESSIONS}, expected {expected} ± {tolerance}: \
             {served:?}"
        );
    }
    // 4. The forwarder's own counts agree.
    assert_connections_reported(&fwd, "weighted", &addrs, &served);
}

/// Opens one connection through the forwarder and keeps it; returns it with the identity of
/// the member that answered.
fn open_held(addr: SocketAddr) -> (u8, TcpStream) {
    let mut s = sock::connect(addr);
    let id = read_identity(&mut s).unwrap_or_else(|e| panic!("no identity byte: {e}"));
    (id, s)
}

fn held_per_member(held: &[(u8, TcpStream)]) -> [usize; 3] {
    let mut n = [0; 3];
    for (id, _) in held {
        n[usize::from(*id)] += 1;
    }
    n
}

/// Waits until `/upstreams` and `ringfwd_upstream_connections_active` show `want[i]` active
/// connections on member `i`.
fn wait_active(fwd: &Forwarder, rule: &str, addrs: &[SocketAddr], want: [usize; 3]) {
    wait_until(STEP_TIMEOUT, "active connections per member", || {
        let pool = fwd.pool(rule);
        let m = fwd.metrics();
        let listed: Vec<u64> = addrs
            .iter()
            .map(|a| count(member_in(&pool, *a), "active"))
            .collect();
        let metric: Vec<f64> = addrs
            .iter()
            .map(|a| {
                m.sum(
                    "ringfwd_upstream_connections_active",
                    &[("rule", rule), ("upstream", &a.to_string())],
                )
            })
            .collect();
        let ok = listed.iter().zip(want).all(|(l, w)| *l == w as u64)
            && metric.iter().zip(want).all(|(v, w)| *v == w as f64);
        if ok {
            Ok(())
        } else {
            Err(format!(
                "want {want:?}, /upstreams active {listed:?}, \
                 ringfwd_upstream_connections_active {metric:?}"
            ))
        }
    });
}

/// least_conn on long-lived connections: 1. 30 held connections spread 10/10/10; 2. the 20 on
/// members 1 and 2 are closed, so member 0 alone holds 10; 3. 50 more held connections. Least
/// connections fills members 1 and 2 first (at most 2 of the first 20 new ones may reach
/// member 0; strictly it is none), ending at 20 ± 2 on each member. Round-robin fails both:
/// a third of the new connections go to member 0, ending near 27/17/16.
fn least_conn_balances_long_lived(engine: &[&str]) {
    let _load = support::light();
    // Members that say who they are, so the client knows where each connection landed.
    let members: Vec<Member> = (0..3).map(Member::identified).collect();
    let addrs: Vec<SocketAddr> = members.iter().map(Member::addr).collect();
    let fwd = Forwarder::start(
        engine,
        &rule("lc", &toml_list(addrs.clone()), "balance = \"least_conn\""),
        1,
    );
    assert_eq!(fwd.pool("lc")["balance"], "least_conn");
    // 1. 30 held connections, opened one after the other: least connections keeps the
    // members within one of each other at every step, so 10 each.
    let mut held: Vec<(u8, TcpStream)> = (0..30).map(|_| open_held(fwd.addr())).collect();
    assert_eq!(held_per_member(&held), [10, 10, 10], "30 held connections");
    wait_active(&fwd, "lc", &addrs, [10, 10, 10]);
    // 2. Close those on members 1 and 2; wait until the forwarder counts them closed.
    held.retain(|(id, _)| *id == 0);
    wait_active(&fwd, "lc", &addrs, [10, 0, 0]);
    // 3. 50 more held connections, one after the other.
    let mut order = Vec::new();
    for _ in 0..50 {
        let (id, s) = open_held(fwd.addr());
        order.push(id);
        held.push((id, s));
    }
    let early_to_busy = order[..20].iter().filter(|id| **id == 0).count();
    assert!(
        early_to_busy <= 2,
        "{early_to_busy} of the first 20 new connections went to the member already holding \
         10 while the others held none (order {order:?})"
    );
    let per_member = held_per_member(&held);
    for (i, n) in per_member.iter().enumerate() {
        assert!(
            n.abs_diff(20) <= 2,
            "member {i} holds {n} of 60 connections, expected 20 ± 2: {per_member:?} (order of \
             the last 50: {order:?})"
        );
    }
    // 4. The forwarder reports the same active connections.
    wait_active(&fwd, "lc", &addrs, per_member);
    drop(held);
    wait_active(&fwd, "lc", &addrs, [0, 0, 0]);
}

/// `ringfwd_upstream_up` and the `/upstreams` `up` flag of one member, once each.
fn reported_up(fwd: &Forwarder, rule: &str, addr: SocketAddr) -> (Option<f64>, bool) {
    let metric = fwd.metrics().get(
        "ringfwd_upstream_up",
        &[("rule", rule), ("upstream", &addr.to_string())],
    );
    (metric, is_up(&fwd.member(rule, addr)))
}

/// Waits until both the metric and `/upstreams` report member `addr` as `up`; returns how long
/// that took.
fn wait_reported(
    fwd: &Forwarder,
    rule: &str,
    addr: SocketAddr,
    up: bool,
    within: Duration,
) -> Duration {
    let what = format!("{addr} reported {}", if up { "up" } else { "down" });
    wait_until(within, &what, || {
        let (metric, listed) = reported_up(fwd, rule, addr);
        let want = if up { 1.0 } else { 0.0 };
        if metric == Some(want) && listed == up {
            Ok(())
        } else {
            Err(format!(
                "ringfwd_upstream_up {metric:?}, /upstreams up {listed}"
            ))
        }
    })
}

/// A session that failed, as the client saw it.
#[derive(Debug)]
struct Failure {
    index: usize,
    started: Instant,
    error: String,
}

/// Three `ringfwd echo` members with health checks; a client makes 2 000 sessions in a tight
/// loop while one member is SIGKILLed a quarter of the way through.
///
/// No session may fail, except at most one that was mid-exchange with the killed member when
/// it died: no forwarder can save bytes already sent to a dead process. Failover guarantees
/// that no *new* connection fails. The client is sequential, so only one session can be open
/// at the instant of death, and that instant lies between kill(2) and the reaping waitpid(2):
/// a failure of a session that started after the reap is the forwarder's fault.
///
/// The member is reported down (metric 0 and `"up":false`) within fall × interval + margin of
/// the kill; an echo restarted on the same port is reported up within rise × interval +
/// `fail_timeout` (a passive failure may hold it out that long) + margin, and gets traffic
/// again.
fn failover_when_a_member_is_killed(engine: &[&str]) {
    let _load = support::heavy();
    const SESSIONS: usize = 2_000;
    const KILL_AFTER: usize = 500;
    const FAIL_TIMEOUT: Duration = Duration::from_secs(1);
    // 1. Three echo children behind a rule with active health checks.
    let mut echoes: Vec<EchoChild> = (0..3)
        .map(|_| EchoChild::start("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}")))
        .collect();
    let addrs: Vec<SocketAddr> = echoes.iter().map(EchoChild::addr).collect();
    let fwd = Forwarder::start(
        engine,
        &rule(
            "fo",
            &toml_list(addrs.clone()),
            &format!("connect_retries = 2\nmax_fails = 1\nfail_timeout = \"1s\"\n{HEALTH_CHECK}"),
        ),
        1,
    );
    for addr in &addrs {
        wait_reported(&fwd, "fo", *addr, true, STEP_TIMEOUT);
    }
    // 2. The client loop, recording every failure and when its session started.
    let (quarter_tx, quarter_rx) = mpsc::channel();
    let listen = fwd.addr();
    let client = std::thread::spawn(move || {
        let mut failures = Vec::new();
        let mut starts = Vec::with_capacity(SESSIONS);
        for index in 0..SESSIONS {
            if index == KILL_AFTER {
                let _ = quarter_tx.send(());
            }
            let started = Instant::now();
            starts.push(started);
            if let Err(error) = echo_once(listen, format!("session {index}").as_bytes()) {
                failures.push(Failure {
                    index,
                    started,
                    error,
                });
            }
        }
        (failures, starts)
    });
    // 3. A quarter of the way through, SIGKILL member 1 and reap it.
    quarter_rx
        .recv_timeout(Duration::from_secs(120))
        .expect("the client reached the kill point");
    let victim = addrs[1];
    let killed_at = Instant::now();
    let reaped_at = echoes[1].kill_and_reap();
    // 4. It is reported down within fall × interval + margin.
    let down_within = INTERVAL * FALL + MARGIN;
    let took = wait_reported(&fwd, "fo", victim, false, down_within);
    eprintln!("{victim} reported down {took:?} after the kill");
    // 5. The client's verdict.
    let (failures, starts) = client.join().expect("client thread");
    let after_death = starts.iter().filter(|s| **s > reaped_at).count();
    // Normally ~1 500; a descheduled main thread may kill late, and 200 still exercise
    // failover (the first session after the death already meets the refused member).
    assert!(
        after_death >= 200,
        "only {after_death} sessions started after the member died: the kill came too late to \
         test failover"
    );
    assert!(
        failures.len() <= 1,
        "{} sessions failed (at most the one mid-exchange with the killed member may): {failures:?}",
        failures.len()
    );
    if let Some(f) = failures.first() {
        assert!(
            f.started <= reaped_at,
            "session {} started {:?} after the killed member was gone and still failed: {}",
            f.index,
            f.started - reaped_at,
            f.error
        );
        eprintln!(
            "note: session {} failed, started {:?} before the kill: {}",
            f.index,
            killed_at.saturating_duration_since(f.started),
            f.error
        );
    }
    // The survivors stay up throughout.
    for addr in [addrs[0], addrs[2]] {
        assert_eq!(reported_up(&fwd, "fo", addr), (Some(1.0), true), "{addr}");
    }
    // 6. An echo restarted on the same port is reported up again, and gets traffic again.
    let before = connections_total(&fwd.metrics(), "fo", victim);
    echoes[1] = EchoChild::restart_on(victim);
    let up_within = INTERVAL * RISE + FAIL_TIMEOUT + MARGIN;
    let took = wait_reported(&fwd, "fo", victim, true, up_within);
    eprintln!("{victim} reported up {took:?} after the restart");
    let mut n = 0;
    wait_until(STEP_TIMEOUT, "traffic to the restarted member", || {
        n += 1;
        echo_once(listen, b"back").map_err(|e| format!("session after the restart: {e}"))?;
        let now = connections_total(&fwd.metrics(), "fo", victim);
        if now > before {
            Ok(())
        } else {
            Err(format!("{n} sessions, its connections_total still {now}"))
        }
    });
}

/// source_hash: 1 000 clients, each from its own loopback address (127.77.x.y), connect twice
/// and reach the same member both times, and the members each get 15–35 % of the clients. A
/// second forwarder with the same members minus one (order otherwise kept) sends every
/// client whose member remains to that same member, and moves only the removed member's
/// clients (≈25 %, 15–35 % asserted). Fails: a hash of the source port or of a per-process
/// seed, a modulo hash (removing one member remaps most clients), or a per-worker choice.
fn source_hash_is_stable_and_moves_only_the_removed_share(engine: &[&str]) {
    let _load = support::heavy();
    const CLIENTS: usize = 1_000;
    const REMOVED: u8 = 2;
    // 1. Four members that say who they are on accept.
    let members: Vec<Member> = (0..4).map(Member::identified).collect();
    let addrs: Vec<SocketAddr> = members.iter().map(Member::addr).collect();
    let reach = |fwd: &Forwarder, i: usize, pass: &str| -> u8 {
        let mut s = connect_from(client_ip(i), fwd.addr())
            .unwrap_or_else(|e| panic!("{pass}: client {i} ({}): {e}", client_ip(i)));
        read_identity(&mut s)
            .unwrap_or_else(|e| panic!("{pass}: client {i} ({}) got no member: {e}", client_ip(i)))
    };
    // 2. Each client twice through a forwarder with all four.
    let first: Vec<u8> = {
        let fwd = Forwarder::start(
            engine,
            &rule("sh", &toml_list(addrs.clone()), "balance = \"source_hash\""),
            1,
        );
        assert_eq!(fwd.pool("sh")["balance"], "source_hash");
        (0..CLIENTS)
            .map(|i| {
                let a = reach(&fwd, i, "first");
                let b = reach(&fwd, i, "again");
                assert_eq!(
                    a,
                    b,
                    "client {} reached member {a}, then member {b}",
                    client_ip(i)
                );
                a
            })
            .collect()
    };
    let mut share = [0usize; 4];
    for id in &first {
        share[usize::from(*id)] += 1;
    }
    for (id, n) in share.iter().enumerate() {
        assert!(
            (CLIENTS * 15 / 100..=CLIENTS * 35 / 100).contains(n),
            "member {id} has {n} of {CLIENTS} clients, expected 15–35 %: {share:?}"
        );
    }
    // 3. A second forwarder, same members in the same order minus member 2.
    let kept: Vec<SocketAddr> = addrs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != usize::from(REMOVED))
        .map(|(_, a)| *a)
        .collect();
    let fwd = Forwarder::start(
        engine,
        &rule("sh", &toml_list(kept), "balance = \"source_hash\""),
        1,
    );
    let mut stayed_wrongly_moved = Vec::new();
    let mut moved = 0usize;
    let mut moved_to = [0usize; 4];
    for (i, was) in first.iter().enumerate() {
        let now = reach(&fwd, i, "after the removal");
        if *was == REMOVED {
            assert_ne!(now, REMOVED, "a member not in the list was reached");
            moved += 1;
            moved_to[usize::from(now)] += 1;
        } else if now != *was {
            stayed_wrongly_moved.push((client_ip(i), *was, now));
        }
    }
    // 4. Only the removed member's clients moved.
    assert!(
        stayed_wrongly_moved.is_empty(),
        "{} clients whose member remained were moved (client, before, after): {:?}",
        stayed_wrongly_moved.len(),
        &stayed_wrongly_moved[..stayed_wrongly_moved.len().min(20)]
    );
    assert!(
        (CLIENTS * 15 / 100..=CLIENTS * 35 / 100).contains(&moved),
        "{moved} of {CLIENTS} clients moved, expected the removed member's ≈25 % (15–35 %)"
    );
    eprintln!("{moved} clients moved, to members {moved_to:?}");
}

/// Three members that refuse, `connect_retries = 2`: the client is closed (reset or EOF, no
/// data) on the refusals, after exactly one refused connect per member — three in all
/// (`ringfwd_upstream_connect_errors_total{reason="refused"}` and `/upstreams`). Fails: no
/// failover (1 error), retrying one member (2 on it), more attempts than allowed, or a
/// client left hanging (the connect timeout is 120 s, far past the wait's [`STEP_TIMEOUT`],
/// so only the refusals can close the client in time).
fn every_member_refusing_closes_promptly(engine: &[&str]) {
    let _load = support::light();
    // 1. Three ports bound but not listening.
    let ports: Vec<ClosedPort> = (0..3).map(|_| ClosedPort::new()).collect();
    let addrs: Vec<SocketAddr> = ports.iter().map(ClosedPort::addr).collect();
    let fwd = Forwarder::start(
        engine,
        &rule(
            "refuse",
            &toml_list(addrs.clone()),
            "connect_retries = 2\nconnect_timeout = \"120s\"",
        ),
        1,
    );
    // 2. One client: closed promptly, nothing received.
    let (end, took) = sock::connect_expect_closed(fwd.addr(), STEP_TIMEOUT);
    assert!(end.is_closed(), "{end:?} after {took:?}");
    eprintln!("every member refusing {engine:?}: client closed after {took:?}");
    // 3. One refused connect per member, three in all.
    let refused = |m: &pool::Metrics, addr: SocketAddr| {
        m.sum(
            "ringfwd_upstream_connect_errors_total",
            &[
                ("rule", "refuse"),
                ("upstream", &addr.to_string()),
                ("reason", "refused"),
            ],
        )
    };
    wait_until(STEP_TIMEOUT, "three refused connects counted", || {
        let m = fwd.metrics();
        let all = m.sum(
            "ringfwd_upstream_connect_errors_total",
            &[("rule", "refuse")],
        );
        if all >= 3.0 {
            Ok(())
        } else {
            Err(format!("{all} connect errors so far"))
        }
    });
    let m = fwd.metrics();
    let per_member: Vec<f64> = addrs.iter().map(|a| refused(&m, *a)).collect();
    assert_eq!(
        per_member,
        [1.0, 1.0, 1.0],
        "refused connects per member (one client, connect_retries = 2)"
    );
    assert_eq!(
        m.sum(
            "ringfwd_upstream_connect_errors_total",
            &[("rule", "refuse")]
        ),
        3.0,
        "connect errors of every reason"
    );
    assert_eq!(
        m.sum("ringfwd_upstream_connections_total", &[("rule", "refuse")]),
        0.0
    );
    let pool = fwd.pool("refuse");
    for addr in &addrs {
        let member = member_in(&pool, *addr);
        assert_eq!(count(member, "connect_errors"), 1, "{member}");
        assert!(member["last_error"].is_string(), "{member}");
        assert_eq!(count(member, "connections"), 0, "{member}");
    }
    // 4. With every member down, a connection still tries them, and is closed promptly too.
    let (end, took) = sock::connect_expect_closed(fwd.addr(), STEP_TIMEOUT);
    assert!(end.is_closed(), "second client: {end:?} after {took:?}");
    wait_until(
        STEP_TIMEOUT,
        "members still tried when all are down",
        || {
            let all = fwd.metrics().sum(
                "ringfwd_upstream_connect_errors_total",
                &[("rule", "refuse")],
            );
            if all > 3.0 {
                Ok(())
            } else {
                Err(format!(
                    "{all} connect errors: the second client tried no member"
                ))
            }
        },
    );
}

/// Two primaries and a backup, with health checks: 1. both primaries up: the backup serves
/// nothing; 2. one primary closed: sessions fail over to the other, the backup still serves
/// nothing; 3. both primaries closed (and reported down): every session succeeds through the
/// backup. Served counts only connections that carried data, so health probes do not count.
fn backup_only_when_primaries_are_down(engine: &[&str]) {
    let _load = support::light();
    const PER_PHASE: usize = 30;
    let mut p1 = Some(Member::echo());
    let mut p2 = Some(Member::echo());
    let backup = Member::echo();
    let (a1, a2, ab) = (
        p1.as_ref().expect("p1").addr(),
        p2.as_ref().expect("p2").addr(),
        backup.addr(),
    );
    let upstream = format!(
        "[{{ addr = \"{a1}\" }}, {{ addr = \"{a2}\", backup = false }}, {{ addr = \"{ab}\", backup = true }}]"
    );
    let fwd = Forwarder::start(engine, &rule("bk", &upstream, HEALTH_CHECK), 1);
    assert_eq!(fwd.member("bk", ab)["backup"], true);
    assert_eq!(fwd.member("bk", a1)["backup"], false);
    for addr in [a1, a2, ab] {
        wait_reported(&fwd, "bk", addr, true, STEP_TIMEOUT);
    }
    // 1. Both primaries up.
    sessions(fwd.addr(), PER_PHASE);
    let primaries = |p1: &Option<Member>, p2: &Option<Member>| {
        p1.as_ref().map_or(0, Member::served) + p2.as_ref().map_or(0, Member::served)
    };
    assert_eq!(
        backup.served(),
        0,
        "the backup served while both primaries were up"
    );
    assert_eq!(primaries(&p1, &p2), PER_PHASE);
    // 2. Primary 1 closes its port; no waiting for the health check: a refused connect fails
    // over to primary 2, never to the backup.
    drop(p1.take());
    let p2_before = p2.as_ref().map_or(0, Member::served);
    sessions(fwd.addr(), PER_PHASE);
    assert_eq!(
        backup.served(),
        0,
        "the backup served while primary {a2} was up"
    );
    assert_eq!(
        p2.as_ref().map_or(0, Member::served) - p2_before,
        PER_PHASE,
        "primary {a2} serves every session while primary {a1} is closed"
    );
    // 3. Primary 2 closes too; once both are reported down, the backup serves every session.
    drop(p2.take());
    for addr in [a1, a2] {
        wait_reported(&fwd, "bk", addr, false, INTERVAL * FALL + MARGIN);
    }
    assert!(is_up(&fwd.member("bk", ab)));
    sessions(fwd.addr(), PER_PHASE);
    assert_eq!(backup.served(), PER_PHASE, "sessions through the backup");
    wait_until(STEP_TIMEOUT, "the backup's connections counted", || {
        let n = connections_total(&fwd.metrics(), "bk", ab);
        if n == PER_PHASE as f64 {
            Ok(())
        } else {
            Err(format!(
                "ringfwd_upstream_connections_total of the backup is {n}"
            ))
        }
    });
}

/// Reserves `[::1]:port` (bound, not listening: connects to it are refused) so that an ::1
/// address of `localhost` cannot reach another process. `None` without IPv6 loopback;
/// `Some(Err)` when the port is taken there.
fn reserve_v6(port: u16) -> Option<std::io::Result<Socket>> {
    let s = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP)).ok()?;
    let addr: SocketAddr = format!("[::1]:{port}").parse().expect("address");
    match s.bind(&addr.into()) {
        Ok(()) => Some(Ok(s)),
        Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => None,
        Err(e) => Some(Err(e)),
    }
}

/// `upstream = "localhost:PORT"` with only 127.0.0.1:PORT listening: every session succeeds
/// (an ::1 address, where localhost has one, is refused and failed over), `/upstreams` lists a
/// member per address localhost resolves to, all named `localhost:PORT`, the 127.0.0.1 one
/// with the connections, and the access log names 127.0.0.1:PORT as the upstream of each.
fn localhost_member_resolves(engine: &[&str]) {
    let _load = support::light();
    const SESSIONS: usize = 20;
    // 1. A member on 127.0.0.1:PORT, with [::1]:PORT held closed if IPv6 loopback exists.
    let (member, _v6) = (0..20)
        .find_map(|_| {
            let m = Member::echo();
            match reserve_v6(m.addr().port()) {
                None => Some((m, None)),
                Some(Ok(s)) => Some((m, Some(s))),
                Some(Err(_)) => None,
            }
        })
        .expect("a port free on both 127.0.0.1 and ::1");
    let v4 = member.addr();
    let name = format!("localhost:{}", v4.port());
    let resolved: BTreeSet<String> = ("localhost", v4.port())
        .to_socket_addrs()
        .expect("localhost resolves")
        .map(|a| a.to_string())
        .collect();
    assert!(
        resolved.contains(&v4.to_string()),
        "localhost → {resolved:?}"
    );
    let fwd = Forwarder::start(engine, &rule("lh", &format!("\"{name}\""), ""), 1);
    // 2. Every session succeeds, through 127.0.0.1.
    sessions(fwd.addr(), SESSIONS);
    assert_eq!(member.served(), SESSIONS);
    // 3. /upstreams: one member per resolved address, each named as written.
    let pool = fwd.pool("lh");
    let listed: BTreeSet<String> = members_of(&pool)
        .iter()
        .map(|m| {
            assert_eq!(m["name"], name.as_str(), "{m}");
            m["addr"]
                .as_str()
                .unwrap_or_else(|| panic!("no addr in {m}"))
                .to_string()
        })
        .collect();
    assert_eq!(
        listed, resolved,
        "members of \"{name}\" vs what it resolves to"
    );
    wait_until(STEP_TIMEOUT, "connections of the 127.0.0.1 member", || {
        let m: Value = fwd.member("lh", v4);
        let metric = connections_total(&fwd.metrics(), "lh", v4);
        if count(&m, "connections") == SESSIONS as u64 && metric == SESSIONS as f64 {
            Ok(())
        } else {
            Err(format!(
                "/upstreams {m}, ringfwd_upstream_connections_total {metric}"
            ))
        }
    });
    // 4. The access log names the member used; an ::1 attempt first makes it 2 attempts.
    let lines = fwd.wait_access_log(SESSIONS);
    for l in &lines {
        assert_eq!(
            l.upstream.as_deref(),
            Some(v4.to_string().as_str()),
            "{:?}",
            l.line
        );
        assert!(
            matches!(l.attempts, Some(1 | 2)),
            "attempts= missing or above 2: {:?}",
            l.line
        );
    }
}

/// A member that accepts and never answers (holds each connection for a minute, reading
/// nothing, writing nothing).
fn silent_member() -> Backend {
    Backend::spawn(|s| {
        std::thread::sleep(Duration::from_secs(60));
        drop(s);
    })
}

/// `[rule.health_check]` with `send`/`expect`: a member that accepts and never answers passes
/// a bare TCP check but fails the exchange, is reported down within fall × interval +
/// margin with `last_error` "timed out" and a timestamp, and gets no session; the echo member
/// (which answers `PING` with `PING`) stays up throughout, its `last_error` null.
fn send_expect_marks_a_member_that_never_answers_down(engine: &[&str]) {
    let _load = support::light();
    let good = Member::echo();
    let silent = silent_member();
    let (ag, as_) = (good.addr(), silent.addr());
    let check = "[rule.health_check]\ninterval = \"200ms\"\ntimeout = \"200ms\"\nrise = 2\nfall = 2\n\
                 send = \"PING\\r\\n\"\nexpect = \"PING\"\n";
    let fwd = Forwarder::start(engine, &rule("app", &toml_list([ag, as_]), check), 1);
    wait_reported(&fwd, "app", as_, false, INTERVAL * FALL + MARGIN);
    let m = fwd.member("app", as_);
    assert_eq!(m["last_error"], "timed out", "{m}");
    assert!(
        m["last_error_at"]
            .as_u64()
            .is_some_and(|t| t > 1_600_000_000),
        "{m}"
    );
    assert!(silent.accepted() >= FALL as usize, "the probes connected");
    // The good member answered every probe: up, no error, several checks passed.
    wait_until(STEP_TIMEOUT, "the good member's checks pass", || {
        let m = fwd.member("app", ag);
        let ok = m["health_checks"]["ok"].as_u64().unwrap_or(0);
        if is_up(&m) && ok > u64::from(FALL) && m["last_error"].is_null() {
            Ok(())
        } else {
            Err(format!("{m}"))
        }
    });
    assert_eq!(reported_up(&fwd, "app", ag), (Some(1.0), true));
    // Every session goes to the member that answers: each one is an echo round trip, which
    // the silent member would fail. `served` also counts the health checks' PING sessions
    // (one every 200 ms), so it grows by at least the ten.
    let before = good.served();
    sessions(fwd.addr(), 10);
    assert!(
        good.served() - before >= 10,
        "the sessions reached the good member"
    );
}

/// `first_byte_timeout = "500ms"`, `max_fails = 1`: clients that connect and say nothing
/// start no clock (neither member is blamed, however long they wait); a client that speaks
/// to the member that never answers is closed within the timeout (plus margin) as
/// `first_byte_timeout`, that member is reported down (passive health, `last_error` says
/// why), and every later session goes to the member that answers.
fn first_byte_timeout_fails_a_member_that_never_answers(engine: &[&str]) {
    let _load = support::light();
    let good = Member::echo();
    let silent = silent_member();
    let (ag, as_) = (good.addr(), silent.addr());
    let fwd = Forwarder::start(
        engine,
        &rule(
            "fb",
            &toml_list([ag, as_]),
            "first_byte_timeout = \"500ms\"\nmax_fails = 1\nfail_timeout = \"60s\"\n",
        ),
        1,
    );
    // 1. Silent clients until one reaches the silent member (round-robin per worker),
    // held three timeouts.
    let mut quiet = Vec::new();
    while silent.accepted() == 0 && quiet.len() < 20 {
        quiet.push(sock::try_connect(fwd.addr()).expect("connect"));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        silent.accepted() >= 1,
        "no silent client reached the member"
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        reported_up(&fwd, "fb", as_),
        (Some(1.0), true),
        "a silent client blamed it"
    );
    assert!(
        !fwd.stderr().contains("first_byte_timeout\""),
        "{}",
        fwd.stderr()
    );
    drop(quiet);
    // 2. Clients that speak, until one is sent to the silent member: it is closed, not
    // left hanging; the others are echoed.
    let mut closed = 0;
    for _ in 0..20 {
        let mut s = sock::try_connect(fwd.addr()).expect("connect");
        s.set_read_timeout(Some(Duration::from_millis(500) + MARGIN))
            .expect("timeout");
        s.write_all(b"ping").expect("write");
        let mut back = [0u8; 4];
        match s.read(&mut back) {
            Ok(4) => assert_eq!(&back, b"ping"),
            Ok(0) => closed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => closed += 1,
            other => panic!("neither an echo nor a close within the bound: {other:?}"),
        }
        if closed > 0 {
            break;
        }
    }
    assert_eq!(
        closed, 1,
        "no session reached the member that never answers"
    );
    // 3. Passive health took it out, saying why; the access log names the reason.
    wait_reported(&fwd, "fb", as_, false, STEP_TIMEOUT);
    let m = fwd.member("fb", as_);
    assert_eq!(m["last_error"], "no byte within first_byte_timeout", "{m}");
    assert_eq!(count(&m, "connect_errors"), 0, "{m}");
    assert!(
        fwd.stderr().contains("first_byte_timeout"),
        "{}",
        fwd.stderr()
    );
    assert!(is_up(&fwd.member("fb", ag)));
    let before = good.served();
    sessions(fwd.addr(), 10);
    assert_eq!(good.served() - before, 10);
}
