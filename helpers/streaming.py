"""Layer streaming: run a model bigger than memory one block at a time, the whole batch per block.

Built in chapter 08, in two parts that meet at one seam:

* ``BlockSource``: *what* to read and *from where*. It reads either the per-layer files that
  ``helpers.checkpoints.split_by_layer`` writes (chapter 03; optionally int8/nf4-compressed, decompressed on
  the device) or an ordinary sharded (or single-file) safetensors checkpoint *in place*: each block is the
  byte ranges of its tensors in the original shards (``tensorfiles.block_layout``), so no second copy of the
  model is written (for Llama-2-70B the split would be 138 GB more disk). It puts each block's weights on the
  device: each range memory-mapped on the CPU (no copy; an embedding reads only the rows a pass looks up),
  read through two pinned buffers and a side stream on CUDA (each buffer guarded by a CUDA event, each block
  handed to the compute stream by another). A reader thread reads block i + 1 while block i computes.
* ``LayerStreamer``: the *pass*. The model's skeleton lives on the ``meta`` device, each block knowing its
  ``Role`` in a Llama-family forward pass. One engine (``run_pass``) takes each block from the source, runs
  the whole batch through it and sends it back to ``meta``; ``forward``, ``generate`` and ``score`` are
  policies over that engine, each a ``step`` with its own small state.

At most two blocks of weights are resident, plus the activations and the KV cache. It runs the Llama family:
Llama, and Mistral and Qwen2, whose decoder layers are Llama's with other names (``SUPPORTED_MODEL_TYPES``);
any other ``model_type`` is refused before a weight is read.

Every public result is on the CPU: ``forward``'s logits and ``score``'s scores in float32, ``generate``'s ids
in int64, whatever the compute device, so that they compare directly with any reference. ``h2d_bandwidth``
measures the host-to-device link the CUDA path crosses.
"""

from __future__ import annotations

import enum
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import torch

from helpers import tensorfiles
from helpers.meta import parse_dtype

__all__ = ["BlockSource", "LoadedBlock", "Role", "Block", "llama_blocks", "LayerStreamer", "predicted_peak_bytes",
           "h2d_bandwidth", "SUPPORTED_MODEL_TYPES", "check_architecture"]

# model_type -> why its decoder layers run unchanged under LayerStreamer's Llama forward
SUPPORTED_MODEL_TYPES = {
    "llama": "the reference",
    "mistral": "Llama's layer; a sliding window, when set, is checked against every pass's length",
    "qwen2": "Llama's layer with biases on q, k and v (weights like any other); sliding layers are checked as Mistral's",
}


def check_architecture(config) -> Optional[int]:
    """Refuse a config whose layers ``LayerStreamer``'s Llama forward would compute wrongly; return its sliding
    window (the longest sequence, cache included, a pass may have), or None when attention is plain causal.

    ``ValueError`` naming the ``model_type`` for anything outside ``SUPPORTED_MODEL_TYPES`` (Gemma, for one,
    scales its embeddings and norms differently) or for layer types other than full and sliding attention.
    Built in chapter 08.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported by LayerStreamer, which computes a Llama-family "
                         f"forward pass; supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}")
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if not layer_types <= {"full_attention", "sliding_attention"}:
        raise ValueError(f"model_type {model_type!r} with layer_types {sorted(layer_types)}: LayerStreamer runs "
                         "full (and, up to the window, sliding) attention only")
    window = getattr(config, "sliding_window", None)
    if model_type == "mistral" or "sliding_attention" in layer_types:
        return window
    return None


def h2d_bandwidth(nbytes: int = 256 * 2**20, *, pinned: bool = True, device: Union[str, torch.device] = "cuda",
                  repeat: int = 5) -> float:
    """Host-to-device copy bandwidth in bytes/s: ``nbytes`` copied from a pinned (or pageable) CPU tensor to
    ``device``, timed with CUDA events, best of ``repeat`` after one warm-up copy. Built in chapter 08.

    Pinned memory is what the streamer's read buffers are: the GPU's copy engine reads it directly (and
    asynchronously); pageable memory is staged through a pinned bounce buffer by the driver.
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1:
        raise ValueError(f"nbytes {nbytes!r} must be an int >= 1 (bytes to copy)")
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat {repeat!r} must be an int >= 1")
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device {str(device)!r} is not a CUDA device; h2d_bandwidth measures a host-to-GPU copy")
    if not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asks for CUDA, but torch.cuda.is_available() is False: "
                         "h2d_bandwidth needs a CUDA GPU")
    host = torch.ones(nbytes, dtype=torch.uint8, pin_memory=pinned)
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    stream = torch.cuda.current_stream(device)
    target.copy_(host, non_blocking=pinned)  # warm up: the copy engine, the driver's staging buffers
    torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        target.copy_(host, non_blocking=pinned)
        end.record(stream)
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)  # elapsed_time is in milliseconds
    return nbytes / best


def predicted_peak_bytes(config, batch_size: int, seq_len: int, dtype, *, prefetch: bool = True) -> int:
    """Bytes ``LayerStreamer`` holds at its peak on the CPU, from ``helpers.arithmetic``. Built in chapter 08.

    The weights of the two consecutive blocks it has at once (block i computing, block i + 1 being read;
    one block without prefetch), the embedding counted as the rows a pass looks up and a tied ``lm_head``
    as the whole shared table it reads, plus the activations of a ``batch_size`` x ``seq_len`` pass. For
    files stored in ``dtype`` (converting on the fly briefly holds both copies of a block).
    """
    from helpers.arithmetic import activation_bytes, block_bytes

    blocks = block_bytes(config, dtype)
    table = blocks["model.embed_tokens"]
    if blocks.get("lm_head") == 0:  # tied: lm_head reads the embedding's file whole
        blocks["lm_head"] = table
    blocks["model.embed_tokens"] = min(table, batch_size * seq_len * (table // config.vocab_size))
    held = list(blocks.values())
    weights = max(a + b for a, b in zip(held, held[1:])) if prefetch else max(held)
    return weights + activation_bytes(config, batch_size, seq_len, dtype)


# =========================================================================== the source: what to read, from where

@dataclass
class LoadedBlock:
    """One block's weights, read from disk and on their way to the device."""

    index: int  # the block's place in execution order
    state: dict[str, torch.Tensor] = field(repr=False)  # name inside the block -> tensor (see BlockSource.take)
    bytes: int  # bytes read from disk for it
    event: Optional[torch.cuda.Event]  # CUDA: marks the end of its copy (and conversion) on the side stream
    read_start: float  # time.perf_counter() when the read began
    read_end: float  # ... and when it ended


class BlockSource:
    """The blocks of a model on disk, read one by one and put on ``device``. Built in chapter 08.

    ``checkpoint``: a per-layer split (a folder with ``layers.index.json``, from
    ``helpers.checkpoints.split_by_layer``; chapter 03), or an ordinary checkpoint folder
    (``model.safetensors.index.json`` and its shards, or a lone ``model.safetensors``), read *in place*: each
    block is the byte ranges of its tensors in the original shards (``tensorfiles.block_layout``; the headers
    are read once, here), so no second copy of the model is ever written. A tied ``lm_head`` reads the
    embedding's table. A split written with ``compression`` ("int8", "nf4") is decompressed on the device
    (``helpers.quant.decompress_state``), so the disk and the host-to-device link carry the compressed bytes.

    Holds the read buffers, the CUDA copy stream, the reader thread and the page-cache dropper.
    ``stream(rows)`` yields the blocks in execution order, reading block i + 1 in the reader thread while the
    caller computes block i (``prefetch``); ``cold`` forgets each block's pages once it is done, so that every
    pass reads the disk (Linux). Close it (``close()`` or ``with``) to stop its threads and free its buffers.

    On CUDA, two rules keep the streams honest without ever synchronizing the whole device. A pinned read
    slot is overwritten only after the CUDA event recorded behind its last host-to-device copy has fired
    (``load`` waits on it in the reader thread), so a read never clobbers bytes a copy still needs. A block's
    tensors are allocated on the copy stream and used on the compute stream: ``take`` makes the compute stream
    wait for the copy's event and marks each tensor ``record_stream(compute stream)``, so the caching
    allocator does not hand its memory to the next copy before the compute that uses it has finished.
    """

    def __init__(self, checkpoint: Union[str, Path], *, device: torch.device, dtype: torch.dtype,
                 prefetch: bool = True, cold: bool = False, layout: Optional[tensorfiles.BlockLayout] = None):
        self.checkpoint = Path(checkpoint)
        if cold and not hasattr(os, "posix_fadvise"):
            raise ValueError("dropping the page cache (drop_page_cache=True) needs os.posix_fadvise (Linux); "
                             "this platform has none")
        # every header, read once: where each block's bytes are (``layout``: one its caller read already)
        self.layout = layout if layout is not None else tensorfiles.block_layout(self.checkpoint)
        self.compression = self.layout.compression
        self.device, self.dtype, self.prefetch, self.cold = torch.device(device), dtype, prefetch, cold
        self.names: list[str] = list(self.layout.blocks)
        self.cuda = self.device.type == "cuda"
        # CUDA: where each of a block's pieces goes in a read slot (64-byte boundaries, keeping the file's alignment)
        self._offsets: dict[str, list[int]] = {}
        for name in self.names:
            offsets, end = [], 0
            for piece in self.layout.pieces[name]:
                offsets.append(-(-end // 64) * 64 + piece.start % 64)
                end = offsets[-1] + piece.length
            self._offsets[name] = offsets
        self._copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-reader")
        self._dropper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="page-dropper")
        self._slots: list[Optional[torch.Tensor]] = [None, None]  # two pinned read buffers (CUDA), used in turn
        # CUDA: per slot, the event recorded after the last host-to-device copy out of it was issued
        self._slot_events: list[Optional[torch.cuda.Event]] = [None, None]
        self.closed = False

    @property
    def layer_dir(self) -> Path:
        """The folder read (the name from when only per-layer splits were): ``checkpoint``."""
        return self.checkpoint

    def _slot(self, i: int) -> torch.Tensor:
        """Pinned read buffer i % 2, as big as the biggest block: block i reads into it while block i - 1 computes."""
        if self._slots[i % 2] is None:
            size = max(off + p.length for name in self.names
                       for off, p in zip(self._offsets[name], self.layout.pieces[name]))
            self._slots[i % 2] = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        return self._slots[i % 2]

    @property
    def pinned_bytes(self) -> int:
        """Bytes of pinned read buffers held now (CUDA only; 0 on the CPU and after ``close``)."""
        return sum(slot.nbytes for slot in self._slots if slot is not None)

    def load(self, i: int, rows: Optional[torch.Tensor] = None) -> LoadedBlock:
        """Read block i and start putting it on the device, in its compute dtype (runs in the reader thread).

        A block is one or a few byte ranges of files (``tensorfiles.Piece``): of its own file in a split, of
        the shards in place. On the CPU each range is memory-mapped (``tensorfiles.map_range``): the kernel
        reads it into the page cache and the tensors are those very pages, so the read leaves both the CPU and
        the GIL to the compute. On CUDA the ranges are read into a pinned buffer (``tensorfiles.read_range``)
        and copied on a side stream. ``rows``: for a lookup table (an embedding), the rows a pass looks up; on
        the CPU only their pages are read, and the table keeps its stored dtype (the lookup's output is
        converted). A compressed split's weights are decompressed once on the device, before the conversion.
        ``bytes``: the ranges' lengths (the looked-up rows' pages for a table).
        """
        self._check_open()
        name = self.names[i]
        pieces, lookup = self.layout.pieces[name], rows is not None and not self.cuda
        t0, state, nbytes = time.perf_counter(), {}, 0
        if self.cuda:  # one readinto per range, into a reused pinned buffer
            if self._slot_events[i % 2] is not None:
                # the slot's previous block (i - 2) may still be crossing PCIe: wait for that copy only
                self._slot_events[i % 2].synchronize()
            slot = self._slot(i)
            for piece, offset in zip(pieces, self._offsets[name]):
                data, _ = tensorfiles.read_range(piece.path, piece.start, piece.length,
                                                 slot[offset:offset + piece.length])
                state.update(piece.views(data))
                nbytes += piece.length
        else:
            for piece in pieces:  # a lookup maps without reading ahead, then faults in only the rows' pages
                tensors = piece.views(tensorfiles.map_range(piece.path, piece.start, piece.length,
                                                            populate=not lookup))
                nbytes += tensorfiles.touch_rows(tensors, rows) if lookup else piece.length
                state.update(tensors)
        event = None
        if self.cuda:  # copy on a side stream, so that it overlaps the previous block's compute
            with torch.cuda.stream(self._copy_stream):
                state = {k: v.to(self.device, non_blocking=True) for k, v in state.items()}
                copied = torch.cuda.Event()
                copied.record(self._copy_stream)  # the slot is free again once this fires
                self._slot_events[i % 2] = copied
                state = self._decompress(name, state)  # on the device, on the copy stream
                # convert on the copy stream too: the stored-dtype copy is allocated, read and freed on this one
                # stream, so its memory is reused only in stream order (bf16 files computed in fp16, say)
                state = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in state.items()}
                event = torch.cuda.Event(enable_timing=True)
                event.record(self._copy_stream)
        else:
            state = self._decompress(name, state)
            if not lookup:
                state = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in state.items()}
        return LoadedBlock(i, state, nbytes, event, t0, time.perf_counter())

    def _decompress(self, block: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A compressed split's ``X.weight.q``/``.packed`` + ``.absmax`` back to ``X.weight`` in the compute dtype.

        The codec sees full names (``lm_head.weight.q``, not the block's own ``weight.q``), as the split stores them.
        """
        if self.compression is None:
            return state
        from helpers.quant import decompress_state

        full = decompress_state({f"{block}.{k}": v for k, v in state.items()}, self.compression, self.dtype)
        return {k[len(block) + 1:]: v for k, v in full.items()}

    def take(self, loaded: LoadedBlock) -> dict[str, torch.Tensor]:
        """Hand a loaded block's tensors to the compute, ``loaded`` keeping none of them (so they are freed when
        the module that takes them goes back to ``meta``). On CUDA the compute stream, not the CPU, waits for
        the copy (already in the compute dtype), and each tensor is recorded as used by the compute stream:
        when it is freed, the allocator reuses its memory only after the compute queued so far has run."""
        state, loaded.state = loaded.state, {}
        if loaded.event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(loaded.event)
            for tensor in state.values():
                tensor.record_stream(compute)
        return state

    def release(self, i: int) -> Optional[Future]:
        """Block i is done. With ``cold``, drop the cached pages of its byte ranges (``tensorfiles.drop_page_range``)
        in a thread of their own (off the compute's path and the reader's) and return that job's Future; else
        None."""
        if not self.cold:
            return None
        pieces = self.layout.pieces[self.names[i]]
        return self._dropper.submit(lambda: [tensorfiles.drop_page_range(p.path, p.start, p.length) for p in pieces])

    def stream(self, rows: Optional[Mapping[str, torch.Tensor]] = None,
               indices: Optional[Sequence[int]] = None) -> Iterator[LoadedBlock]:
        """The blocks ``indices`` (default: every block) in that order; with ``prefetch`` the reader thread reads
        the next one while the caller uses this one. ``rows``: {lookup table's block name: the rows this pass
        looks up}. A block is released when the caller asks for the next. Close the iterator
        (``contextlib.closing``) if you stop early."""
        self._check_open()  # here, in the caller's thread: not as a reader thread's refusal to start
        rows = rows or {}
        order = list(range(len(self.names)) if indices is None else indices)
        n = len(order)

        def read(k: int) -> LoadedBlock:
            return self.load(order[k], rows.get(self.names[order[k]]))

        pending: Optional[Future] = None
        drops = []
        try:
            if self.prefetch:
                pending = self._reader.submit(read, 0)
            for i in range(n):
                if self.prefetch:
                    loaded = pending.result()
                    pending = self._reader.submit(read, i + 1) if i + 1 < n else None
                else:
                    loaded = read(i)
                yield loaded
                drops.append(self.release(order[i]))
            for done in drops:
                if done is not None:
                    done.result()  # raises here if dropping a file's pages failed
        finally:
            if pending is not None:  # stopped mid-pass: wait for the reader, then let go of what it read
                pending.cancel() or pending.exception()

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"the block source of {self.checkpoint} is closed (by close() or at the end of a "
                               "with block); make a new LayerStreamer (or BlockSource) to read again")

    def close(self) -> None:
        """Stop the reader and dropper threads and free the read buffers. Closing twice is harmless."""
        self.closed = True
        self._reader.shutdown(wait=True)
        self._dropper.shutdown(wait=True)
        self._slots, self._slot_events = [None, None], [None, None]

    def __enter__(self) -> "BlockSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# =========================================================================== the pass: a Llama-family forward

class Role(enum.Enum):
    """What a block does in a Llama-family forward pass."""

    EMBED = "embed_tokens"  # token ids -> hidden states
    LAYER = "layers"  # one decoder layer: hidden -> hidden, with its KV cache
    NORM = "norm"  # the final norm
    HEAD = "lm_head"  # hidden -> logits


@dataclass(frozen=True)
class Block:
    """One block of the model's skeleton: its name in the split, its role, the module that computes it."""

    name: str
    role: Role
    module: torch.nn.Module = field(repr=False)
    layer: Optional[int] = None  # Role.LAYER: the decoder layer's index (its place in the KV cache)


def llama_blocks(model: torch.nn.Module, names: Sequence[str]) -> list[Block]:
    """A split's blocks with their roles, found by which module each name *is* in a Llama-family model.

    Llama-family models (Llama, Mistral, Qwen2, SmolLM2, ...) are ``model.model.embed_tokens``,
    ``model.model.layers[i]``, ``model.model.norm`` and ``model.lm_head``; ``names`` must be those blocks, in
    that order (a split's ``layers.index.json`` lists them so). Built in chapter 08.
    """
    decoder = getattr(model, "model", None)
    parts = {"model.embed_tokens": getattr(decoder, "embed_tokens", None),
             "model.layers": getattr(decoder, "layers", None), "model.norm": getattr(decoder, "norm", None),
             "lm_head": getattr(model, "lm_head", None)}
    if any(part is None for part in parts.values()):
        raise ValueError(f"{type(model).__name__} is not a Llama-family model: the streamer needs "
                         f"{', '.join(parts)}; it lacks {', '.join(k for k, v in parts.items() if v is None)}")
    roles = {id(parts["model.embed_tokens"]): (Role.EMBED, None), id(parts["model.norm"]): (Role.NORM, None),
             id(parts["lm_head"]): (Role.HEAD, None),
             **{id(layer): (Role.LAYER, i) for i, layer in enumerate(parts["model.layers"])}}
    blocks = []
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if module is None or id(module) not in roles:
            raise ValueError(f"block {name!r} is none of a Llama-family model's blocks (model.embed_tokens, "
                             "model.layers.<i>, model.norm, lm_head)")
        role, layer = roles[id(module)]
        blocks.append(Block(name, role, module, layer))
    n = len(parts["model.layers"])
    expected = [(Role.EMBED, None), *[(Role.LAYER, i) for i in range(n)], (Role.NORM, None), (Role.HEAD, None)]
    if [(b.role, b.layer) for b in blocks] != expected:
        raise ValueError(f"blocks {list(names)} are not a forward pass in order; expected model.embed_tokens, "
                         f"model.layers.0 to model.layers.{n - 1}, model.norm, lm_head")
    return blocks


@dataclass
class ForwardState:
    """What a forward pass carries from block to block."""

    hidden: Optional[torch.Tensor] = None  # (batch, seq, hidden) activations
    position_ids: Optional[torch.Tensor] = None  # (batch, seq)
    mask: Optional[torch.Tensor] = None  # the causal mask every layer applies (None: plain causal attention)
    position_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # rotary cos and sin
    logits: Optional[torch.Tensor] = None  # (batch, seq or 1, vocab), float32


@dataclass
class ScoreState:
    """One question of ``score``/``score_many``: its inputs, and what it carries from block to block."""

    prefix_ids: torch.Tensor  # (1, P) the shared prefix
    suffix: torch.Tensor  # (n, S) the suffixes, right-padded with 0
    lengths: torch.Tensor  # (n,) each suffix's real length
    suffix_mask: torch.Tensor  # (n, 1, S, P + S) what each suffix token may see (bool, or additive for eager)
    cache: object = None  # the prefix's K and V, one layer at a time (a transformers DynamicCache)
    prefix: Optional[torch.Tensor] = None  # (1, P, hidden) activations of the prefix
    suffixes: Optional[torch.Tensor] = None  # (n, S, hidden) activations of the suffixes
    prefix_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # rotary cos, sin at 0 .. P - 1
    prefix_mask: Optional[torch.Tensor] = None  # the prefix's causal mask (None: the attention's own causal path)
    suffix_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # ... at P .. P + S - 1
    hidden: Optional[torch.Tensor] = None  # (n, 1 + S, hidden) after the norm: the prefix's last token, then the suffix
    scores: Optional[torch.Tensor] = None  # (n,) float32

    @property
    def carried_elements(self) -> int:
        """Activations carried between blocks, in elements of the hidden size: the prefix and every suffix."""
        return self.prefix_ids.shape[1] + self.suffix.numel()


class LayerStreamer:
    """Run a Llama-family causal LM from disk, one block at a time. Built in chapter 08.

    ``checkpoint``: a per-layer split (a folder with ``layers.index.json``, from
    ``helpers.checkpoints.split_by_layer``, compressed or not), or an ordinary checkpoint folder
    (``model.safetensors.index.json`` and its shards, or a lone ``model.safetensors``, with ``config.json``),
    streamed in place from its shards: nothing is written, the blocks and their order are the split's, and
    the results are identical. Its headers are read once, here; a folder that is neither, or an index naming
    a missing shard, fails before any weight is read. ``layer_dir`` is the same path (an older name).
    ``device``: where blocks compute (default CUDA when present, else CPU). ``dtype``: compute dtype, as
    ``helpers.meta.parse_dtype`` reads it (default: the checkpoint's). ``prefetch``: read block i + 1 in a
    background thread while block i computes. ``drop_page_cache``: forget each block's file pages once the
    block is done, so that every pass reads the disk (Linux); kept as ``cold``. ``attn_implementation``:
    transformers' attention ("sdpa", "eager", ...; default: transformers' choice for the config).
    ``resident_bytes``: a budget (bytes, or a size such as "2GB") of blocks that stay on the device after their
    first read and are never read again: in execution order, each block whose weights (in the compute dtype)
    still fit; ``resident_blocks`` names those held now. The budget is for the weights only: the pass still
    needs room for one or two streamed blocks and the activations beside them.
    Results are on the CPU whatever ``device``: ``forward`` float32 logits, ``score`` float32 scores,
    ``generate`` int64 ids.
    After each pass, ``timeline`` holds one record per block: ``block``, ``bytes`` (read from disk: the
    block's byte ranges, compressed if the split is; on the CPU the embedding's looked-up rows' pages),
    ``read_start``, ``read_end``, ``compute_start``, ``compute_end`` (seconds since the pass started), and
    ``resident`` (True: held from an earlier pass, nothing read, ``bytes`` 0). On the CPU all four are host
    clock times. On CUDA, ``read_start`` is host time and the other three come from CUDA events
    (``read_end``: the block's copy and conversion done on the copy stream; ``compute_*``: its kernels on the
    compute stream), measured from an event recorded as the pass starts; the host launches kernels ahead of
    the GPU, so host times would show only the launches.
    Only the Llama family runs (``check_architecture``): another ``model_type`` is a ``ValueError`` before
    any weight is read.
    Use it in a ``with`` block (or call ``close()``) to stop its reader threads and free its buffers.
    """

    def __init__(self, checkpoint: Union[str, Path], *, device: Union[str, torch.device, None] = None,
                 dtype: Union[torch.dtype, str, None] = None, prefetch: bool = True, drop_page_cache: bool = False,
                 progress: bool = True, attn_implementation: Optional[str] = None,
                 resident_bytes: Union[int, str] = 0):
        from transformers import AutoConfig, AutoModelForCausalLM

        from helpers.memory import parse_size

        self.checkpoint = Path(checkpoint)
        tensorfiles.layout_kind(self.checkpoint)  # first: a folder that is neither layout fails clearly
        if isinstance(resident_bytes, bool) or not isinstance(resident_bytes, (int, str)):
            raise ValueError(f"resident_bytes must be a byte count (an int, or a size such as '2GB'); got "
                             f"{resident_bytes!r}")
        try:
            resident_bytes = parse_size(resident_bytes)
        except ValueError as e:
            raise ValueError(f"resident_bytes must be >= 0: {e}") from None
        if dtype is not None:
            dtype = parse_dtype(dtype)
            if not dtype.is_floating_point:
                raise ValueError(f"dtype {dtype!r} must be a floating-point dtype such as torch.float32 or 'bf16'")
        self.device = torch.device(device if device is not None else
                                   ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asks for CUDA, but torch.cuda.is_available() is False")
        self.config = AutoConfig.from_pretrained(self.checkpoint)
        self.sliding_window = check_architecture(self.config)  # before any weight file is opened
        layout = tensorfiles.block_layout(self.checkpoint)  # every header, once; a missing file fails here
        self.dtype = dtype or parse_dtype(self.config.dtype or "float32")
        self.progress = progress
        extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype, **extra).eval()
        self.blocks = llama_blocks(self.model, layout.blocks)
        rotary = self.model.model.rotary_emb  # buffers only: rebuild it for real on the device
        self.rotary_emb = type(rotary)(config=self.model.config).to(self.device)
        self.source = BlockSource(self.checkpoint, device=self.device, dtype=self.dtype, prefetch=prefetch,
                                  cold=drop_page_cache, layout=layout)
        self.timeline: list[dict] = []
        # Blocks that stay on the device after their first read: in execution order, each that still fits
        self.resident_bytes, self._keep, left = resident_bytes, set(), resident_bytes
        for i, block in enumerate(self.blocks):
            need = sum(p.numel() for p in block.module.parameters()) * self.dtype.itemsize
            if need <= left:
                self._keep.add(i)
                left -= need
        self._resident: set[int] = set()  # of those, the ones read already

    @property
    def layer_dir(self) -> Path:
        """The folder streamed (the name from when only per-layer splits were): ``checkpoint``."""
        return self.checkpoint

    @property
    def compression(self) -> Optional[str]:
        """How the split being streamed stores its linear weights: None, "int8" or "nf4" (None in place)."""
        return self.source.compression

    @property
    def prefetch(self) -> bool:
        """Whether block i + 1 is read while block i computes."""
        return self.source.prefetch

    @property
    def resident_blocks(self) -> list[str]:
        """Names of the blocks held on the device now (read once, never again), in execution order."""
        return [self.blocks[i].name for i in sorted(self._resident)]

    @property
    def cold(self) -> bool:
        """Whether every pass reads the disk (``drop_page_cache=True``): each block's pages are dropped after it."""
        return self.source.cold

    # ------------------------------------------------------------------ the engine
    def run_pass(self, step: Callable[[Block], None], ids: torch.Tensor, desc: str = "blocks") -> None:
        """One pass, the engine under every policy: for each block in order, take its weights from the source,
        call ``step(block)`` (which runs the batch through ``block.module``), send the block back to ``meta``.

        ``forward``, ``generate`` and ``score`` are such steps; a new policy is a new step. ``ids``: every token
        id the pass looks up, so the embedding reads only those rows. Built in chapter 08.
        """
        from tqdm.auto import tqdm

        rows = {b.name: torch.unique(ids.cpu()) for b in self.blocks if b.role is Role.EMBED}
        cuda = self.device.type == "cuda"
        timed = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
        if cuda:  # the pass's zero on the GPU's clock
            compute_stream = torch.cuda.current_stream(self.device)
            start = timed()
            start.record(compute_stream)
        t0, timeline, events = time.perf_counter(), [], []
        bar = tqdm(total=len(self.blocks), desc=desc, unit="block", leave=False, disable=not self.progress)
        try:
            resident = set(self._resident)  # read in an earlier pass: not read in this one
            streamed = [i for i in range(len(self.blocks)) if i not in resident]
            with closing(self.source.stream(rows, streamed)) as loads:
                for i, block in enumerate(self.blocks):
                    if i in resident:
                        loaded = None
                        r = time.perf_counter()
                    else:
                        loaded = next(loads)
                        block.module.load_state_dict(self.source.take(loaded), strict=True, assign=True)
                    c0 = time.perf_counter()
                    if cuda:
                        e0, e1 = timed(), timed()
                        e0.record(compute_stream)
                    with torch.inference_mode():
                        step(block)
                    if cuda:
                        e1.record(compute_stream)
                        events.append((None if loaded is None else loaded.event, e0, e1))
                        # wait for this block's kernels only, not the whole device (the copy stream runs on): the
                        # host may not queue block after block while their copies pile up on the card, so at most
                        # two blocks of weights are there, this one and the next, which the reader is copying
                        e1.synchronize()
                    c1 = time.perf_counter()
                    if i in self._keep:
                        if i not in resident:  # resident from now on, for every later pass
                            if not cuda:  # on the CPU its tensors map the file: copy them into memory of its own
                                block.module._apply(torch.clone)
                            self._resident.add(i)
                    else:
                        block.module.to("meta")  # free the block's weights (on the CPU: unmap its file)
                    if loaded is None:
                        read_start = read_end = r - t0
                        nbytes = 0
                    else:
                        read_start, read_end, nbytes = loaded.read_start - t0, loaded.read_end - t0, loaded.bytes
                    timeline.append({"block": block.name, "bytes": nbytes, "read_start": read_start,
                                     "read_end": read_end, "compute_start": c0 - t0, "compute_end": c1 - t0,
                                     "resident": loaded is None})
                    bar.update()
            if cuda:  # every block's kernels have run (the last wait above): the events' times
                for record, (copied, e0, e1) in zip(timeline, events):
                    read_end = record["read_end"] if copied is None else start.elapsed_time(copied) / 1e3
                    record.update(read_end=read_end, compute_start=start.elapsed_time(e0) / 1e3,
                                  compute_end=start.elapsed_time(e1) / 1e3)
        finally:
            bar.refresh()  # the bar's last state is shown (and saved in a notebook) complete, not mid-way
            bar.close()
            for i, block in enumerate(self.blocks):  # all but the resident blocks back to meta, even on an error
                if i not in self._resident:
                    block.module.to("meta")
        self.timeline = timeline

    # ------------------------------------------------------------------ inputs
    def _ids(self, ids, what: str) -> torch.Tensor:
        ids = torch.as_tensor(ids)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.numel() == 0 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{what} must be a non-empty (batch, seq) tensor of token ids; got shape "
                             f"{tuple(ids.shape)} and dtype {ids.dtype}")
        if int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
            raise ValueError(f"{what} holds ids outside [0, {self.config.vocab_size}) (the vocabulary): "
                             f"min {int(ids.min())}, max {int(ids.max())}")
        return ids.long().to(self.device)

    def _check_window(self, length: int) -> None:
        """A sliding-window model (Mistral, some Qwen2) runs unchanged only while every sequence fits the window."""
        if self.sliding_window is not None and length > self.sliding_window:
            raise ValueError(f"a pass over {length} positions exceeds the sliding window of {self.sliding_window} "
                             f"of this {self.config.model_type} model; LayerStreamer computes full causal attention, "
                             "equal to the model's only up to the window")

    def _mask(self, attention_mask, ids: torch.Tensor) -> Optional[torch.Tensor]:
        if attention_mask is None:
            return None
        mask = torch.as_tensor(attention_mask)
        if mask.dim() == 1:
            mask = mask[None]
        if tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; expected {tuple(ids.shape)}, "
                             "the shape of input_ids")
        return mask.long().to(self.device)

    # ------------------------------------------------------------------ policies
    def _pass(self, ids, mask, cache, position_ids, last_only: bool, desc: str) -> torch.Tensor:
        """A forward pass (with ``cache``, one step of generation); returns the logits."""
        from transformers.masking_utils import create_causal_mask

        self._check_window((cache.get_seq_length() if cache is not None else 0) + ids.shape[1])
        s = ForwardState()

        def step(block: Block) -> None:
            if block.role is Role.EMBED:
                s.hidden = block.module(ids).to(self.dtype)
                past = cache.get_seq_length() if cache is not None else 0
                s.position_ids = position_ids if position_ids is not None else \
                    torch.arange(past, past + ids.shape[1], device=self.device)[None]
                s.mask = create_causal_mask(config=self.model.config, inputs_embeds=s.hidden, attention_mask=mask,
                                            cache=cache, position_ids=s.position_ids)
                s.position_embeddings = self.rotary_emb(s.hidden, position_ids=s.position_ids)
            elif block.role is Role.LAYER:
                s.hidden = block.module(s.hidden, attention_mask=s.mask, position_ids=s.position_ids, cache=cache,
                                        use_cache=cache is not None, position_embeddings=s.position_embeddings)
            elif block.role is Role.NORM:
                s.hidden = block.module(s.hidden[:, -1:] if last_only else s.hidden)
            elif block.role is Role.HEAD:
                s.logits = block.module(s.hidden).float()

        self.run_pass(step, ids, desc)
        return s.logits

    def forward(self, input_ids, attention_mask=None, *, last_only: bool = False) -> torch.Tensor:
        """Logits (batch, seq, vocab), or (batch, 1, vocab) with ``last_only``: float32, on the CPU whatever the
        compute device. Built in chapter 08."""
        ids = self._ids(input_ids, "input_ids")
        return self._pass(ids, self._mask(attention_mask, ids), None, None, last_only, "forward").cpu()

    __call__ = forward

    def generate(self, input_ids, max_new_tokens: int, *, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, attention_mask=None, seed: Optional[int] = None,
                 eos_token_id: Optional[int] = None) -> torch.Tensor:
        """Prompt plus up to ``max_new_tokens`` new ids (int64, on the CPU); one streamed pass per token, KV cache
        per layer. Built in chapter 08.

        Greedy by default (identical to ``model.generate(do_sample=False)``); ``do_sample`` samples with
        ``temperature`` and nucleus ``top_p``. With ``eos_token_id`` it stops once every row has produced it.
        """
        from transformers import DynamicCache

        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens {max_new_tokens!r} must be an int >= 1")
        if do_sample and not (temperature > 0 and 0 < top_p <= 1):
            raise ValueError(f"temperature {temperature!r} must be > 0 and top_p {top_p!r} in (0, 1]")
        ids = self._ids(input_ids, "input_ids")
        mask = self._mask(attention_mask, ids)
        pos = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)  # as HF generate does for left padding
        gen = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
        cache, out = DynamicCache(config=self.model.config), [ids]
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=self.device)
        logits = self._pass(ids, mask, cache, pos, True, "prefill")
        for k in range(max_new_tokens):
            nxt = self._pick(logits[:, -1], do_sample, temperature, top_p, gen)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            out.append(nxt[:, None])
            if k + 1 == max_new_tokens or bool(done.all()):
                break
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                pos = pos[:, -1:] + 1
            logits = self._pass(nxt[:, None], mask, cache, pos, True, f"token {k + 2}")
        return torch.cat(out, dim=1).cpu()

    @staticmethod
    def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, gen) -> torch.Tensor:
        if not do_sample:
            return logits.argmax(-1)
        probs = torch.softmax(logits / temperature, dim=-1)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the smallest set whose mass reaches top_p
        sorted_p = sorted_p * keep
        choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=gen)
        return order.gather(-1, choice)[:, 0]

    def score(self, prefix_ids, suffix_ids: Sequence) -> torch.Tensor:
        """Sum log-probability of each suffix after one shared prefix; the prefix's KV is computed once per layer.

        ``suffix_ids``: a list of 1-D id sequences (lengths may differ) or a (n, S) tensor. Returns a float32
        tensor of n scores on the CPU, equal to scoring each ``prefix + suffix`` separately. The prefix runs
        under the causal mask of the model's attention implementation (eager needs one written out: without
        it the prefix would attend both ways); each suffix sees the whole prefix and its own earlier tokens.
        Built in chapter 08.
        """
        return self.score_many([(prefix_ids, suffix_ids)])[0]

    def score_many(self, questions: Sequence, *, max_carried_bytes: Optional[int] = None) -> list[torch.Tensor]:
        """``score`` for many questions, reading every block once for all of them: the Kaggle design.

        ``questions``: a list of ``(prefix_ids, suffix_ids)``, each as ``score`` takes them. Returns one float32
        CPU tensor per question, equal to ``score`` of that question. Each block, once loaded, runs every
        question in turn, so a call costs one read of the model instead of one per question. What must stay in
        memory between blocks is every question's activations (prefix and suffixes, ``hidden_size`` values per
        token); ``max_carried_bytes`` caps them: questions are split, in order, into groups that fit, and each
        group is one pass (one read). Every question is checked before anything is read. Built in chapter 08.
        """
        if not isinstance(questions, (list, tuple)) or not questions:
            raise ValueError("questions must be a non-empty list of (prefix_ids, suffix_ids) pairs; got "
                             f"{type(questions).__name__} {questions!r:.80}")
        states = []
        for i, q in enumerate(questions):
            if not isinstance(q, (list, tuple)) or len(q) != 2:
                raise ValueError(f"questions[{i}] must be a (prefix_ids, suffix_ids) pair; got {q!r:.80}")
            states.append(self._question(*q, what=f"questions[{i}]"))
        per_element = self.config.hidden_size * self.dtype.itemsize
        groups, group, carried = [], [], 0
        for i, st in enumerate(states):
            need = st.carried_elements * per_element
            if max_carried_bytes is not None and need > max_carried_bytes:
                raise ValueError(f"questions[{i}] alone carries {need} bytes of activations between blocks, "
                                 f"more than max_carried_bytes={max_carried_bytes}")
            if group and max_carried_bytes is not None and carried + need > max_carried_bytes:
                groups.append(group)
                group, carried = [], 0
            group.append(st)
            carried += need
        groups.append(group)
        for group in groups:
            def step(block: Block, group=group) -> None:
                for st in group:
                    self._score_step(st, block)
                    if block.role is Role.LAYER:  # this layer's cache is not needed again
                        layer = st.cache.layers[block.layer]
                        layer.keys = layer.values = None

            ids = torch.cat([t.flatten() for st in group for t in (st.prefix_ids, st.suffix)])
            self.run_pass(step, ids, "score")
        return [st.scores.cpu() for st in states]

    def _question(self, prefix_ids, suffix_ids, what: str) -> ScoreState:
        """Check one question and lay out its inputs; nothing is read or computed yet."""
        from transformers import DynamicCache

        prefix = self._ids(prefix_ids, f"{what} prefix_ids")
        if prefix.shape[0] != 1:
            raise ValueError(f"{what} prefix_ids must be one sequence; got a batch of {prefix.shape[0]}")
        if isinstance(suffix_ids, torch.Tensor) and suffix_ids.dim() == 2:
            suffix_ids = list(suffix_ids)
        if not isinstance(suffix_ids, (list, tuple)) or not suffix_ids:
            raise ValueError(f"{what} suffix_ids must be a non-empty list of token-id sequences (or a 2-D tensor)")
        suffixes = [self._ids(x, f"{what} suffix_ids[{i}]")[0] for i, x in enumerate(suffix_ids)]
        n, P = len(suffixes), prefix.shape[1]
        lengths = torch.tensor([len(x) for x in suffixes], device=self.device)
        S = int(lengths.max())
        self._check_window(P + S)
        suffix = torch.zeros(n, S, dtype=torch.long, device=self.device)
        for i, x in enumerate(suffixes):  # right padding: causal attention never lets a real token see it
            suffix[i, :len(x)] = x
        allowed = torch.arange(P + S, device=self.device)[None] <= P + torch.arange(S, device=self.device)[:, None]
        suffix_mask = allowed[None, None].expand(n, 1, S, P + S)
        if self.model.config._attn_implementation == "eager":
            suffix_mask = torch.zeros(suffix_mask.shape, dtype=self.dtype, device=self.device).masked_fill(
                ~suffix_mask, torch.finfo(self.dtype).min)
        return ScoreState(prefix_ids=prefix, suffix=suffix, lengths=lengths, suffix_mask=suffix_mask,
                          cache=DynamicCache(config=self.model.config))

    def _score_step(self, s: ScoreState, block: Block) -> None:
        """Run one question through one block."""
        from transformers.masking_utils import create_causal_mask

        n, S = s.suffix.shape
        P = s.prefix_ids.shape[1]
        if block.role is Role.EMBED:
            s.prefix, s.suffixes = block.module(s.prefix_ids).to(self.dtype), block.module(s.suffix).to(self.dtype)
            prefix_positions = torch.arange(P, device=self.device)[None]
            s.prefix_embeddings = self.rotary_emb(s.prefix, prefix_positions)
            # the prefix's own causal mask, as the model builds it (None for sdpa: its is_causal path)
            s.prefix_mask = create_causal_mask(config=self.model.config, inputs_embeds=s.prefix,
                                               attention_mask=None, cache=s.cache, position_ids=prefix_positions)
            s.suffix_embeddings = self.rotary_emb(s.suffixes, torch.arange(P, P + S, device=self.device)[None])
        elif block.role is Role.LAYER:
            s.prefix = block.module(s.prefix, attention_mask=s.prefix_mask, cache=s.cache, use_cache=True,
                                    position_embeddings=s.prefix_embeddings)
            layer = s.cache.layers[block.layer]  # the prefix's K and V, shared (not copied) by every suffix
            layer.keys, layer.values = layer.keys.expand(n, -1, -1, -1), layer.values.expand(n, -1, -1, -1)
            s.suffixes = block.module(s.suffixes, attention_mask=s.suffix_mask, cache=s.cache, use_cache=True,
                                      position_embeddings=s.suffix_embeddings)
        elif block.role is Role.NORM:
            s.hidden = block.module(torch.cat([s.prefix[:, -1:].expand(n, -1, -1), s.suffixes], dim=1))
        elif block.role is Role.HEAD:
            logp = torch.log_softmax(block.module(s.hidden[:, :-1]).float(), dim=-1)
            token_logp = logp.gather(-1, s.suffix[..., None])[..., 0]
            real = torch.arange(S, device=self.device)[None] < s.lengths[:, None]
            s.scores = (token_logp * real).sum(-1)

    @property
    def bytes_per_pass(self) -> int:
        """Bytes the last pass read from disk: every block's tensors (as stored: a compressed split's compressed
        bytes; headers are read once, when the streamer is made), except that on the CPU the embedding reads only
        the pages of the rows it looked up (tied weights are read twice)."""
        if not self.timeline:
            raise RuntimeError("no pass has run yet: call forward, generate or score first")
        return sum(r["bytes"] for r in self.timeline)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Stop the reader threads, free the read buffers (the source's) and the resident blocks. Closing twice is
        harmless."""
        self.source.close()
        self.model.to("meta")
        self._resident.clear()

    def __enter__(self) -> "LayerStreamer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
