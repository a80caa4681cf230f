"""TLS: never turned off silently (only a K1's first install goes on without
it, saying so, and the SHA256 check still applies); prompts on a terminal."""

import fcntl
import os
import select
import subprocess
import termios
import time

import pytest

from installer_fixtures import (PYZ, SHELLS, SOURCES, TLS_DIR, Release, bootstrap_env, config_of, heartbeats_of,
                                host_asset, install_args, new_token, publish_connector, stock_k1_path)

CA = str(TLS_DIR / "cert.pem")


@pytest.fixture
def tls_release(tmp_path):
    server = Release(tmp_path / "tls", tls=True)
    yield server
    server.close()


def test_klipper_install_refuses_a_server_it_cannot_verify(sandbox, tmp_path, cloud, printer, tls_release):
    publish_connector(tls_release, "1.0.0", tmp_path)
    env = {"PRINTER_CONNECTOR_RELEASE_URL": tls_release.url}
    before = sandbox.snapshot_tree()
    # curl (on this host's PATH), then python3 alone (a PATH without curl).
    for path in (None, sandbox.env["PATH"].split(os.pathsep)[0] + os.pathsep + stock_k1_path(tmp_path)):
        result = sandbox.run("dash", "install-klipper.sh", *install_args(cloud, printer), env=env, path=path)
        assert result.returncode == 1, result.output
        assert "could not read the latest version from %s" % tls_release.url in result.output
        assert "TLS NOT VERIFIED" not in result.output
        assert sandbox.snapshot_tree() == before
    assert tls_release.requests == []  # no request got through the handshake

    # Given the server's CA, the same download is verified and goes through.
    result = sandbox.run("dash", "install-klipper.sh", *install_args(cloud, printer),
                         env=dict(env, PRINTER_CONNECTOR_CA_BUNDLE=CA))
    assert result.returncode == 0, result.output
    assert "/download/v1.0.0/" + host_asset() in tls_release.requests


def test_k1_first_install_goes_on_unverified_but_updates_verify(sandbox, tmp_path, cloud, printer, tls_release):
    env = {"PRINTER_CONNECTOR_RELEASE_URL": tls_release.url}
    k1 = stock_k1_path(tmp_path)
    d = sandbox.k1_dir

    # Without TLS verification the checksum still decides.
    publish_connector(tls_release, "0.9.0", tmp_path, pyz=True, bad_sums=(PYZ,))
    before = sandbox.snapshot_tree()
    result = sandbox.run("busybox", "install-k1.sh", *install_args(cloud, printer), env=env, path=k1)
    assert result.returncode == 1
    assert "TLS NOT VERIFIED" in result.output and "checksum mismatch for %s" % PYZ in result.output
    assert sandbox.snapshot_tree() == before

    publish_connector(tls_release, "1.0.0", tmp_path, pyz=True)
    result = sandbox.run("busybox", "install-k1.sh", *install_args(cloud, printer), env=env, path=k1)
    assert result.returncode == 0, result.output
    assert "TLS NOT VERIFIED" in result.output and "checksum of %s verified" % PYZ in result.output
    assert "BEGIN CERTIFICATE" in (d / "ca-bundle.pem").read_text()
    installed = (d / "printer-connector").read_bytes()

    # Updates verify TLS with the connector's own CA bundle: this server's
    # certificate is not in it, so the update stops before downloading.
    publish_connector(tls_release, "1.1.0", tmp_path, pyz=True)
    result = sandbox.run("busybox", "update.sh", env=env, path=k1)
    assert result.returncode == 1
    assert "TLS certificate could not be verified" in result.output
    assert "TLS NOT VERIFIED" not in result.output
    assert (d / "printer-connector").read_bytes() == installed

    result = sandbox.run("busybox", "update.sh", env=dict(env, PRINTER_CONNECTOR_CA_BUNDLE=CA), path=k1)
    assert result.returncode == 0, result.output
    assert "TLS NOT VERIFIED" not in result.output
    config = config_of(d / "config.json")
    cloud.wait_for(lambda: [h for h in heartbeats_of(cloud, config["connector_id"])
                            if h["body"]["status"]["version"] == "1.1.0"], 10, "a 1.1.0 heartbeat")


def read_until(fd, text, output, timeout=30.0):
    deadline = time.monotonic() + timeout
    while text not in output[0]:
        remaining = deadline - time.monotonic()
        assert remaining > 0, "no %r on the terminal; got:\n%s" % (text, output[0])
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                chunk = b""
            assert chunk, "terminal closed before %r; got:\n%s" % (text, output[0])
            output[0] += chunk.decode(errors="replace")


@pytest.mark.parametrize("shell", ["dash", "busybox"])
def test_installer_asks_on_the_terminal_while_stdin_is_the_pipe(sandbox, shell, tmp_path, cloud, printer,
                                                                 release):
    publish_connector(release, "1.0.0", tmp_path, installers=True)
    token = new_token(cloud)
    master, slave = os.openpty()

    def controlling_terminal():
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

    # The committed entry, which runs the release's install-klipper.sh.
    script = (SOURCES / "install-klipper.sh").read_bytes()
    proc = subprocess.Popen(SHELLS[shell], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=dict(sandbox.env, **bootstrap_env(release)),
                            preexec_fn=controlling_terminal,
                            pass_fds=(slave,))
    os.close(slave)
    try:
        # As with `wget -qO- URL | sh`: the script arrives on stdin.
        proc.stdin.write(script)
        proc.stdin.close()
        seen = [""]
        for prompt, answer in (("Cloud URL [https://www.spoolr.io]: ", cloud.url),
                               ("Pairing token", token),
                               ("Printer name [", "Desk printer"),
                               ("Moonraker URL [http://127.0.0.1:7125]: ", printer.url)):
            read_until(master, prompt, seen)
            os.write(master, answer.encode() + b"\n")
        output = proc.stdout.read().decode()
        assert proc.wait(120) == 0, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    config = config_of(sandbox.klipper_dir / "config.json")
    assert config["cloud_url"] == cloud.url and config["moonraker"][0]["name"] == "Desk printer"
    assert config["moonraker"][0]["base_url"] == printer.url
    assert token in [r.get("pairing_token") for r in cloud.registrations]
    assert "heartbeat sent" in output


def test_a_clock_far_in_the_past_is_named_when_tls_fails(sandbox, tmp_path, cloud, printer, tls_release):
    """A board without a battery boots in 2001: certificates are not valid yet."""
    publish_connector(tls_release, "1.0.0", tmp_path)
    clock = tmp_path / "clock-2001"
    clock.mkdir()
    (clock / "date").write_text('#!/bin/sh\nif [ "$1" = -u ]; then shift; case $1 in +%Y) echo 2001; exit 0 ;; '
                                '+%Y-%m-%d*) echo "2001-01-01 00:00"; exit 0 ;; esac; fi\nexec /bin/date "$@"\n')
    os.chmod(clock / "date", 0o755)
    before = sandbox.snapshot_tree()
    result = sandbox.run("dash", "install-klipper.sh", *install_args(cloud, printer),
                         env={"PRINTER_CONNECTOR_RELEASE_URL": tls_release.url},
                         path=str(clock) + os.pathsep + sandbox.env["PATH"])
    assert result.returncode == 1, result.output
    assert "clock says 2001-01-01 00:00 UTC, so no TLS certificate is valid yet" in result.output
    assert sandbox.snapshot_tree() == before

    # With a right clock the same failure says nothing of clocks.
    result = sandbox.run("dash", "install-klipper.sh", *install_args(cloud, printer),
                         env={"PRINTER_CONNECTOR_RELEASE_URL": tls_release.url})
    assert result.returncode == 1 and "clock says" not in result.output
