"""The real Moonraker (PyPI package `moonraker`, 0.11) as a test peer.

One instance per RealMoonraker: its own data folder (config, gcodes, logs,
database), a free port on 127.0.0.1, no Klipper. It is started with
`moonraker -d DATA -c CONF -n -v`: no log file, and verbose logging so that
every request it serves appears on its stdout (captured in DATA/../moonraker.log),
which lets tests check what did, or did not, reach it.

Outgoing network: the config turns off everything that would leave the
machine. `[announcements] enable_moonlight: False` stops the RSS feed fetch
from github.io; the machine component fetches usb.ids from linux-usb.org
at start unless DATA/misc/usb.ids exists, so an empty one is created; the
machine provider is "none" (no D-Bus/systemd); update_manager, zeroconf and
the other optional components are simply not configured.
"""

import os
import socket
import sqlite3
import subprocess
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

    def __init__(self, base_dir, trusted=True, webcam_url=None):
        self.base_dir = str(base_dir)
        self.data = os.path.join(self.base_dir, "printer_data")
        self.gcodes = os.path.join(self.data, "gcodes")
        self.config_dir = os.path.join(self.data, "config")
        self.conf_path = os.path.join(self.config_dir, "moonraker.conf")
        self.log_path = os.path.join(self.base_dir, "moonraker.log")
        self.trusted = trusted
        self.webcam_url = webcam_url
        self.port = None
        self.ui_port = 80
        self.proc = None
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
            # A socket nobody serves: Klipper stays "disconnected".
            "klippy_uds_address: %s" % os.path.join(self.data, "comms", "klippy.sock"),
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
        self.proc = subprocess.Popen([moonraker_bin(), "-d", self.data, "-c", self.conf_path, "-n", "-v"],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
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
                raise RuntimeError("moonraker exited (%s) during start-up:\n%s" % (self.proc.returncode, self.log[-3000:]))
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

