#!/bin/sh
# Builds dist/printer-connector-linux-mipsle (make binary-mipsle): one static
# executable for the Creality K1 / K1 Max (Ingenic SoC, MIPS32r2, hard
# float, NaN2008), cross-built on an x86_64 machine.
#
# Route (docs/mipsle.md says why): Zig's `zig cc` (clang with musl built for
# the exact target CPU, from the ziglang wheel on PyPI) cross-compiles zlib,
# OpenSSL and CPython for mipsel-linux-musleabihf with -mcpu=mips32r2+nan2008.
# CPython is built with every C extension module linked in statically; a small
# launcher (build/mipsle/launcher.c) is linked against it, and a zip archive
# of the compiled standard library, the pinned pure-Python packages and
# connector.py (build/mipsle/mkarchive.py) is appended to it. The result has
# no dynamic loader, needs nothing of the device's glibc or Python, and
# unpacks nothing: modules are imported from the file itself.
#
# Every download is pinned by sha256: the pristine upstream tarballs of
# Debian's source packages (build/mipsle/sources.sha256; `apt-get source`
# with a deb-src entry this script adds when none is there), the ziglang
# wheel (build/mipsle/toolchain.txt) and the wheels embedded
# (build/mipsle/embed-requirements.txt, which must match
# requirements/runtime.txt). Tarballs with the same checksums placed in
# build/work/mipsle/dl/ under the names of sources.sha256 (for example
# python.org's Python-3.11.2.tgz) are used without apt.
#
# Scratch lives in build/work/mipsle/; each stage is redone only when what it
# is made from changes. The build Python is Debian's python3.11, the same
# CPython version as the one cross-built (the bytecode must match).
#
#   build-mipsle.sh            build, then smoke-test under qemu-mipsel-static
#   build-mipsle.sh smoke      only smoke-test the binary in dist/
set -eu

PY_VERSION=3.11.2
OPENSSL_VERSION=3.0.20
ZLIB_VERSION=1.2.13
PY_TARBALL=python3.11_${PY_VERSION}.orig.tar.gz
OPENSSL_TARBALL=openssl_${OPENSSL_VERSION}.orig.tar.gz
ZLIB_TARBALL=zlib_${ZLIB_VERSION}.dfsg.orig.tar.bz2
DEB_SOURCES="python3.11 openssl zlib"
BUILD_PYTHON=/usr/bin/python3.11

ZIG_TARGET=mipsel-linux-musleabihf
ZIG_CPU=mips32r2+nan2008
QEMU_CPU=P5600
# Small code: optimise for size, one section per function and object so the
# linker drops what nothing calls, no unwind tables (C only, no C++).
CFLAGS_OPT="-Os -ffunction-sections -fdata-sections -fno-asynchronous-unwind-tables -fno-unwind-tables"
LDFLAGS_OPT="-static -Wl,--gc-sections"
# Dates built into the binary (OpenSSL's "built on", via its mkbuildinf.pl)
# are this one, so the same inputs give the same bytes: 2023-02-07 00:00 UTC,
# the release date of CPython 3.11.2 (also the date in sys.version).
SOURCE_DATE_EPOCH=1675728000
export SOURCE_DATE_EPOCH

# Debian packages the build needs on the build machine.
BUILD_PACKAGES="python3.11 python3-pip qemu-user-static file binutils make perl bzip2 ca-certificates"

# OpenSSL: only the libraries, in C (no-asm: its generated MIPS assembly
# would be marked legacy-NaN like musl's, see build_nan2008_libc_fix; C is
# fast enough for a connector's few handshakes), without what Python's ssl
# and hashlib modules do not use. BROKEN_CLANG_ATOMICS makes OpenSSL use its
# lock-based counters: the toolchain has no __atomic_is_lock_free for MIPS32.
OPENSSL_OPTIONS="no-shared no-asm no-dso no-module no-engine no-async no-comp no-tests
no-ui-console no-legacy no-afalgeng no-ssl3 no-srp no-idea no-mdc2 no-rc5 no-seed
no-whirlpool no-cms no-ts no-ocsp no-ct no-siphash no-sm2 no-sm3 no-sm4 no-gost
-DBROKEN_CLANG_ATOMICS"

# CPython extension modules not built: GUI, databases, compression formats
# and libraries the agent does not use (their libraries are not cross-built),
# the XML parsers and the C decimal (pure-Python fallbacks exist).
PY_DISABLED_MODULES="_bz2 _ctypes _ctypes_test _curses _curses_panel _dbm _decimal
_elementtree _gdbm _lzma _sqlite3 _tkinter _uuid nis pyexpat readline xxlimited xxlimited_35"

say() { printf 'build-mipsle: %s\n' "$*"; }
warn() { say "warning: $*" >&2; }
err() { say "error: $*" >&2; exit 1; }

need_cmd() {
    command -v "$1" >/dev/null 2>&1 || err "need '$1' (not found in PATH)"
}

elapsed_since() {
    echo "$(($(date +%s) - $1))s"
}

# Runs a command at the lowest priority, its output in a log file; on failure
# shows the end of the log.
run_logged() {
    log=$1
    shift
    if ! nice -n 19 "$@" >>"$log" 2>&1; then
        tail -n 40 "$log" >&2
        err "failed: $* (whole log: $log)"
    fi
}

# sha256 of the text given as arguments.
text_hash() {
    printf '%s\n' "$@" | sha256sum | cut -d ' ' -f 1
}

# True when the stamp of stage $1 records key $2.
stage_done() {
    [ -f "$WORK/stamps/$1" ] && [ "$(cat "$WORK/stamps/$1")" = "$2" ]
}

stage_mark() {
    mkdir -p "$WORK/stamps"
    printf '%s\n' "$2" >"$WORK/stamps/$1"
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    else
        need_cmd sudo
        sudo "$@"
    fi
}

# The sha256 pinned for a file of build/mipsle/sources.sha256.
pinned_sum() {
    sum=$(awk -v f="$1" '$2 == f { print $1 }' "$CONF/sources.sha256")
    [ -n "$sum" ] || err "no checksum for $1 in build/mipsle/sources.sha256"
    echo "$sum"
}

# True when dl/NAME is there with its pinned checksum.
have_verified() {
    [ -f "$WORK/dl/$1" ] && [ "$(sha256sum "$WORK/dl/$1" | cut -d ' ' -f 1)" = "$(pinned_sum "$1")" ]
}

ensure_deb_src() {
    if grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ ||
        grep -qs '^deb-src ' /etc/apt/sources.list; then
        return 0
    fi
    codename=$(sed -n 's/^VERSION_CODENAME=//p' /etc/os-release)
    [ -n "$codename" ] || err "cannot tell the Debian release (VERSION_CODENAME in /etc/os-release)"
    say "adding a deb-src entry for $codename"
    printf 'Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$codename" | as_root tee /etc/apt/sources.list.d/printer-connector-deb-src.sources >/dev/null
    as_root apt-get update -qq >/dev/null
}

fetch_sources() {
    mkdir -p "$WORK/dl"
    if have_verified "$PY_TARBALL" && have_verified "$OPENSSL_TARBALL" && have_verified "$ZLIB_TARBALL"; then
        return 0
    fi
    need_cmd apt-get
    ensure_deb_src
    say "downloading Debian source packages: $DEB_SOURCES"
    # shellcheck disable=SC2086  # one argument per source package
    (cd "$WORK/dl" && apt-get source --download-only $DEB_SOURCES >"$WORK/dl/apt-source.log" 2>&1) ||
        { tail -n 20 "$WORK/dl/apt-source.log" >&2; err "apt-get source failed"; }
    for tarball in "$PY_TARBALL" "$OPENSSL_TARBALL" "$ZLIB_TARBALL"; do
        [ -f "$WORK/dl/$tarball" ] ||
            err "apt-get source brought no $tarball: Debian moved to another upstream version; update the pins in build/mipsle/sources.sha256 and this script"
        have_verified "$tarball" ||
            err "$tarball does not match its pinned sha256 (build/mipsle/sources.sha256)"
    done
}

fetch_toolchain() {
    [ "$(uname -m)" = x86_64 ] || err "the pinned ziglang wheel is for x86_64 build machines, this is $(uname -m)"
    key=$(sha256sum "$CONF/toolchain.txt" | cut -d ' ' -f 1)
    if stage_done toolchain "$key" && [ -x "$ZIG" ]; then
        return 0
    fi
    say "installing the ziglang wheel (build/mipsle/toolchain.txt)"
    rm -rf "$WORK/zig" "$WORK/dl/zig"
    mkdir -p "$WORK/dl/zig"
    run_logged "$WORK/toolchain.log" "$BUILD_PYTHON" -m pip download --no-deps --require-hashes \
        --only-binary=:all: --platform manylinux_2_12_x86_64 --python-version 3.11 \
        -d "$WORK/dl/zig" -r "$CONF/toolchain.txt"
    set -- "$WORK"/dl/zig/ziglang-*.whl
    [ -f "$1" ] || err "pip downloaded no ziglang wheel"
    run_logged "$WORK/toolchain.log" "$BUILD_PYTHON" -m zipfile -e "$1" "$WORK/zig"
    chmod +x "$ZIG"
    stage_mark toolchain "$key"
}

# Compiler wrappers: autoconf and OpenSSL's Configure want one word per tool.
write_wrappers() {
    mkdir -p "$WORK/bin" "$WORK/zig-cache"
    printf '#!/bin/sh\nexec "%s" cc -target %s -mcpu=%s "$@"\n' "$ZIG" "$ZIG_TARGET" "$ZIG_CPU" >"$WORK/bin/mipsel-cc"
    printf '#!/bin/sh\nexec "%s" ar "$@"\n' "$ZIG" >"$WORK/bin/mipsel-ar"
    printf '#!/bin/sh\nexec "%s" ranlib "$@"\n' "$ZIG" >"$WORK/bin/mipsel-ranlib"
    chmod +x "$WORK/bin/mipsel-cc" "$WORK/bin/mipsel-ar" "$WORK/bin/mipsel-ranlib"
    ZIG_GLOBAL_CACHE_DIR="$WORK/zig-cache"
    ZIG_LOCAL_CACHE_DIR="$WORK/zig-cache"
    export ZIG_GLOBAL_CACHE_DIR ZIG_LOCAL_CACHE_DIR
    # Every C build below uses these tools.
    CC="$WORK/bin/mipsel-cc"
    AR="$WORK/bin/mipsel-ar"
    RANLIB="$WORK/bin/mipsel-ranlib"
    export CC AR RANLIB
    CC_KEY=$(text_hash "$(sha256sum "$CONF/toolchain.txt")" "$ZIG_TARGET" "$ZIG_CPU" "$CFLAGS_OPT" "$LDFLAGS_OPT" "$SOURCE_DATE_EPOCH")
}

# Zig builds musl's C files for the target CPU's NaN mode, but assembles its
# MIPS assembly files (clone, setjmp, fenv, syscall_cp, ...) without
# -mnan=2008, so they are marked legacy-NaN and lld refuses to link them into
# a NaN2008 program. They hold no floating-point arithmetic, only moves,
# loads and syscalls: assembled again from Zig's own copy of musl with
# -mnan=2008 (same code, NaN2008 mark), they go into an archive that is
# searched before libc (LIBS of every link), so the linker takes them.
build_nan2008_libc_fix() {
    NANFIX_KEY=$(text_hash "$CC_KEY" nan2008-fix-1)
    NANFIX=$WORK/nan2008-fix/libmusl-nan2008.a
    stage_done nan2008-fix "$NANFIX_KEY" && [ -f "$NANFIX" ] && return 0
    say "assembling musl's MIPS assembly files with -mnan=2008"
    rm -rf "$WORK/nan2008-fix"
    mkdir -p "$WORK/nan2008-fix"
    musl=$(dirname "$ZIG")/lib/libc/musl/src
    found=0
    for asm in $(find "$musl" -path '*/mips/*' -name '*.[sS]' | sort); do
        obj=$WORK/nan2008-fix/$(basename "${asm%.*}").o
        run_logged "$WORK/nan2008-fix.log" "$CC" -mnan=2008 -c "$asm" -o "$obj"
        readelf -h "$obj" | grep -q 'Flags:.*nan2008' || err "$obj is not marked NaN2008"
        found=$((found + 1))
    done
    [ "$found" -gt 0 ] || err "no MIPS assembly files under $musl"
    run_logged "$WORK/nan2008-fix.log" "$AR" rcs "$NANFIX" "$WORK"/nan2008-fix/*.o
    stage_mark nan2008-fix "$NANFIX_KEY"
}

# Unpacks tarball $1 into src/, replacing what was there; prints the directory.
unpack() {
    mkdir -p "$WORK/src"
    top=$(tar -tf "$WORK/dl/$1" | head -n 1 | cut -d / -f 1)
    [ -n "$top" ] || err "cannot list $1"
    rm -rf "${WORK:?}/src/$top"
    tar -xf "$WORK/dl/$1" -C "$WORK/src"
    echo "$WORK/src/$top"
}

build_zlib() {
    ZLIB_KEY=$(text_hash "$CC_KEY" "$(pinned_sum "$ZLIB_TARBALL")")
    stage_done zlib "$ZLIB_KEY" && return 0
    started=$(date +%s)
    say "building zlib $ZLIB_VERSION"
    rm -f "$WORK/zlib.log"
    dir=$(unpack "$ZLIB_TARBALL")
    (
        cd "$dir"
        run_logged "$WORK/zlib.log" env CFLAGS="$CFLAGS_OPT" CHOST=mipsel-linux \
            ./configure --static --prefix="$SYSROOT"
        run_logged "$WORK/zlib.log" make -j2 libz.a
        run_logged "$WORK/zlib.log" make install
    )
    stage_mark zlib "$ZLIB_KEY"
    say "zlib took $(elapsed_since "$started")"
}

build_openssl() {
    OPENSSL_KEY=$(text_hash "$CC_KEY" "$(pinned_sum "$OPENSSL_TARBALL")" "$OPENSSL_OPTIONS")
    stage_done openssl "$OPENSSL_KEY" && return 0
    started=$(date +%s)
    say "building OpenSSL $OPENSSL_VERSION (libraries only)"
    rm -f "$WORK/openssl.log"
    dir=$(unpack "$OPENSSL_TARBALL")
    (
        cd "$dir"
        # shellcheck disable=SC2086  # one argument per option
        run_logged "$WORK/openssl.log" perl ./Configure linux-mips32 --prefix="$SYSROOT" --libdir=lib \
            --openssldir=/etc/ssl $OPENSSL_OPTIONS $CFLAGS_OPT
        run_logged "$WORK/openssl.log" make -j2 build_libs
        run_logged "$WORK/openssl.log" make install_dev
    )
    stage_mark openssl "$OPENSSL_KEY"
    say "OpenSSL took $(elapsed_since "$started")"
}

build_python() {
    PY_KEY=$(text_hash "$ZLIB_KEY" "$OPENSSL_KEY" "$NANFIX_KEY" python-2 "$(pinned_sum "$PY_TARBALL")" "$PY_DISABLED_MODULES" \
        "$("$BUILD_PYTHON" -c 'import sys; print(sys.version)')")
    stage_done python "$PY_KEY" && [ -f "$PYBUILD/libpython3.11.a" ] && return 0
    started=$(date +%s)
    say "building CPython $PY_VERSION (static, every extension module built in)"
    rm -f "$WORK/python.log"
    "$BUILD_PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' ||
        err "$BUILD_PYTHON is not CPython 3.11"
    src=$(unpack "$PY_TARBALL")
    # zig cc refuses __DATE__ and __TIME__ (not reproducible): the build date
    # in sys.version becomes the release date of the source.
    sed -i -e 's/^#define DATE __DATE__$/#define DATE "Feb  7 2023"/' \
        -e 's/^#define TIME __TIME__$/#define TIME "00:00:00"/' "$src/Modules/getbuildinfo.c"
    grep -q '^#define DATE "Feb  7 2023"$' "$src/Modules/getbuildinfo.c" ||
        err "could not set the build date in Modules/getbuildinfo.c"
    rm -rf "$PYBUILD"
    mkdir -p "$PYBUILD"
    # Answers configure cannot find out without running target programs,
    # only the cross-built .pc files (never the build machine's), binutils'
    # readelf (it reads MIPS ELF files too; configure wants a path), every
    # module built in, and the modules turned off.
    set -- ac_cv_file__dev_ptmx=yes ac_cv_file__dev_ptc=no ac_cv_buggy_getaddrinfo=no \
        PKG_CONFIG_PATH="" PKG_CONFIG_LIBDIR="$SYSROOT/lib/pkgconfig" READELF="$(command -v readelf)" \
        MODULE_BUILDTYPE=static
    for module in $PY_DISABLED_MODULES; do
        set -- "$@" "py_cv_module_$module=n/a"
    done
    (
        cd "$PYBUILD"
        run_logged "$WORK/python.log" env "$@" "$src/configure" \
            --host=mipsel-linux-musl --build=x86_64-pc-linux-gnu --prefix=/usr/data/printer-connector \
            --disable-shared --disable-test-modules --without-ensurepip \
            --with-build-python="$BUILD_PYTHON" --with-openssl="$SYSROOT" \
            CFLAGS="$CFLAGS_OPT" CPPFLAGS="-I$SYSROOT/include" LDFLAGS="$LDFLAGS_OPT -L$SYSROOT/lib" LIBS="$NANFIX"
        for module in _ssl _hashlib zlib _socket select math binascii _json unicodedata; do
            grep -q "^MODULE_$(echo "$module" | tr '[:lower:]' '[:upper:]')_STATE=yes" Makefile ||
                err "configure did not enable the $module module (see $WORK/python.log and $PYBUILD/config.log)"
        done
        # In 3.11 the standard modules are built by setup.py as shared
        # libraries unless Setup.local lists them: use the Setup.stdlib that
        # configure wrote (MODULE_BUILDTYPE=static: all of them built in).
        cp Modules/Setup.stdlib Modules/Setup.local
        run_logged "$WORK/python.log" make -j2 libpython3.11.a
        for module in _ssl _hashlib zlib _socket select math binascii _json unicodedata; do
            grep -Eq "^MODBUILT_NAMES=.*[[:space:]]$module([[:space:]]|\$)" Makefile || err "the $module module is not built in"
        done
        run_logged "$WORK/python.log" make pybuilddir.txt
    )
    stage_mark python "$PY_KEY"
    say "CPython took $(elapsed_since "$started")"
}

build_launcher() {
    key=$(text_hash "$PY_KEY" "$(cat "$CONF/launcher.c" "$CONF/launcher.mk" "$CONF/discard-pdr.ld")")
    stage_done launcher "$key" && [ -f "$PYBUILD/printer-connector-launcher" ] && return 0
    say "linking the launcher"
    rm -f "$PYBUILD/printer-connector-launcher"
    (
        cd "$PYBUILD"
        run_logged "$WORK/launcher.log" make -f Makefile -f "$CONF/launcher.mk" \
            printer-connector-launcher LAUNCHER_SRC="$CONF/launcher.c" LAUNCHER_LDSCRIPT="$CONF/discard-pdr.ld"
    )
    stage_mark launcher "$key"
}

# Checks that embed-requirements.txt pins exactly what requirements/runtime.txt does.
check_embed_pins() {
    pins() {
        sed -n 's/^\([A-Za-z0-9_.-]*==[^ ;\\]*\).*$/\1/p' "$1" | tr '[:upper:]_' '[:lower:]-' | sort
    }
    runtime=$(pins "$REPO/requirements/runtime.txt")
    embedded=$(pins "$CONF/embed-requirements.txt")
    [ "$runtime" = "$embedded" ] ||
        err "build/mipsle/embed-requirements.txt pins differ from requirements/runtime.txt; update its pins and hashes"
}

fetch_wheels() {
    check_embed_pins
    key=$(sha256sum "$CONF/embed-requirements.txt" | cut -d ' ' -f 1)
    stage_done wheels "$key" && return 0
    say "downloading the embedded wheels (build/mipsle/embed-requirements.txt)"
    rm -rf "$WORK/wheels"
    mkdir -p "$WORK/wheels"
    run_logged "$WORK/wheels.log" "$BUILD_PYTHON" -m pip download --no-deps --require-hashes \
        --only-binary=:all: --platform any --implementation py --abi none --python-version 3.11 \
        -d "$WORK/wheels" -r "$CONF/embed-requirements.txt"
    stage_mark wheels "$key"
}

# Writes executable $2: the launcher followed by an archive of the standard
# library, the wheels and connector $3, with $1 as the archive's __main__.
write_executable() {
    main_module=$1
    out=$2
    connector=$3
    set --
    for extra in "$PYBUILD"/build/lib.*/_sysconfigdata_*.py; do
        [ -f "$extra" ] && set -- "$@" --extra "$extra"
    done
    rm -f "$WORK/archive.zip"
    "$BUILD_PYTHON" "$CONF/mkarchive.py" --out "$WORK/archive.zip" --stdlib "$WORK/src/Python-$PY_VERSION/Lib" \
        "$@" --wheels "$WORK/wheels" --connector "$connector" --main "$main_module" \
        --info "python=$PY_VERSION" --info "openssl=$OPENSSL_VERSION" --info "zlib=$ZLIB_VERSION" \
        --info "toolchain=$(sed -n 's/^\(ziglang==[^ ]*\).*$/\1/p' "$CONF/toolchain.txt")" \
        --info "target=$ZIG_TARGET -mcpu=$ZIG_CPU" >"$WORK/archive.log" ||
        err "mkarchive.py failed"
    mkdir -p "$(dirname "$out")"
    cat "$PYBUILD/printer-connector-launcher" "$WORK/archive.zip" >"$out.tmp"
    chmod 755 "$out.tmp"
    mv "$out.tmp" "$out"
}

assemble() {
    connector=$1
    write_executable "$CONF/selfcheck.py" "$WORK/selfcheck" "$connector"
    write_executable "$CONF/bootstrap_main.py" "$REPO/dist/printer-connector-linux-mipsle" "$connector"
    say "wrote dist/printer-connector-linux-mipsle ($(wc -c <"$REPO/dist/printer-connector-linux-mipsle") bytes; $(cat "$WORK/archive.log"))"
}

# Runs the binary under qemu-mipsel-static with a NaN2008-only CPU and checks
# what it must be: static, NaN2008, the version of connector.py; then runs the
# self-check build (same interpreter and archive, build/mipsle/selfcheck.py as
# __main__) for TLS with certifi's CAs, hashlib, zlib and the packages.
smoke_test() {
    bin=$REPO/dist/printer-connector-linux-mipsle
    [ -f "$bin" ] || err "no $bin (run build/build-mipsle.sh first)"
    need_cmd qemu-mipsel-static
    need_cmd readelf
    readelf -h "$bin" | grep -q 'Flags:.*nan2008' || err "$bin is not marked NaN2008"
    if readelf -l "$bin" | grep -q INTERP; then
        err "$bin asks for a dynamic loader"
    fi
    want="printer-connector $(sed -n 's/^__version__ = "\([^"]*\)".*$/\1/p' "$REPO/connector.py" | head -n 1)"
    got=$(qemu-mipsel-static -cpu "$QEMU_CPU" "$bin" --version) || err "$bin --version failed under qemu"
    [ "$got" = "$want" ] || err "$bin --version printed '$got', expected '$want'"
    if [ -f "$WORK/selfcheck" ]; then
        got=$(qemu-mipsel-static -cpu "$QEMU_CPU" "$WORK/selfcheck" 2>&1) || err "the self-check failed under qemu: $got"
        say "self-check: $got"
    fi
    say "smoke test passed: $want"
}

main() {
    REPO=$(cd "$(dirname "$0")/.." && pwd)
    CONF=$REPO/build/mipsle
    WORK=$REPO/build/work/mipsle
    SYSROOT=$WORK/sysroot
    PYBUILD=$WORK/python-build
    ZIG=$WORK/zig/ziglang/zig
    need_cmd sh
    need_cmd sha256sum
    need_cmd tar
    if [ "${1:-}" = smoke ]; then
        smoke_test
        return 0
    fi
    connector=${PRINTER_CONNECTOR_SOURCE:-$REPO/connector.py}
    [ -f "$connector" ] || err "no $connector"
    # shellcheck disable=SC2086  # one argument per package
    sh "$REPO/build/ensure-debian-packages.sh" $BUILD_PACKAGES
    need_cmd nice
    need_cmd make
    need_cmd perl
    need_cmd "$BUILD_PYTHON"
    need_cmd readelf
    build_started=$(date +%s)
    mkdir -p "$WORK"
    fetch_sources
    fetch_toolchain
    fetch_wheels
    write_wrappers
    build_nan2008_libc_fix
    build_zlib
    build_openssl
    build_python
    build_launcher
    assemble "$connector"
    say "build took $(elapsed_since "$build_started")"
    smoke_test
}

main "$@"
