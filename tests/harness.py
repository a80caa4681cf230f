"""The test harness: a handle that runs the connector as a real process with
a config and state_dir of its own, and helpers to write configs for it.

CONNECTOR_CMD (a shell-quoted command, default "<python> connector.py") runs
the same tests against a built artifact (binary, zipapp, QEMU).
(A module of its own rather than conftest.py: sub-folders have conftests
too, and `from conftest import` would find theirs.)
"""

import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


_tokens = itertools.count(1)


def connector_cmd():
    custom = os.environ.get("CONNECTOR_CMD")
    if custom:
        return shlex.split(custom)
    return [sys.executable, os.path.join(ROOT, "connector.py")]


def wait_until(predicate, timeout=10.0, message="condition", interval=0.05):
    """For state that gives no notification (files, processes): polls briefly."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("%s not met within %.1fs" % (message, timeout))
        time.sleep(interval)


class Connector:
    """One connector process with its own config and state_dir."""

    def __init__(self, tmp_path, config, name="connector"):
        self.dir = tmp_path / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "config.json"
        self.log_path = self.dir / "stdout.log"
        self.state_dir = self.dir / "state"
        config.setdefault("state_dir", str(self.state_dir))
        self.write_config(config)
        self.proc = None
        self._log_offset = 0

    def write_config(self, config):
        self.config_path.write_text(json.dumps(config, indent=2))
        os.chmod(self.config_path, 0o600)

    @property
    def config(self):
        return json.loads(self.config_path.read_text())

    def start(self, *args, log_level="debug", env=None):
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        full_env = dict(os.environ, **(env or {}))
        full_env.pop("CLOUD_URL", None) if not (env and "CLOUD_URL" in env) else None
        self.proc = subprocess.Popen(
            connector_cmd() + ["--config", str(self.config_path), "--log-level", log_level] + list(args),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env,
            start_new_session=True)  # its own process group: kill() reaches a frozen binary's children
        log.close()
        return self

    def run(self, *args, timeout=60, log_level="debug", env=None):
        """Runs to completion (e.g. --once); returns the exit code."""
        self.start(*args, log_level=log_level, env=env)
        return self.proc.wait(timeout)

    @property
    def log(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def run_log(self):
        """The output of the latest start only."""
        return self.log[self._log_offset:]

    def wait_log(self, pattern, timeout=15.0, count=1):
        regex = re.compile(pattern)

        def found():
            if self.proc is not None and self.proc.poll() is not None and len(regex.findall(self.run_log)) < count:
                raise AssertionError("connector exited (%s) before logging %r:\n%s"
                                     % (self.proc.returncode, pattern, self.run_log[-3000:]))
            return len(regex.findall(self.run_log)) >= count
        try:
            wait_until(found, timeout, "log line %r" % pattern)
        except AssertionError as exc:
            raise AssertionError("%s\n--- connector log ---\n%s" % (exc, self.run_log[-3000:])) from None

    def stop(self, timeout=10.0):
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self):
        """SIGKILL to the whole process group, like a power cut (a onefile
        binary's launcher has the real process as a child)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    @property
    def connector_id(self):
        return self.config.get("connector_id")

    @property
    def printer_id(self):
        return self.config["moonraker"][0]["printer_id"]


def start_paired(connector):
    """Starts CONNECTOR (unpaired, with a pairing token) and waits until it
    has paired and runs."""
    connector.start()
    connector.wait_log("Pairing successful")
    connector.wait_log("Connector running")
    return connector


# -- what reached the reference cloud ----------------------------------------

def heartbeats_of(cloud, connector):
    """The bodies of CONNECTOR's heartbeats, oldest first."""
    return [h["body"] for h in cloud.heartbeats if h["connector_id"] == str(connector.connector_id)]


def snapshots_of(cloud, connector, since=0):
    """CONNECTOR's snapshots among the cloud's, from the cloud's SINCE-th on."""
    return [s for s in cloud.snapshots[since:] if s["connector_id"] == str(connector.connector_id)]


def completions(cloud, command_id):
    """The bodies of COMMAND_ID's completions so far (no wait)."""
    return [c["body"] for c in cloud.completions_for(command_id)]


def enqueue(cloud, connector, action, params=None, printer_id=None):
    """Queues a command for CONNECTOR's printer (or PRINTER_ID); returns its id."""
    return cloud.enqueue_command(connector.connector_id, connector.printer_id if printer_id is None else printer_id,
                                 action, params=params)


def completions_of(cloud, command_id, timeout=20, message=None):
    """Waits for the completions of COMMAND_ID and returns them all."""
    return cloud.wait_for(lambda: cloud.completions_for(command_id), timeout, message=message)


def completion(cloud, command_id, timeout=20):
    """The body of COMMAND_ID's latest completion, once there is one."""
    return completions_of(cloud, command_id, timeout)[-1]["body"]


def run_command(cloud, connector, action, params=None, printer_id=None, timeout=20):
    """Sends one command through the cloud; returns the completion body the cloud received."""
    command_id = enqueue(cloud, connector, action, params, printer_id)
    return completions_of(cloud, command_id, timeout, "completion of %s (%s)" % (command_id, action))[-1]["body"]


# -- a presigned-URL target ---------------------------------------------------

class _StorageHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_PUT(self):
        length = self.headers.get("Content-Length")
        if length is None:
            self.send_response(411)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self.rfile.read(int(length))
        self.server.uploads.append({"path": self.path, "headers": dict(self.headers), "body": body})
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


class Storage(ThreadingHTTPServer):
    """A presigned-URL target like S3 on loopback: refuses chunked uploads
    (411), keeps each upload ({"path", "headers", "body"}) in `uploads`."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _StorageHandler)
        self.uploads = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, path):
        return "http://127.0.0.1:%d%s" % (self.server_address[1], path)

    def stop(self):
        self.shutdown()
        self.server_close()


# Intervals short enough for quick tests, long enough not to load the machine.
FAST = {"poll_commands_seconds": 0.3, "heartbeat_seconds": 0.5, "heartbeat_held_seconds": 0.5,
        "push_snapshots_seconds": 2.0, "poll_webcam_seconds": 0.3, "poll_webcam_no_camera_seconds": 0.3}


def new_token(cloud, polling=None):
    token = "PAIR_test_%d_%d" % (os.getpid(), next(_tokens))
    cloud.add_pairing_token(token, polling=polling)
    return token


def unpaired_config(cloud, printer, **overrides):
    """A config to pair with; its owner lets transfer URLs reach loopback,
    where the tests' storage servers are (transfer_allow_hosts)."""
    config = {"cloud_url": cloud.url, "pairing_token": new_token(cloud), "site_name": "Test bench",
              "moonraker": [{"printer_id": 0, "name": "Sim", "base_url": printer.url, "ui_port": printer.ui_port}],
              "transfer_allow_hosts": ["127.0.0.1"]}
    config.update(FAST)
    config.update(overrides)
    return config


def start(make_connector, cloud, printer, **overrides):
    """A running connector of the test's own (make_connector), paired with CLOUD."""
    connector = make_connector(unpaired_config(cloud, printer, **overrides)).start()
    connector.wait_log("Connector running")
    return connector
