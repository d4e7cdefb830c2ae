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
    c.rules[0].upstream = up;
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
    let mut picker = Picker::new(1);
    let mut s = r.admit(shard, None, now, false).unwrap();
    let mut seen = Vec::new();
    // connect_retries = 2: three attempts, three different members, then the end.
    loop {
        match s.dial(r, &mut picker, now) {
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
    let members = r.pool.snapshot(now);
    let failed: u64 = members.iter().map(|m| m.connect_errors[0]).sum();
    assert_eq!(failed, 3);
    assert_eq!(members.iter().filter(|m| !m.up).count(), 3);
}

#[test]
fn a_timed_out_connect_gives_up_as_a_connect_timeout() {
    let (rt, m) = setup(&["127.0.0.1:1"], 5, 10);
    let (r, shard) = (rt.rule(0), m.rule(0).shard(0));
    let now = Instant::now();
    let mut picker = Picker::new(1);
    let mut s = r.admit(shard, None, now, false).unwrap();
    assert!(matches!(s.dial(r, &mut picker, now), Dial::Connect(_)));
    s.connect_failed(r, shard, libc::ECANCELED, now);
    // One member: retries never exceed the members.
    assert_eq!(
        s.dial(r, &mut picker, now),
        Dial::GiveUp(CloseReason::Upstream(ConnectError::Timeout))
    );
}

#[test]
fn out_of_fds_ends_the_session_but_a_foreign_family_fails_over() {
    let (rt, m) = setup(&["[::1]:1", "127.0.0.1:2"], 2, 10);
    let (r, shard) = (rt.rule(0), m.rule(0).shard(0));
    let now = Instant::now();
    let mut picker = Picker::new(1);
    let mut s = r.admit(shard, None, now, false).unwrap();
    assert!(matches!(s.dial(r, &mut picker, now), Dial::Connect(_)));
    assert_eq!(s.socket_failed(r, shard, libc::EAFNOSUPPORT, now), None);
    assert!(matches!(s.dial(r, &mut picker, now), Dial::Connect(_)));
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
    let mut picker = Picker::new(1);
    let mut s = r.admit(shard, None, now, false).unwrap();
    let Dial::Connect(addr) = s.dial(r, &mut picker, now) else {
        panic!()
    };
    s.connected(shard, now + Duration::from_millis(3));
    assert_eq!(s.upstream(), Some(addr));
    let member = |rt: &Runtime| {
        rt.rule(0)
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
