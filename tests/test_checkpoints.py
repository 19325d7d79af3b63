"""Tests for helpers.checkpoints (chapter 03): the format by hand, inspect, validate, split_by_layer."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import checkpoints as ck
from helpers import layout, tensorfiles
from helpers import quant as Q
from helpers.checkpoints import CheckpointError
from helpers.layout import INDEX, read_layer_index
from helpers.memory import measure
from helpers.models import synthetic_llama
from helpers.tensorfiles import ST_DTYPES, read_header

TINY = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)


def meta_model(path: Path, dtype=torch.bfloat16):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return synthetic_llama(tmp_path_factory.mktemp("tiny") / "ckpt", TINY, max_shard_size=20_000, progress=False)


@pytest.fixture(scope="module")
def tiny_untied(tmp_path_factory) -> Path:
    return synthetic_llama(tmp_path_factory.mktemp("untied") / "ckpt", {**TINY, "tie_word_embeddings": False},
                           max_shard_size=20_000, progress=False)


@pytest.fixture
def copy(tiny, tmp_path) -> Path:
    return Path(shutil.copytree(tiny, tmp_path / "broken"))


def weight_map(path: Path) -> dict:
    return json.loads((path / INDEX).read_text())["weight_map"]


def state_dict(path: Path) -> dict:
    out = {}
    for shard in sorted(set(weight_map(path).values())):
        out.update(load_file(path / shard))
    return out


# --------------------------------------------------------------------------- the format by hand

def test_header_by_hand_agrees_with_safetensors(tiny):
    for shard in sorted(set(weight_map(tiny).values())):
        header = read_header(tiny / shard)
        with safe_open(tiny / shard, framework="pt") as f:
            assert header.metadata == f.metadata() == {"format": "pt"}
            assert sorted(header.tensors) == sorted(f.keys())
            for name, entry in header.tensors.items():
                t = f.get_tensor(name)
                assert list(t.shape) == entry["shape"] and ST_DTYPES[entry["dtype"]] == t.dtype
                mine = ck.read_tensor(tiny / shard, name, header)
                assert mine.dtype == t.dtype and torch.equal(mine, t)


def test_read_tensor_all_dtypes(tmp_path):
    tensors = {f"t_{str(d)[6:]}": (torch.arange(12, dtype=torch.float32) - 3).reshape(3, 4).to(d)
               for d in [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.uint8,
                         torch.bool, torch.float64]}
    tensors["scalar"], tensors["empty"] = torch.tensor(2.5), torch.zeros(0, 3)
    save_file(tensors, tmp_path / "x.safetensors")
    for name, t in tensors.items():
        got = ck.read_tensor(tmp_path / "x.safetensors", name)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name
    with pytest.raises(KeyError, match="nope"):
        ck.read_tensor(tmp_path / "x.safetensors", "nope")


# --------------------------------------------------------------------------- inspect

def test_inspect_sharded(tiny):
    info = ck.inspect_checkpoint(tiny)
    index = json.loads((tiny / INDEX).read_text())
    assert {t.name for t in info.tensors} == set(index["weight_map"])
    assert all(index["weight_map"][t.name] == t.shard for t in info.tensors)
    assert info.total_bytes == index["metadata"]["total_size"]
    assert info.shard_bytes == {s: (tiny / s).stat().st_size for s in set(index["weight_map"].values())}
    assert len(info.shard_bytes) >= 3
    assert info.total_params == sum(p.numel() for p in meta_model(tiny).parameters())
    text = str(info)
    assert all(s in text for s in info.shard_bytes) and "tensors" in text
    assert "model.embed_tokens.weight" in info.tensor_table(limit=3) and "more tensors" in info.tensor_table(3)


def test_inspect_single_file(tiny, tmp_path):
    save_file(state_dict(tiny), tmp_path / "model.safetensors")
    for p in (tmp_path, tmp_path / "model.safetensors"):
        info = ck.inspect_checkpoint(p)
        assert list(info.shard_bytes) == ["model.safetensors"]
        assert info.total_bytes == ck.inspect_checkpoint(tiny).total_bytes


def test_inspect_rejects_non_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a safetensors checkpoint"):
        ck.inspect_checkpoint(tmp_path)


# --------------------------------------------------------------------------- validate: clean

def test_validate_clean_and_tied(tiny, tiny_untied):
    info = ck.validate_checkpoint(tiny, meta_model(tiny))  # lm_head.weight is tied, stored once
    assert "lm_head.weight" not in weight_map(tiny) and info.total_bytes > 0
    ck.validate_checkpoint(tiny_untied, meta_model(tiny_untied))
    with pytest.raises(CheckpointError, match="dtype"):
        ck.validate_checkpoint(tiny, meta_model(tiny, torch.float32))
    ck.validate_checkpoint(tiny, meta_model(tiny, torch.float32), check_dtype=False)


def test_untied_model_needs_lm_head(tiny, tiny_untied):
    with pytest.raises(CheckpointError) as e:
        ck.validate_checkpoint(tiny, meta_model(tiny_untied))
    assert len(e.value.problems) == 1 and "missing key 'lm_head.weight'" in str(e.value)


def test_validate_book_model(book_dir):
    path = book_dir
    info = ck.validate_checkpoint(path, meta_model(path, torch.float16))
    assert len(info.shard_bytes) == 3 and info.total_params == 134_515_008


# --------------------------------------------------------------------------- validate: every corruption

def shard_of(path: Path, key: str) -> Path:
    return path / weight_map(path)[key]


def rewrite_shard(file: Path, change) -> None:
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def set_index(path: Path, change) -> None:
    index = json.loads((path / INDEX).read_text())
    change(index["weight_map"])
    (path / INDEX).write_text(json.dumps(index))


def rewrite_header(file: Path, change) -> None:
    """Re-encode a shard's JSON header after ``change(header)``, keeping the data bytes as they are."""
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    change(header)
    new = json.dumps(header).encode()
    file.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


KEY = "model.layers.1.mlp.up_proj.weight"


def drop_key(p):
    rewrite_shard(shard_of(p, KEY), lambda t: t.pop(KEY))
    set_index(p, lambda m: m.pop(KEY))


def extra_key(p):
    rewrite_shard(shard_of(p, KEY), lambda t: t.update({"model.layers.1.mlp.extra.weight": torch.zeros(2)}))
    set_index(p, lambda m: m.update({"model.layers.1.mlp.extra.weight": weight_map(p)[KEY]}))


def bad_shape(p):
    rewrite_shard(shard_of(p, KEY), lambda t: t.update({KEY: t[KEY][:, :-1].contiguous()}))


def bad_dtype(p):
    rewrite_shard(shard_of(p, KEY), lambda t: t.update({KEY: t[KEY].float()}))


def missing_shard(p):
    shard_of(p, KEY).unlink()


def bad_prefix(p):
    f = shard_of(p, KEY)
    f.write_bytes((10**12).to_bytes(8, "little") + f.read_bytes()[8:])


def bad_json(p):
    f = shard_of(p, KEY)
    raw = bytearray(f.read_bytes())
    raw[8] = ord("[")  # the header's opening brace becomes a bracket
    f.write_bytes(bytes(raw))


def offsets_beyond(p):
    def move(header):
        begin, end = header[KEY]["data_offsets"]
        header[KEY]["data_offsets"] = [begin + 10**9, end + 10**9]
    rewrite_header(shard_of(p, KEY), move)


def truncated(p):
    f = shard_of(p, KEY)
    header = read_header(f)
    os.truncate(f, header.data_start + header.tensors[KEY]["data_offsets"][1] - 1)  # cut through the last byte of KEY


def index_without_file_key(p):
    set_index(p, lambda m: m.update({"model.layers.0.ghost.weight": weight_map(p)[KEY]}))


def file_key_not_in_index(p):
    set_index(p, lambda m: m.pop(KEY))


CASES = {  # corruption -> words its message must contain
    "missing key": (drop_key, "missing key", KEY),
    "unexpected key": (extra_key, "unexpected key", "model.layers.1.mlp.extra.weight"),
    "shape mismatch": (bad_shape, "shape", KEY),
    "dtype mismatch": (bad_dtype, "dtype F32", KEY),
    "shard file missing": (missing_shard, "shard file is missing", KEY),
    "bad length prefix": (bad_prefix, "bad length prefix", KEY),
    "invalid JSON": (bad_json, "not valid JSON", KEY),
    "offsets beyond file": (offsets_beyond, "data_offsets", KEY),
    "file truncated": (truncated, "truncated", KEY),
    "index key not in file": (index_without_file_key, "not in the file", "model.layers.0.ghost.weight"),
    "file key not in index": (file_key_not_in_index, "the index does not list it", KEY),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_corruption_is_one_error_naming_file_and_key(copy, case):
    corrupt, words, key = CASES[case]
    shard = weight_map(copy)[KEY]
    corrupt(copy)
    with pytest.raises(CheckpointError) as e:
        ck.validate_checkpoint(copy, meta_model(copy))
    message = str(e.value)
    assert words in message and repr(key) in message, message
    assert len(e.value.problems) == 1, message
    named = shard if case != "missing key" else INDEX
    assert any(named in p and repr(key) in p for p in e.value.problems), e.value.problems


def test_every_problem_is_listed_at_once(copy):
    model = meta_model(copy)
    for name in ("bad_shape", "extra_key", "index_without_file_key"):
        globals()[name](copy)
    other = next(s for s in weight_map(copy).values() if s != weight_map(copy)[KEY])
    (copy / other).unlink()
    with pytest.raises(CheckpointError) as e:
        ck.validate_checkpoint(copy, model)
    text = str(e.value)
    assert len(e.value.problems) >= 4, text
    for words in ("shape", "unexpected key", "not in the file", "shard file is missing"):
        assert words in text


def test_corrupt_index(copy):
    (copy / INDEX).write_text("{not json")
    with pytest.raises(CheckpointError, match=INDEX):
        ck.validate_checkpoint(copy, meta_model(copy))


# --------------------------------------------------------------------------- split_by_layer

def test_split_tied_follows_the_contract(tiny, tmp_path):
    out = ck.split_by_layer(tiny, tmp_path / "layers", progress=False)
    index = read_layer_index(out)
    n = TINY["num_hidden_layers"]
    blocks = ["model.embed_tokens", *[f"model.layers.{i}" for i in range(n)], "model.norm", "lm_head"]
    assert index.blocks == blocks
    assert index.files == {b: f"{b}.safetensors" for b in blocks[:-1]}
    assert index.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    assert not (out / "lm_head.safetensors").exists()
    original = state_dict(tiny)
    assert sum(index.bytes.values()) == sum(t.nbytes for t in original.values())
    assert (out / "config.json").read_text() == (tiny / "config.json").read_text()
    reassembled = {}
    for block, file in index.files.items():
        part = load_file(out / file)
        assert all(k.startswith(block + ".") for k in part)
        assert index.bytes[block] == sum(t.nbytes for t in part.values())
        reassembled.update(part)
    assert reassembled.keys() == original.keys()
    assert all(torch.equal(reassembled[k], original[k]) and reassembled[k].dtype == original[k].dtype
               for k in original)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left
    info = ck.validate_checkpoint(out, meta_model(tiny))  # the split is itself a valid checkpoint
    assert len(info.shard_bytes) == len(index.files) and info.total_bytes == sum(index.bytes.values())


def test_split_untied_writes_lm_head(tiny_untied, tmp_path):
    out = ck.split_by_layer(tiny_untied, tmp_path / "layers", progress=False)
    index = read_layer_index(out)
    assert index.tied == {} and index.blocks[-1] == "lm_head"
    assert index.files["lm_head"] == "lm_head.safetensors"
    assert torch.equal(load_file(out / "lm_head.safetensors")["lm_head.weight"],
                       state_dict(tiny_untied)["lm_head.weight"])


def test_split_single_file_checkpoint(tiny, tmp_path):
    src = tmp_path / "single"
    src.mkdir()
    save_file(state_dict(tiny), src / "model.safetensors")
    shutil.copy(tiny / "config.json", src)
    out = ck.split_by_layer(src, tmp_path / "layers", progress=False)
    assert ck.inspect_checkpoint(out).total_bytes == ck.inspect_checkpoint(tiny).total_bytes


def test_split_is_idempotent_and_refuses_other_dirs(tiny, tiny_untied, tmp_path):
    out = ck.split_by_layer(tiny, tmp_path / "layers", progress=False)
    stamp = (out / layout.LAYERS_INDEX).stat().st_mtime_ns
    assert ck.split_by_layer(tiny, out, progress=False) == out
    assert (out / layout.LAYERS_INDEX).stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="layers"):  # same out_dir, another source
        ck.split_by_layer(tiny_untied, out, progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="other"):
        ck.split_by_layer(tiny, other, progress=False)
    assert [p.name for p in other.iterdir()] == ["mine.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (ck.split_by_layer(tiny, empty, progress=False) / layout.LAYERS_INDEX).is_file()


def test_split_is_atomic(tiny, tmp_path, monkeypatch):
    calls = []

    def failing_write(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return real(path, *args, **kwargs)

    real = tensorfiles.write_safetensors
    monkeypatch.setattr(tensorfiles, "write_safetensors", failing_write)
    with pytest.raises(OSError, match="simulated"):
        ck.split_by_layer(tiny, tmp_path / "layers", progress=False)
    assert list(tmp_path.iterdir()) == []  # neither out_dir nor its temp dir


def test_split_checks_input_before_writing(tiny, copy, tmp_path):
    (copy / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        ck.split_by_layer(copy, tmp_path / "a", progress=False)
    shutil.copy(tiny / "config.json", copy)
    missing_shard(copy)
    with pytest.raises(CheckpointError, match="missing"):
        ck.split_by_layer(copy, tmp_path / "b", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_split_peak_ram_is_about_one_block(tmp_path):
    config = {**TINY, "vocab_size": 4096, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
              "num_attention_heads": 8, "num_key_value_heads": 8, "tie_word_embeddings": False}
    src = synthetic_llama(tmp_path / "src", config, dtype=torch.float32, max_shard_size="60MB", progress=False)
    ck.split_by_layer(src, tmp_path / "warmup", progress=False)  # imports, allocator arenas
    with measure() as m:
        out = ck.split_by_layer(src, tmp_path / "layers", progress=False)
    sizes = read_layer_index(out).bytes
    largest, total = max(sizes.values()), sum(sizes.values())
    assert total > 8 * largest  # the model is much bigger than one block...
    assert m.cpu_peak_bytes < largest + 6 * 2**20, (m.cpu_peak_bytes, largest)  # ...the peak is not


def test_split_book_model(tmp_path, book_dir):
    src = book_dir
    out = ck.split_by_layer(src, tmp_path / "layers", progress=False)
    index = read_layer_index(out)
    assert len(index.blocks) == 30 + 3 and index.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    assert sum(index.bytes.values()) == json.loads((src / INDEX).read_text())["metadata"]["total_size"]
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    original = state_dict(src)
    for file in index.files.values():
        for k, t in load_file(out / file).items():
            assert torch.equal(t, original.pop(k)), k
    assert original == {}


# --------------------------------------------------------------------------- split_by_layer, compressed (chapter 08)

BF16 = dict(TINY, hidden_size=128, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def bf16_untied(tmp_path_factory) -> Path:
    return synthetic_llama(tmp_path_factory.mktemp("bf16") / "ckpt", {**BF16, "tie_word_embeddings": False},
                           dtype=torch.bfloat16, max_shard_size=100_000, progress=False)


@pytest.fixture(scope="module")
def splits(bf16_untied, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("splits")
    return {c: ck.split_by_layer(bf16_untied, root / str(c), codec=codec(c), progress=False)
            for c in (None, "int8", "nf4")}


def codec(name):
    """The codec a split is handed for the compression ``name`` (None: stored as is)."""
    return None if name is None else Q.codec(name)


def stored_tensors(out: Path) -> dict:
    index, tensors = read_layer_index(out), {}
    for file in index.files.values():
        tensors.update(load_file(out / file))
    return tensors


def is_linear(name: str) -> bool:
    return name == "lm_head.weight" or name.endswith("_proj.weight")


@pytest.mark.parametrize("compression", ["int8", "nf4"])
def test_compressed_split_stores_the_codec(bf16_untied, splits, compression):
    out, original = splits[compression], state_dict(bf16_untied)
    index = read_layer_index(out)
    assert index.compression == compression
    assert json.loads((out / layout.LAYERS_INDEX).read_text())["compression"] == compression
    assert index.blocks == read_layer_index(splits[None]).blocks and index.files["lm_head"] == "lm_head.safetensors"
    for block, file in index.files.items():  # the index's bytes are the bytes stored
        assert index.bytes[block] == sum(t.nbytes for t in load_file(out / file).values())
    stored = stored_tensors(out)
    assert stored.keys() == Q.codec(compression).compress(original).keys()
    assert "lm_head.weight.absmax" in stored and torch.equal(stored["model.embed_tokens.weight"],
                                                             original["model.embed_tokens.weight"])
    back = Q.codec(compression).decompress(stored, torch.bfloat16)
    assert back.keys() == original.keys()
    for name, w in original.items():
        want = (Q.quantize_int8(w) if compression == "int8" else Q.quantize_4bit(w, "nf4")).dequantize() \
            if is_linear(name) else w
        assert back[name].dtype == torch.bfloat16 and torch.equal(back[name], want), name


# bytes stored per bf16 byte of a linear weight (out, in): int8 keeps 1 byte per weight + a float32 absmax per
# row of `in` weights; nf4 half a byte per weight + a float32 absmax per block of 64 weights
RATIO = {"int8": lambda cols: (1 + 4 / cols) / 2, "nf4": lambda cols: (0.5 + 4 / 64) / 2}


@pytest.mark.parametrize("compression", ["int8", "nf4"])
def test_compressed_split_bytes(bf16_untied, splits, compression):
    plain, packed = read_layer_index(splits[None]), read_layer_index(splits[compression])
    assert plain.compression is None
    original = state_dict(bf16_untied)
    linear = {k: t for k, t in original.items() if is_linear(k)}
    other = sum(t.nbytes for k, t in original.items() if not is_linear(k))
    assert sum(plain.bytes.values()) == sum(t.nbytes for t in original.values())
    stored_linear = sum(packed.bytes.values()) - other  # embeddings and norms are stored as they were
    expected = sum(t.nbytes * RATIO[compression](t.shape[1]) for t in linear.values())
    assert stored_linear == pytest.approx(expected, abs=0.5)
    ratio = stored_linear / sum(t.nbytes for t in linear.values())
    widths = [t.shape[1] for t in linear.values()]
    low, high = RATIO[compression](max(widths)), RATIO[compression](min(widths))
    assert low <= ratio <= high, (ratio, low, high)
    assert ratio < {"int8": 0.52, "nf4": 0.29}[compression]  # about a half, a little over a quarter
    layer = "model.layers.0"  # a decoder block is all linear weights but two norms
    assert packed.bytes[layer] / plain.bytes[layer] < RATIO[compression](BF16["hidden_size"]) * 1.01
    assert packed.bytes["model.embed_tokens"] == plain.bytes["model.embed_tokens"]


def test_compressed_split_keeps_a_tied_lm_head(tiny, tmp_path):
    out = ck.split_by_layer(tiny, tmp_path / "layers", codec=Q.codec("nf4"), progress=False)
    index = read_layer_index(out)
    assert index.tied == {"lm_head.weight": "model.embed_tokens.weight"} and "lm_head" not in index.files
    embed = load_file(out / index.files["model.embed_tokens"])
    assert list(embed) == ["model.embed_tokens.weight"]  # not compressed: it is also the embedding table
    assert torch.equal(embed["model.embed_tokens.weight"], state_dict(tiny)["model.embed_tokens.weight"])


def test_compressed_split_cache_names_the_compression(tiny, tmp_path):
    out = ck.split_by_layer(tiny, tmp_path / "layers", codec=Q.codec("int8"), progress=False)
    stamp = (out / layout.LAYERS_INDEX).stat().st_mtime_ns
    assert ck.split_by_layer(tiny, out, codec=Q.codec("int8"), progress=False) == out
    assert (out / layout.LAYERS_INDEX).stat().st_mtime_ns == stamp
    for other in ("nf4", None):
        with pytest.raises(FileExistsError, match=f"compression='int8', not compression={other!r}"):
            ck.split_by_layer(tiny, out, codec=codec(other), progress=False)
    plain = ck.split_by_layer(tiny, tmp_path / "plain", progress=False)
    with pytest.raises(FileExistsError, match="compression=None, not compression='nf4'"):
        ck.split_by_layer(tiny, plain, codec=Q.codec("nf4"), progress=False)
    assert (out / layout.LAYERS_INDEX).stat().st_mtime_ns == stamp


def test_compressed_split_refuses_bad_input_before_writing(tiny, tmp_path):
    for bad in ("int4", "NF4", "fp16"):
        with pytest.raises(ValueError, match=repr(bad)):
            ck.split_by_layer(tiny, tmp_path / "bad", codec=bad, progress=False)
    # head_dim 10: k_proj is (20, 40), 800 weights, not whole blocks of 64
    odd = synthetic_llama(tmp_path / "odd", {**TINY, "hidden_size": 40, "intermediate_size": 64},
                          max_shard_size=20_000, progress=False)
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.k_proj.weight' of shape \(20, 40\)"):
        ck.split_by_layer(odd, tmp_path / "bad", codec=Q.codec("nf4"), progress=False)
    assert not (tmp_path / "bad").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["odd"]  # no temp dir either
    ck.split_by_layer(odd, tmp_path / "int8", codec=Q.codec("int8"), progress=False)  # int8 has no blocks
