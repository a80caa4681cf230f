"""The running agent: heartbeats, snapshots, webcam, and how it survives a
misbehaving cloud or printer. Each test runs connector.py as a real process
and checks what arrived at the reference cloud."""

import base64
import datetime
import hashlib
import json
import subprocess
import sys
import time
import types

import pytest

from harness import FAST, ROOT, completion, heartbeats_of, snapshots_of, unpaired_config, wait_until
from rawserver import RawServer, reply


# -- heartbeat --------------------------------------------------------------

def test_heartbeat_reports_version_uptime_and_reachability(cloud, paired):
    body = cloud.wait_for(lambda: heartbeats_of(cloud, paired))[-1]
    assert body["status"]["version"] == paired.run_log.split("version=")[1].split()[0]
    assert isinstance(body["status"]["uptime_seconds"], int)
    assert body["printers"] == [{"printer_id": paired.printer_id, "reachable": True}]


def test_heartbeat_reports_an_unreachable_printer_and_keeps_going(cloud, own_printer, make_connector):
    connector = make_connector(unpaired_config(cloud, own_printer)).start()
    connector.wait_log("Heartbeat sent")
    own_printer.stop()
    cloud.wait_for(lambda: any(h["printers"][0]["reachable"] is False for h in heartbeats_of(cloud, connector)))
    own_printer.start()
    before = len(heartbeats_of(cloud, connector))
    cloud.wait_for(lambda: any(h["printers"][0]["reachable"] for h in heartbeats_of(cloud, connector)[before:]))


def test_requests_on_the_wire_carry_only_the_protocol_headers(cloud, paired):
    cloud.wait_for(lambda: heartbeats_of(cloud, paired))
    sent = [r for r in cloud.requests if r["path"].startswith("/api/v1/connectors/%s/heartbeat" % paired.connector_id)]
    names = {name.lower() for name in sent[-1]["headers"]}
    assert names == {"host", "user-agent", "accept", "authorization", "x-connector-id", "content-type",
                     "content-length"}


def test_a_live_websocket_spares_the_heartbeat_probe(cloud, own_printer, make_connector):
    connector = make_connector(unpaired_config(cloud, own_printer)).start()
    connector.wait_log("status websocket connected")
    # A heartbeat that asked Moonraker before the websocket was identified may
    # still be on its way; the one after it began later, so once two more
    # have arrived every probe of the past is counted.
    seen = len(heartbeats_of(cloud, connector))
    cloud.wait_for(lambda: len(heartbeats_of(cloud, connector)) >= seen + 2)
    probes = len([r for r in own_printer.requests if r["path"].startswith("/server/info")])
    count = len(heartbeats_of(cloud, connector))
    cloud.wait_for(lambda: len(heartbeats_of(cloud, connector)) >= count + 4)
    assert len([r for r in own_printer.requests if r["path"].startswith("/server/info")]) == probes
    assert all(h["printers"][0]["reachable"] for h in heartbeats_of(cloud, connector)[count:])


def test_heartbeats_go_on_while_a_command_runs_long(cloud, paired, printer):
    printer.set_fault("slow:4", endpoint="/server/files/list", count=1)
    command_id = cloud.enqueue_command(paired.connector_id, paired.printer_id, "sync_files")
    paired.wait_log("Command started\" id=%s" % command_id)
    during = len(heartbeats_of(cloud, paired))
    cloud.wait_for(lambda: len(heartbeats_of(cloud, paired)) >= during + 3, 3.5)
    assert not cloud.completions_for(command_id)  # still running meanwhile
    assert completion(cloud, command_id, 15)["status"] == "succeeded"


# -- snapshots --------------------------------------------------------------

def test_snapshots_carry_the_status_objects_and_capture_time(cloud, paired):
    snapshot = cloud.wait_for(lambda: snapshots_of(cloud, paired))[-1]
    status = snapshot["payload"]["status"]
    for name in ("print_stats", "virtual_sdcard", "extruder", "heater_bed", "toolhead", "pause_resume"):
        assert name in status
    assert "eventtime" in snapshot["payload"]
    captured = datetime.datetime.strptime(snapshot["captured_at"], "%Y-%m-%dT%H:%M:%SZ")
    age = datetime.datetime.utcnow() - captured
    assert abs(age.total_seconds()) < 30


def test_a_printer_without_a_heater_bed_still_gets_snapshots(cloud, own_printer, make_connector):
    own_printer.remove_object("heater_bed")
    connector = make_connector(unpaired_config(cloud, own_printer)).start()
    connector.wait_log("Pairing successful")
    snapshot = cloud.wait_for(lambda: snapshots_of(cloud, connector))[-1]
    assert "heater_bed" not in snapshot["payload"]["status"]
    assert "extruder" in snapshot["payload"]["status"]


def test_klippy_down_fails_snapshots_cleanly_and_heartbeats_go_on(cloud, own_printer, make_connector):
    own_printer.set_klippy(False)
    connector = make_connector(unpaired_config(cloud, own_printer)).start()
    connector.wait_log("snapshots failed.*moonraker http 404: Not Found", timeout=20)
    cloud.wait_for(lambda: len(heartbeats_of(cloud, connector)) >= 2)
    own_printer.set_klippy(True)
    cloud.wait_for(lambda: snapshots_of(cloud, connector), 30)


# -- a misbehaving cloud ----------------------------------------------------

@pytest.mark.parametrize("fault", ["html", "object", "notjson", "nulls", "huge", "drop", "500"])
def test_bad_command_poll_answers_are_logged_and_survived(cloud, paired, fault):
    cloud.set_fault(fault, endpoint="commands", count=2)
    cloud.wait_for(lambda: sum(1 for h in cloud.fault_hits if h["endpoint"] == "commands") >= 2, 20)
    command_id = cloud.enqueue_command(paired.connector_id, paired.printer_id, "sync_files")
    assert completion(cloud, command_id, 30)["status"] == "succeeded"
    # "nulls" and "huge" (one 20 MB string: read to disk, not refused) are
    # JSON arrays whose elements are not commands: each is skipped.
    expected = "skipping a command" if fault in ("nulls", "huge") else "commands failed"
    assert expected in paired.run_log
    assert "Traceback" not in paired.run_log
    assert paired.proc.poll() is None


def test_null_and_malformed_commands_are_skipped_or_failed(cloud, paired):
    cloud.set_fault("nulls", endpoint="commands", count=1)
    paired.wait_log("skipping a command without a usable id", timeout=20)
    assert paired.proc.poll() is None


@pytest.mark.parametrize("params", ["just a string", [1, 2], 7])
def test_params_that_are_not_an_object_fail_the_command(cloud, paired, params):
    command_id = cloud.enqueue_command(paired.connector_id, paired.printer_id, "start_print", params=params)
    body = completion(cloud, command_id, 15)
    assert body["status"] == "failed"
    assert "params" in body["error_message"]


def test_credentials_rejected_is_logged_loudly_and_retried_slowly(cloud, paired):
    paired.wait_log("Heartbeat sent")
    cloud.set_fault("401", endpoint="heartbeat")
    paired.wait_log("level=ERROR msg=\"heartbeat failed\" error=\"credentials rejected", timeout=10)
    hits = sum(1 for h in cloud.fault_hits if h["endpoint"] == "heartbeat")
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # a fixed window is the claim here: no retries within it
        assert paired.proc.poll() is None
        time.sleep(0.5)
    assert sum(1 for h in cloud.fault_hits if h["endpoint"] == "heartbeat") == hits


def test_cloud_failures_back_off_and_recover(cloud, paired):
    paired.wait_log("Heartbeat sent")
    cloud.set_fault("503", endpoint="heartbeat")
    paired.wait_log("heartbeat failed")
    start = len([h for h in cloud.fault_hits if h["endpoint"] == "heartbeat"])
    time.sleep(4)  # the claim is about a rate over a window
    tries = len([h for h in cloud.fault_hits if h["endpoint"] == "heartbeat"]) - start
    assert tries <= 3, "at 0.5 s intervals without backoff there would be about 8"
    cloud.clear_faults()
    paired.wait_log("heartbeat recovered", timeout=70)


def test_steady_state_info_log_does_not_flood(cloud, printer, make_connector):
    connector = make_connector(unpaired_config(cloud, printer)).start(log_level="info")
    connector.wait_log("Heartbeat sent")
    pushed = len(cloud.heartbeats)
    cloud.wait_for(lambda: len(cloud.heartbeats) >= pushed + 6)
    assert connector.run_log.count("Heartbeat sent") == 1


# -- webcam -----------------------------------------------------------------

def test_webcam_request_is_answered_with_the_camera_image(cloud, paired, printer):
    request_id = cloud.enqueue_webcam_request(paired.connector_id, paired.printer_id)
    upload = cloud.wait_for(lambda: [u for u in cloud.webcam_uploads if u["id"] == request_id])[0]
    assert upload["printer_id"] == str(paired.printer_id)
    assert upload["content_type"] == "image/jpeg"
    assert upload["body"][:2] == b"\xff\xd8"


def test_absolute_webcam_url_from_moonraker_is_used(cloud, own_printer, make_connector):
    own_printer.set_webcams([{"name": "cam", "enabled": True, "service": "mjpegstreamer",
                              "snapshot_url": own_printer.ui_url + "/webcam/?action=snapshot",
                              "stream_url": "/webcam/?action=stream"}])
    connector = make_connector(unpaired_config(cloud, own_printer, moonraker=[
        {"printer_id": 0, "base_url": own_printer.url, "ui_port": 1}]))  # the UI port is wrong on purpose
    connector.start().wait_log("Pairing successful")
    request_id = cloud.enqueue_webcam_request(connector.connector_id, connector.printer_id)
    cloud.wait_for(lambda: [u for u in cloud.webcam_uploads if u["id"] == request_id])


def test_webcam_falls_back_when_moonraker_lists_no_camera(cloud, own_printer, make_connector):
    own_printer.set_webcams([])
    connector = make_connector(unpaired_config(cloud, own_printer)).start()
    connector.wait_log("Pairing successful")
    request_id = cloud.enqueue_webcam_request(connector.connector_id, connector.printer_id)
    cloud.wait_for(lambda: [u for u in cloud.webcam_uploads if u["id"] == request_id])


def webcam_polls(cloud, connector):
    path = "/api/v1/connectors/%s/webcam_requests" % connector.connector_id
    return len([r for r in cloud.requests if r["path"].startswith(path)])


def without_camera(printer):
    printer.set_webcams([])
    printer.set_webcam_image(None)


def test_without_a_camera_webcam_requests_are_polled_slowly(cloud, own_printer, make_connector):
    without_camera(own_printer)
    connector = make_connector(unpaired_config(cloud, own_printer, poll_webcam_seconds=0.1,
                                               poll_webcam_no_camera_seconds=600)).start()
    connector.wait_log("No camera answers")
    polls, beats = webcam_polls(cloud, connector), len(heartbeats_of(cloud, connector))
    # Four heartbeats are about 2 s: 20 polls at the pace of a printer with a camera.
    cloud.wait_for(lambda: len(heartbeats_of(cloud, connector)) >= beats + 4)
    assert webcam_polls(cloud, connector) - polls <= 1


def test_a_camera_that_appears_is_used_and_restores_the_pace(old_cloud, own_printer, make_connector):
    cloud = old_cloud  # the pace of intervals: a long-poll cloud holds the polls instead
    without_camera(own_printer)
    connector = make_connector(unpaired_config(cloud, own_printer, poll_webcam_seconds=0.1,
                                               poll_webcam_no_camera_seconds=1)).start()
    connector.wait_log("No camera answers")
    own_printer.set_webcam_image(b"\xff\xd8\xff\xe0 a camera plugged in later")
    request_id = cloud.enqueue_webcam_request(connector.connector_id, connector.printer_id)
    cloud.wait_for(lambda: [u for u in cloud.webcam_uploads if u["id"] == request_id])
    connector.wait_log("Camera found")
    polls = webcam_polls(cloud, connector)
    cloud.wait_for(lambda: webcam_polls(cloud, connector) >= polls + 10, timeout=5)


def test_stale_webcam_requests_are_skipped(cloud, paired):
    old = (datetime.datetime.utcnow() - datetime.timedelta(seconds=90)).strftime("%Y-%m-%dT%H:%M:%SZ")
    stale = cloud.enqueue_webcam_request(paired.connector_id, paired.printer_id, created_at=old)
    fresh = cloud.enqueue_webcam_request(paired.connector_id, paired.printer_id)
    cloud.wait_for(lambda: [u for u in cloud.webcam_uploads if u["id"] == fresh])
    assert not [u for u in cloud.webcam_uploads if u["id"] == stale]


def test_webcam_images_over_10_mb_are_not_sent(cloud, own_printer, make_connector):
    own_printer.set_webcam_image(b"\xff\xd8" + b"\0" * (10 * 1024 * 1024 + 10))
    connector = make_connector(unpaired_config(cloud, own_printer)).start()
    connector.wait_log("Pairing successful")
    request_id = cloud.enqueue_webcam_request(connector.connector_id, connector.printer_id)
    connector.wait_log("no webcam image.*too large")
    assert not [u for u in cloud.webcam_uploads if u["id"] == request_id]


def test_a_web_page_is_not_taken_for_a_webcam_image(cloud, own_printer, make_connector):
    own_printer.set_webcam_image(b"<html>Mainsail</html>", content_type="text/html")
    connector = make_connector(unpaired_config(cloud, own_printer)).start()
    connector.wait_log("Pairing successful")
    cloud.enqueue_webcam_request(connector.connector_id, connector.printer_id)
    connector.wait_log("no webcam image.*not an image")


# -- lifecycle --------------------------------------------------------------

def silent_websocket_answer(exchange):
    """Accepts a websocket upgrade, then reads and ignores everything, the
    close frame too (frames never end a request head); HTTP gets a 503."""
    key = exchange.headers.get("sec-websocket-key")
    if not key:
        return reply(503, b"")
    accept = base64.b64encode(hashlib.sha1(key.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")


def test_sigterm_stops_within_5_seconds_when_moonraker_ignores_the_close_frame(cloud, make_connector):
    peer = RawServer(silent_websocket_answer)
    try:
        printer = types.SimpleNamespace(url=peer.url().rstrip("/"), ui_port=1)  # no web UI, no camera
        connector = make_connector(unpaired_config(cloud, printer)).start()
        connector.wait_log("Heartbeat sent")
        wait_until(lambda: any("sec-websocket-key" in e.headers for e in peer.exchanges), message="an upgrade")
        started = time.monotonic()
        assert connector.stop(timeout=5) == 0
        assert time.monotonic() - started < 5
    finally:
        peer.stop()


def test_sigterm_stops_within_5_seconds_with_exit_0(paired):
    paired.wait_log("Heartbeat sent")
    started = time.monotonic()
    assert paired.stop(timeout=5) == 0
    assert time.monotonic() - started < 5
    assert "Connector stopped" in paired.run_log


def test_sigterm_during_a_long_backoff_stops_at_once(cloud, paired):
    paired.wait_log("Heartbeat sent")
    cloud.set_fault("503")
    paired.wait_log("heartbeat failed")
    started = time.monotonic()
    assert paired.stop(timeout=5) == 0
    assert time.monotonic() - started < 5


def test_sigterm_during_a_slow_cloud_request_stops_within_5_seconds(cloud, paired):
    paired.wait_log("Heartbeat sent")
    cloud.set_fault("slow:30", endpoint="heartbeat")
    cloud.wait_for(lambda: any(h["endpoint"] == "heartbeat" and h["mode"] == "slow:30" for h in cloud.fault_hits))
    started = time.monotonic()
    assert paired.stop(timeout=6) == 0
    assert time.monotonic() - started < 5


# Agent.run replaced by one that takes a SIGTERM where the main thread stands
# inside the stop event's own lock, as Event.wait does on the way into and out
# of its sleep (and a handler inside Event.set does when a second signal comes).
HOLDING_THE_STOP_LOCK = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import connector

def run(agent):
    with agent.stop._cond:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10000):  # Python runs signal handlers between bytecodes
            pass
    return connector.EXIT_OK if agent.stop.wait(10) else connector.EXIT_FAILURE

connector.Agent.run = run
sys.exit(connector.run_agent(connector.load_config(sys.argv[2]), connector.Logger("info"), once=False))
"""


def test_a_stop_signal_while_the_main_thread_holds_the_stop_events_lock_still_stops(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"cloud_url": "http://127.0.0.1:9", "pairing_token": "PAIR_x",
                                  "state_dir": str(tmp_path / "state"),
                                  "moonraker": [{"printer_id": 0, "name": "t", "base_url": "http://127.0.0.1:9"}]}))
    proc = subprocess.Popen([sys.executable, "-c", HOLDING_THE_STOP_LOCK, ROOT, str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail("deadlocked: the SIGTERM handler waited for a lock its own thread held")
    assert proc.returncode == 0, output.decode(errors="replace")


def test_once_fails_with_exit_1_when_the_cloud_is_down(cloud, printer, make_connector):
    connector = make_connector(unpaired_config(cloud, printer))
    assert connector.run("--once") == 0
    cloud.set_fault("503", endpoint="heartbeat")
    assert connector.run("--once") == 1
    assert "one round failed" in connector.run_log and "heartbeat" in connector.run_log


def test_once_runs_one_round_of_every_loop(cloud, printer, make_connector):
    connector = make_connector(unpaired_config(cloud, printer))
    assert connector.run("--once", log_level="debug") == 0
    assert "one round done\" loops=commands,heartbeat,snapshots,webcam" in connector.run_log
    assert any(s["printer_id"] == connector.printer_id for s in cloud.snapshots)


def test_fast_intervals_are_honoured(paired, cloud):
    # Sanity of the harness itself: the intervals the tests rely on reach the agent.
    assert paired.config["heartbeat_seconds"] == FAST["heartbeat_seconds"]
    count = len(heartbeats_of(cloud, paired))
    cloud.wait_for(lambda: len(heartbeats_of(cloud, paired)) >= count + 2, 5)
    assert json.loads(paired.config_path.read_text())["connector_secret"]
