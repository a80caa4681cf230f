"""Pairing, run as a real process against the reference cloud."""

import json
import os
import stat

import pytest

from harness import new_token, unpaired_config, wait_until


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


# -- a register answer that is slow, lost or unreadable ------------------------------

def _registrations(cloud, token):
    return [r for r in cloud.registrations if isinstance(r, dict) and r.get("pairing_token") == token]


def test_a_register_answer_slower_than_the_old_15_s_timeout_pairs_on_the_first_attempt(cloud, printer,
                                                                                       make_connector):
    config = unpaired_config(cloud, printer)
    cloud.set_fault("late:17", endpoint="register", count=1)
    connector = make_connector(config)
    assert connector.run("--once", timeout=90) == 0, connector.log
    assert len(_registrations(cloud, config["pairing_token"])) == 1
    assert "pairing failed" not in connector.log and "Pairing successful" in connector.log


def test_a_kill_with_the_register_answer_in_flight_then_a_restart_pairs(cloud, printer, make_connector):
    config = unpaired_config(cloud, printer)
    cloud.set_fault("late:30", endpoint="register", count=1)
    connector = make_connector(config).start()
    wait_until(lambda: _registrations(cloud, config["pairing_token"]), timeout=20, message="register sent")
    key = connector.config["pairing_idempotency_key"]  # stored before the attempt
    connector.kill()  # the cloud has used the token; its answer is still to come
    assert connector.run("--once") == 0, connector.run_log
    assert "Pairing successful" in connector.run_log and "already consumed" not in connector.log
    assert len(_registrations(cloud, config["pairing_token"])) == 2
    saved = connector.config
    assert saved["connector_secret"].startswith("sk_live_") and "pairing_idempotency_key" not in saved
    assert len(key) == 32


def test_a_lost_register_answer_is_retried_with_the_same_key_and_said_so(cloud, printer, make_connector):
    config = unpaired_config(cloud, printer)
    cloud.set_fault("lost", endpoint="register", count=1)
    connector = make_connector(config)
    assert connector.run("--once") == 0, connector.log
    assert "may have reached the cloud; the retry carries the same Idempotency-Key" in connector.log
    sent = [r for r in cloud.requests if r.get("endpoint") == "register"][-2:]
    assert len(_registrations(cloud, config["pairing_token"])) == 2
    keys = {r["headers"].get("Idempotency-Key") for r in sent}
    assert len(keys) == 1 and None not in keys


def test_a_cloud_without_idempotency_that_lost_the_answer_gets_a_clear_exit_3(cloud, printer, make_connector):
    config = unpaired_config(cloud, printer)
    cloud.add_pairing_token(config["pairing_token"], idempotent=False)
    cloud.set_fault("lost", endpoint="register", count=1)
    connector = make_connector(config)
    assert connector.run("--once") == 3
    assert "Pairing rejected after an earlier register went unanswered: that attempt probably used the " \
           "pairing token; get a new pairing token from the cloud and run again with it" in connector.log
    assert "already consumed" in connector.log
    assert "pairing_idempotency_key" not in connector.config  # the next token starts afresh


@pytest.mark.parametrize("fault", ["deep", "bad_printer_id"])
def test_an_unreadable_register_answer_is_a_clear_error_that_the_token_may_be_used_up(cloud, printer,
                                                                                     make_connector, fault):
    config = unpaired_config(cloud, printer)
    cloud.set_fault(fault, endpoint="register", count=1)
    connector = make_connector(config)
    assert connector.run("--once") == 3
    assert "the pairing token may be used up" in connector.log
    assert "Traceback" not in connector.log
    assert len(_registrations(cloud, config["pairing_token"])) == 1  # not sent again blindly
