"""The streamed variants: ``LayerStreamer`` reading the model cold, with and without prefetch.

``stream-prefetch`` and ``stream-no-prefetch`` (the default mode): best of ``--repeat`` cold passes, their peak
RSS, their logits against the in-memory model's, the per-block timeline. ``shape-stream`` (the ``--shape``
mode): ``--passes`` cold passes with prefetch, each block's bytes, read and compute seconds, and the peak RSS
whole and anonymous. Each records the read method that ran (``--read``; "direct" falls back to "buffered"
where O_DIRECT is refused). Built in chapter 08.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from helpers.layout import block_layout
from helpers.memory import measure
from helpers.tensorfiles import drop_page_cache

from .config import BenchConfig, Work
from .timing import REFERENCE, cuda_extra, prompt, sync, timed_passes

if TYPE_CHECKING:  # imported where a streamer is made, so that the other variants' children never load it
    from helpers.streaming import LayerStreamer

__all__ = ["run_stream", "run_stream_prefetch", "run_stream_no_prefetch", "run_shape_stream"]


def streamer(c: BenchConfig, work: Work, prefetch: bool) -> "LayerStreamer":
    """A ``LayerStreamer`` over what ``--source`` names, cold (page cache dropped after each block), read with
    ``--read``, without a progress bar. Built in chapter 08."""
    from helpers.streaming import LayerStreamer

    return LayerStreamer(work.streamed(c.source), device=c.device, dtype=c.dtype, prefetch=prefetch,
                         drop_page_cache=True, progress=False, read=c.read)


def run_stream(c: BenchConfig, work: Work, prefetch: bool) -> dict:
    """One warm-up pass, then best of ``c.repeat`` cold passes, against the in-memory reference logits. Built in
    chapter 08."""
    files = block_layout(work.streamed(c.source)).files
    with streamer(c, work, prefetch) as st:  # made outside the measurement: imports, the skeleton on meta
        ids = prompt(c, st.config.vocab_size)
        with measure() as m:  # from before the first pass, which makes the reader's slots
            st.forward(ids)  # one pass first, outside the timing: the reader thread, the allocator
            times, logits = timed_passes(c, lambda: st.forward(ids), files)
        read = st.read
    ref = torch.load(work.out / REFERENCE, weights_only=True)
    return {"seconds": min(times), "times": times, "peak_rss": m.cpu_peak_bytes, "bytes_per_pass": st.bytes_per_pass,
            "source": c.source, "read": read, "max_abs_diff": float((logits[:, -1] - ref).abs().max()),
            "timeline": st.timeline, **cuda_extra(c, m)}


def run_stream_prefetch(c: BenchConfig, work: Work) -> dict:
    """``run_stream`` with prefetch: block i + 1 is read while block i computes. Built in chapter 08."""
    return run_stream(c, work, prefetch=True)


def run_stream_no_prefetch(c: BenchConfig, work: Work) -> dict:
    """``run_stream`` without prefetch: each block read only when its turn comes. Built in chapter 08."""
    return run_stream(c, work, prefetch=False)


def run_shape_stream(c: BenchConfig, work: Work) -> dict:
    """``LayerStreamer`` with prefetch, cold, ``c.passes`` passes: each pass's time and per-block bytes, read and
    compute seconds (from ``st.timeline``), and the process's peak RSS, whole and anonymous. The first pass
    warms up the code; the best of the others counts. Built in chapter 08."""
    from helpers.memory import rss_split

    files = block_layout(work.streamed(c.source)).files
    passes = []
    with streamer(c, work, prefetch=True) as st:
        ids = prompt(c, st.config.vocab_size)
        split = rss_split() or {}
        with measure() as m:
            for _ in range(c.passes):
                drop_page_cache(*files)
                sync(c)
                t0 = time.perf_counter()
                st.forward(ids)
                sync(c)
                seconds = time.perf_counter() - t0
                blocks = [{"block": r["block"], "bytes": r["bytes"], "read_seconds": r["read_end"] - r["read_start"],
                           "compute_seconds": r["compute_end"] - r["compute_start"]} for r in st.timeline]
                passes.append({"seconds": seconds, "bytes": st.bytes_per_pass, "blocks": blocks})
        read = st.read
    counted = passes[1:] or passes  # the first pass warms up the code (the disk is cold in every pass)
    best = min(counted, key=lambda r: r["seconds"])
    anon = None if m.peak_anon_bytes is None or "anon" not in split else split["anon"] + m.peak_anon_bytes
    return {"seconds": best["seconds"], "bytes_per_pass": best["bytes"], "blocks": best["blocks"],
            "times": [r["seconds"] for r in passes], "peak_rss": m.cpu_start_bytes + m.cpu_peak_bytes,
            "peak_rss_increase": m.cpu_peak_bytes, "peak_anon_rss": anon, "source": c.source, "read": read,
            **cuda_extra(c, m)}
