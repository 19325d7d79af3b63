"""The block reader: one way to bring a block's bytes from disk to the device, for chapters 05 and 08.

The ground floor under ``helpers.dispatch`` (chapter 05) and ``helpers.streaming`` (chapter 08); neither keeps
buffers, CUDA streams or file reads of its own. A *block* is a few byte ranges of files (``layout.Piece``);
``BlockReader.load`` reads them and returns the block's tensors on the device, ``release`` gives back what they
used. It owns:

* **slots**: reusable, page-aligned host buffers, pinned on CUDA and touched once on the CPU (a fresh page
  costs a fault on first write; a reused one does not). Slots are handed out in the order of reads, so two
  consecutive reads never share one.
* **the read method** (``READS``): ``"direct"`` reads each range with ``O_DIRECT``, rounded out to the file
  system's alignment, straight into a slot: the disk's controller copies the bytes, not the CPU, and the page
  cache is bypassed (every read is cold). ``"buffered"`` reads through the page cache into a slot (the CPU
  copies every byte). ``"map"`` maps the range (no copy; the tensors are the page cache's pages). Where
  ``O_DIRECT`` is refused (tmpfs, some network or FUSE mounts, a platform without it), ``"direct"`` falls back
  to ``"buffered"`` and says so once (``method``, ``why``).
* **requests in flight**: a range is read in chunks by several threads at once (``in_flight``), which is what
  a direct read needs to reach the disk's speed.
* **the copy to a GPU**: on a side stream, chunk by chunk as chunks arrive, so that the copy of chunk k overlaps
  the read of chunk k + 1; a CUDA event marks the end of the copy (and of ``transform``, run on that stream too).
  The slot is reused only once that event has fired, and a block's device memory only once the compute that
  used it has run (``release(..., after=event)``): events order the streams, and no one waits for the whole
  device.

``h2d_bandwidth`` measures the host-to-device link the copies cross.
"""

from __future__ import annotations

import errno
import os
import threading
import time
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import torch

from .layout import Piece
from .tensorfiles import CheckpointError, map_range, touch_rows

__all__ = ["READS", "ALIGN", "Loaded", "BlockReader", "slot_size", "direct_io_refusal", "host_copy",
           "h2d_bandwidth"]

READS = ("direct", "buffered", "map")
ALIGN = 4096  # O_DIRECT: offsets, lengths and buffer addresses in multiples of this (covers 512-byte sectors)
CHUNK = 8 * 2**20  # bytes per read request: big enough for the disk, small enough to keep several in flight

Device = Union[str, torch.device]


@dataclass
class Loaded:
    """One block's tensors, read and on the device (or on their way there, behind ``event``). Built in chapter 08."""

    state: dict[str, torch.Tensor] = field(repr=False)  # name inside the block -> tensor
    bytes: int  # bytes read from disk for it (the looked-up rows' pages, for a lookup table on the CPU)
    read_start: float  # time.perf_counter() when the read began
    read_end: float  # ... and when the last byte was in host memory
    event: Optional["torch.cuda.Event"] = None  # CUDA: the copy (and transform) done on the copy stream
    slot: Optional["_Slot"] = field(default=None, repr=False)  # the host slot the tensors view (CPU), or None
    number: int = 0  # the reader's count of loads so far: the order of reads
    resident: bool = False  # held on the device by a residency policy: nothing was read for it
    thread: str = ""  # the thread that read it (the reader's own, when it was read ahead)


@dataclass(eq=False)
class _Slot:
    buffer: torch.Tensor  # page-aligned uint8
    free_after: Optional["torch.cuda.Event"] = None  # CUDA: the last copy out of it


def direct_io_refusal(path: Union[str, Path]) -> Optional[str]:
    """Why ``O_DIRECT`` reads of ``path`` cannot be used here, or None when they can. Built in chapter 08."""
    if not hasattr(os, "O_DIRECT"):
        return "this platform has no O_DIRECT"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        return f"the file system of {path} refuses O_DIRECT ({errno.errorcode.get(e.errno, e.errno)})"
    try:
        probe = _aligned(ALIGN)
        os.preadv(fd, [memoryview(probe.numpy())], 0)
    except OSError as e:
        return f"an O_DIRECT read of {path} failed ({errno.errorcode.get(e.errno, e.errno)})"
    finally:
        os.close(fd)
    return None


def host_copy(tensor: torch.Tensor, device: Device) -> torch.Tensor:
    """``tensor`` in host memory as a reader copies it to ``device`` from: pinned when ``device`` is a GPU (the
    copy engine reads it directly and asynchronously), as it is otherwise. Built in chapter 05."""
    return tensor.pin_memory() if torch.device(device).type == "cuda" else tensor


def _aligned(nbytes: int, *, pin: bool = False) -> torch.Tensor:
    """``nbytes`` of host memory starting on an ``ALIGN`` boundary, every page touched once."""
    if pin:  # cudaHostAlloc returns page-aligned memory
        buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        if buffer.data_ptr() % ALIGN == 0:
            return buffer.zero_()
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=pin)
    skip = -raw.data_ptr() % ALIGN
    return raw[skip:skip + nbytes].zero_()


def _one_core() -> None:
    """Start of each reader thread: its torch ops run on one core. A second thread that runs a parallel op gets
    an OpenMP team of its own; with more OpenMP threads than cores, libgomp stops spinning between parallel
    regions, and every small op of the *compute* thread then waits for its helpers to wake (on 2 cores: 3x
    slower, long after the read). Under OpenMP the setting is the calling thread's own; elsewhere it would be
    the whole process's, so it is left alone there."""
    if "parallel backend: OpenMP" in torch.__config__.parallel_info():
        torch.set_num_threads(1)


class BlockReader:
    """Reads blocks (lists of ``layout.Piece``) from disk onto ``device``. Built in chapter 08; chapter 05's
    dispatcher reads through it too.

    ``read``: "direct" (default), "buffered" or "map" (``READS``; see the module's text); ``method`` is the one
    running and ``why`` the reason when it is not the one asked for. ``in_flight``: read requests at once.
    ``submit`` runs ``load`` in the reader's own thread (``thread_name``), so that a caller computes while the
    next block is read. ``slot_bytes``: the size every slot is made with (``slot_size`` of the largest block a
    caller will read), so that slots never grow (growing briefly holds the old slot and the new one).
    Close it (``close()`` or ``with``) to stop its threads and free its slots.
    """

    def __init__(self, device: Device = "cpu", *, read: str = "direct", in_flight: int = 4,
                 thread_name: str = "layer-reader", slot_bytes: int = 0):
        if read not in READS:
            raise ValueError(f"read {read!r} must be one of {', '.join(map(repr, READS))}")
        if isinstance(in_flight, bool) or not isinstance(in_flight, int) or in_flight < 1:
            raise ValueError(f"in_flight {in_flight!r} must be an int >= 1 (read requests at once)")
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.method, self.why, self.min_slot = read, None, slot_bytes
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._slots: list[_Slot] = []
        self._free: deque[_Slot] = deque()  # slots given back, the oldest first
        self._computed: dict[int, "torch.cuda.Event"] = {}  # CUDA: load number -> its block's compute, done
        self._lock = threading.Lock()
        self._requests = ThreadPoolExecutor(in_flight, thread_name_prefix="block-read", initializer=_one_core)
        self._worker = ThreadPoolExecutor(1, thread_name_prefix=thread_name, initializer=_one_core)
        self._loads = 0
        self.closed = False

    # ------------------------------------------------------------------ the interface
    def load(self, pieces: Sequence[Piece], rows: Optional[torch.Tensor] = None,
             transform: Optional[Callable[[dict], dict]] = None,
             host: Optional[Mapping[str, torch.Tensor]] = None) -> Loaded:
        """Read a block's pieces and return its tensors on the device, ``transform`` applied to them (on CUDA
        on the copy stream: decompression, dtype conversion).

        ``rows``: for a lookup table on the CPU, the rows a pass looks up: the table is mapped without
        read-ahead and only their pages are read, whatever the method (``transform`` is not applied to it).
        ``host``: tensors already in host memory (pinned, on CUDA) to bring to the device instead of ``pieces``:
        chapter 05's "cpu" entries.
        """
        self._check_open()
        self._loads += 1
        number, t0 = self._loads, time.perf_counter()
        if host is not None:
            return self._finish(dict(host), 0, t0, t0, number, None, transform)
        if rows is not None and not self.cuda:
            return self._lookup(pieces, rows, number, t0)
        if self.method == "map":
            state, nbytes = {}, 0
            for piece in pieces:
                state.update(piece.views(map_range(piece.path, piece.start, piece.length)))
                nbytes += piece.length
            return self._finish(state, nbytes, t0, time.perf_counter(), number, None, transform)
        spans, size = _spans(pieces)
        slot = self._take_slot(max(size, self.min_slot))
        try:
            return self._read_into(slot, pieces, spans, number, t0, transform)
        except BaseException:
            self._give_back(slot)
            raise

    def submit(self, pieces: Sequence[Piece], rows: Optional[torch.Tensor] = None,
               transform: Optional[Callable[[dict], dict]] = None,
               host: Optional[Mapping[str, torch.Tensor]] = None) -> Future:
        """``load`` in the reader's thread; returns its ``Future``."""
        self._check_open()
        return self._worker.submit(self.load, pieces, rows, transform, host)

    def release(self, loaded: Loaded, after: Optional["torch.cuda.Event"] = None) -> None:
        """The block's tensors are no longer used: its slot may be read into again. On CUDA, ``after`` is an event
        recorded behind the last compute that used them: before load n copies, the reader waits (in its own
        thread) for load n - 2's, so the device holds at most two blocks beyond those whose compute has run."""
        if after is not None:
            with self._lock:
                self._computed[loaded.number] = after
        if loaded.slot is not None:
            self._give_back(loaded.slot)
            loaded.slot = None
        loaded.state = {}

    @property
    def slot_bytes(self) -> int:
        """Bytes of host slots held now (pinned on CUDA)."""
        return sum(s.buffer.numel() for s in self._slots)

    # ------------------------------------------------------------------ reading into a slot
    def _read_into(self, slot: _Slot, pieces, spans, number: int, t0: float, transform) -> Loaded:
        if slot.free_after is not None:
            slot.free_after.synchronize()  # the slot's last copy to the GPU has run: it may be overwritten
            slot.free_after = None
        device_buffer = None
        if self.cuda:
            with self._lock:
                done = self._computed.pop(number - 2, None)
                for n in [n for n in self._computed if n < number - 2]:
                    del self._computed[n]
            if done is not None:
                done.synchronize()
            with torch.cuda.stream(self.copy_stream):  # the block's bytes, not the whole slot's
                device_buffer = torch.empty(max(into + n for _, n, into in spans), dtype=torch.uint8,
                                            device=self.device)
        for into, length, future in self._submit_chunks(pieces, spans, slot):
            future.result()  # raises what the read raised
            if device_buffer is not None:  # copy this chunk while the next ones are still being read
                with torch.cuda.stream(self.copy_stream):
                    device_buffer[into:into + length].copy_(slot.buffer[into:into + length], non_blocking=True)
        read_end = time.perf_counter()
        state, nbytes = {}, 0
        source = slot.buffer if device_buffer is None else device_buffer
        for piece, (first, _, into) in zip(pieces, spans):
            begin = into + piece.start - first
            state.update(piece.views(source[begin:begin + piece.length]))
            nbytes += piece.length
        if self.cuda:  # the host bytes are free once the copy has run; the slot goes back at once
            slot.free_after = torch.cuda.Event()
            slot.free_after.record(self.copy_stream)
            self._give_back(slot)
            slot = None
        return self._finish(state, nbytes, t0, read_end, number, slot, transform)

    def _submit_chunks(self, pieces, spans, slot: _Slot) -> list[tuple[int, int, Future]]:
        """Every chunk of every span, submitted to the request threads: ``[(slot offset, length, future)]``."""
        jobs: list[tuple[int, int, Future]] = []
        try:
            for piece, (first, length, into) in zip(pieces, spans):
                fd = self._open(piece.path)
                size = os.fstat(fd).st_size
                if piece.start + piece.length > size:
                    os.close(fd)
                    raise CheckpointError(piece.path, [
                        f"{piece.path.name}: bytes [{piece.start:,}, {piece.start + piece.length:,}) asked for, "
                        f"but the file has {size:,} bytes (truncated, or a corrupt header)"])
                need = piece.start + piece.length - first  # what must arrive; the read may stop at the file's end
                closer = _Closer(fd, -(-length // CHUNK))
                for k in range(0, length, CHUNK):
                    n = min(CHUNK, length - k)
                    view = memoryview(slot.buffer[into + k:into + k + n].numpy())
                    jobs.append((into + k, n, self._requests.submit(_pread, fd, view, first + k,
                                                                    max(0, min(n, need - k)), piece.path, closer)))
        except BaseException:
            for _, _, job in jobs:  # let the requests already in flight finish before the slot is reused
                job.exception()
            raise
        return jobs

    def _open(self, path: Path) -> int:
        if self.method == "direct":
            try:
                return os.open(path, os.O_RDONLY | os.O_DIRECT)
            except (OSError, AttributeError):
                self.method, self.why = "buffered", direct_io_refusal(path) or f"O_DIRECT was refused for {path}"
                warnings.warn(f"BlockReader reads buffered, not direct: {self.why}", RuntimeWarning, stacklevel=2)
        return os.open(path, os.O_RDONLY)

    def _lookup(self, pieces, rows: torch.Tensor, number: int, t0: float) -> Loaded:
        """A lookup table on the CPU: mapped without read-ahead, then only the looked-up rows' pages read."""
        state, nbytes = {}, 0
        for piece in pieces:
            tensors = piece.views(map_range(piece.path, piece.start, piece.length, populate=False))
            nbytes += touch_rows(tensors, rows)
            state.update(tensors)
        return Loaded(state, nbytes, t0, time.perf_counter(), number=number,
                      thread=threading.current_thread().name)

    def _finish(self, state: dict, nbytes: int, t0: float, read_end: float, number: int, slot,
                transform) -> Loaded:
        event = None
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                state = {k: v.to(self.device, non_blocking=True) for k, v in state.items()}  # no-op once there
                if transform is not None:
                    state = transform(state)
                event = torch.cuda.Event(enable_timing=True)
                event.record(self.copy_stream)
        elif transform is not None:
            state = transform(state)
        return Loaded(state, nbytes, t0, read_end, event, slot, number, thread=threading.current_thread().name)

    # ------------------------------------------------------------------ slots
    def _take_slot(self, size: int) -> _Slot:
        """The free slot given back longest ago (so consecutive reads never share one), grown to ``size`` bytes
        if it is smaller; a new one when none is free (a block computing and the next being read hold two)."""
        with self._lock:
            slot = self._free.popleft() if self._free else None
            if slot is None:
                slot = _Slot(_aligned(size, pin=self.cuda))
                self._slots.append(slot)
                return slot
        if slot.buffer.numel() < size:  # grown: touched once, then reused
            if slot.free_after is not None:
                slot.free_after.synchronize()
            slot.buffer, slot.free_after = None, None  # the old one goes first: never both at once
            slot.buffer = _aligned(size, pin=self.cuda)
        return slot

    def _give_back(self, slot: _Slot) -> None:
        with self._lock:
            self._free.append(slot)

    # ------------------------------------------------------------------ lifetime
    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this BlockReader is closed (by close() or at the end of a with block); make a new "
                               "one to read again")

    def close(self) -> None:
        """Stop the reader's threads and free its slots. Closing twice is harmless."""
        self.closed = True
        self._worker.shutdown(wait=True)
        self._requests.shutdown(wait=True)
        self._slots, self._free, self._computed = [], deque(), {}

    def __enter__(self) -> "BlockReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def slot_size(pieces: Sequence[Piece]) -> int:
    """Bytes of slot a block of these pieces needs: each range rounded out to ``ALIGN``. Built in chapter 08."""
    return _spans(pieces)[1]


def _spans(pieces: Sequence[Piece]) -> tuple[list[tuple[int, int, int]], int]:
    """Where each piece goes in a slot: ``(file offset to read from, bytes to read, slot offset)``, each rounded
    out to ``ALIGN`` (so a direct read may take them), and the slot size they need."""
    spans, end = [], 0
    for piece in pieces:
        first = piece.start - piece.start % ALIGN
        last = -(-(piece.start + piece.length) // ALIGN) * ALIGN
        spans.append((first, last - first, end))
        end += last - first
    return spans, max(end, ALIGN)


def _pread(fd: int, view: memoryview, offset: int, need: int, path: Path, closer: "_Closer") -> None:
    """Fill ``view`` from file offset ``offset`` (``os.preadv`` releases the GIL); at least ``need`` bytes must
    come (more may lie past the file's end). A direct read that stops short at an unaligned count is finished
    buffered: O_DIRECT cannot resume there."""
    try:
        done = 0
        while done < need:
            if done % ALIGN:
                with open(path, "rb", buffering=0) as f:
                    f.seek(offset + done)
                    n = f.readinto(view[done:need]) or 0
            else:
                n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise CheckpointError(path, [f"{path.name} ended after {offset + done:,} bytes; "
                                             f"{need - done:,} more were to be read (truncated?)"])
            done += n
    finally:
        closer.done()


class _Closer:
    """Closes a file descriptor once its last chunk has been read."""

    def __init__(self, fd: int, chunks: int):
        self.fd, self.left, self.lock = fd, chunks, threading.Lock()

    def done(self) -> None:
        with self.lock:
            self.left -= 1
            if self.left == 0:
                os.close(self.fd)


def h2d_bandwidth(nbytes: int = 256 * 2**20, *, pinned: bool = True, device: Device = "cuda",
                  repeat: int = 5) -> float:
    """Host-to-device copy bandwidth in bytes/s: ``nbytes`` copied from a pinned (or pageable) CPU tensor to
    ``device``, timed with CUDA events, best of ``repeat`` after one warm-up copy. Built in chapter 08.

    Pinned memory is what the reader's slots are: the GPU's copy engine reads it directly (and
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
