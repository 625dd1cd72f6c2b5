"""Same-layer Forwards that reach a group together run as one kernel call, answered separately.

    Forward(layer l, rows a) --\\                       /--> rows of a
    Forward(layer l, rows b) ---+-> one moe_forward ---+--> rows of b        (per layer, in arrival order)
    Forward(layer l, rows c) --/   [a; b; c]            \\--> rows of c

Several routers, or one router's two micro-batches, send a group the same layer at nearly the
same time; each call alone pays the kernel's fixed cost (launches, weight reads: nearly flat from
1 to 64 tokens on the H200, README) for a few tokens. One worker runs the group's compute: what is
queued when it is free goes in one call, grouped by layer (and by the snapshot of held weights,
so a Load or Unload in between never mixes two). Nothing waits on purpose unless window_s > 0;
under no load a call runs alone, at once.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable

import torch

from experts.wire import MAX_FORWARD_TOKENS


@dataclass(eq=False)  # by identity: queue.remove() must never compare tensors
class _Item:
    key: object  # (layer, weights snapshot): what may share a kernel call
    tensors: tuple  # hidden [t, H], slot ids [t, k], weights [t, k]
    future: asyncio.Future = field(default=None)


class Coalescer:
    def __init__(self, compute: Callable, window_s: float = 0.0, max_tokens: int = MAX_FORWARD_TOKENS):
        """compute(key, hidden, slot_ids, weights) -> output [T, H] on the host (runs in a thread)."""
        self.compute, self.window_s, self.max_tokens = compute, window_s, max_tokens
        self.calls = 0  # kernel calls made
        self.merged = 0  # requests answered by a call that also served another
        self._queue: list[_Item] = []
        self._worker: asyncio.Task | None = None

    async def run(self, key, hidden: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        item = _Item(key, (hidden, slot_ids, weights), asyncio.get_running_loop().create_future())
        self._queue.append(item)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._drain())
        return await item.future

    async def _drain(self) -> None:
        while self._queue:
            if self.window_s:
                await asyncio.sleep(self.window_s)  # let same-layer calls of other routers arrive
            first = self._queue[0]
            batch, rows = [], 0
            for item in list(self._queue):
                if item.key == first.key and (not batch or rows + len(item.tensors[0]) <= self.max_tokens):
                    batch.append(item)
                    rows += len(item.tensors[0])
            for item in batch:
                self._queue.remove(item)
            batch = [item for item in batch if not item.future.done()]  # a caller cancelled: not computed
            if not batch:
                continue
            try:  # concatenated in the worker thread too: a big prefill's copy must not hold the event loop
                out = await asyncio.to_thread(self._compute_merged, first.key, [item.tensors for item in batch])
            except Exception as e:  # every request of the call gets the error
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(e)
                continue
            self.calls += 1
            self.merged += len(batch) if len(batch) > 1 else 0
            for item, part in zip(batch, out.split([len(item.tensors[0]) for item in batch])):
                if not item.future.done():
                    item.future.set_result(part)

    def _compute_merged(self, key, parts: list[tuple]) -> torch.Tensor:
        """One kernel call over the rows of every request in parts (a lone request's tensors as they are)."""
        merged = parts[0] if len(parts) == 1 else [torch.cat(tensors) for tensors in zip(*parts)]
        return self.compute(key, *merged)
