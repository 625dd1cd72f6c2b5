"""Grouped SwiGLU experts as two fused Triton kernels: the CUDA path.

T = tokens, k = experts per token, H = hidden, F = expert FFN, S = slots here,
N = T*k (token, j) pairs, P = padded pair rows, BM = BLOCK_M.

  slot_ids [T, k] --align--> sorted_pairs [P]   pair ids grouped by slot, each
                             block_slot [P/BM]  slot's run padded to BM with N
  kernel 1, grid (P/BM, F/BN): x [BM, H] @ Wg^T, Wu^T, one pass over H
                             -> act = silu(gate) * up       [P, F]  (hidden dtype)
  kernel 2, grid (P/BM, H/BN): act @ Wd^T * routing weight -> pair_out [N, H] fp32
  pair_out.view(T, k, H).sum(1) -> out [T, H]   (pairs with slot -1 stay zero)

No host sync in this module: P is bounded from shapes alone and blocks past the
real end carry slot -1 and exit at once, so the CPU never waits on the GPU here
(kernel.check_inputs still reads slot_ids' min/max back).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from experts.kernels.weights import ExpertWeights

# Block sizes. Decode (<= 64 tokens): few pairs per slot, so the shortest block tl.dot accepts (16
# rows: every padding row costs a row of weight FLOPs), 64 x 64 tiles, Triton's default warps and
# stages (vLLM's defaults). Prefill, 16-bit operands on sm_80+: measured on an H200 (README, Expert
# kernels; a sweep of BLOCK_M/N/K, warps and stages on Mixtral-8x7B and DeepSeek-like shapes):
# 128 x 128 tiles read each weight tile once for many rows, 1.24-1.41x faster than 64-row blocks at
# 4096 tokens. 3 stages: 144 KiB of shared memory for kernel 1's three operand tiles, within
# every sm_80+ GPU's (4 stages was 7% faster on some shapes but needs 192 KiB: more than an A100
# has). The sweep's decode winners were within +-10% of the defaults, faster back to back and
# slower call by call, so decode keeps the defaults.
PREFILL_BLOCKS = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}


def pick_blocks(num_tokens: int, hidden: int, ffn: int, tuned: bool = True) -> dict[str, int]:
    """Block sizes and launch settings for one call, capped at the problem size so tiny shapes
    (tests) don't waste masked lanes. `tuned` False: the 64-row defaults for prefill too."""
    cap = max(16, triton.next_power_of_2(min(hidden, ffn)))
    if num_tokens <= 64:
        blocks = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}
    elif tuned:
        blocks = dict(PREFILL_BLOCKS)
    else:
        blocks = {"BLOCK_M": 32 if num_tokens <= 512 else 64, "BLOCK_N": 64, "BLOCK_K": 64}
    blocks["BLOCK_N"], blocks["BLOCK_K"] = min(blocks["BLOCK_N"], cap), min(blocks["BLOCK_K"], cap)
    return blocks


def _tuned_for(hidden: torch.Tensor) -> bool:
    """The measured prefill settings fit 16-bit operands on sm_80 and newer (and the interpreter);
    fp32 tiles are twice the bytes."""
    if hidden.element_size() != 2:
        return False
    return hidden.device.type != "cuda" or torch.cuda.get_device_capability(hidden.device) >= (8, 0)


def align_pairs(slot_ids: torch.Tensor, num_slots: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group (token, j) pairs by slot, each slot's run padded to a multiple of block_m.

    Returns sorted_pairs [P] (flat pair id t*k + j; N = padding sentinel) and
    block_slot [P / block_m] (the slot of each block; -1 = nothing to do).
    """
    flat = slot_ids.reshape(-1)  # [N]
    num_pairs, dev = flat.numel(), flat.device
    key = torch.where(flat >= 0, flat, num_slots)  # [N]; -1 sorts last, as slot S
    order = torch.argsort(key, stable=True)  # [N]
    sorted_key = key[order]
    # scatter_add rather than bincount: bincount reads max() back to the host.
    counts = torch.zeros(num_slots + 1, dtype=torch.int64, device=dev).scatter_add_(0, key, torch.ones_like(key))
    padded = (counts[:num_slots] + block_m - 1) // block_m * block_m  # [S]
    padded_end = torch.cumsum(padded, 0)  # [S]
    rank = torch.arange(num_pairs, device=dev) - (torch.cumsum(counts, 0) - counts)[sorted_key]  # [N]
    # At most min(S, N) slots are non-empty and each wastes < block_m rows: a bound
    # from shapes, so no .item() is needed to size the grid.
    max_padded = num_pairs + min(num_slots, num_pairs) * (block_m - 1)
    max_padded = (max_padded + block_m - 1) // block_m * block_m
    dest = torch.where(
        sorted_key < num_slots,
        (padded_end - padded)[sorted_key.clamp(max=num_slots - 1)] + rank,
        max_padded,  # a dump row, dropped below
    )
    sorted_pairs = torch.full((max_padded + 1,), num_pairs, dtype=torch.int64, device=dev)
    sorted_pairs[dest] = order
    block_start = torch.arange(0, max_padded, block_m, device=dev)  # [P / BM]
    block_slot = torch.searchsorted(padded_end, block_start, right=True)
    block_slot = torch.where(block_slot < num_slots, block_slot, -1)
    return sorted_pairs[:max_padded], block_slot


@triton.jit
def _gate_up_kernel(
    x_ptr, wg_ptr, wu_ptr, act_ptr, sorted_pairs_ptr, block_slot_ptr,
    num_pairs, top_k, hidden, ffn,
    stride_xt, stride_xh, stride_ws, stride_wf, stride_wh, stride_ap, stride_af,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    slot = tl.load(block_slot_ptr + pid_m).to(tl.int64)
    if slot < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # padded rows
    pair = tl.load(sorted_pairs_ptr + offs_m)  # [BM]
    row_ok = pair < num_pairs
    token = tl.where(row_ok, pair // top_k, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # F columns
    n_ok = offs_n < ffn
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + token[:, None] * stride_xt + offs_k[None, :] * stride_xh  # [BM, BK]
    w_off = slot * stride_ws + offs_n[None, :] * stride_wf + offs_k[:, None] * stride_wh  # [BK, BN]
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_ok = offs_k < hidden - k0
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & n_ok[None, :]
        wg = tl.load(wg_ptr + w_off, mask=w_mask, other=0.0)
        wu = tl.load(wu_ptr + w_off, mask=w_mask, other=0.0)
        if UPCAST:  # interpreter: bf16 tl.dot is wrong there (triton-lang/triton#11584)
            x, wg, wu = x.to(tl.float32), wg.to(tl.float32), wu.to(tl.float32)
        acc_g = tl.dot(x, wg, acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(x, wu, acc_u, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xh
        w_off += BLOCK_K * stride_wh
    act = acc_g * tl.sigmoid(acc_g) * acc_u  # silu(gate) * up, fp32
    a_ptrs = act_ptr + offs_m.to(tl.int64)[:, None] * stride_ap + offs_n[None, :] * stride_af
    tl.store(a_ptrs, act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(
    act_ptr, wd_ptr, rw_ptr, out_ptr, sorted_pairs_ptr, block_slot_ptr,
    num_pairs, top_k, hidden, ffn,
    stride_ap, stride_af, stride_ws, stride_wh, stride_wf, stride_rt, stride_rk, stride_op, stride_oh,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    slot = tl.load(block_slot_ptr + pid_m).to(tl.int64)
    if slot < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pairs_ptr + offs_m)  # [BM]
    row_ok = pair < num_pairs
    pair = tl.where(row_ok, pair, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # H columns
    n_ok = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + offs_m.to(tl.int64)[:, None] * stride_ap + offs_k[None, :] * stride_af  # [BM, BK]
    w_ptrs = wd_ptr + slot * stride_ws + offs_n[None, :] * stride_wh + offs_k[:, None] * stride_wf  # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, ffn, BLOCK_K):
        k_ok = offs_k < ffn - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_af
        w_ptrs += BLOCK_K * stride_wf
    # Routing weight in the epilogue: one multiply per output element, in fp32.
    rw = tl.load(rw_ptr + (pair // top_k) * stride_rt + (pair % top_k) * stride_rk, mask=row_ok, other=0.0)
    acc = acc * rw.to(tl.float32)[:, None]
    o_ptrs = out_ptr + pair.to(tl.int64)[:, None] * stride_op + offs_n[None, :] * stride_oh
    tl.store(o_ptrs, acc, mask=row_ok[:, None] & n_ok[None, :])


def triton_moe_forward(
    hidden: torch.Tensor,  # [T, H]
    slot_ids: torch.Tensor,  # [T, k] int64, -1 = not held here
    weights: torch.Tensor,  # [T, k]
    experts: ExpertWeights,
    tuned: bool | None = None,  # the measured launch settings; None: where they fit (_tuned_for)
) -> torch.Tensor:  # [T, H]
    num_tokens, top_k = slot_ids.shape
    hidden_size, ffn = experts.hidden_size, experts.ffn_size
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return torch.zeros_like(hidden)
    blocks = pick_blocks(num_tokens, hidden_size, ffn, _tuned_for(hidden) if tuned is None else tuned)
    bm, bn = blocks["BLOCK_M"], blocks["BLOCK_N"]
    sorted_pairs, block_slot = align_pairs(slot_ids, experts.num_slots, bm)
    flags = {
        # Read at call time, not import: the interpreter is chosen by the environment.
        "UPCAST": os.environ.get("TRITON_INTERPRET") == "1",
        # tl.dot rounds fp32 operands to TF32 by default; ieee keeps full fp32 products.
        "DOT_PRECISION": "ieee" if hidden.dtype == torch.float32 else None,
    }
    # The activation is stored in hidden's dtype: it halves the traffic of the
    # [P, F] intermediate, and the torch path rounds it there too.
    act = torch.empty(sorted_pairs.numel(), ffn, dtype=hidden.dtype, device=hidden.device)  # [P, F]
    wg, wu, wd = experts.w_gate, experts.w_up, experts.w_down
    assert wu.stride() == wg.stride(), "w_gate and w_up share one set of strides in the kernel"
    grid = (block_slot.numel(), triton.cdiv(ffn, bn))
    _gate_up_kernel[grid](
        hidden, wg, wu, act, sorted_pairs, block_slot,
        num_pairs, top_k, hidden_size, ffn,
        hidden.stride(0), hidden.stride(1), wg.stride(0), wg.stride(1), wg.stride(2), act.stride(0), act.stride(1),
        **blocks, **flags,
    )  # fmt: skip
    pair_out = torch.zeros(num_pairs, hidden_size, dtype=torch.float32, device=hidden.device)  # [N, H]
    grid = (block_slot.numel(), triton.cdiv(hidden_size, bn))
    _down_kernel[grid](
        act, wd, weights, pair_out, sorted_pairs, block_slot,
        num_pairs, top_k, hidden_size, ffn,
        act.stride(0), act.stride(1), wd.stride(0), wd.stride(1), wd.stride(2),
        weights.stride(0), weights.stride(1), pair_out.stride(0), pair_out.stride(1),
        **blocks, **flags,
    )  # fmt: skip
    # Pair id t*k + j: the k rows of a token are adjacent, so the combine is a sum.
    return pair_out.view(num_tokens, top_k, hidden_size).sum(1).to(hidden.dtype)
