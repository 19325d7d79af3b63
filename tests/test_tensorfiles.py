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


# --------------------------------------------------------------------------- checkpoints

def test_pack_shards_is_greedy_in_order():
    specs = [(str(i), (n,), torch.uint8) for i, n in enumerate([40, 50, 20, 200, 10])]
    shards = tf.pack_shards(specs, 100)
    assert [[name for name, _, _ in shard] for shard in shards] == [["0", "1"], ["2"], ["3"], ["4"]]
    with pytest.raises(ValueError, match="shard_bytes 0"):
        tf.pack_shards(specs, 0)


def test_save_sharded_then_weight_map_in_every_form(tmp_path):
    tensors = {f"layer.{i}.w": torch.full((64,), float(i)) for i in range(5)}
    names = tf.save_sharded(tmp_path, [(k, t.shape, t.dtype) for k, t in tensors.items()],
                            tensors.__getitem__, 2 * 64 * 4)
    assert sorted(set(names.values())) == [tf.shard_name(i, 3) for i in (1, 2, 3)]
    index = json.loads((tmp_path / tf.INDEX).read_text())
    assert index["metadata"] == {"total_parameters": 5 * 64, "total_size": 5 * 64 * 4}
    assert tf.weight_map(tmp_path) == (tmp_path, names) == tf.weight_map(tmp_path / tf.INDEX)
    one = tmp_path / "single"
    one.mkdir()
    save_file(tensors, one / tf.SINGLE)
    assert tf.weight_map(one) == (one, {k: tf.SINGLE for k in tensors})
    with pytest.raises(FileNotFoundError, match="not a safetensors checkpoint"):
        tf.weight_map(tmp_path / "nothing-here")


def test_read_layer_index_checks_what_it_reads(tmp_path):
    index = tf.LayerIndex(blocks=["model.embed_tokens", "lm_head"], files={"model.embed_tokens": "e.safetensors"},
                          tied={"lm_head.weight": "model.embed_tokens.weight"}, bytes={"model.embed_tokens": 8})
    index.write(tmp_path)
    back = tf.read_layer_index(tmp_path)
    assert back == index
    assert back.tied_source("lm_head") == ("model.embed_tokens", "model.embed_tokens.weight", "lm_head.weight")
    assert back.tied_source("model.embed_tokens") is None
    raw = json.loads((tmp_path / tf.LAYERS_INDEX).read_text())
    (tmp_path / tf.LAYERS_INDEX).write_text(json.dumps({**raw, "format": "other/9"}))
    with pytest.raises(CheckpointError, match="format 'other/9'"):
        tf.read_layer_index(tmp_path)
    (tmp_path / tf.LAYERS_INDEX).write_text(json.dumps({**raw, "tied": {}}))
    with pytest.raises(CheckpointError, match="lm_head.*no file and no tied source"):
        tf.read_layer_index(tmp_path)
    with pytest.raises(FileNotFoundError, match="split_by_layer"):
        tf.read_layer_index(tmp_path / "missing")
