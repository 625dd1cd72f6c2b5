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
           _Levels), then shares are solved exactly; a few rounds.
           reshuffle: a layer grow leaves above target takes a packing seeded with current
           (replicas go back where they were when that costs little balance) or the
           from-scratch layer relabelled to keep the most, if that gains reshuffle_gain.
           shrink: replicas the adds made redundant drop, as in observe.
  apply    weight loads must lower imbalance() by min_gain, else observe's sets stand
           (current's sets less free drops, shares refreshed); drops alone always apply.
  So loads a plan was made for move nothing, and a 10% drift moves ~3% of the filled slots
  (58 x 256 experts on 64 x 5 slots).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import NamedTuple

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
        return _layer_imbalance(self.group_loads(loads))

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
        mine, theirs = _membership(self.slots, E, G), _membership(other.slots, E, G)
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
        return _from_scratch(loads, num_groups, slots_per_group, config)
    if not isinstance(current, Placement) or current.slots.ndim != 3 or current.slots.shape[0] != L:
        raise ValueError(f"current must be a Placement with {L} layers like loads, "
                         f"got {getattr(getattr(current, 'slots', None), 'shape', type(current).__name__)}")
    return _from_current(loads, num_groups, slots_per_group, current, config)


# ---- from scratch -------------------------------------------------------------------------

BUDGET_STEPS = (0.0, 0.5, 1.0, 1.1, 1.2, 1.35, 1.5, 2.0, None)  # of the extra replicas `need` asks for; None: all slots


def replica_counts_greedy(w: np.ndarray, budget: int, num_groups: int) -> np.ndarray:
    """The EPLB rule: one replica each, then one more for the expert with the highest load per
    replica (ties: lowest id; never more than G) until `budget` replicas."""
    r = np.ones(len(w), dtype=np.int64)
    heap = [(-w[e], e) for e in range(len(w)) if num_groups > 1]
    heapq.heapify(heap)
    for _ in range(budget - len(w)):
        if not heap:
            break
        _, e = heapq.heappop(heap)
        r[e] += 1
        if r[e] < num_groups:
            heapq.heappush(heap, (-w[e] / r[e], e))
    return r


def pack(loads: np.ndarray, counts: np.ndarray, num_groups: int, slots_per_group: int,
         had: np.ndarray | None = None, slack: np.ndarray | None = None) -> np.ndarray:
    """The EPLB packing of every layer at once: replicas (load w_e / r_e) heaviest first, ties by
    expert id, onto the least-loaded group (ties: lowest id) with a free slot lacking the expert.
    Returns slots [L, G, S]; a replica that finds no such group is left out.
    Seeded with had [L, G, E] (current's sets) and slack [L]: a replica goes back to a group
    that held its expert when that group is within slack of the least-loaded choice (no weight
    load), and equal loads go first to the group that held fewest experts (an emptied group
    takes a hot replica, so the experts of the others can stay)."""
    L, E = loads.shape
    per_replica = loads / counts
    R = int(counts.sum(axis=1).max())
    item_e = np.full((L, R), -1, dtype=np.int64)  # [L, R] items of each layer, heaviest first
    for l in range(L):
        order = np.argsort(-per_replica[l], kind="stable")
        experts = np.repeat(order, counts[l][order])
        item_e[l, :len(experts)] = experts
    item_w = np.take_along_axis(per_replica, np.maximum(item_e, 0), axis=1)
    slots = np.full((L, num_groups, slots_per_group), -1, dtype=np.int64)
    fill = np.zeros((L, num_groups), dtype=np.int64)
    group_load = np.zeros((L, num_groups))
    holds = np.zeros((L, num_groups, E), dtype=bool)
    rows = np.arange(L)
    tie = 0.0 if had is None else had.sum(axis=2) * 1e-12 * (1.0 + loads.sum(axis=1, keepdims=True))
    for i in range(R):
        e = np.maximum(item_e[:, i], 0)
        candidate = (fill < slots_per_group) & ~holds[rows, :, e]
        g = np.argmin(np.where(candidate, group_load + tie, np.inf), axis=1)
        if had is not None:
            reuse = candidate & had[rows, :, e] & (group_load <= group_load[rows, g][:, None] + slack[:, None])
            g = np.where(reuse.any(axis=1), np.argmin(np.where(reuse, group_load, np.inf), axis=1), g)
        ok = (item_e[:, i] >= 0) & candidate[rows, g]
        l, g, e = rows[ok], g[ok], e[ok]
        slots[l, g, fill[l, g]] = e
        fill[l, g] += 1
        group_load[l, g] += item_w[ok, i]
        holds[l, g, e] = True
    return slots


def _packed(loads, budgets, G, S, config):
    counts = np.stack([replica_counts_greedy(loads[l], int(budgets[l]), G) for l in range(len(loads))])
    slots = pack(loads, counts, G, S)
    shares = refine_shares(slots, loads, config)
    return slots, shares, _layer_imbalance(Placement(slots, shares).group_loads(loads))


def _from_scratch(loads: np.ndarray, G: int, S: int, config: PlannerConfig) -> Placement:
    L, E = loads.shape
    mean = loads.sum(axis=1) / G
    need = np.ceil(loads / np.where(mean > 0, mean, 1.0)[:, None]).sum(axis=1).astype(np.int64)
    slots, shares = np.full((L, G, S), -1, dtype=np.int64), np.zeros((L, G, S))
    imb, budget = np.full(L, np.inf), np.zeros(L, dtype=np.int64)
    for f in BUDGET_STEPS:
        todo = np.nonzero(imb > config.target_imbalance)[0]
        if not todo.size:
            break
        b = np.full(todo.size, G * S) if f is None else np.clip(E + np.ceil(f * (need[todo] - E)), E, G * S)
        _keep_better(slots, shares, imb, budget, todo, b.astype(np.int64), *_packed(loads[todo], b, G, S, config))
    # A packing that left a replica out uses fewer replicas than its budget, and the EPLB
    # reference for that count packs differently: plan that count too, keep the better.
    # Budgets only fall, and R = E always packs, so this ends.
    while True:
        used = (slots >= 0).sum(axis=(1, 2))
        todo = np.nonzero(used < budget)[0]
        if not todo.size:
            break
        budget[todo] = used[todo]
        _keep_better(slots, shares, imb, budget, todo, used[todo], *_packed(loads[todo], used[todo], G, S, config))
    # Few slots per group (S <= 3) can leave every packing short of target: grow those layers
    # like a migration would, kept only where also no worse than EPLB at the count they reach
    over = np.nonzero(imb > config.target_imbalance)[0]
    if over.size:
        counts = Placement(slots[over], shares[over]).replica_counts(E)
        grown, grown_imb = _grow(slots[over], shares[over], imb[over], loads[over], counts,
                                 _membership(slots[over], E, G), config)
        used = (grown >= 0).sum(axis=(1, 2))
        eplb_counts = np.stack([replica_counts_greedy(loads[l], int(u), G) for l, u in zip(over, used)])
        eplb = pack(loads[over], eplb_counts, G, S)
        eplb_imb = _layer_imbalance(Placement(eplb, _even_shares(eplb, E)).group_loads(loads[over]))
        ok = (grown_imb < imb[over] - 1e-12) & (grown_imb <= eplb_imb + 1e-12)
        idx = over[ok]
        slots[idx], imb[idx] = grown[ok], grown_imb[ok]
        shares[idx] = refine_shares(grown[ok], loads[idx], config)
    return Placement(slots, shares, int((slots >= 0).sum()), Placement(slots, shares).imbalance(loads))


def _keep_better(slots, shares, imb, budget, todo, b, new_slots, new_shares, new_imb) -> None:
    better = new_imb < imb[todo] - 1e-12
    idx = todo[better]
    slots[idx], shares[idx], imb[idx], budget[idx] = new_slots[better], new_shares[better], new_imb[better], b[better]


# ---- shares -------------------------------------------------------------------------------


def refine_shares(slots: np.ndarray, loads: np.ndarray, config: PlannerConfig = PlannerConfig()) -> np.ndarray:
    """Shares [L, G, S] that lower each layer's busiest group: from the even split, each step
    scales a replica's share by (mean / its group's load)^share_step and renormalises per
    expert; per layer the best split seen is kept, so a layer never ends worse than even.
    Works on the filled slots only, flat: n = filled slots of the layers that can improve."""
    L, G, S = slots.shape
    E = loads.shape[1]
    held = slots >= 0
    key = np.arange(L)[:, None, None] * E + np.where(held, slots, 0)  # (layer, expert) of each slot
    counts = np.bincount(key[held], minlength=L * E)
    share = np.where(held, 1.0 / np.maximum(counts[key], 1), 0.0)
    mean = loads.sum(axis=1) / G
    # only layers with a replicated expert and some load can improve
    todo = np.nonzero((counts.reshape(L, E) > 1).any(axis=1) & (mean > 0))[0]
    if not todo.size or not config.share_iterations:
        return share
    T = todo.size
    l, g, k = np.nonzero(held[todo])
    expert = key[todo][l, g, k]  # [n] (layer, expert) keys
    group = l * G + g  # [n] (layer, group) within todo
    w = loads.reshape(-1)[expert]  # [n] the expert's load
    s = share[todo][l, g, k]
    m = np.repeat(mean[todo], G)  # [T * G]
    gl = np.bincount(group, weights=w * s, minlength=T * G)
    best, best_max = s.copy(), gl.reshape(T, G).max(axis=1)
    checkpoint = best_max.copy()
    for i in range(config.share_iterations):
        with np.errstate(divide="ignore", over="ignore"):  # an idle group: the factor is capped
            factor = np.minimum((m / gl) ** config.share_step, 1e6)
        s = s * factor[group]
        s /= np.bincount(expert, weights=s, minlength=L * E)[expert]
        gl = np.bincount(group, weights=w * s, minlength=T * G)
        peak = gl.reshape(T, G).max(axis=1)
        better = peak < best_max * (1 - 1e-12)
        if better.any():
            take = better[l]
            best[take], best_max[better] = s[take], peak[better]
        if (best_max <= mean[todo] * (1 + 1e-9)).all():
            break
        if i % 10 == 9:  # converged: no layer gained 0.01% in ten steps
            if (best_max > checkpoint * (1 - 1e-4)).all():
                break
            checkpoint = best_max.copy()
    best /= np.bincount(expert, weights=best, minlength=L * E)[expert]  # exact sums after many steps
    out = share[todo]
    out[l, g, k] = best
    share[todo] = out
    return share


def _even_shares(slots: np.ndarray, E: int) -> np.ndarray:
    return refine_shares(slots, np.zeros((slots.shape[0], E)), PlannerConfig(share_iterations=0))


def _layer_imbalance(group_loads: np.ndarray) -> np.ndarray:
    mean = group_loads.mean(axis=1)
    return np.where(mean > 0, group_loads.max(axis=1) / np.where(mean > 0, mean, 1.0), 1.0)


def _solve(slots, loads, config):
    """(shares, [L] imbalance) of slots under loads."""
    shares = refine_shares(slots, loads, config)
    return shares, _layer_imbalance(Placement(slots, shares).group_loads(loads))


# ---- from current -------------------------------------------------------------------------


def _from_current(loads, G: int, S: int, current: Placement, config: PlannerConfig) -> Placement:
    L, E = loads.shape
    had = _membership(np.where(current.slots < E, current.slots, -1)[:, :G], E, G)  # [L, G, E]
    aim = _from_scratch(loads, G, S, config)  # replica counts to steer toward; the reshuffle
    aim_counts = aim.replica_counts(E)
    mean = loads.sum(axis=1) / G
    # surplus: replicas above both the from-scratch count and the count that keeps each replica
    # within a mean group load (the from-scratch count alone jumps with small drifts)
    need = np.ceil(loads / np.where(mean > 0, mean, np.inf)[:, None])
    keep = np.maximum(aim_counts, np.clip(need, 1, G).astype(np.int64))
    # observe: current's sets on these groups, surplus dropped while no layer gets worse
    start = _adapt(current.slots, loads, G, S)
    start_shares, start_imb = _solve(start, loads, config)
    # a hot expert (above its layer's mean) keeps every replica it has: hot experts spread by
    # replication, not migration, and a plan made for these loads stays put under them
    hot = loads > loads.mean(axis=1, keepdims=True)
    keep = np.where(hot, np.maximum(keep, Placement(start, start_shares).replica_counts(E)), keep)
    base, base_shares, base_imb = _shrink(start, start_shares, start_imb, loads, keep, config)
    # decide: grow layers above target; reshuffle where growing falls short
    new, new_imb = _grow(base, base_shares, base_imb, loads, keep, had, config)
    short = np.nonzero(new_imb > config.target_imbalance)[0]
    if short.size:
        seeded = pack(loads[short], aim_counts[short], G, S, had[short], (config.target_imbalance - 1) * mean[short])
        relabelled = np.stack([_relabel(aim.slots[l], start[l], E) for l in short])
        options = [(o, _solve(o, loads[short], config)[1]) for o in (seeded, relabelled)]
        for i, l in enumerate(short):  # within target: the fewest weight loads; else the lowest imbalance
            score = min((imb[i] > config.target_imbalance,
                         imb[i] if imb[i] > config.target_imbalance else _added(o[i:i + 1], had[l:l + 1]), k)
                        for k, (o, imb) in enumerate(options))
            o, imb = options[score[2]]
            if imb[i] <= new_imb[l] - config.reshuffle_gain:
                new[l], new_imb[l] = o[i], imb[i]
    changed = np.nonzero((new != base).any(axis=(1, 2)))[0]
    new_shares = base_shares.copy()
    if changed.size:  # replicas the adds made redundant go too, but not a hot expert's (above)
        keep_grown = np.where(hot, np.maximum(keep, Placement(new, base_shares).replica_counts(E)), keep)
        new[changed], new_shares[changed], _ = _shrink(new[changed], *_solve(new[changed], loads[changed], config),
                                                       loads[changed], keep_grown[changed], config)
    # apply: weight loads must buy min_gain; free drops always apply
    out = Placement(new, new_shares, _added(new, had), Placement(new, new_shares).imbalance(loads))
    gain = Placement(start, start_shares).imbalance(loads) - out.expected_imbalance
    if out.weight_loads > _added(base, had) and gain < config.min_gain:
        out = Placement(base, base_shares, _added(base, had), Placement(base, base_shares).imbalance(loads))
    return out


def _adapt(cur: np.ndarray, loads: np.ndarray, G: int, S: int) -> np.ndarray:
    """current's sets on G groups x S slots: a group over S gives up its least-used extra
    replicas (else its lightest expert); experts without a replica (their group was removed)
    go, heaviest first, to the lightest group with room, freeing an extra replica if none has."""
    L, E = loads.shape
    out = []
    for l in range(L):
        w = loads[l]
        groups = [{int(e) for e in cur[l, g] if 0 <= e < E} if g < cur.shape[1] else set() for g in range(G)]
        count = np.zeros(E, dtype=np.int64)
        for s in groups:
            count[list(s)] += 1
        for s in groups:
            while len(s) > S:
                e = min([e for e in s if count[e] > 1] or s, key=lambda e: (w[e] / count[e], e))
                s.discard(e)
                count[e] -= 1
        est = [sum(w[x] / count[x] for x in s) for s in groups]  # even-split group loads
        for e in np.argsort(-w, kind="stable"):
            if count[e]:
                continue
            room = [g for g in range(G) if len(groups[g]) < S]
            if not room:  # E <= G*S and e has no replica, so some expert holds two slots
                g, x = min(((g, x) for g, s in enumerate(groups) for x in s if count[x] > 1),
                           key=lambda gx: (w[gx[1]] / count[gx[1]], gx))
                groups[g].discard(x)
                est[g] -= w[x] / count[x]
                count[x] -= 1
                room = [g]
            g = min(room, key=lambda g: (est[g], g))
            groups[g].add(int(e))
            est[g] += w[e]
            count[e] = 1
        out.append(groups)
    return _to_slots(out, S)


def _grow(slots, shares, imb, loads, keep, had, config):
    """(slots, [L] imbalance): replicas added to layers above target in rounds, each planned on
    an estimate (_grow_layer), then shares solved exactly. A round may overshoot, so a layer
    keeps its best state; one whose round changes nothing is done."""
    slots, shares, best, best_imb = slots.copy(), shares.copy(), slots.copy(), imb.copy()
    active = np.nonzero(imb > config.target_imbalance)[0]
    for _ in range(config.grow_rounds):
        if not active.size:
            break
        gl = Placement(slots[active], shares[active]).group_loads(loads[active])
        cap = (1 + AIM * (config.target_imbalance - 1)) * gl.mean(axis=1)
        grew = [_grow_layer(slots[l], shares[l], loads[l], keep[l], had[l], cap[i]) for i, l in enumerate(active)]
        active = active[np.array(grew, dtype=bool)]
        if not active.size:
            break
        shares[active], imb = _solve(slots[active], loads[active], config)
        better = imb < best_imb[active] - 1e-12
        best[active[better]], best_imb[active[better]] = slots[active[better]], imb[better]
        active = active[imb > config.target_imbalance]
    return best, best_imb


def _grow_layer(slots, shares, w, keep, had, cap) -> bool:
    """One layer, in place, on an estimate (_Levels): while the highest level is above cap,
    replicate one of its three heaviest experts onto the receiver that moves the most load per
    weight load (_Levels.receivers). Returns whether anything changed."""
    G, S = slots.shape
    lv = _Levels(slots, shares, w)
    count = np.bincount(slots[slots >= 0], minlength=len(w))
    fresh: set[int] = set()  # experts replicated or moved here: never dropped or moved again (no ping-pong)
    changed = False
    for _ in range(G * S):
        level = lv.level()
        h = int(np.argmax(level))
        if level[h] <= cap:
            break
        top = lv.carried_in(lv.comp[h])
        best = (1e-12 * (lv.mean + 1e-300), None)
        view = lv.view(level, h, S)
        for e in sorted(top, key=lambda e: (-top[e], e))[:TRIED]:
            if count[e] < G:
                for value, g, action, t in lv.receivers(view, e, top[e], count, keep, had, fresh):
                    if value > best[0]:
                        best = (value, (e, g, action, t))
        if best[1] is None:
            break  # nothing on the highest level can go anywhere
        e, g, action, t = best[1]
        if action is not None:
            x, o = action
            count[x] -= x in lv.carried[o]
            lv.shift(g, o, x, lv.carried[g][x])
            fresh.add(x)
        lv.replicate(h, g, e, t)
        fresh.add(e)
        count[e] += 1
        changed = True
    if changed:
        slots[:] = _to_slots([[set(c) for c in lv.carried]], S)[0]
    return changed


AIM = 0.8  # grow plans for 80% of the allowed excess: the estimate lands a little high
TRIED = 3  # experts of the top level tried per add, heaviest first
RECEIVERS = 8  # full groups examined per add, lowest level first: a light group frees the most room


class _Levels:
    """One layer as the share solve leaves it: groups joined by an expert whose shares balance
    them sit in a component at one level, and load moved into any of them spreads over all.
    _grow_layer plans several adds on this estimate between two exact share solves."""

    def __init__(self, slots, shares, w):
        G = len(slots)
        self.carried = [{int(e): w[e] * s for e, s in zip(slots[g], shares[g]) if e >= 0} for g in range(G)]
        est = np.array([sum(c.values()) for c in self.carried])
        self.mean = est.mean()
        self.comp = np.arange(G)
        self.load, self.size = est.copy(), np.ones(G)
        holders: dict[int, list[int]] = {}
        for g, c in enumerate(self.carried):
            for e, x in c.items():
                if x > 1e-9 * self.mean:
                    holders.setdefault(e, []).append(g)
        for gs in holders.values():  # within 1% of the mean: one level, up to the solve's accuracy
            for a, b in zip(gs, gs[1:]):
                if abs(est[a] - est[b]) <= 0.01 * self.mean:
                    self.merge(self.comp[a], self.comp[b])

    def level(self) -> np.ndarray:
        return self.load[self.comp] / self.size[self.comp]

    def merge(self, a, b) -> None:
        if a != b:
            self.comp[self.comp == b] = a
            self.load[a], self.size[a] = self.load[a] + self.load[b], self.size[a] + self.size[b]
            self.load[b], self.size[b] = 0.0, 0.0

    def carried_in(self, c) -> dict:
        total: dict[int, float] = {}
        for g in np.nonzero(self.comp == c)[0]:
            for e, x in self.carried[g].items():
                total[e] = total.get(e, 0.0) + x
        return total

    def shift(self, g, o, x, c) -> None:
        """Expert x leaves group g, its load c going to group o (a holder, or its new home)."""
        del self.carried[g][x]
        self.carried[o][x] = self.carried[o].get(x, 0.0) + c
        self.load[self.comp[g]] -= c
        self.load[self.comp[o]] += c

    def replicate(self, h, g, e, t) -> None:
        """A replica of e on g takes load t from e's holders at h's level; equal levels join."""
        a, b = self.comp[h], self.comp[g]
        holders = [k for k in np.nonzero(self.comp == a)[0] if self.carried[k].get(e, 0.0) > 0]
        total = sum(self.carried[k][e] for k in holders)
        for k in holders:
            self.carried[k][e] -= t * self.carried[k][e] / total
        self.carried[g][e] = t
        self.load[a] -= t
        self.load[b] += t
        if abs(self.load[a] / self.size[a] - self.load[b] / self.size[b]) <= 1e-9 * self.mean:
            self.merge(a, b)

    def view(self, level, h, S) -> "_View":
        lvl, comp = level.tolist(), self.comp.tolist()
        below = [g for g in np.argsort(level, kind="stable").tolist() if comp[g] != comp[h] and lvl[g] < lvl[h]]
        spare = [o for o, c in enumerate(self.carried) if len(c) < S]
        return _View(lvl, comp, self.size.tolist(), h, S, below, spare, {})

    def receivers(self, v, e, carried, count, keep, had, fresh):
        """(load off h's level per weight load, group, room-making action, load moved) for a new
        replica of e: a group below h's level that lacks e, with a free slot (cost 1; half if it
        held e in current), or full and dropping a replica above its expert's keep count (cost
        1) or moving its lightest single expert to a group with room (cost 2). Load a room-making
        move sends to h's level counts against the gain; no other level may pass h's."""
        held, S, a = self.carried, v.S, v.comp[v.h]
        order = [g for g in v.below if e not in held[g]]
        room = [g for g in order if len(held[g]) < S]
        picks = room[:1] + [g for g in room if had[g, e]][:1] + [g for g in order[:RECEIVERS] if len(held[g]) >= S]
        for g in picks:
            b = v.comp[g]
            if len(held[g]) < S:
                options = [(0.5 if had[g, e] else 1.0, 0.0, 0.0, None)]
            elif g in v.room_for:
                options = v.room_for[g]
            else:
                options = v.room_for[g] = self._make_room(v, g, count, keep, fresh)
            for cost, freed, back, action in options:
                sa, sb = v.size[a], v.size[b]
                gap = (self.load[a] + back) / sa - (self.load[b] - freed) / sb
                t = min(carried, gap * sa * sb / (sa + sb))
                if t > back:
                    yield (t - back) / cost, g, action, t

    def _make_room(self, v, g, count, keep, fresh) -> list:
        """Ways to free a slot on full group g: (cost, load leaving g's level, load landing on
        h's level, (expert, where it goes))."""
        held, options = self.carried, []
        drops = [(c, x) for x, c in held[g].items() if count[x] > keep[x] and x not in fresh]
        singles = [(c, x) for x, c in held[g].items() if count[x] == 1 and x not in fresh]
        for cost, pool in ((1.0, drops), (2.0, singles)):
            if pool:
                c, x = min(pool)
                places = ([o for o in range(len(held)) if o != g and x in held[o]] if cost == 1.0
                          else [o for o in v.spare if x not in held[o]])
                land = _landing(v, g, c, places, 0.05 * self.mean)
                if land is not None:
                    options.append((cost, c if v.comp[land[0]] != v.comp[g] else 0.0, land[1], (x, land[0])))
        return options


def _landing(v: "_View", g, c, places, negligible):
    """(group, load landing at h's level) where load c leaving group g goes: the lowest level
    it keeps below h's, else h's own (costing c); never g's component unless c is negligible
    (the expert may be the very bridge that holds that level)."""
    a, b = v.comp[v.h], v.comp[g]
    fits = [o for o in places if v.comp[o] not in (a, b) and v.lvl[o] + c / v.size[v.comp[o]] < v.lvl[v.h]]
    if fits:
        return min(fits, key=lambda o: (v.lvl[o], o)), 0.0
    same = [o for o in places if v.comp[o] == b and c <= negligible]
    top = [o for o in places if v.comp[o] == a]
    return (same[0], 0.0) if same else (top[0], c) if top else None


class _View(NamedTuple):
    """What _Levels.receivers reads for one add, as plain lists (numpy scalars are slow here)."""
    lvl: list  # [G] level of each group
    comp: list  # [G] component of each group
    size: list  # [G] groups in each component (by component id)
    h: int  # the group at the highest level
    S: int
    below: list  # groups below h's level outside its component, lowest first
    spare: list  # groups with a free slot
    room_for: dict  # group -> _make_room's options, cached across the experts tried


def _shrink(slots, shares, imb, loads, keep, config):
    """(slots, shares, imbalance) with replicas above their expert's keep count dropped, the
    least used first, while each layer stays within max(target, its imbalance now): a layer's
    candidates all at once, the batch halved on failure, a single failure kept. Passes repeat
    until one drops nothing, so a second call on the result drops nothing either."""
    slots, shares, imb = slots.copy(), shares.copy(), imb.copy()
    limit = np.maximum(config.target_imbalance, imb) + 1e-9
    rounds, todo = config.shrink_rounds, np.ones(len(slots), dtype=bool)
    while rounds > 0:
        cands = _surplus(slots, shares, loads, keep, todo)
        todo[:] = False
        batch = {l: len(c) for l, c in cands.items()}
        while rounds > 0 and any(cands.values()):
            rounds -= 1
            layers = np.array([l for l, c in cands.items() if c])
            picks = {l: cands[l][:batch[l]] for l in layers}
            trial = slots[layers].copy()
            for i, l in enumerate(layers):
                for g, e in picks[l]:
                    trial[i, g][trial[i, g] == e] = -1
            trial = _tidy(trial)
            trial_shares, trial_imb = _solve(trial, loads[layers], config)
            for i, l in enumerate(layers):
                take = picks[l]
                if trial_imb[i] <= limit[l]:
                    slots[l], shares[l], imb[l], todo[l] = trial[i], trial_shares[i], trial_imb[i], True
                    cands[l] = cands[l][len(take):]
                elif len(take) == 1:
                    cands[l] = cands[l][1:]  # needed: it stays
                else:
                    batch[l] = len(take) // 2
        if not todo.any():
            break
    return slots, shares, imb


def _surplus(slots, shares, loads, keep, todo) -> dict:
    """{layer: [(group, expert)]} for layers in todo: each expert's (count - keep) least-used
    replicas, least-used first overall."""
    count = Placement(slots, shares).replica_counts(loads.shape[1])
    cands = {}
    for l in np.nonzero(todo & (count > keep).any(axis=1))[0]:
        ids = np.maximum(slots[l], 0)
        g, s = np.nonzero((slots[l] >= 0) & (count[l][ids] > keep[l][ids]))
        e = slots[l, g, s]
        used = loads[l, e] * shares[l, g, s]
        taken = np.zeros(len(keep[l]), dtype=np.int64)
        cands[l] = []
        for i in np.lexsort((g, e, used)):
            if taken[e[i]] < count[l, e[i]] - keep[l, e[i]]:
                taken[e[i]] += 1
                cands[l].append((int(g[i]), int(e[i])))
    return cands


def _relabel(aim: np.ndarray, start: np.ndarray, E: int) -> np.ndarray:
    """aim [G, S] with its groups permuted to keep the most of start's sets (greedy matching)."""
    G = aim.shape[0]
    overlap = _membership(aim[None], E, G)[0].astype(np.int64) @ _membership(start[None], E, G)[0].T.astype(np.int64)
    to = np.full(G, -1)
    taken = np.zeros(G, dtype=bool)
    for k in np.argsort(-overlap, axis=None, kind="stable"):
        a, b = divmod(int(k), G)
        if overlap[a, b] <= 0:
            break
        if to[a] < 0 and not taken[b]:
            to[a], taken[b] = b, True
    rest = iter(np.nonzero(~taken)[0])
    to = [t if t >= 0 else next(rest) for t in to]
    out = np.empty_like(aim)
    out[to] = aim
    return out


# ---- helpers ------------------------------------------------------------------------------


def _membership(slots: np.ndarray, E: int, G: int) -> np.ndarray:
    """[L, G, E] bool: whether group g holds expert e (groups past slots' own G hold nothing)."""
    L, Gs, _ = slots.shape
    out = np.zeros((L, max(G, Gs), max(E, 1)), dtype=bool)
    l, g, s = np.nonzero(slots >= 0)
    out[l, g, slots[l, g, s]] = True
    return out[:, :G, :E]


def _added(slots: np.ndarray, had: np.ndarray) -> int:
    l, g, s = np.nonzero(slots >= 0)
    return int((~had[l, g, slots[l, g, s]]).sum())


def _to_slots(sets: list[list[set]], S: int) -> np.ndarray:
    slots = np.full((len(sets), len(sets[0]), S), -1, dtype=np.int64)
    for l, layer in enumerate(sets):
        for g, s in enumerate(layer):
            slots[l, g, :len(s)] = sorted(s)
    return slots


def _tidy(slots: np.ndarray) -> np.ndarray:
    """Experts ascending, then the empty slots, in every group."""
    big = np.iinfo(np.int64).max
    out = np.sort(np.where(slots < 0, big, slots), axis=2)
    return np.where(out == big, -1, out)


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
