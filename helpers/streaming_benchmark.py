"""Chapter 08's benchmark: layer streaming against the disk's bound, accelerate disk offload and AirLLM.

    python -m helpers.streaming_benchmark [--device cpu|cuda] [--size 2GB] [--small] [--batch 4] [--seq 16]
                                          [--rounds 3] [--json out.json]

(``python benchmarks/streaming.py`` in the repository runs the same.) It ships inside ``helpers`` so that a
reader who installed only the package, on Colab or Kaggle, runs the same benchmark as the book.

Writes a synthetic Llama (``helpers.models.synthetic_llama``) of at least ``--size`` to a temporary
directory, splits it by layer, and measures in one run, on the same model, prompt and batch, each in its
own subprocess (so each peak RSS is clean): the disk's cold read bandwidth for the layer files; the
in-memory forward time; the overlap floor (that forward while a thread reads the files); ``LayerStreamer``
with and without prefetch (page cache dropped before each pass); accelerate's disk offload
(``load_checkpoint_and_dispatch``, decoder layers and lm_head on "disk"); AirLLM if it is installed. Every
variant runs once per round, the rounds interleaved, and each variant's fastest round counts. It prints a
table and the targets, writes JSON, and deletes what it wrote.

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
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from helpers.memory import format_size, measure, parse_size
from helpers.meta import parse_dtype
from helpers.tensorfiles import drop_page_cache, map_safetensors, read_layer_index, read_safetensors, write_json

COMPUTE_DTYPES = ("fp32", "bf16")  # --dtype: what the weights are stored and computed in (helpers.meta.parse_dtype)
BIG = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=16,
           vocab_size=32000, tie_word_embeddings=False)
SMALL = dict(hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=12,
             vocab_size=16000, tie_word_embeddings=False)
DEVICES = ("cpu", "cuda")  # --device
TARGET_BOUND, TARGET_RSS = 1.15, 0.15
MODULE = "helpers.streaming_benchmark"  # each variant runs as `python -m MODULE --variant ...`


def make_config(base: dict, size: int, dtype: str) -> dict:
    """Enough decoder layers on ``base`` for the weights to reach ``size`` bytes."""
    from helpers.arithmetic import block_bytes
    from transformers import LlamaConfig

    one = block_bytes(LlamaConfig(**base, num_hidden_layers=1), dtype)
    layer, rest = one["model.layers.0"], sum(v for k, v in one.items() if k != "model.layers.0")
    return dict(base, num_hidden_layers=max(2, math.ceil((size - rest) / layer)), max_position_embeddings=4096)


def layer_files(layers: Path) -> list[Path]:
    return [layers / f for f in read_layer_index(layers).files.values()]


# --------------------------------------------------------------------------- variants (one per subprocess)

def run_disk(a) -> dict:
    """Cold read of every layer file (pages dropped first), three ways, interleaved; best of ``--repeat`` each."""
    from safetensors.torch import load_file

    files = layer_files(a.layers)
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

    nbytes = max(f.stat().st_size for f in layer_files(a.layers))
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
    index = read_layer_index(a.layers)
    cuda = a.device == "cuda"
    files = [a.layers / index.files[b] for b in index.blocks if b in index.files and (cuda or b != "model.embed_tokens")]
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

    files = layer_files(a.layers)
    with LayerStreamer(a.layers, device=a.device, dtype=a.dtype, prefetch=a.variant == "stream-prefetch",
                       drop_page_cache=True, progress=False) as st:
        ids = _prompt(a, st.config.vocab_size)
        st.forward(ids)  # one pass first, outside the measurement: imports, the reader thread, the allocator
        with measure() as m:
            times, logits = _timed_passes(a, lambda: st.forward(ids), files)
    ref = torch.load(a.out / "inmemory.pt", weights_only=True)
    return {"seconds": min(times), "times": times, "peak_rss": m.cpu_peak_bytes, "bytes_per_pass": st.bytes_per_pass,
            "max_abs_diff": float((logits[:, -1] - ref).abs().max()), "timeline": st.timeline, **_extra(a, m)}


def run_accelerate(a) -> dict:
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(a.model)
    offload = Path(tempfile.mkdtemp(prefix="offload-", dir=a.out))
    with measure() as m:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=parse_dtype(a.dtype))
        main = 0 if a.device == "cuda" else "cpu"  # where the resident modules and every computation are
        device_map = {"model.embed_tokens": main, "model.rotary_emb": main, "model.norm": main, "lm_head": "disk",
                      **{f"model.layers.{i}": "disk" for i in range(config.num_hidden_layers)}}
        model = load_checkpoint_and_dispatch(model, str(a.model), device_map=device_map, offload_folder=str(offload),
                                             dtype=parse_dtype(a.dtype)).eval()
        ids = _prompt(a, config.vocab_size).to(a.device)
        files = list(a.model.glob("*.safetensors")) + [p for p in offload.rglob("*") if p.is_file()]
        with torch.inference_mode():
            times, logits = _timed_passes(a, lambda: model(ids).logits, files)
    ref = torch.load(a.out / "inmemory.pt", weights_only=True)
    offloaded = sum(p.stat().st_size for p in offload.rglob("*") if p.is_file())
    return {"seconds": min(times), "times": times, "peak_rss": m.cpu_peak_bytes, "offload_folder_bytes": offloaded,
            "max_abs_diff": float((logits[:, -1].float().cpu() - ref).abs().max()), **_extra(a, m)}


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


VARIANTS = {"read": run_disk, "h2d": run_h2d, "inmemory": run_inmemory, "overlap": run_overlap,
            "stream-prefetch": run_stream, "stream-no-prefetch": run_stream, "accelerate-disk": run_accelerate,
            "airllm": run_airllm}


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
    cmd = [sys.executable, "-m", MODULE, "--variant", variant, "--model", str(a.model), "--layers", str(a.layers),
           "--out", str(a.out), "--batch", str(a.batch), "--seq", str(a.seq), "--dtype", a.dtype,
           "--repeat", str(a.repeat), "--device", a.device]
    # the package's own folder first on the path, so that a checkout that was never installed runs too
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1", PYTHONPATH=path))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="where the models compute (default cpu); cuda adds the host-to-device bandwidth to the bound")
    p.add_argument("--size", default="2GB", help="at least this many bytes of weights (default 2GB)")
    p.add_argument("--small", action="store_true", help="a ~250 MB model, for the chapter")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--dtype", choices=COMPUTE_DTYPES, default="fp32")
    p.add_argument("--repeat", type=int, default=2, help="timed passes per variant and round (best counts)")
    p.add_argument("--rounds", type=int, default=3, help="measure every variant this many times, interleaved")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--workdir", type=Path, default=None, help="where the temporary model goes (default: a temp dir)")
    p.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--layers", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if min(a.batch, a.seq, a.repeat, a.rounds) < 1:
        p.error(f"--batch {a.batch}, --seq {a.seq}, --repeat {a.repeat} and --rounds {a.rounds} must be >= 1")
    if a.device == "cuda" and not torch.cuda.is_available():  # at once: before a byte is written
        p.error("--device cuda, but torch sees no CUDA GPU here (torch.cuda.is_available() is False; torch "
                f"{torch.__version__}, built for CUDA {torch.version.cuda}); run with --device cpu, or on a GPU machine")
    if a.variant:  # we are one measurement, in our own process
        print("RESULT " + json.dumps(VARIANTS[a.variant](a)))
        return {}
    size = parse_size("250MB" if a.small else a.size)
    from helpers.arithmetic import block_bytes
    from helpers.checkpoints import split_by_layer
    from helpers.models import synthetic_llama
    from helpers.streaming import predicted_peak_bytes
    from transformers import LlamaConfig

    fields = make_config(SMALL if a.small else BIG, size, a.dtype)
    config = LlamaConfig(**fields)
    created = a.workdir is None
    work = Path(tempfile.mkdtemp(prefix="streaming-bench-")) if created else a.workdir
    try:
        a.model, a.layers, a.out = work / "model", work / "layers", work / "out"
        a.out.mkdir(parents=True, exist_ok=True)
        synthetic_llama(a.model, config, dtype=parse_dtype(a.dtype), max_shard_size="1GB", progress=False)
        split_by_layer(a.model, a.layers, progress=False)
        variants = ["read", *(["h2d"] if a.device == "cuda" else []), "inmemory", "overlap", "stream-prefetch",
                    "stream-no-prefetch", "accelerate-disk"]
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
    finally:
        if created:
            shutil.rmtree(work, ignore_errors=True)
    blocks = block_bytes(config, a.dtype)
    predicted = predicted_peak_bytes(config, a.batch, a.seq, a.dtype)
    disk = max((r for k, r in results.items() if k.startswith("read") and "error" not in r),
               key=lambda r: r["bandwidth"], default={"error": "no read"})
    stream = results["stream-prefetch"]
    h2d = results.get("h2d", {})
    report = {"config": fields, "dtype": a.dtype, "batch": a.batch, "seq": a.seq, "rounds": a.rounds,
              "device": a.device, "device_name": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
              "weights_bytes": sum(blocks.values()),
              "disk_bandwidth": disk.get("bandwidth"), "results": results, "predicted_stream_rss": predicted}
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
        acc = results["accelerate-disk"]
        if "error" not in acc:
            report["accelerate_vs_stream"] = acc["seconds"] / stream["seconds"]
        if "seconds" in results.get("airllm", {}):
            report["airllm_vs_stream"] = results["airllm"]["seconds"] / stream["seconds"]
    print_table(report)
    if a.json:
        write_json(a.json, report)
    return report


def print_table(r: dict) -> None:
    """The table the chapter shows: one row per variant, then the targets."""
    device = r.get("device", "cpu")
    print(f"\nsynthetic Llama, {r['config']['num_hidden_layers']} layers, {format_size(r['weights_bytes'])} of "
          f"{r['dtype']} weights; batch {r['batch']} x {r['seq']} tokens; best of {r['rounds']} interleaved round(s); "
          f"computed on {r.get('device_name', device)}")
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
        print(f"{name:<22}{res['seconds']:>10.2f} s{ratio:>10}{rss:>14}   {note}")
    if "airllm" not in r["results"]:
        print(f"{'airllm':<22}{'-':>12}{'-':>10}{'-':>14}   not installed (optional extra)")
    if bound is None:
        print("targets: not computed (a variant failed)")
        return
    if device == "cuda":
        t = r["bound_terms"]
        print(f"\nbound = max(bytes / disk bandwidth {t['disk']:.3f} s, bytes / pinned H2D bandwidth {t['h2d']:.3f} s, "
              f"in-memory compute {t['compute']:.3f} s) = {bound:.3f} s per pass")
    else:
        print(f"\nbound = max(bytes / disk bandwidth, in-memory compute) = {bound:.2f} s per pass")
    ok = lambda c: "met" if c else "NOT met"  # noqa: E731
    print(f"streaming with prefetch: {r['stream_vs_bound']:.2f} × the bound "
          f"(target <= {TARGET_BOUND} ×: {ok(r['stream_vs_bound'] <= TARGET_BOUND)})")
    if "stream_vs_overlap" in r:
        print(f"  and {r['stream_vs_overlap']:.2f} × the overlap floor (the in-memory forward while reading the same "
              "files: what perfect overlap gives on this machine)")
    if "accelerate_vs_stream" in r:
        print(f"accelerate disk offload is {r['accelerate_vs_stream']:.2f} × slower than streaming "
              f"(target > 1 ×: {ok(r['accelerate_vs_stream'] > 1)})")
    if "airllm_vs_stream" in r:
        print(f"AirLLM is {r['airllm_vs_stream']:.2f} × slower than streaming")
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
          f"{ok(abs(r['rss_vs_predicted'] - 1) <= TARGET_RSS)})")


if __name__ == "__main__":
    main()
