"""The skew benchmark's traffic: greedy streams over chosen tokens, and the tokens that skew routing.

    hot_tokens(reference, experts, n)   the n tokens whose one-token routing lands most on `experts`
    Load(generate, prompts_of, ...)     streams of greedy requests; every token's time recorded
"""
from __future__ import annotations

import random
import statistics
import threading
import time

from cluster.bench.serving_runs import pct


class Load:
    """Streams of greedy generation; token times recorded per stream. `generate(prompt, n, emit)`
    runs one request and calls emit(failed: bool, finished: bool) per token."""

    def __init__(self, generate, prompts_of, streams: int, new_tokens: int):
        self.generate, self.prompts_of, self.new_tokens = generate, prompts_of, new_tokens
        self.gaps: list[tuple[float, float]] = []  # (time the token came, seconds since the previous one)
        self.tokens: list[float] = []  # time of every token
        self.failures = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._stream, args=(i,), daemon=True) for i in range(streams)]
        for t in self._threads:
            t.start()

    def _stream(self, i: int) -> None:
        rng = random.Random(i)
        while not self._stop.is_set():
            done, times = threading.Event(), []

            def emit(failed: bool, finished: bool, times=times, done=done):
                if failed:
                    with self._lock:
                        self.failures += 1
                    done.set()
                    return
                times.append(time.perf_counter())
                if finished:
                    done.set()

            self.generate(self.prompts_of(rng), self.new_tokens, emit)
            done.wait(120)
            with self._lock:
                self.tokens.extend(times)
                self.gaps.extend((b, b - a) for a, b in zip(times, times[1:]))

    def window(self, start: float, end: float) -> tuple[float, float, int]:
        """(tokens/s, p99 inter-token seconds, gaps) for tokens that came in [start, end)."""
        with self._lock:
            n = sum(1 for t in self.tokens if start <= t < end)
            gaps = [g for t, g in self.gaps if start <= t < end]
        return n / (end - start), pct(gaps, 0.99), len(gaps)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)


def hot_tokens(reference, experts: set[int], count: int) -> list[int]:
    """The `count` tokens whose one-token routing lands most on `experts`, over all MoE layers."""
    import torch

    routed, inner = [], reference.experts

    def recording(layer, x, ids, weights):
        routed.append(ids.clone())
        return inner(layer, x, ids, weights)

    reference.experts = recording
    vocab = reference.spec.vocab_size
    for start in range(0, vocab, 1024):  # batches of one-token sequences
        reference(torch.arange(start, min(vocab, start + 1024))[:, None])
    reference.experts = inner
    per_layer = len(reference.spec.sparse_layers)
    wanted = torch.tensor(sorted(experts))
    chunks = [torch.stack([torch.isin(ids, wanted).float().mean(1) for ids in routed[i:i + per_layer]]).mean(0)
              for i in range(0, len(routed), per_layer)]
    share = torch.cat(chunks)
    print(f"skew probe: the chosen tokens send {statistics.mean(share.topk(count).values.tolist()):.0%} of their "
          f"pairs to the hot experts (uniform: {len(experts) / reference.spec.num_experts:.0%})")
    return share.topk(count).indices.tolist()
