//! Property tests of the config parser (`Config::parse`): it never panics, whatever the text,
//! and a configuration it accepts comes back unchanged through what `ringfwd check` prints.
//!
//! Two generators: arbitrary text (mostly rejected at the TOML layer), and config-shaped
//! text assembled from the real keys, tables and a mix of valid and invalid values, so most
//! cases reach the validation of every key. Upstream values are IP literals only (and
//! `localhost`, which `/etc/hosts` answers): no case makes a DNS query. The same round-trip
//! check is the AFL target's (`fuzz/src/targets.rs`).

#[path = "../fuzz/src/targets.rs"]
mod targets;

use proptest::prelude::*;
use ringfwd::config::Config;

/// Keys of each section with a value they accept; a generated file picks some of each.
const TOP: &[(&str, &str)] = &[
    ("workers", "2"),
    ("engine", "\"tokio\""),
    ("mode", "\"copy\""),
    ("shutdown_grace", "\"1s\""),
    ("admin", "\"127.0.0.1:0\""),
    ("admin_allow_remote", "false"),
    ("log_format", "\"json\""),
    ("access_log", "false"),
];
const URING: &[(&str, &str)] = &[
    ("ring_entries", "256"),
    ("buffer_size", "\"64KiB\""),
    ("buffers", "8"),
    ("pipe_size", "\"64KiB\""),
    ("pipes", "0"),
];
const RULE: &[(&str, &str)] = &[
    ("name", "\"web\""),
    ("balance", "\"least_conn\""),
    ("connect_retries", "1"),
    ("max_fails", "0"),
    ("fail_timeout", "\"5s\""),
    ("max_connections", "100"),
    ("nodelay", "true"),
    ("connect_timeout", "\"2s\""),
    ("idle_timeout", "\"0s\""),
    ("upstream", "[\"127.0.0.1:9001\", \"[::1]:9002\"]"),
];

/// Values for any key: right types, wrong types, edge cases and nonsense.
const VALUES: &[&str] = &[
    "0",
    "1",
    "-1",
    "65536",
    "4294967296",
    "true",
    "\"auto\"",
    "\"uring\"",
    "\"std\"",
    "\"splice\"",
    "\"fast\"",
    "\"250ms\"",
    "\"0s\"",
    "\"5m\"",
    "\"-1s\"",
    "\"1\"",
    "\"\"",
    "\"1MiB\"",
    "\"1GiB\"",
    "\"0B\"",
    "\"3K\"",
    "\"127.0.0.1:8080\"",
    "\"[::1]:0\"",
    "\"localhost:9\"",
    "\"127.0.0.1\"",
    "\"fe80::1:80\"",
    "\"127.0.0.1:99999\"",
    "\"127.0.0.1:20000-20009\"",
    "\"[::1]:30000-30009\"",
    "\"127.0.0.1:20009-20000\"",
    "\"127.0.0.1:0-9\"",
    "\"127.0.0.1:1-20000\"",
    "[\"127.0.0.1:21000-21009\", { addr = \"[::1]:22000-22009\", weight = 2 }]",
    "[\"127.0.0.1:21000-21009\", \"127.0.0.1:9\"]",
    "\"round_robin\"",
    "\"source_hash\"",
    "\"random_two\"",
    "\"text\"",
    "[\"127.0.0.1:9001\", \"127.0.0.1:9001\"]",
    "[]",
    "[{ addr = \"127.0.0.1:9003\", weight = 3 }, { addr = \"[::1]:9004\", backup = true }]",
    "{ }",
    "1.5",
];

/// Some keys of a section (about half), each with its accepted value or, one time in
/// sixteen, any value.
fn section(keys: &'static [(&'static str, &'static str)]) -> impl Strategy<Value = String> {
    proptest::collection::vec((0..16u8, proptest::sample::select(VALUES)), keys.len()).prop_map(
        move |picks| {
            keys.iter()
                .zip(picks)
                .filter_map(|(&(k, good), (pick, any))| match pick {
                    0..=7 => None,
                    15 => Some(format!("{k} = {any}\n")),
                    _ => Some(format!("{k} = {good}\n")),
                })
                .collect()
        },
    )
}

/// A config-shaped file: top-level keys, maybe `[uring]`, one or two rules, and now and
/// then a line of printable garbage.
fn config_text() -> impl Strategy<Value = String> {
    (
        section(TOP),
        proptest::option::of(section(URING)),
        proptest::collection::vec((section(RULE), proptest::sample::select(VALUES)), 1..3),
        proptest::option::weighted(0.1, "[ -~]{0,24}"),
    )
        .prop_map(|(top, uring, rules, garbage)| {
            let mut text = top;
            if let Some(u) = uring {
                text.push_str("[uring]\n");
                text.push_str(&u);
            }
            for (i, (keys, listen)) in rules.into_iter().enumerate() {
                // The first rule listens where a rule may (one port, or a 10-port range that
                // one-to-one upstream ranges fit); a second one anywhere at all.
                let listen = match i {
                    0 if keys.len() % 2 == 0 => "\"127.0.0.1:0\"",
                    0 => "\"127.0.0.1:40000-40009\"",
                    _ => listen,
                };
                text.push_str(&format!("[[rule]]\nlisten = {listen}\n"));
                if !keys.contains("upstream =") {
                    // A range listen gets a one-to-one upstream range now and then.
                    let upstream = if listen.contains('-') && keys.len() % 3 == 0 {
                        "\"127.0.0.1:20000-20009\""
                    } else {
                        "\"127.0.0.1:9\""
                    };
                    text.push_str(&format!("upstream = {upstream}\n"));
                }
                text.push_str(&keys);
            }
            if let Some(g) = garbage {
                text.push_str(&g);
            }
            text
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn arbitrary_text_never_panics(text in any::<String>()) {
        let _ = Config::parse("prop.toml", &text);
    }

    #[test]
    fn config_shaped_text_never_panics_and_round_trips(text in config_text()) {
        targets::config(text.as_bytes());
    }
}

/// The generator really reaches accepted configurations (or the round trip proves nothing).
#[test]
fn config_shaped_text_is_often_accepted() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = config_text();
    let (mut accepted, mut ranges, mut one_to_one) = (0, 0, 0);
    for _ in 0..500 {
        let text = strategy.new_tree(&mut runner).expect("a case").current();
        if let Ok(c) = Config::parse("prop.toml", &text) {
            accepted += 1;
            ranges += usize::from(c.rules.iter().any(|r| r.listen.is_range()));
            one_to_one += usize::from(
                c.rules
                    .iter()
                    .any(|r| r.upstream.as_ref().is_some_and(|u| u.one_to_one)),
            );
        }
    }
    assert!(
        accepted >= 25,
        "only {accepted} of 500 generated configs were accepted"
    );
    // Port ranges, and one-to-one upstream ranges, go through the round trip too.
    assert!(
        ranges >= 10,
        "only {ranges} accepted configs had a listen range"
    );
    assert!(
        one_to_one >= 1,
        "no accepted config had a one-to-one upstream range"
    );
}
