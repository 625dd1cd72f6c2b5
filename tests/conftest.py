"""Shared fixtures: small random-weight checkpoints, written by transformers and by moectl."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels are tested on CPU under the interpreter. triton.jit reads this when a
    # kernel is decorated, so it must be set before any test imports experts.kernels.triton_moe.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cluster.checkpoint.make import make_checkpoint

# Shapes that exercise every family's quirks: GQA, a Qwen dense layer (mlp_only_layers),
# Qwen2's shared expert and qkv bias, Qwen3's q/k norm and explicit head_dim, Mixtral's
# sliding window (shorter than the test sequences, so the window mask matters).
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=256)
HF_FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=6, sliding_window=8)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=6, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                       mlp_only_layers=[1], norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=6, moe_intermediate_size=32, head_dim=24, norm_topk_prob=True,
                       decoder_sparse_step=1, mlp_only_layers=[2])),
}


def save_hf_checkpoint(family: str, out, seed: int = 0, **overrides):
    import transformers

    config_cls, model_cls, extra = HF_FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # HF's init is std 0.02: scale the gates up so routing is not a coin toss
        for name, p in model.named_parameters():
            if name.endswith(".gate.weight") or name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(out)
    return model


@pytest.fixture(scope="session", params=list(HF_FAMILIES))
def hf_checkpoint(request, tmp_path_factory):
    """(family, directory, transformers model) for each family."""
    out = tmp_path_factory.mktemp(f"hf-{request.param}")
    model = save_hf_checkpoint(request.param, out)
    return request.param, out, model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A moectl-written tiny Mixtral checkpoint, sharded so the index path is used."""
    return make_checkpoint("mixtral", "tiny", tmp_path_factory.mktemp("tiny-mixtral"), seed=0, max_shard_mb=0.1)
