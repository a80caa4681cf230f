"""The installers as owners' machines meet them (issue 17): paths with
spaces and characters special to sh and systemd, full disks, old
Moonraker, two runs at once, stalled and truncating mirrors, ownership
after an update, a re-run that upgrades. Every script runs for real under
dash, bash or BusyBox in a sandbox (installer_fixtures.py); the K1 layout
with nothing but BusyBox and python3 on PATH."""

import os
import pwd
import subprocess

import pytest

from installer_fixtures import (PYZ, config_of, connector_source, heartbeats_of, host_asset, install_args,
                                process_alive, publish_connector, stock_k1_path)


def assert_ok(result):
    assert result.returncode == 0, result.output


def owner(path):
    return pwd.getpwuid(os.lstat(path).st_uid).pw_name


def heartbeat_from(cloud, connector_id, version, since=0):
    return [h for h in heartbeats_of(cloud, connector_id)[since:] if h["body"]["status"]["version"] == version]


def reported_version(sandbox, binary):
    out = subprocess.run([str(binary), "--version"], stdout=subprocess.PIPE, env=sandbox.env, timeout=60)
    return out.stdout.decode().strip().replace("printer-connector ", "")


# ------------------------------------------------------ paths with spaces

def test_klipper_paths_with_spaces_and_shell_characters(odd_sandbox, tmp_path, cloud, printer, release):
    """Install, update and uninstall where every path (the home, the
    install folder, --config in a folder of its own) holds spaces, quotes,
    $, %, backslashes and globs: the unit is quoted for systemd and read
    back by the same rules."""
    box = odd_sandbox
    config_path = box.root / "etc/printer connector/config.json"
    publish_connector(release, "1.0.0", tmp_path)
    result = box.run("dash", "install-klipper.sh", *install_args(cloud, printer), "--config", str(config_path))
    assert_ok(result)
    config = config_of(config_path)
    assert box.unit_state()["user"] == box.user
    cloud.wait_for(lambda: heartbeat_from(cloud, config["connector_id"], "1.0.0"), 15, "a heartbeat")
    assert os.path.isdir(box.klipper_dir / "tmp")

    publish_connector(release, "1.1.0", tmp_path)
    result = box.run("bash", "update.sh")
    assert_ok(result)
    assert reported_version(box, box.klipper_bin) == "1.1.0"
    cloud.wait_for(lambda: heartbeat_from(cloud, config["connector_id"], "1.1.0"), 15, "a 1.1.0 heartbeat")
    assert_ok(box.run("busybox", "update.sh", "--doctor"))

    pid = box.service_pid()
    result = box.run("busybox", "uninstall.sh", "--yes")
    assert_ok(result)
    assert not process_alive(pid)
    assert not box.klipper_dir.exists() and not config_path.exists() and not box.unit().exists()


def test_k1_paths_with_spaces_and_shell_characters(odd_sandbox, tmp_path, cloud, printer, release):
    """The K1 layout under a BusyBox-only PATH: the init script holds the
    paths in single quotes and update.sh and uninstall.sh read them back."""
    box = odd_sandbox
    k1 = stock_k1_path(tmp_path)
    publish_connector(release, "1.0.0", tmp_path, pyz=True)
    result = box.run("busybox", "install-k1.sh", *install_args(cloud, printer), path=k1)
    assert_ok(result)
    config = config_of(box.k1_dir / "config.json")
    cloud.wait_for(lambda: heartbeat_from(cloud, config["connector_id"], "1.0.0"), 15, "a heartbeat")

    publish_connector(release, "1.1.0", tmp_path, pyz=True)
    assert_ok(box.run("busybox", "update.sh", path=k1))
    cloud.wait_for(lambda: heartbeat_from(cloud, config["connector_id"], "1.1.0"), 15, "a 1.1.0 heartbeat")

    child = box.k1_child_pid()
    assert child
    assert_ok(box.run("busybox", "uninstall.sh", "--yes", path=k1))
    assert not process_alive(child)
    assert not box.k1_dir.exists() and not box.k1_init.exists()


def test_install_refuses_a_path_with_a_newline(sandbox, tmp_path, cloud, printer, release):
    publish_connector(release, "1.0.0", tmp_path)
    before = sandbox.snapshot_tree()
    result = sandbox.run("dash", "install-klipper.sh", *install_args(cloud, printer),
                         "--config", str(sandbox.root / "etc/two\nlines.json"))
    assert result.returncode == 1
    assert "--config may not contain a newline" in result.output
    assert sandbox.snapshot_tree() == before
