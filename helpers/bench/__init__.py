"""Chapter 08's benchmark: layer streaming against the disk's bound, two disk-offload anchors and AirLLM.

    python -m helpers.streaming_benchmark [--device cpu|cuda] [--size 2GB] [--small] [--batch 4] [--seq 16]
                                          [--rounds 3] [--source inplace|split] [--read direct|buffered|map]
                                          [--dtype fp32|bf16|fp16] [--json out.json]
    python -m helpers.streaming_benchmark --shape llama-2-70b --layers 16 [--passes 2] [--workdir DIR] [--json out.json]

(``python benchmarks/streaming.py`` in the repository runs the same.) It ships inside ``helpers`` so that a
reader who installed only the package, on Colab or Kaggle, runs the same benchmark as the book.

Writes a synthetic Llama (``helpers.models.synthetic_llama``) of at least ``--size`` to a temporary
directory, splits it by layer, and measures in one run, on the same model, prompt and batch, each in its
own subprocess (so each peak RSS is clean): the disk's cold read bandwidth for the layer files, five ways
(whole files with ``readinto``, safetensors and ``map``; block by block through ``helpers.reader.BlockReader``,
``direct`` and ``buffered``), each with the CPU seconds it cost; the in-memory forward time; the overlap floor
(that forward while a thread reads what a streamed pass reads, through the streamer's reader); ``LayerStreamer``
with and without prefetch (page cache dropped before each pass), reading in place from the checkpoint's shards
(``--source inplace``) or from the split (``--source split``), with ``--read``; two anchors with decoder layers
and lm_head on "disk": accelerate's disk offload (``load_checkpoint_and_dispatch``) and transformers' own
(``from_pretrained(device_map=..., offload_folder=...)``, which reads offloaded weights straight from the
safetensors shards); AirLLM if it is installed (``make bench-airllm``). Every variant runs once per round, the
rounds interleaved, and each variant's fastest round counts. It prints a table and the targets, writes JSON,
and deletes what it wrote.

``--shape llama-2-70b --layers N`` is the other mode: a synthetic model with Llama-2-70B's exact shapes
(``helpers.arithmetic.known_config``) but only N decoder layers, in bf16, bigger than this machine's RAM
from N = 16 on a 24 GB machine. It checks the disk has room before writing a byte, streams the model cold
in place (``--passes`` passes; the first warms up the code), measures the shards' cold read bandwidth and
one decoder layer's in-memory compute for the bound, and extrapolates to all 80 layers beside the chapter's
arithmetic. Whatever it wrote is removed on any exit, Ctrl-C and SIGTERM included; a ``--workdir`` you
give is kept (only the folder the run made inside it goes).

``--device cuda`` runs the same on a GPU: the in-memory model, the streamer and accelerate's disk offload
compute there, every pass is timed to the GPU's end (``torch.cuda.synchronize``) and the streamer's timeline
comes from CUDA events. One more variant measures the host-to-device bandwidth, pinned and pageable
(``helpers.reader.h2d_bandwidth``), so that the bound is max(bytes / disk bandwidth, bytes / pinned H2D
bandwidth, in-memory compute), each measured in the same run. Without CUDA it stops at once and says so.

The targets: streaming with prefetch at most ``TARGET_BOUND`` x the bound and ``TARGET_OVERLAP`` x the overlap
floor, its peak RSS within ``TARGET_RSS`` of the prediction; each disk-offload anchor at least
``TARGET_ANCHOR`` x slower than streaming, AirLLM ``TARGET_AIRLLM`` x (``ANCHORS``); in the ``--shape`` mode, the
streamer's peak RSS at most ``TARGET_RAM_SHARE`` of the machine's RAM.

The package: ``config`` (the options, a frozen ``BenchConfig``), one module per family of variants (``read``,
``memory``, ``stream``, ``anchors``, ``h2d``), ``child`` (one variant in its own process, its result a JSON
file), ``run`` (the driver and the default mode), ``shape`` (the ``--shape`` mode) and ``report`` (what it
prints, and the targets). The reports the book reads are committed in ``results/`` and read with ``committed``.
Built in chapter 08.
"""

from __future__ import annotations

from typing import Optional, Sequence

from helpers.tensorfiles import write_json

from .config import BenchConfig, parse, parser
from .report import (
    ANCHORS,
    TARGET_AIRLLM,
    TARGET_ANCHOR,
    TARGET_BOUND,
    TARGET_OVERLAP,
    TARGET_RAM_SHARE,
    TARGET_RSS,
    print_shape,
    print_table,
)
from .run import run_normal
from .shape import plan_shape, run_shape, shape_config

__all__ = ["main", "BenchConfig", "TARGET_BOUND", "TARGET_OVERLAP", "TARGET_RSS", "TARGET_ANCHOR", "TARGET_AIRLLM",
           "TARGET_RAM_SHARE", "ANCHORS", "print_table", "print_shape", "COMMITTED", "committed"]

COMMITTED = ("streaming-2gb.json", "llama-2-70b-16-layers.json")  # the runs the book reads, in helpers/bench/results


def committed(name: str) -> dict:
    """A committed benchmark report, shipped inside the package (``helpers/bench/results``): chapter 08 reads it
    from a checkout, a wheel or Colab alike, with no network. Built in chapter 08."""
    import json
    from importlib.resources import files

    if name not in COMMITTED:
        raise ValueError(f"no committed benchmark result {name!r}; there are {', '.join(COMMITTED)}")
    return json.loads(files("helpers.bench").joinpath("results", name).read_text())


def main(argv: Optional[Sequence[str]] = None, *, config=None) -> dict:
    """The benchmark's command line (``--help``): run the mode the options name, print its report, write it as
    JSON with ``--json``, and return it. ``config``: with ``--shape``, a transformers config to write instead of
    the shape's (the tests run the mode on a tiny model this way). Built in chapter 08."""
    p = parser(__doc__.split("\n")[0])
    c = parse(p, argv)
    if c.shape is None:
        report = run_normal(c, argv)
    else:
        model = config if config is not None else shape_config(c.shape, c.layers)
        try:
            plan = plan_shape(model, c.dtype, c.source, c.workdir)
        except ValueError as e:
            p.error(str(e))
        report = run_shape(c, model, plan, argv)
    if c.json:
        write_json(c.json, report)
    return report
