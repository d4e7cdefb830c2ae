#!/usr/bin/env bash
# Generates what the Debian package ships besides the binary and the repository's files: the
# man pages and the bash, zsh and fish completions, made by the release binary from its own
# command-line definition (`ringfwd generate`, hidden from --help), so they always match it.
#
#   bash deploy/gen-assets.sh && cargo deb
#
# Writes target/assets/ in the source tree (Cargo.toml's [package.metadata.deb] assets read it
# from there, whatever CARGO_TARGET_DIR is): man/*.1.gz and completions/{ringfwd.bash,
# _ringfwd,ringfwd.fish}. Builds the release binary first (cargo deb then reuses it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --release --quiet
bin=${CARGO_TARGET_DIR:-target}/release/ringfwd
out=target/assets
rm -rf "$out"
mkdir -p "$out/man" "$out/completions"
"$bin" generate man "$out/man" 2>/dev/null
# Debian installs man pages compressed; -n keeps the name and time out, so the bytes only
# change when the page does.
gzip -9n "$out"/man/*.1
for shell in bash zsh fish; do
    "$bin" generate completions "$shell" "$out/completions" 2>/dev/null
done
echo "gen-assets: $(ls "$out/man" | wc -l) man pages, completions for bash, zsh, fish in $out"
