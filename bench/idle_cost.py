#!/usr/bin/env python3
"""CPU the connector spends while its loops are idle: the status websocket.

Runs connector.py with every loop interval at 100 000 s (one round at start,
then nothing) for --duration seconds, side by side: against the printer
simulator, and against the real Moonraker 0.11 (no Klipper) when
.venv-moonraker is installed. What remains is the status watcher: its receive
timeouts, and every websocket message the printer pushes (the real Moonraker
sends notify_proc_stat_update to every client once a second, which the
simulator does not). Prints CPU seconds per hour for each.

    idle_cost.py [--duration S]
"""

import argparse
import os
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import bench  # noqa: E402
import procfs  # noqa: E402

IDLE = {"poll_commands_seconds": 100000, "heartbeat_seconds": 100000, "push_snapshots_seconds": 100000,
        "poll_webcam_seconds": 100000}


def measure(rig, duration, results, name):
    try:
        rig.start()
        rig.wait_log(r'msg="Connector running"', 60)
        time.sleep(10)  # the first round of every loop is over
        first = procfs.sample_tree(rig.proc.pid)["cpu_seconds_precise"]
        started = time.monotonic()
        time.sleep(duration)
        used = procfs.sample_tree(rig.proc.pid)["cpu_seconds_precise"] - first
        results[name] = used * 3600.0 / (time.monotonic() - started)
    except Exception as exc:
        results[name] = "failed: %s" % exc
    finally:
        rig.stop()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=120.0)
    parser.add_argument("--connector", help="measure this copy of connector.py instead (a proposed change)")
    args = parser.parse_args(argv)
    subject = bench.all_subjects(sys.executable, args.connector and os.path.abspath(args.connector))["py"]
    work = tempfile.mkdtemp(prefix="idle-", dir=bench.RESULTS if os.path.isdir(bench.RESULTS) else None)
    rigs = {"printer simulator": bench.Rig(subject, os.path.join(work, "sim"), IDLE)}
    real = None
    try:
        from moonraker_real import RealMoonraker
        real = RealMoonraker(os.path.join(work, "moonraker")).start()
        rig = bench.Rig(subject, os.path.join(work, "real"), IDLE)
        config = bench.json.load(open(rig.config_path))
        config["moonraker"][0]["base_url"] = real.url
        config["moonraker"][0]["ui_port"] = real.ui_port
        with open(rig.config_path, "w") as handle:
            bench.json.dump(config, handle)
        rigs["real Moonraker 0.11 (no Klipper)"] = rig
    except Exception as exc:  # not installed: the simulator alone
        print("real Moonraker not available: %s" % exc)
    results = {}
    threads = [threading.Thread(target=measure, args=(rig, args.duration, results, name))
               for name, rig in rigs.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if real is not None:
        real.stop()
    print("connector.py with every loop idle, %.0f s:" % args.duration)
    for name, value in results.items():
        print("  %-36s %s" % (name, "%.2f CPU s/h" % value if isinstance(value, float) else value))
    return 0


if __name__ == "__main__":
    sys.exit(main())
