//! Replays the fuzz corpus (`fuzz/corpus/<target>/*`) through the fuzz targets' own bodies
//! (`fuzz/src/targets.rs`) under plain `cargo test`, so every input the fuzzer was seeded with
//! or found stays checked on machines without AFL++ (see docs/RELIABILITY.md).

#[path = "../fuzz/src/targets.rs"]
mod targets;

use std::path::PathBuf;

/// Feeds every file of `fuzz/corpus/<target>/` to `run`; fails naming each file that panics.
fn replay(target: &str, run: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no corpus files in {}", dir.display());
    let failed: Vec<String> = files
        .iter()
        .filter(|path| {
            let data = std::fs::read(path).expect("read a corpus file");
            std::panic::catch_unwind(|| run(&data)).is_err()
        })
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} corpus files fail the {target} target: {failed:?}",
        failed.len(),
        files.len()
    );
}

#[test]
fn config_corpus_replays_clean() {
    replay("config", targets::config);
}

#[test]
fn frame_corpus_replays_clean() {
    replay("frame", targets::frame);
}
