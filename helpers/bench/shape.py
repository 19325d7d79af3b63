"""The ``--shape`` mode: a model with a real model's exact shapes but only N decoder layers, streamed cold.

``shape_config`` is the model (``helpers.arithmetic.known_config`` with fewer layers); ``plan_shape`` checks
the disk has room before a byte is written; ``run_shape`` writes it, measures the shards' cold read bandwidth,
one layer's in-memory compute and the streamed passes, and sets them against the bound; ``extrapolate`` scales
the measured layers to all of the model's, beside the chapter's arithmetic. Built in chapter 08.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from helpers.memory import format_size
from helpers.meta import parse_dtype

from . import run as driver  # looked up at call time, so that a test can stand in for run_variant
from .config import BenchConfig, Work
from .read import best_read
from .report import print_shape

__all__ = ["DISK_MARGIN", "shape_config", "plan_shape", "extrapolate", "shape_report", "run_shape"]

if TYPE_CHECKING:
    from transformers import PretrainedConfig

DISK_MARGIN = 2**30  # free space kept beyond what the mode writes (plus 2 %)


def shape_config(shape: str, layers: int) -> "PretrainedConfig":
    """``known_config(shape)`` with only ``layers`` decoder layers: every other shape exactly the model's. Built
    in chapter 08."""
    from helpers.arithmetic import known_config

    config = known_config(shape)
    config.num_hidden_layers = layers
    return config


def plan_shape(config: "PretrainedConfig", dtype: str, source: str, workdir: Optional[Path]) -> dict:
    """What the ``--shape`` mode will write, checked against the disk before anything is: ``ValueError`` naming
    the bytes needed and free, and ``--workdir``, when the disk lacks the room. Also whether the model is bigger
    than RAM (the mode's point; a warning when not). Built in chapter 08."""
    import psutil

    from helpers.arithmetic import block_bytes

    weights = sum(block_bytes(config, dtype).values())
    written = weights * (2 if source == "split" else 1)  # a split is a second copy
    needed = written + written // 50 + DISK_MARGIN
    where = workdir if workdir is not None else Path(tempfile.gettempdir())
    free = shutil.disk_usage(where).free
    if needed > free:
        raise ValueError(f"not enough disk space in {where}: this run writes {format_size(written)} "
                         f"({config.num_hidden_layers} layers, {dtype}, --source {source}) and needs "
                         f"{format_size(needed)} with the margin, but {format_size(free)} is free; pass "
                         "--workdir DIR on a disk with more room, or fewer --layers")
    ram = psutil.virtual_memory().total
    return {"weights_bytes": weights, "written_bytes": written, "needed_bytes": needed, "disk_free": free,
            "ram_total": ram, "bigger_than_ram": weights > ram}


def extrapolate(shape: str, stream: dict, layer: dict, disk_bandwidth: Optional[float], dtype: str) -> dict:
    """All of ``shape``'s layers from the N measured: per-layer read and compute seconds (means over the streamed
    layers) x the model's layers, plus the embedding, norm and head as measured; beside the chapter's arithmetic
    (``block_bytes(known_config(shape), "fp16")``). Built in chapter 08."""
    from helpers.arithmetic import block_bytes, known_config

    full = known_config(shape)
    n = full.num_hidden_layers
    arith = block_bytes(full, "fp16")
    layers = [b for b in stream["blocks"] if b["block"].startswith("model.layers.")]
    others = [b for b in stream["blocks"] if not b["block"].startswith("model.layers.")]

    def mean(key: str) -> float:
        return sum(b[key] for b in layers) / len(layers)

    read = mean("read_seconds") * n + sum(b["read_seconds"] for b in others)
    compute = mean("compute_seconds") * n + sum(b["compute_seconds"] for b in others)
    nbytes = mean("bytes") * n + sum(b["bytes"] for b in others)
    out = {"layers": n, "layer_bytes": mean("bytes"), "layer_read_seconds": mean("read_seconds"),
           "layer_compute_seconds": mean("compute_seconds"), "bytes_per_pass": nbytes, "read_seconds": read,
           "compute_seconds": compute, "pass_seconds": max(read, compute),
           "arithmetic_fp16": {"layer_bytes": arith["model.layers.0"], "weights_bytes": sum(arith.values())},
           "dtype": dtype}
    if disk_bandwidth and "seconds" in layer:
        terms = {"disk": sum(arith.values()) / disk_bandwidth,
                 "compute": layer["seconds"] * n + sum(b["compute_seconds"] for b in others)}
        out.update(bound=max(terms.values()), bound_terms=terms)
    return out


def shape_report(c: BenchConfig, config: "PretrainedConfig", plan: dict, results: dict, written: float,
                 info: dict) -> dict:
    """The ``--shape`` mode's report: the plan, the results, the bound (max of bytes over the disk's bandwidth
    and N layers' compute plus the other blocks'), the peak RSS as a share of RAM, the extrapolation. Built in
    chapter 08."""
    disk = best_read(results)
    stream, layer = results["shape-stream"], results["layer"]
    report = {"mode": "shape", "shape": c.shape, "layers": config.num_hidden_layers,
              "config": json.loads(config.to_json_string()), "dtype": c.dtype, "batch": c.batch, "seq": c.seq,
              "passes": c.passes, "source": c.source, "read": c.read, "device": c.device, "shard_size": c.shard_size,
              **plan, "write_seconds": written, "machine": info, "disk_bandwidth": disk.get("bandwidth"),
              "results": results}
    if "error" in stream:
        return report
    report["rss_of_ram"] = stream["peak_rss"] / plan["ram_total"]
    if "error" not in disk and "error" not in layer:
        others = sum(b["compute_seconds"] for b in stream["blocks"] if not b["block"].startswith("model.layers."))
        terms = {"disk": stream["bytes_per_pass"] / disk["bandwidth"],
                 "compute": layer["seconds"] * config.num_hidden_layers + others}
        report.update(bound=max(terms.values()), bound_terms=terms,
                      stream_vs_bound=stream["seconds"] / max(terms.values()))
    report["extrapolation"] = extrapolate(c.shape, stream, layer, disk.get("bandwidth"), c.dtype)
    return report


def run_shape(c: BenchConfig, config: "PretrainedConfig", plan: dict, argv: Optional[Sequence[str]] = None) -> dict:
    """The ``--shape`` mode on ``config`` (``shape_config``, or a tiny one in the tests), after ``plan_shape``:
    write, measure, report, print; whatever it wrote is removed on any exit. Built in chapter 08."""
    from helpers.checkpoints import split_by_layer
    from helpers.models import synthetic_llama

    if not plan["bigger_than_ram"]:
        print(f"warning: the model ({format_size(plan['weights_bytes'])}) is not bigger than this machine's RAM "
              f"({format_size(plan['ram_total'])}); the mode's point is a model that is: use more --layers",
              flush=True)
    with driver.work_dir(c.workdir, "streaming-bench-shape-") as folder:
        work = Work(model=folder / "model", layers=folder / "layers" if c.source == "split" else None,
                    out=folder / "out")
        work.out.mkdir()
        info = driver.machine_info(folder, argv)
        print(f"writing {config.num_hidden_layers} layers of {c.shape} ({format_size(plan['weights_bytes'])} of "
              f"{c.dtype}) to {folder} ...", flush=True)
        t0 = time.perf_counter()
        synthetic_llama(work.model, config, dtype=parse_dtype(c.dtype), max_shard_size=c.shard_size, progress=False)
        if work.layers is not None:
            split_by_layer(work.model, work.layers, progress=False)
        written = time.perf_counter() - t0
        results = {}
        for v in ("read", "layer", "shape-stream"):
            print(f"measuring {v} ...", flush=True)
            if v == "read":  # the checkpoint's shards, once per method: each reads the big model whole
                measured = driver.run_variant(dataclasses.replace(c, repeat=1), dataclasses.replace(work, layers=None),
                                              v)
                results.update(driver.read_rows(measured))
            else:
                results[v] = driver.run_variant(c, work, v)
    report = shape_report(c, config, plan, results, written, info)
    print_shape(report)
    return report
