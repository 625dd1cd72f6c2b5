"""`moectl simulate`'s load trace: p [L, E], each expert's share of its layer's (token, expert)
pairs, Zipf over a per-layer ranking that shifts every shift_s (L = MoE layers, E = experts
per layer). Deterministic in the config and its seed.
"""
from __future__ import annotations

import math

import numpy as np

from cluster.bench.sim_config import SimConfig


def zipf_weights(num_experts: int, a: float, top_k: int) -> np.ndarray:
    """[E] by rank: r^-a normalised, capped at 1/top_k with the excess spread over the rest in
    proportion (a token picks an expert at most once, so no expert gets more than 1/top_k of the pairs)."""
    w = np.arange(1, num_experts + 1, dtype=np.float64) ** -a
    w /= w.sum()
    cap = 1.0 / top_k
    while (w > cap + 1e-15).any():
        over = w >= cap
        excess = (w[over] - cap).sum()
        w[over] = cap
        w[~over] += excess * w[~over] / w[~over].sum()
    return w


class Trace:
    """Deterministic in (config fields, seed): the same epoch always gives the same p."""

    def __init__(self, config: SimConfig):
        self.c = config
        self.weights = zipf_weights(config.experts, config.zipf, config.top_k)
        rng = np.random.default_rng([config.seed, 0])
        self._first = np.stack([rng.permutation(config.experts) for _ in range(config.layers)])  # [L, E] rank -> expert
        self._cache: dict[int, np.ndarray] = {}

    def epoch(self, t: float) -> int:
        return int(t // self.c.shift_s) if self.c.shift_s > 0 else 0

    def shift_times(self) -> list[float]:
        if self.c.shift_s == 0:
            return [0.0]
        return [k * self.c.shift_s for k in range(int(math.ceil(self.c.duration_s / self.c.shift_s)))]

    def ranking(self, epoch: int) -> np.ndarray:
        """[L, E] expert id at each popularity rank (rank 0 = hottest) in that epoch."""
        c = self.c
        if epoch == 0 or c.shift_mode == "rotate":  # rotate: rank r's expert moves to rank r + rotate_by
            return np.roll(self._first, epoch * c.rotate_by, axis=1)
        rng = np.random.default_rng([c.seed, epoch])
        return np.stack([rng.permutation(c.experts) for _ in range(c.layers)])

    def p(self, epoch: int) -> np.ndarray:
        """[L, E] share of each layer's (token, expert) pairs per expert (rows sum to 1)."""
        if epoch not in self._cache:
            p = np.empty((self.c.layers, self.c.experts))
            np.put_along_axis(p, self.ranking(epoch), np.broadcast_to(self.weights, p.shape), axis=1)
            self._cache = {epoch: p}  # epochs only move forward
        return self._cache[epoch]
