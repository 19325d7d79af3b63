"""Tests for helpers.streaming (chapter 08): streamed results equal the in-memory model's, and a streamer
cleans up after itself. (Reading the files, ``map_safetensors`` and friends, is tested in test_tensorfiles.py.)"""

import json
import sys
import threading

import pytest
import torch

from helpers.checkpoints import split_by_layer
from helpers.streaming import LayerStreamer, Role, llama_blocks, predicted_peak_bytes

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
    size = {b: (layer_dir / f).stat().st_size for b, f in index["files"].items()}
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
            fresh.bytes_per_pass


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
    before = reader_threads()
    with LayerStreamer(layer_dir, dtype=torch.float32, device="cpu", drop_page_cache=True, progress=False) as st:
        st.forward(IDS)
        assert len(reader_threads() - before) == 2  # its reader and its page dropper
    assert reader_threads() <= before  # both stopped
    assert st.source.closed and st.source.pinned_bytes == 0
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


@pytest.mark.cuda
def test_cuda_matches_cpu_and_frees_its_pinned_buffers(layer_dir, streamer):
    with LayerStreamer(layer_dir, dtype=torch.float32, device="cuda", progress=False) as st:
        logits = st.forward(IDS)
        assert st.source.pinned_bytes > 0  # the two read buffers
    assert st.source.pinned_bytes == 0
    torch.testing.assert_close(logits.cpu(), streamer.forward(IDS), rtol=1e-3, atol=1e-3)


def test_predicted_peak_counts_two_consecutive_blocks_and_embedding_rows(tiny_llama_config):
    from helpers.arithmetic import activation_bytes, block_bytes

    config = tiny_llama_config(num_key_value_heads=4, vocab_size=5000)
    blocks, act = block_bytes(config, "fp32"), activation_bytes(config, 2, 8, "fp32")
    layer, table = blocks["model.layers.0"], blocks["model.embed_tokens"]
    assert table > 2 * layer  # the tables are the biggest blocks, but a pass reads only 16 rows of the first
    assert predicted_peak_bytes(config, 2, 8, "fp32", prefetch=False) == table + act  # lm_head alone
    assert predicted_peak_bytes(config, 2, 8, "fp32") == blocks["model.norm"] + table + act  # norm, then lm_head
    tied = tiny_llama_config(num_key_value_heads=4, vocab_size=5000, tie_word_embeddings=True)
    assert predicted_peak_bytes(tied, 2, 8, "fp32") == predicted_peak_bytes(config, 2, 8, "fp32")
