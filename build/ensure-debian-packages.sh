#!/bin/sh
# Installs the Debian packages named as arguments when any is missing, so
# `make test` works on a fresh machine. apt-get needs root; CI runs as root.
set -eu

say() { printf 'ensure-debian-packages: %s\n' "$*"; }
err() { say "error: $*" >&2; exit 1; }

missing_packages() {
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || printf '%s ' "$pkg"
    done
}

main() {
    missing=$(missing_packages "$@")
    [ -z "$missing" ] && return 0
    command -v apt-get >/dev/null 2>&1 || err "apt-get not found; install these by hand: $missing"
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || err "need root to install: $missing"
        sudo=sudo
    fi
    say "installing $missing"
    # shellcheck disable=SC2086  # word splitting of the package list is intended
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $missing >/dev/null 2>&1 || {
        $sudo apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $missing >/dev/null
    }
}

main "$@"
