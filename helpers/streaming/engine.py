"""The engine of layer streaming: one loop over a model's blocks, and the small pieces that hang on it.

Built in chapter 08. ``stream_pass`` is the whole algorithm: for each block, wait for its weights, run the batch
through it, release it, while the next block is read. Everything else is a piece it is handed:

* a *source* (``BlockSource``): what to read and from where (``helpers.layout``), read by a
  ``helpers.reader.BlockReader``, decompressed by a codec and converted to the compute dtype on the way;
* ``Resident``, a policy over a source: blocks that stay on the device after their first read;
* observers (``BlockTimeline``, ``Progress``): what a pass records or shows, called before and after each block.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import torch

from helpers.layout import BlockLayout, block_layout
from helpers.reader import BlockReader, Loaded, slot_size
from helpers.tensorfiles import drop_page_range

__all__ = ["stream_pass", "BlockSource", "Resident", "Observer", "BlockTimeline", "Progress"]


def stream_pass(blocks: Sequence, source, step: Callable, observers: Sequence["Observer"] = ()) -> None:
    """One pass over a model on disk: for each block, wait for its weights, run the batch through it
    (``step(block)``), release it; meanwhile the source reads the next block. Built in chapter 08."""
    ahead = source.fetch(0)
    try:
        for i, block in enumerate(blocks):
            loaded = ahead.result()                                        # wait for the block's weights
            ahead = source.fetch(i + 1) if i + 1 < len(blocks) else None   # read the next one meanwhile
            block.attach(loaded.state)
            for observer in observers:
                observer.computing(block, loaded)
            with torch.inference_mode():
                step(block)                                                # run the batch through it
            for observer in observers:
                observer.computed(block, loaded)
            block.detach()                                                 # release it
            source.release(i, loaded)
    finally:
        if ahead is not None:
            source.cancel(ahead)
        for block in blocks:
            block.detach()


class _Ready:
    """A block whose weights are at hand already (``result()`` as a ``Future``'s)."""

    def __init__(self, loaded: Loaded):
        self.loaded = loaded

    def result(self) -> Loaded:
        return self.loaded


class _Deferred:
    """A block read only when its result is asked for (no prefetch): one block held at a time."""

    def __init__(self, read: Callable[[], Loaded]):
        self.read = read

    def result(self) -> Loaded:
        return self.read()


class _Reading:
    """A block being read: ``result()`` waits for it and hands its tensors to the compute stream."""

    def __init__(self, future: Future, source: "BlockSource"):
        self.future, self.source = future, source

    def result(self) -> Loaded:
        return self.source.take(self.future.result())


class BlockSource:
    """The blocks of a model on disk, read one by one onto ``device``. Built in chapter 08.

    ``checkpoint``: a per-layer split or an ordinary checkpoint folder, read in place (``helpers.layout``:
    the headers are read once, here; ``layout``: one its caller has read already). ``dtype``: what the blocks
    are computed in (tensors are converted on the way, on the copy stream on CUDA). ``codec``: for a
    compressed split, the ``helpers.quant`` codec that decodes it (on the device, before the conversion).
    ``read``: how a block's bytes are read (``helpers.reader.READS``). ``prefetch``: ``fetch`` starts reading
    in the reader's thread and returns at once; else the read happens when its result is asked for.
    ``cold``: after each block, drop the cached pages of its byte ranges (Linux), so that every pass of a
    buffered or mapped read comes from the disk (a direct read never uses the cache). ``lookups``: blocks that
    are lookup tables (the embedding): on the CPU a pass reads only the rows in ``rows[name]``, and the reader's
    slots are sized for the other blocks.
    """

    def __init__(self, checkpoint: Union[str, Path], *, device: Union[str, torch.device], dtype: torch.dtype,
                 codec=None, prefetch: bool = True, cold: bool = False, read: str = "direct",
                 layout: Optional[BlockLayout] = None, lookups: Sequence[str] = ()):
        self.checkpoint = Path(checkpoint)
        if cold and not hasattr(os, "posix_fadvise"):
            raise ValueError("dropping the page cache (drop_page_cache=True) needs os.posix_fadvise (Linux); "
                             "this platform has none")
        self.layout = layout if layout is not None else block_layout(self.checkpoint)
        self.names: list[str] = list(self.layout.blocks)
        self.device, self.dtype, self.codec = torch.device(device), dtype, codec
        self.prefetch, self.cold = prefetch, cold
        self.lookups = set(lookups) if self.device.type != "cuda" else set()  # mapped by rows, not read into slots
        self.reader = BlockReader(self.device, read=read, slot_bytes=max(
            slot_size(self.layout.pieces[b]) for b in self.names if b not in self.lookups))
        self.rows: Mapping[str, torch.Tensor] = {}  # this pass's looked-up rows, per lookup table's block name
        self._dropper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="page-dropper")
        self._drops: list[Future] = []
        self.closed = False

    def _transform(self, block: str, state: dict) -> dict:
        """A block's tensors as computed: decompressed (a compressed split; the codec sees full names, as the
        split stores them: ``lm_head.weight.q``, not the block's own ``weight.q``), then in the compute dtype."""
        if self.codec is not None:
            full = self.codec.decompress({f"{block}.{k}": v for k, v in state.items()}, self.dtype)
            state = {k[len(block) + 1:]: v for k, v in full.items()}
        return {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in state.items()}

    def fetch(self, i: int):
        """Start reading block i (in the reader's thread, with ``prefetch``); ``result()`` of what it returns
        gives the ``Loaded`` block, ready to compute, in the compute dtype (the embedding on the CPU: only its
        looked-up rows, in its stored dtype; the lookup's output is converted)."""
        self._check_open()  # here, in the caller's thread: not as a reader thread's refusal to start
        name = self.names[i]
        read = (self.layout.pieces[name], self.rows.get(name), partial(self._transform, name))
        if not self.prefetch:
            return _Deferred(lambda: self.take(self.reader.load(*read)))
        return _Reading(self.reader.submit(*read), self)

    def take(self, loaded: Loaded) -> Loaded:
        """On CUDA, make the compute stream wait for the block's copy, and mark its tensors as used there (so the
        allocator reuses their memory only after the compute queued so far has run). The host never waits."""
        if loaded.event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(loaded.event)
            for tensor in loaded.state.values():
                tensor.record_stream(compute)
        return loaded

    def release(self, i: int, loaded: Loaded) -> None:
        """Block i is done: its slot goes back to the reader (on CUDA, behind an event after the compute that
        used it); with ``cold``, its byte ranges' cached pages are dropped in a thread of their own."""
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
        self.reader.release(loaded, after=done)
        if self.cold:
            pieces = self.layout.pieces[self.names[i]]
            self._drops.append(self._dropper.submit(
                lambda: [drop_page_range(p.path, p.start, p.length) for p in pieces]))

    def cancel(self, pending) -> None:
        """A pass stopped before using a block it started reading: wait for the read, then let it go."""
        future = getattr(pending, "future", None)
        if future is not None and not future.cancel() and future.exception() is None:
            self.reader.release(future.result())

    def finish(self) -> None:
        """After a pass: wait for the page drops it started (raising here if one failed)."""
        drops, self._drops = self._drops, []
        for drop in drops:
            drop.result()

    @property
    def pinned_bytes(self) -> int:
        """Bytes of pinned host slots held now (CUDA only; 0 on the CPU and after ``close``)."""
        return self.reader.slot_bytes if self.reader.cuda else 0

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"the block source of {self.checkpoint} is closed (by close() or at the end of a "
                               "with block); make a new LayerStreamer (or BlockSource) to read again")

    def close(self) -> None:
        """Stop the reader and dropper threads and free the slots. Closing twice is harmless."""
        self.closed = True
        self.reader.close()
        self._dropper.shutdown(wait=True)

    def __enter__(self) -> "BlockSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Resident:
    """A policy over a source: the blocks ``keep`` stay on the device after their first read and are never read
    again. Everything else passes through to ``source``. Built in chapter 08."""

    def __init__(self, source: BlockSource, keep: set[int]):
        self.source, self.keep = source, set(keep)
        self.held: dict[int, Loaded] = {}

    def fetch(self, i: int):
        if i in self.held:
            kept = self.held[i]
            return _Ready(Loaded(kept.state, 0, time.perf_counter(), time.perf_counter(), resident=True))
        return self.source.fetch(i)

    def release(self, i: int, loaded: Loaded) -> None:
        if loaded.resident:
            return
        if i in self.keep:  # kept from now on; on the CPU in memory of its own (not a reused slot, not the file)
            copy = self.source.device.type != "cuda"
            self.held[i] = Loaded({k: v.clone() if copy else v for k, v in loaded.state.items()}, 0, 0.0, 0.0,
                                  resident=True)
        self.source.release(i, loaded)

    def cancel(self, pending) -> None:
        self.source.cancel(pending)

    def clear(self) -> None:
        """Forget the held blocks (their memory is freed with the last reference)."""
        self.held.clear()


class Observer:
    """Something a pass tells about each block: before its compute (``computing``) and after (``computed``);
    ``start`` and ``finish`` bracket the pass. Built in chapter 08."""

    def start(self) -> None:
        pass

    def computing(self, block, loaded: Loaded) -> None:
        pass

    def computed(self, block, loaded: Loaded) -> None:
        pass

    def finish(self) -> None:
        pass


class BlockTimeline(Observer):
    """One record per block: ``block``, ``bytes`` read, ``read_start``, ``read_end``, ``compute_start``,
    ``compute_end`` (seconds since the pass started) and ``resident``. Built in chapter 08.

    On the CPU all four are host clock times. On CUDA, ``read_start`` is host time and the other three come
    from CUDA events (``read_end``: the block's copy and conversion done on the copy stream; ``compute_*``: its
    kernels on the compute stream), read once the pass is over: the host launches kernels ahead of the GPU, so
    host times would show only the launches.
    """

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.device = device
        self.records: list[dict] = []

    def _event(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def start(self) -> None:
        self.records, self._events, self.t0 = [], [], time.perf_counter()
        self._zero = self._event() if self.cuda else None

    def computing(self, block, loaded: Loaded) -> None:
        self._c0 = self._event() if self.cuda else time.perf_counter()

    def computed(self, block, loaded: Loaded) -> None:
        c1 = self._event() if self.cuda else time.perf_counter()
        read_start = (loaded.read_start if not loaded.resident else time.perf_counter()) - self.t0
        read_end = (loaded.read_end - self.t0) if not loaded.resident else read_start
        record = {"block": block.name, "bytes": loaded.bytes, "read_start": read_start, "read_end": read_end,
                  "compute_start": self._c0, "compute_end": c1, "resident": loaded.resident}
        if not self.cuda:
            record.update(compute_start=self._c0 - self.t0, compute_end=c1 - self.t0)
        self._events.append(loaded.event)
        self.records.append(record)

    def finish(self) -> None:
        if not self.cuda or not self.records:
            return
        self.records[-1]["compute_end"].synchronize()  # every block's kernels have run: the events' times
        seconds = lambda event: self._zero.elapsed_time(event) / 1e3  # noqa: E731  (elapsed_time is in ms)
        for record, copied in zip(self.records, self._events):
            record.update(read_end=record["read_end"] if copied is None else seconds(copied),
                          compute_start=seconds(record["compute_start"]), compute_end=seconds(record["compute_end"]))


class Progress(Observer):
    """A progress bar over a pass's blocks (tqdm), left complete when the pass ends. Built in chapter 08."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.enabled = total, desc, enabled

    def start(self) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total, desc=self.desc, unit="block", leave=False, disable=not self.enabled)

    def computed(self, block, loaded: Loaded) -> None:
        self.bar.update()

    def finish(self) -> None:
        self.bar.refresh()  # the bar's last state is shown (and saved in a notebook) complete, not mid-way
        self.bar.close()
