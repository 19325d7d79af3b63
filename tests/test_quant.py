"""helpers.quant (chapter 06) agrees with bitsandbytes and with helpers.arithmetic."""

import bitsandbytes as bnb
import bitsandbytes.functional as F  # a requirement of the book: never skip this file for want of it
import pytest
import torch

from helpers import arithmetic
from helpers import quant as Q

SHAPES = [(1536, 576), (330, 78), (7,), (64, 256)]


def _weight(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * 0.02


def test_code_books_match_bitsandbytes():
    assert torch.allclose(Q.nf4_levels(), F.get_4bit_type("nf4", device="cpu"), atol=1e-7, rtol=0)
    assert torch.equal(Q.fp4_levels(), F.get_4bit_type("fp4", device="cpu").sort().values)
    assert torch.equal(Q.dynamic_map(), F.create_dynamic_map())
    levels = Q.nf4_levels()
    assert levels.numel() == 16 and levels[0] == -1 and levels[-1] == 1 and (levels == 0).sum() == 1


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_matches_bitsandbytes(shape, quant_type):
    w = _weight(shape)
    packed, state = F.quantize_4bit(w, quant_type=quant_type, blocksize=64)
    ours = Q.quantize_4bit(w, quant_type)
    ref = F.dequantize_4bit(packed, state)
    # NF4 levels computed here differ from bitsandbytes' table by at most 1 ulp
    assert torch.allclose(ours.dequantize(), ref, atol=1e-6 * w.abs().max().item(), rtol=0)
    assert torch.equal(ours.absmax, state.absmax)
    if quant_type == "nf4":  # NF4 codes index the sorted levels in both: the same bytes
        assert torch.equal(ours.packed, packed.view(-1))
    n_bytes = packed.numel() * packed.element_size() + state.absmax.numel() * 4
    assert ours.nbytes == n_bytes


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_matches_bitsandbytes_on_a_book_model_weight(book_model, quant_type):
    """A trained weight, outliers and all (layer 0's down projection), not a Gaussian."""
    w = book_model[0].model.layers[0].mlp.down_proj.weight.detach().clone()
    packed, state = F.quantize_4bit(w, quant_type=quant_type, blocksize=64)
    ours = Q.quantize_4bit(w, quant_type)
    assert torch.equal(ours.absmax, state.absmax)
    assert torch.allclose(ours.dequantize(), F.dequantize_4bit(packed, state), atol=1e-6 * w.abs().max().item(), rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_double_quant_matches_bitsandbytes(shape):
    w = _weight(shape, seed=1)
    packed, state = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    ours = Q.quantize_4bit(w, "nf4", double_quant=True)
    assert torch.allclose(ours.offset, state.offset)
    assert torch.equal(ours.nested_absmax, state.state2.absmax)
    # bitsandbytes' CPU kernel finds the 8-bit scale code by an approximate binary search, so a
    # few scales land one code away from the nearest one we pick; never further
    theirs = Q.Blockwise4bit(packed.view(-1), state.absmax, w.shape, w.dtype, "nf4", 64,
                             state.state2.absmax, state.offset)
    differ = ours.block_scales() != theirs.block_scales()
    step = (ours.absmax.int() - state.absmax.int()).abs()
    assert torch.all(step[differ] == 1) and differ.float().mean() < 0.01
    # decoding bitsandbytes' own codes with our dequantizer gives its weights exactly
    assert torch.allclose(theirs.dequantize(), F.dequantize_4bit(packed, state),
                          atol=1e-6 * w.abs().max().item(), rtol=0)
    n_bytes = packed.numel() + state.absmax.numel() + state.state2.absmax.numel() * 4 + 4
    assert ours.nbytes == n_bytes


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_int8_matches_bitsandbytes(dtype):
    w = _weight((384, 576)).to(dtype)
    w[3, 5] = 0.5  # an outlier weight: its row gets a coarser scale
    w[7] = 0  # an all-zero row must stay zero, not become NaN
    cb, scb, _ = F.int8_vectorwise_quant(w.half() if dtype == torch.bfloat16 else w)
    ours = Q.quantize_int8(w)
    if dtype != torch.bfloat16:
        assert torch.equal(ours.q, cb) and torch.equal(ours.absmax, scb)
    deq = ours.dequantize()
    assert deq.dtype == dtype and torch.all(deq[7] == 0)
    assert torch.allclose(deq.float(), F.int8_vectorwise_dequant(cb, scb), atol=1e-2 * 0.5 / 127 + 4e-3, rtol=0)
    # absmax rounding error is at most half a step of each row
    assert torch.all((deq.float() - w.float()).abs() <= ours.absmax.view(-1, 1) / 127 / 2 * 1.01 + 1e-3)


def test_int8_matmul_outliers():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 576, generator=g)
    x[:, 10] = 40.0  # one outlier feature, as LLM.int8 finds in large models
    w = Q.quantize_int8(_weight((64, 576)))
    exact = x.double() @ w.dequantize().double().T
    err_plain = (Q.int8_matmul(x, w).double() - exact).abs().max()
    err_split = (Q.int8_matmul(x, w, threshold=6.0).double() - exact).abs().max()
    assert err_split < err_plain / 5
    cols = F.int8_vectorwise_quant(x.half(), threshold=6.0)[2]
    assert cols.tolist() == [10]
    with pytest.raises(ValueError, match="threshold"):
        Q.int8_matmul(x, w, threshold=-1)


def test_bytes_per_param_agree_with_arithmetic():
    w = _weight((512, 2048))  # 16 nested blocks of 256 absmaxes: no partial blocks
    assert Q.quantize_4bit(w, "nf4").bytes_per_param == arithmetic.bytes_per_param("nf4")
    assert Q.quantize_4bit(w, "fp4").bytes_per_param == arithmetic.bytes_per_param("fp4")
    nested = Q.quantize_4bit(w, "nf4", double_quant=True)
    # the same, plus one fp32 offset per tensor
    assert nested.bytes_per_param == pytest.approx(arithmetic.bytes_per_param("nf4", double_quant=True) + 4 / w.numel())
    assert Q.quantize_int8(w).bytes_per_param == arithmetic.bytes_per_param("int8", row_size=w.shape[1])


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="quant_type"):
        Q.quantize_4bit(_weight((4, 64)), "int3")
    with pytest.raises(ValueError, match="blocksize"):
        Q.quantize_4bit(_weight((4, 64)), blocksize=63)
    with pytest.raises(ValueError, match="dimensions"):
        Q.quantize_int8(_weight((64,)))
    with pytest.raises(ValueError, match="floating-point"):
        Q.quantize_int8(torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="empty"):
        Q.quantize_4bit(torch.empty(0))


def test_blocks_round_trip_to_the_nearest_level():
    x, levels = _weight((100,)), Q.nf4_levels()
    codes, absmax = Q.quantize_blocks(x, 64, levels)
    assert codes.shape == (128,) and absmax.shape == (2,)  # padded to whole blocks
    back = Q.dequantize_blocks(codes, absmax, 64, levels)[:100]
    half_gap = (levels.diff().max() / 2) * absmax.repeat_interleave(64)[:100]
    assert ((back - x).abs() <= half_gap + 1e-7).all()


# --------------------------------------------------------------------------- bitsandbytes layers, CPU and CUDA

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _linear4bit(w, quant_type, device, double_quant=False):
    layer = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=torch.float16,
                              compress_statistics=double_quant, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=quant_type, compress_statistics=double_quant)
    return layer.to(device)  # bitsandbytes quantizes on the move to a device


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_linear4bit_layer_matches_helpers(device, quant_type):
    """bitsandbytes' Linear4bit (its CUDA kernels on a GPU) stores what quantize_4bit computes, and its
    output is the product with our dequantized weight, within fp16 rounding (1 % of the largest output)."""
    w = _weight((256, 512), seed=3).half()
    layer = _linear4bit(w, quant_type, device)
    ours = Q.quantize_4bit(w, quant_type)
    state = layer.weight.quant_state
    assert torch.equal(state.absmax.cpu(), ours.absmax)
    theirs = F.dequantize_4bit(layer.weight.data, state).float().cpu()
    # a weight exactly between two levels may round either way; nowhere else may they differ
    differ = (theirs - ours.dequantize().float()).abs() > 1e-6 * w.abs().max().item()
    assert differ.float().mean() < 1e-3
    if quant_type == "nf4":
        assert (layer.weight.data.view(-1).cpu() != ours.packed).float().mean() < 1e-3
    for tokens in (1, 8):  # batch 1 takes the inference kernel (gemv_4bit) on a GPU, more tokens the general one
        x = torch.randn(tokens, 512, generator=torch.Generator().manual_seed(tokens)).half()
        with torch.no_grad():
            y = layer(x.to(device)).float().cpu()
        ref = x.float() @ ours.dequantize().float().T
        assert (y - ref).abs().max() <= 1e-2 * ref.abs().max()


@pytest.mark.parametrize("device", DEVICES)
def test_linear8bitlt_layer_matches_helpers(device):
    """bitsandbytes' Linear8bitLt (LLM.int8, an int8 GEMM plus a 16-bit product for outlier columns) stores
    quantize_int8's codes and scales, and its output agrees with int8_matmul within 1 % of the largest output."""
    w = _weight((256, 512), seed=4).half()
    layer = bnb.nn.Linear8bitLt(512, 256, bias=False, has_fp16_weights=False, threshold=6.0)
    layer.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    layer = layer.to(device)
    ours = Q.quantize_int8(w)
    assert torch.equal(layer.weight.SCB.float().cpu(), ours.absmax)
    step = (layer.weight.CB.cpu().int() - ours.q.int()).abs()
    assert step.max() <= 1 and (step > 0).float().mean() < 1e-3  # a code may differ only where rounding ties
    x = torch.randn(8, 512, generator=torch.Generator().manual_seed(5)).half()
    x[:, 7] = 20.0  # an outlier feature: bitsandbytes and int8_matmul both take column 7 out of int8
    with torch.no_grad():
        y = layer(x.to(device)).float().cpu()
    ref = Q.int8_matmul(x.float(), ours, threshold=6.0)
    assert (y - ref).abs().max() <= 1e-2 * ref.abs().max()
    # the forward pass moved the row scales to layer.state; model_bytes still finds them
    assert Q.model_bytes(layer)["quant_state"] == 256 * 4


# --------------------------------------------------------------------------- footprint and quality measures

@pytest.mark.parametrize("double_quant", [False, True])
def test_model_bytes_counts_quant_state(double_quant):
    w = _weight((128, 256), seed=6)
    model = torch.nn.Sequential(_linear4bit(w, "nf4", "cpu", double_quant=double_quant), torch.nn.LayerNorm(128))
    sizes = Q.model_bytes(model)
    ours = Q.quantize_4bit(w, "nf4", double_quant=double_quant)
    state = model[0].weight.quant_state
    code_bytes = state.code.nbytes + (state.state2.code.nbytes if double_quant else 0)
    assert sizes["parameters"] == ours.packed.numel() + 2 * 128 * 4  # packed weight + LayerNorm weight and bias
    assert sizes["quant_state"] == ours.nbytes - ours.packed.numel() + code_bytes
    assert sizes["quant_state"] > 0 and sizes["buffers"] == 0
    with pytest.raises(TypeError, match="torch.nn.Module"):
        Q.model_bytes(w)


def test_model_bytes_counts_tied_weights_once():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    assert Q.model_bytes(model) == {"parameters": 10 * 4 * 4, "buffers": 0, "quant_state": 0}


def test_token_metrics():
    g = torch.Generator().manual_seed(7)
    ref = torch.randn(50, 32, generator=g)
    targets = torch.randint(0, 32, (50,), generator=g)
    same = Q.token_metrics(ref.clone(), ref, targets)
    assert torch.allclose(same["kl"], torch.zeros(50, dtype=torch.float64), atol=1e-12) and same["agree"].all()
    assert torch.allclose(same["nll"], torch.nn.functional.cross_entropy(ref.double(), targets, reduction="none"))
    noisy = Q.token_metrics(ref + torch.randn(50, 32, generator=g), ref, targets)
    assert (noisy["kl"] > 0).all() and 0 < noisy["agree"].mean() < 1
    with pytest.raises(ValueError, match="tokens, vocab"):
        Q.token_metrics(ref, ref[:, :10], targets)


def test_bootstrap_ci():
    g = torch.Generator().manual_seed(8)
    values = torch.randn(4096, generator=g) + 3.0
    mean, low, high = Q.bootstrap_ci(values)
    assert low < mean < high and low < 3.0 < high and high - low < 0.2
    # a block of identical values is one observation, not 64: the interval must widen
    runs = values[::64].repeat_interleave(64)
    _, low_r, high_r = Q.bootstrap_ci(runs)
    assert high_r - low_r > 3 * (high - low)
    with pytest.raises(ValueError, match="1-D tensor"):
        Q.bootstrap_ci(values[:100])
    with pytest.raises(ValueError, match="level"):
        Q.bootstrap_ci(values, level=1.5)


# --------------------------------------------------------------------------- compressed layer files (chapter 08)

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _tiny_llama_state(config, dtype=torch.bfloat16) -> dict:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return {k: v.to(dtype) for k, v in LlamaForCausalLM(config).state_dict().items()}


def _reference(w: torch.Tensor, compression: str) -> torch.Tensor:
    return (Q.quantize_int8(w) if compression == "int8" else Q.quantize_4bit(w, "nf4", blocksize=64)).dequantize()


@pytest.mark.parametrize("compression", ["int8", "nf4"])
def test_compress_state_follows_the_contract(tiny_llama_config, compression):
    state = _tiny_llama_state(tiny_llama_config())
    linear = {k for k in state if k == "lm_head.weight" or k.split(".")[-2] in LINEAR}
    assert len(linear) == 3 * 7 + 1  # every projection of 3 layers and the untied lm_head
    stored = Q.codec(compression).compress(state)
    for name, w in state.items():
        if name not in linear:  # embeddings and norms: the very same tensor
            assert stored[name] is w, name
            continue
        rows, cols = w.shape
        assert name not in stored
        if compression == "int8":
            assert stored[name + ".q"].dtype == torch.int8 and stored[name + ".q"].shape == (rows, cols)
        else:
            assert stored[name + ".packed"].dtype == torch.uint8 and stored[name + ".packed"].shape == (rows, cols // 2)
        absmax = stored[name + ".absmax"]
        assert absmax.dtype == torch.float32
        assert absmax.shape == ((rows,) if compression == "int8" else (rows * cols // 64,))
    assert len(stored) == len(state) + len(linear)
    specs = Q.codec(compression).specs([(k, tuple(t.shape), t.dtype) for k, t in state.items()])
    assert specs == [(k, tuple(t.shape), t.dtype) for k, t in stored.items()]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("compression", ["int8", "nf4"])
def test_decompress_state_is_the_dequantized_weight(tiny_llama_config, compression, dtype):
    state = _tiny_llama_state(tiny_llama_config(), dtype)
    back = Q.codec(compression).decompress(Q.codec(compression).compress(state), dtype)
    assert list(back) == list(state)  # names and order
    for name, w in state.items():
        assert back[name].dtype == dtype and back[name].shape == w.shape
        if name.endswith("_proj.weight") or name == "lm_head.weight":
            assert torch.equal(back[name], _reference(w, compression)), name
            assert not torch.equal(back[name], w), name  # it really went through 8 or 4 bits
        else:
            assert back[name] is w, name


def test_compressed_state_errors_name_the_problem(tiny_llama_config):
    state = _tiny_llama_state(tiny_llama_config())
    for bad in ("int4", "NF4", "", None):
        with pytest.raises(ValueError, match=rf"compression {bad!r}; expected one of None, 'int8', 'nf4'"):
            Q.codec(bad)
    odd = {"model.layers.0.mlp.up_proj.weight": _weight((64, 3))}  # 192 weights, but in_features is odd
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.up_proj.weight' of shape \(64, 3\)"):
        Q.codec("nf4").compress(odd)
    partial = {"lm_head.weight": _weight((10, 6))}  # 60 weights: not whole blocks of 64
    with pytest.raises(ValueError, match=r"'lm_head.weight' of shape \(10, 6\)"):
        Q.codec("nf4").compress(partial)
    assert Q.codec("int8").compress(odd)["model.layers.0.mlp.up_proj.weight.q"].shape == (64, 3)  # int8 has no blocks
    orphan = {"lm_head.weight.q": torch.zeros(4, 4, dtype=torch.int8)}
    with pytest.raises(ValueError, match="lm_head.weight.absmax"):
        Q.codec("int8").decompress(orphan, torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        Q.codec("int8").decompress(Q.codec("int8").compress(state), torch.int8)
    with pytest.raises(ValueError, match="stored as int8, not nf4"):
        Q.codec("nf4").decompress(Q.codec("int8").compress(state), torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("compression", ["int8", "nf4"])
def test_decompress_state_on_cuda(tiny_llama_config, compression):
    """After the host-to-device copy the streamer decompresses on the GPU: same weights, there."""
    stored = Q.codec(compression).compress(_tiny_llama_state(tiny_llama_config()))
    on_cpu = Q.codec(compression).decompress(stored, torch.float16)
    on_gpu = Q.codec(compression).decompress({k: t.cuda() for k, t in stored.items()}, torch.float16)
    assert list(on_gpu) == list(on_cpu)
    for name, t in on_gpu.items():
        assert t.device.type == "cuda" and t.dtype == torch.float16 and torch.equal(t.cpu(), on_cpu[name]), name


@pytest.fixture(scope="module")
def held_out_ids(book_model):
    from pathlib import Path

    import helpers

    text = (Path(helpers.__file__).parent / "data" / "eval_prose_typer.txt").read_text()
    return book_model[1](text, return_tensors="pt").input_ids[0, :512]


# Measured on the book model, first 512 tokens of eval_prose_typer.txt (511 scored):
# int8 agreement 0.973, mean KL 0.0024 nats; nf4 agreement 0.748, mean KL 0.264 nats.
QUALITY = {"int8": (0.95, 0.01), "nf4": (0.70, 0.5)}  # (least top-1 agreement, largest mean KL)


@pytest.mark.parametrize("compression", ["int8", "nf4"])
def test_compressed_book_model_quality(book_model, held_out_ids, compression):
    """The book model with its linear weights stored and rebuilt as a compressed split does (a tied lm_head is
    the embedding table: not compressed), against the fp32 original."""
    from helpers.models import load_book_model

    reference = book_model[0]
    tied = reference.config.tie_word_embeddings
    state = {k: v for k, v in reference.state_dict().items() if not (tied and k == "lm_head.weight")}
    model, _ = load_book_model()
    codec = Q.codec(compression)
    result = model.load_state_dict(codec.decompress(codec.compress(state), torch.float32), strict=False)
    assert result.unexpected_keys == [] and result.missing_keys == (["lm_head.weight"] if tied else [])
    ids = held_out_ids.unsqueeze(0)
    with torch.inference_mode():
        ref_logits, logits = reference(ids).logits[0, :-1], model(ids).logits[0, :-1]
    m = Q.token_metrics(logits, ref_logits, held_out_ids[1:])
    least_agreement, most_kl = QUALITY[compression]
    assert m["agree"].mean() >= least_agreement, m["agree"].mean()
    assert 1e-4 < m["kl"].mean() < most_kl, m["kl"].mean()  # above 0: the weights really changed


@pytest.mark.parametrize("compression", ["int8", "nf4"])
def test_a_codecs_linear_is_the_product_with_its_decoded_weight(compression):
    """Codec.linear: int8 scales the product's columns instead of the weight's rows (one pass fewer over the
    weight); the result is the decoded weight's product up to float rounding."""
    codec = Q.codec(compression)
    w, x, bias = _weight((128, 64)), torch.randn(5, 64), torch.randn(128)
    stored = codec.compress({"up_proj.weight": w})
    parts = [stored["up_proj.weight" + s] for s in codec.suffixes]
    expected = torch.nn.functional.linear(x, codec.decode(parts, torch.float32), bias)
    torch.testing.assert_close(codec.linear(x, parts, bias), expected, rtol=1e-5, atol=1e-5)


def test_model_bytes_counts_a_tensor_subclass_by_what_it_stores():
    """optimum-quanto's weights are tensor subclasses that report float32: model_bytes counts the int8 codes and
    the scales they hold (stored_tensors), not the dtype they report."""
    quanto = pytest.importorskip("optimum.quanto")
    from helpers.quant import model_bytes, stored_tensors

    plain = torch.ones(3)
    assert stored_tensors(plain) == [plain]
    model = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False))
    quanto.quantize(model, weights=quanto.qint8)
    quanto.freeze(model)
    weight = model[0].weight
    assert weight.dtype == torch.float32  # what it reports
    parts = stored_tensors(weight)
    assert sorted(str(p.dtype) for p in parts) == ["torch.float32", "torch.int8"]
    assert model_bytes(model)["parameters"] == 64 * 32 * 1 + 32 * 4  # int8 codes + one fp32 scale per output row
