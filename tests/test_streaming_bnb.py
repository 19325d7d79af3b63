"""Tests for helpers.streaming.bnb (chapter 08): a checkpoint transformers saved with bitsandbytes 4-bit or 8-bit
streams in place, decoded as bitsandbytes decodes it, and every other quantized format is refused before a weight is
read."""

import json
import math

import pytest
import torch

from helpers.arithmetic import activation_bytes, meta_model
from helpers.layout import block_layout, block_of
from helpers.streaming import LayerStreamer, predicted_peak_bytes
from helpers.streaming.bnb import BnB4bit, BnB8bit, check_quantization, dequantize_4bit, read_quant_states
from helpers.tensorfiles import CheckpointError, read_header

IDS = torch.tensor([[3, 17, 99, 5, 64, 120, 7, 42]])
# intermediate_size 320: 320 blocks of 64 per MLP weight, so double quant has two nested blocks, the last partial
CONFIG = dict(hidden_size=64, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)


def bnb_quantizes_on_cpu() -> bool:
    try:
        import bitsandbytes.functional as F

        F.quantize_4bit(torch.randn(128), quant_type="nf4")
        return True
    except Exception:  # not installed, or no CPU backend in this build
        return False


needs_bnb = pytest.mark.skipif(not bnb_quantizes_on_cpu(), reason="bitsandbytes cannot quantize on this CPU")


def quantize(base, out, quant_type="nf4", double_quant=False, **save) -> torch.Tensor:
    """``base`` loaded by transformers with bitsandbytes 4-bit on the CPU and saved to ``out``; its logits of IDS.

    The logits are those of bitsandbytes' exact path (``dequantize_4bit``, then the float product: what it runs on
    CUDA), so they are computed with autograd on: on a CPU with AVX512-BF16, a ``Linear4bit``'s first forward
    without grad repacks its weight for a fused kernel that keeps the absmaxes in bf16 (logits ~2e-3 away)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
                           bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=q, device_map="cpu").eval()
    model.save_pretrained(out, **save)
    with torch.enable_grad():
        return model(IDS).logits.detach().float()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from transformers import LlamaConfig

    from helpers.models import synthetic_llama

    return synthetic_llama(tmp_path_factory.mktemp("bnb") / "float", LlamaConfig(**CONFIG), dtype=torch.float32,
                           progress=False)


@pytest.fixture(scope="module")
def quantized(base, tmp_path_factory):
    """``{double_quant: (folder, the bnb-loaded model's logits)}``: nf4, sharded into several files."""
    out = {}
    for dq in (False, True):
        folder = tmp_path_factory.mktemp("bnb") / f"nf4-dq{int(dq)}"
        out[dq] = folder, quantize(base, folder, "nf4", dq, max_shard_size="40KB")
    return out


def stored(folder) -> dict:
    """Every tensor of a checkpoint folder, by name."""
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


@needs_bnb
@pytest.mark.parametrize("dq", [False, True], ids=["nf4", "nf4-double-quant"])
def test_streamed_logits_equal_the_bnb_loaded_model(quantized, dq):
    folder, expected = quantized[dq]
    assert len(list(folder.glob("model-*.safetensors"))) >= 3  # sharded, in place
    with LayerStreamer(folder, device="cpu", progress=False) as s:
        assert s.compression == "bnb-4bit"
        got = s.forward(IDS)
    assert torch.allclose(got, expected, rtol=0, atol=1e-5), (got - expected).abs().max()


@needs_bnb
@pytest.mark.parametrize("dq", [False, True], ids=["nf4", "nf4-double-quant"])
def test_each_weight_decodes_as_bitsandbytes_does(quantized, dq):
    import bitsandbytes.functional as F

    folder, _ = quantized[dq]
    tensors, codec = stored(folder), BnB4bit()
    weights = [k[:-len(".quant_state.bitsandbytes__nf4")] for k in tensors if k.endswith("bitsandbytes__nf4")]
    assert len(weights) == 2 * 7  # q, k, v, o, gate, up, down per layer; not lm_head (transformers leaves it)
    decoded = codec.decompress(tensors, torch.float32)
    assert not any(k.endswith(("absmax", "quant_map", "bitsandbytes__nf4")) for k in decoded)
    for w in weights:
        parts = {k[len(w) + 1:]: v for k, v in tensors.items() if k.startswith(w + ".")}
        expected = F.dequantize_4bit(tensors[w], F.QuantState.from_dict(parts, torch.device("cpu")))
        assert torch.equal(decoded[w], expected), w


@needs_bnb
@pytest.mark.parametrize("shape,quant_type,dq,blocksize", [
    ((37, 45), "nf4", True, 64),     # odd count: the last byte's low nibble is padding; partial last block
    ((300, 64), "fp4", True, 64),    # 300 blocks: two nested blocks; fp4's codes are not sorted levels
    ((48, 128), "fp4", False, 128),
    ((64, 96), "nf4", False, 32),
])
def test_dequantize_4bit_equals_bitsandbytes(shape, quant_type, dq, blocksize):
    """(Rows of whole blocks, or an odd row: bitsandbytes' CPU kernel mis-decodes an even row that is not whole
    blocks, such as (128, 48) in blocks of 64, where its own torch fallback agrees with ``dequantize_4bit``.)"""
    import bitsandbytes.functional as F

    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    packed, qs = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=dq)
    with torch.compiler.set_stance("force_eager"):  # an odd row takes bitsandbytes' torch path: not compiled here
        expected = F.dequantize_4bit(packed, qs)
    saved = {f"x.weight.{k}": v for k, v in qs.as_dict(packed=True).items()}
    for dtype in (torch.float32, torch.bfloat16):
        got = BnB4bit().decompress({"x.weight": packed, **saved, "x.bias": w[0]}, dtype)
        assert set(got) == {"x.weight", "x.bias"}
        assert torch.equal(got["x.weight"], expected.to(dtype))
    state = json.loads(bytes(saved[f"x.weight.quant_state.bitsandbytes__{quant_type}"].tolist()))
    small = dequantize_4bit({"weight": packed, **{k: v for k, v in qs.as_dict().items() if torch.is_tensor(v)}},
                            {**state, "shape": list(shape)}, chunk=blocksize)  # one block at a time
    assert torch.equal(small, expected)


@needs_bnb
def test_single_file_fp4_double_quant(base, tmp_path):
    expected = quantize(base, tmp_path / "fp4", "fp4", True)
    assert (tmp_path / "fp4" / "model.safetensors").is_file()
    with LayerStreamer(tmp_path / "fp4", device="cpu", progress=False) as s:
        assert torch.allclose(s.forward(IDS), expected, rtol=0, atol=1e-5)


@needs_bnb
def test_quant_state_lies_in_its_layer_and_is_counted(base, quantized):
    folder, _ = quantized[True]
    layout, plain = block_layout(folder), block_layout(base)
    assert layout.blocks == plain.blocks  # lm_head, embeddings and norms stay blocks of their own
    layer = {n for p in layout.pieces["model.layers.1"] for n in p.tensors}
    assert "mlp.down_proj.weight.quant_state.bitsandbytes__nf4" in layer and "mlp.up_proj.weight.nested_absmax" in layer
    data = sum(read_header(f).data_bytes for f in folder.glob("*.safetensors"))
    assert sum(layout.bytes(b) for b in layout.blocks) == data  # every stored byte, in exactly one block
    assert layout.bytes("model.layers.0") < plain.bytes("model.layers.0") / 5  # 4-bit codes, not floats
    states = read_quant_states(layout)
    assert len(states) == 14 and states["model.layers.0.mlp.up_proj.weight"]["shape"] == [320, 64]

    with LayerStreamer(folder, device="cpu", progress=False) as s:
        s.forward(IDS)
        assert {r["block"]: r["bytes"] for r in s.timeline}["model.layers.1"] == layout.bytes("model.layers.1")
        # what the codec says transformers stores agrees with the files, to the JSON's few bytes per weight
        codec = BnB4bit(s.config.quantization_config)
        specs = [(n, tuple(p.shape), torch.float32) for n, p in meta_model(s.config).named_parameters()]
    predicted = {}
    for name, shape, dtype in codec.specs(specs):
        predicted[block_of(name)] = predicted.get(block_of(name), 0) + torch.Size(shape).numel() * dtype.itemsize
    for block in layout.blocks:
        assert abs(predicted[block] - layout.bytes(block)) <= 7 * 4, block
    # mapped, one block at a time: the biggest block as stored (a layer's 4-bit parts, not its floats), plus the
    # decoded weights of one layer and the decoder's temporaries; the embedding is the rows looked up
    config, linear = s.config, max((shape for spec in specs if codec.quantized(*spec) for shape in [spec[1]]),
                                   key=math.prod)
    biggest = max(layout.bytes(b) for b in layout.blocks if b != "model.embed_tokens")
    decoded = sum(math.prod(shape) * 4 for name, shape, dtype in specs if codec.quantized(name, shape, dtype)
                  and name.startswith("model.layers.0."))
    expected = biggest + decoded + codec.temporary_bytes(linear, torch.float32) + activation_bytes(config, 1, 8, "fp32")
    peak = predicted_peak_bytes(config, 1, 8, torch.float32, codec=codec, read="map", prefetch=False)
    assert abs(peak - expected) <= 7 * 4


REFUSED = {
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128},
    "awq": {"quant_method": "awq", "bits": 4, "version": "gemm"},
    "bitsandbytes, neither 4- nor 8-bit": {"quant_method": "bitsandbytes", "load_in_4bit": False},
    "an unknown method": {"quant_method": "mystery-quant"},
    "a 4-bit type bnb has not": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "int4"},
}


@pytest.mark.parametrize("what", REFUSED)
def test_other_quantized_formats_are_refused_before_any_weight_is_read(tmp_path, what):
    config = {"model_type": "llama", **CONFIG, "quantization_config": REFUSED[what]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")  # reading it would fail otherwise
    with pytest.raises(ValueError) as error:
        LayerStreamer(tmp_path, device="cpu", progress=False)
    message = str(error.value)
    assert not isinstance(error.value, CheckpointError)  # not the unreadable file: nothing was read
    assert repr(REFUSED[what]["quant_method"]) in message  # the method, and what is supported
    assert "load_in_4bit: nf4 or fp4" in message and "double quant" in message and "load_in_8bit" in message
    assert {"a 4-bit type bnb has not": "'int4'"}.get(what, "") in message


def test_check_quantization_passes_plain_and_bnb_configs():
    assert check_quantization({"model_type": "llama"}) is None
    bnb = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}
    assert check_quantization({"quantization_config": bnb}) == bnb
    assert check_quantization({"quantization_config": {"load_in_4bit": True}}) is not None  # before quant_method
    eight = {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False}
    assert check_quantization({"quantization_config": eight}) == eight


# --------------------------------------------------------------------------- 8-bit

def bnb_int8_on_cpu() -> bool:
    try:
        import bitsandbytes.functional as F

        F.int8_vectorwise_quant(torch.randn(4, 64))
        return True
    except Exception:  # not installed, or no CPU backend in this build
        return False


needs_bnb8 = pytest.mark.skipif(not bnb_int8_on_cpu(), reason="bitsandbytes cannot quantize to int8 on this CPU")


@pytest.fixture(scope="module")
def quantized8(base, tmp_path_factory):
    """A checkpoint transformers saved with bitsandbytes 8-bit, sharded; the logits of ``base`` with every weight
    bitsandbytes quantized replaced by what its int8_vectorwise_dequant gives back; and bitsandbytes' own LLM.int8
    logits (activations rounded to int8 too)."""
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder = tmp_path_factory.mktemp("bnb") / "int8"
    q = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=q, dtype=torch.float32,
                                                 device_map="cpu").eval()
    model.save_pretrained(folder, max_shard_size="40KB")
    with torch.no_grad():
        int8_logits = model(IDS).logits.float()
    tensors = stored(folder)
    dequantized = {f"{k[:-4]}.weight": F.int8_vectorwise_dequant(tensors[f"{k[:-4]}.weight"], v)
                   for k, v in tensors.items() if k.endswith(".SCB")}
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    missing, unexpected = reference.load_state_dict(dequantized, strict=False)
    assert not unexpected and len(dequantized) == 2 * 7
    with torch.no_grad():
        return folder, reference(IDS).logits.float(), int8_logits


@needs_bnb8
def test_8bit_streams_in_place_as_the_weights_bitsandbytes_dequantizes(quantized8):
    folder, expected, int8_logits = quantized8
    assert len(list(folder.glob("model-*.safetensors"))) >= 3
    with LayerStreamer(folder, device="cpu", progress=False) as s:
        assert s.compression == "bnb-8bit"
        got = s.forward(IDS)
        read = {r["block"]: r["bytes"] for r in s.timeline}
    assert torch.allclose(got, expected, rtol=0, atol=1e-5), (got - expected).abs().max()
    # bitsandbytes' own product also rounds each token's activations to int8: close, not equal (0.8 % here)
    assert (got - int8_logits).abs().max() < 0.05 * int8_logits.abs().max()
    # a layer crosses as int8 plus one float32 scale per row, and the codec predicts the stored bytes exactly
    layout = block_layout(folder)
    specs = [(n, tuple(p.shape), torch.float32) for n, p in meta_model(s.config).named_parameters()]
    predicted = {}
    for name, shape, dtype in BnB8bit(s.config.quantization_config).specs(specs):
        predicted[block_of(name)] = predicted.get(block_of(name), 0) + math.prod(shape) * dtype.itemsize
    assert predicted == {b: layout.bytes(b) for b in layout.blocks}
    assert read["model.layers.1"] == layout.bytes("model.layers.1") < 0.3 * 4 * sum(
        math.prod(shape) for name, shape, _ in specs if name.startswith("model.layers.1."))


@needs_bnb8
def test_each_8bit_weight_decodes_as_bitsandbytes_does(quantized8):
    import bitsandbytes.functional as F

    folder, _, _ = quantized8
    tensors = stored(folder)
    decoded = BnB8bit().decompress(tensors, torch.float32)
    assert not any(k.endswith((".SCB", ".weight_format")) for k in decoded)
    weights = [k[:-4] + ".weight" for k in tensors if k.endswith(".SCB")]
    assert len(weights) == 2 * 7 and "lm_head.weight" not in weights  # transformers leaves lm_head in float
    for w in weights:
        assert torch.equal(decoded[w], F.int8_vectorwise_dequant(tensors[w], tensors[w[:-7] + ".SCB"])), w
    assert decoded["lm_head.weight"] is tensors["lm_head.weight"]


def test_8bit_layouts_other_than_row_and_partial_weights_are_refused():
    w, scb = torch.ones(4, 8, dtype=torch.int8), torch.ones(4)
    with pytest.raises(ValueError, match=r"x.weight_format is 2; .*'row' format \(0\)"):
        BnB8bit().decompress({"x.weight": w, "x.SCB": scb, "x.weight_format": torch.tensor(2, dtype=torch.uint8)},
                             torch.float32)
    with pytest.raises(ValueError, match=r"'x.SCB' has no int8 'x.weight' beside it"):
        BnB8bit().decompress({"x.weight": w.float(), "x.SCB": scb}, torch.float32)
    with pytest.raises(ValueError, match=r"dtype torch.int8 must be a floating-point"):
        BnB8bit().decompress({"x.weight": w, "x.SCB": scb}, torch.int8)
    out = BnB8bit().decompress({"x.weight": w, "x.SCB": scb, "x.weight_format": torch.tensor(0, dtype=torch.uint8)},
                               torch.bfloat16)
    assert set(out) == {"x.weight"} and out["x.weight"].dtype == torch.bfloat16
