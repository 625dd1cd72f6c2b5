"""What an expert group holds: one immutable snapshot, layer -> LayerExperts.

Load and Unload build a new snapshot and swap it in with one assignment (experts/servicer.py); a
Forward reads the snapshot once, so it sees the slots from before a swap or after it, never a mix.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from experts.kernels.packed import PackedExperts
from experts.kernels.weights import ExpertWeights

Slot = tuple[int, int]  # (layer, expert)
Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # gate [F, H], up [F, H], down [H, F]


@dataclass(frozen=True, eq=False)  # a snapshot is itself (the coalescer's key): never compared by its tensors
class LayerExperts:
    """The experts of one layer held here, stacked for the kernel."""

    experts: tuple[int, ...]  # local slot -> expert id, ascending
    weights: ExpertWeights | PackedExperts  # [S_l, ...] on the group's device; packed on CPU fp32
    slot_of: torch.Tensor  # [E] int64 on cpu: expert id -> local slot, -1 = not held

    def per_expert(self) -> dict[int, Triple]:
        """One triple per expert (views into a dense stack, or the packed matrices): the input to a rebuild."""
        return {e: self.weights.slot(i) for i, e in enumerate(self.experts)}


def stack_layer(per_expert: dict[int, Triple], num_experts: int, packed: bool = False) -> LayerExperts:
    """packed: oneDNN's layout (experts/kernels/packed.py), each matrix packed once and shared by
    reference between snapshots; else dense stacks, copied: no view of the old stack survives."""
    experts = tuple(sorted(per_expert))
    triples = [per_expert[e] for e in experts]
    weights = PackedExperts.stack(triples) if packed else ExpertWeights.stack(triples)
    slot_of = torch.full((num_experts,), -1, dtype=torch.int64)
    slot_of[list(experts)] = torch.arange(len(experts))
    return LayerExperts(experts, weights, slot_of)


def held_slots(held: dict[int, LayerExperts]) -> list[Slot]:
    return sorted((layer, e) for layer, le in held.items() for e in le.experts)


def held_bytes(held: dict[int, LayerExperts]) -> int:
    return sum(le.weights.nbytes for le in held.values())
