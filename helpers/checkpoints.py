"""Sharded checkpoints: read a tensor by hand, inspect, validate, and split by layer.

Built in chapter 03. A safetensors file is an 8-byte little-endian header length, a JSON header
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``) and then the raw
bytes, offsets counted from the end of the header; ``helpers.tensorfiles.read_header`` parses it. A sharded
checkpoint adds ``model.safetensors.index.json`` whose ``weight_map`` says which shard holds each name.
Everything here reads headers only, except ``read_tensor`` and ``split_by_layer``. Chapter 08 adds
``split_by_layer(..., compression="int8" | "nf4")``: a split whose linear weights are stored in 8 or 4 bits
(``helpers.quant.compress_state``), fewer bytes for a layer streamer to read on every pass.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .memory import format_size
from .quant import COMPRESSIONS, compress_state, compressed_specs
from .tensorfiles import (INDEX, LAYERS_FORMAT, LAYERS_INDEX, SINGLE, ST_DTYPES, CheckpointError, Header, LayerIndex,
                          block_of, block_order, cache_key, file_key, manifest_info, read_header, save_safetensors,
                          staging_dir, weight_map, why_stale, write_manifest, written_by_helpers)

__all__ = ["CheckpointError", "TensorInfo", "CheckpointInfo", "read_tensor", "inspect_checkpoint",
           "validate_checkpoint", "split_by_layer"]

AUX_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "chat_template.jinja")
PathLike = Union[str, Path]


# --------------------------------------------------------------------------- the format by hand

def _entry_problems(header: Header) -> tuple[list[str], set[str]]:
    """Header entries that are malformed, disagree with their dtype and shape, or point past the end of the file."""
    name_of_file = header.path.name
    problems, bad, beyond = [], set(), {}
    for name, e in header.tensors.items():
        try:
            begin, end = (int(x) for x in e["data_offsets"])
            need = int(np.prod(e["shape"], dtype=np.int64)) * ST_DTYPES[e["dtype"]].itemsize
        except (KeyError, TypeError, ValueError):
            problems.append(f"{name_of_file}: key {name!r}: malformed header entry {e!r}")
            bad.add(name)
            continue
        if end > header.data_bytes:
            beyond[name] = end
        elif not 0 <= begin <= end or end - begin != need:
            problems.append(f"{name_of_file}: key {name!r}: data_offsets [{begin}, {end}] span {end - begin:,} "
                            f"bytes, but dtype {e['dtype']} and shape {e['shape']} need {need:,}")
            bad.add(name)
    if beyond:  # one problem per file: a truncated file cuts off every tensor after the cut
        problems.append(f"{name_of_file}: the header puts data up to byte {max(beyond.values()):,}, but the file holds "
                        f"only {header.data_bytes:,} data bytes (truncated, or corrupt data_offsets); "
                        f"key(s) out of range: {_few(sorted(beyond, key=beyond.get))}")
    return problems, bad | set(beyond)


def read_tensor(file: PathLike, name: str, header: Optional[Header] = None) -> torch.Tensor:
    """Read one tensor by hand: a copy-on-write ``np.memmap`` at its offsets, viewed as torch (zero-copy). Built in chapter 03."""
    header = read_header(file) if header is None else header
    if name not in header.tensors:
        raise KeyError(f"{name!r} is not a tensor in {header.path}")
    entry = header.tensors[name]
    dtype, shape = ST_DTYPES[entry["dtype"]], entry["shape"]
    begin, end = entry["data_offsets"]
    if end == begin:
        return torch.empty(shape, dtype=dtype)
    raw = np.memmap(header.path, dtype=np.uint8, mode="c", offset=header.data_start + begin, shape=(end - begin,))
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


def inspect_checkpoint(path: PathLike) -> CheckpointInfo:
    """Per-tensor name/shape/dtype/shard and per-file sizes of a checkpoint, from headers only. Built in chapter 03."""
    root, names = weight_map(path)
    info = CheckpointInfo(Path(path))
    for shard in dict.fromkeys(names.values()):
        header = read_header(root / shard)
        info.shard_bytes[shard] = (root / shard).stat().st_size
        for name, e in header.tensors.items():
            if names.get(name) == shard:
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
    root, names = weight_map(path)  # an unreadable index is a problem we cannot see past
    problems, found = [], {}
    info = CheckpointInfo(path)
    for shard in dict.fromkeys(names.values()):
        file, keys = root / shard, [k for k, v in names.items() if v == shard]
        if not file.is_file():
            problems.append(f"{shard}: shard file is missing; the index maps {len(keys)} key(s) to it: {_few(keys)}")
            continue
        try:
            header = read_header(file)
        except CheckpointError as e:
            problems += [f"{p}; its key(s) cannot be read: {_few(keys)}" for p in e.problems]
            continue
        entry_problems, bad = _entry_problems(header)
        problems += entry_problems
        info.shard_bytes[shard] = file.stat().st_size
        for k in keys:
            if k not in header.tensors:
                problems.append(f"{shard}: key {k!r} is in the index but not in the file")
        for k, e in header.tensors.items():
            if k in bad:
                continue
            if names.get(k) != shard:
                problems.append(f"{shard}: key {k!r} is in the file but the index does not list it here")
                if k in names:
                    continue
            found[k] = (shard, e)
            begin, end = e["data_offsets"]
            info.tensors.append(TensorInfo(k, tuple(e["shape"]), e["dtype"], shard, end - begin))
    expected = model.state_dict()
    listing = _listing_name(path)  # the file that should have named a missing key
    for group in _tied_groups(model):
        if not any(k in found or k in names for k in group):
            problems.append(f"{listing}: missing key {group[0]!r}" + (f" (tied with {_few(group[1:])})"
                                                                         if len(group) > 1 else ""))
    for k, (shard, e) in found.items():
        if k not in expected:
            problems.append(f"{shard}: unexpected key {k!r} (the model has no such parameter or buffer)")
            continue
        want = expected[k]
        if list(e["shape"]) != list(want.shape):
            problems.append(f"{shard}: key {k!r} has shape {list(e['shape'])}, the model expects {list(want.shape)}")
        got = ST_DTYPES.get(e["dtype"])
        if check_dtype and got != want.dtype:
            problems.append(f"{shard}: key {k!r} has dtype {e['dtype']} ({got}), the model expects {want.dtype}")
    if problems:
        raise CheckpointError(path, problems)
    return info


# --------------------------------------------------------------------------- split by layer

def split_by_layer(path: PathLike, out_dir: PathLike, *, compression: Optional[str] = None,
                   progress: bool = True) -> Path:
    """Rewrite a safetensors checkpoint as one file per top-level block plus ``layers.index.json``. Built in chapter 03.

    The split is built in a temporary folder and appears as ``out_dir`` only once complete. Called again
    with the same source and compression, it returns the existing split without reading anything; a split
    of another source or another compression is refused, never overwritten.

    ``compression`` (chapter 08): None keeps every tensor as the checkpoint stores it; ``"int8"`` or ``"nf4"``
    stores each linear weight (q/k/v/o, gate/up/down projections, an untied ``lm_head``) in 8 or 4 bits through
    ``helpers.quant.compress_state``, and the streamer rebuilds it with ``decompress_state``. The embeddings and
    norms stay as they are, and so does a tied ``lm_head`` (SmolLM2's): it is the embedding table, stored once.
    The index records the compression, and its ``bytes`` are the bytes really stored. A compressed split is
    not a checkpoint ``from_pretrained`` or ``validate_checkpoint`` can read.
    """
    from safetensors import safe_open
    from tqdm.auto import tqdm

    if compression not in COMPRESSIONS:
        raise ValueError(f"compression {compression!r} must be one of {', '.join(map(repr, COMPRESSIONS))}")
    path, out_dir = Path(path), Path(out_dir)
    root, names = weight_map(path)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{root} has no config.json; split_by_layer needs a model directory")
    missing = sorted(set(names.values()) - {p.name for p in root.iterdir()})
    if missing:
        raise CheckpointError(root, [f"{m}: shard file is missing" for m in missing])
    key = cache_key(split_of=file_key(*(root / f for f in sorted(set(names.values())))), format=LAYERS_FORMAT,
                    **({"compression": compression} if compression else {}))  # plain splits keep their old key
    if out_dir.exists() and any(out_dir.iterdir()):
        problems = why_stale(out_dir, key)
        if not problems:
            return out_dir
        stored = manifest_info(out_dir).get("compression")
        if written_by_helpers(out_dir) and stored != compression:
            problems.insert(0, f"it was split with compression={stored!r}, not compression={compression!r}")
        raise FileExistsError(f"{out_dir} exists and is not a complete split of {root} ({'; '.join(problems)}); "
                              "remove it or choose another out_dir")

    config = json.loads((root / "config.json").read_text())
    tied = "lm_head.weight" not in names or bool(config.get("tie_word_embeddings", False))
    headers = {s: read_header(root / s) for s in dict.fromkeys(names.values())}
    blocks: dict[str, list[str]] = {}
    for name in names:
        if not (tied and name == "lm_head.weight"):
            blocks.setdefault(block_of(name), []).append(name)
    order = sorted(blocks, key=block_order)
    source_bytes = {b: sum(int(np.diff(headers[names[k]].tensors[k]["data_offsets"])[0]) for k in blocks[b])
                    for b in order}
    specs = [(k, headers[names[k]].tensors[k]["shape"], ST_DTYPES[headers[names[k]].tensors[k]["dtype"]])
             for b in order for k in blocks[b]]
    compressed_specs(specs, compression)  # a shape nf4 cannot store is refused before anything is written

    nbytes = {}
    with staging_dir(out_dir) as tmp:
        bar = tqdm(total=sum(source_bytes.values()), unit="B", unit_scale=True, desc="splitting by layer",
                   disable=not progress)
        for block in order:
            tensors = {}
            for shard in dict.fromkeys(names[k] for k in blocks[block]):
                with safe_open(root / shard, framework="pt") as f:  # mmap: pages are read as they are copied
                    tensors.update({k: f.get_tensor(k) for k in blocks[block] if names[k] == shard})
            nbytes[block] = save_safetensors(tmp / f"{block}.safetensors", compress_state(tensors, compression),
                                             metadata={"format": "pt"})
            del tensors
            bar.update(source_bytes[block])
        bar.close()
        for name in AUX_FILES:
            if (root / name).is_file():
                shutil.copyfile(root / name, tmp / name)
        LayerIndex(blocks=order + (["lm_head"] if tied else []), files={b: f"{b}.safetensors" for b in order},
                   tied={"lm_head.weight": "model.embed_tokens.weight"} if tied else {}, bytes=nbytes,
                   compression=compression).write(tmp)
        write_manifest(tmp, key, source=str(root), compression=compression)
    return out_dir
