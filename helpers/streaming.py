"""Layer streaming: run a model bigger than memory one block at a time, the whole batch per block.

Built in chapter 08. ``LayerStreamer`` reads the per-layer files that ``helpers.checkpoints.split_by_layer``
writes (chapter 03). The model's skeleton lives on the ``meta`` device; for each block in execution order
the streamer loads that block's weights (a background thread reads the *next* block meanwhile), runs the
whole batch through it, and sends it back to ``meta``. At most two blocks of weights are resident, plus
the activations and the KV cache. On the CPU the files are memory-mapped, so reading costs no copy; the
embedding reads only the rows a pass looks up.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from helpers.tensorfiles import drop_page_cache, map_safetensors, read_layer_index, read_safetensors, touch_rows

__all__ = ["LayerStreamer", "predicted_peak_bytes"]

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


class LayerStreamer:
    """Run a causal LM from a directory of per-layer files, one block at a time. Built in chapter 08.

    ``device``: where blocks compute (default CUDA when present, else CPU). ``dtype``: compute dtype
    (default: the checkpoint's). ``prefetch``: read block i+1 in a background thread while block i
    computes. ``drop_page_cache``: forget each block's file pages once the block is done, so every pass
    reads the disk (Linux).
    After each pass, ``timeline`` holds one record per block: ``block``, ``bytes``, ``read_start``,
    ``read_end``, ``compute_start``, ``compute_end`` (seconds since the pass started).
    """

    def __init__(self, layer_dir: Union[str, Path], *, device: Union[str, torch.device, None] = None,
                 dtype: Optional[torch.dtype] = None, prefetch: bool = True, drop_page_cache: bool = False,
                 progress: bool = True):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.layer_dir = Path(layer_dir)
        self.index = read_layer_index(self.layer_dir)
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise ValueError(f"dtype {dtype!r} must be a floating-point torch.dtype such as torch.float32")
        self.device = torch.device(device if device is not None else
                                   ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asks for CUDA, but torch.cuda.is_available() is False")
        self.config = AutoConfig.from_pretrained(self.layer_dir)
        stored = self.config.dtype if isinstance(self.config.dtype, torch.dtype) else \
            getattr(torch, str(self.config.dtype or "float32").replace("torch.", ""))
        self.dtype = dtype or stored
        if drop_page_cache and not hasattr(os, "posix_fadvise"):
            raise ValueError("drop_page_cache=True needs os.posix_fadvise (Linux); this platform has none")
        self.prefetch, self.drop_page_cache, self.progress = prefetch, drop_page_cache, progress
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype).eval()
        rotary = self.model.model.rotary_emb  # buffers only: rebuild it for real on the device
        self.rotary_emb = type(rotary)(config=self.model.config).to(self.device)
        self.blocks: list[str] = list(self.index.blocks)
        self._sources = {b: self._sources_of(b) for b in self.blocks}
        self._cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-reader")
        self._dropper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="page-dropper")
        self._slots: list[Optional[torch.Tensor]] = [None, None]  # two read buffers, reused in turn
        self.timeline: list[dict] = []

    # ------------------------------------------------------------------ loading one block
    def _sources_of(self, block: str) -> list[tuple[Path, dict[str, str]]]:
        """Files to read for a block, each with {name in file: name in block}; tied weights come from their source."""
        if block in self.index.files:
            return [(self.layer_dir / self.index.files[block], {})]
        owner, source, target = self.index.tied_source(block)  # read_layer_index checked there is one
        return [(self.layer_dir / self.index.files[owner], {source: target})]

    def _slot(self, i: int) -> torch.Tensor:
        """Pinned read buffer i % 2 (CUDA), as big as the biggest file: block i reads into it while block i - 1 computes."""
        if self._slots[i % 2] is None:
            size = max(os.path.getsize(p) for b in self.blocks for p, _ in self._sources[b])
            self._slots[i % 2] = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        return self._slots[i % 2]

    def _load(self, i: int, rows: torch.Tensor) -> dict:
        """Read block i's tensors (in the reader thread when prefetching) and put them on the device in its dtype.

        On the CPU the files are memory-mapped (``map_safetensors``): the kernel reads them into the page
        cache and the tensors are those very pages, so the read leaves both the CPU and the GIL to the
        compute. On CUDA they are read into a pinned buffer (``helpers.tensorfiles.read_safetensors``) and copied on a side
        stream. ``rows``: the token ids the pass looks up; an embedding on the CPU reads only those rows.
        """
        block = self.blocks[i]
        t0, state, nbytes = time.perf_counter(), {}, 0
        sources = self._sources[block]
        lookup = not self._cuda and isinstance(self.model.get_submodule(block), torch.nn.Embedding)
        for path, rename in sources:
            if lookup and not rename:  # an embedding on the CPU: read only the rows this pass looks up
                tensors, _ = map_safetensors(path, populate=False)
                n = path.stat().st_size - sum(t.nbytes for t in tensors.values()) + touch_rows(tensors, rows)
            elif self._cuda:  # chapter 05's reader: one readinto into a reused pinned buffer
                tensors, _ = read_safetensors(path, self._slot(i) if len(sources) == 1 else None, pin=True)
                n = path.stat().st_size
            else:
                tensors, n = map_safetensors(path)
            nbytes += n
            for name, t in tensors.items():
                if rename and name not in rename:
                    continue
                state[rename.get(name, name)[len(block) + 1:]] = t
        event = None
        if self._cuda:  # copy on a side stream so it overlaps the previous block's compute
            with torch.cuda.stream(self._copy_stream):
                state = {k: v.to(self.device, non_blocking=True) for k, v in state.items()}
                event = torch.cuda.Event()
                event.record(self._copy_stream)
        elif not lookup:  # (an embedding keeps its stored dtype: its output is converted, not the whole table)
            state = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in state.items()}
        return {"state": state, "bytes": nbytes, "event": event, "read_start": t0, "read_end": time.perf_counter()}

    def _stream(self, step: Callable[[str, torch.nn.Module], None], ids: torch.Tensor, desc: str = "blocks") -> None:
        """One pass: for each block, load it (prefetching the next), call ``step(name, module)``, free it.

        ``ids``: every token id the pass looks up, so the embedding block reads only those rows.
        """
        from tqdm.auto import tqdm

        rows = torch.unique(ids.cpu())  # the embedding rows this pass looks up
        t0, timeline, drops = time.perf_counter(), [], []
        pending: Optional[Future] = None
        bar = tqdm(self.blocks, desc=desc, unit="block", leave=False, disable=not self.progress)
        try:
            if self.prefetch:
                pending = self._pool.submit(self._load, 0, rows)
            for i, block in enumerate(bar):
                if self.prefetch:
                    loaded = pending.result()
                    pending = self._pool.submit(self._load, i + 1, rows) if i + 1 < len(self.blocks) else None
                else:
                    loaded = self._load(i, rows)
                module = self.model.get_submodule(block)
                state = loaded.pop("state")
                if self._cuda:
                    torch.cuda.current_stream(self.device).wait_event(loaded["event"])
                    state = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in state.items()}
                module.load_state_dict(state, strict=True, assign=True)
                del state
                c0 = time.perf_counter()
                with torch.inference_mode():
                    step(block, module)
                if self._cuda:
                    torch.cuda.synchronize(self.device)
                c1 = time.perf_counter()
                module.to("meta")  # free the block's weights (on the CPU: unmap its file)
                if self.drop_page_cache:  # in a thread of its own: off the compute's path and the reader's
                    drops.append(self._dropper.submit(drop_page_cache, *(path for path, _ in self._sources[block])))
                timeline.append({"block": block, "bytes": loaded["bytes"], "read_start": loaded["read_start"] - t0,
                                 "read_end": loaded["read_end"] - t0, "compute_start": c0 - t0,
                                 "compute_end": c1 - t0})
            for done in drops:
                done.result()  # raises here if dropping a file's pages failed
        finally:
            bar.close()
            if pending is not None:  # an error mid-pass: wait for the reader, then drop what it read
                pending.cancel() or pending.exception()
            self.model.to("meta")
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

    # ------------------------------------------------------------------ passes
    def _pass(self, ids, mask, cache, position_ids, last_only: bool, desc: str) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        s: dict = {}

        def step(block: str, module: torch.nn.Module) -> None:
            if block == "model.embed_tokens":
                s["h"] = module(ids).to(self.dtype)
                past = cache.get_seq_length() if cache is not None else 0
                s["pos"] = position_ids if position_ids is not None else \
                    torch.arange(past, past + ids.shape[1], device=self.device)[None]
                s["mask"] = create_causal_mask(config=self.model.config, inputs_embeds=s["h"], attention_mask=mask,
                                               cache=cache, position_ids=s["pos"])
                s["pe"] = self.rotary_emb(s["h"], position_ids=s["pos"])
            elif block.startswith("model.layers."):
                s["h"] = module(s["h"], attention_mask=s["mask"], position_ids=s["pos"], cache=cache,
                                use_cache=cache is not None, position_embeddings=s["pe"])
            elif block == "model.norm":
                s["h"] = module(s["h"][:, -1:] if last_only else s["h"])
            elif block == "lm_head":
                s["logits"] = module(s["h"]).float()

        self._stream(step, ids, desc)
        return s["logits"]

    def forward(self, input_ids, attention_mask=None, *, last_only: bool = False) -> torch.Tensor:
        """Logits (batch, seq, vocab) in float32, or (batch, 1, vocab) with ``last_only``. Built in chapter 08."""
        ids = self._ids(input_ids, "input_ids")
        return self._pass(ids, self._mask(attention_mask, ids), None, None, last_only, "forward")

    __call__ = forward

    def generate(self, input_ids, max_new_tokens: int, *, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, attention_mask=None, seed: Optional[int] = None,
                 eos_token_id: Optional[int] = None) -> torch.Tensor:
        """Prompt plus up to ``max_new_tokens`` new ids; one streamed pass per token, KV cache per layer. Built in chapter 08.

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
        tensor of n scores, equal to scoring each ``prefix + suffix`` separately. Built in chapter 08.
        """
        from transformers import DynamicCache

        prefix = self._ids(prefix_ids, "prefix_ids")
        if prefix.shape[0] != 1:
            raise ValueError(f"prefix_ids must be one sequence; got a batch of {prefix.shape[0]}")
        if isinstance(suffix_ids, torch.Tensor) and suffix_ids.dim() == 2:
            suffix_ids = list(suffix_ids)
        if not isinstance(suffix_ids, (list, tuple)) or not suffix_ids:
            raise ValueError("suffix_ids must be a non-empty list of token-id sequences (or a 2-D tensor)")
        suffixes = [self._ids(s, f"suffix_ids[{i}]")[0] for i, s in enumerate(suffix_ids)]
        n, P = len(suffixes), prefix.shape[1]
        lengths = torch.tensor([len(x) for x in suffixes], device=self.device)
        S = int(lengths.max())
        suffix = torch.zeros(n, S, dtype=torch.long, device=self.device)
        for i, x in enumerate(suffixes):  # right padding: causal attention never lets a real token see it
            suffix[i, :len(x)] = x
        allowed = torch.arange(P + S, device=self.device)[None] <= P + torch.arange(S, device=self.device)[:, None]
        suffix_mask = allowed[None, None].expand(n, 1, S, P + S)
        if self.model.config._attn_implementation == "eager":
            suffix_mask = torch.zeros(suffix_mask.shape, dtype=self.dtype, device=self.device).masked_fill(
                ~suffix_mask, torch.finfo(self.dtype).min)
        cache, s = DynamicCache(config=self.model.config), {}

        def step(block: str, module: torch.nn.Module) -> None:
            if block == "model.embed_tokens":
                s["p"], s["s"] = module(prefix).to(self.dtype), module(suffix).to(self.dtype)
                s["pe_p"] = self.rotary_emb(s["p"], torch.arange(P, device=self.device)[None])
                s["pe_s"] = self.rotary_emb(s["s"], torch.arange(P, P + S, device=self.device)[None])
            elif block.startswith("model.layers."):
                i = int(block.rsplit(".", 1)[1])
                s["p"] = module(s["p"], attention_mask=None, cache=cache, use_cache=True,
                                position_embeddings=s["pe_p"])
                layer = cache.layers[i]  # the prefix's K and V, shared (not copied) by every suffix
                layer.keys, layer.values = layer.keys.expand(n, -1, -1, -1), layer.values.expand(n, -1, -1, -1)
                s["s"] = module(s["s"], attention_mask=suffix_mask, cache=cache, use_cache=True,
                                position_embeddings=s["pe_s"])
                layer.keys = layer.values = None  # this layer's cache is not needed again
            elif block == "model.norm":
                s["h"] = module(torch.cat([s["p"][:, -1:].expand(n, -1, -1), s["s"]], dim=1))
            elif block == "lm_head":
                logp = torch.log_softmax(module(s["h"][:, :-1]).float(), dim=-1)
                token_logp = logp.gather(-1, suffix[..., None])[..., 0]
                real = torch.arange(S, device=self.device)[None] < lengths[:, None]
                s["scores"] = (token_logp * real).sum(-1)

        self._stream(step, torch.cat([prefix[0], suffix.flatten()]), "score")
        return s["scores"].cpu()

    @property
    def bytes_per_pass(self) -> int:
        """Bytes the last pass read from disk: every file, except that the embedding reads only the pages of
        the rows it looked up (tied weights are read twice)."""
        if not self.timeline:
            raise RuntimeError("no pass has run yet: call forward, generate or score first")
        return sum(r["bytes"] for r in self.timeline)

    def close(self) -> None:
        """Stop the reader threads and free the two read buffers."""
        self._pool.shutdown(wait=True)
        self._dropper.shutdown(wait=True)
        self._slots = [None, None]
