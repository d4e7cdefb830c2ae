#!/usr/bin/env bash
# What a port range costs: time to ready, threads, fds, RSS and kernel memory of one rule over
# 1 port and over N ports (default 2 000), per engine.
#
#   scripts/range_cost.sh [--ports N] [--rules M] [--workers W] [--rounds R] [--bin PATH]
#
# For each engine (uring, tokio, std) and each shape — one rule over 1 port, one rule over N
# ports (default 2 000), M rules of one port each (default 200, `max_connections = 64`, shown
# as `rules:M`) — R times: picks a free run of loopback ports below the ephemeral range
# (checked by binding them all), starts `ringfwd run` on that config, every rule forwarding
# to `127.0.0.1:9` (nothing needs to answer: only start-up is measured), and reports
#
#   ready_ms   from exec to the `listening` line on stdout (bind + engine set-up + print)
#   threads    Threads: in /proc/PID/status
#   fds        entries of /proc/PID/fd
#   rss_kib    VmRSS
#   kmem_kib   growth of the kernel slab caches a listening socket or an armed accept lives
#              in (TCP, sock_inode_cache, filp, dentry, io_kiocb, eventpoll_epi; read from
#              /proc/slabinfo, needs root) between before the start and once ready. The
#              whole machine allocates from these caches: on a busy host, read it as an
#              estimate and compare the medians of several rounds.
#
# Medians over rounds are printed as a table. Every forwarder started here is stopped by pid.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

ports=2000 rules=200 workers=2 rounds=3 bin=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --ports) ports=$2; shift ;;
        --rules) rules=$2; shift ;;
        --workers) workers=$2; shift ;;
        --rounds) rounds=$2; shift ;;
        --bin) bin=$2; shift ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
if [[ -z $bin ]]; then
    cargo build --release --bin ringfwd >&2
    bin=${CARGO_TARGET_DIR:-target}/release/ringfwd
fi
ulimit -n "$(ulimit -Hn)"

tmp=$(mktemp -d)
pid=""
cleanup() {
    if [[ -n $pid ]]; then kill "$pid" 2>/dev/null || true; fi
    rm -rf "$tmp"
}
trap cleanup EXIT

# A free run of $1 loopback ports: its first port.
free_base() {
    python3 - "$1" <<'EOF'
import random, socket, sys
n = int(sys.argv[1])
for _ in range(50):
    base = random.randint(10000, 32000 - n)
    held = []
    try:
        for p in range(base, base + n):
            s = socket.socket()
            s.bind(("127.0.0.1", p))
            held.append(s)
    except OSError:
        continue
    finally:
        for s in held:
            s.close()
    print(base)
    sys.exit(0)
sys.exit("no free run of ports")
EOF
}

kmem_kib() {
    awk '$1 ~ /^(TCP|sock_inode_cache|filp|dentry|io_kiocb|eventpoll_epi)$/ { b += $2 * $4 }
         END { printf "%d\n", b / 1024 }' /proc/slabinfo 2>/dev/null || echo 0
}

now_ns() { date +%s%N; }

printf '%-6s %6s %9s %8s %6s %8s %9s\n' engine ports ready_ms threads fds rss_kib kmem_kib
for engine in uring tokio std; do
    for n in 1 "$ports" "rules:$rules"; do
        rows=()
        for ((r = 0; r < rounds; r++)); do
            cfg=$tmp/r.toml
            printf 'workers = %s\naccess_log = false\n' "$workers" >"$cfg"
            if [[ $n == rules:* ]]; then
                # Many rules of one port each, for the cost of a rule.
                m=${n#rules:}
                base=$(free_base "$m")
                for ((i = 0; i < m; i++)); do
                    printf '[[rule]]\nname = "r%d"\nlisten = "127.0.0.1:%d"\nupstream = "127.0.0.1:9"\nmax_connections = 64\n' \
                        "$i" $((base + i)) >>"$cfg"
                done
            else
                base=$(free_base "$n")
                last=$((base + n - 1))
                if ((n == 1)); then listen="127.0.0.1:$base"; else listen="127.0.0.1:$base-$last"; fi
                printf '[[rule]]\nname = "r"\nlisten = "%s"\nupstream = "127.0.0.1:9"\n' "$listen" >>"$cfg"
            fi
            out=$tmp/out
            : >"$out"
            k0=$(kmem_kib)
            t0=$(now_ns)
            "$bin" run --config "$cfg" --engine "$engine" >"$out" 2>"$tmp/err" &
            pid=$!
            until grep -q '^listening ' "$out"; do
                if ! kill -0 "$pid" 2>/dev/null; then cat "$tmp/err" >&2; exit 1; fi
                sleep 0.001
            done
            t1=$(now_ns)
            sleep 0.2 # let every worker finish arming its accepts before reading memory
            k1=$(kmem_kib)
            threads=$(awk '/^Threads:/ { print $2 }' "/proc/$pid/status")
            rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status")
            fds=$(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 | wc -l)
            kill "$pid"
            wait "$pid" 2>/dev/null || true
            pid=""
            rows+=("$(((t1 - t0) / 1000000)) $threads $fds $rss $((k1 - k0))")
        done
        # Medians, column by column.
        printf '%s\n' "${rows[@]}" | python3 -c '
import sys, statistics
rows = [list(map(int, l.split())) for l in sys.stdin if l.strip()]
med = [int(statistics.median(c)) for c in zip(*rows)]
print("%-6s %6s %9d %8d %6d %8d %9d" % (sys.argv[1], sys.argv[2], *med))
' "$engine" "$n"
    done
done
