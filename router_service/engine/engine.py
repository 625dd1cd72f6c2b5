"""The router's engine: a step loop on its own thread, fed by asyncio callers.

    step():  batch = scheduler.schedule()                        observe
             logits = dense.forward(new tokens, experts)          compute (experts over gRPC)
             sample / score, emit events, retire finished ones    apply

Callers (the gRPC servicer, tests) use `generate` / `score` from any asyncio loop; the
engine thread hands events back with loop.call_soon_threadsafe. The step runs on a
plain thread because the forward pass is blocking torch work and must not stall the
event loop that serves clients.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import AsyncIterator

import torch

from router_service.engine.scheduler import Scheduler, SchedulerConfig
from router_service.engine.sequence import Event, Sequence
from router_service.model.dense import DenseModel, ExpertsFn, Segment
from router_service.model.sampling import SamplingParams, make_generator, sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    scheduler: SchedulerConfig = SchedulerConfig()
    max_new_tokens: int = 4096  # cap on a request's max_tokens
    stop_at_eos: bool = True  # the model's eos token ends generation (finish_reason "stop")


class Engine:
    def __init__(self, dense: DenseModel, experts: ExpertsFn, config: EngineConfig = EngineConfig()):
        self.dense, self.experts, self.config = dense, experts, config
        self.spec = dense.spec
        self.scheduler = Scheduler(config.scheduler)
        self._wake = threading.Condition()
        self._stopping = False
        self.steps = 0
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    # ---- callers (any thread / event loop) ----

    def submit(self, prompt: list[int], params: SamplingParams, emit, score_only: bool = False) -> Sequence:
        """Queue a request; raises scheduler.QueueFull at the bound. `emit` gets Events on the engine thread."""
        seq = Sequence(list(prompt), params, make_generator(params.seed), self.dense.new_cache(), emit, score_only)
        with self._wake:
            self.scheduler.add(seq)
            self._wake.notify()
        return seq

    async def generate(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[Event]:
        """Events of one request as they come; the last has finish_reason set."""
        queue = asyncio.Queue()
        seq = self.submit(prompt, params, _emitter(queue))
        try:
            while True:
                event = await queue.get()
                if event.error is not None:
                    raise event.error
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            seq.cancelled = True  # a client that went away frees its slot at the next step

    async def score(self, token_ids: list[int]) -> list[float]:
        """log p(token_i | tokens before it) for i = 1..n-1."""
        async for event in self.generate_scores(token_ids):
            return event.logprobs
        return []

    async def generate_scores(self, token_ids: list[int]) -> AsyncIterator[Event]:
        queue = asyncio.Queue()
        seq = self.submit(token_ids, SamplingParams(max_tokens=1), _emitter(queue), score_only=True)
        try:
            event = await queue.get()
            if event.error is not None:
                raise event.error
            yield event
        finally:
            seq.cancelled = True

    def close(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=10)

    # ---- the engine thread ----

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.scheduler.has_work():
                    self._wake.wait()
                if self._stopping:
                    return
                batch = self.scheduler.schedule()
            if not batch:
                continue
            try:
                self._step(batch)
            except Exception as e:  # a failed step fails its requests, never the engine
                log.exception("step %d failed for %d sequences", self.steps, len(batch))
                with self._wake:
                    for seq, _ in batch:
                        if seq in self.scheduler.running:
                            self.scheduler.finish(seq)
                        seq.emit(Event([], [], error=e))

    @torch.inference_mode()
    def _step(self, batch: list[tuple[Sequence, int]]) -> None:
        input_ids = torch.tensor([t for seq, n in batch for t in seq.next_tokens(n)])
        ends = torch.tensor([n for _, n in batch]).cumsum(0)  # [B] row after each segment
        scoring = [i for i, (seq, _) in enumerate(batch) if seq.score_only]
        rows = torch.cat([torch.arange(ends[i] - batch[i][1], ends[i]) for i in scoring] + [ends - 1])
        logits = self.dense.forward(input_ids, [Segment(seq.cache, n) for seq, n in batch], self.experts, rows)
        self.steps += 1
        offset = 0
        for i in scoring:  # rows of each scored chunk come first, in order
            seq, n = batch[i]
            logp = torch.log_softmax(logits[offset: offset + n].float(), dim=-1)
            start = seq.computed - n  # forward advanced the cache
            targets = torch.tensor(seq.prompt[start + 1: start + n + 1])
            seq.scores += logp[: len(targets)].gather(1, targets[:, None]).squeeze(1).tolist()
            offset += n
        last = logits[offset:]  # [B, V] the last row of every segment
        ready = [i for i, (seq, _) in enumerate(batch) if not seq.prefilling and not seq.score_only]
        if ready:
            tokens, logprobs = sample(last[ready].float(), [batch[i][0].params for i in ready],
                                      [batch[i][0].generator for i in ready])
        with self._wake:
            for j, i in enumerate(ready):
                self._append(batch[i][0], int(tokens[j]), float(logprobs[j]))
            for i in scoring:
                seq = batch[i][0]
                if not seq.prefilling:
                    self.scheduler.finish(seq)
                    seq.emit(Event([], seq.scores, "stop"))

    def _append(self, seq: Sequence, token: int, logprob: float) -> None:
        stop = token in seq.params.stop_token_ids or (self.config.stop_at_eos and token == self.spec.eos_token_id)
        if stop:
            reason = "stop"
        else:
            seq.output.append(token)
            full = seq.length >= self.spec.max_position_embeddings
            reason = "length" if len(seq.output) >= seq.params.max_tokens or full else None
        if reason is not None:
            self.scheduler.finish(seq)
        seq.emit(Event([] if stop else [token], [] if stop else [logprob], reason))


def _emitter(queue: asyncio.Queue):
    """Hand events from the engine thread to the caller's loop; a caller gone with its loop is ignored."""
    loop = asyncio.get_running_loop()

    def emit(event: Event) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the loop closed: the client went away and its sequence is cancelled
            pass

    return emit
