"""The dense part of a MoE model, and the forward pass of one step.

T = tokens in the step, H = hidden, V = vocab, k = experts per token.

  ids [T] -> embed -> for each layer:
      h += attention(norm(h))                        KV cache, per sequence
      x = norm(h)
      sparse layer: gate(x) -> ids/weights [T, k]    router
                    experts(layer, x, ids, weights)  <- pluggable: in-process or remote
                    (+ sigmoid-gated shared expert)   router
      dense layer:  swiglu(x)                        router
      h += ffn
  -> norm -> lm_head -> logits [T, V]

The experts stage is any callable `(layer, x [T, H], ids [T, k], weights [T, k]) -> [T, H]`,
so the reference model and the distributed router run this same code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from cluster.checkpoint.spec import ModelSpec
from router_service.model.kv_cache import KVCache
from router_service.model.layers import apply_rope, attend, rms_norm, rope_cos_sin, route, swiglu

ExpertsFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Segment:
    """The new tokens of one sequence in a step: `length` tokens appended to `cache`."""

    cache: KVCache
    length: int


class DenseModel:
    """Holds every non-expert tensor of the model, by its checkpoint name."""

    def __init__(self, spec: ModelSpec, tensors: dict[str, torch.Tensor]):
        self.spec = spec
        self.t = tensors
        self.dtype = tensors["model.embed_tokens.weight"].dtype
        self.lm_head = tensors["model.embed_tokens.weight"] if spec.tie_word_embeddings else tensors["lm_head.weight"]

    def new_cache(self) -> KVCache:
        return KVCache(self.spec.num_layers)

    def _w(self, layer: int, name: str) -> torch.Tensor:
        return self.t[f"model.layers.{layer}.{name}"]

    def attention(self, layer: int, x: torch.Tensor, segments: Sequence[Segment], cos, sin) -> torch.Tensor:
        """x [T, H] (normed) -> attention output [T, H]; appends k, v to each segment's cache."""
        s, p = self.spec, f"self_attn"
        bias = (lambda n: self._w(layer, f"{p}.{n}.bias")) if s.qkv_bias else (lambda n: None)
        q = F.linear(x, self._w(layer, f"{p}.q_proj.weight"), bias("q_proj")).view(-1, s.num_heads, s.head_dim)
        k = F.linear(x, self._w(layer, f"{p}.k_proj.weight"), bias("k_proj")).view(-1, s.num_kv_heads, s.head_dim)
        v = F.linear(x, self._w(layer, f"{p}.v_proj.weight"), bias("v_proj")).view(-1, s.num_kv_heads, s.head_dim)
        if s.qk_norm:  # Qwen3: RMSNorm per head before RoPE
            q = rms_norm(q, self._w(layer, f"{p}.q_norm.weight"), s.rms_norm_eps)
            k = rms_norm(k, self._w(layer, f"{p}.k_norm.weight"), s.rms_norm_eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        outs, offset = [], 0
        for seg in segments:
            rows = slice(offset, offset + seg.length)
            k_all, v_all = seg.cache.append(layer, k[rows].transpose(0, 1), v[rows].transpose(0, 1))
            outs.append(attend(q[rows], k_all, v_all, seg.cache.length, s.sliding_window))
            offset += seg.length
        o_bias = self._w(layer, f"{p}.o_proj.bias") if s.o_bias else None
        return F.linear(torch.cat(outs), self._w(layer, f"{p}.o_proj.weight"), o_bias)

    def gate(self, layer: int, x: torch.Tensor):
        """x [T, H] -> expert ids [T, k], routing weights [T, k] fp32."""
        s = self.spec
        return route(x, self._w(layer, f"{s.moe_prefix}.gate.weight"), s.top_k, s.norm_topk_prob)

    def shared_expert(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Qwen2-MoE's always-on expert, scaled by its own sigmoid gate [T, 1]."""
        w = lambda n: self._w(layer, f"mlp.shared_expert.{n}.weight")
        out = swiglu(x, w("gate_proj"), w("up_proj"), w("down_proj"))
        return torch.sigmoid(F.linear(x, self._w(layer, "mlp.shared_expert_gate.weight"))) * out

    def dense_ffn(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        w = lambda n: self._w(layer, f"mlp.{n}.weight")
        return swiglu(x, w("gate_proj"), w("up_proj"), w("down_proj"))

    def forward(self, input_ids: torch.Tensor, segments: Sequence[Segment], experts: ExpertsFn,
                logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        """One step over the new tokens of several sequences: input_ids [T] -> logits [T, V].

        The tokens of segment i are rows [sum(len[:i]), sum(len[:i+1])) of input_ids.
        With logit_rows [R], only those rows go through the LM head: logits [R, V]
        (a prefill chunk needs one row, not one per prompt token).
        """
        s = self.spec
        assert input_ids.shape[0] == sum(seg.length for seg in segments)
        positions = torch.cat([torch.arange(g.cache.length, g.cache.length + g.length) for g in segments])
        if int(positions.max()) >= s.max_position_embeddings:
            raise ValueError(f"sequence length exceeds max_position_embeddings={s.max_position_embeddings}")
        cos, sin = rope_cos_sin(positions.to(input_ids.device), s.head_dim, s.rope_theta, self.dtype)
        h = F.embedding(input_ids, self.t["model.embed_tokens.weight"])  # [T, H]
        for layer in range(s.num_layers):
            x = rms_norm(h, self._w(layer, "input_layernorm.weight"), s.rms_norm_eps)
            h = h + self.attention(layer, x, segments, cos, sin)
            x = rms_norm(h, self._w(layer, "post_attention_layernorm.weight"), s.rms_norm_eps)
            if s.is_sparse(layer):
                ids, weights = self.gate(layer, x)
                ffn = experts(layer, x, ids, weights)
                if s.has_shared_expert:
                    ffn = ffn + self.shared_expert(layer, x)
            else:
                ffn = self.dense_ffn(layer, x)
            h = h + ffn
        for seg in segments:
            seg.cache.advance(seg.length)
        if logit_rows is not None:
            h = h[logit_rows]
        h = rms_norm(h, self.t["model.norm.weight"], s.rms_norm_eps)
        return F.linear(h, self.lm_head)  # [T or R, V]
