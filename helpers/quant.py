"""Weight quantization from scratch: LLM.int8-style rows and block-wise NF4/FP4.

Built in chapter 06 (quantization). Each function re-implements what bitsandbytes does, in a few
readable lines, so the chapter can show *how* a weight becomes 8 or 4 bits; ``tests/test_quant.py``
checks that the dequantized weights agree with ``bitsandbytes.functional``.

* ``quantize_int8``: one absmax scale per output row, ``round(w * 127 / absmax)`` (LLM.int8's weights).
* ``int8_matmul``: the LLM.int8 product, with activation columns above ``threshold`` kept in float.
* ``quantize_4bit``: blocks of 64 weights, each scaled by its absmax onto 16 levels (NF4 or FP4),
  two 4-bit codes per byte, optionally with the block scales themselves quantized to 8 bits
  ("double quantization", QLoRA).
* ``model_bytes``: what a loaded (bitsandbytes) model really keeps, its ``quant_state`` included.
* ``token_metrics`` and ``bootstrap_ci``: quality against a reference model, per token, with a
  block-bootstrap confidence interval.

Built in chapter 08 (layer streaming): the codecs of compressed per-layer splits, a small registry (``CODECS``,
``codec("int8")``, ``codec("nf4")``) of ``Codec`` objects handed to ``split_by_layer(..., codec=...)``. A
streamer reads every byte of the model on every pass, so storing the linear weights in 8 or 4 bits cuts the bytes
read, as AirLLM and FlexGen do.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping, Optional, Sequence

import torch

from .arithmetic import BNB_4BIT_BLOCKSIZE, BNB_NESTED_BLOCKSIZE  # 64 weights per absmax; 256 absmaxes per scale

__all__ = ["nf4_levels", "fp4_levels", "dynamic_map", "RowwiseInt8", "quantize_int8", "int8_matmul",
           "quantize_blocks", "dequantize_blocks", "Blockwise4bit", "quantize_4bit", "model_bytes",
           "token_metrics", "bootstrap_ci", "is_linear_weight", "Codec", "Int8Rows", "NF4Blocks", "CODECS",
           "codec"]

NF4_OFFSET = 0.9677083  # the outermost quantile QLoRA uses (about 1.85 standard deviations)


# --------------------------------------------------------------------------- code books

def nf4_levels() -> torch.Tensor:
    """The 16 NormalFloat levels: quantiles of N(0, 1), scaled to [-1, 1], with an exact zero. Built in chapter 06."""
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    # bitsandbytes spaces the quantiles in float32, then evaluates them in double precision
    positive = normal.icdf(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].double())   # 8 levels above 0
    negative = -normal.icdf(torch.linspace(NF4_OFFSET, 0.5, 8)[:-1].double())  # 7 levels below 0
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (levels / levels.max()).float()


def fp4_levels() -> torch.Tensor:
    """The 16 values of bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit), sorted, in [-1, 1].
    Built in chapter 06."""
    magnitudes = torch.tensor([0.0, 0.0625, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]) / 12.0
    return torch.cat([-magnitudes, magnitudes]).sort().values  # 0 appears twice: +0 and -0


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" code (256 values in [-1, 1]) used for double quantization.
    Built in chapter 06."""
    values = [0.0, 1.0]
    for i in range(7):  # decades 1e-6 .. 1e0, each with twice the fraction steps of the one before
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2
        values += (10.0 ** (i - 6) * means).tolist() + (-(10.0 ** (i - 6)) * means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def _check_weight(w: torch.Tensor, ndim: Optional[int] = None) -> None:
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise ValueError(f"weight must be a floating-point torch.Tensor, got {type(w).__name__} "
                         f"{getattr(w, 'dtype', '')}")
    if ndim is not None and w.ndim != ndim:
        raise ValueError(f"weight must have {ndim} dimensions (out_features, in_features), got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise ValueError("weight is empty; nothing to quantize")


# --------------------------------------------------------------------------- int8, row-wise

@dataclass
class RowwiseInt8:
    """An int8 matrix and one float32 absmax per row (bitsandbytes calls them ``CB`` and ``SCB``).
    Built in chapter 06."""

    q: torch.Tensor       # int8, (out_features, in_features)
    absmax: torch.Tensor  # float32, (out_features,)
    dtype: torch.dtype

    def dequantize(self) -> torch.Tensor:
        """Back to floating point: ``q * absmax / 127``."""
        return (self.q * self.absmax.view(-1, 1) * (1 / 127)).to(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.absmax.numel() * self.absmax.element_size()

    @property
    def bytes_per_param(self) -> float:
        return self.nbytes / self.q.numel()


def quantize_int8(w: torch.Tensor) -> RowwiseInt8:
    """Absmax int8 quantization, one scale per row: ``round(w * 127 / max|row|)``. Built in chapter 06."""
    _check_weight(w, ndim=2)
    absmax = w.abs().amax(dim=1).float()
    scale = 127.0 / absmax.clamp(min=torch.finfo(torch.float32).tiny)  # an all-zero row stays zero
    q = torch.round(w.float() * scale.unsqueeze(1)).to(torch.int8)
    return RowwiseInt8(q=q, absmax=absmax, dtype=w.dtype)


def int8_matmul(x: torch.Tensor, w: RowwiseInt8, threshold: float = 0.0) -> torch.Tensor:
    """``x @ w.T`` the LLM.int8 way: int8 x int8 products, except that input columns holding any
    value with ``|x| >= threshold`` (outlier features) are multiplied in float. Built in chapter 06."""
    if threshold < 0:
        raise ValueError(f"threshold {threshold!r} must be >= 0 (0 disables the outlier path)")
    x2 = x.reshape(-1, x.shape[-1]).float()
    outliers = (x2.abs() >= threshold).any(dim=0) if threshold > 0 else torch.zeros(x2.shape[1], dtype=torch.bool)
    regular = x2.masked_fill(outliers, 0.0)
    xq = quantize_int8(regular)  # one scale per token (row of x)
    # an int32 accumulator in the GPU kernel; float64 holds the same integers exactly here
    acc = xq.q.double() @ w.q.double().T
    out = acc * (xq.absmax.double().view(-1, 1) * w.absmax.double().view(1, -1)) / 127**2
    if outliers.any():
        out += x2[:, outliers].double() @ w.dequantize().double()[:, outliers].T
    return out.to(x.dtype).reshape(*x.shape[:-1], w.q.shape[0])


# --------------------------------------------------------------------------- 4-bit, block-wise

def quantize_blocks(x: torch.Tensor, blocksize: int, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise quantization onto a code book: cut ``x`` into blocks of ``blocksize`` (the last padded with
    zeros), divide each by its absmax, and keep the index of the nearest of ``levels``. Returns the codes (uint8,
    padding included) and the absmax of each block. Built in chapter 06."""
    flat = x.reshape(-1).float()
    pad = -flat.numel() % blocksize  # zeros do not change a block's absmax
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1)
    midpoints = ((levels[:-1] + levels[1:]) / 2).to(flat.device)
    return torch.bucketize(scaled, midpoints).to(torch.uint8).reshape(-1), absmax


def dequantize_blocks(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                      levels: torch.Tensor) -> torch.Tensor:
    """The inverse of ``quantize_blocks``: ``levels[code]`` times its block's absmax. Built in chapter 06."""
    values = levels.to(codes.device)[codes.long()]
    pad = -values.numel() % blocksize
    blocks = torch.nn.functional.pad(values, (0, pad)).view(-1, blocksize) * absmax.unsqueeze(1)
    return blocks.reshape(-1)[: codes.numel()]


@dataclass
class Blockwise4bit:
    """Packed 4-bit codes plus the block scales (float32, or 8-bit codes when double-quantized). Built in chapter 06."""

    packed: torch.Tensor    # uint8, two codes per byte, first code in the high nibble
    absmax: torch.Tensor    # float32 per block, or uint8 codes into dynamic_map() if nested
    shape: torch.Size
    dtype: torch.dtype
    quant_type: str
    blocksize: int
    nested_absmax: Optional[torch.Tensor] = None  # float32 per BNB_NESTED_BLOCKSIZE block scales
    offset: Optional[torch.Tensor] = None          # the mean subtracted before nesting

    def block_scales(self) -> torch.Tensor:
        """The float32 absmax of every block (decoded first if double-quantized)."""
        if self.nested_absmax is None:
            return self.absmax
        return dequantize_blocks(self.absmax, self.nested_absmax, BNB_NESTED_BLOCKSIZE, dynamic_map()) + self.offset

    def dequantize(self) -> torch.Tensor:
        """Back to floating point: level[code] * block absmax."""
        n = self.shape.numel()
        codes = torch.stack([self.packed >> 4, self.packed & 0xF], dim=1).reshape(-1)[:n]
        levels = nf4_levels() if self.quant_type == "nf4" else fp4_levels()
        return dequantize_blocks(codes, self.block_scales(), self.blocksize, levels).reshape(self.shape).to(self.dtype)

    @property
    def nbytes(self) -> int:
        nested = [self.nested_absmax, self.offset] if self.nested_absmax is not None else []
        parts = [self.packed, self.absmax, *nested]
        return sum(t.numel() * t.element_size() for t in parts)

    @property
    def bytes_per_param(self) -> float:
        return self.nbytes / self.shape.numel()


def quantize_4bit(w: torch.Tensor, quant_type: str = "nf4", blocksize: int = BNB_4BIT_BLOCKSIZE,
                  double_quant: bool = False) -> Blockwise4bit:
    """Block-wise 4-bit quantization (``quant_type`` "nf4" or "fp4"), as bitsandbytes stores
    ``Params4bit``; ``double_quant=True`` quantizes the block absmaxes to 8 bits too. Built in chapter 06."""
    _check_weight(w)
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type {quant_type!r} must be 'nf4' or 'fp4'")
    if not isinstance(blocksize, int) or blocksize < 2 or blocksize % 2:
        raise ValueError(f"blocksize {blocksize!r} must be an even int >= 2 (bitsandbytes uses 64)")
    levels = nf4_levels() if quant_type == "nf4" else fp4_levels()
    codes, absmax = quantize_blocks(w, blocksize, levels)
    codes = codes[: w.numel() + w.numel() % 2]  # an odd count ends with the code of a padding 0
    packed = (codes[0::2] << 4) | codes[1::2]
    q = Blockwise4bit(packed=packed, absmax=absmax, shape=w.shape, dtype=w.dtype,
                      quant_type=quant_type, blocksize=blocksize)
    if double_quant:  # centre the scales, then quantize them like any other tensor, in blocks of 256
        q.offset = absmax.mean()
        nested_codes, q.nested_absmax = quantize_blocks(absmax - q.offset, BNB_NESTED_BLOCKSIZE, dynamic_map())
        q.absmax = nested_codes[: absmax.numel()]
    return q


# --------------------------------------------------------------------------- what a loaded model keeps

def _quant_state_tensors(param) -> list[torch.Tensor]:
    """The tensors bitsandbytes keeps beside a quantized weight: a 4-bit weight's ``quant_state`` (absmax,
    code book, and the nested absmax/code/offset of double quantization), an int8 weight's ``SCB``."""
    state = getattr(param, "quant_state", None)
    if state is not None:
        tensors = [state.absmax, state.code, getattr(state, "offset", None)]
        if getattr(state, "state2", None) is not None:
            tensors += [state.state2.absmax, state.state2.code]
        return [t for t in tensors if isinstance(t, torch.Tensor)]
    scb = getattr(param, "SCB", None)
    return [scb] if isinstance(scb, torch.Tensor) else []


def stored_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold ``t``'s bytes: ``t`` itself, or, for a wrapper subclass such as optimum-quanto's
    quantized weights, the inner tensors its ``__tensor_flatten__`` names (codes, scales, shifts), recursively.
    Built in chapter 06."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None or type(t) in (torch.Tensor, torch.nn.Parameter):
        return [t]
    names, _ = flatten()
    return [leaf for name in names for leaf in stored_tensors(getattr(t, name))]


def model_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes a model keeps: ``{"parameters": ..., "buffers": ..., "quant_state": ...}``, each storage counted
    once (tied weights, shared code books). ``quant_state`` is what bitsandbytes holds outside the parameters
    (block absmaxes, nested absmaxes, code books, int8 row scales), which ``get_memory_footprint()`` leaves
    out. A quantized weight that is a tensor subclass (optimum-quanto's) counts the tensors it is made of
    (:func:`stored_tensors`). Built in chapter 06."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    seen: set[tuple[str, int]] = set()

    def size(tensors) -> int:
        total = 0
        for t in (leaf for tensor in tensors for leaf in stored_tensors(tensor)):
            key = (t.device.type, t.untyped_storage().data_ptr())
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total

    params = list(model.parameters())
    state = [t for p in params for t in _quant_state_tensors(p)]
    for module in model.modules():  # after its first forward, Linear8bitLt moves SCB from the weight to module.state
        scb = getattr(getattr(module, "state", None), "SCB", None)
        if isinstance(scb, torch.Tensor):
            state.append(scb)
    return {"parameters": size(params), "buffers": size(model.buffers()), "quant_state": size(state)}


# --------------------------------------------------------------------------- quality against a reference

def token_metrics(logits: torch.Tensor, ref_logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token quality of ``logits`` against a reference model's ``ref_logits`` (both ``(tokens, vocab)``,
    predicting ``targets``): ``nll`` (negative log-likelihood of the target, nats), ``kl`` (KL(ref || model),
    nats) and ``agree`` (1.0 where both pick the same top-1 token). Built in chapter 06."""
    if logits.ndim != 2 or logits.shape != ref_logits.shape or targets.shape != logits.shape[:1]:
        raise ValueError(f"expected logits and ref_logits of one shape (tokens, vocab) and targets (tokens,), got "
                         f"{tuple(logits.shape)}, {tuple(ref_logits.shape)} and {tuple(targets.shape)}")
    logp, ref_logp = logits.double().log_softmax(-1), ref_logits.double().log_softmax(-1)
    return {"nll": -logp.gather(1, targets.view(-1, 1).long()).squeeze(1),
            "kl": (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp(min=0),
            "agree": (logits.argmax(-1) == ref_logits.argmax(-1)).double()}


def bootstrap_ci(values: torch.Tensor, *, block: int = 64, n_resamples: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """The mean of per-token ``values`` and a ``level`` confidence interval for it, by a block bootstrap:
    neighbouring tokens are correlated, so whole runs of ``block`` tokens are resampled with replacement.
    Returns ``(mean, low, high)``. Built in chapter 06."""
    if not isinstance(values, torch.Tensor) or values.ndim != 1 or values.numel() < 2 * block:
        raise ValueError(f"values must be a 1-D tensor of at least 2 * block = {2 * block} values, got "
                         f"{type(values).__name__} {tuple(getattr(values, 'shape', ()))}")
    if not 0 < level < 1:
        raise ValueError(f"level {level!r} must be between 0 and 1")
    n_blocks = values.numel() // block
    sums = values[: n_blocks * block].double().view(n_blocks, block).sum(1)
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, n_blocks, (n_resamples, n_blocks), generator=g)
    means = sums[picks].sum(1) / (n_blocks * block)
    low, high = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return values.double().mean().item(), low, high


# --------------------------------------------------------------------------- codecs of compressed splits (chapter 08)

_LINEAR = re.compile(r"(?:^|\.)(?:\w*_proj|lm_head)\.weight$")  # q/k/v/o_proj, gate/up/down_proj, lm_head
Spec = tuple[str, Sequence[int], torch.dtype]


def is_linear_weight(name: str, shape: Sequence[int], dtype: torch.dtype) -> bool:
    """True for the weight of a linear projection, the tensors a compressed split stores in 8 or 4 bits:
    a 2-D floating ``*_proj.weight`` (q/k/v/o_proj, gate/up/down_proj) or ``lm_head.weight``. Never the
    embedding table (a lookup reads a few of its rows, not all of it), norms or biases. Built in chapter 08."""
    return bool(_LINEAR.search(name)) and len(shape) == 2 and dtype.is_floating_point


class Codec:
    """How a compressed split stores each linear weight (``is_linear_weight``) in fewer bytes; every other
    tensor is stored as it is. A codec is handed to ``helpers.checkpoints.split_by_layer`` (chapter 03), which
    records its ``name``; the streamer finds it again with ``codec(name)``. A subclass says what one weight
    becomes (``parts``: a suffix, a shape and a dtype per stored tensor) and how (``encode``, ``decode``).
    Built in chapter 08."""

    name: str = ""
    suffixes: tuple[str, ...] = ()  # of a weight's stored tensors, in ``parts`` order

    def parts(self, name: str, shape: Sequence[int]) -> list[Spec]:
        """What ``name`` of ``shape`` is stored as; ``ValueError`` naming it if this codec cannot store it."""
        raise NotImplementedError

    def encode(self, w: torch.Tensor) -> list[torch.Tensor]:
        """The stored tensors of one weight, in the order of ``parts``."""
        raise NotImplementedError

    def decode(self, parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The weight again, in ``dtype``, on the device its parts are on."""
        raise NotImplementedError

    def temporary_bytes(self, shape: Sequence[int], dtype: torch.dtype) -> int:
        """Bytes ``decode`` holds beyond its parts and its result, for a weight of ``shape`` decoded to ``dtype``."""
        raise NotImplementedError

    def linear(self, x: torch.Tensor, parts: list[torch.Tensor], bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x @ weight.T + bias`` for a weight stored as ``parts``: by default decoded, then multiplied."""
        return torch.nn.functional.linear(x, self.decode(parts, x.dtype), bias)

    def specs(self, specs: Sequence[Spec]) -> list[Spec]:
        """``(name, shape, dtype)`` of what ``compress`` stores for tensors of these specs, in the same order;
        checks every spec first, so a split can refuse a model before it writes a byte."""
        out: list[Spec] = []
        for name, shape, dtype in specs:
            out += self.parts(name, tuple(shape)) if is_linear_weight(name, shape, dtype) else [(name, shape, dtype)]
        return out

    def compress(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A block's tensors as the split stores them, named as ``specs`` says; other tensors unchanged."""
        self.specs([(k, tuple(t.shape), t.dtype) for k, t in state.items()])  # checks, before any work
        out: dict[str, torch.Tensor] = {}
        for name, t in state.items():
            if not is_linear_weight(name, t.shape, t.dtype):
                out[name] = t
                continue
            for (part, _, _), value in zip(self.parts(name, tuple(t.shape)), self.encode(t)):
                out[part] = value
        return out

    def decompress(self, state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The inverse of ``compress``: each weight rebuilt in ``dtype`` on the device its parts are on (a streamer
        calls it after the copy to the GPU, so only the compressed bytes cross the bus); other tensors pass."""
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype {dtype!r} must be a floating-point torch.dtype")
        out: dict[str, torch.Tensor] = {}
        for name, t in state.items():
            weight, _, last = name.rpartition(".")
            part = "." + last
            if not weight.endswith(".weight"):
                out[name] = t
                continue
            other = next((c.name for c in CODECS.values() if part in c.suffixes and part not in self.suffixes), None)
            if other is not None:
                raise ValueError(f"{name!r} is stored as {other}, not {self.name}")
            if part not in self.suffixes:
                out[name] = t
                continue
            missing = [weight + s for s in self.suffixes if weight + s not in state]
            if missing:
                raise ValueError(f"{name!r} has no {missing[0]!r} beside it: not a {self.name} split")
            if weight not in out:
                out[weight] = self.decode([state[weight + s] for s in self.suffixes], dtype)
        return out

    def __repr__(self) -> str:
        return f"codec({self.name!r})"


class Int8Rows(Codec):
    """int8 codes and one float32 absmax per row (``quantize_int8``, LLM.int8's weights). Built in chapter 08."""

    name, suffixes = "int8", (".q", ".absmax")

    def parts(self, name, shape):
        return [(f"{name}.q", shape, torch.int8), (f"{name}.absmax", (shape[0],), torch.float32)]

    def encode(self, w):
        q = quantize_int8(w)
        return [q.q, q.absmax]

    def decode(self, parts, dtype):
        q, absmax = parts  # RowwiseInt8.dequantize's arithmetic, bit for bit, with one float32 temporary
        return q.float().mul_(absmax.view(-1, 1)).mul_(1 / 127).to(dtype)

    def temporary_bytes(self, shape, dtype):
        return 0 if dtype == torch.float32 else math.prod(shape) * 4  # the float32 weight, before .to(dtype)

    def linear(self, x, parts, bias=None):
        """The product with the codes, then each output column scaled by its row's absmax / 127: one pass over the
        weight fewer than decoding it first (equal up to the rounding of the float product)."""
        q, absmax = parts
        out = torch.nn.functional.linear(x, q.to(x.dtype)) * (absmax * (1 / 127)).to(x.dtype)
        return out if bias is None else out + bias


class NF4Blocks(Codec):
    """NF4 codes, two to a byte, one float32 absmax per block of 64 (``quantize_4bit``, no double quantization).
    Decoded by a table lookup of both codes of a byte at once, in chunks of bounded size. Built in chapter 08."""

    name, suffixes = "nf4", (".packed", ".absmax")
    chunk = 2**22  # bytes of codes decoded at a time: bounds the temporaries (float32 pairs, int32 indices)

    def parts(self, name, shape):
        rows, cols = shape
        if cols % 2 or (rows * cols) % BNB_4BIT_BLOCKSIZE:
            raise ValueError(f"tensor {name!r} of shape {tuple(shape)} cannot be stored as nf4: it needs an even "
                             f"in_features and a multiple of {BNB_4BIT_BLOCKSIZE} weights")
        return [(f"{name}.packed", (rows, cols // 2), torch.uint8),
                (f"{name}.absmax", (rows * cols // BNB_4BIT_BLOCKSIZE,), torch.float32)]

    def encode(self, w):
        q = quantize_4bit(w, "nf4", BNB_4BIT_BLOCKSIZE)
        return [q.packed.view(w.shape[0], w.shape[1] // 2), q.absmax]  # each row packs into its own bytes

    def decode(self, parts, dtype):
        packed, absmax = parts
        rows, half = packed.shape
        out = torch.empty(rows, half * 2, dtype=dtype, device=packed.device)
        flat, pairs = packed.reshape(-1), _nf4_pairs(packed.device)
        per_block = BNB_4BIT_BLOCKSIZE // 2  # bytes of codes per absmax
        step = max(per_block, self.chunk // per_block * per_block)
        for start in range(0, flat.numel(), step):  # whole blocks at a time
            codes = flat[start:start + step]
            values = pairs.index_select(0, codes.int()).view(-1, BNB_4BIT_BLOCKSIZE)
            values *= absmax[start // per_block:(start + codes.numel()) // per_block, None]
            out.view(-1)[2 * start:2 * start + 2 * codes.numel()] = values.view(-1)
        return out

    def temporary_bytes(self, shape, dtype):
        codes = min(self.chunk, math.prod(shape) // 2)  # bytes of codes decoded at a time
        return codes * (4 + 2 * 4)  # their int32 indices and the float32 pair of levels per byte


@lru_cache(maxsize=None)
def _nf4_pairs(device: torch.device) -> torch.Tensor:
    """(256, 2) float32: the two NF4 levels each byte encodes (high nibble first), on ``device``."""
    levels = nf4_levels()
    byte = torch.arange(256)
    return torch.stack([levels[byte >> 4], levels[byte & 0xF]], dim=1).to(device)


CODECS: dict[str, Codec] = {c.name: c for c in (Int8Rows(), NF4Blocks())}


def codec(name: str) -> Codec:
    """The codec called ``name`` ("int8", "nf4"): what ``split_by_layer(..., codec=...)`` is handed, and what a
    streamer finds from a split's index. ``ValueError`` naming the known ones otherwise. Built in chapter 08."""
    if not isinstance(name, str) or name not in CODECS:
        raise ValueError(f"compression {name!r}; expected one of None, {', '.join(map(repr, CODECS))}")
    return CODECS[name]
