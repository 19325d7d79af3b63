"""Memory arithmetic: how many bytes a model needs before you try to load it.

Built in chapter 02 (memory arithmetic); chapters 04-08 use it to plan device maps,
offload and layer streaming.

Every count comes from the model itself, built on the ``meta`` device (shapes, no data),
so it is exact for any architecture transformers can build. Configs of well-known models
are checked in under ``helpers/data/`` (published shapes, no hub access).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

import torch

from .layout import block_of, block_order
from .memory import format_size, parse_size
from .meta import parse_dtype

__all__ = [
    "DATA_DIR", "CUDA_CONTEXT_BYTES", "FORMATS", "known_models", "known_config", "meta_model",
    "bytes_per_param", "weight_bytes", "block_bytes", "kv_cache_bytes", "activation_bytes",
    "Ledger", "estimate", "feasibility", "Machine", "MACHINES", "machine",
]

DATA_DIR = Path(__file__).with_name("data")
# What a CUDA context (the driver's state and the loaded kernels) takes on the GPU before any tensor, as published:
# accelerate's "big model inference" concept guide
# (https://huggingface.co/docs/accelerate/v1.15.0/en/concept_guides/big_model_inference) quotes 1-2 GB, "depending
# on the GPU". The context is *not* in
# torch.cuda.max_memory_allocated(); nvidia-smi shows it. (cuBLAS's workspaces are: they come from the caching
# allocator.)
# This is the figure planned with where nothing was measured: on a CUDA machine, measure it instead with
# helpers.memory.cuda_context_bytes() (chapter 00) and pass it as estimate(..., context_bytes=...).
CUDA_CONTEXT_BYTES = 2**30
# Storage formats a weight can be planned in: floats by the short names parse_dtype reads, and bitsandbytes' formats.
FLOAT_FORMATS = ("fp32", "bf16", "fp16")
QUANT_FORMATS = ("int8", "nf4", "fp4")
FORMATS = FLOAT_FORMATS + QUANT_FORMATS
BNB_4BIT_BLOCKSIZE = 64      # bitsandbytes: one absmax per 64 weights
BNB_NESTED_BLOCKSIZE = 256   # double quantization: absmaxes quantized to 8 bit in blocks of 256
INT8_ROW_ASSUMED = 4096      # bytes_per_param("int8"): rows of 4096 inputs share one fp32 scale


# --------------------------------------------------------------------------- machines

@dataclass(frozen=True)
class Machine:
    """A machine a reader runs the book on, with its figures as published (``source`` says where). Built in chapter 02.

    ``gpu_bytes`` is per GPU and is what PyTorch sees (``torch.cuda.get_device_properties(0).total_memory``),
    not the marketing figure; ``ram_bytes`` is the RAM the runtime gives a notebook; ``disk_bytes`` the disk it
    can write to (``None`` where no figure is published).
    """

    name: str
    gpus: int
    gpu_bytes: int
    ram_bytes: int
    disk_bytes: Optional[int]
    source: str

    def __post_init__(self):
        for key in ("gpus", "gpu_bytes", "ram_bytes"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{key} {value!r} must be an int >= 0")
        if self.disk_bytes is not None and (isinstance(self.disk_bytes, bool) or not isinstance(self.disk_bytes, int)
                                            or self.disk_bytes < 0):
            raise ValueError(f"disk_bytes {self.disk_bytes!r} must be an int >= 0 or None")

    def __str__(self) -> str:
        gpu = f"{self.gpus} x {format_size(self.gpu_bytes)} GPU" if self.gpus else "no GPU"
        disk = "disk not published" if self.disk_bytes is None else f"{format_size(self.disk_bytes, binary=False)} disk"
        return f"{self.name}: {gpu}, {format_size(self.ram_bytes)} RAM, {disk}"


# A T4 has 16 GB of GDDR6 (NVIDIA's datasheet); with ECC on, as in Colab and Kaggle, it exposes 15 GiB
# (nvidia-smi: 15360 MiB), and PyTorch reports "14.75 GiB total capacity" in its out-of-memory messages there.
_T4_BYTES = int(14.75 * 2**30)
_T4_SOURCE = ("GPU: NVIDIA T4 datasheet, 16 GB GDDR6 (https://www.nvidia.com/en-us/data-center/tesla-t4/); "
              "PyTorch's own out-of-memory message on Colab and Kaggle T4s reads "
              "'(GPU 0; 14.75 GiB total capacity; ...)', "
              "e.g. https://github.com/googlecolab/colabtools/issues/3439 (Colab T4, 2023)")
MACHINES = {
    "colab-free-t4": Machine(
        name="colab-free-t4", gpus=1, gpu_bytes=_T4_BYTES, ram_bytes=int(12.7 * 2**30), disk_bytes=None,
        source=_T4_SOURCE + "; RAM: free Colab's resource panel shows 12.7 GB System RAM, of which about 1 GB "
        "the VM uses itself (https://linux-blog.anracom.com/2023/05/04/google-colab-ram-vram-and-gpu-usage-"
        "limits-i-no-clear-conditions-over-multiple-sessions/); Colab publishes no fixed figures "
        "(https://research.google.com/colaboratory/faq.html)"),
    "kaggle-t4x2": Machine(
        name="kaggle-t4x2", gpus=2, gpu_bytes=_T4_BYTES, ram_bytes=29 * 2**30, disk_bytes=20 * 10**9,
        source=_T4_SOURCE + "; RAM: Kaggle's session panel shows 29 GB for GPU sessions (the VM has 31.4 GiB in "
        "total, as logged by wandb on Kaggle T4 x2 runs); disk: 20 GB of output in /kaggle/working "
        "(https://www.kaggle.com/docs/notebooks), more as scratch space outside it"),
}


def machine(name: Union[str, Machine]) -> Machine:
    """The ``Machine`` called ``name`` in ``MACHINES`` (a ``Machine`` is returned as it is). Built in chapter 02."""
    if isinstance(name, Machine):
        return name
    if not isinstance(name, str) or name not in MACHINES:
        raise ValueError(f"unknown machine {name!r}; known machines are: {', '.join(sorted(MACHINES))}")
    return MACHINES[name]


_as_machine = machine  # for feasibility(), whose argument is also called machine


# --------------------------------------------------------------------------- configs

def known_models() -> list[str]:
    """Names accepted by ``known_config`` (the JSON files in helpers/data). Built in chapter 02."""
    return sorted(p.stem for p in DATA_DIR.glob("*.json"))


def known_config(name: str):
    """The transformers config of a well-known model, from ``helpers/data/<name>.json``. Built in chapter 02."""
    from transformers import AutoConfig

    names = known_models()
    if not isinstance(name, str) or name not in names:
        raise ValueError(f"unknown model {name!r}; known models are: {', '.join(names)}")
    fields = json.loads((DATA_DIR / f"{name}.json").read_text())
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields)


def _check_config(config) -> None:
    from transformers import PretrainedConfig

    if not isinstance(config, PretrainedConfig):
        raise ValueError(f"config {config!r} must be a transformers PretrainedConfig (see known_config)")


@functools.lru_cache(maxsize=32)
def _meta_model_cached(config_json: str, model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = json.loads(config_json)
    fields.pop("model_type", None)
    config = AutoConfig.for_model(model_type, **fields)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def meta_model(config):
    """The causal-LM model for ``config`` built on the meta device (cached; do not modify). Built in chapter 02.

    Its exact parameter count is chapter 01's ``count_parameters(meta_model(config))``, tied weights counted once.
    """
    _check_config(config)
    return _meta_model_cached(config.to_json_string(use_diff=False), config.model_type)


# --------------------------------------------------------------------------- bytes per parameter

def _format(dtype) -> str:
    """The format name of ``dtype``: one of ``QUANT_FORMATS``, or the one of ``FLOAT_FORMATS`` that names the same
    torch dtype (``meta.parse_dtype`` reads torch.float16, "float16", "torch.float16" and "fp16" alike)."""
    if isinstance(dtype, str) and dtype.lower() in QUANT_FORMATS:
        return dtype.lower()
    floats = {parse_dtype(name): name for name in FLOAT_FORMATS}
    try:
        return floats[parse_dtype(dtype)]
    except (ValueError, KeyError):
        raise ValueError(f"dtype {dtype!r} is not supported; expected one of {', '.join(FORMATS)} "
                         "(or torch.float32 / torch.bfloat16 / torch.float16)") from None


def _float_format(dtype, what: str) -> str:
    name = _format(dtype)
    if name not in FLOAT_FORMATS:
        raise ValueError(f"{what} dtype {dtype!r} must be a float format ({', '.join(FLOAT_FORMATS)}); "
                         f"quantized weights compute and cache in fp16/bf16")
    return name


def bytes_per_param(dtype, *, double_quant: bool = False, row_size: int = INT8_ROW_ASSUMED) -> float:
    """Average bytes one weight takes in ``dtype``, quantization scales included. Built in chapter 02.

    * fp32 4, bf16/fp16 2.
    * int8 (LLM.int8, bitsandbytes ``Int8Params``): 1 byte + one fp32 scale (``SCB``) per output
      row, amortised over ``row_size`` inputs (assumed 4096; ``weight_bytes`` uses the real rows).
    * nf4/fp4 (bitsandbytes ``Params4bit``): 0.5 byte + one fp32 absmax per block of 64 weights;
      with ``double_quant=True`` the absmaxes are stored as 8 bit, plus one fp32 scale per 256 blocks.
    """
    name = _format(dtype)
    if name in FLOAT_FORMATS:
        return float(parse_dtype(name).itemsize)
    if name == "int8":
        if not isinstance(row_size, int) or row_size <= 0:
            raise ValueError(f"row_size {row_size!r} must be a positive int")
        return 1.0 + 4.0 / row_size
    if double_quant:
        return 0.5 + 1.0 / BNB_4BIT_BLOCKSIZE + 4.0 / (BNB_4BIT_BLOCKSIZE * BNB_NESTED_BLOCKSIZE)
    return 0.5 + 4.0 / BNB_4BIT_BLOCKSIZE


def _quantized_tensor_bytes(name: str, shape: torch.Size, out_features: int, double_quant: bool) -> int:
    """Bytes bitsandbytes stores for one quantized weight matrix (scales included)."""
    n = math.prod(shape)
    if name == "int8":  # int8 matrix + fp32 scale per output row
        return n + 4 * out_features
    blocks = math.ceil(n / BNB_4BIT_BLOCKSIZE)
    packed = math.ceil(n / 2)
    if not double_quant:
        return packed + 4 * blocks
    # 8-bit absmax per block, fp32 absmax per 256 blocks, one fp32 offset (code tables are shared)
    return packed + blocks + 4 * math.ceil(blocks / BNB_NESTED_BLOCKSIZE) + 4


def _is_quantizable(module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


def _param_bytes(config, dtype, skip_modules: Iterable[str], compute_dtype, double_quant: bool,
                 ) -> list[tuple[str, int]]:
    """``(parameter name, bytes)`` for every unique parameter, in registration order."""
    name = _format(dtype)
    stored_as = _float_format(compute_dtype, "compute") if name in QUANT_FORMATS else name  # what is not quantized
    elem = parse_dtype(stored_as).itemsize
    model = meta_model(config)
    skip = tuple(skip_modules)
    out, seen = [], set()
    for mod_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False, prefix=mod_name):
            if id(param) in seen:
                continue
            seen.add(id(param))
            quantize = (name in QUANT_FORMATS and _is_quantizable(module) and p_name.endswith(".weight")
                        and not any(mod_name == s or mod_name.startswith(s + ".") or mod_name.endswith("." + s)
                                    for s in skip))
            if quantize:
                rows = param.shape[0] if isinstance(module, torch.nn.Linear) else param.shape[1]
                out.append((p_name, _quantized_tensor_bytes(name, param.shape, rows, double_quant)))
            else:
                out.append((p_name, param.numel() * elem))
    return out


def weight_bytes(config, dtype, *, skip_modules: Iterable[str] = ("lm_head",), compute_dtype="fp16",
                 double_quant: bool = False) -> int:
    """Bytes of all weights of ``config``'s model stored in ``dtype``. Built in chapter 02.

    For int8/nf4/fp4 only ``nn.Linear`` (and GPT-2 ``Conv1D``) weights are quantized, as
    bitsandbytes does: embeddings, norms, biases and the modules in ``skip_modules`` (transformers
    keeps ``lm_head`` unquantized) stay in ``compute_dtype``. Float dtypes ignore those arguments.
    """
    return sum(b for _, b in _param_bytes(config, dtype, skip_modules, compute_dtype, double_quant))


def block_bytes(config, dtype, **kwargs) -> dict[str, int]:
    """Bytes of each block ("model.embed_tokens", "model.layers.0", ..., "lm_head") in execution order, the
    blocks being ``helpers.layout``'s (the ones chapter 03 splits a checkpoint into and chapter 08 streams); a
    tied ``lm_head`` is 0 (its weight is counted in the embeddings). Built in chapter 02.

    Blocks without parameters (rotary embeddings, dropout) are left out. ``kwargs`` as in ``weight_bytes``.
    """
    sizes = _param_bytes(config, dtype, kwargs.pop("skip_modules", ("lm_head",)),
                         kwargs.pop("compute_dtype", "fp16"), kwargs.pop("double_quant", False))
    if kwargs:
        raise ValueError(f"unexpected arguments {sorted(kwargs)}; expected skip_modules, compute_dtype, double_quant")
    result = {block_of(name): 0 for name, _ in meta_model(config).named_parameters(remove_duplicate=False)}
    for name, nbytes in sizes:
        result[block_of(name)] += nbytes
    return {block: result[block] for block in sorted(result, key=block_order)}


# --------------------------------------------------------------------------- runtime tensors

def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{key} {value!r} must be a positive int")


def _attention_shape(config) -> tuple[int, int, int, int]:
    """``(layers, query heads, key/value heads, head_dim)`` whatever the config calls them."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None)
    if config.model_type == "falcon":
        kv_heads = config.num_kv_heads if config.new_decoder_architecture else (1 if config.multi_query else heads)
    elif config.model_type == "gpt_bigcode":
        kv_heads = 1 if config.multi_query else heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, heads, kv_heads or heads, head_dim


def kv_cache_bytes(config, batch_size: int, seq_len: int, dtype) -> int:
    """Bytes of the KV cache after ``seq_len`` tokens: 2 x layers x batch x seq x kv_heads x head_dim x
    element size (GQA/MQA through ``num_key_value_heads``). Built in chapter 02."""
    _check_config(config)
    _check_positive(batch_size=batch_size, seq_len=seq_len)
    elem = int(bytes_per_param(_float_format(dtype, "KV cache")))
    layers, _, kv_heads, head_dim = _attention_shape(config)
    return 2 * layers * batch_size * seq_len * kv_heads * head_dim * elem


def activation_bytes(config, batch_size: int, seq_len: int, dtype, *, attention: str = "fused") -> int:
    """Peak bytes of temporary tensors in one inference forward pass (no grad, SDPA attention). Built in chapter 02.

    Assumptions (checked against measurement in chapter 02):
    * layers run one after another and free their temporaries, so the peak is the largest of
      (a) inside a decoder layer's MLP: residual + normed input (2 x hidden) and three
          intermediate-size buffers (``act(gate)``, ``up`` and their product); and
      (b) the end: the logits (batch x seq x vocab) in ``dtype`` plus two hidden-size buffers;
    * ``attention="fused"``: SDPA's fused kernels (flash, memory-efficient), which never materialise the seq x seq
      score matrix, so attention's own temporaries (q, k, v, rotary copies: about 4 x hidden) stay below (a);
      ``"math"``: SDPA's MATH kernel (chapter 07's ``sdpa_backend``: GQA without a mask on a GPU before sm80),
      which adds the fp32 score matrix and its softmax, 2 x 4 bytes x batch x heads x seq x seq;
    * the KV cache is not included here (see ``kv_cache_bytes``).
    """
    _check_config(config)
    _check_positive(batch_size=batch_size, seq_len=seq_len)
    if attention not in ("fused", "math"):
        raise ValueError(f"attention {attention!r} must be 'fused' or 'math'")
    elem = int(bytes_per_param(_float_format(dtype, "activation")))
    tokens = batch_size * seq_len
    hidden = config.hidden_size
    inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    mlp = (2 * hidden + 3 * inter) * tokens * elem
    scores = 2 * 4 * batch_size * _attention_shape(config)[1] * seq_len**2 if attention == "math" else 0
    attention = 6 * hidden * tokens * elem + scores
    logits = (2 * hidden + config.vocab_size) * tokens * elem
    return max(mlp, attention, logits)


# --------------------------------------------------------------------------- the ledger

@dataclass
class Ledger:
    """Predicted memory of one forward pass, in bytes, by item. Built in chapter 02."""

    weights: int
    kv_cache: int
    activations: int
    overhead: int
    device: str = "cpu"
    label: str = ""

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.overhead

    def items(self) -> dict[str, int]:
        return {"weights": self.weights, "kv_cache": self.kv_cache, "activations": self.activations,
                "overhead": self.overhead}

    def table(self) -> str:
        rows = list(self.items().items()) + [("total", self.total)]
        title = f"{self.label} on {self.device}" if self.label else f"on {self.device}"
        lines = [title, f"{'item':<12}{'bytes':>18}{'size':>14}"]
        lines += [f"{k:<12}{v:>18,}{format_size(v):>14}" for k, v in rows]
        return "\n".join(lines)

    __str__ = table

    def plot(self, ax=None):
        """Draw the ledger as one stacked bar (GiB); returns the axes."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(3, 4))
        bottom = 0.0
        for key, value in self.items().items():
            ax.bar([self.label or "model"], [value / 2**30], bottom=bottom, label=key)
            bottom += value / 2**30
        ax.set_ylabel("memory (GiB)")
        ax.legend(fontsize="small")
        return ax


def _input_embedding_bytes(config, dtype) -> int:
    """Bytes of the input embedding table, if it is not shared with the LM head (else 0)."""
    model = meta_model(config)
    table = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    if output is not None and output.weight is table:
        return 0
    return table.numel() * int(bytes_per_param(dtype))


def estimate(config, dtype, batch_size: int = 1, seq_len: int = 512, *, device: str = "cpu",
             checkpoint_dtype=None, label: str = "", context_bytes: Optional[int] = None, **weight_kwargs) -> Ledger:
    """Predicted peak memory of loading ``config``'s model in ``dtype`` and running one forward pass
    of ``batch_size`` x ``seq_len`` tokens with ``use_cache=True``. Built in chapter 02.

    ``overhead`` is the CUDA context on ``device="cuda"``: ``context_bytes`` when given (measure it with
    ``helpers.memory.cuda_context_bytes()``), else the published ``CUDA_CONTEXT_BYTES``. On the CPU it is
    the loading transient measured in chapter 02: when ``checkpoint_dtype`` (the dtype of the
    safetensors files) differs from ``dtype``, ``from_pretrained`` keeps every shard memory-mapped
    while it converts, so the whole checkpoint is resident next to the converted weights; only the
    part of that not already covered by the forward pass's KV cache and activations is added.
    When the dtypes match, the weights *are* the memory-mapped file (zero copy) and RSS counts only
    pages read: an untied input-embedding table is resident only for the rows the tokens touch.
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} must be 'cpu' or 'cuda'")
    _check_positive(batch_size=batch_size, seq_len=seq_len)
    if context_bytes is not None and (isinstance(context_bytes, bool) or not isinstance(context_bytes, int)
                                      or context_bytes < 0):
        raise ValueError(f"context_bytes {context_bytes!r} must be an int of bytes >= 0 or None")
    name = _format(dtype)
    run_dtype = name if name in FLOAT_FORMATS else weight_kwargs.get("compute_dtype", "fp16")
    weights = weight_bytes(config, name, **weight_kwargs)
    kv = kv_cache_bytes(config, batch_size, seq_len, run_dtype)
    act = activation_bytes(config, batch_size, seq_len, run_dtype)
    if device == "cuda":
        overhead = CUDA_CONTEXT_BYTES if context_bytes is None else context_bytes
    elif checkpoint_dtype is None or name in QUANT_FORMATS:
        overhead = 0
    elif _format(checkpoint_dtype) == name:  # zero copy: untouched embedding rows stay on disk
        overhead = 0
        table = _input_embedding_bytes(config, name)
        if table:
            rows = min(config.vocab_size, batch_size * seq_len)
            weights -= table - rows * (table // config.vocab_size)
    else:
        checkpoint = weight_bytes(config, checkpoint_dtype)
        overhead = max(0, checkpoint - kv - act)
    return Ledger(weights=weights, kv_cache=kv, activations=act, overhead=overhead, device=device,
                  label=label)


def feasibility(config, dtype, gpu_bytes: Union[int, str, None] = None, cpu_bytes: Union[int, str, None] = None, *,
                machine: Union[str, Machine, None] = None, batch_size: int = 1, seq_len: int = 512,
                offload_dtype=None, context_bytes: Optional[int] = None, **weight_kwargs) -> str:
    """Where a model can run on a GPU machine: "fits on GPU", "needs CPU offload", "needs disk offload",
    "needs streaming" or "does not fit". Built in chapter 02.

    The machine is ``machine`` (a name from ``MACHINES`` or a ``Machine``; its GPUs are pooled, each paying a
    CUDA context) or one GPU of ``gpu_bytes`` plus ``cpu_bytes`` of RAM. The GPU keeps the CUDA context, KV
    cache and activations, and as many blocks as fit, in execution order. The rest goes to RAM ("needs CPU
    offload"), then to disk ("needs disk offload"), stored as ``offload_dtype``. That is what the tool does,
    not what one would wish: for int8/nf4/fp4, ``llm_int8_enable_fp32_cpu_offload=True`` (required for any
    CPU/disk offload) adds the offloaded modules to those left unquantized, so they stay in the dtype the model
    is loaded in, despite the flag's name: ``compute_dtype`` (fp16 by default). Chapter 06 shows this in the
    quantizers' code (transformers 5.24.0, bitsandbytes 0.50.2, torch 2.13.0). So ``offload_dtype`` defaults
    to ``compute_dtype`` for quantized formats and to ``dtype`` otherwise. When more than
    half the weights must come from disk on every forward pass, per-token offload is disk-bound and the
    practical plan is to stream layers over a large batch (chapter 08): "needs streaming". If the runtime plus
    the largest block does not fit on the GPU, nothing runs: "does not fit".
    """
    if machine is not None:
        if gpu_bytes is not None or cpu_bytes is not None:
            raise ValueError("give either machine or gpu_bytes and cpu_bytes, not both")
        box = _as_machine(machine)
        if box.gpus < 1:
            raise ValueError(f"machine {box.name!r} has no GPU")
        gpus, gpu, cpu = box.gpus, box.gpus * box.gpu_bytes, box.ram_bytes
    elif gpu_bytes is None or cpu_bytes is None:
        raise ValueError("give machine (e.g. 'colab-free-t4') or both gpu_bytes and cpu_bytes")
    else:
        gpus, gpu, cpu = 1, parse_size(gpu_bytes), parse_size(cpu_bytes)
    name = _format(dtype)
    loaded = _float_format(weight_kwargs.get("compute_dtype", "fp16"), "compute")
    offload = _format(offload_dtype) if offload_dtype is not None else (loaded if name in QUANT_FORMATS else name)
    ledger = estimate(config, dtype, batch_size, seq_len, device="cuda", context_bytes=context_bytes, **weight_kwargs)
    runtime = ledger.total - ledger.weights + (gpus - 1) * ledger.overhead  # one CUDA context per GPU
    if runtime + ledger.weights <= gpu:
        return "fits on GPU"
    blocks = block_bytes(config, dtype, **weight_kwargs)
    offloaded = blocks if offload == name else block_bytes(config, offload, **weight_kwargs)
    if runtime + max(blocks.values()) > gpu:
        return "does not fit"
    on_gpu, rest = 0, 0
    for block, size in blocks.items():  # fill the GPU in execution order, as device_map="sequential" does
        if rest == 0 and runtime + on_gpu + size <= gpu:
            on_gpu += size
        else:
            rest += offloaded[block]
    if rest <= cpu:
        return "needs CPU offload"
    from_disk = rest - cpu
    return "needs streaming" if from_disk > (on_gpu + rest) / 2 else "needs disk offload"
