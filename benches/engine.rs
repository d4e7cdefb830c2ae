//! The uring engine's per-operation bookkeeping, which every completion pays for:
//! `user_data` encode/decode, one relay state-machine step, returning a buffer to the
//! provided ring, and leasing/returning a pipe. Targets: each well under a microsecond, so
//! the loop's cost is the kernel's, not ours.

use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use io_uring::IoUring;
use ringfwd::config::DataPath;
use ringfwd::engine::uring::bufpool::BufPool;
use ringfwd::engine::uring::conn::{Actions, Conn, Event};
use ringfwd::engine::uring::pipepool::PipePool;
use ringfwd::engine::uring::token::{OpKind, Token};
use ringfwd::vocab::Direction;

/// Buffers in the pool bench (the engine's default per worker).
const BUFFERS: u16 = 64;
/// Size of each (the engine's default).
const BUF_SIZE: u32 = 32 << 10;

fn tokens(c: &mut Criterion) {
    let mut slot = 0u32;
    c.bench_function("token encode+decode", |b| {
        b.iter(|| {
            slot = slot.wrapping_add(7919);
            let t = Token::new(
                slot,
                (slot & 0xffff) as u16,
                Direction::UpstreamToClient,
                OpKind::Send,
            );
            black_box(Token::decode(black_box(t.encode())))
        })
    });
}

fn state_machine(c: &mut Criterion) {
    let now = Instant::now();
    let mut conn = Conn::new(now, DataPath::Copy, BUF_SIZE);
    let mut out = Actions::default();
    conn.handle(Event::Start, now, &mut out);
    conn.handle(Event::Connected { res: 0 }, now, &mut out);
    conn.handle(Event::ConnectTimerDone, now, &mut out);
    c.bench_function("conn: recv completion + send completion", |b| {
        b.iter(|| {
            let mut out = Actions::default();
            conn.handle(
                Event::Received {
                    dir: Direction::ClientToUpstream,
                    res: 1460,
                    buf: Some(3),
                    more: false,
                },
                now,
                &mut out,
            );
            conn.handle(
                Event::Sent {
                    dir: Direction::ClientToUpstream,
                    res: 1460,
                },
                now,
                &mut out,
            );
            black_box(out.len())
        })
    });
}

fn pools(c: &mut Criterion) {
    let ring = IoUring::new(8).expect("io_uring is needed for this bench");
    let (mut pool, _) = BufPool::new(&ring, BUFFERS, BUF_SIZE).expect("buffer pool");
    let mut bid = 0u16;
    // The kernel takes buffers off the ring only on recv; re-publishing one is what a
    // completed send costs us (ring entry write + tail store).
    c.bench_function("buffer pool: recycle one buffer", |b| {
        b.iter(|| {
            bid = (bid + 1) % BUFFERS;
            pool.recycle(black_box(bid));
        })
    });
    let mut pipes = PipePool::new(0, 4, 64 << 10);
    c.bench_function("pipe pool: lease + give back (empty)", |b| {
        b.iter(|| {
            let p = pipes.lease().expect("a pipe");
            pipes.give_back(black_box(p), true);
        })
    });
    drop(ring);
}

criterion_group!(benches, tokens, state_machine, pools);
criterion_main!(benches);
