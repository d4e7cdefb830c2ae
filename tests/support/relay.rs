//! The forwarder under test: `ringfwd run` as a child process, owned by a guard.
//!
//! [`Relay`] starts the built binary, waits (with a bound) for its `listening rule=… addr=…
//! engine=…` lines, and keeps draining its stdout and stderr on background threads so a
//! chatty access log can never block it. Dropping the guard kills the child with SIGKILL if it
//! is still running, and a failing test prints the child's stderr to explain itself.

use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::{STEP_TIMEOUT, TempFile};

/// The built `ringfwd` binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_ringfwd");

/// How long the forwarder may take to print its readiness lines.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A forwarder that exited (or never said it was ready) instead of starting.
#[derive(Debug)]
pub struct StartFailure {
    pub status: Option<ExitStatus>,
    pub stderr: String,
}

impl fmt::Display for StartFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some(s) => write!(f, "exited with {s}")?,
            None => write!(f, "not ready within {READY_TIMEOUT:?}")?,
        }
        write!(f, "; stderr:\n{}", self.stderr)
    }
}

/// What a short-lived `ringfwd` command left behind.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `ringfwd ARGS` to completion (e.g. `check`), with `RUST_BACKTRACE=1` so that a panic
/// could not hide behind a short message.
///
/// # Panics
/// It did not exit within [`STEP_TIMEOUT`] (it is killed).
pub fn run_to_exit(args: &[&str]) -> Finished {
    let mut child = Command::new(BIN)
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {BIN}: {e}"));
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut text);
            }
            text
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let Some(status) = super::wait_child(&mut child, STEP_TIMEOUT) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("ringfwd {args:?} did not exit within {STEP_TIMEOUT:?}");
    };
    Finished {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

/// A running `ringfwd run` child.
pub struct Relay {
    child: Child,
    /// `(rule name, bound address)` in the order the forwarder printed them.
    pub rules: Vec<(String, SocketAddr)>,
    /// The admin endpoint's bound address, when the forwarder printed `admin addr=…`.
    pub admin: Option<SocketAddr>,
    stderr: Arc<Mutex<Vec<u8>>>,
    status: Option<ExitStatus>,
    _config: Option<TempFile>,
}

impl Relay {
    /// Starts one rule `127.0.0.1:0 → upstream` with the engine flags and any extra flags
    /// (`["--idle-timeout", "1s"]`).
    ///
    /// # Panics
    /// The forwarder did not become ready.
    pub fn start(engine: &[&str], upstream: SocketAddr, extra: &[&str]) -> Self {
        Self::start_listen(engine, "127.0.0.1:0", upstream, extra)
    }

    /// Like [`Relay::start`] with an explicit listen address (e.g. `[::1]:0`).
    ///
    /// # Panics
    /// The forwarder did not become ready.
    pub fn start_listen(
        engine: &[&str],
        listen: &str,
        upstream: SocketAddr,
        extra: &[&str],
    ) -> Self {
        let upstream = upstream.to_string();
        let mut args = vec!["run", "--listen", listen, "--upstream", &upstream];
        args.extend_from_slice(engine);
        args.extend_from_slice(extra);
        Self::try_spawn(&args, 1).unwrap_or_else(|f| panic!("ringfwd {args:?} did not start: {f}"))
    }

    /// Starts `ringfwd run --config FILE` with `toml` as the file and the engine flags on top;
    /// waits for one readiness line per rule.
    ///
    /// # Panics
    /// The forwarder did not become ready.
    pub fn start_config(engine: &[&str], toml: &str, rules: usize) -> Self {
        let file = TempFile::new("ringfwd-test", toml);
        let path = file.path.display().to_string();
        let mut args = vec!["run", "--config", path.as_str()];
        args.extend_from_slice(engine);
        let mut relay = Self::try_spawn(&args, rules)
            .unwrap_or_else(|f| panic!("ringfwd {args:?} did not start: {f}\nconfig:\n{toml}"));
        relay._config = Some(file);
        relay
    }

    /// Spawns `ringfwd ARGS` and waits for `rules` readiness lines.
    ///
    /// When the flags name an engine (`--engine X`, `X` not `auto`), the readiness lines must
    /// report that engine: a silent fallback would make a suite test the wrong engine.
    ///
    /// # Errors
    /// The child exited before it was ready, or was not ready in time (it is then killed).
    pub fn try_spawn(args: &[&str], rules: usize) -> Result<Self, StartFailure> {
        let mut cmd = Command::new(BIN);
        cmd.args(args);
        Self::try_spawn_command(cmd, args, rules)
    }

    /// [`Relay::try_spawn`] with a command the caller prepared (a wrapper, inherited
    /// descriptors, environment); `args` are the `ringfwd` arguments it carries, for the
    /// engine check.
    ///
    /// # Errors
    /// See [`Relay::try_spawn`].
    pub fn try_spawn_command(
        mut cmd: Command,
        args: &[&str],
        rules: usize,
    ) -> Result<Self, StartFailure> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {BIN}: {e}"));
        let stderr = super::drain_into(child.stderr.take().expect("stderr is piped"));
        let lines = {
            let pipe = child.stdout.take().expect("stdout is piped");
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { return };
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            });
            rx
        };
        let mut relay = Self {
            child,
            rules: Vec::new(),
            admin: None,
            stderr,
            status: None,
            _config: None,
        };
        let expected_engine = args
            .windows(2)
            .find(|w| w[0] == "--engine")
            .map(|w| w[1])
            .filter(|e| *e != "auto");
        match relay.wait_ready(&lines, rules, expected_engine) {
            Ok(()) => Ok(relay),
            Err(status) => {
                if status.is_none() {
                    relay.kill();
                }
                // Let the stderr thread catch up with what the child wrote before exiting.
                super::eventually(Duration::from_secs(2), || !relay.stderr().is_empty());
                Err(StartFailure {
                    status,
                    stderr: relay.stderr(),
                })
            }
        }
    }

    fn wait_ready(
        &mut self,
        lines: &Receiver<String>,
        rules: usize,
        engine: Option<&str>,
    ) -> Result<(), Option<ExitStatus>> {
        let deadline = Instant::now() + READY_TIMEOUT;
        while self.rules.len() < rules {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(admin) = line.strip_prefix("admin addr=") {
                        self.admin = admin.parse().ok();
                        continue;
                    }
                    let Some(rest) = line.strip_prefix("listening ") else {
                        continue;
                    };
                    let field = |k: &str| {
                        rest.split(' ')
                            .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
                            .map(str::to_string)
                    };
                    let name = field("rule").unwrap_or_else(|| panic!("no rule= in {line:?}"));
                    let addr: SocketAddr = field("addr")
                        .and_then(|a| a.parse().ok())
                        .unwrap_or_else(|| panic!("no addr= in {line:?}"));
                    let actual = field("engine").unwrap_or_default();
                    if let Some(want) = engine {
                        assert_eq!(
                            actual, want,
                            "the forwarder runs another engine than asked: {line:?}"
                        );
                    }
                    self.rules.push((name, addr));
                }
                Err(RecvTimeoutError::Timeout) => return Err(None),
                Err(RecvTimeoutError::Disconnected) => {
                    // stdout closed: the child is exiting. Collect its status with a bound.
                    return Err(self.wait_exit(Duration::from_secs(5)));
                }
            }
        }
        Ok(())
    }

    /// The listen address of the first rule.
    pub fn addr(&self) -> SocketAddr {
        self.rules[0].1
    }

    /// The listen address of the rule named `name`.
    ///
    /// # Panics
    /// No such rule.
    pub fn addr_of(&self, name: &str) -> SocketAddr {
        self.rules
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no rule {name:?} in {:?}", self.rules))
            .1
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits in i32")
    }

    /// Sends SIGTERM (graceful stop: no new connections, live ones may finish).
    pub fn sigterm(&self) {
        kill(Pid::from_raw(self.pid()), Signal::SIGTERM).expect("SIGTERM the forwarder");
    }

    /// Waits up to `within` for the child to exit; its status, or `None` if still running.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        if self.status.is_none() {
            let child = &mut self.child;
            let mut status = None;
            super::eventually(within, || {
                status = child.try_wait().expect("waitpid on the forwarder");
                status.is_some()
            });
            self.status = status;
        }
        self.status
    }

    /// True while the child has not exited.
    pub fn is_running(&mut self) -> bool {
        self.wait_exit(Duration::ZERO).is_none()
    }

    /// SIGTERM, then wait for a clean exit; panics if it does not exit 0 in time.
    ///
    /// # Panics
    /// The child did not exit within [`STEP_TIMEOUT`] or exited with a failure.
    pub fn stop_and_wait(&mut self) {
        if self.is_running() {
            self.sigterm();
        }
        match self.wait_exit(STEP_TIMEOUT) {
            Some(s) if s.success() => {}
            Some(s) => panic!("the forwarder exited with {s}; stderr:\n{}", self.stderr()),
            None => panic!("the forwarder did not exit within {STEP_TIMEOUT:?} of SIGTERM"),
        }
    }

    fn kill(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    /// Everything the child wrote on stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(
            &self
                .stderr
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
        .into_owned()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let was_running = self.status.is_none();
        self.kill();
        if std::thread::panicking() {
            let text = self.stderr();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!(
                "--- ringfwd (pid {}, {}) stderr, last {} lines ---",
                self.child.id(),
                if was_running {
                    "killed by the test guard"
                } else {
                    "had exited"
                },
                tail.len()
            );
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}
