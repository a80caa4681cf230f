"""Unit specifications of owner control (issue 19) and the command lanes:
the new actions' checks, the console capture, the long-poll client and the
pacing it leads to, the capabilities table. requests-mock stands in for
Moonraker and the cloud."""

import io
import threading
import time

import pytest
import requests_mock as rm

import connector

MOON = "http://moonraker.test"
CLOUD = "https://cloud.test"
SETTINGS = {"extruder": {"min_temp": 0, "max_temp": 250}, "heater_bed": {"min_temp": 0, "max_temp": 120},
            "heater_generic chamber": {"min_temp": 0, "max_temp": 70},
            "gcode_macro start_print": {"description": "Heat and home", "gcode": "G28"}}


@pytest.fixture(autouse=True)
def through_requests(monkeypatch):
    monkeypatch.setattr(connector, "direct_transport", lambda: connector.RequestsTransport(None))


@pytest.fixture
def log():
    return connector.Logger("debug", stream=io.StringIO())


@pytest.fixture
def config(tmp_path):
    return connector.Config(path=str(tmp_path / "c.json"), cloud_url=CLOUD, connector_id="42",
                            connector_secret="sk_live_topsecret", state_dir=str(tmp_path),
                            moonraker=[connector.PrinterConfig(base_url=MOON, printer_id=1)])


@pytest.fixture
def ctx(config, log):
    printer = config.moonraker[0]
    return connector.ActionContext(connector.Moonraker(printer, log, "t"), printer, config, log, threading.Event())


def heaters_answer(mock, heaters=("extruder", "heater_bed", "heater_generic chamber"), settings=None):
    mock.post(MOON + "/printer/objects/query", json={"result": {"eventtime": 1.0, "status": {
        "heaters": {"available_heaters": list(heaters)},
        "configfile": {"settings": SETTINGS if settings is None else settings}}}})


# -- capabilities -----------------------------------------------------------

def test_capabilities_name_every_extension_once():
    assert len(set(connector.CAPABILITIES)) == len(connector.CAPABILITIES)
    assert {"long_poll", "gcode", "list_macros", "set_temperature", "emergency_stop",
            "control_lane"} <= set(connector.CAPABILITIES)


def test_allow_gcode_false_leaves_gcode_out_of_the_capabilities(config):
    config.allow_gcode = False
    assert "gcode" not in config.capabilities()
    assert "set_temperature" in config.capabilities()


def test_registration_announces_the_capabilities(config):
    config.pairing_token = "PAIR_x"
    assert connector.registration_body(config)["capabilities"] == list(connector.CAPABILITIES)


@pytest.mark.parametrize("value", ["yes", 1, "true"])
def test_allow_gcode_must_be_a_boolean(value):
    data = {"pairing_token": "PAIR_x", "moonraker": [{}], "allow_gcode": value}
    with pytest.raises(connector.ConfigError, match="allow_gcode: must be true or false"):
        connector.parse_config("/c.json", data, environ={})


def test_allow_gcode_defaults_to_true():
    assert connector.parse_config("/c.json", {"pairing_token": "P", "moonraker": [{}]}, environ={}).allow_gcode


# -- gcode ------------------------------------------------------------------

def test_gcode_refused_by_the_config_says_so_without_calling_moonraker(ctx):
    ctx.config.allow_gcode = False
    with rm.Mocker() as mock:
        with pytest.raises(connector.CommandFailed, match="allow_gcode is false"):
            connector.ACTIONS["gcode"](ctx, {"script": "G28"})
        assert mock.call_count == 0


@pytest.mark.parametrize("script, message", [
    (None, "missing or invalid param 'script'"), ("  \n", "missing or invalid param 'script'"),
    (["G28"], "missing or invalid param 'script'"), ("G28\x00M112", "NUL"),
    ("M117 " + "x" * connector.GCODE_SCRIPT_MAX_BYTES, "at most %d" % connector.GCODE_SCRIPT_MAX_BYTES)])
def test_a_bad_gcode_script_fails_without_calling_moonraker(ctx, script, message):
    with rm.Mocker() as mock:
        with pytest.raises(connector.CommandFailed, match=message):
            connector.ACTIONS["gcode"](ctx, {"script": script})
        assert mock.call_count == 0


def test_gcode_without_a_websocket_says_its_console_is_incomplete(ctx):
    with rm.Mocker() as mock:
        mock.post(MOON + "/printer/gcode/script", json={"result": "ok"})
        result = connector.ACTIONS["gcode"](ctx, {"script": "M105"})
    assert mock.request_history[0].json() == {"script": "M105"}
    assert result["console"] == [] and "not connected" in result["console_incomplete"]


def test_a_failing_script_keeps_its_console_lines_in_the_result(ctx):
    console = connector.Console()
    console.sync = lambda timeout: True
    ctx.console = console

    def answer(request, context):
        console.feed(['!! Unknown command:"FOO"'])
        context.status_code = 400
        return {"error": {"code": 400, "message": 'Unknown command:"FOO"'}}
    with rm.Mocker() as mock:
        mock.post(MOON + "/printer/gcode/script", json=answer)
        # The refusal is explained by Klipper's state (ready: Moonraker's message stands).
        mock.register_uri(rm.ANY, MOON + "/printer/objects/query",
                          json={"result": {"status": {"webhooks": {"state": "ready"}}}})
        with pytest.raises(connector.CommandFailed, match="Unknown command") as failure:
            connector.ACTIONS["gcode"](ctx, {"script": "FOO"})
    assert failure.value.result == {"console": ['!! Unknown command:"FOO"']}


def test_the_console_keeps_only_lines_fed_while_capturing_and_is_bounded():
    console = connector.Console()
    console.feed(["before"])
    console.begin()
    console.feed(["one", 7, None])
    console.feed("not a list")
    console.feed(["x" * 100] * (connector.CONSOLE_MAX_LINES + 5))
    fields = console.end()
    assert fields["console"][0] == "one" and len(fields["console"]) == connector.CONSOLE_MAX_LINES
    assert fields["console_truncated"] is True
    console.feed(["after"])
    console.begin()
    assert console.end()["console"] == []


def test_the_console_is_bounded_in_bytes():
    console = connector.Console()
    console.begin()
    console.feed(["y" * (connector.CONSOLE_MAX_BYTES // 2)] * 3)
    fields = console.end()
    assert len(fields["console"]) == 2 and fields["console_truncated"]


# -- list_macros ----------------------------------------------------------

def test_list_macros_gives_names_with_their_descriptions(ctx):
    with rm.Mocker() as mock:
        mock.get(MOON + "/printer/objects/list", json={"result": {"objects": [
            "gcode_macro START_PRINT", "gcode_macro park", "extruder", "gcode_macro ", 7]}})
        heaters_answer(mock)
        result = connector.ACTIONS["list_macros"](ctx, {})
    assert result == {"macros": [{"name": "PARK", "description": ""},
                                 {"name": "START_PRINT", "description": "Heat and home"}], "count": 2}
    assert mock.request_history[1].json() == {"objects": {"configfile": ["settings"]}}


def test_list_macros_with_a_bad_object_list_fails_the_command(ctx):
    with rm.Mocker() as mock:
        mock.get(MOON + "/printer/objects/list", json={"result": {"objects": "many"}})
        with pytest.raises(connector.CommandFailed, match="no objects list"):
            connector.ACTIONS["list_macros"](ctx, {})


# -- set_temperature --------------------------------------------------------

@pytest.mark.parametrize("heater, target, script", [
    ("extruder", 210, "SET_HEATER_TEMPERATURE HEATER=extruder TARGET=210"),
    ("heater_bed", 0, "SET_HEATER_TEMPERATURE HEATER=heater_bed TARGET=0"),
    ("heater_generic chamber", 45.5, "SET_HEATER_TEMPERATURE HEATER=chamber TARGET=45.5")])
def test_set_temperature_sets_the_heaters_target(ctx, heater, target, script):
    with rm.Mocker() as mock:
        heaters_answer(mock)
        mock.post(MOON + "/printer/gcode/script", json={"result": "ok"})
        result = connector.ACTIONS["set_temperature"](ctx, {"heater": heater, "target": target})
    assert mock.request_history[-1].json() == {"script": script}
    assert result["heater"] == heater and result["target"] == target


@pytest.mark.parametrize("params, message", [
    ({"heater": "extruder\nM112", "target": 200}, "invalid param 'heater'"),
    ({"heater": "", "target": 200}, "invalid param 'heater'"),
    ({"heater": ["extruder"], "target": 200}, "invalid param 'heater'"),
    ({"heater": "extruder", "target": "200"}, "invalid param 'target'"),
    ({"heater": "extruder", "target": True}, "invalid param 'target'"),
    ({"heater": "extruder", "target": float("nan")}, "invalid param 'target'"),
    ({"heater": "extruder", "target": float("inf")}, "invalid param 'target'"),
    ({"heater": "extruder"}, "invalid param 'target'")])
def test_set_temperature_with_bad_params_fails_without_calling_moonraker(ctx, params, message):
    with rm.Mocker() as mock:
        with pytest.raises(connector.CommandFailed, match=message):
            connector.ACTIONS["set_temperature"](ctx, params)
        assert mock.call_count == 0


@pytest.mark.parametrize("target", [251, -5, 0.5 - 1])
def test_set_temperature_outside_the_configured_range_never_reaches_klipper(ctx, target):
    with rm.Mocker() as mock:
        heaters_answer(mock)
        with pytest.raises(connector.CommandFailed, match="outside heater extruder's configured range 0 to 250"):
            connector.ACTIONS["set_temperature"](ctx, {"heater": "extruder", "target": target})
        assert [r.path for r in mock.request_history] == ["/printer/objects/query"]


def test_set_temperature_of_a_heater_the_printer_lacks_names_the_ones_it_has(ctx):
    with rm.Mocker() as mock:
        heaters_answer(mock, heaters=("extruder",))
        with pytest.raises(connector.CommandFailed, match='unknown heater "heater_bed"; this printer has: extruder'):
            connector.ACTIONS["set_temperature"](ctx, {"heater": "heater_bed", "target": 60})


def test_set_temperature_without_a_configured_range_fails(ctx):
    with rm.Mocker() as mock:
        heaters_answer(mock, settings={"extruder": {"max_temp": "hot"}})
        with pytest.raises(connector.CommandFailed, match="cannot read the configured min_temp/max_temp"):
            connector.ACTIONS["set_temperature"](ctx, {"heater": "extruder", "target": 60})


def test_emergency_stop_posts_to_moonrakers_emergency_stop(ctx):
    with rm.Mocker() as mock:
        mock.post(MOON + "/printer/emergency_stop", json={"result": "ok"})
        assert connector.ACTIONS["emergency_stop"](ctx, {}) == {}
        assert mock.call_count == 1


# -- long-poll client -------------------------------------------------------

@pytest.fixture
def cloud(config, log):
    return connector.Cloud(config, log)


def test_a_long_poll_asks_for_wait_and_reads_the_declared_hold(cloud, tmp_path):
    splitter = connector.JsonSplitter(str(tmp_path))
    with rm.Mocker() as mock:
        mock.get(CLOUD + "/api/v1/connectors/42/commands", json=[], headers={"X-Poll-Wait": "25"})
        assert cloud.poll_commands(splitter, wait=25) == []
        assert mock.request_history[0].qs == {"limit": ["20"], "wait": ["25"]}
    assert cloud.held == 25.0


@pytest.mark.parametrize("header, held", [(None, None), ("abc", None), ("0", None), ("-3", None),
                                          ("nan", None), ("9" * 40, None), ("600", 25.0), ("10", 10.0)])
def test_the_declared_hold_is_a_positive_number_at_most_what_was_asked(cloud, header, held):
    with rm.Mocker() as mock:
        mock.get(CLOUD + "/api/v1/connectors/42/webcam_requests", json=[],
                 headers={"X-Poll-Wait": header} if header else {})
        cloud.poll_webcam_requests(25)
    assert cloud.held == held


def test_a_poll_without_wait_asks_as_today(cloud, tmp_path):
    with rm.Mocker() as mock:
        mock.get(CLOUD + "/api/v1/connectors/42/commands", json=[], headers={"X-Poll-Wait": "25"})
        cloud.poll_commands(connector.JsonSplitter(str(tmp_path)))
        assert mock.request_history[0].qs == {"limit": ["20"]}
    assert cloud.held is None


# -- pacing -----------------------------------------------------------------

@pytest.fixture
def agent(config, log):
    return connector.Agent(config, log)


def test_a_held_poll_is_asked_again_at_once(agent):
    assert agent._paced(25.0, time.monotonic() - 25.0, 0, 0) == 0.0


def test_a_held_poll_woken_by_a_new_command_is_asked_again_at_once(agent):
    assert agent._paced(25.0, time.monotonic(), 1, 1) == 0.0


def test_a_cloud_that_claims_a_hold_but_answers_at_once_is_polled_at_the_interval(agent):
    assert agent._paced(25.0, time.monotonic(), 0, 0) is None
    assert agent._paced(25.0, time.monotonic(), 3, 0) is None  # only commands seen before


def test_an_old_cloud_is_polled_at_the_interval(agent):
    assert agent._paced(None, time.monotonic() - 30, 0, 0) is None


class Watcher:
    def __init__(self, state):
        self.state = state


def test_polling_relaxes_only_while_idle_and_unasked(agent):
    agent.config.idle_after_seconds = 60
    agent.watchers = {1: Watcher("standby")}
    agent.last_asked = time.monotonic() - 61
    assert agent.relaxed("poll_commands_seconds") == 5.0
    assert agent.relaxed("poll_webcam_seconds") == 5.0
    agent.last_asked = time.monotonic()
    assert agent.relaxed("poll_commands_seconds") == 3.0


@pytest.mark.parametrize("state", ["printing", "paused", None])
def test_a_printing_or_unknown_printer_keeps_the_configured_pace(agent, state):
    agent.config.idle_after_seconds = 60
    agent.watchers = {1: Watcher(state)}
    agent.last_asked = time.monotonic() - 61
    assert agent.relaxed("poll_commands_seconds") == 3.0


def test_idle_after_0_never_relaxes(agent):
    agent.config.idle_after_seconds = 0
    agent.watchers = {1: Watcher("standby")}
    agent.last_asked = time.monotonic() - 10 ** 6
    assert agent.relaxed("poll_commands_seconds") == 3.0


def test_a_slower_configured_pace_is_kept_when_idle(agent):
    agent.config.poll_commands_seconds = 8.0
    agent.watchers = {1: Watcher("complete")}
    agent.last_asked = time.monotonic() - 10 ** 6
    assert agent.relaxed("poll_commands_seconds") == 8.0


# -- lanes ------------------------------------------------------------------

@pytest.mark.parametrize("action, lane", [("emergency_stop", "urgent"), ("pause", "control"), ("cancel", "control"),
                                          ("resume", "control"), ("create_backup", "main"), ("upload_file", "main"),
                                          ("start_print", "main"), ("gcode", "main"), (["pause"], "main"),
                                          ({"a": 1}, "main")])
def test_each_action_has_its_lane(agent, action, lane):
    job = agent.commands.admit(connector.Cloud(agent.config, agent.log), {"id": "c-%s" % lane + str(action),
                                                                           "action": action, "printer_id": 1})
    assert job.lane == lane
