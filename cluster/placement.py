"""The placement planner: which groups hold which experts, and how tokens split between replicas.

A pure function of numbers (numpy only; no Ray, Redis or torch), tested alone and replayed
by `moectl plan`. L = MoE layers, E = experts per layer, G = groups, S = slots per layer per group.

    plan(loads [L, E], G, S, current=None) -> Placement
        slots  [L, G, S]  expert id in each slot, -1 = empty (a group holds <= S experts of each layer)
        shares [L, G, S]  fraction of that expert's tokens routed to that replica; sums to 1 per expert

Imbalance. Group load of layer l = sum over its slots of loads[l, e] * share. A layer takes as
long as its busiest group, so a layer's balance is max_g / mean_g; imbalance() weighs layers
by load: sum_l max_g / sum_l mean_g (1.0 = perfect; an idle layer counts as 1.0).

From scratch, per layer (vectorised over layers where it matters):
  1. replica counts: the EPLB rule, one more replica for the expert with the highest load per
     replica (at most G), up to a budget R;
  2. packing: replicas heaviest first onto the least-loaded group with a free slot that does
     not hold that expert yet (the EPLB baseline, with its tie-breaks);
  3. shares: the LP "min makespan, splittable jobs restricted to their groups". An expert on
     two groups is a bridge that can carry any split, so uneven shares reach balance that
     even ones cannot. Multiplicative updates (an overloaded group gives share away) keep
     the best split seen, starting from the even one: never worse than the baseline packing
     (within 0.3% of the exact LP optimum on greedy packings, checked with max-flow).
  R tries E (one replica each), then E + f * (need - E) for a few f, then every slot, where
  need = sum_e ceil(w_e / mean group load). The smallest R reaching target_imbalance wins,
  else the best: past the target a replica only costs a weight load and memory.

With current (migration-aware), per layer:
  observe  current's expert sets on the G groups asked for: groups >= G are being removed
           (their replicas go; experts left without one are placed again, heaviest first,
           each a weight load), new groups start empty; shares refreshed for the new loads.
  decide   grow: a layer above target adds one replica at a time, the heaviest expert of the
           busiest group onto the lightest group with a free slot that lacks it (making room
           by dropping an extra replica there if full), until within target; no reshuffle.
           reshuffle: a layer growing leaves above target takes the from-scratch layer,
           groups relabelled to keep the most of current, if that gains reshuffle_gain.
           shrink: replicas above the from-scratch count of their expert are dropped, the
           least used first, while the layer stays within max(target, its imbalance).
  apply    a plan that loads weights must lower imbalance() by min_gain, else current's sets
           stand (shrunk, with refreshed shares). Dropping is free, so it always applies.
  Unchanged loads therefore move nothing, and a small drift moves little.

weight_loads: replicas the plan puts on a group that did not hold that expert in current (with
current=None: every filled slot). Dropped replicas cost no weight load and are not counted.
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
    min_gain: float = 0.05  # with current: weight loads must lower imbalance() by this (hysteresis)
    reshuffle_gain: float = 0.02  # a layer is re-planned from scratch (many weight loads) only for this much
    share_iterations: int = 60  # share updates per refinement: ~3 ms at 58x64x5; more gains < 0.1% on Zipf
    share_step: float = 0.7  # update exponent: 1.0 oscillates between two groups, 0.5 converges slower
    grow_rounds: int = 8  # each round adds replicas on estimates, then re-solves shares; Zipf needs 2-4
    shrink_rounds: int = 12  # each round tries dropping a batch per layer (halved on failure)

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
        for mask, what in ((counts == 0, "has no replica"), (np.abs(sums - 1.0) > 1e-9, "has shares that do not sum to 1")):
            if mask.any():
                l, e = np.argwhere(mask)[0]
                raise PlacementError(f"expert {e} of layer {l} {what}: groups {self.holders(l, e)}, "
                                     f"shares {shares[l][slots[l] == e].tolist()}")


def round_robin(num_layers: int, num_experts: int, num_groups: int, slots_per_group: int) -> Placement:
    """Expert e of every layer on group e % G, one replica each: the cluster's starting layout.
    expected_imbalance is that of equal loads (the only loads it is planned for)."""
    _check_shape(num_experts, num_groups, slots_per_group)
    slots = np.full((num_layers, num_groups, slots_per_group), -1, dtype=np.int64)
    for e in range(num_experts):
        slots[:, e % num_groups, e // num_groups] = e
    shares = (slots >= 0).astype(np.float64)
    return Placement(slots, shares, int((slots >= 0).sum()), Placement(slots, shares).imbalance(np.ones((num_layers, num_experts))))


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

BUDGET_STEPS = (0.0, 0.5, 1.0, 1.5, 2.0, None)  # fractions of the extra replicas `need` asks for; None = all slots


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


def pack(loads: np.ndarray, counts: np.ndarray, num_groups: int, slots_per_group: int) -> np.ndarray:
    """The EPLB packing of every layer at once: replicas (load w_e / r_e) heaviest first, ties by
    expert id, onto the least-loaded group (ties: lowest id) with a free slot lacking the expert.
    Returns slots [L, G, S]; a replica that finds no such group is left out."""
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
    for i in range(R):
        e = np.maximum(item_e[:, i], 0)
        candidate = (fill < slots_per_group) & ~holds[rows, :, e]
        g = np.argmin(np.where(candidate, group_load, np.inf), axis=1)
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
    return Placement(slots, shares, int((slots >= 0).sum()), Placement(slots, shares).imbalance(loads))


def _keep_better(slots, shares, imb, budget, todo, b, new_slots, new_shares, new_imb) -> None:
    better = new_imb < imb[todo] - 1e-12
    idx = todo[better]
    slots[idx], shares[idx], imb[idx], budget[idx] = new_slots[better], new_shares[better], new_imb[better], b[better]


# ---- shares -------------------------------------------------------------------------------


def refine_shares(slots: np.ndarray, loads: np.ndarray, config: PlannerConfig = PlannerConfig()) -> np.ndarray:
    """Shares [L, G, S] that lower each layer's busiest group: from the even split, each step
    scales a replica's share by (mean / its group's load)^share_step and renormalises per
    expert; per layer the best split seen is kept, so a layer never ends worse than even."""
    L, G, S = slots.shape
    E = loads.shape[1]
    held = slots >= 0
    ids = np.where(held, slots, 0)
    key = np.arange(L)[:, None, None] * E + ids  # (layer, expert) of each slot
    counts = np.bincount(key[held], minlength=L * E)
    share = np.where(held, 1.0 / np.maximum(counts[key], 1), 0.0)
    mean = loads.sum(axis=1) / G
    # only layers with a replicated expert and some load can improve
    todo = np.nonzero((counts.reshape(L, E) > 1).any(axis=1) & (mean > 0))[0]
    if not todo.size or not config.share_iterations:
        return share
    h, k, m = held[todo], key[todo], mean[todo][:, None]
    flat = k[h]
    w = np.where(h, loads[todo[:, None, None], ids[todo]], 0.0)  # [T, G, S] load of each slot's expert
    s = share[todo]
    best, best_max = s.copy(), (w * s).sum(axis=2).max(axis=1)
    for _ in range(config.share_iterations):
        gl = (w * s).sum(axis=2)
        with np.errstate(divide="ignore", over="ignore"):  # an idle group: the factor is capped
            factor = np.minimum((m / gl) ** config.share_step, 1e6)
        new = (s * factor[:, :, None])[h]
        s = np.zeros_like(s)
        s[h] = new / np.bincount(flat, weights=new, minlength=L * E)[flat]
        peak = (w * s).sum(axis=2).max(axis=1)
        better = peak < best_max * (1 - 1e-12)
        best[better], best_max[better] = s[better], peak[better]
        if (best_max <= m[:, 0] * (1 + 1e-9)).all():
            break
    best[h] /= np.bincount(flat, weights=best[h], minlength=L * E)[flat]  # exact sums after many steps
    share[todo] = best
    return share


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
    aim = _from_scratch(loads, G, S, config)  # the counts to steer toward, and the reshuffle
    want = aim.replica_counts(E)
    # observe
    start = _adapt(current.slots, loads, G, S)
    start_shares, _ = _solve(start, loads, config)
    start_total = Placement(start, start_shares).imbalance(loads)
    # decide
    grown = _grow(start, start_shares, loads, want, had, config)
    _, grown_imb = _solve(grown, loads, config)
    aim_imb = aim.layer_imbalance(loads)
    for l in np.nonzero((grown_imb > config.target_imbalance) & (aim_imb <= grown_imb - config.reshuffle_gain))[0]:
        grown[l] = _relabel(aim.slots[l], start[l], E)
    new = _shrink(grown, loads, want, config)
    # apply
    shares, _ = _solve(new, loads, config)
    out = Placement(new, shares, _added(new, had), Placement(new, shares).imbalance(loads))
    if out.weight_loads > _added(start, had) and start_total - out.expected_imbalance < config.min_gain:
        kept = _shrink(start, loads, want, config)
        shares, _ = _solve(kept, loads, config)
        out = Placement(kept, shares, _added(kept, had), Placement(kept, shares).imbalance(loads))
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
        for e in np.argsort(-w, kind="stable"):
            if count[e]:
                continue
            est = [sum(w[x] / count[x] for x in s) for s in groups]  # even-split group loads
            room = [g for g in range(G) if len(groups[g]) < S]
            if not room:  # E <= G*S and e has no replica, so some expert holds two slots
                g, x = min(((g, x) for g, s in enumerate(groups) for x in s if count[x] > 1),
                           key=lambda gx: (w[gx[1]] / count[gx[1]], gx))
                groups[g].discard(x)
                count[x] -= 1
                room = [g]
            groups[min(room, key=lambda g: (est[g], g))].add(int(e))
            count[e] = 1
        out.append(groups)
    return _to_slots(out, S)


def _grow(slots, shares, loads, want, had, config) -> np.ndarray:
    """Add replicas to layers above target, in rounds: estimated adds, then shares re-solved."""
    slots = slots.copy()
    for _ in range(config.grow_rounds):
        gl = Placement(slots, shares).group_loads(loads)
        cap = config.target_imbalance * gl.mean(axis=1)
        changed = False
        for l in np.nonzero(gl.max(axis=1) > cap * (1 + 1e-12))[0]:
            changed |= _grow_layer(slots[l], shares[l], loads[l], want[l], had[l], cap[l])
        if not changed:
            break
        shares, _ = _solve(slots, loads, config)
    return slots


def _grow_layer(slots, shares, w, want, had, cap) -> bool:
    """One layer, in place: while the busiest group is above cap, replicate its heaviest expert
    onto the lightest group with a free slot that lacks it (preferring one that held it in
    current: no weight load), moving half the gap. Returns whether anything changed."""
    G, S = slots.shape
    carried = [{int(e): w[e] * s for e, s in zip(slots[g], shares[g]) if e >= 0} for g in range(G)]
    est = np.array([sum(c.values()) for c in carried])
    count = np.bincount(slots[slots >= 0], minlength=len(w))
    changed = False
    for _ in range(G * S):
        h = int(np.argmax(est))
        if est[h] <= cap:
            break
        for e in sorted(carried[h], key=lambda e: (-carried[h][e], e)):
            lighter = [g for g in range(G) if est[g] < est[h] and e not in carried[g]]
            if count[e] >= G or not lighter:
                continue
            room = [g for g in lighter if len(carried[g]) < S]
            free = [g for g in room if had[g, e] and est[g] <= est.mean()]
            g = min(free or room, key=lambda g: (est[g], g)) if room else _make_room(carried, est, count, want, lighter, h, e)
            if g is None:
                continue
            t = min(carried[h][e], (est[h] - est[g]) / 2)
            carried[h][e] -= t
            carried[g][e] = t
            est[h] -= t
            est[g] += t
            count[e] += 1
            changed = True
            break
        else:
            break  # nothing on the busiest group can move
    if changed:
        slots[:] = _to_slots([[set(c) for c in carried]], S)[0]
    return changed


def _make_room(carried, est, count, want, lighter, h, e) -> int | None:
    """Free a slot for e on the lightest full group: drop an extra replica there (one above its
    wanted count first, then the least used) whose load its other holders absorb, not via h."""
    for g in sorted(lighter, key=lambda g: (est[g], g)):
        spare = [x for x in carried[g] if count[x] > 1 and x not in carried[h] and carried[g][x] < carried[h][e]]
        if not spare:
            continue
        x = min(spare, key=lambda x: (count[x] <= want[x], carried[g][x], x))
        c = carried[g].pop(x)
        o = min((o for o in range(len(carried)) if x in carried[o]), key=lambda o: (est[o], o))
        carried[o][x] += c
        est[g] -= c
        est[o] += c
        count[x] -= 1
        return g
    return None


def _shrink(slots, loads, want, config) -> np.ndarray:
    """Drop replicas above their expert's wanted count, the least used first, while each layer
    stays within max(target, its imbalance now): all at once, halving the batch on failure."""
    slots = slots.copy()
    shares, imb = _solve(slots, loads, config)
    limit = np.maximum(config.target_imbalance, imb) + 1e-9
    count = Placement(slots, shares).replica_counts(loads.shape[1])
    cands, batch = {}, {}
    for l in np.nonzero((count > want).any(axis=1))[0]:
        g, s = np.nonzero((slots[l] >= 0) & (count[l][np.maximum(slots[l], 0)] > want[l][np.maximum(slots[l], 0)]))
        e = slots[l, g, s]
        order = np.lexsort((g, e, loads[l, e] * shares[l, g, s]))
        cands[l] = [(int(g[i]), int(e[i])) for i in order]
        batch[l] = len(cands[l])
    for _ in range(config.shrink_rounds):
        picks = {}
        for l, cs in cands.items():
            left = count[l].copy()
            take = [(g, e) for g, e in cs if left[e] > want[l, e] and not _dec(left, e)][:batch[l]]
            if take:
                picks[l] = take
        if not picks:
            break
        layers = list(picks)
        trial = slots[layers].copy()
        for i, l in enumerate(layers):
            for g, e in picks[l]:
                trial[i, g][trial[i, g] == e] = -1
        _, timb = _solve(trial, loads[layers], config)
        for i, l in enumerate(layers):
            take = picks[l]
            if timb[i] <= limit[l]:
                slots[l] = trial[i]
                for g, e in take:
                    count[l, e] -= 1
                cands[l] = [c for c in cands[l] if c not in take]
            elif len(take) == 1:
                cands[l].remove(take[0])  # needed: keep it
            else:
                batch[l] = len(take) // 2
    return _tidy(slots)


def _dec(left, e) -> bool:
    left[e] -= 1
    return False


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
