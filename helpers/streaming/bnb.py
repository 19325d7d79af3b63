"""bitsandbytes' checkpoints, streamed in place: what transformers saves for ``load_in_4bit`` or ``load_in_8bit``,
decoded on the device, block by block.

Built in chapter 08. A model loaded with ``BitsAndBytesConfig(load_in_4bit=True)`` and saved with
``save_pretrained`` (the Hub's ``*-bnb-4bit`` models) stores each quantized linear weight as five tensors, seven
with double quantization (bitsandbytes' ``QuantState.as_dict(packed=True)``):

* ``weight``: the 4-bit codes, two to a byte (the first in the high nibble), shape ``(n / 2, 1)``;
* ``weight.absmax``: one scale per block of ``blocksize`` weights: float32, or uint8 codes with double quant;
* ``weight.quant_map``: the 16 values a code stands for (NF4 or FP4), in code order;
* ``weight.nested_absmax``, ``weight.nested_quant_map`` (double quant): one float32 scale per
  ``nested_blocksize`` absmax codes, and the 256 values an absmax code stands for;
* ``weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``): JSON as uint8 bytes: ``shape``, ``dtype``,
  ``blocksize``, ``quant_type`` and, with double quant, ``nested_blocksize``, ``nested_offset``, ``nested_dtype``.

``BnB4bit`` is a ``helpers.quant.Codec`` that decodes them as bitsandbytes' ``dequantize_4bit`` does (the absmaxes
first, as ``dequantize_blockwise`` does, plus ``nested_offset``), with ``helpers.quant.dequantize_blocks``, in
chunks of whole blocks.

With ``load_in_8bit`` (the Hub's ``*-bnb-8bit`` models) a linear weight is three tensors beside its module's name:
``weight`` (int8, the weight's own shape), ``SCB`` (one float32 absmax per output row) and ``weight_format`` (a
uint8 scalar; 0, "row", is the only layout bitsandbytes loads). ``BnB8bit`` decodes them as bitsandbytes'
``int8_vectorwise_dequant`` does: chapter 06's ``RowwiseInt8``, ``weight * SCB / 127``. That is the weight the int8
model stands for; bitsandbytes' own LLM.int8 product also rounds the activations to int8, which the streamer does
not. ``check_quantization`` reads ``config.json``'s ``quantization_config`` and refuses every other quantized
format before a weight is read; ``bnb_codec`` picks the codec for the one it passes.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch

from helpers.arithmetic import BNB_4BIT_BLOCKSIZE, BNB_NESTED_BLOCKSIZE
from helpers.layout import BlockLayout
from helpers.quant import Codec, RowwiseInt8, dequantize_blocks, is_linear_weight
from helpers.tensorfiles import CheckpointError

__all__ = ["SUPPORTED_QUANTIZATION", "check_quantization", "read_quant_states", "dequantize_4bit", "BnBCodec",
           "BnB4bit", "BnB8bit", "bnb_codec"]

SUPPORTED_QUANTIZATION = ("unquantized checkpoints and bitsandbytes ones (quant_method 'bitsandbytes' with "
                          "load_in_4bit: nf4 or fp4, with or without double quant; or with load_in_8bit)")
BLOB = re.compile(r"\.quant_state\.bitsandbytes__(nf4|fp4)$")  # the JSON tensor beside each quantized weight
PARTS = ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")  # after the weight's name
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _bits(q: Mapping) -> tuple:
    """(load_in_4bit, load_in_8bit) of a quantization_config, as transformers writes either spelling."""
    return q.get("load_in_4bit", q.get("_load_in_4bit")), q.get("load_in_8bit", q.get("_load_in_8bit"))


def check_quantization(config: Union[Mapping, str, Path]) -> Optional[dict]:
    """``config.json``'s ``quantization_config`` if it is bitsandbytes 4-bit (nf4 or fp4) or 8-bit, None if there is
    none; ``ValueError`` naming the method and what is supported for anything else (GPTQ, AWQ, an unknown method).
    ``config``: config.json's contents, or the folder that holds it (None if it has no readable one: transformers'
    ``AutoConfig`` says what is wrong with it). Built in chapter 08."""
    if not isinstance(config, Mapping):
        try:
            config = json.loads((Path(config) / "config.json").read_text())
        except (OSError, ValueError):
            return None
    q = config.get("quantization_config") if isinstance(config, Mapping) else None
    if not q:
        return None
    if not isinstance(q, Mapping):
        raise ValueError(f"quantization_config {q!r:.80} is not a mapping; LayerStreamer streams "
                         f"{SUPPORTED_QUANTIZATION}")
    method = q.get("quant_method", "bitsandbytes" if q.get("load_in_4bit") or q.get("load_in_8bit") else None)
    four, eight = _bits(q)
    kind = q.get("bnb_4bit_quant_type", "nf4")
    if method == "bitsandbytes" and ((four and kind in ("nf4", "fp4")) or (eight and not four)):
        return dict(q)
    what = repr(method)
    if method == "bitsandbytes":
        what += (f" with bnb_4bit_quant_type {kind!r}" if four else " without load_in_4bit or load_in_8bit")
    raise ValueError(f"quantization_config: quant_method {what} is not supported by LayerStreamer; it streams "
                     f"{SUPPORTED_QUANTIZATION}")


def parse_quant_state(blob: torch.Tensor, where: str) -> dict:
    """The JSON of one ``quant_state.bitsandbytes__*`` tensor, checked; ``ValueError`` naming ``where``. Built in
    chapter 08."""
    try:
        state = json.loads(bytes(blob.cpu().reshape(-1).numpy()).decode("utf-8"))
        shape, blocksize = [int(x) for x in state["shape"]], int(state["blocksize"])
        problems = []
        if state["quant_type"] not in ("nf4", "fp4"):
            problems.append(f"quant_type {state['quant_type']!r}, expected 'nf4' or 'fp4'")
        if state["dtype"] not in DTYPES:
            problems.append(f"dtype {state['dtype']!r}, expected one of {', '.join(DTYPES)}")
        if blocksize < 2 or blocksize % 2:
            problems.append(f"blocksize {blocksize}, expected an even number >= 2")
        if "nested_offset" in state:
            state.update(nested_offset=float(state["nested_offset"]), nested_blocksize=int(state["nested_blocksize"]))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: not a bitsandbytes quant_state JSON ({e!r})") from None
    if problems:
        raise ValueError(f"{where}: {'; '.join(problems)}")
    return {**state, "shape": shape, "blocksize": blocksize}


def read_quant_states(layout: BlockLayout) -> dict[str, dict]:
    """``{weight name: its quant_state JSON}`` for every bitsandbytes 4-bit weight of a checkpoint, read once (a few
    hundred bytes each), so a pass never has to bring one back from the GPU. ``CheckpointError`` naming the file
    for one that does not parse. Built in chapter 08."""
    states = {}
    for block in layout.blocks:
        for piece in layout.pieces[block]:
            for name in piece.tensors:
                if BLOB.search(name):
                    data = piece.read(name)
                    try:
                        states[f"{block}.{BLOB.sub('', name)}"] = parse_quant_state(data, name)
                    except ValueError as e:
                        raise CheckpointError(piece.path, [f"{piece.path.name}: {block}.{e}"]) from None
    return states


def dequantize_4bit(tensors: Mapping[str, torch.Tensor], state: Mapping, dtype: Optional[torch.dtype] = None,
                    chunk: int = 2**20) -> torch.Tensor:
    """One weight from its stored tensors (``tensors``: "weight", "absmax", "quant_map" and, with double quant,
    "nested_absmax" and "nested_quant_map") and its parsed quant ``state``, on the device they are on: what
    bitsandbytes' ``dequantize_4bit`` returns (in ``state["dtype"]``), then in ``dtype``. ``chunk``: bytes of codes
    decoded at a time, which bounds the temporaries. Built in chapter 08."""
    shape, blocksize = torch.Size(state["shape"]), int(state["blocksize"])
    n = shape.numel()
    packed = tensors["weight"].contiguous().view(torch.uint8).reshape(-1)  # any quant_storage: the same bytes
    absmax = tensors["absmax"]
    if "nested_offset" in state:  # double quant: the absmaxes are 8-bit codes themselves
        absmax = dequantize_blocks(absmax, tensors["nested_absmax"].float(), int(state["nested_blocksize"]),
                                   tensors["nested_quant_map"]) + torch.tensor(float(state["nested_offset"]))
    absmax = absmax.float()
    if packed.numel() != (n + 1) // 2 or absmax.numel() != -(-n // blocksize):
        raise ValueError(f"{packed.numel()} bytes of codes and {absmax.numel()} absmaxes; a {list(shape)} weight in "
                         f"blocks of {blocksize} needs {(n + 1) // 2} and {-(-n // blocksize)}")
    out = torch.empty(n, dtype=DTYPES[state["dtype"]], device=packed.device)
    step = max(1, chunk * 2 // blocksize) * blocksize // 2  # whole blocks at a time
    for start in range(0, packed.numel(), step):
        byte = packed[start:start + step]
        codes = torch.stack([byte >> 4, byte & 0xF], dim=1).reshape(-1)
        first, end = 2 * start // blocksize, min(n, 2 * start + codes.numel())
        scales = absmax[first:first + -(-codes.numel() // blocksize)]
        out[2 * start:end] = dequantize_blocks(codes, scales, blocksize, tensors["quant_map"])[:end - 2 * start]
    return out.view(shape) if dtype is None else out.view(shape).to(dtype)


class BnBCodec(Codec):
    """What bitsandbytes' 4-bit and 8-bit checkpoints share: transformers quantizes every linear weight outside
    ``llm_int8_skip_modules`` (``lm_head`` by default), and bitsandbytes, not this codec, writes them.
    ``quantization_config``: the checkpoint's (``check_quantization``). Built in chapter 08."""

    def __init__(self, quantization_config: Optional[Mapping] = None):
        q = dict(quantization_config or {})
        self.skip = tuple(q.get("llm_int8_skip_modules") or ("lm_head",))  # transformers leaves these in float

    def quantized(self, name: str, shape: Sequence[int], dtype: torch.dtype) -> bool:
        """Whether transformers stores this tensor quantized: a linear weight outside ``skip``."""
        module = name.rsplit(".", 1)[0]
        return is_linear_weight(name, shape, dtype) and not any(
            module == m or module.endswith("." + m) or module.startswith(m + ".") for m in self.skip)

    def specs(self, specs):
        """What transformers stores for tensors of these specs: each quantized weight's parts, others as they are."""
        out = []
        for name, shape, dtype in specs:
            quantized = self.quantized(name, shape, dtype)
            out += self.parts(name, tuple(shape), dtype) if quantized else [(name, shape, dtype)]
        return out

    def encode(self, w):
        bits = "4" if self.name == "bnb-4bit" else "8"
        raise NotImplementedError(f"{self.name} is read only: bitsandbytes writes it (save_pretrained of a model "
                                  f"loaded with BitsAndBytesConfig(load_in_{bits}bit=True)); for a split use "
                                  f"codec({'nf4' if bits == '4' else 'int8'!r})")


class BnB4bit(BnBCodec):
    """bitsandbytes' 4-bit format as transformers saves it, read in place: decode only (bitsandbytes writes it).
    ``quantization_config``: the checkpoint's (``check_quantization``), for ``specs`` (bytes stored per weight:
    ``predicted_peak_bytes``); ``states``: ``read_quant_states``' (else each pass parses the JSON tensors).
    Built in chapter 08."""

    name = "bnb-4bit"
    chunk = 2**20  # bytes of codes decoded at a time (dequantize_4bit)

    def __init__(self, quantization_config: Optional[Mapping] = None, states: Optional[Mapping[str, dict]] = None):
        super().__init__(quantization_config)
        q = dict(quantization_config or {})
        self.quant_type = q.get("bnb_4bit_quant_type", "nf4")
        self.double_quant = bool(q.get("bnb_4bit_use_double_quant", False))
        self.states = dict(states or {})

    def parts(self, name, shape, dtype=torch.bfloat16):
        n = math.prod(shape)
        blocks = -(-n // BNB_4BIT_BLOCKSIZE)
        state = {"quant_type": self.quant_type, "blocksize": BNB_4BIT_BLOCKSIZE, "dtype": str(dtype)[6:],
                 "shape": list(shape)}
        out = [(name, ((n + 1) // 2, 1), torch.uint8),
               (f"{name}.absmax", (blocks,), torch.uint8 if self.double_quant else torch.float32),
               (f"{name}.quant_map", (16,), torch.float32)]
        if self.double_quant:
            state.update(nested_blocksize=BNB_NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=0.01234567890123)
            out += [(f"{name}.nested_absmax", (-(-blocks // BNB_NESTED_BLOCKSIZE),), torch.float32),
                    (f"{name}.nested_quant_map", (256,), torch.float32)]
        blob = len(json.dumps(state))  # its length to within a few bytes (the offset's digits)
        return out + [(f"{name}.quant_state.bitsandbytes__{self.quant_type}", (blob,), torch.uint8)]

    def decode(self, parts, dtype):
        """``parts`` in the order of ``parts()``: the codes, absmax, quant_map, (nested absmax and map,) the JSON."""
        *tensors, blob = parts
        keys = ("weight", "absmax", "quant_map", "nested_absmax", "nested_quant_map")
        return dequantize_4bit(dict(zip(keys, tensors)), parse_quant_state(blob, "quant_state"), dtype, self.chunk)

    def temporary_bytes(self, shape, dtype):
        codes, blocks = min(self.chunk, (math.prod(shape) + 1) // 2), -(-math.prod(shape) // BNB_4BIT_BLOCKSIZE)
        # per byte of codes: two uint8 nibbles and their stack, int64 indices, the float32 values, padded, scaled;
        # per block: its float32 absmax (decoded from 8 bits with double quant, through int64 indices)
        return codes * 36 + blocks * (4 + (8 + 4 + 4 if self.double_quant else 0))

    def decompress(self, state, dtype):
        """Each bitsandbytes 4-bit weight of ``state`` (full names, as the checkpoint stores them) decoded in ``dtype``
        on the device its tensors are on; every other tensor passes unchanged."""
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype {dtype!r} must be a floating-point torch.dtype")
        out, used = {}, set()
        for blob in [k for k in state if BLOB.search(k)]:
            weight = BLOB.sub("", blob)
            info = self.states.get(weight) or parse_quant_state(state[blob], blob)
            needed = PARTS[:5 if "nested_offset" in info else 3]
            missing = [weight + s for s in needed if weight + s not in state]
            if missing:
                raise ValueError(f"{blob!r} has no {missing[0]!r} beside it: not a whole bitsandbytes 4-bit weight")
            keys = ("weight", "absmax", "quant_map", "nested_absmax", "nested_quant_map")
            tensors = {k: state[weight + s] for k, s in zip(keys, needed)}
            out[weight] = dequantize_4bit(tensors, info, dtype, self.chunk)
            used |= {blob, *(weight + s for s in needed)}
        out.update({k: v for k, v in state.items() if k not in used})
        return out


class BnB8bit(BnBCodec):
    """bitsandbytes' 8-bit format as transformers saves it (``load_in_8bit``), read in place: decode only.
    ``quantization_config``: the checkpoint's (``check_quantization``). Built in chapter 08."""

    name = "bnb-8bit"

    def parts(self, name, shape, dtype=torch.bfloat16):
        module = name.rsplit(".", 1)[0]
        return [(name, tuple(shape), torch.int8), (f"{module}.SCB", (shape[0],), torch.float32),
                (f"{module}.weight_format", (), torch.uint8)]

    def decode(self, parts, dtype):
        """``parts`` in the order of ``parts()``: the int8 weight, its SCB and (ignored here) its weight_format."""
        weight, scb = parts[0], parts[1]
        return RowwiseInt8(q=weight, absmax=scb, dtype=dtype).dequantize()

    def temporary_bytes(self, shape, dtype):
        return 4 * math.prod(shape)  # the float32 product before its cast to ``dtype``

    def decompress(self, state, dtype):
        """Each bitsandbytes 8-bit weight of ``state`` (a module's ``weight``, ``SCB`` and ``weight_format``) decoded
        in ``dtype`` on the device it is on; every other tensor passes unchanged."""
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype {dtype!r} must be a floating-point torch.dtype")
        out, used = {}, set()
        for scb in [k for k in state if k.endswith(".SCB")]:
            module = scb[:-len(".SCB")]
            weight, layout = f"{module}.weight", state.get(f"{module}.weight_format")
            if weight not in state or state[weight].dtype != torch.int8:
                raise ValueError(f"{scb!r} has no int8 {weight!r} beside it: not a whole bitsandbytes 8-bit weight")
            if layout is not None and int(layout) != 0:
                raise ValueError(f"{module}.weight_format is {int(layout)}; bitsandbytes 8-bit weights stream only "
                                 "in its 'row' format (0), the only one bitsandbytes itself loads")
            out[weight] = self.decode([state[weight], state[scb]], dtype)
            used |= {scb, weight, f"{module}.weight_format"}
        out.update({k: v for k, v in state.items() if k not in used})
        return out


def bnb_codec(quantization_config: Mapping, layout: BlockLayout) -> Codec:
    """The codec that reads a checkpoint saved with this bitsandbytes ``quantization_config`` (one that
    ``check_quantization`` passed) in place: ``BnB4bit`` with its quant states read once, or ``BnB8bit``.
    Built in chapter 08."""
    four, _ = _bits(quantization_config)
    return BnB4bit(quantization_config, read_quant_states(layout)) if four else BnB8bit(quantization_config)
