"""Sharded checkpoints: read a tensor by hand, inspect, validate, and split by layer.

Built in chapter 03. A safetensors file is an 8-byte little-endian header length, a JSON header
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``) and then the raw
bytes, offsets counted from the end of the header; ``helpers.tensorfiles.read_header`` parses it. A sharded
checkpoint adds ``model.safetensors.index.json`` whose ``weight_map`` says which shard holds each name.
Everything here reads headers only, except ``read_tensor`` and ``split_by_layer``. Which tensors make up each
block, and the split's index, are ``helpers.layout``'s (the same rule chapter 08's streamer reads checkpoints
in place by). Chapter 08 adds ``split_by_layer(..., codec=...)``: a split whose linear weights are stored in 8
or 4 bits by a codec it is handed (``helpers.quant.codec("int8")``), fewer bytes for a streamer to read.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .layout import INDEX, LAYERS_FORMAT, LAYERS_INDEX, SINGLE, Codec, LayerIndex, group_blocks, is_tied, weight_map
from .memory import format_size
from .tensorfiles import (
    ST_DTYPES,
    CheckpointError,
    Header,
    cache_key,
    file_key,
    manifest_info,
    read_header,
    save_safetensors,
    staging_dir,
    why_stale,
    write_manifest,
    written_by_helpers,
)

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
    """Read one tensor by hand: a copy-on-write ``np.memmap`` at its offsets, viewed as torch (zero-copy).
    Built in chapter 03."""
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
    """Check a checkpoint against ``model`` (meta is fine) and raise one ``CheckpointError`` listing every problem.
    Built in chapter 03."""
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

def split_by_layer(path: PathLike, out_dir: PathLike, *, codec: Optional[Codec] = None,
                   progress: bool = True) -> Path:
    """Rewrite a safetensors checkpoint as one file per block plus ``layers.index.json``. Built in chapter 03.

    The blocks are ``helpers.layout.group_blocks``': each decoder layer, the modules around them, and a tied
    ``lm_head`` as a block without a file (it reads the embedding's table). The split is built in a temporary
    folder and appears as ``out_dir`` only once complete. Called again with the same source and codec, it
    returns the existing split without reading anything; a split of another source or codec is refused, never
    overwritten.

    ``codec`` (chapter 08): None keeps every tensor as the checkpoint stores it; a ``helpers.quant`` codec
    (``codec("int8")``, ``codec("nf4")``) stores each linear weight (q/k/v/o, gate/up/down projections, an untied
    ``lm_head``) in 8 or 4 bits, and the streamer rebuilds it. The embeddings and norms stay as they are, and so
    does a tied ``lm_head``. The index records the codec's name, and its ``bytes`` are the bytes really stored.
    A compressed split is not a checkpoint ``from_pretrained`` or ``validate_checkpoint`` can read.
    """
    from safetensors import safe_open
    from tqdm.auto import tqdm

    if codec is not None and not all(callable(getattr(codec, m, None)) for m in ("specs", "compress", "decompress")):
        raise ValueError(f"codec {codec!r} must be None or a codec such as helpers.quant.codec('int8'), "
                         "with specs, compress and decompress")
    name = None if codec is None else codec.name
    path, out_dir = Path(path), Path(out_dir)
    root, names = weight_map(path)
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{root} has no config.json; split_by_layer needs a model directory")
    missing = sorted(set(names.values()) - {p.name for p in root.iterdir()})
    if missing:
        raise CheckpointError(root, [f"{m}: shard file is missing" for m in missing])
    key = cache_key(split_of=file_key(*(root / f for f in sorted(set(names.values())))), format=LAYERS_FORMAT,
                    compression=name)
    if out_dir.exists() and any(out_dir.iterdir()):
        problems = why_stale(out_dir, key)
        if not problems:
            return out_dir
        stored = manifest_info(out_dir).get("compression")
        if written_by_helpers(out_dir) and stored != name:
            problems.insert(0, f"it was split with compression={stored!r}, not compression={name!r}")
        raise FileExistsError(f"{out_dir} exists and is not a complete split of {root} ({'; '.join(problems)}); "
                              "remove it or choose another out_dir")

    tied = is_tied(list(names), json.loads((root / "config.json").read_text()))
    groups = group_blocks(names, tied)  # {block: {shard: {name in the shard: name in the block}}}
    files = {b: g for b, g in groups.items() if not (tied and b == "lm_head")}  # a tied head has no file
    headers = {s: read_header(root / s) for s in dict.fromkeys(names.values())}
    source_bytes = {b: sum(int(np.diff(headers[f].tensors[k]["data_offsets"])[0]) for f, ks in g.items() for k in ks)
                    for b, g in files.items()}
    if codec is not None:  # a shape the codec cannot store is refused before anything is written
        codec.specs([(k, headers[f].tensors[k]["shape"], ST_DTYPES[headers[f].tensors[k]["dtype"]])
                     for g in files.values() for f, ks in g.items() for k in ks])

    nbytes = {}
    with staging_dir(out_dir) as tmp:
        bar = tqdm(total=sum(source_bytes.values()), unit="B", unit_scale=True, desc="splitting by layer",
                   disable=not progress)
        for block, shards in files.items():
            tensors = {}
            for shard, keys in shards.items():
                with safe_open(root / shard, framework="pt") as f:  # mmap: pages are read as they are copied
                    tensors.update({k: f.get_tensor(k) for k in keys})
            stored = tensors if codec is None else codec.compress(tensors)
            nbytes[block] = save_safetensors(tmp / f"{block}.safetensors", stored, metadata={"format": "pt"})
            del tensors, stored
            bar.update(source_bytes[block])
        bar.close()
        for aux in AUX_FILES:
            if (root / aux).is_file():
                shutil.copyfile(root / aux, tmp / aux)
        table = [k for names_in_file in groups["lm_head"].values() for k in names_in_file][0] if tied else None
        LayerIndex(blocks=list(groups), files={b: f"{b}.safetensors" for b in files},
                   tied={"lm_head.weight": table} if tied else {}, bytes=nbytes, compression=name).write(tmp)
        write_manifest(tmp, key, source=str(root), compression=name)
    return out_dir
