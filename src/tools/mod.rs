//! Network tools shipped in the same binary: the backends the tests and benchmarks forward
//! to, TCP ping, the load generator, the stats viewer and the member API's client.
//!
//! `echo` and `sink` share their listener and runtime set-up ([`serve`]); `echo` and `bench`
//! share the TLV frame ([`frame`]). Usage of each tool is in `docs/TOOLS.md`.

pub mod bench;
pub mod echo;
pub mod frame;
pub mod ping;
pub mod serve;
pub mod sink;
pub mod stats;
pub mod upstream;

/// A tool's failure, printed as one line by `main`.
pub type ToolError = Box<dyn std::error::Error + Send + Sync>;

/// An HTTP/1 connection to a forwarder's admin endpoint (for `stats` and `upstream`): the
/// request sender and the task that drives the connection, which the caller aborts once it
/// has the answer.
pub(crate) async fn admin_connect(
    addr: std::net::SocketAddr,
) -> Result<
    (
        hyper::client::conn::http1::SendRequest<http_body_util::Empty<hyper::body::Bytes>>,
        tokio::task::JoinHandle<Result<(), hyper::Error>>,
    ),
    ToolError,
> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot reach the admin endpoint at {addr}: {e} (is the forwarder running with admin = \"{addr}\"?)"))?;
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    Ok((sender, tokio::spawn(conn)))
}
