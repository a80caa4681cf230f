#!/bin/sh
# Builds the static single-file binary of connector.py for one architecture.
#
#   build-binary.sh host                 this machine's architecture, natively
#                                        (make binary; make test smoke-tests it)
#   build-binary.sh amd64|arm64|armv7    in a Debian bookworm root made with
#                                        debootstrap under build/work/, foreign
#                                        ones run by qemu-user-static through
#                                        binfmt_misc (make binary-all, release)
#   build-binary.sh native               what the two above run: the build in
#                                        the current root (host or build root)
#   build-binary.sh check TARGET         exit 0 if that artifact is up to date
#
# CONNECTOR_SOURCE names another connector.py to freeze (a build root holds a
# copy; the installer tests build a release that differs only in version),
# and for `native` BINARY_OUT and BINARY_WORK another output file and work
# folder, each with a stamp of its own.
#
# PyInstaller (specs/printer-connector.spec, --onefile) freezes connector.py
# with the pinned runtime packages, then staticx bundles glibc and every
# library into the file, so it runs on any Linux of its architecture.
# Output: dist/printer-connector-linux-ARCH. A build whose inputs (connector.py,
# the spec, the pins, this script) are unchanged is skipped.
#
# The binary unpacks itself into $TMPDIR (default /tmp) at each start and
# removes what it unpacked on exit (what a killed one left, the next start
# removes: specs/rthook_sweep_unpacked.py); the service sets TMPDIR to a
# folder on the install's disk.
set -eu

SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# Packages of a build root; `native` installs what is missing of them too.
ROOT_PACKAGES="python3 python3-venv python3-dev binutils patchelf gcc libc6-dev zlib1g-dev musl-tools scons ca-certificates"

say() { printf 'build-binary: %s\n' "$*"; }
warn() { say "warning: $*" >&2; }
err() { say "error: $*" >&2; exit 1; }

need_cmd() {
    command -v "$1" >/dev/null 2>&1 || err "need '$1' (not found in PATH)"
}

# Asset suffix of a Debian architecture.
asset_arch() {
    case "$1" in
        amd64) echo amd64 ;;
        arm64) echo arm64 ;;
        armhf) echo armv7 ;;
        *) err "no binary is built for Debian architecture '$1'" ;;
    esac
}

# Debian architecture of an asset suffix.
debian_arch() {
    case "$1" in
        amd64) echo amd64 ;;
        arm64) echo arm64 ;;
        armv7) echo armhf ;;
        *) err "unknown target '$1' (host, amd64, arm64 or armv7)" ;;
    esac
}

# Name of the qemu-user binfmt entry for a Debian architecture (empty: none).
qemu_name() {
    case "$1" in
        amd64) echo x86_64 ;;
        arm64) echo aarch64 ;;
        armhf) echo arm ;;
    esac
}

# The version line of connector.py, e.g. 1.2.3.
source_version() {
    sed -n 's/^__version__ = "\([^"]*\)".*$/\1/p' "$1" | head -n 1
}

# Hash of everything a binary is made from.
inputs_hash() {
    repo=$1
    src=$2
    cat "$src" "$repo/specs/printer-connector.spec" "$repo/specs/rthook_stop_with_launcher.py" \
        "$repo/specs/rthook_sweep_unpacked.py" "$repo/build/requirements-build.txt" \
        "$repo/requirements/runtime.txt" "$repo/build/build-binary.sh" | sha256sum | cut -d ' ' -f 1
}

# Whether OUT was built from inputs with hash HASH, as STAMP_FILE records
# (the inputs' hash and the output's).
is_current() {
    stamp_file=$1
    hash=$2
    out=$3
    [ -x "$out" ] && [ -f "$stamp_file" ] &&
        [ "$(cat "$stamp_file")" = "$hash $(sha256sum <"$out" | cut -d ' ' -f 1)" ]
}

record_stamp() {
    stamp_file=$1
    hash=$2
    out=$3
    printf '%s %s\n' "$hash" "$(sha256sum <"$out" | cut -d ' ' -f 1)" >"$stamp_file"
}

elapsed_since() {
    echo "$(($(date +%s) - $1))s"
}

# ----- the build in the current root -----

ensure_build_packages() {
    repo=$1
    [ -x /usr/bin/python3 ] || sh "$repo/build/ensure-debian-packages.sh" python3
    python_minor=$(/usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    packages="python3-venv libpython$python_minor binutils patchelf"
    if [ "$(dpkg --print-architecture)" != amd64 ]; then
        # No wheels of staticx (nor of PyInstaller for armhf) here: pip builds
        # them and their bootloaders from source.
        packages="$packages python3-dev gcc libc6-dev zlib1g-dev musl-tools scons"
    fi
    # shellcheck disable=SC2086  # one argument per package
    sh "$repo/build/ensure-debian-packages.sh" $packages
}

# .venv-build: Debian's Python (never pyenv's: staticx refuses its libpython)
# with the pinned build tools and runtime packages.
ensure_build_venv() {
    repo=$1
    venv="$repo/.venv-build"
    # PyInstaller has no armhf wheel: its bootloader is compiled here. With
    # large-file support its readdir() also copes with 64-bit directory
    # offsets (ext4 seen by a 32-bit program under qemu-user), without which
    # it cannot remove what it unpacked. No pip cache then: a wheel built
    # without the flag must not come back.
    cflags=""
    cache=""
    if [ "$(dpkg --print-architecture)" = armhf ]; then
        cflags="-D_FILE_OFFSET_BITS=64"
        cache="--no-cache-dir"
    fi
    want=$(printf 'CFLAGS=%s\n' "$cflags" | cat - "$repo/build/requirements-build.txt" "$repo/requirements/runtime.txt" |
        sha256sum | cut -d ' ' -f 1)
    if [ -x "$venv/bin/pyinstaller" ] && [ "$(cat "$venv/.stamp" 2>/dev/null)" = "$want" ]; then
        return 0
    fi
    say "creating $venv"
    rm -rf "$venv"
    /usr/bin/python3 -m venv "$venv"
    # shellcheck disable=SC2086  # $cache is one option or none
    CFLAGS=$cflags "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-warn-script-location $cache \
        -r "$repo/build/requirements-build.txt" -r "$repo/requirements/runtime.txt"
    printf '%s\n' "$want" >"$venv/.stamp"
}

build_native() {
    repo=$1
    need_cmd dpkg
    need_cmd sha256sum
    arch=$(asset_arch "$(dpkg --print-architecture)")
    src=${CONNECTOR_SOURCE:-$repo/connector.py}
    [ -f "$src" ] || err "$src not found"
    version=$(source_version "$src")
    [ -n "$version" ] || err "no __version__ = \"X.Y.Z\" line in $src"
    out=${BINARY_OUT:-$repo/dist/printer-connector-linux-$arch}
    work=${BINARY_WORK:-$repo/build/work/$arch}
    stamp=$(inputs_hash "$repo" "$src")
    if is_current "$work/stamp" "$stamp" "$out"; then
        say "$out is up to date ($version)"
        return 0
    fi
    [ "${CHECK_ONLY:-}" = 1 ] && err "$out is missing or older than its sources"
    started=$(date +%s)
    ensure_build_packages "$repo"
    ensure_build_venv "$repo"
    rm -rf "$work"
    mkdir -p "$work" "$(dirname "$out")"
    say "freezing $src ($version, $arch)"
    CONNECTOR_SOURCE=$src "$repo/.venv-build/bin/pyinstaller" --noconfirm --log-level WARN \
        --distpath "$work/frozen" --workpath "$work/pyinstaller" "$repo/specs/printer-connector.spec"
    say "making it static"
    # No compression by staticx: PyInstaller's archive is compressed already,
    # and xz on top costs more start-up time than the 2 MB it saves.
    "$repo/.venv-build/bin/staticx" --strip --no-compress "$work/frozen/printer-connector" "$work/printer-connector"
    printed=$("$work/printer-connector" --version)
    [ "$printed" = "printer-connector $version" ] || err "the new binary printed '$printed' for --version"
    chmod 755 "$work/printer-connector"
    mv "$work/printer-connector" "$out"
    rm -rf "$work/frozen" "$work/pyinstaller"
    record_stamp "$work/stamp" "$stamp" "$out"
    say "built $out ($(wc -c <"$out") bytes) in $(elapsed_since "$started")"
}

# ----- a Debian bookworm build root -----

is_mounted() {
    awk -v p="$1" '$2 == p { found = 1 } END { exit !found }' /proc/self/mounts
}

unmount_root() {
    root=$1
    if is_mounted "$root/proc"; then
        umount "$root/proc" || umount -l "$root/proc"
    fi
}

# Deletes a build root, never while something is mounted in it.
remove_root() {
    root=$1
    unmount_root "$root"
    is_mounted "$root/proc" && err "$root/proc is still mounted; not deleting $root"
    rm -rf "$root"
}

# Lets this machine run the root's programs through qemu-user-static. An
# entry already registered (by us, binfmt-support or systemd) is left alone.
ensure_binfmt() {
    qemu=$1
    binfmt=/proc/sys/fs/binfmt_misc
    if [ ! -e "$binfmt/register" ]; then
        mount -t binfmt_misc binfmt_misc "$binfmt" || err "cannot mount binfmt_misc at $binfmt"
    fi
    if [ -e "$binfmt/qemu-$qemu" ]; then
        grep -q '^enabled' "$binfmt/qemu-$qemu" || err "binfmt entry qemu-$qemu is disabled"
        return 0
    fi
    conf="/usr/lib/binfmt.d/qemu-$qemu.conf"
    [ -f "$conf" ] || err "$conf not found (package qemu-user-static)"
    # The F flag in Debian's entry opens the interpreter now, so it also
    # works inside the chroot, which has no qemu of its own.
    grep -v '^#' "$conf" | head -n 1 >"$binfmt/register" || err "cannot register qemu-$qemu in binfmt_misc"
    say "registered qemu-$qemu in binfmt_misc"
}

# A binfmt entry without the F flag (fix binary) opens its interpreter only
# when a program starts, inside the chroot: the root then needs a copy.
provide_interpreter() {
    qemu=$1
    root=$2
    entry="/proc/sys/fs/binfmt_misc/qemu-$qemu"
    grep -q '^flags:.*F' "$entry" && return 0
    interpreter=$(sed -n 's/^interpreter //p' "$entry")
    [ -n "$interpreter" ] || err "no interpreter in $entry"
    mkdir -p "$root$(dirname "$interpreter")"
    cp -L "$interpreter" "$root$interpreter"
}

make_root() {
    root=$1
    debarch=$2
    qemu=$3
    if [ -f "$root/.complete" ]; then
        [ -n "$qemu" ] && provide_interpreter "$qemu" "$root"
        return 0
    fi
    [ -e "$root" ] && remove_root "$root"
    say "creating the $SUITE $debarch build root $root (debootstrap)"
    mkdir -p "$root"
    [ -n "$qemu" ] && provide_interpreter "$qemu" "$root"
    packages=$(echo "$ROOT_PACKAGES" | tr ' ' ',')
    if ! debootstrap --variant=minbase --arch="$debarch" --include="$packages" \
        "$SUITE" "$root" "$MIRROR" >"$root.debootstrap.log" 2>&1; then
        tail -n 20 "$root.debootstrap.log" >&2
        remove_root "$root"
        err "debootstrap failed (log: $root.debootstrap.log)"
    fi
    touch "$root/.complete"
}

build_in_root() {
    repo=$1
    target=$2
    debarch=$(debian_arch "$target")
    src=${CONNECTOR_SOURCE:-$repo/connector.py}
    [ -f "$src" ] || err "$src not found"
    root="$repo/build/work/root-$target"
    out="$repo/dist/printer-connector-linux-$target"
    stamp=$(inputs_hash "$repo" "$src")
    if is_current "$root.stamp" "$stamp" "$out"; then
        say "$out is up to date"
        return 0
    fi
    [ "${CHECK_ONLY:-}" = 1 ] && err "$out is missing or older than its sources"
    [ "$(id -u)" -eq 0 ] || err "building in a root needs root (debootstrap, mount, chroot)"
    started=$(date +%s)
    packages=debootstrap
    qemu=""
    if [ "$debarch" != "$(dpkg --print-architecture)" ]; then
        qemu=$(qemu_name "$debarch")
        packages="$packages qemu-user-static"
    fi
    # shellcheck disable=SC2086  # one argument per package
    sh "$repo/build/ensure-debian-packages.sh" $packages
    need_cmd debootstrap
    need_cmd chroot
    [ -n "$qemu" ] && ensure_binfmt "$qemu"
    make_root "$root" "$debarch" "$qemu"
    # The sources the build reads, at the same places under /src.
    mkdir -p "$root/src/build" "$root/src/specs" "$root/src/requirements" "$root/src/dist"
    cp "$src" "$root/src/connector.py"
    cp "$repo/specs/printer-connector.spec" "$repo/specs/rthook_stop_with_launcher.py" \
        "$repo/specs/rthook_sweep_unpacked.py" "$root/src/specs/"
    cp "$repo/requirements/runtime.txt" "$root/src/requirements/"
    cp "$repo/build/build-binary.sh" "$repo/build/ensure-debian-packages.sh" \
        "$repo/build/requirements-build.txt" "$root/src/build/"
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    # pip in the root trusts what this machine trusts (a proxy's CA, say).
    ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
    [ -f "$ca" ] && cp "$ca" "$root/etc/ssl/certs/build-host-ca.crt"
    trap 'unmount_root "$root"' EXIT
    trap 'unmount_root "$root"; exit 130' INT TERM
    is_mounted "$root/proc" || mount -t proc proc "$root/proc"
    say "building $target in $root"
    set -- HOME=/root LANG=C.UTF-8 PATH=/usr/sbin:/usr/bin:/sbin:/bin
    [ -f "$root/etc/ssl/certs/build-host-ca.crt" ] && set -- "$@" PIP_CERT=/etc/ssl/certs/build-host-ca.crt
    chroot "$root" /usr/bin/env -i "$@" sh /src/build/build-binary.sh native
    unmount_root "$root"
    trap - EXIT INT TERM
    mkdir -p "$repo/dist"
    cp "$root/src/dist/printer-connector-linux-$target" "$out.tmp"
    mv "$out.tmp" "$out"
    record_stamp "$root.stamp" "$stamp" "$out"
    say "$target done in $(elapsed_since "$started")"
}

main() {
    repo=$(cd "$(dirname "$0")/.." && pwd)
    target=${1:-host}
    if [ "$target" = check ]; then
        # Only tells whether the artifact is up to date (exit 0) or not.
        CHECK_ONLY=1
        target=${2:-host}
    fi
    case "$target" in
        native | host) build_native "$repo" ;;
        amd64 | arm64 | armv7) build_in_root "$repo" "$target" ;;
        remove-root) remove_root "$repo/build/work/root-${2:?which root: amd64, arm64 or armv7}" ;;
        *) err "usage: $0 [check] host|amd64|arm64|armv7, or $0 remove-root ARCH" ;;
    esac
}

main "$@"
