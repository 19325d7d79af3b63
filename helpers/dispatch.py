"""Dispatch: run a model whose weights live on several devices, in host RAM or on disk.

Built in chapter 05 (hooks and offload); ``plan_device_map`` and ``validate_device_map``
come from chapter 04 (``helpers.device_map``) and are re-exported here.

``dispatch(model, device_map)`` puts two plain PyTorch hooks on every module the map names:
a forward *pre*-hook that moves the inputs to the module's device and, for an offloaded
module, brings its weights to the execution device; and a forward hook that puts the
weights back to ``meta`` (so they stop costing memory) once the module has run.
"cpu" in a map means "kept in host RAM and attached only while the module runs";
"disk" means "kept in a safetensors file in ``offload_dir``, read only while it runs".
With ``prefetch=True`` a background thread reads the *next* offloaded module while the
current one computes.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from helpers.tensorfiles import (KEY_FIELD, cache_key, drop_page_cache, file_key, why_stale, read_safetensors,
                                 save_safetensors, weight_map, written_by_helpers)

__all__ = ["dispatch", "undispatch", "drop_page_cache", "plan_device_map", "validate_device_map"]


def __getattr__(name: str):  # chapter 04's planner, imported only when asked for
    if name in ("plan_device_map", "validate_device_map"):
        from . import device_map
        return getattr(device_map, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- moving things

def _to(obj: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """``obj`` with every tensor inside (tuples, lists, dicts, model outputs) on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_to(x, device, non_blocking) for x in obj)
    if isinstance(obj, dict):
        moved = {k: _to(v, device, non_blocking) for k, v in obj.items()}
        return type(obj)(**moved) if type(obj) is not dict and hasattr(obj, "to_tuple") else moved
    return obj


def _first_device(obj: Any) -> Optional[torch.device]:
    if isinstance(obj, torch.Tensor):
        return obj.device
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    for x in items:
        if (device := _first_device(x)) is not None:
            return device
    return None


def _device(value: object) -> Union[torch.device, str]:
    """A map value as a device: 0 -> cuda:0, "cpu" -> cpu, "disk" stays "disk"."""
    if value == "disk":
        return "disk"
    if isinstance(value, bool) or not isinstance(value, (int, str, torch.device)):
        raise ValueError(f"{value!r} is not a device")
    device = torch.device("cuda", value) if isinstance(value, int) else torch.device(value)
    if device.type == "meta":
        raise ValueError("'meta' holds no data")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{value!r} names a GPU this machine does not have "
                         f"({torch.cuda.device_count()} visible)")
    return device


# --------------------------------------------------------------------------- checkpoints

def _load_from_checkpoint(root: Path, names: dict[str, str], key: str, dtype: torch.dtype) -> torch.Tensor:
    from safetensors import safe_open
    with safe_open(root / names[key], framework="pt") as f:
        return f.get_tensor(key).to(dtype)


# --------------------------------------------------------------------------- the dispatcher

@dataclass(eq=False)
class _Entry:
    """One device_map entry: a module, where its weights live, and who uses each weight."""
    name: str
    module: nn.Module
    where: Union[torch.device, str]  # a device (resident), "cpu" (host-offloaded) or "disk"
    run_on: torch.device
    params: dict[str, list[tuple[nn.Module, str]]] = field(default_factory=dict)  # canonical -> users
    store: dict[str, torch.Tensor] = field(default_factory=dict)  # host copies, for "cpu"
    file: Optional[Path] = None  # for "disk"
    compute_start: float = 0.0


class _Dispatcher:
    def __init__(self, model: nn.Module, entries: list[_Entry], execution_device: torch.device,
                 prefetch: bool, timeline: Optional[list]):
        self.model, self.entries, self.execution_device = model, entries, execution_device
        self.order = [e for e in entries if e.where in ("cpu", "disk")]  # registration order
        self.cuda = execution_device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(execution_device) if self.cuda else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if prefetch else None
        self.pending: dict[str, Future] = {}
        self.timeline = timeline
        self.handles: list = []
        self.input_device: Optional[torch.device] = None
        # Read buffers are reused: touching fresh memory page by page costs more than the read itself.
        # At most one per load in flight (two with prefetch), each as big as the biggest offloaded entry.
        self.free_buffers: list[torch.Tensor] = []
        self.busy_buffers: dict[str, torch.Tensor] = {}
        self.lock = threading.Lock()

    def _buffer(self) -> Optional[torch.Tensor]:
        with self.lock:
            return self.free_buffers.pop() if self.free_buffers else None

    def _give_back(self, buffer: Optional[torch.Tensor]) -> None:
        if buffer is not None:
            with self.lock:
                self.free_buffers.append(buffer)

    def _log(self, name: str, kind: str, start: float) -> None:
        if self.timeline is not None:
            self.timeline.append({"module": name, "kind": kind, "start": start, "end": time.perf_counter(),
                                  "thread": threading.current_thread().name})

    def load(self, entry: _Entry) -> dict[str, torch.Tensor]:
        """An offloaded entry's weights on the execution device (runs on the prefetch thread too)."""
        start = time.perf_counter()
        host, buffer = read_safetensors(entry.file, self._buffer(), pin=self.cuda) if entry.where == "disk" else (entry.store, None)
        if self.cuda:  # pinned host memory -> GPU on a side stream, waited for here, not by compute
            with torch.cuda.stream(self.copy_stream):
                out = {k: v.to(self.execution_device, non_blocking=True) for k, v in host.items()}
            self.copy_stream.synchronize()
            self._give_back(buffer)  # copied: the host buffer is free again
        else:  # on the CPU the weights *are* views of the buffer: it is given back in post_hook
            out = {k: v.to(self.execution_device) for k, v in host.items()}
            if buffer is not None:
                with self.lock:
                    self.busy_buffers[entry.name] = buffer
        self._log(entry.name, "load", start)
        return out

    def pre_hook(self, entry: _Entry, module: nn.Module, args: tuple, kwargs: dict):
        if entry.where in ("cpu", "disk"):
            future = self.pending.pop(entry.name, None)
            weights = future.result() if future is not None else self.load(entry)
            for canonical, users in entry.params.items():
                tensor = weights[canonical]
                if self.cuda:
                    tensor.record_stream(torch.cuda.current_stream(self.execution_device))
                param = nn.Parameter(tensor, requires_grad=False)
                for owner, attr in users:
                    owner._parameters[attr] = param
            if self.pool is not None:
                self._prefetch_after(entry)
        entry.compute_start = time.perf_counter()
        return _to(args, entry.run_on, self.cuda), _to(kwargs, entry.run_on, self.cuda)

    def post_hook(self, entry: _Entry, module: nn.Module, args: tuple, output: Any):
        self._log(entry.name, "compute", entry.compute_start)
        if entry.where in ("cpu", "disk"):
            for users in entry.params.values():
                for owner, attr in users:  # back to an empty meta tensor: the memory is released
                    old = owner._parameters[attr]
                    owner._parameters[attr] = nn.Parameter(old.to("meta"), requires_grad=False)
            with self.lock:
                buffer = self.busy_buffers.pop(entry.name, None)
            self._give_back(buffer)
        return output

    def _prefetch_after(self, entry: _Entry) -> None:
        i = self.order.index(entry) + 1
        if i < len(self.order) and self.order[i].name not in self.pending:
            self.pending[self.order[i].name] = self.pool.submit(self.load, self.order[i])

    def root_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        self.input_device = _first_device((args, kwargs))
        if self.pool is not None and self.order and self.order[0].name not in self.pending:
            self.pending[self.order[0].name] = self.pool.submit(self.load, self.order[0])
        return args, kwargs

    def root_post_hook(self, module: nn.Module, args: tuple, output: Any):
        if self.input_device is not None and self.input_device.type != "meta":
            output = _to(output, self.input_device)
        return output


def _tensor_groups(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str, bool]]]:
    """id(tensor) -> every (full name, owner module, attribute, is_parameter) that holds it: tied weights share one id."""
    groups: dict[int, list] = {}
    for prefix, owner in model.named_modules(remove_duplicate=False):
        for table, is_param in ((owner._parameters, True), (owner._buffers, False)):
            for attr, tensor in table.items():
                if tensor is not None:
                    full = f"{prefix}.{attr}" if prefix else attr
                    groups.setdefault(id(tensor), []).append((full, owner, attr, is_param))
    return groups


def _tensor_of(users) -> torch.Tensor:
    _, owner, attr, is_param = users[0]
    return owner._parameters[attr] if is_param else owner._buffers[attr]


def _inside(name: str, key: str) -> bool:
    return key == "" or name == key or name.startswith(key + ".")


def _problems(model, device_map, groups, index, offload_dir, execution_device) -> list[str]:
    """Everything wrong with a dispatch request, found before any tensor moves or file is written."""
    problems: list[str] = []
    if not isinstance(device_map, Mapping) or not device_map:
        return [f"device_map {device_map!r} must be a non-empty dict like {{'model.layers.0': 'disk', ...}}"]
    modules = dict(model.named_modules())
    for key, value in device_map.items():
        if key not in modules:
            problems.append(f"key {key!r} names no module of {type(model).__name__}")
        try:
            _device(value)
        except (ValueError, RuntimeError) as err:
            problems.append(f"{key!r}: {value!r} is not a device ({err}); expected a GPU index, "
                            "'cuda:N', 'cpu' or 'disk'")
    keys = sorted(device_map)
    for a in keys:
        for b in keys:
            if a != b and _inside(b, a):
                problems.append(f"keys {a!r} and {b!r} overlap: {b!r} is inside {a!r}")
    for users in groups.values():
        for full, owner, attr, is_param in users:
            if not any(_inside(full, key) for key in device_map):
                problems.append(f"{full} is not covered by any device_map key")
            if _tensor_of([(full, owner, attr, is_param)]).device.type == "meta":
                persistent = is_param or attr not in owner._non_persistent_buffers_set
                if not persistent:
                    problems.append(f"buffer {full} is on meta and no checkpoint stores it; build the model "
                                    "with accelerate.init_empty_weights(), which keeps buffers real")
                elif index is None:
                    problems.append(f"{full} is on meta (no data); pass checkpoint= a safetensors folder")
                elif not any(name in index for name, *_ in users):
                    problems.append(f"{full} is on meta and checkpoint has no tensor named {full} "
                                    "(a tied weight? call model.tie_weights() first)")
    if "disk" in device_map.values() and offload_dir is None:
        problems.append("device_map puts modules on 'disk' but offload_dir is None; pass a folder")
    if execution_device is not None:
        try:
            if _device(execution_device) == "disk":
                raise ValueError("disk cannot compute")
        except (ValueError, RuntimeError) as err:
            problems.append(f"execution_device {execution_device!r} is not a device ({err})")
    return sorted(set(problems), key=problems.index)


def dispatch(model: nn.Module, device_map: Mapping[str, Union[int, str, torch.device]], *,
             checkpoint: Union[str, Path, None] = None, offload_dir: Union[str, Path, None] = None,
             prefetch: bool = False, execution_device: Union[int, str, torch.device, None] = None,
             timeline: Optional[list] = None) -> nn.Module:
    """Place ``model`` by ``device_map`` and hook it so it runs with CPU- and disk-offloaded modules. Built in chapter 05.

    Meta tensors are filled from ``checkpoint`` (a safetensors folder); "disk" modules are kept in
    ``offload_dir/<module>.safetensors`` (reused when still valid); ``prefetch=True`` reads the next
    offloaded module on a background thread; ``timeline``, a list, receives load/compute intervals.
    """
    if hasattr(model, "_helpers_dispatcher"):
        raise ValueError("model is already dispatched; call undispatch(model) first")
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    root, index = weight_map(checkpoint) if checkpoint is not None else (None, None)
    offload_dir = Path(offload_dir) if offload_dir is not None else None
    groups = _tensor_groups(model)
    problems = _problems(model, device_map, groups, index, offload_dir, execution_device)
    devices = {key: _device(value) for key, value in device_map.items()} if not problems else {}
    accelerators = [d for d in devices.values() if d not in ("cpu", "disk") and d.type != "cpu"]
    run_device = (_device(execution_device) if execution_device is not None
                  else accelerators[0] if accelerators else torch.device("cpu")) if not problems else None
    targets = {key: offload_dir / f"{key or 'model'}.safetensors" for key, d in devices.items() if d == "disk"}
    for key, path in targets.items():
        if path.exists() and not written_by_helpers(path):
            problems.append(f"{path} exists and was not written by helpers; it will not be overwritten. "
                            "Choose another offload_dir or move the file away")
    if problems:
        raise ValueError("cannot dispatch:\n  - " + "\n  - ".join(problems))

    entries = []
    for name, module in model.named_modules():  # registration order = the order of prefetching
        if name not in devices:
            continue
        where = devices[name]
        where = "cpu" if where != "disk" and where.type == "cpu" else where
        if where in ("cpu", "disk") and next(module.parameters(), None) is None:
            where = run_device  # nothing to offload (e.g. only buffers): keep it where it runs
        entries.append(_Entry(name, module, where, run_device if where in ("cpu", "disk") else where))
    if offload_dir is not None and targets:
        offload_dir.mkdir(parents=True, exist_ok=True)

    def source(users) -> torch.Tensor:
        tensor = _tensor_of(users)
        if tensor.device.type != "meta":
            return tensor.detach()
        key = next(n for n, *_ in users if n in index)
        return _load_from_checkpoint(root, index, key, tensor.dtype)

    for entry in entries:
        mine = {id_: [u for u in users if _inside(u[0], entry.name)] for id_, users in groups.items()}
        mine = {id_: users for id_, users in mine.items() if users}
        host: dict[str, torch.Tensor] = {}
        for id_, users in mine.items():
            canonical, is_param = users[0][0], users[0][3]
            if entry.where in ("cpu", "disk") and is_param:
                entry.params[canonical] = [(owner, attr) for _, owner, attr, _ in users]
                continue
            tensor = source(groups[id_]).to(entry.run_on)  # resident: weights and all buffers
            value = nn.Parameter(tensor, requires_grad=False) if is_param else tensor
            for _, owner, attr, _ in users:
                (owner._parameters if is_param else owner._buffers)[attr] = value
        if entry.where == "disk":
            entry.file = targets[entry.name]
            from_memory = any(_tensor_of(groups[i]).device.type != "meta" for i in mine if mine[i][0][3])
            spec = [[users[0][0], list(_tensor_of(users).shape), str(_tensor_of(users).dtype)]
                    for users in mine.values() if users[0][3]]
            sources = os.urandom(8).hex() if from_memory else file_key(*sorted({root / f for f in index.values()}))
            key = cache_key(tensors=spec, sources=sources)
            if why_stale(entry.file, key):
                host = {users[0][0]: source(groups[i]) for i, users in mine.items() if users[0][3]}
                save_safetensors(entry.file, host, metadata={KEY_FIELD: key})
        elif entry.where == "cpu":
            for i, users in mine.items():
                if users[0][3]:
                    tensor = source(groups[i])
                    entry.store[users[0][0]] = tensor.pin_memory() if run_device.type == "cuda" else tensor
    for entry in entries:  # offloaded weights become empty meta tensors between calls
        for users in entry.params.values():
            for owner, attr in users:
                owner._parameters[attr] = nn.Parameter(owner._parameters[attr].to("meta"), requires_grad=False)

    dispatcher = _Dispatcher(model, entries, run_device, prefetch, timeline)
    dispatcher.ties = [[(owner, attr) for _, owner, attr, _ in users]
                       for users in groups.values() if len(users) > 1 and users[0][3]]
    add = dispatcher.handles.append
    add(model.register_forward_pre_hook(dispatcher.root_pre_hook, with_kwargs=True, prepend=True))
    for entry in entries:
        add(entry.module.register_forward_pre_hook(
            lambda m, a, k, e=entry: dispatcher.pre_hook(e, m, a, k), with_kwargs=True))
        add(entry.module.register_forward_hook(lambda m, a, o, e=entry: dispatcher.post_hook(e, m, a, o)))
    add(model.register_forward_hook(dispatcher.root_post_hook))
    model._helpers_dispatcher = dispatcher
    if isinstance(getattr(type(model), "device", None), property):
        # transformers' model.device is "the first parameter's device": meta if that one is
        # offloaded. Tell it the execution device instead (undone by undispatch).
        dispatcher.original_class = type(model)
        model.__class__ = type(type(model).__name__, (type(model),), {"device": property(lambda self: run_device)})
    return model


def undispatch(model: nn.Module) -> nn.Module:
    """Remove every hook ``dispatch`` added and put offloaded weights back in host RAM (ties kept). Built in chapter 05."""
    dispatcher = getattr(model, "_helpers_dispatcher", None)
    if dispatcher is None:
        raise ValueError("model was not dispatched by helpers.dispatch.dispatch")
    for handle in dispatcher.handles:
        handle.remove()
    if dispatcher.pool is not None:
        dispatcher.pool.shutdown(wait=True)
    dispatcher.pending.clear()
    dispatcher.free_buffers.clear()
    restored: dict[str, nn.Parameter] = {}
    for entry in dispatcher.order:
        host = read_safetensors(entry.file)[0] if entry.where == "disk" else entry.store
        for canonical, users in entry.params.items():
            if canonical not in restored:
                restored[canonical] = nn.Parameter(host[canonical].to("cpu"), requires_grad=False)
            for owner, attr in users:
                owner._parameters[attr] = restored[canonical]
    for users in dispatcher.ties:  # tied weights: every user shares one tensor again
        value = next((o._parameters[a] for o, a in users if o._parameters[a].device.type != "meta"), None)
        for owner, attr in users:
            owner._parameters[attr] = value
    if getattr(dispatcher, "original_class", None) is not None:
        model.__class__ = dispatcher.original_class
    del model._helpers_dispatcher
    return model
