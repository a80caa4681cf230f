"""Every action of docs/PROTOCOL.md 1.7, end to end: the cloud queues a command,
the connector (a real process) runs it against the printer simulator, and
the completion that reaches the cloud is checked along with the printer."""

import base64
import hashlib
import io
import os
import tarfile

import pytest

from harness import Storage, run_command


# -- print control ----------------------------------------------------------

def test_start_print_starts_the_file(cloud, paired, printer):
    printer.add_file("benchy.gcode")
    body = run_command(cloud, paired, "start_print", {"filename": "benchy.gcode"})
    assert body == {"status": "succeeded", "result": {"action": "start_print", "filename": "benchy.gcode",
                                                      "state": "printing", "post_snapshot": "captured"}}
    assert printer.state == "printing"


def test_start_print_while_a_print_runs_fails_at_once_without_calling_moonraker(cloud, paired, printer):
    printer.add_file("a.gcode")
    printer.add_file("b.gcode")
    printer.set_state("printing", filename="a.gcode")
    before = len(printer.requests)
    body = run_command(cloud, paired, "start_print", {"filename": "b.gcode"})
    assert body["status"] == "failed"
    assert body["error_message"] == "cannot start a print: one is printing (a.gcode); cancel it first"
    assert body["result"]["state"] == "printing"
    assert not [r for r in printer.requests[before:] if r["path"].startswith("/printer/print")]


def test_start_print_of_a_missing_file_fails_with_moonrakers_message(cloud, paired, printer):
    body = run_command(cloud, paired, "start_print", {"filename": "missing.gcode"})
    assert body["status"] == "failed"
    assert body["error_message"].startswith("moonraker http 400: ")
    assert body["result"] == {"action": "start_print", "filename": "missing.gcode"}


def test_start_print_without_a_filename_fails_without_calling_moonraker(cloud, paired, printer):
    before = len(printer.requests)
    body = run_command(cloud, paired, "start_print", {})
    assert body["status"] == "failed" and "filename" in body["error_message"]
    assert not [r for r in printer.requests[before:] if r["path"].startswith("/printer/print")]


@pytest.mark.parametrize("action, state_before, state_after", [
    ("pause", "printing", "paused"), ("resume", "paused", "printing"), ("cancel", "printing", "cancelled")])
def test_print_control_actions_change_the_printer_state(cloud, paired, printer, action, state_before, state_after):
    printer.add_file("part.gcode")
    printer.set_state(state_before, filename="part.gcode")
    body = run_command(cloud, paired, action)
    assert body == {"status": "succeeded", "result": {"action": action, "state": state_after,
                                                      "post_snapshot": "captured"}}
    assert printer.state == state_after


@pytest.mark.parametrize("action, state", [("pause", "standby"), ("resume", "cancelled"), ("cancel", "complete")])
def test_print_control_that_cannot_apply_fails_at_once_without_calling_moonraker(cloud, paired, printer,
                                                                                 action, state):
    printer.add_file("part.gcode")
    printer.set_state(state, filename="part.gcode")
    before = len(printer.requests)
    body = run_command(cloud, paired, action)
    assert body["status"] == "failed"
    assert body["error_message"] == "nothing to %s: Klipper's print state is %s" % (action, state)
    assert not [r for r in printer.requests[before:] if r["path"].startswith("/printer/print")]


@pytest.mark.parametrize("action, state", [("pause", "paused"), ("resume", "printing")])
def test_print_control_already_in_effect_succeeds_without_calling_moonraker(cloud, paired, printer, action, state):
    printer.add_file("part.gcode")
    printer.set_state(state, filename="part.gcode")
    before = len(printer.requests)
    body = run_command(cloud, paired, action)
    assert body == {"status": "succeeded", "result": {"action": action, "state": state, "post_snapshot": "captured"}}
    assert not [r for r in printer.requests[before:] if r["path"].startswith("/printer/print")]


def test_the_post_command_snapshot_shows_the_new_state(cloud, paired, printer):
    printer.add_file("part.gcode")
    printer.set_state("printing", filename="part.gcode")
    before = len(cloud.snapshots)
    run_command(cloud, paired, "pause")
    assert any(s["payload"]["status"]["print_stats"]["state"] == "paused"
               for s in cloud.snapshots[before:] if s["printer_id"] == paired.printer_id)


def test_klippy_down_fails_the_command_with_its_message_and_the_agent_goes_on(cloud, paired, printer):
    printer.set_klippy(False)
    body = run_command(cloud, paired, "pause")
    assert body["status"] == "failed"
    assert body["error_message"] == "moonraker http 503: Klippy Host not connected"
    printer.set_klippy(True)
    assert run_command(cloud, paired, "sync_files")["status"] == "succeeded"


def test_moonraker_down_fails_the_command(cloud, own_printer, make_connector):
    from harness import unpaired_config
    connector = make_connector(unpaired_config(cloud, own_printer)).start()
    connector.wait_log("Pairing successful")
    own_printer.stop()
    body = run_command(cloud, connector, "pause")
    assert body["status"] == "failed" and "connection refused" in body["error_message"]


def test_a_successful_action_without_status_reports_the_snapshot_error(cloud, paired, printer):
    # Every status query fails, not just the next one: the connector's other
    # loops query status too, and one of them could take a single fault.
    printer.set_fault("500", endpoint="/printer/objects/query")
    body = run_command(cloud, paired, "sync_files")
    assert body["status"] == "succeeded"
    assert body["result"]["post_snapshot_error"].startswith("moonraker http 500")


# -- homing -----------------------------------------------------------------

@pytest.mark.parametrize("axes, script, reported", [(None, "G28 X Y Z", "all"), (["x", "Y"], "G28 X Y", ["X", "Y"])])
def test_homing_sends_g28(cloud, paired, printer, axes, script, reported):
    params = {} if axes is None else {"axes": axes}
    body = run_command(cloud, paired, "homing", params)
    assert body["status"] == "succeeded" and body["result"]["axes"] == reported
    assert printer.gcode_scripts[-1] == script


def test_homing_with_a_bad_axis_fails_locally(cloud, paired, printer):
    count = len(printer.gcode_scripts)
    body = run_command(cloud, paired, "homing", {"axes": ["Q"]})
    assert body["status"] == "failed" and "axis" in body["error_message"]
    assert len(printer.gcode_scripts) == count


# -- files ------------------------------------------------------------------

def test_upload_file_stores_the_bytes(cloud, paired, printer):
    data = b"G28\nG1 X5 Y5\n" * 100
    body = run_command(cloud, paired, "upload_file",
                       {"filename": "uploads/cube.gcode", "content": base64.b64encode(data).decode()})
    assert body["status"] == "succeeded"
    assert body["result"]["filename"] == "uploads/cube.gcode" and body["result"]["size"] == len(data)
    assert printer.files["uploads/cube.gcode"] == data


def test_delete_file_removes_it(cloud, paired, printer):
    printer.add_file("old.gcode")
    body = run_command(cloud, paired, "delete_file", {"filename": "old.gcode"})
    assert body["status"] == "succeeded" and body["result"]["filename"] == "old.gcode"
    assert "old.gcode" not in printer.files


def test_delete_of_a_missing_file_surfaces_the_real_reason(cloud, paired, printer):
    body = run_command(cloud, paired, "delete_file", {"filename": "nope.gcode"})
    assert body["status"] == "failed"
    assert "Bad Request" not in body["error_message"] and "nope.gcode" in body["error_message"]


@pytest.mark.parametrize("action", ["delete_file", "start_print", "upload_file"])
@pytest.mark.parametrize("name", ["../config/printer.cfg", "/etc/passwd", "a/../../moonraker.conf", "x\\..\\y"])
def test_path_traversal_fails_locally_and_never_reaches_moonraker(cloud, paired, printer, action, name):
    before = len(printer.requests)
    params = {"filename": name, "content": base64.b64encode(b"x").decode()}
    body = run_command(cloud, paired, action, params)
    assert body["status"] == "failed" and "invalid filename" in body["error_message"]
    assert not [r for r in printer.requests[before:] if "/server/files" in r["path"] or "/print/" in r["path"]]


def test_sync_files_returns_the_file_list(cloud, paired, printer):
    printer.add_file("listed.gcode")
    body = run_command(cloud, paired, "sync_files")
    assert body["status"] == "succeeded"
    assert "listed.gcode" in [f["path"] for f in body["result"]["files"]]
    assert body["result"]["count"] == len(body["result"]["files"])


def test_import_history_returns_moonrakers_history(cloud, paired, printer):
    printer.add_file("done.gcode")
    printer.set_state("printing", filename="done.gcode")
    printer.set_state("complete")
    body = run_command(cloud, paired, "import_history", {"limit": 5})
    assert body["status"] == "succeeded"
    assert body["result"]["count"] == len(body["result"]["history"]["jobs"]) >= 1


# -- unknown things ---------------------------------------------------------

def test_an_unknown_action_fails_naming_it(cloud, paired):
    body = run_command(cloud, paired, "make_coffee")
    assert body["status"] == "failed" and "make_coffee" in body["error_message"]


def test_an_unknown_printer_fails_naming_it(cloud, paired):
    body = run_command(cloud, paired, "pause", printer_id=987654)
    assert body["status"] == "failed" and "987654" in body["error_message"]


def test_commands_run_one_at_a_time_in_order(cloud, paired, printer):
    printer.add_file("a.gcode")
    ids = [cloud.enqueue_command(paired.connector_id, paired.printer_id, action, params)
           for action, params in [("start_print", {"filename": "a.gcode"}), ("pause", None), ("resume", None),
                                  ("cancel", None)]]
    cloud.wait_for(lambda: all(cloud.completions_for(i) for i in ids))
    finished = [c["command_id"] for c in cloud.completions if c["command_id"] in ids]
    assert finished == [str(i) for i in ids]
    assert all(cloud.completions_for(i)[0]["body"]["status"] == "succeeded" for i in ids)
    assert printer.state == "cancelled"


# -- backups ----------------------------------------------------------------

@pytest.fixture(scope="module")
def storage():
    server = Storage()
    yield server
    server.stop()


@pytest.fixture
def printer_data(tmp_path):
    root = tmp_path / "printer_data"
    for folder, files in {"config": {"printer.cfg": b"[printer]\n", "moonraker.conf": b"[server]\n",
                                     "moonraker.secrets": b"[api]\nkey: hush\n", ".moonraker.uuid": b"uuid"},
                          "gcodes": {"part.gcode": os.urandom(300000)},
                          "logs": {"klippy.log": b"log\n"},
                          "database": {"moonraker-sql.db": b"db"}}.items():
        (root / folder).mkdir(parents=True)
        for name, data in files.items():
            (root / folder / name).write_bytes(data)
    return root


@pytest.fixture
def backing_up(cloud, printer, make_connector, printer_data):
    """A running connector whose config names the test's printer_data folder."""
    from harness import unpaired_config
    connector = make_connector(unpaired_config(cloud, printer, printer_data_root=str(printer_data))).start()
    connector.wait_log("Connector running")
    return connector


def backup(cloud, backing_up, storage, printer_data, include, key="b1"):
    url = "http://127.0.0.1:%d/bucket/%s.tar.gz?X-Amz-Signature=abc" % (storage.server_address[1], key)
    return run_command(cloud, backing_up, "create_backup",
                       {"backup_id": key, "presigned_url": url, "include": include,
                        "printer_data_root": str(printer_data)}, timeout=60)


def test_backup_uploads_a_tar_gz_with_size_and_sha256(cloud, backing_up, storage, printer_data):
    body = backup(cloud, backing_up, storage, printer_data, {"config": True, "gcodes": True}, key="full")
    assert body["status"] == "succeeded", body
    upload = next(u for u in storage.uploads if u["path"].startswith("/bucket/full.tar.gz"))
    assert upload["headers"]["Content-Type"] == "application/gzip"
    assert "Transfer-Encoding" not in upload["headers"]
    result = body["result"]
    assert result["backup_id"] == "full" and result["size_bytes"] == len(upload["body"])
    assert result["sha256"] == hashlib.sha256(upload["body"]).hexdigest()
    assert result["uploaded_at"].endswith("Z")
    names = tarfile.open(fileobj=io.BytesIO(upload["body"])).getnames()
    assert "config/printer.cfg" in names and "gcodes/part.gcode" in names
    assert not any(n.startswith(("logs", "database")) for n in names)


def test_backup_leaves_out_secrets(cloud, backing_up, storage, printer_data):
    body = backup(cloud, backing_up, storage, printer_data, {"config": True}, key="secrets")
    assert body["status"] == "succeeded"
    upload = next(u for u in storage.uploads if u["path"].startswith("/bucket/secrets.tar.gz"))
    names = tarfile.open(fileobj=io.BytesIO(upload["body"])).getnames()
    assert "config/moonraker.conf" in names
    assert "config/moonraker.secrets" not in names and "config/.moonraker.uuid" not in names


def test_backup_leaves_out_the_connectors_own_config(cloud, printer, make_connector, storage, printer_data):
    from harness import unpaired_config
    # A connector whose config file lives inside printer_data/config.
    inside = make_connector(unpaired_config(cloud, printer, printer_data_root=str(printer_data)),
                            name="printer_data/config").start()
    inside.wait_log("Pairing successful")
    body = backup(cloud, inside, storage, printer_data, {"config": True}, key="own")
    assert body["status"] == "succeeded", body
    upload = next(u for u in storage.uploads if u["path"].startswith("/bucket/own.tar.gz"))
    archive = tarfile.open(fileobj=io.BytesIO(upload["body"]))
    assert "config/config.json" not in archive.getnames()
    secret = inside.config["connector_secret"].encode()
    for member in archive.getmembers():
        if member.isfile():
            assert secret not in archive.extractfile(member).read(), member.name


def test_backup_removes_its_temp_file(cloud, backing_up, storage, printer_data):
    backup(cloud, backing_up, storage, printer_data, {"logs": True}, key="tmp")
    assert not [n for n in os.listdir(backing_up.state_dir) if n.startswith(".backup-")]


def test_backup_to_a_failing_url_fails_the_command(cloud, backing_up, printer_data):
    body = run_command(cloud, backing_up, "create_backup",
                       {"backup_id": "x", "presigned_url": "http://127.0.0.1:9/nothing",
                        "include": {"config": True}, "printer_data_root": str(printer_data)})
    assert body["status"] == "failed" and "upload failed" in body["error_message"]
    assert body["result"]["backup_id"] == "x"
    assert not [n for n in os.listdir(backing_up.state_dir) if n.startswith(".backup-")]


def test_backup_of_a_missing_root_fails_clearly(cloud, printer, make_connector, tmp_path):
    from harness import unpaired_config
    absent = str(tmp_path / "absent")
    connector = make_connector(unpaired_config(cloud, printer, printer_data_root=absent)).start()
    connector.wait_log("Connector running")
    body = run_command(cloud, connector, "create_backup",
                       {"backup_id": "x", "presigned_url": "http://127.0.0.1:9/x", "include": {"config": True},
                        "printer_data_root": absent})
    assert body["status"] == "failed" and "is not a folder" in body["error_message"]


def archive_of(storage, key):
    upload = next(u for u in storage.uploads if u["path"].startswith("/bucket/%s.tar.gz" % key))
    return tarfile.open(fileobj=io.BytesIO(upload["body"]))


@pytest.fixture
def outside(tmp_path):
    """A folder beside printer_data holding what a backup must never carry."""
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "shadow").write_bytes(b"root:$6$hash:19000:0:99999:7:::\n")
    return folder


def test_backup_never_follows_a_top_level_folder_that_is_a_link(cloud, backing_up, storage, printer_data, outside):
    import shutil
    shutil.rmtree(printer_data / "config")
    (printer_data / "config").symlink_to(outside)
    body = backup(cloud, backing_up, storage, printer_data, {"config": True, "logs": True}, key="toplink")
    assert body["status"] == "succeeded", body
    assert body["result"]["folders"] == ["logs"]
    names = archive_of(storage, "toplink").getnames()
    assert names == ["logs/klippy.log"]


def test_backup_with_only_a_linked_folder_fails_and_uploads_nothing(cloud, backing_up, storage, printer_data,
                                                                    outside):
    import shutil
    shutil.rmtree(printer_data / "config")
    (printer_data / "config").symlink_to(outside)
    body = backup(cloud, backing_up, storage, printer_data, {"config": True}, key="onlylink")
    assert body["status"] == "failed" and "is a folder" in body["error_message"], body
    assert not [u for u in storage.uploads if u["path"].startswith("/bucket/onlylink")]


def test_backup_never_follows_a_link_inside_a_folder(cloud, backing_up, storage, printer_data, outside):
    (printer_data / "gcodes" / "shadow.gcode").symlink_to(outside / "shadow")
    (printer_data / "gcodes" / "sub").mkdir()
    (printer_data / "gcodes" / "sub" / "etc").symlink_to(outside)
    (printer_data / "gcodes" / "sub" / "real.gcode").write_bytes(b"G28\n")
    body = backup(cloud, backing_up, storage, printer_data, {"gcodes": True}, key="innerlink")
    assert body["status"] == "succeeded", body
    archive = archive_of(storage, "innerlink")
    assert sorted(archive.getnames()) == ["gcodes/part.gcode", "gcodes/sub/real.gcode"]
    assert all(m.isfile() for m in archive.getmembers())
    assert body["result"]["left_out"]["links"] == 2


@pytest.mark.parametrize("root", ["/etc", "/home/other/printer_data", "{data}/../other/printer_data",
                                  "{data}/config/..", "relative/printer_data", 7])
def test_backup_of_a_folder_that_is_not_this_connectors_printer_data_is_refused(cloud, backing_up, storage,
                                                                                printer_data, tmp_path, root):
    (tmp_path / "other" / "printer_data" / "config").mkdir(parents=True)
    (tmp_path / "other" / "printer_data" / "config" / "moonraker_secrets.ini").write_text("[k]\nkey: x\n")
    root = root.format(data=printer_data) if isinstance(root, str) else root
    key = "notmine%d" % len(storage.uploads)
    body = run_command(cloud, backing_up, "create_backup",
                       {"backup_id": key, "include": {"config": True}, "printer_data_root": root,
                        "presigned_url": "http://127.0.0.1:%d/bucket/%s" % (storage.server_address[1], key)})
    assert body["status"] == "failed" and "printer_data_root" in body["error_message"], body
    assert not [u for u in storage.uploads if u["path"].startswith("/bucket/%s" % key)]


def test_a_configured_printer_data_root_reached_through_a_link_is_refused(cloud, printer, make_connector, storage,
                                                                         printer_data, tmp_path):
    from harness import unpaired_config
    (tmp_path / "via").symlink_to(printer_data)
    linked = str(tmp_path / "via")
    connector = make_connector(unpaired_config(cloud, printer, printer_data_root=linked)).start()
    connector.wait_log("Connector running")
    body = run_command(cloud, connector, "create_backup",
                       {"backup_id": "via", "include": {"config": True}, "printer_data_root": linked,
                        "presigned_url": "http://127.0.0.1:%d/bucket/via" % storage.server_address[1]})
    assert body["status"] == "failed" and "reached through a link" in body["error_message"], body


def test_backup_leaves_out_every_moonraker_secrets_file(cloud, backing_up, storage, printer_data):
    config = printer_data / "config"
    for name in ("moonraker_secrets.ini", "printer.secrets", "MOONRAKER.SECRETS", "api_secrets.json"):
        (config / name).write_text("[mqtt]\npassword: hush\n")
    body = backup(cloud, backing_up, storage, printer_data, {"config": True}, key="allsecrets")
    assert body["status"] == "succeeded", body
    assert sorted(archive_of(storage, "allsecrets").getnames()) == ["config/moonraker.conf", "config/printer.cfg"]
    assert body["result"]["left_out"]["secrets"] == 6


def test_backup_leaves_out_a_hard_link_of_the_connectors_config(cloud, printer, make_connector, storage,
                                                                printer_data):
    from harness import unpaired_config
    connector = make_connector(unpaired_config(cloud, printer, printer_data_root=str(printer_data))).start()
    connector.wait_log("Pairing successful")
    os.link(connector.config_path, printer_data / "config" / "printer-extra.cfg")
    body = backup(cloud, connector, storage, printer_data, {"config": True}, key="hardlink")
    assert body["status"] == "succeeded", body
    archive = archive_of(storage, "hardlink")
    assert "config/printer-extra.cfg" not in archive.getnames()
    secret = connector.config["connector_secret"].encode()
    assert not [m.name for m in archive.getmembers() if secret in archive.extractfile(m).read()]


def test_backup_does_not_stop_heartbeats(cloud, backing_up, storage, printer_data):
    big = printer_data / "gcodes" / "big.gcode"
    with open(big, "wb") as handle:
        for _ in range(64):
            handle.write(os.urandom(1 << 20))
    command_id = cloud.enqueue_command(backing_up.connector_id, backing_up.printer_id, "create_backup",
                                       {"backup_id": "big", "include": {"gcodes": True},
                                        "presigned_url": "http://127.0.0.1:%d/bucket/big" % storage.server_address[1],
                                        "printer_data_root": str(printer_data)})
    backing_up.wait_log("Command started\" id=%s" % command_id)
    count = len([h for h in cloud.heartbeats if h["connector_id"] == backing_up.connector_id])
    cloud.wait_for(lambda: cloud.completions_for(command_id) or
                   len([h for h in cloud.heartbeats if h["connector_id"] == backing_up.connector_id]) >= count + 2, 30)
    body = cloud.wait_for(lambda: cloud.completions_for(command_id), 60)[-1]["body"]
    assert body["status"] == "succeeded" and body["result"]["size_bytes"] > 64 << 20


def test_backup_leaves_out_a_copy_of_the_connectors_config_by_its_content(cloud, printer, make_connector, storage,
                                                                          printer_data):
    from harness import unpaired_config
    connector = make_connector(unpaired_config(cloud, printer, printer_data_root=str(printer_data))).start()
    connector.wait_log("Pairing successful")
    (printer_data / "config" / "old-connector.json.bak").write_bytes(connector.config_path.read_bytes())
    body = backup(cloud, connector, storage, printer_data, {"config": True}, key="copy")
    assert body["status"] == "succeeded", body
    archive = archive_of(storage, "copy")
    assert "config/old-connector.json.bak" not in archive.getnames() and "config/printer.cfg" in archive.getnames()


# -- secrets in completions -------------------------------------------------

def test_an_api_key_that_moonraker_echoes_is_redacted_in_the_completion_and_the_ledger(cloud, make_connector):
    import json
    from harness import unpaired_config
    from rawserver import RawServer, reply
    key = "0123456789abcdef0123456789abcdef"

    def echoing(exchange):
        message = "bad request from key %s" % exchange.headers.get("x-api-key")
        return reply(400, json.dumps({"error": {"code": 400, "message": message}}).encode())
    server = RawServer(echoing)
    try:
        moonraker = type("Peer", (), {"url": "http://127.0.0.1:%d" % server.port, "ui_port": server.port})
        config = unpaired_config(cloud, moonraker)
        config["moonraker"][0]["api_key"] = key
        connector = make_connector(config).start()
        connector.wait_log("Connector running")
        command_id = cloud.enqueue_command(connector.connector_id, connector.printer_id, "sync_files")
        body = cloud.wait_for(lambda: cloud.completions_for(command_id), 20)[-1]["body"]
        assert body["status"] == "failed" and "bad request from key [redacted]" in body["error_message"], body
        connector.stop()
        stored = "".join(p.read_text() for p in connector.state_dir.iterdir() if p.is_file())
        assert key not in stored and key not in connector.log
    finally:
        server.stop()
