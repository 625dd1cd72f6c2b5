"""The engine: continuous batching must not change results; Score, stops, queue bound."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch

from helpers.groups import distributed_model
from router_service.engine.engine import Engine, EngineConfig
from router_service.engine.scheduler import QueueFull, SchedulerConfig
from router_service.model.reference import ReferenceModel
from router_service.model.sampling import SamplingParams

# Small budgets force mixing: long prompts are chunked over steps and share them with decodes.
TIGHT = EngineConfig(SchedulerConfig(max_running=4, max_step_tokens=8, prefill_chunk=5, max_queue=8),
                     stop_at_eos=False)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return ReferenceModel.from_pretrained(tiny_checkpoint)


def prompts(vocab: int, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


async def collect(engine: Engine, prompt, params):
    tokens, reasons = [], []
    async for ev in engine.generate(prompt, params):
        tokens += ev.token_ids
        reasons.append(ev.finish_reason)
    return tokens, reasons[-1]


def run_concurrently(engine, requests):
    async def main():
        return await asyncio.gather(*(collect(engine, p, params) for p, params in requests))

    return asyncio.run(main())


def test_concurrent_requests_equal_each_alone_and_the_reference(reference):
    engine = Engine(reference.dense, reference.experts, TIGHT)
    try:
        ps = prompts(reference.spec.vocab_size, [3, 17, 1, 9, 12, 6])  # more requests than max_running
        max_tokens = [6, 3, 9, 5, 7, 4]
        together = run_concurrently(engine, [(p, SamplingParams(max_tokens=m)) for p, m in zip(ps, max_tokens)])
        for p, m, (tokens, reason) in zip(ps, max_tokens, together):
            assert tokens == reference.generate_greedy(p, m)
            assert reason == "length"
            alone, _ = run_concurrently(engine, [(p, SamplingParams(max_tokens=m))])[0]
            assert alone == tokens
    finally:
        engine.close()


def test_distributed_engine_equals_reference(tiny_checkpoint, reference):
    model, remote, groups, _ = distributed_model(tiny_checkpoint, 2)
    engine = Engine(model.dense, remote, TIGHT)
    try:
        ps = prompts(reference.spec.vocab_size, [4, 13, 7], seed=3)
        results = run_concurrently(engine, [(p, SamplingParams(max_tokens=6)) for p in ps])
        assert [r[0] for r in results] == [reference.generate_greedy(p, 6) for p in ps]
    finally:
        engine.close()
        remote.close()
        groups.close()


def test_score_matches_reference_logprobs(reference):
    engine = Engine(reference.dense, reference.experts, TIGHT)  # 23 tokens: chunked 5 at a time
    try:
        ids = prompts(reference.spec.vocab_size, [23], seed=4)[0]
        got = asyncio.run(engine.score(ids))
        logp = torch.log_softmax(reference(torch.tensor([ids]))[0], dim=-1)
        expected = [float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1)]
        assert len(got) == len(ids) - 1
        assert max(abs(a - b) for a, b in zip(got, expected)) <= 1e-4
    finally:
        engine.close()


def test_stop_tokens_seeds_and_logprobs(reference):
    engine = Engine(reference.dense, reference.experts, TIGHT)
    try:
        p = prompts(reference.spec.vocab_size, [5], seed=5)[0]
        greedy = reference.generate_greedy(p, 8)
        tokens, reason = run_concurrently(engine, [(p, SamplingParams(max_tokens=8, stop_token_ids=(greedy[3],)))])[0]
        assert reason == "stop" and tokens == greedy[: greedy.index(greedy[3])]
        sampled = SamplingParams(max_tokens=8, temperature=1.0, seed=42)
        a, b = run_concurrently(engine, [(p, sampled), (p, sampled)])
        assert a == b

        async def with_logprobs():
            return [ev async for ev in engine.generate(p, SamplingParams(max_tokens=3, logprobs=True))]

        events = asyncio.run(with_logprobs())
        logp = torch.log_softmax(reference(torch.tensor([p]))[0, -1], dim=-1)
        assert abs(events[0].logprobs[0] - float(logp[greedy[0]])) <= 1e-4
    finally:
        engine.close()


def test_queue_bound_and_cancellation(reference):
    config = EngineConfig(SchedulerConfig(max_running=1, max_step_tokens=1, prefill_chunk=1, max_queue=2))
    engine = Engine(reference.dense, reference.experts, config)
    try:
        long = prompts(reference.spec.vocab_size, [40])[0]
        seqs = [engine.submit(long, SamplingParams(max_tokens=200), lambda ev: None)]
        for _ in range(500):  # bounded wait until the engine has admitted it (1 token a step: stays running)
            if seqs[0].num_computed:
                break
            time.sleep(0.01)
        assert seqs[0] in engine.scheduler.running
        seqs += [engine.submit(long, SamplingParams(max_tokens=200), lambda ev: None) for _ in range(2)]
        with pytest.raises(QueueFull, match=r"request queue is full \(2 waiting\)"):
            engine.submit(long, SamplingParams(max_tokens=200), lambda ev: None)
        for seq in seqs:
            seq.cancelled = True
        tokens, reason = run_concurrently(engine, [([5, 6], SamplingParams(max_tokens=2))])[0]
        assert len(tokens) == 2 and reason == "length"  # cancelled work was dropped, the engine serves on
    finally:
        engine.close()


def test_scheduler_config_is_validated():
    with pytest.raises(ValueError, match="max_step_tokens .* must be >= max_running"):
        SchedulerConfig(max_running=8, max_step_tokens=4)
    with pytest.raises(ValueError, match="prefill_chunk must be an int >= 1"):
        SchedulerConfig(prefill_chunk=0)
