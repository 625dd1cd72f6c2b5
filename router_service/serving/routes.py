"""Which group serves each (token, expert) pair: the placement table compiled for the hot path.

Pure policy on tensors: no gRPC, no clock, no state. dispatch.py fans the chosen parts out.
T = tokens in the step, k = experts per token, E = experts per layer, R = most replicas of an expert.

    compile_routes(table)       per layer: replica_groups [E, R], cumulative_shares [E, R]
    choose_groups(ids [T, k])   group of every pair, splitting an expert's tokens by the shares
                                (or, below whole_below pairs, all of them to one replica per call)
    first_replica(ids, excl)    the first replica of every pair on a group not in `excl`
    avoid(pending, down)        pairs routed to a down group moved to another replica where one exists

An expert with several replicas splits its tokens by the table's shares: token t draws
u = frac((t + 0.5) * golden ratio), a low-discrepancy sequence, and goes to the first
replica whose cumulative share exceeds u. Deterministic, no RNG state, and even a
decode step of a few tokens splits close to the shares.

Whole experts (whole_below > 0): in decode a group's time follows the experts it touches (each
one's weights read once per call) as much as its pairs, so splitting an expert's 3 pairs over two
replicas makes both groups read its weights for 1-2 tokens each. An expert with fewer than
whole_below pairs in a call sends them all to one replica, drawn per call from the same sequence
(u = frac((call * E + e + 0.5) * golden ratio)) against its shares: over calls each replica still
gets its share, and within a call different experts pick different replicas.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.checkpoint.spec import ModelSpec
from cluster.placement.table import PlacementTable

_GOLDEN = (5 ** 0.5 - 1) / 2


@dataclass(frozen=True)
class Routes:
    """A placement table compiled for lookups in the hot path."""

    table: PlacementTable
    replica_groups: dict[int, torch.Tensor]  # layer -> [E, R] group ids, padded by repeating the last
    cumulative_shares: dict[int, torch.Tensor]  # layer -> [E, R] running sum of shares, padded with 1.0


def _pad(values, width: int, fill) -> list:
    return list(values) + [fill] * (width - len(values))


def compile_routes(spec: ModelSpec, table: PlacementTable) -> Routes:
    groups, cumulative = {}, {}
    for layer in spec.sparse_layers:
        slots = [(layer, e) for e in range(spec.num_experts)]
        width = max(len(table.replicas[s]) for s in slots)
        groups[layer] = torch.tensor([_pad(table.replicas[s], width, table.replicas[s][-1]) for s in slots])
        running = [torch.tensor(table.shares_of(s), dtype=torch.float64).cumsum(0).tolist() for s in slots]
        cumulative[layer] = torch.tensor([_pad(r[:-1] + [1.0], width, 1.0) for r in running])  # last = 1 exactly
    return Routes(table, groups, cumulative)


def choose_groups(routes: Routes, layer: int, ids: torch.Tensor, call: int = 0, whole_below: int = 0,
                  counts: torch.Tensor | None = None) -> torch.Tensor:
    """ids [T, k] -> the group of every pair [T, k], an expert's tokens split by its replicas' shares;
    an expert with fewer than whole_below pairs here (counts [E], the caller's bincount of ids, or
    counted here) goes whole to one replica, drawn per `call`."""
    if routes.replica_groups[layer].shape[1] == 1:  # one replica each: a lookup, no share math
        return routes.replica_groups[layer][ids, 0]
    last = routes.replica_groups[layer].shape[1] - 1
    u = ((torch.arange(ids.shape[0], dtype=torch.float64) + 0.5) * _GOLDEN) % 1.0  # [T] in (0, 1)
    cumulative = routes.cumulative_shares[layer][ids]  # [T, k, R]
    replica = (cumulative <= u[:, None, None]).sum(-1).clamp(max=last)  # [T, k]
    if whole_below > 0:
        experts = routes.cumulative_shares[layer].shape[0]
        if counts is None:
            counts = torch.bincount(ids.flatten(), minlength=experts)  # [E] pairs per expert in this call
        u_expert = ((call * experts + torch.arange(experts, dtype=torch.float64) + 0.5) * _GOLDEN) % 1.0  # [E]
        per_expert = (routes.cumulative_shares[layer] <= u_expert[:, None]).sum(-1).clamp(max=last)  # [E]
        replica = torch.where((counts < whole_below)[ids], per_expert[ids], replica)
    return routes.replica_groups[layer][ids, replica]


def first_replica(routes: Routes, layer: int, ids, excluded) -> tuple[torch.Tensor, torch.Tensor]:
    """For every pair of ids [T, k]: its first replica on a group not in `excluded`, and whether
    there is one ([T, k] each; the choice is meaningless where there is none)."""
    candidates = routes.replica_groups[layer][ids]  # [T, k, R]
    usable = torch.ones(candidates.shape, dtype=torch.bool)
    for g in excluded:
        usable &= candidates != g
    choice = candidates.gather(-1, usable.float().argmax(dim=-1)[..., None]).squeeze(-1)
    return choice, usable.any(dim=-1)


def avoid(routes: Routes, layer: int, ids, pending: torch.Tensor, down: list[int]) -> torch.Tensor:
    """Pairs of pending [T, k] routed to a group in `down` go to another replica when one exists
    (else they stay: the down group is tried anyway)."""
    if not down:
        return pending
    hit = torch.zeros_like(pending, dtype=torch.bool)
    for g in down:
        hit |= pending == g
    if not hit.any():
        return pending
    choice, has = first_replica(routes, layer, ids, down)
    return torch.where(hit & has, choice, pending)
