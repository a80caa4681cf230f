"""The Moonraker API key goes only to Moonraker's own origin, checked with a
real connector process: a webcam whose snapshot_url names another host or
port (here the web UI's port, as on most printers) is asked without it."""

from harness import unpaired_config
from sim.printer import PrinterSimulator


def test_the_api_key_goes_to_moonraker_and_never_to_a_camera_of_another_origin(cloud, make_connector):
    printer = PrinterSimulator(print_seconds=3600.0, api_key="moonraker-api-key-123").start()
    try:
        printer.set_webcams([{"name": "cam", "enabled": True, "service": "mjpegstreamer",
                              "snapshot_url": printer.ui_url.replace("127.0.0.1", "localhost")
                              + "/webcam/?action=snapshot", "stream_url": "/webcam/?action=stream"}])
        config = unpaired_config(cloud, printer)
        config["moonraker"][0]["api_key"] = "moonraker-api-key-123"
        connector = make_connector(config).start()
        connector.wait_log("Pairing successful")
        request_id = cloud.enqueue_webcam_request(connector.connector_id, connector.printer_id)
        cloud.wait_for(lambda: [u for u in cloud.webcam_uploads if u["id"] == request_id], timeout=20)
        api = [r for r in printer.requests if r["port"] == "api"]
        camera = [r for r in printer.requests if r["port"] == "ui"]
        assert api and all(r["headers"].get("X-Api-Key") == "moonraker-api-key-123" for r in api)
        assert camera and not any("X-Api-Key" in r["headers"] or "Authorization" in r["headers"] for r in camera)
        assert any(r["headers"].get("Host", "").startswith("localhost:") for r in camera)
    finally:
        printer.stop()
