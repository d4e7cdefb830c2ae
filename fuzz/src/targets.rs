//! The fuzz targets' bodies, shared by the AFL binaries (`src/bin/*.rs`) and the corpus
//! replay test of the main crate (`tests/fuzz_corpus.rs`), so a corpus file that once found a
//! bug is replayed by `cargo test` against exactly the same checks.
//!
//! Each function takes arbitrary bytes and panics only when an invariant breaks.
#![allow(dead_code)] // Each binary uses one target.

use ringfwd::config::Config;
use ringfwd::tools::frame::{Codec, FrameError, HEADER_LEN, Scanner};

/// The config parser must not panic on any text, and a configuration it accepts must come
/// back unchanged through what `ringfwd check` prints (`Config::to_toml`).
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = Config::parse("fuzz.toml", text) else {
        return;
    };
    let printed = cfg.to_toml();
    let again = Config::parse("printed.toml", &printed).unwrap_or_else(|e| {
        panic!("`check` printed a config that does not parse: {e}\n--- input\n{text}\n--- printed\n{printed}")
    });
    assert_eq!(
        again.to_toml(),
        printed,
        "printing a printed config changed it\n--- input\n{text}"
    );
}

/// The frame codec: the first byte picks a small maximum payload (so both the accepting and
/// the refusing paths are reached), the rest is a byte stream. Decoding frame by frame and
/// scanning the same stream in uneven chunks must agree on where it is refused, every decoded
/// frame must re-encode to exactly its bytes, and a stream that ends inside a frame must be
/// reported as truncated.
pub fn frame(data: &[u8]) {
    let Some((&m, stream)) = data.split_first() else {
        return;
    };
    let max = u32::from(m) * 3;
    let codec = Codec::new(max);
    // 1. Frame by frame.
    let mut off = 0;
    let mut refused = false;
    loop {
        match codec.decode(&stream[off..]) {
            Ok(Some((f, used))) => {
                assert_eq!(used, HEADER_LEN + f.payload.len());
                assert!(f.payload.len() <= max as usize);
                let mut again = Vec::new();
                codec
                    .encode(f.kind, f.payload, &mut again)
                    .expect("a decoded frame re-encodes");
                assert_eq!(
                    again,
                    &stream[off..off + used],
                    "re-encoding changed a frame"
                );
                off += used;
            }
            Ok(None) => break,
            Err(FrameError::TooLarge { len, max: m2 }) => {
                assert!(
                    len > u64::from(max) && m2 == max,
                    "refused {len} under max {max}"
                );
                refused = true;
                break;
            }
            Err(e) => panic!("decode of a buffer failed with {e}"),
        }
    }
    // 2. The scanner over the same stream, in chunks of 1..=21 bytes taken from the data.
    let mut scanner = Scanner::new(codec);
    let mut pos = 0;
    let mut scan_refused = false;
    let mut k = 0;
    while pos < stream.len() {
        let step = 1 + usize::from(stream[k % stream.len()] % 7) * (k % 3 + 1);
        k += 1;
        let end = (pos + step).min(stream.len());
        match scanner.scan(&stream[pos..end]) {
            Ok(()) => pos = end,
            Err((before, FrameError::TooLarge { .. })) => {
                assert!(before <= end - pos);
                scan_refused = true;
                break;
            }
            Err((_, e)) => panic!("scan failed with {e}"),
        }
    }
    assert_eq!(
        scan_refused, refused,
        "decoder and scanner disagree on refusing"
    );
    if !refused {
        assert_eq!(
            scanner.finish().is_ok(),
            off == stream.len(),
            "a stream ending inside a frame must be truncated, and only then"
        );
    }
}
