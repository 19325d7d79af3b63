"""Speculative decoding over a streamed model: more tokens per pass. Built in chapter 09.

A streamed pass costs about the same for one token or a dozen (chapter 08: the bytes read set its time until
compute catches up), so a pass should carry as many useful tokens as it can. A small *draft* model, held in
memory, proposes a few tokens; one streamed pass of the big model verifies them all at once and keeps the
longest prefix its own greedy choice agrees with, plus one token of its own. The output is the big model's
greedy output, token for token; only the number of passes changes.

It lives beside ``LayerStreamer`` (``LayerStreamer.generate(..., draft=...)`` calls ``speculate``) because it is
one more policy over the same engine: a verification pass is a forward pass over several new tokens with the
prefix's KV cache, and the adapter crops the cache to what was accepted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .llama import ForwardState, Llama

Verify = Callable[[ForwardState, str], torch.Tensor]  # one streamed pass over a state: LayerStreamer.pass_logits

__all__ = ["Draft", "check_draft", "check_request", "speculate", "SpeculationStats", "CompressedLinear",
           "compressed_copy", "truncated_copy", "footprint_bytes"]


@dataclass
class SpeculationStats:
    """What one speculative generation did: the passes it made and the tokens each round accepted. Built in
    chapter 09."""

    passes: int = 0  # streamed passes, the prefill included
    accepted: list[int] = field(default_factory=list)  # per verification pass: draft tokens the target agreed with
    new_tokens: int = 0  # tokens generated

    @property
    def tokens_per_pass(self) -> float:
        """New tokens per streamed pass, the prefill's first token included."""
        return self.new_tokens / max(self.passes, 1)


class Draft:
    """A causal LM held in memory that proposes tokens greedily, with a KV cache of its own. Built in chapter 09.

    ``model``: any transformers causal LM sharing the target's tokenizer (a quantized copy of the same model, or
    a smaller one of its family), on the CPU or on the compute device. ``pending`` are tokens it has been told
    about but not yet run (the target's latest token, a proposal the target accepted whole).
    """

    def __init__(self, model, device: torch.device):
        from transformers import DynamicCache

        self.model, self.device = model, torch.device(device)
        self.cache = DynamicCache(config=model.config)
        self.pending: Optional[torch.Tensor] = None

    def start(self, ids: torch.Tensor) -> None:
        """Run the prompt (but its last token, which the first ``propose`` runs)."""
        if ids.shape[1] > 1:
            self._run(ids[:, :-1])
        self.pending = ids[:, -1:]

    def _run(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model(ids.to(self.device), **Llama.cache_argument(self.cache), use_cache=True)
        return out.logits[:, -1].to(ids.device)

    def propose(self, k: int) -> torch.Tensor:
        """``k`` greedy tokens after what it knows, as a (1, k) tensor; its cache then holds all but the last."""
        logits, tokens = self._run(self.pending), []
        for j in range(k):
            tokens.append(logits.argmax(-1, keepdim=True))
            if j + 1 < k:
                logits = self._run(tokens[-1])
        self.pending = None
        return torch.cat(tokens, dim=1)

    def accept(self, kept: int, proposal: torch.Tensor, correction: torch.Tensor) -> None:
        """The target kept the first ``kept`` tokens of ``proposal`` and added ``correction``: forget the rest."""
        length = self.cache.get_seq_length() - (proposal.shape[1] - 1)  # before the proposal's first token was run
        Llama.crop(self.cache, length + min(kept, proposal.shape[1] - 1))
        missing = proposal[:, proposal.shape[1] - 1:] if kept == proposal.shape[1] else proposal[:, :0]
        self.pending = torch.cat([missing, correction], dim=1)  # run at the next propose


def check_draft(draft, vocab_size: int, draft_tokens: int) -> None:
    """``ValueError`` for a draft the streamer cannot use, before anything is read: not a causal LM, another
    vocabulary, or ``draft_tokens`` < 1. Built in chapter 09."""
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 1:
        raise ValueError(f"draft_tokens {draft_tokens!r} must be an int >= 1 (tokens proposed per pass)")
    config = getattr(draft, "config", None)
    if not isinstance(draft, torch.nn.Module) or config is None or not hasattr(draft, "generate") \
            or getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"draft must be a transformers causal LM (AutoModelForCausalLM); got {type(draft).__name__}")
    if getattr(config, "vocab_size", None) != vocab_size:
        raise ValueError(f"draft's vocabulary has {getattr(config, 'vocab_size', None)} tokens, the streamed "
                         f"model's {vocab_size}: a draft must share the tokenizer")


def check_request(llama: Llama, ids: torch.Tensor, mask: Optional[torch.Tensor], max_new_tokens: int,
                  do_sample: bool, draft, draft_tokens: int) -> None:
    """Every refusal of ``generate(..., draft=...)``, before anything is read: a bad draft, sampling, more than
    one sequence or padding, a sliding window the verification would pass. Built in chapter 09."""
    check_draft(draft, llama.config.vocab_size, draft_tokens)
    if do_sample:
        raise ValueError("do_sample=True with a draft is not supported: speculative decoding here is greedy "
                         "(its output equals plain greedy decoding); sample without a draft")
    padded = mask is not None and not bool(mask.all())
    if ids.shape[0] != 1 or padded:
        raise ValueError(f"a draft verifies one sequence at a time; got a batch of {ids.shape[0]}"
                         + (" with padding" if padded else ""))
    llama.check_window(ids.shape[1] + max_new_tokens + draft_tokens)


def speculate(verify: Verify, llama: Llama, ids: torch.Tensor, max_new_tokens: int, draft, draft_tokens: int,
              eos_token_id: Optional[int] = None) -> tuple[torch.Tensor, SpeculationStats]:
    """Greedy generation of up to ``max_new_tokens`` after ``ids`` (1, P), each streamed pass (``verify``, the
    streamer's ``pass_logits``) checking ``draft_tokens`` tokens the draft proposed; ``llama`` makes and crops
    the cache. Returns the ids (prompt included) and what it did. Built in chapter 09."""
    stats = SpeculationStats()
    cache, drafter = llama.new_cache(), Draft(draft, _device_of(draft))
    logits = verify(ForwardState(ids, cache=cache, last_only=True), "prefill")
    new = logits[:, -1].argmax(-1, keepdim=True)               # the target's own first token
    drafter.start(torch.cat([ids, new], dim=1))
    out, stats.passes = [new], 1
    while sum(t.shape[1] for t in out) < max_new_tokens and not _ended(out, eos_token_id):
        k = min(draft_tokens, max_new_tokens - sum(t.shape[1] for t in out))
        proposal = drafter.propose(k)                          # the draft's guesses, cheap
        guesses = torch.cat([new, proposal], dim=1)            # one pass over the last token and the guesses
        logits = verify(ForwardState(guesses, cache=cache), f"verify {stats.passes}")
        choice = logits[0].argmax(-1)[None]                    # the target's own token after each position
        agree = (proposal == choice[:, :k])[0].int()
        kept = int(agree.cumprod(0).sum())                     # the longest prefix it agrees with
        new = choice[:, kept:kept + 1]                         # plus its own next token
        llama.crop(cache, llama.cached_tokens(cache) - k + kept)  # forget the guesses it did not keep
        drafter.accept(kept, proposal, new)
        out += [proposal[:, :kept], new]
        stats.passes += 1
        stats.accepted.append(kept)
    tokens = torch.cat(out, dim=1)[:, :max_new_tokens]
    tokens = _cut_at_eos(tokens, eos_token_id)
    stats.new_tokens = tokens.shape[1]
    return torch.cat([ids, tokens], dim=1).cpu(), stats


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _ended(out: list[torch.Tensor], eos_token_id: Optional[int]) -> bool:
    return eos_token_id is not None and any(bool((t == eos_token_id).any()) for t in out)


def _cut_at_eos(tokens: torch.Tensor, eos_token_id: Optional[int]) -> torch.Tensor:
    if eos_token_id is None:
        return tokens
    hits = (tokens[0] == eos_token_id).nonzero()
    return tokens if hits.numel() == 0 else tokens[:, :int(hits[0]) + 1]


# --------------------------------------------------------------------------- drafts a reader can build

class CompressedLinear(torch.nn.Module):
    """A linear layer that holds its weight as a codec stores it (``helpers.quant``: int8 rows, nf4 blocks) and
    decodes it at each call: the real compressed bytes in memory, at the cost of decoding. Built in chapter 09."""

    def __init__(self, linear: torch.nn.Linear, codec, name: str = "proj"):
        super().__init__()
        self.codec, self.out_features, self.name = codec, linear.out_features, f"{name}.weight"
        stored = codec.compress({self.name: linear.weight.detach()})  # stored as a split stores that weight
        self.parts = list(stored)
        for i, name in enumerate(self.parts):
            self.register_buffer(f"part{i}", stored[name])
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [getattr(self, f"part{i}") for i in range(len(self.parts))]  # in the codec's order
        return self.codec.linear(x, parts, self.bias)


def compressed_copy(model, codec):
    """A copy of ``model`` whose every linear projection holds its weight compressed by ``codec`` (the head too,
    unless it is tied to the embedding): a draft of the same model in a fraction of its bytes (QSpec,
    ML-SpecQD). Built in chapter 09."""
    import copy

    draft = copy.deepcopy(model).eval()
    tied = getattr(draft.config, "tie_word_embeddings", False)
    for name, module in list(draft.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and not (tied and child_name == "lm_head"):
                full = f"{name}.{child_name}" if name else child_name
                setattr(module, child_name, CompressedLinear(child, codec, full))
    return draft


def truncated_copy(model, layers: int):
    """A copy of ``model`` with only its first ``layers`` decoder layers, then its final norm and head: a smaller
    model of the same family that shares the tokenizer (an early-exit draft, as in Draft & Verify and LayerSkip).
    Built in chapter 09."""
    import copy

    n = model.config.num_hidden_layers
    if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= n:
        raise ValueError(f"layers {layers!r} must be an int in [1, {n}]")
    draft = copy.deepcopy(model).eval()
    draft.model.layers = draft.model.layers[:layers]
    draft.config.num_hidden_layers = layers
    if getattr(draft.config, "layer_types", None):
        draft.config.layer_types = draft.config.layer_types[:layers]
    return draft


def footprint_bytes(model) -> int:
    """Bytes a model holds in parameters and buffers, each storage once (tied weights, shared tables). Built in
    chapter 09."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.device.type, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total
