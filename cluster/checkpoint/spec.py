"""The architecture of a supported MoE checkpoint, read from its config.json.

One typed, validated description that the router, the expert groups and the
reference model all read, so no component parses config.json itself.
Supported families: Mixtral, Qwen2-MoE, Qwen3-MoE (Hugging Face layouts).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ARCHITECTURES = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
FAMILIES = tuple(ARCHITECTURES.values())


class UnsupportedModelError(ValueError):
    """The checkpoint's config.json describes a model this project cannot serve."""


@dataclass(frozen=True)
class ModelSpec:
    family: str  # one of FAMILIES
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    sliding_window: int | None  # None: full attention
    tie_word_embeddings: bool
    qkv_bias: bool  # biases on q/k/v (Qwen2-MoE always; Qwen3-MoE with attention_bias)
    o_bias: bool  # bias on the attention output projection (Qwen3-MoE attention_bias)
    qk_norm: bool  # Qwen3-MoE normalises q and k per head
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    norm_topk_prob: bool  # renormalise the top-k probabilities to sum to 1
    dense_intermediate_size: int  # FFN size of layers that are dense (Qwen mlp_only_layers)
    shared_expert_intermediate_size: int  # 0: no shared expert
    sparse_layers: tuple[int, ...]  # layers whose FFN is the MoE block
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise UnsupportedModelError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise UnsupportedModelError(
                f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], got {self.top_k}"
            )
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads ({self.num_kv_heads})"
            )

    def is_sparse(self, layer: int) -> bool:
        return layer in self.sparse_layers

    @property
    def has_shared_expert(self) -> bool:
        return self.shared_expert_intermediate_size > 0

    @property
    def moe_prefix(self) -> str:
        """Name of the MoE block inside a decoder layer."""
        return "block_sparse_moe" if self.family == "mixtral" else "mlp"

    def expert_tensor_names(self, layer: int, expert: int) -> tuple[str, str, str]:
        """(gate [F, H], up [F, H], down [H, F]) tensor names of one expert."""
        base = f"model.layers.{layer}.{self.moe_prefix}.experts.{expert}"
        if self.family == "mixtral":
            return f"{base}.w1.weight", f"{base}.w3.weight", f"{base}.w2.weight"
        return f"{base}.gate_proj.weight", f"{base}.up_proj.weight", f"{base}.down_proj.weight"

    def is_expert_tensor(self, name: str) -> bool:
        return f".{self.moe_prefix}.experts." in name

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelSpec":
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path}: no config.json (is {path} a Hugging Face checkpoint directory?)")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise UnsupportedModelError(f"{config_path}: not valid JSON ({e})") from e
        return cls.from_config(config)

    @classmethod
    def from_config(cls, config: dict) -> "ModelSpec":
        archs = config.get("architectures") or []
        known = [a for a in archs if a in ARCHITECTURES]
        if not known:
            raise UnsupportedModelError(
                f"unsupported architecture {archs or config.get('model_type')!r}; "
                f"supported: {', '.join(ARCHITECTURES)}"
            )
        family = ARCHITECTURES[known[0]]

        def need(key: str):
            if config.get(key) is None:
                raise UnsupportedModelError(f"config.json of a {known[0]} checkpoint lacks {key!r}")
            return config[key]

        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise UnsupportedModelError(f"rope type {rope_type!r} is not supported (only 'default')")
        rope_theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))

        attention_bias = family == "qwen3_moe" and bool(config.get("attention_bias", False))
        hidden, heads = need("hidden_size"), need("num_attention_heads")
        num_layers = need("num_hidden_layers")
        if family == "mixtral":
            num_experts = need("num_local_experts")
            moe_ffn = need("intermediate_size")
            sparse = tuple(range(num_layers))
            sliding = config.get("sliding_window")
        else:
            num_experts = config.get("num_experts", config.get("num_local_experts"))
            if num_experts is None:
                raise UnsupportedModelError(f"config.json of a {known[0]} checkpoint lacks 'num_experts'")
            moe_ffn = need("moe_intermediate_size")
            step, dense_only = config.get("decoder_sparse_step", 1), set(config.get("mlp_only_layers") or [])
            sparse = tuple(
                l for l in range(num_layers) if l not in dense_only and num_experts > 0 and (l + 1) % step == 0
            )
            if config.get("use_sliding_window"):
                raise UnsupportedModelError("use_sliding_window=true is not supported for Qwen MoE checkpoints")
            sliding = None
        return cls(
            family=family,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or hidden // heads,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            sliding_window=sliding or None,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=bool(config.get("qkv_bias", True)) if family == "qwen2_moe" else attention_bias,
            o_bias=attention_bias,
            qk_norm=family == "qwen3_moe",
            num_experts=num_experts,
            top_k=need("num_experts_per_tok"),
            moe_intermediate_size=moe_ffn,
            norm_topk_prob=True if family == "mixtral" else bool(config.get("norm_topk_prob", False)),
            dense_intermediate_size=config.get("intermediate_size", 0) if family != "mixtral" else 0,
            shared_expert_intermediate_size=config.get("shared_expert_intermediate_size", 0)
            if family == "qwen2_moe"
            else 0,
            sparse_layers=sparse,
            bos_token_id=config.get("bos_token_id"),
            eos_token_id=_first(config.get("eos_token_id")),
        )


def _first(value):
    return value[0] if isinstance(value, list) and value else value
