"""helpers.tensorfiles: reading and writing safetensors files, publishing, and trusting a cache."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import tensorfiles as tf
from helpers.tensorfiles import CheckpointError

MIXED = {"w": torch.randn(3, 5), "h": torch.randn(4).half(), "i": torch.arange(6).reshape(2, 3),
         "b": torch.tensor([True, False]), "e": torch.zeros(0, 2), "bf": torch.randn(2, 2).bfloat16()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- reading

def test_read_header_agrees_with_safetensors(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file(MIXED, path, metadata={"format": "pt"})
    header = tf.read_header(path)
    with safe_open(path, "pt") as f:
        assert header.metadata == f.metadata() and sorted(header.tensors) == sorted(f.keys())
    assert header.data_start + header.data_bytes == path.stat().st_size
    assert header.data_start == 8 + int.from_bytes(path.read_bytes()[:8], "little")


@pytest.mark.parametrize("content, words", [
    (b"\x01\x02", "too short"),
    ((10**6).to_bytes(8, "little") + b"{}", "bad length prefix"),
    ((2).to_bytes(8, "little") + b"[]", "expected an object"),
    ((2).to_bytes(8, "little") + b"{x", "not valid JSON"),
])
def test_read_header_says_what_is_wrong(tmp_path, content, words):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"bad.safetensors.*{words}"):
        tf.read_header(path)


def test_three_readers_agree_with_safetensors(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file(MIXED, path)
    expected = load_file(path)
    ours, buffer = tf.read_safetensors(path)
    assert same(ours, expected)
    mapped, nbytes = tf.map_safetensors(path)
    assert same(mapped, expected) and nbytes == path.stat().st_size
    lazy, _ = tf.map_safetensors(path, populate=False)
    assert same(lazy, expected)


def test_mapped_tensors_are_private_copies_on_write(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(4096, dtype=torch.float32)}, path)
    tensors, _ = tf.map_safetensors(path)
    tensors["w"].zero_()  # writes to the private mapping only
    assert torch.equal(load_file(path)["w"], torch.arange(4096, dtype=torch.float32))


def test_read_safetensors_reuses_a_big_enough_buffer(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file(MIXED, path)
    big = torch.empty(10**5, dtype=torch.uint8)
    _, used = tf.read_safetensors(path, big)
    assert used is big
    _, fresh = tf.read_safetensors(path, torch.empty(1, dtype=torch.uint8))
    assert fresh.numel() == tf.read_header(path).data_bytes


def test_a_truncated_file_is_an_error_not_garbage(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.ones(1000)}, path)
    os.truncate(path, path.stat().st_size - 1)
    for read in (tf.map_safetensors, tf.read_safetensors):
        with pytest.raises(CheckpointError, match="'a' has data_offsets \\[0, 4000\\], outside the file's 3,999"):
            read(path)


def test_touch_rows_reads_only_the_pages_of_those_rows(tmp_path):
    import mmap

    path = tmp_path / "table.safetensors"
    table = torch.randn(4096, 256)  # a row is 1 KiB: four rows to a page
    save_file({"t": table}, path)
    tf.drop_page_cache(path)
    lazy, _ = tf.map_safetensors(path, populate=False)
    rows = torch.tensor([0, 1, 2000])
    assert tf.touch_rows(lazy, rows) == 2 * mmap.PAGESIZE  # rows 0 and 1 share a page (aligned header)
    assert torch.equal(lazy["t"][rows], table[rows])


def test_drop_page_cache_counts_files(tmp_path):
    for i in range(3):
        (tmp_path / "sub").mkdir(exist_ok=True)
        (tmp_path / "sub" / f"{i}.bin").write_bytes(b"x" * 10)
    (tmp_path / "top.bin").write_bytes(b"y")
    assert tf.drop_page_cache(tmp_path) == 4 and tf.drop_page_cache(tmp_path / "top.bin") == 1


# --------------------------------------------------------------------------- writing

def test_written_files_are_what_safetensors_reads(tmp_path):
    path = tmp_path / "ours.safetensors"
    nbytes = tf.save_safetensors(path, MIXED, metadata={"format": "pt", "n": 3})
    assert same(load_file(path), MIXED) and nbytes == sum(t.nbytes for t in MIXED.values())
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt", "n": "3"}
    assert tf.read_header(path).data_start % 8 == 0
    for name, info in tf.read_header(path).tensors.items():  # every tensor aligned to its element size
        assert info["data_offsets"][0] % MIXED[name].element_size() == 0


def test_write_safetensors_checks_each_tensor_against_its_spec(tmp_path):
    with pytest.raises(ValueError, match="'w' is torch.float32 \\[2\\]; its spec says torch.float16 \\[2\\]"):
        tf.write_safetensors(tmp_path / "x.safetensors", [("w", (2,), torch.float16)], lambda n: torch.ones(2))
    assert list(tmp_path.iterdir()) == []  # no temporary file left, no file under the final name


def test_atomic_file_leaves_the_old_file_on_failure(tmp_path):
    path = tmp_path / "f.json"
    tf.write_json(path, {"v": 1})
    with pytest.raises(RuntimeError):
        with tf.atomic_file(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert json.loads(path.read_text()) == {"v": 1} and [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_staging_dir_publishes_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with tf.staging_dir(target) as tmp:
            (tmp / "a").write_text("half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with tf.staging_dir(target) as tmp:
        (tmp / "a").write_text("whole")
        tf.write_manifest(tmp, "k1")
    assert (target / "a").read_text() == "whole" and [p.name for p in tmp_path.iterdir()] == ["out"]
    with tf.staging_dir(target) as tmp:  # another process published first, with a manifest: theirs stays
        (tmp / "a").write_text("second")
    assert (target / "a").read_text() == "whole" and [p.name for p in tmp_path.iterdir()] == ["out"]


# --------------------------------------------------------------------------- trusting what was written

def test_is_current_for_a_folder(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    tf.save_safetensors(folder / "w.safetensors", {"w": torch.ones(10)})
    (folder / "notes.txt").write_text("abc")
    assert tf.why_stale(folder, "k") == [f"{folder} has no {tf.MANIFEST}: helpers did not write it, or never finished"]
    assert not tf.written_by_helpers(folder)
    tf.write_manifest(folder, "k", made_by="test")
    assert tf.written_by_helpers(folder) and tf.why_stale(folder, "k") == []
    assert tf.why_stale(folder, "other") == ["cache was made from other inputs"]
    (folder / "notes.txt").write_text("abcd")
    assert tf.why_stale(folder, "k") == ["notes.txt is 4 bytes, expected 3"]
    raw = (folder / "w.safetensors").read_bytes()
    (folder / "w.safetensors").write_bytes(b"\xff" * 8 + raw[8:])  # same size, broken header
    assert "w.safetensors has a corrupt safetensors header" in tf.why_stale(folder, "k")
    (folder / "w.safetensors").unlink()
    assert "w.safetensors is missing" in tf.why_stale(folder, "k")


def test_is_current_for_a_file(tmp_path):
    path = tmp_path / "w.safetensors"
    tf.save_safetensors(path, {"w": torch.ones(10)}, metadata={tf.KEY_FIELD: "k"})
    assert tf.written_by_helpers(path) and tf.why_stale(path, "k") == []
    assert tf.why_stale(path, "j") == ["w.safetensors was made from other inputs"]
    with open(path, "ab") as f:
        f.write(b"extra")
    assert tf.why_stale(path, "k") == ["w.safetensors is incomplete"]
    save_file({"w": torch.ones(1)}, tmp_path / "theirs.safetensors")
    assert not tf.written_by_helpers(tmp_path / "theirs.safetensors")


def test_cache_key_changes_with_a_source_file(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"abc")
    first = tf.cache_key(source=tf.file_key(src), layout=1)
    assert tf.cache_key(layout=1, source=tf.file_key(src)) == first  # argument order does not matter
    src.write_bytes(b"abcd")
    assert tf.cache_key(source=tf.file_key(src), layout=1) != first


# --------------------------------------------------------------------------- byte ranges: reading a block in place

def test_map_range_and_read_range_read_exactly_those_bytes(tmp_path):
    import mmap

    path = tmp_path / "blob.bin"
    blob = torch.randint(0, 256, (3 * mmap.PAGESIZE + 123,), dtype=torch.uint8)
    path.write_bytes(blob.numpy().tobytes())
    big = torch.zeros(4 * mmap.PAGESIZE, dtype=torch.uint8)
    for start, length in [(0, blob.numel()), (5, 100), (mmap.PAGESIZE - 3, 10), (blob.numel() - 1, 1), (77, 0)]:
        want = blob[start:start + length]
        for populate in (True, False):
            assert torch.equal(tf.map_range(path, start, length, populate=populate), want)
        data, buffer = tf.read_range(path, start, length, big[64:])
        assert torch.equal(data, want) and buffer.data_ptr() == big.data_ptr() + 64  # read into the given buffer
    assert torch.equal(tf.map_range(path, 10), blob[10:])  # to the end
    for read in (tf.map_range, tf.read_range):
        with pytest.raises(CheckpointError, match=rf"blob.bin.*{blob.numel() - 9:,}.*{blob.numel():,} bytes"):
            read(path, blob.numel() - 9, 10)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="posix_fadvise (Linux)")
def test_drop_page_range_drops_only_the_pages_of_that_range(tmp_path):
    import ctypes
    import mmap

    path = tmp_path / "blob.bin"
    pages = 32
    with open(path, "wb") as f:
        f.write(os.urandom(pages * mmap.PAGESIZE))
    tf.drop_page_cache(path)  # written pages can linger (dirty, or in the kernel's per-CPU lists): start cold
    path.read_bytes()  # then every page in the cache, as a read leaves it

    def resident() -> list[bool]:
        """Which pages of the file are in the page cache now (mincore on a fresh mapping: nothing is read)."""
        with open(path, "rb") as f:
            mapping = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        anchor = ctypes.c_char.from_buffer(mapping)
        vec = (ctypes.c_ubyte * pages)()
        done = ctypes.CDLL(None).mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(len(mapping)), vec)
        del anchor
        mapping.close()
        assert done == 0
        return [bool(v & 1) for v in vec]

    if not all(resident()):
        pytest.skip("this file system does not keep the file's pages cached")
    tf.drop_page_range(path, 5 * mmap.PAGESIZE + 10, 3 * mmap.PAGESIZE)  # bytes in pages 5 to 8
    assert resident() == [not 5 <= i <= 8 for i in range(pages)]
