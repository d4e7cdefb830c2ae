#!/usr/bin/env bash
# Bulk throughput with transparent huge pages allowed and refused, side by side: the same
# ringfwd binary started twice per engine, once plainly and once with THP disabled for the
# process (prctl(PR_SET_THP_DISABLE), set here by a wrapper and inherited across exec), each
# in front of one `ringfwd sink`; `ringfwd bench throughput --direction up -c 1` through each
# relay, rounds alternating the order. Prints Gbit/s and the relay's CPU seconds per GB.
#
#   scripts/thp_bulk.sh [BIN] [ROUNDS] [DURATION]
#
# Every process started here is stopped by pid. Load generator, sink and relays share the
# machine's cores: read the ratios.
set -euo pipefail
BIN=${1:-${CARGO_TARGET_DIR:-target}/release/ringfwd}
rounds=${2:-3}
duration=${3:-3s}
out=$(mktemp -d /tmp/thp-bulk.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "nothing on $1" >&2; exit 1; }
# Runs "$@" with THP disabled for the process (PR_SET_THP_DISABLE = 41); call it in a
# background subshell, which it replaces.
nothp() { exec python3 -c 'import ctypes,os,sys; assert ctypes.CDLL(None,use_errno=True).prctl(41,1,0,0,0)==0; os.execv(sys.argv[1],sys.argv[1:])' "$@"; }

sink_port=$(free_port)
"$BIN" sink --listen "127.0.0.1:$sink_port" >"$out/sink.log" 2>&1 & pids+=($!)
wait_port "$sink_port"
declare -A port pid
for engine in uring tokio; do
    for thp in on off; do
        v=$engine-thp-$thp p=$(free_port)
        args=(run --listen "127.0.0.1:$p" --upstream "127.0.0.1:$sink_port" --engine "$engine")
        if [[ $thp == off ]]; then nothp "$BIN" "${args[@]}" >"$out/$v.log" 2>&1 & else "$BIN" "${args[@]}" >"$out/$v.log" 2>&1 & fi
        pids+=($!); port[$v]=$p pid[$v]=$!
        wait_port "$p"
        grep -H THP_enabled "/proc/${pid[$v]}/status" | sed "s|/proc/[0-9]*/status|$v|"
    done
done
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
variants=(uring-thp-on uring-thp-off tokio-thp-on tokio-thp-off)
for r in $(seq "$rounds"); do
    order=("${variants[@]}")
    (( r % 2 == 0 )) && order=(tokio-thp-off tokio-thp-on uring-thp-off uring-thp-on)
    for v in "${order[@]}"; do
        t0=$(ticks "${pid[$v]}")
        "$BIN" bench throughput --direction up -c 1 -d "$duration" -q --format json --json "$out/$v.$r.json" "127.0.0.1:${port[$v]}" >/dev/null 2>"$out/$v.$r.err"
        t1=$(ticks "${pid[$v]}")
        python3 - "$out/$v.$r.json" "$v" "$r" "$((t1 - t0))" <<'PY'
import json, os, sys
d = json.load(open(sys.argv[1]))
def find(o, k):
    if isinstance(o, dict):
        for a, b in o.items():
            if a == k: return b
            x = find(b, k)
            if x is not None: return x
    return None
gbps, byts = find(d, "gbit_per_s"), find(d, "bytes")
cpu = int(sys.argv[4]) / os.sysconf("SC_CLK_TCK")
print(f"round {sys.argv[3]} {sys.argv[2]:14} {gbps:6.2f} Gbit/s  relay {cpu / (byts / 1e9):.3f} CPU-s/GB")
PY
    done
done | tee "$out/rounds.txt"
echo "medians of $rounds rounds:"
python3 - "$out/rounds.txt" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    f = line.split()
    rows.setdefault(f[2], []).append((float(f[3]), float(f[6])))
for v, xs in rows.items():
    print(f"  {v:14} {statistics.median(x[0] for x in xs):6.2f} Gbit/s  "
          f"{statistics.median(x[1] for x in xs):.3f} relay CPU-s/GB")
PY
