# PyInstaller runtime hook of the printer-connector binary: runs in the
# Python process before connector.py.
#
# The binary unpacks itself at each start: the staticx bootloader into
# $TMPDIR/staticx-XXXXXX, the PyInstaller bootloader into $TMPDIR/_MEI...,
# and each removes its folder when its child ends. A bootloader killed
# before it has a child to wait for (a stop in the first moments: it dies of
# the signal's default action) or killed at all (SIGKILL, the OOM killer,
# a power cut) leaves its folder, about 30 MB. The installers' unit sweeps
# before each start, but a binary run by hand or by another supervisor
# needs this: at each start, the folders of that kind beside our own are
# removed when no process uses them and they have not changed for a minute.
#
# "In use" is what /proc shows: a process running a program from the folder
# (the PyInstaller bootloader and Python run from the staticx folder), one
# with a file of it mapped (Python's libraries from the _MEI folder) or open
# (a bootloader unpacking), one naming it in its environment (the variables
# the bootloaders hand their children), or, for a _MEI folder, whose name
# carries its bootloader's pid in hex, that process being alive. The minute
# covers the one moment nothing shows: a staticx bootloader between
# unpacking and starting its child. Folders of other users, links and
# anything not a directory are left alone.
import os
import re
import shutil
import stat
import sys
import time

UNCHANGED_FOR_SECONDS = 60
NAMED_AFTER_ITS_PID = re.compile(r"_MEI([0-9a-f]{8})[0-9A-Za-z]{6}$")
# What the bootloaders put in their children's environment: the folder.
FOLDER_VARIABLES = (b"STATICX_BUNDLE_DIR", b"_PYI_APPLICATION_HOME_DIR", b"_MEIPASS2")


def _is_unpack_folder(name):
    return name.startswith("_MEI") or name.startswith("staticx-")


def _stale_candidates(own):
    """Folders of our kind beside our own ones (real paths), ours, unchanged
    for a while."""
    now = time.time()
    found = []
    for parent in sorted({os.path.dirname(folder) for folder in own}):  # real paths: so are the entries
        try:
            names = os.listdir(parent)
        except OSError:
            continue
        for name in names:
            path = os.path.join(parent, name)
            if not _is_unpack_folder(name) or path in own:
                continue
            try:
                info = os.lstat(path)
            except OSError:
                continue
            if (stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid()
                    and now - info.st_mtime > UNCHANGED_FOR_SECONDS):
                found.append(path)
    return found


def _paths_used_by(pid):
    """Paths process pid runs, maps, holds open or names in its environment;
    nothing for a process we may not look into."""
    base = "/proc/%s" % pid
    used = []
    try:
        used.append(os.readlink(base + "/exe"))
    except OSError:
        pass
    try:
        for fd in os.listdir(base + "/fd"):
            try:
                used.append(os.readlink("%s/fd/%s" % (base, fd)))
            except OSError:
                pass
    except OSError:
        pass
    try:
        with open(base + "/maps", "rb") as handle:
            for line in handle:
                fields = line.split(None, 5)
                if len(fields) == 6:
                    used.append(os.fsdecode(fields[5].rstrip(b"\n")))
    except OSError:
        pass
    try:
        with open(base + "/environ", "rb") as handle:
            for entry in handle.read().split(b"\0"):
                name, _, value = entry.partition(b"=")
                if name in FOLDER_VARIABLES:
                    used.append(os.path.realpath(os.fsdecode(value)))
    except OSError:
        pass
    return used


def _is_alive(pid):
    """Running, or anything but a zombie (which uses nothing any more)."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def _in_use(candidates):
    """The candidates some live process uses."""
    pids = [name for name in os.listdir("/proc") if name.isdigit()]
    used = set()
    for path in candidates:
        match = NAMED_AFTER_ITS_PID.match(os.path.basename(path))
        if match and _is_alive(int(match.group(1), 16)):
            used.add(path)
    for pid in pids:
        for target in _paths_used_by(pid):
            for path in candidates:
                if target == path or target.startswith(path + "/"):
                    used.add(path)
    return used


def _sweep():
    # Real paths throughout: the kernel shows them in /proc, and a TMPDIR
    # through a link must not make our own folders look like strangers.
    made_by_us = (os.environ.get("STATICX_BUNDLE_DIR"), getattr(sys, "_MEIPASS", None))
    own = {os.path.realpath(folder) for folder in made_by_us if folder}
    candidates = _stale_candidates(own)
    if not candidates:
        return
    used = _in_use(candidates)
    for path in candidates:
        if path not in used:
            shutil.rmtree(path, ignore_errors=True)  # never follows a link inside


try:
    _sweep()
except Exception:  # whatever stops the sweep (a bug, an odd /proc) is no reason not to start
    pass
