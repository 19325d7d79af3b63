"""helpers.dispatch: offloaded models compute exactly what in-memory models compute (chapter 05)."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

from helpers import tensorfiles
from helpers.dispatch import attach, check_dispatch, dispatch, materialise, plan, undispatch
from helpers.models import load_book_model
from helpers.tensorfiles import drop_page_cache

IDS = torch.arange(8)[None]


@pytest.fixture
def tiny(tiny_llama_config):
    """``tiny(meta=False)``: a small tied Llama (4 layers), the same weights every call; ``meta=True``: empty."""

    def make(meta: bool = False):
        from accelerate import init_empty_weights

        config = tiny_llama_config(num_hidden_layers=4, tie_word_embeddings=True)
        torch.manual_seed(0)
        if meta:
            with init_empty_weights():
                return LlamaForCausalLM(config).eval()
        return LlamaForCausalLM(config).eval()

    return make


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits


def layer_map(n_layers: int, pattern: str, ends: str = "cpu") -> dict:
    """Embedding, norm and the tied lm_head on ``ends``; decoder layers by ``pattern``: c = "cpu", d = "disk"."""
    device_map = {"model.embed_tokens": ends, "model.rotary_emb": "cpu", "model.norm": ends, "lm_head": ends}
    for i in range(n_layers):
        device_map[f"model.layers.{i}"] = {"c": "cpu", "d": "disk"}[pattern[i % len(pattern)]]
    return device_map


def untouched(model) -> bool:
    """No hook anywhere and no parameter on meta: what a model is before dispatch and after undispatch."""
    hooks = any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    return not hooks and not any(p.device.type == "meta" for p in model.parameters())


# --------------------------------------------------------------------------- same answers

@pytest.mark.parametrize("device_map", [layer_map(4, "c"), layer_map(4, "d", ends="disk"), layer_map(4, "dc")],
                         ids=["cpu", "disk", "mixed"])
@pytest.mark.parametrize("prefetch", [False, True], ids=["load", "prefetch"])
def test_plan_materialise_attach_match_in_memory(tiny, tmp_path, device_map, prefetch):
    model = tiny()
    reference = logits(model)
    check_dispatch(model, device_map, offload_folder=tmp_path)
    placement = plan(model, device_map, offload_folder=tmp_path)
    assert [e.name for e in placement.entries] == ["model.embed_tokens", *(f"model.layers.{i}" for i in range(4)),
                                                   "model.norm", "model.rotary_emb", "lm_head"]  # forward order
    for entry in placement.entries:
        expected = None if entry.name == "model.rotary_emb" else device_map[entry.name]  # buffers only: resident
        assert entry.offload == expected and entry.runs_on == torch.device("cpu")
        assert (entry.file == tmp_path / f"{entry.name}.safetensors") == (expected == "disk")
    assert not list(tmp_path.iterdir()) and not any(p.device.type == "meta" for p in model.parameters())

    attach(materialise(placement), prefetch=prefetch)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{k}.safetensors" for k, v in device_map.items()
                                                                if v == "disk")
    assert all(p.device.type == "meta" for p in model.parameters())  # between passes, no weights at all
    assert torch.equal(logits(model), reference)
    assert torch.equal(logits(model), reference)  # a second pass: the weights came back and went again
    assert all(p.device.type == "meta" for p in model.parameters())
    undispatch(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tie is one Parameter again
    assert untouched(model) and torch.equal(logits(model), reference)


def test_dispatch_keeps_the_model_class_and_generates_with_inputs_on_the_cpu(tiny, tmp_path):
    model, reference = tiny(), tiny()
    expected = reference.generate(IDS, max_new_tokens=6, do_sample=False)
    dispatch(model, layer_map(4, "d", ends="disk"), offload_folder=tmp_path, prefetch=True)
    assert type(model) is LlamaForCausalLM
    assert model.device.type == "meta"  # transformers: the first parameter's device; generate copes with it
    assert torch.equal(model.generate(IDS, max_new_tokens=6, do_sample=False), expected)
    undispatch(model)


@pytest.fixture(scope="module")
def book():
    """Our own copy of the book model (dispatch changes a model; the shared ``book_model`` must not change)."""
    model, tokenizer = load_book_model()
    ids = tokenizer("Offloading moves weights to where", return_tensors="pt")
    with torch.inference_mode():
        reference = model(**ids).logits
        answer = model.generate(**ids, max_new_tokens=8, do_sample=False)
    return model, ids, reference, answer


@pytest.mark.parametrize("pattern,ends,prefetch", [("cd", "cpu", False), ("dcc", "disk", True)])
def test_book_model_placements_match_in_memory(book, tmp_path, pattern, ends, prefetch):
    model, ids, reference, answer = book
    dispatch(model, layer_map(30, pattern, ends), offload_folder=tmp_path, prefetch=prefetch, execution_device="cpu")
    try:
        with torch.inference_mode():
            torch.testing.assert_close(model(**ids).logits, reference, rtol=1e-5, atol=1e-5)
            assert torch.equal(model.generate(**ids, max_new_tokens=8, do_sample=False), answer)
        assert all(p.device.type == "meta" for p in model.model.layers[0].parameters())
    finally:
        undispatch(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight and untouched(model)
    with torch.inference_mode():
        assert torch.equal(model(**ids).logits, reference)


def test_meta_model_from_checkpoint_reuses_its_offload_files(book, book_dir, tmp_path):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    _, ids, reference, _ = book
    config = AutoConfig.from_pretrained(book_dir)

    def empty():
        with init_empty_weights():
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()

    untied = empty()
    with pytest.raises(ValueError, match="tie_weights"):
        dispatch(untied, {"": "cpu"}, checkpoint=book_dir)
    device_map = layer_map(30, "dcd", ends="disk")
    model = empty()
    model.tie_weights()
    dispatch(model, device_map, checkpoint=book_dir, offload_folder=tmp_path, prefetch=True)
    with torch.inference_mode():
        torch.testing.assert_close(model(**ids).logits, reference, rtol=1e-5, atol=1e-5)
    undispatch(model)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    again = empty()
    again.tie_weights()
    dispatch(again, device_map, checkpoint=book_dir, offload_folder=tmp_path)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps  # reused, not rewritten
    with torch.inference_mode():
        torch.testing.assert_close(again(**ids).logits, reference, rtol=1e-5, atol=1e-5)
    undispatch(again)


# --------------------------------------------------------------------------- one error, before anything happens

def test_every_problem_in_one_error_before_anything_moves_or_is_written(tiny, tmp_path):
    model = tiny()
    reference = logits(model)
    (tmp_path / "offload").mkdir()
    save_file({"x": torch.ones(3)}, tmp_path / "offload" / "model.layers.1.safetensors")  # not ours
    bad = layer_map(4, "d", ends="disk")
    bad.update({"model.nope": "cpu", "lm_head": "cpu", "model.layers.0": 7, "model.layers.2": "meta"})
    del bad["model.rotary_emb"]
    with pytest.raises(ValueError) as caught:
        dispatch(model, bad, offload_folder=tmp_path / "offload", execution_device="floppy")
    message = str(caught.value)
    for words in [  # chapter 04's validate_device_map ...
        "names no module or tensor", "tied parameters ['lm_head.weight', 'model.embed_tokens.weight'] are on "
        "different devices ['cpu', 'disk']",
        # ... and dispatch's own
        "7 names a GPU this machine does not have", "'meta' is the meta device", "execution_device 'floppy'",
        "model.rotary_emb.inv_freq", "model.layers.1.safetensors exists and was not written by helpers",
    ]:
        assert words in message, (words, message)
    assert message.startswith("cannot dispatch LlamaForCausalLM:\ndevice_map has 2 problem(s):")
    assert "dispatch has 5 more problem(s):" in message
    assert [p.name for p in (tmp_path / "offload").iterdir()] == ["model.layers.1.safetensors"]
    assert untouched(model) and torch.equal(logits(model), reference)


def test_disk_without_offload_folder_and_meta_without_checkpoint_are_errors(tiny):
    with pytest.raises(ValueError, match="on 'disk' but offload_folder is None"):
        dispatch(tiny(), layer_map(4, "d"))
    with pytest.raises(ValueError, match=r"tensor\(s\) are on meta .* pass checkpoint="):
        dispatch(tiny(meta=True), layer_map(4, "c"))
    with pytest.raises(ValueError, match="names a tensor; dispatch hooks whole modules"):
        dispatch(tiny(), {**layer_map(4, "c"), "lm_head.weight": "cpu"})


def test_foreign_files_are_never_overwritten_or_deleted(tiny, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    save_file({"x": torch.ones(3)}, tmp_path / "lm_head.safetensors")  # the name dispatch wants, not ours
    foreign = (tmp_path / "lm_head.safetensors").read_bytes()
    with pytest.raises(ValueError, match="was not written by helpers"):
        dispatch(tiny(), layer_map(4, "d", ends="disk"), offload_folder=tmp_path)
    assert (tmp_path / "lm_head.safetensors").read_bytes() == foreign
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm_head.safetensors", "notes.txt"]
    (tmp_path / "lm_head.safetensors").unlink()
    model = tiny()
    dispatch(model, layer_map(4, "d", ends="disk"), offload_folder=tmp_path)
    undispatch(model)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_offload_files_are_atomic_and_memory_mappable(tiny, tmp_path, monkeypatch):
    model = tiny()
    expected = model.model.layers[2].mlp.up_proj.weight.detach().clone()

    def half_then_crash(path, *args, **kwargs):
        with tensorfiles.atomic_file(path) as tmp:
            tmp.write_bytes(b"half a file")
            raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(tensorfiles, "write_safetensors", half_then_crash)
        with pytest.raises(OSError, match="disk full"):
            dispatch(model, layer_map(4, "d"), offload_folder=tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither a half file nor a temporary one is left
    model = tiny()
    dispatch(model, layer_map(4, "d"), offload_folder=tmp_path)
    with safe_open(tmp_path / "model.layers.2.safetensors", framework="pt") as f:  # safetensors' own reader
        assert torch.equal(f.get_tensor("model.layers.2.mlp.up_proj.weight"), expected)
    assert drop_page_cache(tmp_path) == 4
    undispatch(model)


# --------------------------------------------------------------------------- the timeline, prefetching, state

@pytest.mark.parametrize("prefetch", [False, True])
def test_timeline_every_load_ends_before_its_compute_starts(tiny, tmp_path, prefetch):
    model, timeline = tiny(), []
    dispatch(model, layer_map(4, "d", ends="disk"), offload_folder=tmp_path, prefetch=prefetch, timeline=timeline)
    logits(model)
    undispatch(model)
    loads = {t["module"]: t for t in timeline if t["kind"] == "load"}
    computes = {t["module"]: t for t in timeline if t["kind"] == "compute"}
    offloaded = ["model.embed_tokens"] + [f"model.layers.{i}" for i in range(4)] + ["model.norm", "lm_head"]
    assert list(loads) == offloaded and set(computes) == set(offloaded) | {"model.rotary_emb"}
    assert all(loads[name]["end"] <= computes[name]["start"] for name in offloaded)  # weights there before use
    threads = {t["thread"] for t in loads.values()}
    assert all(t.startswith("prefetch") for t in threads) if prefetch else threads == {"MainThread"}
    assert {t["clock"] for t in timeline} == {"host"}  # on the CPU everything is host time


class Backwards(torch.nn.Module):
    """Registers its blocks 0, 1, 2, 3 and calls them 3, 2, 1, 0: registration order is not execution order."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        for block in reversed(self.blocks):
            x = torch.tanh(block(x))
        return x


def test_prefetch_follows_execution_order_not_registration_order(tmp_path):
    model, x = Backwards().eval(), torch.randn(2, 16)
    with torch.inference_mode():
        reference = model(x)
    timeline = []
    dispatch(model, {f"blocks.{i}": "disk" for i in range(4)}, offload_folder=tmp_path, prefetch=True,
             timeline=timeline)
    with torch.inference_mode():
        assert torch.equal(model(x), reference)  # the first pass learns the order (its guess was module order)
        timeline.clear()
        assert torch.equal(model(x), reference)
    loads = [t for t in timeline if t["kind"] == "load"]
    computes = {t["module"]: t for t in timeline if t["kind"] == "compute"}
    called = ["blocks.3", "blocks.2", "blocks.1", "blocks.0"]
    assert [t["module"] for t in loads] == called  # read ahead in the order the blocks run, each once
    assert all(t["thread"].startswith("prefetch") for t in loads)  # every load started ahead, none on demand
    assert all(t["end"] <= computes[t["module"]]["start"] for t in loads)
    assert sorted(computes, key=lambda name: computes[name]["start"]) == called
    undispatch(model)
    with torch.inference_mode():
        assert torch.equal(model(x), reference)


@pytest.mark.parametrize("prefetch", [False, True], ids=["load", "prefetch"])
def test_every_disk_read_matches_and_reuses_its_buffers(tiny, tmp_path, prefetch):
    reference = logits(tiny())
    for disk_read in ("map", "buffered", "direct"):
        model, timeline = tiny(), []
        dispatch(model, layer_map(4, "d", ends="disk"), offload_folder=tmp_path / disk_read, prefetch=prefetch,
                 timeline=timeline, disk_read=disk_read)
        assert torch.equal(logits(model), reference)
        assert torch.equal(logits(model), reference)  # the second pass reads into the first pass's buffers
        assert all(p.device.type == "meta" for p in model.parameters())
        undispatch(model)
        assert untouched(model) and torch.equal(logits(model), reference)


def test_disk_read_must_be_a_reader_method_and_is_checked_first(tiny, tmp_path):
    model = tiny()
    with pytest.raises(ValueError, match=r"disk_read 'mmap' is not one of \('direct', 'buffered', 'map'\)"):
        dispatch(model, layer_map(4, "d", ends="disk"), offload_folder=tmp_path, disk_read="mmap")
    assert list(tmp_path.iterdir()) == [] and untouched(model)


def test_dispatch_twice_and_undispatch_unknown_are_errors(tiny, tmp_path):
    model = tiny()
    with pytest.raises(ValueError, match="not dispatched"):
        undispatch(model)
    dispatch(model, {"": "cpu"}, offload_folder=tmp_path)
    with pytest.raises(ValueError, match="already dispatched"):
        dispatch(model, {"": "cpu"})
    undispatch(model)
    assert list(tmp_path.iterdir()) == []  # offload_folder is written only for "disk" entries


@pytest.mark.cuda
def test_gpu_execution_with_pinned_cpu_and_disk_entries(tiny, tmp_path):
    model = tiny()
    reference = logits(model)
    device_map = {**layer_map(4, "dc", ends="cpu"), "model.layers.3": 0}
    dispatch(model, device_map, offload_folder=tmp_path, prefetch=True)
    assert model.model.layers[3].mlp.up_proj.weight.device == torch.device("cuda", 0)  # resident on GPU 0
    out = logits(model)
    assert out.device.type == "cpu"  # the output comes back to where the input was
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
    undispatch(model)


@pytest.mark.cuda
@pytest.mark.parametrize("where", ["cpu", "disk"])
@pytest.mark.parametrize("prefetch", [False, True], ids=["load", "prefetch"])
def test_cuda_cpu_and_disk_offload_match_the_in_memory_model(tiny, tmp_path, where, prefetch):
    in_memory = tiny().to("cuda")
    ids = IDS.to("cuda")
    reference = logits(in_memory, ids)
    model = tiny()
    device_map = layer_map(4, where[0], ends=where)
    dispatch(model, device_map, offload_folder=tmp_path, prefetch=prefetch, execution_device=0)
    for _ in range(2):  # the second pass prefetches in the order the first one recorded
        out = logits(model, ids)
        assert out.device.type == "cuda"  # the output comes back to where the input was
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert len(list(tmp_path.iterdir())) == (len(device_map) - 1 if where == "disk" else 0)  # rotary: buffers only
    undispatch(model)
    assert untouched(model)
    torch.testing.assert_close(logits(model.to("cuda"), ids), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("prefetch", [False, True], ids=["load", "prefetch"])
def test_cuda_timeline_times_compute_with_cuda_events(tiny, tmp_path, prefetch):
    model, timeline = tiny(), []
    dispatch(model, layer_map(4, "d", ends="disk"), offload_folder=tmp_path, prefetch=prefetch, execution_device=0,
             timeline=timeline)
    logits(model)
    timeline.clear()
    logits(model)
    undispatch(model)
    loads = {t["module"]: t for t in timeline if t["kind"] == "load"}
    computes = {t["module"]: t for t in timeline if t["kind"] == "compute"}
    assert {t["clock"] for t in computes.values()} == {"cuda events"}  # device time, not kernel launches
    assert {t["clock"] for t in loads.values()} == {"cuda events"}  # a load ends when its copy has run on the GPU
    assert set(computes) == set(loads) | {"model.rotary_emb"}
    assert all(0 <= t["end"] - t["start"] < 10 for t in computes.values())
    assert all(loads[name]["end"] <= computes[name]["start"] for name in loads)  # weights there before use


def test_a_tied_weight_is_kept_once_in_host_ram(tiny, tmp_path):
    """The embedding and the tied lm_head, both "cpu": one host copy of the table (pinned once on a GPU machine)."""
    model = tiny()
    p = materialise(plan(model, layer_map(4, "c"), offload_folder=tmp_path))
    entries = {e.name: e for e in p.entries}
    table = entries["model.embed_tokens"].host["model.embed_tokens.weight"]
    assert next(iter(entries["lm_head"].host.values())) is table


@pytest.mark.cuda
def test_cuda_a_tied_weight_is_pinned_once(tiny, tmp_path):
    model = tiny()
    p = materialise(plan(model, layer_map(4, "c"), offload_folder=tmp_path, execution_device=0))
    entries = {e.name: e for e in p.entries}
    table = entries["model.embed_tokens"].host["model.embed_tokens.weight"]
    assert table.is_pinned() and next(iter(entries["lm_head"].host.values())) is table
