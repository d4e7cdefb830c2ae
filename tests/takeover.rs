//! `run --takeover` and its control socket (`control_socket`), on every engine:
//!
//! - a rule over a large port range is handed over several times in a row while clients
//!   connect across the whole range: no connection is refused, and no takeover fails (each
//!   one used to fail at random on the uring engine with `Interrupted system call`);
//! - the control socket is created before the privilege drop (so a root-owned directory
//!   works), mode 0600, and only root and the configured `user` may talk to it: a process of
//!   another uid is refused, even when the file would let it connect;
//! - a control socket whose directory is missing or unsafe fails the start, in one line, and
//!   `ringfwd check` says so too.
//!
//! [`engine_suite!`] lines at the bottom run every scenario once per engine.

mod support;

use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use support::relay::run_to_exit;
use support::sock::Backend;
use support::{Relay, STEP_TIMEOUT, eventually, nobody, root_or_skip, wait_for_line};

support::engine_suite!(
    [
        a_port_range_is_taken_over_again_and_again_refusing_nothing,
        only_root_and_the_configured_user_may_take_over,
    ],
    std_engine: ["--engine", "std"],
    tokio_engine: ["--engine", "tokio"],
    uring: ["--engine", "uring"],
    // `[uring] wait = "epoll"`: the worker sleeps on an epoll set of its sockets.
    uring_epoll: ["--engine", "uring", "--uring-wait", "epoll"],
);

/// Ports in the range handed over.
const RANGE: u16 = 2000;
/// Takeovers in a row (each new process is taken over by the next).
const ROUNDS: usize = 5;
/// Connections the clients complete between two takeovers, and after the last.
const BETWEEN: u64 = 200;
/// A uid no process of the test host runs as, with no passwd entry: the hijacker.
const STRANGER: u32 = 54_321;

/// A fresh directory for a control socket, mode 0755 and owned by whoever runs the test
/// (root on CI: writable by root only), removed when dropped.
struct ControlDir {
    path: PathBuf,
}

impl ControlDir {
    fn new(mode: u32) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "ringfwd-ctl-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).expect("create the control directory");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        Self { path }
    }

    fn socket(&self) -> PathBuf {
        self.path.join("ctl.sock")
    }
}

impl Drop for ControlDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn args<'a>(base: &[&'a str], engine: &[&'a str]) -> Vec<&'a str> {
    let mut v = base.to_vec();
    v.extend_from_slice(engine);
    v
}

/// The first of `count` consecutive loopback ports that were all free a moment ago.
fn free_range(count: u16) -> u16 {
    let mut rng = rand::thread_rng();
    for _ in 0..50 {
        let base: u16 = rng.gen_range(10_000..=32_000 - count);
        let bound: Result<Vec<_>, _> = (0..count)
            .map(|i| TcpListener::bind(("127.0.0.1", base + i)))
            .collect();
        if bound.is_ok() {
            return base;
        }
    }
    panic!("no run of {count} free loopback ports found in 50 tries");
}

/// Clients connecting across a port range in a loop (16 bytes there and back), counting
/// refusals apart from other failures.
struct Clients {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Clients {
    fn start(base: u16, count: u16, threads: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..threads)
            .map(|t| {
                let (stop, ok, refused, failures) =
                    (stop.clone(), ok.clone(), refused.clone(), failures.clone());
                std::thread::spawn(move || {
                    let mut n = u64::from(t);
                    while !stop.load(Ordering::Acquire) {
                        // Every port of the range in turn (the threads interleaved).
                        let port = base + u16::try_from(n % u64::from(count)).expect("fits");
                        let addr = SocketAddr::from(([127, 0, 0, 1], port));
                        match support::sock::echo_exchange(addr, n) {
                            Ok(()) => {
                                ok.fetch_add(1, Ordering::AcqRel);
                            }
                            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                                refused.fetch_add(1, Ordering::AcqRel);
                            }
                            Err(e) => failures.lock().unwrap().push(format!("{addr}: {e}")),
                        }
                        n += 7;
                    }
                })
            })
            .collect();
        Self {
            stop,
            ok,
            refused,
            failures,
            threads,
        }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Acquire)
    }

    /// Waits until `more` connections completed from now.
    fn wait_more(&self, more: u64) {
        let want = self.ok() + more;
        assert!(
            eventually(Duration::from_secs(60), || self.ok() >= want),
            "the clients completed only {} connections (refused {}; failures {:?})",
            self.ok(),
            self.refused.load(Ordering::Acquire),
            self.failures.lock().unwrap()
        );
    }

    fn finish(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Release);
        for t in self.threads {
            t.join().expect("a client thread panicked");
        }
        let failures = self.failures.lock().unwrap().clone();
        (
            self.ok.load(Ordering::Acquire),
            self.refused.load(Ordering::Acquire),
            failures,
        )
    }
}

/// A rule over [`RANGE`] ports with a control socket, taken over [`ROUNDS`] times in a row
/// (each new process by the next) while clients connect across the whole range: every
/// takeover succeeds, each old process drains and exits 0, no connection is refused or fails.
fn a_port_range_is_taken_over_again_and_again_refusing_nothing(engine: &[&str]) {
    let _g = support::heavy();
    let pool = Backend::echo();
    let dir = ControlDir::new(0o755);
    let ctl = dir.socket().display().to_string();
    let (mut old, base, config_file) = (0..5)
        .find_map(|_| {
            let base = free_range(RANGE);
            let config = support::TempFile::new(
                "takeover-range",
                &format!(
                    "control_socket = \"{ctl}\"\nshutdown_grace = \"10s\"\n[[rule]]\nname = \"r\"\nlisten = \"127.0.0.1:{base}-{}\"\nupstream = \"{}\"\n",
                    base + (RANGE - 1),
                    pool.addr()
                ),
            );
            let path = config.path.display().to_string();
            match Relay::try_spawn(&args(&["run", "--config", &path], engine), 1) {
                Ok(relay) => Some((relay, base, config)),
                Err(f) if f.stderr.contains("address already in use") => None,
                Err(f) => panic!("ringfwd did not start: {f}"),
            }
        })
        .expect("every range tried was taken by the time the forwarder bound it");
    let config = config_file.path.display().to_string();
    let clients = Clients::start(base, RANGE, 2);
    clients.wait_more(BETWEEN);
    for round in 1..=ROUNDS {
        let new = Relay::try_spawn(
            &args(&["run", "--config", &config, "--takeover", &ctl], engine),
            1,
        )
        .unwrap_or_else(|f| panic!("takeover {round} of {ROUNDS} failed: {f}"));
        assert_eq!(new.addr().port(), base, "takeover {round}: another range");
        wait_for_line(
            &new,
            "received the running process's listening sockets",
            STEP_TIMEOUT,
        );
        let status = old.wait_exit(Duration::from_secs(30));
        assert!(
            status.is_some_and(|s| s.success()),
            "takeover {round}: the old process did not exit cleanly: {status:?}\n{}",
            old.stderr()
        );
        old = new;
        clients.wait_more(BETWEEN);
    }
    let (ok, refused, failures) = clients.finish();
    eprintln!(
        "{ROUNDS} takeovers of {RANGE} ports: {ok} connections completed, {refused} refused, {} failed",
        failures.len()
    );
    assert_eq!(refused, 0, "connections refused across the takeovers");
    assert!(failures.is_empty(), "failures: {failures:#?}");
    old.stop_and_wait();
}

/// Connects to the control socket at `path` as `uid`/`gid` — a forked child that switches
/// to them first — and asks for the sockets: the first answer, or the `connect` error.
fn hijack(path: &Path, uid: u32, gid: u32) -> Result<String, nix::errno::Errno> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let addr = socket2::SockAddr::unix(path).expect("a unix address");
    // Close-on-exec: a forwarder another test starts meanwhile must not hold it open.
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
    let hello = b"TAKEOVER ringfwd/1";
    // SAFETY: the child makes only raw system calls (no allocation, no lock: this test
    // process has other threads) and ends with `_exit`.
    match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => unsafe {
            let out = w.as_raw_fd();
            let report = |tag: u8, code: i32| {
                let mut msg = [tag, 0, 0, 0, 0];
                msg[1..].copy_from_slice(&code.to_ne_bytes());
                libc::write(out, msg.as_ptr().cast(), msg.len());
                libc::_exit(0);
            };
            if libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0
                || libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0
                || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
            {
                report(b'U', *libc::__errno_location());
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0);
            if fd < 0 || libc::connect(fd, addr.as_ptr().cast(), addr.len()) != 0 {
                report(b'C', *libc::__errno_location());
            }
            let tv = libc::timeval {
                tv_sec: 10,
                tv_usec: 0,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                u32::try_from(std::mem::size_of::<libc::timeval>()).unwrap_or(16),
            );
            libc::send(fd, hello.as_ptr().cast(), hello.len(), 0);
            let mut buf = [0u8; 512];
            let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
            let n = usize::try_from(n).unwrap_or(0);
            libc::write(out, b"A".as_ptr().cast(), 1);
            libc::write(out, buf.as_ptr().cast(), n);
            libc::_exit(0);
        },
        nix::unistd::ForkResult::Parent { child } => {
            drop(w);
            // SAFETY: `r` is this process's read end of the pipe; the File takes it over.
            let mut file =
                unsafe { std::fs::File::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(r)) };
            let mut got = Vec::new();
            file.read_to_end(&mut got).expect("read the child's report");
            nix::sys::wait::waitpid(child, None).expect("reap the child");
            match got.split_first() {
                Some((b'A', answer)) => Ok(String::from_utf8_lossy(answer).into_owned()),
                Some((b'C', code)) => Err(nix::errno::Errno::from_raw(i32::from_ne_bytes(
                    code.try_into().expect("an errno"),
                ))),
                other => panic!("the hijacker could not become uid {uid}: {other:?}"),
            }
        }
    }
}

/// Started as root with `user = "nobody"` and its control socket in a directory only root
/// can write: the socket is there (created before the drop), mode 0600, owned by nobody. A
/// process of another uid cannot connect to it; made connectable, it is refused anyway
/// (`SO_PEERCRED`), the refusal is logged, and the forwarder serves on. Root then takes over.
fn only_root_and_the_configured_user_may_take_over(engine: &[&str]) {
    if !root_or_skip("control-socket privilege") {
        return;
    }
    let _g = support::light();
    let pool = Backend::echo();
    let dir = ControlDir::new(0o755);
    let sock = dir.socket();
    let ctl = sock.display().to_string();
    let config = support::TempFile::new(
        "takeover-peer",
        &format!(
            "user = \"nobody\"\ncontrol_socket = \"{ctl}\"\nshutdown_grace = \"10s\"\n[[rule]]\nname = \"r\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
            pool.addr()
        ),
    );
    let path = config.path.display().to_string();
    let mut old = Relay::try_spawn(&args(&["run", "--config", &path], engine), 1)
        .unwrap_or_else(|f| panic!("ringfwd did not start: {f}"));
    wait_for_line(&old, "dropped root privileges", STEP_TIMEOUT);
    let meta = std::fs::symlink_metadata(&sock).expect("the control socket exists");
    assert!(
        std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()),
        "{meta:?}"
    );
    assert_eq!(meta.mode() & 0o777, 0o600, "mode {:o}", meta.mode());
    assert_eq!(meta.uid(), nobody().0, "the socket's owner");
    assert_eq!(
        hijack(&sock, STRANGER, STRANGER),
        Err(nix::errno::Errno::EACCES),
        "the file lets another uid connect"
    );
    // Were the file opened up, the peer check still refuses.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let answer = hijack(&sock, STRANGER, STRANGER).expect("connects once the file allows it");
    assert!(
        answer.starts_with("ERR") && answer.contains("not allowed"),
        "{answer}"
    );
    let line = wait_for_line(&old, "control socket: connection refused", STEP_TIMEOUT);
    assert!(line.contains(&format!("uid {STRANGER}")), "{line}");
    assert!(old.is_running(), "the forwarder stopped");
    assert!(!old.stderr().contains("draining"), "{}", old.stderr());
    support::pool::echo_once(old.addr(), b"still mine").expect("still serving");

    // Root may: the takeover goes through.
    let mut new = Relay::try_spawn(
        &args(&["run", "--config", &path, "--takeover", &ctl], engine),
        1,
    )
    .unwrap_or_else(|f| panic!("root's takeover failed: {f}"));
    assert_eq!(new.addr(), old.addr());
    let status = old.wait_exit(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        old.stderr()
    );
    support::pool::echo_once(new.addr(), b"new").expect("the new process serves");
    new.stop_and_wait();
}

/// `run` with a control socket at `socket` exits 1 with one error line saying `why`, before
/// it listens; `check` exits 1 saying it too.
fn refused_at_start(socket: &Path, why: &str) {
    let config = support::TempFile::new(
        "takeover-dir",
        &format!(
            "control_socket = \"{}\"\n[[rule]]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n",
            socket.display()
        ),
    );
    let path = config.path.display().to_string();
    let run = run_to_exit(&["run", "--config", &path, "--engine", "std"]);
    assert_eq!(run.status.code(), Some(1), "{run:?}");
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].starts_with("ringfwd: error: control_socket") && lines[0].contains(why),
        "{lines:#?}"
    );
    assert!(!run.stdout.contains("listening"), "{}", run.stdout);
    let check = run_to_exit(&["check", "--config", &path]);
    assert_eq!(check.status.code(), Some(1), "{check:?}");
    assert!(check.stderr.contains(why), "{}", check.stderr);
}

/// A control socket in a directory that is missing, writable by others without the sticky
/// bit, or owned by another user fails the start in one line (and `check`); a sticky
/// directory such as /tmp is accepted.
#[test]
fn a_missing_or_unsafe_control_directory_fails_the_start() {
    let _g = support::light();
    let missing = ControlDir::new(0o755);
    refused_at_start(&missing.path.join("no-such-dir/ctl.sock"), "does not exist");
    let world = ControlDir::new(0o777);
    refused_at_start(
        &world.socket(),
        "world-writable (mode 0777) without the sticky bit",
    );
    let group = ControlDir::new(0o775);
    refused_at_start(&group.socket(), "group-writable (mode 0775)");
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        let other = ControlDir::new(0o755);
        std::os::unix::fs::chown(&other.path, Some(STRANGER), None).unwrap();
        refused_at_start(&other.socket(), &format!("owned by uid {STRANGER}"));
    }
    let sticky = ControlDir::new(0o1777);
    let config = support::TempFile::new(
        "takeover-dir",
        &format!(
            "control_socket = \"{}\"\n[[rule]]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n",
            sticky.socket().display()
        ),
    );
    let check = run_to_exit(&["check", "--config", &config.path.display().to_string()]);
    assert!(check.status.success(), "{check:?}");
    // A start that fails leaves nothing behind in the directory.
    assert_eq!(std::fs::read_dir(&world.path).unwrap().count(), 0);
}

/// `run --takeover` checks who listens on the control socket before it trusts the sockets
/// it would be sent: a listener of another uid (here a forked child that became
/// [`STRANGER`] before it bound the socket) is refused, and nothing starts.
#[test]
fn a_new_process_takes_no_sockets_from_a_stranger() {
    use std::os::fd::AsRawFd;
    if !root_or_skip("control-socket privilege") {
        return;
    }
    let _g = support::light();
    // Writable by the stranger, for its socket; the test checks the peer, not the directory.
    let dir = ControlDir::new(0o1777);
    let sock = dir.socket();
    let addr = socket2::SockAddr::unix(&sock).expect("a unix address");
    // Close-on-exec: the forwarder started below must not hold the stranger's pipe open.
    let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
    let (ready_r, ready_w) = pipe();
    let (hold_r, hold_w) = pipe();
    // SAFETY: the child makes only raw system calls (no allocation, no lock: this test
    // process has other threads) and ends with `_exit`.
    let child = match unsafe { nix::unistd::fork() }.expect("fork") {
        nix::unistd::ForkResult::Child => unsafe {
            let ok = libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) == 0
                && libc::syscall(libc::SYS_setresgid, STRANGER, STRANGER, STRANGER) == 0
                && libc::syscall(libc::SYS_setresuid, STRANGER, STRANGER, STRANGER) == 0;
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0);
            let ok = ok
                && fd >= 0
                && libc::bind(fd, addr.as_ptr().cast(), addr.len()) == 0
                && libc::listen(fd, 4) == 0;
            libc::write(ready_w.as_raw_fd(), [u8::from(ok)].as_ptr().cast(), 1);
            // Holds the socket until the test closes its end of the pipe (this copy of the
            // write end first, or the read never sees the end).
            libc::close(hold_w.as_raw_fd());
            let mut b = 0u8;
            libc::read(hold_r.as_raw_fd(), (&raw mut b).cast(), 1);
            libc::_exit(0);
        },
        nix::unistd::ForkResult::Parent { child } => child,
    };
    drop((ready_w, hold_r));
    let mut ready = [0u8; 1];
    std::fs::File::from(ready_r)
        .read_exact(&mut ready)
        .expect("the stranger's report");
    assert_eq!(ready, [1], "the stranger could not listen");
    let ctl = sock.display().to_string();
    let run = run_to_exit(&[
        "run",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "127.0.0.1:9",
        "--engine",
        "std",
        "--takeover",
        &ctl,
    ]);
    drop(hold_w);
    nix::sys::wait::waitpid(child, None).expect("reap the stranger");
    assert_eq!(run.status.code(), Some(1), "{run:?}");
    assert!(
        run.stderr.contains(&format!("uid {STRANGER}")) && run.stderr.contains("is not allowed"),
        "{}",
        run.stderr
    );
    assert!(!run.stdout.contains("listening"), "{}", run.stdout);
}

/// A new process that fails before it serves (here: its config adds a rule on a port that
/// is taken) changes nothing: the old one serves on, and its control socket is still the
/// one at the path — the next takeover goes through.
#[test]
fn a_failed_takeover_leaves_the_old_control_socket_in_place() {
    let _g = support::light();
    let pool = Backend::echo();
    let dir = ControlDir::new(0o755);
    let ctl = dir.socket().display().to_string();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let head = format!(
        "control_socket = \"{ctl}\"\n[[rule]]\nname = \"r\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
        pool.addr()
    );
    let good = support::TempFile::new("takeover-failed", &head);
    let bad = support::TempFile::new(
        "takeover-failed",
        &format!(
            "{head}[[rule]]\nname = \"busy\"\nlisten = \"{}\"\nupstream = \"{}\"\n",
            taken.local_addr().unwrap(),
            pool.addr()
        ),
    );
    let (good, bad) = (
        good.path.display().to_string(),
        bad.path.display().to_string(),
    );
    let mut old = Relay::try_spawn(&["run", "--config", &good, "--engine", "std"], 1)
        .unwrap_or_else(|f| panic!("ringfwd did not start: {f}"));
    let failed = run_to_exit(&[
        "run",
        "--config",
        &bad,
        "--engine",
        "std",
        "--takeover",
        &ctl,
    ]);
    assert_eq!(failed.status.code(), Some(1), "{failed:?}");
    assert!(
        failed.stderr.contains("address already in use"),
        "{failed:?}"
    );
    assert!(old.is_running(), "{}", old.stderr());
    support::pool::echo_once(old.addr(), b"still").expect("the old process serves on");
    // Nothing of the failed process is left in the directory.
    let names: Vec<_> = std::fs::read_dir(&dir.path)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["ctl.sock"], "{names:?}");
    let mut new = Relay::try_spawn(
        &[
            "run",
            "--config",
            &good,
            "--engine",
            "std",
            "--takeover",
            &ctl,
        ],
        1,
    )
    .unwrap_or_else(|f| panic!("the second takeover failed: {f}"));
    assert_eq!(new.addr(), old.addr());
    let status = old.wait_exit(Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    new.stop_and_wait();
}
