"""`--doctor`: each check passes on a healthy set-up and fails, with a fix, on
a broken one. Runs the real CLI against the reference cloud and the printer
simulator with faults switched on; systemctl and journalctl are stubs."""

import json
import os
import re
import ssl
import subprocess
import threading
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import connector as connector_module
from harness import connector_cmd, unpaired_config
from sim.printer import PrinterSimulator

SYSTEMCTL = """#!/bin/sh
case "$1" in
  is-enabled) echo "${STUB_ENABLED:-enabled}"; [ "${STUB_ENABLED:-enabled}" = enabled ] ;;
  is-active) echo "${STUB_ACTIVE:-active}"; [ "${STUB_ACTIVE:-active}" = active ] ;;
  show) echo "${STUB_USER:-root}" ;;
esac
"""
JOURNALCTL = """#!/bin/sh
echo 'level=INFO msg="Heartbeat sent" printers=1'
"""


@pytest.fixture
def stub_bin(tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    for name, text in (("systemctl", SYSTEMCTL), ("journalctl", JOURNALCTL)):
        (folder / name).write_text(text)
        os.chmod(folder / name, 0o755)
    return folder


@pytest.fixture
def healthy(cloud, printer, make_connector):
    """A paired connector's config (the connector itself is not left running)."""
    connector = make_connector(unpaired_config(cloud, printer))
    assert connector.run("--once") == 0, connector.log
    return connector


def doctor(connector, stub_bin, **env):
    full_env = dict(os.environ, PATH="%s:%s" % (stub_bin, os.environ["PATH"]), **env)
    full_env.pop("CLOUD_URL", None)
    done = subprocess.run(connector_cmd() + ["--config", str(connector.config_path), "--doctor"],
                          capture_output=True, text=True, timeout=120, env=full_env)
    return done.returncode, done.stdout + done.stderr


def line(output, check):
    found = [l for l in output.splitlines() if l[6:].startswith(check + " ")]
    assert found, "no %s line in:\n%s" % (check, output)
    return found[0]


def status(output, check):
    return line(output, check).split()[0]


def edit(connector, **changes):
    config = connector.config
    config.update(changes)
    connector.write_config(config)


def test_a_healthy_setup_passes_every_check(healthy, stub_bin):
    code, output = doctor(healthy, stub_bin)
    assert code == 0, output
    for check in ("config", "state_dir", "moonraker", "klippy", "webcam", "cloud", "clock", "credentials", "service"):
        assert status(output, check) == "ok", output
    assert "0 failed" in output
    assert 'msg="Heartbeat sent"' in output  # the service's latest log lines


def test_doctor_never_prints_the_secret(healthy, stub_bin):
    code, output = doctor(healthy, stub_bin)
    assert healthy.config["connector_secret"] not in output


def test_doctor_does_not_consume_a_pairing_token(cloud, printer, make_connector, stub_bin):
    connector = make_connector(unpaired_config(cloud, printer))
    registrations = len(cloud.registrations)
    code, output = doctor(connector, stub_bin)
    assert status(output, "pairing") == "ok"
    assert connector.config["pairing_token"] not in output
    assert len(cloud.registrations) == registrations
    assert connector.run("--once") == 0  # the token still works


def test_an_invalid_config_fails_with_the_field(healthy, stub_bin):
    edit(healthy, heartbeat_seconds=-5)
    code, output = doctor(healthy, stub_bin)
    assert code == 1 and status(output, "config") == "fail"
    assert "heartbeat_seconds" in line(output, "config")


def test_a_readable_config_fails_with_chmod_as_the_fix(healthy, stub_bin):
    os.chmod(healthy.config_path, 0o644)
    code, output = doctor(healthy, stub_bin)
    assert code == 1 and status(output, "config") == "fail"
    assert "chmod 600" in output


def test_a_config_owned_by_another_user_than_the_service_warns(healthy, stub_bin):
    code, output = doctor(healthy, stub_bin, STUB_USER="pi")
    assert status(output, "config") == "warn" and "chown pi" in output


def test_an_unwritable_state_dir_fails(healthy, stub_bin, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("file")
    edit(healthy, state_dir=str(blocker / "state"))
    code, output = doctor(healthy, stub_bin)
    assert code == 1 and status(output, "state_dir") == "fail"


def test_moonraker_down_fails_with_how_to_start_it(cloud, own_printer, make_connector, stub_bin):
    connector = make_connector(unpaired_config(cloud, own_printer))
    assert connector.run("--once") == 0
    own_printer.stop()
    code, output = doctor(connector, stub_bin)
    assert code == 1 and status(output, "moonraker") == "fail"
    assert "connection refused" in line(output, "moonraker") and "systemctl start moonraker" in output


def test_a_moonraker_that_wants_an_api_key_says_so(cloud, make_connector, stub_bin):
    with PrinterSimulator(api_key="k" * 32) as keyed:
        connector = make_connector(unpaired_config(cloud, keyed))
        code, output = doctor(connector, stub_bin)
        assert status(output, "moonraker") == "fail" and "set api_key" in output
        edit(connector, moonraker=[{"printer_id": 0, "base_url": keyed.url, "ui_port": keyed.ui_port,
                                    "api_key": "wrong"}])
        code, output = doctor(connector, stub_bin)
        assert status(output, "moonraker") == "fail" and "the api_key is wrong" in output
        edit(connector, moonraker=[{"printer_id": 0, "base_url": keyed.url, "ui_port": keyed.ui_port,
                                    "api_key": "k" * 32}])
        code, output = doctor(connector, stub_bin)
        assert status(output, "moonraker") == "ok"


def test_klippy_not_ready_warns(healthy, printer, stub_bin):
    printer.set_klippy(False)
    code, output = doctor(healthy, stub_bin)
    assert status(output, "klippy") == "warn"


def test_no_webcam_warns(cloud, own_printer, make_connector, stub_bin):
    own_printer.set_webcams([])
    own_printer.set_webcam_image(b"<html></html>", content_type="text/html")
    connector = make_connector(unpaired_config(cloud, own_printer))
    code, output = doctor(connector, stub_bin)
    assert status(output, "webcam") == "warn" and "not an image" in output


def test_an_unresolvable_cloud_fails(healthy, stub_bin):
    edit(healthy, cloud_url="http://no-such-host.invalid")
    code, output = doctor(healthy, stub_bin)
    assert code == 1 and status(output, "cloud") == "fail" and "does not resolve" in output


def test_a_cloud_that_refuses_connections_fails(healthy, stub_bin):
    edit(healthy, cloud_url="http://127.0.0.1:9")
    code, output = doctor(healthy, stub_bin)
    assert status(output, "cloud") == "fail" and "connection refused" in line(output, "cloud")


class DatedHandler(BaseHTTPRequestHandler):
    date = None

    def do_GET(self):
        self.send_response_only(404)
        self.send_header("Date", self.date)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def serve(handler, tls_cert=None):
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    if tls_cert:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls_cert)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_wrong_clock_fails(healthy, stub_bin):
    DatedHandler.date = formatdate(1_000_000_000, usegmt=True)  # 2001
    server = serve(DatedHandler)
    try:
        edit(healthy, cloud_url="http://127.0.0.1:%d" % server.server_address[1])
        code, output = doctor(healthy, stub_bin)
    finally:
        server.shutdown()
    assert status(output, "clock") == "fail" and "timedatectl" in output


def test_an_untrusted_certificate_fails(healthy, stub_bin, tmp_path):
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    DatedHandler.date = formatdate(usegmt=True)
    server = serve(DatedHandler, tls_cert=(cert, key))
    try:
        edit(healthy, cloud_url="https://127.0.0.1:%d" % server.server_address[1])
        code, output = doctor(healthy, stub_bin)
    finally:
        server.shutdown()
    assert status(output, "cloud") == "fail" and "certificate" in line(output, "cloud")


def test_rejected_credentials_fail_with_how_to_pair_again(healthy, cloud, stub_bin):
    cloud.set_fault("401", endpoint="heartbeat")
    code, output = doctor(healthy, stub_bin)
    assert code == 1 and status(output, "credentials") == "fail" and "pair again" in output


def test_a_stopped_service_fails_with_how_to_start_it(healthy, stub_bin):
    code, output = doctor(healthy, stub_bin, STUB_ACTIVE="inactive")
    assert code == 1 and status(output, "service") == "fail"
    assert "systemctl enable --now printer-connector" in output


def test_a_version_that_disagrees_with_release_info_warns(healthy, stub_bin):
    release_info = healthy.config_path.parent / "release_info.json"
    release_info.write_text(json.dumps({"project_name": "printer-connector", "project_owner": "printdock",
                                        "version": "v0.0.1", "asset_name": "printer-connector-linux-amd64"}))
    code, output = doctor(healthy, stub_bin)
    assert status(output, "version") == "warn" and "update.sh" in output
    release_info.write_text(json.dumps({"version": "v%s" % connector_module.__version__}))
    code, output = doctor(healthy, stub_bin)
    assert status(output, "version") == "ok"


# -- hostile peers ------------------------------------------------------------

API_KEY = "0123456789abcdef0123456789abcdef"
FORGED = "\nok    credentials forged\r\u2028ok    cloud forged\x1b[2K\x85ok    service forged"


def echoing_moonraker(exchange):
    """A Moonraker that quotes the caller's key back and puts fake doctor
    lines in every text it returns."""
    from rawserver import reply
    key = exchange.headers.get("x-api-key", "")
    if exchange.request_line.startswith("GET /server/info"):
        body = {"result": {"klippy_state": "ready" + FORGED, "moonraker_version": "v0.11 key=%s%s" % (key, FORGED)}}
        return reply(200, json.dumps(body).encode())
    body = {"error": {"code": 404, "message": "no such thing for key %s%s" % (key, FORGED)}}
    return reply(404, json.dumps(body).encode())


@pytest.fixture
def echoing(healthy):
    from rawserver import RawServer
    server = RawServer(echoing_moonraker)
    config = healthy.config
    config["moonraker"][0].update(base_url=server.url("").rstrip("/"), api_key=API_KEY)
    healthy.write_config(config)
    yield healthy
    server.stop()


def test_doctor_never_prints_an_api_key_that_moonraker_echoes(echoing, stub_bin):
    code, output = doctor(echoing, stub_bin)
    assert API_KEY not in output and "[redacted]" in output


def test_doctor_shows_peer_text_on_one_line_each(echoing, stub_bin):
    code, output = doctor(echoing, stub_bin)
    assert not any(ch in output for ch in "\r\x1b\x85\u2028")
    assert "forged" in output
    assert not [l for l in output.splitlines() if re.match(r"(ok|warn|fail)\s+\S+\s+forged", l)]


def test_the_doctors_log_view_shows_each_log_line_as_one_line(healthy, stub_bin):
    (stub_bin / "journalctl").write_text("#!/bin/sh\nprintf 'level=INFO msg=\"a\\342\\200\\250"
                                         "level=INFO msg=\\\\\"Pairing successful\\\\\"\\013x\\033[1Ay\\n'\n")
    code, output = doctor(healthy, stub_bin)
    view = output.split("latest log lines:\n", 1)[1].split("\n")
    shown = [l for l in view if l.startswith("        ")]
    assert len(shown) == 1 and "\\u2028" in shown[0] and "\\u000b" in shown[0] and "\\u001b" in shown[0]
    assert "\u2028" not in output and "\x0b" not in output and "\x1b" not in output
