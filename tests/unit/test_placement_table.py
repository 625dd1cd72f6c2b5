"""The placement table: initial round-robin, validation, JSON round trip."""
from __future__ import annotations

import pytest

from cluster.checkpoint.make import build_config
from cluster.checkpoint.spec import ModelSpec
from cluster.placement.table import PlacementError, PlacementTable

SPEC = ModelSpec.from_config(build_config("qwen2_moe", "small"))  # 7 MoE layers, 8 experts


@pytest.mark.parametrize("num_groups", [1, 2, 3])
def test_round_robin_spreads_every_layer(num_groups):
    table = PlacementTable.round_robin(SPEC, [f"127.0.0.1:{9000 + g}" for g in range(num_groups)])
    table.validate(SPEC)
    per_group = [len(table.slots_of(g)) for g in range(num_groups)]
    assert sum(per_group) == len(SPEC.sparse_layers) * SPEC.num_experts
    assert max(per_group) - min(per_group) <= len(SPEC.sparse_layers)  # at most one expert per layer apart
    assert all(l in SPEC.sparse_layers for l, _ in table.slots_of(0))


def test_json_round_trip():
    table = PlacementTable.round_robin(SPEC, ["a:1", "b:2"], version=4)
    assert PlacementTable.from_json(table.to_json()) == table


def test_validation_names_the_expert():
    table = PlacementTable.round_robin(SPEC, ["a:1", "b:2"])
    missing = PlacementTable(1, table.groups, {k: v for k, v in table.replicas.items() if k != (3, 5)})
    with pytest.raises(PlacementError, match="expert 5 of layer 3 has no replica"):
        missing.validate(SPEC)
    doubled = PlacementTable(1, table.groups, table.replicas | {(0, 1): (1, 1)})
    with pytest.raises(PlacementError, match="two replicas on one group"):
        doubled.validate(SPEC)
    outside = PlacementTable(1, table.groups, table.replicas | {(0, 1): (2,)})
    with pytest.raises(PlacementError, match="outside"):
        outside.validate(SPEC)
    with pytest.raises(PlacementError, match="at least one expert group"):
        PlacementTable.round_robin(SPEC, [])
