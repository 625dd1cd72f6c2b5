"""Per-request sampling: pick the next token of every sequence in a batch.

B = batch size (sequences), V = vocabulary size, S = rows that draw (not greedy).

    logits [B, V] -+-> greedy rows: argmax, nothing drawn
                   +-> drawing rows: sort (once) -> - max -> temperature -> top-k -> top-p
                   |       -> argmax(probs / q), q ~ Exp(1) from each row's own generator
                   +-> log_softmax (only when a request wants logprobs) -> logprob of the token

Filters run in the usual order (HF's warpers, vLLM): temperature scales the logits, top-k
keeps the k largest, top-p keeps the smallest prefix of the *renormalized top-k* distribution
whose mass reaches top_p. Greedy rows (temperature 0) take the argmax and draw nothing.

The draw is the exponential race: argmax_i p_i / q_i with q_i ~ Exp(1) picks token i with
probability p_i, like multinomial, but is one tensor op over every row; only the noise comes
from each row's generator (vLLM draws the same way).

Numerically safe at every accepted value: the row's maximum is subtracted before dividing by
the temperature, so the top logit is exactly 0 and nothing overflows (a subnormal temperature
leaves the top token alone at probability 1, a huge one flattens the row to uniform); no
value a request can pass makes a probability NaN or negative.

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
from dataclasses import InitVar, dataclass, field

import torch

MAX_SEED = 2**64 - 1  # proto `uint64 seed`; torch.Generator.manual_seed accepts [0, 2**64)
MAX_TOP_LOGPROBS = 20  # alternatives reported per token: OpenAI's chat bound (and vLLM's default)


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
    top_logprobs: int = 0  # the k most likely tokens (and their logprobs) after each new one; needs logprobs
    ignore_eos: bool = False  # generate past the model's eos token (fixed-length outputs, for benchmarks)
    max_tokens_limit: InitVar[int | None] = None
    stop_set: frozenset = field(default=frozenset(), init=False, repr=False, compare=False)

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
        object.__setattr__(self, "stop_set", frozenset(stops))  # the engine checks each token in O(1)
        if not isinstance(self.logprobs, bool):
            raise SamplingError("logprobs", f"logprobs must be a bool, got {self.logprobs!r}")
        if not (_is_int(self.top_logprobs) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS):
            raise SamplingError("top_logprobs", f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], "
                                                f"got {self.top_logprobs!r}")
        if not isinstance(self.ignore_eos, bool):
            raise SamplingError("ignore_eos", f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if self.top_logprobs and not self.logprobs:
            raise SamplingError("top_logprobs", "top_logprobs needs logprobs set to true")

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


def top_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely tokens of each row under the unmodified model distribution, as `sample`'s
    logprobs: logits [B, V] -> (logprobs [B, k] fp32, descending; token ids [B, k] int64)."""
    return torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
           with_logprobs: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draw the next token of each sequence.

    logits [B, V] (any float dtype; computed in fp32), params and generators: B each, row-aligned
    (a greedy row's generator may be None). Returns (token_ids [B] int64, logprobs [B] fp32 under
    the unmodified model distribution, or None without with_logprobs). Generators of greedy rows
    are not advanced.
    """
    assert logits.dim() == 2 and len(params) == len(generators) == logits.shape[0], \
        (tuple(logits.shape), len(params), len(generators))
    B, V = logits.shape
    token_ids = logits.argmax(dim=-1)  # [B]; greedy rows keep this (first index on ties)
    drawing = [b for b, p in enumerate(params) if not p.greedy and p.top_k != 1]  # top_k=1 is greedy
    if drawing:
        token_ids[drawing] = _draw(logits[drawing].float(), [params[b] for b in drawing],
                                   [generators[b] for b in drawing])
    if not with_logprobs:
        return token_ids, None
    logprobs = torch.log_softmax(logits.float(), dim=-1).gather(1, token_ids[:, None]).squeeze(1)  # [B]
    return token_ids, logprobs


def _draw(logits: torch.Tensor, params: Sequence[SamplingParams], generators) -> torch.Tensor:
    """logits [S, V] fp32 -> drawn token ids [S]."""
    S, V = logits.shape
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device, dtype=torch.float32)  # [S]
    top_k = torch.tensor([p.top_k or V for p in params], device=device)  # [S]
    top_p = torch.tensor([p.top_p for p in params], device=device, dtype=torch.float32)  # [S]
    # Sort the raw logits: dividing by temperature could round near-equal logits into ties
    # and reorder them. Stable, so ties keep the lowest id first, like argmax.
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True, stable=True)  # [S, V]
    # minus the row's max first: the top logit becomes exactly 0, so no temperature overflows it
    scaled = (sorted_logits - sorted_logits[:, :1]) / temperature[:, None]
    rank = torch.arange(V, device=device)  # [V]
    scaled = scaled.masked_fill(rank[None, :] >= top_k[:, None], float("-inf"))
    probs = torch.softmax(scaled, dim=-1)  # [S, V], renormalized over the top-k; rank 0 is always > 0
    mass_before = probs.cumsum(dim=-1) - probs  # [S, V]
    # Keep a token while the mass before it is short of top_p: the smallest prefix reaching
    # top_p. Rank 0 always stays, so a tiny top_p degrades to greedy rather than to nothing.
    # top_p = 1 is "off": skip it, since fp32 cumsum can reach 1.0 early and drop the tail.
    drop = (mass_before >= top_p[:, None]) & (rank[None, :] > 0) & (top_p[:, None] < 1)
    probs = probs.masked_fill(drop, 0.0)
    race = torch.empty_like(probs)
    for i, gen in enumerate(generators):
        race[i].exponential_(generator=gen)
    # Exp(1) can come out exactly 0 (about 1 in 2**24 per entry): 0/0 would be NaN, which argmax
    # picks. The smallest normal float keeps p/q finite and a dropped token (p = 0) at 0.
    race.clamp_(min=torch.finfo(torch.float32).tiny)
    pick = (probs / race).argmax(dim=-1)  # [S], a rank in sorted order; a dropped token scores 0
    return sorted_ids.gather(1, pick[:, None]).squeeze(1)
