//! Copy vs splice through real loopback TCP socket pairs: one relay step moving
//! `TRANSFER` bytes from one connection to another, four ways:
//!
//! - `read_write`: blocking `read`/`write` through a 64 KiB user buffer (the std baseline);
//! - `uring_copy`: io_uring `RECV` into a buffer then `SEND` from it (the copy path's shape);
//! - `poll_splice`: io_uring readiness (`POLL_ADD`) + direct non-blocking `splice(2)` on this
//!   thread, with the engine's own pump (design (a), the one the engine uses);
//! - `uring_splice`: `IORING_OP_SPLICE` socket → pipe → socket after readiness (design (b)).
//!
//! Each also runs with a 64 KiB and a 1 MiB pipe where a pipe is involved. Reading: the
//! throughput criterion prints is for one relay hop sharing this 2-core machine with the
//! writer and reader threads — compare the rows with each other, not with a NIC.
#![allow(unsafe_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::thread::JoinHandle;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use io_uring::{IoUring, opcode, types};
use ringfwd::engine::uring::pipepool::make_pipe;
use ringfwd::engine::uring::splice::{SpliceDir, SysPipeIo};

/// Bytes moved per measured iteration.
const TRANSFER: usize = 16 << 20;
/// User buffer of the copy variants.
const COPY_BUF: usize = 64 << 10;

struct Rig {
    relay_in: TcpStream,
    relay_out: TcpStream,
    writer: Option<JoinHandle<()>>,
    reader: Option<JoinHandle<usize>>,
}

fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (b, _) = l.accept().unwrap();
    (a, b)
}

impl Rig {
    fn new(nonblocking: bool) -> Self {
        let (src, relay_in) = pair();
        let (relay_out, mut sink) = pair();
        relay_in.set_nonblocking(nonblocking).unwrap();
        relay_out.set_nonblocking(nonblocking).unwrap();
        let writer = std::thread::spawn(move || {
            let mut src = src;
            let chunk = vec![0x5au8; 256 << 10];
            let mut left = TRANSFER;
            while left > 0 {
                let n = left.min(chunk.len());
                src.write_all(&chunk[..n]).unwrap();
                left -= n;
            }
            src.shutdown(Shutdown::Write).unwrap();
        });
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 << 10];
            let mut total = 0;
            loop {
                match sink.read(&mut buf).unwrap() {
                    0 => return total,
                    n => total += n,
                }
            }
        });
        Rig {
            relay_in,
            relay_out,
            writer: Some(writer),
            reader: Some(reader),
        }
    }

    fn finish(mut self) {
        self.relay_out.shutdown(Shutdown::Write).unwrap();
        self.writer.take().unwrap().join().unwrap();
        let got = self.reader.take().unwrap().join().unwrap();
        assert_eq!(got, TRANSFER, "relay lost bytes");
    }
}

fn read_write(rig: &mut Rig) {
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        let n = rig.relay_in.read(&mut buf).unwrap();
        if n == 0 {
            return;
        }
        rig.relay_out.write_all(&buf[..n]).unwrap();
    }
}

fn submit_wait(ring: &mut IoUring, e: io_uring::squeue::Entry) -> i32 {
    // SAFETY: every entry built here points at memory (`buf` of the caller) that outlives the
    // wait below, which returns only once this single op has completed.
    unsafe { ring.submission().push(&e).unwrap() };
    ring.submit_and_wait(1).unwrap();
    let c = ring.completion().next().expect("one completion");
    c.result()
}

fn uring_copy(ring: &mut IoUring, rig: &mut Rig) {
    let mut buf = vec![0u8; COPY_BUF];
    let (src, dst) = (
        types::Fd(rig.relay_in.as_raw_fd()),
        types::Fd(rig.relay_out.as_raw_fd()),
    );
    loop {
        let n = submit_wait(
            ring,
            opcode::Recv::new(src, buf.as_mut_ptr(), COPY_BUF as u32).build(),
        );
        assert!(n >= 0, "recv: {n}");
        if n == 0 {
            return;
        }
        let mut off = 0;
        while off < n as usize {
            let w = submit_wait(
                ring,
                opcode::Send::new(dst, buf[off..].as_ptr(), (n as usize - off) as u32).build(),
            );
            assert!(w > 0, "send: {w}");
            off += w as usize;
        }
    }
}

fn wait_poll(ring: &mut IoUring, fd: i32, events: i16) {
    let r = submit_wait(
        ring,
        opcode::PollAdd::new(types::Fd(fd), events as u32).build(),
    );
    assert!(r >= 0, "poll: {r}");
}

fn poll_splice(ring: &mut IoUring, rig: &mut Rig, pipe_size: usize) {
    let pipe = make_pipe(pipe_size).unwrap();
    let src: OwnedFd = rig.relay_in.try_clone().unwrap().into();
    let dst: OwnedFd = rig.relay_out.try_clone().unwrap().into();
    let mut dir = SpliceDir::new(pipe.capacity);
    loop {
        let p = dir.pump(&mut SysPipeIo {
            src: &src,
            dst: &dst,
            pipe: &pipe,
        });
        assert_eq!(p.error, None);
        if p.finished {
            return;
        }
        if p.need_writable {
            wait_poll(ring, dst.as_raw_fd(), libc::POLLOUT);
        } else if !p.again {
            wait_poll(ring, src.as_raw_fd(), libc::POLLIN);
        }
    }
}

fn uring_splice(ring: &mut IoUring, rig: &mut Rig, pipe_size: usize) {
    let pipe = make_pipe(pipe_size).unwrap();
    let (src, dst) = (rig.relay_in.as_raw_fd(), rig.relay_out.as_raw_fd());
    let (pr, pw) = (pipe.read.as_raw_fd(), pipe.write.as_raw_fd());
    let flags = libc::SPLICE_F_NONBLOCK;
    let mut in_pipe = 0usize;
    let mut eof = false;
    loop {
        if !eof && in_pipe < pipe.capacity {
            let room = (pipe.capacity - in_pipe) as u32;
            let r = submit_wait(
                ring,
                opcode::Splice::new(types::Fd(src), -1, types::Fd(pw), -1, room)
                    .flags(flags)
                    .build(),
            );
            match r {
                0 => eof = true,
                n if n > 0 => in_pipe += n as usize,
                e if -e == libc::EAGAIN => {
                    if in_pipe == 0 {
                        wait_poll(ring, src, libc::POLLIN);
                        continue;
                    }
                }
                e => panic!("splice in: {e}"),
            }
        }
        if in_pipe > 0 {
            let r = submit_wait(
                ring,
                opcode::Splice::new(types::Fd(pr), -1, types::Fd(dst), -1, in_pipe as u32)
                    .flags(flags)
                    .build(),
            );
            match r {
                n if n > 0 => in_pipe -= n as usize,
                e if -e == libc::EAGAIN => wait_poll(ring, dst, libc::POLLOUT),
                e => panic!("splice out: {e}"),
            }
        }
        if eof && in_pipe == 0 {
            return;
        }
    }
}

fn bench(c: &mut Criterion) {
    let mut ring = IoUring::new(64).expect("io_uring is needed for these benches");
    let mut g = c.benchmark_group("relay_hop");
    g.throughput(Throughput::Bytes(TRANSFER as u64))
        .sample_size(10);
    g.bench_function("read_write", |b| {
        b.iter_batched(
            || Rig::new(false),
            |mut r| {
                read_write(&mut r);
                r
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("uring_copy", |b| {
        b.iter_batched(
            || Rig::new(true),
            |mut r| {
                uring_copy(&mut ring, &mut r);
                r
            },
            BatchSize::PerIteration,
        )
    });
    for (name, size) in [("64KiB", 64 << 10), ("1MiB", 1 << 20)] {
        g.bench_function(format!("poll_splice/{name}"), |b| {
            b.iter_batched(
                || Rig::new(true),
                |mut r| {
                    poll_splice(&mut ring, &mut r, size);
                    r
                },
                BatchSize::PerIteration,
            )
        });
        g.bench_function(format!("uring_splice/{name}"), |b| {
            b.iter_batched(
                || Rig::new(true),
                |mut r| {
                    uring_splice(&mut ring, &mut r, size);
                    r
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
    // The rigs are finished outside the timing by iter_batched's drop; check them here once.
    let mut r = Rig::new(false);
    read_write(&mut r);
    r.finish();
    let mut r = Rig::new(true);
    poll_splice(&mut ring, &mut r, 1 << 20);
    r.finish();
    let mut r = Rig::new(true);
    uring_splice(&mut ring, &mut r, 1 << 20);
    r.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
