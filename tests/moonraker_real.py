"""The real Moonraker (PyPI package `moonraker`, 0.11) as a test peer.

One instance per RealMoonraker: its own data folder (config, gcodes, logs,
database), a free port on 127.0.0.1, no Klipper. It is started with
`moonraker -d DATA -c CONF -n -v`: no log file, and verbose logging so that
every request it serves appears on its stdout (captured in DATA/../moonraker.log),
which lets tests check what did, or did not, reach it. FakeKlippy below
stands in for Klipper on Moonraker's Unix socket when a test needs Klippy
"ready".

Outgoing network: the config turns off everything that would leave the
machine. `[announcements] enable_moonlight: False` stops the RSS feed fetch
from github.io; the machine component fetches usb.ids from linux-usb.org
at start unless DATA/misc/usb.ids exists, so an empty one is created; the
machine provider is "none" (no D-Bus/systemd); update_manager, zeroconf and
the other optional components are simply not configured.
"""

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT = 20.0


def moonraker_bin():
    path = os.environ.get("MOONRAKER_BIN") or os.path.join(ROOT, ".venv-moonraker", "bin", "moonraker")
    if not os.access(path, os.X_OK):
        raise RuntimeError("the real Moonraker is not installed at %s: run `make .venv-moonraker/.stamp` "
                           "(or set MOONRAKER_BIN to its console script)" % path)
    return path


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RealMoonraker:
    """A Moonraker process; `.url` and `.ui_port` make it usable by unpaired_config()."""

    def __init__(self, base_dir, trusted=True, webcam_url=None, klippy_socket=None):
        self.base_dir = str(base_dir)
        self.data = os.path.join(self.base_dir, "printer_data")
        self.gcodes = os.path.join(self.data, "gcodes")
        self.config_dir = os.path.join(self.data, "config")
        self.conf_path = os.path.join(self.config_dir, "moonraker.conf")
        self.log_path = os.path.join(self.base_dir, "moonraker.log")
        self.trusted = trusted
        self.webcam_url = webcam_url
        # A socket nobody serves (Klipper stays "disconnected") unless a FakeKlippy listens there.
        self.klippy_socket = klippy_socket or os.path.join(self.data, "comms", "klippy.sock")
        self.port = None
        self.ui_port = 80
        self.proc = None
        self.sock_dir = None
        self.started_in = None

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def _write_config(self):
        for folder in ("config", "gcodes", "logs", "misc", "comms"):
            os.makedirs(os.path.join(self.data, folder), exist_ok=True)
        open(os.path.join(self.data, "misc", "usb.ids"), "w").close()  # no fetch from linux-usb.org
        lines = [
            "[server]", "host: 127.0.0.1", "port: %d" % self.port,
            "klippy_uds_address: %s" % self.klippy_socket,
            "", "[authorization]",
        ]
        if self.trusted:
            lines += ["trusted_clients:", "    127.0.0.0/8"]
        lines += ["", "[machine]", "provider: none", "validate_service: False", "validate_config: False",
                  "", "[announcements]", "enable_moonlight: False", ""]
        if self.webcam_url:
            lines += ["[webcam cam]", "service: mjpegstreamer", "snapshot_url: %s" % self.webcam_url,
                      "stream_url: %s" % self.webcam_url, ""]
        with open(self.conf_path, "w") as handle:
            handle.write("\n".join(lines))

    def start(self):
        """Starts on a free port; a restart keeps the port (and the data folder)."""
        if self.port is None:
            self.port = free_port()
        self._write_config()
        log = open(self.log_path, "ab")
        started = time.monotonic()
        # Moonraker stages uploads in $TMPDIR/moonraker.upload-<whole seconds of the
        # monotonic clock>.mru: two instances uploading within the same second
        # (parallel test runs) would take each other's file. A TMPDIR of its own.
        tmpdir = os.path.join(self.base_dir, "tmp")
        os.makedirs(tmpdir, exist_ok=True)
        # Its own Unix socket (for local agents) goes to a short path: the
        # default, DATA/comms/moonraker.sock, can pass the 108-byte limit
        # under a deep pytest tmp folder.
        self.sock_dir = tempfile.mkdtemp(prefix="mr")
        self.proc = subprocess.Popen([moonraker_bin(), "-d", self.data, "-c", self.conf_path, "-n", "-v",
                                      "-u", os.path.join(self.sock_dir, "moonraker.sock")],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=dict(os.environ, TMPDIR=tmpdir))
        log.close()
        try:
            self._wait_ready(started)
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - started
        return self

    def _wait_ready(self, started):
        """Until /server/info answers (401 counts: the server is up, it only wants a key)."""
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("moonraker exited (%s) during start-up:\n%s"
                                   % (self.proc.returncode, self.log[-3000:]))
            try:
                response = requests.get(self.url + "/server/info", timeout=1.0)
                if response.status_code in (200, 401):
                    return
            except requests.exceptions.ConnectionError:
                pass
            if time.monotonic() - started > START_TIMEOUT:
                raise RuntimeError("moonraker did not answer /server/info within %.0fs:\n%s"
                                   % (START_TIMEOUT, self.log[-3000:]))
            time.sleep(0.05)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.sock_dir:
            shutil.rmtree(self.sock_dir, ignore_errors=True)
            self.sock_dir = None

    @property
    def log(self):
        try:
            with open(self.log_path, "rb") as handle:
                return handle.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def api_key(self):
        """Moonraker 0.11 keeps its API key as the password of the user
        "_API_KEY_USER_" in the authorized_users table of its SQLite database
        (created on first start); a trusted client may also GET /access/api_key."""
        path = os.path.join(self.data, "database", "moonraker-sql.db")
        db = sqlite3.connect("file:%s?mode=ro" % path, uri=True, timeout=5.0)
        try:
            row = db.execute("SELECT password FROM authorized_users WHERE username = ?",
                             ("_API_KEY_USER_",)).fetchone()
        finally:
            db.close()
        if not row or not row[0]:
            raise RuntimeError("no API key in %s" % path)
        return row[0]

    def headers(self):
        return {} if self.trusted else {"X-Api-Key": self.api_key()}

    def request(self, method, path, **kwargs):
        """A call of the test's own (not the connector's); returns Moonraker's `result`."""
        response = requests.request(method, self.url + path, headers=self.headers(), timeout=5.0, **kwargs)
        response.raise_for_status()
        return response.json()["result"]

    def get(self, path, **kwargs):
        return self.request("GET", path, **kwargs)

    def gcode_files(self):
        """Every file under DATA/gcodes, as relative paths."""
        found = set()
        for folder, _, files in os.walk(self.gcodes):
            for name in files:
                found.add(os.path.relpath(os.path.join(folder, name), self.gcodes))
        return found


class ImageServer:
    """A tiny HTTP server on 127.0.0.1 that serves one JPEG, counting requests."""

    def __init__(self, image, path="/snapshot.jpg"):
        self.image, self.path = image, path
        self.hits = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path != outer.path:
                    self.send_error(404)
                    return
                with outer.lock:
                    outer.hits += 1
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(outer.image)))
                self.end_headers()
                self.wfile.write(outer.image)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                       name="image-server", daemon=True)

    @property
    def url(self):
        return "http://127.0.0.1:%d%s" % (self.server.server_address[1], self.path)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def requests_logged(moonraker, needle):
    """Lines of Moonraker's (verbose) access log that mention `needle`."""
    return [line for line in moonraker.log.splitlines() if "application.py:log_request()" in line and needle in line]


class FakeKlippy:
    """Just enough of Klipper's API server (its Unix socket) for Moonraker to
    report Klippy "ready": JSON messages ended by 0x03, the endpoints Moonraker
    calls at start-up, objects query/subscribe, gcode scripts and
    pause_resume. Status changes are pushed to Moonraker the way Klipper does
    it: a `process_status_update` call with the changed fields.

    print_stats.state follows the commands (SDCARD_PRINT_FILE of a file present
    in the gcodes folder starts a print, pause/resume/cancel), and
    set_print_state() stands for the printer itself (a print completing).
    Every gcode script received is kept in `scripts`.
    """

    ENDPOINTS = ["info", "emergency_stop", "register_remote_method", "list_endpoints", "objects/list",
                 "objects/query", "objects/subscribe", "gcode/script", "gcode/help", "gcode/subscribe_output",
                 "pause_resume/pause", "pause_resume/resume", "pause_resume/cancel"]

    def __init__(self, socket_path, gcodes):
        self.socket_path, self.gcodes = socket_path, gcodes
        self.lock = threading.Lock()
        self.scripts = []
        self.emergency_stops = []  # time.time() of each emergency_stop call
        self.output_templates = {}  # id(entry) -> gcode/subscribe_output's response_template
        self.connections = []  # (socket, send lock, subscribed)
        self.status = {
            "webhooks": {"state": "ready", "state_message": "Printer is ready"},
            "print_stats": {"state": "standby", "filename": "", "print_duration": 0.0, "total_duration": 0.0,
                            "filament_used": 0.0, "message": "", "info": {"total_layer": None, "current_layer": None}},
            "virtual_sdcard": {"progress": 0.0, "is_active": False, "file_position": 0, "file_path": None,
                               "file_size": 0},
            "pause_resume": {"is_paused": False},
            "display_status": {"progress": 0.0, "message": None},
            "toolhead": {"homed_axes": "", "position": [0.0, 0.0, 0.0, 0.0], "print_time": 0.0},
            "extruder": {"temperature": 21.5, "target": 0.0, "power": 0.0},
            "heater_bed": {"temperature": 21.0, "target": 0.0, "power": 0.0},
            "configfile": {"config": {}, "settings": {}},
        }
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.thread = threading.Thread(target=self._accept, name="fake-klippy", daemon=True)
        self.closed = False

    def start(self):
        if os.path.exists(self.socket_path):  # left by a stopped FakeKlippy (a "Klipper restart")
            os.unlink(self.socket_path)
        self.server.bind(self.socket_path)
        self.server.listen(4)
        self.thread.start()
        return self

    def stop(self):
        self.closed = True
        try:
            self.server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.server.close()
        with self.lock:
            for conn, _, _ in self.connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
        self.thread.join(5)

    def _accept(self):
        while not self.closed:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            entry = (conn, threading.Lock(), [])
            with self.lock:
                self.connections.append(entry)
            threading.Thread(target=self._serve, args=(entry,), name="fake-klippy-conn", daemon=True).start()

    def _serve(self, entry):
        conn = entry[0]
        buffer = b""
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            buffer += data
            while b"\x03" in buffer:
                raw, buffer = buffer.split(b"\x03", 1)
                request = json.loads(raw.decode("utf-8"))
                try:
                    reply = {"id": request.get("id"), "result": self._handle(entry, request)}
                except ValueError as exc:
                    reply = {"id": request.get("id"), "error": {"error": "WebRequestError", "message": str(exc)}}
                self._send(entry, reply)

    @staticmethod
    def _send(entry, message):
        conn, send_lock, _ = entry
        with send_lock:
            try:
                conn.sendall(json.dumps(message).encode("utf-8") + b"\x03")
            except OSError:
                pass

    def _select(self, objects):
        with self.lock:
            found = {}
            for name, fields in (objects or {}).items():
                if name in self.status:
                    value = json.loads(json.dumps(self.status[name]))
                    found[name] = value if fields is None else {k: v for k, v in value.items() if k in fields}
            return found

    def _handle(self, entry, request):
        method, params = request.get("method"), request.get("params") or {}
        if method == "info":
            return {"state": "ready", "state_message": "Printer is ready", "hostname": "fake-klippy",
                    "software_version": "v0.12.0-fake", "cpu_info": "test", "app": "Klipper",
                    "klipper_path": os.path.join(os.path.dirname(self.gcodes), "klipper"),
                    "python_path": "/usr/bin/python3", "log_file": "", "config_file": ""}
        if method == "list_endpoints":
            return {"endpoints": list(self.ENDPOINTS)}
        if method == "objects/list":
            return {"objects": sorted(self.status)}
        if method in ("objects/query", "objects/subscribe"):
            if method == "objects/subscribe":
                template = params.get("response_template")
                with self.lock:
                    entry[2][:] = [template] if template else []
            return {"eventtime": time.monotonic(), "status": self._select(params.get("objects"))}
        if method == "gcode/subscribe_output":
            with self.lock:
                self.output_templates[id(entry)] = (entry, params.get("response_template") or {})
            return {}
        if method == "emergency_stop":
            with self.lock:
                self.emergency_stops.append(time.time())
            return {}
        if method == "register_remote_method":
            return {}
        if method == "gcode/help":
            return {"G28": "Home"}
        if method == "gcode/script":
            return self._gcode(str(params.get("script", "")))
        if method == "pause_resume/pause":
            return self._transition(("printing",), "paused")
        if method == "pause_resume/resume":
            return self._transition(("paused",), "printing")
        if method == "pause_resume/cancel":
            return self._transition(("printing", "paused"), "cancelled")
        raise ValueError("Unknown endpoint %s" % method)

    def _gcode(self, script):
        with self.lock:
            self.scripts.append(script)
        words = script.split()
        if words and words[0].upper() == "SDCARD_PRINT_FILE":
            name = script.split("FILENAME=", 1)[-1].strip().strip('"')
            if self.print_state() in ("printing", "paused"):
                raise ValueError("SD busy")
            if not os.path.isfile(os.path.join(self.gcodes, name)):
                raise ValueError("Unable to open file")
            self.set_print_state("printing", filename=name)
        elif words and words[0].upper() == "G28":
            axes = "".join(w.lower() for w in words[1:]) or "xyz"
            self._update({"toolhead": {"homed_axes": "".join(a for a in "xyz" if a in axes)}})
        elif words and words[0].upper() == "RESPOND" and "MSG=" in script:
            self._respond("echo: " + script.split("MSG=", 1)[1].strip().strip('"'))
        return {}

    def _respond(self, text):
        """Console output, as Klipper sends it before the script's own answer."""
        with self.lock:
            templates = list(self.output_templates.values())
        for entry, template in templates:
            self._send(entry, dict(template, params={"response": text}))

    def _transition(self, allowed, new_state):
        if self.print_state() in allowed:
            self.set_print_state(new_state)
        return {}

    def print_state(self):
        with self.lock:
            return self.status["print_stats"]["state"]

    def set_print_state(self, state, filename=None):
        changes = {"print_stats": {"state": state}, "pause_resume": {"is_paused": state == "paused"},
                   "virtual_sdcard": {"is_active": state == "printing"}}
        if filename is not None:
            changes["print_stats"]["filename"] = filename
        self._update(changes)

    def _update(self, changes):
        with self.lock:
            for name, fields in changes.items():
                self.status[name].update(fields)
            targets = [(entry, entry[2][0]) for entry in self.connections if entry[2]]
        for entry, template in targets:
            self._send(entry, dict(template, params={"eventtime": time.monotonic(), "status": changes}))
