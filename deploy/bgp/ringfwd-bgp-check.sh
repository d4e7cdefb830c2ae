#!/usr/bin/env bash
# ringfwd-bgp-check: keep this host's BGP announcement in step with ringfwd's health.
#
# Polls ringfwd's admin endpoint (GET /healthz) and, through birdc, enables the BIRD static
# protocol that announces the service address (bird-ringfwd.conf beside this file) after
# RISE answers of 200 in a row, and disables it — a BGP withdrawal — at the first answer
# that is not 200 (503 "draining" from ringfwd's first SIGTERM on) or no answer at all
# (ringfwd down). On exit (SIGTERM/SIGINT) it withdraws too: a host without its checker
# must not keep attracting traffic. Run it beside BIRD under the same supervisor.
#
#   ringfwd-bgp-check.sh [--admin 127.0.0.1:9100] [--birdc-socket /run/bird/bird.ctl]
#                        [--protocol ringfwd_vip] [--interval 0.5] [--rise 2]
#
# Every change of state is one line on stdout: "<unix ms> announce|withdraw <why>".
# Needs bash, coreutils' timeout and birdc; no curl (the probe is bash's /dev/tcp).
set -u
admin=127.0.0.1:9100
socket=/run/bird/bird.ctl
proto=ringfwd_vip
interval=0.5
rise=2
while (($#)); do
    case $1 in
    --admin) admin=$2; shift 2 ;;
    --birdc-socket) socket=$2; shift 2 ;;
    --protocol) proto=$2; shift 2 ;;
    --interval) interval=$2; shift 2 ;;
    --rise) rise=$2; shift 2 ;;
    -h | --help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "ringfwd-bgp-check: unknown argument $1" >&2; exit 2 ;;
    esac
done
host=${admin%:*}
port=${admin##*:}

# 0 when /healthz answers 200 within a second.
healthy() {
    timeout 1 bash -c '
        exec 3<>"/dev/tcp/$0/$1" || exit 1
        printf "GET /healthz HTTP/1.0\r\nHost: ringfwd\r\n\r\n" >&3
        IFS= read -r status <&3 || exit 1
        [[ $status == HTTP/1.?" 200 "* ]]' "$host" "$port" 2>/dev/null
}

# Tells BIRD; true when birdc answered (the protocol may already be in that state).
bird() { birdc -s "$socket" "$1" "$proto" >/dev/null 2>&1; }

state=unknown
ok=0
withdraw_and_exit() {
    bird disable
    echo "$(date +%s%3N) withdraw checker stopped"
    exit 0
}
trap withdraw_and_exit TERM INT
# Withdraw at start: whatever BIRD was told before, nothing is known to be healthy yet.
bird disable && state=down
while :; do
    if healthy; then
        ok=$((ok + 1))
        if [[ $state != up ]] && ((ok >= rise)); then
            bird enable && state=up && echo "$(date +%s%3N) announce /healthz 200 x$ok"
        fi
    else
        ok=0
        if [[ $state != down ]]; then
            bird disable && state=down && echo "$(date +%s%3N) withdraw /healthz not 200"
        fi
    fi
    # sleep in the background and wait, so a SIGTERM is acted on at once.
    sleep "$interval" &
    wait $!
done
