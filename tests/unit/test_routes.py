"""routes.choose_groups on its own: shares split an expert's tokens; below whole_below pairs an
expert goes whole to one replica per call, and over calls each replica still gets its share."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cluster.placement.table import PlacementTable
from router_service.serving.routes import choose_groups, compile_routes

SPEC = SimpleNamespace(sparse_layers=(0,), num_experts=4)  # all that routing reads of a ModelSpec


def routes(shares=(0.25, 0.75)):
    replicas = {(0, e): (0, 1) for e in range(4)}  # every expert on both groups
    return compile_routes(SPEC, PlacementTable(1, ("a:1", "b:2"), replicas, {(0, e): shares for e in range(4)}))


def test_without_whole_experts_a_call_splits_each_expert_by_the_shares():
    ids = torch.tensor([[0, 1]] * 400)
    groups = choose_groups(routes(), 0, ids)
    assert abs((groups[:, 0] == 0).float().mean().item() - 0.25) < 0.01


def test_an_expert_below_whole_below_goes_to_one_replica_and_a_busy_one_is_still_split():
    few, many = torch.tensor([[0, 1]] * 3), torch.tensor([[2, 3]] * 40)
    ids = torch.cat([few, many])
    for call in range(20):
        groups = choose_groups(routes(), 0, ids, call, whole_below=8)
        assert len(set(groups[:3, 0].tolist())) == 1 and len(set(groups[:3, 1].tolist())) == 1  # whole
        assert set(groups[3:, 0].tolist()) == {0, 1}  # 40 pairs: split


def test_over_calls_a_whole_expert_follows_its_shares_and_experts_spread_within_a_call():
    ids = torch.tensor([[0, 1], [2, 3]])
    chosen = torch.stack([choose_groups(routes(), 0, ids, call, whole_below=4) for call in range(2000)])  # [C, 2, 2]
    for e in range(4):
        picks = chosen.flatten(1)[:, e]
        assert abs((picks == 0).float().mean().item() - 0.25) < 0.02, e
    assert (chosen.flatten(1).min(1).values != chosen.flatten(1).max(1).values).float().mean() > 0.5


def test_single_replicas_are_a_lookup_whatever_whole_below():
    table = PlacementTable.round_robin(SPEC, ["a:1", "b:2"])
    r = compile_routes(SPEC, table)
    ids = torch.tensor([[0, 1], [2, 3]])
    expected = torch.tensor([[table.replicas[(0, e)][0] for e in row] for row in ids.tolist()])
    assert torch.equal(choose_groups(r, 0, ids, 7, whole_below=100), expected)


@pytest.mark.parametrize("bad", [-1, 10**6, 2.5, True, "8"])
def test_router_config_bounds_whole_expert_below(bad):
    from router_service.serving.router_config import RouterConfig

    placement = PlacementTable.round_robin(SPEC, ["a:1"]).to_json()
    assert RouterConfig(checkpoint="c", placement=placement, whole_expert_below=8).whole_expert_below == 8
    with pytest.raises(ValueError, match=r"whole_expert_below must be an int in \[0, \d+\]"):
        RouterConfig(checkpoint="c", placement=placement, whole_expert_below=bad)
