"""The placement table: initial round-robin, validation, JSON round trip."""
from __future__ import annotations

import json

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


def test_form_bounds_versions_sizes_addresses_and_shares():
    """What a table read from Redis must be before a router dials anything in it."""
    from cluster.placement.table import MAX_GROUPS, MAX_VERSION

    table = PlacementTable.round_robin(SPEC, ["127.0.0.1:9000", "[::1]:9001"], version=MAX_VERSION)
    table.validate(SPEC)
    for version in (-1, MAX_VERSION + 1, 2**62, True, 1.0, "3"):
        with pytest.raises(PlacementError, match="version must be an int in"):
            PlacementTable(version, table.groups, table.replicas).check_form()
    for address in ("", "host", "host:0", "host:70000", "a b:1", "h:1\n", "h:1/x", "user@h:1", None, 9000):
        with pytest.raises(PlacementError, match="is not host:port"):
            PlacementTable(1, ("127.0.0.1:9000", address), table.replicas).check_form()
    slot = (SPEC.sparse_layers[0], 0)
    two = PlacementTable(1, table.groups, table.replicas | {slot: (0, 1)})
    for shares in ((float("nan"), 1.0), (float("inf"), -float("inf")), (1.5, -0.5), (0.5,), (True, False)):
        with pytest.raises(PlacementError, match="shares .* must be one finite non-negative number"):
            PlacementTable(1, two.groups, two.replicas, {slot: shares}).check_form()
    text = two.to_json().replace('"replicas": [', '"replicas": [[%d, 0, [0, 1], [NaN, 1.0]], ' % slot[0], 1)
    with pytest.raises(PlacementError, match="repeated"):  # the same row twice
        PlacementTable.from_json(text)
    nan = json.loads(two.to_json())
    nan["replicas"] = [r if (r[0], r[1]) != slot else [*r, [float("nan"), 1.0]] for r in nan["replicas"]]
    with pytest.raises(PlacementError, match="finite"):  # JSON's NaN literal parses: refused after
        PlacementTable.from_json(json.dumps(nan))
    with pytest.raises(PlacementError, match=f"at most {MAX_GROUPS} groups"):
        PlacementTable.from_json(json.dumps({"version": 1, "groups": ["h:1"] * (MAX_GROUPS + 1), "replicas": []}))
    with pytest.raises(PlacementError, match="not in the model"):
        PlacementTable(1, table.groups, table.replicas | {(SPEC.sparse_layers[0], SPEC.num_experts): (0,)}) \
            .validate(SPEC)
    for bad in ('[]', '{"version": 1, "groups": "h:1", "replicas": []}',
                '{"version": 1, "groups": [], "replicas": [5]}'):
        with pytest.raises(PlacementError):
            PlacementTable.from_json(bad)
