//! The upstream control thread: active health checks and DNS re-resolution, off the data
//! path.
//!
//! One thread with a small tokio runtime serves every pool: per pool with a `health_check`, a
//! loop probes every member each `interval` (a TCP connect bounded by `timeout`, the probe
//! `ringfwd ping` makes; with `send`/`expect`, then an exchange within the same `timeout`,
//! since a member that accepts and never answers passes a bare connect) and flips members
//! after `rise`/`fall` results in a row; per pool with
//! host names and a `resolve_interval`, a loop resolves the names again and publishes the new
//! member set. Workers only ever read what this thread writes (atomics and an `ArcSwap`), so
//! a slow probe or a hung resolver never delays a byte. Each state change is logged once.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::member::{EXPECT_CLOSED, EXPECT_MISMATCH, Transition, describe_errno};
use super::pool::{Pool, Refresh};
use crate::config::{HEALTH_EXPECT_WINDOW, HealthCheck, UNRESOLVED_RETRY};

/// Resolves a member's host name ("host:port") to addresses. The system resolver in
/// production; tests substitute their own.
pub trait Resolver: Send + Sync + 'static {
    /// # Errors
    /// The lookup failed (the pool keeps the last good addresses).
    fn resolve(&self, name: &str) -> io::Result<Vec<SocketAddr>>;
}

/// `getaddrinfo(3)` through the standard library.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve(&self, name: &str) -> io::Result<Vec<SocketAddr>> {
        Ok(name.to_socket_addrs()?.collect())
    }
}

/// Whether any pool needs the control thread.
pub fn needed(pools: &[Arc<Pool>]) -> bool {
    pools
        .iter()
        .any(|p| p.health_check.is_some() || lookup_interval(p).is_some())
}

/// How often a pool's names are looked up again: every `resolve_interval`; with none
/// ("resolve only at start"), every [`UNRESOLVED_RETRY`] while a name has never resolved.
fn lookup_interval(pool: &Pool) -> Option<Duration> {
    if !pool.has_names() {
        return None;
    }
    pool.resolve_interval
        .or_else(|| pool.has_unresolved().then_some(UNRESOLVED_RETRY))
}

/// Starts the control thread if any pool has health checks or names to follow.
///
/// # Errors
/// The thread or its runtime could not start.
pub fn spawn(pools: Vec<Arc<Pool>>, resolver: Arc<dyn Resolver>) -> io::Result<()> {
    // Runs for the life of the process.
    std::mem::forget(spawn_stoppable(pools, resolver)?);
    Ok(())
}

/// Ends a control thread started by [`spawn_stoppable`] when dropped.
pub struct Stop(#[allow(dead_code)] tokio::sync::oneshot::Sender<()>);

/// [`spawn`], for one config generation: the thread ends when the returned [`Stop`] is
/// dropped (`None`: no pool needed a thread).
///
/// # Errors
/// The thread or its runtime cannot start.
pub fn spawn_stoppable(
    pools: Vec<Arc<Pool>>,
    resolver: Arc<dyn Resolver>,
) -> io::Result<Option<Stop>> {
    if !needed(&pools) {
        return Ok(None);
    }
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("ringfwd-upstreams".into())
        .spawn(move || {
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for pool in pools {
                    if let Some(hc) = pool.health_check.clone() {
                        tasks.push(tokio::spawn(health_loop(pool.clone(), hc)));
                    }
                    if let Some(every) = lookup_interval(&pool) {
                        tasks.push(tokio::spawn(resolve_loop(pool, every, resolver.clone())));
                    }
                }
                let all = async {
                    for t in tasks {
                        let _ = t.await;
                    }
                };
                // Dropping the runtime at the end cancels the loops still running.
                tokio::select! {
                    () = all => {}
                    _ = stop_rx => {}
                }
            });
        })?;
    Ok(Some(Stop(stop_tx)))
}

async fn health_loop(pool: Arc<Pool>, hc: HealthCheck) {
    let mut next = tokio::time::Instant::now();
    loop {
        let set = pool.members();
        let probes = set.members.iter().map(|m| probe(m.addr, &hc, &pool.egress));
        let results = futures_join_all(probes).await;
        let now_ms = pool.clock.ms(Instant::now());
        for (m, result) in set.members.iter().zip(results) {
            let (ok, errno) = match result {
                Ok(()) => (true, 0),
                Err(errno) => (false, errno),
            };
            match m.record_probe(ok, errno, now_ms, hc.rise.get(), hc.fall.get()) {
                Some(Transition::Down) => tracing::warn!(
                    rule = %pool.rule,
                    upstream = %m.addr,
                    member = %m.name,
                    error = %describe_errno(errno),
                    fall = hc.fall.get(),
                    "upstream member down: health check failed {} times in a row",
                    hc.fall.get()
                ),
                Some(Transition::Up) => tracing::info!(
                    rule = %pool.rule,
                    upstream = %m.addr,
                    member = %m.name,
                    rise = hc.rise.get(),
                    "upstream member up: health check passed {} times in a row",
                    hc.rise.get()
                ),
                None => {}
            }
        }
        next += hc.interval;
        let now = tokio::time::Instant::now();
        if next < now {
            next = now;
        }
        tokio::time::sleep_until(next).await;
    }
}

/// One probe: `Ok` if the connect completed, `send` was written and the answer contained
/// `expect` (each when set), all within `timeout`; else the errno (or [`EXPECT_MISMATCH`],
/// [`EXPECT_CLOSED`]). The probe leaves the host as the pool's connections do (`source`,
/// `mark`, `interface`, `upstream_mptcp`), so it checks the path they take; with
/// `transparent` it has no client to speak for and connects from the host's own address.
async fn probe(
    addr: SocketAddr,
    hc: &HealthCheck,
    egress: &crate::config::Egress,
) -> Result<(), i32> {
    let errno = |e: io::Error| e.raw_os_error().unwrap_or(libc::EIO);
    let exchange = async {
        let socket = crate::net::egress::open(addr, egress, None)
            .map_err(|e| e.errno())
            .and_then(|s| s.set_nonblocking(true).map(|()| s).map_err(errno))?;
        let mut stream = tokio::net::TcpSocket::from_std_stream(socket.into())
            .connect(addr)
            .await
            .map_err(errno)?;
        exchange(&mut stream, hc.send.as_deref(), hc.expect.as_deref()).await
    };
    match tokio::time::timeout(hc.timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(libc::ETIMEDOUT),
    }
}

/// Writes `send`, then reads until the answer contains `expect`, the member closes, or
/// [`HEALTH_EXPECT_WINDOW`] bytes came without it.
async fn exchange(
    stream: &mut tokio::net::TcpStream,
    send: Option<&str>,
    expect: Option<&str>,
) -> Result<(), i32> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let errno = |e: io::Error| e.raw_os_error().unwrap_or(libc::EIO);
    if let Some(send) = send {
        stream.write_all(send.as_bytes()).await.map_err(errno)?;
    }
    let Some(expect) = expect.map(str::as_bytes) else {
        return Ok(());
    };
    let mut answer = Vec::with_capacity(256);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await.map_err(errno)?;
        if n == 0 {
            return Err(EXPECT_CLOSED);
        }
        let room = HEALTH_EXPECT_WINDOW - answer.len();
        answer.extend_from_slice(&buf[..n.min(room)]);
        if answer.windows(expect.len()).any(|w| w == expect) {
            return Ok(());
        }
        if answer.len() >= HEALTH_EXPECT_WINDOW {
            return Err(EXPECT_MISMATCH);
        }
    }
}

/// Runs the probes concurrently on this task, keeping their order.
async fn futures_join_all<F: std::future::Future<Output = Result<(), i32>>>(
    futs: impl Iterator<Item = F>,
) -> Vec<Result<(), i32>> {
    let mut pending: Vec<std::pin::Pin<Box<F>>> = futs.map(Box::pin).collect();
    let mut out: Vec<Option<Result<(), i32>>> = vec![None; pending.len()];
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (f, slot) in pending.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(r) => *slot = Some(r),
                    std::task::Poll::Pending => all = false,
                }
            }
        }
        if all {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out.into_iter()
        .map(|r| r.unwrap_or(Err(libc::EIO)))
        .collect()
}

async fn resolve_loop(pool: Arc<Pool>, every: Duration, resolver: Arc<dyn Resolver>) {
    let mut warnings = LookupWarnings::for_pool(&pool);
    loop {
        if pool.resolve_interval.is_none() && !pool.has_unresolved() {
            return; // "only at start", and every name has resolved once now
        }
        tokio::time::sleep(every).await;
        let names: Vec<Option<String>> = pool
            .specs
            .iter()
            .map(|s| s.is_name().then(|| s.text.clone()))
            .collect();
        let r = resolver.clone();
        let answers = match tokio::task::spawn_blocking(move || {
            names
                .into_iter()
                .map(|n| n.map(|n| r.resolve(&n)))
                .collect::<Vec<_>>()
        })
        .await
        {
            Ok(a) => a,
            Err(_) => continue,
        };
        let refresh = pool.refresh(&answers);
        if refresh.changed() {
            tracing::info!(
                rule = %pool.rule,
                added = ?refresh.added,
                removed = ?refresh.removed,
                members = pool.members().len(),
                "upstream members changed after DNS lookup"
            );
        }
        for line in warnings.note(&pool, &refresh) {
            tracing::warn!(rule = %pool.rule, "{line}");
        }
    }
}

/// Says a failing lookup once per episode (and once when it recovers), not every interval.
#[derive(Debug)]
pub struct LookupWarnings {
    failing: Vec<bool>,
}

impl LookupWarnings {
    pub fn new(specs: usize) -> Self {
        Self {
            failing: vec![false; specs],
        }
    }

    /// For a pool just loaded: a name that did not resolve then was already warned about
    /// by the config (once), so only its recovery is said.
    pub fn for_pool(pool: &Pool) -> Self {
        Self {
            failing: pool
                .specs
                .iter()
                .map(|s| s.is_name() && s.addrs.is_empty())
                .collect(),
        }
    }

    /// The lines to log for this refresh.
    pub fn note(&mut self, pool: &Pool, refresh: &Refresh) -> Vec<String> {
        let mut lines = Vec::new();
        for (i, spec) in pool.specs.iter().enumerate() {
            if !spec.is_name() {
                continue;
            }
            let failure = refresh.failed.iter().find(|(n, _)| *n == spec.text);
            match (failure, self.failing[i]) {
                (Some((name, e)), false) => {
                    self.failing[i] = true;
                    lines.push(format!(
                        "cannot resolve upstream {name}: {e}; keeping its last known addresses"
                    ));
                }
                (None, true) => {
                    self.failing[i] = false;
                    lines.push(format!("upstream {} resolves again", spec.text));
                }
                _ => {}
            }
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MemberSpec, Upstream};

    #[test]
    fn a_failing_lookup_is_said_once_per_episode() {
        let pool = Pool::new(
            "web",
            &Upstream::with_members(vec![MemberSpec::new(
                "svc:80",
                vec!["10.0.0.1:80".parse().unwrap()],
            )]),
            Instant::now(),
        );
        let mut w = LookupWarnings::new(1);
        let fail = || vec![Some(Err(io::Error::other("SERVFAIL")))];
        let r = pool.refresh(&fail());
        assert_eq!(w.note(&pool, &r).len(), 1);
        let r = pool.refresh(&fail());
        assert!(w.note(&pool, &r).is_empty());
        let r = pool.refresh(&[Some(Ok(vec!["10.0.0.1:80".parse().unwrap()]))]);
        assert_eq!(w.note(&pool, &r), vec!["upstream svc:80 resolves again"]);
    }

    #[test]
    fn a_name_unresolved_at_load_is_looked_up_until_it_resolves_and_said_once() {
        let mut up = Upstream::with_members(vec![
            MemberSpec::new("late.svc:80", vec![]),
            MemberSpec::new("10.0.0.9:80", vec!["10.0.0.9:80".parse().unwrap()]),
        ]);
        up.resolve_interval = None;
        let pool = Arc::new(Pool::new("web", &up, Instant::now()));
        assert!(pool.has_unresolved());
        assert_eq!(pool.members().len(), 1, "no member for the name yet");
        // Resolve "only at start", yet looked up again while the name never resolved.
        assert_eq!(lookup_interval(&pool), Some(UNRESOLVED_RETRY));
        assert!(needed(std::slice::from_ref(&pool)));
        // The config warned already: a still-failing lookup says nothing more.
        let mut w = LookupWarnings::for_pool(&pool);
        let r = pool.refresh(&[Some(Err(io::Error::other("NXDOMAIN"))), None]);
        assert!(w.note(&pool, &r).is_empty());
        let r = pool.refresh(&[Some(Ok(vec!["10.0.0.1:80".parse().unwrap()])), None]);
        assert_eq!(r.added, vec!["10.0.0.1:80".parse().unwrap()]);
        assert_eq!(
            w.note(&pool, &r),
            vec!["upstream late.svc:80 resolves again"]
        );
        assert_eq!(pool.members().len(), 2);
        assert!(!pool.has_unresolved());
        assert_eq!(
            lookup_interval(&pool),
            None,
            "resolved once: only at start again"
        );
    }

    #[test]
    fn the_system_resolver_finds_localhost() {
        let addrs = SystemResolver.resolve("localhost:80").unwrap();
        assert!(!addrs.is_empty());
        assert!(addrs.iter().all(|a| a.ip().is_loopback() && a.port() == 80));
    }

    fn check(send: Option<&str>, expect: Option<&str>) -> HealthCheck {
        HealthCheck {
            timeout: Duration::from_millis(500),
            send: send.map(str::to_string),
            expect: expect.map(str::to_string),
            ..HealthCheck::default()
        }
    }

    #[tokio::test]
    async fn a_probe_tells_open_from_closed() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let open = l.local_addr().unwrap();
        assert_eq!(
            probe(open, &check(None, None), &crate::config::Egress::PLAIN).await,
            Ok(())
        );
        drop(l);
        assert_eq!(
            probe(open, &check(None, None), &crate::config::Egress::PLAIN).await,
            Err(libc::ECONNREFUSED)
        );
    }

    /// A member that answers `reply` (`None`: accepts and never answers, `Some("")`: closes
    /// at once) to whatever it is sent.
    fn member_answering(reply: Option<&'static str>) -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for s in l.incoming().take(8) {
                let Ok(mut s) = s else { return };
                if let Some(r) = reply {
                    use std::io::{Read, Write};
                    let mut buf = [0u8; 64];
                    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                    let _ = s.read(&mut buf);
                    let _ = s.write_all(r.as_bytes());
                    continue; // closed
                }
                held.push(s);
            }
        });
        addr
    }

    #[tokio::test]
    async fn send_and_expect_tell_a_silent_member_from_a_good_one() {
        let good = member_answering(Some("junk\r\n+PONG\r\n"));
        let silent = member_answering(None);
        let wrong = member_answering(Some("-ERR nope\r\n"));
        let hc = check(Some("PING\r\n"), Some("+PONG"));
        assert_eq!(
            probe(good, &hc, &crate::config::Egress::PLAIN).await,
            Ok(()),
            "contains, not only starts with"
        );
        // A bare connect check sees the silent member up; the exchange does not.
        assert_eq!(
            probe(silent, &check(None, None), &crate::config::Egress::PLAIN).await,
            Ok(())
        );
        assert_eq!(
            probe(silent, &hc, &crate::config::Egress::PLAIN).await,
            Err(libc::ETIMEDOUT)
        );
        assert_eq!(
            probe(wrong, &hc, &crate::config::Egress::PLAIN).await,
            Err(EXPECT_CLOSED)
        );
        // Send only: written is enough.
        assert_eq!(
            probe(
                silent,
                &check(Some("x"), None),
                &crate::config::Egress::PLAIN
            )
            .await,
            Ok(())
        );
        // Expect only: a banner (server speaks first).
        let banner = member_answering(Some("SSH-2.0-test\r\n"));
        assert_eq!(
            probe(
                banner,
                &check(None, Some("SSH-2.0")),
                &crate::config::Egress::PLAIN
            )
            .await,
            Ok(())
        );
    }

    #[tokio::test]
    async fn an_answer_without_the_string_in_its_window_fails() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            use std::io::Write;
            if let Ok((mut s, _)) = l.accept() {
                let _ = s.write_all(&[b'x'; HEALTH_EXPECT_WINDOW + 100]);
                std::thread::sleep(Duration::from_secs(2));
            }
        });
        assert_eq!(
            probe(
                addr,
                &check(None, Some("OK")),
                &crate::config::Egress::PLAIN
            )
            .await,
            Err(EXPECT_MISMATCH)
        );
    }
}
