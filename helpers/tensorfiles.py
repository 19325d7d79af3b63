"""Tensor files: the one place ``helpers`` reads and writes safetensors files, publishes finished work, and
decides whether something it wrote earlier can be trusted again.

The ground floor under every chapter. Chapter 03 takes the format apart by hand; chapters 05 and 08 read it
three ways (one ``readinto`` into a reusable buffer, a memory map, a map that touches only some rows).

The format: an 8-byte little-endian length, that many bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``), then the raw bytes,
offsets counted from the end of the JSON. A sharded checkpoint adds ``model.safetensors.index.json``, whose
``weight_map`` says which file holds each name; a per-layer split (chapter 03) adds ``layers.index.json``.

One durability policy for everything written here: write under a temporary name in the destination's
folder, ``fsync`` it, rename it into place, ``fsync`` the folder. A reader therefore sees a finished file or
none. One validity policy for everything reused: a *key* (a hash of what the output was made from, the
source files' names, sizes and modification times included) is recorded in what was written, and the output
is reused only when its key matches and its files are complete.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import mmap
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import torch

__all__ = [
    "ST_DTYPES", "CheckpointError", "Header", "read_header", "tensor_views", "read_safetensors", "map_safetensors",
    "touch_rows", "drop_page_cache", "atomic_file", "write_json", "write_safetensors", "save_safetensors",
    "staging_dir", "MANIFEST", "KEY_FIELD", "file_key", "cache_key", "write_manifest", "why_stale", "written_by_helpers",
    "INDEX", "SINGLE", "weight_map", "pack_shards", "shard_name", "save_sharded",
    "LAYERS_INDEX", "LAYERS_FORMAT", "LayerIndex", "read_layer_index",
]

PathLike = Union[str, Path]
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
             "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_ST_NAMES = {dtype: name for name, dtype in ST_DTYPES.items()}
MAX_HEADER = 100_000_000  # the same limit safetensors itself enforces
INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"
LAYERS_INDEX, LAYERS_FORMAT = "layers.index.json", "helpers-layers/1"
MANIFEST = "helpers-manifest.json"  # in a folder helpers wrote: its key and every file's size, written last
KEY_FIELD = "helpers_key"  # in a safetensors file helpers wrote: its key, in the header's __metadata__


class CheckpointError(ValueError):
    """Everything wrong with a checkpoint or tensor file, one problem per line (``.problems``)."""

    def __init__(self, where: PathLike, problems: Sequence[str]):
        self.path, self.problems = Path(where), list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in checkpoint {where}:\n{lines}")


# --------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class Header:
    """A safetensors file's header: where its data starts, each tensor's entry, and its metadata."""

    path: Path
    data_start: int  # 8 + the JSON's length
    data_bytes: int  # the file's size minus data_start
    tensors: dict = field(repr=False)  # name -> {"dtype", "shape", "data_offsets"}
    metadata: dict = field(repr=False)


def read_header(path: PathLike) -> Header:
    """Parse a safetensors header: the 8-byte length prefix, checked against the file, then that much JSON."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(path, [f"{path.name}: only {size} bytes, too short for the 8-byte header length"])
        n = int.from_bytes(prefix, "little")
        if n > min(size - 8, MAX_HEADER):
            raise CheckpointError(path, [f"{path.name}: bad length prefix: header of {n:,} bytes announced, but the "
                                         f"file has {size - 8:,} bytes after the prefix (and the limit is {MAX_HEADER:,})"])
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(path, [f"{path.name}: header is not valid JSON ({e})"]) from None
    if not isinstance(header, dict):
        raise CheckpointError(path, [f"{path.name}: header is a JSON {type(header).__name__}, expected an object"])
    metadata = header.pop("__metadata__", None) or {}
    return Header(path, 8 + n, size - 8 - n, header, metadata)


def tensor_views(header: Header, data: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors ``header`` describes, as views of ``data`` (the file's data bytes, uint8): nothing is copied."""
    tensors = {}
    for name, info in header.tensors.items():
        start, end = info["data_offsets"]
        if not 0 <= start <= end <= data.numel():
            raise CheckpointError(header.path, [
                f"{header.path.name}: tensor {name!r} has data_offsets [{start}, {end}], outside the file's "
                f"{data.numel():,} data bytes (truncated or corrupt)"])
        raw, dtype = data[start:end], ST_DTYPES[info["dtype"]]
        if start % dtype.itemsize:  # unaligned (never in files safetensors writes): copy
            raw = raw.clone()
        tensors[name] = raw.view(dtype).reshape(info["shape"])
    return tensors


def read_safetensors(path: PathLike, buffer: Optional[torch.Tensor] = None, *,
                     pin: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every tensor of a file, read with one sequential ``readinto`` into ``buffer`` (reused when big enough).

    Returns ``(tensors, buffer)``; the tensors are views of the buffer, so they are valid until it is reused.
    ``pin=True`` allocates a new buffer in pinned memory, so that a copy to the GPU can run asynchronously.
    ``readinto`` releases the GIL: a read on a background thread overlaps compute on the main one.
    """
    header = read_header(path)
    size = header.data_bytes
    if buffer is None or buffer.numel() < size:
        buffer = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
    view, done = memoryview(buffer.numpy()), 0
    with open(header.path, "rb", buffering=0) as f:
        f.seek(header.data_start)
        while done < size:
            n = f.readinto(view[done:size])
            if not n:
                raise CheckpointError(header.path, [f"{header.path.name} ended after {done:,} of {size:,} data bytes"])
            done += n
    return tensor_views(header, buffer[:size]), buffer


_MADV_POPULATE_READ = 22  # Linux 5.14+


@functools.lru_cache(maxsize=None)
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _populate(mapping: mmap.mmap) -> None:
    """Read a whole mapping in from the disk now, without holding the GIL (so the compute thread runs on)."""
    if sys.platform == "linux":
        anchor = ctypes.c_char.from_buffer(mapping)  # the mapping's address; released just below
        address = ctypes.addressof(anchor)
        del anchor
        # MADV_POPULATE_READ: fault every page in, the kernel reading ahead in large requests
        if _libc().madvise(ctypes.c_void_p(address), ctypes.c_size_t(len(mapping)), _MADV_POPULATE_READ) == 0:
            return
    torch.frombuffer(mapping, dtype=torch.uint8)[::mmap.PAGESIZE].sum()  # elsewhere: touch one byte per page


def map_safetensors(path: PathLike, *, populate: bool = True) -> tuple[dict[str, torch.Tensor], int]:
    """Map a file into memory and return ``(tensors, bytes mapped)``, the tensors being views of the mapping.

    Nothing is copied: the tensors *are* the kernel's page-cache pages of the file, so reading leaves the
    CPU to the compute. The mapping is private (copy-on-write): an in-place change never reaches the file.
    ``populate=True`` reads the whole file in before returning; ``populate=False`` reads a page only when it
    is first touched, with no read-ahead around it (see ``touch_rows``). The mapping is released with the
    last tensor.
    """
    header = read_header(path)
    with open(header.path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    if populate:
        _populate(mapping)
    else:
        mapping.madvise(mmap.MADV_RANDOM)
    return tensor_views(header, torch.frombuffer(mapping, dtype=torch.uint8)[header.data_start:]), len(mapping)


def touch_rows(tensors: Mapping[str, torch.Tensor], rows: torch.Tensor) -> int:
    """Fault in only ``rows`` of each lazily mapped table; returns the bytes of the pages that reads."""
    pages: set[int] = set()
    for t in tensors.values():
        t.index_select(0, rows)  # the lookup itself: the kernel reads those pages, and only those
        row, first = t[0].nbytes, t.data_ptr() - t.untyped_storage().data_ptr()
        for r in rows.tolist():
            start = first + r * row
            pages.update(range(start // mmap.PAGESIZE, (start + row - 1) // mmap.PAGESIZE + 1))
    return len(pages) * mmap.PAGESIZE


def drop_page_cache(*paths: PathLike) -> int:
    """Drop the cached pages of these files (or of every file under these folders); returns how many files.

    The next read of them then comes from the disk, which is how a benchmark measures a cold read (Linux).
    """
    if not hasattr(os, "posix_fadvise"):
        raise OSError("drop_page_cache needs os.posix_fadvise (Linux); this platform cannot drop cached pages")
    count = 0
    for root in map(Path, paths):
        for path in ([root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)  # dirty pages cannot be dropped: write them first
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            count += 1
    return count


# --------------------------------------------------------------------------- writing

def _fsync_dir(directory: Path) -> None:
    if os.name == "posix":
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def atomic_file(path: PathLike) -> Iterator[Path]:
    """``with atomic_file(p) as tmp:`` write ``tmp``; on success it is fsynced and renamed to ``p``, else removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)  # our own temporary file, never a finished one


def write_json(path: PathLike, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))


def write_safetensors(path: PathLike, specs: Sequence[tuple[str, Sequence[int], torch.dtype]],
                      make: Callable[[str], torch.Tensor], *, metadata: Optional[Mapping[str, str]] = None,
                      bar=None) -> int:
    """Write a safetensors file tensor by tensor, atomically; returns its data bytes.

    ``specs``: ``(name, shape, dtype)`` in file order; ``make(name)`` returns each tensor when it is written,
    so only one tensor need exist at a time (a model bigger than RAM is written with one tensor of memory).
    Tensors keep their order, largest element size first when dtypes mix (every tensor stays aligned);
    the header is padded so that the data starts 8-byte aligned. ``bar``: a tqdm bar advanced by bytes.
    """
    specs = sorted(specs, key=lambda s: -s[2].itemsize)  # stable: the given order within a dtype size
    header, offset = {}, 0
    for name, shape, dtype in specs:
        if dtype not in _ST_NAMES:
            raise ValueError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot store")
        size = int(torch.Size(shape).numel()) * dtype.itemsize
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}, **header}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for name, shape, dtype in specs:
            tensor = make(name).detach()
            if tensor.dtype != dtype or list(tensor.shape) != list(shape):
                raise ValueError(f"tensor {name!r} is {tensor.dtype} {list(tensor.shape)}; "
                                 f"its spec says {dtype} {list(shape)}")
            tensor = tensor.to("cpu").contiguous()
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
            if bar is not None:
                bar.update(tensor.nbytes)
            del tensor
    return offset


def save_safetensors(path: PathLike, tensors: Mapping[str, torch.Tensor], *,
                     metadata: Optional[Mapping[str, str]] = None) -> int:
    """Write a dict of tensors as one safetensors file, atomically; returns its data bytes."""
    return write_safetensors(path, [(k, t.shape, t.dtype) for k, t in tensors.items()], tensors.__getitem__,
                             metadata=metadata)


@contextmanager
def staging_dir(target: PathLike) -> Iterator[Path]:
    """``with staging_dir(target) as tmp:`` build a folder in ``tmp``; on success it becomes ``target`` at once.

    ``tmp`` is a fresh folder beside ``target``. On success every file in it is fsynced and the folder is
    renamed to ``target``, which must not exist (or be empty); if another process published ``target`` first
    with a manifest, theirs is kept. On failure ``tmp`` is removed. ``target`` is never half-written.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-build-", dir=target.parent))
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb+") as f:
                    os.fsync(f.fileno())
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / MANIFEST).is_file():
                raise
        _fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)  # ours: made by mkdtemp above


# --------------------------------------------------------------------------- trusting what was written before

def file_key(*paths: PathLike) -> list:
    """What identifies source files for a cache key: each one's name, size and modification time."""
    return [[str(Path(p).resolve()), Path(p).stat().st_size, Path(p).stat().st_mtime_ns] for p in paths]


def cache_key(**inputs) -> str:
    """A key for an output made from ``inputs`` (JSON-able values; use ``file_key`` for source files)."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def write_manifest(directory: PathLike, key: str, **info) -> None:
    """Mark a folder as written by helpers from ``key``: every file's size, written last and atomically."""
    directory = Path(directory)
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    write_json(directory / MANIFEST, {"key": key, "info": info, "files": files})


def _manifest(directory: Path) -> Optional[dict]:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        return manifest if isinstance(manifest, dict) else None
    except (OSError, ValueError):
        return None


def written_by_helpers(path: PathLike) -> bool:
    """True for a folder with helpers' manifest, or a safetensors file whose metadata carries a helpers key."""
    path = Path(path)
    if path.is_dir():
        return _manifest(path) is not None
    try:
        return KEY_FIELD in read_header(path).metadata
    except (OSError, CheckpointError):
        return False


def why_stale(path: PathLike, key: str) -> list[str]:
    """Why ``path`` (a folder or a safetensors file helpers wrote) cannot be reused for ``key``: [] when it can.

    Reusable means: written by helpers, from the same key, and complete (every file of a folder's manifest
    present with its size and, for safetensors files, data that fills the file exactly).
    """
    path = Path(path)
    if not path.exists():
        return [f"{path} does not exist"]
    if path.is_file():
        try:
            header = read_header(path)
        except (OSError, CheckpointError) as e:
            return [f"{path.name}: {e}"]
        problems = [] if header.metadata.get(KEY_FIELD) == key else [f"{path.name} was made from other inputs"]
        end = max((info["data_offsets"][1] for info in header.tensors.values()), default=0)
        return problems + ([] if end == header.data_bytes else [f"{path.name} is incomplete"])
    manifest = _manifest(path)
    if manifest is None:
        return [f"{path} has no {MANIFEST}: helpers did not write it, or never finished"]
    problems = [] if manifest.get("key") == key else [f"{path.name} was made from other inputs"]
    for name, size in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != size:
            problems.append(f"{name} is {file.stat().st_size:,} bytes, expected {size:,}")
        elif name.endswith(".safetensors"):
            try:
                header = read_header(file)
                end = max((info["data_offsets"][1] for info in header.tensors.values()), default=0)
                if end != header.data_bytes:
                    problems.append(f"{name} has a header that does not describe its data")
            except CheckpointError:
                problems.append(f"{name} has a corrupt safetensors header")
    return problems


# --------------------------------------------------------------------------- checkpoints: sharded and per layer

def weight_map(path: PathLike) -> tuple[Path, dict[str, str]]:
    """``(folder, {tensor name: file name})`` for a checkpoint folder, its index file, or a single file.

    Understands ``model.safetensors.index.json``, a lone ``model.safetensors``, and a per-layer split.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return path.parent, {k: path.name for k in read_header(path).tensors}
    if path.is_file() and path.name == LAYERS_INDEX:
        return weight_map(path.parent)
    root = path.parent if path.is_file() else path
    index = path if path.is_file() else root / INDEX
    if path.is_dir() and not index.is_file() and (root / LAYERS_INDEX).is_file():
        files = read_layer_index(root).files.values()
        return root, {k: f for f in files for k in read_header(root / f).tensors}
    if index.is_file():
        try:
            return root, dict(json.loads(index.read_text())["weight_map"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(index, [f"{index.name}: not a valid index with a weight_map ({e!r})"]) from None
    if (root / SINGLE).is_file():
        return weight_map(root / SINGLE)
    raise FileNotFoundError(f"{path} is not a safetensors checkpoint: expected a .safetensors file or a "
                            f"folder with {INDEX}, {SINGLE} or {LAYERS_INDEX}")


def pack_shards(specs: Sequence[tuple[str, Sequence[int], torch.dtype]],
                shard_bytes: int) -> list[list[tuple[str, Sequence[int], torch.dtype]]]:
    """Greedy packing in the given order: a new shard starts when the next tensor would pass ``shard_bytes``.

    helpers' own policy, so the files it writes do not move when transformers changes how ``save_pretrained``
    shards. A tensor bigger than ``shard_bytes`` gets a shard of its own.
    """
    if shard_bytes <= 0:
        raise ValueError(f"shard_bytes {shard_bytes!r} must be more than 0")
    shards: list[list] = [[]]
    used = 0
    for name, shape, dtype in specs:
        size = int(torch.Size(shape).numel()) * dtype.itemsize
        if shards[-1] and used + size > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape, dtype))
        used += size
    return shards


def shard_name(i: int, n: int) -> str:
    """The file name transformers gives shard ``i`` of ``n`` (counting from 1)."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def save_sharded(directory: PathLike, specs: Sequence[tuple[str, Sequence[int], torch.dtype]],
                 make: Callable[[str], torch.Tensor], shard_bytes: int, *, bar=None) -> dict[str, str]:
    """Write tensors as shards of at most ``shard_bytes`` plus ``model.safetensors.index.json``; returns the weight map.

    ``make(name)`` gives each tensor as it is written (see ``write_safetensors``), so peak memory is one tensor.
    """
    directory = Path(directory)
    shards = pack_shards(specs, shard_bytes)
    weights: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        write_safetensors(directory / shard_name(i, len(shards)), shard, make, metadata={"format": "pt"}, bar=bar)
        weights.update({name: shard_name(i, len(shards)) for name, _, _ in shard})
    total = sum(int(torch.Size(shape).numel()) * dtype.itemsize for _, shape, dtype in specs)
    params = sum(int(torch.Size(shape).numel()) for _, shape, _ in specs)
    write_json(directory / INDEX, {"metadata": {"total_parameters": params, "total_size": total},
                                   "weight_map": weights})
    return weights


@dataclass(frozen=True)
class LayerIndex:
    """``layers.index.json``: a checkpoint split into one file per block (chapter 03), in execution order."""

    blocks: list[str]  # execution order; a tied lm_head is a block without a file of its own
    files: dict[str, str]  # block -> file name
    tied: dict[str, str]  # tensor -> the tensor it is stored as (lm_head.weight -> model.embed_tokens.weight)
    bytes: dict[str, int]  # block -> data bytes of its file

    def tied_source(self, block: str) -> Optional[tuple[str, str, str]]:
        """For a block stored as another block's tensor: ``(source block, source tensor, tensor)``, else None."""
        for target, source in self.tied.items():
            if target.startswith(block + ".") and block not in self.files:
                owner = next(b for b in self.files if source.startswith(b + "."))
                return owner, source, target
        return None

    def write(self, directory: PathLike) -> None:
        write_json(Path(directory) / LAYERS_INDEX, {
            "format": LAYERS_FORMAT, "blocks": self.blocks, "files": self.files, "tied": self.tied,
            "bytes": self.bytes, "total_size": sum(self.bytes.values())})


def read_layer_index(directory: PathLike) -> LayerIndex:
    """Read and check the ``layers.index.json`` of a per-layer split."""
    path = Path(directory) / LAYERS_INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{Path(directory)} has no {LAYERS_INDEX}: it is not a complete per-layer split "
                                "(make one with helpers.checkpoints.split_by_layer)")
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != LAYERS_FORMAT:
            raise ValueError(f"format {raw.get('format')!r}; expected {LAYERS_FORMAT!r}")
        index = LayerIndex(list(raw["blocks"]), dict(raw["files"]), dict(raw.get("tied", {})),
                           dict(raw["bytes"]))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(path, [f"{path.name}: not a layer index helpers can read ({e})"]) from None
    orphans = [b for b in index.blocks if b not in index.files and index.tied_source(b) is None]
    if orphans:
        raise CheckpointError(path, [f"{path.name}: block(s) {orphans} have no file and no tied source"])
    return index
