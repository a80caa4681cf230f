# PyInstaller runtime hook of the printer-connector binary: runs in the
# Python process before connector.py.
#
# The static binary is three processes: the staticx bootloader (the pid a
# supervisor sees), the PyInstaller bootloader it starts, and this Python
# process. SIGTERM and SIGINT are forwarded down the chain, but a SIGKILL of
# the outer process would leave the other two running, still working, and
# their unpacked files in $TMPDIR. So this process watches both launchers;
# when either is gone it removes the staticx folder the dead launcher can no
# longer remove, and stops itself the ordinary way (SIGTERM), after which
# the PyInstaller bootloader removes its own folder and exits.
import os
import select
import shutil
import signal
import threading


def _parent_of(pid):
    with open("/proc/%d/stat" % pid) as handle:
        # The command name in parentheses may hold spaces: the field after
        # the last ")" is the state, then the parent's pid.
        return int(handle.read().rsplit(")", 1)[1].split()[1])


def _wait_for_exit(pids):
    """Returns when one of the processes has ended (pidfd, Linux >= 5.3)."""
    fds = [os.pidfd_open(pid) for pid in pids]
    try:
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        while not poller.poll():
            pass
    finally:
        for fd in fds:
            os.close(fd)


def _watch(pids, bundle_dir):
    try:
        _wait_for_exit(pids)
    except OSError:
        return  # no pidfd here: leave it to the launchers
    if bundle_dir and os.path.basename(bundle_dir).startswith("staticx-"):
        shutil.rmtree(bundle_dir, ignore_errors=True)
    os.kill(os.getpid(), signal.SIGTERM)


def _start():
    bundle_dir = os.environ.get("STATICX_BUNDLE_DIR")
    if not bundle_dir:
        return  # not run by the staticx bootloader
    pyinstaller_pid = os.getppid()
    try:
        staticx_pid = _parent_of(pyinstaller_pid)
    except (OSError, ValueError, IndexError):
        return
    threading.Thread(target=_watch, args=([pyinstaller_pid, staticx_pid], bundle_dir),
                     name="launcher-watch", daemon=True).start()


_start()
