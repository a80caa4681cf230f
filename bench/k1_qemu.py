#!/usr/bin/env python3
"""What can be measured of the K1 binary without a K1: the NaN2008 mipsle
build (make binary-mipsle) under qemu-mipsel-static, against amd64.

    k1_qemu.py [--runs 7] [--seconds 60] [--idle-instructions-seconds 120] [--no-instructions]

1. `--version` start-up: wall and CPU (user+sys) seconds, median of --runs,
   of the mipsle binary under QEMU, the amd64 binary, and connector.py's
   bytecode on this CPython (3.11, as in the mipsle build).
2. Guest instructions of `--version`: QEMU's own log of every translated
   block (-d in_asm) and of every block entered (-d exec,nochain), for the
   mipsle binary and, with qemu-x86_64-static, for connector.py's bytecode on
   this CPython: the two instruction sets' counts for the same work.
3. Memory while idle: the mipsle binary paired with the reference cloud and
   the printer simulator for --seconds, then the QEMU process's resident
   pages split by mapping: the guest's (below 4 GiB: the binary's pages, its
   heap and stacks), QEMU's translation cache (the rwx mapping), and QEMU's
   own code and heap; and, with the block logs, the guest instructions per
   hour of that idle connector.

What this cannot give: the K1's own start-up and CPU time (QEMU translates
every block and runs it on an x86 core; instructions are not time on an
in-order MIPS core), its kernel's page size and its memory accounting.
docs/benchmarks.md ("K1") has the figures and what they mean.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from sim.cloud import ReferenceCloud  # noqa: E402
from sim.printer import PrinterSimulator  # noqa: E402

MIPSLE = os.path.join(ROOT, "dist", "printer-connector-linux-mipsle")
AMD64 = os.path.join(ROOT, "dist", "printer-connector-linux-amd64")
QEMU_MIPSEL = shutil.which("qemu-mipsel-static") or "/usr/bin/qemu-mipsel-static"
QEMU_X86_64 = shutil.which("qemu-x86_64-static") or "/usr/bin/qemu-x86_64-static"
QEMU_CPU = ["-cpu", "P5600"]  # a NaN2008 MIPS32 model (build/build-mipsle.sh)
GUEST_LIMIT = 1 << 32  # a 32-bit guest's addresses: QEMU maps them at guest_base 0 here

INSN_LINE = re.compile(rb"^0x[0-9a-f]+:\s")
TRACE_LINE = re.compile(rb"^Trace \d+: (0x[0-9a-f]+) \[")


def log(message):
    print("[k1_qemu %s] %s" % (time.strftime("%H:%M:%S"), message), file=sys.stderr, flush=True)


# ---- start-up --------------------------------------------------------------

def timed(command, env=None):
    """(wall, user+sys of the child) of one run."""
    before = os.times()
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, env=env, timeout=120)
    wall = time.perf_counter() - started
    after = os.times()
    if done.returncode != 0:
        raise RuntimeError("%s: exit %d: %s" % (command, done.returncode, done.stderr[-300:]))
    return wall, (after.children_user - before.children_user) + (after.children_system - before.children_system)


def bytecode_command(workdir):
    """connector.py imported from its .pyc on this interpreter (what the
    binaries run: bytecode, no compiling of the source)."""
    shutil.copy(os.path.join(ROOT, "connector.py"), os.path.join(workdir, "connector.py"))
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-c", "import connector"], cwd=workdir, env=env, check=True)
    return [sys.executable, "-c", "import sys; sys.path.insert(0, %r); import connector; connector.main()" % workdir,
            "--version"]


def startup(runs, workdir):
    subjects = {"mipsle under QEMU": [QEMU_MIPSEL] + QEMU_CPU + [MIPSLE, "--version"],
                "amd64 binary": [AMD64, "--version"],
                "bytecode on this CPython": bytecode_command(workdir)}
    results = {name: {"wall": [], "cpu": []} for name in subjects}
    for _ in range(runs):  # interleaved, so that the machine's drift falls on all alike
        for name, command in subjects.items():
            wall, cpu = timed(command)
            results[name]["wall"].append(wall)
            results[name]["cpu"].append(cpu)
    return {name: {"wall_median_s": round(statistics.median(r["wall"]), 3),
                   "cpu_median_s": round(statistics.median(r["cpu"]), 3),
                   "wall_s": [round(v, 3) for v in r["wall"]]} for name, r in results.items()}


# ---- guest instructions ------------------------------------------------------

class InstructionCounter:
    """Counts the guest instructions in QEMU's in_asm and exec logs as they
    arrive: each block entered counts the instructions of its latest
    translation (with nochain every entry is logged)."""

    def __init__(self, stream):
        self.stream = stream
        self.executed = self.entered = 0
        self.size_by_block = {}

    def run(self):
        translating, insns, translated = False, 0, None
        for line in self.stream:
            if line.startswith(b"IN:"):
                translating, insns = True, 0
                continue
            if translating:
                if INSN_LINE.match(line):
                    insns += 1
                    continue
                translating, translated = False, insns
            match = TRACE_LINE.match(line)
            if match:
                block = match.group(1)
                if translated is not None:  # the first block entered after a translation is that one
                    self.size_by_block[block], translated = translated, None
                self.executed += self.size_by_block.get(block, 0)
                self.entered += 1


def logged(command):
    """A qemu-*-static command line with the block logs QEMU writes to stderr."""
    return command[:1] + ["-d", "in_asm,exec,nochain"] + command[1:]


def guest_instructions(command):
    """Guest instructions QEMU ran for `command` (a qemu-*-static command line)."""
    proc = subprocess.Popen(logged(command), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    counter = InstructionCounter(proc.stderr)
    counter.run()
    code = proc.wait()
    if code != 0:
        raise RuntimeError("%s: exit %d" % (command, code))
    return {"instructions": counter.executed, "blocks_entered": counter.entered,
            "blocks_translated": len(counter.size_by_block)}


def instructions(workdir):
    mipsle = guest_instructions([QEMU_MIPSEL] + QEMU_CPU + [MIPSLE, "--version"])
    amd64 = guest_instructions([QEMU_X86_64] + bytecode_command(workdir))
    return {"mipsle --version": mipsle, "amd64 bytecode --version": amd64,
            "ratio mipsle/amd64": round(mipsle["instructions"] / amd64["instructions"], 3)}


# ---- memory while idle ---------------------------------------------------------

def mappings(pid):
    """[(start address, permissions, name, resident KiB)] of /proc/PID/smaps."""
    rows = []
    with open("/proc/%d/smaps" % pid) as handle:
        for line in handle:
            parts = line.split()
            if re.match(r"^[0-9a-f]+-[0-9a-f]+$", parts[0]):
                rows.append([int(parts[0].split("-")[0], 16), parts[1], parts[5] if len(parts) > 5 else "", 0])
            elif parts[0] == "Rss:" and rows:
                rows[-1][3] = int(parts[1])
    return rows


def status_kib(pid, key):
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def paired_config(cloud, printer, workdir):
    token = "PAIR_k1_%d" % len(cloud.connectors)
    cloud.add_pairing_token(token)
    folder = tempfile.mkdtemp(dir=workdir)
    config_path = os.path.join(folder, "config.json")
    with open(config_path, "w") as handle:
        json.dump({"cloud_url": cloud.url, "pairing_token": token, "state_dir": os.path.join(folder, "state"),
                   "moonraker": [{"printer_id": 0, "name": "K1", "base_url": printer.url,
                                  "ui_port": printer.ui_port}]}, handle)
    os.chmod(config_path, 0o600)
    return config_path


def steady(cloud, connectors):
    """Every loop of the newest connector has reached the cloud."""
    def every_loop():
        cid = str(cloud.connectors[-1]["id"]) if len(cloud.connectors) == connectors else None
        paths = [r["path"] for r in cloud.requests] if cid else []
        return cid and all(any(("/connectors/%s/%s" % (cid, name)) in p for p in paths)
                           for name in ("heartbeat", "commands", "webcam_requests"))
    cloud.wait_for(every_loop, timeout=900, message="a first round of every loop")  # under the block logs, start-up takes minutes


def idle_instructions(seconds, workdir):
    """Guest instructions per hour of the idle connector (default intervals,
    a long-poll cloud), counted over `seconds` once every loop has run."""
    cloud, printer = ReferenceCloud().start(), PrinterSimulator(print_seconds=360000.0).start()
    proc = None
    try:
        command = [QEMU_MIPSEL] + QEMU_CPU + [MIPSLE, "--config", paired_config(cloud, printer, workdir)]
        proc = subprocess.Popen(logged(command), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=dict(os.environ, MALLOC_ARENA_MAX="2"))
        counter = InstructionCounter(proc.stderr)
        reader = threading.Thread(target=counter.run, daemon=True)
        reader.start()
        steady(cloud, 1)
        time.sleep(10)  # the first snapshot push and answer settle
        start, begun = counter.executed, time.monotonic()
        time.sleep(seconds)
        executed, window = counter.executed - start, time.monotonic() - begun
        return {"guest_instructions_per_hour_idle": int(executed * 3600 / window), "window_s": round(window, 1)}
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        cloud.stop()
        printer.stop()


def idle_memory(seconds, workdir):
    cloud, printer = ReferenceCloud().start(), PrinterSimulator(print_seconds=360000.0).start()
    proc = None
    try:
        config_path = paired_config(cloud, printer, workdir)
        env = dict(os.environ, MALLOC_ARENA_MAX="2")
        started = time.monotonic()
        proc = subprocess.Popen([QEMU_MIPSEL] + QEMU_CPU + [MIPSLE, "--config", config_path],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        cloud.wait_for(lambda: cloud.heartbeats and cloud.snapshots, timeout=60, message="a heartbeat and a snapshot")
        running = time.monotonic() - started
        cpu_start, window_start = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(seconds)
        cpu = cpu_seconds(proc.pid) - cpu_start
        window = time.monotonic() - window_start
        rows = mappings(proc.pid)
        total = sum(r[3] for r in rows)
        guest = sum(r[3] for r in rows if r[0] < GUEST_LIMIT)
        cache = sum(r[3] for r in rows if r[0] >= GUEST_LIMIT and r[1] == "rwxp")
        return {"start_to_first_heartbeat_and_snapshot_s": round(running, 2),
                "qemu_rss_mib": round(total / 1024, 1), "qemu_hwm_mib": round(status_kib(proc.pid, "VmHWM") / 1024, 1),
                "guest_rss_mib": round(guest / 1024, 1), "translation_cache_mib": round(cache / 1024, 1),
                "qemu_own_mib": round((total - guest - cache) / 1024, 1),
                "qemu_cpu_seconds_per_hour_idle": round(cpu * 3600 / window, 2), "window_s": round(window, 1)}
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(15)
        cloud.stop()
        printer.stop()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="--version start-ups of each (default 7)")
    parser.add_argument("--seconds", type=float, default=60.0, help="idle window for memory and CPU (default 60)")
    parser.add_argument("--no-instructions", action="store_true", help="skip the guest instruction counts")
    parser.add_argument("--idle-instructions-seconds", type=float, default=120.0,
                        help="window of the idle instruction count (default 120: four heartbeats, ten polls)")
    args = parser.parse_args(argv)
    for path in (MIPSLE, AMD64, QEMU_MIPSEL) + (() if args.no_instructions else (QEMU_X86_64,)):
        if not os.path.exists(path):
            raise SystemExit("k1_qemu: %s missing (make binary binary-mipsle; apt-get install qemu-user-static)" % path)
    with tempfile.TemporaryDirectory(prefix="k1-qemu-") as workdir:
        report = {"qemu": subprocess.run([QEMU_MIPSEL, "--version"], capture_output=True, text=True).stdout.split("\n")[0]}
        log("--version start-up, %d runs each" % args.runs)
        report["startup"] = startup(args.runs, workdir)
        if not args.no_instructions:
            log("guest instructions of --version (QEMU logs every block: a minute or two)")
            report["instructions"] = instructions(workdir)
        log("idle memory and CPU for %.0f s" % args.seconds)
        report["idle"] = idle_memory(args.seconds, workdir)
        if not args.no_instructions:
            log("guest instructions while idle for %.0f s" % args.idle_instructions_seconds)
            report["idle"].update(idle_instructions(args.idle_instructions_seconds, workdir))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
