"""Tests for helpers.bench.disk (chapter 08): the reader's folders and their read speeds, measured without
leaving a file behind and without ever writing to a read-only folder."""

import os

import pytest

from helpers.bench import disk


def snapshot(folder):
    """Every file under ``folder`` with its size and modification time."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_a_writable_folder_is_measured_with_a_file_of_its_own_then_removed(tmp_path):
    (tmp_path / "keep.bin").write_bytes(b"x" * 10_000)
    before = snapshot(tmp_path)
    (row,) = disk.probe_disks([tmp_path], nbytes=3 * 2**20)
    assert row.path == str(tmp_path) and row.bytes == 3 * 2**20 and row.gb_per_s > 0
    assert row.method in ("write+direct", "write+buffered")
    assert snapshot(tmp_path) == before  # its temporary file is gone, nothing else touched


def test_the_temporary_file_is_removed_when_the_read_fails(tmp_path, monkeypatch):
    def broken(path, nbytes):
        raise OSError("read failed")

    monkeypatch.setattr(disk, "_timed_read", broken)
    with pytest.raises(OSError, match="read failed"):
        disk.probe_disks([tmp_path], nbytes=2**20)
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_folder_is_read_from_its_largest_file_up_to_the_cap_and_never_written(tmp_path, monkeypatch):
    inputs = tmp_path / "input"
    (inputs / "model").mkdir(parents=True)
    (inputs / "small.txt").write_bytes(b"a" * 5000)
    (inputs / "model" / "weights.bin").write_bytes(os.urandom(3 * 2**20))
    before = snapshot(inputs)
    real = os.access
    monkeypatch.setattr(disk.os, "access", lambda p, mode: False if mode == os.W_OK else real(p, mode))
    monkeypatch.setattr(disk.tempfile, "mkstemp", lambda *a, **k: pytest.fail("wrote to a read-only folder"))
    (row,) = disk.probe_disks([inputs], cap=2**20)
    assert row.bytes == 2**20 and row.method in ("read+direct", "read+buffered") and row.gb_per_s > 0
    assert "weights.bin" in row.note
    (row,) = disk.probe_disks([inputs], cap=2**30)  # the whole file when it is smaller than the cap
    assert row.bytes == 3 * 2**20
    assert snapshot(inputs) == before


def test_folders_that_cannot_be_measured_say_why(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(disk.os, "access", lambda p, mode: False)
    missing, nothing = disk.probe_disks([tmp_path / "absent", empty])
    assert (missing.bytes, missing.method, missing.note) == (0, "none", "not a folder here")
    assert (nothing.bytes, nothing.method) == (0, "none") and "no file" in nothing.note


def test_disk_folders_are_the_working_folder_and_the_readers_that_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    kaggle = tmp_path / "kaggle-input"
    kaggle.mkdir()
    assert disk.disk_folders([kaggle, tmp_path / "no-colab-here", tmp_path]) == [tmp_path, kaggle]
    assert disk.disk_folders()[0] == tmp_path
    assert disk.READER_FOLDERS == ("/kaggle/input", "/content")


def test_bad_sizes_are_refused_before_any_work(tmp_path):
    for kwargs, message in (({"nbytes": 0}, "nbytes 0"), ({"cap": 1.5}, "cap 1.5"), ({"nbytes": True}, "nbytes")):
        with pytest.raises(ValueError, match=message):
            disk.probe_disks([tmp_path], **kwargs)
    assert list(tmp_path.iterdir()) == []
