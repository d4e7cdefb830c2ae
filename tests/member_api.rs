//! The runtime member API end to end, on every engine: `POST /upstreams/RULE/MEMBER?state=…`
//! and `?weight=N`, what `GET /upstreams`, `/metrics` and `ringfwd upstream` show and do, and
//! that what the operator set survives a reload for members still in the pool.
//!
//! Members are in-test servers that say their identity byte first, so every session names the
//! member that served it. One worker (`workers = 1`) makes smooth round-robin exact on every
//! engine, so weights are asserted as exact counts.

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::Command;

use support::STEP_TIMEOUT;
use support::pool::{
    Forwarder, Member, http_get, http_post, is_up, member_in, read_identity, toml_list, wait_until,
};
use support::relay::BIN;
use support::sock;

support::engine_suite!(
    [drain_down_up_and_weight_take_effect_and_survive_a_reload],
    std_engine: ["--engine", "std"],
    tokio_engine: ["--engine", "tokio"],
    uring_copy: ["--engine", "uring", "--mode", "copy"],
    uring_splice: ["--engine", "uring", "--mode", "splice"],
    uring_auto: ["--engine", "uring", "--mode", "auto"],
);

const HEAD: &str = "workers = 1";

fn rules(upstream: &str) -> String {
    format!(
        "{HEAD}\n[[rule]]\nname = \"m\"\nlisten = \"127.0.0.1:0\"\nupstream = {upstream}\nbalance = \"round_robin\"\n"
    )
}

/// One short session: the identity of the member that served it.
fn who(addr: SocketAddr) -> u8 {
    let mut s = sock::connect(addr);
    let id = read_identity(&mut s).expect("the member's identity byte");
    s.write_all(b"hi").expect("write");
    let mut back = [0u8; 2];
    s.read_exact(&mut back).expect("echo");
    id
}

/// How many of `n` sessions each identity served, indexed by identity.
fn spread(addr: SocketAddr, n: usize) -> [usize; 4] {
    let mut c = [0; 4];
    for _ in 0..n {
        c[usize::from(who(addr))] += 1;
    }
    c
}

fn set(fwd: &Forwarder, member: SocketAddr, query: &str) -> String {
    let (status, body) = http_post(fwd.admin, &format!("/upstreams/m/{member}?{query}"));
    assert_eq!(status, 200, "POST {member}?{query}: {body}");
    body
}

fn state_of(fwd: &Forwarder, member: SocketAddr) -> (String, u64, bool) {
    let m = fwd.member("m", member);
    (
        m["state"].as_str().unwrap_or("?").to_string(),
        m["weight"].as_u64().unwrap_or(0),
        is_up(&m),
    )
}

fn drain_down_up_and_weight_take_effect_and_survive_a_reload(engine: &[&str]) {
    let _load = support::light();
    let (a, b, c) = (
        Member::identified(1),
        Member::identified(2),
        Member::identified(3),
    );
    let fwd = Forwarder::start(engine, &rules(&toml_list([a.addr(), b.addr()])), 1);
    // 1. A long-lived session, on member 1 (round-robin starts there) .
    let mut held = sock::connect(fwd.addr());
    assert_eq!(read_identity(&mut held).expect("identity"), 1);
    // 2. Drain member 1: no new session reaches it, the live one runs on.
    let body = set(&fwd, a.addr(), "state=drain");
    assert!(body.contains("drain (was up)"), "{body}");
    assert_eq!(spread(fwd.addr(), 10), [0, 0, 10, 0]);
    held.write_all(b"still here")
        .expect("the drained member's session is alive");
    let mut back = [0u8; 10];
    held.read_exact(&mut back)
        .expect("echo on the drained member");
    assert_eq!(&back, b"still here");
    assert_eq!(state_of(&fwd, a.addr()), ("drain".into(), 1, false));
    let m = fwd.metrics();
    let admin_state = |upstream: SocketAddr, state: &str| {
        m.sum(
            "ringfwd_upstream_admin_state",
            &[
                ("rule", "m"),
                ("upstream", &upstream.to_string()),
                ("state", state),
            ],
        )
    };
    assert_eq!(admin_state(a.addr(), "drain"), 1.0);
    assert_eq!(admin_state(a.addr(), "up"), 0.0);
    assert_eq!(admin_state(b.addr(), "up"), 1.0);
    // 3. Down member 2 as well: a down member is tried as an unhealthy one would be, a
    //    drained one never.
    set(&fwd, b.addr(), "state=down");
    assert_eq!(spread(fwd.addr(), 4), [0, 0, 4, 0]);
    assert_eq!(state_of(&fwd, b.addr()), ("down".into(), 1, false));
    // 4. Both up, member 1 at weight 3: exactly 3 of 4 sessions go to it.
    set(&fwd, b.addr(), "state=up");
    // Through the CLI verb, as an operator would.
    let out = Command::new(BIN)
        .args(["upstream", "up", "m", &a.addr().to_string(), "--admin"])
        .arg(fwd.admin.to_string())
        .output()
        .expect("ringfwd upstream up");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("up (was drain)"), "{text}");
    let body = set(&fwd, a.addr(), "weight=3");
    assert!(body.contains("weight 3 (was weight 1)"), "{body}");
    let before = spread(fwd.addr(), 40);
    assert_eq!(before, [0, 30, 10, 0]);
    // 5. Drain member 1 and weigh member 2 at 2, then reload a config that adds member 3:
    //    the members still in the pool keep what the operator set. (The held session ends
    //    first, so that the old generation drains and every later session is the new one's.)
    drop(held);
    set(&fwd, a.addr(), "state=drain");
    set(&fwd, b.addr(), "weight=2");
    let (status, body) =
        fwd.reload_rules("", &rules(&toml_list([a.addr(), b.addr(), c.addr()])), &[]);
    assert_eq!(status, 200, "{body}");
    wait_until(STEP_TIMEOUT, "member 3 listed after the reload", || {
        let pool = fwd.pool("m");
        let n = pool["members"].as_array().map_or(0, Vec::len);
        if n == 3 {
            Ok(())
        } else {
            Err(format!("{pool}"))
        }
    });
    wait_until(STEP_TIMEOUT, "the old generation drained", || {
        if fwd
            .stderr()
            .contains("an older config generation has drained")
        {
            Ok(())
        } else {
            Err("not yet".into())
        }
    });
    assert_eq!(state_of(&fwd, a.addr()), ("drain".into(), 3, false));
    assert_eq!(state_of(&fwd, b.addr()), ("up".into(), 2, true));
    assert_eq!(state_of(&fwd, c.addr()), ("up".into(), 1, true));
    assert_eq!(spread(fwd.addr(), 30), [0, 0, 20, 10]);
    // 6. Bad requests get their own answers.
    let (status, body) = http_post(fwd.admin, "/upstreams/m/127.0.0.1:1?state=up");
    assert_eq!(status, 404, "{body}");
    assert!(
        body.contains(&a.addr().to_string()),
        "names the members: {body}"
    );
    let (status, body) = http_post(fwd.admin, "/upstreams/nope/127.0.0.1:1?state=up");
    assert_eq!(status, 404, "{body}");
    let (status, body) = http_post(fwd.admin, &format!("/upstreams/m/{}?state=maint", a.addr()));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("up, drain, down"), "{body}");
    let (status, _) = http_get(fwd.admin, &format!("/upstreams/m/{}?state=up", a.addr()));
    assert_eq!(status, 405);
    let upstreams = fwd.upstreams();
    let pool = support::pool::pool_in(&upstreams, "m");
    assert_eq!(member_in(pool, a.addr())["state"], "drain");
}

/// A token file with `mode` in the test scratch directory, removed on drop.
struct TokenFile(std::path::PathBuf);

impl TokenFile {
    fn new(stem: &str, token: &str, mode: u32) -> Self {
        use std::os::unix::fs::PermissionsExt;
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let path = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "token-{stem}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::write(&path, format!("{token}\n")).expect("write the token");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        Self(path)
    }

    fn key(&self) -> String {
        format!("admin_token_file = {:?}\n", self.0.display().to_string())
    }
}

impl Drop for TokenFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `admin_token_file`: every state-changing endpoint wants the bearer token, read-only ones
/// do not; wrong or missing tokens get 401 and are counted; the file is read again at a
/// reload (a rotated token takes effect); the CLI verb sends it from `--token-file`.
#[test]
fn the_admin_token_guards_reload_and_the_member_api_only() {
    let _load = support::light();
    let member = Member::identified(1);
    let token = TokenFile::new("guard", "tok-one", 0o600);
    let head = format!("{}{HEAD}", token.key());
    let rules_of = |head: &str| {
        format!(
            "{head}\n[[rule]]\nname = \"m\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{}\"\n",
            member.addr()
        )
    };
    let fwd = Forwarder::start(&["--engine", "std"], &rules_of(&head), 1);
    let bearer = |t: &str| format!("Bearer {t}");
    let post = |path: &str, auth: Option<&str>| {
        let headers: Vec<(&str, String)> = auth
            .map(|a| ("Authorization", bearer(a)))
            .into_iter()
            .collect();
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        support::pool::http_request_with(fwd.admin, "POST", path, &headers)
    };
    let drain = format!("/upstreams/m/{}?state=drain", member.addr());
    // 1. Read-only endpoints: no token needed.
    for path in ["/metrics", "/healthz", "/upstreams", "/stats"] {
        assert_eq!(http_get(fwd.admin, path).0, 200, "GET {path}");
    }
    // 2. State-changing ones: 401 without the right token, nothing changed.
    for (path, auth) in [
        ("/reload", None),
        ("/reload", Some("tok-on")),
        (drain.as_str(), None),
        (drain.as_str(), Some("tok-one-and-more")),
    ] {
        let (status, body) = post(path, auth);
        assert_eq!(status, 401, "POST {path} with {auth:?}: {body}");
    }
    assert_eq!(state_of(&fwd, member.addr()).0, "up");
    let unauthorized = fwd.metrics().sum("ringfwd_admin_unauthorized_total", &[]);
    assert_eq!(unauthorized, 4.0);
    // 3. With it: done.
    let (status, body) = post(&drain, Some("tok-one"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(state_of(&fwd, member.addr()).0, "drain");
    // 4. The CLI verb: refused without the file, done with it.
    let cli = |extra: &[&str]| {
        Command::new(BIN)
            .args(["upstream", "up", "m", &member.addr().to_string(), "--admin"])
            .arg(fwd.admin.to_string())
            .args(extra)
            .output()
            .expect("ringfwd upstream up")
    };
    let out = cli(&[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{out:?}"
    );
    let out = cli(&["--token-file", &token.0.display().to_string()]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(state_of(&fwd, member.addr()).0, "up");
    // 5. Rotation: the file is read again at a reload.
    std::fs::write(&token.0, "tok-two\n").expect("rotate the token");
    let (status, body) = fwd.reload_rules(
        &head,
        &rules_of(""),
        &[("Authorization", &bearer("tok-one"))],
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        post("/reload", Some("tok-one")).0,
        401,
        "the old token is gone"
    );
    let (status, body) = post("/reload", Some("tok-two"));
    assert_eq!(status, 200, "{body}");
}

/// A remote admin listener without a token, or a token file others may read: the start is
/// refused with one line naming the key.
#[test]
fn an_unsafe_admin_is_refused_at_start_with_one_line() {
    let open = TokenFile::new("open", "tok", 0o644);
    for (text, key) in [
        (
            "admin_allow_remote = true\nadmin = \"0.0.0.0:0\"\n".to_string(),
            "admin: 0.0.0.0:0 is not a loopback address and no admin_token_file is set",
        ),
        (
            format!("admin = \"127.0.0.1:0\"\n{}", open.key()),
            "admin_token_file: ",
        ),
    ] {
        let file = support::TempFile::new(
            "ringfwd-unsafe-admin",
            &format!("{text}[[rule]]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n"),
        );
        let out =
            support::relay::run_to_exit(&["run", "--config", &file.path.display().to_string()]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let lines: Vec<&str> = out.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains(key), "{lines:?}");
    }
}
