"""Zero loss and at-most-once, against a cloud with faults switched on.

Every test checks on the cloud's side that what the connector owed arrived
exactly once (or, past the outbox bound, that the oldest were dropped and
counted), and on the printer's side that no command ran twice."""

import glob
import json
import os
import time

import pytest

from harness import completions, snapshots_of, start, unpaired_config, wait_until
from sim.cloud import ReferenceCloud
from sim.printer import PrinterSimulator


@pytest.fixture
def own_cloud():
    """A cloud of the test's own, for tests that stop it (connection refused)."""
    server = ReferenceCloud(snapshot_keepalive=None).start()  # the specs count periodic snapshots
    yield server
    server.stop()


def pauses(printer):
    return [r for r in printer.requests if r["path"].startswith("/printer/print/pause")]


def printing(printer):
    """A print for "pause" to act on: with nothing printing, a pause fails
    without calling Moonraker and so could not show a re-run."""
    printer.add_file("part.gcode")
    printer.set_state("printing", filename="part.gcode")


# -- command completions ----------------------------------------------------

@pytest.mark.parametrize("fault", ["503", "drop"])
def test_a_completion_survives_a_cloud_outage(cloud, printer, make_connector, fault):
    connector = start(make_connector, cloud, printer)
    cloud.set_fault(fault, endpoint="complete")
    command_id = cloud.enqueue_command(connector.connector_id, connector.printer_id, "sync_files")
    connector.wait_log("Command finished\" id=%s" % command_id)
    cloud.wait_for(lambda: len([h for h in cloud.fault_hits if h["endpoint"] == "complete"]) >= 2)
    cloud.clear_faults()
    cloud.wait_for(lambda: completions(cloud, command_id), 70)
    time.sleep(1)  # the claim is "exactly once": give a duplicate the time to show up
    assert len(completions(cloud, command_id)) == 1
    assert completions(cloud, command_id)[0]["status"] == "succeeded"


def test_a_completion_survives_connection_refused(own_cloud, printer, make_connector):
    connector = start(make_connector, own_cloud, printer)
    own_cloud.set_fault("slow:1", endpoint="complete", count=1)
    command_id = own_cloud.enqueue_command(connector.connector_id, connector.printer_id, "sync_files")
    own_cloud.wait_for(lambda: own_cloud.command(command_id)["status"] == "running")
    own_cloud.stop()  # the slow completion never gets its answer; later ones are refused
    connector.wait_log("Command finished\" id=%s" % command_id)
    connector.wait_log("commands failed")
    own_cloud.start()
    own_cloud.wait_for(lambda: completions(own_cloud, command_id), 70)


def test_kill_9_during_an_outage_loses_no_completion(cloud, printer, make_connector):
    connector = start(make_connector, cloud, printer)
    cloud.set_fault("503", endpoint="complete")
    printing(printer)
    command_id = cloud.enqueue_command(connector.connector_id, connector.printer_id, "pause")
    connector.wait_log("Command finished\" id=%s" % command_id)
    connector.kill()
    cloud.clear_faults()
    printing(printer)
    pauses_before = len(pauses(printer))
    connector.start()
    cloud.wait_for(lambda: completions(cloud, command_id), 30)
    assert completions(cloud, command_id)[0]["status"] == "succeeded"
    assert len(pauses(printer)) == pauses_before  # delivered, not re-run


def test_a_redelivered_command_is_not_run_again(cloud, printer, make_connector):
    connector = start(make_connector, cloud, printer)
    printer.add_file("twice.gcode")
    command_id = cloud.enqueue_command(connector.connector_id, connector.printer_id, "start_print",
                                       {"filename": "twice.gcode"})
    cloud.wait_for(lambda: completions(cloud, command_id))
    starts = [r for r in printer.requests if r["path"].startswith("/printer/print/start")]
    printer.set_state("complete")
    cloud.redeliver(command_id)
    cloud.wait_for(lambda: len(completions(cloud, command_id)) == 2)
    assert [r for r in printer.requests if r["path"].startswith("/printer/print/start")] == starts
    assert completions(cloud, command_id)[1] == completions(cloud, command_id)[0]
    assert printer.state == "complete"
    assert "not running it twice" in connector.run_log


def test_a_redelivered_command_is_not_run_again_after_a_restart(cloud, printer, make_connector):
    connector = start(make_connector, cloud, printer)
    printing(printer)
    command_id = cloud.enqueue_command(connector.connector_id, connector.printer_id, "pause")
    cloud.wait_for(lambda: completions(cloud, command_id))
    connector.stop()
    printing(printer)
    count = len(pauses(printer))
    connector.start()
    connector.wait_log("Connector running")
    cloud.redeliver(command_id)
    cloud.wait_for(lambda: len(completions(cloud, command_id)) == 2)
    assert len(pauses(printer)) == count


def test_numeric_and_string_ids_are_the_same_command(cloud, printer, make_connector):
    connector = start(make_connector, cloud, printer)
    printing(printer)
    cloud.enqueue_command(connector.connector_id, connector.printer_id, "pause", command_id=777001)
    cloud.wait_for(lambda: completions(cloud, 777001))
    printing(printer)
    count = len(pauses(printer))
    printing(printer)
    cloud.enqueue_command(connector.connector_id, connector.printer_id, "pause", command_id="777001")
    cloud.wait_for(lambda: len(cloud.completions_for("777001")) == 2)
    assert len(pauses(printer)) == count


def test_a_command_running_at_kill_is_reported_interrupted_not_rerun(cloud, printer, make_connector):
    connector = start(make_connector, cloud, printer)
    printer.set_fault("slow:5", endpoint="/printer/print/pause", count=1)
    printing(printer)
    command_id = cloud.enqueue_command(connector.connector_id, connector.printer_id, "pause")
    printer.wait_for(lambda: pauses(printer) and pauses(printer)[-1]["path"].startswith("/printer/print/pause"))
    connector.wait_log("Command started\" id=%s" % command_id)
    connector.kill()
    printing(printer)
    count = len(pauses(printer))
    connector.start()
    body = cloud.wait_for(lambda: completions(cloud, command_id), 30)[0]
    assert body["status"] == "failed"
    assert body["error_message"] == "interrupted by restart; not re-run"
    assert body["result"]["action"] == "pause"
    cloud.redeliver(command_id)
    cloud.wait_for(lambda: len(completions(cloud, command_id)) == 2)
    assert len(pauses(printer)) == count


def test_a_deleted_command_stops_being_reported(cloud, printer, make_connector):
    connector = start(make_connector, cloud, printer)
    cloud.set_fault("503", endpoint="complete")
    command_id = cloud.enqueue_command(connector.connector_id, connector.printer_id, "sync_files")
    connector.wait_log("Command finished\" id=%s" % command_id)
    cloud.delete_command(command_id)
    cloud.clear_faults()
    connector.wait_log("command is gone from the cloud", timeout=70)
    tries = len([r for r in cloud.requests if r["path"] == "/api/v1/commands/%s/complete" % command_id])
    connector.stop()
    connector.start().wait_log("Connector running")
    connector.wait_log("Heartbeat sent")
    cloud.wait_for(lambda: len(cloud.heartbeats) and connector.run_log.count("msg=http") > 10)
    assert len([r for r in cloud.requests if r["path"] == "/api/v1/commands/%s/complete" % command_id]) == tries


def test_a_corrupt_tail_in_the_ledger_is_skipped_with_a_warning(cloud, printer, make_connector):
    connector = start(make_connector, cloud, printer)
    printing(printer)
    command_id = cloud.enqueue_command(connector.connector_id, connector.printer_id, "pause")
    cloud.wait_for(lambda: completions(cloud, command_id))
    connector.kill()
    with open(os.path.join(str(connector.state_dir), "commands.jsonl"), "ab") as ledger:
        ledger.write(b'{"id":"half-writ')
    connector.start()
    connector.wait_log("skipping corrupt records")
    connector.wait_log("Heartbeat sent")
    printing(printer)
    count = len(pauses(printer))
    cloud.redeliver(command_id)
    cloud.wait_for(lambda: len(completions(cloud, command_id)) == 2)
    assert len(pauses(printer)) == count


def test_an_unwritable_state_dir_at_start_is_a_clear_error(cloud, printer, make_connector, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the folder should be")
    connector = make_connector(unpaired_config(cloud, printer, state_dir=str(blocker / "state")))
    assert connector.run() == 1
    assert "state_dir %s is not writable" % (blocker / "state") in connector.log
    assert "Traceback" not in connector.log


def test_a_state_dir_lost_later_fails_commands_unrun_and_the_agent_goes_on(cloud, printer, make_connector):
    connector = start(make_connector, cloud, printer)
    state = str(connector.state_dir)
    os.rename(state, state + ".gone")
    with open(state, "w") as blocker:
        blocker.write("not a folder")
    printing(printer)
    count = len(pauses(printer))
    printing(printer)
    command_id = cloud.enqueue_command(connector.connector_id, connector.printer_id, "pause")
    body = cloud.wait_for(lambda: completions(cloud, command_id))[0]
    assert body["status"] == "failed" and "state_dir" in body["error_message"]
    assert len(pauses(printer)) == count
    connector.wait_log("level=ERROR msg=\"cannot record the command in state_dir")
    assert connector.proc.poll() is None


# -- snapshots --------------------------------------------------------------

def outbox_segments(connector):
    return sorted(glob.glob(os.path.join(str(connector.state_dir), "snapshots-*.jsonl")))


def spilled(connector):
    """What the snapshot outbox holds, oldest first (all its segments)."""
    records = []
    for path in outbox_segments(connector):
        with open(path) as handle:
            records += [json.loads(line) for line in handle if line.strip()]
    return records


def key(snapshot):
    return (snapshot["captured_at"], snapshot["payload"]["eventtime"])


def test_steady_state_with_the_cloud_up_writes_nothing_to_state_dir(cloud, printer, make_connector):
    connector = start(make_connector, cloud, printer, push_snapshots_seconds=0.3)
    cloud.wait_for(lambda: len(snapshots_of(cloud, connector)) >= 5)
    assert os.listdir(str(connector.state_dir)) == []


def test_snapshots_taken_during_an_outage_arrive_afterwards_oldest_first(cloud, printer, make_connector):
    connector = start(make_connector, cloud, printer, push_snapshots_seconds=0.3)
    cloud.wait_for(lambda: snapshots_of(cloud, connector))
    cloud.set_fault("503", endpoint="snapshots")
    wait_until(lambda: len(spilled(connector)) >= 4, 30, "snapshots spilled to disk")
    before = len(snapshots_of(cloud, connector))
    kept = spilled(connector)
    cloud.clear_faults()
    cloud.wait_for(lambda: not outbox_segments(connector), 70)
    arrived = snapshots_of(cloud, connector)[before:]
    arrived_keys = [key(s) for s in arrived]
    assert arrived_keys[:len(kept)] == [key(s) for s in kept]  # original capture times, oldest first
    assert len(set(arrived_keys)) == len(arrived_keys)  # none twice


def test_kill_9_during_an_outage_loses_no_snapshot(cloud, printer, make_connector):
    connector = start(make_connector, cloud, printer, push_snapshots_seconds=0.3)
    cloud.wait_for(lambda: snapshots_of(cloud, connector))
    cloud.set_fault("drop", endpoint="snapshots")
    wait_until(lambda: len(spilled(connector)) >= 3, 30, "snapshots spilled to disk")
    connector.kill()
    kept = [key(s) for s in spilled(connector)]
    cloud.clear_faults()
    connector.start()
    cloud.wait_for(lambda: set(kept) <= {key(s) for s in snapshots_of(cloud, connector)}, 30)
    delivered = [key(s) for s in snapshots_of(cloud, connector)]
    assert all(delivered.count(k) == 1 for k in kept)


def test_the_snapshot_outbox_is_bounded_and_drops_the_oldest(cloud, printer, make_connector):
    connector = start(make_connector, cloud, printer, push_snapshots_seconds=0.2, outbox_max_snapshots=5)
    cloud.wait_for(lambda: snapshots_of(cloud, connector))
    before = len(snapshots_of(cloud, connector))
    cloud.set_fault("503", endpoint="snapshots")
    connector.wait_log("snapshot outbox full: dropped the oldest", timeout=60)
    connector.kill()  # freezes the outbox: exactly these must arrive, once
    kept = [key(s) for s in spilled(connector)]
    assert 0 < len(kept) <= 5
    cloud.clear_faults()
    connector.start()
    cloud.wait_for(lambda: set(kept) <= {key(s) for s in snapshots_of(cloud, connector)[before:]}, 30)
    delivered = [key(s) for s in snapshots_of(cloud, connector)[before:]]
    assert delivered[:len(kept)] == kept  # oldest first, nothing older than the bound kept
    assert "dropped_total=" in connector.log


# -- real-time status -------------------------------------------------------

def state_seen(cloud, connector, state):
    return [s for s in snapshots_of(cloud, connector) if s["payload"]["status"]["print_stats"]["state"] == state]


@pytest.mark.parametrize("states", [("printing", "paused", "printing", "complete"),
                                    ("printing", "cancelled"), ("printing", "error")])
def test_a_print_state_change_reaches_the_cloud_within_2_seconds(cloud, own_printer, make_connector, states):
    own_printer.add_file("rt.gcode")
    connector = start(make_connector, cloud, own_printer, push_snapshots_seconds=60)
    connector.wait_log("status websocket connected")
    cloud.wait_for(lambda: snapshots_of(cloud, connector))
    for state in states:
        before = len(snapshots_of(cloud, connector))
        changed = time.monotonic()
        own_printer.set_state(state, filename="rt.gcode")
        cloud.wait_for(lambda: [s for s in snapshots_of(cloud, connector)[before:]
                                if s["payload"]["status"]["print_stats"]["state"] == state], 5)
        assert time.monotonic() - changed < 2.0


def test_temperature_ticks_do_not_push_snapshots(cloud, make_connector):
    with PrinterSimulator(tick_hz=20.0) as busy_printer:
        connector = start(make_connector, cloud, busy_printer, push_snapshots_seconds=60)
        connector.wait_log("status websocket connected")
        cloud.wait_for(lambda: snapshots_of(cloud, connector))
        time.sleep(3)  # the claim is about what does not happen over a window
        assert len(snapshots_of(cloud, connector)) == 1


def test_without_a_websocket_state_changes_are_polled(cloud, make_connector):
    with PrinterSimulator(websocket=False) as plain_printer:
        plain_printer.add_file("poll.gcode")
        connector = start(make_connector, cloud, plain_printer, push_snapshots_seconds=60)
        connector.wait_log("status websocket \\(printer .*\\) failed")
        cloud.wait_for(lambda: snapshots_of(cloud, connector))
        changed = time.monotonic()
        plain_printer.set_state("printing", filename="poll.gcode")
        cloud.wait_for(lambda: state_seen(cloud, connector, "printing"), 5)
        assert time.monotonic() - changed < 2.5


def test_the_websocket_reconnects_after_moonraker_restarts(cloud, own_printer, make_connector):
    own_printer.add_file("again.gcode")
    connector = start(make_connector, cloud, own_printer, push_snapshots_seconds=60)
    connector.wait_log("status websocket connected")
    own_printer.stop()
    own_printer.start()
    connector.wait_log("status websocket connected", count=2, timeout=30)
    before = len(snapshots_of(cloud, connector))
    own_printer.set_state("printing", filename="again.gcode")
    cloud.wait_for(lambda: [s for s in snapshots_of(cloud, connector)[before:]
                            if s["payload"]["status"]["print_stats"]["state"] == "printing"], 5)


@pytest.mark.parametrize("frame", [b"\x00\xff binary", b""])
def test_a_binary_websocket_frame_is_ignored_and_later_state_changes_still_arrive(cloud, own_printer,
                                                                                  make_connector, frame):
    own_printer.add_file("bin.gcode")
    connector = start(make_connector, cloud, own_printer, push_snapshots_seconds=60)
    connector.wait_log("status websocket connected")
    cloud.wait_for(lambda: snapshots_of(cloud, connector))
    before = len(snapshots_of(cloud, connector))
    own_printer.send_binary_frame(frame)  # the same connection, so it arrives before the change below
    own_printer.set_state("printing", filename="bin.gcode")
    cloud.wait_for(lambda: [s for s in snapshots_of(cloud, connector)[before:]
                            if s["payload"]["status"]["print_stats"]["state"] == "printing"], 5)
    assert connector.run_log.count("status websocket connected") == 1  # not taken for a close
    assert "Traceback" not in connector.run_log and "TypeError" not in connector.run_log
