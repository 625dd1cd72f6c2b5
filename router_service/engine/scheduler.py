"""Continuous batching with admission by KV blocks: which sequences run in the next step, and
how many tokens each.

Every step, in arrival order:
  1. decodes    each running sequence past its prompt feeds 1 token. When the pool has no block
                for it, the newest running sequence is preempted (its blocks freed, itself put at
                the head of the queue to be recomputed later: vLLM's default), until it fits;
                the newest may be itself. Nothing is failed for lack of memory.
  2. prefills   sequences still in their prompt (or recomputing after a preemption) feed a chunk
                of at most prefill_chunk tokens, within the step's token budget and the free blocks.
  3. admission  waiting requests join while there is room: max_running, the budget, and free
                blocks for their first chunk (the head of the queue waits; no overtaking), and
                only in a step that preempted nothing.
Decodes go first so a long prompt never starves the streams already running.
"""
from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass

from router_service.engine.block_manager import BlockManager
from router_service.engine.sequence import Sequence


class QueueFull(Exception):
    """The waiting queue is at its bound; the caller answers RESOURCE_EXHAUSTED."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_running: int = 64  # sequences holding KV blocks at once
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
    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config, self.blocks = config, blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in arrival order (Sequence.id)
        self.num_preemptions = 0

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
        for seq in [s for s in self.running if s.cancelled]:
            self.finish(seq)
        self.waiting = deque(s for s in self.waiting if not s.cancelled)
        budget, decodes, prefills = self.config.max_step_tokens, [], []
        preempted = self.num_preemptions
        for seq in [s for s in self.running if not s.prefilling]:
            if seq in self.running and self._make_room(seq, 1):
                self.blocks.allocate(seq, 1)
                decodes.append((seq, 1))
                budget -= 1
        for seq in [s for s in self.running if s.prefilling]:
            if budget <= 0:
                break
            if seq not in self.running:  # preempted above for an older sequence's room
                continue
            n = min(seq.num_pending, self.config.prefill_chunk, budget, self._room(seq))
            if n == 0 and not decodes and not prefills:  # nothing else runs: free room or this never moves
                if not self._make_room(seq, 1):
                    continue
                n = min(seq.num_pending, self.config.prefill_chunk, budget, self._room(seq))
            if n > 0:
                self.blocks.allocate(seq, n)
                prefills.append((seq, n))
                budget -= n
        # Nothing joins in a step that had to preempt: a newcomer would take the blocks the running
        # ones need next step, be preempted in turn, and the pool would thrash (vLLM's rule too).
        while (self.waiting and budget > 0 and len(self.running) < self.config.max_running
               and self.num_preemptions == preempted):
            seq = self.waiting[0]
            n = min(seq.num_pending, self.config.prefill_chunk, budget)
            if not self.blocks.can_allocate(seq, n):
                break  # the head waits for blocks; no overtaking, so a long prompt is not starved
            self.waiting.popleft()
            self.blocks.allocate(seq, n)
            bisect.insort(self.running, seq, key=lambda s: s.id)
            prefills.append((seq, n))
            budget -= n
        return decodes + prefills

    def finish(self, seq: Sequence) -> None:
        """seq leaves: its blocks go back to the pool."""
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.finished = True

    def _room(self, seq: Sequence) -> int:
        """Tokens seq can still feed with the blocks it holds and those free."""
        return (len(seq.block_table) + self.blocks.num_free) * self.blocks.block_size - seq.num_computed

    def _make_room(self, seq: Sequence, num_tokens: int) -> bool:
        """Preempt the newest running sequences until seq can feed num_tokens; False when seq
        itself was preempted (it was the newest)."""
        while not self.blocks.can_allocate(seq, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Recompute later: the blocks go back, the tokens stay, and it waits at the queue's head."""
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
