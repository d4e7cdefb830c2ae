//! Deployment: the privilege drop of `run` (as root), and the files under `deploy/` that a
//! host, a package, a container runtime or Kubernetes consumes.
//!
//! The privilege tests need root (CI runs as root). Run as anyone else they fail loudly,
//! unless `RINGFWD_SKIP_ROOT=1` says this host is known not to be root.
//!
//! The `deploy/` checks are static: what can be checked without systemd as PID 1, a Docker
//! engine or a cluster (those run in `.ci/run` where a tool exists: `systemd-analyze verify`,
//! `dpkg -c`). Loopback only.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use serde_json::Value as Json;
use support::relay::{Relay, StartFailure};
use support::sock::{Backend, connect};
use support::{TempFile, engine_available, euid, nobody, root_or_skip};

/// The engines the privilege drop must work under: it happens in the one place every engine
/// passes through (the readiness callback), but threads differ per engine.
const ENGINES: [&[&str]; 3] = [
    &["--engine", "uring"],
    &["--engine", "tokio"],
    &["--engine", "std"],
];

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

/// Starts `ringfwd run` with `top` (top-level keys) and one rule on a free port in 900..=999
/// of 127.0.0.1, forwarding to `upstream`. Tries ports from a per-process offset, a bounded
/// number of times, moving on when a port is taken.
fn start_low_port(engine: &[&str], top: &str, upstream: SocketAddr) -> (Relay, TempFile, u16) {
    let start = 900 + (std::process::id() % 100) as u16;
    let mut last = String::new();
    for i in 0..40u16 {
        let port = 900 + (start - 900 + i * 7) % 100;
        // Cheap pre-check; the forwarder's own bind decides.
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        let toml = format!(
            "{top}\n[[rule]]\nname = \"low\"\nlisten = \"127.0.0.1:{port}\"\nupstream = \"{upstream}\"\n"
        );
        let file = TempFile::new("ringfwd-deploy", &toml);
        let path = file.path.display().to_string();
        let mut args = vec!["run", "--config", path.as_str()];
        args.extend_from_slice(engine);
        match Relay::try_spawn(&args, 1) {
            Ok(relay) => return (relay, file, port),
            Err(StartFailure { stderr, .. }) if stderr.contains("in use") => last = stderr,
            Err(f) => panic!("ringfwd {args:?} did not start: {f}\nconfig:\n{toml}"),
        }
    }
    panic!("no free port in 127.0.0.1:900..=999 after 40 tries; last failure:\n{last}");
}

/// One thread's credentials, parsed here independently of `ringfwd::privdrop`.
#[derive(Debug)]
struct Thread {
    tid: String,
    name: String,
    uid: Vec<u32>,
    gid: Vec<u32>,
    cap_eff: u64,
    cap_prm: u64,
}

fn threads(pid: i32) -> Vec<Thread> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc/PID/task") {
        let t = t.unwrap();
        let Ok(status) = std::fs::read_to_string(t.path().join("status")) else {
            continue; // exited since the listing
        };
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{k}:")))
                .unwrap_or_else(|| panic!("no {k} in {status}"))
                .trim()
                .to_string()
        };
        let ids = |k: &str| -> Vec<u32> {
            field(k)
                .split_whitespace()
                .map(|v| v.parse().unwrap())
                .collect()
        };
        out.push(Thread {
            tid: t.file_name().to_string_lossy().into_owned(),
            name: field("Name"),
            uid: ids("Uid"),
            gid: ids("Gid"),
            cap_eff: u64::from_str_radix(&field("CapEff"), 16).unwrap(),
            cap_prm: u64::from_str_radix(&field("CapPrm"), 16).unwrap(),
        });
    }
    out
}

fn assert_every_thread_is(pid: i32, uid: u32, gid: u32, engine: &[&str], when: &str) {
    let ts = threads(pid);
    assert!(!ts.is_empty(), "no threads listed for {pid}");
    for t in &ts {
        assert!(
            t.uid == [uid; 4] && t.gid == [gid; 4] && t.cap_eff == 0 && t.cap_prm == 0,
            "{engine:?} {when}: thread {} ({}) has uid {:?} gid {:?} CapEff {:x} CapPrm {:x}, expected uid/gid {uid}/{gid} and no capabilities; all threads: {ts:#?}",
            t.tid,
            t.name,
            t.uid,
            t.gid,
            t.cap_eff,
            t.cap_prm
        );
    }
}

fn echo_through(addr: SocketAddr, payload: &[u8]) -> std::net::TcpStream {
    let mut c = connect(addr);
    c.write_all(payload).unwrap();
    let mut back = vec![0u8; payload.len()];
    c.read_exact(&mut back).unwrap();
    assert_eq!(back, payload, "the echo came back different");
    c
}

#[test]
fn root_binds_a_port_below_1024_then_every_thread_runs_as_the_user() {
    if !root_or_skip("privilege-drop") {
        return;
    }
    let _g = support::light();
    let (uid, gid) = nobody();
    let backend = Backend::echo();
    for engine in ENGINES {
        if !engine_available(engine) {
            continue;
        }
        let (mut relay, _file, port) = start_low_port(
            engine,
            "user = \"nobody\"\nadmin = \"127.0.0.1:0\"",
            backend.addr(),
        );
        assert!(port < 1024);
        assert_eq!(relay.addr().port(), port);
        // Serves, and while a connection is live (the std engine's per-connection threads
        // exist only then) every thread is nobody with no capability.
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let live = echo_through(relay.addr(), &payload);
        assert_every_thread_is(relay.pid(), uid, gid, engine, "with a live connection");
        drop(live);
        // A connection accepted after the drop works as well.
        drop(echo_through(relay.addr(), b"after the drop"));
        assert_every_thread_is(relay.pid(), uid, gid, engine, "after traffic");
        let stderr = relay.stderr();
        assert!(
            stderr.contains("dropped root privileges") && stderr.contains("user=nobody"),
            "{engine:?}: no drop logged:\n{stderr}"
        );
        assert!(
            !stderr.contains("running as root"),
            "{engine:?}: warned about root although user is set:\n{stderr}"
        );
        // The admin endpoint bound as root still answers after the drop.
        let admin = relay.admin.expect("admin addr line");
        let mut s = connect(admin);
        s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").unwrap();
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        assert!(
            resp.starts_with("HTTP/1.") && resp.contains(" 200"),
            "{resp}"
        );
        relay.stop_and_wait();
    }
}

#[test]
fn root_without_user_warns_exactly_once() {
    let _g = support::light();
    let backend = Backend::echo();
    let upstream = backend.addr().to_string();
    let mut relay = Relay::try_spawn(
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &upstream,
            "--engine",
            "tokio",
        ],
        1,
    )
    .unwrap_or_else(|f| panic!("did not start: {f}"));
    drop(echo_through(relay.addr(), b"hello"));
    relay.stop_and_wait();
    let warnings = relay
        .stderr()
        .matches("running as root; set user = ")
        .count();
    let expected = usize::from(euid() == 0);
    assert_eq!(
        warnings,
        expected,
        "uid {}: expected {expected} root warning(s):\n{}",
        euid(),
        relay.stderr()
    );
}

#[test]
fn an_unknown_user_is_a_config_error_at_its_key() {
    let file = TempFile::new(
        "ringfwd-deploy",
        "user = \"ringfwd-no-such-user\"\n[[rule]]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n",
    );
    let path = file.path.display().to_string();
    for cmd in ["check", "run"] {
        let f = support::relay::run_to_exit(&[cmd, "--config", &path]);
        assert_eq!(f.status.code(), Some(1), "{cmd}: {f:?}");
        assert!(
            f.stderr.contains(&format!(
                "{path}:1:8: user: unknown user \"ringfwd-no-such-user\""
            )),
            "{cmd}: {}",
            f.stderr
        );
    }
}

#[test]
fn a_user_other_than_self_needs_root() {
    let file = TempFile::new(
        "ringfwd-deploy",
        "user = \"daemon\"\n[[rule]]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n",
    );
    let mut cmd = std::process::Command::new(support::relay::BIN);
    cmd.args(["run", "--config", &file.path.display().to_string()]);
    if euid() == 0 {
        // As root, switching is the supported case (above): refuse from nobody instead.
        let (uid, gid) = nobody();
        cmd.uid(uid).gid(gid);
    }
    let out = cmd.output().expect("spawn ringfwd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("cannot read config") {
        // The scratch directory is not readable by nobody on this host.
        eprintln!("note: skipped, nobody cannot read the scratch directory: {stderr}");
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("user = \"daemon\": switching to uid") && stderr.contains("needs root"),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------
// deploy/docker: seccomp profiles
// ---------------------------------------------------------------------------------------

const IO_URING: [&str; 3] = ["io_uring_enter", "io_uring_register", "io_uring_setup"];

fn json(path: &str) -> Json {
    serde_json::from_str(&read(path)).unwrap_or_else(|e| panic!("{path} is not valid JSON: {e}"))
}

fn names(entry: &Json) -> BTreeSet<String> {
    entry["names"]
        .as_array()
        .expect("names")
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn seccomp_profile_is_the_default_plus_exactly_the_io_uring_calls() {
    let default = json("deploy/docker/seccomp-default.json");
    let uring = json("deploy/docker/seccomp-io_uring.json");
    // Every top-level key other than the syscall list is the default's.
    for (k, v) in default.as_object().unwrap() {
        if k != "syscalls" {
            assert_eq!(
                &uring[k], v,
                "top-level {k} differs from the default profile"
            );
        }
    }
    assert_eq!(
        default.as_object().unwrap().len(),
        uring.as_object().unwrap().len()
    );
    assert_eq!(default["defaultAction"], "SCMP_ACT_ERRNO");
    let d = default["syscalls"].as_array().unwrap();
    let u = uring["syscalls"].as_array().unwrap();
    assert_eq!(d.len(), u.len(), "the rule entries differ in number");
    let mut added = BTreeSet::new();
    for (i, (de, ue)) in d.iter().zip(u).enumerate() {
        // Same rule apart from its names.
        let strip = |e: &Json| {
            let mut e = e.clone();
            e.as_object_mut().unwrap().remove("names");
            e
        };
        assert_eq!(strip(de), strip(ue), "rule {i} differs beyond its names");
        let (dn, un) = (names(de), names(ue));
        assert!(
            dn.is_subset(&un),
            "rule {i} lost {:?}",
            dn.difference(&un).collect::<Vec<_>>()
        );
        let extra: Vec<String> = un.difference(&dn).cloned().collect();
        if !extra.is_empty() {
            // Added only to an unconditional allow rule.
            assert_eq!(ue["action"], "SCMP_ACT_ALLOW", "rule {i}");
            for k in ["args", "includes", "excludes"] {
                let empty = match ue.get(k) {
                    None | Some(Json::Null) => true,
                    Some(Json::Array(a)) => a.is_empty(),
                    Some(Json::Object(o)) => o.is_empty(),
                    Some(_) => false,
                };
                assert!(empty, "rule {i} with io_uring has conditions in {k}");
            }
        }
        added.extend(extra);
    }
    assert_eq!(
        added,
        IO_URING
            .iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<_>>()
    );
    // And the default (Docker 25+) really denies them: no rule mentions them at all.
    for e in d {
        for n in IO_URING {
            assert!(!names(e).contains(n), "the default profile already has {n}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// deploy/k8s
// ---------------------------------------------------------------------------------------

type Yaml = serde_yaml::Value;

fn yaml_docs() -> Vec<(String, Yaml)> {
    let dir = repo("deploy/k8s");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        for d in serde_yaml::Deserializer::from_str(&text) {
            let v = <Yaml as serde::Deserialize>::deserialize(d)
                .unwrap_or_else(|e| panic!("{name} is not valid YAML: {e}"));
            if !v.is_null() {
                docs.push((name.clone(), v));
            }
        }
    }
    docs
}

fn s<'a>(v: &'a Yaml, path: &[&str]) -> &'a Yaml {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur
}

fn str_at<'a>(v: &'a Yaml, path: &[&str]) -> &'a str {
    s(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("{} is not a string in {v:?}", path.join(".")))
}

/// The admin port of a config text: `admin = "IP:PORT"`.
fn admin_port(toml_text: &str) -> u16 {
    let v: toml::Value = toml::from_str(toml_text).expect("config TOML");
    let addr: SocketAddr = v["admin"].as_str().expect("admin").parse().unwrap();
    addr.port()
}

#[test]
fn kubernetes_manifests_parse_and_carry_the_key_fields() {
    let docs = yaml_docs();
    let kinds: BTreeMap<String, &Yaml> = docs
        .iter()
        .map(|(_, d)| (str_at(d, &["kind"]).to_string(), d))
        .collect();
    for k in ["ConfigMap", "DaemonSet", "Deployment", "Service"] {
        assert!(kinds.contains_key(k), "no {k} in deploy/k8s");
    }
    for (file, d) in &docs {
        assert!(d["apiVersion"].as_str().is_some(), "{file}: no apiVersion");
        assert!(
            str_at(d, &["metadata", "labels", "app.kubernetes.io/name"]).starts_with("ringfwd"),
            "{file}"
        );
    }
    let configmap = kinds["ConfigMap"];
    let data = s(configmap, &["data"]);
    for kind in ["DaemonSet", "Deployment"] {
        let w = kinds[kind];
        let pod = s(w, &["spec", "template"]);
        let spec = &pod["spec"];
        assert_eq!(
            str_at(spec, &["securityContext", "seccompProfile", "type"]),
            "Localhost",
            "{kind}"
        );
        assert_eq!(
            str_at(
                spec,
                &["securityContext", "seccompProfile", "localhostProfile"]
            ),
            "ringfwd/seccomp-io_uring.json",
            "{kind}"
        );
        let ann = s(pod, &["metadata", "annotations"]);
        assert_eq!(ann["prometheus.io/scrape"].as_str(), Some("true"), "{kind}");
        assert_eq!(
            ann["prometheus.io/path"].as_str(),
            Some("/metrics"),
            "{kind}"
        );
        let scrape_port: u16 = ann["prometheus.io/port"].as_str().unwrap().parse().unwrap();
        // The config file the pod mounts, and its admin port.
        let items = s(spec, &["volumes"])[0]["configMap"]["items"][0].clone();
        let key = items["key"].as_str().unwrap();
        let config = data[key]
            .as_str()
            .unwrap_or_else(|| panic!("{kind} mounts ConfigMap key {key}, which is missing"));
        let admin = admin_port(config);
        assert_eq!(scrape_port, admin, "{kind}: scrape port vs admin");
        let c = &spec["containers"][0];
        let ports = c["ports"].as_sequence().unwrap();
        let port_of = |p: &Yaml| -> u16 {
            match p {
                Yaml::Number(n) => u16::try_from(n.as_u64().unwrap()).unwrap(),
                Yaml::String(name) => ports
                    .iter()
                    .find(|q| q["name"].as_str() == Some(name))
                    .and_then(|q| q["containerPort"].as_u64())
                    .map(|n| u16::try_from(n).unwrap())
                    .unwrap_or_else(|| panic!("{kind}: no port named {name}")),
                other => panic!("{kind}: port {other:?}"),
            }
        };
        for probe in ["readinessProbe", "livenessProbe"] {
            assert_eq!(
                str_at(c, &[probe, "httpGet", "path"]),
                "/healthz",
                "{kind} {probe}"
            );
            assert_eq!(
                port_of(s(c, &[probe, "httpGet", "port"])),
                admin,
                "{kind} {probe}"
            );
        }
        let args: Vec<&str> = c["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(
            args,
            ["run", "--config", &format!("/etc/ringfwd/{key}")],
            "{kind}"
        );
        assert_eq!(
            c["securityContext"]["allowPrivilegeEscalation"].as_bool(),
            Some(false),
            "{kind}"
        );
    }
    let ds = s(kinds["DaemonSet"], &["spec", "template", "spec"]);
    assert_eq!(ds["hostNetwork"].as_bool(), Some(true));
    assert_eq!(ds["dnsPolicy"].as_str(), Some("ClusterFirstWithHostNet"));
    let dep = s(kinds["Deployment"], &["spec", "template", "spec"]);
    assert_eq!(dep["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    // The Service selects the Deployment's pods.
    assert_eq!(
        s(kinds["Service"], &["spec", "selector"]),
        s(kinds["Deployment"], &["spec", "selector", "matchLabels"])
    );
}

#[test]
fn configmap_configs_are_valid_ringfwd_configs() {
    let docs = yaml_docs();
    let (_, cm) = docs
        .iter()
        .find(|(_, d)| d["kind"].as_str() == Some("ConfigMap"))
        .unwrap();
    let data = cm["data"].as_mapping().unwrap();
    assert!(!data.is_empty());
    for (key, text) in data {
        let key = key.as_str().unwrap();
        let text = text.as_str().unwrap();
        // Cluster host names do not resolve here, and the image's user is not on this host:
        // keep every key but point host names at 127.0.0.1 and the user at nobody.
        let mut local = String::new();
        let mut hosts = BTreeMap::new();
        // The Secret's token file is not on this host either: a local one, as the pods see it
        // (group-readable, fsGroup).
        let token = std::env::temp_dir().join(format!("ringfwd-k8s-token-{}", std::process::id()));
        std::fs::write(&token, "t0ken\n").unwrap();
        std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o440))
            .unwrap();
        let mut has_token = false;
        for line in text.lines() {
            let line = if line.trim_start().starts_with("user = ") {
                "user = \"nobody\"".to_string()
            } else if let Some(path) = line.trim_start().strip_prefix("admin_token_file = ") {
                assert_eq!(
                    path, "\"/etc/ringfwd-admin/token\"",
                    "{key}: where the pods mount it"
                );
                has_token = true;
                format!("admin_token_file = {:?}", token.display().to_string())
            } else {
                replace_hosts(line, &mut hosts)
            };
            local.push_str(&line);
            local.push('\n');
        }
        let cfg = ringfwd::config::Config::parse(key, &local)
            .unwrap_or_else(|e| panic!("ConfigMap key {key}: {e}\n{local}"));
        cfg.ensure_runnable().unwrap();
        assert!(
            cfg.admin.is_some(),
            "{key}: the probes need the admin endpoint"
        );
        assert!(
            has_token,
            "{key}: a remote admin endpoint needs admin_token_file"
        );
        let _ = std::fs::remove_file(&token);
    }
    // Both workloads mount the token Secret where the configs read it, group-readable for
    // the pod's fsGroup (the image's ringfwd group).
    for kind in ["Deployment", "DaemonSet"] {
        let (_, doc) = docs
            .iter()
            .find(|(_, d)| d["kind"].as_str() == Some(kind))
            .unwrap();
        let spec = &doc["spec"]["template"]["spec"];
        assert_eq!(
            spec["securityContext"]["fsGroup"].as_u64(),
            Some(10001),
            "{kind}"
        );
        let vol = spec["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["secret"]["secretName"].as_str() == Some("ringfwd-admin"))
            .unwrap_or_else(|| panic!("{kind}: no ringfwd-admin Secret volume"));
        assert_eq!(vol["secret"]["defaultMode"].as_u64(), Some(0o440), "{kind}");
        let mounted = spec["containers"][0]["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|m| {
                m["name"] == vol["name"] && m["mountPath"].as_str() == Some("/etc/ringfwd-admin")
            });
        assert!(
            mounted,
            "{kind}: the Secret is not mounted at /etc/ringfwd-admin"
        );
    }
}

/// `"name.example.internal:8443"` → `"127.0.0.N:8443"` for every quoted HOST:PORT whose host
/// is a DNS name, one loopback address per distinct name (pools refuse duplicates).
fn replace_hosts(line: &str, hosts: &mut BTreeMap<String, usize>) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(start) = rest.find('"') {
        let Some(len) = rest[start + 1..].find('"') else {
            break;
        };
        let inner = &rest[start + 1..start + 1 + len];
        out.push_str(&rest[..=start]);
        match inner.rsplit_once(':') {
            Some((host, port))
                if host.contains('.')
                    && host.parse::<std::net::IpAddr>().is_err()
                    && port.parse::<u16>().is_ok() =>
            {
                let next = hosts.len() + 1;
                let n = *hosts.entry(host.to_string()).or_insert(next);
                out.push_str(&format!("127.0.0.{n}:{port}"));
            }
            _ => out.push_str(inner),
        }
        out.push('"');
        rest = &rest[start + 2 + len..];
    }
    out.push_str(rest);
    out
}

// ---------------------------------------------------------------------------------------
// deploy/systemd, deploy/sysctl, deploy/debian, Cargo.toml, Dockerfile, DEPLOY.md
// ---------------------------------------------------------------------------------------

/// `Key=Value` lines of a unit file's section, in order (a key may repeat).
fn unit_keys(text: &str, section: &str) -> Vec<(String, String)> {
    let mut cur = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            cur = s.to_string();
        } else if cur == section
            && let Some((k, v)) = line.split_once('=')
        {
            out.push((k.to_string(), v.to_string()));
        }
    }
    out
}

#[test]
fn systemd_service_has_the_hardening_and_limits() {
    let text = read("deploy/systemd/ringfwd.service");
    let keys = unit_keys(&text, "Service");
    let get = |k: &str| {
        keys.iter()
            .filter(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .next_back()
            .unwrap_or_else(|| panic!("ringfwd.service: no {k}="))
    };
    for (k, v) in [
        (
            "ExecStart",
            "/usr/bin/ringfwd run --config /etc/ringfwd/ringfwd.toml",
        ),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("User", "ringfwd"),
        ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
        ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        (
            "SystemCallFilter",
            "@system-service io_uring_setup io_uring_enter io_uring_register",
        ),
    ] {
        assert_eq!(get(k), v, "ringfwd.service {k}=");
    }
    let nofile: u64 = get("LimitNOFILE").parse().unwrap();
    assert!(nofile >= 65536, "LimitNOFILE={nofile}");
    assert!(get("LimitMEMLOCK").ends_with('M') || get("LimitMEMLOCK") == "infinity");
    // The drop-in undoes the non-root variant and allows just what set-up as root needs.
    let dropin = unit_keys(&read("deploy/systemd/root-then-drop.conf"), "Service");
    assert!(dropin.contains(&("User".into(), String::new())));
    assert!(dropin.contains(&("AmbientCapabilities".into(), String::new())));
    let bounding = &dropin
        .iter()
        .find(|(k, _)| k == "CapabilityBoundingSet")
        .unwrap()
        .1;
    for cap in ["CAP_NET_BIND_SERVICE", "CAP_SETUID", "CAP_SETGID"] {
        assert!(bounding.contains(cap), "root-then-drop.conf lacks {cap}");
    }
    // The drop-in for `transparent` / `mark`: exactly CAP_NET_ADMIN on top of the unit's
    // one capability, as ambient (every thread from the start) and bounding set.
    let net_admin = unit_keys(&read("deploy/systemd/net-admin.conf"), "Service");
    for key in ["AmbientCapabilities", "CapabilityBoundingSet"] {
        let v = &net_admin
            .iter()
            .find(|(k, _)| k == key)
            .unwrap_or_else(|| panic!("net-admin.conf: no {key}="))
            .1;
        assert_eq!(
            v, "CAP_NET_BIND_SERVICE CAP_NET_ADMIN",
            "net-admin.conf {key}="
        );
    }
}

#[test]
fn systemd_unit_is_notify_with_a_watchdog_and_a_notify_reload_drop_in() {
    let service = unit_keys(&read("deploy/systemd/ringfwd.service"), "Service");
    let get = |k: &str| {
        service
            .iter()
            .rfind(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("ringfwd.service: no {k}="))
    };
    // Type=notify: known to every systemd the package targets (Debian 12 has 252).
    assert_eq!(get("Type"), "notify");
    assert_eq!(get("NotifyAccess"), "main");
    let watchdog = get("WatchdogSec");
    assert!(
        watchdog.ends_with('s') && watchdog != "0s",
        "WatchdogSec={watchdog}"
    );
    // The drop-in for systemd 253+: systemd sends SIGHUP itself, so ExecReload is cleared.
    let dropin = unit_keys(&read("deploy/systemd/notify-reload.conf"), "Service");
    assert_eq!(
        dropin,
        [
            ("Type".to_string(), "notify-reload".to_string()),
            ("ExecReload".to_string(), String::new())
        ]
    );
    let manifest = read("Cargo.toml");
    assert!(
        manifest.contains("usr/share/ringfwd/systemd/notify-reload.conf"),
        "the package does not install notify-reload.conf"
    );
}

#[test]
fn systemd_reload_is_sighup_and_the_socket_unit_matches_the_shipped_config() {
    let service = read("deploy/systemd/ringfwd.service");
    // Reload exists now: no restart-on-SIGHUP workaround for a ringfwd that died of it.
    assert!(
        !unit_keys(&service, "Service")
            .iter()
            .any(|(k, _)| k == "RestartForceExitStatus"),
        "ringfwd.service still restarts on SIGHUP"
    );
    let socket = read("deploy/systemd/ringfwd.socket");
    let keys = unit_keys(&socket, "Socket");
    let listen: Vec<&str> = keys
        .iter()
        .filter(|(k, _)| k == "ListenStream")
        .map(|(_, v)| v.as_str())
        .collect();
    assert!(!listen.is_empty(), "ringfwd.socket has no ListenStream=");
    assert!(keys.contains(&("Service".into(), "ringfwd.service".into())));
    // Every socket is matched to a rule by address: the shipped config must listen on each.
    let config = read("ringfwd.toml");
    for addr in listen {
        assert!(
            config.contains(&format!("listen = \"{addr}\"")),
            "ringfwd.socket listens on {addr}, which no rule of ringfwd.toml does"
        );
    }
    assert_eq!(
        unit_keys(&socket, "Install"),
        [("WantedBy".to_string(), "sockets.target".to_string())]
    );
}

#[test]
fn sysctl_file_sets_the_four_settings_each_with_a_comment() {
    let text = read("deploy/sysctl/90-ringfwd.conf");
    let mut set = BTreeMap::new();
    let mut commented = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') {
            commented = true;
        } else if let Some((k, v)) = t.split_once('=') {
            assert!(commented, "{} has no comment above it", k.trim());
            set.insert(k.trim().to_string(), v.trim().to_string());
            commented = false;
        }
    }
    for k in [
        "net.core.somaxconn",
        "net.ipv4.ip_local_port_range",
        "fs.pipe-user-pages-soft",
        "net.ipv4.tcp_tw_reuse",
    ] {
        assert!(set.contains_key(k), "90-ringfwd.conf does not set {k}");
    }
    assert_eq!(set["net.ipv4.tcp_tw_reuse"], "1");
    let pages: u64 = set["fs.pipe-user-pages-soft"].parse().unwrap();
    assert!(pages > 16384, "no higher than the kernel default");
}

#[test]
fn debian_metadata_names_files_that_exist() {
    let manifest: toml::Value = toml::from_str(&read("Cargo.toml")).unwrap();
    let deb = &manifest["package"]["metadata"]["deb"];
    let assets = deb["assets"].as_array().expect("assets");
    let mut targets = BTreeSet::new();
    for a in assets {
        let a = a.as_array().unwrap();
        let src = a[0].as_str().unwrap();
        if !src.starts_with("target/") {
            assert!(repo(src).is_file(), "asset {src} does not exist");
        }
        targets.insert(a[1].as_str().unwrap().to_string());
    }
    for t in ["usr/bin/", "etc/ringfwd/ringfwd.toml"] {
        assert!(targets.contains(t), "no asset installed at {t}");
    }
    let conf: Vec<&str> = deb["conf-files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(conf.contains(&"/etc/ringfwd/ringfwd.toml"));
    let units = &deb["systemd-units"];
    let dir = units["unit-scripts"].as_str().unwrap();
    let name = units["unit-name"].as_str().unwrap();
    assert!(repo(dir).join(format!("{name}.service")).is_file());
    let scripts = deb["maintainer-scripts"].as_str().unwrap();
    let postinst = read(&format!("{scripts}postinst"));
    assert!(postinst.contains("adduser --system --group --no-create-home"));
    assert!(
        postinst.contains("getent passwd ringfwd"),
        "postinst must be idempotent"
    );
    assert!(postinst.contains("#DEBHELPER#"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(repo(&format!("{scripts}postinst")))
            .unwrap()
            .permissions()
            .mode();
        assert!(mode & 0o111 != 0, "postinst is not executable");
    }
}

/// The package describes itself (no "[generated from Rust crate ringfwd]") and ships the man
/// pages and completions that deploy/gen-assets.sh generates, the script .ci/run runs before
/// `cargo deb` (deploy/check-deb.sh then checks the built package holds them).
#[test]
fn the_package_has_a_description_a_license_man_pages_and_completions() {
    let manifest: toml::Value = toml::from_str(&read("Cargo.toml")).unwrap();
    let package = &manifest["package"];
    assert!(
        package["description"]
            .as_str()
            .is_some_and(|d| d.contains("port forwarder"))
    );
    assert_eq!(package["license"].as_str(), Some("MIT OR Apache-2.0"));
    let assets: Vec<(String, String)> = package["metadata"]["deb"]["assets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_array().unwrap();
            (a[0].as_str().unwrap().into(), a[1].as_str().unwrap().into())
        })
        .collect();
    let script = read("deploy/gen-assets.sh");
    for (src, dest) in [
        ("target/assets/man/*.1.gz", "usr/share/man/man1/"),
        (
            "target/assets/completions/ringfwd.bash",
            "usr/share/bash-completion/completions/ringfwd",
        ),
        (
            "target/assets/completions/_ringfwd",
            "usr/share/zsh/vendor-completions/_ringfwd",
        ),
        (
            "target/assets/completions/ringfwd.fish",
            "usr/share/fish/vendor_completions.d/ringfwd.fish",
        ),
    ] {
        assert!(
            assets.iter().any(|(s, d)| s == src && d == dest),
            "no asset {src} → {dest}"
        );
    }
    assert!(script.contains("generate man \"$out/man\""), "{script}");
    assert!(script.contains("generate completions \"$shell\" \"$out/completions\""));
    assert!(script.contains("for shell in bash zsh fish"));
    let ci = read(".ci/run");
    let gen_at = ci
        .find("bash deploy/gen-assets.sh")
        .expect(".ci/run runs gen-assets.sh");
    let deb_at = ci[gen_at..].find("\ncargo deb\n").map(|i| i + gen_at);
    assert!(deb_at.is_some(), "gen-assets.sh must run before cargo deb");
}

#[test]
fn dockerfile_is_multi_stage_non_root_with_the_config() {
    let text = read("deploy/docker/Dockerfile");
    let froms: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "{froms:?}");
    assert!(froms[0].contains("rust:") && froms[0].ends_with(" AS build"));
    assert!(froms[1].contains("-slim"));
    let user = text
        .lines()
        .filter_map(|l| l.strip_prefix("USER "))
        .next_back()
        .expect("USER");
    assert!(
        !user.starts_with('0') && !user.starts_with("root"),
        "USER {user}"
    );
    assert!(text.contains("COPY ringfwd.toml /etc/ringfwd/ringfwd.toml"));
    assert!(text.lines().any(|l| l.starts_with("EXPOSE ")));
    // Every path it copies from the context exists.
    for l in text
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = l.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            assert!(
                repo(src).exists(),
                "Dockerfile copies {src}, which does not exist"
            );
        }
    }
}

#[test]
fn deploy_md_gives_the_docker_run_line_for_the_shipped_profile() {
    let doc = read("docs/DEPLOY.md");
    let line = "--security-opt seccomp=deploy/docker/seccomp-io_uring.json";
    assert!(doc.contains(line), "DEPLOY.md lacks `{line}`");
    assert!(doc.contains("sudo apt install ./target/debian/ringfwd_*.deb"));
}
