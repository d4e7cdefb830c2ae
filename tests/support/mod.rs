//! Shared harness of the integration tests: the forwarder as a child process, in-test
//! upstream servers, socket helpers that never block without a bound, `/proc` probes, and the
//! engine gate.
//!
//! Every scenario is written once against this module and run for each engine, so nothing
//! here knows which engine it drives: the engine is only a list of extra `run` flags
//! (`["--engine", "std"]`). The forwarder is driven exactly as an operator would: spawned
//! binary, readiness line on stdout, SIGTERM to stop. All sockets are loopback and bound to
//! port 0; every wait has a deadline, so a broken engine fails a test instead of hanging it.
//!
//! Submodules:
//! - [`relay`]: the `ringfwd run` child and its guard;
//! - [`sock`]: upstream listeners, threaded backends, bounded reads and end-of-stream checks;
//! - [`procfs`]: fd counts, RSS and CLOSE_WAIT sockets of the child;
//! - [`data`]: seeded payloads and their hashes;
//! - [`edge`]: PROXY-protocol peers (HAProxy, nginx), hand-built headers, rejection counters;
//! - [`netns`]: network namespaces, veth pairs and the user-space impairment bridge;
//! - [`pool`]: a forwarder with its admin endpoint, pool members, `/upstreams` and `/metrics`.
#![allow(dead_code)] // Each test crate uses its own subset of the harness.

pub mod data;
pub mod edge;
pub mod netns;
pub mod pool;
pub mod procfs;
pub mod relay;
pub mod sock;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

pub use relay::Relay;

/// The longest any single step may take before the test fails as hung: generous, because the
/// build box is shared, but finite.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(15);

/// Environment variable that turns a missing io_uring into skipped uring suites instead of
/// failures.
pub const SKIP_URING_ENV: &str = "RINGFWD_SKIP_URING";

/// Environment variable that lets a runner known not to be root skip the tests that need
/// root (privilege drop, control-socket ownership); they fail otherwise.
pub const SKIP_ROOT_ENV: &str = "RINGFWD_SKIP_ROOT";

/// The effective uid of the test process.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// True when a test that needs root may go on; false (with a note naming `what`) when it is
/// to be skipped.
///
/// # Panics
/// Not root, and `RINGFWD_SKIP_ROOT=1` is not set.
pub fn root_or_skip(what: &str) -> bool {
    if euid() == 0 {
        return true;
    }
    if std::env::var(SKIP_ROOT_ENV).as_deref() == Ok("1") {
        eprintln!(
            "note: skipping a {what} test: not root (uid {}) and {SKIP_ROOT_ENV}=1",
            euid()
        );
        return false;
    }
    panic!(
        "the {what} tests need root (uid {}): run them as root, or set {SKIP_ROOT_ENV}=1 on a host known not to be",
        euid()
    );
}

/// `nobody`'s uid and primary gid, from the user database (getent, not the code under test).
pub fn nobody() -> (u32, u32) {
    let out = std::process::Command::new("getent")
        .args(["passwd", "nobody"])
        .output()
        .expect("getent");
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    let f: Vec<&str> = line.trim().split(':').collect();
    assert!(f.len() >= 4, "no passwd entry for nobody: {line:?}");
    (f[2].parse().expect("a uid"), f[3].parse().expect("a gid"))
}

/// Scenarios that load the machine (bulk transfers, 1000 connections, memory measurements)
/// hold this exclusively; every other scenario holds it shared. On a two-core box this keeps
/// the timing-sensitive scenarios (latency, timeouts, grace) from being judged while another
/// test saturates both cores, without asking anyone for `--test-threads=1`.
static LOAD: RwLock<()> = RwLock::new(());

/// Held by a scenario for its whole run; see [`heavy`] and [`light`].
pub enum LoadGuard {
    Shared(#[allow(dead_code)] RwLockReadGuard<'static, ()>),
    Exclusive(#[allow(dead_code)] RwLockWriteGuard<'static, ()>),
}

/// For a scenario that saturates the machine or measures the child's resources: runs alone.
pub fn heavy() -> LoadGuard {
    LoadGuard::Exclusive(
        LOAD.write()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    )
}

/// For an ordinary scenario: runs beside other light ones, never beside a heavy one.
pub fn light() -> LoadGuard {
    LoadGuard::Shared(
        LOAD.read()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    )
}

/// True when `engine` names the io_uring engine, whose availability depends on the host.
pub fn is_uring(engine: &[&str]) -> bool {
    engine.iter().any(|a| a.contains("uring"))
}

/// Decides whether the suite for `engine` can run here.
///
/// Engines other than io_uring always can. For io_uring a forwarder is started once per flag
/// set: if it reports `io_uring engine unavailable`, this panics with that message — a host
/// without io_uring must not pass the uring suites silently — unless `RINGFWD_SKIP_URING=1`,
/// in which case it prints a note and returns `false` so the test returns early.
///
/// # Panics
/// io_uring is unavailable and the skip variable is not set, or the forwarder failed to start
/// for another reason.
pub fn engine_available(engine: &[&str]) -> bool {
    if !is_uring(engine) {
        return true;
    }
    /// Per flag set: `Ok` if the engine started, else the forwarder's reason.
    type Verdicts = HashMap<Vec<String>, Result<(), String>>;
    static CACHE: OnceLock<Mutex<Verdicts>> = OnceLock::new();
    let key: Vec<String> = engine.iter().map(|s| (*s).to_string()).collect();
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let verdict = cache
        .entry(key)
        .or_insert_with(|| {
            let mut args = vec![
                "run",
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                "127.0.0.1:9",
            ];
            args.extend_from_slice(engine);
            match Relay::try_spawn(&args, 1) {
                Ok(mut relay) => {
                    relay.stop_and_wait();
                    Ok(())
                }
                Err(failure) if failure.stderr.contains("io_uring engine unavailable") => {
                    Err(failure.stderr.trim().to_string())
                }
                Err(failure) => panic!("the forwarder did not start with {engine:?}: {failure}"),
            }
        })
        .clone();
    match verdict {
        Ok(()) => true,
        Err(why) if std::env::var(SKIP_URING_ENV).as_deref() == Ok("1") => {
            eprintln!(
                "note: skipping an io_uring test ({engine:?}) because {SKIP_URING_ENV}=1: {why}"
            );
            false
        }
        Err(why) => panic!(
            "io_uring is unavailable for {engine:?}: {why}\n\
             (set {SKIP_URING_ENV}=1 to skip the io_uring suites on this host)"
        ),
    }
}

/// Makes sure this test process may open `needed` file descriptors, raising its soft
/// `RLIMIT_NOFILE` up to the hard limit if that is what it takes (many hosts default the soft
/// limit to 1024).
///
/// # Panics
/// The hard limit is below `needed`: the scenario cannot run here as written.
pub fn ensure_fd_limit(needed: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit(RLIMIT_NOFILE)");
    if soft >= needed {
        return;
    }
    assert!(
        hard >= needed,
        "this scenario needs {needed} open files, the hard limit is {hard}: raise it (ulimit -Hn)"
    );
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit(RLIMIT_NOFILE)");
}

/// A file in the test-scratch directory that is removed when dropped.
pub struct TempFile {
    pub path: PathBuf,
}

impl TempFile {
    /// Writes `contents` to a fresh file whose name starts with `stem`.
    ///
    /// # Panics
    /// The scratch directory is not writable.
    pub fn new(stem: &str, contents: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("{stem}-{}-{n}.toml", std::process::id()));
        std::fs::write(&path, contents)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        Self { path }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Polls `cond` every few milliseconds until it holds or `within` passes; returns whether it
/// held. For state that has no readiness notification (a `/proc` count, a child's exit).
pub fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until the forwarder's stderr has a line containing `needle`, and returns that line.
///
/// # Panics
/// No such line within `within`.
pub fn wait_for_line(relay: &Relay, needle: &str, within: Duration) -> String {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(line) = relay.stderr().lines().find(|l| l.contains(needle)) {
            return line.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no line with {needle:?} within {within:?}:\n{}",
            relay.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The notice `run` gives once when it stays root (no `user` in the config), as every test
/// forwarder does on a root CI runner.
pub const ROOT_NOTICE: &str = "running as root; set user = ";

/// The forwarder's WARN lines, except [`ROOT_NOTICE`]: what a scenario about some other
/// condition counts.
pub fn warnings(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.contains("WARN") && !l.contains(ROOT_NOTICE))
        .collect()
}

/// `#[test]` wrappers, one per scenario (`fn name(engine: &[&str])` at the test crate's root),
/// for the engine named by the enclosing module's `ENGINE` flags: each runs the scenario only
/// where that engine is available (see [`engine_available`]) — and, after `netns:`, only where
/// network namespaces are (see [`netns::available`]). A test file's `engine_suite!` puts one
/// call in a module per engine.
#[allow(unused_macros)] // Each test crate uses its own subset of the harness.
macro_rules! scenarios {
    (netns: [$($name:ident),* $(,)?]) => {
        crate::support::scenarios!(netns: $($name),*);
    };
    ([$($name:ident),* $(,)?]) => {
        crate::support::scenarios!($($name),*);
    };
    (netns: $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                if crate::support::netns::available()
                    && crate::support::engine_available(ENGINE)
                {
                    crate::$name(ENGINE);
                }
            }
        )*
    };
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                if crate::support::engine_available(ENGINE) {
                    crate::$name(ENGINE);
                }
            }
        )*
    };
}
#[allow(unused_imports)]
pub(crate) use scenarios;

/// A test file's whole engine matrix: one module per engine, named and flagged as listed,
/// each with one `#[test]` per scenario through [`scenarios!`] (so each runs only where its
/// engine is available, and after `netns:` only where network namespaces are).
///
/// ```ignore
/// support::engine_suite!(
///     [ping_pong, idle_timeout],
///     std_engine: ["--engine", "std"],
///     uring_copy: ["--engine", "uring", "--mode", "copy"],
/// );
/// ```
#[allow(unused_macros)] // Each test crate uses its own subset of the harness.
macro_rules! engine_suite {
    (netns: $scenarios:tt $(, $suite:ident: [$($arg:literal),* $(,)?])+ $(,)?) => {
        $(
            mod $suite {
                const ENGINE: &[&str] = &[$($arg),*];
                crate::support::scenarios!(netns: $scenarios);
            }
        )+
    };
    ($scenarios:tt $(, $suite:ident: [$($arg:literal),* $(,)?])+ $(,)?) => {
        $(
            mod $suite {
                const ENGINE: &[&str] = &[$($arg),*];
                crate::support::scenarios!($scenarios);
            }
        )+
    };
}
#[allow(unused_imports)]
pub(crate) use engine_suite;

/// Waits up to `within` for a child to exit; its status, or `None` if it is still running.
pub fn wait_child(
    child: &mut std::process::Child,
    within: Duration,
) -> Option<std::process::ExitStatus> {
    let mut status = None;
    eventually(within, || {
        status = child.try_wait().expect("waitpid");
        status.is_some()
    });
    status
}

/// A child's stderr, collected by a background thread so the child never blocks on it.
pub fn drain_into(
    mut pipe: impl std::io::Read + Send + 'static,
) -> std::sync::Arc<std::sync::Mutex<Vec<u8>>> {
    let sink = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let out = sink.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n @ 1..) = pipe.read(&mut buf) {
            out.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend_from_slice(&buf[..n]);
        }
    });
    sink
}
