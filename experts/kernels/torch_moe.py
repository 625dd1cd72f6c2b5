"""Grouped SwiGLU experts in plain torch: the CPU path.

T = tokens, k = experts per token, H = hidden, F = expert FFN, S = slots here.

  (token, j) pairs with a slot here --sort by slot--> contiguous slices
  per slice: x [n, H] -> silu(x Wg^T) * (x Wu^T) [n, F] -> Wd [n, H] * weight
  index_add back into out [T, H]

On CPU the sort-and-slice loop, torch._grouped_mm and a padded bmm measure
within ~10% of each other (DESIGN.md), so this uses the simplest. The experts may be
dense (ExpertWeights) or in oneDNN's packed layout (packed.PackedExperts, the faster CPU
fp32 path): the loop is the same, packed.linear multiplies either.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from experts.kernels.packed import PackedExperts, linear
from experts.kernels.weights import ExpertWeights


def torch_moe_forward(
    hidden: torch.Tensor,  # [T, H]
    slot_ids: torch.Tensor,  # [T, k] int, -1 = not held here
    weights: torch.Tensor,  # [T, k]
    experts: ExpertWeights | PackedExperts,
) -> torch.Tensor:  # [T, H]
    num_tokens, top_k = slot_ids.shape
    out = torch.zeros(num_tokens, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    flat_slots = slot_ids.reshape(-1)  # [T*k]
    valid = (flat_slots >= 0).nonzero().squeeze(1)
    if valid.numel() == 0:
        return out.to(hidden.dtype)
    order = valid[torch.argsort(flat_slots[valid], stable=True)]  # pair indices sorted by slot
    sorted_slots = flat_slots[order]
    counts = torch.bincount(sorted_slots, minlength=experts.num_slots).tolist()
    token_of_pair = order // top_k
    weight_of_pair = weights.reshape(-1)[order].to(torch.float32)
    start = 0
    for slot, n in enumerate(counts):
        if n == 0:
            continue
        rows = token_of_pair[start : start + n]
        x = hidden[rows]  # [n, H]
        gate, up, down = experts.slot(slot)
        act = F.silu(linear(x, gate)) * linear(x, up)  # [n, F]
        y = linear(act, down).to(torch.float32)  # [n, H]
        out.index_add_(0, rows, y * weight_of_pair[start : start + n, None])
        start += n
    return out.to(hidden.dtype)
