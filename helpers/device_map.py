"""Device maps: which device holds each module of a model. Built in chapter 04.

* ``plan_device_map(model, max_memory)`` re-implements accelerate's planner
  (``get_balanced_memory`` + ``infer_auto_device_map`` + ``clean_device_map``) in one readable
  pass; ``tests/test_device_map.py`` proves on random models that both give the same map.
* ``validate_device_map(model, device_map)`` lists every problem of a hand-written map at once.

Everything here reads only shapes and dtypes, so it works on a model built on the meta device.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Optional, Union

import torch
from torch import nn

from .memory import parse_size
from .meta import is_inside, parse_dtype, tied_parameters

__all__ = ["STRATEGIES", "plan_device_map", "validate_device_map", "module_sizes", "balanced_memory",
           "fill_devices", "clean_device_map", "device_bytes"]

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
Device = Union[int, str]


# ----------------------------------------------------------------------------- checking input

def _check_max_memory(max_memory: Mapping) -> dict[Device, int]:
    """Budgets in bytes, GPUs first (sorted), then "cpu", then "disk" -- accelerate's order."""
    if not isinstance(max_memory, Mapping) or not max_memory:
        raise ValueError(f"max_memory {max_memory!r} must be a non-empty dict like {{0: '10GiB', 'cpu': '30GiB'}}")
    for key in max_memory:
        is_gpu = isinstance(key, int) and not isinstance(key, bool) and key >= 0
        if not is_gpu and key not in ("cpu", "disk"):
            raise ValueError(f"max_memory key {key!r} is not a device; "
                             "expected a GPU index (0, 1, ...), 'cpu' or 'disk'")
    budgets = {key: parse_size(value) for key, value in max_memory.items()}  # ValueError names a bad size
    gpus = sorted(key for key in budgets if isinstance(key, int))
    return {key: budgets[key] for key in gpus + [k for k in ("cpu", "disk") if k in budgets]}


def _check_classes(no_split_module_classes) -> list[str]:
    if no_split_module_classes is None:
        return []
    if isinstance(no_split_module_classes, str):
        return [no_split_module_classes]
    classes = list(no_split_module_classes)
    if not all(isinstance(c, str) for c in classes):
        raise ValueError(f"no_split_module_classes {no_split_module_classes!r} must be class names (strings)")
    return classes


# ----------------------------------------------------------------------------- sizes and ties

def _bytes_per_element(dtype: torch.dtype) -> float:
    return 1 / 8 if dtype == torch.bool else dtype.itemsize


def module_sizes(model: nn.Module, dtype=None) -> dict[str, int]:
    """Bytes of every tensor and module ("" is the whole model), a shared tensor once. Built in chapter 04."""
    dtype = None if dtype is None else parse_dtype(dtype)
    sizes: dict[str, int] = {"": 0}
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, tensor in tensors:
        size = tensor.numel() * _bytes_per_element(tensor.dtype)
        if dtype is not None and (tensor.dtype.is_floating_point or tensor.dtype.is_complex):  # ints, bools keep theirs
            size = tensor.numel() * min(_bytes_per_element(dtype), _bytes_per_element(tensor.dtype))
        parts = name.split(".")
        for depth in range(len(parts) + 1):  # the tensor itself and every module above it
            key = ".".join(parts[:depth])
            sizes[key] = sizes.get(key, 0) + size
    return sizes


def _accelerate_inside(param: str, module: str) -> bool:
    # accelerate tests "is a tied param inside this module" with a substring, not a prefix (meta.is_inside):
    # "1." is found in "0.1.weight." too. We copy the test so both planners agree (chapter 04 says so).
    return f"{module}." in f"{param}."


def _splittable(entry: object, no_split: list[str]) -> bool:
    return isinstance(entry, nn.Module) and len(list(entry.children())) > 0 and type(entry).__name__ not in no_split


def _split(name: str, module: nn.Module) -> list[tuple[str, object]]:
    """A module's own parameters, then its children (its own buffers are dropped, as accelerate does)."""
    parts = list(module.named_parameters(recurse=False)) + list(module.named_children())
    return [(f"{name}.{n}", m) for n, m in parts]


def _largest_layer(entries: list[tuple[str, object]], sizes: dict[str, int], no_split: list[str]):
    """(bytes, names) of the biggest unsplittable piece: a module without children, or a no-split module."""
    largest, names, todo = 0, [], list(entries)
    while todo:
        name, entry = todo.pop(0)
        if _splittable(entry, no_split):
            todo = [(f"{name}.{n}", m) for n, m in entry.named_children()] + todo
        elif sizes.get(name, 0) > largest:
            largest, names = sizes.get(name, 0), [name]
        elif sizes.get(name, 0) == largest:
            names.append(name)
    return largest, names


# ----------------------------------------------------------------------------- the balanced budget

def _check_low_zero(budgets: dict[Device, int]) -> None:
    gpus = [d for d in budgets if isinstance(d, int)]
    if len(gpus) > 1 and gpus != list(range(len(gpus))):  # accelerate raises KeyError here
        raise ValueError(f"balanced_low_0 needs GPU indices 0, 1, ..., n-1 in max_memory, got {gpus}")


def _parents(names: Iterable[str]) -> set[str]:
    return {n.rsplit(".", 1)[0] for n in names if "." in n}


def balanced_memory(model: nn.Module, max_memory: Mapping, no_split_module_classes=None, dtype=None,
                    low_zero: bool = False) -> dict[Device, int]:
    """Cap each GPU but the last at an equal share plus a margin (get_balanced_memory). Built in chapter 04."""
    budgets = _check_max_memory(max_memory)
    no_split = _check_classes(no_split_module_classes)
    n_gpus = len([d for d in budgets if isinstance(d, int) and budgets[d] > 0])
    if n_gpus == 0:
        return budgets
    low_zero = low_zero and n_gpus > 1
    if low_zero:
        _check_low_zero(budgets)
    sizes = module_sizes(model, dtype)
    share = sizes[""] // (n_gpus - 1 if low_zero else n_gpus)
    # Margin: 1.25 x max(first module of each no-split class, mean size of the lowest modules).
    first_of_class: dict[str, int] = {}
    modules = dict(model.named_modules())
    for name, size in sizes.items():
        cls = type(modules.get(name)).__name__ if name in modules else None
        if name and cls in no_split and cls not in first_of_class:
            first_of_class[cls] = size
    tensor_names = {n for n in sizes if n and n not in _parents(sizes)}
    owners = {n: s for n, s in sizes.items() if n not in tensor_names}  # modules that hold tensors
    lowest = [n for n in owners if n and n not in _parents(owners)]
    mean_lowest = int(sum(owners[n] for n in lowest) / max(len(lowest), 1))
    share += int(1.25 * max(max(first_of_class.values(), default=0), mean_lowest))
    gpus = sorted(d for d in budgets if isinstance(d, int) and budgets[d] > 0)
    for gpu in gpus[:-1]:  # the last GPU keeps its whole budget, in case the margin was too small
        budgets[gpu] = min(budgets[0] if low_zero and gpu == 0 else share, budgets[gpu])
    if low_zero:  # GPU 0 gets only what the other GPUs cannot hold
        budgets[0] = min(max(0, sizes[""] - sum(budgets[i] for i in range(1, n_gpus))), budgets[0])
    return budgets


# ----------------------------------------------------------------------------- the planner

def plan_device_map(model: nn.Module, max_memory: Mapping, *, no_split_module_classes: Optional[Iterable[str]] = None,
                    strategy: str = "auto", dtype=None) -> dict[str, Device]:
    """A device_map for ``model`` within ``max_memory``, equal to accelerate's. Built in chapter 04.

    ``strategy``: "sequential" fills GPU 0, then GPU 1, ..., then "cpu", then "disk"; "balanced"
    (and "auto", as in ``from_pretrained``) first caps each GPU at an equal share; "balanced_low_0"
    keeps GPU 0 as empty as possible for generation buffers.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {type(model).__name__} is not a torch.nn.Module")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r} is not one of {STRATEGIES}")
    budgets, no_split = _check_max_memory(max_memory), _check_classes(no_split_module_classes)
    dtype = None if dtype is None else parse_dtype(dtype)
    if strategy == "balanced_low_0":
        _check_low_zero(budgets)
    if strategy != "sequential":
        budgets = balanced_memory(model, budgets, no_split, dtype, low_zero=strategy == "balanced_low_0")
    return fill_devices(model, budgets, no_split, dtype)


def fill_devices(model: nn.Module, max_memory: Mapping, no_split_module_classes=None, dtype=None) -> dict[str, Device]:
    """The sequential fill (accelerate's ``infer_auto_device_map``): walk the modules in order and put each on
    the current device if it fits, else split it or move on to the next device. Built in chapter 04."""
    budgets, no_split = _check_max_memory(max_memory), _check_classes(no_split_module_classes)
    sizes, ties = module_sizes(model, dtype), tied_parameters(model)
    devices = list(budgets) + ([] if "disk" in budgets else ["disk"])
    gpus = [d for d in devices if isinstance(d, int)]
    # The execution device (GPU 0, or the CPU without GPUs) and the CPU keep room for the biggest
    # layer that is offloaded further down, to hold it while it computes.
    main_devices = [gpus[0], "cpu"] if gpus else ["cpu"]
    todo = [*model.named_parameters(recurse=False), *model.named_children(), *model.named_buffers(recurse=False)]
    used, placed, current = dict.fromkeys(devices, 0), {}, 0
    largest, largest_names = _largest_layer(todo, sizes, no_split)

    def modules_left():
        return [(n, m) for n, m in todo if isinstance(m, nn.Module)]

    while todo:
        name, module = todo.pop(0)
        largest_names = [n for n in largest_names if not is_inside(n, name)]
        if not largest_names:
            largest, largest_names = _largest_layer(modules_left(), sizes, no_split)
        size = sizes.get(name, 0)
        # Parameters tied to one inside this module but living outside it must come along. "Inside" is
        # accelerate's substring test here, not is_inside's prefix test: the maps must agree.
        groups = [g for g in ties
                  if any(_accelerate_inside(p, name) for p in g) and not all(_accelerate_inside(p, name) for p in g)]
        outside = [p for g in groups for p in g if not _accelerate_inside(p, name)]
        # Deliberate difference: accelerate raises IndexError when a tied parameter's module was
        # already placed (two tie groups into one container); we skip it, it already has a device.
        found = [(p, next((e for e in todo if p.startswith(e[0] + ".")), None)) for p in outside]
        outside, tied = [p for p, e in found if e], [e for _, e in found if e]
        size_with_ties = size + sum(sizes.get(n, 0) - sizes.get(p, 0) for p, (n, _) in zip(outside, tied))

        device = devices[current]
        reserved = largest if device in main_devices else 0
        room = None if device == "disk" else budgets[device] - reserved
        if room is None or used[device] + size_with_ties <= room:
            used[device] += size_with_ties
            placed[name] = device
            for tied_name, _ in tied:
                todo = [entry for entry in todo if entry[0] != tied_name]
                placed[tied_name] = device
            continue
        if outside and used[device] + size <= room:  # the module fits alone: split a tied module instead?
            splittable = [(n, m) for n, m in tied if _splittable(m, no_split)]
            if splittable:
                tied_name, tied_module = splittable[0]
                i = next(i for i, (n, _) in enumerate(todo) if n == tied_name)
                todo = [(name, module)] + todo[:i] + _split(tied_name, tied_module) + todo[i + 1:]
                largest, largest_names = _largest_layer(modules_left(), sizes, no_split)
                continue
        if used[device] + size >= room and _splittable(module, no_split):
            todo = _split(name, module) + todo
            largest, largest_names = _largest_layer(modules_left(), sizes, no_split)
            continue
        used[device] += reserved  # nothing more goes here: next device
        current += 1
        todo.insert(0, (name, module))
    return clean_device_map(placed)


def clean_device_map(device_map: Mapping[str, Device]) -> dict[str, Device]:
    """Merge the keys of a module whose pieces all share one device into the module's own key. Built in chapter 04."""
    merged = dict(device_map)

    def merge(module_name: str) -> None:
        prefix = f"{module_name}." if module_name else ""
        keys = [k for k in merged if k.startswith(prefix)]
        if len(keys) > 1 and len({merged[k] for k in keys}) == 1:
            device = merged[keys[0]]
            for k in keys:
                del merged[k]
            merged[module_name] = device
        depth = module_name.count(".") + 2 if module_name else 1
        below = [k for k in merged if k.startswith(prefix) and len(k) > len(module_name)]
        children = {".".join(k.split(".")[:depth]) for k in below}
        for child in children:
            merge(child)

    merge("")
    # Keep the model's order: a merged key sits where its first piece was.
    order = list(device_map)
    first = {k: min(i for i, o in enumerate(order) if is_inside(o, k)) for k in merged}
    return {k: merged[k] for k in sorted(merged, key=first.__getitem__)}


# ----------------------------------------------------------------------------- checking a map

_DEVICE_RE = re.compile(r"^(cpu|disk|meta|mps|(cuda|xpu|npu|mlu|musa|hpu)(:\d+)?)$")


def _known_device(device: object) -> bool:
    if isinstance(device, torch.device):
        return True
    if isinstance(device, int) and not isinstance(device, bool):
        return device >= 0
    return isinstance(device, str) and bool(_DEVICE_RE.match(device))


def validate_device_map(model: nn.Module, device_map: Mapping[str, Device], *,
                        no_split_module_classes: Optional[Iterable[str]] = None) -> None:
    """Raise one ValueError listing every problem of ``device_map`` for ``model``. Built in chapter 04.

    ``no_split_module_classes`` defaults to the model's own ``_no_split_modules`` (transformers models).
    """
    if not isinstance(device_map, Mapping):
        raise ValueError(f"device_map {device_map!r} must be a dict of module name -> device")
    if no_split_module_classes is None:
        no_split_module_classes = getattr(model, "_no_split_modules", None) or []
    no_split = _check_classes(no_split_module_classes)
    modules = dict(model.named_modules())
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)} | {n for n, _ in model.named_buffers()}
    tensors = list(model.state_dict(keep_vars=True))  # what a checkpoint holds: every name of every tensor
    problems = []
    for key, device in device_map.items():
        if not isinstance(key, str) or (key not in modules and key not in names):
            problems.append(f"key {key!r} names no module or tensor of the model")
        if not _known_device(device):
            problems.append(f"key {key!r} has unknown device {device!r} "
                            "(expected a GPU index, 'cpu', 'disk' or e.g. 'cuda:0')")
    keys = [k for k in device_map if isinstance(k, str)]
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            if is_inside(b, a) or is_inside(a, b):
                problems.append(f"keys {a!r} and {b!r} overlap (one contains the other)")

    def device_of(name: str):
        owners = [k for k in keys if is_inside(name, k)]
        return device_map[max(owners, key=len)] if owners else None

    missing = [n for n in tensors if device_of(n) is None]
    if missing:
        more = " ..." if len(missing) > 8 else ""
        problems.append(f"{len(missing)} tensor(s) have no device: {', '.join(missing[:8])}{more}")
    for name, module in modules.items():
        if name and type(module).__name__ in no_split:
            inside = {str(device_of(f"{name}.{t}")) for t, _ in module.named_parameters()} - {"None"}
            if len(inside) > 1:
                problems.append(f"no-split module {name!r} ({type(module).__name__}) "
                                f"is split across devices {sorted(inside)}")
    for group in tied_parameters(model):
        devices = {str(device_of(p)) for p in group} - {"None"}
        if len(devices) > 1:
            problems.append(f"tied parameters {group} are on different devices {sorted(devices)}")
    if problems:
        raise ValueError(f"device_map has {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))


def device_bytes(model: nn.Module, device_map: Mapping[str, Device], dtype=None) -> dict[Device, int]:
    """Bytes of weights each device of ``device_map`` holds (a shared tensor counts once). Built in chapter 04."""
    sizes, totals = module_sizes(model, dtype), {}
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    for name in names:
        owners = [k for k in device_map if is_inside(name, k)]
        device = device_map[max(owners, key=len)] if owners else None
        totals[device] = totals.get(device, 0) + sizes[name]
    return totals
