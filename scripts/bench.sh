#!/usr/bin/env bash
# Side-by-side benchmark: the same workloads direct (no relay), through every ringfwd engine and
# data path, and (with --peers) through HAProxy, nginx stream and socat when installed.
#
#   scripts/bench.sh [--quick] [--rounds N] [--duration D] [--workers N] [--peers]
#                    [--metrics-cost] [--only "direct uring-copy ..."] [--workloads "bulk1 rr64"]
#                    [--setsid] [--uring "key = value; ..."] [--out DIR]
#
# --setsid starts every relay in a session of its own, as a service manager would (the
# round trip of `rr1`, one 64-byte ping-pong connection, depends on where the scheduler puts
# a relay relative to its peers, and a relay started from the benchmarking shell is placed
# next to them). --uring adds keys to the [uring] table of every ringfwd relay, e.g.
# --uring "auto_up_reads = 2; auto_down_pumps = 16" (scripts/sweep_auto.sh uses it).
# Two more variants start only when --only names them: uring-unpinned (pin = false) and
# uring-busypoll (busy_poll = "50us"), the latency settings of docs/TUNING.md.
#
# --metrics-cost adds uring-auto-nometrics and tokio-nometrics: the same engines built with
# the bench-no-metrics feature (no recording on the data path), to measure what metrics cost.
#
# Every variant runs in every round; the order alternates between rounds (rotated, and
# reversed on odd rounds) so drift on a shared machine does not favour one variant. The report
# (scripts/bench_report.py) takes medians over rounds and prints ratios against the direct
# connection and against the tokio engine, plus the relay's CPU seconds per GB moved.
#
# Load generator, backends and relay share this machine's cores: read the ratios, not the
# absolute figures. Everything binds 127.0.0.1; every process started here is stopped by pid.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

args_given="$*"
quick=0 rounds="" duration="" workers=1 peers=0 only="" out="" warmup=1s metrics_cost=0 workloads_given="" setsid=() uring_extra=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --quick) quick=1 ;;
        --rounds) rounds=$2; shift ;;
        --duration) duration=$2; shift ;;
        --workers) workers=$2; shift ;;
        --peers) peers=1 ;;
        --metrics-cost) metrics_cost=1 ;;
        --workloads) workloads_given=$2; shift ;;
        --only) only=$2; shift ;;
        --setsid) setsid=(setsid) ;;
        --uring) uring_extra=$2; shift ;;
        --out) out=$2; shift ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "bench.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [[ $quick == 1 ]]; then
    rounds=${rounds:-2} duration=${duration:-3s}
    workloads=(bulk1 rr64 connect)
    idle_conns=2000
else
    rounds=${rounds:-3} duration=${duration:-8s}
    workloads=(bulk1 bulk1_down bulk8 rr64 rr64_open rr16k connect)
    idle_conns=2000
fi
[[ -n $workloads_given ]] && read -r -a workloads <<<"$workloads_given"
stamp=$(date -u +%Y%m%d-%H%M%S)
out=${out:-results/$stamp}
mkdir -p "$out/runs"
out=$(cd "$out" && pwd)

echo "== building release"
cargo build --release --quiet
# Where cargo put it: CARGO_TARGET_DIR when set (a worktree sharing a target directory).
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
BIN=$target_dir/release/ringfwd
NOMETRICS_BIN=$BIN
if [[ $metrics_cost == 1 ]]; then
    echo "== building release without metrics recording (bench-no-metrics)"
    cargo build --release --quiet --features bench-no-metrics --target-dir "$target_dir/nometrics"
    NOMETRICS_BIN=$target_dir/nometrics/release/ringfwd
fi

pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

# Starts a command that prints "... addr=IP:PORT" on stdout; echoes "pid addr".
start_listening() {
    local log=$1; shift
    "$@" >"$log.out" 2>"$log.err" &
    local pid=$! addr=""
    for _ in $(seq 1 200); do
        addr=$(grep -m1 -o 'addr=[^ ]*' "$log.out" 2>/dev/null | cut -d= -f2 || true)
        [[ -n $addr ]] && break
        kill -0 "$pid" 2>/dev/null || { echo "bench.sh: $* exited: $(tail -3 "$log.err")" >&2; exit 1; }
        sleep 0.05
    done
    [[ -n $addr ]] || { echo "bench.sh: $* never became ready" >&2; exit 1; }
    echo "$pid $addr"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

cpu_ticks() { # utime+stime (+ reaped children's, for forking relays) of every pid given, in clock ticks
    local t=0 p
    for p in "$@"; do
        [[ -r /proc/$p/stat ]] || continue
        # Fields after the ")" of the command name: utime is the 12th, cutime+cstime the 14th/15th.
        t=$((t + $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12 + $13 + $14 + $15}')))
    done
    echo "$t"
}

{
    echo "date: $(date -u +%FT%TZ)"
    echo "kernel: $(uname -srm)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //') x $(nproc)"
    echo "memory: $(free -g | awk '/Mem:/{print $2}') GiB"
    echo "rustc: $(rustc -V)"
    echo "ringfwd: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "command: scripts/bench.sh $args_given"
    echo "rounds: $rounds, duration: $duration, relay workers: $workers"
    echo "note: load generator, backends and relay share these cores; compare ratios"
} >"$out/machine.txt"
cat "$out/machine.txt"

echo "== backends"
read -r echo_pid echo_addr < <(start_listening "$out/echo" "$BIN" echo --listen 127.0.0.1:0)
pids+=("$echo_pid")
read -r sink_pid sink_addr < <(start_listening "$out/sink" "$BIN" sink --listen 127.0.0.1:0)
pids+=("$sink_pid")
read -r src_pid src_addr < <(start_listening "$out/source" "$BIN" sink --listen 127.0.0.1:0 --send 10000GiB)
pids+=("$src_pid")
echo "echo $echo_addr, sink $sink_addr, source $src_addr"

# A relay variant: its pids and the three addresses it forwards from (echo, sink, source).
declare -A relay_pids relay_echo relay_sink relay_src
variants=(direct)
relay_pids[direct]=""
relay_echo[direct]=$echo_addr relay_sink[direct]=$sink_addr relay_src[direct]=$src_addr

uring_lines=${uring_extra//; /$'\n'}

start_ringfwd() { # name engine mode [binary] [extra [uring] lines]
    local name=$1 engine=$2 mode=$3 bin=${4:-$BIN} extra=${5:-} cfg="$out/$1.toml"
    cat >"$cfg" <<EOF
workers = $workers
engine = "$engine"
mode = "$mode"
access_log = false
[uring]
$uring_lines
$extra
[[rule]]
name = "echo"
listen = "127.0.0.1:0"
upstream = "$echo_addr"
[[rule]]
name = "sink"
listen = "127.0.0.1:0"
upstream = "$sink_addr"
[[rule]]
name = "source"
listen = "127.0.0.1:0"
upstream = "$src_addr"
EOF
    "${setsid[@]}" "$bin" run --config "$cfg" >"$out/$name.out" 2>"$out/$name.err" &
    local pid=$!
    pids+=("$pid")
    for _ in $(seq 1 200); do
        [[ $(grep -c '^listening' "$out/$name.out" 2>/dev/null || true) == 3 ]] && break
        kill -0 "$pid" 2>/dev/null || { echo "bench.sh: relay $name exited: $(tail -3 "$out/$name.err")" >&2; exit 1; }
        sleep 0.05
    done
    relay_pids[$name]=$pid
    relay_echo[$name]=$(grep 'rule=echo ' "$out/$name.out" | grep -o 'addr=[^ ]*' | cut -d= -f2)
    relay_sink[$name]=$(grep 'rule=sink ' "$out/$name.out" | grep -o 'addr=[^ ]*' | cut -d= -f2)
    relay_src[$name]=$(grep 'rule=source ' "$out/$name.out" | grep -o 'addr=[^ ]*' | cut -d= -f2)
    variants+=("$name")
}

echo "== relays"
start_ringfwd uring-copy uring copy
start_ringfwd uring-splice uring splice
start_ringfwd uring-auto uring auto
start_ringfwd tokio tokio auto
start_ringfwd std std auto
# The latency settings (docs/TUNING.md), only when named in --only: not pinned, and
# busy-polling before sleeping.
[[ " $only " == *" uring-unpinned "* ]] && start_ringfwd uring-unpinned uring auto "$BIN" "pin = false"
[[ " $only " == *" uring-busypoll "* ]] && start_ringfwd uring-busypoll uring auto "$BIN" 'busy_poll = "50us"'
if [[ $metrics_cost == 1 ]]; then
    start_ringfwd uring-auto-nometrics uring auto "$NOMETRICS_BIN"
    start_ringfwd tokio-nometrics tokio auto "$NOMETRICS_BIN"
fi

wait_port() { for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }

if [[ $peers == 1 ]]; then
    if command -v haproxy >/dev/null; then
        # haproxy-splice forces splice both ways (the strongest HAProxy: with `option
        # splice-auto` it almost never splices on loopback); haproxy-splice-auto is kept as a
        # second row.
        for splice in nosplice splice splice-auto; do
            name=haproxy-$splice pe=$(free_port) ps=$(free_port) pr=$(free_port)
            case $splice in
                nosplice) opt="" ;;
                splice) opt=$'option splice-request\n    option splice-response' ;;
                splice-auto) opt="option splice-auto" ;;
            esac
            cat >"$out/$name.cfg" <<EOF
global
    maxconn 4000
    nbthread $workers
defaults
    mode tcp
    timeout connect 5s
    timeout client 600s
    timeout server 600s
    $opt
listen echo
    bind 127.0.0.1:$pe
    server s $echo_addr
listen sink
    bind 127.0.0.1:$ps
    server s $sink_addr
listen source
    bind 127.0.0.1:$pr
    server s $src_addr
EOF
            "${setsid[@]}" haproxy -f "$out/$name.cfg" -db >"$out/$name.out" 2>&1 &
            pid=$!; pids+=("$pid")
            wait_port "$pe" && wait_port "$ps" && wait_port "$pr" || { echo "bench.sh: haproxy did not start: $(tail -3 "$out/$name.out")" >&2; exit 1; }
            relay_pids[$name]=$pid relay_echo[$name]=127.0.0.1:$pe relay_sink[$name]=127.0.0.1:$ps relay_src[$name]=127.0.0.1:$pr
            variants+=("$name")
        done
    else
        echo "(haproxy not installed: skipped)"
    fi
    if command -v nginx >/dev/null; then
        name=nginx pe=$(free_port) ps=$(free_port) pr=$(free_port)
        mkdir -p "$out/nginx"
        load=""
        [[ -f /usr/lib/nginx/modules/ngx_stream_module.so ]] && load="load_module /usr/lib/nginx/modules/ngx_stream_module.so;"
        cat >"$out/nginx.conf" <<EOF
$load
worker_processes $workers;
pid $out/nginx/nginx.pid;
error_log $out/nginx/error.log;
daemon off;
events { worker_connections 9000; }
stream {
    server { listen 127.0.0.1:$pe; proxy_pass $echo_addr; }
    server { listen 127.0.0.1:$ps; proxy_pass $sink_addr; }
    server { listen 127.0.0.1:$pr; proxy_pass $src_addr; }
}
EOF
        "${setsid[@]}" nginx -c "$out/nginx.conf" -p "$out/nginx" >"$out/nginx.out" 2>&1 &
        pid=$!; pids+=("$pid")
        if wait_port "$pe" && wait_port "$ps" && wait_port "$pr"; then
            # nginx forks its workers: measure the whole process group's CPU.
            relay_pids[$name]="$pid $(pgrep -P "$pid" | tr '\n' ' ')"
            relay_echo[$name]=127.0.0.1:$pe relay_sink[$name]=127.0.0.1:$ps relay_src[$name]=127.0.0.1:$pr
            variants+=("$name")
        else
            echo "(nginx stream did not start, skipped: $(tail -2 "$out/nginx/error.log" 2>/dev/null))"
        fi
    else
        echo "(nginx not installed: skipped)"
    fi
    if command -v socat >/dev/null; then
        name=socat pe=$(free_port) ps=$(free_port) pr=$(free_port)
        spids=""
        for pair in "$pe:$echo_addr" "$ps:$sink_addr" "$pr:$src_addr"; do
            socat "TCP-LISTEN:${pair%%:*},bind=127.0.0.1,reuseaddr,fork" "TCP:${pair#*:}" &
            spids+="$! "; pids+=("$!")
        done
        wait_port "$pe" && wait_port "$ps" && wait_port "$pr"
        relay_pids[$name]=$spids relay_echo[$name]=127.0.0.1:$pe relay_sink[$name]=127.0.0.1:$ps relay_src[$name]=127.0.0.1:$pr
        variants+=("$name")
    else
        echo "(socat not installed: skipped)"
    fi
fi

if [[ -n $only ]]; then
    keep=()
    for v in "${variants[@]}"; do [[ " $only " == *" $v "* ]] && keep+=("$v"); done
    variants=("${keep[@]}")
fi
echo "variants: ${variants[*]}"
echo "workloads: ${workloads[*]}"

# run_one VARIANT WORKLOAD ROUND
run_one() {
    local v=$1 w=$2 r=$3 args
    case $w in
        bulk1) args=(throughput --direction up -c 1 "${relay_sink[$v]}") ;;
        bulk1_down) args=(throughput --direction down -c 1 "${relay_src[$v]}") ;;
        bulk8) args=(throughput --direction up -c 8 "${relay_sink[$v]}") ;;
        rr64) args=(rr --size 64 -c 8 "${relay_echo[$v]}") ;;
        rr1) args=(rr --size 64 -c 1 "${relay_echo[$v]}") ;;
        rr64_open) args=(rr --size 64 -c 8 --rate 10000 "${relay_echo[$v]}") ;;
        rr16k) args=(rr --size 16KiB -c 8 "${relay_echo[$v]}") ;;
        connect) args=(connect -c 4 --size 64 "${relay_echo[$v]}") ;;
    esac
    local json="$out/runs/$w.$v.$r.json"
    # shellcheck disable=SC2086
    local before; before=$(cpu_ticks ${relay_pids[$v]})
    if ! "$BIN" bench "${args[@]}" -d "$duration" --warmup "$warmup" -q --format json --json "$json" --label "$v" >/dev/null 2>"$out/runs/$w.$v.$r.err"; then
        echo "  $w $v round $r FAILED: $(tail -2 "$out/runs/$w.$v.$r.err")"
        rm -f "$json"
        return
    fi
    # shellcheck disable=SC2086
    local after; after=$(cpu_ticks ${relay_pids[$v]})
    python3 - "$json" "$((after - before))" "$(getconf CLK_TCK)" "$warmup" <<'PY'
import json, sys
path, ticks, hz, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
d = json.load(open(path))
# CPU is read around the whole run, warm-up included; the report scales it to the
# measured window (steady load assumed).
d["relay_cpu_s"] = ticks / hz
d["warmup_s"] = float(warmup.rstrip("s"))
json.dump(d, open(path, "w"))
PY
    printf '  %-10s %-14s round %s: %s\n' "$w" "$v" "$r" "$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(", ".join(f"{k}={d[k]}" for k in ("gbit_per_s","req_per_s","conn_per_s","p99_us","relay_cpu_s") if k in d))' "$json")"
}

n=${#variants[@]}
for r in $(seq 1 "$rounds"); do
    order=()
    for i in $(seq 0 $((n - 1))); do order+=("${variants[$(((i + r - 1) % n))]}"); done
    if ((r % 2 == 0)); then
        rev=(); for ((i = ${#order[@]} - 1; i >= 0; i--)); do rev+=("${order[$i]}"); done; order=("${rev[@]}")
    fi
    echo "== round $r/$rounds: ${order[*]}"
    for w in "${workloads[@]}"; do
        for v in "${order[@]}"; do run_one "$v" "$w" "$r"; done
    done
done

echo "== idle memory ($idle_conns connections per relay)"
for v in "${variants[@]}"; do
    [[ $v == direct ]] && continue
    if [[ $v == socat ]]; then
        echo "  socat: skipped (a process per connection; its memory is not one pid's)"
        continue
    fi
    main_pid=${relay_pids[$v]%% *}
    # nginx relays in its worker process, not the master.
    [[ $v == nginx ]] && main_pid=$(echo "${relay_pids[$v]}" | awk '{print $2}')
    "$BIN" bench idle -c "$idle_conns" --pid "$main_pid" --settle 1s -q --format json --json "$out/runs/idle.$v.1.json" --label "$v" "${relay_echo[$v]}" >/dev/null 2>"$out/runs/idle.$v.err" \
        && printf '  %-14s %s bytes/connection\n' "$v" "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("rss_per_conn_bytes"))' "$out/runs/idle.$v.1.json")" \
        || echo "  $v idle FAILED: $(tail -2 "$out/runs/idle.$v.err")"
done

echo "== report"
python3 scripts/bench_report.py "$out"
echo "results in $out (report.md, summary.csv, *.svg)"
