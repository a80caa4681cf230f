#!/usr/bin/env python3
"""Cost of the connector on the printer and on the wire.

Runs the connector -- connector.py on this interpreter, and the built binary
and zipapp when they exist -- at its default intervals against the reference
cloud (sim/cloud.py) and the printer simulator (sim/printer.py) on loopback,
and prints one table: bytes on the wire per hour (both directions, headers
included, counted by the cloud), requests per hour by endpoint, CPU seconds
per hour and peak RSS of the whole process tree, bytes written to storage per
hour, `--version` start-up time, artifact size, and the time from a print
state change in the simulator to a snapshot with that state in the cloud,
and the peak RSS and wall time of a G-code upload (--upload-mb, 50 MB) each
way: as base64 `content` in the commands answer, and by presigned `url`; the
time from the cloud queuing a command to Moonraker receiving it, and from the cloud
queuing an emergency stop to Moonraker receiving it while a backup upload is
in progress. The reference cloud speaks the protocol extensions (long-poll);
the `oldcloud` subject runs against today's cloud (no long-poll, the idle
pace of PROTOCOL.md 1.3).
Per-hour figures are extrapolated from a steady-state window (--duration);
CPU is also given as the median of one-minute windows. Results go to
bench/results/ as JSON and Markdown.

    bench.py [--duration S] [--runs N] [--targets py,binary,pyz,nocam]
    bench.py --uploads-only [--upload-mb 50]  # only the upload each way
    bench.py --soak [--soak-minutes M]      # 1 s intervals, RSS start vs end
    bench.py --profile [--duration S]       # cProfile of connector.py, all threads

This measures and prints; it is not a test and asserts nothing.
"""

import argparse
import collections
import datetime
import json
import os
import platform
import pstats
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import procfs  # noqa: E402
from sim.cloud import ReferenceCloud  # noqa: E402
from sim.printer import PrinterSimulator  # noqa: E402

RESULTS = os.path.join(HERE, "results")
PYTHON38 = os.environ.get("PYTHON38", "/root/.pyenv/versions/3.8.18/bin/python3.8")
QEMU_MIPSEL = shutil.which("qemu-mipsel-static") or "/usr/bin/qemu-mipsel-static"
CLOUD_ENDPOINTS = ("heartbeat", "commands", "snapshots", "webcam_requests", "complete", "webcam_upload", "register")
# Requests per hour at the default intervals: 3 s, 2 s, 10 s, 30 s.
NOMINAL_PER_HOUR = {"commands": 1200, "webcam_requests": 1800, "heartbeat": 360, "snapshots": 120}
MB = 1000.0 * 1000.0
MIB = 1024.0 * 1024.0

# (key, label, target, unit, how to show a value)
TARGETS = [
    ("wire_bytes_per_hour", "wire, both directions (MB/h)", 1.0 * MB, "<= 1.0", lambda v: "%.3f" % (v / MB)),
    ("wire_bytes_per_hour_nominal", "  same at exactly 3480 req/h (MB/h)", 1.0 * MB, "<= 1.0",
     lambda v: "%.3f" % (v / MB)),
    ("requests_per_hour", "requests per hour", None, "(Go: ~3480)", lambda v: "%.0f" % v),
    ("cpu_seconds_per_hour", "CPU, whole tree (s/h)", 3.6, "<= 3.6", lambda v: "%.2f" % v),
    ("peak_rss_bytes", "peak RSS, whole tree (MiB)", 30 * MIB, "<= 30", lambda v: "%.1f" % (v / MIB)),
    ("disk_write_bytes_per_hour", "storage writes (bytes/h)", 0, "0 beyond logs", lambda v: "%.0f" % v),
    ("log_bytes_per_hour", "log output, info (bytes/h)", None, "(not counted)", lambda v: "%.0f" % v),
    ("version_startup_seconds", "--version start-up, median (s)", 0.5, "<= 0.5", lambda v: "%.3f" % v),
    ("size_bytes", "artifact size (MB)", 14 * MB, "<= 14", lambda v: "%.2f" % (v / MB)),
    ("state_latency_seconds", "state change to cloud, median (s)", 2.0, "<= 2", lambda v: "%.3f" % v),
    ("upload_content_peak_rss_bytes", "50 MB upload as content: peak RSS (MiB)", 80 * MIB, "<= 80",
     lambda v: "%.1f" % (v / MIB)),
    ("upload_content_above_idle_bytes", "  same: above idle (MiB)", None, "a few", lambda v: "%.1f" % (v / MIB)),
    ("upload_content_seconds", "  same: wall time, poll to completion (s)", None, "", lambda v: "%.1f" % v),
    ("upload_url_peak_rss_bytes", "50 MB upload by url: peak RSS (MiB)", 40 * MIB, "<= 40",
     lambda v: "%.1f" % (v / MIB)),
    ("upload_url_above_idle_bytes", "  same: above idle (MiB)", None, "a few", lambda v: "%.1f" % (v / MIB)),
    ("upload_url_seconds", "  same: wall time, poll to completion (s)", None, "", lambda v: "%.1f" % v),
    ("command_latency_seconds", "command queued to Moonraker, median (s)", 0.1, "<= 0.1 (long-poll)",
     lambda v: "%.3f" % v),
    ("estop_during_backup_seconds", "emergency stop during a backup upload (s)", 1.0, "<= 1", lambda v: "%.3f" % v),
]
# A presigned server that takes a backup's upload and answers only when the
# run ends: a backup that lasts as long as the measurement (5 minutes of real
# data would only add waiting). The emergency stop is queued once the upload
# is in progress.
BACKUP_BYTES = 2 * 1000 * 1000


def log(message):
    sys.stderr.write("[bench %s] %s\n" % (time.strftime("%H:%M:%S"), message))
    sys.stderr.flush()


# --------------------------------------------------------------------------
# What is measured: connector.py, the binary, the zipapp
# --------------------------------------------------------------------------

class Subject:
    def __init__(self, key, label, command, artifact, python=None, camera=True, extensions=True, config=None):
        self.key, self.label, self.command, self.artifact, self.python = key, label, command, artifact, python
        self.camera = camera  # False: the printer has no camera (no listed webcam, snapshot URL 404)
        self.extensions = extensions  # False: today's cloud (no long-poll)
        self.config = config or {}

    def missing(self):
        """Why this subject cannot run, or None."""
        if not os.path.exists(self.artifact):
            return "not built (%s missing)" % os.path.relpath(self.artifact, ROOT)
        if self.python and not os.access(self.python, os.X_OK):
            return "interpreter %s missing" % self.python
        return None


def all_subjects(python, connector=None):
    connector = connector or os.path.join(ROOT, "connector.py")
    binary = os.path.join(ROOT, "dist", "printer-connector-linux-amd64")
    mipsle = os.path.join(ROOT, "dist", "printer-connector-linux-mipsle")
    pyz = os.path.join(ROOT, "dist", "printer-connector.pyz")
    version = ".".join(platform.python_version_tuple()[:2])
    return {
        "py": Subject("py", "%s (py%s)" % (os.path.basename(connector), version), [python, connector], connector,
                      python),
        "binary": Subject("binary", "binary (amd64)", [binary], binary),
        "pyz": Subject("pyz", "zipapp (py3.8)", [PYTHON38, pyz], pyz, PYTHON38),
        "nocam": Subject("nocam", "%s, no camera" % os.path.basename(connector), [python, connector], connector,
                         python, camera=False),
        # Today's cloud, idle: the relaxed pace from 10 s of quiet (300 s by
        # default; only the onset differs, the window is all idle).
        "oldcloud": Subject("oldcloud", "%s, today's cloud" % os.path.basename(connector), [python, connector],
                            connector, python, extensions=False, config={"idle_after_seconds": 10}),
        # A long-poll cloud sees the connector online through its held poll,
        # so it may ask for heartbeats every 30 s (register's polling).
        "lp30": Subject("lp30", "%s, long-poll, 30 s heartbeats" % os.path.basename(connector),
                        [python, connector], connector, python, config={"heartbeat_seconds": 30}),
        # The K1's binary (NaN2008 mipsle) under QEMU user mode: the emulator's
        # CPU and memory count (docs/benchmarks.md, "K1").
        "mipsle": Subject("mipsle", "binary (mipsle, QEMU)", [QEMU_MIPSEL, "-cpu", "P5600", mipsle], mipsle,
                          QEMU_MIPSEL),
    }


# --------------------------------------------------------------------------
# One connector process with its own cloud and printer
# --------------------------------------------------------------------------

class Rig:
    """A reference cloud, a printer simulator and one connector process."""

    def __init__(self, subject, workdir, intervals=None, command=None):
        self.subject = subject
        self.workdir = workdir
        self.command = command or subject.command
        self.cloud = ReferenceCloud(extensions=subject.extensions).start()
        self.printer = PrinterSimulator(print_seconds=360000.0).start()
        if not subject.camera:
            self.printer.set_webcams([])
            self.printer.set_webcam_image(None)
        self.state_dir = os.path.join(workdir, "state")
        self.config_path = os.path.join(workdir, "config.json")
        token = "PAIR_bench_%s_%d" % (subject.key, os.getpid())
        self.cloud.add_pairing_token(token)
        self.printer_data = os.path.join(workdir, "printer_data")
        os.makedirs(os.path.join(self.printer_data, "config"), exist_ok=True)
        with open(os.path.join(self.printer_data, "config", "printer.cfg"), "wb") as handle:
            handle.write(os.urandom(BACKUP_BYTES))
        config = {"cloud_url": self.cloud.url, "pairing_token": token, "site_name": "Bench",
                  "state_dir": self.state_dir, "printer_data_root": self.printer_data,
                  "moonraker": [{"printer_id": 0, "name": "Sim", "base_url": self.printer.url,
                                 "ui_port": self.printer.ui_port}],
                  # The backup's presigned storage is the bench's own server on
                  # loopback, which transfer URLs may reach only when allowed.
                  "transfer_allow_hosts": ["127.0.0.1"]}
        config.update(intervals or {})  # none: the connector's defaults
        config.update(subject.config)
        os.makedirs(workdir, exist_ok=True)
        with open(self.config_path, "w") as handle:
            json.dump(config, handle, indent=2)
        os.chmod(self.config_path, 0o600)
        self.endpoint_bytes = {}  # endpoint -> [requests, bytes to cloud, bytes from cloud]
        count_request = self.cloud._count_request

        def count_per_endpoint(endpoint, bytes_in, bytes_out):
            with self.cloud._lock:
                entry = self.endpoint_bytes.setdefault(endpoint, [0, 0, 0])
                entry[0], entry[1], entry[2] = entry[0] + 1, entry[1] + bytes_in, entry[2] + bytes_out
            count_request(endpoint, bytes_in, bytes_out)
        self.cloud._count_request = count_per_endpoint  # the cloud's stats keep only totals
        self.proc = None
        self.log_bytes = 0
        self.log_tail = collections.deque(maxlen=400)
        self._log_lock = threading.Lock()
        self._log_seen = threading.Condition(self._log_lock)
        self.peak_rss = 0
        self._sampling = threading.Event()

    # ---- process ----
    def start(self):
        env = dict(os.environ)
        env.pop("CLOUD_URL", None)
        # The service environment the installers write (systemd unit and K1
        # init script): fewer glibc malloc arenas, 8 MiB less for the zipapp.
        env.setdefault("MALLOC_ARENA_MAX", "2")
        self.proc = subprocess.Popen(self.command + ["--config", self.config_path], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        threading.Thread(target=self._drain, daemon=True).start()
        threading.Thread(target=self._sample_rss, daemon=True).start()
        return self

    def _drain(self):
        """Log lines go to a pipe (not to storage) and are counted here."""
        with open(os.path.join(self.workdir, "connector.log"), "wb") as keep:
            for line in iter(self.proc.stdout.readline, b""):
                keep.write(line)
                with self._log_lock:
                    self.log_bytes += len(line)
                    self.log_tail.append(line.decode("utf-8", "replace").rstrip())
                    self._log_seen.notify_all()
        with self._log_lock:
            self._log_seen.notify_all()

    def _sample_rss(self):
        while self.proc.poll() is None and not self._sampling.is_set():
            sample = procfs.sample_tree(self.proc.pid)
            self.peak_rss = max(self.peak_rss, sample["rss_bytes"])
            self._sampling.wait(0.25)

    def wait_log(self, pattern, timeout):
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._log_lock:
            while not any(regex.search(line) for line in self.log_tail):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.proc.poll() is not None:
                    raise RuntimeError("%s: no log line %r (exit %s); last lines:\n%s" % (
                        self.subject.label, pattern, self.proc.poll(), "\n".join(list(self.log_tail)[-20:])))
                self._log_seen.wait(min(remaining, 0.5))

    def stop(self):
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait(5)
        self._sampling.set()
        self.cloud.stop()
        self.printer.stop()
        return code

    # ---- readings ----
    def reading(self):
        with self._log_lock:
            log_bytes = self.log_bytes
        with self.cloud._lock:
            per_endpoint = {k: list(v) for k, v in self.endpoint_bytes.items()}
        return {"time": time.monotonic(), "stats": self.cloud.stats(), "per_endpoint": per_endpoint,
                "tree": procfs.sample_tree(self.proc.pid), "files": procfs.files_state(self.state_dir),
                "log_bytes": log_bytes}

    def wait_steady(self, timeout=90.0):
        """Paired, running, and every loop has reached the cloud once."""
        self.wait_log(r'msg="Connector running"', timeout)

        def every_loop():
            seen = self.cloud.stats()["by_endpoint"]
            return all(seen.get(name) for name in ("heartbeat", "commands", "snapshots", "webcam_requests"))
        self.cloud.wait_for(every_loop, timeout=timeout, message="a first request from every loop")

    def state_latency(self, state):
        """Seconds from set_state to a snapshot with that state in the cloud (None: not within 15 s)."""
        with self.cloud._lock:
            seen = len(self.cloud.snapshots)
        started = time.time()
        if state in ("printing", "paused") and self.printer.state in ("standby", "complete", "cancelled", "error"):
            self.printer.set_state(state, filename="bench.gcode")
        else:
            self.printer.set_state(state)

        def arrived():
            for snap in self.cloud.snapshots[seen:]:
                payload = snap.get("payload") or {}
                stats = (payload.get("status") or {}).get("print_stats") or {}
                if stats.get("state") == state:
                    return snap
            return None
        try:
            snap = self.cloud.wait_for(arrived, timeout=15.0)
        except AssertionError:
            return None
        return snap["received_at"] - started


    def command_latency(self, action="sync_files", path="/server/files/list"):
        """Seconds from the cloud queuing a command to Moonraker receiving its
        call (one that reaches Moonraker whatever the printer does: a print
        control on an idle printer fails before calling it)."""
        with self.printer._lock:
            seen = len(self.printer._requests)
        queued = time.time()
        self.cloud.enqueue_command(self.cloud.connectors[0]["id"], self.cloud.connectors[0]["printers"][0]["id"],
                                   action)

        def arrived():
            return next((r["time"] for r in self.printer.requests[seen:] if r["path"].startswith(path)), None)
        try:
            return self.printer.wait_for(arrived, timeout=20.0) - queued
        except AssertionError:
            return None

    def estop_during_backup(self):
        """Seconds from queuing emergency_stop to Moonraker receiving it while a backup upload is held."""
        storage = ThreadingHTTPServer(("127.0.0.1", 0), HeldUpload)
        storage.daemon_threads = True
        storage.receiving, storage.release = threading.Event(), threading.Event()
        threading.Thread(target=storage.serve_forever, daemon=True).start()
        connector = self.cloud.connectors[0]
        printer_id = connector["printers"][0]["id"]
        try:
            url = "http://127.0.0.1:%d/bucket/bench.tar.gz?X-Amz-Signature=x" % storage.server_address[1]
            self.cloud.enqueue_command(connector["id"], printer_id, "create_backup", {
                "backup_id": "bench", "presigned_url": url, "include": {"config": True},
                "printer_data_root": self.printer_data})
            if not storage.receiving.wait(60):
                return None
            with self.printer._lock:
                seen = len(self.printer._requests)
            queued = time.time()
            self.cloud.enqueue_command(connector["id"], printer_id, "emergency_stop")

            def arrived():
                return next((r["time"] for r in self.printer.requests[seen:]
                             if r["path"].startswith("/printer/emergency_stop")), None)
            try:
                return self.printer.wait_for(arrived, timeout=20.0) - queued
            except AssertionError:
                return None
        finally:
            storage.release.set()
            storage.shutdown()
            storage.server_close()


class HeldUpload(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_PUT(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.receiving.set()
        self.server.release.wait(600)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def rates(first, last):
    """Per-hour figures between two readings."""
    hours = (last["time"] - first["time"]) / 3600.0
    a, b = first["stats"], last["stats"]
    by_endpoint = {name: (b["by_endpoint"].get(name, 0) - a["by_endpoint"].get(name, 0)) / hours
                   for name in sorted(set(a["by_endpoint"]) | set(b["by_endpoint"]))}
    writes = ((last["tree"]["write_bytes"] - last["tree"]["cancelled_write_bytes"])
              - (first["tree"]["write_bytes"] - first["tree"]["cancelled_write_bytes"]))
    bytes_per_request = {}
    for name, (count, sent, received) in last["per_endpoint"].items():
        before = first["per_endpoint"].get(name, [0, 0, 0])
        if count > before[0]:
            n = count - before[0]
            bytes_per_request[name] = {"to_cloud": round((sent - before[1]) / n, 1),
                                       "from_cloud": round((received - before[2]) / n, 1)}
    nominal = sum(NOMINAL_PER_HOUR[name] * (per["to_cloud"] + per["from_cloud"])
                  for name, per in bytes_per_request.items() if name in NOMINAL_PER_HOUR)
    return {
        "seconds": last["time"] - first["time"],
        "wire_bytes_per_request_by_endpoint": bytes_per_request,
        "wire_bytes_per_hour_nominal": nominal if set(NOMINAL_PER_HOUR) <= set(bytes_per_request) else None,
        "wire_bytes_per_hour": (b["bytes_in"] + b["bytes_out"] - a["bytes_in"] - a["bytes_out"]) / hours,
        "wire_bytes_to_cloud_per_hour": (b["bytes_in"] - a["bytes_in"]) / hours,
        "wire_bytes_from_cloud_per_hour": (b["bytes_out"] - a["bytes_out"]) / hours,
        "requests_per_hour": (b["requests"] - a["requests"]) / hours,
        "requests_per_hour_by_endpoint": {k: v for k, v in by_endpoint.items() if v},
        "cpu_seconds_per_hour": (last["tree"]["cpu_seconds_precise"] - first["tree"]["cpu_seconds_precise"]) / hours,
        "cpu_seconds_per_hour_ticks": (last["tree"]["cpu_seconds"] - first["tree"]["cpu_seconds"]) / hours,
        "disk_write_bytes_per_hour": max(0, writes) / hours,
        "log_bytes_per_hour": (last["log_bytes"] - first["log_bytes"]) / hours,
    }


def measure_run(subject, workdir, duration, warmup, latency_samples, window=60.0):
    """One run: steady-state window, then state-change latencies. Returns a dict."""
    rig = Rig(subject, workdir).start()
    try:
        rig.wait_steady()
        time.sleep(warmup)  # let start-up allocations and the first pushes settle
        readings = [rig.reading()]
        end = readings[0]["time"] + duration
        while time.monotonic() < end - 0.5:
            time.sleep(max(0.0, min(window, end - time.monotonic())))
            readings.append(rig.reading())
        result = rates(readings[0], readings[-1])
        windows = [rates(a, b) for a, b in zip(readings, readings[1:]) if b["time"] - a["time"] >= window * 0.9]
        result["cpu_seconds_per_hour_windows"] = [round(w["cpu_seconds_per_hour"], 3) for w in windows]
        if windows:
            result["cpu_seconds_per_hour_median_window"] = statistics.median(
                w["cpu_seconds_per_hour"] for w in windows)
        result["state_dir_changes"] = procfs.files_changed(readings[0]["files"], readings[-1]["files"])
        result["rss_bytes_steady"] = readings[-1]["tree"]["rss_bytes"]
        result["hwm_bytes_sum"] = readings[-1]["tree"]["hwm_bytes"]
        result["processes"] = readings[-1]["tree"]["processes"]
        latencies = []
        cycle = ["printing", "paused", "printing", "cancelled", "standby"]
        for index in range(latency_samples):
            time.sleep(1.0 + 0.37 * (index % 3))  # off the loops' beat
            latencies.append(rig.state_latency(cycle[index % len(cycle)]))
        found = [v for v in latencies if v is not None]
        result["state_latencies_seconds"] = [None if v is None else round(v, 4) for v in latencies]
        result["state_latency_seconds"] = statistics.median(found) if found else None
        rig.printer.set_state("standby")
        commands = []
        for index in range(latency_samples):
            # Each one from the idle pace, when the subject relaxes: past its quiet time.
            time.sleep(subject.config.get("idle_after_seconds", 0.5) + 1.0 + 0.37 * (index % 3))
            commands.append(rig.command_latency())
        found = [v for v in commands if v is not None]
        result["command_latencies_seconds"] = [None if v is None else round(v, 4) for v in commands]
        result["command_latency_seconds"] = statistics.median(found) if found else None
        result["estop_during_backup_seconds"] = rig.estop_during_backup()
        result["peak_rss_bytes"] = rig.peak_rss
    finally:
        result_code = rig.stop()
    result["peak_rss_bytes"] = rig.peak_rss
    result["exit_code"] = result_code
    return result


UPLOAD_INTERVALS = {"poll_commands_seconds": 0.5}


def measure_upload(subject, workdir, megabytes, form):
    """One upload_file of a generated file through `form` ("content" or
    "url") in a fresh connector: peak RSS of its tree (procfs.transfer_peak_bytes)
    and seconds from queueing to the completion."""
    from sim.cloud import Base64File
    rig = Rig(subject, workdir, intervals=UPLOAD_INTERVALS).start()
    try:
        rig.wait_steady()
        path = os.path.join(workdir, "upload.gcode")
        line = b"G1 X10.000 Y20.000 E0.04000 F1800\n"
        with open(path, "wb") as handle:
            block = line * (1024 * 1024 // len(line))
            for _ in range(int(megabytes * MB) // len(block)):
                handle.write(block)
        size = os.path.getsize(path)
        idle = procfs.transfer_peak_bytes(rig.proc.pid)
        with open(rig.config_path) as handle:
            saved = json.load(handle)
        params = {"filename": "bench-%s.gcode" % form}
        params.update({"content": Base64File(path)} if form == "content" else {"url": rig.cloud.add_download(path)})
        started = time.monotonic()
        command_id = rig.cloud.enqueue_command(saved["connector_id"], saved["moonraker"][0]["printer_id"],
                                               "upload_file", params=params)
        done = rig.cloud.wait_for(lambda: rig.cloud.completions_for(command_id), 600)[-1]["body"]
        seconds = time.monotonic() - started
        peak = procfs.transfer_peak_bytes(rig.proc.pid)
        if done["status"] != "succeeded":
            raise RuntimeError("upload by %s failed: %s" % (form, done.get("error_message")))
        return {"upload_%s_peak_rss_bytes" % form: peak, "upload_%s_idle_peak_rss_bytes" % form: idle,
                "upload_%s_above_idle_bytes" % form: peak - idle,
                "upload_%s_seconds" % form: seconds, "upload_%s_bytes" % form: size,
                "upload_%s_mb_per_second" % form: size / MB / seconds}
    finally:
        rig.stop()


def measure_uploads(subject, out_dir, megabytes):
    found = {}
    for form in ("content", "url"):
        log("%s: %.0f MB upload as %s" % (subject.label, megabytes, form))
        found.update(measure_upload(subject, os.path.join(out_dir, "%s-upload-%s" % (subject.key, form)),
                                    megabytes, form))
    return found


def version_startup(subject, runs):
    times, output = [], None
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run(subject.command + ["--version"], capture_output=True, text=True, timeout=60)
        times.append(time.perf_counter() - started)
        output = done.stdout.strip() if done.returncode == 0 else "exit %d: %s" % (done.returncode, done.stderr[-200:])
    return {"version_startup_seconds": statistics.median(times), "version_startup_first_seconds": times[0],
            "version_startup_runs": [round(t, 4) for t in times], "version_output": output}


def median_of_runs(runs):
    """Median of every numeric field over repeated runs (the first run's other fields)."""
    merged = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
            merged[key] = statistics.median(values)
        elif key == "requests_per_hour_by_endpoint":
            names = set().union(*(r[key] for r in runs))
            merged[key] = {n: statistics.median(r[key].get(n, 0) for r in runs) for n in sorted(names)}
    merged["runs"] = len(runs)
    return merged


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

def format_table(results, markdown=False):
    keys = [k for k in results if "error" not in results[k]]
    header = ["measure", "target"] + ["%s | ratio" % results[k]["label"] if markdown else results[k]["label"]
                                      for k in keys]
    rows = []
    for key, label, target, target_text, show in TARGETS:
        row = [label, target_text]
        for subject in keys:
            value = results[subject].get(key)
            if value is None:
                row.append("n/a")
                continue
            text = show(value)
            if target:
                text += " (%.2fx)" % (value / target)
            elif target == 0:
                text += " (%s)" % ("met" if value == 0 else "over")
            row.append(text)
        rows.append(row)
    for endpoint in CLOUD_ENDPOINTS:
        values = [results[k].get("requests_per_hour_by_endpoint", {}).get(endpoint) for k in keys]
        if any(values):
            per = [results[k].get("wire_bytes_per_request_by_endpoint", {}).get(endpoint) for k in keys]
            rows.append(["  %s requests/h (bytes up+down each)" % endpoint, ""] + [
                "%.0f (%s)" % (v or 0, "%.0f+%.0f" % (p["to_cloud"], p["from_cloud"]) if p else "-")
                for v, p in zip(values, per)])
    if markdown:
        header = ["measure", "target"] + [results[k]["label"] for k in keys]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    else:
        widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths))]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    skipped = ["%s: %s" % (results[k]["label"], results[k]["error"]) for k in results if "error" in results[k]]
    if skipped:
        lines.append("")
        lines += [("- " if markdown else "") + s for s in skipped]
    return "\n".join(lines)


def write_doc(path, markdown, meta):
    """Replaces the text between the bench markers of `path` with the table."""
    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    with open(path) as handle:
        text = handle.read()
    if begin not in text or end not in text:
        raise SystemExit("%s has no %s ... %s markers" % (path, begin, end))
    block = "%s\n%s\n\n%s\n%s" % (begin, meta, markdown, end)
    text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    with open(path, "w") as handle:
        handle.write(text)


# --------------------------------------------------------------------------
# Modes
# --------------------------------------------------------------------------

def run_bench(args, subjects, out_dir):
    results, threads = {}, []

    def one(subject):
        entry = {"label": subject.label, "command": subject.command,
                 "artifact": os.path.relpath(subject.artifact, ROOT)}
        results[subject.key] = entry
        why = subject.missing()
        if why:
            entry["error"] = why
            return
        try:
            entry["size_bytes"] = os.path.getsize(subject.artifact)
            runs = []
            for number in range(0 if args.uploads_only else args.runs):
                workdir = os.path.join(out_dir, "%s-run%d" % (subject.key, number + 1))
                log("%s: run %d of %d (%d s window)" % (subject.label, number + 1, args.runs, args.duration))
                runs.append(measure_run(subject, workdir, args.duration, args.warmup, args.latency_samples))
            if runs:
                entry.update(median_of_runs(runs))
                entry["per_run"] = runs
            if args.upload_mb > 0:
                entry.update(measure_uploads(subject, out_dir, args.upload_mb))
        except Exception as exc:  # one broken artifact must not hide the others
            entry["error"] = "failed: %s" % exc
            log(entry["error"])

    for subject in subjects:
        thread = threading.Thread(target=one, args=(subject,))
        thread.start()
        threads.append(thread)
        if args.sequential:
            thread.join()
    for thread in threads:
        thread.join()
    # Start-up is timed with nothing else of ours running.
    for subject in subjects:
        if "error" not in results[subject.key]:
            log("%s: --version start-up x%d" % (subject.label, args.version_runs))
            results[subject.key].update(version_startup(subject, args.version_runs))
    return results


def import_costs(python):
    """RSS of a bare interpreter and after the connector's imports (where the RSS goes)."""
    network = ["json", "ssl", "socket", "http.client"]
    sets = [("bare", []), ("json+ssl+socket+http.client", network),
            ("+websocket", network + ["websocket"]), ("+websocket+click", network + ["websocket", "click"]),
            ("import connector", ["connector"]),
            ("requests (not imported in the steady state)", ["requests"])]
    found = {}
    for name, modules in sets:
        value = procfs.rss_after_imports(python, modules, env=dict(os.environ, PYTHONPATH=ROOT))
        if value is not None:
            found[name] = value
    return found


def _fast_intervals(speedup):
    return {"poll_commands_seconds": 3.0 / speedup, "heartbeat_seconds": 10.0 / speedup,
            "push_snapshots_seconds": 30.0 / speedup, "poll_webcam_seconds": 2.0 / speedup}


def run_profile(args, subject, out_dir):
    """connector.py under cProfile in every thread (and py-spy, if given), intervals / --speedup.

    The traffic is the default mix, only faster, so that a run of a few minutes
    holds enough calls (or samples) to show where the CPU of an hour goes.
    """
    intervals = _fast_intervals(args.speedup)
    prof_path = os.path.join(out_dir, "connector.prof")
    command = [subject.python, os.path.join(HERE, "profile_connector.py"), prof_path, subject.artifact]
    rig = Rig(subject, os.path.join(out_dir, "cprofile"), intervals, command=command).start()
    try:
        rig.wait_steady()
        first = rig.reading()
        time.sleep(args.duration)
        figures = {"cprofile": rates(first, rig.reading())}
    finally:
        rig.stop()
    log("cProfile run: %.1f requests/h, %.2f CPU s/h (profiler overhead included)" % (
        figures["cprofile"]["requests_per_hour"], figures["cprofile"]["cpu_seconds_per_hour"]))
    text_path = os.path.join(out_dir, "connector-profile.txt")
    with open(text_path, "w") as handle:
        stats = pstats.Stats(prof_path, stream=handle)
        stats.sort_stats("tottime").print_stats(60)
        stats.sort_stats("cumulative").print_stats(60)
    stats = pstats.Stats(prof_path, stream=sys.stdout)
    print("\ncProfile, all threads, %.0f s at intervals / %g:" % (args.duration, args.speedup))
    stats.sort_stats("tottime").print_stats(30)
    print("Full listing: %s" % os.path.relpath(text_path, ROOT))
    if args.py_spy:
        figures["py_spy"] = run_py_spy(args, subject, out_dir, intervals)
    return figures


def run_py_spy(args, subject, out_dir, intervals):
    """Samples the plain connector.py (no cProfile overhead) with py-spy; prints self and total shares."""
    raw_path = os.path.join(out_dir, "py-spy.txt")
    rig = Rig(subject, os.path.join(out_dir, "py-spy"), intervals).start()
    try:
        rig.wait_steady()
        first = rig.reading()
        spy = subprocess.run([args.py_spy, "record", "--pid", str(rig.proc.pid), "--duration", str(int(args.duration)),
                              "--rate", "250", "--format", "raw", "--output", raw_path, "--nonblocking"],
                             capture_output=True, text=True)
        figures = rates(first, rig.reading())
    finally:
        rig.stop()
    if spy.returncode != 0 or not os.path.exists(raw_path):
        log("py-spy failed: %s" % spy.stderr[-500:])
        return figures
    own, total, samples = collections.Counter(), collections.Counter(), 0
    with open(raw_path) as handle:
        for line in handle:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = stack.split(";")
            samples += int(count)
            own[frames[-1]] += int(count)
            for frame in set(frames):
                total[frame] += int(count)
    print("\npy-spy, plain connector.py, %d samples of busy threads (%.2f CPU s/h at this speed):" % (
        samples, figures["cpu_seconds_per_hour"]))
    print("  own time:")
    for frame, count in own.most_common(20):
        print("  %5.1f%%  %s" % (100.0 * count / samples, frame))
    print("  including callees:")
    for frame, count in total.most_common(30):
        print("  %5.1f%%  %s" % (100.0 * count / samples, frame))
    figures["py_spy_samples"] = samples
    figures["py_spy_top_own"] = [(f, c) for f, c in own.most_common(40)]
    figures["py_spy_top_total"] = [(f, c) for f, c in total.most_common(60)]
    return figures


def run_soak(args, subject, out_dir):
    """--soak-interval (1 s) for every loop for --soak-minutes; RSS at the start and at the end."""
    step = args.soak_interval
    intervals = {"poll_commands_seconds": step, "heartbeat_seconds": step, "push_snapshots_seconds": step,
                 "poll_webcam_seconds": step}
    rig = Rig(subject, os.path.join(out_dir, "soak-%s" % subject.key), intervals).start()
    series = []
    try:
        rig.wait_steady()
        time.sleep(args.warmup)
        first = rig.reading()
        start = time.monotonic()
        end = start + args.soak_minutes * 60.0
        tick = 0
        connector_id = json.load(open(rig.config_path))["connector_id"]
        printer_id = json.load(open(rig.config_path))["moonraker"][0]["printer_id"]
        states = ["printing", "paused", "printing", "cancelled", "standby"]
        while time.monotonic() < end:
            time.sleep(min(10.0, max(0.0, end - time.monotonic())))
            tick += 1
            # Some work besides idle polling: webcam requests, commands, state changes.
            if tick % 3 == 0:
                rig.cloud.enqueue_webcam_request(connector_id, printer_id)
            if tick % 6 == 0:
                rig.cloud.enqueue_command(connector_id, printer_id, "sync_files")
                state = states[(tick // 6) % len(states)]
                if state == "printing" and rig.printer.state in ("standby", "cancelled"):
                    rig.printer.set_state(state, filename="soak.gcode")
                else:
                    rig.printer.set_state(state)
            sample = procfs.sample_tree(rig.proc.pid)
            series.append((round(time.monotonic() - start, 1), sample["rss_bytes"]))
            if tick % 30 == 0:
                log("soak %s: %.0f s, RSS %.2f MiB" % (subject.label, series[-1][0], sample["rss_bytes"] / MIB))
        last = rig.reading()
    finally:
        code = rig.stop()
    figures = rates(first, last)
    counts = {k: last["stats"]["by_endpoint"].get(k, 0) - first["stats"]["by_endpoint"].get(k, 0)
              for k in last["stats"]["by_endpoint"]}
    default_per_hour = {"heartbeat": 360, "commands": 1200, "snapshots": 120, "webcam_requests": 1800}
    result = {
        "label": subject.label, "minutes": args.soak_minutes, "exit_code": code,
        "rss_start_bytes": first["tree"]["rss_bytes"], "rss_end_bytes": last["tree"]["rss_bytes"],
        "rss_growth_bytes": last["tree"]["rss_bytes"] - first["tree"]["rss_bytes"],
        "rss_max_bytes": max([r for _, r in series] + [first["tree"]["rss_bytes"]]),
        "requests": counts,
        "default_traffic_hours_equivalent": {k: round(counts.get(k, 0) / v, 1) for k, v in default_per_hour.items()},
        "cpu_seconds_per_hour": figures["cpu_seconds_per_hour"],
        "rss_series": series,
    }
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=180.0,
                        help="steady-state window per run, seconds (default 180)")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds after the first round (default 10)")
    parser.add_argument("--runs", type=int, default=1, help="repeated runs per subject; medians are reported")
    parser.add_argument("--latency-samples", type=int, default=7, help="state changes timed per run (default 7)")
    parser.add_argument("--version-runs", type=int, default=9, help="--version start-ups timed (default 9)")
    parser.add_argument("--targets", default="py,binary,pyz,nocam,oldcloud",
                        help="comma list of py, binary, pyz, nocam (connector.py with a printer without camera), "
                             "oldcloud (connector.py against today's cloud: no long-poll), lp30 (long-poll cloud "
                             "asking for 30 s heartbeats), mipsle (the K1 binary under qemu-mipsel-static)")
    parser.add_argument("--sequential", action="store_true", help="one subject at a time (default: side by side)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for connector.py")
    parser.add_argument("--connector", help="measure this copy of connector.py instead (a proposed change)")
    parser.add_argument("--write-doc", metavar="PATH", action="append", default=[],
                        help="put the table into PATH between the bench markers (repeatable)")
    parser.add_argument("--upload-mb", type=float, default=50.0,
                        help="size of the G-code upload measured each way, MB (0: none; default 50)")
    parser.add_argument("--uploads-only", action="store_true", help="measure only the uploads (no steady window)")
    parser.add_argument("--soak", action="store_true", help="1 s intervals for --soak-minutes; RSS start vs end")
    parser.add_argument("--soak-minutes", type=float, default=30.0, help="soak length (default 30)")
    parser.add_argument("--soak-interval", type=float, default=1.0,
                        help="every loop's interval in the soak (default 1 s)")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile connector.py (all threads) for --duration seconds at intervals / --speedup")
    parser.add_argument("--speedup", type=float, default=10.0, help="--profile: divide the intervals by this")
    parser.add_argument("--py-spy", metavar="PATH", help="--profile: also sample a plain run with this py-spy")
    args = parser.parse_args(argv)

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    mode = "soak" if args.soak else "profile" if args.profile else "bench"
    out_dir = os.path.join(RESULTS, "%s-%s-%d" % (mode, stamp, os.getpid()))
    os.makedirs(out_dir, exist_ok=True)
    subjects_by_key = all_subjects(args.python, args.connector and os.path.abspath(args.connector))
    wanted = [k.strip() for k in args.targets.split(",") if k.strip()]
    unknown = [k for k in wanted if k not in subjects_by_key]
    if unknown:
        parser.error("unknown target(s) %s; choose from %s" % (unknown, sorted(subjects_by_key)))
    subjects = [subjects_by_key[k] for k in wanted]
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "host": platform.node(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(), "bench_python": platform.python_version(), "args": vars(args)}

    if args.profile:
        subject = subjects_by_key["py"]
        report = {"meta": meta, "profile": run_profile(args, subject, out_dir)}
    elif args.soak:
        report = {"meta": meta, "soak": {}}

        def soak_one(subject):
            why = subject.missing()
            if why:
                report["soak"][subject.key] = {"label": subject.label, "error": why}
                return
            log("soak: %s for %.0f min at %g s intervals" % (subject.label, args.soak_minutes, args.soak_interval))
            try:
                report["soak"][subject.key] = run_soak(args, subject, out_dir)
            except Exception as exc:  # one broken artifact must not hide the others
                report["soak"][subject.key] = {"label": subject.label, "error": "failed: %s" % exc}
        threads = [threading.Thread(target=soak_one, args=(subject,)) for subject in subjects]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print("\nSoak, %g s intervals:" % args.soak_interval)
        for key, soak in report["soak"].items():
            if "error" in soak:
                print("  %s: %s" % (soak["label"], soak["error"]))
                continue
            print("  %s: %.0f min, RSS start %.2f MiB, end %.2f MiB, growth %+.3f MiB (target <= 1), max %.2f MiB; "
                  "equivalent hours of default traffic %s" % (
                      soak["label"], soak["minutes"], soak["rss_start_bytes"] / MIB, soak["rss_end_bytes"] / MIB,
                      soak["rss_growth_bytes"] / MIB, soak["rss_max_bytes"] / MIB,
                      soak["default_traffic_hours_equivalent"]))
    else:
        results = run_bench(args, subjects, out_dir)
        meta["loadavg_end"] = os.getloadavg()
        meta["import_rss_bytes"] = import_costs(args.python)
        if os.access(PYTHON38, os.X_OK):
            meta["import_rss_bytes_py38"] = import_costs(PYTHON38)
        report = {"meta": meta, "results": results}
        table = format_table(results)
        print("\nprinter-connector benchmark, default intervals, %.0f s window x %d run(s), loopback (%s), "
              "MALLOC_ARENA_MAX=%s as installed\n" % (args.duration, args.runs, meta["date"],
                                                    os.environ.get("MALLOC_ARENA_MAX", "2")))
        print(table)
        print("\nRSS right after imports (%s): %s" % (
            os.path.basename(args.python),
            ", ".join("%s %.1f MiB" % (k, v / MIB) for k, v in meta["import_rss_bytes"].items())))
        for key, entry in results.items():
            if len(entry.get("processes") or []) > 1:
                print("process tree of %s at the end of the window: %s" % (entry["label"], ", ".join(
                    "%s RSS %.1f MiB (peak %.1f)" % (p["name"], p["rss_bytes"] / MIB, p["hwm_bytes"] / MIB)
                    for p in entry["processes"])))
            if entry.get("state_dir_changes"):
                print("state_dir changes during the window (%s): %s" % (entry["label"], entry["state_dir_changes"]))
        markdown = format_table(results, markdown=True)
        with open(os.path.join(out_dir, "table.md"), "w") as handle:
            handle.write(markdown + "\n")
        for path in args.write_doc:
            write_doc(path, markdown, "Measured %s on %s (%d CPUs, load %.1f), %.0f s window x %d run(s), "
                      "in the installers' service environment (MALLOC_ARENA_MAX=%s)."
                      % (meta["date"], meta["machine"], meta["cpus"], meta["loadavg_start"][0], args.duration,
                         args.runs, os.environ.get("MALLOC_ARENA_MAX", "2")))
    json_path = os.path.join(out_dir, "%s.json" % mode)
    with open(json_path, "w") as handle:
        json.dump(report, handle, indent=2, default=str)
    shutil.copyfile(json_path, os.path.join(RESULTS, "latest-%s.json" % mode))
    print("\nJSON: %s" % os.path.relpath(json_path, ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
