"""ReferenceModel: the whole MoE model in one process, the correctness oracle.

It is the router's DenseModel with every expert held locally (LocalExperts) instead
of behind gRPC, so the distributed path and the oracle share the same dense code.

    model = ReferenceModel.from_pretrained(path)
    logits = model(input_ids [B, T])                 # full forward -> [B, T, V]
    caches = model.new_caches(B)
    logits = model(prompt [B, T0], caches)           # prefill, then
    logits = model(next_ids [B, 1], caches)          # incremental decoding
"""
from __future__ import annotations

from pathlib import Path

import torch

from cluster.checkpoint.reader import Checkpoint, parse_dtype
from experts.kernels.forward import moe_forward, prepare
from experts.kernels.weights import ExpertWeights, load_slots
from router_service.model.attention import Segment, SequenceAttention
from router_service.model.dense import DenseModel, ExpertsFn
from router_service.model.kv_cache import KVCache


class LocalExperts:
    """Every expert of every sparse layer in this process; slot id = expert id."""

    def __init__(self, per_layer: dict[int, ExpertWeights], backend: str = "auto"):
        # in the layout the kernel runs fastest (oneDNN-packed in fp32 on CPU: experts/kernels/forward.prepare)
        self.per_layer = {layer: prepare(w, backend) for layer, w in per_layer.items()}
        self.backend = backend

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, dtype: torch.dtype, device="cpu", backend: str = "auto"):
        spec = checkpoint.spec
        per_layer = {
            layer: load_slots(checkpoint, [(layer, e) for e in range(spec.num_experts)], dtype, device)
            for layer in spec.sparse_layers
        }
        return cls(per_layer, backend)

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return moe_forward(x, ids, weights, self.per_layer[layer], self.backend)


class ReferenceModel:
    def __init__(self, dense: DenseModel, experts: ExpertsFn, loaded_bytes: int = 0):
        """experts: LocalExperts for the oracle; RemoteExperts runs the same model over groups."""
        self.dense = dense
        self.experts = experts
        self.spec = dense.spec
        self.loaded_bytes = loaded_bytes

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | str = torch.float32, device="cpu",
                        backend: str = "auto") -> "ReferenceModel":
        dtype = parse_dtype(dtype)
        checkpoint = Checkpoint(path)
        dense = DenseModel(checkpoint.spec, {n: t.to(device) for n, t in checkpoint.load_dense(dtype).items()})
        experts = LocalExperts.from_checkpoint(checkpoint, dtype, device, backend)
        return cls(dense, experts, checkpoint.loaded_bytes)

    def new_caches(self, batch_size: int) -> list[KVCache]:
        return [self.dense.new_cache() for _ in range(batch_size)]

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, caches: list[KVCache] | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V]; with caches, continues each row's sequence."""
        batch, length = input_ids.shape
        if caches is None:
            caches = self.new_caches(batch)
        if len(caches) != batch:
            raise ValueError(f"got {len(caches)} caches for a batch of {batch}")
        vocab = self.spec.vocab_size
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab):
            raise ValueError(f"token ids must be in [0, {vocab - 1}]")
        s = self.spec
        attn = SequenceAttention([Segment(cache, length) for cache in caches], s.sliding_window,
                                 s.max_position_embeddings, self.dense.device)
        logits = self.dense.forward(input_ids.reshape(-1).to(self.dense.device), attn, self.experts)
        return logits.view(batch, length, -1)

    @torch.inference_mode()
    def generate_greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        """Greedy decoding of one sequence with the KV cache: the oracle for serving tests."""
        caches = self.new_caches(1)
        logits = self(torch.tensor([prompt]), caches)
        out = []
        for _ in range(max_new_tokens):
            out.append(int(logits[0, -1].argmax()))
            logits = self(torch.tensor([[out[-1]]]), caches)
        return out
