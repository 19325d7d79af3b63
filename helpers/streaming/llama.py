"""The Llama adapter: everything layer streaming needs from transformers, in one file.

Built in chapter 08. The streamer's engine knows blocks and a step to run on each; this module knows what a
Llama-family model is made of and how transformers runs it: the skeleton built on ``meta``, each block's
``Role``, the rotary embeddings, the causal mask, the KV cache (made, cropped, shared, forgotten), and the
call of a decoder layer. When transformers changes one of these, this file changes, and nothing else.

It runs the Llama family: Llama, and Mistral and Qwen2, whose decoder layers are Llama's with other names
(``SUPPORTED_MODEL_TYPES``); any other ``model_type`` is refused before a weight is read.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch

__all__ = ["SUPPORTED_MODEL_TYPES", "check_architecture", "written_causal_mask", "Role", "Block", "llama_blocks",
           "Llama", "ForwardState", "ScoreState"]

# model_type -> why its decoder layers run unchanged under the streamer's Llama forward
SUPPORTED_MODEL_TYPES = {
    "llama": "the reference",
    "mistral": "Llama's layer; a sliding window, when set, is checked against every pass's length",
    "qwen2": "Llama's layer with biases on q, k and v (weights like any other); sliding layers are checked "
             "as Mistral's",
}


def check_architecture(config) -> Optional[int]:
    """Refuse a config whose layers the streamer's Llama forward would compute wrongly; return its sliding
    window (the longest sequence, cache included, a pass may have), or None when attention is plain causal.

    ``ValueError`` naming the ``model_type`` for anything outside ``SUPPORTED_MODEL_TYPES`` (Gemma, for one,
    scales its embeddings and norms differently) or for layer types other than full and sliding attention.
    Built in chapter 08.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported by LayerStreamer, which computes a Llama-family "
                         f"forward pass; supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}")
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if not layer_types <= {"full_attention", "sliding_attention"}:
        raise ValueError(f"model_type {model_type!r} with layer_types {sorted(layer_types)}: LayerStreamer runs "
                         "full (and, up to the window, sliding) attention only")
    window = getattr(config, "sliding_window", None)
    if model_type == "mistral" or "sliding_attention" in layer_types:
        return window
    return None


def written_causal_mask(device_type: str, capability: Optional[tuple[int, int]], *,
                        attn_implementation: Optional[str], gqa: bool) -> bool:
    """Whether every layer gets its causal mask written out, rather than None and SDPA's ``is_causal``.
    Built in chapter 08.

    True only for SDPA attention with GQA on a CUDA GPU older than sm80 (a T4 is (7, 5)). With no mask,
    transformers 5.24 (``use_gqa_in_sdpa`` in ``transformers/integrations/sdpa_attention.py``) passes
    ``enable_gqa=True``; flash attention needs sm80, PyTorch's memory-efficient kernel refuses GQA (up to
    torch 2.13), so the MATH kernel runs and writes out the batch x heads x q x kv score matrix in fp32
    (``helpers.attention.sdpa_backend``). With a mask, transformers repeats the key/value heads itself (one
    query token: it folds the query heads instead) and the memory-efficient kernel runs. Elsewhere the
    ``is_causal`` path is as fast or faster, and the outputs are the same either way.
    """
    if not isinstance(device_type, str) or not isinstance(gqa, bool):
        raise ValueError(f"device_type {device_type!r} must be a str and gqa {gqa!r} a bool")
    if capability is not None and (not isinstance(capability, tuple) or len(capability) != 2
                                   or not all(isinstance(x, int) and not isinstance(x, bool) for x in capability)):
        raise ValueError(f"capability {capability!r} must be None or a (major, minor) tuple of ints")
    return (device_type == "cuda" and capability is not None and capability < (8, 0)
            and attn_implementation == "sdpa" and gqa)


class Role(enum.Enum):
    """What a block does in a Llama-family forward pass. Built in chapter 08."""

    EMBED = "embed_tokens"  # token ids -> hidden states
    LAYER = "layers"  # one decoder layer: hidden -> hidden, with its KV cache
    NORM = "norm"  # the final norm
    HEAD = "lm_head"  # hidden -> logits


@dataclass(frozen=True)
class Block:
    """One block of the model's skeleton: its name on disk, its role, the module that computes it.
    Built in chapter 08."""

    name: str
    role: Role
    module: torch.nn.Module = field(repr=False)
    layer: Optional[int] = None  # Role.LAYER: the decoder layer's index (its place in the KV cache)

    def attach(self, state: Mapping[str, torch.Tensor]) -> None:
        """Give the module these tensors as its weights (no copy: the module now holds them)."""
        self.module.load_state_dict(state, strict=True, assign=True)

    def detach(self) -> None:
        """Send the module's weights back to ``meta``: it holds no memory, and a mapped file is unmapped."""
        self.module.to("meta")


def llama_blocks(model: torch.nn.Module, names: Sequence[str]) -> list[Block]:
    """The blocks ``names`` with their roles, found by which module each name *is* in a Llama-family model.

    Llama-family models (Llama, Mistral, Qwen2, SmolLM2, ...) are ``model.model.embed_tokens``,
    ``model.model.layers[i]``, ``model.model.norm`` and ``model.lm_head``; ``names`` must be those blocks, in
    that order (``helpers.layout`` names and orders them so). Built in chapter 08.
    """
    decoder = getattr(model, "model", None)
    parts = {"model.embed_tokens": getattr(decoder, "embed_tokens", None),
             "model.layers": getattr(decoder, "layers", None), "model.norm": getattr(decoder, "norm", None),
             "lm_head": getattr(model, "lm_head", None)}
    if any(part is None for part in parts.values()):
        raise ValueError(f"{type(model).__name__} is not a Llama-family model: the streamer needs "
                         f"{', '.join(parts)}; it lacks {', '.join(k for k, v in parts.items() if v is None)}")
    roles = {id(parts["model.embed_tokens"]): (Role.EMBED, None), id(parts["model.norm"]): (Role.NORM, None),
             id(parts["lm_head"]): (Role.HEAD, None),
             **{id(layer): (Role.LAYER, i) for i, layer in enumerate(parts["model.layers"])}}
    blocks = []
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if module is None or id(module) not in roles:
            raise ValueError(f"block {name!r} is none of a Llama-family model's blocks (model.embed_tokens, "
                             "model.layers.<i>, model.norm, lm_head)")
        role, layer = roles[id(module)]
        blocks.append(Block(name, role, module, layer))
    n = len(parts["model.layers"])
    expected = [(Role.EMBED, None), *[(Role.LAYER, i) for i in range(n)], (Role.NORM, None), (Role.HEAD, None)]
    if [(b.role, b.layer) for b in blocks] != expected:
        raise ValueError(f"blocks {list(names)} are not a forward pass in order; expected model.embed_tokens, "
                         f"model.layers.0 to model.layers.{n - 1}, model.norm, lm_head")
    return blocks


@dataclass
class ForwardState:
    """What a forward pass carries from block to block, and what it was asked. Built in chapter 08."""

    ids: torch.Tensor  # (batch, seq) the new tokens
    mask: Optional[torch.Tensor] = None  # (batch, past + seq) 1 for real tokens; None: all real
    cache: object = None  # a KV cache, extended by the pass (None: no cache)
    position_ids: Optional[torch.Tensor] = None  # (batch, seq); None: after the cache's tokens
    last_only: bool = False  # logits of the last position only
    hidden: Optional[torch.Tensor] = None  # (batch, seq, hidden) activations
    causal_mask: Optional[torch.Tensor] = None  # what every layer applies (None: the attention's own causal path)
    position_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # rotary cos and sin
    logits: Optional[torch.Tensor] = None  # (batch, seq or 1, vocab), float32


@dataclass
class ScoreState:
    """One question of ``score``/``score_many``: its inputs, and what it carries from block to block.
    Built in chapter 08."""

    prefix_ids: torch.Tensor  # (1, P) the shared prefix
    suffix: torch.Tensor  # (n, S) the suffixes, right-padded with 0
    lengths: torch.Tensor  # (n,) each suffix's real length
    suffix_mask: torch.Tensor  # (n, 1, S, P + S) what each suffix token may see (bool, or additive for eager)
    cache: object = None  # the prefix's K and V, one layer at a time
    prefix: Optional[torch.Tensor] = None  # (1, P, hidden) activations of the prefix
    suffixes: Optional[torch.Tensor] = None  # (n, S, hidden) activations of the suffixes
    prefix_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # rotary cos, sin at 0 .. P - 1
    prefix_mask: Optional[torch.Tensor] = None  # the prefix's causal mask (None: the attention's own causal path)
    suffix_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # ... at P .. P + S - 1
    hidden: Optional[torch.Tensor] = None  # (n, 1 + S, hidden) after the norm: the prefix's last token, the suffix
    scores: Optional[torch.Tensor] = None  # (n,) float32

    @property
    def carried_elements(self) -> int:
        """Activations carried between blocks, in elements of the hidden size: the prefix and every suffix."""
        return self.prefix_ids.shape[1] + self.suffix.numel()


class Llama:
    """A Llama-family model's skeleton on ``meta`` and how transformers runs it, block by block. Built in
    chapter 08.

    ``checkpoint``: a folder with ``config.json``. The config is checked (``check_architecture``) before anything
    else; the skeleton costs no memory; only the rotary embedding's small buffers are real, on ``device``.
    ``find_blocks`` names its blocks as they lie on disk.
    """

    def __init__(self, checkpoint: Union[str, Path], *, device: torch.device, dtype: Optional[torch.dtype],
                 attn_implementation: Optional[str] = None):
        from transformers import AutoConfig, AutoModelForCausalLM

        from helpers.meta import parse_dtype

        self.config = AutoConfig.from_pretrained(checkpoint)
        self.sliding_window = check_architecture(self.config)  # before any weight file is opened
        self.device = device
        self.dtype = dtype or parse_dtype(self.config.dtype or "float32")
        extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype, **extra).eval()
        self.blocks: list[Block] = []
        rotary = self.model.model.rotary_emb  # buffers only: rebuilt for real on the device
        self.rotary_emb = type(rotary)(config=self.model.config).to(device)
        device = torch.device(device)
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        heads = self.config.num_attention_heads
        self.written_mask = written_causal_mask(  # masks made by create_causal_mask, never None (a T4 with GQA)
            device.type, capability, attn_implementation=self.model.config._attn_implementation,
            gqa=(getattr(self.config, "num_key_value_heads", None) or heads) < heads)

    def find_blocks(self, names: Sequence[str]) -> list[Block]:
        """The skeleton's blocks for the block names on disk, in execution order (``llama_blocks``)."""
        self.blocks = llama_blocks(self.model, names)
        return self.blocks

    @property
    def eager(self) -> bool:
        """Whether attention is transformers' eager implementation, which needs masks written out."""
        return self.model.config._attn_implementation == "eager"

    # ------------------------------------------------------------------ the KV cache
    def new_cache(self):
        """An empty KV cache for this model (transformers' ``DynamicCache``)."""
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    @staticmethod
    def cache_argument(cache) -> dict:
        """How a transformers model's ``forward`` takes a KV cache: ``cache=`` from 5.24 (``past_key_values`` is
        deprecated there), ``past_key_values=`` before."""
        import inspect

        from transformers import LlamaForCausalLM

        takes = inspect.signature(LlamaForCausalLM.forward).parameters
        return {"cache": cache} if "cache" in takes else {"past_key_values": cache}

    @staticmethod
    def cached_tokens(cache) -> int:
        """How many positions ``cache`` holds (0 for None)."""
        return 0 if cache is None else cache.get_seq_length()

    @staticmethod
    def crop(cache, length: int) -> None:
        """Forget every position of ``cache`` from ``length`` on, in every layer. (A negative count to remove:
        transformers 5.24 refuses the positive length ``crop`` once took, and older releases read both.)"""
        remove = cache.get_seq_length() - length
        if remove < 0:
            raise ValueError(f"cannot crop a cache of {cache.get_seq_length()} positions to {length}")
        if remove:
            cache.crop(-remove)

    def check_window(self, length: int) -> None:
        """A sliding-window model (Mistral, some Qwen2) runs unchanged only while every sequence fits the window."""
        if self.sliding_window is not None and length > self.sliding_window:
            raise ValueError(f"a pass over {length} positions exceeds the sliding window of {self.sliding_window} "
                             f"of this {self.config.model_type} model; LayerStreamer computes full causal attention, "
                             "equal to the model's only up to the window")

    # ------------------------------------------------------------------ a forward pass, block by block
    def forward_step(self, s: ForwardState, block: Block) -> None:
        """Run ``s``'s batch through one block: what ``forward`` and ``generate`` do at each block."""
        from transformers.masking_utils import create_causal_mask

        if block.role is Role.EMBED:
            s.hidden = block.module(s.ids).to(self.dtype)
            if s.position_ids is None:
                past = self.cached_tokens(s.cache)
                s.position_ids = torch.arange(past, past + s.ids.shape[1], device=self.device)[None]
            s.causal_mask = create_causal_mask(config=self.model.config, inputs_embeds=s.hidden,
                                               attention_mask=s.mask, cache=s.cache, position_ids=s.position_ids,
                                               allow_is_causal_skip=not self.written_mask)
            s.position_embeddings = self.rotary_emb(s.hidden, position_ids=s.position_ids)
        elif block.role is Role.LAYER:
            s.hidden = block.module(s.hidden, attention_mask=s.causal_mask, position_ids=s.position_ids,
                                    cache=s.cache, use_cache=s.cache is not None,
                                    position_embeddings=s.position_embeddings)
        elif block.role is Role.NORM:
            s.hidden = block.module(s.hidden[:, -1:] if s.last_only else s.hidden)
        elif block.role is Role.HEAD:
            s.logits = block.module(s.hidden).float()

    # ------------------------------------------------------------------ scoring: a shared prefix, many suffixes
    def question(self, prefix: torch.Tensor, suffixes: Sequence[torch.Tensor]) -> ScoreState:
        """Lay out one question (a (1, P) prefix, n 1-D suffixes) for ``score_step``; nothing is computed yet."""
        n, P = len(suffixes), prefix.shape[1]
        lengths = torch.tensor([len(x) for x in suffixes], device=self.device)
        S = int(lengths.max())
        self.check_window(P + S)
        suffix = torch.zeros(n, S, dtype=torch.long, device=self.device)
        for i, x in enumerate(suffixes):  # right padding: causal attention never lets a real token see it
            suffix[i, :len(x)] = x
        allowed = torch.arange(P + S, device=self.device)[None] <= P + torch.arange(S, device=self.device)[:, None]
        suffix_mask = allowed[None, None].expand(n, 1, S, P + S)
        if self.eager:
            suffix_mask = torch.zeros(suffix_mask.shape, dtype=self.dtype, device=self.device).masked_fill(
                ~suffix_mask, torch.finfo(self.dtype).min)
        return ScoreState(prefix_ids=prefix, suffix=suffix, lengths=lengths, suffix_mask=suffix_mask,
                          cache=self.new_cache())

    def score_step(self, s: ScoreState, block: Block) -> None:
        """Run one question through one block; a layer's cache is forgotten once its suffixes have used it."""
        from transformers.masking_utils import create_causal_mask

        n, S = s.suffix.shape
        P = s.prefix_ids.shape[1]
        if block.role is Role.EMBED:
            s.prefix, s.suffixes = block.module(s.prefix_ids).to(self.dtype), block.module(s.suffix).to(self.dtype)
            prefix_positions = torch.arange(P, device=self.device)[None]
            s.prefix_embeddings = self.rotary_emb(s.prefix, prefix_positions)
            # the prefix's own causal mask, as the model builds it (None for sdpa: its is_causal path, but see
            # written_causal_mask)
            s.prefix_mask = create_causal_mask(config=self.model.config, inputs_embeds=s.prefix,
                                               attention_mask=None, cache=s.cache, position_ids=prefix_positions,
                                               allow_is_causal_skip=not self.written_mask)
            s.suffix_embeddings = self.rotary_emb(s.suffixes, torch.arange(P, P + S, device=self.device)[None])
        elif block.role is Role.LAYER:
            s.prefix = block.module(s.prefix, attention_mask=s.prefix_mask, cache=s.cache, use_cache=True,
                                    position_embeddings=s.prefix_embeddings)
            layer = s.cache.layers[block.layer]  # the prefix's K and V, shared (not copied) by every suffix
            layer.keys, layer.values = layer.keys.expand(n, -1, -1, -1), layer.values.expand(n, -1, -1, -1)
            s.suffixes = block.module(s.suffixes, attention_mask=s.suffix_mask, cache=s.cache, use_cache=True,
                                      position_embeddings=s.suffix_embeddings)
            layer.keys = layer.values = None  # not needed again
        elif block.role is Role.NORM:
            s.hidden = block.module(torch.cat([s.prefix[:, -1:].expand(n, -1, -1), s.suffixes], dim=1))
        elif block.role is Role.HEAD:
            logp = torch.log_softmax(block.module(s.hidden[:, :-1]).float(), dim=-1)
            token_logp = logp.gather(-1, s.suffix[..., None])[..., 0]
            real = torch.arange(S, device=self.device)[None] < s.lengths[:, None]
            s.scores = (token_logp * real).sum(-1)
