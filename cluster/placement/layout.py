"""What the planner reads and returns: a Placement (slots and shares [L, G, S]), its rules
(validate, PlacementError), the planner's knobs (PlannerConfig), and the array helpers every
step of the planner shares. The algorithm is described in planner.py.

L = MoE layers, E = experts per layer, G = groups, S = slots per layer per group.
Code outside cluster.placement uses Placement, PlannerConfig and PlacementError. membership,
layer_imbalance and to_slots are the package's internal API (the planner's modules share them,
hence no leading underscore), not for outside use.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class PlacementError(ValueError):
    """A placement that breaks a rule; the message names the layer, expert and group."""


@dataclass(frozen=True)
class PlannerConfig:
    target_imbalance: float = 1.05  # stop adding replicas once a layer's max/mean group load is this or below
    min_gain: float = 0.05  # with current: weight loads must lower imbalance() by this (hysteresis)
    reshuffle_gain: float = 0.02  # a reshuffle reloads most of a layer: only for this much lower max/mean
    share_iterations: int = 60  # share updates per solve (early exit when converged); 200 gains < 0.3%
    share_step: float = 1.0  # update exponent: at 60 steps 1.0 ends within 0.2% of the LP optimum, 0.5 within 0.8%
    grow_rounds: int = 8  # estimated adds, then an exact share solve, per round; Zipf uses 2-3
    shrink_rounds: int = 40  # each round tries a batch of drops per layer, halved on failure

    def __post_init__(self):
        for name, low, high in (("target_imbalance", 1.0, None), ("min_gain", 0.0, None),
                                ("reshuffle_gain", 0.0, None), ("share_step", 1e-3, 1.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) \
                    or v < low or (high is not None and v > high):
                raise ValueError(f"PlannerConfig.{name} must be a number in [{low}, {high or 'inf'}], got {v!r}")
        for name in ("share_iterations", "grow_rounds", "shrink_rounds"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"PlannerConfig.{name} must be an int >= 0, got {v!r}")


@dataclass(frozen=True)
class Placement:
    slots: np.ndarray  # [L, G, S] int64 expert id, -1 = empty slot
    shares: np.ndarray  # [L, G, S] float64, 0 for empty slots; one expert's shares in a layer sum to 1
    weight_loads: int = 0  # replicas added relative to current (every filled slot when planned from scratch)
    expected_imbalance: float = float("nan")  # imbalance() under the loads it was planned for

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.slots.shape

    def group_loads(self, loads) -> np.ndarray:
        """[L, G] expected tokens per group per layer."""
        loads = np.asarray(loads, dtype=np.float64)
        held = self.slots >= 0
        w = loads[np.arange(self.slots.shape[0])[:, None, None], np.where(held, self.slots, 0)]
        return np.where(held, w * self.shares, 0.0).sum(axis=2)

    def layer_imbalance(self, loads) -> np.ndarray:
        """[L] max/mean group load per layer; 1.0 for a layer with no load."""
        return layer_imbalance(self.group_loads(loads))

    def imbalance(self, loads) -> float:
        """sum over layers of the busiest group's load / sum of the mean group load; 1.0 when idle."""
        gl = self.group_loads(loads)
        mean = gl.mean(axis=1).sum()
        return float(gl.max(axis=1).sum() / mean) if mean > 0 else 1.0

    def replica_counts(self, num_experts: int | None = None) -> np.ndarray:
        """[L, E] replicas per expert (E: the largest id held + 1 unless given)."""
        L, held = self.slots.shape[0], self.slots >= 0
        E = num_experts if num_experts is not None else (int(self.slots.max()) + 1 if held.any() else 0)
        keys = (np.arange(L)[:, None, None] * E + self.slots)[held & (self.slots < E)]
        return np.bincount(keys, minlength=L * E).reshape(L, E)

    def holders(self, layer: int, expert: int) -> list[int]:
        """Groups holding a replica of expert in layer (planner indices), ascending."""
        return np.nonzero((self.slots[layer] == expert).any(axis=1))[0].tolist()

    def sets(self) -> list[list[frozenset]]:
        """[L][G] the experts each group holds (slot order carries no meaning)."""
        return [[frozenset(int(e) for e in row if e >= 0) for row in layer] for layer in self.slots]

    def moves(self, other: "Placement") -> tuple[int, int]:
        """(replicas loaded, replicas dropped) going from other to self; groups match by index."""
        E = int(max(self.slots.max(initial=-1), other.slots.max(initial=-1))) + 1
        G = max(self.slots.shape[1], other.slots.shape[1])
        mine, theirs = membership(self.slots, E, G), membership(other.slots, E, G)
        return int((mine & ~theirs).sum()), int((theirs & ~mine).sum())

    def validate(self, num_experts: int) -> None:
        """Raise PlacementError naming layer, group and expert if any rule is broken."""
        slots, shares, E = self.slots, self.shares, num_experts
        if slots.ndim != 3 or shares.shape != slots.shape:
            raise PlacementError(f"slots and shares must both be [L, G, S], got {slots.shape} and {shares.shape}")
        for mask, what in (((slots < -1) | (slots >= E), f"an expert id outside [0, {E - 1}] (-1 = empty)"),
                           (~np.isfinite(shares) | (shares < 0), "a share that is negative or not finite"),
                           ((slots < 0) & (shares != 0), "an empty slot with a nonzero share")):
            if mask.any():
                l, g, s = np.argwhere(mask)[0]
                raise PlacementError(f"layer {l} group {g} slot {s} has {what}: expert {slots[l, g, s]}, "
                                     f"share {shares[l, g, s]}")
        ordered = np.sort(slots, axis=2)
        dup = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)
        if dup.any():
            l, g, s = np.argwhere(dup)[0]
            raise PlacementError(f"layer {l} group {g} holds two replicas of expert {ordered[l, g, s]}")
        held = slots >= 0
        keys = (np.arange(slots.shape[0])[:, None, None] * E + slots)[held]
        counts = np.bincount(keys, minlength=slots.shape[0] * E).reshape(-1, E)
        sums = np.bincount(keys, weights=shares[held], minlength=counts.size).reshape(-1, E)
        for mask, what in ((counts == 0, "has no replica"),
                           (np.abs(sums - 1.0) > 1e-9, "has shares that do not sum to 1")):
            if mask.any():
                l, e = np.argwhere(mask)[0]
                raise PlacementError(f"expert {e} of layer {l} {what}: groups {self.holders(l, e)}, "
                                     f"shares {shares[l][slots[l] == e].tolist()}")


def membership(slots: np.ndarray, E: int, G: int) -> np.ndarray:
    """[L, G, E] bool: whether group g holds expert e (groups past slots' own G hold nothing)."""
    L, Gs, _ = slots.shape
    out = np.zeros((L, max(G, Gs), max(E, 1)), dtype=bool)
    l, g, s = np.nonzero(slots >= 0)
    out[l, g, slots[l, g, s]] = True
    return out[:, :G, :E]


def layer_imbalance(group_loads: np.ndarray) -> np.ndarray:
    mean = group_loads.mean(axis=1)
    return np.where(mean > 0, group_loads.max(axis=1) / np.where(mean > 0, mean, 1.0), 1.0)


def to_slots(sets: list[list[set]], S: int) -> np.ndarray:
    slots = np.full((len(sets), len(sets[0]), S), -1, dtype=np.int64)
    for l, layer in enumerate(sets):
        for g, s in enumerate(layer):
            slots[l, g, :len(s)] = sorted(s)
    return slots
