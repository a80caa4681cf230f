"""Printer simulator: a Moonraker look-alike (docs/PROTOCOL.md section 2) on loopback.

Runs tornado in an IOLoop thread of its own with two listeners: the API port
(Moonraker's HTTP API and the JSON-RPC websocket at /websocket) and the UI port
(the web UI, which serves the webcam snapshot). Response shapes follow the real
Moonraker 0.11 (recorded in tests/fixtures/moonraker-0.11-no-klippy.json).
Everything received is recorded for the tests; faults make it misbehave.
"""

import argparse
import asyncio
import copy
import http.client
import json
import os
import random
import re
import struct
import sys
import threading
import time
from urllib.parse import unquote

import tornado.httpserver
import tornado.ioloop
import tornado.iostream
import tornado.netutil
import tornado.web
import tornado.websocket

if __package__:
    from .common import FaultTable, Recorder, recorded, serve_until_signalled
else:  # run as a script: python sim/printer.py
    from common import FaultTable, Recorder, recorded, serve_until_signalled

VERBOSE = os.environ.get("SIM_VERBOSE") == "1"
GCODES_DIR = "/home/pi/printer_data/gcodes"
# "late_sd_busy": a print is started from elsewhere (the web UI) just as the
# request arrives; "late_shutdown": Klipper shuts down just then. Either way
# the answer is the real Moonraker's for the state Klipper is then in.
FAULT_MODES = ("html", "500", "notjson", "drop", "wrongtypes", "trickle", "late_sd_busy", "late_shutdown")
# What Klipper refuses while it is shut down: Moonraker 0.11 answers each with
# HTTP 400 and the message "Unknown" (recorded against the real Klipper and
# Moonraker of sim/rig.py after an M112); queries and emergency_stop still work.
REFUSED_WHEN_SHUT_DOWN = frozenset({"_print_pause", "_print_resume", "_print_cancel", "_print_start",
                                    "_gcode_script"})
OTHER_CLIENTS_FILE = "from-the-web-ui.gcode"
AMBIENT = {"extruder": 24.0, "heater_bed": 23.0}
PRINT_TARGETS = {"extruder": 210.0, "heater_bed": 60.0}
HEATER_RANGES = {"extruder": (0.0, 250.0), "heater_bed": (0.0, 120.0)}
# name -> (description, G-code lines it runs), as [gcode_macro NAME] sections
DEFAULT_MACROS = {
    "START_PRINT": ("Heat up, home and purge", ["G28", "RESPOND MSG=\"Ready to print\""]),
    "PARK": ("Move the head to the back", ["G1 X0 Y200 F6000"]),
    "_HELPER": ("G-Code macro", []),
}
# G-code the simulated Klipper knows besides its macros; the rest is "Unknown command".
KNOWN_GCODE = ("G0", "G1", "G4", "G28", "G90", "G91", "G92", "M82", "M83", "M84", "M104", "M105", "M106", "M107",
               "M109", "M112", "M114", "M117", "M118", "M140", "M190", "M400", "RESPOND",
               "SET_HEATER_TEMPERATURE", "TURN_OFF_HEATERS")
MOONRAKER_VERSION = "0.11.0"


# --------------------------------------------------------------------------
# A small valid JPEG, made in code: baseline, grayscale, uniform mid-gray.
# Every 8x8 block has DC difference 0 and no AC terms, so both Huffman tables
# need a single symbol (code "0"): each block is the two bits "00".
# --------------------------------------------------------------------------

def _jpeg_segment(marker, payload):
    return struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload


def make_jpeg(width=320, height=240):
    blocks = ((width + 7) // 8) * ((height + 7) // 8)
    scan = b"\x00" * ((blocks * 2 + 7) // 8)
    single_symbol_table = bytes([1] + [0] * 15) + b"\x00"
    return b"".join([
        b"\xff\xd8",
        _jpeg_segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"),
        _jpeg_segment(0xDB, b"\x00" + b"\x01" * 64),
        _jpeg_segment(0xC0, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00"),
        _jpeg_segment(0xC4, b"\x00" + single_symbol_table),
        _jpeg_segment(0xC4, b"\x10" + single_symbol_table),
        _jpeg_segment(0xDA, b"\x01\x01\x00\x00\x3f\x00"),
        scan,
        b"\xff\xd9",
    ])


# --------------------------------------------------------------------------
# Moonraker-shaped bodies
# --------------------------------------------------------------------------

class MoonrakerError(Exception):
    """An error answer. With `detail`, message is only the HTTP reason and the
    real reason is in the traceback's last line (Moonraker's file errors)."""

    def __init__(self, code, message=None, detail=None):
        super().__init__(message or detail)
        self.code = code
        self.message = message
        self.detail = detail

    def body(self):
        reason = http.client.responses.get(self.code, "Unknown")
        if self.detail is not None:
            message, last = reason, "HTTP %d: %s (%s)" % (self.code, reason, self.detail)
        else:
            message = self.message or reason
            last = "HTTP %d: %s" % (self.code, message)
        traceback = (
            "Traceback (most recent call last):\n\n"
            '  File "/home/pi/moonraker-env/lib/python3.11/site-packages/tornado/web.py", '
            "line 1886, in _execute\n    result = await result\n             ^^^^^^^^^^^^\n\n"
            "tornado.web.HTTPError: %s\n" % last)
        return {"error": {"code": self.code, "message": message, "traceback": traceback}}


def initial_status():
    return {
        "webhooks": {"state": "ready", "state_message": "Printer is ready"},
        "print_stats": {"filename": "", "total_duration": 0.0, "print_duration": 0.0,
                        "filament_used": 0.0, "state": "standby", "message": "",
                        "info": {"total_layer": None, "current_layer": None}},
        "virtual_sdcard": {"file_path": None, "progress": 0.0, "is_active": False,
                           "file_position": 0, "file_size": 0},
        "extruder": {"temperature": AMBIENT["extruder"], "target": 0.0, "power": 0.0,
                     "can_extrude": False, "pressure_advance": 0.04, "smooth_time": 0.04},
        "heater_bed": {"temperature": AMBIENT["heater_bed"], "target": 0.0, "power": 0.0},
        "toolhead": {"homed_axes": "", "position": [0.0, 0.0, 0.0, 0.0],
                     "print_time": 0.0, "estimated_print_time": 0.0, "extruder": "extruder",
                     "max_velocity": 300.0, "max_accel": 3000.0},
        "pause_resume": {"is_paused": False},
        "heaters": {"available_heaters": sorted(HEATER_RANGES), "available_sensors": sorted(HEATER_RANGES)},
        "configfile": {"settings": config_settings(DEFAULT_MACROS), "save_config_pending": False},
        **{"gcode_macro %s" % name: {} for name in DEFAULT_MACROS},
    }


def config_settings(macros):
    """configfile.settings as Klipper gives it: parsed, section names in lower case."""
    settings = {name: {"min_temp": low, "max_temp": high, "control": "pid"}
                for name, (low, high) in HEATER_RANGES.items()}
    for name, (description, lines) in macros.items():
        settings["gcode_macro %s" % name.lower()] = {"description": description, "gcode": "\n".join(lines)}
    return settings


def default_webcam():
    return {"name": "cam", "enabled": True, "icon": "mdiWebcam", "aspect_ratio": "4:3",
            "target_fps": 15, "target_fps_idle": 5, "location": "printer",
            "service": "mjpegstreamer", "stream_url": "/webcam/?action=stream",
            "snapshot_url": "/webcam/?action=snapshot", "flip_horizontal": False,
            "flip_vertical": False, "rotation": 0, "source": "config", "extra_data": {},
            "uid": "5f3a1c52-8c1e-4d8e-9b52-0c1f1b6a7e01"}


def select_fields(status, objects):
    """Moonraker's object selection: {name: None (all fields) | [fields]}."""
    selected = {}
    for name, fields in objects.items():
        if name not in status:
            continue
        if fields is None or fields == []:
            selected[name] = copy.deepcopy(status[name])
        else:
            selected[name] = {f: copy.deepcopy(status[name][f]) for f in fields
                              if f in status[name]}
    return selected


def wrong_types(body):
    """Valid JSON with the wrong types: lists where objects are expected and back."""
    if "result" in body:
        result = body["result"]
        return {"result": ["unexpected", 1, None] if isinstance(result, dict)
                else {"unexpected": result}}
    return {key: [value] if isinstance(value, dict) else {"unexpected": value}
            for key, value in body.items()}


# --------------------------------------------------------------------------
# Routes of the API port: (method, regex, handler name, klippy gate)
# klippy gate: None, "route" (404 without Klippy) or "print" (503 without Klippy)
# --------------------------------------------------------------------------

API_ROUTES = [
    ("GET", r"/server/info", "_server_info", None),
    ("GET", r"/printer/info", "_printer_info", "route"),
    ("GET", r"/printer/objects/query", "_objects_query", "route"),
    ("POST", r"/printer/objects/query", "_objects_query", "route"),
    ("GET", r"/printer/objects/list", "_objects_list", "route"),
    ("POST", r"/printer/print/pause", "_print_pause", "print"),
    ("POST", r"/printer/print/resume", "_print_resume", "print"),
    ("POST", r"/printer/print/cancel", "_print_cancel", "print"),
    ("POST", r"/printer/print/start", "_print_start", "print"),
    ("POST", r"/printer/gcode/script", "_gcode_script", "route"),
    ("POST", r"/printer/emergency_stop", "_emergency_stop", "route"),
    ("POST", r"/printer/firmware_restart", "_firmware_restart", "route"),
    ("POST", r"/server/files/upload", "_files_upload", None),
    ("DELETE", r"/server/files/gcodes/(?P<path>.+)", "_files_delete", None),
    ("GET", r"/server/files/list", "_files_list", None),
    ("GET", r"/server/history/list", "_history_list", None),
    ("GET", r"/server/webcams/list", "_webcams_list", None),
]
_COMPILED_API_ROUTES = [(m, re.compile(p + r"\Z"), h, g) for m, p, h, g in API_ROUTES]


class _HttpHandler(tornado.web.RequestHandler):
    """One handler for every HTTP path of a port: record, auth, faults, dispatch."""

    def initialize(self, sim, port_name):
        self.sim = sim
        self.port_name = port_name

    def compute_etag(self):
        return None

    def check_xsrf_cookie(self):
        pass

    async def get(self, *args):
        await self._handle()

    post = put = delete = head = patch = get

    async def _handle(self):
        sim = self.sim
        sim._record_http(self.request, self.port_name)
        if self.port_name == "api" and not sim._api_key_ok(self.request.headers):
            return self._send(401, MoonrakerError(401, detail="Unauthorized").body())
        fault = sim._take_fault(self.request.path)
        if fault is not None:
            if fault.startswith("slow:"):
                await asyncio.sleep(float(fault.split(":", 1)[1]))
            elif fault == "drop":
                self._finished = True  # nothing is ever sent
                self.request.connection.detach().close()
                return
            elif fault in ("html", "500", "notjson"):
                return self._send_fault(fault)
            elif fault == "trickle":
                return await self._trickle()
            elif fault == "late_sd_busy":
                sim._print_started_elsewhere()
            elif fault == "late_shutdown":
                with sim._lock:
                    sim._shut_down("Lost communication with MCU 'mcu'")
        if self.port_name == "ui":
            return self._send_ui()
        status, body = sim._dispatch_api(self.request)
        if fault == "wrongtypes" and 200 <= status < 300:
            body = wrong_types(body)
        self._send(status, body)

    async def _trickle(self, interval=1.0):
        """An image one byte a second: no read timeout ever trips."""
        image = b"\xff\xd8" + b"\x00" * 198
        self.set_header("Content-Type", "image/jpeg")
        self.set_header("Content-Length", str(len(image)))
        for index in range(len(image)):
            self.write(image[index:index + 1])
            try:
                await self.flush()
            except tornado.iostream.StreamClosedError:
                return  # the client gave up
            await asyncio.sleep(interval)
        self.finish()

    def _send(self, status, body):
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(json.dumps(body))

    def _send_fault(self, mode):
        if mode == "html":
            self.set_header("Content-Type", "text/html; charset=UTF-8")
            self.finish("<html><head><title>502 Bad Gateway</title></head>"
                        "<body><center><h1>502 Bad Gateway</h1></center>"
                        "<hr><center>nginx</center></body></html>")
        elif mode == "500":
            self._send(500, MoonrakerError(500, "Internal Server Error").body())
        else:
            self.set_header("Content-Type", "application/json; charset=UTF-8")
            self.finish("not json")

    def _send_ui(self):
        path, action = self.request.path, self.get_query_argument("action", None)
        image, content_type = self.sim._webcam_image()
        if path == "/webcam/" and action == "snapshot" and image is not None:
            self.set_header("Content-Type", content_type)
            return self.finish(image)
        if path in ("/", "/index.html"):
            self.set_header("Content-Type", "text/html; charset=UTF-8")
            return self.finish("<!DOCTYPE html><html><head><title>Mainsail</title></head>"
                               "<body><div id=\"app\"></div></body></html>")
        self.set_status(404)
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.finish("<html><body><h1>404 Not Found</h1></body></html>")


# --------------------------------------------------------------------------
# JSON-RPC websocket (/websocket)
# --------------------------------------------------------------------------

WS_METHODS = {
    "server.connection.identify": "_ws_identify",
    "server.info": "_ws_server_info",
    "printer.info": "_ws_printer_info",
    "printer.objects.subscribe": "_ws_subscribe",
    "printer.objects.query": "_ws_query",
}
KLIPPY_WS_METHODS = ("printer.info", "printer.objects.subscribe", "printer.objects.query")


class _WebSocketHandler(tornado.websocket.WebSocketHandler):
    def initialize(self, sim):
        self.sim = sim
        self.connection_id = None
        self.subscription = {}

    def check_origin(self, origin):
        return True

    async def get(self, *args, **kwargs):
        self.sim._record_http(self.request, "api")
        if not self.sim._api_key_ok(self.request.headers):
            self.set_status(401)
            self.set_header("Content-Type", "application/json; charset=UTF-8")
            self.finish(json.dumps(MoonrakerError(401, detail="Unauthorized").body()))
            return
        await super().get(*args, **kwargs)

    def open(self):
        self.connection_id = self.sim._ws_opened(self)

    def on_close(self):
        self.sim._ws_closed(self)

    def on_message(self, message):
        try:
            request = json.loads(message)
            method, params, rpc_id = request["method"], request.get("params") or {}, request.get("id")
        except (ValueError, KeyError, TypeError):
            return self._reply(None, error={"code": -32700, "message": "Parse error"})
        self.sim._record_ws_call(self.connection_id, method, params)
        handler_name = WS_METHODS.get(method)
        if handler_name is None or (method in KLIPPY_WS_METHODS and not self.sim.klippy_connected):
            return self._reply(rpc_id, error={"code": -32601, "message": "Method not found"})
        try:
            result = getattr(self.sim, handler_name)(self, params)
        except MoonrakerError as exc:
            return self._reply(rpc_id, error={"code": exc.code, "message": str(exc)})
        self._reply(rpc_id, result=result)

    def _reply(self, rpc_id, result=None, error=None):
        message = {"jsonrpc": "2.0", "id": rpc_id}
        if error is not None:
            message["error"] = error
        else:
            message["result"] = result
        self.send(message)

    def send(self, message):
        """message: a JSON-RPC object (sent as a text frame), or bytes (a binary frame)."""
        try:
            if isinstance(message, bytes):
                self.write_message(message, binary=True)
            else:
                self.write_message(json.dumps(message))
        except tornado.websocket.WebSocketClosedError:
            pass


# --------------------------------------------------------------------------
# The simulator
# --------------------------------------------------------------------------

class PrinterSimulator(Recorder):
    # What arrived, as copies (see Recorder.wait_for to wait for more).
    requests = recorded("_requests")
    gcode_scripts = recorded("_gcode_scripts")
    deleted = recorded("_deleted")
    ws_calls = recorded("_ws_calls")

    def __init__(self, host="127.0.0.1", port=0, ui_port=0, api_key=None,
                 print_seconds=30.0, tick_hz=2.0, websocket=True):
        self.host = host
        self.websocket = websocket  # False: /websocket is a 404, like a proxy that drops upgrades
        self.port = port
        self.ui_port = ui_port
        self.api_key = api_key
        self.print_seconds = float(print_seconds)
        self.tick_hz = float(tick_hz)
        super().__init__()
        self._loop = None
        self._thread = None
        self._servers = []
        self._status = initial_status()
        self._klippy = True
        self.moonraker_version = MOONRAKER_VERSION  # what /server/info reports (a test may set an old one)
        self._files = {}            # name -> {"data": bytes, "modified": float}
        self._history = []          # newest last
        self._job = None            # {"filename", "start_time"} while a print is on
        self._webcams = [default_webcam()]
        self._macros = dict(DEFAULT_MACROS)
        self._console_replies = []  # console lines of the script running now
        self._image = (make_jpeg(), "image/jpeg")
        self._faults = FaultTable(self._lock, FAULT_MODES)
        self._ws = set()
        self._next_ws_id = 1
        self._last_tick = time.monotonic()
        self._requests = []
        self._gcode_scripts = []
        self._deleted = []
        self._ws_calls = []
        self.ws_connections_total = 0

    # ---- lifecycle ----
    @property
    def url(self):
        return "http://%s:%d" % (self.host, self.port)

    @property
    def ui_url(self):
        return "http://%s:%d" % (self.host, self.ui_port)

    @property
    def ws_url(self):
        return "ws://%s:%d/websocket" % (self.host, self.port)

    def start(self):
        if self._thread is not None:
            return self
        ready, failure = threading.Event(), []
        self._thread = threading.Thread(target=self._run, args=(ready, failure),
                                        name="printer-simulator", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            self._thread.join(5)
            self._thread = None
            raise failure[0]
        return self

    def _run(self, ready, failure):
        asyncio.set_event_loop(asyncio.new_event_loop())
        loop = tornado.ioloop.IOLoop.current()
        try:
            api_sockets = tornado.netutil.bind_sockets(self.port, self.host)
            ui_sockets = tornado.netutil.bind_sockets(self.ui_port, self.host)
        except OSError as exc:
            failure.append(exc)
            ready.set()
            loop.close(all_fds=True)
            return
        self.port = api_sockets[0].getsockname()[1]
        self.ui_port = ui_sockets[0].getsockname()[1]
        self._servers = [self._serve(self._api_app(), api_sockets),
                         self._serve(self._ui_app(), ui_sockets)]
        self._ticker = tornado.ioloop.PeriodicCallback(self._tick, 1000.0 / self.tick_hz)
        self._ticker.start()
        # Like Moonraker: process stats to every websocket client once a second.
        self._proc_stats = tornado.ioloop.PeriodicCallback(self._send_proc_stats, 1000.0)
        self._proc_stats.start()
        self._last_tick = time.monotonic()
        self._loop = loop
        ready.set()
        loop.start()
        loop.close(all_fds=True)

    def _api_app(self):
        routes = [(r"/websocket", _WebSocketHandler, {"sim": self})] if self.websocket else []
        routes.append((r"/.*", _HttpHandler, {"sim": self, "port_name": "api"}))
        return tornado.web.Application(routes, log_function=_log_request)

    def _ui_app(self):
        return tornado.web.Application(
            [(r"/.*", _HttpHandler, {"sim": self, "port_name": "ui"})], log_function=_log_request)

    @staticmethod
    def _serve(app, sockets):
        server = tornado.httpserver.HTTPServer(app, max_body_size=512 * 1024 * 1024)
        server.add_sockets(sockets)
        return server

    def stop(self):
        """Closes the listening sockets and every open connection (Moonraker down)."""
        if self._thread is None:
            return
        loop, self._loop = self._loop, None
        loop.add_callback(self._shutdown, loop)
        self._thread.join(10)
        self._thread = None

    async def _shutdown(self, loop):
        self._ticker.stop()
        self._proc_stats.stop()
        for server in self._servers:
            server.stop()
        for client in list(self._ws):
            client.close()
        try:
            await asyncio.wait_for(asyncio.gather(
                *(s.close_all_connections() for s in self._servers)), 5)
        except asyncio.TimeoutError:
            pass
        self._servers = []
        loop.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---- recording ----
    def _record_http(self, request, port_name):
        parsed = None
        if "json" in request.headers.get("Content-Type", ""):
            try:
                parsed = json.loads(request.body or b"null")
            except ValueError:
                parsed = None
        with self._lock:
            self._requests.append({
                "port": port_name, "method": request.method, "path": request.uri,
                "headers": dict(request.headers.get_all()), "body": request.body,
                "json": parsed, "time": time.time()})
            self._notify()

    def _record_ws_call(self, connection_id, method, params):
        with self._lock:
            self._ws_calls.append({"connection_id": connection_id, "method": method,
                                  "params": params, "time": time.time()})
            self._notify()

    @property
    def ws_clients(self):
        with self._lock:
            return len(self._ws)

    def summary(self):
        with self._lock:
            recent = ["%s %s" % (r["method"], r["path"]) for r in self._requests[-8:]]
            return ("printer: state=%s klippy=%s files=%s, %d requests (last: %s), gcode=%s, "
                    "ws clients=%d, ws calls=%d" % (
                        self._status["print_stats"]["state"], self._klippy, sorted(self._files),
                        len(self._requests), recent, self._gcode_scripts, len(self._ws),
                        len(self._ws_calls)))

    # ---- control API ----
    def add_file(self, name, data=b"G28\nG1 X10 Y10 F3000\n"):
        with self._lock:
            self._files[name] = {"data": bytes(data), "modified": time.time()}
            self._notify()

    @property
    def files(self):
        with self._lock:
            return {name: f["data"] for name, f in self._files.items()}

    @property
    def state(self):
        with self._lock:
            return self._status["print_stats"]["state"]

    @property
    def status(self):
        with self._lock:
            return copy.deepcopy(self._status)

    @property
    def history(self):
        with self._lock:
            return copy.deepcopy(self._history)

    @property
    def klippy_connected(self):
        with self._lock:
            return self._klippy

    @property
    def klippy_shut_down(self):
        """Klipper connected but shut down (an emergency stop, a lost MCU)."""
        with self._lock:
            return self._klippy and self._status["webhooks"]["state"] == "shutdown"

    def _print_started_elsewhere(self):
        with self._lock:
            if self._status["print_stats"]["state"] not in ("printing", "paused"):
                self._files.setdefault(OTHER_CLIENTS_FILE, {"data": b"G28\n", "modified": time.time()})
                self._begin_job(OTHER_CLIENTS_FILE)

    def set_state(self, state, filename=None):
        """Moves print_stats.state (and what goes with it) like a real printer would."""
        with self._lock:
            if filename is not None and state in ("printing", "paused"):
                self._begin_job(filename)
            elif filename is not None:
                self._apply({"print_stats": {"filename": filename}})
            STATE_SETTERS[state](self)

    def set_klippy(self, connected):
        with self._lock:
            shut_down = self._status["webhooks"]["state"] == "shutdown"
            if self._klippy == bool(connected) and not (connected and shut_down):
                return
            self._klippy = bool(connected)
            webhooks = ({"state": "ready", "state_message": "Printer is ready"} if connected
                        else {"state": "shutdown", "state_message": "Klippy Host not connected"})
            self._status["webhooks"].update(webhooks)
            self._notify()
        method = "notify_klippy_ready" if connected else "notify_klippy_disconnected"
        self._broadcast({"jsonrpc": "2.0", "method": method})

    def send_binary_frame(self, data):
        """A binary websocket frame to every client: the real Moonraker sends
        only text, but a proxy or another program on its port may not."""
        self._broadcast(bytes(data))

    def set_webcams(self, webcams):
        with self._lock:
            self._webcams = copy.deepcopy(list(webcams))

    def set_webcam_image(self, data, content_type="image/jpeg"):
        """data None: no camera (the snapshot URL answers 404, as the web UI does)."""
        with self._lock:
            self._image = (None if data is None else bytes(data), content_type)

    def _webcam_image(self):
        with self._lock:
            return self._image

    def remove_object(self, name):
        """Makes the printer lack an object (e.g. "heater_bed")."""
        with self._lock:
            self._status.pop(name, None)

    def set_fault(self, mode, endpoint=None, count=None):
        """mode: see FAULT_MODES or "slow:SECONDS"; endpoint: a path prefix such as
        "/printer/objects/query" or "/webcam/" (None: every HTTP request, both ports)."""
        self._faults.set(mode, endpoint, count)

    def clear_faults(self):
        self._faults.clear()

    def _take_fault(self, path):
        prefixes = [k for k in self._faults.keys() if k is not None and path.startswith(k)]
        return self._faults.take(prefixes + [None])

    def _api_key_ok(self, headers):
        return self.api_key is None or headers.get("X-Api-Key") == self.api_key

    # ---- state changes and notifications ----
    def _apply(self, changes):
        """Applies {object: {field: value}}; pushes what really changed to subscribers."""
        diff = {}
        with self._lock:
            for name, fields in changes.items():
                if name not in self._status:
                    continue
                for field, value in fields.items():
                    if self._status[name].get(field) != value:
                        self._status[name][field] = copy.deepcopy(value)
                        diff.setdefault(name, {})[field] = copy.deepcopy(value)
            if diff:
                self._notify()
        if diff and self._klippy:
            self._push_status(diff, time.monotonic())
        return diff

    def _push_status(self, diff, eventtime):
        loop = self._loop
        if loop is not None:
            loop.add_callback(self._send_status_updates, diff, eventtime)

    def _send_status_updates(self, diff, eventtime):
        for client in list(self._ws):
            if not client.subscription:
                continue
            selected = {}
            for name, fields in select_fields(diff, client.subscription).items():
                if fields:
                    selected[name] = fields
            if selected:
                client.send({"jsonrpc": "2.0", "method": "notify_status_update",
                             "params": [selected, eventtime]})

    def _broadcast(self, message):
        loop = self._loop
        if loop is not None:
            loop.add_callback(lambda: [c.send(message) for c in list(self._ws)])

    def _send_proc_stats(self):
        """About the 900 bytes the real Moonraker 0.11 sends every second."""
        stats = {"moonraker_stats": {"time": time.time(), "cpu_usage": round(random.uniform(1, 4), 2),
                                     "memory": 46480, "mem_units": "kB"},
                 "cpu_temp": round(random.uniform(45, 50), 2),
                 "network": {name: {"rx_bytes": 123456789, "tx_bytes": 98765432, "rx_packets": 654321,
                                    "tx_packets": 543210, "rx_errs": 0, "tx_errs": 0, "rx_drop": 0,
                                    "tx_drop": 0, "bandwidth": round(random.uniform(0, 3000), 2)}
                             for name in ("lo", "eth0", "wlan0")},
                 "system_cpu_usage": {"cpu": round(random.uniform(2, 9), 2),
                                      **{"cpu%d" % n: round(random.uniform(0, 12), 2) for n in range(4)}},
                 "system_memory": {"total": 3884708, "available": 3270568, "used": 614140},
                 "websocket_connections": len(self._ws)}
        self._broadcast({"jsonrpc": "2.0", "method": "notify_proc_stat_update", "params": [stats]})

    def _tick(self):
        now = time.monotonic()
        dt, self._last_tick = now - self._last_tick, now
        with self._lock:
            if not self._klippy:
                return
            changes = {name: {"temperature": self._next_temperature(name)}
                       for name in AMBIENT if name in self._status}
            state = self._status["print_stats"]["state"]
            if state in ("printing", "paused"):
                stats = self._status["print_stats"]
                changes["print_stats"] = {"total_duration": round(stats["total_duration"] + dt, 3)}
            if state == "printing":
                self._advance_print(changes, dt)
            self._apply(changes)
            if state == "printing" and self._status["virtual_sdcard"]["progress"] >= 1.0:
                self._finish_job("complete")

    def _next_temperature(self, name):
        heater = self._status[name]
        goal = heater["target"] or AMBIENT[name]
        current = heater["temperature"]
        return round(current + (goal - current) * 0.3 + random.uniform(-0.4, 0.4), 2)

    def _advance_print(self, changes, dt):
        stats, sdcard = self._status["print_stats"], self._status["virtual_sdcard"]
        progress = min(1.0, sdcard["progress"] + dt / self.print_seconds)
        changes["print_stats"]["print_duration"] = round(stats["print_duration"] + dt, 3)
        changes["print_stats"]["filament_used"] = round(progress * 1500.0, 2)
        changes["virtual_sdcard"] = {"progress": round(progress, 4),
                                     "file_position": int(progress * sdcard["file_size"])}

    # ---- print job lifecycle (callers hold the lock) ----
    def _begin_job(self, filename):
        size = len(self._files.get(filename, {}).get("data", b""))
        self._job = {"filename": filename, "start_time": time.time()}
        self._apply({
            "print_stats": {"filename": filename, "state": "printing", "print_duration": 0.0,
                            "total_duration": 0.0, "filament_used": 0.0, "message": ""},
            "virtual_sdcard": {"file_path": "%s/%s" % (GCODES_DIR, filename), "progress": 0.0,
                               "is_active": True, "file_position": 0, "file_size": size},
            "extruder": {"target": PRINT_TARGETS["extruder"]},
            "heater_bed": {"target": PRINT_TARGETS["heater_bed"]},
            "pause_resume": {"is_paused": False}})

    def _set_printing(self):
        if self._job is None:
            self._begin_job(self._status["print_stats"]["filename"] or "simulated.gcode")
        self._apply({"print_stats": {"state": "printing"}, "virtual_sdcard": {"is_active": True},
                     "pause_resume": {"is_paused": False}})

    def _set_paused(self):
        if self._job is None:
            self._begin_job(self._status["print_stats"]["filename"] or "simulated.gcode")
        self._apply({"print_stats": {"state": "paused"}, "virtual_sdcard": {"is_active": False},
                     "pause_resume": {"is_paused": True}})

    def _set_standby(self):
        self._job = None
        self._apply({"print_stats": {"state": "standby", "filename": "", "print_duration": 0.0,
                                     "total_duration": 0.0, "filament_used": 0.0, "message": ""},
                     "virtual_sdcard": {"file_path": None, "progress": 0.0, "is_active": False,
                                        "file_position": 0},
                     "pause_resume": {"is_paused": False}})

    def _finish_job(self, state):
        job, self._job = self._job, None
        changes = {"print_stats": {"state": state}, "virtual_sdcard": {"is_active": False},
                   "pause_resume": {"is_paused": False},
                   "extruder": {"target": 0.0}, "heater_bed": {"target": 0.0}}
        if state == "complete":
            changes["virtual_sdcard"]["progress"] = 1.0
        if state == "error":
            changes["print_stats"]["message"] = "Simulated print error"
        self._apply(changes)
        if job is not None:
            self._add_history(job, HISTORY_STATUS[state])

    def _add_history(self, job, status):
        stats = self._status["print_stats"]
        entry = self._files.get(job["filename"])
        self._history.append({
            "job_id": "%06X" % (len(self._history) + 1), "user": "_TRUSTED_USER_",
            "filename": job["filename"], "exists": entry is not None, "status": status,
            "start_time": job["start_time"], "end_time": time.time(),
            "print_duration": stats["print_duration"], "total_duration": stats["total_duration"],
            "filament_used": stats["filament_used"],
            "metadata": {"size": len(entry["data"]) if entry else 0,
                         "modified": entry["modified"] if entry else 0},
            "auxiliary_data": []})
        self._notify()

    # ---- HTTP API dispatch ----
    def _dispatch_api(self, request):
        path = request.path
        for method, regex, handler_name, gate in _COMPILED_API_ROUTES:
            found = regex.match(path)
            if not found or method != request.method:
                continue
            try:
                if gate and not self.klippy_connected:
                    raise (MoonrakerError(404, "Not Found") if gate == "route"
                           else MoonrakerError(503, "Klippy Host not connected"))
                if handler_name in REFUSED_WHEN_SHUT_DOWN and self.klippy_shut_down:
                    raise MoonrakerError(400, "Unknown")
                return getattr(self, handler_name)(request, **found.groupdict())
            except MoonrakerError as exc:
                return exc.code, exc.body()
        return 404, MoonrakerError(404, "Not Found").body()

    @staticmethod
    def _json_args(request):
        """Query arguments, overridden by a JSON object body (as Moonraker merges them)."""
        args = {k: v[-1].decode() for k, v in request.query_arguments.items()}
        content_type = request.headers.get("Content-Type", "")
        if request.body and ("json" in content_type or request.body.lstrip()[:1] == b"{"):
            try:
                body = json.loads(request.body)
            except ValueError:
                raise MoonrakerError(400, "Invalid JSON body")
            if not isinstance(body, dict):
                raise MoonrakerError(400, "Invalid JSON body")
            args.update(body)
        return args

    def _server_info_result(self):
        with self._lock:
            return {
                "klippy_connected": self._klippy,
                "klippy_state": "ready" if self._klippy else "disconnected",
                "components": ["klippy_connection", "application", "websockets", "database",
                               "file_manager", "authorization", "klippy_apis", "machine",
                               "data_store", "job_state", "history", "webcam"],
                "failed_components": [], "registered_directories": ["config", "logs", "gcodes"],
                "warnings": [], "websocket_count": len(self._ws),
                "moonraker_version": self.moonraker_version, "missing_klippy_requirements": [],
                "api_version": [1, 5, 0], "api_version_string": "1.5.0"}

    def _printer_info_result(self):
        return {"state": "ready", "state_message": "Printer is ready",
                "hostname": "printer-sim", "software_version": "v0.12.0-sim",
                "cpu_info": "4 core ARMv8", "klipper_path": "/home/pi/klipper",
                "python_path": "/home/pi/klippy-env/bin/python",
                "log_file": "/home/pi/printer_data/logs/klippy.log",
                "config_file": "/home/pi/printer_data/config/printer.cfg"}

    def _query_result(self, objects):
        with self._lock:
            return {"eventtime": round(time.monotonic(), 3),
                    "status": select_fields(self._status, objects)}

    def _server_info(self, request):
        return 200, {"result": self._server_info_result()}

    def _printer_info(self, request):
        return 200, {"result": self._printer_info_result()}

    def _objects_list(self, request):
        with self._lock:
            return 200, {"result": {"objects": sorted(self._status)}}

    def _objects_query(self, request):
        if request.method == "POST" and request.body:
            objects = self._json_args(request).get("objects")
            if not isinstance(objects, dict):
                raise MoonrakerError(400, "Invalid argument for 'objects'")
        else:
            objects = {name: (raw[-1].decode().split(",") if raw[-1] else None)
                       for name, raw in request.query_arguments.items()}
        return 200, {"result": self._query_result(objects)}

    def _print_pause(self, request):
        with self._lock:
            if self._status["print_stats"]["state"] == "printing":
                self._set_paused()
        return 200, {"result": "ok"}

    def _print_resume(self, request):
        with self._lock:
            if self._status["print_stats"]["state"] == "paused":
                self._set_printing()
        return 200, {"result": "ok"}

    def _print_cancel(self, request):
        with self._lock:
            if self._status["print_stats"]["state"] in ("printing", "paused"):
                self._finish_job("cancelled")
        return 200, {"result": "ok"}

    def _print_start(self, request):
        filename = self._json_args(request).get("filename")
        if not filename:
            raise MoonrakerError(400, "No data for argument: filename")
        with self._lock:
            if self._status["print_stats"]["state"] in ("printing", "paused"):
                raise MoonrakerError(400, "SD busy")
            if filename not in self._files:
                raise MoonrakerError(400, "Unable to open file")
            self._begin_job(filename)
        return 200, {"result": "ok"}

    def _gcode_script(self, request):
        script = self._json_args(request).get("script")
        if not isinstance(script, str):
            raise MoonrakerError(400, "No data for argument: script")
        replies = []
        try:
            with self._lock:
                self._gcode_scripts.append(script)
                self._notify()
                for line in script.splitlines():
                    self._run_gcode_line(line.strip(), replies)
        finally:
            self._console(replies)
        return 200, {"result": "ok"}

    def _console(self, lines):
        """What Klipper printed, to every websocket client, a line a message (as Moonraker does)."""
        for line in lines:
            self._broadcast({"jsonrpc": "2.0", "method": "notify_gcode_response", "params": [line]})

    def _run_gcode_line(self, line, replies, depth=0):
        words = line.split(";", 1)[0].split()
        if not words:
            return
        command = words[0].upper()
        params = {w.split("=", 1)[0].upper(): w.split("=", 1)[1] for w in words[1:] if "=" in w}
        macro = next((m for m in self._macros if m.upper() == command), None)
        if macro is not None and depth < 8:
            for inner in self._macros[macro][1]:
                self._run_gcode_line(inner, replies, depth + 1)
            return
        if command not in KNOWN_GCODE:
            replies.append('!! Unknown command:"%s"' % command)
            raise MoonrakerError(400, 'Unknown command:"%s"' % command)
        handler = GCODE_HANDLERS.get(command)
        if handler is not None:
            handler(self, line, [w.upper() for w in words[1:]], params, replies)

    def _gcode_home(self, line, words, params, replies):
        axes = {w[0].lower() for w in words if w[:1] in ("X", "Y", "Z")} or set("xyz")
        homed = set(self._status["toolhead"]["homed_axes"]) | axes
        self._apply({"toolhead": {"homed_axes": "".join(a for a in "xyz" if a in homed)}})

    def _gcode_m_temperature(self, line, words, params, replies):
        heater = "extruder" if line.split()[0].upper() in ("M104", "M109") else "heater_bed"
        for word in words:
            if word.startswith("S"):
                self._apply({heater: {"target": float(word[1:])}})

    def _gcode_report_temperatures(self, line, words, params, replies):
        ext, bed = self._status.get("extruder", {}), self._status.get("heater_bed", {})
        replies.append("T:%.1f /%.1f B:%.1f /%.1f" % (ext.get("temperature", 0), ext.get("target", 0),
                                                     bed.get("temperature", 0), bed.get("target", 0)))

    def _gcode_report_position(self, line, words, params, replies):
        replies.append("X:%.3f Y:%.3f Z:%.3f E:%.3f" % tuple(self._status["toolhead"]["position"]))

    def _gcode_echo(self, line, words, params, replies):
        if line.split()[0].upper() == "M118":
            text = line.split(None, 1)[1] if len(line.split()) > 1 else ""
        else:
            text = line[line.upper().index("MSG=") + 4:] if "MSG=" in line.upper() else ""
        replies.append("echo: %s" % text.strip().strip('"'))

    def _gcode_set_heater(self, line, words, params, replies):
        name = params.get("HEATER", "")
        heater = next((h for h in HEATER_RANGES if h.split()[-1] == name), None)
        if heater is None:
            replies.append('!! Unknown heater "%s"' % name)
            raise MoonrakerError(400, 'Unknown heater "%s"' % name)
        try:
            target = float(params.get("TARGET", "0"))
        except ValueError:
            raise MoonrakerError(400, "Error on 'SET_HEATER_TEMPERATURE': unable to parse TARGET")
        low, high = HEATER_RANGES[heater]
        if target and not low <= target <= high:
            message = "Requested temperature (%.1f) out of range (%.1f:%.1f)" % (target, low, high)
            replies.append("!! " + message)
            raise MoonrakerError(400, message)
        self._apply({heater: {"target": target}})

    def _gcode_heaters_off(self, line, words, params, replies):
        self._apply({heater: {"target": 0.0} for heater in HEATER_RANGES})

    def _gcode_emergency_stop(self, line, words, params, replies):
        self._shut_down("Shutdown due to M112 command")

    def _emergency_stop(self, request):
        with self._lock:
            self._shut_down("Shutdown due to webhooks request")
        return 200, {"result": "ok"}

    def _firmware_restart(self, request):
        with self._lock:
            self._status["webhooks"].update({"state": "ready", "state_message": "Printer is ready"})
            if self._status["print_stats"]["state"] == "error":
                self._set_standby()
            self._notify()
        self._broadcast({"jsonrpc": "2.0", "method": "notify_klippy_ready"})
        return 200, {"result": "ok"}

    def _shut_down(self, message):
        """Klipper's shutdown (an emergency stop): heaters off, the print ends in error."""
        if self._job is not None:
            self._finish_job("error")
        self._apply({heater: {"target": 0.0} for heater in HEATER_RANGES})
        self._status["webhooks"].update({"state": "shutdown", "state_message": message})
        self._notify()
        self._broadcast({"jsonrpc": "2.0", "method": "notify_klippy_shutdown"})

    def _files_upload(self, request):
        uploads = request.files.get("file")
        if not uploads:
            raise MoonrakerError(400, detail="No file name specifed in upload form")
        root = (request.body_arguments.get("root") or [b"gcodes"])[-1].decode()
        if root != "gcodes":
            raise MoonrakerError(400, detail="Root %s not available" % root)
        folder = (request.body_arguments.get("path") or [b""])[-1].decode().strip("/")
        name = "/".join(p for p in (folder, uploads[0].filename) if p)
        if not valid_relative_path(name):
            raise MoonrakerError(400, detail="Cannot write to path: %s/%s" % (GCODES_DIR, name))
        wants_print = (request.body_arguments.get("print") or [b"false"])[-1] == b"true"
        with self._lock:
            self.add_file(name, uploads[0].body)
            modified = self._files[name]["modified"]
            started = wants_print and self._status["print_stats"]["state"] not in (
                "printing", "paused")
            if started:
                self._begin_job(name)
        return 201, {"action": "create_file",
                     "item": {"modified": modified, "size": len(uploads[0].body),
                              "permissions": "rw", "path": name, "root": "gcodes"},
                     "print_started": started, "print_queued": False}

    def _files_delete(self, request, path):
        name = unquote(path)
        with self._lock:
            if name not in self._files:
                raise MoonrakerError(400, detail="Invalid file path: gcodes/%s" % name)
            if (self._status["print_stats"]["state"] in ("printing", "paused")
                    and self._status["print_stats"]["filename"] == name):
                raise MoonrakerError(403, detail="File currently in use: gcodes/%s" % name)
            del self._files[name]
            self._deleted.append(name)
            self._notify()
        return 200, {"result": {"action": "delete_file",
                                "item": {"modified": 0, "size": 0, "permissions": "",
                                         "path": name, "root": "gcodes"}}}

    def _files_list(self, request):
        root = request.query_arguments.get("root", [b"gcodes"])[-1].decode()
        if root != "gcodes":
            raise MoonrakerError(400, "Failed to build file list, invalid path: %s: None" % root)
        with self._lock:
            return 200, {"result": [
                {"path": name, "modified": f["modified"], "size": len(f["data"]),
                 "permissions": "rw"} for name, f in sorted(self._files.items())]}

    def _history_list(self, request):
        try:
            limit = int(request.query_arguments.get("limit", [b"50"])[-1])
        except ValueError:
            raise MoonrakerError(400, "Invalid argument for 'limit'")
        with self._lock:
            jobs = list(reversed(self._history))[:max(0, limit)]
            return 200, {"result": {"count": len(self._history), "jobs": copy.deepcopy(jobs)}}

    def _webcams_list(self, request):
        with self._lock:
            return 200, {"result": {"webcams": copy.deepcopy(self._webcams)}}

    # ---- websocket methods ----
    def _ws_opened(self, client):
        with self._lock:
            connection_id = self._next_ws_id
            self._next_ws_id += 1
            self._ws.add(client)
            self.ws_connections_total += 1
            self._notify()
            return connection_id

    def _ws_closed(self, client):
        with self._lock:
            self._ws.discard(client)
            self._notify()

    def _ws_identify(self, client, params):
        return {"connection_id": client.connection_id}

    def _ws_server_info(self, client, params):
        return self._server_info_result()

    def _ws_printer_info(self, client, params):
        return self._printer_info_result()

    def _ws_subscribe(self, client, params):
        objects = params.get("objects") if isinstance(params, dict) else None
        if not isinstance(objects, dict):
            raise MoonrakerError(400, "Invalid argument for 'objects'")
        client.subscription = dict(objects)
        return self._query_result(objects)

    def _ws_query(self, client, params):
        objects = params.get("objects") if isinstance(params, dict) else None
        if not isinstance(objects, dict):
            raise MoonrakerError(400, "Invalid argument for 'objects'")
        return self._query_result(objects)


STATE_SETTERS = {
    "standby": PrinterSimulator._set_standby,
    "printing": PrinterSimulator._set_printing,
    "paused": PrinterSimulator._set_paused,
    "complete": lambda sim: sim._finish_job("complete"),
    "cancelled": lambda sim: sim._finish_job("cancelled"),
    "error": lambda sim: sim._finish_job("error"),
}
HISTORY_STATUS = {"complete": "completed", "cancelled": "cancelled", "error": "error"}
GCODE_HANDLERS = {
    "G28": PrinterSimulator._gcode_home,
    "M104": PrinterSimulator._gcode_m_temperature, "M109": PrinterSimulator._gcode_m_temperature,
    "M140": PrinterSimulator._gcode_m_temperature, "M190": PrinterSimulator._gcode_m_temperature,
    "M105": PrinterSimulator._gcode_report_temperatures,
    "M114": PrinterSimulator._gcode_report_position,
    "M118": PrinterSimulator._gcode_echo, "RESPOND": PrinterSimulator._gcode_echo,
    "SET_HEATER_TEMPERATURE": PrinterSimulator._gcode_set_heater,
    "TURN_OFF_HEATERS": PrinterSimulator._gcode_heaters_off,
    "M112": PrinterSimulator._gcode_emergency_stop,
}


def valid_relative_path(name):
    parts = name.split("/")
    return (bool(name) and not name.startswith("/") and "\\" not in name and "\x00" not in name
            and all(p not in ("", ".", "..") and len(p.encode()) <= 255 for p in parts))


def _log_request(handler):
    if VERBOSE:
        sys.stderr.write("printer: %d %s %s\n" % (
            handler.get_status(), handler.request.method, handler.request.uri))


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description="Moonraker look-alike printer simulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7125)
    parser.add_argument("--ui-port", type=int, default=8081)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--print-seconds", type=float, default=30.0)
    args = parser.parse_args(argv)
    sim = PrinterSimulator(args.host, args.port, args.ui_port, args.api_key, args.print_seconds)
    sim.add_file("benchy.gcode")
    return serve_until_signalled(sim, lambda: "printer simulator: api %s  ui %s  websocket %s" % (
        sim.url, sim.ui_url, sim.ws_url))


if __name__ == "__main__":
    sys.exit(main())
