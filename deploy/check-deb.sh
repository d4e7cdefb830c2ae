#!/usr/bin/env bash
# Checks the Debian package that `cargo deb` built, and the systemd units in it.
#
#   deploy/check-deb.sh [--install] [PACKAGE.deb]     (default: the newest ringfwd_*.deb in
#                                                      $CARGO_TARGET_DIR/debian, target/debian if unset)
#
# 1. `dpkg -c` lists every file the package must install; the control archive has the
#    conffile, the postinst that creates the user, and the adduser dependency.
# 2. The packaged binary accepts the packaged config (`ringfwd check`).
# 3. `systemd-analyze verify --root` on the packaged units (service and socket), alone and with the
#    root-then-drop.conf drop-in, and (on systemd 253 or later, which knows its service type)
#    with the notify-reload.conf drop-in, in a root made of the package's files plus this
#    host's systemd units. It needs no running systemd (CI has none as PID 1). It only warns about
#    unknown keys, so any line it prints is a failure here.
# 4. With --install (CI, as root, where ringfwd is neither installed nor a user): installs the
#    package the way README says (apt install ./FILE), installs it again (postinst must be
#    idempotent), checks the user, the conffile and the binary, then purges it and removes
#    the user it created.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

install=0
if [[ ${1:-} == --install ]]; then
    install=1
    shift
fi
deb=${1:-$(ls -t "${CARGO_TARGET_DIR:-target}"/debian/ringfwd_*.deb 2>/dev/null | head -n 1)}
[[ -n $deb && -f $deb ]] || { echo "check-deb: no package (run cargo deb first)" >&2; exit 1; }
echo "package: $deb ($(du -h "$deb" | cut -f1))"

fail() { echo "check-deb: $*" >&2; exit 1; }

listing=$(dpkg -c "$deb" | awk '{ print $NF }' | sed 's|^\./|/|')
for f in \
    /usr/bin/ringfwd \
    /etc/ringfwd/ringfwd.toml \
    /usr/lib/systemd/system/ringfwd.service \
    /usr/lib/systemd/system/ringfwd.socket \
    /usr/share/ringfwd/sysctl/90-ringfwd.conf \
    /usr/share/ringfwd/systemd/root-then-drop.conf \
    /usr/share/ringfwd/systemd/net-admin.conf \
    /usr/share/ringfwd/systemd/notify-reload.conf \
    /usr/share/ringfwd/seccomp/seccomp-io_uring.json \
    /usr/share/doc/ringfwd/DEPLOY.md \
    /usr/share/doc/ringfwd/copyright \
    /usr/share/man/man1/ringfwd.1.gz \
    /usr/share/man/man1/ringfwd-run.1.gz \
    /usr/share/man/man1/ringfwd-check.1.gz \
    /usr/share/bash-completion/completions/ringfwd \
    /usr/share/zsh/vendor-completions/_ringfwd \
    /usr/share/fish/vendor_completions.d/ringfwd.fish; do
    grep -qxF "$f" <<<"$listing" || fail "dpkg -c does not list $f"
done
[[ $(dpkg -c "$deb" | awk '$NF == "./usr/bin/ringfwd" { print $1 }') == -rwxr-xr-x ]] ||
    fail "/usr/bin/ringfwd is not mode 755"
echo "dpkg -c: all $(wc -l <<<"$listing") entries present as expected"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dpkg-deb -e "$deb" "$work/control"
grep -qxF /etc/ringfwd/ringfwd.toml "$work/control/conffiles" || fail "ringfwd.toml is not a conffile"
grep -q 'adduser --system --group --no-create-home' "$work/control/postinst" || fail "postinst does not create the user"
dpkg-deb -f "$deb" Depends | grep -qw adduser || fail "Depends lacks adduser"
echo "control: conffile, postinst (adduser), Depends: $(dpkg-deb -f "$deb" Depends)"

root=$work/root
dpkg-deb -x "$deb" "$root"
# The man pages and completions were generated from this binary's command line
# (deploy/gen-assets.sh): they must describe it, not an older one.
zcat "$root/usr/share/man/man1/ringfwd-run.1.gz" | sed 's/\\-/-/g' >"$work/ringfwd-run.1"
grep -q '^\.TH ringfwd-run 1' "$work/ringfwd-run.1" || fail "ringfwd-run.1.gz is not the man page of ringfwd run"
for flag in workers idle-timeout takeover; do
    grep -q -- "--$flag" "$work/ringfwd-run.1" || fail "ringfwd-run.1.gz does not document --$flag"
    grep -q -- "--$flag" "$root/usr/share/bash-completion/completions/ringfwd" ||
        fail "the bash completion does not complete --$flag"
done
if command -v man >/dev/null; then
    problems=$(man -l "$root/usr/share/man/man1/ringfwd.1.gz" 2>&1 >/dev/null || echo "man -l failed")
    [[ -z $problems ]] || fail "man -l ringfwd.1.gz: $problems"
fi
echo "man pages ($(grep -c '^/usr/share/man/man1/.*\.gz$' <<<"$listing")) and bash/zsh/fish completions: present, matching the binary's flags"
description=$(dpkg-deb -f "$deb" Description)
grep -q 'generated from Rust crate' <<<"$description" && fail "Description is cargo-deb's placeholder: $description"
grep -q 'License: MIT OR Apache-2.0' "$root/usr/share/doc/ringfwd/copyright" || fail "copyright lacks the license"
echo "control: Description \"$(head -n 1 <<<"$description")\"; license in copyright"
"$root/usr/bin/ringfwd" check --config "$root/etc/ringfwd/ringfwd.toml" >/dev/null ||
    fail "the packaged binary rejects the packaged config"
echo "ringfwd check: the packaged config is valid"

if command -v systemd-analyze >/dev/null; then
    # The host's units (targets the service is ordered against), never over the package's.
    mkdir -p "$root/usr/lib/systemd/system" "$root/bin"
    cp -an /usr/lib/systemd/system/. "$root/usr/lib/systemd/system/" 2>/dev/null || true
    cp /bin/kill "$root/bin/kill" # ExecReload's command
    verify() {
        local out
        out=$(systemd-analyze verify --root="$root" ringfwd.service ringfwd.socket 2>&1) || fail "systemd-analyze verify ($1): $out"
        [[ -z $out ]] || fail "systemd-analyze verify ($1) printed: $out"
        echo "systemd-analyze verify ($1): clean"
    }
    verify "ringfwd.service"
    mkdir -p "$root/etc/systemd/system/ringfwd.service.d"
    cp "$root/usr/share/ringfwd/systemd/root-then-drop.conf" "$root/etc/systemd/system/ringfwd.service.d/"
    verify "ringfwd.service + root-then-drop.conf"
    version=$(systemd-analyze --version | awk 'NR == 1 { print $2 }')
    if (( version >= 253 )); then
        cp "$root/usr/share/ringfwd/systemd/notify-reload.conf" "$root/etc/systemd/system/ringfwd.service.d/"
        verify "ringfwd.service + root-then-drop.conf + notify-reload.conf"
    else
        echo "systemd-analyze verify (notify-reload.conf): not checked, systemd $version predates Type=notify-reload (253)"
    fi
    rm -f "$root/etc/systemd/system/ringfwd.service.d/"*.conf
    cp "$root/usr/share/ringfwd/systemd/net-admin.conf" "$root/etc/systemd/system/ringfwd.service.d/"
    verify "ringfwd.service + net-admin.conf"
else
    fail "systemd-analyze not found (apt-get install systemd)"
fi

if ((install)); then
    if [[ $(id -u) != 0 ]] || dpkg -s ringfwd >/dev/null 2>&1 || getent passwd ringfwd >/dev/null; then
        echo "install test skipped: needs root, and neither the package nor a ringfwd user present"
        exit 0
    fi
    cleanup() {
        dpkg --purge ringfwd >/dev/null 2>&1 || true
        if getent passwd ringfwd >/dev/null; then deluser --system ringfwd >/dev/null 2>&1 || true; fi
        if getent group ringfwd >/dev/null; then delgroup --system ringfwd >/dev/null 2>&1 || true; fi
        rm -rf "$work"
    }
    trap cleanup EXIT
    deb_abs=$(realpath "$deb")
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$deb_abs" >"$work/apt.log" 2>&1 ||
        { cat "$work/apt.log" >&2; fail "apt install failed"; }
    getent passwd ringfwd >/dev/null || fail "postinst did not create the ringfwd user"
    getent group ringfwd >/dev/null || fail "postinst did not create the ringfwd group"
    uid=$(id -u ringfwd)
    dpkg -i "$deb_abs" >"$work/dpkg.log" 2>&1 || { cat "$work/dpkg.log" >&2; fail "re-install failed"; }
    [[ $(id -u ringfwd) == "$uid" ]] || fail "re-install changed the ringfwd user"
    /usr/bin/ringfwd check --config /etc/ringfwd/ringfwd.toml >/dev/null || fail "installed config rejected"
    echo "apt install, re-install: ringfwd user $(getent passwd ringfwd | cut -d: -f1,3,4,6,7), config valid"
    dpkg --purge ringfwd >/dev/null
    [[ ! -e /etc/ringfwd/ringfwd.toml ]] || fail "purge left /etc/ringfwd/ringfwd.toml"
    echo "purge: removed (the test's ringfwd user is removed too)"
fi
