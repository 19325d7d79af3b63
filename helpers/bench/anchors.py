"""The anchors: other ways to run a model whose weights stay on disk, measured on the same model and batch.

``accelerate-disk`` (accelerate's ``load_checkpoint_and_dispatch``, which first writes the offloaded weights to
its offload folder), ``transformers-disk`` (``from_pretrained(device_map=..., offload_folder=...)``, which
transformers 5 reads straight from the safetensors shards) and ``airllm`` (an optional extra, ``make
bench-airllm``). Decoder layers and ``lm_head`` are on "disk" in each; every pass is cold. Built in chapter 08.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from helpers.layout import block_layout
from helpers.memory import measure
from helpers.meta import parse_dtype

from .config import BenchConfig, Work
from .timing import REFERENCE, cuda_extra, mapped, prompt, timed_passes

__all__ = ["disk_map", "time_offloaded", "run_accelerate", "run_transformers_disk", "run_airllm"]


def disk_map(c: BenchConfig, config) -> dict:
    """Decoder layers and lm_head on "disk"; the embedding, rotary embedding and final norm where every
    computation is (cpu, or GPU 0). Built in chapter 08."""
    main = 0 if c.device == "cuda" else "cpu"
    return {"model.embed_tokens": main, "model.rotary_emb": main, "model.norm": main, "lm_head": "disk",
            **{f"model.layers.{i}": "disk" for i in range(config.num_hidden_layers)}}


def time_offloaded(c: BenchConfig, work: Work, load: Callable[[object, Path], torch.nn.Module]) -> dict:
    """Load a disk-offloaded model with ``load(config, offload_folder)`` and time cold passes of it (every file it
    reads dropped from the page cache first): the protocol both disk-offload anchors share. Built in
    chapter 08."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(work.model)
    offload = Path(tempfile.mkdtemp(prefix="offload-", dir=work.out))
    shards = block_layout(work.model).files
    with measure() as m:
        model = load(config, offload).eval()
        ids = prompt(c, config.vocab_size).to(c.device)
        files = shards + [p for p in offload.rglob("*") if p.is_file()]
        with torch.inference_mode():
            times, logits = timed_passes(c, lambda: model(ids).logits, files)
    ref = torch.load(work.out / REFERENCE, weights_only=True)
    offloaded = sum(p.stat().st_size for p in offload.rglob("*") if p.is_file())
    return {"seconds": min(times), "times": times, "peak_rss": m.cpu_peak_bytes, "offload_folder_bytes": offloaded,
            "shards_mapped": mapped(shards),
            "max_abs_diff": float((logits[:, -1].float().cpu() - ref).abs().max()), **cuda_extra(c, m)}


def run_accelerate(c: BenchConfig, work: Work) -> dict:
    """accelerate's disk offload: ``load_checkpoint_and_dispatch`` with decoder layers and lm_head on "disk"
    (it writes those weights to its offload folder first). Built in chapter 08."""
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch
    from transformers import AutoModelForCausalLM

    def load(config, offload: Path) -> torch.nn.Module:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=parse_dtype(c.dtype))
        return load_checkpoint_and_dispatch(model, str(work.model), device_map=disk_map(c, config),
                                            offload_folder=str(offload), dtype=parse_dtype(c.dtype))

    return time_offloaded(c, work, load)


def run_transformers_disk(c: BenchConfig, work: Work) -> dict:
    """transformers' own disk offload: ``from_pretrained`` with decoder layers and lm_head on "disk". transformers
    5 reads such weights straight from the safetensors shards (``offload_folder_bytes``: what it wrote, 0
    expected). Built in chapter 08."""
    from transformers import AutoModelForCausalLM

    return time_offloaded(c, work, lambda config, offload: AutoModelForCausalLM.from_pretrained(
        work.model, device_map=disk_map(c, config), offload_folder=str(offload), dtype=parse_dtype(c.dtype)))


def run_airllm(c: BenchConfig, work: Work) -> dict:
    """AirLLM, when installed (never a requirement): it splits the model once, untimed, then each pass reads its
    layer files. Built in chapter 08."""
    from airllm import AutoModel

    from helpers.models import book_model_dir

    shards = work.out / "airllm"
    for name in ("tokenizer.json", "tokenizer_config.json"):  # AirLLM loads a tokenizer; lend it the book model's
        if not (work.model / name).exists():
            shutil.copyfile(book_model_dir() / name, work.model / name)
    model = AutoModel.from_pretrained(str(work.model), device="cuda:0" if c.device == "cuda" else "cpu",
                                      dtype=parse_dtype(c.dtype), layer_shards_saving_path=str(shards))
    ids = prompt(c, model.config.vocab_size).to(c.device)
    files = [p for p in shards.rglob("*") if p.is_file()]
    with measure() as m:
        with torch.inference_mode():
            times, out = timed_passes(c, lambda: model(ids, use_cache=False).logits, files)
    ref = torch.load(work.out / REFERENCE, weights_only=True)
    return {"seconds": min(times), "times": times, "peak_rss": m.cpu_peak_bytes,
            "max_abs_diff": float((out[:, -1].float().cpu() - ref).abs().max())}
