"""The placement planner: which groups hold which experts, and how tokens split between replicas.

A pure function of numbers (numpy only; no Ray, Redis or torch), so it is tested alone
and replayed by `moectl simulate`.

    plan(loads [L, E], num_groups G, slots_per_group S, current=None) -> Placement
        slots  [L, G, S]  expert id held in each slot of each group, per MoE layer; -1 = empty
        shares [L, G, S]  fraction of that expert's tokens routers send to that replica

Group load of layer l: sum over the group's slots of loads[l, e] * share. A layer takes
as long as its busiest group, so balance is max/mean group load per layer; imbalance()
weighs layers by their load: sum_l max_g / sum_l mean_g (1.0 = perfectly balanced).

From scratch (current=None), per layer:
  1. replica counts: the EPLB rule, one more replica for the expert with the highest load
     per replica (never more than G), for a budget of R replicas;
  2. packing: replicas heaviest first onto the least-loaded group with a free slot that
     does not hold that expert yet (never two replicas of one expert on one group);
  3. shares: uneven shares turn a replicated expert into a bridge that can carry any split
     between its groups; a multiplicative update moves share from overloaded groups to
     light ones, keeping the best split seen, so shares never make a layer worse than
     the even split the packing assumed.
  R grows from E (one replica each) through a few candidates to G*S (every slot); the
  smallest R whose layer reaches target_imbalance wins, else the best. A replica past
  the target only costs a weight load and memory.

With current (migration-aware), per layer:
  observe  current's expert sets adapted to G and S (groups past G are being removed:
           their experts are placed again, each a weight load), shares refreshed for the
           new loads;
  decide   balanced (<= target): drop replicas that are no longer needed (free: no
           weight load), lightest first, while the layer stays within target;
           imbalanced: add one replica at a time, of the heaviest expert on the busiest
           group, onto the lightest group with room that lacks it, until within target;
  apply    only if the whole plan lowers imbalance() by min_gain or more; otherwise
           current's sets stand (with refreshed shares) and nothing moves.
  So unchanged loads move nothing, and a small drift moves little or nothing.

weight_loads counts replicas a plan adds to a group that did not hold them in current
(with current=None: every filled slot). Dropped replicas cost no load and are not counted.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np


class PlacementError(ValueError):
    """A placement that breaks a rule; the message names the layer, expert and group."""


@dataclass(frozen=True)
class PlannerConfig:
    target_imbalance: float = 1.05  # stop adding replicas once a layer's max/mean group load is this or below
    min_gain: float = 0.05  # with current: keep it unless imbalance() falls by at least this
    share_iterations: int = 60  # multiplicative share updates per refinement; the best split seen is kept
    share_step: float = 0.7  # exponent of the update: smaller is steadier, larger converges faster

    def __post_init__(self):
        if not isinstance(self.target_imbalance, (int, float)) or self.target_imbalance < 1.0:
            raise ValueError(f"target_imbalance must be a number >= 1.0, got {self.target_imbalance!r}")
        if not isinstance(self.min_gain, (int, float)) or self.min_gain < 0:
            raise ValueError(f"min_gain must be a number >= 0, got {self.min_gain!r}")
        if not isinstance(self.share_iterations, int) or self.share_iterations < 0:
            raise ValueError(f"share_iterations must be an int >= 0, got {self.share_iterations!r}")
        if not isinstance(self.share_step, (int, float)) or not 0 < self.share_step <= 1:
            raise ValueError(f"share_step must be in (0, 1], got {self.share_step!r}")


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
        L = self.slots.shape[0]
        held = self.slots >= 0
        per_slot = loads[np.arange(L)[:, None, None], np.where(held, self.slots, 0)] * held
        return (per_slot * self.shares).sum(axis=2)

    def layer_imbalance(self, loads) -> np.ndarray:
        """[L] max/mean group load per layer; 1.0 for a layer with no load."""
        return _layer_imbalance(self.group_loads(loads))

    def imbalance(self, loads) -> float:
        """sum over layers of the busiest group's load / sum of the mean group load; 1.0 when idle."""
        gl = self.group_loads(loads)
        mean = gl.mean(axis=1).sum()
        return float(gl.max(axis=1).sum() / mean) if mean > 0 else 1.0

    def replica_counts(self, num_experts: int | None = None) -> np.ndarray:
        """[L, E] replicas per expert."""
        L = self.slots.shape[0]
        E = num_experts if num_experts is not None else int(self.slots.max()) + 1
        counts = np.zeros((L, max(E, 0)), dtype=np.int64)
        for l in range(L):
            ids = self.slots[l][self.slots[l] >= 0]
            counts[l] = np.bincount(ids, minlength=E)[:E]
        return counts

    def holders(self, layer: int, expert: int) -> list[int]:
        """Groups holding a replica of expert in layer (planner indices)."""
        return sorted(np.nonzero((self.slots[layer] == expert).any(axis=1))[0].tolist())

    def sets(self) -> list[list[frozenset]]:
        """[L][G] the experts each group holds."""
        return [[frozenset(int(e) for e in row if e >= 0) for row in layer] for layer in self.slots]

    def moves(self, other: "Placement") -> tuple[int, int]:
        """(replicas loaded, replicas dropped) going from other to self."""
        mine, theirs = self.sets(), other.sets()
        loaded = dropped = 0
        for l in range(len(mine)):
            for g in range(max(len(mine[l]), len(theirs[l]) if l < len(theirs) else 0)):
                a = mine[l][g] if g < len(mine[l]) else frozenset()
                b = theirs[l][g] if l < len(theirs) and g < len(theirs[l]) else frozenset()
                loaded += len(a - b)
                dropped += len(b - a)
        return loaded, dropped

    def validate(self, num_experts: int) -> None:
        L, G, S = self.slots.shape
        for l in range(L):
            for g in range(G):
                ids = self.slots[l, g][self.slots[l, g] >= 0]
                if len(set(ids.tolist())) != len(ids):
                    raise PlacementError(f"layer {l} group {g} holds two replicas of one expert: {sorted(ids)}")
                if (ids >= num_experts).any():
                    raise PlacementError(f"layer {l} group {g} holds an expert outside [0, {num_experts - 1}]")
            for e in range(num_experts):
                mask = self.slots[l] == e
                if not mask.any():
                    raise PlacementError(f"expert {e} of layer {l} has no replica")
                total = self.shares[l][mask].sum()
                if abs(total - 1.0) > 1e-6 or (self.shares[l][mask] < 0).any():
                    raise PlacementError(f"expert {e} of layer {l}: shares {self.shares[l][mask].tolist()} "
                                         "must be >= 0 and sum to 1")


def round_robin(num_layers: int, num_experts: int, num_groups: int, slots_per_group: int) -> Placement:
    """Expert e of every layer on group e % G, one replica each: the cluster's starting layout."""
    _check_shape(num_experts, num_groups, slots_per_group)
    slots = np.full((num_layers, num_groups, slots_per_group), -1, dtype=np.int64)
    for e in range(num_experts):
        slots[:, e % num_groups, e // num_groups] = e
    shares = (slots >= 0).astype(np.float64)
    return Placement(slots, shares, int((slots >= 0).sum()), 1.0)


def plan(loads, num_groups: int, slots_per_group: int, current: Placement | None = None,
         config: PlannerConfig = PlannerConfig()) -> Placement:
    loads = _check_loads(loads)
    L, E = loads.shape
    _check_shape(E, num_groups, slots_per_group)
    if current is None:
        return _from_scratch(loads, num_groups, slots_per_group, config)
    if current.slots.shape[0] != L:
        raise ValueError(f"current has {current.slots.shape[0]} layers, loads has {L}")
    return _from_current(loads, num_groups, slots_per_group, current, config)


# ---- from scratch -------------------------------------------------------------------------


def replica_counts_greedy(w: np.ndarray, budget: int, num_groups: int) -> np.ndarray:
    """The EPLB rule: one replica each, then one more for the expert with the highest load per
    replica (ties: lowest id; never more than G) until `budget` replicas."""
    E = len(w)
    r = np.ones(E, dtype=np.int64)
    heap = [(-w[e], e) for e in range(E)]
    heapq.heapify(heap)
    extra = budget - E
    while extra > 0 and heap:
        _, e = heapq.heappop(heap)
        if r[e] >= num_groups:
            continue
        r[e] += 1
        extra -= 1
        if r[e] < num_groups:
            heapq.heappush(heap, (-w[e] / r[e], e))
    return r


def pack(loads: np.ndarray, counts: np.ndarray, num_groups: int, slots_per_group: int) -> np.ndarray:
    """Greedy packing of every layer at once: replicas (load w_e / r_e) heaviest first, ties by
    expert id, onto the least-loaded group (ties: lowest id) with a free slot that lacks the
    expert. Returns slots [L, G, S]. A replica that finds no such group is left out."""
    L, E = loads.shape
    G, S = num_groups, slots_per_group
    per_replica = loads / np.maximum(counts, 1)
    # items of each layer, sorted: heaviest first, then expert id (a stable sort keeps id order)
    R = int(counts.sum(axis=1).max())
    item_e = np.full((L, R), -1, dtype=np.int64)
    item_w = np.zeros((L, R))
    for l in range(L):
        order = np.argsort(-per_replica[l], kind="stable")
        experts = np.repeat(order, counts[l][order])
        item_e[l, :len(experts)] = experts
        item_w[l, :len(experts)] = per_replica[l][experts]
    slots = np.full((L, G, S), -1, dtype=np.int64)
    fill = np.zeros((L, G), dtype=np.int64)
    group_load = np.zeros((L, G))
    holds = np.zeros((L, G, E), dtype=bool)
    rows = np.arange(L)
    for i in range(R):
        e = item_e[:, i]
        valid = e >= 0
        ec = np.where(valid, e, 0)
        candidate = (fill < S) & ~holds[rows, :, ec]
        key = np.where(candidate, group_load, np.inf)
        g = np.argmin(key, axis=1)
        ok = valid & candidate[rows, g]
        l_ok, g_ok, e_ok = rows[ok], g[ok], ec[ok]
        slots[l_ok, g_ok, fill[l_ok, g_ok]] = e_ok
        fill[l_ok, g_ok] += 1
        group_load[l_ok, g_ok] += item_w[ok, i]
        holds[l_ok, g_ok, e_ok] = True
    return slots


def _from_scratch(loads, G, S, config) -> Placement:
    L, E = loads.shape
    capacity = G * S
    # candidate budgets: the replicas a layer "needs" (load per replica <= mean group load) and
    # a few around it, up to every slot; each layer keeps the smallest that reaches the target
    best_slots = np.full((L, G, S), -1, dtype=np.int64)
    best_shares = np.zeros((L, G, S))
    best_imb = np.full(L, np.inf)
    done = np.zeros(L, dtype=bool)
    mean = loads.sum(axis=1) / G
    need = np.where(mean > 0, np.ceil(loads / np.maximum(mean, 1e-300)[:, None]).sum(axis=1), E).astype(np.int64)
    fractions = [None, 0.5, 1.0, 1.5, 2.0, "all"]
    for f in fractions:
        if done.all():
            break
        if f is None:
            budget = np.full(L, E)
        elif f == "all":
            budget = np.full(L, capacity)
        else:
            budget = np.clip(E + np.ceil(f * (need - E)).astype(np.int64), E, capacity)
        counts = np.stack([replica_counts_greedy(loads[l], int(budget[l]), G) for l in range(L)])
        slots = pack(loads, counts, G, S)
        shares = refine_shares(slots, loads, config)
        imb = _layer_imbalance(_group_loads(slots, shares, loads))
        better = ~done & (imb < best_imb - 1e-12)
        best_slots[better], best_shares[better], best_imb[better] = slots[better], shares[better], imb[better]
        done |= best_imb <= config.target_imbalance
    out = Placement(best_slots, best_shares)
    return Placement(best_slots, best_shares, int((best_slots >= 0).sum()), out.imbalance(loads))


# ---- shares -------------------------------------------------------------------------------


def even_shares(slots: np.ndarray) -> np.ndarray:
    L = slots.shape[0]
    held = slots >= 0
    E = int(slots.max()) + 1 if held.any() else 1
    counts = np.zeros((L, E))
    for l in range(L):
        counts[l] = np.bincount(slots[l][held[l]], minlength=E)
    r = counts[np.arange(L)[:, None, None], np.where(held, slots, 0)]
    return np.where(held, 1.0 / np.maximum(r, 1), 0.0)


def refine_shares(slots: np.ndarray, loads: np.ndarray, config: PlannerConfig = PlannerConfig()) -> np.ndarray:
    """Shares that lower each layer's max group load: multiplicative updates (a group above the
    mean gives share away, one below takes it), renormalised per expert; per layer the best
    split seen is kept, starting from the even split, so a layer never ends worse than even."""
    L, G, S = slots.shape
    E = loads.shape[1]
    held = slots >= 0
    ids = np.where(held, slots, 0)
    lidx = np.broadcast_to(np.arange(L)[:, None, None], slots.shape)
    w = loads[lidx, ids] * held  # [L, G, S] load of the expert in each slot
    flat = (lidx * E + ids)[held]  # (layer, expert) key of each held slot
    share = even_shares(slots)
    best, best_max = share.copy(), (w * share).sum(axis=2).max(axis=1)
    mean = loads.sum(axis=1) / G
    for _ in range(config.share_iterations):
        gl = (w * share).sum(axis=2)  # [L, G]
        with np.errstate(over="ignore", divide="ignore"):  # an idle group: factor clipped below
            factor = (mean[:, None] / np.maximum(gl, 1e-300)) ** config.share_step
        new = share * np.minimum(factor, 1e6)[:, :, None]
        totals = np.bincount(flat, weights=new[held], minlength=L * E)
        share = np.zeros_like(new)
        share[held] = new[held] / np.maximum(totals[flat], 1e-300)
        peak = (w * share).sum(axis=2).max(axis=1)
        better = peak < best_max - 1e-12
        best[better], best_max[better] = share[better], peak[better]
    return best


def _group_loads(slots, shares, loads) -> np.ndarray:
    return Placement(slots, shares).group_loads(loads)


def _layer_imbalance(group_loads: np.ndarray) -> np.ndarray:
    mean = group_loads.mean(axis=1)
    return np.where(mean > 0, group_loads.max(axis=1) / np.where(mean > 0, mean, 1.0), 1.0)


# ---- from current -------------------------------------------------------------------------


def _from_current(loads, G, S, current: Placement, config: PlannerConfig) -> Placement:
    L, E = loads.shape
    start = [[set() for _ in range(G)] for _ in range(L)]  # current's sets on the G groups kept
    for l in range(L):
        for g in range(min(G, current.slots.shape[1])):
            start[l][g] = {int(e) for e in current.slots[l, g] if 0 <= e < E}
    forced = 0  # weight loads that must happen whatever the gain: experts left without a replica
    for l in range(L):
        forced += _repair(start[l], loads[l], S, E)
    kept = _to_slots(start, S)
    kept_shares = refine_shares(kept, loads, config)
    kept_imb = Placement(kept, kept_shares).imbalance(loads)

    sets = [[set(s) for s in layer] for layer in start]
    added = 0
    for l in range(L):
        added += _improve_layer(sets[l], loads[l], S, config)
    new = _to_slots(sets, S)
    new_shares = refine_shares(new, loads, config)
    new_imb = Placement(new, new_shares).imbalance(loads)
    dropped_only = added == 0
    if not dropped_only and kept_imb - new_imb < config.min_gain:
        # not worth the weight loads: keep current's experts (but still drop what is not needed)
        sets = [[set(s) for s in layer] for layer in start]
        for l in range(L):
            _drop_unneeded(sets[l], loads[l], config)
        new = _to_slots(sets, S)
        new_shares = refine_shares(new, loads, config)
        new_imb = Placement(new, new_shares).imbalance(loads)
        added = 0
    return Placement(new, new_shares, forced + added, new_imb)


def _repair(groups: list[set], w: np.ndarray, S: int, E: int) -> int:
    """Fit current's sets into S slots and give every expert a replica; returns weight loads."""
    loads = 0
    counts = np.zeros(E, dtype=np.int64)
    for s in groups:
        for e in s:
            counts[e] += 1
    for s in groups:  # S shrank: drop the lightest replicas that have another copy first
        while len(s) > S:
            spare = [e for e in s if counts[e] > 1] or list(s)
            e = min(spare, key=lambda e: (w[e] / counts[e], e))
            s.discard(e)
            counts[e] -= 1
    for e in np.argsort(-w, kind="stable"):  # orphans (their group was removed): heaviest first
        if counts[e] == 0:
            g = _lightest(groups, w, e, S)
            if g is None:  # full: give up an extra replica of another expert (E <= G*S, so one exists)
                g, x = min(((g, x) for g, s in enumerate(groups) for x in s if counts[x] > 1),
                           key=lambda gx: (w[gx[1]] / counts[gx[1]], gx))
                groups[g].discard(x)
                counts[x] -= 1
            groups[g].add(int(e))
            counts[e] += 1
            loads += 1
    return loads


def _layer_loads(groups: list[set], w: np.ndarray, config: PlannerConfig):
    """(group loads [G], shares per (group, expert)) of one layer with refined shares."""
    S = max(1, max(len(s) for s in groups))
    slots = _to_slots([groups], S)
    shares = refine_shares(slots, w[None, :], config)
    return _group_loads(slots, shares, w[None, :])[0], slots[0], shares[0]


def _improve_layer(groups: list[set], w: np.ndarray, S: int, config: PlannerConfig) -> int:
    """Add replicas (heaviest expert on the busiest group -> lightest group with room) until the
    layer is within target; then drop the ones no longer needed. Returns replicas added."""
    added = 0
    for _ in range(len(groups) * S):
        gl, slots, shares = _layer_loads(groups, w, config)
        if gl.mean() <= 0 or gl.max() / gl.mean() <= config.target_imbalance:
            break
        h = int(np.argmax(gl))
        carried = sorted(((w[e] * shares[h][slots[h] == e].sum(), e) for e in groups[h]), reverse=True)
        moved = False
        for _, e in carried:
            g = _lightest(groups, w, e, S, gl)
            if g is None:  # every group that lacks e is full: free a slot on the lightest one
                g, cost = _make_room(groups, w, e, S, gl, h)
                added += cost
            if g is not None:
                groups[g].add(e)
                added += 1
                moved = True
                break
        if not moved:
            break
    _drop_unneeded(groups, w, config)
    return added


def _drop_unneeded(groups: list[set], w: np.ndarray, config: PlannerConfig) -> None:
    """Drop extra replicas of experts that are not hot (load at most the layer's mean expert
    load), the least-used first, while the layer stays within target; with no load, down to
    one replica per expert. Dropping costs no weight load. Hot experts keep their replicas,
    so a plan made for these loads is stable under them, and replication (not migration)
    is how hot experts spread."""
    while True:
        counts = {}
        for s in groups:
            for e in s:
                counts[e] = counts.get(e, 0) + 1
        gl, slots, shares = _layer_loads(groups, w, config)
        limit = max(config.target_imbalance, gl.max() / gl.mean()) if gl.mean() > 0 else np.inf
        cold = w.mean()
        candidates = sorted((w[e] * shares[g][slots[g] == e].sum(), g, e)
                            for g, s in enumerate(groups) for e in s if counts[e] > 1 and w[e] <= cold)
        for _, g, e in candidates:
            groups[g].discard(e)
            trial, _, _ = _layer_loads(groups, w, config)
            if trial.mean() <= 0 or trial.max() / trial.mean() <= limit + 1e-9:
                break  # dropped; look again
            groups[g].add(e)
        else:
            return


def _make_room(groups: list[set], w: np.ndarray, e: int, S: int, gl: np.ndarray, busiest: int):
    """Free a slot for expert e on the lightest group that lacks it: drop an extra replica of a
    cold expert there (free), else move its coldest expert to another group with room (one
    weight load). Returns (group, weight loads spent), or (None, 0) when nothing can move."""
    counts: dict[int, int] = {}
    for s in groups:
        for x in s:
            counts[x] = counts.get(x, 0) + 1
    for g in sorted((g for g, s in enumerate(groups) if e not in s and g != busiest), key=lambda g: (gl[g], g)):
        spare = [x for x in groups[g] if counts[x] > 1 and w[x] < w[e]]
        if spare:
            groups[g].discard(min(spare, key=lambda x: (w[x], x)))
            return g, 0
        for x in sorted(groups[g], key=lambda x: (w[x], x)):
            if w[x] >= w[e]:
                break
            to = _lightest(groups, w, x, S, gl)
            if to is not None and to != busiest:
                groups[g].discard(x)
                groups[to].add(x)
                return g, 1
    return None, 0


def _lightest(groups: list[set], w: np.ndarray, e: int, S: int, gl: np.ndarray | None = None) -> int | None:
    """The least-loaded group with a free slot that lacks expert e (ties: lowest id)."""
    if gl is None:
        gl = np.array([sum(w[x] for x in s) for s in groups])
    options = [g for g, s in enumerate(groups) if len(s) < S and e not in s]
    return min(options, key=lambda g: (gl[g], g)) if options else None


def _to_slots(sets: list[list[set]], S: int) -> np.ndarray:
    L, G = len(sets), len(sets[0])
    slots = np.full((L, G, S), -1, dtype=np.int64)
    for l in range(L):
        for g in range(G):
            ids = sorted(sets[l][g])
            slots[l, g, :len(ids)] = ids
    return slots


# ---- input checks -------------------------------------------------------------------------


def _check_loads(loads) -> np.ndarray:
    try:
        loads = np.asarray(loads, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"loads must be a [layers, experts] array of numbers: {e}") from None
    if loads.ndim != 2 or loads.shape[1] < 1:
        raise ValueError(f"loads must be 2-D [layers, experts], got shape {list(loads.shape)}")
    if not np.isfinite(loads).all() or (loads < 0).any():
        raise ValueError("loads must be finite and >= 0 (expected tokens per expert)")
    return loads


def _check_shape(num_experts: int, num_groups: int, slots_per_group: int) -> None:
    for name, v in (("num_groups", num_groups), ("slots_per_group", slots_per_group)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if num_experts > num_groups * slots_per_group:
        raise ValueError(f"{num_experts} experts do not fit in num_groups * slots_per_group = "
                         f"{num_groups} * {slots_per_group} slots per layer")
