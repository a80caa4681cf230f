#!/bin/sh
# Produces the four standalone installers (make installers) from their one
# source: each script of installers/src/ with, at its marker lines, the
# fetch part of installers/bootstrap.sh and all of installers/lib/common.sh.
#   build-installers.sh [OUT]            into OUT (default dist/installers):
#                                        scripts that install the latest release
#   build-installers.sh --release [OUT]  release assets, each pinned to the
#                                        release of connector.py's __version__
# Each file is written beside its place (a name of its own per run: parallel
# test workers build at once) and renamed into it, so a test run
# never reads one half-written.
set -eu

PROG=build-installers.sh
SCRIPTS="install-klipper.sh install-k1.sh update.sh uninstall.sh"

say() { printf '%s: %s\n' "$PROG" "$*"; }
err() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}

release_version() { # REPO
    v=$(sed -n 's/^__version__ = "\([^"]*\)".*$/\1/p' "$1/connector.py" | head -n 1)
    [ -n "$v" ] || err "no __version__ line in $1/connector.py"
    printf '%s\n' "$v"
}

# SRC with its markers replaced; fails unless it has both, and (pinned) its
# RELEASE_VERSION line.
produce() { # SRC BOOTSTRAP COMMON VERSION OUT
    awk -v boot="$2" -v lib="$3" -v version="$4" '
        $0 == "# >>> installers/bootstrap.sh" {
            print "# >>> installers/bootstrap.sh, its fetch part (put here by build/build-installers.sh: edit that file)"
            on = 0
            while ((getline line < boot) > 0) {
                if (line ~ /^# <<< fetch/) on = 0
                if (on) print line
                if (line ~ /^# >>> fetch/) on = 1
            }
            print "# <<< installers/bootstrap.sh"
            found++
            next
        }
        $0 == "# >>> installers/lib/common.sh" {
            print "# >>> installers/lib/common.sh (put here by build/build-installers.sh: edit that file)"
            while ((getline line < lib) > 0) print line
            print "# <<< installers/lib/common.sh"
            found++
            next
        }
        version != "" && $0 == "RELEASE_VERSION=\"\"" { print "RELEASE_VERSION=" version; pinned = 1; next }
        { print }
        END { exit !(found == 2 && (version == "" || pinned)) }
    ' "$1" >"$5.tmp.$$" || {
        rm -f "$5.tmp.$$"
        err "$1 lacks a marker line (# >>> installers/bootstrap.sh, # >>> installers/lib/common.sh) or its RELEASE_VERSION=\"\""
    }
    chmod 755 "$5.tmp.$$"
    mv -f "$5.tmp.$$" "$5"
}

main() {
    repo=$(cd "$(dirname "$0")/.." && pwd)
    version=""
    if [ "${1:-}" = --release ]; then
        version=$(release_version "$repo")
        shift
    fi
    out=${1:-$repo/dist/installers}
    mkdir -p "$out"
    for script in $SCRIPTS; do
        pin=$version
        [ "$script" != uninstall.sh ] || pin=""
        produce "$repo/installers/src/$script" "$repo/installers/bootstrap.sh" "$repo/installers/lib/common.sh" \
            "$pin" "$out/$script"
    done
    say "wrote $SCRIPTS to $out${version:+ (release $version)}"
}

main "$@"
