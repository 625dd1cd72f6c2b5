"""The engine: continuous batching must not change results; Score, stops, queue bound."""
from __future__ import annotations

import asyncio
import dataclasses
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


@pytest.mark.parametrize("micro_batches, coalesce_window_s", [(1, 0.0), (2, 0.0), (2, 0.02)])
def test_distributed_engine_equals_reference(tiny_checkpoint, reference, micro_batches, coalesce_window_s):
    """Over real gRPC groups, with one micro-batch a step or two in flight (engine/pipeline.py), and with
    the groups coalescing same-layer calls (experts/coalescer.py): greedy tokens equal the reference's,
    Score equals its logprobs, a seeded draw is the same either way."""
    model, remote, groups, _ = distributed_model(tiny_checkpoint, 2, coalesce_window_s)
    config = EngineConfig(TIGHT.scheduler, stop_at_eos=False, micro_batches=micro_batches)
    engine = Engine(model.dense, remote, config)
    try:
        ps = prompts(reference.spec.vocab_size, [4, 13, 7, 9, 2], seed=3)
        results = run_concurrently(engine, [(p, SamplingParams(max_tokens=6)) for p in ps])
        assert [r[0] for r in results] == [reference.generate_greedy(p, 6) for p in ps]
        assert (engine.runner.overlapped_steps > 0) == (micro_batches == 2)
        if coalesce_window_s:  # the two micro-batches' calls for one layer met on a group and ran as one
            assert sum(s.coalescer.merged for s in groups.servicers) > 0
        ids = prompts(reference.spec.vocab_size, [11], seed=4)[0]
        seeded = SamplingParams(max_tokens=5, temperature=0.9, seed=11)

        async def mixed():
            return await asyncio.gather(engine.score(ids), collect(engine, ps[0], seeded),
                                        collect(engine, ps[1], SamplingParams(max_tokens=4)))

        scores, (drawn, _), (greedy, _) = asyncio.run(mixed())
        logp = torch.log_softmax(reference(torch.tensor([ids]))[0], dim=-1)
        assert max(abs(a - float(logp[i, ids[i + 1]])) for i, a in enumerate(scores)) <= 1e-4
        assert greedy == reference.generate_greedy(ps[1], 4)
        alone = Engine(reference.dense, reference.experts, EngineConfig(stop_at_eos=False))
        try:
            assert drawn == run_concurrently(alone, [(ps[0], seeded)])[0][0]
        finally:
            alone.close()
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


def test_top_logprobs_are_the_reference_top_k_per_request(reference):
    """Two requests asking for different counts share a step; each gets its own k best, equal to the
    reference's log_softmax top-k, and one without logprobs gets none."""
    engine = Engine(reference.dense, reference.experts, TIGHT)
    try:
        p = prompts(reference.spec.vocab_size, [6], seed=6)[0]

        async def main():
            async def events(params):
                return [ev async for ev in engine.generate(p, params)]
            return await asyncio.gather(events(SamplingParams(max_tokens=3, logprobs=True, top_logprobs=5)),
                                        events(SamplingParams(max_tokens=3, logprobs=True, top_logprobs=2)),
                                        events(SamplingParams(max_tokens=3)))

        five, two, plain = asyncio.run(main())
        tokens = [t for ev in five for t in ev.token_ids]
        logp = torch.log_softmax(reference(torch.tensor([p + tokens]))[0, len(p) - 1:], dim=-1)  # [3 + 1, V]
        for step, (a, b) in enumerate(zip(five, two)):
            values, ids = logp[step].topk(5)
            (top5,), (top2,) = a.top_logprobs, b.top_logprobs
            assert [i for i, _ in top5] == ids.tolist() and [i for i, _ in top2] == ids.tolist()[:2]
            assert max(abs(v - float(e)) for (_, v), e in zip(top5, values)) <= 1e-4
            assert top5[0][0] == tokens[step] and abs(top5[0][1] - a.logprobs[0]) <= 1e-6  # greedy: the best one
        assert all(ev.top_logprobs == [] for ev in plain)
    finally:
        engine.close()


def test_eos_ends_generation_unless_the_request_ignores_it(reference):
    engine = Engine(reference.dense, reference.experts, EngineConfig(stop_at_eos=True))
    try:
        p = prompts(reference.spec.vocab_size, [5], seed=7)[0]
        greedy = reference.generate_greedy(p, 6)
        # make the third greedy token the model's eos (the engine reads it from its spec)
        engine.spec = dataclasses.replace(reference.spec, eos_token_id=greedy[2])
        cut = greedy.index(greedy[2])
        assert run_concurrently(engine, [(p, SamplingParams(max_tokens=6))])[0] == (greedy[:cut], "stop")
        assert run_concurrently(engine, [(p, SamplingParams(max_tokens=6, ignore_eos=True))])[0] == (greedy, "length")
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


# ---- the paged KV cache: every family, preemption and resume, requests that never fit, memory ----

def _greedy_all(engine, reference, ps, max_tokens):
    results = run_concurrently(engine, [(p, SamplingParams(max_tokens=m)) for p, m in zip(ps, max_tokens)])
    assert [r[0] for r in results] == [reference.generate_greedy(p, m) for p, m in zip(ps, max_tokens)]


def test_every_family_through_the_paged_engine_equals_the_reference(hf_checkpoint):
    """GQA, Mixtral's sliding window (8, shorter than these sequences), Qwen2's qkv bias and shared
    expert, Qwen3's q/k norm: ragged prompts chunked across steps, blocks of 4 so lengths cross
    block edges, decodes and prefill chunks in the same steps."""
    family, path, _ = hf_checkpoint
    reference = ReferenceModel.from_pretrained(path)
    engine = Engine(reference.dense, reference.experts, EngineConfig(
        SchedulerConfig(max_running=4, max_step_tokens=9, prefill_chunk=5, max_queue=16), stop_at_eos=False,
        block_size=4))
    try:
        ps = prompts(reference.spec.vocab_size, [3, 17, 4, 11, 8, 1], seed=6)
        _greedy_all(engine, reference, ps, [9, 5, 12, 7, 10, 6])
    finally:
        engine.close()


def test_a_pool_too_small_for_everyone_preempts_and_still_equals_the_reference(reference):
    """12 blocks of 4 tokens: each request fits alone (<= 30 tokens), together they need ~3x the pool.
    Sequences are preempted (newest first), recomputed later, and every output equals the reference."""
    engine = Engine(reference.dense, reference.experts, EngineConfig(
        SchedulerConfig(max_running=6, max_step_tokens=16, prefill_chunk=8, max_queue=16), stop_at_eos=False,
        kv_cache_bytes=12 * 4 * _bytes_per_token(reference), block_size=4))
    try:
        assert engine.pool.num_blocks == 12
        ps = prompts(reference.spec.vocab_size, [10, 14, 6, 12, 9, 11], seed=7)
        _greedy_all(engine, reference, ps, [16, 12, 20, 14, 16, 12])
        stats = engine.stats()
        assert stats.preemptions > 0 and stats.blocks_used == 0 and stats.running == stats.waiting == 0
        seeded = SamplingParams(max_tokens=14, temperature=0.8, top_k=20, seed=3)
        alone = run_concurrently(engine, [(ps[0], seeded)])[0]
        before = engine.stats().preemptions
        crowded = run_concurrently(engine, [(p, seeded) for p in ps])
        assert engine.stats().preemptions > before
        assert crowded[0] == alone  # a preempted, recomputed seeded request draws the same tokens
    finally:
        engine.close()


def _bytes_per_token(reference) -> int:
    from router_service.model.paged_cache import bytes_per_token

    return bytes_per_token(reference.spec, reference.dense.dtype)


def test_a_request_that_can_never_fit_is_refused_naming_the_numbers(reference):
    from router_service.engine.config import RequestTooLarge

    engine = Engine(reference.dense, reference.experts, EngineConfig(kv_cache_bytes=8 * 4 * _bytes_per_token(reference),
                                                                     block_size=4))
    try:
        with pytest.raises(RequestTooLarge, match=r"prompt \(20\) \+ max_tokens \(13\) needs 33 tokens of KV cache; "
                                                  r"this router's pool holds 32 \(8 blocks of 4\)"):
            engine.submit(list(range(2, 22)), SamplingParams(max_tokens=13), lambda ev: None)
        engine.submit(list(range(2, 22)), SamplingParams(max_tokens=12), lambda ev: None).cancelled = True  # fits
        with pytest.raises(RequestTooLarge, match="the input needs 40 tokens"):
            asyncio.run(engine.score(list(range(2, 42))))
    finally:
        engine.close()


def test_resident_memory_stays_within_the_kv_budget_under_load(reference):
    """The pool is committed at start; prompts whose KV would exceed it many times over are
    preempted and recomputed, never grown into. 16 prompts of 1000 tokens on a pool of 1024
    tokens: holding them all would take ~8 MiB more here; resident memory grows < 2 MiB."""
    per_token = _bytes_per_token(reference)
    engine = Engine(reference.dense, reference.experts, EngineConfig(
        SchedulerConfig(max_running=16, max_step_tokens=256, prefill_chunk=128, max_queue=64), stop_at_eos=False,
        kv_cache_bytes=64 * 16 * per_token, block_size=16))
    try:
        ps = prompts(reference.spec.vocab_size, [1000] * 16, seed=8)
        run_concurrently(engine, [(p, SamplingParams(max_tokens=2)) for p in ps])  # warm-up
        before = _rss_bytes()
        run_concurrently(engine, [(p, SamplingParams(max_tokens=20)) for p in ps])
        grown = _rss_bytes() - before
        unbounded = 16 * 1020 * per_token
        assert engine.stats().preemptions > 0
        assert grown < unbounded / 4, f"resident memory grew {grown / 2**20:.2f} MiB; an unbounded cache " \
                                      f"would have needed {unbounded / 2**20:.1f} MiB"
    finally:
        engine.close()


def _rss_bytes() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
