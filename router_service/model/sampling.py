"""Per-request sampling: pick the next token of every sequence in a batch.

B = batch size (sequences), V = vocabulary size.

    logits [B, V] -+-> sort (once) -> temperature -> top-k -> top-p -> draw (own generator per row)
                   +-> log_softmax --------------------------------------> logprob of the drawn token

Filters run in the usual order (HF's warpers, vLLM): temperature scales the logits, top-k
keeps the k largest, top-p keeps the smallest prefix of the *renormalized top-k* distribution
whose mass reaches top_p. Greedy rows (temperature 0) take the argmax and draw nothing.

Determinism: each row draws only from its own `torch.Generator`, and every batched op here is
row-wise, so a seeded request gives the same tokens whichever sequences share its batch.

Returned logprobs are log_softmax of the *unmodified* logits (temperature 1, no top-k/top-p):
the model's own distribution. It does not depend on the sampling settings, so the logprob of a
token is comparable across requests and equals what Score returns for the same prefix. (The
probability under the filtered distribution is one `log_softmax` away for a caller who wants it,
but is -inf-prone and changes meaning with every knob.)
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import InitVar, dataclass

import torch

MAX_SEED = 2**64 - 1  # proto `uint64 seed`; torch.Generator.manual_seed accepts [0, 2**64)


class SamplingError(ValueError):
    """A sampling parameter is out of range; `field` names it (maps to INVALID_ARGUMENT)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one request, validated when built.

    `max_tokens_limit` (not stored) is the server's cap on max_tokens; None means no cap.
    """

    temperature: float = 0.0  # >= 0; 0 = greedy
    top_p: float = 1.0  # in (0, 1]; 1 = off
    top_k: int = 0  # >= 0; 0 = off
    max_tokens: int = 16  # >= 1, and <= max_tokens_limit when given
    seed: int | None = None  # in [0, 2**64); None = a random seed
    stop_token_ids: tuple[int, ...] = ()
    logprobs: bool = False
    max_tokens_limit: InitVar[int | None] = None

    def __post_init__(self, max_tokens_limit: int | None):
        if not (_is_number(self.temperature) and self.temperature >= 0):
            raise SamplingError("temperature", f"temperature must be a finite number >= 0 (0 = greedy), "
                                               f"got {self.temperature!r}")
        if not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            raise SamplingError("top_p", f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not (_is_int(self.top_k) and self.top_k >= 0):
            raise SamplingError("top_k", f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        high = "" if max_tokens_limit is None else f", <= {max_tokens_limit}"
        if not (_is_int(self.max_tokens) and self.max_tokens >= 1
                and (max_tokens_limit is None or self.max_tokens <= max_tokens_limit)):
            raise SamplingError("max_tokens", f"max_tokens must be an integer >= 1{high}, got {self.max_tokens!r}")
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed <= MAX_SEED):
            raise SamplingError("seed", f"seed must be an integer in [0, 2**64) or unset, got {self.seed!r}")
        try:
            stops = tuple(self.stop_token_ids)
        except TypeError:
            stops = None
        if stops is None or not all(_is_int(t) and t >= 0 for t in stops):
            raise SamplingError("stop_token_ids", f"stop_token_ids must be a sequence of integers >= 0, "
                                                  f"got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", stops)  # a list from the caller becomes a tuple
        if not isinstance(self.logprobs, bool):
            raise SamplingError("logprobs", f"logprobs must be a bool, got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(seed: int | None = None, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator for one sequence: seeded from `seed`, or from fresh OS entropy when None."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()  # non-deterministic: the request asked for no reproducibility
    else:
        gen.manual_seed(seed)
    return gen


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the next token of each sequence.

    logits [B, V] (any float dtype; computed in fp32), params and generators: B each, row-aligned.
    Returns (token_ids [B] int64, logprobs [B] fp32), logprobs under the unmodified model
    distribution (see the module docstring). Generators of greedy rows are not advanced.
    """
    assert logits.dim() == 2 and len(params) == len(generators) == logits.shape[0], \
        (tuple(logits.shape), len(params), len(generators))
    logits = logits.float()
    B, V = logits.shape
    device = logits.device
    model_logprobs = torch.log_softmax(logits, dim=-1)  # [B, V]
    token_ids = logits.argmax(dim=-1)  # [B]; greedy rows keep this (first index on ties)

    sampled = [b for b, p in enumerate(params) if not p.greedy and p.top_k != 1]  # top_k=1 is greedy
    if sampled:
        rows = torch.tensor(sampled, device=device)
        temperature = torch.tensor([params[b].temperature for b in sampled], device=device)  # [S]
        top_k = torch.tensor([params[b].top_k or V for b in sampled], device=device)  # [S]
        top_p = torch.tensor([params[b].top_p for b in sampled], device=device)  # [S]
        # Sort the raw logits: dividing by temperature could round near-equal logits into ties
        # and reorder them. Stable, so ties keep the lowest id first, like argmax.
        sorted_logits, sorted_ids = logits[rows].sort(dim=-1, descending=True, stable=True)  # [S, V]
        sorted_logits = sorted_logits / temperature[:, None]
        rank = torch.arange(V, device=device)  # [V]
        sorted_logits = sorted_logits.masked_fill(rank[None, :] >= top_k[:, None], float("-inf"))
        probs = torch.softmax(sorted_logits, dim=-1)  # [S, V], renormalized over the top-k
        mass_before = probs.cumsum(dim=-1) - probs  # [S, V]
        # Keep a token while the mass before it is short of top_p: the smallest prefix reaching
        # top_p. Rank 0 always stays, so a tiny top_p degrades to greedy rather than to nothing.
        # top_p = 1 is "off": skip it, since fp32 cumsum can reach 1.0 early and drop the tail.
        drop = (mass_before >= top_p[:, None]) & (rank[None, :] > 0) & (top_p[:, None] < 1)
        probs = probs.masked_fill(drop, 0.0)  # multinomial renormalizes
        for i, b in enumerate(sampled):
            pick = torch.multinomial(probs[i], 1, generator=generators[b])  # [1], rank in sorted order
            token_ids[b] = sorted_ids[i, pick[0]]
    logprobs = model_logprobs.gather(1, token_ids[:, None]).squeeze(1)  # [B]
    return token_ids, logprobs
