#!/usr/bin/env python3
"""What large command results cost the connector: memory and ledger bytes.

Runs connector.py (or CONNECTOR_CMD) as a real process against the reference
cloud and a printer simulator holding --files gcode files and --jobs history
jobs, then sends --syncs sync_files and --imports import_history(--jobs)
commands. Prints the RSS before and after, the ledger's size on disk, and the
peak RSS of a restart that loads that ledger (issue 14 item 2).

    ledger_cost.py [--files 3000] [--jobs 5000] [--syncs 40] [--imports 5]
"""

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from harness import Connector, unpaired_config  # noqa: E402
from sim.cloud import ReferenceCloud  # noqa: E402
from sim.printer import PrinterSimulator  # noqa: E402


def status_kib(pid, key):
    with open("/proc/%d/status" % pid) as handle:
        return int(next(line for line in handle if line.startswith(key + ":")).split()[1])


def add_history(printer, jobs):
    with printer._lock:  # the simulator adds a job per finished print; 5000 prints would take hours
        for n in range(jobs):
            printer._history.append({
                "job_id": "%06X" % (n + 1), "user": "_TRUSTED_USER_", "filename": "folder/model_%05d.gcode" % n,
                "exists": True, "status": "completed", "start_time": 1767225600.0 + n * 3600,
                "end_time": 1767229200.0 + n * 3600, "print_duration": 3500.0, "total_duration": 3600.0,
                "filament_used": 1234.5, "metadata": {"size": 123456, "modified": 1767225600.0},
                "auxiliary_data": []})


def run(cloud, connector, action, params, count):
    ids = [cloud.enqueue_command(connector.connector_id, connector.printer_id, action, params) for _ in range(count)]
    deadline = time.monotonic() + 600
    while not all(cloud.completions_for(i) for i in ids):
        if time.monotonic() > deadline:
            raise SystemExit("commands did not complete")
        time.sleep(0.2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=3000)
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--syncs", type=int, default=40)
    parser.add_argument("--imports", type=int, default=5)
    args = parser.parse_args()
    with ReferenceCloud() as cloud, PrinterSimulator(print_seconds=3600.0) as printer, \
            tempfile.TemporaryDirectory() as tmp:
        for n in range(args.files):
            printer.add_file("folder/model_%05d.gcode" % n, b"G28\n")
        add_history(printer, args.jobs)
        connector = Connector(__import__("pathlib").Path(tmp), unpaired_config(cloud, printer))
        connector.start(log_level="info")
        connector.wait_log("Connector running", timeout=60)
        time.sleep(3)
        pid = connector.proc.pid
        before = status_kib(pid, "VmRSS")
        run(cloud, connector, "sync_files", None, args.syncs)
        after_syncs = status_kib(pid, "VmRSS")
        run(cloud, connector, "import_history", {"limit": args.jobs}, args.imports)
        after = status_kib(pid, "VmRSS")
        ledger = os.path.join(str(connector.state_dir), "commands.jsonl")
        connector.stop()  # after the last acknowledgement is written
        size = os.path.getsize(ledger)
        connector.start(log_level="info")
        connector.wait_log("Connector running", timeout=120)
        time.sleep(3)
        restart_peak = status_kib(connector.proc.pid, "VmHWM")
        connector.stop()
        print("RSS %.1f MiB -> %.1f MiB after %d sync_files (%d files) -> %.1f MiB after %d import_history(%d); "
              "ledger %.1f KiB; restart peak RSS %.1f MiB"
              % (before / 1024, after_syncs / 1024, args.syncs, args.files, after / 1024, args.imports, args.jobs,
                 size / 1024, restart_peak / 1024))


if __name__ == "__main__":
    main()
