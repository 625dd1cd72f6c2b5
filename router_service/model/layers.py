"""The dense building blocks of a MoE decoder, plain torch, no cluster knowledge.

T = tokens in a step, H = hidden, N = query heads, K = kv heads, D = head dim,
E = experts, k = experts per token, F = FFN size.
Each function mirrors the Hugging Face definition it stands for (noted per function),
because the reference model must match `transformers` to 1e-4.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from experts.kernels.packed import linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF MixtralRMSNorm / Qwen2MoeRMSNorm: normalise in fp32, scale in the input dtype."""
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """Default RoPE tables for the given positions [T] -> cos, sin [T, D]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim))
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class RopeTables:
    """cos, sin [P, D] for every position the model takes, built once: a step indexes them
    (the same values rope_cos_sin computes per step, row for row)."""

    def __init__(self, max_positions: int, head_dim: int, theta: float, dtype: torch.dtype, device=None):
        positions = torch.arange(max_positions, device=device)
        self.cos, self.sin = rope_cos_sin(positions, head_dim, theta, dtype)  # [P, D] each

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions], self.sin[positions]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated by position (HF rotate_half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, window: int | None) -> torch.Tensor:
    """Causal attention of n new queries over L cached+new keys of one sequence.

    q [n, N, D], k/v [K, L, D] with L = start + n; returns [n, N*D].
    Query i (absolute position start+i) sees key j iff j <= start+i and, with a
    sliding window, j > start+i-window (HF sliding_window_overlay).
    """
    n, num_heads, head_dim = q.shape
    groups = num_heads // k.shape[0]
    k = k.repeat_interleave(groups, dim=0)  # [N, L, D]
    v = v.repeat_interleave(groups, dim=0)
    q_pos = torch.arange(start, start + n, device=q.device)[:, None]
    k_pos = torch.arange(k.shape[1], device=q.device)[None, :]
    mask = k_pos <= q_pos  # [n, L]
    if window is not None:
        mask &= k_pos > q_pos - window
    scores = (q.transpose(0, 1) @ k.transpose(1, 2)) * head_dim**-0.5  # [N, n, L]
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return (probs @ v).transpose(0, 1).reshape(n, num_heads * head_dim)


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """One dense SwiGLU FFN: x [T, H] -> [T, H] (HF MLP with silu); weights dense or packed."""
    return linear(F.silu(linear(x, w_gate)) * linear(x, w_up), w_down)


def route(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int, normalize: bool):
    """The MoE gate: x [T, H], gate [E, H] -> expert ids [T, k] int64, weights [T, k] fp32.

    softmax over all experts in fp32, keep the top k, renormalise them when the family
    says so (Mixtral always; Qwen with norm_topk_prob) — HF MixtralTopKRouter et al.
    """
    probs = torch.softmax(linear(x, gate_weight).to(torch.float32), dim=-1)  # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights
