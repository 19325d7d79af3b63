"""Tensor files: the one place ``helpers`` reads and writes safetensors files, publishes finished work, and
decides whether something it wrote earlier can be trusted again. File I/O only: which tensors make up a
model's blocks, and where they lie, is ``helpers.layout``'s business; reading blocks fast is ``helpers.reader``'s.

The ground floor under every chapter. Chapter 03 takes the format apart by hand; chapters 05 and 08 read it
as a whole file or as byte ranges (``read_range``, ``map_range``), copied into a reusable buffer or mapped.

The format: an 8-byte little-endian length, that many bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``), then the raw bytes,
offsets counted from the end of the JSON.

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
    "ST_DTYPES", "CheckpointError", "Header", "read_header", "tensor_views", "read_range", "read_safetensors",
    "map_range", "map_safetensors", "touch_rows", "drop_page_cache", "drop_page_range", "atomic_file", "write_json",
    "write_safetensors", "save_safetensors",
    "staging_dir", "MANIFEST", "KEY_FIELD", "file_key", "cache_key", "write_manifest", "why_stale",
    "manifest_info", "written_by_helpers",
]

PathLike = Union[str, Path]
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
             "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_ST_NAMES = {dtype: name for name, dtype in ST_DTYPES.items()}
MAX_HEADER = 100_000_000  # the same limit safetensors itself enforces
MANIFEST = "helpers-manifest.json"  # in a folder helpers wrote: its key and every file's size, written last
KEY_FIELD = "helpers_key"  # in a safetensors file helpers wrote: its key, in the header's __metadata__


class CheckpointError(ValueError):
    """Everything wrong with a checkpoint or tensor file, one problem per line (``.problems``). Built in chapter 03."""

    def __init__(self, where: PathLike, problems: Sequence[str]):
        self.path, self.problems = Path(where), list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in checkpoint {where}:\n{lines}")


# --------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class Header:
    """A safetensors file's header: where its data starts, each tensor's entry, and its metadata.
    Built in chapter 03."""

    path: Path
    data_start: int  # 8 + the JSON's length
    data_bytes: int  # the file's size minus data_start
    tensors: dict = field(repr=False)  # name -> {"dtype", "shape", "data_offsets"}
    metadata: dict = field(repr=False)


def read_header(path: PathLike) -> Header:
    """Parse a safetensors header: the 8-byte length prefix, checked against the file, then that much JSON.
    Built in chapter 03."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(path, [f"{path.name}: only {size} bytes, too short for the 8-byte header length"])
        n = int.from_bytes(prefix, "little")
        if n > min(size - 8, MAX_HEADER):
            raise CheckpointError(path, [f"{path.name}: bad length prefix: header of {n:,} bytes announced, but the "
                                         f"file has {size - 8:,} bytes after the prefix "
                                         f"(and the limit is {MAX_HEADER:,})"])
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
    """The tensors ``header`` describes, as views of ``data`` (the file's data bytes, uint8): nothing is copied.
    Built in chapter 03."""
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
    Built in chapter 05.
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
    Built in chapter 05.
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
    Built in chapter 08.
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
    Built in chapter 05.
    """
    header = read_header(path)
    data = map_range(header.path, 0, header.data_start + header.data_bytes, populate=populate)
    return tensor_views(header, data[header.data_start:]), data.numel()


def touch_rows(tensors: Mapping[str, torch.Tensor], rows: torch.Tensor) -> int:
    """Fault in only ``rows`` of each lazily mapped table; returns the bytes of the pages that reads.
    Built in chapter 08."""
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
    Built in chapter 05.
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
    Built in chapter 08.
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
    """``with atomic_file(p) as tmp:`` write ``tmp``; on success it is fsynced and renamed to ``p``, else removed.
    Built in chapter 03."""
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
    """Write ``obj`` as indented JSON, atomically. Built in chapter 03."""
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
    Built in chapter 03.
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
    """Write a dict of tensors as one safetensors file, atomically; returns its data bytes. Built in chapter 03."""
    return write_safetensors(path, [(k, t.shape, t.dtype) for k, t in tensors.items()], tensors.__getitem__,
                             metadata=metadata)


@contextmanager
def staging_dir(target: PathLike) -> Iterator[Path]:
    """``with staging_dir(target) as tmp:`` build a folder in ``tmp``; on success it becomes ``target`` at once.

    ``tmp`` is a fresh folder beside ``target``. On success every file in it is fsynced and the folder is
    renamed to ``target``, which must not exist (or be empty); if another process published ``target`` first
    with a manifest, theirs is kept. On failure ``tmp`` is removed. ``target`` is never half-written.
    Built in chapter 03.
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
    """What identifies source files for a cache key: each one's name, size and modification time.
    Built in chapter 03."""
    return [[str(Path(p).resolve()), Path(p).stat().st_size, Path(p).stat().st_mtime_ns] for p in paths]


def cache_key(**inputs) -> str:
    """A key for an output made from ``inputs`` (JSON-able values; use ``file_key`` for source files).
    Built in chapter 03."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def write_manifest(directory: PathLike, key: str, **info) -> None:
    """Mark a folder as written by helpers from ``key``: every file's size, written last and atomically.
    Built in chapter 03."""
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
    """What ``write_manifest`` recorded about a folder beside its key (``{}`` for a folder without a manifest).
    Built in chapter 03."""
    info = (_manifest(Path(directory)) or {}).get("info")
    return info if isinstance(info, dict) else {}


def written_by_helpers(path: PathLike) -> bool:
    """True for a folder with helpers' manifest, or a safetensors file whose metadata carries a helpers key.
    Built in chapter 03."""
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
    Built in chapter 03.
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
