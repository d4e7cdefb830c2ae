//! SNI routing end to end, on every engine and data path: real TLS handshakes between
//! `openssl s_client` and `openssl s_server` backends, relayed by ringfwd without terminating
//! TLS.
//!
//! Three backends, each with its own self-signed certificate: `api.example.com` (an exact
//! route), `www.example.com` (behind a `*.example.com` wildcard route) and `default.test` (the
//! rule's own upstream, the default route). A client naming a host (in any case, with or
//! without a trailing dot) reaches the backend its
//! name routes to, which the test reads off the certificate the client was shown, and then
//! exchanges an HTTP request and response through the tunnel (`s_server -www`). A client
//! without SNI, one naming an unknown host and one speaking plain bytes go to the default
//! route. A rule without a default rejects an unmatched hello as `no_route`. The route is
//! counted in `ringfwd_connections_accepted_total{rule,route}` and written as `route=` in the
//! access log.
//!
//! `openssl` runs as child processes on loopback ports (see `support::edge`); a missing one
//! fails the test unless `RINGFWD_SKIP_PEERS=1`. Every wait is bounded.

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::edge::{SKIP_PEERS_ENV, ScratchDir, forwarder, free_port, listening_sockets};
use support::pool::wait_until;
use support::{STEP_TIMEOUT, wait_for_line};

support::engine_suite!(
    [
        tls_clients_reach_the_backend_their_name_routes_to,
        an_unmatched_hello_without_a_default_route_is_rejected,
    ],
    std_engine: ["--engine", "std"],
    tokio_engine: ["--engine", "tokio"],
    uring_copy: ["--engine", "uring", "--mode", "copy"],
    uring_splice: ["--engine", "uring", "--mode", "splice"],
    uring_auto: ["--engine", "uring", "--mode", "auto"],
);

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// How long `s_server` may take to listen, and one `s_client` run to finish.
const OPENSSL_WAIT: Duration = Duration::from_secs(20);

/// The `openssl` binary, or `None` when it is missing and `RINGFWD_SKIP_PEERS=1`.
///
/// # Panics
/// It is missing and the skip is not asked for: the CI installs it.
fn openssl() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .map(|d| d.join("openssl"))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var(SKIP_PEERS_ENV).as_deref() == Ok("1"),
            "openssl is not installed: these tests need s_client and s_server as real TLS \
             peers (apt-get install openssl; .ci/run installs it), or set {SKIP_PEERS_ENV}=1 \
             to skip"
        );
        eprintln!(
            "note: skipping the SNI checks because {SKIP_PEERS_ENV}=1 and openssl is missing"
        );
    }
    found
}

/// Runs `openssl` with `args` to completion; its status and everything it printed.
fn run_openssl(bin: &Path, args: &[&str], stdin: &[u8], dir: &Path) -> (bool, String) {
    let mut child = Command::new(bin)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn openssl {args:?}: {e}"));
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(stdin)
        .unwrap_or_else(|e| panic!("openssl {args:?}: stdin: {e}"));
    let stdout = support::drain_into(child.stdout.take().expect("piped"));
    let stderr = support::drain_into(child.stderr.take().expect("piped"));
    let status = support::wait_child(&mut child, OPENSSL_WAIT);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    // Each reader thread drops its handle on the buffer at the pipe's EOF, after the exit.
    support::eventually(STEP_TIMEOUT, || {
        std::sync::Arc::strong_count(&stdout) == 1 && std::sync::Arc::strong_count(&stderr) == 1
    });
    let text = [stdout, stderr]
        .iter()
        .map(|b| {
            String::from_utf8_lossy(&b.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
                .into_owned()
        })
        .collect::<Vec<_>>()
        .join("\n");
    (status.is_some_and(|s| s.success()), text)
}

/// An `openssl s_server -www` with a self-signed certificate for `cn`, killed by pid on drop.
struct TlsServer {
    child: Child,
    addr: SocketAddr,
    _dir: ScratchDir,
}

impl TlsServer {
    fn start(bin: &Path, cn: &str) -> Self {
        let dir = ScratchDir::new("sni");
        let (ok, out) = run_openssl(
            bin,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "key.pem",
                "-out",
                "cert.pem",
                "-days",
                "2",
                "-subj",
                &format!("/CN={cn}"),
            ],
            b"",
            &dir.path,
        );
        assert!(ok, "openssl req for {cn} failed:\n{out}");
        for _ in 0..3 {
            let addr = SocketAddr::new(LOOPBACK, free_port(LOOPBACK));
            let mut child = Command::new(bin)
                .args([
                    "s_server", "-quiet", "-www", "-cert", "cert.pem", "-key", "key.pem",
                ])
                .arg("-accept")
                .arg(addr.to_string())
                .current_dir(&dir.path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot spawn openssl s_server: {e}"));
            let pid = i32::try_from(child.id()).expect("pid");
            let listening = support::eventually(OPENSSL_WAIT, || {
                listening_sockets(pid).contains(&addr) || child.try_wait().ok().flatten().is_some()
            });
            if listening && listening_sockets(pid).contains(&addr) {
                return Self {
                    child,
                    addr,
                    _dir: dir,
                };
            }
            // The port was taken between picking and binding it: try another.
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("openssl s_server for {cn} did not listen after 3 tries");
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TLS client through `addr` naming `sni` (none: no SNI extension): the certificate's CN
/// it was shown, after a full handshake and an HTTP exchange through the tunnel.
fn tls_client(bin: &Path, addr: SocketAddr, sni: Option<&str>) -> Result<String, String> {
    let dir = std::env::temp_dir();
    let target = addr.to_string();
    let mut args = vec![
        "s_client",
        "-connect",
        target.as_str(),
        "-brief",
        "-ign_eof",
    ];
    match sni {
        Some(name) => args.extend(["-servername", name]),
        None => args.push("-noservername"),
    }
    let (ok, out) = run_openssl(bin, &args, b"GET / HTTP/1.0\r\n\r\n", &dir);
    if !ok || !out.contains("CONNECTION ESTABLISHED") {
        return Err(format!("s_client {sni:?}: no handshake:\n{out}"));
    }
    if !out.contains("HTTP/1.0 200 ok") {
        return Err(format!(
            "s_client {sni:?}: handshake but no HTTP answer through the tunnel:\n{out}"
        ));
    }
    out.lines()
        .find_map(|l| l.split("Peer certificate: CN = ").nth(1))
        .map(|cn| cn.split_whitespace().next().unwrap_or(cn).to_string())
        .ok_or_else(|| format!("s_client {sni:?}: no peer certificate line:\n{out}"))
}

fn tls_clients_reach_the_backend_their_name_routes_to(engine: &[&str]) {
    let Some(bin) = openssl() else { return };
    let api = TlsServer::start(&bin, "api.example.com");
    let www = TlsServer::start(&bin, "www.example.com");
    let fallback = TlsServer::start(&bin, "default.test");
    let relay = forwarder(
        engine,
        &format!(
            "[[rule]]\nname = \"tls\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n\
             proxy_header_timeout = \"5s\"\n\n\
             [[rule.route]]\nname = \"api\"\nsni = [\"api.example.com\"]\nupstream = \"{}\"\n\n\
             [[rule.route]]\nname = \"wild\"\nsni = [\"*.example.com\"]\nupstream = \"{}\"\n",
            fallback.addr, api.addr, www.addr
        ),
        1,
    );
    let addr = relay.addr();
    let cases: [(Option<&str>, &str, &str); 8] = [
        (Some("api.example.com"), "api.example.com", "api"),
        // Case does not matter; the exact route wins over the wildcard that also matches.
        (Some("API.Example.COM"), "api.example.com", "api"),
        // Nor does a trailing dot (an absolute name), for exact and wildcard routes alike.
        (Some("api.example.com."), "api.example.com", "api"),
        (Some("www.example.com"), "www.example.com", "wild"),
        (Some("shop.example.com"), "www.example.com", "wild"),
        (Some("shop.example.com."), "www.example.com", "wild"),
        (Some("elsewhere.test"), "default.test", "default"),
        (None, "default.test", "default"),
    ];
    for (sni, want, _) in cases {
        let got = tls_client(&bin, addr, sni).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got, want, "client naming {sni:?} reached the wrong backend");
    }
    // Plain bytes on a rule with routes: the default route, relayed unchanged (the TLS
    // server answers a non-TLS record with a TLS alert or a close, never silence forever).
    let mut plain = TcpStream::connect(addr).expect("connect");
    plain.write_all(b"GET / HTTP/1.0\r\n\r\n").expect("write");
    plain
        .set_read_timeout(Some(STEP_TIMEOUT))
        .expect("read timeout");
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    let want_routes = [("api", 3.0), ("wild", 3.0), ("default", 3.0)];
    wait_until(STEP_TIMEOUT, "accepted_total by route", || {
        let m = support::edge::metrics(&relay);
        let got: Vec<(&str, f64)> = want_routes
            .iter()
            .map(|(route, _)| {
                (
                    *route,
                    m.sum(
                        "ringfwd_connections_accepted_total",
                        &[("rule", "tls"), ("route", route)],
                    ),
                )
            })
            .collect();
        if got == want_routes {
            Ok(())
        } else {
            Err(format!("accepted by route {got:?}, want {want_routes:?}"))
        }
    });
    let line = wait_for_line(&relay, "route=\"wild\"", STEP_TIMEOUT);
    assert!(line.contains("rule=\"tls\""), "{line}");
}

fn an_unmatched_hello_without_a_default_route_is_rejected(engine: &[&str]) {
    let Some(bin) = openssl() else { return };
    let api = TlsServer::start(&bin, "api.example.com");
    let relay = forwarder(
        engine,
        &format!(
            "[[rule]]\nname = \"strict\"\nlisten = \"127.0.0.1:0\"\n\n\
             [[rule.route]]\nsni = [\"api.example.com\"]\nupstream = \"{}\"\n",
            api.addr
        ),
        1,
    );
    let addr = relay.addr();
    assert_eq!(
        tls_client(&bin, addr, Some("api.example.com")).unwrap_or_else(|e| panic!("{e}")),
        "api.example.com"
    );
    let started = Instant::now();
    let refused = tls_client(&bin, addr, Some("other.example.com"));
    assert!(
        refused.is_err(),
        "an unrouted name got through: {refused:?}"
    );
    // Closed by the forwarder, not left open until s_client is killed after OPENSSL_WAIT
    // (longer than STEP_TIMEOUT); how soon is the machine's business.
    assert!(
        started.elapsed() < STEP_TIMEOUT,
        "the unrouted client was closed only after {:?}",
        started.elapsed()
    );
    assert!(tls_client(&bin, addr, None).is_err());
    support::edge::wait_rejected(&relay, "strict", "no_route", 2);
}
