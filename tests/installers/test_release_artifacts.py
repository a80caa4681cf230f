"""The installers with the real release artifacts from dist/ (`make pyz
binary` builds them before `make test`): the static binary for this machine
on a Klipper host, the zipapp on a K1."""

import re
import subprocess

import pytest

from installer_fixtures import (PYZ, REPO, config_of, heartbeats_of, host_asset, install_args, process_alive,
                                stock_k1_path, wait_until)
from test_artifacts import python38  # Python 3.8, the K1's: $PYTHON38, python3.8 on PATH or pyenv

pytestmark = pytest.mark.artifacts

DIST = REPO / "dist"


def dist_release(release):
    version = re.search(r'^__version__ = "([^"]+)"', (REPO / "connector.py").read_text(), re.M).group(1)
    assets = {}
    for name in (host_asset(), PYZ):
        path = DIST / name
        assert path.is_file(), "%s is missing: run `make pyz binary`" % path
        assets[name] = path.read_bytes()
    release.publish(version, assets)
    return version


def test_klipper_host_runs_the_static_binary(sandbox, cloud, printer, release):
    version = dist_release(release)
    result = sandbox.run("dash", "install-klipper.sh", *install_args(cloud, printer))
    assert result.returncode == 0, result.output
    binary = sandbox.klipper_bin
    assert binary.read_bytes()[:4] == b"\x7fELF"
    # A native binary is the service's command itself.
    assert "\nExecStart=\"%s\" --config " % binary in sandbox.unit().read_text()
    config = config_of(sandbox.klipper_dir / "config.json")
    cloud.wait_for(lambda: [h for h in heartbeats_of(cloud, config["connector_id"])
                            if h["body"]["status"]["version"] == version], 15, "a heartbeat")
    result = sandbox.run("dash", "update.sh", "--doctor")
    assert result.returncode == 0, result.output

    pid = sandbox.service_pid()
    result = sandbox.run("dash", "uninstall.sh", "--yes")
    assert result.returncode == 0, result.output
    wait_until(lambda: not process_alive(pid), 10, "the connector stopped")


def test_k1_runs_the_zipapp_with_busybox_and_python38(sandbox, tmp_path, cloud, printer, release):
    """As on a stock K1: BusyBox, Python 3.8 without any package, the zipapp."""
    version = dist_release(release)
    k1 = stock_k1_path(tmp_path, python=python38())
    result = sandbox.run("busybox", "install-k1.sh", *install_args(cloud, printer), path=k1)
    assert result.returncode == 0, result.output
    d = sandbox.k1_dir
    assert (d / "printer-connector").read_bytes() == (DIST / PYZ).read_bytes()
    # The CA bundle that verifies later updates comes out of the zipapp.
    assert "BEGIN CERTIFICATE" in (d / "ca-bundle.pem").read_text()
    config = config_of(d / "config.json")
    cloud.wait_for(lambda: [h for h in heartbeats_of(cloud, config["connector_id"])
                            if h["body"]["status"]["version"] == version], 15, "a heartbeat")
    out = subprocess.run(["sh", str(sandbox.k1_init), "status"], stdout=subprocess.PIPE, env=sandbox.env)
    assert out.returncode == 0, out.stdout
    assert "PYTHON='%s/python3'" % k1 in sandbox.k1_init.read_text()
