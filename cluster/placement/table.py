"""The placement table: which expert groups hold a replica of each (layer, expert).

Routers read it to split tokens by group; the controller owns it and bumps `version`
on every change. It is plain data (JSON in Redis), so a router never needs to ask
the controller anything in the hot path.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from cluster.checkpoint.spec import ModelSpec
from cluster.config import is_int

# Bounds on what a table may hold, checked on every table read (check_form): routers dial its
# addresses and size arrays by it, so one written by someone else must not reach further than this.
MAX_VERSION = 2**53  # ints above this are not exact in JSON readers; a forged 2**62 would block every publish
MAX_GROUPS = 4096
MAX_SLOTS = 2**20  # (layer, expert) rows: DeepSeek-V3 has 14,848
# host:port with a DNS name, an IPv4 address or a bracketed IPv6 address
_ADDRESS = re.compile(r"(?:\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?):([0-9]{1,5})")


class PlacementError(ValueError):
    """A placement table that cannot serve the model; the message names the expert."""


def address_problem(address) -> str | None:
    """Why address is not a dialable "host:port" (port in [1, 65535]); None when it is one."""
    match = _ADDRESS.fullmatch(address) if isinstance(address, str) else None
    if match is None or not 1 <= int(match.group(1)) <= 65535:
        return f"{address!r:.80} is not host:port with a port in [1, 65535]"
    return None


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
        """check_form(), and exactly one row per (layer, expert) of the model."""
        self.check_form()
        for layer in spec.sparse_layers:
            for expert in range(spec.num_experts):
                if not self.replicas.get((layer, expert)):
                    raise PlacementError(f"expert {expert} of layer {layer} has no replica")
        extra = len(self.replicas) - len(spec.sparse_layers) * spec.num_experts
        if extra > 0:
            layer, expert = next(k for k in self.replicas if not (spec.is_sparse(k[0]) and k[1] < spec.num_experts))
            raise PlacementError(f"expert {expert} of layer {layer} is not in the model ({extra} such row(s))")

    def check_form(self) -> None:
        """What any table must be, whatever the model: a version in [0, MAX_VERSION], at most MAX_GROUPS
        groups at host:port addresses and MAX_SLOTS rows, replicas on distinct groups that exist, and
        finite non-negative shares summing to 1. Raises PlacementError naming the field."""
        if not is_int(self.version) or not 0 <= self.version <= MAX_VERSION:
            raise PlacementError(f"version must be an int in [0, 2**53], got {self.version!r:.40}")
        if len(self.groups) > MAX_GROUPS or len(self.replicas) > MAX_SLOTS:
            raise PlacementError(f"{len(self.groups)} groups and {len(self.replicas)} rows: at most {MAX_GROUPS} "
                                 f"groups and {MAX_SLOTS} rows")
        for g, address in enumerate(self.groups):
            if (problem := address_problem(address)) is not None:
                raise PlacementError(f"group {g}: address {problem}")
        if not set(self.shares) <= set(self.replicas):
            raise PlacementError("shares name a (layer, expert) that has no replicas")
        for (layer, expert), gs in self.replicas.items():
            if not (is_int(layer) and is_int(expert) and layer >= 0 and expert >= 0):
                raise PlacementError(f"(layer, expert) ({layer!r:.20}, {expert!r:.20}) must be two ints >= 0")
            if not gs or not all(is_int(g) and 0 <= g < len(self.groups) for g in gs):
                raise PlacementError(f"expert {expert} of layer {layer} names no group or a group outside "
                                     f"[0, {len(self.groups) - 1}]")
            if len(set(gs)) != len(gs):
                raise PlacementError(f"expert {expert} of layer {layer} has two replicas on one group: {gs}")
            shares = self.shares_of((layer, expert))
            if len(shares) != len(gs) or not all(isinstance(s, (int, float)) and not isinstance(s, bool)
                                                 and math.isfinite(s) and s >= 0 for s in shares) \
                    or abs(sum(shares) - 1.0) > 1e-6:
                raise PlacementError(f"expert {expert} of layer {layer}: shares {list(shares)[:8]} must be one finite "
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
        """Parse to_json()'s form and check_form() it; PlacementError (a ValueError) names what is wrong."""
        d = json.loads(text)
        if not (isinstance(d, dict) and isinstance(d.get("groups"), list) and isinstance(d.get("replicas"), list)):
            raise PlacementError("a placement table is a JSON object with lists 'groups' and 'replicas'")
        if len(d["groups"]) > MAX_GROUPS or len(d["replicas"]) > MAX_SLOTS:  # before building anything of that size
            raise PlacementError(f"at most {MAX_GROUPS} groups and {MAX_SLOTS} rows")
        replicas, shares = {}, {}
        for row in d["replicas"]:
            if not (isinstance(row, list) and len(row) in (3, 4) and all(isinstance(r, list) for r in row[2:])):
                raise PlacementError(f"a row must be [layer, expert, [group ids]] or with [shares] after, "
                                     f"got {row!r:.80}")
            key = (row[0], row[1])
            if key in replicas or not all(map(is_int, key)):
                raise PlacementError(f"row ({row[0]!r:.20}, {row[1]!r:.20}) is repeated or not two ints")
            replicas[key] = tuple(row[2])
            if len(row) > 3:
                shares[key] = tuple(row[3])
        table = cls(d.get("version"), tuple(d["groups"]), replicas, shares)
        table.check_form()
        return table


@dataclass(frozen=True)
class TableShape:
    """The model shape a placement table implies, for the planner (no checkpoint needed here)."""

    sparse_layers: tuple[int, ...]
    num_experts: int

    @classmethod
    def of(cls, table) -> "TableShape":
        return cls(tuple(sorted({l for l, _ in table.replicas})), 1 + max(e for _, e in table.replicas))
