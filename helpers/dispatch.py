"""Dispatch: run a model whose weights live on several devices, in host RAM or on disk. Built in chapter 05.

``dispatch(model, device_map, ...)`` is shaped like accelerate's ``dispatch_model``. It checks the whole request
first (``check_dispatch``: chapter 04's ``validate_device_map``, then what only dispatching needs) and raises one
``ValueError`` before a tensor moves or a file is written. Then three steps, each a public function:

* ``plan``: one ``Entry`` per ``device_map`` key, with the tensors inside it (a ``TensorRef`` per tensor object, held by
  one ``Use`` or, tied, several), where its weights live and where it runs. It touches nothing.
* ``materialise``: fills meta tensors from ``checkpoint``, writes each "disk" entry to
  ``offload_folder/<key>.safetensors`` (or reuses the file while its cache key matches), keeps each "cpu" entry's
  weights in host RAM (pinned when the execution device is a GPU), and leaves every offloaded parameter on ``meta``.
* ``attach`` (``helpers.hooks``): two plain PyTorch hooks per entry, which bring an offloaded entry's weights to
  the execution device just before it runs and send them back to ``meta`` after, reading ahead with
  ``prefetch=True``.

"cpu" in a map means "kept in host RAM and attached only while the module runs"; "disk" means "kept in a
safetensors file, read only while the module runs", through ``helpers.reader`` like chapter 08's streamer
(``disk_read``: "direct", "buffered" or "map"; chapter 05 measures the three).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from torch import nn

from helpers.device_map import validate_device_map
from helpers.hooks import DISK_READS, Entry, Plan, TensorRef, Use, attach, check_disk_read
from helpers.layout import weight_map
from helpers.meta import is_inside
from helpers.reader import host_copy
from helpers.tensorfiles import (
    KEY_FIELD,
    cache_key,
    file_key,
    map_safetensors,
    read_safetensors,
    save_safetensors,
    why_stale,
    written_by_helpers,
)

__all__ = ["dispatch", "undispatch", "check_dispatch", "plan", "materialise", "attach",
           "Use", "TensorRef", "Entry", "Plan", "DISK_READS"]


Device = Union[int, str, torch.device]
PathLike = Union[str, Path]


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


def _tensors(model: nn.Module) -> list[TensorRef]:
    """Every tensor of ``model`` once, with all its uses: tied weights are one ``TensorRef`` with several."""
    persistent = set(model.state_dict(keep_vars=True))
    found: dict[int, TensorRef] = {}
    for is_parameter, named in ((True, model.named_parameters(remove_duplicate=False)),
                                (False, model.named_buffers(remove_duplicate=False))):
        for name, tensor in named:
            prefix, _, attr = name.rpartition(".")
            record = found.setdefault(id(tensor), TensorRef([], is_parameter, False))
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
    actually fire (``Prefetcher``). Offloaded entries run on ``execution_device``, by default the map's first GPU
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

    def data(tensor: TensorRef) -> torch.Tensor:
        value = tensor.get()
        if value.device.type != "meta":
            return value.detach()
        name = next(use.name for use in tensor.uses if use.name in index)
        if index[name] not in shards:
            shards[index[name]] = map_safetensors(root / index[name])[0]  # one sequential read per file
        return shards[index[name]][name].to(value.dtype, copy=True)

    placed: dict[tuple[str, torch.device], torch.Tensor] = {}  # a tensor tied across entries is placed once
    host: dict[str, torch.Tensor] = {}  # "cpu" entries' weights in host RAM, each tensor once
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
            for t in entry.weights:  # pinned for a GPU (helpers.reader copies it from there), once per tensor
                if t.name not in host:
                    host[t.name] = host_copy(data(t), plan.execution_device)
            entry.host = {t.name: host[t.name] for t in entry.weights}
    for entry in plan.entries:
        for tensor in entry.weights:
            tensor.set(tensor.get().to("meta"), entry.uses(tensor))
    return plan


# --------------------------------------------------------------------------- dispatch and undispatch

def dispatch(model: nn.Module, device_map: Mapping[str, Device], *, checkpoint: Optional[PathLike] = None,
             offload_folder: Optional[PathLike] = None, prefetch: bool = False,
             execution_device: Optional[Device] = None, timeline: Optional[list] = None,
             disk_read: str = "direct") -> nn.Module:
    """Place ``model`` by ``device_map`` and hook it to run with "cpu" and "disk" entries. Built in chapter 05.

    Checks everything first and raises one ``ValueError`` (``check_dispatch``); then ``plan``, ``materialise``,
    ``attach``. Meta tensors are read from ``checkpoint`` (a safetensors file or folder); "disk" entries are kept in
    ``offload_folder/<key>.safetensors``; ``prefetch=True`` loads the next offloaded entry (in execution order) on
    a background thread; ``timeline``, a list, receives load and compute intervals (``attach``); ``disk_read`` is
    how "disk" entries are read (``helpers.reader.READS``). Returns the model; ``undispatch`` undoes it all.
    """
    check_disk_read(disk_read)
    if hasattr(model, "_helpers_dispatcher"):
        raise ValueError(f"this {type(model).__name__} is already dispatched; call undispatch(model) first")
    request = dict(checkpoint=checkpoint, offload_folder=offload_folder, execution_device=execution_device)
    check_dispatch(model, device_map, **request)
    return attach(materialise(plan(model, device_map, **request)), prefetch=prefetch, timeline=timeline,
                  disk_read=disk_read)


def undispatch(model: nn.Module) -> nn.Module:
    """Remove every hook ``dispatch`` added; offloaded weights come back to host RAM, ties kept. Built in chapter 05."""
    hooks = getattr(model, "_helpers_dispatcher", None)
    if hooks is None:
        raise ValueError(f"this {type(model).__name__} was not dispatched by helpers.dispatch.dispatch")
    for handle in hooks.handles:
        handle.remove()
    hooks.prefetcher.close()
    restored: set[str] = set()
    for entry in hooks.offloaded:
        weights = read_safetensors(entry.file)[0] if entry.offload == "disk" else entry.host
        for tensor in entry.weights:
            if tensor.name not in restored:  # every use, inside this entry or not: one Parameter, ties restored
                tensor.set(weights[tensor.name].to("cpu"))
                restored.add(tensor.name)
    del model._helpers_dispatcher
    return model
