"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step: each running sequence that is decoding feeds 1 token; then sequences still
in their prompt feed a chunk of at most `prefill_chunk` tokens, within the step's token
budget; then waiting requests join while there is room. Decodes go first so a long
prompt never starves the streams already running: it is chunked over several steps.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from router_service.engine.sequence import Sequence


class QueueFull(Exception):
    """The waiting queue is at its bound; the caller answers RESOURCE_EXHAUSTED."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_running: int = 64  # sequences holding a KV cache at once
    max_step_tokens: int = 512  # tokens per step, decodes and prefill chunks together
    prefill_chunk: int = 256  # at most this many prompt tokens of one sequence per step
    max_queue: int = 256  # waiting requests beyond this are refused

    def __post_init__(self):
        for name in ("max_running", "max_step_tokens", "prefill_chunk", "max_queue"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.max_step_tokens < self.max_running:
            raise ValueError(f"max_step_tokens ({self.max_step_tokens}) must be >= max_running "
                             f"({self.max_running}) so every running sequence can decode each step")


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.config.max_queue:  # clients that went away hold no place in the queue
            self.waiting = deque(s for s in self.waiting if not s.cancelled)
        if len(self.waiting) >= self.config.max_queue:
            raise QueueFull(f"request queue is full ({self.config.max_queue} waiting); retry later")
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The next step's batch: (sequence, tokens to feed) pairs, decodes first."""
        self.running = [s for s in self.running if not s.cancelled]
        self.waiting = deque(s for s in self.waiting if not s.cancelled)
        budget, batch = self.config.max_step_tokens, []
        for seq in self.running:
            if not seq.prefilling:
                batch.append((seq, 1))
                budget -= 1
        for seq in self.running:
            if seq.prefilling and budget > 0:
                n = min(len(seq.prompt) - seq.computed, self.config.prefill_chunk, budget)
                batch.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running:
            seq = self.waiting.popleft()
            self.running.append(seq)
            n = min(len(seq.prompt), self.config.prefill_chunk, budget)
            batch.append((seq, n))
            budget -= n
        return batch

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
