"""The install's disk, checked before anything is changed (issue 17): an
install folder on a read-only or a noexec mount, and a tmp folder (the
service's TMPDIR, where the onefile binary unpacks itself and runs) that
is noexec or that the service user cannot write or reach. Real mounts:
bind mounts with ro or noexec, and a tmpfs; the service user is nobody."""

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from installer_fixtures import (PYZ, config_of, connector_source, heartbeats_of, install_args, make_pyz,
                                publish_connector, stock_k1_path)


@pytest.fixture
def mounts(sandbox):
    """bind(FOLDER, OPTION): FOLDER mounted on itself with OPTION (ro,
    noexec); tmpfs(FOLDER, OPTION): a fresh tmpfs there. Unmounted at the
    end, after the sandbox's services are stopped."""
    mounted = []

    class Mounts:
        @staticmethod
        def bind(folder, option):
            folder.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
            mounted.append(folder)
            subprocess.run(["mount", "-o", "remount,bind," + option, str(folder)], check=True)

        @staticmethod
        def tmpfs(folder, option):
            folder.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=755," + option, "tmpfs", str(folder)],
                           check=True)
            mounted.append(folder)
    yield Mounts
    sandbox.cleanup()
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)


def install(sandbox, cloud, printer, release, tmp_path):
    publish_connector(release, "1.0.0", tmp_path)
    result = sandbox.run("dash", "install-klipper.sh", *install_args(cloud, printer))
    assert result.returncode == 0, result.output
    publish_connector(release, "1.1.0", tmp_path)


def assert_refused(sandbox, result, message, pid):
    assert result.returncode == 1, result.output
    assert message in result.output
    assert "nothing was changed" in result.output
    assert sandbox.service_pid() == pid
    assert not list(sandbox.klipper_dir.glob(".stage.*"))


# ------------------------------------------------------------- read-only

def test_update_with_a_read_only_install_folder_says_so(sandbox, mounts, tmp_path, cloud, printer, release):
    install(sandbox, cloud, printer, release, tmp_path)
    pid = sandbox.service_pid()
    mounts.bind(sandbox.klipper_dir, "ro")
    result = sandbox.run("dash", "update.sh")
    assert_refused(sandbox, result, "%s is on a read-only file system (%s)" % (sandbox.klipper_dir,
                                                                              sandbox.klipper_dir), pid)
    assert "mount -o remount,rw" in result.output


def test_k1_install_on_a_read_only_usr_data_says_so(sandbox, mounts, tmp_path, cloud, printer, release):
    usr_data = sandbox.root / "usr/data"
    mounts.bind(usr_data, "ro")
    publish_connector(release, "1.0.0", tmp_path, pyz=True)
    before = sandbox.snapshot_tree()
    result = sandbox.run("busybox", "install-k1.sh", *install_args(cloud, printer), path=stock_k1_path(tmp_path))
    assert result.returncode == 1, result.output
    assert "%s is on a read-only file system (%s): nothing was changed" % (usr_data, usr_data) in result.output
    assert sandbox.snapshot_tree() == before


# ---------------------------------------------------------------- noexec

def test_install_on_a_noexec_disk_is_refused_before_anything_changes(sandbox, mounts, tmp_path, cloud, printer,
                                                                     release):
    mounts.bind(sandbox.home, "noexec")
    publish_connector(release, "1.0.0", tmp_path)
    before = sandbox.snapshot_tree()
    result = sandbox.run("bash", "install-klipper.sh", *install_args(cloud, printer))
    assert result.returncode == 1, result.output
    assert "%s is on a file system mounted noexec (%s)" % (sandbox.klipper_dir, sandbox.home) in result.output
    assert "mount -o remount,exec" in result.output
    assert sandbox.snapshot_tree() == before


def test_update_with_a_noexec_tmp_folder_is_refused(sandbox, mounts, tmp_path, cloud, printer, release):
    """The onefile binary unpacks into the install's tmp folder and runs
    from there: a noexec tmpfs on it stops every start."""
    install(sandbox, cloud, printer, release, tmp_path)
    pid = sandbox.service_pid()
    mounts.tmpfs(sandbox.klipper_dir / "tmp", "noexec")
    result = sandbox.run("busybox", "update.sh")
    tmp = sandbox.klipper_dir / "tmp"
    assert_refused(sandbox, result, "%s is on a file system mounted noexec (%s)" % (tmp, tmp), pid)


def test_k1_on_a_noexec_usr_data_installs_the_pyz_instead_of_the_native_binary(sandbox, mounts, tmp_path, cloud,
                                                                              printer, release):
    mounts.bind(sandbox.root / "usr/data", "noexec")
    pyz = make_pyz("1.0.0", tmp_path)
    release.publish("1.0.0", {"printer-connector-linux-mipsle": connector_source("1.0.0"), PYZ: pyz})
    result = sandbox.run("busybox", "install-k1.sh", *install_args(cloud, printer),
                         env={"PRINTER_CONNECTOR_ARCH": "mips"}, path=stock_k1_path(tmp_path))
    assert result.returncode == 0, result.output
    assert "not printer-connector-linux-mipsle: %s is on a file system mounted noexec" % sandbox.k1_dir \
        in result.output
    assert (sandbox.k1_dir / "printer-connector").read_bytes() == pyz
    config = config_of(sandbox.k1_dir / "config.json")
    cloud.wait_for(lambda: heartbeats_of(cloud, config["connector_id"]), 20, "a heartbeat from the pyz")


# ------------------------------------------- the service user's TMPDIR

def test_update_when_the_service_user_cannot_write_its_tmp_folder(sandbox, mounts, tmp_path, cloud, printer,
                                                                  release):
    install(sandbox, cloud, printer, release, tmp_path)
    pid = sandbox.service_pid()
    tmp = sandbox.klipper_dir / "tmp"
    mounts.bind(tmp, "ro")
    result = sandbox.run("dash", "update.sh")
    assert_refused(sandbox, result, "the service user %s cannot write %s, the connector's TMPDIR (Read-only file system)"
                   % (sandbox.user, tmp), pid)


def test_update_when_the_service_user_cannot_reach_its_tmp_folder(sandbox, tmp_path, cloud, printer, release):
    """No mount: the tmp folder is a link into a folder only root may enter
    (the scripts give the folder itself to the service user, in vain)."""
    install(sandbox, cloud, printer, release, tmp_path)
    pid = sandbox.service_pid()
    private = Path(tempfile.mkdtemp(prefix="root-only-", dir=sandbox.own_base))
    os.chmod(private, 0o700)
    tmp = sandbox.klipper_dir / "tmp"
    os.rmdir(tmp)
    (private / "tmp").mkdir()
    os.symlink(private / "tmp", tmp)
    result = sandbox.run("bash", "update.sh")
    assert_refused(sandbox, result, "the service user %s cannot write %s, the connector's TMPDIR (Permission denied)"
                   % (sandbox.user, tmp), pid)
