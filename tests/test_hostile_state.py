"""Hostile and broken state: whatever state_dir or the config holds, the
connector starts, in bounded time and memory, follows no link, and keeps its
ledger and outbox bounded in bytes (issue 14 items 1, 2, 6, 7, 10)."""

import io
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc

import pytest

import connector
from fakes import AnsweringClients, FakeCloud


@pytest.fixture
def stream():
    return io.StringIO()


@pytest.fixture
def log(stream):
    return connector.Logger("debug", stream=stream)


def ledger_path(tmp_path):
    return tmp_path / "commands.jsonl"


def write_ledger(tmp_path, data):
    ledger_path(tmp_path).write_bytes(data)


def pause_done(command_id="ok"):
    return (b'{"id":"%s","state":"running","t":1.0,"action":"pause","printer_id":1}\n'
            b'{"id":"%s","state":"done","completion":{"status":"succeeded","result":{"action":"pause"}}}\n'
            % (command_id.encode(), command_id.encode()))


def loaded_within(tmp_path, log, seconds=5.0, max_peak_bytes=None):
    """The ledger, loaded in `seconds` (and, if given, at most `max_peak_bytes`
    of Python memory at its peak, measured with tracemalloc, which is slow)."""
    if max_peak_bytes:
        tracemalloc.start()
    started = time.monotonic()
    try:
        ledger = connector.Ledger(str(tmp_path), log)
        elapsed = time.monotonic() - started
        peak = tracemalloc.get_traced_memory()[1] if max_peak_bytes else 0
    finally:
        tracemalloc.stop()
    assert elapsed < seconds * (4 if max_peak_bytes else 1), "loading took %.1f s" % elapsed
    assert not max_peak_bytes or peak < max_peak_bytes, "loading peaked at %d bytes" % peak
    return ledger


def warnings_about_corrupt_records(stream):
    return [line for line in stream.getvalue().splitlines() if "corrupt records" in line]


# -- item 1: no state file stops the start ------------------------------------

def test_a_ledger_record_nested_990_deep_is_skipped(tmp_path, log):
    write_ledger(tmp_path, pause_done() + b'{"id":"deep","state":"running","action":' + b"[" * 990 + b"]" * 990
                 + b"}\n")
    ledger = loaded_within(tmp_path, log)
    assert ledger.get("ok")["state"] == "done" and ledger.get("deep") is None


def test_a_60_mb_line_is_skipped_without_being_held_in_memory(tmp_path, log, stream):
    with open(ledger_path(tmp_path), "wb") as handle:
        handle.write(pause_done("before"))
        handle.write(b'{"id":"huge","state":"running","action":"')
        chunk = b"x" * (1024 * 1024)
        for _ in range(60):
            handle.write(chunk)
        handle.write(b'"}\n')
        handle.write(pause_done("after"))
    ledger = loaded_within(tmp_path, log, max_peak_bytes=3 * connector.STATE_RECORD_MAX_BYTES)
    assert ledger.get("before") and ledger.get("after") and ledger.get("huge") is None
    assert "skipped=1" in warnings_about_corrupt_records(stream)[0]


def test_300k_corrupt_lines_load_in_seconds_with_one_warning(tmp_path, log, stream):
    write_ledger(tmp_path, pause_done() + b'{"id": broken\n' * 300000 + pause_done("last"))
    ledger = loaded_within(tmp_path, log)
    assert ledger.get("ok") and ledger.get("last")
    assert len(warnings_about_corrupt_records(stream)) == 1
    assert "skipped=300000" in warnings_about_corrupt_records(stream)[0]


def test_binary_junk_in_the_ledger_is_skipped(tmp_path, log):
    write_ledger(tmp_path, bytes(range(256)) * 64 + b"\n\xff\xfe{\x00\n" + pause_done())
    assert loaded_within(tmp_path, log).get("ok")["state"] == "done"


@pytest.mark.parametrize("line", [
    b'{"id":"x","state":"done"}',  # done without a completion
    b'{"id":"x","state":"done","completion":7}',
    b'{"id":"x","state":"dancing"}',
    b'{"id":["x"],"state":"running"}',
    b'{"id":"x","state":"running","t":"yesterday"}',
    b'{"id":"%s","state":"running"}' % (b"9" * 5000),
    b'{"id":"a\\u2028b","state":"running"}',
    b'[1,2,3]',
    b'{"id":"x","state":"running","t":1e999}',
])
def test_a_ledger_record_of_the_wrong_shape_is_skipped_and_the_rest_loads(tmp_path, log, line):
    write_ledger(tmp_path, line + b"\n" + pause_done())
    ledger = loaded_within(tmp_path, log)
    assert ledger.get("ok")["state"] == "done"
    ledger.start("next", "pause", 1)
    assert connector.Ledger(str(tmp_path), log).get("next")["state"] == "running"


def test_a_torn_last_line_does_not_swallow_the_next_record(tmp_path, log):
    write_ledger(tmp_path, pause_done() + b'{"id":"torn","state":"runn')
    ledger = connector.Ledger(str(tmp_path), log)
    ledger.start("next", "pause", 1)
    assert connector.Ledger(str(tmp_path), log).get("next")["state"] == "running"


def test_a_fifo_in_place_of_the_ledger_is_moved_aside_without_blocking(tmp_path, log, stream):
    os.mkfifo(str(ledger_path(tmp_path)))
    ledger = loaded_within(tmp_path, log)
    ledger.start("1", "pause", 1)
    assert stat.S_ISREG(os.lstat(str(ledger_path(tmp_path))).st_mode)
    assert "moved it aside" in stream.getvalue()


def test_a_folder_in_place_of_the_ledger_is_moved_aside(tmp_path, log):
    ledger_path(tmp_path).mkdir()
    (ledger_path(tmp_path) / "inside").write_text("kept")
    ledger = loaded_within(tmp_path, log)
    ledger.start("1", "pause", 1)
    assert connector.Ledger(str(tmp_path), log).get("1")["state"] == "running"
    assert [p.name.split("-")[0] for p in tmp_path.iterdir() if "refused" in p.name] == ["commands.jsonl.refused"]


# -- item 10: no link is followed, files are 0600 ------------------------------

def test_a_symlinked_ledger_is_neither_read_nor_written_through(tmp_path, log):
    target = tmp_path / "elsewhere"
    target.write_bytes(pause_done("planted"))
    os.symlink(str(target), str(ledger_path(tmp_path)))
    ledger = connector.Ledger(str(tmp_path), log)
    ledger.start("1", "pause", 1)
    assert ledger.get("planted") is None
    assert target.read_bytes() == pause_done("planted")
    assert not os.path.islink(str(ledger_path(tmp_path)))


def test_a_symlinked_outbox_segment_is_not_appended_through(tmp_path, log):
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    os.symlink(str(target), str(tmp_path / "snapshots-00000001.jsonl"))
    spill = connector.SnapshotSpill(str(tmp_path), log)
    spill.add([{"printer_id": 1, "captured_at": "2026-01-01T00:00:00Z", "payload": {}}])
    assert target.read_bytes() == b""
    assert spill.count() == 1


def test_state_files_are_created_0600(tmp_path, log):
    connector.Ledger(str(tmp_path), log).start("1", "pause", 1)
    connector.SnapshotSpill(str(tmp_path), log).add([{"printer_id": 1, "payload": {}}])
    modes = {p.name: stat.S_IMODE(os.lstat(str(p)).st_mode) for p in tmp_path.iterdir()}
    assert modes and set(modes.values()) == {0o600}, modes


def test_a_ledger_left_0644_is_made_0600(tmp_path, log):
    write_ledger(tmp_path, pause_done())
    os.chmod(str(ledger_path(tmp_path)), 0o644)
    connector.Ledger(str(tmp_path), log).start("1", "pause", 1)
    assert stat.S_IMODE(os.lstat(str(ledger_path(tmp_path))).st_mode) == 0o600


def test_a_symlinked_config_is_refused_in_one_line(tmp_path):
    real = tmp_path / "real.json"
    real.write_text(json.dumps({"pairing_token": "PAIR_x", "moonraker": [{}]}))
    link = tmp_path / "config.json"
    os.symlink(str(real), str(link))
    with pytest.raises(connector.ConfigError, match=r"config.json: is a symbolic link; refusing to follow it"):
        connector.load_config(str(link), environ={})


def test_tightening_the_config_mode_never_changes_a_link_target(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("{}")
    os.chmod(str(real), 0o644)
    os.symlink(str(real), str(tmp_path / "config.json"))
    assert connector.tighten_config_mode(str(tmp_path / "config.json")) is False
    assert stat.S_IMODE(os.stat(str(real)).st_mode) == 0o644


def test_a_rewrite_as_root_never_takes_a_link_targets_owner(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("{}")
    os.chown(str(real), 4321, 4321)
    path = tmp_path / "config.json"
    os.symlink(str(real), str(path))
    connector.atomic_write(str(path), b"{}\n")
    assert os.lstat(str(path)).st_uid == 0 and not os.path.islink(str(path))
    assert os.stat(str(real)).st_uid == 4321


def test_a_config_that_is_a_fifo_is_a_config_error_not_a_hang(tmp_path):
    os.mkfifo(str(tmp_path / "config.json"))
    with pytest.raises(connector.ConfigError, match="not a regular file"):
        connector.load_config(str(tmp_path / "config.json"), environ={})


def test_a_config_nested_990_deep_is_a_config_error(tmp_path):
    (tmp_path / "config.json").write_text('{"moonraker": ' + "[" * 990 + "]" * 990 + "}")
    with pytest.raises(connector.ConfigError, match="nested"):
        connector.load_config(str(tmp_path / "config.json"), environ={})


def test_a_state_dir_link_owned_by_another_user_is_refused(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(str(tmp_path / "real"), str(tmp_path / "state"))
    os.lchown(str(tmp_path / "state"), 4321, 4321)
    with pytest.raises(connector.StateDirError, match="symbolic link owned by uid 4321"):
        connector.check_state_dir(str(tmp_path / "state"))


def test_a_state_dir_owned_by_another_user_is_refused(tmp_path):
    (tmp_path / "state").mkdir()
    os.chown(str(tmp_path / "state"), 4321, 4321)
    with pytest.raises(connector.StateDirError, match="belongs to uid 4321"):
        connector.check_state_dir_owner(str(tmp_path / "state"), me=1000)


def test_root_may_use_the_state_dir_of_the_service_user(tmp_path):
    (tmp_path / "state").mkdir()
    os.chown(str(tmp_path / "state"), 4321, 4321)
    connector.check_state_dir_owner(str(tmp_path / "state"), me=0)


def test_a_world_writable_state_dir_is_refused(tmp_path):
    (tmp_path / "state").mkdir()
    os.chmod(str(tmp_path / "state"), 0o777)
    with pytest.raises(connector.StateDirError, match="writable by every user"):
        connector.check_state_dir(str(tmp_path / "state"))


# -- item 2: the ledger is bounded in bytes --------------------------------------

def sync_files_completion(files):
    return {"status": "succeeded", "result": {
        "action": "sync_files", "count": files, "post_snapshot": "captured",
        "files": [{"path": "folder/model_%05d.gcode" % n, "modified": 1767225600.0 + n, "size": 123456 + n,
                   "permissions": "rw"} for n in range(files)]}}


def run_and_ack(ledger, command_id, completion):
    ledger.start(command_id, completion["result"]["action"], 1)
    ledger.finish(command_id, completion)
    ledger.acked(command_id)


def test_an_acknowledged_completion_keeps_only_what_a_redelivery_needs(tmp_path, log):
    ledger = connector.Ledger(str(tmp_path), log)
    run_and_ack(ledger, "big", sync_files_completion(3000))
    kept = connector.Ledger(str(tmp_path), log).get("big")
    assert kept["state"] == "acked" and kept["action"] == "sync_files"
    assert kept["completion"]["status"] == "succeeded"
    assert kept["completion"]["result"]["action"] == "sync_files"
    assert "files" not in kept["completion"]["result"]
    assert len(json.dumps(kept)) < 400


def test_a_small_completion_is_kept_whole_after_the_ack(tmp_path, log):
    ledger = connector.Ledger(str(tmp_path), log)
    completion = {"status": "succeeded", "result": {"action": "pause", "post_snapshot": "captured"}}
    run_and_ack(ledger, "7", dict(completion, result=dict(completion["result"])))
    assert connector.Ledger(str(tmp_path), log).get("7")["completion"] == completion


def test_forty_large_results_leave_a_small_ledger_on_disk_and_in_memory(tmp_path, log):
    ledger = connector.Ledger(str(tmp_path), log)
    for n in range(40):
        run_and_ack(ledger, str(n), sync_files_completion(3000))
    size = os.path.getsize(str(ledger_path(tmp_path)))
    assert size <= 2 * ledger.live_bytes + connector.LEDGER_SLACK_BYTES + len(json.dumps(sync_files_completion(3000)))
    assert ledger.live_bytes < 40 * 300
    tracemalloc.start()
    try:
        again = connector.Ledger(str(tmp_path), log)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(again.entries) == 40 and held < 256 * 1024


def test_compaction_writes_no_more_than_was_appended_before_it(tmp_path, log, monkeypatch):
    monkeypatch.setattr(connector, "LEDGER_MAX_ENTRIES", 50)
    monkeypatch.setattr(connector, "LEDGER_SLACK_BYTES", 8192, raising=False)
    written, appended = [], []
    real_atomic_write, real_append_line = connector.atomic_write, connector.append_line
    monkeypatch.setattr(connector, "atomic_write", lambda path, data, **kw: (written.append(len(data)),
                                                                              real_atomic_write(path, data, **kw)))
    monkeypatch.setattr(connector, "append_line", lambda path, data, durable=True: (
        appended.append(len(data)), real_append_line(path, data, durable))[1])
    ledger = connector.Ledger(str(tmp_path), log)
    for n in range(600):
        run_and_ack(ledger, str(n), {"status": "succeeded", "result": {"action": "pause"}})
    assert len(written) >= 3, "the ledger was compacted %d times" % len(written)
    assert sum(written) <= sum(appended)
    assert len(connector.Ledger(str(tmp_path), log).entries) == 50


def test_acked_ids_are_bounded_in_bytes_too(tmp_path, log, monkeypatch):
    monkeypatch.setattr(connector, "LEDGER_ACKED_MAX_BYTES", 20000)
    ledger = connector.Ledger(str(tmp_path), log)
    for n in range(500):
        run_and_ack(ledger, "id-%03d-%s" % (n, "x" * 100), {"status": "succeeded", "result": {"action": "pause"}})
    assert ledger.acked_bytes <= 20000
    assert ledger.get("id-499-%s" % ("x" * 100)) is not None and ledger.get("id-000-%s" % ("x" * 100)) is None


def test_a_result_over_the_per_completion_cap_is_recorded_and_sent_without_it(tmp_path, log, monkeypatch):
    monkeypatch.setattr(connector, "COMPLETION_MAX_BYTES", 10000)
    ledger = connector.Ledger(str(tmp_path), log)
    ledger.start("big", "sync_files", 1)
    recorded = ledger.finish("big", sync_files_completion(300))
    assert recorded["status"] == "succeeded" and "files" not in recorded["result"]
    assert "result_omitted" in recorded["result"]
    assert connector.Ledger(str(tmp_path), log).unacked() == [("big", recorded)]


def test_pending_results_past_the_total_cap_keep_their_status(tmp_path, log, monkeypatch):
    monkeypatch.setattr(connector, "LEDGER_PENDING_MAX_BYTES", 100000)
    ledger = connector.Ledger(str(tmp_path), log)
    recorded = []
    for n in range(5):
        ledger.start(str(n), "sync_files", 1)
        recorded.append(ledger.finish(str(n), sync_files_completion(300)))
    assert ["files" in r["result"] for r in recorded] == [True, True, True, False, False]
    assert ledger.pending_bytes <= 100000
    assert [c["status"] for _, c in connector.Ledger(str(tmp_path), log).unacked()] == ["succeeded"] * 5


def test_a_0_1_0_ledger_full_of_results_loads_small_and_is_compacted(tmp_path, log):
    with open(ledger_path(tmp_path), "wb") as handle:
        for n in range(40):
            handle.write(connector.encode_line({"id": str(n), "state": "running", "t": time.time(),
                                                "action": "sync_files", "printer_id": 1}))
            handle.write(connector.encode_line({"id": str(n), "state": "done",
                                                "completion": sync_files_completion(3000)}))
            handle.write(connector.encode_line({"id": str(n), "state": "acked"}))
    assert os.path.getsize(str(ledger_path(tmp_path))) > 10 * 1024 * 1024
    ledger = loaded_within(tmp_path, log, seconds=15.0)  # 12 MB of JSON: about 1.5 s on an idle x86
    assert len(ledger.entries) == 40
    assert os.path.getsize(str(ledger_path(tmp_path))) < 40 * 300


# -- item 1: commands refused at the door ----------------------------------------

class CloudOnly:
    """The clients of a lane whose commands never reach a printer."""

    def __init__(self, cloud):
        self.cloud = cloud


class FakeAgent:
    def __init__(self, state_dir, log):
        self.config = connector.Config(path="x", cloud_url="http://127.0.0.1:9", moonraker=[
            connector.PrinterConfig(base_url="http://127.0.0.1:9", printer_id=1)], state_dir=state_dir)
        self.log = log
        self.ledger = connector.Ledger(state_dir, log)
        self.stop = threading.Event()
        self.snapshots = None

    def console(self, printer):
        return None


def command_runner(parts):
    return connector.CommandRunner(parts.config, parts.log, parts.ledger, parts.stop, parts.snapshots,
                                   parts.console)


def runner(tmp_path, log):
    return command_runner(FakeAgent(str(tmp_path), log))


@pytest.mark.parametrize("command_id", ["9" * 129, "a\rb", "a\u2028b", "a\x1b[2Jb", 1e200])
def test_a_command_without_a_usable_id_is_skipped_in_one_line(tmp_path, log, stream, command_id):
    cloud = FakeCloud()
    runner(tmp_path, log).dispatch(CloudOnly(cloud), {"id": command_id, "action": "pause", "printer_id": 1})
    assert cloud.completed == [] and not ledger_path(tmp_path).exists()
    assert len([line for line in stream.getvalue().splitlines() if "without a usable id" in line]) == 1


@pytest.mark.parametrize("action", ["x" * 65, [[[[["pause"]]]]], "pa\nuse", {"a": "b" * 100000}])
def test_an_implausible_action_fails_the_command_and_stays_out_of_the_ledger(tmp_path, log, action):
    cloud = FakeCloud()
    runner(tmp_path, log).dispatch(CloudOnly(cloud), {"id": "c1", "action": action, "printer_id": "9" * 100000})
    assert [(cid, body["status"]) for cid, body in cloud.completed] == [("c1", "failed")]
    assert cloud.completed[0][1]["result"]["action"] is None
    assert len(cloud.completed[0][1]["error_message"]) < 200
    assert os.path.getsize(str(ledger_path(tmp_path))) < 600
    assert connector.Ledger(str(tmp_path), log).get("c1")["state"] == "acked"


# -- item 6: the cloud hears only what the disk holds ------------------------------

def failing_appends(monkeypatch, after):
    """append_line fails with ENOSPC once `after` appends have gone through."""
    real = connector.append_line
    calls = []

    def append(path, data, durable=True):
        calls.append(path)
        if len(calls) > after:
            raise OSError(28, "No space left on device")
        return real(path, data, durable)
    monkeypatch.setattr(connector, "append_line", append)


def test_a_result_that_cannot_be_recorded_is_neither_sent_nor_lost(tmp_path, log, monkeypatch):
    cloud = FakeCloud()
    commands = runner(tmp_path, log)
    failing_appends(monkeypatch, after=1)  # "running" is recorded, nothing after it
    commands.dispatch(CloudOnly(cloud), {"id": "c1", "action": "no_such_action", "printer_id": 1})
    assert cloud.completed == []
    monkeypatch.undo()
    commands.flush(cloud)
    assert [(cid, body["status"]) for cid, body in cloud.completed] == [("c1", "failed")]
    assert "could not be recorded" in cloud.completed[0][1]["error_message"]
    assert connector.Ledger(str(tmp_path), log).get("c1")["completion"] == cloud.completed[0][1]


def test_a_result_that_cannot_be_recorded_is_reported_interrupted_after_a_restart_only(tmp_path, log, monkeypatch):
    cloud = FakeCloud()
    failing_appends(monkeypatch, after=1)
    runner(tmp_path, log).dispatch(CloudOnly(cloud), {"id": "c1", "action": "no_such_action", "printer_id": 1})
    monkeypatch.undo()
    restarted = runner(tmp_path, log)
    restarted.recover_interrupted()
    restarted.flush(cloud)
    assert [(cid, body["error_message"]) for cid, body in cloud.completed] == [
        ("c1", "interrupted by restart; not re-run")]


def test_a_big_result_the_disk_cannot_take_is_reported_as_the_short_failure_it_holds(tmp_path, log, monkeypatch):
    cloud = FakeCloud()
    real = connector.append_line

    def small_only(path, data, durable=True):
        if len(data) > 1000:
            raise OSError(28, "No space left on device")
        return real(path, data, durable)
    monkeypatch.setattr(connector, "append_line", small_only)
    commands = runner(tmp_path, log)
    commands.ledger.start("c1", "sync_files", 1)
    sent = commands.record("c1", "sync_files", sync_files_completion(300))
    assert sent["status"] == "failed" and "No space left on device" in sent["error_message"]
    assert connector.Ledger(str(tmp_path), log).get("c1")["completion"] == sent


# -- item 3: the outbox at its bound -----------------------------------------------

def snapshot(n, pad=1300):
    return {"printer_id": 1, "captured_at": "2026-01-01T00:00:00Z", "payload": {"n": n, "pad": "x" * pad}}


def bytes_written_by_this_process():
    with open("/proc/self/io") as handle:
        fields = dict(line.split(": ") for line in handle.read().splitlines())
    return int(fields["wchar"])


def test_a_snapshot_at_the_outbox_bound_costs_about_its_own_bytes(tmp_path):
    spill = connector.SnapshotSpill(str(tmp_path), connector.Logger("error", stream=io.StringIO()),
                                    max_snapshots=10000, max_bytes=2 * 1024 * 1024)
    n = 0
    while spill.dropped_total == 0:
        spill.add([snapshot(n)])
        n += 1
    one = len(connector.encode_line(snapshot(0)))
    before = bytes_written_by_this_process()
    for m in range(500):
        spill.add([snapshot(n + m)])
    per_snapshot = (bytes_written_by_this_process() - before) / 500
    assert per_snapshot < 1.2 * one, "%d bytes written per %d-byte snapshot" % (per_snapshot, one)
    assert spill.size() <= 2 * 1024 * 1024
    kept = []
    spill.drain(kept.extend)
    numbers = [s["payload"]["n"] for s in kept]
    assert numbers == sorted(numbers) and numbers[-1] == n + 499
    assert len(numbers) >= (connector.SPILL_SEGMENTS - 1) * 2 * 1024 * 1024 // connector.SPILL_SEGMENTS // one


def test_a_0_1_0_outbox_and_its_sent_count_are_taken_over(tmp_path, log):
    with open(str(tmp_path / "snapshots.jsonl"), "wb") as handle:
        for n in range(5):
            handle.write(connector.encode_line(snapshot(n, pad=1)))
    (tmp_path / "snapshots.sent").write_text("2")
    kept = []
    assert connector.SnapshotSpill(str(tmp_path), log).drain(kept.extend) == 3
    assert [s["payload"]["n"] for s in kept] == [2, 3, 4]


# -- item 4: a refused snapshot is set aside ---------------------------------------

class RefusingCloud:
    def __init__(self, refused):
        self.refused, self.received, self.calls = refused, [], 0

    def push_snapshots(self, batch):
        self.calls += 1
        if any(s["payload"]["n"] in self.refused for s in batch):
            raise connector.HttpError("cloud http 422: snapshot refused", 422)
        self.received.extend(s["payload"]["n"] for s in batch)


def test_a_refused_snapshot_is_set_aside_after_a_few_tries_and_the_rest_delivered(tmp_path, log, stream):
    spill = connector.SnapshotSpill(str(tmp_path), log)
    spill.add([snapshot(n, pad=1) for n in range(10)])
    cloud = RefusingCloud({3})
    tries = 0
    while spill.count():
        tries += 1
        assert tries < 10, "the refused snapshot blocks the others"
        try:
            spill.drain(cloud.push_snapshots)
        except connector.HttpError:
            pass
    assert cloud.received == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert spill.refused_total == 1
    assert [json.loads(line)["snapshot"]["payload"]["n"] for line in open(spill.refused_path)] == [3]
    assert len([line for line in stream.getvalue().splitlines() if "refused a snapshot" in line]) == 1


def test_a_snapshot_refused_with_429_is_kept_for_later(tmp_path, log):
    spill = connector.SnapshotSpill(str(tmp_path), log)
    spill.add([snapshot(1, pad=1)])

    def busy(batch):
        raise connector.HttpError("cloud http 429: slow down", 429)
    for _ in range(10):
        with pytest.raises(connector.HttpError):
            spill.drain(busy)
    assert spill.count() == 1 and spill.refused_total == 0


# -- lanes: the ledger is shared by threads ------------------------------------------

def test_of_lanes_handed_the_same_id_exactly_one_may_run_it(tmp_path, log):
    ledger = connector.Ledger(str(tmp_path), log)
    barrier = threading.Barrier(8)
    claims = []

    def claim():
        barrier.wait()
        claims.append(ledger.claim("same", "pause", 1))
    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert claims.count(None) == 1


def test_lanes_recording_at_once_leave_a_ledger_that_loads_the_same(tmp_path, log, monkeypatch):
    monkeypatch.setattr(connector, "LEDGER_SLACK_BYTES", 2000)  # compactions happen while the lanes write
    ledger = connector.Ledger(str(tmp_path), log)

    def lane(name):
        for n in range(150):
            command_id = "%s-%d" % (name, n)
            assert ledger.claim(command_id, "pause", 1) is None
            ledger.finish(command_id, {"status": "succeeded", "result": {"action": "pause", "n": n}})
            ledger.acked(command_id)
    threads = [threading.Thread(target=lane, args=(name,)) for name in "abcd"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert ledger.live_bytes == sum(len(e.line(cid)) for cid, e in ledger.entries.items())
    again = connector.Ledger(str(tmp_path), log)
    assert {cid: again.get(cid) for cid in again.entries} == {cid: ledger.get(cid) for cid in ledger.entries}
    assert len(again.entries) == 600


def test_a_ledger_hard_linked_to_another_file_is_moved_aside_not_written(tmp_path, log):
    other = tmp_path / "other"
    other.write_bytes(pause_done("planted"))
    os.link(str(other), str(ledger_path(tmp_path)))
    ledger = connector.Ledger(str(tmp_path), log)
    ledger.start("1", "pause", 1)
    assert ledger.get("planted") is None and other.read_bytes() == pause_done("planted")
    assert os.lstat(str(ledger_path(tmp_path))).st_nlink == 1


def test_a_result_nested_as_deep_as_moonraker_may_answer_is_recorded_so_it_loads_again(tmp_path, log):
    deep = []
    for _ in range(connector.MAX_JSON_DEPTH - 2):  # what decode_json lets through as an answer's result
        deep = [deep]
    clients = AnsweringClients([deep])
    runner(tmp_path, log).dispatch(clients, {"id": "deep", "action": "sync_files", "printer_id": 1})
    sent = clients.cloud.completed[0][1]
    assert sent["status"] == "succeeded"
    again = command_runner(FakeAgent(str(tmp_path), log))
    again.recover_interrupted()
    assert again.ledger.get("deep")["completion"] == sent  # not "interrupted by restart"


def test_a_ledger_this_user_cannot_read_is_left_as_it_is():
    nobody = pwd.getpwnam("nobody")
    state = tempfile.mkdtemp(prefix="state-unreadable-")
    try:
        os.chown(state, nobody.pw_uid, nobody.pw_gid)
        ledger = os.path.join(state, "commands.jsonl")
        with open(ledger, "wb") as handle:  # left by a run as root: root's, 0600
            for n in range(5000):
                handle.write(pause_done(str(n)))
        os.chmod(ledger, 0o600)
        before = open(ledger, "rb").read()
        code = ("import io, sys; sys.path.insert(0, %r); import connector; "
                "connector.Ledger(%r, connector.Logger('info', stream=io.StringIO()))"
                % (os.path.dirname(connector.__file__), state))
        # The system Python: the test's own may sit where nobody can reach.
        site_packages = [p for p in sys.path if p.endswith("site-packages")]
        subprocess.run(["/usr/bin/python3", "-c", code], check=True, timeout=60,
                       env={"PYTHONPATH": ":".join(site_packages), "PATH": "/usr/bin:/bin"},
                       preexec_fn=lambda: (os.setgid(nobody.pw_gid), os.setuid(nobody.pw_uid)))
        assert open(ledger, "rb").read() == before
    finally:
        shutil.rmtree(state)
