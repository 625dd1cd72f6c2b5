"""The Triton expert kernel against a float64 loop over tokens (the slow, obvious version).

On a machine without CUDA the kernels run under the Triton interpreter, so the
shapes stay small (H, F <= 48, T <= 20): the whole file runs in seconds.
"""
import os

import torch

# Must be set before triton (or experts.kernels.triton_moe) is imported: triton.jit picks
# the interpreter at decoration time, when the module is first imported.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402,F401  a declared dependency on Linux: missing is a failure, not a skip

from experts.kernels.forward import moe_forward  # noqa: E402
from experts.kernels.torch_moe import torch_moe_forward  # noqa: E402
from experts.kernels.triton_moe import align_pairs, triton_moe_forward  # noqa: E402
from experts.kernels.weights import ExpertWeights  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def reference(hidden, slot_ids, weights, experts):  # [T, H] float64
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    for t in range(hidden.shape[0]):
        x = hidden[t].double().cpu()
        for j in range(slot_ids.shape[1]):
            s = int(slot_ids[t, j])
            if s < 0:
                continue
            gate = experts.w_gate[s].double().cpu() @ x
            up = experts.w_up[s].double().cpu() @ x
            y = experts.w_down[s].double().cpu() @ (F.silu(gate) * up)
            out[t] += float(weights[t, j]) * y
    return out


def make_case(tokens, hidden, ffn, slots, top_k, dtype=torch.float32, used_slots=None, skip_frac=0.25, seed=0):
    """Random experts scaled so activations are O(1); top-k of a random gate over used_slots."""
    g = torch.Generator().manual_seed(seed)
    experts = ExpertWeights(
        torch.randn(slots, ffn, hidden, generator=g) * hidden**-0.5,
        torch.randn(slots, ffn, hidden, generator=g) * hidden**-0.5,
        torch.randn(slots, hidden, ffn, generator=g) * ffn**-0.5,
    ).to(DEVICE, dtype)
    x = torch.randn(tokens, hidden, generator=g).to(DEVICE, dtype)
    used = torch.tensor(used_slots if used_slots is not None else range(slots))
    logits = torch.randn(tokens, len(used), generator=g)
    top_w, top_i = torch.softmax(logits, -1).topk(top_k, dim=-1)  # [T, k]
    slot_ids = used[top_i]
    slot_ids[torch.rand(tokens, top_k, generator=g) < skip_frac] = -1  # experts held elsewhere
    return x, slot_ids.to(DEVICE), top_w.to(DEVICE, dtype), experts


def check(case, dtype=torch.float32):
    x, slot_ids, w, experts = case
    got = triton_moe_forward(x, slot_ids, w, experts)
    assert got.dtype == x.dtype and got.shape == x.shape
    want = reference(x, slot_ids, w, experts)
    err = (got.double().cpu() - want).abs().max().item()
    # relative to the output's size: a bf16 result of magnitude 4 is rounded to steps of 2**-5
    bound = TOLERANCE[dtype] * max(1.0, want.abs().max().item())
    assert err <= bound, f"max abs err {err:.2e} > {bound:.1e}"
    return got


def test_one_token():
    check(make_case(tokens=1, hidden=32, ffn=48, slots=4, top_k=2, skip_frac=0.0))


def test_slots_with_no_tokens():
    # 8 slots, tokens routed to 3 of them: the empty slots' blocks must not be touched.
    check(make_case(tokens=12, hidden=32, ffn=32, slots=8, top_k=2, used_slots=[1, 5, 6]))


@pytest.mark.parametrize("top_k", [1, 2, 3, 4])
def test_top_k(top_k):
    check(make_case(tokens=20, hidden=32, ffn=48, slots=6, top_k=top_k, seed=top_k))


@pytest.mark.parametrize("hidden,ffn", [(40, 24), (17, 33), (48, 20)])
def test_sizes_not_multiple_of_block(hidden, ffn):
    check(make_case(tokens=9, hidden=hidden, ffn=ffn, slots=3, top_k=2))


@pytest.mark.parametrize("tokens,dtype", [(80, torch.float32), (600, torch.float32), (80, torch.bfloat16),
                                          (300, torch.float16)])
def test_prefill_block_sizes(tokens, dtype):
    # pick_blocks: BLOCK_M 16 up to 64 tokens, then 128 (16-bit: the measured settings) or 32 / 64 (fp32)
    check(make_case(tokens=tokens, hidden=16, ffn=24, slots=4, top_k=2, dtype=dtype), dtype)


def test_all_slots_skipped_gives_zeros():
    x, slot_ids, w, experts = make_case(tokens=5, hidden=16, ffn=32, slots=2, top_k=2)
    got = triton_moe_forward(x, torch.full_like(slot_ids, -1), w, experts)
    assert torch.equal(got, torch.zeros_like(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes(dtype):
    check(make_case(tokens=16, hidden=48, ffn=40, slots=4, top_k=2, dtype=dtype), dtype)


@pytest.mark.parametrize("tokens,top_k", [(1, 1), (7, 2), (20, 4)])
def test_matches_torch_backend(tokens, top_k):
    x, slot_ids, w, experts = make_case(tokens=tokens, hidden=24, ffn=40, slots=5, top_k=top_k, seed=tokens)
    got = triton_moe_forward(x, slot_ids, w, experts)
    torch.testing.assert_close(got, torch_moe_forward(x, slot_ids, w, experts), atol=1e-4, rtol=0)


def test_non_contiguous_inputs():
    # Strides are passed explicitly: a row slice of hidden and a transposed w_down.
    x, slot_ids, w, experts = make_case(tokens=6, hidden=32, ffn=24, slots=3, top_k=2)
    wide = torch.zeros(6, 64, device=DEVICE)
    wide[:, :32] = x
    down_t = experts.w_down.transpose(1, 2).contiguous().transpose(1, 2)  # [S, H, F], F-major
    experts = ExpertWeights(experts.w_gate, experts.w_up, down_t)
    check((wide[:, :32], slot_ids, w.t().contiguous().t(), experts))


def test_moe_forward_triton_backend():
    x, slot_ids, w, experts = make_case(tokens=10, hidden=32, ffn=32, slots=4, top_k=2)
    got = moe_forward(x, slot_ids.to(torch.int32), w, experts, backend="triton")
    torch.testing.assert_close(got, torch_moe_forward(x, slot_ids, w, experts), atol=1e-4, rtol=0)


def test_align_pairs_groups_by_slot():
    slot_ids = torch.tensor([[2, 0], [-1, 2], [0, -1], [2, 2]], device=DEVICE)  # pairs 0..7
    sorted_pairs, block_slot = align_pairs(slot_ids, num_slots=4, block_m=2)
    blocks = sorted_pairs.view(-1, 2).cpu().tolist()
    flat = slot_ids.reshape(-1).cpu()
    assert blocks[: (block_slot >= 0).sum()] == [[1, 4], [0, 3], [6, 7]]  # slot 0, then slot 2 in two blocks
    assert block_slot.cpu().tolist()[:3] == [0, 2, 2] and (block_slot[3:] == -1).all()
    assert all(p == 8 for block in blocks[3:] for p in block)  # the rest is padding
    assert sorted(p for p in sorted_pairs.tolist() if p < 8) == (flat >= 0).nonzero().squeeze(1).tolist()
