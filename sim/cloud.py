"""Reference cloud: the PrintDock API of docs/PROTOCOL.md section 1, on loopback.

Used in-process by the tests (``ReferenceCloud().start()``), by the demo and by
the benchmark, and out of process through its CLI plus a small HTTP control
surface under ``/_control``. It records everything it receives so tests can
assert on what arrived, and it can be told to misbehave (``set_fault``).
"""

import argparse
import base64
import datetime
import hashlib
import hmac
import json
import os
import re
import secrets
import select
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

if __package__:
    from .common import FaultTable, Recorder, recorded, serve_until_signalled
else:  # run as a script: python sim/cloud.py
    from common import FaultTable, Recorder, recorded, serve_until_signalled

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
HUGE_BODY_BYTES = 20 * 1024 * 1024
FAULT_ENDPOINTS = ("register", "heartbeat", "commands", "complete", "snapshots",
                   "webcam_requests", "webcam_upload")
FAULT_MODES = ("503", "500", "html", "object", "notjson", "nulls", "huge", "drop", "401",
               "lost", "deep", "bad_printer_id", "trickle")
# Faults that let the endpoint do its work (a register consumes its token)
# and then spoil the answer: "lost" drops the connection unanswered,
# "late:N" answers after N seconds, "deep" and "bad_printer_id" answer a
# body the connector cannot use (JSON 1000 levels deep; a printer id "²").
AFTER_WORK_FAULTS = ("lost", "deep", "bad_printer_id")
VERBOSE = os.environ.get("SIM_VERBOSE") == "1"
# Extensions (docs/PROTOCOL.md): the action each capability unlocks. A command
# whose action needs a capability its connector did not announce stays queued.
ACTION_CAPABILITIES = {"gcode": "gcode", "list_macros": "list_macros", "set_temperature": "set_temperature",
                       "emergency_stop": "emergency_stop"}
LONG_POLL_MAX_SECONDS = 25
# quiet_snapshots: how long this cloud accepts no snapshot for a status that
# did not change (X-Snapshot-Keepalive).
SNAPSHOT_KEEPALIVE_SECONDS = 300


DOWNLOAD_MODES = ("truncate", "redirect")  # and "trickle:BYTES_PER_SECOND"
DOWNLOAD_CHUNK = 256 * 1024


def utc_now_rfc3339():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------
# Byte counting around the socket streams (for .stats(): bytes on the wire)
# --------------------------------------------------------------------------

class _CountingReader:
    """Wraps the handler's rfile; counts every byte the handler consumes."""

    def __init__(self, raw):
        self._raw = raw
        self.count = 0

    def readline(self, *args):
        data = self._raw.readline(*args)
        self.count += len(data)
        return data

    def read(self, *args):
        data = self._raw.read(*args)
        self.count += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self._raw, name)


class _CountingWriter:
    """Wraps the handler's wfile; counts every byte written to the socket."""

    def __init__(self, raw):
        self._raw = raw
        self.count = 0

    def write(self, data):
        written = self._raw.write(data)
        self.count += len(data)
        return written

    def __getattr__(self, name):
        return getattr(self._raw, name)


# --------------------------------------------------------------------------
# Large files: base64 content read from disk as it is sent, presigned URLs
# --------------------------------------------------------------------------

class Base64File:
    """A command param whose value is the base64 of a file on disk, encoded
    while the commands answer is sent: the cloud can hold a command with a
    file of any size without having it in memory. escape_slashes writes "/"
    as "\\/", as PHP's json_encode does; encoded=True sends the file's bytes
    as they are (a file that holds base64 text already, or bad base64)."""

    def __init__(self, path, escape_slashes=False, encoded=False):
        self.path, self.escape_slashes, self.encoded = path, escape_slashes, encoded
        size = os.path.getsize(path)
        self.length = size if encoded else (size + 2) // 3 * 4
        if escape_slashes:
            self.length += sum(chunk.count(b"/") for chunk in self._chunks(False))

    def _chunks(self, escape):
        with open(self.path, "rb") as handle:
            while True:
                data = handle.read(3 * 256 * 1024)
                if not data:
                    return
                encoded = data if self.encoded else base64.b64encode(data)
                yield encoded.replace(b"/", b"\\/") if escape else encoded

    def chunks(self):
        return self._chunks(self.escape_slashes)

    def __repr__(self):
        return "<base64 of %s>" % os.path.basename(self.path)


def streamed_json(payload):
    """(length, chunks) of payload as JSON, each Base64File read from disk as
    the chunks are taken."""
    files = []

    def placeholder(value):
        if not isinstance(value, Base64File):
            raise TypeError("%r is not JSON serializable" % (value,))
        files.append(value)
        return "\x00b64:%d\x00" % (len(files) - 1)
    text = json.dumps(payload, default=placeholder).encode("utf-8")
    pieces = re.split(rb"\\u0000b64:(\d+)\\u0000", text)
    length = sum(len(p) for p in pieces[::2]) + sum(f.length for f in files)

    def chunks():
        for index, piece in enumerate(pieces):
            if index % 2 == 0:
                yield piece
            else:
                for chunk in files[int(piece)].chunks():
                    yield chunk
    return length, chunks()


class Downloads:
    """Files served at presigned-style URLs (an HMAC of path and expiry, as
    S3's are), for upload_file's `url` extension. A download can misbehave:
    "truncate" (declares the whole length, sends half, closes), "redirect"
    (302 to a good URL of the same file), "trickle:N" (N bytes a second)."""

    def __init__(self):
        self.key = os.urandom(16)
        self.files = {}  # name -> {"path", "mode", "hits"}
        self.lock = threading.Lock()

    def add(self, base_url, path, expires_in=300.0, mode=None, name=None):
        if mode is not None and mode not in DOWNLOAD_MODES and not mode.startswith("trickle:"):
            raise ValueError("unknown download mode %r" % mode)
        with self.lock:
            name = name or "f%d-%s" % (len(self.files) + 1, os.path.basename(path))
            self.files[name] = {"path": path, "mode": mode, "hits": 0}
        return self.url(base_url, name, expires_in)

    def url(self, base_url, name, expires_in):
        expires = int(time.time() + expires_in)
        return "%s/_downloads/%s?expires=%d&signature=%s" % (base_url, name, expires, self.sign(name, expires))

    def sign(self, name, expires):
        return hmac.new(self.key, ("%s\n%d" % (name, expires)).encode(), hashlib.sha256).hexdigest()

    def check(self, name, query):
        """The file entry, or (status, code, message) when the URL is not valid now (as S3 says it)."""
        try:
            expires = int(query.get("expires", ""))
        except ValueError:
            return None, (403, "AuthorizationQueryParametersError", "missing expiry")
        if not hmac.compare_digest(self.sign(name, expires), query.get("signature", "")):
            return None, (403, "SignatureDoesNotMatch", "The request signature does not match")
        if time.time() > expires:
            return None, (403, "AccessDenied", "Request has expired")
        with self.lock:
            entry = self.files.get(name)
            if entry is None:
                return None, (404, "NoSuchKey", "The specified key does not exist.")
            entry["hits"] += 1
            return dict(entry), None


# --------------------------------------------------------------------------
# Routing: (method, regex) -> (endpoint name, handler method name)
# --------------------------------------------------------------------------

ROUTES = [
    ("POST", r"/api/v1/connectors/register", "register", "_ep_register"),
    ("POST", r"/api/v1/connectors/(?P<cid>[^/]+)/heartbeat", "heartbeat", "_ep_heartbeat"),
    ("GET", r"/api/v1/connectors/(?P<cid>[^/]+)/commands", "commands", "_ep_commands"),
    ("POST", r"/api/v1/commands/(?P<cmd>[^/]+)/complete", "complete", "_ep_complete"),
    ("POST", r"/api/v1/snapshots/batch", "snapshots", "_ep_snapshots"),
    ("GET", r"/api/v1/connectors/(?P<cid>[^/]+)/webcam_requests", "webcam_requests",
     "_ep_webcam_requests"),
    ("PUT", r"/api/v1/webcam_requests/(?P<wid>[^/]+)/upload", "webcam_upload", "_ep_webcam_upload"),
    ("POST", r"/_control/pairing_tokens", "_control", "_ctl_pairing_token"),
    ("POST", r"/_control/commands", "_control", "_ctl_command"),
    ("POST", r"/_control/webcam_requests", "_control", "_ctl_webcam_request"),
    ("POST", r"/_control/faults", "_control", "_ctl_fault"),
    ("DELETE", r"/_control/faults", "_control", "_ctl_clear_faults"),
    ("GET", r"/_control/state", "_control", "_ctl_state"),
    ("GET", r"/_downloads/(?P<name>[^/]+)", "download", None),
]
_COMPILED_ROUTES = [(m, re.compile(p + r"\Z"), e, h) for m, p, e, h in ROUTES]
# Endpoints whose answer is a JSON array in normal operation.
LIST_ENDPOINTS = ("commands", "webcam_requests")


def match_route(method, path):
    """Returns (endpoint, handler name, path params) or (None, None, {})."""
    for route_method, regex, endpoint, handler in _COMPILED_ROUTES:
        found = regex.match(path)
        if found:
            if route_method != method:
                return endpoint, "_method_not_allowed", found.groupdict()
            return endpoint, handler, found.groupdict()
    return None, None, {}


class _Response(Exception):
    """Raised by endpoint code to answer immediately (errors)."""

    def __init__(self, status, body):
        super().__init__(status)
        self.status = status
        self.body = body


# --------------------------------------------------------------------------
# The HTTP handler: parsing, faults, auth, then the cloud's endpoint methods
# --------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "PrintDock/1.0"
    timeout = 120

    def version_string(self):
        return self.server_version

    # ---- plumbing ----
    def setup(self):
        super().setup()
        self.rfile = _CountingReader(self.rfile)
        self.wfile = _CountingWriter(self.wfile)
        self.server.cloud._track_connection(self.connection, True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.cloud._track_connection(self.connection, False)

    def handle_one_request(self):
        self._in_before, self._out_before = self.rfile.count, self.wfile.count
        self._endpoint, self._accounted = None, False
        try:
            super().handle_one_request()
        finally:
            self._account()

    def _account(self):
        """Adds this request's bytes both ways to the stats, once, as soon as it is answered."""
        if self._endpoint is not None and not self._accounted:
            self._accounted = True
            self.server.cloud._count_request(self._endpoint, self.rfile.count - self._in_before,
                                             self.wfile.count - self._out_before)

    def log_message(self, fmt, *args):
        if VERBOSE:
            sys.stderr.write("cloud: " + (fmt % args) + "\n")

    def do_GET(self):
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    # ---- request handling ----
    def _dispatch(self):
        cloud = self.server.cloud
        split = urlsplit(self.path)
        endpoint, handler_name, params = match_route(self.command, split.path)
        self._endpoint = endpoint or "unknown"
        if endpoint == "download" and handler_name is None:
            self._serve_download(params["name"], {k: v[-1] for k, v in parse_qs(split.query).items()})
            return
        try:
            body = self._read_body(endpoint)
        except _Response as early:
            cloud._record_request(self, endpoint, None, 0)
            self._send_json(early.status, early.body)
            self.close_connection = True
            return
        fault = cloud._take_fault(endpoint) if endpoint not in (None, "_control") else None
        cloud._record_request(self, endpoint, fault, len(body))
        after_work = fault is not None and (fault in AFTER_WORK_FAULTS or fault.startswith("late:"))
        if fault is not None and not after_work and self._apply_fault(fault, endpoint):
            return
        if handler_name is None:
            self._send_json(404, {"error": "Not found"})
            return
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        request = {"params": params, "query": query, "body": body, "headers": self.headers,
                   "gone": self._client_gone}
        headers = {}
        try:
            answer = getattr(cloud, handler_name)(request)
            status, payload = answer[0], answer[1]
            headers = answer[2] if len(answer) > 2 else {}
        except _Response as answer:
            status, payload = answer.status, answer.body
        except Exception as exc:  # a bug here must show as a 500, not a hang
            if VERBOSE:
                raise
            status, payload = 500, {"error": "Internal server error: %s" % exc}
        if after_work:
            self._spoil_answer(fault, status, payload)
            return
        self._send_json(status, payload, headers)

    def _spoil_answer(self, mode, status, payload):
        if mode.startswith("late:"):
            time.sleep(float(mode.split(":", 1)[1]))
        elif mode == "lost":
            self._apply_fault("drop", self._endpoint)
            return
        elif mode == "deep":
            self._send_bytes(200, b"[" * 1000 + b"]" * 1000, "application/json")
            return
        elif mode == "bad_printer_id" and isinstance(payload, dict):
            payload = dict(payload, printers=[dict(p, id="\u00b2") for p in payload.get("printers") or [{}]])
        self._send_json(status, payload)

    def _client_gone(self):
        """True once the client closed its end (a held poll whose connector stopped or died)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _read_body(self, endpoint):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked(endpoint)
        length = int(self.headers.get("Content-Length") or 0)
        if endpoint == "webcam_upload" and length > MAX_UPLOAD_BYTES:
            raise _Response(413, {"error": "Payload too large"})
        return self.rfile.read(length) if length > 0 else b""

    def _read_chunked(self, endpoint):
        limit = MAX_UPLOAD_BYTES if endpoint == "webcam_upload" else 64 * 1024 * 1024
        parts, total = [], 0
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            total += size
            if total > limit:
                raise _Response(413, {"error": "Payload too large"})
            parts.append(self.rfile.read(size))
            self.rfile.readline()

    def _trickle(self, body, interval=1.0):
        """A whole answer one byte a second: no read timeout ever trips."""
        answer = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                  % len(body)) + body
        self.close_connection = True
        for index in range(len(answer)):
            try:
                self.wfile.write(answer[index:index + 1])
                self.wfile.flush()
            except OSError:
                return  # the client gave up
            time.sleep(interval)

    def _send_bytes(self, status, body, content_type, headers=None):
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if status != 204:
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if status != 204 and self.command != "HEAD":
            self.wfile.write(body)
        self._account()

    def _send_json(self, status, payload, headers=None):
        if status == 204:
            self._send_bytes(status, b"", "application/json; charset=utf-8", headers)
            return
        length, chunks = streamed_json(payload)
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command != "HEAD":
            for chunk in chunks:
                self.wfile.write(chunk)
        self._account()

    # ---- presigned downloads ----
    def _serve_download(self, name, query):
        cloud = self.server.cloud
        entry, refused = cloud.downloads.check(name, query)
        cloud._record_request(self, "download", None, 0)
        if refused is not None:
            status, code, message = refused
            body = ("<Error><Code>%s</Code><Message>%s</Message></Error>" % (code, message)).encode()
            self._send_bytes(status, body, "application/xml")
            return
        mode = entry["mode"] or ""
        if mode == "redirect":
            self.send_response(302)
            self.send_header("Location", cloud.downloads.url(cloud.url, name, 300))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        size = os.path.getsize(entry["path"])
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        send = size // 2 if mode == "truncate" else size
        rate = float(mode.split(":", 1)[1]) if mode.startswith("trickle:") else None
        with open(entry["path"], "rb") as handle:
            while send > 0:
                chunk = handle.read(min(send, DOWNLOAD_CHUNK if rate is None else max(1, int(rate / 10))))
                if not chunk:
                    break
                try:
                    self.wfile.write(chunk)
                    self.wfile.flush()
                except OSError:
                    break
                send -= len(chunk)
                if rate is not None:
                    time.sleep(len(chunk) / rate)
        if mode == "truncate":
            self.close_connection = True

    # ---- faults ----
    def _apply_fault(self, mode, endpoint):
        """Answers according to the fault mode; returns False to go on normally."""
        if mode.startswith("slow:"):
            time.sleep(float(mode.split(":", 1)[1]))
            return False
        if mode == "trickle":
            self._trickle(b"[]")
            return True
        if mode == "drop":
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return True
        status, body, ctype = fault_response(mode, endpoint)
        self._send_bytes(status, body, ctype)
        return True


def capabilities_of(body):
    """The extension names a register or heartbeat body announces (strings only)."""
    names = body.get("capabilities") if isinstance(body, dict) else None
    return sorted({n for n in names if isinstance(n, str)}) if isinstance(names, list) else []


def capabilities_digest(names):
    """capabilities_ack (docs/PROTOCOL.md): the first 16 hex digits of the
    SHA-256 of the names, sorted, joined by commas."""
    return hashlib.sha256(",".join(sorted(names)).encode("utf-8")).hexdigest()[:16]


def fault_response(mode, endpoint):
    """(status, body bytes, content type) of a canned misbehaving answer."""
    as_json = "application/json; charset=utf-8"
    if mode == "503":
        return 503, b'{"error": "Service temporarily unavailable"}', as_json
    if mode == "500":
        return 500, b'{"error": "Internal server error"}', as_json
    if mode == "401":
        return 401, b'{"error": "Unauthorized"}', as_json
    if mode == "html":
        page = (b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head>"
                b"<body><h1>Bad Gateway</h1><p>The upstream is down for maintenance.</p></body></html>")
        return 200, page, "text/html; charset=utf-8"
    if mode == "object":
        return 200, b'{"data": [], "unexpected": "object"}', as_json
    if mode == "notjson":
        return 200, b"not json", as_json
    if mode == "nulls":
        return 200, json.dumps(NULLS_BODIES.get(endpoint)).encode(), as_json
    if mode == "huge":
        pad = b"x" * (HUGE_BODY_BYTES - 4)
        return 200, b'["' + pad + b'"]', as_json
    raise ValueError("unknown fault mode %r" % mode)


NULLS_BODIES = {
    "commands": [
        None,
        {"id": None, "printer_id": None, "action": None, "params": None},
        {"id": "cmd_bad_params", "printer_id": 1, "action": "start_print",
         "params": "benchy.gcode"},
        {"printer_id": 1, "action": "pause"},
        42,
        "cmd_string",
    ],
    "webcam_requests": [None, {"id": None, "printer_id": None, "created_at": None},
                        {"printer_id": 1}, 7, "req"],
}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        if VERBOSE:
            super().handle_error(request, client_address)


# --------------------------------------------------------------------------
# The cloud: state, control API, endpoint implementations
# --------------------------------------------------------------------------

class ReferenceCloud(Recorder):
    # What arrived, as copies (see Recorder.wait_for to wait for more).
    registrations = recorded("_registrations")
    requests = recorded("_requests")
    heartbeats = recorded("_heartbeats")
    snapshots = recorded("_snapshots")
    webcam_uploads = recorded("_webcam_uploads")
    fault_hits = recorded("_fault_hits")
    completions = recorded("_completions")

    @property
    def refused_batches(self):
        """How many snapshot batches refuse_snapshots() has refused."""
        with self._lock:
            return self._refused_batches

    def __init__(self, host="127.0.0.1", port=0, extensions=True, snapshot_keepalive=SNAPSHOT_KEEPALIVE_SECONDS):
        """extensions False: today's cloud, which knows none of the protocol
        extensions (no long-poll, capabilities ignored). snapshot_keepalive:
        the X-Snapshot-Keepalive it answers (quiet_snapshots; None: none)."""
        self.host = host
        self.port = port
        self.extensions = extensions
        self.snapshot_keepalive = snapshot_keepalive
        super().__init__()
        self._server = None
        self._thread = None
        self._connections = set()
        self._reset_state()

    def _reset_state(self):
        self._tokens = {}           # token -> {"polling": ..., "consumed": bool}
        self._connectors = {}       # id str -> {"id", "secret", "site_name", "device", "printers"}
        self._next_connector = 42
        self._next_printer = 1
        self._commands = {}         # str(id) -> command dict (insertion ordered)
        self._next_command = 1
        self._raw_commands = {}     # connector id str -> elements the next commands poll answers first, as they are
        self._webcam_requests = {}  # int id -> dict
        self._next_webcam = 1
        self._faults = FaultTable(self._lock, FAULT_MODES)
        self._refused_print_state = None
        self._refused_batches = 0
        self.downloads = Downloads()
        self._faults_set = 0
        self._registrations = []
        self._requests = []
        self._heartbeats = []
        self._completions = []
        self._snapshots = []
        self._webcam_uploads = []
        self._fault_hits = []
        self._stats = {"requests": 0, "bytes_in": 0, "bytes_out": 0, "by_endpoint": {},
                       "bytes_by_endpoint": {}}

    # ---- lifecycle ----
    @property
    def url(self):
        return "http://%s:%d" % (self.host, self.port)

    def start(self):
        self._server = _Server((self.host, self.port), _Handler)
        self._server.cloud = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1},
                                        name="reference-cloud", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            open_connections = list(self._connections)
        for conn in open_connections:  # keep-alive connections die with the server
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=5)
        self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _track_connection(self, conn, is_open):
        with self._lock:
            if is_open:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    # ---- recording helpers ----
    def _record_request(self, handler, endpoint, fault, body_len):
        with self._lock:
            self._requests.append({
                "method": handler.command, "path": handler.path, "endpoint": endpoint,
                "headers": dict(handler.headers.items()), "body_bytes": body_len,
                "fault": fault, "time": time.time()})
            if fault is not None:
                self._fault_hits.append({"endpoint": endpoint, "mode": fault, "time": time.time()})
            self._notify()

    def _count_request(self, endpoint, bytes_in, bytes_out):
        if endpoint == "_control":
            return
        with self._lock:
            stats = self._stats
            stats["requests"] += 1
            stats["bytes_in"] += bytes_in
            stats["bytes_out"] += bytes_out
            stats["by_endpoint"][endpoint] = stats["by_endpoint"].get(endpoint, 0) + 1
            wire = stats["bytes_by_endpoint"].setdefault(endpoint, {"in": 0, "out": 0})
            wire["in"] += bytes_in
            wire["out"] += bytes_out
            self._notify()

    def stats(self):
        with self._lock:
            return json.loads(json.dumps(self._stats))

    def summary(self):
        with self._lock:
            return ("cloud saw %d requests (%s), %d registrations, %d heartbeats, %d completions %s, "
                    "%d snapshots, %d webcam uploads, faults hit %d" % (
                        len(self._requests), self._stats["by_endpoint"], len(self._registrations),
                        len(self._heartbeats),
                        len(self._completions), [c["command_id"] for c in self._completions],
                        len(self._snapshots), len(self._webcam_uploads), len(self._fault_hits)))

    # ---- control API: pairing ----
    def add_pairing_token(self, token, polling=None, idempotent=True):
        """idempotent=False: a cloud that ignores the Idempotency-Key header."""
        with self._lock:
            self._tokens[token] = {"polling": polling, "consumed": False, "idempotent": idempotent,
                                   "answers": {}}

    def connector(self, connector_id):
        with self._lock:
            return dict(self._connectors[str(connector_id)])

    def forget_capabilities(self, connector_id):
        """A cloud that lost what the connector announced (a restored
        database): it holds none until the connector sends them again."""
        with self._lock:
            self._connectors[str(connector_id)]["capabilities"] = []

    @property
    def connectors(self):
        with self._lock:
            return [dict(c) for c in self._connectors.values()]

    # ---- control API: commands ----
    def enqueue_command(self, connector_id, printer_id, action, params=None, command_id=None):
        with self._lock:
            if command_id is None:
                command_id = "cmd_%d" % self._next_command
                self._next_command += 1
            self._commands[str(command_id)] = {
                "id": command_id, "connector_id": str(connector_id), "printer_id": printer_id,
                "action": action, "params": params if params is not None else {},
                "status": "queued", "deliveries": 0, "deleted": False}
            self._notify()
            return command_id

    def enqueue_raw_commands(self, connector_id, elements):
        """The next commands poll of this connector answers these JSON values
        first, exactly as given (any shape: a hostile or broken cloud), once."""
        with self._lock:
            self._raw_commands.setdefault(str(connector_id), []).extend(elements)
            self._notify()

    def redeliver(self, command_id):
        with self._lock:
            self._commands[str(command_id)]["status"] = "queued"
            self._notify()

    def delete_command(self, command_id):
        with self._lock:
            self._commands[str(command_id)]["deleted"] = True
            self._notify()

    def add_download(self, path, expires_in=300.0, mode=None):
        """A presigned-style URL (HMAC signature, expiry) that serves the file
        at path; mode: see Downloads."""
        return self.downloads.add(self.url, path, expires_in, mode)

    def download_hits(self, url):
        return self.downloads.files[urlsplit(url).path.rsplit("/", 1)[-1]]["hits"]

    def command(self, command_id):
        with self._lock:
            return dict(self._commands[str(command_id)])

    def completions_for(self, command_id):
        with self._lock:
            return [c for c in self._completions if c["command_id"] == str(command_id)]

    # ---- control API: webcam ----
    def enqueue_webcam_request(self, connector_id, printer_id, created_at=None):
        with self._lock:
            request_id = self._next_webcam
            self._next_webcam += 1
            self._webcam_requests[request_id] = {
                "id": request_id, "connector_id": str(connector_id), "printer_id": printer_id,
                "created_at": created_at or utc_now_rfc3339(), "status": "pending"}
            self._notify()
            return request_id

    def webcam_request(self, request_id):
        with self._lock:
            return dict(self._webcam_requests[int(request_id)])

    # ---- control API: faults ----
    def set_fault(self, mode, endpoint=None, count=None):
        """mode: see FAULT_MODES or "slow:SECONDS"; endpoint: one of FAULT_ENDPOINTS or None
        (all); count: requests it applies to before clearing itself (None: until cleared)."""
        if endpoint is not None and endpoint not in FAULT_ENDPOINTS:
            raise ValueError("unknown endpoint %r" % endpoint)
        self._faults.set(mode, endpoint, count)
        with self._lock:  # a held poll is answered now, so that the next one meets the fault
            self._faults_set += 1
            self._notify()

    def forget_fault_hits(self):
        """Start a new record of faults served (a test that shares this
        cloud counts only its own)."""
        with self._lock:
            self._fault_hits = []

    def faults_on(self):
        """The endpoints (None: every endpoint) with a fault switched on."""
        return self._faults.keys()

    def clear_faults(self):
        self._faults.clear()
        with self._lock:
            self._refused_print_state = None

    def refuse_snapshots(self, print_state):
        """Answer 422 to every snapshot batch holding a snapshot whose
        print_stats.state is `print_state` (a cloud that cannot take one
        record), until clear_faults()."""
        with self._lock:
            self._refused_print_state = print_state

    def _refuses(self, snapshot):
        payload = snapshot.get("payload")
        status = payload.get("status") if isinstance(payload, dict) else None
        stats = status.get("print_stats") if isinstance(status, dict) else None
        return (self._refused_print_state is not None and isinstance(stats, dict)
                and stats.get("state") == self._refused_print_state)

    def _take_fault(self, endpoint):
        return self._faults.take([endpoint, None])

    # ---- request helpers ----
    @staticmethod
    def _json_body(request, required_type=dict):
        try:
            body = json.loads(request["body"].decode("utf-8") or "null")
        except (UnicodeDecodeError, ValueError):
            raise _Response(422, {"error": "Invalid JSON body"})
        if not isinstance(body, required_type):
            raise _Response(422, {"error": "Request body must be a JSON object"})
        return body

    def _authenticate(self, request, connector_id):
        """The connector named by connector_id, if the bearer secret is its own."""
        header = request["headers"].get("Authorization", "")
        connector = self._connectors.get(str(connector_id))
        if connector is None or header != "Bearer " + connector["secret"]:
            raise _Response(401, {"error": "Unauthorized"})
        return connector

    def _header_connector(self, request):
        return self._authenticate(request, request["headers"].get("X-Connector-Id", ""))

    @staticmethod
    def _limit(request, default):
        try:
            return max(0, int(request["query"].get("limit", default)))
        except ValueError:
            return default

    def _method_not_allowed(self, request):
        return 405, {"error": "Method not allowed"}

    # ---- endpoints (docs/PROTOCOL.md 1.1 - 1.6) ----
    def _ep_register(self, request):
        with self._lock:
            try:
                body = json.loads(request["body"].decode("utf-8") or "null")
            except (UnicodeDecodeError, ValueError):
                body = None
            self._registrations.append(body)
            self._notify()
            if not isinstance(body, dict):
                return 422, {"error": "Request body must be a JSON object"}
            token = self._tokens.get(body.get("pairing_token"))
            if token is None:
                return 401, {"error": "Invalid or expired pairing token"}
            # Idempotency-Key (docs/PROTOCOL.md, Extensions): the same key
            # with the same token gets the same answer again.
            key = request["headers"].get("Idempotency-Key") if token.get("idempotent", True) else None
            if key and key in token.get("answers", {}):
                return 200, token["answers"][key]
            if token["consumed"]:
                return 422, {"error": "Pairing token already consumed"}
            token["consumed"] = True
            answer = self._new_connector(body, token["polling"])
            if key:
                token.setdefault("answers", {})[key] = answer
            return 200, answer

    def _new_connector(self, body, polling):
        connector_id = self._next_connector
        self._next_connector += 1
        printers = []
        wanted = body.get("printers") if isinstance(body.get("printers"), list) else []
        for index, entry in enumerate(wanted):
            name = entry.get("name") if isinstance(entry, dict) else None
            printers.append({"id": self._next_printer, "name": name or "Printer %d" % (index + 1)})
            self._next_printer += 1
        secret = "sk_live_" + secrets.token_hex(24)
        self._connectors[str(connector_id)] = {
            "id": connector_id, "secret": secret, "site_name": body.get("site_name"),
            "device": body.get("device"), "printers": printers,
            "capabilities": capabilities_of(body)}
        response = {"connector": {"id": connector_id}, "credentials": {"secret": secret},
                    "printers": printers}
        if polling:
            response["polling"] = dict(polling)
        return response

    def _ep_heartbeat(self, request):
        with self._lock:
            self._authenticate(request, request["params"]["cid"])
            body = self._json_body(request)
            if "capabilities" in body:
                self._connectors[str(request["params"]["cid"])]["capabilities"] = capabilities_of(body)
            self._heartbeats.append({"connector_id": request["params"]["cid"], "body": body,
                                    "time": time.time()})
            self._notify()
            held = self._connectors[str(request["params"]["cid"])]["capabilities"]
            if self.extensions and "capabilities_ack" in held:
                return 200, {"status": "ok"}, {"X-Capabilities": capabilities_digest(held)}
            return 200, {"status": "ok"}

    def _ep_commands(self, request):
        with self._lock:
            cid = request["params"]["cid"]
            connector = self._authenticate(request, cid)
            limit = self._limit(request, 20)

            def take():
                queued = [c for c in self._commands.values()
                          if c["connector_id"] == cid and c["status"] == "queued" and not c["deleted"]
                          and self._may_send(connector, c["action"])]
                delivered = self._raw_commands.pop(cid, [])
                for command in queued[:limit]:
                    command["status"] = "running"
                    command["deliveries"] += 1
                    delivered.append({"id": command["id"], "printer_id": command["printer_id"],
                                      "action": command["action"], "params": command["params"]})
                return delivered
            delivered, headers = self._hold(request, connector, take)
            self._notify()
            return 200, delivered, headers

    def _may_send(self, connector, action):
        needed = ACTION_CAPABILITIES.get(action) if isinstance(action, str) else None
        return not self.extensions or needed is None or needed in connector["capabilities"]

    def _hold(self, request, connector, take):
        """Long-poll (extension long_poll): with ?wait=N from a connector that
        announced it, an empty answer is held until take() finds something
        (woken by every recorded event) or N seconds (at most 25) pass; the
        X-Poll-Wait header says so. Call with the lock held."""
        try:
            wait = min(LONG_POLL_MAX_SECONDS, int(request["query"].get("wait", "0")))
        except ValueError:
            wait = 0
        if not (self.extensions and wait > 0 and "long_poll" in connector["capabilities"]):
            return take(), {}
        deadline, faults = time.monotonic() + wait, self._faults_set
        items = take()
        while not items and self._server is not None and faults == self._faults_set:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._cond.wait(remaining)
            if request["gone"]():
                break  # nothing is handed to a connector that is no longer there
            items = take()
        return items, {"X-Poll-Wait": str(wait)}

    def _ep_complete(self, request):
        with self._lock:
            connector = self._header_connector(request)
            command = self._commands.get(request["params"]["cmd"])
            if (command is None or command["deleted"]
                    or command["connector_id"] != str(connector["id"])):
                return 404, {"error": "Command not found"}
            body = self._json_body(request)
            self._completions.append({"command_id": str(command["id"]), "body": body,
                                      "time": time.time()})
            if isinstance(body.get("status"), str):
                command["status"] = body["status"]
            command["result"] = body.get("result")
            command["error_message"] = body.get("error_message")
            self._notify()
            return 200, {"status": "ok"}

    def _ep_snapshots(self, request):
        with self._lock:
            connector = self._header_connector(request)
            body = self._json_body(request)
            batch = body.get("snapshots")
            if not isinstance(batch, list) or not all(isinstance(s, dict) for s in batch):
                return 422, {"error": "snapshots must be a list of objects"}
            if any(self._refuses(snap) for snap in batch):
                self._refused_batches += 1
                return 422, {"error": "snapshot refused"}
            received_at = time.time()
            for snap in batch:
                self._snapshots.append({
                    "connector_id": str(connector["id"]), "printer_id": snap.get("printer_id"),
                    "captured_at": snap.get("captured_at"), "payload": snap.get("payload"),
                    "received_at": received_at})
            self._notify()
            if self.extensions and self.snapshot_keepalive and "quiet_snapshots" in connector["capabilities"]:
                return 200, {"inserted": len(batch)}, {"X-Snapshot-Keepalive": str(self.snapshot_keepalive)}
            return 200, {"inserted": len(batch)}

    def _ep_webcam_requests(self, request):
        with self._lock:
            cid = request["params"]["cid"]
            connector = self._authenticate(request, cid)
            limit = self._limit(request, 10)

            def take():
                pending = [r for r in self._webcam_requests.values()
                           if r["connector_id"] == cid and r["status"] == "pending"][:limit]
                for item in pending:
                    item["status"] = "taken"
                return pending
            pending, headers = self._hold(request, connector, take)
            self._notify()
            return 200, [{"id": r["id"], "printer_id": r["printer_id"],
                          "created_at": r["created_at"]} for r in pending], headers

    def _ep_webcam_upload(self, request):
        with self._lock:
            connector = self._header_connector(request)
            try:
                item = self._webcam_requests.get(int(request["params"]["wid"]))
            except ValueError:
                item = None
            if item is None or item["connector_id"] != str(connector["id"]):
                return 404, {"error": "Webcam request not found"}
            self._webcam_uploads.append({
                "id": item["id"], "printer_id": request["headers"].get("X-Printer-Id"),
                "content_type": request["headers"].get("Content-Type"),
                "body": request["body"], "time": time.time()})
            item["status"] = "uploaded"
            self._notify()
            return 200, {"status": "ok"}

    # ---- HTTP control surface (for out-of-process users) ----
    def _ctl_pairing_token(self, request):
        body = self._json_body(request)
        if not isinstance(body.get("token"), str):
            return 422, {"error": "token required"}
        self.add_pairing_token(body["token"], body.get("polling"), body.get("idempotent", True) is not False)
        return 201, {"token": body["token"]}

    def _ctl_command(self, request):
        body = self._json_body(request)
        if not all(k in body for k in ("connector_id", "printer_id", "action")):
            return 422, {"error": "connector_id, printer_id and action required"}
        command_id = self.enqueue_command(body["connector_id"], body["printer_id"],
                                          body["action"], body.get("params"), body.get("id"))
        return 201, {"id": command_id}

    def _ctl_webcam_request(self, request):
        body = self._json_body(request)
        if not all(k in body for k in ("connector_id", "printer_id")):
            return 422, {"error": "connector_id and printer_id required"}
        request_id = self.enqueue_webcam_request(body["connector_id"], body["printer_id"],
                                                 body.get("created_at"))
        return 201, {"id": request_id}

    def _ctl_fault(self, request):
        body = self._json_body(request)
        try:
            self.set_fault(body.get("mode", ""), body.get("endpoint"), body.get("count"))
        except ValueError as exc:
            return 422, {"error": str(exc)}
        return 201, {"status": "ok"}

    def _ctl_clear_faults(self, request):
        self.clear_faults()
        return 200, {"status": "ok"}

    def _ctl_state(self, request):
        with self._lock:
            connectors = [{k: v for k, v in c.items() if k != "secret"}
                          for c in self._connectors.values()]
            return 200, {
                "connectors": connectors,
                "registrations": len(self._registrations),
                "heartbeats": len(self._heartbeats),
                "completions": self._completions,
                # A file held as Base64File shows as its name, not its bytes.
                "commands": json.loads(json.dumps(list(self._commands.values()), default=repr)),
                "snapshots": len(self._snapshots),
                "webcam_uploads": len(self._webcam_uploads),
                "stats": self._stats,
            }


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description="Reference cloud (PrintDock API) on loopback")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--pairing-token", action="append", default=[],
                        help="accept this pairing token (repeatable)")
    parser.add_argument("--no-extensions", action="store_true",
                        help="behave as today's cloud: no long-poll, capabilities ignored")
    parser.add_argument("--snapshot-keepalive", type=int, default=SNAPSHOT_KEEPALIVE_SECONDS, metavar="SECONDS",
                        help="X-Snapshot-Keepalive answered to quiet_snapshots (0: none; default %(default)s)")
    args = parser.parse_args(argv)
    cloud = ReferenceCloud(args.host, args.port, extensions=not args.no_extensions,
                           snapshot_keepalive=args.snapshot_keepalive or None)
    for token in args.pairing_token:
        cloud.add_pairing_token(token)
    return serve_until_signalled(cloud, lambda: "reference cloud listening on %s" % cloud.url)


if __name__ == "__main__":
    sys.exit(main())
