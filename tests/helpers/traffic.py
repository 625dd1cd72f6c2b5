"""Test helper: skewed greedy traffic against a real router, checked token by token.

Skew comes from the prompts: `hot_tokens` probes the reference model with one-token
prompts and keeps the tokens whose (token, expert) pairs land most on the chosen
experts, across every MoE layer. Prompts made of them load those experts.
"""
from __future__ import annotations

import random
import threading
import time

from cluster.bench.skew_traffic import hot_tokens  # noqa: F401  (re-exported for the tests)
from router_service.model.reference import ReferenceModel
from router_service.model.sampling import SamplingParams


class Traffic:
    """`workers` threads sending greedy requests built from `tokens` until stop(); every
    output is compared with the reference. Counts successes, failures and mismatches."""

    def __init__(self, router, reference: ReferenceModel, tokens: list[int], workers: int = 3,
                 prompt_len: int = 12, max_tokens: int = 4, prompts: int = 6, seed: int = 0,
                 timeout_s: float = 60.0):
        rng = random.Random(seed)
        self.router = router
        self.prompts, self.expected = [], {}
        eos = reference.spec.eos_token_id
        while len(self.prompts) < prompts:
            prompt = [rng.choice(tokens) for _ in range(prompt_len)]
            expected = reference.generate_greedy(prompt, max_tokens)
            if eos not in expected:  # the engine stops at eos, the reference does not: keep the comparison exact
                self.prompts.append(prompt)
                self.expected[tuple(prompt)] = expected
        self.max_tokens, self.timeout_s = max_tokens, timeout_s  # a request not done in timeout_s fails
        self.ok = self.failed = self.mismatched = 0
        self.latencies_s: list[float] = []  # of the requests that succeeded
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._work, args=(i,), daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    def _work(self, i: int) -> None:
        n = i
        while not self._stop.is_set():
            prompt = self.prompts[n % len(self.prompts)]
            n += 1
            start = time.monotonic()
            try:
                tokens = generate(self.router, prompt, self.max_tokens, self.timeout_s)
            except Exception as e:  # counted, never raised: the test asserts on the counts
                with self._lock:
                    self.failed += 1
                    self.errors.append(f"{type(e).__name__}: {e}")
                continue
            with self._lock:
                if tokens == self.expected[tuple(prompt)]:
                    self.ok += 1
                    self.latencies_s.append(time.monotonic() - start)
                else:
                    self.mismatched += 1
                    self.errors.append(f"prompt {prompt}: got {tokens}, reference {self.expected[tuple(prompt)]}")

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)


def generate(router, prompt: list[int], max_tokens: int, timeout_s: float = 60.0) -> list[int]:
    """Greedy tokens for one request through the router's engine (no asyncio needed)."""
    out, done, error = [], threading.Event(), []

    def emit(event):
        if event.error is not None:
            error.append(event.error)
            done.set()
            return
        out.extend(event.token_ids)
        if event.finish_reason is not None:
            done.set()

    router.engine.submit(prompt, SamplingParams(max_tokens=max_tokens), emit)
    if not done.wait(timeout_s):
        raise TimeoutError(f"no answer in {timeout_s} s")
    if error:
        raise error[0]
    return out


def wait_for(predicate, timeout_s: float, poll_s: float = 0.2, what: str = "condition"):
    """Poll predicate() until it returns something truthy; that value, or AssertionError naming `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
