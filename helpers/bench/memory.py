"""The in-memory variants: what computing costs with every weight already in memory.

``inmemory``: the whole model's forward (the bound's compute term, and the reference logits every other variant
is compared to); ``overlap``: that forward while a thread reads what a streamed pass reads, the way the streamer
reads it (the overlap floor: perfect overlap of this reading with this compute, on this machine); ``layer``:
one decoder layer's forward (the ``--shape`` mode's compute term, times the layers). Built in chapter 08.
"""

from __future__ import annotations

import threading
import time

import torch

from helpers.layout import TOKEN_TABLES, block_layout, weight_map
from helpers.memory import measure
from helpers.meta import parse_dtype
from helpers.reader import BlockReader
from helpers.tensorfiles import drop_page_cache

from .config import BenchConfig, Work
from .timing import REFERENCE, cuda_extra, prompt, sync, system_cpu_seconds, timed_passes

__all__ = ["run_inmemory", "run_overlap", "run_layer"]


def load_model(c: BenchConfig, work: Work) -> torch.nn.Module:
    """The synthetic checkpoint as an ordinary transformers model, in ``c.dtype`` on ``c.device``, in eval mode.
    Built in chapter 08."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(work.model, dtype=parse_dtype(c.dtype)).to(c.device).eval()


def run_inmemory(c: BenchConfig, work: Work) -> dict:
    """The whole model in memory: load, then best of ``c.repeat`` forwards; saves the last token's logits as the
    reference (``REFERENCE`` in ``work.out``). Built in chapter 08."""
    with measure() as m:
        model = load_model(c, work)
        ids = prompt(c, model.config.vocab_size).to(c.device)
        with torch.inference_mode():
            times, logits = timed_passes(c, lambda: model(ids).logits, [])
    torch.save(logits[:, -1].float().cpu().clone(), work.out / REFERENCE)
    return {"seconds": min(times), "times": times, "peak_rss": m.cpu_peak_bytes, **cuda_extra(c, m)}


def run_overlap(c: BenchConfig, work: Work) -> dict:
    """The in-memory forward while another thread cold-reads what a streamed pass reads, block by block through
    a ``helpers.reader.BlockReader`` with the streamer's read method (``c.read``, "direct" by default) on its
    device; on the CPU the embedding reads only the looked-up rows, as the streamer's does. What perfect overlap
    of this reading with this compute gives on this machine. /proc/stat says what the reading cost the CPUs.
    Built in chapter 08."""
    model = load_model(c, work)
    ids = prompt(c, model.config.vocab_size).to(c.device)
    layout = block_layout(work.streamed(c.source))
    rows = torch.unique(ids.cpu())
    lookups = {b for b in layout.blocks if b.rsplit(".", 1)[-1] in TOKEN_TABLES}  # the streamer's Role.EMBED
    files = layout.files
    with BlockReader(c.device, read=c.read) as reader:
        def read_all() -> None:
            for block in layout.blocks:
                reader.release(reader.load(layout.pieces[block], rows if block in lookups else None))

        biggest = max(layout.blocks, key=layout.bytes)
        reader.release(reader.load(layout.pieces[biggest]))  # the reader's slot allocated (and touched) untimed
        with torch.inference_mode():
            model(ids)  # warm up
            runs = []
            for _ in range(c.repeat):
                drop_page_cache(*files)
                thread = threading.Thread(target=read_all)
                sync(c)
                c0, t0 = system_cpu_seconds(), time.perf_counter()
                thread.start()
                model(ids)
                sync(c)
                computed = time.perf_counter() - t0
                thread.join()
                sync(c)  # on CUDA the reader's copies run on its own stream
                runs.append({"seconds": time.perf_counter() - t0, "compute_seconds": computed, "read": reader.method,
                             **{f"{k}_seconds": v - c0[k] for k, v in system_cpu_seconds().items()
                                if k in ("steal", "system")}})
    drop_page_cache(*files)
    return min(runs, key=lambda r: r["seconds"])


def run_layer(c: BenchConfig, work: Work) -> dict:
    """One decoder layer's in-memory forward for the benchmark's batch: its weights loaded from the checkpoint
    into memory, timed best of ``c.repeat`` after a warm-up. Times ``c.layers`` is the ``--shape`` mode's
    compute term. Built in chapter 08."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.masking_utils import create_causal_mask

    config = AutoConfig.from_pretrained(work.model)
    config.num_hidden_layers = 1
    dtype = parse_dtype(c.dtype)
    root, names = weight_map(work.model)
    prefix, state = "model.layers.0.", {}
    for shard in sorted({f for n, f in names.items() if n.startswith(prefix)}):
        with safe_open(root / shard, framework="pt") as f:
            state.update({n[len(prefix):]: f.get_tensor(n).to(dtype) for n in f.keys() if n.startswith(prefix)})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    layer = model.model.layers[0]
    layer.load_state_dict(state, strict=True, assign=True)
    layer.to(c.device)
    rotary = type(model.model.rotary_emb)(config=model.config).to(c.device)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(c.batch, c.seq, config.hidden_size, generator=gen).to(dtype).to(c.device)
    position_ids = torch.arange(c.seq, device=c.device)[None]
    with torch.inference_mode():
        mask = create_causal_mask(config=model.config, inputs_embeds=hidden, attention_mask=None, cache=None,
                                  position_ids=position_ids)
        position_embeddings = rotary(hidden, position_ids=position_ids)
        times, _ = timed_passes(c, lambda: layer(hidden, attention_mask=mask, position_ids=position_ids,
                                                 position_embeddings=position_embeddings), [])
    return {"seconds": min(times), "times": times, "bytes": sum(t.nbytes for t in state.values())}
