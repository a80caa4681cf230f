#!/usr/bin/env python3
"""printer-connector: bridges a Klipper printer's Moonraker API to the cloud.

One self-contained file (Python 3.8+; needs click and websocket-client, and
requests for peers behind a proxy).
It pairs once with a token, then keeps four loops running side by side:
heartbeats, command polling, status snapshots, and webcam requests (the
polls are held by a cloud that supports long-poll); polled commands run on
two lanes beside the polling, so a pause or cancel never waits behind a
backup or an upload, and an emergency stop runs at once. One more thread per
printer watches Moonraker's websocket so that a change of print state
reaches the cloud within about a second. Command results and
snapshots that cannot be delivered are kept on disk until the cloud takes
them, and every command id is recorded before it runs, so a command is never
run twice. The wire contract is docs/PROTOCOL.md (cloud API and Moonraker).

Sections, in dependency order (each uses only those before it): constants,
errors, bounded JSON, unsafe text, config, logging, large transfers, HTTP,
Moonraker client, cloud client, loops, durable state, actions, snapshots,
commands, webcam, status watcher, pairing, agent, doctor, installer, CLI.
"""

import base64
import binascii
import collections
import datetime
import errno
import hashlib
import heapq
import http.client
import ipaddress
import json
import math
import os
import random
import re
import select
import signal
import socket
import ssl
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple
from urllib.parse import quote, urlencode, urljoin, urlsplit

import click
import websocket

# Imported where they are used instead, to keep an idle connector's memory
# low (bench/README.md, RSS): requests and urllib3 (only behind a proxy),
# urllib.request (only when a *_proxy variable is set), certifi (once, for the
# TLS context), tarfile and shutil (backups and the doctor; they pull in the
# compression modules), traceback (after a crash), and what only the doctor
# or the backup's home look-up needs (subprocess, email.utils, pwd).

__version__ = "0.1.0"

# --------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------
# Defaults come from docs/PROTOCOL.md; limits keep a misbehaving peer from
# exhausting the memory of a 200 MB printer.

DEFAULT_CLOUD_URL = "https://www.spoolr.io"
DEFAULT_STATE_DIR = "/var/lib/printer-connector"
DEFAULT_MOONRAKER_URL = "http://127.0.0.1:7125"
DEFAULT_INTERVALS = {
    "poll_commands_seconds": 3.0,
    "push_snapshots_seconds": 30.0,
    "heartbeat_seconds": 10.0,
    "poll_webcam_seconds": 2.0,  # docs/PROTOCOL.md 1.6: the cloud expects about every 2 s
    # While no printer has a camera that answers, a webcam request cannot be
    # answered anyway: polling for them every 2 s would only cost bytes.
    "poll_webcam_no_camera_seconds": 30.0,
    # While the cloud holds the command poll (extension long_poll) it sees the
    # connector through that poll: heartbeats then come at most this often,
    # still twice a minute for the cloud's ~60 s offline mark.
    "heartbeat_held_seconds": 30.0,
}
# The range a polling interval from the register answer must be in, or the
# configured one is kept: faster would be a busy loop, slower than a day is
# no polling (and a wait of 1e300 s overflows).
MIN_POLL_SECONDS = 0.1
MAX_POLL_SECONDS = 24 * 3600.0
CAMERA_RECHECK_SECONDS = 300.0  # how often to look again for a camera that did not answer
WEBCAM_REQUEST_MAX_AGE = 30.0
WEBCAM_MAX_BYTES = 10 * 1024 * 1024
MAX_JSON_BODY = 4 * 1024 * 1024
# A commands answer is read whatever its size up to this (its long strings
# go to disk while there is room, see Large transfers), so that every command
# in it is named and completed; files larger than this go by `url`.
MAX_COMMANDS_BODY = 2 * 1024 * 1024 * 1024
READ_CHUNK = 64 * 1024
COMMANDS_PER_POLL = 20
WEBCAM_REQUESTS_PER_POLL = 10
SNAPSHOT_BATCH = 50



class ExchangeLimits(NamedTuple):
    connect: float  # the TCP connect, its name lookup included (HTTP, resolve)
    read: float  # the longest wait for a byte
    deadline: Optional[float]  # the whole exchange on the wall clock; None: by size


# How long each kind of exchange may take: the one table (exchange_limits,
# HTTP section, reads it). A read timeout bounds each wait for a byte, not
# the exchange: a peer that trickles a byte at a time never trips it, so
# every exchange has a wall-clock deadline too. A held poll adds its hold to
# both; a transfer's deadline is TRANSFER_BASE_SECONDS plus its size at
# MIN_TRANSFER_RATE (transfer_deadline): the size we send, or, for a body
# read into a file, what has arrived so far (read_body), never what the
# peer declares. A call that names no kind gets
# "call"'s, or connect + read when its own timeouts are longer.
EXCHANGES = {
    "call": ExchangeLimits(5.0, 15.0, 30.0),  # an API call of the cloud or Moonraker not named below
    "probe": ExchangeLimits(3.0, 3.0, 30.0),  # a quick look at Moonraker: server info, the webcam list
    # The cloud may take its time to create a connector; register is not retried blindly.
    "register": ExchangeLimits(5.0, 60.0, 65.0),
    "held_poll": ExchangeLimits(5.0, 15.0, 20.0),  # commands and webcam polls, plus the hold they ask for
    # Klipper answers a print control only once it has run it, after the
    # G-code running now (a heat-up: minutes): the read timeout is how long a
    # command waits for that answer (Actions, "Print control", says what then).
    "print_control": ExchangeLimits(5.0, 10.0, 30.0),
    "homing": ExchangeLimits(5.0, 60.0, 65.0),
    "gcode": ExchangeLimits(5.0, 600.0, 605.0),  # a script may heat up (M109) or home
    "webcam_fetch": ExchangeLimits(5.0, 10.0, 10.0),  # a camera on this host or LAN answers in well under a second
    "webcam_upload": ExchangeLimits(5.0, 60.0, None),
    "transfer": ExchangeLimits(5.0, 300.0, None),  # a file or a backup, either way (Moonraker takes its time)
    "websocket_handshake": ExchangeLimits(5.0, 5.0, 15.0),  # connect, TLS, the upgrade
    "installer_question": ExchangeLimits(5.0, 5.0, 10.0),  # `installer moonraker-ok` and the like: an installer waits
}
TRANSFER_BASE_SECONDS = 60.0  # a transfer's handshakes and the peer's work
MIN_TRANSFER_RATE = 50 * 1024  # bytes per second
CONNECT_TIMEOUT = EXCHANGES["call"].connect
READ_TIMEOUT = EXCHANGES["call"].read

BACKOFF_BASE = 1.0
BACKOFF_CAP = 60.0
CREDENTIALS_RETRY_SECONDS = 120.0
SHUTDOWN_GRACE = 4.0
FALLBACK_STATUS_POLL_SECONDS = 1.0
WEBSOCKET_FRESH_SECONDS = 3.0
WEBSOCKET_RECEIVE_TIMEOUT = 60.0  # the subscription's idle wait, not an exchange: interrupt() ends it
# What one websocket message from Moonraker may be. The watcher subscribes
# to print_stats.state only; the largest message it meets is a job's history
# entry or an announcement, a few kB. websocket-client itself takes a frame
# of any length its header claims, in memory, twice.
WEBSOCKET_MESSAGE_MAX_BYTES = 1024 * 1024
# What the answer to the websocket upgrade may be (Moonraker's is ~200
# bytes): websocket-client reads it a byte at a time into a list, some 40
# bytes of memory a byte, with no bound of its own (334 MiB in the 15 s of
# the handshake's deadline from a header line that never ends).
WEBSOCKET_HANDSHAKE_MAX_BYTES = 16 * 1024
FAILURE_SUMMARY_SECONDS = 300.0

# The objects every snapshot carries; a printer without one simply omits it.
STATUS_OBJECTS = ("print_stats", "virtual_sdcard", "extruder", "heater_bed",
                  "toolhead", "pause_resume")

# Durable state bounds: completions are never dropped; snapshots are, oldest
# first, past these (config keys outbox_max_snapshots and outbox_max_bytes).
# 10 000 snapshots is about 3.5 days at the default 30 s; a K1's /usr/data
# has room for 16 MB many times over. The outbox is kept in SPILL_SEGMENTS
# segments, so that dropping the oldest costs an unlink, not a rewrite.
SPILL_MAX_SNAPSHOTS = 10000
SPILL_MAX_BYTES = 16 * 1024 * 1024
SPILL_SEGMENTS = 8
SNAPSHOT_REFUSALS = 3  # a record the cloud refuses this often (4xx) is set aside
SNAPSHOT_REFUSED_MAX_BYTES = 256 * 1024
# The ledger: a completion is kept whole until the cloud has it, each at most
# what a Moonraker answer can be, all of them at most twice that; afterwards
# a re-delivered id needs only its status, so the newest 5000 ids cost about
# 1 MB. A record longer than STATE_RECORD_MAX_BYTES cannot be ours.
COMPLETION_MAX_BYTES = MAX_JSON_BODY
LEDGER_PENDING_MAX_BYTES = 2 * MAX_JSON_BODY
ACKED_COMPLETION_MAX_BYTES = 256  # kept whole after the ack when no larger (a pause's is 60)
LEDGER_ACKED_MAX_BYTES = 2 * 1024 * 1024
LEDGER_SLACK_BYTES = 256 * 1024
LEDGER_KEEP_SECONDS = 7 * 24 * 3600
LEDGER_MAX_ENTRIES = 5000
STATE_RECORD_MAX_BYTES = COMPLETION_MAX_BYTES + 64 * 1024
CONFIG_MAX_BYTES = 1024 * 1024
# What a command from the cloud may be before it is refused at the door.
COMMAND_ID_MAX_CHARS = 128
ACTION_MAX_CHARS = 64

# The protocol extensions this connector speaks (docs/PROTOCOL.md,
# "Extensions"), sent as "capabilities" in register and every heartbeat so a
# cloud knows what it may send. An extension a config switches off is left out.
CAPABILITIES = (
    "upload_url",           # upload_file takes url, size, sha256 and start
    "idempotent_register",  # register sends an Idempotency-Key
    "control_lane",         # print controls and emergency_stop do not wait behind long commands
    "long_poll",            # ?wait=N on the commands and webcam polls, X-Poll-Wait in the answer
    "gcode",                # action gcode {script}; left out when allow_gcode is false
    "list_macros",          # action list_macros
    "set_temperature",      # action set_temperature {heater, target}
    "emergency_stop",       # action emergency_stop
    "print_state",          # print controls report state, pending, homed_axes; fail at once when they cannot apply
    "capabilities_ack",     # X-Capabilities in the heartbeat answer: this list is sent until acknowledged
    "quiet_snapshots",      # X-Snapshot-Keepalive in the batch answer: an unchanged status is pushed that seldom
)
# capabilities_ack: the cloud answers every heartbeat with the digest of the
# list it holds for this connector; the list goes out again whenever that is
# not the digest of ours (the cloud forgot it, or ours changed).
CAPABILITIES_HEADER = "X-Capabilities"
# quiet_snapshots: a cloud that names a keepalive gets a periodic snapshot
# only when its status says something new (SNAPSHOT_CLOCKS aside, and a
# temperature within QUIET_TEMPERATURE_DELTA of the one last pushed counts as
# the same: an idle thermistor's noise), or when that many seconds (at most
# SNAPSHOT_KEEPALIVE_MAX) passed since the last.
SNAPSHOT_KEEPALIVE_HEADER = "X-Snapshot-Keepalive"
SNAPSHOT_KEEPALIVE_MAX = 3600.0
SNAPSHOT_CLOCKS = frozenset({"eventtime", "estimated_print_time"})  # advance with time, say nothing
QUIET_TEMPERATURE_DELTA = 1.0

# Long-poll (extension "long_poll"): the polls ask the cloud to hold an empty
# answer this long; a cloud that does says so in X-Poll-Wait.
LONG_POLL_WAIT_SECONDS = 25
POLL_WAIT_HEADER = "X-Poll-Wait"

# Without long-poll, polling relaxes to these intervals (within PROTOCOL.md's
# 3-5 s for commands and well inside the cloud's ~30 s webcam request expiry)
# while no printer prints and nothing was asked for idle_after_seconds.
IDLE_AFTER_SECONDS = 300.0
IDLE_POLL_SECONDS = {"poll_commands_seconds": 5.0, "poll_webcam_seconds": 5.0}
BUSY_PRINT_STATES = frozenset({"printing", "paused"})

# The gcode action: what a cloud may send, and what we keep of the console.
GCODE_SCRIPT_MAX_BYTES = 16 * 1024
CONSOLE_MAX_LINES = 200
CONSOLE_MAX_BYTES = 32 * 1024
CONSOLE_SETTLE_SECONDS = 1.0  # at most this long for the websocket to catch up with a script's answer
MACROS_MAX = 1000

BACKUP_FOLDERS = ("config", "database", "gcodes", "logs")
# Moonraker's [secrets] file may have any name; these are the usual ones.
BACKUP_SECRET_NAMES = frozenset({"moonraker.secrets", "moonraker_secrets.ini", ".moonraker.uuid",
                                 "printer-connector.json", "connector.json"})
BACKUP_SECRET_SUFFIXES = (".secrets", "secrets.ini", "secrets.json")
K1_PRINTER_DATA = "/usr/data/printer_data"

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_PAIRING_REJECTED = 0, 1, 2, 3


# The Idempotency-Key of register (docs/PROTOCOL.md, Extensions) is stored in
# the config before the first attempt, so that a retry, and a run after a
# kill -9 with the answer in flight, send the same one; it is dropped with the
# token once paired or refused.
PAIRING_KEY_FIELD = "pairing_idempotency_key"


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------
# Every failure the program tells apart has a type here, so that callers
# catch by kind, never by the text of a message; the exit code and the log
# line follow from the type. No state.


class ConnectorError(Exception):
    """Base of every error this program raises on purpose."""


class ConfigError(ConnectorError):
    """The config file is missing, malformed or invalid (exit 2)."""


class HttpError(ConnectorError):
    """Every failed HTTP exchange. `status` is the peer's answer code, None
    when it gave no usable answer. The subclasses say what went wrong; they
    are raised from the low-level exceptions of both transports in one place
    (`http_error_of`, HTTP section). `connected`: False when the exchange
    failed before a connection to the peer was made (its name unknown or
    not looked up in time, the connect refused or timed out), so that
    nothing of the request can have reached it."""

    connected = True

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


class HttpStatusError(HttpError):
    """The peer answered, with a status other than 2xx."""

    def __init__(self, message, response):
        super().__init__(message, response.status)
        self.response = response


class TransportError(HttpError):
    """No usable answer: refused, reset, unknown host, closed early, not HTTP."""


class ExchangeTimeout(TransportError):
    """The connect or read timeout, or the exchange's deadline, passed."""


class AnswerTimeout(ExchangeTimeout):
    """The request went out and no answer came within the read timeout: the
    peer may still act on it (Klipper runs a queued pause later)."""


class TlsError(TransportError):
    """The peer's TLS certificate or handshake failed."""


class DestinationRefused(HttpError):
    """A URL from the cloud that leads where this connector must not send or
    fetch (a printer's own Moonraker or web UI); nothing was sent."""


class BadResponse(HttpError):
    """An answer we refuse: not JSON, or not the shape the protocol says."""


class ResponseTooLarge(BadResponse):
    """An answer body over the cap for that call."""


class CredentialsRejected(ConnectorError):
    """The cloud answered 401 to our connector secret."""


class PairingRejected(ConnectorError):
    """The cloud refused the pairing token, or its answer cannot be used;
    retrying cannot help (exit 3). `summary` is the line the owner reads."""

    summary = "Pairing rejected: the pairing token is invalid or already used; get a new one"

    def __init__(self, message, summary=None):
        super().__init__(message)
        if summary:
            self.summary = summary


class CommandFailed(ConnectorError):
    """A command failed; the message goes to the cloud as error_message."""

    def __init__(self, message, result=None):
        super().__init__(message)
        self.result = result or {}


class StateDirError(ConnectorError):
    """state_dir cannot be written."""


# --------------------------------------------------------------------------
# Bounded JSON
# --------------------------------------------------------------------------
# Every JSON text from outside (the cloud, Moonraker, state files) is decoded
# here. A structure some 990 levels deep decodes, but then breaks whatever
# walks it recursively (json.dumps, repr, ==) with RecursionError; written to
# the ledger it would break every later start. No real answer nests deeper
# than a dozen levels, so anything past MAX_JSON_DEPTH is refused at the door,
# as are NaN and Infinity, which are not JSON and which the cloud cannot read
# back (nor the next start, from the ledger), and numbers like 1e400 that
# decode to them. Memory is bounded the same way: 4 MB of `[{},{},...]`
# decodes into 1.4 million objects, some 170 MB, where a real answer of that
# size costs 10; so a text holding more than MAX_JSON_CONTAINERS objects and
# arrays (counted as brackets, before decoding) is refused too. A real 4 MB
# files list holds some 40 000; 100 000 small objects cost about 14 MB.

MAX_JSON_DEPTH = 64
# A peer's answer is stored wrapped in a few levels (a ledger record holds
# the completion, its result, then the answer), so it gets fewer: what we
# write must be what the next start can read.
PEER_JSON_DEPTH = MAX_JSON_DEPTH - 8
MAX_JSON_CONTAINERS = 100000


class BadJson(ValueError):
    """A text that is not JSON, or JSON this program refuses to hold."""


def _refuse_constant(name: str):
    raise BadJson("%s is not a JSON value" % name)


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400 decodes to inf, which json.dumps writes as Infinity
        raise BadJson("%s is too large for a JSON number" % text[:20])
    return value


# One decoder: json.loads(**kw) builds one per call.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)


def json_deeper_than(value: Any, limit: int) -> bool:
    """Whether containers nest more than `limit` levels, found without recursion."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False


def decode_json(data, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """json.loads for untrusted bytes or text; BadJson for anything refused."""
    try:
        if isinstance(data, (bytes, bytearray)):
            data = data.decode(json.detect_encoding(data), "surrogatepass")
        if data.count("{") + data.count("[") > MAX_JSON_CONTAINERS:  # brackets in strings count too: a bound
            raise BadJson("JSON of more than %d objects and arrays" % MAX_JSON_CONTAINERS)
        value = _DECODER.decode(data)
    except RecursionError:
        raise BadJson("JSON nested too deeply") from None
    except BadJson:
        raise
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, the 3.11 int digits limit
        raise BadJson(str(exc)) from None
    if json_deeper_than(value, max_depth):
        raise BadJson("JSON nested deeper than %d levels" % max_depth)
    return value


# --------------------------------------------------------------------------
# Unsafe text
# --------------------------------------------------------------------------
# Text from peers (ids, file names, error messages, versions) is shown in log
# lines, in the doctor's report and in config errors. Some characters can end
# a line or drive the terminal that shows it, so a peer could forge a line or
# hide one; they are found here, and escaped wherever such text is shown.

# C0 and C1 controls (CR, LF, ESC, VT, FF, NUL...), DEL, U+2028 and U+2029
# (Unicode's Cc, Zl and Zp): each can end a line in some log viewer or
# terminal. The bidirectional overrides and isolates reorder what a reader
# sees (a line can be made to look like another), so they go too, and so do
# unpaired surrogates (JSON's "\ud800"), which no UTF-8 stream can write.
_UNSAFE = "\x00-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff"
UNSAFE_CHARACTER = re.compile("[%s]" % _UNSAFE)
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", '"': '\\"', "\\": "\\\\"}


def _escape_character(match) -> str:
    char = match.group()
    return _ESCAPES.get(char) or "\\u%04x" % ord(char)


def escape_unsafe(text: str) -> str:
    """Text from outside, made safe to show on one line of a terminal."""
    return UNSAFE_CHARACTER.sub(_escape_character, text)


def credential_problem(value: str) -> Optional[str]:
    """Why a credential cannot be used safely, or None: one with a control
    character would break the header it goes into and could not be redacted
    from a log line reliably."""
    found = UNSAFE_CHARACTER.search(value)
    if found:
        return "contains the character U+%04X (a control, line-separator or formatting one)" % ord(found.group())
    return None


def unsafe_credential(credentials: Dict[str, str]) -> Optional[str]:
    """The first of the named credentials that cannot be used, and why; None
    when all can (pairing checks what the cloud issued with it)."""
    for name, value in credentials.items():
        problem = credential_problem(value)
        if problem:
            return "%s %s" % (name, problem)
    return None


# --------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------
# The file is JSON (docs/PROTOCOL.md section 3). Validation names the file and the
# field in one line. The raw dict is kept so that keys we do not know survive
# a rewrite; rewrites are atomic and 0600 because the file holds the secret.


@dataclass
class PrinterConfig:
    base_url: str
    printer_id: int = 0
    name: str = ""
    ui_port: int = 80
    api_key: Optional[str] = None

    @property
    def host(self) -> str:
        return urlsplit(self.base_url).hostname or "127.0.0.1"


@dataclass
class Config:
    path: str
    cloud_url: str
    moonraker: List[PrinterConfig]
    pairing_token: Optional[str] = None
    connector_id: Optional[str] = None
    connector_secret: Optional[str] = None
    site_name: Optional[str] = None
    poll_commands_seconds: float = DEFAULT_INTERVALS["poll_commands_seconds"]
    push_snapshots_seconds: float = DEFAULT_INTERVALS["push_snapshots_seconds"]
    heartbeat_seconds: float = DEFAULT_INTERVALS["heartbeat_seconds"]
    poll_webcam_seconds: float = DEFAULT_INTERVALS["poll_webcam_seconds"]
    poll_webcam_no_camera_seconds: float = DEFAULT_INTERVALS["poll_webcam_no_camera_seconds"]
    heartbeat_held_seconds: float = DEFAULT_INTERVALS["heartbeat_held_seconds"]
    state_dir: str = DEFAULT_STATE_DIR
    outbox_max_snapshots: int = SPILL_MAX_SNAPSHOTS
    outbox_max_bytes: int = SPILL_MAX_BYTES
    printer_data_root: Optional[str] = None
    allow_gcode: bool = True
    idle_after_seconds: float = IDLE_AFTER_SECONDS
    # (host, port or None for any) a transfer URL may reach at a private address
    transfer_allow_hosts: List[Tuple[str, Optional[int]]] = field(default_factory=list)
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def paired(self) -> bool:
        return bool(self.connector_secret)

    def printer(self, printer_id) -> Optional[PrinterConfig]:
        for printer in self.moonraker:
            if printer.printer_id and printer.printer_id == printer_id:
                return printer
        return None

    def active_printers(self) -> List[PrinterConfig]:
        return [p for p in self.moonraker if p.printer_id > 0]

    def secrets(self) -> List[str]:
        keys = [p.api_key for p in self.moonraker]
        return [s for s in [self.connector_secret, self.pairing_token] + keys if s]

    def capabilities(self) -> List[str]:
        return [name for name in CAPABILITIES if name != "gcode" or self.allow_gcode]


def capabilities_digest(names: List[str]) -> str:
    """What a cloud that speaks capabilities_ack answers for this list: the
    first 16 hex digits of the SHA-256 of the names, sorted, joined by commas."""
    return hashlib.sha256(",".join(sorted(names)).encode("utf-8")).hexdigest()[:16]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_http_url(value) -> bool:
    if not isinstance(value, str):
        return False
    try:
        parts = urlsplit(value)
        return parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # "http://[x": not a URL
        return False


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_str(value) -> bool:
    return isinstance(value, str)


def _is_credential(value) -> bool:
    return isinstance(value, str) and not UNSAFE_CHARACTER.search(value)


_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\Z")


def parse_host_port(value) -> Optional[Tuple[str, Optional[int]]]:
    """("host", port or None) of "host", "host:port" or "[v6]:port"; None
    when value is not one of those."""
    if not isinstance(value, str) or not value or UNSAFE_CHARACTER.search(value) or any(c in value for c in "/?#@ "):
        return None
    try:
        parts = urlsplit("//" + value)
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is no number, "[x"
        return None
    host = (host or "").lower().rstrip(".")
    if not host or (port is not None and not 0 < port < 65536):
        return None  # "." names no host
    if not _HOST_NAME.match(host):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return None  # "*.lan": no patterns, a host is named as it is
    return host, port


def _is_host_list(value) -> bool:
    return isinstance(value, list) and len(value) <= 256 and all(parse_host_port(v) for v in value)


def _is_plain_folder(value) -> bool:
    """An absolute path as written, without "." or ".." segments."""
    return (isinstance(value, str) and value.startswith("/") and not UNSAFE_CHARACTER.search(value)
            and os.path.normpath(value) == (value.rstrip("/") or "/"))


class _Fields:
    """Checked access to one JSON object; errors name the file and the field."""

    def __init__(self, path, data, prefix=""):
        self.path, self.data, self.prefix = path, data, prefix

    def fail(self, key, message):
        raise ConfigError("%s: %s%s: %s" % (self.path, self.prefix, key, message))

    def get(self, key, valid, default=None, what="valid", secret=False):
        if self.data.get(key) is None:
            return default
        value = self.data[key]
        if not valid(value):
            got = "" if secret else ", got %s" % escape_unsafe(json.dumps(value)[:60])
            self.fail(key, "must be %s%s" % (what, got))
        return value


def _parse_printer(path, index, data) -> PrinterConfig:
    if not isinstance(data, dict):
        raise ConfigError("%s: moonraker[%d]: must be an object" % (path, index))
    f = _Fields(path, data, "moonraker[%d]." % index)
    return PrinterConfig(
        base_url=f.get("base_url", _is_http_url, DEFAULT_MOONRAKER_URL, "an http(s) URL").rstrip("/"),
        printer_id=f.get("printer_id", lambda v: _is_int(v) and v >= 0, 0, "an integer >= 0"),
        name=f.get("name", _is_str, "", "a string"),
        ui_port=f.get("ui_port", lambda v: _is_int(v) and 0 < v < 65536, 80, "a port number"),
        api_key=f.get("api_key", _is_credential, None, "a string without control characters", secret=True) or None,
    )


def _check_pairing_fields(config: Config) -> None:
    credentials = config.connector_secret is not None or config.connector_id is not None
    if config.pairing_token and credentials:
        raise ConfigError("%s: pairing_token: set together with connector credentials; "
                          "remove pairing_token (already paired) or the credentials (to pair again)"
                          % config.path)
    if not config.pairing_token and not credentials:
        raise ConfigError("%s: pairing_token: missing; a new connector needs a pairing token "
                          "(or connector_id and connector_secret once paired)" % config.path)
    if credentials and not (config.connector_secret and config.connector_id):
        missing = "connector_secret" if not config.connector_secret else "connector_id"
        raise ConfigError("%s: %s: missing; a paired config needs both connector_id and "
                          "connector_secret" % (config.path, missing))


def parse_config(path: str, data: Any, environ=os.environ) -> Config:
    if not isinstance(data, dict):
        raise ConfigError("%s: the top level must be a JSON object" % path)
    f = _Fields(path, data)
    cloud_url = environ.get("CLOUD_URL") or f.get("cloud_url", _is_str, DEFAULT_CLOUD_URL, "a string")
    if not _is_http_url(cloud_url):
        source = "CLOUD_URL (environment)" if environ.get("CLOUD_URL") else "cloud_url"
        raise ConfigError("%s: %s: must be an http(s) URL, got %s" % (path, source, json.dumps(cloud_url)))
    printers = data.get("moonraker")
    if not isinstance(printers, list) or not printers:
        f.fail("moonraker", "must be a non-empty list of printers")
    intervals = {key: float(f.get(key, lambda v: _is_number(v) and v > 0, default, "a number of seconds > 0"))
                 for key, default in DEFAULT_INTERVALS.items()}
    connector_id = f.get("connector_id", lambda v: _is_str(v) or _is_int(v), None, "a string or a number")
    config = Config(
        path=path,
        cloud_url=cloud_url.rstrip("/"),
        moonraker=[_parse_printer(path, i, p) for i, p in enumerate(printers)],
        pairing_token=f.get("pairing_token", _is_credential, None, "a string without control characters",
                            secret=True) or None,
        connector_id=None if connector_id is None else str(connector_id),
        connector_secret=f.get("connector_secret", _is_credential, None, "a string without control characters",
                               secret=True) or None,
        site_name=f.get("site_name", _is_str, None, "a string"),
        state_dir=f.get("state_dir", lambda v: _is_str(v) and bool(v), DEFAULT_STATE_DIR, "a folder path"),
        outbox_max_snapshots=f.get("outbox_max_snapshots", lambda v: _is_int(v) and v > 0, SPILL_MAX_SNAPSHOTS,
                                   "an integer > 0"),
        outbox_max_bytes=f.get("outbox_max_bytes", lambda v: _is_int(v) and v >= 4096, SPILL_MAX_BYTES,
                               "an integer >= 4096"),
        printer_data_root=f.get("printer_data_root", _is_plain_folder, None,
                                "an absolute folder path without '.' or '..' segments"),
        allow_gcode=f.get("allow_gcode", lambda v: isinstance(v, bool), True, "true or false"),
        idle_after_seconds=float(f.get("idle_after_seconds", lambda v: _is_number(v) and v >= 0, IDLE_AFTER_SECONDS,
                                       "a number of seconds >= 0 (0: never relax)")),
        transfer_allow_hosts=[parse_host_port(v) for v in f.get(
            "transfer_allow_hosts", _is_host_list, [], 'a list of "host" or "host:port" strings')],
        raw=data,
        **intervals,
    )
    _check_pairing_fields(config)
    return config


def load_config(path: str, environ=os.environ) -> Config:
    """The config, read without following a link: a linked config would have
    its target's mode changed and be replaced by a copy on the next save."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ConfigError("%s: config file not found" % path) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError("%s: is a symbolic link; refusing to follow it (give --config the real file)"
                              % path) from None
        raise ConfigError("%s: cannot read config file: %s" % (path, exc.strerror or exc)) from None
    try:
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise ConfigError("%s: not a regular file" % path)
            data = handle.read(CONFIG_MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError("%s: cannot read config file: %s" % (path, exc.strerror or exc)) from None
    if len(data) > CONFIG_MAX_BYTES:
        raise ConfigError("%s: config file larger than %d bytes" % (path, CONFIG_MAX_BYTES))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("%s: cannot read config file: not UTF-8 (%s)" % (path, exc.reason)) from None
    try:
        json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        pass  # decode_json says so below
    except ValueError as exc:
        where = "line %d, column %d: %s" % (exc.lineno, exc.colno, exc.msg) if hasattr(exc, "lineno") else exc
        raise ConfigError("%s: invalid JSON at %s" % (path, where)) from None
    try:
        return parse_config(path, decode_json(text), environ)
    except BadJson as exc:
        raise ConfigError("%s: invalid JSON: %s" % (path, exc)) from None


def tighten_config_mode(path: str) -> bool:
    """Make a group/world-readable config 0600; True when it had to. Through
    a descriptor opened without following links, so never a link's target."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) and info.st_mode & 0o077:
            os.fchmod(fd, 0o600)
            return True
    except OSError:
        pass
    finally:
        os.close(fd)
    return False


def fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def create_temp_file(folder: str, prefix: str, suffix: str = "") -> Tuple[int, str]:
    """A new file of ours (0600) in `folder`: mkstemp without tempfile, whose
    imports cost the steady state 0.7 MB."""
    while True:
        path = os.path.join(folder, "%s%s%s" % (prefix, binascii.hexlify(os.urandom(6)).decode("ascii"), suffix))
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600), path
        except FileExistsError:
            continue


def atomic_write(path: str, data: bytes, mode: int = 0o600) -> None:
    """Temp file in the same folder, fsync, rename, fsync the folder."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        owner = os.lstat(path)  # a link's target is not ours to take after
    except OSError:
        owner = None
    if owner is not None and not stat.S_ISREG(owner.st_mode):
        owner = None
    fd, tmp = create_temp_file(folder, ".%s." % os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            if owner is not None and os.getuid() == 0:
                os.fchown(handle.fileno(), owner.st_uid, owner.st_gid)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(folder)


def save_config(config: Config) -> None:
    """Write the paired state back, keeping every key we do not know."""
    raw = dict(config.raw)
    raw.pop("pairing_token", None)
    raw.pop(PAIRING_KEY_FIELD, None)  # used up with the token
    raw["connector_id"] = config.connector_id
    raw["connector_secret"] = config.connector_secret
    for key, default in DEFAULT_INTERVALS.items():
        value = getattr(config, key)
        if value != raw.get(key, default):  # adopted from the cloud at pairing
            raw[key] = int(value) if float(value).is_integer() else value
    entries = list(raw.get("moonraker") or [])
    for index, printer in enumerate(config.moonraker):
        entry = dict(entries[index]) if index < len(entries) and isinstance(entries[index], dict) else {}
        entry["printer_id"] = printer.printer_id
        entries[index:index + 1] = [entry]
    raw["moonraker"] = entries
    atomic_write(config.path, (json.dumps(raw, indent=2) + "\n").encode("utf-8"))
    config.raw = raw


# --------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------
# logfmt lines on stdout (journald and the K1's log file catch them). Values
# come from peers (ids, file names, error messages), so every character that
# could end a line or drive a terminal is escaped: one call is one line, and
# no peer can forge a line or hide one. Every value passes through a
# redactor that knows the current secrets (connector secret, pairing token,
# Moonraker api_key) before it is escaped, so none can appear at any level,
# whatever characters it holds. A failure that repeats is logged once, then
# summarised.

LEVELS = {"debug": 10, "info": 20, "warn": 30, "warning": 30, "error": 40}
LEVEL_NAMES = {10: "DEBUG", 20: "INFO", 30: "WARN", 40: "ERROR"}

# Shorter strings are not treated as secrets: replacing "e" everywhere would
# garble every line and hide nothing (a real secret is 24 characters or more).
MIN_SECRET_LENGTH = 8
REDACTED = "[redacted]"
MAX_LOG_VALUE_CHARS = 1000
_NEEDS_QUOTES = re.compile('[ "=\\\\%s]' % _UNSAFE)
_ESCAPED_IN_QUOTES = re.compile('["\\\\%s]' % _UNSAFE)


def _logfmt_value(text: str) -> str:
    if text and not _NEEDS_QUOTES.search(text):
        return text
    return '"%s"' % _ESCAPED_IN_QUOTES.sub(_escape_character, text)


class Logger:
    def __init__(self, level="info", stream=None):
        self.level = LEVELS[level]
        self.stream = stream or sys.stdout
        self.secrets = []  # type: List[str]  # longest first, so a secret inside another is not half-redacted
        self.lock = threading.Lock()

    def add_secret(self, secret: Optional[str]) -> None:
        if secret and len(secret) >= MIN_SECRET_LENGTH and secret not in self.secrets:
            self.secrets = sorted(self.secrets + [secret], key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text

    def redact_tree(self, value: Any) -> Any:
        """A JSON value with every secret replaced in its strings, keys too
        (a completion before it is recorded and sent)."""
        if not self.secrets:
            return value
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, dict):
            return {self.redact(k) if isinstance(k, str) else k: self.redact_tree(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.redact_tree(item) for item in value]
        return value

    def _value(self, value) -> str:
        text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
        text = self.redact(text)
        if len(text) > MAX_LOG_VALUE_CHARS:  # a 4 MB action name from the cloud is not a 4 MB line
            text = "%s...(%d more characters)" % (text[:MAX_LOG_VALUE_CHARS], len(text) - MAX_LOG_VALUE_CHARS)
        return _logfmt_value(text)

    def enabled(self, level: int) -> bool:
        return level >= self.level

    def log(self, level: int, msg: str, **fields) -> None:
        if level < self.level:
            return
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
        parts = ["time=%sZ" % now[:-6], "level=%s" % LEVEL_NAMES[level], "msg=%s" % self._value(msg)]
        parts += ["%s=%s" % (key, self._value(value)) for key, value in fields.items() if value is not None]
        line = " ".join(parts)
        with self.lock:
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass  # a closed stdout must not take the agent down

    def debug(self, msg, **fields):
        self.log(10, msg, **fields)

    def info(self, msg, **fields):
        self.log(20, msg, **fields)

    def warn(self, msg, **fields):
        self.log(30, msg, **fields)

    def error(self, msg, **fields):
        self.log(40, msg, **fields)


def log_uncaught_exceptions(log: Logger) -> None:
    """A crash that no handler caught (a bug) becomes one escaped, redacted
    ERROR line; Python's default hooks would print the raw traceback, where
    a peer's text inside the exception could pose as log lines or carry a
    secret."""
    def crashed(exc_type, exc, trace, thread: str) -> None:
        import traceback  # only when something crashed
        frames = traceback.extract_tb(trace)[-3:]
        where = " < ".join("%s:%d %s" % (os.path.basename(f.filename), f.lineno, f.name) for f in reversed(frames))
        log.error("crashed", thread=thread, error="%s: %s" % (exc_type.__name__, exc), where=where)

    def in_thread(args) -> None:
        if not issubclass(args.exc_type, SystemExit):
            crashed(args.exc_type, args.exc_value, args.exc_traceback, args.thread.name if args.thread else "?")

    def in_main(exc_type, exc, trace) -> None:
        if issubclass(exc_type, KeyboardInterrupt):
            sys.__excepthook__(exc_type, exc, trace)
        else:
            crashed(exc_type, exc, trace, "main")

    threading.excepthook = in_thread
    sys.excepthook = in_main


class FailureTracker:
    """Logs the first of a run of identical failures, then a summary.

    One per loop: a cloud that is down for an hour gives a handful of lines,
    not a thousand, and the recovery says how long it lasted.
    """

    def __init__(self, log: Logger, name: str):
        self.log, self.name = log, name
        self.message = None  # type: Optional[str]
        self.count = 0
        self.since = 0.0
        self.last_summary = 0.0

    def failed(self, message: str, level: int = 30) -> None:
        now = time.monotonic()
        if message != self.message:
            self._summarise()
            self.message, self.count, self.since, self.last_summary = message, 1, now, now
            self.log.log(level, "%s failed" % self.name, error=message)
            return
        self.count += 1
        if now - self.last_summary >= FAILURE_SUMMARY_SECONDS:
            self._summarise()
            self.last_summary = now

    def _summarise(self) -> None:
        if self.message and self.count > 1:
            self.log.warn("%s still failing" % self.name, error=self.message, times=self.count)

    def succeeded(self) -> bool:
        """True when this success ends a run of failures."""
        if self.message is None:
            return False
        self.log.info("%s recovered" % self.name, failures=self.count,
                      seconds=round(time.monotonic() - self.since, 1))
        self.message, self.count = None, 0
        return True


# --------------------------------------------------------------------------
# Large transfers
# --------------------------------------------------------------------------
# A G-code file can be hundreds of megabytes, and a K1 has about 200 MB of
# RAM for everything, so no file body is ever held in memory. A command
# poll's answer is split as it arrives: its structure (small) stays in
# memory, every long string (the base64 of a file) goes to a file of its
# own, within the free disk. base64 is decoded a chunk at a time, and
# downloads and uploads go file to socket. stdlib scanning was chosen over
# json-stream and ijson by measurement (bench/json_split.py): it finds a
# long string's end with a memchr scan per chunk where those parse a
# character at a time in Python. The files live in state_dir (on disk: /tmp
# is RAM on a K1), all named TEMP_PREFIX..., so a start after a kill -9
# sweeps what the killed run left.

TEMP_PREFIX = ".transfer-"
LONG_STRING = 64 * 1024  # a JSON string longer than this is kept on disk
DISK_RESERVE = 64 * 1024 * 1024  # free space transfers leave alone (at most a tenth of the disk)
PROGRESS_QUIET_SECONDS = 5.0  # a transfer shorter than this logs nothing at info
PROGRESS_EVERY_SECONDS = 10.0


class TransferStopped(CommandFailed):
    """The connector is stopping: a transfer in progress gives up."""


def transfer_budget(folder: str) -> Tuple[int, int]:
    """(bytes a transfer may write in folder, bytes free there): the reserve
    keeps room for the ledger, the logs and Moonraker's copy of the file."""
    stats = os.statvfs(folder)
    free = stats.f_bavail * stats.f_frsize
    reserve = min(DISK_RESERVE, stats.f_blocks * stats.f_frsize // 10)
    return max(0, free - reserve), free


def too_large_message(what: str, size: int, folder: str) -> str:
    limit, free = transfer_budget(folder)
    return ("%s too large for this printer's free disk: %s bytes, limit %d bytes (%d bytes free in %s)"
            % (what, size, limit, free, folder))


def sweep_temp_files(folder: str) -> int:
    """Removes the transfer files a killed run left; returns how many."""
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    removed = 0
    for name in names:
        if name.startswith(TEMP_PREFIX):
            try:
                os.unlink(os.path.join(folder, name))
                removed += 1
            except OSError:
                pass
    return removed


def remove_file(path: Optional[str]) -> None:
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class TransferFile:
    """A temp file in state_dir for one transfer, removed however it ends."""

    def __init__(self, folder: str, kind: str):
        fd, self.path = create_temp_file(folder, TEMP_PREFIX, "." + kind)
        self.file = os.fdopen(fd, "w+b")

    def __enter__(self) -> "TransferFile":
        return self

    def __exit__(self, *_exc) -> None:
        self.file.close()
        remove_file(self.path)


class TransferProgress:
    """progress= for HttpClient.request: an info line every ~10 s or 10 %
    for a transfer that takes a while, none for a short one; on stop, the
    transfer gives up (TransferStopped)."""

    def __init__(self, log: Logger, what: str, total: Optional[int] = None,
                 stop: Optional[threading.Event] = None):
        self.log, self.what, self.total, self.stop = log, what, total, stop
        self.started = self.last = time.monotonic()
        self.next_percent = 10
        self.done = 0

    def __call__(self, done: int) -> None:
        self.done = done
        if self.stop is not None and self.stop.is_set():
            raise TransferStopped("%s interrupted: the connector is stopping" % self.what)
        now = time.monotonic()
        if now - self.started < PROGRESS_QUIET_SECONDS:
            return
        percent = 100 * done // self.total if self.total else None
        if now - self.last >= PROGRESS_EVERY_SECONDS or (percent is not None and percent >= self.next_percent):
            self.last = now
            if percent is not None:
                self.next_percent = percent // 10 * 10 + 10
            self.log.info("Transfer in progress", what=self.what, bytes=done, total=self.total, percent=percent,
                          kib_per_s=self.rate(now))

    def rate(self, now: float) -> int:
        return int(self.done / 1024.0 / max(now - self.started, 0.001))

    def finished(self, done: int) -> None:
        """The closing line: info after a long transfer, debug after a short
        one that moved a file's worth, none after a small answer."""
        self.done = done
        now = time.monotonic()
        level = 20 if now - self.started >= PROGRESS_QUIET_SECONDS else 10 if done > LONG_STRING else 0
        if level:
            self.log.log(level, "Transfer done", what=self.what, bytes=done, seconds=round(now - self.started, 1),
                         kib_per_s=self.rate(now))


def _escape_starts(data: bytes, at: int) -> bool:
    """Whether the backslash at data[at] starts an escape (is not the second of a "\\\\")."""
    run = at
    while run > 0 and data[run - 1] == 0x5C:
        run -= 1
    return (at - run) % 2 == 0


def _complete_escapes(data: bytes) -> int:
    """How much of data ends on a whole JSON escape (a surrogate pair is one)."""
    at = data.rfind(b"\\")
    if at < 0:
        return len(data)
    if not _escape_starts(data, at):  # an even run of backslashes: all of them "\\" pairs
        return len(data)
    need = 6 if data[at + 1:at + 2] == b"u" else 2
    if data[at + 1:at + 2] == b"u" and data[at + 2:at + 4].lower() in (b"d8", b"d9", b"da", b"db"):
        need = 12  # a high surrogate goes with the escape after it
    if len(data) - at >= need:
        return len(data)
    before = at - 6  # a high surrogate just before a cut-off low one goes with it
    if (before >= 0 and data[before:before + 2] == b"\\u" and _escape_starts(data, before)
            and data[before + 2:before + 4].lower() in (b"d8", b"d9", b"da", b"db")):
        return before
    return at


def _char_boundary(data: bytes, cut: int) -> int:
    """cut, moved back to the start of a UTF-8 sequence it would split."""
    lead = cut - 1
    while lead > max(cut - 4, 0) and data[lead] & 0xC0 == 0x80:
        lead -= 1
    if lead < 0 or data[lead] < 0xC0:
        return cut
    length = 2 if data[lead] < 0xE0 else 3 if data[lead] < 0xF0 else 4
    return lead if lead + length > cut else cut


def _unescape(data: bytes) -> bytes:
    return json.loads(b'"' + data + b'"').encode("utf-8", "surrogatepass")


class SpooledString:
    """A JSON string too long to hold: its text as it came (JSON escapes and
    all) in a file, or, when it did not fit on the disk, only its length and
    why (`missing`)."""

    __slots__ = ("path", "length", "escaped", "missing")

    def __init__(self, path: Optional[str], length: int, escaped: bool, missing: Optional[str]):
        self.path, self.length, self.escaped, self.missing = path, length, escaped, missing

    def __repr__(self) -> str:
        return "<string of %d bytes>" % self.length

    def utf8_chunks(self, size: int = 256 * 1024) -> Iterable[bytes]:
        """The string's text, UTF-8 encoded, a chunk at a time; ValueError for a bad escape."""
        with open(self.path, "rb") as handle:
            carry = b""
            while True:
                data = handle.read(size)
                if not data:
                    break
                if not self.escaped:
                    yield data
                    continue
                data = carry + data
                cut = _char_boundary(data, _complete_escapes(data))
                carry = data[cut:]
                yield _unescape(data[:cut])
            if carry:
                yield _unescape(carry)

    def discard(self) -> None:
        remove_file(self.path)
        self.path = None


class JsonSplitter:
    """sink= for HttpClient.request: takes a JSON body of any size as it
    arrives. Its structure stays in memory (up to max_structure bytes), each
    string longer than LONG_STRING goes to a file of its own in `folder`
    while the free disk allows (transfer_budget), and is only counted past
    that. value() decodes the structure with decode_json and puts a
    SpooledString where each long string was; close() removes the files."""

    def __init__(self, folder: str, max_structure: int = MAX_JSON_BODY):
        self.folder, self.max_structure = folder, max_structure
        self.structure = bytearray()
        self.strings = []  # type: List[SpooledString]
        self.size = 0
        self.error = None  # type: Optional[str]
        self.room = None  # type: Optional[int]  # disk left for long strings, looked up at the first one
        self.nonce = ""
        self._in_string = self._escape_next = False
        self._reset_string()

    def _reset_string(self) -> None:
        self._text = bytearray()  # a string while it is short
        self._file = None  # type: Optional[Any]
        self._path = None  # type: Optional[str]
        self._length, self._escaped, self._missing = 0, False, None  # type: Tuple[int, bool, Optional[str]]

    def write(self, data) -> int:
        self.size += len(data)
        if self.error is None:
            self._scan(bytes(data))
        return len(data)

    def _scan(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self._in_string:
                pos = self._string_part(data, pos)
                continue
            quote_at = data.find(b'"', pos)
            stop = end if quote_at < 0 else quote_at + 1
            self._keep(data[pos:stop])
            self._in_string, pos = quote_at >= 0, stop

    def _string_part(self, data: bytes, pos: int) -> int:
        """Takes string text from data[pos:]; returns where the scan goes on."""
        if self._escape_next:  # the chunk before ended on a backslash
            self._escape_next = False
            self._add(data[pos:pos + 1])
            return pos + 1
        # Two memchr scans: a regex character class is several times slower.
        quote_at = data.find(b'"', pos)
        at = data.find(b"\\", pos, len(data) if quote_at < 0 else quote_at)
        if at < 0:
            at = quote_at
        if at < 0:
            self._add(data[pos:])
            return len(data)
        if data[at] == 0x22:  # the closing quote
            self._add(data[pos:at])
            self._close_string()
            return at + 1
        self._escaped = True
        self._escape_next = at + 1 == len(data)
        self._add(data[pos:at + 2])
        return at + 2

    def _add(self, piece: bytes) -> None:
        self._length += len(piece)
        if self._missing is not None:
            return
        if self._file is None:
            self._text += piece
            if len(self._text) > LONG_STRING:
                self._to_disk()
            return
        self._write(piece)

    def _to_disk(self) -> None:
        if self.room is None:  # a long string as a key (nonsense) stays as its repr, see _restore
            self.room = transfer_budget(self.folder)[0]
            self.nonce = binascii.hexlify(os.urandom(8)).decode("ascii")
        try:
            fd, self._path = create_temp_file(self.folder, TEMP_PREFIX, ".string")
            self._file = os.fdopen(fd, "wb")
        except OSError as exc:
            self._drop("cannot be kept in %s: %s" % (self.folder, exc.strerror or exc))
            return
        text, self._text = bytes(self._text), bytearray()
        self._write(text)

    def _write(self, piece: bytes) -> None:
        if len(piece) > self.room:
            limit, free = transfer_budget(self.folder)
            self._drop("too large for this printer's free disk: over %d bytes, limit %d bytes (%d bytes free in %s)"
                       % (self._length, limit, free, self.folder))
            return
        try:
            self._file.write(piece)
        except OSError as exc:
            self._drop("cannot be kept in %s: %s" % (self.folder, exc.strerror or exc))
            return
        self.room -= len(piece)

    def _drop(self, why: str) -> None:
        """Stops keeping the current string: too large for the disk."""
        if self._file is not None:
            self.room += self._file.tell()
            self._file.close()
            remove_file(self._path)
        self._file, self._path, self._missing, self._text = None, None, why, bytearray()

    def _close_string(self) -> None:
        if self._file is None and self._missing is None and len(self._text) <= LONG_STRING:
            self._keep(bytes(self._text))
        else:
            if self._file is not None:
                self._file.close()
            self.strings.append(SpooledString(self._path, self._length, self._escaped, self._missing))
            self._keep(("\\u0000%s:%d" % (self.nonce, len(self.strings) - 1)).encode("ascii"))
        self._keep(b'"')
        self._in_string = False
        self._reset_string()

    def _keep(self, piece: bytes) -> None:
        if len(self.structure) + len(piece) > self.max_structure:
            self.error = "its structure (all but its long strings) is over %d bytes" % self.max_structure
            self.structure = bytearray()
            return
        self.structure += piece

    def value(self) -> Any:
        """The body decoded, long strings as SpooledString; BadJson if it is not JSON."""
        if self.error is not None:
            raise BadJson(self.error)
        if self._in_string:
            raise BadJson("it ends inside a string")
        value = decode_json(bytes(self.structure))
        return self._restore(value) if self.strings else value

    def _restore(self, value: Any) -> Any:
        marker = "\x00%s:" % self.nonce
        root = [value]
        stack = [root]  # type: List[Any]
        while stack:
            node = stack.pop()
            if isinstance(node, dict) and any(key.startswith(marker) for key in node):
                node_items = [(repr(self.strings[int(k[len(marker):])]) if k.startswith(marker) else k, v)
                              for k, v in node.items()]
                node.clear()
                node.update(node_items)
            for key in list(node.keys() if isinstance(node, dict) else range(len(node))):
                child = node[key]
                if isinstance(child, (dict, list)):
                    stack.append(child)
                elif isinstance(child, str) and child.startswith(marker):
                    node[key] = self.strings[int(child[len(marker):])]
        return root[0]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            remove_file(self._path)
        for spooled in self.strings:
            spooled.discard()
        self._reset_string()


# --------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------
# The one place that does HTTP: connect and read timeouts and a wall-clock
# deadline on every exchange, a cap on every body we read, and every failure
# mapped, in `http_error_of`, to one of the HttpError subclasses with a short
# message. Peers are reached over kept-alive http.client connections: the
# polls run thousands of times an hour, and requests would cost three times
# the CPU per call and 6 MB more memory for features they do not use
# (bench/README.md). requests is imported only for a peer that the
# environment routes through a proxy (it speaks CONNECT and proxy
# authentication). Both transports take the same arguments and raise only
# the typed errors. Redirects are not followed. Only the headers the
# protocol needs are sent, and credentials only to the client's own origin.
# TLS verification stays on.
#
# A read timeout bounds each wait for a byte, not the exchange: a peer that
# trickles a byte a second never trips it. So one watchdog thread for the
# whole process holds the deadlines of the exchanges in flight and shuts
# down the socket of one whose deadline passed, which ends any wait (in
# TLS, http.client or urllib3 alike). It sleeps until the earliest deadline
# it knows, so a poll costs it a heap push and a removal, not a wake-up.


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


class HttpResponse:
    __slots__ = ("status", "headers", "content", "size")

    def __init__(self, status, headers, content, size=None):
        self.status, self.headers, self.content = status, headers, content
        self.size = len(content) if size is None else size  # bytes received, also when they went to a sink

    def json(self, what: str):
        if not self.content:
            return None
        try:
            return decode_json(self.content, PEER_JSON_DEPTH)
        except BadJson as exc:
            ctype = self.headers.get("Content-Type", "?").split(";")[0]
            raise BadResponse("%s: expected JSON, got %s (%d bytes: %s)"
                              % (what, ctype, len(self.content), _short(str(exc), 80)), self.status) from None


def default_deadline(timeout: Tuple[float, float]) -> float:
    """The deadline of a call that names none: an ordinary call's, or longer
    for a call whose own timeouts are longer."""
    return max(EXCHANGES["call"].deadline or 0.0, timeout[0] + timeout[1])


def transfer_deadline(nbytes: int) -> float:
    """The deadline of an upload or download of nbytes: a base for the
    handshakes and the peer's work, plus the time at MIN_TRANSFER_RATE."""
    return TRANSFER_BASE_SECONDS + max(0, nbytes) / MIN_TRANSFER_RATE


def exchange_limits(kind: str, size: int = 0, hold: float = 0.0) -> Dict[str, Any]:
    """timeout= and deadline= for HttpClient.request, from EXCHANGES[kind]:
    a held poll's hold is added to both, a transfer's deadline is its size's."""
    limits = EXCHANGES[kind]
    deadline = transfer_deadline(size) if limits.deadline is None else limits.deadline + hold
    return {"timeout": (limits.connect, limits.read + hold), "deadline": deadline}


class WatchedExchange:
    """One exchange in flight: its deadline, and the socket to shut down when
    it passes. `connected` tells a connect timeout from a read timeout."""
    __slots__ = ("deadline", "seconds", "sock", "connected", "expired", "entry")

    def __init__(self, seconds: float):
        self.seconds, self.deadline = seconds, time.monotonic() + seconds
        self.sock, self.connected, self.expired = None, False, False
        self.entry = None  # type: Optional[Tuple[float, int, WatchedExchange]]

    def remaining(self) -> float:
        return max(0.001, self.deadline - time.monotonic())


def _shut_down(sock) -> None:
    try:
        # The plain socket's shutdown, also for an SSLSocket: it ends a wait
        # in another thread without touching the TLS state that thread uses.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except (OSError, TypeError):
        pass  # closed meanwhile: nothing waits on it any more


class DeadlineWatch:
    """The process-wide watchdog of exchange deadlines (see the section
    comment). An exchange's thread calls start, attach as its sockets
    appear, and finish; the watchdog thread starts with the first exchange."""

    def __init__(self):
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._heap = []  # type: List[Tuple[float, int, WatchedExchange]]
        self._alarm = float("inf")  # when the watchdog looks next
        self._count = 0
        self._thread = None  # type: Optional[threading.Thread]
        self._local = threading.local()

    def start(self, seconds: float) -> WatchedExchange:
        watched = WatchedExchange(seconds)
        with self._lock:
            self._count += 1
            watched.entry = (watched.deadline, self._count, watched)
            heapq.heappush(self._heap, watched.entry)
            if watched.deadline < self._alarm:
                self._alarm = watched.deadline
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="http-deadlines", daemon=True)
                    self._thread.start()
                else:
                    self._changed.notify()
        self._local.current = watched
        return watched

    def attach(self, sock, connected: bool) -> None:
        """The socket the calling thread's exchange now waits on."""
        watched = getattr(self._local, "current", None)
        if watched is None:
            return
        with self._lock:
            watched.sock, watched.connected = sock, connected
            expired = watched.expired
        if expired:
            _shut_down(sock)

    def extend(self, seconds: float) -> None:
        """Gives the calling thread's exchange `seconds` from its start when
        that is later than its deadline: a body read into a sink gets the
        time its bytes so far take at the minimum rate (read_body)."""
        watched = getattr(self._local, "current", None)
        if watched is None:
            return
        with self._lock:
            deadline = watched.deadline - watched.seconds + seconds
            if watched.expired or deadline <= watched.deadline:
                return
            self._heap.remove(watched.entry)
            heapq.heapify(self._heap)
            watched.seconds, watched.deadline = seconds, deadline
            watched.entry = (deadline, watched.entry[1], watched)
            heapq.heappush(self._heap, watched.entry)

    def remaining(self) -> Optional[float]:
        """Seconds left to the calling thread's exchange, None outside one."""
        watched = getattr(self._local, "current", None)
        return None if watched is None else watched.remaining()

    def finish(self, watched: WatchedExchange) -> None:
        self._local.current = None
        with self._lock:
            watched.sock = None
            if not watched.expired:
                if self._heap[0] is watched.entry:
                    heapq.heappop(self._heap)
                else:
                    self._heap.remove(watched.entry)
                    heapq.heapify(self._heap)

    def _run(self) -> None:
        with self._lock:
            while True:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    watched = heapq.heappop(self._heap)[2]
                    watched.expired = True
                    if watched.sock is not None:
                        _shut_down(watched.sock)
                self._alarm = self._heap[0][0] if self._heap else float("inf")
                self._changed.wait(self._alarm - now if self._heap else None)


DEADLINES = DeadlineWatch()


# Name lookups. getaddrinfo cannot be interrupted, and a slow or hostile
# resolver holds it far past any deadline (glibc waits up to 30 s a try, five
# tries a nameserver), with no socket of ours for the watchdog to shut down.
# So a name (not an address, which needs no resolver) is looked up in a
# thread of its own, and the connect waits for it no longer than its connect
# timeout and its exchange's deadline allow. A lookup that outlives the wait
# ends when the resolver gives up; callers that want the same name meanwhile
# wait on it rather than start another. The names a cloud chooses (transfer
# URLs) are countless: while MAX_STUCK_LOOKUPS of those have no answer, a
# new one fails at once, so a resolver that never answers them costs a few
# idle threads, not one per try, and the configured names (the cloud's,
# Moonraker's, a proxy's), which are few, are looked up all the same.

MAX_STUCK_LOOKUPS = 4


class NameLookupTimeout(OSError):
    """A name lookup with no answer within the time its connect had."""


class _Lookup:
    __slots__ = ("done", "infos", "error")

    def __init__(self):
        self.done = threading.Event()
        self.infos = []  # type: List[Tuple[Any, ...]]
        self.error = None  # type: Optional[OSError]


_LOOKUPS_LOCK = threading.Lock()
_LOOKUPS = {}  # type: Dict[Tuple[str, Any], _Lookup]  # (host, port) -> its lookup in flight
_CAPPED_LOOKUPS = set()  # type: set  # the keys of those for names a cloud chose


def _look_up(key: Tuple[str, Any], lookup: _Lookup) -> None:
    try:
        lookup.infos = socket.getaddrinfo(key[0], key[1], 0, socket.SOCK_STREAM)
    except OSError as exc:
        lookup.error = exc
    except Exception as exc:  # UnicodeError for a label over 63 characters
        lookup.error = socket.gaierror(socket.EAI_NONAME, "bad host name: %s" % exc)
    finally:
        with _LOOKUPS_LOCK:
            _LOOKUPS.pop(key, None)
            _CAPPED_LOOKUPS.discard(key)
        lookup.done.set()


def resolve(host: str, port, seconds: float, capped: bool = False) -> List[Tuple[Any, ...]]:
    """getaddrinfo(host, port) for a TCP connection, waiting at most seconds
    (and no longer than the calling thread's exchange has left). capped: a
    name a cloud chose, refused at once while MAX_STUCK_LOOKUPS of those hang."""
    try:
        return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
    except socket.gaierror:
        pass  # a name, not an address
    except (UnicodeError, ValueError) as exc:
        raise socket.gaierror(socket.EAI_NONAME, "bad host name: %s" % exc) from None
    left = DEADLINES.remaining()
    seconds = max(0.001, seconds if left is None else min(seconds, left))
    key = (host, port)
    with _LOOKUPS_LOCK:
        lookup = _LOOKUPS.get(key)
        if lookup is None:
            if capped and len(_CAPPED_LOOKUPS) >= MAX_STUCK_LOOKUPS:
                raise NameLookupTimeout(errno.ETIMEDOUT, "name lookup of %s: not tried, %d earlier lookups have no "
                                        "answer yet" % (_short(host, 80), len(_CAPPED_LOOKUPS)))
            if capped:
                _CAPPED_LOOKUPS.add(key)
            lookup = _LOOKUPS[key] = _Lookup()
            threading.Thread(target=_look_up, args=(key, lookup), name="name-lookup", daemon=True).start()
    if not lookup.done.wait(seconds):
        raise NameLookupTimeout(errno.ETIMEDOUT, "name lookup of %s: no answer within %g s"
                                % (_short(host, 80), round(seconds, 1)))
    if lookup.error is not None:
        error = lookup.error  # shared by every waiter: each raises a copy of its own
        raise type(error)(*error.args) if isinstance(error, socket.gaierror) else OSError(*error.args)
    return lookup.infos


def connect_to(infos: List[Tuple[Any, ...]], timeout: Optional[float], source_address=None) -> socket.socket:
    """socket.create_connection to these addresses (resolve's), no others;
    each socket is watched by DEADLINES while it connects."""
    error = None  # type: Optional[OSError]
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            DEADLINES.attach(sock, connected=False)
            sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error or OSError("no address to connect to")


def connect_timeout(timeout: Optional[float]) -> float:
    return CONNECT_TIMEOUT if timeout is None else timeout


class _LocalFailure(Exception):
    """A failure of our side of an exchange (writing the sink, reading the
    file we send, the progress callback): passed on as it is, not taken for
    the peer's."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def _local(function: Callable, *args):
    try:
        return function(*args)
    except Exception as exc:
        raise _LocalFailure(exc) from exc


def _exception_chain(exc: BaseException) -> List[BaseException]:
    """exc and what caused it, outermost first (requests wraps urllib3,
    which wraps the socket's error, in causes, `reason` and args)."""
    chain = []  # type: List[BaseException]
    while exc is not None and len(chain) < 12 and all(exc is not seen for seen in chain):
        chain.append(exc)
        inner = exc.__cause__ or exc.__context__ or getattr(exc, "reason", None)
        if not isinstance(inner, BaseException):
            inner = next((arg for arg in exc.args if isinstance(arg, BaseException)), None)
        exc = inner
    return chain


def _os_message(exc: BaseException) -> str:
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
    return "connection failed: %s" % _short(text, 160)


# The low-level failures of both transports, most specific first: the first
# row that matches the innermost cause names the error.
LOW_LEVEL_ERRORS = [
    (ssl.SSLError, TlsError, lambda exc: "TLS error: %s" % _short(str(exc), 160)),
    (socket.gaierror, TransportError, lambda exc: "host name not found"),
    (NameLookupTimeout, ExchangeTimeout, lambda exc: exc.strerror),
    (ConnectionRefusedError, TransportError, lambda exc: "connection refused"),
    (http.client.RemoteDisconnected, TransportError, lambda exc: "connection closed without a response"),
    (ConnectionResetError, TransportError, lambda exc: "connection reset"),
    ((BrokenPipeError, ConnectionAbortedError), TransportError, lambda exc: "connection closed without a response"),
    (http.client.IncompleteRead, TransportError, lambda exc: "connection closed in the middle of the answer"),
    (http.client.HTTPException, TransportError,
     lambda exc: "bad HTTP answer: %s" % _short(str(exc) or type(exc).__name__, 160)),
    ((OSError, ValueError, OverflowError), TransportError, _os_message),
]  # type: List[Tuple[Any, type, Callable[[BaseException], str]]]


def _requests_errors() -> List[Tuple[Any, type, Callable[[BaseException], str]]]:
    """The rows for what requests and urllib3 raise without a socket error
    inside (a connect timeout, say); read only once requests is loaded."""
    if "requests" not in sys.modules:
        return []
    import requests
    import urllib3
    errors, lower = requests.exceptions, urllib3.exceptions
    return [
        ((errors.SSLError, lower.SSLError), TlsError, lambda exc: "TLS error: %s" % _short(str(exc), 160)),
        ((errors.ConnectTimeout, lower.ConnectTimeoutError), ExchangeTimeout, lambda exc: "connect timed out"),
        ((errors.ReadTimeout, lower.ReadTimeoutError), AnswerTimeout, lambda exc: "read timed out"),
        ((errors.Timeout, lower.TimeoutError), ExchangeTimeout, lambda exc: "read timed out"),
        ((errors.RequestException, lower.HTTPError), TransportError, _os_message),
    ]


def http_error_of(exc: BaseException, watched: Optional[WatchedExchange]) -> HttpError:
    """The one map from a low-level failure of either transport to a typed error."""
    if isinstance(exc, HttpError):
        return exc
    if watched is not None and watched.expired:
        return ExchangeTimeout("no complete answer within the %g s deadline" % watched.seconds)
    chain = _exception_chain(exc)
    rows = _requests_errors() + LOW_LEVEL_ERRORS
    for cause in reversed(chain):
        if isinstance(cause, socket.timeout) and not isinstance(cause, ssl.SSLError):
            connected = watched is not None and watched.connected
            return AnswerTimeout("read timed out") if connected else ExchangeTimeout("connect timed out")
        for kinds, error, describe in rows:
            if isinstance(cause, kinds):
                return error(describe(cause))
    return TransportError(_os_message(exc))


def _check_declared_length(headers, status: int, max_bytes: int) -> None:
    declared = headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise ResponseTooLarge("response too large: %s bytes (limit %d)" % (declared, max_bytes), status)


def _too_large(status: int, max_bytes: int) -> ResponseTooLarge:
    return ResponseTooLarge("response too large: over %d bytes" % max_bytes, status)


def read_capped(read: Callable[[int], bytes], max_bytes: int) -> bytes:
    """At most max_bytes + 1 bytes from read(size), a chunk at a time: one
    read(max_bytes + 1) makes Python 3.8 zero a buffer that large first (4 MB
    for every poll, 10 MB for every webcam picture)."""
    chunks, size = [], 0
    while size <= max_bytes:
        chunk = read(min(READ_CHUNK, max_bytes + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _check_complete(headers, size: int) -> None:
    """A body read into a sink that ends short of its Content-Length was cut
    (by the peer, or by the deadline's shutdown): http.client's read(amount)
    just returns b"" then, where read() would raise IncompleteRead."""
    declared = headers.get("Content-Length")
    if declared and declared.isdigit() and size < int(declared):
        raise http.client.IncompleteRead(b"", int(declared) - size)


def read_body(read: Callable[[int], bytes], headers, status: int, max_bytes: int, sink=None,
              progress: Optional[Callable[[int], None]] = None,
              read_all: Optional[Callable[[], bytes]] = None) -> Tuple[bytes, int]:
    """(content, size) of an answer's body, capped at max_bytes. With a sink
    the body goes there a chunk at a time and content is b"". read_all reads
    a body whose declared length was checked against the cap in one go.
    An error answer's body is kept in memory (for its message), not sunk."""
    if sink is not None and not 200 <= status < 300:
        sink, max_bytes = None, min(max_bytes, MAX_JSON_BODY)
    _check_declared_length(headers, status, max_bytes)
    if sink is None:
        content = read_all() if read_all is not None else read_capped(read, max_bytes)
        if len(content) > max_bytes:
            raise _too_large(status, max_bytes)
        return content, len(content)
    size = 0
    while True:
        chunk = read(READ_CHUNK)
        if not chunk:
            _check_complete(headers, size)
            return b"", size
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(status, max_bytes)
        # The time what has come so far (and one chunk more) takes at the
        # minimum rate: not what the peer declares, or a Content-Length of
        # 2 GB trickled a byte at a time would hold the exchange for 12 hours.
        DEADLINES.extend(transfer_deadline(size + READ_CHUNK))
        _local(sink.write, chunk)
        if progress is not None:
            _local(progress, size)


def send_file(send: Callable[[bytes], Any], body, progress: Optional[Callable[[int], None]]) -> None:
    sent = 0
    while True:
        chunk = _local(body.read, READ_CHUNK)
        if not chunk:
            return
        send(chunk)
        sent += len(chunk)
        if progress is not None:
            _local(progress, sent)


_TLS_CONTEXT = []  # type: List[ssl.SSLContext]


def tls_context() -> ssl.SSLContext:
    """One verifying context for every connection: its CA store costs about
    2.7 MB, so it is loaded once. The CAs are certifi's, as requests uses,
    because a K1 has no system store to speak of."""
    if not _TLS_CONTEXT:
        try:
            import certifi
            cafile = certifi.where()  # type: Optional[str]
        except ImportError:
            cafile = None
        _TLS_CONTEXT.append(ssl.create_default_context(cafile=cafile))
    return _TLS_CONTEXT[0]


class Transport:
    """What both transports share: the deadline of each exchange and the one
    map of their failures. `_exchange` may raise whatever its library raises."""

    FAILURES = (OSError, ValueError, OverflowError, http.client.HTTPException)  # type: Tuple[type, ...]
    guard = None  # type: Optional[AddressGuard]  # set by HttpClient: the destinations refused

    def exchange(self, method: str, url: str, headers: Dict[str, str], body, timeout: Tuple[float, float],
                 deadline: float, max_bytes: int, sink=None,
                 progress: Optional[Callable[[int], None]] = None) -> HttpResponse:
        """body: None, bytes, or a binary file whose Content-Length is in
        headers (streamed). deadline: seconds for the whole exchange."""
        watched = DEADLINES.start(deadline)
        try:
            response = self._exchange(method, url, headers, body, timeout, watched, max_bytes, sink, progress)
            if watched.expired:
                # Its socket was shut down: http.client takes headers cut
                # short by the close for complete ones, so the answer is not.
                raise http_error_of(socket.timeout(), watched)
            return response
        except _LocalFailure as failure:
            raise failure.error from None
        except self.FAILURES as exc:
            error = http_error_of(exc, watched)
            error.connected = watched.connected
            raise error from None
        finally:
            DEADLINES.finish(watched)

    def _exchange(self, method, url, headers, body, timeout, watched, max_bytes, sink, progress) -> HttpResponse:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def _watched_create_connection(address, timeout=None, source_address=None):
    """http.client's _create_connection: the name lookup shares the connect's timeout."""
    return connect_to(resolve(address[0], address[1], connect_timeout(timeout)), timeout, source_address)


def canonical_ip(address: str) -> str:
    """An address as getaddrinfo gives it, without an IPv6 scope, and an
    IPv4-mapped IPv6 address (::ffff:127.0.0.1) as the IPv4 one."""
    address = address.split("%", 1)[0].lower()
    return address[7:] if address.startswith("::ffff:") and "." in address else address


def is_local_address(address: str) -> bool:
    """Whether a connection to this address stays on this host: only a local
    address can be bound (127.0.0.0/8, ::1, 0.0.0.0, ::, each interface's)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((address, 0))
        return True
    except OSError:
        return False


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# IPv6 ranges that are not public whatever Python's version says: IPv4-
# compatible (::/96, deprecated) and IPv4-translated (::ffff:0:0:0/96)
# addresses, and local-use NAT64 (64:ff9b:1::/48, RFC 8215), whose
# translator may well lead into the LAN.
_NOT_PUBLIC_V6 = tuple(ipaddress.ip_network(net) for net in ("::/96", "::ffff:0:0:0/96", "64:ff9b:1::/48",
                                                              "fec0::/10"))


def is_public_address(address: str) -> bool:
    """Whether an address is on the public internet: not this host, not a
    private, link-local, unique-local, shared (CGNAT), reserved or multicast
    one, nor an IPv6 address that carries one (6to4, NAT64)."""
    try:
        ip = ipaddress.ip_address(canonical_ip(address))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if any(ip in net for net in _NOT_PUBLIC_V6):
            return False
        if ip.sixtofour is not None:
            ip = ip.sixtofour
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.is_global and not ip.is_multicast


class AddressGuard:
    """Destinations a client must not connect to, judged on the addresses the
    connection really uses: every spelling of an address (localhost,
    127.0.0.2, [::1], 2130706433, 0x7f000001) and a name that resolves there,
    now or only at the connect, are refused alike. refused: (address, port)
    -> what is there; local_ports: port -> what is there, for every address
    of this host; names: (host name, port) -> what is there. allowed: when
    given, every address that is not public is refused too, except for the
    (host, port) in it (port None: any port)."""

    def __init__(self, refused: Dict[Tuple[str, int], str], local_ports: Dict[int, str],
                 names: Dict[Tuple[str, int], str], allowed: Optional[Iterable[Tuple[str, Optional[int]]]] = None):
        self.refused, self.local_ports, self.names = refused, local_ports, names
        self.allowed = None if allowed is None else frozenset(allowed)

    def _allows(self, host: str, port: int) -> bool:
        """Whether any address is fine for host:port (no private-address rule, or the host is allowed)."""
        name = host.lower().rstrip(".")
        return self.allowed is None or (name, port) in self.allowed or (name, None) in self.allowed

    def _private(self, host: str, port: int, infos: List[Tuple[Any, ...]]) -> Optional[str]:
        """What a non-public address among infos is, unless host:port is allowed."""
        if self._allows(host, port):
            return None
        private = next((canonical_ip(info[4][0]) for info in infos if not is_public_address(info[4][0])), None)
        if private is None:
            return None
        return ("%s, a private address (a transfer URL may reach only public addresses unless the config's "
                "transfer_allow_hosts names its host)" % private)

    def _reason(self, address: str, port: int) -> Optional[str]:
        address = canonical_ip(address)
        found = self.refused.get((address, port))
        if found is None and port in self.local_ports and is_local_address(address):
            found = self.local_ports[port]
        return found

    def addresses(self, host: str, port: int, seconds: float = CONNECT_TIMEOUT) -> List[Tuple[Any, ...]]:
        """resolve's answer for host:port; DestinationRefused when any
        address in it is refused."""
        found = self.names.get((host.lower().rstrip("."), port))
        infos = [] if found else resolve(host, port, seconds, capped=True)
        for info in infos:
            found = found or self._reason(info[4][0], port)
        found = found or self._private(host, port, infos)
        if found:
            raise DestinationRefused("refused: %s port %d leads to %s" % (_short(host, 80), port, found))
        return infos

    def check_for_proxy(self, host: str, port: int) -> None:
        """The check before a request through a proxy, which looks the name
        up again itself: a name this host cannot resolve is refused under the
        private-address rule (it may be one only the proxy's network knows)."""
        try:
            self.addresses(host, port)
        except (socket.gaierror, NameLookupTimeout) as exc:
            if not self._allows(host, port):
                raise DestinationRefused("refused: %s port %d does not resolve here (%s), so it cannot be shown "
                                         "to be a public address" % (_short(host, 80), port,
                                                                     exc.strerror or exc)) from None

    def create_connection(self, address, timeout=None, source_address=None):
        """socket.create_connection to the addresses checked, no others."""
        return connect_to(self.addresses(address[0], address[1], connect_timeout(timeout)), timeout, source_address)


class KeptConnections(Transport):
    """HTTP/1.1 over http.client, one kept-alive connection per scheme://host:port.

    A connection the peer closed while idle is noticed before it is reused; a
    request that still meets a dead kept connection is sent once more on a
    fresh one when that cannot run it twice (nothing was sent yet, or the
    method is idempotent)."""

    IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
    DEAD = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)  # RemoteDisconnected is a reset

    def __init__(self):
        self.connections = {}  # type: Dict[Tuple[str, str], http.client.HTTPConnection]
        self.interrupted = False  # interrupt() was called: nothing is sent again or connected anew

    def _exchange(self, method, url, headers, body, timeout, watched, max_bytes, sink, progress) -> HttpResponse:
        parts = urlsplit(url)
        target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        key = (parts.scheme, parts.netloc)
        conn = self.connections.get(key)
        reused = conn is not None and not self._dropped(conn)
        while True:
            if reused:
                DEADLINES.attach(conn.sock, connected=True)
            else:
                conn = self._connect(key, min(timeout[0], watched.remaining()))
            sent = False
            try:
                sent = self._send(conn, method, target, headers, body, timeout[1], progress)
                return self._receive(conn, max_bytes, sink, progress)
            except self.DEAD:
                conn.close()
                replayable = body is None or isinstance(body, bytes)
                # An interrupted exchange looks like a dead kept connection:
                # sent again, a held poll would hold up the stop.
                if self.interrupted or watched.expired or \
                        not (reused and replayable and (method in self.IDEMPOTENT or not sent)):
                    raise
                reused = False  # once more, on a fresh connection
            except BaseException:
                conn.close()
                raise

    @staticmethod
    def _dropped(conn: http.client.HTTPConnection) -> bool:
        """An idle kept connection with something to read has been closed by
        the peer (or holds junk): either way it is not fit for a request."""
        if conn.sock is None:
            return True
        poller = select.poll()
        poller.register(conn.sock, select.POLLIN)
        if poller.poll(0):
            conn.close()
            return True
        return False

    def _connect(self, key: Tuple[str, str], connect_timeout: float) -> http.client.HTTPConnection:
        scheme, netloc = key
        if scheme == "https":
            conn = http.client.HTTPSConnection(netloc, timeout=connect_timeout,
                                               context=tls_context())  # type: http.client.HTTPConnection
        else:
            conn = http.client.HTTPConnection(netloc, timeout=connect_timeout)
        connect = _watched_create_connection if self.guard is None else self.guard.create_connection
        conn._create_connection = connect  # type: ignore  # http.client's own hook
        self.connections[key] = conn
        try:
            conn.connect()
            if self.interrupted:  # interrupt() came while connecting: it found no socket to shut down
                raise TransportError("not sent, the connection was interrupted")
        except BaseException:
            conn.close()
            raise
        DEADLINES.attach(conn.sock, connected=True)
        return conn

    @staticmethod
    def _send(conn, method: str, target: str, headers: Dict[str, str], body, read_timeout: float,
              progress: Optional[Callable[[int], None]]) -> bool:
        conn.sock.settimeout(read_timeout)
        # Host is added by putrequest; Accept-Encoding would be "identity",
        # which the protocol does not need.
        conn.putrequest(method, target, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        if "Content-Length" not in headers:
            if isinstance(body, bytes):
                conn.putheader("Content-Length", str(len(body)))
            elif method in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", "0")  # some front ends refuse a bodiless POST without it
        if body is None or isinstance(body, bytes):
            conn.endheaders(body)
        else:
            conn.endheaders()
            send_file(conn.send, body, progress)
        return True

    @staticmethod
    def _receive(conn, max_bytes: int, sink, progress) -> HttpResponse:
        response = conn.getresponse()
        # A Content-Length was checked against the cap already.
        content, size = read_body(response.read, response.msg, response.status, max_bytes, sink, progress,
                                  response.read if response.length is not None else None)
        if not response.isclosed():
            conn.close()  # an unread remainder would be taken for the next answer
        return HttpResponse(response.status, response.msg, content, size)

    def close(self) -> None:
        for conn in self.connections.values():
            conn.close()
        self.connections.clear()

    def interrupt(self) -> None:
        """Ends an exchange another thread has in progress (a held long-poll
        at stop): its read fails at once, and it is not sent again."""
        self.interrupted = True
        for conn in list(self.connections.values()):
            sock = conn.sock
            if sock is not None:
                _shut_down(sock)  # not SSLSocket.shutdown: it drops the TLS state the reading thread uses


class _FileBody:
    """A file body for requests that reports progress; its length keeps
    requests from sending it chunked, which S3 and its clones refuse."""

    def __init__(self, body, length: int, progress: Callable[[int], None]):
        self.body, self.length, self.progress, self.sent = body, length, progress, 0

    def __len__(self) -> int:
        return self.length

    def read(self, size: int = -1) -> bytes:
        chunk = _local(self.body.read, size)
        self.sent += len(chunk)
        _local(self.progress, self.sent)
        return chunk

    def __iter__(self):
        return iter(lambda: self.read(READ_CHUNK), b"")


def _watched_pool_classes():
    """urllib3 pools whose connections hand their sockets to DEADLINES."""
    import urllib3
    import urllib3.connection

    class Watched:
        def _new_conn(self):
            # urllib3's own would look the name up with no bound (resolve).
            try:
                sock = _watched_create_connection((self._dns_host, self.port), self.timeout, self.source_address)
            except socket.timeout as exc:
                raise urllib3.exceptions.ConnectTimeoutError(self, "connect timed out") from exc
            except OSError as exc:
                raise urllib3.exceptions.NewConnectionError(self, "connection failed: %s" % exc) from exc
            for option in self.socket_options or ():
                sock.setsockopt(*option)
            return sock

        def connect(self):
            super().connect()
            DEADLINES.attach(self.sock, connected=True)

        def request(self, *args, **kwargs):
            if self.sock is not None:  # kept alive from an earlier exchange
                DEADLINES.attach(self.sock, connected=True)
            return super().request(*args, **kwargs)

    http_connection = type("WatchedHTTPConnection", (Watched, urllib3.connection.HTTPConnection), {})
    https_connection = type("WatchedHTTPSConnection", (Watched, urllib3.connection.HTTPSConnection), {})
    return {"http": type("WatchedHTTPPool", (urllib3.HTTPConnectionPool,), {"ConnectionCls": http_connection}),
            "https": type("WatchedHTTPSPool", (urllib3.HTTPSConnectionPool,), {"ConnectionCls": https_connection})}


DEFAULT_PORTS = {"http": 80, "https": 443}


def url_origin(url: str) -> Tuple[str, str, Optional[int]]:
    """(scheme, host, port) as browsers compare origins; a URL whose port
    cannot be read has an origin of its own."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or DEFAULT_PORTS.get(scheme)
    except ValueError:
        return ("", url, None)
    return (scheme, (parts.hostname or "").lower(), port)


class RequestsTransport(Transport):
    """requests, for a peer the environment routes through a proxy. Imported
    only then: the steady state of most printers never needs it."""

    def __init__(self, proxy: Optional[str]):
        import requests
        import requests.adapters
        import urllib3
        self.FAILURES = Transport.FAILURES + (urllib3.exceptions.HTTPError,)
        pools = _watched_pool_classes()

        class WatchedAdapter(requests.adapters.HTTPAdapter):
            def init_poolmanager(self, *args, **kwargs):
                super().init_poolmanager(*args, **kwargs)
                self.poolmanager.pool_classes_by_scheme = pools

            def proxy_manager_for(self, *args, **kwargs):
                manager = super().proxy_manager_for(*args, **kwargs)
                manager.pool_classes_by_scheme = pools
                return manager

        self.session = requests.Session()
        self.session.trust_env = False  # the proxy was looked up once; no netrc or env reads per call
        self.session.proxies = {"http": proxy, "https": proxy} if proxy else {}
        for scheme in ("http://", "https://"):
            self.session.mount(scheme, WatchedAdapter())
        self.session.headers.clear()
        # Without this, http.client adds "Accept-Encoding: identity".
        self.session.headers["Accept-Encoding"] = urllib3.util.SKIP_HEADER

    def _exchange(self, method, url, headers, body, timeout, watched, max_bytes, sink, progress) -> HttpResponse:
        if self.guard is not None:
            # Checked here, before urllib3 (or the proxy) resolves the name again.
            origin = url_origin(url)
            self.guard.check_for_proxy(origin[1], origin[2] or 0)
        if progress is not None and body is not None and not isinstance(body, bytes):
            body = _FileBody(body, int(headers.get("Content-Length", "0")), progress)
        response = self.session.request(method, url, data=body, headers=headers,
                                        timeout=(min(timeout[0], watched.remaining()), timeout[1]),
                                        stream=True, verify=True, allow_redirects=False)
        try:
            content, size = read_body(lambda amount: response.raw.read(amount, decode_content=True),
                                      response.headers, response.status_code, max_bytes, sink, progress)
            return HttpResponse(response.status_code, response.headers, content, size)
        finally:
            response.close()

    def close(self) -> None:
        self.session.close()


def environ_proxy(url: str, environ=os.environ) -> Optional[str]:
    """The proxy that http_proxy/https_proxy/all_proxy and no_proxy name for
    this URL, read as requests and curl read them; None for a direct line."""
    if not any(name.lower().endswith("_proxy") for name in environ):
        return None  # the usual case, without importing urllib.request
    import urllib.request
    proxies = {}
    for name, value in environ.items():
        if name.lower().endswith("_proxy") and value:
            proxies[name.lower()[:-len("_proxy")]] = value
    # The lower-case name wins, as in urllib and curl.
    for name, value in environ.items():
        if name.endswith("_proxy") and value:
            proxies[name[:-len("_proxy")]] = value
    parts = urlsplit(url)
    if parts.hostname and urllib.request.proxy_bypass_environment(parts.hostname, proxies):
        return None
    return proxies.get(parts.scheme) or proxies.get("all")


def _multipart_head(boundary: str, fields: Dict[str, str], name: str, filename: str) -> bytes:
    """Everything of a multipart/form-data body before its file's bytes."""
    def quoted(value: str) -> str:
        # A quoted-string with backslash escapes (RFC 7578 via RFC 2045), as
        # Moonraker's parser (Python's email) reads it: a browser's %22 would
        # be stored as "%22", another file's name. CR and LF cannot be quoted.
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return escaped.replace("\r", "%0D").replace("\n", "%0A")

    chunks = []
    for field_name, value in fields.items():
        chunks.append(('--%s\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
                       % (boundary, quoted(field_name), value)).encode("utf-8"))
    chunks.append(('--%s\r\nContent-Disposition: form-data; name="%s"; filename="%s"\r\n'
                   'Content-Type: application/octet-stream\r\n\r\n'
                   % (boundary, quoted(name), quoted(filename))).encode("utf-8"))
    return b"".join(chunks)


def _multipart_boundary() -> str:
    return "printer-connector-%s" % binascii.hexlify(os.urandom(12)).decode("ascii")


def multipart_body(fields: Dict[str, str], files: Dict[str, Tuple[str, bytes]]) -> Tuple[bytes, str]:
    boundary = _multipart_boundary()
    chunks = []
    for name, (filename, content) in files.items():
        chunks.append(_multipart_head(boundary, {} if chunks else fields, name, filename))
        chunks.append(content + b"\r\n")
    chunks.append(("--%s--\r\n" % boundary).encode("ascii"))
    return b"".join(chunks), "multipart/form-data; boundary=%s" % boundary


class _BytesReader:
    def __init__(self, data: bytes):
        self.data = data

    def read(self, size: int = -1) -> bytes:
        size = len(self.data) if size is None or size < 0 else size
        data, self.data = self.data[:size], self.data[size:]
        return data


class MultipartFile:
    """A multipart/form-data body of form fields and one file that is read
    from disk as it is sent (data= for HttpClient.request, with `headers()`):
    its length is known up front, so it goes out with a Content-Length, which
    Moonraker's streamed upload handler and S3-alikes want."""

    def __init__(self, fields: Dict[str, str], name: str, filename: str, handle, size: int):
        boundary = _multipart_boundary()
        head = _multipart_head(boundary, fields, name, filename)
        tail = ("\r\n--%s--\r\n" % boundary).encode("ascii")
        self.content_type = "multipart/form-data; boundary=%s" % boundary
        self.length = len(head) + size + len(tail)
        self._parts = [_BytesReader(head), handle, _BytesReader(tail)]

    def headers(self) -> Dict[str, str]:
        return {"Content-Type": self.content_type, "Content-Length": str(self.length)}

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(READ_CHUNK), b""))
        while self._parts:
            data = self._parts[0].read(size)
            if data:
                return data
            self._parts.pop(0)
        return b""


def direct_transport():
    """The transport for a peer without a proxy (unit tests swap in requests
    here, to reach it with requests-mock)."""
    return KeptConnections()


CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key", "x-connector-id", "cookie"})


class HttpClient:
    """The connections to one peer, with its headers and error format. Not
    shared between threads. Credential headers go only to the peer's own
    origin (scheme, host, port of base_url): a webcam URL that names another
    host gets none of them. guard: destinations it must never connect to."""

    def __init__(self, base_url: str, headers: Dict[str, str], error_message: Callable[[HttpResponse], str],
                 log: Logger, peer: str, guard: Optional[AddressGuard] = None):
        self.base_url = base_url.rstrip("/")
        self.origin = url_origin(self.base_url)
        self.headers = dict(headers)
        self.foreign_headers = {name: value for name, value in headers.items()
                                if name.lower() not in CREDENTIAL_HEADERS}
        self.error_message = error_message
        self.log, self.peer, self.guard = log, peer, guard
        self.interrupted = False  # interrupt() was called: the connector is stopping
        self._routes = {}  # type: Dict[Tuple[str, str], Any]  # (scheme, host:port) -> transport
        self._direct = None  # type: Optional[Any]

    def url(self, path: str) -> str:
        return path if "://" in path else self.base_url + path

    def request(self, method: str, path: str, *, params=None, json_body=None, data=None, files=None,
                headers=None, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT), deadline=None, max_bytes=MAX_JSON_BODY,
                any_status=False, sink=None, progress=None) -> HttpResponse:
        """data: bytes, a file opened in binary mode (give its Content-Length
        in headers; it is streamed), or form fields when files are given.
        deadline: seconds for the whole exchange (default_deadline when
        None). sink: a binary file the body is written to instead of
        content. progress(bytes_so_far): called per chunk of a file sent or
        a body received into the sink. A status other than 2xx raises
        HttpStatusError, unless any_status."""
        if self.interrupted:
            raise TransportError("%s %s: not sent, the connector is stopping" % (self.peer, method))
        url = self.url(path)
        if params:
            url += ("&" if "?" in url else "?") + urlencode(params)
        own = "://" not in path or url_origin(url) == self.origin
        sent_headers = dict(self.headers if own else self.foreign_headers)
        if json_body is not None:
            data = json.dumps(json_body, separators=(",", ":")).encode("utf-8")
            sent_headers["Content-Type"] = "application/json"
        elif files is not None:
            data, sent_headers["Content-Type"] = multipart_body(data or {}, files)
        sent_headers.update(headers or {})
        started = time.monotonic()
        try:
            result = self._transport(url).exchange(
                method, url, sent_headers, data, timeout,
                default_deadline(timeout) if deadline is None else deadline, max_bytes, sink, progress)
        except HttpError as exc:
            self.log.debug("http request failed", peer=self.peer, method=method, path=urlsplit(url).path,
                           error=str(exc))
            exc.args = ("%s %s" % (self.peer, exc),)
            raise exc from None
        if self.log.enabled(10):
            self.log.debug("http", peer=self.peer, method=method, path=urlsplit(url).path,
                           status=result.status, bytes=result.size,
                           ms=round((time.monotonic() - started) * 1000, 1))
        if not (any_status or 200 <= result.status < 300):
            raise HttpStatusError("%s http %d: %s" % (self.peer, result.status, self.error_message(result)),
                                  result)
        return result

    def _transport(self, url: str):
        """Chosen once per scheme://host:port: the environment is not read per call."""
        parts = urlsplit(url)
        route = self._routes.get((parts.scheme, parts.netloc))
        if route is None:
            proxy = environ_proxy(url)
            if proxy:
                route = RequestsTransport(proxy)
            else:
                route = self._direct = self._direct or direct_transport()
            route.guard = self.guard
            self._routes[(parts.scheme, parts.netloc)] = route
        return route

    def close(self) -> None:
        for transport in set(self._routes.values()):
            transport.close()
        self._routes.clear()
        self._direct = None

    def interrupt(self) -> None:
        """From another thread, at stop: ends the exchange in progress (direct
        routes), and every later one fails at once (none is started to be
        held by the cloud after the stop)."""
        self.interrupted = True
        for transport in list(self._routes.values()):
            if hasattr(transport, "interrupt"):
                transport.interrupt()


def generic_error_message(response: HttpResponse) -> str:
    ctype = response.headers.get("Content-Type", "")
    if "json" not in ctype:
        return "%s body (%d bytes)" % (ctype.split(";")[0] or "untyped", len(response.content))
    return _short(response.content.decode("utf-8", "replace"))


def user_agent() -> str:
    return "printer-connector/%s" % __version__


# --------------------------------------------------------------------------
# Moonraker client
# --------------------------------------------------------------------------
# Moonraker wraps success in {"result": ...} and errors in {"error": {"code",
# "message"}}. For file errors its message is only the HTTP reason; the real
# reason is the last line of the traceback, so that is what we surface.

GENERIC_REASONS = {"bad request", "not found", "forbidden", "internal server error", "unauthorized",
                   "method not allowed", "conflict", "service unavailable"}


def _traceback_reason(trace: str) -> Optional[str]:
    lines = [line.strip() for line in trace.strip().splitlines() if line.strip()]
    if not lines:
        return None
    last = lines[-1]
    # "tornado.web.HTTPError: HTTP 400: Bad Request (Invalid file path: gcodes/x)"
    if "(" in last and last.endswith(")"):
        return _short(last[last.index("(") + 1:-1])
    return None


def moonraker_error_message(response: HttpResponse) -> str:
    try:
        body = decode_json(response.content)
    except BadJson:
        return generic_error_message(response)
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, str):
        return _short(error)
    if not isinstance(error, dict):
        return _short(json.dumps(body))
    message = str(error.get("message") or "")
    trace = error.get("traceback")
    if isinstance(trace, str) and message.strip().lower() in GENERIC_REASONS | {""}:
        reason = _traceback_reason(trace)
        if reason:
            return reason
    return _short(message) or "no message"


class Moonraker:
    def __init__(self, printer: PrinterConfig, log: Logger, user_agent: str):
        headers = {"User-Agent": user_agent, "Accept": "application/json"}
        if printer.api_key:
            headers["X-Api-Key"] = printer.api_key
        self.printer = printer
        self.http = HttpClient(printer.base_url, headers, moonraker_error_message, log, "moonraker")

    def call(self, method: str, path: str, **kwargs) -> Any:
        response = self.http.request(method, path, **kwargs)
        body = response.json("moonraker %s" % path)
        if isinstance(body, dict) and "result" in body:
            return body["result"]
        return body

    def server_info(self) -> Dict[str, Any]:
        result = self.call("GET", "/server/info", **exchange_limits("probe"))
        if not isinstance(result, dict):
            raise BadResponse("moonraker /server/info: unexpected answer")
        return result

    def query_status(self, objects: Iterable[str] = STATUS_OBJECTS) -> Dict[str, Any]:
        """objects: names (every field), or a dict of name -> list of fields."""
        wanted = objects if isinstance(objects, dict) else {name: None for name in objects}
        result = self.call("POST", "/printer/objects/query", json_body={"objects": wanted})
        if not isinstance(result, dict) or not isinstance(result.get("status"), dict):
            raise BadResponse("moonraker objects/query: unexpected answer (no status object)")
        return result

    def close(self) -> None:
        self.http.close()


# --------------------------------------------------------------------------
# Cloud client
# --------------------------------------------------------------------------
# docs/PROTOCOL.md section 1. Every call but register carries the connector's
# credentials; a 401 becomes CredentialsRejected so the loops can slow down.


def cloud_error_message(response: HttpResponse) -> str:
    try:
        body = decode_json(response.content)
    except BadJson:
        return generic_error_message(response)
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return _short(body["error"])
    return _short(json.dumps(body))


def poll_wait_of(response: HttpResponse, asked: int) -> Optional[float]:
    """The hold a long-poll answer declares in X-Poll-Wait, at most what was
    asked; None when absent or not a positive number (an old cloud)."""
    text = response.headers.get(POLL_WAIT_HEADER)
    try:
        value = float(text) if text is not None and len(text) <= 16 else 0.0
    except ValueError:
        return None
    return min(value, float(asked)) if value > 0 and value == value else None


def snapshot_keepalive_of(response: HttpResponse) -> Optional[float]:
    """The seconds a batch answer's X-Snapshot-Keepalive names, at most
    SNAPSHOT_KEEPALIVE_MAX; None when absent or not a positive number."""
    text = response.headers.get(SNAPSHOT_KEEPALIVE_HEADER)
    try:
        value = float(text) if text is not None and len(text) <= 16 else 0.0
    except ValueError:
        return None
    return min(value, SNAPSHOT_KEEPALIVE_MAX) if value > 0 else None


class Cloud:
    def __init__(self, config: Config, log: Logger):
        self.config = config
        headers = {"User-Agent": user_agent(), "Accept": "application/json"}
        if config.paired:
            headers["Authorization"] = "Bearer %s" % config.connector_secret
            headers["X-Connector-Id"] = str(config.connector_id)
        self.http = HttpClient(config.cloud_url, headers, cloud_error_message, log, "cloud")
        self._paths = {}  # type: Dict[str, str]
        self.held = None  # type: Optional[float]  # the hold the last poll's answer declared

    def call(self, method: str, path: str, what: str, **kwargs) -> HttpResponse:
        try:
            return self.http.request(method, path, **kwargs)
        except HttpError as exc:
            if exc.status == 401:
                raise CredentialsRejected("credentials rejected by the cloud (%s): %s" % (what, exc)) from None
            raise

    def connector_path(self, suffix: str) -> str:
        """A path under /api/v1/connectors/:id, built once: the polls ask for
        theirs thousands of times an hour."""
        path = self._paths.get(suffix)
        if path is None:
            connector_id = quote(str(self.config.connector_id), safe="")
            path = self._paths[suffix] = "/api/v1/connectors/%s%s" % (connector_id, suffix)
        return path

    def register(self, body: Dict[str, Any], idempotency_key: str) -> Any:
        """A cloud that knows the Idempotency-Key header answers a repeat
        with the same key and token with the same credentials; one that does
        not ignores it."""
        try:
            response = self.http.request("POST", "/api/v1/connectors/register", json_body=body,
                                         headers={"Idempotency-Key": idempotency_key},
                                         **exchange_limits("register"))
        except HttpError as exc:
            if isinstance(exc, HttpStatusError) and 400 <= exc.status < 500 and exc.status not in (408, 429):
                raise PairingRejected(str(exc)) from None
            raise
        return response.json("register")  # read_registration checks it

    def heartbeat(self, body: Dict[str, Any]) -> Optional[str]:
        """The digest of the capabilities the cloud holds for this connector
        (extension capabilities_ack), or None."""
        response = self.call("POST", self.connector_path("/heartbeat"), "heartbeat", json_body=body)
        digest = response.headers.get(CAPABILITIES_HEADER)
        return digest if digest is not None and len(digest) <= 64 else None

    def poll_commands(self, splitter: JsonSplitter, progress: Optional[Callable[[int], None]] = None,
                      wait: Optional[int] = None) -> List[Any]:
        """The queued commands, read through `splitter` (Large transfers): an
        answer of any size costs a few chunks of memory, and its deadline
        grows with its Content-Length (read_body). With `wait`, a long-poll
        (_poll_response)."""
        response = self._poll_response("/commands?limit=%d" % COMMANDS_PER_POLL, "commands", wait,
                                       sink=splitter, max_bytes=MAX_COMMANDS_BODY, progress=progress)
        try:
            body = splitter.value()
        except BadJson as exc:
            ctype = response.headers.get("Content-Type", "?").split(";")[0]
            raise BadResponse("commands: expected JSON, got %s (%d bytes): %s" % (ctype, splitter.size, exc),
                              response.status) from None
        if not isinstance(body, list):
            raise BadResponse("commands: expected a JSON array, got %s (%d bytes)"
                              % (type(body).__name__, splitter.size))
        return body

    def complete(self, command_id: str, body: Dict[str, Any]) -> bool:
        """True when acknowledged; False when the cloud says the command is gone (404)."""
        try:
            self.call("POST", "/api/v1/commands/%s/complete" % quote(command_id, safe=""), "complete",
                      json_body=body)
        except CredentialsRejected:
            raise
        except HttpError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def push_snapshots(self, snapshots: List[Dict[str, Any]]) -> Optional[float]:
        """The keepalive the cloud names (extension quiet_snapshots), or None
        (push every time)."""
        response = self.call("POST", "/api/v1/snapshots/batch", "snapshots", json_body={"snapshots": snapshots})
        return snapshot_keepalive_of(response)

    def poll_webcam_requests(self, wait: Optional[int] = None) -> List[Any]:
        what = "webcam requests"
        return self._array(self._poll_response("/webcam_requests?limit=%d" % WEBCAM_REQUESTS_PER_POLL, what, wait),
                           what)

    def _poll_response(self, suffix: str, what: str, wait: Optional[int], **kwargs) -> HttpResponse:
        """One poll; with `wait`, a long-poll (extension "long_poll"): a cloud
        that holds the answer up to `wait` seconds says so in X-Poll-Wait, and
        `held` is then what it said (None: an ordinary answer). The read
        timeout and the deadline cover the hold."""
        self.held = None
        if wait is None:
            return self.call("GET", self.connector_path(suffix), what, **kwargs)
        response = self.call("GET", self.connector_path("%s&wait=%d" % (suffix, wait)), what,
                             **exchange_limits("held_poll", hold=wait), **kwargs)
        self.held = poll_wait_of(response, wait)
        return response

    def upload_webcam(self, request_id: str, printer_id: int, image: bytes, content_type: str) -> None:
        self.call("PUT", "/api/v1/webcam_requests/%s/upload" % quote(request_id, safe=""), "webcam upload",
                  data=image, headers={"Content-Type": content_type, "X-Printer-Id": str(printer_id)},
                  **exchange_limits("webcam_upload", size=len(image)))

    @staticmethod
    def _array(response: HttpResponse, what: str) -> List[Any]:
        body = response.json(what)
        if not isinstance(body, list):
            raise BadResponse("%s: expected a JSON array, got %s" % (what, type(body).__name__))
        return body

    def close(self) -> None:
        self.http.close()


# --------------------------------------------------------------------------
# Loops
# --------------------------------------------------------------------------
# Each loop is a thread with its own HTTP connections (a connection carries one
# request at a time), so a slow upload in one never holds up another. A
# failure backs off exponentially with jitter, capped at about a minute; a
# success resets the pace. Rejected credentials are retried slowly.
# A Loop owns its thread, its wake event, its failure count and, while it
# runs, its thread's clients (PrinterClients). The section comes early
# because the snapshot outbox and the status watcher pace their retries with
# backoff_delay, and the command lanes and webcams work on PrinterClients.


def backoff_delay(failures: int, interval: float) -> float:
    if failures <= 0:
        return interval
    delay = min(BACKOFF_CAP, max(interval, BACKOFF_BASE) * (2 ** min(failures, 10)))
    return delay * random.uniform(0.5, 1.0)


class PrinterClients:
    """One thread's HTTP clients: the cloud and each printer's Moonraker."""

    def __init__(self, config: Config, log: Logger):
        self.config, self.log = config, log
        self.cloud = Cloud(config, log)
        self._moonrakers = {}  # type: Dict[str, Moonraker]

    def moonraker(self, printer: PrinterConfig) -> Moonraker:
        client = self._moonrakers.get(printer.base_url)
        if client is None:
            client = self._moonrakers[printer.base_url] = Moonraker(printer, self.log, user_agent())
        return client

    def close(self) -> None:
        self.cloud.close()
        for client in self._moonrakers.values():
            client.close()


class Loop:
    """A named step run every `interval()` seconds, or sooner when woken. A
    step may return the delay before its next run instead (a long-poll the
    cloud held asks again at once); failures back off all the same."""

    def __init__(self, name: str, step: Callable[[PrinterClients], Optional[float]], interval: Callable[[], float],
                 stop: threading.Event, config: Config, log: Logger, backoff: bool = True):
        self.name, self.step, self.interval = name, step, interval
        self.stop, self.config, self.log = stop, config, log
        self.backoff = backoff  # False: the step paces its own retries
        self.wake = threading.Event()
        self.failures = FailureTracker(log, name)
        self.rejected = False  # the last failure was a 401: retry slowly
        self.pace = None  # type: Optional[float]  # the delay the last step asked for (a held long-poll: 0)
        self.clients = None  # type: Optional[PrinterClients]  # while running, for interrupt()
        self.thread = threading.Thread(target=self.run, name=name, daemon=True)

    def interrupt(self) -> None:
        """At stop: a poll the cloud holds must not hold up the exit."""
        clients = self.clients
        if clients is not None:
            clients.cloud.http.interrupt()

    def run_once(self, clients: PrinterClients) -> bool:
        self.rejected, self.pace = False, None
        try:
            self.pace = self.step(clients)
        except CredentialsRejected as exc:
            self.rejected = True
            self.failures.failed("credentials rejected: %s" % exc, level=40)
            return False
        except (HttpError, StateDirError) as exc:
            if not self.stop.is_set():  # at stop, interrupt() ends held polls on purpose
                self.failures.failed(str(exc))
            return False
        except OSError as exc:
            self.failures.failed("state_dir trouble: %s" % exc, level=40)
            return False
        except Exception as exc:  # a bug in one loop must not end the others
            self.failures.failed("unexpected %s: %s" % (type(exc).__name__, exc), level=40)
            return False
        self.failures.succeeded()
        return True

    def run(self) -> None:
        clients = self.clients = PrinterClients(self.config, self.log)
        failures = 0
        try:
            while not self.stop.is_set():
                if self.run_once(clients) or not self.backoff:
                    failures, delay = 0, self.interval() if self.pace is None else self.pace
                else:
                    failures += 1
                    delay = CREDENTIALS_RETRY_SECONDS if self.rejected else backoff_delay(failures, self.interval())
                self.wake.wait(delay)
                self.wake.clear()
        finally:
            clients.close()


# --------------------------------------------------------------------------
# Durable state
# --------------------------------------------------------------------------
# JSON-lines files in state_dir, each a regular file of ours (0600) opened
# without following links:
#  - commands.jsonl, the ledger: a command id is written ("running") and
#    fsynced before the command runs, its completion ("done") before it is
#    sent, and "acked" once the cloud has it. A re-delivered id is never run
#    again, and a "running" found at start-up was interrupted: it is
#    reported failed, not re-run. It is bounded in bytes whatever the
#    results hold: a completion is kept whole only until the cloud has it
#    (at most COMPLETION_MAX_BYTES each, LEDGER_PENDING_MAX_BYTES in all;
#    past either, the result is left out and the status kept), then only
#    what a re-delivered id needs, for the newest LEDGER_MAX_ENTRIES ids
#    within LEDGER_ACKED_MAX_BYTES and LEDGER_KEEP_SECONDS. The file is
#    rewritten only when it holds more than twice what is live plus
#    LEDGER_SLACK_BYTES, so a rewrite costs no more than the appends before it.
#  - snapshots-NNNNNNNN.jsonl, the spill (see SnapshotSpill).
# A file is read a line at a time: a line longer than STATE_RECORD_MAX_BYTES
# is skipped without being held, a record that does not decode is skipped,
# and the skips are counted in one warning per file. A link, FIFO or folder
# where a state file should be is renamed aside and a new file started.

SET_ASIDE_ERRNOS = frozenset({errno.ELOOP, errno.EINVAL, errno.EISDIR, errno.ENXIO})


def open_state_file(path: str, flags: int) -> int:
    """A descriptor on a regular file: never through a symlink, never blocked
    on a FIFO. A new file is 0600; an old one readable by others is made so."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        if info.st_nlink > 1:  # a hard link planted to some other file, which O_NOFOLLOW cannot see
            raise OSError(errno.EINVAL, "has other hard links", path)
        if info.st_mode & 0o077:
            try:
                os.fchmod(fd, 0o600)
            except OSError:
                pass  # not ours to change; reading it is still fine
    except BaseException:
        os.close(fd)
        raise
    return fd


def set_aside(path: str, log: Logger, exc: OSError) -> None:
    """Renames whatever stands where a state file should be, so that a new
    file can be started; the old thing is kept for whoever wants to look."""
    aside = "%s.refused-%d" % (path, int(time.time()))
    try:
        os.rename(path, aside)
    except OSError as err:
        log.error("a state file is unusable and cannot be moved aside", file=path, error=exc.strerror or str(exc),
                  rename_error=err.strerror or str(err))
        return
    log.warn("a state file was not a regular file; moved it aside and started a new one", file=path,
             moved_to=aside, error=exc.strerror or str(exc))


def iter_jsonl(path: str, log: Logger, accept: Optional[Callable[[Dict[str, Any]], bool]] = None
               ) -> Iterator[Dict[str, Any]]:
    """The file's records, one at a time; skipped lines (and records that
    `accept` refuses) are counted and logged once, at the end of the file."""
    try:
        fd = open_state_file(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno in SET_ASIDE_ERRNOS:
            set_aside(path, log, exc)
        else:
            log.error("cannot read a state file; going on without it", file=path, error=exc.strerror or str(exc))
        return
    skipped = 0
    with os.fdopen(fd, "rb", buffering=READ_CHUNK) as handle:
        while True:
            line = handle.readline(STATE_RECORD_MAX_BYTES + 1)
            if not line:
                break
            if len(line) > STATE_RECORD_MAX_BYTES and not line.endswith(b"\n"):
                skipped += 1
                while line and not line.endswith(b"\n"):  # the rest of it, a chunk at a time
                    line = handle.readline(READ_CHUNK)
                continue
            if not line.strip():
                continue
            body = line.strip()
            try:  # every record we write is one object on one line: anything else is not worth parsing
                record = decode_json(body) if body[:1] == b"{" and body[-1:] == b"}" else None
            except BadJson:
                record = None
            if isinstance(record, dict) and (accept is None or accept(record)):
                yield record
            else:
                skipped += 1
    if skipped:
        log.warn("skipping corrupt records in a state file", file=os.path.basename(path), skipped=skipped)


def encode_line(record: Dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode("utf-8") + b"\n"


def append_line(path: str, data: bytes, durable: bool = True) -> int:
    """Appends whole lines or nothing; returns the bytes written. What a full
    disk took only part of is cut off again, and after a line torn by a
    power cut a newline goes first, so the next record never fuses with it."""
    fd = open_state_file(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise
        return len(data)
    finally:
        os.close(fd)


def normalize_command_id(value) -> Optional[str]:
    """"7" and 7 are the same command; anything that is not an id is None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (int, str)):
        text = str(value).strip()
        return text or None
    return None


def printer_id_of(value) -> Optional[int]:
    command_id = normalize_command_id(value)
    if command_id is None or not re.fullmatch(r"[0-9]{1,18}", command_id):
        return None  # "²".isdigit() is True, but int("²") fails
    return int(command_id)


def usable_command_id(value) -> Optional[str]:
    """An id that can be recorded, logged and put in a URL: short and printable."""
    command_id = normalize_command_id(value)
    if command_id is None or len(command_id) > COMMAND_ID_MAX_CHARS or not command_id.isprintable():
        return None
    return command_id


def action_name(value) -> Optional[str]:
    """The action as the ledger may keep it: a short printable name, or None."""
    if isinstance(value, str) and 0 < len(value) <= ACTION_MAX_CHARS and value.isprintable():
        return value
    return None


def omitted_completion(completion: Dict[str, Any], action: Optional[str], why: str) -> Dict[str, Any]:
    """A completion too large to keep: its status and message, not its result."""
    body = {"status": completion.get("status") if isinstance(completion.get("status"), str) else "failed",
            "result": {"action": action, "result_omitted": why}}  # type: Dict[str, Any]
    if isinstance(completion.get("error_message"), str):
        body["error_message"] = _short(completion["error_message"], 300)
    return body


class _LedgerEntry:
    __slots__ = ("state", "t", "action", "printer_id", "completion", "summary", "size")

    def __init__(self, t: float):
        self.state, self.t, self.action, self.printer_id = None, t, None, None
        self.completion = self.summary = None  # type: Optional[bytes]  # encoded JSON
        self.size = 0

    def set_completion(self, completion: Dict[str, Any], encoded: bytes) -> None:
        self.completion = encoded
        if len(encoded) <= ACKED_COMPLETION_MAX_BYTES:
            self.summary = encoded
        else:
            self.summary = json.dumps(omitted_completion(completion, self.action, "acknowledged"),
                                      separators=(",", ":")).encode("utf-8")

    def kept_completion(self) -> Optional[bytes]:
        return self.completion if self.state == "done" else self.summary if self.state == "acked" else None

    def line(self, command_id: str) -> bytes:
        head = json.dumps({"id": command_id, "state": self.state, "t": self.t, "action": self.action,
                           "printer_id": self.printer_id}, separators=(",", ":")).encode("utf-8")
        kept = self.kept_completion()
        return (head[:-1] + b',"completion":' + kept + b"}\n") if kept is not None else head + b"\n"


class Ledger:
    """Every recent command id, its state and, until acknowledged, its completion.

    Thread-safe: lanes may record and deliver at once. Completions are held
    encoded (bytes), a third of what the decoded objects would cost."""

    def __init__(self, state_dir: str, log: Logger):
        self.path = os.path.join(state_dir, "commands.jsonl")
        self.log = log
        self.lock = threading.RLock()
        self.entries = {}  # type: Dict[str, _LedgerEntry]
        self.acked_order = collections.OrderedDict()  # type: collections.OrderedDict  # id -> None, oldest first
        self.held = {}  # type: Dict[str, Dict[str, Any]]  # completions that could not be recorded yet
        self.live_bytes = self.pending_bytes = self.acked_bytes = 0
        self.file_bytes = 0
        self.compact_floor = 0
        self.ack_write_failed = False
        self.undated = set()  # type: set
        for _ in iter_jsonl(self.path, log, accept=self._load):
            pass
        try:  # a file we could not read is never compacted away (its ids would run again)
            self.file_bytes = os.lstat(self.path).st_size if os.access(self.path, os.R_OK) else 0
        except OSError:
            self.file_bytes = 0
        self._account_loaded()
        self._compact_if_needed(force=bool(self.undated))
        self.undated.clear()

    # -- loading ----------------------------------------------------------

    def _load(self, record: Dict[str, Any]) -> bool:
        command_id = usable_command_id(record.get("id"))
        state = record.get("state")
        completion = record.get("completion")
        if command_id is None or state not in ("running", "done", "acked"):
            return False
        if state == "done" and not isinstance(completion, dict):
            return False
        entry = self.entries.get(command_id)
        if entry is None:
            entry = self.entries[command_id] = _LedgerEntry(round(time.time(), 3))
            self.undated.add(command_id)  # until a record says when: written down once loaded
        if _is_number(record.get("t")) and math.isfinite(record["t"]):
            entry.t = float(record["t"])
            self.undated.discard(command_id)
        if "action" in record:
            entry.action = action_name(record["action"])
        if "printer_id" in record:
            entry.printer_id = printer_id_of(record["printer_id"])
        if isinstance(completion, dict) and state != "running":
            encoded = json.dumps(completion, separators=(",", ":")).encode("utf-8")
            if len(encoded) > COMPLETION_MAX_BYTES:
                completion = omitted_completion(completion, entry.action, "%d bytes" % len(encoded))
                encoded = json.dumps(completion, separators=(",", ":")).encode("utf-8")
            entry.set_completion(completion, encoded)
        entry.state = state
        if state == "acked":
            entry.completion = None
        return True

    def _account_loaded(self) -> None:
        """Sizes, ack order and the bounds, once the whole file is read."""
        for command_id, entry in list(self.entries.items()):
            if entry.state == "done" and self.pending_bytes + len(entry.completion) > LEDGER_PENDING_MAX_BYTES:
                reduced = omitted_completion(decode_json(entry.completion), entry.action,
                                             "over the %d bytes of results kept undelivered"
                                             % LEDGER_PENDING_MAX_BYTES)
                entry.set_completion(reduced, json.dumps(reduced, separators=(",", ":")).encode("utf-8"))
            if entry.state == "done":
                self.pending_bytes += len(entry.completion)
            entry.size = len(entry.line(command_id))
            self.live_bytes += entry.size
            if entry.state == "acked":
                self.acked_order[command_id] = None
                self.acked_bytes += entry.size
        self._evict()

    # -- bookkeeping --------------------------------------------------------

    def _resize(self, command_id: str, entry: _LedgerEntry) -> None:
        size = len(entry.line(command_id))
        self.live_bytes += size - entry.size
        entry.size = size

    def _unack(self, command_id: str, entry: _LedgerEntry) -> None:
        if entry.state == "acked":
            del self.acked_order[command_id]
            self.acked_bytes -= entry.size
        if entry.state == "done":
            self.pending_bytes -= len(entry.completion)

    def _evict(self) -> None:
        """The oldest acknowledged ids go first, past any of the three bounds."""
        expiry = time.time() - LEDGER_KEEP_SECONDS
        while self.acked_order:
            oldest = next(iter(self.acked_order))
            entry = self.entries[oldest]
            if (len(self.acked_order) <= LEDGER_MAX_ENTRIES and self.acked_bytes <= LEDGER_ACKED_MAX_BYTES
                    and entry.t >= expiry):
                break
            self.acked_order.popitem(last=False)
            self.acked_bytes -= entry.size
            self.live_bytes -= entry.size
            del self.entries[oldest]

    def _append(self, data: bytes, durable: bool = True) -> None:
        self.file_bytes += append_line(self.path, data, durable)

    def _compact_if_needed(self, force: bool = False) -> None:
        if not force and self.file_bytes <= max(2 * self.live_bytes + LEDGER_SLACK_BYTES, self.compact_floor):
            return
        try:
            atomic_write(self.path, b"".join(e.line(cid) for cid, e in self.entries.items()))
        except OSError as exc:
            # The appended file is still right; try again after more appends.
            self.compact_floor = self.file_bytes + LEDGER_SLACK_BYTES
            self.log.warn("cannot compact the command ledger", error=exc.strerror or str(exc))
            return
        self.file_bytes, self.compact_floor = self.live_bytes, 0

    # -- the record ---------------------------------------------------------

    def get(self, command_id: str) -> Optional[Dict[str, Any]]:
        with self.lock:
            entry = self.entries.get(command_id)
            if entry is None:
                return None
            kept = entry.kept_completion()
            return {"id": command_id, "state": entry.state, "t": entry.t, "action": entry.action,
                    "printer_id": entry.printer_id, "completion": decode_json(kept) if kept else None}

    def claim(self, command_id: str, action: Optional[str], printer_id: Optional[int]) -> Optional[Dict[str, Any]]:
        """What the ledger knows of the id; or, when nothing, the id recorded
        as running (OSError if it cannot be), in one step: two lanes handed
        the same id cannot both run it."""
        with self.lock:
            known = self.get(command_id)
            if known is None:
                self.start(command_id, action, printer_id)
            return known

    def start(self, command_id: str, action: Optional[str], printer_id: Optional[int]) -> None:
        """Recorded and fsynced, or OSError: only then may the command run."""
        with self.lock:
            entry = _LedgerEntry(round(time.time(), 3))
            entry.state, entry.action, entry.printer_id = "running", action, printer_id
            self._append(encode_line({"id": command_id, "state": "running", "t": entry.t, "action": action,
                                      "printer_id": printer_id}))
            self.entries[command_id] = entry
            self._resize(command_id, entry)

    def finish(self, command_id: str, completion: Dict[str, Any]) -> Dict[str, Any]:
        """Records the completion (fsynced) and returns it as recorded: whole,
        or without its result past the byte bounds. OSError: nothing recorded."""
        with self.lock:
            entry = self.entries.get(command_id)
            action = entry.action if entry is not None else None
            if json_deeper_than(completion, MAX_JSON_DEPTH - 2):  # its record could not be read back
                completion = omitted_completion(completion, action, "nested deeper than %d levels"
                                                % (MAX_JSON_DEPTH - 2))
            encoded = json.dumps(completion, separators=(",", ":"), default=repr).encode("utf-8")
            pending = self.pending_bytes - (len(entry.completion) if entry is not None and entry.state == "done"
                                            else 0)
            if len(encoded) > COMPLETION_MAX_BYTES or pending + len(encoded) > LEDGER_PENDING_MAX_BYTES:
                why = ("%d bytes, over the %d kept for one result" % (len(encoded), COMPLETION_MAX_BYTES)
                       if len(encoded) > COMPLETION_MAX_BYTES else
                       "over the %d bytes of results kept undelivered" % LEDGER_PENDING_MAX_BYTES)
                self.log.warn("command result too large to keep; its status is kept and sent without it",
                              id=command_id, bytes=len(encoded))
                completion = omitted_completion(completion, action, why)
                encoded = json.dumps(completion, separators=(",", ":")).encode("utf-8")
            head = json.dumps({"id": command_id, "state": "done"}, separators=(",", ":")).encode("utf-8")
            self._append(head[:-1] + b',"completion":' + encoded + b"}\n")
            self.held.pop(command_id, None)
            if entry is None:
                entry = self.entries[command_id] = _LedgerEntry(round(time.time(), 3))
                entry.action = action
            self._unack(command_id, entry)
            entry.state = "done"
            entry.set_completion(completion, encoded)
            self.pending_bytes += len(encoded)
            self._resize(command_id, entry)
            return completion

    def acked(self, command_id: str) -> None:
        """The cloud has the completion. Not fsynced, and a failed write is
        only logged: losing it means the completion is sent once more, which
        the cloud accepts."""
        with self.lock:
            entry = self.entries.get(command_id)
            if entry is None or entry.state != "done":
                return
            try:
                self._append(encode_line({"id": command_id, "state": "acked"}), durable=False)
                self.ack_write_failed = False
            except OSError as exc:
                if not self.ack_write_failed:
                    self.log.warn("cannot record an acknowledgement; the completion may be sent once more "
                                  "after a restart", id=command_id, error=exc.strerror or str(exc))
                self.ack_write_failed = True
            self._unack(command_id, entry)
            entry.state, entry.completion = "acked", None
            self._resize(command_id, entry)
            self.acked_order[command_id] = None
            self.acked_bytes += entry.size
            self._evict()
            self._compact_if_needed()

    def hold(self, command_id: str, completion: Dict[str, Any]) -> None:
        """A completion that could not be recorded: kept in memory only, and
        neither sent nor forgotten until record_held() gets it on disk."""
        with self.lock:
            self.held[command_id] = completion

    def record_held(self) -> None:
        with self.lock:
            for command_id, completion in list(self.held.items()):
                try:
                    self.finish(command_id, completion)
                except OSError:
                    return

    def unacked(self) -> List[Tuple[str, Dict[str, Any]]]:
        with self.lock:
            if not self.pending_bytes:  # every poll asks: nothing to walk
                return []
            return [(cid, decode_json(e.completion)) for cid, e in self.entries.items() if e.state == "done"]

    def interrupted(self) -> List[Dict[str, Any]]:
        with self.lock:
            return [{"id": cid, "action": e.action, "printer_id": e.printer_id, "t": e.t}
                    for cid, e in self.entries.items() if e.state == "running" and cid not in self.held]

    def compact_if_needed(self) -> None:
        with self.lock:
            self._evict()
            self._compact_if_needed()


def refused_by_cloud(exc: Exception) -> bool:
    """A 4xx that retrying cannot change (not 401, 408 or 429)."""
    status = getattr(exc, "status", None)
    return isinstance(status, int) and 400 <= status < 500 and status not in (401, 408, 429)


class SnapshotSpill:
    """Snapshots the cloud has not taken yet: on disk, bounded, oldest first.

    Kept in segments (snapshots-00000001.jsonl, ...), each at most
    1/SPILL_SEGMENTS of either bound; past a bound the oldest segment is
    deleted whole. So a snapshot at the bound costs its own bytes and now and
    then an unlink, not a rewrite of the outbox; the outbox then holds
    between (SPILL_SEGMENTS-1)/SPILL_SEGMENTS of the bound and the bound.
    snapshots.sent ("SEQ COUNT") says how many records of segment SEQ have
    been delivered; segments older than SEQ are delivered and deleted. It is
    written only while the cloud is unreachable, so a healthy connector
    causes no disk writes for snapshots (SD cards wear out). A record the
    cloud refuses SNAPSHOT_REFUSALS times is set aside in
    snapshots.refused.jsonl (at most SNAPSHOT_REFUSED_MAX_BYTES; past that
    only counted) so that it cannot hold up those behind it."""

    LEGACY = "snapshots.jsonl"  # 0.1.0's single file: becomes segment 0

    def __init__(self, state_dir: str, log: Logger, max_snapshots: Optional[int] = None,
                 max_bytes: Optional[int] = None):
        self.dir = state_dir
        self.sent_path = os.path.join(state_dir, "snapshots.sent")
        self.refused_path = os.path.join(state_dir, "snapshots.refused.jsonl")
        self.log = log
        self.max_snapshots = max_snapshots or SPILL_MAX_SNAPSHOTS
        self.max_bytes = max_bytes or SPILL_MAX_BYTES
        self.segment_records = max(1, -(-self.max_snapshots // SPILL_SEGMENTS))
        self.segment_bytes = max(1, self.max_bytes // SPILL_SEGMENTS)
        self.lock = threading.RLock()
        self.dropped_total = 0
        self.refused_total = 0
        self.refusals = 0  # how often the record at the head was refused in a row
        self.isolate = False  # after a refused batch, records go one at a time
        self._segments = None  # type: Optional[collections.OrderedDict]  # seq -> [records, bytes]
        self._marker = (0, 0)  # (seq, records of it delivered)
        self._last_seq = 0  # the newest segment's number, used or not

    def segment_path(self, seq: int) -> str:
        return os.path.join(self.dir, "snapshots-%08d.jsonl" % seq)

    # -- what is on disk ------------------------------------------------------

    def _segs(self) -> "collections.OrderedDict":
        if self._segments is None:
            self._segments = self._scan()
        return self._segments

    def _scan(self) -> "collections.OrderedDict":
        legacy = os.path.join(self.dir, self.LEGACY)
        if os.path.lexists(legacy) and not os.path.lexists(self.segment_path(0)):
            os.rename(legacy, self.segment_path(0))
        try:
            names = os.listdir(self.dir)
        except OSError:
            names = []
        seqs = sorted(int(n[10:18]) for n in names
                      if len(n) == 24 and n.startswith("snapshots-") and n.endswith(".jsonl") and n[10:18].isdigit())
        self._marker = self._read_marker(seqs[0] if seqs else 0)
        self._last_seq = max(seqs + [self._marker[0]])
        segments = collections.OrderedDict()
        for seq in seqs:
            path = self.segment_path(seq)
            if seq < self._marker[0]:
                self._remove(path)  # delivered before an interruption
                continue
            records = sum(1 for _ in iter_jsonl(path, self.log))
            try:
                size = os.lstat(path).st_size
            except OSError:
                continue  # set aside by iter_jsonl
            segments[seq] = [records, size]
        return segments

    def _read_marker(self, oldest: int) -> Tuple[int, int]:
        try:
            fd = open_state_file(self.sent_path, os.O_RDONLY)
        except OSError:
            return oldest, 0
        with os.fdopen(fd, "rb") as handle:
            words = handle.read(64).split()
        try:
            numbers = [int(w) for w in words]
        except ValueError:
            return oldest, 0
        if len(numbers) == 1:  # 0.1.0: a count into its single file
            numbers = [oldest] + numbers
        if len(numbers) != 2 or min(numbers) < 0 or numbers[0] < oldest:
            return oldest, 0
        return numbers[0], numbers[1]

    def _mark(self, seq: int, count: int) -> None:
        atomic_write(self.sent_path, b"%d %d\n" % (seq, count))
        self._marker = (seq, count)
        for old in [s for s in self._segs() if s < seq]:
            self._remove(self.segment_path(old))
            del self._segs()[old]

    def count(self) -> int:
        with self.lock:
            segments = self._segs()
            total = sum(records for records, _ in segments.values())
            if segments and self._marker[0] in segments:
                total -= min(self._marker[1], segments[self._marker[0]][0])
            return total

    def size(self) -> int:
        """Bytes on disk in segments."""
        with self.lock:
            return sum(size for _, size in self._segs().values())

    # -- adding -------------------------------------------------------------

    def add(self, snapshots: List[Dict[str, Any]]) -> None:
        if not snapshots:
            return
        with self.lock:
            segments = self._segs()
            chunks = collections.OrderedDict()  # type: collections.OrderedDict  # seq -> [lines]
            for snapshot in snapshots:
                line = encode_line(snapshot)
                if len(line) > min(STATE_RECORD_MAX_BYTES, self.max_bytes):
                    self.dropped_total += 1
                    self.log.warn("snapshot too large for the outbox; dropped", bytes=len(line))
                    continue
                seq = self._last_seq
                records, size = segments.get(seq, (0, 0))
                if seq not in segments or records >= self.segment_records or size + len(line) > self.segment_bytes:
                    seq = self._last_seq = self._last_seq + 1
                    records, size = 0, 0
                segments[seq] = [records + 1, size + len(line)]
                chunks.setdefault(seq, []).append(line)
            try:
                for seq, lines in chunks.items():
                    append_line(self.segment_path(seq), b"".join(lines))
            except OSError:
                self._segments = None  # count again from what the disk holds
                raise
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        segments = self._segs()
        dropped = 0
        while segments and (sum(r for r, _ in segments.values()) > self.max_snapshots
                            or sum(s for _, s in segments.values()) > self.max_bytes):
            seq, (records, _) = segments.popitem(last=False)
            self._remove(self.segment_path(seq))
            dropped += records - (min(self._marker[1], records) if seq == self._marker[0] else 0)
        if dropped:
            self.dropped_total += dropped
            self.log.warn("snapshot outbox full: dropped the oldest snapshots", dropped=dropped,
                          kept=self.count(), dropped_total=self.dropped_total)

    # -- delivering -----------------------------------------------------------

    def _pending(self) -> Iterator[Tuple[int, int, Dict[str, Any]]]:
        """(seq, position in its segment, record), oldest first."""
        for seq in list(self._segs()):
            skip = self._marker[1] if seq == self._marker[0] else 0
            for index, record in enumerate(iter_jsonl(self.segment_path(seq), self.log), 1):
                if index > skip:
                    yield seq, index, record

    def drain(self, send: Callable[[List[Dict[str, Any]]], Any]) -> int:
        """Send pending snapshots oldest first, in batches; returns how many went.

        Progress is recorded after every batch but the last, so an
        interruption resends at most one batch.
        """
        with self.lock:
            if not self.count():
                return 0
            size = 1 if self.isolate else SNAPSHOT_BATCH
            delivered, batch, last = 0, [], (0, 0)
            for seq, index, record in self._pending():
                if len(batch) == size:
                    delivered += self._deliver(send, batch, last)
                    self._mark(*last)
                    batch = []
                batch.append(record)
                last = (seq, index)
            if batch:
                delivered += self._deliver(send, batch, last)
            self._clear()
            self.isolate = False
            return delivered

    def _deliver(self, send: Callable[[List[Dict[str, Any]]], None], batch: List[Dict[str, Any]],
                 last: Tuple[int, int]) -> int:
        try:
            send(batch)
        except ConnectorError as exc:
            if not refused_by_cloud(exc):
                raise
            if len(batch) > 1:
                self.isolate = True  # find the one refused: next time, one at a time
                raise
            self.refusals += 1
            if self.refusals < SNAPSHOT_REFUSALS:
                raise
            self._set_aside(batch[0], exc)
            self._mark(*last)
            return 0
        self.refusals = 0
        return len(batch)

    def _set_aside(self, record: Dict[str, Any], exc: Exception) -> None:
        self.refusals = 0
        self.refused_total += 1
        kept = False
        entry = {"refused_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "error": _short(str(exc)),
                 "snapshot": record}
        try:
            if self._refused_room():
                append_line(self.refused_path, encode_line(entry))
                kept = True
        except OSError:
            pass  # counted all the same
        level = 30 if self.refused_total == 1 else 10  # logged once; the later ones are counted
        self.log.log(level, "the cloud refused a snapshot %d times; set it aside and went on with the others"
                     % SNAPSHOT_REFUSALS, error=_short(str(exc)), refused_total=self.refused_total,
                     kept_in=os.path.basename(self.refused_path) if kept else None)

    def _refused_room(self) -> bool:
        try:
            return os.lstat(self.refused_path).st_size < SNAPSHOT_REFUSED_MAX_BYTES
        except FileNotFoundError:
            return True

    def _clear(self) -> None:
        for seq in list(self._segs()):
            self._remove(self.segment_path(seq))
        self._segs().clear()
        self._remove(self.sent_path)
        self._marker = (0, 0)

    @staticmethod
    def _remove(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def check_state_dir_owner(state_dir: str, me: Optional[int] = None) -> None:
    """state_dir, and a link to it, must belong to this user or to root, and
    not be writable by every user: whoever else could replace it or its
    files could read the ledger or point our writes elsewhere. Root may use
    a folder of another user (the installers give it to the service user,
    and an owner runs --once with sudo), but never through their link."""
    me = os.geteuid() if me is None else me
    link = os.lstat(state_dir)
    if stat.S_ISLNK(link.st_mode) and link.st_uid not in (0, me):
        raise StateDirError("state_dir %s is a symbolic link owned by uid %d, not by this user (uid %d) or root; "
                            "refusing to follow it" % (state_dir, link.st_uid, me))
    info = os.stat(state_dir)
    if me != 0 and info.st_uid not in (0, me):
        raise StateDirError("state_dir %s belongs to uid %d, not to this user (uid %d) or root"
                            % (state_dir, info.st_uid, me))
    if info.st_mode & 0o002 and not info.st_mode & stat.S_ISVTX:
        raise StateDirError("state_dir %s is writable by every user (mode %o); make it 0700"
                            % (state_dir, info.st_mode & 0o7777))


def check_state_dir(state_dir: str) -> None:
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        check_state_dir_owner(state_dir)
        fd, probe = create_temp_file(state_dir, ".probe.")
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise StateDirError("state_dir %s is not writable: %s" % (state_dir, exc.strerror or exc)) from None


# --------------------------------------------------------------------------
# Actions
# --------------------------------------------------------------------------
# docs/PROTOCOL.md 1.7. Each handler validates its params before Moonraker is
# touched and returns the result fields; failures raise CommandFailed. The
# ACTIONS table at the end maps action names to handlers.


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: Any) -> Optional[float]:
    if not isinstance(text, str):
        return None
    value = text.strip().replace("Z", "+00:00").replace("z", "+00:00")
    if "." in value:  # fromisoformat on 3.8 takes only 3 or 6 fraction digits
        head, _, tail = value.partition(".")
        digits = "".join(c for c in tail if c.isdigit())
        value = head + "." + (digits + "000000")[:6] + tail[len(digits):]
    try:
        stamp = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=datetime.timezone.utc)
    return stamp.timestamp()


# A file name must mean the same file to us, to Moonraker and to the disk.
# Moonraker strips white space from the ends of a name (Python's strip(), so
# U+3000 too): "a/ .." would become "a/..". Its path check is lexical, so a
# link inside gcodes leads out of it: where the folder is on this host, the
# real path is checked too (check_gcodes_path).
MAX_FILENAME_BYTES = 4096
MAX_SEGMENT_BYTES = 255
_LOOPBACK_HOST = re.compile(r"^(localhost|127(\.[0-9]{1,3}){3}|::1)$")


def validate_filename(params: Dict[str, Any], key: str = "filename") -> str:
    name = params.get(key)
    if not isinstance(name, str) or not name:
        raise CommandFailed("missing or invalid param '%s' (a file name)" % key)
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise CommandFailed("invalid filename: not valid Unicode (a lone surrogate)") from None
    if size > MAX_FILENAME_BYTES:
        raise CommandFailed("invalid filename: longer than %d bytes" % MAX_FILENAME_BYTES)
    unsafe = UNSAFE_CHARACTER.search(name)
    if unsafe:
        raise CommandFailed("invalid filename: contains a control or line-separator character (U+%04X)"
                            % ord(unsafe.group()))
    if "\\" in name:
        raise CommandFailed("invalid filename: contains a backslash")
    if name.startswith("/"):
        raise CommandFailed("invalid filename: absolute paths are not allowed")
    for segment in name.split("/"):
        if segment in ("", ".", ".."):
            raise CommandFailed("invalid filename: empty, '.' or '..' path segment in %r" % _short(name, 120))
        if segment.strip() != segment:
            raise CommandFailed("invalid filename: a path segment starts or ends with white space in %r "
                                "(Moonraker would strip it)" % _short(name, 120))
        if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
            raise CommandFailed("invalid filename: a path segment is longer than %d bytes" % MAX_SEGMENT_BYTES)
    return name


class Console:
    """What Klipper prints on its console (Moonraker's notify_gcode_response)
    while a gcode command runs, bounded. The printer's status watcher feeds it
    from the websocket it already holds and, while connected, sets `sync`: a
    round trip on that websocket, whose answer comes after every console line
    Moonraker queued before it (one queue per client), so nothing the script
    printed is missed."""

    def __init__(self):
        self.lock = threading.Lock()
        self.lines = None  # type: Optional[List[str]]  # a list while capturing
        self.size = 0
        self.truncated = False
        self.sync = None  # type: Optional[Callable[[float], bool]]

    def begin(self) -> None:
        with self.lock:
            self.lines, self.size, self.truncated = [], 0, False

    def feed(self, lines: Any) -> None:
        with self.lock:
            if self.lines is None or not isinstance(lines, list):
                return
            for line in lines:
                if not isinstance(line, str):
                    continue
                if len(self.lines) >= CONSOLE_MAX_LINES or self.size + len(line) > CONSOLE_MAX_BYTES:
                    self.truncated = True
                    return
                self.lines.append(line)
                self.size += len(line)

    def end(self) -> Dict[str, Any]:
        """The result fields: `console` (the lines), and `console_truncated`
        or `console_incomplete` (no websocket to read it from) when so."""
        sync = self.sync
        synced = sync is not None and sync(CONSOLE_SETTLE_SECONDS)
        with self.lock:
            lines, truncated, self.lines = self.lines or [], self.truncated, None
        fields = {"console": lines}  # type: Dict[str, Any]
        if truncated:
            fields["console_truncated"] = True
        if not synced:
            fields["console_incomplete"] = "the printer's websocket is not connected"
        return fields


@dataclass
class ActionContext:
    """What a handler may use: the printer's Moonraker and the agent's stop flag."""
    moonraker: Moonraker
    printer: PrinterConfig
    config: Config
    log: Logger
    stop: threading.Event
    console: Optional["Console"] = None  # the printer's console, while its websocket is up


# A transfer URL (upload_file's `url`, create_backup's `presigned_url`) is the
# cloud's to choose, so it must not lead to a printer's own Moonraker or web
# UI: a GET of http://127.0.0.1:7125/server/files/config/moonraker.conf
# would put the printer's config in gcodes, where the next backup carries it
# to the cloud, and Moonraker trusts this host without an API key. Nor to
# anything else on the owner's network (a router's admin page, a NAS): a URL
# may reach only public addresses, except the cloud's own address and port
# (when cloud_url names an address, not a name) and the hosts the owner
# names in transfer_allow_hosts (a MinIO on the LAN);
# the printers stay refused even there. The comparison is on the addresses
# the connection uses (AddressGuard), so a name that resolves elsewhere at
# the connect is judged by where it leads then; redirects are not followed.
# A printer on this host is refused on every local address, since Moonraker
# often listens on all.

def transfer_guard(config: Config) -> AddressGuard:
    refused = {}  # type: Dict[Tuple[str, int], str]
    local_ports = {}  # type: Dict[int, str]
    names = {}  # type: Dict[Tuple[str, int], str]
    for printer in config.moonraker:
        label = "printer %s" % _short(printer.name or printer.base_url, 60)
        for what, port in (("Moonraker", url_origin(printer.base_url)[2] or 0), ("web UI", printer.ui_port)):
            found = "%s's %s" % (label, what)
            names[(printer.host.lower().rstrip("."), port)] = found
            try:
                addresses = {canonical_ip(info[4][0]) for info in resolve(printer.host, port, CONNECT_TIMEOUT)}
            except OSError:
                addresses = set()  # its name, at least, is refused
            for address in addresses:
                refused[(address, port)] = found
            if any(is_local_address(address) for address in addresses):
                local_ports[port] = found
    # The cloud's own host and port only when cloud_url gives an address: a
    # name is the cloud's to point anywhere (192.168.1.1 for the port), so a
    # self-hosted cloud named on the LAN is listed in transfer_allow_hosts.
    allowed = list(config.transfer_allow_hosts)
    cloud = url_origin(config.cloud_url)
    try:
        ipaddress.ip_address(cloud[1])
        allowed.append((cloud[1], cloud[2]))
    except ValueError:
        pass
    return AddressGuard(refused, local_ports, names, allowed)


def gcodes_folder(ctx: ActionContext, filename: str) -> Optional[str]:
    """Moonraker's gcodes folder when it is on this host; None when that
    cannot be known (a remote Moonraker, or one without /server/files/roots)."""
    if not _LOOPBACK_HOST.match(ctx.printer.host):
        return None
    try:
        roots = ctx.moonraker.call("GET", "/server/files/roots")
    except HttpError as exc:
        if getattr(exc, "status", None) == 404:
            return None
        raise CommandFailed("cannot check the gcodes folder: %s" % exc, {"filename": filename}) from None
    for root in roots if isinstance(roots, list) else []:
        path = root.get("path") if isinstance(root, dict) and root.get("name") == "gcodes" else None
        if isinstance(path, str) and path.startswith("/") and os.path.isdir(path):
            return path
    return None


def check_gcodes_path(ctx: ActionContext, filename: str) -> None:
    """Refuses a (validated) name whose real path leaves the gcodes folder
    through a link, where that folder is on this host. gcodes itself may be
    a link (to a USB stick, say): the check is against where it leads."""
    folder = gcodes_folder(ctx, filename)
    if folder is None:
        return
    real_folder = os.path.realpath(folder)
    target = os.path.realpath(os.path.join(folder, filename))
    if target != real_folder and not target.startswith(real_folder.rstrip("/") + "/"):
        ctx.log.warn("file action refused: the name leads out of gcodes through a link", filename=filename,
                     target=target)
        raise CommandFailed("invalid filename: %r leads out of the gcodes folder through a symbolic link"
                            % _short(filename, 120), {"filename": filename})


def _moonraker(ctx: ActionContext, result: Dict[str, Any], method: str, path: str, **kwargs) -> Any:
    """A Moonraker call whose failure fails the command with `result` kept."""
    try:
        return ctx.moonraker.call(method, path, **kwargs)
    except HttpError as exc:
        raise CommandFailed(str(exc), result) from None


# Print control. Klipper runs G-code one command at a time, and Moonraker
# answers /printer/print/* and gcode/script only once Klipper has run them:
# behind a heat-up (M109/M190) that is minutes. So each control:
#  1. reads Klipper's state first (print_stats, webhooks, toolhead) and fails
#     at once, sending nothing, when it cannot apply: pause with nothing
#     printing, start while a print runs, Klipper shut down. An unreadable
#     state is no verdict: the command goes and Moonraker's answer says why;
#  2. waits up to a stated bound for the answer (the read timeouts of
#     EXCHANGES "print_control" and "homing"), then reads the state again and reports it as
#     "state" (and "homed_axes" after homing); an answer whose state shows
#     the control did not take effect fails the command;
#  3. when no answer came in time but Moonraker still answers a state
#     query, the request is queued in Klipper and runs when the G-code ahead
#     of it ends: "succeeded" with "pending": true and the state seen then.
#     The change itself reaches the cloud in a snapshot when it happens.


@dataclass(frozen=True)
class PrintControl:
    path: str
    applies_in: Tuple[str, ...]  # print_stats states it can act on
    already_in: Tuple[str, ...]  # states in which it has nothing left to do
    takes_effect_as: Tuple[str, ...]  # states that show it worked


PRINT_CONTROLS = {
    "pause": PrintControl("/printer/print/pause", ("printing",), ("paused",), ("paused",)),
    "resume": PrintControl("/printer/print/resume", ("paused",), ("printing",), ("printing",)),
    "cancel": PrintControl("/printer/print/cancel", ("printing", "paused"), (), ("cancelled",)),
}
PRINT_RUNNING = ("printing", "paused")
KLIPPER_STATE_OBJECTS = ("print_stats", "webhooks", "toolhead")


def _klipper_state(ctx: ActionContext) -> Optional[Dict[str, Any]]:
    """The status objects of KLIPPER_STATE_OBJECTS, or None when Moonraker
    cannot give them (Klipper not connected: its own answer will say so)."""
    try:
        status = ctx.moonraker.query_status(KLIPPER_STATE_OBJECTS)["status"]
    except HttpError:
        return None
    return {name: value for name, value in status.items() if isinstance(value, dict)}


def _field(status: Dict[str, Any], name: str, key: str) -> Optional[str]:
    value = status.get(name, {}).get(key)
    return value if isinstance(value, str) else None


def _not_ready(status: Dict[str, Any]) -> Optional[str]:
    """"Klipper is shutdown: <why>" when Klipper is not ready, else None."""
    state = _field(status, "webhooks", "state")
    if state in (None, "ready"):
        return None
    lines = (_field(status, "webhooks", "state_message") or "").strip().splitlines()
    return "Klipper is %s%s" % (state, ": " + _short(lines[0], 160) if lines else "")


def _require_ready(status: Dict[str, Any], doing: str, result: Dict[str, Any]) -> None:
    why = _not_ready(status)
    if why is not None:
        raise CommandFailed("cannot %s: %s" % (doing, why), result)


# What Moonraker answers when Klipper refuses a request says little: HTTP 400
# "Unknown" for anything sent while Klipper is shut down (Moonraker 0.11),
# "SD busy" for a print start while a print runs. Either may come although
# the state read just before allowed the request: Klipper shut down (a lost
# MCU), or someone started a print from the web UI, in between. The state
# read after the refusal says which, and the command fails saying so.

def _refusal(ctx: ActionContext, doing: str, exc: HttpError, result: Dict[str, Any],
             keep_state: bool = True) -> CommandFailed:
    """The failure of a request Moonraker refused, explained by Klipper's
    state now; keep_state: the print state that explains it goes into result."""
    status = _klipper_state(ctx) if isinstance(exc, HttpStatusError) and 400 <= exc.status < 500 else None
    if status is None:
        return CommandFailed(str(exc), result)
    state = _field(status, "print_stats", "state")
    why = _not_ready(status)
    if keep_state and state is not None and (why is not None or state in PRINT_RUNNING):
        result["state"] = state
    if why is not None:
        return CommandFailed("cannot %s: %s (%s)" % (doing, why, exc), result)
    if state in PRINT_RUNNING and "SD busy" in str(exc):
        return CommandFailed("cannot %s: a print is %s (%s), started since this command was checked; cancel it "
                             "first (%s)" % (doing, state, _field(status, "print_stats", "filename"), exc), result)
    return CommandFailed(str(exc), result)


def _send_control(ctx: ActionContext, result: Dict[str, Any], doing: str, path: str, kind: str,
                  **kwargs) -> Optional[Dict[str, Any]]:
    """POSTs a control; returns Klipper's state after the answer ({} if it
    cannot be read), or None with result marked pending when Klipper is busy
    past the read timeout of EXCHANGES[kind]."""
    try:
        ctx.moonraker.call("POST", path, **exchange_limits(kind), **kwargs)
    except AnswerTimeout as exc:
        status = _klipper_state(ctx)
        if status is None:
            raise CommandFailed("%s, and Klipper's state cannot be read: unknown whether it will take effect"
                                % exc, result) from None
        result.update(pending=True, state=_field(status, "print_stats", "state"))
        return None
    except HttpError as exc:
        raise _refusal(ctx, doing, exc, result) from None
    status = _klipper_state(ctx) or {}
    result["state"] = _field(status, "print_stats", "state")
    return status


def _immediate_post(path: str):
    """A call Klipper answers at once, in any state (an emergency stop skips
    the G-code queue): no state check, no wait beyond the usual timeout."""
    def handler(ctx: ActionContext, params: Dict[str, Any]) -> Dict[str, Any]:
        ctx.moonraker.call("POST", path)
        return {}
    return handler


def _print_control(action: str):
    control = PRINT_CONTROLS[action]

    def handler(ctx: ActionContext, params: Dict[str, Any]) -> Dict[str, Any]:
        result = {}  # type: Dict[str, Any]
        before = _klipper_state(ctx)
        if before is not None:
            _require_ready(before, action, result)
            state = _field(before, "print_stats", "state")
            if state in control.already_in:
                return {"state": state}
            if state not in control.applies_in:
                raise CommandFailed("nothing to %s: Klipper's print state is %s" % (action, state),
                                    {"state": state})
        after = _send_control(ctx, result, action, control.path, "print_control")
        if after and result["state"] not in control.takes_effect_as:
            raise CommandFailed("Klipper answered the %s, but its print state is %s" % (action, result["state"]),
                                result)
        return result
    return handler


def action_start_print(ctx: ActionContext, params: Dict[str, Any]) -> Dict[str, Any]:
    result = {"filename": validate_filename(params)}  # type: Dict[str, Any]
    check_gcodes_path(ctx, result["filename"])
    before = _klipper_state(ctx)
    if before is not None:
        _require_ready(before, "start a print", result)
        state = _field(before, "print_stats", "state")
        if state in PRINT_RUNNING:
            raise CommandFailed("cannot start a print: one is %s (%s); cancel it first"
                                % (state, _field(before, "print_stats", "filename")), dict(result, state=state))
    _send_control(ctx, result, "start a print", "/printer/print/start", "print_control",
                  params={"filename": result["filename"]})
    return result


def action_homing(ctx: ActionContext, params: Dict[str, Any]) -> Dict[str, Any]:
    axes = params.get("axes")
    if axes is None:
        axes = []
    if not isinstance(axes, list) or not all(isinstance(a, str) for a in axes):
        raise CommandFailed("invalid param 'axes': must be a list of \"X\", \"Y\", \"Z\"")
    wanted = {a.strip().upper() for a in axes}
    unknown = sorted(wanted - {"X", "Y", "Z"})
    if unknown:
        raise CommandFailed("invalid param 'axes': unknown axis %s" % ", ".join(unknown))
    ordered = [a for a in "XYZ" if a in wanted]
    result = {"axes": ordered or "all"}  # type: Dict[str, Any]
    before = _klipper_state(ctx)
    if before is not None:
        _require_ready(before, "home", result)
        if _field(before, "print_stats", "state") == "printing":
            raise CommandFailed("cannot home while a print is printing: pause or cancel it first", result)
    after = _send_control(ctx, result, "home", "/printer/gcode/script", "homing",
                          json_body={"script": "G28 " + " ".join(ordered or ["X", "Y", "Z"])})
    if after and "toolhead" in after:
        homed = _field(after, "toolhead", "homed_axes") or ""
        result["homed_axes"] = homed
        missing = [a for a in ordered or ["X", "Y", "Z"] if a.lower() not in homed]
        if missing:
            raise CommandFailed("Klipper answered the G28, but %s is not homed" % ", ".join(missing), result)
    return result


class Base64Chunks:
    """Strict base64 (no whitespace, padding only at the end) decoded a piece
    at a time; ValueError when it is not base64."""

    def __init__(self):
        self.carry, self.size, self.ended = b"", 0, False

    def feed(self, piece: bytes) -> bytes:
        data = self.carry + piece
        whole = len(data) // 4 * 4
        self.carry = data[whole:]
        return self._decode(data[:whole])

    def finish(self) -> bytes:
        if self.carry:
            raise ValueError("base64 length is not a multiple of 4")
        return b""

    def _decode(self, data: bytes) -> bytes:
        if not data:
            return b""
        if self.ended:
            raise ValueError("base64 goes on after its padding")
        decoded = base64.b64decode(data, validate=True)
        self.ended = data.endswith(b"=")
        self.size += len(decoded)
        return decoded


def _decode_content(ctx: ActionContext, content: Any, local: TransferFile, result: Dict[str, Any]) -> int:
    """base64 into local.file a chunk at a time; returns the decoded size."""
    folder = ctx.config.state_dir
    if isinstance(content, SpooledString):
        if content.missing is not None:
            raise CommandFailed("param 'content' (%d bytes of base64) %s" % (content.length, content.missing),
                                result)
        pieces, length = content.utf8_chunks(), content.length  # type: Iterable[bytes], int
    elif isinstance(content, str):
        pieces, length = [content.encode("utf-8", "surrogatepass")], len(content)
    else:
        raise CommandFailed("missing or invalid param 'content' (base64 text)", result)
    if length * 3 // 4 > transfer_budget(folder)[0]:
        raise CommandFailed(too_large_message("file", length * 3 // 4, folder), result)
    decoder = Base64Chunks()
    try:
        for piece in pieces:
            local.file.write(decoder.feed(piece))
        local.file.write(decoder.finish())
    except ValueError:  # binascii.Error, a bad JSON escape
        raise CommandFailed("invalid param 'content': not valid base64", result) from None
    if isinstance(content, SpooledString):
        content.discard()  # its disk is free again before Moonraker's copy takes some
    return decoder.size


class _HashingWriter:
    """A file wrapper that hashes and counts what tarfile writes through it."""

    def __init__(self, handle):
        self.handle, self.sha256, self.size = handle, hashlib.sha256(), 0

    def write(self, data):
        self.sha256.update(data)
        self.size += len(data)
        return self.handle.write(data)

    def flush(self):
        self.handle.flush()


S3_ERROR_CODE = re.compile(rb"<Code>([A-Za-z0-9._-]{1,64})</Code>")


def _storage_error_message(response: HttpResponse) -> str:
    # Only the S3-style error code (<Code>SignatureDoesNotMatch</Code>): the
    # message goes to the cloud, and the body of whatever the URL named
    # (a service on the LAN) must not.
    found = S3_ERROR_CODE.search(response.content)
    return found.group(1).decode("ascii") if found else "no S3 error code"


def _download_file(ctx: ActionContext, params: Dict[str, Any], local: TransferFile,
                   result: Dict[str, Any]) -> Dict[str, Any]:
    """The `url` extension: a presigned GET into local.file, its size and
    sha256 checked when the command gives them. Redirects are refused (the
    HTTP layer follows none), as are schemes other than http(s)."""
    url, size, sha256 = params.get("url"), params.get("size"), params.get("sha256")
    if not _is_http_url(url):
        raise CommandFailed("missing or invalid param 'url' (an http(s) URL)", result)
    if size is not None and not (_is_int(size) and size >= 0):
        raise CommandFailed("invalid param 'size': must be an integer >= 0 (bytes)", result)
    if sha256 is not None and not (isinstance(sha256, str) and re.match(r"[0-9a-fA-F]{64}\Z", sha256)):
        raise CommandFailed("invalid param 'sha256': must be 64 hex digits", result)
    folder = ctx.config.state_dir
    limit = transfer_budget(folder)[0]
    if size is not None and size > limit:
        raise CommandFailed(too_large_message("file", size, folder), result)
    writer = _HashingWriter(local.file)
    progress = TransferProgress(ctx.log, "download", size, ctx.stop)
    downloader = HttpClient(url, {"User-Agent": user_agent()}, _storage_error_message, ctx.log, "url",
                            transfer_guard(ctx.config))
    try:
        # The deadline grows with what arrives (read_body), not with the
        # size the command claims.
        downloader.request("GET", url, sink=writer, max_bytes=limit if size is None else size,
                           **exchange_limits("transfer"), progress=progress)
    except HttpError as exc:
        if exc.status is not None and 300 <= exc.status < 400:
            raise CommandFailed("download failed: the url answered %d (a redirect); redirects are not "
                                "followed" % exc.status, result) from None
        raise CommandFailed("download failed: %s" % exc, result) from None
    finally:
        downloader.close()
    progress.finished(writer.size)
    if size is not None and writer.size != size:
        raise CommandFailed("download incomplete: got %d of %d bytes" % (writer.size, size), result)
    digest = writer.sha256.hexdigest()
    if sha256 is not None and digest != sha256.lower():
        raise CommandFailed("download corrupt: sha256 %s, expected %s" % (digest, sha256.lower()), result)
    return {"size": writer.size, "sha256": digest}


def _upload_to_moonraker(ctx: ActionContext, filename: str, local: TransferFile, result: Dict[str, Any]) -> None:
    folder, _, base = filename.rpartition("/")
    form = {"root": "gcodes"}
    if folder:
        form["path"] = folder
    local.file.flush()
    size = os.fstat(local.file.fileno()).st_size
    local.file.seek(0)
    body = MultipartFile(form, "file", base, local.file, size)
    progress = TransferProgress(ctx.log, "upload to moonraker", body.length, ctx.stop)
    _moonraker(ctx, result, "POST", "/server/files/upload", data=body, headers=body.headers(),
               **exchange_limits("transfer", size=body.length),
               progress=progress)
    progress.finished(body.length)


def _start_uploaded_file(ctx: ActionContext, result: Dict[str, Any]) -> None:
    """`start: true`: the file is there either way; the result says whether it prints."""
    result["started"] = False
    _moonraker(ctx, result, "POST", "/printer/print/start", params={"filename": result["filename"]})
    result["started"] = True


def action_upload_file(ctx: ActionContext, params: Dict[str, Any]) -> Dict[str, Any]:
    """The file comes as base64 `content` or, extension `upload_url`, from a
    presigned `url`; either way through a temp file in state_dir, never
    whole in memory. `start: true` starts printing it once it is there."""
    filename = validate_filename(params)
    result = {"filename": filename}  # type: Dict[str, Any]
    start = params.get("start", False)
    if not isinstance(start, bool):
        raise CommandFailed("invalid param 'start': must be true or false", result)
    if params.get("url") is not None and params.get("content") is not None:
        raise CommandFailed("give either param 'content' or param 'url', not both", result)
    check_gcodes_path(ctx, filename)
    try:
        with TransferFile(ctx.config.state_dir, "gcode") as local:
            if params.get("url") is not None:
                result.update(_download_file(ctx, params, local, result))
            else:
                result["size"] = _decode_content(ctx, params.get("content"), local, result)
            _upload_to_moonraker(ctx, filename, local, result)
    except OSError as exc:  # the disk filled up under us, state_dir went away
        raise CommandFailed("cannot keep the file in %s: %s" % (ctx.config.state_dir, exc.strerror or exc),
                            result) from None
    if start:
        _start_uploaded_file(ctx, result)
    return result


def action_delete_file(ctx: ActionContext, params: Dict[str, Any]) -> Dict[str, Any]:
    result = {"filename": validate_filename(params)}
    check_gcodes_path(ctx, result["filename"])
    _moonraker(ctx, result, "DELETE", "/server/files/gcodes/" + quote(result["filename"], safe="/"))
    return result


def action_sync_files(ctx: ActionContext, params: Dict[str, Any]) -> Dict[str, Any]:
    files = ctx.moonraker.call("GET", "/server/files/list", params={"root": "gcodes"})
    if not isinstance(files, list):
        raise CommandFailed("moonraker files/list: expected a list, got %s" % type(files).__name__)
    return {"files": files, "count": len(files)}


def action_import_history(ctx: ActionContext, params: Dict[str, Any]) -> Dict[str, Any]:
    limit = params.get("limit", 50)
    if limit is None:
        limit = 50
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= 10000:
        raise CommandFailed("invalid param 'limit': must be an integer from 1 to 10000")
    history = ctx.moonraker.call("GET", "/server/history/list", params={"limit": limit})
    jobs = history.get("jobs") if isinstance(history, dict) else None
    if not isinstance(jobs, list):
        raise CommandFailed("moonraker history/list: unexpected answer (no jobs list)")
    return {"history": history, "count": len(jobs)}


# Backups read printer_data and nothing else. A link anywhere in it (a
# top-level `config -> /etc`, a file linked to ~/.ssh/id_rsa) would carry the
# rest of the machine to a URL the cloud chose, so the walk never follows one:
# each folder and file is opened relative to its parent's descriptor with
# O_NOFOLLOW, and a file is archived only if it is still the regular file the
# walk listed. The root itself must be one of this connector's printer_data
# folders, reached without a link.

_OPEN_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
# O_NONBLOCK: a FIFO swapped in for a file cannot hang the open.
_OPEN_MEMBER = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
BACKUP_MAX_DEPTH = 32  # folders deeper than this are left out (each level holds a descriptor)
BACKUP_SCANNED_BYTES = 1024 * 1024  # files up to this size are searched for the connector's own secrets


def _service_user_home() -> str:
    """The home of the user the connector runs as (not $HOME, which a sudo may keep)."""
    try:
        import pwd
        return pwd.getpwuid(os.geteuid()).pw_dir
    except (ImportError, KeyError):
        return os.path.expanduser("~")


def printer_data_roots(config: Config) -> List[str]:
    """The folders a backup may read, in the order the default is chosen: the
    one the config names, the K1's, the service user's ~/printer_data."""
    named = [config.printer_data_root.rstrip("/")] if config.printer_data_root else []
    return named + [K1_PRINTER_DATA, os.path.join(_service_user_home(), "printer_data")]


def choose_printer_data_root(config: Config, asked: Any) -> str:
    roots = printer_data_roots(config)
    if asked is None:
        return next((root for root in roots if os.path.isdir(root)), roots[-1])
    if not isinstance(asked, str) or asked.rstrip("/") not in roots:
        raise CommandFailed("invalid param 'printer_data_root': must be one of this connector's printer_data "
                            "folders (%s); another one must be named in its config (printer_data_root)"
                            % ", ".join(dict.fromkeys(roots)))
    return asked.rstrip("/")


def _open_printer_data(root: str) -> int:
    """A descriptor of the real folder `root`, never reached through a link."""
    if os.path.realpath(root) != root:
        raise CommandFailed("printer_data_root %s is reached through a link; name the real folder in the "
                            "config (printer_data_root)" % root)
    try:
        return os.open(root, _OPEN_FOLDER)
    except OSError:
        raise CommandFailed("printer_data_root %s is not a folder" % root) from None


@dataclass
class BackupFilter:
    """What a backup leaves out, and how many of each it met."""
    own_config: Optional[Tuple[int, int]]  # (st_dev, st_ino) of the connector's config
    own_config_name: str
    own_secrets: Tuple[bytes, ...] = ()  # a copy of the config (config.json.bak) holds them
    left_out: Dict[str, int] = field(default_factory=lambda: {"links": 0, "secrets": 0, "other": 0})

    def secret(self, name: str, info: os.stat_result) -> bool:
        lowered = name.lower()
        return (lowered in BACKUP_SECRET_NAMES or lowered.endswith(BACKUP_SECRET_SUFFIXES)
                or name == self.own_config_name or (info.st_dev, info.st_ino) == self.own_config)

    def holds_own_secret(self, handle, size: int) -> bool:
        """Whether a small file holds the connector's secret or token (read
        whole, at most BACKUP_SCANNED_BYTES); larger files are not searched."""
        if not self.own_secrets or size > BACKUP_SCANNED_BYTES:
            return False
        data = handle.read(size)
        handle.seek(0)
        return any(secret in data for secret in self.own_secrets)

    def skip(self, reason: str) -> None:
        self.left_out[reason] += 1


def backup_filter(config: Config) -> BackupFilter:
    try:
        info = os.stat(config.path)  # a hard link or copy in printer_data is found by its inode
        own = (info.st_dev, info.st_ino)  # type: Optional[Tuple[int, int]]
    except OSError:
        own = None
    secrets = tuple(s.encode("utf-8") for s in (config.connector_secret, config.pairing_token)
                    if s and len(s) >= MIN_SECRET_LENGTH)
    return BackupFilter(own, os.path.basename(config.path), secrets)


def backup_members(folder_fd: int, prefix: str, keep: BackupFilter, depth: int = 0):
    """(archive name, parent descriptor, entry) of every regular file below
    folder_fd that the filter keeps; links and special files are counted and
    left out. A parent descriptor is valid until the next item is asked for."""
    with os.scandir(folder_fd) as scan:  # streamed: a folder of 100 000 files costs no more memory than one
        for entry in scan:
            yield from _backup_entry(folder_fd, entry, prefix, keep, depth)


def _backup_entry(folder_fd: int, entry: "os.DirEntry", prefix: str, keep: BackupFilter, depth: int):
    try:
        if entry.is_symlink():
            keep.skip("links")
        elif entry.is_dir(follow_symlinks=False):
            if depth >= BACKUP_MAX_DEPTH:
                keep.skip("other")
            else:
                yield from _backup_folder(folder_fd, entry.name, prefix + entry.name + "/", keep, depth + 1)
        elif not entry.is_file(follow_symlinks=False):
            keep.skip("other")
        elif keep.secret(entry.name, entry.stat(follow_symlinks=False)):
            keep.skip("secrets")
        else:
            yield prefix + entry.name, folder_fd, entry
    except FileNotFoundError:
        return  # a log rotated away while we walked


def _backup_folder(parent_fd: int, name: str, prefix: str, keep: BackupFilter, depth: int):
    try:
        fd = os.open(name, _OPEN_FOLDER, dir_fd=parent_fd)
    except FileNotFoundError:
        return
    except OSError:  # ELOOP: swapped for a link since it was listed; ENOTDIR: for a file
        keep.skip("links")
        return
    try:
        yield from backup_members(fd, prefix, keep, depth)
    finally:
        os.close(fd)


class _FixedSize:
    """Reads exactly `size` bytes: a log truncated while it is archived is
    padded with NULs (tarfile fails the whole archive on a short read), and
    one that grows is cut at the size in its header."""

    def __init__(self, handle, size: int):
        self.handle, self.left = handle, size

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        data = self.handle.read(size)
        data += b"\0" * (size - len(data))
        self.left -= size
        return data


def archive_member(tar: "tarfile.TarFile", name: str, folder_fd: int, entry: "os.DirEntry",
                   keep: BackupFilter) -> bool:
    """Adds one walked file; False when it is gone, no longer the file walked,
    or holds the connector's own secret."""
    import tarfile
    walked = entry.stat(follow_symlinks=False)
    try:
        fd = os.open(entry.name, _OPEN_MEMBER, dir_fd=folder_fd)
    except OSError:  # gone, or replaced by a link (ELOOP)
        return False
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or (info.st_dev, info.st_ino) != (walked.st_dev, walked.st_ino):
            return False
        if keep.holds_own_secret(handle, info.st_size):
            keep.skip("secrets")
            return False
        member = tarfile.TarInfo(name)
        member.size, member.mtime, member.mode = info.st_size, int(info.st_mtime), info.st_mode & 0o777
        member.uid, member.gid = info.st_uid, info.st_gid
        tar.addfile(member, _FixedSize(handle, info.st_size))
    return True


def _validate_backup(params: Dict[str, Any], config: Config) -> Tuple[str, str, List[str], str]:
    backup_id = normalize_command_id(params.get("backup_id"))
    url = params.get("presigned_url")
    if backup_id is None:
        raise CommandFailed("missing or invalid param 'backup_id'")
    if not _is_http_url(url):
        raise CommandFailed("missing or invalid param 'presigned_url' (an http(s) URL)", {"backup_id": backup_id})
    include = params.get("include")
    if not isinstance(include, dict):
        raise CommandFailed("missing or invalid param 'include': an object of booleans %s" % list(BACKUP_FOLDERS),
                            {"backup_id": backup_id})
    unknown = sorted(set(include) - set(BACKUP_FOLDERS))
    if unknown or not all(isinstance(v, bool) for v in include.values()):
        raise CommandFailed("invalid param 'include': keys %s with boolean values" % list(BACKUP_FOLDERS),
                            {"backup_id": backup_id})
    chosen = [name for name in BACKUP_FOLDERS if include.get(name)]
    if not chosen:
        raise CommandFailed("invalid param 'include': choose at least one of %s" % list(BACKUP_FOLDERS),
                            {"backup_id": backup_id})
    try:
        root = choose_printer_data_root(config, params.get("printer_data_root"))
    except CommandFailed as exc:
        raise CommandFailed(str(exc), {"backup_id": backup_id}) from None
    return backup_id, url, chosen, root


def _is_real_folder(parent_fd: int, name: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(name, dir_fd=parent_fd).st_mode)
    except OSError:
        return False


def _upload_backup(ctx: ActionContext, url: str, archive: str, size: int) -> None:
    # A file body with an explicit Content-Length goes out as it is read,
    # without chunked encoding, which S3 and its clones refuse.
    uploader = HttpClient(url, {"User-Agent": user_agent()}, _storage_error_message, ctx.log, "presigned_url",
                          transfer_guard(ctx.config))
    try:
        with open(archive, "rb") as body:
            uploader.request("PUT", url, data=body, **exchange_limits("transfer", size=size),
                             headers={"Content-Type": "application/gzip", "Content-Length": str(size)})
    except HttpError as exc:
        raise CommandFailed("backup upload failed: %s" % exc) from None
    finally:
        uploader.close()


def _archive_and_upload(ctx: ActionContext, url: str, chosen: List[str], root: str, root_fd: int) -> Dict[str, Any]:
    keep = backup_filter(ctx.config)
    folders = [name for name in chosen if _is_real_folder(root_fd, name)]
    if not folders:
        raise CommandFailed("none of %s is a folder under %s" % (chosen, root))
    needed = sum(entry.stat(follow_symlinks=False).st_size for name in folders
                 for _, _, entry in _backup_folder(root_fd, name, name + "/", BackupFilter(None, ""), 1))
    import shutil  # here and in the doctor only: it imports the compression modules
    free = shutil.disk_usage(ctx.config.state_dir).free
    if needed > free:
        raise CommandFailed("not enough free space in %s for the backup: need up to %d bytes, %d free"
                            % (ctx.config.state_dir, needed, free))
    # The archive goes to state_dir (the install's disk), never to a RAM /tmp.
    fd, archive = create_temp_file(ctx.config.state_dir, ".backup-", ".tar.gz")
    try:
        with os.fdopen(fd, "wb") as raw:
            writer = _HashingWriter(raw)
            import tarfile  # here, not at start-up: only backups need it
            with tarfile.open(fileobj=writer, mode="w:gz", compresslevel=6) as tar:
                for name in folders:
                    for member, folder_fd, entry in _backup_folder(root_fd, name, name + "/", keep, 1):
                        if ctx.stop.is_set():
                            raise CommandFailed("backup interrupted: the connector is stopping")
                        archive_member(tar, member, folder_fd, entry, keep)
        _upload_backup(ctx, url, archive, writer.size)
    finally:
        os.unlink(archive)
    result = {"size_bytes": writer.size, "sha256": writer.sha256.hexdigest(), "uploaded_at": now_rfc3339(),
              "folders": folders}  # type: Dict[str, Any]
    if any(keep.left_out.values()):
        result["left_out"] = keep.left_out
    return result


def _build_and_upload_backup(ctx: ActionContext, url: str, chosen: List[str], root: str) -> Dict[str, Any]:
    root_fd = _open_printer_data(root)
    try:
        return _archive_and_upload(ctx, url, chosen, root, root_fd)
    finally:
        os.close(root_fd)


def action_create_backup(ctx: ActionContext, params: Dict[str, Any]) -> Dict[str, Any]:
    backup_id, url, chosen, root = _validate_backup(params, ctx.config)
    base = {"backup_id": backup_id}
    try:
        return dict(base, **_build_and_upload_backup(ctx, url, chosen, root))
    except CommandFailed as exc:
        exc.result = dict(base, **exc.result)
        raise
    except OSError as exc:
        raise CommandFailed("backup failed: %s" % exc, base) from None


# -- owner control (extensions gcode, list_macros, set_temperature, emergency_stop)

def _gcode_script(params: Dict[str, Any]) -> str:
    script = params.get("script")
    if not isinstance(script, str) or not script.strip():
        raise CommandFailed("missing or invalid param 'script' (G-code lines or macro names)")
    if "\x00" in script:
        raise CommandFailed("invalid param 'script': contains a NUL byte")
    size = len(script.encode("utf-8", "surrogatepass"))
    if size > GCODE_SCRIPT_MAX_BYTES:
        raise CommandFailed("invalid param 'script': %d bytes, at most %d" % (size, GCODE_SCRIPT_MAX_BYTES))
    return script


def run_gcode(ctx: ActionContext, script: str, result: Dict[str, Any]) -> Dict[str, Any]:
    """Runs a script through Moonraker, with the console lines it caused in the
    result, on failure as well."""
    console = ctx.console or Console()
    console.begin()
    error = None  # type: Optional[HttpError]
    try:
        ctx.moonraker.call("POST", "/printer/gcode/script", json_body={"script": script},
                           **exchange_limits("gcode"))
    except HttpError as exc:
        error = exc
    finally:
        result.update(console.end())
    if error is not None:
        raise _refusal(ctx, "run the script", error, result, keep_state=False)
    return result


def action_gcode(ctx: ActionContext, params: Dict[str, Any]) -> Dict[str, Any]:
    if not ctx.config.allow_gcode:
        raise CommandFailed("remote G-code is turned off on this printer (allow_gcode is false in the "
                            "connector's config)")
    return run_gcode(ctx, _gcode_script(params), {})


def _klipper_objects(ctx: ActionContext) -> List[str]:
    listing = ctx.moonraker.call("GET", "/printer/objects/list")
    names = listing.get("objects") if isinstance(listing, dict) else None
    if not isinstance(names, list):
        raise CommandFailed("moonraker objects/list: unexpected answer (no objects list)")
    return [name for name in names if isinstance(name, str)]


def _klipper_status(ctx: ActionContext, objects: Dict[str, Any]) -> Dict[str, Any]:
    status = ctx.moonraker.query_status(objects).get("status")
    return status if isinstance(status, dict) else {}


def _config_settings(status: Dict[str, Any]) -> Dict[str, Any]:
    """Klipper's parsed config (configfile.settings: lower-case section names)."""
    settings = status.get("configfile", {}).get("settings") if isinstance(status.get("configfile"), dict) else None
    return settings if isinstance(settings, dict) else {}


def action_list_macros(ctx: ActionContext, params: Dict[str, Any]) -> Dict[str, Any]:
    prefix = "gcode_macro "
    names = sorted({name[len(prefix):].strip().upper() for name in _klipper_objects(ctx)
                    if name.startswith(prefix) and name[len(prefix):].strip()})
    settings = _config_settings(_klipper_status(ctx, {"configfile": ["settings"]}))
    macros = []
    for name in names[:MACROS_MAX]:
        section = settings.get(prefix + name.lower())
        description = section.get("description") if isinstance(section, dict) else None
        macros.append({"name": name, "description": _short(description, 300) if isinstance(description, str)
                       else ""})
    return {"macros": macros, "count": len(names)}


def _heater_name(params: Dict[str, Any]) -> str:
    heater = params.get("heater")
    valid = (isinstance(heater, str) and 0 < len(heater) <= 64 and heater.isascii() and heater == heater.strip()
             and "  " not in heater and all(c.isalnum() or c in "_ " for c in heater))
    if not valid:
        raise CommandFailed("missing or invalid param 'heater' (a heater's name, e.g. extruder or heater_bed)")
    return heater


def action_set_temperature(ctx: ActionContext, params: Dict[str, Any]) -> Dict[str, Any]:
    heater, target = _heater_name(params), params.get("target")
    result = {"heater": heater}  # type: Dict[str, Any]
    if not _is_number(target) or target != target or abs(target) == float("inf"):
        raise CommandFailed("missing or invalid param 'target' (degrees Celsius; 0 turns the heater off)", result)
    status = _klipper_status(ctx, {"heaters": ["available_heaters"], "configfile": ["settings"]})
    heaters = status.get("heaters", {}).get("available_heaters") if isinstance(status.get("heaters"), dict) else None
    if not isinstance(heaters, list) or heater not in heaters:
        known = [h for h in heaters if isinstance(h, str)] if isinstance(heaters, list) else []
        raise CommandFailed("unknown heater %s; this printer has: %s" % (json.dumps(heater),
                            ", ".join(known[:20]) or "none"), result)
    section = _config_settings(status).get(heater.lower())
    low = section.get("min_temp") if isinstance(section, dict) else None
    high = section.get("max_temp") if isinstance(section, dict) else None
    if not (_is_number(low) and _is_number(high)):
        raise CommandFailed("cannot read the configured min_temp/max_temp of heater %s" % heater, result)
    if target != 0 and not low <= target <= high:
        raise CommandFailed("target %g is outside heater %s's configured range %g to %g (0 turns it off)"
                            % (target, heater, low, high), result)
    result["target"] = target
    return run_gcode(ctx, "SET_HEATER_TEMPERATURE HEATER=%s TARGET=%g" % (heater.split()[-1], target), result)


ACTIONS = {
    "pause": _print_control("pause"),
    "resume": _print_control("resume"),
    "cancel": _print_control("cancel"),
    "start_print": action_start_print,
    "homing": action_homing,
    "upload_file": action_upload_file,
    "delete_file": action_delete_file,
    "sync_files": action_sync_files,
    "import_history": action_import_history,
    "create_backup": action_create_backup,
    "gcode": action_gcode,
    "list_macros": action_list_macros,
    "set_temperature": action_set_temperature,
    "emergency_stop": _immediate_post("/printer/emergency_stop"),
}  # type: Dict[str, Callable[[ActionContext, Dict[str, Any]], Dict[str, Any]]]


# --------------------------------------------------------------------------
# Snapshots
# --------------------------------------------------------------------------
# A snapshot is the `result` of Moonraker's objects query with the time it
# was read. Pushing delivers the spill first (oldest first) and spills what
# could not be sent, so an outage of any length loses nothing that fits the
# bounds.


def capture_snapshot(moonraker: Moonraker) -> Dict[str, Any]:
    status = moonraker.query_status()
    return {"printer_id": moonraker.printer.printer_id, "captured_at": now_rfc3339(), "payload": status}


def says_nothing_new(old: Any, new: Any, key: Optional[str] = None) -> bool:
    """Whether a status (a snapshot's payload) holds nothing `old` did not:
    the clocks aside, equal, with a temperature within QUIET_TEMPERATURE_DELTA
    (a thermistor's noise on an idle printer)."""
    if key in SNAPSHOT_CLOCKS:
        return True
    if isinstance(old, dict) and isinstance(new, dict):
        return old.keys() == new.keys() and all(says_nothing_new(old[k], new[k], k) for k in new)
    if key == "temperature" and _is_number(old) and _is_number(new):
        return abs(new - old) < QUIET_TEMPERATURE_DELTA
    return type(old) is type(new) and old == new


def snapshot_print_state(snapshot: Dict[str, Any]) -> Optional[str]:
    status = snapshot.get("payload", {}).get("status")
    stats = status.get("print_stats") if isinstance(status, dict) else None
    state = stats.get("state") if isinstance(stats, dict) else None
    return state if isinstance(state, str) else None


class SnapshotOutbox:
    """Pushes snapshots; while the cloud is failing, keeps capturing but only
    spills, and tries the cloud again after a backoff of its own. So an outage
    costs no snapshots, and a long one costs no requests. With a cloud that
    names a keepalive (quiet_snapshots), a periodic push leaves out what says
    nothing new since the last delivered snapshot of that printer."""

    def __init__(self, spill: SnapshotSpill, log: Logger, interval: Callable[[], float]):
        self.spill, self.log, self.interval = spill, log, interval
        self.print_states = {}  # type: Dict[Any, Optional[str]]  # printer_id -> print state last captured
        self.failures = 0
        self.retry_at = 0.0
        self.last_error = None  # type: Optional[ConnectorError]
        self.keepalive = None  # type: Optional[float]  # the cloud's, from its last batch answer
        self.delivered = {}  # type: Dict[Any, Tuple[float, Any]]  # printer_id -> (when, payload) last delivered

    def newsworthy(self, fresh: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """The periodic snapshots to push: all of them, or with a keepalive
        those that say something new or whose printer's is due."""
        keepalive, now = self.keepalive, time.monotonic()
        if keepalive is None:
            return fresh
        kept = []
        for snapshot in fresh:
            last = self.delivered.get(snapshot.get("printer_id"))
            if last is None or now - last[0] >= keepalive or not says_nothing_new(last[1], snapshot.get("payload")):
                kept.append(snapshot)
        return kept

    def push(self, cloud: Cloud, fresh: List[Dict[str, Any]]) -> None:
        for snapshot in fresh:
            self.print_states[snapshot.get("printer_id")] = snapshot_print_state(snapshot)
        with self.spill.lock:  # one sender at a time keeps the order
            if self.last_error is not None and time.monotonic() < self.retry_at:
                self._keep(fresh)
                raise type(self.last_error)(str(self.last_error))
            try:
                drained = self.spill.drain(cloud.push_snapshots)
                if drained:
                    self.log.info("Delivered snapshots kept while the cloud was unreachable", count=drained)
                if fresh:
                    self.keepalive = cloud.push_snapshots(fresh)
                    now = time.monotonic()
                    self.delivered.update((snap.get("printer_id"), (now, snap.get("payload"))) for snap in fresh)
            except (HttpError, CredentialsRejected) as exc:
                self._keep(fresh)
                self.failures += 1
                slow = isinstance(exc, CredentialsRejected)
                delay = CREDENTIALS_RETRY_SECONDS if slow else backoff_delay(self.failures, self.interval())
                self.retry_at, self.last_error = time.monotonic() + delay, exc
                raise
            self.failures, self.last_error = 0, None

    def _keep(self, snapshots: List[Dict[str, Any]]) -> None:
        try:
            self.spill.add(snapshots)
        except OSError as exc:
            self.log.error("cannot write the snapshot outbox; snapshots are lost", error=str(exc),
                           count=len(snapshots), state_dir=os.path.dirname(self.spill.path))


# --------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------
# At most once: the id goes into the ledger before the handler runs, the
# completion goes into the ledger before it is sent, and a re-delivered id
# only gets its stored completion sent again. CommandRunner owns the lanes
# and the ids in flight; the ledger (Durable state) owns what is recorded.
#
# Lanes (docs/PROTOCOL.md, "Command lanes"): a poll answer's commands are
# recorded in order on the polling thread, then handed to a lane, so an
# owner's pause or cancel never waits behind a backup or an upload and the
# polling goes on while they run. Within a lane commands run one at a time,
# in the order polled; a print control also waits for a start_print polled
# before it for the same printer (it is meant for that print). An emergency
# stop waits for nothing: it runs on the polling thread the moment the answer
# holds it.

LANES = {"emergency_stop": "urgent", "pause": "control", "resume": "control", "cancel": "control"}
DEFAULT_LANE = "main"  # every other action, as one queue: upload_file then start_print stays in order


def completion_body(status: str, result: Dict[str, Any], error: Optional[str] = None) -> Dict[str, Any]:
    body = {"status": status, "result": result}  # type: Dict[str, Any]
    if error is not None:
        body["error_message"] = error
    return body


class AnswerFiles:
    """The spooled strings of one poll answer (JsonSplitter): removed once
    the poll and the last of its commands, which may run on a lane after
    the poll returned, are done with them."""

    def __init__(self, splitter: JsonSplitter):
        self.splitter, self.users, self.lock = splitter, 1, threading.Lock()

    def hold(self) -> None:
        with self.lock:
            self.users += 1

    def release(self) -> None:
        with self.lock:
            self.users -= 1
            last = self.users == 0
        if last:
            self.splitter.close()


@dataclass
class Job:
    """A recorded command on its way through a lane."""
    id: str
    raw: Dict[str, Any]
    lane: str
    done: threading.Event = field(default_factory=threading.Event)  # set once run and reported
    after: List[threading.Event] = field(default_factory=list)  # what must be done before it runs
    files: Optional["AnswerFiles"] = None  # the spooled strings of its poll answer

    @property
    def action(self) -> Optional[str]:
        return action_name(self.raw.get("action"))

    @property
    def printer_id(self) -> Optional[int]:
        return printer_id_of(self.raw.get("printer_id"))


class Lane:
    """A thread that runs its jobs one at a time, in the order given, with
    HTTP clients of its own. Not started (--once): jobs run where they are
    dispatched."""

    def __init__(self, runner: "CommandRunner", name: str):
        self.runner, self.name = runner, name
        self.cond = threading.Condition()
        self.queue = []  # type: List[Job]
        self.current = None  # type: Optional[Job]
        self.thread = threading.Thread(target=self.run, name="lane-%s" % name, daemon=True)

    def submit(self, job: Job) -> None:
        with self.cond:
            self.queue.append(job)
            self.cond.notify()

    def pending(self) -> List[Job]:
        with self.cond:
            return ([self.current] if self.current else []) + list(self.queue)

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def _next(self) -> Optional[Job]:
        """The next job; None once stopping with nothing left. Jobs still
        queued at a stop are taken too: each is reported not run."""
        stop = self.runner.stop
        with self.cond:
            while not self.queue and not stop.is_set():
                self.cond.wait()
            self.current = self.queue.pop(0) if self.queue else None
            return self.current

    def run(self) -> None:
        clients = PrinterClients(self.runner.config, self.runner.log)
        try:
            while True:
                job = self._next()
                if job is None:
                    return
                self.runner.run(clients, job)
        finally:
            clients.close()


class CommandRunner:
    """Records, runs and reports commands. `snapshots` takes the snapshot a
    command leaves behind; `console` gives a printer's console (or None)."""

    def __init__(self, config: Config, log: Logger, ledger: Ledger, stop: threading.Event,
                 snapshots: "SnapshotOutbox", console: Callable[[PrinterConfig], Optional[Console]]):
        self.config, self.log, self.ledger, self.stop = config, log, ledger, stop
        self.snapshots, self.console = snapshots, console
        self.lanes = {name: Lane(self, name) for name in ("control", DEFAULT_LANE)}
        self.started = False
        self.lock = threading.Lock()
        self.in_flight = set()  # type: set  # ids recorded and not yet reported: flush() leaves them to their lane
        self.flushing = threading.Lock()

    def start(self) -> None:
        for lane in self.lanes.values():
            lane.thread.start()
        self.started = True

    def wake(self) -> None:
        for lane in self.lanes.values():
            lane.wake()

    def threads(self) -> List[threading.Thread]:
        return [lane.thread for lane in self.lanes.values()] if self.started else []

    def dispatch(self, clients: "PrinterClients", raw: Any, files: Optional["AnswerFiles"] = None) -> bool:
        """Records a polled command and hands it to its lane; True if it is new.
        `files`: the poll answer's spooled strings, kept until the job is done."""
        job = self.admit(clients.cloud, raw)
        if job is None:
            return False
        if files is not None:
            files.hold()
            job.files = files
        lane = self.lanes.get(job.lane)
        if lane is None or not self.started:
            self.run(clients, job)  # the urgent lane, and every lane under --once
            return True
        if job.lane == "control":
            job.after = [earlier.done for earlier in self.lanes[DEFAULT_LANE].pending()
                         if earlier.action == "start_print" and earlier.printer_id == job.printer_id]
        lane.submit(job)
        return True

    def admit(self, cloud: Cloud, raw: Any) -> Optional[Job]:
        """The ledger's record of a new command, made before it can run; None
        for a command that is not to run (no usable id, seen before, or not
        recordable)."""
        if isinstance(raw, dict):
            for key in ("id", "action", "printer_id"):  # a long string there goes to the ledger as its length
                if isinstance(raw.get(key), SpooledString):
                    raw[key] = None if key == "id" else repr(raw[key])
        command_id = usable_command_id(raw.get("id")) if isinstance(raw, dict) else None
        if command_id is None:
            self.log.warn("skipping a command without a usable id (at most %d printable characters)"
                          % COMMAND_ID_MAX_CHARS, command=_short(json.dumps(raw, default=str)[:1000], 120))
            return None
        action = action_name(raw.get("action"))  # what the ledger may hold; execute() refuses the rest
        try:
            known = self.ledger.claim(command_id, action, printer_id_of(raw.get("printer_id")))
        except OSError as exc:
            # Without the record there is no at-most-once guarantee: do not run it.
            self.log.error("cannot record the command in state_dir; failing it without running it",
                           id=command_id, action=action, error=str(exc))
            cloud.complete(command_id, completion_body("failed", {"action": action},
                                                      "not run: the connector cannot write its state_dir (%s)"
                                                      % (exc.strerror or exc)))
            return None
        if known is not None:
            self._redelivered(cloud, command_id, known)
            return None
        with self.lock:
            self.in_flight.add(command_id)
        return Job(command_id, raw, LANES.get(action, DEFAULT_LANE) if action else DEFAULT_LANE)

    def run(self, clients: "PrinterClients", job: Job) -> None:
        """Runs a recorded job, records its completion and reports it. A
        completion the cloud did not take stays in the ledger for flush()."""
        try:
            for earlier in job.after:
                earlier.wait()
            if self.stop.is_set():
                completion = completion_body("failed", {"action": job.action}, "not run: the connector was stopping")
            else:
                completion = self.execute(clients, job.id, job.raw)
            recorded = self.record(job.id, job.action, completion)
            if recorded is not None:
                try:
                    self.deliver(clients.cloud, job.id, recorded)
                except (HttpError, CredentialsRejected) as exc:
                    self.log.debug("completion kept for a later poll", id=job.id, error=str(exc))
        finally:
            with self.lock:
                self.in_flight.discard(job.id)
            if job.files is not None:
                job.files.release()
            job.done.set()

    def record(self, command_id: str, action: Optional[str], completion: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """The completion as the ledger now holds it, or None.

        The cloud is only ever told a final state the disk holds. When the
        completion cannot be recorded (state_dir full), a short "failed" is
        tried instead; when even that cannot be written, nothing is sent: the
        disk still says "running", the completion waits in memory and is
        recorded and sent as soon as the disk takes it, and if the connector
        restarts first, the next start reports what the disk holds, "failed:
        interrupted by restart". Either way the cloud hears one final state.
        """
        try:
            return self.ledger.finish(command_id, completion)
        except OSError as exc:
            fallback = completion_body("failed", {"action": action},
                                       "the command ran, but its result could not be recorded in state_dir (%s); "
                                       "not re-run" % (exc.strerror or exc))
            self.log.error("cannot record the command's result; reporting it failed", id=command_id,
                           action=action, error=str(exc))
        try:
            return self.ledger.finish(command_id, fallback)
        except OSError as exc:
            self.ledger.hold(command_id, fallback)
            self.log.error("cannot record the command's outcome at all; nothing is reported until state_dir "
                           "takes it (a restart reports it interrupted)", id=command_id, error=str(exc))
            return None

    def _redelivered(self, cloud: Cloud, command_id: str, known: Dict[str, Any]) -> None:
        self.log.warn("Command delivered again; not running it twice", id=command_id, action=known.get("action"))
        completion = known.get("completion")
        if isinstance(completion, dict):
            if known.get("state") == "acked":
                try:
                    completion = self.ledger.finish(command_id, completion)  # in the outbox until acknowledged
                except OSError:
                    pass  # the disk holds it as acknowledged: sending it again says nothing new
            self.deliver(cloud, command_id, completion)

    def execute(self, clients: "PrinterClients", command_id: str, raw: Dict[str, Any]) -> Dict[str, Any]:
        action, params = raw.get("action"), raw.get("params")
        name = action_name(action)  # an action that is not a plausible name fails in _resolve
        self.log.info("Command started", id=command_id, action=name, printer_id=printer_id_of(raw.get("printer_id")))
        result = {"action": name}  # type: Dict[str, Any]
        try:
            handler, printer, params = self._resolve(action, raw.get("printer_id"), params)
            moonraker = clients.moonraker(printer)
            ctx = ActionContext(moonraker, printer, self.config, self.log, self.stop, self.console(printer))
            result.update(handler(ctx, params))
            result.update(self._post_snapshot(clients, moonraker))
            completion = completion_body("succeeded", result)
        except CommandFailed as exc:
            result.update(exc.result)
            completion = completion_body("failed", result, str(exc))
        except HttpError as exc:
            completion = completion_body("failed", result, str(exc))
        except Exception as exc:  # a bug must fail the command, never the agent
            completion = completion_body("failed", result, "internal error: %s: %s" % (type(exc).__name__, exc))
            self.log.error("command handler crashed", id=command_id, action=name, error=repr(exc))
        # A Moonraker error may quote its api_key back: no secret is recorded or sent.
        completion = self.log.redact_tree(completion)
        self.log.info("Command finished", id=command_id, action=name, status=completion["status"],
                      error=completion.get("error_message"))
        return completion

    def _resolve(self, action, printer_id, params):
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise CommandFailed("invalid params: expected a JSON object, got %s" % type(params).__name__)
        handler = ACTIONS.get(action) if isinstance(action, str) else None
        if handler is None:
            raise CommandFailed("unknown action %s" % _short(json.dumps(action, default=str)[:200], 80))
        printer = self.config.printer(printer_id_of(printer_id))
        if printer is None:
            raise CommandFailed("unknown printer_id %s" % _short(json.dumps(printer_id, default=str)[:200], 80))
        return handler, printer, params

    def _post_snapshot(self, clients: "PrinterClients", moonraker: Moonraker) -> Dict[str, Any]:
        try:
            snapshot = capture_snapshot(moonraker)
        except HttpError as exc:
            return {"post_snapshot_error": str(exc)}
        try:
            self.snapshots.push(clients.cloud, [snapshot])
        except (HttpError, CredentialsRejected) as exc:
            self.log.debug("post-command snapshot kept for later", error=str(exc))
        return {"post_snapshot": "captured"}

    def deliver(self, cloud: Cloud, command_id: str, completion: Dict[str, Any]) -> None:
        """Send one completion; it stays in the ledger's outbox until acknowledged."""
        if cloud.complete(command_id, completion):
            self.log.debug("completion delivered", id=command_id)
        else:
            self.log.warn("command is gone from the cloud; dropping its completion", id=command_id)
        self.ledger.acked(command_id)

    def flush(self, cloud: Cloud) -> None:
        """Deliver every completion the cloud has not acknowledged yet (from
        the commands and heartbeat loops: one at a time, the other skips)."""
        if not self.flushing.acquire(blocking=False):
            return
        try:
            self.ledger.record_held()
            for command_id, completion in self.ledger.unacked():
                with self.lock:
                    running = command_id in self.in_flight
                if not running:
                    self.deliver(cloud, command_id, completion)
        finally:
            self.flushing.release()

    def recover_interrupted(self) -> None:
        for entry in self.ledger.interrupted():
            self.log.warn("command was interrupted by a restart; reporting it failed, not re-running it",
                          id=entry["id"], action=entry.get("action"))
            completion = completion_body("failed", {"action": entry.get("action")},
                                         "interrupted by restart; not re-run")
            try:
                self.ledger.finish(entry["id"], completion)
            except OSError as exc:  # the disk still says "running": the next start says the same
                self.ledger.hold(entry["id"], completion)
                self.log.error("cannot record it; it is reported once state_dir takes it", id=entry["id"],
                               error=str(exc))


# --------------------------------------------------------------------------
# Webcam
# --------------------------------------------------------------------------
# The cloud asks for a picture of a printer now and then. The camera is
# found through Moonraker's webcam list (snapshot_url, often relative to the
# web UI's port), then the usual fallbacks. Webcams owns what is learnt on
# the way: the URL that worked, per printer, until it stops working, and
# whether any camera answers at all (without one, requests are polled slowly).

WEBCAM_FALLBACKS = ("/webcam/?action=snapshot", "/webcam/snapshot", "/server/webcam/snapshot")
# Each camera tried may take its whole deadline: a list of thousands would
# hold the webcam loop for hours. A printer has one or two.
WEBCAM_MAX_CANDIDATES = 8


def resolve_snapshot_url(printer: PrinterConfig, url: str) -> Optional[str]:
    """The absolute http(s) URL of a (possibly relative) snapshot URL, or
    None: a javascript:, file: or unparseable one names no camera."""
    try:
        absolute = url if _is_http_url(url) else urljoin("http://%s:%d/" % (printer.host, printer.ui_port), url)
        return absolute if _is_http_url(absolute) else None
    except ValueError:  # "http://[x": an IPv6 address that does not parse
        return None


def webcam_candidates(moonraker: Moonraker) -> List[str]:
    printer = moonraker.printer
    found = []
    try:
        listing = moonraker.call("GET", "/server/webcams/list", **exchange_limits("probe"))
        cams = listing.get("webcams") if isinstance(listing, dict) else None
        for cam in cams if isinstance(cams, list) else []:
            if isinstance(cam, dict) and cam.get("enabled", True) and isinstance(cam.get("snapshot_url"), str) \
                    and cam["snapshot_url"].strip():
                url = resolve_snapshot_url(printer, cam["snapshot_url"].strip())
                if url is not None and url not in found:
                    found.append(url)
            if len(found) >= WEBCAM_MAX_CANDIDATES:
                break
    except HttpError:
        pass  # older Moonraker or none configured: the fallbacks follow
    fallbacks = [resolve_snapshot_url(printer, path) for path in WEBCAM_FALLBACKS]
    return found + [url for url in fallbacks if url not in found]


# An answer without a Content-Type is taken for a picture only when it starts
# like one: a camera URL comes from Moonraker's webcam list, which any LAN
# client Moonraker trusts may edit, and whatever it answers goes to the cloud.
IMAGE_SIGNATURES = ((b"\xff\xd8", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"), (b"GIF8", "image/gif"),
                    (b"BM", "image/bmp"))


def _image_type(content: bytes) -> Optional[str]:
    if content[:4] == b"RIFF" and content[8:12] == b"WEBP":
        return "image/webp"
    return next((ctype for magic, ctype in IMAGE_SIGNATURES if content.startswith(magic)), None)


def fetch_webcam_image(moonraker: Moonraker, url: str) -> Tuple[bytes, str]:
    response = moonraker.http.request("GET", url, max_bytes=WEBCAM_MAX_BYTES, **exchange_limits("webcam_fetch"),
                                      headers={"Accept": "image/*"})
    ctype = (response.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if not response.content:
        raise BadResponse("webcam %s: empty image" % url)
    if ctype and not ctype.startswith("image/"):
        # A web UI answers unknown paths with its index page: not a picture.
        raise BadResponse("webcam %s: not an image (%s)" % (url, ctype))
    if not ctype:
        ctype = _image_type(response.content) or ""
        if not ctype:
            raise BadResponse("webcam %s: not an image (no Content-Type, and it does not start like one)" % url)
    return response.content, ctype


class Webcams:
    """What is known of each printer's camera, and the answer to a webcam
    request (a picture uploaded, or nothing when no camera answers)."""

    def __init__(self, config: Config, log: Logger):
        self.config, self.log = config, log
        self.urls = {}  # type: Dict[str, str]  # the camera URL that last worked, per printer
        self.answered = {}  # type: Dict[str, bool]  # whether a printer's camera answered last time it was asked
        self.checked = -CAMERA_RECHECK_SECONDS

    def may_answer(self) -> bool:
        printers = self.config.active_printers()
        return not printers or any(self.answered.get(p.base_url, True) for p in printers)

    def look_again_if_due(self, clients: "PrinterClients") -> None:
        """Every CAMERA_RECHECK_SECONDS, asks each printer whose camera did not
        answer (or was never asked)."""
        if time.monotonic() - self.checked < CAMERA_RECHECK_SECONDS:
            return
        self.checked = time.monotonic()
        for printer in self.config.active_printers():
            if not self.answered.get(printer.base_url, False):
                self.image(clients.moonraker(printer), quiet=True)

    def serve(self, clients: "PrinterClients", raw: Any) -> None:
        """Answers one webcam request with its printer's picture."""
        request_id = normalize_command_id(raw.get("id")) if isinstance(raw, dict) else None
        printer = self.config.printer(printer_id_of(raw.get("printer_id"))) if request_id else None
        if printer is None:
            self.log.warn("skipping a webcam request without a usable id or printer",
                          request=_short(json.dumps(raw, default=str), 120))
            return
        created = parse_rfc3339(raw.get("created_at"))
        if created is not None and time.time() - created > WEBCAM_REQUEST_MAX_AGE:
            self.log.debug("skipping a stale webcam request", id=request_id, age=round(time.time() - created))
            return
        moonraker = clients.moonraker(printer)
        image, ctype = self.image(moonraker)
        if image is None:
            return
        clients.cloud.upload_webcam(request_id, printer.printer_id, image, ctype)
        self.log.debug("webcam image uploaded", id=request_id, bytes=len(image))

    def image(self, moonraker: Moonraker, quiet: bool = False) -> Tuple[Optional[bytes], str]:
        cache, key = self.urls, moonraker.printer.base_url
        urls = ([cache[key]] if key in cache else []) + webcam_candidates(moonraker)
        errors = []
        for url in dict.fromkeys(urls):
            try:
                image, ctype = fetch_webcam_image(moonraker, url)
            except HttpError as exc:
                errors.append(str(exc))
                continue
            cache[key] = url
            self._answered(moonraker.printer, True, url)
            return image, ctype
        cache.pop(key, None)
        if not quiet:
            self.log.warn("no webcam image", printer_id=moonraker.printer.printer_id, error="; ".join(errors))
        self._answered(moonraker.printer, False, "; ".join(errors))
        return None, ""

    def _answered(self, printer: PrinterConfig, answered: bool, detail: str) -> None:
        before = self.answered.get(printer.base_url)
        self.answered[printer.base_url] = answered
        if answered and before is not True:
            self.log.info("Camera found", printer_id=printer.printer_id, url=detail)
        elif not answered and before is not False:
            self.log.info("No camera answers; webcam requests are polled every %g s until one does"
                          % self.config.poll_webcam_no_camera_seconds, printer_id=printer.printer_id,
                          error=_short(detail, 300))


# --------------------------------------------------------------------------
# Status watcher
# --------------------------------------------------------------------------
# Subscribes to print_stats.state over Moonraker's websocket (JSON-RPC) so a
# state change reaches the cloud within a second. Only the state is
# subscribed: temperature ticks would cost CPU for nothing, since the
# snapshot itself is read fresh when it is pushed. When the websocket is
# unavailable it polls the state over HTTP instead, and keeps trying to
# reconnect. One watcher per printer owns its websocket, the last state seen
# and the printer's Console (what Klipper printed, for the gcode action).


def websocket_url(base_url: str) -> str:
    parts = urlsplit(base_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return "%s://%s%s/websocket" % (scheme, parts.netloc, parts.path.rstrip("/"))


class WebSocketMessageTooLarge(websocket.WebSocketPayloadException):
    """A frame, or the fragments of one message, over WEBSOCKET_MESSAGE_MAX_BYTES."""


class CappedFrames(websocket._abnf.frame_buffer):
    """websocket-client's frame reader, refusing a message over
    WEBSOCKET_MESSAGE_MAX_BYTES as soon as a frame's header says its length,
    before any of it is read. Every later read fails the same way, close()'s
    wait for Moonraker's close frame included (it would read the refused
    payload otherwise): the connection is dropped. A control frame is at most
    125 bytes (RFC 6455 5.5)."""

    DATA_OPCODES = (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY, websocket.ABNF.OPCODE_CONT)

    def __init__(self, recv_fn: Callable[[int], bytes]):
        super().__init__(recv_fn, True)
        self.message_bytes = 0  # the fragments of the message so far
        self.refused = None  # type: Optional[websocket.WebSocketException]

    def recv_length(self) -> None:
        super().recv_length()
        if self.header[4] not in self.DATA_OPCODES:
            if self.length > 125:
                self.refused = websocket.WebSocketProtocolException("control frame of %d bytes (at most 125)"
                                                                    % self.length)
        elif self.message_bytes + self.length > WEBSOCKET_MESSAGE_MAX_BYTES:
            self.refused = WebSocketMessageTooLarge("message of %d bytes or more from Moonraker, over the %d-byte "
                                                    "limit" % (self.message_bytes + self.length,
                                                               WEBSOCKET_MESSAGE_MAX_BYTES))
        if self.refused is not None:
            raise self.refused

    def recv_frame(self) -> "websocket.ABNF":
        if self.refused is not None:
            raise type(self.refused)(*self.refused.args)
        frame = super().recv_frame()
        if frame.opcode in self.DATA_OPCODES:
            self.message_bytes = 0 if frame.fin else self.message_bytes + len(frame.data)
        return frame


class HandshakeBudget:
    """The socket given to websocket-client: what it reads counts against
    WEBSOCKET_HANDSHAKE_MAX_BYTES until `budget` is set to None (the upgrade
    done); everything else is the socket's own."""

    def __init__(self, sock):
        self._sock = sock
        self.budget = WEBSOCKET_HANDSHAKE_MAX_BYTES  # type: Optional[int]

    def recv(self, size: int) -> bytes:
        data = self._sock.recv(size)
        if self.budget is not None:
            self.budget -= len(data)
            if self.budget < 0:
                raise websocket.WebSocketException("websocket handshake: Moonraker's answer is over %d bytes"
                                                   % WEBSOCKET_HANDSHAKE_MAX_BYTES)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def open_websocket(base_url: str, headers: List[str]) -> "websocket.WebSocket":
    """websocket-client's connect and handshake under one deadline (its
    timeout bounds each wait for a byte, not the handshake): the socket is
    ours, watched by DEADLINES, and the answer is bounded (HandshakeBudget).
    A redirect is refused, not followed: websocket-client would connect to
    wherever it points itself and send it our headers, the API key among
    them. Behind a proxy websocket-client connects."""
    url = websocket_url(base_url)
    parts = urlsplit(url)
    limits = EXCHANGES["websocket_handshake"]
    watched = DEADLINES.start(limits.deadline or limits.connect + limits.read)
    try:
        sock = None
        if not environ_proxy(base_url):
            address = (parts.hostname, parts.port or (443 if parts.scheme == "wss" else 80))
            sock = _watched_create_connection(address, min(limits.connect, watched.remaining()))
            if parts.scheme == "wss":
                sock = tls_context().wrap_socket(sock, server_hostname=parts.hostname)
            DEADLINES.attach(sock, connected=True)
        ws = websocket.WebSocket(enable_multithread=True,  # interrupt() sends
                                 skip_utf8_validation=True)  # json.loads checks it anyway
        ws.frame_buffer = CappedFrames(ws._recv)
        ws.settimeout(limits.read)
        budget = HandshakeBudget(sock) if sock is not None else None
        ws.connect(url, header=headers, socket=budget, redirect_limit=0)
        if ws.handshake_response is None or ws.handshake_response.status != 101:
            ws.shutdown()  # no close frame: this is no websocket
            raise websocket.WebSocketException("websocket handshake: Moonraker answered %s, not 101 (redirects are "
                                               "not followed)" % getattr(ws.handshake_response, "status", None))
        if budget is not None:
            budget.budget = None
        return ws
    except (websocket.WebSocketException, OSError):
        if watched.expired:
            raise ExchangeTimeout("websocket handshake: no complete answer within the %g s deadline"
                                  % watched.seconds) from None
        raise
    finally:
        DEADLINES.finish(watched)


class StatusWatcher:
    """One printer's print state, kept current; `on_change` is called when it
    changes from one known state to another. `last_sent` gives the state in
    the newest snapshot, which the first state seen (at start, after a
    reconnect) is compared with: a change while nobody watched counts too."""

    def __init__(self, printer: PrinterConfig, log: Logger, stop: threading.Event, on_change: Callable[[], None],
                 last_sent: Callable[[], Optional[str]] = lambda: None):
        self.printer, self.log, self.stop, self.on_change = printer, log, stop, on_change
        self.last_sent = last_sent
        self.state = None  # type: Optional[str]
        self.next_id = 0
        self.identify_id = -1
        self.identified = False
        self.last_message = 0.0
        self.failures = FailureTracker(self.log, "status websocket (printer %s)" % (printer.name or printer.base_url))
        self.ws = None  # type: Optional[websocket.WebSocket]  # while connected, for interrupt()
        self.console = Console()
        self.send_lock = threading.Lock()  # sync() sends from a command's thread
        self.syncs = {}  # type: Dict[int, threading.Event]  # sync() round trips awaiting their answer

    def run(self) -> None:
        attempt = 0
        moonraker = Moonraker(self.printer, self.log, user_agent())
        try:
            while not self.stop.is_set():
                try:
                    self._watch()
                    attempt = 0
                except (websocket.WebSocketException, OSError, ValueError, HttpError) as exc:
                    if self.stop.is_set():
                        break  # interrupted on purpose
                    self.failures.failed(_short(str(exc) or type(exc).__name__, 160), level=20)
                    attempt += 1
                self._poll_until(moonraker, time.monotonic() + backoff_delay(attempt, 2.0))
        finally:
            moonraker.close()

    def _send(self, ws, method: str, params: Dict[str, Any]) -> int:
        with self.send_lock:
            self.next_id += 1
            rpc_id = self.next_id
        ws.send(json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": rpc_id}))
        return rpc_id

    def sync(self, timeout: float) -> bool:
        """True once Moonraker has answered a call sent now: every console line
        it queued for us before has arrived by then (Console)."""
        ws = self.ws
        if ws is None or not self.identified:
            return False
        done = threading.Event()
        with self.send_lock:
            self.next_id += 1
            rpc_id = self.next_id
            self.syncs[rpc_id] = done
        try:
            ws.send(json.dumps({"jsonrpc": "2.0", "method": "server.info", "params": {}, "id": rpc_id}))
            return done.wait(timeout)
        except (OSError, websocket.WebSocketException):
            return False
        finally:
            self.syncs.pop(rpc_id, None)

    def _subscribe(self, ws) -> None:
        self._send(ws, "printer.objects.subscribe", {"objects": {"print_stats": ["state"]}})

    def _watch(self) -> None:
        headers = ["User-Agent: %s" % user_agent()]
        if self.printer.api_key:
            headers.append("X-Api-Key: %s" % self.printer.api_key)
        ws = open_websocket(self.printer.base_url, headers)
        try:
            identify = {"client_name": "printer-connector", "version": __version__, "type": "other",
                        "url": "https://github.com/printdock/printer-connector"}
            if self.printer.api_key:
                identify["api_key"] = self.printer.api_key
            self.identify_id = self._send(ws, "server.connection.identify", identify)
            self._subscribe(ws)
            # A long receive timeout: waking up every second to look at the
            # stop flag would cost CPU all day; interrupt() ends the wait.
            ws.settimeout(WEBSOCKET_RECEIVE_TIMEOUT)
            self.ws = ws
            self.console.sync = self.sync
            while not self.stop.is_set():
                try:
                    message = ws.recv()
                except websocket.WebSocketTimeoutException:
                    continue
                if message == "":  # what recv() gives for a close frame
                    raise websocket.WebSocketConnectionClosedException("websocket closed by Moonraker")
                self._on_message(ws, message)
        finally:
            self.console.sync = None
            self.ws = None
            self.identified = False
            ws.close()

    def interrupt(self) -> None:
        """Ends a receive in progress on stop: Moonraker answers our close
        frame with its own, which ends the wait cleanly."""
        ws = self.ws
        if ws is not None:
            try:
                ws.send_close()
            except (OSError, websocket.WebSocketException):
                pass  # already closed

    def _on_message(self, ws, message) -> None:
        self.last_message = time.monotonic()
        if not isinstance(message, str):
            return  # a binary frame (recv() gives bytes): Moonraker's JSON-RPC is text, so it is no call of ours
        if "notify_proc_stat_update" in message[:64]:
            return  # Moonraker sends it every second to every client; parsing it is wasted CPU
        try:
            data = decode_json(message)
        except BadJson:
            return
        if not isinstance(data, dict):
            return
        method, rpc_id = data.get("method"), data.get("id")
        waiter = self.syncs.get(rpc_id) if isinstance(rpc_id, int) else None
        if waiter is not None:
            waiter.set()
        elif method == "notify_gcode_response":
            self.console.feed(data.get("params"))
        elif method == "notify_status_update":
            params = data.get("params")
            if isinstance(params, list) and params and isinstance(params[0], dict):
                self._on_status(params[0])
        elif method == "notify_klippy_ready":
            self._subscribe(ws)  # Moonraker drops subscriptions when Klippy restarts
        elif method in ("notify_klippy_disconnected", "notify_klippy_shutdown"):
            self._changed(None)
        elif rpc_id == self.identify_id:
            self._on_identified(data)
        elif isinstance(data.get("result"), dict):
            self._on_status(data["result"].get("status"))
        elif isinstance(data.get("error"), dict):
            # A subscribe refused while Klippy is down: notify_klippy_ready resubscribes.
            self.log.debug("status websocket call refused", error=data["error"].get("message"))

    def _on_identified(self, data: Dict[str, Any]) -> None:
        error = data.get("error")
        if error is not None:
            message = error.get("message") if isinstance(error, dict) else error
            raise websocket.WebSocketException("identify refused by Moonraker: %s" % message)
        self.identified = True
        self.failures.succeeded()
        self.log.debug("status websocket connected", printer=self.printer.base_url)

    def _on_status(self, status) -> None:
        stats = status.get("print_stats") if isinstance(status, dict) else None
        if isinstance(stats, dict) and isinstance(stats.get("state"), str):
            self._changed(stats["state"])

    def answered_recently(self) -> bool:
        """Moonraker spoke on the websocket within the last few seconds (the
        real one sends process stats every second)."""
        return self.identified and time.monotonic() - self.last_message < WEBSOCKET_FRESH_SECONDS

    def _changed(self, state: Optional[str]) -> None:
        previous, self.state = self.state, state
        if previous is None:
            previous = self.last_sent()
        if previous is not None and state is not None and state != previous:
            self.log.info("Print state changed", printer_id=self.printer.printer_id, previous=previous, state=state)
            self.on_change()

    def _poll_until(self, moonraker: Moonraker, deadline: float) -> None:
        """Fallback while the websocket is down: poll the state over HTTP."""
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                self._on_status(moonraker.query_status(("print_stats",)).get("status"))
            except HttpError:
                pass
            self.stop.wait(min(FALLBACK_STATUS_POLL_SECONDS, max(0.0, deadline - time.monotonic())))


# --------------------------------------------------------------------------
# Pairing
# --------------------------------------------------------------------------
# Turns a pairing token into the connector's id and secret, once. Register
# is not idempotent: the token is single use. So a request that was answered
# is never repeated; only transport failures and 5xx are retried. Its state
# is in the config file: the token until it is used, the Idempotency-Key of
# the attempts in flight, then the credentials.


def go_arch(machine: Optional[str] = None) -> str:
    machine = (machine or os.uname().machine).lower()
    table = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
             "i386": "386", "i686": "386"}
    if machine in table:
        return table[machine]
    if machine.startswith("arm"):
        return "arm"
    if machine.startswith("mips"):
        return "mipsle" if sys.byteorder == "little" else "mips"
    return machine


def local_ip(cloud_url: str) -> Optional[str]:
    """The address this host uses towards the cloud (no packet is sent), or
    None. Only a detail of the register body: its name lookup waits a
    second at most (the register's own connect waits on the same lookup)."""
    parts = urlsplit(cloud_url)
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        infos = resolve(parts.hostname or "8.8.8.8", parts.port or 443, 1.0)
        address = next(info[4] for info in infos if info[0] == socket.AF_INET)
        probe.connect(address)
        return probe.getsockname()[0]
    except (OSError, StopIteration):
        return None
    finally:
        probe.close()


def registration_body(config: Config) -> Dict[str, Any]:
    printers = [{"name": p.name or "Printer %d" % (i + 1), "ui_port": p.ui_port}
                for i, p in enumerate(config.moonraker)]
    device = {"hostname": socket.gethostname(), "arch": go_arch(), "os": os.uname().sysname.lower() or "linux",
              "version": __version__, "ip": local_ip(config.cloud_url), "ui_port": config.moonraker[0].ui_port}
    body = {"pairing_token": config.pairing_token, "device": {k: v for k, v in device.items() if v},
            "printers": printers, "capabilities": config.capabilities()}  # type: Dict[str, Any]
    if config.site_name:
        body["site_name"] = config.site_name
    return body


@dataclass
class Registration:
    """What the cloud's answer to register gives us, checked."""
    connector_id: str
    secret: str
    printer_ids: List[Optional[int]]
    polling: Dict[str, float]


POLLING_FIELDS = (("commands_seconds", "poll_commands_seconds"), ("snapshots_seconds", "push_snapshots_seconds"),
                  ("heartbeat_seconds", "heartbeat_seconds"))


def read_registration(answer: Any) -> Registration:
    """The checked registration; BadResponse names the first thing wrong."""
    if not isinstance(answer, dict):
        size = " of %d items" % len(answer) if isinstance(answer, list) else ""
        raise BadResponse("register: expected a JSON object, got %s%s" % (type(answer).__name__, size))
    connector = answer.get("connector")
    credentials = answer.get("credentials")
    connector_id = normalize_command_id(connector.get("id")) if isinstance(connector, dict) else None
    secret = credentials.get("secret") if isinstance(credentials, dict) else None
    if connector_id is None or not isinstance(secret, str) or not secret:
        raise BadResponse("register: the answer lacks connector.id or credentials.secret")
    unsafe = unsafe_credential({"connector.id": connector_id, "credentials.secret": secret})
    if unsafe:
        raise BadResponse("register: the answer's %s, so it cannot be used" % unsafe)
    printers = answer.get("printers", [])
    if not isinstance(printers, list):
        raise BadResponse("register: printers is %s, not a list" % type(printers).__name__)
    printer_ids = []  # type: List[Optional[int]]
    for index, entry in enumerate(printers):
        raw_id = entry.get("id") if isinstance(entry, dict) else None
        printer_id = printer_id_of(raw_id)
        if raw_id is not None and not printer_id:
            raise BadResponse("register: printers[%d].id is not a printer id: %s"
                              % (index, _short(json.dumps(raw_id), 40)))
        printer_ids.append(printer_id)
    polling = answer.get("polling")
    intervals = {}
    for key, attr in POLLING_FIELDS:
        value = polling.get(key) if isinstance(polling, dict) else None
        if _is_number(value) and MIN_POLL_SECONDS <= value < MAX_POLL_SECONDS:  # 1e-300 would be a busy loop
            intervals[attr] = float(value)
    return Registration(connector_id, secret, printer_ids, intervals)


def apply_registration(config: Config, answer: Any) -> None:
    """Takes the credentials, printer ids and intervals of the cloud's answer
    to register into config; BadResponse, with config unchanged, when the
    answer cannot be used."""
    registration = read_registration(answer)
    config.connector_id, config.connector_secret = registration.connector_id, registration.secret
    config.pairing_token = None
    for printer, printer_id in zip(config.moonraker, registration.printer_ids):
        if printer_id:
            printer.printer_id = printer_id
    for attr, value in registration.polling.items():
        setattr(config, attr, value)
UNANSWERED_SUMMARY = ("Pairing rejected after an earlier register went unanswered: that attempt probably used the "
                      "pairing token; get a new pairing token from the cloud and run again with it")
UNREADABLE_SUMMARY = ("Pairing failed: the cloud's answer to register cannot be used, and the pairing token may be "
                      "used up by it; if running again says it was already used, get a new pairing token")


def _rewrite_config_key(config: Config, key: Optional[str]) -> None:
    raw = dict(config.raw)
    if key is None:
        if raw.pop(PAIRING_KEY_FIELD, None) is None:
            return
    else:
        raw[PAIRING_KEY_FIELD] = key
    atomic_write(config.path, (json.dumps(raw, indent=2) + "\n").encode("utf-8"))
    config.raw = raw


def pairing_idempotency_key(config: Config, log: Logger) -> Tuple[str, bool]:
    """(key, whether an earlier run stored it): a stored key means an earlier
    register may have reached the cloud."""
    stored = config.raw.get(PAIRING_KEY_FIELD)
    if isinstance(stored, str) and re.fullmatch(r"[0-9a-f]{32}", stored):
        return stored, True
    key = binascii.hexlify(os.urandom(16)).decode("ascii")
    try:
        _rewrite_config_key(config, key)
    except OSError as exc:
        log.warn("the pairing key could not be stored: a restart while pairing may use up the token",
                 path=config.path, error=str(exc))
    return key, False


def forget_pairing_key(config: Config) -> None:
    try:
        _rewrite_config_key(config, None)
    except OSError:
        pass  # a stale key only makes the next pairing's messages more cautious


def may_have_reached_the_cloud(exc: HttpError) -> bool:
    """No answer after a connection was made, or a gateway's: the cloud may
    have used the token."""
    return (isinstance(exc, TransportError) and exc.connected) or exc.status in (502, 504)


def register(config: Config, log: Logger, stop: threading.Event, attempts: Optional[int]) -> Any:
    """Registers, retrying transport failures and 5xx with the same key.
    A refusal or an unusable answer raises PairingRejected."""
    key, unanswered = pairing_idempotency_key(config, log)
    cloud = Cloud(config, log)
    body = registration_body(config)
    failures = 0
    try:
        while True:
            try:
                answer = cloud.register(body, key)
                read_registration(answer)  # an unusable answer is not retried: see below
                return answer
            except PairingRejected as exc:
                forget_pairing_key(config)
                raise PairingRejected(str(exc), UNANSWERED_SUMMARY if unanswered else None) from None
            except BadResponse as exc:
                raise PairingRejected(str(exc), UNREADABLE_SUMMARY) from None
            except HttpError as exc:
                failures += 1
                reached = may_have_reached_the_cloud(exc)
                unanswered = unanswered or reached
                if attempts is not None and failures >= attempts:
                    raise
                delay = backoff_delay(failures, BACKOFF_BASE * 2)
                note = "it may have reached the cloud; the retry carries the same Idempotency-Key" if reached else None
                log.warn("pairing failed; retrying", error=str(exc), retry_in=round(delay, 1), note=note)
                if stop.wait(delay):
                    raise HttpError("pairing interrupted: the connector is stopping") from None
    finally:
        cloud.close()


def pair(config: Config, log: Logger, stop: threading.Event, attempts: Optional[int] = None) -> None:
    log.info("Pairing with the cloud", cloud=config.cloud_url, printers=len(config.moonraker))
    apply_registration(config, register(config, log, stop, attempts))
    log.add_secret(config.connector_secret)
    try:
        save_config(config)
    except OSError as exc:
        log.error("paired, but the config could not be saved: the connector runs now but must be paired "
                  "again after a restart", path=config.path, error=str(exc))
    log.info("Pairing successful", connector_id=config.connector_id,
             printer_ids=",".join(str(p.printer_id) for p in config.moonraker))


# --------------------------------------------------------------------------
# Agent
# --------------------------------------------------------------------------
# Pairs if needed, recovers what a previous run left in state_dir, then runs
# the loops until SIGTERM/SIGINT. `run_once` does one round of each for
# --once and the installers' pairing check. The agent builds the parts
# (ledger, snapshot outbox, command runner, webcams, status watchers, loops)
# and hands each what it needs; it owns only the loop steps, the pace of
# the polls (idle or not, held or not) and the stop event. SIGTERM and
# SIGINT reach request_stop through a thread of their own (stop_on_signals).

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Agent:
    def __init__(self, config: Config, log: Logger):
        self.config, self.log = config, log
        self.stop = threading.Event()
        self.started = time.monotonic()
        check_state_dir(config.state_dir)
        swept = sweep_temp_files(config.state_dir)
        if swept:
            log.info("Removed transfer files a previous run left", count=swept, state_dir=config.state_dir)
        self.ledger = Ledger(config.state_dir, log)
        spill = SnapshotSpill(config.state_dir, log, config.outbox_max_snapshots, config.outbox_max_bytes)
        self.snapshots = SnapshotOutbox(spill, log, lambda: config.push_snapshots_seconds)
        self.commands = CommandRunner(config, log, self.ledger, self.stop, self.snapshots, self.console)
        self.webcams = Webcams(config, log)
        self.snapshot_loop = Loop("snapshots", self.push_snapshots, lambda: config.push_snapshots_seconds,
                                  self.stop, config, log, backoff=False)
        self.heartbeat_loop = Loop("heartbeat", self.heartbeat, self.heartbeat_interval, self.stop, config, log)
        self.loops = [
            self.heartbeat_loop,
            Loop("commands", self.poll_commands, lambda: self.relaxed("poll_commands_seconds"), self.stop, config, log),
            self.snapshot_loop,
            Loop("webcam", self.serve_webcam, self.webcam_interval, self.stop, config, log),
        ]
        self.first_success = set()  # type: set
        self.watchers = {}  # type: Dict[int, StatusWatcher]
        self.last_asked = time.monotonic()  # when a command or webcam request last came
        self.idle = False  # polling relaxed (relaxed())
        self.answer = None  # type: Optional[TransferProgress]  # of the commands poll in progress
        self.poll_wait = LONG_POLL_WAIT_SECONDS  # type: Optional[int]  # None under --once: one round, at once
        self.polls_held = False  # the cloud held the last commands poll (heartbeat_interval)
        self.capabilities_held = None  # type: Optional[str]  # the digest the cloud last answered (capabilities_ack)

    # -- loop steps -------------------------------------------------------

    def heartbeat(self, clients: PrinterClients) -> None:
        printers = [{"printer_id": p.printer_id, "reachable": self._reachable(clients, p)}
                    for p in self.config.active_printers()]
        body = {"status": {"uptime_seconds": int(time.monotonic() - self.started), "version": __version__},
                "printers": printers}  # type: Dict[str, Any]
        capabilities = self.config.capabilities()
        if self.capabilities_held != capabilities_digest(capabilities):
            body["capabilities"] = capabilities
        self.capabilities_held = clients.cloud.heartbeat(body)
        try:  # a completion a lane could not deliver need not wait for a held poll to end
            self.commands.flush(clients.cloud)
        except (HttpError, CredentialsRejected) as exc:
            self.log.debug("completions kept for later", error=str(exc))
        self._noted("Heartbeat sent", "heartbeat", printers=len(printers),
                    reachable=sum(1 for p in printers if p["reachable"]))

    def heartbeat_interval(self) -> float:
        """The configured interval; while the cloud holds the command poll,
        heartbeat_held_seconds if that is longer (the cloud sees the poll)."""
        configured = self.config.heartbeat_seconds
        return max(configured, self.config.heartbeat_held_seconds) if self.polls_held else configured

    def _reachable(self, clients: PrinterClients, printer: PrinterConfig) -> bool:
        watcher = self.watchers.get(printer.printer_id)
        if watcher is not None and watcher.answered_recently():
            return True  # it answered just now; no need to ask again
        try:
            clients.moonraker(printer).server_info()
            return True
        except HttpError:
            return False

    def poll_commands(self, clients: PrinterClients) -> Optional[float]:
        self.commands.flush(clients.cloud)
        splitter = JsonSplitter(self.config.state_dir)
        files = AnswerFiles(splitter)
        try:
            # Not stopped by a SIGTERM once it arrives (request_stop): the
            # cloud has marked these commands running, and only a whole answer
            # names them all.
            progress = self.answer = TransferProgress(self.log, "commands answer")
            asked = time.monotonic()
            try:
                commands = clients.cloud.poll_commands(splitter, lambda done: self._answer_arriving(progress, done),
                                                       self.poll_wait)
            except (HttpError, CredentialsRejected):
                self._held(False)
                raise
            self._held(clients.cloud.held is not None)
            progress.finished(splitter.size)
            fresh = sum(1 for raw in commands if self.commands.dispatch(clients, raw, files))
        finally:
            files.release()  # the commands that use them hold them till they are done
        return self._paced(clients.cloud.held, asked, len(commands), fresh)

    def _held(self, held: bool) -> None:
        """Whether the cloud holds the command poll; when it stops, a
        heartbeat goes out now rather than at the end of the held pace."""
        was, self.polls_held = self.polls_held, held
        if was and not held:
            self.heartbeat_loop.wake.set()

    @staticmethod
    def _answer_arriving(progress: TransferProgress, done: int) -> None:
        """A held poll's transfer starts with its first byte, not with the
        hold: no progress line for 25 s of waiting."""
        if progress.done == 0:
            progress.started = progress.last = time.monotonic()
        progress(done)

    def _paced(self, held: Optional[float], asked: float, answered: int, fresh: int) -> Optional[float]:
        """After a poll: 0 (ask again at once) when the cloud held it, or when
        a held poll was woken by something new; None (the loop's interval)
        for an old cloud, or a cloud that says it holds but does not."""
        now = time.monotonic()
        if answered:
            self.last_asked = now
        if held is None:
            return None
        if fresh or now - asked >= held / 2:
            return 0.0
        return None

    def relaxed(self, key: str) -> float:
        """The configured interval, or the idle one while no printer prints and
        nothing was asked for idle_after_seconds (an old cloud only: a held
        long-poll does not use intervals)."""
        configured = getattr(self.config, key)
        after = self.config.idle_after_seconds
        idle = (after > 0 and time.monotonic() - self.last_asked >= after and bool(self.watchers)
                and all(w.state is not None and w.state not in BUSY_PRINT_STATES for w in self.watchers.values()))
        if idle != self.idle:
            self.idle = idle
            self.log.debug("polling relaxed: no print and nothing asked lately" if idle else "polling at the "
                           "configured pace again")
        return max(configured, IDLE_POLL_SECONDS[key]) if idle else configured

    def console(self, printer: PrinterConfig) -> Optional[Console]:
        watcher = self.watchers.get(printer.printer_id)
        return watcher.console if watcher is not None else None

    def push_snapshots(self, clients: PrinterClients) -> None:
        captured, errors = [], []
        for printer in self.config.active_printers():
            try:
                captured.append(capture_snapshot(clients.moonraker(printer)))
            except HttpError as exc:
                errors.append(str(exc))
        fresh = self.snapshots.newsworthy(captured)
        self.snapshots.push(clients.cloud, fresh)
        if fresh:
            self._noted("Snapshot pushed", "snapshots", count=len(fresh))
        elif captured:
            self.log.debug("status unchanged; no snapshot pushed", count=len(captured))
        if errors and not captured:
            raise HttpError("no printer status to push: %s" % "; ".join(errors))

    def serve_webcam(self, clients: PrinterClients) -> Optional[float]:
        self.webcams.look_again_if_due(clients)
        # Long-poll only while a camera may answer: without one, the slow pace is cheaper.
        asked = time.monotonic()
        answer = clients.cloud.poll_webcam_requests(self.poll_wait if self.webcams.may_answer() else None)
        for raw in answer:
            self.webcams.serve(clients, raw)
        return self._paced(clients.cloud.held, asked, len(answer), len(answer))

    def webcam_interval(self) -> float:
        """Webcam requests are polled at the cloud's pace while some printer
        may have a camera, and slowly while none answers."""
        if self.webcams.may_answer():
            return self.relaxed("poll_webcam_seconds")
        return self.config.poll_webcam_no_camera_seconds

    def _noted(self, message: str, loop: str, **fields) -> None:
        """Info the first time, debug afterwards (the loop logs recoveries): no flood."""
        level = 10 if loop in self.first_success else 20
        self.first_success.add(loop)
        self.log.log(level, message, **fields)

    def _last_sent_state(self, printer_id: Any) -> Callable[[], Optional[str]]:
        return lambda: self.snapshots.print_states.get(printer_id)

    def request_snapshot(self) -> None:
        self.snapshot_loop.wake.set()

    # -- lifecycle --------------------------------------------------------

    def prepare(self, once: bool) -> None:
        self.commands.recover_interrupted()
        if not self.config.paired:
            pair(self.config, self.log, self.stop, attempts=3 if once else None)

    def run(self) -> int:
        try:
            self.prepare(once=False)
        except HttpError:
            if not self.stop.is_set():
                raise
        if self.stop.is_set():  # SIGTERM while pairing is a clean stop too
            self.log.info("Connector stopped")
            return EXIT_OK
        self.watchers = {p.printer_id: StatusWatcher(p, self.log, self.stop, self.request_snapshot,
                                                     self._last_sent_state(p.printer_id))
                         for p in self.config.active_printers()}
        self.commands.start()
        for loop in self.loops:
            loop.thread.start()
        watchers = [threading.Thread(target=w.run, name="watch-%d" % pid, daemon=True)
                    for pid, w in self.watchers.items()]
        for watcher in watchers:
            watcher.start()
        self.log.info("Connector running", version=__version__, printers=len(self.config.active_printers()),
                      cloud=self.config.cloud_url)
        self.stop.wait()
        deadline = time.monotonic() + SHUTDOWN_GRACE
        for loop in self.loops:
            loop.wake.set()
        self.commands.wake()
        for watcher in self.watchers.values():
            watcher.interrupt()
        # A thread still busy at the deadline (a Moonraker that ignores the
        # close frame, an upload in progress) is a daemon: it ends with the
        # process, and its command is reported interrupted at the next start.
        for thread in [loop.thread for loop in self.loops] + watchers + self.commands.threads():
            thread.join(max(0.0, deadline - time.monotonic()))
        sweep_temp_files(self.config.state_dir)  # a transfer still going at the deadline ends with the process
        self.log.info("Connector stopped")
        return EXIT_OK

    def run_once(self) -> int:
        self.prepare(once=True)
        self.poll_wait = None
        clients = PrinterClients(self.config, self.log)
        try:
            results = {loop.name: loop.run_once(clients) for loop in self.loops}
        finally:
            clients.close()
        failed = sorted(name for name, ok in results.items() if not ok)
        if failed:
            self.log.error("one round failed", failed=",".join(failed))
            return EXIT_FAILURE
        self.log.info("one round done", loops=",".join(sorted(results)))
        return EXIT_OK

    def request_stop(self) -> None:
        self.stop.set()
        arriving = self.answer is not None and self.answer.done > 0  # a commands answer is being read
        for loop in self.loops:
            loop.wake.set()
            if not (loop.step == self.poll_commands and arriving):
                loop.interrupt()
        self.commands.wake()


def _stop_signal_arrived(_signum, _frame) -> None:
    """Nothing to do in the main thread: the pipe has the signal (stop_on_signals)."""


def _relay_stop_signals(read_end: int, request_stop: Callable[[], None]) -> None:
    while True:
        arrived = os.read(read_end, 64)  # one byte per signal, its number
        if not arrived:
            return
        if any(signum in arrived for signum in STOP_SIGNALS):
            request_stop()


def stop_on_signals(request_stop: Callable[[], None]) -> None:
    """From now on each SIGTERM or SIGINT calls request_stop in a thread of
    its own, "stop-signals".

    A Python signal handler runs in the main thread between two bytecodes,
    wherever that thread is: inside the stop event's lock (Event.wait holds
    it on the way into and out of its sleep), or inside the handler itself
    when another signal follows. Stopping from there waits for a lock its
    own thread holds, for ever. It happens: one systemd stop gives the
    onefile binary's Python process three SIGTERMs at once, its own and the
    two its launchers forward. So the handler does nothing; the C-level
    handler under it writes the signal's number to a pipe
    (signal.set_wakeup_fd), and the thread reading the pipe stops the agent
    as any other thread would, waiting for such a lock its turn. Must be
    called from the main thread."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)  # the C handler must never block; a full pipe has said enough
    threading.Thread(target=_relay_stop_signals, args=(read_end, request_stop), name="stop-signals",
                     daemon=True).start()
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    for signum in STOP_SIGNALS:
        signal.signal(signum, _stop_signal_arrived)


# --------------------------------------------------------------------------
# Doctor
# --------------------------------------------------------------------------
# `--doctor` runs every check an owner would otherwise do by hand with curl
# and journalctl, one line each: ok / warn / fail and, when not ok, the fix in
# plain words. It never prints a secret and never sends the pairing token.

DOCTOR_MIN_FREE_BYTES = 20 * 1024 * 1024
DOCTOR_MAX_CLOCK_SKEW = 120.0
# Moonraker's update manager takes `type: executable` (the installer's
# section for this connector) from this version on.
MOONRAKER_EXECUTABLE_UPDATES = (0, 10)


def moonraker_release(version: str) -> Optional[Tuple[int, int]]:
    """(major, minor) of a Moonraker version such as v0.9.3-61-g4a7b2c1."""
    match = re.match(r"v?(\d+)\.(\d+)", version or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


@dataclass
class Finding:
    status: str  # "ok", "warn" or "fail"
    check: str
    detail: str
    fix: str = ""


def _run(argv: List[str]) -> Tuple[int, str]:
    import subprocess
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return 127, str(exc)
    return done.returncode, done.stdout.decode("utf-8", "replace").strip()


def _user_name(uid: int) -> str:
    try:
        import pwd
        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return str(uid)


def _service_user(service: str) -> Optional[str]:
    import shutil
    if not shutil.which("systemctl"):
        return None
    code, output = _run(["systemctl", "show", "-p", "User", "--value", service])
    return output if code == 0 and output else None


def _install_folders(config_path: str) -> List[str]:
    here = os.path.dirname(os.path.abspath(sys.executable if getattr(sys, "frozen", False) else sys.argv[0]))
    return list(dict.fromkeys([here, os.path.dirname(os.path.abspath(config_path))]))


def _moonraker_fix(exc: HttpError, printer: PrinterConfig) -> str:
    if exc.status == 401:
        if printer.api_key:
            return "the api_key is wrong: copy Moonraker's key (Mainsail: Settings, General, API key)"
        return ("Moonraker wants an API key: set api_key for this printer, or add 127.0.0.1 to "
                "[authorization] trusted_clients in moonraker.conf")
    return "start Moonraker (sudo systemctl start moonraker) and check base_url %s" % printer.base_url


class Doctor:
    def __init__(self, config_path: str, service: str, log: Logger):
        self.config_path, self.service, self.log = config_path, service, log
        self.findings = []  # type: List[Finding]
        self.config = None  # type: Optional[Config]

    def note(self, status: str, check: str, detail: str, fix: str = "") -> None:
        finding = Finding(status, check, detail, fix)
        self.findings.append(finding)
        line = "%-4s  %-12s %s" % (status, check, self._shown(detail))
        if fix:
            line += "\n      fix: %s" % self._shown(fix)
        click.echo(line)

    def _shown(self, text: str) -> str:
        """Peer text (a version, an error, a log line) as one line without secrets."""
        return escape_unsafe(self.log.redact(text))

    def run(self) -> int:
        self.check_config()
        if self.config is not None:
            for secret in self.config.secrets():
                self.log.add_secret(secret)
            self.check_state_dir()
            for printer in self.config.moonraker:
                self.check_moonraker(printer)
            self.check_cloud()
            self.check_credentials()
        self.check_release_info()
        self.check_service()
        failed = sum(1 for f in self.findings if f.status == "fail")
        warned = sum(1 for f in self.findings if f.status == "warn")
        click.echo("%d checks: %d failed, %d warnings" % (len(self.findings), failed, warned))
        return EXIT_FAILURE if failed else EXIT_OK

    # -- config and disk ---------------------------------------------------

    def check_config(self) -> None:
        try:
            self.config = load_config(self.config_path)
        except ConfigError as exc:
            self.note("fail", "config", str(exc), "correct the file; README.md, section Configure, lists every key")
            return
        info = os.stat(self.config_path)
        mode = info.st_mode & 0o777
        owner = _user_name(info.st_uid)
        detail = "%s is valid (mode %04o, owner %s)" % (self.config_path, mode, owner)
        service_user = _service_user(self.service)
        if mode & 0o077:
            self.note("fail", "config", detail + "; others can read the secret",
                      "chmod 600 %s" % self.config_path)
        elif service_user and service_user != owner:
            self.note("warn", "config", detail + "; the service runs as %s" % service_user,
                      "chown %s %s" % (service_user, self.config_path))
        else:
            self.note("ok", "config", detail)

    def check_state_dir(self) -> None:
        state_dir = self.config.state_dir
        try:
            check_state_dir(state_dir)
        except StateDirError as exc:
            self.note("fail", "state_dir", str(exc), "create it and give it to the service user: "
                      "mkdir -p %s && chown USER %s" % (state_dir, state_dir))
            return
        import shutil
        free = shutil.disk_usage(state_dir).free
        detail = "%s is writable, %d MB free" % (state_dir, free // (1024 * 1024))
        if free < DOCTOR_MIN_FREE_BYTES:
            self.note("warn", "state_dir", detail, "free some space: the outbox needs room during cloud outages")
        else:
            self.note("ok", "state_dir", detail)

    # -- printers ----------------------------------------------------------

    def check_moonraker(self, printer: PrinterConfig) -> None:
        name = "moonraker" if len(self.config.moonraker) == 1 else "moonraker %s" % (printer.name or printer.base_url)
        client = Moonraker(printer, self.log, user_agent())
        try:
            info = client.server_info()
        except HttpError as exc:
            self.note("fail", name, "%s does not answer: %s" % (printer.base_url, exc), _moonraker_fix(exc, printer))
            client.close()
            return
        state = info.get("klippy_state")
        detail = "%s answers (Moonraker %s%s)" % (printer.base_url, info.get("moonraker_version", "?"),
                                                   ", with api_key" if printer.api_key else "")
        self.note("ok", name, detail)
        release = moonraker_release(str(info.get("moonraker_version", "")))
        if release is not None and release < MOONRAKER_EXECUTABLE_UPDATES:
            self.note("warn", "update", "Moonraker %s is older than 0.10.0: its update manager cannot update "
                      "printer-connector" % info.get("moonraker_version"),
                      "update printer-connector with update.sh; or update Moonraker, then run the installer again")
        if state == "ready":
            self.note("ok", "klippy", "Klipper is ready")
        else:
            self.note("warn", "klippy", "Klipper is %s: status and print commands fail until it is ready" % state,
                      "check Klipper's log (klippy.log) and restart it from Mainsail or Fluidd")
        self.check_webcam(client)
        client.close()

    def check_webcam(self, client: Moonraker) -> None:
        errors = []
        for url in webcam_candidates(client):
            try:
                image, ctype = fetch_webcam_image(client, url)
            except HttpError as exc:
                errors.append(str(exc))
                continue
            self.note("ok", "webcam", "%s gives a %d-byte %s" % (url, len(image), ctype))
            return
        self.note("warn", "webcam", "no camera image: %s" % _short("; ".join(errors), 300),
                  "configure the camera in Moonraker ([webcam] snapshot_url) or set ui_port to the web UI's port")

    # -- cloud -------------------------------------------------------------

    def check_cloud(self) -> None:
        url = self.config.cloud_url
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            resolve(parts.hostname, port, CONNECT_TIMEOUT)
        except OSError as exc:  # not found, or no answer in time
            self.note("fail", "cloud", "%s does not resolve: %s" % (parts.hostname, exc.strerror or exc),
                      "check cloud_url for typos, and the printer's DNS and internet connection")
            return
        probe = HttpClient(url, {"User-Agent": user_agent()}, generic_error_message, self.log, "cloud")
        try:
            response = probe.request("GET", url + "/", any_status=True)  # any answer shows the way is open
        except HttpError as exc:
            if isinstance(exc, TlsError):
                self.note("fail", "cloud", "%s: the TLS certificate is not valid: %s" % (url, _short(str(exc), 160)),
                          "check the printer's clock (date -u) and that nothing intercepts HTTPS")
            else:
                self.note("fail", "cloud", "%s: %s" % (url, exc),
                          "check cloud_url and that the printer can reach the internet (firewall, proxy)")
            return
        finally:
            probe.close()
        tls = "valid certificate" if parts.scheme == "https" else "plain http, no certificate to check"
        self.note("ok", "cloud", "%s answers (%s)" % (url, tls))
        self.check_clock(response.headers.get("Date"))

    def check_clock(self, date_header: Optional[str]) -> None:
        import email.utils
        try:
            server_time = email.utils.parsedate_to_datetime(date_header).timestamp() if date_header else None
        except (TypeError, ValueError, OverflowError):  # a year of 99999999999 overflows
            server_time = None
        if server_time is None:
            self.note("warn", "clock", "the cloud sent no Date header to compare the clock with")
            return
        skew = time.time() - server_time
        if abs(skew) > DOCTOR_MAX_CLOCK_SKEW:
            self.note("fail", "clock", "this clock is %+.0f s off the cloud's" % skew,
                      "set the time (timedatectl set-ntp true, or date -s); TLS fails with a wrong clock")
        else:
            self.note("ok", "clock", "within %.0f s of the cloud's" % abs(skew))

    def check_credentials(self) -> None:
        if not self.config.paired:
            self.note("ok", "pairing", "a pairing token is set; it is used once, by the service, so it is not "
                      "tried here")
            return
        cloud = Cloud(self.config, self.log)
        body = {"status": {"uptime_seconds": 0, "version": __version__},
                "printers": [{"printer_id": p.printer_id, "reachable": True} for p in self.config.active_printers()]}
        try:
            cloud.heartbeat(body)
            self.note("ok", "credentials", "connector %s is accepted by the cloud" % self.config.connector_id)
        except CredentialsRejected:
            self.note("fail", "credentials", "the cloud rejects connector %s" % self.config.connector_id,
                      "pair again: remove connector_id and connector_secret, add a new pairing_token, restart")
        except HttpError as exc:
            self.note("fail", "credentials", "heartbeat failed: %s" % exc, "see the cloud check above")
        finally:
            cloud.close()

    # -- installation ------------------------------------------------------

    def check_release_info(self) -> None:
        for folder in _install_folders(self.config_path):
            path = os.path.join(folder, "release_info.json")
            try:
                with open(path) as handle:
                    info = json.load(handle)
            except (OSError, ValueError):
                continue
            recorded = str(info.get("version", "")).lstrip("v") if isinstance(info, dict) else ""
            if recorded == __version__:
                self.note("ok", "version", "%s matches %s" % (__version__, path))
            else:
                self.note("warn", "version", "this binary is %s but %s says %s" % (__version__, path, recorded or "?"),
                          "run update.sh (checksum-verified, with rollback) to put them in step")
            return

    def check_service(self) -> None:
        import shutil
        init_script = "/etc/init.d/S99%s" % self.service
        if shutil.which("systemctl"):
            self._systemd_service()
        elif os.path.exists(init_script):
            self._init_service(init_script)
        else:
            self.note("warn", "service", "no systemd and no %s: the connector is not installed as a service"
                      % init_script, "install with installers/install-klipper.sh or install-k1.sh")

    def _systemd_service(self) -> None:
        enabled = _run(["systemctl", "is-enabled", self.service])
        active = _run(["systemctl", "is-active", self.service])
        if enabled[0] == 0 and active[0] == 0:
            self.note("ok", "service", "%s is enabled and running" % self.service)
        elif "booted with systemd" in enabled[1] + active[1] or "connect to bus" in enabled[1] + active[1]:
            self.note("warn", "service", "systemd is not running here, so the service cannot be checked")
            return
        else:
            state = "%s and %s" % (enabled[1].splitlines()[0] if enabled[1] else "not installed",
                                   active[1].splitlines()[0] if active[1] else "not running")
            self.note("fail", "service", "%s is %s" % (self.service, state),
                      "sudo systemctl enable --now %s" % self.service)
        code, lines = _run(["journalctl", "-u", self.service, "-n", "5", "--no-pager", "-o", "cat"])
        self._show_log(lines if code == 0 else "")

    def _init_service(self, init_script: str) -> None:
        code, output = _run([init_script, "status"])
        if code == 0:
            self.note("ok", "service", "%s: %s" % (init_script, output or "running"))
        else:
            self.note("fail", "service", "%s: %s" % (init_script, output or "not running"), "%s start" % init_script)
        log_file = os.path.join(os.path.dirname(os.path.abspath(self.config_path)), "%s.log" % self.service)
        try:
            with open(log_file, "rb") as handle:
                handle.seek(max(0, os.path.getsize(log_file) - 4096))
                self._show_log(handle.read().decode("utf-8", "replace"))
        except OSError:
            pass

    def _show_log(self, text: str) -> None:
        # Split at newlines only: splitlines() also splits at U+2028, VT, FF
        # and more, which would let one line of a peer's text pose as several.
        lines = [line for line in text.split("\n") if line.strip()]
        if lines:
            click.echo("      latest log lines:")
            for line in lines[-5:]:
                click.echo("        " + self._shown(line))


# --------------------------------------------------------------------------
# Installer
# --------------------------------------------------------------------------
# What the install, update and uninstall scripts (installers/) ask of the
# binary they downloaded and verified, so that no JSON or HTTP is written in
# their shell: `printer-connector installer COMMAND ARGS`, answers one a line
# on stdout, a reason on stderr, exit 1 for a failure and 2 for bad input.

# Moonraker answers, but Klipper is not connected: nothing prints.
KLIPPY_DOWN_STATUSES = (404, 503)


def installer_fail(message: str, code: int = EXIT_FAILURE) -> None:
    click.echo(message, err=True)
    sys.exit(code)


def parse_printer_lines(text: str) -> List[Dict[str, Any]]:
    """The installers' --printer values, one a line: ID|Name|URL[|UI_PORT]."""
    printers = []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) not in (3, 4):
            raise ConfigError('--printer wants "ID|Name|URL" or "ID|Name|URL|UI_PORT", got: %s' % line)
        if not (parts[0].isdigit() and (len(parts) == 3 or parts[3].isdigit())):
            raise ConfigError("--printer: the ID and UI_PORT must be numbers, got: %s" % line)
        entry = {"printer_id": int(parts[0]), "name": parts[1], "base_url": parts[2].rstrip("/")}
        if len(parts) == 4:
            entry["ui_port"] = int(parts[3])
        if not _is_http_url(entry["base_url"]):
            raise ConfigError("--printer: the URL must start with http:// or https://, got: %s" % line)
        if not entry["name"]:
            raise ConfigError("--printer: the name is empty in: %s" % line)
        printers.append(entry)
    if not printers:
        raise ConfigError("no printer given")
    return printers


def new_config(cloud_url: str, token: str, state_dir: str, printer_lines: str) -> Dict[str, Any]:
    """A first install's config, checked as the connector will read it."""
    if not _is_http_url(cloud_url):
        raise ConfigError("the cloud URL must start with http:// or https://, got: %s" % cloud_url)
    data = {"cloud_url": cloud_url.rstrip("/"), "pairing_token": token, "state_dir": state_dir,
            "moonraker": parse_printer_lines(printer_lines)}
    parse_config("the new config", data, environ={})
    return data


def write_json_file(path: str, data: Any, mode: int = 0o600) -> None:
    atomic_write(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"), mode)


def config_state(path: str) -> Tuple[str, str]:
    """(paired | unpaired | invalid, why) of the config at path."""
    try:
        config = load_config(path, environ={})
    except ConfigError as exc:
        return "invalid", str(exc)
    return ("paired", "") if config.connector_secret else ("unpaired", "")


def raw_config(path: str) -> Dict[str, Any]:
    try:
        return load_config(path, environ={}).raw
    except ConfigError as exc:
        installer_fail(str(exc), EXIT_USAGE)
        raise  # not reached: installer_fail exits


def ask_moonraker(url: str, path: str) -> Any:
    moonraker = Moonraker(PrinterConfig(base_url=url.rstrip("/")), Logger("error", sys.stderr), user_agent())
    try:
        return moonraker.call("GET", path, **exchange_limits("installer_question"))
    finally:
        moonraker.close()


def print_state(url: str) -> str:
    """printing, paused, standby, ...; klippy-down, unreachable or unknown."""
    try:
        result = ask_moonraker(url, "/printer/objects/query?print_stats")
    except HttpStatusError as exc:
        return "klippy-down" if exc.response.status in KLIPPY_DOWN_STATUSES else "unknown"
    except HttpError:
        return "unreachable"
    status = result.get("status") if isinstance(result, dict) else None
    stats = status.get("print_stats") if isinstance(status, dict) else None
    state = stats.get("state") if isinstance(stats, dict) else None
    return state if isinstance(state, str) and state else "unknown"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def installer():
    """What the installer scripts ask of the binary (installers/)."""


@installer.command("write-config")
@click.argument("out")
@click.argument("cloud_url")
@click.argument("token")
@click.argument("state_dir")
@click.argument("printer_lines")
def installer_write_config(out, cloud_url, token, state_dir, printer_lines):
    """A new config (0600) for a connector to pair with TOKEN."""
    try:
        write_json_file(out, new_config(cloud_url, token, state_dir, printer_lines))
    except ConfigError as exc:
        installer_fail(str(exc), EXIT_USAGE)


@installer.command("config-state")
@click.argument("path")
def installer_config_state(path):
    """paired, unpaired or invalid (with why on stderr)."""
    state, why = config_state(path)
    if why:
        click.echo(why, err=True)
    click.echo(state)


@installer.command("config-get")
@click.argument("path")
@click.argument("key")
def installer_config_get(path, key):
    """A top-level value of the config (empty when unset)."""
    value = raw_config(path).get(key)
    click.echo("" if value is None or isinstance(value, (dict, list)) else value)


@installer.command("config-set")
@click.argument("path")
@click.argument("key")
@click.argument("value")
def installer_config_set(path, key, value):
    """Sets a top-level string of the config, keeping the rest."""
    data = dict(raw_config(path), **{key: value})
    try:
        parse_config(path, data, environ={})
    except ConfigError as exc:
        installer_fail(str(exc), EXIT_USAGE)
    write_json_file(path, data)


@installer.command("printer-urls")
@click.argument("path")
def installer_printer_urls(path):
    """The Moonraker URL of each printer of the config."""
    try:
        config = load_config(path, environ={})
    except ConfigError as exc:
        installer_fail(str(exc), EXIT_USAGE)
    for printer in config.moonraker:
        click.echo(printer.base_url)


@installer.command("moonraker-ok")
@click.argument("url")
def installer_moonraker_ok(url):
    """Exit 0 if Moonraker answers /server/info at URL."""
    try:
        info = ask_moonraker(url, "/server/info")
    except HttpError as exc:
        installer_fail(str(exc))
    if not isinstance(info, dict):
        installer_fail("unexpected answer to /server/info")


@installer.command("moonraker-version")
@click.argument("url")
def installer_moonraker_version(url):
    """Moonraker's version at URL (empty when it does not say)."""
    try:
        info = ask_moonraker(url, "/server/info")
    except HttpError:
        info = None
    version = info.get("moonraker_version") if isinstance(info, dict) else None
    click.echo(version if isinstance(version, str) else "")


@installer.command("print-state")
@click.argument("url")
def installer_print_state(url):
    """print_stats.state at URL, or klippy-down, unreachable or unknown."""
    click.echo(print_state(url))


@installer.command("release-info-get")
@click.argument("path")
@click.argument("key")
def installer_release_info_get(path, key):
    """A value of Moonraker's release_info.json (empty when unreadable)."""
    try:
        with open(path, "rb") as handle:
            info = decode_json(handle.read(CONFIG_MAX_BYTES))
    except (OSError, BadJson):
        info = None
    value = info.get(key) if isinstance(info, dict) else None
    click.echo(value if isinstance(value, str) else "")


@installer.command("ca-bundle")
@click.argument("out")
def installer_ca_bundle(out):
    """Writes the CA certificates the connector verifies TLS with."""
    import certifi

    try:
        atomic_write(out, certifi.contents().encode("ascii"), 0o644)
    except OSError as exc:
        installer_fail("%s: %s" % (out, exc.strerror or exc))


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------
# The command line: parses the options, loads the config and runs the agent
# or the doctor, mapping what ends them to an exit code.


def _print_version(ctx, _param, value):
    if value and not ctx.resilient_parsing:
        click.echo("printer-connector %s" % __version__)
        ctx.exit(0)


def run_agent(config: Config, log: Logger, once: bool) -> int:
    try:
        agent = Agent(config, log)
    except StateDirError as exc:
        log.error(str(exc))
        return EXIT_FAILURE
    stop_on_signals(agent.request_stop)
    try:
        return agent.run_once() if once else agent.run()
    except PairingRejected as exc:
        log.error(exc.summary, error=str(exc))
        return EXIT_PAIRING_REJECTED
    except (HttpError, OSError) as exc:
        log.error("Connector failed", error=str(exc))
        return EXIT_FAILURE


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", metavar="PATH", help="Config file (JSON).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warn", "error"]), default="info",
              show_default=True, help="Least severe level that is logged.")
@click.option("--once", is_flag=True, help="Pair if needed, run one round of each loop, exit 0 if all went through.")
@click.option("--doctor", is_flag=True, help="Check the config, printer, cloud and service; print what is wrong and "
              "how to fix it.")
@click.option("--service-name", default="printer-connector", show_default=True, metavar="NAME",
              help="The installed service to check with --doctor.")
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Print the version and exit.")
def cli(config_path, log_level, once, doctor, service_name):
    """Bridges a Klipper printer's Moonraker API to the cloud over outbound HTTPS."""
    if not config_path:
        raise click.UsageError("--config PATH is required")
    log = Logger(log_level)
    log_uncaught_exceptions(log)
    if doctor:
        sys.exit(Doctor(config_path, service_name, log).run())
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        click.echo("config error: %s" % exc, err=True)
        sys.exit(EXIT_USAGE)
    for secret in config.secrets():
        log.add_secret(secret)
    if tighten_config_mode(config.path):
        log.warn("config file was readable by other users; changed its mode to 0600", path=config.path)
    sys.exit(run_agent(config, log, once))


def main(argv: Optional[List[str]] = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["installer"]:
        installer.main(args=args[1:], prog_name="printer-connector installer")
    else:
        cli.main(args=args, prog_name="printer-connector")


if __name__ == "__main__":
    main()
