"""Requests Klipper refuses although the state read just before allowed
them: a print started from the web UI in between ("SD busy"), or Klipper
shut down in between (Moonraker 0.11 then answers every print control and
G-code script with HTTP 400 "Unknown", as recorded against the real Klipper
and Moonraker of sim/rig.py after an M112). That command fails with a
message that says what happened; the connector carries on.

The printer simulator models both (its faults late_sd_busy and
late_shutdown, and its shut-down answers); the connector runs as a real
process against it and the reference cloud."""

import pytest
import requests

from harness import run_command, start

LATE_SHUTDOWN = "Lost communication with MCU 'mcu'"


def post(printer, path, **kwargs):
    return requests.post(printer.url + path, timeout=5, **kwargs)


# -- the simulator answers as the real Moonraker does ----------------------------------

@pytest.mark.parametrize("path, body", [
    ("/printer/print/pause", None), ("/printer/print/resume", None), ("/printer/print/cancel", None),
    ("/printer/print/start?filename=part.gcode", None), ("/printer/gcode/script", {"script": "G28"})])
def test_a_shut_down_simulator_refuses_controls_and_gcode_with_400_unknown(own_printer, path, body):
    own_printer.add_file("part.gcode")
    post(own_printer, "/printer/emergency_stop")
    answer = post(own_printer, path, json=body)
    assert answer.status_code == 400 and answer.json()["error"]["message"] == "Unknown"


def test_a_shut_down_simulator_still_answers_queries_and_says_why_in_webhooks(own_printer):
    post(own_printer, "/printer/emergency_stop")
    status = requests.get(own_printer.url + "/printer/objects/query?webhooks", timeout=5).json()["result"]["status"]
    assert status["webhooks"] == {"state": "shutdown", "state_message": "Shutdown due to webhooks request"}
    assert post(own_printer, "/printer/emergency_stop").status_code == 200


def test_the_late_sd_busy_fault_starts_another_print_just_before_the_answer(own_printer):
    own_printer.add_file("part.gcode")
    own_printer.set_fault("late_sd_busy", endpoint="/printer/print/start", count=1)
    answer = post(own_printer, "/printer/print/start?filename=part.gcode")
    assert answer.status_code == 400 and answer.json()["error"]["message"] == "SD busy"
    assert own_printer.state == "printing" and own_printer.status["print_stats"]["filename"] != "part.gcode"


def test_the_late_shutdown_fault_shuts_klipper_down_just_before_the_answer(own_printer):
    own_printer.set_fault("late_shutdown", endpoint="/printer/gcode/script", count=1)
    answer = post(own_printer, "/printer/gcode/script", json={"script": "G28"})
    assert answer.status_code == 400 and answer.json()["error"]["message"] == "Unknown"
    assert own_printer.klippy_shut_down


# -- the connector fails that command, saying why, and carries on ------------------------

@pytest.fixture
def running(cloud, own_printer, make_connector):
    own_printer.add_file("part.gcode")
    return start(make_connector, cloud, own_printer)


def test_a_start_print_meeting_a_print_started_meanwhile_fails_naming_it_and_the_next_command_runs(
        cloud, running, own_printer):
    own_printer.set_fault("late_sd_busy", endpoint="/printer/print/start", count=1)
    body = run_command(cloud, running, "start_print", {"filename": "part.gcode"})
    assert body["status"] == "failed", body
    assert body["error_message"] == ("cannot start a print: a print is printing (from-the-web-ui.gcode), started "
                                     "since this command was checked; cancel it first (moonraker http 400: SD busy)")
    assert body["result"]["state"] == "printing"
    assert run_command(cloud, running, "pause")["status"] == "succeeded"
    assert own_printer.state == "paused"


def test_a_pause_meeting_a_klipper_that_shut_down_meanwhile_fails_saying_so(cloud, running, own_printer):
    own_printer.set_state("printing", filename="part.gcode")
    own_printer.set_fault("late_shutdown", endpoint="/printer/print/pause", count=1)
    body = run_command(cloud, running, "pause")
    assert body["status"] == "failed", body
    assert body["error_message"] == ("cannot pause: Klipper is shutdown: %s (moonraker http 400: Unknown)"
                                     % LATE_SHUTDOWN)


def test_gcode_sent_to_a_shut_down_klipper_fails_saying_so_and_after_a_restart_runs(cloud, running, own_printer):
    post(own_printer, "/printer/emergency_stop")
    body = run_command(cloud, running, "gcode", {"script": "G28"})
    assert body["status"] == "failed", body
    assert body["error_message"] == ("cannot run the script: Klipper is shutdown: Shutdown due to webhooks request "
                                     "(moonraker http 400: Unknown)")
    assert "state" not in body["result"]
    post(own_printer, "/printer/firmware_restart")
    assert run_command(cloud, running, "gcode", {"script": "G28"})["status"] == "succeeded"
