"""Shared fixtures: the reference cloud and the printer simulator, started once
per session on loopback, and connectors run as real processes against them
(see harness.py)."""

import os
import sys
import warnings

import pytest
from hypothesis import settings

# Hypothesis profiles: "ci" (the default) draws the same examples on every
# run, so a failure on one machine is the same failure on another, and keeps
# no example database in the tree; "dev" draws new ones each run and keeps
# the database, for looking further. HYPOTHESIS_PROFILE=dev selects it.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import ROOT, Connector, start_paired, unpaired_config  # noqa: E402

sys.path.insert(0, ROOT)

from sim.cloud import ReferenceCloud  # noqa: E402
from sim.printer import PrinterSimulator  # noqa: E402
from sim.rig import KlipperRig  # noqa: E402

# The simulated MCU's full-power heat-up time (ambient to 60 C bed / 210 C
# hotend): longer than the connector's print-control wait (EXCHANGES["print_control"].read), so a command sent
# during a heat-up meets a Klipper that is really busy.
RIG_HEAT_SECONDS = 15.0


@pytest.fixture(scope="session")
def cloud_server():
    # The specs count periodic snapshots: this cloud names no keepalive
    # (quiet_snapshots has its own clouds in tests/test_wire.py).
    with ReferenceCloud(snapshot_keepalive=None) as server:
        yield server


@pytest.fixture(scope="session")
def old_cloud_server():
    """Today's cloud: none of the protocol extensions (no long-poll)."""
    with ReferenceCloud(extensions=False) as server:
        yield server


@pytest.fixture
def old_cloud(old_cloud_server):
    old_cloud_server.forget_fault_hits()
    yield old_cloud_server
    old_cloud_server.clear_faults()


@pytest.fixture(scope="session")
def printer_server():
    with PrinterSimulator(print_seconds=3600.0) as server:
        yield server


@pytest.fixture(scope="session")
def klipper_rig(tmp_path_factory):
    """The real Klipper rig (sim/rig.py: simulated MCU, real klippy, real
    Moonraker), started once per session and only for the tests that ask."""
    rig = KlipperRig(tmp_path_factory.mktemp("klipper-rig"), heat_seconds=RIG_HEAT_SECONDS).start()
    yield rig
    rig.stop()


@pytest.fixture
def cloud(cloud_server):
    leftover = cloud_server.faults_on()
    if leftover:  # a test outside this fixture switched them on: say so, and do not let them spill here
        cloud_server.clear_faults()
        warnings.warn("faults left on the shared reference cloud by an earlier test: %s" % leftover)
    cloud_server.forget_fault_hits()  # counts of earlier tests' faults would satisfy this one's waits
    yield cloud_server
    cloud_server.clear_faults()


@pytest.fixture
def printer(printer_server):
    printer_server.clear_faults()
    printer_server.set_klippy(True)
    if printer_server.state != "standby":
        printer_server.set_state("standby")
    yield printer_server
    printer_server.clear_faults()
    printer_server.set_klippy(True)


@pytest.fixture
def own_printer():
    """A printer simulator of the test's own, for tests that stop or restart it."""
    server = PrinterSimulator(print_seconds=3600.0).start()
    yield server
    server.stop()


@pytest.fixture
def make_connector(tmp_path):
    made = []

    def make(config, name=None):
        connector = Connector(tmp_path, config, name or "connector%d" % len(made))
        made.append(connector)
        return connector
    yield make
    for connector in made:
        connector.kill()


@pytest.fixture
def paired(cloud, printer, make_connector):
    """A running connector, paired with the reference cloud, talking to the shared simulator."""
    return start_paired(make_connector(unpaired_config(cloud, printer)))
