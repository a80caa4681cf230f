"""Property-based specifications of the loaders (hypothesis): whatever a state
file, the config or a command list from the cloud holds, nothing raises out,
nothing exceeds its bound, and what was written loads again, the same."""

import io
import json
import os
import shutil
import tempfile
import threading

from hypothesis import HealthCheck, given, settings, strategies as st

import connector
from fakes import AnsweringClients, FakeCloud

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = (st.none() | st.booleans() | st.integers(min_value=-2 ** 70, max_value=2 ** 70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=5), max_leaves=25)
ids = st.one_of(st.integers(min_value=-5, max_value=10 ** 30), st.text(max_size=140), st.floats(allow_nan=False),
                st.none(), st.booleans(), st.lists(st.integers(), max_size=2), st.sampled_from(["1", "2", "7", " 7 "]))
states = st.sampled_from(["running", "done", "acked", "dancing", None, 3])
completions = st.one_of(json_values, st.fixed_dictionaries(
    {"status": st.sampled_from(["succeeded", "failed", 7]), "result": json_values},
    optional={"error_message": st.text(max_size=300)}))
ledger_records = st.fixed_dictionaries({"id": ids, "state": states}, optional={
    "t": st.one_of(st.floats(allow_nan=False), st.text(max_size=5), st.integers()),
    "action": json_values, "printer_id": json_values, "completion": completions})


def encode(record):
    return json.dumps(record).encode("utf-8") + b"\n"


junk_lines = st.one_of(st.binary(max_size=200), st.just(b"[" * 900 + b"]" * 900), st.just(b'{"id":"torn","sta'),
                       json_values.map(lambda v: json.dumps(v).encode()))
file_lines = st.lists(st.one_of(ledger_records.map(encode), junk_lines), max_size=30)


class TempDir:
    """hypothesis runs many examples in one test: each gets a fresh folder."""

    def __enter__(self):
        self.path = tempfile.mkdtemp(prefix="state-prop-")
        return self.path

    def __exit__(self, *exc):
        shutil.rmtree(self.path, ignore_errors=True)


def quiet():
    return connector.Logger("debug", stream=io.StringIO())


def snapshot_of(ledger):
    return {cid: ledger.get(cid) for cid in ledger.entries}


def assert_within_bounds(ledger):
    assert ledger.acked_bytes <= connector.LEDGER_ACKED_MAX_BYTES
    assert ledger.pending_bytes <= connector.LEDGER_PENDING_MAX_BYTES
    assert len(ledger.acked_order) <= connector.LEDGER_MAX_ENTRIES
    assert ledger.live_bytes == sum(len(e.line(cid)) for cid, e in ledger.entries.items())


@SETTINGS
@given(lines=file_lines, tail=st.binary(max_size=40))
def test_any_ledger_file_loads_and_what_is_written_loads_again_the_same(lines, tail):
    with TempDir() as state_dir:
        with open(os.path.join(state_dir, "commands.jsonl"), "wb") as handle:
            handle.write(b"".join(lines) + tail)
        ledger = connector.Ledger(state_dir, quiet())
        assert_within_bounds(ledger)
        ledger.start("new", "pause", 1)
        ledger.finish("new", {"status": "succeeded", "result": {"action": "pause"}})
        for command_id, completion in ledger.unacked():
            ledger.acked(command_id)
        again = connector.Ledger(state_dir, quiet())
        assert snapshot_of(again) == snapshot_of(ledger)
        assert again.unacked() == [] and again.get("new")["state"] == "acked"


@SETTINGS
@given(segments=st.lists(st.lists(st.one_of(json_values.map(encode), junk_lines), max_size=8), max_size=4),
       marker=st.binary(max_size=20), legacy=st.lists(junk_lines, max_size=5))
def test_any_outbox_loads_drains_and_takes_new_snapshots(segments, marker, legacy):
    with TempDir() as state_dir:
        for seq, lines in enumerate(segments, 1):
            with open(os.path.join(state_dir, "snapshots-%08d.jsonl" % seq), "wb") as handle:
                handle.write(b"".join(lines))
        with open(os.path.join(state_dir, "snapshots.jsonl"), "wb") as handle:
            handle.write(b"\n".join(legacy))
        with open(os.path.join(state_dir, "snapshots.sent"), "wb") as handle:
            handle.write(marker)
        spill = connector.SnapshotSpill(state_dir, quiet(), max_snapshots=10, max_bytes=4096)
        pending = spill.count()
        sent = []
        assert spill.drain(sent.extend) == pending == len(sent)
        assert all(isinstance(s, dict) for s in sent)
        spill.add([{"printer_id": 1, "payload": {"n": n}} for n in range(3)])
        again = connector.SnapshotSpill(state_dir, quiet(), max_snapshots=10, max_bytes=4096)
        delivered = []
        again.drain(delivered.extend)
        assert [s["payload"]["n"] for s in delivered] == [0, 1, 2]


config_keys = st.sampled_from(["cloud_url", "moonraker", "pairing_token", "connector_id", "connector_secret",
                               "site_name", "state_dir", "outbox_max_snapshots", "outbox_max_bytes",
                               "poll_commands_seconds", "heartbeat_seconds", "printer_data_root", "unknown"])
printer_entries = st.one_of(json_values, st.dictionaries(
    st.sampled_from(["base_url", "printer_id", "name", "ui_port", "api_key", "x"]),
    st.one_of(json_values, st.just("http://127.0.0.1:7125")), max_size=5))
configs = st.one_of(json_values, st.dictionaries(config_keys, st.one_of(
    json_values, st.lists(printer_entries, max_size=3), st.just("https://cloud.example")), max_size=10))


@SETTINGS
@given(data=configs, environ=st.dictionaries(st.just("CLOUD_URL"), st.text(max_size=30), max_size=1))
def test_parse_config_gives_a_config_or_one_config_error(data, environ):
    try:
        config = connector.parse_config("/etc/printer-connector.json", data, environ)
    except connector.ConfigError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("/etc/printer-connector.json: ")
        return
    assert config.moonraker and config.cloud_url.startswith(("http://", "https://"))


@SETTINGS
@given(raw=st.one_of(st.binary(max_size=300), configs.map(lambda v: json.dumps(v).encode())))
def test_load_config_gives_a_config_or_one_config_error_for_any_bytes(raw):
    with TempDir() as folder:
        path = os.path.join(folder, "config.json")
        with open(path, "wb") as handle:
            handle.write(raw)
        try:
            connector.load_config(path, environ={})
        except connector.ConfigError as exc:
            assert "\n" not in str(exc)


class FakeAgent:
    def __init__(self, state_dir):
        self.config = connector.Config(path=os.path.join(state_dir, "config.json"), cloud_url="http://127.0.0.1:9",
                                       moonraker=[connector.PrinterConfig(base_url="http://127.0.0.1:9",
                                                                          printer_id=1)], state_dir=state_dir)
        self.log = quiet()
        self.ledger = connector.Ledger(state_dir, self.log)
        self.stop = threading.Event()
        self.snapshots = None

    def console(self, printer):
        return None


def command_runner(parts):
    return connector.CommandRunner(parts.config, parts.log, parts.ledger, parts.stop, parts.snapshots,
                                   parts.console)


commands = st.lists(st.one_of(json_values, st.fixed_dictionaries({"id": ids}, optional={
    "action": st.one_of(st.sampled_from(sorted(connector.ACTIONS)), json_values),
    "printer_id": st.one_of(st.just(1), st.just("1"), json_values),
    "params": st.one_of(st.none(), st.dictionaries(st.sampled_from(["filename", "limit", "axes", "content"]),
                                                   json_values, max_size=3), json_values)})), max_size=12)


@SETTINGS
@given(polled=commands, answer=json_values)
def test_any_command_list_is_handled_within_bounds_and_reloads(polled, answer):
    with TempDir() as state_dir:
        agent = FakeAgent(state_dir)
        runner = command_runner(agent)
        clients = AnsweringClients(answer)
        for raw in polled:
            runner.dispatch(clients, raw)
        runner.flush(clients.cloud)
        assert_within_bounds(agent.ledger)
        assert agent.ledger.unacked() == []
        again = connector.Ledger(state_dir, quiet())
        assert snapshot_of(again) == snapshot_of(agent.ledger)
        for raw in polled:
            command_id = connector.usable_command_id(raw.get("id")) if isinstance(raw, dict) else None
            if command_id is not None:
                assert again.get(command_id) is not None
        restarted = FakeAgent(state_dir)
        clients = AnsweringClients(answer)
        for raw in polled:  # all delivered again after a restart: nothing runs twice
            command_runner(restarted).dispatch(clients, raw)
        assert clients.moonraker_fake.calls == 0
