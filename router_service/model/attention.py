"""Attention over the KV cache for one step: the fast batched path and the slow obvious one.

DenseModel.forward asks an attention context, once per layer, to store the step's new keys
and values and attend: attend(layer, q [T, N, D], k [T, K, D], v [T, K, D]) -> [T, N * D].
T = tokens in the step, N = query heads, K = kv heads, D = head dim, B = sequences,
Bd = sequences feeding one token (decodes), Lmax = longest context among them, BS = block size.

    SequenceAttention   the reference: each sequence's own contiguous KVCache, attention one
                        sequence at a time (layers.attend). ReferenceModel uses it; the tests
                        hold the fast path to it.
    PagedAttention      the engine's: every sequence in one KVPool through its block table.
                        One write of the step's k, v per layer (slot_mapping), then
                          decodes  one batched call over every one-token sequence, their blocks
                                   gathered whole (index_select of [BS, K, D] chunks, ~4x faster
                                   than gathering token by token) into [Bd, Lmax, K, D] (CPU: torch
                                   SDPA with a padding mask; CUDA: the Triton paged decode kernel)
                          prefills one SDPA call per prompt chunk (a step holds a few), causal
                                   from the chunk's offset, with Mixtral's sliding window if any
                        Everything index-like (slots, masks) is built once per step, not per layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from router_service.model.kv_cache import KVCache
from router_service.model.layers import attend
from router_service.model.paged_cache import KVPool


@dataclass
class Segment:
    """The new tokens of one sequence in a step: `length` tokens appended to `cache`."""

    cache: KVCache
    length: int


class SequenceAttention:
    """The slow, obvious reference: per-sequence caches and attention, one sequence at a time."""

    def __init__(self, segments: Sequence[Segment], window: int | None, max_positions: int, device=None):
        self.segments, self.window = list(segments), window
        self.positions = torch.cat([torch.arange(g.cache.length, g.cache.length + g.length) for g in segments])
        if int(self.positions.max()) >= max_positions:
            raise ValueError(f"sequence length exceeds max_position_embeddings={max_positions}")
        self.positions = self.positions.to(device)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        outs, offset = [], 0
        for seg in self.segments:
            rows = slice(offset, offset + seg.length)
            k_all, v_all = seg.cache.append(layer, k[rows].transpose(0, 1), v[rows].transpose(0, 1))
            outs.append(attend(q[rows], k_all, v_all, seg.cache.length, self.window))
            offset += seg.length
        return torch.cat(outs)

    def finish(self) -> None:
        for seg in self.segments:
            seg.cache.advance(seg.length)


@dataclass
class _Prefill:
    rows: slice  # the chunk's rows in the step
    blocks: torch.Tensor  # [nb] the blocks holding positions [0, start + n) of its sequence
    mask: torch.Tensor  # [n, nb * BS] bool, True = attend


@dataclass
class PagedStep:
    """Where each token of a step reads and writes in the pool; built once per step.

    decode_rows [Bd], block_tables [Bd, max_blocks] (padded with 0), context_lens [Bd] (cached
    tokens including the new one); the CPU path also keeps decode_blocks [Bd, nb] (the blocks to
    gather, nb = blocks of the longest context) and decode_mask [Bd, nb * BS].
    """

    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    decode_rows: torch.Tensor  # [Bd] int64
    block_tables: torch.Tensor  # [Bd, max_blocks] int64
    context_lens: torch.Tensor  # [Bd] int64
    decode_blocks: torch.Tensor | None = None  # [Bd, nb]
    decode_mask: torch.Tensor | None = None  # [Bd, nb * BS] bool
    prefills: list[_Prefill] = field(default_factory=list)
    decodes_first: bool = False  # decode rows are rows [0, Bd): slice instead of gather

    @classmethod
    def build(cls, segments: Sequence[tuple[list[int], int, int]], block_size: int, window: int | None,
              device=None, gather: bool = True) -> "PagedStep":
        """segments: (block table, start, n) per sequence in row order: n new tokens at positions
        [start, start + n), whose blocks the table already holds. gather: build the [Bd, Lmax]
        decode gather (the CPU path); the CUDA kernel reads block tables itself."""
        positions, slots, dec_rows, dec_tables, dec_lens, prefills = [], [], [], [], [], []
        row = 0
        for table, start, n in segments:
            positions.extend(range(start, start + n))
            slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, start + n))
            if n == 1:
                dec_rows.append(row)
                dec_tables.append(table)
                dec_lens.append(start + 1)
            else:
                prefills.append((row, table, start, n))
            row += n
        width = max((len(t) for t in dec_tables), default=1)
        step = cls(positions=torch.tensor(positions, dtype=torch.int64),
                   slot_mapping=torch.tensor(slots, dtype=torch.int64),
                   decode_rows=torch.tensor(dec_rows, dtype=torch.int64),
                   block_tables=torch.tensor([t + [0] * (width - len(t)) for t in dec_tables] or [[0]],
                                             dtype=torch.int64)[:len(dec_tables)],
                   context_lens=torch.tensor(dec_lens, dtype=torch.int64),
                   decodes_first=dec_rows == list(range(len(dec_rows))))
        if dec_rows and gather:
            step.decode_blocks, step.decode_mask = _gather(step.block_tables, step.context_lens, block_size, window)
        for first, table, start, n in prefills:
            stop = start + n
            nb = -(-stop // block_size)
            j = torch.arange(nb * block_size)
            q_pos = torch.arange(start, stop)[:, None]
            mask = j[None, :] <= q_pos  # causal; also masks the unused tail of the last block
            if window is not None:
                mask &= j[None, :] > q_pos - window
            step.prefills.append(_Prefill(slice(first, first + n), torch.tensor(table[:nb], dtype=torch.int64), mask))
        return step.to(device) if device is not None else step

    def to(self, device) -> "PagedStep":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return PagedStep(move(self.positions), move(self.slot_mapping), move(self.decode_rows),
                         move(self.block_tables), move(self.context_lens), move(self.decode_blocks),
                         move(self.decode_mask), [_Prefill(p.rows, move(p.blocks), move(p.mask)) for p in self.prefills],
                         self.decodes_first)


def _gather(block_tables, context_lens, block_size: int, window: int | None):
    """decode blocks [Bd, nb] and mask [Bd, nb * BS]: key j of sequence b sits at offset j % BS of
    block table[b][j // BS]; keys at or past its length (and outside a window) are masked."""
    nb = -(-int(context_lens.max()) // block_size)
    j = torch.arange(nb * block_size)
    mask = j[None, :] < context_lens[:, None]
    if window is not None:  # the new token sits at position len - 1 and sees the last `window` keys
        mask &= j[None, :] > (context_lens[:, None] - 1) - window
    return block_tables[:, :nb].contiguous(), mask


class PagedAttention:
    """Batched attention over a KVPool for one step (see the module docstring)."""

    def __init__(self, pool: KVPool, step: PagedStep, window: int | None):
        self.pool, self.step, self.window = pool, step, window
        self.positions = step.positions

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        step, pool = self.step, self.pool
        pool.write(layer, step.slot_mapping, k, v)
        T, N, D = q.shape
        out = torch.empty(T, N, D, dtype=q.dtype, device=q.device)
        if step.decode_rows.numel():
            rows = slice(0, step.decode_rows.numel()) if step.decodes_first else step.decode_rows
            out[rows] = self._decode(layer, q[rows])
        for p in step.prefills:
            ks = self._blocks(self.pool.k[layer], p.blocks).transpose(0, 1)[None]  # [1, K, nb * BS, D]
            vs = self._blocks(self.pool.v[layer], p.blocks).transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(q[p.rows].transpose(0, 1)[None], ks, vs, attn_mask=p.mask,
                                               enable_gqa=True)  # [1, N, n, D]
            out[p.rows] = o[0].transpose(0, 1)
        return out.reshape(T, N * D)

    def _decode(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """q [Bd, N, D] -> [Bd, N, D], one new token per sequence."""
        step = self.step
        if q.is_cuda and step.decode_blocks is None:
            from router_service.model.triton_attention import paged_decode  # Triton: CUDA only

            return paged_decode(q, self.pool.k[layer], self.pool.v[layer], step.block_tables, step.context_lens,
                                self.pool.block_size, self.window)
        Bd = step.decode_blocks.shape[0]
        K, D = self.pool.k.shape[2:]
        ks = self._blocks(self.pool.k[layer], step.decode_blocks).view(Bd, -1, K, D).transpose(1, 2)  # [Bd, K, L, D]
        vs = self._blocks(self.pool.v[layer], step.decode_blocks).view(Bd, -1, K, D).transpose(1, 2)
        o = F.scaled_dot_product_attention(q[:, :, None, :], ks, vs, attn_mask=step.decode_mask[:, None, None, :],
                                           enable_gqa=True)  # [Bd, N, 1, D]
        return o[:, :, 0, :]

    def _blocks(self, cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """The keys (or values) of `blocks` [...] of one layer's cache: [... * BS, K, D] flattened."""
        per_block = cache.view(self.pool.num_blocks, self.pool.block_size, *cache.shape[1:])
        return per_block.index_select(0, blocks.reshape(-1)).view(-1, *cache.shape[1:])

    def finish(self) -> None:
        pass
