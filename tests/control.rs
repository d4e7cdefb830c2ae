//! The control plane under load, on every engine: a config reload (SIGHUP and `POST
//! /reload`), a binary upgrade with `run --takeover`, and a restart with socket activation
//! (`LISTEN_FDS`), each while a client opens connections in a tight loop and 20 bulk
//! transfers run through the forwarder. None of them may refuse or reset a connection on a
//! rule that stays, or break a transfer.
//!
//! [`engine_suite!`] lines at the bottom run every scenario once per engine.

mod support;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use support::data::{Stream, hash_to_eof};
use support::pool::http_get;
use support::relay::BIN;
use support::sock::Backend;
use support::{Relay, STEP_TIMEOUT, TempFile, eventually, heavy, wait_for_line};

/// Connections the client loop must complete over each scenario.
const LOOP_CONNECTIONS: u64 = 2000;
/// Bulk transfers running across the change.
const BULKS: usize = 20;
/// Each bulk transfer writes this much per step, then pauses, for [`BULK_STEPS`] steps: it
/// spans the reload or upgrade (about 2 s).
const BULK_STEP: usize = 32 << 10;
const BULK_STEPS: usize = 40;
const BULK_PAUSE: Duration = Duration::from_millis(50);

/// A client loop (connect, 16 bytes there and back, close) and bulk transfers against one
/// address, counting every way a connection can fail.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    /// Bulk transfers finished (whatever their outcome).
    bulks_done: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<JoinHandle<()>>,
}

fn bulk(addr: SocketAddr, seed: u64) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("bulk {seed}: connect: {e}"))?;
    s.set_read_timeout(Some(STEP_TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(STEP_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut r = s.try_clone().map_err(|e| e.to_string())?;
    let reader = std::thread::spawn(move || hash_to_eof(&mut r));
    let mut stream = Stream::new(seed, 16 << 10);
    for _ in 0..BULK_STEPS {
        let target = stream.accepted + BULK_STEP as u64;
        while stream.accepted < target {
            stream
                .write_once(&mut s)
                .map_err(|e| format!("bulk {seed}: write after {} bytes: {e}", stream.accepted))?;
        }
        std::thread::sleep(BULK_PAUSE);
    }
    let sent = stream.accepted;
    let want = stream.finish();
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("bulk {seed}: shutdown: {e}"))?;
    let (got, hash) = reader
        .join()
        .map_err(|_| format!("bulk {seed}: the reader panicked (a read error or timeout)"))?;
    if got != sent || hash != want {
        return Err(format!(
            "bulk {seed}: sent {sent} bytes, {got} came back{}",
            if got == sent {
                " with other content"
            } else {
                ""
            }
        ));
    }
    Ok(())
}

impl Load {
    fn start(addr: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        {
            let (stop, ok, refused, failures) =
                (stop.clone(), ok.clone(), refused.clone(), failures.clone());
            threads.push(std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Acquire) {
                    n += 1;
                    match support::sock::echo_exchange(addr, n) {
                        Ok(()) => {
                            ok.fetch_add(1, Ordering::AcqRel);
                        }
                        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                            refused.fetch_add(1, Ordering::AcqRel);
                        }
                        Err(e) => failures
                            .lock()
                            .unwrap()
                            .push(format!("connection {n}: {e}")),
                    }
                }
            }));
        }
        let bulks_done = Arc::new(AtomicU64::new(0));
        for i in 0..BULKS {
            let (failures, done) = (failures.clone(), bulks_done.clone());
            threads.push(std::thread::spawn(move || {
                if let Err(e) = bulk(addr, 1000 + i as u64) {
                    failures.lock().unwrap().push(e);
                }
                done.fetch_add(1, Ordering::AcqRel);
            }));
        }
        Self {
            stop,
            ok,
            bulks_done,
            refused,
            failures,
            threads,
        }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Acquire)
    }

    /// Marks the moment of the change: every bulk transfer must still be running then (so
    /// each one spans it). Returns the connections completed so far.
    fn mark_change(&self, what: &str) -> u64 {
        let done = self.bulks_done.load(Ordering::Acquire);
        let ok = self.ok();
        eprintln!(
            "{what}: {ok} connections completed and {} of {BULKS} bulk transfers running at the change",
            BULKS as u64 - done
        );
        assert_eq!(
            done, 0,
            "{what}: bulk transfers ended before the change: the test proves nothing"
        );
        ok
    }

    /// Waits until the loop completed `n` connections in all.
    fn wait_ok(&self, n: u64) {
        assert!(
            eventually(Duration::from_secs(60), || self.ok() >= n),
            "the client loop completed only {} connections (refused {}; failures {:?})",
            self.ok(),
            self.refused.load(Ordering::Acquire),
            self.failures.lock().unwrap()
        );
    }

    /// Stops the loop, waits for the bulk transfers, and asserts that nothing failed.
    fn finish(self, what: &str) -> u64 {
        self.stop.store(true, Ordering::Release);
        for t in self.threads {
            t.join().expect("a load thread panicked");
        }
        let ok = self.ok.load(Ordering::Acquire);
        let refused = self.refused.load(Ordering::Acquire);
        let failures = self.failures.lock().unwrap().clone();
        eprintln!(
            "{what}: {ok} connections completed, {refused} refused, {} failed; {BULKS} bulk transfers",
            failures.len()
        );
        assert_eq!(refused, 0, "{what}: connections refused");
        assert!(failures.is_empty(), "{what}: failures: {failures:#?}");
        ok
    }
}

fn echo_once(addr: SocketAddr) -> io::Result<()> {
    support::sock::echo_exchange(addr, 42)
}

fn refuses(addr: SocketAddr) -> bool {
    matches!(TcpStream::connect_timeout(&addr, Duration::from_secs(2)),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused)
}

/// A port free right now on loopback (for a rule added by a reload).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

fn rule(name: &str, listen: &str, upstream: SocketAddr) -> String {
    format!("[[rule]]\nname = \"{name}\"\nlisten = \"{listen}\"\nupstream = \"{upstream}\"\n")
}

fn post(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = support::sock::connect(addr);
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .expect("POST");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read the response");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("end of headers");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, body.to_string())
}

fn metric(admin: SocketAddr, series: &str) -> f64 {
    let (_, text) = http_get(admin, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
}

fn spawn(args: &[&str], rules: usize) -> Relay {
    Relay::try_spawn(args, rules).unwrap_or_else(|f| panic!("ringfwd {args:?}: {f}"))
}

fn with_engine<'a>(base: &[&'a str], engine: &[&'a str]) -> Vec<&'a str> {
    let mut v = base.to_vec();
    v.extend_from_slice(engine);
    v
}

/// A reload that adds a rule, removes one and changes the kept rule's pool, under load; then
/// two broken configs (SIGHUP and `POST /reload`) that change nothing and say why.
fn reload_under_load(engine: &[&str]) {
    let _g = heavy();
    let old_pool = Backend::echo();
    let new_pool = Backend::echo();
    let added_port = free_port();
    let head = "admin = \"127.0.0.1:0\"\nshutdown_grace = \"10s\"\n";
    let v1 = format!(
        "{head}{}{}",
        rule("kept", "127.0.0.1:0", old_pool.addr()),
        rule("gone", "127.0.0.1:0", old_pool.addr())
    );
    let file = TempFile::new("control-reload", &v1);
    let path = file.path.display().to_string();
    let mut relay = spawn(&with_engine(&["run", "--config", &path], engine), 2);
    let (kept, gone) = (relay.addr_of("kept"), relay.addr_of("gone"));
    let admin = relay.admin.expect("admin addr");
    // A connection of the rule that goes away: it must live on after the reload.
    let mut live_on_gone = support::sock::connect(gone);
    live_on_gone.write_all(b"before").unwrap();
    assert_eq!(support::sock::read_n(&mut live_on_gone, 6), b"before");

    let load = Load::start(kept);
    load.wait_ok(300);
    let before = new_pool.accepted();
    let added = format!("127.0.0.1:{added_port}");
    std::fs::write(
        &file.path,
        format!(
            "{head}{}{}",
            rule("kept", "127.0.0.1:0", new_pool.addr()),
            rule("added", &added, old_pool.addr())
        ),
    )
    .unwrap();
    kill(Pid::from_raw(relay.pid()), Signal::SIGHUP).unwrap();
    let line = wait_for_line(&relay, "config reloaded", STEP_TIMEOUT);
    let reloaded_at = load.mark_change("reload");
    assert!(
        line.contains("added added")
            && line.contains("removed gone")
            && line.contains("changed kept"),
        "{line}"
    );
    // The added rule serves; the removed one's port refuses new connections, while its live
    // connection carries on.
    echo_once(added.parse().unwrap()).expect("the added rule serves");
    assert!(
        eventually(STEP_TIMEOUT, || refuses(gone)),
        "the removed rule's port still accepts"
    );
    live_on_gone.write_all(b"after!").unwrap();
    assert_eq!(support::sock::read_n(&mut live_on_gone, 6), b"after!");
    drop(live_on_gone);
    load.wait_ok(reloaded_at + 300);
    load.wait_ok(LOOP_CONNECTIONS);
    // The changed pool takes the new connections.
    assert!(
        new_pool.accepted() > before + 100,
        "the kept rule's new pool got {} connections",
        new_pool.accepted() - before
    );
    let ok = load.finish("reload");
    assert_eq!(
        metric(admin, "ringfwd_config_reloads_total{result=\"success\"}"),
        1.0
    );
    // Counters of the kept rule continue across the reload (one series, all connections).
    let accepted = metric(
        admin,
        "ringfwd_connections_accepted_total{rule=\"kept\",route=\"default\"}",
    );
    assert!(accepted >= (ok + BULKS as u64) as f64, "{accepted} < {ok}");

    // Broken configs: nothing changes, and both ways say why.
    std::fs::write(
        &file.path,
        format!("{head}[[rule]]\nname = \"kept\"\nlisten = "),
    )
    .unwrap();
    kill(Pid::from_raw(relay.pid()), Signal::SIGHUP).unwrap();
    let line = wait_for_line(&relay, "config reload failed", STEP_TIMEOUT);
    assert!(line.contains("still running the previous config"), "{line}");
    std::fs::write(
        &file.path,
        format!(
            "{head}{}",
            rule("kept", "127.0.0.1:0", "127.0.0.1:1".parse().unwrap())
        ) + "max_connections = 0\n",
    )
    .unwrap();
    let (status, body) = post(admin, "/reload");
    assert_eq!(status, 422, "{body}");
    assert!(
        body.contains("reload failed") && body.contains("max_connections"),
        "{body}"
    );
    echo_once(kept).expect("the kept rule still serves");
    echo_once(added.parse().unwrap()).expect("the added rule still serves");
    assert_eq!(
        metric(admin, "ringfwd_config_reloads_total{result=\"failure\"}"),
        2.0
    );
    relay.stop_and_wait();
}

/// `run --takeover`: the new process takes the sockets over the control socket while the
/// load runs; the old one drains its live transfers and exits.
fn takeover_under_load(engine: &[&str]) {
    let _g = heavy();
    let pool = Backend::echo();
    let control = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "ctl-{}-{}.sock",
        std::process::id(),
        engine.join("")
    ));
    let config = format!(
        "admin = \"127.0.0.1:0\"\ncontrol_socket = \"{}\"\nshutdown_grace = \"10s\"\n{}",
        control.display(),
        rule("kept", "127.0.0.1:0", pool.addr())
    );
    let file = TempFile::new("control-takeover", &config);
    let path = file.path.display().to_string();
    let mut old = spawn(&with_engine(&["run", "--config", &path], engine), 1);
    let addr = old.addr();
    let load = Load::start(addr);
    load.wait_ok(300);
    let ctl = control.display().to_string();
    let mut new = spawn(
        &with_engine(&["run", "--config", &path, "--takeover", &ctl], engine),
        1,
    );
    assert_eq!(new.addr(), addr, "the new process serves another port");
    assert_eq!(
        new.admin, old.admin,
        "the admin listener moves with the rules' sockets"
    );
    let switched_at = load.mark_change("takeover");
    // The old process drains (the bulk transfers it carries end) and exits by itself.
    let status = old.wait_exit(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "the old process did not exit cleanly after the takeover: {status:?}\n{}",
        old.stderr()
    );
    assert!(
        old.stderr().contains("draining and exiting"),
        "{}",
        old.stderr()
    );
    load.wait_ok(switched_at + 300);
    load.wait_ok(LOOP_CONNECTIONS);
    load.finish("takeover");
    // A garbage peer on the control socket gets an error and changes nothing.
    {
        use socket2::{Domain, SockAddr, Socket, Type};
        let peer = Socket::new(Domain::UNIX, Type::SEQPACKET, None).unwrap();
        peer.connect(&SockAddr::unix(&control).unwrap())
            .expect("the new process listens on the control socket");
        peer.send(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        peer.set_read_timeout(Some(STEP_TIMEOUT)).unwrap();
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 256];
        let n = peer.recv(&mut buf).expect("an answer");
        // SAFETY: `recv` initialised the first `n` bytes.
        let answer: Vec<u8> = buf[..n]
            .iter()
            .map(|b| unsafe { b.assume_init() })
            .collect();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("ERR expected"), "{answer}");
    }
    echo_once(addr).expect("still serving after a garbage control peer");
    new.stop_and_wait();
}

/// Starts `ringfwd ARGS` the way systemd does: `listener` as fd 3, `LISTEN_FDS=1`, and
/// `LISTEN_PID` the child's own pid (a shell sets it to `$$`, then execs the forwarder).
fn spawn_activated(listener: &TcpListener, args: &[&str], listen_pid: Option<&str>) -> Relay {
    use std::os::unix::process::CommandExt;
    let fd = listener.as_raw_fd();
    let pid = listen_pid.map_or("$$".to_string(), str::to_string);
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!("LISTEN_PID={pid} LISTEN_FDS=1 exec \"$0\" \"$@\""))
        .arg(BIN)
        .args(args);
    // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if fd == 3 {
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Relay::try_spawn_command(cmd, args, 1).unwrap_or_else(|f| panic!("ringfwd {args:?}: {f}"))
}

/// Starts `ringfwd ARGS` with `sockets` passed as systemd does with `FileDescriptorName=`:
/// fds 3.. in order, `LISTEN_FDS`, `LISTEN_FDNAMES` (colon-separated) and `LISTEN_PID`.
fn spawn_activated_named(sockets: &[(&TcpListener, &str)], args: &[&str], rules: usize) -> Relay {
    use std::os::unix::process::CommandExt;
    let fds: Vec<i32> = sockets.iter().map(|(l, _)| l.as_raw_fd()).collect();
    let names: Vec<&str> = sockets.iter().map(|(_, n)| *n).collect();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "LISTEN_PID=$$ LISTEN_FDS={} LISTEN_FDNAMES={} exec \"$0\" \"$@\"",
            fds.len(),
            names.join(":")
        ))
        .arg(BIN)
        .args(args);
    // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // First out of the way (fds 3.. may be taken by the sources themselves), then
            // into place, close-on-exec off.
            let mut high = Vec::with_capacity(fds.len());
            for &fd in &fds {
                let h = libc::fcntl(fd, libc::F_DUPFD, 100);
                if h < 0 {
                    return Err(io::Error::last_os_error());
                }
                high.push(h);
            }
            for (i, h) in high.into_iter().enumerate() {
                let target = 3 + i32::try_from(i).expect("few sockets");
                if libc::dup2(h, target) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Relay::try_spawn_command(cmd, args, rules).unwrap_or_else(|f| panic!("ringfwd {args:?}: {f}"))
}

/// `LISTEN_FDNAMES`: a socket named after a rule is that rule's whatever its address (here
/// both rules are written on port 0, so by address neither would get one, and the names
/// cross the order of the sockets); a socket named otherwise (systemd's default is the unit's
/// name) is matched by address as before.
fn socket_activation_names_say_which_socket_is_which_rule(engine: &[&str]) {
    let _g = support::light();
    let (a, b, c) = (Backend::echo(), Backend::echo(), Backend::echo());
    let s1 = TcpListener::bind("127.0.0.1:0").unwrap();
    let s2 = TcpListener::bind("127.0.0.1:0").unwrap();
    let s3 = TcpListener::bind("127.0.0.1:0").unwrap();
    let (x, y, z) = (
        s1.local_addr().unwrap(),
        s2.local_addr().unwrap(),
        s3.local_addr().unwrap(),
    );
    let config = format!(
        "{}{}{}",
        rule("alpha", "127.0.0.1:0", a.addr()),
        rule("beta", "127.0.0.1:0", b.addr()),
        rule("gamma", &z.to_string(), c.addr()),
    );
    let file = TempFile::new("control-fdnames", &config);
    let path = file.path.display().to_string();
    let args = with_engine(&["run", "--config", &path], engine);
    let mut relay = spawn_activated_named(
        &[(&s1, "beta"), (&s2, "alpha"), (&s3, "ringfwd.socket")],
        &args,
        3,
    );
    assert_eq!(relay.addr_of("alpha"), y);
    assert_eq!(relay.addr_of("beta"), x);
    assert_eq!(relay.addr_of("gamma"), z);
    for (addr, backend) in [(y, &a), (x, &b), (z, &c)] {
        let before = backend.accepted();
        echo_once(addr).expect("served on the named socket");
        assert_eq!(
            backend.accepted(),
            before + 1,
            "{addr} reached another rule's upstream"
        );
    }
    relay.stop_and_wait();
}

/// Socket activation: systemd (here, the test) holds the listening socket; a restart stops
/// the old process and starts a new one on the same socket. Connections that arrive in
/// between wait in its queue: none is refused or reset.
fn socket_activation_restart_under_load(engine: &[&str]) {
    let _g = heavy();
    let pool = Backend::echo();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let config = format!(
        "shutdown_grace = \"10s\"\n{}",
        rule("kept", &addr.to_string(), pool.addr())
    );
    let file = TempFile::new("control-activation", &config);
    let path = file.path.display().to_string();
    let args = with_engine(&["run", "--config", &path], engine);
    let mut old = spawn_activated(&listener, &args, None);
    assert_eq!(old.addr(), addr);
    assert!(
        old.stderr().contains("passed by systemd"),
        "{}",
        old.stderr()
    );
    let load = Load::start(addr);
    load.wait_ok(300);
    // `systemctl restart`: stop (the old one drains its transfers), then start.
    load.mark_change("socket activation restart");
    old.sigterm();
    let status = old.wait_exit(Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        old.stderr()
    );
    let stopped_at = load.ok();
    let mut new = spawn_activated(&listener, &args, None);
    load.wait_ok(stopped_at + 300);
    load.wait_ok(LOOP_CONNECTIONS);
    load.finish("socket activation restart");
    new.stop_and_wait();
}

/// A `LISTEN_PID` that is not the forwarder's: the passed socket is left alone, the rule is
/// bound as usual, and the warning says why.
#[test]
fn wrong_listen_pid_is_ignored_with_a_warning() {
    let _g = support::light();
    let pool = Backend::echo();
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let args = [
        "run",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &pool.addr().to_string(),
        "--engine",
        "std",
    ]
    .map(String::from);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut relay = spawn_activated(&held, &args, Some("1"));
    assert_ne!(relay.addr(), held.local_addr().unwrap());
    echo_once(relay.addr()).expect("serves on its own socket");
    assert!(
        relay
            .stderr()
            .contains("LISTEN_PID=\"1\" is not this process"),
        "{}",
        relay.stderr()
    );
    relay.stop_and_wait();
}

/// `watch_config`: a ConfigMap-style symlink swap reloads the config.
#[test]
fn watch_config_follows_a_symlink_swap() {
    let _g = support::light();
    let pool = Backend::echo();
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("watch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("v1")).unwrap();
    std::fs::create_dir_all(dir.join("v2")).unwrap();
    let added_port = free_port();
    let base = format!(
        "watch_config = true\n{}",
        rule("kept", "127.0.0.1:0", pool.addr())
    );
    std::fs::write(dir.join("v1/ringfwd.toml"), &base).unwrap();
    std::fs::write(
        dir.join("v2/ringfwd.toml"),
        format!(
            "{base}{}",
            rule("added", &format!("127.0.0.1:{added_port}"), pool.addr())
        ),
    )
    .unwrap();
    std::os::unix::fs::symlink("v1", dir.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/ringfwd.toml", dir.join("ringfwd.toml")).unwrap();
    let path = dir.join("ringfwd.toml").display().to_string();
    let mut relay = spawn(&["run", "--config", &path, "--engine", "std"], 1);
    std::os::unix::fs::symlink("v2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    let line = wait_for_line(&relay, "config reloaded", STEP_TIMEOUT);
    assert!(
        line.contains("watch_config") && line.contains("added added"),
        "{line}"
    );
    echo_once(format!("127.0.0.1:{added_port}").parse().unwrap()).expect("the added rule serves");
    relay.stop_and_wait();
    let _ = std::fs::remove_dir_all(&dir);
}

support::engine_suite!(
    [
        reload_under_load,
        takeover_under_load,
        socket_activation_restart_under_load,
        socket_activation_names_say_which_socket_is_which_rule,
    ],
    std_engine: ["--engine", "std"],
    tokio_engine: ["--engine", "tokio"],
    uring: ["--engine", "uring"],
);
