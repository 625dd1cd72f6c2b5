"""A placement from current (planner.py's "With current", migration-aware): observe (adapt
current's sets to the groups asked for, drop surplus replicas), decide (grow, reshuffle,
shrink) and apply (weight loads must buy min_gain).

loads [L, E]; slots and shares [L, G, S]; had [L, G, E] whether a group held an expert in
current; keep [L, E] the replicas each expert keeps. L = MoE layers, E = experts per layer,
G = groups, S = slots per layer per group. from_current() is the package's internal API
(planner.plan calls it), not for outside use.
"""
from __future__ import annotations

import numpy as np

from cluster.placement.grow import grow
from cluster.placement.layout import Placement, PlannerConfig, membership, to_slots
from cluster.placement.scratch import from_scratch, pack
from cluster.placement.shares import solve


def from_current(loads, G: int, S: int, current: Placement, config: PlannerConfig) -> Placement:
    L, E = loads.shape
    had = membership(np.where(current.slots < E, current.slots, -1)[:, :G], E, G)  # [L, G, E]
    aim = from_scratch(loads, G, S, config)  # replica counts to steer toward; the reshuffle
    aim_counts = aim.replica_counts(E)
    mean = loads.sum(axis=1) / G
    # surplus: replicas above both the from-scratch count and the count that keeps each replica
    # within a mean group load (the from-scratch count alone jumps with small drifts)
    need = np.ceil(loads / np.where(mean > 0, mean, np.inf)[:, None])
    keep = np.maximum(aim_counts, np.clip(need, 1, G).astype(np.int64))
    # observe: current's sets on these groups, surplus dropped while no layer gets worse
    start = _adapt(current.slots, loads, G, S)
    start_shares, start_imb = solve(start, loads, config)
    # a hot expert (above its layer's mean) keeps every replica it has: hot experts spread by
    # replication, not migration, and a plan made for these loads stays put under them
    hot = loads > loads.mean(axis=1, keepdims=True)
    keep = np.where(hot, np.maximum(keep, Placement(start, start_shares).replica_counts(E)), keep)
    base, base_shares, base_imb = _shrink(start, start_shares, start_imb, loads, keep, config)
    # decide: grow layers above target; reshuffle where growing falls short
    new, new_imb = grow(base, base_shares, base_imb, loads, keep, had, config)
    short = np.nonzero(new_imb > config.target_imbalance)[0]
    if short.size:
        seeded = pack(loads[short], aim_counts[short], G, S, had[short], (config.target_imbalance - 1) * mean[short])
        relabelled = np.stack([_relabel(aim.slots[l], start[l], E) for l in short])
        options = [(o, solve(o, loads[short], config)[1]) for o in (seeded, relabelled)]
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
        new[changed], new_shares[changed], _ = _shrink(new[changed], *solve(new[changed], loads[changed], config),
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
    return to_slots(out, S)


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
            trial_shares, trial_imb = solve(trial, loads[layers], config)
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
    overlap = membership(aim[None], E, G)[0].astype(np.int64) @ membership(start[None], E, G)[0].T.astype(np.int64)
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


def _added(slots: np.ndarray, had: np.ndarray) -> int:
    l, g, s = np.nonzero(slots >= 0)
    return int((~had[l, g, slots[l, g, s]]).sum())


def _tidy(slots: np.ndarray) -> np.ndarray:
    """Experts ascending, then the empty slots, in every group."""
    big = np.iinfo(np.int64).max
    out = np.sort(np.where(slots < 0, big, slots), axis=2)
    return np.where(out == big, -1, out)
