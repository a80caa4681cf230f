"""Pairing, run as a real process against the reference cloud."""

import json
import os
import stat

from harness import new_token, unpaired_config


def test_pairing_rewrites_the_config_with_credentials(cloud, printer, make_connector):
    config = unpaired_config(cloud, printer, my_setting={"kept": True})
    connector = make_connector(config)
    assert connector.run("--once") == 0, connector.log
    saved = connector.config
    assert "pairing_token" not in saved
    assert saved["connector_id"] and saved["connector_secret"].startswith("sk_live_")
    assert saved["moonraker"][0]["printer_id"] > 0
    assert saved["my_setting"] == {"kept": True}
    assert stat.S_IMODE(os.stat(connector.config_path).st_mode) == 0o600
    assert "Pairing successful" in connector.log


def test_pairing_sends_the_device_and_printers(cloud, printer, make_connector):
    config = unpaired_config(cloud, printer)
    assert make_connector(config).run("--once") == 0
    body = next(r for r in cloud.registrations if r.get("pairing_token") == config["pairing_token"])
    assert body["site_name"] == "Test bench"
    assert body["printers"] == [{"name": "Sim", "ui_port": printer.ui_port}]
    assert body["device"]["os"] == "linux" and body["device"]["arch"] in ("amd64", "arm64", "arm", "mipsle")
    assert body["device"]["hostname"] and body["device"]["ip"] == "127.0.0.1"


def test_register_is_sent_once_for_a_successful_pairing(cloud, printer, make_connector):
    config = unpaired_config(cloud, printer)
    connector = make_connector(config)
    assert connector.run("--once") == 0
    assert connector.run("--once") == 0  # a paired config never registers again
    sent = [r for r in cloud.registrations if r.get("pairing_token") == config["pairing_token"]]
    assert len(sent) == 1


def test_a_rejected_token_is_a_clear_error_with_exit_3(cloud, printer, make_connector):
    config = unpaired_config(cloud, printer, pairing_token="PAIR_never_issued")
    connector = make_connector(config)
    assert connector.run("--once") == 3
    assert "pairing token is invalid or already used" in connector.log
    assert connector.config["pairing_token"] == "PAIR_never_issued"  # nothing rewritten


def test_a_used_token_is_rejected_in_a_running_agent_too(cloud, printer, make_connector):
    token = new_token(cloud)
    assert make_connector(unpaired_config(cloud, printer, pairing_token=token)).run("--once") == 0
    second = make_connector(unpaired_config(cloud, printer, pairing_token=token)).start()
    assert second.proc.wait(30) == 3
    assert "already consumed" in second.log


def test_network_errors_during_pairing_are_retried(cloud, printer, make_connector):
    cloud.set_fault("503", endpoint="register", count=2)
    connector = make_connector(unpaired_config(cloud, printer)).start()
    connector.wait_log("Pairing successful", timeout=30)
    assert connector.run_log.count("pairing failed; retrying") == 2


def test_server_polling_intervals_are_adopted(cloud, printer, make_connector):
    config = unpaired_config(cloud, printer)
    cloud.add_pairing_token(config["pairing_token"], polling={"commands_seconds": 5, "snapshots_seconds": 60})
    connector = make_connector(config)
    assert connector.run("--once") == 0
    assert connector.config["poll_commands_seconds"] == 5
    assert connector.config["push_snapshots_seconds"] == 60


def test_new_printer_ids_are_used_at_once_without_a_restart(cloud, printer, make_connector):
    connector = make_connector(unpaired_config(cloud, printer)).start()
    connector.wait_log("Pairing successful")
    printer_id = connector.printer_id
    cloud.wait_for(lambda: any(s["printer_id"] == printer_id for s in cloud.snapshots))
    cloud.wait_for(lambda: any(h["connector_id"] == connector.connector_id and
                               h["body"]["printers"] == [{"printer_id": printer_id, "reachable": True}]
                               for h in cloud.heartbeats))
    assert connector.proc.poll() is None


def test_secrets_never_reach_the_debug_log(cloud, printer, make_connector):
    config = unpaired_config(cloud, printer)
    connector = make_connector(config).start(log_level="debug")
    connector.wait_log("Heartbeat sent")
    connector.wait_log(r"level=DEBUG msg=http .*path=/api/v1/connectors/\d+/heartbeat")
    connector.stop()
    secret = connector.config["connector_secret"]
    assert secret not in connector.log
    assert config["pairing_token"] not in connector.log


def test_cloud_url_environment_variable_overrides_the_file(cloud, printer, make_connector):
    config = unpaired_config(cloud, printer, cloud_url="http://127.0.0.1:9")  # nothing listens there
    connector = make_connector(config)
    assert connector.run("--once", env={"CLOUD_URL": cloud.url}) == 0
    assert json.loads(connector.config_path.read_text())["cloud_url"] == "http://127.0.0.1:9"


def test_sigterm_while_pairing_retries_is_a_clean_stop(cloud, printer, make_connector):
    cloud.set_fault("503", endpoint="register")
    connector = make_connector(unpaired_config(cloud, printer)).start()
    connector.wait_log("pairing failed; retrying")
    assert connector.stop(timeout=5) == 0
    assert "Connector stopped" in connector.run_log
