"""Shares: how an expert's tokens split between its replicas, solved per layer so the busiest
group carries as little as it can (the LP of planner.py's step 3, by multiplicative updates).

Arrays are [L, G, S] (L = MoE layers, G = groups, S = slots per layer per group) and loads
[L, E] (E = experts per layer). even_shares and solve are the package's internal API (used by
the planner's other modules), not for outside use.
"""
from __future__ import annotations

import numpy as np

from cluster.placement.layout import Placement, PlannerConfig, layer_imbalance


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


def even_shares(slots: np.ndarray, E: int) -> np.ndarray:
    return refine_shares(slots, np.zeros((slots.shape[0], E)), PlannerConfig(share_iterations=0))


def solve(slots, loads, config):
    """(shares, [L] imbalance) of slots under loads."""
    shares = refine_shares(slots, loads, config)
    return shares, layer_imbalance(Placement(slots, shares).group_loads(loads))
