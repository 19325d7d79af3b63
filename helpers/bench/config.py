"""The benchmark's options: the command line, and the frozen ``BenchConfig`` it becomes.

``parse`` reads the command line once into a ``BenchConfig``; nothing changes it afterwards. What a run derives
(where the model, its split and the children's files are) is a ``Work``, also frozen, handed to each variant
beside the config; a variant that needs other options gets a copy made with ``dataclasses.replace``. Both
travel to a child process as one JSON file (``write_request`` / ``read_request``). Built in chapter 08.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from helpers.reader import READS
from helpers.tensorfiles import write_json

__all__ = ["COMPUTE_DTYPES", "DEVICES", "SOURCES", "DEFAULT_SOURCE", "SHAPES", "SHAPE_SHARD_SIZE", "BIG", "SMALL",
           "READS", "BenchConfig", "Work", "write_request", "read_request", "parser", "parse",
           "make_config"]

COMPUTE_DTYPES = ("fp32", "bf16", "fp16")  # --dtype: stored and computed in (helpers.meta.parse_dtype); fp16: a T4's
DEVICES = ("cpu", "cuda")  # --device
SOURCES = ("inplace", "split")  # --source: what LayerStreamer reads, the checkpoint's shards or the per-layer split
DEFAULT_SOURCE = "inplace"
SHAPES = ("llama-2-70b",)  # --shape: helpers.arithmetic.known_config names whose exact shapes the mode writes
SHAPE_SHARD_SIZE = "2GB"  # --shape mode: shards of a few GB, as published checkpoints have
# the default mode's model: these shapes, with enough decoder layers to reach --size (or 250MB with --small)
BIG = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=16,
           vocab_size=32000, tie_word_embeddings=False)
SMALL = dict(hidden_size=768, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=12,
             vocab_size=16000, tie_word_embeddings=False)


@dataclass(frozen=True)
class BenchConfig:
    """Every option of one benchmark run, as the command line gave it (defaults filled in). Frozen: a run derives
    what it needs into a ``Work`` or a ``dataclasses.replace`` copy, never into this. Built in chapter 08."""

    device: str = "cpu"
    size: str = "2GB"
    small: bool = False
    shape: Optional[str] = None
    layers: int = 16
    passes: int = 2
    shard_size: str = SHAPE_SHARD_SIZE
    source: str = DEFAULT_SOURCE
    read: str = "direct"
    batch: int = 4
    seq: int = 16
    dtype: str = "fp32"
    repeat: int = 2
    rounds: int = 3
    json: Optional[Path] = None
    workdir: Optional[Path] = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "BenchConfig":
        """The config of parsed arguments; the defaults that depend on the mode filled in (batch 1 and bf16
        with ``--shape``, batch 4 and fp32 without). Built in chapter 08."""
        options = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
        options["batch"] = args.batch or (1 if args.shape else 4)
        options["dtype"] = args.dtype or ("bf16" if args.shape else "fp32")
        return cls(**options)

    def to_dict(self) -> dict:
        """As JSON-ready values (paths as strings), for a child process. Built in chapter 08."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "BenchConfig":
        """The inverse of ``to_dict``. Built in chapter 08."""
        paths = {"json", "workdir"}
        return cls(**{k: Path(v) if k in paths and v is not None else v for k, v in values.items()})


@dataclass(frozen=True)
class Work:
    """Where one run's files are: the synthetic checkpoint (``model``), its per-layer split (``layers``; None where
    none was written) and the folder the variants write into (``out``: reference logits, offload folders, the
    children's config and result files). Built in chapter 08."""

    model: Path
    layers: Optional[Path]
    out: Path

    def streamed(self, source: str) -> Path:
        """What LayerStreamer reads for ``--source``: the checkpoint itself ("inplace") or its split ("split").
        Built in chapter 08."""
        if source == "split" and self.layers is None:
            raise ValueError("--source split, but this run wrote no per-layer split")
        return self.model if source == "inplace" else self.layers

    def to_dict(self) -> dict:
        """As JSON-ready strings, for a child process. Built in chapter 08."""
        return {k: None if v is None else str(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "Work":
        """The inverse of ``to_dict``. Built in chapter 08."""
        return cls(**{k: None if v is None else Path(v) for k, v in values.items()})


def write_request(path: Path, c: BenchConfig, work: Work) -> None:
    """What a child process needs, as JSON at ``path`` (atomically): the config and the run's folders. Built in
    chapter 08."""
    write_json(path, {"config": c.to_dict(), "work": work.to_dict()})


def read_request(path: Path) -> tuple[BenchConfig, Work]:
    """The inverse of ``write_request``. Built in chapter 08."""
    raw = json.loads(Path(path).read_text())
    return BenchConfig.from_dict(raw["config"]), Work.from_dict(raw["work"])


def parser(description: str = "") -> argparse.ArgumentParser:
    """The benchmark's command line (``--help``): every option and its default. Built in chapter 08."""
    p = argparse.ArgumentParser(description=description)
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
    p.add_argument("--read", choices=READS, default="direct",
                   help="how the streamer reads its blocks (helpers.reader; default direct, which falls back to "
                        "buffered where the file system refuses O_DIRECT)")
    p.add_argument("--batch", type=int, default=None, help="prompts per pass (default 4; 1 with --shape)")
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--dtype", choices=COMPUTE_DTYPES, default=None,
                   help="default fp32; bf16 with --shape; fp16 is a T4's compute dtype")
    p.add_argument("--repeat", type=int, default=2, help="timed passes per variant and round (best counts)")
    p.add_argument("--rounds", type=int, default=3, help="measure every variant this many times, interleaved")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the temporary model goes (default: a temp dir); kept, only what the run made in it "
                        "is removed")
    return p


def parse(p: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> BenchConfig:
    """``argv`` read by ``p`` (``parser()``) into a checked ``BenchConfig``; a bad option exits with ``p.error``
    (code 2) before anything is written, ``--device cuda`` without CUDA included. Built in chapter 08."""
    c = BenchConfig.from_args(p.parse_args(argv))
    if min(c.batch, c.seq, c.repeat, c.rounds, c.passes, c.layers) < 1:
        p.error(f"--batch {c.batch}, --seq {c.seq}, --repeat {c.repeat}, --rounds {c.rounds}, --passes {c.passes} "
                f"and --layers {c.layers} must be >= 1")
    if c.device == "cuda" and not torch.cuda.is_available():  # at once: before a byte is written
        p.error("--device cuda, but torch sees no CUDA GPU here (torch.cuda.is_available() is False; torch "
                f"{torch.__version__}, built for CUDA {torch.version.cuda}); run with --device cpu, or on a GPU "
                "machine")
    if c.workdir is not None and not c.workdir.is_dir():
        p.error(f"--workdir {c.workdir} is not an existing folder")
    if c.shape is not None and c.small:
        p.error("--small is the default mode's model; with --shape choose --layers")
    return c


def make_config(base: dict, size: int, dtype: str) -> dict:
    """Enough decoder layers on ``base`` for the weights to reach ``size`` bytes: the default mode's model.
    Built in chapter 08."""
    from transformers import LlamaConfig

    from helpers.arithmetic import block_bytes

    one = block_bytes(LlamaConfig(**base, num_hidden_layers=1), dtype)
    layer, rest = one["model.layers.0"], sum(v for k, v in one.items() if k != "model.layers.0")
    return dict(base, num_hidden_layers=max(2, math.ceil((size - rest) / layer)), max_position_embeddings=4096)
