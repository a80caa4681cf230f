"""Writes the zip archive that build-mipsle.sh appends to the static CPython.

Run with the build Python, which must be the same CPython minor version as
the cross-built interpreter (the bytecode format is per minor version):

    python3.11 mkarchive.py --out ARCHIVE --stdlib Lib [--extra FILE]...
        --wheels DIR --connector connector.py --main bootstrap_main.py

Everything Python in it is stored compiled only (unchecked hash-based .pyc,
PEP 552), so nothing is compiled or written at run time and the archive is
the same bytes for the same inputs: entries are sorted and carry a fixed
date. Parts of the standard library that a headless agent cannot use (GUI,
tests, build tools, modules whose C part is not built) are left out.
"""
import argparse
import hashlib
import importlib._bootstrap_external as bootstrap_external
import importlib.util
import json
import os
import sys
import zipfile

# Top-level names of the standard library left out of the archive.
STDLIB_EXCLUDED = {
    "__phello__", "asyncio", "ctypes", "curses", "dbm", "distutils", "ensurepip",
    "idlelib", "lib2to3", "msilib", "multiprocessing", "pydoc.py", "pydoc_data",
    "site-packages", "sqlite3", "test", "tkinter", "turtle.py", "turtledemo",
    "unittest", "venv", "xml", "xmlrpc",
}
# Directory names left out wherever they are (test suites inside packages).
EXCLUDED_DIRS = {"test", "tests", "idle_test", "__pycache__"}
FIXED_DATE = (1980, 1, 1, 0, 0, 0)
# What the binary was made from, for tests and support: sha256 of connector.py,
# versions of the interpreter, libraries and toolchain, the wheels.
BUILD_INFO = "printer_connector_build.json"


class Archive:
    def __init__(self, path):
        self.entries = {}
        self.path = path

    def add_bytes(self, name, data):
        if name in self.entries:
            raise SystemExit("mkarchive: %s is in the archive twice" % name)
        self.entries[name] = data

    def add_python(self, name, source, optimize=0):
        """Adds NAME.py (given as its source bytes) as NAME.pyc."""
        code = compile(source, name, "exec", dont_inherit=True, optimize=optimize)
        pyc = bootstrap_external._code_to_hash_pyc(
            code, importlib.util.source_hash(source), checked=False)
        self.add_bytes(name[:-3] + ".pyc", bytes(pyc))

    def add_file(self, name, data):
        if name.endswith(".py"):
            self.add_python(name, data)
        else:
            self.add_bytes(name, data)

    def write(self):
        with zipfile.ZipFile(self.path, "w") as out:
            for name in sorted(self.entries):
                info = zipfile.ZipInfo(name, date_time=FIXED_DATE)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                info.create_system = 3
                out.writestr(info, self.entries[name], compresslevel=9)


def read(path):
    with open(path, "rb") as handle:
        return handle.read()


def add_stdlib(archive, lib):
    """The standard library, without docstrings and asserts (-OO): nothing
    the agent runs reads the standard library's docstrings. The packages and
    connector.py keep theirs (click builds --help from them)."""
    for top in sorted(os.listdir(lib)):
        if top in STDLIB_EXCLUDED:
            continue
        path = os.path.join(lib, top)
        if os.path.isfile(path):
            if top.endswith(".py"):
                archive.add_python(top, read(path), optimize=2)
            continue
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIRS)
            for name in sorted(files):
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(root, name), lib).replace(os.sep, "/")
                    archive.add_python(rel, read(os.path.join(root, name)), optimize=2)


def add_wheel(archive, wheel):
    with zipfile.ZipFile(wheel) as whl:
        for name in sorted(whl.namelist()):
            if name.endswith("/") or name.endswith(".dist-info/RECORD"):
                continue
            if EXCLUDED_DIRS.intersection(name.split("/")[:-1]):
                continue
            archive.add_file(name, whl.read(name))


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--stdlib", required=True, help="the Lib directory of the CPython source")
    parser.add_argument("--extra", action="append", default=[],
                        help="a generated module to add at the top (e.g. _sysconfigdata_*.py)")
    parser.add_argument("--wheels", required=True, help="directory of py3-none-any wheels")
    parser.add_argument("--connector", required=True)
    parser.add_argument("--main", required=True, help="the archive's __main__.py")
    parser.add_argument("--info", action="append", default=[], metavar="KEY=VALUE",
                        help="recorded in %s (what the binary was built from)" % BUILD_INFO)
    args = parser.parse_args(argv)

    archive = Archive(args.out)
    add_stdlib(archive, args.stdlib)
    for extra in args.extra:
        archive.add_python(os.path.basename(extra), read(extra))
    wheels = sorted(f for f in os.listdir(args.wheels) if f.endswith("-py3-none-any.whl"))
    if not wheels:
        raise SystemExit("mkarchive: no py3-none-any wheels in %s" % args.wheels)
    for wheel in wheels:
        add_wheel(archive, os.path.join(args.wheels, wheel))
    archive.add_python("connector.py", read(args.connector))
    archive.add_python("__main__.py", read(args.main))
    info = dict(item.split("=", 1) for item in args.info)
    with open(args.connector, "rb") as handle:
        info["connector_sha256"] = hashlib.sha256(handle.read()).hexdigest()
    info["wheels"] = wheels
    archive.add_bytes(BUILD_INFO, (json.dumps(info, indent=1, sort_keys=True) + "\n").encode())
    archive.write()
    print("mkarchive: %d entries, %d bytes" % (len(archive.entries), os.path.getsize(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
