"""Transfer URLs from the cloud (upload_file's `url`, create_backup's
`presigned_url`) cannot be turned against the printer they serve: one that
leads to a configured printer's Moonraker or web UI is refused, whatever
spelling or name leads there, and what a transfer URL answers in an error
reaches the cloud only as its status and S3 error code.

The unit specifications judge AddressGuard on this host's real resolver;
the integration tests run the connector as a real process against the
reference cloud and the printer simulator."""

import io
import socket

import pytest

import connector
from harness import completion, enqueue, unpaired_config
from rawserver import RawServer, reply


def run(cloud, running, action, params):
    return completion(cloud, enqueue(cloud, running, action, params))


def guard_for(base_url="http://127.0.0.1:7125", ui_port=80):
    config = connector.Config(path="/nonexistent/c.json", cloud_url="https://cloud.test",
                              moonraker=[connector.PrinterConfig(base_url=base_url, name="K1", ui_port=ui_port)])
    return connector.transfer_guard(config)


# -- which destinations are refused ---------------------------------------------

@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "LocalHost", "127.0.0.2", "::1", "0.0.0.0", "::",
                                  "2130706433", "0x7f000001", "0177.0.0.1", "::ffff:127.0.0.1"])
def test_every_spelling_of_this_host_on_the_moonraker_port_is_refused(host):
    with pytest.raises(connector.DestinationRefused, match="leads to printer K1's Moonraker"):
        guard_for().addresses(host, 7125)


def test_the_web_ui_port_is_refused_too():
    with pytest.raises(connector.DestinationRefused, match="printer K1's web UI"):
        guard_for(ui_port=8080).addresses("localhost", 8080)


def test_another_port_on_this_host_is_allowed():
    assert guard_for().addresses("127.0.0.1", 7126)


def test_a_remote_printer_is_refused_on_its_address_not_this_hosts():
    guard = guard_for(base_url="http://192.0.2.10:7125")
    with pytest.raises(connector.DestinationRefused):
        guard.addresses("192.0.2.10", 7125)
    assert guard.addresses("127.0.0.1", 7125)


def test_a_name_that_resolves_to_the_printer_only_at_the_connect_is_refused_then(monkeypatch):
    """DNS rebinding: the addresses the connection uses are the ones checked."""
    moonraker = RawServer()
    try:
        resolve = socket.getaddrinfo

        def rebinding(host, *args, **kwargs):
            return resolve("127.0.0.1" if host == "bucket.test" else host, *args, **kwargs)
        monkeypatch.setattr(socket, "getaddrinfo", rebinding)
        log = connector.Logger("debug", stream=io.StringIO())
        client = connector.HttpClient("http://bucket.test", {}, connector.generic_error_message, log, "url",
                                      guard_for(base_url=moonraker.url().rstrip("/")))
        with pytest.raises(connector.DestinationRefused):
            client.request("GET", "http://bucket.test:%d/server/files/config/moonraker.conf" % moonraker.port)
        assert moonraker.connections == 0
    finally:
        moonraker.stop()


# -- against the real process -----------------------------------------------------

def moonraker_urls(printer):
    """Each marked `stolen`, which no request of the connector's own has."""
    return ["http://127.0.0.1:%d/server/files/config/printer.cfg?stolen" % printer.port,
            "http://localhost:%d/server/files/config/printer.cfg?stolen" % printer.port,
            "http://2130706433:%d/server/files/config/printer.cfg?stolen" % printer.port,
            "http://127.0.0.1:%d/index.html?stolen" % printer.ui_port]


def test_a_download_url_that_leads_to_the_printer_is_refused_and_never_requested(cloud, paired, printer):
    for url in moonraker_urls(printer):
        before = len(printer.requests)
        body = run(cloud, paired, "upload_file", {"filename": "stolen.gcode", "url": url})
        assert body["status"] == "failed", (url, body)
        assert body["error_message"].startswith("download failed: url refused: "), (url, body)
        assert "leads to printer Sim's " in body["error_message"]
        assert not [r for r in printer.requests[before:] if "stolen" in r["path"]]
    assert "stolen.gcode" not in printer.files


@pytest.fixture
def printer_data(tmp_path):
    (tmp_path / "printer_data" / "config").mkdir(parents=True)
    (tmp_path / "printer_data" / "config" / "printer.cfg").write_text("[printer]\n")
    return tmp_path / "printer_data"


def test_a_backup_url_that_leads_to_the_printer_is_refused_and_nothing_is_put(cloud, printer, make_connector,
                                                                              printer_data):
    backing_up = make_connector(unpaired_config(cloud, printer, printer_data_root=str(printer_data))).start()
    backing_up.wait_log("Connector running")
    before = len(printer.requests)
    body = run(cloud, backing_up, "create_backup",
               {"backup_id": "b", "include": {"config": True}, "printer_data_root": str(printer_data),
                "presigned_url": "http://[::ffff:127.0.0.1]:%d/server/files/upload" % printer.port})
    assert body["status"] == "failed" and body["result"]["backup_id"] == "b", body
    assert body["error_message"].startswith("backup upload failed: presigned_url refused: "), body
    assert not [r for r in printer.requests[before:] if r["method"] == "PUT"]


# -- what an error answer may tell the cloud -------------------------------------

LAN_PAGE = b"<html><title>Router</title>admin password: hunter2</html>"


@pytest.mark.parametrize("answer, message", [
    (reply(500, LAN_PAGE, (("Content-Type", "text/html"),)), "url http 500: no S3 error code"),
    (reply(403, b"<Error><Code>AccessDenied</Code><Message>hunter2</Message></Error>",
           (("Content-Type", "application/xml"),)), "url http 403: AccessDenied"),
    (reply(404, b"<Error><Code>hunter2 is the password</Code></Error>", (("Content-Type", "application/xml"),)),
     "url http 404: no S3 error code"),
])
def test_a_failed_download_reports_only_its_status_and_s3_error_code(cloud, paired, answer, message):
    server = RawServer(lambda exchange: answer)
    try:
        body = run(cloud, paired, "upload_file", {"filename": "x.gcode", "url": server.url("/f.gcode")})
    finally:
        server.stop()
    assert body["status"] == "failed"
    assert body["error_message"] == "download failed: " + message
    assert "hunter2" not in paired.log
