from __future__ import annotations

import json

import pytest

from model_shards.config import FULL, SLIDING, ConfigError, config_from_hf, config_from_original, load_config, preset
from model_shards.weights import empty_model

HUB_20B = {  # the hub's config.json for gpt-oss-20b
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
    "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
    "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
    "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088,
}
ORIGINAL_20B = {"num_hidden_layers": 24, "num_experts": 32, "experts_per_token": 4, "vocab_size": 201088,
                "hidden_size": 2880, "intermediate_size": 2880, "swiglu_limit": 7.0, "head_dim": 64,
                "num_attention_heads": 64, "num_key_value_heads": 8, "sliding_window": 128,
                "initial_context_length": 4096, "rope_theta": 150000, "rope_scaling_factor": 32.0,
                "rope_ntk_alpha": 1, "rope_ntk_beta": 32}


def test_hub_config_equals_preset_and_original() -> None:
    hub = config_from_hf(HUB_20B.copy())
    assert hub == preset("gpt-oss-20b") == config_from_original(ORIGINAL_20B)
    assert hub.layer_types[:2] == (SLIDING, FULL) and hub.is_sliding(0) and not hub.is_sliding(23)
    assert hub.experts_per_token == 4 and hub.rope_truncate is False


def test_v5_rope_parameters_form() -> None:
    d = {k: v for k, v in HUB_20B.items() if k not in ("rope_scaling", "rope_theta")}
    d["rope_parameters"] = {**HUB_20B["rope_scaling"], "rope_theta": 150000.0}
    assert config_from_hf(d) == preset("gpt-oss-20b")


def test_missing_truncate_follows_transformers_default() -> None:
    d = json.loads(json.dumps(HUB_20B))
    del d["rope_scaling"]["truncate"]
    assert config_from_hf(d).rope_truncate is True


@pytest.mark.parametrize("change, message", [
    ({"mystery_field": 1}, "unknown config.json fields"),
    ({"num_experts": 64}, "contradictory values"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096}},
     "contradictory RoPE field 'factor'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 32.0, "rope_theta": 10000.0,
                          "original_max_position_embeddings": 4096}}, "contradictory rope_theta"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 32.0, "original_max_position_embeddings": 4096}}, "YaRN"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 32.0, "mscale": 1.0,
                       "original_max_position_embeddings": 4096}}, "unsupported rope_scaling keys"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"layer_types": ["sliding_attention"] * 3}, "layer_types has 3 entries"),
    ({"num_key_value_heads": 7}, "multiple of"),
    ({"quantization_config": {"quant_method": "gptq"}}, "unsupported quantization"),
    ({"model_type": "llama"}, "not a gpt-oss config"),
])
def test_bad_hf_configs_say_why(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_hf({**HUB_20B, **change})


def test_bad_original_configs_say_why() -> None:
    with pytest.raises(ConfigError, match="unknown original/config.json fields"):
        config_from_original({**ORIGINAL_20B, "rms_norm_eps": 1e-6})
    with pytest.raises(ConfigError, match="lacks"):
        config_from_original({k: v for k, v in ORIGINAL_20B.items() if k != "rope_theta"})


def test_load_config_reports_bad_json(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path, "hf")


def test_round_trip_through_both_file_forms() -> None:
    for name in ("tiny", "small", "gpt-oss-120b"):
        cfg = preset(name)
        assert config_from_hf(cfg.to_hf_dict()) == cfg
        assert config_from_original(cfg.to_original_dict()) == cfg


@pytest.mark.parametrize("name, billions", [("gpt-oss-20b", 20.91), ("gpt-oss-120b", 116.83)])
def test_parameter_counts_on_meta_device(name: str, billions: float) -> None:
    count = empty_model(preset(name), device="meta").num_parameters()
    assert abs(count / 1e9 - billions) <= 0.01, count
