//! Where an io_uring worker sleeps (`[uring] wait`, `--uring-wait`): with `epoll` it sleeps in
//! `epoll_wait` on its sockets, so that their wake-ups reach it the way they reach an epoll
//! server, and it goes back to sleeping in the ring whenever something may complete without a
//! socket waking (a connect's timeout timer). The whole semantic suite also runs with the
//! epoll wait (`tests/semantics.rs`, `uring_auto_epoll`); these tests look at the mechanism
//! itself, through the system call each worker thread is blocked in
//! (`/proc/PID/task/TID/syscall`).

mod support;

use std::io::Write;
use std::time::{Duration, Instant};

use support::sock::{self, Backend, Unresponsive, read_n};
use support::{Relay, STEP_TIMEOUT};

const EPOLL: &[&str] = &[
    "--engine",
    "uring",
    "--uring-wait",
    "epoll",
    "--workers",
    "1",
];
const RING: &[&str] = &[
    "--engine",
    "uring",
    "--uring-wait",
    "ring",
    "--workers",
    "1",
];

/// Where the worker thread sleeps, as far as these tests tell them apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sleep {
    Epoll,
    Ring,
    /// Running, or blocked in some other call.
    Other,
}

/// The system call the forwarder's (only) worker thread is blocked in right now.
fn worker_sleep(pid: i32) -> Sleep {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the forwarder's threads");
    for t in tasks.flatten() {
        let dir = t.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if !comm.starts_with("ringfwd-w") {
            continue;
        }
        let call = std::fs::read_to_string(dir.join("syscall")).unwrap_or_default();
        let nr: i64 = match call.split_whitespace().next().map(str::parse) {
            Some(Ok(nr)) => nr,
            _ => return Sleep::Other, // "running"
        };
        return if nr == libc::SYS_epoll_wait || nr == libc::SYS_epoll_pwait {
            Sleep::Epoll
        } else if nr == libc::SYS_io_uring_enter {
            Sleep::Ring
        } else {
            Sleep::Other
        };
    }
    panic!("no ringfwd-w* thread in {pid}");
}

/// Waits (bounded) until the worker is seen asleep in `want`.
fn wait_sleep(relay: &Relay, want: Sleep) {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let now = worker_sleep(relay.pid());
        if now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the worker never slept in {want:?} (last: {now:?})"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// How often each sleep is seen in `samples` looks over about `samples` × 10 ms.
fn sample_sleeps(relay: &Relay, samples: usize) -> (usize, usize) {
    let (mut epoll, mut ring) = (0, 0);
    for _ in 0..samples {
        match worker_sleep(relay.pid()) {
            Sleep::Epoll => epoll += 1,
            Sleep::Ring => ring += 1,
            Sleep::Other => {}
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    (epoll, ring)
}

/// With `wait = "epoll"`, a worker with an idle connection sleeps in epoll_wait, and round
/// trips through it are served (each one is a socket wake-up that only the epoll set can
/// pass on: the ring does not wake a worker that is not waiting in it).
#[test]
fn epoll_wait_sleeps_in_epoll_and_serves_round_trips() {
    if !support::engine_available(EPOLL) {
        return;
    }
    let _load = support::light();
    // 1. A forwarder with one worker in the epoll wait, in front of an echo backend.
    let backend = Backend::echo();
    let relay = Relay::start(EPOLL, backend.addr(), &[]);
    // 2. Round trips through it, every byte back.
    let mut client = sock::connect(relay.addr());
    for i in 0..200u32 {
        let msg = format!("round {i:08}");
        client.write_all(msg.as_bytes()).expect("client write");
        assert_eq!(read_n(&mut client, msg.len()), msg.as_bytes());
    }
    // 3. Idle again: the worker sleeps in epoll_wait, not in the ring.
    wait_sleep(&relay, Sleep::Epoll);
    let (_, ring) = sample_sleeps(&relay, 20);
    assert_eq!(
        ring, 0,
        "an idle worker with wait = epoll slept in io_uring_enter"
    );
    // 4. Once more after the idle spell.
    client.write_all(b"after the sleep").expect("client write");
    assert_eq!(read_n(&mut client, 15), b"after the sleep");
}

/// The default-off mode for contrast: `wait = "ring"` sleeps in io_uring_enter.
#[test]
fn ring_wait_sleeps_in_the_ring() {
    if !support::engine_available(RING) {
        return;
    }
    let _load = support::light();
    let backend = Backend::echo();
    let relay = Relay::start(RING, backend.addr(), &[]);
    let mut client = sock::connect(relay.addr());
    client.write_all(b"ping").expect("client write");
    assert_eq!(read_n(&mut client, 4), b"ping");
    wait_sleep(&relay, Sleep::Ring);
    let (epoll, _) = sample_sleeps(&relay, 10);
    assert_eq!(epoll, 0, "wait = ring slept in epoll_wait");
}

/// A connect's timeout is a timer that completes without any socket waking, which the epoll
/// set would not notice: while a connect is in flight the worker sleeps in the ring, and the
/// timeout closes the client; then it sleeps in epoll again.
#[test]
fn epoll_wait_sleeps_in_the_ring_while_a_connect_is_in_flight() {
    if !support::engine_available(EPOLL) {
        return;
    }
    let _load = support::light();
    // 1. An upstream whose SYNs are dropped, a 2 s connect timeout.
    let blackhole = Unresponsive::new();
    let relay = Relay::start(EPOLL, blackhole.addr(), &["--connect-timeout", "2s"]);
    wait_sleep(&relay, Sleep::Epoll);
    // 2. A client whose upstream connect hangs, watched from a helper thread.
    let addr = relay.addr();
    let client = std::thread::spawn(move || sock::connect_expect_closed(addr, 2 * STEP_TIMEOUT));
    // 3. While the connect hangs, the worker sleeps in the ring and never in epoll_wait.
    wait_sleep(&relay, Sleep::Ring);
    let (epoll, ring) = sample_sleeps(&relay, 50);
    assert_eq!(
        epoll, 0,
        "slept in epoll_wait with a connect timeout pending ({ring} in the ring)"
    );
    // 4. The timeout closes the client, and the worker is back in epoll_wait.
    let (end, took) = client.join().expect("client thread");
    assert!(end.is_closed(), "{end:?} after {took:?}");
    let line = support::wait_for_line(&relay, "session closed", STEP_TIMEOUT);
    assert!(line.contains("connect_timeout"), "{line}");
    wait_sleep(&relay, Sleep::Epoll);
}
