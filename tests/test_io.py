"""Atomic output writing: permissions, refusal to overwrite inputs, clean failure."""

import os
import stat

import pytest

from laqonnx._util.io import atomic_write_bytes, check_output_path, save_model
from laqonnx.errors import OutputError
from tests import models


def test_written_file_has_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        out = atomic_write_bytes(tmp_path / "a.bin", b"abc")
    finally:
        os.umask(old)
    assert out.read_bytes() == b"abc"
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


def test_refuses_to_overwrite_input(tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(models.cnn().SerializeToString())
    before = src.read_bytes()
    with pytest.raises(OutputError, match="overwrite the input"):
        save_model(models.cnn(seed=1), src, src)
    assert src.read_bytes() == before


def test_missing_folder_and_folder_target(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        check_output_path(tmp_path / "nope" / "x.onnx")
    with pytest.raises(OutputError, match="is a folder"):
        check_output_path(tmp_path)


def test_unwritable_folders_are_found_before_writing(tmp_path, monkeypatch):
    """A folder whose files cannot be created (/proc, even for root; a path under a regular file; a
    folder where creating fails) is refused by check_output_path itself, not at write time."""
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output_path(tmp_path / "file.txt" / "out.onnx")
    with pytest.raises(OutputError, match="is a file"):
        check_output_path(tmp_path / "file.txt" / "sub" / "out.onnx")
    if os.path.isdir("/proc"):
        with pytest.raises(OutputError, match="not writable"):
            check_output_path("/proc/q.onnx")
        with pytest.raises(OutputError, match="not writable"):
            atomic_write_bytes("/proc/q.onnx", b"x")

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("laqonnx._util.io.tempfile.mkstemp", refuse)
    with pytest.raises(OutputError, match="not writable .Permission denied"):
        check_output_path(tmp_path / "out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_no_temp_file_left_on_failure(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OutputError, match="No space left"):
        atomic_write_bytes(tmp_path / "x.bin", b"data")
    assert list(tmp_path.iterdir()) == []
