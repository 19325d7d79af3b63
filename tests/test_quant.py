"""helpers.quant (chapter 06) agrees with bitsandbytes and with helpers.arithmetic."""

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
