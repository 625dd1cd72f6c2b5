"""The choices of one OpenAI request, run on the engine: one sequence each, their events merged.

    Plan.choices() -> a task per choice: Engine.generate(ids, params) -> (choice, Event) -> one queue
    -> Choices.deltas(): per choice TextStream (text, as gRPC's) -> StopStrings (cut at a stop string)
       -> Delta(index, text, token ids, logprobs, top logprobs, finish_reason)

start() submits every choice and waits for each one's first event, so what a client can cause
(a full queue, a request too large, no live replica for the prefill) is raised before any byte of
the response is sent and becomes an HTTP status, not an error inside a 200 stream. close() cancels
every task: the engine's generator marks its sequence cancelled and the scheduler frees its KV
blocks at the next step. That is what a client that goes away, or a choice that hits a stop string,
costs: at most one more step.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from router_service.engine.engine import Engine
from router_service.engine.sequence import Event
from router_service.model.tokenizer import TextStream, Tokenizer
from router_service.serving.api import api_error
from router_service.serving.openai_schema import Plan
from router_service.serving.stop_strings import StopStrings


@dataclass
class Delta:
    """What one choice adds in one step; finish_reason on its last ("stop" | "length")."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]
    finish_reason: str | None = None


@dataclass
class _Choice:
    index: int
    prompt: int  # index into plan.prompts
    text: TextStream | None
    stops: StopStrings | None
    num_tokens: int = 0
    finished: bool = False
    started: bool = False
    task: asyncio.Task | None = field(default=None, repr=False)


class Choices:
    def __init__(self, engine: Engine, tokenizer: Tokenizer | None, plan: Plan):
        self.engine, self.plan = engine, plan
        self._queue: asyncio.Queue = asyncio.Queue()
        self._buffer: list[Delta] = []
        self.prompt_logprobs: list[list[float]] = []  # echo with logprobs: Score of each prompt
        self._choices = [_Choice(i, p, tokenizer.stream() if tokenizer else None,
                                 StopStrings(plan.stop) if plan.stop else None)
                         for i, p, _ in plan.choices()]
        self._params = [params for _, _, params in plan.choices()]
        self._pending = len(self._choices)

    async def start(self) -> None:
        """Submit every choice; return once each has its first event. Raises ApiError."""
        for c, params in zip(self._choices, self._params):
            c.task = asyncio.create_task(self._run(c, params))
        if self.plan.echo and self.plan.logprobs:
            try:
                self.prompt_logprobs = [await self.engine.score(p.ids) for p in self.plan.prompts]
            except Exception as e:
                raise api_error(e) from None
        while not all(c.started for c in self._choices):
            delta = await self._next()
            if delta is not None:
                self._buffer.append(delta)

    async def deltas(self):
        """Every Delta, in the order the engine produced them; raises ApiError for a failed choice."""
        while self._buffer:
            yield self._buffer.pop(0)
        while self._pending:
            delta = await self._next()
            if delta is not None:
                yield delta

    async def close(self) -> None:
        """Cancel what still runs (cancel() first: the sequences are marked even if this await is cut short)."""
        tasks = [c.task for c in self._choices if c.task is not None and not c.task.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def usage(self) -> dict:
        prompt = sum(len(p.ids) for p in self.plan.prompts)
        completion = sum(c.num_tokens for c in self._choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # ---- inside ----

    async def _run(self, c: _Choice, params) -> None:
        try:
            async for event in self.engine.generate(self.plan.prompts[c.prompt].ids, params):
                self._queue.put_nowait((c, event, None))
        except Exception as e:  # the consumer raises it (CancelledError, a BaseException, passes through)
            self._queue.put_nowait((c, None, e))

    async def _next(self) -> Delta | None:
        c, event, error = await self._queue.get()
        c.started = True
        if c.finished:  # a choice cut at a stop string: what its task had already queued is dropped
            return None
        if error is not None:
            raise api_error(error)  # an ApiError: the gRPC path's code and message
        delta = self._delta(c, event)
        if delta.finish_reason is not None:
            c.finished = True
            self._pending -= 1
            if c.task is not None and not c.task.done():
                c.task.cancel()  # stopped by a stop string: the sequence is still running in the engine
        return delta

    def _delta(self, c: _Choice, event: Event) -> Delta:
        c.num_tokens += len(event.token_ids)
        finish = event.finish_reason
        text = c.text.add(event.token_ids) if c.text is not None else ""
        if c.stops is not None:
            text = c.stops.add(text, final=finish is not None)
            if c.stops.stopped:
                finish = "stop"
        return Delta(c.index, text, event.token_ids, event.logprobs, event.top_logprobs, finish)
