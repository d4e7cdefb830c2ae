//! The cost of recording one event on the data path (target: < 50 ns each), and, for
//! scale, the cost of what a scrape does with it (merge every shard, encode the text).
//!
//! Values are drawn from a seeded xorshift so every run records the same sequence, spread
//! over the whole 1 µs … 60 s range (worst case for cache locality in the counts array).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use ringfwd::metrics::{AtomicHistogram, Metrics, prom};
use ringfwd::vocab::{Direction, PathKind};

const SEED: u64 = 0x2545_f491_4f6c_dd1d;
/// Distinct values cycled through by the recording benches.
const VALUES: usize = 4096;
/// Shards per rule in the scrape benches (one per worker on this 2-core machine).
const SHARDS: usize = 2;
/// Events recorded into each histogram before the scrape benches.
const SCRAPE_EVENTS: u64 = 100_000;

fn values() -> Vec<u64> {
    let mut x = SEED;
    (0..VALUES)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Log-uniform over 1 µs … 60 s: latencies spread over decades.
            let decade = x % 8;
            1 + (x >> 8) % 10u64.pow(decade as u32)
        })
        .collect()
}

fn recording(c: &mut Criterion) {
    let vals = values();
    let durations: Vec<Duration> = vals.iter().map(|&us| Duration::from_micros(us)).collect();
    let h = AtomicHistogram::new();
    let mut i = 0usize;
    c.bench_function("AtomicHistogram::record(Duration)", |b| {
        b.iter(|| {
            i = (i + 1) % VALUES;
            h.record(black_box(durations[i]));
        })
    });
    let mut i = 0usize;
    c.bench_function("AtomicHistogram::record_micros", |b| {
        b.iter(|| {
            i = (i + 1) % VALUES;
            h.record_micros(black_box(vals[i]));
        })
    });

    let m = Metrics::new(&["web"], SHARDS);
    let shard = m.rule(0).shard(0);
    c.bench_function("Shard::bytes", |b| {
        b.iter(|| {
            shard.bytes(
                black_box(Direction::ClientToUpstream),
                black_box(PathKind::Copy),
                black_box(16384),
            )
        })
    });
    c.bench_function("RuleMetrics::local + tap() check (no tap)", |b| {
        b.iter(|| {
            let rm = black_box(m.rule(0));
            rm.local()
                .bytes(Direction::UpstreamToClient, PathKind::Copy, 1);
            black_box(rm.tap().is_some())
        })
    });
}

fn scraping(c: &mut Criterion) {
    let m = Metrics::new(&["web"], SHARDS);
    let vals = values();
    for (n, &us) in (0..SCRAPE_EVENTS).zip(vals.iter().cycle()) {
        let sh = m.rule(0).shard(n as usize);
        sh.connected(Duration::from_micros(us));
        sh.first_byte(Duration::from_micros(us));
        sh.closed(Duration::from_micros(us));
        sh.transfer(Direction::ClientToUpstream, Duration::from_micros(us));
        sh.transfer(Direction::UpstreamToClient, Duration::from_micros(us));
    }
    c.bench_function("RuleMetrics::snapshot (1 rule, 2 shards)", |b| {
        b.iter(|| black_box(m.rule(0).snapshot()))
    });
    let registry = prom::registry(m.clone());
    c.bench_function("prom::render (1 rule, 2 shards)", |b| {
        b.iter(|| black_box(prom::render(&registry)))
    });
}

criterion_group!(benches, recording, scraping);
criterion_main!(benches);
