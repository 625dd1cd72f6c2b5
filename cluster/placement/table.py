"""The placement table: which expert groups hold a replica of each (layer, expert).

Routers read it to split tokens by group; the controller owns it and bumps `version`
on every change. It is plain data (JSON in Redis), so a router never needs to ask
the controller anything in the hot path.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from cluster.checkpoint.spec import ModelSpec


class PlacementError(ValueError):
    """A placement table that cannot serve the model; the message names the expert."""


@dataclass(frozen=True)
class PlacementTable:
    version: int
    groups: tuple[str, ...]  # group addresses "host:port"; a group's index is its id
    replicas: dict[tuple[int, int], tuple[int, ...]] = field(default_factory=dict)  # (layer, expert) -> group ids
    # (layer, expert) -> the fraction of its tokens each replica gets, aligned with replicas;
    # an expert missing here splits evenly. The planner sets uneven shares to balance groups.
    shares: dict[tuple[int, int], tuple[float, ...]] = field(default_factory=dict)

    def shares_of(self, slot: tuple[int, int]) -> tuple[float, ...]:
        groups = self.replicas[slot]
        return self.shares.get(slot) or tuple(1.0 / len(groups) for _ in groups)

    @classmethod
    def round_robin(cls, spec: ModelSpec, groups: list[str], version: int = 1) -> "PlacementTable":
        """Initial placement: expert e of every MoE layer on group e % G (each layer spread evenly)."""
        if not groups:
            raise PlacementError("a placement needs at least one expert group")
        replicas = {(l, e): (e % len(groups),) for l in spec.sparse_layers for e in range(spec.num_experts)}
        return cls(version, tuple(groups), replicas)

    def slots_of(self, group: int) -> list[tuple[int, int]]:
        """The (layer, expert) slots group `group` must hold, sorted."""
        return sorted(slot for slot, gs in self.replicas.items() if group in gs)

    def validate(self, spec: ModelSpec) -> None:
        for layer in spec.sparse_layers:
            for expert in range(spec.num_experts):
                gs = self.replicas.get((layer, expert), ())
                if not gs:
                    raise PlacementError(f"expert {expert} of layer {layer} has no replica")
                if len(set(gs)) != len(gs):
                    raise PlacementError(f"expert {expert} of layer {layer} has two replicas on one group: {gs}")
                if not all(0 <= g < len(self.groups) for g in gs):
                    raise PlacementError(f"expert {expert} of layer {layer} names a group outside [0, {len(self.groups) - 1}]")
                shares = self.shares_of((layer, expert))
                if len(shares) != len(gs) or min(shares) < 0 or abs(sum(shares) - 1.0) > 1e-6:
                    raise PlacementError(f"expert {expert} of layer {layer}: shares {list(shares)} must be one "
                                         f"non-negative number per replica ({len(gs)}) summing to 1")

    def to_placement(self, spec: ModelSpec, slots_per_group: int):
        """The planner's view (cluster/placement/layout.py): slots/shares [L, G, S] over spec.sparse_layers.
        S grows past slots_per_group when a group already holds more (the planner then trims)."""
        import numpy as np

        from cluster.placement.layout import Placement

        index = {layer: l for l, layer in enumerate(spec.sparse_layers)}
        held = [[[] for _ in self.groups] for _ in index]  # [L][G] -> [(expert, share)]
        for (layer, expert), groups in self.replicas.items():
            for g, share in zip(groups, self.shares_of((layer, expert))):
                held[index[layer]][g].append((expert, share))
        width = max([slots_per_group] + [len(h) for per_layer in held for h in per_layer])
        slots = np.full((len(index), len(self.groups), width), -1, dtype=np.int64)
        shares = np.zeros(slots.shape, dtype=np.float64)
        for l, per_layer in enumerate(held):
            for g, h in enumerate(per_layer):
                for s, (expert, share) in enumerate(sorted(h)):
                    slots[l, g, s], shares[l, g, s] = expert, share
        return Placement(slots=slots, shares=shares, weight_loads=0, expected_imbalance=float("nan"))

    @classmethod
    def from_placement(cls, placement, spec: ModelSpec, groups, version: int) -> "PlacementTable":
        """A table for placement (planner indices: layer l is spec.sparse_layers[l], group g is groups[g])."""
        replicas: dict[tuple[int, int], list[int]] = {}
        shares: dict[tuple[int, int], list[float]] = {}
        L, G, S = placement.slots.shape
        for l in range(L):
            for g in range(G):
                for s in range(S):
                    expert = int(placement.slots[l, g, s])
                    if expert >= 0:
                        key = (spec.sparse_layers[l], expert)
                        replicas.setdefault(key, []).append(g)
                        shares.setdefault(key, []).append(float(placement.shares[l, g, s]))
        for key, values in shares.items():  # exact sums: JSON round trips and validate() compare to 1
            total = sum(values)
            shares[key] = [v / total for v in values] if total > 0 else [1.0 / len(values)] * len(values)
        even = {k for k, v in shares.items() if len(v) == 1}
        table = cls(version, tuple(groups), {k: tuple(v) for k, v in replicas.items()},
                    {k: tuple(v) for k, v in shares.items() if k not in even})
        table.validate(spec)
        return table

    def to_json(self) -> str:
        # [layer, expert, [group ids]] for an even split, [layer, expert, [group ids], [shares]] otherwise
        rows = [[l, e, list(gs)] + ([list(self.shares[(l, e)])] if (l, e) in self.shares else [])
                for (l, e), gs in sorted(self.replicas.items())]
        return json.dumps({"version": self.version, "groups": list(self.groups), "replicas": rows})

    @classmethod
    def from_json(cls, text: str) -> "PlacementTable":
        d = json.loads(text)
        replicas, shares = {}, {}
        for row in d["replicas"]:
            l, e, gs = row[0], row[1], row[2]
            replicas[(l, e)] = tuple(gs)
            if len(row) > 3:
                shares[(l, e)] = tuple(float(s) for s in row[3])
        return cls(d["version"], tuple(d["groups"]), replicas, shares)


@dataclass(frozen=True)
class TableShape:
    """The model shape a placement table implies, for the planner (no checkpoint needed here)."""

    sparse_layers: tuple[int, ...]
    num_experts: int

    @classmethod
    def of(cls, table) -> "TableShape":
        return cls(tuple(sorted({l for l, _ in table.replicas})), 1 + max(e for _, e in table.replicas))
