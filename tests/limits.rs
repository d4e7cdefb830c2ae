//! The forwarder under tight resource limits degrades the documented way and keeps serving:
//!
//! - a low `RLIMIT_NOFILE`: the splice pipe pool is cut short (fewer pipes, the rest of the
//!   traffic copies) and connections are still relayed (docs/TUNING.md, "File descriptors");
//! - a low `RLIMIT_MEMLOCK` for an unprivileged forwarder: `engine = "auto"` falls back to
//!   tokio with one warning when a ring cannot be set up, and the uring engine carries on
//!   with unregistered copy buffers when only their registration does not fit (README,
//!   "Locked memory"; TUNING.md, "Copy buffers and locked memory");
//! - a low `fs.pipe-user-pages-soft` for an unprivileged forwarder: pipes cut short are
//!   refused with one warning and the traffic copies (TUNING.md, "Splice pipes").
//!
//! The limits are set on the child only, in `pre_exec` (`setrlimit`; `setuid` to `nobody`
//! where the limit spares root, who has `CAP_IPC_LOCK` and `CAP_SYS_RESOURCE`). The sysctl is
//! host-wide: a guard restores its old value, also when the test panics. These tests need
//! root; without it they fail, naming the cause.

mod support;

use std::io::{BufRead, BufReader, Read};
use std::net::{Shutdown, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::data;
use support::procfs;
use support::relay::BIN;
use support::sock::{Backend, connect};

/// The uid/gid of `nobody` on Debian and most distributions.
const NOBODY: libc::uid_t = 65534;

/// What the child runs under.
#[derive(Clone, Copy, Default)]
struct Limits {
    nofile: Option<u64>,
    memlock: Option<u64>,
    /// Drop to `nobody` (no capabilities), for limits that root is exempt from.
    unprivileged: bool,
}

/// A `ringfwd run` child started under [`Limits`], killed on drop.
struct Limited {
    child: Child,
    addr: SocketAddr,
    engine: String,
    stderr: Arc<Mutex<String>>,
    _dir: Option<TempDir>,
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Limited {
    /// Starts `ringfwd run --listen 127.0.0.1:0 --upstream UPSTREAM ARGS` under `limits` and
    /// waits for its `listening` line.
    ///
    /// # Panics
    /// It exited or did not become ready: the message carries its stderr.
    fn start(limits: Limits, upstream: SocketAddr, args: &[&str]) -> Self {
        // `nobody` may not be able to reach the build directory: run a world-readable copy.
        let (bin, dir) = if limits.unprivileged {
            let dir = std::env::temp_dir().join(format!(
                "ringfwd-limits-{}-{}",
                std::process::id(),
                rand::random::<u32>()
            ));
            std::fs::create_dir_all(&dir).expect("create a scratch directory");
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
                .expect("chmod the scratch directory");
            let bin = dir.join("ringfwd");
            std::fs::copy(BIN, &bin).expect("copy the ringfwd binary");
            std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))
                .expect("chmod the binary");
            (bin, Some(TempDir(dir)))
        } else {
            (PathBuf::from(BIN), None)
        };
        let upstream = upstream.to_string();
        let mut cmd = Command::new(&bin);
        cmd.args(["run", "--listen", "127.0.0.1:0", "--upstream", &upstream])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
        // system calls (setrlimit, setgroups, setgid, setuid) on values computed beforehand.
        unsafe {
            cmd.pre_exec(move || {
                let set = |res, v: u64| {
                    let lim = libc::rlimit {
                        rlim_cur: v,
                        rlim_max: v,
                    };
                    if libc::setrlimit(res, &raw const lim) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                };
                if let Some(n) = limits.nofile {
                    set(libc::RLIMIT_NOFILE, n)?;
                }
                if let Some(n) = limits.memlock {
                    set(libc::RLIMIT_MEMLOCK, n)?;
                }
                if limits.unprivileged
                    && (libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(NOBODY) != 0
                        || libc::setuid(NOBODY) != 0)
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // A test thread that forks while the copy above is still open for writing hands the
        // child that write descriptor, and exec then fails with ETXTBSY until the child has
        // exec'd in turn: retry, a bounded number of times.
        let mut tries = 0;
        let mut child = loop {
            match cmd.spawn() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                spawned => {
                    break spawned.unwrap_or_else(|e| {
                        panic!("spawn {} under {:?}: {e}", bin.display(), limits.describe())
                    });
                }
            }
        };
        let stderr = Arc::new(Mutex::new(String::new()));
        {
            let mut pipe = child.stderr.take().expect("piped");
            let sink = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = pipe.read(&mut buf) {
                    sink.lock()
                        .expect("stderr lock")
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().expect("piped");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let ready = loop {
            match rx.recv_timeout(Duration::from_secs(20)) {
                Ok(line) if line.starts_with("listening ") => break Some(line),
                Ok(_) => {}
                Err(_) => break None,
            }
        };
        let Some(line) = ready else {
            let _ = child.kill();
            let status = child.wait().ok();
            std::thread::sleep(Duration::from_millis(200));
            panic!(
                "ringfwd under {} did not start ({status:?}); stderr:\n{}",
                limits.describe(),
                stderr.lock().expect("stderr lock")
            );
        };
        let field = |k: &str| {
            line.split(' ')
                .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
                .map(str::to_string)
                .unwrap_or_else(|| panic!("no {k}= in {line:?}"))
        };
        Self {
            addr: field("addr").parse().expect("addr"),
            engine: field("engine"),
            child,
            stderr,
            _dir: dir,
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr lock").clone()
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid")
    }
}

impl Drop for Limited {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- ringfwd stderr ---\n{}", self.stderr());
        }
    }
}

impl Limits {
    fn describe(&self) -> String {
        format!(
            "nofile={:?} memlock={:?} user={}",
            self.nofile,
            self.memlock,
            if self.unprivileged { "nobody" } else { "root" }
        )
    }
}

/// `CONNS` clients at once each send 2 MiB through the relay to an echo upstream and read it
/// back: byte-exact (SHA-256) and ended with a clean EOF.
fn serves(relay: &Limited, conns: u64) {
    const LEN: usize = 2 << 20;
    std::thread::scope(|s| {
        for id in 0..conns {
            let addr = relay.addr;
            s.spawn(move || {
                let mut c = connect(addr);
                let mut w = c.try_clone().expect("clone");
                let sender = std::thread::spawn(move || {
                    let h = data::send_payload(&mut w, 500 + id, LEN);
                    w.shutdown(Shutdown::Write).expect("client FIN");
                    h
                });
                let (n, got) = data::hash_to_eof(&mut c);
                let sent = sender.join().expect("sender");
                assert_eq!(n, LEN as u64, "connection {id}: bytes echoed");
                assert_eq!(got, sent, "connection {id}: echo corrupted");
            });
        }
    });
}

/// Lines of the child's stderr at WARN level.
fn warnings(relay: &Limited) -> Vec<String> {
    // The warnings come before the `listening` line on stdout, but stderr is read by its own
    // thread. In stderr itself they come before the `listening` log line: wait for that line
    // (bounded; it is missing only when RUST_LOG hides INFO), not for a guessed time.
    support::eventually(support::STEP_TIMEOUT, || {
        relay
            .stderr()
            .lines()
            .any(|l| l.contains(" INFO ") && l.contains(": listening rule="))
    });
    relay
        .stderr()
        .lines()
        .filter(|l| l.contains("WARN"))
        .map(str::to_string)
        .collect()
}

/// A forwarder limited to 64 descriptors, asked for splice with two workers (whose default
/// pools alone would want 2 × 16 pipes = 64 descriptors): it starts on io_uring, its pipe
/// pools are cut short instead of taking every descriptor, and 10 connections at once (20
/// descriptors) are relayed byte-exact.
fn low_nofile_still_serves(engine: &[&str]) {
    let _load = support::light();
    let backend = Backend::echo();
    let mut args = vec!["--workers", "2"];
    args.extend_from_slice(engine);
    let limits = Limits {
        nofile: Some(64),
        ..Limits::default()
    };
    let relay = Limited::start(limits, backend.addr(), &args);
    let fds = procfs::fd_count(relay.pid());
    eprintln!(
        "low nofile ({engine:?}): engine={} fds at start {fds}/64; warnings: {:?}",
        relay.engine,
        warnings(&relay)
    );
    assert!(
        fds <= 64 - 20,
        "the forwarder holds {fds} of its 64 descriptors before any connection: nothing is \
         left for 10 connections (2 each)"
    );
    serves(&relay, 10);
}

#[test]
fn low_nofile_uring_splice_still_serves() {
    if support::engine_available(&["--engine", "uring", "--mode", "splice"]) {
        low_nofile_still_serves(&["--engine", "uring", "--mode", "splice"]);
    }
}

#[test]
fn low_nofile_uring_auto_still_serves() {
    if support::engine_available(&["--engine", "uring", "--mode", "auto"]) {
        low_nofile_still_serves(&["--engine", "uring", "--mode", "auto"]);
    }
}

#[test]
fn low_nofile_tokio_still_serves() {
    low_nofile_still_serves(&["--engine", "tokio"]);
}

/// Asserts this process can drop a child to `nobody`.
fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the resource-limit tests run the forwarder as `nobody` and set a sysctl: run them as root"
    );
}

/// An unprivileged forwarder with `engine = "auto"` and almost no locked memory (0 and
/// 64 KiB: too little for a worker's ring of 1024 entries): it starts, runs tokio after one
/// warning that says why, and serves.
#[test]
fn low_memlock_auto_falls_back_to_tokio() {
    let _load = support::light();
    require_root();
    let backend = Backend::echo();
    for memlock in [0, 64 << 10] {
        let limits = Limits {
            memlock: Some(memlock),
            unprivileged: true,
            ..Limits::default()
        };
        let relay = Limited::start(
            limits,
            backend.addr(),
            &["--engine", "auto", "--workers", "2"],
        );
        let warned = warnings(&relay);
        eprintln!(
            "low memlock {memlock} B, auto: engine={}; warnings: {warned:?}",
            relay.engine
        );
        assert_eq!(
            relay.engine, "tokio",
            "memlock {memlock} B: auto should run tokio when the rings do not fit"
        );
        let fallbacks = warned.iter().filter(|l| l.contains("falling back")).count();
        assert_eq!(
            fallbacks, 1,
            "memlock {memlock} B: one fallback warning, got {warned:?}"
        );
        serves(&relay, 4);
    }
}

/// An unprivileged uring forwarder whose locked-memory limit (1 MiB) holds its rings but not
/// its 2 × 2 MiB of copy buffers: it warns about the registration and keeps serving on
/// unregistered buffers.
#[test]
fn low_memlock_uring_serves_with_unregistered_buffers() {
    let _load = support::light();
    require_root();
    if !support::engine_available(&["--engine", "uring"]) {
        return;
    }
    let backend = Backend::echo();
    let limits = Limits {
        memlock: Some(1 << 20),
        unprivileged: true,
        ..Limits::default()
    };
    let relay = Limited::start(
        limits,
        backend.addr(),
        &["--engine", "uring", "--mode", "copy", "--workers", "2"],
    );
    let warned = warnings(&relay);
    eprintln!("low memlock 1 MiB, uring: warnings: {warned:?}");
    assert_eq!(relay.engine, "uring");
    assert!(
        warned.iter().any(|l| l.to_lowercase().contains("memlock")),
        "no warning names RLIMIT_MEMLOCK: {warned:?}"
    );
    serves(&relay, 8);
}

/// Sets `fs.pipe-user-pages-soft` and puts the old value back on drop, panic or not.
struct PipePagesSoft {
    old: String,
}

const PIPE_PAGES_SOFT: &str = "/proc/sys/fs/pipe-user-pages-soft";

impl PipePagesSoft {
    fn set(pages: u64) -> Self {
        let old = std::fs::read_to_string(PIPE_PAGES_SOFT)
            .unwrap_or_else(|e| panic!("read {PIPE_PAGES_SOFT}: {e}"));
        std::fs::write(PIPE_PAGES_SOFT, pages.to_string())
            .unwrap_or_else(|e| panic!("write {PIPE_PAGES_SOFT} (needs root): {e}"));
        Self {
            old: old.trim().to_string(),
        }
    }
}

impl Drop for PipePagesSoft {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(PIPE_PAGES_SOFT, &self.old) {
            eprintln!(
                "warning: could not restore {PIPE_PAGES_SOFT} to {}: {e}",
                self.old
            );
        }
    }
}

/// With `fs.pipe-user-pages-soft` at 64 pages (256 KiB, a quarter of one default pipe) an
/// unprivileged splice forwarder gets only tiny pipes: it refuses them with one warning, and
/// bulk transfers are relayed byte-exact on the copy path.
#[test]
fn low_pipe_user_pages_soft_degrades_to_copy() {
    // Exclusive: the sysctl is host-wide, and the pipes of any other unprivileged process
    // created meanwhile would be cut short too.
    let _load = support::heavy();
    require_root();
    if !support::engine_available(&["--engine", "uring", "--mode", "splice"]) {
        return;
    }
    let backend = Backend::echo();
    let relay = {
        let _soft = PipePagesSoft::set(64);
        let limits = Limits {
            unprivileged: true,
            ..Limits::default()
        };
        let relay = Limited::start(
            limits,
            backend.addr(),
            &["--engine", "uring", "--mode", "splice", "--workers", "2"],
        );
        // The pools are made at start; the sysctl goes back as soon as they exist.
        relay
    };
    let warned = warnings(&relay);
    eprintln!("low pipe-user-pages-soft: warnings: {warned:?}");
    assert_eq!(relay.engine, "uring");
    let pipe_warnings = warned.iter().filter(|l| l.contains("pipe")).count();
    assert!(
        (1..=2).contains(&pipe_warnings),
        "expected one pipe warning per worker at most: {warned:?}"
    );
    serves(&relay, 8);
}
