"""Chapter 08's benchmark: layer streaming against the disk's bound, two disk-offload anchors and AirLLM.

    python -m helpers.streaming_benchmark [--device cpu|cuda] [--size 2GB] [--small] [--batch 4] [--seq 16]
                                          [--rounds 3] [--source inplace|split] [--json out.json]
    python -m helpers.streaming_benchmark --shape llama-2-70b --layers 16 [--passes 2] [--workdir DIR] [--json out.json]

(``python benchmarks/streaming.py`` in the repository runs the same.) It ships inside ``helpers`` so that a
reader who installed only the package, on Colab or Kaggle, runs the same benchmark as the book.

Writes a synthetic Llama (``helpers.models.synthetic_llama``) of at least ``--size`` to a temporary
directory, splits it by layer, and measures in one run, on the same model, prompt and batch, each in its
own subprocess (so each peak RSS is clean): the disk's cold read bandwidth for the layer files; the
in-memory forward time; the overlap floor (that forward while a thread reads the files); ``LayerStreamer``
with and without prefetch (page cache dropped before each pass), reading in place from the checkpoint's
shards (``--source inplace``) or from the split (``--source split``); two anchors with decoder layers and
lm_head on "disk": accelerate's disk offload (``load_checkpoint_and_dispatch``) and transformers' own
(``from_pretrained(device_map=..., offload_folder=...)``, which reads offloaded weights straight from the
safetensors shards); AirLLM if it is installed (``make bench-airllm``). Every variant runs once per round,
the rounds interleaved, and each variant's fastest round counts. It prints a table and the targets, writes
JSON, and deletes what it wrote.

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
(``helpers.streaming.h2d_bandwidth``), so that the bound is max(bytes / disk bandwidth, bytes / pinned H2D
bandwidth, in-memory compute), each measured in the same run. Without CUDA it stops at once and says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional

import torch

from helpers.memory import format_size, measure, parse_size
from helpers.meta import parse_dtype
from helpers.tensorfiles import (block_layout, drop_page_cache, map_safetensors, read_layer_index, read_safetensors,
                                 weight_map, write_json)

COMPUTE_DTYPES = ("fp32", "bf16")  # --dtype: what the weights are stored and computed in (helpers.meta.parse_dtype)
BIG = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=16,
           vocab_size=32000, tie_word_embeddings=False)
SMALL = dict(hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=12,
             vocab_size=16000, tie_word_embeddings=False)
DEVICES = ("cpu", "cuda")  # --device
SOURCES = ("inplace", "split")  # --source: what LayerStreamer reads, the checkpoint's shards or the per-layer split
DEFAULT_SOURCE = "inplace"
SHAPES = ("llama-2-70b",)  # --shape: helpers.arithmetic.known_config names whose exact shapes the mode writes
SHAPE_SHARD_SIZE = "2GB"  # --shape mode: shards of a few GB, as published checkpoints have
DISK_MARGIN = 2**30  # --shape mode: free space kept beyond what it writes (plus 2 %)
# streaming: at most this many x the bound and x the overlap floor; its peak RSS within this share of the prediction
TARGET_BOUND, TARGET_OVERLAP, TARGET_RSS = 1.10, 1.05, 0.15
TARGET_ANCHOR, TARGET_AIRLLM = 1.5, 5.0  # each disk-offload anchor, and AirLLM: at least this many x slower
TARGET_RAM_SHARE = 0.25  # --shape mode: the streamer's peak RSS at most this share of the machine's RAM
MODULE = "helpers.streaming_benchmark"  # each variant runs as `python -m MODULE --variant ...`


def make_config(base: dict, size: int, dtype: str) -> dict:
    """Enough decoder layers on ``base`` for the weights to reach ``size`` bytes."""
    from helpers.arithmetic import block_bytes
    from transformers import LlamaConfig

    one = block_bytes(LlamaConfig(**base, num_hidden_layers=1), dtype)
    layer, rest = one["model.layers.0"], sum(v for k, v in one.items() if k != "model.layers.0")
    return dict(base, num_hidden_layers=max(2, math.ceil((size - rest) / layer)), max_position_embeddings=4096)


def files_of(directory: Path) -> list[Path]:
    """The files a streamer reads from ``directory``: a split's layer files, or a checkpoint's shards."""
    layout = block_layout(directory)
    return sorted({piece.path for pieces in layout.pieces.values() for piece in pieces})


def _stream_dir(a) -> Path:
    """What LayerStreamer reads: the checkpoint itself (``--source inplace``) or its per-layer split."""
    return a.model if a.source == "inplace" else a.layer_dir


# --------------------------------------------------------------------------- variants (one per subprocess)

def run_disk(a) -> dict:
    """Cold read of every layer file, or of the checkpoint's shards where there is no split (``--shape`` mode),
    pages dropped first, three ways, interleaved; best of ``--repeat`` each."""
    from safetensors.torch import load_file

    files = files_of(a.layer_dir or a.model)
    nbytes = sum(f.stat().st_size for f in files)
    buf = torch.empty(max(f.stat().st_size for f in files), dtype=torch.uint8)

    def mmap_and_touch(f):  # load_file maps the file; touching one byte per 4 KiB page makes it really read
        for t in load_file(f).values():
            t.reshape(-1).view(torch.uint8)[::4096].sum()

    readers = {"readinto": lambda f: read_safetensors(f, buf), "safetensors": mmap_and_touch,
               "map": map_safetensors}
    times: dict[str, list[float]] = {k: [] for k in readers}
    for _ in range(a.repeat):
        for name, read in readers.items():
            drop_page_cache(*files)
            t0 = time.perf_counter()
            for f in files:
                read(f)
            times[name].append(time.perf_counter() - t0)
    drop_page_cache(*files)
    return {name: {"seconds": min(t), "bytes": nbytes, "bandwidth": nbytes / min(t)} for name, t in times.items()}


def _prompt(a, vocab: int) -> torch.Tensor:
    return torch.randint(vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))


def _sync(a) -> None:
    """On CUDA, wait for the GPU: a pass has ended when its kernels have, not when the host launched them."""
    if a.device == "cuda":
        torch.cuda.synchronize()


def _timed_passes(a, one_pass, files) -> tuple[list[float], object]:
    times, out = [], None
    for k in range(a.repeat + 1):  # the first pass warms up (allocations, thread start) and is not counted
        if files:
            drop_page_cache(*files)
        _sync(a)
        t0 = time.perf_counter()
        out = one_pass()
        _sync(a)
        if k:
            times.append(time.perf_counter() - t0)
    return times, out


def _cpu_seconds() -> dict:
    """System-wide CPU seconds so far by kind, from /proc/stat (Linux); {} elsewhere."""
    try:
        fields = open("/proc/stat").readline().split()[1:9]
    except OSError:
        return {}
    tick = os.sysconf("SC_CLK_TCK")
    return {k: int(v) / tick for k, v in zip("user nice system idle iowait irq softirq steal".split(), fields)}


def run_h2d(a) -> dict:
    """Host-to-device bandwidth (CUDA only), pinned and pageable, for copies the size of the biggest layer file."""
    from helpers.streaming import h2d_bandwidth

    nbytes = max(f.stat().st_size for f in files_of(a.layer_dir))
    pinned = h2d_bandwidth(nbytes, pinned=True, repeat=max(3, a.repeat))
    pageable = h2d_bandwidth(nbytes, pinned=False, repeat=max(3, a.repeat))
    return {"bytes": nbytes, "pinned_bandwidth": pinned, "pageable_bandwidth": pageable,
            "seconds": nbytes / pinned}


def _extra(a, m) -> dict:
    """The GPU's peak memory in a measure() block, on CUDA."""
    return {"peak_cuda": m.cuda_peak_bytes} if a.device == "cuda" and m.cuda_peak_bytes is not None else {}


def run_inmemory(a) -> dict:
    from transformers import AutoModelForCausalLM

    with measure() as m:
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=parse_dtype(a.dtype)).to(a.device).eval()
        ids = _prompt(a, model.config.vocab_size).to(a.device)
        with torch.inference_mode():
            times, logits = _timed_passes(a, lambda: model(ids).logits, [])
    torch.save(logits[:, -1].float().cpu().clone(), a.out / "inmemory.pt")
    return {"seconds": min(times), "times": times, "peak_rss": m.cpu_peak_bytes, **_extra(a, m)}


def run_overlap(a) -> dict:
    """The in-memory forward while another thread cold-reads the files a streamed pass reads, as the streamer
    does (the embedding excepted: a pass reads only its looked-up rows): what perfect overlap of this reading
    with this compute gives on this machine. /proc/stat says what the reading cost the CPUs."""
    import threading

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=parse_dtype(a.dtype)).to(a.device).eval()
    ids = _prompt(a, model.config.vocab_size).to(a.device)
    index = read_layer_index(a.layer_dir)
    cuda = a.device == "cuda"
    files = [a.layer_dir / index.files[b] for b in index.blocks
             if b in index.files and (cuda or b != "model.embed_tokens")]
    pinned = torch.empty(max(f.stat().st_size for f in files), dtype=torch.uint8, pin_memory=cuda)

    def read_all():
        for f in files:
            if cuda:  # as the streamer on CUDA: readinto a pinned buffer (the whole embedding too)
                read_safetensors(f, pinned)
            else:
                map_safetensors(f)  # released before the next file is mapped, as in the streamer

    with torch.inference_mode():
        model(ids)  # warm up
        runs = []
        for _ in range(a.repeat):
            drop_page_cache(*files)
            reader = threading.Thread(target=read_all)
            _sync(a)
            c0, t0 = _cpu_seconds(), time.perf_counter()
            reader.start()
            model(ids)
            _sync(a)
            computed = time.perf_counter() - t0
            reader.join()
            runs.append({"seconds": time.perf_counter() - t0, "compute_seconds": computed,
                         **{f"{k}_seconds": v - c0[k] for k, v in _cpu_seconds().items() if k in ("steal", "system")}})
    drop_page_cache(*files)
    return min(runs, key=lambda r: r["seconds"])


def run_stream(a) -> dict:
    from helpers.streaming import LayerStreamer

    files = files_of(_stream_dir(a))
    with LayerStreamer(_stream_dir(a), device=a.device, dtype=a.dtype, prefetch=a.variant == "stream-prefetch",
                       drop_page_cache=True, progress=False) as st:
        ids = _prompt(a, st.config.vocab_size)
        st.forward(ids)  # one pass first, outside the measurement: imports, the reader thread, the allocator
        with measure() as m:
            times, logits = _timed_passes(a, lambda: st.forward(ids), files)
    ref = torch.load(a.out / "inmemory.pt", weights_only=True)
    return {"seconds": min(times), "times": times, "peak_rss": m.cpu_peak_bytes, "bytes_per_pass": st.bytes_per_pass,
            "source": a.source, "max_abs_diff": float((logits[:, -1] - ref).abs().max()), "timeline": st.timeline,
            **_extra(a, m)}


def _disk_map(a, config) -> dict:
    """Decoder layers and lm_head on "disk"; the embedding, rotary embedding and final norm where every
    computation is (cpu, or GPU 0)."""
    main = 0 if a.device == "cuda" else "cpu"
    return {"model.embed_tokens": main, "model.rotary_emb": main, "model.norm": main, "lm_head": "disk",
            **{f"model.layers.{i}": "disk" for i in range(config.num_hidden_layers)}}


def _time_offloaded(a, load) -> dict:
    """Load a disk-offloaded model with ``load(config, offload_folder)`` and time cold passes of it (every file it
    reads dropped from the page cache first): the protocol both disk-offload anchors share."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(a.model)
    offload = Path(tempfile.mkdtemp(prefix="offload-", dir=a.out))
    with measure() as m:
        model = load(config, offload).eval()
        ids = _prompt(a, config.vocab_size).to(a.device)
        files = files_of(a.model) + [p for p in offload.rglob("*") if p.is_file()]
        with torch.inference_mode():
            times, logits = _timed_passes(a, lambda: model(ids).logits, files)
    ref = torch.load(a.out / "inmemory.pt", weights_only=True)
    offloaded = sum(p.stat().st_size for p in offload.rglob("*") if p.is_file())
    return {"seconds": min(times), "times": times, "peak_rss": m.cpu_peak_bytes, "offload_folder_bytes": offloaded,
            "shards_mapped": _mapped(files_of(a.model)),
            "max_abs_diff": float((logits[:, -1].float().cpu() - ref).abs().max()), **_extra(a, m)}


def run_accelerate(a) -> dict:
    """accelerate's disk offload: ``load_checkpoint_and_dispatch`` with decoder layers and lm_head on "disk"
    (it writes those weights to its offload folder first)."""
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch
    from transformers import AutoModelForCausalLM

    def load(config, offload):
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=parse_dtype(a.dtype))
        return load_checkpoint_and_dispatch(model, str(a.model), device_map=_disk_map(a, config),
                                            offload_folder=str(offload), dtype=parse_dtype(a.dtype))

    return _time_offloaded(a, load)


def run_transformers_disk(a) -> dict:
    """transformers' own disk offload: ``from_pretrained`` with decoder layers and lm_head on "disk". transformers
    5 reads such weights straight from the safetensors shards (``offload_folder_bytes``: what it wrote, 0 expected)."""
    from transformers import AutoModelForCausalLM

    return _time_offloaded(a, lambda config, offload: AutoModelForCausalLM.from_pretrained(
        a.model, device_map=_disk_map(a, config), offload_folder=str(offload), dtype=parse_dtype(a.dtype)))


def _mapped(files: list[Path]) -> Optional[int]:
    """How many of ``files`` this process has mapped now (/proc/self/maps; None elsewhere). Pages of a mapped file
    survive ``drop_page_cache`` (the kernel does not drop pages a process maps), so such passes are not all cold."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    return sum(str(f.resolve()) in maps for f in files)


def run_airllm(a) -> dict:
    from airllm import AutoModel  # optional extra, never a requirement

    shards = a.out / "airllm"
    from helpers.models import book_model_dir
    for name in ("tokenizer.json", "tokenizer_config.json"):  # AirLLM loads a tokenizer; lend it the book model's
        if not (a.model / name).exists():
            shutil.copyfile(book_model_dir() / name, a.model / name)
    model = AutoModel.from_pretrained(str(a.model), device="cuda:0" if a.device == "cuda" else "cpu",
                                      dtype=parse_dtype(a.dtype),
                                      layer_shards_saving_path=str(shards))  # splits the model once, untimed
    ids = _prompt(a, model.config.vocab_size).to(a.device)
    files = [p for p in shards.rglob("*") if p.is_file()]
    with measure() as m:
        with torch.inference_mode():
            times, out = _timed_passes(a, lambda: model(ids, use_cache=False).logits, files)
    ref = torch.load(a.out / "inmemory.pt", weights_only=True)
    return {"seconds": min(times), "times": times, "peak_rss": m.cpu_peak_bytes,
            "max_abs_diff": float((out[:, -1].float().cpu() - ref).abs().max())}


# --------------------------------------------------------------------------- the --shape mode's variants

def run_layer(a) -> dict:
    """One decoder layer's in-memory forward for the benchmark's batch: its weights loaded from the checkpoint
    into memory, timed best of ``--repeat`` after a warm-up. Times ``--layers`` is the bound's compute term."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.masking_utils import create_causal_mask

    config = AutoConfig.from_pretrained(a.model)
    config.num_hidden_layers = 1
    dtype = parse_dtype(a.dtype)
    root, names = weight_map(a.model)
    prefix, state = "model.layers.0.", {}
    for shard in sorted({f for n, f in names.items() if n.startswith(prefix)}):
        with safe_open(root / shard, framework="pt") as f:
            state.update({n[len(prefix):]: f.get_tensor(n).to(dtype) for n in f.keys() if n.startswith(prefix)})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    layer = model.model.layers[0]
    layer.load_state_dict(state, strict=True, assign=True)
    layer.to(a.device)
    rotary = type(model.model.rotary_emb)(config=model.config).to(a.device)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(a.batch, a.seq, config.hidden_size, generator=gen).to(dtype).to(a.device)
    position_ids = torch.arange(a.seq, device=a.device)[None]
    with torch.inference_mode():
        mask = create_causal_mask(config=model.config, inputs_embeds=hidden, attention_mask=None, cache=None,
                                  position_ids=position_ids)
        position_embeddings = rotary(hidden, position_ids=position_ids)
        times, _ = _timed_passes(a, lambda: layer(hidden, attention_mask=mask, position_ids=position_ids,
                                                  position_embeddings=position_embeddings), [])
    return {"seconds": min(times), "times": times, "bytes": sum(t.nbytes for t in state.values())}


def run_shape_stream(a) -> dict:
    """``LayerStreamer`` with prefetch, cold, ``--passes`` passes: each pass's time and per-block bytes, read and
    compute seconds (from ``st.timeline``), and the process's peak RSS, whole and anonymous."""
    from helpers.memory import rss_split
    from helpers.streaming import LayerStreamer

    files = files_of(_stream_dir(a))
    passes = []
    with LayerStreamer(_stream_dir(a), device=a.device, dtype=a.dtype, prefetch=True, drop_page_cache=True,
                       progress=False) as st:
        ids = _prompt(a, st.config.vocab_size)
        split = rss_split() or {}
        with measure() as m:
            for _ in range(a.passes):
                drop_page_cache(*files)
                _sync(a)
                t0 = time.perf_counter()
                st.forward(ids)
                _sync(a)
                seconds = time.perf_counter() - t0
                blocks = [{"block": r["block"], "bytes": r["bytes"], "read_seconds": r["read_end"] - r["read_start"],
                           "compute_seconds": r["compute_end"] - r["compute_start"]} for r in st.timeline]
                passes.append({"seconds": seconds, "bytes": st.bytes_per_pass, "blocks": blocks})
    counted = passes[1:] or passes  # the first pass warms up the code (the disk is cold in every pass)
    best = min(counted, key=lambda r: r["seconds"])
    anon = None if m.peak_anon_bytes is None or "anon" not in split else split["anon"] + m.peak_anon_bytes
    return {"seconds": best["seconds"], "bytes_per_pass": best["bytes"], "blocks": best["blocks"],
            "times": [r["seconds"] for r in passes], "peak_rss": m.cpu_start_bytes + m.cpu_peak_bytes,
            "peak_rss_increase": m.cpu_peak_bytes, "peak_anon_rss": anon, "source": a.source, **_extra(a, m)}


VARIANTS = {"read": run_disk, "h2d": run_h2d, "inmemory": run_inmemory, "overlap": run_overlap,
            "stream-prefetch": run_stream, "stream-no-prefetch": run_stream, "accelerate-disk": run_accelerate,
            "transformers-disk": run_transformers_disk, "airllm": run_airllm, "layer": run_layer,
            "shape-stream": run_shape_stream}
ANCHORS = {"accelerate-disk": ("accelerate_vs_stream", TARGET_ANCHOR),
           "transformers-disk": ("transformers_vs_stream", TARGET_ANCHOR),
           "airllm": ("airllm_vs_stream", TARGET_AIRLLM)}  # variant -> (report key, how many x slower it should be)


# --------------------------------------------------------------------------- the driver

def best_round(runs: list[dict]) -> dict:
    """One variant over the rounds: the fastest round's figures, the highest peak RSS and error of any round,
    and every round's seconds. A round that failed makes the variant fail."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    best = dict(min(runs, key=lambda r: r["seconds"]), rounds=[r["seconds"] for r in runs])
    for key in ("peak_rss", "peak_cuda", "max_abs_diff"):
        if key in best:
            best[key] = max(r[key] for r in runs)
    return best


def run_variant(a, variant: str) -> dict:
    cmd = [sys.executable, "-m", MODULE, "--variant", variant, "--model", str(a.model), "--out", str(a.out),
           "--batch", str(a.batch), "--seq", str(a.seq), "--dtype", a.dtype, "--repeat", str(a.repeat),
           "--device", a.device, "--source", a.source, "--passes", str(a.passes),
           *(["--layer-dir", str(a.layer_dir)] if a.layer_dir else [])]
    # the package's own folder first on the path, so that a checkout that was never installed runs too
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1", PYTHONPATH=path))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(lines[-1][len("RESULT "):])


def _raise_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: every finally runs, subprocess.run kills its child


@contextmanager
def work_dir(workdir: Optional[Path], prefix: str) -> Iterator[Path]:
    """A fresh folder for what a run writes (inside ``workdir``, else in the temp dir), removed on any exit:
    an error, Ctrl-C, or SIGTERM (turned into ``SystemExit`` while the block runs). ``workdir`` itself stays."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=workdir))
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm) if main_thread else None
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def run_normal(a, argv: Optional[list] = None) -> dict:
    """The default mode: the model of ``--size`` (or ``--small``), every variant, interleaved rounds."""
    size = parse_size("250MB" if a.small else a.size)
    from helpers.arithmetic import block_bytes
    from helpers.checkpoints import split_by_layer
    from helpers.models import synthetic_llama
    from helpers.streaming import predicted_peak_bytes
    from transformers import LlamaConfig

    fields = make_config(SMALL if a.small else BIG, size, a.dtype)
    config = LlamaConfig(**fields)
    with work_dir(a.workdir, "streaming-bench-") as work:
        a.model, a.layer_dir, a.out = work / "model", work / "layers", work / "out"
        a.out.mkdir(parents=True, exist_ok=True)
        info = machine_info(work, argv)
        synthetic_llama(a.model, config, dtype=parse_dtype(a.dtype), max_shard_size="1GB", progress=False)
        split_by_layer(a.model, a.layer_dir, progress=False)
        variants = ["read", *(["h2d"] if a.device == "cuda" else []), "inmemory", "overlap", "stream-prefetch",
                    "stream-no-prefetch", "accelerate-disk", "transformers-disk"]
        if importlib.util.find_spec("airllm") is not None:
            variants.append("airllm")
        rounds = []
        for k in range(a.rounds):  # interleaved, so a slow spell of a shared machine hits every variant alike
            measured = {}
            for v in variants:
                print(f"round {k + 1}/{a.rounds}: measuring {v} ...", flush=True)
                r = run_variant(a, v)
                if v == "read":
                    measured.update({f"read ({name})": x for name, x in r.items()} if "error" not in r
                                    else {"read (readinto)": r})
                else:
                    measured[v] = r
            rounds.append(measured)
        results = {name: best_round([r[name] for r in rounds]) for name in rounds[0]}
    blocks = block_bytes(config, a.dtype)
    predicted = predicted_peak_bytes(config, a.batch, a.seq, a.dtype)
    disk = _best_read(results)
    stream = results["stream-prefetch"]
    h2d = results.get("h2d", {})
    report = {"config": fields, "dtype": a.dtype, "batch": a.batch, "seq": a.seq, "rounds": a.rounds,
              "source": a.source, "device": a.device,
              "device_name": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
              "weights_bytes": sum(blocks.values()),
              "disk_bandwidth": disk.get("bandwidth"), "results": results, "predicted_stream_rss": predicted,
              "machine": info}
    if a.device == "cuda":
        report.update(h2d_bandwidth=h2d.get("pinned_bandwidth"), h2d_pageable_bandwidth=h2d.get("pageable_bandwidth"))
    failed = [k for k in ("stream-prefetch", "inmemory", *(["h2d"] if a.device == "cuda" else []))
              if "error" in results[k]]
    if not failed and "error" not in disk:
        terms = {"disk": stream["bytes_per_pass"] / disk["bandwidth"], "compute": results["inmemory"]["seconds"]}
        if a.device == "cuda":
            terms["h2d"] = stream["bytes_per_pass"] / h2d["pinned_bandwidth"]
        bound = max(terms.values())
        report.update(bound=bound, bound_terms=terms, stream_vs_bound=stream["seconds"] / bound)
        if a.device == "cpu":  # CPU RSS is the streamer's memory; on CUDA it is the GPU's, beside the prediction
            report["rss_vs_predicted"] = stream["peak_rss"] / predicted
        elif "peak_cuda" in stream:
            report["cuda_peak_vs_predicted"] = stream["peak_cuda"] / predicted
        if "error" not in results["overlap"]:
            report["stream_vs_overlap"] = stream["seconds"] / results["overlap"]["seconds"]
        for name, (key, _) in ANCHORS.items():
            if "seconds" in results.get(name, {}):
                report[key] = results[name]["seconds"] / stream["seconds"]
    print_table(report)
    return report


def _best_read(results: dict) -> dict:
    """The fastest of the cold-read variants (``read (...)``), or an error."""
    return max((r for k, r in results.items() if k.startswith("read") and "error" not in r),
               key=lambda r: r["bandwidth"], default={"error": "no read"})


def shape_config(shape: str, layers: int):
    """``known_config(shape)`` with only ``layers`` decoder layers: every other shape exactly the model's."""
    from helpers.arithmetic import known_config

    config = known_config(shape)
    config.num_hidden_layers = layers
    return config


def plan_shape(config, dtype: str, source: str, workdir: Optional[Path]) -> dict:
    """What the ``--shape`` mode will write, checked against the disk before anything is: ``ValueError`` naming
    the bytes needed and free, and ``--workdir``, when the disk lacks the room. Also whether the model is bigger
    than RAM (the mode's point; a warning when not)."""
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


def machine_info(where: Path, argv: Optional[list]) -> dict:
    """CPU, cores, RAM, free disk, versions, the date (UTC) and the exact command line, for the JSON."""
    import psutil
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    args = sys.argv[1:] if argv is None else list(argv)
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_total": psutil.virtual_memory().total,
            "disk_free": shutil.disk_usage(where).free, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join([Path(sys.executable).name, "-m", MODULE, *map(str, args)])}


def extrapolate(shape: str, stream: dict, layer: dict, disk_bandwidth: Optional[float], dtype: str) -> dict:
    """All of ``shape``'s layers from the N measured: per-layer read and compute seconds (means over the streamed
    layers) x the model's layers, plus the embedding, norm and head as measured; beside the chapter's arithmetic
    (``block_bytes(known_config(shape), "fp16")``)."""
    from helpers.arithmetic import block_bytes, known_config

    full = known_config(shape)
    n = full.num_hidden_layers
    arith = block_bytes(full, "fp16")
    layers = [b for b in stream["blocks"] if b["block"].startswith("model.layers.")]
    others = [b for b in stream["blocks"] if not b["block"].startswith("model.layers.")]
    mean = lambda key: sum(b[key] for b in layers) / len(layers)  # noqa: E731
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


def run_shape(a, config, plan: dict, argv: Optional[list] = None) -> dict:
    """The ``--shape`` mode on ``config`` (``shape_config``, or a tiny one in the tests), after ``plan_shape``."""
    from helpers.checkpoints import split_by_layer
    from helpers.models import synthetic_llama

    if not plan["bigger_than_ram"]:
        print(f"warning: the model ({format_size(plan['weights_bytes'])}) is not bigger than this machine's RAM "
              f"({format_size(plan['ram_total'])}); the mode's point is a model that is: use more --layers",
              flush=True)
    n = config.num_hidden_layers
    with work_dir(a.workdir, "streaming-bench-shape-") as work:
        a.model, a.out = work / "model", work / "out"
        a.layer_dir = work / "layers" if a.source == "split" else None
        a.out.mkdir()
        info = machine_info(work, argv)
        print(f"writing {n} layers of {a.shape} ({format_size(plan['weights_bytes'])} of {a.dtype}) to {work} ...",
              flush=True)
        t0 = time.perf_counter()
        synthetic_llama(a.model, config, dtype=parse_dtype(a.dtype), max_shard_size=a.shard_size, progress=False)
        if a.layer_dir:
            split_by_layer(a.model, a.layer_dir, progress=False)
        written = time.perf_counter() - t0
        results = {}
        for v in ("read", "layer", "shape-stream"):
            print(f"measuring {v} ...", flush=True)
            r = run_variant(argparse.Namespace(**{**vars(a), "layer_dir": None, "repeat": 1}) if v == "read" else a, v)
            if v == "read":
                results.update({f"read ({name})": x for name, x in r.items()} if "error" not in r
                               else {"read (readinto)": r})
            else:
                results[v] = r
    disk = _best_read(results)
    stream, layer = results["shape-stream"], results["layer"]
    report = {"mode": "shape", "shape": a.shape, "layers": n, "config": json.loads(config.to_json_string()),
              "dtype": a.dtype, "batch": a.batch, "seq": a.seq, "passes": a.passes, "source": a.source,
              "device": a.device, "shard_size": a.shard_size, **plan, "write_seconds": written, "machine": info,
              "disk_bandwidth": disk.get("bandwidth"), "results": results}
    if "error" not in stream:
        report["rss_of_ram"] = stream["peak_rss"] / plan["ram_total"]
        if "error" not in disk and "error" not in layer:
            others = sum(b["compute_seconds"] for b in stream["blocks"] if not b["block"].startswith("model.layers."))
            terms = {"disk": stream["bytes_per_pass"] / disk["bandwidth"], "compute": layer["seconds"] * n + others}
            report.update(bound=max(terms.values()), bound_terms=terms,
                          stream_vs_bound=stream["seconds"] / max(terms.values()))
        report["extrapolation"] = extrapolate(a.shape, stream, layer, disk.get("bandwidth"), a.dtype)
    print_shape(report)
    return report


def main(argv=None, *, config=None) -> dict:
    """The benchmark's command line (``--help``). ``config``: with ``--shape``, a config to write instead of the
    shape's (the tests run the mode on a tiny model this way)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="where the models compute (default cpu); cuda adds the host-to-device bandwidth to the bound")
    p.add_argument("--size", default="2GB", help="at least this many bytes of weights (default 2GB)")
    p.add_argument("--small", action="store_true", help="a ~250 MB model, for the chapter")
    p.add_argument("--shape", choices=SHAPES,
                   help="the other mode: a model with this model's exact shapes but only --layers decoder layers, "
                        "streamed cold in place (default: the --size model and every variant)")
    p.add_argument("--layers", type=int, default=16, help="with --shape: decoder layers to write (default 16)")
    p.add_argument("--passes", type=int, default=2,
                   help="with --shape: streamed passes, the first warming up the code (default 2)")
    p.add_argument("--shard-size", default=SHAPE_SHARD_SIZE,
                   help=f"with --shape: the checkpoint's shard size (default {SHAPE_SHARD_SIZE})")
    p.add_argument("--source", choices=SOURCES, default=DEFAULT_SOURCE,
                   help=f"what the streamer reads: the checkpoint's shards in place, or a per-layer split "
                        f"(default {DEFAULT_SOURCE})")
    p.add_argument("--batch", type=int, default=None, help="prompts per pass (default 4; 1 with --shape)")
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--dtype", choices=COMPUTE_DTYPES, default=None, help="default fp32; bf16 with --shape")
    p.add_argument("--repeat", type=int, default=2, help="timed passes per variant and round (best counts)")
    p.add_argument("--rounds", type=int, default=3, help="measure every variant this many times, interleaved")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the temporary model goes (default: a temp dir); kept, only what the run made in it "
                        "is removed")
    p.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--layer-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.batch = a.batch or (1 if a.shape else 4)
    a.dtype = a.dtype or ("bf16" if a.shape else "fp32")
    if min(a.batch, a.seq, a.repeat, a.rounds, a.passes, a.layers) < 1:
        p.error(f"--batch {a.batch}, --seq {a.seq}, --repeat {a.repeat}, --rounds {a.rounds}, --passes {a.passes} "
                f"and --layers {a.layers} must be >= 1")
    if a.device == "cuda" and not torch.cuda.is_available():  # at once: before a byte is written
        p.error("--device cuda, but torch sees no CUDA GPU here (torch.cuda.is_available() is False; torch "
                f"{torch.__version__}, built for CUDA {torch.version.cuda}); run with --device cpu, or on a GPU machine")
    if a.workdir is not None and not a.workdir.is_dir():
        p.error(f"--workdir {a.workdir} is not an existing folder")
    if a.variant:  # we are one measurement, in our own process
        print("RESULT " + json.dumps(VARIANTS[a.variant](a)))
        return {}
    if a.shape is None:
        report = run_normal(a, argv)
    else:
        if a.small:
            p.error("--small is the default mode's model; with --shape choose --layers")
        config = config if config is not None else shape_config(a.shape, a.layers)
        try:
            plan = plan_shape(config, a.dtype, a.source, a.workdir)
        except ValueError as e:
            p.error(str(e))
        report = run_shape(a, config, plan, argv)
    if a.json:
        write_json(a.json, report)
    return report


def _source(source: str) -> str:
    return "in place from the checkpoint's shards" if source == "inplace" else "from a per-layer split"


def _ok(condition: bool) -> str:
    return "met" if condition else "NOT met"


def print_shape(r: dict) -> None:
    """The --shape mode's summary: the streamed pass against its bound, memory against RAM, the 80-layer estimate."""
    m = r["machine"]
    print(f"\n{r['shape']} shapes, {r['layers']} decoder layers, {format_size(r['weights_bytes'])} of {r['dtype']} "
          f"weights ({'bigger' if r['bigger_than_ram'] else 'NOT bigger'} than {format_size(r['ram_total'])} of RAM); "
          f"batch {r['batch']} x {r['seq']} tokens; streamed cold {_source(r['source'])}; {m['cpu']}, {m['cores']} "
          f"cores; written in {r['write_seconds']:.0f} s")
    res = r["results"]
    for name, x in res.items():
        if "error" in x:
            print(f"{name:<22} failed: {x['error']}")
        elif name.startswith("read"):
            print(f"{name:<22}{x['seconds']:>9.2f} s   {x['bandwidth'] / 1e9:.2f} GB/s cold "
                  f"({format_size(x['bytes'])})")
        elif name == "layer":
            print(f"{'one layer in memory':<22}{x['seconds']:>9.2f} s   forward of one decoder layer "
                  f"({format_size(x['bytes'])})")
        else:
            times = ", ".join(f"{t:.1f}" for t in x["times"])
            print(f"{'streaming (prefetch)':<22}{x['seconds']:>9.2f} s   per pass ({times} s; the first warms up), "
                  f"{format_size(x['bytes_per_pass'])} read, peak RSS {format_size(x['peak_rss'])}")
    if "bound" in r:
        t = r["bound_terms"]
        print(f"\nbound = max(bytes / disk bandwidth {t['disk']:.2f} s, {r['layers']} x one layer's compute + embed/"
              f"norm/head {t['compute']:.2f} s) = {r['bound']:.2f} s per pass")
        print(f"streaming with prefetch: {r['stream_vs_bound']:.2f} × the bound (target <= {TARGET_BOUND} ×: "
              f"{_ok(r['stream_vs_bound'] <= TARGET_BOUND)})")
    if "rss_of_ram" in r:
        print(f"streaming peak RSS {format_size(res['shape-stream']['peak_rss'])} = {r['rss_of_ram']:.3f} of RAM "
              f"(target <= {TARGET_RAM_SHARE}: {_ok(r['rss_of_ram'] <= TARGET_RAM_SHARE)})")
    x = r.get("extrapolation")
    if x:
        ar = x["arithmetic_fp16"]
        print(f"\nextrapolated to {x['layers']} layers: {format_size(x['bytes_per_pass'])} read per pass "
              f"(the chapter's arithmetic: {format_size(ar['weights_bytes'])} of weights, "
              f"{format_size(ar['layer_bytes'])} a layer; "
              f"measured {format_size(x['layer_bytes'])}); read {x['read_seconds']:.0f} s, compute "
              f"{x['compute_seconds']:.0f} s -> about {x['pass_seconds']:.0f} s per pass")
        if "bound" in x:
            print(f"  bound for {x['layers']} layers: max(disk {x['bound_terms']['disk']:.0f} s, compute "
                  f"{x['bound_terms']['compute']:.0f} s) = {x['bound']:.0f} s per pass")


def print_table(r: dict) -> None:
    """The table the chapter shows: one row per variant, then the targets."""
    device = r.get("device", "cpu")
    print(f"\nsynthetic Llama, {r['config']['num_hidden_layers']} layers, {format_size(r['weights_bytes'])} of "
          f"{r['dtype']} weights; batch {r['batch']} x {r['seq']} tokens; best of {r['rounds']} interleaved round(s); "
          f"streamed {_source(r.get('source', 'split'))}; computed on {r.get('device_name', device)}")
    print(f"{'variant':<22}{'s / pass':>12}{'vs bound':>10}{'peak RSS':>14}   note")
    bound = r.get("bound")
    for name, res in r["results"].items():
        if "error" in res:
            print(f"{name:<22}{'-':>12}{'-':>10}{'-':>14}   failed: {res['error']}")
            continue
        ratio = f"{res['seconds'] / bound:.2f} ×" if bound and not name.startswith(("read", "h2d")) else ""
        rss = format_size(res["peak_rss"]) if "peak_rss" in res else ""
        note = f"{res['bandwidth'] / 1e9:.2f} GB/s cold" if "bandwidth" in res else ""
        if "peak_cuda" in res:
            note = f"GPU peak {format_size(res['peak_cuda'])}"
        if name == "h2d":
            note = (f"host to GPU: pinned {res['pinned_bandwidth'] / 1e9:.2f} GB/s, pageable "
                    f"{res['pageable_bandwidth'] / 1e9:.2f} GB/s ({format_size(res['bytes'])} copies)")
        if name == "overlap":
            note = (f"in-memory forward while a thread reads ({res['compute_seconds']:.2f} s to the forward's end); "
                    f"host steal {res.get('steal_seconds', float('nan')):.2f} CPU-s")
        if "offload_folder_bytes" in res:
            note = (note + "; " if note else "") + f"wrote {format_size(res['offload_folder_bytes'])} to offload_folder"
        if res.get("shards_mapped"):
            note += f"; keeps {res['shards_mapped']} shard(s) mapped: their pages stay cached, passes not all cold"
        print(f"{name:<22}{res['seconds']:>10.2f} s{ratio:>10}{rss:>14}   {note}")
    if "airllm" not in r["results"]:
        print(f"{'airllm':<22}{'-':>12}{'-':>10}{'-':>14}   not installed (optional extra: make bench-airllm)")
    if bound is None:
        print("targets: not computed (a variant failed)")
        return
    if device == "cuda":
        t = r["bound_terms"]
        print(f"\nbound = max(bytes / disk bandwidth {t['disk']:.3f} s, bytes / pinned H2D bandwidth {t['h2d']:.3f} s, "
              f"in-memory compute {t['compute']:.3f} s) = {bound:.3f} s per pass")
    else:
        print(f"\nbound = max(bytes / disk bandwidth, in-memory compute) = {bound:.2f} s per pass")
    print(f"streaming with prefetch: {r['stream_vs_bound']:.2f} × the bound "
          f"(target <= {TARGET_BOUND} ×: {_ok(r['stream_vs_bound'] <= TARGET_BOUND)})")
    if "stream_vs_overlap" in r:
        print(f"  and {r['stream_vs_overlap']:.2f} × the overlap floor, the in-memory forward while reading the same "
              f"files: what perfect overlap gives on this machine (target <= {TARGET_OVERLAP} ×: "
              f"{_ok(r['stream_vs_overlap'] <= TARGET_OVERLAP)})")
    for name, (key, target) in ANCHORS.items():
        if key in r:
            print(f"{name} is {r[key]:.2f} × slower than streaming (target >= {target:g} ×: {_ok(r[key] >= target)})")
    if "cuda_peak_vs_predicted" in r:
        print(f"streaming GPU peak {format_size(r['results']['stream-prefetch']['peak_cuda'])} vs predicted "
              f"{format_size(r['predicted_stream_rss'])} (two consecutive blocks + activations): "
              f"{(r['cuda_peak_vs_predicted'] - 1) * 100:+.1f} % (no target on CUDA: the whole embedding is read "
              "there, not only the rows a pass looks up)")
    if "rss_vs_predicted" not in r:
        return
    print(f"streaming peak RSS {format_size(r['results']['stream-prefetch']['peak_rss'])} vs predicted "
          f"{format_size(r['predicted_stream_rss'])} (two consecutive blocks + activations): "
          f"{(r['rss_vs_predicted'] - 1) * 100:+.1f} % (target within ±{TARGET_RSS * 100:.0f} %: "
          f"{_ok(abs(r['rss_vs_predicted'] - 1) <= TARGET_RSS)})")


if __name__ == "__main__":
    main()
