//! What the session pipeline adds per connection: choosing a member (each balancing algorithm,
//! small and large pools) and a whole session's bookkeeping (admit → dial → connected →
//! finish, access log off), so the cost of pools is a figure, not a guess.

use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use ringfwd::config::{Balance, Config, MemberSpec, Upstream};
use ringfwd::metrics::Metrics;
use ringfwd::session::outcome::CloseReason;
use ringfwd::session::{Dial, End, Runtime};
use ringfwd::upstream::{Picker, Pool, Tried};

/// Pool sizes: a typical pool, and a large DNS-discovered one.
const SIZES: [usize; 2] = [3, 100];
const BALANCES: [Balance; 4] = [
    Balance::RoundRobin,
    Balance::LeastConn,
    Balance::SourceHash,
    Balance::RandomTwo,
];

fn members(n: usize) -> Vec<MemberSpec> {
    (0..n)
        .map(|i| {
            let addr = SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 8080));
            MemberSpec::new(addr.to_string(), vec![addr])
        })
        .collect()
}

fn pick(c: &mut Criterion) {
    for n in SIZES {
        let pool = Pool::new("bench", &Upstream::with_members(members(n)), Instant::now());
        let set = pool.members();
        for balance in BALANCES {
            let mut picker = Picker::new(42);
            let mut k = 0u32;
            c.bench_function(&format!("pick: {} of {n}", balance.as_str()), |b| {
                b.iter(|| {
                    k = k.wrapping_add(1);
                    let ip = IpAddr::from(k.to_be_bytes());
                    black_box(picker.pick(&set, balance, Some(ip), &Tried::default(), 1))
                })
            });
        }
    }
}

fn session(c: &mut Criterion) {
    let mut config = Config::parse(
        "bench.toml",
        "[[rule]]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n",
    )
    .expect("config");
    config.rules[0].upstream = Upstream::with_members(members(3));
    let runtime = Runtime::new(&config);
    let metrics = Metrics::new(&["bench"], 1);
    let rt = runtime.rule(0);
    let shard = metrics.rule(0).shard(0);
    let mut picker = Picker::new(7);
    let client = Some(SocketAddr::from(([192, 168, 1, 2], 40000)));
    c.bench_function(
        "session: admit + dial + connected + finish (3 members)",
        |b| {
            b.iter(|| {
                let now = Instant::now();
                let mut s = rt.admit(shard, client, now, false).expect("admitted");
                let Dial::Connect(addr) = s.dial(rt, &mut picker, now) else {
                    panic!("no member")
                };
                black_box(addr);
                s.connected(shard, now);
                let end = End {
                    reason: CloseReason::Eof,
                    bytes: [1, 1],
                    path: "copy",
                };
                s.finish(rt, &metrics, shard, end, now);
            })
        },
    );
}

criterion_group!(benches, pick, session);
criterion_main!(benches);
