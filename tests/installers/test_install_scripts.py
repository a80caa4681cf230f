"""install-klipper.sh and install-k1.sh, run for real in a sandbox, plus the
properties every script shares (shellcheck, the shared block, cut-off)."""

import os
import pwd
import re
import shutil
import stat
import subprocess

import pytest

from installer_fixtures import (INSTALLERS, PYZ, REPO, SCRIPTS, SOURCES, SERVICE, SHELLS, config_of, connector_source,
                                crashing_binary, heartbeats_of, host_asset, install_args, make_pyz, new_token,
                                publish_connector, stock_k1_path, wait_until)

ALL_SHELLS = pytest.mark.parametrize("shell", list(SHELLS))


def assert_ok(result):
    assert result.returncode == 0, result.output


def owner(path):
    return pwd.getpwuid(os.stat(path).st_uid).pw_name


# ------------------------------------------------------------ the scripts

def test_shellcheck_clean():
    committed = [str(SOURCES / s) for s in SCRIPTS + ["bootstrap.sh", "lib/common.sh"]]
    scripts = [str(INSTALLERS / s) for s in SCRIPTS] + committed
    result = subprocess.run(["shellcheck", "-s", "sh"] + scripts, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, timeout=120)
    assert result.returncode == 0, result.stdout.decode()


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_produced_script_is_its_source_with_the_fetch_part_and_common_sh(script):
    text = (INSTALLERS / script).read_text()
    fetch = (SOURCES / "bootstrap.sh").read_text().split("# >>> fetch")[1].split("# <<< fetch")[0]
    fetch = fetch[fetch.index("\n") + 1:]
    assert fetch in text and (SOURCES / "lib/common.sh").read_text() in text
    source = (SOURCES / "src" / script).read_text()
    head, tail = source.split("# >>> installers/bootstrap.sh\n")[0], source.split("# >>> installers/lib/common.sh\n")[1]
    assert text.startswith(head) and text.endswith(tail)


def test_a_source_without_its_marker_is_refused(tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(SOURCES, tree / "installers")
    shutil.copytree(REPO / "build", tree / "build", ignore=shutil.ignore_patterns("work"))
    shutil.copy(REPO / "connector.py", tree)
    source = tree / "installers/src/update.sh"
    source.write_text(source.read_text().replace("# >>> installers/lib/common.sh\n", ""))
    result = subprocess.run(["sh", str(tree / "build/build-installers.sh"), str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert result.returncode == 1 and b"update.sh lacks a marker line" in result.stdout, result.stdout
    assert not (tmp_path / "out/update.sh").exists()


def test_release_scripts_are_pinned_to_the_release(tmp_path):
    version = re.search(r'^__version__ = "([^"]+)"', (REPO / "connector.py").read_text(), re.M).group(1)
    subprocess.run(["sh", str(REPO / "build/build-installers.sh"), "--release", str(tmp_path)], check=True,
                   stdout=subprocess.DEVNULL)
    for script in ("install-klipper.sh", "install-k1.sh", "update.sh"):
        assert "\nRELEASE_VERSION=%s\n" % version in (tmp_path / script).read_text()
        assert '\nRELEASE_VERSION=""\n' in (INSTALLERS / script).read_text()


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_functions_and_end_with_main(script):
    for path in (INSTALLERS / script, SOURCES / script, SOURCES / "bootstrap.sh"):
        lines = path.read_text().rstrip("\n").splitlines()
        assert lines[-1] == 'main "$@"', path
        assert lines[0] == "#!/bin/sh", path
    assert "set -eu" in (INSTALLERS / script).read_text().splitlines()


@ALL_SHELLS
def test_help_in_every_shell(sandbox, shell):
    for script in SCRIPTS:
        result = sandbox.run(shell, script, "--help")
        assert_ok(result)
        assert result.output.startswith("usage: " + script), result.output
    result = sandbox.run(shell, "update.sh", "--bogus")
    assert result.returncode == 1 and "unknown option: --bogus" in result.output


@ALL_SHELLS
def test_cut_off_script_runs_nothing(sandbox, shell, tmp_path, cloud, printer, release):
    """A download cut off anywhere before the last line only defines
    functions (or stops at a syntax error): no file, no service call, no
    pairing. Within the last line, `m`..`mai` are unknown commands and
    `main "`..`main "$@` syntax errors; only `main` itself runs, without
    the caller's arguments, so it fails before changing anything."""
    publish_connector(release, "1.0.0", tmp_path)
    before = sandbox.snapshot_tree()
    registrations = len(cloud.registrations)
    for script in SCRIPTS:
        data = (INSTALLERS / script).read_bytes()
        last_line = data.rstrip(b"\n").rfind(b"\n") + 1
        cuts = set(range(0, last_line, max(1, last_line // 12))) | {last_line}
        cuts |= {last_line + n for n in range(1, len(b'main "$@"'))}
        for cut in sorted(cuts):
            partial = tmp_path / ("cut-%s-%d.sh" % (script, cut))
            partial.write_bytes(data[:cut])
            result = sandbox.run(shell, partial, *install_args(cloud, printer))
            tail = data[last_line:cut]
            if tail in (b"main", b"main "):
                assert result.returncode == 1, result.output
            else:
                assert result.returncode in (0, 2, 127), (cut, result.output)
                # Not one message of the script's own: none of its code ran.
                assert not re.search(r"^%s: " % re.escape(script), result.output, re.M), (cut, result.output)
            assert sandbox.snapshot_tree() == before, "%s cut at %d changed files" % (script, cut)
    assert sandbox.systemctl_calls("daemon-reload", "enable", "start", "stop", "restart") == []
    assert len(cloud.registrations) == registrations


# ------------------------------------------------------------ Klipper hosts

@ALL_SHELLS
def test_klipper_fresh_install(sandbox, shell, tmp_path, cloud, printer, release):
    publish_connector(release, "1.2.0", tmp_path)
    result = sandbox.run(shell, "install-klipper.sh", *install_args(cloud, printer))
    assert_ok(result)

    d = sandbox.klipper_dir
    binary, config_path = sandbox.klipper_bin, d / "config.json"
    assert subprocess.run([str(binary), "--version"], stdout=subprocess.PIPE, env=sandbox.env,
                          check=True).stdout.decode().strip() == "printer-connector 1.2.0"
    config = config_of(config_path)
    assert "pairing_token" not in config and config["connector_id"] and config["connector_secret"]
    assert config["moonraker"][0]["base_url"] == printer.url and config["moonraker"][0]["printer_id"] > 0
    assert config["state_dir"] == str(d / "state")
    assert stat.S_IMODE(os.stat(config_path).st_mode) == 0o600
    for path in (d, binary, config_path):
        assert owner(path) == sandbox.user

    unit = sandbox.unit().read_text()
    assert "User=%s\n" % sandbox.user in unit and "Restart=always\n" in unit
    assert 'ExecStart="' in unit and '"%s" --config "%s" --log-level info\n' % (binary, config_path) in unit
    verbs = [c[0] for c in sandbox.systemctl_calls()]
    assert verbs.index("daemon-reload") < verbs.index("enable") < verbs.index("start")

    # The service runs the installed connector, which sends heartbeats.
    assert sandbox.service_pid()
    assert 'msg="Heartbeat sent"' in sandbox.journal()
    cloud.wait_for(lambda: heartbeats_of(cloud, config["connector_id"]), 10, "a heartbeat")
    assert "heartbeat sent: the connector works" in result.output

    asvc = (sandbox.printer_data / "moonraker.asvc").read_text().splitlines()
    assert asvc == ["klipper_mcu", "webcamd", "crowsnest", SERVICE]
    info = config_of(d / "release_info.json")
    assert info == {"project_name": "printer-connector", "project_owner": "printdock",
                    "version": "v1.2.0", "asset_name": host_asset()}
    assert not list(d.glob(".stage*"))


def test_klipper_rerun_upgrades_in_place_without_pairing_again(sandbox, tmp_path, cloud, printer, release):
    publish_connector(release, "1.0.0", tmp_path)
    assert_ok(sandbox.run("dash", "install-klipper.sh", *install_args(cloud, printer)))
    first = config_of(sandbox.klipper_dir / "config.json")
    registrations = len(cloud.registrations)

    publish_connector(release, "1.1.0", tmp_path)
    # A new token on the command line is not used: the config is paired.
    result = sandbox.run("busybox", "install-klipper.sh", *install_args(cloud, printer))
    assert_ok(result)
    assert "paired already" in result.output and "ignoring --pairing-token" in result.output
    assert len(cloud.registrations) == registrations
    assert config_of(sandbox.klipper_dir / "config.json") == first
    assert "printer-connector 1.1.0" in subprocess.run(
        [str(sandbox.klipper_bin), "--version"], stdout=subprocess.PIPE,
        env=sandbox.env).stdout.decode()
    assert (sandbox.klipper_dir / "backups" / (host_asset() + ".1")).exists()
    cloud.wait_for(lambda: [h for h in heartbeats_of(cloud, first["connector_id"])
                            if h["body"]["status"]["version"] == "1.1.0"], 10, "a 1.1.0 heartbeat")
    asvc = (sandbox.printer_data / "moonraker.asvc").read_text().splitlines()
    assert asvc.count(SERVICE) == 1


@ALL_SHELLS
def test_klipper_rejected_token_leaves_nothing(sandbox, shell, tmp_path, cloud, printer, release):
    publish_connector(release, "1.0.0", tmp_path)
    before = sandbox.snapshot_tree()
    result = sandbox.run(shell, "install-klipper.sh", *install_args(cloud, printer, token="PAIR_never_issued"))
    assert result.returncode == 1, result.output
    assert "rejected the pairing token" in result.output
    assert "Invalid or expired pairing token" in result.output
    assert not sandbox.klipper_dir.exists()
    assert not sandbox.unit().exists()
    assert sandbox.snapshot_tree() == before
    assert sandbox.systemctl_calls("start", "enable") == []


def test_klipper_refuses_unreachable_moonraker_before_writing(sandbox, tmp_path, cloud, release):
    publish_connector(release, "1.0.0", tmp_path)
    before = sandbox.snapshot_tree()
    token = new_token(cloud)
    result = sandbox.run("bash", "install-klipper.sh", "--cloud-url", cloud.url, "--pairing-token", token,
                         "--printer", "0|Gone|http://127.0.0.1:9")
    assert result.returncode == 1
    assert "Moonraker does not answer at http://127.0.0.1:9" in result.output
    assert sandbox.snapshot_tree() == before
    assert token not in [r.get("pairing_token") for r in cloud.registrations]


def test_klipper_bad_checksum_installs_nothing(sandbox, tmp_path, cloud, printer, release):
    publish_connector(release, "1.0.0", tmp_path, bad_sums=(host_asset(),))
    before = sandbox.snapshot_tree()
    result = sandbox.run("dash", "install-klipper.sh", *install_args(cloud, printer))
    assert result.returncode == 1
    assert "checksum mismatch for %s" % host_asset() in result.output
    assert sandbox.snapshot_tree() == before


def test_klipper_local_binary_and_version_flag(sandbox, tmp_path, cloud, printer, release):
    """--bin installs a local file (no download); --version picks an older release."""
    publish_connector(release, "2.0.0", tmp_path)
    publish_connector(release, "1.5.0", tmp_path, latest=False)
    result = sandbox.run("busybox", "install-klipper.sh", "--version", "1.5.0", *install_args(cloud, printer))
    assert_ok(result)
    assert any(r.endswith("/download/v1.5.0/" + host_asset()) for r in release.requests)
    assert config_of(sandbox.klipper_dir / "release_info.json")["version"] == "v1.5.0"

    local = tmp_path / "local-connector"
    local.write_bytes(connector_source("3.0.0"))
    served = len(release.requests)
    result = sandbox.run("dash", "install-klipper.sh", "--bin", str(local))
    assert_ok(result)
    assert len(release.requests) == served
    assert config_of(sandbox.klipper_dir / "release_info.json")["version"] == "v3.0.0"


@pytest.mark.parametrize("machine,message", [
    ("armv6l", "unsupported architecture 'armv6l'"),
    ("armv7l", "release 1.0.0 has no artifact that runs here (tried: printer-connector-linux-armv7)"),
])
def test_klipper_architecture_without_a_release_asset_is_a_clear_error(sandbox, machine, message, tmp_path, cloud,
                                                                       printer, release):
    release.publish("1.0.0", {"printer-connector-linux-amd64": connector_source("1.0.0")})
    before = sandbox.snapshot_tree()
    result = sandbox.run("dash", "install-klipper.sh", *install_args(cloud, printer),
                         env={"PRINTER_CONNECTOR_ARCH": machine})
    assert result.returncode == 1
    assert message in result.output
    assert sandbox.snapshot_tree() == before


# ------------------------------------------------------------ Creality K1

@ALL_SHELLS
def test_k1_fresh_install(sandbox, shell, tmp_path, cloud, printer, release):
    publish_connector(release, "1.2.0", tmp_path, pyz=True)
    result = sandbox.run(shell, "install-k1.sh", *install_args(cloud, printer))
    assert_ok(result)
    d = sandbox.k1_dir
    config = config_of(d / "config.json")
    assert config["connector_id"] and "pairing_token" not in config
    assert stat.S_IMODE(os.stat(d / "config.json").st_mode) == 0o600
    assert (d / "printer-connector").read_bytes()[:2] == b"#!"  # the zipapp
    assert (d / "ca-bundle.pem").read_text().startswith("\n# Issuer") or \
        "BEGIN CERTIFICATE" in (d / "ca-bundle.pem").read_text()
    init = sandbox.k1_init.read_text()
    assert "BIN='%s/printer-connector'" % d in init
    assert sandbox.systemctl_calls() == []
    assert 'msg="Heartbeat sent"' in (d / "printer-connector.log").read_text()
    cloud.wait_for(lambda: heartbeats_of(cloud, config["connector_id"]), 10, "a heartbeat")

    status = subprocess.run(["sh", str(sandbox.k1_init), "status"], stdout=subprocess.PIPE, env=sandbox.env)
    assert status.returncode == 0 and b"is running" in status.stdout
    child = sandbox.k1_child_pid()
    assert child
    if shell == "dash":  # (once: the supervisor looks every 2 s)
        # The log cannot grow without bound: past 1 MiB it moves to .log.1.
        log = d / "printer-connector.log"
        with open(log, "ab") as f:
            f.write(b"x" * (1024 * 1024 + 1) + b"\n")
        wait_until(lambda: (d / "printer-connector.log.1").exists() and log.stat().st_size < 1024 * 1024,
                   15, "the log rotated")
        assert (d / "printer-connector.log.1").stat().st_size > 1024 * 1024
    if shell == "busybox":  # (once: it waits out the 5 s restart delay)
        # The supervisor restarts a connector that dies.
        os.kill(child, 9)
        wait_until(lambda: sandbox.k1_child_pid() not in (None, child), 30, "a restarted connector")
    stop = subprocess.run(["sh", str(sandbox.k1_init), "stop"], stdout=subprocess.PIPE, env=sandbox.env)
    assert stop.returncode == 0
    assert sandbox.k1_child_pid() is None
    status = subprocess.run(["sh", str(sandbox.k1_init), "status"], stdout=subprocess.PIPE, env=sandbox.env)
    assert status.returncode == 3


def test_k1_rejected_token_leaves_nothing(sandbox, tmp_path, cloud, printer, release):
    publish_connector(release, "1.0.0", tmp_path, pyz=True)
    before = sandbox.snapshot_tree()
    result = sandbox.run("busybox", "install-k1.sh", *install_args(cloud, printer, token="PAIR_never_issued"))
    assert result.returncode == 1, result.output
    assert "rejected the pairing token" in result.output and "Nothing was installed" in result.output
    assert sandbox.snapshot_tree() == before  # not even /usr/data or /etc/init.d


def test_k1_install_with_only_busybox_and_python(sandbox, tmp_path, cloud, printer, release):
    """A stock rooted K1 has BusyBox (its wget, sha256sum, ...) and python3:
    no curl, no GNU wget, no bash."""
    publish_connector(release, "1.0.0", tmp_path, pyz=True)
    k1bin = stock_k1_path(tmp_path)
    assert not os.path.exists(os.path.join(k1bin, "curl")) and not os.path.exists(os.path.join(k1bin, "bash"))
    result = sandbox.run("busybox", "install-k1.sh", *install_args(cloud, printer), path=k1bin)
    assert_ok(result)
    config = config_of(sandbox.k1_dir / "config.json")
    cloud.wait_for(lambda: heartbeats_of(cloud, config["connector_id"]), 10, "a heartbeat")


def test_k1_prefers_a_mipsle_binary_that_runs_and_falls_back_to_the_pyz(sandbox, tmp_path, cloud, printer,
                                                                        release):
    env = {"PRINTER_CONNECTOR_ARCH": "mips"}
    release.publish("1.0.0", {"printer-connector-linux-mipsle": crashing_binary("0.0.0"),
                              PYZ: make_pyz("1.0.0", tmp_path)})
    result = sandbox.run("dash", "install-k1.sh", *install_args(cloud, printer), env=env)
    assert_ok(result)
    assert "printer-connector-linux-mipsle does not run here" in result.output
    assert "printer-connector.pyz runs here" in result.output
    assert (sandbox.k1_dir / "printer-connector").read_bytes()[:2] == b"#!"

    # A release whose mipsle binary starts here: the re-run switches to it.
    mipsle = connector_source("1.1.0")
    release.publish("1.1.0", {"printer-connector-linux-mipsle": mipsle, PYZ: make_pyz("1.1.0", tmp_path)})
    result = sandbox.run("busybox", "install-k1.sh", env=env)
    assert_ok(result)
    assert "printer-connector-linux-mipsle runs here and reports version 1.1.0" in result.output
    assert (sandbox.k1_dir / "printer-connector").read_bytes() == mipsle
