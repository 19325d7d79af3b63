"""Dispatch: run a model whose weights live on several devices, in host RAM or on disk. Built in chapter 05.

``dispatch(model, device_map, ...)`` is shaped like accelerate's ``dispatch_model``. It checks the whole request
first (``check_dispatch``: chapter 04's ``validate_device_map``, then what only dispatching needs) and raises one
``ValueError`` before a tensor moves or a file is written. Then three steps, each a public function:

* ``plan``: one ``Entry`` per ``device_map`` key, with the tensors inside it (a ``Tensor`` per tensor object, held by
  one ``Use`` or, tied, several), where its weights live and where it runs. It touches nothing.
* ``materialise``: fills meta tensors from ``checkpoint``, writes each "disk" entry to
  ``offload_folder/<key>.safetensors`` (or reuses the file while its cache key matches), keeps each "cpu" entry's
  weights in host RAM (pinned when the execution device is a GPU), and leaves every offloaded parameter on ``meta``.
* ``attach``: two plain PyTorch hooks per entry. The forward *pre*-hook brings an offloaded entry's weights to the
  execution device and moves the inputs to where the entry runs; the forward hook puts the weights back on ``meta``,
  so they stop costing memory. With ``prefetch=True`` a background thread loads the *next* offloaded entry while the
  current one computes. "Next" is execution order: the order the pre-hooks fired in the last forward pass (before
  the first pass, module order, which is a guess), so a model that calls its modules in another order than it
  registered them is still read ahead correctly from its second pass on.

"cpu" in a map means "kept in host RAM and attached only while the module runs"; "disk" means "kept in a
safetensors file, read only while the module runs". On the CPU a file is memory-mapped by default (nothing is
copied: the weights *are* the page cache's pages; chapter 05 measures this against ``disk_read="readinto"``, one
``readinto`` into a reused buffer); for a GPU it is always read with one ``readinto`` into a reused pinned buffer and
copied on a side stream.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from helpers.device_map import validate_device_map
from helpers.meta import is_inside
from helpers.layout import weight_map
from helpers.tensorfiles import (KEY_FIELD, cache_key, file_key, map_safetensors, read_safetensors, save_safetensors,
                                 why_stale, written_by_helpers)

__all__ = ["dispatch", "undispatch", "check_dispatch", "plan", "materialise", "attach",
           "Use", "Tensor", "Entry", "Plan", "Dispatcher", "DISK_READS"]

DISK_READS = ("map", "readinto")  # how a CPU-run "disk" entry is read: memory-mapped, or copied into a reused buffer

Device = Union[int, str, torch.device]
PathLike = Union[str, Path]


# --------------------------------------------------------------------------- the records

@dataclass(frozen=True)
class Use:
    """One place that holds a tensor: attribute ``attr`` of module ``owner``, which the model calls ``name``."""

    name: str
    owner: nn.Module = field(repr=False)
    attr: str


@dataclass(eq=False)
class Tensor:
    """One tensor object and every ``Use`` of it (a tied weight has several); it is known by its first use's name."""

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
    """One ``device_map`` key: its module, where it runs, whether its weights are offloaded, and its tensors."""

    name: str
    module: nn.Module = field(repr=False)
    runs_on: torch.device
    offload: Optional[str]  # None (resident on runs_on), "cpu" (host RAM) or "disk" (a file)
    tensors: list[Tensor] = field(repr=False)  # every tensor with a use inside the module
    file: Optional[Path] = None  # "disk": its safetensors file
    host: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # "cpu": its weights in host RAM

    def uses(self, tensor: Tensor) -> list[Use]:
        """The uses of ``tensor`` inside this entry's module."""
        return [use for use in tensor.uses if is_inside(use.name, self.name)]

    @property
    def weights(self) -> list[Tensor]:
        """What an offloaded entry attaches and detaches: its parameters (its buffers stay where it runs)."""
        return [t for t in self.tensors if t.is_parameter] if self.offload else []


@dataclass(eq=False)
class Plan:
    """What ``dispatch`` does to a model: its entries in module order, and where they run."""

    model: nn.Module = field(repr=False)
    entries: list[Entry]
    execution_device: torch.device  # where offloaded entries run
    checkpoint: Optional[Path] = None  # where meta tensors are read from


# --------------------------------------------------------------------------- checking a request

def _device(value: Device) -> Union[torch.device, str]:
    """A map value as a device: 0 -> cuda:0, "cpu" -> cpu; "disk" stays "disk". Raises for what is not a device."""
    if isinstance(value, str) and value == "disk":
        return "disk"
    if isinstance(value, bool) or not isinstance(value, (int, str, torch.device)):
        raise ValueError(f"{value!r} is a {type(value).__name__}, not a device")
    return torch.device("cuda", value) if isinstance(value, int) else torch.device(value)


def _unusable(value: Device) -> Optional[str]:
    """Why ``value`` cannot hold weights on this machine; None when it can or is no device at all."""
    try:
        device = _device(value)
    except (ValueError, RuntimeError):
        return None  # not a device at all: validate_device_map reports that
    if device == "disk":
        return None
    if device.type == "meta":
        return f"{value!r} is the meta device, which holds no data"
    if device.type not in ("cpu", "cuda"):
        return f"{value!r}: dispatch runs on 'cpu' and CUDA GPUs, not on {device.type!r}"
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        return f"{value!r} names a GPU this machine does not have ({torch.cuda.device_count()} visible)"
    return None


def _tensors(model: nn.Module) -> list[Tensor]:
    """Every tensor of ``model`` once, with all its uses: tied weights are one ``Tensor`` with several."""
    persistent = set(model.state_dict(keep_vars=True))
    found: dict[int, Tensor] = {}
    for is_parameter, named in ((True, model.named_parameters(remove_duplicate=False)),
                                (False, model.named_buffers(remove_duplicate=False))):
        for name, tensor in named:
            prefix, _, attr = name.rpartition(".")
            record = found.setdefault(id(tensor), Tensor([], is_parameter, False))
            record.uses.append(Use(name, model.get_submodule(prefix), attr))
            record.persistent |= name in persistent
    return list(found.values())


def _offload_file(folder: PathLike, key: str) -> Path:
    return Path(folder) / f"{key or 'model'}.safetensors"


def _some(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _dispatch_problems(model: nn.Module, device_map: Mapping, checkpoint: Optional[PathLike],
                       offload_folder: Optional[PathLike], execution_device: Optional[Device]) -> list[str]:
    """What only dispatching needs, beyond what ``validate_device_map`` checks."""
    problems = []
    modules, tensors = dict(model.named_modules()), _tensors(model)
    tensor_names = {use.name for t in tensors for use in t.uses}
    for key, value in device_map.items():
        if key not in modules and key in tensor_names:
            problems.append(f"key {key!r} names a tensor; dispatch hooks whole modules, so map its module "
                            f"{key.rpartition('.')[0]!r} instead")
        if (reason := _unusable(value)) is not None:
            problems.append(f"key {key!r}: {reason}")
    if execution_device is not None:
        try:
            reason = "'disk' cannot compute" if _device(execution_device) == "disk" else _unusable(execution_device)
        except (ValueError, RuntimeError) as err:
            reason = f"not a device ({err})"
        if reason is not None:
            problems.append(f"execution_device {execution_device!r}: {reason}; expected a GPU index, 'cuda:N' or 'cpu'")
    keys = [key for key in device_map if isinstance(key, str)]
    unplaced = [t.name for t in tensors if not t.persistent and not any(is_inside(t.name, k) for k in keys)]
    if unplaced:  # validate_device_map checks the state dict, which leaves non-persistent buffers out
        problems.append(f"buffer(s) {_some(unplaced)} are inside no device_map key")

    index = None
    if checkpoint is not None:
        try:
            index = weight_map(checkpoint)[1]
        except (OSError, ValueError) as err:
            problems.append(f"checkpoint {str(checkpoint)!r} cannot be read: {err}")
    empty = [t for t in tensors if t.get().device.type == "meta"]
    lost = [t.name for t in empty if not t.persistent]
    if lost:
        problems.append(f"buffer(s) {_some(lost)} are on meta and no checkpoint stores them; build the model with "
                        "accelerate.init_empty_weights(), which keeps buffers real")
    stored = [t for t in empty if t.persistent]
    if stored and checkpoint is None:
        problems.append(f"{len(stored)} tensor(s) are on meta (no data), e.g. {_some([t.name for t in stored], 2)}; "
                        "pass checkpoint= a safetensors file or folder")
    missing = [t.name for t in stored if index is not None and not any(u.name in index for u in t.uses)]
    if missing:
        problems.append(f"{_some(missing)} are on meta and checkpoint {str(checkpoint)!r} has no tensor of that name "
                        "(a tied weight? call model.tie_weights() first)")

    disk = [key for key, value in device_map.items() if isinstance(value, str) and value == "disk"]
    if disk and offload_folder is None:
        problems.append(f"device_map puts {_some(disk)} on 'disk' but offload_folder is None; pass a folder")
    for key in disk if offload_folder is not None else []:
        path = _offload_file(offload_folder, key)
        if path.exists() and not written_by_helpers(path):
            problems.append(f"{path} exists and was not written by helpers; it will not be overwritten. "
                            "Choose another offload_folder or move the file away")
    return problems


def check_dispatch(model: nn.Module, device_map: Mapping[str, Device], *, checkpoint: Optional[PathLike] = None,
                   offload_folder: Optional[PathLike] = None, execution_device: Optional[Device] = None) -> None:
    """Raise one ``ValueError`` naming every problem of a dispatch request; changes nothing. Built in chapter 05.

    First chapter 04's ``validate_device_map`` (keys, devices, overlaps, coverage, no-split modules, ties on one
    device), then what only dispatching needs: devices this machine has, modules (not tensors) as keys, every buffer
    placed, data for every meta tensor, a folder for "disk", and no foreign file where an offload file would go.
    """
    if not isinstance(device_map, Mapping):
        raise ValueError(f"device_map {device_map!r} must be a dict of module name -> device, "
                         "like {'model.layers.0': 'disk', ...}")
    try:
        validate_device_map(model, device_map)
        sections = []
    except ValueError as err:
        sections = [str(err)]
    problems = _dispatch_problems(model, device_map, checkpoint, offload_folder, execution_device)
    if problems:
        sections.append(f"dispatch has {len(problems)} more problem(s):\n  - " + "\n  - ".join(problems))
    if sections:
        raise ValueError(f"cannot dispatch {type(model).__name__}:\n" + "\n".join(sections))


# --------------------------------------------------------------------------- plan, materialise, attach

def plan(model: nn.Module, device_map: Mapping[str, Device], *, checkpoint: Optional[PathLike] = None,
         offload_folder: Optional[PathLike] = None, execution_device: Optional[Device] = None) -> Plan:
    """Decide, touching nothing, where each entry's weights live and where it runs. Built in chapter 05.

    The request must be one ``check_dispatch`` accepts. Entries come in module (registration) order, which is the
    order a forward pass meets them in most models; prefetching starts from it and then follows the order the hooks
    actually fire (``Dispatcher``). Offloaded entries run on ``execution_device``, by default the map's first GPU
    (accelerate's main device), else the CPU. An offloaded entry without parameters has nothing to offload: it
    stays where it runs.
    """
    devices = {key: _device(value) for key, value in device_map.items()}
    gpus = [d for d in devices.values() if d != "disk" and d.type != "cpu"]
    execution = _device(execution_device) if execution_device is not None else gpus[0] if gpus else torch.device("cpu")
    tensors = _tensors(model)
    entries = []
    for name, module in model.named_modules():
        if name not in devices:
            continue
        inside = [t for t in tensors if any(is_inside(use.name, name) for use in t.uses)]
        device = devices[name]
        offloaded = device == "disk" or device.type == "cpu"
        offload = ("disk" if device == "disk" else "cpu") if offloaded else None
        if not any(t.is_parameter for t in inside):
            offload = None  # only buffers: nothing to offload, they stay where the entry runs
        runs_on = execution if offloaded else device
        entries.append(Entry(name, module, runs_on, offload, inside,
                             file=_offload_file(offload_folder, name) if offload == "disk" else None))
    return Plan(model, entries, execution, Path(checkpoint) if checkpoint is not None else None)


def materialise(plan: Plan) -> Plan:
    """Give every entry its data; returns ``plan``. Built in chapter 05.

    Resident tensors go to the device their entry runs on (a meta one is read from the checkpoint first); a "disk"
    entry's parameters are written to its file, unless the file there was made from the same checkpoint; a "cpu"
    entry's are kept in host RAM. Then every offloaded parameter becomes an empty meta tensor.
    """
    root, index = weight_map(plan.checkpoint) if plan.checkpoint is not None else (None, {})
    shards: dict[str, dict[str, torch.Tensor]] = {}  # checkpoint file -> its tensors, mapped and read in whole

    def data(tensor: Tensor) -> torch.Tensor:
        value = tensor.get()
        if value.device.type != "meta":
            return value.detach()
        name = next(use.name for use in tensor.uses if use.name in index)
        if index[name] not in shards:
            shards[index[name]] = map_safetensors(root / index[name])[0]  # one sequential read per file
        return shards[index[name]][name].to(value.dtype, copy=True)

    placed: dict[tuple[str, torch.device], torch.Tensor] = {}  # a tensor tied across entries is placed once
    for entry in plan.entries:
        for tensor in entry.tensors:
            if entry.offload and tensor.is_parameter:
                continue  # an offloaded weight: below
            if (tensor.name, entry.runs_on) not in placed:
                value = data(tensor).to(entry.runs_on)
                placed[tensor.name, entry.runs_on] = nn.Parameter(value, False) if tensor.is_parameter else value
            tensor.set(placed[tensor.name, entry.runs_on], entry.uses(tensor))
        if entry.offload == "disk":
            from_checkpoint = all(t.get().device.type == "meta" for t in entry.weights)
            key = cache_key(tensors=[[t.name, list(t.get().shape), str(t.get().dtype)] for t in entry.weights],
                            sources=file_key(*sorted({root / f for f in index.values()})) if from_checkpoint
                            else os.urandom(8).hex())  # weights from memory: never trust an old file
            if why_stale(entry.file, key):
                entry.file.parent.mkdir(parents=True, exist_ok=True)
                save_safetensors(entry.file, {t.name: data(t) for t in entry.weights}, metadata={KEY_FIELD: key})
        elif entry.offload == "cpu":
            pin = plan.execution_device.type == "cuda"  # pinned: copied to the GPU asynchronously
            entry.host = {t.name: data(t).pin_memory() if pin else data(t) for t in entry.weights}
    for entry in plan.entries:
        for tensor in entry.weights:
            tensor.set(tensor.get().to("meta"), entry.uses(tensor))
    return plan


def _check_disk_read(disk_read: str) -> None:
    if not isinstance(disk_read, str) or disk_read not in DISK_READS:
        raise ValueError(f"disk_read {disk_read!r} is not one of {DISK_READS}: 'map' memory-maps a CPU-run 'disk' "
                         "entry's file, 'readinto' copies it into a reused buffer")


def attach(plan: Plan, *, prefetch: bool = False, timeline: Optional[list] = None,
           disk_read: str = "map") -> nn.Module:
    """Register the hooks that run ``plan.model`` with its offloaded entries; returns the model. Built in chapter 05.

    ``prefetch=True`` loads the next offloaded entry (in execution order) on a background thread; ``timeline``, a
    list, receives a dict per load and per compute (module, kind, start, end, thread, clock). ``clock`` says what
    was timed: ``"host"`` (``time.perf_counter`` around the work) or, for compute on a GPU, ``"cuda events"``
    (device time, placed on the host clock at the end of each pass). ``disk_read`` ("map" or "readinto") is how
    "disk" entries are read when they run on the CPU; for a GPU they are always read into a pinned buffer.
    """
    _check_disk_read(disk_read)
    model, dispatcher = plan.model, Dispatcher(plan, prefetch, timeline, disk_read)
    add = dispatcher.handles.append
    add(model.register_forward_pre_hook(dispatcher.before_model, with_kwargs=True, prepend=True))
    for entry in plan.entries:
        add(entry.module.register_forward_pre_hook(partial(dispatcher.before, entry), with_kwargs=True))
        add(entry.module.register_forward_hook(partial(dispatcher.after, entry)))
    add(model.register_forward_hook(dispatcher.after_model))
    model._helpers_dispatcher = dispatcher
    return model


# --------------------------------------------------------------------------- the hooks

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


class Dispatcher:
    """What the hooks of one dispatched model share: the plan, the prefetch thread and its loads, the timeline.

    Prefetching reads ahead in ``order``: module order until a pass has run, then the order in which the last pass
    fired the offloaded entries' pre-hooks (``seen``), which is the model's execution order.
    """

    def __init__(self, plan: Plan, prefetch: bool, timeline: Optional[list], disk_read: str = "map"):
        self.timeline, self.device, self.disk_read = timeline, plan.execution_device, disk_read
        self.offloaded = [entry for entry in plan.entries if entry.offload]
        self.order = list(self.offloaded)  # prefetch order: a guess until the first pass has run
        self.seen: dict[str, Entry] = {}  # this pass's offloaded entries, in the order their pre-hooks fired
        self.cuda = self.device.type == "cuda"
        self.gpus = {entry.runs_on for entry in plan.entries if entry.runs_on.type == "cuda"}  # where compute is timed
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if prefetch else None
        self.pending: dict[str, Future] = {}  # entry name -> its load, started ahead
        self.buffers: list[torch.Tensor] = []  # read buffers, reused (one per load in flight or attached)
        self.held: dict[str, torch.Tensor] = {}  # CPU readinto: entry name -> the buffer its attached weights view
        self.lock = threading.Lock()
        self.handles: list = []
        self.started: dict[str, tuple] = {}  # entry name -> (host start, CUDA start event or None)
        self.anchors: dict[torch.device, tuple] = {}  # GPU -> (event, host time) that place its events on the clock
        self.gpu_bars: list[tuple] = []  # (entry name, device, start event, end event), resolved after the pass
        self.input_device: Optional[torch.device] = None

    def load(self, entry: Entry) -> tuple[dict[str, torch.Tensor], Optional[torch.Tensor]]:
        """An offloaded entry's weights on the execution device (on the prefetch thread too), and the read buffer
        they view (CPU ``readinto`` only: it is reused once the weights are detached), else None."""
        start = time.perf_counter()
        host, buffer = entry.host, None
        if entry.offload == "disk" and (self.cuda or self.disk_read == "readinto"):
            with self.lock:  # one readinto into a reused buffer: fresh pages cost more than the read
                spare = self.buffers.pop(max(range(len(self.buffers)), key=lambda i: self.buffers[i].numel())
                                         ) if self.buffers else None  # the largest: it fits most entries
            host, buffer = read_safetensors(entry.file, spare, pin=self.cuda)
        if not self.cuda:  # mapped ("map": the weights are the page cache's pages until released) or read above
            weights = map_safetensors(entry.file)[0] if entry.offload == "disk" and buffer is None else host
        else:
            with torch.cuda.stream(self.copy_stream):  # pinned host memory -> GPU, on a side stream
                weights = {name: t.to(self.device, non_blocking=True) for name, t in host.items()}
            self.copy_stream.synchronize()  # waited for here (on the prefetch thread), not by the compute
            self.release(buffer)  # copied: the buffer is free for the next read
            buffer = None
        self._log(entry.name, "load", start)
        return weights, buffer

    def release(self, buffer: Optional[torch.Tensor]) -> None:
        if buffer is not None:
            with self.lock:
                self.buffers.append(buffer)

    def before(self, entry: Entry, module: nn.Module, args: tuple, kwargs: dict):
        """Forward pre-hook: attach an offloaded entry's weights, start the next load, move the inputs."""
        if entry.offload:
            self.seen.setdefault(entry.name, entry)  # the execution order, for the next pass's prefetching
            future = self.pending.pop(entry.name, None)
            weights, buffer = future.result() if future is not None else self.load(entry)
            if buffer is not None:
                self.held[entry.name] = buffer
            for tensor in entry.weights:
                value = weights[tensor.name]
                if self.cuda:  # allocated on the copy stream, used on the compute stream
                    value.record_stream(torch.cuda.current_stream(self.device))
                tensor.set(value, entry.uses(tensor))
            self.prefetch_after(entry)
        self.started[entry.name] = (time.perf_counter(), self._event(entry.runs_on))
        return _to(args, entry.runs_on), _to(kwargs, entry.runs_on)

    def after(self, entry: Entry, module: nn.Module, args: tuple, output: Any):
        """Forward hook: put an offloaded entry's weights back on meta, which releases their memory."""
        start, event = self.started.pop(entry.name)
        if event is None:
            self._log(entry.name, "compute", start)
        else:  # device time: an event after the module's kernels, read once the pass is over
            self.gpu_bars.append((entry.name, entry.runs_on, event, self._event(entry.runs_on)))
        for tensor in entry.weights:
            tensor.set(tensor.get().to("meta"), entry.uses(tensor))
        self.release(self.held.pop(entry.name, None))  # nothing views the buffer any more
        return output

    def prefetch_after(self, entry: Entry) -> None:
        """With prefetching on: start loading the offloaded entry after ``entry`` (in ``order``) in the background."""
        if self.pool is None:
            return
        i = self.order.index(entry) + 1
        if i < len(self.order) and self.order[i].name not in self.pending:
            self.pending[self.order[i].name] = self.pool.submit(self.load, self.order[i])

    def before_model(self, model: nn.Module, args: tuple, kwargs: dict):
        """The model's own pre-hook: remember where the inputs are, and start loading the first offloaded entry."""
        self.input_device = _first_device((args, kwargs))
        self.seen = {}
        if self.timeline is not None:  # each GPU's clock, tied to the host's at the start of the pass
            for device in self.gpus:
                anchor = torch.cuda.Event(enable_timing=True)
                anchor.record(torch.cuda.current_stream(device))
                anchor.synchronize()  # the host time is taken after the anchor ran: device times are never early
                self.anchors[device] = (anchor, time.perf_counter())
        if self.pool is not None and self.order and self.order[0].name not in self.pending:
            self.pending[self.order[0].name] = self.pool.submit(self.load, self.order[0])
        return args, kwargs

    def after_model(self, model: nn.Module, args: tuple, output: Any):
        """The model's own hook: learn the execution order, drop loads a wrong guess of it started, bring the
        output back to where the inputs came from, and put the pass's GPU compute bars on the timeline."""
        if self.seen:  # entries this pass did not call keep their place after the ones it did
            self.order = list(self.seen.values()) + [e for e in self.order if e.name not in self.seen]
        for future in self.pending.values():  # read ahead for an entry this pass did not call next: not needed
            self.release(future.result()[1])
        self.pending.clear()
        for name, device, start, end in self.gpu_bars:
            anchor, t0 = self.anchors[device]
            end.synchronize()
            self.timeline.append({"module": name, "kind": "compute", "start": t0 + anchor.elapsed_time(start) / 1e3,
                                  "end": t0 + anchor.elapsed_time(end) / 1e3,
                                  "thread": threading.current_thread().name, "clock": "cuda events"})
        self.gpu_bars.clear()
        return _to(output, self.input_device) if self.input_device is not None else output

    def _event(self, device: torch.device) -> Optional["torch.cuda.Event"]:
        """With a timeline, on a GPU: a timing event recorded now on ``device``'s current stream; else None."""
        if self.timeline is None or device.type != "cuda":
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(device))
        return event

    def _log(self, name: str, kind: str, start: float) -> None:
        if self.timeline is not None:
            self.timeline.append({"module": name, "kind": kind, "start": start, "end": time.perf_counter(),
                                  "thread": threading.current_thread().name, "clock": "host"})


# --------------------------------------------------------------------------- dispatch and undispatch

def dispatch(model: nn.Module, device_map: Mapping[str, Device], *, checkpoint: Optional[PathLike] = None,
             offload_folder: Optional[PathLike] = None, prefetch: bool = False,
             execution_device: Optional[Device] = None, timeline: Optional[list] = None,
             disk_read: str = "map") -> nn.Module:
    """Place ``model`` by ``device_map`` and hook it to run with "cpu" and "disk" entries. Built in chapter 05.

    Checks everything first and raises one ``ValueError`` (``check_dispatch``); then ``plan``, ``materialise``,
    ``attach``. Meta tensors are read from ``checkpoint`` (a safetensors file or folder); "disk" entries are kept in
    ``offload_folder/<key>.safetensors``; ``prefetch=True`` loads the next offloaded entry (in execution order) on
    a background thread; ``timeline``, a list, receives load and compute intervals (``attach``); ``disk_read`` is
    how CPU-run "disk" entries are read ("map" or "readinto"). Returns the model; ``undispatch`` undoes it all.
    """
    _check_disk_read(disk_read)
    if hasattr(model, "_helpers_dispatcher"):
        raise ValueError(f"this {type(model).__name__} is already dispatched; call undispatch(model) first")
    request = dict(checkpoint=checkpoint, offload_folder=offload_folder, execution_device=execution_device)
    check_dispatch(model, device_map, **request)
    return attach(materialise(plan(model, device_map, **request)), prefetch=prefetch, timeline=timeline,
                  disk_read=disk_read)


def undispatch(model: nn.Module) -> nn.Module:
    """Remove every hook ``dispatch`` added; offloaded weights come back to host RAM, ties kept. Built in chapter 05."""
    dispatcher = getattr(model, "_helpers_dispatcher", None)
    if dispatcher is None:
        raise ValueError(f"this {type(model).__name__} was not dispatched by helpers.dispatch.dispatch")
    for handle in dispatcher.handles:
        handle.remove()
    if dispatcher.pool is not None:
        dispatcher.pool.shutdown(wait=True)
    dispatcher.pending.clear()
    dispatcher.buffers.clear()
    restored: set[str] = set()
    for entry in dispatcher.offloaded:
        weights = read_safetensors(entry.file)[0] if entry.offload == "disk" else entry.host
        for tensor in entry.weights:
            if tensor.name not in restored:  # every use, inside this entry or not: one Parameter, ties restored
                tensor.set(weights[tensor.name].to("cpu"))
                restored.add(tensor.name)
    del model._helpers_dispatcher
    return model
