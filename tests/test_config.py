"""The config file: defaults, validation with one clear line, atomic 0600 rewrites."""

import json
import os
import stat
import subprocess

import pytest

import connector
from harness import connector_cmd

PAIRED = {"cloud_url": "https://cloud.example", "connector_id": 7, "connector_secret": "sk_live_s3cret",
          "moonraker": [{"printer_id": 3, "base_url": "http://127.0.0.1:7125"}]}


def write(tmp_path, data, name="config.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    os.chmod(path, 0o600)
    return str(path)


def test_defaults_fill_what_the_file_leaves_out(tmp_path):
    config = connector.load_config(write(tmp_path, {"pairing_token": "PAIR_x", "moonraker": [{}]}), environ={})
    assert config.cloud_url == "https://www.spoolr.io"
    assert (config.poll_commands_seconds, config.push_snapshots_seconds, config.heartbeat_seconds) == (3, 30, 10)
    assert config.state_dir == "/var/lib/printer-connector"
    assert config.moonraker[0].base_url == "http://127.0.0.1:7125"
    assert config.moonraker[0].ui_port == 80


def test_cloud_url_from_the_environment_wins(tmp_path):
    config = connector.load_config(write(tmp_path, PAIRED), environ={"CLOUD_URL": "http://127.0.0.1:9/"})
    assert config.cloud_url == "http://127.0.0.1:9"


def test_connector_id_number_is_kept_as_a_string(tmp_path):
    assert connector.load_config(write(tmp_path, PAIRED), environ={}).connector_id == "7"


def test_optional_api_key_is_read(tmp_path):
    data = dict(PAIRED, moonraker=[{"printer_id": 3, "base_url": "http://127.0.0.1:7125", "api_key": "k"}])
    assert connector.load_config(write(tmp_path, data), environ={}).moonraker[0].api_key == "k"


@pytest.mark.parametrize("data, expected", [
    ("{\"moonraker\": [}", "invalid JSON at line 1, column 16"),
    ([], "the top level must be a JSON object"),
    (dict(PAIRED, moonraker=[]), "moonraker: must be a non-empty list"),
    (dict(PAIRED, moonraker="x"), "moonraker: must be a non-empty list"),
    (dict(PAIRED, moonraker=[7]), "moonraker[0]: must be an object"),
    (dict(PAIRED, cloud_url="ftp://x"), "cloud_url: must be an http(s) URL"),
    (dict(PAIRED, moonraker=[{"base_url": "localhost:7125"}]), "moonraker[0].base_url: must be an http(s) URL"),
    (dict(PAIRED, moonraker=[{"ui_port": "80"}]), "moonraker[0].ui_port: must be a port number"),
    (dict(PAIRED, moonraker=[{"printer_id": -1}]), "moonraker[0].printer_id: must be an integer >= 0"),
    (dict(PAIRED, moonraker=[{"printer_id": True}]), "moonraker[0].printer_id: must be an integer >= 0"),
    (dict(PAIRED, heartbeat_seconds=0), "heartbeat_seconds: must be a number of seconds > 0"),
    (dict(PAIRED, transfer_allow_hosts="nas.lan"), 'transfer_allow_hosts: must be a list of "host" or "host:port"'),
    (dict(PAIRED, transfer_allow_hosts=["http://nas.lan"]), "transfer_allow_hosts: must be a list of"),
    (dict(PAIRED, transfer_allow_hosts=["nas.lan:http"]), "transfer_allow_hosts: must be a list of"),
    (dict(PAIRED, transfer_allow_hosts=["nas.lan:0"]), "transfer_allow_hosts: must be a list of"),
    (dict(PAIRED, transfer_allow_hosts=[""]), "transfer_allow_hosts: must be a list of"),
    (dict(PAIRED, transfer_allow_hosts=[7]), "transfer_allow_hosts: must be a list of"),
    (dict(PAIRED, transfer_allow_hosts=["*.lan"]), "transfer_allow_hosts: must be a list of"),
    (dict(PAIRED, transfer_allow_hosts=["nas..lan"]), "transfer_allow_hosts: must be a list of"),
    (dict(PAIRED, poll_commands_seconds="3"), "poll_commands_seconds: must be a number of seconds > 0"),
    (dict(PAIRED, pairing_token="PAIR_x"), "pairing_token: set together with connector credentials"),
    ({"moonraker": [{}]}, "pairing_token: missing"),
    (dict(PAIRED, connector_secret=None), "connector_secret: missing"),
    (dict(PAIRED, connector_id=[1]), "connector_id: must be a string or a number"),
])
def test_invalid_config_names_the_file_and_the_field(tmp_path, data, expected):
    path = write(tmp_path, data)
    with pytest.raises(connector.ConfigError) as error:
        connector.load_config(path, environ={})
    assert str(error.value).startswith(path + ": ")
    assert expected in str(error.value)


def test_transfer_allow_hosts_are_read_as_host_and_optional_port(tmp_path):
    config = connector.load_config(write(tmp_path, dict(PAIRED, transfer_allow_hosts=[
        "NAS.lan.", "minio.lan:9000", "192.168.1.20:9000", "[fd00::5]:9000", "[fd00::6]"])), environ={})
    assert config.transfer_allow_hosts == [("nas.lan", None), ("minio.lan", 9000), ("192.168.1.20", 9000),
                                           ("fd00::5", 9000), ("fd00::6", None)]


def test_bad_cloud_url_from_the_environment_says_so(tmp_path):
    with pytest.raises(connector.ConfigError, match=r"CLOUD_URL \(environment\)"):
        connector.load_config(write(tmp_path, PAIRED), environ={"CLOUD_URL": "nope"})


def run_cli(*args):
    return subprocess.run(connector_cmd() + list(args), capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("case", ["missing", "malformed", "invalid"])
def test_cli_reports_a_bad_config_in_one_line_with_exit_2(tmp_path, case):
    path = {"missing": str(tmp_path / "nope.json"),
            "malformed": write(tmp_path, "{"),
            "invalid": write(tmp_path, dict(PAIRED, heartbeat_seconds=-1))}[case]
    result = run_cli("--config", path)
    assert result.returncode == 2
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and path in lines[0], lines
    assert "Traceback" not in result.stderr


def test_cli_without_config_is_a_usage_error():
    result = run_cli()
    assert result.returncode == 2
    assert "--config" in result.stderr


def test_cli_version_needs_no_config():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == "printer-connector %s" % connector.__version__


def test_cli_help_lists_the_options():
    result = run_cli("--help")
    assert result.returncode == 0
    for option in ("--config", "--log-level", "--once", "--version"):
        assert option in result.stdout


def test_cli_rejects_an_unknown_log_level(tmp_path):
    result = run_cli("--config", write(tmp_path, PAIRED), "--log-level", "loud")
    assert result.returncode == 2


def test_group_readable_config_is_tightened_to_0600(tmp_path):
    path = write(tmp_path, PAIRED)
    os.chmod(path, 0o644)
    assert connector.tighten_config_mode(path) is True
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert connector.tighten_config_mode(path) is False


def test_rewrite_keeps_unknown_keys_and_drops_the_token(tmp_path):
    data = {"pairing_token": "PAIR_x", "my_note": {"keep": True},
            "moonraker": [{"printer_id": 0, "base_url": "http://127.0.0.1:7125", "custom": 1}, {}]}
    config = connector.load_config(write(tmp_path, data), environ={})
    connector.apply_registration(config, {"connector": {"id": 42}, "credentials": {"secret": "sk_x"},
                                          "printers": [{"id": 5}, {"id": 6}],
                                          "polling": {"commands_seconds": 4, "snapshots_seconds": 0}})
    connector.save_config(config)
    saved = json.loads(open(config.path).read())
    assert "pairing_token" not in saved
    assert saved["my_note"] == {"keep": True}
    assert saved["connector_id"] == "42" and saved["connector_secret"] == "sk_x"
    assert [p["printer_id"] for p in saved["moonraker"]] == [5, 6]
    assert saved["moonraker"][0]["custom"] == 1
    assert saved["poll_commands_seconds"] == 4
    assert "push_snapshots_seconds" not in saved  # 0 from the cloud is ignored
    assert stat.S_IMODE(os.stat(config.path).st_mode) == 0o600


def test_atomic_write_leaves_no_temp_file_behind(tmp_path):
    target = tmp_path / "file.json"
    connector.atomic_write(str(target), b"{}")
    assert os.listdir(tmp_path) == ["file.json"]
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
