"""The paged KV cache: one preallocated pool of fixed-size blocks shared by every sequence.

Shape legend (the project's; STYLE.md): L = layers, NB = blocks in the pool, BS = tokens per
block, K = kv heads, D = head dim, T = tokens in the step, B = sequences.

    k, v           [L, NB * BS, K, D]   flat over slots: slot = block * BS + offset
    block table    a sequence's blocks in order (list[int] on the host; [B, max_blocks] int64 per step)
    slot_mapping   [T] int64            where each new token of the step writes its k, v

The pool is allocated once, from a byte budget, and zero-filled so its memory is committed at
start: a router never grows past weights + this pool, whatever the request mix (the scheduler
preempts rather than allocate more). Which blocks belong to whom is the engine's business
(router_service/engine/block_manager.py); this file holds the tensors and their arithmetic.
"""
from __future__ import annotations

import torch

from cluster.checkpoint.spec import ModelSpec

DEFAULT_BLOCK_SIZE = 16  # tokens per block: vLLM's default; small enough that a sequence wastes < 1 block


def bytes_per_token(spec: ModelSpec, dtype: torch.dtype) -> int:
    """K and V of one token over every layer."""
    return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * torch.empty((), dtype=dtype).element_size()


def blocks_for_budget(spec: ModelSpec, dtype: torch.dtype, budget_bytes: int, block_size: int) -> int:
    return int(budget_bytes // (bytes_per_token(spec, dtype) * block_size))


class KVPool:
    def __init__(self, spec: ModelSpec, num_blocks: int, block_size: int = DEFAULT_BLOCK_SIZE,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV pool needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (spec.num_layers, num_blocks * block_size, spec.num_kv_heads, spec.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # zeros, not empty: commit the memory now
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def num_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [T, K, D] of the step's new tokens into their slots [T]."""
        self.k[layer].index_copy_(0, slot_mapping, k)
        self.v[layer].index_copy_(0, slot_mapping, v)


def slots_of(block_table: list[int], start: int, stop: int, block_size: int) -> list[int]:
    """The slots of positions [start, stop) of a sequence with this block table (host side)."""
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, stop)]
