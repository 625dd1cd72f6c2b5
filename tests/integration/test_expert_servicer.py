"""ExpertServicer over real gRPC on loopback, without Ray: math, errors, load/unload, stats.

Each test runs one event loop (asyncio.run) holding both the grpc.aio server and the client.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import weakref

import grpc
import pytest
import torch
from elasticmoe.v1 import expert_pb2, expert_pb2_grpc

from cluster.checkpoint.reader import Checkpoint
from experts.config import ExpertGroupConfig
from experts.group import serve_group
from experts.kernels.forward import moe_forward
from experts.kernels.weights import load_slots
from experts.servicer import ExpertServicer
from experts.wire import decode, encode
from helpers.groups import Groups

H, E = 64, 8  # the tiny preset
SLOT_BYTES = 3 * 64 * 64 * 4  # gate, up, down of one tiny expert in fp32


@contextlib.asynccontextmanager
async def serving(checkpoint, slots):
    config = ExpertGroupConfig(checkpoint=str(checkpoint), slots=slots, device="cpu", backend="torch", name="t")
    servicer = await ExpertServicer.create(config)
    server, address = await serve_group(config, servicer)
    channel = grpc.aio.insecure_channel(address)
    try:
        yield servicer, expert_pb2_grpc.ExpertServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(None)


def request(layer, hidden, expert_ids, weights, /, **overrides) -> expert_pb2.ForwardRequest:
    fields = dict(hidden=encode(hidden), expert_ids=encode(expert_ids), weights=encode(weights))
    return expert_pb2.ForwardRequest(layer=layer, placement_version=1, **{**fields, **overrides})


def random_batch(t, k, experts, seed=0):
    """hidden [t, H], expert_ids [t, k] drawn from `experts` and -1, weights [t, k]."""
    gen = torch.Generator().manual_seed(seed)
    choices = torch.tensor(list(experts) + [-1], dtype=torch.int32)
    ids = choices[torch.randint(len(choices), (t, k), generator=gen)]
    return torch.randn(t, H, generator=gen), ids, torch.rand(t, k, generator=gen)


def reference(checkpoint, layer, hidden, ids, weights):
    """moe_forward over all experts of the layer: slot id = expert id."""
    every = load_slots(Checkpoint(checkpoint), [(layer, e) for e in range(E)], torch.float32)
    return moe_forward(hidden, ids, weights, every, backend="torch")


async def expect_error(call, code, *fragments):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    for fragment in fragments:
        assert fragment in info.value.details()
    return info.value.details()


def test_forward_matches_kernel_on_held_subset(tiny_checkpoint):
    held = {0: [1, 3, 4], 1: [0, 5, 6, 7]}

    async def body():
        async with serving(tiny_checkpoint, [(l, e) for l, es in held.items() for e in es]) as (_, stub):
            for layer, experts in held.items():
                for t in (1, 13, 64):
                    hidden, ids, weights = random_batch(t, 2, experts, seed=t + layer)
                    assert (ids == -1).any() or t == 1
                    reply = await stub.Forward(request(layer, hidden, ids, weights))
                    out = decode(reply.output, "output")
                    assert out.shape == (t, H) and out.dtype == torch.float32
                    torch.testing.assert_close(out, reference(tiny_checkpoint, layer, hidden, ids, weights),
                                               atol=1e-5, rtol=1e-5)

    asyncio.run(body())


def test_empty_request_and_all_remote_tokens(tiny_checkpoint):
    async def body():
        async with serving(tiny_checkpoint, [(0, 2)]) as (_, stub):
            reply = await stub.Forward(request(0, torch.empty(0, H), torch.empty(0, 2, dtype=torch.int32),
                                               torch.empty(0, 2)))
            assert decode(reply.output, "output").shape == (0, H)
            # a layer this group holds nothing of, every pair served elsewhere: zeros, not an error
            ids = torch.full((3, 2), -1, dtype=torch.int32)
            reply = await stub.Forward(request(1, torch.randn(3, H), ids, torch.rand(3, 2)))
            assert torch.equal(decode(reply.output, "output"), torch.zeros(3, H))

    asyncio.run(body())


def test_malformed_requests_are_invalid_argument(tiny_checkpoint):
    hidden, ids, weights = random_batch(4, 2, [2])
    bad = grpc.StatusCode.INVALID_ARGUMENT

    async def body():
        async with serving(tiny_checkpoint, [(0, 2)]) as (_, stub):
            await expect_error(stub.Forward(request(0, hidden.bfloat16(), ids, weights)), bad, "hidden.dtype",
                               "float32")
            short = expert_pb2.Tensor(dtype="float32", shape=[4, H], data=b"\0" * (3 * H * 4))
            await expect_error(stub.Forward(request(0, hidden, ids, weights, hidden=short)), bad, "hidden",
                               "bytes")
            short_ids = expert_pb2.Tensor(dtype="int32", shape=[4, 2], data=b"\0" * 12)
            await expect_error(stub.Forward(request(0, hidden, ids, weights, expert_ids=short_ids)), bad,
                               "expert_ids")
            await expect_error(stub.Forward(request(0, torch.randn(4, 32), ids, weights)), bad, "hidden", "H=64")
            await expect_error(stub.Forward(request(0, hidden, ids[:3], weights[:3])), bad, "expert_ids", "t=4")
            await expect_error(stub.Forward(request(0, hidden, ids.float(), weights)), bad, "expert_ids.dtype")
            await expect_error(stub.Forward(request(0, hidden, ids, weights[:, :1])), bad, "weights")
            await expect_error(stub.Forward(request(0, hidden, ids + 8, weights)), bad, "expert_ids", "[-1, 7]")
            await expect_error(stub.Forward(request(5, hidden, ids, weights)), bad, "layer 5")

    asyncio.run(body())


def test_expert_not_held_is_failed_precondition_naming_pairs(tiny_checkpoint):
    async def body():
        async with serving(tiny_checkpoint, [(0, 2), (1, 3)]) as (_, stub):
            ids = torch.tensor([[2, 5], [-1, 3], [6, 2]], dtype=torch.int32)
            details = await expect_error(stub.Forward(request(0, torch.randn(3, H), ids, torch.rand(3, 2))),
                                         grpc.StatusCode.FAILED_PRECONDITION, "(0, 3)", "(0, 5)", "(0, 6)")
            assert "(0, 2)" not in details

    asyncio.run(body())


def test_load_unload_change_bytes_and_free_memory(tiny_checkpoint):
    async def body():
        async with serving(tiny_checkpoint, [(0, 1)]) as (servicer, stub):
            base = servicer.loaded_bytes
            assert base == SLOT_BYTES
            two = [expert_pb2.Slot(layer=0, expert=2)]
            loaded = await stub.LoadExperts(expert_pb2.LoadExpertsRequest(slots=two))
            assert loaded.loaded_bytes == base + SLOT_BYTES
            assert [(s.layer, s.expert) for s in loaded.slots] == [(0, 1), (0, 2)]
            again = await stub.LoadExperts(expert_pb2.LoadExpertsRequest(slots=two))  # idempotent
            assert again.loaded_bytes == loaded.loaded_bytes

            hidden, ids, weights = random_batch(5, 2, [1, 2])
            await stub.Forward(request(0, hidden, ids, weights))

            # expert 2's weights (packed on CPU fp32: each matrix its own tensor)
            held = servicer._held[0].weights
            old = weakref.ref(held.slot(held.num_slots - 1)[0])
            del held
            unloaded = await stub.UnloadExperts(expert_pb2.UnloadExpertsRequest(slots=two))
            assert unloaded.loaded_bytes == base
            assert [(s.layer, s.expert) for s in unloaded.slots] == [(0, 1)]
            gc.collect()
            assert old() is None, "the unloaded weights are still referenced"
            await expect_error(stub.Forward(request(0, hidden, torch.full_like(ids, 2), weights)),
                               grpc.StatusCode.FAILED_PRECONDITION, "(0, 2)")

            noop = await stub.UnloadExperts(expert_pb2.UnloadExpertsRequest(slots=two))
            assert noop.loaded_bytes == base
            await expect_error(stub.LoadExperts(expert_pb2.LoadExpertsRequest(slots=[expert_pb2.Slot(layer=0, expert=8)])),
                               grpc.StatusCode.INVALID_ARGUMENT, "expert must be in [0, 7]")
            bad_layer = [expert_pb2.Slot(layer=0, expert=3), expert_pb2.Slot(layer=9, expert=0)]
            await expect_error(stub.LoadExperts(expert_pb2.LoadExpertsRequest(slots=bad_layer)),
                               grpc.StatusCode.INVALID_ARGUMENT, "layer 9 is not an MoE layer")
            assert servicer.slots == [(0, 1)]  # a failed load applies none of its slots

    asyncio.run(body())


def test_stats_count_tokens_per_slot(tiny_checkpoint):
    async def body():
        async with serving(tiny_checkpoint, [(0, 1), (0, 4), (1, 4)]) as (_, stub):
            ids = torch.tensor([[1, 4], [4, -1], [-1, -1], [1, 4]], dtype=torch.int32)  # expert 1: 2, expert 4: 3
            await stub.Forward(request(0, torch.randn(4, H), ids, torch.rand(4, 2)))
            await stub.Forward(request(1, torch.randn(2, H), torch.tensor([[4, -1], [-1, 4]], dtype=torch.int32),
                                       torch.rand(2, 2)))
            stats = await stub.Stats(expert_pb2.StatsRequest())
            tokens = {(s.slot.layer, s.slot.expert): s.tokens for s in stats.slots}
            assert tokens == {(0, 1): 2, (0, 4): 3, (1, 4): 2}
            assert stats.forward_calls == 2 and stats.queue_depth == 0 and stats.busy_s > 0
            assert stats.device == "cpu" and stats.loaded_bytes == 3 * SLOT_BYTES

    asyncio.run(body())


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown ExpertGroupConfig key 'prot'"):
        ExpertGroupConfig.from_dict({"checkpoint": "x", "prot": 1})
    assert ExpertGroupConfig.from_dict({"checkpoint": "x", "slots": [[0, 1]]}).slots == [(0, 1)]
    for field, value in [("device", "tpu"), ("dtype", "float64"), ("backend", "cuda"), ("port", 70000),
                         ("slots", [(0, -1)]), ("slots", [(0, 1), (0, 1)]), ("host", "")]:
        with pytest.raises(ValueError, match=field):
            ExpertGroupConfig(checkpoint="x", **{field: value})


# ---- bounded fuzz of Forward over real gRPC: any request is served or refused with a clear status ----

@pytest.fixture(scope="module")
def group_address(tiny_checkpoint):
    """One group serving (0, 1) and (0, 2) on a loop in a background thread, for a sync client."""
    groups = Groups(tiny_checkpoint, [[(0, 1), (0, 2)]])
    yield groups.addresses[0]
    groups.close()


def _tensors():
    from hypothesis import strategies as st

    return st.builds(expert_pb2.Tensor, dtype=st.sampled_from(["float32", "int32", "bfloat16", "float64", "", "x"]),
                     shape=st.lists(st.integers(-2, 70), max_size=4), data=st.binary(max_size=1024))


def _well_shaped():
    """Requests whose tensors decode, with ids and sizes that may still be wrong."""
    from hypothesis import strategies as st

    def build(t, k, h, ids, layer):
        ids = torch.tensor(ids[: t * k] + [-1] * (t * k - len(ids[: t * k])), dtype=torch.int32).view(t, k)
        return expert_pb2.ForwardRequest(layer=layer, hidden=encode(torch.randn(t, h)), expert_ids=encode(ids),
                                         weights=encode(torch.rand(t, k)), placement_version=3)

    return st.builds(build, st.integers(0, 5), st.integers(1, 3), st.sampled_from([H, H, 32]),
                     st.lists(st.integers(-3, 9), max_size=15), st.integers(-1, 3))


def test_fuzzed_forward_is_served_or_refused_with_a_clear_status(group_address):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    clear = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}
    channel = grpc.insecure_channel(group_address)
    stub = expert_pb2_grpc.ExpertServiceStub(channel)
    outcomes = {"ok": 0, "refused": 0}

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_well_shaped() | st.builds(expert_pb2.ForwardRequest, layer=st.integers(-2, 4), hidden=_tensors(),
                                      expert_ids=_tensors(), weights=_tensors(), placement_version=st.integers(-1, 9)))
    def fuzz(req):
        try:
            reply = stub.Forward(req, timeout=30)
        except grpc.RpcError as e:
            assert e.code() in clear, (e.code(), e.details())
            assert e.details()  # says what was wrong
            outcomes["refused"] += 1
            return
        assert list(reply.output.shape) == [req.hidden.shape[0], H]
        outcomes["ok"] += 1

    try:
        fuzz()
        # still serving, and both branches were exercised
        hidden, ids, weights = random_batch(3, 2, [1, 2])
        assert list(stub.Forward(request(0, hidden, ids, weights), timeout=30).output.shape) == [3, H]
    finally:
        channel.close()
    assert outcomes["ok"] and outcomes["refused"], outcomes


def test_same_layer_forwards_of_two_routers_run_as_one_kernel_call(tiny_checkpoint):
    """Two routers' Forwards of one layer arriving together (a 20 ms window here) are one
    moe_forward; each gets exactly its own rows, equal to the reference."""
    async def body():
        async with serving(tiny_checkpoint, [(0, e) for e in range(E)]) as (servicer, stub):
            servicer.coalescer.window_s = 0.02
            a, b = random_batch(5, 2, range(E), seed=1), random_batch(3, 2, range(E), seed=2)
            out_a, out_b = await asyncio.gather(stub.Forward(request(0, *a)), stub.Forward(request(0, *b)))
            assert servicer.coalescer.calls == 1 and servicer.coalescer.merged == 2
            for out, batch in ((out_a, a), (out_b, b)):
                assert torch.allclose(decode(out.output, "output"), reference(tiny_checkpoint, 0, *batch), atol=1e-5)
            stats = await stub.Stats(expert_pb2.StatsRequest())
            # two requests answered, one kernel call that served both
            assert (stats.forward_calls, stats.kernel_calls, stats.merged_calls) == (2, 1, 2)

    asyncio.run(body())
