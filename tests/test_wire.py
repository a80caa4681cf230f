"""Idle traffic with a long-poll cloud (issue 19, 0.25 MB/h): the
capabilities go out until the cloud acknowledges them (capabilities_ack),
heartbeats slow down while the cloud holds the command poll, and a periodic
snapshot that says nothing new waits for the cloud's keepalive
(quiet_snapshots). Each runs the connector as a real process against the
reference cloud, and against today's cloud, which sees what it always saw."""

import time

import pytest
from hypothesis import given, strategies as st

import connector as agent
from harness import unpaired_config
from sim.cloud import ReferenceCloud, capabilities_digest
from sim.printer import PrinterSimulator


def start(make_connector, cloud, printer, **overrides):
    connector = make_connector(unpaired_config(cloud, printer, **overrides)).start()
    connector.wait_log("Connector running")
    return connector


def beats(cloud, connector):
    return [h for h in cloud.heartbeats if h["connector_id"] == connector.connector_id]


def snapshots(cloud, connector):
    return [s for s in cloud.snapshots if s["connector_id"] == connector.connector_id]


def gaps(times):
    return [b - a for a, b in zip(times, times[1:])]


def hold_the_poll(cloud, connector):
    """A command answers the held poll at once: from then on the cloud holds it."""
    command_id = cloud.enqueue_command(connector.connector_id, connector.printer_id, "sync_files")
    cloud.wait_for(lambda: cloud.completions_for(command_id), 20)


@pytest.fixture
def quiet_printer():
    """A printer whose status does not move by itself (no temperature noise)."""
    server = PrinterSimulator(print_seconds=3600.0, tick_hz=0.001).start()
    yield server
    server.stop()


@pytest.fixture
def keepalive_cloud():
    """A long-poll cloud that takes an unchanged status every 3 s."""
    server = ReferenceCloud(snapshot_keepalive=3).start()
    yield server
    server.stop()


@pytest.fixture
def patient_cloud():
    """A long-poll cloud that takes an unchanged status every 60 s."""
    server = ReferenceCloud(snapshot_keepalive=60).start()
    yield server
    server.stop()


# -- capabilities_ack ---------------------------------------------------------

def test_capabilities_go_out_until_the_cloud_acknowledges_them(cloud, paired):
    sent = cloud.wait_for(lambda: beats(cloud, paired)[:4] if len(beats(cloud, paired)) >= 4 else None, 15)
    assert "capabilities_ack" in sent[0]["body"]["capabilities"]
    assert all("capabilities" not in beat["body"] for beat in sent[1:])
    held = cloud.connector(paired.connector_id)["capabilities"]
    assert held == sorted(agent.CAPABILITIES)


def test_a_cloud_that_forgot_the_capabilities_is_sent_them_again(cloud, paired):
    cloud.wait_for(lambda: any("capabilities" not in b["body"] for b in beats(cloud, paired)), 15)
    cloud.forget_capabilities(paired.connector_id)
    seen = len(beats(cloud, paired))
    cloud.wait_for(lambda: any("capabilities" in b["body"] for b in beats(cloud, paired)[seen:]), 15)
    assert cloud.connector(paired.connector_id)["capabilities"] == sorted(agent.CAPABILITIES)


def test_todays_cloud_gets_the_capabilities_in_every_heartbeat(old_cloud, printer, make_connector):
    connector = start(make_connector, old_cloud, printer)
    sent = old_cloud.wait_for(lambda: beats(old_cloud, connector) if len(beats(old_cloud, connector)) >= 4 else None,
                              15)
    assert all(beat["body"]["capabilities"] == list(agent.CAPABILITIES) for beat in sent)


def test_the_digest_is_the_one_the_cloud_answers():
    names = ["long_poll", "capabilities_ack", "gcode"]
    assert agent.capabilities_digest(names) == capabilities_digest(list(reversed(names)))
    assert agent.capabilities_digest(names) != agent.capabilities_digest(names[:2])


# -- heartbeats while the cloud holds the poll ---------------------------------

def test_heartbeats_come_at_the_held_pace_while_the_cloud_holds_the_poll(cloud, printer, make_connector):
    connector = start(make_connector, cloud, printer, heartbeat_seconds=0.3, heartbeat_held_seconds=2.0)
    hold_the_poll(cloud, connector)
    seen = len(beats(cloud, connector))
    cloud.wait_for(lambda: len(beats(cloud, connector)) >= seen + 4, 20)
    # The first of them may still be on the configured pace.
    assert min(gaps([b["time"] for b in beats(cloud, connector)[seen:]])) >= 1.9


def test_a_failed_held_poll_sends_a_heartbeat_at_once(cloud, printer, make_connector):
    connector = start(make_connector, cloud, printer, heartbeat_seconds=60.0, heartbeat_held_seconds=60.0)
    first = cloud.wait_for(lambda: beats(cloud, connector), 10)[0]
    hold_the_poll(cloud, connector)
    cloud.set_fault("503", "commands", count=1)
    beat = cloud.wait_for(lambda: beats(cloud, connector)[1:], 40)[0]
    assert beat["time"] - first["time"] < 40  # not 60 s after the first


def test_todays_cloud_gets_heartbeats_at_the_configured_pace(old_cloud, printer, make_connector):
    connector = start(make_connector, old_cloud, printer, heartbeat_seconds=0.3, heartbeat_held_seconds=60.0)
    seen = len(beats(old_cloud, connector))
    old_cloud.wait_for(lambda: len(beats(old_cloud, connector)) >= seen + 6, 20)


# -- quiet_snapshots --------------------------------------------------------------

def test_an_unchanged_status_is_pushed_at_the_keepalive_not_at_the_interval(keepalive_cloud, quiet_printer,
                                                                              make_connector):
    connector = start(make_connector, keepalive_cloud, quiet_printer, push_snapshots_seconds=0.3)
    keepalive_cloud.wait_for(lambda: len(snapshots(keepalive_cloud, connector)) >= 3, 20)
    assert min(gaps([s["received_at"] for s in snapshots(keepalive_cloud, connector)])) >= 2.9


def test_a_changed_status_is_pushed_at_once_whatever_the_keepalive(patient_cloud, quiet_printer, make_connector):
    connector = start(make_connector, patient_cloud, quiet_printer, push_snapshots_seconds=0.3)
    patient_cloud.wait_for(lambda: snapshots(patient_cloud, connector), 20)
    seen = len(snapshots(patient_cloud, connector))
    changed = time.time()
    quiet_printer.set_state("printing", filename="cube.gcode")
    pushed = patient_cloud.wait_for(
        lambda: [s for s in snapshots(patient_cloud, connector)[seen:]
                 if s["payload"]["status"]["print_stats"]["state"] == "printing"], 30)[0]
    assert pushed["received_at"] - changed < 30  # long before the 60 s keepalive


def test_todays_cloud_gets_every_periodic_snapshot(old_cloud, quiet_printer, make_connector):
    connector = start(make_connector, old_cloud, quiet_printer, push_snapshots_seconds=0.3)
    old_cloud.wait_for(lambda: len(snapshots(old_cloud, connector)) >= 6, 20)


@pytest.mark.parametrize("old, new", [
    ({"eventtime": 1.0, "status": {"toolhead": {"estimated_print_time": 5.0, "position": [0, 0]}}},
     {"eventtime": 9.0, "status": {"toolhead": {"estimated_print_time": 13.0, "position": [0, 0]}}}),
    ({"status": {"extruder": {"temperature": 24.0, "target": 0.0}}},
     {"status": {"extruder": {"temperature": 24.9, "target": 0.0}}}),
])
def test_clocks_and_thermistor_noise_say_nothing_new(old, new):
    assert agent.says_nothing_new(old, new)


@pytest.mark.parametrize("old, new", [
    ({"status": {"extruder": {"temperature": 24.0}}}, {"status": {"extruder": {"temperature": 25.0}}}),
    ({"status": {"extruder": {"target": 0.0}}}, {"status": {"extruder": {"target": 200.0}}}),
    ({"status": {"toolhead": {"position": [0, 0]}}}, {"status": {"toolhead": {"position": [0, 1]}}}),
    ({"status": {"print_stats": {"state": "standby"}}}, {"status": {"print_stats": {"state": "printing"}}}),
    ({"status": {"extruder": {}}}, {"status": {"extruder": {}, "heater_bed": {}}}),
    ({"status": {"pause_resume": {"is_paused": False}}}, {"status": {"pause_resume": {"is_paused": 0}}}),
])
def test_any_other_difference_is_new(old, new):
    assert not agent.says_nothing_new(old, new)


@given(st.one_of(st.none(), st.text(max_size=40), st.floats().map(str), st.integers().map(str)))
def test_a_keepalive_header_is_a_positive_number_of_seconds_at_most_an_hour_or_none(text):
    headers = {} if text is None else {"X-Snapshot-Keepalive": text}
    seconds = agent.snapshot_keepalive_of(agent.HttpResponse(200, headers, b""))
    assert seconds is None or 0 < seconds <= agent.SNAPSHOT_KEEPALIVE_MAX
