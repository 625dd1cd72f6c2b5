"""One request inside the router: its tokens, its KV blocks, and where its results go."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import torch

from router_service.model.sampling import SamplingParams

_ids = itertools.count()


@dataclass
class Event:
    """What the engine reports for a sequence after a step."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None = None  # "stop" | "length" on the last event
    error: BaseException | None = None
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # per token: (id, logprob), best first


@dataclass
class Sequence:
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None  # None for greedy requests: nothing to draw
    emit: Callable[[Event], None]  # called on the engine thread; must not block
    score_only: bool = False  # Score: prefill the whole input, collect logprobs, sample nothing
    id: int = field(default_factory=lambda: next(_ids))  # arrival order: the newest is preempted first
    output: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # Score: log p(token i | tokens before it)
    block_table: list[int] = field(default_factory=list)  # KV blocks in the pool, in order
    num_computed: int = 0  # tokens whose K/V are in the blocks
    num_preemptions: int = 0
    cancelled: bool = False  # set by the caller's thread when the client goes away
    finished: bool = False

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def num_pending(self) -> int:
        """Tokens to feed before the next one can be sampled: the rest of the prompt (and, after a
        preemption, of the output) on a prefill; 1 on a decode."""
        return self.length - self.num_computed

    @property
    def prefilling(self) -> bool:
        return self.num_pending > 1

    def next_tokens(self, n: int) -> list[int]:
        """The n tokens after those in the KV cache, without copying the whole sequence (hot path)."""
        start, p = self.num_computed, len(self.prompt)
        if start + n <= p:
            return self.prompt[start: start + n]
        return self.prompt[start:] + self.output[max(0, start - p): start + n - p]
