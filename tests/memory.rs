//! How the forwarder's memory is mapped: the relay runs on 4 KiB pages, so that what a
//! connection costs is what it touches, not a share of a 2 MiB transparent huge page (the
//! allocator asks for those on its arena; see `ringfwd::thp`).

mod support;

use support::Relay;
use support::sock::Upstream;

support::engine_suite!(
    [the_relay_refuses_transparent_huge_pages],
    std_engine: ["--engine", "std"],
    tokio_engine: ["--engine", "tokio"],
    uring_copy: ["--engine", "uring", "--mode", "copy"],
    uring_splice: ["--engine", "uring", "--mode", "splice"],
    uring_auto: ["--engine", "uring", "--mode", "auto"],
);

/// `THP_enabled` of `/proc/PID/status`: 0 once the process has set `PR_SET_THP_DISABLE`.
fn thp_enabled(pid: i32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no THP_enabled in /proc/{pid}/status"))
}

/// 1. The relay is up (listening); 2. the kernel reports THP off for the whole process.
fn the_relay_refuses_transparent_huge_pages(engine: &[&str]) {
    let upstream = Upstream::bind();
    let relay = Relay::start(engine, upstream.addr(), &[]);
    assert_eq!(thp_enabled(relay.pid()), "0", "{engine:?}");
}
