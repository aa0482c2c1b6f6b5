"""Random-weight checkpoints in exactly the layout of `openai/gpt-oss-*` (`gptoss make-tiny`).

No real weights can be downloaded in CI, so every loading path is tested on these: the HF root
layout (optionally sharded with an index) or `original/`, experts in MXFP4 or as floats. Random
values are chosen so the stored checkpoints all define the SAME model: non-expert tensors are
rounded to bf16 (their stored dtype) and expert matrices to MXFP4-representable values, so writing
them as MXFP4 loses nothing. Scales keep the residual stream dominated by the token embedding and
give peaked output distributions, so the random model does not collapse onto one token.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from model_shards import mxfp4
from model_shards.config import GptOssConfig, preset
from model_shards.layout import HF, ORIGINAL, expert_names, global_name, layer_names
from model_shards.linear import Linear
from model_shards.weights import (AttentionWeights, DenseStack, ExpertStack, ExpertWeights, GlobalWeights,
                                  ModelWeights, Mxfp4Stack, RouterWeights)

log = logging.getLogger(__name__)


def random_weights(cfg: GptOssConfig, seed: int = 0) -> ModelWeights:
    """float32 weights whose values are exactly representable in the stored formats."""
    gen = torch.Generator().manual_seed(seed)
    h, inter, e, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.vocab_size
    qkv = cfg.q_dim + 2 * cfg.kv_dim

    def normal(*shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std + mean).to(torch.bfloat16).to(torch.float32)

    def expert_matrix(n_out: int, n_in: int, std: float) -> DenseStack:
        blocks, scales = mxfp4.quantize(torch.randn(e, n_out, n_in, generator=gen) * std)
        return DenseStack(mxfp4.dequantize(blocks, scales, torch.float32))

    layers = range(cfg.num_hidden_layers)
    return ModelWeights(
        config=cfg,
        globals=GlobalWeights(
            embedding=normal(v, h, std=1.0),
            final_norm=normal(h, std=0.1, mean=1.0),
            unembedding=Linear(normal(v, h, std=4.0 / math.sqrt(h))),
        ),
        attention=[AttentionWeights(
            attn_norm=normal(h, std=0.1, mean=1.0),
            qkv=Linear(normal(qkv, h, std=1.0 / math.sqrt(h)), normal(qkv, std=0.1)),
            sinks=normal(cfg.num_attention_heads, std=1.0),
            out=Linear(normal(h, cfg.q_dim, std=0.5 / math.sqrt(cfg.q_dim)), normal(h, std=0.02)),
            mlp_norm=normal(h, std=0.1, mean=1.0),
        ) for _ in layers],
        routers=[RouterWeights(weight=normal(e, h, std=1.0 / math.sqrt(h)), bias=normal(e, std=0.1)) for _ in layers],
        experts=[ExpertWeights(
            first=0,
            gate_up=expert_matrix(2 * inter, h, 1.0 / math.sqrt(h)),
            gate_up_bias=normal(e, 2 * inter, std=0.1),
            down=expert_matrix(h, inter, 0.5 / math.sqrt(inter)),
            down_bias=normal(e, h, std=0.02),
        ) for _ in layers],
    )


def _stack_tensors(stack: ExpertStack, names_blocks: str, names_scales: str, dense_name: str,
                   dense_in_out: bool, as_mxfp4: bool) -> dict[str, torch.Tensor]:
    if as_mxfp4:
        if isinstance(stack, Mxfp4Stack):
            blocks, scales = stack.blocks, stack.scales
        else:
            blocks, scales = mxfp4.quantize(stack.weight)
        return {names_blocks: blocks, names_scales: scales}
    weight = stack.weight if isinstance(stack, DenseStack) else mxfp4.dequantize(stack.blocks, stack.scales)
    weight = weight.transpose(1, 2) if dense_in_out else weight
    return {dense_name: weight.to(torch.bfloat16).contiguous()}


def checkpoint_tensors(weights: ModelWeights, layout: str, as_mxfp4: bool) -> dict[str, torch.Tensor]:
    """Name -> stored tensor (bf16, or uint8 MXFP4 blocks/scales) for one layout."""
    cfg = weights.config
    out: dict[str, torch.Tensor] = {}
    g = weights.globals
    for what, tensor in (("embedding", g.embedding), ("final_norm", g.final_norm), ("unembedding", g.unembedding.weight)):
        out[global_name(layout, what)] = tensor
    split = [cfg.q_dim, cfg.kv_dim, cfg.kv_dim]
    for i in range(cfg.num_hidden_layers):
        attn, router, experts = weights.attention[i], weights.routers[i], weights.experts[i]
        values = {"attn_norm": attn.attn_norm, "qkv_w": attn.qkv.weight, "qkv_b": attn.qkv.bias, "sinks": attn.sinks,
                  "out_w": attn.out.weight, "out_b": attn.out.bias, "mlp_norm": attn.mlp_norm,
                  "router_w": router.weight, "router_b": router.bias}
        for key, names in layer_names(layout, i).items():
            parts = torch.split(values[key], split) if len(names) == 3 else (values[key],)
            out.update(zip(names, parts))
        for matrix in ("gate_up", "down"):
            names = expert_names(layout, i, matrix)
            stack = experts.gate_up if matrix == "gate_up" else experts.down
            out.update(_stack_tensors(stack, names.blocks, names.scales, names.dense, names.dense_is_in_out, as_mxfp4))
            out[names.bias] = experts.gate_up_bias if matrix == "gate_up" else experts.down_bias
    return {k: (t if t.dtype == torch.uint8 else t.to(torch.bfloat16)).contiguous() for k, t in out.items()}


def _save_shards(tensors: dict[str, torch.Tensor], directory: Path, stem: str, max_shard_bytes: int | None) -> None:
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and groups[-1] and size + nbytes > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += nbytes
    if len(groups) == 1:
        save_file(groups[0], directory / f"{stem}.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, group in enumerate(groups):
        file = f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_checkpoint(weights: ModelWeights, out_dir: str | Path, layout: str = HF, as_mxfp4: bool = True,
                     max_shard_bytes: int | None = None) -> Path:
    """Write `weights` as a checkpoint directory; returns it."""
    root = Path(out_dir)
    cfg = weights.config
    tensors = checkpoint_tensors(weights, layout, as_mxfp4)
    if layout == HF:
        root.mkdir(parents=True, exist_ok=True)
        config = cfg.to_hf_dict()
        if as_mxfp4:
            config["quantization_config"] = {
                "quant_method": "mxfp4",
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"],
            }
        (root / "config.json").write_text(json.dumps(config, indent=2))
        (root / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 199998, "do_sample": True, "eos_token_id": [200002, 199999, 200012],
             "pad_token_id": 199999}, indent=2))
        _save_shards(tensors, root, "model", max_shard_bytes)
    elif layout == ORIGINAL:
        directory = root / "original"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(cfg.to_original_dict(), indent=2))
        labels = {name: ("FP4" if name.endswith(".blocks") else "UE8" if name.endswith(".scales") else "BF16")
                  for name in tensors}
        (directory / "dtypes.json").write_text(json.dumps(labels, indent=1))
        _save_shards(tensors, directory, "model", max_shard_bytes)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    log.info("wrote %s checkpoint (%s experts) to %s", layout, "MXFP4" if as_mxfp4 else "bf16", root)
    return root


def make_tiny(out_dir: str | Path, preset_name: str = "tiny", layout: str = HF, as_mxfp4: bool = True,
              seed: int = 0, max_shard_bytes: int | None = None) -> Path:
    return write_checkpoint(random_weights(preset(preset_name), seed), out_dir, layout, as_mxfp4, max_shard_bytes)


def default_random_model(cache_dir: str | Path | None = None, preset_name: str = "tiny", seed: int = 0) -> Path:
    """A random checkpoint made once into a cache directory (what `gptoss serve` serves when no
    model is given). Written to a temporary name and renamed, so a half-written one is never used."""
    root = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "gptoss"
    target = root / f"random-{preset_name}-seed{seed}"
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{target.name}.{os.getpid()}"
    make_tiny(staging, preset_name, HF, True, seed)
    try:
        staging.rename(target)
    except OSError:  # another process finished first: use theirs
        shutil.rmtree(staging, ignore_errors=True)
    return target
