"""dist/printer-connector-linux-mipsle, the static binary for the Creality K1,
run under qemu-mipsel-static with a NaN2008-only CPU model (P5600), as the
K1's Ingenic CPU runs it: the ELF is what the device needs, the binary is
built from the current connector.py, it pairs, runs a command and pushes a
snapshot against the reference cloud and the simulator, speaks HTTPS, and
leaves nothing behind in TMPDIR.

Opt-in (several minutes of cross build first): see conftest.py beside this.
"""
import hashlib
import json
import os
import pathlib
import re
import select
import shutil
import socket
import ssl
import subprocess
import threading
import zipfile

import pytest

from harness import unpaired_config

pytestmark = pytest.mark.artifacts

ROOT = pathlib.Path(__file__).resolve().parents[2]
BINARY = ROOT / "dist" / "printer-connector-linux-mipsle"
# Built with it: the same launcher and archive, build/mipsle/selfcheck.py as
# __main__ (the shipped binary runs only connector.py).
SELFCHECK = ROOT / "build" / "work" / "mipsle" / "selfcheck"
QEMU = ["qemu-mipsel-static", "-cpu", "P5600"]
BUILD_HINT = "run `make binary-mipsle` (sh build/build-mipsle.sh) first"
BUILD_INFO = "printer_connector_build.json"
# QEMU translates every instruction: allow for a slow start.
SLOW = 90.0


def source_version():
    match = re.search(r'^__version__ = "([^"]+)"', (ROOT / "connector.py").read_text(), re.M)
    assert match, "no __version__ line in connector.py"
    return match.group(1)


@pytest.fixture(scope="module")
def binary():
    if not BINARY.is_file():
        pytest.fail("%s is missing: %s" % (BINARY, BUILD_HINT))
    if shutil.which(QEMU[0]) is None:
        pytest.fail("%s not found: sh build/ensure-debian-packages.sh qemu-user-static" % QEMU[0])
    with zipfile.ZipFile(BINARY) as archive:
        info = json.loads(archive.read(BUILD_INFO))
    current = hashlib.sha256((ROOT / "connector.py").read_bytes()).hexdigest()
    if info["connector_sha256"] != current:
        pytest.fail("%s was built from another connector.py: %s" % (BINARY, BUILD_HINT))
    return BINARY


def launcher_bytes(path):
    """The executable part in front of the appended archive."""
    with zipfile.ZipFile(path) as archive:
        start = min(info.header_offset for info in archive.infolist())
    with open(path, "rb") as handle:
        return handle.read(start)


@pytest.fixture(scope="module")
def selfcheck(binary):
    if not SELFCHECK.is_file():
        pytest.fail("%s is missing: %s" % (SELFCHECK, BUILD_HINT))
    if launcher_bytes(SELFCHECK) != launcher_bytes(binary):
        pytest.fail("%s is not from the same build as %s: %s" % (SELFCHECK, binary, BUILD_HINT))
    return SELFCHECK


@pytest.fixture
def mipsle_cmd(binary, monkeypatch):
    """Makes the shared Connector fixtures run the binary under QEMU."""
    monkeypatch.setenv("CONNECTOR_CMD", " ".join(QEMU + [str(binary)]))
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)


def test_elf_is_static_nan2008_mips32r2(binary):
    header = subprocess.run(["readelf", "-h", str(binary)], capture_output=True, text=True, check=True).stdout
    flags = re.search(r"Flags:\s*(.*)", header).group(1)
    assert "nan2008" in flags and "mips32r2" in flags and "o32" in flags, flags
    assert re.search(r"Machine:\s*MIPS", header) and "little endian" in header, header
    segments = subprocess.run(["readelf", "-l", str(binary)], capture_output=True, text=True, check=True).stdout
    assert "INTERP" not in segments, "asks for a dynamic loader:\n" + segments
    described = subprocess.run(["file", "-b", str(binary)], capture_output=True, text=True, check=True).stdout
    assert "statically linked" in described and "MIPS32 rel2" in described, described
    assert binary.stat().st_size <= 14 * 1024 * 1024, "over the 14 MB binary size target"


def test_embeds_the_pinned_packages(binary):
    with zipfile.ZipFile(binary) as archive:
        names = set(archive.namelist())
        info = json.loads(archive.read(BUILD_INFO))
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "requirements" / "runtime.txt").read_text(), re.M)
    assert pins
    for name, version in pins:
        dist = "%s-%s.dist-info/METADATA" % (name.replace("-", "_"), version)
        assert dist in names, "%s==%s is not embedded (%s)" % (name, version, info["wheels"])
    # Compiled only: no sources to compile (and write) on the device.
    assert "connector.pyc" in names and "__main__.pyc" in names and "ssl.pyc" in names
    assert not [n for n in names if n.endswith(".py")]


def test_version_under_nan2008_cpu(binary):
    result = subprocess.run(QEMU + [str(binary), "--version"], capture_output=True, text=True, timeout=SLOW)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "printer-connector %s\n" % source_version()
    assert result.stderr == ""


def test_runs_from_any_directory_through_a_symlink(binary, tmp_path):
    # As installed on the K1: the file under /usr/data, started through a
    # link, from another working directory, with a hostile Python environment.
    install = tmp_path / "usr data" / "printer-connector"
    install.mkdir(parents=True)
    shutil.copy2(binary, install / "printer-connector")
    link = tmp_path / "bin-printer-connector"
    link.symlink_to(install / "printer-connector")
    env = dict(os.environ, PYTHONHOME="/nonexistent", PYTHONPATH="/nonexistent", PYTHONSTARTUP="/nonexistent")
    result = subprocess.run(QEMU + [str(link), "--version"], capture_output=True, text=True,
                            timeout=SLOW, cwd="/", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "printer-connector %s\n" % source_version()


def test_legacy_nan_cpu_is_refused_so_the_cpu_model_matters(binary):
    # The 24Kf model is legacy-NaN only; QEMU refuses a NaN2008 program there
    # just as a NaN2008 CPU refuses a legacy-NaN one.
    result = subprocess.run(["qemu-mipsel-static", "-cpu", "24Kf", str(binary), "--version"],
                            capture_output=True, text=True, timeout=SLOW)
    assert result.returncode != 0
    assert "NaN mode" in result.stderr


def test_pairing_command_and_snapshot(mipsle_cmd, cloud, printer, make_connector, tmp_path):
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    connector = make_connector(unpaired_config(cloud, printer))
    connector.start(env={"TMPDIR": str(tmpdir)})
    connector.wait_log("Pairing successful", timeout=SLOW)
    connector.wait_log("Connector running", timeout=SLOW)
    printer.add_file("mipsle.gcode")
    command_id = cloud.enqueue_command(connector.connector_id, connector.printer_id, "start_print",
                                       {"filename": "mipsle.gcode"})
    command = cloud.wait_for(lambda: cloud.command(command_id)["status"] in ("succeeded", "failed") and
                             cloud.command(command_id), timeout=SLOW, message="start_print finished")
    assert command["status"] == "succeeded", command
    assert command["result"]["filename"] == "mipsle.gcode"
    connector.wait_log("Command finished", timeout=SLOW)
    cloud.wait_for(lambda: [s for s in cloud.snapshots if s["connector_id"] == str(connector.connector_id)],
                   timeout=SLOW, message="a snapshot from the mipsle connector")
    # While running, TMPDIR holds at most certifi's CA bundle (about 0.3 MB).
    during = [p.stat().st_size for p in tmpdir.iterdir()]
    assert sum(during) < 512 * 1024, during
    assert connector.stop(timeout=SLOW) == 0, connector.run_log[-2000:]
    assert list(tmpdir.iterdir()) == [], "left behind in TMPDIR"


class TLSProxy:
    """Terminates TLS on 127.0.0.1 with a test CA's certificate and relays
    the plain bytes to a local HTTP server (the reference cloud)."""

    def __init__(self, target_port, certfile, keyfile):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(certfile, keyfile)
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.handshakes = 0
        self.failed_handshakes = []
        self.lock = threading.Lock()
        self.closing = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return "https://127.0.0.1:%d" % self.port

    def _accept(self):
        while not self.closing:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        conn.settimeout(SLOW)
        try:
            tls = self.context.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            with self.lock:
                self.failed_handshakes.append(str(exc))
            conn.close()
            return
        with self.lock:
            self.handshakes += 1
        try:
            with tls, socket.create_connection(("127.0.0.1", self.target_port)) as plain:
                self._relay(tls, plain)
        except OSError:
            pass

    def _relay(self, tls, plain):
        while not self.closing:
            ready = [tls] if tls.pending() else select.select([tls, plain], [], [], 0.5)[0]
            for sock in ready:
                data = sock.recv(65536)
                if not data:
                    return
                (plain if sock is tls else tls).sendall(data)

    def close(self):
        self.closing = True
        self.listener.close()
        self.thread.join(5)


def make_test_ca(directory):
    """A CA and a certificate for 127.0.0.1 signed by it (openssl command)."""
    openssl = shutil.which("openssl")
    assert openssl, "the openssl command is needed to make a test CA"

    def run(*args):
        subprocess.run([openssl] + list(args), cwd=directory, check=True, capture_output=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=printer-connector test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (directory / "server.ext").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "server.ext")
    return directory / "ca.pem", directory / "server.pem", directory / "server.key"


@pytest.fixture
def tls_cloud(cloud, tmp_path):
    ca, cert, key = make_test_ca(tmp_path)
    proxy = TLSProxy(int(cloud.url.rsplit(":", 1)[1]), str(cert), str(key))
    yield proxy, ca
    proxy.close()


def test_https_request_with_the_same_interpreter(selfcheck, tls_cloud):
    # The connector trusts only certifi's bundle (trust_env is off, so
    # REQUESTS_CA_BUNDLE does not apply), so a completed handshake against a
    # local test CA is checked with the self-check build: the same launcher,
    # OpenSSL, ssl module, requests and urllib3 as the shipped binary.
    proxy, ca = tls_cloud
    result = subprocess.run(QEMU + [str(selfcheck), proxy.url + "/api/v1/heartbeat", str(ca)],
                            capture_output=True, text=True, timeout=SLOW)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"status [1-5]\d\d TLSv1\.[23]\n", result.stdout), result.stdout
    assert proxy.handshakes == 2 and not proxy.failed_handshakes, proxy.failed_handshakes


def test_selfcheck_loads_certifi_bundle(selfcheck):
    result = subprocess.run(QEMU + [str(selfcheck)], capture_output=True, text=True, timeout=SLOW)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok OpenSSL 3.0."), result.stdout


def test_https_verifies_against_certifi_bundle(mipsle_cmd, tls_cloud, cloud, printer, make_connector):
    # Without the test CA the connector trusts only certifi's bundle (loaded
    # from inside the binary), which does not know the test CA: the handshake
    # must fail on verification, not on a missing bundle.
    proxy, _ = tls_cloud
    connector = make_connector(unpaired_config(cloud, printer, cloud_url=proxy.url))
    connector.start()
    connector.wait_log(r"pairing failed; retrying.*TLS error", timeout=SLOW)
    assert "Pairing successful" not in connector.run_log
    assert proxy.handshakes == 0
    assert any("UNKNOWN_CA" in failure for failure in proxy.failed_handshakes), proxy.failed_handshakes
