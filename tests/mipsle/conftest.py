"""The mipsle binary's tests run only when asked for:

    PRINTER_CONNECTOR_TEST_MIPSLE=1 .venv/bin/python -m pytest tests/mipsle

They need dist/printer-connector-linux-mipsle built from the current
connector.py (`make binary-mipsle`, several minutes) and qemu-mipsel-static;
when asked for, a missing or stale binary fails them with the command that
makes it. Without the variable the directory is not collected, so `make test`
does not wait for a cross build.
"""
import os

OPT_IN = "PRINTER_CONNECTOR_TEST_MIPSLE"

if os.environ.get(OPT_IN) != "1":
    collect_ignore_glob = ["test_*.py"]


def pytest_report_header(config):
    if os.environ.get(OPT_IN) == "1":
        return "mipsle binary tests: on (%s=1)" % OPT_IN
    return "mipsle binary tests: not collected; set %s=1 to run them" % OPT_IN
