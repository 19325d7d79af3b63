"""The disk-read variant: the cold read bandwidth of the files a streamed pass reads, five ways.

Three read whole files (``readinto`` a buffer, safetensors' ``load_file`` with every page touched, ``map`` with
the mapping populated); two read each block's byte ranges through the streamer's own reader,
``helpers.reader.BlockReader``, ``direct`` (``O_DIRECT``: the disk's controller copies, the page cache is
bypassed) and ``buffered`` (through the page cache: the CPU copies every byte). Each row also says what the read
cost this process's CPUs (``cpu_seconds``), since on a machine with few cores that time is taken from the
compute a streamed pass overlaps with its reads. The bound uses the fastest row. Built in chapter 08.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import torch

from helpers.layout import BlockLayout, block_layout
from helpers.reader import BlockReader
from helpers.tensorfiles import drop_page_cache, map_safetensors, read_safetensors

from .config import BenchConfig, Work
from .timing import process_cpu_seconds

__all__ = ["FILE_READS", "BLOCK_READS", "run_read", "best_read"]

FILE_READS = ("readinto", "safetensors", "map")  # whole files, one after the other
BLOCK_READS = ("direct", "buffered")  # block by block through helpers.reader.BlockReader, as the streamer reads


def file_reads(files: list[Path]) -> dict[str, Callable[[], int]]:
    """One callable per whole-file method, each reading every file in ``files`` once and returning the bytes it
    read. Built in chapter 08."""
    from safetensors.torch import load_file

    nbytes = sum(f.stat().st_size for f in files)
    buf = torch.empty(max(f.stat().st_size for f in files), dtype=torch.uint8)

    def readinto() -> int:
        for f in files:
            read_safetensors(f, buf)
        return nbytes

    def safetensors() -> int:  # load_file maps the file; touching one byte per 4 KiB page makes it really read
        for f in files:
            for t in load_file(f).values():
                t.reshape(-1).view(torch.uint8)[::4096].sum()
        return nbytes

    def map_files() -> int:
        for f in files:
            map_safetensors(f)  # each file's mapping is released before the next is made
        return nbytes

    return {"readinto": readinto, "safetensors": safetensors, "map": map_files}


def block_read(reader: BlockReader, layout: BlockLayout) -> Callable[[], int]:
    """A callable reading every block of ``layout`` once through ``reader`` (``load`` then ``release``, one block
    held at a time), returning the bytes it read. Built in chapter 08."""
    def read_all() -> int:
        nbytes = 0
        for block in layout.blocks:
            loaded = reader.load(layout.pieces[block])
            nbytes += loaded.bytes
            reader.release(loaded)
        return nbytes

    return read_all


def run_read(c: BenchConfig, work: Work) -> dict:
    """Cold reads of the per-layer split's files, or of the checkpoint's shards where ``work`` has no split (the
    ``--shape`` mode), page cache dropped before each, the methods interleaved; best of ``c.repeat`` each:
    ``{method: {seconds, bytes, bandwidth, cpu_seconds[, method]}}`` (``method``: the one a block reader ran,
    "buffered" where O_DIRECT was refused). Built in chapter 08."""
    layout = block_layout(work.layers or work.model)
    files = layout.files
    with ExitStack() as stack:
        reads = file_reads(files)
        readers = {}
        for method in BLOCK_READS:  # on the CPU: this measures the disk, the host-to-device link is h2d's
            readers[method] = stack.enter_context(BlockReader("cpu", read=method))
            biggest = max(layout.blocks, key=layout.bytes)
            readers[method].release(readers[method].load(layout.pieces[biggest]))  # its slot, allocated untimed
            reads[method] = block_read(readers[method], layout)
        runs: dict[str, list[tuple[float, float, int]]] = {k: [] for k in reads}
        for _ in range(c.repeat):
            for name, read in reads.items():
                drop_page_cache(*files)
                cpu0, t0 = process_cpu_seconds(), time.perf_counter()
                nbytes = read()
                runs[name].append((time.perf_counter() - t0, process_cpu_seconds() - cpu0, nbytes))
        drop_page_cache(*files)
        out = {}
        for name, measured in runs.items():
            seconds, cpu, nbytes = min(measured)
            out[name] = {"seconds": seconds, "bytes": nbytes, "bandwidth": nbytes / seconds, "cpu_seconds": cpu}
            if name in readers:
                out[name]["method"] = readers[name].method
    return out


def best_read(results: dict) -> dict:
    """The fastest of the cold-read rows (``read (...)``) of a report's results, or ``{"error": ...}`` when none
    succeeded: its bandwidth is the bound's. Built in chapter 08."""
    return max((r for k, r in results.items() if k.startswith("read") and "error" not in r),
               key=lambda r: r["bandwidth"], default={"error": "no read"})
