"""The placement planner: which groups hold which experts, and how tokens split between replicas.

A pure function of numbers (numpy only: no Ray, Redis or torch), tested alone and replayed by
`moectl plan`. L = MoE layers, E = experts per layer, G = groups, S = slots per layer per group.

    plan(loads [L, E], G, S, current=None, config) -> Placement
        slots  [L, G, S]  expert id in each slot, -1 = empty (a group holds <= S experts of a layer)
        shares [L, G, S]  fraction of that expert's tokens routed to that replica; 1 per expert

Imbalance. Group load of layer l = sum over the group's slots of loads[l, e] * share. A layer
takes as long as its busiest group, so its balance is max_g / mean_g (1.0 when idle), and
imbalance() weighs layers by load: sum_l max_g / sum_l mean_g.

Weight loads. A replica on a group that did not hold that expert in current is one weight load
(its weights copied there); with current=None every filled slot is one. Dropping a replica is
free and not counted (moves() reports loads and drops).

From scratch, per layer (vectorised over layers):
  1. counts    the EPLB rule: one replica each, then one more for the expert with the highest
               load per replica (at most G), up to a budget R;
  2. packing   replicas heaviest first onto the least-loaded group with a free slot that lacks
               the expert (the EPLB baseline, tie-breaks included);
  3. shares    the LP "min makespan, splittable jobs restricted to their groups": an expert on
               two groups is a bridge that can carry any split, so uneven shares reach balance
               even ones cannot. Multiplicative updates (a group above the mean gives share
               away) from the even split, keeping the best seen, so never worse than the
               baseline; within 0.3% of the exact LP optimum (checked offline by max-flow).
  R tries E, then E + f * (need - E) for f in BUDGET_STEPS, then every slot (need = sum_e
  ceil(w_e / mean group load)). The smallest R reaching target_imbalance wins, else the best:
  past the target a replica only costs a weight load and memory. A layer still short (few
  slots per group) gets the grow step below, kept only if no worse than EPLB at its count.

With current (migration-aware):
  observe  current's expert sets on the G groups asked for: groups >= G are being removed, so
           their replicas go and an expert left without one is placed again (heaviest first,
           lightest group; a weight load each); new groups start empty; a group over S sheds
           its least-used extra replicas. Shares are re-solved for the new loads, and replicas
           above their expert's keep count (its from-scratch count, or the count that keeps
           each replica within a mean group load if more) drop while no layer gets worse.
  decide   grow: each layer above target adds replicas one at a time, an expert of the busiest
           group onto a group below it, picking the move that takes the most load off the top
           per weight load: a free slot (half price if that group held the expert before),
           else room made by dropping an extra replica (1) or moving a light expert (2). Adds
           are planned on an estimate (groups bridged by balanced shares form one level, see
           grow._Levels), then shares are solved exactly; a few rounds.
           reshuffle: a layer grow leaves above target takes a packing seeded with current
           (replicas go back where they were when that costs little balance) or the
           from-scratch layer relabelled to keep the most, if that gains reshuffle_gain.
           shrink: replicas the adds made redundant drop, as in observe.
  apply    weight loads must lower imbalance() by min_gain, else observe's sets stand
           (current's sets less free drops, shares refreshed); drops alone always apply.
  So loads a plan was made for move nothing, and a 10% drift moves ~3% of the filled slots
  (58 x 256 experts on 64 x 5 slots).

Where each part lives in cluster/placement/ (plan() and round_robin() are here):
  layout.py       Placement, PlannerConfig, PlacementError; array helpers all steps share
  scratch.py      from scratch: counts, packing, budgets, the grow step for short layers
  shares.py       the share solve
  grow.py         grow, on the _Levels estimate (both paths)
  incremental.py  with current: observe, decide (reshuffle, shrink; grow from grow.py), apply
"""
from __future__ import annotations

import numpy as np

from cluster.placement.incremental import from_current
from cluster.placement.layout import Placement, PlannerConfig
from cluster.placement.scratch import from_scratch


def round_robin(num_layers: int, num_experts: int, num_groups: int, slots_per_group: int) -> Placement:
    """Expert e of every layer on group e % G, one replica each: the cluster's starting layout.
    expected_imbalance is that of equal loads (the only loads it is planned for)."""
    for name, v in (("num_layers", num_layers), ("num_experts", num_experts)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    _check_shape(num_experts, num_groups, slots_per_group)
    slots = np.full((num_layers, num_groups, slots_per_group), -1, dtype=np.int64)
    for e in range(num_experts):
        slots[:, e % num_groups, e // num_groups] = e
    shares = (slots >= 0).astype(np.float64)
    equal = Placement(slots, shares).imbalance(np.ones((num_layers, num_experts)))
    return Placement(slots, shares, int((slots >= 0).sum()), equal)


def plan(loads, num_groups: int, slots_per_group: int, current: Placement | None = None,
         config: PlannerConfig = PlannerConfig()) -> Placement:
    """A placement of every expert of loads [L, E] on num_groups groups x slots_per_group slots
    per layer; with current, one that moves few weights from it (see the module docstring)."""
    loads = _check_loads(loads)
    L, E = loads.shape
    _check_shape(E, num_groups, slots_per_group)
    if not isinstance(config, PlannerConfig):
        raise ValueError(f"config must be a PlannerConfig, got {type(config).__name__}")
    if current is None:
        return from_scratch(loads, num_groups, slots_per_group, config)
    if not isinstance(current, Placement) or current.slots.ndim != 3 or current.slots.shape[0] != L:
        raise ValueError(f"current must be a Placement with {L} layers like loads, "
                         f"got {getattr(getattr(current, 'slots', None), 'shape', type(current).__name__)}")
    return from_current(loads, num_groups, slots_per_group, current, config)


def _check_loads(loads) -> np.ndarray:
    try:
        loads = np.asarray(loads, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"loads must be a [layers, experts] array of numbers: {e}") from None
    if loads.ndim != 2 or loads.shape[0] < 1 or loads.shape[1] < 1:
        raise ValueError(f"loads must be 2-D [layers >= 1, experts >= 1], got shape {list(loads.shape)}")
    bad = ~np.isfinite(loads) | (loads < 0)
    if bad.any():
        l, e = np.argwhere(bad)[0]
        raise ValueError(f"loads must be finite and >= 0 (expected tokens per expert), "
                         f"got {loads[l, e]} at layer {l} expert {e}")
    return loads


def _check_shape(num_experts: int, num_groups: int, slots_per_group: int) -> None:
    for name, v in (("num_groups", num_groups), ("slots_per_group", slots_per_group)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if num_experts > num_groups * slots_per_group:
        raise ValueError(f"{num_experts} experts per layer do not fit: num_groups * slots_per_group = "
                         f"{num_groups} * {slots_per_group} must be >= {num_experts}")
