"""Tests for helpers.attention (chapter 07): both attentions agree with PyTorch's SDPA."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.functional import scaled_dot_product_attention as sdpa
from torch.utils._python_dispatch import TorchDispatchMode

from helpers.attention import (
    SDPA_SOURCE,
    flash_attention,
    flash_attention_2_supported,
    naive_attention,
    score_matrix_bytes,
    sdpa_backend,
)


def _qkv(batch, heads, kv_heads, seq_q, seq_k, dim, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq_q, dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, kv_heads, seq_k, dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, kv_heads, seq_k, dim, generator=gen, dtype=dtype)
    return q, k, v


@st.composite
def attention_cases(draw):
    kv_heads = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 2, 3, 4]))  # query heads per KV head: 1 is MHA, more is GQA
    causal = draw(st.booleans())
    seq_q = draw(st.integers(1, 48))
    seq_k = draw(st.integers(1, 48))
    return dict(batch=draw(st.integers(1, 2)), heads=kv_heads * group, kv_heads=kv_heads, seq_q=seq_q,
                seq_k=seq_k, dim=draw(st.sampled_from([1, 4, 8, 16])), causal=causal,
                block_size=draw(st.integers(1, 64)), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=80, deadline=None)
@given(attention_cases())
def test_both_match_sdpa(case):
    causal, block_size = case.pop("causal"), case.pop("block_size")
    q, k, v = _qkv(**case)
    expected = sdpa(q, k, v, is_causal=causal, enable_gqa=True)
    # the same thing spelled without enable_gqa: repeat each KV head for its query heads
    group = case["heads"] // case["kv_heads"]
    repeated = sdpa(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), is_causal=causal)
    torch.testing.assert_close(repeated, expected)
    torch.testing.assert_close(naive_attention(q, k, v, causal=causal), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(flash_attention(q, k, v, causal=causal, block_size=block_size), expected,
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_float32_tolerance(causal):
    q, k, v = _qkv(1, 8, 2, 300, 300, 64, dtype=torch.float32)
    expected = sdpa(q, k, v, is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(flash_attention(q, k, v, causal=causal, block_size=64), expected,
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(naive_attention(q, k, v, causal=causal), expected, rtol=1e-4, atol=1e-5)


def _errors(out, reference):
    """(mean, max) absolute difference from a float64 reference."""
    diff = (out.double() - reference).abs()
    return diff.mean().item(), diff.max().item()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(dtype, causal, seed):
    q, k, v = _qkv(1, 4, 2, 256, 256, 64, seed=seed)  # float64: the reference is exact to ~1e-15
    reference = sdpa(q, k, v, is_causal=causal, enable_gqa=True)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    fp32 = flash_attention(q, k, v, causal=causal, block_size=16)
    assert fp32.dtype == dtype
    # the default widens the running max, sum and accumulator to float32, like FlashAttention
    torch.testing.assert_close(fp32, flash_attention(q, k, v, causal=causal, block_size=16,
                                                     accumulate_dtype=torch.float32), rtol=0, atol=0)
    same = _errors(flash_attention(q, k, v, causal=causal, block_size=16, accumulate_dtype=dtype), reference)
    wide = _errors(fp32, reference)
    ours = _errors(sdpa(q, k, v, is_causal=causal, enable_gqa=True), reference)
    # measured on the CPU (fp16 and bf16, seeds 0-2): accumulating in the input dtype makes the mean error
    # 2.0-2.6 times larger; float32 accumulation is as close to float64 as PyTorch's own SDPA in that dtype
    assert wide[0] < 0.75 * same[0], (wide, same)
    assert wide[0] <= 1.1 * ours[0] and wide[1] <= 1.25 * ours[1], (wide, ours)


def test_float64_stays_float64():
    q, k, v = _qkv(1, 2, 2, 40, 40, 8)
    reference = sdpa(q, k, v)
    torch.testing.assert_close(flash_attention(q, k, v, block_size=8), reference, rtol=1e-12, atol=1e-12)
    # a narrower accumulator is allowed, and it shows: float32 sums are not float64 sums
    narrow = flash_attention(q, k, v, block_size=8, accumulate_dtype=torch.float32)
    assert narrow.dtype == torch.float64 and not torch.equal(narrow, reference)
    torch.testing.assert_close(narrow, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_flash_attention_on_cuda_matches_sdpa(dtype, tolerance, causal):
    # float32: cuBLAS and SDPA's kernels both round in float32 (TF32 is off by default); float16: both
    # accumulate in float32 and round the output once, so they differ by about one float16 step (2^-10 relative)
    q, k, v = (t.to("cuda", dtype) for t in _qkv(1, 8, 2, 300, 300, 64, dtype=torch.float32))
    expected = sdpa(q, k, v, is_causal=causal, enable_gqa=True)
    out = flash_attention(q, k, v, causal=causal, block_size=64)
    assert out.device == q.device and out.dtype == dtype
    torch.testing.assert_close(out, expected, rtol=10 * tolerance, atol=tolerance)


def test_causal_is_aligned_top_left_like_sdpa():
    q, k, v = _qkv(1, 2, 2, 3, 8, 4)  # 3 queries, 8 keys
    out = flash_attention(q, k, v, causal=True, block_size=2)
    # top left: query 0 sees key 0 only, so its output is exactly v[0]
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0])
    torch.testing.assert_close(naive_attention(q, k, v, causal=True)[:, :, 0], v[:, :, 0])
    # and keys 3..7 are seen by nobody: changing them changes nothing
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 3:] += 5.0
    v2[:, :, 3:] -= 7.0
    torch.testing.assert_close(flash_attention(q, k2, v2, causal=True, block_size=2), out)
    # the bottom-right alignment (flash-attn >= 2.1, a KV-cached decoder) is a different mask
    from torch.nn.attention.bias import causal_lower_right
    bottom_right = sdpa(q, k, v, attn_mask=causal_lower_right(3, 8))
    assert not torch.allclose(bottom_right, out)


def test_gqa_query_head_reads_kv_head_h_over_group():
    q, k, v = _qkv(1, 6, 2, 5, 5, 4)  # group of 3: heads 0-2 read KV head 0, heads 3-5 read KV head 1
    out = flash_attention(q, k, v, block_size=2)
    torch.testing.assert_close(out[:, 3:6], naive_attention(q[:, 3:6], k[:, 1:2], v[:, 1:2]))
    assert not torch.allclose(out[:, 3:6], naive_attention(q[:, 3:6], k[:, 0:1], v[:, 0:1]))


class _LargestTensor(TorchDispatchMode):
    """Record the bytes of the largest tensor any operation creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.nbytes)
        return out


@pytest.mark.parametrize("causal", [False, True])
def test_flash_never_holds_more_than_a_block_of_scores(causal):
    batch, heads, seq, dim, block = 1, 4, 128, 4, 16
    q, k, v = _qkv(batch, heads, 2, seq, seq, dim, dtype=torch.float32)
    with _LargestTensor() as flash:
        flash_attention(q, k, v, causal=causal, block_size=block)
    with _LargestTensor() as naive:
        naive_attention(q, k, v, causal=causal)
    # measured: naive's largest tensor is the whole score matrix, 128 x 128 fp32 scores for each of 4 heads
    assert naive.largest == 4 * 128 * 128 * 4 == 262_144
    # flash's is its output, the size of q (128 x 4 per head): 32 times smaller; a 16 x 16 tile is smaller still
    assert flash.largest == q.nbytes == 8_192


@pytest.mark.parametrize("fn", [naive_attention, flash_attention])
@pytest.mark.parametrize("shapes, message", [
    (((2, 4, 8, 16), (2, 4, 8), (2, 4, 8, 16)), "k has shape"),
    (((2, 4, 8, 16), (2, 3, 8, 16), (2, 3, 8, 16)), "4 heads and k, v have 3"),
    (((2, 4, 8, 16), (2, 2, 8, 8), (2, 2, 8, 16)), "head_dim 16"),
    (((2, 4, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), "batch sizes 2, 1, 1"),
    (((2, 4, 8, 16), (2, 2, 8, 16), (2, 2, 9, 16)), "v has shape (2, 2, 9, 16)"),
    (((4, 8, 16), (2, 2, 8, 16), (2, 2, 8, 16)), "q has shape (4, 8, 16)"),
    (((1, 2, 0, 4), (1, 2, 3, 4), (1, 2, 3, 4)), "at least 1"),
])
def test_bad_shapes_are_named(fn, shapes, message):
    q, k, v = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fn(q, k, v)


def test_bad_dtype_and_block_size():
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="dtype torch.int64"):
        naive_attention(q.long(), q, q)
    with pytest.raises(ValueError, match="share dtype"):
        flash_attention(q, q.double(), q.double())
    for bad in (0, -3, 2.5, True, "64"):
        with pytest.raises(ValueError, match="block_size"):
            flash_attention(q, q, q, block_size=bad)
    for bad in (torch.int32, "float32", float):
        with pytest.raises(ValueError, match="accumulate_dtype"):
            flash_attention(q, q, q, accumulate_dtype=bad)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("batch, heads, kv_heads, seq_q, seq_k, dtype", [
    (1, 4, 2, 128, 128, torch.float32), (2, 3, 1, 5, 7, torch.bfloat16)])
def test_score_matrix_bytes_is_what_naive_attention_allocates(batch, heads, kv_heads, seq_q, seq_k, dtype, causal):
    q, k, v = _qkv(batch, heads, kv_heads, seq_q, seq_k, 4, dtype=dtype)
    with _LargestTensor() as naive:
        naive_attention(q, k, v, causal=causal)
    assert score_matrix_bytes(batch, heads, seq_q, seq_k, bytes_per_element=dtype.itemsize) == naive.largest


def test_score_matrix_bytes_by_hand():
    assert score_matrix_bytes(1, 4, 128) == 262_144  # seq_k defaults to seq_q
    assert score_matrix_bytes(1, 2, 16384) == 2 * 2**30  # 16k tokens, two heads, fp32: 2 GiB (chapter 07)
    with pytest.raises(ValueError, match="seq_q -1"):
        score_matrix_bytes(1, 1, -1)


def test_flash_attention_2_capability():
    assert not flash_attention_2_supported((7, 5))  # T4, Turing
    assert flash_attention_2_supported((8, 0))      # A100, Ampere
    assert flash_attention_2_supported((8, 6))
    assert flash_attention_2_supported((9, 0))      # H100, Hopper
    for bad in ("7.5", (7,), (7.0, 5), 75):
        with pytest.raises(ValueError, match="capability"):
            flash_attention_2_supported(bad)


F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


@pytest.mark.parametrize("capability, dtype, gqa, has_mask, head_dim, expected", [
    ((7, 5), F16, True, False, 64, "MATH"),                  # a T4, GQA as transformers passes it without a mask
    ((7, 5), F16, False, True, 64, "EFFICIENT_ATTENTION"),   # ... and with the KV heads repeated and a mask
    ((7, 5), F16, False, False, 64, "EFFICIENT_ATTENTION"),  # no flash before sm80
    ((7, 5), BF16, False, True, 64, "MATH"),                 # bf16 needs sm80 for the memory-efficient kernel
    ((7, 5), F32, False, False, 20, "EFFICIENT_ATTENTION"),  # fp32 before sm80: no tensor cores, no alignment
    ((7, 5), F16, False, False, 20, "MATH"),                 # half on tensor cores: head_dim a multiple of 8
    ((6, 0), F16, False, False, 20, "EFFICIENT_ATTENTION"),  # P100: no tensor cores
    ((8, 0), F16, True, False, 64, "FLASH_ATTENTION"),       # A100: flash takes enable_gqa
    ((8, 0), F16, True, True, 64, "MATH"),                   # ... but no mask, and efficient no GQA
    ((8, 0), BF16, False, True, 128, "EFFICIENT_ATTENTION"),
    ((8, 0), F32, False, False, 64, "EFFICIENT_ATTENTION"),  # flash is half precision only
    ((8, 0), F32, False, False, 6, "MATH"),                  # fp32 from sm80: head_dim a multiple of 4
    ((9, 0), BF16, False, False, 512, "EFFICIENT_ATTENTION"),  # flash stops at head_dim 256
    ((3, 7), F32, False, False, 64, "MATH"),                 # K80: below sm50, nothing fused
])
def test_sdpa_backend_follows_pytorchs_choice(capability, dtype, gqa, has_mask, head_dim, expected):
    assert sdpa_backend(capability, dtype, gqa=gqa, has_mask=has_mask, head_dim=head_dim) == expected


def test_sdpa_backend_names_bad_arguments():
    with pytest.raises(ValueError, match="capability"):
        sdpa_backend("7.5", F16, gqa=False, has_mask=False)
    with pytest.raises(ValueError, match="dtype torch.int8"):
        sdpa_backend((7, 5), torch.int8, gqa=False, has_mask=False)
    with pytest.raises(ValueError, match="head_dim 0"):
        sdpa_backend((7, 5), F16, gqa=False, has_mask=False, head_dim=0)
    with pytest.raises(ValueError, match="has_mask None"):
        sdpa_backend((7, 5), F16, gqa=False, has_mask=None)
    assert all(u.startswith("https://github.com/pytorch/pytorch/blob/v2.") for u in SDPA_SOURCE)


@pytest.mark.cuda
def test_cuda_the_streamers_attention_path_never_writes_out_the_score_matrix():
    """The call transformers makes for a GQA layer, with the mask the streamer's adapter decides on this GPU
    (``written_causal_mask``): its peak stays far below the fp32 score matrix the MATH kernel would write."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    from helpers.streaming.llama import written_causal_mask

    batch, heads, kv_heads, seq, dim = 1, 32, 8, 4096, 64
    capability = torch.cuda.get_device_capability()
    written = written_causal_mask("cuda", capability, attn_implementation="sdpa", gqa=True)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = heads // kv_heads, True
    gen = torch.Generator("cuda").manual_seed(0)
    q = torch.randn(batch, heads, seq, dim, device="cuda", dtype=F16, generator=gen)
    k, v = (torch.randn(batch, kv_heads, seq, dim, device="cuda", dtype=F16, generator=gen) for _ in range(2))
    mask = sdpa_mask(batch_size=batch, q_length=seq, kv_length=seq, allow_is_causal_skip=False,
                     device="cuda") if written else None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.inference_mode():
        out, _ = sdpa_attention_forward(module, q, k, v, mask)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    scores = score_matrix_bytes(batch, heads, seq)  # 2 GiB in fp32
    assert extra < scores / 8, (capability, written, extra)
    expected = sdpa_backend(capability, F16, gqa=not written, has_mask=written, head_dim=dim)
    assert expected != "MATH", (capability, expected)
    ref = torch.nn.functional.scaled_dot_product_attention(q[:, :2].float(), k[:, :1].float(), v[:, :1].float(),
                                                           is_causal=True)
    torch.testing.assert_close(out.transpose(1, 2)[:, :2].float(), ref, rtol=2e-3, atol=2e-3)
