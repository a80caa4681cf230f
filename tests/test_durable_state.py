"""Unit specifications of the durable state: the command ledger and the
snapshot spill (what survives a restart, what is bounded, what is skipped)."""

import io
import json
import os

import pytest

import connector


@pytest.fixture
def log():
    return connector.Logger("debug", stream=io.StringIO())


def test_ledger_survives_a_restart(tmp_path, log):
    ledger = connector.Ledger(str(tmp_path), log)
    ledger.start("7", "pause", 1)
    ledger.finish("7", {"status": "succeeded", "result": {"action": "pause"}})
    again = connector.Ledger(str(tmp_path), log)
    assert again.get("7")["state"] == "done"
    assert again.unacked() == [("7", {"status": "succeeded", "result": {"action": "pause"}})]


def test_acked_completion_leaves_the_outbox(tmp_path, log):
    ledger = connector.Ledger(str(tmp_path), log)
    ledger.start("7", "pause", 1)
    ledger.finish("7", {"status": "succeeded", "result": {}})
    ledger.acked("7")
    assert connector.Ledger(str(tmp_path), log).unacked() == []
    assert connector.Ledger(str(tmp_path), log).get("7")["state"] == "acked"


def test_a_running_entry_after_restart_is_interrupted(tmp_path, log):
    connector.Ledger(str(tmp_path), log).start("9", "start_print", 1)
    assert [e["id"] for e in connector.Ledger(str(tmp_path), log).interrupted()] == ["9"]


def test_a_torn_last_line_is_skipped_with_a_warning(tmp_path):
    stream = io.StringIO()
    log = connector.Logger("info", stream=stream)
    ledger = connector.Ledger(str(tmp_path), log)
    ledger.start("1", "pause", 1)
    with open(ledger.path, "ab") as handle:
        handle.write(b'{"id":"2","state":"runn')
    again = connector.Ledger(str(tmp_path), log)
    assert again.get("1") is not None and again.get("2") is None
    assert "corrupt record" in stream.getvalue()


def test_old_acked_ids_expire_and_the_file_is_compacted(tmp_path, log, monkeypatch):
    monkeypatch.setattr(connector, "LEDGER_SLACK_BYTES", 0)
    ledger = connector.Ledger(str(tmp_path), log)
    for n in range(30):
        ledger.start(str(n), "pause", 1)
        ledger.finish(str(n), {"status": "succeeded"})
        ledger.acked(str(n))
    monkeypatch.setattr(connector, "LEDGER_MAX_ENTRIES", 10)
    ledger.start("new", "pause", 1)
    ledger.compact_if_needed()
    again = connector.Ledger(str(tmp_path), log)
    assert again.get("0") is None and again.get("29") is not None and again.get("new") is not None
    assert len(again.entries) <= 11
    with open(ledger.path) as handle:
        assert len(handle.readlines()) == len(again.entries)


def test_unacked_completions_are_never_expired(tmp_path, log, monkeypatch):
    monkeypatch.setattr(connector, "LEDGER_MAX_ENTRIES", 2)
    monkeypatch.setattr(connector, "LEDGER_KEEP_SECONDS", 0)
    ledger = connector.Ledger(str(tmp_path), log)
    for n in range(5):
        ledger.start(str(n), "pause", 1)
        ledger.finish(str(n), {"status": "failed"})
    ledger.compact_if_needed()
    assert len(connector.Ledger(str(tmp_path), log).unacked()) == 5


def segments(state_dir):
    """The outbox's segment files, oldest first."""
    return sorted(str(p) for p in state_dir.glob("snapshots-*.jsonl"))


def snapshot(n):
    return {"printer_id": 1, "captured_at": "2026-01-01T00:00:%02dZ" % (n % 60), "payload": {"n": n}}


def test_spill_delivers_oldest_first_in_batches(tmp_path, log, monkeypatch):
    monkeypatch.setattr(connector, "SNAPSHOT_BATCH", 3)
    spill = connector.SnapshotSpill(str(tmp_path), log)
    spill.add([snapshot(n) for n in range(7)])
    batches = []
    assert spill.drain(batches.append) == 7
    assert [[s["payload"]["n"] for s in b] for b in batches] == [[0, 1, 2], [3, 4, 5], [6]]
    assert segments(tmp_path) == [] and spill.count() == 0


def test_spill_resumes_after_the_last_delivered_batch(tmp_path, log, monkeypatch):
    monkeypatch.setattr(connector, "SNAPSHOT_BATCH", 2)
    spill = connector.SnapshotSpill(str(tmp_path), log)
    spill.add([snapshot(n) for n in range(5)])
    sent = []

    def fail_on_second(batch):
        if sent:
            raise connector.HttpError("cloud down")
        sent.append(batch)
    with pytest.raises(connector.HttpError):
        spill.drain(fail_on_second)
    restarted = connector.SnapshotSpill(str(tmp_path), log)
    assert restarted.count() == 3
    rest = []
    restarted.drain(rest.append)
    assert [s["payload"]["n"] for b in rest for s in b] == [2, 3, 4]


def test_spill_drops_the_oldest_past_the_count_bound(tmp_path):
    stream = io.StringIO()
    spill = connector.SnapshotSpill(str(tmp_path), connector.Logger("info", stream=stream), max_snapshots=5)
    for n in range(8):
        spill.add([snapshot(n)])
    kept = []
    spill.drain(kept.append)
    assert [s["payload"]["n"] for b in kept for s in b] == [3, 4, 5, 6, 7]
    assert "dropped the oldest" in stream.getvalue() and "dropped_total=3" in stream.getvalue()


def test_spill_drops_the_oldest_past_the_byte_bound(tmp_path, log):
    spill = connector.SnapshotSpill(str(tmp_path), log, max_bytes=1000)
    for n in range(20):
        spill.add([dict(snapshot(n), payload={"n": n, "pad": "x" * 100})])
    assert sum(os.path.getsize(path) for path in segments(tmp_path)) <= 1000
    kept = []
    spill.drain(kept.append)
    numbers = [s["payload"]["n"] for b in kept for s in b]
    assert numbers[-1] == 19 and numbers == sorted(numbers) and len(numbers) < 20


def test_spill_skips_a_corrupt_tail(tmp_path, log):
    spill = connector.SnapshotSpill(str(tmp_path), log)
    spill.add([snapshot(1)])
    with open(segments(tmp_path)[-1], "ab") as handle:
        handle.write(b'{"printer_id": 1, "captu')
    kept = []
    connector.SnapshotSpill(str(tmp_path), log).drain(kept.append)
    assert [s["payload"]["n"] for b in kept for s in b] == [1]


def test_unwritable_state_dir_is_a_clear_error(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(connector.StateDirError, match="state_dir .* is not writable"):
        connector.check_state_dir(str(blocked / "state"))


def test_spill_records_keep_their_capture_time(tmp_path, log):
    spill = connector.SnapshotSpill(str(tmp_path), log)
    spill.add([snapshot(42)])
    with open(segments(tmp_path)[0]) as handle:
        assert json.loads(handle.readline())["captured_at"] == "2026-01-01T00:00:42Z"


class FlakyCloud:
    def __init__(self):
        self.down, self.calls, self.received = True, 0, []

    def push_snapshots(self, batch):
        self.calls += 1
        if self.down:
            raise connector.HttpError("cloud http 503: down", 503)
        self.received.extend(batch)


def test_while_the_cloud_fails_snapshots_are_kept_without_asking_it_each_time(tmp_path, log):
    outbox = connector.SnapshotOutbox(connector.SnapshotSpill(str(tmp_path), log), log, lambda: 30.0)
    cloud = FlakyCloud()
    for n in range(5):
        with pytest.raises(connector.HttpError, match="down"):
            outbox.push(cloud, [snapshot(n)])
    assert cloud.calls == 1  # the others waited for the backoff
    assert outbox.spill.count() == 5
    cloud.down, outbox.retry_at = False, 0.0
    outbox.push(cloud, [snapshot(5)])
    assert [s["payload"]["n"] for s in cloud.received] == [0, 1, 2, 3, 4, 5]
    assert outbox.spill.count() == 0
