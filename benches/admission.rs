//! The edge admission stages on the accept path: a 100 000-entry ACL (lookup and build), the
//! per-IP limiter (acquire + release), and the PROXY header and ClientHello parsers, so a
//! large blocklist or a flood of accepts never makes admission the bottleneck.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ringfwd::session::acl::Acl;
use ringfwd::session::limits::{IpLimits, LimitsConfig};
use ringfwd::session::proxy::{self, ProxyParser};
use ringfwd::session::sni::ClientHelloParser;
use ringfwd::vocab::{Cidr, Rate};

/// Seed of every generated data set, so runs compare.
const SEED: u64 = 0x5eed_ad31_5510;
/// Entries in the ACL.
const ACL_ENTRIES: usize = 100_000;
/// Share of ACL entries that are IPv6 (in percent).
const ACL_V6_PERCENT: u32 = 20;
/// Allow entries (the rest of ACL_ENTRIES are deny entries).
const ACL_ALLOW: usize = 10_000;
/// Addresses looked up per iteration (a batch, so the figure is per lookup).
const LOOKUPS: usize = 1024;
/// Distinct client addresses the limiter sees.
const CLIENTS: usize = 4096;

fn random_cidr(rng: &mut StdRng) -> Cidr {
    if rng.gen_range(0..100) < ACL_V6_PERCENT {
        let ip = Ipv6Addr::from(0x2001_0db8_u128 << 96 | rng.r#gen::<u128>() >> 32);
        Cidr::truncating(IpAddr::V6(ip), rng.gen_range(48..=128))
    } else {
        Cidr::truncating(
            IpAddr::V4(Ipv4Addr::from(rng.r#gen::<u32>())),
            rng.gen_range(16..=32),
        )
    }
}

fn random_ip(rng: &mut StdRng) -> IpAddr {
    if rng.gen_range(0..100) < ACL_V6_PERCENT {
        IpAddr::V6(Ipv6Addr::from(
            0x2001_0db8_u128 << 96 | rng.r#gen::<u128>() >> 32,
        ))
    } else {
        IpAddr::V4(Ipv4Addr::from(rng.r#gen::<u32>()))
    }
}

fn acl(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(SEED);
    let entries: Vec<Cidr> = (0..ACL_ENTRIES).map(|_| random_cidr(&mut rng)).collect();
    let (allow, deny) = entries.split_at(ACL_ALLOW);
    let acl = Acl::new(allow, deny);
    let probes: Vec<IpAddr> = (0..LOOKUPS).map(|_| random_ip(&mut rng)).collect();
    // Addresses that do hit entries, too (the first address of random entries).
    let hits: Vec<IpAddr> = (0..LOOKUPS)
        .map(|i| entries[(i * 97) % ACL_ENTRIES].addr())
        .collect();

    let mut g = c.benchmark_group("acl");
    g.throughput(Throughput::Elements(LOOKUPS as u64));
    g.bench_function("admits, 100k entries, random addresses", |b| {
        b.iter(|| {
            probes
                .iter()
                .filter(|&&ip| acl.admits(black_box(ip)))
                .count()
        })
    });
    g.bench_function("admits, 100k entries, addresses on entries", |b| {
        b.iter(|| hits.iter().filter(|&&ip| acl.admits(black_box(ip))).count())
    });
    g.finish();
    c.bench_function("acl: build 100k entries", |b| {
        b.iter(|| Acl::new(black_box(allow), black_box(deny)))
    });
}

fn limits(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(SEED);
    let clients: Vec<IpAddr> = (0..CLIENTS).map(|_| random_ip(&mut rng)).collect();
    let epoch = Instant::now();
    let both = IpLimits::new(
        &LimitsConfig {
            max_connections_per_ip: NonZeroU32::new(1000),
            // Far above what the bench offers per address: every attempt is admitted.
            max_new_connections_per_ip: Some(Rate::parse("1000000000/s").unwrap()),
            ..LimitsConfig::default()
        },
        epoch,
    );
    let mut g = c.benchmark_group("limits");
    g.throughput(Throughput::Elements(CLIENTS as u64));
    g.bench_function("try_acquire + release (per-IP count and rate)", |b| {
        b.iter(|| {
            let now = Instant::now();
            for &ip in &clients {
                let p = both.try_acquire(black_box(ip), now).expect("admitted");
                both.release(p);
            }
        })
    });
    let count_only = IpLimits::new(
        &LimitsConfig {
            max_connections_per_ip: NonZeroU32::new(1000),
            ..LimitsConfig::default()
        },
        epoch,
    );
    g.bench_function("try_acquire + release (per-IP count only)", |b| {
        b.iter(|| {
            let now = Instant::now();
            for &ip in &clients {
                let p = count_only
                    .try_acquire(black_box(ip), now)
                    .expect("admitted");
                count_only.release(p);
            }
        })
    });
    g.finish();
}

/// A minimal ClientHello (TLS 1.2 layout, one cipher suite) carrying `name` in SNI.
fn client_hello(name: &str) -> Vec<u8> {
    let n = name.len();
    let mut sni = vec![0, 0];
    sni.extend(((n + 5) as u16).to_be_bytes());
    sni.extend(((n + 3) as u16).to_be_bytes());
    sni.push(0);
    sni.extend((n as u16).to_be_bytes());
    sni.extend(name.as_bytes());
    let mut body = vec![3, 3];
    body.extend([7; 32]);
    body.push(0);
    body.extend([0, 2, 0x13, 0x01, 1, 0]);
    body.extend((sni.len() as u16).to_be_bytes());
    body.extend(sni);
    let mut msg = vec![1];
    msg.extend(&(body.len() as u32).to_be_bytes()[1..]);
    msg.extend(body);
    let mut rec = vec![22, 3, 1];
    rec.extend((msg.len() as u16).to_be_bytes());
    rec.extend(msg);
    rec
}

fn parsers(c: &mut Criterion) {
    let src: SocketAddr = "[2001:db8::1]:56324".parse().unwrap();
    let dst: SocketAddr = "[2001:db8::2]:443".parse().unwrap();
    let mut v1 = [0u8; proxy::V1_BUF_LEN];
    let n1 = proxy::encode_v1(src, dst, &mut v1);
    let mut v2 = [0u8; proxy::V2_BUF_LEN];
    let n2 = proxy::encode_v2(src, dst, &mut v2);
    c.bench_function("proxy: parse v1 TCP6", |b| {
        b.iter(|| ProxyParser::new().feed(black_box(&v1[..n1])))
    });
    c.bench_function("proxy: parse v2 TCP6", |b| {
        b.iter(|| ProxyParser::new().feed(black_box(&v2[..n2])))
    });
    c.bench_function("proxy: encode v2 TCP6", |b| {
        b.iter(|| proxy::encode_v2(black_box(src), black_box(dst), &mut v2))
    });
    let hello = client_hello("www.example.com");
    c.bench_function("sni: parse ClientHello", |b| {
        b.iter_batched(
            ClientHelloParser::new,
            |mut p| p.feed(black_box(&hello)),
            BatchSize::SmallInput,
        )
    });
}

fn config() -> Criterion {
    // Short runs: the machine is shared; the figures are stable well within this.
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = config();
    targets = acl, limits, parsers
}
criterion_main!(benches);
