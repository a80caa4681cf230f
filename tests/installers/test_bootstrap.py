"""The committed entry scripts (installers/NAME.sh, what `wget -qO- URL | sh`
fetches) and installers/bootstrap.sh: they run NAME.sh as a release
publishes it, checked against that release's SHA256SUMS, with the caller's
arguments."""

import re
import shutil
import subprocess

import pytest

from installer_fixtures import (PYZ, REPO, SHELLS, SOURCES, bootstrap_env, config_of, install_args, installer_assets,
                                publish_connector, stock_k1_path)


def run_piped(sandbox, shell, script, *args, env=None, path=None, stdin_tail=b""):
    """As `wget -qO- .../installers/SCRIPT | sh -s -- ARGS`: the committed
    entry arrives on the shell's stdin."""
    full_env = dict(sandbox.env, **(env or {}))
    if path is not None:
        full_env["PATH"] = path
    cmd = [shutil.which(SHELLS[shell][0])] + SHELLS[shell][1:] + ["-s", "--"] + list(args)
    result = subprocess.run(cmd, input=(SOURCES / script).read_bytes() + stdin_tail, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=180, start_new_session=True)
    result.output = result.stdout.decode(errors="replace")
    return result


def echo_script(release_name):
    """A stand-in installer that says which release it came from and what it got."""
    return ('#!/bin/sh\nprintf "%s:"; for a in "$@"; do printf " [%%s]" "$a"; done; echo\n'
            'echo "stdin: $(cat)"\n' % release_name).encode()


def publish_echo_scripts(release, version, latest=True, script="update.sh"):
    release.publish(version, {script: echo_script("release " + version)}, latest=latest)


@pytest.mark.parametrize("shell", ["dash", "bash"])
def test_piped_entry_installs_with_the_release_script(sandbox, shell, tmp_path, cloud, printer, release):
    publish_connector(release, "1.0.0", tmp_path, installers=True)
    result = run_piped(sandbox, shell, "install-klipper.sh", *install_args(cloud, printer),
                       env=bootstrap_env(release))
    assert result.returncode == 0, result.output
    assert "install-klipper.sh: checksum of install-klipper.sh verified" in result.output
    assert "/download/v1.0.0/install-klipper.sh" in release.requests
    config = config_of(sandbox.klipper_dir / "config.json")
    assert config["connector_id"] and "pairing_token" not in config


def test_k1_entry_installs_with_busybox_and_python_only(sandbox, tmp_path, cloud, printer, release):
    """A stock K1: BusyBox wget fetches the bootstrap (plain http here), the
    host's python3 the release files."""
    publish_connector(release, "1.0.0", tmp_path, pyz=True, installers=True)
    result = run_piped(sandbox, "busybox", "install-k1.sh", *install_args(cloud, printer),
                       env=bootstrap_env(release), path=stock_k1_path(tmp_path))
    assert result.returncode == 0, result.output
    assert "checksum of install-k1.sh verified" in result.output
    assert "checksum of %s verified" % PYZ in result.output
    assert config_of(sandbox.k1_dir / "config.json")["connector_id"]


def test_entry_runs_nothing_whose_checksum_does_not_match(sandbox, tmp_path, cloud, printer, release):
    publish_connector(release, "1.0.0", tmp_path, installers=True, bad_sums=("install-klipper.sh",))
    before = sandbox.snapshot_tree()
    registrations = len(cloud.registrations)
    result = run_piped(sandbox, "dash", "install-klipper.sh", *install_args(cloud, printer),
                       env=bootstrap_env(release))
    assert result.returncode == 1, result.output
    assert "install-klipper.sh: error: checksum mismatch for install-klipper.sh" in result.output
    assert sandbox.snapshot_tree() == before and len(cloud.registrations) == registrations


def test_entry_passes_every_argument_through(sandbox, release):
    publish_echo_scripts(release, "2.0.0")
    result = run_piped(sandbox, "dash", "update.sh", "--force", "a b", "'q' $HOME", "", env=bootstrap_env(release))
    assert result.returncode == 0, result.output
    assert "release 2.0.0: [--force] [a b] ['q' $HOME] []\n" in result.output


def test_version_flag_runs_the_script_of_that_release(sandbox, release):
    publish_echo_scripts(release, "1.0.0", latest=False)
    publish_echo_scripts(release, "2.0.0")
    result = run_piped(sandbox, "dash", "update.sh", "--version", "v1.0.0", env=bootstrap_env(release))
    assert result.returncode == 0, result.output
    assert "release 1.0.0: [--version] [v1.0.0]\n" in result.output
    assert "/download/v2.0.0/update.sh" not in release.requests


def test_a_release_without_the_script_is_installed_by_the_latest_one(sandbox, release):
    release.publish("1.0.0", {"printer-connector.pyz": b"old"}, latest=False)
    publish_echo_scripts(release, "2.0.0")
    result = run_piped(sandbox, "dash", "update.sh", "--version", "1.0.0", env=bootstrap_env(release))
    assert result.returncode == 0, result.output
    assert "warning: release 1.0.0 has no update.sh: running the one of release 2.0.0" in result.output
    assert "release 2.0.0: [--version] [1.0.0]\n" in result.output


def test_the_script_does_not_read_the_pipe_the_entry_came_through(sandbox, release):
    publish_echo_scripts(release, "2.0.0")
    result = run_piped(sandbox, "dash", "update.sh", env=bootstrap_env(release), stdin_tail=b"\n# more of the pipe\n")
    assert result.returncode == 0, result.output
    assert "stdin: \n" in result.output


def test_entry_says_when_the_bootstrap_cannot_be_downloaded(sandbox, release):
    env = {"PRINTER_CONNECTOR_BOOTSTRAP_URL": release.url + "/raw/no-such-file.sh"}
    result = run_piped(sandbox, "dash", "uninstall.sh", "--yes", env=env)
    assert result.returncode == 1
    assert "uninstall.sh: error: could not download %s/raw/no-such-file.sh" % release.url in result.output


def test_bootstrap_refuses_an_unknown_script(sandbox):
    result = subprocess.run(["dash", str(SOURCES / "bootstrap.sh"), "rm.sh"], env=sandbox.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert result.returncode == 1
    assert b"no installer is named 'rm.sh'" in result.stdout


def test_a_release_script_installs_its_own_release_not_the_latest(sandbox, tmp_path, cloud, printer, release):
    own = re.search(r'^__version__ = "([^"]+)"', (REPO / "connector.py").read_text(), re.M).group(1)
    subprocess.run(["sh", str(REPO / "build/build-installers.sh"), "--release", str(tmp_path / "assets")],
                   check=True, stdout=subprocess.DEVNULL)
    publish_connector(release, own, tmp_path, latest=False)
    publish_connector(release, "99.0.0", tmp_path)
    result = sandbox.run("dash", tmp_path / "assets/install-klipper.sh", *install_args(cloud, printer))
    assert result.returncode == 0, result.output
    assert "installed printer-connector %s" % own in result.output
    assert "/latest/download/VERSION" not in release.requests
