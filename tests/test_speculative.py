"""helpers.streaming.speculative (chapter 09): a draft proposes, one streamed pass verifies; the output is plain
greedy decoding's, token for token, whatever the draft; only the number of passes changes."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import quant
from helpers.streaming import LayerStreamer
from helpers.streaming.llama import Llama
from helpers.streaming.speculative import (
    SpeculationStats,
    check_draft,
    compressed_copy,
    footprint_bytes,
    truncated_copy,
)

PROMPTS = [torch.tensor([[5, 17, 99, 3, 42]]), torch.tensor([[1, 2, 3]]), torch.tensor([[77, 8, 8, 64, 12, 90, 31]])]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small random Llama saved as a checkpoint, and the model itself in fp32."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    path = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(path)
    return path, model


def contrarian(model):
    """A draft that always proposes the token after the target's choice: its head's rows rolled by one."""
    draft = copy.deepcopy(model)
    with torch.no_grad():
        draft.lm_head.weight.copy_(torch.roll(model.lm_head.weight, 1, dims=0))
    return draft


@pytest.mark.parametrize("draft_tokens", [1, 3, 6])
def test_greedy_output_is_plain_greedy_whatever_the_draft(tiny, draft_tokens):
    path, model = tiny
    with LayerStreamer(path, device="cpu", dtype="fp32", progress=False) as st:
        for ids in PROMPTS:
            plain = st.generate(ids, 12)
            for name, draft in {"itself": model, "contrarian": contrarian(model),
                                "int8": compressed_copy(model, quant.codec("int8"))}.items():
                passes = st.passes
                spec = st.generate(ids, 12, draft=draft, draft_tokens=draft_tokens)
                assert torch.equal(spec, plain), (name, draft_tokens)
                stats = st.speculation
                assert isinstance(stats, SpeculationStats) and stats.passes == st.passes - passes
                assert stats.new_tokens == 12 and len(stats.accepted) == stats.passes - 1


def test_a_draft_that_always_agrees_gives_draft_tokens_plus_one_per_pass(tiny):
    path, model = tiny
    with LayerStreamer(path, device="cpu", dtype="fp32", progress=False) as st:
        st.generate(PROMPTS[0], 16, draft=model, draft_tokens=4)  # the prefill's token, then 5 a pass
        assert st.speculation.accepted == [4, 4, 4] and st.speculation.passes == 4
        st.generate(PROMPTS[0], 16, draft=contrarian(model), draft_tokens=4)  # never agrees: 1 token a pass
        assert set(st.speculation.accepted) == {0} and st.speculation.passes == 16
        assert st.speculation.tokens_per_pass == 1.0


def test_eos_stops_where_plain_generation_stops(tiny):
    path, model = tiny
    with LayerStreamer(path, device="cpu", dtype="fp32", progress=False) as st:
        plain = st.generate(PROMPTS[2], 12)
        eos = int(plain[0, PROMPTS[2].shape[1] + 4])  # the fifth new token plays eos
        stopped = st.generate(PROMPTS[2], 12, eos_token_id=eos)
        assert torch.equal(st.generate(PROMPTS[2], 12, eos_token_id=eos, draft=model, draft_tokens=3), stopped)


def test_crop_forgets_every_position_after_the_length(tiny):
    path, model = tiny
    llama = Llama(path, device=torch.device("cpu"), dtype=torch.float32)
    cache = llama.new_cache()
    with torch.inference_mode():
        model(torch.arange(9)[None], **Llama.cache_argument(cache), use_cache=True)
    assert llama.cached_tokens(cache) == 9
    llama.crop(cache, 6)
    assert llama.cached_tokens(cache) == 6 and all(layer.keys.shape[-2] == 6 for layer in cache.layers)
    llama.crop(cache, 6)  # nothing to forget
    with pytest.raises(ValueError, match="cannot crop a cache of 6 positions to 7"):
        llama.crop(cache, 7)


def test_bad_drafts_are_refused_before_any_read(tiny, tiny_llama_config):
    from transformers import AutoModelForCausalLM, T5Config, T5ForConditionalGeneration

    path, model = tiny
    other_vocab = AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=100))
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=128, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                             d_kv=8))
    with LayerStreamer(path, device="cpu", dtype="fp32", progress=False) as st:
        st.run_pass = lambda *a, **k: pytest.fail("a block was read before the draft was checked")
        ids = PROMPTS[0]
        with pytest.raises(ValueError, match="draft's vocabulary has 100 tokens, the streamed model's 128"):
            st.generate(ids, 4, draft=other_vocab)
        with pytest.raises(ValueError, match="draft must be a transformers causal LM"):
            st.generate(ids, 4, draft=t5)
        with pytest.raises(ValueError, match="draft must be a transformers causal LM"):
            st.generate(ids, 4, draft="a draft")
        with pytest.raises(ValueError, match="draft_tokens 0 must be an int >= 1"):
            st.generate(ids, 4, draft=model, draft_tokens=0)
        with pytest.raises(ValueError, match="do_sample=True with a draft is not supported"):
            st.generate(ids, 4, draft=model, do_sample=True)
        with pytest.raises(ValueError, match="one sequence at a time; got a batch of 2"):
            st.generate(torch.cat([ids, ids]), 4, draft=model)
        with pytest.raises(ValueError, match="with padding"):
            st.generate(ids, 4, draft=model, attention_mask=torch.tensor([[0, 1, 1, 1, 1]]))
    check_draft(model, 128, 1)  # a good one passes


def test_passes_counts_every_streamed_pass(tiny):
    path, _ = tiny
    with LayerStreamer(path, device="cpu", dtype="fp32", progress=False) as st:
        assert st.passes == 0
        st.forward(PROMPTS[0])
        st.generate(PROMPTS[0], 3)  # prefill and two more
        st.score(PROMPTS[0][0], [[1, 2]])
        assert st.passes == 1 + 3 + 1


def test_drafts_a_reader_can_build_hold_what_they_say(tiny):
    _, model = tiny
    full = footprint_bytes(model)
    int8, nf4 = compressed_copy(model, quant.codec("int8")), compressed_copy(model, quant.codec("nf4"))
    assert footprint_bytes(nf4) < footprint_bytes(int8) < 0.5 * full  # the compressed bytes, really held
    linear = int8.model.layers[0].mlp.up_proj
    x = torch.randn(2, 64)
    reference = quant.quantize_int8(model.model.layers[0].mlp.up_proj.weight).dequantize()
    torch.testing.assert_close(linear(x), x @ reference.T)  # decoded at each call, exactly the codec's weight
    short = truncated_copy(model, 1)
    assert len(short.model.layers) == 1 and short.config.num_hidden_layers == 1 and len(model.model.layers) == 3
    with pytest.raises(ValueError, match=r"layers 4 must be an int in \[1, 3\]"):
        truncated_copy(model, 4)
