"""The router's engine: a step loop on its own thread, fed by asyncio callers.

    step():  batch = scheduler.schedule()                         which sequences, how many tokens
             out = runner.run(batch)                              one forward over the KV pool
             postprocess: append, stop, emit, free finished ones  per sequence, isolated

Callers (the gRPC servicer, tests) use `generate` / `score` from any asyncio loop; the
engine thread hands events back with loop.call_soon_threadsafe. The step runs on a
plain thread because the forward pass is blocking torch work and must not stall the
event loop that serves clients.

Memory: the KV pool is allocated once (EngineConfig.kv_cache_bytes), sequences hold blocks of
it, and the scheduler preempts rather than grow it; a request that could never fit in the
whole pool is refused at submit (RequestTooLarge) instead of waiting forever.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import AsyncIterator

from router_service.engine.block_manager import BlockManager
from router_service.engine.config import EngineConfig, RequestTooLarge, kv_pool
from router_service.engine.malloc import keep_freed_memory
from router_service.engine.runner import ModelRunner, StepOutput
from router_service.engine.scheduler import Scheduler
from router_service.engine.sequence import Event, Sequence
from router_service.model.dense import DenseModel, ExpertsFn
from router_service.model.sampling import SamplingParams, make_generator

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineConfig", "RequestTooLarge", "EngineStats"]


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for Status and Prometheus (read from other threads: plain ints, no lock)."""

    block_size: int
    blocks_total: int
    blocks_used: int
    preemptions: int  # sequences preempted (to be recomputed) since start
    pool_bytes: int
    running: int  # sequences holding KV blocks
    waiting: int  # queued, not yet admitted


class Engine:
    def __init__(self, dense: DenseModel, experts: ExpertsFn, config: EngineConfig = EngineConfig()):
        self.dense, self.experts, self.config = dense, experts, config
        self.spec = dense.spec
        if dense.device.type == "cpu":
            keep_freed_memory()  # step temporaries reused, not page-faulted in again each step (malloc.py)
        self.pool = kv_pool(dense, config)
        self.blocks = BlockManager(self.pool.num_blocks, self.pool.block_size)
        self.scheduler = Scheduler(config.scheduler, self.blocks)
        self.runner = ModelRunner(dense, experts, self.pool, config.micro_batches)
        log.info("engine: KV pool of %d blocks x %d tokens (%.1f MiB, %s on %s): %d tokens at once",
                 self.pool.num_blocks, self.pool.block_size, self.pool.num_bytes / 2**20, dense.dtype, dense.device,
                 self.pool.num_blocks * self.pool.block_size)
        self._wake = threading.Condition()
        self._stopping = False
        self.steps = 0
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    # ---- callers (any thread / event loop) ----

    def stats(self) -> EngineStats:
        return EngineStats(self.pool.block_size, self.blocks.num_blocks, self.blocks.num_used,
                           self.scheduler.num_preemptions, self.pool.num_bytes, len(self.scheduler.running),
                           len(self.scheduler.waiting))

    def check_fits(self, num_tokens: int, what: str) -> None:
        """Refuse a request whose KV could never fit in the whole pool (it would wait forever)."""
        capacity = self.pool.num_blocks * self.pool.block_size
        if self.blocks.blocks_for(num_tokens) > self.pool.num_blocks:
            raise RequestTooLarge(f"{what} needs {num_tokens} tokens of KV cache; this router's pool holds "
                                  f"{capacity} ({self.pool.num_blocks} blocks of {self.pool.block_size}): "
                                  f"ask for fewer tokens, or raise kv_cache_bytes")

    def submit(self, prompt: list[int], params: SamplingParams, emit, score_only: bool = False) -> Sequence:
        """Queue a request; raises scheduler.QueueFull at the bound and RequestTooLarge when it
        can never fit. `emit` gets Events on the engine thread."""
        self.check_fits(len(prompt) + (0 if score_only else params.max_tokens),
                        "the input" if score_only else f"prompt ({len(prompt)}) + max_tokens ({params.max_tokens})")
        generator = None if params.greedy else make_generator(params.seed)
        seq = Sequence(list(prompt), params, generator, emit, score_only)
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
            seq.cancelled = True  # a client that went away frees its blocks at the next step

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
                out = self.runner.run(batch)
            except Exception as e:  # the forward failed (an expert group, say): it fails its batch, never the engine
                log.exception("step %d failed for %d sequences", self.steps, len(batch))
                with self._wake:
                    for seq, _ in batch:
                        self._fail(seq, e)
                continue
            self.steps += 1
            with self._wake:
                for i, (seq, _) in enumerate(batch):
                    try:
                        self._postprocess(seq, out, i)
                    except Exception as e:  # one sequence's failure is its own, never its neighbours'
                        log.exception("sequence %d failed after step %d", seq.id, self.steps)
                        self._fail(seq, e)

    def _postprocess(self, seq: Sequence, out: StepOutput, i: int) -> None:
        if seq.finished:
            return
        if seq.score_only:
            seq.scores += out.scores[i]
            if seq.num_pending == 0:
                self.scheduler.finish(seq)
                seq.emit(Event([], seq.scores, "stop"))
        elif out.tokens[i] is not None:
            self._append(seq, out.tokens[i], out.logprobs[i], out.top[i] if out.top else None)

    def _append(self, seq: Sequence, token: int, logprob: float | None, top=None) -> None:
        params = seq.params
        stop = token in params.stop_set or (self.config.stop_at_eos and not params.ignore_eos
                                            and token == self.spec.eos_token_id)
        if stop:
            reason = "stop"
        else:
            seq.output.append(token)
            full = seq.length >= self.spec.max_position_embeddings
            reason = "length" if len(seq.output) >= params.max_tokens or full else None
        if reason is not None:
            self.scheduler.finish(seq)
        seq.emit(Event([] if stop else [token], [] if stop or logprob is None else [logprob], reason,
                       top_logprobs=[] if stop or top is None else [top]))

    def _fail(self, seq: Sequence, error: BaseException) -> None:
        if seq in self.scheduler.running:
            self.scheduler.finish(seq)
        seq.finished = True
        seq.emit(Event([], [], error=error))


def _emitter(queue: asyncio.Queue):
    """Hand events from the engine thread to the caller's loop; a caller gone with its loop is ignored."""
    loop = asyncio.get_running_loop()

    def emit(event: Event) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the loop closed: the client went away and its sequence is cancelled
            pass

    return emit
