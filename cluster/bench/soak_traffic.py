"""The soak's client side: mixed requests through a router's API, every outcome classified.

    worker threads, each looping until stop():
        greedy short | greedy long   -> output checked token by token against the reference
        sampled (seeded)             -> finishes with tokens in the vocabulary
        cancelled midway             -> the stream is dropped after its first tokens
    outcome: completed | cancelled | refused (RESOURCE_EXHAUSTED: the bounded queue said no) | failed

A failure is anything else: with every expert on two groups, no fault the soak injects leaves an
expert without a live replica, so the soak expects none.
"""
from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
from elasticmoe.v1 import serving_pb2

KINDS = ("greedy_short", "greedy_long", "sampled", "cancelled")


@dataclass
class Outcomes:
    sent: int = 0
    completed: int = 0
    cancelled: int = 0
    greedy_checked: int = 0
    mismatched: int = 0
    refused: Counter = field(default_factory=Counter)  # gRPC code name -> count
    failed: int = 0
    errors: list[str] = field(default_factory=list)  # the first few, for the report

    def as_dict(self) -> dict:
        return {"sent": self.sent, "completed": self.completed, "cancelled": self.cancelled,
                "greedy_checked": self.greedy_checked, "mismatched": self.mismatched,
                "refused": dict(self.refused), "failed": self.failed, "errors": self.errors[:5]}


def greedy_prompts(reference, rng: random.Random, count: int, lengths: tuple[int, int], max_tokens: int):
    """(prompt, expected greedy tokens) pairs; prompts whose greedy output hits EOS are skipped, so the
    engine (which stops at EOS) and the reference (which does not) compare exactly."""
    eos, out = reference.spec.eos_token_id, []
    while len(out) < count:
        prompt = [rng.randrange(2, reference.spec.vocab_size) for _ in range(rng.randint(*lengths))]
        expected = reference.generate_greedy(prompt, max_tokens)
        if eos not in expected:
            out.append((prompt, expected))
    return out


class Traffic:
    def __init__(self, api, reference, workers: int = 3, seed: int = 0, timeout_s: float = 60.0):
        rng = random.Random(seed)
        self.api, self.vocab, self.timeout_s = api, reference.spec.vocab_size, timeout_s
        self.short = greedy_prompts(reference, rng, 6, (3, 12), 6)
        self.long = greedy_prompts(reference, rng, 2, (40, 60), 12)
        self.outcomes = Outcomes()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._worker, args=(seed + i,), name=f"soak-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def burst(self, count: int) -> None:
        """count requests at once, on their own threads (the bounded queues must refuse the excess)."""
        for i in range(count):
            threading.Thread(target=lambda i=i: asyncio.run(self._one("greedy_short", random.Random(i))),
                             daemon=True).start()

    def stop(self, timeout_s: float = 120.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout_s)

    def _worker(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self._stop.is_set():
            asyncio.run(self._one(rng.choice(KINDS), rng))

    async def _one(self, kind: str, rng: random.Random) -> None:
        from router_service.serving.api import ApiError

        expected = None
        if kind in ("greedy_short", "greedy_long", "cancelled"):
            prompt, expected = rng.choice(self.long if kind == "greedy_long" else self.short)
            request = serving_pb2.GenerateRequest(token_ids=prompt, max_tokens=len(expected))
        else:
            request = serving_pb2.GenerateRequest(token_ids=rng.choice(self.short)[0], max_tokens=8,
                                                  temperature=0.8, top_p=0.9, seed=rng.randrange(2**32))
        self._count("sent")
        tokens, start = [], time.monotonic()
        try:
            stream = self.api.generate(request)
            try:
                async for response in stream:
                    tokens += response.token_ids
                    if kind == "cancelled" and len(tokens) >= 2:
                        self._count("cancelled")
                        return
                    if time.monotonic() - start > self.timeout_s:
                        raise TimeoutError(f"{kind} request still streaming after {self.timeout_s} s")
            finally:
                await stream.aclose()
        except ApiError as e:
            if e.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                with self._lock:
                    self.outcomes.refused[e.code.name] += 1
                return
            return self._fail(f"{kind}: {e.code.name}: {e.message}")
        except Exception as e:
            return self._fail(f"{kind}: {type(e).__name__}: {e}")
        if expected is not None:
            with self._lock:
                self.outcomes.greedy_checked += 1
                if tokens != expected:
                    self.outcomes.mismatched += 1
                    self.outcomes.errors.append(f"{kind}: {tokens} != reference {expected}")
        elif not tokens or not all(0 <= t < self.vocab for t in tokens):
            return self._fail(f"{kind}: bad tokens {tokens}")
        self._count("completed")

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self.outcomes, name, getattr(self.outcomes, name) + 1)

    def _fail(self, why: str) -> None:
        with self._lock:
            self.outcomes.failed += 1
            self.outcomes.errors.append(why)
