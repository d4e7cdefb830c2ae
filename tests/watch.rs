//! `watch_config` and a config file rewritten in place, slowly: the watcher must never apply
//! the half-written file (a failed reload counted, or a reload that removes the rules not
//! written yet and refuses their clients), on every engine.
//!
//! [`engine_suite!`] lines at the bottom run every scenario once per engine.

mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::pool::{Metrics, echo_once, http_get};
use support::sock::Backend;
use support::{Relay, STEP_TIMEOUT, TempFile, eventually};

support::engine_suite!(
    [
        a_slow_in_place_rewrite_is_applied_once_complete,
    ],
    std_engine: ["--engine", "std"],
    tokio_engine: ["--engine", "tokio"],
    uring: ["--engine", "uring"],
);

/// Between two lines of the rewrite: well under the watcher's settle time (500 ms).
const LINE_PAUSE: Duration = Duration::from_millis(40);
/// A writer that stalls at a bad moment: longer than the settle time, shorter than the
/// 3 s a file that lost rules or does not parse must rest.
const STALL: Duration = Duration::from_millis(1200);

fn rule(name: &str, upstream: SocketAddr, extra: &str) -> String {
    format!(
        "[[rule]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\n{extra}"
    )
}

fn reloads(admin: SocketAddr, result: &str) -> f64 {
    let (code, body) = http_get(admin, "/metrics");
    assert_eq!(code, 200, "{body}");
    Metrics::parse(&body)
        .get("ringfwd_config_reloads_total", &[("result", result)])
        .unwrap_or(0.0)
}

/// Connections to `addr` in a loop (one every 20 ms) until stopped: how many were served,
/// and every failure (a refusal means the rule was gone).
struct Probe {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    thread: std::thread::JoinHandle<()>,
}

impl Probe {
    fn start(addr: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    match echo_once(addr, b"probe") {
                        Ok(()) => {
                            ok.fetch_add(1, Ordering::AcqRel);
                        }
                        Err(e) => failures.lock().unwrap().push(e),
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        Self {
            stop,
            ok,
            failures,
            thread,
        }
    }

    /// Stops; the connections served and the failures.
    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Release);
        self.thread.join().expect("the probe thread panicked");
        let failures = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::Acquire), failures)
    }
}

/// The file is truncated and rewritten line by line (an editor saving in place, `cat >`,
/// a slow copy), stalling once where only the first rule is written (the file parses but
/// lacks rule `b`) and once in the middle of rule `b` (it does not parse), while a connection
/// lives on `b` and a client keeps connecting to it. The rewrite changes rule `a` only: one
/// reload must apply exactly that, no reload may fail, and `b` must never stop serving.
fn a_slow_in_place_rewrite_is_applied_once_complete(engine: &[&str]) {
    let _g = support::light();
    let pool = Backend::echo();
    let head = "watch_config = true\nadmin = \"127.0.0.1:0\"\nshutdown_grace = \"60s\"\n";
    let rule_b = rule("b", pool.addr(), "");
    let v1 = format!("{head}{}{rule_b}", rule("a", pool.addr(), ""));
    let v2 = format!(
        "{head}{}{rule_b}",
        rule("a", pool.addr(), "max_connections = 1000\n")
    );
    let file = TempFile::new("watch-rewrite", &v1);
    let path = file.path.display().to_string();
    let mut args = vec!["run", "--config", path.as_str()];
    args.extend_from_slice(engine);
    let mut relay = Relay::try_spawn(&args, 2).unwrap_or_else(|f| panic!("ringfwd {args:?}: {f}"));
    let admin = relay.admin.expect("admin addr");
    let b = relay.addr_of("b");
    let mut live = support::sock::connect(b);
    live.write_all(b"before").unwrap();
    assert_eq!(support::sock::read_n(&mut live, 6), b"before");
    let probe = Probe::start(b);

    // Where the writer stalls: after rule a (b lost), and after b's `listen` line (no
    // upstream yet: does not parse).
    let lines: Vec<&str> = v2.split_inclusive('\n').collect();
    let b_starts = lines.len() - rule_b.lines().count();
    let stalls = [b_starts, b_starts + 3];
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&file.path)
            .expect("open the config in place");
        for (i, line) in lines.iter().enumerate() {
            if stalls.contains(&i) {
                std::thread::sleep(STALL);
            }
            f.write_all(line.as_bytes()).expect("write a line");
            std::thread::sleep(LINE_PAUSE);
        }
    }
    // The complete file is applied (after it settles), once.
    assert!(
        eventually(STEP_TIMEOUT, || reloads(admin, "success") >= 1.0),
        "the rewritten file was never applied:\n{}",
        relay.stderr()
    );
    let stderr = relay.stderr();
    let reloaded: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("config reload"))
        .collect();
    assert_eq!(reloaded.len(), 1, "{reloaded:#?}");
    assert!(
        reloaded[0].contains("changed a") && !reloaded[0].contains("removed"),
        "{}",
        reloaded[0]
    );
    assert_eq!(reloads(admin, "failure"), 0.0, "{stderr}");
    assert!(
        stderr.contains("waiting until it has not changed"),
        "the watcher did not say why it waited:\n{stderr}"
    );
    let (served, failures) = probe.finish();
    assert!(
        failures.is_empty(),
        "rule b failed {} of {} probes during the rewrite: {failures:?}",
        failures.len(),
        served + failures.len() as u64
    );
    assert!(served > 0, "no probe of rule b ran");
    live.write_all(b"after!").unwrap();
    assert_eq!(support::sock::read_n(&mut live, 6), b"after!");
    drop(live);
    relay.stop_and_wait();
}
