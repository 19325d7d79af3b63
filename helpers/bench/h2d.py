"""The host-to-device variant (``--device cuda`` only): how fast the copies a streamed pass makes cross to the GPU.

Pinned memory is what the streamer's reader copies from (``helpers.reader``); pageable is what an ordinary
tensor is, for comparison. Bytes over the pinned bandwidth is one of the bound's terms on CUDA. Built in
chapter 08.
"""

from __future__ import annotations

from helpers.layout import block_layout
from helpers.reader import h2d_bandwidth

from .config import BenchConfig, Work

__all__ = ["run_h2d"]


def run_h2d(c: BenchConfig, work: Work) -> dict:
    """Host-to-device bandwidth, pinned and pageable, for copies the size of the biggest file the split has (or
    the checkpoint, without a split); best of ``max(3, c.repeat)`` copies each. Built in chapter 08."""
    nbytes = max(f.stat().st_size for f in block_layout(work.layers or work.model).files)
    pinned = h2d_bandwidth(nbytes, pinned=True, repeat=max(3, c.repeat))
    pageable = h2d_bandwidth(nbytes, pinned=False, repeat=max(3, c.repeat))
    return {"bytes": nbytes, "pinned_bandwidth": pinned, "pageable_bandwidth": pageable,
            "seconds": nbytes / pinned}
