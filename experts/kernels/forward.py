"""One interface for the grouped SwiGLU expert computation, two implementations.

    moe_forward(hidden [T, H], slot_ids [T, k], weights [T, k], experts) -> [T, H]

slot_ids index the slots of `experts` (the experts this process holds); -1 marks a
(token, j) pair whose expert lives elsewhere, and it contributes nothing here.
The result is sum_j weights[t, j] * expert_{slot_ids[t, j]}(hidden[t]), accumulated
in fp32 and returned in hidden's dtype.

Backends: "torch" (sort + matmul per slot; CPU; over dense or packed experts), "triton"
(fused kernel; CUDA, or CPU under TRITON_INTERPRET=1 for tests), "auto" = triton on CUDA,
else torch. prepare() puts freshly loaded experts in the layout their backend runs fastest:
packed (oneDNN, packed.py) for the torch backend in fp32 on CPU.
"""
from __future__ import annotations

import torch

from experts.kernels import packed
from experts.kernels.packed import PackedExperts
from experts.kernels.torch_moe import torch_moe_forward
from experts.kernels.weights import ExpertWeights

BACKENDS = ("auto", "torch", "triton")


class KernelError(ValueError):
    """Bad arguments to the expert kernel: the message names the argument."""


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise KernelError(f"expert kernel backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


def prepare(experts: ExpertWeights, backend: str = "auto") -> ExpertWeights | PackedExperts:
    """experts in the layout their backend runs fastest; the dense copy is not kept when packed."""
    if resolve_backend(backend, experts.device) == "torch" and packed.supported(experts.w_gate):
        return PackedExperts.from_dense(experts)
    return experts


def check_inputs(hidden: torch.Tensor, slot_ids: torch.Tensor, weights: torch.Tensor, experts: ExpertWeights,
                 check_range: bool = True) -> None:
    if hidden.dim() != 2 or hidden.shape[1] != experts.hidden_size:
        raise KernelError(f"hidden must be [T, {experts.hidden_size}], got {list(hidden.shape)}")
    if slot_ids.dim() != 2 or slot_ids.shape[0] != hidden.shape[0]:
        raise KernelError(f"slot_ids must be [T={hidden.shape[0]}, k], got {list(slot_ids.shape)}")
    if weights.shape != slot_ids.shape:
        raise KernelError(f"weights must match slot_ids {list(slot_ids.shape)}, got {list(weights.shape)}")
    if slot_ids.dtype not in (torch.int32, torch.int64):
        raise KernelError(f"slot_ids must be int32 or int64, got {slot_ids.dtype}")
    if check_range and slot_ids.numel() and (slot_ids.min() < -1 or slot_ids.max() >= experts.num_slots):
        raise KernelError(f"slot_ids must be in [-1, {experts.num_slots - 1}]")
    if hidden.dtype != experts.dtype:
        raise KernelError(f"hidden dtype {hidden.dtype} differs from the expert weights' {experts.dtype}")


def moe_forward(
    hidden: torch.Tensor,
    slot_ids: torch.Tensor,
    weights: torch.Tensor,
    experts: ExpertWeights | PackedExperts,
    backend: str = "auto",
    check_range: bool = True,
) -> torch.Tensor:
    """check_range=False skips the slot-id range check, which reads slot_ids back to the host
    (a device sync on GPU): for callers that validated the ids at their own edge."""
    check_inputs(hidden, slot_ids, weights, experts, check_range)
    if resolve_backend(backend, hidden.device) == "triton":
        if isinstance(experts, PackedExperts):
            raise KernelError("packed experts run on the torch backend only (prepare() packs for it)")
        from experts.kernels.triton_moe import triton_moe_forward  # imported lazily: triton is Linux-only

        return triton_moe_forward(hidden, slot_ids.to(torch.int64), weights, experts)
    return torch_moe_forward(hidden, slot_ids.to(torch.int64), weights, experts)
