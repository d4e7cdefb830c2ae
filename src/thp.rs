//! The relay's memory stays on small pages, and what a burst of connections set up is
//! handed back once the burst is over ([`return_freed_memory`]).
//!
//! The allocator (mimalloc) asks for transparent huge pages on its arena (`MADV_HUGEPAGE`),
//! which a host with THP set to `madvise` (or `always`) honours: the arena then grows in
//! 2 MiB pages. A relay's memory is mostly per-connection state (the uring engine's
//! connection table, the tokio engine's tasks), touched a few hundred bytes at a time, so
//! huge pages buy it nothing but make its footprint move in 2 MiB steps: a thousand new
//! connections cost either nothing or a whole fresh 2 MiB page, depending on where the table
//! sits in its current page. The data path does not touch those pages in bulk (the uring
//! engine's buffer pool is its own mapping, which the allocator never advises, and the
//! kernel, not the relay, copies the bytes), and side-by-side runs showed no bulk cost (see
//! docs/BENCHMARKS.md, "Idle memory per connection, measured warm").

/// Turns transparent huge pages off for this process (`PR_SET_THP_DISABLE`): every mapping,
/// the allocator's arena included, is then faulted in 4 KiB pages. Children inherit it.
///
/// # Errors
/// The kernel refused (`prctl` filtered, or older than 3.15): memory then stays as the host's
/// THP setting has it, which changes how it is counted, not what the relay does.
pub fn refuse_huge_pages() -> nix::Result<()> {
    nix::sys::prctl::set_thp_disable(true)
}

/// Hands the calling thread's freed allocator pages back to the kernel now
/// (`mi_collect(true)`), rather than when the allocator next gets round to it.
///
/// A uring worker calls it from its timer tick after a burst of new connections has finished
/// setting up: their set-up state (about 160 B each, freed once a connection relays) was
/// spread over pages that the allocator otherwise keeps, idle, for as long as the worker
/// makes no further allocations — 50–100 KiB after 2 000 connections arrived at once. Costs
/// a walk of the thread's heap and a purge of the emptied pages (measured in a release build:
/// 37 µs after 2 000 set-ups freed, 0.2 ms after 100 000, 6–13 µs with nothing to return),
/// so callers rate-limit it.
#[allow(unsafe_code)]
pub fn return_freed_memory() {
    // SAFETY: `mi_collect` takes no pointers and only touches the calling thread's heap and
    // pages no live allocation uses; it is sound to call at any time, with or without
    // mimalloc as the global allocator (it then finds nothing to collect).
    unsafe { libmimalloc_sys::mi_collect(true) };
}

#[cfg(test)]
mod tests {
    /// Pages of `ptr`'s 4 KiB page that are resident (0 or 1), by `mincore`.
    #[allow(unsafe_code)]
    fn resident(ptr: *const u8) -> usize {
        let page = (ptr as usize) & !4095;
        let mut v = 0u8;
        // SAFETY: `page` is page-aligned, the length is one page, and `v` is a writable byte
        // that outlives the call; mincore only reports on the mapping, it does not touch it.
        let rc = unsafe { libc::mincore(page as *mut libc::c_void, 4096, &raw mut v) };
        if rc != 0 {
            return 0; // unmapped: not resident
        }
        usize::from(v & 1)
    }

    #[test]
    #[allow(unsafe_code)]
    fn freed_pages_go_back_to_the_kernel() {
        // A burst's set-up state on a fresh thread (its own allocator heap): 20 000 blocks of
        // 160 B, written, then freed. The allocator keeps their pages resident until asked.
        std::thread::spawn(|| {
            const N: usize = 20_000;
            let blocks: Vec<*mut u8> = (0..N)
                .map(|_| {
                    // SAFETY: a plain allocation of 160 bytes, checked for null, written
                    // within its size and freed once below.
                    unsafe {
                        let p = libmimalloc_sys::mi_malloc(160).cast::<u8>();
                        assert!(!p.is_null());
                        p.write_bytes(0xa5, 160);
                        p
                    }
                })
                .collect();
            let mut pages: Vec<usize> = blocks.iter().map(|p| *p as usize & !4095).collect();
            pages.dedup();
            for p in &blocks {
                // SAFETY: each block came from mi_malloc above and is freed exactly once.
                unsafe { libmimalloc_sys::mi_free(p.cast()) };
            }
            let held = pages
                .iter()
                .map(|p| resident(*p as *const u8))
                .sum::<usize>();
            super::return_freed_memory();
            let after = pages
                .iter()
                .map(|p| resident(*p as *const u8))
                .sum::<usize>();
            assert!(
                held > pages.len() / 2,
                "{held} of {} pages resident",
                pages.len()
            );
            assert!(
                after * 10 < held,
                "after return_freed_memory {after} of {held} pages still resident"
            );
        })
        .join()
        .unwrap();
    }
}
