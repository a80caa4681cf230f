"""A simulated Klipper microcontroller on a pseudo-terminal (standard library only).

The real Klipper host (klippy) talks to it as to a board: message blocks
(length, sequence, CRC16-CCITT, sync byte 0x7e) of VLQ-encoded commands, a
zlib-compressed JSON data dictionary served through `identify`, clock queries
(get_uptime, get_clock) against a 100 MHz clock whose 32-bit value wraps every
43 s, config commands, and enough hardware for a small cartesian printer:

  * steppers (queue_step / set_next_step_dir / reset_step_clock), whose
    position follows their step schedule in closed form (no per-step loop);
  * endstops and trsync homing: an endstop reads triggered once its axis'
    stepper has moved ENDSTOP_STEPS back from where the MCU powered up;
  * digital outputs with software PWM (heaters, fan): a heater's duty cycle
    drives a first-order thermal model, and the thermistor on the matching
    analog input reports the ADC value a 100k beta-3950 NTC under a 4.7k
    pull-up would give, so M109/M190 take `--heat-seconds`, not minutes;
  * emergency_stop (shutdown, heaters to their default), reset (a reboot:
    configuration gone, clock from zero: FIRMWARE_RESTART works).

Written from Klipper's protocol documents (docs/Protocol.md, MCU_Commands.md),
not from its firmware. The command and response formats below are the ones
the klippy host looks up; they must match it character for character.

    python sim/mcu.py --link /tmp/klipper_host_rig --heat-seconds 15

prints "mcu ready PATH" once the pseudo-terminal exists. SIGUSR1 cools every
heater to ambient at once; SIGTERM stops it.
"""

import argparse
import heapq
import json
import math
import os
import select
import signal
import sys
import termios
import time
import tty
import zlib

CLOCK_FREQ = 100000000
MASK32 = 0xFFFFFFFF
SYNC = 0x7E
DEST = 0x10
BLOCK_MIN, BLOCK_MAX = 5, 64
MOVE_COUNT = 1024
ENDSTOP_STEPS = 2000            # how far (in steps) each carriage starts from its endstop
AMBIENT_C = 25.0
BUSY_POLL = 0.001               # loop period while a stepper moves or an endstop homes
IDLE_POLL = 0.05
# A reset board reboots before it listens again: what the old host session
# still sends meanwhile is lost, as on a real serial line.
REBOOT_SECONDS = 0.3

# --------------------------------------------------------------------------
# Data dictionary: formats exactly as the host looks them up
# --------------------------------------------------------------------------

COMMANDS = [
    "identify offset=%u count=%c",
    "get_uptime", "get_clock", "get_config",
    "allocate_oids count=%c", "finalize_config crc=%u",
    "emergency_stop", "reset",
    "config_digital_out oid=%c pin=%u value=%c default_value=%c max_duration=%u",
    "set_digital_out pin=%u value=%c",
    "update_digital_out oid=%c value=%c",
    "queue_digital_out oid=%c clock=%u on_ticks=%u",
    "set_digital_out_pwm_cycle oid=%c cycle_ticks=%u",
    "config_analog_in oid=%c pin=%u",
    "query_analog_in oid=%c clock=%u sample_ticks=%u sample_count=%c rest_ticks=%u"
    " min_value=%hu max_value=%hu range_check_count=%c",
    "config_stepper oid=%c step_pin=%c dir_pin=%c invert_step=%c step_pulse_ticks=%u",
    "queue_step oid=%c interval=%u count=%hu add=%hi",
    "set_next_step_dir oid=%c dir=%c",
    "reset_step_clock oid=%c clock=%u",
    "stepper_get_position oid=%c",
    "stepper_stop_on_trigger oid=%c trsync_oid=%c",
    "config_endstop oid=%c pin=%c pull_up=%c",
    "endstop_home oid=%c clock=%u sample_ticks=%u sample_count=%c rest_ticks=%u"
    " pin_value=%c trsync_oid=%c trigger_reason=%c",
    "endstop_query_state oid=%c",
    "config_trsync oid=%c",
    "trsync_start oid=%c report_clock=%u report_ticks=%u expire_reason=%c",
    "trsync_set_timeout oid=%c clock=%u",
    "trsync_trigger oid=%c reason=%c",
]
RESPONSES = [
    "identify_response offset=%u data=%.*s",
    "uptime high=%u clock=%u",
    "clock clock=%u",
    "config is_config=%c crc=%u is_shutdown=%c move_count=%hu",
    "shutdown clock=%u static_string_id=%hu",
    "is_shutdown static_string_id=%hu",
    "stats count=%u sum=%u sumsq=%u",
    "analog_in_state oid=%c next_clock=%u value=%hu",
    "stepper_position oid=%c pos=%i",
    "endstop_state oid=%c homing=%c next_clock=%u pin_value=%c",
    "trsync_state oid=%c can_trigger=%c trigger_reason=%c clock=%u",
]
# Pins are named for what they drive; an unknown name is a config error in klippy.
PINS = ["%s_%s" % (axis, role) for axis in "xyze" for role in ("step", "dir", "enable")]
PINS += ["x_stop", "y_stop", "z_stop", "hotend_heat", "hotend_temp",
         "bed_heat", "bed_temp", "part_fan", "led"]
SHUTDOWN_REASONS = ["Command request", "ADC out of range", "Unknown command"]
# Commands a shut-down MCU still serves (the rest answer is_shutdown).
SERVED_IN_SHUTDOWN = {"identify", "get_uptime", "get_clock", "get_config",
                      "emergency_stop", "reset", "stepper_get_position",
                      "endstop_query_state", "trsync_trigger"}
SIGNED_TYPES = ("%i", "%hi")
BUFFER_TYPES = ("%.*s", "%*s", "%s")


def message_ids():
    """Format -> id. identify_response is 0 and identify is 1 by the protocol."""
    ids = {RESPONSES[0]: 0, COMMANDS[0]: 1}
    for fmt in COMMANDS[1:] + RESPONSES[1:]:
        ids[fmt] = len(ids)
    return ids


def data_dictionary(ids):
    document = {
        "version": "printer-connector-sim-mcu",
        "build_versions": "python%d.%d" % sys.version_info[:2],
        "commands": {fmt: ids[fmt] for fmt in COMMANDS},
        "responses": {fmt: ids[fmt] for fmt in RESPONSES},
        "output": {},
        "enumerations": {
            "pin": {name: number for number, name in enumerate(PINS)},
            "static_string_id": {text: number for number, text in enumerate(SHUTDOWN_REASONS, 1)},
        },
        "config": {"CLOCK_FREQ": CLOCK_FREQ, "MCU": "printer-connector-sim",
                   "STATS_SUMSQ_BASE": 256, "ADC_MAX": 4095, "PWM_MAX": 255,
                   "RECEIVE_WINDOW": 192},
    }
    return zlib.compress(json.dumps(document, separators=(",", ":")).encode())


# --------------------------------------------------------------------------
# Wire encoding: VLQ integers, CRC16-CCITT, message blocks
# --------------------------------------------------------------------------

# (lowest, highest) value that fits in 1..5 bytes (Protocol.md's table).
VLQ_RANGES = [(-32, 95), (-4096, 12287), (-524288, 1572863),
              (-67108864, 201326591), (-2147483648, 4294967295)]


def vlq_encode(value, out):
    """Two's-complement 7-bit groups, most significant first, 0x80 = more follow."""
    size = next((n for n, (low, high) in enumerate(VLQ_RANGES, 1) if low <= value <= high), 5)
    for shift in range(7 * (size - 1), 0, -7):
        out.append(((value >> shift) & 0x7F) | 0x80)
    out.append(value & 0x7F)


def vlq_decode(data, pos):
    """Returns (signed value, next position). Bits 0x60 of the first group set
    means the number is negative (sign-extended from that group)."""
    byte = data[pos]
    pos += 1
    value = byte & 0x7F
    if byte & 0x60 == 0x60:
        value -= 0x80
    while byte & 0x80:
        byte = data[pos]
        pos += 1
        value = (value << 7) | (byte & 0x7F)
    return value, pos


def int32(value):
    return ((value + (1 << 31)) & MASK32) - (1 << 31)


def crc16_ccitt(data):
    """CRC-16/CCITT, reflected polynomial 0x8408, initial value 0xffff (bytewise form)."""
    crc = 0xFFFF
    for byte in data:
        byte ^= crc & 0xFF
        byte ^= (byte << 4) & 0xFF
        crc = ((byte << 8) | (crc >> 8)) ^ (byte >> 4) ^ (byte << 3)
        crc &= 0xFFFF
    return crc


def frame(seq, content):
    block = bytearray([len(content) + BLOCK_MIN, DEST | (seq & 0x0F)]) + content
    crc = crc16_ccitt(block)
    block += bytes([crc >> 8, crc & 0xFF, SYNC])
    return bytes(block)


def parse_format(fmt):
    """'name a=%c b=%i' -> ('name', [('a', '%c'), ('b', '%i')])."""
    words = fmt.split()
    return words[0], [tuple(word.split("=", 1)) for word in words[1:]]


class Codec:
    def __init__(self):
        self.ids = message_ids()
        self.commands = {}
        for fmt in COMMANDS:
            name, params = parse_format(fmt)
            self.commands[self.ids[fmt]] = (name, params)
        self.responses = {parse_format(fmt)[0]: (self.ids[fmt], parse_format(fmt)[1]) for fmt in RESPONSES}

    def decode(self, content):
        """Yields (name, params) for every command in a block's content."""
        pos = 0
        while pos < len(content):
            msgid, pos = vlq_decode(content, pos)
            if msgid not in self.commands:
                raise ValueError("unknown command id %d" % msgid)
            name, spec = self.commands[msgid]
            params = {}
            for pname, ptype in spec:
                if ptype in BUFFER_TYPES:
                    length, pos = vlq_decode(content, pos)
                    params[pname] = bytes(content[pos:pos + length])
                    pos += length
                    continue
                value, pos = vlq_decode(content, pos)
                params[pname] = int32(value) if ptype in SIGNED_TYPES else value & MASK32
            yield name, params

    def encode(self, name, **params):
        msgid, spec = self.responses[name]
        out = bytearray()
        vlq_encode(msgid, out)
        for pname, ptype in spec:
            value = params[pname]
            if ptype in BUFFER_TYPES:
                out.append(len(value))
                out += value
            else:
                vlq_encode(value if ptype in SIGNED_TYPES else value & MASK32, out)
        return bytes(out)


# --------------------------------------------------------------------------
# Hardware models
# --------------------------------------------------------------------------

def steps_done(interval, count, add, ticks):
    """How many of a queue_step's `count` steps fall within `ticks` of its start.
    Step k (1-based) is at k*interval + add*k*(k-1)/2."""
    def at(k):
        return k * interval + add * k * (k - 1) // 2
    low, high = 0, count
    while low < high:
        mid = (low + high + 1) // 2
        if at(mid) <= ticks:
            low = mid
        else:
            high = mid - 1
    return low


class Stepper:
    """Each queued move is [start, interval, count, add, direction]; its step k
    (1-based) is at start + k*interval + add*k*(k-1)/2 (64-bit clocks)."""

    def __init__(self, step_pin):
        self.axis = PINS[step_pin][0] if 0 <= step_pin < len(PINS) else "?"
        self.position = 0           # dir=1 steps minus dir=0 steps
        self.tail_clock = 0         # clock of the last step scheduled
        self.next_dir = 0
        self.queue = []
        # After a stop (an endstop hit) moves still on the wire are dropped
        # until the host sends reset_step_clock: it knows they never ran.
        self.need_reset = False

    def append(self, first_step, interval, count, add):
        """`first_step` is the 64-bit clock of the move's first step. The host
        counts intervals in 32-bit arithmetic from the last step (or from a
        reset_step_clock, even clock=0): only the sum's low 32 bits are meant."""
        if self.need_reset:
            return
        start = first_step - interval
        self.queue.append([start, interval, count, add, self.next_dir])
        self.tail_clock = start + count * interval + add * count * (count - 1) // 2

    def advance(self, now):
        """Completes every queued move that has ended by `now`."""
        while self.queue:
            start, interval, count, add, direction = self.queue[0]
            if start + count * interval + add * count * (count - 1) // 2 > now:
                return
            self.position += count if direction else -count
            self.queue.pop(0)

    def position_at(self, now):
        self.advance(now)
        if not self.queue:
            return self.position
        start, interval, count, add, direction = self.queue[0]
        done = steps_done(interval, count, add, now - start)
        return self.position + (done if direction else -done)

    def stop(self, now):
        self.position = self.position_at(now)
        self.queue = []
        self.tail_clock = now
        self.need_reset = True

    def moving(self):
        return bool(self.queue)


class Heater:
    """dT/dt = duty*gain - (T - ambient)*loss. The gain is chosen so that full
    power takes `heat_seconds` from ambient to `reference_c`."""

    def __init__(self, reference_c, cool_tau, heat_seconds):
        self.loss = 1.0 / cool_tau
        self.gain = (reference_c - AMBIENT_C) * self.loss / (1.0 - math.exp(-self.loss * heat_seconds))
        self.temperature = AMBIENT_C
        self.duty = 0.0

    def step(self, seconds):
        # Exact solution of the linear ODE over the interval (stable for any dt).
        settle = AMBIENT_C + self.duty * self.gain / self.loss
        self.temperature = settle + (self.temperature - settle) * math.exp(-self.loss * seconds)


def thermistor_adc(temperature_c, adc_max=4095, pullup=4700.0, r25=100000.0, beta=3950.0):
    """ADC reading of an NTC thermistor to ground under a pull-up to the ADC reference."""
    kelvin = temperature_c + 273.15
    resistance = r25 * math.exp(beta * (1.0 / kelvin - 1.0 / 298.15))
    return int(round(adc_max * resistance / (resistance + pullup)))


class DigitalOut:
    def __init__(self, pin, value, default_value):
        self.pin = PINS[pin] if 0 <= pin < len(PINS) else "?"
        self.value = float(value)
        self.default = float(default_value)
        self.cycle_ticks = 0

    def set_on_ticks(self, on_ticks):
        if self.cycle_ticks:
            self.value = min(1.0, on_ticks / float(self.cycle_ticks))
        else:
            self.value = 1.0 if on_ticks else 0.0


class AnalogIn:
    def __init__(self, pin):
        self.pin = PINS[pin] if 0 <= pin < len(PINS) else "?"
        self.next_clock = None
        self.rest_ticks = self.sample_count = 0
        self.min_value, self.max_value = 0, 0xFFFF
        self.range_check_count = self.out_of_range = 0


class Endstop:
    def __init__(self, pin):
        self.axis = PINS[pin][0] if 0 <= pin < len(PINS) else "?"
        self.homing = False
        self.next_clock = 0
        self.rest_ticks = 0
        self.pin_value = 1
        self.trsync = None
        self.reason = 0


class Trsync:
    def __init__(self):
        self.can_trigger = False
        self.reason = 0
        self.expire_reason = 0
        self.expire_clock = None
        self.report_clock = None
        self.report_ticks = 0
        self.steppers = []


# --------------------------------------------------------------------------
# The microcontroller: a command table over the hardware models
# --------------------------------------------------------------------------

class MCU:
    def __init__(self, heat_seconds=15.0, verbose=False):
        self.codec = Codec()
        self.dictionary = data_dictionary(self.codec.ids)
        self.heat_seconds = heat_seconds
        self.verbose = verbose
        self.outbox = []
        self.boot()

    def boot(self):
        """Power-on state (also what `reset` returns to)."""
        self.boot_time = time.monotonic()
        # klippy opens every session with sequence 1; a fresh board expects
        # just that (a board that kept running naks it with the one it expects).
        self.next_seq = 1
        self.nak_sent = False
        self.objects = {}
        self.configured = False
        self.config_crc = 0
        self.shutdown_reason = None
        self.timers = []            # heap of (clock64, order, callable)
        self.timer_order = 0
        self.heaters = {"hotend": Heater(210.0, 60.0, self.heat_seconds),
                        "bed": Heater(60.0, 120.0, self.heat_seconds)}
        self.last_physics = self.boot_time
        self.next_stats = self.clock() + 5 * CLOCK_FREQ

    # -- time ---------------------------------------------------------------
    def clock(self):
        return int((time.monotonic() - self.boot_time) * CLOCK_FREQ)

    def to_clock64(self, clock32):
        """The 64-bit clock nearest to now whose low 32 bits are clock32 (wrap-safe)."""
        now = self.clock()
        delta = ((clock32 - now) + (1 << 31)) & MASK32
        return now + delta - (1 << 31)

    def at(self, clock64, action):
        self.timer_order += 1
        heapq.heappush(self.timers, (clock64, self.timer_order, action))

    # -- output -------------------------------------------------------------
    def send(self, name, **params):
        if self.verbose and name not in ("analog_in_state", "clock", "stats"):
            sys.stderr.write("mcu: -> %s %s\n" % (name, params))
        self.outbox.append(self.codec.encode(name, **params))

    def take_output(self):
        blocks = [frame(self.next_seq, content) for content in self.outbox]
        self.outbox = []
        return blocks

    # -- input --------------------------------------------------------------
    def receive_block(self, seq, content):
        """Returns the ack or nak block to send back (None: stay silent).
        Out of sequence, one nak says where to resend from; further blocks
        out of sequence are dropped silently (the host's retransmit timer
        covers them), or each copy in flight would restart the resend."""
        if seq != self.next_seq:
            if self.verbose:
                sys.stderr.write("mcu: out of sequence: got %d, expected %d\n" % (seq, self.next_seq))
            if self.nak_sent:
                return None
            self.nak_sent = True
            return frame(self.next_seq, b"")
        self.nak_sent = False
        self.next_seq = (seq + 1) & 0x0F
        try:
            commands = list(self.codec.decode(content))
        except (ValueError, IndexError):
            self.shutdown("Unknown command")
            return frame(self.next_seq, b"")
        for name, params in commands:
            self.dispatch(name, params)
        return frame(self.next_seq, b"")

    def dispatch(self, name, params):
        if self.verbose and name not in ("queue_step", "get_clock", "set_next_step_dir"):
            sys.stderr.write("mcu: %s %s\n" % (name, params))
        if self.shutdown_reason is not None and name not in SERVED_IN_SHUTDOWN:
            self.send("is_shutdown", static_string_id=self.reason_id(self.shutdown_reason))
            return
        handler = getattr(self, "cmd_" + name)
        handler(**params)

    def reason_id(self, text):
        return SHUTDOWN_REASONS.index(text) + 1

    def shutdown(self, reason):
        if self.shutdown_reason is not None:
            return
        self.shutdown_reason = reason
        now = self.clock()
        self.timers = []
        for obj in self.objects.values():
            if isinstance(obj, DigitalOut):
                obj.value = obj.default
            elif isinstance(obj, Stepper):
                obj.stop(now)
            elif isinstance(obj, Endstop):
                obj.homing = False
            elif isinstance(obj, AnalogIn):
                obj.next_clock = None
        self.send("shutdown", clock=now & MASK32, static_string_id=self.reason_id(reason))

    def obj(self, oid, kind):
        found = self.objects.get(oid)
        if not isinstance(found, kind):
            raise KeyError("oid %d is not a %s" % (oid, kind.__name__))
        return found

    # -- protocol and configuration commands ----------------------------------
    def cmd_identify(self, offset, count):
        self.send("identify_response", offset=offset, data=self.dictionary[offset:offset + count])

    def cmd_get_uptime(self):
        now = self.clock()
        self.send("uptime", high=now >> 32, clock=now & MASK32)

    def cmd_get_clock(self):
        self.send("clock", clock=self.clock() & MASK32)

    def cmd_get_config(self):
        self.send("config", is_config=int(self.configured), crc=self.config_crc,
                  is_shutdown=int(self.shutdown_reason is not None), move_count=MOVE_COUNT)

    def cmd_allocate_oids(self, count):
        self.objects = {}

    def cmd_finalize_config(self, crc):
        self.configured = True
        self.config_crc = crc

    def cmd_emergency_stop(self):
        self.shutdown("Command request")

    def cmd_reset(self):
        self.boot()
        self.outbox = []

    # -- digital out / software PWM -------------------------------------------
    def cmd_config_digital_out(self, oid, pin, value, default_value, max_duration):
        self.objects[oid] = DigitalOut(pin, value, default_value)

    def cmd_set_digital_out(self, pin, value):
        pass                        # a static pin: nothing reads it

    def cmd_update_digital_out(self, oid, value):
        self.obj(oid, DigitalOut).set_on_ticks(value)

    def cmd_queue_digital_out(self, oid, clock, on_ticks):
        out = self.obj(oid, DigitalOut)
        self.at(self.to_clock64(clock), lambda: out.set_on_ticks(on_ticks))

    def cmd_set_digital_out_pwm_cycle(self, oid, cycle_ticks):
        self.obj(oid, DigitalOut).cycle_ticks = cycle_ticks

    # -- analog in ------------------------------------------------------------
    def cmd_config_analog_in(self, oid, pin):
        self.objects[oid] = AnalogIn(pin)

    def cmd_query_analog_in(self, oid, clock, sample_ticks, sample_count, rest_ticks,
                            min_value, max_value, range_check_count):
        sensor = self.obj(oid, AnalogIn)
        sensor.next_clock = self.to_clock64(clock) if sample_count else None
        sensor.rest_ticks, sensor.sample_count = rest_ticks, sample_count
        sensor.min_value, sensor.max_value = min_value, max_value
        sensor.range_check_count, sensor.out_of_range = range_check_count, 0

    # -- steppers -------------------------------------------------------------
    def cmd_config_stepper(self, oid, step_pin, dir_pin, invert_step, step_pulse_ticks):
        self.objects[oid] = Stepper(step_pin)

    def cmd_queue_step(self, oid, interval, count, add):
        stepper = self.obj(oid, Stepper)
        stepper.append(self.to_clock64((stepper.tail_clock + interval) & MASK32), interval, count, add)

    def cmd_set_next_step_dir(self, oid, dir):
        self.obj(oid, Stepper).next_dir = dir

    def cmd_reset_step_clock(self, oid, clock):
        stepper = self.obj(oid, Stepper)
        stepper.tail_clock, stepper.need_reset = self.to_clock64(clock), False

    def cmd_stepper_get_position(self, oid):
        position = self.obj(oid, Stepper).position_at(self.clock())
        self.send("stepper_position", oid=oid, pos=position)

    def cmd_stepper_stop_on_trigger(self, oid, trsync_oid):
        self.obj(trsync_oid, Trsync).steppers.append(self.obj(oid, Stepper))

    # -- endstops and trsync --------------------------------------------------
    def cmd_config_endstop(self, oid, pin, pull_up):
        self.objects[oid] = Endstop(pin)

    def endstop_level(self, endstop, now):
        for obj in self.objects.values():
            if isinstance(obj, Stepper) and obj.axis == endstop.axis:
                return int(obj.position_at(now) <= -ENDSTOP_STEPS)
        return 0

    def cmd_endstop_home(self, oid, clock, sample_ticks, sample_count, rest_ticks,
                         pin_value, trsync_oid, trigger_reason):
        endstop = self.obj(oid, Endstop)
        endstop.homing = bool(sample_count)
        if sample_count:            # a stop keeps next_clock: the host reads the trigger time from it
            endstop.next_clock = self.to_clock64(clock)
        endstop.rest_ticks, endstop.pin_value = rest_ticks, pin_value
        endstop.trsync = self.objects.get(trsync_oid) if sample_count else None
        endstop.reason = trigger_reason

    def cmd_endstop_query_state(self, oid):
        endstop = self.obj(oid, Endstop)
        now = self.clock()
        self.send("endstop_state", oid=oid, homing=int(endstop.homing),
                  next_clock=endstop.next_clock & MASK32, pin_value=self.endstop_level(endstop, now))

    def cmd_config_trsync(self, oid):
        self.objects[oid] = Trsync()

    def cmd_trsync_start(self, oid, report_clock, report_ticks, expire_reason):
        trsync = self.obj(oid, Trsync)
        trsync.can_trigger, trsync.reason, trsync.steppers = True, 0, []
        trsync.expire_reason, trsync.expire_clock = expire_reason, None
        trsync.report_ticks = report_ticks
        trsync.report_clock = self.to_clock64(report_clock) if report_ticks else None

    def cmd_trsync_set_timeout(self, oid, clock):
        self.obj(oid, Trsync).expire_clock = self.to_clock64(clock)

    def cmd_trsync_trigger(self, oid, reason):
        self.trigger(oid, reason, self.clock())
        self.report_trsync(oid, self.clock())

    def trigger(self, oid, reason, now):
        trsync = self.obj(oid, Trsync)
        if not trsync.can_trigger:
            return
        trsync.can_trigger, trsync.reason = False, reason
        trsync.expire_clock = trsync.report_clock = None
        for stepper in trsync.steppers:
            stepper.stop(now)
        for obj in self.objects.values():
            if isinstance(obj, Endstop) and obj.trsync is trsync:
                obj.homing = False
        self.report_trsync(oid, now)

    def report_trsync(self, oid, now):
        trsync = self.obj(oid, Trsync)
        self.send("trsync_state", oid=oid, can_trigger=int(trsync.can_trigger),
                  trigger_reason=trsync.reason, clock=now & MASK32)

    # -- the periodic work: timers, homing, sensors, physics -------------------
    def poll(self):
        """Runs everything due by now; returns seconds until it should run again."""
        now = self.clock()
        while self.timers and self.timers[0][0] <= now:
            heapq.heappop(self.timers)[2]()
        self.update_heaters()
        busy = False
        for oid, obj in list(self.objects.items()):
            if isinstance(obj, Stepper):
                obj.advance(now)
                busy = busy or obj.moving()
            elif isinstance(obj, Endstop) and obj.homing:
                busy = True
                self.sample_endstop(obj, now)
            elif isinstance(obj, Trsync):
                self.poll_trsync(oid, obj, now)
            elif isinstance(obj, AnalogIn):
                self.poll_analog(oid, obj, now)
        if now >= self.next_stats:
            self.next_stats = now + 5 * CLOCK_FREQ
            self.send("stats", count=5000, sum=CLOCK_FREQ // 200, sumsq=(CLOCK_FREQ // 200) ** 2 // 5000 // 256)
        return BUSY_POLL if busy or self.timers and self.timers[0][0] - now < IDLE_POLL * CLOCK_FREQ \
            else IDLE_POLL

    def sample_endstop(self, endstop, now):
        if now < endstop.next_clock:
            return
        endstop.next_clock = now + endstop.rest_ticks
        if self.endstop_level(endstop, now) == endstop.pin_value and endstop.trsync is not None:
            endstop.homing = False
            oid = next(o for o, obj in self.objects.items() if obj is endstop.trsync)
            self.trigger(oid, endstop.reason, now)

    def poll_trsync(self, oid, trsync, now):
        if not trsync.can_trigger:
            return
        if trsync.expire_clock is not None and now >= trsync.expire_clock:
            self.trigger(oid, trsync.expire_reason, now)
            return
        if trsync.report_clock is not None and now >= trsync.report_clock:
            trsync.report_clock = now + trsync.report_ticks
            self.report_trsync(oid, now)

    def poll_analog(self, oid, sensor, now):
        while sensor.next_clock is not None and sensor.next_clock <= now:
            sensor.next_clock += sensor.rest_ticks
            value = self.sensor_reading(sensor.pin) * sensor.sample_count
            if sensor.min_value <= value <= sensor.max_value:
                sensor.out_of_range = 0
            else:
                sensor.out_of_range += 1
                if sensor.out_of_range > sensor.range_check_count:
                    self.shutdown("ADC out of range")
                    return
            self.send("analog_in_state", oid=oid, next_clock=sensor.next_clock & MASK32, value=value)

    def sensor_reading(self, pin):
        heater = self.heaters.get(pin.split("_")[0])
        return thermistor_adc(heater.temperature if heater else AMBIENT_C)

    def update_heaters(self):
        moment = time.monotonic()
        elapsed, self.last_physics = moment - self.last_physics, moment
        for obj in self.objects.values():
            if isinstance(obj, DigitalOut) and obj.pin.endswith("_heat"):
                self.heaters[obj.pin.split("_")[0]].duty = obj.value
        for heater in self.heaters.values():
            heater.step(elapsed)


# --------------------------------------------------------------------------
# The serial line: a pseudo-terminal in raw mode
# --------------------------------------------------------------------------

class SerialLine:
    def __init__(self, mcu, link=None):
        self.mcu = mcu
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)      # no echo, no line discipline: bytes pass as they are
        # Holding the slave open keeps the master usable while klippy closes and
        # reopens the port (firmware restart, klippy restart).
        self.path = os.ttyname(self.slave)
        self.link = link
        if link:
            if os.path.islink(link):
                os.unlink(link)
            os.symlink(self.path, link)
        self.buffer = bytearray()
        self.deaf_until = 0.0

    def close(self):
        if self.link and os.path.islink(self.link):
            os.unlink(self.link)
        os.close(self.master)
        os.close(self.slave)

    def write(self, data):
        view = memoryview(data)
        while view:
            view = view[os.write(self.master, view):]

    def blocks(self):
        """Complete, valid blocks in the input buffer; garbage is skipped to the next sync."""
        while True:
            while self.buffer and self.buffer[0] == SYNC:
                del self.buffer[0]
            if len(self.buffer) < BLOCK_MIN:
                return
            length, seq = self.buffer[0], self.buffer[1]
            if not BLOCK_MIN <= length <= BLOCK_MAX or seq & 0xF0 != DEST:
                self.resync()
                continue
            if len(self.buffer) < length:
                return
            block = bytes(self.buffer[:length])
            crc = crc16_ccitt(block[:-3])
            if block[-1] != SYNC or block[-3:-1] != bytes([crc >> 8, crc & 0xFF]):
                self.resync()
                continue
            del self.buffer[:length]
            yield seq & 0x0F, block[2:-3]

    def resync(self):
        at = self.buffer.find(bytes([SYNC]), 1)
        del self.buffer[:at if at >= 0 else len(self.buffer)]

    def serve(self, stop, cool_down=lambda: False):
        timeout = 0.0
        while not stop():
            if cool_down():
                for heater in self.mcu.heaters.values():
                    heater.temperature = AMBIENT_C
            ready, _, _ = select.select([self.master], [], [], timeout)
            if ready:
                try:
                    self.buffer += os.read(self.master, 4096)
                except OSError:
                    time.sleep(IDLE_POLL)   # no reader on the far side yet
                if time.monotonic() < self.deaf_until:
                    self.buffer = bytearray()
                for seq, content in list(self.blocks()):
                    was_reset = self.mcu.boot_time
                    ack = self.mcu.receive_block(seq, content)
                    if self.mcu.boot_time != was_reset:
                        # A reboot: what the old session sent after it is gone.
                        termios.tcflush(self.slave, termios.TCIFLUSH)
                        self.buffer = bytearray()
                        self.deaf_until = time.monotonic() + REBOOT_SECONDS
                        break
                    # Responses first: each carries the next sequence too, and
                    # klippy reads a query's answer as soon as the ack is in.
                    self.flush()
                    if ack is not None:
                        self.write(ack)
            timeout = self.mcu.poll()
            self.flush()

    def flush(self):
        for block in self.mcu.take_output():
            self.write(block)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--link", help="make this path a symlink to the pseudo-terminal")
    parser.add_argument("--heat-seconds", type=float, default=15.0,
                        help="full-power heat-up time from ambient to 210 C (hotend) / 60 C (bed)")
    parser.add_argument("--verbose", action="store_true", help="log every command but steps and clocks")
    args = parser.parse_args(argv)
    line = SerialLine(MCU(args.heat_seconds, args.verbose), args.link)
    stopping, cooling = [], []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
    # SIGUSR1: every heater is back at ambient at once (a night's cool-down,
    # for tests that need a full heat-up).
    signal.signal(signal.SIGUSR1, lambda *_: cooling.append(1))
    print("mcu ready %s" % (args.link or line.path), flush=True)

    def cool_down():
        if cooling:
            del cooling[:]
            return True
        return False
    try:
        line.serve(lambda: bool(stopping), cool_down)
    finally:
        line.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
