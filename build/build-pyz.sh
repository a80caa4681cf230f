#!/bin/sh
# Builds dist/printer-connector.pyz: a zipapp of connector.py and the pure
# Python wheels of requirements/runtime.txt (versions that still support
# Python 3.8, the Python of the Creality K1), with a `#!/usr/bin/env python3`
# line. It runs on any Python from 3.8 on: `python3 printer-connector.pyz`.
# A build whose inputs (connector.py, the pins, this script) are unchanged is
# skipped; `build-pyz.sh check` only tells whether dist/ is up to date.
set -eu

say() { printf 'build-pyz: %s\n' "$*"; }
err() { say "error: $*" >&2; exit 1; }

need_cmd() {
    command -v "$1" >/dev/null 2>&1 || err "need '$1' (not found in PATH)"
}

# A Python with pip for fetching the wheels: the dev venv when it exists.
pick_python() {
    repo=$1
    if [ -x "$repo/.venv/bin/python" ]; then
        echo "$repo/.venv/bin/python"
    else
        need_cmd python3
        command -v python3
    fi
}

# Installs the pinned runtime packages into $2 as pure-Python wheels for
# Python 3.8 (charset_normalizer's pure wheel instead of its compiled one).
fetch_wheels() {
    python=$1
    target=$2
    repo=$3
    "$python" -m pip install -q --disable-pip-version-check --no-warn-script-location \
        --target "$target" --no-deps --no-compile --only-binary=:all: \
        --platform any --python-version 3.8 --implementation py --abi none \
        -r "$repo/requirements/runtime.txt"
    # Metadata and scripts are not needed at run time; licences stay.
    rm -rf "${target:?}/bin"
    find "$target" -name '__pycache__' -type d -prune -exec rm -rf {} +
    find "$target" -path '*.dist-info/*' ! -name 'LICENSE*' ! -name 'METADATA' ! -path '*/licenses/*' -type f -exec rm -f {} +
}

# Python 3.8 (the K1's), to compile the zip's modules for it: $PYTHON38,
# python3.8 on PATH, or pyenv's 3.8.x. Prints nothing when there is none.
find_python38() {
    for candidate in "${PYTHON38:-}" "$(command -v python3.8 2>/dev/null || true)" \
        "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.8.*/bin/python3.8 /root/.pyenv/versions/3.8.*/bin/python3.8; do
        if [ -n "$candidate" ] && [ -x "$candidate" ] &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 8))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
}

# Bytecode for Python 3.8 next to each module (zipimport's layout): the K1
# then starts without compiling ~60 modules, which takes seconds on its CPU
# and leaves megabytes of compiler garbage behind. Other Pythons see the
# magic number differ and compile the sources, as before. Hash-based and
# unchecked, so the files' times do not matter; a fixed hash seed keeps the
# bytes the same from build to build.
compile_for_python38() {
    app=$1
    python38=$(find_python38)
    if [ -z "$python38" ]; then
        [ -z "${PYZ_REQUIRE_PYC:-}" ] || err "no Python 3.8 found (set PYTHON38), and PYZ_REQUIRE_PYC is set"
        say "no Python 3.8 found (set PYTHON38): the zipapp carries sources only"
        return 0
    fi
    PYTHONHASHSEED=0 "$python38" -m compileall -q -b --invalidation-mode unchecked-hash "$app" >/dev/null ||
        err "compiling for Python 3.8 failed"
    say "compiled for Python 3.8 with $python38"
}

write_main() {
    cat >"$1/__main__.py" <<'EOF'
# Entry point of printer-connector.pyz: runs connector.py as a script.
import runpy

runpy.run_module("connector", run_name="__main__", alter_sys=True)
EOF
}

main() {
    repo=$(cd "$(dirname "$0")/.." && pwd)
    need_cmd sha256sum
    src=${CONNECTOR_SOURCE:-$repo/connector.py}
    [ -f "$src" ] || err "$src not found"
    version=$(sed -n 's/^__version__ = "\([^"]*\)".*$/\1/p' "$src" | head -n 1)
    [ -n "$version" ] || err "no __version__ = \"X.Y.Z\" line in $src"
    out="$repo/dist/printer-connector.pyz"
    work="$repo/build/work/pyz"
    stamp=$(cat "$src" "$repo/requirements/runtime.txt" "$repo/build/build-pyz.sh" | sha256sum | cut -d ' ' -f 1)
    if [ -f "$out" ] && [ "$(cat "$work/stamp" 2>/dev/null)" = "$stamp $(sha256sum <"$out" | cut -d ' ' -f 1)" ]; then
        say "$out is up to date ($version)"
        return 0
    fi
    [ "${1:-}" = check ] && err "$out is missing or older than its sources"
    python=$(pick_python "$repo")
    rm -rf "$work"
    mkdir -p "$work/app" "$repo/dist"
    fetch_wheels "$python" "$work/app" "$repo"
    cp "$src" "$work/app/connector.py"
    write_main "$work/app"
    compile_for_python38 "$work/app"
    # Fixed times, so that the same inputs give the same archive.
    find "$work/app" -exec touch -h -d '2020-01-01 00:00:00' {} +
    "$python" -m zipapp "$work/app" --python '/usr/bin/env python3' --compress --output "$work/printer-connector.pyz"
    printed=$("$python" "$work/printer-connector.pyz" --version)
    [ "$printed" = "printer-connector $version" ] || err "the new zipapp printed '$printed' for --version"
    chmod 755 "$work/printer-connector.pyz"
    mv "$work/printer-connector.pyz" "$out"
    rm -rf "$work/app"
    printf '%s %s\n' "$stamp" "$(sha256sum <"$out" | cut -d ' ' -f 1)" >"$work/stamp"
    say "built $out ($(wc -c <"$out") bytes)"
}

main "$@"
