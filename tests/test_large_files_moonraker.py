"""Large G-code files reach the real Moonraker 0.11 (PyPI) intact, both ways
(issue 15): through base64 `content` and through a presigned `url`, checked
by sha256 of the file in Moonraker's own gcodes folder. The 200 MB download
is here too: Moonraker streams uploads to disk, so it is the peer that can
take one, and the memory target of `url` is its point."""

import os

import pytest

from harness import Connector, unpaired_config
from moonraker_real import RealMoonraker
from sim.cloud import Base64File
from test_large_files import MB, MIB, completion, gcode_file, peak_rss, sha256_of, transfer_files


@pytest.fixture(scope="module")
def moonraker(tmp_path_factory):
    instance = RealMoonraker(tmp_path_factory.mktemp("moonraker-large"), trusted=True).start()
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def connector(cloud_server, moonraker, tmp_path_factory):
    connector = Connector(tmp_path_factory.mktemp("large-connector"), unpaired_config(cloud_server, moonraker))
    connector.start()
    connector.wait_log("Connector running")
    yield connector
    connector.kill()


def upload(cloud, connector, params, timeout=90):
    command_id = cloud.enqueue_command(connector.connector_id, connector.printer_id, "upload_file", params=params)
    return completion(cloud, command_id, timeout)


def test_content_reaches_moonraker_byte_for_byte(cloud, connector, moonraker, tmp_path):
    path = gcode_file(tmp_path, 3 * MB, "content.gcode")
    body = upload(cloud, connector, {"filename": "big/content.gcode", "content": Base64File(path, escape_slashes=True)})
    assert body["status"] == "succeeded", body
    assert sha256_of(os.path.join(moonraker.gcodes, "big", "content.gcode")) == sha256_of(path)


def test_a_200_mb_url_download_reaches_moonraker_intact_under_40_mib(cloud, connector, moonraker, tmp_path):
    path = gcode_file(tmp_path, 200 * MB, "huge.gcode")
    digest = sha256_of(path)
    body = upload(cloud, connector, {"filename": "huge.gcode", "url": cloud.add_download(path),
                                     "size": 200 * MB, "sha256": digest}, timeout=180)
    assert body["status"] == "succeeded", body
    assert body["result"]["sha256"] == digest
    assert peak_rss(connector) < 40 * MIB
    assert sha256_of(os.path.join(moonraker.gcodes, "huge.gcode")) == digest
    assert not transfer_files(connector)
