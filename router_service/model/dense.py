"""The dense part of a MoE model, and the forward pass of one step.

T = tokens in the step, H = hidden, V = vocab, k = experts per token.

  ids [T] -> embed -> for each layer:
      h += attention(norm(h))                        KV cache, through the step's attention context
      x = norm(h)
      sparse layer: gate(x) -> ids/weights [T, k]    router
                    experts(layer, x, ids, weights)  <- pluggable: in-process or remote
                    (+ sigmoid-gated shared expert)   router
      dense layer:  swiglu(x)                        router
      h += ffn
  -> norm -> lm_head -> logits [T, V]

The experts stage is any callable `(layer, x [T, H], ids [T, k], weights [T, k]) -> [T, H]`,
and attention goes through a per-step context (attention.py: SequenceAttention for the
reference, PagedAttention for the engine), so the reference model and the distributed router
run this same code.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Generator, NamedTuple, Protocol

import torch
import torch.nn.functional as F

from cluster.checkpoint.spec import ModelSpec
from experts.kernels import packed
from experts.kernels.packed import linear
from router_service.model.kv_cache import KVCache
from router_service.model.layers import RopeTables, apply_rope, rms_norm, route, swiglu

ExpertsFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class AttentionContext(Protocol):
    """One step's attention over the KV cache (attention.py)."""

    positions: torch.Tensor  # [T] position of every token of the step

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...

    def finish(self) -> None: ...


class DenseModel:
    """Holds every non-expert tensor of the model, by its checkpoint name.

    In fp32 on CPU every matrix but the embedding is held in oneDNN's packed layout (the faster
    small-batch GEMM, experts/kernels/packed.py) instead of dense; linear() multiplies either."""

    def __init__(self, spec: ModelSpec, tensors: dict[str, torch.Tensor]):
        self.spec = spec
        embed = tensors["model.embed_tokens.weight"]
        self.dtype = embed.dtype
        lm_head = embed if spec.tie_word_embeddings else tensors["lm_head.weight"]
        if packed.supported(embed):
            tensors = {n: packed.pack(t) if t.dim() == 2 and n != "model.embed_tokens.weight" else t
                       for n, t in tensors.items()}
            lm_head = packed.pack(lm_head) if spec.tie_word_embeddings else tensors["lm_head.weight"]
        self.t = tensors
        self.lm_head = lm_head
        self.device = embed.device
        # built once for every position the model takes: a step only indexes them
        self.rope = RopeTables(spec.max_position_embeddings, spec.head_dim, spec.rope_theta, self.dtype, self.device)

    def new_cache(self) -> KVCache:
        return KVCache(self.spec.num_layers)

    def _w(self, layer: int, name: str) -> torch.Tensor:
        return self.t[f"model.layers.{layer}.{name}"]

    def attention(self, layer: int, x: torch.Tensor, attn: AttentionContext, cos, sin) -> torch.Tensor:
        """x [T, H] (normed) -> attention output [T, H]; the context stores k, v and attends."""
        s, p = self.spec, "self_attn"
        bias = (lambda n: self._w(layer, f"{p}.{n}.bias")) if s.qkv_bias else (lambda n: None)
        q = linear(x, self._w(layer, f"{p}.q_proj.weight"), bias("q_proj")).view(-1, s.num_heads, s.head_dim)
        k = linear(x, self._w(layer, f"{p}.k_proj.weight"), bias("k_proj")).view(-1, s.num_kv_heads, s.head_dim)
        v = linear(x, self._w(layer, f"{p}.v_proj.weight"), bias("v_proj")).view(-1, s.num_kv_heads, s.head_dim)
        if s.qk_norm:  # Qwen3: RMSNorm per head before RoPE
            q = rms_norm(q, self._w(layer, f"{p}.q_norm.weight"), s.rms_norm_eps)
            k = rms_norm(k, self._w(layer, f"{p}.k_norm.weight"), s.rms_norm_eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o_bias = self._w(layer, f"{p}.o_proj.bias") if s.o_bias else None
        return linear(attn.attend(layer, q, k, v), self._w(layer, f"{p}.o_proj.weight"), o_bias)

    def gate(self, layer: int, x: torch.Tensor):
        """x [T, H] -> expert ids [T, k], routing weights [T, k] fp32."""
        s = self.spec
        return route(x, self._w(layer, f"{s.moe_prefix}.gate.weight"), s.top_k, s.norm_topk_prob)

    def shared_expert(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Qwen2-MoE's always-on expert, scaled by its own sigmoid gate [T, 1]."""
        w = lambda n: self._w(layer, f"mlp.shared_expert.{n}.weight")
        out = swiglu(x, w("gate_proj"), w("up_proj"), w("down_proj"))
        return torch.sigmoid(linear(x, self._w(layer, "mlp.shared_expert_gate.weight"))) * out

    def dense_ffn(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        w = lambda n: self._w(layer, f"mlp.{n}.weight")
        return swiglu(x, w("gate_proj"), w("up_proj"), w("down_proj"))

    def forward(self, input_ids: torch.Tensor, attn: AttentionContext, experts: ExpertsFn,
                logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        """One step over the new tokens of several sequences: input_ids [T] -> logits [T, V].

        The context knows which sequence each row belongs to and where it sits (attn.positions).
        With logit_rows [R], only those rows go through the LM head: logits [R, V]
        (a prefill chunk needs one row, not one per prompt token). The experts are called in
        place, one MoE layer after another (stages() is the same pass, yielding at each one).
        """
        stages = self.stages(input_ids, attn, logit_rows)
        with expert_step(experts):
            call = next(stages)
            while True:
                try:
                    call = stages.send(experts(*call))
                except StopIteration as done:
                    return done.value

    def stages(self, input_ids: torch.Tensor, attn: AttentionContext,
               logit_rows: torch.Tensor | None = None) -> Generator[ExpertCall, torch.Tensor, torch.Tensor]:
        """forward() as a generator: yields (layer, x [T, H], ids [T, k], weights [T, k]) at every MoE
        layer, takes that layer's expert output [T, H] back through send(), and returns the logits.
        A driver can keep several of these in flight (engine/pipeline.py: two micro-batches)."""
        s = self.spec
        cos, sin = self.rope(attn.positions)
        h = F.embedding(input_ids, self.t["model.embed_tokens.weight"])  # [T, H]
        for layer in range(s.num_layers):
            x = rms_norm(h, self._w(layer, "input_layernorm.weight"), s.rms_norm_eps)
            h = h + self.attention(layer, x, attn, cos, sin)
            x = rms_norm(h, self._w(layer, "post_attention_layernorm.weight"), s.rms_norm_eps)
            if s.is_sparse(layer):
                ids, weights = self.gate(layer, x)
                ffn = yield ExpertCall(layer, x, ids, weights)
                if s.has_shared_expert:
                    ffn = ffn + self.shared_expert(layer, x)
            else:
                ffn = self.dense_ffn(layer, x)
            h = h + ffn
        attn.finish()
        if logit_rows is not None:
            h = h[logit_rows]
        h = rms_norm(h, self.t["model.norm.weight"], s.rms_norm_eps)
        return linear(h, self.lm_head)  # [T or R, V]


class ExpertCall(NamedTuple):
    """What a MoE layer asks of the experts stage: experts(*call) -> [T, H]."""

    layer: int
    x: torch.Tensor  # [T, H] normed hidden states
    ids: torch.Tensor  # [T, k] expert ids
    weights: torch.Tensor  # [T, k] routing weights, fp32


def expert_step(experts):
    """The experts' step context (RemoteExperts.step: one placement for a whole step), or none."""
    step = getattr(experts, "step", None)
    return step() if step is not None else contextlib.nullcontext()
