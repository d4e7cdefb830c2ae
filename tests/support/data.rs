//! Test payloads: seeded pseudo-random bytes written in seeded, uneven chunk sizes, and the
//! SHA-256 of what was sent or received, so bulk transfers are checked byte-exact without
//! keeping them in memory and a failure reproduces from its seed.

use std::io::{self, Read, Write};
use std::net::TcpStream;

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use sha2::{Digest, Sha256};

/// A SHA-256 digest.
pub type Hash = Vec<u8>;

/// Largest single `write` a payload sender makes.
const MAX_CHUNK: usize = 64 << 10;

/// Writes `len` seeded random bytes to `w` in random chunk sizes (1 byte to 64 KiB, so reads
/// and writes on the relay never line up with its buffers); returns the hash of what was sent.
///
/// # Panics
/// A write failed or stalled for the stream's timeout.
pub fn send_payload(w: &mut TcpStream, seed: u64, len: usize) -> Hash {
    let mut bytes = StdRng::seed_from_u64(seed);
    let mut sizes = StdRng::seed_from_u64(seed ^ 0x5eed_c0de);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; MAX_CHUNK];
    let mut left = len;
    while left > 0 {
        let n = sizes.gen_range(1..=MAX_CHUNK).min(left);
        bytes.fill_bytes(&mut buf[..n]);
        hash.update(&buf[..n]);
        w.write_all(&buf[..n]).unwrap_or_else(|e| {
            panic!(
                "sending payload (seed {seed}, {} of {len} sent): {e}",
                len - left
            )
        });
        left -= n;
    }
    hash.finalize().to_vec()
}

/// An endless seeded byte stream for writers that send "as much as the peer accepts".
pub struct Stream {
    rng: StdRng,
    buf: Vec<u8>,
    /// Bytes of `buf` already handed out.
    used: usize,
    hash: Sha256,
    /// Bytes accepted by the writer so far.
    pub accepted: u64,
}

impl Stream {
    pub fn new(seed: u64, chunk: usize) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            buf: vec![0u8; chunk],
            used: chunk,
            hash: Sha256::new(),
            accepted: 0,
        }
    }

    /// One `write` of the next pending bytes; returns what `write` returned. Accepted bytes
    /// are hashed; refused ones are offered again by the next call.
    ///
    /// # Errors
    /// The `write` error (a timeout means the peer's window is closed).
    pub fn write_once(&mut self, w: &mut TcpStream) -> io::Result<usize> {
        if self.used == self.buf.len() {
            self.rng.fill_bytes(&mut self.buf);
            self.used = 0;
        }
        let n = w.write(&self.buf[self.used..])?;
        self.hash.update(&self.buf[self.used..self.used + n]);
        self.used += n;
        self.accepted += n as u64;
        Ok(n)
    }

    /// The hash of every accepted byte.
    pub fn finish(self) -> Hash {
        self.hash.finalize().to_vec()
    }
}

/// Reads `r` to a clean EOF; returns the byte count and hash of what arrived.
///
/// # Panics
/// The stream was reset, failed or stalled for its timeout.
pub fn hash_to_eof(r: &mut TcpStream) -> (u64, Hash) {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0u64;
    loop {
        match r.read(&mut buf) {
            Ok(0) => return (total, hash.finalize().to_vec()),
            Ok(n) => {
                hash.update(&buf[..n]);
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("receiving payload after {total} bytes: {e}"),
        }
    }
}

/// Seeded random bytes, for small messages.
pub fn bytes(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}
