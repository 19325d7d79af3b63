"""Memory probes: how many bytes a block of code really costs.

Built in chapter 00 (setup) and used by every chapter after it.

``measure()`` reports the *peak* resident memory of this process during a block,
above what was resident when the block started. On Linux the kernel keeps that
peak for us (``VmHWM`` in ``/proc/self/status``) and lets us reset it by writing
``5`` to ``/proc/self/clear_refs``; elsewhere a background thread samples RSS.

RSS mixes three kinds of page, two of which a model load touches. *Anonymous* pages (``RssAnon``: tensors,
the Python heap) exist nowhere else: they are what a process really costs. *File-backed* pages (``RssFile``: a
memory-mapped safetensors checkpoint, shared libraries) are copies of a file the kernel can drop under memory
pressure and read again.
``measure()`` reports both peaks apart where the OS says which is which (Linux), so that "loading took
3 GiB" can be read as "0.1 GiB of it was tensors, 2.9 GiB was the checkpoint's cached pages". The third kind,
shared memory (``RssShmem``), completes the sum in ``rss_split``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import math
import re
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import psutil

__all__ = ["Measurement", "measure", "flush", "release_on_free", "rss_bytes", "rss_split", "cuda_context_bytes",
           "parse_size", "format_size"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


# --------------------------------------------------------------------------- sizes

# Same conventions as accelerate's ``convert_file_size_to_int``: "GB" is 10**9,
# "GiB" is 2**30, and a lower-case trailing "b" ("10Gb") means bits.
_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)


def parse_size(size: Union[int, str]) -> int:
    """Return ``size`` ("10GiB", "10GB", "500MB", "1.5 GB" or an int) in bytes.

    Raises ``ValueError`` naming the value for anything else (negative numbers,
    unknown units, words).
    Built in chapter 00.
    """
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ValueError(f"size {size!r} must be an int of bytes or a string like '10GiB' or '500MB'")
    if isinstance(size, int):
        if size < 0:
            raise ValueError(f"size {size!r} is negative; expected a number of bytes >= 0")
        return size
    match = _SIZE_RE.match(size)
    if match is None or (match.group(2) or "").upper() not in _UNITS:
        raise ValueError(
            f"size {size!r} is not a valid size; expected an int of bytes or a number with a unit "
            "from B, KB, MB, GB, TB (powers of 10) or KiB, MiB, GiB, TiB (powers of 2), like '10GiB'"
        )
    number, unit = float(match.group(1)), match.group(2) or ""
    n_bytes = int(number * _UNITS[unit.upper()])
    if unit.endswith("b") and unit.upper() != "B" and not unit.upper().endswith("IB"):
        n_bytes //= 8  # "10Gb" is gigabits, as in accelerate
    return n_bytes


def format_size(n_bytes: Union[int, float], binary: bool = True, precision: int = 1) -> str:
    """Format a byte count for people: ``format_size(2**29) == '512.0 MiB'``.

    ``binary=False`` uses powers of 10 (kB, MB, GB) as disk makers and model cards do.
    Built in chapter 00.
    """
    if isinstance(n_bytes, bool) or not isinstance(n_bytes, (int, float)) or math.isnan(n_bytes):
        raise ValueError(f"n_bytes {n_bytes!r} must be a number of bytes")
    base, units = (1024, ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]) if binary else (
        1000, ["B", "kB", "MB", "GB", "TB", "PB"])
    value, sign = abs(float(n_bytes)), "-" if n_bytes < 0 else ""
    for unit in units:
        if value < base or unit == units[-1]:
            return f"{sign}{value:.0f} {unit}" if unit == "B" else f"{sign}{value:.{precision}f} {unit}"
        value /= base
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- probes

def _read_status_kib(key: str) -> Optional[int]:
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def rss_bytes() -> int:
    """Resident set size of this process now, in bytes. Built in chapter 00."""
    return _read_status_kib("VmRSS") or psutil.Process().memory_info().rss


def rss_split() -> Optional[dict]:
    """This process's resident memory by kind, in bytes: ``{"anon": ..., "file": ..., "shmem": ...}``.

    ``anon`` (``RssAnon``) is memory only this process holds (tensors, heap); ``file`` (``RssFile``) is pages of
    files mapped into it (a memory-mapped checkpoint, libraries), which the kernel can drop and re-read;
    ``shmem`` (``RssShmem``) is shared memory. They add up to RSS. ``None`` where the OS does not report them
    (macOS, Windows, Linux before 4.5).
    Built in chapter 00.
    """
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    values = {}
    for key, name in (("RssAnon", "anon"), ("RssFile", "file"), ("RssShmem", "shmem")):
        match = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.MULTILINE)
        if match is None:
            return None
        values[name] = int(match.group(1)) * 1024
    return values


_HWM_SLACK = 4 * 2**20  # after a reset, VmHWM may exceed VmRSS by what was allocated and freed meanwhile


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM); False where that is not possible. A reset that is accepted but
    leaves the old peak in place (some sandboxed kernels) counts as not possible, and is said once."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    hwm, rss = _read_status_kib("VmHWM"), _read_status_kib("VmRSS")
    if hwm is None or rss is None:
        return False
    if hwm > rss + _HWM_SLACK:
        _say_once("hwm-reset", "this kernel accepts a reset of the peak-RSS counter (/proc/self/clear_refs) but "
                  f"keeps the old peak ({hwm / 2**20:.0f} MiB against {rss / 2**20:.0f} MiB resident): measure() "
                  "samples RSS in a thread instead, which can miss a spike shorter than its sample_interval")
        return False
    return True


_said: set[str] = set()


def _say_once(key: str, message: str) -> None:
    if key not in _said:
        _said.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def _glibc() -> Optional[ctypes.CDLL]:
    """The C library when it is glibc (it has ``mallopt`` and ``malloc_trim``), else None (macOS, Windows, musl)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt, libc.malloc_trim  # noqa: B018 - raise AttributeError where these do not exist
    except (OSError, TypeError, AttributeError):
        return None
    return libc


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's limit on 64-bit systems


def release_on_free(threshold: int = 64 * 1024) -> bool:
    """Make freed tensors go back to the operating system at once, so that RSS measures live memory.

    glibc serves large allocations with their own ``mmap`` and returns them on ``free``, but it raises
    that threshold (up to 32 MiB) as large blocks are freed, and then keeps freed heap memory for reuse.
    A process that freed a model earlier can load the next one into pages it still holds, and RSS does
    not move. Fixing the threshold (``mallopt(M_MMAP_THRESHOLD, threshold)``) turns that off for this
    process from now on: allocations of ``threshold`` bytes or more get mappings of their own, returned on
    ``free`` (blocks the allocator already holds are still reused first; ``flush()`` gives their pages back).
    Returns True when set; False where the C library is not glibc, and nothing changes there.
    Built in chapter 00.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not 0 < threshold <= _MMAP_THRESHOLD_MAX:
        raise ValueError(f"threshold {threshold!r} must be an int of bytes in (0, {_MMAP_THRESHOLD_MAX}]")
    libc = _glibc()
    return libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1


def flush() -> None:
    """Give freed memory back: collect garbage, trim the C heap, empty the CUDA cache. Built in chapter 00."""
    gc.collect()
    libc = _glibc()
    if libc is not None:  # glibc keeps freed pages in its arenas until asked to return them
        libc.malloc_trim(0)
    if _cuda_available():
        import torch
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


@dataclass
class Measurement:
    """What ``measure()`` saw: peaks above the level at entry, and wall time. Built in chapter 00."""

    cpu_peak_bytes: int = 0
    cuda_peak_bytes: Optional[int] = None
    seconds: float = 0.0
    method: str = ""
    cpu_start_bytes: int = 0
    peak_anon_bytes: Optional[int] = None
    peak_file_bytes: Optional[int] = None
    _samples: list = field(default_factory=list, repr=False)
    _split_samples: list = field(default_factory=list, repr=False)

    def __str__(self) -> str:
        cuda = "n/a" if self.cuda_peak_bytes is None else format_size(self.cuda_peak_bytes)
        return (f"CPU peak +{format_size(self.cpu_peak_bytes)}, CUDA peak +{cuda}, "
                f"{self.seconds:.2f} s")


class measure:
    """Context manager: ``with measure() as m: ...`` then read ``m.cpu_peak_bytes``.

    * ``cpu_peak_bytes``: peak RSS during the block minus RSS at entry (>= 0).
    * ``cuda_peak_bytes``: ``torch.cuda.max_memory_allocated()`` during the block minus
      what was allocated at entry; ``None`` without CUDA.
    * ``seconds``: wall time of the block.
    * ``peak_anon_bytes`` / ``peak_file_bytes``: peak anonymous (``RssAnon``) and file-backed (``RssFile``)
      resident memory during the block minus their levels at entry (>= 0), each sampled every
      ``sample_interval`` seconds (the kernel keeps no high-water mark for them, so a spike shorter than the
      interval can be missed). The two peaks need not fall at the same moment, so they need not add up to
      ``cpu_peak_bytes``. ``None`` where the OS does not report the split (see ``rss_split``).

    ``flush_first=True`` (the default) collects garbage before the block starts so
    memory freed by earlier cells does not hide the block's own cost.
    ``method``: ``"auto"`` uses the kernel's resettable peak counter (``VmHWM``, Linux) when there is one and
    otherwise samples RSS every ``sample_interval`` seconds in a thread; ``"sampling"`` always samples.
    Built in chapter 00.
    """

    def __init__(self, flush_first: bool = True, sample_interval: float = 0.001, method: str = "auto"):
        if not sample_interval > 0:
            raise ValueError(f"sample_interval {sample_interval!r} must be > 0 seconds")
        if method not in ("auto", "sampling"):
            raise ValueError(f"method {method!r} must be 'auto' or 'sampling'")
        self.method = method
        self.flush_first = flush_first
        self.sample_interval = sample_interval
        self.result = Measurement()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> Measurement:
        if self.flush_first:
            flush()
        m = self.result
        m.method = "VmHWM" if self.method == "auto" and _reset_hwm() else "sampling"
        m.cpu_start_bytes = rss_bytes()
        split = rss_split()
        self._split_start = split
        if m.method == "sampling":
            m._samples.append(m.cpu_start_bytes)
        if split is not None:
            m._split_samples.append(split)
        if m.method == "sampling" or split is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        if _cuda_available():
            import torch
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._cuda_start = torch.cuda.memory_allocated()
        self._t0 = time.perf_counter()
        return m

    def _sample(self) -> None:
        samples, splits = self.result._samples, self.result._split_samples
        rss = self.result.method == "sampling"
        split = self._split_start is not None
        while not self._stop.wait(self.sample_interval):
            if split:
                now = rss_split()
                if now is not None:
                    splits.append(now)
                    if rss:
                        samples.append(now["anon"] + now["file"] + now["shmem"])
                    continue
            if rss:
                samples.append(rss_bytes())

    def __exit__(self, *exc) -> None:
        m = self.result
        if _cuda_available():
            import torch
            torch.cuda.synchronize()
            m.cuda_peak_bytes = max(0, torch.cuda.max_memory_allocated() - self._cuda_start)
        m.seconds = time.perf_counter() - self._t0
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if m.method == "VmHWM":
            peak = max(_read_status_kib("VmHWM") or 0, rss_bytes())
        else:
            peak = max(m._samples + [rss_bytes()])
        m.cpu_peak_bytes = max(0, peak - m.cpu_start_bytes)
        start = self._split_start
        end = rss_split()
        if start is not None and end is not None:
            splits = m._split_samples + [end]
            m.peak_anon_bytes = max(0, max(s["anon"] for s in splits) - start["anon"])
            m.peak_file_bytes = max(0, max(s["file"] for s in splits) - start["file"])




_CONTEXT_PROBE = """
import json, sys, torch
device = int(sys.argv[1])
free0, total = torch.cuda.mem_get_info(device)      # creates the context (lazily loaded modules: not yet)
x = torch.ones(256, 256, device=device)
y = (x @ x).sum().item()                            # first allocation, first kernel, first cuBLAS call
torch.cuda.synchronize(device)
free1, _ = torch.cuda.mem_get_info(device)
print(json.dumps({"total": total, "used_at_init": total - free0, "used_after_first_ops": total - free1,
                  "reserved_by_torch": torch.cuda.memory_reserved(device)}))
"""


def cuda_context_bytes(device: int = 0, *, details: bool = False):
    """What CUDA itself takes on GPU ``device`` beyond PyTorch's tensors, measured in a fresh process; ``None``
    without CUDA. Built in chapter 00.

    This process first reads what is already in use on the device (``torch.cuda.mem_get_info``: its own context
    and tensors, if it has them, and other processes'). A new Python process then creates a context of its own,
    allocates a first tensor and runs a first matmul (which loads cuBLAS and, with lazy module loading, the kernels
    it needs), and reads ``mem_get_info`` again. The result is what the new process added, minus what its
    allocator reserved (``torch.cuda.memory_reserved()``): the context and loaded kernels that
    ``max_memory_allocated`` never shows but ``nvidia-smi`` does. Another process allocating meanwhile would be
    counted. ``details=True`` returns the probe's figures as a dict instead (``used_*``: what the new process
    added; ``in_use_before``: what was in use before it started).
    """
    import json
    import subprocess
    import sys

    if isinstance(device, bool) or not isinstance(device, int) or device < 0:
        raise ValueError(f"device {device!r} must be a CUDA device index (an int >= 0)")
    if not _cuda_available():
        return None
    import torch

    if device >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} does not exist; torch sees {torch.cuda.device_count()} CUDA device(s)")
    free, total = torch.cuda.mem_get_info(device)  # this process's context, if any, is not the probe's
    out = subprocess.run([sys.executable, "-c", _CONTEXT_PROBE, str(device)], capture_output=True, text=True,
                         check=True, timeout=300)
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    before = total - free
    probe.update(in_use_before=before, used_at_init=probe["used_at_init"] - before,
                 used_after_first_ops=probe["used_after_first_ops"] - before)
    outside = probe["used_after_first_ops"] - probe["reserved_by_torch"]
    if details:
        return {**probe, "outside_torch": outside}
    return outside
