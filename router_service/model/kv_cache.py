"""Per-sequence KV cache: keys and values of every past token, one tensor pair per layer.

K = kv heads, L = cached tokens, D = head dim. A step appends the new tokens of every
layer, then `advance` commits them, so positions are stable across the layers of a step.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers  # [K, L, D] per layer
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.length = 0  # committed tokens

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add this step's k, v [K, n, D] to layer's cache; return everything cached [K, L+n, D]."""
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=1)
            v = torch.cat([self.values[layer], v], dim=1)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens
