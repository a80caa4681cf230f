"""File names from the cloud: what validate_filename accepts can never leave
the gcodes folder, lexically or after Moonraker's own normalisation, and
where the folder is on this host no link inside it leads out either.
Moonraker is stood in for by the `peers` fixture, on both transports
(tests/peers.py; test_real_moonraker.py has the same against the real one)."""

import io
import os
import posixpath
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import connector
from peers import peer_certificate, peers  # noqa: F401  (fixtures)

LOCAL = "http://127.0.0.1:7125"


# -- names ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["a/ ..", "a/.. ", " x.gcode", "x.gcode ", "a /b.gcode", "a/\u3000b",
                                  "x.gcode\u00a0", "\u2003../x"])
def test_a_segment_moonraker_would_strip_is_refused(name):
    with pytest.raises(connector.CommandFailed, match="white space"):
        connector.validate_filename({"filename": name})


@pytest.mark.parametrize("char", ["\r", "\n", "\x1b", "\x0b", "\x0c", "\x85", "\u2028", "\u2029", "\x7f", "\u202e"])
def test_a_control_or_line_separator_character_is_refused(char):
    with pytest.raises(connector.CommandFailed, match="control or line-separator"):
        connector.validate_filename({"filename": "part%s.gcode" % char})


def test_a_lone_surrogate_is_refused_not_a_crash():
    with pytest.raises(connector.CommandFailed, match="Unicode"):
        connector.validate_filename({"filename": "part\ud800.gcode"})


def test_a_name_over_4096_bytes_is_refused():
    with pytest.raises(connector.CommandFailed, match="4096"):
        connector.validate_filename({"filename": "/".join(["d" * 200] * 21)})


@pytest.mark.parametrize("name", ["my part (2).gcode", "a b/c d.gcode", "\u00e9t\u00e9/\u4e2d.gcode", "...",
                                  "q.gcode.", "%20.gcode"])
def test_ordinary_names_with_inner_spaces_and_unicode_pass(name):
    assert connector.validate_filename({"filename": name}) == name


NAMES = st.one_of(
    st.text(max_size=60),
    st.lists(st.one_of(st.sampled_from(["..", ".", "", " ..", ".. ", "\t..", "a", " a", "\u3000", "x.gcode", "\\",
                                        "\x00", "\u2028"]), st.text(max_size=6)), max_size=6).map("/".join),
)


@settings(max_examples=600, deadline=None)
@given(name=NAMES)
def test_an_accepted_name_never_leaves_gcodes_even_as_moonraker_strips_it(name):
    try:
        accepted = connector.validate_filename({"filename": name})
    except connector.CommandFailed as exc:
        assert str(exc).startswith(("invalid filename: ", "missing or invalid param 'filename'"))
        return
    assert accepted == name
    for seen_by in (name, "/".join(segment.strip() for segment in name.split("/"))):
        joined = posixpath.normpath(posixpath.join("/gcodes", seen_by))
        assert joined.startswith("/gcodes/"), (name, joined)
    assert not connector.UNSAFE_CHARACTER.search(name) and "\\" not in name


@settings(max_examples=150, deadline=None)
@given(value=st.one_of(st.none(), st.integers(), st.floats(), st.booleans(), st.lists(st.text(max_size=3)),
                       st.dictionaries(st.text(max_size=3), st.text(max_size=3)), st.binary(max_size=8)))
def test_every_value_that_is_not_a_name_is_a_command_failure_with_a_message(value):
    with pytest.raises(connector.CommandFailed) as caught:
        connector.validate_filename({"filename": value})
    assert "filename" in str(caught.value)


# -- links inside a local gcodes folder ---------------------------------------

@pytest.fixture
def layout(tmp_path):
    gcodes = tmp_path / "printer_data" / "gcodes"
    (gcodes / "sub").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.cfg").write_text("keep me")
    (gcodes / "escape").symlink_to(outside)
    (gcodes / "victim.gcode").symlink_to(outside / "victim.cfg")
    (gcodes / "inside").symlink_to(gcodes / "sub")
    return gcodes


def make_ctx(tmp_path, base_url=LOCAL):
    log = connector.Logger("debug", stream=io.StringIO())
    printer = connector.PrinterConfig(base_url=base_url, printer_id=1)
    config = connector.Config(path=str(tmp_path / "c.json"), cloud_url="https://cloud.test", moonraker=[printer],
                              connector_id="1", connector_secret="sk_live_0123456789", state_dir=str(tmp_path))
    return connector.ActionContext(connector.Moonraker(printer, log, "ua"), printer, config, log, threading.Event())


def roots(mock, gcodes, base_url=LOCAL):
    mock.get(base_url + "/server/files/roots", json={"result": [
        {"name": "config", "path": str(gcodes.parent / "config"), "permissions": "rw"},
        {"name": "gcodes", "path": str(gcodes), "permissions": "rw"}]})


@pytest.mark.parametrize("action, params", [
    ("upload_file", {"filename": "escape/x.gcode", "content": "RzI4Cg=="}),
    ("delete_file", {"filename": "escape/victim.cfg"}),
    ("delete_file", {"filename": "victim.gcode"}),
    ("start_print", {"filename": "escape/victim.cfg"}),
])
def test_a_file_action_through_a_link_out_of_a_local_gcodes_is_refused_before_moonraker(peers, tmp_path, layout, action,
                                                                                         params):
    ctx = make_ctx(tmp_path)
    with peers as mock:
        roots(mock, layout)
        with pytest.raises(connector.CommandFailed, match="leads out of the gcodes folder"):
            connector.ACTIONS[action](ctx, params)
        assert [r.path for r in mock.request_history] == ["/server/files/roots"]


def test_a_link_that_stays_inside_gcodes_is_allowed(peers, tmp_path, layout):
    ctx = make_ctx(tmp_path)
    with peers as mock:
        roots(mock, layout)
        mock.delete(LOCAL + "/server/files/gcodes/inside/a.gcode", json={"result": {}})
        assert connector.ACTIONS["delete_file"](ctx, {"filename": "inside/a.gcode"}) == {"filename": "inside/a.gcode"}


def test_a_gcodes_folder_that_is_itself_a_link_is_checked_where_it_leads(peers, tmp_path, layout):
    usb = tmp_path / "usb"
    (usb / "jobs").mkdir(parents=True)
    linked = tmp_path / "printer_data" / "gcodes-on-usb"
    linked.symlink_to(usb)
    ctx = make_ctx(tmp_path)
    with peers as mock:
        roots(mock, linked)
        status = {"print_stats": {"state": "standby"}, "webhooks": {"state": "ready"}}
        mock.post(LOCAL + "/printer/objects/query", json={"result": {"eventtime": 1.0, "status": status}})
        mock.post(LOCAL + "/printer/print/start", json={"result": "ok"})
        assert connector.ACTIONS["start_print"](ctx, {"filename": "jobs/a.gcode"}) == {"filename": "jobs/a.gcode",
                                                                                     "state": "standby"}


def test_a_remote_moonraker_is_not_asked_for_its_roots(peers, tmp_path, layout):
    ctx = make_ctx(tmp_path, base_url="http://printer.lan:7125")
    with peers as mock:
        mock.delete("http://printer.lan:7125/server/files/gcodes/escape/victim.cfg", json={"result": {}})
        connector.ACTIONS["delete_file"](ctx, {"filename": "escape/victim.cfg"})
        assert [r.path for r in mock.request_history] == ["/server/files/gcodes/escape/victim.cfg"]


def test_a_moonraker_without_the_roots_endpoint_gets_the_lexical_checks_only(peers, tmp_path, layout):
    ctx = make_ctx(tmp_path)
    with peers as mock:
        mock.get(LOCAL + "/server/files/roots", status_code=404, json={"error": {"code": 404, "message": "Not Found"}})
        mock.delete(LOCAL + "/server/files/gcodes/a.gcode", json={"result": {}})
        assert connector.ACTIONS["delete_file"](ctx, {"filename": "a.gcode"}) == {"filename": "a.gcode"}


def test_a_roots_answer_naming_a_folder_not_on_this_host_is_not_checked(peers, tmp_path, layout):
    ctx = make_ctx(tmp_path)
    with peers as mock:
        roots(mock, tmp_path / "elsewhere" / "gcodes")
        mock.delete(LOCAL + "/server/files/gcodes/escape/victim.cfg", json={"result": {}})
        connector.ACTIONS["delete_file"](ctx, {"filename": "escape/victim.cfg"})


def test_a_failing_roots_call_fails_the_command_and_touches_nothing(peers, tmp_path, layout):
    ctx = make_ctx(tmp_path)
    with peers as mock:
        mock.get(LOCAL + "/server/files/roots", status_code=503, json={"error": {"code": 503, "message": "busy"}})
        with pytest.raises(connector.CommandFailed, match="cannot check the gcodes folder"):
            connector.ACTIONS["delete_file"](ctx, {"filename": "a.gcode"})
        assert len(mock.request_history) == 1
    assert os.path.exists(str(layout.parent.parent / "outside" / "victim.cfg"))
