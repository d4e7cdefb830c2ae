//! The admin HTTP listener: `/metrics` (OpenMetrics text), `/healthz`, `/stats` (JSON for
//! `ringfwd stats`), `/upstreams` (every pool member's state, JSON) and `/histograms` (one merged HDR histogram, V2 + DEFLATE, base64);
//! and the endpoints that change state: `POST /reload` and the member API (`POST
//! /upstreams/RULE/MEMBER?state=…|weight=…`), which demand the bearer token of
//! `admin_token_file` when one is configured ([`AdminToken`]).
//!
//! It runs on a thread of its own with a current-thread tokio runtime and hyper's HTTP/1
//! server, so a scrape never runs on an engine's worker and an engine never waits for a
//! scrape: the only shared state is the shards' relaxed atomics. The socket is bound before
//! the thread starts, so "address in use" is reported at start-up and the bound address
//! (port 0 resolved) is known to the caller.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine as _;
use hdrhistogram::serialization::{Serializer, V2DeflateSerializer};
use http_body_util::Full;
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::sync::Notify;

use super::report::StatsReport;
use super::upstreams::UpstreamsReport;
use super::{HistogramKind, Metrics, prom};
use crate::net::{self, ExhaustionLog, ListenError};

/// Connections open at once. At the cap a new connection takes the place of the oldest one
/// that is not being answered (clients that never sent a request go first); if every one is
/// being answered, the new one is closed at once. Either way a slow or silent client cannot
/// keep `/healthz` waiting in the listen backlog, and the admin port cannot eat the fds the
/// engines need.
pub const MAX_CONNECTIONS: usize = 64;
/// A client that has not sent its request headers by then is dropped; the clock also runs on
/// a kept-alive connection waiting for its next request.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Every endpoint and the one method it answers. A 404 lists them; a known path asked with
/// another method gets 405 and `Allow:` naming its method.
pub const ENDPOINTS: [(&str, Method); 7] = [
    ("/metrics", Method::GET),
    ("/healthz", Method::GET),
    ("/stats", Method::GET),
    ("/upstreams", Method::GET),
    ("/histograms", Method::GET),
    ("/reload", Method::POST),
    (MEMBER_API, Method::POST),
];

/// The member API's path, `RULE` and `MEMBER` standing for the names (see
/// [`crate::upstream::admin`]).
pub const MEMBER_API: &str = "/upstreams/RULE/MEMBER";

/// [`ENDPOINTS`] for the start-up line and `--admin`'s help.
pub const ENDPOINTS_TEXT: &str = "GET /metrics /healthz /stats /upstreams /histograms?rule=R&metric=M, POST /reload /upstreams/RULE/MEMBER?state=up|drain|down|weight=N";

/// The bearer token the state-changing endpoints demand; defined with the config it is read
/// from.
pub use crate::config::AdminToken;

/// The body of a 404: what exists.
fn not_found(path: &str) -> String {
    format!("no such endpoint {path:?}; the endpoints are {ENDPOINTS_TEXT}\n")
}

struct State {
    metrics: Arc<Metrics>,
    registry: Registry,
}

/// Why the admin endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The admin address cannot be listened on; worded like a rule listener's error.
    #[error("admin endpoint: {0}")]
    Listen(#[from] ListenError),
    #[error("admin endpoint: cannot start its thread or runtime: {0}")]
    Start(#[from] std::io::Error),
}

/// Binds `addr` and serves the admin endpoints on a new thread until the process exits.
/// Returns the bound address (with port 0 resolved).
///
/// # Errors
/// The address cannot be bound, or the thread or its runtime cannot start.
pub fn spawn(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<SocketAddr, AdminError> {
    spawn_on(net::bind_listener(addr, false)?, metrics)
}

/// [`spawn`] on a listener already bound (one taken over from an older process).
///
/// # Errors
/// The thread or its runtime cannot start.
pub fn spawn_on(
    listener: std::net::TcpListener,
    metrics: Arc<Metrics>,
) -> Result<SocketAddr, AdminError> {
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let state = Arc::new(State {
        registry: prom::registry(metrics.clone()),
        metrics,
    });
    std::thread::Builder::new()
        .name("ringfwd-admin".into())
        .spawn(move || rt.block_on(serve(listener, state)))?;
    Ok(bound)
}

/// Where one admin connection is, for choosing which one gives way at the cap.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum ConnState {
    /// Connected, no request yet: the first to go.
    Fresh = 0,
    /// A request is being answered (its response body not yet written): never evicted.
    Busy = 1,
    /// Answered at least one request, kept alive waiting for the next.
    Idle = 2,
    /// Waiting for a reload to be done: the first to give way, so that clients looping on
    /// `POST /reload` can never keep `/healthz` out (the reload still runs; only its answer
    /// to the evicted client is lost).
    Waiting = 3,
}

/// One live admin connection, shared between the accept loop and its task.
struct Slot {
    state: AtomicU8,
    /// Set by the task when the connection is gone.
    done: AtomicBool,
    /// Tells the task to drop its connection now.
    evict: Notify,
}

impl Slot {
    fn new() -> Self {
        Self {
            state: AtomicU8::new(ConnState::Fresh as u8),
            done: AtomicBool::new(false),
            evict: Notify::new(),
        }
    }

    fn state(&self) -> ConnState {
        match self.state.load(Ordering::Relaxed) {
            0 => ConnState::Fresh,
            1 => ConnState::Busy,
            2 => ConnState::Idle,
            _ => ConnState::Waiting,
        }
    }
}

/// The live connections in accept order and the cap on them.
struct Slots {
    live: VecDeque<Arc<Slot>>,
    cap: usize,
}

impl Slots {
    fn new(cap: usize) -> Self {
        Self {
            live: VecDeque::with_capacity(cap),
            cap,
        }
    }

    /// A slot for a new connection, evicting at the cap the oldest connection waiting for a
    /// reload, else the oldest fresh, else the oldest idle one; `None` when every connection
    /// is busy (close the new one).
    fn admit(&mut self) -> Option<Arc<Slot>> {
        self.live.retain(|s| !s.done.load(Ordering::Acquire));
        if self.live.len() >= self.cap {
            let victim = [ConnState::Waiting, ConnState::Fresh, ConnState::Idle]
                .into_iter()
                .find_map(|want| self.live.iter().position(|s| s.state() == want))?;
            if let Some(v) = self.live.remove(victim) {
                v.evict.notify_one();
            }
        }
        let slot = Arc::new(Slot::new());
        self.live.push_back(slot.clone());
        Some(slot)
    }
}

async fn serve(listener: std::net::TcpListener, state: Arc<State>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "admin listener cannot be registered; admin endpoints are off");
            return;
        }
    };
    let mut slots = Slots::new(MAX_CONNECTIONS);
    let mut failures = ExhaustionLog::default();
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => {
                if failures.recovered() {
                    tracing::info!("admin accept works again");
                }
                s
            }
            Err(e) if net::is_transient_accept_error(&e) => continue,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning, and say so once per
                // episode (then every few seconds), not at every retry.
                if let Some(held_back) = failures.hit(Instant::now()) {
                    tracing::warn!(error = %e, held_back, "admin accept failed; retrying");
                }
                tokio::time::sleep(net::ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Some(slot) = slots.admit() else {
            drop(stream);
            continue;
        };
        tokio::spawn(serve_connection(stream, state.clone(), slot));
        // Let the new connection read its request before the next accept: on this one
        // thread, a burst of new connections (clients looping on `POST /reload`) would
        // otherwise push a probe's connection out as "fresh" before its request is read.
        tokio::task::yield_now().await;
    }
}

/// Marks its connection's slot when the task ends, however it ends.
struct DoneGuard(Arc<Slot>);

impl Drop for DoneGuard {
    fn drop(&mut self) {
        self.0.done.store(true, Ordering::Release);
    }
}

async fn serve_connection(stream: tokio::net::TcpStream, state: Arc<State>, slot: Arc<Slot>) {
    let done = DoneGuard(slot.clone());
    let service = {
        let slot = slot.clone();
        service_fn(move |req| {
            let state = state.clone();
            let busy = BusyGuard::new(slot.clone());
            let slot = slot.clone();
            async move {
                let path = req.uri().path();
                let changes_state = req.method() == Method::POST
                    && (path == "/reload" || path.starts_with("/upstreams/"));
                let resp = if changes_state && !authorized(&state.metrics, &req) {
                    state.metrics.unauthorized();
                    let mut r = text(
                        StatusCode::UNAUTHORIZED,
                        "this endpoint needs the admin token: Authorization: Bearer <the token of admin_token_file>\n",
                    );
                    r.headers_mut().insert(
                        hyper::header::WWW_AUTHENTICATE,
                        HeaderValue::from_static("Bearer realm=\"ringfwd\""),
                    );
                    r
                } else if let Some(rest) = path.strip_prefix("/upstreams/") {
                    // Like a reload, a member command waits for the control plane.
                    slot.state
                        .store(ConnState::Waiting as u8, Ordering::Relaxed);
                    let r = member_request(&state, req.method(), rest, req.uri().query()).await;
                    slot.state.store(ConnState::Busy as u8, Ordering::Relaxed);
                    r
                } else if req.method() == Method::POST && path == "/reload" {
                    // A reload binds sockets and starts an engine generation: off the
                    // admin's one thread, which keeps answering scrapes meanwhile.
                    let metrics = state.metrics.clone();
                    slot.state
                        .store(ConnState::Waiting as u8, Ordering::Relaxed);
                    let done = tokio::task::spawn_blocking(move || metrics.reload()).await;
                    slot.state.store(ConnState::Busy as u8, Ordering::Relaxed);
                    match done {
                        Ok(Some(Ok(changes))) => text(StatusCode::OK, format!("{changes}\n")),
                        Ok(Some(Err(why))) => text(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            format!("reload failed, still running the previous config: {why}\n"),
                        ),
                        Ok(None) => text(
                            StatusCode::CONFLICT,
                            "nothing to reload: this run has no --config file\n",
                        ),
                        Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "reload panicked\n"),
                    }
                } else {
                    route(&state, &req)
                };
                Ok::<_, Infallible>(resp.map(|body| Tracked { body, _busy: busy }))
            }
        })
    };
    let conn = http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = conn => {}
        () = slot.evict.notified() => {}
    }
    drop(done);
}

/// Whether `req` carries the admin token, or none is needed.
fn authorized(metrics: &Metrics, req: &Request<Incoming>) -> bool {
    match metrics.admin_token() {
        None => true,
        Some(token) => token.admits(
            req.headers()
                .get(hyper::header::AUTHORIZATION)
                .map(HeaderValue::as_bytes),
        ),
    }
}

/// `POST /upstreams/RULE/MEMBER?…`: the member API, carried out by the control plane (off
/// the admin's one thread).
async fn member_request(
    state: &State,
    method: &Method,
    rest: &str,
    query: Option<&str>,
) -> Response<Full<Bytes>> {
    if method != Method::POST {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{MEMBER_API} answers POST only, not {method}\n"),
        );
        r.headers_mut()
            .insert(hyper::header::ALLOW, HeaderValue::from_static("POST"));
        return r;
    }
    let done = match crate::upstream::admin::Command::parse(rest, query.unwrap_or("")) {
        Ok(cmd) => {
            let metrics = state.metrics.clone();
            tokio::task::spawn_blocking(move || metrics.member_command(cmd)).await
        }
        Err(e) => Ok(Some(Err(e))),
    };
    member_answer(done)
}

/// The answer to a member API command: one line per member changed, or why none was.
fn member_answer(
    done: Result<
        Option<Result<Vec<crate::upstream::admin::Done>, crate::upstream::admin::CommandError>>,
        tokio::task::JoinError,
    >,
) -> Response<Full<Bytes>> {
    match done {
        Ok(Some(Ok(done))) => text(
            StatusCode::OK,
            done.iter().map(|d| format!("{d}\n")).collect::<String>(),
        ),
        Ok(Some(Err(e))) => text(
            StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST),
            format!("{e}\n"),
        ),
        Ok(None) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "still starting; try again once it serves\n",
        ),
        Err(_) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "member command panicked\n",
        ),
    }
}

/// Keeps a connection [`ConnState::Busy`] from its request until its response body is
/// written (or dropped).
struct BusyGuard(Arc<Slot>);

impl BusyGuard {
    fn new(slot: Arc<Slot>) -> Self {
        slot.state.store(ConnState::Busy as u8, Ordering::Relaxed);
        Self(slot)
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.state.store(ConnState::Idle as u8, Ordering::Relaxed);
    }
}

/// A response body that holds its connection's [`BusyGuard`].
struct Tracked {
    body: Full<Bytes>,
    _busy: BusyGuard,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    respond(status, "text/plain; charset=utf-8", body)
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// Answers every request but `POST /reload` (answered in `serve_connection`).
fn route(state: &State, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let Some((_, method)) = ENDPOINTS.iter().find(|(p, _)| *p == path) else {
        return text(StatusCode::NOT_FOUND, not_found(path));
    };
    if req.method() != method {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{path} answers {method} only, not {}\n", req.method()),
        );
        r.headers_mut().insert(
            hyper::header::ALLOW,
            HeaderValue::from_static(method.as_str()),
        );
        return r;
    }
    match path {
        "/metrics" => respond(
            StatusCode::OK,
            prom::CONTENT_TYPE,
            prom::render(&state.registry),
        ),
        // 503 from the first SIGTERM on (before the listeners close when `shutdown_delay` is
        // set): what a BGP speaker or load balancer withdraws the host on.
        "/healthz" if state.metrics.draining() => {
            text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/stats" => match serde_json::to_vec(&StatsReport::collect(&state.metrics)) {
            Ok(json) => respond(StatusCode::OK, "application/json", json),
            Err(e) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode stats: {e}\n"),
            ),
        },
        "/histograms" => histogram(&state.metrics, req.uri().query().unwrap_or("")),
        "/upstreams" => match state
            .metrics
            .runtime()
            .map(|rt| UpstreamsReport::collect(&rt))
        {
            Some(report) => match serde_json::to_vec(&report) {
                Ok(json) => respond(StatusCode::OK, "application/json", json),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot encode upstreams: {e}\n"),
                ),
            },
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "no rules are running yet\n",
            ),
        },
        // `POST /reload` never reaches here; a listed path without a branch is a bug.
        other => text(StatusCode::NOT_FOUND, not_found(other)),
    }
}

/// `/histograms?rule=R&metric=M`: the rule's merged histogram for that metric, values in
/// microseconds, as HdrHistogram's compressed V2 encoding in base64 — the form
/// `HistogramLogProcessor` and the other HdrHistogram tools read.
fn histogram(metrics: &Metrics, query: &str) -> Response<Full<Bytes>> {
    let (mut rule, mut metric) = (None, None);
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "rule" => rule = Some(v.into_owned()),
            "metric" => metric = Some(v.into_owned()),
            _ => {}
        }
    }
    let rule_names = || {
        metrics
            .rules()
            .iter()
            .map(|r| format!("{:?}", r.name))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (Some(rule), Some(metric)) = (rule, metric) else {
        return text(
            StatusCode::BAD_REQUEST,
            format!(
                "usage: /histograms?rule=R&metric=M (rules: {}; metrics: {})\n",
                rule_names(),
                HistogramKind::names()
            ),
        );
    };
    let Some(kind) = HistogramKind::parse(&metric) else {
        return text(
            StatusCode::BAD_REQUEST,
            format!(
                "unknown metric {metric:?} (expected one of {})\n",
                HistogramKind::names()
            ),
        );
    };
    let Some(rm) = metrics.rule_by_name(&rule) else {
        return text(
            StatusCode::NOT_FOUND,
            format!("unknown rule {rule:?} (rules: {})\n", rule_names()),
        );
    };
    let snapshot = rm.snapshot();
    let mut bytes = Vec::new();
    match V2DeflateSerializer::new().serialize(snapshot.histogram(kind), &mut bytes) {
        Ok(_) => {
            let mut body = base64::engine::general_purpose::STANDARD.encode(&bytes);
            body.push('\n');
            text(StatusCode::OK, body)
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode histogram: {e:?}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(slot: &Slot, state: ConnState) {
        slot.state.store(state as u8, Ordering::Relaxed);
    }

    #[test]
    fn the_token_must_match_exactly() {
        let t = AdminToken::new("s3cret");
        assert!(t.admits(Some(b"Bearer s3cret")));
        for wrong in [
            &b"Bearer s3cre"[..],
            b"Bearer s3cret2",
            b"Bearer ",
            b"bearer s3cret",
            b"Basic s3cret",
            b"s3cret",
            b"Bearer S3CRET",
        ] {
            assert!(
                !t.admits(Some(wrong)),
                "{:?}",
                String::from_utf8_lossy(wrong)
            );
        }
        assert!(!t.admits(None));
        assert!(!format!("{t:?}").contains("s3cret"), "never printed");
    }

    #[test]
    fn at_the_cap_the_oldest_unanswered_connection_gives_way() {
        let mut slots = Slots::new(3);
        let a = slots.admit().unwrap();
        let b = slots.admit().unwrap();
        let c = slots.admit().unwrap();
        set(&a, ConnState::Busy);
        set(&b, ConnState::Idle);
        // c never sent a request: it goes first, though b is older.
        let d = slots.admit().unwrap();
        assert!(slots.live.iter().all(|s| !Arc::ptr_eq(s, &c)));
        // Then the oldest idle one (b), never the busy one (a).
        set(&d, ConnState::Busy);
        let e = slots.admit().unwrap();
        assert!(slots.live.iter().all(|s| !Arc::ptr_eq(s, &b)));
        set(&e, ConnState::Busy);
        // Everyone busy: the newcomer is refused.
        assert!(slots.admit().is_none());
        // A finished connection frees its place.
        a.done.store(true, Ordering::Release);
        assert!(slots.admit().is_some());
    }
}
