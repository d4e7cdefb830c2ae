#!/usr/bin/env bash
# The scratch container image, built and run with Debian's podman (no registry needed).
#
#   scripts/container.sh build          static release build, then the image
#                                       localhost/ringfwd:scratch (deploy/docker/Dockerfile.scratch)
#   scripts/container.sh flags          the `podman run` flags this host needs, one per line
#   scripts/container.sh run ARGS...    podman run --rm with those flags and the io_uring seccomp
#                                       profile; ARGS go to ringfwd (default: run --config ...)
#   scripts/container.sh k8s-validate   deploy/k8s/*.yaml against the Kubernetes schemas of
#                                       every version DEPLOY.md names (kubernetes-validate
#                                       --strict, installed from PyPI into a venv)
#
# `build` installs podman and runc with apt-get when they are missing (as root). The static
# binary is x86_64-unknown-linux-gnu with `-C target-feature=+crt-static`, built in
# $CARGO_TARGET_DIR (default target/), so a second build only relinks what changed.
#
# Why these run flags: `--runtime runc` (crun refuses hosts with hybrid cgroups, like CI's);
# `--ulimit nofile=N:N --ulimit nproc=M:M` within what the runtime may set (podman's
# defaults, nofile 1048576, exceed this host's hard limit and runc fails with "error setting
# rlimit type 7: operation not permitted"; nproc may not exceed conmon's own hard limit,
# which podman 4.3 sets to kernel.pid_max); `--network host` (no CNI/netavark setup
# needed; the container listens on the host's addresses).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
image=localhost/ringfwd:scratch
target_dir=${CARGO_TARGET_DIR:-$here/target}
triple=x86_64-unknown-linux-gnu
# The Kubernetes versions the manifests are checked against (docs/DEPLOY.md names them).
k8s_versions=(1.28.0 1.29.0 1.30.0 1.31.0 1.32.0 1.33.0 1.34.0 1.35.0 1.36.0 1.37.0)
k8s_validate_pin=kubernetes-validate==1.37.0

log() { printf '[container] %s\n' "$*" >&2; }
# The build's staging directory, removed however the script ends.
stage=
trap 'rm -rf "${stage:-/nonexistent-ringfwd-stage}"' EXIT

need_podman() {
    local missing=()
    command -v podman >/dev/null || missing+=(podman)
    command -v runc >/dev/null || missing+=(runc)
    [[ -e /usr/share/containers/seccomp.json ]] || missing+=(golang-github-containers-common)
    if ((${#missing[@]})); then
        [[ $(id -u) == 0 ]] || { log "missing ${missing[*]}; install them (apt-get) as root"; exit 1; }
        log "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# The limits: the hard limits of this shell, nproc capped at kernel.pid_max (see above).
flags() {
    local nofile nproc pid_max
    nofile=$(ulimit -Hn)
    [[ $nofile == unlimited ]] && nofile=$(cat /proc/sys/fs/nr_open)
    nproc=$(ulimit -Hu)
    pid_max=$(cat /proc/sys/kernel/pid_max)
    if [[ $nproc == unlimited ]] || ((nproc > pid_max)); then nproc=$pid_max; fi
    printf '%s\n' --runtime runc --network host \
        --ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc"
}

build() {
    need_podman
    log "static release build ($triple, +crt-static) in $target_dir"
    (cd "$here" && RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
        cargo build --release --locked --bin ringfwd --target "$triple" >&2)
    local bin=$target_dir/$triple/release/ringfwd
    if ! file "$bin" 2>/dev/null | grep -q 'static'; then
        # `file` may be missing: ask the ELF header instead (no PT_INTERP: static).
        if readelf -l "$bin" 2>/dev/null | grep -q 'INTERP'; then
            log "$bin is not static"
            exit 1
        fi
    fi
    stage=$(mktemp -d /tmp/ringfwd-image.XXXXXX)
    cp "$bin" "$stage/ringfwd"
    cp "$here/ringfwd.toml" "$stage/"
    cp "$here"/deploy/docker/scratch-etc/{passwd,group,nsswitch.conf} "$stage/"
    local old new
    old=$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
    log "podman build -f deploy/docker/Dockerfile.scratch -t $image"
    podman build --quiet --runtime runc -f "$here/deploy/docker/Dockerfile.scratch" -t "$image" "$stage"
    new=$(podman image inspect --format '{{.Id}}' "$image")
    # A rebuild leaves the previous image untagged: remove it (unless a container uses it).
    if [[ -n $old && $old != "$new" ]]; then
        podman rmi "$old" >/dev/null 2>&1 || true
    fi
}

run() {
    need_podman
    local f
    mapfile -t f < <(flags)
    (($#)) || set -- run --config /etc/ringfwd/ringfwd.toml
    exec podman run --rm "${f[@]}" \
        --security-opt "seccomp=$here/deploy/docker/seccomp-io_uring.json" "$image" "$@"
}

k8s_validate() {
    local venv=$target_dir/k8s-validate-venv
    if ! "$venv/bin/kubernetes-validate" --version >/dev/null 2>&1; then
        log "installing $k8s_validate_pin into $venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check "$k8s_validate_pin"
    fi
    local v files=("$@")
    ((${#files[@]})) || files=("$here"/deploy/k8s/*.yaml)
    for v in "${k8s_versions[@]}"; do
        "$venv/bin/kubernetes-validate" --strict --quiet -k "$v" "${files[@]}" || {
            log "invalid against Kubernetes $v: ${files[*]}"
            return 1
        }
        log "Kubernetes $v: ${#files[@]} files valid (--strict)"
    done
}

case ${1:-} in
build) build ;;
flags) flags ;;
run) shift; run "$@" ;;
k8s-validate) shift; k8s_validate "$@" ;;
*) sed -n '2,22p' "$0" >&2; exit 2 ;;
esac
