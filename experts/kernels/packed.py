"""Experts (and any linear layer) in oneDNN's blocked weight layout: the fast CPU path in fp32.

A decode step multiplies a few rows by every expert's matrices: memory-bound GEMMs of M = 1-16
rows, where MKL's sgemm on these AVX2 machines streams weights at ~4-5 GB/s. The same products
through oneDNN with the weights reordered once into its blocked layout (torch.ops.mkldnn, what
torch.compile's freezing uses on CPU) measured 1.3-1.45x faster on the `small` model's 402 MB of
experts, fp32 results equal to 1e-6 relative. The reorder replaces the dense copy, so memory stays
one copy of each weight.

    pack(w [O, I])              -> an opaque packed weight (CPU, fp32; None where unsupported)
    linear(x [M, I], w)         -> [M, O], w dense or packed
    PackedExperts.from_dense(e) -> the slots of an ExpertWeights, packed slot by slot; torch_moe.py's
                                   loop runs over either
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from experts.kernels.weights import ExpertWeights

_PACK_ROWS = 16  # the M oneDNN picks its blocking for; any M works with the result (a hint only)


def supported(t: torch.Tensor) -> bool:
    """Whether t can be packed: fp32 on CPU, with oneDNN in this torch build."""
    return (t.device.type == "cpu" and t.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def pack(w: torch.Tensor) -> torch.Tensor:
    """w [O, I] in the packed layout (a packed w as it is)."""
    return w if w.is_mkldnn else torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), _PACK_ROWS)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., I] times w [O, I] (dense or packed), plus bias."""
    if w.is_mkldnn:
        shape = x.shape
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), w, bias, "none", [], "")
        return y.view(*shape[:-1], y.shape[-1])
    return F.linear(x, w, bias)


@dataclass
class PackedExperts:
    """The slots of an ExpertWeights with each matrix packed; read like one (num_slots, sizes, dtype)."""

    per_slot: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (gate [F, H], up [F, H], down [H, F])
    hidden_size: int
    ffn_size: int
    dtype: torch.dtype = torch.float32

    @classmethod
    def from_dense(cls, experts: ExpertWeights) -> "PackedExperts":
        per_slot = [tuple(pack(t[s]) for t in (experts.w_gate, experts.w_up, experts.w_down))
                    for s in range(experts.num_slots)]
        return cls(per_slot, experts.hidden_size, experts.ffn_size, experts.w_gate.dtype)

    @classmethod
    def stack(cls, per_slot: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> "PackedExperts":
        """From (gate, up, down) triples, packed or dense (dense ones are packed here)."""
        triples = [tuple(t if t.is_mkldnn else pack(t) for t in triple) for triple in per_slot]
        gate = triples[0][0]
        return cls(triples, gate.shape[1], gate.shape[0], torch.float32)

    def slot(self, s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.per_slot[s]

    @property
    def num_slots(self) -> int:
        return len(self.per_slot)

    @property
    def nbytes(self) -> int:
        return 3 * self.num_slots * self.hidden_size * self.ffn_size * 4

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")
