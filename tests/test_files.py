"""pyroute/files.atomic_write as pure code (the state file and certificates use it; their
crash cases are in test_replication.py and test_security_state.py)."""
from __future__ import annotations

import os
import stat

import pytest

from pyroute.files import atomic_write


def test_writes_a_private_file_creating_the_directory(tmp_path):
    directory = tmp_path / "new" / "dir"
    atomic_write(str(directory), "cert.pem", b"pem")
    assert (directory / "cert.pem").read_bytes() == b"pem"
    assert stat.S_IMODE(os.stat(directory / "cert.pem").st_mode) == 0o600
    assert os.listdir(directory) == ["cert.pem"]  # no temp file left behind


def test_keeps_the_replaced_file_as_previous_and_uses_the_named_temp(tmp_path):
    atomic_write(str(tmp_path), "state.json", b"one", temp="state.json.tmp", previous="state.prev.json")
    assert sorted(os.listdir(tmp_path)) == ["state.json"]  # nothing to keep the first time
    atomic_write(str(tmp_path), "state.json", b"two", temp="state.json.tmp", previous="state.prev.json")
    assert (tmp_path / "state.json").read_bytes() == b"two"
    assert (tmp_path / "state.prev.json").read_bytes() == b"one"
    assert sorted(os.listdir(tmp_path)) == ["state.json", "state.prev.json"]


@pytest.mark.parametrize("temp", [None, "x.tmp"])
def test_a_failed_replace_leaves_the_target_alone_and_no_temp(tmp_path, temp):
    (tmp_path / "target").mkdir()  # a directory: the rename over it fails
    (tmp_path / "target" / "inside").write_bytes(b"old")
    with pytest.raises(OSError):
        atomic_write(str(tmp_path), "target", b"new", temp=temp)
    assert os.listdir(tmp_path) == ["target"] and (tmp_path / "target" / "inside").read_bytes() == b"old"
