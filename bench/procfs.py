"""Process-tree accounting from /proc (Linux only, no third-party modules).

A frozen onefile binary is a bootloader parent with the real interpreter as
its child, so every figure here is summed over a process and all of its
descendants: CPU (including reaped children), resident memory, and the bytes
the tree caused to be written to storage.
"""

import os

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _read(path):
    with open(path, "rb") as handle:
        return handle.read().decode("ascii", "replace")


def _stat_fields(pid):
    """Fields of /proc/PID/stat after the command name (which may hold spaces)."""
    text = _read("/proc/%d/stat" % pid)
    return text.rsplit(")", 1)[1].split()


def children_map():
    kids = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry))[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def tree_pids(root):
    kids = children_map()
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.append(pid)
        todo.extend(kids.get(pid, []))
    return found


def _status_kib(pid, key):
    for line in _read("/proc/%d/status" % pid).splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _io(pid):
    values = {}
    for line in _read("/proc/%d/io" % pid).splitlines():
        name, _, value = line.partition(":")
        values[name.strip()] = int(value)
    return values


def _thread_cpu_ns(pid):
    """CPU time of the live threads of pid, in ns (schedstat: no clock-tick rounding)."""
    total = 0
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            total += int(_read("/proc/%d/task/%s/schedstat" % (pid, tid)).split()[0])
        except (OSError, IndexError, ValueError):
            continue
    return total


def sample_tree(root):
    """One reading of the tree: cpu seconds, rss and peak-rss bytes, storage writes.

    cpu_seconds counts clock ticks (10 ms) of every process, exited threads and
    reaped children included; cpu_seconds_precise sums the nanosecond counters
    of the live threads (exact for a tree whose threads live on).
    """
    total = {"pids": [], "processes": [], "cpu_seconds": 0.0, "cpu_seconds_precise": 0.0, "rss_bytes": 0,
             "hwm_bytes": 0, "write_bytes": 0, "cancelled_write_bytes": 0}
    for pid in tree_pids(root):
        try:
            fields = _stat_fields(pid)
            if fields[0] == "Z":
                continue
            ticks = sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
            rss = _status_kib(pid, "VmRSS") * 1024
            hwm = _status_kib(pid, "VmHWM") * 1024
            io = _io(pid)
            precise = _thread_cpu_ns(pid) / 1e9
        except (OSError, IndexError, ValueError):
            continue  # exited between the listing and the reading
        total["pids"].append(pid)
        try:
            name = _read("/proc/%d/comm" % pid).strip()
        except OSError:
            name = "?"
        total["processes"].append({"pid": pid, "name": name, "rss_bytes": rss, "hwm_bytes": hwm})
        total["cpu_seconds"] += ticks / CLOCK_TICKS
        total["cpu_seconds_precise"] += precise
        total["rss_bytes"] += rss
        total["hwm_bytes"] += hwm
        total["write_bytes"] += io.get("write_bytes", 0)
        total["cancelled_write_bytes"] += io.get("cancelled_write_bytes", 0)
    return total


def rss_after_imports(python, modules, env=None):
    """RSS (bytes) of a fresh interpreter right after importing `modules`."""
    import subprocess
    code = ("import %s\n" % ", ".join(modules) if modules else "") + (
        "print([l for l in open('/proc/self/status') if l.startswith('VmRSS:')][0].split()[1])")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    if out.returncode != 0:
        return None
    return int(out.stdout.strip()) * 1024


def files_state(folder):
    """{relative path: (size, mtime_ns)} of every file under folder."""
    state = {}
    for base, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(base, name)
            try:
                info = os.stat(path)
            except OSError:
                continue
            state[os.path.relpath(path, folder)] = (info.st_size, info.st_mtime_ns)
    return state


def files_changed(before, after):
    """Files created, grown, rewritten or removed between two files_state readings."""
    changes = []
    for name in sorted(set(before) | set(after)):
        if before.get(name) == after.get(name):
            continue
        old = before.get(name, (0, None))
        new = after.get(name, (0, None))
        what = "created" if name not in before else "removed" if name not in after else "modified"
        changes.append({"file": name, "change": what, "size_before": old[0], "size_after": new[0]})
    return changes


def transfer_peak_bytes(root):
    """Peak RSS of a tree whose work is done by one process: that process's
    VmHWM (exact, no sample can miss it) plus the RSS of the others now (a
    frozen binary's launchers, idle after start-up; their own VmHWM is from
    unpacking at start, so a sum of every VmHWM would count that too)."""
    processes = sample_tree(root)["processes"]
    if not processes:
        return 0
    worker = max(processes, key=lambda p: p["hwm_bytes"])
    return worker["hwm_bytes"] + sum(p["rss_bytes"] for p in processes if p is not worker)

