//! The TCP semantics every engine must keep, written once and run for each engine.
//!
//! Each scenario below is a plain function taking the engine's extra `run` flags; the
//! [`engine_suite!`] lines at the bottom turn the whole list into one test module per engine
//! (`std_engine::ping_pong`, `tokio_engine::ping_pong`, …). A new engine or data path is one
//! more `engine_suite!` line. Suites whose flags name io_uring fail loudly where io_uring is
//! unavailable, unless `RINGFWD_SKIP_URING=1` (see `support::engine_available`).
//!
//! The forwarder is the real binary in a child process; upstreams are in-test servers on
//! loopback port 0, so each scenario decides exactly what the upstream does. Scenarios read as
//! numbered steps. Those that load the machine or measure the child run alone
//! (`support::heavy`); the others run in parallel with each other (`support::light`).

mod support;

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use support::data::{self, Hash};
use support::sock::{
    self, Backend, ClosedPort, End, Unresponsive, Upstream, connect, read_n, read_to_eof, wait_end,
};
use support::{Relay, STEP_TIMEOUT, procfs};

/// A one-second timeout, connect or grace, as the scenarios configure it.
const ONE_SECOND: Duration = Duration::from_secs(1);
/// How much earlier than configured a timer may seem to fire from the test's side: the test
/// starts its clock a little after the forwarder starts its own (the io_uring engine also
/// checks its timers on a 100 ms tick, late rather than early).
const TIMER_SLACK: Duration = Duration::from_millis(100);

support::engine_suite!(
    [
        ping_pong,
        large_payloads_both_ways,
        short_segments_through_one_slot_pipes,
        client_half_close_then_reply,
        upstream_half_close_then_client_data,
        upstream_reset_reaches_client,
        client_reset_reaches_upstream,
        refused_upstream_closes_client,
        connect_timeout_closes_client,
        connect_failures_are_logged_at_most_once_a_second,
        idle_timeout,
        data_half_close_and_reset_after_a_quiet_spell,
        slow_reader_backpressure,
        slow_reader_backpressure_small_writes,
        thousand_concurrent_connections,
        fd_exhaustion_backs_off_and_recovers,
        no_fd_or_close_wait_leak,
        graceful_shutdown_drains,
        shutdown_grace_ends_stuck_connections,
    ],
    std_engine: ["--engine", "std"],
    tokio_engine: ["--engine", "tokio"],
    uring_copy: ["--engine", "uring", "--mode", "copy"],
    uring_splice: ["--engine", "uring", "--mode", "splice"],
    uring_auto: ["--engine", "uring", "--mode", "auto"],
    // `[uring] wait = "epoll"`: the worker sleeps on an epoll set of its sockets.
    uring_auto_epoll: ["--engine", "uring", "--mode", "auto", "--uring-wait", "epoll"],
);

/// A client connected through the relay and the upstream end of the same connection.
fn pair(relay: &Relay, upstream: &Upstream) -> (TcpStream, TcpStream) {
    let client = connect(relay.addr());
    let server = upstream.accept();
    (client, server)
}

/// Writes `data` on `w` from a helper thread while reading the same amount from `r`, so
/// neither side's socket buffers can deadlock the transfer.
fn transfer(w: &TcpStream, r: &mut TcpStream, data: &[u8]) -> Vec<u8> {
    let mut w = w.try_clone().expect("clone stream");
    std::thread::scope(|s| {
        s.spawn(move || w.write_all(data).expect("write through the relay"));
        read_n(r, data.len())
    })
}

/// Small request/response exchanges, each message in two writes where the second waits
/// for the first to arrive: with Nagle's algorithm left on either relay socket, the second
/// write would wait for a delayed ACK (40 ms on Linux) and the round would take that long.
///
/// The pass mark is that stall, not the machine's speed: the median round must be under
/// [`DELAYED_ACK`] (with Nagle on, most rounds take at least that). The median itself
/// (well under a millisecond on an idle box) is printed; `scripts/bench.sh` measures round
/// trips (`rr64`, `rr16k`) properly.
fn ping_pong(engine: &[&str]) {
    let _load = support::light();
    const ROUNDS: usize = 300;
    /// Linux's minimum delayed-ACK timeout, what a Nagle stall costs a round.
    const DELAYED_ACK: Duration = Duration::from_millis(40);
    // 1. A forwarder in front of an upstream the test drives by hand.
    let upstream = Upstream::bind();
    let relay = Relay::start(engine, upstream.addr(), &[]);
    let (mut client, mut server) = pair(&relay, &upstream);
    let mut rng = StdRng::seed_from_u64(1);
    let mut rounds = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let started = Instant::now();
        // 2. The request goes up in two parts, the second after the first arrived.
        for _ in 0..2 {
            let len = rng.gen_range(1..=64);
            let part = data::bytes(&mut rng, len);
            client.write_all(&part).expect("client write");
            assert_eq!(read_n(&mut server, part.len()), part);
        }
        // 3. The reply comes down the same way.
        for _ in 0..2 {
            let len = rng.gen_range(1..=64);
            let part = data::bytes(&mut rng, len);
            server.write_all(&part).expect("upstream write");
            assert_eq!(read_n(&mut client, part.len()), part);
        }
        rounds.push(started.elapsed());
    }
    // 4. A delayed-ACK stall is rare noise, never the rule.
    rounds.sort();
    let median = rounds[ROUNDS / 2];
    let stalled = rounds.iter().filter(|&&r| r >= DELAYED_ACK).count();
    eprintln!(
        "ping/pong {engine:?}: median round {median:?}, {stalled} of {ROUNDS} rounds >= {DELAYED_ACK:?}"
    );
    assert!(
        median < DELAYED_ACK,
        "median ping/pong round {median:?} ({stalled} of {ROUNDS} rounds >= {DELAYED_ACK:?}): \
         Nagle left on a relay socket?"
    );
    // 5. A clean close both ways.
    client.shutdown(Shutdown::Write).expect("client FIN");
    assert!(read_to_eof(&mut server).is_empty());
    drop(server);
    assert!(read_to_eof(&mut client).is_empty());
}

/// Many concurrent connections each move several MiB both ways at once, byte-exact.
fn large_payloads_both_ways(engine: &[&str]) {
    let _load = support::heavy();
    const CONNS: u64 = 16;
    // The upstream reads a header (connection id, length to send back), then sends its own
    // seeded payload while hashing what it receives, and reports both hashes.
    let (tx, rx) = mpsc::channel::<(u64, u64, Hash, Hash)>();
    let backend = Backend::spawn(move |mut s| {
        let header = read_n(&mut s, 16);
        let id = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
        let down_len = u64::from_le_bytes(header[8..].try_into().expect("8 bytes"));
        let mut w = s.try_clone().expect("clone stream");
        let sent = std::thread::scope(|sc| {
            let sender = sc.spawn(move || {
                let h =
                    data::send_payload(&mut w, 1000 + id, usize::try_from(down_len).expect("fits"));
                w.shutdown(Shutdown::Write).expect("upstream FIN");
                h
            });
            let (n, received) = data::hash_to_eof(&mut s);
            (n, received, sender.join().expect("upstream sender"))
        });
        let _ = tx.send((id, sent.0, sent.1, sent.2));
    });
    let relay = Relay::start(engine, backend.addr(), &[]);
    let mut rng = StdRng::seed_from_u64(2);
    let lens: Vec<(usize, usize)> = (0..CONNS)
        .map(|_| {
            (
                rng.gen_range(3 << 20..4 << 20),
                rng.gen_range(3 << 20..4 << 20),
            )
        })
        .collect();
    // 1. Every connection sends its payload and reads the upstream's at the same time.
    let client_side: Vec<(Hash, u64, Hash)> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..CONNS)
            .map(|id| {
                let (up_len, down_len) = lens[usize::try_from(id).expect("fits")];
                let addr = relay.addr();
                sc.spawn(move || {
                    let mut c = connect(addr);
                    let mut header = id.to_le_bytes().to_vec();
                    header.extend_from_slice(&(down_len as u64).to_le_bytes());
                    c.write_all(&header).expect("header");
                    let mut w = c.try_clone().expect("clone stream");
                    std::thread::scope(|inner| {
                        let sender = inner.spawn(move || {
                            let h = data::send_payload(&mut w, id, up_len);
                            w.shutdown(Shutdown::Write).expect("client FIN");
                            h
                        });
                        let (n, received) = data::hash_to_eof(&mut c);
                        (sender.join().expect("client sender"), n, received)
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    // 2. Both directions of every connection arrived whole.
    let mut seen = 0;
    while seen < CONNS {
        let (id, up_n, up_received, down_sent) = rx
            .recv_timeout(STEP_TIMEOUT)
            .expect("every upstream connection reports");
        let i = usize::try_from(id).expect("fits");
        let (up_sent, down_n, down_received) = &client_side[i];
        assert_eq!(
            up_n, lens[i].0 as u64,
            "conn {id}: bytes client -> upstream"
        );
        assert_eq!(
            &up_received, up_sent,
            "conn {id}: client -> upstream corrupted"
        );
        assert_eq!(
            *down_n, lens[i].1 as u64,
            "conn {id}: bytes upstream -> client"
        );
        assert_eq!(
            down_received, &down_sent,
            "conn {id}: upstream -> client corrupted"
        );
        seen += 1;
    }
}

/// Short segments through one-slot pipes (`[uring] pipe_size = "4KiB"`): a splice that puts
/// a fragment shorter than the pipe into its only slot is answered EAGAIN by the next one
/// while the socket still holds bytes, and no readiness will come for bytes that are already
/// there. Every echoed byte must still arrive, without the client sending more to shake them
/// loose. (The `[uring]` table means nothing to the other engines; they simply relay.)
fn short_segments_through_one_slot_pipes(engine: &[&str]) {
    let _load = support::light();
    const MESSAGES: usize = 2000;
    const LEN: usize = 1000;
    let backend = Backend::echo();
    let config = format!(
        "[uring]\npipe_size = \"4KiB\"\n\n\
         [[rule]]\nname = \"short\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
        backend.addr()
    );
    let relay = Relay::start_config(engine, &config, 1);
    let mut client = connect(relay.addr());
    client.set_nodelay(true).expect("nodelay");
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    let sent = data::bytes(&mut StdRng::seed_from_u64(7), MESSAGES * LEN);
    let mut reader = client.try_clone().expect("clone");
    // 1. The client writes one short segment after another while reading the echo.
    let echoed = std::thread::scope(|s| {
        let want = sent.len();
        let r = s.spawn(move || {
            let mut got = Vec::with_capacity(want);
            let mut buf = [0u8; 64 << 10];
            while got.len() < want {
                match std::io::Read::read(&mut reader, &mut buf) {
                    Ok(0) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => panic!("the echo stalled after {} of {want} bytes: {e}", got.len()),
                }
            }
            got
        });
        for m in sent.chunks(LEN) {
            client.write_all(m).expect("client write");
        }
        r.join().expect("reader")
    });
    // 2. All of it came back, in order.
    assert_eq!(echoed.len(), sent.len(), "bytes echoed");
    assert!(echoed == sent, "the echo differs from what was sent");
}

/// A client's FIN must not end the reply: the request is half-closed, the answer follows.
fn client_half_close_then_reply(engine: &[&str]) {
    let _load = support::light();
    let upstream = Upstream::bind();
    let relay = Relay::start(engine, upstream.addr(), &[]);
    let mut rng = StdRng::seed_from_u64(3);
    let request = data::bytes(&mut rng, 256 << 10);
    let reply = data::bytes(&mut rng, 1 << 20);
    // 1. The client sends its whole request, then shuts down its write side.
    let mut client = connect(relay.addr());
    client.write_all(&request).expect("client write");
    client.shutdown(Shutdown::Write).expect("client FIN");
    // 2. The upstream reads the request up to EOF.
    let mut server = upstream.accept();
    assert!(read_to_eof(&mut server) == request, "request corrupted");
    // 3. Only then does it answer, and close.
    let reply_ref = &reply;
    std::thread::scope(|s| {
        s.spawn(move || {
            server.write_all(reply_ref).expect("upstream reply");
            drop(server);
        });
        // 4. The client receives the whole reply, then a clean EOF.
        let got = read_to_eof(&mut client);
        assert_eq!(got.len(), reply.len(), "reply truncated");
        assert!(got == reply, "reply corrupted");
    });
}

/// A connection quiet for longer than the io_uring engine waits before it parks an idle
/// direction (1 s: the armed recv is cancelled for a readiness poll) still carries data both
/// ways, a half-close and a reset, each after its own quiet spell. On the other engines it is
/// plain idleness, which they must survive too.
fn data_half_close_and_reset_after_a_quiet_spell(engine: &[&str]) {
    let _load = support::light();
    const QUIET: Duration = Duration::from_millis(2500);
    let upstream = Upstream::bind();
    let relay = Relay::start(engine, upstream.addr(), &[]);
    let mut rng = StdRng::seed_from_u64(11);
    // 1. One exchange, then silence.
    let (mut client, mut server) = pair(&relay, &upstream);
    client.write_all(b"hello").expect("client write");
    assert_eq!(read_n(&mut server, 5), b"hello");
    std::thread::sleep(QUIET);
    // 2. Data both ways after the pause, each direction woken by its own sender.
    let up = data::bytes(&mut rng, 64 << 10);
    assert!(
        transfer(&client, &mut server, &up) == up,
        "upload after a pause corrupted"
    );
    std::thread::sleep(QUIET);
    let down = data::bytes(&mut rng, 64 << 10);
    assert!(
        transfer(&server, &mut client, &down) == down,
        "download after a pause corrupted"
    );
    // 3. After another pause the client half-closes: the upstream sees EOF, and its reply
    //    still reaches the client, followed by a clean EOF.
    std::thread::sleep(QUIET);
    client.shutdown(Shutdown::Write).expect("client FIN");
    assert!(read_to_eof(&mut server).is_empty(), "bytes before the FIN");
    server.write_all(b"bye").expect("upstream reply");
    drop(server);
    assert_eq!(read_to_eof(&mut client), b"bye");
    // 4. A second connection, quiet, then the upstream resets: the client sees a reset.
    let (mut client, mut server) = pair(&relay, &upstream);
    client.write_all(b"ping").expect("client write");
    assert_eq!(read_n(&mut server, 4), b"ping");
    std::thread::sleep(QUIET);
    sock::reset(server);
    let (end, data) = wait_end(&mut client, STEP_TIMEOUT);
    assert_eq!(
        end,
        End::Reset,
        "a reset after a pause reached the client as {end:?}"
    );
    assert!(data.is_empty(), "unexpected bytes {data:?}");
}

/// An upstream's FIN must not end the client's upload.
fn upstream_half_close_then_client_data(engine: &[&str]) {
    let _load = support::light();
    let upstream = Upstream::bind();
    let relay = Relay::start(engine, upstream.addr(), &[]);
    let (mut client, mut server) = pair(&relay, &upstream);
    // 1. The upstream sends a banner and shuts down its write side.
    server.write_all(b"220 banner\r\n").expect("banner");
    server.shutdown(Shutdown::Write).expect("upstream FIN");
    // 2. The client reads the banner, then EOF.
    assert_eq!(read_to_eof(&mut client), b"220 banner\r\n");
    // 3. The client still sends 1 MiB and half-closes; the upstream receives all of it.
    let upload = data::bytes(&mut StdRng::seed_from_u64(4), 1 << 20);
    let mut w = client.try_clone().expect("clone stream");
    std::thread::scope(|s| {
        s.spawn(|| {
            w.write_all(&upload)
                .expect("client upload after upstream FIN");
            w.shutdown(Shutdown::Write).expect("client FIN");
        });
        let got = read_to_eof(&mut server);
        assert_eq!(got.len(), upload.len(), "upload truncated");
        assert!(got == upload, "upload corrupted");
    });
    // 4. Both sides are finished: the relay closes the client cleanly.
    drop(server);
    assert!(matches!(wait_end(&mut client, STEP_TIMEOUT).0, End::Eof));
}

/// An upstream RST reaches the client as an RST, not as a clean EOF.
fn upstream_reset_reaches_client(engine: &[&str]) {
    let _load = support::light();
    let upstream = Upstream::bind();
    let relay = Relay::start(engine, upstream.addr(), &[]);
    let (mut client, mut server) = pair(&relay, &upstream);
    // 1. Both directions are live.
    client.write_all(b"ping").expect("client write");
    assert_eq!(read_n(&mut server, 4), b"ping");
    // 2. The upstream sends a last message and resets.
    server.write_all(b"last words").expect("upstream write");
    sock::reset(server);
    // 3. The client may read (part of) the message, then must see ECONNRESET.
    let (end, data) = wait_end(&mut client, STEP_TIMEOUT);
    assert_eq!(
        end,
        End::Reset,
        "the upstream's reset reached the client as {end:?}"
    );
    assert!(
        b"last words".starts_with(&data),
        "unexpected bytes {data:?}"
    );
}

/// A client RST reaches the upstream as an RST, not as a clean EOF.
fn client_reset_reaches_upstream(engine: &[&str]) {
    let _load = support::light();
    let upstream = Upstream::bind();
    let relay = Relay::start(engine, upstream.addr(), &[]);
    let (mut client, mut server) = pair(&relay, &upstream);
    // 1. Both directions are live.
    client.write_all(b"ping").expect("client write");
    assert_eq!(read_n(&mut server, 4), b"ping");
    server.write_all(b"pong").expect("upstream write");
    assert_eq!(read_n(&mut client, 4), b"pong");
    // 2. The client resets.
    sock::reset(client);
    // 3. The upstream sees ECONNRESET.
    let (end, data) = wait_end(&mut server, STEP_TIMEOUT);
    assert_eq!(
        end,
        End::Reset,
        "the client's reset reached the upstream as {end:?}"
    );
    assert!(data.is_empty(), "unexpected bytes {data:?}");
}

/// A refused upstream closes the client at once (on the refusal, not on the connect timeout),
/// and the forwarder keeps serving.
fn refused_upstream_closes_client(engine: &[&str]) {
    let _load = support::light();
    // 1. The upstream port is bound but not listening: connects to it are refused. The connect
    //    timeout is far longer than the wait below, so only the refusal can close the client.
    let port = ClosedPort::new();
    let relay = Relay::start(engine, port.addr(), &["--connect-timeout", "120s"]);
    // 2. Each client is closed (EOF or reset).
    for i in 0..3 {
        let (end, took) = sock::connect_expect_closed(relay.addr(), STEP_TIMEOUT);
        assert!(
            end.is_closed(),
            "client {i} of a refused upstream: {end:?} after {took:?}"
        );
    }
    // 3. The upstream starts listening on the same port: the same forwarder now relays.
    let upstream = port.listen();
    let (mut client, mut server) = pair(&relay, &upstream);
    client.write_all(b"after").expect("client write");
    assert_eq!(read_n(&mut server, 5), b"after");
    server.write_all(b"ok").expect("upstream write");
    assert_eq!(read_n(&mut client, 2), b"ok");
}

/// An upstream that never completes the handshake closes the client after the connect
/// timeout (not before: that would be a refusal, not a timeout). The lower bound is the
/// property; the upper one only says it fired at all (the timeout plus [`STEP_TIMEOUT`]).
fn connect_timeout_closes_client(engine: &[&str]) {
    let _load = support::light();
    // 1. An upstream whose accept queue is full: SYNs to it are dropped.
    let blackhole = Unresponsive::new();
    let relay = Relay::start(engine, blackhole.addr(), &["--connect-timeout", "1s"]);
    // 2. A client connects; the forwarder's upstream connect hangs.
    // 3. The client is closed about one second later.
    let (end, took) = sock::connect_expect_closed(relay.addr(), ONE_SECOND + STEP_TIMEOUT);
    assert!(end.is_closed(), "{end:?} after {took:?}");
    eprintln!("connect timeout 1s {engine:?}: client closed after {took:?}");
    assert!(
        took >= ONE_SECOND - TIMER_SLACK,
        "closed after {took:?}, before the 1s connect timeout"
    );
    // 4. The access log calls it a connect timeout, not a refusal.
    let line = support::wait_for_line(&relay, "session closed", STEP_TIMEOUT);
    assert!(
        line.contains("reason=\"connect_timeout\"") || line.contains("reason=connect_timeout"),
        "{line}"
    );
    // 5. One attempt, so one timeout: what "not much later" meant, without a stopwatch.
    assert!(line.contains("attempts=1 "), "{line}");
}

/// During an outage every client fails, but the log does not: one line per member per
/// second at most, with how many were held back.
fn connect_failures_are_logged_at_most_once_a_second(engine: &[&str]) {
    let _load = support::light();
    const CLIENTS: usize = 100;
    // 1. An upstream that refuses every connect.
    let port = ClosedPort::new();
    let relay = Relay::start(engine, port.addr(), &[]);
    // 2. A burst of clients, each closed promptly.
    let started = Instant::now();
    for i in 0..CLIENTS {
        let (end, took) = sock::connect_expect_closed(relay.addr(), STEP_TIMEOUT);
        assert!(end.is_closed(), "client {i}: {end:?} after {took:?}");
    }
    let seconds = started.elapsed().as_secs() + 1;
    // 3. Every session ended (one access-log line each), but the warnings are few.
    let deadline = Instant::now() + STEP_TIMEOUT;
    while relay.stderr().matches("session closed").count() < CLIENTS && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = relay.stderr();
    assert_eq!(log.matches("session closed").count(), CLIENTS, "{log}");
    let warnings = log.matches("upstream connect failed").count() as u64;
    assert!(
        (1..=seconds + 1).contains(&warnings),
        "{warnings} connect-failure lines for {CLIENTS} clients in {seconds}s"
    );
}

/// With `--idle-timeout 2s` an idle pair is closed, not before the timeout, and a pair with a
/// byte every 200 ms in just one direction is not (a gap ten times shorter than the timeout,
/// so a descheduled test thread does not make a busy pair look idle). The upper bound only
/// says the timeout fired at all: the timeout plus [`STEP_TIMEOUT`].
fn idle_timeout(engine: &[&str]) {
    let _load = support::light();
    const IDLE: Duration = Duration::from_secs(2);
    let upstream = Upstream::bind();
    let relay = Relay::start(engine, upstream.addr(), &["--idle-timeout", "2s"]);
    let established = |relay: &Relay| {
        let (mut c, mut s) = pair(relay, &upstream);
        c.write_all(b"x").expect("client write");
        assert_eq!(read_n(&mut s, 1), b"x");
        s.write_all(b"y").expect("upstream write");
        assert_eq!(read_n(&mut c, 1), b"y");
        (c, s)
    };
    // 1. Three established pairs: idle, busy upstream-bound, busy client-bound.
    let (mut idle_c, mut idle_s) = established(&relay);
    let idle_since = Instant::now();
    let (up_c, up_s) = established(&relay);
    let (down_c, down_s) = established(&relay);
    std::thread::scope(|s| {
        // 2. The busy pairs carry one byte every 200 ms for 3 s, each in one direction only.
        for (mut from, mut to) in [(up_c, up_s), (down_s, down_c)] {
            s.spawn(move || {
                for i in 0..15u8 {
                    std::thread::sleep(Duration::from_millis(200));
                    from.write_all(&[i]).expect("busy pair closed by the relay");
                    assert_eq!(read_n(&mut to, 1), [i], "busy pair lost a byte");
                }
                // 4. ... and after 3 s they still close cleanly.
                from.shutdown(Shutdown::Write).expect("FIN");
                assert!(read_to_eof(&mut to).is_empty());
                drop(to);
                assert!(read_to_eof(&mut from).is_empty());
            });
        }
        // 3. The idle pair is closed on both sides, not before the timeout.
        let (end, _) = wait_end(&mut idle_c, IDLE + STEP_TIMEOUT);
        let took = idle_since.elapsed();
        assert!(end.is_closed(), "idle client after {took:?}: {end:?}");
        eprintln!("idle timeout 2s {engine:?}: idle pair closed after {took:?}");
        assert!(
            took >= IDLE - TIMER_SLACK,
            "idle pair closed after {took:?}, before the 2s idle timeout"
        );
        let (end, _) = wait_end(&mut idle_s, STEP_TIMEOUT);
        assert!(end.is_closed(), "idle upstream: {end:?}");
    });
}

/// A client uploading to an upstream that reads nothing is slowed to a stop by TCP flow
/// control through the relay: the relay buffers a bounded amount and its memory stays flat;
/// once the upstream drains, every accepted byte arrives intact.
fn slow_reader_backpressure(engine: &[&str]) {
    backpressure(engine, 256 << 10);
}

/// The same with 100-byte writes: the relay's reads are short, which on io_uring means one
/// multishot recv per direction, and bytes that arrive while its send waits for the window
/// must wait too (and stop the reading), in order.
fn slow_reader_backpressure_small_writes(engine: &[&str]) {
    backpressure(engine, 100);
}

/// A client writes `chunk`-byte writes as fast as it can for 2 s to an upstream that reads
/// nothing: the writes must block, the relay's memory stay flat, and every accepted byte
/// arrive once the upstream reads.
fn backpressure(engine: &[&str], chunk: usize) {
    let _load = support::heavy();
    const LIMIT: u64 = 64 << 20;
    let upstream = Upstream::bind();
    let relay = Relay::start(engine, upstream.addr(), &[]);
    // 1. Warm up (one exchange), then note the relay's resident memory.
    {
        let (mut c, mut s) = pair(&relay, &upstream);
        c.write_all(b"warm").expect("client write");
        assert_eq!(read_n(&mut s, 4), b"warm");
    }
    let baseline = procfs::rss(relay.pid());
    // 2. The client writes as fast as it can for 2 s; the upstream reads nothing.
    let (mut client, mut server) = pair(&relay, &upstream);
    client
        .set_write_timeout(Some(Duration::from_millis(100)))
        .expect("write timeout");
    let mut stream = data::Stream::new(9, chunk);
    let (mut stalls, mut at_one_second) = (0u32, None);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        match stream.write_once(&mut client) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                stalls += 1;
            }
            Err(e) => panic!("client write failed after {} bytes: {e}", stream.accepted),
        }
        if at_one_second.is_none() && started.elapsed() >= Duration::from_secs(1) {
            at_one_second = Some(stream.accepted);
        }
    }
    let accepted = stream.accepted;
    let peak = procfs::peak_rss(relay.pid());
    eprintln!(
        "backpressure: accepted {} KiB ({} KiB in the first second), {stalls} stalled writes, \
         relay RSS {} KiB -> peak {} KiB",
        accepted >> 10,
        at_one_second.unwrap_or(accepted) >> 10,
        baseline >> 10,
        peak >> 10
    );
    // 3. The writes blocked: TCP windows closed and the total stayed bounded (a relay that
    //    buffers without bound takes gigabytes in 2 s on loopback).
    assert!(
        accepted < LIMIT,
        "the relay let {accepted} bytes in without a reader"
    );
    // 4. The relay's memory stayed flat.
    assert!(
        peak < baseline + LIMIT,
        "relay peak RSS {peak} bytes, baseline {baseline}: it buffers without bound"
    );
    // 5. The upstream drains: every accepted byte arrives, in order.
    client
        .set_write_timeout(Some(STEP_TIMEOUT))
        .expect("write timeout");
    client.shutdown(Shutdown::Write).expect("client FIN");
    let (n, hash) = data::hash_to_eof(&mut server);
    assert_eq!(n, accepted, "bytes lost or added under backpressure");
    assert!(
        hash == stream.finish(),
        "bytes corrupted under backpressure"
    );
}

/// A thousand connections open at once, each with an echo exchange, then all closed.
fn thousand_concurrent_connections(engine: &[&str]) {
    let _load = support::heavy();
    // Test side 2 fds per connection, the relay 2: ~4000 of the 20000 the box allows.
    const N: usize = 1000;
    support::ensure_fd_limit(2 * N as u64 + 256);
    let backend = Backend::echo();
    let relay = Relay::start(engine, backend.addr(), &[]);
    // 1. Open all of them.
    let mut clients: Vec<TcpStream> = (0..N).map(|_| connect(relay.addr())).collect();
    // 2. Each sends its own message while all are open.
    for (i, c) in clients.iter_mut().enumerate() {
        c.write_all(format!("hello {i:04}").as_bytes())
            .expect("client write");
    }
    // 3. Each gets its own message back.
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(
            read_n(c, 10),
            format!("hello {i:04}").as_bytes(),
            "conn {i}"
        );
    }
    assert_eq!(backend.accepted(), N, "upstream connections");
    // 4. All close cleanly.
    for c in &clients {
        c.shutdown(Shutdown::Write).expect("client FIN");
    }
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(
            wait_end(c, STEP_TIMEOUT),
            (End::Eof, Vec::new()),
            "conn {i}"
        );
    }
}

/// Out of file descriptors, the relay neither spins nor dies: it serves what fits, backs off,
/// and serves again as soon as descriptors are free.
fn fd_exhaustion_backs_off_and_recovers(engine: &[&str]) {
    let _load = support::heavy();
    const ROOM: usize = 16;
    const CLIENTS: usize = 40;
    let backend = Backend::echo();
    let mut relay = Relay::start(engine, backend.addr(), &[]);
    // 1. A working connection first (threads, rings and pools are all up), then cap the
    //    relay's fds a few connections above what it holds now.
    let mut warm = connect(relay.addr());
    warm.write_all(b"warm").expect("write");
    assert_eq!(read_n(&mut warm, 4), b"warm");
    drop(warm);
    let base = procfs::fd_count(relay.pid());
    procfs::set_nofile_limit(relay.pid(), base + ROOM);
    // 2. Far more clients than fit: each sends a byte; the handshakes complete in the kernel.
    //    A client the relay accepts and resets at once (no fd for its upstream) may see the
    //    reset as the connect's own result: that is a correct refusal, not a failure.
    let mut clients: Vec<TcpStream> = (0..CLIENTS)
        .filter_map(|_| sock::try_connect(relay.addr()).ok())
        .collect();
    for c in &mut clients {
        let _ = c.write_all(b"x");
    }
    // 3. The relay reaches its limit (which of the clients got served first is a race
    //    between accepts and upstream sockets) and stays alive.
    assert!(support::eventually(STEP_TIMEOUT, || {
        procfs::fd_count(relay.pid()) >= base + ROOM - 4
    }));
    assert!(
        relay.is_running(),
        "relay died out of fds:\n{}",
        relay.stderr()
    );
    // 4. At the limit for a second: the accept path backs off instead of spinning.
    let t0 = procfs::cpu_ticks(relay.pid());
    std::thread::sleep(Duration::from_secs(1));
    let used = procfs::cpu_ticks(relay.pid()) - t0;
    assert!(
        used < 40,
        "relay used {used} ticks of CPU in 1 s while out of fds: spinning"
    );
    // 5. Everyone leaves; a new client is served again with no restart.
    drop(clients);
    let mut again = None;
    assert!(
        support::eventually(STEP_TIMEOUT, || {
            let Ok(mut c) = sock::try_connect(relay.addr()) else {
                return false;
            };
            if c.write_all(b"again").is_err() {
                return false;
            }
            let mut buf = [0u8; 5];
            let ok = std::io::Read::read_exact(&mut c, &mut buf).is_ok() && &buf == b"again";
            if ok {
                again = Some(c);
            }
            ok
        }),
        "no connection served after the fds were freed:\n{}",
        relay.stderr()
    );
}

/// After hundreds of connections with every kind of ending, the relay holds no more fds than
/// before and no socket in CLOSE_WAIT (a peer closed, the relay did not).
fn no_fd_or_close_wait_leak(engine: &[&str]) {
    let _load = support::light();
    const CONNS: usize = 300;
    const THREADS: usize = 4;
    // The upstream obeys the client's first byte: E echo, R reply then reset, C close first.
    let backend = Backend::spawn(|mut s| {
        let mut cmd = [0u8; 1];
        if std::io::Read::read_exact(&mut s, &mut cmd).is_err() {
            return;
        }
        match &cmd {
            b"R" => {
                let msg = read_n(&mut s, 4);
                s.write_all(&msg).expect("upstream write");
                sock::reset(s);
            }
            b"C" => {
                let _ = s.write_all(b"bye");
            }
            _ => sock::echo(s),
        }
    });
    let refused = ClosedPort::new();
    let config = format!(
        "[[rule]]\nname = \"live\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n\n\
         [[rule]]\nname = \"refused\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
        backend.addr(),
        refused.addr()
    );
    let relay = Relay::start_config(engine, &config, 2);
    let (live, dead) = (relay.addr_of("live"), relay.addr_of("refused"));
    let pid = relay.pid();
    let only_listeners = || procfs::tcp_sockets(pid).iter().all(|e| e.state == "LISTEN");
    // 1. A warm-up round of the same mix lets the engine create whatever it creates once
    //    (runtime, pools); when its sessions are gone, note the relay's descriptors.
    mixed_endings(live, dead, 7 * THREADS, THREADS);
    assert!(
        support::eventually(STEP_TIMEOUT, only_listeners),
        "warm-up sessions still open:\n{}",
        procfs::describe_fds(pid).join("\n")
    );
    let baseline = procfs::fd_count(pid);
    // 2. Connections ending every way there is, from a few threads at once.
    mixed_endings(live, dead, CONNS, THREADS);
    // 3. The relay returns to its baseline of descriptors ...
    let mut now = usize::MAX;
    let settled = support::eventually(STEP_TIMEOUT, || {
        now = procfs::fd_count(pid);
        now <= baseline && only_listeners()
    });
    assert!(
        settled,
        "relay fds: {baseline} before, {now} after {CONNS} closed connections:\n{}",
        procfs::describe_fds(pid).join("\n")
    );
    // 4. ... and holds no socket in CLOSE_WAIT.
    let stuck = procfs::close_wait_sockets(pid);
    assert!(stuck.is_empty(), "relay sockets in CLOSE_WAIT: {stuck:?}");
}

/// `count` connections through the scripted upstream of [`no_fd_or_close_wait_leak`] (or
/// the refusing rule), cycling through every way a session can end, from `threads` threads.
fn mixed_endings(live: SocketAddr, dead: SocketAddr, count: usize, threads: usize) {
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                for i in (t..count).step_by(threads) {
                    match i % 7 {
                        // Clean close, client first.
                        0 => {
                            let mut c = connect(live);
                            c.write_all(b"Eping").expect("write");
                            assert_eq!(read_n(&mut c, 4), b"ping");
                            c.shutdown(Shutdown::Write).expect("FIN");
                            assert!(read_to_eof(&mut c).is_empty());
                        }
                        // Request, half-close, then the whole answer.
                        1 => {
                            let mut c = connect(live);
                            let body = vec![b'h'; 10 << 10];
                            c.write_all(b"E").expect("write");
                            c.write_all(&body).expect("write");
                            c.shutdown(Shutdown::Write).expect("FIN");
                            assert_eq!(read_to_eof(&mut c).len(), body.len());
                        }
                        // Client resets mid-session.
                        2 => {
                            let mut c = connect(live);
                            c.write_all(b"Eping").expect("write");
                            assert_eq!(read_n(&mut c, 4), b"ping");
                            sock::reset(c);
                        }
                        // Upstream resets mid-session.
                        3 => {
                            let mut c = connect(live);
                            c.write_all(b"Rping").expect("write");
                            let (end, data) = wait_end(&mut c, STEP_TIMEOUT);
                            assert_eq!(end, End::Reset, "conn {i}");
                            assert!(b"ping".starts_with(&data));
                        }
                        // Upstream closes first.
                        4 => {
                            let mut c = connect(live);
                            c.write_all(b"C").expect("write");
                            assert_eq!(read_to_eof(&mut c), b"bye");
                        }
                        // Upstream refuses.
                        5 => {
                            let (end, _) = sock::connect_expect_closed(dead, STEP_TIMEOUT);
                            assert!(end.is_closed(), "conn {i}: {end:?}");
                        }
                        // Client gives up before sending anything.
                        _ => drop(connect(live)),
                    }
                }
            });
        }
    });
}

/// SIGTERM closes the listener at once, lets a live connection finish on its own time, and
/// the process exits 0 once it has.
fn graceful_shutdown_drains(engine: &[&str]) {
    let _load = support::light();
    let backend = Backend::echo();
    // A grace far longer than any wait below: a process that waited it out instead of
    // exiting when its last connection ended fails however slow the machine is.
    let mut relay = Relay::start(engine, backend.addr(), &["--shutdown-grace", "120s"]);
    // 1. A live connection.
    let mut live = connect(relay.addr());
    live.write_all(b"before").expect("write");
    assert_eq!(read_n(&mut live, 6), b"before");
    // 2. SIGTERM: new connections are refused once the listener is closed.
    relay.sigterm();
    let addr = relay.addr();
    let refused = support::eventually(STEP_TIMEOUT, || {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
            Ok(_) => false,
        }
    });
    assert!(
        refused,
        "the listener still accepts {STEP_TIMEOUT:?} after SIGTERM"
    );
    // 3. The live connection still flows both ways, and the process waits for it.
    let payload = data::bytes(&mut StdRng::seed_from_u64(12), 1 << 20);
    assert!(transfer(&live, &mut live.try_clone().expect("clone"), &payload) == payload);
    for i in 0..20u8 {
        live.write_all(&[i; 100]).expect("write while draining");
        assert_eq!(read_n(&mut live, 100), [i; 100]);
    }
    assert!(relay.is_running(), "exited while a connection was live");
    // 4. The connection ends; the process exits 0.
    live.shutdown(Shutdown::Write).expect("FIN");
    assert!(read_to_eof(&mut live).is_empty());
    drop(live);
    match relay.wait_exit(STEP_TIMEOUT) {
        Some(status) => assert!(status.success(), "exit status {status}"),
        None => panic!("still running {STEP_TIMEOUT:?} after its last connection ended"),
    }
    // 5. It says what happened to the connections it had.
    // (At least the live one: a connection that closed on its own after SIGTERM counts too.)
    let line = support::wait_for_line(&relay, "stopped:", STEP_TIMEOUT);
    assert!(
        line.contains("connections drained, 0 cut") && !line.contains(" 0 connections drained"),
        "{line}"
    );
}

/// With `--shutdown-grace 1s`, a connection that never ends is closed after the grace (not
/// before), and the process exits.
fn shutdown_grace_ends_stuck_connections(engine: &[&str]) {
    let _load = support::light();
    let backend = Backend::echo();
    let mut relay = Relay::start(engine, backend.addr(), &["--shutdown-grace", "1s"]);
    // 1. A live connection that will never end by itself.
    let mut live = connect(relay.addr());
    live.write_all(b"hello").expect("write");
    assert_eq!(read_n(&mut live, 5), b"hello");
    // 2. SIGTERM; the connection is still served during the grace period.
    let signalled = Instant::now();
    relay.sigterm();
    live.write_all(b"still").expect("write during grace");
    assert_eq!(read_n(&mut live, 5), b"still");
    // 3. About a second later the relay cuts it, with RST: a cut transfer must never read
    //    as a clean end of stream ...
    //    (Not before the grace; the upper bound only says it was cut at all.)
    let (end, _) = wait_end(&mut live, ONE_SECOND + STEP_TIMEOUT);
    let took = signalled.elapsed();
    assert_eq!(end, End::Reset, "{took:?} after SIGTERM");
    eprintln!("shutdown grace 1s {engine:?}: cut {took:?} after SIGTERM");
    assert!(
        took >= ONE_SECOND - TIMER_SLACK,
        "closed {took:?} after SIGTERM, before the 1s grace"
    );
    // 4. ... and exits, saying it cut one.
    match relay.wait_exit(STEP_TIMEOUT) {
        Some(status) => assert!(status.success(), "exit status {status}"),
        None => panic!("still running {:?} after SIGTERM", signalled.elapsed()),
    }
    let line = support::wait_for_line(&relay, "stopped:", STEP_TIMEOUT);
    assert!(line.contains("connections drained, 1 cut"), "{line}");
}
