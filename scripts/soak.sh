#!/usr/bin/env bash
# Soak: mixed traffic through every engine for N minutes, with the upstream killed and
# restarted now and then; asserts zero lost or corrupted bytes, zero leaked fds and flat RSS,
# and writes a summary.
#
#   scripts/soak.sh [--minutes N] [--out FILE]
#
# One forwarder per engine/data path (std, tokio, uring copy, splice, auto), all in front of one
# `ringfwd echo`. Each cycle, for each forwarder in turn: `bench rr` (request/response, echoed
# frames checked), `bench connect` (churn), `bench throughput --direction both` (bulk), and a
# byte-exact check (a seeded 16 MiB stream each way on 4 connections, SHA-256 both ways).
# Between cycles the echo backend is killed: a client through each forwarder must then be
# closed promptly (not hang), and the backend is restarted on the same port.
# Figures go to --out (default results/soak-<time>.txt). Loopback only; bounded in time.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

minutes=10
out=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --minutes) minutes=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "soak.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
mkdir -p results
out=${out:-results/soak-$(date -u +%Y%m%dT%H%M%SZ).txt}
hard=$(ulimit -Hn); [[ $hard == unlimited ]] && hard=$(cat /proc/sys/fs/nr_open)
ulimit -n "$hard"

echo "building release"
cargo build --release --quiet
bin=${CARGO_TARGET_DIR:-$PWD/target}/release/ringfwd
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    [[ -n ${echo_pid:-} ]] && kill "$echo_pid" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# Waits for "PREFIX...addr=IP:PORT" in FILE and prints IP:PORT.
addr_from() {
    local file=$1 prefix=$2
    for _ in $(seq 100); do
        local a
        a=$(grep -m1 "^$prefix" "$file" 2>/dev/null | sed -E 's/.*addr=([^ ]+).*/\1/') || true
        [[ -n $a ]] && { echo "$a"; return; }
        sleep 0.1
    done
    echo "soak.sh: no '$prefix' line in $file" >&2; cat "$file" >&2; exit 1
}

start_echo() {
    "$bin" echo --listen "$1" >"$work/echo.out" 2>/dev/null &
    echo_pid=$!
    echo_addr=$(addr_from "$work/echo.out" "listening")
}
start_echo 127.0.0.1:0

names=(std tokio uring-copy uring-splice uring-auto)
flags=("--engine std" "--engine tokio" "--engine uring --mode copy" "--engine uring --mode splice"
       "--engine uring --mode auto")
declare -A relay_addr relay_pid
for i in "${!names[@]}"; do
    n=${names[$i]}
    # shellcheck disable=SC2086
    RUST_LOG=warn "$bin" run --listen 127.0.0.1:0 --upstream "$echo_addr" --connect-timeout 1s \
        ${flags[$i]} >"$work/$n.out" 2>"$work/$n.err" &
    relay_pid[$n]=$!
    pids+=("$!")
    relay_addr[$n]=$(addr_from "$work/$n.out" "listening")
done

fds() { ls "/proc/$1/fd" | wc -l; }
rss_kib() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }

# Byte-exact check: CONNS connections each send LEN seeded bytes and read them back; prints
# "bytes_ok" or exits non-zero naming the connection that lost or changed bytes.
verify() {
    python3 - "$1" 4 $((16 << 20)) <<'PY'
import hashlib, random, socket, sys, threading
host, port = sys.argv[1].rsplit(":", 1)
conns, length = int(sys.argv[2]), int(sys.argv[3])
bad = []
def one(i):
    s = socket.create_connection((host, int(port)), timeout=15)
    rng = random.Random(i)
    data = rng.randbytes(length)
    sent = hashlib.sha256(data).hexdigest()
    def writer():
        s.sendall(data); s.shutdown(socket.SHUT_WR)
    t = threading.Thread(target=writer); t.start()
    h, n = hashlib.sha256(), 0
    while True:
        b = s.recv(1 << 16)
        if not b: break
        h.update(b); n += len(b)
    t.join(); s.close()
    if n != length or h.hexdigest() != sent:
        bad.append(f"conn {i}: got {n} of {length} bytes, hash {'ok' if h.hexdigest() == sent else 'MISMATCH'}")
ts = [threading.Thread(target=one, args=(i,)) for i in range(conns)]
[t.start() for t in ts]; [t.join() for t in ts]
if bad: print("\n".join(bad)); sys.exit(1)
print(conns * length * 2)
PY
}

# Runs one bench mode; prints its JSON; fails if it reported errors.
bench() {
    local json=$work/bench.json
    "$bin" bench "$@" -q --format json --json "$json" >/dev/null
    python3 -c "import json,sys; r=json.load(open('$json')); print(r.get('errors',0), r.get('requests', r.get('connects', r.get('bytes_up', 0))), r.get('bytes_down', 0))"
}

declare -A fds0 rss0 rss_max
for n in "${names[@]}"; do
    verify "${relay_addr[$n]}" >/dev/null   # warm-up
    sleep 0.5
    fds0[$n]=$(fds "${relay_pid[$n]}")
    rss0[$n]=$(rss_kib "${relay_pid[$n]}")
    rss_max[$n]=${rss0[$n]}
done

deadline=$(( $(date +%s) + minutes * 60 ))
cycles=0 outages=0 verified_bytes=0 requests=0 connects=0 bulk_bytes=0 errors=0 lost=0
while (( $(date +%s) < deadline )); do
    cycles=$((cycles + 1))
    for n in "${names[@]}"; do
        a=${relay_addr[$n]}
        read -r e r _ < <(bench rr "$a" -c 8 -d 2s); errors=$((errors + e)); requests=$((requests + r))
        read -r e c _ < <(bench connect "$a" -c 2 -d 2s); errors=$((errors + e)); connects=$((connects + c))
        read -r e up down < <(bench throughput "$a" --direction both -c 4 -d 2s)
        errors=$((errors + e)); bulk_bytes=$((bulk_bytes + up + down))
        if v=$(verify "$a"); then verified_bytes=$((verified_bytes + v)); else
            echo "LOST/CORRUPTED through $n: $v" >&2; lost=$((lost + 1)); fi
        r=$(rss_kib "${relay_pid[$n]}"); (( r > rss_max[$n] )) && rss_max[$n]=$r
        (( $(date +%s) < deadline )) || break
    done
    # A faulty upstream: kill the backend; every forwarder must close a client promptly.
    kill "$echo_pid"; wait "$echo_pid" 2>/dev/null || true
    outages=$((outages + 1))
    for n in "${names[@]}"; do
        python3 - "${relay_addr[$n]}" "$n" <<'PY' || { echo "outage: $n kept a client open" >&2; lost=$((lost + 1)); }
import socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
t = time.time()
try:
    s = socket.create_connection((host, int(port)), timeout=5)
    s.settimeout(5)
    s.sendall(b"x")
    assert s.recv(1) == b""
except (ConnectionResetError, BrokenPipeError):
    pass
if time.time() - t > 3:
    sys.exit(f"{sys.argv[2]}: closed after {time.time() - t:.1f}s")
PY
    done
    start_echo "$echo_addr"
done

# Let the last connections close, then compare descriptors and memory.
sleep 2
leaks=0
report=$(
    echo "soak: $minutes min, $cycles cycles, $outages upstream outages, $(date -u +%FT%TZ)"
    echo "requests (rr, frames checked): $requests; connect cycles: $connects; bulk bytes: $bulk_bytes"
    echo "byte-exact verified: $verified_bytes bytes; lost or corrupted: $lost; bench errors: $errors"
    for n in "${names[@]}"; do
        f=$(fds "${relay_pid[$n]}"); r=$(rss_kib "${relay_pid[$n]}")
        [[ $f -le ${fds0[$n]} ]] || leaks=$((leaks + 1))
        echo "$n: fds ${fds0[$n]} -> $f; RSS ${rss0[$n]} -> max ${rss_max[$n]} -> end $r KiB"
    done
)
echo "$report" | tee "$out"
flat=1
for n in "${names[@]}"; do
    (( rss_max[$n] <= rss0[$n] + 65536 )) || flat=0
done
echo "fd leaks: $leaks; RSS flat (max <= start + 64 MiB): $([[ $flat == 1 ]] && echo yes || echo NO)" | tee -a "$out"
[[ $lost == 0 && $leaks == 0 && $flat == 1 ]]
