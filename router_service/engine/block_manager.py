"""Which KV blocks of the pool each sequence holds (the tensors live in model/paged_cache.py).

A sequence holds ceil(tokens in its cache / block_size) blocks, in order: its block table.
Before a step feeds n more tokens, the scheduler asks can_allocate(seq, n) and allocate(seq, n);
a finished, cancelled or preempted sequence gives every block back with free(seq).
Invariant: free + used == num_blocks, and no block is held twice (checked in tests).
"""
from __future__ import annotations

from router_service.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: low ids first, for readable tables

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def needed(self, seq: Sequence, num_tokens: int) -> int:
        """More blocks seq needs to feed num_tokens more tokens."""
        return max(0, self.blocks_for(seq.num_computed + num_tokens) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.needed(seq, num_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        need = self.needed(seq, num_tokens)
        assert need <= len(self._free), (need, len(self._free))
        for _ in range(need):
            seq.block_table.append(self._free.pop())

    def free(self, seq: Sequence) -> None:
        self._free.extend(reversed(seq.block_table))
        seq.block_table = []
        seq.num_computed = 0
