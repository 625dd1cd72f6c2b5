"""ModelSpec: architecture read from config.json, with clear errors."""
from __future__ import annotations

import pytest

from cluster.checkpoint.make import build_config
from cluster.checkpoint.spec import ModelSpec, UnsupportedModelError


def test_families_parse():
    m = ModelSpec.from_config(build_config("mixtral", "small"))
    assert (m.family, m.num_experts, m.top_k, m.norm_topk_prob) == ("mixtral", 8, 2, True)
    assert m.sparse_layers == tuple(range(8)) and not m.has_shared_expert
    q2 = ModelSpec.from_config(build_config("qwen2_moe", "small"))
    assert q2.has_shared_expert and q2.qkv_bias and not q2.qk_norm
    assert q2.sparse_layers == tuple(range(7))  # the last layer is dense (mlp_only_layers)
    q3 = ModelSpec.from_config(build_config("qwen3_moe", "small"))
    assert q3.qk_norm and q3.norm_topk_prob and not q3.qkv_bias


def test_decoder_sparse_step_and_mlp_only_layers():
    config = build_config("qwen2_moe", "small") | {"decoder_sparse_step": 2, "mlp_only_layers": [3]}
    assert ModelSpec.from_config(config).sparse_layers == (1, 5, 7)


def test_qwen3_num_local_experts_alias():
    """transformers 5 saves Qwen3-MoE's expert count as num_local_experts."""
    config = build_config("qwen3_moe", "tiny")
    config["num_local_experts"] = config.pop("num_experts")
    assert ModelSpec.from_config(config).num_experts == 8


def test_expert_tensor_names():
    m = ModelSpec.from_config(build_config("mixtral", "tiny"))
    assert m.expert_tensor_names(1, 3)[0] == "model.layers.1.block_sparse_moe.experts.3.w1.weight"
    q = ModelSpec.from_config(build_config("qwen3_moe", "tiny"))
    assert q.expert_tensor_names(0, 2)[2] == "model.layers.0.mlp.experts.2.down_proj.weight"
    assert q.is_expert_tensor("model.layers.0.mlp.experts.2.down_proj.weight")
    assert not q.is_expert_tensor("model.layers.0.mlp.gate.weight")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architectures": ["LlamaForCausalLM"]}, "unsupported architecture.*LlamaForCausalLM.*MixtralForCausalLM"),
        ({"architectures": None, "model_type": "gpt2"}, "unsupported architecture 'gpt2'"),
        ({"num_local_experts": None}, "lacks 'num_local_experts'"),
        ({"num_experts_per_tok": 9}, r"num_experts_per_tok must be in \[1, num_experts=8\], got 9"),
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn' is not supported"),
    ],
)
def test_bad_configs_get_clear_errors(change, message):
    config = build_config("mixtral", "tiny") | change
    with pytest.raises(UnsupportedModelError, match=message):
        ModelSpec.from_config(config)


def test_missing_and_invalid_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ModelSpec.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UnsupportedModelError, match="not valid JSON"):
        ModelSpec.from_dir(tmp_path)
