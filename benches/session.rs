//! What the session pipeline adds per connection: choosing a member (each balancing algorithm,
//! small and large pools) and a whole session's bookkeeping as its steps (accepted →
//! connect → connected → relay ended → closed, access log off), and the same with SNI routing (the ClientHello read and matched),
//! so the cost of pools and routes is a figure, not a guess.

use std::hint::black_box;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use ringfwd::config::{Balance, Config, MemberSpec, Upstream};
use ringfwd::metrics::Metrics;
use ringfwd::session::outcome::CloseReason;
use ringfwd::session::step::End;
use ringfwd::session::{Accepted, Cx, RuleRuntime, Runtime, Session, Step};
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

/// One whole session's bookkeeping, step by step as an engine drives it: accepted, the
/// ClientHello routed (`hello`), connect, connected, relay, relay ended, closed.
fn one_session(
    rt: &RuleRuntime,
    metrics: &Metrics,
    pickers: &mut [Picker],
    client: Option<SocketAddr>,
    hello: Option<&[u8]>,
) {
    let sink = metrics.sink(metrics.rule(0).shard(0));
    let mut cx = Cx {
        rule: rt,
        rec: &sink,
        pickers: Some(pickers),
    };
    let now = Instant::now();
    let accepted = Accepted {
        peer: client,
        dead: false,
        port: 4444,
    };
    let mut s = Session::accept(&cx, accepted, now, false).expect("admitted");
    let mut step = s.start(&mut cx, None, now);
    if let Some(hello) = hello {
        assert!(matches!(step, Step::ReadPreamble { .. }));
        step = s.on_preamble(&mut cx, black_box(hello), now);
    }
    let Step::Connect { addr, .. } = step else {
        panic!("no member")
    };
    black_box(addr);
    let step = s.on_connected(&cx, now);
    assert!(matches!(
        step,
        Step::Relay { .. } | Step::SendPreamble { .. }
    ));
    let closing = s.on_relay_ended(End::copied(CloseReason::Eof, [1, 1]));
    s.close(closing, &cx, now);
}

fn session(c: &mut Criterion) {
    let mut config = Config::parse(
        "bench.toml",
        "[[rule]]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n",
    )
    .expect("config");
    config.rules[0].upstream = Some(Upstream::with_members(members(3)));
    let runtime = Runtime::new(&config);
    let metrics = Metrics::new(&["bench"], 1);
    let rt = runtime.rule(0);
    let mut picker = rt.pickers(7);
    let client = Some(SocketAddr::from(([192, 168, 1, 2], 40000)));
    c.bench_function(
        "session: admit + dial + connected + finish (3 members)",
        |b| b.iter(|| one_session(rt, &metrics, &mut picker, client, None)),
    );
}

/// A ClientHello as a TLS 1.3 client sends it (one record, a 32-byte session id, a few
/// cipher suites, a server_name extension and 200 bytes of other extensions), naming `name`.
fn client_hello(name: &str) -> Vec<u8> {
    let be16 = |n: usize| u16::try_from(n).expect("fits").to_be_bytes();
    let mut sni = vec![0];
    sni.extend(be16(name.len()));
    sni.extend(name.as_bytes());
    let mut exts = vec![0, 0];
    exts.extend(be16(sni.len() + 2));
    exts.extend(be16(sni.len()));
    exts.extend(sni);
    // An opaque extension standing for supported_groups, key_share and the rest.
    exts.extend([0xfe, 0x0d]);
    exts.extend(be16(200));
    exts.extend([0x5a; 200]);
    let mut body = vec![3, 3];
    body.extend([0xaa; 32]);
    body.push(32);
    body.extend([0x55; 32]);
    body.extend([0, 6, 0x13, 0x01, 0x13, 0x02, 0x13, 0x03, 1, 0]);
    body.extend(be16(exts.len()));
    body.extend(exts);
    let mut msg = vec![1, 0];
    msg.extend(be16(body.len()));
    msg.extend(body);
    let mut record = vec![22, 3, 1];
    record.extend(be16(msg.len()));
    record.extend(msg);
    record
}

fn routed_session(c: &mut Criterion) {
    let config = Config::parse(
        "bench.toml",
        "[[rule]]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n\
         [[rule.route]]\nsni = [\"api.example.com\"]\nupstream = \"127.0.0.1:10\"\n\
         [[rule.route]]\nsni = [\"*.example.com\", \"example.org\"]\nupstream = [\"127.0.0.1:11\", \"127.0.0.1:12\"]\n",
    )
    .expect("config");
    let runtime = Runtime::new(&config);
    let metrics = Metrics::new(&["bench"], 1);
    let rt = runtime.rule(0);
    let mut pickers = rt.pickers(7);
    let client = Some(SocketAddr::from(([192, 168, 1, 2], 40000)));
    let hello = client_hello("www.example.com");
    c.bench_function(
        &format!(
            "session: admit + route on a {}-byte ClientHello (wildcard match) + dial + connected + finish",
            hello.len()
        ),
        |b| b.iter(|| one_session(rt, &metrics, &mut pickers, client, Some(&hello))),
    );
}

criterion_group!(benches, pick, session, routed_session);
criterion_main!(benches);
