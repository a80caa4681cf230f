"""update.sh with the real static binary: two builds of connector.py that
differ only in version (dist/'s, from `make binary`, and one built here from
a copy with the next version), served from the loopback release server,
where the downloaders write them 0644. The other installer tests run
connector.py through python3 as the "release binary", which is why a native
binary that could not run its --version check went unnoticed (issue 17).
"""

import os
import re
import signal
import subprocess
import time

import pytest

from installer_fixtures import (REPO, SERVICE, Hold, config_of, connector_source, heartbeats_of, host_asset,
                                install_args, kill_at, process_alive, start_held, wait_until)

pytestmark = pytest.mark.artifacts

DIST_BINARY = REPO / "dist" / host_asset()
NEXT_WORK = REPO / "build" / "work" / "next-release"


def source_version():
    return re.search(r'^__version__ = "([^"]+)"', (REPO / "connector.py").read_text(), re.M).group(1)


def bumped(version, by=1):
    head, last = re.match(r"^(.*?)(\d+)$", version).groups()
    return "%s%d" % (head, int(last) + by)


def build_next_binary(version):
    """The static binary of connector.py with only its version changed,
    built by build/build-binary.sh (skipped while its inputs are unchanged)."""
    NEXT_WORK.mkdir(parents=True, exist_ok=True)
    source = NEXT_WORK / "connector.py"
    text = connector_source(version)
    if not source.exists() or source.read_bytes() != text:
        source.write_bytes(text)
    out = NEXT_WORK / host_asset()
    env = dict(os.environ, CONNECTOR_SOURCE=str(source), BINARY_OUT=str(out), BINARY_WORK=str(NEXT_WORK / "work"))
    built = subprocess.run(["sh", str(REPO / "build/build-binary.sh"), "native"], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=900)
    assert built.returncode == 0, built.stdout.decode(errors="replace")
    return out.read_bytes()


CRASHING_C = r'''
#include <stdio.h>
#include <string.h>
int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "--version") == 0) {
        puts("printer-connector " VERSION);
        return 0;
    }
    puts("time=x level=ERROR msg=\"broken native build\"");
    return 1;
}
'''


def crashing_native_binary(version, workdir):
    """A native (ELF) release that passes the --version check and exits 1 at start."""
    source = workdir / "crash.c"
    source.write_text(CRASHING_C)
    out = workdir / "crash"
    subprocess.run(["cc", "-O1", "-DVERSION=\"%s\"" % version, "-o", str(out), str(source)], check=True)
    return out.read_bytes()


@pytest.fixture(scope="session")
def static_releases():
    """{version: bytes} of dist's binary and the next one, in release order."""
    assert DIST_BINARY.is_file(), "%s is missing: run `make binary`" % DIST_BINARY
    current = source_version()
    return [(current, DIST_BINARY.read_bytes()), (bumped(current), build_next_binary(bumped(current)))]


def native_version(sandbox, binary):
    out = subprocess.run([str(binary), "--version"], stdout=subprocess.PIPE, env=sandbox.env, timeout=60)
    return out.stdout.decode().strip().replace("printer-connector ", "")


def install_static(sandbox, cloud, printer, release, version, data, shell):
    release.publish(version, {host_asset(): data})
    result = sandbox.run(shell, "install-klipper.sh", *install_args(cloud, printer))
    assert result.returncode == 0, result.output
    return config_of(sandbox.klipper_dir / "config.json")


def heartbeat_from(cloud, connector_id, version, since=0):
    return [h for h in heartbeats_of(cloud, connector_id)[since:] if h["body"]["status"]["version"] == version]


def test_static_binary_updates_to_the_next_release_and_rolls_back(sandbox, cloud, printer, release,
                                                                  static_releases):
    (old, old_data), (new, new_data) = static_releases
    config = install_static(sandbox, cloud, printer, release, old, old_data, "dash")
    old_pid = sandbox.service_pid()
    release.publish(new, {host_asset(): new_data})

    result = sandbox.run("dash", "update.sh")
    assert result.returncode == 0, result.output
    assert "updating %s -> %s" % (old, new) in result.output
    assert sandbox.klipper_bin.read_bytes() == new_data
    assert native_version(sandbox, sandbox.klipper_bin) == new
    assert config_of(sandbox.klipper_dir / "release_info.json")["version"] == "v" + new
    assert not process_alive(old_pid) and sandbox.service_pid()
    cloud.wait_for(lambda: heartbeat_from(cloud, config["connector_id"], new), 20, "a heartbeat from " + new)

    beats = len(heartbeats_of(cloud, config["connector_id"]))
    result = sandbox.run("bash", "update.sh", "--rollback")
    assert result.returncode == 0, result.output
    assert "rolled back to %s" % old in result.output
    assert sandbox.klipper_bin.read_bytes() == old_data
    cloud.wait_for(lambda: heartbeat_from(cloud, config["connector_id"], old, beats), 20, "a heartbeat from " + old)


def test_crashing_native_release_is_rolled_back_to_the_static_binary(sandbox, tmp_path, cloud, printer, release,
                                                                     static_releases):
    (old, old_data), _ = static_releases
    config = install_static(sandbox, cloud, printer, release, old, old_data, "busybox")
    broken = bumped(old, 2)
    release.publish(broken, {host_asset(): crashing_native_binary(broken, tmp_path)})
    beats = len(heartbeats_of(cloud, config["connector_id"]))

    result = sandbox.run("busybox", "update.sh", env={"PRINTER_CONNECTOR_HEALTH_TIMEOUT": "4"})
    assert result.returncode == 1, result.output
    assert "version %s does not work here: restoring %s" % (broken, old) in result.output
    assert "broken native build" in result.output
    assert "update to %s failed and was rolled back; %s runs again" % (broken, old) in result.output
    assert sandbox.klipper_bin.read_bytes() == old_data
    assert config_of(sandbox.klipper_dir / "release_info.json")["version"] == "v" + old
    cloud.wait_for(lambda: heartbeat_from(cloud, config["connector_id"], old, beats), 20,
                   "a heartbeat from the restored " + old)


def test_update_guard_puts_the_static_binary_back_when_update_is_killed_after_the_restart(
        sandbox, tmp_path, cloud, printer, release, static_releases):
    """SIGKILL of update.sh right after it restarted the service onto a
    crashing native release: with no script run again, the update guard
    (ExecStartPre=, run as the service user) puts the static binary back
    after two failed starts, and it sends heartbeats."""
    (old, old_data), _ = static_releases
    config = install_static(sandbox, cloud, printer, release, old, old_data, "dash")
    broken = bumped(old, 3)
    release.publish(broken, {host_asset(): crashing_native_binary(broken, tmp_path)})
    hold = Hold(tmp_path, "systemctl", "restart " + SERVICE, 1, True, real=str(sandbox.bin / "systemctl"))
    kill_at(start_held(sandbox, "dash", "update.sh", hold), hold)
    beats = len(heartbeats_of(cloud, config["connector_id"]))
    cloud.wait_for(lambda: sandbox.service_pid() and heartbeat_from(cloud, config["connector_id"], old, beats), 60,
                   "a heartbeat from the static %s with no script run" % old)
    assert sandbox.klipper_bin.read_bytes() == old_data
    assert (sandbox.klipper_dir / "update-restored").exists()
    result = sandbox.run("busybox", "update.sh", "--version", old)
    assert result.returncode == 0, result.output
    assert "the update guard put %s back" % old in result.output


def test_static_binary_stops_at_once_soon_after_a_start(sandbox, cloud, printer, release, static_releases):
    """systemd stops a unit with SIGTERM; right after a start (while the
    onefile binary unpacks itself) the stop must still take effect at once,
    not hang until SIGKILL, and leave nothing unpacked behind."""
    (old, old_data), _ = static_releases
    install_static(sandbox, cloud, printer, release, old, old_data, "dash")
    tmp = sandbox.klipper_dir / "tmp"
    for attempt in range(3):
        subprocess.run(["systemctl", "stop", SERVICE], env=sandbox.env, check=True)
        subprocess.run(["systemctl", "start", SERVICE], env=sandbox.env, check=True)
        wait_until(lambda: any(p.name.startswith("_MEI") for p in tmp.iterdir()), 30, "the binary unpacking")
        started = time.monotonic()
        subprocess.run(["systemctl", "stop", SERVICE], env=sandbox.env, check=True)
        assert time.monotonic() - started < 8, "attempt %d: the stop took %.1f s" % (attempt, time.monotonic() - started)
        assert not sandbox.unit_state().get("sigkilled"), "attempt %d needed SIGKILL" % attempt
    # A stop in the middle of unpacking may leave a partial folder: the
    # next start removes it before the binary unpacks again.
    subprocess.run(["systemctl", "start", SERVICE], env=sandbox.env, check=True)
    wait_until(lambda: 'msg="Heartbeat sent"' in sandbox.journal(), 30, "a heartbeat")
    assert len([p for p in tmp.iterdir() if p.name.startswith("_MEI")]) == 1


def test_unpacked_folders_of_a_killed_binary_are_removed_at_the_next_start(sandbox, cloud, printer, release,
                                                                          static_releases):
    (old, old_data), _ = static_releases
    install_static(sandbox, cloud, printer, release, old, old_data, "dash")
    tmp = sandbox.klipper_dir / "tmp"
    pid = sandbox.service_pid()
    wait_until(lambda: len(list(tmp.iterdir())) >= 2, 30, "the binary's unpacked folders")
    unpacked = sorted(p.name for p in tmp.iterdir())
    assert any(n.startswith("_MEI") for n in unpacked) and any(n.startswith("staticx-") for n in unpacked), unpacked
    # All three processes in one signal, as the OOM killer of a cgroup would:
    # killed one by one, the bootloader whose child died first cleans up.
    os.killpg(pid, signal.SIGKILL)
    wait_until(lambda: not process_alive(pid), 10, "the binary killed")
    assert sorted(p.name for p in tmp.iterdir()), "the kill left nothing to clean up"
    subprocess.run(["systemctl", "start", SERVICE], env=sandbox.env, check=True)
    new_pid = sandbox.service_pid()
    assert new_pid and new_pid != pid
    wait_until(lambda: not set(unpacked) & {p.name for p in tmp.iterdir()}, 15, "the stale folders removed")


def test_update_gives_the_service_user_back_a_tmpdir_it_cannot_write(sandbox, cloud, printer, release,
                                                                     static_releases):
    """The static binary unpacks into TMPDIR (the install's tmp folder): one
    left to root (a run by hand as root) must not stop the updated service."""
    (old, old_data), (new, new_data) = static_releases
    config = install_static(sandbox, cloud, printer, release, old, old_data, "dash")
    tmp = sandbox.klipper_dir / "tmp"
    os.chown(tmp, 0, 0)
    os.chmod(tmp, 0o755)
    release.publish(new, {host_asset(): new_data})
    result = sandbox.run("busybox", "update.sh")
    assert result.returncode == 0, result.output
    assert os.stat(tmp).st_uid == os.stat(sandbox.klipper_dir).st_uid
    cloud.wait_for(lambda: heartbeat_from(cloud, config["connector_id"], new), 20, "a heartbeat from " + new)


def test_update_is_refused_where_the_static_binary_could_not_unpack_and_run(sandbox, cloud, printer, release,
                                                                            static_releases, tmp_path):
    """The premise of the noexec check, with the real binary: from a noexec
    TMPDIR it cannot run at all (staticx execs what it unpacked), so
    update.sh refuses before anything changes and the old one runs on."""
    (old, old_data), (new, new_data) = static_releases
    install_static(sandbox, cloud, printer, release, old, old_data, "dash")
    pid = sandbox.service_pid()
    noexec = tmp_path / "noexec"
    noexec.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,noexec", "tmpfs", str(noexec)], check=True)
    try:
        probe = subprocess.run([str(sandbox.klipper_bin), "--version"], env=dict(sandbox.env, TMPDIR=str(noexec)),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        assert probe.returncode != 0 and b"Permission denied" in probe.stdout, probe.stdout
        tmp = sandbox.klipper_dir / "tmp"
        subprocess.run(["mount", "--bind", str(noexec), str(tmp)], check=True)
        release.publish(new, {host_asset(): new_data})
        result = sandbox.run("dash", "update.sh")
        assert result.returncode == 1, result.output
        assert "%s is on a file system mounted noexec" % tmp in result.output
        assert sandbox.klipper_bin.read_bytes() == old_data and sandbox.service_pid() == pid
    finally:
        sandbox.cleanup()
        subprocess.run(["umount", "-l", str(sandbox.klipper_dir / "tmp")], check=False)
        subprocess.run(["umount", "-l", str(noexec)], check=False)

