"""Paged decode attention in Triton: one new token per sequence over its blocks (CUDA path).

Bd = sequences, N = query heads, K = kv heads, G = N / K query heads per kv head, D = head dim,
BS = tokens per block, BLOCK_N = keys per loop iteration.

    grid (Bd, K): one program per (sequence, kv head), holding its G query heads [G, D]
      for each BLOCK_N keys j of the sequence:
          slot = block_tables[b, j // BS] * BS + j % BS        (the block table, read in-kernel)
          s = q . k[slot] * scale   masked to j < len (and j > len - 1 - window)
          online softmax: m, l, acc rescaled as keys stream by (fp32)
      out = acc / l

Decode is memory-bound (each key is read once for G heads), so the products are broadcast sums
rather than tl.dot, which wants 16-row tiles that G (1-8) does not fill. Tested against the
per-sequence reference under TRITON_INTERPRET=1 on CPU (tests/unit/test_paged_attention.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr,
                         stride_qb, stride_qh, stride_ks, stride_kh, stride_tb, stride_ob, stride_oh,
                         scale, window,
                         G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                         BS: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * G + g  # [BLOCK_G] query heads of this kv head
    g_ok = g < G
    d_ok = d < D
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_G, BLOCK_D]
    length = tl.load(lens_ptr + b)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    first = 0
    if HAS_WINDOW:
        first = tl.maximum(length - window, 0)
        first = (first // BLOCK_N) * BLOCK_N
    for start in range(first, length, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
        ok = j < length
        if HAS_WINDOW:
            ok = ok & (j > length - 1 - window)
        block = tl.load(tables_ptr + b * stride_tb + j // BS, mask=ok, other=0)
        slot = block.to(tl.int64) * BS + j % BS
        kv_off = slot[:, None] * stride_ks + kvh * stride_kh + d[None, :]
        kv_ok = ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_ok, other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_ptr + kv_off, mask=kv_ok, other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [BLOCK_G, BLOCK_N]
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    out = acc / l_sum[:, None]
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=g_ok[:, None] & d_ok[None, :])


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, block_size: int, window: int | None, block_n: int = 32) -> torch.Tensor:
    """q [Bd, N, D]; k_cache, v_cache [slots, K, D] (one layer of the pool); block_tables
    [Bd, max_blocks] int64; context_lens [Bd] (keys per sequence, the new one included) -> [Bd, N, D]."""
    Bd, N, D = q.shape
    K = k_cache.shape[1]
    assert N % K == 0 and k_cache.shape == v_cache.shape and k_cache.shape[2] == D, (q.shape, k_cache.shape)
    assert q.stride(2) == 1 and k_cache.stride(2) == 1 and v_cache.stride() == k_cache.stride()
    assert block_tables.shape[0] == Bd == context_lens.shape[0] and block_tables.dtype == torch.int64
    out = torch.empty_like(q)
    if Bd == 0:
        return out
    G = N // K
    _paged_decode_kernel[(Bd, K)](
        q, k_cache, v_cache, block_tables, context_lens, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1), D ** -0.5, window or 0,
        G=G, D=D, BLOCK_G=triton.next_power_of_2(G), BLOCK_D=triton.next_power_of_2(D), BS=block_size,
        BLOCK_N=block_n, HAS_WINDOW=window is not None)
    return out
