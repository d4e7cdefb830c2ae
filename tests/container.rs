//! The container image and the Kubernetes manifests, checked for real.
//!
//! - `scripts/container.sh build` builds the static `FROM scratch` image
//!   (`localhost/ringfwd:scratch`) with Debian's podman; the image then runs on this host's
//!   flags (`scripts/container.sh flags`: runc, ulimits within the hard limits, host
//!   network). Under the shipped seccomp profile the io_uring engine runs inside (its
//!   `listening` line, its log and `ringfwd_build_info`) and relays byte-exact to a backend
//!   named through the container's /etc/hosts (a static glibc's resolver); under Docker's
//!   default profile and under podman's own, `engine = "auto"` falls back to tokio with a
//!   warning that names seccomp.
//! - `scripts/container.sh k8s-validate` checks deploy/k8s/*.yaml against the schemas of
//!   every Kubernetes version DEPLOY.md names (`kubernetes-validate --strict`), and the
//!   DaemonSet's probes and grace period are checked against its config.
//!
//! Needs root and podman/runc (.ci/run installs them); fails rather than skips without them,
//! unless `RINGFWD_SKIP_ROOT=1` on a non-root runner.

mod support;

use std::io::{BufRead, BufReader};
use std::net::{Shutdown, SocketAddr};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use support::data::{hash_to_eof, send_payload};
use support::pool::{Member, http_get};
use support::{STEP_TIMEOUT, sock};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const IMAGE: &str = "localhost/ringfwd:scratch";
/// The static release build and the image: minutes on a busy box, a few seconds once the
/// build is cached in the target directory.
const BUILD_TIMEOUT: Duration = Duration::from_secs(1800);
/// How long a container may take to print its `listening` line.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

fn script(args: &[&str], within: Duration) -> Output {
    let mut child = Command::new("bash")
        .arg(format!("{ROOT}/scripts/container.sh"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run scripts/container.sh");
    let out = support::drain_into(child.stdout.take().expect("stdout"));
    let err = support::drain_into(child.stderr.take().expect("stderr"));
    let status = support::wait_child(&mut child, within);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let take = |b: &std::sync::Arc<std::sync::Mutex<Vec<u8>>>| {
        std::mem::take(&mut *b.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    };
    // Let the readers see the end of both pipes.
    std::thread::sleep(Duration::from_millis(100));
    let status = status.unwrap_or_else(|| {
        panic!(
            "scripts/container.sh {args:?} did not finish in {within:?}; stderr:\n{}",
            String::from_utf8_lossy(&take(&err))
        )
    });
    Output {
        status,
        stdout: take(&out),
        stderr: take(&err),
    }
}

/// A `podman run` of the image, removed (by its unique name) when dropped.
struct Container {
    name: String,
    child: Child,
    lines: Receiver<String>,
    stderr: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Container {
    /// Runs the image with this host's flags plus `extra` podman flags, and `args` for
    /// ringfwd; waits for its `listening` line. Returns it with the engine that line names
    /// and the admin and listen addresses.
    fn start(extra: &[&str], args: &[&str]) -> (Self, String, SocketAddr, SocketAddr) {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "ringfwd-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let flags = script(&["flags"], STEP_TIMEOUT);
        assert!(flags.status.success(), "container.sh flags failed");
        let flags = String::from_utf8(flags.stdout).expect("flags are text");
        let mut child = Command::new("podman")
            .args(["run", "--rm", "--name", &name])
            .args(flags.lines())
            .args(extra)
            .arg(IMAGE)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("podman run");
        let stderr = support::drain_into(child.stderr.take().expect("stderr"));
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let c = Self {
            name,
            child,
            lines,
            stderr,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        let (mut engine, mut admin, mut listen) = (None, None, None);
        while engine.is_none() || admin.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = c.lines.recv_timeout(left) else {
                panic!(
                    "the container printed no listening line within {READY_TIMEOUT:?}; stderr:\n{}",
                    c.stderr()
                );
            };
            if let Some(a) = line.strip_prefix("admin addr=") {
                admin = Some(a.trim().parse().expect("admin addr=IP:PORT"));
            } else if line.starts_with("listening ") {
                let field = |k: &str| {
                    line.split(' ')
                        .find_map(|kv| kv.strip_prefix(k))
                        .map(str::to_string)
                };
                engine = field("engine=");
                listen = field("addr=").and_then(|a| a.parse().ok());
            }
        }
        (
            c,
            engine.expect("engine"),
            admin.expect("admin"),
            listen.expect("addr= in the listening line"),
        )
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(
            &self
                .stderr
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
        .into_owned()
    }

    /// `podman stop` (SIGTERM: drain, exit 0), then waits for the `podman run` to end.
    fn stop(mut self) -> std::process::ExitStatus {
        let _ = Command::new("podman")
            .args(["stop", "-t", "10", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        support::wait_child(&mut self.child, STEP_TIMEOUT).expect("podman run ended")
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["rm", "-f", "-t", "0", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The ringfwd arguments of every run: one rule from an ephemeral port to `backend` by
/// a name only the container's /etc/hosts knows, the admin endpoint, `engine = "auto"`.
fn forwarder_args(backend: SocketAddr) -> Vec<String> {
    [
        "run",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &format!("ringfwd-backend.test:{}", backend.port()),
        "--engine",
        "auto",
        "--workers",
        "1",
        "--admin",
        "127.0.0.1:0",
    ]
    .map(str::to_string)
    .to_vec()
}

/// 1 MiB through the forwarder and back from the echo member, compared by hash.
fn relay_byte_exact(listen: SocketAddr) {
    let mut s = sock::connect(listen);
    let mut w = s.try_clone().expect("clone");
    let sender = std::thread::spawn(move || {
        let h = send_payload(&mut w, 18, 1 << 20);
        w.shutdown(Shutdown::Write).expect("half-close");
        h
    });
    let (n, got) = hash_to_eof(&mut s);
    let sent = sender.join().expect("sender");
    assert_eq!(n, 1 << 20, "bytes echoed through the container");
    assert_eq!(got, sent, "the echo through the container differs");
}

#[test]
fn scratch_image_runs_io_uring_with_the_shipped_profile_and_falls_back_under_the_defaults() {
    if !support::root_or_skip("the container test (podman as root)") {
        return;
    }
    let _alone = support::heavy();
    let built = script(&["build"], BUILD_TIMEOUT);
    assert!(
        built.status.success(),
        "scripts/container.sh build failed:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let exists = Command::new("podman")
        .args(["image", "exists", IMAGE])
        .status()
        .expect("podman image exists");
    assert!(exists.success(), "{IMAGE} is not in podman's store");

    let member = Member::echo();
    let args = forwarder_args(member.addr());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let add_host = "--add-host=ringfwd-backend.test:127.0.0.1";

    // The shipped profile: io_uring inside, byte-exact through it.
    let profile = format!("seccomp={ROOT}/deploy/docker/seccomp-io_uring.json");
    let (c, engine, admin, listen) =
        Container::start(&["--security-opt", &profile, add_host], &args);
    assert_eq!(engine, "uring", "stderr:\n{}", c.stderr());
    // The log line comes on stderr, which may lag the stdout line a little.
    assert!(
        support::eventually(STEP_TIMEOUT, || c.stderr().contains("engine=\"uring\"")),
        "log:\n{}",
        c.stderr()
    );
    let (status, metrics) = http_get(admin, "/metrics");
    assert_eq!(status, 200);
    let info = metrics
        .lines()
        .find(|l| l.starts_with("ringfwd_build_info{"))
        .unwrap_or_else(|| panic!("no ringfwd_build_info in /metrics:\n{metrics}"));
    assert!(info.contains("engine=\"uring\""), "{info}");
    relay_byte_exact(listen);
    assert!(
        member.served() >= 1,
        "the echo member saw no relayed session"
    );
    let warnings: Vec<String> = support::warnings(&c.stderr())
        .into_iter()
        .map(str::to_string)
        .collect();
    assert!(
        warnings.iter().all(|w| !w.contains("seccomp")),
        "{warnings:?}"
    );
    let status = c.stop();
    assert!(status.success(), "podman run after podman stop: {status}");

    // Docker's default profile (deploy/docker/seccomp-default.json), then podman's own
    // default (no --security-opt): `auto` runs tokio and says why, naming seccomp.
    let docker = format!("seccomp={ROOT}/deploy/docker/seccomp-default.json");
    for (what, extra) in [
        (
            "Docker's default profile",
            vec!["--security-opt", &docker, add_host],
        ),
        ("podman's default profile", vec![add_host]),
    ] {
        let (c, engine, _admin, listen) = Container::start(&extra, &args);
        assert_eq!(engine, "tokio", "{what}: stderr:\n{}", c.stderr());
        support::eventually(STEP_TIMEOUT, || c.stderr().contains("falling back"));
        let log = c.stderr();
        let warning = log
            .lines()
            .find(|l| l.contains("WARN") && l.contains("falling back"))
            .unwrap_or_else(|| panic!("{what}: no fallback warning:\n{log}"));
        assert!(warning.contains("seccomp"), "{what}: {warning}");
        relay_byte_exact(listen);
        assert!(c.stop().success(), "{what}: podman run after podman stop");
    }
}

/// Every manifest passes `kubernetes-validate --strict` for every version DEPLOY.md names;
/// a manifest with an unknown field does not (the check is strict for real).
#[test]
fn k8s_manifests_validate_against_every_named_version() {
    let out = script(&["k8s-validate"], Duration::from_secs(600));
    assert!(
        out.status.success(),
        "k8s-validate:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let text = std::fs::read_to_string(format!("{ROOT}/scripts/container.sh")).expect("script");
    let versions = text
        .lines()
        .find_map(|l| l.strip_prefix("k8s_versions=("))
        .and_then(|l| l.strip_suffix(')'))
        .expect("k8s_versions=(...) in container.sh");
    let versions: Vec<&str> = versions.split_whitespace().collect();
    for v in &versions {
        assert!(
            err.contains(&format!("Kubernetes {v}: 4 files valid")),
            "{err}"
        );
    }
    let minor = |v: &str| {
        v.rsplit_once('.')
            .map_or(v.to_string(), |(a, _)| a.to_string())
    };
    let (first, last) = (minor(versions[0]), minor(versions[versions.len() - 1]));
    let deploy = std::fs::read_to_string(format!("{ROOT}/docs/DEPLOY.md")).expect("DEPLOY.md");
    let named = format!("Kubernetes {first} to {last}");
    assert!(deploy.contains(&named), "DEPLOY.md does not name {named:?}");

    let bad = support::TempFile::new(
        "ringfwd-bad-manifest",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n  colour: red\ndata: {}\n",
    );
    let path = bad.path.display().to_string();
    let out = script(&["k8s-validate", &path], Duration::from_secs(120));
    assert!(
        !out.status.success(),
        "an unknown field passed --strict:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The DaemonSet: readiness and liveness on the draining-aware /healthz; its grace period
/// covers the edge config's shutdown_delay plus shutdown_grace, and liveness cannot fail the
/// pod (and restart it) before that drain is over.
#[test]
fn daemonset_probes_and_grace_cover_the_drain() {
    let yaml = |f: &str| -> serde_yaml::Value {
        let t = std::fs::read_to_string(format!("{ROOT}/deploy/k8s/{f}")).expect(f);
        serde_yaml::from_str(&t).expect("YAML")
    };
    let ds = yaml("daemonset.yaml");
    let cm = yaml("configmap.yaml");
    let edge: toml::Table = cm["data"]["ringfwd-edge.toml"]
        .as_str()
        .expect("ringfwd-edge.toml")
        .parse()
        .expect("edge config is TOML");
    let secs = |key: &str| -> u64 {
        let v = edge.get(key).and_then(|v| v.as_str()).unwrap_or("0s");
        v.strip_suffix('s')
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{key} = {v:?}: write it in whole seconds"))
    };
    let drain = secs("shutdown_delay") + secs("shutdown_grace");
    assert!(
        secs("shutdown_delay") > 0,
        "the edge config sets no shutdown_delay"
    );
    let spec = &ds["spec"]["template"]["spec"];
    let grace = spec["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        grace > drain,
        "grace {grace}s does not cover the drain ({drain}s)"
    );
    let c = &spec["containers"][0];
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["httpGet"]["path"], "/healthz", "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], 9100, "{probe}");
    }
    let l = &c["livenessProbe"];
    let to_fail =
        l["periodSeconds"].as_u64().unwrap_or(10) * l["failureThreshold"].as_u64().unwrap_or(3);
    assert!(
        to_fail > drain,
        "liveness fails after {to_fail}s of 503, before the {drain}s drain ends"
    );
}
