"""The torch expert kernel and the kernel interface, against a float64 loop."""
from __future__ import annotations

import pytest
import torch

from experts.kernels import packed
from experts.kernels.forward import KernelError, moe_forward, prepare, resolve_backend
from experts.kernels.packed import PackedExperts
from experts.kernels.torch_moe import torch_moe_forward
from experts.kernels.weights import ExpertWeights


def reference_moe(hidden, slot_ids, weights, experts: ExpertWeights) -> torch.Tensor:
    """The slow, obvious version: every (token, j) pair on its own, in float64."""
    x64 = hidden.double()
    out = torch.zeros_like(x64)
    for t in range(hidden.shape[0]):
        for j in range(slot_ids.shape[1]):
            s = int(slot_ids[t, j])
            if s < 0:
                continue
            g = experts.w_gate[s].double() @ x64[t]
            u = experts.w_up[s].double() @ x64[t]
            out[t] += float(weights[t, j]) * (experts.w_down[s].double() @ (torch.nn.functional.silu(g) * u))
    return out


def make_case(tokens, hidden, ffn, slots, top_k, seed=0, dtype=torch.float32, skip_fraction=0.25):
    g = torch.Generator().manual_seed(seed)
    experts = ExpertWeights(torch.randn(slots, ffn, hidden, generator=g) / hidden**0.5,
                            torch.randn(slots, ffn, hidden, generator=g) / hidden**0.5,
                            torch.randn(slots, hidden, ffn, generator=g) / ffn**0.5).to(dtype=dtype)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(slots, generator=g)[:top_k] for _ in range(tokens)]) if tokens else \
        torch.zeros(0, top_k, dtype=torch.int64)
    ids[torch.rand(ids.shape, generator=g) < skip_fraction] = -1  # experts held elsewhere
    w = torch.rand(tokens, top_k, generator=g)
    return x, ids, w, experts


LAYOUTS = ["dense", pytest.param("packed", marks=pytest.mark.skipif(
    not packed.supported(torch.empty(0)), reason="this torch has no oneDNN weight packing"))]


@pytest.mark.parametrize("tokens", [0, 1, 7, 64])
@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("hidden, ffn", [(16, 24), (33, 50)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_kernel_matches_float64(tokens, top_k, hidden, ffn, layout):
    """Dense stacks and oneDNN-packed weights (the CPU fp32 default) through the same loop."""
    x, ids, w, experts = make_case(tokens, hidden, ffn, slots=5, top_k=top_k)
    weights = PackedExperts.from_dense(experts) if layout == "packed" else experts
    got = torch_moe_forward(x, ids, w, weights)
    assert got.dtype == torch.float32 and got.shape == (tokens, hidden)
    if tokens:
        assert (got.double() - reference_moe(x, ids, w, experts)).abs().max().item() <= 1e-4


def test_empty_experts_and_all_skipped():
    x, ids, w, experts = make_case(10, 16, 24, slots=6, top_k=2)
    ids[ids == 3] = 0  # slot 3 gets no token
    assert (torch_moe_forward(x, ids, w, experts).double() - reference_moe(x, ids, w, experts)).abs().max() <= 1e-4
    assert torch.count_nonzero(torch_moe_forward(x, torch.full_like(ids, -1), w, experts)) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    x, ids, w, experts = make_case(12, 32, 40, slots=4, top_k=2, dtype=dtype)
    got = torch_moe_forward(x, ids, w, experts)
    assert got.dtype == dtype
    assert (got.double() - reference_moe(x, ids, w, experts)).abs().max().item() <= 2e-2


def test_interface_validates_arguments():
    x, ids, w, experts = make_case(4, 16, 24, slots=3, top_k=2)
    with pytest.raises(KernelError, match=r"hidden must be \[T, 16\]"):
        moe_forward(x[:, :8], ids, w, experts)
    with pytest.raises(KernelError, match=r"slot_ids must be in \[-1, 2\]"):
        moe_forward(x, ids + 5, w, experts)
    with pytest.raises(KernelError, match="weights must match slot_ids"):
        moe_forward(x, ids, w[:, :1], experts)
    with pytest.raises(KernelError, match="hidden dtype torch.float64 differs"):
        moe_forward(x.double(), ids, w, experts)
    with pytest.raises(KernelError, match="backend must be one of"):
        moe_forward(x, ids, w, experts, backend="cuda")


def test_prepare_packs_fp32_on_cpu_only_and_restacks_by_reference():
    _, _, _, experts = make_case(1, 16, 24, slots=3, top_k=1)
    ready = prepare(experts)
    assert isinstance(ready, PackedExperts) == packed.supported(experts.w_gate)
    assert prepare(experts.to(dtype=torch.bfloat16), "torch").dtype == torch.bfloat16  # bf16 stays dense
    assert prepare(experts, "triton") is experts
    if isinstance(ready, PackedExperts):
        again = PackedExperts.stack([ready.slot(2), ready.slot(0)])  # a rebuild reuses the packed matrices
        assert again.slot(0)[0] is ready.slot(2)[0] and (again.num_slots, again.hidden_size) == (2, 16)
        with pytest.raises(KernelError, match="packed experts run on the torch backend only"):
            moe_forward(torch.randn(1, 16), torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, 1), ready, "triton")


def test_auto_backend_is_torch_on_cpu():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
