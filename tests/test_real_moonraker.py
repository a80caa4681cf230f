"""connector.py against the real Moonraker 0.11 from PyPI.

Each test runs connector.py as a real process paired with the reference
cloud, sends it commands through the cloud and checks both what the cloud
received and what happened on Moonraker's side: its data folder, its access
log (it runs verbose, so every request it served is there), its websocket
clients.

Three Moonraker instances per module, all on 127.0.0.1 with their own data
folder:
- trusted_clients 127.0.0.0/8, no Klipper, and a webcam whose snapshot_url
  points at a JPEG server of the test's own. Without Klipper its file,
  history, webcam and websocket APIs work for real and its /printer/* routes
  fail: the connector must report that cleanly and keep going.
- no trusted clients: every call needs X-Api-Key.
- trusted, with a FakeKlippy (tests/moonraker_real.py) on its Klipper Unix
  socket, so Moonraker reports Klippy "ready" and its /printer/* routes, its
  status subscriptions and notify_status_update work through Moonraker's own
  code.
"""

import base64
import os
import shutil
import tempfile
import time

import pytest

from harness import (Connector, completions_of, enqueue, heartbeats_of, snapshots_of, start_paired,
                     unpaired_config, wait_until)
from moonraker_real import FakeKlippy, ImageServer, RealMoonraker, requests_logged
from sim.printer import make_jpeg

# One command's round trip (poll 0.3 s, Moonraker, completion) takes well
# under a second; the margins are for a loaded 2-core CI machine.
COMMAND_TIMEOUT = 15.0


@pytest.fixture(scope="module")
def webcam_image():
    return make_jpeg(64, 48)


@pytest.fixture(scope="module")
def image_server(webcam_image):
    server = ImageServer(webcam_image).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def moonraker(tmp_path_factory, image_server):
    instance = RealMoonraker(tmp_path_factory.mktemp("moonraker-trusted"), trusted=True,
                             webcam_url=image_server.url).start()
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def keyed_moonraker(tmp_path_factory):
    instance = RealMoonraker(tmp_path_factory.mktemp("moonraker-keyed"), trusted=False).start()
    yield instance
    instance.stop()


def start_connector(cloud, make_connector, moonraker, api_key=None, ui_port=None, **overrides):
    config = unpaired_config(cloud, moonraker, **overrides)
    if api_key is not None:
        config["moonraker"][0]["api_key"] = api_key
    if ui_port is not None:
        config["moonraker"][0]["ui_port"] = ui_port
    return start_paired(make_connector(config))


@pytest.fixture(scope="module")
def shared_connector(cloud_server, moonraker, tmp_path_factory):
    """One connector for the tests that only send commands to the trusted
    Moonraker: starting one per test would double the module's run time."""
    connector = start_paired(Connector(tmp_path_factory.mktemp("shared-connector"),
                                       unpaired_config(cloud_server, moonraker)))
    yield connector
    connector.kill()


@pytest.fixture
def connector(cloud, shared_connector):
    """A running connector paired with the cloud and talking to the trusted Moonraker."""
    assert shared_connector.proc.poll() is None, "the shared connector died:\n" + shared_connector.run_log[-3000:]
    return shared_connector


def run_command(cloud, connector, action, params=None):
    """Sends one command through the cloud; returns the completion body the cloud received."""
    command_id = enqueue(cloud, connector, action, params)
    completions = completions_of(cloud, command_id, COMMAND_TIMEOUT, "completion of %s (%s)" % (command_id, action))
    assert len(completions) == 1, completions
    return completions[0]["body"]


def wait_reachable_heartbeats(cloud, connector, reachable, count=2):
    def matching():
        found = [b for b in heartbeats_of(cloud, connector)
                 if b.get("printers") and b["printers"][0].get("reachable") is reachable]
        return found if len(found) >= count else None
    return cloud.wait_for(matching, timeout=COMMAND_TIMEOUT,
                          message="%d heartbeats with reachable=%s" % (count, reachable))


def wait_logged(moonraker, needle):
    """Moonraker writes its access log from a thread of its own: the line may
    land a moment after the response."""
    return wait_until(lambda: requests_logged(moonraker, needle), 10.0, "Moonraker logged %r" % needle)


def moonraker_listing(moonraker):
    return {entry["path"] for entry in moonraker.get("/server/files/list", params={"root": "gcodes"})}


def write_gcode(moonraker, relpath, data):
    """A file put straight into DATA/gcodes; waits until Moonraker's file watcher knows it."""
    path = os.path.join(moonraker.gcodes, relpath)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)
    wait_until(lambda: relpath in moonraker_listing(moonraker), 10.0, "Moonraker lists %s" % relpath)
    return path


# --------------------------------------------------------------------------
# The peer itself
# --------------------------------------------------------------------------

def test_moonraker_starts_fast_on_loopback_without_klippy(moonraker):
    assert moonraker.started_in < 5.0, "Moonraker took %.1fs to answer /server/info" % moonraker.started_in
    info = moonraker.get("/server/info")
    assert info["moonraker_version"].startswith("0.11")
    assert info["klippy_connected"] is False
    assert not info["failed_components"]
    # Nothing that would reach out to the internet is loaded.
    assert "update_manager" not in info["components"]
    assert "zeroconf" not in info["components"]
    assert "Moonlight Disabled" in moonraker.log
    assert "Fetching latest usb.ids" not in moonraker.log
    assert "Starting Moonraker on (127.0.0.1, %d)" % moonraker.port in moonraker.log


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------

def test_sync_files_lists_the_files_present_in_gcodes(cloud, connector, moonraker):
    write_gcode(moonraker, "sync_a.gcode", b"G28\n")
    write_gcode(moonraker, "syncdir/sync_b.gcode", b"G1 X10\n")

    body = run_command(cloud, connector, "sync_files")

    assert body["status"] == "succeeded", body
    listed = {entry["path"] for entry in body["result"]["files"]}
    assert listed == moonraker.gcode_files()
    assert {"sync_a.gcode", "syncdir/sync_b.gcode"} <= listed
    assert body["result"]["count"] == len(listed)
    sizes = {entry["path"]: entry["size"] for entry in body["result"]["files"]}
    assert sizes["syncdir/sync_b.gcode"] == len(b"G1 X10\n")


def test_upload_file_creates_the_file_with_the_same_bytes(cloud, connector, moonraker):
    data = b"; uploaded through the cloud\nG28\nG1 X5 Y5 F3000\n" + bytes(range(256))

    body = run_command(cloud, connector, "upload_file",
                       {"filename": "upload_top.gcode", "content": base64.b64encode(data).decode()})

    assert body["status"] == "succeeded", body
    assert body["result"]["filename"] == "upload_top.gcode"
    assert body["result"]["size"] == len(data)
    with open(os.path.join(moonraker.gcodes, "upload_top.gcode"), "rb") as handle:
        assert handle.read() == data


def test_upload_file_into_a_subfolder_creates_it_there(cloud, connector, moonraker):
    data = b"G28\n; in a subfolder\n"

    body = run_command(cloud, connector, "upload_file",
                       {"filename": "parts/left/bracket.gcode", "content": base64.b64encode(data).decode()})

    assert body["status"] == "succeeded", body
    path = os.path.join(moonraker.gcodes, "parts", "left", "bracket.gcode")
    with open(path, "rb") as handle:
        assert handle.read() == data
    assert "parts/left/bracket.gcode" in moonraker_listing(moonraker)


def test_delete_file_removes_it_from_gcodes(cloud, connector, moonraker):
    path = write_gcode(moonraker, "to_delete.gcode", b"G28\n")

    body = run_command(cloud, connector, "delete_file", {"filename": "to_delete.gcode"})

    assert body["status"] == "succeeded", body
    assert body["result"]["filename"] == "to_delete.gcode"
    assert not os.path.exists(path)


def test_a_name_with_spaces_unicode_and_url_characters_uploads_and_deletes(cloud, connector, moonraker):
    name = "odd names/Teil \u00dc #2 50% (v1).gcode"
    data = b"G28\n"

    uploaded = run_command(cloud, connector, "upload_file",
                           {"filename": name, "content": base64.b64encode(data).decode()})

    assert uploaded["status"] == "succeeded", uploaded
    path = os.path.join(moonraker.gcodes, name)
    with open(path, "rb") as handle:
        assert handle.read() == data
    listed = run_command(cloud, connector, "sync_files")
    assert name in {entry["path"] for entry in listed["result"]["files"]}
    deleted = run_command(cloud, connector, "delete_file", {"filename": name})
    assert deleted["status"] == "succeeded", deleted
    assert not os.path.exists(path)


def test_a_name_with_a_double_quote_is_stored_under_that_exact_name_and_deletes(cloud, connector, moonraker):
    name = 'quoted/say "hi" %22.gcode'
    uploaded = run_command(cloud, connector, "upload_file", {"filename": name, "content": "RzI4Cg=="})
    assert uploaded["status"] == "succeeded", uploaded
    folder = os.path.join(moonraker.gcodes, "quoted")
    assert [n for n in os.listdir(folder) if not n.startswith(".")] == ['say "hi" %22.gcode']  # not .thumbs
    deleted = run_command(cloud, connector, "delete_file", {"filename": name})
    assert deleted["status"] == "succeeded", deleted
    assert [n for n in os.listdir(folder) if not n.startswith(".")] == []


def test_delete_of_a_missing_file_reports_moonrakers_real_reason(cloud, connector, moonraker):
    assert not os.path.exists(os.path.join(moonraker.gcodes, "never_there.gcode"))

    body = run_command(cloud, connector, "delete_file", {"filename": "never_there.gcode"})

    assert body["status"] == "failed", body
    # Moonraker's `message` is only "Bad Request"; the reason is in its traceback.
    assert "Invalid file path" in body["error_message"], body
    assert "never_there.gcode" in body["error_message"]
    wait_logged(moonraker, "DELETE /server/files/gcodes/never_there.gcode")


def test_delete_with_a_traversal_name_fails_locally_and_leaves_the_config_untouched(cloud, connector, moonraker):
    with open(moonraker.conf_path, "rb") as handle:
        before = handle.read()

    body = run_command(cloud, connector, "delete_file", {"filename": "../config/moonraker.conf"})

    assert body["status"] == "failed", body
    assert "invalid filename" in body["error_message"], body
    with open(moonraker.conf_path, "rb") as handle:
        assert handle.read() == before
    # Nothing about the config file ever reached Moonraker: once a later
    # command's request shows up in its access log, the traversal is not there.
    marker = "sync_after_traversal.gcode"
    write_gcode(moonraker, marker, b"G28\n")
    assert run_command(cloud, connector, "delete_file", {"filename": marker})["status"] == "succeeded"
    wait_logged(moonraker, "DELETE /server/files/gcodes/" + marker)
    assert not requests_logged(moonraker, "moonraker.conf")
    assert not requests_logged(moonraker, "/config/")


def test_upload_with_a_traversal_name_fails_locally_and_writes_nothing(cloud, connector, moonraker):
    config_files = set(os.listdir(moonraker.config_dir))

    body = run_command(cloud, connector, "upload_file",
                       {"filename": "../config/evil.cfg", "content": base64.b64encode(b"[evil]\n").decode()})

    assert body["status"] == "failed", body
    assert "invalid filename" in body["error_message"], body
    assert set(os.listdir(moonraker.config_dir)) == config_files
    assert not os.path.exists(os.path.join(moonraker.config_dir, "evil.cfg"))


@pytest.fixture
def link_out_of_gcodes(moonraker, tmp_path):
    """gcodes/escape -> a folder outside printer_data holding a file; the
    link is removed afterwards (the other tests list gcodes)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.cfg").write_bytes(b"[keep me]\n")
    link = os.path.join(moonraker.gcodes, "escape")
    os.symlink(str(outside), link)
    yield outside
    os.unlink(link)


def test_moonraker_itself_writes_and_deletes_through_a_link_in_gcodes(moonraker, link_out_of_gcodes):
    """The premise of the check below: Moonraker's path check is lexical."""
    import requests
    response = requests.post(moonraker.url + "/server/files/upload", data={"root": "gcodes", "path": "escape"},
                             files={"file": ("planted.gcode", b"G28\n")}, timeout=10)
    assert response.status_code == 201 and (link_out_of_gcodes / "planted.gcode").exists()
    response = requests.delete(moonraker.url + "/server/files/gcodes/escape/planted.gcode", timeout=10)
    assert response.status_code == 200 and not (link_out_of_gcodes / "planted.gcode").exists()


def test_upload_through_a_link_out_of_gcodes_is_refused_and_writes_nothing_outside(
        cloud, connector, moonraker, link_out_of_gcodes):
    body = run_command(cloud, connector, "upload_file",
                       {"filename": "escape/planted.gcode", "content": base64.b64encode(b"G28\n").decode()})

    assert body["status"] == "failed" and "leads out of the gcodes folder" in body["error_message"], body
    assert sorted(os.listdir(str(link_out_of_gcodes))) == ["victim.cfg"]


def test_delete_through_a_link_out_of_gcodes_is_refused_and_deletes_nothing_outside(
        cloud, connector, moonraker, link_out_of_gcodes):
    body = run_command(cloud, connector, "delete_file", {"filename": "escape/victim.cfg"})

    assert body["status"] == "failed" and "leads out of the gcodes folder" in body["error_message"], body
    assert (link_out_of_gcodes / "victim.cfg").read_bytes() == b"[keep me]\n"
    marker = "after_link_refusal.gcode"
    write_gcode(moonraker, marker, b"G28\n")
    assert run_command(cloud, connector, "delete_file", {"filename": marker})["status"] == "succeeded"
    wait_logged(moonraker, "DELETE /server/files/gcodes/" + marker)
    assert not requests_logged(moonraker, "victim.cfg")


@pytest.mark.parametrize("name", ["sub/ ..", "sub/.. ", " planted.gcode"])
def test_a_name_moonraker_would_strip_is_refused_before_it_reaches_moonraker(cloud, connector, moonraker, name):
    os.makedirs(os.path.join(moonraker.gcodes, "sub"), exist_ok=True)
    before = moonraker.gcode_files()
    body = run_command(cloud, connector, "upload_file",
                       {"filename": name, "content": base64.b64encode(b"G28\n").decode()})

    assert body["status"] == "failed" and "white space" in body["error_message"], body
    assert moonraker.gcode_files() == before


# --------------------------------------------------------------------------
# History
# --------------------------------------------------------------------------

def test_import_history_returns_moonrakers_history(cloud, connector, moonraker):
    body = run_command(cloud, connector, "import_history", {"limit": 5})

    assert body["status"] == "succeeded", body
    expected = moonraker.get("/server/history/list", params={"limit": 5})
    assert body["result"]["history"] == expected
    assert body["result"]["count"] == len(expected["jobs"]) == 0
    assert expected["count"] == 0


# --------------------------------------------------------------------------
# Printer routes without Klippy: clean failures, the agent keeps going
# --------------------------------------------------------------------------

def test_start_print_without_klippy_fails_with_moonrakers_message_and_the_agent_keeps_running(
        cloud, connector, moonraker):
    write_gcode(moonraker, "cube.gcode", b"G28\n")

    body = run_command(cloud, connector, "start_print", {"filename": "cube.gcode"})

    assert body["status"] == "failed", body
    assert "Klippy Host not connected" in body["error_message"], body
    assert "503" in body["error_message"]
    assert body["result"]["filename"] == "cube.gcode"
    wait_logged(moonraker, "POST /printer/print/start?filename=cube.gcode")
    assert connector.proc.poll() is None
    assert run_command(cloud, connector, "sync_files")["status"] == "succeeded"


@pytest.mark.parametrize("action", ["pause", "resume", "cancel"])
def test_print_control_without_klippy_fails_with_klippy_host_not_connected(cloud, connector, moonraker, action):
    body = run_command(cloud, connector, action)

    assert body["status"] == "failed", body
    assert "Klippy Host not connected" in body["error_message"], body
    wait_logged(moonraker, "POST /printer/print/%s" % action)
    assert run_command(cloud, connector, "import_history")["status"] == "succeeded"


def test_homing_without_klippy_fails_with_not_found_and_the_agent_keeps_running(cloud, connector, moonraker):
    body = run_command(cloud, connector, "homing", {"axes": ["x", "y"]})

    assert body["status"] == "failed", body
    assert "404" in body["error_message"], body
    assert "Not Found" in body["error_message"]
    wait_logged(moonraker, "404 POST /printer/gcode/script")
    assert run_command(cloud, connector, "sync_files")["status"] == "succeeded"


def test_snapshots_fail_cleanly_without_klippy_while_heartbeats_report_reachable(cloud, connector, moonraker):
    connector.wait_log(r'msg="snapshots failed".*404')
    wait_reachable_heartbeats(cloud, connector, True, count=3)

    assert not [s for s in cloud.snapshots if s["connector_id"] == str(connector.connector_id)]
    assert connector.proc.poll() is None
    assert "Traceback" not in connector.run_log


# --------------------------------------------------------------------------
# Webcam
# --------------------------------------------------------------------------

def test_webcam_request_uploads_the_image_of_the_camera_configured_in_moonraker(
        cloud, connector, moonraker, image_server, webcam_image):
    cams = moonraker.get("/server/webcams/list")["webcams"]
    assert [c["snapshot_url"] for c in cams] == [image_server.url]
    hits_before = image_server.hits

    request_id = cloud.enqueue_webcam_request(connector.connector_id, connector.printer_id)
    uploads = cloud.wait_for(lambda: [u for u in cloud.webcam_uploads if u["id"] == request_id],
                             timeout=COMMAND_TIMEOUT, message="webcam upload %s" % request_id)

    assert len(uploads) == 1
    assert uploads[0]["body"] == webcam_image
    assert uploads[0]["content_type"] == "image/jpeg"
    assert uploads[0]["printer_id"] == str(connector.printer_id)
    assert image_server.hits > hits_before


def test_webcam_with_a_relative_snapshot_url_is_fetched_from_the_ui_port(
        cloud, make_connector, keyed_moonraker, image_server, webcam_image):
    # A camera added through Moonraker's API (kept in its database), with the
    # relative URL a web UI serves; the UI port is the image server's.
    keyed_moonraker.request("POST", "/server/webcams/item",
                            json={"name": "relcam", "service": "mjpegstreamer",
                                  "snapshot_url": "/snapshot.jpg", "stream_url": "/stream"})
    try:
        connector = start_connector(cloud, make_connector, keyed_moonraker, api_key=keyed_moonraker.api_key(),
                                    ui_port=image_server.server.server_address[1])
        connector.wait_log("Camera found")  # the look for cameras at start is done: it fetched one image too
        hits_before = image_server.hits

        request_id = cloud.enqueue_webcam_request(connector.connector_id, connector.printer_id)
        uploads = cloud.wait_for(lambda: [u for u in cloud.webcam_uploads if u["id"] == request_id],
                                 timeout=COMMAND_TIMEOUT, message="webcam upload %s" % request_id)

        assert uploads[0]["body"] == webcam_image
        assert image_server.hits == hits_before + 1
    finally:
        keyed_moonraker.request("DELETE", "/server/webcams/item", params={"name": "relcam"})


# --------------------------------------------------------------------------
# API key (the instance without trusted_clients)
# --------------------------------------------------------------------------

def test_without_api_key_a_moonraker_that_wants_one_is_reported_unreachable(cloud, make_connector, keyed_moonraker):
    connector = start_connector(cloud, make_connector, keyed_moonraker)

    wait_reachable_heartbeats(cloud, connector, False)
    assert not [b for b in heartbeats_of(cloud, connector) if b["printers"][0]["reachable"]]
    body = run_command(cloud, connector, "sync_files")
    assert body["status"] == "failed", body
    assert "401" in body["error_message"] and "Unauthorized" in body["error_message"], body


def test_with_the_api_key_the_printer_is_reachable_and_sync_files_works(cloud, make_connector, keyed_moonraker):
    connector = start_connector(cloud, make_connector, keyed_moonraker, api_key=keyed_moonraker.api_key())
    write_gcode(keyed_moonraker, "keyed.gcode", b"G28\n")

    wait_reachable_heartbeats(cloud, connector, True)
    body = run_command(cloud, connector, "sync_files")

    assert body["status"] == "succeeded", body
    assert {entry["path"] for entry in body["result"]["files"]} == keyed_moonraker.gcode_files() == {"keyed.gcode"}


def test_a_wrong_api_key_is_reported_unreachable(cloud, make_connector, keyed_moonraker):
    connector = start_connector(cloud, make_connector, keyed_moonraker, api_key="0" * 32)

    wait_reachable_heartbeats(cloud, connector, False)
    assert not [b for b in heartbeats_of(cloud, connector) if b["printers"][0]["reachable"]]


# --------------------------------------------------------------------------
# Websocket (status watcher)
# --------------------------------------------------------------------------

def identified(moonraker):
    return [line for line in moonraker.log.splitlines()
            if "Client Identified - Name: printer-connector" in line]


def websocket_uid(line):
    # "... Websocket 139795047660624 Client Identified - Name: ..."
    return line.split("Websocket ", 1)[1].split()[0]


def test_status_watcher_identifies_on_moonrakers_websocket(cloud, make_connector, moonraker):
    before = len(identified(moonraker))

    connector = start_connector(cloud, make_connector, moonraker)

    connector.wait_log("status websocket connected")
    wait_until(lambda: len(identified(moonraker)) > before, 10.0, "Moonraker logs the identified connector")
    assert "Type: other" in identified(moonraker)[-1]
    wait_until(lambda: moonraker.get("/server/info")["websocket_count"] >= 1, 10.0, "an open websocket")
    assert "status websocket (printer" not in connector.run_log  # no connection failure was logged


def test_status_watcher_authenticates_with_the_api_key(cloud, make_connector, keyed_moonraker):
    before = len(identified(keyed_moonraker))

    connector = start_connector(cloud, make_connector, keyed_moonraker, api_key=keyed_moonraker.api_key())

    connector.wait_log("status websocket connected")
    wait_until(lambda: len(identified(keyed_moonraker)) > before, 10.0, "Moonraker logs the identified connector")
    wait_until(lambda: keyed_moonraker.get("/server/info")["websocket_count"] >= 1, 10.0, "an open websocket")


@pytest.fixture
def own_moonraker(tmp_path):
    """A Moonraker of the test's own, for a test that restarts it."""
    instance = RealMoonraker(tmp_path / "own-moonraker", trusted=True).start()
    yield instance
    instance.stop()


def test_on_sigterm_the_status_websocket_is_closed_cleanly(cloud, own_moonraker, make_connector):
    # A Moonraker of its own: the only websocket it ever sees is this connector's.
    connector = start_connector(cloud, make_connector, own_moonraker)
    wait_until(lambda: len(identified(own_moonraker)) == 1, 10.0, "Moonraker logs the identified connector")
    uid = websocket_uid(identified(own_moonraker)[0])

    assert connector.stop(timeout=10.0) == 0

    closed = "Websocket Closed: ID: %s " % uid
    line = wait_until(lambda: [x for x in own_moonraker.log.splitlines() if closed in x], 10.0,
                      "Moonraker logs the websocket closed")[0]
    # A close frame, not a dropped connection.
    assert "Close Code: 1000" in line, line + "\n" + connector.run_log[-2500:]


def test_after_a_moonraker_restart_heartbeats_recover_and_the_websocket_identifies_again(
        cloud, own_moonraker, make_connector):  # this order stops the connector before Moonraker
    connector = start_connector(cloud, make_connector, own_moonraker)
    wait_until(lambda: len(identified(own_moonraker)) == 1, 10.0, "the first identification")
    wait_reachable_heartbeats(cloud, connector, True, count=1)

    own_moonraker.stop()
    wait_reachable_heartbeats(cloud, connector, False, count=1)
    own_moonraker.start()

    seen = len(heartbeats_of(cloud, connector))
    cloud.wait_for(lambda: [b for b in heartbeats_of(cloud, connector)[seen:] if b["printers"][0]["reachable"]],
                   timeout=COMMAND_TIMEOUT, message="a reachable heartbeat after the restart")
    wait_until(lambda: len(identified(own_moonraker)) >= 2, 20.0, "the websocket identifies again")
    assert run_command(cloud, connector, "sync_files")["status"] == "succeeded"
    assert connector.proc.poll() is None


def test_a_rejected_websocket_identify_is_reported_not_taken_for_a_connection(cloud, make_connector, keyed_moonraker):
    # Moonraker opens /websocket for anyone and only rejects the identify
    # (JSON-RPC error -32602 "Invalid API Key"); nothing else will work on
    # that socket, so the watcher must not treat it as connected.
    rejected = "Requested Method: server.connection.identify, Code: -32602, Message: Invalid API Key"
    before = keyed_moonraker.log.count(rejected)

    connector = start_connector(cloud, make_connector, keyed_moonraker, api_key="f" * 32)

    wait_until(lambda: keyed_moonraker.log.count(rejected) > before, 10.0, "Moonraker rejects the identify")
    connector.wait_log(r'msg="status websocket.*Invalid API Key', timeout=5.0)
    assert "status websocket connected" not in connector.run_log


# --------------------------------------------------------------------------
# With Klippy: the real Moonraker in front of a FakeKlippy on its Unix socket
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def klippy_moonraker(tmp_path_factory):
    """Moonraker with "Klipper" ready; yields (moonraker, klippy)."""
    sock_dir = tempfile.mkdtemp(prefix="klippy")  # Unix socket paths must stay short
    instance = RealMoonraker(tmp_path_factory.mktemp("moonraker-klippy"), trusted=True,
                             klippy_socket=os.path.join(sock_dir, "klippy.sock"))
    os.makedirs(instance.gcodes, exist_ok=True)
    klippy = FakeKlippy(instance.klippy_socket, instance.gcodes).start()
    try:
        instance.start()
        try:
            wait_until(lambda: instance.get("/server/info")["klippy_state"] == "ready", 15.0, "Klippy ready")
            yield instance, klippy
        finally:
            instance.stop()
    finally:
        klippy.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.fixture
def klippy(klippy_moonraker):
    moonraker, fake = klippy_moonraker
    if fake.print_state() != "standby":
        fake.set_print_state("standby")
        wait_until(lambda: print_state_of(moonraker) == "standby", 10.0, "Moonraker sees standby")
    return fake


def print_state_of(moonraker):
    return moonraker.request("POST", "/printer/objects/query",
                             json={"objects": {"print_stats": ["state"]}})["status"]["print_stats"]["state"]


def states_seen(cloud, connector):
    return [s["payload"]["status"]["print_stats"]["state"] for s in snapshots_of(cloud, connector)
            if "print_stats" in s["payload"].get("status", {})]


def test_with_klippy_snapshots_carry_moonrakers_real_status(cloud, make_connector, klippy_moonraker, klippy):
    moonraker, _ = klippy_moonraker
    connector = start_connector(cloud, make_connector, moonraker)

    snapshot = cloud.wait_for(lambda: snapshots_of(cloud, connector), timeout=COMMAND_TIMEOUT,
                              message="a snapshot")[0]

    status = snapshot["payload"]["status"]
    assert snapshot["printer_id"] == connector.printer_id
    assert status["print_stats"]["state"] == "standby"
    assert status["extruder"]["temperature"] == 21.5
    assert set(status) == {"print_stats", "virtual_sdcard", "extruder", "heater_bed", "toolhead", "pause_resume"}
    assert isinstance(snapshot["payload"]["eventtime"], float)
    wait_reachable_heartbeats(cloud, connector, True, count=1)


def test_with_klippy_start_print_succeeds_and_the_post_snapshot_shows_printing(
        cloud, make_connector, klippy_moonraker, klippy):
    moonraker, _ = klippy_moonraker
    connector = start_connector(cloud, make_connector, moonraker)
    write_gcode(moonraker, "benchy.gcode", b"G28\nG1 X10\n")

    body = run_command(cloud, connector, "start_print", {"filename": "benchy.gcode"})

    assert body["status"] == "succeeded", body
    assert body["result"] == {"action": "start_print", "filename": "benchy.gcode", "state": "printing",
                              "post_snapshot": "captured"}
    assert 'SDCARD_PRINT_FILE FILENAME="benchy.gcode"' in klippy.scripts
    assert klippy.print_state() == "printing"
    cloud.wait_for(lambda: "printing" in states_seen(cloud, connector), timeout=COMMAND_TIMEOUT,
                   message="a snapshot that shows printing")


def test_with_klippy_starting_a_missing_file_reports_klippers_message(cloud, make_connector, klippy_moonraker, klippy):
    moonraker, _ = klippy_moonraker
    connector = start_connector(cloud, make_connector, moonraker)

    body = run_command(cloud, connector, "start_print", {"filename": "not_here.gcode"})

    assert body["status"] == "failed", body
    assert "Unable to open file" in body["error_message"], body
    assert klippy.print_state() == "standby"


def test_with_klippy_pause_and_resume_succeed(cloud, make_connector, klippy_moonraker, klippy):
    moonraker, _ = klippy_moonraker
    connector = start_connector(cloud, make_connector, moonraker)
    write_gcode(moonraker, "pausable.gcode", b"G28\n")
    assert run_command(cloud, connector, "start_print", {"filename": "pausable.gcode"})["status"] == "succeeded"

    paused = run_command(cloud, connector, "pause")
    assert paused["status"] == "succeeded", paused
    assert klippy.print_state() == "paused"
    resumed = run_command(cloud, connector, "resume")
    assert resumed["status"] == "succeeded", resumed
    assert klippy.print_state() == "printing"


def test_with_klippy_homing_sends_g28_with_the_axes(cloud, make_connector, klippy_moonraker, klippy):
    moonraker, _ = klippy_moonraker
    connector = start_connector(cloud, make_connector, moonraker)

    body = run_command(cloud, connector, "homing", {"axes": ["y", "X"]})

    assert body["status"] == "succeeded", body
    assert body["result"]["axes"] == ["X", "Y"]
    assert klippy.scripts[-1] == "G28 X Y"


def test_with_klippy_a_state_change_on_the_printer_reaches_the_cloud_within_2s(
        cloud, make_connector, klippy_moonraker, klippy):
    moonraker, _ = klippy_moonraker
    # The periodic push is slow here: only the websocket subscription can be in time.
    connector = start_connector(cloud, make_connector, moonraker, push_snapshots_seconds=60)
    write_gcode(moonraker, "finishing.gcode", b"G28\n")
    assert run_command(cloud, connector, "start_print", {"filename": "finishing.gcode"})["status"] == "succeeded"
    cloud.wait_for(lambda: "printing" in states_seen(cloud, connector), timeout=COMMAND_TIMEOUT,
                   message="the printing snapshot")
    # The watcher's subscription is live: it saw standby -> printing.
    connector.wait_log('msg="Print state changed".*state=printing')

    changed_at = time.time()
    klippy.set_print_state("complete")  # the print finishes on its own

    snapshot = cloud.wait_for(
        lambda: [s for s in snapshots_of(cloud, connector)
                 if s["payload"]["status"].get("print_stats", {}).get("state") == "complete"],
        timeout=COMMAND_TIMEOUT, message="a snapshot with state complete")[0]
    assert snapshot["received_at"] - changed_at < 2.0, "took %.2fs" % (snapshot["received_at"] - changed_at)
    connector.wait_log('msg="Print state changed".*state=complete')


def subscriptions_answered(moonraker):
    """Subscriptions Moonraker has answered (with the state at that moment);
    notifications on that websocket can only come after the answer."""
    return moonraker.log.count('WEBSOCKET Response::{"jsonrpc":"2.0","result":{"eventtime"')


@pytest.fixture
def restartable_klippy(tmp_path):
    """A Moonraker of the test's own whose FakeKlippy the test may restart; yields
    (moonraker, start_klippy) where start_klippy() stops the current one and starts a new one."""
    sock_dir = tempfile.mkdtemp(prefix="klippy")
    moonraker = RealMoonraker(tmp_path / "moonraker", trusted=True, klippy_socket=os.path.join(sock_dir, "k.sock"))
    os.makedirs(moonraker.gcodes, exist_ok=True)
    fakes = []

    def start_klippy():
        if fakes:
            fakes[-1].stop()
        fakes.append(FakeKlippy(moonraker.klippy_socket, moonraker.gcodes).start())
        return fakes[-1]
    start_klippy()
    try:
        moonraker.start()
        wait_until(lambda: moonraker.get("/server/info")["klippy_state"] == "ready", 15.0, "Klippy ready")
        yield moonraker, start_klippy
    finally:
        moonraker.stop()
        fakes[-1].stop()
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_after_a_klipper_restart_the_watcher_subscribes_again_and_changes_arrive_within_2s(
        cloud, restartable_klippy, make_connector):  # this order stops the connector before Moonraker
    moonraker, start_klippy = restartable_klippy
    connector = start_connector(cloud, make_connector, moonraker, push_snapshots_seconds=60)
    wait_until(lambda: subscriptions_answered(moonraker) == 1, 10.0, "the first subscription")

    klippy = start_klippy()  # Klipper restarts: Moonraker reconnects and sends notify_klippy_ready
    wait_until(lambda: "Klippy ready" in moonraker.log.rsplit("Klippy Connection Established", 1)[-1], 15.0,
               "Moonraker sees the new Klippy ready")
    wait_until(lambda: subscriptions_answered(moonraker) == 2, 10.0, "the watcher subscribes again")

    write_gcode(moonraker, "after_restart.gcode", b"G28\n")
    changed_at = time.time()
    klippy.set_print_state("printing", filename="after_restart.gcode")

    snapshot = cloud.wait_for(
        lambda: [s for s in snapshots_of(cloud, connector)
                 if s["payload"]["status"].get("print_stats", {}).get("state") == "printing"],
        timeout=COMMAND_TIMEOUT, message="a snapshot with state printing")[0]
    assert snapshot["received_at"] - changed_at < 2.0, "took %.2fs" % (snapshot["received_at"] - changed_at)


# --------------------------------------------------------------------------
# Owner control through the real Moonraker (issue 19)
# --------------------------------------------------------------------------

def test_with_klippy_gcode_returns_the_console_lines_moonraker_forwards(cloud, make_connector, klippy_moonraker, klippy):
    moonraker, _ = klippy_moonraker
    connector = start_connector(cloud, make_connector, moonraker)
    connector.wait_log("status websocket connected")

    body = run_command(cloud, connector, "gcode", {"script": 'RESPOND MSG="hello from the cloud"'})

    assert body["status"] == "succeeded", body
    assert body["result"]["console"] == ["echo: hello from the cloud"]
    assert klippy.scripts[-1] == 'RESPOND MSG="hello from the cloud"'


def test_with_klippy_emergency_stop_reaches_klipper(cloud, make_connector, klippy_moonraker, klippy):
    moonraker, _ = klippy_moonraker
    connector = start_connector(cloud, make_connector, moonraker)
    queued = time.time()

    body = run_command(cloud, connector, "emergency_stop")

    assert body["status"] == "succeeded", body
    assert klippy.emergency_stops and klippy.emergency_stops[-1] >= queued
