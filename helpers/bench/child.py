"""One measurement in its own process: ``python -m helpers.bench.child VARIANT REQUEST.json RESULT.json``.

Each variant runs in a fresh process so that its peak RSS is its own. The parent (``run.run_variant``) writes
the request, the ``BenchConfig`` and ``Work`` as JSON (``config.write_request``); the child runs
``VARIANTS[VARIANT]`` and writes what it measured to RESULT.json, atomically (``helpers.tensorfiles.write_json``).
A child that fails writes nothing: its exit status and its last line of stderr are what the parent records.
``VARIANTS`` is the registry of every variant by name. Built in chapter 08.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from helpers.tensorfiles import write_json

from .anchors import run_accelerate, run_airllm, run_transformers_disk
from .config import BenchConfig, Work, read_request
from .h2d import run_h2d
from .memory import run_inmemory, run_layer, run_overlap
from .read import run_read
from .stream import run_shape_stream, run_stream_no_prefetch, run_stream_prefetch

__all__ = ["VARIANTS", "run_child", "main"]

Variant = Callable[[BenchConfig, Work], dict]
VARIANTS: dict[str, Variant] = {
    "read": run_read, "h2d": run_h2d, "inmemory": run_inmemory, "overlap": run_overlap,
    "stream-prefetch": run_stream_prefetch, "stream-no-prefetch": run_stream_no_prefetch,
    "accelerate-disk": run_accelerate, "transformers-disk": run_transformers_disk, "airllm": run_airllm,
    "layer": run_layer, "shape-stream": run_shape_stream,
}


def run_child(variant: str, request: Path, result: Path) -> dict:
    """Run one variant on the request at ``request`` and write its result to ``result`` (only once it has
    succeeded: an exception leaves no file). Built in chapter 08."""
    c, work = read_request(request)
    measured = VARIANTS[variant](c, work)
    write_json(result, measured)
    return measured


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The child's command line: ``VARIANT REQUEST.json RESULT.json``; exit status 2 on a wrong one. Built in
    chapter 08."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3 or args[0] not in VARIANTS:
        print(f"usage: python -m helpers.bench.child {{{','.join(VARIANTS)}}} REQUEST.json RESULT.json",
              file=sys.stderr)
        return 2
    run_child(args[0], Path(args[1]), Path(args[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
