//! What the two backends (`echo`, `sink`) share: binding, the `listening addr=...` line
//! scripts wait for, a lean tokio runtime, and an accept loop that survives fd exhaustion.
//!
//! The backends share two cores with the relay and the load generator during benchmarks, so
//! they default to a single-threaded runtime: one core's worth of copying is far more than a
//! loopback relay can feed them, and a second thread would only steal the relay's CPU.

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};

use super::ToolError;
use crate::{config, net};

/// Builds the runtime: current-thread for 1, multi-thread with `threads` workers otherwise.
///
/// # Errors
/// The runtime could not start (out of fds or threads).
pub fn runtime(threads: usize) -> Result<tokio::runtime::Runtime, ToolError> {
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    rt.map_err(|e| format!("cannot start the runtime: {e}").into())
}

/// Resolves and binds `text`, then prints `listening addr=IP:PORT` on stdout (flushed), the
/// line scripts and tests read the port from. Call inside the runtime.
///
/// # Errors
/// An ill-formed or unresolvable address, or a bind failure, worded for the operator.
pub fn listen(text: &str) -> Result<(TcpListener, SocketAddr), ToolError> {
    let addr = config::resolve_one(text).map_err(|m| format!("--listen: {m}"))?;
    let std_listener = net::bind_listener(addr, false)?;
    std_listener.set_nonblocking(true)?;
    let bound = std_listener.local_addr()?;
    let listener = TcpListener::from_std(std_listener)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening addr={bound}")?;
    out.flush()?;
    Ok((listener, bound))
}

/// Accepts forever, spawning `handle` for every connection (with `TCP_NODELAY` set: the
/// backends answer small frames and must not wait on Nagle). Out of fds: pause and retry.
pub async fn accept_loop<F, Fut>(listener: TcpListener, handle: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(handle(stream));
            }
            Err(e) if net::is_resource_exhaustion(&e) => {
                tracing::warn!(error = %e, "accept: out of resources, pausing");
                tokio::time::sleep(net::ACCEPT_BACKOFF).await;
            }
            Err(e) if net::is_transient_accept_error(&e) => {}
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(net::ACCEPT_BACKOFF).await;
            }
        }
    }
}
