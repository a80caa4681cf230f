"""How a stop at any moment of a start ends (issue 17 item 9).

Starts the binary (or any command) TRIES times with a config whose cloud and
printer ports are closed, sends SIGTERM to its whole process group (what
systemd does with KillMode=control-group) at moments spread evenly from 0 to
--until seconds after the start, and counts the stops that did not take
effect within --grace seconds (then kills the group) and the tries that left
something in the TMPDIR it unpacked into. For a stuck process it prints its
state and kernel wait channel per thread.

    python bench/stop_at_start.py dist/printer-connector-linux-amd64 --tries 100

It measures and prints; it asserts nothing.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time


def group_members(pgid):
    """Live (not zombie) processes of the group."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name) as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(name))
    return found


def threads_of(pid):
    """'state/wait channel' of each thread of a process."""
    shown = []
    for tid in sorted(os.listdir("/proc/%d/task" % pid)):
        base = "/proc/%d/task/%s/" % (pid, tid)
        try:
            with open(base + "stat") as handle:
                state = handle.read().rsplit(")", 1)[1].split()[0]
            with open(base + "wchan") as handle:
                shown.append("%s/%s" % (state, handle.read().strip() or "-"))
        except OSError:
            pass
    return " ".join(shown)


def one_try(command, folder, delay, grace):
    """(stopped in time, names left in TMPDIR) of one start stopped after delay s."""
    unpack = os.path.join(folder, "unpack")
    os.makedirs(unpack)
    config = os.path.join(folder, "config.json")
    with open(config, "w") as handle:
        json.dump({"cloud_url": "http://127.0.0.1:9", "pairing_token": "PAIR_stop_at_start",
                   "state_dir": os.path.join(folder, "state"),
                   "moonraker": [{"printer_id": 0, "name": "bench", "base_url": "http://127.0.0.1:9"}]}, handle)
    with open(os.path.join(folder, "output.log"), "wb") as log:
        proc = subprocess.Popen(command + ["--config", config], stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, TMPDIR=unpack), start_new_session=True)
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    stuck = group_members(proc.pid)
    for pid in stuck:
        print("  stuck after %.2f s: pid %d %s" % (delay, pid, threads_of(pid)))
    if stuck:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return not stuck, sorted(os.listdir(unpack))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="+", help="the binary (and its arguments before --config)")
    parser.add_argument("--tries", type=int, default=50)
    parser.add_argument("--until", type=float, default=3.0, help="latest moment of the SIGTERM (s)")
    parser.add_argument("--grace", type=float, default=8.0, help="time a stop may take (s)")
    args = parser.parse_args()
    stuck = leaving = 0
    with tempfile.TemporaryDirectory(prefix="stop-at-start-") as scratch:
        for index in range(args.tries):
            delay = args.until * (index + 0.5) / args.tries
            stopped, left = one_try(args.command, os.path.join(scratch, str(index)), delay, args.grace)
            stuck += not stopped
            if left:
                leaving += 1
                print("  stopped after %.2f s, left %s" % (delay, " ".join(left)))
    print("%d tries, SIGTERM to the group at 0-%.1f s: %d did not stop within %.0f s, %d left files in TMPDIR"
          % (args.tries, args.until, stuck, args.grace, leaving))
    return 0


if __name__ == "__main__":
    sys.exit(main())
