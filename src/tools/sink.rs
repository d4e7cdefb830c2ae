//! `ringfwd sink`: the discard backend, and with `--send N` a byte source for download tests.
//!
//! Reads are discarded into one buffer per runtime thread (borrowed only between readiness
//! and `try_read`, never across an await), so a sink holding thousands of connections costs
//! no buffer memory per connection. With `--send N` every connection also receives exactly N
//! bytes, after which the sink shuts down its write side (`SHUT_WR`) while it keeps reading
//! until the client's end of stream. The bytes follow a fixed pattern, byte `i` being
//! [`pattern_byte`]`(i)`, so a test can check a relay delivered them intact and in order.

use std::cell::RefCell;
use std::io;
use std::sync::OnceLock;

use clap::Args;
use socket2::SockRef;
use tokio::net::TcpStream;

use super::ToolError;
use super::serve;
use crate::config::{self, ByteSize};

/// The send pattern repeats every 251 bytes (a prime, so it never lines up with buffer sizes).
pub const PATTERN_PERIOD: u64 = 251;

/// The `i`-th byte a sink sends on every connection.
pub fn pattern_byte(i: u64) -> u8 {
    (i % PATTERN_PERIOD) as u8
}

/// One write's worth of the pattern; a whole number of periods, so writing `chunk[k % len..]`
/// continues the pattern from offset `k`.
const CHUNK_LEN: usize = PATTERN_PERIOD as usize * 1024;
const DISCARD_LEN: usize = 256 << 10;

thread_local! {
    static DISCARD: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; DISCARD_LEN].into_boxed_slice());
}

fn chunk() -> &'static [u8] {
    static CHUNK: OnceLock<Box<[u8]>> = OnceLock::new();
    CHUNK.get_or_init(|| (0..CHUNK_LEN as u64).map(pattern_byte).collect())
}

#[derive(Debug, Args)]
pub struct SinkArgs {
    /// Address to listen on, e.g. 127.0.0.1:0 (port 0: the kernel picks one; it is printed
    /// as `listening addr=IP:PORT` on stdout).
    #[arg(long, value_name = "ADDR")]
    pub listen: String,
    /// Also send this many bytes to every connection (e.g. 1GiB), then shut down the write
    /// side.
    #[arg(long, value_name = "BYTES", value_parser = config::parse_size)]
    pub send: Option<ByteSize>,
    /// Runtime threads (1: a single-threaded runtime, lean enough to share a core).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: u16,
}

/// Runs the sink until the process is stopped.
///
/// # Errors
/// Bad listen address, bind failure, or the runtime could not start.
pub fn run(args: SinkArgs) -> Result<(), ToolError> {
    let rt = serve::runtime(usize::from(args.threads))?;
    let send = args.send.map(ByteSize::bytes);
    rt.block_on(async move {
        let (listener, bound) = serve::listen(&args.listen)?;
        tracing::debug!(addr = %bound, send, "sink listening");
        serve::accept_loop(listener, move |s| connection(s, send)).await;
        Ok(())
    })
}

async fn connection(stream: TcpStream, send: Option<u64>) {
    let source = async {
        match send {
            Some(n) => source(&stream, n).await,
            None => Ok(()),
        }
    };
    let (read, write) = tokio::join!(discard(&stream), source);
    if let Err(e) = read.and(write) {
        tracing::debug!(error = %e, "connection ended");
    }
}

/// Reads and drops everything until end of stream.
async fn discard(s: &TcpStream) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        s.readable().await?;
        match DISCARD.with_borrow_mut(|buf| s.try_read(buf)) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

/// Sends exactly `n` pattern bytes, then shuts down the write side (at once for `--send 0`).
async fn source(s: &TcpStream, n: u64) -> io::Result<()> {
    let chunk = chunk();
    let mut sent = 0u64;
    while sent < n {
        let at = (sent % CHUNK_LEN as u64) as usize;
        let end = (at as u64 + (n - sent)).min(CHUNK_LEN as u64) as usize;
        s.writable().await?;
        match s.try_write(&chunk[at..end]) {
            Ok(k) => sent += k as u64,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    SockRef::from(s).shutdown(std::net::Shutdown::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_continues_the_pattern_at_any_offset() {
        let c = chunk();
        assert_eq!(c.len() as u64 % PATTERN_PERIOD, 0);
        for k in [
            0u64,
            1,
            250,
            251,
            1000,
            CHUNK_LEN as u64 - 1,
            CHUNK_LEN as u64 + 7,
        ] {
            assert_eq!(
                c[(k % CHUNK_LEN as u64) as usize],
                pattern_byte(k),
                "offset {k}"
            );
        }
    }
}
