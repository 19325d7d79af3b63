"""The reader's own disks: which folders on this machine a checkpoint could be read from, and how fast each reads.

Built in chapter 08. Chapter 08's bound is bytes over the disk's cold read bandwidth, and the disk that counts is
the one the reader's checkpoint lies on: the working folder, Kaggle's read-only ``/kaggle/input`` (where attached
datasets and models are mounted) or Colab's ``/content``. ``disk_folders`` lists those that exist here;
``probe_disks`` measures each one's sequential read speed. A folder it may write to gets a temporary file of its
own (created exclusively, written, flushed to the disk, its cached pages dropped, read back, removed whatever
happens); a read-only one is never written to: its largest existing file is read, up to a cap, with ``O_DIRECT``
where the file system allows it (else through the page cache, which may already hold it: the note says so).
"""

from __future__ import annotations

import mmap
import os
import tempfile
import time
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

from helpers.reader import ALIGN, direct_io_refusal
from helpers.tensorfiles import drop_page_cache

__all__ = ["DiskSpeed", "READER_FOLDERS", "disk_folders", "probe_disks"]

READER_FOLDERS = ("/kaggle/input", "/content")  # Kaggle's attached inputs (read-only), Colab's working folder
CHUNK = 8 * 2**20  # bytes per read call


class DiskSpeed(NamedTuple):
    """One folder's sequential read: bytes read, GB/s (10**9 bytes per second), how, and anything to know.
    Built in chapter 08."""

    path: str
    bytes: int
    gb_per_s: float
    method: str  # "write+direct", "write+buffered", "read+direct", "read+buffered", or "none"
    note: str


def disk_folders(extra: Sequence[Union[str, Path]] = READER_FOLDERS) -> list[Path]:
    """The folders worth probing here: the working folder, then each of ``extra`` that exists (by default
    Kaggle's ``/kaggle/input`` and Colab's ``/content``). Built in chapter 08."""
    folders = [Path.cwd()]
    for folder in map(Path, extra):
        if folder.is_dir() and folder.resolve() not in [f.resolve() for f in folders]:
            folders.append(folder)
    return folders


def probe_disks(folders: Optional[Sequence[Union[str, Path]]] = None, *, nbytes: int = 256 * 2**20,
                cap: int = 2**30) -> list[DiskSpeed]:
    """Each folder's sequential cold read speed (``folders``: by default ``disk_folders()``), one row each.
    Built in chapter 08.

    A folder this process may write to: a temporary file of ``nbytes`` written there, read back once its cached
    pages are dropped, and removed. Any other: its largest file, at most ``cap`` bytes of it, never a write. A
    folder that does not exist, or holds no file to read, gets a row of 0 bytes saying why.
    """
    for name, value in (("nbytes", nbytes), ("cap", cap)):
        if isinstance(value, bool) or not isinstance(value, int) or value < ALIGN:
            raise ValueError(f"{name} {value!r} must be an int of bytes >= {ALIGN}")
    folders = disk_folders() if folders is None else [Path(f) for f in folders]
    rows = []
    for folder in folders:
        if not folder.is_dir():
            rows.append(DiskSpeed(str(folder), 0, 0.0, "none", "not a folder here"))
        elif os.access(folder, os.W_OK):
            rows.append(_write_and_read(folder, nbytes))
        else:
            rows.append(_read_largest(folder, cap))
    return rows


def _write_and_read(folder: Path, nbytes: int) -> DiskSpeed:
    """Write a file of our own in ``folder``, drop its pages, time reading it back; the file is always removed."""
    fd, name = tempfile.mkstemp(prefix=".disk-probe-", suffix=".bin", dir=folder)  # O_EXCL: ours alone
    path = Path(name)
    try:
        block = os.urandom(CHUNK)  # incompressible, in case the file system compresses
        with os.fdopen(fd, "wb") as f:
            for start in range(0, nbytes, CHUNK):
                f.write(block[:min(CHUNK, nbytes - start)])
            f.flush()
            os.fsync(f.fileno())
        drop_page_cache(path)
        nread, seconds, method, note = _timed_read(path, nbytes)
    finally:
        path.unlink(missing_ok=True)
    return DiskSpeed(str(folder), nread, nread / seconds / 1e9, f"write+{method}", note)


def _read_largest(folder: Path, cap: int) -> DiskSpeed:
    """Time reading (up to ``cap`` bytes of) the largest file under ``folder``, without writing anything."""
    largest, size = None, -1
    for root, _, files in os.walk(folder):
        for file in files:
            path = Path(root, file)
            try:
                if path.is_file() and not path.is_symlink() and path.stat().st_size > size:
                    largest, size = path, path.stat().st_size
            except OSError:
                continue
    if largest is None or size < ALIGN:
        return DiskSpeed(str(folder), 0, 0.0, "none", "read-only, and no file of 4 KiB or more to read")
    nread, seconds, method, note = _timed_read(largest, min(size, cap))
    note = f"read-only: read {largest.name}" + (f"; {note}" if note else "")
    return DiskSpeed(str(folder), nread, nread / seconds / 1e9, f"read+{method}", note)


def _timed_read(path: Path, nbytes: int) -> tuple[int, float, str, str]:
    """Read the first ``nbytes`` of ``path`` (rounded down to ``ALIGN`` for O_DIRECT): (bytes, seconds, method,
    note). O_DIRECT where allowed (the page cache bypassed), else buffered from wherever the pages are."""
    refusal = direct_io_refusal(path)
    direct = refusal is None
    if direct:
        nbytes -= nbytes % ALIGN
    buffer = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
    view = memoryview(buffer)
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        if not direct and hasattr(os, "posix_fadvise"):  # drop what the page cache holds of it (no write)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        done, t0 = 0, time.perf_counter()
        while done < nbytes:
            got = os.preadv(fd, [view[:min(CHUNK, nbytes - done + (-(nbytes - done) % ALIGN))]], done)
            if got <= 0:
                break
            done += got
        seconds = max(time.perf_counter() - t0, 1e-9)
    finally:
        os.close(fd)
        view.release()
        buffer.close()
    done = min(done, nbytes)
    note = "" if direct else f"buffered ({refusal}): cached pages dropped first, as far as the kernel allows"
    return done, seconds, "direct" if direct else "buffered", note
