"""Attention two ways: the textbook one that builds the whole score matrix, and FlashAttention's tiles.

Built in chapter 07 (flash attention).

Both functions take ``q`` of shape ``(batch, heads, seq_q, head_dim)`` and ``k``, ``v`` of shape
``(batch, kv_heads, seq_k, head_dim)``. ``heads`` must be a multiple of ``kv_heads``: with fewer
key/value heads than query heads (grouped-query attention, GQA; one KV head is multi-query
attention, MQA) query head ``h`` reads key/value head ``h // (heads // kv_heads)``, which is what
``torch.repeat_interleave`` and ``scaled_dot_product_attention(..., enable_gqa=True)`` do.

``causal=True`` means what it means in PyTorch's ``scaled_dot_product_attention(is_causal=True)``:
the mask is aligned to the *top left*, so query ``i`` sees keys ``0..i`` whatever ``seq_q`` and
``seq_k`` are. (The ``flash-attn`` package since 2.1 aligns it to the bottom right instead, which
is what a decoder with a KV cache wants; with ``seq_q == seq_k`` the two agree.)
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["naive_attention", "flash_attention", "score_matrix_bytes", "flash_attention_2_supported", "SDPA_SOURCE",
           "sdpa_backend"]


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int]:
    """Validate shapes before any work; return (batch, heads, kv_heads, seq_q, seq_k)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected 4 dimensions "
                             "(batch, heads, seq, head_dim)")
        if not t.is_floating_point():
            raise ValueError(f"{name} has dtype {t.dtype}; expected a floating-point dtype")
    batch, heads, seq_q, dim = q.shape
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k has shape {tuple(k.shape)} and v has shape {tuple(v.shape)}; expected the "
                         "same (batch, kv_heads, seq_k)")
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(f"q, k, v have batch sizes {batch}, {k.shape[0]}, {v.shape[0]}; expected equal")
    if k.shape[3] != dim:
        raise ValueError(f"q has head_dim {dim} and k has head_dim {k.shape[3]}; expected equal")
    kv_heads, seq_k = k.shape[1], k.shape[2]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"q has {heads} heads and k, v have {kv_heads}; the query heads must be a "
                         "positive multiple of the key/value heads")
    if min(batch, seq_q, seq_k, dim) == 0:
        raise ValueError(f"q has shape {tuple(q.shape)} and k has shape {tuple(k.shape)}; "
                         "batch, seq and head_dim must be at least 1")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share dtype and device; got {q.dtype}/{q.device}, "
                         f"{k.dtype}/{k.device}, {v.dtype}/{v.device}")
    return batch, heads, kv_heads, seq_q, seq_k


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """softmax(q kᵀ / √d) v with the full (seq_q × seq_k) score matrix in memory. Built in chapter 07."""
    batch, heads, kv_heads, seq_q, seq_k = _check(q, k, v)
    group = heads // kv_heads
    # (batch, kv_heads, group, seq_q, dim): each KV head serves `group` query heads, without copying k, v.
    qg = q.reshape(batch, kv_heads, group, seq_q, q.shape[-1])
    scores = (qg @ k.unsqueeze(2).transpose(-1, -2)) / math.sqrt(q.shape[-1])  # all seq_q × seq_k of them
    if causal:
        hidden = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device).triu(diagonal=1)
        scores = scores.masked_fill(hidden, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    out = weights @ v.unsqueeze(2)
    return out.reshape(batch, heads, seq_q, v.shape[-1])


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                    block_size: int = 128, accumulate_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """FlashAttention's tiled online softmax: at most block_size × block_size scores at a time. Built in chapter 07.

    The running max, sum and output accumulator are kept in ``accumulate_dtype``: by default float32 for
    float16/bfloat16 inputs, as FlashAttention's kernels do, and the input dtype when that is wider. Passing the
    input's own half dtype reproduces the accumulation in half precision that chapter 07 measures against it.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size {block_size!r} must be a positive int")
    if accumulate_dtype is not None and (not isinstance(accumulate_dtype, torch.dtype)
                                         or not accumulate_dtype.is_floating_point):
        raise ValueError(f"accumulate_dtype {accumulate_dtype!r} must be a floating-point torch.dtype or None")
    batch, heads, kv_heads, seq_q, seq_k = _check(q, k, v)
    acc_dtype = torch.promote_types(q.dtype, torch.float32) if accumulate_dtype is None else accumulate_dtype
    group, dim = heads // kv_heads, q.shape[-1]
    qg = q.reshape(batch, kv_heads, group, seq_q, dim)
    k, v = k.unsqueeze(2), v.unsqueeze(2)  # broadcast over the group, no copy
    out = torch.empty(batch, kv_heads, group, seq_q, v.shape[-1], dtype=q.dtype, device=q.device)
    scale = 1.0 / math.sqrt(dim)

    for q0 in range(0, seq_q, block_size):
        q1 = min(q0 + block_size, seq_q)
        # Tiles are widened to acc_dtype (a no-op when they already have it), as a tensor core multiplies
        # half-precision tiles into a float32 result.
        q_block = qg[..., q0:q1, :].to(acc_dtype) * scale
        shape = q_block.shape[:-1] + (1,)
        row_max = torch.full(shape, float("-inf"), dtype=acc_dtype, device=q.device)  # m: running max
        row_sum = torch.zeros(shape, dtype=acc_dtype, device=q.device)               # l: running denominator
        acc = torch.zeros(q_block.shape[:-1] + (v.shape[-1],), dtype=acc_dtype, device=q.device)
        # Causal: query q1-1 sees keys up to q1-1, so key blocks from q1 on are fully masked: skip them.
        k_stop = min(seq_k, q1) if causal else seq_k
        for k0 in range(0, k_stop, block_size):
            k1 = min(k0 + block_size, k_stop)
            scores = q_block @ k[..., k0:k1, :].to(acc_dtype).transpose(-1, -2)  # one tile: (q1-q0) × (k1-k0)
            if causal and k1 - 1 > q0:  # the tile crosses the diagonal: hide keys after each query
                rows = torch.arange(q0, q1, device=q.device)[:, None]
                cols = torch.arange(k0, k1, device=q.device)[None, :]
                scores = scores.masked_fill(cols > rows, float("-inf"))
            new_max = torch.maximum(row_max, scores.amax(dim=-1, keepdim=True))
            p = torch.exp(scores - new_max)
            correction = torch.exp(row_max - new_max)  # rescale what was summed under the old max
            row_sum = row_sum * correction + p.sum(dim=-1, keepdim=True)
            acc = acc * correction + p @ v[..., k0:k1, :].to(acc_dtype)
            row_max = new_max
        out[..., q0:q1, :] = acc / row_sum  # rounded to the input dtype once, at the end
    return out.reshape(batch, heads, seq_q, v.shape[-1])


def score_matrix_bytes(batch: int, heads: int, seq_q: int, seq_k: Optional[int] = None,
                       bytes_per_element: int = 4) -> int:
    """Bytes of the q kᵀ score matrix: batch × heads × seq_q × seq_k × bytes. Built in chapter 07."""
    seq_k = seq_q if seq_k is None else seq_k
    for name, value in (("batch", batch), ("heads", heads), ("seq_q", seq_q), ("seq_k", seq_k),
                        ("bytes_per_element", bytes_per_element)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} {value!r} must be an int >= 0")
    return batch * heads * seq_q * seq_k * bytes_per_element


def flash_attention_2_supported(capability: tuple[int, int]) -> bool:
    """Whether a GPU of CUDA compute capability ``(major, minor)`` has FlashAttention-2 kernels (sm_80+).
    Built in chapter 07."""
    if (not isinstance(capability, tuple) or len(capability) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in capability)):
        raise ValueError(f"capability {capability!r} must be a (major, minor) tuple of ints, "
                         "like torch.cuda.get_device_capability() returns")
    return capability >= (8, 0)  # Ampere (A100, sm_80) and newer; a T4 (Turing) is (7, 5)


# Where PyTorch picks an SDPA kernel on CUDA (select_sdp_backend, can_use_flash_attention and
# can_use_mem_efficient_attention) and the checks they share (check_batch_size_and_num_heads_dense).
SDPA_SOURCE = ("https://github.com/pytorch/pytorch/blob/v2.5.0/aten/src/ATen/native/transformers/cuda/sdp_utils.cpp",
               "https://github.com/pytorch/pytorch/blob/v2.13.0/aten/src/ATen/native/transformers/sdp_utils_cpp.h")


def sdpa_backend(capability: tuple[int, int], dtype: torch.dtype, *, gqa: bool, has_mask: bool,
                 head_dim: int = 64) -> str:
    """The kernel ``scaled_dot_product_attention`` runs on a CUDA GPU of ``capability``: "FLASH_ATTENTION",
    "EFFICIENT_ATTENTION" or "MATH" (``torch.nn.attention.SDPBackend``'s names). Built in chapter 07.

    ``gqa``: called with ``enable_gqa=True`` and fewer key/value heads than query heads; ``has_mask``: an
    ``attn_mask`` is passed. Inference on dense tensors, default settings, as ``select_sdp_backend`` in
    ``SDPA_SOURCE`` decides: flash first (no mask, fp16/bf16, head_dim <= 256, sm80 to sm121; GQA accepted),
    then memory-efficient (sm50 and newer; fp16/fp32, and bf16 from sm80; head_dim a multiple of 8 for half
    inputs on tensor cores (sm70+), of 4 for fp32 from sm80; a mask accepted, but the same number of heads in
    q, k and v: ``check_batch_size_and_num_heads_dense<false>``), then MATH, which writes out the fp32 score
    matrix. So on a T4 (7, 5) GQA without a mask (what transformers passes then) runs MATH, and the same call
    with the key/value heads repeated and a mask runs memory-efficient. Checked against torch 2.13's own
    ``sdp_utils_cpp.h`` (the two-parameter template) and ``Context.h`` (flash, efficient, math, cuDNN); PyTorch's
    main branch added GQA to the memory-efficient kernel in July 2026 (pull request 191085), after 2.13. Not
    modelled: cuDNN, which torch puts first only on sm90/sm100 with cuDNN newer than 9.15.
    """
    flash_capable = flash_attention_2_supported(capability) and capability <= (12, 1)  # checks capability
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype {dtype!r} must be a floating-point torch.dtype")
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"head_dim {head_dim!r} must be a positive int")
    for name, flag in (("gqa", gqa), ("has_mask", has_mask)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} {flag!r} must be a bool")
    half = dtype in (torch.float16, torch.bfloat16)
    if flash_capable and not has_mask and half and head_dim <= 256:
        return "FLASH_ATTENTION"
    if not (5, 0) <= capability <= (12, 1):
        return "MATH"
    tensor_cores = capability >= (8, 0) or (capability >= (7, 0) and half)
    alignment = 8 if tensor_cores and half else 4 if tensor_cores else 1
    dtypes = (torch.float16, torch.float32) + ((torch.bfloat16,) if capability >= (8, 0) else ())
    if not gqa and dtype in dtypes and head_dim % alignment == 0:
        return "EFFICIENT_ATTENTION"
    return "MATH"
