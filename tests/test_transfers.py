"""connector.py's "Large transfers" section in process: the JSON splitter
that reads a commands answer of any size, strict base64 decoded a piece at
a time, the progress lines, and the temp-file sweep."""

import base64
import json
import os
import re
import time

import pytest
from hypothesis import given, settings, strategies as st

import connector
from rawserver import RawServer, Trickle, reply

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    # Keys short enough to stay in memory even with LONG_STRING at 8.
    lambda children: st.lists(children, max_size=5) | st.dictionaries(
        st.text("abcXYZ_-", max_size=6), children, max_size=5),
    max_leaves=20)


def split(tmp_path, text, chunk_sizes=(7,)):
    """Feeds text to a JsonSplitter in chunks of the given sizes, cycling."""
    splitter = connector.JsonSplitter(str(tmp_path))
    data, pos, index = text, 0, 0
    while pos < len(data):
        size = max(1, chunk_sizes[index % len(chunk_sizes)])
        splitter.write(data[pos:pos + size])
        pos, index = pos + size, index + 1
    return splitter


def restored(value):
    """value with every SpooledString read back as the text it stands for."""
    if isinstance(value, connector.SpooledString):
        return b"".join(value.utf8_chunks(size=5)).decode("utf-8", "surrogatepass")
    if isinstance(value, list):
        return [restored(v) for v in value]
    if isinstance(value, dict):
        return {k: restored(v) for k, v in value.items()}
    return value


@settings(max_examples=150, deadline=None)
@given(value=json_values, ascii_only=st.booleans(), chunk_sizes=st.lists(st.integers(1, 50), min_size=1, max_size=4))
def test_the_splitter_reads_what_json_loads_reads(tmp_path_factory, value, ascii_only, chunk_sizes):
    text = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8")
    saved, connector.LONG_STRING = connector.LONG_STRING, 8  # short examples go to disk too
    try:
        splitter = split(tmp_path_factory.mktemp("split"), text, chunk_sizes)
        try:
            assert restored(splitter.value()) == json.loads(text)
        finally:
            splitter.close()
    finally:
        connector.LONG_STRING = saved


def test_a_long_string_is_kept_on_disk_not_in_memory(tmp_path):
    content = base64.b64encode(os.urandom(3 * 1024 * 1024)).decode()
    text = json.dumps([{"id": 1, "params": {"content": content, "filename": "a.gcode"}}]).encode()
    splitter = split(tmp_path, text, (65536,))
    value = splitter.value()
    spooled = value[0]["params"]["content"]
    assert isinstance(spooled, connector.SpooledString) and spooled.length == len(content)
    assert len(splitter.structure) < 200
    assert os.path.getsize(spooled.path) == len(content)
    assert value[0]["params"]["filename"] == "a.gcode"
    splitter.close()


def test_close_removes_every_file_of_the_answer(tmp_path):
    text = json.dumps(["x" * 100000, "y" * 100000]).encode()
    splitter = split(tmp_path, text, (4096,))
    splitter.value()
    assert len(os.listdir(str(tmp_path))) == 2
    splitter.close()
    assert os.listdir(str(tmp_path)) == []


def test_a_string_past_the_free_disk_is_counted_not_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(connector, "transfer_budget", lambda folder: (150000, 999999))
    text = json.dumps([{"id": 1, "params": {"content": "A" * 200000}}, {"id": 2, "params": {"content": "B" * 100000}}])
    splitter = split(tmp_path, text.encode(), (4096,))
    first, second = [c["params"]["content"] for c in splitter.value()]
    assert first.path is None and first.length == 200000
    assert re.match(r"too large for this printer's free disk: over \d+ bytes, limit 150000 bytes "
                    r"\(999999 bytes free in %s\)\Z" % re.escape(str(tmp_path)), first.missing)
    assert second.missing is None and os.path.getsize(second.path) == 100000
    splitter.close()


def test_an_answer_that_ends_inside_a_string_is_not_json(tmp_path):
    splitter = split(tmp_path, b'[{"id": 1, "params": {"content": "QUJD', (3,))
    with pytest.raises(connector.BadJson, match="ends inside a string"):
        splitter.value()


def test_structure_past_its_cap_is_refused_without_holding_it(tmp_path):
    splitter = connector.JsonSplitter(str(tmp_path), max_structure=1000)
    splitter.write(b"[" + b"1," * 5000 + b"1]")
    assert len(splitter.structure) == 0
    with pytest.raises(connector.BadJson, match="structure .* is over 1000 bytes"):
        splitter.value()


def test_a_deep_answer_is_refused_as_decode_json_refuses_it(tmp_path):
    splitter = split(tmp_path, b"[" * 100 + b"]" * 100, (10,))
    with pytest.raises(connector.BadJson, match="nested deeper"):
        splitter.value()


def test_a_long_key_is_kept_as_its_length(tmp_path):
    splitter = split(tmp_path, json.dumps({"k" * 100000: 1}).encode(), (4096,))
    assert splitter.value() == {"<string of 100000 bytes>": 1}
    splitter.close()


def test_a_string_that_looks_like_a_marker_stays_a_string(tmp_path):
    splitter = split(tmp_path, json.dumps(["\x00abc:0", "x" * 100000]).encode(), (4096,))
    value = splitter.value()
    assert value[0] == "\x00abc:0" and isinstance(value[1], connector.SpooledString)
    splitter.close()


# -- base64 a piece at a time -----------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 400), max_size=6))
def test_base64_in_pieces_decodes_as_a_whole(data, cuts):
    encoded = base64.b64encode(data)
    decoder = connector.Base64Chunks()
    out, last = b"", 0
    for cut in sorted(set(min(c, len(encoded)) for c in cuts)) + [len(encoded)]:
        out += decoder.feed(encoded[last:cut])
        last = cut
    out += decoder.finish()
    assert out == data and decoder.size == len(data)


@pytest.mark.parametrize("pieces", [[b"QQ==", b"QUJD"], [b"QUJ"], [b"QU JD"], [b"QUJD\n"], [b"QU=D"]])
def test_base64_that_is_not_strict_is_refused(pieces):
    decoder = connector.Base64Chunks()
    with pytest.raises(ValueError):
        for piece in pieces:
            decoder.feed(piece)
        decoder.finish()


# -- progress and temp files ------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Lines:
    def __init__(self):
        self.lines = []

    def info(self, msg, **fields):
        self.lines.append((msg, fields))

    def log(self, level, msg, **fields):
        self.lines.append((msg, dict(fields, level=level)))


def test_progress_says_nothing_for_a_short_transfer(monkeypatch):
    clock, log = Clock(), Lines()
    monkeypatch.setattr(connector.time, "monotonic", clock)
    progress = connector.TransferProgress(log, "download", 100000)
    for done in range(0, 100001, 1000):
        clock.now += 0.01
        progress(done)
    progress.finished(100000)
    assert [msg for msg, _ in log.lines] == ["Transfer done"] and log.lines[0][1]["level"] == 10


def test_progress_says_nothing_at_all_for_a_small_answer(monkeypatch):
    log = Lines()
    progress = connector.TransferProgress(log, "commands answer")
    progress(2)
    progress.finished(2)
    assert log.lines == []


def test_progress_logs_every_ten_percent_of_a_long_transfer_not_every_chunk(monkeypatch):
    clock, log = Clock(), Lines()
    monkeypatch.setattr(connector.time, "monotonic", clock)
    progress = connector.TransferProgress(log, "download", 100000)
    for done in range(0, 100001, 100):  # 1000 chunks over 100 s
        clock.now += 0.1
        progress(done)
    percents = [fields["percent"] for msg, fields in log.lines if msg == "Transfer in progress"]
    assert 9 <= len(percents) <= 11 and percents[-1] == 100
    assert all(later >= earlier + 1 for earlier, later in zip(percents, percents[1:]))


def test_progress_without_a_total_logs_every_ten_seconds(monkeypatch):
    clock, log = Clock(), Lines()
    monkeypatch.setattr(connector.time, "monotonic", clock)
    progress = connector.TransferProgress(log, "commands answer")
    for done in range(600):  # 60 s
        clock.now += 0.1
        progress(done)
    assert 5 <= len(log.lines) <= 6


def test_progress_stops_the_transfer_when_the_connector_stops():
    stop = connector.threading.Event()
    progress = connector.TransferProgress(Lines(), "download", 10, stop)
    progress(1)
    stop.set()
    with pytest.raises(connector.TransferStopped, match="download interrupted: the connector is stopping"):
        progress(2)


def test_the_sweep_removes_only_transfer_files(tmp_path):
    for name in (".transfer-abc.gcode", ".transfer-def.string", "commands.jsonl", "transfer-not-ours"):
        (tmp_path / name).write_bytes(b"x")
    os.symlink("/etc/passwd", str(tmp_path / ".transfer-link"))
    assert connector.sweep_temp_files(str(tmp_path)) == 3
    assert sorted(os.listdir(str(tmp_path))) == ["commands.jsonl", "transfer-not-ours"]
    assert os.path.exists("/etc/passwd")


# -- a download that trickles ------------------------------------------------------

def test_a_trickling_download_fails_at_its_minimum_rate_deadline(cloud, printer, tmp_path, monkeypatch):
    # In process, so that the deadline's base (60 s in service) can be 1 s here.
    monkeypatch.setattr(connector, "TRANSFER_BASE_SECONDS", 1.0)
    source = tmp_path / "slow.gcode"
    source.write_bytes(b"G1 X1\n" * 20000)  # 120 kB at 2 kB/s: a minute; the deadline is 1 s + 120 kB at the rate
    url = cloud.add_download(str(source), mode="trickle:2000")
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    printer_config = connector.PrinterConfig(base_url=printer.url, printer_id=1)
    config = connector.Config(path=str(tmp_path / "c.json"), cloud_url=cloud.url, moonraker=[printer_config],
                              connector_id="1", connector_secret="sk_test_secret_value", state_dir=str(state_dir))
    log = connector.Logger("error")
    moonraker = connector.Moonraker(printer_config, log, "test")
    ctx = connector.ActionContext(moonraker, printer_config, config, log, connector.threading.Event())
    started = connector.time.monotonic()
    with pytest.raises(connector.CommandFailed, match="^download failed: url ") as failed:
        connector.ACTIONS["upload_file"](ctx, {"filename": "slow.gcode", "url": url, "size": 120000})
    elapsed = connector.time.monotonic() - started
    assert elapsed < connector.transfer_deadline(120000) + 5, failed.value
    assert os.listdir(str(state_dir)) == []
    moonraker.close()


def test_a_body_read_into_a_sink_gets_the_time_its_bytes_need_as_they_arrive(cloud, tmp_path, monkeypatch):
    # A commands answer or a download starts with the usual deadline (here
    # 1 s) and gets, as its bytes arrive, the time they take at the minimum
    # rate (here 1 s + 120 kB at 50 KiB/s, in all).
    monkeypatch.setitem(connector.EXCHANGES, "call", connector.ExchangeLimits(0.5, 0.5, 1.0))
    monkeypatch.setattr(connector, "TRANSFER_BASE_SECONDS", 1.0)
    source = tmp_path / "answer.gcode"
    source.write_bytes(b"G1 X1\n" * 20000)
    url = cloud.add_download(str(source), mode="trickle:80000")  # 1.5 s
    client = connector.HttpClient(url, {}, connector.generic_error_message, connector.Logger("error"), "url")
    sink = tmp_path / "sink"
    try:
        with open(str(sink), "wb") as handle:
            response = client.request("GET", url, sink=handle, max_bytes=10 ** 6, timeout=(0.5, 0.5))
    finally:
        client.close()
    assert response.size == 120000 and sink.read_bytes() == source.read_bytes()


@pytest.mark.timeout(60)  # today's deadline from the declared size would be 5 hours
def test_a_body_that_declares_a_huge_length_and_trickles_ends_at_the_minimum_rate(tmp_path, monkeypatch):
    # A Content-Length of 1 GB, then a chunk at once and a byte every 50 ms:
    # the deadline follows what arrived (1 s + 2 chunks at 50 KiB/s), not
    # what was declared (1 s + 1 GB at 50 KiB/s).
    monkeypatch.setattr(connector, "TRANSFER_BASE_SECONDS", 1.0)
    body = b"x" * connector.READ_CHUNK + b"y" * 4000
    server = RawServer(lambda exchange: Trickle(body[connector.READ_CHUNK:], interval=0.05,
                                                head=reply(200, body[:connector.READ_CHUNK], length=10 ** 9)))
    client = connector.HttpClient(server.url(""), {}, connector.generic_error_message, connector.Logger("error"),
                                  "url")
    started = time.monotonic()
    try:
        with open(str(tmp_path / "sink"), "wb") as handle, \
                pytest.raises(connector.ExchangeTimeout, match="deadline"):
            client.request("GET", server.url("/big"), sink=handle, max_bytes=2 * 10 ** 9,
                           **connector.exchange_limits("transfer"))
    finally:
        client.close()
        server.stop()
    assert time.monotonic() - started < connector.transfer_deadline(3 * connector.READ_CHUNK) + 2.0


def test_a_lone_surrogate_in_content_is_bad_base64_not_a_crash(tmp_path):
    config = connector.Config(path=str(tmp_path / "c.json"), cloud_url="http://127.0.0.1:9",
                              moonraker=[connector.PrinterConfig(base_url="http://printer.invalid", printer_id=1)],
                              connector_id="1", connector_secret="sk_test_secret_value", state_dir=str(tmp_path))
    ctx = connector.ActionContext(None, config.moonraker[0], config, connector.Logger("error"),
                                  connector.threading.Event())
    with pytest.raises(connector.CommandFailed, match="^invalid param 'content': not valid base64$"):
        connector.ACTIONS["upload_file"](ctx, {"filename": "a.gcode", "content": "QUJD\ud800"})
    assert os.listdir(str(tmp_path)) == []
