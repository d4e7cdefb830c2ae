#!/usr/bin/env bash
# Side-by-side benchmark: the same workloads direct (no relay), through every ringfwd engine and
# data path, and (with --peers) through HAProxy, nginx stream and socat when installed.
#
#   scripts/bench.sh [--quick] [--rounds N] [--duration D] [--workers N] [--peers]
#                    [--metrics-cost] [--only "direct uring-copy ..."] [--workloads ["bulk1 rr64"]]
#                    [--setsid] [--cpus LIST] [--uring "key = value; ..."] [--before BIN]
#                    [--out DIR]
#
# --workloads alone (no list after it) runs the application workloads: redis-benchmark
# against redis-server (redis_pipe: 50 connections, 16 commands pipelined; redis1: one
# connection, unpipelined), wrk against an nginx HTTP server (http_ka: keep-alive; http_close:
# `Connection: close`), new TLS handshakes through an SNI-routed rule to an nginx HTTPS server
# (tls; self-signed certificate made here), and the one-connection round trip (rr1), through
# direct, every engine, HAProxy (forced splice and no splice) and nginx stream. Whatever of
# redis-server, redis-tools, wrk, nginx (+ its stream module), haproxy and openssl is missing
# is installed from Debian packages first (root). The names also work in a list, e.g.
# --workloads "redis1 tls bulk1". --cpus runs everything (generators, backends, relays) on
# those CPUs only (`taskset -c`), e.g. --cpus 0 for the all-on-one-core placement.
# --check exits non-zero unless every workload produced a figure for every variant (CI's
# smoke run: `--workloads --quick --check`).
#
# --setsid starts every relay in a session of its own, as a service manager would (the
# round trip of `rr1`, one 64-byte ping-pong connection, depends on where the scheduler puts
# a relay relative to its peers, and a relay started from the benchmarking shell is placed
# next to them). --uring adds keys to the [uring] table of every ringfwd relay, e.g.
# --uring "auto_up_reads = 2; auto_down_pumps = 16" (scripts/sweep_auto.sh uses it).
# Three more variants start only when --only names them: uring-unpinned (pin = false),
# uring-busypoll (busy_poll = "50us") and uring-epoll (wait = "epoll"), the latency settings
# of docs/TUNING.md.
# --before BIN adds uring-auto-before: the uring engine in auto mode (default settings) run
# from another ringfwd binary, e.g. a release build of main, for a before/after comparison in
# one script (the same rounds, the same peers).
#
# --metrics-cost adds uring-auto-nometrics and tokio-nometrics: the same engines built with
# the bench-no-metrics feature (no recording on the data path), to measure what metrics cost.
#
# Every variant runs in every round; the order alternates between rounds (rotated, and
# reversed on odd rounds) so drift on a shared machine does not favour one variant. The report
# (scripts/bench_report.py) takes medians over rounds and prints ratios against the direct
# connection and against the tokio engine, plus CPU per GB moved (or per request): the relay's
# own (from /proc/PID/stat) and the whole machine's (busy ticks of every CPU, /proc/stat).
#
# Load generator, backends and relay share this machine's cores: read the ratios, not the
# absolute figures. Everything binds 127.0.0.1; every process started here is stopped by pid.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

args_given="$*"
orig_args=("$@")
before_bin="" quick=0 rounds="" duration="" workers=1 peers=0 only="" out="" warmup=1s metrics_cost=0 workloads_given="" setsid=() uring_extra="" apps=0 cpus="" check=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --quick) quick=1 ;;
        --rounds) rounds=$2; shift ;;
        --duration) duration=$2; shift ;;
        --workers) workers=$2; shift ;;
        --peers) peers=1 ;;
        --metrics-cost) metrics_cost=1 ;;
        --workloads)
            # With a list: those workloads. Alone: the application workloads (and their peers).
            if [[ $# -ge 2 && $2 != --* ]]; then workloads_given=$2; shift; else apps=1; fi ;;
        --only) only=$2; shift ;;
        --setsid) setsid=(setsid) ;;
        --uring) uring_extra=$2; shift ;;
        --before)
            before_bin=$(realpath "$2")
            [[ -f $before_bin && -x $before_bin ]] || { echo "bench.sh: --before $2: not an executable file" >&2; exit 2; }
            shift ;;
        --out) out=$2; shift ;;
        --cpus) cpus=$2; shift ;;
        --check) check=1 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
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
# The application workloads, their load generators and their backends (see --help).
app_workloads=" redis_pipe redis1 http_ka http_close tls "
if [[ $apps == 1 ]]; then
    workloads=(rr1 redis_pipe redis1 http_ka http_close tls)
    peers=1
    if [[ $quick == 1 ]]; then rounds=1 duration=1s warmup=500ms; fi
fi
[[ -n $workloads_given ]] && read -r -a workloads <<<"$workloads_given"
need_apps=0
for w in "${workloads[@]}"; do [[ $app_workloads == *" $w "* ]] && need_apps=1; done
# Run everything on the CPUs given: re-executed under taskset, so every process started
# below (and the load generators) inherits the mask.
if [[ -n $cpus && -z ${BENCH_TASKSET:-} ]]; then
    BENCH_TASKSET=1 exec taskset -c "$cpus" "$0" "${orig_args[@]}"
fi
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

wait_port() { for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }

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
    [[ -n $before_bin ]] && echo "before: $before_bin (variant uring-auto-before)"
    echo "command: scripts/bench.sh $args_given"
    echo "rounds: $rounds, duration: $duration, relay workers: $workers"
    echo "note: load generator, backends and relay share these cores; compare ratios"
    echo "load: $(cut -d' ' -f1-3 /proc/loadavg) (1/5/15 min load average at the start; other builds running make figures noisy)"
    # Where every figure was taken: which CPUs, which session, which worker pinning.
    placement="CPUs $(taskset -pc $$ | awk -F': ' '{print $2}') shared by load generators, backends and relays"
    [[ -n $cpus ]] && placement+=" (taskset -c $cpus)" || placement+=" (no taskset: the scheduler places them)"
    if ((${#setsid[@]})); then
        placement+="; relays in sessions of their own (setsid: their own scheduler autogroup)"
    else
        placement+="; relays in the benchmarking shell's session (one scheduler autogroup with the load generators)"
    fi
    placement+="; $workers worker(s) per relay, uring workers pinned unless --uring sets pin = false; HAProxy nbthread $workers, nginx worker_processes $workers"
    echo "placement: $placement"
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

# The application backends: redis-server, and one nginx serving HTTP and HTTPS (a
# self-signed certificate for $sni_name, made here). Tools missing are installed first.
sni_name=bench.test
if [[ $need_apps == 1 ]]; then
    export PATH=$PATH:/usr/sbin
    missing=()
    command -v redis-server >/dev/null || missing+=(redis-server)
    command -v redis-benchmark >/dev/null || missing+=(redis-tools)
    command -v wrk >/dev/null || missing+=(wrk)
    command -v nginx >/dev/null || missing+=(nginx)
    command -v openssl >/dev/null || missing+=(openssl)
    if [[ $peers == 1 ]]; then
        command -v haproxy >/dev/null || missing+=(haproxy)
        [[ -e /usr/lib/nginx/modules/ngx_stream_module.so ]] || missing+=(libnginx-mod-stream)
    fi
    if ((${#missing[@]})); then
        [[ $(id -u) == 0 ]] || { echo "bench.sh: missing ${missing[*]} and not root to install them" >&2; exit 1; }
        echo "== installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    mkdir -p "$out/redis" "$out/web"
    redis_port=$(free_port)
    redis-server --bind 127.0.0.1 --port "$redis_port" --save '' --appendonly no \
        --protected-mode no --daemonize no --dir "$out/redis" --maxclients 10000 >"$out/redis/out.log" 2>&1 &
    pids+=("$!")
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj "/CN=$sni_name" -keyout "$out/web/key.pem" -out "$out/web/cert.pem" 2>/dev/null
    http_port=$(free_port) https_port=$(free_port)
    body=$(head -c 1024 /dev/zero | tr '\0' 'x')
    cat >"$out/web/nginx.conf" <<EOF
worker_processes 1;
pid $out/web/nginx.pid;
error_log $out/web/error.log;
daemon off;
events { worker_connections 9000; }
http {
    access_log off;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:$http_port;
        location / { default_type text/plain; return 200 "$body"; }
    }
    server {
        listen 127.0.0.1:$https_port ssl;
        ssl_certificate $out/web/cert.pem;
        ssl_certificate_key $out/web/key.pem;
        ssl_protocols TLSv1.3;
        ssl_session_tickets off;
        ssl_session_cache off;
        location / { return 200 "ok"; }
    }
}
EOF
    nginx -c "$out/web/nginx.conf" -p "$out/web" >"$out/web/out.log" 2>&1 &
    pids+=("$!")
    wait_port "$redis_port" && wait_port "$http_port" && wait_port "$https_port" \
        || { echo "bench.sh: application backends did not start: $(tail -3 "$out/web/error.log" "$out/redis/out.log")" >&2; exit 1; }
    redis_addr=127.0.0.1:$redis_port http_addr=127.0.0.1:$http_port https_addr=127.0.0.1:$https_port
    echo "redis $redis_addr, http $http_addr, https $https_addr (SNI $sni_name)"
    echo "redis: $(redis-server --version | cut -d' ' -f3), wrk: $(wrk -v 2>&1 | head -1 | cut -d' ' -f2), nginx: $(nginx -v 2>&1 | cut -d/ -f2)" >>"$out/machine.txt"
fi

# A relay variant: its pids and the three addresses it forwards from (echo, sink, source).
declare -A relay_pids relay_echo relay_sink relay_src relay_redis relay_http relay_tls
variants=(direct)
relay_pids[direct]=""
relay_echo[direct]=$echo_addr relay_sink[direct]=$sink_addr relay_src[direct]=$src_addr
if [[ $need_apps == 1 ]]; then
    relay_redis[direct]=$redis_addr relay_http[direct]=$http_addr relay_tls[direct]=$https_addr
fi

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
    local rules=3
    if [[ $need_apps == 1 ]]; then
        rules=6
        # The TLS rule routes by SNI and has no default route: a hello naming another
        # host is refused, so every handshake measured went through the routing.
        cat >>"$cfg" <<EOF
[[rule]]
name = "redis"
listen = "127.0.0.1:0"
upstream = "$redis_addr"
[[rule]]
name = "http"
listen = "127.0.0.1:0"
upstream = "$http_addr"
[[rule]]
name = "tls"
listen = "127.0.0.1:0"
[[rule.route]]
sni = ["$sni_name"]
upstream = "$https_addr"
EOF
    fi
    "${setsid[@]}" "$bin" run --config "$cfg" >"$out/$name.out" 2>"$out/$name.err" &
    local pid=$!
    pids+=("$pid")
    for _ in $(seq 1 200); do
        [[ $(grep -c '^listening' "$out/$name.out" 2>/dev/null || true) == "$rules" ]] && break
        kill -0 "$pid" 2>/dev/null || { echo "bench.sh: relay $name exited: $(tail -3 "$out/$name.err")" >&2; exit 1; }
        sleep 0.05
    done
    relay_pids[$name]=$pid
    relay_echo[$name]=$(grep 'rule=echo ' "$out/$name.out" | grep -o 'addr=[^ ]*' | cut -d= -f2)
    relay_sink[$name]=$(grep 'rule=sink ' "$out/$name.out" | grep -o 'addr=[^ ]*' | cut -d= -f2)
    relay_src[$name]=$(grep 'rule=source ' "$out/$name.out" | grep -o 'addr=[^ ]*' | cut -d= -f2)
    if [[ $need_apps == 1 ]]; then
        relay_redis[$name]=$(grep 'rule=redis ' "$out/$name.out" | grep -o 'addr=[^ ]*' | cut -d= -f2)
        relay_http[$name]=$(grep 'rule=http ' "$out/$name.out" | grep -o 'addr=[^ ]*' | cut -d= -f2)
        relay_tls[$name]=$(grep 'rule=tls ' "$out/$name.out" | grep -o 'addr=[^ ]*' | cut -d= -f2)
    fi
    variants+=("$name")
}

echo "== relays"
start_ringfwd uring-copy uring copy
start_ringfwd uring-splice uring splice
start_ringfwd uring-auto uring auto
start_ringfwd tokio tokio auto
start_ringfwd std std auto
# The latency settings (docs/TUNING.md), only when named in --only: not pinned,
# busy-polling before sleeping, and sleeping on epoll instead of the ring.
[[ " $only " == *" uring-unpinned "* ]] && start_ringfwd uring-unpinned uring auto "$BIN" "pin = false"
[[ " $only " == *" uring-busypoll "* ]] && start_ringfwd uring-busypoll uring auto "$BIN" 'busy_poll = "50us"'
[[ " $only " == *" uring-epoll "* ]] && start_ringfwd uring-epoll uring auto "$BIN" 'wait = "epoll"'
[[ -n $before_bin ]] && start_ringfwd uring-auto-before uring auto "$before_bin"
if [[ $metrics_cost == 1 ]]; then
    start_ringfwd uring-auto-nometrics uring auto "$NOMETRICS_BIN"
    start_ringfwd tokio-nometrics tokio auto "$NOMETRICS_BIN"
fi

if [[ $peers == 1 ]]; then
    if command -v haproxy >/dev/null; then
        # haproxy-splice forces splice both ways (the strongest HAProxy: with `option
        # splice-auto` it almost never splices on loopback); haproxy-splice-auto is kept as a
        # second row (not with the application workloads).
        haproxy_kinds=(nosplice splice splice-auto)
        [[ $apps == 1 ]] && haproxy_kinds=(nosplice splice)
        for splice in "${haproxy_kinds[@]}"; do
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
            if [[ $need_apps == 1 ]]; then
                pd=$(free_port) ph=$(free_port) pt=$(free_port)
                cat >>"$out/$name.cfg" <<EOF
listen redis
    bind 127.0.0.1:$pd
    server s $redis_addr
listen http
    bind 127.0.0.1:$ph
    server s $http_addr
frontend tls
    bind 127.0.0.1:$pt
    tcp-request inspect-delay 3s
    tcp-request content accept if { req.ssl_hello_type 1 }
    use_backend tls_routed if { req.ssl_sni -i $sni_name }
backend tls_routed
    server s $https_addr
EOF
                relay_redis[$name]=127.0.0.1:$pd relay_http[$name]=127.0.0.1:$ph relay_tls[$name]=127.0.0.1:$pt
            fi
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
        nginx_apps=""
        if [[ $need_apps == 1 ]]; then
            pd=$(free_port) ph=$(free_port) pt=$(free_port)
            # SNI routing: ssl_preread reads the ClientHello; another name goes nowhere (port 9).
            nginx_apps=$(
                printf '    server { listen 127.0.0.1:%s; proxy_pass %s; }\n' "$pd" "$redis_addr" "$ph" "$http_addr"
                printf '    map $ssl_preread_server_name $tls_upstream { %s %s; default 127.0.0.1:9; }\n' "$sni_name" "$https_addr"
                printf '    server { listen 127.0.0.1:%s; ssl_preread on; proxy_pass $tls_upstream; }\n' "$pt"
            )
        fi
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
$nginx_apps
}
EOF
        "${setsid[@]}" nginx -c "$out/nginx.conf" -p "$out/nginx" >"$out/nginx.out" 2>&1 &
        pid=$!; pids+=("$pid")
        if wait_port "$pe" && wait_port "$ps" && wait_port "$pr"; then
            # nginx forks its workers: measure the whole process group's CPU.
            relay_pids[$name]="$pid $(pgrep -P "$pid" | tr '\n' ' ')"
            relay_echo[$name]=127.0.0.1:$pe relay_sink[$name]=127.0.0.1:$ps relay_src[$name]=127.0.0.1:$pr
            [[ $need_apps == 1 ]] && relay_redis[$name]=127.0.0.1:$pd relay_http[$name]=127.0.0.1:$ph relay_tls[$name]=127.0.0.1:$pt
            variants+=("$name")
        else
            echo "(nginx stream did not start, skipped: $(tail -2 "$out/nginx/error.log" 2>/dev/null))"
        fi
    else
        echo "(nginx not installed: skipped)"
    fi
    if [[ $apps == 1 ]]; then
        : # the application workloads' peers are HAProxy and nginx stream
    elif command -v socat >/dev/null; then
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
echo "variants: ${variants[*]}" | tee -a "$out/machine.txt"
echo "workloads: ${workloads[*]}" | tee -a "$out/machine.txt"

machine_busy_ticks() { # busy ticks of every CPU (user nice system irq softirq steal) from /proc/stat
    awk '/^cpu /{print $2 + $3 + $4 + $7 + $8 + $9; exit}' /proc/stat
}

secs() { local d=${1%s}; echo "${d%.*}"; } # "3s" -> 3 (whole seconds, for the generators that take them)

# Requests each redis-benchmark test sends: sized from the duration so a run takes about that
# long on this machine (bounded by `timeout` whatever happens).
redis_requests() { # pipelined|single
    local d; d=$(secs "$duration"); ((d >= 1)) || d=1
    [[ $1 == pipelined ]] && echo $((d * 60000)) || echo $((d * 3000))
}

# run_app VARIANT WORKLOAD JSON ERR: one application load generator against VARIANT's rule.
run_app() {
    local v=$1 w=$2 json=$3 err=$4 raw="${3%.json}.txt" t0 t1 n d
    d=$(secs "$duration"); ((d >= 1)) || d=1
    t0=$(date +%s.%N)
    case $w in
        redis_pipe|redis1)
            local host=${relay_redis[$v]%:*} port=${relay_redis[$v]##*:} c=50 pipe=16 kind=pipelined
            [[ $w == redis1 ]] && c=1 pipe=1 kind=single
            n=$(redis_requests $kind)
            timeout $((d * 10 + 20)) redis-benchmark -h "$host" -p "$port" -c $c -P $pipe -n "$n" \
                -t set,get --csv >"$raw" 2>"$err" || return 1
            t1=$(date +%s.%N)
            python3 scripts/bench_parse.py redis "$raw" "$json" "$v" "$(awk "BEGIN{print $t1 - $t0}")" "$n" 2>>"$err" ;;
        http_ka|http_close)
            local hdr=() c=16
            [[ $w == http_close ]] && hdr=(-H "Connection: close") c=8
            timeout $((d + 20)) wrk -t1 -c$c -d"${d}s" --latency "${hdr[@]}" "http://${relay_http[$v]}/" >"$raw" 2>"$err" || return 1
            t1=$(date +%s.%N)
            python3 scripts/bench_parse.py wrk "$raw" "$json" "$v" "$(awk "BEGIN{print $t1 - $t0}")" 2>>"$err" ;;
        tls)
            timeout $((d + 20)) python3 scripts/tls_handshakes.py "${relay_tls[$v]}" --sni "$sni_name" \
                --duration "$d" --conns 4 --json "$json" >"$raw" 2>"$err" ;;
    esac
}

# run_one VARIANT WORKLOAD ROUND
run_one() {
    local v=$1 w=$2 r=$3 args app=0
    case $w in
        bulk1) args=(throughput --direction up -c 1 "${relay_sink[$v]}") ;;
        bulk1_down) args=(throughput --direction down -c 1 "${relay_src[$v]}") ;;
        bulk8) args=(throughput --direction up -c 8 "${relay_sink[$v]}") ;;
        rr64) args=(rr --size 64 -c 8 "${relay_echo[$v]}") ;;
        rr1) args=(rr --size 64 -c 1 "${relay_echo[$v]}") ;;
        rr64_open) args=(rr --size 64 -c 8 --rate 10000 "${relay_echo[$v]}") ;;
        rr16k) args=(rr --size 16KiB -c 8 "${relay_echo[$v]}") ;;
        connect) args=(connect -c 4 --size 64 "${relay_echo[$v]}") ;;
        redis_pipe|redis1|http_ka|http_close|tls)
            app=1
            local target=${relay_redis[$v]:-}
            [[ $w == http* ]] && target=${relay_http[$v]:-}
            [[ $w == tls ]] && target=${relay_tls[$v]:-}
            if [[ -z $target ]]; then echo "  $w $v: no rule for it (skipped)"; return; fi ;;
        *) echo "bench.sh: unknown workload $w" >&2; exit 2 ;;
    esac
    local json="$out/runs/$w.$v.$r.json" err="$out/runs/$w.$v.$r.err" ok=1
    # shellcheck disable=SC2086
    local before; before=$(cpu_ticks ${relay_pids[$v]})
    local mbefore; mbefore=$(machine_busy_ticks)
    if [[ $app == 1 ]]; then
        run_app "$v" "$w" "$json" "$err" || ok=0
    else
        "$BIN" bench "${args[@]}" -d "$duration" --warmup "$warmup" -q --format json --json "$json" --label "$v" >/dev/null 2>"$err" || ok=0
    fi
    local mafter; mafter=$(machine_busy_ticks)
    # shellcheck disable=SC2086
    local after; after=$(cpu_ticks ${relay_pids[$v]})
    if [[ $ok == 0 || ! -s $json ]]; then
        echo "  $w $v round $r FAILED: $(tail -2 "$err")"
        rm -f "$json"
        return
    fi
    local wu=$warmup
    [[ $app == 1 ]] && wu=0s # the generators' own start-up is inside their measured time
    python3 - "$json" "$((after - before))" "$((mafter - mbefore))" "$(getconf CLK_TCK)" "$wu" <<'PY'
import json, sys
path, ticks, mticks, hz, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
d = json.load(open(path))
# CPU is read around the whole run, warm-up included; the report scales it to the
# measured window (steady load assumed). machine_cpu_s: busy time of every CPU (all
# processes: generator, backend, relay, and anything else running), from /proc/stat.
d["relay_cpu_s"] = ticks / hz
d["machine_cpu_s"] = mticks / hz
num = warmup.rstrip("mus")
d["warmup_s"] = float(num) * {"ms": 1e-3, "us": 1e-6}.get(warmup[len(num):], 1.0)
json.dump(d, open(path, "w"))
PY
    printf '  %-10s %-16s round %s: %s\n' "$w" "$v" "$r" "$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(", ".join(f"{k}={d[k]}" for k in ("gbit_per_s","req_per_s","conn_per_s","p50_us","p99_us","relay_cpu_s","machine_cpu_s") if k in d))' "$json")"
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

[[ $apps == 1 ]] && idle_variants=() || idle_variants=("${variants[@]}")
((${#idle_variants[@]})) && echo "== idle memory ($idle_conns connections per relay)"
for v in "${idle_variants[@]}"; do
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
report_args=()
[[ $check == 1 ]] && report_args=(--require-all)
python3 scripts/bench_report.py "$out" "${report_args[@]}"
echo "results in $out (report.md, summary.csv, *.svg)"
