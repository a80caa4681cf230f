"""`printer-connector installer COMMAND`: the JSON and Moonraker work the
install, update and uninstall scripts leave to the binary they verified.
One answer a line on stdout, the reason on stderr, exit 1 for a failure and
2 for bad input."""

import json
import os
import stat
import subprocess

from hypothesis import given
from hypothesis import strategies as st

import connector
import pytest
from harness import connector_cmd

PRINTER_LINE = "0|Desk|http://127.0.0.1:7125"


def installer(*args):
    """The connector as a real process, as the scripts run it."""
    result = subprocess.run(connector_cmd() + ["installer"] + [str(a) for a in args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, timeout=60)
    result.out, result.err = result.stdout.decode(), result.stderr.decode()
    return result


def write(path, data):
    path.write_text(json.dumps(data))
    return path


def paired(tmp_path, **extra):
    return write(tmp_path / "config.json", dict({
        "cloud_url": "https://cloud.example", "connector_id": "c-1", "connector_secret": "s" * 32,
        "moonraker": [{"base_url": "http://127.0.0.1:7125"}, {"base_url": "http://10.0.0.2:7125"}]}, **extra))


# ------------------------------------------------------------ write-config

def test_write_config_writes_a_config_the_connector_reads(tmp_path):
    out = tmp_path / "config.json"
    result = installer("write-config", out, "https://cloud.example/", "PAIR_token", tmp_path / "state",
                       "0|Desk|http://127.0.0.1:7125/\n3|Shelf|http://10.0.0.2:7125|8080\n")
    assert result.returncode == 0, result.err
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    data = json.loads(out.read_text())
    assert data == {"cloud_url": "https://cloud.example", "pairing_token": "PAIR_token",
                    "state_dir": str(tmp_path / "state"),
                    "moonraker": [{"printer_id": 0, "name": "Desk", "base_url": "http://127.0.0.1:7125"},
                                  {"printer_id": 3, "name": "Shelf", "base_url": "http://10.0.0.2:7125",
                                   "ui_port": 8080}]}
    assert connector.load_config(str(out)).pairing_token == "PAIR_token"


@pytest.mark.parametrize("cloud_url, printers, message", [
    ("ftp://cloud", PRINTER_LINE, "the cloud URL must start with http:// or https://, got: ftp://cloud"),
    ("https://cloud", "0|Desk", '--printer wants "ID|Name|URL" or "ID|Name|URL|UI_PORT", got: 0|Desk'),
    ("https://cloud", "x|Desk|http://h", "--printer: the ID and UI_PORT must be numbers, got: x|Desk|http://h"),
    ("https://cloud", "0||http://h", "--printer: the name is empty in: 0||http://h"),
    ("https://cloud", "0|Desk|h:7125", "--printer: the URL must start with http:// or https://, got: 0|Desk|h:7125"),
    ("https://cloud", "\n", "no printer given"),
    ("https://cloud", "0|Desk|http://h|99999", "moonraker[0].ui_port"),
])
def test_write_config_refuses_bad_answers_in_one_line_and_writes_nothing(tmp_path, cloud_url, printers, message):
    out = tmp_path / "config.json"
    result = installer("write-config", out, cloud_url, "PAIR_token", tmp_path / "state", printers)
    assert result.returncode == 2
    assert message in result.err and len(result.err.splitlines()) == 1, result.err
    assert not out.exists()


@given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=80))
def test_printer_lines_are_parsed_or_refused_with_a_config_error(text):
    try:
        printers = connector.parse_printer_lines(text)
    except connector.ConfigError:
        return
    assert printers and all(p["base_url"].startswith(("http://", "https://")) and p["name"] for p in printers)


# ------------------------------------------------------------ the config

def test_config_state_tells_paired_unpaired_and_invalid(tmp_path):
    assert installer("config-state", paired(tmp_path)).out == "paired\n"
    unpaired = write(tmp_path / "new.json", {"pairing_token": "PAIR_t", "moonraker": [{}]})
    assert installer("config-state", unpaired).out == "unpaired\n"
    for name, text in (("notjson.json", "{"), ("empty.json", "{}"), ("list.json", "[]")):
        (tmp_path / name).write_text(text)
        result = installer("config-state", tmp_path / name)
        assert result.returncode == 0 and result.out == "invalid\n"
        assert str(tmp_path / name) in result.err


def test_config_state_does_not_follow_a_link(tmp_path):
    (tmp_path / "link.json").symlink_to(paired(tmp_path))
    result = installer("config-state", tmp_path / "link.json")
    assert result.out == "invalid\n" and "symbolic link" in result.err


def test_config_get_and_printer_urls_read_the_config(tmp_path):
    path = paired(tmp_path)
    assert installer("config-get", path, "connector_id").out == "c-1\n"
    assert installer("config-get", path, "site_name").out == "\n"
    assert installer("printer-urls", path).out == "http://127.0.0.1:7125\nhttp://10.0.0.2:7125\n"


def test_config_set_keeps_every_other_key_and_the_mode(tmp_path):
    path = paired(tmp_path, my_setting={"kept": True})
    before = json.loads(path.read_text())
    result = installer("config-set", path, "state_dir", "/usr/data/printer-connector/state")
    assert result.returncode == 0, result.err
    assert json.loads(path.read_text()) == dict(before, state_dir="/usr/data/printer-connector/state")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_config_commands_say_what_is_wrong_with_a_bad_config(tmp_path):
    path = write(tmp_path / "config.json", {"moonraker": "no"})
    for args in (("config-get", path, "connector_id"), ("printer-urls", path), ("config-set", path, "a", "b")):
        result = installer(*args)
        assert result.returncode == 2 and "%s: moonraker" % path in result.err, result.err
    assert json.loads(path.read_text()) == {"moonraker": "no"}


# ------------------------------------------------------------ Moonraker

def test_moonraker_ok_and_version_ask_server_info(own_printer):
    own_printer.moonraker_version = "v0.9.3-61-g4a7b2c1"
    assert installer("moonraker-ok", own_printer.url).returncode == 0
    assert installer("moonraker-version", own_printer.url).out == "v0.9.3-61-g4a7b2c1\n"


def test_moonraker_ok_fails_saying_why_when_nothing_answers():
    result = installer("moonraker-ok", "http://127.0.0.1:9")
    assert result.returncode == 1 and "refused" in result.err
    assert installer("moonraker-version", "http://127.0.0.1:9").out == "\n"


def test_moonraker_ok_refuses_an_answer_that_is_not_moonraker(printer):
    printer.set_fault("html", "/server/info")
    result = installer("moonraker-ok", printer.url)
    assert result.returncode == 1 and result.err


def test_print_state_reports_what_klipper_does(printer):
    assert installer("print-state", printer.url).out == "standby\n"
    printer.add_file("benchy.gcode")
    printer.set_state("printing", filename="benchy.gcode")
    assert installer("print-state", printer.url).out == "printing\n"


def test_print_state_tells_klipper_down_from_unreachable_and_unknown(printer):
    printer.set_klippy(False)
    assert installer("print-state", printer.url).out == "klippy-down\n"
    printer.set_klippy(True)
    printer.set_fault("wrongtypes", "/printer/objects/query")
    assert installer("print-state", printer.url).out == "unknown\n"
    assert installer("print-state", "http://127.0.0.1:9").out == "unreachable\n"


# ------------------------------------------------------------ the rest

def test_release_info_get_reads_moonrakers_file_or_says_nothing(tmp_path):
    info = write(tmp_path / "release_info.json", {"version": "v1.2.0", "asset_name": "printer-connector-linux-arm64"})
    assert installer("release-info-get", info, "version").out == "v1.2.0\n"
    (tmp_path / "torn.json").write_text('{"version": "v1.')
    for path in (tmp_path / "torn.json", tmp_path / "missing.json"):
        result = installer("release-info-get", path, "version")
        assert result.returncode == 0 and result.out == "\n"


def test_ca_bundle_is_the_one_the_connector_verifies_with(tmp_path):
    import certifi

    result = installer("ca-bundle", tmp_path / "ca.pem")
    assert result.returncode == 0, result.err
    assert (tmp_path / "ca.pem").read_text() == certifi.contents()


def test_the_agents_command_line_is_unchanged():
    result = subprocess.run(connector_cmd() + ["--version"], stdout=subprocess.PIPE, timeout=60)
    assert result.stdout.decode() == "printer-connector %s\n" % connector.__version__
    result = subprocess.run(connector_cmd() + ["installer"], stdout=subprocess.PIPE, timeout=60)
    assert b"write-config" in result.stdout
