"""Tests for helpers.streaming (chapter 08): streamed results equal the in-memory model's."""

import json

import pytest
import torch

from helpers.checkpoints import split_by_layer
from helpers.models import book_model_dir, load_book_model
from helpers.tensorfiles import drop_page_cache
from helpers.streaming import LayerStreamer, predicted_peak_bytes
from helpers.tensorfiles import map_safetensors


@pytest.fixture(scope="module")
def layer_dir(tmp_path_factory):
    return split_by_layer(book_model_dir(), tmp_path_factory.mktemp("split") / "layers", progress=False)


@pytest.fixture(scope="module")
def book():
    return load_book_model(dtype=torch.float32)


@pytest.fixture(scope="module")
def streamer(layer_dir):
    s = LayerStreamer(layer_dir, dtype=torch.float32, device="cpu", progress=False)
    yield s
    s.close()


def _batch(tokenizer, texts, side="right"):
    tokenizer.padding_side = side
    return tokenizer(texts, return_tensors="pt", padding=True)


@pytest.mark.parametrize("populate", [True, False], ids=["populated", "lazy"])
def test_map_safetensors_matches_safetensors(layer_dir, populate):
    from safetensors.torch import load_file

    path = layer_dir / "model.layers.0.safetensors"
    drop_page_cache(path)
    ours, nbytes = map_safetensors(path, populate=populate)
    theirs = load_file(path)
    assert nbytes == path.stat().st_size
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name


def test_mapped_tensors_are_copy_on_write(tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(4096, dtype=torch.float32)}, path)
    tensors, _ = map_safetensors(path)
    tensors["w"].zero_()  # writes to the private mapping only
    assert torch.equal(load_file(path)["w"], torch.arange(4096, dtype=torch.float32))


def test_map_safetensors_rejects_offsets_past_the_end(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(1024)}, path)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 16)
    with pytest.raises(ValueError, match="w.safetensors.*outside the file"):
        map_safetensors(path)


def test_forward_matches_in_memory_model(book, streamer):
    model, tok = book
    batch = _batch(tok, ["The capital of France is", "Once upon a time, there was a"])
    logits = streamer.forward(batch["input_ids"], batch["attention_mask"])
    with torch.inference_mode():
        ref = model(**batch).logits
    real = batch["attention_mask"].bool()
    assert logits.shape == ref.shape
    torch.testing.assert_close(logits[real], ref[real], rtol=1e-4, atol=1e-4)
    last = streamer.forward(batch["input_ids"][1:], last_only=True)
    torch.testing.assert_close(last[:, -1], ref[1:, -1], rtol=1e-4, atol=1e-4)


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
    ids = torch.tensor([[504, 3575, 282, 4649, 314]])
    off = LayerStreamer(layer_dir, dtype=torch.float32, device="cpu", prefetch=False, drop_page_cache=True,
                        progress=False)
    assert torch.equal(off.forward(ids), streamer.forward(ids))
    off.close()


def test_bytes_per_pass_needs_a_pass(layer_dir):
    fresh = LayerStreamer(layer_dir, device="cpu", progress=False)
    with pytest.raises(RuntimeError, match="no pass has run yet"):
        fresh.bytes_per_pass
    fresh.close()


def test_greedy_generation_identical(book, streamer):
    model, tok = book
    x = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        ref = model.generate(**x, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    out = streamer.generate(x["input_ids"], 8, eos_token_id=tok.eos_token_id)
    assert torch.equal(out, ref), (tok.decode(out[0]), tok.decode(ref[0]))
    assert "Paris" in tok.decode(out[0, x["input_ids"].shape[1]:])


def test_greedy_generation_left_padded_batch(book, streamer):
    model, tok = book
    batch = _batch(tok, ["The capital of France is", "Once upon a time, there was"], side="left")
    with torch.inference_mode():
        ref = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    out = streamer.generate(batch["input_ids"], 4, attention_mask=batch["attention_mask"])
    assert torch.equal(out, ref)


def test_sampling_is_seeded(streamer):
    ids = torch.tensor([[504, 3575, 282]])
    a = streamer.generate(ids, 2, do_sample=True, temperature=0.8, top_p=0.9, seed=1)
    b = streamer.generate(ids, 2, do_sample=True, temperature=0.8, top_p=0.9, seed=1)
    assert torch.equal(a, b) and a.shape == (1, 5)


def test_score_matches_separate_scoring(book, streamer):
    model, tok = book
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
    with pytest.raises(ValueError, match="dtype"):
        LayerStreamer(layer_dir, dtype=torch.int8)
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


def test_predicted_peak_counts_two_consecutive_blocks_and_embedding_rows():
    from transformers import LlamaConfig

    from helpers.arithmetic import activation_bytes, block_bytes

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                         num_hidden_layers=3, vocab_size=5000, tie_word_embeddings=False)
    blocks, act = block_bytes(config, "fp32"), activation_bytes(config, 2, 8, "fp32")
    layer, table = blocks["model.layers.0"], blocks["model.embed_tokens"]
    assert table > 2 * layer  # the tables are the biggest blocks, but a pass reads only 16 rows of the first
    assert predicted_peak_bytes(config, 2, 8, "fp32", prefetch=False) == table + act  # lm_head alone
    assert predicted_peak_bytes(config, 2, 8, "fp32") == blocks["model.norm"] + table + act  # norm, then lm_head
    tied = LlamaConfig(**{**config.to_dict(), "tie_word_embeddings": True})
    assert predicted_peak_bytes(tied, 2, 8, "fp32") == predicted_peak_bytes(config, 2, 8, "fp32")
