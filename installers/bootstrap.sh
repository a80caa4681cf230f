#!/bin/sh
# Runs one of printer-connector's installers as its release publishes it:
# install-klipper.sh, install-k1.sh, update.sh or uninstall.sh of the latest
# release, or of the release that --version X.Y.Z names, checked against
# that release's SHA256SUMS and run with the arguments given here:
#   sh bootstrap.sh SCRIPT [ARGS...]
# installers/SCRIPT, which `wget -qO- URL | sudo sh` fetches, downloads this
# file and runs it so.
#
# The part between the fetch markers is the start of every installer too
# (build/build-installers.sh puts it there): the one downloader and checksum
# check, with the system's own tools, for everything that comes before a
# verified binary.
#
# Only function definitions live here: nothing runs until `main "$@"` on
# the last line, so a download cut off half-way runs nothing.
DEFAULT_REPO=printdock/printer-connector
PROG=bootstrap.sh
set -eu

# >>> fetch (the start of every installer: build/build-installers.sh)
# ---------------------------------------------------------------- messages
say() { printf '%s: %s\n' "$PROG" "$*"; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
err() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}

need_cmd() {
    command -v "$1" >/dev/null 2>&1 || err "'$1' is needed but was not found on PATH"
}

# ------------------------------------------------------- download settings
# What the downloads take from the environment (every script's first step).
fetch_settings() {
    ROOT=${PRINTER_CONNECTOR_ROOT:-}
    ROOT=${ROOT%/}
    REPO=${PRINTER_CONNECTOR_REPO:-$DEFAULT_REPO}
    RELEASE_URL=${PRINTER_CONNECTOR_RELEASE_URL:-https://github.com/$REPO/releases}
    RELEASE_URL=${RELEASE_URL%/}
    PY=${PRINTER_CONNECTOR_PYTHON:-python3}
    # Every download: two tries, DOWNLOAD_TIMEOUT seconds in all (16 MB at
    # 64 KiB/s), and a try ends after STALL_TIMEOUT seconds without data.
    DOWNLOAD_TIMEOUT=${PRINTER_CONNECTOR_DOWNLOAD_TIMEOUT:-300}
    STALL_TIMEOUT=${PRINTER_CONNECTOR_STALL_TIMEOUT:-30}
    ALLOW_UNVERIFIED_TLS=0
    CA_BUNDLE=${PRINTER_CONNECTOR_CA_BUNDLE:-}
}

# ------------------------------------------------------ python downloader
# Where there is neither curl nor a wget that checks certificates, the
# host's python3 downloads (Klipper, Moonraker and the K1 firmware all ship
# one), and computes SHA256 where no sha256sum or shasum is found; it also
# asks an asset's size (a HEAD request, whatever the downloader).
PYFETCH='
import hashlib, ssl, sys, time, urllib.error, urllib.request

def die(msg, code=1):
    sys.stderr.write(msg + "\n")
    sys.exit(code)

def opener(url, timeout, cafile="", insecure=False, method="GET"):
    ctx = None
    if url.startswith("https:"):
        if insecure:
            ctx = ssl._create_unverified_context()
        else:
            ctx = ssl.create_default_context(cafile=cafile or None)
    req = urllib.request.Request(url, method=method, headers={"User-Agent": "printer-connector-installer"})
    return urllib.request.urlopen(req, timeout=timeout, context=ctx)

def download(url, out, cafile, mode, stall, total):
    deadline = time.monotonic() + float(total)
    try:
        with opener(url, float(stall), cafile, mode == "insecure") as resp, open(out, "wb") as f:
            length, got = resp.getheader("Content-Length"), 0
            while True:
                if time.monotonic() > deadline:
                    die("%s: not complete after %s s" % (url, total))
                block = resp.read(65536)
                if not block:
                    break
                f.write(block)
                got += len(block)
            if length and length.isdigit() and got != int(length):
                die("%s: cut short after %d of %s bytes" % (url, got, length))
    except ssl.SSLCertVerificationError as e:
        die("%s: TLS certificate could not be verified (%s)" % (url, e), 3)
    except urllib.error.URLError as e:
        if isinstance(e.reason, ssl.SSLCertVerificationError):
            die("%s: TLS certificate could not be verified (%s)" % (url, e.reason), 3)
        die("%s: %s" % (url, e))
    except (OSError, ValueError) as e:
        die("%s: %s" % (url, e))

def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(65536), b""):
            h.update(block)
    print(h.hexdigest())

def content_length(url, cafile, insecure, stall):
    """The size of URL in KiB from a HEAD request, after redirects; nothing
    if the server does not say (or cannot be asked)."""
    def head(unverified):
        with opener(url, float(stall), cafile, unverified, "HEAD") as resp:
            return resp.getheader("Content-Length", "")
    try:
        try:
            length = head(False)
        except (ssl.SSLCertVerificationError, urllib.error.URLError) as e:
            verify_failed = isinstance(getattr(e, "reason", e), ssl.SSLCertVerificationError)
            if not (verify_failed and insecure == "1"):
                raise
            length = head(True)
    except (OSError, ValueError, ssl.SSLError):
        return
    if length.isdigit():
        print(int(length) // 1024 + 1)

{"download": download, "sha256": sha256, "content-length": content_length}[sys.argv[1]](*sys.argv[2:])
'
pyfetch() { "$PY" -c "$PYFETCH" "$@"; }

# --------------------------------------------------------------- downloads
# The one downloader: curl, else a wget that verifies TLS (GNU wget; BusyBox
# wget checks no certificate), else the host's python3. Certificate checks
# are never turned off silently: only install-k1.sh allows it
# (ALLOW_UNVERIFIED_TLS=1), and it says so loudly. Whichever it is, a
# download gets two tries and DOWNLOAD_TIMEOUT seconds in all, and a try
# that receives nothing for STALL_TIMEOUT seconds ends.
download() { # URL OUT
    case $1 in
        https://* | http://*) ;;
        *) err "not an http(s) URL: $1" ;;
    esac
    started=$(date +%s)
    for try in 1 2; do
        left=$((DOWNLOAD_TIMEOUT - ($(date +%s) - started)))
        [ "$left" -gt 0 ] || break
        rm -f "$2"
        # (sh has no locals: download_once sets rc of its own.)
        try_status=0
        download_once "$1" "$2" "$left" || try_status=$?
        [ "$try_status" -ne 0 ] || return 0
        # A certificate that does not verify will not verify on a second try.
        [ "$try_status" -ne 3 ] || break
        [ "$try" -eq 2 ] || warn "download of $1 failed; trying once more (${left}s left)"
    done
    rm -f "$2"
    [ "${1#https:}" = "$1" ] || clock_hint
    return 1
}

# TLS certificates are valid from a date on: a clock far in the past (a
# board without a battery, no NTP yet) fails every https download.
clock_hint() {
    year=$(date -u +%Y)
    [ "$year" -lt 2025 ] || return 0
    warn "this machine's clock says $(date -u '+%Y-%m-%d %H:%M') UTC, so no TLS certificate is valid yet and https downloads fail; set the clock (NTP, or date -s) and run this again"
}

# Runs COMMAND for at most SECONDS (where there is a timeout command).
with_deadline() { # SECONDS COMMAND...
    if command -v timeout >/dev/null 2>&1; then
        timeout "$@"
    else
        shift
        "$@"
    fi
}

download_once() { # URL OUT SECONDS
    url=$1
    out=$2
    seconds=$3
    if command -v curl >/dev/null 2>&1; then
        set -- --max-time "$seconds" --connect-timeout "$STALL_TIMEOUT" --speed-limit 1 --speed-time "$STALL_TIMEOUT"
        [ -z "$CA_BUNDLE" ] || set -- "$@" --cacert "$CA_BUNDLE"
        curl -fsSL "$@" -o "$out" "$url"
        return
    fi
    if wget_verifies_tls; then
        # GNU wget tries 20 times by default, silently; --timeout is per read.
        set -- -q --tries=1 --timeout="$STALL_TIMEOUT"
        [ -z "$CA_BUNDLE" ] || set -- "$@" --ca-certificate="$CA_BUNDLE"
        with_deadline "$seconds" wget "$@" -O "$out" "$url"
        return
    fi
    if [ "${url#http://}" != "$url" ] && command -v wget >/dev/null 2>&1; then
        # Plain http (a local mirror): no TLS to verify, any wget will do.
        # (BusyBox 1.35's wget crashes with -T: the deadline is timeout's.)
        with_deadline "$seconds" wget -q -O "$out" "$url"
        return
    fi
    command -v "$PY" >/dev/null 2>&1 || err "no way to download: install curl, GNU wget or python3"
    rc=0
    pyfetch download "$url" "$out" "$CA_BUNDLE" verify "$STALL_TIMEOUT" "$seconds" || rc=$?
    [ "$rc" -eq 0 ] && return 0
    [ "$rc" -eq 3 ] && [ "$ALLOW_UNVERIFIED_TLS" = 1 ] || return "$rc"
    warn "*** TLS NOT VERIFIED: this device has no usable certificate store, so $url"
    warn "*** is fetched without checking who answers. The SHA256 check below still"
    warn "*** refuses any file that does not match the release's SHA256SUMS."
    pyfetch download "$url" "$out" "" insecure "$STALL_TIMEOUT" "$seconds"
}

wget_verifies_tls() {
    command -v wget >/dev/null 2>&1 && wget --version 2>/dev/null | grep -q 'GNU Wget'
}

# From stdin: sha256sum marks a name with a backslash or newline by a
# leading backslash on the digest.
sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum <"$1" | cut -d ' ' -f 1
    elif command -v shasum >/dev/null 2>&1; then
        shasum -a 256 <"$1" | cut -d ' ' -f 1
    else
        pyfetch sha256 "$1"
    fi
}

asset_url() { # VERSION ASSET
    printf '%s/download/v%s/%s\n' "$RELEASE_URL" "$1" "$2"
}

latest_version() { # DIR: prints the version named by the latest release
    download "$RELEASE_URL/latest/download/VERSION" "$1/VERSION" \
        || err "could not read the latest version from $RELEASE_URL/latest/download/VERSION"
    v=$(tr -d ' \r\n' <"$1/VERSION")
    v=${v#v}
    valid_version "$v" || err "the release's VERSION file holds '$v', not a version"
    printf '%s\n' "$v"
}

valid_version() {
    case $1 in
        '' | *[!0-9A-Za-z.+-]*) return 1 ;;
        [0-9]*) return 0 ;;
        *) return 1 ;;
    esac
}

# Whether SHA256SUMS (in DIR) lists ASSET.
sums_list() { # DIR ASSET
    awk -v a="$2" '$2 == a || $2 == "*" a { found = 1 } END { exit !found }' "$1/SHA256SUMS"
}

# Download ASSET of VERSION and SHA256SUMS into DIR and verify; dies unless
# the file is exactly the one the release lists.
fetch_asset() { # DIR VERSION ASSET
    if [ ! -s "$1/SHA256SUMS" ]; then
        download "$(asset_url "$2" SHA256SUMS)" "$1/SHA256SUMS" \
            || err "could not download SHA256SUMS of version $2 from $RELEASE_URL"
    fi
    sums_list "$1" "$3" || err "release $2 has no $3 (not in its SHA256SUMS)"
    say "downloading $3 $2 from $RELEASE_URL (giving up after ${DOWNLOAD_TIMEOUT}s, or ${STALL_TIMEOUT}s without data)"
    download "$(asset_url "$2" "$3")" "$1/$3" || err "could not download $(asset_url "$2" "$3")"
    verify_sha256 "$1/$3" "$3" "$1/SHA256SUMS"
    # Downloaders write 0644; a native binary must run for its --version
    # check (and later as the service) before it is swapped in.
    chmod 755 "$1/$3" || err "could not make $1/$3 executable"
}

verify_sha256() { # FILE ASSET SUMS
    expected=$(awk -v a="$2" '$2 == a || $2 == "*" a { print $1; exit }' "$3")
    actual=$(sha256_of "$1")
    [ -n "$expected" ] || err "no checksum for $2 in SHA256SUMS"
    if [ "$expected" != "$actual" ]; then
        rm -f "$1"
        err "checksum mismatch for $2: SHA256SUMS says $expected, the download is $actual; nothing was changed"
    fi
    say "checksum of $2 verified"
}
# <<< fetch

# --------------------------------------------------------------- bootstrap
# The release whose SCRIPT runs: the one --version names, else the latest.
wanted_version() { # DIR ARGS...
    dir=$1
    shift
    while [ $# -gt 0 ]; do
        if [ "$1" = --version ] && [ $# -ge 2 ]; then
            printf '%s\n' "${2#v}"
            return 0
        fi
        shift
    done
    latest_version "$dir"
}

# A K1's python3 has no certificate store and its BusyBox wget checks none:
# there, as the K1 installer does, a download may go without TLS checks
# (said loudly; the SHA256 check still applies), unless an install left the
# connector's CA bundle behind.
k1_trust() {
    k1_bundle=$ROOT/usr/data/printer-connector/ca-bundle.pem
    [ -n "$CA_BUNDLE" ] || [ ! -f "$k1_bundle" ] || CA_BUNDLE=$k1_bundle
    if [ "$SCRIPT" = install-k1.sh ] || { [ -z "$CA_BUNDLE" ] && [ -d "$ROOT/usr/data" ]; }; then
        ALLOW_UNVERIFIED_TLS=1
    fi
}

main() {
    [ $# -ge 1 ] || err "usage: bootstrap.sh SCRIPT [ARGS...]"
    SCRIPT=$1
    shift
    case $SCRIPT in
        install-klipper.sh | install-k1.sh | update.sh | uninstall.sh) PROG=$SCRIPT ;;
        *) err "no installer is named '$SCRIPT' (install-klipper.sh, install-k1.sh, update.sh, uninstall.sh)" ;;
    esac
    fetch_settings
    for c in mktemp awk cut tr date rm chmod; do
        need_cmd "$c"
    done
    k1_trust
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
    trap 'exit 129' HUP
    trap 'exit 130' INT
    trap 'exit 143' TERM
    version=$(wanted_version "$WORK" "$@")
    valid_version "$version" || err "--version $version is not a version"
    download "$(asset_url "$version" SHA256SUMS)" "$WORK/SHA256SUMS" \
        || err "could not download SHA256SUMS of version $version from $RELEASE_URL"
    if ! sums_list "$WORK" "$SCRIPT"; then
        # A release from before the installers were release assets: the
        # latest release's SCRIPT installs it as well (--version).
        latest=$(latest_version "$WORK")
        [ "$latest" != "$version" ] || err "release $version has no $SCRIPT (not in its SHA256SUMS)"
        warn "release $version has no $SCRIPT: running the one of release $latest"
        version=$latest
        rm -f "$WORK/SHA256SUMS"
    fi
    fetch_asset "$WORK" "$version" "$SCRIPT"
    # The installer's own traps deal with Ctrl-C and a dropped session; this
    # shell waits for it to finish (a trap, not an ignored signal, which the
    # installer would inherit and could not trap). Its stdin is not the pipe
    # this came through: it asks on the terminal.
    trap ':' HUP INT TERM
    rc=0
    sh "$WORK/$SCRIPT" "$@" </dev/null || rc=$?
    exit "$rc"
}

main "$@"
