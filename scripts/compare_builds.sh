#!/usr/bin/env bash
# Two builds of ringfwd side by side on one engine: memory per idle connection and bulk
# throughput, alternating rounds so drift on a shared machine favours neither.
#
#   scripts/compare_builds.sh OLD_BIN NEW_BIN [--engine tokio] [--conns 5000] [--rounds 3]
#                             [--duration 4s] [--pin]
#
# For each build and round: an echo backend and a relay (the given engine) for
# `bench idle -c CONNS --pid RELAY` (RSS growth per idle connection), then a sink backend and
# a relay for `bench throughput --direction up` (Gbit/s). Prints per-round figures, the
# medians and NEW/OLD ratios. --pin runs the relay on CPU 1 and the backends and the load
# generator on CPU 0 (taskset): on a 2-core box, where the scheduler puts them otherwise makes
# bulk throughput bimodal. Everything binds 127.0.0.1; every process started here is
# stopped by pid. The load generator shares the machine's cores: read the ratios.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

[[ $# -ge 2 ]] || { sed -n '2,12p' "$0"; exit 2; }
OLD=$(realpath "$1") NEW=$(realpath "$2"); shift 2
engine=tokio conns=5000 rounds=3 duration=4s pin=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --engine) engine=$2; shift ;;
        --conns) conns=$2; shift ;;
        --rounds) rounds=$2; shift ;;
        --duration) duration=$2; shift ;;
        --pin) pin=1 ;;
        *) echo "compare_builds.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
# The bench client holds one end of each idle connection, the relay two, the backend one.
ulimit -n "$(ulimit -Hn)"
out=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$out"
}
trap cleanup EXIT

# Starts a command that prints "... addr=IP:PORT"; sets $pid and $addr.
start() {
    local log=$1; shift
    "$@" >"$log.out" 2>"$log.err" &
    pid=$! addr=""
    pids+=("$pid")
    for _ in $(seq 1 200); do
        addr=$(grep -m1 -o 'addr=[^ ]*' "$log.out" 2>/dev/null | cut -d= -f2 || true)
        [[ -n $addr ]] && return 0
        kill -0 "$pid" 2>/dev/null || { echo "exited: $* : $(tail -3 "$log.err")" >&2; exit 1; }
        sleep 0.05
    done
    echo "not ready: $*" >&2; exit 1
}
stop() { kill "$@" 2>/dev/null || true; wait "$@" 2>/dev/null || true; }
field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"; }

relay_cpu=() load_cpu=()
if [[ $pin == 1 ]]; then relay_cpu=(taskset -c 1) load_cpu=(taskset -c 0); fi

declare -A idle tput
for r in $(seq 1 "$rounds"); do
    order=(old new); (( r % 2 == 0 )) && order=(new old)
    for v in "${order[@]}"; do
        bin=$OLD; [[ $v == new ]] && bin=$NEW
        start "$out/echo" "${load_cpu[@]}" "$bin" echo --listen 127.0.0.1:0; echo_pid=$pid echo_addr=$addr
        start "$out/relay" "${relay_cpu[@]}" "$bin" run --listen 127.0.0.1:0 --upstream "$echo_addr" --engine "$engine"; relay_pid=$pid relay_addr=$addr
        "$bin" bench idle -c "$conns" --pid "$relay_pid" --settle 1s -q --format json --json "$out/idle.json" "$relay_addr" >/dev/null
        idle[$v]+="$(field "$out/idle.json" rss_per_conn_bytes) "
        stop "$relay_pid" "$echo_pid"
        start "$out/sink" "${load_cpu[@]}" "$bin" sink --listen 127.0.0.1:0; sink_pid=$pid sink_addr=$addr
        start "$out/relay" "${relay_cpu[@]}" "$bin" run --listen 127.0.0.1:0 --upstream "$sink_addr" --engine "$engine"; relay_pid=$pid relay_addr=$addr
        "${load_cpu[@]}" "$bin" bench throughput "$relay_addr" --direction up -d "$duration" --warmup 1s -q --format json --json "$out/tput.json" >/dev/null
        tput[$v]+="$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d.get("gbit_per_s", d.get("up_gbit_per_s")))' "$out/tput.json") "
        stop "$relay_pid" "$sink_pid"
        echo "round $r $v: idle B/conn: ${idle[$v]}  Gbit/s: ${tput[$v]}"
    done
done
python3 - "${idle[old]}" "${idle[new]}" "${tput[old]}" "${tput[new]}" <<'EOF'
import statistics as st, sys
io, inw, to, tn = ([float(x) for x in a.split()] for a in sys.argv[1:])
mi, mn, mto, mtn = st.median(io), st.median(inw), st.median(to), st.median(tn)
print(f"idle RSS per connection  old {mi:8.0f} B   new {mn:8.0f} B   new/old {mn/mi if mi else float('nan'):.2f}")
print(f"throughput (Gbit/s)      old {mto:8.2f}     new {mtn:8.2f}     new/old {mtn/mto:.3f}")
EOF
