"""A placement from scratch (planner.py's "From scratch"): EPLB replica counts and packing
under rising replica budgets, shares refined per layer, and grow for layers still short.

loads [L, E]; slots and shares [L, G, S]. L = MoE layers, E = experts per layer, G = groups,
S = slots per layer per group. from_scratch() and pack() are the package's internal API
(planner.py and incremental.py call them), not for outside use; so is replica_counts_greedy.
"""
from __future__ import annotations

import heapq

import numpy as np

from cluster.placement.grow import grow
from cluster.placement.layout import Placement, PlannerConfig, layer_imbalance, membership
from cluster.placement.shares import even_shares, refine_shares

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
    return slots, shares, layer_imbalance(Placement(slots, shares).group_loads(loads))


def from_scratch(loads: np.ndarray, G: int, S: int, config: PlannerConfig) -> Placement:
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
        grown, grown_imb = grow(slots[over], shares[over], imb[over], loads[over], counts,
                                 membership(slots[over], E, G), config)
        used = (grown >= 0).sum(axis=(1, 2))
        eplb_counts = np.stack([replica_counts_greedy(loads[l], int(u), G) for l, u in zip(over, used)])
        eplb = pack(loads[over], eplb_counts, G, S)
        eplb_imb = layer_imbalance(Placement(eplb, even_shares(eplb, E)).group_loads(loads[over]))
        ok = (grown_imb < imb[over] - 1e-12) & (grown_imb <= eplb_imb + 1e-12)
        idx = over[ok]
        slots[idx], imb[idx] = grown[ok], grown_imb[ok]
        shares[idx] = refine_shares(grown[ok], loads[idx], config)
    return Placement(slots, shares, int((slots >= 0).sum()), Placement(slots, shares).imbalance(loads))


def _keep_better(slots, shares, imb, budget, todo, b, new_slots, new_shares, new_imb) -> None:
    better = new_imb < imb[todo] - 1e-12
    idx = todo[better]
    slots[idx], shares[idx], imb[idx], budget[idx] = new_slots[better], new_shares[better], new_imb[better], b[better]
