#!/bin/sh
# Copies installers/lib/common.sh into each installer, between the lines
# "# >>> common.sh" and "# <<< common.sh". Run it after editing common.sh;
# tests/installers fail while a copy differs.
set -eu

PROG=sync.sh
say() { printf '%s: %s\n' "$PROG" "$*"; }
err() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}

sync_one() { # SCRIPT LIB
    grep -q '^# >>> common.sh' "$1" || err "$1 has no '# >>> common.sh' marker"
    awk -v lib="$2" '
        /^# >>> common.sh/ { print; while ((getline line < lib) > 0) print line; skip = 1; next }
        /^# <<< common.sh/ { skip = 0 }
        !skip { print }
    ' "$1" >"$1.tmp"
    chmod 755 "$1.tmp"
    mv -f "$1.tmp" "$1"
    say "synced $1"
}

main() {
    here=$(cd "$(dirname "$0")/.." && pwd)
    for script in install-klipper.sh install-k1.sh update.sh uninstall.sh; do
        sync_one "$here/$script" "$here/lib/common.sh"
    done
}

main "$@"
