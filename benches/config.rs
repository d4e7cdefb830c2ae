//! Parsing and validating the shipped `ringfwd.toml` and a 100-rule config: start-up and
//! reload cost, so a large rule set never makes a restart slow.

use std::fmt::Write;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use ringfwd::config::Config;

/// Rules in the large generated config.
const RULES: u16 = 100;

fn parse(c: &mut Criterion) {
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/ringfwd.toml"))
        .expect("ringfwd.toml");
    c.bench_function("config: parse shipped ringfwd.toml", |b| {
        b.iter(|| Config::parse("ringfwd.toml", black_box(&shipped)).expect("valid"))
    });
    let mut big = String::new();
    for i in 0..RULES {
        let _ = write!(
            big,
            "[[rule]]\nname = \"r{i}\"\nlisten = \"127.0.0.1:{}\"\nupstream = \"127.0.0.1:{}\"\nidle_timeout = \"5m\"\nkeepalive = {{ idle = \"60s\", interval = \"10s\", count = 5 }}\n\n",
            20000 + i,
            30000 + i
        );
    }
    c.bench_function("config: parse 100 rules", |b| {
        b.iter(|| Config::parse("big.toml", black_box(&big)).expect("valid"))
    });
}

criterion_group!(benches, parse);
criterion_main!(benches);
