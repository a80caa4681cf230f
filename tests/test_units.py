"""Unit specifications of the HTTP client, the Moonraker and cloud clients and
the action handlers. Every one that talks to a peer runs on both transports
(the `peers` fixture, tests/peers.py): requests-mock behind RequestsTransport,
and scripted loopback servers behind KeptConnections."""

import base64
import io
import json
import os
import threading

import pytest
from peers import peer_certificate, peers  # noqa: F401  (fixtures)

import connector

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "moonraker-0.11-no-klippy.json")  # fixtures/record.py
MOON = "http://moonraker.test"
CLOUD = "https://cloud.test"


def fixture_exchange(name):
    with open(FIXTURE) as handle:
        exchanges = json.load(handle)["exchanges"]
    return next(e for e in exchanges if e["name"] == name)


@pytest.fixture
def log():
    return connector.Logger("debug", stream=io.StringIO())


@pytest.fixture
def printer_config():
    return connector.PrinterConfig(base_url=MOON, printer_id=1, name="P", ui_port=8080)


@pytest.fixture
def moonraker(printer_config, log):
    return connector.Moonraker(printer_config, log, "printer-connector/test")


@pytest.fixture
def config(tmp_path):
    return connector.Config(path=str(tmp_path / "c.json"), cloud_url=CLOUD, connector_id="42",
                            connector_secret="sk_live_topsecret", state_dir=str(tmp_path),
                            moonraker=[connector.PrinterConfig(base_url=MOON, printer_id=1)])


@pytest.fixture
def cloud(config, log):
    return connector.Cloud(config, log)


@pytest.fixture
def ctx(moonraker, printer_config, config, log):
    return connector.ActionContext(moonraker, printer_config, config, log, threading.Event())


# -- HTTP layer -----------------------------------------------------------

def test_requests_carry_only_the_protocol_headers(cloud, peers):
    with peers as mock:
        mock.post(CLOUD + "/api/v1/connectors/42/heartbeat", status_code=204)
        cloud.heartbeat({"status": {}})
        sent = mock.request_history[0].headers
    assert sent["Authorization"] == "Bearer sk_live_topsecret"
    assert sent["X-Connector-Id"] == "42"
    assert sent["User-Agent"] == "printer-connector/%s" % connector.__version__
    assert sent["Accept"] == "application/json"
    assert sent["Content-Type"] == "application/json"
    assert "Connection" not in sent
    assert "Accept-Encoding" not in sent


def test_json_bodies_are_compact(cloud, peers):
    with peers as mock:
        mock.post(CLOUD + "/api/v1/connectors/42/heartbeat", json={"status": "ok"})
        cloud.heartbeat({"status": {"uptime_seconds": 1}, "printers": []})
        assert mock.request_history[0].body == b'{"status":{"uptime_seconds":1},"printers":[]}'


def test_transport_errors_become_transport_error_with_a_short_message(cloud, peers):
    with peers as mock:
        mock.get(CLOUD + "/api/v1/connectors/42/commands", fail="close")
        with pytest.raises(connector.TransportError, match="^cloud connection closed without a response$"):
            cloud.poll_commands(connector.JsonSplitter(cloud.config.state_dir))


def test_a_body_over_the_cap_is_refused(moonraker, peers):
    with peers as mock:
        mock.get(MOON + "/server/info", content=b"x" * 2000)
        with pytest.raises(connector.HttpError, match="too large"):
            moonraker.http.request("GET", "/server/info", max_bytes=1000)


def test_a_declared_length_over_the_cap_is_refused_before_reading(moonraker, peers):
    with peers as mock:
        mock.get(MOON + "/x", content=b"{}", headers={"Content-Length": str(50 * 1024 * 1024)})
        with pytest.raises(connector.HttpError, match="too large: 52428800 bytes"):
            moonraker.http.request("GET", "/x")


# -- cloud client ---------------------------------------------------------

def test_command_poll_accepts_only_an_array(cloud, peers):
    with peers as mock:
        mock.get(CLOUD + "/api/v1/connectors/42/commands", json={"commands": []})
        with pytest.raises(connector.HttpError, match="expected a JSON array, got dict"):
            cloud.poll_commands(connector.JsonSplitter(cloud.config.state_dir))


def test_html_instead_of_json_is_an_error_naming_the_type(cloud, peers):
    with peers as mock:
        mock.get(CLOUD + "/api/v1/connectors/42/commands", text="<html>oops</html>",
                 headers={"Content-Type": "text/html"})
        with pytest.raises(connector.HttpError, match="expected JSON, got text/html"):
            cloud.poll_commands(connector.JsonSplitter(cloud.config.state_dir))


def test_cloud_401_is_credentials_rejected(cloud, peers):
    with peers as mock:
        mock.post(CLOUD + "/api/v1/connectors/42/heartbeat", status_code=401, json={"error": "Unauthorized"})
        with pytest.raises(connector.CredentialsRejected, match="credentials rejected"):
            cloud.heartbeat({})


def test_completion_404_means_the_command_is_gone(cloud, peers):
    with peers as mock:
        mock.post(CLOUD + "/api/v1/commands/cmd%2F1/complete", status_code=404, json={"error": "gone"})
        assert cloud.complete("cmd/1", {"status": "succeeded"}) is False


def test_cloud_error_message_is_surfaced(cloud, peers):
    with peers as mock:
        mock.post(CLOUD + "/api/v1/snapshots/batch", status_code=422, json={"error": "bad batch"})
        with pytest.raises(connector.HttpError, match="cloud http 422: bad batch"):
            cloud.push_snapshots([])


@pytest.mark.parametrize("status", [401, 422, 400])
def test_register_rejection_is_pairing_rejected(config, log, status, peers):
    config.connector_secret = None
    with peers as mock:
        mock.post(CLOUD + "/api/v1/connectors/register", status_code=status,
                  json={"error": "Invalid or expired pairing token"})
        with pytest.raises(connector.PairingRejected, match="Invalid or expired pairing token"):
            connector.Cloud(config, log).register({}, "0" * 32)


def test_register_sends_no_credentials(config, log, peers):
    config.connector_secret, config.connector_id = None, None
    with peers as mock:
        mock.post(CLOUD + "/api/v1/connectors/register", json={})
        connector.Cloud(config, log).register({"pairing_token": "PAIR_x"}, "0" * 32)
        assert "Authorization" not in mock.request_history[0].headers


def test_registration_body_describes_the_device(config):
    config.pairing_token = "PAIR_x"
    config.site_name = "Workshop"
    config.moonraker[0].name = "Voron"
    body = connector.registration_body(config)
    assert body["pairing_token"] == "PAIR_x" and body["site_name"] == "Workshop"
    assert body["printers"] == [{"name": "Voron", "ui_port": 80}]
    assert body["device"]["arch"] in ("amd64", "arm64", "arm", "mipsle", "mips", "386")
    assert body["device"]["os"] == "linux" and body["device"]["version"] == connector.__version__
    assert body["device"]["hostname"]


@pytest.mark.parametrize("machine, arch", [("x86_64", "amd64"), ("aarch64", "arm64"), ("armv7l", "arm"),
                                           ("armv6l", "arm"), ("mips", "mipsle")])
def test_architecture_uses_go_names(machine, arch):
    assert connector.go_arch(machine) == arch


# -- Moonraker errors -----------------------------------------------------

def test_moonraker_file_error_surfaces_the_traceback_reason(moonraker, peers):
    exchange = fixture_exchange("delete_missing")
    with peers as mock:
        mock.delete(MOON + "/server/files/gcodes/missing.gcode", status_code=exchange["status"],
                    json=exchange["body"])
        with pytest.raises(connector.HttpError) as error:
            moonraker.call("DELETE", "/server/files/gcodes/missing.gcode")
    assert "Bad Request" not in str(error.value)
    assert str(error.value).startswith("moonraker http 400: ")
    assert "missing.gcode" in str(error.value)


def test_moonraker_plain_error_message_is_kept(moonraker, peers):
    exchange = fixture_exchange("pause_no_klippy")
    with peers as mock:
        mock.post(MOON + "/printer/print/pause", status_code=exchange["status"], json=exchange["body"])
        with pytest.raises(connector.HttpError, match="moonraker http 503: Klippy Host not connected"):
            moonraker.call("POST", "/printer/print/pause")


def test_status_query_without_a_status_object_is_an_error(moonraker, peers):
    with peers as mock:
        mock.post(MOON + "/printer/objects/query", json={"result": ["wrong"]})
        with pytest.raises(connector.HttpError, match="no status object"):
            moonraker.query_status()


def test_api_key_is_sent_when_configured(printer_config, log, peers):
    printer_config.api_key = "abc"
    client = connector.Moonraker(printer_config, log, "ua")
    with peers as mock:
        mock.get(MOON + "/server/info", json={"result": {}})
        client.server_info()
        assert mock.request_history[0].headers["X-Api-Key"] == "abc"


# -- file names -----------------------------------------------------------

@pytest.mark.parametrize("name", ["../config/printer.cfg", "a/../../b", "/etc/passwd", "dir\\file.gcode",
                                  "nul\x00.gcode", "a//b", "./a", "", "x" * 256, "d/" + "é" * 128])
def test_unsafe_file_names_are_refused(name):
    with pytest.raises(connector.CommandFailed, match="filename"):
        connector.validate_filename({"filename": name})


@pytest.mark.parametrize("name", ["benchy.gcode", "sub/dir/part.gcode", "x" * 255, "..hidden.gcode"])
def test_safe_file_names_pass(name):
    assert connector.validate_filename({"filename": name}) == name


def test_non_string_file_name_is_refused():
    with pytest.raises(connector.CommandFailed, match="missing or invalid param 'filename'"):
        connector.validate_filename({"filename": 7})


# -- actions --------------------------------------------------------------

def test_every_protocol_action_has_a_handler():
    assert set(connector.ACTIONS) == {"pause", "resume", "cancel", "start_print", "homing", "upload_file",
                                      "delete_file", "sync_files", "import_history", "create_backup",
                                      "gcode", "list_macros", "set_temperature", "emergency_stop"}


@pytest.mark.parametrize("axes, script, result", [
    (None, "G28 X Y Z", "all"), ([], "G28 X Y Z", "all"), (["z", "x"], "G28 X Z", ["X", "Z"]),
    (["Y", "y"], "G28 Y", ["Y"])])
def test_homing_sends_g28_for_the_axes(ctx, axes, script, result, peers):
    homed = "".join(a.lower() for a in (result if result != "all" else "XYZ"))
    status = {"print_stats": {"state": "standby"}, "webhooks": {"state": "ready"}, "toolhead": {"homed_axes": homed}}
    with peers as mock:
        mock.post(MOON + "/printer/objects/query", json={"result": {"eventtime": 1.0, "status": status}})
        mock.post(MOON + "/printer/gcode/script", json={"result": "ok"})
        assert connector.ACTIONS["homing"](ctx, {"axes": axes}) == {"axes": result, "state": "standby",
                                                                    "homed_axes": homed}
        sent = [r.json() for r in mock.request_history if r.path == "/printer/gcode/script"]
        assert sent == [{"script": script}]


@pytest.mark.parametrize("axes", ["XY", ["W"], [1]])
def test_homing_refuses_bad_axes_without_calling_moonraker(ctx, axes, peers):
    with peers as mock:
        with pytest.raises(connector.CommandFailed, match="axes"):
            connector.ACTIONS["homing"](ctx, {"axes": axes})
        assert mock.call_count == 0


def test_start_print_passes_the_file_name_as_a_query_parameter(ctx, peers):
    status = {"print_stats": {"state": "standby"}, "webhooks": {"state": "ready"}}
    with peers as mock:
        mock.post(MOON + "/printer/objects/query", json={"result": {"eventtime": 1.0, "status": status}})
        mock.post(MOON + "/printer/print/start", json={"result": "ok"})
        assert connector.ACTIONS["start_print"](ctx, {"filename": "my part&1.gcode"}) == \
            {"filename": "my part&1.gcode", "state": "standby"}
        started = [r for r in mock.request_history if r.path == "/printer/print/start"]
        assert [r.qs for r in started] == [{"filename": ["my part&1.gcode"]}]


def test_upload_sends_multipart_with_root_and_folder(ctx, peers):
    with peers as mock:
        mock.post(MOON + "/server/files/upload", status_code=201, json={"action": "create_file", "item": {}})
        content = base64.b64encode(b"G28\n").decode()
        result = connector.ACTIONS["upload_file"](ctx, {"filename": "sub/a.gcode", "content": content})
        sent = mock.request_history[0]
    body = sent.body  # a file, read as it is sent, of the length it announced
    assert len(body) == int(sent.headers["Content-Length"])
    assert result == {"filename": "sub/a.gcode", "size": 4}
    assert b'name="root"\r\n\r\ngcodes' in body
    assert b'name="path"\r\n\r\nsub' in body
    assert b'name="file"; filename="a.gcode"' in body and b"G28\n" in body


def test_upload_refuses_content_that_is_not_base64(ctx):
    with pytest.raises(connector.CommandFailed, match="not valid base64"):
        connector.ACTIONS["upload_file"](ctx, {"filename": "a.gcode", "content": "%%%"})


def test_delete_quotes_the_path(ctx, peers):
    with peers as mock:
        mock.delete(MOON + "/server/files/gcodes/dir/a%20b.gcode", json={"result": {}})
        connector.ACTIONS["delete_file"](ctx, {"filename": "dir/a b.gcode"})
        assert mock.call_count == 1


def test_sync_files_returns_the_list_and_count(ctx, peers):
    files = [{"path": "a.gcode", "size": 1}, {"path": "b.gcode", "size": 2}]
    with peers as mock:
        mock.get(MOON + "/server/files/list?root=gcodes", json={"result": files})
        assert connector.ACTIONS["sync_files"](ctx, {}) == {"files": files, "count": 2}


def test_sync_files_refuses_a_wrongly_typed_answer(ctx, peers):
    with peers as mock:
        mock.get(MOON + "/server/files/list", json={"result": {"files": "no"}})
        with pytest.raises(connector.CommandFailed, match="expected a list"):
            connector.ACTIONS["sync_files"](ctx, {})


def test_import_history_counts_jobs(ctx, peers):
    history = {"count": 9, "jobs": [{"job_id": "1"}, {"job_id": "2"}]}
    with peers as mock:
        mock.get(MOON + "/server/history/list", json={"result": history})
        assert connector.ACTIONS["import_history"](ctx, {"limit": 2}) == {"history": history, "count": 2}
        assert mock.request_history[0].qs == {"limit": ["2"]}


@pytest.mark.parametrize("limit", [0, -1, "50", True, 10 ** 6])
def test_import_history_refuses_a_bad_limit(ctx, limit):
    with pytest.raises(connector.CommandFailed, match="limit"):
        connector.ACTIONS["import_history"](ctx, {"limit": limit})


@pytest.mark.parametrize("params, message", [
    ({}, "backup_id"),
    ({"backup_id": "b1"}, "presigned_url"),
    ({"backup_id": "b1", "presigned_url": "file:///x"}, "presigned_url"),
    ({"backup_id": "b1", "presigned_url": "https://s3.test/x"}, "include"),
    ({"backup_id": "b1", "presigned_url": "https://s3.test/x", "include": {"config": False}}, "at least one"),
    ({"backup_id": "b1", "presigned_url": "https://s3.test/x", "include": {"secrets": True}}, "include"),
    ({"backup_id": "b1", "presigned_url": "https://s3.test/x", "include": {"config": "yes"}}, "include"),
    ({"backup_id": "b1", "presigned_url": "https://s3.test/x", "include": {"config": True},
      "printer_data_root": "relative/path"}, "printer_data_root"),
])
def test_create_backup_validates_params_first(ctx, params, message, peers):
    with peers as mock:
        with pytest.raises(connector.CommandFailed, match=message):
            connector.ACTIONS["create_backup"](ctx, params)
        assert mock.call_count == 0


# -- time and ids ---------------------------------------------------------

@pytest.mark.parametrize("value, same", [(7, "7"), ("7", "7"), (7.0, "7"), (" cmd_1 ", "cmd_1")])
def test_command_ids_are_normalised(value, same):
    assert connector.normalize_command_id(value) == same


@pytest.mark.parametrize("value", [None, True, [], {}, "", 1.5])
def test_unusable_command_ids_are_none(value):
    assert connector.normalize_command_id(value) is None


@pytest.mark.parametrize("text", ["2026-01-03T14:30:22Z", "2026-01-03T14:30:22.123Z", "2026-01-03T14:30:22.123456789Z",
                                  "2026-01-03T14:30:22+00:00", "2026-01-03T15:30:22+01:00"])
def test_rfc3339_times_parse(text):
    assert connector.parse_rfc3339(text) == pytest.approx(1767450622, abs=1)


def test_unparseable_time_is_none():
    assert connector.parse_rfc3339("yesterday") is None


# -- logging --------------------------------------------------------------

def test_log_lines_are_logfmt_and_hide_secrets():
    stream = io.StringIO()
    log = connector.Logger("info", stream=stream)
    log.add_secret("sk_live_topsecret")
    log.info("Heartbeat sent", note="has sk_live_topsecret inside", n=2)
    line = stream.getvalue().strip()
    assert line.startswith("time=") and " level=INFO msg=\"Heartbeat sent\" " in line
    assert "sk_live_topsecret" not in line and "[redacted]" in line and "n=2" in line


def test_repeated_failures_are_logged_once_then_summarised():
    stream = io.StringIO()
    tracker = connector.FailureTracker(connector.Logger("info", stream=stream), "heartbeat")
    for _ in range(50):
        tracker.failed("cloud connection refused")
    assert stream.getvalue().count("heartbeat failed") == 1
    tracker.failed("cloud read timed out")
    tracker.succeeded()
    lines = stream.getvalue().strip().splitlines()
    assert len(lines) == 4  # first failure, its summary, the next failure, the recovery
    assert "times=50" in lines[1] and "read timed out" in lines[2] and "recovered" in lines[3]


def test_backoff_grows_and_caps_with_jitter():
    delays = [connector.backoff_delay(n, 3.0) for n in range(1, 12)]
    assert 3.0 <= delays[0] <= 6.0
    assert all(d <= connector.BACKOFF_CAP for d in delays)
    assert max(delays[-3:]) >= connector.BACKOFF_CAP / 2
    assert connector.backoff_delay(0, 3.0) == 3.0


def test_the_first_state_a_watcher_sees_counts_as_a_change_from_the_last_snapshot():
    changes = []
    watcher = connector.StatusWatcher(connector.PrinterConfig("http://127.0.0.1:7125", printer_id=1),
                                      connector.Logger(), threading.Event(), lambda: changes.append(1),
                                      last_sent=lambda: "standby")
    watcher._changed("printing")  # it changed after the snapshot, before the watcher first looked
    assert changes == [1]


def test_the_first_state_a_watcher_sees_is_no_change_when_the_last_snapshot_says_the_same():
    changes = []
    watcher = connector.StatusWatcher(connector.PrinterConfig("http://127.0.0.1:7125", printer_id=1),
                                      connector.Logger(), threading.Event(), lambda: changes.append(1),
                                      last_sent=lambda: "standby")
    watcher._changed("standby")
    assert changes == []
