"""Tensor files: the one place ``helpers`` reads and writes safetensors files, publishes finished work, and
decides whether something it wrote earlier can be trusted again.

The ground floor under every chapter. Chapter 03 takes the format apart by hand; chapters 05 and 08 read it
three ways (one ``readinto`` into a reusable buffer, a memory map, a map that touches only some rows), of a
whole file or of one byte range (``read_range``, ``map_range``): chapter 08 streams a checkpoint in place,
each block being the ranges of its tensors in the original shards (``block_layout``).

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
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import torch

__all__ = [
    "ST_DTYPES", "CheckpointError", "Header", "read_header", "tensor_views", "read_range", "read_safetensors",
    "map_range", "map_safetensors", "touch_rows", "drop_page_cache", "drop_page_range", "atomic_file", "write_json",
    "write_safetensors", "save_safetensors",
    "staging_dir", "MANIFEST", "KEY_FIELD", "file_key", "cache_key", "write_manifest", "why_stale",
    "manifest_info", "written_by_helpers",
    "INDEX", "SINGLE", "weight_map", "pack_shards", "shard_name", "save_sharded",
    "LAYERS_INDEX", "LAYERS_FORMAT", "COMPRESSIONS", "LayerIndex", "read_layer_index",
    "block_of", "block_order", "Piece", "pieces_of", "BlockLayout", "layout_kind", "block_layout",
]

PathLike = Union[str, Path]
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
             "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_ST_NAMES = {dtype: name for name, dtype in ST_DTYPES.items()}
MAX_HEADER = 100_000_000  # the same limit safetensors itself enforces
INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"
LAYERS_INDEX, LAYERS_FORMAT = "layers.index.json", "helpers-layers/1"
COMPRESSIONS = (None, "int8", "nf4")  # how a split may store its linear weights (helpers.quant.compress_state)
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


def _check_range(path: Path, start: int, length: int, size: int) -> None:
    if start < 0 or length < 0 or start + length > size:
        raise CheckpointError(path, [f"{path.name}: bytes [{start:,}, {start + length:,}) asked for, but the file "
                                     f"has {size:,} bytes (truncated, or a corrupt header)"])


def read_range(path: PathLike, start: int, length: int, buffer: Optional[torch.Tensor] = None, *,
               pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes ``[start, start + length)`` of a file, read with one sequential ``readinto`` into ``buffer``.

    Returns ``(data, buffer)``: ``data`` is ``buffer[:length]`` (uint8), valid until the buffer is reused.
    ``buffer`` is reused when it has at least ``length`` bytes (a slice of a bigger buffer is fine); otherwise a
    new one is allocated, in pinned memory with ``pin=True`` (so that a copy to the GPU can run asynchronously).
    ``readinto`` releases the GIL: a read on a background thread overlaps compute on the main one.
    """
    path = Path(path)
    with open(path, "rb", buffering=0) as f:
        _check_range(path, start, length, os.fstat(f.fileno()).st_size)
        if buffer is None or buffer.numel() < length:
            buffer = torch.empty(length, dtype=torch.uint8, pin_memory=pin)
        view, done = memoryview(buffer.numpy()), 0
        f.seek(start)
        while done < length:
            n = f.readinto(view[done:length])
            if not n:
                raise CheckpointError(path, [f"{path.name} ended after {start + done:,} bytes; bytes "
                                             f"[{start:,}, {start + length:,}) were to be read (truncated?)"])
            done += n
    return buffer[:length], buffer


def read_safetensors(path: PathLike, buffer: Optional[torch.Tensor] = None, *,
                     pin: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every tensor of a file, read with one sequential ``readinto`` into ``buffer`` (reused when big enough).

    Returns ``(tensors, buffer)``; the tensors are views of the buffer, so they are valid until it is reused.
    ``pin=True`` allocates a new buffer in pinned memory, so that a copy to the GPU can run asynchronously.
    ``readinto`` releases the GIL: a read on a background thread overlaps compute on the main one.
    The file's data region through ``read_range``.
    """
    header = read_header(path)
    data, buffer = read_range(header.path, header.data_start, header.data_bytes, buffer, pin=pin)
    return tensor_views(header, data), buffer


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


def map_range(path: PathLike, start: int = 0, length: Optional[int] = None, *,
              populate: bool = True) -> torch.Tensor:
    """Map bytes ``[start, start + length)`` of a file (default: to its end) into memory, as a uint8 tensor.

    Nothing is copied: the tensor *is* the kernel's page-cache pages of the file, so reading leaves the CPU
    to the compute. Only that range is mapped (from the page boundary below ``start``), so a block can be read
    in place from a big shard. The mapping is private (copy-on-write): an in-place change never reaches the
    file. ``populate=True`` reads the range in before returning (``MADV_POPULATE_READ``, without the GIL);
    ``populate=False`` reads a page only when it is first touched, with no read-ahead around it (see
    ``touch_rows``). The mapping is released with the last tensor that views it. A range past the end of the
    file is a ``CheckpointError`` (touching it would kill the process with SIGBUS).
    """
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        length = size - start if length is None else length
        _check_range(path, start, length, size)
        if length == 0:
            return torch.empty(0, dtype=torch.uint8)
        base = start - start % mmap.ALLOCATIONGRANULARITY
        mapping = mmap.mmap(f.fileno(), start + length - base, flags=mmap.MAP_PRIVATE,
                            prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=base)
    if populate:
        _populate(mapping)
    else:
        mapping.madvise(mmap.MADV_RANDOM)
    return torch.frombuffer(mapping, dtype=torch.uint8)[start - base:]


def map_safetensors(path: PathLike, *, populate: bool = True) -> tuple[dict[str, torch.Tensor], int]:
    """Map a file into memory and return ``(tensors, bytes mapped)``, the tensors being views of the mapping.

    Nothing is copied: the tensors *are* the kernel's page-cache pages of the file, so reading leaves the
    CPU to the compute. The mapping is private (copy-on-write): an in-place change never reaches the file.
    ``populate=True`` reads the whole file in before returning; ``populate=False`` reads a page only when it
    is first touched, with no read-ahead around it (see ``touch_rows``). The mapping is released with the
    last tensor. The whole file through ``map_range``.
    """
    header = read_header(path)
    data = map_range(header.path, 0, header.data_start + header.data_bytes, populate=populate)
    return tensor_views(header, data[header.data_start:]), data.numel()


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


def drop_page_range(path: PathLike, start: int, length: int) -> None:
    """Drop the cached pages of bytes ``[start, start + length)`` of a file: a block read in place from a shard.

    The range is widened to whole pages (the kernel keeps partially covered pages), so a page shared with a
    neighbouring block goes too; the next read of it comes from the disk either way. Unlike
    ``drop_page_cache`` there is no ``fdatasync`` first: these are files we only read (checkpoint shards), with
    no dirty pages of ours to write; a page someone else dirtied is simply kept (Linux).
    """
    if not hasattr(os, "posix_fadvise"):
        raise OSError("drop_page_range needs os.posix_fadvise (Linux); this platform cannot drop cached pages")
    first = start - start % mmap.PAGESIZE
    end = -(-(start + length) // mmap.PAGESIZE) * mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, first, end - first, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


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


def manifest_info(directory: PathLike) -> dict:
    """What ``write_manifest`` recorded about a folder beside its key (``{}`` for a folder without a manifest)."""
    info = (_manifest(Path(directory)) or {}).get("info")
    return info if isinstance(info, dict) else {}


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
    compression: Optional[str] = None  # None, "int8" or "nf4": how linear weights are stored (helpers.quant)

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
            "bytes": self.bytes, "total_size": sum(self.bytes.values()), "compression": self.compression})


def read_layer_index(directory: PathLike) -> LayerIndex:
    """Read and check the ``layers.index.json`` of a per-layer split.

    ``compression`` may be absent (a split written before it existed: None), null, "int8" or "nf4".
    """
    path = Path(directory) / LAYERS_INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{Path(directory)} has no {LAYERS_INDEX}: it is not a complete per-layer split "
                                "(make one with helpers.checkpoints.split_by_layer)")
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != LAYERS_FORMAT:
            raise ValueError(f"format {raw.get('format')!r}; expected {LAYERS_FORMAT!r}")
        compression = raw.get("compression")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression {compression!r}; expected one of {', '.join(map(repr, COMPRESSIONS))}")
        index = LayerIndex(list(raw["blocks"]), dict(raw["files"]), dict(raw.get("tied", {})),
                           dict(raw["bytes"]), compression)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(path, [f"{path.name}: not a layer index helpers can read ({e})"]) from None
    orphans = [b for b in index.blocks if b not in index.files and index.tied_source(b) is None]
    if orphans:
        raise CheckpointError(path, [f"{path.name}: block(s) {orphans} have no file and no tied source"])
    return index


# --------------------------------------------------------------------------- blocks: where each block's bytes are

def block_of(name: str) -> str:
    """The top-level block a tensor belongs to: ``model.layers.3`` for layer 3, else its parent module."""
    match = re.match(r"^(.*\.layers\.\d+)\.", name)
    return match.group(1) if match else name.rsplit(".", 1)[0]


def block_order(block: str) -> tuple:
    """Sort key of execution order: the embedding, anything else, the layers by number, the final norm, lm_head."""
    match = re.match(r"^.*\.layers\.(\d+)$", block)
    if block.endswith("embed_tokens"):
        return (0, 0)
    if match:
        return (2, int(match.group(1)))
    return (4, 0) if block == "lm_head" else (3, 0) if block.endswith(".norm") else (1, 0)


@dataclass(frozen=True)
class Piece:
    """A contiguous byte range of one file holding some of a block's tensors: what one read (or map) fetches."""

    path: Path
    start: int  # from the file's first byte
    length: int
    tensors: dict = field(repr=False)  # name in the block -> (torch dtype, shape, offset in the piece)

    def views(self, data: torch.Tensor) -> dict[str, torch.Tensor]:
        """The piece's tensors as views of ``data`` (its ``length`` bytes, uint8): nothing is copied."""
        out = {}
        for name, (dtype, shape, offset) in self.tensors.items():
            raw = data[offset:offset + int(torch.Size(shape).numel()) * dtype.itemsize]
            if raw.storage_offset() % dtype.itemsize:  # unaligned (never in files safetensors writes): copy
                raw = raw.clone()
            out[name] = raw.view(dtype).reshape(shape)
        return out


def pieces_of(header: Header, names: Mapping[str, str]) -> list[Piece]:
    """The tensors ``names`` ({name in the file: name in the block}) of one file, as the fewest contiguous ranges.

    In files safetensors writes, one layer's tensors of one dtype are contiguous: a block is one range per
    file (two when its norms are stored in another dtype). Offsets are checked against the file here, so a
    corrupt header is a ``CheckpointError`` before anything is read.
    """
    entries, problems = [], []
    for name in names:
        info = header.tensors.get(name)
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            dtype, shape = ST_DTYPES[info["dtype"]], [int(x) for x in info["shape"]]
        except (KeyError, TypeError, ValueError):
            problems.append(f"{header.path.name}: no readable entry for tensor {name!r}")
            continue
        if not 0 <= begin <= end <= header.data_bytes or end - begin != torch.Size(shape).numel() * dtype.itemsize:
            problems.append(f"{header.path.name}: tensor {name!r} has data_offsets [{begin}, {end}], which do not "
                            f"fit its {info['dtype']} {shape} inside the file's {header.data_bytes:,} data bytes")
            continue
        entries.append((begin, end, name, dtype, shape))
    if problems:
        raise CheckpointError(header.path, problems)
    pieces, run = [], None  # run: [start, end, {name in block: (dtype, shape, begin)}], offsets in the data region
    for begin, end, name, dtype, shape in sorted(entries, key=lambda e: (e[0], e[1])):
        if run is None or begin > run[1]:
            if run is not None:
                pieces.append(run)
            run = [begin, end, {}]
        run[1] = max(run[1], end)
        run[2][names[name]] = (dtype, shape, begin)
    if run is not None:
        pieces.append(run)
    return [Piece(header.path, header.data_start + start, end - start,
                  {k: (dtype, shape, begin - start) for k, (dtype, shape, begin) in tensors.items()})
            for start, end, tensors in pieces]


@dataclass(frozen=True)
class BlockLayout:
    """Where each block of a model is on disk: a per-layer split, or an ordinary checkpoint read in place.

    ``kind``: "split" or "checkpoint". ``blocks``: execution order (embedding, layers, norm, lm_head).
    ``pieces[block]``: the byte ranges to read for it, each with its tensors' names inside the block
    (``self_attn.q_proj.weight``); a tied ``lm_head`` reads the embedding's table as ``weight``.
    ``compression``: how a split stores its linear weights (None for a checkpoint).
    """

    root: Path
    kind: str
    blocks: list[str]
    pieces: dict[str, list[Piece]] = field(repr=False)
    compression: Optional[str] = None

    def bytes(self, block: str) -> int:
        """Bytes one read of ``block`` fetches: its ranges' lengths."""
        return sum(p.length for p in self.pieces[block])


def _block_pieces(headers: Mapping[str, Header], files: Mapping[str, Mapping[str, str]]) -> list[Piece]:
    return [p for file, names in files.items() for p in pieces_of(headers[file], names)]


def layout_kind(path: PathLike) -> str:
    """"split" for a folder with ``layers.index.json``, "checkpoint" for one with ``model.safetensors.index.json``
    or ``model.safetensors``; ``FileNotFoundError`` naming the folder and both layouts otherwise. Reads nothing."""
    path = Path(path)
    if path.is_dir() and (path / LAYERS_INDEX).is_file():
        return "split"
    if path.is_dir() and ((path / INDEX).is_file() or (path / SINGLE).is_file()):
        return "checkpoint"
    raise FileNotFoundError(f"{path} is neither a per-layer split (a folder with {LAYERS_INDEX}, made by "
                            f"helpers.checkpoints.split_by_layer) nor a safetensors checkpoint (a folder with "
                            f"{INDEX} and its shards, or with {SINGLE})")


def block_layout(path: PathLike) -> BlockLayout:
    """Read the headers of a per-layer split or a checkpoint once and say where each block's bytes are.

    ``path``: a folder with ``layers.index.json`` (a split, chapter 03), or a checkpoint folder with
    ``model.safetensors.index.json`` and its shards or a lone ``model.safetensors`` (read in place: nothing
    is written, no second copy). Block names and order are those ``helpers.checkpoints.split_by_layer``
    gives the same checkpoint. A missing file or a header that does not fit its file is a ``CheckpointError``
    before any tensor is read. Built in chapter 08.
    """
    path = Path(path)
    if layout_kind(path) == "split":
        index = read_layer_index(path)
        missing = sorted({f for f in index.files.values() if not (path / f).is_file()})
        if missing:
            raise CheckpointError(path / LAYERS_INDEX, [f"{m}: block file is missing" for m in missing])
        headers = {f: read_header(path / f) for f in dict.fromkeys(index.files.values())}
        pieces = {}
        for block in index.blocks:
            if block in index.files:
                file = index.files[block]
                names = {k: k[len(block) + 1:] for k in headers[file].tensors}
            else:
                owner, source, target = index.tied_source(block)
                file, names = index.files[owner], {source: target[len(block) + 1:]}
            pieces[block] = _block_pieces(headers, {file: names})
        return BlockLayout(path, "split", list(index.blocks), pieces, index.compression)
    root, names = weight_map(path)
    missing = sorted(set(names.values()) - {p.name for p in root.iterdir() if p.is_file()})
    if missing:
        raise CheckpointError(root, [f"{m}: shard file is missing; the index maps "
                                     f"{sum(v == m for v in names.values())} tensor(s) to it" for m in missing])
    headers = {f: read_header(root / f) for f in dict.fromkeys(names.values())}
    absent = [f"{f}: tensor {k!r} is in the index but not in the file" for k, f in names.items()
              if k not in headers[f].tensors]
    if absent:
        raise CheckpointError(root, absent)
    try:
        config = json.loads((root / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    tied = "lm_head.weight" not in names or bool(config.get("tie_word_embeddings", False))  # as split_by_layer
    files: dict[str, dict[str, dict[str, str]]] = {}  # block -> file -> {name in file: name in block}
    for name, file in names.items():
        if not (tied and name == "lm_head.weight"):
            block = block_of(name)
            files.setdefault(block, {}).setdefault(file, {})[name] = name[len(block) + 1:]
    order = sorted(files, key=block_order)
    if tied:
        table = "model.embed_tokens.weight"
        if table not in names:
            raise CheckpointError(root, [f"lm_head is tied to the embedding, but there is no {table!r}"])
        files["lm_head"] = {names[table]: {table: "weight"}}
        order.append("lm_head")
    return BlockLayout(root, "checkpoint", order, {b: _block_pieces(headers, files[b]) for b in order})
