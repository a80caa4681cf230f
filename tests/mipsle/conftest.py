"""The mipsle binary's tests (test_mipsle.py) run only when asked for:

    PRINTER_CONNECTOR_TEST_MIPSLE=1 .venv/bin/python -m pytest tests/mipsle

They need dist/printer-connector-linux-mipsle built from the current
connector.py (`make binary-mipsle`, several minutes) and qemu-mipsel-static;
when asked for, a missing or stale binary fails them with the command that
makes it. Without the variable that file is not collected, so `make test`
does not wait for a cross build; the quick checks of the build's files
(test_mipsle_build_files.py) always run.
"""
import os

OPT_IN = "PRINTER_CONNECTOR_TEST_MIPSLE"

if os.environ.get(OPT_IN) != "1":
    collect_ignore = ["test_mipsle.py"]


def pytest_report_header(config):
    if os.environ.get(OPT_IN) == "1":
        return "mipsle binary tests: on (%s=1)" % OPT_IN
    return "mipsle binary tests: not collected; set %s=1 to run tests/mipsle/test_mipsle.py" % OPT_IN
