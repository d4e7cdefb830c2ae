//! The per-worker pipe pool of the splice path. Pipes are a limited resource: each costs two
//! fds, and past `fs.pipe-user-pages-soft` an unprivileged user's new pipes get one page.
//!
//! Pipes are created up front at the configured size. A direction leases one while it is on
//! the splice path and gives it back when it leaves it with the pipe empty; a pipe that still
//! holds bytes (its connection was reset mid-flight) is closed and replaced, never handed to
//! another connection. An empty pool is not an error: that direction stays on the copy path.

use std::os::fd::{AsFd, OwnedFd};

use nix::fcntl::{FcntlArg, OFlag, fcntl};

use super::splice::Pipe;

pub struct PipePool {
    free: Vec<Pipe>,
    size: usize,
    /// How many pipes this pool is meant to hold (it shrinks if replacements fail).
    target: usize,
    warned: bool,
}

/// Why pipes could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PipeError {
    #[error("cannot create a pipe: {0} (out of file descriptors? each pooled pipe costs 2)")]
    Create(nix::Error),
    #[error(
        "pipes are limited to {got} bytes instead of {want}: fs.pipe-user-pages-soft is exhausted for this user or fs.pipe-max-size is lower; raise them (sysctl) or lower [uring] pipes/pipe_size"
    )]
    Small { got: usize, want: usize },
}

/// Creates one non-blocking pipe of (at least) `size` bytes.
///
/// # Errors
/// [`PipeError`] when the pipe cannot be made or cannot be given its size.
pub fn make_pipe(size: usize) -> Result<Pipe, PipeError> {
    let (read, write): (OwnedFd, OwnedFd) =
        nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).map_err(PipeError::Create)?;
    let want = i32::try_from(size).unwrap_or(i32::MAX);
    // Raising past fs.pipe-max-size fails with EPERM for unprivileged users; keep what we get.
    let _ = fcntl(write.as_fd(), FcntlArg::F_SETPIPE_SZ(want));
    let got = fcntl(write.as_fd(), FcntlArg::F_GETPIPE_SZ).map_err(PipeError::Create)? as usize;
    if got < size.min(64 << 10) {
        // Past fs.pipe-user-pages-soft a pipe gets a single page: useless for bulk moves.
        return Err(PipeError::Small { got, want: size });
    }
    Ok(Pipe {
        read,
        write,
        capacity: got,
    })
}

impl PipePool {
    /// Creates up to `count` pipes of `size` bytes; stops early (with one warning) when the
    /// system says no, so the forwarder runs with fewer pipes rather than not at all.
    pub fn new(worker: usize, count: usize, size: usize) -> Self {
        let (pool, short) = Self::create(count, size);
        if let Some(e) = short {
            tracing::warn!(
                worker,
                created = pool.target,
                wanted = count,
                "{e}; the rest of the traffic uses the copy path"
            );
        }
        pool
    }

    /// Like [`PipePool::new`], but silent: says why it stopped short of `count`, so that the
    /// engine can report every worker's shortfall in one line.
    pub fn create(count: usize, size: usize) -> (Self, Option<PipeError>) {
        let mut free = Vec::with_capacity(count);
        let mut short = None;
        for _ in 0..count {
            match make_pipe(size) {
                Ok(p) => free.push(p),
                Err(e) => {
                    short = Some(e);
                    break;
                }
            }
        }
        let target = free.len();
        let warned = short.is_some();
        (
            Self {
                free,
                size,
                target,
                warned,
            },
            short,
        )
    }

    /// A pipe for a direction moving to the splice path, if one is free.
    pub fn lease(&mut self) -> Option<Pipe> {
        self.free.pop()
    }

    /// Takes a pipe back. `empty` must be true only if the direction's own count of bytes in
    /// the pipe is zero; otherwise the pipe is closed and a fresh one made in its place.
    pub fn give_back(&mut self, pipe: Pipe, empty: bool) {
        if empty {
            self.free.push(pipe);
            return;
        }
        drop(pipe);
        match make_pipe(self.size) {
            Ok(p) => self.free.push(p),
            Err(e) => {
                self.target -= 1;
                if !self.warned {
                    self.warned = true;
                    tracing::warn!("{e}; pipe pool shrinks to {}", self.target);
                }
            }
        }
    }

    pub fn available(&self) -> usize {
        self.free.len()
    }

    pub fn pipe_size(&self) -> usize {
        self.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipes_get_the_requested_size() {
        let p = make_pipe(256 << 10).unwrap();
        assert!(p.capacity >= 256 << 10);
    }

    #[test]
    fn a_pipe_with_bytes_is_replaced_not_reused() {
        let mut pool = PipePool::new(0, 1, 64 << 10);
        let p = pool.lease().unwrap();
        nix::unistd::write(&p.write, b"left over").unwrap();
        pool.give_back(p, false);
        let fresh = pool.lease().unwrap();
        let mut buf = [0u8; 16];
        // A fresh pipe is empty: reading would block instead of returning the old bytes.
        assert_eq!(
            nix::unistd::read(&fresh.read, &mut buf),
            Err(nix::Error::EAGAIN)
        );
    }

    #[test]
    fn an_empty_pool_says_none() {
        let mut pool = PipePool::new(0, 1, 64 << 10);
        assert!(pool.lease().is_some());
        assert!(pool.lease().is_none());
    }
}
