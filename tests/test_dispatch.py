"""helpers.dispatch: offloaded models compute exactly what in-memory models compute (chapter 05)."""

import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import helpers.dispatch as hd
from helpers.dispatch import dispatch, drop_page_cache, undispatch
from helpers.models import book_model_dir, chat, load_book_model

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def book():
    model, tokenizer = load_book_model()
    ids = tokenizer("Offloading moves weights to where", return_tensors="pt")
    with torch.inference_mode():
        logits = model(**ids).logits
    return model, tokenizer, ids, logits, chat(model, tokenizer, QUESTION, max_new_tokens=12)


def tiny_llama(meta: bool = False):
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    if meta:
        with init_empty_weights():
            return LlamaForCausalLM(config).eval()
    return LlamaForCausalLM(config).eval()


def mixed_map(n_layers: int, pattern: str) -> dict:
    """Embeddings on cpu, lm_head on disk (tied to them), blocks by pattern: c = cpu, d = disk."""
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "disk"}
    for i in range(n_layers):
        device_map[f"model.layers.{i}"] = {"c": "cpu", "d": "disk"}[pattern[i % len(pattern)]]
    return device_map


def test_reexports_chapter_04_planner():
    assert callable(hd.plan_device_map) and callable(hd.validate_device_map)


@pytest.mark.parametrize("pattern,prefetch", [("cd", False), ("dcc", True)])
def test_book_model_placements_match_in_memory(book, tmp_path, pattern, prefetch):
    model, tokenizer, ids, reference, answer = book
    device_map = mixed_map(30, pattern)
    dispatch(model, device_map, offload_dir=tmp_path, prefetch=prefetch, execution_device="cpu")
    try:
        assert model.model.layers[0].self_attn.q_proj.weight.device.type == "meta"
        with torch.inference_mode():
            logits = model(**ids).logits
        torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
        assert chat(model, tokenizer, QUESTION, max_new_tokens=12) == answer
        # released after the pass: offloaded weights are empty again
        assert all(p.device.type == "meta" for p in model.model.layers[0].parameters())
    finally:
        undispatch(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # ties restored
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    with torch.inference_mode():
        torch.testing.assert_close(model(**ids).logits, reference, rtol=0, atol=0)


def test_meta_model_from_checkpoint_reuses_its_offload_files(book, tmp_path):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    _, _, ids, reference, _ = book
    config = AutoConfig.from_pretrained(book_model_dir())
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with pytest.raises(ValueError, match="tie_weights"):
        dispatch(empty, {"": "cpu"}, checkpoint=book_model_dir())
    empty.tie_weights()
    device_map = mixed_map(30, "dcd")
    dispatch(empty, device_map, checkpoint=book_model_dir(), offload_dir=tmp_path, prefetch=True)
    with torch.inference_mode():
        torch.testing.assert_close(empty(**ids).logits, reference, rtol=1e-5, atol=1e-5)
    undispatch(empty)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    with init_empty_weights():
        again = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    again.tie_weights()
    dispatch(again, device_map, checkpoint=book_model_dir(), offload_dir=tmp_path)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps  # reused, not rewritten
    with torch.inference_mode():
        torch.testing.assert_close(again(**ids).logits, reference, rtol=1e-5, atol=1e-5)
    undispatch(again)


@pytest.mark.parametrize("change,message", [
    (lambda m: {**m, "model.nope": "cpu"}, "names no module"),
    (lambda m: {k: v for k, v in m.items() if k != "model.norm"}, "model.norm.weight is not covered"),
    (lambda m: {**m, "model.layers": "cpu"}, "overlap"),
    (lambda m: {**m, "model.norm": "floppy"}, "'floppy' is not a device"),
    (lambda m: {**m, "model.norm": 7}, "GPU"),
])
def test_bad_device_maps_fail_before_writing_anything(tmp_path, change, message):
    model = tiny_llama()
    with pytest.raises(ValueError, match=message):
        dispatch(model, change(mixed_map(4, "d")), offload_dir=tmp_path / "offload")
    assert not (tmp_path / "offload").exists()
    assert not hasattr(model, "_helpers_dispatcher") and not model.lm_head._forward_pre_hooks


def test_disk_without_offload_dir_and_meta_without_checkpoint_are_errors(tmp_path):
    with pytest.raises(ValueError, match="offload_dir is None"):
        dispatch(tiny_llama(), mixed_map(4, "d"))
    with pytest.raises(ValueError, match="pass checkpoint="):
        dispatch(tiny_llama(meta=True), mixed_map(4, "c"))


def test_foreign_files_are_never_overwritten_or_deleted(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    save_file({"x": torch.ones(3)}, tmp_path / "lm_head.safetensors")  # same name, not ours
    foreign = (tmp_path / "lm_head.safetensors").read_bytes()
    with pytest.raises(ValueError, match="was not written by helpers"):
        dispatch(tiny_llama(), mixed_map(4, "d"), offload_dir=tmp_path)
    assert (tmp_path / "lm_head.safetensors").read_bytes() == foreign
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm_head.safetensors", "notes.txt"]
    (tmp_path / "lm_head.safetensors").unlink()
    model = tiny_llama()
    dispatch(model, mixed_map(4, "d"), offload_dir=tmp_path)
    undispatch(model)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_offload_files_are_atomic_and_memory_mappable(tmp_path, monkeypatch):
    model = tiny_llama()
    expected = model.model.layers[2].mlp.up_proj.weight.detach().clone()
    from helpers import tensorfiles

    real_write = tensorfiles.write_safetensors

    def half_then_crash(path, *args, **kwargs):
        with tensorfiles.atomic_file(path) as tmp:
            tmp.write_bytes(b"half a file")
            raise OSError("disk full")

    monkeypatch.setattr(tensorfiles, "write_safetensors", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        dispatch(model, mixed_map(4, "d"), offload_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither a half file nor a temporary one is left
    monkeypatch.setattr(tensorfiles, "write_safetensors", real_write)
    model = tiny_llama()
    dispatch(model, mixed_map(4, "d"), offload_dir=tmp_path)
    with safe_open(tmp_path / "model.layers.2.safetensors", framework="pt") as f:  # mmap-backed reader
        assert torch.equal(f.get_tensor("model.layers.2.mlp.up_proj.weight"), expected)
    assert drop_page_cache(tmp_path) == 5
    undispatch(model)


def test_timeline_and_prefetch_thread(tmp_path):
    model, timeline = tiny_llama(), []
    dispatch(model, mixed_map(4, "d"), offload_dir=tmp_path, prefetch=True, timeline=timeline)
    with torch.inference_mode():
        model(torch.arange(8)[None])
    undispatch(model)
    loads = [t for t in timeline if t["kind"] == "load"]
    assert [t["module"] for t in loads] == (["model.embed_tokens"] + [f"model.layers.{i}" for i in range(4)]
                                                 + ["model.norm", "lm_head"])
    assert all(t["thread"].startswith("prefetch") for t in loads)
    assert {t["module"] for t in timeline if t["kind"] == "compute"} >= {"lm_head", "model.layers.3"}
    assert all(t["end"] >= t["start"] for t in timeline)


def test_dispatch_twice_and_undispatch_unknown_are_errors(tmp_path):
    model = tiny_llama()
    with pytest.raises(ValueError, match="not dispatched"):
        undispatch(model)
    dispatch(model, {"": "cpu"})
    with pytest.raises(ValueError, match="already dispatched"):
        dispatch(model, {"": "cpu"})
    undispatch(model)
    assert not os.listdir(tmp_path)


