"""The gpt-oss model configuration: one frozen dataclass, read from either checkpoint layout.

Two files describe the same model: the Hugging Face `config.json` (transformers naming, with RoPE
scaling under `rope_scaling` in v4 files or `rope_parameters` in v5 files) and `original/config.json`
(the naming of OpenAI's reference code). Both map onto `GptOssConfig`. Unknown keys and keys that
contradict each other are errors, because a silently ignored RoPE field is exactly how other engines
ended up with the wrong YaRN (unrounded correction range, concentration on cos and sin: see rope.py).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"


class ConfigError(ValueError):
    """A config file that does not describe a gpt-oss model we can run."""


@dataclass(frozen=True)
class GptOssConfig:
    num_hidden_layers: int
    num_experts: int
    experts_per_token: int
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    head_dim: int
    num_attention_heads: int
    num_key_value_heads: int
    sliding_window: int
    layer_types: tuple[str, ...]  # one of SLIDING / FULL per layer
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    rope_beta_fast: float = 32.0  # original: rope_ntk_beta
    rope_beta_slow: float = 1.0  # original: rope_ntk_alpha
    initial_context_length: int = 4096  # HF: original_max_position_embeddings
    # gpt-oss needs the unrounded YaRN correction range; transformers rounds it when the key is absent.
    rope_truncate: bool = False
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702

    def __post_init__(self) -> None:
        for name in ("num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size",
                     "intermediate_size", "head_dim", "num_attention_heads", "num_key_value_heads",
                     "sliding_window", "initial_context_length", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.experts_per_token > self.num_experts:
            raise ConfigError(f"experts_per_token ({self.experts_per_token}) exceeds num_experts ({self.num_experts})")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            raise ConfigError(f"unknown layer types {bad}; expected {SLIDING!r} or {FULL!r}")
        if self.rope_scaling_factor < 1.0 or self.rope_theta <= 1.0:
            raise ConfigError("rope_scaling_factor must be >= 1 and rope_theta > 1")

    # -- derived sizes -------------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def replace(self, **changes: Any) -> GptOssConfig:
        return dataclasses.replace(self, **changes)

    # -- writing (used by the random-checkpoint writer) ----------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """config.json as the hub ships it (v4 form, `rope_scaling` + `rope_theta`)."""
        return {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "attention_bias": True,
            "attention_dropout": 0.0,
            "eos_token_id": 200002,
            "pad_token_id": 199999,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "layer_types": list(self.layer_types),
            "max_position_embeddings": self.max_position_embeddings,
            "num_attention_heads": self.num_attention_heads,
            "num_experts_per_tok": self.experts_per_token,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "num_local_experts": self.num_experts,
            "output_router_logits": False,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": {
                "beta_fast": self.rope_beta_fast,
                "beta_slow": self.rope_beta_slow,
                "factor": self.rope_scaling_factor,
                "original_max_position_embeddings": self.initial_context_length,
                "rope_type": "yarn",
                "truncate": self.rope_truncate,
            },
            "rope_theta": self.rope_theta,
            "router_aux_loss_coef": 0.9,
            "sliding_window": self.sliding_window,
            "swiglu_limit": self.swiglu_limit,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }

    def to_original_dict(self) -> dict[str, Any]:
        """original/config.json; that format cannot express non-default layer types or eps."""
        if self.layer_types != _alternating(self.num_hidden_layers) or self.rms_norm_eps != 1e-5 \
                or self.rope_truncate:
            raise ConfigError("the original/ config format only describes the standard gpt-oss layout")
        return {
            "num_hidden_layers": self.num_hidden_layers,
            "num_experts": self.num_experts,
            "experts_per_token": self.experts_per_token,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "swiglu_limit": self.swiglu_limit,
            "head_dim": self.head_dim,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window,
            "initial_context_length": self.initial_context_length,
            "rope_theta": self.rope_theta,
            "rope_scaling_factor": self.rope_scaling_factor,
            "rope_ntk_alpha": self.rope_beta_slow,
            "rope_ntk_beta": self.rope_beta_fast,
        }


def _alternating(num_layers: int) -> tuple[str, ...]:
    # gpt-oss: even layers slide (reference `layer_idx % 2 == 0`), odd layers attend to everything.
    return tuple(SLIDING if i % 2 == 0 else FULL for i in range(num_layers))


# -- presets ------------------------------------------------------------------------------------

def _preset(layers: int, experts: int, hidden: int, intermediate: int, heads: int, kv_heads: int,
            head_dim: int, vocab: int = 201088) -> GptOssConfig:
    return GptOssConfig(
        num_hidden_layers=layers, num_experts=experts, experts_per_token=4, vocab_size=vocab,
        hidden_size=hidden, intermediate_size=intermediate, head_dim=head_dim,
        num_attention_heads=heads, num_key_value_heads=kv_heads, sliding_window=128,
        layer_types=_alternating(layers),
    )


PRESETS: dict[str, GptOssConfig] = {
    "gpt-oss-20b": _preset(24, 32, 2880, 2880, 64, 8, 64),
    "gpt-oss-120b": _preset(36, 128, 2880, 2880, 64, 8, 64),
    # Test sizes keep the real vocabulary (so the real tokenizer applies), the real window of 128 and
    # a q width that differs from the hidden size, as in the real model (4096 vs 2880).
    "tiny": _preset(4, 16, 64, 64, 8, 2, 16),
    "small": _preset(8, 32, 512, 512, 16, 2, 64),
}


def preset(name: str) -> GptOssConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


# -- reading ------------------------------------------------------------------------------------

# Keys transformers writes that do not change inference.
_HF_IGNORED = {
    "_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype", "initializer_range",
    "use_cache", "output_router_logits", "router_aux_loss_coef", "bos_token_id", "eos_token_id",
    "pad_token_id", "hidden_act",  # "silu" in the hub file; the real activation is the clamped SwiGLU
    "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id", "problem_type",
    "tokenizer_class", "chunk_size_feed_forward", "is_encoder_decoder", "attention_dropout",
}
_HF_ROPE_KEYS = {"rope_type", "type", "factor", "beta_fast", "beta_slow", "truncate",
                 "original_max_position_embeddings", "rope_theta"}
_ORIGINAL_KEYS = {"num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size",
                  "intermediate_size", "swiglu_limit", "head_dim", "num_attention_heads",
                  "num_key_value_heads", "sliding_window", "initial_context_length", "rope_theta",
                  "rope_scaling_factor", "rope_ntk_alpha", "rope_ntk_beta"}


def _merge_aliases(d: dict[str, Any], names: tuple[str, ...], what: str) -> Any:
    present = {n: d[n] for n in names if n in d and d[n] is not None}
    if len(set(map(repr, present.values()))) > 1:
        raise ConfigError(f"contradictory values for {what}: {present}")
    if not present:
        raise ConfigError(f"config is missing {what} (one of {list(names)})")
    return next(iter(present.values()))


def _hf_rope(d: dict[str, Any]) -> dict[str, Any]:
    """Merge `rope_scaling` (v4) and `rope_parameters` (v5) and top-level `rope_theta`, refusing
    any disagreement between them."""
    sources = {k: d[k] for k in ("rope_scaling", "rope_parameters") if isinstance(d.get(k), dict)}
    if not sources:
        raise ConfigError("config has neither rope_scaling nor rope_parameters; gpt-oss needs YaRN")
    merged: dict[str, Any] = {}
    for source, params in sources.items():
        unknown = set(params) - _HF_ROPE_KEYS
        if unknown:
            raise ConfigError(f"unsupported {source} keys {sorted(unknown)}")
        for key, value in params.items():
            key = "rope_type" if key == "type" else key
            if key in merged and merged[key] != value:
                raise ConfigError(f"contradictory RoPE field {key!r}: {merged[key]!r} vs {value!r} in {source}")
            merged[key] = value
    if "rope_theta" in d and d["rope_theta"] is not None:
        if "rope_theta" in merged and merged["rope_theta"] != d["rope_theta"]:
            raise ConfigError(f"contradictory rope_theta: {d['rope_theta']!r} vs {merged['rope_theta']!r}")
        merged["rope_theta"] = d["rope_theta"]
    if merged.get("rope_type") != "yarn":
        raise ConfigError(f"gpt-oss uses YaRN RoPE, config says rope_type={merged.get('rope_type')!r}")
    for key in ("factor", "original_max_position_embeddings"):
        if merged.get(key) is None:
            raise ConfigError(f"RoPE parameters lack {key!r}")
    return merged


def config_from_hf(d: dict[str, Any]) -> GptOssConfig:
    """Build from a transformers `config.json` dict."""
    if d.get("model_type", "gpt_oss") != "gpt_oss":
        raise ConfigError(f"not a gpt-oss config: model_type={d.get('model_type')!r}")
    known = _HF_IGNORED | {
        "model_type", "attention_bias", "head_dim", "hidden_size", "intermediate_size", "layer_types",
        "max_position_embeddings", "num_attention_heads", "num_experts_per_tok", "experts_per_token",
        "num_hidden_layers", "num_key_value_heads", "num_local_experts", "num_experts", "rms_norm_eps",
        "rope_scaling", "rope_parameters", "rope_theta", "sliding_window", "swiglu_limit", "swiglu_alpha",
        "tie_word_embeddings", "vocab_size", "quantization_config", "initial_context_length",
    }
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown config.json fields {unknown}")
    if d.get("attention_bias", True) is not True:
        raise ConfigError("gpt-oss attention has biases; attention_bias=false is not supported")
    if d.get("tie_word_embeddings", False):
        raise ConfigError("gpt-oss has separate embedding and unembedding; tie_word_embeddings=true is not supported")
    quant = d.get("quantization_config")
    if quant is not None and quant.get("quant_method") != "mxfp4":
        raise ConfigError(f"unsupported quantization {quant.get('quant_method')!r}; only mxfp4 is")
    rope = _hf_rope(d)
    layers = d.get("num_hidden_layers")
    hidden = d.get("hidden_size")
    heads = d.get("num_attention_heads")
    if not all(isinstance(v, int) for v in (layers, hidden, heads)):
        raise ConfigError("config.json needs integer num_hidden_layers, hidden_size and num_attention_heads")
    window = d.get("sliding_window")
    layer_types = tuple(d.get("layer_types") or _alternating(layers))
    if window is None and SLIDING in layer_types:
        raise ConfigError("layer_types has sliding layers but sliding_window is null")
    factor = float(rope["factor"])
    original_ctx = int(rope["original_max_position_embeddings"])
    if d.get("initial_context_length") not in (None, original_ctx):  # the hub file carries both names
        raise ConfigError(f"contradictory initial_context_length {d['initial_context_length']!r} and "
                          f"original_max_position_embeddings {original_ctx!r}")
    return GptOssConfig(
        num_hidden_layers=layers,
        num_experts=_merge_aliases(d, ("num_local_experts", "num_experts"), "the number of experts"),
        experts_per_token=_merge_aliases(d, ("num_experts_per_tok", "experts_per_token"), "experts per token"),
        vocab_size=d.get("vocab_size"),
        hidden_size=hidden,
        intermediate_size=d.get("intermediate_size"),
        head_dim=d.get("head_dim") or hidden // heads,
        num_attention_heads=heads,
        num_key_value_heads=d.get("num_key_value_heads") or heads,
        sliding_window=window or 128,
        layer_types=layer_types,
        rope_theta=float(rope.get("rope_theta", 150000.0)),
        rope_scaling_factor=factor,
        rope_beta_fast=float(rope.get("beta_fast") or 32.0),
        rope_beta_slow=float(rope.get("beta_slow") or 1.0),
        initial_context_length=original_ctx,
        # transformers rounds the correction range when `truncate` is absent; follow it, since the
        # hub files spell out `truncate: false` and transformers is the reference we test against.
        rope_truncate=bool(rope.get("truncate", True)),
        max_position_embeddings=d.get("max_position_embeddings") or int(original_ctx * factor),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        swiglu_limit=float(d.get("swiglu_limit", 7.0)),
        swiglu_alpha=float(d.get("swiglu_alpha", 1.702)),
    )


def config_from_original(d: dict[str, Any]) -> GptOssConfig:
    """Build from `original/config.json` (the reference implementation's `ModelConfig`)."""
    unknown = sorted(set(d) - _ORIGINAL_KEYS)
    if unknown:
        raise ConfigError(f"unknown original/config.json fields {unknown}")
    missing = sorted(_ORIGINAL_KEYS - set(d) - {"swiglu_limit"})
    if missing:
        raise ConfigError(f"original/config.json lacks {missing}")
    layers = d["num_hidden_layers"]
    return GptOssConfig(
        num_hidden_layers=layers,
        num_experts=d["num_experts"],
        experts_per_token=d["experts_per_token"],
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        head_dim=d["head_dim"],
        num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=d["num_key_value_heads"],
        sliding_window=d["sliding_window"],
        layer_types=_alternating(layers),
        rope_theta=float(d["rope_theta"]),
        rope_scaling_factor=float(d["rope_scaling_factor"]),
        rope_beta_fast=float(d["rope_ntk_beta"]),
        rope_beta_slow=float(d["rope_ntk_alpha"]),
        initial_context_length=d["initial_context_length"],
        rope_truncate=False,  # the reference never rounds the correction range
        max_position_embeddings=int(d["initial_context_length"] * d["rope_scaling_factor"]),
        swiglu_limit=float(d.get("swiglu_limit", 7.0)),
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path.name} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name} must hold a JSON object")
    return data


def load_config(checkpoint_dir: str | Path, layout: str) -> GptOssConfig:
    """Read the config of a checkpoint directory in layout "hf" (config.json) or "original"."""
    root = Path(checkpoint_dir)
    if layout == "hf":
        return config_from_hf(_read_json(root / "config.json"))
    if layout == "original":
        path = root / "original" / "config.json"
        return config_from_original(_read_json(path if path.exists() else root / "config.json"))
    raise ConfigError(f"unknown layout {layout!r}")

