//! CPU-affine accept on the io_uring engine (`engine::uring::steer`): with one pinned worker
//! per allowed CPU, each port's `SO_REUSEPORT` group is steered so that the worker on the CPU
//! that took a connection's SYN accepts it; `ringfwd_accepts_total{worker,cpu_match}` says
//! where each accept landed. Where steering does not fit (fewer workers than CPUs, a partial
//! cpuset run under `taskset`) the engine says so and still serves every connection.
//!
//! On loopback the SYN is processed on the connecting thread's CPU, so clients pinned to each
//! CPU in turn must reach every worker, each on its own CPU.

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use support::pool::http_get;
use support::relay::BIN;
use support::sock::{Backend, echo_exchange};
use support::{Relay, wait_for_line};

const CONNECTIONS_PER_CPU: u64 = 24;

fn config(upstream: SocketAddr, workers: usize) -> String {
    format!(
        "workers = {workers}\nadmin = \"127.0.0.1:0\"\n[uring]\npin = true\n[[rule]]\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\n"
    )
}

/// `ringfwd_accepts_total{worker,cpu_match}` as `(worker, cpu_match, count)`.
fn accepts(admin: SocketAddr) -> Vec<(usize, bool, u64)> {
    let (status, text) = http_get(admin, "/metrics");
    assert_eq!(status, 200, "{text}");
    text.lines()
        .filter_map(|l| l.strip_prefix("ringfwd_accepts_total{"))
        .map(|l| {
            let (labels, n) = l.split_once("} ").expect("a sample");
            let label = |k: &str| {
                labels
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(&format!("{k}=\"")))
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or_else(|| panic!("no {k} in {l}"))
                    .to_string()
            };
            (
                label("worker").parse().expect("worker index"),
                label("cpu_match") == "true",
                n.trim().parse().expect("a count"),
            )
        })
        .collect()
}

/// Echo exchanges from a thread pinned to each of `cpus` in turn.
fn connect_from_each_cpu(addr: SocketAddr, cpus: &[usize]) {
    for &cpu in cpus {
        std::thread::spawn(move || {
            let mut set = nix::sched::CpuSet::new();
            set.set(cpu).expect("a CPU index");
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                .expect("pin the client thread");
            for n in 0..CONNECTIONS_PER_CPU {
                echo_exchange(addr, n)
                    .unwrap_or_else(|e| panic!("connection {n} from CPU {cpu}: {e}"));
            }
        })
        .join()
        .expect("the client thread panicked");
    }
}

fn allowed_cpus() -> Vec<usize> {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).expect("affinity");
    (0..nix::sched::CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect()
}

/// One pinned worker per allowed CPU: steering attaches, clients on every CPU are served,
/// every worker accepts, and (almost) every accept lands on its worker's CPU.
fn steered_accepts_reach_every_worker_on_its_cpu(engine: &[&str]) {
    let _g = support::light();
    let cpus = allowed_cpus();
    let pool = Backend::echo();
    let relay = Relay::start_config(engine, &config(pool.addr(), cpus.len()), 1);
    let admin = relay.admin.expect("admin address");
    if cpus.len() < 2 {
        // A one-CPU runner cannot steer; it must say so and serve.
        wait_for_line(&relay, "accepts not steered by CPU", Duration::from_secs(5));
        connect_from_each_cpu(relay.addr(), &cpus);
        return;
    }
    wait_for_line(&relay, "accepts steered", Duration::from_secs(5));
    connect_from_each_cpu(relay.addr(), &cpus);
    let seen = accepts(admin);
    let total: u64 = seen.iter().map(|s| s.2).sum();
    assert_eq!(
        total,
        CONNECTIONS_PER_CPU * cpus.len() as u64,
        "every accept counted: {seen:?}"
    );
    for w in 0..cpus.len() {
        let on_cpu: u64 = seen.iter().filter(|s| s.0 == w && s.1).map(|s| s.2).sum();
        assert!(
            on_cpu > 0,
            "worker {w} accepted nothing on its own CPU: {seen:?}\n{}",
            relay.stderr()
        );
    }
    let matched: u64 = seen.iter().filter(|s| s.1).map(|s| s.2).sum();
    // Steered by the CPU of the SYN; a connection whose later packets were processed
    // elsewhere (a migrated client thread) may read another CPU: most must match.
    assert!(
        matched * 4 >= total * 3,
        "only {matched} of {total} accepts on the worker's CPU: {seen:?}"
    );
}

/// Fewer workers than CPUs: plain reuseport hashing, said in the log, and every client
/// served; the metric is there all the same.
fn fewer_workers_than_cpus_fall_back_to_hashing(engine: &[&str]) {
    let _g = support::light();
    let cpus = allowed_cpus();
    let pool = Backend::echo();
    let relay = Relay::start_config(engine, &config(pool.addr(), 1), 1);
    let line = wait_for_line(&relay, "accepts not steered by CPU", Duration::from_secs(5));
    assert!(line.contains("1 workers for") || cpus.len() == 1, "{line}");
    connect_from_each_cpu(relay.addr(), &cpus);
    let seen = accepts(relay.admin.expect("admin address"));
    let total: u64 = seen.iter().map(|s| s.2).sum();
    assert_eq!(total, CONNECTIONS_PER_CPU * cpus.len() as u64, "{seen:?}");
}

/// A partial cpuset (`taskset -c` the last allowed CPU): one worker there by default, no
/// steering, every client served — also two workers on that one CPU.
fn a_partial_cpuset_still_serves(engine: &[&str]) {
    let _g = support::light();
    let cpus = allowed_cpus();
    let last = cpus.last().copied().expect("some CPU").to_string();
    let pool = Backend::echo();
    for workers in [None, Some(2)] {
        let file = support::TempFile::new(
            "steering-taskset",
            &match workers {
                Some(w) => config(pool.addr(), w),
                None => config(pool.addr(), 1).replace("workers = 1\n", ""),
            },
        );
        let path = file.path.display().to_string();
        let mut args = vec!["run", "--config", path.as_str()];
        args.extend_from_slice(engine);
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", &last, BIN]).args(&args);
        let relay = Relay::try_spawn_command(cmd, &args, 1)
            .unwrap_or_else(|f| panic!("taskset -c {last} ringfwd {args:?}: {f}"));
        wait_for_line(&relay, "accepts not steered by CPU", Duration::from_secs(5));
        connect_from_each_cpu(relay.addr(), &cpus);
        let seen = accepts(relay.admin.expect("admin address"));
        let total: u64 = seen.iter().map(|s| s.2).sum();
        assert_eq!(total, CONNECTIONS_PER_CPU * cpus.len() as u64, "{seen:?}");
    }
}

support::engine_suite!(
    [
        steered_accepts_reach_every_worker_on_its_cpu,
        fewer_workers_than_cpus_fall_back_to_hashing,
        a_partial_cpuset_still_serves,
    ],
    uring_copy: ["--engine", "uring", "--mode", "copy"],
    uring_splice: ["--engine", "uring", "--mode", "splice"],
    uring_auto: ["--engine", "uring", "--mode", "auto"],
);
