"""The group's coalescer alone (experts/coalescer.py): same-layer calls queued together run as one
computation and each gets exactly its rows back; other layers and other weight snapshots never mix;
a failed computation fails each call it served, and the next runs."""
from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from experts.coalescer import Coalescer


class Compute:
    """Doubles the hidden rows; blocks the first call until released, so the others queue behind it."""

    def __init__(self):
        self.calls, self.release, self.fail = [], threading.Event(), False

    def __call__(self, key, hidden, slot_ids, weights):
        self.calls.append((key, hidden.shape[0]))
        if len(self.calls) == 1:
            self.release.wait(10)
        if self.fail:
            raise RuntimeError("kernel failed")
        return hidden * 2


def request(rows: int, start: int):
    hidden = torch.arange(start, start + rows, dtype=torch.float32)[:, None].repeat(1, 4)
    return hidden, torch.zeros(rows, 2, dtype=torch.int64), torch.ones(rows, 2)


def test_queued_same_layer_calls_run_once_and_get_their_own_rows():
    compute = Compute()
    coalescer = Coalescer(compute)

    async def main():
        first = asyncio.ensure_future(coalescer.run(("l0", "w"), *request(1, 0)))
        await asyncio.sleep(0.05)  # the worker is inside the first call now
        rest = [asyncio.ensure_future(coalescer.run(key, *request(n, start)))
                for key, n, start in ((("l0", "w"), 2, 10), (("l1", "w"), 3, 20), (("l0", "w"), 4, 30))]
        await asyncio.sleep(0.05)
        compute.release.set()
        return await first, await asyncio.gather(*rest)

    first, (a, b, c) = asyncio.run(main())
    assert compute.calls == [(("l0", "w"), 1), (("l0", "w"), 6), (("l1", "w"), 3)]  # l0's two merged, l1 alone
    assert coalescer.calls == 3 and coalescer.merged == 2
    for out, (rows, start) in ((first, (1, 0)), (a, (2, 10)), (b, (3, 20)), (c, (4, 30))):
        assert torch.equal(out, request(rows, start)[0] * 2)


def test_a_failed_computation_fails_the_calls_it_served_and_the_next_runs():
    compute = Compute()
    compute.release.set()
    coalescer = Coalescer(compute)

    async def main():
        compute.fail = True
        with pytest.raises(RuntimeError, match="kernel failed"):
            await coalescer.run(("l0", "w"), *request(2, 0))
        compute.fail = False
        return await coalescer.run(("l0", "w"), *request(2, 5))

    assert torch.equal(asyncio.run(main()), request(2, 5)[0] * 2)


def test_window_is_bounded():
    with pytest.raises(ValueError, match=r"coalesce_window_s must be a number of seconds in \[0, 0.1\]"):
        from experts.config import ExpertGroupConfig

        ExpertGroupConfig("ckpt", coalesce_window_s=1.0)


def test_a_call_left_for_the_next_round_by_max_tokens_is_answered_too():
    """Same layer, 6 + 6 + 2 rows queued behind a running call, max_tokens 8: the second 6 waits for
    the next round while the 2 joins the first. The queue is handled by identity, never by comparing
    the calls' tensors (which once raised and left calls unanswered)."""
    compute = Compute()
    coalescer = Coalescer(compute, max_tokens=8)

    async def main():
        first = asyncio.ensure_future(coalescer.run(("l0", "w"), *request(1, 0)))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(coalescer.run(("l0", "w"), *request(n, start)))
                for n, start in ((6, 10), (6, 20), (2, 30))]
        await asyncio.sleep(0.05)
        compute.release.set()
        return await first, await asyncio.wait_for(asyncio.gather(*rest), 10)

    first, outs = asyncio.run(main())
    assert [n for _, n in compute.calls] == [1, 8, 6]
    for out, (rows, start) in zip(outs, ((6, 10), (6, 20), (2, 30))):
        assert torch.equal(out, request(rows, start)[0] * 2)
