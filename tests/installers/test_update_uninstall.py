"""update.sh and uninstall.sh on installations made by the installers (and
by the Go connector), run for real in a sandbox."""

import json
import os
import signal
import stat
import subprocess
import sys

import pytest

from installer_fixtures import (INSTALLERS, PYZ, SERVICE, config_of, connector_source, crashing_binary, dead_binary,
                                heartbeats_of, host_asset, install_args, process_alive,
                                publish_connector, wait_until)


def assert_ok(result):
    assert result.returncode == 0, result.output


def version_of(sandbox, binary):
    out = subprocess.run([sys.executable, str(binary), "--version"],
                         stdout=subprocess.PIPE, env=sandbox.env).stdout.decode().strip()
    return out.replace("printer-connector ", "")


def install_klipper(sandbox, cloud, printer, release, tmp_path, version="1.0.0", shell="dash"):
    publish_connector(release, version, tmp_path)
    assert_ok(sandbox.run(shell, "install-klipper.sh", *install_args(cloud, printer)))
    return config_of(sandbox.klipper_dir / "config.json")


def install_k1(sandbox, cloud, printer, release, tmp_path, version="1.0.0", shell="dash"):
    publish_connector(release, version, tmp_path, pyz=True)
    assert_ok(sandbox.run(shell, "install-k1.sh", *install_args(cloud, printer)))
    return config_of(sandbox.k1_dir / "config.json")


def heartbeat_from_version(cloud, connector_id, version, since=0):
    return [h for h in heartbeats_of(cloud, connector_id)[since:] if h["body"]["status"]["version"] == version]


# ---------------------------------------------------------------- update.sh

def test_update_to_a_good_release(sandbox, tmp_path, cloud, printer, release):
    config = install_klipper(sandbox, cloud, printer, release, tmp_path)
    d = sandbox.klipper_dir
    old_pid = sandbox.service_pid()
    publish_connector(release, "1.1.0", tmp_path)
    served = len(release.requests)

    result = sandbox.run("dash", "update.sh")
    assert_ok(result)
    assert "updating 1.0.0 -> 1.1.0" in result.output
    assert "checksum of %s verified" % host_asset() in result.output
    assert version_of(sandbox, sandbox.klipper_bin) == "1.1.0"
    assert version_of(sandbox, d / "backups" / (host_asset() + ".1")) == "1.0.0"
    assert config_of(d / "release_info.json")["version"] == "v1.1.0"
    assert config_of(d / "config.json") == config
    assert release.requests[served:] == ["/latest/download/VERSION", "/download/v1.1.0/SHA256SUMS",
                                         "/download/v1.1.0/" + host_asset()]
    new_pid = sandbox.service_pid()
    assert new_pid and new_pid != old_pid and not process_alive(old_pid)
    assert 'msg="Heartbeat sent"' in sandbox.journal()
    cloud.wait_for(lambda: heartbeat_from_version(cloud, config["connector_id"], "1.1.0"), 10,
                   "a heartbeat from 1.1.0")
    assert not list(d.glob(".stage*")) and not (d / "printer-connector.new").exists()

    # Up to date: nothing is stopped or downloaded.
    calls = len(sandbox.systemctl_calls("start", "stop", "restart"))
    served = len(release.requests)
    result = sandbox.run("busybox", "update.sh")
    assert_ok(result)
    assert "1.1.0 is up to date" in result.output
    assert len(sandbox.systemctl_calls("start", "stop", "restart")) == calls
    assert release.requests[served:] == ["/latest/download/VERSION"]
    assert sandbox.service_pid() == new_pid

    # --version picks a release, also an older one.
    result = sandbox.run("bash", "update.sh", "--version", "1.0.0")
    assert_ok(result)
    assert "updating 1.1.0 -> 1.0.0" in result.output
    assert version_of(sandbox, sandbox.klipper_bin) == "1.0.0"
    assert release.requests[-1] == "/download/v1.0.0/" + host_asset()


def test_update_with_a_bad_checksum_changes_nothing(sandbox, tmp_path, cloud, printer, release):
    install_klipper(sandbox, cloud, printer, release, tmp_path, shell="bash")
    d = sandbox.klipper_dir
    before = sandbox.snapshot_tree()
    binary = (sandbox.klipper_bin).read_bytes()
    pid, calls = sandbox.service_pid(), len(sandbox.changes())
    publish_connector(release, "1.1.0", tmp_path, bad_sums=(host_asset(),))

    result = sandbox.run("bash", "update.sh")
    assert result.returncode == 1
    assert "checksum mismatch for %s" % host_asset() in result.output
    assert "nothing was changed" in result.output
    assert (sandbox.klipper_bin).read_bytes() == binary
    assert sandbox.snapshot_tree() == before
    assert sandbox.changes()[calls:] == []
    assert sandbox.service_pid() == pid


def test_update_to_a_binary_that_does_not_run_changes_nothing(sandbox, tmp_path, cloud, printer, release):
    install_klipper(sandbox, cloud, printer, release, tmp_path)
    before = sandbox.snapshot_tree()
    calls = len(sandbox.changes())
    release.publish("1.1.0", {host_asset(): dead_binary()})
    result = sandbox.run("busybox", "update.sh")
    assert result.returncode == 1
    assert "reports 'nothing' instead of 1.1.0; nothing was changed" in result.output
    assert sandbox.snapshot_tree() == before
    assert sandbox.changes()[calls:] == []


@pytest.mark.parametrize("shell", ["busybox"])
def test_update_to_a_binary_that_exits_at_start_rolls_back(sandbox, shell, tmp_path, cloud, printer, release):
    config = install_klipper(sandbox, cloud, printer, release, tmp_path, shell=shell)
    d = sandbox.klipper_dir
    old = (sandbox.klipper_bin).read_bytes()
    release.publish("1.1.0", {host_asset(): crashing_binary("1.1.0")})
    beats = len(heartbeats_of(cloud, config["connector_id"]))

    result = sandbox.run(shell, "update.sh", env={"PRINTER_CONNECTOR_HEALTH_TIMEOUT": "4"})
    assert result.returncode == 1, result.output
    assert "version 1.1.0 does not work here: restoring 1.0.0" in result.output
    assert "broken build" in result.output  # the failed run's log, shown
    assert "update to 1.1.0 failed and was rolled back; 1.0.0 runs again" in result.output
    assert (sandbox.klipper_bin).read_bytes() == old
    assert config_of(d / "release_info.json")["version"] == "v1.0.0"
    assert sandbox.service_pid()
    assert 'msg="Heartbeat sent"' in sandbox.journal()
    cloud.wait_for(lambda: heartbeat_from_version(cloud, config["connector_id"], "1.0.0", beats), 10,
                   "a heartbeat from the restored 1.0.0")


def test_update_cut_short_after_the_swap_puts_the_old_version_back(sandbox, tmp_path, cloud, printer, release):
    """A dropped SSH session (SIGHUP to the script's process group) while
    the new version is being health-checked."""
    config = install_klipper(sandbox, cloud, printer, release, tmp_path)
    old = sandbox.klipper_bin.read_bytes()
    release.publish("1.1.0", {host_asset(): crashing_binary("1.1.0")})
    beats = len(heartbeats_of(cloud, config["connector_id"]))
    env = dict(sandbox.env, PRINTER_CONNECTOR_HEALTH_TIMEOUT="120")
    proc = subprocess.Popen(["dash", str(INSTALLERS / "update.sh")], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line.decode())
            if "waiting up to 120s" in lines[-1]:
                break
        assert sandbox.klipper_bin.read_bytes() != old, "".join(lines)
        os.killpg(proc.pid, signal.SIGHUP)
        output = "".join(lines) + proc.stdout.read().decode()
        assert proc.wait(60) == 129, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "interrupted: putting 1.0.0 back and starting it" in output
    assert sandbox.klipper_bin.read_bytes() == old
    assert config_of(sandbox.klipper_dir / "release_info.json")["version"] == "v1.0.0"
    assert not list(sandbox.klipper_dir.glob(".stage*"))
    cloud.wait_for(lambda: heartbeat_from_version(cloud, config["connector_id"], "1.0.0", beats), 15,
                   "a heartbeat from the restored 1.0.0")


def test_update_refused_while_printing_unless_forced(sandbox, tmp_path, cloud, printer, release):
    install_klipper(sandbox, cloud, printer, release, tmp_path)
    publish_connector(release, "1.1.0", tmp_path)
    printer.add_file("benchy.gcode")
    printer.set_state("printing", filename="benchy.gcode")
    before = sandbox.snapshot_tree()
    calls = len(sandbox.changes())

    result = sandbox.run("dash", "update.sh")
    assert result.returncode == 1
    assert "a print is printing on %s" % printer.url in result.output
    assert sandbox.snapshot_tree() == before and sandbox.changes()[calls:] == []

    result = sandbox.run("dash", "update.sh", "--force")
    assert_ok(result)
    assert version_of(sandbox, sandbox.klipper_bin) == "1.1.0"


def test_check_and_rollback(sandbox, tmp_path, cloud, printer, release):
    """Three updates keep the last two binaries; --check changes nothing;
    --rollback steps back one binary at a time."""
    config = install_klipper(sandbox, cloud, printer, release, tmp_path, shell="bash")
    d = sandbox.klipper_dir

    def backup(n):
        return d / "backups" / ("%s.%d" % (host_asset(), n))

    for version in ("1.1.0", "1.2.0", "1.3.0"):
        publish_connector(release, version, tmp_path)
        assert_ok(sandbox.run("bash", "update.sh"))
    assert sorted(p.name for p in (d / "backups").iterdir()) == [backup(1).name, backup(2).name]
    assert (version_of(sandbox, backup(1)), version_of(sandbox, backup(2))) == ("1.2.0", "1.1.0")

    publish_connector(release, "1.4.0", tmp_path)
    before, calls = sandbox.snapshot_tree(), len(sandbox.changes())
    result = sandbox.run("bash", "update.sh", "--check")
    assert_ok(result)
    assert "installed: 1.3.0" in result.output and "latest:    1.4.0" in result.output
    assert "an update is available" in result.output
    assert sandbox.snapshot_tree() == before
    assert sandbox.changes()[calls:] == []

    beats = len(heartbeats_of(cloud, config["connector_id"]))
    result = sandbox.run("busybox", "update.sh", "--rollback")
    assert_ok(result)
    assert "rolling back 1.3.0 -> 1.2.0" in result.output
    assert version_of(sandbox, sandbox.klipper_bin) == "1.2.0"
    assert config_of(d / "release_info.json")["version"] == "v1.2.0"
    cloud.wait_for(lambda: heartbeat_from_version(cloud, config["connector_id"], "1.2.0", beats), 10,
                   "a heartbeat after the rollback")
    # The older backup is next in line; there is no third.
    assert version_of(sandbox, backup(1)) == "1.1.0" and not backup(2).exists()
    backup(1).unlink()
    result = sandbox.run("dash", "update.sh", "--rollback")
    assert result.returncode == 1 and "no backup to roll back to" in result.output


def test_k1_update_and_automatic_rollback(sandbox, tmp_path, cloud, printer, release):
    config = install_k1(sandbox, cloud, printer, release, tmp_path, shell="busybox")
    d = sandbox.k1_dir
    publish_connector(release, "1.1.0", tmp_path, pyz=True)
    result = sandbox.run("busybox", "update.sh")
    assert_ok(result)
    assert "checksum of %s verified" % PYZ in result.output
    assert version_of(sandbox, d / "printer-connector") == "1.1.0"
    cloud.wait_for(lambda: heartbeat_from_version(cloud, config["connector_id"], "1.1.0"), 10, "1.1.0 heartbeat")
    assert sandbox.systemctl_calls() == []

    good = (d / "printer-connector").read_bytes()
    release.publish("1.2.0", {PYZ: crashing_binary("1.2.0")})
    beats = len(heartbeats_of(cloud, config["connector_id"]))
    result = sandbox.run("dash", "update.sh", env={"PRINTER_CONNECTOR_HEALTH_TIMEOUT": "4"})
    assert result.returncode == 1
    assert "rolled back; 1.1.0 runs again" in result.output
    assert (d / "printer-connector").read_bytes() == good
    assert sandbox.k1_child_pid()
    cloud.wait_for(lambda: heartbeat_from_version(cloud, config["connector_id"], "1.1.0", beats), 10,
                   "a heartbeat from the restored 1.1.0")


def go_connector_k1(sandbox, cloud, printer, init_name="S99printer-connector"):
    """What the Go connector's K1 installer left: /opt/printer-connector (a
    paired config, its binary) and an init script of its own (BIN=,
    CONFIG=, a pid file), running. Returns (init script, pid file)."""
    opt = sandbox.root / "opt/printer-connector"
    (opt / "state").mkdir(parents=True)
    (opt / "printer-connector").write_bytes(connector_source("0.9.0"))
    os.chmod(opt / "printer-connector", 0o755)
    token = install_args(cloud, printer)[3]
    (opt / "config.json").write_text(
        '{"cloud_url": "%s", "pairing_token": "%s", "state_dir": "/opt/printer-connector/state",'
        ' "moonraker": [{"printer_id": 0, "name": "K1", "base_url": "%s"}]}' % (cloud.url, token, printer.url))
    paired = subprocess.run([str(opt / "printer-connector"), "--config", str(opt / "config.json"), "--once"],
                            env=sandbox.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert paired.returncode == 0, paired.stdout.decode()
    init = sandbox.root / "etc/init.d" / init_name
    init.parent.mkdir(parents=True)
    run_dir = sandbox.root / "var/run"
    run_dir.mkdir(parents=True)
    init.write_text(
        '#!/bin/sh\nBIN="%s/printer-connector"\nCONFIG="%s/config.json"\nPIDFILE="%s/printer-connector.pid"\n'
        'case "$1" in\n'
        '  start) nohup "$BIN" --config "$CONFIG" >>"%s/connector.log" 2>&1 & echo $! >"$PIDFILE" ;;\n'
        '  stop) kill "$(cat "$PIDFILE")"; rm -f "$PIDFILE" ;;\n'
        'esac\n' % (opt, opt, run_dir, opt))
    os.chmod(init, 0o755)
    subprocess.run(["sh", str(init), "start"], env=sandbox.env, check=True)
    return init, run_dir / "printer-connector.pid"


def test_update_switches_a_go_connector_k1_install_keeping_its_pairing(sandbox, tmp_path, cloud, printer,
                                                                       release):
    init, pidfile = go_connector_k1(sandbox, cloud, printer)
    run_dir = pidfile.parent
    go_pid = int(pidfile.read_text())
    old_config = config_of(sandbox.root / "opt/printer-connector/config.json")
    registrations = len(cloud.registrations)
    go_init = init.read_text()
    publish_connector(release, "1.0.0", tmp_path, pyz=True)

    # A switch that fails half-way (here: our init script cannot be
    # written) puts the Go connector back and starts it again.
    blocker = init.parent / (init.name + ".tmp")
    blocker.mkdir()
    result = sandbox.run("dash", "update.sh")
    assert result.returncode != 0
    assert "starting the Go connector again" in result.output
    assert not process_alive(go_pid)
    assert init.read_text() == go_init
    go_pid = int((run_dir / "printer-connector.pid").read_text())
    assert process_alive(go_pid)
    assert not sandbox.k1_dir.exists()
    blocker.rmdir()

    result = sandbox.run("dash", "update.sh")
    assert_ok(result)
    assert "found the Go connector" in result.output
    wait_until(lambda: not process_alive(go_pid), 10, "the Go connector stopped")
    config = config_of(sandbox.k1_dir / "config.json")
    assert config["connector_id"] == old_config["connector_id"]
    assert config["connector_secret"] == old_config["connector_secret"]
    assert config["state_dir"] == str(sandbox.k1_dir / "state")
    assert len(cloud.registrations) == registrations
    assert "# printer-connector init script" in init.read_text()
    cloud.wait_for(lambda: heartbeat_from_version(cloud, config["connector_id"], "1.0.0"), 10, "1.0.0 heartbeat")
    # From now on it is an ordinary install.
    result = sandbox.run("dash", "update.sh", "--check")
    assert_ok(result)
    assert "installed: 1.0.0" in result.output


def test_uninstall_removes_a_go_connector_k1_install(sandbox, cloud, printer):
    init, pidfile = go_connector_k1(sandbox, cloud, printer, init_name="printer-connector")
    go_pid = int(pidfile.read_text())
    result = sandbox.run("busybox", "uninstall.sh", "--yes")
    assert_ok(result)
    wait_until(lambda: not process_alive(go_pid), 10, "the Go connector stopped")
    assert not init.exists() and not (sandbox.root / "opt/printer-connector").exists()


def test_update_takes_over_a_go_connector_systemd_install_in_place(sandbox, tmp_path, cloud, printer, release):
    """The Go connector's Pi installer: ~/printer-connector/printer-connector
    and a unit without User= (it ran as root)."""
    d = sandbox.klipper_dir
    (d / "state").mkdir(parents=True)
    old_bin = d / "printer-connector"
    old_bin.write_bytes(connector_source("0.9.0"))
    os.chmod(old_bin, 0o755)
    (d / "config.json").write_text(json.dumps({
        "cloud_url": cloud.url, "pairing_token": install_args(cloud, printer)[3], "state_dir": str(d / "state"),
        "moonraker": [{"printer_id": 0, "name": "Pi", "base_url": printer.url}]}))
    paired = subprocess.run([str(old_bin), "--config", str(d / "config.json"), "--once"], env=sandbox.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert paired.returncode == 0, paired.stdout.decode()
    old_config = config_of(d / "config.json")
    sandbox.unit().parent.mkdir(parents=True)
    sandbox.unit().write_text(
        "[Unit]\nDescription=Printer Connector Agent\n\n[Service]\nType=simple\n"
        "ExecStart=%s --config %s --log-level info\nRestart=always\n" % (old_bin, d / "config.json"))
    subprocess.run(["systemctl", "start", SERVICE], env=sandbox.env, check=True)
    registrations = len(cloud.registrations)

    publish_connector(release, "1.0.0", tmp_path)
    result = sandbox.run("dash", "update.sh")
    assert_ok(result)
    assert "updating 0.9.0 -> 1.0.0" in result.output
    assert version_of(sandbox, old_bin) == "1.0.0"
    assert version_of(sandbox, d / "backups/printer-connector.1") == "0.9.0"
    assert config_of(d / "config.json") == old_config
    assert len(cloud.registrations) == registrations
    cloud.wait_for(lambda: heartbeat_from_version(cloud, old_config["connector_id"], "1.0.0"), 10, "1.0.0 heartbeat")


def test_update_finds_nothing_to_update(sandbox):
    result = sandbox.run("dash", "update.sh")
    assert result.returncode == 1 and "no printer-connector installation found" in result.output


# ------------------------------------------------------------- uninstall.sh

def printer_data_files(sandbox):
    return {str(p.relative_to(sandbox.printer_data)): p.read_bytes()
            for p in sandbox.printer_data.rglob("*") if p.is_file()}


@pytest.mark.parametrize("shell,mode", [("busybox", "all"), ("dash", "config-only")])
def test_uninstall_klipper(sandbox, shell, mode, tmp_path, cloud, printer, release):
    install_klipper(sandbox, cloud, printer, release, tmp_path)
    d = sandbox.klipper_dir
    pid = sandbox.service_pid()
    printer_data = printer_data_files(sandbox)

    result = sandbox.run(shell, "uninstall.sh")  # no --yes and no terminal to ask on
    assert result.returncode == 1 and "pass --yes" in result.output
    assert sandbox.service_pid() == pid

    args = ["--yes"] + (["--config-only"] if mode == "config-only" else [])
    result = sandbox.run(shell, "uninstall.sh", *args)
    assert_ok(result)
    assert not process_alive(pid)
    assert not sandbox.unit().exists()
    assert ["disable", SERVICE] in sandbox.systemctl_calls("disable")
    assert SERVICE not in (sandbox.printer_data / "moonraker.asvc").read_text().split()
    if mode == "config-only":
        assert sorted(p.name for p in d.iterdir()) == [host_asset(), "release_info.json"]
        assert not (d / "config.json").exists()
    else:
        assert not d.exists()
    # printer_data is the owner's: only our own lines/files left it.
    after = printer_data_files(sandbox)
    assert after["moonraker.asvc"] == b"klipper_mcu\nwebcamd\ncrowsnest\n"
    assert b"[include printer-connector-update.conf]" in printer_data["config/moonraker.conf"]
    assert after["config/moonraker.conf"] == sandbox.moonraker_conf.encode()
    assert set(after) == set(printer_data) - {"config/printer-connector-update.conf"}

    result = sandbox.run(shell, "uninstall.sh", "--yes")
    assert result.returncode == 1 and "no printer-connector installation found" in result.output


@pytest.mark.parametrize("shell,mode", [("bash", "all"), ("busybox", "config-only")])
def test_uninstall_k1(sandbox, shell, mode, tmp_path, cloud, printer, release):
    install_k1(sandbox, cloud, printer, release, tmp_path)
    child = sandbox.k1_child_pid()
    assert child
    args = ["--yes"] + (["--config-only"] if mode == "config-only" else [])
    result = sandbox.run(shell, "uninstall.sh", *args)
    assert_ok(result)
    assert not process_alive(child)
    assert not sandbox.k1_init.exists()
    if mode == "config-only":
        assert (sandbox.k1_dir / "printer-connector").exists()
        assert not (sandbox.k1_dir / "config.json").exists()
        assert stat.S_ISREG(os.stat(sandbox.k1_dir / "printer-connector").st_mode)
    else:
        assert not sandbox.k1_dir.exists()
