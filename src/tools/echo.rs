//! `ringfwd echo`: the echo backend of tests and benchmarks.
//!
//! Every byte received is sent back, in order, one write per read. End of stream from the
//! client is passed on as `shutdown(SHUT_WR)` once everything before it was echoed, so the
//! server is a correct far end for half-close tests. With `--max-frame` the stream is followed
//! as bench TLV frames ([`super::frame`]) while it is echoed: a header announcing a payload over
//! the maximum closes that connection (the frames before it are still answered); without it
//! the server is byte-transparent and never looks at the data. Either way echoing a frame
//! is how a bench request gets its answer.
//!
//! Each connection starts with a 4 KiB buffer and doubles it (up to 128 KiB) whenever a read
//! fills it, so thousands of idle connections cost little while bulk flows still move large
//! chunks per system call.

use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::ToolError;
use super::frame::{Codec, Scanner};
use super::serve;
use crate::config;

const MIN_BUF: usize = 4 << 10;
const MAX_BUF: usize = 128 << 10;

#[derive(Debug, Args)]
pub struct EchoArgs {
    /// Address to listen on, e.g. 127.0.0.1:0 or [::1]:0 (port 0: the kernel picks one;
    /// it is printed as `listening addr=IP:PORT` on stdout).
    #[arg(long, value_name = "ADDR")]
    pub listen: String,
    /// Follow the stream as bench TLV frames and close any connection whose frame announces
    /// a payload larger than this (e.g. 64KiB). Without it, bytes are echoed unexamined.
    #[arg(long, value_name = "BYTES", value_parser = parse_max_frame)]
    pub max_frame: Option<u32>,
    /// Runtime threads (1: a single-threaded runtime, lean enough to share a core).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: u16,
}

/// Parses a `--max-frame` size: a size with a unit that fits the frame's 32-bit length.
///
/// # Errors
/// A bad size, or one over 4 GiB − 1.
pub fn parse_max_frame(text: &str) -> Result<u32, String> {
    let size = config::parse_size(text)?;
    u32::try_from(size.bytes()).map_err(|_| {
        format!(
            "invalid frame size {text:?}: at most {} bytes (a frame length is 32 bits)",
            u32::MAX
        )
    })
}

/// Runs the echo server until the process is stopped.
///
/// # Errors
/// Bad listen address, bind failure, or the runtime could not start.
pub fn run(args: EchoArgs) -> Result<(), ToolError> {
    let rt = serve::runtime(usize::from(args.threads))?;
    rt.block_on(async move {
        let (listener, bound) = serve::listen(&args.listen)?;
        let codec = args.max_frame.map(Codec::new);
        tracing::debug!(addr = %bound, max_frame = ?args.max_frame, "echo listening");
        serve::accept_loop(listener, move |s| connection(s, codec.map(Scanner::new))).await;
        Ok(())
    })
}

async fn connection(mut stream: TcpStream, scanner: Option<Scanner>) {
    if let Err(e) = echo(&mut stream, scanner).await {
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        match e {
            End::Refused(e) => tracing::warn!(%peer, "closing connection: {e}"),
            End::Io(e) => tracing::debug!(%peer, error = %e, "connection ended"),
        }
    }
}

enum End {
    Refused(super::frame::FrameError),
    Io(std::io::Error),
}

impl From<std::io::Error> for End {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

/// Echoes until end of stream, then shuts down the write side.
async fn echo(s: &mut TcpStream, mut scanner: Option<Scanner>) -> Result<(), End> {
    let mut buf = vec![0u8; MIN_BUF];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            if let Some(Err(e)) = scanner.as_ref().map(Scanner::finish) {
                tracing::debug!("client ended mid-frame: {e}");
            }
            s.shutdown().await?;
            return Ok(());
        }
        if let Some(Err((valid, e))) = scanner.as_mut().map(|sc| sc.scan(&buf[..n])) {
            s.write_all(&buf[..valid]).await?;
            return Err(End::Refused(e));
        }
        s.write_all(&buf[..n]).await?;
        if n == buf.len() && buf.len() < MAX_BUF {
            buf.resize(buf.len() * 2, 0);
        }
    }
}
