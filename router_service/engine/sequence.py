"""One request inside the router: its tokens, its KV cache, and where its results go."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import torch

from router_service.model.kv_cache import KVCache
from router_service.model.sampling import SamplingParams

_ids = itertools.count()


@dataclass
class Event:
    """What the engine reports for a sequence after a step."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None = None  # "stop" | "length" on the last event
    error: BaseException | None = None


@dataclass
class Sequence:
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    cache: KVCache
    emit: Callable[[Event], None]  # called on the engine thread; must not block
    score_only: bool = False  # Score: prefill the whole input, collect logprobs, sample nothing
    id: int = field(default_factory=lambda: next(_ids))
    output: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # Score: log p(token i | tokens before it)
    cancelled: bool = False  # set by the caller's thread when the client goes away

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    def next_tokens(self, n: int) -> list[int]:
        """The n tokens after those in the KV cache, without copying the whole sequence (hot path)."""
        start, p = self.computed, len(self.prompt)
        if start + n <= p:
            return self.prompt[start: start + n]
        return self.prompt[start:] + self.output[max(0, start - p): start + n - p]

    @property
    def computed(self) -> int:
        """Tokens already in the KV cache."""
        return self.cache.length

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.prompt)
