"""Tests of the built artifacts in dist/ (issue 5).

`make test` builds them first (`make pyz binary`): the static binary for
this machine's architecture and the zipapp. These tests check that the
binary is static, starts in an empty root, unpacks into $TMPDIR and leaves
nothing behind; that the zipapp runs under Python 3.8 (the Creality K1's
Python) and on newer ones; that both print the version of connector.py and
pass a subset of the integration tests in place of `python connector.py`;
and that the GitHub workflows pass actionlint.
"""

import glob
import json
import os
import platform
import re
import select
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile

import pytest

pytestmark = pytest.mark.artifacts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIST = os.path.join(REPO, "dist")
PYZ = os.path.join(DIST, "printer-connector.pyz")
ASSET_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "armv7"}


def source_version():
    with open(os.path.join(REPO, "connector.py"), encoding="utf-8") as handle:
        match = re.search(r'^__version__ = "([^"]+)"', handle.read(), re.M)
    assert match, "connector.py has no __version__ line"
    return match.group(1)


def host_arch():
    arch = ASSET_ARCH.get(platform.machine())
    assert arch, "no binary is built for this machine (%s)" % platform.machine()
    return arch


def arches_under_test():
    """The host's binary; `build/build-all.sh` also tests the foreign ones
    (run by qemu-user-static through binfmt_misc) with ARTIFACT_ARCHES."""
    names = os.environ.get("ARTIFACT_ARCHES", "").split() or ["host"]
    return [host_arch() if name == "host" else name for name in names]


ARCHES = arches_under_test()
# What `build-binary.sh check` is asked about: the host build (make binary),
# or the build roots' ones (make binary-all).
CHECK_TARGETS = os.environ.get("ARTIFACT_ARCHES", "").split() or ["host"]


def binary(arch):
    path = os.path.join(DIST, "printer-connector-linux-" + arch)
    assert os.path.isfile(path), "%s is missing: run `make binary` (or build/build-binary.sh %s)" % (path, arch)
    return path


def python38():
    """Python 3.8: $PYTHON38, python3.8 on PATH, or pyenv's 3.8.x."""
    candidates = [os.environ.get("PYTHON38", ""), shutil.which("python3.8") or ""]
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    for root in dict.fromkeys([pyenv_root, "/root/.pyenv"]):
        candidates += sorted(glob.glob(os.path.join(root, "versions", "3.8.*", "bin", "python3.8")), reverse=True)
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            out = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 8))"],
                                 capture_output=True, text=True, timeout=60)
            if out.stdout.strip() == "True":
                return candidate
    pytest.fail("Python 3.8 not found (set PYTHON38, put python3.8 on PATH or install pyenv's 3.8): "
                "the zipapp must be tested on the K1's Python")


def run(cmd, **kwargs):
    kwargs.setdefault("timeout", 120)
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def elf_interpreter_segments(path):
    """Count of PT_INTERP program headers: 0 for a static executable."""
    with open(path, "rb") as handle:
        ident = handle.read(16)
        assert ident[:4] == b"\x7fELF", "%s is not an ELF file" % path
        is64 = ident[4] == 2
        endian = "<" if ident[5] == 1 else ">"
        handle.seek(0x20 if is64 else 0x1C)
        phoff = struct.unpack(endian + ("Q" if is64 else "I"), handle.read(8 if is64 else 4))[0]
        handle.seek(0x36 if is64 else 0x2A)
        phentsize, phnum = struct.unpack(endian + "HH", handle.read(4))
        count = 0
        for index in range(phnum):
            handle.seek(phoff + index * phentsize)
            (p_type,) = struct.unpack(endian + "I", handle.read(4))
            count += p_type == 3  # PT_INTERP
    return count


@pytest.mark.parametrize("target", CHECK_TARGETS + ["pyz"])
def test_artifacts_are_built_from_the_current_sources(target):
    """The builds are incremental: dist/ holds what the current sources give."""
    if target == "pyz":
        cmd = ["sh", os.path.join(REPO, "build", "build-pyz.sh"), "check"]
    else:
        cmd = ["sh", os.path.join(REPO, "build", "build-binary.sh"), "check", target]
    out = run(cmd)
    assert out.returncode == 0, "dist/ is stale for %s: %s" % (target, out.stdout + out.stderr)
    assert "is up to date" in out.stdout


@pytest.mark.parametrize("arch", ARCHES)
def test_binary_is_static(arch):
    path = binary(arch)
    assert elf_interpreter_segments(path) == 0, "the binary asks for a dynamic loader"
    if arch == host_arch():
        ldd = run(["ldd", path])
        assert "not a dynamic executable" in ldd.stdout + ldd.stderr, ldd.stdout + ldd.stderr


@pytest.mark.parametrize("arch", ARCHES)
def test_binary_prints_the_version(arch):
    out = run([binary(arch), "--version"])
    assert out.returncode == 0, out.stderr
    assert out.stdout == "printer-connector %s\n" % source_version()


def empty_root_cmd(root, *args):
    """Runs /printer-connector in `root`, which holds only it, /proc and /tmp."""
    unshare = shutil.which("unshare")
    if not unshare:
        pytest.fail("unshare (util-linux) is needed to run the binary in an empty root")
    return [unshare, "--user", "--map-root-user", "--mount", "--pid", "--fork",
            "--mount-proc=/proc", "--root=" + root, "/printer-connector"] + list(args)


@pytest.mark.parametrize("arch", ARCHES)
def test_binary_runs_in_an_empty_root(arch, tmp_path):
    root = tmp_path / "root"
    for folder in ("proc", "tmp"):
        (root / folder).mkdir(parents=True)
    shutil.copy2(binary(arch), str(root / "printer-connector"))
    out = run(empty_root_cmd(str(root), "--version"), env={"PATH": "/"})
    assert out.returncode == 0, out.stderr
    assert out.stdout == "printer-connector %s\n" % source_version()
    # Real work in there: Python, click and json reading a missing config.
    out = run(empty_root_cmd(str(root), "--config", "/missing.json"), env={"PATH": "/"})
    assert out.returncode == 2, out.stdout + out.stderr
    assert "config file not found" in out.stderr
    assert sorted(os.listdir(str(root))) == ["printer-connector", "proc", "tmp"]
    assert os.listdir(str(root / "tmp")) == [], "the binary left files behind in /tmp"


def unreachable_config(folder, scheme="http"):
    """A config whose cloud and printer ports are closed: the connector keeps
    retrying to pair until it is stopped."""
    config = folder / "config.json"
    config.write_text(json.dumps({
        "cloud_url": scheme + "://127.0.0.1:9",
        "pairing_token": "PAIR_artifacts",
        "state_dir": str(folder / "state"),
        "moonraker": [{"printer_id": 0, "name": "test", "base_url": "http://127.0.0.1:9"}],
    }))
    return str(config)


def read_until(proc, text, timeout):
    """Reads the process's output until a line holds `text`; its output so far."""
    seen = b""
    deadline = time.monotonic() + timeout
    while text.encode() not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail("no %r within %ss; output: %s" % (text, timeout, seen.decode(errors="replace")))
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                pytest.fail("exited (%s) before %r: %s" % (proc.wait(), text, seen.decode(errors="replace")))
            seen += chunk
    return seen.decode(errors="replace")


@pytest.mark.parametrize("arch", ARCHES)
def test_binary_unpacks_into_tmpdir_and_cleans_up_on_sigterm(arch, tmp_path):
    """While it runs, everything it unpacked is under $TMPDIR (the service
    points it at the install's disk); after SIGTERM nothing is left."""
    unpack = tmp_path / "unpack"
    unpack.mkdir()
    env = dict(os.environ, TMPDIR=str(unpack))
    proc = subprocess.Popen([binary(arch), "--config", unreachable_config(tmp_path), "--log-level", "debug"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        read_until(proc, "pairing failed; retrying", timeout=60)
        names = sorted(os.listdir(str(unpack)))
        assert len(names) == 2, names
        assert names[0].startswith("_MEI") and names[1].startswith("staticx-"), names
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # It exits by itself (a stop during pairing is a clean stop), not by the signal.
    assert proc.returncode == 0, proc.returncode
    assert os.listdir(str(unpack)) == [], "left behind in TMPDIR: %s" % os.listdir(str(unpack))


def descendants(pid):
    found = []
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as handle:
            children = [int(child) for child in handle.read().split()]
    except OSError:
        return found
    for child in children:
        found += [child] + descendants(child)
    return found


def gone(pid):
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize("arch", ARCHES)
def test_binary_stops_and_cleans_up_when_its_main_process_is_killed(arch, tmp_path):
    """SIGKILL of the pid a supervisor sees (the staticx bootloader) cannot be
    forwarded: the Python process notices, removes the staticx folder, and
    stops, and the PyInstaller bootloader removes its own."""
    unpack = tmp_path / "unpack"
    unpack.mkdir()
    env = dict(os.environ, TMPDIR=str(unpack))
    proc = subprocess.Popen([binary(arch), "--config", unreachable_config(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        read_until(proc, "pairing failed; retrying", timeout=60)
        inner = descendants(proc.pid)
        assert len(inner) >= 2, inner  # the PyInstaller bootloader and Python
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (all(gone(pid) for pid in inner) and not os.listdir(str(unpack))):
            time.sleep(0.05)
        assert [pid for pid in inner if not gone(pid)] == [], "still running after the launcher was killed"
        assert os.listdir(str(unpack)) == [], "left behind in TMPDIR: %s" % os.listdir(str(unpack))
    finally:
        for pid in descendants(proc.pid) if proc.poll() is None else []:
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start_pairing(arch, folder, unpack):
    """The binary started as a service would be (a process group of its
    own), retrying to pair with a closed port."""
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([binary(arch), "--config", unreachable_config(folder), "--log-level", "debug"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ, TMPDIR=str(unpack)),
                            start_new_session=True)


def stop_group(proc, signum=signal.SIGTERM):
    if proc.poll() is None:
        os.killpg(proc.pid, signum)
    try:
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def age(path, seconds):
    then = time.time() - seconds
    os.utime(str(path), (then, then), follow_symlinks=False)


# The Python process gets three SIGTERMs from one systemd stop: its own and
# the copies its two launchers forward, microseconds to milliseconds later.
# More copies at 20 us intervals make them land at every point of the
# handling of the first: with the handler that set the stop event itself,
# the binary hung in about one try in four here (issue 17 item 9: in half
# the tries on a Raspberry Pi). What the copies leave behind, when one
# kills a launcher in its own clean-up (its signals back to the system's
# defaults once its child has ended), the next start removes (below).
FORWARDED_COPIES_SECONDS = 0.03
FORWARDED_COPIES_EVERY = 20e-6
STOP_TRIES = 16


@pytest.mark.parametrize("arch", ARCHES)
def test_binary_stops_when_sigterm_reaches_all_its_processes_at_once(arch, tmp_path):
    for attempt in range(STOP_TRIES):
        folder = tmp_path / str(attempt)
        unpack = folder / "unpack"
        unpack.mkdir(parents=True)
        proc = start_pairing(arch, folder, unpack)
        try:
            read_until(proc, "pairing failed; retrying", timeout=60)
            python = os.pidfd_open(descendants(proc.pid)[-1])  # no other process if its pid is reused
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # what systemd does (KillMode=control-group)
                until = time.perf_counter() + FORWARDED_COPIES_SECONDS
                while time.perf_counter() < until:
                    try:
                        signal.pidfd_send_signal(python, signal.SIGTERM)
                    except ProcessLookupError:
                        break  # it has ended
                    pause = time.perf_counter() + FORWARDED_COPIES_EVERY
                    while time.perf_counter() < pause:
                        pass
            finally:
                os.close(python)
            try:
                proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                pytest.fail("try %d: still running 15 s after SIGTERM" % attempt)
            # 0, or killed by a copy that came after Python gave its signals back to the system
            assert proc.returncode in (0, -signal.SIGTERM), proc.returncode
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.mark.parametrize("arch", ARCHES)
def test_binary_removes_at_its_start_what_a_killed_run_left_unpacked(arch, tmp_path):
    """A run killed outright (SIGKILL to all its processes) leaves its two
    folders; the next start removes them once they are a minute old, and
    nothing else: a younger folder, a folder of another kind, a link."""
    unpack = tmp_path / "unpack"
    unpack.mkdir()
    killed = start_pairing(arch, tmp_path / "killed", unpack)
    read_until(killed, "pairing failed; retrying", timeout=60)
    stop_group(killed, signal.SIGKILL)
    left = sorted(os.listdir(str(unpack)))
    assert [name[:4] for name in left] == ["_MEI", "stat"], left
    for name in left:
        age(unpack / name, 120)
    (unpack / "staticx-young1").mkdir()  # a start unpacking now would look like this
    (unpack / "other-folder").mkdir()
    age(unpack / "other-folder", 120)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "kept").write_text("x")
    os.symlink(str(tmp_path / "elsewhere"), str(unpack / "staticx-link"))
    age(unpack / "staticx-link", 120)
    out = run([binary(arch), "--version"], env=dict(os.environ, TMPDIR=str(unpack)))
    assert out.returncode == 0, out.stderr
    assert sorted(os.listdir(str(unpack))) == ["other-folder", "staticx-link", "staticx-young1"]
    assert (tmp_path / "elsewhere" / "kept").read_text() == "x"


@pytest.mark.parametrize("arch", ARCHES)
def test_binary_leaves_the_unpacked_folders_of_a_running_instance_alone(arch, tmp_path):
    """Old as they are, a running instance's folders are in use: another
    start beside it leaves them, and the instance still stops cleanly."""
    unpack = tmp_path / "unpack"
    unpack.mkdir()
    running = start_pairing(arch, tmp_path / "running", unpack)
    try:
        read_until(running, "pairing failed; retrying", timeout=60)
        folders = sorted(os.listdir(str(unpack)))
        files = sorted(os.path.join(top, name) for top, _, names in os.walk(str(unpack)) for name in names)
        for name in folders:
            age(unpack / name, 3600)
        out = run([binary(arch), "--version"], env=dict(os.environ, TMPDIR=str(unpack)))
        assert out.returncode == 0, out.stderr
        assert sorted(os.path.join(top, name) for top, _, names in os.walk(str(unpack)) for name in names) == files
        assert running.poll() is None
    finally:
        stop_group(running)
    assert running.returncode in (0, -signal.SIGTERM), running.returncode  # -15: a forwarded copy came late
    assert os.listdir(str(unpack)) == [], "left behind in TMPDIR: %s" % os.listdir(str(unpack))


@pytest.mark.parametrize("arch", ARCHES)
def test_binary_keeps_a_folder_whose_bootloader_may_still_be_unpacking_it(arch, tmp_path):
    """A _MEI folder's name carries its bootloader's pid (in hex): while that
    process lives, the folder may be half unpacked with nothing of it open
    or mapped yet, and is kept however old; once it is gone, the folder goes."""
    unpack = tmp_path / "unpack"
    unpack.mkdir()
    env = dict(os.environ, TMPDIR=str(unpack))
    bootloader = subprocess.Popen(["sleep", "60"])
    try:
        folder = unpack / ("_MEI%08xAbCdEf" % bootloader.pid)
        folder.mkdir()
        (folder / "base_library.zip").write_bytes(b"")
        age(folder, 600)
        assert run([binary(arch), "--version"], env=env).returncode == 0
        assert os.listdir(str(unpack)) == [folder.name]
    finally:
        bootloader.kill()
        bootloader.wait()
    assert run([binary(arch), "--version"], env=env).returncode == 0
    assert os.listdir(str(unpack)) == []


def test_pyz_is_a_small_zipapp_of_sources_with_python38_bytecode():
    assert os.path.isfile(PYZ), "%s is missing: run `make pyz`" % PYZ
    with open(PYZ, "rb") as handle:
        assert handle.readline() == b"#!/usr/bin/env python3\n"
    assert os.access(PYZ, os.X_OK)
    with zipfile.ZipFile(PYZ) as archive:
        names = archive.namelist()
    assert "__main__.py" in names and "connector.py" in names
    for package in ("requests/", "urllib3/", "idna/", "charset_normalizer/", "certifi/", "click/", "websocket/"):
        assert any(name.startswith(package) for name in names), package
    native = [name for name in names if name.endswith((".so", ".pyd"))]
    assert native == [], "not pure Python: %s" % native
    sources = {name for name in names if name.endswith(".py")}
    bytecode = {name for name in names if name.endswith(".pyc")}
    assert bytecode == {name + "c" for name in sources}, "every module, and only they, compiled for 3.8"
    assert os.path.getsize(PYZ) < 2 * 1024 * 1024


def test_pyz_runs_its_bytecode_on_python38_and_its_sources_on_other_pythons():
    code = "import sys; sys.path.insert(0, sys.argv[1]); import connector, websocket; print(connector.__file__)"
    on_38 = run([python38(), "-c", code, PYZ])
    assert on_38.returncode == 0, on_38.stderr
    assert on_38.stdout.strip().endswith("connector.pyc")
    elsewhere = run([sys.executable, "-c", code, PYZ])
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert elsewhere.stdout.strip().endswith("connector.py")


def test_pyz_leaves_nothing_in_tmpdir_under_python38(tmp_path):
    """On 3.8 certifi copies its CA bundle out of the zip into a temporary
    file for an https cloud; it is gone again after SIGTERM."""
    unpack = tmp_path / "unpack"
    unpack.mkdir()
    env = dict(os.environ, TMPDIR=str(unpack))
    proc = subprocess.Popen([python38(), PYZ, "--config", unreachable_config(tmp_path, "https")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        read_until(proc, "pairing failed; retrying", timeout=60)
        assert os.listdir(str(unpack)), "certifi made no temporary copy: was https used?"
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.returncode
    assert os.listdir(str(unpack)) == [], "left behind in TMPDIR: %s" % os.listdir(str(unpack))


@pytest.mark.parametrize("which", ["3.8", "current"])
def test_pyz_prints_the_version(which):
    python = python38() if which == "3.8" else sys.executable
    out = run([python, PYZ, "--version"])
    assert out.returncode == 0, out.stderr
    assert out.stdout == "printer-connector %s\n" % source_version()


def test_pyz_finds_its_ca_bundle_under_python38():
    """TLS is verified against certifi's cacert.pem, which lives inside the
    zip: it must be loaded from there on Python 3.8."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import connector; "
            "print(connector.tls_context().cert_store_stats()['x509_ca'])")
    out = run([python38(), "-c", code, PYZ])
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) > 100


def test_pyz_reports_config_errors_under_python38(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    out = run([python38(), PYZ, "--config", str(bad)])
    assert out.returncode == 2, out.stdout + out.stderr
    assert "invalid JSON" in out.stderr


def test_workflows_pass_actionlint():
    out = run(["sh", os.path.join(REPO, "build", "actionlint.sh")], timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "checking 2 workflow file(s)" in out.stdout
    assert "2 workflow file(s) passed" in out.stdout


def test_actionlint_finds_a_broken_workflow(tmp_path):
    """The check above can fail: a workflow with a bad expression and an
    unknown action input is refused."""
    (tmp_path / "broken.yml").write_text(
        "on: push\njobs:\n  test:\n    runs-on: ubuntu-24.04\n    steps:\n"
        "      - uses: actions/checkout@v4\n        with:\n          no-such-input: 1\n"
        "      - run: echo ${{ github.no_such_property }}\n")
    out = run(["sh", os.path.join(REPO, "build", "actionlint.sh"), str(tmp_path)], timeout=600)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "no-such-input" in out.stdout and "no_such_property" in out.stdout


def workflow_scripts():
    """(where, script) of every `run:` step of the workflows, with each
    ${{ expression }} replaced by a word, as actionlint hands them to
    shellcheck (which its WebAssembly build cannot run)."""
    import yaml

    found = []
    for path in sorted(glob.glob(os.path.join(REPO, ".github", "workflows", "*.yml"))):
        with open(path, encoding="utf-8") as handle:
            workflow = yaml.safe_load(handle)
        for job_name, job in workflow["jobs"].items():
            for index, step in enumerate(job.get("steps", [])):
                if "run" in step:
                    script = re.sub(r"\$\{\{.*?\}\}", "EXPR", step["run"])
                    found.append(("%s %s step %d" % (os.path.basename(path), job_name, index + 1), script))
    return found


def test_workflow_run_scripts_pass_shellcheck(tmp_path):
    scripts = workflow_scripts()
    assert len(scripts) >= 8
    for where, script in scripts:
        path = tmp_path / "step.sh"
        path.write_text(script)
        # bash: GitHub's default shell on Linux runners.
        out = run(["shellcheck", "--shell=bash", "--exclude=SC2129", str(path)])
        assert out.returncode == 0, "%s:\n%s" % (where, out.stdout)


def test_build_scripts_pass_shellcheck_and_parse_in_every_shell():
    scripts = sorted(glob.glob(os.path.join(REPO, "build", "*.sh")))
    mine = [path for path in scripts if not os.path.basename(path).startswith("build-mipsle")]
    assert len(mine) >= 5
    out = run(["shellcheck", "--shell=sh"] + mine)
    assert out.returncode == 0, out.stdout
    for shell in (["dash"], ["bash", "--posix"], ["busybox", "sh"]):
        for path in mine:
            out = run(shell + ["-n", path])
            assert out.returncode == 0, "%s: %s" % (" ".join(shell), out.stderr)


# The integration tests of connector.py honour CONNECTOR_CMD (a shell-quoted
# command in place of `python connector.py`): the ones of pairing, heartbeats,
# commands and SIGTERM run against each artifact.
INTEGRATION_FILES = ["test_pairing.py", "test_loops.py", "test_actions.py"]
INTEGRATION_SUBSET = "pairing or heartbeat or command or sigterm"


@pytest.mark.parametrize("artifact", ["binary-%s" % arch for arch in ARCHES] + ["pyz-python3.8"])
def test_integration_subset_passes_with_the_artifact(artifact):
    subset = INTEGRATION_SUBSET
    if artifact.startswith("binary-"):
        arch = artifact[len("binary-"):]
        command = shlex.quote(binary(arch))
        if arch != host_arch():
            # That test expects the host's architecture in the registration;
            # a foreign binary rightly reports its own.
            subset = "(%s) and not test_pairing_sends_the_device_and_printers" % subset
    else:
        command = "%s %s" % (shlex.quote(python38()), shlex.quote(PYZ))
    files = [os.path.join(REPO, "tests", name) for name in INTEGRATION_FILES]
    missing = [name for name, path in zip(INTEGRATION_FILES, files) if not os.path.isfile(path)]
    assert not missing, "integration test files named here do not exist: %s" % missing
    env = dict(os.environ, CONNECTOR_CMD=command)
    # Two workers (pytest-xdist): the subset's tests mostly wait on the connector.
    out = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "-m", "not artifacts",
               "-k", subset] + files, env=env, cwd=REPO, timeout=1800)
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 5, summary
    assert "skipped" not in summary, summary
