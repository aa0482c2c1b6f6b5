"""Tensor names of the two gpt-oss checkpoint layouts, mapped onto one set of canonical names.

- "hf": the Hugging Face root of `openai/gpt-oss-*` (transformers naming; q/k/v split; experts as
  MXFP4 `*_blocks`/`*_scales`, or as float `gate_up_proj` [E, in, out] when transformers saved
  dequantized weights).
- "original": `original/` (OpenAI reference naming; fused qkv; experts `mlp1_weight.blocks` ...,
  or a float `mlp1_weight` [E, out, in]).

Canonical per-layer names: attn_norm, qkv_w, qkv_b, sinks, out_w, out_b, mlp_norm, router_w,
router_b; experts: gate_up / down (+ _bias). Globals: embedding, final_norm, unembedding.
Reader (checkpoint.py) and writer (random_checkpoint.py) both go through this table.
"""

from __future__ import annotations

from dataclasses import dataclass

HF = "hf"
ORIGINAL = "original"
LAYOUTS = (HF, ORIGINAL)

EXPERT_MATRICES = ("gate_up", "down")


def global_name(layout: str, what: str) -> str:
    return {
        HF: {"embedding": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
             "unembedding": "lm_head.weight"},
        ORIGINAL: {"embedding": "embedding.weight", "final_norm": "norm.scale",
                   "unembedding": "unembedding.weight"},
    }[layout][what]


def layer_names(layout: str, layer: int) -> dict[str, tuple[str, ...]]:
    """Canonical name -> stored names; several stored names are concatenated along dim 0
    (the HF layout splits the fused qkv projection into q_proj, k_proj, v_proj, in that order)."""
    if layout == HF:
        p = f"model.layers.{layer}."
        a = p + "self_attn."
        return {
            "attn_norm": (p + "input_layernorm.weight",),
            "qkv_w": (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"),
            "qkv_b": (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"),
            "sinks": (a + "sinks",),
            "out_w": (a + "o_proj.weight",),
            "out_b": (a + "o_proj.bias",),
            "mlp_norm": (p + "post_attention_layernorm.weight",),
            "router_w": (p + "mlp.router.weight",),
            "router_b": (p + "mlp.router.bias",),
        }
    p = f"block.{layer}."
    return {
        "attn_norm": (p + "attn.norm.scale",),
        "qkv_w": (p + "attn.qkv.weight",),
        "qkv_b": (p + "attn.qkv.bias",),
        "sinks": (p + "attn.sinks",),
        "out_w": (p + "attn.out.weight",),
        "out_b": (p + "attn.out.bias",),
        "mlp_norm": (p + "mlp.norm.scale",),
        "router_w": (p + "mlp.gate.weight",),
        "router_b": (p + "mlp.gate.bias",),
    }


@dataclass(frozen=True)
class ExpertTensorNames:
    """Where one expert matrix stack ([E, out, in] logically) is stored."""

    blocks: str  # MXFP4 blocks [E, out, in/32, 16] uint8
    scales: str  # MXFP4 scales [E, out, in/32] uint8
    dense: str  # float alternative
    dense_is_in_out: bool  # True when the float tensor is [E, in, out] (transformers' x @ W form)
    bias: str  # [E, out]


def expert_names(layout: str, layer: int, matrix: str) -> ExpertTensorNames:
    if matrix not in EXPERT_MATRICES:
        raise KeyError(matrix)
    if layout == HF:
        base = f"model.layers.{layer}.mlp.experts.{matrix}_proj"
        return ExpertTensorNames(base + "_blocks", base + "_scales", base, True, base + "_bias")
    index = 1 if matrix == "gate_up" else 2
    base = f"block.{layer}.mlp.mlp{index}"
    return ExpertTensorNames(base + "_weight.blocks", base + "_weight.scales", base + "_weight", False,
                             base + "_bias")
