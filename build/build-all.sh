#!/bin/sh
# Builds every release artifact into dist/ (make binary-all):
#   printer-connector-linux-amd64, -arm64, -armv7   static binaries, each in
#                                                   a Debian bookworm root
#   printer-connector-linux-mipsle                  static, NaN2008, cross-built
#                                                   with zig (build-mipsle.sh)
#   printer-connector.pyz                           zipapp for Python >= 3.8
#   install-klipper.sh, install-k1.sh, update.sh,   the standalone installers,
#   uninstall.sh                                    pinned to this release
#                                                   (build-installers.sh --release)
#   SHA256SUMS, VERSION                             of the above
# then smoke-tests them (build/smoke-test.sh) and runs tests/test_artifacts.py
# on each binary. Needs root (debootstrap, chroot); foreign architectures run
# under qemu-user-static.
#
#   build-all.sh                  everything
#   build-all.sh TARGET...        only these (amd64 arm64 armv7 mipsle pyz), then sums
#   build-all.sh sums             only SHA256SUMS and VERSION of what dist/ has
set -eu

ALL_TARGETS="pyz amd64 arm64 armv7 mipsle"

say() { printf 'build-all: %s\n' "$*"; }
err() { say "error: $*" >&2; exit 1; }

need_cmd() {
    command -v "$1" >/dev/null 2>&1 || err "need '$1' (not found in PATH)"
}

build_target() {
    repo=$1
    target=$2
    started=$(date +%s)
    case "$target" in
        pyz) sh "$repo/build/build-pyz.sh" ;;
        amd64 | arm64 | armv7) sh "$repo/build/build-binary.sh" "$target" ;;
        mipsle) sh "$repo/build/build-mipsle.sh" ;;
        *) err "unknown target '$target' (one of: $ALL_TARGETS)" ;;
    esac
    say "$target took $(($(date +%s) - started))s"
}

# SHA256SUMS and VERSION of the artifacts in dist/, in the format
# `sha256sum -c` reads.
write_sums() {
    repo=$1
    version=$(sed -n 's/^__version__ = "\([^"]*\)".*$/\1/p' "$repo/connector.py" | head -n 1)
    [ -n "$version" ] || err "no __version__ line in $repo/connector.py"
    cd "$repo/dist"
    set --
    for name in printer-connector-linux-amd64 printer-connector-linux-arm64 \
        printer-connector-linux-armv7 printer-connector-linux-mipsle printer-connector.pyz \
        install-klipper.sh install-k1.sh update.sh uninstall.sh; do
        if [ -f "$name" ]; then
            set -- "$@" "$name"
        else
            say "not in dist/: $name"
        fi
    done
    [ "$#" -gt 0 ] || err "no artifacts in $repo/dist"
    sha256sum "$@" >SHA256SUMS
    printf '%s\n' "$version" >VERSION
    cd "$repo"
    say "wrote dist/SHA256SUMS ($# files) and dist/VERSION ($version)"
}

# tests/test_artifacts.py on the binaries just built, foreign ones under
# qemu-user-static, integration subset included (with the pyz under 3.8).
test_artifacts() {
    repo=$1
    shift
    arches=""
    for target in "$@"; do
        case "$target" in
            amd64 | arm64 | armv7) arches="$arches $target" ;;
        esac
    done
    [ -n "$arches" ] || return 0
    make -C "$repo" venv .venv-moonraker/.stamp deb-deps
    say "testing the binaries:$arches"
    ARTIFACT_ARCHES=$arches MOONRAKER_BIN="$repo/.venv-moonraker/bin/moonraker" \
        "$repo/.venv/bin/python" -m pytest -q -p no:cacheprovider "$repo/tests/test_artifacts.py"
}

main() {
    repo=$(cd "$(dirname "$0")/.." && pwd)
    need_cmd sha256sum
    if [ "${1:-}" = sums ]; then
        write_sums "$repo"
        return 0
    fi
    # shellcheck disable=SC2086  # one argument per target
    [ "$#" -gt 0 ] || set -- $ALL_TARGETS
    for target in "$@"; do
        build_target "$repo" "$target"
    done
    sh "$repo/build/build-installers.sh" --release "$repo/dist"
    write_sums "$repo"
    sh "$repo/build/smoke-test.sh" "$repo/dist"
    test_artifacts "$repo" "$@"
}

main "$@"
