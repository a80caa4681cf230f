"""Owner control and instant commands (issue 19) and command lanes (issue 14
item 5), end to end: the connector runs as a real process against the
reference cloud (with its protocol extensions, or as today's cloud) and the
printer simulator; what reached the cloud and the printer is checked."""

import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from harness import completion, enqueue, new_token, run_command, start, wait_until


def arrival(printer, path, since):
    """When the printer received `path` at or after `since` (time.time())."""
    return printer.wait_for(lambda: next((r["time"] for r in printer.requests
                                          if r["path"].startswith(path) and r["time"] >= since), None), 10)


def polls(cloud, connector, what="commands"):
    path = "/api/v1/connectors/%s/%s" % (connector.connector_id, what)
    return [r for r in cloud.requests if r["path"].startswith(path)]


# -- capabilities -----------------------------------------------------------

def test_register_and_the_first_heartbeat_announce_the_capabilities(cloud, paired):
    announced = cloud.connector(paired.connector_id)["capabilities"]
    assert {"long_poll", "gcode", "list_macros", "set_temperature", "emergency_stop", "control_lane"} <= set(announced)
    beats = cloud.wait_for(lambda: [h["body"] for h in cloud.heartbeats if h["connector_id"] == paired.connector_id])
    assert sorted(beats[0]["capabilities"]) == announced  # later ones only until acknowledged: tests/test_wire.py


def test_remote_gcode_turned_off_is_not_announced_and_the_cloud_does_not_send_it(cloud, printer, make_connector):
    connector = start(make_connector, cloud, printer, allow_gcode=False)
    assert "gcode" not in cloud.connector(connector.connector_id)["capabilities"]
    held = enqueue(cloud, connector, "gcode", {"script": "M105"})
    printing(printer)
    assert run_command(cloud, connector, "pause")["status"] == "succeeded"
    assert cloud.command(held)["status"] == "queued" and not cloud.completions_for(held)


def test_remote_gcode_turned_off_fails_saying_so_when_a_cloud_sends_it_anyway(old_cloud, printer, make_connector):
    connector = start(make_connector, old_cloud, printer, allow_gcode=False)
    scripts = len(printer.gcode_scripts)
    body = run_command(old_cloud, connector, "gcode", {"script": "G28"})
    assert body["status"] == "failed" and "allow_gcode is false" in body["error_message"]
    assert len(printer.gcode_scripts) == scripts


def test_an_action_of_a_future_extension_fails_cleanly_naming_it(cloud, paired, printer):
    body = run_command(cloud, paired, "bed_mesh_calibrate", {"profile": "default"})
    assert body["status"] == "failed" and body["error_message"] == 'unknown action "bed_mesh_calibrate"'
    printing(printer)
    assert run_command(cloud, paired, "pause")["status"] == "succeeded"


# -- gcode and macros -------------------------------------------------------

def test_gcode_returns_what_klipper_answered_on_the_console(cloud, paired, printer):
    paired.wait_log("status websocket connected")
    body = run_command(cloud, paired, "gcode", {"script": 'M105\nRESPOND MSG="hello owner"'})
    assert body["status"] == "succeeded", body
    console = body["result"]["console"]
    assert console[0].startswith("T:") and console[1] == "echo: hello owner"
    assert printer.gcode_scripts[-1] == 'M105\nRESPOND MSG="hello owner"'


def test_a_macro_runs_by_its_name_with_its_console_output(cloud, paired, printer):
    paired.wait_log("status websocket connected")
    body = run_command(cloud, paired, "gcode", {"script": "START_PRINT"})
    assert body["status"] == "succeeded" and body["result"]["console"] == ["echo: Ready to print"]
    assert printer.status["toolhead"]["homed_axes"] == "xyz"


def test_an_unknown_gcode_command_fails_with_klippers_message_and_console(cloud, paired):
    paired.wait_log("status websocket connected")
    body = run_command(cloud, paired, "gcode", {"script": "FROBNICATE"})
    assert body["status"] == "failed" and 'Unknown command:"FROBNICATE"' in body["error_message"]
    assert body["result"]["console"] == ['!! Unknown command:"FROBNICATE"']


def test_list_macros_gives_the_printers_macros_with_descriptions(cloud, paired):
    body = run_command(cloud, paired, "list_macros")
    assert body["status"] == "succeeded"
    assert body["result"]["macros"] == [{"name": "PARK", "description": "Move the head to the back"},
                                        {"name": "START_PRINT", "description": "Heat up, home and purge"},
                                        {"name": "_HELPER", "description": "G-Code macro"}]


# -- set_temperature --------------------------------------------------------

def test_set_temperature_sets_the_heaters_target(cloud, paired, printer):
    body = run_command(cloud, paired, "set_temperature", {"heater": "heater_bed", "target": 60})
    assert body["status"] == "succeeded", body
    assert body["result"]["heater"] == "heater_bed" and body["result"]["target"] == 60
    assert printer.status["heater_bed"]["target"] == 60.0
    assert run_command(cloud, paired, "set_temperature", {"heater": "heater_bed", "target": 0})["status"] == "succeeded"
    assert printer.status["heater_bed"]["target"] == 0.0


def test_set_temperature_beyond_the_configured_max_never_reaches_klipper(cloud, paired, printer):
    scripts = len(printer.gcode_scripts)
    body = run_command(cloud, paired, "set_temperature", {"heater": "extruder", "target": 300})
    assert body["status"] == "failed" and "configured range 0 to 250" in body["error_message"]
    assert len(printer.gcode_scripts) == scripts


def test_set_temperature_of_a_heater_the_printer_lacks_fails_naming_the_ones_it_has(cloud, paired):
    body = run_command(cloud, paired, "set_temperature", {"heater": "heater_generic chamber", "target": 40})
    assert body["status"] == "failed"
    assert body["error_message"] == 'unknown heater "heater_generic chamber"; this printer has: extruder, heater_bed'


# -- emergency stop and lanes -----------------------------------------------

class SlowStorage(BaseHTTPRequestHandler):
    """A presigned-URL target that takes the whole upload, then answers only
    once released: a backup upload that lasts as long as a test wants."""
    protocol_version = "HTTP/1.1"

    def do_PUT(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.receiving.set()
        self.server.release.wait(120)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def slow_storage():
    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowStorage)
    server.daemon_threads = True
    server.receiving, server.release = threading.Event(), threading.Event()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def printer_data(tmp_path):
    root = tmp_path / "printer_data"
    (root / "config").mkdir(parents=True)
    (root / "config" / "printer.cfg").write_bytes(os.urandom(200000))
    return root


def start_backup(cloud, connector, storage, root):
    url = "http://127.0.0.1:%d/bucket/b.tar.gz?X-Amz-Signature=abc" % storage.server_address[1]
    command_id = enqueue(cloud, connector, "create_backup", {"backup_id": "b1", "presigned_url": url,
                                                             "include": {"config": True},
                                                             "printer_data_root": str(root)})
    assert storage.receiving.wait(30), "the backup upload never started"
    return command_id


@pytest.mark.parametrize("which", ["long-poll cloud", "today's cloud"])
def test_emergency_stop_reaches_moonraker_within_1_s_while_a_backup_uploads(
        which, cloud, old_cloud, printer, make_connector, slow_storage, printer_data):
    cloud = cloud if which == "long-poll cloud" else old_cloud
    connector = start(make_connector, cloud, printer, printer_data_root=str(printer_data))
    printer.add_file("part.gcode")
    printer.set_state("printing", filename="part.gcode")
    backup = start_backup(cloud, connector, slow_storage, printer_data)
    queued = time.time()
    estop = enqueue(cloud, connector, "emergency_stop")
    assert arrival(printer, "/printer/emergency_stop", queued) - queued < 1.0
    assert completion(cloud, estop)["status"] == "succeeded"
    assert printer.status["webhooks"]["state"] == "shutdown" and printer.state == "error"
    assert not cloud.completions_for(backup)  # still uploading
    slow_storage.release.set()
    assert completion(cloud, backup, 30)["status"] == "succeeded"


def test_emergency_stop_runs_while_a_pause_blocks_in_klipper(cloud, printer, make_connector):
    connector = start(make_connector, cloud, printer)
    printer.set_state("printing", filename="part.gcode")
    printer.set_fault("slow:8", "/printer/print/pause")  # a PAUSE macro waiting on a heat-up
    pause = enqueue(cloud, connector, "pause")
    arrival(printer, "/printer/print/pause", 0)
    queued = time.time()
    enqueue(cloud, connector, "emergency_stop")
    assert arrival(printer, "/printer/emergency_stop", queued) - queued < 1.0
    assert not cloud.completions_for(pause)
    completion(cloud, pause, 20)


def test_cancel_does_not_wait_behind_an_upload(cloud, printer, make_connector):
    connector = start(make_connector, cloud, printer)
    printer.set_state("printing", filename="part.gcode")
    printer.set_fault("slow:8", "/server/files/upload")
    upload = enqueue(cloud, connector, "upload_file", {"filename": "next.gcode", "content": "RzI4Cg=="})
    arrival(printer, "/server/files/upload", 0)
    cancel = enqueue(cloud, connector, "cancel")
    assert completion(cloud, cancel, 5)["status"] == "succeeded"
    assert printer.state == "cancelled" and not cloud.completions_for(upload)
    assert completion(cloud, upload, 20)["status"] == "succeeded"


def test_a_cancel_polled_after_a_start_print_cancels_that_print(cloud, paired, printer):
    printer.add_file("a.gcode")
    printer.set_fault("slow:1", "/printer/print/start")
    start_print = enqueue(cloud, paired, "start_print", {"filename": "a.gcode"})
    cancel = enqueue(cloud, paired, "cancel")
    assert completion(cloud, cancel)["status"] == "succeeded"
    assert completion(cloud, start_print)["status"] == "succeeded"
    assert printer.state == "cancelled"


def test_commands_behind_a_running_one_at_stop_are_reported_failed_never_run(cloud, printer, make_connector):
    connector = start(make_connector, cloud, printer)
    printer.set_fault("slow:15", "/server/files/upload")
    upload = enqueue(cloud, connector, "upload_file", {"filename": "big.gcode", "content": "RzI4Cg=="})
    arrival(printer, "/server/files/upload", 0)
    queued = [enqueue(cloud, connector, "delete_file", {"filename": "x%d.gcode" % n}) for n in range(2)]
    ledger = connector.state_dir / "commands.jsonl"
    # Recorded by the connector, not only handed out: a command the cloud hands
    # to a held poll at the very moment of the SIGTERM is lost to that poll
    # (docs/PROTOCOL.md, long_poll: the cloud re-delivers it).
    wait_until(lambda: ledger.exists() and all(('"%s"' % c).encode() in ledger.read_bytes() for c in queued), 10,
               "both recorded")
    stopping = time.monotonic()
    connector.stop(timeout=10)
    assert time.monotonic() - stopping < 6
    printer.clear_faults()
    connector.start()
    connector.wait_log("Connector running")
    # Reported at the stop if the lane got to it, else at the restart; either way once, failed, never re-run.
    told = {"upload to moonraker interrupted: the connector is stopping", "not run: the connector was stopping",
            "interrupted by restart; not re-run"}
    for command_id in [upload] + queued:
        body = completion(cloud, command_id)
        assert body["status"] == "failed" and body["error_message"] in told, body
        assert len(cloud.completions_for(command_id)) == 1
    assert not [r for r in printer.requests if r["method"] == "DELETE" and "/x0.gcode" in r["path"]]


# -- long-poll --------------------------------------------------------------

def printing(printer, state="printing"):
    """A print to pause (or, paused, to resume): with nothing printing a print
    control fails without calling Moonraker (extension print_state)."""
    printer.add_file("part.gcode")
    printer.set_state(state, filename="part.gcode")


def test_with_a_long_poll_cloud_a_command_is_taken_at_once_whatever_the_interval(cloud, printer, make_connector):
    connector = start(make_connector, cloud, printer, poll_commands_seconds=30)
    cloud.wait_for(lambda: len(polls(cloud, connector)) >= 1)
    for _ in range(3):
        printing(printer, "paused")
        queued = time.time()
        command_id = enqueue(cloud, connector, "resume")
        assert arrival(printer, "/printer/print/resume", queued) - queued < 1.0
        completion(cloud, command_id)
    assert all("wait=25" in r["path"] for r in polls(cloud, connector))


def test_a_webcam_request_wakes_the_held_webcam_poll(cloud, printer, make_connector):
    connector = start(make_connector, cloud, printer, poll_webcam_seconds=30)
    cloud.wait_for(lambda: len(polls(cloud, connector, "webcam_requests")) >= 1)
    queued = time.time()
    request_id = cloud.enqueue_webcam_request(connector.connector_id, connector.printer_id)
    upload = cloud.wait_for(lambda: next((u for u in cloud.webcam_uploads if u["id"] == request_id), None), 10)
    assert upload["time"] - queued < 2.0


def test_todays_cloud_sees_todays_polls(old_cloud, printer, make_connector):
    connector = start(make_connector, old_cloud, printer, poll_commands_seconds=0.5)
    printing(printer)
    assert run_command(old_cloud, connector, "pause")["status"] == "succeeded"
    seen = len(polls(old_cloud, connector))
    old_cloud.wait_for(lambda: len(polls(old_cloud, connector)) >= seen + 6, 10)
    times = [r["time"] for r in polls(old_cloud, connector)[seen:]]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert min(gaps) > 0.4  # the interval, not a tight loop


def test_once_against_a_long_poll_cloud_does_not_wait_for_a_hold(cloud, printer, make_connector):
    connector = start(make_connector, cloud, printer)
    connector.stop()
    started = time.monotonic()
    assert connector.run("--once", timeout=30) == 0
    assert time.monotonic() - started < 15
    assert "wait=" not in polls(cloud, connector)[-1]["path"]


def test_sigterm_ends_a_held_poll_at_once(cloud, paired):
    cloud.wait_for(lambda: len(polls(cloud, paired)) >= 1)
    started = time.monotonic()
    assert paired.stop(timeout=5) == 0
    # Well inside the 4 s grace that a thread still busy at the stop would cost.
    assert time.monotonic() - started < 3.5
    assert "commands failed" not in paired.run_log


# -- idle pace with today's cloud -------------------------------------------

def test_an_idle_printer_is_polled_at_5_s_until_someone_asks(old_cloud, printer, make_connector):
    connector = start(make_connector, old_cloud, printer, poll_commands_seconds=0.3, idle_after_seconds=3)
    connector.wait_log("polling relaxed")
    seen = len(polls(old_cloud, connector))
    beats = len([h for h in old_cloud.heartbeats if h["connector_id"] == connector.connector_id])
    old_cloud.wait_for(lambda: len([h for h in old_cloud.heartbeats
                                    if h["connector_id"] == connector.connector_id]) >= beats + 12, 15)
    assert len(polls(old_cloud, connector)) - seen <= 2  # 6 s at 5 s, not 20 polls at 0.3 s
    printing(printer, "paused")
    queued = time.time()
    command_id = enqueue(old_cloud, connector, "resume")
    assert completion(old_cloud, command_id, 10)["status"] == "succeeded"
    assert arrival(printer, "/printer/print/resume", queued) - queued < 6.0
    seen = len(polls(old_cloud, connector))
    old_cloud.wait_for(lambda: len(polls(old_cloud, connector)) >= seen + 5, 4)  # the configured pace again


def test_a_printing_printer_keeps_the_configured_pace(old_cloud, printer, make_connector):
    printer.set_state("printing", filename="long.gcode")
    connector = start(make_connector, old_cloud, printer, poll_commands_seconds=0.3, idle_after_seconds=0.5)
    connector.wait_log("status websocket connected")
    seen = len(polls(old_cloud, connector))
    old_cloud.wait_for(lambda: len(polls(old_cloud, connector)) >= seen + 8, 6)


# -- the reference cloud's side of long-poll ----------------------------------

def register(cloud, capabilities):
    token = new_token(cloud)
    answer = requests.post(cloud.url + "/api/v1/connectors/register", timeout=5,
                           json={"pairing_token": token, "printers": [{"name": "P"}], "capabilities": capabilities})
    body = answer.json()
    return body["connector"]["id"], body["printers"][0]["id"], {"Authorization": "Bearer " + body["credentials"]["secret"]}


def test_the_reference_cloud_answers_a_held_poll_as_soon_as_a_command_is_queued(cloud):
    connector_id, printer_id, auth = register(cloud, ["long_poll"])
    timer = threading.Timer(0.5, cloud.enqueue_command, (connector_id, printer_id, "pause"))
    started = time.monotonic()
    timer.start()
    answer = requests.get("%s/api/v1/connectors/%s/commands?limit=20&wait=25" % (cloud.url, connector_id),
                          headers=auth, timeout=30)
    assert 0.4 < time.monotonic() - started < 5
    assert answer.headers["X-Poll-Wait"] == "25" and [c["action"] for c in answer.json()] == ["pause"]


def test_the_reference_cloud_does_not_hold_a_connector_that_did_not_announce_long_poll(cloud):
    connector_id, _, auth = register(cloud, [])
    started = time.monotonic()
    answer = requests.get("%s/api/v1/connectors/%s/commands?limit=20&wait=25" % (cloud.url, connector_id),
                          headers=auth, timeout=30)
    assert time.monotonic() - started < 2 and answer.json() == [] and "X-Poll-Wait" not in answer.headers


def test_the_reference_cloud_sends_an_extension_action_only_to_a_connector_that_announced_it(cloud):
    connector_id, printer_id, auth = register(cloud, [])
    held = cloud.enqueue_command(connector_id, printer_id, "emergency_stop")
    sent = cloud.enqueue_command(connector_id, printer_id, "pause")
    answer = requests.get("%s/api/v1/connectors/%s/commands?limit=20" % (cloud.url, connector_id), headers=auth,
                          timeout=5)
    assert [c["id"] for c in answer.json()] == [sent]
    assert cloud.command(held)["status"] == "queued"


def test_a_held_poll_logs_no_transfer_lines(cloud, printer, make_connector):
    connector = start(make_connector, cloud, printer)
    cloud.wait_for(lambda: len(polls(cloud, connector)) >= 2, 40)  # one hold of 25 s ended
    assert "Transfer" not in connector.run_log
