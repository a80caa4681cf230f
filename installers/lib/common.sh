# Shared part of the printer-connector installers (install-klipper.sh,
# install-k1.sh, update.sh, uninstall.sh). build/build-installers.sh (make
# installers) puts it, after the download functions of installers/bootstrap.sh,
# into each script of installers/src/: one standalone script each, a release
# asset, since each is piped straight from the web into sh.
#
# Only function definitions live here: nothing runs until the script's
# `main "$@"` on its last line, so a download cut off half-way runs nothing.

# ------------------------------------------------------------- arguments
need_arg() { [ $# -ge 2 ] || err "$1 needs a value (see --help)"; }

# -------------------------------------------------------------- settings
# Everything set from the environment, once, by every script's main.
init_settings() {
    fetch_settings
    HEALTH_TIMEOUT=${PRINTER_CONNECTOR_HEALTH_TIMEOUT:-90}
    SERVICE=printer-connector
    K1_INIT=$ROOT/etc/init.d/S99printer-connector
    LEGACY_INIT=""
    HELPER=""
    CLEANUP_PATHS=""
    UPDATE_PHASE=""
    trap cleanup EXIT
    # A dropped SSH session (HUP) or Ctrl-C ends the script through cleanup.
    trap 'exit 129' HUP
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# On exit, whatever the reason: an update cut short puts the previous
# binary back and starts the service again (UPDATE_PHASE), and the paths
# named in CLEANUP_PATHS (one a line) are removed; commit_path takes one off
# the list.
cleanup() {
    trap '' HUP INT TERM
    case $UPDATE_PHASE in
        legacy)
            UPDATE_PHASE=""
            if ! grep -q '^# printer-connector init script' "$K1_INIT" 2>/dev/null; then
                warn "the switch did not finish: starting the Go connector again"
                if mv -f "$STAGE/legacy-init" "$LEGACY_INIT"; then "$LEGACY_INIT" start || true; fi
            fi ;;
        stopped)
            UPDATE_PHASE=""
            warn "interrupted: starting the service again"
            svc_start || true ;;
        swapped)
            UPDATE_PHASE=""
            warn "interrupted: putting ${CURRENT_VERSION:-the previous version} back and starting it"
            if swap_in "$(backup_path 1)"; then
                release_info_set "$CURRENT_VERSION" "$(current_asset)" || true
                pending_clear
            else
                warn "could not restore $(backup_path 1) to $BIN"
            fi
            svc_restart || true ;;
    esac
    if [ -n "$CLEANUP_PATHS" ]; then
        printf '%s\n' "$CLEANUP_PATHS" | while IFS= read -r p; do
            [ -n "$p" ] && rm -rf "$p"
        done
        CLEANUP_PATHS=""
    fi
    lock_release
}
remove_on_exit() { CLEANUP_PATHS="$CLEANUP_PATHS
$1"; }

# Creates the install folder; until commit_path "$CREATED_DIR", the topmost
# folder this made is removed on exit (a failed first install leaves nothing).
make_install_dir() { # DIR
    CREATED_DIR=""
    check_writable "$1"
    [ ! -d "$1" ] || return 0
    CREATED_DIR=$1
    while [ ! -d "$(dirname "$CREATED_DIR")" ]; do CREATED_DIR=$(dirname "$CREATED_DIR"); done
    mkdir -p "$1"
    remove_on_exit "$CREATED_DIR"
}
commit_path() {
    CLEANUP_PATHS=$(printf '%s\n' "$CLEANUP_PATHS" | grep -vxF "$1" || true)
}

# ------------------------------------------------------------------ lock
# One install, update or uninstall at a time, for the whole run (pairing
# included): a folder made with mkdir (atomic everywhere, BusyBox too)
# holding the owner's pid. A lock whose owner is gone (killed) is taken over;
# of two runs that find it so, the one whose rename wins takes it.
LOCK_HELD=0
lock_path() { printf '%s/var/lock/printer-connector.lock\n' "$ROOT"; }

lock_take() {
    lock=$(lock_path)
    mkdir -p "$(dirname "$lock")" 2>/dev/null || true
    tries=0
    while ! mkdir "$lock" 2>/dev/null; do
        owner=$(cat "$lock/pid" 2>/dev/null || true)
        if [ -n "$owner" ] && kill -0 "$owner" 2>/dev/null; then
            err "another install, update or uninstall of printer-connector is running (pid $owner); try again when it is done"
        fi
        # Just made (no pid yet), or left by a killed run: a moment, then take it over.
        [ -n "$owner" ] || sleep 1
        tries=$((tries + 1))
        [ "$tries" -le 5 ] || err "$lock is held and cannot be taken over; remove it if no installer runs"
        if [ -n "$owner" ] && mv "$lock" "$lock.stale.$$" 2>/dev/null; then
            rm -rf "$lock.stale.$$"
        fi
    done
    echo $$ >"$lock/pid"
    LOCK_HELD=1
}

lock_release() {
    [ "$LOCK_HELD" = 1 ] || return 0
    rm -rf "$(lock_path)"
    LOCK_HELD=0
}

# ------------------------------------------------------------ disk space
# Checked before anything is downloaded: a full disk is said in its own
# words, not as a downloader's "(23) write error" half-way.
free_kib() { # DIR: KiB free for an ordinary user (0 if df cannot tell)
    df -Pk "$1" 2>/dev/null | awk 'NR == 2 { print $4; exit }'
}

# How large an asset is, as the release server says (the Content-Length of
# a HEAD request, after GitHub's redirect), in KiB; nothing if it does not
# say. Asked by the host's python3 whatever the downloader: a HEAD is not
# a download try. (Where TLS cannot be verified, install-k1.sh's first
# download, the size is asked unverified: it only decides whether to go on,
# and the SHA256 check still applies to the file.)
remote_kib() { # URL
    pyfetch content-length "$1" "$CA_BUNDLE" "$ALLOW_UNVERIFIED_TLS" "$STALL_TIMEOUT" 2>/dev/null || true
}

# Without a size from the server: more than any asset so far.
fallback_kib() { # ASSET
    case $1 in
        *.pyz) echo 4096 ;;
        *) echo 24576 ;;
    esac
}

# Room a start of ASSET needs: the onefile binary unpacks about 2.4 times
# its size into the service's TMPDIR (the install's tmp folder) at every
# start (12.4 MB -> 29.4 MB measured); the .pyz runs from its zip.
unpack_kib() { # ASSET KIB
    case $1 in
        *.pyz) echo 0 ;;
        *) echo $(($2 * 5 / 2)) ;;
    esac
}

# Whether DIR has room to update to ASSET (at URL): the download and its
# copy put in place beside the binary, a backup of the current binary, the
# room the new one unpacks into, and 1 MiB for the config, state and logs.
has_room() { # DIR ASSET URL
    ROOM_ASSET=$(remote_kib "$3")
    ROOM_SAID="as the release server says"
    if [ -z "$ROOM_ASSET" ]; then
        ROOM_ASSET=$(fallback_kib "$2")
        ROOM_SAID="the release server gave no size; assumed"
    fi
    ROOM_BACKUP=0
    [ ! -f "${BIN:-}" ] || ROOM_BACKUP=$(($(wc -c <"$BIN") / 1024 + 1))
    ROOM_UNPACK=$(unpack_kib "$2" "$ROOM_ASSET")
    ROOM_NEEDED=$((ROOM_ASSET * 2 + ROOM_BACKUP + ROOM_UNPACK + 1024))
    ROOM_FREE=$(free_kib "$1")
    [ -n "$ROOM_FREE" ] || return 0
    [ "$ROOM_FREE" -ge "$ROOM_NEEDED" ]
}

mib() { printf '%s.%s' "$(($1 / 1024))" "$(($1 % 1024 * 10 / 1024))"; }

room_message() { # DIR ASSET
    printf 'not enough free space in %s for %s: %s MiB free, %s MiB needed (the download of %s MiB, %s, twice: in a scratch folder and put in place; a %s MiB backup of the current binary; %s MiB for it to unpack at every start; 1 MiB for the rest); free some space or move the install to a larger disk' \
        "$1" "$2" "$(mib "$ROOM_FREE")" "$(mib "$ROOM_NEEDED")" "$(mib "$ROOM_ASSET")" "$ROOM_SAID" \
        "$(mib "$ROOM_BACKUP")" "$(mib "$ROOM_UNPACK")"
}

# ------------------------------------------------------ the install's disk
# Checked before anything is changed: the install folder must take writes,
# must let programs run (a native binary runs from there, and the onefile
# binary unpacks into its tmp folder, the service's TMPDIR, and runs from
# there), and the service user must be able to write that tmp folder.
mount_of() { # PATH: the mount point holding PATH (bind mounts too, which df misnames)
    pyhost mount-of "$1" 2>/dev/null || true
}

existing_parent() { # PATH: PATH, or its nearest folder that exists
    p=$1
    while [ ! -d "$p" ]; do p=$(dirname "$p"); done
    printf '%s\n' "$p"
}

# Dies unless files can be made in DIR (or where it will be made).
check_writable() { # DIR
    at=$(existing_parent "$1")
    probe=$at/.printer-connector-probe.$$
    if why=$(mkdir "$probe" 2>&1); then
        rmdir "$probe"
        return 0
    fi
    mp=$(mount_of "$at")
    case $why in
        *[Rr]ead-only*)
            err "$at is on a read-only file system ($mp): nothing was changed. Remount it read-write (mount -o remount,rw '$mp', and drop 'ro' from its line in /etc/fstab), or free a writable disk for $1" ;;
        *)
            err "cannot write in $at (${why##*: }): nothing was changed. $1 must be on a disk this script can write" ;;
    esac
}

# Whether a program can run from DIR (a file system mounted noexec says no).
can_exec_in() { # DIR
    probe=$1/.printer-connector-exec.$$
    if ! { printf '#!/bin/sh\nexit 0\n' >"$probe" && chmod 755 "$probe"; } 2>/dev/null; then
        rm -f "$probe"
        return 0
    fi
    rc=0
    "$probe" 2>/dev/null || rc=$?
    rm -f "$probe"
    [ "$rc" -eq 0 ]
}

noexec_message() { # DIR
    mp=$(mount_of "$1")
    printf '%s is on a file system mounted noexec (%s): a native binary cannot run there, nor unpack itself into %s/tmp and run. Remount it with exec (mount -o remount,exec '"'"'%s'"'"', and drop noexec from its line in /etc/fstab), or install on another disk' \
        "$1" "$mp" "$1" "$mp"
}

# For ASSET (a native binary, or the .pyz that python3 runs from its zip):
# DIR and its tmp folder let it run, and the service user can write the
# tmp folder (given to that user first, as the install leaves it). Sets
# DISK_PROBLEM and fails if not.
disk_fits_asset() { # ASSET
    DISK_PROBLEM=""
    case $1 in *.pyz) return 0 ;; esac
    for d in "$DIR" "$DIR/tmp"; do
        [ -d "$d" ] || continue
        if ! can_exec_in "$d"; then
            DISK_PROBLEM=$(noexec_message "$d")
            return 1
        fi
    done
}

# The service's TMPDIR (DIR/tmp) exists, belongs to the service user and
# that user can make files in it; dies with what is wrong otherwise. (The
# binary unpacks there as the service user: a folder that user cannot
# write, e.g. made by a run as root, stops every start.)
check_service_tmp() {
    tmp=$DIR/tmp
    made_tmp=0
    if [ ! -e "$tmp" ]; then
        # (A first install: made for the check only; the service files make it again.)
        mkdir "$tmp" 2>/dev/null || check_writable "$tmp"
        made_tmp=1
    fi
    own_like_install "$tmp" 2>/dev/null || true
    why=""
    if [ "$LAYOUT" = systemd ] && [ -n "$SVC_USER" ] && [ "$(id -u)" -eq 0 ]; then
        why=$(pyhost user-can-write "$SVC_USER" "$tmp" 2>&1) || why=${why:-not writable}
    fi
    [ "$made_tmp" = 0 ] || rmdir "$tmp" 2>/dev/null || true
    [ -n "$why" ] || return 0
    err "the service user $SVC_USER cannot write $tmp, the connector's TMPDIR ($why): nothing was changed. Give it to $SVC_USER (chown $SVC_USER: '$tmp') and make sure $SVC_USER can reach it (every folder above it needs x for $SVC_USER); if it is a read-only mount, remount it read-write"
}

# Absolute path of the Python that runs helpers and .pyz artifacts.
python_path() {
    command -v "$PY" 2>/dev/null || err "'$PY' is needed but was not found (set PRINTER_CONNECTOR_PYTHON)"
}

# ------------------------------------------------ before a binary is at hand
# What is asked before any binary of ours is at hand is asked of the host's
# python3 (Klipper, Moonraker and the K1 firmware all ship one): where an
# installation is, from its unit file or init script (the Go connector's
# too), split as systemd and sh do; the install disk's mount and whether the
# service user can write there (an asset's size is asked with the downloads,
# pyfetch). Everything else in JSON or over HTTP is the downloaded binary's
# (helper, below).
PYHOST='
import os, re, shlex, sys

def mount_of(path):
    """The longest mount point in /proc/self/mounts holding PATH."""
    path, best = os.path.realpath(path), "/"
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 2:
                continue
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
            if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
                best = point
    print(best)

def user_can_write(user, folder):
    """Whether USER can make a file in FOLDER: tried in a child running as that user."""
    import pwd
    account = pwd.getpwnam(user)
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(account.pw_gid)
            os.setuid(account.pw_uid)
            fd, probe = __import__("tempfile").mkstemp(prefix=".probe.", dir=folder)
            os.close(fd)
            os.unlink(probe)
            os._exit(0)
        except OSError as e:
            sys.stderr.write(e.strerror or str(e))
            sys.stderr.flush()
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    sys.exit(1 if status else 0)


SYSTEMD_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "s": " "}

def systemd_words(line):
    """A command line split as systemd does (systemd.syntax(7)): %% is a
    percent sign, words in double or single quotes may hold spaces, a
    backslash escapes the next character, $$ is a dollar sign."""
    line = line.replace("%%", "\0")
    words, i, n = [], 0, len(line)
    while True:
        while i < n and line[i] in " \t":
            i += 1
        if i >= n:
            return [w.replace("\0", "%").replace("$$", "$") for w in words]
        quote, word = None, ""
        if line[i] in "\"\x27":
            quote = line[i]
            i += 1
        while i < n and not (quote is None and line[i] in " \t"):
            c = line[i]
            i += 1
            if c == quote:
                break
            if c == "\\" and i < n:
                c = SYSTEMD_ESCAPES.get(line[i], line[i])
                i += 1
            word += c
        words.append(word)

def is_python(word):
    name = os.path.basename(word)
    return name in ("python", "python3") or name.startswith("python3.")

def unit_fields(path):
    """User, the binary (after a Python in front of it) and --config."""
    user, words = "", []
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("User=") and not user:
                user = line[5:]
            elif line.startswith("ExecStart=") and not words:
                words = systemd_words(line[10:])
    binary, config = "", ""
    rest = iter(words)
    for word in rest:
        if word == "--config":
            config = next(rest, "")
        elif word == "--log-level":
            next(rest, "")
        elif not word.startswith("-") and (not binary or is_python(binary)):
            binary = word
    return user, binary, config

def init_var(path, name):
    """NAME=value of a shell init script, unquoted as sh would."""
    with open(path) as f:
        for line in f:
            if line.startswith(name + "="):
                words = shlex.split(line[len(name) + 1:].strip(), comments=True)
                return words[0] if words else ""
    return ""

def print_unit_fields(path):
    for value in unit_fields(path):
        print(value)

def print_init_var(path, name):
    print(init_var(path, name))

COMMANDS = {"unit-fields": print_unit_fields, "init-var": print_init_var, "mount-of": mount_of,
            "user-can-write": user_can_write}
COMMANDS[sys.argv[1]](*sys.argv[2:])
'

pyhost() {
    "$PY" -c "$PYHOST" "$@"
}

# ------------------------------------------------------------ the helper
# The JSON and Moonraker work is the binary's (printer-connector installer
# COMMAND): HELPER is the first binary that has it of those pick_helper is
# given, the newly downloaded and verified one first (a release from before
# it has none). A onefile binary unpacks itself in TMPDIR: STAGE, on the
# install's disk.
pick_helper() { # BINARY...
    for candidate in "$@"; do
        if [ -f "$candidate" ] && run_staged "$candidate" installer --help >/dev/null 2>&1; then
            HELPER=$candidate
            return 0
        fi
    done
    return 1
}

helper() { # COMMAND ARGS...
    [ -n "$HELPER" ] || err "internal: no binary to ask (pick_helper first)"
    run_staged "$HELPER" installer "$@"
}

# (A subshell: sh keeps an assignment before a function call, or not.)
run_staged() { # BIN ARGS...
    (
        TMPDIR=$STAGE
        export TMPDIR
        run_bin "$@"
    )
}

# ----------------------------------------------------------- the binary
# A native binary (ELF) runs as is; anything else (the .pyz zipapp) runs
# with the Python named by PRINTER_CONNECTOR_PYTHON (default python3).
is_native() {
    [ "$(dd if="$1" bs=1 skip=1 count=3 2>/dev/null)" = ELF ]
}

run_bin() { # BIN ARGS...
    b=$1
    shift
    if is_native "$b"; then
        "$b" "$@"
    else
        "$PY" "$b" "$@"
    fi
}

# Prints the X.Y.Z that BIN reports, or fails.
bin_version() {
    out=$(run_bin "$1" --version 2>/dev/null) || return 1
    case $out in
        "printer-connector "*) ;;
        *) return 1 ;;
    esac
    v=${out#printer-connector }
    v=$(printf '%s' "$v" | head -n 1 | tr -d ' \r')
    valid_version "$v" || return 1
    printf '%s\n' "$v"
}

# The command line the service runs, as one line of systemd's syntax.
exec_line() { # BIN CONFIG LOGLEVEL
    if is_native "$1"; then
        printf '%s --config %s --log-level %s\n' "$(systemd_word "$1")" "$(systemd_word "$2")" "$3"
    else
        printf '%s %s --config %s --log-level %s\n' "$(systemd_word "$(python_path)")" "$(systemd_word "$1")" \
            "$(systemd_word "$2")" "$3"
    fi
}

# One word of a unit file's ExecStart= (systemd.syntax(7)): in double
# quotes with backslash and quote escaped, % (a specifier) and $ (a
# variable) doubled. systemd_value is the same without $, for Environment=.
systemd_word() { printf '"%s"' "$(printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' -e 's/%/%%/g' -e 's/\$/$$/g')"; }
systemd_value() { printf '"%s"' "$(printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' -e 's/%/%%/g')"; }
systemd_path() { printf '%s' "$1" | sed -e 's/%/%%/g'; }

# A value in single quotes for sh (the K1 init script).
sh_quote() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }

# Paths go into unit files, init scripts and one-a-line lists: no newline.
check_path() { # WHAT PATH
    case $2 in
        *'
'*) err "$1 may not contain a newline: $2" ;;
    esac
}

# Maps `uname -m` to the release's architecture names.
detect_arch() {
    m=${PRINTER_CONNECTOR_ARCH:-$(uname -m)}
    case $m in
        x86_64 | amd64) echo amd64 ;;
        aarch64 | arm64) echo arm64 ;;
        armv7* | armv8l) echo armv7 ;;
        mips | mipsel | mipsle) echo mipsle ;;
        *) err "unsupported architecture '$m': releases are built for x86_64, aarch64 and armv7" ;;
    esac
}

# ------------------------------------------------------------ the layouts
# LAYOUT is systemd (Klipper host) or k1 (init script); set by the
# installers, or found by detect_install for update.sh and uninstall.sh.
# DIR, BIN, CONFIG, SVC_USER and (k1) LOG describe the installation.

unit_path() { printf '%s/etc/systemd/system/%s.service\n' "$ROOT" "$SERVICE"; }

# Reads BIN and CONFIG from the ExecStart= line of a unit (split as systemd
# does; a Python in front of the artifact is skipped), and SVC_USER from its
# User= line.
parse_unit() {
    fields=$(pyhost unit-fields "$1") || return 1
    SVC_USER=$(printf '%s\n' "$fields" | sed -n 1p)
    BIN=$(printf '%s\n' "$fields" | sed -n 2p)
    CONFIG=$(printf '%s\n' "$fields" | sed -n 3p)
    [ -n "$BIN" ] && [ -n "$CONFIG" ]
}

# Our init script and the Go connector's both name BIN= and CONFIG=, read
# back with sh's quoting rules.
parse_init() {
    BIN=$(pyhost init-var "$1" BIN) || return 1
    CONFIG=$(pyhost init-var "$1" CONFIG) || return 1
    [ -n "$BIN" ] && [ -n "$CONFIG" ]
}

# Finds an installation: the systemd unit SERVICE, our K1 init script, or
# what the Go connector installed (a unit, or an init script of its own on a
# K1). Sets LAYOUT, DIR, BIN, CONFIG, SVC_USER and, for the Go connector's
# K1 init script, LEGACY_INIT; fails if there is none.
detect_install() {
    SVC_USER=""
    unit=$(unit_path)
    if [ -f "$unit" ]; then
        parse_unit "$unit" || err "$unit has no ExecStart with --config; cannot tell where the connector is"
        LAYOUT=systemd
    elif [ -f "$K1_INIT" ] || [ -f "$ROOT/etc/init.d/printer-connector" ]; then
        init=$K1_INIT
        [ -f "$init" ] || init=$ROOT/etc/init.d/printer-connector
        parse_init "$init" || err "$init names no BIN= and CONFIG=; cannot tell where the connector is"
        LAYOUT=k1
        grep -q '^# printer-connector init script' "$init" || LEGACY_INIT=$init
    else
        return 1
    fi
    DIR=$(dirname "$BIN")
    LOG=$DIR/printer-connector.log
    [ -f "$BIN" ] || err "the service names $BIN, which does not exist"
    check_writable "$DIR"
    return 0
}

svc_stop() {
    if [ "$LAYOUT" = systemd ]; then
        systemctl stop "$SERVICE" || warn "systemctl stop $SERVICE failed"
    elif [ -n "$LEGACY_INIT" ]; then
        "$LEGACY_INIT" stop || warn "$LEGACY_INIT stop failed"
    elif [ -x "$K1_INIT" ]; then
        "$K1_INIT" stop || warn "$K1_INIT stop failed"
    fi
}

svc_start() { svc_run start; }
svc_restart() { svc_run restart; }

# On a K1 the log is a file: svc_log reads what comes after LOG_MARK.
svc_run() { # start | restart
    if [ "$LAYOUT" = systemd ]; then
        systemctl "$1" "$SERVICE"
    else
        LOG_MARK=0
        [ -f "$LOG" ] && LOG_MARK=$(wc -c <"$LOG" | tr -d ' ')
        "$K1_INIT" "$1"
    fi
}

svc_running() {
    if [ "$LAYOUT" = systemd ]; then
        systemctl is-active --quiet "$SERVICE"
    else
        "$K1_INIT" status >/dev/null 2>&1
    fi
}

# The connector's log since the last svc_start.
svc_log() {
    if [ "$LAYOUT" = systemd ]; then
        inv=$(systemctl show -p InvocationID --value "$SERVICE" 2>/dev/null || true)
        [ -n "$inv" ] || return 0
        journalctl "_SYSTEMD_INVOCATION_ID=$inv" -o cat --no-pager 2>/dev/null || true
    elif [ -f "$LOG" ]; then
        size=$(wc -c <"$LOG" | tr -d ' ')
        # The log was rotated since the mark: all of it is new.
        [ "$size" -ge "$LOG_MARK" ] || LOG_MARK=0
        tail -c "+$((LOG_MARK + 1))" "$LOG"
    fi
}

# Healthy: the service runs and its new process has logged a heartbeat.
health_check() {
    say "waiting up to ${HEALTH_TIMEOUT}s for the first heartbeat"
    deadline=$(($(date +%s) + HEALTH_TIMEOUT))
    while [ "$(date +%s)" -lt "$deadline" ]; do
        if [ "$UPDATE_PHASE" = swapped ] && [ ! -f "$(pending_path)" ]; then
            warn "the new version failed to start again and again: the update guard put the previous one back"
            return 1
        fi
        if svc_log | grep -q 'msg="Heartbeat sent"' && svc_running; then
            say "heartbeat sent: the connector works"
            return 0
        fi
        sleep 0.2 2>/dev/null || sleep 1
    done
    warn "no heartbeat within ${HEALTH_TIMEOUT}s; the connector's last lines:"
    svc_log | tail -n 15 >&2
    return 1
}

log_hint() {
    if [ "$LAYOUT" = systemd ]; then
        printf 'journalctl -u %s -f\n' "$SERVICE"
    else
        printf 'tail -f %s\n' "$LOG"
    fi
}

# ------------------------------------------------ service files (writing)
write_unit() { # EXECLINE
    unit=$(unit_path)
    mkdir -p "$(dirname "$unit")"
    # A onefile binary unpacks at every start: on the install's disk, not in RAM.
    mkdir -p "$DIR/tmp"
    [ -z "$SVC_USER" ] || chown "$SVC_USER" "$DIR/tmp" 2>/dev/null || true
    cat >"$unit.tmp" <<EOF
# printer-connector systemd unit, written by install-klipper.sh
[Unit]
Description=printer-connector: bridges Moonraker to the PrintDock cloud
Wants=network-online.target
After=network-online.target moonraker.service

[Service]
Type=simple
User=$SVC_USER
WorkingDirectory=$(systemd_path "$DIR")
ExecStart=$1
# Fewer malloc arenas for a multi-threaded Python: several MB less RSS.
Environment=MALLOC_ARENA_MAX=2
# The onefile binary unpacks here at every start (/tmp may be RAM); what a
# killed run left there goes before the next start.
Environment=$(systemd_value "TMPDIR=$DIR/tmp")
ExecStartPre=/bin/sh -c 'rm -rf "\$\$TMPDIR"/_MEI* "\$\$TMPDIR"/staticx-*'
# The update guard: an update not confirmed yet whose new version fails to
# start again and again is taken back here, with no script run needed.
ExecStartPre=-/bin/sh $(systemd_word "$(guard_path)") $(systemd_word "$BIN")
# SIGTERM to the main process only: the static binary's launchers pass it
# on to the Python process; the same signal to all three at once, soon
# after a start, could hang the stop until SIGKILL. Whatever is left after
# TimeoutStopSec gets SIGKILL.
KillMode=mixed
TimeoutStopSec=30
Restart=always
RestartSec=5

[Install]
WantedBy=multi-user.target
EOF
    mv -f "$unit.tmp" "$unit"
}

# The K1 init script: a supervisor loop restarts the connector when it dies
# and keeps its log under LOG_MAX bytes (one older copy kept).
write_init() { # PYTHON (empty for a native binary)
    mkdir -p "$(dirname "$K1_INIT")"
    cat >"$K1_INIT.tmp" <<EOF
#!/bin/sh
# printer-connector init script, written by install-k1.sh
# start | stop | restart | status
BIN=$(sh_quote "$BIN")
CONFIG=$(sh_quote "$CONFIG")
PYTHON=$(sh_quote "$1")
LOG=$(sh_quote "$LOG")
PIDFILE=$(sh_quote "$ROOT/var/run/printer-connector.pid")
LOG_MAX=1048576
# Fewer malloc arenas for a multi-threaded Python: about 8 MB less RSS.
MALLOC_ARENA_MAX=2
# Temporary files on the large /usr/data partition: /tmp is RAM on a K1.
TMPDIR=$(sh_quote "$DIR/tmp")
export MALLOC_ARENA_MAX TMPDIR
EOF
    guard_functions >>"$K1_INIT.tmp"
    cat >>"$K1_INIT.tmp" <<'EOF'
CHILDFILE="$PIDFILE.child"

# A process that exited but was not reaped yet (a zombie) is not alive.
running() {
    kill -0 "$1" 2>/dev/null || return 1
    [ ! -r "/proc/$1/stat" ] || ! grep -q '^[0-9]* (.*) Z' "/proc/$1/stat"
}

alive() { [ -f "$1" ] && running "$(cat "$1")"; }

rotate() {
    size=$(wc -c <"$LOG" 2>/dev/null || echo 0)
    if [ "$size" -gt "$LOG_MAX" ]; then
        cp "$LOG" "$LOG.1" && : >"$LOG"
    fi
}

supervise() {
    echo $$ >"$PIDFILE"
    child=""
    trap 'stopping=1; [ -z "$child" ] || kill "$child" 2>/dev/null' TERM INT
    stopping=""
    while [ -z "$stopping" ]; do
        rotate
        # What a killed onefile binary unpacked (no run of ours is alive now).
        rm -rf "$TMPDIR"/_MEI* "$TMPDIR"/staticx-*
        # (In a subshell: nothing in it can end the supervisor.)
        ( update_guard "$BIN" ) >>"$LOG" 2>&1 </dev/null
        if [ -n "$PYTHON" ]; then
            "$PYTHON" "$BIN" --config "$CONFIG" --log-level info >>"$LOG" 2>&1 </dev/null &
        else
            "$BIN" --config "$CONFIG" --log-level info >>"$LOG" 2>&1 </dev/null &
        fi
        child=$!
        echo "$child" >"$CHILDFILE"
        while [ -z "$stopping" ] && running "$child"; do
            sleep 2 &
            wait $! 2>/dev/null || true
            rotate
        done
        wait "$child" 2>/dev/null || true
        rm -f "$CHILDFILE"
        [ -n "$stopping" ] && break
        echo "printer-connector exited; restarting in 5 seconds" >>"$LOG"
        sleep 5 &
        wait $! 2>/dev/null || true
    done
    rm -f "$PIDFILE"
}

start() {
    if alive "$PIDFILE"; then
        echo "printer-connector is already running"
        return 0
    fi
    mkdir -p "$(dirname "$PIDFILE")" "$TMPDIR"
    rm -f "$PIDFILE" "$CHILDFILE"
    if command -v setsid >/dev/null 2>&1; then
        setsid sh "$0" supervise </dev/null >/dev/null 2>&1 &
    else
        sh "$0" supervise </dev/null >/dev/null 2>&1 &
    fi
    n=0
    while [ ! -f "$CHILDFILE" ] && [ "$n" -lt 50 ]; do
        sleep 0.1 2>/dev/null || sleep 1
        n=$((n + 1))
    done
    echo "printer-connector started"
}

stop() {
    if ! alive "$PIDFILE"; then
        echo "printer-connector is not running"
        rm -f "$PIDFILE" "$CHILDFILE"
        return 0
    fi
    pid=$(cat "$PIDFILE")
    kill "$pid" 2>/dev/null || true
    alive "$CHILDFILE" && kill "$(cat "$CHILDFILE")" 2>/dev/null
    n=0
    while running "$pid" && [ "$n" -lt 100 ]; do
        sleep 0.1 2>/dev/null || sleep 1
        n=$((n + 1))
    done
    if running "$pid"; then
        kill -9 "$pid" 2>/dev/null || true
        alive "$CHILDFILE" && kill -9 "$(cat "$CHILDFILE")" 2>/dev/null
    fi
    rm -f "$PIDFILE" "$CHILDFILE"
    echo "printer-connector stopped"
}

# One job in a session of its own, as systemd runs a restart: killing the
# caller half-way (an update killed with SIGKILL) cannot leave it stopped.
restart() {
    if command -v setsid >/dev/null 2>&1; then
        setsid sh "$0" restart-job </dev/null >/dev/null 2>&1 &
        wait $! || true
        echo "printer-connector restarted"
    else
        stop
        start
    fi
}

status() {
    if alive "$PIDFILE" && alive "$CHILDFILE"; then
        echo "printer-connector is running (pid $(cat "$CHILDFILE"))"
        return 0
    fi
    echo "printer-connector is not running"
    return 3
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    restart) restart ;;
    restart-job) stop; start ;;
    status) status ;;
    supervise) supervise ;;
    *) echo "usage: $0 start|stop|restart|status" >&2; exit 2 ;;
esac
EOF
    chmod 755 "$K1_INIT.tmp"
    mv -f "$K1_INIT.tmp" "$K1_INIT"
}

# ------------------------------------------------------- the update guard
# A dead-man's switch for updates, run before every start of the connector
# (the unit's ExecStartPre=, the K1 supervisor's loop): the text below is
# the guard itself, written into $DIR/update-guard and the K1 init script.
guard_path() { printf '%s/update-guard\n' "$DIR"; }

guard_functions() {
    cat <<'EOF'
# The update guard, a dead-man's switch (written by the printer-connector
# installers), run before every start of the connector. An update not
# confirmed yet is marked by update-pending beside the binary (the old and
# the new version, a line each); update.sh removes the mark once the new
# version has sent a heartbeat. Until then, starts that follow one another
# within GUARD_WINDOW seconds on this boot are failures in a row: at the
# start after GUARD_FAILURES of them, the previous binary goes back in
# place before it starts, with no script run needed. (The connector does
# not exit for trouble with the network, the cloud or Moonraker: a new
# version that ends twice within minutes is broken.) A kill half-way is
# finished at the next start (update-restoring). The start always goes on.
GUARD_FAILURES=2
GUARD_WINDOW=300

update_guard() { # BIN
    guard_bin=$1
    guard_dir=$(dirname "$guard_bin")
    if [ -f "$guard_dir/update-restoring" ]; then
        guard_restore
        return 0
    fi
    [ -f "$guard_dir/update-pending" ] || return 0
    guard_now=$(cut -d . -f 1 /proc/uptime 2>/dev/null) || guard_now=""
    guard_boot=$(cat /proc/sys/kernel/random/boot_id 2>/dev/null) || guard_boot=unknown
    guard_last=$(tail -n 1 "$guard_dir/update-starts" 2>/dev/null) || guard_last=""
    guard_then=${guard_last##* }
    case $guard_now:$guard_then in *[!0-9:]* | :* | *:) guard_then="" ;; esac
    if [ -n "$guard_then" ] && [ "${guard_last% *}" = "$guard_boot" ] && [ "$guard_now" -ge "$guard_then" ] \
        && [ "$((guard_now - guard_then))" -lt "$GUARD_WINDOW" ]; then
        echo "$guard_boot $guard_now" >>"$guard_dir/update-starts"
    else
        echo "$guard_boot $guard_now" >"$guard_dir/update-starts"
    fi
    guard_count=$(($(wc -l <"$guard_dir/update-starts")))
    if [ "$guard_count" -le "$GUARD_FAILURES" ]; then
        echo "update guard: start $guard_count of an update not confirmed yet (after $GUARD_FAILURES failed starts the previous version comes back)"
        return 0
    fi
    # One rename takes the update from update.sh: a run that would confirm
    # it now finds no mark and counts it as failed.
    mv "$guard_dir/update-pending" "$guard_dir/update-restoring" 2>/dev/null || return 0
    guard_restore
}

guard_restore() {
    guard_backup=$guard_dir/backups/$(basename "$guard_bin").1
    guard_old=$(sed -n 1p "$guard_dir/update-restoring")
    guard_new=$(sed -n 2p "$guard_dir/update-restoring")
    if [ ! -f "$guard_backup" ]; then
        echo "update guard: there is no backup ($guard_backup) to put back"
        return 1
    fi
    if ! cmp -s "$guard_backup" "$guard_bin" 2>/dev/null; then
        if ! { cp "$guard_backup" "$guard_bin.guard" && chmod 755 "$guard_bin.guard" && mv -f "$guard_bin.guard" "$guard_bin"; }; then
            rm -f "$guard_bin.guard"
            echo "update guard: could not put $guard_backup back (disk full?); trying again at the next start"
            return 1
        fi
    fi
    guard_info=$guard_dir/update-release_info.json
    if [ -f "$guard_info" ] && cp "$guard_info" "$guard_dir/release_info.json.guard"; then
        mv -f "$guard_dir/release_info.json.guard" "$guard_dir/release_info.json"
    fi
    rm -f "$guard_info"
    mv -f "$guard_dir/update-restoring" "$guard_dir/update-restored"
    rm -f "$guard_dir/update-starts"
    echo "update guard: version ${guard_new:-new} failed $GUARD_FAILURES starts in a row: version ${guard_old:-old} is back in place"
}
EOF
}

write_guard() {
    # shellcheck disable=SC2016  # "$1" is the guard's own argument
    { printf '#!/bin/sh\n' && guard_functions && printf 'update_guard "$1"\n'; } >"$(guard_path).tmp" \
        && chmod 755 "$(guard_path).tmp" && mv -f "$(guard_path).tmp" "$(guard_path)"
}

# Before an update swaps the binary: the guard in place (a service set up by
# an older installer gets it now) and release_info.json kept for it to put
# back (update-release_info.json).
arm_guard() {
    if [ "$LAYOUT" = systemd ]; then
        # The guard runs as the service user and renames files in DIR.
        own_like_install "$DIR" || return 1
        write_guard || return 1
        unit=$(unit_path)
        if ! grep -q '^ExecStartPre=-/bin/sh .*update-guard' "$unit"; then
            GUARD_LINE="ExecStartPre=-/bin/sh $(systemd_word "$(guard_path)") $(systemd_word "$BIN")" \
                awk '{ print } /^ExecStart=/ { print ENVIRON["GUARD_LINE"] }' "$unit" >"$unit.tmp" \
                && mv -f "$unit.tmp" "$unit" && systemctl daemon-reload || return 1
        fi
        if [ -f "$(release_info_path)" ]; then
            cp -p "$(release_info_path)" "$DIR/update-release_info.json" || return 1
        else
            rm -f "$DIR/update-release_info.json"
        fi
    elif ! grep -q '^update_guard()' "$K1_INIT"; then
        py=""
        is_native "$BIN" || py=$(python_path)
        write_init "$py"
    fi
}

# --------------------------------------------------------------- Moonraker
# Moonraker may restart only the services listed in moonraker.asvc in its
# data folder; add ours (and take it out again) without touching the rest.
asvc_add() { # FILE
    [ -d "$(dirname "$1")" ] || return 0
    if [ ! -f "$1" ]; then
        # Moonraker writes its default list when the file is missing; keep it.
        printf '%s\n' klipper_mcu webcamd MoonCord KlipperScreen moonraker-telegram-bot \
            moonraker-obico sonar crowsnest octoeverywhere ratos-configurator >"$1"
    fi
    grep -qx "$SERVICE" "$1" && return 0
    # A last line without a newline must not swallow ours.
    [ -z "$(tail -c 1 "$1")" ] || printf '\n' >>"$1"
    printf '%s\n' "$SERVICE" >>"$1"
    MOONRAKER_CHANGED=1
    say "added $SERVICE to $1"
}

asvc_remove() { # FILE
    [ -f "$1" ] && grep -qx "$SERVICE" "$1" || return 0
    grep -vx "$SERVICE" "$1" >"$1.tmp" || true
    cat "$1.tmp" >"$1"
    rm -f "$1.tmp"
    say "removed $SERVICE from $1"
}

# Whether a print is running, asked of every printer in CONFIG's Moonraker
# list; refuses (dies) unless FORCE=1.
refuse_if_printing() { # CONFIG
    [ "${FORCE:-0}" = 1 ] && return 0
    [ -f "$1" ] || return 0
    for url in $(helper printer-urls "$1"); do
        print_state=$(helper print-state "$url")
        case $print_state in
            printing | paused)
                err "a print is $print_state on $url; try again when it is done (or pass --force)" ;;
            unreachable | unknown)
                err "could not ask Moonraker at $url whether a print is running; pass --force to go on anyway" ;;
        esac
    done
}

# --------------------------------------------------------------- prompts
have_tty() {
    [ "${PRINTER_CONNECTOR_NO_TTY:-0}" != 1 ] && (: </dev/tty) 2>/dev/null
}

ask() { # QUESTION DEFAULT -> answer on stdout
    if [ -n "$2" ]; then
        printf '%s [%s]: ' "$1" "$2" >/dev/tty
    else
        printf '%s: ' "$1" >/dev/tty
    fi
    answer=""
    IFS= read -r answer </dev/tty || true
    [ -n "$answer" ] || answer=$2
    printf '%s\n' "$answer"
}

confirm() { # QUESTION
    have_tty || err "no terminal to ask on; pass --yes"
    case $(ask "$1 (y/N)" "") in
        y | Y | yes | YES) return 0 ;;
        *) return 1 ;;
    esac
}

# ------------------------------------------------------- installing
# The flags both installers take; install-klipper.sh adds its own.
install_usage() { # DEFAULT_PRINTER DEFAULT_CONFIG
    printf 'usage: %s [options]\n' "$PROG"
    cat <<'EOT'
  --cloud-url URL          the cloud to pair with (asked on a terminal)
  --pairing-token TOKEN    the one-time pairing token (asked on a terminal)
  --printer "ID|Name|URL"  a printer: 0 (not paired yet), a name, its Moonraker
EOT
    printf '                           URL; repeat for several (default "%s")\n' "$1"
    cat <<'EOT'
  --version X.Y.Z          install this release instead of the latest
  --bin PATH               install this local file (the binary, or the .pyz) instead of downloading
EOT
    printf '  --config PATH            the config file (default %s)\n' "$2"
    cat <<'EOT'
  --log-level LEVEL        debug, info, warn or error (default info)
  --force                  upgrade even while a print is running
EOT
}

# The installers' flags (install-k1.sh refuses the systemd-only ones).
# shellcheck disable=SC2034  # the values are read by the installers' main only
parse_install_args() {
    CLOUD_URL=""
    TOKEN=""
    PRINTERS=""
    OPT_VERSION=$RELEASE_VERSION
    OPT_BIN=""
    OPT_CONFIG=""
    OPT_USER=""
    LOG_LEVEL=info
    UPDATE_MANAGER=1
    FORCE=0
    while [ $# -gt 0 ]; do
        case $1 in
            --cloud-url) need_arg "$@"; CLOUD_URL=$2; shift ;;
            --pairing-token) need_arg "$@"; TOKEN=$2; shift ;;
            --printer) need_arg "$@"; PRINTERS="${PRINTERS:+$PRINTERS
}$2"; shift ;;
            --version) need_arg "$@"; OPT_VERSION=$2; shift ;;
            --bin) need_arg "$@"; OPT_BIN=$2; shift ;;
            --config) need_arg "$@"; OPT_CONFIG=$2; shift ;;
            --log-level) need_arg "$@"; LOG_LEVEL=$2; shift ;;
            --service-name) need_arg "$@"; SERVICE=$2; shift ;;
            --user) need_arg "$@"; OPT_USER=$2; shift ;;
            --no-update-manager) UPDATE_MANAGER=0 ;;
            --force) FORCE=1 ;;
            -h | --help) usage; exit 0 ;;
            *) usage >&2; err "unknown option: $1" ;;
        esac
        shift
    done
    case $LOG_LEVEL in debug | info | warn | error) ;; *) err "--log-level must be debug, info, warn or error" ;; esac
    case $SERVICE in '' | *[!A-Za-z0-9_.-]*) err "--service-name may use letters, digits, '.', '_' and '-'" ;; esac
}

# Backups of BIN: backups/NAME.1 is the newest, NAME.2 the one before.
backup_path() { printf '%s/backups/%s.%s\n' "$DIR" "$(basename "$BIN")" "$1"; }

# Both return non-zero on any failure (also where set -e is off).
backup_current() {
    [ -f "$BIN" ] || return 0
    mkdir -p "$DIR/backups" || return 1
    if [ -f "$(backup_path 1)" ]; then mv -f "$(backup_path 1)" "$(backup_path 2)" || return 1; fi
    cp -p "$BIN" "$(backup_path 1).tmp" && mv -f "$(backup_path 1).tmp" "$(backup_path 1)"
}

# Puts FILE in place of BIN with one rename (same folder, so atomic): a
# running connector goes on running the old file until it is restarted.
swap_in() { # FILE
    if cp "$1" "$BIN.new" && chmod 755 "$BIN.new" && own_like_install "$BIN.new" && mv -f "$BIN.new" "$BIN"; then
        return 0
    fi
    rm -f "$BIN.new"
    return 1
}

# What an update writes belongs to whom the install gave it: the service
# user (Moonraker's update manager runs as that user and replaces the binary).
own_like_install() { # PATH...
    [ "$LAYOUT" = systemd ] && [ -n "$SVC_USER" ] || return 0
    chown "$SVC_USER:" "$@" 2>/dev/null || chown "$SVC_USER" "$@"
}

# An update in progress is marked on disk until it commits or is rolled
# back: a run killed half-way (SIGKILL, the OOM killer) leaves the mark, and
# the next run of any script puts the previous binary back first.
# The update guard (above) reads the same mark; the file names are its.
pending_path() { printf '%s/update-pending\n' "$DIR"; }
pending_set() { # OLD_VERSION NEW_VERSION
    rm -f "$DIR/update-starts" "$DIR/update-restoring" "$DIR/update-restored"
    printf '%s\n%s\n' "$1" "$2" >"$(pending_path).tmp" && mv -f "$(pending_path).tmp" "$(pending_path)"
}
pending_clear() {
    rm -f "$(pending_path)" "$(pending_path).tmp" "$DIR/update-starts" "$DIR/update-restoring" "$DIR/update-restored" \
        "$DIR/update-release_info.json"
}

# Scratch left by a killed run: the lock says no other run uses it.
sweep_stale() {
    for stale in "$DIR"/.stage.*; do
        if [ -e "$stale" ] && [ "$stale" != "${STAGE:-}" ]; then
            rm -rf "$stale" && say "removed $stale, left by a run that was cut short"
        fi
    done
    rm -f "$BIN.new" "$BIN.guard" "$(backup_path 1).tmp" "$(release_info_path).guard"
}

# Recovers from a run that was killed: an unfinished update is rolled back,
# and a stopped service is started again.
recover_interrupted() {
    sweep_stale
    if [ -f "$DIR/update-restored" ]; then
        warn "the update to $(sed -n 2p "$DIR/update-restored") failed to start again and again: the update guard put $(sed -n 1p "$DIR/update-restored") back"
        release_info_set "$(sed -n 1p "$DIR/update-restored")" "$(current_asset)" || true
        pending_clear
    fi
    mark=$(pending_path)
    [ ! -f "$DIR/update-restoring" ] || mark=$DIR/update-restoring
    new=$(sed -n 2p "$mark" 2>/dev/null || true)
    if [ "$mark" = "$(pending_path)" ] && [ -n "$new" ] && runs_healthy "$new"; then
        say "an update was cut short before it was confirmed, but $new runs and sends heartbeats: confirming it"
        release_info_set "$new" "$(current_asset)" || true
        pending_clear
    elif [ -f "$mark" ]; then
        old=$(sed -n 1p "$mark")
        if [ -f "$(backup_path 1)" ] && [ "$(bin_version "$(backup_path 1)" || true)" = "$old" ]; then
            warn "an update was cut short before it was checked: putting $old back"
            swap_in "$(backup_path 1)" || err "could not restore $(backup_path 1) to $BIN; copy it back by hand"
            release_info_set "$old" "$(current_asset)" || true
            pending_clear
            svc_restart || true
            health_check || warn "$old was restored but sends no heartbeat yet; see: $(log_hint)"
        else
            pending_clear
        fi
    elif service_installed && ! svc_running; then
        warn "the service was not running: starting it"
        svc_start || true
        health_check || warn "it sends no heartbeat yet; see: $(log_hint)"
    fi
}

# Whether the service's latest start runs VERSION and has sent a heartbeat:
# after the update guard's last line (it runs before every start of an
# update not confirmed yet), a "Connector running" line naming the version
# and a heartbeat, in either order (the loops start before that line).
runs_healthy() { # VERSION
    svc_running || return 1
    LOG_MARK=0
    svc_log | awk -v want="version=$1" '
        /^update guard: / { ok = 0; beat = 0 }
        /msg="Connector running"/ { ok = 0; for (i = 1; i <= NF; i++) if ($i == want) ok = 1 }
        /msg="Heartbeat sent"/ { beat = 1 }
        END { exit !(ok && beat) }'
}

service_installed() {
    if [ "$LAYOUT" = systemd ]; then [ -f "$(unit_path)" ]; else [ -f "$K1_INIT" ]; fi
}

# The one way a new binary replaces a working one (update.sh, and a re-run
# of an installer): backed up and put in place while the old one still runs,
# then the service restarts on it. A new version that sends no heartbeat is
# rolled back, and the old one's heartbeat is checked again. Nothing is
# stopped before the swap, so whatever fails before it leaves the old
# connector running.
swap_verified() { # NEWFILE VERSION ASSET
    backup_current || err "could not back up $BIN (disk full?); nothing was changed"
    own_like_install "$DIR/backups" "$(backup_path 1)" || true
    arm_guard || err "could not set up the update guard in $DIR (disk full?); nothing was changed"
    pending_set "$CURRENT_VERSION" "$2" || err "could not write $(pending_path) (disk full?); nothing was changed"
    UPDATE_PHASE=swapped
    if ! swap_in "$1"; then
        UPDATE_PHASE=""
        pending_clear
        err "could not put the new binary in place (disk full?); nothing was changed"
    fi
    [ "$3" != printer-connector.pyz ] || [ "$LAYOUT" != k1 ] || k1_ca_bundle "$BIN"
    # Confirmed by removing the mark: gone already, the update guard took
    # the update back while the health check waited.
    if release_info_set "$2" "$3" && svc_restart && health_check && rm "$(pending_path)" 2>/dev/null; then
        UPDATE_PHASE=""
        pending_clear
        return 0
    fi
    warn "version $2 does not work here: restoring ${CURRENT_VERSION:-the previous binary}"
    swap_in "$(backup_path 1)" || err "could not restore $(backup_path 1) to $BIN; copy it back by hand"
    UPDATE_PHASE=""
    pending_clear
    release_info_set "$CURRENT_VERSION" "$3" || warn "could not write $(release_info_path)"
    svc_restart || true
    if health_check; then
        err "update to $2 failed and was rolled back; ${CURRENT_VERSION} runs again"
    fi
    err "update to $2 failed; ${CURRENT_VERSION} was restored but does not report heartbeats either; see: $(log_hint)"
}

release_info_path() { printf '%s/release_info.json\n' "$DIR"; }

# Keeps release_info.json (read by Moonraker's update manager) true. Its
# version is the release's name, which is the tag: vX.Y.Z. Every value is a
# word checked here, so the JSON needs no escaping (and no binary: a
# rollback may be to one that cannot write it).
release_info_set() { # VERSION ASSET
    [ "$LAYOUT" = systemd ] || return 0
    case $REPO/$1/$2 in
        */*/*/*/* | *[!A-Za-z0-9._/+-]*) err "not a repository, version and asset: $REPO $1 $2" ;;
    esac
    printf '{\n  "project_name": "%s",\n  "project_owner": "%s",\n  "version": "v%s",\n  "asset_name": "%s"\n}\n' \
        "${REPO#*/}" "${REPO%%/*}" "${1#v}" "$2" >"$(release_info_path).tmp" \
        && chmod 644 "$(release_info_path).tmp" && mv -f "$(release_info_path).tmp" "$(release_info_path)" \
        || return 1
    own_like_install "$(release_info_path)" || true
}

# The X.Y.Z in release_info.json (empty without one, or without a binary
# that can read it).
release_info_version() {
    v=""
    [ -z "$HELPER" ] || v=$(helper release-info-get "$(release_info_path)" version 2>/dev/null || true)
    printf '%s\n' "${v#v}"
}

# The release asset this installation runs: by architecture (systemd, named
# so: the file Moonraker's update manager replaces) or by kind (K1: a native
# binary or the .pyz).
current_asset() {
    if [ "$LAYOUT" = k1 ] && ! is_native "$BIN"; then
        echo printer-connector.pyz
    else
        echo "printer-connector-linux-$(detect_arch)"
    fi
}

# The K1's firmware Python has no usable certificate store; the connector's
# .pyz carries certifi's, which verifies later downloads (update.sh).
k1_ca_bundle() { # PYZ
    if run_staged "$1" installer ca-bundle "$DIR/ca-bundle.pem.tmp" 2>/dev/null; then
        mv -f "$DIR/ca-bundle.pem.tmp" "$DIR/ca-bundle.pem"
    else
        rm -f "$DIR/ca-bundle.pem.tmp"
    fi
}

# Runs the connector once to pair (config with a pairing_token). Dies with
# a clear message unless the config is paired afterwards.
pair_once() {
    say "pairing with the cloud"
    rc=0
    run_bin "$BIN" --config "$CONFIG" --log-level "$LOG_LEVEL" --once >"$STAGE/pair.log" 2>&1 || rc=$?
    if [ "$(helper config-state "$CONFIG" 2>/dev/null)" = paired ]; then
        say "paired: connector id $(helper config-get "$CONFIG" connector_id)"
        [ "$rc" -eq 0 ] || warn "paired, but the first round reported a problem (exit $rc); the service will retry"
        return 0
    fi
    sed 's/^/    /' "$STAGE/pair.log" >&2
    case $rc in
        3) err "the cloud rejected the pairing token (invalid, expired or already used); get a new one and run the installer again. Nothing was installed." ;;
        2) err "the connector refused the configuration (exit 2); nothing was installed" ;;
        *) err "pairing failed (exit $rc, see above); nothing was installed" ;;
    esac
}

# Asks for (or takes from the flags) what a new config needs.
gather_answers() {
    if have_tty; then
        say "answers in [brackets] are the defaults"
        [ -n "$CLOUD_URL" ] || CLOUD_URL=$(ask "Cloud URL" "$DEFAULT_CLOUD_URL")
        [ -n "$TOKEN" ] || TOKEN=$(ask "Pairing token (from the cloud's Add connector page)" "")
        if [ -z "$PRINTERS" ]; then
            name=$(ask "Printer name" "$DEFAULT_PRINTER_NAME")
            url=$(ask "Moonraker URL" "http://127.0.0.1:7125")
            PRINTERS="0|$name|$url"
        fi
    fi
    [ -n "$CLOUD_URL" ] || CLOUD_URL=$DEFAULT_CLOUD_URL
    [ -n "$PRINTERS" ] || PRINTERS="0|$DEFAULT_PRINTER_NAME|http://127.0.0.1:7125"
    [ -n "$TOKEN" ] || err "a pairing token is needed: pass --pairing-token TOKEN (no terminal to ask on)"
}

# Every printer's Moonraker must answer before anything is written.
check_moonrakers() { # PRINTERS lines or a CONFIG path
    if [ -f "$1" ]; then
        urls=$(helper printer-urls "$1")
    else
        urls=$(printf '%s\n' "$1" | cut -d '|' -f 3)
    fi
    for url in $urls; do
        helper moonraker-ok "$url" 2>"$STAGE/moonraker.err" \
            || err "Moonraker does not answer at $url ($(tail -n 1 "$STAGE/moonraker.err")); is it running?"
        say "Moonraker answers at $url"
    done
}

# Gets the artifact into STAGE/NEW and sets NEW_VERSION and NEW_ASSET.
# ASSETS lists the release assets to try, best first: the first one whose
# checksum matches and that runs here wins.
stage_artifact() { # ASSETS...
    NEW=$STAGE/printer-connector
    if [ -n "$OPT_BIN" ]; then
        [ -f "$OPT_BIN" ] || err "--bin $OPT_BIN: no such file"
        cp "$OPT_BIN" "$NEW"
        chmod 755 "$NEW"
        NEW_VERSION=$(bin_version "$NEW") || err "--bin $OPT_BIN does not run here (its --version failed)"
        NEW_ASSET=$1
        return 0
    fi
    NEW_VERSION=$OPT_VERSION
    [ -n "$NEW_VERSION" ] || NEW_VERSION=$(latest_version "$STAGE")
    NEW_VERSION=${NEW_VERSION#v}
    download "$(asset_url "$NEW_VERSION" SHA256SUMS)" "$STAGE/SHA256SUMS" \
        || err "could not download SHA256SUMS of version $NEW_VERSION from $RELEASE_URL"
    room_short=""
    for asset in "$@"; do
        sums_list "$STAGE" "$asset" || continue
        if ! disk_fits_asset "$asset"; then
            room_short=$DISK_PROBLEM
            warn "not $asset: $DISK_PROBLEM"
            continue
        fi
        if ! has_room "$DIR" "$asset" "$(asset_url "$NEW_VERSION" "$asset")"; then
            room_short=$(room_message "$DIR" "$asset")
            warn "$room_short"
            continue
        fi
        fetch_asset "$STAGE" "$NEW_VERSION" "$asset"
        # (Moved, not copied: has_room counted two copies at most.)
        mv -f "$STAGE/$asset" "$NEW"
        chmod 755 "$NEW"
        got=$(bin_version "$NEW" || true)
        if [ "$got" = "$NEW_VERSION" ]; then
            NEW_ASSET=$asset
            say "$asset runs here and reports version $got"
            return 0
        fi
        warn "$asset does not run here or reports '${got:-nothing}' instead of $NEW_VERSION"
    done
    [ -z "$room_short" ] || err "$room_short; nothing was changed"
    err "release $NEW_VERSION has no artifact that runs here (tried: $*)"
}

# The Go connector's paired config (CONFIG_FROM, update.sh), copied to
# CONFIG with our state folder once the new binary can read it.
adopt_config() { # OLD_CONFIG
    [ "$(helper config-state "$1" 2>/dev/null)" = paired ] \
        || err "the old connector's $1 is not paired; install with install-k1.sh instead"
    refuse_if_printing "$1"
    cp "$1" "$CONFIG.tmp"
    helper config-set "$CONFIG.tmp" state_dir "$DIR/state"
    mv -f "$CONFIG.tmp" "$CONFIG"
}

# The shared installer. The caller sets LAYOUT, DIR, BIN, CONFIG, SVC_USER,
# the OPT_* flags and the answers, and STAGE (scratch inside DIR).
install_connector() { # ASSETS...
    check_path "the install folder" "$DIR"
    check_path "--config" "$CONFIG"
    if [ -f "$BIN" ] && [ -z "$LEGACY_INIT" ] && service_installed; then recover_interrupted; else sweep_stale; fi
    # A new config's answers come first; what an existing config holds is
    # for the downloaded binary to read, once it is verified.
    [ -f "$CONFIG" ] || [ -n "${CONFIG_FROM:-}" ] || gather_answers
    check_service_tmp
    stage_artifact "$@"
    pick_helper "$NEW" "$BIN" || err "$NEW_ASSET $NEW_VERSION cannot read configs (printer-connector installer); use a newer release"
    [ -z "${CONFIG_FROM:-}" ] || adopt_config "$CONFIG_FROM"
    CONFIG_STATE=absent
    [ ! -f "$CONFIG" ] || CONFIG_STATE=$(helper config-state "$CONFIG" 2>"$STAGE/config.err")
    case $CONFIG_STATE in
        paired)
            say "$CONFIG is paired already: upgrading in place, no new pairing"
            [ -z "$TOKEN" ] || warn "ignoring --pairing-token: already paired (uninstall.sh --config-only removes the pairing)"
            check_moonrakers "$CONFIG"
            [ ! -f "$BIN" ] || refuse_if_printing "$CONFIG" ;;
        unpaired)
            gather_answers
            check_moonrakers "$PRINTERS" ;;
        absent) check_moonrakers "$PRINTERS" ;;
        *) err "$CONFIG exists but is not a connector config ($(tail -n 1 "$STAGE/config.err")); move it away first" ;;
    esac

    if [ "$CONFIG_STATE" = paired ] && [ -f "$BIN" ] && [ -z "$LEGACY_INIT" ] && service_installed; then
        upgrade_in_place
        return 0
    fi
    svc_stop_if_installed
    backup_current || err "could not back up $BIN (disk full?)"
    swap_in "$NEW" || err "could not install $BIN (disk full?)"
    [ "$LAYOUT" != k1 ] || [ "$NEW_ASSET" != printer-connector.pyz ] || k1_ca_bundle "$BIN"
    if [ "$CONFIG_STATE" != paired ]; then
        mkdir -p "$(dirname "$CONFIG")"
        helper write-config "$CONFIG.tmp" "$CLOUD_URL" "$TOKEN" "$DIR/state" "$PRINTERS"
        mv -f "$CONFIG.tmp" "$CONFIG"
        pair_once
    fi
    if [ -n "$SVC_USER" ] && [ "$LAYOUT" = systemd ]; then
        chown -R "$SVC_USER:" "$DIR" || err "could not give $DIR to $SVC_USER"
        [ "$(dirname "$CONFIG")" = "$DIR" ] || chown "$SVC_USER:" "$CONFIG"
    fi
    chmod 600 "$CONFIG"
    release_info_set "$NEW_VERSION" "$NEW_ASSET"
    install_service
    commit_path "$CREATED_DIR"
    say "installed printer-connector $NEW_VERSION in $DIR"
    svc_start || err "the service did not start; see: $(log_hint)"
    UPDATE_PHASE=""
    if ! health_check; then
        err "installed, but the connector sent no heartbeat; see: $(log_hint)"
    fi
    say "done. Logs: $(log_hint)"
}

# A re-run over a working install: the service files are written again
# (they may come from an older installer), then the new binary goes through
# the same verified, rolled-back swap as update.sh.
upgrade_in_place() {
    CURRENT_VERSION=$(bin_version "$BIN" || true)
    [ -z "$SVC_USER" ] || [ "$LAYOUT" != systemd ] || own_like_install "$CONFIG"
    chmod 600 "$CONFIG"
    install_service
    commit_path "$CREATED_DIR"
    say "upgrading ${CURRENT_VERSION:-unknown} -> $NEW_VERSION in $DIR"
    swap_verified "$NEW" "$NEW_VERSION" "$NEW_ASSET"
    say "done: printer-connector $NEW_VERSION runs; the previous binary is kept in $(backup_path 1). Logs: $(log_hint)"
}

# Whether PID is gone (or a zombie) within 10 seconds.
wait_gone() { # PID
    tries=0
    while kill -0 "$1" 2>/dev/null && [ "$tries" -lt 50 ]; do
        if [ -r "/proc/$1/stat" ] && grep -q '^[0-9]* (.*) Z' "/proc/$1/stat"; then
            return 0
        fi
        sleep 0.2 2>/dev/null || sleep 1
        tries=$((tries + 1))
    done
    ! kill -0 "$1" 2>/dev/null
}

svc_stop_if_installed() {
    if [ -n "$LEGACY_INIT" ]; then
        # The Go connector's init script goes (ours replaces it); until
        # ours is written, it is kept to be put back if the switch fails.
        pidfile=$(sed -n 's/^PIDFILE="\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$LEGACY_INIT" | head -n 1)
        [ -n "$pidfile" ] || pidfile=$ROOT/var/run/printer-connector.pid
        old_pid=""
        [ ! -f "$pidfile" ] || old_pid=$(cat "$pidfile")
        "$LEGACY_INIT" stop || warn "$LEGACY_INIT stop failed"
        # Its stop does not wait: two connectors must not run at once.
        if [ -n "$old_pid" ] && ! wait_gone "$old_pid"; then
            kill -9 "$old_pid" 2>/dev/null || true
        fi
        mv -f "$LEGACY_INIT" "$STAGE/legacy-init"
        rm -f "$pidfile"
        UPDATE_PHASE=legacy
        return 0
    elif [ "$LAYOUT" = systemd ] && [ -f "$(unit_path)" ]; then
        svc_stop
    elif [ "$LAYOUT" = k1 ] && [ -f "$K1_INIT" ]; then
        svc_stop
    else
        return 0
    fi
    # Started again on exit if the install stops half-way.
    UPDATE_PHASE=stopped
}

install_service() {
    if [ "$LAYOUT" = systemd ]; then
        write_guard || err "could not write $(guard_path)"
        write_unit "$(exec_line "$BIN" "$CONFIG" "$LOG_LEVEL")"
        systemctl daemon-reload
        systemctl enable "$SERVICE" >/dev/null 2>&1 || systemctl enable "$SERVICE"
        say "systemd service $SERVICE installed (runs as ${SVC_USER:-root}, Restart=always)"
        install_moonraker_entries
    else
        py=""
        is_native "$BIN" || py=$(python_path)
        write_init "$py"
        say "init script $K1_INIT installed"
    fi
}

# --------------------------------------------------------------- updating
do_check() {
    latest=$(latest_version "$STAGE")
    say "installed: $CURRENT_VERSION ($BIN)"
    say "latest:    $latest ($RELEASE_URL)"
    if [ "$latest" = "$CURRENT_VERSION" ]; then
        say "up to date"
    else
        say "an update is available: run update.sh"
    fi
}

# Reports an installed binary whose version disagrees with release_info.json
# (e.g. after an update through Moonraker went wrong).
do_doctor() {
    pick_helper "$BIN" || true
    problems=0
    say "binary: $BIN reports ${CURRENT_VERSION:-nothing (it does not run)}"
    [ -n "$CURRENT_VERSION" ] || problems=1
    if [ "$LAYOUT" = systemd ]; then
        if [ -f "$(release_info_path)" ]; then
            info=$(release_info_version)
            say "release_info.json: version $info"
            if [ "$info" != "$CURRENT_VERSION" ]; then
                warn "release_info.json says $info but the binary is ${CURRENT_VERSION:-broken}; run update.sh --version $info (or update.sh) to repair"
                problems=1
            fi
        else
            warn "$(release_info_path) is missing: Moonraker's update manager cannot track this install"
            problems=1
        fi
    fi
    if [ -f "$DIR/update-restored" ]; then
        warn "the update to $(sed -n 2p "$DIR/update-restored") failed to start: the update guard put $(sed -n 1p "$DIR/update-restored") back; run update.sh to clear this"
        problems=1
    fi
    if [ -f "$(pending_path)" ]; then
        warn "an update was cut short ($(pending_path)): run update.sh to put the previous version back"
        problems=1
    fi
    if svc_running; then say "service: running"; else warn "service: not running"; problems=1; fi
    [ "$problems" -eq 0 ] || err "problems found (see above)"
    say "no problems found"
}

do_update() {
    target=$OPT_VERSION
    [ -n "$target" ] || target=$(latest_version "$STAGE")
    target=${target#v}
    if [ "$target" = "$CURRENT_VERSION" ]; then
        say "printer-connector $CURRENT_VERSION is up to date"
        return 0
    fi
    say "updating ${CURRENT_VERSION:-unknown} -> $target"
    asset=$(current_asset)
    disk_fits_asset "$asset" || err "$DISK_PROBLEM; nothing was changed"
    check_service_tmp
    has_room "$DIR" "$asset" "$(asset_url "$target" "$asset")" || err "$(room_message "$DIR" "$asset"); nothing was changed"
    fetch_asset "$STAGE" "$target" "$asset"
    got=$(bin_version "$STAGE/$asset" || true)
    [ "$got" = "$target" ] || err "the downloaded $asset reports '${got:-nothing}' instead of $target; nothing was changed"
    # Asked of the new binary, or of the installed one for a release before
    # the installer commands.
    pick_helper "$STAGE/$asset" "$BIN" \
        || [ "${FORCE:-0}" = 1 ] || err "neither $target nor the installed binary can ask Moonraker whether a print runs; pass --force to go on anyway"
    refuse_if_printing "$CONFIG"
    swap_verified "$STAGE/$asset" "$target" "$asset"
    say "updated to $target; the previous binary is kept in $(backup_path 1)"
}

do_rollback() {
    b1=$(backup_path 1)
    [ -f "$b1" ] || err "no backup to roll back to ($b1 does not exist)"
    old=$(bin_version "$b1") || err "the backup $b1 does not run; not rolling back"
    say "rolling back ${CURRENT_VERSION:-unknown} -> $old"
    swap_in "$b1" || err "could not put $b1 in place (disk full?); nothing was changed"
    if [ -f "$(backup_path 2)" ]; then mv -f "$(backup_path 2)" "$b1"; else rm -f "$b1"; fi
    release_info_set "$old" "$(current_asset)"
    svc_restart || err "the service did not start; see: $(log_hint)"
    health_check || err "rolled back to $old, but it sends no heartbeat; see: $(log_hint)"
    say "rolled back to $old"
}

# ------------------------------------------------- Moonraker update manager
moonraker_conf_dir() {
    home=$(dirname "$DIR")
    printf '%s/printer_data/config\n' "$home"
}

# moonraker.asvc, our [update_manager] section in a file of our own, and one
# include line in moonraker.conf (added once, never rewriting other lines).
install_moonraker_entries() {
    [ "$UPDATE_MANAGER" = 1 ] || { say "--no-update-manager: Moonraker's config left alone"; return 0; }
    conf_dir=$(moonraker_conf_dir)
    conf=$conf_dir/moonraker.conf
    [ -f "$conf" ] || { warn "no $conf: not registering with Moonraker's update manager"; return 0; }
    url=$(helper printer-urls "$CONFIG" | head -n 1)
    mr_version=$(helper moonraker-version "$url")
    if moonraker_too_old "$mr_version"; then
        warn "Moonraker $mr_version is older than 0.10.0, whose update manager first takes 'type: executable':"
        warn "not registering with it (update printer-connector with update.sh; update Moonraker and run this installer again to add it)"
        return 0
    fi
    MOONRAKER_CHANGED=0
    asvc_add "$(dirname "$conf_dir")/moonraker.asvc"
    um_file=$conf_dir/$SERVICE-update.conf
    cat >"$um_file.tmp" <<EOF
# Written by install-klipper.sh; removed by uninstall.sh.
# Lets Mainsail and Fluidd update $SERVICE through Moonraker's update
# manager. update.sh does the same with a checksum check, a print check
# and an automatic rollback.
[update_manager $SERVICE]
type: executable
channel: stable
repo: $REPO
path: $DIR
managed_services: $SERVICE
EOF
    if [ -f "$um_file" ] && cmp -s "$um_file.tmp" "$um_file"; then
        rm -f "$um_file.tmp"
    else
        mv -f "$um_file.tmp" "$um_file"
        [ -z "$SVC_USER" ] || chown "$SVC_USER" "$um_file" 2>/dev/null || true
        MOONRAKER_CHANGED=1
        say "wrote $um_file"
    fi
    if ! grep -qxF "[include $SERVICE-update.conf]" "$conf"; then
        [ -z "$(tail -c 1 "$conf")" ] || printf '\n' >>"$conf"
        printf '[include %s-update.conf]\n' "$SERVICE" >>"$conf"
        MOONRAKER_CHANGED=1
        say "added [include $SERVICE-update.conf] to $conf"
    fi
    # Moonraker reads these only when it starts; a re-run changes nothing.
    [ "$MOONRAKER_CHANGED" = 0 ] || restart_moonraker
}

# Moonraker's update manager takes "type: executable" from 0.10.0 on; an
# unknown version is not held against it.
moonraker_too_old() { # VERSION, e.g. v0.9.3-61-g4a7b2c1
    v=${1#v}
    major=${v%%.*}
    minor=${v#"$major".}
    minor=${minor%%[!0-9]*}
    case $major:$minor in
        *[!0-9:]* | :* | *:) return 1 ;;
    esac
    [ "$major" -eq 0 ] && [ "$minor" -lt 10 ]
}

remove_moonraker_entries() {
    conf_dir=$(moonraker_conf_dir)
    asvc_remove "$(dirname "$conf_dir")/moonraker.asvc"
    conf=$conf_dir/moonraker.conf
    if [ -f "$conf" ] && grep -qxF "[include $SERVICE-update.conf]" "$conf"; then
        grep -vxF "[include $SERVICE-update.conf]" "$conf" >"$conf.tmp" || true
        cat "$conf.tmp" >"$conf"
        rm -f "$conf.tmp"
        say "removed [include $SERVICE-update.conf] from $conf"
    fi
    if [ -f "$conf_dir/$SERVICE-update.conf" ]; then
        rm -f "$conf_dir/$SERVICE-update.conf"
        restart_moonraker
    fi
}

restart_moonraker() {
    if systemctl is-active --quiet moonraker 2>/dev/null; then
        if systemctl restart moonraker; then
            say "restarted Moonraker to load the change"
        else
            warn "could not restart Moonraker; restart it to load the change"
        fi
    fi
}

# ------------------------------------------------------------- uninstalling
do_uninstall() {
    if [ "$CONFIG_ONLY" = 1 ]; then
        what="the service and the configuration (pairing) in $CONFIG; the binary stays in $DIR"
    else
        what="the service and everything in $DIR"
    fi
    say "this removes $what"
    [ "$YES" = 1 ] || confirm "Remove it?" || err "nothing removed"
    svc_stop
    if [ "$LAYOUT" = systemd ]; then
        systemctl disable "$SERVICE" >/dev/null 2>&1 || true
        rm -f "$(unit_path)"
        systemctl daemon-reload || true
        remove_moonraker_entries
    else
        rm -f "$K1_INIT" "$ROOT/etc/init.d/printer-connector"
    fi
    if [ "$CONFIG_ONLY" = 1 ]; then
        rm -rf "$CONFIG" "$DIR/state" "$DIR/tmp" "$(guard_path)"
        say "removed the service and $CONFIG; the binary is still in $DIR"
    else
        rm -rf "$DIR"
        [ "$(dirname "$CONFIG")" = "$DIR" ] || rm -f "$CONFIG"
        say "removed the service and $DIR"
    fi
    say "Klipper and the rest of printer_data were not touched"
}
