#!/usr/bin/env bash
# Quick start: build ringfwd, run it on the shipped ringfwd.toml in front of an echo backend,
# send a few lines through it and show them coming back, with the forwarder's access-log line.
#
#   scripts/quickstart.sh          run the demo, then stop everything it started
#   scripts/quickstart.sh --keep   after the demo, keep the forwarder running in the
#                                  foreground (its log streams here) until Ctrl-C
#
# Uses 127.0.0.1:8080 (the forwarder, as in ringfwd.toml) and 127.0.0.1:9000 (the echo
# backend). Everything it starts is stopped by pid when it exits, however it exits.
set -euo pipefail

keep=false
for arg in "$@"; do
    case "$arg" in
    --keep) keep=true ;;
    -h | --help)
        sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "quickstart: unknown option $arg (try --help)" >&2
        exit 2
        ;;
    esac
done

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
config=ringfwd.toml
echo_addr=127.0.0.1:9000

step() { printf '\n==> %s\n' "$*"; }
die() {
    echo "quickstart: $*" >&2
    exit 1
}

# --- cleanup: stop what we started, by pid, with a bounded wait -----------------------------
work=$(mktemp -d "${TMPDIR:-/tmp}/ringfwd-quickstart.XXXXXX")
pids=()
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    local pid i n=${#pids[@]}
    # Newest first: the forwarder stops before its upstream disappears.
    for ((i = n - 1; i >= 0; i--)); do
        kill -TERM "${pids[i]}" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        # Up to 5 s each (the forwarder has no live connections left, so it stops at once).
        for ((i = 0; i < 100; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.05
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "quickstart: pid $pid did not stop on SIGTERM; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# wait_for_line FILE PATTERN PID WHAT: poll FILE for a line matching PATTERN for up to 20 s,
# failing early (with PID's stderr) if PID exits first. Prints the matching line.
wait_for_line() {
    local file=$1 pattern=$2 pid=$3 what=$4 line i
    for ((i = 0; i < 400; i++)); do
        line=$(grep -m1 -E "$pattern" "$file" 2>/dev/null || true)
        if [[ -n $line ]]; then
            printf '%s\n' "$line"
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "quickstart: $what exited before it was ready:" >&2
            cat "$work"/*.err >&2 2>/dev/null || true
            return 1
        fi
        sleep 0.05
    done
    echo "quickstart: $what was not ready within 20 s" >&2
    return 1
}

# --- 1. build -----------------------------------------------------------------------------
step "Building ringfwd (release)"
cargo build --release
bin="${CARGO_TARGET_DIR:-$root/target}/release/ringfwd"
[[ -x $bin ]] || die "no binary at $bin after the build"

step "Checking $config"
"$bin" check --config "$config" >/dev/null
echo "$config is valid"

# --- 2. the echo backend --------------------------------------------------------------------
step "Starting the echo backend: ringfwd echo --listen $echo_addr"
"$bin" echo --listen "$echo_addr" >"$work/echo.out" 2>"$work/echo.err" &
pids+=($!)
echo_pid=$!
wait_for_line "$work/echo.out" '^listening addr=' "$echo_pid" "the echo backend" >/dev/null
echo "echo backend ready (pid $echo_pid)"

# --- 3. the forwarder -----------------------------------------------------------------------
step "Starting the forwarder: ringfwd run --config $config"
"$bin" run --config "$config" >"$work/fwd.out" 2>"$work/fwd.err" &
pids+=($!)
fwd_pid=$!
ready=$(wait_for_line "$work/fwd.out" '^listening rule=' "$fwd_pid" "the forwarder")
echo "$ready"
fwd_addr=$(sed -E 's/.* addr=([^ ]+).*/\1/' <<<"$ready")
host=${fwd_addr%:*}
port=${fwd_addr##*:}
if grep -q 'io_uring unavailable' "$work/fwd.err"; then
    echo "note: io_uring is unavailable here, so the tokio engine runs instead:"
    grep -m1 'io_uring unavailable' "$work/fwd.err"
fi

# --- 4. bytes through it --------------------------------------------------------------------
step "Sending three lines to $fwd_addr (client -> ringfwd -> echo -> ringfwd -> client)"
exec 3<>"/dev/tcp/$host/$port"
for msg in "hello through ringfwd" "second line" "third line"; do
    printf '%s\n' "$msg" >&3
    if ! IFS= read -r -t 5 reply <&3; then
        die "no reply to \"$msg\" within 5 s"
    fi
    printf '  sent: %-24s got back: %s\n' "$msg" "$reply"
    [[ $reply == "$msg" ]] || die "the reply differs from what was sent"
done
exec 3>&-

step "The forwarder's access-log line for that connection"
wait_for_line "$work/fwd.err" 'session closed' "$fwd_pid" "the forwarder" ||
    die "no access-log line (is access_log = false in $config?)"

# --- 5. keep it running, or stop --------------------------------------------------------------
if $keep; then
    step "Forwarder running (pid $fwd_pid) on $fwd_addr -> $echo_addr; Ctrl-C stops everything"
    cat <<EOF
Try, from another terminal:
  bash -c 'exec 3<>/dev/tcp/$host/$port; echo hi >&3; head -1 <&3'
  nc -N $host $port    # type lines, Ctrl-D half-closes (nc from netcat-openbsd: apt install netcat-openbsd)
  $bin ping $fwd_addr
Its log follows.
EOF
    tail -n +1 -f --pid="$fwd_pid" "$work/fwd.err" &
    pids+=($!)
    wait "$fwd_pid" || true
else
    step "Done: stopping the forwarder and the echo backend (re-run with --keep to play with it)"
fi
