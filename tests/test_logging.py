"""Specifications of the log lines: logfmt that no peer's value can break
into two lines or forge, and that carries no configured secret, whatever the
value holds. A small strict logfmt reader checks every line parses back."""

import io
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import connector

# Every character Python, a terminal or a log viewer may take as the end of a
# line, and the rest of Unicode's Cc, Zl and Zp.
LINE_BREAKERS = ["\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\x1b", "\x00"]

_BARE = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)=([^ "=\\]+)(?: |$)')
_QUOTED = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"(?: |$)')
_UNESCAPE = re.compile(r'\\(u[0-9a-f]{4}|.)')


def _unescape(text):
    def one(match):
        code = match.group(1)
        return chr(int(code[1:], 16)) if code.startswith("u") else {"n": "\n", "r": "\r", "t": "\t"}.get(code, code)
    return _UNESCAPE.sub(one, text)


def parse_logfmt(line):
    """The (key, value) pairs of one logfmt line; AssertionError if it is not one."""
    assert line.endswith("\n") and "\n" not in line[:-1], "not exactly one line: %r" % line
    text, pairs, position = line[:-1], [], 0
    while position < len(text):
        match = _QUOTED.match(text, position) or _BARE.match(text, position)
        assert match, "not logfmt at %d: %r" % (position, text[position:position + 40])
        value = match.group(2)
        pairs.append((match.group(1), _unescape(value) if match.re is _QUOTED else value))
        position = match.end()
    return pairs


def logged(level="debug", secrets=(), msg="event", **fields):
    stream = io.StringIO()
    log = connector.Logger(level, stream=stream)
    for secret in secrets:
        log.add_secret(secret)
    log.info(msg, **fields)
    return stream.getvalue()


@pytest.mark.parametrize("char", LINE_BREAKERS)
def test_a_line_breaking_character_in_a_value_is_escaped(char):
    line = logged(id="c1%s time=2020 level=INFO msg=\"Pairing successful\"" % char)
    assert line.count("\n") == 1 and len(line.splitlines()) == 1
    assert char not in line[:-1]
    assert dict(parse_logfmt(line))["id"] == "c1%s time=2020 level=INFO msg=\"Pairing successful\"" % char


def test_a_forged_line_in_a_cloud_error_stays_inside_its_value():
    line = logged(msg="Command finished", error="boom\u2028time=x level=INFO msg=\"Pairing successful\"")
    assert "\u2028" not in line
    assert [key for key, _ in parse_logfmt(line)] == ["time", "level", "msg", "error"]


def test_bidirectional_overrides_are_escaped():
    line = logged(filename="evil\u202egcode.exe")
    assert "\u202e" not in line and "\\u202e" in line


def test_a_one_character_secret_does_not_garble_lines():
    line = logged(secrets=["e"], msg="Heartbeat sent", peer="moonraker")
    assert "[redacted]" not in line and 'msg="Heartbeat sent"' in line


def test_a_secret_of_the_minimum_length_is_redacted():
    secret = "x" * connector.MIN_SECRET_LENGTH
    assert secret not in logged(secrets=[secret], error="got %s back" % secret)


def test_a_secret_holding_quotes_and_spaces_is_redacted_before_escaping():
    secret = 'ab "cd" \\ ef'
    line = logged(secrets=[secret], error="key=%s;" % secret)
    assert dict(parse_logfmt(line))["error"] == "key=[redacted];"


def test_a_secret_inside_a_longer_one_does_not_leave_half_of_it():
    line = logged(secrets=["abcdefgh", "XXabcdefghYY"], error="XXabcdefghYY")
    assert dict(parse_logfmt(line))["error"] == "[redacted]"


def test_a_secret_in_a_structured_value_is_redacted():
    secret = "sk_live_\u00e9l\u00e8ve_123456"
    line = logged(secrets=[secret], detail={"headers": {"X-Api-Key": secret}})
    assert secret not in _unescape(line) and "[redacted]" in line


def test_completions_are_redacted_in_every_string():
    log = connector.Logger("info", stream=io.StringIO())
    log.add_secret("0123456789abcdef")
    completion = {"status": "failed", "error_message": "moonraker http 401: bad key 0123456789abcdef",
                  "result": {"action": "sync_files", "files": [{"path": "0123456789abcdef.gcode"}]}}
    assert log.redact_tree(completion) == {
        "status": "failed", "error_message": "moonraker http 401: bad key [redacted]",
        "result": {"action": "sync_files", "files": [{"path": "[redacted].gcode"}]}}


def test_moonrakers_api_key_is_one_of_the_config_secrets():
    config = connector.parse_config("c.json", {"pairing_token": "PAIR_abcdefgh", "moonraker": [
        {"base_url": "http://127.0.0.1:7125", "api_key": "0123456789abcdef0123456789abcdef"}]})
    assert "0123456789abcdef0123456789abcdef" in config.secrets()


@pytest.mark.parametrize("key", ["connector_secret", "pairing_token"])
def test_a_credential_with_a_control_character_is_refused_at_load_without_echoing_it(key):
    data = {"moonraker": [{"base_url": "http://127.0.0.1:7125"}], key: "sk_live_abc\r\nX-Evil: 1"}
    if key == "connector_secret":
        data["connector_id"] = "7"
    with pytest.raises(connector.ConfigError) as caught:
        connector.parse_config("c.json", data)
    assert key in str(caught.value) and "control characters" in str(caught.value)
    assert "sk_live_abc" not in str(caught.value)


def test_an_api_key_with_a_control_character_is_refused_at_load():
    with pytest.raises(connector.ConfigError) as caught:
        connector.parse_config("c.json", {"pairing_token": "PAIR_abcdefgh", "moonraker": [
            {"base_url": "http://127.0.0.1:7125", "api_key": "key\u2028more"}]})
    assert "moonraker[0].api_key" in str(caught.value) and "key" not in str(caught.value).split("api_key")[1]


def test_a_registration_answer_with_a_control_character_in_the_secret_is_refused(tmp_path):
    config = connector.parse_config(str(tmp_path / "c.json"), {"pairing_token": "PAIR_abcdefgh",
                                                                 "moonraker": [{"base_url": "http://127.0.0.1:7125"}]})
    answer = {"connector": {"id": "7"}, "credentials": {"secret": "sk_live_ok\x1b[2Jstill"}}
    with pytest.raises(connector.ConnectorError) as caught:
        connector.apply_registration(config, answer)
    assert "credentials.secret" in str(caught.value) and "U+001B" in str(caught.value)
    assert "sk_live_ok" not in str(caught.value) and config.connector_secret is None


def test_a_registration_answer_with_a_line_break_in_the_connector_id_is_refused(tmp_path):
    config = connector.parse_config(str(tmp_path / "c.json"), {"pairing_token": "PAIR_abcdefgh",
                                                                 "moonraker": [{"base_url": "http://127.0.0.1:7125"}]})
    answer = {"connector": {"id": "7\nX-Forged: yes"}, "credentials": {"secret": "sk_live_0123456789"}}
    with pytest.raises(connector.ConnectorError) as caught:
        connector.apply_registration(config, answer)
    assert "connector.id" in str(caught.value)


# -- properties -------------------------------------------------------------

# A secret with a bracket could combine with the "[redacted]" put beside it
# into another secret; no issued credential has one.
SECRETS = st.lists(st.text(min_size=connector.MIN_SECRET_LENGTH, max_size=40)
                   .filter(lambda s: connector.credential_problem(s) is None and not set(s) & set("[]")), max_size=3)
KEYS = st.from_regex(r"[a-z_][a-z0-9_]{0,12}", fullmatch=True).filter(lambda k: k not in ("msg", "level", "self"))
ANY_TEXT = st.text(st.characters(blacklist_categories=()))  # unpaired surrogates too, as JSON can carry them
VALUES = st.one_of(ANY_TEXT, st.integers(), st.floats(allow_nan=False),
                   st.lists(ANY_TEXT, max_size=3), st.dictionaries(st.text(max_size=8), ANY_TEXT, max_size=3))


@settings(max_examples=400, deadline=None)
@given(secrets=SECRETS, fields=st.dictionaries(KEYS, VALUES, max_size=6), msg=ANY_TEXT, data=st.data())
def test_any_value_gives_one_logfmt_line_with_the_same_keys_and_no_secret(secrets, fields, msg, data):
    for key in list(fields)[:2]:  # plant the secrets where they are most likely to leak
        if secrets:
            fields[key] = data.draw(ANY_TEXT) + data.draw(st.sampled_from(secrets)) + data.draw(ANY_TEXT)
    stream = io.StringIO()
    log = connector.Logger("debug", stream=stream)
    for secret in secrets:
        log.add_secret(secret)
    log.debug(msg, **fields)
    line = stream.getvalue()
    assert len(line[:-1].splitlines()) <= 1 and not connector.UNSAFE_CHARACTER.search(line[:-1])
    line.encode("utf-8")  # writable to any UTF-8 stream: nothing unpaired is left
    pairs = parse_logfmt(line)
    assert [key for key, _ in pairs] == ["time", "level", "msg"] + [k for k, v in fields.items() if v is not None]
    for _, value in pairs:
        for secret in secrets:
            assert secret not in value


# -- crashes ----------------------------------------------------------------

def test_a_crash_in_a_thread_is_one_escaped_redacted_line_not_a_raw_traceback(monkeypatch, capsys):
    import sys
    import threading
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    stream = io.StringIO()
    log = connector.Logger("info", stream=stream)
    log.add_secret("sk_live_0123456789")
    connector.log_uncaught_exceptions(log)

    def buggy():
        raise TypeError('from a peer\ntime=x level=INFO msg="Pairing successful" key=sk_live_0123456789')
    thread = threading.Thread(target=buggy, name="status-1")
    thread.start()
    thread.join()

    assert capsys.readouterr().err == ""
    pairs = dict(parse_logfmt(stream.getvalue()))
    assert pairs["level"] == "ERROR" and pairs["msg"] == "crashed" and pairs["thread"] == "status-1"
    assert pairs["error"].startswith("TypeError: from a peer\ntime=x") and "[redacted]" in pairs["error"]
    assert "buggy" in pairs["where"]


def test_a_huge_value_is_cut_with_its_length_said():
    line = logged(action="x" * 4000000)
    assert len(line) < 2 * connector.MAX_LOG_VALUE_CHARS
    assert dict(parse_logfmt(line))["action"].endswith("...(%d more characters)"
                                                       % (4000000 - connector.MAX_LOG_VALUE_CHARS))


def test_a_secret_beyond_the_cut_is_still_redacted_not_half_shown():
    secret = "sk_live_0123456789abcdef"
    cut = connector.MAX_LOG_VALUE_CHARS
    line = logged(secrets=[secret], error="x" * (cut - 10) + secret)
    assert "sk_live_01" not in line


def test_an_unpaired_surrogate_from_a_peer_is_escaped_so_the_line_is_still_written():
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)
    log = connector.Logger("info", stream=stream)
    log.info("Command started", action="pa\ud800use")
    assert b'action="pa\\ud800use"' in raw.getvalue()
