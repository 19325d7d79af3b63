"""``LayerStreamer``: a Llama-family model run from disk one block at a time, the whole batch per block.

Built in chapter 08. It puts three pieces together: where the blocks are (``helpers.layout``), how transformers
runs them (``Llama``, the adapter) and the engine's loop (``stream_pass`` over a ``BlockSource``, with
``Resident`` blocks and ``BlockTimeline``/``Progress`` observers). ``forward``, ``generate``, ``score`` and
``score_many`` are policies: each is a step run on every block, with its own small state.

Every public result is on the CPU: ``forward``'s logits and ``score``'s scores in float32, ``generate``'s ids
in int64, whatever the compute device, so that they compare directly with any reference.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from helpers.layout import block_layout, layout_kind
from helpers.memory import parse_size
from helpers.meta import parse_dtype
from helpers.tensorfiles import CheckpointError

from .bnb import bnb_codec, check_quantization
from .engine import BlockSource, BlockTimeline, Progress, Resident, stream_pass
from .llama import Block, ForwardState, Llama, Role, ScoreState
from .speculative import check_request, speculate

__all__ = ["LayerStreamer", "choose_resident", "group_in_order", "pick", "predicted_peak_bytes"]


class LayerStreamer:
    """Run a Llama-family causal LM from disk, one block at a time. Built in chapter 08.

    ``checkpoint``: an ordinary checkpoint folder (``model.safetensors.index.json`` and its shards, or a lone
    ``model.safetensors``, with ``config.json``), streamed in place from its shards (nothing is written), or a
    per-layer split (``helpers.checkpoints.split_by_layer``, compressed or not: a compressed split names its
    codec, found with ``helpers.quant.codec``). A checkpoint bitsandbytes quantized to 4 or 8 bits (``config.json``'s
    ``quantization_config``: the Hub's ``*-bnb-4bit`` and ``*-bnb-8bit`` models) is streamed in place too, decoded
    on the device (``bnb.BnB4bit``, ``bnb.BnB8bit``); any other quantized format is refused
    (``bnb.check_quantization``). Its headers are read
    once, here; a folder that is neither, an index naming a missing shard, or a quantization it cannot decode
    fails before any weight is read.
    ``device``: where blocks compute (default CUDA when present, else CPU). ``dtype``: compute dtype, as
    ``helpers.meta.parse_dtype`` reads it (default: the checkpoint's). ``read``: how blocks are read,
    ``helpers.reader.READS`` ("direct" by default, falling back to "buffered" where the file system refuses
    it). ``prefetch``: read block i + 1 while block i computes. ``drop_page_cache``: forget each block's
    cached pages once it is done, so that every buffered or mapped pass reads the disk (Linux); kept as
    ``cold``. ``attn_implementation``: transformers' attention ("sdpa", "eager", ...).
    ``resident_bytes``: a budget (bytes, or a size such as "2GB") of blocks that stay on the device after
    their first read and are never read again: those that save the most bytes read per byte of budget
    (``resident_blocks`` names those held now, in execution order). The budget is for the weights only.
    After each pass, ``timeline`` holds one record per block (``engine.BlockTimeline``) and ``passes`` counts the
    passes made so far. Only the Llama family runs (``helpers.streaming.check_architecture``).
    Use it in a ``with`` block (or call ``close()``) to stop its reader threads and free its buffers.
    """

    def __init__(self, checkpoint: Union[str, Path], *, device: Union[str, torch.device, None] = None,
                 dtype: Union[torch.dtype, str, None] = None, prefetch: bool = True, drop_page_cache: bool = False,
                 progress: bool = True, attn_implementation: Optional[str] = None,
                 resident_bytes: Union[int, str] = 0, read: str = "direct"):
        from helpers.quant import codec as find_codec
        from helpers.reader import READS

        self.checkpoint = Path(checkpoint)
        layout_kind(self.checkpoint)  # first: a folder that is neither layout fails clearly
        quantization = check_quantization(self.checkpoint)  # bitsandbytes 4-/8-bit, None, or refused here
        if isinstance(resident_bytes, bool) or not isinstance(resident_bytes, (int, str)):
            raise ValueError(f"resident_bytes must be a byte count (an int, or a size such as '2GB'); got "
                             f"{resident_bytes!r}")
        try:
            resident_bytes = parse_size(resident_bytes)
        except ValueError as e:
            raise ValueError(f"resident_bytes must be >= 0: {e}") from None
        if read not in READS:
            raise ValueError(f"read {read!r} must be one of {', '.join(map(repr, READS))}")
        if dtype is not None:
            dtype = parse_dtype(dtype)
            if not dtype.is_floating_point:
                raise ValueError(f"dtype {dtype!r} must be a floating-point dtype such as torch.float32 or 'bf16'")
        self.device = torch.device(device if device is not None else
                                   ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asks for CUDA, but torch.cuda.is_available() is False")
        self.llama = Llama(self.checkpoint, device=self.device, dtype=dtype,  # the config is checked first
                           attn_implementation=attn_implementation)
        layout = block_layout(self.checkpoint)  # every header, once; a missing file fails here
        self.llama.find_blocks(layout.blocks)
        codec = None
        if layout.compression is not None:
            try:
                codec = find_codec(layout.compression)
            except ValueError as e:
                raise CheckpointError(self.checkpoint / "layers.index.json", [str(e)]) from None
        elif quantization is not None:  # bitsandbytes, read in place: the codes cross the bus, not the floats
            codec = bnb_codec(quantization, layout)
        self.source = BlockSource(self.checkpoint, device=self.device, dtype=self.dtype, codec=codec,
                                  prefetch=prefetch, cold=drop_page_cache, read=read, layout=layout,
                                  lookups=[b.name for b in self.blocks if b.role is Role.EMBED])
        self.resident_bytes = resident_bytes
        held = [sum(p.numel() for p in b.module.parameters()) * self.dtype.itemsize for b in self.blocks]
        lookup = self.device.type != "cuda"  # on the CPU an embedding reads only the rows a pass looks up
        read = [0 if lookup and b.role is Role.EMBED else layout.bytes(b.name) for b in self.blocks]
        self.resident = Resident(self.source, choose_resident(read, held, resident_bytes))
        self.progress, self.timeline, self.passes, self.speculation = progress, [], 0, None

    # ------------------------------------------------------------------ what it is
    config = property(lambda self: self.llama.config, doc="The model's transformers config.")
    model = property(lambda self: self.llama.model, doc="The model's skeleton, on ``meta`` between blocks.")
    blocks = property(lambda self: self.llama.blocks, doc="The blocks in execution order (``Block``).")
    dtype = property(lambda self: self.llama.dtype, doc="The compute dtype.")
    prefetch = property(lambda self: self.source.prefetch, doc="Whether block i + 1 is read while block i computes.")
    cold = property(lambda self: self.source.cold, doc="Whether each block's cached pages are dropped after it.")
    read = property(lambda self: self.source.reader.method, doc="How blocks are read now (``helpers.reader``).")

    @property
    def compression(self) -> Optional[str]:
        """The codec of what is streamed: "int8" or "nf4" (a compressed split), "bnb-4bit" or "bnb-8bit" (a
        bitsandbytes checkpoint, in place), else None."""
        return None if self.source.codec is None else self.source.codec.name

    @property
    def resident_blocks(self) -> list[str]:
        """Names of the blocks held on the device now (read once, never again), in execution order."""
        return [self.blocks[i].name for i in sorted(self.resident.held)]

    @property
    def bytes_per_pass(self) -> int:
        """Bytes the last pass read from disk: every block's tensors (as stored: a compressed split's compressed
        bytes), except that on the CPU the embedding reads only the pages of the rows it looked up (tied
        weights are read twice), and resident blocks read nothing."""
        if not self.timeline:
            raise RuntimeError("no pass has run yet: call forward, generate or score first")
        return sum(r["bytes"] for r in self.timeline)

    # ------------------------------------------------------------------ the engine
    def run_pass(self, step: Callable[[Block], None], ids: torch.Tensor, desc: str = "blocks") -> None:
        """One pass (``engine.stream_pass``): ``step(block)`` runs the batch through each block in turn.
        ``forward``, ``generate`` and ``score`` are such steps; a new policy is a new step. ``ids``: every token
        id the pass looks up, so the embedding reads only those rows. Built in chapter 08."""
        self.source.rows = {b.name: torch.unique(ids.cpu()) for b in self.blocks if b.role is Role.EMBED}
        observers = [BlockTimeline(self.device), Progress(len(self.blocks), desc, self.progress)]
        for observer in observers:
            observer.start()
        try:
            stream_pass(self.blocks, self.resident, step, observers)
            self.source.finish()
        finally:
            for observer in observers:
                observer.finish()
        self.timeline, self.passes = observers[0].records, self.passes + 1

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

    # ------------------------------------------------------------------ policies
    def pass_logits(self, state: ForwardState, desc: str = "forward") -> torch.Tensor:
        """One forward pass of ``state`` (its cache, if any, extended); the logits, on the compute device."""
        self.llama.check_window(self.llama.cached_tokens(state.cache) + state.ids.shape[1])
        self.run_pass(lambda block: self.llama.forward_step(state, block), state.ids, desc)
        return state.logits

    def forward(self, input_ids, attention_mask=None, *, last_only: bool = False) -> torch.Tensor:
        """Logits (batch, seq, vocab), or (batch, 1, vocab) with ``last_only``: float32, on the CPU whatever the
        compute device. Built in chapter 08."""
        ids = self._ids(input_ids, "input_ids")
        state = ForwardState(ids, padding_mask(attention_mask, ids), last_only=last_only)
        return self.pass_logits(state).cpu()

    __call__ = forward

    def generate(self, input_ids, max_new_tokens: int, *, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, attention_mask=None, seed: Optional[int] = None,
                 eos_token_id: Optional[int] = None, draft=None, draft_tokens: int = 4) -> torch.Tensor:
        """Prompt plus up to ``max_new_tokens`` new ids (int64, on the CPU); one streamed pass per token, KV cache
        per layer. Built in chapter 08.

        Greedy by default (identical to ``model.generate(do_sample=False)``); ``do_sample`` samples with
        ``temperature`` and nucleus ``top_p``. With ``eos_token_id`` it stops once every row has produced it.
        ``draft`` (chapter 09): a causal LM in memory that shares the tokenizer; each streamed pass then verifies
        ``draft_tokens`` tokens it proposed (``speculative.speculate``), greedy only and one sequence only, and the
        output is the same token for token. ``speculation`` then says what the passes carried.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens {max_new_tokens!r} must be an int >= 1")
        if do_sample and not (temperature > 0 and 0 < top_p <= 1):
            raise ValueError(f"temperature {temperature!r} must be > 0 and top_p {top_p!r} in (0, 1]")
        ids = self._ids(input_ids, "input_ids")
        mask = padding_mask(attention_mask, ids)
        if draft is not None:
            check_request(self.llama, ids, mask, max_new_tokens, do_sample, draft, draft_tokens)  # before any read
            out, self.speculation = speculate(self.pass_logits, self.llama, ids, max_new_tokens, draft,
                                              draft_tokens, eos_token_id)
            return out
        pos = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)  # as HF generate does for left padding
        gen = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
        cache, out = self.llama.new_cache(), [ids]
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=self.device)
        logits = self.pass_logits(ForwardState(ids, mask, cache, pos, last_only=True), "prefill")
        for k in range(max_new_tokens):
            nxt = pick(logits[:, -1], do_sample, temperature, top_p, gen)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            out.append(nxt[:, None])
            if k + 1 == max_new_tokens or bool(done.all()):
                break
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                pos = pos[:, -1:] + 1
            logits = self.pass_logits(ForwardState(nxt[:, None], mask, cache, pos, last_only=True), f"token {k + 2}")
        return torch.cat(out, dim=1).cpu()

    def score(self, prefix_ids, suffix_ids: Sequence) -> torch.Tensor:
        """Sum log-probability of each suffix after one shared prefix; the prefix's KV is computed once per layer.

        ``suffix_ids``: a list of 1-D id sequences (lengths may differ) or a (n, S) tensor. Returns a float32
        tensor of n scores on the CPU, equal to scoring each ``prefix + suffix`` separately. The prefix runs
        under the causal mask of the model's attention implementation; each suffix sees the whole prefix and
        its own earlier tokens. Built in chapter 08.
        """
        return self.score_many([(prefix_ids, suffix_ids)])[0]

    def score_many(self, questions: Sequence, *, max_carried_bytes: Optional[int] = None) -> list[torch.Tensor]:
        """``score`` for many questions, reading every block once for all of them: the Kaggle design.

        ``questions``: a list of ``(prefix_ids, suffix_ids)``, each as ``score`` takes them. Returns one float32
        CPU tensor per question, equal to ``score`` of that question. Each block, once loaded, runs every
        question in turn, so a call costs one read of the model instead of one per question. What must stay in
        memory between blocks is every question's activations (``hidden_size`` values per token);
        ``max_carried_bytes`` caps them: questions are split, in order, into groups that fit, and each group is
        one pass. Every question is checked before anything is read. Built in chapter 08.
        """
        if not isinstance(questions, (list, tuple)) or not questions:
            raise ValueError("questions must be a non-empty list of (prefix_ids, suffix_ids) pairs; got "
                             f"{type(questions).__name__} {questions!r:.80}")
        states = []
        for i, q in enumerate(questions):
            if not isinstance(q, (list, tuple)) or len(q) != 2:
                raise ValueError(f"questions[{i}] must be a (prefix_ids, suffix_ids) pair; got {q!r:.80}")
            states.append(self._question(*q, what=f"questions[{i}]"))
        carried = [st.carried_elements * self.config.hidden_size * self.dtype.itemsize for st in states]
        for group in group_in_order(states, carried, max_carried_bytes):
            ids = torch.cat([t.flatten() for st in group for t in (st.prefix_ids, st.suffix)])
            self.run_pass(lambda block, group=group: [self.llama.score_step(st, block) for st in group], ids, "score")
        return [st.scores.cpu() for st in states]

    def _question(self, prefix_ids, suffix_ids, what: str) -> ScoreState:
        """Check one question and lay out its inputs; nothing is read or computed yet."""
        prefix = self._ids(prefix_ids, f"{what} prefix_ids")
        if prefix.shape[0] != 1:
            raise ValueError(f"{what} prefix_ids must be one sequence; got a batch of {prefix.shape[0]}")
        if isinstance(suffix_ids, torch.Tensor) and suffix_ids.dim() == 2:
            suffix_ids = list(suffix_ids)
        if not isinstance(suffix_ids, (list, tuple)) or not suffix_ids:
            raise ValueError(f"{what} suffix_ids must be a non-empty list of token-id sequences (or a 2-D tensor)")
        suffixes = [self._ids(x, f"{what} suffix_ids[{i}]")[0] for i, x in enumerate(suffix_ids)]
        return self.llama.question(prefix, suffixes)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Stop the reader threads, free the read buffers and the resident blocks. Closing twice is harmless."""
        self.source.close()
        self.model.to("meta")
        self.resident.clear()

    def __enter__(self) -> "LayerStreamer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def padding_mask(attention_mask, ids: torch.Tensor) -> Optional[torch.Tensor]:
    """``attention_mask`` (1 for real tokens) checked against ``ids`` and put beside them, or None. Built in
    chapter 08."""
    if attention_mask is None:
        return None
    mask = torch.as_tensor(attention_mask)
    if mask.dim() == 1:
        mask = mask[None]
    if tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; expected {tuple(ids.shape)}, "
                         "the shape of input_ids")
    return mask.long().to(ids.device)


def choose_resident(read: Sequence[int], held: Sequence[int], budget: int) -> set[int]:
    """Which blocks to keep resident: those that save the most bytes read per byte held, while they fit
    ``budget``. ``read[i]``: bytes a pass reads for block i on this device; ``held[i]``: bytes it holds there.
    Built in chapter 08."""
    keep, left = set(), budget
    for i in sorted(range(len(read)), key=lambda i: -read[i] / max(held[i], 1)):  # stable: execution order on ties
        if held[i] <= left:
            keep.add(i)
            left -= held[i]
    return keep


def group_in_order(items: Sequence, sizes: Sequence[int], cap: Optional[int]) -> list[list]:
    """``items`` split, in order, into groups whose ``sizes`` add up to at most ``cap`` (None: one group);
    ``ValueError`` naming the first item that alone is over it. Built in chapter 08."""
    groups, total = [[]], 0
    for i, (item, size) in enumerate(zip(items, sizes)):
        if cap is not None and size > cap:
            raise ValueError(f"questions[{i}] alone carries {size} bytes of activations between blocks, "
                             f"more than max_carried_bytes={cap}")
        if groups[-1] and cap is not None and total + size > cap:
            groups.append([])
            total = 0
        groups[-1].append(item)
        total += size
    return groups


def pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, gen) -> torch.Tensor:
    """The next token of each row of ``logits`` (batch, vocab): the argmax, or a sample with ``temperature`` and
    nucleus ``top_p`` (the smallest set of tokens whose probability reaches it). Built in chapter 08."""
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p
    sorted_p = sorted_p * keep
    choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=gen)
    return order.gather(-1, choice)[:, 0]


def predicted_peak_bytes(config, batch_size: int, seq_len: int, dtype, *, prefetch: bool = True,
                         read: str = "direct", codec=None) -> int:
    """Bytes ``LayerStreamer`` holds at its peak on the CPU, for files stored in ``dtype`` and computed in it,
    from ``helpers.arithmetic``. Built in chapter 08.

    The embedding counts as the rows a pass looks up, a tied ``lm_head`` as the whole shared table it reads.
    ``read="map"``: the file pages of the two consecutive blocks it has at once (block i computing, block i + 1
    being read; one block without prefetch). ``"direct"``/``"buffered"``: the reader's two slots (one without
    prefetch), each made as big as the largest block, which the tensors view. A ``codec`` (a compressed split,
    or ``bnb.BnB4bit``/``bnb.BnB8bit`` for a bitsandbytes checkpoint): blocks are read in their stored size, and the
    weights it stores in parts are held decoded too (two blocks' at once with prefetch), plus the codec's
    temporaries (``temporary_bytes``). Then the activations of a ``batch_size`` x ``seq_len`` pass.
    """
    from helpers.arithmetic import activation_bytes, block_bytes, meta_model
    from helpers.layout import block_of

    compute = block_bytes(config, dtype)
    table = compute["model.embed_tokens"]
    if compute.get("lm_head") == 0:  # tied: lm_head reads the embedding's table whole
        compute["lm_head"] = table
    stored, decoded, temporary = dict(compute), {b: 0 for b in compute}, 0
    if codec is not None:
        specs = [(n, tuple(p.shape), parse_dtype(dtype)) for n, p in meta_model(config).named_parameters()]
        stored = {b: 0 for b in compute}
        for name, shape, kind in codec.specs(specs):
            stored[block_of(name)] += math.prod(shape) * kind.itemsize
        if stored["lm_head"] == 0:
            stored["lm_head"] = table
        changed = [spec for spec in specs if codec.specs([spec]) != [spec]]  # the weights it stores in parts
        for name, shape, kind in changed:
            decoded[block_of(name)] += math.prod(shape) * kind.itemsize
        temporary = max((codec.temporary_bytes(shape, kind) for _, shape, kind in changed), default=0)
    rows = min(table, batch_size * seq_len * (table // config.vocab_size))
    names = list(compute)
    if read == "map":
        held = [rows if b == "model.embed_tokens" else stored[b] for b in names]
        weights = max(a + b for a, b in zip(held, held[1:])) if prefetch else max(held)
    else:
        weights = rows + (2 if prefetch else 1) * max(stored[b] for b in names if b != "model.embed_tokens")
    if codec is not None:  # decompressed copies of the weights it stores in parts, beside the stored bytes
        copies = [decoded[b] for b in names]
        weights += max(a + b for a, b in zip(copies, copies[1:])) if prefetch else max(copies)
    return weights + temporary + activation_bytes(config, batch_size, seq_len, dtype)
