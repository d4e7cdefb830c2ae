#!/usr/bin/env bash
# Builds the AFL++ fuzz targets (fuzz/) with cargo-afl and runs each for a bounded time.
#
#   scripts/fuzz.sh [--seconds N] [--target config|frame]...
#
# Needs cargo-afl (`cargo install cargo-afl`; it builds AFL++ on install) on the stable
# toolchain. Each target starts from fuzz/corpus/<target>/ and writes its findings to
# fuzz/out/<target>/ (not committed). The run happens in a network namespace of its own with
# only loopback (`unshare --net`, when permitted), so a config naming a host can never send a
# DNS query anywhere. Exits non-zero if any target recorded a crash or a hang; copy a crash
# into fuzz/corpus/<target>/ once it is fixed, so `cargo test` (tests/fuzz_corpus.rs) replays
# it for good.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

seconds=60
targets=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --seconds) seconds=$2; shift 2 ;;
        --target) targets+=("$2"); shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "fuzz.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
[[ ${#targets[@]} -gt 0 ]] || targets=(config frame)

if ! cargo afl --version >/dev/null 2>&1; then
    echo "fuzz.sh: cargo-afl is missing: cargo install cargo-afl" >&2
    exit 1
fi

export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$PWD/fuzz/target}
(cd fuzz && cargo afl build --release --bins)

# AFL++ refuses to start when core dumps go to a helper program or the CPU governor is not
# "performance"; these variables accept the host as it is instead of changing it.
export AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_SKIP_CPUFREQ=1 AFL_NO_UI=1 AFL_QUIET=1
export AFL_NO_AFFINITY=1

isolate=()
if unshare --net true 2>/dev/null; then
    isolate=(unshare --net)
fi

status=0
for t in "${targets[@]}"; do
    out=fuzz/out/$t
    rm -rf "$out"
    mkdir -p "$out"
    echo "=== fuzzing $t for ${seconds}s"
    "${isolate[@]}" cargo afl fuzz -V "$seconds" -i "fuzz/corpus/$t" -o "$out" \
        "$CARGO_TARGET_DIR/release/$t" >"$out/afl.log" 2>&1 || {
        echo "fuzz.sh: afl-fuzz failed for $t; last lines of $out/afl.log:" >&2
        tail -20 "$out/afl.log" >&2
        status=1
        continue
    }
    stats=$out/default/fuzzer_stats
    get() { awk -F': *' -v k="$1" '$1 ~ "^"k" *$" { print $2 }' "$stats"; }
    crashes=$(find "$out/default/crashes" -type f ! -name README.txt 2>/dev/null | wc -l)
    hangs=$(find "$out/default/hangs" -type f 2>/dev/null | wc -l)
    echo "$t: $(get execs_done) execs ($(get execs_per_sec)/s), corpus $(get corpus_count), \
edges $(get edges_found)/$(get total_edges), crashes $crashes, hangs $hangs"
    if [[ $crashes -gt 0 || $hangs -gt 0 ]]; then
        echo "fuzz.sh: $t found $crashes crash(es) and $hangs hang(s) in $out/default/" >&2
        status=1
    fi
done
exit $status
