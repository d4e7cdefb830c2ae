#!/usr/bin/env bash
# A fleet of ringfwd hosts behind ECMP and BGP, on one machine, in network namespaces.
#
#   scripts/fleet.sh [--quick] [--hosts N] [--bin PATH] [--no-pin] [--no-resilient]
#                    [--keep-logs DIR]
#
# Builds (and always removes, even on failure) these namespaces, joined by veth pairs:
#
#   client ── router ──┬── host1 ──┐
#   (64+ addresses)    ├── host2 ──┼── backends (bridge: b1..b4, each names itself)
#                      └── hostN ──┘
#
# - router: BIRD 2 (Debian's bird2) peers with every host over eBGP (hold time 3 s) and
#   exports the service address's paths to kernel table 100 (`merge paths`: one multipath
#   route). The script mirrors them into a *resilient* nexthop group (`ip nexthop ... type
#   resilient`; a plain group where the kernel lacks it) that the service route uses, with
#   L4 hashing (`net.ipv4.fib_multipath_hash_policy = 1`): a host leaving moves only its own
#   flows. Unless --no-pin, the router also keeps an established flow on the host that took
#   it (conntrack mark + fwmark rule, as an L4 load balancer does), so a withdrawn host's live
#   connections can finish; new flows follow BGP. --no-pin and --no-resilient show what each
#   of the two buys (the drained host's and the other hosts' live connections).
# - hostI: the service address 10.100.0.1 on lo, ringfwd (same config everywhere:
#   source_hash over the backends, active health checks, shutdown_delay), BIRD with
#   deploy/bgp/bird-ringfwd.conf and deploy/bgp/ringfwd-bgp-check.sh, which announces the
#   address while ringfwd's /healthz answers 200 and withdraws it when not.
#
# Scenarios (each prints one JSON line on stdout; progress goes to stderr):
#   steady        short sessions from every client address: spread over every host, and each
#                 client address gets the same backend whichever host took it
#   drain         SIGTERM to one host under load: withdrawn before its listener closes, its
#                 live connections finish, the others lose nothing, nothing refused
#   upgrade       `run --takeover` on one host under load: nothing refused or failed
#   crash         one host cut off and SIGKILLed under load (ringfwd and BIRD): only its
#                 connections break; new ones reach the survivors once the hold time expires
#   backend_loss  one backend killed: every host's health checks take it out; only its
#                 clients move to another backend
#
# --quick: 3 hosts, a few seconds a scenario (CI: tests/fleet.rs). Needs root, iproute2,
# bird2, iptables and python3. Exits non-zero when a scenario could not run; the figures are
# judged by the caller (tests/fleet.rs asserts them).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
quick=0
hosts=3
bin=
pin=1
resilient_wanted=1
keep_logs=
while (($#)); do
    case $1 in
    --quick) quick=1; shift ;;
    --hosts) hosts=$2; shift 2 ;;
    --bin) bin=$2; shift 2 ;;
    --no-pin) pin=0; shift ;;
    --no-resilient) resilient_wanted=0; shift ;;
    --keep-logs) keep_logs=$2; shift 2 ;;
    -h | --help) sed -n '2,40p' "$0"; exit 0 ;;
    *) echo "fleet: unknown argument $1" >&2; exit 2 ;;
    esac
done
((hosts >= 3 && hosts <= 9)) || { echo "fleet: --hosts must be 3..9 (the scenarios use hosts 1, 2 and 3)" >&2; exit 2; }
if [[ -z $bin ]]; then
    bin=${CARGO_TARGET_DIR:-$here/target}/release/ringfwd
    [[ -x $bin ]] || (cd "$here" && cargo build --release --bin ringfwd >&2)
fi
[[ -x $bin ]] || { echo "fleet: no ringfwd binary at $bin" >&2; exit 2; }
for tool in ip bird birdc iptables python3 ss; do
    command -v "$tool" >/dev/null || { echo "fleet: $tool is missing (apt-get install iproute2 bird2 iptables python3)" >&2; exit 2; }
done
[[ $(id -u) == 0 ]] || { echo "fleet: needs root (network namespaces)" >&2; exit 2; }

# Sizes and timers.
if ((quick)); then
    clients=64 per_client=4 hold=24 rate=40 settle=1 run_after=2
else
    clients=200 per_client=8 hold=120 rate=150 settle=3 run_after=8
fi
hold_time=3 # BGP hold time (s), deploy/bgp/bird-ringfwd.conf and the router's
shutdown_delay=2
shutdown_grace=15
buckets=128
backends=4
vip=10.100.0.1
port=80

tag="rfl$$"
R="$tag-r" CL="$tag-c" BE="$tag-b"
H() { echo "$tag-h$1"; }
work=$(mktemp -d "/tmp/ringfwd-fleet.XXXXXX")
py="$here/scripts/fleet_peer.py"
pids=()

log() { printf '[fleet %s] %s\n' "$(date +%T.%3N)" "$*" >&2; }
now_ms() { date +%s%3N; }
die() { log "FAILED: $*"; exit 1; }

cleanup() {
    local rc=$?
    set +e
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    sleep 0.3
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done
    # Anything else still running inside our namespaces was started by this script.
    for ns in "$R" "$CL" "$BE" $(for i in $(seq 1 "$hosts"); do H "$i"; done); do
        for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
        ip netns del "$ns" 2>/dev/null
    done
    if [[ -n $keep_logs ]]; then
        mkdir -p "$keep_logs" && cp -r "$work"/. "$keep_logs"/
    fi
    if ((rc != 0)); then
        for f in "$work"/h*/ringfwd.log "$work"/h*/check.log "$work"/r/bird.log; do
            [[ -f $f ]] && { echo "--- $f (last lines)" >&2; tail -n 15 "$f" >&2; }
        done
    fi
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

bg() { # NS LOG CMD...: runs CMD in NS in the background; its pid in $last
    local ns=$1 out=$2
    shift 2
    ip netns exec "$ns" "$@" >"$out" 2>&1 &
    last=$!
    pids+=("$last")
}

# ---------------------------------------------------------------- topology
log "namespaces ($tag), $hosts hosts"
for ns in "$R" "$CL" "$BE" $(for i in $(seq 1 "$hosts"); do H "$i"; done); do
    ip netns add "$ns"
    ip -n "$ns" link set lo up
done
ip netns exec "$R" sysctl -qw net.ipv4.ip_forward=1 net.ipv4.fib_multipath_hash_policy=1 \
    net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0
# client: 10.90.0.10.. on one link to the router
ip -n "$R" link add name cl type veth peer name r netns "$CL"
ip -n "$R" addr add 10.90.0.1/16 dev cl
ip -n "$R" link set cl up
ip -n "$CL" link set r up
client_ips=()
for c in $(seq 1 "$clients"); do client_ips+=("10.90.$((c / 250)).$((c % 250 + 4))"); done
ip -n "$CL" addr add 10.90.0.2/16 dev r
for a in "${client_ips[@]}"; do echo "addr add $a/16 dev r"; done | ip -n "$CL" -batch -
ip -n "$CL" route add default via 10.90.0.1
clients_csv=$(IFS=,; echo "${client_ips[*]}")
# backends: a bridge, one address per backend, one port per host
ip -n "$BE" link add name br0 type bridge
ip -n "$BE" link set br0 up
for b in $(seq 1 "$backends"); do ip -n "$BE" addr add "10.93.0.$((100 + b))/24" dev br0; done
upstreams=$(for b in $(seq 1 "$backends"); do printf '"10.93.0.%d:9000", ' $((100 + b)); done)
hosts_by_addr="{"
for i in $(seq 1 "$hosts"); do
    h=$(H "$i")
    ip -n "$R" link add name "h$i" type veth peer name uplink netns "$h"
    ip -n "$R" addr add "10.92.$i.1/24" dev "h$i"
    ip -n "$R" link set "h$i" up
    ip -n "$h" addr add "10.92.$i.2/24" dev uplink
    ip -n "$h" link set dev uplink up
    ip -n "$h" route add default via "10.92.$i.1"
    ip -n "$h" addr add "$vip/32" dev lo
    ip -n "$h" link add name be type veth peer name "h$i" netns "$BE"
    ip -n "$h" addr add "10.93.0.$((10 + i))/24" dev be
    ip -n "$h" link set be up
    ip -n "$BE" link set "h$i" master br0 up
    ip -n "$R" nexthop add id "$i" via "10.92.$i.2" dev "h$i"
    hosts_by_addr+="\"10.93.0.$((10 + i))\": \"h$i\","
    mkdir -p "$work/h$i"
done
hosts_by_addr="${hosts_by_addr%,}}"

# The service route: a resilient group where the kernel has one.
resilient=true
if ((!resilient_wanted)); then
    resilient=false
elif ! ip -n "$R" nexthop add id 999 group 1 type resilient buckets 8 2>/dev/null; then
    resilient=false
    log "this kernel has no resilient nexthop groups: using a plain (hash-threshold) group"
fi
ip -n "$R" nexthop del id 999 2>/dev/null || true

# Flow pinning: the first packet's host (its veth's ifindex) is kept in the conntrack mark;
# later packets of the flow carry it as fwmark and are routed to that host whatever BGP says.
if ((pin)); then
    ip netns exec "$R" iptables -t mangle -A PREROUTING -i cl -d "$vip" -j CONNMARK --restore-mark
    for i in $(seq 1 "$hosts"); do
        ip netns exec "$R" iptables -t mangle -A POSTROUTING -o "h$i" -d "$vip" \
            -m conntrack --ctstate NEW -j CONNMARK --set-mark "$i"
        ip -n "$R" rule add fwmark "$i" lookup "$((200 + i))" priority 100
        ip -n "$R" route add "$vip/32" via "10.92.$i.2" dev "h$i" table "$((200 + i))"
    done
fi

# ---------------------------------------------------------------- processes
mkdir -p "$work/r" "$work/be"
for b in $(seq 1 "$backends"); do
    bg "$BE" "$work/be/b$b.log" python3 "$py" backend "b$b" "10.93.0.$((100 + b)):9000"
    eval "backend_pid_$b=$last"
done

{
    echo "router id 10.90.0.1;"
    echo "log \"$work/r/bird.log\" all;"
    echo "protocol device { }"
    echo "protocol kernel service_paths {"
    echo "    ipv4 { import none; export where net = $vip/32; };"
    echo "    kernel table 100;"
    echo "    merge paths on limit 16;"
    echo "}"
    echo "template bgp ringfwd_host {"
    echo "    local as 65000;"
    echo "    hold time $hold_time; keepalive time 1; connect retry time 1; connect delay time 1;"
    echo "    error wait time 1, 4;"
    echo "    ipv4 { import where net = $vip/32; export none; };"
    echo "}"
    for i in $(seq 1 "$hosts"); do
        echo "protocol bgp h$i from ringfwd_host { neighbor 10.92.$i.2 as 65001; }"
    done
} >"$work/r/bird.conf"
bg "$R" "$work/r/bird.out" bird -f -c "$work/r/bird.conf" -s "$work/r/bird.ctl"

# Mirrors table 100 (what BGP elected) into the resilient group the service route uses.
group_sync() {
    local want have=""
    set +e
    while :; do
        want=$(ip -n "$R" route show table 100 "$vip/32" | grep -o 'via 10\.92\.[0-9]*\.2' |
            sed 's/via 10\.92\.\([0-9]*\)\.2/\1/' | sort -n | paste -sd/ -) || true
        if [[ $want != "$have" ]]; then
            if [[ -z $want ]]; then
                ip -n "$R" route del "$vip/32" 2>/dev/null || true
            else
                if $resilient; then
                    ip -n "$R" nexthop replace id 100 group "$want" type resilient \
                        buckets "$buckets" idle_timer 1
                else
                    ip -n "$R" nexthop replace id 100 group "$want"
                fi
                ip -n "$R" route replace "$vip/32" nhid 100
            fi
            echo "$(now_ms) group ${want:-empty}"
            have=$want
        fi
        sleep 0.05
    done
}
group_sync >"$work/r/group.log" 2>&1 &
pids+=($!)

in_group() { # I: true while host I is in the service route's group
    grep -q "group.*\b$1\b" <(tail -n 1 "$work/r/group.log")
}

config_for() { # I
    cat <<EOF
workers = 1
admin = "127.0.0.1:9100"
control_socket = "$work/h$1/control.sock"
shutdown_delay = "${shutdown_delay}s"
shutdown_grace = "${shutdown_grace}s"

[[rule]]
name = "service"
listen = "$vip:$port"
upstream = [${upstreams%, }]
balance = "source_hash"

[rule.health_check]
interval = "300ms"
timeout = "250ms"
fall = 2
rise = 2
EOF
}

start_ringfwd() { # I [--takeover]: starts ringfwd on host I, waits for its listening line
    local i=$1 h n
    h=$(H "$i")
    config_for "$i" >"$work/h$i/ringfwd.toml"
    n=$(ls "$work/h$i" | grep -c '^ringfwd\..*\.out$' || true)
    local out="$work/h$i/ringfwd.$n.out"
    local args=(run --config "$work/h$i/ringfwd.toml")
    [[ ${2:-} == --takeover ]] && args+=(--takeover "$work/h$i/control.sock")
    ip netns exec "$h" "$bin" "${args[@]}" >"$out" 2>>"$work/h$i/ringfwd.log" &
    pids+=($!)
    eval "ringfwd_pid_$i=$!"
    for _ in $(seq 1 200); do
        grep -q '^listening' "$out" && return 0
        sleep 0.05
    done
    die "ringfwd on h$i did not start"
}

start_speaker() { # I: BIRD and the check script on host I
    local i=$1 h
    h=$(H "$i")
    sed -e "s/^router id .*/router id 10.92.$i.2;/" \
        -e "s|^define SERVICE = .*|define SERVICE = $vip/32;|" \
        -e "s/^log syslog all;/log \"${work//\//\\/}\/h$i\/bird.log\" all;/" \
        -e "s/neighbor 192.0.2.1 as 65000;/neighbor 10.92.$i.1 as 65000;/" \
        -e "s/hold time 3;/hold time $hold_time;/" \
        "$here/deploy/bgp/bird-ringfwd.conf" >"$work/h$i/bird.conf"
    bg "$h" "$work/h$i/bird.out" bird -f -c "$work/h$i/bird.conf" -s "$work/h$i/bird.ctl"
    eval "bird_pid_$i=$last"
    for _ in $(seq 1 100); do [[ -S $work/h$i/bird.ctl ]] && break; sleep 0.05; done
    bg "$h" "$work/h$i/check.log" "$here/deploy/bgp/ringfwd-bgp-check.sh" \
        --admin 127.0.0.1:9100 --birdc-socket "$work/h$i/bird.ctl" --interval 0.2 --rise 2
    eval "check_pid_$i=$last"
}

wait_group() { # I in|out SECONDS
    local deadline=$(($(now_ms) + $3 * 1000))
    while (($(now_ms) < deadline)); do
        if [[ $2 == in ]]; then in_group "$1" && return 0; else in_group "$1" || return 0; fi
        sleep 0.05
    done
    return 1
}

for i in $(seq 1 "$hosts"); do
    start_ringfwd "$i"
    start_speaker "$i"
done
t0=$(now_ms)
for i in $(seq 1 "$hosts"); do
    wait_group "$i" in 30 || die "host h$i never got into the service route"
done
log "every host announced in $(($(now_ms) - t0)) ms: $(tail -n 1 "$work/r/group.log")"

# ---------------------------------------------------------------- helpers for scenarios
load_start() { # NAME: starts held connections and a stream of new ones
    rm -f "$work/$1.stop" "$work/$1.json" "$work/$1.json.ready"
    bg "$CL" "$work/$1.load.log" python3 "$py" load "$work/$1.json" --vip "$vip:$port" \
        --clients "$clients_csv" --hold "$hold" --rate "$rate" --stop "$work/$1.stop"
    load_pid=$last
    for _ in $(seq 1 300); do [[ -e $work/$1.json.ready ]] && return 0; sleep 0.05; done
    die "the load for $1 never got going: $(cat "$work/$1.load.log")"
}
load_stop() { # NAME
    touch "$work/$1.stop"
    wait "$load_pid" || die "the load for $1 failed: $(cat "$work/$1.load.log")"
}
round() { # NAME
    ip netns exec "$CL" python3 "$py" round "$work/$1.json" --vip "$vip:$port" \
        --clients "$clients_csv" --per-client "$per_client"
}
facts() { # JSON members (without braces) -> facts file path
    echo "{\"hosts_by_addr\": $hosts_by_addr, $1}" >"$work/facts.json"
    echo "$work/facts.json"
}
listening() { # I: true while host I listens on the service port
    [[ -n $(ss -N "$(H "$1")" -Hltn "sport = :$port" 2>/dev/null) ]]
}
upstream_down_everywhere() { # MEMBER
    local i
    for i in $(seq 1 "$hosts"); do
        ip netns exec "$(H "$i")" python3 -c '
import sys, urllib.request
sys.stdout.write(urllib.request.urlopen("http://127.0.0.1:9100/upstreams", timeout=1).read().decode())' |
            python3 "$py" down "$1" || return 1
    done
}
common_facts="\"hosts\": $hosts, \"resilient_group\": $resilient, \"flow_pinning\": $( ((pin)) && echo true || echo false)"

# ---------------------------------------------------------------- steady
log "steady: $clients client addresses x $per_client sessions"
round steady
python3 "$py" summary steady "$(facts "$common_facts, \"save_mapping\": \"$work/mapping.json\"")" "$work/steady.json"

# ---------------------------------------------------------------- drain
target=2
log "drain: SIGTERM to h$target under load"
load_start drain
sleep "$settle"
t_sig=$(now_ms)
eval "kill -TERM \$ringfwd_pid_$target"
t_withdrawn= t_closed=
deadline=$((t_sig + (shutdown_delay + 10) * 1000))
while (($(now_ms) < deadline)) && [[ -z $t_withdrawn || -z $t_closed ]]; do
    [[ -z $t_withdrawn ]] && ! in_group "$target" && t_withdrawn=$(now_ms)
    [[ -z $t_closed ]] && ! listening "$target" && t_closed=$(now_ms)
    sleep 0.02
done
[[ -n $t_withdrawn && -n $t_closed ]] || die "drain: withdrawn=${t_withdrawn:-never} closed=${t_closed:-never}"
sleep "$run_after"
load_stop drain
eval "p=\$ringfwd_pid_$target"
drain_exit=timeout
for _ in $(seq 1 100); do
    if ! kill -0 "$p" 2>/dev/null; then
        wait "$p" && drain_exit=0 || drain_exit=$?
        break
    fi
    sleep 0.05
done
if [[ $drain_exit == timeout ]]; then
    # Its connections were cut elsewhere (--no-pin): it would wait out shutdown_grace.
    kill -9 "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
fi
python3 "$py" summary drain "$(facts "$common_facts, \"target\": \"h$target\", \
\"shutdown_delay_ms\": $((shutdown_delay * 1000)), \"withdrawn_ms\": $((t_withdrawn - t_sig)), \
\"listener_closed_ms\": $((t_closed - t_sig)), \"exit\": \"$drain_exit\"")" "$work/drain.json"
start_ringfwd "$target"
wait_group "$target" in 20 || die "h$target did not come back after the drain"

# ---------------------------------------------------------------- upgrade
target=3
log "upgrade: run --takeover on h$target under load"
load_start upgrade
sleep "$settle"
eval "old=\$ringfwd_pid_$target"
start_ringfwd "$target" --takeover
in_group "$target" && stayed=true || stayed=false
sleep "$run_after"
load_stop upgrade
old_exit=timeout
for _ in $(seq 1 100); do
    if ! kill -0 "$old" 2>/dev/null; then
        wait "$old" && old_exit=0 || old_exit=$?
        break
    fi
    sleep 0.05
done
python3 "$py" summary upgrade "$(facts "$common_facts, \"target\": \"h$target\", \
\"stayed_announced\": $stayed, \"old_exit\": \"$old_exit\"")" "$work/upgrade.json"

# ---------------------------------------------------------------- crash
target=1
log "crash: h$target cut off, ringfwd and BIRD SIGKILLed, under load"
load_start crash
sleep "$settle"
h=$(H "$target")
t_crash=$(now_ms)
# Nothing leaves the host any more (no FIN, no BGP notification): a power cut, as the
# router sees it. Then everything on it dies.
ip -n "$h" route del default
ip -n "$h" addr flush dev uplink
eval "kill -9 \$ringfwd_pid_$target \$bird_pid_$target \$check_pid_$target"
t_withdrawn=
while (($(now_ms) < t_crash + (hold_time + 10) * 1000)); do
    in_group "$target" || { t_withdrawn=$(now_ms); break; }
    sleep 0.02
done
[[ -n $t_withdrawn ]] || die "crash: h$target was never withdrawn"
sleep "$run_after"
load_stop crash
python3 "$py" summary crash "$(facts "$common_facts, \"target\": \"h$target\", \
\"hold_time_ms\": $((hold_time * 1000)), \"withdrawn_ms\": $((t_withdrawn - t_crash)), \
\"withdrawn_at\": $t_withdrawn")" "$work/crash.json"
# Back up: its address, its routes, its processes.
ip -n "$h" addr add "10.92.$target.2/24" dev uplink
ip -n "$h" route add default via "10.92.$target.1"
rm -f "$work/h$target/bird.ctl" "$work/h$target/control.sock"
start_ringfwd "$target"
start_speaker "$target"
wait_group "$target" in 30 || die "h$target did not come back after the crash"

# ---------------------------------------------------------------- backend loss
lost=2
log "backend_loss: b$lost killed"
t_kill=$(now_ms)
eval "kill -9 \$backend_pid_$lost"
t_down=
while (($(now_ms) < t_kill + 15000)); do
    upstream_down_everywhere "10.93.0.$((100 + lost)):9000" && { t_down=$(now_ms); break; }
    sleep 0.1
done
[[ -n $t_down ]] || die "backend_loss: not every host took b$lost out"
# When each host marked it down, from its own log line (the poll above is slower).
t_down=$(python3 - "10.93.0.$((100 + lost)):9000" "$work"/h*/ringfwd.log <<'PY'
import datetime, sys
member, last = sys.argv[1], 0
for path in sys.argv[2:]:
    t = 0
    for line in open(path, errors="replace"):
        if "upstream member down" in line and f"member={member}" in line:
            ts = line.split()[0].rstrip("Z")[:26]
            dt = datetime.datetime.fromisoformat(ts).replace(tzinfo=datetime.timezone.utc)
            t = int(dt.timestamp() * 1000)
    last = max(last, t)
print(last)
PY
)
round backend_loss
python3 "$py" summary backend_loss "$(facts "$common_facts, \"lost_backend\": \"b$lost\", \
\"marked_down_everywhere_ms\": $((t_down - t_kill)), \"mapping_before\": \"$work/mapping.json\"")" \
    "$work/backend_loss.json"
log "done"
