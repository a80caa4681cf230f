"""Hostile state against the connector as a real process: it starts whatever
state_dir holds, keeps its ledger small whatever results hold, tells the
cloud only what its disk holds when the disk is full, sets aside a snapshot
the cloud refuses, and refuses a linked config (issue 14 items 1, 2, 7, 10, 11)."""

import os
import subprocess
import time

import pytest

from harness import completions, connector_cmd, start, unpaired_config, wait_until


def peak_rss_kib(pid):
    with open("/proc/%d/status" % pid) as handle:
        return int(next(line for line in handle if line.startswith("VmHWM:")).split()[1])


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as handle:
        return int(next(line for line in handle if line.startswith("VmRSS:")).split()[1])


def hostile_ledger(path):
    """A good record amid everything a broken or hostile disk can hold."""
    with open(path, "wb") as handle:
        handle.write(b'{"id":"good","state":"running","t":1.0,"action":"pause","printer_id":1}\n')
        handle.write(b'{"id":"deep","state":"running","action":' + b"[" * 990 + b"]" * 990 + b"}\n")
        handle.write(b'{"id":"huge","state":"running","action":"')
        chunk = b"x" * (1024 * 1024)
        for _ in range(60):
            handle.write(chunk)
        handle.write(b'"}\n')
        handle.write(b'{"id": corrupt\n' * 300000)
        handle.write(bytes(range(256)) * 16 + b"\n")
        handle.write(b'{"id":"torn","state":"runn')


def test_no_state_file_stops_the_start_or_its_memory(cloud, printer, make_connector):
    connector = make_connector(unpaired_config(cloud, printer))
    connector.state_dir.mkdir(mode=0o700)
    hostile_ledger(str(connector.state_dir / "commands.jsonl"))
    os.mkfifo(str(connector.state_dir / "snapshots-00000001.jsonl"))
    os.symlink("/etc/passwd", str(connector.state_dir / "snapshots-00000002.jsonl"))
    (connector.state_dir / "snapshots.sent").mkdir()
    started = time.monotonic()
    connector.start()
    connector.wait_log("Connector running", timeout=30)
    took = time.monotonic() - started
    peak = peak_rss_kib(connector.proc.pid)
    assert took < 10, "started in %.1f s" % took
    assert peak < 64 * 1024, "peak RSS %d KiB" % peak
    assert connector.run_log.count("corrupt records") == 1
    connector.wait_log("command was interrupted by a restart.* id=good")
    print("hostile state: started in %.1f s, peak RSS %d KiB" % (took, peak))


def test_an_implausible_command_fails_and_the_next_start_is_clean(cloud, printer, make_connector):
    connector = start(make_connector, cloud, printer)
    deep = "pause"
    for _ in range(60):
        deep = [deep]
    command_id = cloud.enqueue_command(connector.connector_id, connector.printer_id, deep)
    body = cloud.wait_for(lambda: completions(cloud, command_id))[0]
    assert body["status"] == "failed" and body["result"]["action"] is None
    connector.stop()
    connector.start()
    connector.wait_log("Connector running")
    assert "corrupt" not in connector.run_log and "Traceback" not in connector.run_log


def test_the_ledger_stays_small_after_many_large_results(cloud, own_printer, make_connector):
    for n in range(3000):
        own_printer.add_file("folder/model_%05d.gcode" % n, b"G28\n")
    connector = start(make_connector, cloud, own_printer)
    ledger = os.path.join(str(connector.state_dir), "commands.jsonl")
    before = rss_kib(connector.proc.pid)
    ids = [cloud.enqueue_command(connector.connector_id, connector.printer_id, "sync_files") for _ in range(20)]
    cloud.wait_for(lambda: all(completions(cloud, i) for i in ids), 120)
    assert all(completions(cloud, i)[0]["result"]["count"] == 3000 for i in ids)  # delivered whole
    wait_until(lambda: os.path.getsize(ledger) < 512 * 1024, 10, "the ledger compacted")
    grown = rss_kib(connector.proc.pid) - before
    assert grown < 16 * 1024, "RSS grew %d KiB" % grown
    connector.stop()
    connector.start()
    connector.wait_log("Connector running")
    print("20 sync_files of 3000 files: ledger %d bytes, RSS grew %d KiB" % (os.path.getsize(ledger), grown))


def test_a_snapshot_the_cloud_refuses_is_set_aside_and_the_rest_arrive(cloud, printer, make_connector):
    printer.add_file("refused.gcode")
    connector = start(make_connector, cloud, printer, push_snapshots_seconds=0.3)
    cloud.refuse_snapshots("paused")
    printer.set_state("printing", filename="refused.gcode")
    printer.set_state("paused")
    cloud.wait_for(lambda: cloud.refused_batches >= 1)
    printer.set_state("printing")
    connector.wait_log("the cloud refused a snapshot 3 times; set it aside", timeout=60)
    def own():  # the reference cloud holds every test's snapshots
        return [s for s in cloud.snapshots if str(s.get("connector_id")) == str(connector.connector_id)]
    after = len(own())
    cloud.wait_for(lambda: len(own()) > after + 3, 30)
    assert not [s for s in own() if s["payload"]["status"]["print_stats"]["state"] == "paused"]
    assert os.path.exists(os.path.join(str(connector.state_dir), "snapshots.refused.jsonl"))
    assert connector.run_log.count("refused a snapshot") == 1


def test_a_linked_config_is_refused_in_one_line_with_exit_2(cloud, printer, make_connector, tmp_path):
    connector = make_connector(unpaired_config(cloud, printer))
    real = tmp_path / "real-config.json"
    os.rename(str(connector.config_path), str(real))
    os.chmod(str(real), 0o644)
    os.symlink(str(real), str(connector.config_path))
    out = subprocess.run(connector_cmd() + ["--config", str(connector.config_path)], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "config error: %s: is a symbolic link; refusing to follow it (give --config the real file)"
        % connector.config_path]
    assert oct(os.stat(str(real)).st_mode & 0o777) == oct(0o644)


# -- a full state_dir -----------------------------------------------------------

@pytest.fixture
def small_state_dir(tmp_path):
    """A 1 MiB file system of its own for state_dir, unmounted afterwards."""
    mount = tmp_path / "small"
    mount.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder):
    """Fills the file system with 4 KiB files; returns them."""
    files = []
    while True:
        path = os.path.join(str(folder), "filler-%04d" % len(files))
        try:
            with open(path, "wb") as handle:
                handle.write(b"\0" * 4096)
        except OSError:
            try:
                os.unlink(path)
            except OSError:
                pass
            return files
        files.append(path)


def test_a_full_state_dir_tells_the_cloud_only_what_the_disk_holds(cloud, own_printer, make_connector,
                                                                   small_state_dir):
    for n in range(3000):
        own_printer.add_file("folder/model_%05d.gcode" % n, b"G28\n")
    connector = start(make_connector, cloud, own_printer, state_dir=str(small_state_dir))
    warmup = cloud.enqueue_command(connector.connector_id, connector.printer_id, "pause")
    cloud.wait_for(lambda: completions(cloud, warmup))  # the ledger file has its first page
    fillers = fill(small_state_dir)
    command_id = cloud.enqueue_command(connector.connector_id, connector.printer_id, "sync_files")
    body = cloud.wait_for(lambda: completions(cloud, command_id), 60)[0]
    assert body["status"] == "failed"
    assert "could not be recorded in state_dir (No space left on device)" in body["error_message"]
    connector.stop()
    for path in fillers:
        os.unlink(path)
    connector.start()
    connector.wait_log("Connector running")
    heartbeats = len(cloud.heartbeats)
    cloud.wait_for(lambda: len(cloud.heartbeats) > heartbeats + 3)
    assert completions(cloud, command_id) == [body]  # nothing else, no "interrupted by restart"
