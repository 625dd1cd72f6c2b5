"""The batched paged attention against the slow, obvious one (one sequence at a time over its own
contiguous cache, layers.attend), through one helper over a grid: GQA ratios, block sizes, lengths
on and off block boundaries, ragged batches mixing decodes with prefill chunks (from zero and
after a cached prefix), Mixtral's sliding window, fp32 and bf16; and the Triton paged decode
kernel (under TRITON_INTERPRET=1 on CPU) against the same reference.
"""
from __future__ import annotations

import random

import pytest
import torch

from router_service.model.attention import PagedAttention, PagedStep
from router_service.model.layers import attend
from router_service.model.paged_cache import KVPool


class _Spec:  # what KVPool reads of a ModelSpec
    def __init__(self, num_kv_heads, head_dim, num_layers=1):
        self.num_kv_heads, self.head_dim, self.num_layers = num_kv_heads, head_dim, num_layers


def run_both(segments, num_heads, num_kv_heads, head_dim, block_size, window, dtype, seed=0):
    """segments: (start, n) per sequence, in row order. The prefix [0, start) of each sequence is
    written into the pool and into its reference cache first; then one step of n new tokens
    each. Returns (paged output, reference output), both [T, N * D] in fp32."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    need = [-(-(s + n) // block_size) for s, n in segments]
    pool = KVPool(_Spec(num_kv_heads, head_dim), sum(need) + 3, block_size, dtype)
    free = list(range(pool.num_blocks))
    rng.shuffle(free)  # tables that are not in order, as after preemptions
    tables = [[free.pop() for _ in range(k)] for k in need]
    ref_k, ref_v = [], []
    for (start, n), table in zip(segments, tables):  # the cached prefix of each sequence
        k, v = rand(start, num_kv_heads, head_dim), rand(start, num_kv_heads, head_dim)
        if start:
            slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(start)])
            pool.write(0, slots, k, v)
        ref_k.append(k), ref_v.append(v)
    T = sum(n for _, n in segments)
    q, k, v = rand(T, num_heads, head_dim), rand(T, num_kv_heads, head_dim), rand(T, num_kv_heads, head_dim)
    step = PagedStep.build([(t, s, n) for t, (s, n) in zip(tables, segments)], block_size, window)
    fast = PagedAttention(pool, step, window).attend(0, q, k, v)
    slow, row = [], 0
    for (start, n), k0, v0 in zip(segments, ref_k, ref_v):
        ks = torch.cat([k0, k[row:row + n]]).transpose(0, 1)  # [K, L, D]
        vs = torch.cat([v0, v[row:row + n]]).transpose(0, 1)
        slow.append(attend(q[row:row + n], ks, vs, start, window))
        row += n
    return fast.float(), torch.cat(slow).float()


GRID = [  # (segments, heads, kv heads, head dim, block size, window)
    ([(0, 1)], 4, 4, 16, 4, None),  # one token, no cache
    ([(5, 1), (0, 7), (3, 1)], 8, 2, 16, 4, None),  # decodes around a prefill, GQA 4
    ([(3, 1), (4, 1), (7, 1), (8, 1), (9, 1)], 4, 2, 8, 4, None),  # decode contexts at bs-1, bs, bs+1
    ([(0, 16), (16, 16), (15, 2)], 4, 1, 16, 16, None),  # chunks ending and starting on block edges
    ([(12, 1), (2, 9), (30, 1)], 6, 3, 24, 8, 5),  # sliding window shorter than the contexts, D 24
    ([(0, 13)], 2, 2, 32, 1, 4),  # block size 1, window
    ([(40, 1)] * 3 + [(0, 3), (5, 6)], 8, 8, 16, 16, None),  # several prefills after decodes
]


@pytest.mark.parametrize("segments,heads,kv_heads,dim,bs,window", GRID)
def test_paged_attention_equals_the_per_sequence_reference_fp32(segments, heads, kv_heads, dim, bs, window):
    fast, slow = run_both(segments, heads, kv_heads, dim, bs, window, torch.float32)
    assert torch.allclose(fast, slow, atol=1e-5, rtol=1e-5), (fast - slow).abs().max()


@pytest.mark.parametrize("segments,heads,kv_heads,dim,bs,window", GRID[:3])
def test_paged_attention_bf16_within_tolerance(segments, heads, kv_heads, dim, bs, window):
    fast, slow = run_both(segments, heads, kv_heads, dim, bs, window, torch.bfloat16)
    assert (fast - slow).abs().max() < 3e-2


def test_decode_rows_need_not_come_first():
    fast, slow = run_both([(0, 4), (6, 1), (0, 2), (9, 1)], 4, 2, 8, 4, None, torch.float32)
    assert torch.allclose(fast, slow, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads,dim,bs,window,lens", [
    (4, 4, 16, 4, None, [1, 4, 5, 33]),
    (8, 2, 16, 16, None, [17, 3, 64]),
    (6, 3, 24, 8, 5, [12, 2, 30]),  # G 2, D 24 (padded to 32 in-kernel), sliding window
    (8, 1, 32, 4, None, [70]),
])
def test_triton_paged_decode_equals_the_reference(heads, kv_heads, dim, bs, window, lens):
    from router_service.model.triton_attention import paged_decode

    gen = torch.Generator().manual_seed(1)
    need = [-(-n // bs) for n in lens]
    pool = KVPool(_Spec(kv_heads, dim), sum(need) + 2, bs, torch.float32)
    ids = list(range(pool.num_blocks))[::-1]
    tables = [[ids.pop() for _ in range(k)] for k in need]
    width = max(need)
    keys = [torch.randn(n, kv_heads, dim, generator=gen) for n in lens]
    values = [torch.randn(n, kv_heads, dim, generator=gen) for n in lens]
    for table, k, v in zip(tables, keys, values):
        slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(len(k))])
        pool.write(0, slots, k, v)
    q = torch.randn(len(lens), heads, dim, generator=gen)
    out = paged_decode(q, pool.k[0], pool.v[0], torch.tensor([t + [0] * (width - len(t)) for t in tables]),
                       torch.tensor(lens), bs, window, block_n=8)
    for b, n in enumerate(lens):
        ref = attend(q[b:b + 1], keys[b].transpose(0, 1), values[b].transpose(0, 1), n - 1, window)
        assert torch.allclose(out[b].reshape(1, -1), ref, atol=1e-5), (b, (out[b].reshape(1, -1) - ref).abs().max())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: the Triton decode path itself (on CPU it runs "
                                                          "under the interpreter in the test above)")
def test_paged_attention_on_cuda_uses_the_kernel_and_matches():
    fast, slow = run_both([(5, 1), (0, 7), (30, 1)], 8, 2, 64, 16, None, torch.float32)
    assert torch.allclose(fast, slow, atol=1e-4)
