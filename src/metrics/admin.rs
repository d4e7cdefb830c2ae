//! The admin HTTP listener: `/metrics` (OpenMetrics text), `/healthz`, `/stats` (JSON for
//! `ringfwd stats`), `/upstreams` (every pool member's state, JSON) and `/histograms` (one merged HDR histogram, V2 + DEFLATE, base64).
//!
//! It runs on a thread of its own with a current-thread tokio runtime and hyper's HTTP/1
//! server, so a scrape never runs on an engine's worker and an engine never waits for a
//! scrape: the only shared state is the shards' relaxed atomics. The socket is bound before
//! the thread starts, so "address in use" is reported at start-up and the bound address
//! (port 0 resolved) is known to the caller.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use hdrhistogram::serialization::{Serializer, V2DeflateSerializer};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::sync::Semaphore;

use super::report::StatsReport;
use super::upstreams::UpstreamsReport;
use super::{HistogramKind, Metrics, prom};

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 64;
/// A client that has not sent its request headers by then is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

struct State {
    metrics: Arc<Metrics>,
    registry: Registry,
}

/// Binds `addr` and serves the admin endpoints on a new thread until the process exits.
/// Returns the bound address (with port 0 resolved).
///
/// # Errors
/// The address cannot be bound, or the thread or its runtime cannot start.
pub fn spawn(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(addr)?;
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

async fn serve(listener: std::net::TcpListener, state: Arc<State>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "admin listener cannot be registered; admin endpoints are off");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(crate::net::ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, &req)) }
            });
            let _ = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(permit);
        });
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

fn route(state: &State, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here\n");
        r.headers_mut()
            .insert(hyper::header::ALLOW, HeaderValue::from_static("GET"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => respond(
            StatusCode::OK,
            prom::CONTENT_TYPE,
            prom::render(&state.registry),
        ),
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/stats" => match serde_json::to_vec(&StatsReport::collect(&state.metrics)) {
            Ok(json) => respond(StatusCode::OK, "application/json", json),
            Err(e) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode stats: {e}\n"),
            ),
        },
        "/histograms" => histogram(&state.metrics, req.uri().query().unwrap_or("")),
        "/upstreams" => match state.metrics.runtime().map(|rt| UpstreamsReport::collect(rt)) {
            Some(report) => match serde_json::to_vec(&report) {
                Ok(json) => respond(StatusCode::OK, "application/json", json),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot encode upstreams: {e}\n"),
                ),
            },
            None => text(StatusCode::SERVICE_UNAVAILABLE, "no rules are running yet\n"),
        },
        other => text(
            StatusCode::NOT_FOUND,
            format!(
                "no such endpoint {other:?}: try /metrics, /healthz, /stats, /upstreams or /histograms?rule=R&metric=M\n"
            ),
        ),
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
