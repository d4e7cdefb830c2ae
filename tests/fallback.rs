//! `--engine auto` falls back to tokio where io_uring is unavailable, and says so once.
//!
//! Where io_uring is missing in the field it is usually a seccomp profile (Docker ≥ 25 and
//! containerd deny `io_uring_setup` with EPERM, podman with ENOSYS — which looks like a kernel
//! without io_uring). These tests reproduce exactly that: the forwarder runs as a child
//! process with a seccomp filter, installed between fork and exec, that answers the three
//! io_uring syscalls with EPERM or ENOSYS and allows everything else. Then, for each errno:
//!
//! 1. `--engine auto` starts on tokio, prints one warning that names seccomp (not the
//!    kernel) and the fix for Docker, podman and containerd, and forwards bytes;
//! 2. `--engine uring` refuses to start: exit status 1, one error line saying the same, no
//!    panic;
//! 3. without the filter, `--engine auto` picks io_uring on a host that has it. Where the
//!    host genuinely lacks io_uring this fails, so a CI runner that silently lost io_uring
//!    is noticed; `RINGFWD_SKIP_URING=1` acknowledges such a host on purpose.
//!
//! Every child is stopped with SIGTERM by its pid and killed in `Drop` if a test fails
//! half-way; every wait has a deadline.
#![deny(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};

/// How long a child may take to print its `listening` line (a debug build on a busy
/// two-core machine can be slow to start).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a child may take to exit after SIGTERM, or to fail at start.
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);
/// Reads and writes through the forwarder.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A BPF program that fails `io_uring_setup`, `io_uring_enter` and `io_uring_register` with
/// `errno` (EPERM: Docker's and containerd's default profiles; ENOSYS: podman's) and allows
/// every other syscall.
fn deny_io_uring(errno: i32) -> BpfProgram {
    let denied: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = [
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
    ]
    .into_iter()
    .map(|nr| (nr, Vec::new())) // no conditions: match every call
    .collect();
    let arch = std::env::consts::ARCH
        .try_into()
        .expect("seccompiler supports this architecture");
    let filter = SeccompFilter::new(
        denied,
        SeccompAction::Allow,
        SeccompAction::Errno(errno as u32),
        arch,
    )
    .expect("valid seccomp filter");
    filter.try_into().expect("seccomp filter compiles to BPF")
}

/// Makes `cmd`'s child install `program` before it execs, so the filter covers the whole
/// life of the new program (and cannot be lifted: it also sets `no_new_privs`).
#[allow(unsafe_code)]
fn with_seccomp(cmd: &mut Command, program: BpfProgram) {
    // SAFETY: the closure runs in the forked child, where only async-signal-safe work is
    // allowed. It calls `seccompiler::apply_filter`, which makes two raw syscalls
    // (`prctl(PR_SET_NO_NEW_PRIVS)` and `seccomp(SECCOMP_SET_MODE_FILTER)`) on the program
    // that was compiled and allocated here, before the fork; it neither allocates nor takes
    // locks. Its errors carry only an OS error code (no allocation) and are turned into an
    // `io::Error` from that code, which also does not allocate.
    unsafe {
        cmd.pre_exec(move || match seccompiler::apply_filter(&program) {
            Ok(()) => Ok(()),
            Err(seccompiler::Error::Prctl(e) | seccompiler::Error::Seccomp(e)) => Err(e),
            Err(_) => Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
        });
    }
}

/// An echo backend on loopback: every connection gets back what it sent, then EOF.
fn start_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind echo backend");
    let addr = listener.local_addr().expect("echo backend address");
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            thread::spawn(move || {
                let mut back = conn.try_clone().expect("clone echo socket");
                let _ = std::io::copy(&mut conn, &mut back);
                let _ = back.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

/// A `ringfwd` child with its stdout lines and stderr collected on threads.
struct Forwarder {
    child: Child,
    stdout: Receiver<String>,
    stderr: Option<JoinHandle<Vec<String>>>,
}

impl Forwarder {
    /// `deny_uring`: the errno a seccomp filter answers the io_uring calls with, if any.
    fn spawn(args: &[&str], deny_uring: Option<i32>) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringfwd"));
        cmd.args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(errno) = deny_uring {
            with_seccomp(&mut cmd, deny_io_uring(errno));
        }
        let mut child = cmd.spawn().expect("start ringfwd");
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        let (tx, stdout) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = thread::spawn(move || {
            BufReader::new(err)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<_>>()
        });
        Self {
            child,
            stdout,
            stderr: Some(stderr),
        }
    }

    /// Waits for the `listening rule=.. addr=.. engine=..` line; returns (addr, engine).
    fn wait_listening(&mut self) -> (SocketAddr, String) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self.stdout.recv_timeout(left) {
                Ok(line) => line,
                Err(e) => {
                    let status = self.child.try_wait().ok().flatten();
                    panic!(
                        "no `listening` line from ringfwd ({e}; exit status {status:?}); stderr:\n{}",
                        self.stderr_after_kill().join("\n")
                    );
                }
            };
            if !line.starts_with("listening ") {
                continue;
            }
            let field = |key: &str| {
                line.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(key))
                    .unwrap_or_else(|| panic!("no {key} in {line:?}"))
                    .to_string()
            };
            let addr = field("addr=")
                .parse()
                .unwrap_or_else(|e| panic!("bad addr in {line:?}: {e}"));
            return (addr, field("engine="));
        }
    }

    /// Waits (bounded) for the child to exit by itself.
    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for ringfwd") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "ringfwd (pid {}) did not exit within {EXIT_TIMEOUT:?}",
                self.child.id()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM by pid, then a bounded wait for a clean exit.
    fn stop(&mut self) -> ExitStatus {
        kill(self.pid(), Signal::SIGTERM).expect("SIGTERM ringfwd");
        self.wait_exit()
    }

    /// Every stderr line; only call once the child has exited (or been killed).
    fn stderr_lines(&mut self) -> Vec<String> {
        self.stderr
            .take()
            .map(|h| h.join().expect("stderr reader"))
            .unwrap_or_default()
    }

    fn stderr_after_kill(&mut self) -> Vec<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stderr_lines()
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits i32"))
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sends a message through the forwarder, half-closes, and expects it back followed by EOF.
fn assert_forwards(addr: SocketAddr) {
    let msg: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    let mut s = TcpStream::connect(addr).expect("connect to the forwarder");
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    // The echo sends back while we write; 64 KiB fits the loopback buffers both ways.
    s.write_all(&msg).expect("write through the forwarder");
    s.shutdown(Shutdown::Write).expect("half-close");
    let mut back = Vec::with_capacity(msg.len());
    s.read_to_end(&mut back).expect("read the echo back");
    assert!(
        back == msg,
        "got {} bytes back instead of the {} sent",
        back.len(),
        msg.len()
    );
}

/// The level token of a tracing text line ("2026-…Z  WARN ringfwd::engine: …").
fn is_level(line: &str, level: &str) -> bool {
    line.split_whitespace().nth(1) == Some(level)
}

/// What the warning must name as the cause of `errno`. With `kernel.io_uring_disabled` set,
/// EPERM is (rightly) blamed on the sysctl, since it cannot be told apart from a seccomp
/// denial. ENOSYS on a kernel that has io_uring (every kernel since 5.1 that CI runs on) is
/// a filter, never "built without CONFIG_IO_URING".
fn expected_cause(errno: i32) -> Vec<&'static str> {
    let sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let fix = [
        "seccomp filter is blocking the io_uring calls",
        "allow io_uring_setup, io_uring_enter and io_uring_register",
        "docker run --security-opt seccomp=/usr/share/ringfwd/seccomp/seccomp-io_uring.json",
        "podman run --security-opt seccomp=",
        "containerd",
    ];
    match (errno, sysctl.as_str()) {
        (libc::EPERM, "1" | "2") => vec!["kernel.io_uring_disabled", "sysctl"],
        (libc::EPERM, _) => [&["EPERM"][..], &fix].concat(),
        _ => [&["ENOSYS"][..], &fix].concat(),
    }
}

/// Words a seccomp denial must not be blamed on.
fn assert_blames_no_kernel_option(line: &str) {
    assert!(
        !line.contains("CONFIG_IO_URING") || line.contains("unless built without"),
        "a filtered kernel is not a kernel without io_uring: {line}"
    );
}

fn assert_no_panic(lines: &[String]) {
    assert!(
        !lines.iter().any(|l| l.contains("panicked")),
        "ringfwd panicked:\n{}",
        lines.join("\n")
    );
}

#[test]
fn auto_falls_back_to_tokio_with_one_warning_when_seccomp_denies_io_uring() {
    auto_falls_back_when_seccomp_answers(libc::EPERM);
}

#[test]
fn auto_falls_back_naming_seccomp_when_seccomp_answers_enosys() {
    auto_falls_back_when_seccomp_answers(libc::ENOSYS);
}

#[test]
fn explicit_uring_refuses_to_start_when_seccomp_denies_io_uring() {
    explicit_uring_refuses_when_seccomp_answers(libc::EPERM);
}

#[test]
fn explicit_uring_refuses_naming_seccomp_when_seccomp_answers_enosys() {
    explicit_uring_refuses_when_seccomp_answers(libc::ENOSYS);
}

fn auto_falls_back_when_seccomp_answers(errno: i32) {
    // 1. A backend, and the forwarder with io_uring denied.
    let echo = start_echo();
    let upstream = echo.to_string();
    let mut fwd = Forwarder::spawn(
        &[
            "run",
            "--engine",
            "auto",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &upstream,
            "--shutdown-grace",
            "1s",
        ],
        Some(errno),
    );

    // 2. It starts, on tokio.
    let (addr, engine) = fwd.wait_listening();
    assert_eq!(engine, "tokio", "auto must fall back to tokio");

    // 3. It forwards, both ways, with the half-close passed on.
    assert_forwards(addr);

    // 4. It stops cleanly on SIGTERM.
    let status = fwd.stop();
    let lines = fwd.stderr_lines();
    assert!(
        status.success(),
        "exit {status}; stderr:\n{}",
        lines.join("\n")
    );
    assert_no_panic(&lines);

    // 5. Exactly one warning, on one line: io_uring is unavailable, why, and how to enable it.
    // (Run as root, as CI is, ringfwd also warns that it keeps root without `user`: that
    // warning is about privileges, not io_uring, and tests/deploy.rs checks it.)
    let warnings: Vec<&String> = lines
        .iter()
        .filter(|l| is_level(l, "WARN") && !l.contains("running as root; set user = "))
        .collect();
    assert_eq!(
        warnings.len(),
        1,
        "expected exactly one warning; stderr:\n{}",
        lines.join("\n")
    );
    let w = warnings[0];
    assert!(
        w.contains("io_uring unavailable") && w.contains("falling back to the tokio engine"),
        "the warning must say io_uring is unavailable and what runs instead: {w}"
    );
    for needle in expected_cause(errno) {
        assert!(w.contains(needle), "the warning lacks {needle:?}: {w}");
    }
    assert_blames_no_kernel_option(w);
    assert_says_once(w);
}

fn explicit_uring_refuses_when_seccomp_answers(errno: i32) {
    // 1. Same filter, but io_uring asked for explicitly.
    let echo = start_echo();
    let upstream = echo.to_string();
    let mut fwd = Forwarder::spawn(
        &[
            "run",
            "--engine",
            "uring",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &upstream,
        ],
        Some(errno),
    );

    // 2. It exits by itself with status 1, having listened on nothing.
    let status = fwd.wait_exit();
    let lines = fwd.stderr_lines();
    let stdout: Vec<String> = fwd.stdout.try_iter().collect();
    assert_eq!(
        status.code(),
        Some(1),
        "exit {status}; stderr:\n{}",
        lines.join("\n")
    );
    assert!(
        stdout.is_empty(),
        "nothing should be printed on stdout: {stdout:?}"
    );
    assert_no_panic(&lines);

    // 3. One error line, saying why.
    let lines: Vec<&String> = lines.iter().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got {lines:?}");
    let e = lines[0];
    assert!(
        e.starts_with("ringfwd: error: io_uring engine unavailable: "),
        "unexpected error line: {e}"
    );
    for needle in expected_cause(errno) {
        assert!(e.contains(needle), "the error lacks {needle:?}: {e}");
    }
    assert_blames_no_kernel_option(e);
    assert_says_once(e);
}

/// A message printed with its cause chain must not say the same clause twice (an error that
/// embeds its cause in its text and also exposes it as a `source` does).
fn assert_says_once(line: &str) {
    let clauses: Vec<&str> = line.split(": ").collect();
    for (i, c) in clauses.iter().enumerate() {
        assert!(
            !clauses[..i].contains(c),
            "the message repeats {c:?}: {line}"
        );
    }
}

#[test]
fn auto_picks_io_uring_where_it_is_available() {
    let skip = std::env::var("RINGFWD_SKIP_URING").is_ok_and(|v| v == "1");

    // 1. No filter: the host as it is.
    let echo = start_echo();
    let upstream = echo.to_string();
    let mut fwd = Forwarder::spawn(
        &[
            "run",
            "--engine",
            "auto",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &upstream,
            "--shutdown-grace",
            "1s",
        ],
        None,
    );

    // 2. Whatever it picked, it forwards and stops cleanly.
    let (addr, engine) = fwd.wait_listening();
    assert_forwards(addr);
    let status = fwd.stop();
    let lines = fwd.stderr_lines();
    assert!(
        status.success(),
        "exit {status}; stderr:\n{}",
        lines.join("\n")
    );
    assert_no_panic(&lines);

    // 3. It picked io_uring — unless this host is known to lack it.
    let fallback = lines.iter().find(|l| l.contains("io_uring unavailable"));
    if engine != "uring" && skip {
        eprintln!(
            "RINGFWD_SKIP_URING=1: not requiring io_uring on this host (picked {engine}: {})",
            fallback.map_or("no warning", String::as_str)
        );
        return;
    }
    assert_eq!(
        engine,
        "uring",
        "io_uring is unavailable on this host, so the io_uring engine goes untested here: {}. \
         Enable io_uring (see README, \"Operating notes\"), or set RINGFWD_SKIP_URING=1 to \
         accept running without it.",
        fallback.map_or("(no warning printed)", String::as_str)
    );
    assert!(
        fallback.is_none(),
        "picked uring but also warned about a fallback: {fallback:?}"
    );
}
