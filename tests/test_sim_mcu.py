"""The simulated Klipper MCU (sim/mcu.py) on its own: the wire encoding that
klippy must understand, and the hardware models whose behaviour the rig's
tests rely on (step positions, homing, heat-up time, the 32-bit clock wrap).
The rig's tests (test_real_klipper.py) run it against the real klippy."""

import json
import math
import zlib

from hypothesis import assume, given, strategies as st

from sim import mcu


def encoded(value):
    out = bytearray()
    mcu.vlq_encode(value, out)
    return bytes(out)


@given(st.integers(min_value=-2 ** 31, max_value=2 ** 32 - 1))
def test_a_vlq_integer_decodes_to_the_value_encoded_modulo_32_bits(value):
    decoded, end = mcu.vlq_decode(encoded(value), 0)
    assert end == len(encoded(value))
    assert decoded & mcu.MASK32 == value & mcu.MASK32
    assert mcu.int32(decoded) == mcu.int32(value)


def test_vlq_sizes_follow_the_protocol_table():
    for size, (low, high) in enumerate(mcu.VLQ_RANGES, 1):
        assert len(encoded(low)) == size and len(encoded(high)) == size
        if size < 5:
            assert len(encoded(high + 1)) == size + 1 and len(encoded(low - 1)) == size + 1


def test_crc16_ccitt_matches_the_standard_check_value():
    # CRC-16/MCRF4XX (reflected 0x1021, init 0xffff, no final xor) of "123456789".
    assert mcu.crc16_ccitt(b"123456789") == 0x6F91


def test_a_block_carries_length_sequence_crc_and_sync():
    block = mcu.frame(3, b"\x05\x06")
    assert block[0] == len(block) == 7
    assert block[1] == 0x13 and block[-1] == 0x7E
    crc = mcu.crc16_ccitt(block[:-3])
    assert block[-3:-1] == bytes([crc >> 8, crc & 0xFF])


def test_the_data_dictionary_is_zlib_json_with_identify_at_its_fixed_ids():
    codec = mcu.Codec()
    document = json.loads(zlib.decompress(mcu.data_dictionary(codec.ids)))
    assert document["commands"]["identify offset=%u count=%c"] == 1
    assert document["responses"]["identify_response offset=%u data=%.*s"] == 0
    ids = list(document["commands"].values()) + list(document["responses"].values())
    assert len(set(ids)) == len(ids) and max(ids) <= 95  # one-byte ids
    assert document["config"]["CLOCK_FREQ"] == mcu.CLOCK_FREQ


def test_identify_serves_the_dictionary_in_chunks_and_an_empty_one_at_the_end():
    board = mcu.MCU()
    data = b""
    while True:
        board.dispatch("identify", {"offset": len(data), "count": 40})
        block = board.take_output()[0]
        name, params = decode_response(board, block)
        assert name == "identify_response" and params["offset"] == len(data)
        if not params["data"]:
            break
        data += params["data"]
    assert data == board.dictionary


def decode_response(board, block):
    """Parses one response block the way a host would (formats from RESPONSES)."""
    content = block[2:-3]
    msgid, pos = mcu.vlq_decode(content, 0)
    fmt = next(f for f, i in board.codec.ids.items() if i == msgid and f in mcu.RESPONSES)
    name, spec = mcu.parse_format(fmt)
    params = {}
    for pname, ptype in spec:
        if ptype in mcu.BUFFER_TYPES:
            length, pos = mcu.vlq_decode(content, pos)
            params[pname], pos = content[pos:pos + length], pos + length
        else:
            params[pname], pos = mcu.vlq_decode(content, pos)
    return name, params


def test_a_block_with_a_wrong_sequence_is_not_run_and_gets_a_nak_for_the_expected_one():
    board = mcu.MCU()
    get_clock = bytes([board.codec.ids["get_clock"]])
    assert board.receive_block(3, get_clock) == mcu.frame(1, b"")  # nak: a fresh board expects 1
    assert board.receive_block(4, get_clock) is None  # one nak is enough
    assert board.take_output() == []
    assert board.receive_block(1, get_clock) == mcu.frame(2, b"")  # ack: next expected is 2
    assert len(board.take_output()) == 1


def steps_by_loop(interval, count, add, ticks):
    at, done = 0, 0
    for _ in range(count):
        at += interval
        interval += add
        if at > ticks:
            break
        done += 1
    return done


@given(st.integers(1, 5000), st.integers(1, 300), st.integers(-8, 8), st.integers(0, 2_000_000))
def test_steps_done_in_closed_form_equals_stepping_one_by_one(interval, count, add, ticks):
    assume(interval + add * (count - 1) >= 1)  # the host never sends a move whose interval reaches zero
    assert mcu.steps_done(interval, count, add, ticks) == steps_by_loop(interval, count, add, ticks)


def test_a_stepper_stops_where_it_was_when_stopped_and_forgets_the_rest():
    stepper = mcu.Stepper(mcu.PINS.index("x_step"))
    stepper.next_dir = 0
    stepper.append(1000, 1000, 100, 0)  # steps at 1000, 2000, ... 100000
    assert stepper.position_at(50500) == -50
    stepper.stop(50500)
    assert stepper.position_at(10 ** 9) == -50 and not stepper.moving()


def test_moves_that_arrive_after_a_stop_are_dropped_until_reset_step_clock():
    board = mcu.MCU()
    board.dispatch("config_stepper", {"oid": 0, "step_pin": mcu.PINS.index("x_step"),
                                      "dir_pin": mcu.PINS.index("x_dir"), "invert_step": 0, "step_pulse_ticks": 0})
    stepper = board.objects[0]
    stepper.stop(board.clock())
    board.dispatch("queue_step", {"oid": 0, "interval": 1000, "count": 10, "add": 0})
    assert not stepper.moving()
    board.dispatch("reset_step_clock", {"oid": 0, "clock": board.clock() & mcu.MASK32})
    board.dispatch("queue_step", {"oid": 0, "interval": 1000, "count": 10, "add": 0})
    assert stepper.moving()


def test_clock32_maps_to_the_nearest_64_bit_clock_across_the_wrap():
    board = mcu.MCU()
    board.boot_time -= 50.0  # 50 s after boot: the 32-bit clock wrapped at ~42.9 s
    now = board.clock()
    assert now > 2 ** 32
    soon = now + mcu.CLOCK_FREQ // 10
    assert board.to_clock64(soon & mcu.MASK32) == soon
    assert board.to_clock64((now - mcu.CLOCK_FREQ) & mcu.MASK32) == now - mcu.CLOCK_FREQ


def test_a_heater_at_full_power_reaches_its_reference_in_heat_seconds():
    heater = mcu.Heater(60.0, 120.0, heat_seconds=12.0)
    heater.duty = 1.0
    for _ in range(120):
        heater.step(0.1)
    assert math.isclose(heater.temperature, 60.0, abs_tol=0.01)


def test_a_heater_turned_off_cools_towards_ambient():
    heater = mcu.Heater(210.0, 60.0, heat_seconds=10.0)
    heater.temperature, heater.duty = 200.0, 0.0
    heater.step(30.0)
    assert mcu.AMBIENT_C < heater.temperature < 200.0


def test_the_thermistor_reading_falls_as_the_temperature_rises():
    readings = [mcu.thermistor_adc(t) for t in (25, 60, 120, 210)]
    assert readings == sorted(readings, reverse=True)
    assert readings[0] == round(4095 * 100000 / (100000 + 4700))
