"""`make demo`: the product's main job end to end, on loopback.

Starts the reference cloud and the printer simulator, pairs a real connector
process (connector.py) with a demo token, sends the commands an owner would
send from the cloud (a 6 MB file as base64 content and a 20 MB one by a
presigned URL, sync, start, pause, resume, cancel), shows a
print state change arriving in real time, answers a webcam request, and
prints what the cloud saw. Then stops everything. No printer or cloud needed.

`--printer klipper` (`make demo PRINTER=klipper`) runs the same commands on
the real-Klipper rig (sim/rig.py: real Klipper and Moonraker, simulated MCU)
instead of the simulator; it has no camera, so the webcam step is skipped.
"""

import argparse
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sim.cloud import Base64File, ReferenceCloud  # noqa: E402
from sim.printer import PrinterSimulator  # noqa: E402
from sim.rig import KlipperRig, http_json  # noqa: E402

DEMO_TOKEN = "PAIR_demo_workshop"
GCODE_LINE = b"G1 X50.000 Y50.000 E0.04000 F1500\n"


def write_gcode(folder, name, size):
    """A G-code file of about size bytes, made on the fly."""
    path = os.path.join(folder, name)
    with open(path, "wb") as handle:
        handle.write(b"; demo part\nG28\n")
        handle.write(GCODE_LINE * (size // len(GCODE_LINE)))
    return path


def say(text):
    print("demo: %s" % text, flush=True)


def write_config(folder, cloud, printer):
    config = {"cloud_url": cloud.url, "pairing_token": DEMO_TOKEN, "site_name": "Demo workshop",
              "state_dir": os.path.join(folder, "state"), "poll_commands_seconds": 1, "heartbeat_seconds": 2,
              "push_snapshots_seconds": 30,
              "moonraker": [{"printer_id": 0, "name": "Demo Voron", "base_url": printer.url,
                             "ui_port": printer.ui_port}]}
    path = os.path.join(folder, "printer-connector.json")
    with open(path, "w") as handle:
        json.dump(config, handle, indent=2)
    os.chmod(path, 0o600)
    return path


def send(cloud, connector_id, printer_id, action, params=None):
    command_id = cloud.enqueue_command(connector_id, printer_id, action, params=params)
    body = cloud.wait_for(lambda: cloud.completions_for(command_id), 30)[-1]["body"]
    shown = {k: v for k, v in body["result"].items() if k not in ("files", "history")}
    if "files" in body["result"]:
        shown["files"] = [f.get("path") for f in body["result"]["files"]]
    say("  %-12s -> %-9s %s%s" % (action, body["status"], json.dumps(shown),
                                  "  error: %s" % body["error_message"] if "error_message" in body else ""))
    return body


class SimulatedPrinter:
    """The printer simulator; `start_at_printer` is an owner at its screen."""
    name = "printer simulator (Moonraker look-alike)"
    has_camera = True

    def __init__(self, folder):
        self.server = PrinterSimulator(print_seconds=120.0)

    def __enter__(self):
        self.server.start()
        self.url, self.ui_port = self.server.url, self.server.ui_port
        return self

    def __exit__(self, *exc):
        self.server.stop()

    def start_at_printer(self, filename):
        self.server.set_state("printing", filename=filename)


class RigPrinter(SimulatedPrinter):
    name = "real Klipper and Moonraker (simulated MCU)"
    has_camera = False

    def __init__(self, folder):
        self.server = KlipperRig(os.path.join(folder, "rig"))

    def start_at_printer(self, filename):
        http_json("%s/printer/print/start?filename=%s" % (self.url, filename), method="POST")


PRINTERS = {"sim": SimulatedPrinter, "klipper": RigPrinter}


def main(argv=None):
    parser = argparse.ArgumentParser(description="The product's main job end to end, on loopback.")
    parser.add_argument("--printer", choices=sorted(PRINTERS), default="sim")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="printer-connector-demo-"))
        cloud = stack.enter_context(ReferenceCloud())
        printer = stack.enter_context(PRINTERS[args.printer](folder))
        say("reference cloud on %s, %s on %s" % (cloud.url, printer.name, printer.url))
        cloud.add_pairing_token(DEMO_TOKEN)
        config_path = write_config(folder, cloud, printer)
        log_path = os.path.join(folder, "connector.log")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "connector.py"), "--config", config_path],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            run(cloud, printer, config_path, folder)
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(10)
        say("connector stopped with exit code %d; its log:" % code)
        with open(log_path) as handle:
            for line in handle:
                print("    " + line.rstrip())
        if code != 0:
            sys.exit(1)


def run(cloud, printer, config_path, folder):
    heartbeat = cloud.wait_for(lambda: cloud.heartbeats, 30, "the connector pairs and sends a heartbeat")[-1]["body"]
    with open(config_path) as handle:
        saved = json.load(handle)
    connector_id, printer_id = saved["connector_id"], saved["moonraker"][0]["printer_id"]
    say("paired: connector %s, printer %s; the config now holds credentials instead of the token" %
        (connector_id, printer_id))
    say("heartbeat: %s" % json.dumps(heartbeat))
    say("commands from the cloud:")
    content_file = write_gcode(folder, "part.gcode", 6 * 1000 * 1000)
    send(cloud, connector_id, printer_id, "upload_file",
         {"filename": "demo/part.gcode", "content": Base64File(content_file)})
    url_file = write_gcode(folder, "plate.gcode", 20 * 1000 * 1000)
    with open(url_file, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()
    send(cloud, connector_id, printer_id, "upload_file",
         {"filename": "demo/plate.gcode", "url": cloud.add_download(url_file, expires_in=600),
          "size": os.path.getsize(url_file), "sha256": digest})
    send(cloud, connector_id, printer_id, "sync_files")
    send(cloud, connector_id, printer_id, "homing", {"axes": ["z"]})  # before the print: homing refuses while printing
    send(cloud, connector_id, printer_id, "start_print", {"filename": "demo/part.gcode"})
    send(cloud, connector_id, printer_id, "pause")
    send(cloud, connector_id, printer_id, "resume")
    send(cloud, connector_id, printer_id, "start_print", {"filename": "../config/printer.cfg"})
    send(cloud, connector_id, printer_id, "cancel")

    before = len(cloud.snapshots)
    printer.start_at_printer("demo/part.gcode")
    changed = time.monotonic()
    cloud.wait_for(lambda: [s for s in cloud.snapshots[before:]
                            if s["payload"]["status"]["print_stats"]["state"] == "printing"], 10)
    say("a print started at the printer reached the cloud in %.0f ms (websocket, not the 30 s tick)"
        % ((time.monotonic() - changed) * 1000))

    if printer.has_camera:
        request_id = cloud.enqueue_webcam_request(connector_id, printer_id)
        upload = cloud.wait_for(lambda: [u for u in cloud.webcam_uploads if u["id"] == request_id], 30)[0]
        say("webcam request %s answered with a %d-byte %s" % (request_id, len(upload["body"]), upload["content_type"]))
    else:
        say("no camera on this printer: the webcam step is skipped")

    stats = cloud.stats()
    say("the cloud saw: %d heartbeats, %d snapshots, %d completions, %d requests, %d bytes in, %d bytes out"
        % (len(cloud.heartbeats), len(cloud.snapshots), len(cloud.completions), stats["requests"],
           stats["bytes_in"], stats["bytes_out"]))
    latest = cloud.snapshots[-1]
    say("latest snapshot (%s): state=%s progress=%.3f extruder=%.1f C" % (
        latest["captured_at"], latest["payload"]["status"]["print_stats"]["state"],
        latest["payload"]["status"]["virtual_sdcard"]["progress"],
        latest["payload"]["status"]["extruder"]["temperature"]))


if __name__ == "__main__":
    main()
