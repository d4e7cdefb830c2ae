//! The relay's memory stays on small pages.
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
