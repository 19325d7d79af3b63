"""Tests for helpers.streaming (chapter 08): streamed results equal the in-memory model's, and a streamer
cleans up after itself. (Reading the files, ``map_safetensors`` and friends, is tested in test_tensorfiles.py.)"""

import gc
import json
import math
import os
import subprocess
import sys
import threading

import pytest
import torch

from helpers.checkpoints import split_by_layer
from helpers.layout import read_layer_index
from helpers.reader import h2d_bandwidth
from helpers.streaming import BlockSource, LayerStreamer, Role, check_architecture, llama_blocks, predicted_peak_bytes
from helpers.tensorfiles import read_header

IDS = torch.tensor([[504, 3575, 282, 4649, 314]])


@pytest.fixture(scope="module")
def layer_dir(tmp_path_factory):
    from helpers.models import book_model_dir

    return split_by_layer(book_model_dir(), tmp_path_factory.mktemp("split") / "layers", progress=False)


@pytest.fixture(scope="module")
def streamer(layer_dir):
    with LayerStreamer(layer_dir, dtype=torch.float32, device="cpu", progress=False) as s:
        yield s


def reader_threads() -> set:
    """The streamers' threads alive now (readers and page droppers)."""
    return {t for t in threading.enumerate() if t.name.startswith(("layer-reader", "page-dropper"))}


def request_threads() -> set:
    """The block readers' request threads alive now (several reads in flight)."""
    return {t for t in threading.enumerate() if t.name.startswith("block-read")}


def mapped_files(directory) -> set:
    """The files under ``directory`` this process has memory-mapped now (Linux: /proc/self/maps)."""
    root = str(directory.resolve())
    with open("/proc/self/maps") as f:
        return {fields[5].strip() for fields in (line.split(maxsplit=5) for line in f)
                if len(fields) == 6 and fields[5].startswith(root)}


def boom(module, args, output):
    raise RuntimeError("boom")


def test_forward_matches_in_memory_model(book_model, streamer):
    model, tok = book_model
    batch = tok(["The capital of France is", "Once upon a time, there was a"], return_tensors="pt", padding=True,
                padding_side="right")
    logits = streamer.forward(batch["input_ids"], batch["attention_mask"])
    with torch.inference_mode():
        ref = model(**batch).logits
    real = batch["attention_mask"].bool()
    assert logits.shape == ref.shape
    torch.testing.assert_close(logits[real], ref[real], rtol=1e-4, atol=1e-4)
    last = streamer(batch["input_ids"][1:], last_only=True)
    torch.testing.assert_close(last[:, -1], ref[1:, -1], rtol=1e-4, atol=1e-4)


def test_blocks_know_their_roles(streamer, tiny_llama_config):
    n = streamer.config.num_hidden_layers
    assert [(b.role, b.layer) for b in streamer.blocks] == \
        [(Role.EMBED, None), *[(Role.LAYER, i) for i in range(n)], (Role.NORM, None), (Role.HEAD, None)]
    assert streamer.blocks[1].module is streamer.model.model.layers[0]

    from transformers import AutoModelForCausalLM, GPT2Config

    with torch.device("meta"):
        tiny = AutoModelForCausalLM.from_config(tiny_llama_config())
        gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2))
    names = ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2", "model.norm", "lm_head"]
    assert [b.name for b in llama_blocks(tiny, names)] == names
    with pytest.raises(ValueError, match="not a forward pass in order"):
        llama_blocks(tiny, [names[0], names[2], names[1], *names[3:]])
    with pytest.raises(ValueError, match="'model.rotary_emb' is none of"):
        llama_blocks(tiny, [*names, "model.rotary_emb"])
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not a Llama-family model"):
        llama_blocks(gpt2, names)


def test_run_pass_runs_any_step_over_every_block(book_model, streamer):
    model, _ = book_model
    seen, out = [], {}

    def step(block):  # a policy of its own: only the embedding's output
        seen.append((block.role, all(p.device.type == "cpu" for p in block.module.parameters())))
        if block.role is Role.EMBED:
            out["embedded"] = block.module(IDS).float()

    streamer.run_pass(step, IDS)
    assert seen == [(b.role, True) for b in streamer.blocks]  # in order, each with its weights loaded
    with torch.inference_mode():
        assert torch.equal(out["embedded"], model.model.embed_tokens(IDS))


def test_timeline_records_every_block(streamer, layer_dir):
    streamer.forward(torch.tensor([[1, 2, 3]]))
    index = json.loads((layer_dir / "layers.index.json").read_text())
    assert [r["block"] for r in streamer.timeline] == index["blocks"]
    assert sum(r["bytes"] for r in streamer.timeline) == streamer.bytes_per_pass
    # a pass reads each file's data (its header was read once, when the streamer was made)
    size = {b: read_header(layer_dir / f).data_bytes for b, f in index["files"].items()}
    read = {r["block"]: r["bytes"] for r in streamer.timeline}
    # the embedding reads only the pages of rows 1, 2 and 3 (adjacent rows: a few pages), every other file whole
    assert 0 < read["model.embed_tokens"] < 64 * 1024 < size["model.embed_tokens"]
    assert all(read[b] == size[b] for b in size if b != "model.embed_tokens")
    assert read["lm_head"] == size["model.embed_tokens"]  # tied: lm_head reads the whole shared table
    for r in streamer.timeline:
        assert 0 <= r["read_start"] <= r["read_end"] <= r["compute_start"] <= r["compute_end"]
    # all weights went back to meta: nothing but the rotary buffers stays resident
    assert all(p.device.type == "meta" for p in streamer.model.parameters())


def test_prefetch_on_and_off_identical(layer_dir, streamer):
    with LayerStreamer(layer_dir, dtype="fp32", device="cpu", prefetch=False, drop_page_cache=True,
                       progress=False) as off:
        assert off.dtype is torch.float32 and off.cold and not off.prefetch
        assert torch.equal(off.forward(IDS), streamer.forward(IDS))


def test_bytes_per_pass_needs_a_pass(layer_dir):
    with LayerStreamer(layer_dir, device="cpu", progress=False) as fresh:
        with pytest.raises(RuntimeError, match="no pass has run yet"):
            _ = fresh.bytes_per_pass


def test_greedy_generation_identical(book_model, streamer):
    model, tok = book_model
    x = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        ref = model.generate(**x, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    out = streamer.generate(x["input_ids"], 8, eos_token_id=tok.eos_token_id)
    assert torch.equal(out, ref), (tok.decode(out[0]), tok.decode(ref[0]))
    assert "Paris" in tok.decode(out[0, x["input_ids"].shape[1]:])


def test_greedy_generation_left_padded_batch(book_model, streamer):
    model, tok = book_model
    batch = tok(["The capital of France is", "Once upon a time, there was"], return_tensors="pt", padding=True,
                padding_side="left")
    with torch.inference_mode():
        ref = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    out = streamer.generate(batch["input_ids"], 4, attention_mask=batch["attention_mask"])
    assert torch.equal(out, ref)


def test_sampling_is_seeded(streamer):
    ids = torch.tensor([[504, 3575, 282]])
    a = streamer.generate(ids, 2, do_sample=True, temperature=0.8, top_p=0.9, seed=1)
    b = streamer.generate(ids, 2, do_sample=True, temperature=0.8, top_p=0.9, seed=1)
    assert torch.equal(a, b) and a.shape == (1, 5)


def test_score_matches_separate_scoring(book_model, streamer):
    model, tok = book_model
    prefix = tok("Question: what is the capital of France? Answer:", return_tensors="pt")["input_ids"][0]
    suffixes = [tok(s)["input_ids"] for s in [" Paris", " London, I think", " Berlin, of course it is"]]
    scores = streamer.score(prefix, suffixes)
    ref = []
    for s in suffixes:
        full = torch.cat([prefix, torch.tensor(s)])[None]
        with torch.inference_mode():
            logp = torch.log_softmax(model(full).logits[0].float(), -1)
        ref.append(sum(logp[len(prefix) - 1 + j, t] for j, t in enumerate(s)))
    torch.testing.assert_close(scores, torch.stack(ref), rtol=1e-4, atol=1e-3)
    assert int(scores.argmax()) == 0  # " Paris" is the likeliest answer


def test_bad_inputs_raise_clear_errors(tmp_path, layer_dir, streamer):
    with pytest.raises(FileNotFoundError, match="layers.index.json"):
        LayerStreamer(tmp_path)
    with pytest.raises(ValueError, match="dtype torch.int8 must be a floating-point dtype"):
        LayerStreamer(layer_dir, dtype=torch.int8)
    with pytest.raises(ValueError, match="dtype 'float33' is not a torch dtype"):
        LayerStreamer(layer_dir, dtype="float33")
    with pytest.raises(ValueError, match="input_ids"):
        streamer.forward(torch.tensor([[0.5, 1.0]]))
    with pytest.raises(ValueError, match="vocabulary"):
        streamer.forward(torch.tensor([[1, 10**7]]))
    with pytest.raises(ValueError, match="attention_mask"):
        streamer.forward(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match="max_new_tokens"):
        streamer.generate(torch.tensor([[1, 2]]), 0)
    with pytest.raises(ValueError, match="suffix_ids"):
        streamer.score(torch.tensor([1, 2]), [])
    with pytest.raises(ValueError, match="one sequence"):
        streamer.score(torch.tensor([[1, 2], [3, 4]]), [[5]])


# --------------------------------------------------------------------------- lifetime: with, close, errors

@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/maps (Linux)")
def test_with_block_stops_threads_and_frees_everything(layer_dir):
    before, requests_before = reader_threads(), request_threads()
    with LayerStreamer(layer_dir, dtype=torch.float32, device="cpu", drop_page_cache=True, progress=False) as st:
        st.forward(IDS)
        assert len(reader_threads() - before) == 2  # its reader and its page dropper
    assert reader_threads() <= before  # both stopped
    assert request_threads() <= requests_before  # and its request threads
    assert st.source.closed and st.source.pinned_bytes == 0 and st.source.reader.slot_bytes == 0
    assert not mapped_files(layer_dir)  # no block's file is still mapped
    with pytest.raises(RuntimeError, match="closed"):
        st.forward(IDS)
    st.close()  # a second close is harmless


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/maps (Linux)")
def test_an_error_mid_pass_leaves_nothing_behind(layer_dir):
    before = reader_threads()
    with LayerStreamer(layer_dir, device="cpu", progress=False) as st:  # stored dtype: weights are file pages
        reference = st.forward(IDS)
        hook = st.model.model.layers[1].register_forward_hook(boom)  # while block 2 is being prefetched
        with pytest.raises(RuntimeError, match="boom") as error:
            st.forward(IDS)
        assert all(p.device.type == "meta" for p in st.model.parameters())
        # neither the failed block's file nor the prefetched one's, even while the error and its traceback
        # live on (as a notebook keeps the last one)
        assert error.traceback and not mapped_files(layer_dir)
        hook.remove()
        assert torch.equal(st.forward(IDS), reference)  # and the streamer still works
    with pytest.raises(RuntimeError, match="boom"):  # an error that leaves the with block closes it too
        with LayerStreamer(layer_dir, device="cpu", progress=False) as st:
            st.model.model.layers[1].register_forward_hook(boom)
            st.forward(IDS)
    assert st.source.closed and reader_threads() <= before
    assert not mapped_files(layer_dir)


def test_predicted_peak_counts_two_consecutive_blocks_and_embedding_rows(tiny_llama_config):
    from helpers.arithmetic import activation_bytes, block_bytes

    config = tiny_llama_config(num_key_value_heads=4, vocab_size=5000)
    blocks, act = block_bytes(config, "fp32"), activation_bytes(config, 2, 8, "fp32")
    layer, table = blocks["model.layers.0"], blocks["model.embed_tokens"]
    assert table > 2 * layer  # the tables are the biggest blocks, but a pass reads only 16 rows of the first
    mapped = dict(read="map")  # mapped blocks: the file pages of the blocks held at once
    assert predicted_peak_bytes(config, 2, 8, "fp32", prefetch=False, **mapped) == table + act  # lm_head alone
    assert predicted_peak_bytes(config, 2, 8, "fp32", **mapped) == blocks["model.norm"] + table + act  # norm, lm_head
    tied = tiny_llama_config(num_key_value_heads=4, vocab_size=5000, tie_word_embeddings=True)
    assert predicted_peak_bytes(tied, 2, 8, "fp32", **mapped) == predicted_peak_bytes(config, 2, 8, "fp32", **mapped)
    # read into slots: two (one without prefetch), each as big as the largest block, and 16 rows of the table
    rows = 16 * table // config.vocab_size
    assert predicted_peak_bytes(config, 2, 8, "fp32", prefetch=False) == rows + table + act  # one slot
    assert predicted_peak_bytes(config, 2, 8, "fp32") == rows + 2 * table + act


# --------------------------------------------------------------------------- tiny synthetic models (no book model)

def write_split(path, config, dtype=torch.float32, seed=0):
    """A random model of ``config`` saved in ``dtype`` and split by layer; returns (model in fp32, layer dir)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    model.save_pretrained(path / "model")
    layers = split_by_layer(path / "model", path / "layers", progress=False)
    return model.float(), layers


def separate_scores(model, prefix, suffixes) -> torch.Tensor:
    """Each prefix + suffix through ``model`` on its own: the summed log-probability of the suffix."""
    out = []
    for s in suffixes:
        full = torch.cat([prefix, torch.tensor(s)])[None].to(model.device)
        with torch.inference_mode():
            logp = torch.log_softmax(model(full).logits[0].float(), -1).cpu()
        out.append(sum(logp[len(prefix) - 1 + j, t] for j, t in enumerate(s)))
    return torch.stack(out)


TINY_PREFIX = torch.tensor([5, 17, 99, 3, 42, 8, 64])
TINY_SUFFIXES = [[7], [11, 12, 13], [100, 2]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_score_prefix_is_causal_under_eager_and_sdpa(tmp_path, tiny_llama_config, attn):
    from transformers import AutoModelForCausalLM

    _, layers = write_split(tmp_path, tiny_llama_config())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32,
                                                 attn_implementation=attn).eval()
    with LayerStreamer(layers, device="cpu", dtype="fp32", progress=False, attn_implementation=attn) as st:
        assert st.model.config._attn_implementation == attn
        scores = st.score(TINY_PREFIX, TINY_SUFFIXES)
    assert scores.dtype is torch.float32 and scores.device.type == "cpu"
    # a bidirectional prefix (eager with no mask, as before) moves these far beyond the tolerance; equal means causal
    torch.testing.assert_close(scores, separate_scores(model, TINY_PREFIX, TINY_SUFFIXES), rtol=1e-5, atol=1e-5)


QUESTIONS = [(TINY_PREFIX, TINY_SUFFIXES), (torch.tensor([9, 8, 7]), [[1, 2], [3]]),
             (torch.tensor([4] * 12), [[5, 6, 7, 8], [9], [10, 11]])]


def test_score_many_equals_score_and_reads_each_block_once(tmp_path, tiny_llama_config):
    _, layers = write_split(tmp_path, tiny_llama_config())
    with LayerStreamer(layers, device="cpu", dtype="fp32", progress=False) as st:
        one_by_one, bytes_one = [], 0
        for prefix, suffixes in QUESTIONS:
            one_by_one.append(st.score(prefix, suffixes))
            bytes_one += st.bytes_per_pass
        passes = []
        run_pass = st.run_pass
        st.run_pass = lambda *a, **k: (passes.append(1), run_pass(*a, **k))[1]
        together = st.score_many(QUESTIONS)
        assert len(passes) == 1 and len(st.timeline) == len(st.blocks)  # every block read once for all three
        assert st.bytes_per_pass < bytes_one
        for got, want in zip(together, one_by_one):
            assert got.dtype is torch.float32 and got.device.type == "cpu"
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        # a cap on the activations carried between blocks splits the questions into passes, in order
        per_token = st.config.hidden_size * 4
        sizes = [(len(p) + sum(max(map(len, s)) for _ in s)) * per_token for p, s in QUESTIONS]
        passes.clear()
        assert sizes[0] + sizes[1] <= sizes[2] < sizes[1] + sizes[2]  # so: (0, 1) in one pass, then (2)
        capped = st.score_many(QUESTIONS, max_carried_bytes=sizes[2])
        assert len(passes) == 2
        for got, want in zip(capped, one_by_one):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_score_many_checks_every_question_before_reading(tmp_path, tiny_llama_config):
    _, layers = write_split(tmp_path, tiny_llama_config())
    with LayerStreamer(layers, device="cpu", dtype="fp32", progress=False) as st:
        st.run_pass = lambda *a, **k: pytest.fail("a block was read before the questions were checked")
        with pytest.raises(ValueError, match="non-empty list"):
            st.score_many([])
        with pytest.raises(ValueError, match=r"questions\[1\] must be a \(prefix_ids, suffix_ids\) pair"):
            st.score_many([QUESTIONS[0], TINY_PREFIX])
        with pytest.raises(ValueError, match=r"questions\[2\] suffix_ids\[0\] holds ids outside"):
            st.score_many([QUESTIONS[0], QUESTIONS[1], (TINY_PREFIX, [[10**6]])])
        with pytest.raises(ValueError, match=r"questions\[0\] alone carries \d+ bytes"):
            st.score_many(QUESTIONS, max_carried_bytes=16)


def test_resident_blocks_are_read_once_and_change_nothing(tmp_path, tiny_llama_config):
    model, layers = write_split(tmp_path, tiny_llama_config())
    ids = torch.tensor([[1, 5, 9, 77, 3, 100]])
    with torch.inference_mode():
        ref = model(ids).logits
    with LayerStreamer(layers, device="cpu", dtype="fp32", progress=False) as st:
        sizes = [sum(p.numel() for p in b.module.parameters()) * 4 for b in st.blocks]
        names = [b.name for b in st.blocks]
        st.forward(ids)
        full = st.bytes_per_pass
        read_full = {r["block"]: r["bytes"] for r in st.timeline}
    # the embedding and the first layer would fit in execution order; but on the CPU the embedding reads only its
    # looked-up rows, so keeping it saves almost nothing: the budget goes to blocks read whole, best saving first
    budget = sizes[0] + sizes[1]
    with LayerStreamer(layers, device="cpu", dtype="fp32", progress=False, resident_bytes=budget) as st:
        assert st.resident_blocks == []
        first = st.forward(ids)
        kept = st.resident_blocks
        assert kept == [names[1], "model.norm"]  # layer 0, then the norm in what is left; in execution order
        assert sum(sizes[names.index(n)] for n in kept) <= budget
        fetched = []
        fetch = st.source.fetch
        st.source.fetch = lambda i: (fetched.append(i), fetch(i))[1]
        second = st.forward(ids)
        assert fetched == [i for i, n in enumerate(names) if n not in kept]  # the others only, in order
        assert [r["resident"] for r in st.timeline] == [n in kept for n in names]
        assert st.bytes_per_pass == full - sum(read_full[n] for n in kept)
        torch.testing.assert_close(first, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(second, ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(st.generate(ids, 3), LayerStreamer(layers, device="cpu", dtype="fp32",
                                                             progress=False).generate(ids, 3))
    assert st.resident_blocks == []  # closing frees them
    with pytest.raises(ValueError, match="resident_bytes must be >= 0"):
        LayerStreamer(layers, resident_bytes=-1)
    with pytest.raises(ValueError, match="resident_bytes must be a byte count"):
        LayerStreamer(layers, resident_bytes=1.5)


def test_a_resident_budget_saves_reads_on_the_book_model(book_dir):
    """150 MB of the book model in fp32 kept resident: the second pass reads at most 0.85 of a full pass."""
    with LayerStreamer(book_dir, device="cpu", dtype="fp32", progress=False) as st:
        st.forward(IDS)
        full = st.bytes_per_pass
    with LayerStreamer(book_dir, device="cpu", dtype="fp32", progress=False, resident_bytes="150MB") as st:
        st.forward(IDS)
        st.forward(IDS)
        assert "model.embed_tokens" not in st.resident_blocks  # 113 MB held to save a few rows' pages: never
        assert st.bytes_per_pass <= 0.85 * full, (st.bytes_per_pass, full)


def family_configs():
    from transformers import MistralConfig, Qwen2Config

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)
    return {"mistral": MistralConfig(**small, sliding_window=None), "qwen2": Qwen2Config(**small)}


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_llama_family_runs_unchanged(tmp_path, model_type):
    config = family_configs()[model_type]
    model, layers = write_split(tmp_path, config)
    ids = torch.tensor([[1, 5, 9, 77, 3, 100]])
    with LayerStreamer(layers, device="cpu", dtype="fp32", progress=False) as st:
        assert st.config.model_type == model_type
        logits = st.forward(ids)
        scores = st.score(TINY_PREFIX, TINY_SUFFIXES)
    with torch.inference_mode():
        ref = model(ids).logits
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores, separate_scores(model, TINY_PREFIX, TINY_SUFFIXES), rtol=1e-5, atol=1e-5)


def test_sliding_window_is_checked_against_each_pass(tmp_path):
    from transformers import MistralConfig

    config = MistralConfig(**{**family_configs()["mistral"].to_diff_dict(), "sliding_window": 8})
    assert check_architecture(config) == 8
    model, layers = write_split(tmp_path, config)
    with LayerStreamer(layers, device="cpu", dtype="fp32", progress=False) as st:
        ids = torch.tensor([[1, 5, 9, 77, 3, 100]])  # 6 <= 8: full causal attention is the model's
        with torch.inference_mode():
            torch.testing.assert_close(st.forward(ids), model(ids).logits, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="sliding window of 8 of this mistral model"):
            st.forward(torch.arange(9)[None])
        with pytest.raises(ValueError, match="sliding window of 8"):
            st.generate(ids, 4)  # the pass for its 4th token covers 6 + 3 = 9 positions


def test_other_architectures_are_refused_before_any_weight_is_read(tmp_path, tiny_llama_config):
    from transformers import GemmaConfig

    _, layers = write_split(tmp_path / "llama", tiny_llama_config())
    fake = tmp_path / "gemma"
    fake.mkdir()
    (fake / "layers.index.json").write_text((layers / "layers.index.json").read_text())  # no weight file at all
    GemmaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=128).save_pretrained(fake)
    with pytest.raises(ValueError, match="model_type 'gemma' is not supported by LayerStreamer"):
        LayerStreamer(fake, device="cpu", progress=False)
    assert check_architecture(tiny_llama_config()) is None


def test_h2d_bandwidth_checks_its_arguments():
    with pytest.raises(ValueError, match="nbytes 0 must be an int >= 1"):
        h2d_bandwidth(0)
    with pytest.raises(ValueError, match="repeat 0 must be"):
        h2d_bandwidth(1024, repeat=0)
    with pytest.raises(ValueError, match="'cpu' is not a CUDA device"):
        h2d_bandwidth(1024, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without CUDA gives")
def test_cuda_paths_fail_clearly_without_cuda():
    with pytest.raises(ValueError, match=r"torch.cuda.is_available\(\) is False"):
        h2d_bandwidth(1024)
    proc = subprocess.run([sys.executable, "-m", "helpers.streaming_benchmark", "--device", "cuda", "--small"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--device cuda" in proc.stderr and "is_available() is False" in proc.stderr
    assert "measuring" not in proc.stdout  # it stopped before writing or measuring anything


# --------------------------------------------------------------------------- CUDA (synthetic tiny models only)

@pytest.fixture
def tiny_fp32(tmp_path, tiny_llama_config):
    return write_split(tmp_path, tiny_llama_config())


@pytest.mark.cuda
def test_cuda_logits_equal_cpu_fp32_and_free_pinned_buffers(tiny_fp32):
    _, layers = tiny_fp32
    ids = torch.tensor([[1, 5, 9, 77, 3, 100], [4, 4, 8, 15, 16, 23]])
    with LayerStreamer(layers, device="cpu", dtype="fp32", progress=False) as cpu:
        ref = cpu.forward(ids)
    with LayerStreamer(layers, device="cuda", dtype="fp32", progress=False) as st:
        logits = st.forward(ids)
        again = st.forward(ids)  # the pinned slots and their events are reused
        assert st.source.pinned_bytes > 0  # the two read buffers
        tl = st.timeline
    assert st.source.pinned_bytes == 0
    assert logits.device.type == "cpu" and logits.dtype is torch.float32  # the API: results on the CPU
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)  # fp32 on both, TF32 off (torch's default)
    assert torch.equal(logits, again)
    for r in tl:  # CUDA-event times: a block computes after its copy
        assert 0 <= r["read_start"] and r["read_end"] <= r["compute_start"] + 1e-4 <= r["compute_end"] + 1e-4


@pytest.mark.cuda
def test_cuda_bf16_files_computed_in_fp16_equal_cpu(tmp_path, tiny_llama_config):
    _, layers = write_split(tmp_path, tiny_llama_config(num_hidden_layers=6), dtype=torch.bfloat16)
    ids = torch.tensor([[1, 5, 9, 77, 3, 100]])
    with LayerStreamer(layers, device="cpu", dtype="fp32", progress=False) as cpu:
        ref = cpu.forward(ids)  # the same bf16 weights, exact in fp32
    with LayerStreamer(layers, device="cuda", dtype="fp16", progress=False) as st:
        assert st.config.dtype in ("bfloat16", torch.bfloat16) and st.dtype is torch.float16
        runs = [st.forward(ids) for _ in range(3)]  # converted on the copy stream, handed over by event
    for logits in runs:
        assert logits.dtype is torch.float32 and logits.device.type == "cpu"
        # fp16 keeps 11 significant bits: a few 1e-3 on logits of about 0.1-1
        torch.testing.assert_close(logits, ref, rtol=1e-2, atol=1e-2)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[1], runs[2])


@pytest.mark.cuda
def test_cuda_generate_equals_cpu(tiny_fp32):
    _, layers = tiny_fp32
    ids = torch.tensor([[1, 5, 9, 77, 3]])
    with LayerStreamer(layers, device="cpu", dtype="fp32", progress=False) as cpu:
        ref = cpu.generate(ids, 6)
    with LayerStreamer(layers, device="cuda", dtype="fp32", progress=False) as st:
        out = st.generate(ids, 6)
    assert out.device.type == "cpu" and out.dtype is torch.int64
    assert torch.equal(out, ref)


@pytest.mark.cuda
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cuda_score_equals_in_memory(tmp_path, tiny_llama_config, attn):
    from transformers import AutoModelForCausalLM

    _, layers = write_split(tmp_path, tiny_llama_config())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32,
                                                 attn_implementation=attn).eval()
    ref = separate_scores(model, TINY_PREFIX, TINY_SUFFIXES)
    with LayerStreamer(layers, device="cuda", dtype="fp32", progress=False, attn_implementation=attn) as st:
        scores = st.score(TINY_PREFIX, TINY_SUFFIXES)
    assert scores.device.type == "cpu" and scores.dtype is torch.float32
    torch.testing.assert_close(scores, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_cuda_h2d_bandwidth_pinned_and_pageable():
    nbytes = 64 * 2**20
    pinned = h2d_bandwidth(nbytes, pinned=True, repeat=5)
    pageable = h2d_bandwidth(nbytes, pinned=False, repeat=5)
    for bw in (pinned, pageable):
        assert math.isfinite(bw) and 1e8 < bw < 1e12  # between 0.1 GB/s and 1 TB/s: a PCIe or NVLink-C2C figure
    # the driver stages pageable memory through a pinned buffer, so pinned is at least about as fast
    assert pinned >= 0.8 * pageable, (pinned, pageable)


# --------------------------------------------------------------------------- in place: an ordinary checkpoint, no split

def listing(directory) -> dict:
    """Every file under ``directory``: its size and modification time (what writing anything there would change)."""
    return {p.relative_to(directory): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*"))}


def single_file_copy(checkpoint, out):
    """The same weights as one ``model.safetensors`` written by safetensors itself (its own tensor order)."""
    import shutil

    from safetensors.torch import load_file, save_file

    out.mkdir()
    tensors = {}
    for shard in sorted(checkpoint.glob("model-*.safetensors")):
        tensors.update(load_file(shard))
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    shutil.copyfile(checkpoint / "config.json", out / "config.json")
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_in_place_equals_split_and_in_memory(tmp_path, tiny_llama_config, tied):
    from transformers import AutoModelForCausalLM

    from helpers.layout import block_layout
    from helpers.models import synthetic_llama

    # shards of about 40 KB: a decoder layer (about 150 KB in fp32) straddles several of them
    checkpoint = synthetic_llama(tmp_path / "sharded", tiny_llama_config(tie_word_embeddings=tied),
                                 dtype=torch.float32, max_shard_size=40_000, progress=False)
    layout = block_layout(checkpoint)
    assert layout.kind == "checkpoint" and len({p.path for p in layout.pieces["model.layers.1"]}) > 2
    single = single_file_copy(checkpoint, tmp_path / "single")
    layers = split_by_layer(checkpoint, tmp_path / "layers", progress=False)
    before = {d: listing(d) for d in (checkpoint, single)}
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 77, 3, 100], [4, 4, 8, 15, 16, 23]])
    with torch.inference_mode():
        ref_logits = model(ids).logits
        ref_ids = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
    # what a pass reads: every tensor once (a tied lm_head: the table again), but the embedding's unused rows
    weights = sum(t.nbytes for k, t in model.state_dict().items() if k != "model.embed_tokens.weight")
    del model  # transformers maps the shards it loads: let go of them, so that what stays mapped is the streamer's
    gc.collect()
    runs = {}
    for name, source, cold in [("split", layers, False), ("sharded", checkpoint, True), ("single", single, False)]:
        with LayerStreamer(source, device="cpu", dtype="fp32", progress=False, drop_page_cache=cold) as st:
            assert [b.name for b in st.blocks] == read_layer_index(layers).blocks  # the split's names and order
            logits = st.forward(ids)
            runs[name] = dict(logits=logits, read={r["block"]: r["bytes"] for r in st.timeline},
                              ids=st.generate(ids[:1], 5))
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(runs[name]["ids"], ref_ids), name
    for name in ("sharded", "single"):
        assert torch.equal(runs[name]["logits"], runs["split"]["logits"]), name
        # every block reads exactly its tensors' bytes, as from the split (whose headers are read once, too) ...
        read, split = runs[name]["read"], runs["split"]["read"]
        assert {b: n for b, n in read.items() if b != "model.embed_tokens"} == \
               {b: n for b, n in split.items() if b != "model.embed_tokens"}, name
        # ... but the embedding, which reads the pages of the rows it looks up: at most the table's (plus one,
        # where the table does not start on a page boundary)
        assert 0 < read["model.embed_tokens"] <= 128 * 64 * 4 + 4096, name
    assert sum(n for b, n in runs["sharded"]["read"].items() if b != "model.embed_tokens") == weights
    assert {d: listing(d) for d in (checkpoint, single)} == before  # nothing written beside the checkpoint
    if sys.platform == "linux":
        assert not mapped_files(checkpoint) and not mapped_files(single)


def test_in_place_book_model_equals_its_split(book_model, book_dir, streamer):
    model, tok = book_model
    x = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                add_generation_prompt=True, return_tensors="pt", return_dict=True)
    before = listing(book_dir)
    with LayerStreamer(book_dir, dtype=torch.float32, device="cpu", progress=False) as st:
        assert st.source.layout.kind == "checkpoint" and st.blocks[-1].name == "lm_head"  # tied: the table again
        assert torch.equal(st.forward(IDS), streamer.forward(IDS))
        assert torch.equal(st.generate(x["input_ids"], 4), streamer.generate(x["input_ids"], 4))
    assert listing(book_dir) == before


def test_in_place_bad_checkpoints_fail_before_any_read(tmp_path, tiny_llama_config, monkeypatch):
    import shutil

    from helpers import tensorfiles
    from helpers.layout import INDEX
    from helpers.models import synthetic_llama
    from helpers.reader import BlockReader
    from helpers.tensorfiles import CheckpointError

    empty = tmp_path / "empty"
    empty.mkdir()
    for source in (LayerStreamer, lambda p: BlockSource(p, device="cpu", dtype=torch.float32)):
        with pytest.raises(FileNotFoundError,
                           match=rf"{empty} is neither .*layers.index.json.*{INDEX}.*model.safetensors"):
            source(empty)
    checkpoint = synthetic_llama(tmp_path / "ckpt", tiny_llama_config(), dtype=torch.float32, max_shard_size=40_000,
                                 progress=False)
    for reader in ("map_range", "read_range", "map_safetensors", "read_safetensors"):  # no tensor is read below
        monkeypatch.setattr(tensorfiles, reader, lambda *a, **k: pytest.fail("a tensor was read"))
    monkeypatch.setattr(BlockReader, "load", lambda *a, **k: pytest.fail("a block was read"))
    shards = json.loads((checkpoint / INDEX).read_text())["weight_map"]
    up, norm = shards["model.layers.1.mlp.up_proj.weight"], shards["model.norm.weight"]
    missing = tmp_path / "missing"
    shutil.copytree(checkpoint, missing)
    (missing / up).unlink()
    with pytest.raises(CheckpointError, match=rf"{up}: shard file is missing; the index maps 1 tensor"):
        LayerStreamer(missing, device="cpu", progress=False)
    truncated = tmp_path / "truncated"
    shutil.copytree(checkpoint, truncated)
    os.truncate(truncated / norm, (truncated / norm).stat().st_size - 1)  # the last tensor loses a byte
    with pytest.raises(CheckpointError, match=rf"{norm}: tensor 'model.norm.weight' .* do not fit"):
        LayerStreamer(truncated, device="cpu", progress=False)


# --------------------------------------------------------------------------- compressed splits (int8, nf4)

def compress_split(layers, out, compression):
    """A copy of a split whose linear weights are stored compressed (``helpers.quant.codec(compression)``), with
    ``compression`` in its index; built here, block by block, so that only the streamer's side is under test."""
    import shutil

    from safetensors.torch import load_file

    from helpers import quant
    from helpers.layout import LayerIndex
    from helpers.tensorfiles import save_safetensors

    index = read_layer_index(layers)
    out.mkdir()
    nbytes = {}
    for block, file in index.files.items():
        nbytes[block] = save_safetensors(out / file, quant.codec(compression).compress(load_file(layers / file)))
    shutil.copyfile(layers / "config.json", out / "config.json")
    LayerIndex(index.blocks, index.files, index.tied, nbytes, compression).write(out)
    return out


def dequantized_model(model, compression):
    """``model`` with every linear weight replaced by its int8 or nf4 round trip (chapter 06's codecs)."""
    import copy

    from helpers.quant import quantize_4bit, quantize_int8

    model = copy.deepcopy(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight
                q = quantize_int8(w) if compression == "int8" else quantize_4bit(w, "nf4", 64)
                module.weight.copy_(q.dequantize().reshape(w.shape))
    return model


@pytest.mark.parametrize("compression", ["int8", "nf4"])
def test_compressed_split_streams_its_decompressed_weights(tmp_path, tiny_llama_config, compression):
    model, layers = write_split(tmp_path, tiny_llama_config())
    packed = compress_split(layers, tmp_path / compression, compression)
    ref = dequantized_model(model, compression)
    ids = torch.tensor([[1, 5, 9, 77, 3, 100]])
    with torch.inference_mode():
        ref_logits = ref(ids).logits
    with LayerStreamer(layers, device="cpu", dtype="fp32", progress=False) as st:
        plain = st.forward(ids)
        plain_read = {r["block"]: r["bytes"] for r in st.timeline}
    with LayerStreamer(packed, device="cpu", dtype="fp32", progress=False, drop_page_cache=True) as st:
        assert st.compression == compression and plain.shape == (1, 6, 128)
        logits = st.forward(ids)
        read = {r["block"]: r["bytes"] for r in st.timeline}
        assert torch.equal(st.generate(ids, 3)[:, :6], ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, plain, atol=1e-6)  # the weights really were the compressed ones
    # what a pass reads is the compressed bytes: a layer's fp32 weights at 1 byte (int8) or half a byte (nf4) each
    index = read_layer_index(packed)
    assert {b: read[b] for b in index.files if b != "model.embed_tokens"} == \
           {b: n for b, n in index.bytes.items() if b != "model.embed_tokens"}
    ratio = read["model.layers.0"] / plain_read["model.layers.0"]
    assert (0.25 < ratio < 0.27) if compression == "int8" else (0.125 < ratio < 0.16), ratio
    assert read["model.embed_tokens"] == plain_read["model.embed_tokens"]  # the table is never compressed


def test_a_compressed_split_that_names_an_unknown_codec_is_refused(tmp_path, tiny_llama_config):
    from helpers.tensorfiles import CheckpointError

    _, layers = write_split(tmp_path, tiny_llama_config())
    raw = json.loads((layers / "layers.index.json").read_text())
    (layers / "layers.index.json").write_text(json.dumps({**raw, "compression": "int3"}))
    with pytest.raises(CheckpointError, match=r"compression 'int3'; expected one of None, 'int8', 'nf4'"):
        LayerStreamer(layers, device="cpu", progress=False)


@pytest.mark.cuda
def test_cuda_in_place_equals_split(tmp_path, tiny_llama_config):
    from helpers.models import synthetic_llama

    checkpoint = synthetic_llama(tmp_path / "sharded", tiny_llama_config(tie_word_embeddings=True),
                                 dtype=torch.float32, max_shard_size=40_000, progress=False)  # layers straddle shards
    layers = split_by_layer(checkpoint, tmp_path / "layers", progress=False)
    before = listing(checkpoint)
    ids = torch.tensor([[1, 5, 9, 77, 3, 100], [4, 4, 8, 15, 16, 23]])
    with LayerStreamer(layers, device="cpu", dtype="fp32", progress=False) as cpu:
        ref, ref_ids = cpu.forward(ids), cpu.generate(ids[:1], 5)
    with LayerStreamer(layers, device="cuda", dtype="fp32", progress=False) as st:
        split, split_bytes = st.forward(ids), st.bytes_per_pass
    with LayerStreamer(checkpoint, device="cuda", dtype="fp32", progress=False, drop_page_cache=True) as st:
        runs = [st.forward(ids) for _ in range(3)]  # the pinned slots (several ranges a block) and events reused
        assert st.source.pinned_bytes > 0 and st.bytes_per_pass == split_bytes  # the weights' bytes, both ways
        assert torch.equal(st.generate(ids[:1], 5), ref_ids)
    assert st.source.pinned_bytes == 0
    torch.testing.assert_close(runs[0], ref, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(r, split) for r in runs)  # the same kernels on the same weights
    assert listing(checkpoint) == before


@pytest.mark.cuda
@pytest.mark.parametrize("compression", ["int8", "nf4"])
def test_cuda_compressed_split_equals_cpu(tmp_path, tiny_llama_config, compression):
    _, layers = write_split(tmp_path, tiny_llama_config())
    packed = compress_split(layers, tmp_path / compression, compression)
    ids = torch.tensor([[1, 5, 9, 77, 3, 100]])
    with LayerStreamer(packed, device="cpu", dtype="fp32", progress=False) as cpu:
        ref = cpu.forward(ids)
    with LayerStreamer(packed, device="cuda", dtype="fp32", progress=False) as st:
        runs = [st.forward(ids) for _ in range(2)]  # decompressed on the copy stream, handed over by event
        read = {r["block"]: r["bytes"] for r in st.timeline}
    index = read_layer_index(packed)
    assert read == index.bytes  # the compressed bytes cross the bus (on CUDA the embedding table whole)
    torch.testing.assert_close(runs[0], ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(runs[0], runs[1])


def test_predicted_peak_counts_codec_temporaries(tiny_llama_config):
    from helpers import quant

    config = tiny_llama_config(num_key_value_heads=4)
    plain = predicted_peak_bytes(config, 1, 4, "fp32")
    for name in ("int8", "nf4"):
        codec = quant.codec(name)
        compressed = predicted_peak_bytes(config, 1, 4, "fp32", codec=codec)
        assert compressed > 0 and compressed != plain
        assert codec.temporary_bytes((128, 64), torch.float16) > 0
    assert quant.codec("int8").temporary_bytes((128, 64), torch.float32) == 0  # the float32 weight is the result
    assert quant.codec("nf4").temporary_bytes((4096, 4096), torch.float16) == quant.NF4Blocks.chunk * 12  # bounded


@pytest.mark.cuda
def test_cuda_a_pass_never_waits_for_the_whole_device_or_each_block(tiny_fp32, monkeypatch):
    """Events order the streams: no torch.cuda.synchronize in a pass, and the compute thread waits on one event,
    at the pass's end (the timeline's), not one per block; the reader's thread may wait for its own slots."""
    _, layers = tiny_fp32
    with LayerStreamer(layers, device="cuda", dtype="fp32", progress=False) as st:
        st.forward(IDS)  # warm up
        device_waits, main_waits = [], []
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: device_waits.append(1))
        real = torch.cuda.Event.synchronize

        def counted(event):
            if threading.current_thread() is threading.main_thread():
                main_waits.append(1)
            return real(event)

        monkeypatch.setattr(torch.cuda.Event, "synchronize", counted)
        st.forward(IDS)
    assert device_waits == [] and len(main_waits) == 1, main_waits


def test_the_engine_asks_for_the_next_block_before_it_computes_this_one():
    """Prefetch is the engine's order of calls: block i + 1 is fetched before block i computes, released after."""
    from concurrent.futures import Future

    from helpers.reader import Loaded
    from helpers.streaming import stream_pass

    events = []

    class Source:
        def fetch(self, i):
            events.append(("fetch", i))
            done = Future()
            done.set_result(Loaded(state={}, bytes=0, read_start=0.0, read_end=0.0))
            return done

        def release(self, i, loaded):
            events.append(("release", i))

        def cancel(self, pending):
            events.append(("cancel",))

    class Block:
        def __init__(self, i):
            self.i = i

        def attach(self, state):
            pass

        def detach(self):
            pass

    stream_pass([Block(i) for i in range(3)], Source(), lambda block: events.append(("step", block.i)))
    assert events == [("fetch", 0), ("fetch", 1), ("step", 0), ("release", 0), ("fetch", 2), ("step", 1),
                      ("release", 1), ("step", 2), ("release", 2)]
