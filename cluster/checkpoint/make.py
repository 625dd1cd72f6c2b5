"""Write deterministic random-weight MoE checkpoints in the Hugging Face layout.

The demo and the tests need models but may not download any, so this writes
config.json, safetensors (sharded past --max-shard-mb, with an index) and a small
byte-level BPE tokenizer.json trained locally on a built-in text. `transformers`
loads the result with its own classes; the tests check that.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from cluster.checkpoint.spec import FAMILIES, ModelSpec

log = logging.getLogger(__name__)

ARCH = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}

# layers, hidden, heads, kv heads, experts, top-k, expert FFN, vocab
PRESETS = {
    "tiny": dict(layers=2, hidden=64, heads=4, kv_heads=2, experts=8, top_k=2, ffn=64, vocab=320),
    "small": dict(layers=8, hidden=512, heads=8, kv_heads=4, experts=8, top_k=2, ffn=1024, vocab=4096),
}

CORPUS = """Mixture-of-Experts models route every token to a few experts out of many.
The router computes a gate, keeps the top k experts, and sends the token to the
groups that hold them. Hot experts get replicas; cold replicas are dropped.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Elastic serving means the cluster follows the traffic: more groups when it is busy,
fewer when it is quiet, and no request fails while weights move between GPUs.
def forward(self, hidden): return self.down(silu(self.gate(hidden)) * self.up(hidden))
0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ? ' " @ # $ % ^ & _ | ~ `
"""


# The chat template written beside the tokenizer (tokenizer_config.json, Hugging Face's place for it),
# so the demo can serve /v1/chat/completions: a Zephyr-like layout, bos first, eos closing every turn
# (where a trained model would learn to stop), and only the roles it knows.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles must be system, user or assistant, got ' + message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tokenizer_config(max_positions: int) -> dict:
    """tokenizer_config.json: what transformers' AutoTokenizer and chat templates read."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
            "model_max_length": max_positions, "add_bos_token": False, "chat_template": CHAT_TEMPLATE}


def build_config(family: str, preset: str) -> dict:
    p = PRESETS[preset]
    config = {
        "architectures": [ARCH[family]],
        "model_type": family,
        "vocab_size": p["vocab"],
        "hidden_size": p["hidden"],
        "num_hidden_layers": p["layers"],
        "num_attention_heads": p["heads"],
        "num_key_value_heads": p["kv_heads"],
        "head_dim": p["hidden"] // p["heads"],
        "num_experts_per_tok": p["top_k"],
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 0,  # build_tokenizer puts <s>, </s> first
        "eos_token_id": 1,
        "torch_dtype": "float32",
    }
    if family == "mixtral":
        config.update(num_local_experts=p["experts"], intermediate_size=p["ffn"], sliding_window=None)
    else:
        config.update(num_experts=p["experts"], moe_intermediate_size=p["ffn"], intermediate_size=2 * p["ffn"],
                      norm_topk_prob=family == "qwen3_moe", decoder_sparse_step=1, use_sliding_window=False)
        # one dense layer exercises mlp_only_layers; Qwen2-MoE also gets its shared expert
        config["mlp_only_layers"] = [p["layers"] - 1] if p["layers"] > 2 else []
        if family == "qwen2_moe":
            config["shared_expert_intermediate_size"] = 2 * p["ffn"]
    return config


def tensor_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the model, in the family's Hugging Face naming."""
    H, D, V = spec.hidden_size, spec.head_dim, spec.vocab_size
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for l in range(spec.num_layers):
        a = f"model.layers.{l}.self_attn"
        shapes.update({
            f"model.layers.{l}.input_layernorm.weight": (H,),
            f"model.layers.{l}.post_attention_layernorm.weight": (H,),
            f"{a}.q_proj.weight": (spec.num_heads * D, H),
            f"{a}.k_proj.weight": (spec.num_kv_heads * D, H),
            f"{a}.v_proj.weight": (spec.num_kv_heads * D, H),
            f"{a}.o_proj.weight": (H, spec.num_heads * D),
        })
        if spec.qkv_bias:
            shapes.update({f"{a}.q_proj.bias": (spec.num_heads * D,), f"{a}.k_proj.bias": (spec.num_kv_heads * D,),
                           f"{a}.v_proj.bias": (spec.num_kv_heads * D,)})
        if spec.qk_norm:
            shapes.update({f"{a}.q_norm.weight": (D,), f"{a}.k_norm.weight": (D,)})
        if not spec.is_sparse(l):
            F = spec.dense_intermediate_size
            shapes.update({f"model.layers.{l}.mlp.{n}.weight": s for n, s in
                           [("gate_proj", (F, H)), ("up_proj", (F, H)), ("down_proj", (H, F))]})
            continue
        shapes[f"model.layers.{l}.{spec.moe_prefix}.gate.weight"] = (spec.num_experts, H)
        F = spec.moe_intermediate_size
        for e in range(spec.num_experts):
            gate, up, down = spec.expert_tensor_names(l, e)
            shapes.update({gate: (F, H), up: (F, H), down: (H, F)})
        if spec.has_shared_expert:
            S = spec.shared_expert_intermediate_size
            shapes.update({f"model.layers.{l}.mlp.shared_expert.{n}.weight": s for n, s in
                           [("gate_proj", (S, H)), ("up_proj", (S, H)), ("down_proj", (H, S))]})
            shapes[f"model.layers.{l}.mlp.shared_expert_gate.weight"] = (1, H)
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):  # norms near 1, as after training
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith(".gate.weight"):  # a decisive gate: top-k rarely ties, so greedy tests are stable
        return torch.randn(shape, generator=gen) * (2.0 / shape[1] ** 0.5)
    std = 1.0 if name == "model.embed_tokens.weight" else 1.0 / shape[-1] ** 0.5
    return torch.randn(shape, generator=gen) * std


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on CORPUS: <s> = 0, </s> = 1, then the 256 bytes, then merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    return tok


def make_checkpoint(family: str, preset: str, out: str | Path, seed: int = 0, max_shard_mb: float = 1024) -> Path:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = build_config(family, preset)
    spec = ModelSpec.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, limit = 0, max_shard_mb * 2**20
    for name, shape in tensor_shapes(spec).items():  # insertion order is fixed, so the seed fixes every tensor
        t = random_tensor(name, shape, gen)
        if size + t.numel() * 4 > limit and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.numel() * 4
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / file), metadata={"format": "pt"})
            weight_map.update({n: file for n in shard})
        total = sum(t.numel() * 4 for s in shards for t in s.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tok = build_tokenizer(spec.vocab_size)
    assert tok.get_vocab_size() <= spec.vocab_size
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(spec.max_position_embeddings), indent=2))
    log.info("wrote %s %s checkpoint (seed %d, %d shard(s)) to %s", family, preset, seed, len(shards), out)
    return out
