"""Empty models: count what a model would cost without allocating it, and watch where tensors are born.

Built in chapter 01 (the meta device and empty models).

Everything here works on models whose tensors live on the ``meta`` device (shapes and
dtypes, no data), so it can describe a 100-billion-parameter model in a few MiB of RAM.
"""

from __future__ import annotations

import cProfile
import pstats
import types
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn.modules.module import register_module_parameter_registration_hook

__all__ = ["count_parameters", "parameter_bytes", "tied_parameters", "tensor_devices", "is_inside", "parse_dtype",
           "Registration", "record_parameter_registrations", "functions_called"]

_SHORT_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _check_module(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model {model!r} must be a torch.nn.Module, not {type(model).__name__}")
    return model


def count_parameters(model: nn.Module, *, unique: bool = True) -> int:
    """Number of parameter elements; ``unique=False`` counts a tied tensor once per name. Built in chapter 01."""
    params = _check_module(model).named_parameters(remove_duplicate=unique)
    return sum(p.numel() for _, p in params)


def parameter_bytes(model: nn.Module, *, unique: bool = True) -> int:
    """Bytes the parameters take (or would take, on meta): elements x element size. Built in chapter 01."""
    params = _check_module(model).named_parameters(remove_duplicate=unique)
    return sum(p.numel() * p.element_size() for _, p in params)


def tied_parameters(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names that are one and the same tensor object, sorted. Built in chapter 01."""
    groups: dict[int, list[str]] = {}
    for name, param in _check_module(model).named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return sorted(sorted(names) for names in groups.values() if len(names) > 1)


def tensor_devices(model: nn.Module, *, buffers: bool = True) -> dict[str, int]:
    """How many parameters (and buffers) sit on each device type, e.g. ``{"meta": 272, "cpu": 1}``.
    Built in chapter 01."""
    model = _check_module(model)
    tensors = [p for _, p in model.named_parameters()]
    if buffers:
        tensors += [b for _, b in model.named_buffers()]
    return dict(sorted(Counter(t.device.type for t in tensors).items()))


def is_inside(name: str, module: str) -> bool:
    """Whether ``name`` (a parameter, buffer or module) is ``module`` or lies inside it; ``""`` is the whole model.

    A prefix test on whole names: "layers.1.mlp" is inside "layers.1", "layers.10" is not. Built in chapter 01.
    """
    return module == "" or name == module or name.startswith(module + ".")


def parse_dtype(value) -> torch.dtype:
    """A torch dtype from itself, its name ("float16", "torch.float16") or a short name ("fp32", "bf16", "fp16").

    Built in chapter 01; every helper that takes a ``dtype`` reads it with this.
    """
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        name = value.lower().removeprefix("torch.")
        dtype = _SHORT_NAMES.get(name, getattr(torch, name, None))
        if isinstance(dtype, torch.dtype):
            return dtype
    raise ValueError(f"dtype {value!r} is not a torch dtype; expected a torch.dtype, a name such as 'float16' or "
                     f"'torch.bfloat16', or one of {', '.join(map(repr, _SHORT_NAMES))}")


@dataclass(frozen=True)
class Registration:
    """One parameter being attached to a module: which module class, which name, on which device.
    Built in chapter 01."""

    module: str
    name: str
    device: str


@contextmanager
def record_parameter_registrations() -> Iterator[list[Registration]]:
    """Record every ``nn.Parameter`` attached to any module inside the block, in order. Built in chapter 01.

    Uses torch's global parameter-registration hook, so it sees parameters created by
    constructors and by loaders that swap tensors in (``setattr(module, name, param)``).
    """
    seen: list[Registration] = []

    def hook(module: nn.Module, name: str, param: torch.Tensor | None) -> None:
        if param is not None:
            seen.append(Registration(type(module).__name__, name, param.device.type))

    handle = register_module_parameter_registration_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def functions_called(package: types.ModuleType, fn: Callable, /, *args, **kwargs) -> tuple[Any, list[str]]:
    """Run ``fn(*args, **kwargs)``; return its result and the functions of ``package`` that ran, sorted.

    Each name is ``module.function`` relative to the package (e.g. ``"big_modeling.dispatch_model"``); private
    (``_name``) functions and comprehensions are left out. Uses ``cProfile``, so it sees calls made by any code,
    however the package was imported. Built in chapter 01, to show what transformers uses from accelerate.
    """
    if not isinstance(package, types.ModuleType) or not hasattr(package, "__path__"):
        raise TypeError(f"package {package!r} must be an imported package (a module with __path__), "
                        f"not {type(package).__name__}")
    if not callable(fn):
        raise TypeError(f"fn {fn!r} must be callable, not {type(fn).__name__}")
    roots = [Path(p).resolve() for p in package.__path__]
    profile = cProfile.Profile()
    profile.enable()
    try:
        result = fn(*args, **kwargs)
    finally:
        profile.disable()
    names = set()
    for filename, _, function in pstats.Stats(profile).stats:  # keys are (file, line, function name)
        if function.startswith(("_", "<")) or filename.startswith("<"):
            continue
        file = Path(filename).resolve()
        for root in roots:
            if file.is_relative_to(root):
                module = ".".join(file.relative_to(root).with_suffix("").parts)
                names.add(f"{module.removesuffix('.__init__').removesuffix('__init__')}.{function}".lstrip("."))
    return result, sorted(names)
