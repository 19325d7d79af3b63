"""Sharded checkpoints: read safetensors by hand, inspect, validate, and split by layer.

Built in chapter 03. A safetensors file is an 8-byte little-endian header length, a JSON
header (``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``)
and then the raw bytes, offsets counted from the end of the header. A sharded checkpoint
adds ``model.safetensors.index.json`` whose ``weight_map`` says which shard holds each name.
Everything here reads headers only, except ``read_tensor`` and ``split_by_layer``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .memory import format_size

__all__ = ["CheckpointError", "TensorInfo", "CheckpointInfo", "read_safetensors_header", "read_tensor",
           "inspect_checkpoint", "validate_checkpoint", "split_by_layer", "DTYPES", "LAYERS_INDEX"]

INDEX, SINGLE, LAYERS_INDEX, LAYERS_FORMAT = (
    "model.safetensors.index.json", "model.safetensors", "layers.index.json", "helpers-layers/1")
MAX_HEADER = 100_000_000  # the same limit safetensors itself enforces
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
AUX_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "chat_template.jinja")
PathLike = Union[str, Path]


class CheckpointError(ValueError):
    """Everything wrong with a checkpoint, one problem per line (``.problems``). Built in chapter 03."""

    def __init__(self, where: PathLike, problems: list[str]):
        self.path, self.problems = Path(where), list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in checkpoint {where}:\n{lines}")


# --------------------------------------------------------------------------- the format by hand

def read_safetensors_header(file: PathLike) -> dict:
    """Parse a safetensors header by hand: 8-byte little-endian length, then that much JSON. Built in chapter 03."""
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(file, [f"{file.name}: only {size} bytes, too short for the 8-byte header length"])
        n = int.from_bytes(prefix, "little")
        if n > min(size - 8, MAX_HEADER):
            raise CheckpointError(file, [f"{file.name}: bad length prefix: header of {n:,} bytes announced, but the "
                                         f"file has {size - 8:,} bytes after the prefix (and the limit is {MAX_HEADER:,})"])
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(file, [f"{file.name}: header is not valid JSON ({e})"]) from None
    if not isinstance(header, dict):
        raise CheckpointError(file, [f"{file.name}: header is a JSON {type(header).__name__}, expected an object"])
    return header


def _entry_problems(file: Path, header: dict) -> tuple[list[str], set[str]]:
    """Header entries that are malformed, disagree with their dtype and shape, or point past the end of the file."""
    data_bytes = file.stat().st_size - _data_start(file)
    problems, bad, beyond = [], set(), {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in e["data_offsets"])
            need = int(np.prod(e["shape"], dtype=np.int64)) * DTYPES[e["dtype"]].itemsize
        except (KeyError, TypeError, ValueError):
            problems.append(f"{file.name}: key {name!r}: malformed header entry {e!r}")
            bad.add(name)
            continue
        if end > data_bytes:
            beyond[name] = end
        elif not 0 <= begin <= end or end - begin != need:
            problems.append(f"{file.name}: key {name!r}: data_offsets [{begin}, {end}] span {end - begin:,} "
                            f"bytes, but dtype {e['dtype']} and shape {e['shape']} need {need:,}")
            bad.add(name)
    if beyond:  # one problem per file: a truncated file cuts off every tensor after the cut
        problems.append(f"{file.name}: the header puts data up to byte {max(beyond.values()):,}, but the file holds "
                        f"only {data_bytes:,} data bytes (truncated, or corrupt data_offsets); "
                        f"key(s) out of range: {_few(sorted(beyond, key=beyond.get))}")
    return problems, bad | set(beyond)


def _data_start(file: Path) -> int:
    """Byte position where the tensor data begins: after the 8-byte prefix and the header."""
    with open(file, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def read_tensor(file: PathLike, name: str, header: Optional[dict] = None) -> torch.Tensor:
    """Read one tensor by hand: a copy-on-write ``np.memmap`` at its offsets, viewed as torch (zero-copy). Built in chapter 03."""
    file = Path(file)
    header = read_safetensors_header(file) if header is None else header
    if name not in header or name == "__metadata__":
        raise KeyError(f"{name!r} is not a tensor in {file}")
    entry = header[name]
    dtype, shape = DTYPES[entry["dtype"]], entry["shape"]
    begin, end = entry["data_offsets"]
    if end == begin:
        return torch.empty(shape, dtype=dtype)
    raw = np.memmap(file, dtype=np.uint8, mode="c", offset=_data_start(file) + begin, shape=(end - begin,))
    return torch.from_numpy(raw).view(dtype).reshape(shape)


# --------------------------------------------------------------------------- inspect

@dataclass
class TensorInfo:
    """One tensor of a checkpoint, as its header describes it. Built in chapter 03."""

    name: str
    shape: tuple
    dtype: str
    shard: str
    nbytes: int


@dataclass
class CheckpointInfo:
    """What ``inspect_checkpoint`` found: tensors, shard file sizes, totals. Built in chapter 03."""

    path: Path
    tensors: list[TensorInfo] = field(default_factory=list)
    shard_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def total_params(self) -> int:
        return sum(int(np.prod(t.shape, dtype=np.int64)) for t in self.tensors)

    def tensor_table(self, limit: Optional[int] = None) -> str:
        rows = [f"{'name':<48} {'shape':<14} {'dtype':<6} {'size':>10}  shard"]
        for t in self.tensors[:limit]:
            rows.append(f"{t.name:<48} {'x'.join(map(str, t.shape)) or '()':<14} {t.dtype:<6} "
                        f"{format_size(t.nbytes):>10}  {t.shard}")
        if limit is not None and len(self.tensors) > limit:
            rows.append(f"... and {len(self.tensors) - limit} more tensors")
        return "\n".join(rows)

    def __str__(self) -> str:
        rows = [f"{self.path.name}: {len(self.tensors)} tensors, {self.total_params:,} parameters, "
                f"{format_size(self.total_bytes)} of tensor data in {len(self.shard_bytes)} file(s)",
                f"  {'file':<40} {'tensors':>8} {'file size':>12}"]
        for shard, size in self.shard_bytes.items():
            n = sum(t.shard == shard for t in self.tensors)
            rows.append(f"  {shard:<40} {n:>8} {format_size(size):>12}")
        return "\n".join(rows)


def _weight_map(path: Path) -> tuple[Path, dict[str, str]]:
    """``(directory, {tensor name: file name})`` for a checkpoint dir, index file or single file."""
    if path.is_file() and path.suffix == ".safetensors":
        return path.parent, {k: path.name for k in read_safetensors_header(path) if k != "__metadata__"}
    if path.is_file() and path.name == LAYERS_INDEX:
        return _weight_map(path.parent)
    root = path.parent if path.is_file() else path
    index = path if path.is_file() else root / INDEX
    if path.is_dir() and not index.is_file() and (root / LAYERS_INDEX).is_file():
        files = json.loads((root / LAYERS_INDEX).read_text())["files"].values()
        return root, {k: f for f in files for k in read_safetensors_header(root / f) if k != "__metadata__"}
    if index.is_file():
        try:
            return root, dict(json.loads(index.read_text())["weight_map"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(index, [f"{index.name}: not a valid index with a weight_map ({e!r})"]) from None
    if (root / SINGLE).is_file():
        return _weight_map(root / SINGLE)
    raise FileNotFoundError(f"{path} is not a safetensors checkpoint: expected a .safetensors file or a "
                            f"directory with {INDEX}, {SINGLE} or {LAYERS_INDEX}")


def inspect_checkpoint(path: PathLike) -> CheckpointInfo:
    """Per-tensor name/shape/dtype/shard and per-file sizes of a checkpoint, from headers only. Built in chapter 03."""
    root, weight_map = _weight_map(Path(path))
    info = CheckpointInfo(Path(path))
    for shard in dict.fromkeys(weight_map.values()):
        header = read_safetensors_header(root / shard)
        info.shard_bytes[shard] = (root / shard).stat().st_size
        for name, e in header.items():
            if name != "__metadata__" and weight_map.get(name) == shard:
                begin, end = e["data_offsets"]
                info.tensors.append(TensorInfo(name, tuple(e["shape"]), e["dtype"], shard, end - begin))
    return info


# --------------------------------------------------------------------------- validate

def _tied_groups(model: torch.nn.Module) -> list[list[str]]:
    """State-dict names grouped by the tensor they share (``lm_head.weight`` with the embeddings)."""
    groups: dict[int, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        groups.setdefault(id(t), []).append(name)
    keys = model.state_dict().keys()
    return [[n for n in g if n in keys] for g in groups.values() if any(n in keys for n in g)]


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(map(repr, names[:n])) + (f" and {len(names) - n} more" if len(names) > n else "")


def _listing_name(path: Path) -> str:
    if path.is_file():
        return path.name
    return next((n for n in (INDEX, LAYERS_INDEX, SINGLE) if (path / n).is_file()), path.name)


def validate_checkpoint(path: PathLike, model: torch.nn.Module, *, check_dtype: bool = True) -> CheckpointInfo:
    """Check a checkpoint against ``model`` (meta is fine) and raise one ``CheckpointError`` listing every problem. Built in chapter 03."""
    path = Path(path)
    root, weight_map = _weight_map(path)  # an unreadable index is a problem we cannot see past
    problems, found = [], {}
    info = CheckpointInfo(path)
    for shard in dict.fromkeys(weight_map.values()):
        file, keys = root / shard, [k for k, v in weight_map.items() if v == shard]
        if not file.is_file():
            problems.append(f"{shard}: shard file is missing; the index maps {len(keys)} key(s) to it: {_few(keys)}")
            continue
        try:
            header = read_safetensors_header(file)
        except CheckpointError as e:
            problems += [f"{p}; its key(s) cannot be read: {_few(keys)}" for p in e.problems]
            continue
        entry_problems, bad = _entry_problems(file, header)
        problems += entry_problems
        info.shard_bytes[shard] = file.stat().st_size
        for k in keys:
            if k not in header:
                problems.append(f"{shard}: key {k!r} is in the index but not in the file")
        for k, e in header.items():
            if k == "__metadata__" or k in bad:
                continue
            if weight_map.get(k) != shard:
                problems.append(f"{shard}: key {k!r} is in the file but the index does not list it here")
                if k in weight_map:
                    continue
            found[k] = (shard, e)
            begin, end = e["data_offsets"]
            info.tensors.append(TensorInfo(k, tuple(e["shape"]), e["dtype"], shard, end - begin))
    expected = model.state_dict()
    listing = _listing_name(path)  # the file that should have named a missing key
    for group in _tied_groups(model):
        if not any(k in found or k in weight_map for k in group):
            problems.append(f"{listing}: missing key {group[0]!r}" + (f" (tied with {_few(group[1:])})"
                                                                         if len(group) > 1 else ""))
    for k, (shard, e) in found.items():
        if k not in expected:
            problems.append(f"{shard}: unexpected key {k!r} (the model has no such parameter or buffer)")
            continue
        want = expected[k]
        if list(e["shape"]) != list(want.shape):
            problems.append(f"{shard}: key {k!r} has shape {list(e['shape'])}, the model expects {list(want.shape)}")
        got = DTYPES.get(e["dtype"])
        if check_dtype and got != want.dtype:
            problems.append(f"{shard}: key {k!r} has dtype {e['dtype']} ({got}), the model expects {want.dtype}")
    if problems:
        raise CheckpointError(path, problems)
    return info


# --------------------------------------------------------------------------- split by layer

def _block_of(name: str) -> str:
    """The top-level block a tensor belongs to: ``model.layers.3`` for layer 3, else its parent module."""
    match = re.match(r"^(.*\.layers\.\d+)\.", name)
    return match.group(1) if match else name.rsplit(".", 1)[0]


def _block_order(block: str) -> tuple:
    match = re.match(r"^.*\.layers\.(\d+)$", block)
    if block.endswith("embed_tokens"):
        return (0, 0)
    if match:
        return (2, int(match.group(1)))
    return (4, 0) if block == "lm_head" else (3, 0) if block.endswith(".norm") else (1, 0)


def _source_stamp(root: Path, weight_map: dict[str, str]) -> dict:
    files = sorted(set(weight_map.values()))
    return {"path": str(root.resolve()), "files": {f: (root / f).stat().st_size for f in files}}


def split_by_layer(path: PathLike, out_dir: PathLike, *, progress: bool = True) -> Path:
    """Rewrite a safetensors checkpoint as one file per top-level block plus ``layers.index.json``. Built in chapter 03."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    path, out_dir = Path(path), Path(out_dir)
    root, weight_map = _weight_map(path)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{root} has no config.json; split_by_layer needs a model directory")
    missing = sorted(set(weight_map.values()) - {p.name for p in root.iterdir()})
    if missing:
        raise CheckpointError(root, [f"{m}: shard file is missing" for m in missing])
    stamp = _source_stamp(root, weight_map)
    if out_dir.exists() and any(out_dir.iterdir()):
        try:
            if json.loads((out_dir / LAYERS_INDEX).read_text()).get("source") == stamp:
                return out_dir
        except (OSError, ValueError):
            pass
        raise FileExistsError(f"{out_dir} exists and is not a complete split of {root}; remove it or choose another out_dir")

    config = json.loads((root / "config.json").read_text())
    tied = "lm_head.weight" not in weight_map or bool(config.get("tie_word_embeddings", False))
    headers = {s: read_safetensors_header(root / s) for s in dict.fromkeys(weight_map.values())}
    blocks: dict[str, list[str]] = {}
    for name in weight_map:
        if not (tied and name == "lm_head.weight"):
            blocks.setdefault(_block_of(name), []).append(name)
    order = sorted(blocks, key=_block_order)
    nbytes = {b: sum(int(np.diff(headers[weight_map[k]][k]["data_offsets"])[0]) for k in blocks[b]) for b in order}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-split-", dir=out_dir.parent))
    try:
        bar = tqdm(total=sum(nbytes.values()), unit="B", unit_scale=True, desc="splitting by layer",
                   disable=not progress)
        for block in order:
            tensors = {}
            for shard in dict.fromkeys(weight_map[k] for k in blocks[block]):
                with safe_open(root / shard, framework="pt") as f:  # mmap: pages are read as they are copied
                    tensors.update({k: f.get_tensor(k) for k in blocks[block] if weight_map[k] == shard})
            save_file(tensors, tmp / f"{block}.safetensors", metadata={"format": "pt"})
            del tensors
            bar.update(nbytes[block])
        bar.close()
        for name in AUX_FILES:
            if (root / name).is_file():
                shutil.copyfile(root / name, tmp / name)
        index = {"format": LAYERS_FORMAT, "blocks": order + (["lm_head"] if tied else []),
                 "files": {b: f"{b}.safetensors" for b in order},
                 "tied": {"lm_head.weight": "model.embed_tokens.weight"} if tied else {},
                 "bytes": nbytes, "total_size": sum(nbytes.values()), "source": stamp}
        (tmp / LAYERS_INDEX).write_text(json.dumps(index, indent=1))  # last: its presence means complete
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.rename(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
