"""The model served across processes' worth of gRPC equals the in-process reference.

Dense part in this process (as the router will run it), experts in expert-group gRPC
servers over loopback, placed round-robin over 1, 2 and 3 groups, for each family.
"""
from __future__ import annotations

import asyncio

import pytest
import torch

from cluster.checkpoint.reader import Checkpoint
from cluster.placement.table import PlacementTable
from helpers.groups import Groups, distributed_model
from router_service.model.dense import DenseModel
from router_service.model.reference import ReferenceModel
from router_service.serving.dispatch import DispatchError, RemoteExperts


@pytest.mark.parametrize("num_groups", [1, 2, 3])
def test_greedy_tokens_and_logits_equal_reference(hf_checkpoint, num_groups):
    _, path, _ = hf_checkpoint
    reference = ReferenceModel.from_pretrained(path)
    model, remote, groups, ckpt = distributed_model(path, num_groups)
    try:
        assert ckpt.loaded_bytes < reference.loaded_bytes  # the router side holds no expert
        ids = torch.randint(0, ckpt.spec.vocab_size, (2, 11), generator=torch.Generator().manual_seed(5))
        assert (model(ids) - reference(ids)).abs().max().item() <= 1e-4
        prompt = ids[0, :6].tolist()
        assert model.generate_greedy(prompt, 10) == reference.generate_greedy(prompt, 10)
    finally:
        remote.close()
        groups.close()


@pytest.mark.parametrize("whole_below", [0, 4])
def test_replicas_share_an_experts_tokens(tiny_checkpoint, whole_below):
    """Every expert on both groups: tokens alternate between replicas (or, for an expert with fewer
    than whole_below pairs in a call, all go to one of them), the sum is unchanged."""
    ckpt = Checkpoint(tiny_checkpoint)
    everything = [(l, e) for l in ckpt.spec.sparse_layers for e in range(ckpt.spec.num_experts)]
    groups = Groups(tiny_checkpoint, [everything, everything])
    table = PlacementTable(2, tuple(groups.addresses), {slot: (0, 1) for slot in everything})
    remote = RemoteExperts(ckpt.spec, table, whole_below=whole_below)
    try:
        reference = ReferenceModel.from_pretrained(tiny_checkpoint)
        model = ReferenceModel(DenseModel(ckpt.spec, ckpt.load_dense()), remote)
        ids = torch.randint(0, ckpt.spec.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
        assert (model(ids) - reference(ids)).abs().max().item() <= 1e-4
        prompt = ids[0, :5].tolist()  # decode: one token a step, every expert below whole_below
        assert model.generate_greedy(prompt, 8) == reference.generate_greedy(prompt, 8)
    finally:
        remote.close()
        groups.close()


def test_group_that_lacks_an_expert_is_a_clear_error(tiny_checkpoint):
    """A placement that disagrees with what a group holds fails with the group's status."""
    ckpt = Checkpoint(tiny_checkpoint)
    groups = Groups(tiny_checkpoint, [[(0, 0)]])
    table = PlacementTable.round_robin(ckpt.spec, groups.addresses)  # claims group 0 holds everything
    stale = []
    remote = RemoteExperts(ckpt.spec, table, on_stale=lambda: stale.append(1))
    try:
        x = torch.randn(3, ckpt.spec.hidden_size)
        ids = torch.tensor([[0, 1], [0, 2], [3, 0]])
        with pytest.raises(DispatchError, match="FAILED_PRECONDITION") as err:
            remote(0, x, ids, torch.full((3, 2), 0.5))
        assert err.value.address == groups.addresses[0]
        assert stale  # the router was told to fetch the placement now
    finally:
        remote.close()
        groups.close()


def test_stale_placement_is_served_by_another_replica_and_refreshed(tiny_checkpoint):
    """Group 0 dropped most of its experts (a newer placement); a router still on the old table
    gets FAILED_PRECONDITION from it, asks for the new placement, and gets the answer from the
    other replica: the same output as the reference experts, no error."""
    ckpt = Checkpoint(tiny_checkpoint)
    everything = [(l, e) for l in ckpt.spec.sparse_layers for e in range(ckpt.spec.num_experts)]
    groups = Groups(tiny_checkpoint, [[(0, 0)], everything])
    old = PlacementTable(1, tuple(groups.addresses), {slot: (0, 1) for slot in everything})
    stale = []
    remote = RemoteExperts(ckpt.spec, old, on_stale=lambda: stale.append(1))
    try:
        reference = ReferenceModel.from_pretrained(tiny_checkpoint)
        layer = ckpt.spec.sparse_layers[0]
        x, ids, w = torch.randn(6, ckpt.spec.hidden_size), torch.tensor([[0, 1], [2, 3], [4, 5]] * 2), torch.rand(6, 2)
        got = remote(layer, x, ids, w)
        torch.testing.assert_close(got, reference.experts(layer, x, ids, w), atol=1e-5, rtol=1e-5)
        assert stale
    finally:
        remote.close()
        groups.close()


def test_new_placement_is_adopted_at_a_step_boundary(tiny_checkpoint):
    ckpt = Checkpoint(tiny_checkpoint)
    everything = [(l, e) for l in ckpt.spec.sparse_layers for e in range(ckpt.spec.num_experts)]
    groups = Groups(tiny_checkpoint, [everything, everything])
    first = PlacementTable.round_robin(ckpt.spec, [groups.addresses[0]])
    second = PlacementTable.round_robin(ckpt.spec, [groups.addresses[1]], version=2)
    remote = RemoteExperts(ckpt.spec, first)
    try:
        x, ids, w = torch.randn(2, ckpt.spec.hidden_size), torch.tensor([[0, 1], [2, 3]]), torch.full((2, 2), 0.5)
        last_layer = ckpt.spec.sparse_layers[-1]
        with remote.step():
            remote(ckpt.spec.sparse_layers[0], x, ids, w)
            remote.set_table(second)
            remote(last_layer, x, ids, w)  # mid-step: still the old placement
            assert remote.table.version == 1
        assert remote._groups.addresses == set(groups.addresses)  # both open while the old one is in use
        remote(ckpt.spec.sparse_layers[0], x, ids, w)  # next step
        assert remote.table.version == 2
        assert remote._groups.addresses == {groups.addresses[1]}  # the group no placement names: closed
    finally:
        remote.close()
        groups.close()


def test_tokens_split_by_shares_and_routed_load_is_counted(tiny_checkpoint):
    """Expert 0 of layer 0 on both groups with shares 0.2 / 0.8; expert 1 with shares 0 / 1."""
    ckpt = Checkpoint(tiny_checkpoint)
    everything = [(l, e) for l in ckpt.spec.sparse_layers for e in range(ckpt.spec.num_experts)]
    groups = Groups(tiny_checkpoint, [everything, everything])
    layer = ckpt.spec.sparse_layers[0]
    table = PlacementTable(1, tuple(groups.addresses), {slot: (0, 1) for slot in everything},
                           {(layer, 0): (0.2, 0.8), (layer, 1): (0.0, 1.0)})
    remote = RemoteExperts(ckpt.spec, table)
    try:
        T = 500
        ids = torch.tensor([[0, 1]] * T)
        remote(layer, torch.randn(T, ckpt.spec.hidden_size), ids, torch.full((T, 2), 0.5))
        stats = remote.group_stats()
        served = [{(s.slot.layer, s.slot.expert): s.tokens for s in stats[a].slots} for a in groups.addresses]
        assert served[0][(layer, 0)] + served[1][(layer, 0)] == T
        assert abs(served[0][(layer, 0)] / T - 0.2) < 0.01  # low-discrepancy split: close even for few tokens
        assert served[0].get((layer, 1), 0) == 0 and served[1][(layer, 1)] == T  # a zero share gets nothing
        assert remote.take_load() == ({(layer, 0): T, (layer, 1): T}, {(layer, 0): 1, (layer, 1): 1})  # 1 call each
        remote(layer, torch.randn(2, ckpt.spec.hidden_size), torch.tensor([[0, 2], [0, 3]]), torch.full((2, 2), 0.5))
        assert remote.take_load() == ({(layer, 0): 2, (layer, 2): 1, (layer, 3): 1},  # taken: counts restart
                                      {(layer, 0): 1, (layer, 2): 1, (layer, 3): 1})  # a call touches an expert once
        assert remote.take_load() == ({}, {})
    finally:
        remote.close()
        groups.close()


def test_version_in_use_covers_the_step_in_flight(tiny_checkpoint):
    """A router reports the oldest placement a step may still route by, so the autoscaler
    unloads an old replica only once no step uses it."""
    ckpt = Checkpoint(tiny_checkpoint)
    everything = [(l, e) for l in ckpt.spec.sparse_layers for e in range(ckpt.spec.num_experts)]
    groups = Groups(tiny_checkpoint, [everything])
    remote = RemoteExperts(ckpt.spec, PlacementTable.round_robin(ckpt.spec, groups.addresses))
    try:
        x, ids, w = torch.randn(2, ckpt.spec.hidden_size), torch.tensor([[0, 1], [2, 3]]), torch.full((2, 2), 0.5)
        first, last = ckpt.spec.sparse_layers[0], ckpt.spec.sparse_layers[-1]
        with remote.step():  # the engine's: one step, every MoE layer of it
            remote(first, x, ids, w)
            remote.set_table(PlacementTable.round_robin(ckpt.spec, groups.addresses, version=2))
            assert remote.version_in_use == 1  # a step on v1 is in flight
            remote(last, x, ids, w)
        assert remote.version_in_use == 2  # between steps: the next step takes v2
    finally:
        remote.close()
        groups.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the GPU path (router and groups on "
                                                          "CUDA, pinned staging, paged decode kernel) runs there")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_cuda_path_equals_the_reference(tiny_checkpoint, dtype):
    """Router (dense model, KV pool, Triton paged decode) and 2 groups on CUDA over real gRPC: greedy
    tokens equal ReferenceModel's on CPU in fp32; in bf16 the logits stay within tolerance."""
    from router_service.engine.engine import Engine, EngineConfig
    from router_service.model.sampling import SamplingParams

    ckpt = Checkpoint(tiny_checkpoint)
    table = PlacementTable.round_robin(ckpt.spec, ["pending:0", "pending:1"])
    groups = Groups(tiny_checkpoint, [table.slots_of(0), table.slots_of(1)], device="cuda", dtype=dtype)
    remote = RemoteExperts(ckpt.spec, PlacementTable(1, tuple(groups.addresses), table.replicas))
    try:
        torch_dtype = getattr(torch, dtype)
        dense = DenseModel(ckpt.spec, {n: t.to("cuda") for n, t in ckpt.load_dense(torch_dtype).items()})
        reference = ReferenceModel.from_pretrained(tiny_checkpoint)
        prompt = [5, 17, 42, 7, 99, 3]
        if dtype == "float32":
            engine = Engine(dense, remote, EngineConfig(stop_at_eos=False))
            try:
                async def run():
                    return [t async for ev in engine.generate(prompt, SamplingParams(max_tokens=8)) for t in ev.token_ids]

                assert asyncio.run(run()) == reference.generate_greedy(prompt, 8)
            finally:
                engine.close()
        else:
            logits = ReferenceModel(dense, remote)(torch.tensor([prompt], device="cuda"))[0].float().cpu()
            expected = reference(torch.tensor([prompt]))[0]
            assert (logits - expected).abs().max() < 0.1 * expected.abs().max()
    finally:
        remote.close()
        groups.close()


def test_a_slow_group_keeps_pairs_whose_other_replica_just_failed(tiny_checkpoint):
    """Every expert on a dead group and a slow one: the dead group refuses at once, the slow one
    answers after forward_slow_s. The slow group's pairs have no live replica left, so the router
    waits for it rather than giving them to the group that just failed (the soak found this: both
    were marked gone in the same round and the request failed UNAVAILABLE)."""
    import socket

    ckpt = Checkpoint(tiny_checkpoint)
    everything = [(l, e) for l in ckpt.spec.sparse_layers for e in range(ckpt.spec.num_experts)]
    groups = Groups(tiny_checkpoint, [everything])
    groups.servicers[0].forward_delay_s = 0.3
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed
    replicas = {slot: (0, 1) for slot in everything}
    table = PlacementTable(1, (dead, groups.addresses[0]), replicas, {slot: (0.5, 0.5) for slot in everything})
    remote = RemoteExperts(ckpt.spec, table, slow_s=0.1)
    reference = ReferenceModel.from_pretrained(tiny_checkpoint)
    try:
        x = torch.randn(6, ckpt.spec.hidden_size)
        ids, w = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7], [1, 2], [3, 4]]), torch.full((6, 2), 0.5)
        layer = ckpt.spec.sparse_layers[0]
        for _ in range(2):  # the second time the dead group is down already: every pair goes to the slow one
            out = remote(layer, x, ids, w)
            assert torch.allclose(out, reference.experts(layer, x, ids, w), atol=1e-5)
    finally:
        remote.close()
        groups.close()
