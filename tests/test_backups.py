"""Unit specifications of what a backup may read: which printer_data roots
are accepted, and that the walk archives only the regular files it listed,
never through a link, even when the tree changes under it."""

import io
import os
import tarfile

import pytest

import connector


def config_with(tmp_path, **extra):
    data = {"pairing_token": "PAIR_abcdefgh", "moonraker": [{"base_url": "http://127.0.0.1:7125"}]}
    data.update(extra)
    return connector.parse_config(str(tmp_path / "config.json"), data)


@pytest.mark.parametrize("root", ["relative/printer_data", "/a/../printer_data", "/a/./printer_data", "/a//b",
                                  "/a/b\n", 5])
def test_a_printer_data_root_that_is_not_a_plain_absolute_path_is_refused_at_load(tmp_path, root):
    with pytest.raises(connector.ConfigError) as caught:
        config_with(tmp_path, printer_data_root=root)
    assert "printer_data_root" in str(caught.value) and "\n" not in str(caught.value)


def test_the_configured_printer_data_root_is_the_default(tmp_path):
    (tmp_path / "pd").mkdir()
    config = config_with(tmp_path, printer_data_root=str(tmp_path / "pd") + "/")
    assert connector.choose_printer_data_root(config, None) == str(tmp_path / "pd")


def test_the_service_users_printer_data_is_always_accepted(tmp_path):
    import pwd
    home = pwd.getpwuid(os.geteuid()).pw_dir
    config = config_with(tmp_path)
    assert connector.choose_printer_data_root(config, home + "/printer_data") == home + "/printer_data"
    assert connector.choose_printer_data_root(config, "/usr/data/printer_data") == "/usr/data/printer_data"


@pytest.mark.parametrize("asked", ["/etc", "/", "/usr/data/printer_data/..", "/usr/data/printer_data/config"])
def test_any_other_root_is_refused_naming_the_accepted_ones(tmp_path, asked):
    with pytest.raises(connector.CommandFailed) as caught:
        connector.choose_printer_data_root(config_with(tmp_path), asked)
    assert "/usr/data/printer_data" in str(caught.value) and "printer_data_root" in str(caught.value)


def walk(root, config_path="/nonexistent/config.json"):
    keep = connector.BackupFilter(None, os.path.basename(config_path))
    fd = os.open(str(root), os.O_RDONLY | os.O_DIRECTORY)
    return fd, keep, connector.backup_members(fd, "", keep)


def archive(root):
    fd, keep, members = walk(root)
    buffer = io.BytesIO()
    try:
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            added = [name for name, folder_fd, entry in members
                     if connector.archive_member(tar, name, folder_fd, entry, keep)]
    finally:
        os.close(fd)
    buffer.seek(0)
    return added, tarfile.open(fileobj=buffer), keep


def test_a_file_swapped_for_a_link_after_the_walk_listed_it_is_left_out(tmp_path):
    (tmp_path / "secret").write_bytes(b"outside")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.cfg").write_bytes(b"inside")
    fd, keep, members = walk(tree)
    name, folder_fd, entry = next(members)
    os.unlink(tree / "a.cfg")
    os.symlink(tmp_path / "secret", tree / "a.cfg")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        assert connector.archive_member(tar, name, folder_fd, entry, keep) is False
    os.close(fd)
    assert b"outside" not in buffer.getvalue()


def test_a_file_replaced_by_another_after_the_walk_is_left_out(tmp_path):
    (tmp_path / "a.cfg").write_bytes(b"first")
    fd, keep, members = walk(tmp_path)
    name, folder_fd, entry = next(members)
    os.replace(str(tmp_path / "a.cfg"), str(tmp_path / "old"))
    (tmp_path / "a.cfg").write_bytes(b"second")
    with tarfile.open(fileobj=io.BytesIO(), mode="w") as tar:
        assert connector.archive_member(tar, name, folder_fd, entry, keep) is False
    os.close(fd)


def test_a_folder_swapped_for_a_link_after_it_was_listed_is_not_entered(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "shadow").write_bytes(b"outside")
    tree = tmp_path / "tree"
    (tree / "a").mkdir(parents=True)
    (tree / "a" / "x.gcode").write_bytes(b"G28")
    (tree / "b").mkdir()
    (tree / "b" / "y.gcode").write_bytes(b"G28")
    fd, keep, members = walk(tree)
    first = next(members)[0]
    later = "b" if first == "a/x.gcode" else "a"  # the walk is in the folder's own order
    os.rename(str(tree / later), str(tmp_path / "moved"))
    os.symlink(str(tmp_path / "etc"), str(tree / later))
    assert list(members) == []
    os.close(fd)
    assert keep.left_out["links"] == 1


def test_special_files_are_left_out_without_blocking(tmp_path):
    os.mkfifo(str(tmp_path / "fifo"))
    (tmp_path / "real.cfg").write_bytes(b"x")
    added, tar, keep = archive(tmp_path)
    assert added == ["real.cfg"] and keep.left_out["other"] == 1


def test_folders_deeper_than_the_limit_are_left_out(tmp_path):
    deep = tmp_path
    for level in range(connector.BACKUP_MAX_DEPTH + 3):
        deep = deep / ("d%d" % level)
    deep.mkdir(parents=True)
    (deep / "bottom.cfg").write_bytes(b"x")
    (tmp_path / "top.cfg").write_bytes(b"x")
    added, tar, keep = archive(tmp_path)
    assert added == ["top.cfg"] and keep.left_out["other"] == 1


def test_a_file_that_shrinks_while_archived_is_padded_not_fatal(tmp_path):
    handle = io.BytesIO(b"short")
    reader = connector._FixedSize(handle, 12)
    assert reader.read(8) == b"short\0\0\0" and reader.read(8) == b"\0\0\0\0" and reader.read(8) == b""


def test_a_file_that_grows_while_archived_is_cut_at_its_listed_size(tmp_path):
    reader = connector._FixedSize(io.BytesIO(b"0123456789"), 4)
    assert reader.read(-1) == b"0123" and reader.read(10) == b""


def test_a_copy_of_the_config_under_any_name_is_left_out_by_its_content(tmp_path):
    (tmp_path / "config.json.bak").write_text('{"connector_secret": "sk_live_0123456789abcdef"}')
    (tmp_path / "printer.cfg").write_text("[printer]\n")
    fd = os.open(str(tmp_path), os.O_RDONLY | os.O_DIRECTORY)
    keep = connector.BackupFilter(None, "config.json", (b"sk_live_0123456789abcdef",))
    with tarfile.open(fileobj=io.BytesIO(), mode="w") as tar:
        added = [name for name, folder_fd, entry in connector.backup_members(fd, "", keep)
                 if connector.archive_member(tar, name, folder_fd, entry, keep)]
    os.close(fd)
    assert added == ["printer.cfg"] and keep.left_out["secrets"] == 1


def test_the_filter_knows_the_connectors_secret_and_token_but_not_short_ones(tmp_path):
    config = connector.Config(path=str(tmp_path / "c.json"), cloud_url="https://c.test", moonraker=[],
                              connector_id="1", connector_secret="sk_live_0123456789", pairing_token="short")
    assert connector.backup_filter(config).own_secrets == (b"sk_live_0123456789",)
