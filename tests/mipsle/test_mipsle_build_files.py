"""Quick checks of the mipsle build's own files, run by `make test` (no cross
build, no QEMU): the script is POSIX sh that passes shellcheck and parses in
dash, bash and BusyBox sh; the embedded pins match requirements/runtime.txt;
the archive writer is deterministic and makes an archive that Python imports
from with data in front of it, as the launcher does.
"""
import os
import pathlib
import re
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "build" / "build-mipsle.sh"
CONF = ROOT / "build" / "mipsle"


def pins(path):
    found = re.findall(r"^([A-Za-z0-9_.-]+)==([^\s;\\]+)", path.read_text(), re.M)
    return sorted((name.lower().replace("_", "-"), version) for name, version in found)


def test_script_passes_shellcheck_and_parses_in_every_shell():
    out = subprocess.run(["shellcheck", "--shell=sh", str(SCRIPT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
    for shell in (["dash"], ["bash", "--posix"], ["busybox", "sh"]):
        out = subprocess.run(shell + ["-n", str(SCRIPT)], capture_output=True, text=True)
        assert out.returncode == 0, "%s: %s" % (" ".join(shell), out.stderr)
    assert SCRIPT.read_text().rstrip().splitlines()[-1] == 'main "$@"'


def test_embedded_pins_are_the_runtime_pins_with_hashes():
    embedded = pins(CONF / "embed-requirements.txt")
    assert embedded == pins(ROOT / "requirements" / "runtime.txt")
    text = (CONF / "embed-requirements.txt").read_text()
    assert text.count("--hash=sha256:") == len(embedded)
    assert re.search(r"^ziglang==\S+ \\\n\s+--hash=sha256:[0-9a-f]{64}$", (CONF / "toolchain.txt").read_text(), re.M)
    sums = (CONF / "sources.sha256").read_text().split("\n")
    assert len([line for line in sums if re.fullmatch(r"[0-9a-f]{64}  \S+\.orig\.tar\.\w+", line)]) == 3


def make_wheel(path, files):
    with zipfile.ZipFile(path, "w") as whl:
        for name, data in files.items():
            whl.writestr(name, data)


def build_archive(tmp_path, out_name):
    lib = tmp_path / "Lib"
    (lib / "pkg").mkdir(parents=True, exist_ok=True)
    (lib / "pkg" / "tests").mkdir(exist_ok=True)
    (lib / "tkinter").mkdir(exist_ok=True)
    (lib / "helper.py").write_text('"""Doc."""\nVALUE = 42\nassert VALUE\n')
    (lib / "pkg" / "__init__.py").write_text("NAME = 'pkg'\n")
    (lib / "pkg" / "tests" / "test_x.py").write_text("raise SystemExit('tests must be left out')\n")
    (lib / "tkinter" / "__init__.py").write_text("raise SystemExit('GUI must be left out')\n")
    wheels = tmp_path / "wheels"
    wheels.mkdir(exist_ok=True)
    make_wheel(wheels / "dep-1.0-py3-none-any.whl", {
        "dep/__init__.py": '"""Kept."""\nfrom helper import VALUE\n',
        "dep/data.pem": "-----CERT-----\n",
        "dep/tests/test_dep.py": "raise SystemExit\n",
        "dep-1.0.dist-info/METADATA": "Name: dep\nVersion: 1.0\n",
        "dep-1.0.dist-info/RECORD": "",
    })
    connector = tmp_path / "connector.py"
    connector.write_text('"""The agent."""\n__version__ = "9.9.9"\nimport dep, pkg\n'
                         'if __name__ == "__main__":\n'
                         '    import sys\n'
                         '    print("connector", __version__, dep.VALUE, pkg.NAME, dep.__doc__, sys.argv[1:])\n')
    out = tmp_path / out_name
    subprocess.run([sys.executable, str(CONF / "mkarchive.py"), "--out", str(out), "--stdlib", str(lib),
                    "--wheels", str(wheels), "--connector", str(connector),
                    "--main", str(CONF / "bootstrap_main.py"), "--info", "python=test"],
                   check=True, capture_output=True, text=True)
    return out


def test_archive_is_deterministic_compiled_only_and_runs_with_data_in_front(tmp_path):
    first = build_archive(tmp_path, "a.zip")
    second = build_archive(tmp_path, "b.zip")
    assert first.read_bytes() == second.read_bytes()
    names = zipfile.ZipFile(first).namelist()
    assert names == sorted(names)
    assert "helper.pyc" in names and "connector.pyc" in names and "dep/data.pem" in names
    assert not [n for n in names if n.endswith(".py") or "tests/" in n or n.startswith("tkinter")]
    assert "dep-1.0.dist-info/RECORD" not in names
    # As in the binary: something in front of the archive, the file itself on
    # sys.path, __main__ run from it (runpy, as the launcher's run_filename).
    exe = tmp_path / "exe"
    exe.write_bytes(b"\x7fELF" + b"\0" * 4096 + first.read_bytes())
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    out = subprocess.run([sys.executable, "-I", "-S", str(exe), "--flag"], capture_output=True, text=True,
                         env=env, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    # connector.py keeps its docstrings (click's help); the stdlib's are gone.
    assert out.stdout == "connector 9.9.9 42 pkg Kept. ['--flag']\n"

