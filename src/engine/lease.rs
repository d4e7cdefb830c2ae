//! Copy buffers lent to a relay direction only while it has bytes to move (the tokio
//! engine's): an idle connection holds none.

use std::cell::RefCell;

/// Bytes read per direction before writing them on.
pub const BUFFER_SIZE: usize = 16 << 10;

/// A copy buffer lent to one direction while it moves bytes, from a small per-thread pool:
/// an idle connection holds none (it waits for readability first), and a flowing one keeps
/// its buffer across reads until the socket is drained. Returned to the pool of whichever
/// thread drops it (tasks move between threads); each pool keeps at most [`POOL_KEEP`].
pub struct Lease(Option<Box<[u8]>>);

/// Buffers a thread's pool keeps for reuse; more are freed.
const POOL_KEEP: usize = 64;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

impl Lease {
    pub fn take() -> Self {
        let b = POOL
            .with(|p| p.borrow_mut().pop())
            .unwrap_or_else(|| vec![0u8; BUFFER_SIZE].into_boxed_slice());
        Self(Some(b))
    }
}

impl std::ops::Deref for Lease {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0.as_deref().unwrap_or(&[])
    }
}

impl std::ops::DerefMut for Lease {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().unwrap_or(&mut [])
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            // `try_with`: a lease dropped while the thread itself is exiting is just freed.
            let _ = POOL.try_with(|p| {
                let mut p = p.borrow_mut();
                if p.len() < POOL_KEEP {
                    p.push(b);
                }
            });
        }
    }
}
