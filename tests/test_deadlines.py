"""Every exchange has a wall-clock deadline, checked against a real connector
process: a peer that trickles its answer a byte a second (so that no read
timeout ever trips) holds a loop no longer than that deadline."""

import io
import threading
import time

import pytest

import connector as agent
from harness import wait_until
from rawserver import RawServer, Trickle, reply

MARGIN = 10.0  # a poll interval, a backoff step and a loaded machine


def test_a_cloud_trickling_the_commands_answer_holds_the_commands_loop_only_until_the_deadline(cloud, paired):
    # The reference cloud speaks long-poll: the trickled answer is a held
    # poll's, whose deadline allows for the hold.
    deadline = agent.exchange_limits("held_poll", hold=agent.LONG_POLL_WAIT_SECONDS)["deadline"]
    cloud.set_fault("trickle", endpoint="commands", count=1)
    cloud.wait_for(lambda: any(h["mode"] == "trickle" for h in cloud.fault_hits), timeout=20)
    trickle_started = time.monotonic()
    command_id = cloud.enqueue_command(paired.connector_id, paired.printer_id, "sync_files")
    cloud.wait_for(lambda: cloud.completions_for(command_id), timeout=deadline + 2 * MARGIN)
    assert time.monotonic() - trickle_started < deadline + MARGIN
    paired.wait_log("no complete answer within the %g s deadline" % deadline)


def test_a_trickling_camera_holds_the_webcam_loop_only_until_the_deadline(cloud, paired, printer):
    before = len(printer.requests)
    printer.set_fault("trickle", endpoint="/webcam/", count=1)
    first = cloud.enqueue_webcam_request(paired.connector_id, paired.printer_id)
    wait_until(lambda: any(r["port"] == "ui" and r["path"].startswith("/webcam/") for r in printer.requests[before:]),
               timeout=20, message="the camera asked")
    trickle_started = time.monotonic()
    second = cloud.enqueue_webcam_request(paired.connector_id, paired.printer_id)
    cloud.wait_for(lambda: [u for u in cloud.webcam_uploads if u["id"] in (first, second)],
                   timeout=agent.EXCHANGES["webcam_fetch"].deadline + 2 * MARGIN)
    assert time.monotonic() - trickle_started < agent.EXCHANGES["webcam_fetch"].deadline + MARGIN


def test_a_backup_upload_to_a_trickling_presigned_url_ends_at_its_size_deadline(tmp_path, monkeypatch):
    monkeypatch.setattr(agent, "TRANSFER_BASE_SECONDS", 1.0)  # the deadline is read per upload
    storage = RawServer(lambda exchange: Trickle(reply(200, b""), interval=0.2))
    archive = tmp_path / "backup.tar.gz"
    archive.write_bytes(b"x" * 1000)
    printer = agent.PrinterConfig(base_url="http://127.0.0.1:1", printer_id=1)
    log = agent.Logger("debug", stream=io.StringIO())
    config = agent.Config(path=str(tmp_path / "c.json"), cloud_url="http://127.0.0.1:1", moonraker=[printer],
                          transfer_allow_hosts=[("127.0.0.1", None)],
                          state_dir=str(tmp_path))
    ctx = agent.ActionContext(agent.Moonraker(printer, log, "ua"), printer, config, log, threading.Event())
    started = time.monotonic()
    try:
        with pytest.raises(agent.CommandFailed, match="backup upload failed: .*deadline"):
            agent._upload_backup(ctx, storage.url("/bucket/b.tar.gz?X-Amz-Signature=x"), str(archive), 1000)
    finally:
        storage.stop()
    assert time.monotonic() - started < agent.transfer_deadline(1000) + 2.0
    assert len(storage.exchanges) == 1 and storage.exchanges[0].body == b"x" * 1000


def test_a_websocket_handshake_trickled_a_byte_at_a_time_ends_at_its_deadline(monkeypatch):
    monkeypatch.setitem(agent.EXCHANGES, "websocket_handshake", agent.ExchangeLimits(5.0, 5.0, 1.0))
    handshake = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    moonraker = RawServer(lambda exchange: Trickle(handshake, interval=0.2))
    started = time.monotonic()
    try:
        with pytest.raises(agent.ExchangeTimeout, match="websocket handshake: .*1 s deadline"):
            agent.open_websocket(moonraker.url("").rstrip("/"), ["User-Agent: test"])
    finally:
        moonraker.stop()
    assert time.monotonic() - started < 3.0
    assert moonraker.exchanges[0].request_line == "GET /websocket HTTP/1.1"
