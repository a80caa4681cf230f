"""The installers as owners' machines meet them (issue 17): paths with
spaces and characters special to sh and systemd, full disks, old
Moonraker, two runs at once, stalled and truncating mirrors, ownership
after an update, a re-run that upgrades. Every script runs for real under
dash, bash or BusyBox in a sandbox (installer_fixtures.py); the K1 layout
with nothing but BusyBox and python3 on PATH."""

import os
import pwd
import shutil
import subprocess
import time

import pytest

from installer_fixtures import (INSTALLERS, PYZ, SHELLS, config_of, connector_source, crashing_binary, heartbeats_of,
                                host_asset, install_args, process_alive, publish_connector, stock_k1_path)


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


# ------------------------------------------------------------ ownership

def test_update_keeps_the_files_owned_by_the_service_user(sandbox, tmp_path, cloud, printer, release):
    publish_connector(release, "1.0.0", tmp_path)
    assert_ok(sandbox.run("dash", "install-klipper.sh", *install_args(cloud, printer)))
    publish_connector(release, "1.1.0", tmp_path)
    assert_ok(sandbox.run("busybox", "update.sh"))
    d = sandbox.klipper_dir
    for path in (sandbox.klipper_bin, d / "backups", d / "backups" / (host_asset() + ".1"), d / "release_info.json",
                 d / "config.json", d / "state"):
        assert owner(path) == sandbox.user, path


# -------------------------------------------- a re-run of the installer

def test_klipper_rerun_with_a_crashing_release_rolls_back(sandbox, tmp_path, cloud, printer, release):
    """A re-run that changes the binary goes through update.sh's verified,
    rolled-back swap."""
    publish_connector(release, "1.0.0", tmp_path)
    assert_ok(sandbox.run("dash", "install-klipper.sh", *install_args(cloud, printer)))
    config = config_of(sandbox.klipper_dir / "config.json")
    old = sandbox.klipper_bin.read_bytes()
    release.publish("1.1.0", {host_asset(): crashing_binary("1.1.0")})
    beats = len(heartbeats_of(cloud, config["connector_id"]))

    result = sandbox.run("bash", "install-klipper.sh", env={"PRINTER_CONNECTOR_HEALTH_TIMEOUT": "4"})
    assert result.returncode == 1, result.output
    assert "version 1.1.0 does not work here: restoring 1.0.0" in result.output
    assert "update to 1.1.0 failed and was rolled back; 1.0.0 runs again" in result.output
    assert sandbox.klipper_bin.read_bytes() == old
    assert config_of(sandbox.klipper_dir / "release_info.json")["version"] == "v1.0.0"
    cloud.wait_for(lambda: heartbeat_from(cloud, config["connector_id"], "1.0.0", beats), 15,
                   "a heartbeat from the restored 1.0.0")


def test_k1_rerun_with_a_crashing_release_rolls_back(sandbox, tmp_path, cloud, printer, release):
    k1 = stock_k1_path(tmp_path)
    publish_connector(release, "1.0.0", tmp_path, pyz=True)
    assert_ok(sandbox.run("busybox", "install-k1.sh", *install_args(cloud, printer), path=k1))
    config = config_of(sandbox.k1_dir / "config.json")
    old = (sandbox.k1_dir / "printer-connector").read_bytes()
    release.publish("1.1.0", {PYZ: crashing_binary("1.1.0")})
    beats = len(heartbeats_of(cloud, config["connector_id"]))

    result = sandbox.run("busybox", "install-k1.sh", env={"PRINTER_CONNECTOR_HEALTH_TIMEOUT": "4"}, path=k1)
    assert result.returncode == 1, result.output
    assert "update to 1.1.0 failed and was rolled back; 1.0.0 runs again" in result.output
    assert (sandbox.k1_dir / "printer-connector").read_bytes() == old
    cloud.wait_for(lambda: heartbeat_from(cloud, config["connector_id"], "1.0.0", beats), 15,
                   "a heartbeat from the restored 1.0.0")


# ------------------------------------------------------ two runs at once

def start_script(sandbox, shell, script, *args, env=None):
    cmd = [shutil.which(SHELLS[shell][0])] + SHELLS[shell][1:] + [str(INSTALLERS / script)] + list(args)
    return subprocess.Popen(cmd, env=dict(sandbox.env, **(env or {})), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def read_until(proc, text, lines):
    for line in proc.stdout:
        lines.append(line.decode(errors="replace"))
        if text in lines[-1]:
            return
    raise AssertionError("the script ended before %r:\n%s" % (text, "".join(lines)))


@pytest.mark.parametrize("shell", ["dash", "busybox"])
def test_second_installer_waits_for_none_and_changes_nothing(sandbox, shell, tmp_path, cloud, printer, release):
    """While the first installer pairs (the cloud answers late), a second
    one, and an update.sh, say another install is running and touch nothing."""
    publish_connector(release, "1.0.0", tmp_path)
    cloud.set_fault("slow:3", endpoint="register", count=1)
    first = start_script(sandbox, shell, "install-klipper.sh", *install_args(cloud, printer))
    lines = []
    try:
        read_until(first, "pairing with the cloud", lines)
        for script, args in (("install-klipper.sh", install_args(cloud, printer)), ("update.sh", [])):
            second = sandbox.run(shell, script, *args)
            assert second.returncode == 1, second.output
            assert "another install, update or uninstall of printer-connector is running" in second.output
            assert "Nothing was installed" not in second.output
        output = "".join(lines) + first.stdout.read().decode(errors="replace")
        assert first.wait(120) == 0, output
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    config = config_of(sandbox.klipper_dir / "config.json")
    assert config["connector_id"] and "pairing_token" not in config
    assert owner(sandbox.klipper_dir / "config.json") == sandbox.user
    cloud.wait_for(lambda: heartbeats_of(cloud, config["connector_id"]), 15, "a heartbeat")
    assert not (sandbox.root / "var/lock/printer-connector.lock").exists()


def test_lock_left_by_a_killed_run_is_taken_over(sandbox, tmp_path, cloud, printer, release):
    publish_connector(release, "1.0.0", tmp_path)
    lock = sandbox.root / "var/lock/printer-connector.lock"
    lock.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (lock / "pid").write_text("%d\n" % dead.pid)
    assert_ok(sandbox.run("busybox", "install-klipper.sh", *install_args(cloud, printer)))
    assert not lock.exists()


# ------------------------------------------------------------ full disks

@pytest.fixture
def small_disk(sandbox):
    """mount(FOLDER, MIB): a tmpfs of that size at FOLDER (made if missing)."""
    mounted = []

    def mount(folder, mib):
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%dm,mode=755" % mib, "tmpfs", str(folder)], check=True)
        mounted.append(folder)
        return folder
    yield mount
    sandbox.cleanup()
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill_until_free(folder, mib):
    """A file that leaves MIB MiB free in FOLDER's file system."""
    stats = os.statvfs(folder)
    free = stats.f_bavail * stats.f_frsize
    with open(folder / "filler", "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, free - int(mib * 1024 * 1024)))


def padded_connector(version, mib):
    """connector.py of VERSION grown to about MIB MiB by a comment: a large release asset."""
    return connector_source(version) + b"\n#" + b"x" * (mib * 1024 * 1024) + b"\n"


def test_update_without_room_is_refused_and_the_old_connector_runs_on(sandbox, small_disk, tmp_path, cloud,
                                                                        printer, release):
    small_disk(sandbox.klipper_dir, 64)
    publish_connector(release, "1.0.0", tmp_path)
    assert_ok(sandbox.run("dash", "install-klipper.sh", *install_args(cloud, printer)))
    config = config_of(sandbox.klipper_dir / "config.json")
    fill_until_free(sandbox.klipper_dir, 20)
    pid = sandbox.service_pid()
    before, changes = sandbox.snapshot_tree(), len(sandbox.changes())
    asset = padded_connector("1.1.0", 12)
    release.publish("1.1.0", {host_asset(): asset})
    kib = len(asset) // 1024 + 1
    beats = len(heartbeats_of(cloud, config["connector_id"]))

    result = sandbox.run("bash", "update.sh")
    assert result.returncode == 1, result.output
    assert "not enough free space in %s" % sandbox.klipper_dir in result.output
    assert "the download of %d.%d MiB, as the release server says" % (kib // 1024, kib % 1024 * 10 // 1024) \
        in result.output
    assert "nothing was changed" in result.output
    assert not any(r.endswith("/v1.1.0/" + host_asset()) for r in release.requests)
    assert sandbox.snapshot_tree() == before and sandbox.changes()[changes:] == []
    assert sandbox.service_pid() == pid
    cloud.wait_for(lambda: heartbeat_from(cloud, config["connector_id"], "1.0.0", beats), 40,
                   "a heartbeat from 1.0.0, still running")


def test_update_with_little_room_goes_on_when_the_real_sizes_fit(sandbox, small_disk, tmp_path, cloud, printer,
                                                                release):
    """The check adds up the asset's real size (HEAD: Content-Length), the
    backup and the unpack room: a small release fits in 10 MiB."""
    small_disk(sandbox.klipper_dir, 64)
    publish_connector(release, "1.0.0", tmp_path)
    assert_ok(sandbox.run("dash", "install-klipper.sh", *install_args(cloud, printer)))
    fill_until_free(sandbox.klipper_dir, 10)
    publish_connector(release, "1.1.0", tmp_path)
    result = sandbox.run("busybox", "update.sh")
    assert_ok(result)
    assert "/download/v1.1.0/" + host_asset() in release.heads
    assert reported_version(sandbox, sandbox.klipper_bin) == "1.1.0"


def test_fresh_install_without_room_says_so(sandbox, small_disk, tmp_path, cloud, printer, release):
    small_disk(sandbox.klipper_dir, 3)
    release.publish("1.0.0", {host_asset(): padded_connector("1.0.0", 2)})
    before = sandbox.snapshot_tree()
    result = sandbox.run("dash", "install-klipper.sh", *install_args(cloud, printer))
    assert result.returncode == 1, result.output
    assert "not enough free space in %s for %s" % (sandbox.klipper_dir, host_asset()) in result.output
    assert "curl" not in result.output
    assert sandbox.snapshot_tree() == before


def test_k1_with_a_nearly_full_usr_data_installs_a_release_that_fits(sandbox, small_disk, tmp_path, cloud, printer,
                                                                     release):
    """2.5 MiB free on /usr/data: the zipapp (well under 1 MiB) and its
    scratch copy fit, so the install goes on."""
    usr_data = small_disk(sandbox.root / "usr/data", 8)
    fill_until_free(usr_data, 2.5)
    publish_connector(release, "1.0.0", tmp_path, pyz=True)
    result = sandbox.run("busybox", "install-k1.sh", *install_args(cloud, printer), path=stock_k1_path(tmp_path))
    assert_ok(result)
    config = config_of(sandbox.k1_dir / "config.json")
    cloud.wait_for(lambda: heartbeat_from(cloud, config["connector_id"], "1.0.0"), 20, "a heartbeat")


def test_k1_without_a_size_from_the_server_assumes_the_largest_and_says_so(sandbox, small_disk, tmp_path, cloud,
                                                                           printer, release):
    usr_data = small_disk(sandbox.root / "usr/data", 8)
    fill_until_free(usr_data, 2.5)
    publish_connector(release, "1.0.0", tmp_path, pyz=True)
    release.no_length.add(PYZ)
    before = sandbox.snapshot_tree()
    result = sandbox.run("busybox", "install-k1.sh", *install_args(cloud, printer), path=stock_k1_path(tmp_path))
    assert result.returncode == 1, result.output
    assert "the download of 4.0 MiB, the release server gave no size; assumed" in result.output
    assert sandbox.snapshot_tree() == before


def test_k1_with_a_nearly_full_usr_data_says_so(sandbox, small_disk, tmp_path, cloud, printer, release):
    usr_data = small_disk(sandbox.root / "usr/data", 8)
    fill_until_free(usr_data, 1)
    publish_connector(release, "1.0.0", tmp_path, pyz=True)
    before = sandbox.snapshot_tree()
    result = sandbox.run("busybox", "install-k1.sh", *install_args(cloud, printer), path=stock_k1_path(tmp_path))
    assert result.returncode == 1, result.output
    assert "not enough free space in %s for %s" % (sandbox.k1_dir, PYZ) in result.output
    assert sandbox.snapshot_tree() == before


# ------------------------------------------------ stalled and cut mirrors

def path_without(tmp_path, name, *left_out):
    """The sandbox's PATH with every program of the system folders except LEFT_OUT."""
    folder = tmp_path / name
    folder.mkdir()
    for system in ("/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"):
        for entry in os.listdir(system) if os.path.isdir(system) else []:
            target = folder / entry
            if entry not in left_out and not target.exists():
                os.symlink(os.path.join(system, entry), target)
    return str(folder)


DOWNLOADERS = {
    "curl": lambda sandbox, tmp: None,
    "gnu-wget": lambda sandbox, tmp: os.pathsep.join([str(sandbox.bin), path_without(tmp, "nocurl", "curl")]),
    "busybox-wget": lambda sandbox, tmp: os.pathsep.join([str(sandbox.bin), stock_k1_path(tmp)]),
    "python": lambda sandbox, tmp: os.pathsep.join([str(sandbox.bin), path_without(tmp, "nodl", "curl", "wget"),
                                                    os.path.dirname(shutil.which("python3", path=sandbox.env["PATH"]))]),
}


@pytest.mark.parametrize("downloader", list(DOWNLOADERS))
def test_stalled_or_cut_downloads_end_in_time(sandbox, downloader, tmp_path, cloud, printer, release):
    """Every downloader gets two tries and one deadline: a mirror that stops
    sending, or cuts the file short, fails the update in bounded time with a
    message; the old connector runs on."""
    publish_connector(release, "1.0.0", tmp_path)
    assert_ok(sandbox.run("dash", "install-klipper.sh", *install_args(cloud, printer)))
    pid = sandbox.service_pid()
    path = DOWNLOADERS[downloader](sandbox, tmp_path)
    env = {"PRINTER_CONNECTOR_DOWNLOAD_TIMEOUT": "8", "PRINTER_CONNECTOR_STALL_TIMEOUT": "3"}
    for version, fault in (("1.1.0", "stall"), ("1.2.0", "truncate")):
        publish_connector(release, version, tmp_path)
        release.faults[host_asset()] = fault
        served = len(release.requests)
        started = time.monotonic()
        result = sandbox.run("busybox", "update.sh", env=env, path=path)
        took = time.monotonic() - started
        assert result.returncode == 1, result.output
        assert "giving up after 8s, or 3s without data" in result.output
        assert "could not download" in result.output and "/v%s/%s" % (version, host_asset()) in result.output
        assert took < 8 + 15, (fault, took, result.output)
        tries = [r for r in release.requests[served:] if r.endswith("/" + host_asset())]
        assert 1 <= len(tries) <= 2, (fault, tries)
        assert sandbox.service_pid() == pid


# ----------------------------------------------------------- old Moonraker

def test_old_moonraker_gets_no_update_manager_section_and_the_doctor_says_so(sandbox, tmp_path, cloud, own_printer,
                                                                             release):
    own_printer.moonraker_version = "v0.9.3-61-g4a7b2c1"
    publish_connector(release, "1.0.0", tmp_path)
    result = sandbox.run("dash", "install-klipper.sh", *install_args(cloud, own_printer))
    assert_ok(result)
    assert "Moonraker v0.9.3-61-g4a7b2c1 is older than 0.10.0" in result.output
    conf_dir = sandbox.printer_data / "config"
    assert not (conf_dir / "printer-connector-update.conf").exists()
    assert (conf_dir / "moonraker.conf").read_text() == sandbox.moonraker_conf
    assert not sandbox.systemctl_calls("restart")  # Moonraker is not restarted for nothing

    doctor = subprocess.run([str(sandbox.klipper_bin), "--doctor", "--config", str(sandbox.klipper_dir / "config.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=sandbox.env, timeout=120)
    report = doctor.stdout.decode()
    assert "warn  update       Moonraker v0.9.3-61-g4a7b2c1 is older than 0.10.0" in report, report
    assert "fix: update printer-connector with update.sh" in report
