"""The driver: one child process per measurement, interleaved rounds, the best round, a work folder that goes.

``run_variant`` starts one child (``helpers.bench.child``) and reads the JSON file it leaves; ``best_round``
keeps each variant's fastest round; ``work_dir`` is the folder a run writes into, removed on any exit (Ctrl-C
and SIGTERM included); ``run_normal`` is the default mode from start to report; ``machine_info`` says where the
numbers came from. Built in chapter 08.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from helpers.memory import parse_size
from helpers.meta import parse_dtype

from .config import BIG, SMALL, BenchConfig, Work, make_config, write_request
from .read import best_read
from .report import ANCHORS, print_table

__all__ = ["ENTRY", "CHILD", "run_variant", "read_rows", "best_round", "raise_on_sigterm", "work_dir",
           "machine_info", "run_rounds", "normal_report", "run_normal"]

ENTRY = "helpers.streaming_benchmark"  # the command a report records (`python -m ENTRY ...`): the chapter's name
CHILD = "helpers.bench.child"  # each variant runs as `python -m CHILD VARIANT REQUEST.json RESULT.json`


def run_variant(c: BenchConfig, work: Work, variant: str) -> dict:
    """Measure ``variant`` in a child process of its own and return what it measured, read from the JSON file
    the child writes; ``{"error": <its last line of stderr>}`` when it fails (it then leaves no file). The
    request and result files are removed afterwards. Built in chapter 08."""
    request, result = work.out / f"{variant}.request.json", work.out / f"{variant}.result.json"
    result.unlink(missing_ok=True)  # a file left by an earlier round must not pass for this one's
    write_request(request, c, work)
    # the package's own folder first on the path, so that a checkout that was never installed runs too
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.run([sys.executable, "-m", CHILD, variant, str(request), str(result)], capture_output=True,
                              text=True, env=dict(os.environ, TQDM_DISABLE="1", PYTHONPATH=path))
        if proc.returncode or not result.is_file():
            last = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}, no output"]
            return {"error": last[-1][:200]}
        return json.loads(result.read_text())
    finally:
        request.unlink(missing_ok=True)
        result.unlink(missing_ok=True)


def read_rows(measured: dict) -> dict:
    """The read variant's result as report rows: ``{"read (readinto)": ..., "read (direct)": ...}``, or its
    failure as one row. Built in chapter 08."""
    if "error" in measured:
        return {"read (readinto)": measured}
    return {f"read ({name})": row for name, row in measured.items()}


def best_round(runs: list[dict]) -> dict:
    """One variant over the rounds: the fastest round's figures, the highest peak RSS and error of any round,
    and every round's seconds. A round that failed makes the variant fail. Built in chapter 08."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    best = dict(min(runs, key=lambda r: r["seconds"]), rounds=[r["seconds"] for r in runs])
    for key in ("peak_rss", "peak_cuda", "max_abs_diff"):
        if key in best:
            best[key] = max(r[key] for r in runs)
    return best


def raise_on_sigterm(signum, frame):
    """SIGTERM's handler inside ``work_dir``: unwinds like Ctrl-C, so every ``finally`` runs and
    ``subprocess.run`` kills its child. Built in chapter 08."""
    raise SystemExit(128 + signum)


@contextmanager
def work_dir(workdir: Optional[Path], prefix: str) -> Iterator[Path]:
    """A fresh folder for what a run writes (inside ``workdir``, else in the temp dir), removed on any exit:
    an error, Ctrl-C, or SIGTERM (turned into ``SystemExit`` while the block runs). ``workdir`` itself stays.
    Built in chapter 08."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=workdir))
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, raise_on_sigterm) if main_thread else None
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def machine_info(where: Path, argv: Optional[Sequence[str]]) -> dict:
    """CPU, cores, RAM, free disk, versions, the date (UTC) and the exact command line, for the JSON. Built in
    chapter 08."""
    import psutil
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    args = sys.argv[1:] if argv is None else list(argv)
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_total": psutil.virtual_memory().total,
            "disk_free": shutil.disk_usage(where).free, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join([Path(sys.executable).name, "-m", ENTRY, *map(str, args)])}


def run_rounds(c: BenchConfig, work: Work, variants: Sequence[str]) -> dict:
    """Every variant once per round, ``c.rounds`` rounds, interleaved (so a slow spell of a shared machine hits
    every variant alike); each row's best round (``best_round``). Built in chapter 08."""
    rounds = []
    for k in range(c.rounds):
        measured = {}
        for v in variants:
            print(f"round {k + 1}/{c.rounds}: measuring {v} ...", flush=True)
            r = run_variant(c, work, v)
            measured.update(read_rows(r) if v == "read" else {v: r})
        rounds.append(measured)
    names = list(dict.fromkeys(name for r in rounds for name in r))  # a read that failed in one round only
    return {name: best_round([r.get(name, {"error": "not measured in every round"}) for r in rounds])
            for name in names}


def normal_report(c: BenchConfig, fields: dict, results: dict, info: dict) -> dict:
    """The default mode's report from its results: the bound (max of the disk, compute and, on CUDA,
    host-to-device terms), streaming against it, the overlap floor, the anchors and the RSS prediction. Built in
    chapter 08."""
    from transformers import LlamaConfig

    from helpers.arithmetic import block_bytes
    from helpers.streaming import predicted_peak_bytes

    config = LlamaConfig(**fields)
    predicted = predicted_peak_bytes(config, c.batch, c.seq, c.dtype, read=c.read)
    disk, stream, h2d = best_read(results), results["stream-prefetch"], results.get("h2d", {})
    report = {"config": fields, "dtype": c.dtype, "batch": c.batch, "seq": c.seq, "rounds": c.rounds,
              "source": c.source, "read": c.read, "device": c.device,
              "device_name": torch.cuda.get_device_name() if c.device == "cuda" else "cpu",
              "weights_bytes": sum(block_bytes(config, c.dtype).values()),
              "disk_bandwidth": disk.get("bandwidth"), "results": results, "predicted_stream_rss": predicted,
              "machine": info}
    if c.device == "cuda":
        report.update(h2d_bandwidth=h2d.get("pinned_bandwidth"), h2d_pageable_bandwidth=h2d.get("pageable_bandwidth"))
    needed = ("stream-prefetch", "inmemory", *(["h2d"] if c.device == "cuda" else []))
    if any("error" in results[k] for k in needed) or "error" in disk:
        return report
    terms = {"disk": stream["bytes_per_pass"] / disk["bandwidth"], "compute": results["inmemory"]["seconds"]}
    if c.device == "cuda":
        terms["h2d"] = stream["bytes_per_pass"] / h2d["pinned_bandwidth"]
    bound = max(terms.values())
    report.update(bound=bound, bound_terms=terms, stream_vs_bound=stream["seconds"] / bound)
    if c.device == "cpu":  # CPU RSS is the streamer's memory; on CUDA it is the GPU's, beside the prediction
        report["rss_vs_predicted"] = stream["peak_rss"] / predicted
    elif "peak_cuda" in stream:
        report["cuda_peak_vs_predicted"] = stream["peak_cuda"] / predicted
    if "error" not in results["overlap"]:
        report["stream_vs_overlap"] = stream["seconds"] / results["overlap"]["seconds"]
    for name, (key, _) in ANCHORS.items():
        if "seconds" in results.get(name, {}):
            report[key] = results[name]["seconds"] / stream["seconds"]
    return report


def run_normal(c: BenchConfig, argv: Optional[Sequence[str]] = None) -> dict:
    """The default mode: the model of ``--size`` (or ``--small``) written and split, every variant measured in
    interleaved rounds, the report printed and returned; what it wrote is removed. Built in chapter 08."""
    from transformers import LlamaConfig

    from helpers.checkpoints import split_by_layer
    from helpers.models import synthetic_llama

    fields = make_config(SMALL if c.small else BIG, parse_size("250MB" if c.small else c.size), c.dtype)
    with work_dir(c.workdir, "streaming-bench-") as folder:
        work = Work(model=folder / "model", layers=folder / "layers", out=folder / "out")
        work.out.mkdir(parents=True, exist_ok=True)
        info = machine_info(folder, argv)
        synthetic_llama(work.model, LlamaConfig(**fields), dtype=parse_dtype(c.dtype), max_shard_size="1GB",
                        progress=False)
        split_by_layer(work.model, work.layers, progress=False)
        variants = ["read", *(["h2d"] if c.device == "cuda" else []), "inmemory", "overlap", "stream-prefetch",
                    "stream-no-prefetch", "accelerate-disk", "transformers-disk"]
        if importlib.util.find_spec("airllm") is not None:
            variants.append("airllm")
        results = run_rounds(c, work, variants)
    report = normal_report(c, fields, results, info)
    print_table(report)
    return report
