"""Fixtures and helpers for the installer tests: every script runs for real, under dash,
bash and BusyBox sh, in a scratch root (PRINTER_CONNECTOR_ROOT), with a
release served from 127.0.0.1, stand-ins for systemctl/journalctl that really
start and stop the connector, the reference cloud and the printer simulator
(the `cloud` and `printer` fixtures of tests/conftest.py).

The "release binaries" are the real connector.py with its __version__
rewritten (and, for the K1, a real zipapp of it): the installed connector
pairs with the reference cloud and sends heartbeats.
"""

import functools
import hashlib
import http.server
import json
import os
import platform
import pwd
import re
import shutil
import signal
import ssl
import subprocess
import sys
import sysconfig
import tempfile
import threading
import zipapp
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from harness import new_token, wait_until  # noqa: E402,F401  (the shared test harness)

SOURCES = REPO / "installers"
# The standalone scripts the tests run, as a release publishes them: made
# from SOURCES by build/build-installers.sh (make installers), and made again
# here, so a test never runs scripts older than their source.
INSTALLERS = REPO / "dist" / "installers"
subprocess.run(["sh", str(REPO / "build" / "build-installers.sh"), str(INSTALLERS)], check=True,
               stdout=subprocess.DEVNULL)
STUBS = Path(__file__).resolve().parent / "stubs"
TLS_DIR = Path(__file__).resolve().parent / "tls"
SCRIPTS = ["install-klipper.sh", "install-k1.sh", "update.sh", "uninstall.sh"]
SHELLS = {"dash": ["dash"], "bash": ["bash"], "busybox": ["busybox", "sh"]}
SERVICE = "printer-connector"
PYZ = "printer-connector.pyz"


def host_asset():
    machine = platform.machine()
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(machine)
    if arch is None and machine.startswith("armv7"):
        arch = "armv7"
    assert arch, "no release architecture for %s" % machine
    return "printer-connector-linux-" + arch


# ---------------------------------------------------------------- artifacts

def connector_source(version):
    """connector.py with its version line rewritten."""
    text = (REPO / "connector.py").read_text()
    text, n = re.subn(r'^__version__ = "[^"]*"', '__version__ = "%s"' % version, text, count=1, flags=re.M)
    assert n == 1, "connector.py has no __version__ line"
    return text.encode()


def crashing_binary(version):
    """Reports VERSION to --version, but exits 1 at start: a release that
    passes the pre-swap check and fails only when it runs."""
    return ('#!/usr/bin/env python3\nimport sys\n'
            'if sys.argv[1:] == ["--version"]:\n'
            '    print("printer-connector %s")\n    sys.exit(0)\n'
            'print("time=x level=ERROR msg=\\"broken build\\"")\nsys.exit(1)\n' % version).encode()


def dead_binary():
    """Exits 1 at once, even for --version."""
    return b"#!/usr/bin/env python3\nimport sys\nsys.exit(1)\n"


def make_pyz(version, workdir):
    """A real zipapp like the release's printer-connector.pyz: the connector
    as __main__ plus certifi (its CA bundle is what the K1 installer keeps);
    its other dependencies come from the test's Python."""
    import certifi
    src = Path(workdir) / ("pyz-src-" + version)
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    (src / "__main__.py").write_bytes(connector_source(version))
    shutil.copytree(os.path.dirname(certifi.__file__), src / "certifi",
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = Path(workdir) / ("pyz-" + version)
    zipapp.create_archive(src, out, interpreter="/usr/bin/env python3")
    return out.read_bytes()


# ------------------------------------------------------------ release server

class Release:
    """Releases laid out as GitHub serves them: BASE/latest/download/ASSET
    and BASE/download/vX.Y.Z/ASSET, each with SHA256SUMS and VERSION."""

    def __init__(self, workdir, tls=False):
        self.dir = Path(workdir) / "releases"
        self.dir.mkdir(parents=True)
        self.latest = None
        self.requests = []
        # Files served at BASE/raw/NAME, as raw.githubusercontent.com serves
        # the repository's main branch (installers/bootstrap.sh).
        self.raw = {"bootstrap.sh": (SOURCES / "bootstrap.sh").read_bytes()}
        self.heads = []
        # Assets whose size HEAD does not say.
        self.no_length = set()
        # Asset name -> "stall" (half the body, then silence until the
        # client gives up) or "truncate" (half the body, then the end).
        self.faults = {}
        self.closing = threading.Event()
        release = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):
                """The size of an asset, as GitHub answers (the installers' free-space check)."""
                release.heads.append(self.path)
                target = release.target(self.path)
                if target is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                if target.name not in release.no_length:
                    self.send_header("Content-Length", str(target.stat().st_size))
                self.end_headers()

            def do_GET(self):
                release.requests.append(self.path)
                path = self.path.split("?")[0]
                if path.startswith("/raw/") and path[len("/raw/"):] in release.raw:
                    data = release.raw[path[len("/raw/"):]]
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                if path.startswith("/latest/download/") and release.latest:
                    path = "/download/v%s/%s" % (release.latest, path[len("/latest/download/"):])
                parts = path.strip("/").split("/")
                target = release.dir / parts[1] / parts[2] if len(parts) == 3 and parts[0] == "download" else None
                if target is None or not target.is_file():
                    self.send_error(404)
                    return
                data = target.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                fault = release.faults.get(parts[2])
                if fault:
                    self.wfile.write(data[:len(data) // 2])
                    self.wfile.flush()
                    if fault == "stall":
                        release.closing.wait(600)
                    self.close_connection = True
                    return
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        scheme = "http"
        if tls:
            # A self-signed certificate for 127.0.0.1 (tls/cert.pem) that no
            # CA store trusts, like a man in the middle would present.
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(TLS_DIR / "cert.pem", TLS_DIR / "key.pem")
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = "%s://127.0.0.1:%d" % (scheme, self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def target(self, url_path):
        """The file a /download/vX/ASSET (or /latest/download/ASSET) path names, if any."""
        path = url_path.split("?")[0]
        if path.startswith("/latest/download/") and self.latest:
            path = "/download/v%s/%s" % (self.latest, path[len("/latest/download/"):])
        parts = path.strip("/").split("/")
        target = self.dir / parts[1] / parts[2] if len(parts) == 3 and parts[0] == "download" else None
        return target if target is not None and target.is_file() else None

    def publish(self, version, assets, latest=True, bad_sums=()):
        """assets: name -> bytes. Names in bad_sums get a wrong checksum."""
        folder = self.dir / ("v" + version)
        folder.mkdir()
        lines = []
        for name, data in sorted(assets.items()):
            (folder / name).write_bytes(data)
            digest = hashlib.sha256(data).hexdigest()
            if name in bad_sums:
                digest = hashlib.sha256(data + b"tampered").hexdigest()
            lines.append("%s  %s\n" % (digest, name))
        (folder / "SHA256SUMS").write_text("".join(lines))
        (folder / "VERSION").write_text(version + "\n")
        if latest:
            self.latest = version
        return folder

    def close(self):
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def release(tmp_path):
    server = Release(tmp_path)
    yield server
    server.close()


# ------------------------------------------------------------------ sandbox

class Sandbox:
    """A scratch root the scripts treat as /, plus stub systemctl/journalctl."""

    def __init__(self, tmp_path, release, root_name="root"):
        self.tmp = tmp_path
        base = tmp_path
        self.own_base = None
        if os.geteuid() == 0:
            # The stand-in for systemd runs a service as its User= (as systemd
            # does): the sandbox must be reachable by that user, as / is, and
            # pytest keeps its own temporary folders 0700 (and makes them so again).
            self.own_base = base = Path(tempfile.mkdtemp(prefix="installer-sandbox-"))
            os.chmod(base, 0o711)
            os.symlink(base, tmp_path / "sandbox")
        self.root = base / root_name
        self.state = base / "stub-state"
        self.bin = base / "stub-bin"
        for d in (self.root, self.state, self.bin):
            d.mkdir()
        for name in ("systemctl", "journalctl"):
            os.symlink(STUBS / name, self.bin / name)
        if self.own_base:
            (self.bin / "python3").write_text(service_python_wrapper())
            os.chmod(self.bin / "python3", 0o755)
        # The Klipper user: not root where the tests can give files away.
        self.user = "nobody" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        self.home = self.root / "home" / self.user
        self.printer_data = self.home / "printer_data"
        (self.printer_data / "config").mkdir(parents=True)
        (self.root / "var/lock").mkdir(parents=True)
        self.moonraker_conf = ("[server]\nhost: 127.0.0.1\nport: 7125\n\n"
                               "[authorization]\ntrusted_clients:\n    127.0.0.0/8\n")
        (self.printer_data / "config" / "moonraker.conf").write_text(self.moonraker_conf)
        (self.printer_data / "moonraker.asvc").write_text("klipper_mcu\nwebcamd\ncrowsnest\n")
        for path in [self.home] + list(self.home.rglob("*")):
            shutil.chown(path, self.user)
        self.k1_dir = self.root / "usr/data/printer-connector"
        self.k1_init = self.root / "etc/init.d/S99printer-connector"
        self.env = dict(os.environ)
        for key in list(self.env):
            if key.startswith("PRINTER_CONNECTOR_") or key in ("SUDO_USER", "CLOUD_URL"):
                del self.env[key]
        self.env.update({
            "PATH": os.pathsep.join([str(self.bin), os.path.dirname(sys.executable), self.env.get("PATH", "")]),
            "PRINTER_CONNECTOR_ROOT": str(self.root),
            "PRINTER_CONNECTOR_RELEASE_URL": release.url,
            "PRINTER_CONNECTOR_HEALTH_TIMEOUT": "30",
            "STUB_STATE": str(self.state),
        })

    @property
    def klipper_dir(self):
        return self.home / SERVICE

    @property
    def klipper_bin(self):
        """Named as the release asset, the file Moonraker's update manager replaces."""
        return self.klipper_dir / host_asset()

    def unit(self, name=SERVICE):
        return self.root / "etc/systemd/system" / (name + ".service")

    def run(self, shell, script, *args, env=None, timeout=180, path=None):
        """Runs installers/SCRIPT under SHELL; stdout and stderr together in .output."""
        full_env = dict(self.env, **(env or {}))
        if path is not None:
            full_env["PATH"] = path
        cmd = [shutil.which(SHELLS[shell][0])] + SHELLS[shell][1:] + [str(path_of(script))] + list(args)
        result = subprocess.run(cmd, env=full_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, timeout=timeout, start_new_session=True)
        result.output = result.stdout.decode(errors="replace")
        return result

    def calls(self):
        log = self.state / "calls.log"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def changes(self):
        """The systemctl calls that change something (queries left out)."""
        return self.systemctl_calls("start", "stop", "restart", "enable", "disable", "daemon-reload")

    def systemctl_calls(self, *verbs):
        return [c[1:] for c in self.calls() if c[0] == "systemctl" and (not verbs or c[1] in verbs)]

    def unit_state(self, name=SERVICE):
        path = self.state / ("unit-%s.json" % name)
        return json.loads(path.read_text()) if path.exists() else {}

    def service_pid(self, name=SERVICE):
        pid = self.unit_state(name).get("pid")
        return pid if pid and process_alive(pid) else None

    def journal(self, name=SERVICE):
        """Output of the service's current run."""
        inv = self.unit_state(name).get("invocation")
        path = self.state / ("journal-%s-%s.log" % (name, inv))
        return path.read_text(errors="replace") if inv and path.exists() else ""

    def k1_child_pid(self):
        path = self.root / "var/run/printer-connector.pid.child"
        if not path.exists():
            return None
        try:
            pid = int(path.read_text().strip() or 0)
        except ValueError:
            return None
        return pid if process_alive(pid) else None

    def snapshot_tree(self):
        """Every path under the root with its size: to see that nothing changed."""
        return {str(p.relative_to(self.root)): (p.stat().st_size if p.is_file() else -1)
                for p in self.root.rglob("*")}

    def cleanup(self):
        init = self.k1_init
        if init.exists() and "printer-connector init script" in init.read_text(errors="replace"):
            subprocess.run(["sh", str(init), "stop"], env=self.env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=30)
        pids = self.state / "pids"
        for line in (pids.read_text().split() if pids.exists() else []):
            try:
                os.killpg(int(line), signal.SIGKILL)
            except OSError:
                pass
        for pidfile in (self.root / "var/run").glob("*.pid*") if (self.root / "var/run").exists() else []:
            try:
                os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        if self.own_base:
            shutil.rmtree(self.own_base, ignore_errors=True)


def can_run_as_nobody(python):
    try:
        account = pwd.getpwnam("nobody")
        return subprocess.run([python, "-c", "import requests, click, websocket"], user=account.pw_uid,
                              group=account.pw_gid, extra_groups=[], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              cwd="/", timeout=60).returncode == 0
    except OSError:
        return False


@functools.lru_cache(maxsize=None)
def service_python_wrapper():
    """A python3 for the sandbox's PATH that the service user can run, with
    the test venv's packages: the venv's own when that user can reach it,
    else the system's python3 with the venv's site-packages."""
    if can_run_as_nobody(sys.executable):
        return '#!/bin/sh\nexec "%s" "$@"\n' % sys.executable
    system = "/usr/bin/python3"
    packages = sysconfig.get_paths()["purelib"]
    wrapper = '#!/bin/sh\nPYTHONPATH="%s" exec "%s" "$@"\n' % (packages, system)
    probe = subprocess.run(["sh", "-c", wrapper.split("\n")[1].replace('"$@"', "-c pass")])
    assert probe.returncode == 0, "no python3 that the service user nobody can run"
    return wrapper


def stock_k1_path(tmp_path, python=sys.executable):
    """A PATH with what a stock rooted K1 has: BusyBox applets (its wget checks
    no certificate) and python3; no curl, no GNU wget, no bash."""
    k1bin = Path(tmp_path) / "k1-bin"
    k1bin.mkdir()
    busybox = shutil.which("busybox")
    applets = subprocess.run([busybox, "--list"], stdout=subprocess.PIPE, check=True).stdout.decode().split()
    for applet in applets:
        os.symlink(busybox, k1bin / applet)
    # Started by its own path (a venv's Python must be).
    (k1bin / "python3").write_text('#!/bin/sh\nexec "%s" "$@"\n' % python)
    os.chmod(k1bin / "python3", 0o755)
    return str(k1bin)


def path_of(script):
    return script if os.path.isabs(str(script)) else INSTALLERS / script


def process_alive(pid):
    try:
        os.kill(pid, 0)
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture
def sandbox(tmp_path, release):
    box = Sandbox(tmp_path, release)
    yield box
    box.cleanup()


# Every character a shell, systemd or a sed script could take for syntax.
ODD_NAME = "the root 'q' \"d\" $HOME ${x} %h %% \\n `id` ;&|*?[a] <> ~ #"


@pytest.fixture
def odd_sandbox(tmp_path, release):
    """A sandbox whose root (so every path of the install) holds spaces and
    characters special to sh and systemd."""
    box = Sandbox(tmp_path, release, root_name=ODD_NAME)
    yield box
    box.cleanup()


def installer_assets():
    """The four standalone scripts, as release assets."""
    return {name: (INSTALLERS / name).read_bytes() for name in SCRIPTS}


def bootstrap_env(release):
    """Where an entry script (installers/NAME.sh) fetches the bootstrap from."""
    return {"PRINTER_CONNECTOR_BOOTSTRAP_URL": release.url + "/raw/bootstrap.sh"}


def publish_connector(release, version, tmp_path, latest=True, pyz=False, installers=False, **kwargs):
    assets = {host_asset(): connector_source(version)}
    if pyz:
        assets[PYZ] = make_pyz(version, tmp_path)
    if installers:
        assets.update(installer_assets())
    return release.publish(version, assets, latest=latest, **kwargs)


def install_args(cloud, printer, token=None):
    return ["--cloud-url", cloud.url, "--pairing-token", token or new_token(cloud),
            "--printer", "0|Sim printer|%s" % printer.url]


def heartbeats_of(cloud, connector_id):
    return [h for h in cloud.heartbeats if str(h["connector_id"]) == str(connector_id)]


def config_of(path):
    return json.loads(Path(path).read_text())


# ------------------------------------------------ a script held at one step

class Hold:
    """COMMAND, found first on PATH, stops its caller for good on the
    NTH call whose arguments match PATTERN (a sh case pattern): before
    running the real command, or after it (after=True). With pause=SECONDS
    it only says so and waits that long before it goes on: the caller is
    killed in the middle of that step."""

    def __init__(self, tmp_path, command, pattern, nth=1, after=False, real=None, pause=None):
        self.dir = tmp_path / "hold"
        self.dir.mkdir()
        self.reached = self.dir / "reached"
        real = real or subprocess.run(["sh", "-c", "command -v %s" % command], stdout=subprocess.PIPE,
                                      check=True).stdout.decode().strip()
        script = self.dir / command
        script.write_text("""#!/bin/sh
pattern='%(pattern)s'
case "$*" in
    $pattern)
        n=$(($(cat '%(dir)s/count' 2>/dev/null || echo 0) + 1))
        echo "$n" >'%(dir)s/count'
        if [ "$n" -eq %(nth)d ]; then
            %(run)s
            : >'%(dir)s/reached'
            %(wait)s
        fi ;;
esac
exec '%(real)s' "$@"
""" % dict(pattern=pattern, dir=self.dir, nth=nth, real=real, run=("'%s' \"$@\"" % real) if after else ":",
           wait=("'%s' %s" % (shutil.which("sleep"), pause)) if pause else "exec sleep 600"))
        os.chmod(script, 0o755)

    def path(self, rest):
        return os.pathsep.join([str(self.dir), rest])


def start_held(sandbox, shell, script, hold, *args, env=None, path=None):
    cmd = [shutil.which(SHELLS[shell][0])] + SHELLS[shell][1:] + [str(INSTALLERS / script)] + list(args)
    full_env = dict(sandbox.env, **(env or {}))
    full_env["PATH"] = hold.path(path or full_env["PATH"])
    with open(hold.dir / "output", "wb") as log:
        return subprocess.Popen(cmd, env=full_env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def kill_at(proc, hold):
    """SIGKILL to the script's process group once it is held."""
    try:
        wait_until(lambda: hold.reached.exists() or proc.poll() is not None, 120, "the script reaching its step")
        assert hold.reached.exists(), "the script ended before the step:\n" + (hold.dir / "output").read_text()
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
