#!/bin/sh
# Smoke-tests the release artifacts in a dist/ folder: SHA256SUMS matches,
# each binary is static and prints the version of VERSION (foreign ones
# under qemu-user-static, through binfmt_misc or by naming qemu directly),
# and so does the zipapp under python3.
#
#   smoke-test.sh [DIST]     (default: dist/ of this repository)
set -eu

say() { printf 'smoke-test: %s\n' "$*"; }
err() { say "error: $*" >&2; exit 1; }

need_cmd() {
    command -v "$1" >/dev/null 2>&1 || err "need '$1' (not found in PATH)"
}

# The command that runs a binary of this asset architecture here.
runner_for() {
    machine=$(uname -m)
    case "$1:$machine" in
        amd64:x86_64 | arm64:aarch64) return 0 ;;
        amd64:*) qemu="qemu-x86_64-static" ;;
        arm64:*) qemu="qemu-aarch64-static" ;;
        armv7:*) qemu="qemu-arm-static" ;;
        mipsle:*) qemu="qemu-mipsel-static" options="-cpu P5600" ;;  # a NaN2008 CPU, like the K1's
        *) err "unknown architecture $1" ;;
    esac
    need_cmd "$qemu"
    printf '%s %s\n' "$qemu" "${options:-}"
}

check_binary() {
    dist=$1
    arch=$2
    version=$3
    file="$dist/printer-connector-linux-$arch"
    [ -f "$file" ] || return 0
    [ -x "$file" ] || err "$file is not executable"
    # A static executable has no program interpreter (PT_INTERP).
    if readelf -l "$file" | grep -q 'Requesting program interpreter'; then
        err "$file is dynamically linked"
    fi
    runner=$(runner_for "$arch")
    if [ -n "$runner" ]; then
        # shellcheck disable=SC2086  # the runner may carry options
        printed=$($runner "$file" --version)
    else
        printed=$("$file" --version)
    fi
    [ "$printed" = "printer-connector $version" ] || err "$file printed '$printed'"
    say "ok: $file ($(wc -c <"$file") bytes, static, ${runner:-native}) prints $version"
}

# A standalone installer parses and (but uninstall.sh) installs its own release.
check_installer() { # FILE VERSION
    [ -f "$1" ] || err "$1 not found"
    sh -n "$1" || err "$1 does not parse"
    case $1 in
        */uninstall.sh) ;;
        *) grep -qx "RELEASE_VERSION=$2" "$1" || err "$1 is not pinned to release $2 (build-installers.sh --release)" ;;
    esac
    say "ok: $1"
}

main() {
    dist=${1:-$(cd "$(dirname "$0")/.." && pwd)/dist}
    need_cmd sha256sum
    need_cmd readelf
    need_cmd python3
    [ -f "$dist/VERSION" ] || err "$dist/VERSION not found"
    version=$(cat "$dist/VERSION")
    (cd "$dist" && sha256sum -c --quiet SHA256SUMS) || err "SHA256SUMS does not match $dist"
    for arch in amd64 arm64 armv7 mipsle; do
        check_binary "$dist" "$arch" "$version"
    done
    if [ -f "$dist/printer-connector.pyz" ]; then
        printed=$(python3 "$dist/printer-connector.pyz" --version)
        [ "$printed" = "printer-connector $version" ] || err "the zipapp printed '$printed'"
        say "ok: $dist/printer-connector.pyz under $(python3 --version 2>&1) prints $version"
    fi
    for script in install-klipper.sh install-k1.sh update.sh uninstall.sh; do
        check_installer "$dist/$script" "$version"
    done
}

main "$@"
