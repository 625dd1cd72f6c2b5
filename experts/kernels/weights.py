"""The weights of the experts one process holds, stacked by slot.

S = slots held here, H = hidden size, F = expert FFN size.
A slot is one (layer, expert) pair; slot order is the caller's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ExpertWeights:
    """SwiGLU weights, one row per slot: y = w_down @ (silu(w_gate @ x) * (w_up @ x))."""

    w_gate: torch.Tensor  # [S, F, H]
    w_up: torch.Tensor  # [S, F, H]
    w_down: torch.Tensor  # [S, H, F]

    def __post_init__(self) -> None:
        s, f, h = self.w_gate.shape
        assert self.w_up.shape == (s, f, h), (self.w_up.shape, self.w_gate.shape)
        assert self.w_down.shape == (s, h, f), (self.w_down.shape, self.w_gate.shape)

    @property
    def num_slots(self) -> int:
        return self.w_gate.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.w_gate.shape[2]

    @property
    def ffn_size(self) -> int:
        return self.w_gate.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.w_gate.dtype

    @property
    def device(self) -> torch.device:
        return self.w_gate.device

    def slot(self, s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.w_gate[s], self.w_up[s], self.w_down[s]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w_gate, self.w_up, self.w_down))

    @classmethod
    def stack(cls, per_slot: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> "ExpertWeights":
        """Stack (gate [F, H], up [F, H], down [H, F]) triples, one per slot."""
        gates, ups, downs = zip(*per_slot)
        return cls(torch.stack(gates), torch.stack(ups), torch.stack(downs))

    def to(self, device=None, dtype=None) -> "ExpertWeights":
        return ExpertWeights(*(t.to(device=device, dtype=dtype) for t in (self.w_gate, self.w_up, self.w_down)))


def load_slots(checkpoint, slots: list[tuple[int, int]], dtype: torch.dtype, device="cpu") -> ExpertWeights:
    """Read only the given (layer, expert) slots from a cluster.checkpoint.reader.Checkpoint, in slot order."""
    if not slots:
        raise ValueError("load_slots needs at least one (layer, expert) slot")
    per_slot = [tuple(t.to(device) for t in checkpoint.load_expert(layer, expert, dtype)) for layer, expert in slots]
    return ExpertWeights.stack(per_slot)
