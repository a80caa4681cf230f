"""The simulators honour the protocol shapes, so tests can trust them as references."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests
import websocket

from sim.cloud import ReferenceCloud
from sim.printer import PrinterSimulator

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "moonraker-0.11-no-klippy.json"  # tests/fixtures/record.py


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------

@pytest.fixture
def cloud():
    with ReferenceCloud() as server:
        yield server


@pytest.fixture
def printer():
    with PrinterSimulator(print_seconds=2.0, tick_hz=10.0) as sim:
        yield sim


@pytest.fixture
def http():
    with requests.Session() as session:
        yield session


class Paired:
    """A connector registered with the cloud: its id, secret and auth headers."""

    def __init__(self, cloud, http, token="PAIR_test", printers=1):
        cloud.add_pairing_token(token)
        body = {"pairing_token": token,
                "printers": [{"name": "P%d" % i} for i in range(printers)]}
        answer = http.post(cloud.url + "/api/v1/connectors/register", json=body).json()
        self.id = answer["connector"]["id"]
        self.secret = answer["credentials"]["secret"]
        self.printer_ids = [p["id"] for p in answer["printers"]]
        self.headers = {"Authorization": "Bearer " + self.secret, "X-Connector-Id": str(self.id)}
        self.base = "%s/api/v1/connectors/%s" % (cloud.url, self.id)


@pytest.fixture
def paired(cloud, http):
    return Paired(cloud, http)


def fixture_exchange(name):
    exchanges = json.loads(FIXTURE.read_text())["exchanges"]
    return next(e for e in exchanges if e["name"] == name)


def rpc(ws, method, params=None, rpc_id=1):
    ws.send(json.dumps({"jsonrpc": "2.0", "method": method, "params": params or {}, "id": rpc_id}))
    while True:
        message = json.loads(ws.recv())
        if message.get("id") == rpc_id:
            return message


def next_notification(ws, method, deadline_seconds=5.0):
    ws.settimeout(deadline_seconds)
    while True:
        message = json.loads(ws.recv())
        if message.get("method") == method:
            return message


# --------------------------------------------------------------------------
# cloud: pairing
# --------------------------------------------------------------------------

def test_register_returns_connector_secret_printers_and_polling(cloud, http):
    cloud.add_pairing_token("PAIR_a", polling={"commands_seconds": 1, "snapshots_seconds": 5})
    answer = http.post(cloud.url + "/api/v1/connectors/register", json={
        "pairing_token": "PAIR_a", "printers": [{"name": "Voron"}, {"name": "K1"}]})
    assert answer.status_code == 200
    body = answer.json()
    assert body["connector"] == {"id": 42}
    assert body["credentials"]["secret"].startswith("sk_live_")
    assert body["printers"] == [{"id": 1, "name": "Voron"}, {"id": 2, "name": "K1"}]
    assert body["polling"] == {"commands_seconds": 1, "snapshots_seconds": 5}
    assert cloud.registrations[0]["pairing_token"] == "PAIR_a"


def test_register_with_unknown_token_is_401(cloud, http):
    answer = http.post(cloud.url + "/api/v1/connectors/register", json={"pairing_token": "nope"})
    assert answer.status_code == 401
    assert answer.json() == {"error": "Invalid or expired pairing token"}


def test_register_token_is_single_use(cloud, http):
    Paired(cloud, http, token="PAIR_once")
    again = http.post(cloud.url + "/api/v1/connectors/register", json={"pairing_token": "PAIR_once"})
    assert again.status_code == 422
    assert again.json() == {"error": "Pairing token already consumed"}
    assert len(cloud.registrations) == 2


def test_printer_ids_are_globally_unique(cloud, http):
    first = Paired(cloud, http, token="PAIR_1", printers=2)
    second = Paired(cloud, http, token="PAIR_2", printers=1)
    assert (first.id, second.id) == (42, 43)
    assert first.printer_ids + second.printer_ids == [1, 2, 3]


# --------------------------------------------------------------------------
# cloud: auth, heartbeat, commands
# --------------------------------------------------------------------------

def test_endpoints_require_the_connectors_own_secret(cloud, http, paired):
    other = Paired(cloud, http, token="PAIR_other")
    wrong = dict(paired.headers, Authorization="Bearer " + other.secret)
    for headers in ({}, wrong):
        answer = http.post(paired.base + "/heartbeat", json={}, headers=headers)
        assert answer.status_code == 401
        assert answer.json() == {"error": "Unauthorized"}
    spoofed = dict(other.headers, **{"X-Connector-Id": str(paired.id)})
    assert http.post(cloud.url + "/api/v1/snapshots/batch", json={"snapshots": []},
                     headers=spoofed).status_code == 401
    assert cloud.heartbeats == []


def test_heartbeat_is_recorded_with_request_headers(cloud, http, paired):
    body = {"status": {"uptime_seconds": 5, "version": "0.2.0"},
            "printers": [{"printer_id": 1, "reachable": True}]}
    answer = http.post(paired.base + "/heartbeat", json=body,
                       headers=dict(paired.headers, **{"User-Agent": "printer-connector/0.2.0"}))
    assert answer.status_code == 200 and answer.json() == {"status": "ok"}
    assert cloud.heartbeats[0]["body"] == body
    assert cloud.heartbeats[0]["connector_id"] == str(paired.id)
    assert cloud.requests[-1]["headers"]["User-Agent"] == "printer-connector/0.2.0"


def test_commands_are_delivered_in_order_once_up_to_limit(cloud, http, paired):
    first = cloud.enqueue_command(paired.id, 1, "pause")
    second = cloud.enqueue_command(paired.id, 1, "start_print", {"filename": "a.gcode"},
                                   command_id=77)
    cloud.enqueue_command(paired.id, 1, "resume")
    batch = http.get(paired.base + "/commands?limit=2", headers=paired.headers).json()
    assert batch == [{"id": first, "printer_id": 1, "action": "pause", "params": {}},
                     {"id": 77, "printer_id": 1, "action": "start_print",
                      "params": {"filename": "a.gcode"}}]
    assert cloud.command(second)["status"] == "running"
    rest = http.get(paired.base + "/commands?limit=20", headers=paired.headers).json()
    assert [c["action"] for c in rest] == ["resume"]
    assert http.get(paired.base + "/commands", headers=paired.headers).json() == []


def test_redelivered_command_is_returned_again(cloud, http, paired):
    command_id = cloud.enqueue_command(paired.id, 1, "pause")
    http.get(paired.base + "/commands", headers=paired.headers)
    cloud.redeliver(command_id)
    again = http.get(paired.base + "/commands", headers=paired.headers).json()
    assert [c["id"] for c in again] == [command_id]
    assert cloud.command(command_id)["deliveries"] == 2


def test_duplicate_completions_are_accepted_and_all_recorded(cloud, http, paired):
    command_id = cloud.enqueue_command(paired.id, 1, "pause")
    url = "%s/api/v1/commands/%s/complete" % (cloud.url, command_id)
    body = {"status": "succeeded", "result": {"action": "pause"}}
    for _ in range(2):
        answer = http.post(url, json=body, headers=paired.headers)
        assert answer.status_code == 200 and answer.json() == {"status": "ok"}
    assert [c["body"] for c in cloud.completions_for(command_id)] == [body, body]
    assert cloud.command(command_id)["status"] == "succeeded"


def test_completion_of_a_deleted_command_is_404(cloud, http, paired):
    command_id = cloud.enqueue_command(paired.id, 1, "pause")
    cloud.delete_command(command_id)
    answer = http.post("%s/api/v1/commands/%s/complete" % (cloud.url, command_id),
                       json={"status": "failed"}, headers=paired.headers)
    assert answer.status_code == 404
    assert answer.json() == {"error": "Command not found"}
    assert cloud.completions == []


# --------------------------------------------------------------------------
# cloud: snapshots and webcam
# --------------------------------------------------------------------------

def test_snapshot_batch_is_recorded_and_counted(cloud, http, paired):
    snaps = [{"printer_id": 1, "captured_at": "2026-01-03T14:30:2%dZ" % i,
              "payload": {"eventtime": i, "status": {}}} for i in range(3)]
    answer = http.post(cloud.url + "/api/v1/snapshots/batch", json={"snapshots": snaps},
                       headers=paired.headers)
    assert answer.json() == {"inserted": 3}
    assert [s["captured_at"] for s in cloud.snapshots] == [s["captured_at"] for s in snaps]
    assert cloud.snapshots[0]["payload"] == {"eventtime": 0, "status": {}}
    assert cloud.snapshots[0]["received_at"] > 0


@pytest.mark.parametrize("body", [[], {"snapshots": {}}, {"snapshots": [1]}, {}])
def test_malformed_snapshot_batch_is_422(cloud, http, paired, body):
    answer = http.post(cloud.url + "/api/v1/snapshots/batch", json=body, headers=paired.headers)
    assert answer.status_code == 422
    assert "error" in answer.json()
    assert cloud.snapshots == []


def test_webcam_request_is_listed_once_and_upload_recorded(cloud, http, paired):
    request_id = cloud.enqueue_webcam_request(paired.id, 1, created_at="2026-01-01T00:00:00Z")
    listed = http.get(paired.base + "/webcam_requests?limit=10", headers=paired.headers).json()
    assert listed == [{"id": request_id, "printer_id": 1, "created_at": "2026-01-01T00:00:00Z"}]
    assert http.get(paired.base + "/webcam_requests", headers=paired.headers).json() == []
    upload = http.put("%s/api/v1/webcam_requests/%d/upload" % (cloud.url, request_id),
                      data=b"\xff\xd8jpeg", headers=dict(paired.headers, **{
                          "Content-Type": "image/jpeg", "X-Printer-Id": "1"}))
    assert upload.status_code == 200
    recorded = cloud.webcam_uploads[0]
    assert (recorded["id"], recorded["printer_id"], recorded["content_type"], recorded["body"]) == (
        request_id, "1", "image/jpeg", b"\xff\xd8jpeg")


def test_chunked_webcam_upload_is_read_whole(cloud, http, paired):
    request_id = cloud.enqueue_webcam_request(paired.id, 1)
    chunks = iter([b"\xff\xd8", b"x" * 70000, b"\xff\xd9"])
    answer = http.put("%s/api/v1/webcam_requests/%d/upload" % (cloud.url, request_id),
                      data=chunks, headers=dict(paired.headers, **{"X-Printer-Id": "1"}))
    assert answer.status_code == 200
    assert cloud.webcam_uploads[0]["body"] == b"\xff\xd8" + b"x" * 70000 + b"\xff\xd9"


def test_webcam_upload_over_10_mb_is_413(cloud, http, paired):
    request_id = cloud.enqueue_webcam_request(paired.id, 1)
    answer = http.put("%s/api/v1/webcam_requests/%d/upload" % (cloud.url, request_id),
                      data=b"x" * (10 * 1024 * 1024 + 1),
                      headers=dict(paired.headers, **{"X-Printer-Id": "1"}))
    assert answer.status_code == 413
    assert cloud.webcam_uploads == []


# --------------------------------------------------------------------------
# cloud: faults, stats, wait_for
# --------------------------------------------------------------------------

def test_fault_503_changes_no_state_and_clears_after_count(cloud, http, paired):
    command_id = cloud.enqueue_command(paired.id, 1, "pause")
    cloud.set_fault("503", "commands", count=1)
    failed = http.get(paired.base + "/commands", headers=paired.headers)
    assert failed.status_code == 503 and "error" in failed.json()
    assert cloud.command(command_id)["status"] == "queued"
    assert [c["id"] for c in http.get(paired.base + "/commands", headers=paired.headers).json()] \
        == [command_id]
    assert cloud.fault_hits[0]["endpoint"] == "commands"


def test_fault_on_complete_is_not_recorded_as_completion(cloud, http, paired):
    command_id = cloud.enqueue_command(paired.id, 1, "pause")
    cloud.set_fault("503", "complete")
    url = "%s/api/v1/commands/%s/complete" % (cloud.url, command_id)
    assert http.post(url, json={"status": "succeeded"}, headers=paired.headers).status_code == 503
    cloud.clear_faults()
    assert http.post(url, json={"status": "succeeded"}, headers=paired.headers).status_code == 200
    assert len(cloud.completions_for(command_id)) == 1


@pytest.mark.parametrize("mode,status,check", [
    ("500", 500, lambda r: "error" in r.json()),
    ("401", 401, lambda r: r.json() == {"error": "Unauthorized"}),
    ("html", 200, lambda r: r.headers["Content-Type"].startswith("text/html")),
    ("object", 200, lambda r: isinstance(r.json(), dict)),
    ("notjson", 200, lambda r: r.content == b"not json"),
    ("nulls", 200, lambda r: None in r.json() and any(
        isinstance(c, dict) and isinstance(c.get("params"), str) for c in r.json())),
    ("huge", 200, lambda r: len(r.content) >= 20 * 1024 * 1024),
])
def test_fault_modes_answer_as_described(cloud, http, paired, mode, status, check):
    cloud.set_fault(mode, "commands", count=1)
    answer = http.get(paired.base + "/commands", headers=paired.headers)
    assert answer.status_code == status
    assert check(answer)


def test_fault_drop_closes_the_connection_without_answer(cloud, http, paired):
    cloud.set_fault("drop", "heartbeat", count=1)
    with pytest.raises(requests.ConnectionError):
        http.post(paired.base + "/heartbeat", json={}, headers=paired.headers)
    assert cloud.heartbeats == []
    assert http.post(paired.base + "/heartbeat", json={}, headers=paired.headers).ok


def test_fault_slow_delays_then_answers_normally(cloud, http, paired):
    cloud.set_fault("slow:0.5", "heartbeat", count=1)
    started = time.monotonic()
    assert http.post(paired.base + "/heartbeat", json={}, headers=paired.headers).ok
    assert time.monotonic() - started >= 0.5
    assert len(cloud.heartbeats) == 1


def test_stats_count_the_bytes_on_the_wire(cloud, paired):
    body = b'{"status": {}}'
    request = ("POST /api/v1/connectors/%s/heartbeat HTTP/1.1\r\nHost: x\r\n"
               "Authorization: Bearer %s\r\nContent-Type: application/json\r\n"
               "Content-Length: %d\r\nConnection: close\r\n\r\n" % (
                   paired.id, paired.secret, len(body))).encode() + body
    before = cloud.wait_for(lambda: cloud.stats()["requests"] == 1 and cloud.stats())  # register
    with socket.create_connection(("127.0.0.1", cloud.port)) as sock:
        sock.sendall(request)
        answer = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    cloud.wait_for(lambda: cloud.stats()["requests"] == before["requests"] + 1)
    after = cloud.stats()
    assert after["bytes_in"] - before["bytes_in"] == len(request)
    assert after["bytes_out"] - before["bytes_out"] == len(answer)
    assert after["by_endpoint"]["heartbeat"] == 1
    assert after["bytes_by_endpoint"]["heartbeat"] == {"in": len(request), "out": len(answer)}
    headers = answer.split(b"\r\n\r\n", 1)[0].decode().lower()
    assert "content-length:" in headers and "date:" in headers


def test_wait_for_times_out_with_a_message_naming_what_was_seen(cloud):
    with pytest.raises(AssertionError) as failure:
        cloud.wait_for(lambda: cloud.heartbeats, timeout=0.2)
    assert "0 heartbeats" in str(failure.value)


def test_wait_for_predicate_may_call_the_cloud_itself(cloud, http, paired):
    cloud.enqueue_command(paired.id, 1, "pause")
    delivered = cloud.wait_for(
        lambda: http.get(paired.base + "/commands", headers=paired.headers).json(), timeout=5)
    assert [c["action"] for c in delivered] == ["pause"]


def test_stop_closes_keepalive_connections_and_start_reuses_port(cloud, http, paired):
    assert http.post(paired.base + "/heartbeat", json={}, headers=paired.headers).ok
    port = cloud.port
    cloud.stop()
    with pytest.raises(requests.ConnectionError):
        http.post(paired.base + "/heartbeat", json={}, headers=paired.headers, timeout=5)
    cloud.start()
    assert cloud.port == port
    assert http.post(paired.base + "/heartbeat", json={}, headers=paired.headers).ok


def test_control_surface_and_cli(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "sim" / "cloud.py"), "--port", str(port),
         "--pairing-token", "PAIR_cli"], stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline().strip()
        url = "http://127.0.0.1:%d" % port
        assert line == "reference cloud listening on " + url
        requests.post(url + "/_control/pairing_tokens", json={"token": "PAIR_two"}).raise_for_status()
        for token in ("PAIR_cli", "PAIR_two"):
            assert requests.post(url + "/api/v1/connectors/register",
                                 json={"pairing_token": token, "printers": [{}]}).ok
        made = requests.post(url + "/_control/commands", json={
            "connector_id": 42, "printer_id": 1, "action": "pause"}).json()
        webcam = requests.post(url + "/_control/webcam_requests", json={
            "connector_id": 42, "printer_id": 1}).json()
        assert webcam == {"id": 1}
        state = requests.get(url + "/_control/state").json()
        assert made == {"id": "cmd_1"}
        assert [c["id"] for c in state["connectors"]] == [42, 43]
        assert "secret" not in json.dumps(state["connectors"])
        assert state["registrations"] == 2
        assert state["commands"][0]["status"] == "queued"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        process.stdout.close()


# --------------------------------------------------------------------------
# printer: Moonraker shapes
# --------------------------------------------------------------------------

def test_server_info_has_the_real_keys(printer, http):
    real = fixture_exchange("server_info")["body"]["result"]
    ours = http.get(printer.url + "/server/info").json()["result"]
    assert set(real) == set(ours)
    assert ours["klippy_connected"] is True and ours["klippy_state"] == "ready"


def test_objects_query_returns_only_requested_objects_and_fields(printer, http):
    answer = http.post(printer.url + "/printer/objects/query", json={"objects": {
        "print_stats": ["state"], "extruder": None, "no_such_object": None}}).json()
    status = answer["result"]["status"]
    assert set(status) == {"print_stats", "extruder"}
    assert status["print_stats"] == {"state": "standby"}
    assert {"temperature", "target"} <= set(status["extruder"])
    by_get = http.get(printer.url + "/printer/objects/query?virtual_sdcard=progress&toolhead")
    assert set(by_get.json()["result"]["status"]) == {"virtual_sdcard", "toolhead"}
    assert isinstance(answer["result"]["eventtime"], float)


def test_a_removed_object_is_simply_absent(printer, http):
    printer.remove_object("heater_bed")
    status = http.post(printer.url + "/printer/objects/query", json={"objects": {
        "heater_bed": None, "extruder": None}}).json()["result"]["status"]
    assert set(status) == {"extruder"}


def test_print_runs_to_complete_and_lands_in_history(printer, http):
    printer.add_file("cube.gcode")
    assert http.post(printer.url + "/printer/print/start?filename=cube.gcode").json() == {
        "result": "ok"}
    assert printer.state == "printing"
    printer.wait_for(lambda: printer.state == "complete", timeout=10)
    history = http.get(printer.url + "/server/history/list?limit=5").json()["result"]
    assert history["count"] == 1
    job = history["jobs"][0]
    assert (job["filename"], job["status"]) == ("cube.gcode", "completed")
    assert {"job_id", "start_time", "end_time", "print_duration", "metadata"} <= set(job)


def test_start_of_a_missing_file_is_400_unable_to_open_file(printer, http):
    answer = http.post(printer.url + "/printer/print/start?filename=missing.gcode")
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == "Unable to open file"


def test_start_while_printing_is_400_sd_busy(printer, http):
    printer.add_file("a.gcode")
    printer.set_state("printing", filename="a.gcode")
    answer = http.post(printer.url + "/printer/print/start?filename=a.gcode")
    assert (answer.status_code, answer.json()["error"]["message"]) == (400, "SD busy")


def test_pause_resume_cancel_move_the_state(printer, http):
    printer.add_file("a.gcode")
    for path, expected in (("start?filename=a.gcode", "printing"), ("pause", "paused"),
                           ("resume", "printing"), ("cancel", "cancelled")):
        assert http.post(printer.url + "/printer/print/" + path).json() == {"result": "ok"}
        assert printer.state == expected
    assert printer.history[-1]["status"] == "cancelled"
    assert http.post(printer.url + "/printer/print/pause").status_code == 200


def test_gcode_script_is_recorded_and_g28_homes(printer, http):
    answer = http.post(printer.url + "/printer/gcode/script", json={"script": "G28 X Y"})
    assert answer.json() == {"result": "ok"}
    assert printer.gcode_scripts == ["G28 X Y"]
    assert printer.status["toolhead"]["homed_axes"] == "xy"


def test_upload_answers_201_not_wrapped_in_result(printer, http):
    answer = http.post(printer.url + "/server/files/upload",
                       files={"file": ("cube.gcode", b"G28\n")}, data={"root": "gcodes"})
    real = fixture_exchange("upload_ok")["body"]
    assert answer.status_code == 201
    body = answer.json()
    assert set(body) == set(real) and set(body["item"]) == set(real["item"])
    assert body["item"]["path"] == "cube.gcode" and body["item"]["size"] == 4
    assert printer.files["cube.gcode"] == b"G28\n"


def test_upload_with_print_true_starts_the_print(printer, http):
    answer = http.post(printer.url + "/server/files/upload", files={"file": ("go.gcode", b"G28\n")},
                       data={"root": "gcodes", "print": "true"})
    assert answer.json()["print_started"] is True
    assert printer.state == "printing" and printer.status["print_stats"]["filename"] == "go.gcode"


@pytest.mark.parametrize("name,root,reason", [
    ("../config/printer.cfg", "gcodes", "Cannot write to path"),
    ("a.gcode", "nope", "Root nope not available"),
])
def test_bad_upload_is_400_with_reason_in_traceback(printer, http, name, root, reason):
    answer = http.post(printer.url + "/server/files/upload",
                       files={"file": (name, b"x")}, data={"root": root})
    error = answer.json()["error"]
    assert (answer.status_code, error["message"]) == (400, "Bad Request")
    assert reason in error["traceback"].strip().splitlines()[-1]


def test_delete_missing_file_matches_the_real_error(printer, http):
    answer = http.delete(printer.url + "/server/files/gcodes/missing.gcode")
    real = fixture_exchange("delete_missing")["body"]["error"]
    error = answer.json()["error"]
    assert (answer.status_code, error["code"], error["message"]) == (400, 400, real["message"])
    assert error["traceback"].strip().splitlines()[-1] == \
        real["traceback"].strip().splitlines()[-1]


def test_delete_removes_file_and_printing_file_is_403(printer, http):
    printer.add_file("a.gcode")
    printer.add_file("b.gcode")
    printer.set_state("printing", filename="a.gcode")
    assert http.delete(printer.url + "/server/files/gcodes/a.gcode").status_code == 403
    answer = http.delete(printer.url + "/server/files/gcodes/b.gcode")
    assert answer.json()["result"]["action"] == "delete_file"
    assert printer.deleted == ["b.gcode"] and "b.gcode" not in printer.files


def test_files_list_shape_and_bad_root(printer, http):
    printer.add_file("a.gcode", b"1234")
    listed = http.get(printer.url + "/server/files/list?root=gcodes").json()["result"]
    real = fixture_exchange("files_list")["body"]["result"][0]
    assert [set(f) for f in listed] == [set(real)] and listed[0]["size"] == 4
    bad = http.get(printer.url + "/server/files/list?root=nope")
    assert bad.status_code == 400
    assert bad.json()["error"]["message"] == \
        fixture_exchange("files_list_bad_root")["body"]["error"]["message"]


def test_webcams_list_points_at_a_jpeg_on_the_ui_port(printer, http):
    webcams = http.get(printer.url + "/server/webcams/list").json()["result"]["webcams"]
    real = fixture_exchange("webcams_list_one")["body"]["result"]["webcams"][0]
    assert len(webcams) == 1 and set(webcams[0]) == set(real)
    snapshot = http.get(printer.ui_url + webcams[0]["snapshot_url"])
    assert snapshot.headers["Content-Type"] == "image/jpeg"
    assert snapshot.content[:2] == b"\xff\xd8" and snapshot.content[-2:] == b"\xff\xd9"


def test_webcam_image_and_list_can_be_replaced(printer, http):
    printer.set_webcam_image(b"not an image", "text/plain")
    printer.set_webcams([])
    assert http.get(printer.url + "/server/webcams/list").json() == {"result": {"webcams": []}}
    snapshot = http.get(printer.ui_url + "/webcam/?action=snapshot")
    assert (snapshot.headers["Content-Type"], snapshot.content) == ("text/plain", b"not an image")


def test_klippy_disconnected_answers_like_the_real_moonraker(printer, http):
    printer.set_klippy(False)
    for name in ("objects_query_no_klippy", "printer_info_no_klippy", "gcode_script_no_klippy",
                 "pause_no_klippy", "start_no_klippy"):
        real = fixture_exchange(name)
        request = real["request"]
        answer = http.request(request["method"], printer.url + request["path"],
                              json=request.get("json"))
        assert answer.status_code == real["status"], name
        assert answer.json()["error"]["message"] == real["body"]["error"]["message"], name
    assert http.get(printer.url + "/server/info").json()["result"]["klippy_connected"] is False


def test_api_key_is_required_when_set(http):
    with PrinterSimulator(api_key="secret-key") as sim:
        denied = http.get(sim.url + "/server/files/list?root=gcodes")
        real = fixture_exchange("unauthorized_no_trusted_clients")["body"]["error"]
        assert denied.status_code == 401 and denied.json()["error"]["message"] == real["message"]
        assert http.get(sim.url + "/server/info", headers={"X-Api-Key": "secret-key"}).ok
        assert http.get(sim.ui_url + "/webcam/?action=snapshot").ok


# --------------------------------------------------------------------------
# printer: websocket
# --------------------------------------------------------------------------

def test_websocket_identify_and_subscribe(printer):
    ws = websocket.create_connection(printer.url.replace("http", "ws") + "/websocket", timeout=5)
    try:
        identified = rpc(ws, "server.connection.identify", {
            "client_name": "test", "version": "1", "type": "agent", "url": "x"})
        assert identified["result"] == {"connection_id": 1}
        subscribed = rpc(ws, "printer.objects.subscribe",
                         {"objects": {"print_stats": None, "extruder": ["temperature"]}}, 2)
        assert set(subscribed["result"]) == {"eventtime", "status"}
        assert set(subscribed["result"]["status"]["extruder"]) == {"temperature"}
        printer.wait_for(lambda: printer.ws_clients == 1)
        assert [c["method"] for c in printer.ws_calls] == [
            "server.connection.identify", "printer.objects.subscribe"]
        assert rpc(ws, "server.info", rpc_id=3)["result"]["websocket_count"] == 1
    finally:
        ws.close()


def test_websocket_notifies_state_changes_and_temperature_ticks(printer):
    ws = websocket.create_connection(printer.url.replace("http", "ws") + "/websocket", timeout=5)
    try:
        rpc(ws, "printer.objects.subscribe",
            {"objects": {"print_stats": ["state"], "heater_bed": None}})
        tick = next_notification(ws, "notify_status_update")
        changed, eventtime = tick["params"]
        assert set(changed) == {"heater_bed"} and "temperature" in changed["heater_bed"]
        assert isinstance(eventtime, float)
        printer.add_file("a.gcode")
        printer.set_state("printing", filename="a.gcode")
        while True:
            update = next_notification(ws, "notify_status_update")["params"][0]
            if "print_stats" in update:
                break
        assert update["print_stats"] == {"state": "printing"}
    finally:
        ws.close()


def test_websocket_gets_klippy_disconnected_and_ready(printer):
    ws = websocket.create_connection(printer.url.replace("http", "ws") + "/websocket", timeout=5)
    try:
        rpc(ws, "server.connection.identify", {"client_name": "t"})
        printer.set_klippy(False)
        assert next_notification(ws, "notify_klippy_disconnected")["jsonrpc"] == "2.0"
        printer.set_klippy(True)
        next_notification(ws, "notify_klippy_ready")
    finally:
        ws.close()


# --------------------------------------------------------------------------
# printer: faults, stop and restart
# --------------------------------------------------------------------------

@pytest.mark.parametrize("mode,check", [
    ("html", lambda r: r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")),
    ("500", lambda r: r.status_code == 500 and r.json()["error"]["code"] == 500),
    ("notjson", lambda r: r.status_code == 200 and r.content == b"not json"),
    ("wrongtypes", lambda r: r.status_code == 200 and isinstance(r.json()["result"], list)),
])
def test_printer_fault_modes(printer, http, mode, check):
    printer.set_fault(mode, "/printer/objects/query", count=1)
    url = printer.url + "/printer/objects/query?print_stats"
    assert check(http.get(url))
    assert http.get(url).json()["result"]["status"]["print_stats"]


def test_printer_fault_drop_and_slow(printer, http):
    printer.set_fault("drop", "/server/info", count=1)
    with pytest.raises(requests.ConnectionError):
        http.get(printer.url + "/server/info")
    printer.set_fault("slow:0.4", "/webcam/", count=1)
    started = time.monotonic()
    assert http.get(printer.ui_url + "/webcam/?action=snapshot").ok
    assert time.monotonic() - started >= 0.4


def test_stop_closes_the_ports_and_start_reuses_them(printer, http):
    assert http.get(printer.url + "/server/info").ok
    ports = (printer.port, printer.ui_port)
    printer.stop()
    for url in (printer.url, printer.ui_url):
        with pytest.raises(requests.ConnectionError):
            http.get(url + "/server/info", timeout=5)
    printer.start()
    assert (printer.port, printer.ui_port) == ports
    assert http.get(printer.url + "/server/info").ok


def test_requests_are_recorded_with_headers_and_json(printer, http):
    http.post(printer.url + "/printer/objects/query", json={"objects": {"toolhead": None}},
              headers={"X-Api-Key": "k"})
    recorded = printer.requests[-1]
    assert (recorded["method"], recorded["path"]) == ("POST", "/printer/objects/query")
    assert recorded["json"] == {"objects": {"toolhead": None}}
    assert recorded["headers"]["X-Api-Key"] == "k"


def test_printer_cli_prints_its_urls_and_serves():
    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "sim" / "printer.py"), "--port", str(ports[0]),
         "--ui-port", str(ports[1]), "--api-key", "K"], stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert "http://127.0.0.1:%d" % ports[0] in line and "http://127.0.0.1:%d" % ports[1] in line
        info = requests.get("http://127.0.0.1:%d/server/info" % ports[0],
                            headers={"X-Api-Key": "K"})
        assert info.json()["result"]["klippy_connected"] is True
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        process.stdout.close()


def test_simulators_are_quiet_on_stderr(tmp_path):
    script = ("from sim.cloud import ReferenceCloud\nfrom sim.printer import PrinterSimulator\n"
              "import requests\n"
              "with ReferenceCloud() as c, PrinterSimulator() as p:\n"
              "    requests.get(c.url + '/nope'); requests.get(p.url + '/nope')\n"
              "    requests.post(c.url + '/api/v1/connectors/register', data='x')\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=str(ROOT), capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, SIM_VERBOSE="0"))
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
