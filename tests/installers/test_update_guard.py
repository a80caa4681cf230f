"""SIGKILL of update.sh (or of an installer re-run that upgrades) at every
step, and the update guard, a dead-man's switch: whatever step the kill
hits, a connector of the old or the new version runs again *without anyone
running a script*, and the next run of a script recovers and cleans up.

A step is held exactly: a stand-in for one command (mv, rm, curl,
systemctl) first on PATH, which waits when its arguments match, so the
test kills the script's whole process group at that point and no other.
The systemctl stand-in restarts a crashed unit (Restart=always, after
RestartSec=, ExecStartPre= and all) in a process of its own, as systemd
does; the K1 layout's supervisor is the real init script."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from installer_fixtures import (INSTALLERS, PYZ, SERVICE, SHELLS, Hold, config_of, crashing_binary, heartbeats_of,
                                host_asset, install_args, kill_at, publish_connector, start_held, stock_k1_path,
                                wait_until)

ASSET = host_asset()
# The guard's marks beside the binary: none may be left once a script ran.
MARKS = ("update-pending", "update-pending.tmp", "update-starts", "update-restoring", "update-restored",
         "update-release_info.json")


def heartbeat_from(cloud, connector_id, version, since=0):
    return [h for h in heartbeats_of(cloud, connector_id)[since:] if h["body"]["status"]["version"] == version]


def install(sandbox, cloud, printer, release, tmp_path):
    publish_connector(release, "1.0.0", tmp_path)
    result = sandbox.run("dash", "install-klipper.sh", *install_args(cloud, printer))
    assert result.returncode == 0, result.output
    return config_of(sandbox.klipper_dir / "config.json")


def assert_recovered_and_clean(sandbox, version, shell="bash"):
    """A later run of update.sh finds the connector of VERSION working and
    leaves no scratch and no mark behind. (Its heartbeats were seen before.)"""
    d = sandbox.klipper_dir
    restored_by_guard = (d / "update-restored").exists()
    result = sandbox.run(shell, "update.sh", "--version", version, env={"PRINTER_CONNECTOR_HEALTH_TIMEOUT": "20"})
    assert result.returncode == 0, result.output
    assert "%s is up to date" % version in result.output
    if restored_by_guard:
        assert "the update guard put %s back" % version in result.output
    assert not list(d.glob(".stage.*")) and not list(d.glob("*.new")) and not list(d.glob("*.guard"))
    assert [m for m in MARKS if (d / m).exists()] == []
    assert config_of(d / "release_info.json")["version"] == "v" + version
    assert sandbox.service_pid()


BIN = "*/" + ASSET
# Every step of update.sh: (the command held, its arguments, which call,
# held after it ran, whether the new release works, the version that
# must run afterwards with no script run again).
STEPS = {
    "download": ("curl", "*/download/v1.1.0/" + ASSET, 1, False, False, "1.0.0"),
    "backup": ("mv", "-f *backups/%s.1.tmp *backups/%s.1" % (ASSET, ASSET), 1, True, False, "1.0.0"),
    "mark": ("mv", "-f */update-pending.tmp */update-pending", 1, True, False, "1.0.0"),
    "swap": ("mv", "-f %s.new %s" % (BIN, BIN), 1, True, False, "1.0.0"),
    "restart": ("systemctl", "restart " + SERVICE, 1, True, False, "1.0.0"),
    "confirm": ("rm", "*/update-pending", 1, False, True, "1.1.0"),
    "rollback-swap": ("mv", "-f %s.new %s" % (BIN, BIN), 2, False, False, "1.0.0"),
    "rollback-restart": ("systemctl", "restart " + SERVICE, 2, True, False, "1.0.0"),
}


@pytest.mark.parametrize("step", list(STEPS))
def test_sigkill_of_update_at_every_step_leaves_a_connector_running(sandbox, step, tmp_path, cloud, printer,
                                                                    release):
    command, pattern, nth, after, works, want = STEPS[step]
    config = install(sandbox, cloud, printer, release, tmp_path)
    old_pid = sandbox.service_pid()
    if works:
        publish_connector(release, "1.1.0", tmp_path)
    else:
        release.publish("1.1.0", {ASSET: crashing_binary("1.1.0")})
    real = str(sandbox.bin / "systemctl") if command == "systemctl" else None
    hold = Hold(tmp_path, command, pattern, nth, after, real=real)
    # A short health check: the rollback steps come soon after the crash;
    # else the default, as owners run it (a loaded machine starts slowly).
    timeout = "2" if step.startswith("rollback") else "90"
    kill_at(start_held(sandbox, "dash", "update.sh", hold, env={"PRINTER_CONNECTOR_HEALTH_TIMEOUT": timeout}), hold)
    beats = len(heartbeats_of(cloud, config["connector_id"]))

    if step in ("download", "backup", "mark", "swap"):
        # Nothing was restarted: the old connector runs on, untouched...
        assert sandbox.service_pid() == old_pid
    if step in ("mark", "swap"):
        # ...and when it restarts anyway (a reboot, a crash), the guard
        # takes back a swapped-in release that fails.
        subprocess.run(["systemctl", "restart", SERVICE], env=sandbox.env, check=True)
    cloud.wait_for(lambda: sandbox.service_pid() and heartbeat_from(cloud, config["connector_id"], want, beats),
                   45, "a heartbeat from %s with no script run (journal: %s)" % (want, sandbox.journal()[-1500:]))
    assert sandbox.klipper_bin.read_bytes() == (release.dir / ("v" + want) / ASSET).read_bytes()
    if step == "restart":
        assert_the_guard_said_what_it_did(sandbox)
    assert_recovered_and_clean(sandbox, want)


def assert_the_guard_said_what_it_did(sandbox):
    """In the journal, in --doctor, and in the next update.sh."""
    journal = subprocess.run(["journalctl", "-u", SERVICE], env=sandbox.env, stdout=subprocess.PIPE).stdout.decode()
    assert "update guard: start 1 of an update not confirmed yet" in journal
    assert "update guard: version 1.1.0 failed 2 starts in a row: version 1.0.0 is back in place" in journal
    assert config_of(sandbox.klipper_dir / "release_info.json")["version"] == "v1.0.0"
    doctor = sandbox.run("busybox", "update.sh", "--doctor")
    assert doctor.returncode == 1
    assert "the update to 1.1.0 failed to start: the update guard put 1.0.0 back" in doctor.output


def test_update_stops_waiting_once_the_guard_took_the_update_back(sandbox, tmp_path, cloud, printer, release):
    """With the default health check (90 s), a release that crashes at
    every start is over in about two restarts, not 90 s."""
    install(sandbox, cloud, printer, release, tmp_path)
    release.publish("1.1.0", {ASSET: crashing_binary("1.1.0")})
    started = time.monotonic()
    result = sandbox.run("dash", "update.sh", env={"PRINTER_CONNECTOR_HEALTH_TIMEOUT": "90"})
    took = time.monotonic() - started
    assert result.returncode == 1, result.output
    assert "the update guard put the previous one back" in result.output
    assert "update to 1.1.0 failed and was rolled back; 1.0.0 runs again" in result.output
    assert took < 60, took
    assert [m for m in MARKS if (sandbox.klipper_dir / m).exists()] == []


def test_sigkill_of_an_installer_rerun_after_the_restart_leaves_a_connector_running(sandbox, tmp_path, cloud,
                                                                                   printer, release):
    config = install(sandbox, cloud, printer, release, tmp_path)
    release.publish("1.1.0", {ASSET: crashing_binary("1.1.0")})
    hold = Hold(tmp_path, "systemctl", "restart " + SERVICE, 1, True, real=str(sandbox.bin / "systemctl"))
    kill_at(start_held(sandbox, "bash", "install-klipper.sh", hold), hold)
    beats = len(heartbeats_of(cloud, config["connector_id"]))
    cloud.wait_for(lambda: sandbox.service_pid() and heartbeat_from(cloud, config["connector_id"], "1.0.0", beats),
                   45, "a heartbeat from 1.0.0 with no script run")
    assert_recovered_and_clean(sandbox, "1.0.0", shell="dash")


def test_k1_sigkill_of_update_during_the_health_check_leaves_a_connector_running(sandbox, tmp_path, cloud, printer,
                                                                                 release):
    """The K1 layout under a BusyBox-only PATH: the init script's
    supervisor runs the guard before each start of the connector."""
    k1 = stock_k1_path(tmp_path)
    publish_connector(release, "1.0.0", tmp_path, pyz=True)
    result = sandbox.run("busybox", "install-k1.sh", *install_args(cloud, printer), path=k1)
    assert result.returncode == 0, result.output
    config = config_of(sandbox.k1_dir / "config.json")
    release.publish("1.1.0", {PYZ: crashing_binary("1.1.0")})
    proc = subprocess.Popen([shutil.which("busybox"), "sh", str(INSTALLERS / "update.sh")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                            env=dict(sandbox.env, PATH=k1))
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.decode(errors="replace"))
            if "for the first heartbeat" in lines[-1]:
                break
        assert lines and "for the first heartbeat" in lines[-1], "".join(lines)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    beats = len(heartbeats_of(cloud, config["connector_id"]))
    cloud.wait_for(lambda: sandbox.k1_child_pid() and heartbeat_from(cloud, config["connector_id"], "1.0.0", beats),
                   45, "a heartbeat from 1.0.0 with no script run")
    log = (sandbox.k1_dir / "printer-connector.log").read_text()
    assert "update guard: version 1.1.0 failed 2 starts in a row: version 1.0.0 is back in place" in log

    result = sandbox.run("busybox", "update.sh", "--version", "1.0.0", path=k1)
    assert result.returncode == 0, result.output
    assert "the update guard put 1.0.0 back" in result.output
    assert not list(sandbox.k1_dir.glob(".stage.*"))
    assert [m for m in MARKS if (sandbox.k1_dir / m).exists()] == []


# ------------------------------------------------- the guard on its own

def write_guard(tmp_path, shell):
    """The guard as write_guard (common.sh) writes it, in a folder of its own
    beside a binary ("new") and its backup ("old")."""
    d = tmp_path / "install dir"
    (d / "backups").mkdir(parents=True)
    (d / "bin").write_text("new\n")
    (d / "backups" / "bin.1").write_text("old\n")
    script = (INSTALLERS / "update.sh").read_text().rsplit('main "$@"', 1)[0]
    subprocess.run(SHELLS[shell] + ["-c", script + '\nDIR=$1\nwrite_guard\n', "guard", str(d)], check=True)
    return d


def run_guard(d, shell):
    result = subprocess.run(SHELLS[shell] + [str(d / "update-guard"), str(d / "bin")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, timeout=30)
    return result.returncode, result.stdout.decode()


def boot_id():
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def uptime():
    return int(float(Path("/proc/uptime").read_text().split()[0]))


@pytest.mark.parametrize("shell", ["dash", "busybox"])
def test_guard_counts_quick_starts_on_this_boot_and_restores_after_two_failures(tmp_path, shell):
    d = write_guard(tmp_path, shell)
    (d / "update-pending").write_text("1.0.0\n1.1.0\n")
    (d / "release_info.json").write_text('{"version": "v1.1.0"}\n')
    (d / "update-release_info.json").write_text('{"version": "v1.0.0"}\n')
    for start in (1, 2):
        code, out = run_guard(d, shell)
        assert code == 0 and "start %d of an update not confirmed yet" % start in out
        assert (d / "bin").read_text() == "new\n"
    code, out = run_guard(d, shell)
    assert "version 1.1.0 failed 2 starts in a row: version 1.0.0 is back in place" in out
    assert (d / "bin").read_text() == "old\n" and os.access(d / "bin", os.X_OK)
    assert (d / "release_info.json").read_text() == '{"version": "v1.0.0"}\n'
    assert sorted(p.name for p in d.iterdir() if p.name.startswith("update-")) == ["update-guard", "update-restored"]
    assert run_guard(d, shell) == (0, "")  # taken back: later starts are left alone


@pytest.mark.parametrize("shell", ["dash", "busybox"])
@pytest.mark.parametrize("earlier", ["another-boot 5", "%(boot)s %(long_ago)d", "torn line", "", "\0\0\0"])
def test_guard_starts_counting_again_after_a_reboot_a_long_run_or_a_torn_count(tmp_path, shell, earlier):
    d = write_guard(tmp_path, shell)
    (d / "update-pending").write_text("1.0.0\n1.1.0\n")
    lines = earlier % dict(boot=boot_id(), long_ago=uptime() - 301) if "%" in earlier else earlier
    (d / "update-starts").write_text((lines + "\n") * 5)
    code, out = run_guard(d, shell)
    assert code == 0 and "start 1 of an update not confirmed yet" in out, out
    assert (d / "bin").read_text() == "new\n"


@pytest.mark.parametrize("shell", ["dash", "busybox"])
def test_guard_finishes_a_restore_that_was_cut_short(tmp_path, shell):
    d = write_guard(tmp_path, shell)
    (d / "update-restoring").write_text("1.0.0\n1.1.0\n")
    code, out = run_guard(d, shell)
    assert "version 1.0.0 is back in place" in out
    assert (d / "bin").read_text() == "old\n"
    assert (d / "update-restored").exists() and not (d / "update-restoring").exists()


@pytest.mark.parametrize("shell", ["dash", "busybox"])
def test_guard_without_a_backup_says_so_and_the_start_goes_on(tmp_path, shell):
    d = write_guard(tmp_path, shell)
    (d / "backups" / "bin.1").unlink()
    (d / "update-restoring").write_text("1.0.0\n1.1.0\n")
    code, out = run_guard(d, shell)
    assert "there is no backup (%s) to put back" % (d / "backups" / "bin.1") in out
    assert code == 0 and (d / "bin").read_text() == "new\n"


def test_k1_sigkill_of_update_in_the_middle_of_a_restart_leaves_a_connector_running(sandbox, tmp_path, cloud,
                                                                                    printer, release):
    """The init script's restart is a job in a session of its own: update.sh
    killed while it waits for the old connector to stop (between the stop
    and the start), the job still starts it again."""
    k1 = stock_k1_path(tmp_path)
    publish_connector(release, "1.0.0", tmp_path, pyz=True)
    result = sandbox.run("busybox", "install-k1.sh", *install_args(cloud, printer), path=k1)
    assert result.returncode == 0, result.output
    config = config_of(sandbox.k1_dir / "config.json")
    publish_connector(release, "1.1.0", tmp_path, pyz=True)
    old_child = sandbox.k1_child_pid()
    # The first "sleep 0.1" is the stop's wait for the old supervisor to end.
    hold = Hold(tmp_path, "sleep", "0.1", 1, pause=3, real=os.path.join(k1, "sleep"))
    kill_at(start_held(sandbox, "busybox", "update.sh", hold, path=k1), hold)
    beats = len(heartbeats_of(cloud, config["connector_id"]))
    cloud.wait_for(lambda: sandbox.k1_child_pid() not in (None, old_child)
                   and heartbeat_from(cloud, config["connector_id"], "1.1.0", beats), 45,
                   "a heartbeat from the restarted 1.1.0 with no script run")
    result = sandbox.run("busybox", "update.sh", path=k1)
    assert result.returncode == 0, result.output
    assert "runs and sends heartbeats: confirming it" in result.output
    assert [m for m in MARKS if (sandbox.k1_dir / m).exists()] == []

