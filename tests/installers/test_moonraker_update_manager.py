"""Moonraker's update manager (Mainsail/Fluidd's Update Manager panel) sees
the connector the installers set up: checked with the real Moonraker from
PyPI, its data folder and config inside the sandbox, run as the `moonraker`
unit of the systemctl stand-in so that the scripts' restarts are real.
Moonraker cannot reach GitHub here: the local half is what is tested."""

import json
import os
import socket
import subprocess

import pytest
import requests

from installer_fixtures import (REPO, SERVICE, config_of, heartbeats_of, host_asset, install_args,
                                publish_connector, wait_until)


def assert_ok(result):
    assert result.returncode == 0, result.output


def moonraker_bin():
    path = os.environ.get("MOONRAKER_BIN") or str(REPO / ".venv-moonraker/bin/moonraker")
    assert os.access(path, os.X_OK), "the real Moonraker is missing: run `make .venv-moonraker/.stamp`"
    return path


class Moonraker:
    """The real Moonraker as the sandbox's `moonraker` systemd unit."""

    def __init__(self, sandbox):
        self.sandbox = sandbox
        data = sandbox.printer_data
        for folder in ("gcodes", "logs", "misc", "comms"):
            (data / folder).mkdir(exist_ok=True)
        (data / "misc/usb.ids").write_text("")  # else it is fetched from linux-usb.org
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = "http://127.0.0.1:%d" % self.port
        conf = data / "config/moonraker.conf"
        conf.write_text("\n".join([
            "[server]", "host: 127.0.0.1", "port: %d" % self.port,
            "klippy_uds_address: %s" % (data / "comms/klippy.sock"), "",
            "[authorization]", "trusted_clients:", "    127.0.0.0/8", "",
            "[machine]", "provider: none", "validate_service: False", "validate_config: False", "",
            "[announcements]", "enable_moonlight: False", "",
            "[update_manager]", "enable_auto_refresh: False", "enable_system_updates: False", ""]))
        unit = sandbox.unit("moonraker")
        unit.parent.mkdir(parents=True, exist_ok=True)
        unit.write_text("[Service]\nExecStart=%s -d %s -c %s -n\n" % (moonraker_bin(), data, conf))
        self.conf = conf

    def systemctl(self, *args):
        subprocess.run(["systemctl"] + list(args), env=self.sandbox.env, check=True)

    def wait_ready(self, after_pid=None):
        def ready():
            pid = self.sandbox.service_pid("moonraker")
            if not pid or pid == after_pid:
                return False
            try:
                return requests.get(self.url + "/server/info", timeout=1).status_code == 200
            except requests.ConnectionError:
                return False
        wait_until(ready, 30, "Moonraker answering (log: %s)" % self.sandbox.journal("moonraker")[-2000:])

    def restart(self):
        pid = self.sandbox.service_pid("moonraker")
        self.systemctl("restart", "moonraker")
        self.wait_ready(after_pid=pid)

    def get(self, path):
        response = requests.get(self.url + path, timeout=10)
        response.raise_for_status()
        return response.json()["result"]

    def update_entry(self, name=SERVICE):
        return self.get("/machine/update/status").get("version_info", {}).get(name)

    def warnings(self):
        return self.get("/server/info").get("warnings", [])


@pytest.fixture
def moonraker(sandbox):
    server = Moonraker(sandbox)
    server.systemctl("start", "moonraker")
    server.wait_ready()
    return server


def assert_listed(moonraker, version, name=SERVICE):
    entry = moonraker.update_entry(name)
    assert entry, json.dumps(moonraker.get("/machine/update/status"), indent=1)
    assert entry["configured_type"] == "executable"
    assert entry["is_valid"] is True, entry
    assert entry["version"] == version
    assert (entry["owner"], entry["repo_name"]) == ("printdock", "printer-connector")
    assert entry["warnings"] == [] and entry["anomalies"] == [], entry
    assert [w for w in moonraker.warnings() if name in w] == []


def test_listed_by_moonraker_and_follows_update_and_uninstall(sandbox, moonraker, tmp_path, cloud, printer,
                                                              release):
    publish_connector(release, "1.0.0", tmp_path)
    assert moonraker.update_entry() is None
    owner_conf = moonraker.conf.read_text()

    result = sandbox.run("dash", "install-klipper.sh", *install_args(cloud, printer))
    assert_ok(result)
    assert "restarted Moonraker" in result.output
    moonraker.wait_ready()
    conf = moonraker.conf.read_text()
    assert conf == owner_conf + "[include printer-connector-update.conf]\n"
    section = (sandbox.printer_data / "config/printer-connector-update.conf").read_text()
    assert "[update_manager printer-connector]\ntype: executable\nchannel: stable\n" in section
    assert "repo: printdock/printer-connector\npath: %s\nmanaged_services: printer-connector\n" \
        % sandbox.klipper_dir in section
    assert_listed(moonraker, "v1.0.0")

    # Re-running changes nothing in Moonraker's files, so it is not restarted.
    moonraker_pid = sandbox.service_pid("moonraker")
    assert_ok(sandbox.run("dash", "install-klipper.sh"))
    assert moonraker.conf.read_text() == conf
    assert sandbox.service_pid("moonraker") == moonraker_pid
    assert (sandbox.printer_data / "moonraker.asvc").read_text().split().count(SERVICE) == 1

    publish_connector(release, "1.1.0", tmp_path)
    assert_ok(sandbox.run("busybox", "update.sh"))
    moonraker.restart()
    assert_listed(moonraker, "v1.1.0")

    result = sandbox.run("dash", "uninstall.sh", "--yes")
    assert_ok(result)
    moonraker.wait_ready()
    assert moonraker.update_entry() is None
    assert moonraker.conf.read_text() == owner_conf
    assert not (sandbox.printer_data / "config/printer-connector-update.conf").exists()
    assert [w for w in moonraker.warnings() if SERVICE in w] == []


def test_each_service_name_gets_its_own_section(sandbox, moonraker, tmp_path, cloud, printer, release):
    publish_connector(release, "1.0.0", tmp_path)
    assert_ok(sandbox.run("dash", "install-klipper.sh", *install_args(cloud, printer)))
    assert_ok(sandbox.run("bash", "install-klipper.sh", "--service-name", "printer-connector-2",
                          *install_args(cloud, printer)))
    moonraker.wait_ready()
    first = config_of(sandbox.klipper_dir / "config.json")
    second = config_of(sandbox.home / "printer-connector-2/config.json")
    assert first["connector_id"] != second["connector_id"]
    for config in (first, second):
        cloud.wait_for(lambda: heartbeats_of(cloud, config["connector_id"]), 10, "heartbeats")
    assert_listed(moonraker, "v1.0.0")
    assert_listed(moonraker, "v1.0.0", name="printer-connector-2")
    assert "[update_manager printer-connector-2]" in \
        (sandbox.printer_data / "config/printer-connector-2-update.conf").read_text()
    asvc = (sandbox.printer_data / "moonraker.asvc").read_text().split()
    assert asvc[-2:] == [SERVICE, "printer-connector-2"]

    assert_ok(sandbox.run("dash", "uninstall.sh", "--yes", "--service-name", "printer-connector-2"))
    moonraker.wait_ready()
    assert moonraker.update_entry("printer-connector-2") is None
    assert_listed(moonraker, "v1.0.0")
    assert sandbox.service_pid(SERVICE)


def test_no_update_manager_leaves_moonraker_alone(sandbox, tmp_path, cloud, printer, release):
    publish_connector(release, "1.0.0", tmp_path)
    before = {p: p.read_bytes() for p in sandbox.printer_data.rglob("*") if p.is_file()}
    result = sandbox.run("busybox", "install-klipper.sh", "--no-update-manager", *install_args(cloud, printer))
    assert_ok(result)
    after = {p: p.read_bytes() for p in sandbox.printer_data.rglob("*") if p.is_file()}
    assert after == before
    assert "moonraker" not in [c[-1] for c in sandbox.systemctl_calls("restart")]
    # release_info.json is still written: update.sh and --doctor keep using it.
    assert config_of(sandbox.klipper_dir / "release_info.json")["version"] == "v1.0.0"


def test_doctor_reports_a_binary_that_disagrees_with_release_info(sandbox, tmp_path, cloud, printer, release):
    publish_connector(release, "1.0.0", tmp_path)
    assert_ok(sandbox.run("dash", "install-klipper.sh", *install_args(cloud, printer)))
    result = sandbox.run("dash", "update.sh", "--doctor")
    assert_ok(result)
    assert "release_info.json: version 1.0.0" in result.output and "no problems found" in result.output

    # What a half-done update through Moonraker would leave.
    info_path = sandbox.klipper_dir / "release_info.json"
    info = config_of(info_path)
    info["version"] = "v1.1.0"
    info_path.write_text(json.dumps(info))
    result = sandbox.run("busybox", "update.sh", "--doctor")
    assert result.returncode == 1
    assert "release_info.json says 1.1.0 but the binary is 1.0.0" in result.output

    # update.sh repairs it (the binary is what counts: 1.0.0 is installed).
    publish_connector(release, "1.1.0", tmp_path)
    assert_ok(sandbox.run("dash", "update.sh"))
    assert_ok(sandbox.run("dash", "update.sh", "--doctor"))
    assert config_of(info_path)["version"] == "v1.1.0"
    assert host_asset() == config_of(info_path)["asset_name"]
