"""Tests for the Llama adapter's attention path (helpers.streaming.llama, chapter 08): on a GPU older than sm80 a
GQA model gets its causal mask written out, so that SDPA can run the memory-efficient kernel instead of MATH."""

import pytest
import torch

from helpers.checkpoints import split_by_layer
from helpers.streaming import LayerStreamer
from helpers.streaming.llama import written_causal_mask

IDS = torch.tensor([[1, 5, 9, 77, 3, 100, 42, 8]])
PREFIX, SUFFIXES = torch.tensor([5, 17, 99, 3, 42, 8, 64]), [[7], [11, 12, 13], [100, 2]]


@pytest.mark.parametrize("device_type, capability, attn, gqa, expected", [
    ("cuda", (7, 5), "sdpa", True, True),     # a T4 with a GQA model: the mask is written out
    ("cuda", (7, 0), "sdpa", True, True),     # V100
    ("cuda", (8, 0), "sdpa", True, False),    # A100: flash takes enable_gqa without a mask
    ("cuda", (9, 0), "sdpa", True, False),
    ("cuda", (7, 5), "sdpa", False, False),   # no GQA: is_causal already reaches the memory-efficient kernel
    ("cuda", (7, 5), "eager", True, False),   # eager writes its masks out anyway
    ("cpu", None, "sdpa", True, False),       # the CPU keeps the is_causal path (outputs unchanged)
])
def test_written_causal_mask_only_for_gqa_sdpa_before_sm80(device_type, capability, attn, gqa, expected):
    assert written_causal_mask(device_type, capability, attn_implementation=attn, gqa=gqa) is expected


def test_written_causal_mask_names_bad_arguments():
    with pytest.raises(ValueError, match=r"capability '7.5'"):
        written_causal_mask("cuda", "7.5", attn_implementation="sdpa", gqa=True)
    with pytest.raises(ValueError, match="gqa 1"):
        written_causal_mask("cuda", (7, 5), attn_implementation="sdpa", gqa=1)


def sdpa_calls(monkeypatch) -> list[dict]:
    """Record, for every SDPA call transformers makes, whether it passed a mask and enable_gqa."""
    calls, real = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        calls.append({"mask": attn_mask is not None, "enable_gqa": kwargs.get("enable_gqa", False),
                      "heads": (q.shape[1], k.shape[1])})
        return real(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = tmp_path_factory.mktemp("gqa")
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)  # GQA: 2 per KV head
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).eval().save_pretrained(path / "model")
    return split_by_layer(path / "model", path / "layers", progress=False)


def test_a_written_mask_avoids_enable_gqa_and_changes_no_output(tiny_split, monkeypatch):
    with LayerStreamer(tiny_split, device="cpu", dtype="fp32", progress=False) as st:
        assert st.llama.written_mask is False  # the CPU: the default path, as before
        calls = sdpa_calls(monkeypatch)
        logits, scores = st.forward(IDS), st.score(PREFIX, SUFFIXES)
        generated = st.generate(IDS, max_new_tokens=3)
        assert any(c["enable_gqa"] and not c["mask"] for c in calls)  # what runs MATH on a T4
        calls.clear()
        st.llama.written_mask = True  # what written_causal_mask decides on a T4
        logits_w, scores_w = st.forward(IDS), st.score(PREFIX, SUFFIXES)
        generated_w = st.generate(IDS, max_new_tokens=3)
    assert calls and not any(c["enable_gqa"] for c in calls) and all(c["mask"] for c in calls)
    # prefill: the KV heads repeated for the memory-efficient kernel; decoding: the query heads folded
    assert {c["heads"] for c in calls} >= {(4, 4), (2, 2)}
    torch.testing.assert_close(logits_w, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores_w, scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(generated_w, generated)
