"""Layout: where a model's blocks lie on disk. The one description every chapter reads.

The ground floor, beside ``tensorfiles`` (which reads and writes the files themselves). A *block* is what a
streamer or an offloader moves as one: a numbered decoder layer (``model.layers.3``), or a module around the
layers (``model.embed_tokens``, ``model.norm``, ``lm_head``). This module owns:

* **naming**: which block a tensor belongs to (``block_of``) and the order a forward pass visits blocks in
  (``block_order``), for every architecture the book meets (``INPUT_BLOCKS``);
* **the tied head**: a head tied to the input embedding is a block without bytes of its own that reads the
  embedding's table (``is_tied``);
* **the split rule**: which tensors of which files make up each block (``group_blocks``), used alike by chapter
  03's ``split_by_layer``, which writes one file per block, and by chapter 08's streamer, which reads the
  blocks in place from the shards;
* **the formats**: a sharded checkpoint (``model.safetensors.index.json``: ``weight_map``, ``save_sharded``) and
  a per-layer split (``layers.index.json``: ``LayerIndex``), and where each block's bytes lie in either
  (``block_layout``: a list of ``Piece``, byte ranges of files).

A split may store its linear weights compressed; how is a ``Codec``'s business (``helpers.quant`` has the
codecs). The split records the codec's name; nothing here decodes a byte.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Protocol, Sequence, Union

import torch

from .tensorfiles import ST_DTYPES, CheckpointError, Header, read_header, read_range, write_json, write_safetensors

__all__ = [
    "INDEX", "SINGLE", "LAYERS_INDEX", "LAYERS_FORMAT", "INPUT_BLOCKS", "TOKEN_TABLES", "HEAD",
    "block_of", "block_order", "is_tied", "group_blocks", "Codec",
    "weight_map", "pack_shards", "shard_name", "save_sharded",
    "LayerIndex", "read_layer_index", "Piece", "pieces_of", "BlockLayout", "layout_kind", "block_layout",
]

PathLike = Union[str, Path]
Spec = tuple[str, Sequence[int], torch.dtype]
INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"
LAYERS_INDEX, LAYERS_FORMAT = "layers.index.json", "helpers-layers/1"
HEAD = "lm_head"  # the output head's block, in every architecture transformers' causal LMs share
# The blocks a forward pass visits *before* the decoder layers, by the last part of their name, per architecture;
# every other block that is not a layer (a final norm) comes after them, and the head last.
INPUT_BLOCKS = {
    "embed_tokens": "Llama, Mistral, Qwen2, SmolLM2",
    "wte": "GPT-2, MPT, StarCoder (token embedding)",
    "wpe": "GPT-2, StarCoder (position embedding)",
    "word_embeddings": "BLOOM, Falcon",
    "word_embeddings_layernorm": "BLOOM",
}
TOKEN_TABLES = ("embed_tokens", "wte", "word_embeddings")  # of those, the token table a tied head reads
_LAYER = re.compile(r"^(.+?\.\d+)(?:\.|$)")  # the first numbered part of a name: model.layers.3, transformer.h.0
_PART = re.compile(r"\.weight\..+$")  # a part of a weight stored in parts: lm_head.weight.absmax, ...quant_map


# --------------------------------------------------------------------------- naming

def block_of(name: str) -> str:
    """The block a tensor belongs to: its numbered decoder layer (``model.layers.3``), else its module
    (``model.embed_tokens.weight`` -> ``model.embed_tokens``). A part of a weight stored in parts (a codec's
    ``lm_head.weight.absmax``, bitsandbytes' ``lm_head.weight.quant_state.bitsandbytes__nf4``) goes where its
    weight goes. Built in chapter 03."""
    match = _LAYER.match(name)
    return match.group(1) if match else _PART.sub(".weight", name).rsplit(".", 1)[0]


def block_order(block: str) -> tuple:
    """Sort key of a forward pass's order: input blocks (``INPUT_BLOCKS``), the layers by number, the rest
    (a final norm), the head. Built in chapter 03."""
    layer = _LAYER.match(block)
    if block == HEAD:
        return (3, 0)
    if layer and layer.group(1) == block:
        return (1, int(block.rsplit(".", 1)[1]))
    return (0, 0) if block.rsplit(".", 1)[-1] in INPUT_BLOCKS else (2, 0)


def is_tied(names: Sequence[str], config: Mapping) -> bool:
    """Whether the head is tied to the input embedding: the config says so, or the checkpoint stores no head
    weight (``lm_head.weight``) at all. Built in chapter 03."""
    return f"{HEAD}.weight" not in names or bool(config.get("tie_word_embeddings", False))


def group_blocks(names: Mapping[str, str], tied: bool) -> dict[str, dict[str, dict[str, str]]]:
    """The split rule: ``{block: {file: {tensor name in the file: name inside the block}}}``, in execution order.

    ``names``: ``{tensor name: file}``, a checkpoint's weight map. Each tensor goes to ``block_of`` its name;
    a tied head is a block of its own that reads the token embedding's table as its ``weight`` (and a stored
    ``lm_head.weight`` of a tied model, the same values, is left out); ``ValueError`` if there is no such
    table. Built in chapter 03.
    """
    blocks: dict[str, dict[str, dict[str, str]]] = {}
    for name, file in names.items():
        if tied and name == f"{HEAD}.weight":
            continue
        block = block_of(name)
        blocks.setdefault(block, {}).setdefault(file, {})[name] = name[len(block) + 1:]
    ordered = {b: blocks[b] for b in sorted(blocks, key=block_order)}
    if tied:
        tables = [f"{b}.weight" for b in ordered if b.rsplit(".", 1)[-1] in TOKEN_TABLES and f"{b}.weight" in names]
        if not tables:
            raise ValueError(f"{HEAD} is tied to the input embedding, but no tensor is a token embedding's table "
                             f"(a block named {' or '.join(TOKEN_TABLES)} with a weight)")
        ordered[HEAD] = {names[tables[0]]: {tables[0]: "weight"}}
    return ordered


class Codec(Protocol):
    """How a compressed split stores a block's tensors (``helpers.quant`` has the codecs; chapter 03's
    ``split_by_layer`` is handed one). ``name`` is recorded in the split's index."""

    name: str

    def specs(self, specs: Sequence[Spec]) -> list[Spec]:
        """``(name, shape, dtype)`` of what is stored for tensors of these specs; raises for one it cannot store."""

    def compress(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A block's tensors as the split stores them."""

    def decompress(self, state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The inverse of ``compress``, in ``dtype``, on the device the stored tensors are on."""


# --------------------------------------------------------------------------- sharded checkpoints

def weight_map(path: PathLike) -> tuple[Path, dict[str, str]]:
    """``(folder, {tensor name: file name})`` for a checkpoint folder, its index file, or a single file.

    Understands ``model.safetensors.index.json``, a lone ``model.safetensors``, and a per-layer split.
    Built in chapter 03.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return path.parent, {k: path.name for k in read_header(path).tensors}
    if path.is_file() and path.name == LAYERS_INDEX:
        return weight_map(path.parent)
    root = path.parent if path.is_file() else path
    index = path if path.is_file() else root / INDEX
    if path.is_dir() and not index.is_file() and (root / LAYERS_INDEX).is_file():
        files = read_layer_index(root).files.values()
        return root, {k: f for f in files for k in read_header(root / f).tensors}
    if index.is_file():
        try:
            return root, dict(json.loads(index.read_text())["weight_map"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(index, [f"{index.name}: not a valid index with a weight_map ({e!r})"]) from None
    if (root / SINGLE).is_file():
        return weight_map(root / SINGLE)
    raise FileNotFoundError(f"{path} is not a safetensors checkpoint: expected a .safetensors file or a "
                            f"folder with {INDEX}, {SINGLE} or {LAYERS_INDEX}")


def pack_shards(specs: Sequence[Spec], shard_bytes: int) -> list[list[Spec]]:
    """Greedy packing in the given order: a new shard starts when the next tensor would pass ``shard_bytes``.

    helpers' own policy, so the files it writes do not move when transformers changes how ``save_pretrained``
    shards. A tensor bigger than ``shard_bytes`` gets a shard of its own. Built in chapter 00.
    """
    if shard_bytes <= 0:
        raise ValueError(f"shard_bytes {shard_bytes!r} must be more than 0")
    shards: list[list] = [[]]
    used = 0
    for name, shape, dtype in specs:
        size = int(torch.Size(shape).numel()) * dtype.itemsize
        if shards[-1] and used + size > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape, dtype))
        used += size
    return shards


def shard_name(i: int, n: int) -> str:
    """The file name transformers gives shard ``i`` of ``n`` (counting from 1). Built in chapter 00."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def save_sharded(directory: PathLike, specs: Sequence[Spec], make: Callable[[str], torch.Tensor],
                 shard_bytes: int, *, bar=None) -> dict[str, str]:
    """Write tensors as shards of at most ``shard_bytes`` plus ``model.safetensors.index.json``; returns the
    weight map. ``make(name)`` gives each tensor as it is written (``tensorfiles.write_safetensors``), so peak
    memory is one tensor. Built in chapter 00."""
    directory = Path(directory)
    shards = pack_shards(specs, shard_bytes)
    weights: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        write_safetensors(directory / shard_name(i, len(shards)), shard, make, metadata={"format": "pt"}, bar=bar)
        weights.update({name: shard_name(i, len(shards)) for name, _, _ in shard})
    total = sum(int(torch.Size(shape).numel()) * dtype.itemsize for _, shape, dtype in specs)
    params = sum(int(torch.Size(shape).numel()) for _, shape, _ in specs)
    write_json(directory / INDEX, {"metadata": {"total_parameters": params, "total_size": total},
                                   "weight_map": weights})
    return weights


# --------------------------------------------------------------------------- per-layer splits

@dataclass(frozen=True)
class LayerIndex:
    """``layers.index.json``: a checkpoint split into one file per block (chapter 03), in execution order."""

    blocks: list[str]  # execution order; a tied lm_head is a block without a file of its own
    files: dict[str, str]  # block -> file name
    tied: dict[str, str]  # tensor -> the tensor it is stored as (lm_head.weight -> model.embed_tokens.weight)
    bytes: dict[str, int]  # block -> data bytes of its file
    compression: Optional[str] = None  # the name of the Codec that stored its linear weights; None: as they were

    def tied_source(self, block: str) -> Optional[tuple[str, str, str]]:
        """For a block stored as another block's tensor: ``(source block, source tensor, tensor)``, else None."""
        for target, source in self.tied.items():
            if target.startswith(block + ".") and block not in self.files:
                owner = next(b for b in self.files if source.startswith(b + "."))
                return owner, source, target
        return None

    def write(self, directory: PathLike) -> None:
        """Write it as ``layers.index.json`` in ``directory``, atomically."""
        write_json(Path(directory) / LAYERS_INDEX, {
            "format": LAYERS_FORMAT, "blocks": self.blocks, "files": self.files, "tied": self.tied,
            "bytes": self.bytes, "total_size": sum(self.bytes.values()), "compression": self.compression})


def read_layer_index(directory: PathLike) -> LayerIndex:
    """Read and check the ``layers.index.json`` of a per-layer split. Built in chapter 03.

    ``compression`` is the name of the codec the split was written with, or None; which names exist is the
    codecs' business (``helpers.quant.codec``), so any string is read here.
    """
    path = Path(directory) / LAYERS_INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{Path(directory)} has no {LAYERS_INDEX}: it is not a complete per-layer split "
                                "(make one with helpers.checkpoints.split_by_layer)")
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != LAYERS_FORMAT:
            raise ValueError(f"format {raw.get('format')!r}; expected {LAYERS_FORMAT!r}")
        compression = raw["compression"]
        if compression is not None and not (isinstance(compression, str) and compression):
            raise ValueError(f"compression {compression!r}; expected null or a codec's name")
        index = LayerIndex(list(raw["blocks"]), dict(raw["files"]), dict(raw["tied"]), dict(raw["bytes"]),
                           compression)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(path, [f"{path.name}: not a layer index helpers can read ({e})"]) from None
    orphans = [b for b in index.blocks if b not in index.files and index.tied_source(b) is None]
    if orphans:
        raise CheckpointError(path, [f"{path.name}: block(s) {orphans} have no file and no tied source"])
    return index


# --------------------------------------------------------------------------- where each block's bytes are

@dataclass(frozen=True)
class Piece:
    """A contiguous byte range of one file holding some of a block's tensors: what one read (or map) fetches.
    Built in chapter 08."""

    path: Path
    start: int  # from the file's first byte
    length: int
    tensors: dict = field(repr=False)  # name in the block -> (torch dtype, shape, offset in the piece)

    def views(self, data: torch.Tensor) -> dict[str, torch.Tensor]:
        """The piece's tensors as views of ``data`` (its ``length`` bytes, uint8): nothing is copied."""
        out = {}
        for name, (dtype, shape, offset) in self.tensors.items():
            raw = data[offset:offset + int(torch.Size(shape).numel()) * dtype.itemsize]
            if raw.storage_offset() % dtype.itemsize:  # unaligned (never in files safetensors writes): copy
                raw = raw.clone()
            out[name] = raw.view(dtype).reshape(shape)
        return out

    def read(self, name: str) -> torch.Tensor:
        """One of the piece's tensors, read from the file on its own (for small metadata such as a quantization
        state read once; a block's weights come through ``helpers.reader``)."""
        dtype, shape, offset = self.tensors[name]
        data, _ = read_range(self.path, self.start + offset, int(torch.Size(shape).numel()) * dtype.itemsize)
        return data.view(dtype).reshape(shape)


def pieces_of(header: Header, names: Mapping[str, str]) -> list[Piece]:
    """The tensors ``names`` ({name in the file: name in the block}) of one file, as the fewest contiguous ranges.

    In files safetensors writes, one layer's tensors of one dtype are contiguous: a block is one range per
    file (two when its norms are stored in another dtype). Offsets are checked against the file here, so a
    corrupt header is a ``CheckpointError`` before anything is read. Built in chapter 08.
    """
    entries, problems = [], []
    for name in names:
        info = header.tensors.get(name)
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            dtype, shape = ST_DTYPES[info["dtype"]], [int(x) for x in info["shape"]]
        except (KeyError, TypeError, ValueError):
            problems.append(f"{header.path.name}: no readable entry for tensor {name!r}")
            continue
        if not 0 <= begin <= end <= header.data_bytes or end - begin != torch.Size(shape).numel() * dtype.itemsize:
            problems.append(f"{header.path.name}: tensor {name!r} has data_offsets [{begin}, {end}], which do not "
                            f"fit its {info['dtype']} {shape} inside the file's {header.data_bytes:,} data bytes")
            continue
        entries.append((begin, end, name, dtype, shape))
    if problems:
        raise CheckpointError(header.path, problems)
    runs: list[list] = []  # [start, end, {name in block: (dtype, shape, begin)}], offsets in the data region
    for begin, end, name, dtype, shape in sorted(entries, key=lambda e: (e[0], e[1])):
        if not runs or begin > runs[-1][1]:
            runs.append([begin, end, {}])
        runs[-1][1] = max(runs[-1][1], end)
        runs[-1][2][names[name]] = (dtype, shape, begin)
    return [Piece(header.path, header.data_start + start, end - start,
                  {k: (dtype, shape, begin - start) for k, (dtype, shape, begin) in tensors.items()})
            for start, end, tensors in runs]


@dataclass(frozen=True)
class BlockLayout:
    """Where each block of a model is on disk: a per-layer split, or an ordinary checkpoint read in place.

    ``kind``: "split" or "checkpoint". ``blocks``: execution order (embedding, layers, norm, lm_head).
    ``pieces[block]``: the byte ranges to read for it, each with its tensors' names inside the block
    (``self_attn.q_proj.weight``); a tied ``lm_head`` reads the embedding's table as ``weight``.
    ``compression``: the codec a split stores its linear weights with (None for a checkpoint).
    Built in chapter 08.
    """

    root: Path
    kind: str
    blocks: list[str]
    pieces: dict[str, list[Piece]] = field(repr=False)
    compression: Optional[str] = None

    def bytes(self, block: str) -> int:
        """Bytes one read of ``block`` fetches: its ranges' lengths."""
        return sum(p.length for p in self.pieces[block])

    @property
    def files(self) -> list[Path]:
        """Every file a pass reads, once each, in the order of first use."""
        return list(dict.fromkeys(p.path for b in self.blocks for p in self.pieces[b]))


def layout_kind(path: PathLike) -> str:
    """"split" for a folder with ``layers.index.json``, "checkpoint" for one with ``model.safetensors.index.json``
    or ``model.safetensors``; ``FileNotFoundError`` naming the folder and both layouts otherwise. Reads
    nothing. Built in chapter 08."""
    path = Path(path)
    if path.is_dir() and (path / LAYERS_INDEX).is_file():
        return "split"
    if path.is_dir() and ((path / INDEX).is_file() or (path / SINGLE).is_file()):
        return "checkpoint"
    raise FileNotFoundError(f"{path} is neither a per-layer split (a folder with {LAYERS_INDEX}, made by "
                            f"helpers.checkpoints.split_by_layer) nor a safetensors checkpoint (a folder with "
                            f"{INDEX} and its shards, or with {SINGLE})")


def _pieces(headers: Mapping[str, Header], files: Mapping[str, Mapping[str, str]]) -> list[Piece]:
    return [p for file, names in files.items() for p in pieces_of(headers[file], names)]


def _split_layout(path: Path) -> BlockLayout:
    index = read_layer_index(path)
    missing = sorted({f for f in index.files.values() if not (path / f).is_file()})
    if missing:
        raise CheckpointError(path / LAYERS_INDEX, [f"{m}: block file is missing" for m in missing])
    headers = {f: read_header(path / f) for f in dict.fromkeys(index.files.values())}
    pieces = {}
    for block in index.blocks:
        if block in index.files:
            file = index.files[block]
            names = {k: k[len(block) + 1:] for k in headers[file].tensors}
        else:
            owner, source, target = index.tied_source(block)
            file, names = index.files[owner], {source: target[len(block) + 1:]}
        pieces[block] = _pieces(headers, {file: names})
    return BlockLayout(path, "split", list(index.blocks), pieces, index.compression)


def block_layout(path: PathLike) -> BlockLayout:
    """Read the headers of a per-layer split or a checkpoint once and say where each block's bytes are.

    ``path``: a folder with ``layers.index.json`` (a split, chapter 03), or a checkpoint folder with
    ``model.safetensors.index.json`` and its shards or a lone ``model.safetensors`` (read in place: nothing
    is written, no second copy). Either way the blocks are ``group_blocks``' (the split rule), so a checkpoint
    and its split have the same blocks in the same order. A missing file or a header that does not fit its
    file is a ``CheckpointError`` before any tensor is read. Built in chapter 08.
    """
    path = Path(path)
    if layout_kind(path) == "split":
        return _split_layout(path)
    root, names = weight_map(path)
    missing = sorted(set(names.values()) - {p.name for p in root.iterdir() if p.is_file()})
    if missing:
        raise CheckpointError(root, [f"{m}: shard file is missing; the index maps "
                                     f"{sum(v == m for v in names.values())} tensor(s) to it" for m in missing])
    headers = {f: read_header(root / f) for f in dict.fromkeys(names.values())}
    absent = [f"{f}: tensor {k!r} is in the index but not in the file" for k, f in names.items()
              if k not in headers[f].tensors]
    if absent:
        raise CheckpointError(root, absent)
    try:
        config = json.loads((root / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    try:
        groups = group_blocks(names, is_tied(list(names), config))
    except ValueError as e:
        raise CheckpointError(root, [str(e)]) from None
    return BlockLayout(root, "checkpoint", list(groups), {b: _pieces(headers, files) for b, files in groups.items()})
