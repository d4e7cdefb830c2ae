//! The per-worker buffer pool of the copy path: one anonymous mapping cut into equal
//! buffers, registered with the ring (`register_buffers`, so sends use `WRITE_FIXED` on
//! pre-pinned pages) and published as a provided-buffer ring (`register_buf_ring`, so a recv
//! takes a buffer only when data has arrived: an idle connection holds none).
//!
//! Ownership: a buffer is either in the provided ring (the kernel may pick it), or owned by
//! exactly one connection direction from the recv completion that selected it until the
//! completion of the last send from it, when [`BufPool::recycle`] gives it back. The mapping
//! outlives the ring: [`super::worker::Worker`] declares the ring before the pool so the ring
//! is dropped (and its registrations released) first.
#![allow(unsafe_code)]

use std::io;
use std::num::NonZeroUsize;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::IoUring;
use io_uring::types::BufRingEntry;
use nix::sys::mman::{MapFlags, ProtFlags, mmap_anonymous, munmap};

/// The buffer group id of the pool's provided ring.
pub const BUFFER_GROUP: u16 = 0;

/// Why the pool could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("cannot map {bytes} bytes for the buffer pool: {source}")]
    Map { bytes: usize, source: nix::Error },
    #[error("cannot register the provided-buffer ring (kernel 5.19+ needed): {0}")]
    BufRing(io::Error),
}

pub struct BufPool {
    mem: NonNull<u8>,
    mem_len: usize,
    buf_size: u32,
    count: u16,
    ring: NonNull<BufRingEntry>,
    ring_len: usize,
    mask: u16,
    tail: u16,
    registered: bool,
    /// Buffers published to the kernel and not yet taken by a recv.
    in_ring: u16,
}

impl BufPool {
    /// Maps `count` buffers of `buf_size` bytes, registers them and publishes them all.
    /// Registration failing for lack of locked memory is not fatal: the pool then works with
    /// plain sends and `registered()` is false (the caller logs why).
    ///
    /// # Errors
    /// The mapping or the provided-buffer ring could not be set up.
    pub fn new(
        ring: &IoUring,
        count: u16,
        buf_size: u32,
    ) -> Result<(Self, Option<io::Error>), PoolError> {
        Self::with_registration(ring, count, buf_size, true)
    }

    /// [`BufPool::new`], registering the buffers only if `register` (the engine leaves them
    /// unregistered when it knows the locked-memory limit cannot hold them).
    ///
    /// # Errors
    /// The mapping or the provided-buffer ring could not be set up.
    pub fn with_registration(
        ring: &IoUring,
        count: u16,
        buf_size: u32,
        register: bool,
    ) -> Result<(Self, Option<io::Error>), PoolError> {
        let count = count.clamp(1, 1 << 15);
        let mem_len = count as usize * buf_size as usize;
        let entries = count.next_power_of_two();
        let ring_len = (entries as usize * std::mem::size_of::<BufRingEntry>()).max(4096);
        let map = |len: usize| {
            // SAFETY: a fresh private anonymous mapping aliases nothing; it is unmapped only
            // in Drop, after the ring that references it is gone.
            unsafe {
                mmap_anonymous(
                    None,
                    NonZeroUsize::new(len).expect("non-zero"),
                    ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                    MapFlags::MAP_PRIVATE | MapFlags::MAP_POPULATE,
                )
            }
            .map(NonNull::cast::<u8>)
            .map_err(|source| PoolError::Map { bytes: len, source })
        };
        let mem = map(mem_len)?;
        let ring_mem = match map(ring_len) {
            Ok(r) => r,
            Err(e) => {
                // SAFETY: `mem` was mapped above with `mem_len` and nothing references it yet.
                let _ = unsafe { munmap(mem.cast(), mem_len) };
                return Err(e);
            }
        };
        let mut pool = BufPool {
            mem,
            mem_len,
            buf_size,
            count,
            ring: ring_mem.cast(),
            ring_len,
            mask: entries - 1,
            tail: 0,
            registered: false,
            in_ring: 0,
        };

        let iovecs: Vec<libc::iovec> = (0..count)
            .map(|i| libc::iovec {
                iov_base: pool.ptr(i).cast(),
                iov_len: buf_size as usize,
            })
            .collect();
        let reg_error = if register {
            // SAFETY: every iovec lies inside `mem`, which stays mapped until Drop, and Drop
            // runs after the ring (the owner of the registration) has been dropped.
            match unsafe { ring.submitter().register_buffers(&iovecs) } {
                Ok(()) => {
                    pool.registered = true;
                    None
                }
                Err(e) => Some(e),
            }
        } else {
            None
        };
        // SAFETY: the ring memory is page aligned, `entries` long, zeroed (so the tail starts
        // at 0), and stays mapped until Drop, after the ring is gone.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                ring_mem.as_ptr() as u64,
                entries,
                BUFFER_GROUP,
                0,
            )
        }
        .map_err(PoolError::BufRing)?;
        for bid in 0..count {
            pool.push(bid);
        }
        pool.publish();
        Ok((pool, reg_error))
    }

    /// Whether the buffers are registered (sends may use `WRITE_FIXED` with index = id).
    pub fn registered(&self) -> bool {
        self.registered
    }

    pub fn buf_size(&self) -> u32 {
        self.buf_size
    }

    pub fn count(&self) -> u16 {
        self.count
    }

    /// Address of buffer `bid`.
    pub fn ptr(&self, bid: u16) -> *mut u8 {
        assert!(bid < self.count, "buffer id {bid} out of range");
        // SAFETY: bid < count, so the offset stays inside the mapping.
        unsafe { self.mem.as_ptr().add(bid as usize * self.buf_size as usize) }
    }

    /// The first `len` bytes of buffer `bid`, which a recv filled.
    ///
    /// # Panics
    /// If `bid` is out of range or `len` exceeds the buffer size.
    pub fn filled(&self, bid: u16, len: u32) -> &[u8] {
        assert!(len <= self.buf_size, "length {len} beyond buffer size");
        // SAFETY: the range lies inside buffer `bid`; the caller owns the buffer (its recv
        // completed and it is not in the provided ring), and the only op that may be in
        // flight on it is a send, which reads it too.
        unsafe { std::slice::from_raw_parts(self.ptr(bid), len as usize) }
    }

    /// Gives buffer `bid` back to the kernel's ring. Call only once its owner's last op has
    /// completed.
    pub fn recycle(&mut self, bid: u16) {
        self.push(bid);
        self.publish();
    }

    /// A recv completion took a buffer out of the ring.
    pub fn taken(&mut self) {
        self.in_ring = self.in_ring.saturating_sub(1);
    }

    /// Buffers the kernel can pick right now.
    pub fn in_ring(&self) -> u16 {
        self.in_ring
    }

    fn push(&mut self, bid: u16) {
        let idx = (self.tail & self.mask) as usize;
        // SAFETY: idx <= mask < entries, inside the ring mapping. The kernel reads only the
        // entries before the published tail, and this one is past it until `publish`.
        let entry = unsafe { &mut *self.ring.as_ptr().add(idx) };
        entry.set_addr(self.ptr(bid) as u64);
        entry.set_len(self.buf_size);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        self.in_ring += 1;
    }

    fn publish(&self) {
        // SAFETY: the tail field of the first entry, inside the mapping, is shared with the
        // kernel; it is only ever accessed atomically, as the io_uring ABI requires.
        let tail = unsafe { &*(BufRingEntry::tail(self.ring.as_ptr()) as *const AtomicU16) };
        tail.store(self.tail, Ordering::Release);
    }
}

impl Drop for BufPool {
    fn drop(&mut self) {
        // SAFETY: both mappings were created in `new` with these lengths; the ring that
        // referenced them has been dropped already (field order in the worker).
        unsafe {
            let _ = munmap(self.mem.cast(), self.mem_len);
            let _ = munmap(self.ring.cast(), self.ring_len);
        }
    }
}
