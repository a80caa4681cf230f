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
import threading

import pytest

import connector
from harness import completion, enqueue, unpaired_config
from rawserver import RawServer, reply


def run(cloud, running, action, params):
    return completion(cloud, enqueue(cloud, running, action, params))


def guard_for(base_url="http://127.0.0.1:7125", ui_port=80, allow=(("127.0.0.1", None),),
              cloud_url="https://cloud.test"):
    """The guard of a config whose owner lets transfers reach `allow`."""
    config = connector.Config(path="/nonexistent/c.json", cloud_url=cloud_url,
                              moonraker=[connector.PrinterConfig(base_url=base_url, name="K1", ui_port=ui_port)],
                              transfer_allow_hosts=list(allow))
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


def test_another_port_on_this_host_is_allowed_when_the_owner_allows_this_host():
    assert guard_for().addresses("127.0.0.1", 7126)


def test_a_remote_printer_is_refused_on_its_address_not_this_hosts():
    guard = guard_for(base_url="http://192.0.2.10:7125", allow=(("127.0.0.1", None), ("192.0.2.10", None)))
    with pytest.raises(connector.DestinationRefused):
        guard.addresses("192.0.2.10", 7125)
    assert guard.addresses("127.0.0.1", 7125)


def rebinding_client(monkeypatch, guard):
    """A client whose resolver answers loopback for bucket.test, at the connect
    (DNS rebinding: the addresses the connection uses are the ones checked)."""
    resolve = socket.getaddrinfo

    def rebinding(host, *args, **kwargs):
        return resolve("127.0.0.1" if host == "bucket.test" else host, *args, **kwargs)
    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    log = connector.Logger("debug", stream=io.StringIO())
    return connector.HttpClient("http://bucket.test", {}, connector.generic_error_message, log, "url", guard)


def test_a_name_that_resolves_to_the_printer_only_at_the_connect_is_refused_then(monkeypatch):
    moonraker = RawServer()
    try:
        client = rebinding_client(monkeypatch, guard_for(base_url=moonraker.url().rstrip("/")))
        with pytest.raises(connector.DestinationRefused):
            client.request("GET", "http://bucket.test:%d/server/files/config/moonraker.conf" % moonraker.port)
        assert moonraker.connections == 0
    finally:
        moonraker.stop()


# -- the owner's network: private addresses ------------------------------------------

@pytest.mark.parametrize("address", [
    "10.1.2.3", "172.16.5.4", "192.168.1.1", "127.0.0.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
    "224.0.0.251", "255.255.255.255", "198.18.0.1", "::1", "::", "fe80::1", "fe80::1%2", "fc00::1", "fd12:3456::1",
    "fec0::1", "ff02::1", "::ffff:192.168.1.1", "2002:c0a8:101::1", "64:ff9b::a00:1", "::a00:1", "::8.8.8.8",
    "::ffff:0:a00:1", "64:ff9b:1::808:808"])
def test_an_address_on_this_host_the_lan_or_a_carrier_nat_is_not_public(address):
    assert not connector.is_public_address(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "52.95.110.1", "2606:4700:4700::1111",
                                     "::ffff:8.8.8.8", "2002:808:808::1", "64:ff9b::808:808"])
def test_an_address_on_the_internet_is_public(address):
    assert connector.is_public_address(address)


@pytest.mark.parametrize("host", ["192.168.1.1", "10.0.0.1", "169.254.169.254", "localhost", "127.0.0.1", "[::1]",
                                  "fd00::1"])
def test_a_transfer_url_to_a_private_address_is_refused_by_default(host):
    with pytest.raises(connector.DestinationRefused, match="a private address .*transfer_allow_hosts"):
        guard_for(allow=()).addresses(host.strip("[]"), 8080)


def test_a_host_the_owner_allows_may_be_reached_on_any_port_or_only_the_one_named():
    guard = guard_for(allow=(("127.0.0.1", None), ("localhost", 9000)))
    assert guard.addresses("127.0.0.1", 8080)
    assert guard.addresses("localhost", 9000)
    with pytest.raises(connector.DestinationRefused, match="a private address"):
        guard.addresses("localhost", 9001)


def test_the_clouds_own_host_and_port_may_be_private():
    """A self-hosted cloud on the LAN serves its downloads itself."""
    guard = guard_for(allow=(), cloud_url="http://127.0.0.1:8000")
    assert guard.addresses("127.0.0.1", 8000)
    with pytest.raises(connector.DestinationRefused, match="a private address"):
        guard.addresses("127.0.0.1", 8001)


def test_a_cloud_named_by_a_name_gets_no_exception_for_its_host(monkeypatch):
    """Whoever runs the cloud's DNS could point its name at the owner's router."""
    resolve = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *args, **kwargs: resolve(
        "127.0.0.1" if host == "cloud.test" else host, *args, **kwargs))
    with pytest.raises(connector.DestinationRefused, match="cloud.test port 443 leads to 127.0.0.1, a private"):
        guard_for(allow=(), cloud_url="https://cloud.test").addresses("cloud.test", 443)


def test_the_printers_stay_refused_on_a_host_the_owner_allows():
    with pytest.raises(connector.DestinationRefused, match="leads to printer K1's Moonraker"):
        guard_for(allow=(("127.0.0.1", None),)).addresses("127.0.0.1", 7125)


def test_a_name_that_resolves_to_a_private_address_at_the_connect_is_refused_then(monkeypatch):
    lan = RawServer()
    try:
        client = rebinding_client(monkeypatch, guard_for(allow=()))
        with pytest.raises(connector.DestinationRefused, match="bucket.test port %d leads to 127.0.0.1, a private"
                           % lan.port):
            client.request("GET", "http://bucket.test:%d/router/admin" % lan.port)
        assert lan.connections == 0
    finally:
        lan.stop()


def test_behind_a_proxy_a_name_this_host_cannot_resolve_is_refused_before_the_proxy_is_asked(monkeypatch):
    proxy = RawServer()
    try:
        monkeypatch.setenv("http_proxy", proxy.url("").rstrip("/"))
        log = connector.Logger("debug", stream=io.StringIO())
        client = connector.HttpClient("http://intranet.invalid", {}, connector.generic_error_message, log, "url",
                                      guard_for(allow=()))
        with pytest.raises(connector.DestinationRefused, match="does not resolve here"):
            client.request("GET", "http://intranet.invalid/admin")
        assert proxy.connections == 0
    finally:
        proxy.stop()


def download_context(tmp_path, allow):
    printer = connector.PrinterConfig(base_url="http://127.0.0.1:1", printer_id=1)
    log = connector.Logger("debug", stream=io.StringIO())
    config = connector.Config(path=str(tmp_path / "c.json"), cloud_url="https://cloud.test", moonraker=[printer],
                              state_dir=str(tmp_path), transfer_allow_hosts=list(allow))
    return connector.ActionContext(connector.Moonraker(printer, log, "ua"), printer, config, log, threading.Event())


def test_a_redirect_from_an_allowed_host_to_a_private_one_is_not_followed(tmp_path):
    lan = RawServer(lambda exchange: reply(200, b"router config"))
    storage = RawServer(lambda exchange: reply(302, b"", (("Location", lan.url("/config.bin")),)))
    ctx = download_context(tmp_path, [("127.0.0.1", storage.port)])
    try:
        with connector.TransferFile(str(tmp_path), "download") as local:
            with pytest.raises(connector.CommandFailed, match="answered 302 .*redirects are not followed"):
                connector._download_file(ctx, {"url": storage.url("/f.gcode")}, local, {})
    finally:
        lan.stop()
        storage.stop()
    assert len(storage.exchanges) == 1 and lan.connections == 0


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


def test_a_connector_refuses_a_download_from_its_owners_network_and_takes_one_from_the_cloud(
        cloud, printer, make_connector, tmp_path):
    lan = RawServer(lambda exchange: reply(200, b"G28 ; a router's config page\n"))
    try:
        strict = make_connector(unpaired_config(cloud, printer, transfer_allow_hosts=[])).start()
        strict.wait_log("Connector running")
        body = run(cloud, strict, "upload_file", {"filename": "lan.gcode", "url": lan.url("/admin/config")})
        assert body["status"] == "failed", body
        assert body["error_message"] == ("download failed: url refused: 127.0.0.1 port %d leads to 127.0.0.1, a "
                                         "private address (a transfer URL may reach only public addresses unless "
                                         "the config's transfer_allow_hosts names its host)" % lan.port)
        assert lan.connections == 0 and "lan.gcode" not in printer.files
        source = tmp_path / "from-cloud.gcode"
        source.write_bytes(b"G28\n")
        body = run(cloud, strict, "upload_file", {"filename": "cloud.gcode", "url": cloud.add_download(str(source))})
        assert body["status"] == "succeeded", body
    finally:
        lan.stop()
