"""What every measured variant shares: its prompt, its timed passes, and the clocks it reads.

A variant times passes to the device's end (``sync``), drops the page cache of what it reads before each pass
(so each is cold), counts the first pass as a warm-up, and reports CPU time (``process_cpu_seconds`` for its
own process, ``system_cpu_seconds`` for the whole machine) and, on CUDA, the GPU's peak (``cuda_extra``).
Built in chapter 08.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from helpers.tensorfiles import drop_page_cache

from .config import BenchConfig

__all__ = ["prompt", "sync", "timed_passes", "cuda_extra", "process_cpu_seconds", "system_cpu_seconds",
           "mapped", "REFERENCE"]

REFERENCE = "inmemory.pt"  # in Work.out: the in-memory model's last-token logits, which other variants compare to


def prompt(c: BenchConfig, vocab: int) -> torch.Tensor:
    """The benchmark's batch: ``c.batch`` x ``c.seq`` token ids, the same in every variant (seed 0). Built in
    chapter 08."""
    return torch.randint(vocab, (c.batch, c.seq), generator=torch.Generator().manual_seed(0))


def sync(c: BenchConfig) -> None:
    """On CUDA, wait for the GPU: a pass has ended when its kernels have, not when the host launched them. Built
    in chapter 08."""
    if c.device == "cuda":
        torch.cuda.synchronize()


def timed_passes(c: BenchConfig, one_pass: Callable[[], object], files: Sequence[Path]) -> tuple[list[float], object]:
    """``c.repeat`` timed calls of ``one_pass`` after one untimed warm-up (allocations, thread start), the page
    cache of ``files`` dropped before each so every pass reads the disk: (seconds of each, the last output).
    Built in chapter 08."""
    times, out = [], None
    for k in range(c.repeat + 1):
        if files:
            drop_page_cache(*files)
        sync(c)
        t0 = time.perf_counter()
        out = one_pass()
        sync(c)
        if k:
            times.append(time.perf_counter() - t0)
    return times, out


def cuda_extra(c: BenchConfig, m) -> dict:
    """The GPU's peak memory in a ``helpers.memory.measure`` block, on CUDA; {} on the CPU. Built in chapter 08."""
    return {"peak_cuda": m.cuda_peak_bytes} if c.device == "cuda" and m.cuda_peak_bytes is not None else {}


def process_cpu_seconds() -> float:
    """CPU seconds this process has used so far, user plus system, all its threads (``getrusage``): what a read
    cost the CPUs, beside the wall time it took. Built in chapter 08."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def system_cpu_seconds() -> dict:
    """The whole machine's CPU seconds so far by kind, from /proc/stat (Linux); {} elsewhere. ``steal`` is time a
    shared host gave to other guests. Built in chapter 08."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:9]
    except OSError:
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    return {k: int(v) / tick for k, v in zip("user nice system idle iowait irq softirq steal".split(), fields)}


def mapped(files: Sequence[Path]) -> Optional[int]:
    """How many of ``files`` this process has mapped now (/proc/self/maps; None elsewhere). Pages of a mapped file
    survive ``drop_page_cache`` (the kernel does not drop pages a process maps), so passes that keep them mapped
    are not all cold. Built in chapter 08."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    return sum(str(Path(f).resolve()) in maps for f in files)
