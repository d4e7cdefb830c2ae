//! A lock-free histogram with HdrHistogram's bucket layout (1 µs … 60 s, 2 significant
//! digits), recorded with one relaxed atomic add and turned into a real
//! [`hdrhistogram::Histogram`] when read.
//!
//! `hdrhistogram::Histogram` needs `&mut self` to record, which would put a lock (or a
//! per-thread publish step) on the data path. Instead each shard keeps an array of atomic
//! counters indexed exactly as HdrHistogram indexes its counts, so merging on scrape is a
//! lossless `record_n` per non-empty bucket.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;

/// Lowest recordable value, in microseconds.
pub const LOWEST_US: u64 = 1;
/// Highest recordable value, in microseconds (60 s); larger values are clamped.
pub const HIGHEST_US: u64 = 60_000_000;
/// Significant decimal digits kept: a recorded value reads back within 1/128 (0.8 %) of what
/// was recorded, 1 µs exact up to 256 µs. Three digits (0.1 %) would cost eight times the
/// counters: a burst of connections whose connect times span 20 µs … 20 ms made one worker
/// touch about 50 KiB of counters per histogram, against about 9 KiB with two — memory the
/// first idle connections paid for — and a busy rule's five histograms per worker could
/// grow to 680 KiB instead of 100 KiB. No reader of these figures needs the third digit.
pub const SIGFIG: u8 = 2;

// HdrHistogram's layout for (lowest = 1, sigfig = 2): 256 sub-buckets per bucket, the lower
// half of every bucket after the first overlapping the previous one.
const SUB_BUCKET_HALF_COUNT_MAGNITUDE: u32 = 7;
const SUB_BUCKET_HALF_COUNT: u64 = 1 << SUB_BUCKET_HALF_COUNT_MAGNITUDE;
const SUB_BUCKET_MASK: u64 = (SUB_BUCKET_HALF_COUNT << 1) - 1;
const LEADING_ZERO_COUNT_BASE: u32 = 64 - SUB_BUCKET_HALF_COUNT_MAGNITUDE - 1;
const BUCKET_COUNT: usize = bucket_count();
const COUNTS_LEN: usize = (BUCKET_COUNT + 1) << SUB_BUCKET_HALF_COUNT_MAGNITUDE;

const fn bucket_count() -> usize {
    let mut smallest_untrackable = SUB_BUCKET_HALF_COUNT << 1;
    let mut buckets = 1;
    while smallest_untrackable <= HIGHEST_US {
        smallest_untrackable <<= 1;
        buckets += 1;
    }
    buckets
}

fn index_of(value: u64) -> usize {
    let bucket = LEADING_ZERO_COUNT_BASE - (value | SUB_BUCKET_MASK).leading_zeros();
    let sub_bucket = value >> bucket;
    // The first bucket uses all sub-buckets; later ones only the upper half.
    (((bucket as u64 + 1) << SUB_BUCKET_HALF_COUNT_MAGNITUDE) + sub_bucket - SUB_BUCKET_HALF_COUNT)
        as usize
}

fn value_of(index: usize) -> u64 {
    let index = index as u64;
    let mut bucket = (index >> SUB_BUCKET_HALF_COUNT_MAGNITUDE) as i64 - 1;
    let mut sub_bucket = (index & (SUB_BUCKET_HALF_COUNT - 1)) + SUB_BUCKET_HALF_COUNT;
    if bucket < 0 {
        sub_bucket -= SUB_BUCKET_HALF_COUNT;
        bucket = 0;
    }
    sub_bucket << bucket
}

/// Counters per chunk: one half-bucket of HdrHistogram's layout (128 counters, 1 KiB).
const CHUNK_LEN: usize = 1 << SUB_BUCKET_HALF_COUNT_MAGNITUDE;
/// Chunks per histogram (20 for 1 µs … 60 s).
const CHUNKS: usize = COUNTS_LEN / CHUNK_LEN;

type Chunk = Box<[AtomicU64; CHUNK_LEN]>;

/// A histogram of durations that many threads may record into without locks.
///
/// Its counters (20 KiB in all) are allocated in 1-KiB chunks, one per half-bucket of the
/// layout, each on the first sample that lands in it. A histogram's samples cluster: every
/// rule has five of these per worker shard, and the upstream connect times of a rule, say,
/// land in a few chunks, where dense counters would cost 20 KiB the moment the first sample
/// arrives — at a worker's first connection, in the middle of serving. A rule that is never
/// used, or served by one worker only, costs the chunk table alone (320 B).
pub struct AtomicHistogram {
    chunks: [OnceLock<Chunk>; CHUNKS],
}

impl Default for AtomicHistogram {
    fn default() -> Self {
        Self::new()
    }
}

fn zeroed_chunk() -> Chunk {
    Box::new([const { AtomicU64::new(0) }; CHUNK_LEN])
}

impl AtomicHistogram {
    pub fn new() -> Self {
        Self {
            chunks: [const { OnceLock::new() }; CHUNKS],
        }
    }

    /// Records one duration (clamped to 1 µs … 60 s).
    #[inline]
    pub fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.record_micros(us);
    }

    /// Records one value in microseconds (clamped to 1 … 60 000 000).
    #[inline]
    pub fn record_micros(&self, us: u64) {
        let i = index_of(us.clamp(LOWEST_US, HIGHEST_US));
        let chunk = self.chunks[i / CHUNK_LEN].get_or_init(zeroed_chunk);
        chunk[i % CHUNK_LEN].fetch_add(1, Ordering::Relaxed);
    }

    /// Bytes of counters allocated so far (1 KiB per chunk in use).
    pub fn allocated_bytes(&self) -> usize {
        let chunks = self.chunks.iter().filter(|c| c.get().is_some()).count();
        chunks * CHUNK_LEN * std::mem::size_of::<AtomicU64>()
    }

    /// Adds this histogram's counts into an HdrHistogram (values in microseconds).
    pub fn merge_into(&self, out: &mut Histogram<u64>) {
        // Chunks never recorded into have nothing to add (and nothing is allocated for them).
        for (c, chunk) in self.chunks.iter().enumerate() {
            let Some(counts) = chunk.get() else { continue };
            for (j, n) in counts.iter().enumerate() {
                let n = n.load(Ordering::Relaxed);
                if n != 0 {
                    // Cannot fail: the value lies within the bounds `empty()` was made with.
                    let _ = out.record_n(value_of(c * CHUNK_LEN + j), n);
                }
            }
        }
    }

    /// An empty HdrHistogram with the bounds this type records with.
    pub fn empty() -> Histogram<u64> {
        Histogram::new_with_bounds(LOWEST_US, HIGHEST_US, SIGFIG).expect("static bounds are valid")
    }

    /// A merged snapshot of this histogram alone.
    pub fn snapshot(&self) -> Histogram<u64> {
        let mut h = Self::empty();
        self.merge_into(&mut h);
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_hdrhistogram() {
        let reference = AtomicHistogram::empty();
        assert_eq!(COUNTS_LEN, reference.distinct_values());
        for v in [
            1u64, 2, 127, 128, 255, 256, 257, 511, 512, 1023, 1024, 2047, 2048, 2049, 4095, 4096,
            100_000, 1_234_567, HIGHEST_US,
        ] {
            let i = index_of(v);
            assert_eq!(value_of(i), reference.lowest_equivalent(v), "value {v}");
            assert!(index_of(reference.highest_equivalent(v)) == i, "value {v}");
        }
    }

    #[test]
    fn merged_counts_and_quantiles_match_direct_recording() {
        let atomic = AtomicHistogram::new();
        let mut direct = AtomicHistogram::empty();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = 1 + x % HIGHEST_US;
            atomic.record_micros(v);
            direct.record(v).unwrap();
        }
        let merged = atomic.snapshot();
        assert_eq!(merged.len(), 10_000);
        for q in [0.5, 0.9, 0.99, 0.999, 1.0] {
            assert_eq!(
                merged.value_at_quantile(q),
                direct.value_at_quantile(q),
                "q {q}"
            );
        }
    }

    #[test]
    fn counters_are_allocated_only_where_samples_land() {
        let h = AtomicHistogram::new();
        assert_eq!(h.allocated_bytes(), 0, "nothing before the first sample");
        assert_eq!(CHUNKS * CHUNK_LEN, COUNTS_LEN);
        // Connect times of a loopback upstream, 20 … 200 µs: the first bucket's two halves.
        for us in [20, 150, 200] {
            h.record_micros(us);
        }
        assert_eq!(h.allocated_bytes(), 2 << 10);
        // 900 µs, 1.5 ms and 2 ms: the half-buckets 512–1023 and 1024–2047.
        for us in [900, 1_500, 2_000] {
            h.record_micros(us);
        }
        assert_eq!(h.allocated_bytes(), 4 << 10);
        // A session of 30 s adds one chunk; the first ones are not allocated again.
        h.record(Duration::from_secs(30));
        h.record_micros(40);
        assert_eq!(h.allocated_bytes(), 5 << 10);
        let s = h.snapshot();
        assert_eq!(s.len(), 8);
        assert_eq!(s.min(), 20);
        assert_eq!(
            s.highest_equivalent(s.max()),
            s.highest_equivalent(30_000_000)
        );
    }

    #[test]
    fn out_of_range_values_are_clamped() {
        let h = AtomicHistogram::new();
        h.record(Duration::ZERO);
        h.record(Duration::from_secs(3600));
        let s = h.snapshot();
        assert_eq!(s.len(), 2);
        assert_eq!(s.min(), 1);
        assert!(s.max() >= HIGHEST_US);
    }
}
