"""The block manager and the scheduler, alone (no model): admission by free blocks, preemption
of the newest sequence when blocks run out, and the pool's invariants under any sequence of
allocate / append / preempt / finish / cancel (hypothesis)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router_service.engine.block_manager import BlockManager
from router_service.engine.scheduler import QueueFull, Scheduler, SchedulerConfig
from router_service.engine.sequence import Sequence
from router_service.model.sampling import SamplingParams


def seq(prompt_len: int, max_tokens: int = 8) -> Sequence:
    return Sequence(list(range(2, 2 + prompt_len)), SamplingParams(max_tokens=max_tokens), None, lambda ev: None)


def run_step(scheduler: Scheduler) -> list[tuple[Sequence, int]]:
    """What the engine does with a batch, minus the model: the fed tokens enter the cache and a
    sequence that reached its end gets one more (made-up) output token."""
    batch = scheduler.schedule()
    assert all(s in scheduler.running for s, _ in batch), "a sequence scheduled but not running"
    for s, n in batch:
        s.num_computed += n
        if s.num_pending == 0:
            s.output.append(7)
    check(scheduler.blocks, scheduler)
    return batch


def check(blocks: BlockManager, scheduler: Scheduler | None = None) -> None:
    held = [b for s in (scheduler.running if scheduler else []) for b in s.block_table]
    assert len(held) == len(set(held)), "a block held twice"
    assert blocks.num_free + blocks.num_used == blocks.num_blocks
    if scheduler is not None:
        assert blocks.num_used == len(held), "a block leaked or was counted free while held"
        for s in scheduler.running:
            assert len(s.block_table) == blocks.blocks_for(s.num_computed) or s.num_computed == 0
        for s in scheduler.waiting:
            assert not s.block_table and s.num_computed == 0


def test_admission_waits_for_blocks_and_never_overtakes():
    blocks = BlockManager(num_blocks=4, block_size=4)
    sched = Scheduler(SchedulerConfig(max_running=8, max_step_tokens=64, prefill_chunk=64), blocks)
    big, small = seq(12), seq(2)  # big takes 3 blocks; then small fits, but waits behind a third one
    sched.add(big), sched.add(seq(8)), sched.add(small)
    batch = run_step(sched)
    assert [s for s, _ in batch] == [big]  # the second (2 blocks) does not fit in the 1 left: the head waits
    assert list(sched.waiting)[1] is small  # and the small one behind it does not overtake


def test_a_decode_without_a_block_preempts_the_newest_and_it_is_recomputed():
    blocks = BlockManager(num_blocks=3, block_size=2)
    sched = Scheduler(SchedulerConfig(max_running=4, max_step_tokens=16, prefill_chunk=16), blocks)
    old, new = seq(2, max_tokens=10), seq(2, max_tokens=10)
    sched.add(old), sched.add(new)
    run_step(sched)  # both prefill: one block each, one output token each
    run_step(sched)  # decodes: old takes the third block for its 3rd token; new needs one too: preempted (newest)
    assert sched.num_preemptions == 1 and new.num_preemptions == 1
    assert new in sched.waiting and new.num_computed == 0 and new.output == [7]  # its tokens stay
    assert old in sched.running
    assert new.num_pending == 3  # prompt + output: recomputed as a prefill when it returns


def test_the_oldest_preempts_itself_only_when_it_is_the_only_one():
    blocks = BlockManager(num_blocks=1, block_size=2)
    sched = Scheduler(SchedulerConfig(max_running=2, max_step_tokens=8, prefill_chunk=8), blocks)
    only = seq(2, max_tokens=4)
    sched.add(only)
    run_step(sched)
    batch = sched.schedule()  # needs a second block for position 2; nothing else to preempt: itself
    assert batch == [] and only.num_preemptions == 1 and only in sched.waiting


def test_two_prompts_that_each_fill_the_pool_finish_one_after_the_other():
    """The older one preempts the newer for room and keeps it; nothing joins in a step that
    preempted (or the pool thrashes: regression, 1000-token prompts on a 1024-token pool)."""
    blocks = BlockManager(num_blocks=16, block_size=4)
    sched = Scheduler(SchedulerConfig(max_running=4, max_step_tokens=16, prefill_chunk=8), blocks)
    first, second = seq(60, max_tokens=3), seq(60, max_tokens=3)
    sched.add(first), sched.add(second)
    for _ in range(200):
        run_step(sched)
        for s in list(sched.running):
            if len(s.output) >= s.params.max_tokens:
                sched.finish(s)
        if not sched.has_work():
            break
    assert not sched.has_work()
    assert first.num_preemptions == 0 and second.num_preemptions <= 2


def test_finish_and_cancel_give_blocks_back():
    blocks = BlockManager(num_blocks=8, block_size=4)
    sched = Scheduler(SchedulerConfig(max_running=4, max_step_tokens=64, prefill_chunk=64), blocks)
    a, b = seq(9), seq(5)
    sched.add(a), sched.add(b)
    run_step(sched)
    assert blocks.num_used == 5
    sched.finish(a)
    b.cancelled = True
    sched.schedule()
    assert blocks.num_used == 0 and not sched.running


def test_queue_bound():
    sched = Scheduler(SchedulerConfig(max_running=1, max_step_tokens=4, prefill_chunk=4, max_queue=2),
                      BlockManager(4, 4))
    sched.add(seq(1)), sched.add(seq(1))
    with pytest.raises(QueueFull):
        sched.add(seq(1))


@settings(max_examples=150, deadline=None)
@given(st.integers(2, 12), st.integers(1, 4), st.lists(st.tuples(st.integers(1, 20), st.integers(1, 12)),
                                                       min_size=1, max_size=10),
       st.lists(st.sampled_from(["step", "step", "step", "cancel", "finish"]), max_size=60))
def test_any_mix_keeps_the_pool_consistent_and_every_sequence_progresses(num_blocks, block_size, requests, ops):
    capacity = num_blocks * block_size
    blocks = BlockManager(num_blocks, block_size)
    sched = Scheduler(SchedulerConfig(max_running=4, max_step_tokens=8, prefill_chunk=5, max_queue=64), blocks)
    seqs = []
    for prompt_len, max_tokens in requests:  # what the engine admits: the whole request fits the pool
        if prompt_len + max_tokens <= capacity:
            seqs.append(seq(prompt_len, max_tokens))
            sched.add(seqs[-1])
    for op in ops + ["step"] * 400:  # then run until everything is done: nothing may hang
        if op == "step":
            run_step(sched)
            for s in list(sched.running):
                if len(s.output) >= s.params.max_tokens:
                    sched.finish(s)
        elif op == "cancel" and sched.running:
            sched.running[0].cancelled = True
        elif op == "finish" and sched.running:
            sched.finish(sched.running[-1])
        check(blocks, sched)
        if not sched.has_work():
            break
    assert not sched.has_work(), "some sequence never finished"
    assert blocks.num_used == 0
