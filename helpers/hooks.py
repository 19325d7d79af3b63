"""Hooks: what runs a dispatched model, entry by entry. Built in chapter 05.

The records a plan is made of (``Entry``: one ``device_map`` key; ``TensorRef``: one tensor object and every
``Use`` of it; ``Plan``) live here, below ``helpers.dispatch``, which makes them. ``attach(plan)`` registers two
plain PyTorch hooks per entry of a plan. The forward
*pre*-hook brings an offloaded entry's weights to the execution device and moves the inputs to where the entry
runs; the forward hook puts the weights back on ``meta``, so they stop costing memory. The hooks are thin: what
to load and when is the ``Prefetcher``'s (with ``prefetch=True`` it loads the *next* offloaded entry, in
execution order, while the current one computes), what took how long is the ``Timeline``'s, and the reading
itself is ``helpers.reader``'s (the same reader chapter 08's streamer uses: slots, direct reads, the copy stream
and its events). On a GPU no one waits for the whole device: the compute stream waits for each load's copy
event, and the reader waits for a compute event before it reuses memory.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from helpers.layout import pieces_of
from helpers.meta import is_inside
from helpers.reader import READS, BlockReader, Loaded
from helpers.tensorfiles import read_header

__all__ = ["Use", "TensorRef", "Entry", "Plan", "DISK_READS", "check_disk_read", "attach", "Hooks", "Prefetcher",
           "Timeline"]

# --------------------------------------------------------------------------- the records

@dataclass(frozen=True)
class Use:
    """One place that holds a tensor: attribute ``attr`` of module ``owner``, which the model calls ``name``.
    Built in chapter 05."""

    name: str
    owner: nn.Module = field(repr=False)
    attr: str


@dataclass(eq=False)
class TensorRef:
    """One tensor object and every ``Use`` of it (a tied weight has several); it is known by its first use's name.
    Built in chapter 05."""

    uses: list[Use]
    is_parameter: bool
    persistent: bool  # in the state dict, so a checkpoint can hold it (a non-persistent buffer is not)

    @property
    def name(self) -> str:
        return self.uses[0].name

    def get(self) -> torch.Tensor:
        return getattr(self.uses[0].owner, self.uses[0].attr)

    def set(self, value: torch.Tensor, uses: Optional[list[Use]] = None) -> None:
        """Make every use (or only ``uses``) hold ``value``, one ``Parameter`` for all of them: ties stay ties."""
        if self.is_parameter and not isinstance(value, nn.Parameter):
            value = nn.Parameter(value, requires_grad=False)
        for use in self.uses if uses is None else uses:
            setattr(use.owner, use.attr, value)


@dataclass(eq=False)
class Entry:
    """One ``device_map`` key: its module, where it runs, whether its weights are offloaded, and its tensors.
    Built in chapter 05."""

    name: str
    module: nn.Module = field(repr=False)
    runs_on: torch.device
    offload: Optional[str]  # None (resident on runs_on), "cpu" (host RAM) or "disk" (a file)
    tensors: list[TensorRef] = field(repr=False)  # every tensor with a use inside the module
    file: Optional[Path] = None  # "disk": its safetensors file
    host: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # "cpu": its weights in host RAM

    def uses(self, tensor: TensorRef) -> list[Use]:
        """The uses of ``tensor`` inside this entry's module."""
        return [use for use in tensor.uses if is_inside(use.name, self.name)]

    @property
    def weights(self) -> list[TensorRef]:
        """What an offloaded entry attaches and detaches: its parameters (its buffers stay where it runs)."""
        return [t for t in self.tensors if t.is_parameter] if self.offload else []


@dataclass(eq=False)
class Plan:
    """What ``dispatch`` does to a model: its entries in module order, and where they run. Built in chapter 05."""

    model: nn.Module = field(repr=False)
    entries: list[Entry]
    execution_device: torch.device  # where offloaded entries run
    checkpoint: Optional[Path] = None  # where meta tensors are read from


DISK_READS = READS  # how a "disk" entry is read: ("direct", "buffered", "map"), through helpers.reader


def check_disk_read(disk_read: str) -> None:
    """``ValueError`` unless ``disk_read`` is one of ``DISK_READS``. Built in chapter 05."""
    if not isinstance(disk_read, str) or disk_read not in DISK_READS:
        raise ValueError(f"disk_read {disk_read!r} is not one of {DISK_READS}: how a 'disk' entry's file is read "
                         "(helpers.reader: O_DIRECT into a reused slot, through the page cache, or memory-mapped)")


def attach(plan: Plan, *, prefetch: bool = False, timeline: Optional[list] = None,
           disk_read: str = "direct") -> nn.Module:
    """Register the hooks that run ``plan.model`` with its offloaded entries; returns the model. Built in chapter 05.

    ``prefetch=True`` loads the next offloaded entry (in execution order) in the reader's thread while the current
    one computes; ``timeline``, a list, receives a dict per load and per compute (module, kind, start, end,
    thread, clock). ``clock`` says what was timed: ``"host"`` (``time.perf_counter`` around the work) or, on a
    GPU, ``"cuda events"`` (device time, placed on the host clock at the end of each pass). ``disk_read`` is how
    "disk" entries are read (``helpers.reader.READS``).
    """
    check_disk_read(disk_read)
    hooks = Hooks(plan, prefetch, timeline, disk_read)
    model, add = plan.model, hooks.handles.append
    add(model.register_forward_pre_hook(hooks.before_model, with_kwargs=True, prepend=True))
    for entry in plan.entries:
        add(entry.module.register_forward_pre_hook(partial(hooks.before, entry), with_kwargs=True))
        add(entry.module.register_forward_hook(partial(hooks.after, entry)))
    add(model.register_forward_hook(hooks.after_model))
    model._helpers_dispatcher = hooks
    return model


# --------------------------------------------------------------------------- the hooks and what they share

def _to(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor inside (tuples, lists, dicts, model outputs) on ``device``."""
    if isinstance(obj, torch.Tensor):
        # non_blocking only towards a GPU: a copy *to* host memory must be finished before anyone reads it
        return obj if obj.device == device else obj.to(device, non_blocking=device.type == "cuda")
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_to(x, device) for x in obj)
    if isinstance(obj, dict):
        moved = {k: _to(v, device) for k, v in obj.items()}
        return type(obj)(**moved) if type(obj) is not dict and hasattr(obj, "to_tuple") else moved
    return obj


def _first_device(obj: Any) -> Optional[torch.device]:
    if isinstance(obj, torch.Tensor):
        return obj.device
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return next((device for x in items if (device := _first_device(x)) is not None), None)


class Prefetcher:
    """Loads offloaded entries onto the execution device through one ``helpers.reader.BlockReader``, the next
    one ahead when ``prefetch`` is on. Built in chapter 05.

    "Next" is execution order: module order until a pass has run, then the order in which the last pass
    fired the offloaded entries' pre-hooks (``seen``), so a model that calls its modules in another order than
    it registered them is read ahead correctly from its second pass on.
    """

    def __init__(self, entries: list[Entry], device: torch.device, prefetch: bool, disk_read: str):
        self.reader = BlockReader(device, read=disk_read, thread_name="prefetch")
        self.prefetch = prefetch
        self.order = list(entries)  # a guess until the first pass has run
        self.seen: dict[str, Entry] = {}  # this pass's offloaded entries, in the order their pre-hooks fired
        self.pending: dict[str, Future] = {}  # entry name -> its load, started ahead
        # where each "disk" entry's tensors lie in its file: headers are read once, here
        self.pieces = {e.name: pieces_of(read_header(e.file), {t.name: t.name for t in e.weights})
                       for e in entries if e.offload == "disk"}

    def _args(self, entry: Entry) -> tuple:
        return (self.pieces.get(entry.name, ()), None, None, entry.host if entry.offload == "cpu" else None)

    def take(self, entry: Entry) -> Loaded:
        """``entry``'s weights on the execution device: the load started ahead, or one now; then start the next."""
        self.seen.setdefault(entry.name, entry)
        future = self.pending.pop(entry.name, None)
        loaded = future.result() if future is not None else self.reader.load(*self._args(entry))
        if self.prefetch:
            i = self.order.index(entry) + 1
            if i < len(self.order):
                self.start(self.order[i])
        return loaded

    def start(self, entry: Entry) -> None:
        """Start loading ``entry`` in the reader's thread, unless it is on its way already."""
        if entry.name not in self.pending:
            self.pending[entry.name] = self.reader.submit(*self._args(entry))

    def pass_started(self) -> None:
        self.seen = {}
        if self.prefetch and self.order:
            self.start(self.order[0])

    def pass_ended(self) -> None:
        """Learn the execution order; drop loads a wrong guess of it started."""
        if self.seen:  # entries this pass did not call keep their place after the ones it did
            self.order = list(self.seen.values()) + [e for e in self.order if e.name not in self.seen]
        for future in self.pending.values():
            self.reader.release(future.result())
        self.pending.clear()

    def close(self) -> None:
        self.pending.clear()
        self.reader.close()


class Timeline:
    """A dispatched model's loads and computes, one dict each (module, kind, start, end, thread, clock), in
    ``records`` (the list ``attach`` was given), or nothing when that list is None. Built in chapter 05.

    Host work is timed with ``time.perf_counter``; on a GPU, the copies and the compute are timed with CUDA
    events, placed on the host clock at the end of each pass through an anchor event recorded as it starts.
    """

    def __init__(self, records: Optional[list], gpus: set[torch.device]):
        self.records, self.gpus = records, gpus
        self.anchors: dict[torch.device, tuple] = {}  # GPU -> (event, host time) placing its events on the clock
        self.events: list[tuple] = []  # (module, kind, device, start event, end event), read after the pass
        self.started: dict[str, tuple] = {}  # entry name -> (host start, CUDA start event or None)

    def _event(self, device: torch.device):
        if self.records is None or device.type != "cuda":
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(device))
        return event

    def pass_started(self) -> None:
        if self.records is not None:
            for device in self.gpus:  # each GPU's clock, tied to the host's
                anchor = torch.cuda.Event(enable_timing=True)
                anchor.record(torch.cuda.current_stream(device))
                anchor.synchronize()  # the host time is taken after the anchor ran: device times are never early
                self.anchors[device] = (anchor, time.perf_counter())

    def loaded(self, name: str, loaded: Loaded, device: torch.device) -> None:
        if self.records is None:
            return
        if loaded.event is not None and device in self.anchors:  # the copy's end, on the GPU's clock
            self.events.append((name, "load", device, None, loaded.event, loaded.read_start))
        else:
            self.records.append({"module": name, "kind": "load", "start": loaded.read_start, "end": loaded.read_end,
                                 "thread": loaded.thread, "clock": "host"})

    def computing(self, name: str, device: torch.device) -> None:
        self.started[name] = (time.perf_counter(), self._event(device))

    def computed(self, name: str, device: torch.device) -> None:
        start, event = self.started.pop(name)
        if event is not None:
            self.events.append((name, "compute", device, event, self._event(device), None))
        elif self.records is not None:
            self.records.append({"module": name, "kind": "compute", "start": start, "end": time.perf_counter(),
                                 "thread": threading.current_thread().name, "clock": "host"})

    def pass_ended(self) -> None:
        """Place the pass's GPU intervals on the host clock (waiting for their last event)."""
        for name, kind, device, start, end, host_start in self.events:
            anchor, t0 = self.anchors[device]
            end.synchronize()
            begin = host_start if start is None else t0 + anchor.elapsed_time(start) / 1e3
            self.records.append({"module": name, "kind": kind, "start": begin,
                                 "end": max(begin, t0 + anchor.elapsed_time(end) / 1e3),
                                 "thread": threading.current_thread().name, "clock": "cuda events"})
        self.events.clear()


class Hooks:
    """The four hooks of a dispatched model, thin: each hands its work to the ``Prefetcher`` (what to load, and
    when) and the ``Timeline`` (what took how long). Built in chapter 05."""

    def __init__(self, plan: Plan, prefetch: bool, timeline: Optional[list], disk_read: str = "direct"):
        self.offloaded = [entry for entry in plan.entries if entry.offload]
        self.device = plan.execution_device
        self.prefetcher = Prefetcher(self.offloaded, self.device, prefetch, disk_read)
        self.timeline = Timeline(timeline, {e.runs_on for e in plan.entries if e.runs_on.type == "cuda"})
        self.attached: dict[str, Loaded] = {}  # entry name -> the load its weights come from, until it is done
        self.handles: list = []
        self.input_device: Optional[torch.device] = None

    def before(self, entry: Entry, module: nn.Module, args: tuple, kwargs: dict):
        """Forward pre-hook: attach an offloaded entry's weights (the next entry starts loading), move the inputs."""
        if entry.offload:
            loaded = self.prefetcher.take(entry)
            if loaded.event is not None:  # copied on the reader's stream: the compute stream waits for it there
                compute = torch.cuda.current_stream(self.device)
                compute.wait_event(loaded.event)
                for value in loaded.state.values():
                    value.record_stream(compute)  # its memory is reused only after this compute has run
            self.timeline.loaded(entry.name, loaded, self.device)
            for tensor in entry.weights:
                tensor.set(loaded.state[tensor.name], entry.uses(tensor))
            self.attached[entry.name] = loaded
        self.timeline.computing(entry.name, entry.runs_on)
        return _to(args, entry.runs_on), _to(kwargs, entry.runs_on)

    def after(self, entry: Entry, module: nn.Module, args: tuple, output: Any):
        """Forward hook: put an offloaded entry's weights back on meta, which releases their memory."""
        self.timeline.computed(entry.name, entry.runs_on)
        for tensor in entry.weights:
            tensor.set(tensor.get().to("meta"), entry.uses(tensor))
        loaded = self.attached.pop(entry.name, None)
        if loaded is not None:
            done = None
            if self.device.type == "cuda":
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream(self.device))
            self.prefetcher.reader.release(loaded, after=done)
        return output

    def before_model(self, model: nn.Module, args: tuple, kwargs: dict):
        """The model's own pre-hook: remember where the inputs are, and start loading the first offloaded entry."""
        self.input_device = _first_device((args, kwargs))
        self.timeline.pass_started()
        self.prefetcher.pass_started()
        return args, kwargs

    def after_model(self, model: nn.Module, args: tuple, output: Any):
        """The model's own hook: learn the execution order, place the GPU intervals, bring the output back."""
        self.prefetcher.pass_ended()
        self.timeline.pass_ended()
        return _to(output, self.input_device) if self.input_device is not None else output
