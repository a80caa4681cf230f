"""G-code files of any size (issue 15), end to end with the connector as a
real process: upload_file through base64 `content` (the commands answer
read as a stream, never whole in memory) and through a presigned `url`, the
memory each costs, the limits of free disk, and that every command in an
answer gets its completion whatever the size of the one beside it.

Files are generated in tmp for each test, never committed; the big sizes
(50 MB, 200 MB) appear only where the memory target is the point. The
200 MB `url` download and the files checked on the real Moonraker's disk are
in test_large_files_moonraker.py; the download that trickles, whose
deadline is a minute in service, is in test_transfers.py.
"""

import hashlib
import os
import signal
import subprocess
import sys

import pytest

from harness import ROOT, unpaired_config, wait_until
from sim.cloud import Base64File

sys.path.insert(0, os.path.join(ROOT, "bench"))
import procfs  # noqa: E402

MIB = 1024 * 1024
MB = 1000 * 1000


def gcode_file(folder, size, name="part.gcode"):
    """size bytes of G-code-like text (plus a tail of every byte value), made on the fly."""
    path = os.path.join(str(folder), name)
    line = b"G1 X10.000 Y20.000 E0.04000 F1800 ; %s\n" % name.encode()
    tail = bytes(range(256))
    with open(path, "wb") as handle:
        body = size - len(tail)
        block = line * (1024 * 1024 // len(line))
        while body > 0:
            handle.write(block[:body])
            body -= min(body, len(block))
        handle.write(tail)
    return path


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


def peak_rss(connector):
    """Peak RSS of the connector's whole process tree (a frozen binary has
    launcher processes): see procfs.transfer_peak_bytes."""
    return procfs.transfer_peak_bytes(connector.proc.pid)


def completion(cloud, command_id, timeout=60):
    return cloud.wait_for(lambda: cloud.completions_for(command_id), timeout)[-1]["body"]


def enqueue_together(cloud, connector, commands):
    """Queues commands so that one poll answer holds them all."""
    with cloud._lock:  # the commands endpoint takes the same lock
        return [cloud.enqueue_command(connector.connector_id, connector.printer_id, action, params=params)
                for action, params in commands]


def transfer_files(connector):
    if not connector.state_dir.exists():
        return []
    return sorted(name for name in os.listdir(str(connector.state_dir)) if name.startswith(".transfer-"))


def upload(cloud, connector, params, timeout=60):
    command_id = cloud.enqueue_command(connector.connector_id, connector.printer_id, "upload_file", params=params)
    return completion(cloud, command_id, timeout)


# -- content: base64 in the command --------------------------------------------

def test_a_6_mb_file_in_content_arrives_intact(cloud, paired, printer, tmp_path):
    path = gcode_file(tmp_path, 6 * MB)
    body = upload(cloud, paired, {"filename": "big/six.gcode", "content": Base64File(path)})
    assert body["status"] == "succeeded", body
    assert body["result"]["size"] == 6 * MB
    assert hashlib.sha256(printer.files["big/six.gcode"]).hexdigest() == sha256_of(path)


def test_a_6_mb_file_in_content_costs_the_connector_under_40_mib(cloud, paired, printer, tmp_path):
    path = gcode_file(tmp_path, 6 * MB)
    assert upload(cloud, paired, {"filename": "six.gcode", "content": Base64File(path)})["status"] == "succeeded"
    assert peak_rss(paired) < 40 * MIB


def test_a_50_mb_file_in_content_costs_the_connector_under_80_mib(cloud, paired, printer, tmp_path):
    path = gcode_file(tmp_path, 50 * MB)
    body = upload(cloud, paired, {"filename": "fifty.gcode", "content": Base64File(path)}, timeout=120)
    assert body["status"] == "succeeded", body
    assert peak_rss(paired) < 80 * MIB
    assert len(printer.files["fifty.gcode"]) == 50 * MB


def test_content_with_escaped_slashes_decodes_to_the_same_bytes(cloud, paired, printer, tmp_path):
    # PHP's json_encode writes every "/" of the base64 as "\/".
    path = gcode_file(tmp_path, 300 * 1000)
    body = upload(cloud, paired, {"filename": "php.gcode", "content": Base64File(path, escape_slashes=True)})
    assert body["status"] == "succeeded", body
    assert hashlib.sha256(printer.files["php.gcode"]).hexdigest() == sha256_of(path)


def test_a_pause_in_the_same_answer_as_a_large_upload_completes(cloud, paired, printer, tmp_path):
    printer.add_file("running.gcode")
    printer.set_state("printing", filename="running.gcode")
    path = gcode_file(tmp_path, 6 * MB)
    upload_id, pause_id = enqueue_together(cloud, paired, [
        ("upload_file", {"filename": "next.gcode", "content": Base64File(path)}), ("pause", None)])
    assert completion(cloud, upload_id)["status"] == "succeeded"
    assert completion(cloud, pause_id)["status"] == "succeeded"
    assert printer.state == "paused"


def test_bad_base64_in_a_long_content_fails_that_command_only(cloud, paired, printer, tmp_path):
    bad = tmp_path / "bad.b64"
    bad.write_bytes(b"QUJD" * 100000 + b"!!!!")
    content = Base64File(str(bad), encoded=True)
    bad_id, sync_id = enqueue_together(cloud, paired, [
        ("upload_file", {"filename": "bad.gcode", "content": content}), ("sync_files", None)])
    body = completion(cloud, bad_id)
    assert body["status"] == "failed" and body["error_message"] == "invalid param 'content': not valid base64"
    assert completion(cloud, sync_id)["status"] == "succeeded"
    assert "bad.gcode" not in printer.files


def test_an_answer_that_is_not_json_is_logged_with_its_size(cloud, paired):
    cloud.set_fault("notjson", "commands", count=1)
    paired.wait_log(r'commands failed.*expected JSON, got application/json \(8 bytes\)')


@pytest.fixture
def small_disk(tmp_path):
    """A state_dir on an 8 MB tmpfs of the test's own."""
    folder = tmp_path / "smalldisk"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)], check=True)
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


def test_content_too_large_for_the_free_disk_fails_naming_the_limit_and_the_free_space(
        cloud, printer, make_connector, small_disk, tmp_path):
    connector = make_connector(unpaired_config(cloud, printer, state_dir=str(small_disk / "state"))).start()
    connector.wait_log("Connector running")
    path = gcode_file(tmp_path, 10 * MB)
    small = gcode_file(tmp_path, 100 * 1000, "small.gcode")
    big_id, small_id, sync_id = enqueue_together(cloud, connector, [
        ("upload_file", {"filename": "huge.gcode", "content": Base64File(path)}),
        ("upload_file", {"filename": "small.gcode", "content": Base64File(small)}),
        ("sync_files", None)])
    body = completion(cloud, big_id)
    assert body["status"] == "failed"
    message = body["error_message"]
    assert message.startswith("param 'content' (13333336 bytes of base64) too large for this printer's free disk")
    assert "limit" in message and "free in %s" % (small_disk / "state") in message
    assert completion(cloud, small_id)["status"] == "succeeded"
    assert completion(cloud, sync_id)["status"] == "succeeded"
    assert "huge.gcode" not in printer.files and len(printer.files["small.gcode"]) == 100 * 1000
    wait_until(lambda: not transfer_files(connector), message="no transfer file left")


def test_a_declared_size_over_the_free_disk_fails_before_downloading(cloud, paired, tmp_path):
    url = cloud.add_download(gcode_file(tmp_path, 1000))
    body = upload(cloud, paired, {"filename": "x.gcode", "url": url, "size": 10 ** 15})
    assert body["status"] == "failed"
    assert body["error_message"].startswith("file too large for this printer's free disk: 1000000000000000 bytes, "
                                            "limit ")
    assert cloud.download_hits(url) == 0


# -- url: a presigned download ---------------------------------------------------

def test_a_url_download_arrives_intact_with_its_sha256(cloud, paired, printer, tmp_path):
    path = gcode_file(tmp_path, 2 * MB)
    body = upload(cloud, paired, {"filename": "dl/part.gcode", "url": cloud.add_download(path),
                                  "size": 2 * MB, "sha256": sha256_of(path)})
    assert body["status"] == "succeeded", body
    assert body["result"]["size"] == 2 * MB and body["result"]["sha256"] == sha256_of(path)
    assert hashlib.sha256(printer.files["dl/part.gcode"]).hexdigest() == sha256_of(path)
    assert not transfer_files(paired)


def test_a_wrong_sha256_fails_and_nothing_reaches_moonraker(cloud, paired, printer, tmp_path):
    path = gcode_file(tmp_path, 200 * 1000)
    body = upload(cloud, paired, {"filename": "corrupt.gcode", "url": cloud.add_download(path),
                                  "sha256": "0" * 64})
    assert body["status"] == "failed"
    assert body["error_message"] == "download corrupt: sha256 %s, expected %s" % (sha256_of(path), "0" * 64)
    assert "corrupt.gcode" not in printer.files
    assert not transfer_files(paired)


def test_a_truncated_download_fails(cloud, paired, printer, tmp_path):
    url = cloud.add_download(gcode_file(tmp_path, 400 * 1000), mode="truncate")
    body = upload(cloud, paired, {"filename": "cut.gcode", "url": url})
    assert body["status"] == "failed" and body["error_message"].startswith("download failed: url "), body
    assert "cut.gcode" not in printer.files


def test_a_download_shorter_than_its_declared_size_fails(cloud, paired, printer, tmp_path):
    url = cloud.add_download(gcode_file(tmp_path, 1000))
    body = upload(cloud, paired, {"filename": "short.gcode", "url": url, "size": 2000})
    assert body["status"] == "failed"
    assert body["error_message"] == "download incomplete: got 1000 of 2000 bytes"


def test_a_redirect_is_not_followed(cloud, paired, printer, tmp_path):
    url = cloud.add_download(gcode_file(tmp_path, 1000), mode="redirect")
    body = upload(cloud, paired, {"filename": "moved.gcode", "url": url})
    assert body["status"] == "failed"
    assert body["error_message"] == "download failed: the url answered 302 (a redirect); redirects are not followed"
    assert cloud.download_hits(url) == 1


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/x.gcode", "http:///nohost", 42])
def test_a_url_that_is_not_http_is_refused_without_a_request(cloud, paired, url):
    before = len(cloud.requests)
    body = upload(cloud, paired, {"filename": "x.gcode", "url": url})
    assert body["status"] == "failed" and body["error_message"] == "missing or invalid param 'url' (an http(s) URL)"
    assert not [r for r in cloud.requests[before:] if r["endpoint"] == "download"]


def test_an_expired_url_fails_with_the_storage_message(cloud, paired, tmp_path):
    url = cloud.add_download(gcode_file(tmp_path, 1000), expires_in=-1)
    body = upload(cloud, paired, {"filename": "late.gcode", "url": url})
    assert body["status"] == "failed"
    assert body["error_message"] == "download failed: url http 403: AccessDenied"


def test_the_url_is_not_logged(cloud, paired, tmp_path):
    url = cloud.add_download(gcode_file(tmp_path, 1000))
    assert upload(cloud, paired, {"filename": "quiet.gcode", "url": url})["status"] == "succeeded"
    assert "signature" not in paired.log


# -- start: true -----------------------------------------------------------------

def test_start_true_starts_the_uploaded_file(cloud, paired, printer, tmp_path):
    path = gcode_file(tmp_path, 1000)
    body = upload(cloud, paired, {"filename": "go.gcode", "url": cloud.add_download(path), "start": True})
    assert body["status"] == "succeeded", body
    assert body["result"]["started"] is True
    assert printer.state == "printing"


def test_start_true_while_printing_keeps_the_file_and_says_it_did_not_start(cloud, paired, printer, tmp_path):
    printer.add_file("busy.gcode")
    printer.set_state("printing", filename="busy.gcode")
    body = upload(cloud, paired, {"filename": "later.gcode", "url": cloud.add_download(gcode_file(tmp_path, 1000)),
                                  "start": True})
    assert body["status"] == "failed" and body["result"]["started"] is False
    assert body["error_message"].startswith("moonraker http ")
    assert "later.gcode" in printer.files


def test_start_must_be_a_boolean(cloud, paired, printer):
    body = upload(cloud, paired, {"filename": "x.gcode", "content": "RzI4", "start": "yes"})
    assert body["status"] == "failed" and body["error_message"] == "invalid param 'start': must be true or false"
    assert "x.gcode" not in printer.files


# -- temp files ------------------------------------------------------------------

def test_sigterm_during_a_download_fails_the_command_and_removes_its_files(cloud, paired, tmp_path):
    url = cloud.add_download(gcode_file(tmp_path, 200 * 1000), mode="trickle:20000")
    command_id = cloud.enqueue_command(paired.connector_id, paired.printer_id, "upload_file",
                                       params={"filename": "stop.gcode", "url": url})
    wait_until(lambda: transfer_files(paired), message="a transfer file in state_dir")
    paired.proc.send_signal(signal.SIGTERM)
    assert paired.proc.wait(15) == 0
    body = completion(cloud, command_id)
    assert body["status"] == "failed" and body["error_message"] == "download interrupted: the connector is stopping"
    assert not transfer_files(paired)


def test_transfer_files_a_killed_run_left_are_removed_at_the_next_start(cloud, paired, tmp_path):
    url = cloud.add_download(gcode_file(tmp_path, 200 * 1000), mode="trickle:20000")
    cloud.enqueue_command(paired.connector_id, paired.printer_id, "upload_file",
                          params={"filename": "killed.gcode", "url": url})
    wait_until(lambda: transfer_files(paired), message="a transfer file in state_dir")
    paired.kill()
    assert transfer_files(paired)
    paired.start()
    paired.wait_log("Removed transfer files a previous run left")
    assert not transfer_files(paired)
