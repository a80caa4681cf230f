"""connector.py against a real printer: the real Klipper host (klippy) and the
real Moonraker, driven by the simulated MCU (sim/rig.py, docs/klipper-rig.md).

One rig for the session (conftest.py `klipper_rig`) and one connector paired
with the reference cloud for the module. Each test leaves the printer idle
and ready (the `klipper` fixture puts it back), and checks both what the
cloud received and Klipper's own state as Moonraker reports it.
"""

import base64
import functools
import io
import os
import tarfile
import time

import pytest
import requests

import harness
from harness import Connector, Storage, snapshots_of, start_paired, unpaired_config, wait_until
from sim.rig import KlipperRig

COMMAND_TIMEOUT = 30.0
# A command sent while Klipper is busy waits the print_control read timeout (connector.py, EXCHANGES).
CONTROL_WAIT_SECONDS = 10.0

# Moves with imaginary filament (the rig's min_extrude_temp is 0): no heat-up
# unless a test asks for one. A "long" print runs for minutes; tests cancel it.
SHORT_PRINT = "\n".join([
    "; three layers", "SET_PRINT_STATS_INFO TOTAL_LAYER=3", "G28", "G90", "M83",
    "SET_PRINT_STATS_INFO CURRENT_LAYER=1", "G1 Z0.3 F600", "G1 X20 Y20 F6000", "G1 X60 Y20 E2 F3000",
    "SET_PRINT_STATS_INFO CURRENT_LAYER=2", "G1 Z0.6", "G1 X60 Y60 E2",
    "SET_PRINT_STATS_INFO CURRENT_LAYER=3", "G1 Z0.9", "G1 X20 Y60 E2", "G1 X20 Y20 E2", ""]).encode()
LONG_PRINT = ("\n".join(["; slow squares of short segments, about 3 minutes", "G28", "G90", "M83", "G1 Z0.3 F600"]
                        + ["G1 X%d Y%d E0.2 F1200" % (x, y) for _ in range(10)
                           for x, y in [(10 + 10 * i, 10) for i in range(10)] + [(100, 10 + 10 * i) for i in range(10)]
                           + [(100 - 10 * i, 100) for i in range(10)] + [(10, 100 - 10 * i) for i in range(10)]])
              + "\n").encode()
HEAT_FIRST = b"M190 S60\n" + LONG_PRINT


# --------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------

def rig_call(rig, method, path, **kwargs):
    response = requests.request(method, rig.url + path, timeout=kwargs.pop("timeout", 30.0), **kwargs)
    response.raise_for_status()
    body = response.json()
    return body.get("result", body)  # an upload answers without the "result" wrapper


def rig_status(rig, *objects):
    return rig_call(rig, "GET", "/printer/objects/query?" + "&".join(objects))["status"]


def print_state(rig):
    return rig_status(rig, "print_stats")["print_stats"]["state"]


def gcode(rig, script, timeout=60.0):
    return rig_call(rig, "POST", "/printer/gcode/script", json={"script": script}, timeout=timeout)


def upload(rig, name, data):
    rig_call(rig, "POST", "/server/files/upload", files={"file": (name, data)})


def wait_state(rig, states, timeout=COMMAND_TIMEOUT):
    return wait_until(lambda: print_state(rig) in states and print_state(rig), timeout,
                      "Klipper's print state in %s" % (states,), interval=0.2)


def wait_ready(rig, timeout=COMMAND_TIMEOUT):
    wait_until(lambda: rig.klippy_state() == "ready", timeout, "Klippy ready", interval=0.2)


@pytest.fixture(scope="module")
def rig_connector(cloud_server, klipper_rig, tmp_path_factory):
    config = unpaired_config(cloud_server, klipper_rig, printer_data_root=klipper_rig.data)
    connector = start_paired(Connector(tmp_path_factory.mktemp("rig-connector"), config))
    yield connector
    connector.kill()


@pytest.fixture
def klipper(klipper_rig):
    """The rig, idle and ready before and after the test."""
    settle(klipper_rig)
    yield klipper_rig
    settle(klipper_rig)


def settle(rig):
    wait_until(lambda: rig.klippy_state() in ("ready", "shutdown", "error"), COMMAND_TIMEOUT,
               "Klippy connected to Moonraker", interval=0.2)
    if rig.klippy_state() != "ready":
        rig_call(rig, "POST", "/printer/firmware_restart")
        wait_ready(rig)
    if print_state(rig) in ("printing", "paused"):
        rig_call(rig, "POST", "/printer/print/cancel", timeout=120.0)
        wait_state(rig, ("cancelled", "standby", "complete", "error"))
    gcode(rig, "TURN_OFF_HEATERS\nM400")  # M400: the moves already queued are done


@pytest.fixture
def connector(cloud, rig_connector):
    assert rig_connector.proc.poll() is None, "the rig's connector died:\n" + rig_connector.run_log[-3000:]
    return rig_connector


run_command = functools.partial(harness.run_command, timeout=COMMAND_TIMEOUT)


def wait_snapshot(cloud, connector, predicate, since=0, timeout=COMMAND_TIMEOUT, message="a snapshot"):
    def found():
        return [s for s in snapshots_of(cloud, connector, since) if predicate(s["payload"]["status"])]
    return cloud.wait_for(found, timeout=timeout, message=message)


def start_print(cloud, connector, rig, name, data):
    upload(rig, name, data)
    body = run_command(cloud, connector, "start_print", {"filename": name})
    assert body["status"] == "succeeded", body
    return body


# --------------------------------------------------------------------------
# The rig itself
# --------------------------------------------------------------------------

def test_klipper_is_ready_with_the_simulated_mcu_and_starts_within_seconds(klipper):
    mcu = rig_status(klipper, "mcu")["mcu"]
    assert mcu["mcu_version"] == "printer-connector-sim-mcu"
    assert mcu["mcu_constants"]["CLOCK_FREQ"] == 100000000
    assert klipper.started_in < 30.0
    assert rig_call(klipper, "GET", "/printer/info")["state"] == "ready"


# --------------------------------------------------------------------------
# Printing: upload, start, a print to complete, what snapshots carry
# --------------------------------------------------------------------------

def test_upload_then_start_prints_to_complete_with_progress_layers_and_filament(cloud, connector, klipper):
    body = run_command(cloud, connector, "upload_file", {"filename": "rig/three_layers.gcode",
                                                         "content": base64.b64encode(SHORT_PRINT).decode()})
    assert body["status"] == "succeeded", body
    since = len(cloud.snapshots)

    body = run_command(cloud, connector, "start_print", {"filename": "rig/three_layers.gcode"})

    assert body["status"] == "succeeded", body
    assert body["result"]["state"] in ("printing", "complete")
    wait_state(klipper, ("complete",))
    stats = rig_status(klipper, "print_stats", "virtual_sdcard")
    assert stats["print_stats"]["filename"] == "rig/three_layers.gcode"
    assert stats["print_stats"]["info"] == {"total_layer": 3, "current_layer": 3}
    # The file extrudes 8 mm; Klipper counts the moves it had run when the
    # file ended (the last one was still queued): 6 mm here.
    filament = stats["print_stats"]["filament_used"]
    assert 0 < filament <= 8.0
    assert stats["virtual_sdcard"]["progress"] == 1.0
    done = wait_snapshot(cloud, connector, lambda s: s["print_stats"]["state"] == "complete", since)[-1]
    assert done["payload"]["status"]["print_stats"]["filament_used"] == filament
    assert done["payload"]["status"]["virtual_sdcard"]["progress"] == 1.0
    progress = [s["payload"]["status"]["virtual_sdcard"]["progress"] for s in snapshots_of(cloud, connector, since)]
    assert progress == sorted(progress)


def test_history_import_after_real_jobs_returns_moonrakers_record_of_them(cloud, connector, klipper):
    start_print(cloud, connector, klipper, "history_part.gcode", SHORT_PRINT)
    wait_state(klipper, ("complete",))
    wait_until(lambda: rig_call(klipper, "GET", "/server/history/list", params={"limit": 1})["jobs"][0]
               ["filename"] == "history_part.gcode", 10.0, "Moonraker's history has the job")

    body = run_command(cloud, connector, "import_history", {"limit": 5})

    assert body["status"] == "succeeded", body
    jobs = body["result"]["history"]["jobs"]
    assert jobs[0]["filename"] == "history_part.gcode" and jobs[0]["status"] == "completed"
    assert jobs[0]["filament_used"] > 0
    assert body["result"]["history"] == rig_call(klipper, "GET", "/server/history/list", params={"limit": 5})


def test_snapshots_show_the_temperature_klipper_reads_rising_while_heating(cloud, connector, klipper):
    klipper.cool_down()
    wait_until(lambda: rig_status(klipper, "extruder")["extruder"]["temperature"] < 30, 10.0, "a cold hotend")
    since = len(cloud.snapshots)

    gcode(klipper, "M104 S200")

    warm = wait_snapshot(cloud, connector, lambda s: s["extruder"]["temperature"] > 60, since,
                         message="a snapshot of a hotend above 60 C")[-1]["payload"]["status"]["extruder"]
    assert warm["target"] == 200.0 and warm["power"] > 0
    temperatures = [s["payload"]["status"]["extruder"]["temperature"] for s in snapshots_of(cloud, connector, since)]
    assert temperatures[-1] > temperatures[0]


def test_a_state_change_at_the_printer_reaches_the_cloud_within_two_seconds(cloud, connector, klipper):
    upload(klipper, "watched.gcode", LONG_PRINT)
    since = len(cloud.snapshots)

    rig_call(klipper, "POST", "/printer/print/start", params={"filename": "watched.gcode"})
    started = time.time()

    seen = wait_snapshot(cloud, connector, lambda s: s["print_stats"]["state"] == "printing", since)[0]
    assert seen["received_at"] - started < 2.0


def test_start_while_a_print_runs_fails_at_once_and_the_print_goes_on(cloud, connector, klipper):
    start_print(cloud, connector, klipper, "running.gcode", LONG_PRINT)
    upload(klipper, "other.gcode", SHORT_PRINT)

    started = time.monotonic()
    body = run_command(cloud, connector, "start_print", {"filename": "other.gcode"})

    assert time.monotonic() - started < CONTROL_WAIT_SECONDS
    assert body["status"] == "failed"
    assert body["error_message"] == "cannot start a print: one is printing (running.gcode); cancel it first"
    stats = rig_status(klipper, "print_stats")["print_stats"]
    assert stats["state"] == "printing" and stats["filename"] == "running.gcode"


def test_start_of_a_missing_file_fails_with_klippers_message(cloud, connector, klipper):
    body = run_command(cloud, connector, "start_print", {"filename": "not_there.gcode"})

    assert body["status"] == "failed"
    assert body["error_message"] == "moonraker http 400: Unable to open file"
    assert print_state(klipper) not in ("printing", "paused")


# --------------------------------------------------------------------------
# Pause, resume, cancel
# --------------------------------------------------------------------------

def test_pause_while_printing_pauses_and_reports_paused(cloud, connector, klipper):
    start_print(cloud, connector, klipper, "pausable.gcode", LONG_PRINT)

    body = run_command(cloud, connector, "pause")

    assert body["status"] == "succeeded", body
    assert body["result"]["state"] == "paused" and "pending" not in body["result"]
    assert rig_status(klipper, "pause_resume")["pause_resume"]["is_paused"] is True


def test_resume_continues_a_paused_print(cloud, connector, klipper):
    start_print(cloud, connector, klipper, "resumable.gcode", LONG_PRINT)
    assert run_command(cloud, connector, "pause")["status"] == "succeeded"

    body = run_command(cloud, connector, "resume")

    assert body["status"] == "succeeded", body
    assert body["result"]["state"] == "printing"
    position = rig_status(klipper, "virtual_sdcard")["virtual_sdcard"]["file_position"]
    wait_until(lambda: rig_status(klipper, "virtual_sdcard")["virtual_sdcard"]["file_position"] > position,
               10.0, "the print reading on")


def test_cancel_while_printing_cancels(cloud, connector, klipper):
    start_print(cloud, connector, klipper, "cancellable.gcode", LONG_PRINT)

    body = run_command(cloud, connector, "cancel")

    assert body["status"] == "succeeded", body
    assert body["result"]["state"] == "cancelled"
    assert print_state(klipper) == "cancelled"


def test_cancel_while_paused_cancels(cloud, connector, klipper):
    start_print(cloud, connector, klipper, "paused_then_cancelled.gcode", LONG_PRINT)
    assert run_command(cloud, connector, "pause")["status"] == "succeeded"

    body = run_command(cloud, connector, "cancel")

    assert body["status"] == "succeeded", body
    assert body["result"]["state"] == "cancelled"
    assert rig_status(klipper, "pause_resume")["pause_resume"]["is_paused"] is False


@pytest.mark.parametrize("action", ["pause", "resume", "cancel"])
def test_a_print_control_with_nothing_printing_fails_and_leaves_klipper_alone(cloud, connector, klipper, action):
    state = print_state(klipper)

    body = run_command(cloud, connector, action)

    assert body["status"] == "failed"
    assert body["error_message"] == "nothing to %s: Klipper's print state is %s" % (action, state)
    # Klipper itself answers "ok" here, and a PAUSE with nothing printing
    # would leave pause_resume paused for the next print.
    assert rig_status(klipper, "pause_resume")["pause_resume"]["is_paused"] is False


def test_pause_during_a_heat_up_reports_pending_and_pauses_when_the_heat_up_ends(cloud, connector, klipper):
    klipper.cool_down()
    wait_until(lambda: rig_status(klipper, "heater_bed")["heater_bed"]["temperature"] < 30, 10.0, "a cold bed")
    start_print(cloud, connector, klipper, "heat_first.gcode", HEAT_FIRST)
    wait_until(lambda: rig_status(klipper, "heater_bed")["heater_bed"]["target"] == 60.0, 10.0, "M190 running")
    since = len(cloud.snapshots)

    started = time.monotonic()
    body = run_command(cloud, connector, "pause")

    assert CONTROL_WAIT_SECONDS <= time.monotonic() - started < CONTROL_WAIT_SECONDS + 5.0
    assert body["status"] == "succeeded", body
    assert body["result"]["pending"] is True and body["result"]["state"] == "printing"
    assert print_state(klipper) == "printing"
    wait_snapshot(cloud, connector, lambda s: s["print_stats"]["state"] == "paused", since,
                  timeout=klipper.heat_seconds + 10.0, message="the pause taking effect after M190")
    assert rig_status(klipper, "heater_bed")["heater_bed"]["temperature"] >= 58.0


def test_cancel_during_a_heat_up_reports_pending_and_cancels_when_the_heat_up_ends(cloud, connector, klipper):
    klipper.cool_down()
    wait_until(lambda: rig_status(klipper, "heater_bed")["heater_bed"]["temperature"] < 30, 10.0, "a cold bed")
    start_print(cloud, connector, klipper, "heat_then_cancel.gcode", HEAT_FIRST)
    wait_until(lambda: rig_status(klipper, "heater_bed")["heater_bed"]["target"] == 60.0, 10.0, "M190 running")

    body = run_command(cloud, connector, "cancel")

    assert body["status"] == "succeeded", body
    assert body["result"]["pending"] is True
    wait_state(klipper, ("cancelled",), timeout=klipper.heat_seconds + 10.0)
    assert rig_status(klipper, "heater_bed")["heater_bed"]["target"] == 0.0  # CANCEL_PRINT turned it off


# --------------------------------------------------------------------------
# Homing
# --------------------------------------------------------------------------

def homed_axes(rig):
    """None while Klippy is not ready."""
    if rig.klippy_state() != "ready":
        return None
    try:
        return rig_status(rig, "toolhead")["toolhead"]["homed_axes"]
    except requests.HTTPError:
        return None


def test_homing_of_chosen_axes_homes_only_those(cloud, connector, klipper):
    rig_call(klipper, "POST", "/printer/restart")  # a host restart: nothing is homed after it
    wait_until(lambda: homed_axes(klipper) == "", COMMAND_TIMEOUT, "a restarted host", interval=0.2)

    body = run_command(cloud, connector, "homing", {"axes": ["y", "X"]})

    assert body["status"] == "succeeded", body
    assert body["result"] == {"action": "homing", "axes": ["X", "Y"], "state": "standby", "homed_axes": "xy",
                              "post_snapshot": "captured"}
    toolhead = rig_status(klipper, "toolhead")["toolhead"]
    assert toolhead["homed_axes"] == "xy" and toolhead["position"][:2] == pytest.approx([0.0, 0.0], abs=0.05)


def test_homing_while_printing_fails_and_the_print_goes_on(cloud, connector, klipper):
    start_print(cloud, connector, klipper, "no_homing_now.gcode", LONG_PRINT)

    body = run_command(cloud, connector, "homing", {"axes": ["z"]})

    assert body["status"] == "failed"
    assert body["error_message"] == "cannot home while a print is printing: pause or cancel it first"
    assert print_state(klipper) == "printing"


# --------------------------------------------------------------------------
# Backups of real printer_data
# --------------------------------------------------------------------------

@pytest.fixture
def storage():
    server = Storage()
    yield server
    server.stop()


def test_create_backup_archives_the_rigs_printer_data(cloud, connector, klipper, storage):
    url = "http://127.0.0.1:%d/bucket/rig.tar.gz" % storage.server_address[1]

    body = run_command(cloud, connector, "create_backup", {
        "backup_id": "rig1", "presigned_url": url, "printer_data_root": klipper.data,
        "include": {"config": True, "database": True, "logs": True}}, timeout=60.0)

    assert body["status"] == "succeeded", body
    with tarfile.open(fileobj=io.BytesIO(storage.uploads[-1]["body"]), mode="r:gz") as tar:
        names = set(tar.getnames())
        printer_cfg = tar.extractfile("config/printer.cfg").read()
    assert {"config/printer.cfg", "config/moonraker.conf", "logs/klippy.log"} <= names
    assert any(name.startswith("database/") for name in names)
    with open(klipper.printer_cfg, "rb") as handle:
        assert printer_cfg == handle.read()


# --------------------------------------------------------------------------
# Shutdown, firmware restart, a config error
# --------------------------------------------------------------------------

def test_after_an_emergency_stop_controls_fail_with_klippers_reason_until_a_firmware_restart(
        cloud, connector, klipper):
    start_print(cloud, connector, klipper, "stopped.gcode", LONG_PRINT)
    since = len(cloud.snapshots)

    rig_call(klipper, "POST", "/printer/emergency_stop")
    wait_until(lambda: klipper.klippy_state() == "shutdown", 10.0, "Klipper shut down")
    body = run_command(cloud, connector, "pause")

    assert body["status"] == "failed"
    # Klipper's first line is its own reason or the MCU's ("MCU 'mcu' shutdown: Command request"),
    # whichever it noted first.
    assert body["error_message"].startswith("cannot pause: Klipper is shutdown: ")
    assert "hutdown" in body["error_message"][len("cannot pause: Klipper is shutdown: "):]
    wait_snapshot(cloud, connector, lambda s: s["print_stats"]["state"] == "error", since,
                  message="the print's end in error")
    # G-code has no check before it goes: the real Moonraker answers 400
    # "Unknown" (what sim/printer.py models), and the state says why.
    script = run_command(cloud, connector, "gcode", {"script": "G28"})
    assert script["status"] == "failed"
    assert script["error_message"].startswith("cannot run the script: Klipper is shutdown: ")
    assert script["error_message"].endswith(" (moonraker http 400: Unknown)")
    rig_call(klipper, "POST", "/printer/firmware_restart")
    wait_ready(klipper)
    assert print_state(klipper) == "standby"
    homed = run_command(cloud, connector, "homing", {"axes": ["x"]})
    assert homed["status"] == "succeeded" and homed["result"]["homed_axes"] == "x"


def test_a_config_error_at_start_is_reported_by_commands_with_klippers_message(cloud_server, tmp_path,
                                                                                make_connector):
    rig = KlipperRig(tmp_path / "broken", extra_config="[stepper_x]\nno_such_option: 1\n", wait_ready=False)
    rig.start()
    try:
        wait_until(lambda: rig.klippy_state() == "error", 60.0, "Klipper in error", interval=0.2)
        connector = make_connector(unpaired_config(cloud_server, rig)).start()
        connector.wait_log("Connector running")

        body = run_command(cloud_server, connector, "start_print", {"filename": "any.gcode"})

        assert body["status"] == "failed"
        assert body["error_message"].startswith("cannot start a print: Klipper is error: ")
        assert "stepper_x" in body["error_message"]
    finally:
        rig.stop()


def test_the_rig_stops_cleanly(tmp_path):
    rig = KlipperRig(tmp_path / "short", wait_ready=False).start()
    pids = [proc.pid for proc in rig.procs.values()]
    link = rig.serial_link

    rig.stop()

    assert not rig.procs and not any(is_running(pid) for pid in pids)
    assert not os.path.lexists(link)


def is_running(pid):
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
